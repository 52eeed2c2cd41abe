//! Integration tests of the actor kernel: supervision, handles, the event bus, health.
#![allow(missing_docs, unreachable_pub)]

mod bus;
mod cluster;
mod handles;
mod node;
mod providers;
mod sessions;
mod startup;
mod supervision;
mod support;
