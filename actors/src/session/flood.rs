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
//! Pure: the caller passes `now` and arms the timers this asks for.

use std::time::Duration;

use tokio::time::Instant;

use crate::event::SessionOutput;

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
