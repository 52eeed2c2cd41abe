//! What every session actor shares: its ports, settings, counters, and how a spec becomes a
//! command line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use super::actor::SessionMsg;
use super::ports::{
    CommandLine, ExitStatus, ProcessEvent, ProcessRunner, ProcessSink, SessionStore,
};
use super::spec::SessionRecord;
use super::state::SessionState;
use crate::event::{EventBus, OutputStream};
use crate::health::Health;
use crate::ids::NodeId;
use crate::kernel::{ActorHandle, SendError};
use crate::registry::Registry;

/// Session tuning (from the `[sessions]` configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    /// Sessions running at once.
    pub max_concurrent: usize,
    /// Sessions waiting for a slot.
    pub queue_capacity: usize,
    /// `session.long_running` after this, and again at each multiple.
    pub long_running_after: Duration,
    /// Timeout of sessions that set none.
    pub default_timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Lines per `session.output` event; more in one batch are counted as skipped (they are in
    /// the session's log).
    pub lines_per_event: usize,
    /// `session.output` events per second of one session, at most (and its burst): past that,
    /// output is coalesced into one held event whose `skipped` counts the lines it does not
    /// carry (they are in the log). See `session/flood.rs`.
    pub output_events_per_sec: u32,
    /// What a refused submission is told to wait.
    pub retry_after_when_full: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            queue_capacity: 1024,
            long_running_after: Duration::from_secs(60),
            default_timeout: Duration::from_secs(3600),
            kill_grace: Duration::from_secs(5),
            lines_per_event: 64,
            output_events_per_sec: 20,
            retry_after_when_full: Duration::from_secs(5),
        }
    }
}

/// Turns a session's spec into the command to run (the Aider preset lives behind this, with the
/// node's gateway settings).
pub trait CommandBuilder: Send + Sync + 'static {
    /// The command for `record`, or why there is none.
    fn command(&self, record: &SessionRecord) -> Result<CommandLine, String>;

    /// What reads the session's output for signals and decides its outcome (Aider), if anything.
    fn interpreter(&self, record: &SessionRecord) -> Option<Box<dyn OutputInterpreter>> {
        let _ = record;
        None
    }
}

/// Something an interpreter recognised in a session's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSignal {
    /// The agent hit a provider's rate limit.
    RateLimited {
        /// The provider, when the output names one.
        provider: Option<String>,
        /// When the agent says it retries.
        retry_in: Option<Duration>,
        /// The line that said so.
        line: String,
    },
}

/// Reads a session's output as it arrives and, at the end, decides its outcome.
///
/// An interpreter lives in one SessionActor instance: after a restart of the actor, a new one
/// sees only the lines printed from then on.
pub trait OutputInterpreter: Send + 'static {
    /// One line of output.
    fn feed(&mut self, stream: OutputStream, line: &str) -> Vec<OutputSignal>;

    /// The process ended: anything held back.
    fn finish(&mut self) -> Vec<OutputSignal> {
        Vec::new()
    }

    /// The outcome of the run: `Some(Ok)` succeeded, `Some(Err(reason))` failed, `None` by the
    /// exit code.
    fn outcome(&self, exit: &ExitStatus) -> Option<Result<(), String>>;
}

/// Session counters for `/metrics` and health. Written by session actors and the manager.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Sessions accepted.
    pub submitted: AtomicU64,
    /// Submissions refused because the queue was full.
    pub refused: AtomicU64,
    /// Sessions whose process started.
    pub started: AtomicU64,
    /// Sessions ended, per terminal state (indexed like [`SessionState::ALL`]).
    pub ended: [AtomicU64; 8],
    /// Sessions running now.
    pub running: AtomicU64,
    /// Sessions queued now.
    pub queued: AtomicU64,
    /// Sum of run durations of ended sessions, in milliseconds.
    pub duration_ms_sum: AtomicU64,
    /// Run durations of ended sessions: counts per bucket of [`DURATION_BUCKETS_SECS`] (the
    /// last is +Inf).
    pub duration_buckets: [AtomicU64; 9],
}

/// Upper bounds of the run-duration histogram, in seconds.
pub const DURATION_BUCKETS_SECS: [f64; 8] = [0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0];

