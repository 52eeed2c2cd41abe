//! Google's Gemini API: `POST {base_url}/models/{model}:generateContent`, and
//! `:streamGenerateContent?alt=sse` for streams (base URL
//! `https://generativelanguage.googleapis.com/v1beta`). An OpenAI chat request is translated
//! (`contents` with roles `user` / `model`, `systemInstruction`, `generationConfig`), and the
//! answer translated back. Only text parts are carried.
//!
//! A prompt Gemini's safety filter blocks comes back as a 200 with `promptFeedback.blockReason`
//! and no `candidates` (streamed: a first element with only `promptFeedback`); it is read as
//! [`ErrorKind::ContentFilter`], the caller's to change, not as a failure of the provider.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use serde_json::{Map, Value, json};
use troupe_actors::provider::{ErrorClass, ErrorKind};

use super::sse::{Event, EventStep, Translate, store_usage};
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
    check_model_name(model)?;
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

/// A model name is a path segment of the URL that carries the API key, so it may only name a
/// model: letters, digits, `.`, `-` and `_`, and not `.` or `..`. Refusing only `/ ? # :` let
/// `..\..\x` through, and the URL parser reads `\` as `/` in an http(s) URL and resolves
/// `..`: the call went to another path of the host.
fn check_model_name(model: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if model.is_empty() || model == "." || model == ".." || !model.chars().all(allowed) {
        return Err(format!(
            "{model:?} is not a Gemini model name: use letters, digits, '.', '-' and '_' only \
             (e.g. gemini-2.5-flash)"
        ));
    }
    Ok(())
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

/// The failure a response (or a streamed element) stands for when Gemini blocked the prompt:
/// `promptFeedback.blockReason` set. The reason becomes the provider code, and the message
/// names it, the categories rated above `LOW`, and Gemini's `blockReasonMessage` if it sent one.
fn blocked(response: &Value) -> Option<ErrorClass> {
    let feedback = response.get("promptFeedback")?;
    let reason = feedback.get("blockReason").and_then(Value::as_str)?;
    let mut why = format!("blockReason {reason}");
    let flagged: Vec<String> = feedback
        .get("safetyRatings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|rating| {
            rating.get("blocked").and_then(Value::as_bool) == Some(true)
                || !matches!(
                    rating.get("probability").and_then(Value::as_str),
                    None | Some("NEGLIGIBLE" | "LOW" | "HARM_PROBABILITY_UNSPECIFIED")
                )
        })
        .map(|rating| {
            let field = |name| rating.get(name).and_then(Value::as_str).unwrap_or("?");
            format!("{} {}", field("category"), field("probability"))
        })
        .collect();
    if !flagged.is_empty() {
        why.push_str(&format!(", rated {}", flagged.join(", ")));
    }
    if let Some(detail) = feedback.get("blockReasonMessage").and_then(Value::as_str) {
        why.push_str(&format!(": {detail}"));
    }
    let message = format!(
        "the provider blocked the prompt ({why}); change the prompt: unchanged, it is refused again"
    );
    Some(ErrorClass {
        provider_code: Some(reason.chars().take(100).collect()),
        message: Some(message.chars().take(500).collect()),
        ..ErrorClass::of_kind(ErrorKind::ContentFilter)
    })
}

