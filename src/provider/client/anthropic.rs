//! Anthropic's Messages API: `POST {base_url}/messages` (base URL
//! `https://api.anthropic.com/v1`). An OpenAI chat request is translated (system messages to
//! `system`, `max_tokens` required, `stop` to `stop_sequences`), and the answer translated back
//! to `chat.completion` / `chat.completion.chunk`. Only text content is carried.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use serde_json::{Map, Value, json};
use troupe_actors::provider::ErrorClass;

use super::sse::{Event, EventStep, Translate, store_usage};
use super::{ChatRequest, chunk, completion as openai_completion, content_text, usage_json};
use crate::provider::ProviderKind;
use crate::provider::classify::classify_stream_error;

/// `max_tokens` when the request sets none (Anthropic requires one).
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The path of the endpoint under the provider's base URL.
pub(super) const PATH: &str = "/messages";

/// The body of a call.
pub(super) fn request(model: &str, request: &ChatRequest) -> Result<Value, String> {
    let body = &request.body;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("the request needs `messages`, an array")?;
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let text = content_text(message.get("content"));
        match role {
            "system" | "developer" => system.push(text),
            "user" | "assistant" => turns.push(json!({"role": role, "content": text})),
            other => {
                return Err(format!(
                    "messages with role {other:?} cannot be sent to an Anthropic provider \
                     (user, assistant and system are)"
                ));
            }
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(turns));
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| body.get(*key).and_then(Value::as_u64))
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    for key in ["temperature", "top_p"] {
        if let Some(value) = body.get(key) {
            out.insert(key.into(), value.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(stop)) => {
            out.insert("stop_sequences".into(), json!([stop]));
        }
        Some(Value::Array(stops)) => {
            out.insert("stop_sequences".into(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if request.stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        _ => "stop",
    }
}

/// A `message` as a `chat.completion`.
pub(super) fn completion(model: &str, body: &Value) -> Result<Value, String> {
    let content = body
        .get("content")
        .and_then(Value::as_array)
        .ok_or("the Anthropic answer has no `content`")?;
    let text = content
        .iter()
        .filter(|block| block.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|block| block.get("text").and_then(Value::as_str))
        .collect::<String>();
    let usage = body.get("usage").map(|usage| {
        (
            usage
                .get("input_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            usage
                .get("output_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        )
    });
    let id = body.get("id").and_then(Value::as_str).unwrap_or("msg");
    Ok(openai_completion(
        id,
        model,
        text,
        finish_reason(body.get("stop_reason").and_then(Value::as_str)),
        usage,
    ))
}

/// `message_start` … `message_stop` as chunks; `event: error` fails the stream.
pub(super) struct StreamTranslator {
    model: String,
    id: String,
    input_tokens: u64,
    usage: Arc<AtomicU32>,
}

impl StreamTranslator {
    pub(super) fn new(model: &str, usage: Arc<AtomicU32>) -> Self {
        Self {
            model: model.to_owned(),
            id: "msg".to_owned(),
            input_tokens: 0,
            usage,
        }
    }
}

impl Translate for StreamTranslator {
    fn event(&mut self, event: &Event) -> Result<EventStep, ErrorClass> {
        let data: Value = match serde_json::from_str(&event.data) {
            Ok(data) => data,
            Err(_) if event.event == "error" => {
                return Err(classify_stream_error(
                    ProviderKind::Anthropic,
                    event.data.as_bytes(),
                ));
            }
            Err(_) => return Ok(EventStep::Chunks(Vec::new())),
        };
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(event.event.as_str());
        let chunks = match kind {
            "error" => {
                return Err(classify_stream_error(
                    ProviderKind::Anthropic,
                    event.data.as_bytes(),
                ));
            }
            "message_start" => {
                if let Some(id) = data.pointer("/message/id").and_then(Value::as_str) {
                    self.id = id.to_owned();
                }
                self.input_tokens = data
                    .pointer("/message/usage/input_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                vec![chunk(
                    &self.id,
                    &self.model,
                    json!({"role": "assistant", "content": ""}),
                    None,
                    None,
                )]
            }
            "content_block_delta" => match data.pointer("/delta/text").and_then(Value::as_str) {
                Some(text) => vec![chunk(
                    &self.id,
                    &self.model,
                    json!({"content": text}),
                    None,
                    None,
                )],
                None => Vec::new(),
            },
            "message_delta" => {
                let output = data
                    .pointer("/usage/output_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                store_usage(&self.usage, self.input_tokens.saturating_add(output));
                let reason =
                    finish_reason(data.pointer("/delta/stop_reason").and_then(Value::as_str));
                vec![chunk(
                    &self.id,
                    &self.model,
                    json!({}),
                    Some(reason),
                    Some(usage_json(self.input_tokens, output)),
                )]
            }
            "message_stop" => return Ok(EventStep::Done),
            _ => Vec::new(),
        };
        Ok(EventStep::Chunks(chunks))
    }

    fn may_end(&self) -> bool {
        false
    }
}
