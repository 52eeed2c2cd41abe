//! Flood control of `session.output` events: a per-session bound on events per second, so one
//! chatty process cannot fill the bus and push other sessions' events out of subscribers'
//! buffers.
//!
//! Every line still goes to the session's log; only the event stream is coalesced. Past the
//! bound, output waits as one held event: the first lines of the held range and a count of the
//! lines after them (`skipped`), which grows with every batch that arrives while no event may
//! go out. The held event goes out as soon as the budget allows (the actor sets a timer for
//! that), and before the session's end. So the events of a session still cover every line, in
//! order: `first_line`, then `lines`, then `skipped` lines that are only in the log.
//!
//! What one event carries is bounded too ([`for_event`]): at most `lines_per_event` lines and
//! [`MAX_EVENT_LINE_BYTES`] of their text; the lines past either bound are counted in `skipped`
//! in the same way. So the bus's count bounds (its ring, every subscriber's buffer) are bounds
//! on memory as well: one event of a process's output holds at most 64 KiB of text, not
//! `lines_per_event` lines of up to 16 KiB (1 MiB).
//!
//! Pure: the caller passes `now` and arms the timers this asks for.

use std::time::Duration;

use tokio::time::Instant;

use crate::event::SessionOutput;

/// Bytes of line text one `session.output` event carries at most: four lines of a process's
/// longest (16 KiB read, the runner's `OutputLimits::max_line_bytes`), or the default 64 lines
/// of 1 KiB. A process's line always fits (even with every byte invalid UTF-8, replaced by three,
/// and the runner's cut marker), so an event of a process's output carries at least one line; a
/// longer line (only a chat reply that came in one piece has one: it is not cut into lines) is
/// counted in `skipped`, like the lines after it, and read from the session's log.
pub(crate) const MAX_EVENT_LINE_BYTES: usize = 64 * 1024;

/// Cuts one batch of output to what one event carries: the first lines, at most `per_event` of
/// them and at most `max_bytes` of their text. Returns those lines and how many of the batch's
/// were left out (they are in the session's log; the event counts them in `skipped`).
pub(crate) fn for_event(
    mut lines: Vec<String>,
    per_event: usize,
    max_bytes: usize,
) -> (Vec<String>, u64) {
    let mut bytes = 0;
    let keep = lines
        .iter()
        .take(per_event)
        .take_while(|line| {
            bytes += line.len();
            bytes <= max_bytes
        })
        .count();
    let skipped = (lines.len() - keep) as u64;
    if skipped > 0 {
        lines.truncate(keep);
        // The batch's vector may have room for a runner's whole batch (256 lines); the event
        // keeps only what it carries.
        lines.shrink_to_fit();
    }
    (lines, skipped)
}

/// A token bucket of `session.output` events, and the output held while it is empty.
#[derive(Debug)]
pub(crate) struct OutputGate {
    /// Events per second, and the burst.
    rate: u32,
    tokens: f64,
    refilled_at: Instant,
    held: Option<SessionOutput>,
    /// A flush timer is armed.
    flush_armed: bool,
}

/// What to do after offering output to the gate.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct GateDecision {
    /// Events to publish now, in order.
    pub(crate) publish: Vec<SessionOutput>,
    /// Arm a timer to call [`OutputGate::flush`] after this long.
    pub(crate) flush_after: Option<Duration>,
}

impl OutputGate {
    /// A gate allowing `rate` events per second with a burst of as many (at least 1).
    pub(crate) fn new(rate: u32, now: Instant) -> Self {
        let rate = rate.max(1);
        Self {
            rate,
            tokens: f64::from(rate),
            refilled_at: now,
            held: None,
            flush_armed: false,
        }
    }

    /// One batch of output (lines already cut to the per-event limit, the rest in `skipped`).
    pub(crate) fn offer(&mut self, now: Instant, output: SessionOutput) -> GateDecision {
        self.refill(now);
        let held = match self.held.take() {
            Some(mut held) => {
                held.skipped += output.lines.len() as u64 + output.skipped;
                held
            }
            None => output,
        };
        self.release_or_hold(held)
    }

    /// The flush timer fired.
    pub(crate) fn flush(&mut self, now: Instant) -> GateDecision {
        self.flush_armed = false;
        self.refill(now);
        match self.held.take() {
            Some(held) => self.release_or_hold(held),
            None => GateDecision::default(),
        }
    }

    /// The session ends: what is held goes out whatever the budget (its end is one event
    /// anyway).
    pub(crate) fn drain(&mut self) -> Option<SessionOutput> {
        self.held.take()
    }

