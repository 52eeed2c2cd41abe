//! Getting one process's events to its session: in order, to the current sink, and into a
//! bounded backlog while the sink refuses them, until a new sink is attached.
//!
//! The backlog drops the oldest output lines past its caps (and says so with a marker line when
//! it is replayed); it never drops the exit.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::future::BoxFuture;

use troupe_actors::event::OutputStream;
use troupe_actors::session::{ProcessEvent, ProcessSink};

/// How much a detached process may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BacklogLimits {
    /// Output lines.
    pub(crate) lines: usize,
    /// Bytes of output lines.
    pub(crate) bytes: usize,
}

/// The delivery state of one process.
pub(crate) struct Delivery {
    sink: Arc<dyn ProcessSink>,
    /// The current sink refused an event: everything goes to the backlog until a reattach.
    refused: bool,
    backlog: VecDeque<ProcessEvent>,
    limits: BacklogLimits,
    backlog_lines: usize,
    backlog_bytes: usize,
    /// Output lines dropped from the backlog, per stream, not yet reported.
    dropped: Vec<(OutputStream, u64)>,
    exit_emitted: bool,
    exit_delivered: bool,
}

impl Delivery {
    pub(crate) fn new(sink: Arc<dyn ProcessSink>, limits: BacklogLimits) -> Self {
        Self {
            sink,
            refused: false,
            backlog: VecDeque::new(),
            limits,
            backlog_lines: 0,
            backlog_bytes: 0,
            dropped: Vec::new(),
            exit_emitted: false,
            exit_delivered: false,
        }
    }

    /// The process emitted its exit (delivered or kept).
    pub(crate) fn exit_emitted(&self) -> bool {
        self.exit_emitted
    }

    /// A sink took the exit: nothing is left to deliver.
    pub(crate) fn exit_delivered(&self) -> bool {
        self.exit_delivered
    }

    /// Delivers `event` to the sink, or keeps it when the sink refuses it or refused an earlier
    /// one.
    pub(crate) fn push(&mut self, event: ProcessEvent) {
        if matches!(event, ProcessEvent::Exited(_)) {
            self.exit_emitted = true;
        }
        if self.refused {
            self.keep(event);
            return;
        }
        self.send(event);
    }

