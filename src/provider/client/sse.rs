//! A provider's event stream as OpenAI chunks: its SSE events (read by
//! [`crate::sse`], each capped at [`MAX_EVENT_BYTES`]) with a timeout
//! between them, and a translator per provider kind that turns its events into
//! `chat.completion.chunk` JSON, recognises its end marker and classifies its error events.
//!
//! A stream begins with its first chunk that [carries content](carries_content): the chunks
//! before it (a role, an empty delta) say nothing yet, so the client holds them back and a
//! failure among them is still one before the first byte. Until it begins, the wait is the
//! first-byte deadline's; the gap between chunks counts from there.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;
use troupe_actors::provider::{ErrorClass, ErrorKind};

use super::MAX_EVENT_BYTES;
use super::{anthropic, gemini, openai};
use crate::provider::ProviderKind;
use crate::provider::classify::{TransportFailure, classify_transport};
pub(super) use crate::sse::Event;
use crate::sse::{SseParser, TooLong};

/// Chunks without content held back before a stream counts as begun, at most: past them it
/// begins anyway.
pub(super) const MAX_HELD_CHUNKS: usize = 8;

/// True when an OpenAI chunk carries something for its caller: text or any other delta field
/// (tool calls, a refusal, …) that is not empty, a finish reason, or usage. A chunk whose
/// choices carry at most a role and empty content does not, nor one with an empty `choices`
/// (Azure's `prompt_filter_results` chunk). Anything not shaped like a chunk counts as content.
pub(super) fn carries_content(chunk: &[u8]) -> bool {
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(chunk) else {
        return true;
    };
    if chunk.get("usage").is_some_and(|usage| !usage.is_null()) {
        return true;
    }
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return true;
    };
    let empty = |value: &Value| match value {
        Value::Null => true,
        Value::String(text) => text.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    };
    choices.iter().any(|choice| {
        let finished = choice.get("finish_reason").is_some_and(|r| !r.is_null());
        let delta = match choice.get("delta") {
            None | Some(Value::Null) => false,
            Some(Value::Object(delta)) => delta
                .iter()
                .any(|(key, value)| key != "role" && !empty(value)),
            Some(_) => true,
        };
        finished || delta
    })
}

/// What a translator made of one event.
pub(super) enum EventStep {
    /// Chunks to pass on (possibly none).
    Chunks(Vec<Bytes>),
    /// The provider's end marker: the answer is complete.
    Done,
}

/// Turns one provider's events into OpenAI chunks.
pub(super) trait Translate: Send {
    /// One event; an `Err` is an error event (the stream ends with it).
    fn event(&mut self, event: &Event) -> Result<EventStep, ErrorClass>;
    /// True when the stream may end here without an explicit end marker (Gemini's last
    /// element carries a finish reason and nothing follows).
    fn may_end(&self) -> bool;
}

/// The translator of `kind`, for `model`; reported token usage is stored in `usage`.
pub(super) fn translator(
    kind: ProviderKind,
    model: &str,
    usage: Arc<AtomicU32>,
) -> Box<dyn Translate> {
    match kind {
        ProviderKind::OpenAi => Box::new(openai::StreamTranslator::new(usage)),
        ProviderKind::Anthropic => Box::new(anthropic::StreamTranslator::new(model, usage)),
        ProviderKind::Gemini => Box::new(gemini::StreamTranslator::new(model, usage)),
    }
}

/// Stores a reported token total.
pub(super) fn store_usage(usage: &AtomicU32, total: u64) {
    usage.store(u32::try_from(total).unwrap_or(u32::MAX), Ordering::Relaxed);
}

/// A raw byte stream's failure.
#[derive(Debug)]
enum RawError {
    Transport,
    TooLong,
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport => f.write_str("the connection broke"),
            Self::TooLong => write!(
                f,
                "an event of the provider's stream is too long: more than {MAX_EVENT_BYTES} \
                 bytes (MAX_EVENT_BYTES) before the blank line that ends it"
            ),
        }
    }
}

type RawStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// A body read as SSE events: each piece goes to the parser, which gives every event it
/// completes before the next piece is read. Every event is capped at [`MAX_EVENT_BYTES`],
/// comment lines included (a provider ends them with a blank line like events).
struct EventReader {
    body: RawStream,
    parser: SseParser,
    body_ended: bool,
}

impl Stream for EventReader {
    type Item = Result<Event, RawError>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            match this.parser.next_event() {
                Ok(Some(event)) => return Poll::Ready(Some(Ok(event))),
                Err(TooLong) => return Poll::Ready(Some(Err(RawError::TooLong))),
                Ok(None) if this.body_ended => return Poll::Ready(None),
                Ok(None) => {}
            }
            match std::task::ready!(this.body.as_mut().poll_next(cx)) {
                Some(Ok(piece)) => this.parser.push(&piece),
                Some(Err(_)) => return Poll::Ready(Some(Err(RawError::Transport))),
                None => this.body_ended = true,
            }
        }
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, RawError>> + Send>>;

