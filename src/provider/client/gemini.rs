//! Google's Gemini API: `POST {base_url}/models/{model}:generateContent`, and
//! `:streamGenerateContent?alt=sse` for streams (base URL
//! `https://generativelanguage.googleapis.com/v1beta`). An OpenAI chat request is translated
//! (`contents` with roles `user` / `model`, `systemInstruction`, `generationConfig`), and the
//! answer translated back. Only text parts are carried.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use eventsource_stream::Event;
use serde_json::{Map, Value, json};
use troupe_actors::provider::ErrorClass;

use super::sse::{EventStep, Translate, store_usage};
use super::{ChatRequest, chunk, completion as openai_completion, content_text, usage_json};
use crate::provider::ProviderKind;
use crate::provider::classify::classify_stream_error;

/// The URL and body of a call.
pub(super) fn request(
    base_url: &str,
    model: &str,
    request: &ChatRequest,
) -> Result<(String, Value), String> {
    let body = &request.body;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("the request needs `messages`, an array")?;
    if model.contains(['/', '?', '#', ':']) {
        return Err(format!("{model:?} is not a Gemini model name"));
    }
    let mut system = Vec::new();
    let mut contents = Vec::new();
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let text = content_text(message.get("content"));
        match role {
            "system" | "developer" => system.push(json!({"text": text})),
            "user" => contents.push(json!({"role": "user", "parts": [{"text": text}]})),
            "assistant" => contents.push(json!({"role": "model", "parts": [{"text": text}]})),
            other => {
                return Err(format!(
                    "messages with role {other:?} cannot be sent to a Gemini provider (user, \
                     assistant and system are)"
                ));
            }
        }
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let mut config = Map::new();
    if let Some(max) = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| body.get(*key).and_then(Value::as_u64))
    {
        config.insert("maxOutputTokens".into(), json!(max));
    }
    for (from, to) in [("temperature", "temperature"), ("top_p", "topP")] {
        if let Some(value) = body.get(from) {
            config.insert(to.into(), value.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(stop)) => {
            config.insert("stopSequences".into(), json!([stop]));
        }
        Some(Value::Array(stops)) => {
            config.insert("stopSequences".into(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    let url = if request.stream {
        format!("{base_url}/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("{base_url}/models/{model}:generateContent")
    };
    Ok((url, Value::Object(out)))
}

fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "STOP" | "FINISH_REASON_UNSPECIFIED" => "stop",
        _ => "content_filter",
    }
}

fn text_of(response: &Value) -> String {
    response
        .pointer("/candidates/0/content/parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

fn usage_of(response: &Value) -> Option<(u64, u64)> {
    let usage = response.get("usageMetadata")?;
    Some((
        usage
            .get("promptTokenCount")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        usage
            .get("candidatesTokenCount")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    ))
}

/// A `GenerateContentResponse` as a `chat.completion`.
pub(super) fn completion(model: &str, body: &Value) -> Result<Value, String> {
    if body.get("candidates").and_then(Value::as_array).is_none() {
        return Err("the Gemini answer has no `candidates`".into());
    }
    let reason = body
        .pointer("/candidates/0/finishReason")
        .and_then(Value::as_str)
        .unwrap_or("STOP");
    let id = body
        .get("responseId")
        .and_then(Value::as_str)
        .unwrap_or("gemini");
    Ok(openai_completion(
        id,
        model,
        text_of(body),
        finish_reason(reason),
        usage_of(body),
    ))
}

/// Each element as a chunk; an element with `error` fails the stream; the stream may end once
/// an element carried a finish reason.
pub(super) struct StreamTranslator {
    model: String,
    first: bool,
    finished: bool,
    usage: Arc<AtomicU32>,
}

impl StreamTranslator {
    pub(super) fn new(model: &str, usage: Arc<AtomicU32>) -> Self {
        Self {
            model: model.to_owned(),
            first: true,
            finished: false,
            usage,
        }
    }
}

impl Translate for StreamTranslator {
    fn event(&mut self, event: &Event) -> Result<EventStep, ErrorClass> {
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            return Ok(EventStep::Chunks(Vec::new()));
        };
        if data.get("error").is_some() {
            return Err(classify_stream_error(
                ProviderKind::Gemini,
                event.data.as_bytes(),
            ));
        }
        let id = data
            .get("responseId")
            .and_then(Value::as_str)
            .unwrap_or("gemini")
            .to_owned();
        let mut delta = json!({"content": text_of(&data)});
        if std::mem::take(&mut self.first) {
            delta["role"] = json!("assistant");
        }
        let reason = data
            .pointer("/candidates/0/finishReason")
            .and_then(Value::as_str)
            .map(finish_reason);
        let usage = if reason.is_some() {
            self.finished = true;
            usage_of(&data).map(|(prompt, completion)| {
                store_usage(&self.usage, prompt + completion);
                usage_json(prompt, completion)
            })
        } else {
            None
        };
        Ok(EventStep::Chunks(vec![chunk(
            &id,
            &self.model,
            delta,
            reason,
            usage,
        )]))
    }

    fn may_end(&self) -> bool {
        self.finished
    }
}
