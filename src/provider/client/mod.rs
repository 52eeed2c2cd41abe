//! The HTTP clients of the providers: one [`HttpProvider`] per `[[providers]]` entry, each with
//! its own pooled reqwest client, implementing the actor crate's
//! [`ProviderClient`] port.
//!
//! Callers speak OpenAI's chat-completions shape (the gateway's); a client sends it as its
//! provider's API wants it — OpenAI-compatible `/chat/completions` as is, Anthropic
//! `/messages` and Gemini `:generateContent` / `:streamGenerateContent` translated — and turns
//! the answer back into OpenAI's `chat.completion` or `chat.completion.chunk` shapes. Failures
//! go through [`classify`](super::classify). API keys are read once from the environment
//! variables the configuration names, sent as sensitive header values and never logged.
//!
//! A stream is handed over (and its call committed) at its first chunk that carries content:
//! the chunks before it that carry none (Anthropic's `message_start` as a role chunk, an empty
//! delta) are held back, a few at most, and sent in order with it. So a failure after them but
//! before any content is a failure before the first byte, retried or sent to a fallback like
//! any other.
//!
//! A provider may answer a stream request with a whole JSON answer (`Content-Type:
//! application/json`: a server that ignores `stream`, or an error in place of the stream). It is
//! read as a whole answer is, with the same cap: an error in it is classified as there, and a
//! completion goes on as the one chunk of a stream, so the caller gets the shape it asked for.
//!
//! Timeouts (`timeouts = { … }` of a provider): connecting (`connect_ms`), the first byte of
//! the answer (`first_byte_secs` or `_ms`, from sending the request to the headers and, for a
//! stream, to its first chunk with content), and the gap between two pieces of a body or
//! stream after that (`between_chunks_secs` or `_ms`). A connect timeout is a connection
//! failure (the request never reached the provider); the other two are
//! [`ErrorKind::Timeout`].

mod anthropic;
mod gemini;
mod openai;
mod sse;
#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::HeaderValue;
use serde_json::Value;
use troupe_actors::provider::{
    Answer, ErrorClass, ErrorKind, Failed, Progress, ProviderClient, RateLimitSnapshot,
};

use super::classify::{TransportFailure, classify_http, classify_transport};
use super::{ProviderKind, header_pairs};
use crate::config::ProviderConfig;
use sse::{MAX_HELD_CHUNKS, SseEvents, carries_content};

/// Largest non-streamed answer read from a provider.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Largest error body read for classification (the rest is ignored).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest single event of a stream.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;
/// Completion allowance assumed for the budget when a request sets no `max_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u32 = 1024;

/// The timeouts of one provider's client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// Establishing the connection.
    pub connect: Duration,
    /// From sending to the first byte (the headers; for a stream, its first event).
    pub first_byte: Duration,
    /// Between two pieces of a body or stream.
    pub between_chunks: Duration,
}

/// A chat request in OpenAI's shape, as the gateway received it (unknown fields included).
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The body; its `model` is replaced per provider.
    pub body: Value,
    /// `stream: true`.
    pub stream: bool,
}

impl ChatRequest {
    /// Wraps a body; `stream` is read from it.
    pub fn new(body: Value) -> Self {
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        Self { body, stream }
    }

    /// The budget's estimate: a quarter of the characters of the messages (a token is about
    /// four characters) plus `max_tokens` / `max_completion_tokens`, or
    /// [`DEFAULT_COMPLETION_ESTIMATE`].
    pub fn estimate_tokens(&self) -> u32 {
        let prompt_chars: usize = self
            .body
            .get("messages")
            .and_then(Value::as_array)
            .map(|messages| messages.iter().map(content_chars).sum())
            .unwrap_or(0);
        let completion = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|key| self.body.get(*key).and_then(Value::as_u64))
            .map_or(DEFAULT_COMPLETION_ESTIMATE, |n| {
                u32::try_from(n).unwrap_or(u32::MAX)
            });
        u32::try_from(prompt_chars / 4)
            .unwrap_or(u32::MAX)
            .saturating_add(completion)
    }
}

