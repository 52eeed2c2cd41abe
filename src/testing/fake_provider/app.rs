//! The HTTP surface: routes, and the one pipeline every chat request goes through — record the
//! arrival, read the request, pick the behaviour, apply the rate limits, answer.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};

use super::behaviour::{Behaviour, BehaviourParseError, Failure, FailureKind};
use super::delivery::{Delivery, Ending, split_awkwardly, split_evenly};
use super::dialect::{ChatRequest, Completion, Dialect, Script, StreamFormat, estimate_tokens};
use super::server::ConnectionControl;
use super::state::Shared;
use super::{Arrival, BEHAVIOUR_HEADER, KEY_HEADER, anthropic, gemini, openai};

/// Pieces a non-streaming body is cut into by `trickle`.
const TRICKLE_PIECES: usize = 4;

/// Largest request body read, as Anthropic's limit (axum's default is 2 MB).
const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// The fake's routes.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/models", get(list_models))
        .route("/v1beta/models/{*model_and_method}", post(gemini_generate))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(middleware::map_response_with_state(
            shared.clone(),
            count_status,
        ))
        .with_state(shared)
}

/// What every chat handler hands to the pipeline.
struct Call {
    dialect: Dialect,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    connection: Option<ConnectionControl>,
}

impl Call {
    fn new(
        dialect: Dialect,
        uri: &Uri,
        headers: HeaderMap,
        body: Bytes,
        connection: Option<Extension<ConnectionControl>>,
    ) -> Self {
        let path = uri.path().to_owned();
        let connection = connection.map(|Extension(connection)| connection);
        Self {
            dialect,
            path,
            headers,
            body,
            connection,
        }
    }
}

async fn openai_chat(
    State(shared): State<Arc<Shared>>,
    connection: Option<Extension<ConnectionControl>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call::new(Dialect::OpenAi, &uri, headers, body, connection);
    let request = openai::parse(&call.body);
    chat(&shared, call, None, request).await
}

async fn anthropic_messages(
    State(shared): State<Arc<Shared>>,
    connection: Option<Extension<ConnectionControl>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call::new(Dialect::Anthropic, &uri, headers, body, connection);
    let request = anthropic::parse(&call.body);
    chat(&shared, call, None, request).await
}

/// `POST /v1beta/models/{model}:{method}`: the colon sits inside the last path segment, so the
/// route captures the rest of the path and splits it here.
async fn gemini_generate(
    State(shared): State<Arc<Shared>>,
    connection: Option<Extension<ConnectionControl>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call::new(Dialect::Gemini, &uri, headers, body, connection);
    let rest = call
        .path
        .strip_prefix("/v1beta/models/")
        .unwrap_or_default();
    let alt_sse = uri
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair == "alt=sse"));
    let streamed = if alt_sse {
        StreamFormat::Sse
    } else {
        StreamFormat::JsonArray
    };
    let (model, stream) = match rest.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => (model, StreamFormat::Off),
        Some((model, "streamGenerateContent")) if !model.is_empty() => (model, streamed),
        _ => {
            record_bare(&shared, &call.path, call.body.clone());
            return gemini::not_found(&format!("models/{rest}")).into_response();
        }
    };
    let model = model.to_owned();
    let request = gemini::parse(&call.body, &model, stream);
    chat(&shared, call, Some(model), request).await
}

async fn list_models(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    record_bare(&shared, uri.path(), Bytes::new());
    Json(openai::models(&shared.config.models, unix_seconds())).into_response()
}

async fn unknown_route(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let path = uri.path();
    record_bare(&shared, path, body);
    let mut reply = openai::bad_request(
        &format!(
            "Unknown request URL: {method} {path}. The fake provider serves POST \
             /v1/chat/completions, GET /v1/models, POST /v1/messages and POST \
             /v1beta/models/{{model}}:generateContent|streamGenerateContent."
        ),
        "",
    );
    reply.status = StatusCode::NOT_FOUND;
    reply.into_response()
}

/// Records a request that names no model and picks no behaviour.
fn record_bare(shared: &Shared, path: &str, body: Bytes) {
    shared.record_arrival(Arrival::new(
        Instant::now(),
        path.to_owned(),
        None,
        None,
        body,
    ));
}

