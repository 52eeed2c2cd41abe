//! troupe
//!
//! - [`provider`]: the LLM providers' API kinds and the classification of their failures.

pub mod provider;
