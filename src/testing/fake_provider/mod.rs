//! A fake LLM provider for tests, demos and benches: an in-process HTTP server that speaks
//! OpenAI's, Anthropic's and Gemini's wire formats and misbehaves on request.
//!
//! It never calls a real provider and never leaves loopback unless given a listener that does.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use troupe::testing::fake_provider::{FakeConfig, FakeProvider};
//! let fake = FakeProvider::start(FakeConfig { rpm: 60, ..FakeConfig::default() }).await?;
//! let url = format!("{}/v1/chat/completions", fake.base_url());
//! // POST {"model": "fake-429-retry-after-2", "messages": [...]} to `url`: a 429 with
//! // `retry-after: 2`. Afterwards, `fake.arrivals()` says when each request came.
//! fake.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Endpoints
//!
//! | endpoint | shape |
//! | --- | --- |
//! | `POST /v1/chat/completions` | OpenAI `chat.completion`, or `chat.completion.chunk` events, a usage chunk when `stream_options.include_usage`, then `data: [DONE]` |
//! | `GET /v1/models` | OpenAI model list of [`FakeConfig::models`] |
//! | `POST /v1/messages` | Anthropic `message`, or `message_start` … `message_stop` events |
//! | `POST /v1beta/models/{model}:generateContent` | Gemini `GenerateContentResponse` |
//! | `POST /v1beta/models/{model}:streamGenerateContent` | Gemini chunks as SSE with `?alt=sse`, else as one JSON array |
//!
//! # Choosing a behaviour
//!
//! Per request, first match wins: the header `x-fake-behaviour: <name>`; a behaviour set with
//! [`FakeProviderHandle::set_behaviour`] for the request's model; a model named
//! `fake-<name>` (`fake-429-retry-after-2`); otherwise success. A name that does not parse is
//! answered 400 with the list of known names. `fail-<name>-then-ok:N` counts requests per
//! `x-fake-key` header value, or per model without one.
//!
//! # Behaviours and the answer each endpoint gives
//!
//! | name | OpenAI | Anthropic | Gemini |
//! | --- | --- | --- | --- |
//! | `ok` (default), `echo` | 200 | 200 | 200 |
//! | `429`, `429-retry-after-S`, `429-retry-after-ms-MS` | 429 `rate_limit_exceeded`, `retry-after` / `retry-after-ms` | 429 `rate_limit_error`, same headers | 429 `RESOURCE_EXHAUSTED`, `QuotaFailure` `…PerMinute…`, `RetryInfo.retryDelay` `"Ss"` (no header) |
//! | `insufficient-quota` (`per-day`) | 429 `insufficient_quota` | 400 credit balance too low | 429 `RESOURCE_EXHAUSTED`, `…PerDay…` quota id |
//! | `request-too-large` | 429 `Request too large …` (type `tokens`) | 413 `request_too_large` | 400 `INVALID_ARGUMENT` payload size |
//! | `context-length-exceeded` | 400 `context_length_exceeded` | 400 `prompt is too long` | 400 `INVALID_ARGUMENT` token count |
//! | `overloaded` (`529`) | 503 | 529 `overloaded_error` | 503 `UNAVAILABLE` |
//! | `500`, `503`, `504` | that status, JSON body | same | same |
//! | `502` | 502, HTML page | same | same |
//! | `<error>-array` | the error body inside a JSON array (Gemini does this) | same | same |
//! | `stream-error` | deltas, then `data: {"error":…}`, no `[DONE]` | deltas, then `event: error` `overloaded_error` | deltas, then an `UNAVAILABLE` error element |
//! | `error-after-start` | the role chunk, then `data: {"error":…}` (no text) | `message_start` … `ping`, then `event: error` `overloaded_error` (no text) | an `UNAVAILABLE` error element; not streamed: like `overloaded` |
//! | `slow-headers-MS` | nothing for MS ms, then the answer | same | same |
//! | `slow-first-token-MS` | headers at once, first body byte after MS ms | same | same |
//! | `trickle-MS` | one event (or a quarter of a JSON body) every MS ms | same | same |
//! | `split-chunks` | body written in pieces cut inside JSON objects and multi-byte characters | same | same |
//! | `close-mid-stream` | head and half the deltas, then the connection closes unfinished | same | same |
//! | `prompt-blocked` (`blocked`) | 400 `invalid_request_error` (safety system) | 400 `invalid_request_error` | 200 with `promptFeedback.blockReason` `SAFETY` and no `candidates` (streamed: that one element) |
//! | `reset` | TCP reset after the request is read; no response | same | same |
//! | `fail-<name>-then-ok:N` | `<name>` for the first N requests of a key, then `ok` | same | same |
//!
//! # Rate limits
//!
//! Each model has its own requests-per-minute and tokens-per-minute buckets
//! ([`FakeConfig::rpm`], [`FakeConfig::tpm`]); a request costs its prompt plus completion
//! tokens, and the bucket is checked before the behaviour runs (a refused request does not
//! advance a `fail-…-then-ok` count). Past a limit the fake answers the provider's real 429
//! with a retry hint (`retry-after`, or Gemini's `RetryInfo`) and the real numbers in the
//! message; a single request larger than the token limit gets one without a hint (OpenAI:
//! "Request too large"). Every chat answer carries OpenAI's
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (Go durations like `6m0s`) or
//! Anthropic's `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (RFC 3339),
//! reporting these buckets — also on the scripted errors above, whose bodies quote
//! illustrative limits rather than the buckets'.

