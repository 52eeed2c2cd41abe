//! How a response body goes out: in which pieces, with which pauses, and whether it ends or is
//! cut off.
//!
//! The provider modules say what the bytes are; this module decides how they travel, so every
//! timing and splitting behaviour works the same for OpenAI, Anthropic and Gemini.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::time::Duration;

use axum::body::{Body, Bytes};

/// Pause before failing a cut-off body, so the pieces before it are flushed to the socket
/// first (hyper drops whatever it still buffers when the body fails).
const FLUSH_BEFORE_ABORT: Duration = Duration::from_millis(20);

/// The pieces of a body and how to send them.
#[derive(Debug, Clone)]
pub(super) struct Delivery {
    pub(super) pieces: Vec<Bytes>,
    /// Wait before the first piece (the headers go out at once).
    pub(super) first_delay: Duration,
    /// Wait between pieces.
    pub(super) gap: Duration,
    pub(super) ending: Ending,
}

/// How the body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Properly: the client sees the end of the body.
    Complete,
    /// Cut off after the last piece: the connection is closed with the body unfinished.
    Abort,
}

impl Delivery {
    /// All pieces at once, ended properly.
    pub(super) fn immediate(pieces: Vec<Bytes>) -> Self {
        Self {
            pieces,
            first_delay: Duration::ZERO,
            gap: Duration::ZERO,
            ending: Ending::Complete,
        }
    }

    /// The body for the response: one piece sent at once has a `content-length`; anything
    /// else is streamed (chunked in HTTP/1.1), as real providers stream their events.
    pub(super) fn into_body(self) -> Body {
        let at_once = self.first_delay.is_zero() && self.gap.is_zero();
        if self.pieces.len() <= 1 && at_once && self.ending == Ending::Complete {
            return Body::from(self.pieces.concat());
        }
        let state = Sending {
            pieces: self.pieces.into(),
            sent_any: false,
            failed: false,
        };
        let (first_delay, gap, ending) = (self.first_delay, self.gap, self.ending);
        Body::from_stream(futures::stream::unfold(
            state,
            move |mut state| async move {
                if let Some(piece) = state.pieces.pop_front() {
                    let pause = if state.sent_any { gap } else { first_delay };
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    state.sent_any = true;
                    return Some((Ok(piece), state));
                }
                if ending == Ending::Complete || state.failed {
                    return None;
                }
                tokio::time::sleep(FLUSH_BEFORE_ABORT).await;
                state.failed = true;
                let cut = io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "fake provider cut the body",
                );
                Some((Err(cut), state))
            },
        ))
    }
}

struct Sending {
    pieces: VecDeque<Bytes>,
    sent_any: bool,
    failed: bool,
}

/// Cuts one piece where a careless client breaks: halfway through its JSON object (between the
/// first `{` and the last `}`) and right after the first byte of every multi-byte UTF-8
/// character. The cuts put together give back `piece`.
pub(super) fn split_awkwardly(piece: &Bytes) -> Vec<Bytes> {
    let mut cuts = BTreeSet::new();
    if let (Some(open), Some(close)) = (
        piece.iter().position(|&b| b == b'{'),
        piece.iter().rposition(|&b| b == b'}'),
    ) && close > open + 1
    {
        cuts.insert(open + (close - open) / 2);
    }
    for (index, &byte) in piece.iter().enumerate() {
        // 0b11xx_xxxx starts a character of two or more bytes.
        if byte >= 0xC0 {
            cuts.insert(index + 1);
        }
    }
    cut_at(piece, cuts)
}

/// Cuts `bytes` into `count` pieces of about the same length (fewer when it is shorter).
pub(super) fn split_evenly(bytes: &Bytes, count: usize) -> Vec<Bytes> {
    let step = bytes.len().div_ceil(count.max(1)).max(1);
    cut_at(bytes, (step..bytes.len()).step_by(step).collect())
}

fn cut_at(bytes: &Bytes, cuts: BTreeSet<usize>) -> Vec<Bytes> {
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts.into_iter().filter(|&cut| cut > 0 && cut < bytes.len()) {
        pieces.push(bytes.slice(start..cut));
        start = cut;
    }
    pieces.push(bytes.slice(start..));
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awkward_cuts_go_through_json_and_characters_and_reassemble() {
        let event = Bytes::from("data: {\"delta\":{\"content\":\"café 🦀\"}}\n\n");
        let pieces = split_awkwardly(&event);
        assert_eq!(pieces.concat(), event.to_vec());
        assert!(
            pieces.len() >= 4,
            "one cut in the JSON and one in each of é and 🦀: {pieces:?}"
        );
        let broken_characters = pieces
            .iter()
            .filter(|p| std::str::from_utf8(p).is_err())
            .count();
        assert!(broken_characters >= 2, "é and 🦀 are both cut: {pieces:?}");
        let first = String::from_utf8_lossy(&pieces[0]);
        assert!(
            first.starts_with("data: {") && !first.contains("}}"),
            "JSON cut open: {first}"
        );
    }

    #[test]
    fn even_cuts_reassemble() {
        let body = Bytes::from("0123456789");
        let pieces = split_evenly(&body, 4);
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces.concat(), body.to_vec());
        assert_eq!(split_evenly(&Bytes::from("ab"), 4).len(), 2);
        assert_eq!(split_evenly(&Bytes::new(), 4), vec![Bytes::new()]);
    }
}
