//! OpenAI and OpenAI-compatible servers: `POST {base_url}/chat/completions`. The request goes
//! as it came (only `model` replaced) and the answer comes back as it is.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use bytes::Bytes;
use eventsource_stream::Event;
use serde_json::Value;
use troupe_actors::provider::ErrorClass;

use super::ChatRequest;
use super::sse::{EventStep, Translate, store_usage};
use crate::provider::ProviderKind;
use crate::provider::classify::classify_stream_error;

/// The URL and body of a call.
pub(super) fn request(
    base_url: &str,
    model: &str,
    request: &ChatRequest,
) -> Result<(String, Value), String> {
    let mut body = request.body.clone();
    let Some(object) = body.as_object_mut() else {
        return Err("the request body must be a JSON object".into());
    };
    object.insert("model".into(), Value::String(model.to_owned()));
    Ok((format!("{base_url}/chat/completions"), body))
}

/// Passes chunks through; `[DONE]` ends the stream, a `{"error": …}` event fails it.
pub(super) struct StreamTranslator {
    usage: Arc<AtomicU32>,
}

impl StreamTranslator {
    pub(super) fn new(usage: Arc<AtomicU32>) -> Self {
        Self { usage }
    }
}

impl Translate for StreamTranslator {
    fn event(&mut self, event: &Event) -> Result<EventStep, ErrorClass> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(EventStep::Done);
        }
        if data.is_empty() {
            return Ok(EventStep::Chunks(Vec::new()));
        }
        // A key `"error":` or `"usage":` cannot appear inside a JSON string (its quotes would
        // be escaped), so the cheap test only parses the chunks that need it.
        if event.event == "error" || data.contains("\"error\":") {
            let parsed: Option<Value> = serde_json::from_str(data).ok();
            if event.event == "error" || parsed.as_ref().is_some_and(|v| v.get("error").is_some()) {
                return Err(classify_stream_error(ProviderKind::OpenAi, data.as_bytes()));
            }
        }
        if data.contains("\"usage\":")
            && let Ok(parsed) = serde_json::from_str::<Value>(data)
            && let Some(total) = parsed
                .pointer("/usage/total_tokens")
                .and_then(Value::as_u64)
        {
            store_usage(&self.usage, total);
        }
        Ok(EventStep::Chunks(vec![Bytes::copy_from_slice(
            data.as_bytes(),
        )]))
    }

    fn may_end(&self) -> bool {
        false
    }
}
