//! The parts every provider shape shares: the typed request the fake reads, the completion it
//! writes, and the dispatch from a [`Dialect`] to the module that knows its wire format.

use std::time::SystemTime;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::behaviour::Failure;
use super::bucket::{LimitSnapshot, Refusal};
use super::{anthropic, gemini, openai};

/// Which provider's wire format an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
    /// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`.
    Gemini,
}

/// A chat request, read from any of the three shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChatRequest {
    pub(super) model: String,
    pub(super) stream: StreamFormat,
    /// OpenAI `stream_options.include_usage`: add a usage chunk before `[DONE]`.
    pub(super) include_usage: bool,
    /// Characters of text across all messages, for the prompt token estimate.
    pub(super) prompt_chars: usize,
    /// Text of the last user message, for `echo`.
    pub(super) last_user_text: Option<String>,
}

/// Whether and how the reply is streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamFormat {
    /// One JSON body.
    Off,
    /// Server-sent events.
    Sse,
    /// Gemini's `streamGenerateContent` without `alt=sse`: one JSON array, sent element by
    /// element.
    JsonArray,
}

/// The answer the fake gives, before it is put in a provider's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Completion {
    pub(super) id: String,
    pub(super) model: String,
    /// Unix seconds.
    pub(super) created: u64,
    pub(super) text: String,
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
}

impl Completion {
    /// The text in the pieces a stream sends it in: one word (with its trailing space) each.
    /// An empty text is one empty piece, so every stream has at least one delta.
    pub(super) fn text_pieces(&self) -> Vec<&str> {
        if self.text.is_empty() {
            return vec![""];
        }
        self.text.split_inclusive(' ').collect()
    }
}

/// A streamed reply in three parts, so behaviours can cut it between deltas.
#[derive(Debug, Clone, Default)]
pub(super) struct Script {
    /// Events before the first text (OpenAI's role chunk, Anthropic's `message_start`).
    pub(super) head: Vec<Bytes>,
    /// One event per text piece.
    pub(super) deltas: Vec<Bytes>,
    /// Events after the text (finish reason, usage, `[DONE]`, `message_stop`).
    pub(super) tail: Vec<Bytes>,
}

/// An error response before it becomes an HTTP response.
#[derive(Debug, Clone)]
pub(super) struct ErrorReply {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: ErrorBody,
}

/// The body of an error response.
#[derive(Debug, Clone)]
pub(super) enum ErrorBody {
    Json(Value),
    Html(&'static str),
}

/// What a proxy in front of any provider answers when the provider is unreachable.
const BAD_GATEWAY_HTML: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n\
     <body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n\
     </body>\r\n</html>\r\n";

/// The 502 every provider shape shares: the HTML page of a proxy in front of it.
pub(super) fn bad_gateway() -> ErrorReply {
    ErrorReply {
        status: StatusCode::BAD_GATEWAY,
        headers: HeaderMap::new(),
        body: ErrorBody::Html(BAD_GATEWAY_HTML),
    }
}

impl ErrorReply {
    pub(super) fn json(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: ErrorBody::Json(body),
        }
    }

    pub(super) fn with_header(mut self, name: &'static str, value: String) -> Self {
        insert_header(&mut self.headers, name, value);
        self
    }
}

impl IntoResponse for ErrorReply {
    fn into_response(self) -> Response {
        let (content_type, body) = match self.body {
            ErrorBody::Json(value) => ("application/json", Bytes::from(value.to_string())),
            ErrorBody::Html(html) => ("text/html", Bytes::from_static(html.as_bytes())),
        };
        let mut response = (self.status, self.headers, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }
}

impl Dialect {
    /// The whole non-streaming response body.
    pub(super) fn completion_body(self, completion: &Completion) -> Bytes {
        let value = match self {
            Self::OpenAi => openai::completion(completion),
            Self::Anthropic => anthropic::completion(completion),
            Self::Gemini => gemini::completion(completion),
        };
        Bytes::from(value.to_string())
    }

    /// The streamed response, event by event.
    pub(super) fn script(self, completion: &Completion, request: &ChatRequest) -> Script {
        match self {
            Self::OpenAi => openai::script(completion, request.include_usage),
            Self::Anthropic => anthropic::script(completion),
            Self::Gemini => gemini::script(completion, request.stream),
        }
    }

