//! troupe: an actor-model coordination runtime for AI agent runs.
//!
//! This crate is the node: configuration, storage, the HTTP/SSE front end, the CLI, and the
//! cluster wire codec, around the actor system of [`troupe_actors`]. Embed a node with
//! [`Node::builder`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), troupe::node::NodeError> {
//! let node = troupe::Node::builder().without_http().start().await?;
//! let mut events = node.subscribe(troupe_actors::event::EventFilter::all());
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! See docs/ARCHITECTURE.md for the code map and the invariants.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod http;
pub mod json;
pub mod link;
pub mod mcp;
pub mod metrics;
pub mod node;
pub mod ownership;
pub mod process;
pub mod provider;
pub mod replay;
pub mod session;
mod sse;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod tls;
pub mod wire;

pub use node::{Node, NodeBuilder, NodeError, NodeHandle};
pub use troupe_actors as actors;
