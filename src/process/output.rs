//! A process's output, from pipe bytes to batches of lines: split on `\n`, cut long lines to the
//! cap (the rest of such a line is counted, never buffered), decode lossily, and coalesce lines
//! into batches bounded in size and in delay.
//!
//! Memory per stream stays within one read buffer, one capped line and one batch, whatever the
//! process prints.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use troupe_actors::event::OutputStream;
use troupe_actors::session::{OutputLimits, ProcessEvent};

/// Bytes read from a pipe at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Reads `reader` to its end (or until `stop`), handing each batch of lines to `emit`.
///
/// A batch is emitted when it holds `max_batch_lines` lines, or `batch_window` after its first
/// line arrived, or when the stream ends; a final line without `\n` is delivered too.
///
/// What a process's pumps tell its driver.
#[derive(Debug, Default)]
pub(super) struct PumpShare {
    /// Pumps waiting for the session to have room now (their pipes may still hold output,
    /// whoever wrote it).
    pub(super) held: AtomicUsize,
    /// Bytes read from the pipes so far.
    pub(super) read: AtomicU64,
}

/// Before each read the pump waits for `room` (the sink's [`ProcessSink::ready`]): while the
/// session is not taking output, nothing more is read, the pipe fills and the process blocks
/// in its write, and no output is lost or queued without bound.
///
/// [`ProcessSink::ready`]: troupe_actors::session::ProcessSink::ready
pub(super) async fn pump<R>(
    mut reader: R,
    stream: OutputStream,
    limits: OutputLimits,
    stop: CancellationToken,
    (room, share): (impl Fn() -> BoxFuture<'static, ()>, &PumpShare),
    mut emit: impl FnMut(ProcessEvent),
) where
    R: AsyncRead + Unpin,
{
    let mut splitter = LineSplitter::new(limits.max_line_bytes);
    let mut batch = Batcher::new(stream, limits.max_batch_lines, limits.batch_window);
    let mut buffer = vec![0u8; READ_CHUNK];
    // `None` once there is room for the next read.
    let mut waiting: Option<BoxFuture<'static, ()>> = None;
    loop {
        let deadline = batch.deadline();
        tokio::select! {
            // Biased: a due batch goes out before more is read, even under a flood.
            biased;
            () = stop.cancelled() => break,
            () = sleep_until_some(deadline), if deadline.is_some() => batch.flush(&mut emit),
            () = async { waiting.as_mut().expect("guarded").await }, if waiting.is_some() => {
                waiting = None;
                share.held.fetch_sub(1, Ordering::AcqRel);
            }
            read = reader.read(&mut buffer), if waiting.is_none() => match read {
                Ok(0) => break,
                Ok(read) => {
                    share.read.fetch_add(read as u64, Ordering::AcqRel);
                    splitter.feed(&buffer[..read], |line| batch.push(line, &mut emit));
                    let mut next = room();
                    if (&mut next).now_or_never().is_none() {
                        share.held.fetch_add(1, Ordering::AcqRel);
                        waiting = Some(next);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::warn!(?stream, %error, "reading a process's output failed");
                    break;
                }
            },
        }
    }
    if waiting.is_some() {
        share.held.fetch_sub(1, Ordering::AcqRel);
    }
    if let Some(line) = splitter.finish() {
        batch.push(line, &mut emit);
    }
    batch.flush(&mut emit);
}

async fn sleep_until_some(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// Lines waiting to be emitted together.
struct Batcher {
    stream: OutputStream,
    max_lines: usize,
    window: Duration,
    lines: Vec<String>,
    first_at: Option<Instant>,
}

impl Batcher {
    fn new(stream: OutputStream, max_lines: usize, window: Duration) -> Self {
        Self {
            stream,
            max_lines: max_lines.max(1),
            window,
            lines: Vec::new(),
            first_at: None,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|first| first + self.window)
    }

    fn push(&mut self, line: String, emit: &mut impl FnMut(ProcessEvent)) {
        if self.lines.is_empty() {
            self.first_at = Some(Instant::now());
        }
        self.lines.push(line);
        if self.lines.len() >= self.max_lines {
            self.flush(emit);
        }
    }

    fn flush(&mut self, emit: &mut impl FnMut(ProcessEvent)) {
        self.first_at = None;
        if self.lines.is_empty() {
            return;
        }
        let capacity = self.lines.len().min(self.max_lines);
        emit(ProcessEvent::Output {
            stream: self.stream,
            lines: std::mem::replace(&mut self.lines, Vec::with_capacity(capacity)),
        });
    }
}

/// Splits bytes into lines, keeping at most `cap` bytes of the line in progress.
#[derive(Debug)]
pub(super) struct LineSplitter {
    cap: usize,
    /// The first `cap` bytes of the line in progress.
    kept: Vec<u8>,
    /// Bytes of the line in progress past the cap, counted and discarded.
    discarded: u64,
    /// The last byte of the line in progress (to strip a `\r` that was discarded).
    last: Option<u8>,
}

impl LineSplitter {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap,
            kept: Vec::new(),
            discarded: 0,
            last: None,
        }
    }

    /// Consumes `bytes`, calling `line` for every line they complete.
    pub(super) fn feed(&mut self, mut bytes: &[u8], mut line: impl FnMut(String)) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.take(&bytes[..end]);
            line(self.complete());
            bytes = &bytes[end + 1..];
        }
        self.take(bytes);
    }

    /// The last line, when the stream ended without `\n` after it.
    pub(super) fn finish(&mut self) -> Option<String> {
        self.last.map(|_| self.complete())
    }

    fn take(&mut self, bytes: &[u8]) {
        let Some(&last) = bytes.last() else { return };
        let room = self.cap.saturating_sub(self.kept.len());
        let keep = room.min(bytes.len());
        if self.kept.capacity() == 0 && keep > 0 {
            self.kept.reserve(keep.max(256).min(self.cap));
        }
        self.kept.extend_from_slice(&bytes[..keep]);
        self.discarded += (bytes.len() - keep) as u64;
        self.last = Some(last);
    }

    fn complete(&mut self) -> String {
        if self.last == Some(b'\r') {
            if self.discarded > 0 {
                self.discarded -= 1;
            } else {
                self.kept.pop();
            }
        }
        let mut cut = self.discarded;
        let mut raw = self.kept.as_slice();
        if cut > 0 {
            // The cap may have split a character; its first bytes are not invalid text.
            let partial = incomplete_tail(raw);
            raw = &raw[..raw.len() - partial];
            cut += partial as u64;
        }
        let (mut text, used) = decode_within(raw, self.cap);
        cut += (raw.len() - used) as u64;
        if cut > 0 {
            text.push_str(&format!(" …[cut {cut} bytes]"));
        }
        self.kept.clear();
        if self.kept.capacity() > 4096 {
            // Do not hold a long line's allocation for a process that printed one once.
            self.kept = Vec::new();
        }
        self.discarded = 0;
        self.last = None;
        text
    }
}

