//! The node's side of the LLM providers: what kind of API a provider speaks, and the
//! classification of its failures.
//!
//! The policy that acts on a classification (budget, breaker, retry) is pure and lives in
//! [`troupe_actors::provider`]; this module reads what providers send, and its clients make the
//! calls that policy admitted.
//!
//! - [`classify`]: HTTP error answers, mid-stream error events and transport failures into an
//!   [`ErrorClass`].
//! - [`client`]: the HTTP clients (OpenAI-compatible, Anthropic, Gemini) behind the actor
//!   crate's provider port.
//! - [`keys`]: session-scoped gateway keys.
//!
//! [`node_providers`] builds, from the configuration, each provider's actor reference and
//! client and the routing table.

/// In tests: the bytes of `tests/fixtures/providers/<name>`.
#[cfg(test)]
macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/providers/",
            $name
        ))
    };
}

pub mod classify;
pub mod client;
mod error_body;
pub mod keys;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use troupe_actors::provider::{
    BudgetConfig, ProviderActorRef, ProviderPolicyConfig, ProviderSet, ProviderSpec, Target,
};

use crate::config::{Config, ConfigError, ProviderConfig};

pub use classify::{
    ErrorClass, ErrorKind, TransportFailure, classify_http, classify_stream_error,
    classify_transport,
};

/// The API a provider speaks; `kind` in a `[[providers]]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProviderKind {
    /// OpenAI, and any OpenAI-compatible server.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    #[serde(rename = "anthropic")]
    Anthropic,
    /// Google's Gemini API.
    #[serde(rename = "gemini")]
    Gemini,
}

impl ProviderKind {
    /// The configuration name: `openai`, `anthropic` or `gemini`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The providers of a node: their actors (for the tree) and the set callers use.
pub struct NodeProviders {
    /// One per `[[providers]]` entry, in order; the ProviderSupervisor starts them.
    pub actors: Vec<ProviderActorRef>,
    /// The providers with their clients and the routing table.
    pub set: ProviderSet<client::HttpProvider>,
}

/// Builds the providers of `config`.
pub fn node_providers(config: &Config) -> Result<NodeProviders, ConfigError> {
    let mut pairs = Vec::with_capacity(config.providers.len());
    for (index, provider) in config.providers.iter().enumerate() {
        let key = format!("providers[{index}]");
        let spec = provider_spec(provider).map_err(|message| ConfigError::Semantic {
            key: key.clone(),
            message,
        })?;
        let client =
            client::HttpProvider::new(provider).map_err(|error| ConfigError::Semantic {
                key,
                message: error.to_string(),
            })?;
        pairs.push((ProviderActorRef::new(spec), Arc::new(client)));
    }
    let actors = pairs.iter().map(|(actor, _)| actor.clone()).collect();
    let set = ProviderSet::new(pairs, &config.gateway.aliases).map_err(|error| {
        ConfigError::Semantic {
            key: "gateway.aliases".into(),
            message: error.to_string(),
        }
    })?;
    Ok(NodeProviders { actors, set })
}

/// The actor's spec of one `[[providers]]` entry.
pub fn provider_spec(config: &ProviderConfig) -> Result<ProviderSpec, String> {
    let fallback = config
        .fallback
        .iter()
        .map(|target| target.parse::<Target>().map_err(|error| error.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut spec = ProviderSpec::new(config.name.clone());
    spec.models = config.models.clone();
    spec.fallback = fallback;
    spec.max_concurrency = config.max_concurrency.max(1);
    spec.max_queue = config.max_queue.max(1);
    spec.policy = ProviderPolicyConfig {
        budget: BudgetConfig {
            rpm: config.rpm,
            tpm: config.tpm,
        },
        breaker: config.breaker,
        retry: config.retry,
    };
    Ok(spec)
}

/// The headers of an `http::HeaderMap` as (name, value) strings, for the header parsers of
/// [`troupe_actors::provider::headers`] and for [`classify_http`]. Values that are not visible
/// ASCII are skipped.
pub fn header_pairs(headers: &http::HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn provider_kind_names_match_the_configuration() {
        for (kind, name) in [
            (ProviderKind::OpenAi, "openai"),
            (ProviderKind::Anthropic, "anthropic"),
            (ProviderKind::Gemini, "gemini"),
        ] {
            assert_eq!(kind.as_str(), name);
            assert_eq!(kind.to_string(), name);
            let json = format!("\"{name}\"");
            assert_eq!(serde_json::to_string(&kind).expect("serializes"), json);
            assert_eq!(
                serde_json::from_str::<ProviderKind>(&json).expect("parses"),
                kind
            );
        }
        assert!(serde_json::from_str::<ProviderKind>("\"OpenAI\"").is_err());
    }

    #[test]
    fn header_pairs_yield_names_and_readable_values() {
        let mut headers = HeaderMap::new();
        headers.insert("Retry-After", HeaderValue::from_static("20"));
        headers.insert(
            "x-binary",
            HeaderValue::from_bytes(b"\xff\xfe").expect("opaque bytes are a valid value"),
        );
        headers.append(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("7"),
        );
        let mut pairs: Vec<(&str, &str)> = header_pairs(&headers).collect();
        pairs.sort_unstable();
        assert_eq!(
            pairs,
            [
                ("retry-after", "20"),
                ("x-ratelimit-remaining-requests", "7")
            ]
        );
    }
}