impl SessionStats {
    /// Records a session that ended in `state` after `duration`.
    pub fn record_end(&self, state: SessionState, duration: Duration) {
        if let Some(index) = SessionState::ALL.iter().position(|s| *s == state) {
            self.ended[index].fetch_add(1, Ordering::Relaxed);
        }
        self.duration_ms_sum
            .fetch_add(duration.as_millis() as u64, Ordering::Relaxed);
        let secs = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS_SECS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(DURATION_BUCKETS_SECS.len());
        self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything session actors share.
#[derive(Clone)]
pub struct SessionContext {
    /// This node.
    pub node: NodeId,
    /// Starts and stops processes.
    pub runner: Arc<dyn ProcessRunner>,
    /// Runs chat sessions; `None` on a node without providers.
    pub chats: Option<Arc<dyn super::ChatRunner>>,
    /// Persists sessions.
    pub store: Arc<dyn SessionStore>,
    /// Spec → command line.
    pub commands: Arc<dyn CommandBuilder>,
    /// Where session events go.
    pub events: EventBus,
    /// Where session counts are reported.
    pub health: Health,
    /// Where sessions are told to be (this node) and gone.
    pub registry: Registry,
    /// Tuning.
    pub settings: SessionSettings,
    /// Counters.
    pub stats: Arc<SessionStats>,
}

/// Output a session's sink lets be on its way to the session's actor (delivered, not yet
/// handled) before [`ProcessSink::ready`] holds the runner back.
pub(crate) const OUTPUT_IN_FLIGHT_BYTES: usize = 1 << 20;

/// A session's process events go to its restart-surviving handle. Output counts against the
/// sink's budget from its delivery until the actor is done with it, so a session busy in a
/// slow write holds its process back instead of growing its mailbox without bound.
pub(crate) struct HandleSink {
    handle: ActorHandle<SessionMsg>,
    budget: Arc<OutputBudget>,
}

impl HandleSink {
    pub(crate) fn new(handle: ActorHandle<SessionMsg>) -> Self {
        Self {
            handle,
            budget: Arc::new(OutputBudget {
                in_flight: AtomicUsize::new(0),
                room: Notify::new(),
            }),
        }
    }
}

impl ProcessSink for HandleSink {
    fn deliver(&self, event: ProcessEvent) -> Result<(), ProcessEvent> {
        let credit = OutputCredit::take(&self.budget, &event);
        self.handle
            .cast(SessionMsg::Process(event, credit))
            .map_err(|error: SendError<SessionMsg>| match error.into_message() {
                SessionMsg::Process(event, _credit) => event,
                _ => unreachable!("the message sent was a process event"),
            })
    }

    fn ready(&self) -> BoxFuture<'static, ()> {
        if self.budget.has_room() {
            return Box::pin(std::future::ready(()));
        }
        let budget = self.budget.clone();
        Box::pin(async move {
            loop {
                let room = budget.room.notified();
                tokio::pin!(room);
                // Registered before the check, so a credit returned in between still wakes it.
                room.as_mut().enable();
                if budget.has_room() {
                    return;
                }
                room.await;
            }
        })
    }
}

/// The output bytes a sink has on their way to its actor.
struct OutputBudget {
    in_flight: AtomicUsize,
    room: Notify,
}

impl OutputBudget {
    fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) < OUTPUT_IN_FLIGHT_BYTES
    }
}

/// What one delivered process event counts against its sink's output budget, given back when
/// this is dropped: once the session's actor handled the event, or with a mailbox that was
/// dropped, so a credit can never leak.
pub struct OutputCredit {
    budget: Option<Arc<OutputBudget>>,
    bytes: usize,
}

impl OutputCredit {
    fn take(budget: &Arc<OutputBudget>, event: &ProcessEvent) -> Self {
        let ProcessEvent::Output { lines, .. } = event else {
            return Self {
                budget: None,
                bytes: 0,
            };
        };
        let bytes = lines
            .iter()
            .map(|line| line.len() + std::mem::size_of::<String>())
            .sum();
        budget.in_flight.fetch_add(bytes, Ordering::AcqRel);
        Self {
            budget: Some(budget.clone()),
            bytes,
        }
    }
}

impl Drop for OutputCredit {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            let before = budget.in_flight.fetch_sub(self.bytes, Ordering::AcqRel);
            if before >= OUTPUT_IN_FLIGHT_BYTES && before - self.bytes < OUTPUT_IN_FLIGHT_BYTES {
                budget.room.notify_waiters();
            }
        }
    }
}

impl std::fmt::Debug for OutputCredit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputCredit")
            .field("bytes", &self.bytes)
            .finish()
    }
}