/// Length of an incomplete UTF-8 sequence at the end of `raw` (0 if there is none).
fn incomplete_tail(raw: &[u8]) -> usize {
    (1..=3.min(raw.len()))
        .find(|&len| match std::str::from_utf8(&raw[raw.len() - len..]) {
            Err(error) => error.valid_up_to() == 0 && error.error_len().is_none(),
            Ok(_) => false,
        })
        .unwrap_or(0)
}

/// Decodes `raw` lossily (each invalid sequence becomes U+FFFD) into at most `cap` bytes of
/// text, ending on a character boundary; also returns how many bytes of `raw` it used.
fn decode_within(raw: &[u8], cap: usize) -> (String, usize) {
    let mut text = String::with_capacity(raw.len().min(cap));
    let mut used = 0;
    for chunk in raw.utf8_chunks() {
        let valid = chunk.valid();
        if text.len() + valid.len() > cap {
            let fits = valid.floor_char_boundary(cap - text.len());
            text.push_str(&valid[..fits]);
            return (text, used + fits);
        }
        text.push_str(valid);
        used += valid.len();
        let invalid = chunk.invalid();
        if !invalid.is_empty() {
            if text.len() + char::REPLACEMENT_CHARACTER.len_utf8() > cap {
                return (text, used);
            }
            text.push(char::REPLACEMENT_CHARACTER);
            used += invalid.len();
        }
    }
    (text, used)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    use super::*;

    fn split(cap: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut splitter = LineSplitter::new(cap);
        let mut lines = Vec::new();
        for chunk in chunks {
            splitter.feed(chunk, |line| lines.push(line));
        }
        lines.extend(splitter.finish());
        lines
    }

    #[test]
    fn lines_split_across_chunks_with_crlf_and_a_final_line() {
        assert_eq!(
            split(100, &[b"one\r\ntw", b"o\n\nthr", b"ee\r", b"\nlast"]),
            ["one", "two", "", "three", "last"]
        );
        assert_eq!(
            split(100, &[b"a\n"]),
            ["a"],
            "no empty line after a final newline"
        );
        assert_eq!(split(100, &[]), Vec::<String>::new());
        assert_eq!(
            split(100, &[b"a\r\r\n"]),
            ["a\r"],
            "only one \\r is a line ending"
        );
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(split(100, &[b"ok\xff\xfebad\n"]), ["ok\u{FFFD}\u{FFFD}bad"]);
        // A character split across reads is not invalid.
        assert_eq!(split(100, &[b"\xe2\x82", b"\xac\n"]), ["€"]);
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary_with_a_marker() {
        assert_eq!(
            split(5, &[b"abcdefgh\n", b"xy\n"]),
            ["abcde …[cut 3 bytes]", "xy"]
        );
        // "€" is 3 bytes: the cap of 5 would split the second one.
        assert_eq!(split(5, &["€€€\n".as_bytes()]), ["€ …[cut 6 bytes]"]);
        // The discarded part of a line ends with \r\n: the \r is a line ending, not content.
        assert_eq!(split(3, &[b"abcd\r\n"]), ["abc …[cut 1 bytes]"]);
        assert_eq!(split(3, &[b"abc\r\n"]), ["abc"], "exactly at the cap");
        // Replacement characters take more room than the bytes they replace.
        assert_eq!(split(4, &[b"\xff\xff\n"]), ["\u{FFFD} …[cut 1 bytes]"]);
    }

    #[test]
    fn a_huge_line_keeps_only_the_cap() {
        let mut splitter = LineSplitter::new(10);
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            splitter.feed(&chunk, |_| panic!("no line yet"));
            assert!(
                splitter.kept.capacity() <= 256,
                "the splitter must not buffer the line"
            );
        }
        let line = splitter.finish().unwrap();
        assert_eq!(line, format!("xxxxxxxxxx …[cut {} bytes]", (64 << 20) - 10));
    }

    fn limits(max_batch_lines: usize, window_ms: u64) -> OutputLimits {
        OutputLimits {
            max_line_bytes: 1024,
            max_batch_lines,
            batch_window: Duration::from_millis(window_ms),
        }
    }

    /// These pumps always have room: nothing reads what they count.
    static SHARE: PumpShare = PumpShare {
        held: AtomicUsize::new(0),
        read: AtomicU64::new(0),
    };

    fn start_pump(
        limits: OutputLimits,
    ) -> (
        tokio::io::DuplexStream,
        mpsc::UnboundedReceiver<ProcessEvent>,
        CancellationToken,
    ) {
        let (writer, reader) = tokio::io::duplex(1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(pump(
            reader,
            OutputStream::Stderr,
            limits,
            stop.clone(),
            (|| Box::pin(std::future::ready(())), &SHARE),
            move |event| tx.send(event).unwrap(),
        ));
        (writer, rx, stop)
    }

    fn lines(event: ProcessEvent) -> Vec<String> {
        match event {
            ProcessEvent::Output {
                stream: OutputStream::Stderr,
                lines,
            } => lines,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_quiet_line_goes_out_after_the_window() {
        let (mut writer, mut events, _stop) = start_pump(limits(10, 50));
        writer.write_all(b"first\n").await.unwrap();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(49)).await;
        assert!(events.try_recv().is_err(), "held until the window ends");
        writer.write_all(b"second\n").await.unwrap();
        let batch = lines(events.recv().await.unwrap());
        assert_eq!(batch, ["first", "second"]);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        // The next line starts a new window.
        writer.write_all(b"third\n").await.unwrap();
        let started = Instant::now();
        assert_eq!(lines(events.recv().await.unwrap()), ["third"]);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_full_batch_goes_out_at_once_and_the_end_flushes() {
        let (mut writer, mut events, _stop) = start_pump(limits(3, 1000));
        writer.write_all(b"1\n2\n3\n4\n5").await.unwrap();
        let started = Instant::now();
        assert_eq!(lines(events.recv().await.unwrap()), ["1", "2", "3"]);
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(writer);
        assert_eq!(lines(events.recv().await.unwrap()), ["4", "5"]);
        assert_eq!(started.elapsed(), Duration::ZERO, "the end does not wait");
        assert!(events.recv().await.is_none(), "the pump is done");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn stop_flushes_what_was_read() {
        let (mut writer, mut events, stop) = start_pump(limits(10, 1000));
        writer.write_all(b"a\npartial").await.unwrap();
        // Paused time only moves once every task is idle: the pump has read by then.
        tokio::time::sleep(Duration::from_millis(1)).await;
        stop.cancel();
        assert_eq!(lines(events.recv().await.unwrap()), ["a", "partial"]);
        assert!(events.recv().await.is_none());
    }
}
