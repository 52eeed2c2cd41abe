//! Integration tests of the `troupe` binary: started for real on `127.0.0.1:0`, driven over
//! HTTP and through its CLI, observed through its JSON logs.
#![allow(missing_docs, unreachable_pub)]

mod api;
mod cli;
mod cluster;
mod demo;
mod events;
mod gateway;
mod lifecycle;
mod mcp;
mod python;
mod relay;
mod remote;
mod sessions;
mod support;
mod transports;