/// A provider's SSE body as a stream of OpenAI chunks (see [`ChunkStream`](super::ChunkStream)).
pub(super) struct SseEvents {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, ErrorClass>> + Send>>,
}

struct State {
    events: Events,
    translate: Box<dyn Translate>,
    pending: VecDeque<Bytes>,
    ended: bool,
    done: bool,
    gap: Duration,
    /// A chunk with content was passed on, or [`MAX_HELD_CHUNKS`] chunks were: the stream has
    /// begun and the gap between events counts.
    started: bool,
    /// Chunks passed on before it began.
    passed: usize,
}

impl SseEvents {
    pub(super) fn new(body: RawStream, translate: Box<dyn Translate>, gap: Duration) -> Self {
        let events = EventReader {
            body,
            parser: SseParser::new(MAX_EVENT_BYTES),
            body_ended: false,
        };
        let state = State {
            events: Box::pin(events),
            translate,
            pending: VecDeque::new(),
            ended: false,
            done: false,
            gap,
            started: false,
            passed: 0,
        };
        let inner = futures::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(chunk) = state.pending.pop_front() {
                    if !state.started {
                        state.passed += 1;
                        state.started = state.passed >= MAX_HELD_CHUNKS || carries_content(&chunk);
                    }
                    return Some((Ok(chunk), state));
                }
                if state.ended {
                    return None;
                }
                // Until the stream began (its first content), events are waited for under the
                // caller's first-byte deadline; from there the gap counts from one to the next.
                let next = if state.started {
                    tokio::time::timeout(state.gap, state.events.next()).await
                } else {
                    Ok(state.events.next().await)
                };
                let failure = match next {
                    Err(_) => ErrorClass {
                        message: Some(format!(
                            "no event for {} ms (timeouts.between_chunks_secs / _ms)",
                            state.gap.as_millis()
                        )),
                        ..classify_transport(TransportFailure::Timeout)
                    },
                    Ok(None) if state.done || state.translate.may_end() => {
                        state.ended = true;
                        continue;
                    }
                    Ok(None) => ErrorClass {
                        message: Some(
                            "the provider closed the stream before its end marker".into(),
                        ),
                        ..classify_transport(TransportFailure::Interrupted)
                    },
                    Ok(Some(Err(error))) => ErrorClass {
                        message: Some(error.to_string()),
                        ..ErrorClass::of_kind(ErrorKind::Connection)
                    },
                    Ok(Some(Ok(event))) => {
                        if state.done {
                            continue;
                        }
                        match state.translate.event(&event) {
                            Ok(EventStep::Chunks(chunks)) => {
                                state.pending.extend(chunks);
                                continue;
                            }
                            Ok(EventStep::Done) => {
                                state.done = true;
                                state.ended = true;
                                continue;
                            }
                            Err(class) => class,
                        }
                    }
                };
                state.ended = true;
                return Some((Err(failure), state));
            }
        });
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl Stream for SseEvents {
    type Item = Result<Bytes, ErrorClass>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body's pieces through the OpenAI translator: the chunks, then the failure if any.
    async fn read(pieces: Vec<Bytes>) -> (Vec<Bytes>, Option<ErrorClass>) {
        read_as(ProviderKind::OpenAi, pieces, Arc::new(AtomicU32::new(0))).await
    }

    /// The body's pieces through the translator of `kind`, its usage stored in `usage`.
    async fn read_as(
        kind: ProviderKind,
        pieces: Vec<Bytes>,
        usage: Arc<AtomicU32>,
    ) -> (Vec<Bytes>, Option<ErrorClass>) {
        let body: RawStream = Box::pin(futures::stream::iter(pieces.into_iter().map(Ok)));
        let translate = translator(kind, "m", usage);
        let mut events = SseEvents::new(body, translate, Duration::from_secs(30));
        let mut chunks = Vec::new();
        while let Some(item) = events.next().await {
            match item {
                Ok(chunk) => chunks.push(chunk),
                Err(class) => return (chunks, Some(class)),
            }
        }
        (chunks, None)
    }

    #[tokio::test]
    async fn an_event_sent_as_many_short_lines_is_capped_not_only_each_line() {
        // 5 MiB of `data: x` lines, none longer than 8 bytes, and no blank line among them.
        let lines = Bytes::from("data: x\n".repeat(1024));
        let mut pieces = vec![lines; 640];
        pieces.push(Bytes::from_static(b"\n"));
        pieces.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let (chunks, failure) = read(pieces).await;
        assert!(chunks.is_empty(), "{} chunks passed", chunks.len());
        let failure = failure.expect("the stream fails");
        let message = failure.message.unwrap_or_default();
        assert!(
            message.contains("too long") && message.contains(&MAX_EVENT_BYTES.to_string()),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_chunk_sent_over_several_data_lines_is_passed_on_as_one_line_of_the_same_json() {
        let pieces = vec![
            Bytes::from_static(
                b"data: {\"id\":\"a\",\ndata: \"choices\":[{\"index\":0,\r\ndata: \
                  \"delta\":{\"content\":\"hi\\nthere\"},\"finish_reason\":null}]}\n\n",
            ),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ];
        let (chunks, failure) = read(pieces).await;
        assert!(failure.is_none(), "{failure:?}");
        let [chunk] = chunks.as_slice() else {
            panic!("one chunk expected: {chunks:?}");
        };
        assert!(
            !chunk.contains(&b'\n') && !chunk.contains(&b'\r'),
            "{chunk:?}"
        );
        let chunk: Value = serde_json::from_slice(chunk).expect("the same JSON");
        assert_eq!(chunk["id"], "a");
        assert_eq!(chunk["choices"][0]["delta"]["content"], "hi\nthere");
    }

    #[tokio::test]
    async fn events_of_several_lines_under_the_cap_pass_however_long_the_stream() {
        // One event over three lines (LF, CRLF and CR endings), then more than the cap in all
        // in small events ended by blank lines.
        let mut pieces = vec![Bytes::from_static(
            b"data: {\"id\": \"a\",\ndata: \"object\":\r\ndata: \"chunk\"}\r\r",
        )];
        let event = Bytes::from(format!("data: {}\r\n\r\n", "y".repeat(8 * 1024)));
        let count = MAX_EVENT_BYTES / event.len() + 10;
        pieces.extend(std::iter::repeat_n(event, count));
        pieces.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let (chunks, failure) = read(pieces).await;
        assert!(failure.is_none(), "{failure:?}");
        assert_eq!(chunks.len(), 1 + count);
        // Passed on as one line (an SSE `data:` line cannot hold a line break), the same JSON.
        assert_eq!(chunks[0], "{\"id\": \"a\", \"object\": \"chunk\"}");
    }

    #[tokio::test]
    async fn usage_counts_near_the_largest_integer_saturate() {
        const MAX: u64 = u64::MAX;
        let anthropic = [
            format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_1\",\"usage\":{{\"input_tokens\":{MAX}}}}}}}\n\n"
            ),
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n".into(),
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\n".into(),
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
        ];
        let gemini = [format!(
            "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"hi\"}}]}},\"finishReason\":\"STOP\"}}],\"usageMetadata\":{{\"promptTokenCount\":{MAX},\"candidatesTokenCount\":5}}}}\n\n"
        )];
        for (kind, events) in [
            (ProviderKind::Anthropic, &anthropic[..]),
            (ProviderKind::Gemini, &gemini[..]),
        ] {
            let usage = Arc::new(AtomicU32::new(0));
            let pieces = events.iter().cloned().map(Bytes::from).collect();
            let (chunks, failure) = read_as(kind, pieces, usage.clone()).await;
            assert!(failure.is_none(), "{kind}: {failure:?}");
            assert_eq!(usage.load(Ordering::Relaxed), u32::MAX, "{kind}");
            let last: Value = serde_json::from_slice(chunks.last().unwrap()).unwrap();
            assert_eq!(last["usage"]["total_tokens"], MAX, "{kind}");
        }
    }

    #[tokio::test]
    async fn a_chunk_with_a_null_error_is_an_ordinary_chunk() {
        let openai = vec![
            Bytes::from_static(
                b"data: {\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}],\"error\":null}\n\n",
            ),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ];
        let gemini = vec![Bytes::from_static(
            b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"hi\"}]},\"finishReason\":\"STOP\"}],\"error\":null}\n\n",
        )];
        for (kind, pieces) in [
            (ProviderKind::OpenAi, openai),
            (ProviderKind::Gemini, gemini),
        ] {
            let (chunks, failure) = read_as(kind, pieces, Arc::new(AtomicU32::new(0))).await;
            assert!(failure.is_none(), "{kind}: {failure:?}");
            let chunk: Value = serde_json::from_slice(&chunks[0]).unwrap();
            assert_eq!(chunk["choices"][0]["delta"]["content"], "hi", "{kind}");
        }
        // An error that is one still fails the stream.
        let (_, failure) = read(vec![Bytes::from_static(
            b"data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n",
        )])
        .await;
        assert_eq!(
            failure.map(|class| class.kind),
            Some(ErrorKind::ServerError)
        );
    }
}