mod anthropic;
mod app;
mod behaviour;
mod bucket;
mod delivery;
mod dialect;
mod gemini;
mod openai;
mod server;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use behaviour::{
    Behaviour, BehaviourParseError, Failure, FailureKind, KNOWN_BEHAVIOURS, RetryAfter,
};

use state::Shared;

/// The request header that picks a behaviour; it wins over the model name.
pub const BEHAVIOUR_HEADER: &str = "x-fake-behaviour";

/// The request header whose value `fail-…-then-ok` counts requests by (default: the model).
pub const KEY_HEADER: &str = "x-fake-key";

/// How a fake provider answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeConfig {
    /// The text of every successful reply (except `echo`). The default has multi-byte
    /// characters so that `split-chunks` has some to cut.
    pub reply: String,
    /// Prompt tokens reported in `usage`; `None` estimates one per four characters.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens reported in `usage`; `None` estimates one per four characters.
    pub completion_tokens: Option<u64>,
    /// Requests per minute per model before the fake answers 429. The default (10 000) is
    /// generous but enforced: raise it for load runs.
    pub rpm: u64,
    /// Tokens per minute per model before the fake answers 429 (default 30 000 000).
    pub tpm: u64,
    /// The ids `GET /v1/models` lists.
    pub models: Vec<String>,
    /// Pause between the pieces of `split-chunks`, so that they reach the client apart.
    pub split_gap: Duration,
    /// How long a shutdown waits for answers in flight before cutting them off.
    pub shutdown_grace: Duration,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            reply: "Hello from the fake provider: café, naïve, 🦀.".to_owned(),
            prompt_tokens: None,
            completion_tokens: None,
            rpm: 10_000,
            tpm: 30_000_000,
            models: vec!["fake-ok".to_owned(), "fake-echo".to_owned()],
            split_gap: Duration::from_millis(5),
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

/// One request as the fake saw it arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// When the request had been read.
    pub at: Instant,
    /// The URL path (`/v1/chat/completions`).
    pub path: String,
    /// The model asked for, when the request named one the fake could read.
    pub model: Option<String>,
    /// The behaviour picked, before `fail-…-then-ok` is settled; `None` when the name did not
    /// parse or the endpoint has none (`GET /v1/models`, unknown routes).
    pub behaviour: Option<Behaviour>,
    /// The request body as it arrived (shared with the request, not copied), so that tests can
    /// see what a client really sent: unknown fields, the model, the messages.
    pub body: Bytes,
}

impl Arrival {
    fn new(
        at: Instant,
        path: String,
        model: Option<String>,
        behaviour: Option<Behaviour>,
        body: Bytes,
    ) -> Self {
        Self {
            at,
            path,
            model,
            behaviour,
            body,
        }
    }

    /// The body parsed as JSON, when it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Starts fake providers.
#[derive(Debug)]
pub struct FakeProvider;

impl FakeProvider {
    /// Starts a fake on `127.0.0.1` with a port the system picks.
    pub async fn start(config: FakeConfig) -> io::Result<FakeProviderHandle> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::serve(listener, config)
    }

    /// Starts a fake on an already-bound listener. Must be called inside a Tokio runtime.
    pub fn serve(listener: TcpListener, config: FakeConfig) -> io::Result<FakeProviderHandle> {
        let addr = listener.local_addr()?;
        let grace = config.shutdown_grace;
        let shared = Arc::new(Shared::new(config));
        let shutdown = CancellationToken::new();
        let app = app::router(shared.clone());
        let task = tokio::spawn(server::run(listener, app, shutdown.clone(), grace));
        Ok(FakeProviderHandle {
            addr,
            shared,
            shutdown,
            task: Some(task),
        })
    }
}

/// A running fake. Dropping it starts a graceful shutdown; [`shutdown`](Self::shutdown) also
/// waits for it.
#[derive(Debug)]
pub struct FakeProviderHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl FakeProviderHandle {
    /// The address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash. OpenAI clients want
    /// `{base_url}/v1`, Gemini clients `{base_url}/v1beta`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in order of arrival.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.arrivals()
    }

    /// How many responses went out per status code. A reset connection sent none and is not
    /// counted; a stream cut off mid-way counts as the 200 it started as.
    pub fn counts(&self) -> BTreeMap<u16, u64> {
        self.shared.counts()
    }

    /// Forgets arrivals, counts, `fail-…-then-ok` counters and behaviours set at run time, and
    /// refills every rate limit.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// From now on, requests for `model` get `behaviour` (unless their header says otherwise).
    pub fn set_behaviour(&self, model: impl Into<String>, behaviour: Behaviour) {
        self.shared.set_behaviour(model.into(), behaviour);
    }

    /// Undoes [`set_behaviour`](Self::set_behaviour) for `model`.
    pub fn clear_behaviour(&self, model: &str) {
        self.shared.clear_behaviour(model);
    }

    /// Stops accepting, lets answers in flight finish for up to
    /// [`FakeConfig::shutdown_grace`], and returns when the server has stopped.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(%error, "fake provider: server task failed");
        }
    }
}

impl Drop for FakeProviderHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