    /// Resolves once the sink has room for more output ([`ProcessSink::ready`]); at once while
    /// events go to the backlog, which stays within its caps by dropping its oldest lines.
    pub(crate) fn ready(&self) -> BoxFuture<'static, ()> {
        if self.refused {
            Box::pin(std::future::ready(()))
        } else {
            self.sink.ready()
        }
    }

    /// Replaces the sink and delivers what was kept (a marker for dropped lines first, then the
    /// kept events in order) until the new sink refuses one.
    pub(crate) fn reattach(&mut self, sink: Arc<dyn ProcessSink>) {
        self.sink = sink;
        self.refused = false;
        while let Some(index) = self.dropped.iter().position(|&(_, count)| count > 0) {
            let (stream, count) = self.dropped[index];
            let marker = ProcessEvent::Output {
                stream,
                lines: vec![format!(
                    "…[dropped {count} lines: the session was not taking output]"
                )],
            };
            if self.sink.deliver(marker).is_err() {
                self.refused = true;
                return;
            }
            self.dropped[index].1 = 0;
        }
        while let Some(event) = self.backlog.pop_front() {
            self.account(&event, false);
            if !self.send(event) {
                return;
            }
        }
    }

    /// Offers `event` to the sink; false (and the event is at the front of the backlog) if
    /// it was refused.
    fn send(&mut self, event: ProcessEvent) -> bool {
        let exit = matches!(event, ProcessEvent::Exited(_));
        match self.sink.deliver(event) {
            Ok(()) => {
                self.exit_delivered |= exit;
                true
            }
            Err(event) => {
                self.refused = true;
                self.account(&event, true);
                self.backlog.push_front(event);
                false
            }
        }
    }

    fn keep(&mut self, event: ProcessEvent) {
        self.account(&event, true);
        self.backlog.push_back(event);
        self.trim();
    }

    fn account(&mut self, event: &ProcessEvent, add: bool) {
        if let ProcessEvent::Output { lines, .. } = event {
            let bytes: usize = lines.iter().map(String::len).sum();
            if add {
                self.backlog_lines += lines.len();
                self.backlog_bytes += bytes;
            } else {
                self.backlog_lines -= lines.len();
                self.backlog_bytes -= bytes;
            }
        }
    }

    fn over(&self) -> bool {
        self.backlog_lines > self.limits.lines || self.backlog_bytes > self.limits.bytes
    }

    /// Drops the oldest output lines until the backlog is within its limits. The exit is
    /// always the last event, so it is never at the front while output is over the limits.
    fn trim(&mut self) {
        while self.over() {
            let Some(ProcessEvent::Output { stream, lines }) = self.backlog.front_mut() else {
                return;
            };
            let stream = *stream;
            let excess_lines = self.backlog_lines.saturating_sub(self.limits.lines);
            let mut count = 0;
            let mut freed = 0;
            while count < lines.len()
                && (count < excess_lines || self.backlog_bytes - freed > self.limits.bytes)
            {
                freed += lines[count].len();
                count += 1;
            }
            lines.drain(..count);
            if lines.is_empty() {
                self.backlog.pop_front();
            }
            self.backlog_lines -= count;
            self.backlog_bytes -= freed;
            match self.dropped.iter_mut().find(|(s, _)| *s == stream) {
                Some((_, dropped)) => *dropped += count as u64,
                None => self.dropped.push((stream, count as u64)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use troupe_actors::session::ExitStatus;

    use super::*;

    /// Takes `accept` events, then refuses everything; records what it took.
    struct Sink {
        accept: Mutex<usize>,
        taken: Mutex<Vec<ProcessEvent>>,
    }

    impl Sink {
        fn new(accept: usize) -> Arc<Self> {
            Arc::new(Self {
                accept: Mutex::new(accept),
                taken: Mutex::new(Vec::new()),
            })
        }

        fn taken(&self) -> Vec<ProcessEvent> {
            self.taken.lock().unwrap().clone()
        }
    }

    impl ProcessSink for Sink {
        fn deliver(&self, event: ProcessEvent) -> Result<(), ProcessEvent> {
            let mut accept = self.accept.lock().unwrap();
            if *accept == 0 {
                return Err(event);
            }
            *accept -= 1;
            self.taken.lock().unwrap().push(event);
            Ok(())
        }
    }

    fn out(lines: &[&str]) -> ProcessEvent {
        ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    const EXIT: ProcessEvent = ProcessEvent::Exited(ExitStatus {
        code: Some(0),
        signal: None,
    });

    const ROOMY: BacklogLimits = BacklogLimits {
        lines: 100,
        bytes: 1000,
    };

    #[test]
    fn after_a_refusal_everything_waits_for_the_next_sink() {
        let first = Sink::new(1);
        let mut delivery = Delivery::new(first.clone(), ROOMY);
        delivery.push(out(&["a"]));
        delivery.push(out(&["b"]));
        // The first sink would take "c", but "b" is waiting: order first.
        *first.accept.lock().unwrap() = 10;
        delivery.push(out(&["c"]));
        delivery.push(EXIT);
        assert!(delivery.exit_emitted() && !delivery.exit_delivered());
        assert_eq!(first.taken(), [out(&["a"])]);

        // A second sink that takes one event, then refuses.
        let second = Sink::new(1);
        delivery.reattach(second.clone());
        assert_eq!(second.taken(), [out(&["b"])]);
        assert!(!delivery.exit_delivered());

        let third = Sink::new(10);
        delivery.reattach(third.clone());
        assert_eq!(third.taken(), [out(&["c"]), EXIT]);
        assert!(delivery.exit_delivered());
    }

    #[test]
    fn the_backlog_drops_the_oldest_lines_and_keeps_the_exit() {
        let limits = BacklogLimits {
            lines: 5,
            bytes: 1000,
        };
        let mut delivery = Delivery::new(Sink::new(0), limits);
        for batch in 0..4 {
            let lines: Vec<String> = (0..3).map(|i| format!("{}", batch * 3 + i)).collect();
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            delivery.push(out(&lines));
        }
        delivery.push(EXIT);
        assert_eq!(delivery.backlog_lines, 5);
        let sink = Sink::new(100);
        delivery.reattach(sink.clone());
        let marker = ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: vec!["…[dropped 7 lines: the session was not taking output]".into()],
        };
        assert_eq!(
            sink.taken(),
            [marker, out(&["7", "8"]), out(&["9", "10", "11"]), EXIT]
        );
        assert!(delivery.exit_delivered());
        assert_eq!((delivery.backlog_lines, delivery.backlog_bytes), (0, 0));
    }

    #[test]
    fn the_backlog_is_bounded_in_bytes_too() {
        let limits = BacklogLimits {
            lines: 100,
            bytes: 10,
        };
        let mut delivery = Delivery::new(Sink::new(0), limits);
        delivery.push(out(&["aaaa", "bbbb"]));
        delivery.push(out(&["cccc"]));
        assert_eq!(delivery.backlog_bytes, 8);
        delivery.push(out(&["dddd"]));
        assert_eq!((delivery.backlog_lines, delivery.backlog_bytes), (2, 8));
        let sink = Sink::new(100);
        delivery.reattach(sink.clone());
        assert_eq!(sink.taken()[1..], [out(&["cccc"]), out(&["dddd"])]);
    }
}