async fn count_status(State(shared): State<Arc<Shared>>, response: Response) -> Response {
    shared.count_status(response.status().as_u16());
    response
}

/// The pipeline. `path_model` is the model a Gemini path names, known even when the body is
/// unreadable.
async fn chat(
    shared: &Shared,
    call: Call,
    path_model: Option<String>,
    request: Result<ChatRequest, String>,
) -> Response {
    let arrived = Instant::now();
    let model = request
        .as_ref()
        .ok()
        .map(|r| r.model.clone())
        .or(path_model);
    let behaviour = resolve(shared, &call.headers, model.as_deref());
    shared.record_arrival(Arrival::new(
        arrived,
        call.path.clone(),
        model,
        behaviour.as_ref().ok().cloned(),
        call.body.clone(),
    ));
    let dialect = call.dialect;
    let request = match request {
        Ok(request) => request,
        Err(message) => return dialect.bad_request(&message, "").into_response(),
    };
    let behaviour = match behaviour {
        Ok(behaviour) => behaviour,
        Err((error, param)) => {
            return dialect
                .bad_request(&error.to_string(), param)
                .into_response();
        }
    };

    let completion = completion(shared, &request, matches!(behaviour, Behaviour::Echo));
    let tokens = completion.prompt_tokens + completion.completion_tokens;
    let limits = match shared.admit(&request.model, tokens, Instant::now()) {
        Ok(limits) => limits,
        Err((refusal, limits)) => {
            let mut response = dialect
                .refusal(refusal, &limits, &request.model)
                .into_response();
            response
                .headers_mut()
                .extend(dialect.limit_headers(&limits, SystemTime::now()));
            return response;
        }
    };
    let key = call
        .headers
        .get(KEY_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or(&request.model)
        .to_owned();
    let behaviour = shared.settle(behaviour, &key);
    let mut response = answer(
        shared,
        dialect,
        &request,
        &completion,
        behaviour,
        call.connection,
    )
    .await;
    response
        .headers_mut()
        .extend(dialect.limit_headers(&limits, SystemTime::now()));
    response
}

/// Picks the behaviour: the `x-fake-behaviour` header, else one set at run time for the model,
/// else the one a `fake-<behaviour>` model name names, else success. On error, also says which
/// part of the request was wrong.
fn resolve(
    shared: &Shared,
    headers: &HeaderMap,
    model: Option<&str>,
) -> Result<Behaviour, (BehaviourParseError, &'static str)> {
    if let Some(value) = headers.get(BEHAVIOUR_HEADER) {
        let name = value.to_str().unwrap_or("<not text>");
        return name.parse().map_err(|error| (error, BEHAVIOUR_HEADER));
    }
    let Some(model) = model else {
        return Ok(Behaviour::Success);
    };
    if let Some(behaviour) = shared.override_for(model) {
        return Ok(behaviour);
    }
    match model.strip_prefix("fake-") {
        Some(name) => name.parse().map_err(|error| (error, "model")),
        None => Ok(Behaviour::Success),
    }
}

fn completion(shared: &Shared, request: &ChatRequest, echo: bool) -> Completion {
    let config = &shared.config;
    let text = match (echo, &request.last_user_text) {
        (true, Some(text)) => text.clone(),
        (true, None) => String::new(),
        (false, _) => config.reply.clone(),
    };
    Completion {
        id: shared.next_id(),
        model: request.model.clone(),
        created: unix_seconds(),
        prompt_tokens: config
            .prompt_tokens
            .unwrap_or_else(|| estimate_tokens(request.prompt_chars)),
        completion_tokens: config
            .completion_tokens
            .unwrap_or_else(|| estimate_tokens(text.chars().count())),
        text,
    }
}

/// Answers with a settled behaviour (no `FailThenOk` left in it).
async fn answer(
    shared: &Shared,
    dialect: Dialect,
    request: &ChatRequest,
    completion: &Completion,
    behaviour: Behaviour,
    connection: Option<ConnectionControl>,
) -> Response {
    let streaming = request.stream != StreamFormat::Off;
    match behaviour {
        Behaviour::Fail(failure) => {
            return dialect.failure(failure, &request.model).into_response();
        }
        Behaviour::StreamError | Behaviour::ErrorAfterStart if !streaming => {
            let overloaded = Failure {
                kind: FailureKind::Overloaded,
                array_wrapped: false,
            };
            return dialect.failure(overloaded, &request.model).into_response();
        }
        Behaviour::ResetBeforeHeaders => return reset(dialect, connection).await,
        Behaviour::PromptBlocked => return dialect.prompt_blocked(completion, request),
        Behaviour::SlowHeaders(wait) => tokio::time::sleep(wait).await,
        _ => {}
    }
    let body = if streaming {
        Body::Streamed(dialect.script(completion, request))
    } else {
        Body::Whole(dialect.completion_body(completion))
    };
    let delivery = match behaviour {
        Behaviour::SlowFirstToken(wait) => Delivery {
            first_delay: wait,
            ..body.immediate()
        },
        Behaviour::Trickle(gap) => Delivery {
            gap,
            ..body.trickled()
        },
        Behaviour::SplitChunks => Delivery {
            pieces: body.all().iter().flat_map(split_awkwardly).collect(),
            gap: shared.config.split_gap,
            ..body.immediate()
        },
        Behaviour::CloseMidStream => Delivery {
            pieces: body.first_half(),
            ending: Ending::Abort,
            ..body.immediate()
        },
        Behaviour::StreamError => {
            let mut pieces = body.first_half();
            pieces.push(dialect.stream_error(request, pieces.is_empty()));
            Delivery::immediate(pieces)
        }
        Behaviour::ErrorAfterStart => {
            let mut pieces = body.head();
            pieces.push(dialect.stream_error(request, pieces.is_empty()));
            Delivery::immediate(pieces)
        }
        // `FailThenOk` was settled before; the rest answer normally.
        Behaviour::Success
        | Behaviour::Echo
        | Behaviour::SlowHeaders(_)
        | Behaviour::FailThenOk { .. }
        | Behaviour::Fail(_)
        | Behaviour::ResetBeforeHeaders
        | Behaviour::PromptBlocked => body.immediate(),
    };
    let mut response = Response::new(delivery.into_body());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(request.stream.content_type()),
    );
    if request.stream == StreamFormat::Sse {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    response
}

/// Drops the connection without a response. Needs the fake's own server (the request carries
/// its [`ConnectionControl`]); elsewhere it answers 500 saying so.
async fn reset(dialect: Dialect, connection: Option<ConnectionControl>) -> Response {
    let Some(connection) = connection else {
        let mut reply = dialect.bad_request(
            "the reset behaviour needs the connection, which only FakeProvider's own server \
             provides",
            "",
        );
        reply.status = StatusCode::INTERNAL_SERVER_ERROR;
        return reply.into_response();
    };
    connection.reset();
    // The connection task drops this future together with the connection.
    std::future::pending().await
}

/// A success body before it is cut into pieces.
enum Body {
    Whole(Bytes),
    Streamed(Script),
}

impl Body {
    fn all(&self) -> Vec<Bytes> {
        match self {
            Self::Whole(bytes) => vec![bytes.clone()],
            Self::Streamed(script) => {
                [&script.head[..], &script.deltas[..], &script.tail[..]].concat()
            }
        }
    }

    fn immediate(&self) -> Delivery {
        Delivery::immediate(self.all())
    }

    /// A stream event by event; a whole body in a few even pieces.
    fn trickled(&self) -> Delivery {
        match self {
            Self::Whole(bytes) => Delivery::immediate(split_evenly(bytes, TRICKLE_PIECES)),
            Self::Streamed(_) => self.immediate(),
        }
    }

    /// What a stream sends before its first text (nothing for a whole body).
    fn head(&self) -> Vec<Bytes> {
        match self {
            Self::Whole(_) => Vec::new(),
            Self::Streamed(script) => script.head.clone(),
        }
    }

    /// The head and the first half of the deltas (at least one), or the first half of a
    /// whole body: never the end.
    fn first_half(&self) -> Vec<Bytes> {
        match self {
            Self::Whole(bytes) => vec![bytes.slice(..bytes.len() / 2)],
            Self::Streamed(script) => {
                let half = script
                    .deltas
                    .len()
                    .div_ceil(2)
                    .max(1)
                    .min(script.deltas.len());
                [&script.head[..], &script.deltas[..half]].concat()
            }
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
