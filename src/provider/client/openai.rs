//! OpenAI and OpenAI-compatible servers: `POST {base_url}/chat/completions`. The request goes
//! as it came (only `model` replaced) and the answer comes back as it is, byte for byte: only
//! its `usage` is read, and whether it is an error in place of a completion.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use troupe_actors::provider::ErrorClass;

use super::ChatRequest;
use super::sse::{Event, EventStep, Translate, store_usage};
use crate::provider::ProviderKind;
use crate::provider::classify::classify_stream_error;

/// The path of the endpoint under the provider's base URL.
pub(super) const PATH: &str = "/chat/completions";

/// The body of a call: the caller's body as it came, with `model` replaced, written straight
/// from the caller's value (no copy of it is made).
pub(super) fn request(model: &str, request: &ChatRequest) -> Result<Vec<u8>, String> {
    let Some(object) = request.body.as_object() else {
        return Err("the request body must be a JSON object".into());
    };
    serde_json::to_vec(&WithModel { object, model })
        .map_err(|error| format!("cannot encode the request: {error}"))
}

/// A JSON object written with its `model` replaced (first, then the other fields in order).
struct WithModel<'a> {
    object: &'a serde_json::Map<String, Value>,
    model: &'a str,
}

impl Serialize for WithModel<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let others = self.object.iter().filter(|(key, _)| *key != "model");
        let mut map = serializer.serialize_map(Some(1 + others.clone().count()))?;
        map.serialize_entry("model", self.model)?;
        for (key, value) in others {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The total tokens a whole answer reports, read without building the answer as a value;
/// `Err` when the answer is not JSON.
pub(super) fn usage_of(body: &[u8]) -> Result<Option<u32>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        usage: Option<Value>,
    }
    match serde_json::from_slice::<Head>(body) {
        Ok(head) => Ok(head
            .usage
            .and_then(|usage| usage.get("total_tokens")?.as_u64())
            .map(|total| u32::try_from(total).unwrap_or(u32::MAX))),
        // JSON, but not an object with a readable `usage`: no figure.
        Err(_) => serde_json::from_slice::<IgnoredAny>(body).map(|_| None),
    }
}

/// The failure a whole answer reports in place of a completion: a top-level `error` (not
/// `null`) and no `choices`. OpenRouter and other proxies answer so, with a 200, when the model
/// fails after they sent their headers. Classified as an error event of a stream is (the
/// `status`, a success, says nothing: a server error unless the body's code says more); `None`
/// for a completion.
pub(super) fn failure_of(status: u16, body: &[u8]) -> Option<ErrorClass> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        error: Option<IgnoredAny>,
        #[serde(default)]
        choices: Option<IgnoredAny>,
    }
    // A key `"error"` cannot appear inside a JSON string (its quotes would be escaped), so most
    // answers are not parsed a second time.
    if !body.windows(7).any(|window| window == b"\"error\"") {
        return None;
    }
    let head = serde_json::from_slice::<Head>(body).ok()?;
    if head.error.is_none() || head.choices.is_some() {
        return None;
    }
    let mut class = classify_stream_error(ProviderKind::OpenAi, body);
    class.message = Some(format!(
        "the provider answered {status} with an error in place of a completion: {}",
        class.message.as_deref().unwrap_or("(no message)")
    ));
    Some(class)
}

/// A whole `chat.completion` as one `chat.completion.chunk`, for a caller that asked for a
/// stream of a provider that answered with a whole answer: each choice's `message` becomes its
/// `delta` (each tool call given the `index` a chunk's tool calls carry), and `id`, `created`,
/// `model`, `usage` and any other field stay. `Err` when the body is not a completion (an object
/// with a `choices` array).
pub(super) fn completion_as_chunk(body: &[u8]) -> Result<Bytes, String> {
    let not_one = || {
        "the provider answered a stream request with JSON that is neither a chat completion nor \
         an error"
            .to_owned()
    };
    let Ok(Value::Object(mut completion)) = serde_json::from_slice::<Value>(body) else {
        return Err(not_one());
    };
    let Some(Value::Array(choices)) = completion.remove("choices") else {
        return Err(not_one());
    };
    let choices = choices
        .into_iter()
        .map(|choice| {
            let Value::Object(mut choice) = choice else {
                return choice;
            };
            let mut delta = choice
                .remove("message")
                .unwrap_or_else(|| Value::Object(Default::default()));
            if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                for (index, call) in calls.iter_mut().enumerate() {
                    if let Value::Object(call) = call {
                        call.entry("index").or_insert(Value::from(index));
                    }
                }
            }
            choice.insert("delta".into(), delta);
            Value::Object(choice)
        })
        .collect();
    completion.insert("object".into(), Value::from("chat.completion.chunk"));
    completion.insert("choices".into(), Value::Array(choices));
    Ok(Bytes::from(Value::Object(completion).to_string()))
}

/// The chunk `data` on one line. An event sent over several `data:` lines arrives with its
/// lines joined by `\n`; in JSON a line break can only be whitespace between tokens (one inside
/// a string is escaped), so each becomes a space and the chunk means the same. Passed on as it
/// was, the lines after the first would reach the caller without their `data: ` prefix.
fn one_line(data: &str) -> Bytes {
    if data.contains('\n') {
        Bytes::from(data.replace('\n', " "))
    } else {
        Bytes::copy_from_slice(data.as_bytes())
    }
}

/// Passes chunks through (on one line each); `[DONE]` ends the stream, a `{"error": …}` event
/// fails it (not an `"error": null`).
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
            if event.event == "error"
                || parsed
                    .as_ref()
                    .is_some_and(|v| v.get("error").is_some_and(|error| !error.is_null()))
            {
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
        Ok(EventStep::Chunks(vec![one_line(data)]))
    }

    fn may_end(&self) -> bool {
        false
    }
}
