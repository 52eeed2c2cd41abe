//! The I/O a session needs, as traits the node implements: a process runner and a session store.
//! Tests and host applications can plug their own.
//!
//! Processes are owned by the runner, not by the SessionActor: a SessionActor that crashes
//! leaves its process running, and the runner keeps delivering the process's output and exit
//! status to the session's sink (its restart-surviving handle), so the next instance picks up
//! exactly where the last one stopped. If the sink is gone for good, the runner keeps the
//! undelivered events until a new sink is attached with [`ProcessRunner::reattach`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::spec::{ProcessInfo, SessionRecord, Transition};
use super::state::SessionState;
use crate::event::OutputStream;
use crate::ids::SessionId;

/// A program to run, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLine {
    /// Program name or path.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment entries set on top of the node's environment.
    pub env: BTreeMap<String, String>,
    /// Environment variables removed from the node's environment.
    pub env_remove: Vec<String>,
    /// Working directory (already checked against the workspace roots).
    pub workdir: PathBuf,
}

/// How the runner treats output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Longer lines are cut, with a marker saying how much was cut.
    pub max_line_bytes: usize,
    /// Lines per delivered batch, at most.
    pub max_batch_lines: usize,
    /// A batch is delivered at the latest this long after its first line.
    pub batch_window: Duration,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            max_line_bytes: 16 * 1024,
            max_batch_lines: 256,
            batch_window: Duration::from_millis(20),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when one ended it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// What a runner tells a session about its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Lines printed (a batch: output floods are coalesced).
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The lines, lossily decoded as UTF-8, without line endings, each within the cap.
        lines: Vec<String>,
    },
    /// The process exited and both streams are drained: no output follows.
    Exited(ExitStatus),
}

/// Where a runner delivers a session's process events.
pub trait ProcessSink: Send + Sync + 'static {
    /// Delivers an event; gives it back when the session cannot take events any more.
    fn deliver(&self, event: ProcessEvent) -> Result<(), ProcessEvent>;

    /// Resolves once the sink has room for more output. A runner waits for it before it reads
    /// more of a process's output, so a session that is busy (in a slow store write, say) holds
    /// its process back through the pipe instead of queueing its output without bound.
    /// Delivering never waits: an event delivered while there is no room is still taken.
    /// The default has room at all times.
    fn ready(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Why a process did not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerError {
    /// The program is not found or not executable.
    #[error("cannot run {program:?}: {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS's answer.
        reason: String,
    },
    /// The session already has a process.
    #[error("session {0} already has a process")]
    AlreadyRunning(SessionId),
}

/// A process group left over from before a restart of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftoverGroup {
    /// The group.
    pub pgid: i32,
    /// Start time of its leader, when known.
    pub start_ticks: Option<u64>,
}

/// A session that was running when the node stopped: whatever of it is still alive must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The session (its processes carry it in their environment, see
    /// [`SESSION_ID_ENV`](super::SESSION_ID_ENV)).
    pub session: SessionId,
    /// Its process group, when the node recorded it before it stopped.
    pub group: Option<LeftoverGroup>,
}

/// Starts and stops session processes.
pub trait ProcessRunner: Send + Sync + 'static {
    /// Starts `command` for `session` in its own process group with stdin closed; its events go
    /// to `sink`.
    fn start(
        &self,
        session: &SessionId,
        command: &CommandLine,
        sink: Arc<dyn ProcessSink>,
    ) -> Result<ProcessInfo, RunnerError>;

    /// Points a running (or exited but undelivered) process's events at a new sink; events the
    /// old sink refused are delivered first. `None` if the runner does not know the session.
    fn reattach(&self, session: &SessionId, sink: Arc<dyn ProcessSink>) -> Option<ProcessInfo>;

    /// Sends SIGTERM to the session's process group, then SIGKILL to it after `grace` if
    /// anything in it is still alive. False if the runner does not know the session or its
    /// process already exited.
    fn terminate(&self, session: &SessionId, grace: Duration) -> bool;

    /// Kills what is left of sessions that were running before a node restart (SIGTERM, then
    /// SIGKILL after `grace`): their recorded process groups, skipping groups whose members
    /// cannot belong to the recorded leader, and the groups of any process that still carries
    /// one of their session ids (which also finds a session whose group was never recorded, and
    /// processes that left its group). Returns the groups it signalled.
    fn kill_leftovers(&self, leftovers: &[Leftover], grace: Duration) -> Vec<i32>;
}

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The transition does not match the stored state (someone else changed it).
    #[error("session {id} is {actual}, not {expected}")]
    Conflict {
        /// The session.
        id: SessionId,
        /// The state the caller expected.
        expected: SessionState,
        /// The stored state.
        actual: SessionState,
    },
    /// No such session.
    #[error("no session {0}")]
    NotFound(SessionId),
    /// A session with this id, or holding this idempotency key, already exists (its id).
    #[error("session {0} already exists (same id or same idempotency key)")]
    Exists(SessionId),
    /// The request itself is wrong: a transition the state machine refuses, a record that does
    /// not match its transition, a cursor the store never handed out. A bug in the caller or a
    /// bad client input, never a storage failure.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The storage itself failed.
    #[error("storage failure: {0}")]
    Io(String),
    /// Another process holds the store: its data directory is in use (by another node, or one
    /// that is starting or stopping).
    #[error("{0}")]
    InUse(String),
}

/// One line of a session's stored output log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedLine {
    /// Its number, from 1.
    pub line: u64,
    /// Which stream printed it.
    pub stream: OutputStream,
    /// The text.
    pub text: String,
}

/// Persistence of sessions. Writes resolve once they are durable.
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session (durable when it resolves); fails with [`StoreError::Exists`] when
    /// the id, or the spec's idempotency key, is already taken.
    fn create(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Stores a transition and the record after it, atomically; fails with
    /// [`StoreError::Conflict`] when the stored state is not `transition.from`, and with
    /// [`StoreError::Invalid`] when the state machine refuses `from → to`.
    fn transition(
        &self,
        record: SessionRecord,
        transition: Transition,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Replaces the record of a session whose stored state is `record.state` and not terminal,
    /// without a transition (durable when it resolves): for what must outlive the session's
    /// actor between transitions, such as a stop request. Fails with [`StoreError::Conflict`]
    /// when the stored state is another one.
    fn update(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Appends output lines to the session's log (batched, not awaited; the log is capped and
    /// lines past the cap are counted, not stored).
    fn append_output(
        &self,
        id: &SessionId,
        stream: OutputStream,
        first_line: u64,
        lines: &[String],
    );

    /// How many output lines the session has appended so far, counting every append made
    /// before this call (it waits for queued appends to be written). A restarted session actor
    /// numbers its next lines after these, so nothing is taken for a redelivery.
    fn output_lines(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>>;

    /// Stored output lines numbered after `after`, at most `limit`, in order (lines past the
    /// log's cap were never stored and are not returned).
    fn read_output(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<LoggedLine>, StoreError>>;

    /// The session with this idempotency key, if any.
    fn find_by_key(
        &self,
        key: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>>;

    /// One session.
    fn get(&self, id: &SessionId) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>>;

    /// Sessions that were not finished when the node last stopped, oldest first.
    fn unfinished(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>>;
}