fn content_chars(message: &Value) -> usize {
    match message.get("content") {
        Some(Value::String(text)) => text.len(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    }
}

/// What a provider answered, in OpenAI's shapes.
pub enum ChatReply {
    /// A whole `chat.completion` object, as JSON text (an OpenAI-compatible provider's answer
    /// byte for byte).
    Complete(Bytes),
    /// A stream of `chat.completion.chunk` objects (as JSON text), its first one in hand.
    Stream(ChunkStream),
}

impl std::fmt::Debug for ChatReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Complete(body) => f
                .debug_tuple("Complete")
                .field(&String::from_utf8_lossy(body))
                .finish(),
            Self::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// A streamed answer: OpenAI `chat.completion.chunk` objects as JSON text, then the end. An
/// item `Err` is a failure after the stream began (the stream ends after it); the stream ending
/// without one is a complete answer.
pub struct ChunkStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, ErrorClass>> + Send>>,
    usage: Arc<std::sync::atomic::AtomicU32>,
}

impl ChunkStream {
    /// Total tokens the provider reported, once it did (0 before).
    pub fn tokens(&self) -> Option<u32> {
        match self.usage.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            tokens => Some(tokens),
        }
    }
}

impl Stream for ChunkStream {
    type Item = Result<Bytes, ErrorClass>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A provider client that could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The HTTP client could not be built.
    #[error("provider {provider:?}: cannot build its HTTP client: {reason}")]
    Build {
        /// The provider.
        provider: String,
        /// Why.
        reason: String,
    },
    /// The base URL does not make a valid endpoint URL (named without its credentials).
    #[error(
        "provider {provider:?}: base_url {base_url:?} does not make a valid URL ({reason}); \
         write it as http(s)://host[:port]/path, e.g. https://api.openai.com/v1"
    )]
    BadUrl {
        /// The provider.
        provider: String,
        /// The configured base URL.
        base_url: String,
        /// What the URL parser said.
        reason: String,
    },
}

/// Where a provider's calls go: URLs that do not depend on the model are parsed once.
enum Endpoint {
    /// `{base_url}/chat/completions`.
    OpenAi(reqwest::Url),
    /// `{base_url}/messages`.
    Anthropic(reqwest::Url),
    /// `{base_url}/models/{model}:…`, built per call.
    Gemini,
}

/// One provider's HTTP client.
pub struct HttpProvider {
    name: String,
    kind: ProviderKind,
    base_url: String,
    endpoint: Endpoint,
    http: reqwest::Client,
    /// The credential header, or why there is none.
    key: Result<Option<(http::HeaderName, HeaderValue)>, String>,
    timeouts: ClientTimeouts,
}

