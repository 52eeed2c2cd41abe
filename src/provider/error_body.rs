//! Reading a provider's error body, whatever its shape, into one typed [`ErrorBody`].
//!
//! OpenAI (`{"error": {"message", "type", "code"}}`), Anthropic (`{"type": "error", "error":
//! {"type", "message"}}`) and Gemini (`{"error": {"code", "status", "message", "details"}}`,
//! sometimes wrapped in an array) nest under `error`; vLLM-style servers put the fields at the
//! top level with `"object": "error"`. The JSON is walked here once and never
//! leaves this module; a body that is not JSON, or not an error, reads as `None`. Nothing here
//! panics on what a provider sends.

use std::time::Duration;

use serde_json::Value;
use troupe_actors::provider::headers::parse_go_duration;

/// Bodies larger than this are not parsed: the status alone classifies them.
const MAX_PARSED_BODY: usize = 1 << 20;

/// Messages are kept to this many characters.
const MAX_MESSAGE_CHARS: usize = 500;

/// `type`, `code`, `status` and each `reason` are kept to this many characters: they name a
/// kind of error (the longest documented ones are about 30) and travel on to the provider code of
/// events, `/v1/providers` and the gateway's error details, so a provider cannot fill those.
const MAX_CODE_CHARS: usize = 100;

/// `google.rpc.ErrorInfo` reasons kept, at most (Gemini sends one).
const MAX_REASONS: usize = 8;

/// What an error body says. Every field is optional: providers and proxies omit what they like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    /// `error.type`: OpenAI's `insufficient_quota`, Anthropic's `overloaded_error`, …; cut to
    /// 100 characters, like `code`, `status` and each reason.
    pub(crate) error_type: Option<String>,
    /// `error.code` as text: OpenAI's `rate_limit_exceeded`, Gemini's numeric HTTP code.
    pub(crate) code: Option<String>,
    /// `error.status`: Gemini's `RESOURCE_EXHAUSTED`, `UNAVAILABLE`, ….
    pub(crate) status: Option<String>,
    /// `error.message` (or `error` itself when it is a string), cut to 500 characters.
    pub(crate) message: Option<String>,
    /// Gemini `google.rpc.RetryInfo.retryDelay`.
    pub(crate) retry_delay: Option<Duration>,
    /// Gemini `google.rpc.QuotaFailure`: the scope of the violated quotas.
    pub(crate) quota: QuotaScope,
    /// Gemini `google.rpc.ErrorInfo.reason`s, such as `API_KEY_INVALID` (the first 8).
    pub(crate) reasons: Vec<String>,
}

/// Which kinds of quota a Gemini `QuotaFailure` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QuotaScope {
    /// A per-minute (or per-second) quota: it comes back soon.
    pub(crate) short: bool,
    /// A per-day (or per-month) quota: waiting will not help today.
    pub(crate) long: bool,
}

impl ErrorBody {
    /// Parses a body; `None` when it is not a JSON error body.
    pub(crate) fn parse(body: &[u8]) -> Option<Self> {
        if body.len() > MAX_PARSED_BODY {
            return None;
        }
        let value: Value = serde_json::from_slice(body).ok()?;
        let root = match &value {
            Value::Array(items) => items.first()?,
            other => other,
        };
        match root.get("error") {
            Some(Value::String(message)) => Some(Self {
                message: Some(cut(message)),
                ..Self::default()
            }),
            Some(error @ Value::Object(_)) => Some(Self::from_error_object(error)),
            // vLLM and other compatible servers: `{"object": "error", "message", "type", "code"}`.
            None if root.get("object").and_then(Value::as_str) == Some("error") => {
                Some(Self::from_error_object(root))
            }
            _ => None,
        }
    }

    /// Parses the data of a server-sent `error` event. Takes either the data alone or the whole
    /// event text (`event: error` / `data: …` lines).
    pub(crate) fn parse_event(event: &[u8]) -> Option<Self> {
        Self::parse(event).or_else(|| Self::parse(sse_data(event)?.as_bytes()))
    }

    fn from_error_object(error: &Value) -> Self {
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(code_text);
        let code = match error.get("code") {
            Some(Value::String(code)) => Some(code_text(code)),
            Some(Value::Number(code)) => Some(code_text(&code.to_string())),
            _ => None,
        };
        let mut body = Self {
            error_type: text("type"),
            code,
            status: text("status"),
            message: error.get("message").and_then(Value::as_str).map(cut),
            ..Self::default()
        };
        let details = error.get("details").and_then(Value::as_array);
        for detail in details.into_iter().flatten() {
            body.read_detail(detail);
        }
        body
    }

