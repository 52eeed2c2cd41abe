//! The server-sent events format (WHATWG HTML, "interpreting an event stream") read from a
//! provider's body: lines, fields, events. It only parses; what an event means is the
//! translators' business ([`sse`](super::sse)).
//!
//! It is linear by construction, however the body is split: the search for a line end resumes
//! where the last one stopped, a line is consumed by moving a cursor, and the bytes kept for an
//! unfinished line are moved to the front only once at least as many were consumed before them.
//! (eventsource-stream 0.2, used before, copied the rest of its buffer after every line and read
//! an unfinished line again from its start on every piece: a body of many short lines in one
//! piece, or a long line in many small pieces, cost time quadratic in its size inside one poll.)
//! An event, the line being received included, is capped at the parser's cap.

use memchr::{memchr, memchr2};

/// An event the stream dispatched (ended by a blank line, with at least one `data` line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Event {
    /// Its `event` field, `message` when it had none.
    pub(super) event: String,
    /// Its `data` lines, joined with `\n`.
    pub(super) data: String,
}

/// The event being received passed the parser's cap (counted from the blank line that ended
/// the previous one, line endings included): the stream cannot be read further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooLong;

/// A buffer this large left empty is given back rather than kept for the next pieces.
const KEEP_CAPACITY: usize = 1 << 20;

/// The UTF-8 byte order mark, which the format allows before the first line.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads events from the pieces of a body: [`push`](Self::push) each piece, then take
/// [`next_event`](Self::next_event) until it has none. The end of the body needs no call: an
/// event not ended by its blank line is not dispatched, as the format says.
#[derive(Debug)]
pub(super) struct SseParser {
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
    /// Largest event, in bytes.
    cap: usize,
    /// What the parser did, for the tests of its linearity.
    #[cfg(test)]
    work: Work,
}

/// The work a parser did, counted in bytes.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Work {
    /// Bytes searched for a line end.
    pub(super) searched: usize,
    /// Bytes moved inside the buffer (to its front, or by a reallocation at most).
    pub(super) moved: usize,
}

impl SseParser {
    /// A parser whose events may take up to `cap` bytes.
    pub(super) fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            after_cr: false,
            bom_checked: false,
            event_bytes: 0,
            kind: String::new(),
            data: String::new(),
            cap,
            #[cfg(test)]
            work: Work::default(),
        }
    }

    /// Adds a piece of the body. Call [`next_event`](Self::next_event) until it returns none
    /// before the next piece: what is kept is then an unfinished line alone.
    pub(super) fn push(&mut self, piece: &[u8]) {
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
    pub(super) fn next_event(&mut self) -> Result<Option<Event>, TooLong> {
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
            take_field(&self.buf[line], &mut self.kind, &mut self.data);
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
        })
    }

    #[cfg(test)]
    pub(super) fn work(&self) -> Work {
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

/// One line that is neither blank nor the end of anything: a comment (`:` first), or a field
/// `name: value` (one space after the colon is not part of the value; a line without a colon is
/// a name with an empty value). Text that is not UTF-8 is read with replacement characters.
fn take_field(line: &[u8], kind: &mut String, data: &mut String) {
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
        // `id` and `retry` serve a reconnecting client, and a provider call never reconnects
        // (a broken stream is a failed attempt); other names are ignored, as the format says.
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
                &[event("delta", "d")],
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
