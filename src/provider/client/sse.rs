//! A provider's event stream as OpenAI chunks: SSE parsing (with a cap on one event and a
//! timeout between pieces), and a translator per provider kind that turns its events into
//! `chat.completion.chunk` JSON, recognises its end marker and classifies its error events.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use troupe_actors::provider::{ErrorClass, ErrorKind};

use super::MAX_EVENT_BYTES;
use super::{anthropic, gemini, openai};
use crate::provider::ProviderKind;
use crate::provider::classify::{TransportFailure, classify_transport};

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
            Self::TooLong => write!(f, "an event is longer than {MAX_EVENT_BYTES} bytes"),
        }
    }
}

type RawStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;
type Events = Pin<
    Box<dyn Stream<Item = Result<Event, eventsource_stream::EventStreamError<RawError>>> + Send>,
>;

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
    /// An event (or the end) has come.
    received_any: bool,
}

impl SseEvents {
    pub(super) fn new(body: RawStream, translate: Box<dyn Translate>, gap: Duration) -> Self {
        let mut since_newline = 0usize;
        let capped = body.map(move |piece| {
            let piece = piece.map_err(|_| RawError::Transport)?;
            match piece.iter().rposition(|&byte| byte == b'\n') {
                Some(last) => since_newline = piece.len() - last - 1,
                None => since_newline += piece.len(),
            }
            if since_newline > MAX_EVENT_BYTES {
                return Err(RawError::TooLong);
            }
            Ok(piece)
        });
        let state = State {
            events: Box::pin(capped.eventsource()),
            translate,
            pending: VecDeque::new(),
            ended: false,
            done: false,
            gap,
            received_any: false,
        };
        let inner = futures::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(chunk) = state.pending.pop_front() {
                    return Some((Ok(chunk), state));
                }
                if state.ended {
                    return None;
                }
                // The first event is waited for under the caller's first-byte deadline; the
                // gap counts from one event to the next.
                let next = if state.received_any {
                    tokio::time::timeout(state.gap, state.events.next()).await
                } else {
                    Ok(state.events.next().await)
                };
                state.received_any = true;
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