impl HttpProvider {
    /// The client of `config`, its key read from `config.api_key_env` now. A key variable that
    /// is not set is not an error here: every call then fails with a message naming it.
    pub fn new(config: &ProviderConfig) -> Result<Self, ClientError> {
        let timeouts = ClientTimeouts {
            connect: config.timeouts.connect(),
            first_byte: config.timeouts.first_byte(),
            between_chunks: config.timeouts.between_chunks(),
        };
        crate::tls::install_default_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // A provider's API answers where it is asked; a redirect of a POST is a wrong
            // base_url, reported as such (and not following saves each call the redirect
            // layer's bookkeeping).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| ClientError::Build {
                provider: config.name.clone(),
                reason: error.to_string(),
            })?;
        let key = match &config.api_key_env {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(value) if !value.trim().is_empty() => {
                    key_header(config.kind, value.trim()).map(Some)
                }
                _ => Err(format!(
                    "provider {:?}: the environment variable {var} (api_key_env) is not set; \
                     set it to the provider's API key",
                    config.name
                )),
            },
        };
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        let parse = |url: String| {
            reqwest::Url::parse(&url).map_err(|error| ClientError::BadUrl {
                provider: config.name.clone(),
                base_url: without_credentials(&config.base_url),
                reason: error.to_string(),
            })
        };
        let endpoint = match config.kind {
            ProviderKind::OpenAi => Endpoint::OpenAi(parse(format!("{base_url}{}", openai::PATH))?),
            ProviderKind::Anthropic => {
                Endpoint::Anthropic(parse(format!("{base_url}{}", anthropic::PATH))?)
            }
            // The model is part of the path: built per call, checked here once.
            ProviderKind::Gemini => {
                parse(format!("{base_url}/models/m:generateContent"))?;
                Endpoint::Gemini
            }
        };
        if let Err(problem) = &key {
            tracing::warn!(provider = %config.name, "{problem}");
        }
        Ok(Self {
            name: config.name.clone(),
            kind: config.kind,
            base_url,
            endpoint,
            http,
            key,
            timeouts,
        })
    }

    /// The provider's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn attempt(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<Answer<ChatReply>, Failed> {
        let key = self.key.as_ref().map_err(|problem| {
            Failed::before_sending(ErrorClass {
                message: Some(problem.clone()),
                ..ErrorClass::of_kind(ErrorKind::Auth)
            })
        })?;
        let encoded = |body: Value| {
            serde_json::to_vec(&body).map_err(|error| format!("cannot encode the request: {error}"))
        };
        let (url, body) = match &self.endpoint {
            Endpoint::OpenAi(url) => {
                openai::request(model, request).map(|body| (url.clone(), body))
            }
            Endpoint::Anthropic(url) => anthropic::request(model, request)
                .and_then(encoded)
                .map(|body| (url.clone(), body)),
            Endpoint::Gemini => {
                gemini::request(&self.base_url, model, request).and_then(|(url, body)| {
                    let url = reqwest::Url::parse(&url).map_err(|error| {
                        format!(
                            "the URL {:?} is not valid: {error}",
                            without_credentials(&url)
                        )
                    })?;
                    Ok((url, encoded(body)?))
                })
            }
        }
        .map_err(|message| {
            Failed::before_sending(ErrorClass {
                message: Some(message),
                status: Some(400),
                ..ErrorClass::of_kind(ErrorKind::BadRequest)
            })
        })?;
        let mut builder = self
            .http
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some((name, value)) = key {
            builder = builder.header(name.clone(), value.clone());
        }
        if self.kind == ProviderKind::Anthropic {
            builder = builder.header("anthropic-version", "2023-06-01");
        }
        let sent = tokio::time::Instant::now();
        // At most a day by configuration; an embedder's absurd setting waits a year, not panics.
        let deadline = sent
            .checked_add(self.timeouts.first_byte)
            .unwrap_or_else(|| sent + Duration::from_secs(365 * 24 * 3600));
        let response = match tokio::time::timeout_at(deadline, builder.body(body).send()).await {
            Err(_) => return Err(self.first_byte_timeout()),
            Ok(Err(error)) => return Err(self.reqwest_failure(error)),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let wall = SystemTime::now();
        let rate_limits = RateLimitSnapshot::from_headers(header_pairs(response.headers()), wall);
        if response.status().is_redirection() {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("nowhere")
                .chars()
                .take(200)
                .collect::<String>();
            return Err(Failed {
                class: ErrorClass {
                    message: Some(format!(
                        "the provider answered {status}, a redirect to {location}; calls are \
                         not redirected: set base_url to where it points"
                    )),
                    status: Some(status),
                    ..ErrorClass::of_kind(ErrorKind::Unexpected)
                },
                rate_limits,
                reached_provider: true,
            });
        }
        if !response.status().is_success() {
            let headers = response.headers().clone();
            let body = read_capped(response, MAX_ERROR_BODY, self.timeouts.between_chunks, true)
                .await
                .unwrap_or_default();
            let class = classify_http(self.kind, status, header_pairs(&headers), &body, wall);
            return Err(Failed {
                class,
                rate_limits,
                reached_provider: true,
            });
        }
        let failed = |class| Failed {
            class,
            rate_limits,
            reached_provider: true,
        };
        if request.stream && !is_json(response.headers()) {
            let usage = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let translator = sse::translator(self.kind, model, usage.clone());
            let mut events = SseEvents::new(
                Box::pin(response.bytes_stream()),
                translator,
                self.timeouts.between_chunks,
            )
            .fuse();
            // Wait for the first chunk with content, so that a failure before it can still be
            // retried.
            let held = match hold_back(&mut events, deadline).await {
                Ok(held) => held,
                Err(BeforeContent::Timeout) => return Err(self.first_byte_timeout()),
                Err(BeforeContent::Failed(class)) => return Err(failed(class)),
            };
            let inner = futures::stream::iter(held.into_iter().map(Ok)).chain(events);
            return Ok(Answer {
                reply: ChatReply::Stream(ChunkStream {
                    inner: Box::pin(inner),
                    usage,
                }),
                rate_limits,
                progress: Progress::Streaming,
            });
        }
        let body = read_capped(
            response,
            MAX_RESPONSE_BYTES,
            self.timeouts.between_chunks,
            false,
        )
        .await
        .map_err(failed)?;
        let (reply, tokens) = self.whole_answer(model, status, body).map_err(failed)?;
        if request.stream {
            // A whole answer to a stream request (an OpenAI-compatible server that ignores
            // `stream`): its error was classified as any whole answer's; a completion goes on as
            // the one chunk of a stream, so the caller gets the shape it asked for.
            let chunk = openai::completion_as_chunk(&reply).map_err(|message| {
                failed(ErrorClass {
                    message: Some(message),
                    ..ErrorClass::of_kind(ErrorKind::ServerError)
                })
            })?;
            let usage = Arc::new(std::sync::atomic::AtomicU32::new(tokens.unwrap_or(0)));
            return Ok(Answer {
                reply: ChatReply::Stream(ChunkStream {
                    inner: Box::pin(futures::stream::iter([Ok(chunk)])),
                    usage,
                }),
                rate_limits,
                progress: Progress::Streaming,
            });
        }
        Ok(Answer {
            reply: ChatReply::Complete(reply),
            rate_limits,
            progress: Progress::Complete { tokens },
        })
    }

    /// A whole answer as an OpenAI `chat.completion` (an OpenAI-compatible provider's as it
    /// came), and the tokens it reports; `Err` for a body that is not JSON, an error in place of
    /// a completion, or an Anthropic or Gemini answer that does not translate.
    fn whole_answer(
        &self,
        model: &str,
        status: u16,
        body: Vec<u8>,
    ) -> Result<(Bytes, Option<u32>), ErrorClass> {
        let not_json = |error: serde_json::Error| ErrorClass {
            message: Some(format!("the provider's answer is not JSON: {error}")),
            ..ErrorClass::of_kind(ErrorKind::ServerError)
        };
        match self.kind {
            // Passed through as it came.
            ProviderKind::OpenAi => {
                let tokens = openai::usage_of(&body).map_err(not_json)?;
                if let Some(class) = openai::failure_of(status, &body) {
                    return Err(class);
                }
                Ok((Bytes::from(body), tokens))
            }
            ProviderKind::Anthropic | ProviderKind::Gemini => {
                let parsed: Value = serde_json::from_slice(&body).map_err(not_json)?;
                let translated = if self.kind == ProviderKind::Anthropic {
                    anthropic::completion(model, &parsed).map_err(|message| ErrorClass {
                        message: Some(message),
                        ..ErrorClass::of_kind(ErrorKind::ServerError)
                    })
                } else {
                    // A blocked prompt is the caller's error; no `candidates` otherwise is the
                    // provider's.
                    gemini::completion(model, &parsed)
                }?;
                let tokens = translated
                    .pointer("/usage/total_tokens")
                    .and_then(Value::as_u64)
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
                Ok((Bytes::from(translated.to_string()), tokens))
            }
        }
    }
}

