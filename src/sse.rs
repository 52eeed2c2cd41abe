//! The server-sent events format (WHATWG HTML, "interpreting an event stream") read from an HTTP
//! body: lines, fields, events. It only parses; what an event means is its reader's business (a
//! provider's translators in [`provider::client`](crate::provider::client), the CLI's event
//! printers). [`events`] reads a whole body as a stream of events.
//!
//! It is linear by construction, however the body is split: the search for a line end resumes
//! where the last one stopped, a line is consumed by moving a cursor, and the bytes kept for an
//! unfinished line are moved to the front only once at least as many were consumed before them.
//! (eventsource-stream 0.2, used before, copied the rest of its buffer after every line and read
//! an unfinished line again from its start on every piece: a body of many short lines in one
//! piece, or a long line in many small pieces, cost time quadratic in its size inside one poll.)
//! An event, the line being received included, is capped at the parser's cap.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use memchr::{memchr, memchr2};

/// An event the stream dispatched (ended by a blank line, with at least one `data` line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Event {
    /// Its `event` field, `message` when it had none.
    pub(crate) event: String,
    /// Its `data` lines, joined with `\n`.
    pub(crate) data: String,
    /// The stream's last event id when it was dispatched: the last `id` field so far, this
    /// event's or an earlier one's (empty when none was given or an empty one reset it).
    pub(crate) id: String,
}

/// The event being received passed the parser's cap (counted from the blank line that ended
/// the previous one, line endings included): the stream cannot be read further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLong;

/// A buffer this large left empty is given back rather than kept for the next pieces.
const KEEP_CAPACITY: usize = 1 << 20;

/// The UTF-8 byte order mark, which the format allows before the first line.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads events from the pieces of a body: [`push`](Self::push) each piece, then take
/// [`next_event`](Self::next_event) until it has none. The end of the body needs no call: an
/// event not ended by its blank line is not dispatched, as the format says.
#[derive(Debug)]
pub(crate) struct SseParser {
    /// What was received; `buf[start..]` is not consumed yet and begins at a line's start.
    buf: Vec<u8>,
    start: usize,
    /// `buf[start..start + scanned]` holds no line end: where the next search begins.
    scanned: usize,
    /// The last line ended with CR: a LF right after it belongs to that ending.
    after_cr: bool,
    /// The byte order mark was looked for (only the body's first bytes may hold one).
    bom_checked: bool,
    /// Bytes of the current event's finished lines, each line ending counted as one.
    event_bytes: usize,
    /// The event's `event` field so far.
    kind: String,
    /// The event's `data` lines so far, each followed by `\n`.
    data: String,
    /// The last event id buffer: kept from one event to the next.
    last_id: String,
    /// Largest event, in bytes.
    cap: usize,
    /// What the parser did, for the tests of its linearity.
    #[cfg(test)]
    work: Work,
}

/// The work a parser did, counted in bytes.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Work {
    /// Bytes searched for a line end.
    pub(crate) searched: usize,
    /// Bytes moved inside the buffer (to its front, or by a reallocation at most).
    pub(crate) moved: usize,
}