    /// The event that reports an error in the middle of a stream, ending it; `first` when
    /// nothing was sent before it.
    pub(super) fn stream_error(self, request: &ChatRequest, first: bool) -> Bytes {
        match self {
            Self::OpenAi => openai::stream_error(),
            Self::Anthropic => anthropic::stream_error(),
            Self::Gemini => gemini::stream_error(request.stream, first),
        }
    }

    /// The error response for a failure behaviour.
    pub(super) fn failure(self, failure: Failure, model: &str) -> ErrorReply {
        let mut reply = match self {
            Self::OpenAi => openai::failure(failure.kind, model),
            Self::Anthropic => anthropic::failure(failure.kind, model),
            Self::Gemini => gemini::failure(failure.kind, model),
        };
        if failure.array_wrapped
            && let ErrorBody::Json(value) = reply.body
        {
            reply.body = ErrorBody::Json(Value::Array(vec![value]));
        }
        reply
    }

    /// The answer to a prompt the provider's content filter refuses (`prompt-blocked`): Gemini's
    /// 200 without candidates, the others' 400.
    pub(super) fn prompt_blocked(self, completion: &Completion, request: &ChatRequest) -> Response {
        match self {
            Self::Gemini => {
                let body = gemini::prompt_blocked(completion, request.stream);
                let content_type = HeaderValue::from_static(request.stream.content_type());
                ([(header::CONTENT_TYPE, content_type)], body).into_response()
            }
            Self::OpenAi | Self::Anthropic => self
                .bad_request(
                    "Your request was rejected as a result of our safety system. Your prompt may \
                     contain text that is not allowed by our safety system.",
                    "messages",
                )
                .into_response(),
        }
    }

    /// The 429 the fake's own limits answer with.
    pub(super) fn refusal(
        self,
        refusal: Refusal,
        limits: &LimitSnapshot,
        model: &str,
    ) -> ErrorReply {
        match self {
            Self::OpenAi => openai::refusal(refusal, limits, model),
            Self::Anthropic => anthropic::refusal(refusal, limits, model),
            Self::Gemini => gemini::refusal(refusal, limits, model),
        }
    }

    /// A 400 for a request the fake cannot read; `param` names the offending part.
    pub(super) fn bad_request(self, message: &str, param: &str) -> ErrorReply {
        match self {
            Self::OpenAi => openai::bad_request(message, param),
            Self::Anthropic => anthropic::bad_request(message),
            Self::Gemini => gemini::bad_request(message),
        }
    }

    /// The rate-limit headers this provider sends on every answer (none for Gemini).
    pub(super) fn limit_headers(self, limits: &LimitSnapshot, now: SystemTime) -> HeaderMap {
        match self {
            Self::OpenAi => openai::limit_headers(limits),
            Self::Anthropic => anthropic::limit_headers(limits, now),
            Self::Gemini => HeaderMap::new(),
        }
    }
}

impl StreamFormat {
    /// The media type of the reply.
    pub(super) fn content_type(self) -> &'static str {
        match self {
            Self::Sse => "text/event-stream",
            Self::Off | Self::JsonArray => "application/json",
        }
    }
}

/// A message's content: a string, or parts of which the text ones count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message (OpenAI content part, Anthropic content block, Gemini part).
#[derive(Debug, Clone, Deserialize)]
pub(super) struct ContentPart {
    #[serde(default)]
    pub(super) text: Option<String>,
}

impl MessageContent {
    /// The text parts joined.
    pub(super) fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .collect(),
        }
    }
}

impl ChatRequest {
    /// Builds the request from `(role, text)` pairs; `user_role` is the role of the user's
    /// messages in this shape.
    pub(super) fn from_messages<'a>(
        model: String,
        stream: StreamFormat,
        include_usage: bool,
        messages: impl IntoIterator<Item = (&'a str, String)>,
        user_role: &str,
    ) -> Self {
        let mut prompt_chars = 0;
        let mut last_user_text = None;
        for (role, text) in messages {
            prompt_chars += text.chars().count();
            if role == user_role {
                last_user_text = Some(text);
            }
        }
        Self {
            model,
            stream,
            include_usage,
            prompt_chars,
            last_user_text,
        }
    }
}

/// A rough token count for `chars` characters of English: one token per four, at least one.
pub(super) fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4).max(1)
}

/// One server-sent event with a `data:` line only.
pub(super) fn data_event(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Sets a header from a string, skipping values that are not valid header text.
pub(super) fn insert_header(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}