/// A `GenerateContentResponse` as a `chat.completion`; a blocked prompt is
/// [`ErrorKind::ContentFilter`], an answer without `candidates` otherwise a server error.
pub(super) fn completion(model: &str, body: &Value) -> Result<Value, ErrorClass> {
    if let Some(class) = blocked(body) {
        return Err(class);
    }
    if body.get("candidates").and_then(Value::as_array).is_none() {
        return Err(ErrorClass {
            message: Some("the Gemini answer has no `candidates`".into()),
            ..ErrorClass::of_kind(ErrorKind::ServerError)
        });
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

/// Each element as a chunk; an element with `error`, or with a `promptFeedback.blockReason`,
/// fails the stream; the stream may end once an element carried a finish reason.
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
        // An `"error": null` beside an answer is no error.
        if data.get("error").is_some_and(|error| !error.is_null()) {
            return Err(classify_stream_error(
                ProviderKind::Gemini,
                event.data.as_bytes(),
            ));
        }
        if let Some(class) = blocked(&data) {
            return Err(class);
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
                store_usage(&self.usage, prompt.saturating_add(completion));
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::StreamExt;

    use super::*;

    /// A prompt blocked by the safety filter, as `generateContent` answers it (HTTP 200).
    const BLOCKED_SAFETY: &str = r#"{
      "promptFeedback": {
        "blockReason": "SAFETY",
        "safetyRatings": [
          {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
          {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "LOW"},
          {"category": "HARM_CATEGORY_HARASSMENT", "probability": "MEDIUM", "blocked": true},
          {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"}
        ]
      },
      "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
      "modelVersion": "gemini-1.5-flash-002"
    }"#;

    /// Gemini 2.5's block without ratings, as the first (and only) element of a stream.
    const BLOCKED_OTHER: &str = r#"{"promptFeedback": {"blockReason": "OTHER"}, "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12}, "modelVersion": "gemini-2.5-pro", "responseId": "aBcD"}"#;

    fn event(data: &str) -> Event {
        Event {
            data: data.to_owned(),
            ..Event::default()
        }
    }

    fn translator() -> StreamTranslator {
        StreamTranslator::new("gemini-2.5-pro", Arc::new(AtomicU32::new(0)))
    }

    fn assert_blocked(class: &ErrorClass, reason: &str) {
        assert_eq!(class.kind, ErrorKind::ContentFilter, "{class:?}");
        assert!(!class.retryable && !class.fallback, "{class:?}");
        assert!(!class.kind.is_provider_fault());
        assert_eq!(class.provider_code.as_deref(), Some(reason));
        let message = class.message.as_deref().unwrap_or_default();
        assert!(
            message.contains("blocked the prompt") && message.contains(reason),
            "{message}"
        );
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filter_error_not_a_server_error() {
        let body: Value = serde_json::from_str(BLOCKED_SAFETY).unwrap();
        let class = completion("gemini-1.5-flash", &body).expect_err("blocked");
        assert_blocked(&class, "SAFETY");
        let message = class.message.unwrap();
        assert!(
            message.contains("HARM_CATEGORY_HARASSMENT MEDIUM") && !message.contains("HATE_SPEECH"),
            "only the categories that counted: {message}"
        );

        let body: Value = serde_json::from_str(BLOCKED_OTHER).unwrap();
        assert_blocked(&completion("gemini-2.5-pro", &body).unwrap_err(), "OTHER");
        let streamed = translator().event(&event(BLOCKED_OTHER));
        assert_blocked(&streamed.err().expect("the stream fails"), "OTHER");
    }

    #[test]
    fn a_model_name_that_is_not_one_is_refused_before_it_makes_a_url() {
        let base = "https://generativelanguage.googleapis.com/v1beta";
        let chat = ChatRequest::new(json!({"messages": [{"role": "user", "content": "hi"}]}));
        for model in [
            "..\\..\\x",
            "..",
            ".",
            "",
            "a\\b",
            "%2e%2e",
            "gemini pro",
            "models/gemini-2.5-pro",
            "gemini:generateContent",
            "é",
        ] {
            let error = request(base, model, &chat).expect_err(model);
            assert!(
                error.contains("is not a Gemini model name") && error.contains("letters, digits"),
                "{model:?}: {error}"
            );
        }
        for model in [
            "gemini-2.5-flash",
            "gemini-1.5-pro-002",
            "gemma-3_27b.it",
            "..x",
        ] {
            for stream in [false, true] {
                let chat = ChatRequest::new(json!({
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream,
                }));
                let (url, _) = request(base, model, &chat).expect(model);
                let url = reqwest::Url::parse(&url).expect("a URL");
                assert!(
                    url.path().starts_with(&format!("/v1beta/models/{model}:")),
                    "{model:?}: {url}"
                );
            }
        }
    }

    #[test]
    fn an_answer_without_candidates_or_a_block_is_still_a_server_error() {
        for body in [
            json!({"usageMetadata": {"promptTokenCount": 3}}),
            json!({"promptFeedback": {"safetyRatings": []}, "usageMetadata": {}}),
        ] {
            let class = completion("m", &body).expect_err("no candidates");
            assert_eq!(class.kind, ErrorKind::ServerError, "{body}");
            assert!(class.retryable && class.kind.is_provider_fault());
        }
    }

    #[tokio::test]
    async fn a_block_after_the_stream_began_ends_it_with_the_content_filter_error() {
        let text = r#"{"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}, "index": 0}], "responseId": "aBcD"}"#;
        let body = futures::stream::iter(
            [text, BLOCKED_OTHER].map(|data| Ok(Bytes::from(format!("data: {data}\r\n\r\n")))),
        );
        let translate = Box::new(translator());
        let mut events = super::super::sse::SseEvents::new(
            Box::pin(body),
            translate,
            std::time::Duration::from_secs(30),
        );
        let first: Value = serde_json::from_slice(&events.next().await.unwrap().unwrap()).unwrap();
        assert_eq!(first["choices"][0]["delta"]["content"], "Hi");
        let failure = events.next().await.unwrap().expect_err("the block ends it");
        assert_blocked(&failure, "OTHER");
        assert!(events.next().await.is_none());
    }
}