impl SseParser {
    /// A parser whose events may take up to `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            after_cr: false,
            bom_checked: false,
            event_bytes: 0,
            kind: String::new(),
            data: String::new(),
            last_id: String::new(),
            cap,
            #[cfg(test)]
            work: Work::default(),
        }
    }

    /// Adds a piece of the body. Call [`next_event`](Self::next_event) until it returns none
    /// before the next piece: what is kept is then an unfinished line alone.
    pub(crate) fn push(&mut self, piece: &[u8]) {
        let kept = self.buf.len() - self.start;
        // Moving what is kept only once the consumed bytes before it are at least as many pays
        // for each move with bytes that are not moved again: linear in all.
        if self.start > 0 && self.start >= kept {
            if kept == 0 && self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            } else {
                self.buf.copy_within(self.start.., 0);
                self.buf.truncate(kept);
                self.count_moved(kept);
            }
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < piece.len() {
            // A reallocation (amortized: the capacity at least doubles) may move what is kept.
            self.count_moved(self.buf.len());
        }
        self.buf.extend_from_slice(piece);
    }

    /// The next event the pieces so far complete, if any; [`TooLong`] once the event being
    /// received (its unfinished line included) passes the cap.
    pub(crate) fn next_event(&mut self) -> Result<Option<Event>, TooLong> {
        loop {
            let pending = &self.buf[self.start..];
            if !self.bom_checked {
                if pending.len() < BOM.len() && BOM.starts_with(pending) {
                    return Ok(None);
                }
                if pending.starts_with(BOM) {
                    self.start += BOM.len();
                }
                self.bom_checked = true;
                continue;
            }
            if self.after_cr {
                match pending.first() {
                    None => return Ok(None),
                    Some(b'\n') => self.start += 1,
                    Some(_) => {}
                }
                self.after_cr = false;
                continue;
            }
            let from = self.start + self.scanned;
            let Some(offset) = memchr2(b'\n', b'\r', &self.buf[from..]) else {
                self.count_searched(self.buf.len() - from);
                self.scanned = self.buf.len() - self.start;
                if self.event_bytes.saturating_add(self.scanned) > self.cap {
                    return Err(TooLong);
                }
                return Ok(None);
            };
            self.count_searched(offset + 1);
            let end = from + offset;
            let line = self.start..end;
            self.after_cr = self.buf[end] == b'\r';
            self.start = end + 1;
            self.scanned = 0;
            if line.is_empty() {
                self.event_bytes = 0;
                if let Some(event) = self.dispatch() {
                    return Ok(Some(event));
                }
                continue;
            }
            self.event_bytes = self.event_bytes.saturating_add(line.len() + 1);
            if self.event_bytes > self.cap {
                return Err(TooLong);
            }
            take_field(
                &self.buf[line],
                &mut self.kind,
                &mut self.data,
                &mut self.last_id,
            );
        }
    }

    /// The event the blank line ends, if it had data; the buffers start over either way.
    fn dispatch(&mut self) -> Option<Event> {
        let kind = std::mem::take(&mut self.kind);
        if self.data.is_empty() {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line
        Some(Event {
            event: if kind.is_empty() {
                "message".to_owned()
            } else {
                kind
            },
            data,
            id: self.last_id.clone(),
        })
    }

    #[cfg(test)]
    pub(crate) fn work(&self) -> Work {
        self.work
    }

    fn count_searched(&mut self, _bytes: usize) {
        #[cfg(test)]
        {
            self.work.searched += _bytes;
        }
    }

    fn count_moved(&mut self, _bytes: usize) {
        #[cfg(test)]
        {
            self.work.moved += _bytes;
        }
    }
}

/// What ended a body's events before its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError<E> {
    /// Reading the body failed.
    #[error("{0}")]
    Body(E),
    /// An event passed the reader's cap.
    #[error("an event of the stream is over {cap} bytes")]
    TooLong {
        /// The cap.
        cap: usize,
    },
}

/// The events of `body`, each of at most `cap` bytes. The stream ends with the body (an event
/// its blank line did not end is not dispatched) or with the first error, after which it gives
/// nothing more.
pub(crate) fn events<S, E>(body: S, cap: usize) -> impl Stream<Item = Result<Event, ReadError<E>>>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let state = Some((body, SseParser::new(cap)));
    futures::stream::unfold(state, move |state| async move {
        let (mut body, mut parser) = state?;
        loop {
            match parser.next_event() {
                Ok(Some(event)) => return Some((Ok(event), Some((body, parser)))),
                Ok(None) => {}
                Err(TooLong) => return Some((Err(ReadError::TooLong { cap }), None)),
            }
            match body.next().await? {
                Ok(piece) => parser.push(&piece),
                Err(error) => return Some((Err(ReadError::Body(error)), None)),
            }
        }
    })
}

