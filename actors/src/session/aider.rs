//! The Aider preset: the command line that runs Aider non-interactively, through the node's
//! gateway when there is one.
//!
//! Pure: no processes, no clocks, no I/O.

mod command;

pub use command::{AIDER_PROGRAM, GATEWAY_HIDDEN_ENV, GatewayAccess, aider_command};
