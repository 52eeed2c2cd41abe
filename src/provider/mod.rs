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

use std::fmt;

use serde::{Deserialize, Serialize};

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