/// True when a response says its body is JSON (`application/json`, or a `+json` type), not an
/// event stream.
fn is_json(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let media_type = value.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case("application/json")
        || media_type.to_ascii_lowercase().ends_with("+json")
}

/// Why a stream failed before its first chunk with content.
#[derive(Debug)]
enum BeforeContent {
    /// The first-byte deadline passed.
    Timeout,
    /// An error event, a broken connection, or the end without any chunk.
    Failed(ErrorClass),
}

/// Reads `events` up to their first chunk that [carries content](carries_content), holding
/// back the chunks before it (at most [`MAX_HELD_CHUNKS`]; past them the stream counts as begun
/// anyway), and returns them all in order, that one last. The end of the stream after some
/// chunks also returns them (an answer without content). Each chunk is waited for until
/// `deadline`.
async fn hold_back<S>(
    events: &mut S,
    deadline: tokio::time::Instant,
) -> Result<Vec<Bytes>, BeforeContent>
where
    S: Stream<Item = Result<Bytes, ErrorClass>> + Unpin,
{
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return Err(BeforeContent::Timeout),
            Ok(None) if held.is_empty() => {
                return Err(BeforeContent::Failed(ErrorClass {
                    message: Some("the stream ended before any event".into()),
                    ..ErrorClass::of_kind(ErrorKind::Connection)
                }));
            }
            Ok(None) => return Ok(held),
            Ok(Some(Err(class))) => return Err(BeforeContent::Failed(class)),
            Ok(Some(Ok(chunk))) => {
                let begun = carries_content(&chunk);
                held.push(chunk);
                if begun || held.len() >= MAX_HELD_CHUNKS {
                    return Ok(held);
                }
            }
        }
    }
}

impl HttpProvider {
    fn first_byte_timeout(&self) -> Failed {
        let mut failed = transport(TransportFailure::Timeout, true);
        failed.class.message = Some(format!(
            "no answer within {} ms (timeouts.first_byte_secs / _ms)",
            self.timeouts.first_byte.as_millis()
        ));
        failed
    }