    /// One entry of Gemini's `details`, by its `@type`.
    fn read_detail(&mut self, detail: &Value) {
        let kind = detail
            .get("@type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind.ends_with("google.rpc.RetryInfo") {
            let delay = detail.get("retryDelay").and_then(Value::as_str);
            if self.retry_delay.is_none() {
                self.retry_delay = delay.and_then(parse_go_duration);
            }
        } else if kind.ends_with("google.rpc.QuotaFailure") {
            let violations = detail.get("violations").and_then(Value::as_array);
            for violation in violations.into_iter().flatten() {
                for key in ["quotaId", "quotaMetric"] {
                    if let Some(name) = violation.get(key).and_then(Value::as_str) {
                        self.quota.note(name);
                    }
                }
            }
        } else if kind.ends_with("google.rpc.ErrorInfo")
            && let Some(reason) = detail.get("reason").and_then(Value::as_str)
            && self.reasons.len() < MAX_REASONS
        {
            self.reasons.push(code_text(reason));
        }
    }

    /// The message, lowercased, for matching; empty when there is none.
    pub(crate) fn message_lowercase(&self) -> String {
        self.message.as_deref().unwrap_or_default().to_lowercase()
    }
}

impl QuotaScope {
    fn note(&mut self, quota_name: &str) {
        let name = quota_name.to_ascii_lowercase();
        if name.contains("perday") || name.contains("per_day") || name.contains("permonth") {
            self.long = true;
        }
        if name.contains("perminute") || name.contains("per_minute") || name.contains("persecond") {
            self.short = true;
        }
    }
}

/// The delay a message text asks for: "Please try again in 210ms." (OpenAI), "Please retry in
/// 13.962123s." (Gemini).
pub(crate) fn delay_in_message(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    ["try again in ", "retry in "].iter().find_map(|marker| {
        let start = lower.find(marker)? + marker.len();
        // `to_ascii_lowercase` keeps byte offsets, so `start` is valid in `message` too.
        let rest = message.get(start..)?;
        let word = rest.split_whitespace().next()?;
        parse_go_duration(word.trim_end_matches(['.', ',', ';', ')']))
    })
}

/// The `data:` lines of one server-sent event, joined with newlines.
fn sse_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// A code, type, status or reason: its first [`MAX_CODE_CHARS`] characters, without a mark
/// (it is matched and shown as the provider wrote it, and a real one is never that long).
fn code_text(text: &str) -> String {
    text.chars().take(MAX_CODE_CHARS).collect()
}