    fn release_or_hold(&mut self, output: SessionOutput) -> GateDecision {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return GateDecision {
                publish: vec![output],
                flush_after: None,
            };
        }
        self.held = Some(output);
        let flush_after = if self.flush_armed {
            None
        } else {
            self.flush_armed = true;
            let missing = 1.0 - self.tokens;
            Some(Duration::from_secs_f64(missing / f64::from(self.rate)))
        };
        GateDecision {
            publish: Vec::new(),
            flush_after,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.refilled_at = now;
        let rate = f64::from(self.rate);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * rate).min(rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::OutputStream;

    fn batch(first_line: u64, count: u64) -> SessionOutput {
        SessionOutput {
            stream: OutputStream::Stdout,
            first_line,
            lines: (first_line..first_line + count)
                .map(|n| n.to_string())
                .collect(),
            skipped: 0,
        }
    }

    #[test]
    fn an_event_carries_at_most_its_lines_and_its_bytes_and_counts_the_rest_as_skipped() {
        let line = |n: usize, bytes: usize| {
            let mut line = n.to_string();
            line.extend(std::iter::repeat_n('x', bytes - line.len()));
            line
        };
        // 64 lines of 16 KiB (the runner's longest): 1 MiB in one batch.
        let long: Vec<String> = (0..64).map(|n| line(n, 16 * 1024)).collect();
        let (carried, skipped) = for_event(long.clone(), 64, MAX_EVENT_LINE_BYTES);
        assert_eq!(carried, long[..4], "the first 64 KiB");
        assert_eq!(skipped, 60, "the rest counted");
        let bytes: usize = carried.iter().map(String::len).sum();
        assert!(bytes <= MAX_EVENT_LINE_BYTES, "{bytes} bytes in one event");

        // Short lines: the line bound cuts first.
        let short: Vec<String> = (0..100).map(|n| line(n, 80)).collect();
        let (carried, skipped) = for_event(short.clone(), 64, MAX_EVENT_LINE_BYTES);
        assert_eq!((carried.as_slice(), skipped), (&short[..64], 36));

        // Within both bounds: the batch as it is.
        let (carried, skipped) = for_event(short[..3].to_vec(), 64, MAX_EVENT_LINE_BYTES);
        assert_eq!((carried.as_slice(), skipped), (&short[..3], 0));

        // A line that alone is over the bound (a chat reply in one piece) is not carried.
        let huge = vec![line(1, MAX_EVENT_LINE_BYTES + 1), line(2, 10)];
        let (carried, skipped) = for_event(huge, 64, MAX_EVENT_LINE_BYTES);
        assert_eq!((carried.len(), skipped), (0, 2));
        // A process's longest line always is.
        let (carried, skipped) = for_event(vec![line(1, 16 * 1024)], 64, MAX_EVENT_LINE_BYTES);
        assert_eq!((carried.len(), skipped), (1, 0));
    }

    #[test]
    fn a_burst_passes_then_output_is_held_and_coalesced_without_losing_a_line() {
        let start = Instant::now();
        let mut gate = OutputGate::new(2, start);
        assert_eq!(gate.offer(start, batch(1, 1)).publish.len(), 1);
        assert_eq!(gate.offer(start, batch(2, 1)).publish.len(), 1);
        // The budget is spent: held, and a flush is asked for once.
        let held = gate.offer(start, batch(3, 2));
        assert!(held.publish.is_empty());
        assert_eq!(held.flush_after, Some(Duration::from_millis(500)));
        let more = gate.offer(start, batch(5, 3));
        assert_eq!(more, GateDecision::default(), "merged, no second timer");
        // Too early: nothing yet, and the timer is armed again.
        let early = gate.flush(start + Duration::from_millis(100));
        assert!(early.publish.is_empty());
        assert_eq!(early.flush_after, Some(Duration::from_millis(400)));
        let out = gate.flush(start + Duration::from_millis(500));
        assert_eq!(
            out.publish,
            [SessionOutput {
                stream: OutputStream::Stdout,
                first_line: 3,
                lines: vec!["3".into(), "4".into()],
                skipped: 3,
            }],
            "lines 3-4 carried, 5-7 counted"
        );
        assert_eq!(out.flush_after, None);
        assert_eq!(gate.drain(), None);
    }

    #[test]
    fn the_budget_refills_over_time_up_to_the_burst() {
        let start = Instant::now();
        let mut gate = OutputGate::new(10, start);
        for line in 1..=10 {
            assert_eq!(gate.offer(start, batch(line, 1)).publish.len(), 1);
        }
        assert!(gate.offer(start, batch(11, 1)).publish.is_empty());
        // An hour later the bucket holds 10, not 36,000.
        let later = start + Duration::from_secs(3600);
        let flushed = gate.flush(later);
        assert_eq!(flushed.publish.len(), 1);
        let mut passed = 0;
        for line in 12..40 {
            passed += gate.offer(later, batch(line, 1)).publish.len();
        }
        assert_eq!(passed, 9);
        let held = gate.drain().expect("the rest is held for the end");
        assert_eq!(held.first_line, 21);
        assert_eq!(held.lines.len() as u64 + held.skipped, 19);
    }
}