    /// The failure of a request that got no answer. reqwest's text of the error names the
    /// whole URL, credentials of a `base_url` such as `https://user:secret@proxy/v1` included,
    /// and the message goes to the caller, events and `/v1/providers`: it names only the host.
    fn reqwest_failure(&self, error: reqwest::Error) -> Failed {
        let host = error.url().map(host_of).unwrap_or_default();
        let error = error.without_url();
        if error.is_connect() {
            let mut failed = transport(TransportFailure::Connect, false);
            failed.class.message = Some(if error.is_timeout() {
                format!(
                    "could not connect to {host} within {} ms (timeouts.connect_ms)",
                    self.timeouts.connect.as_millis()
                )
            } else {
                format!("could not connect to {host}: {}", error_chain(&error))
            });
            failed
        } else if error.is_timeout() {
            transport(TransportFailure::Timeout, true)
        } else {
            let mut failed = transport(TransportFailure::Interrupted, true);
            failed.class.message = Some(format!("{} ({host})", error_chain(&error)));
            failed
        }
    }
}

/// `url` with the `user:password@` before its host, if any, written `***@`: for messages.
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// `host:port` of a URL, never its credentials or path.
fn host_of(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// An error and its sources in one line, at most 500 characters.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.chars().take(500).collect()
}

impl ProviderClient for HttpProvider {
    type Request = ChatRequest;
    type Reply = ChatReply;

    fn send<'a>(
        &'a self,
        model: &'a str,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<Answer<ChatReply>, Failed>> {
        Box::pin(self.attempt(model, request))
    }
}

fn key_header(kind: ProviderKind, key: &str) -> Result<(http::HeaderName, HeaderValue), String> {
    let (name, value) = match kind {
        ProviderKind::OpenAi => (http::header::AUTHORIZATION, format!("Bearer {key}")),
        ProviderKind::Anthropic => (http::HeaderName::from_static("x-api-key"), key.to_owned()),
        ProviderKind::Gemini => (
            http::HeaderName::from_static("x-goog-api-key"),
            key.to_owned(),
        ),
    };
    let mut value = HeaderValue::from_str(&value)
        .map_err(|_| "the API key holds characters a header cannot carry".to_owned())?;
    value.set_sensitive(true);
    Ok((name, value))
}

fn transport(failure: TransportFailure, reached_provider: bool) -> Failed {
    Failed {
        class: classify_transport(failure),
        rate_limits: RateLimitSnapshot::default(),
        reached_provider,
    }
}

/// Reads a body up to `cap` bytes, each piece within `gap`. With `truncate`, a longer body is
/// cut; without, it is a failure.
async fn read_capped(
    response: reqwest::Response,
    cap: usize,
    gap: Duration,
    truncate: bool,
) -> Result<Vec<u8>, ErrorClass> {
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(gap, stream.next()).await {
            Err(_) => {
                return Err(ErrorClass {
                    message: Some(format!(
                        "no data for {} ms (timeouts.between_chunks_secs / _ms)",
                        gap.as_millis()
                    )),
                    ..classify_transport(TransportFailure::Timeout)
                });
            }
            Ok(None) => return Ok(body),
            Ok(Some(Err(_))) => return Err(classify_transport(TransportFailure::Interrupted)),
            Ok(Some(Ok(piece))) => {
                if body.len() + piece.len() > cap {
                    if truncate {
                        body.extend_from_slice(&piece[..cap - body.len()]);
                        return Ok(body);
                    }
                    return Err(ErrorClass {
                        message: Some(format!("the answer is larger than {cap} bytes")),
                        ..ErrorClass::of_kind(ErrorKind::ServerError)
                    });
                }
                body.extend_from_slice(&piece);
            }
        }
    }
}

/// Seconds since the epoch, for `created`.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Text of an OpenAI message's `content`: a string, or the `text` of its parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// One OpenAI chunk carrying `delta` (and a finish reason / usage when given), as JSON text.
fn chunk(
    id: &str,
    model: &str,
    delta: Value,
    finish_reason: Option<&str>,
    usage: Option<Value>,
) -> Bytes {
    let mut chunk = serde_json::json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": unix_now(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    });
    if let Some(usage) = usage {
        chunk["usage"] = usage;
    }
    Bytes::from(chunk.to_string())
}

/// An OpenAI `chat.completion` with one choice.
fn completion(
    id: &str,
    model: &str,
    text: String,
    finish_reason: &str,
    usage: Option<(u64, u64)>,
) -> Value {
    let mut body = serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
        }],
    });
    if let Some((prompt, completion)) = usage {
        body["usage"] = usage_json(prompt, completion);
    }
    body
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    serde_json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
    })
}