fn cut(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &message[..end]),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_bodies() {
        let body = ErrorBody::parse(fixture!("openai_429_insufficient_quota.json")).expect("json");
        assert_eq!(body.error_type.as_deref(), Some("insufficient_quota"));
        assert_eq!(body.code.as_deref(), Some("insufficient_quota"));
        assert!(
            body.message_lowercase()
                .starts_with("you exceeded your current quota")
        );
        let body = ErrorBody::parse(fixture!("openai_500_server_error.json")).expect("json");
        assert_eq!(
            (body.error_type.as_deref(), body.code),
            (Some("server_error"), None)
        );
    }

    #[test]
    fn anthropic_bodies() {
        let body = ErrorBody::parse(fixture!("anthropic_529_overloaded.json")).expect("json");
        assert_eq!(body.error_type.as_deref(), Some("overloaded_error"));
        assert_eq!(body.message.as_deref(), Some("Overloaded"));
    }

    #[test]
    fn top_level_error_objects_of_compatible_servers() {
        let body = ErrorBody::parse(
            br#"{"object": "error", "message": "This model's maximum context length is 4096 tokens.", "type": "BadRequestError", "param": null, "code": 400}"#,
        )
        .expect("vllm shape");
        assert_eq!(body.error_type.as_deref(), Some("BadRequestError"));
        assert_eq!(body.code.as_deref(), Some("400"));
        assert_eq!(
            ErrorBody::parse(br#"{"object": "chat.completion", "message": "hi"}"#),
            None
        );
    }

    #[test]
    fn gemini_bodies_plain_and_array_wrapped() {
        let body = ErrorBody::parse(fixture!("gemini_429_per_minute.json")).expect("json");
        assert_eq!(body.status.as_deref(), Some("RESOURCE_EXHAUSTED"));
        assert_eq!(body.code.as_deref(), Some("429"));
        assert_eq!(body.retry_delay, Some(Duration::from_secs(13)));
        assert_eq!(
            body.quota,
            QuotaScope {
                short: true,
                long: false
            }
        );
        let body = ErrorBody::parse(fixture!("gemini_429_per_day.json")).expect("json");
        assert_eq!(
            body.quota,
            QuotaScope {
                short: false,
                long: true
            }
        );
        assert_eq!(body.retry_delay, Some(Duration::from_secs(43)));
        let body = ErrorBody::parse(fixture!("gemini_429_per_minute_array.json")).expect("json");
        assert_eq!(
            body.quota,
            QuotaScope {
                short: true,
                long: false
            }
        );
        assert_eq!(body.retry_delay, Some(Duration::from_millis(500)));
        let body = ErrorBody::parse(fixture!("gemini_400_api_key_invalid.json")).expect("json");
        assert_eq!(body.reasons, ["API_KEY_INVALID"]);
    }

    #[test]
    fn what_is_not_an_error_body_reads_as_none() {
        let cases: &[&[u8]] = &[
            b"",
            b"   ",
            b"not json",
            fixture!("proxy_502.html"),
            b"{}",
            b"[]",
            b"{\"error\": 42}",
            b"{\"error\": null}",
            b"{\"choices\": []}",
            b"\xff\xfe\x00",
            b"[{\"error\": {\"message\": \"unterminated",
        ];
        for body in cases {
            assert_eq!(
                ErrorBody::parse(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn odd_but_valid_shapes_are_read_as_far_as_they_go() {
        let body = ErrorBody::parse(br#"{"error": "model 'llama9' not found"}"#).expect("string");
        assert_eq!(body.message.as_deref(), Some("model 'llama9' not found"));
        let body = ErrorBody::parse(
            br#"{"error": {"message": {"nested": true}, "code": [1], "type": 7, "details": "x"}}"#,
        )
        .expect("object");
        assert_eq!(body, ErrorBody::default());
        let body = ErrorBody::parse(
            br#"{"error": {"details": [7, {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "soon"}, {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": 3}]}]}}"#,
        )
        .expect("object");
        assert_eq!(body, ErrorBody::default());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            ErrorBody::parse(deep.as_bytes()),
            None,
            "recursion is bounded"
        );
        let huge = vec![b' '; MAX_PARSED_BODY + 1];
        assert_eq!(ErrorBody::parse(&huge), None);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_MESSAGE_CHARS + 10);
        let body = format!(r#"{{"error": {{"message": "{message}"}}}}"#);
        let parsed = ErrorBody::parse(body.as_bytes()).expect("json");
        let kept = parsed.message.expect("message");
        assert_eq!(kept.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(kept.ends_with('…'));
    }

    #[test]
    fn codes_types_statuses_and_reasons_are_cut_on_a_character_boundary() {
        let long = "é".repeat(60_000);
        let reason = "é".repeat(1_000);
        let detail = format!(
            r#"{{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "{reason}"}}"#
        );
        let details = vec![detail; 50].join(",");
        let body = format!(
            r#"{{"error": {{"type": "{long}", "code": "{long}", "status": "{long}", "details": [{details}]}}}}"#
        );
        let parsed = ErrorBody::parse(body.as_bytes()).expect("json");
        for field in [&parsed.error_type, &parsed.code, &parsed.status] {
            let kept = field.as_deref().expect("kept");
            assert_eq!(kept, "é".repeat(MAX_CODE_CHARS));
        }
        assert_eq!(parsed.reasons.len(), MAX_REASONS);
        assert!(
            parsed
                .reasons
                .iter()
                .all(|reason| reason.chars().count() == MAX_CODE_CHARS)
        );
    }

    #[test]
    fn server_sent_error_events() {
        let body =
            ErrorBody::parse_event(fixture!("anthropic_stream_overloaded.sse")).expect("event");
        assert_eq!(body.error_type.as_deref(), Some("overloaded_error"));
        let data = br#"{"type": "error", "error": {"type": "api_error", "message": "x"}}"#;
        assert_eq!(
            ErrorBody::parse_event(data).and_then(|body| body.error_type),
            Some("api_error".to_owned())
        );
        let split = b"event: error\ndata: {\"error\":\ndata: {\"type\": \"overloaded_error\"}}\n\n";
        assert_eq!(
            ErrorBody::parse_event(split).and_then(|body| body.error_type),
            Some("overloaded_error".to_owned()),
            "multi-line data is joined"
        );
        assert_eq!(ErrorBody::parse_event(b"event: ping\n\n"), None);
        assert_eq!(ErrorBody::parse_event(b"data: [DONE]\n\n"), None);
    }

    #[test]
    fn delays_written_in_messages() {
        let cases: &[(&str, Option<Duration>)] = &[
            (
                "Please try again in 210ms. Visit …",
                Some(Duration::from_millis(210)),
            ),
            ("Please try again in 6s.", Some(Duration::from_secs(6))),
            (
                "Please try again in 1m30s, thanks",
                Some(Duration::from_secs(90)),
            ),
            (
                "Please retry in 13.962123s.",
                Some(Duration::from_nanos(13_962_123_000)),
            ),
            ("PLEASE TRY AGAIN IN 2s", Some(Duration::from_secs(2))),
            (
                "Ünïcode first. Please try again in 3s.",
                Some(Duration::from_secs(3)),
            ),
            ("Please try again later.", None),
            ("Please try again in", None),
            ("", None),
        ];
        for (message, expected) in cases {
            assert_eq!(delay_in_message(message), *expected, "{message:?}");
        }
    }
}