/// One line that is neither blank nor the end of anything: a comment (`:` first), or a field
/// `name: value` (one space after the colon is not part of the value; a line without a colon is
/// a name with an empty value). Text that is not UTF-8 is read with replacement characters.
fn take_field(line: &[u8], kind: &mut String, data: &mut String, last_id: &mut String) {
    let (name, value) = match memchr(b':', line) {
        Some(0) => return,
        Some(colon) => {
            let value = &line[colon + 1..];
            (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &line[line.len()..]),
    };
    match name {
        b"data" => {
            data.push_str(&String::from_utf8_lossy(value));
            data.push('\n');
        }
        b"event" => *kind = String::from_utf8_lossy(value).into_owned(),
        // An id holding NUL is ignored, as the format says.
        b"id" if memchr(0, value).is_none() => {
            *last_id = String::from_utf8_lossy(value).into_owned()
        }
        // `retry` is a reconnection delay, which no reader here takes from the server; other
        // names are ignored, as the format says.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;

    use super::*;

    /// Every event of `pieces`, read with `cap`, and the parser's work; `Err` when too long.
    fn parse(pieces: &[&[u8]], cap: usize) -> (Result<Vec<Event>, TooLong>, Work) {
        let mut parser = SseParser::new(cap);
        let mut events = Vec::new();
        for piece in pieces {
            parser.push(piece);
            loop {
                match parser.next_event() {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(too_long) => return (Err(too_long), parser.work()),
                }
            }
        }
        (Ok(events), parser.work())
    }

    fn event(kind: &str, data: &str) -> Event {
        Event {
            event: kind.to_owned(),
            data: data.to_owned(),
            id: String::new(),
        }
    }

    fn with_id(event: Event, id: &str) -> Event {
        Event {
            id: id.to_owned(),
            ..event
        }
    }

    #[test]
    fn many_short_lines_in_one_piece_are_searched_once_and_never_moved() {
        // eventsource-stream copied the rest of its buffer after each of these lines: for
        // 400 KiB of blank lines, about 80 GiB copied inside one poll.
        for (line, events) in [("\n", 0), (":\n", 0), ("data:\n\n", 1), ("x\r\n", 0)] {
            let body = line.repeat(400 * 1024 / line.len());
            let (parsed, work) = parse(&[body.as_bytes()], 4 << 20);
            let parsed = parsed.expect("no event is long");
            assert_eq!(parsed.len(), events * body.len() / line.len(), "{line:?}");
            // The LF of a CRLF is taken without a search.
            assert!(work.searched <= body.len(), "{line:?}: {work:?}");
            assert_eq!(work.moved, 0, "{line:?}: {work:?}");
        }
    }

    #[test]
    fn a_long_line_in_small_pieces_is_searched_once_and_moved_a_bounded_number_of_times() {
        // eventsource-stream read the unfinished line again from its start on every piece:
        // 1 MiB in 1 KiB pieces, about 512 MiB searched.
        let line = format!("data: {}", "x".repeat(1 << 20));
        let mut pieces: Vec<&[u8]> = line.as_bytes().chunks(1024).collect();
        pieces.push(b"\n\n");
        let body_len = line.len() + 2;
        let (parsed, work) = parse(&pieces, 4 << 20);
        let parsed = parsed.expect("under the cap");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].data.len(), 1 << 20);
        assert_eq!(work.searched, body_len, "{work:?}");
        assert!(work.moved <= 2 * body_len, "{work:?}");
    }

    #[test]
    fn many_events_in_pieces_of_every_size_cost_work_linear_in_the_body() {
        let body = "event: e\ndata: {\"a\": 1}\r\n: comment\r\ndata: b\r\n\r\n".repeat(10_000);
        for size in [1, 3, 7, 64, 1000, 65_536] {
            let pieces: Vec<&[u8]> = body.as_bytes().chunks(size).collect();
            let (parsed, work) = parse(&pieces, 4 << 20);
            let parsed = parsed.expect("small events");
            assert_eq!(parsed.len(), 10_000, "pieces of {size}");
            assert_eq!(parsed[9_999], event("e", "{\"a\": 1}\nb"));
            assert!(work.searched <= body.len(), "pieces of {size}: {work:?}");
            assert!(work.moved <= 2 * body.len(), "pieces of {size}: {work:?}");
        }
    }

    #[test]
    fn an_unfinished_line_and_an_event_of_many_lines_are_capped() {
        let cap = 1000;
        // One line with no end, in pieces: refused once past the cap, not held on to.
        let line = vec![b'x'; 10 * cap];
        let pieces: Vec<&[u8]> = line.chunks(100).collect();
        let mut parser = SseParser::new(cap);
        let mut refused_at = None;
        for (index, piece) in pieces.iter().enumerate() {
            parser.push(piece);
            if parser.next_event() == Err(TooLong) {
                refused_at = Some(index);
                break;
            }
        }
        assert_eq!(
            refused_at,
            Some(cap / 100),
            "refused at the piece past the cap"
        );
        // Short lines without a blank line among them.
        let lines = "data: x\n".repeat(cap);
        assert_eq!(parse(&[lines.as_bytes()], cap).0, Err(TooLong));
        // Events under the cap pass however many there are; the blank line starts over.
        let event_text = format!("data: {}\n\n", "y".repeat(cap - 10));
        let events = event_text.repeat(100);
        assert_eq!(parse(&[events.as_bytes()], cap).0.map(|e| e.len()), Ok(100));
        // The cap counts line endings: an event of exactly the cap passes, one more byte not.
        let exact = format!("data: {}\n\n", "z".repeat(cap - 7));
        assert_eq!(parse(&[exact.as_bytes()], cap).0.map(|e| e.len()), Ok(1));
        let over = format!("data: {}\n\n", "z".repeat(cap - 6));
        assert_eq!(parse(&[over.as_bytes()], cap).0, Err(TooLong));
    }

    #[test]
    fn the_format_rules_providers_rely_on() {
        let cap = 4 << 20;
        let cases: &[(&[&[u8]], &[Event])] = &[
            // LF, CR and CRLF line endings; a CRLF split between two pieces is one ending.
            (
                &[b"data: a\r", b"\ndata: b\r\r", b"data: c\n\n"],
                &[event("message", "a\nb"), event("message", "c")],
            ),
            // One space after the colon is dropped, no more; no space is fine.
            (&[b"data:x\ndata:  y\n\n"], &[event("message", "x\n y")]),
            // Comments, `id`, `retry` and unknown fields are not data; an event type is kept.
            (
                &[b": keep-alive\nid: 7\nretry: 10\nfoo: bar\nevent: delta\ndata: d\n\n"],
                &[with_id(event("delta", "d"), "7")],
            ),
            // The last id carries over to events without one; an empty one resets it; one
            // holding NUL is ignored; an event without data still sets it.
            (
                &[b"id: a\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\nid: b\n\nid: c\0\ndata: 4\n\n"],
                &[
                    with_id(event("message", "1"), "a"),
                    with_id(event("message", "2"), "a"),
                    event("message", "3"),
                    with_id(event("message", "4"), "b"),
                ],
            ),
            // An event without data is not dispatched, and its type does not carry over.
            (
                &[b"event: ping\n\ndata: after\n\n"],
                &[event("message", "after")],
            ),
            // A `data` line with nothing after it is an empty line of data, dispatched.
            (
                &[b"data\n\ndata:\n\n"],
                &[event("message", ""), event("message", "")],
            ),
            // A byte order mark before the first line, even split, is not part of it.
            (
                &[b"\xEF\xBB", b"\xBFdata: bom\n\n"],
                &[event("message", "bom")],
            ),
            // An event the body ends before its blank line is not dispatched.
            (&[b"data: done\n\ndata: cut\n"], &[event("message", "done")]),
            // Text that is not UTF-8 reads with replacement characters.
            (&[b"data: \xFF!\n\n"], &[event("message", "\u{FFFD}!")]),
        ];
        for (pieces, expected) in cases {
            let (parsed, _) = parse(pieces, cap);
            assert_eq!(parsed.as_deref(), Ok(*expected), "{pieces:?}");
        }
    }

    #[tokio::test]
    async fn a_body_reads_as_events_until_its_end_or_its_first_error() {
        let pieces = |items: Vec<Result<&'static [u8], &'static str>>| {
            futures::stream::iter(items.into_iter().map(|item| item.map(Bytes::from_static)))
        };
        let read = |items, cap| async move {
            events(pieces(items), cap)
                .map(|item| item.map_err(|error| error.to_string()))
                .collect::<Vec<_>>()
                .await
        };
        assert_eq!(
            read(
                vec![Ok(b"id: 1\ndata: a"), Ok(b"\n\ndata: b\n\ndata: c")],
                64
            )
            .await,
            vec![
                Ok(with_id(event("message", "a"), "1")),
                Ok(with_id(event("message", "b"), "1"))
            ],
        );
        assert_eq!(
            read(
                vec![Ok(b"data: a\n\n"), Err("reset"), Ok(b"data: b\n\n")],
                64
            )
            .await,
            vec![Ok(event("message", "a")), Err("reset".to_owned())],
        );
        assert_eq!(
            read(vec![Ok(b"data: a\n\ndata: 0123456789"), Ok(b"\n\n")], 12).await,
            vec![
                Ok(event("message", "a")),
                Err("an event of the stream is over 12 bytes".to_owned())
            ],
        );
    }

    /// The events eventsource-stream 0.2.3 reads from `pieces`. (It waits for the byte after a
    /// CR before it takes the CR as a line end, so a body whose last byte is a CR differs; and it
    /// panics on a byte order mark, slicing inside it.)
    async fn reference(pieces: Vec<Vec<u8>>) -> Vec<Event> {
        futures::stream::iter(pieces.into_iter().map(Ok::<_, std::convert::Infallible>))
            .eventsource()
            .map(|event| {
                let event = event.expect("valid UTF-8");
                Event {
                    event: event.event,
                    data: event.data,
                    id: event.id,
                }
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn reads_what_eventsource_stream_read_wherever_the_body_is_split() {
        let bodies: &[&str] = &[
            "data: {\"id\":\"a\",\ndata: \"x\"}\r\n\r\nevent: error\ndata: {\"error\": 1}\n\n",
            "event: message_start\r\ndata: {}\r\n\r\n: ping\r\n\r\nevent: message_stop\rdata: s\r\r\n",
            "data: é😀\n\nid: 1\nretry: 5\ndata\n\ndata:  two\ndata:\n\nevent: x\n\n",
            "data: [DONE]\n\ndata: tail without its blank line\n",
            "id: 1\ndata: a\n\ndata: b\n\nid:\ndata: c\n\nid: 2\n\ndata: d\n\n",
        ];
        for body in bodies {
            let bytes = body.as_bytes();
            for split in 0..=bytes.len() {
                let (head, tail) = bytes.split_at(split);
                let (ours, _) = parse(&[head, tail], 1 << 20);
                let theirs = reference(vec![head.to_vec(), tail.to_vec()]).await;
                assert_eq!(ours, Ok(theirs), "{body:?} split at {split}");
            }
        }
    }
}
