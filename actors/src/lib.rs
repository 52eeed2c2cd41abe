//! troupe-actors: the actor kernel of troupe.
//!
//! Supervised actors exchanging typed messages, with Erlang/OTP-style supervision on top of
//! ractor, a typed event bus, and the node's registry and health actors. This crate never opens
//! a socket, spawns a process or touches the filesystem: I/O comes in through traits (ports)
//! that the `troupe` crate, a host application or a test implements.
//!
//! - [`kernel`]: the [`Actor`](kernel::Actor) trait, contexts, restart-surviving handles.
//! - [`supervisor`]: strategies, child policies, restart intensity, backoff, escalation.
//! - [`event`]: the event model, filters, the EventBus and its subscriptions.
//! - [`registry`], [`health`]: the RegistryActor and the HealthActor.
//! - [`link`]: the TransportActor, one per client link.
//! - [`session`]: sessions' state machine, spec, and the ports they need (runner, store); the
//!   Aider preset (command line, output parser, outcome).
//! - [`node`]: a node's whole supervision tree, started in one call.
//! - [`provider`]: a provider's pure policy: budget, circuit breaker, retry schedule, rate-limit
//!   headers.
//! - [`time`]: deadlines from configured durations that never overflow the clock.

pub mod cluster;
pub mod event;
pub mod health;
pub mod ids;
pub mod kernel;
pub mod link;
pub mod node;
pub mod provider;
pub mod registry;
pub mod session;
pub mod supervisor;
pub mod time;
