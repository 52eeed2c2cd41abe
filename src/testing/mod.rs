//! Test doubles for the node's I/O edges, for tests, demos and benches.
//!
//! - [`fake_provider`]: an in-process HTTP server that speaks the OpenAI, Anthropic and Gemini
//!   wire formats and fails, throttles, stalls and cuts connections on request.
//!
//! Nothing here is used by the node itself.

pub mod fake_provider;
