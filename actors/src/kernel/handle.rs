//! Handles that survive restarts.
//!
//! An [`ActorHandle`] names a supervised child, not one incarnation of it. The supervisor binds
//! each new instance to the same handle, so callers keep one handle for the life of the node.
//!
//! Delivery contract (see docs/ARCHITECTURE.md, "Runtime guarantees"):
//! - A message sent through a handle is processed by some instance, or comes back to the sender
//!   inside a [`SendError`], or — when a cast was accepted and the actor then stopped for good —
//!   is counted as a dead letter and logged. Nothing disappears without a trace.
//! - A child restarted in place keeps its mailbox: queued messages stay where they are and per-
//!   sender order is strict.
//! - When an instance is respawned instead, messages queued in its mailbox are handed back
//!   (each one travels in an [`Envelope`] whose `Drop` returns it) and redelivered to the next
//!   instance, ahead of newer messages and in the order they were sent. One exception to the
//!   order: a send that raced with the crash (admitted by the dying mailbox just before it
//!   closed) may reach the next instance after messages sent later; it is never lost.
//! - Either way, the message that was being handled when the instance failed is consumed: a
//!   poison message is never redelivered.
//! - While a child restarts, messages wait in a bounded buffer; past its capacity the sender gets
//!   its message back ([`SendErrorKind::RestartBacklogFull`]).
//!
//! The fast path (a running instance) is one lock-free load and one mailbox send; the slow path
//! (restarting, or a dead instance not yet noticed) takes a short lock that also serialises
//! rebinding, which is what keeps per-sender order across a restart.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ractor::{ActorCell, ActorRef, MessagingErr, RpcReplyPort};
use tokio::sync::{mpsc, watch};

use super::stats::ActorStats;
use crate::ids::ActorPath;

/// How many messages a handle buffers while its actor restarts, unless configured otherwise.
pub const DEFAULT_RESTART_BACKLOG: usize = 10_000;

/// A fault that the fault-injection API can make an actor suffer inside its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Panic inside the handler.
    Panic,
    /// Return an error from the handler.
    Error,
}

/// What a mailbox carries: a user message, or a control instruction from the kernel.
pub(crate) enum Payload<M> {
    Message(M),
    Fault(FaultKind),
    /// The supervisor stops the instance: everything queued before this is handled, then the
    /// kernel's mailbox loop ends and ractor's drain stops the actor.
    Drain,
}

/// What ractor's own mailbox of a hosted actor carries.
pub(crate) enum HostMsg<M: Send + 'static> {
    /// A message for an actor that takes its messages through ractor's mailbox.
    Deliver(Envelope<M>),
    /// Starts the loop over the kernel's own mailbox, which it carries (sent once, in
    /// `pre_start`; handled after `post_start`). Dropped unhandled with ractor's ports, it
    /// closes that mailbox.
    Pump(mpsc::UnboundedReceiver<Envelope<M>>),
}

/// Where a handle delivers: one running instance's mailbox.
///
/// Supervised workers take their messages from the kernel's own channel (`pump`), read by one
/// long-running handler, which skips ractor's per-message work (a boxed message, a four-port
/// select, a second select against kill signals); ractor's own ports still carry stop, drain,
/// kill and supervision. Supervisors (which must see supervision events between messages) and
/// unsupervised actors (whose `ActorCell::stop` callers expect ractor's semantics) take their
/// messages through ractor's mailbox.
pub(crate) struct Mailbox<M: Send + 'static> {
    actor: ActorRef<HostMsg<M>>,
    pump: Option<mpsc::UnboundedSender<Envelope<M>>>,
}

impl<M: Send + 'static> Mailbox<M> {
    pub(crate) fn new(
        actor: ActorRef<HostMsg<M>>,
        pump: Option<mpsc::UnboundedSender<Envelope<M>>>,
    ) -> Self {
        Self { actor, pump }
    }

    /// Queues `envelope`; a closed mailbox gives it back (`None`: ractor refused it for a reason
    /// that does not return the message, which a typed reference cannot hit).
    pub(crate) fn send(&self, envelope: Envelope<M>) -> Result<(), Option<Envelope<M>>> {
        match &self.pump {
            Some(pump) => pump.send(envelope).map_err(|refused| Some(refused.0)),
            None => {
                self.actor
                    .send_message(HostMsg::Deliver(envelope))
                    .map_err(|error| match error {
                        MessagingErr::SendErr(HostMsg::Deliver(envelope)) => Some(envelope),
                        _ => None,
                    })
            }
        }
    }

    /// The ractor actor behind the mailbox.
    pub(crate) fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }
}

/// A message in a mailbox. If the mailbox is dropped with the envelope unopened (the instance
/// crashed or was stopped), a message sent through a handle goes back to that handle for
/// redelivery, and a self-send is counted as discarded.
pub struct Envelope<M: Send + 'static> {
    payload: Option<Payload<M>>,
    seq: u64,
    origin: Origin<M>,
}

/// Where an envelope came from, which decides what happens to it when it is not delivered.
enum Origin<M: Send + 'static> {
    /// Sent through a handle: handed back to it when the mailbox is dropped.
    Handle(Arc<HandleShared<M>>),
    /// A self-send (or timer) of one incarnation of the actor: it never reaches a later
    /// incarnation, and is counted as discarded when it is not handled.
    Incarnation { number: u64, stats: Arc<ActorStats> },
    /// A kernel instruction (a fault), or an envelope whose message was taken back.
    Control,
}

impl<M: Send + 'static> Envelope<M> {
    fn tracked(seq: u64, message: M, returns: Arc<HandleShared<M>>) -> Self {
        Self {
            payload: Some(Payload::Message(message)),
            seq,
            origin: Origin::Handle(returns),
        }
    }

    /// A self-send of incarnation `number`: discarded (and counted in `stats`) if the
    /// incarnation is gone before it is handled.
    pub(crate) fn for_incarnation(number: u64, message: M, stats: Arc<ActorStats>) -> Self {
        Self {
            payload: Some(Payload::Message(message)),
            seq: 0,
            origin: Origin::Incarnation { number, stats },
        }
    }

    fn fault(kind: FaultKind) -> Self {
        Self {
            payload: Some(Payload::Fault(kind)),
            seq: 0,
            origin: Origin::Control,
        }
    }

    pub(crate) fn drain() -> Self {
        Self {
            payload: Some(Payload::Drain),
            seq: 0,
            origin: Origin::Control,
        }
    }

    /// The incarnation a self-send belongs to (`None` for messages sent through a handle).
    pub(crate) fn incarnation(&self) -> Option<u64> {
        match &self.origin {
            Origin::Incarnation { number, .. } => Some(*number),
            _ => None,
        }
    }

    /// Takes the payload out; the envelope will no longer return anything when dropped.
    pub(crate) fn open(mut self) -> Payload<M> {
        self.payload
            .take()
            .expect("an envelope is opened exactly once")
    }

    /// Takes the user message back without triggering redelivery.
    fn disarm(mut self) -> Option<M> {
        self.origin = Origin::Control;
        match self.payload.take() {
            Some(Payload::Message(message)) => Some(message),
            _ => None,
        }
    }
}

impl<M: Send + 'static> Drop for Envelope<M> {
    fn drop(&mut self) {
        let Some(Payload::Message(message)) = self.payload.take() else {
            return;
        };
        match std::mem::replace(&mut self.origin, Origin::Control) {
            Origin::Handle(returns) => returns.returned(self.seq, message),
            Origin::Incarnation { stats, .. } => {
                stats.discarded.fetch_add(1, Ordering::Relaxed);
            }
            Origin::Control => {}
        }
    }
}

/// The lifecycle of the child a handle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandleStatus {
    /// Not started yet; messages are buffered.
    Starting,
    /// An instance is running.
    Running {
        /// Incarnation number, 1 for the first instance.
        generation: u64,
    },
    /// The instance died and the supervisor will start another; messages are buffered.
    Restarting,
    /// Stopped for good; sends fail.
    Stopped,
}

impl HandleStatus {
    /// True while an instance is running.
    pub fn is_running(self) -> bool {
        matches!(self, Self::Running { .. })
    }
}

/// Why a send through a handle failed. The message is inside the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendErrorKind {
    /// The actor stopped for good and will not be restarted.
    Stopped,
    /// The actor is restarting and its buffer for waiting messages is full.
    RestartBacklogFull,
}

/// A message that could not be delivered, handed back to its sender.
pub struct SendError<M> {
    /// Why it was refused.
    pub kind: SendErrorKind,
    /// The actor it was addressed to.
    pub path: ActorPath,
    message: M,
}

impl<M> SendError<M> {
    /// Takes the undelivered message back.
    pub fn into_message(self) -> M {
        self.message
    }
}

impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SendErrorKind::Stopped => write!(f, "actor {} has stopped", self.path),
            SendErrorKind::RestartBacklogFull => write!(
                f,
                "actor {} is restarting and its backlog is full; retry later",
                self.path
            ),
        }
    }
}

impl<M> std::error::Error for SendError<M> {}

/// Why a request/reply call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The actor stopped for good; the request was not delivered.
    #[error("actor {path} has stopped")]
    Stopped {
        /// The addressed actor.
        path: ActorPath,
    },
    /// The actor is restarting and cannot buffer more requests; the request was not delivered.
    #[error("actor {path} is restarting and its backlog is full; retry later")]
    Backlogged {
        /// The addressed actor.
        path: ActorPath,
    },
    /// The request was delivered but the instance handling it stopped or crashed before it
    /// answered.
    #[error("actor {path} stopped before answering")]
    NoReply {
        /// The addressed actor.
        path: ActorPath,
    },
    /// No answer within the deadline.
    #[error("actor {path} did not answer within {after:?}")]
    Timeout {
        /// The addressed actor.
        path: ActorPath,
        /// The deadline that passed.
        after: Duration,
    },
}

struct Slot<M: Send + 'static> {
    status: HandleStatus,
    /// Number of instances bound so far.
    generation: u64,
    instance: Option<Arc<Mailbox<M>>>,
    /// Messages waiting for the next instance, with their send sequence numbers.
    pending: Vec<(u64, M)>,
}

pub(crate) struct HandleShared<M: Send + 'static> {
    path: ActorPath,
    /// The running instance, for the lock-free fast path. Only changed under `slot`'s lock.
    current: ArcSwapOption<Mailbox<M>>,
    next_seq: AtomicU64,
    slot: Mutex<Slot<M>>,
    status_tx: watch::Sender<HandleStatus>,
    stats: Arc<ActorStats>,
    backlog_capacity: usize,
}

impl<M: Send + 'static> HandleShared<M> {
    /// Locks the slot. Never drop an instance reference while holding this lock: the last
    /// reference to a dead mailbox drops the envelopes still in it (a send that raced with the
    /// crash can land after the mailbox was drained), each envelope's `Drop` calls
    /// [`HandleShared::returned`], which takes this lock, and a std mutex taken twice on one
    /// thread deadlocks it. Take the reference out, release the lock, then drop it.
    fn lock(&self) -> MutexGuard<'_, Slot<M>> {
        // A panic while holding this lock can only come from a bug in this module; the slot's
        // data stays consistent at every await-free step, so poisoning is safe to ignore.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called from an envelope's `Drop` when its mailbox was dropped before it was opened.
    ///
    /// Usually this happens while the actor restarts, and the message waits for the next
    /// instance in send order. A send that raced with the crash can be released later: the
    /// sender passed the closed mailbox's admission check just before it closed, and its message
    /// is dropped only with the old mailbox's last reference, possibly after the next instance
    /// is bound. Such a late message goes to the running instance right away (after messages
    /// sent later: the one exception to per-sender order), never into a buffer that only the
    /// next restart would flush.
    pub(crate) fn returned(self: &Arc<Self>, seq: u64, message: M) {
        let mut slot = self.lock();
        match (slot.status, &slot.instance) {
            (HandleStatus::Stopped, _) => {
                drop(slot);
                self.dead_letter(1);
            }
            (HandleStatus::Running { .. }, Some(instance)) if slot.pending.is_empty() => {
                if let Err(refused) = instance.send(Envelope::tracked(seq, message, self.clone()))
                    && let Some(message) = recover(refused)
                {
                    slot.pending.push((seq, message));
                }
            }
            _ => slot.pending.push((seq, message)),
        }
    }

    fn dead_letter(&self, count: u64) {
        self.stats.dead_letters.fetch_add(count, Ordering::Relaxed);
        tracing::warn!(
            actor = %self.path,
            count,
            "messages dropped: the actor stopped for good before handling them"
        );
    }
}

/// A restart-surviving address of a supervised actor. Cheap to clone.
pub struct ActorHandle<M: Send + 'static> {
    shared: Arc<HandleShared<M>>,
}

impl<M: Send + 'static> Clone for ActorHandle<M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: Send + 'static> fmt::Debug for ActorHandle<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorHandle")
            .field("path", &self.shared.path)
            .field("status", &self.status())
            .finish()
    }
}

impl<M: Send + 'static> ActorHandle<M> {
    /// A handle for a child that is not started yet. Messages sent now are buffered until the
    /// supervisor starts the first instance.
    pub fn new(path: ActorPath) -> Self {
        Self::with_backlog(path, DEFAULT_RESTART_BACKLOG)
    }

    /// Like [`ActorHandle::new`], with a custom restart backlog capacity.
    pub fn with_backlog(path: ActorPath, backlog_capacity: usize) -> Self {
        let (status_tx, _) = watch::channel(HandleStatus::Starting);
        Self {
            shared: Arc::new(HandleShared {
                path,
                current: ArcSwapOption::empty(),
                next_seq: AtomicU64::new(1),
                slot: Mutex::new(Slot {
                    status: HandleStatus::Starting,
                    generation: 0,
                    instance: None,
                    pending: Vec::new(),
                }),
                status_tx,
                stats: Arc::new(ActorStats::default()),
                backlog_capacity,
            }),
        }
    }

    /// The actor's path in the tree.
    pub fn path(&self) -> &ActorPath {
        &self.shared.path
    }

    /// The child's current lifecycle status.
    pub fn status(&self) -> HandleStatus {
        *self.shared.status_tx.borrow()
    }

    /// Watches status changes (restarts, stops).
    pub fn watch_status(&self) -> watch::Receiver<HandleStatus> {
        self.shared.status_tx.subscribe()
    }

    /// Counters of this actor: messages, processing time, restarts, dead letters.
    pub fn stats(&self) -> &Arc<ActorStats> {
        &self.shared.stats
    }

    /// Sends a message without waiting for it to be handled. Never blocks.
    pub fn cast(&self, message: M) -> Result<(), SendError<M>> {
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let message = match self.shared.current.load().as_deref() {
            Some(instance) => {
                match instance.send(Envelope::tracked(seq, message, self.shared.clone())) {
                    Ok(()) => {
                        self.shared.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(refused) => match recover(refused) {
                        Some(message) => message,
                        // ractor only returns the message inside `SendErr`; the other variants
                        // cannot occur for a typed ref. Should one ever occur, it is counted
                        // and logged rather than lost silently.
                        None => {
                            self.shared.dead_letter(1);
                            return Ok(());
                        }
                    },
                }
            }
            None => message,
        };
        self.cast_slow(seq, message)
    }

    fn cast_slow(&self, seq: u64, message: M) -> Result<(), SendError<M>> {
        let mut slot = self.shared.lock();
        let message = match (slot.status, &slot.instance) {
            (HandleStatus::Running { .. }, Some(instance)) if slot.pending.is_empty() => {
                match instance.send(Envelope::tracked(seq, message, self.shared.clone())) {
                    Ok(()) => {
                        self.shared.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(refused) => match recover(refused) {
                        Some(message) => message,
                        None => {
                            self.shared.dead_letter(1);
                            return Ok(());
                        }
                    },
                }
            }
            (HandleStatus::Stopped, _) => {
                return Err(SendError {
                    kind: SendErrorKind::Stopped,
                    path: self.shared.path.clone(),
                    message,
                });
            }
            _ => message,
        };
        // The instance is gone (or not started): wait for the next one, within bounds.
        if slot.pending.len() >= self.shared.backlog_capacity {
            return Err(SendError {
                kind: SendErrorKind::RestartBacklogFull,
                path: self.shared.path.clone(),
                message,
            });
        }
        slot.pending.push((seq, message));
        self.shared.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends a request built around a reply port and waits for the answer.
    pub async fn call<R, F>(&self, build: F, timeout: Duration) -> Result<R, CallError>
    where
        F: FnOnce(RpcReplyPort<R>) -> M,
        R: Send + 'static,
    {
        let (tx, mut rx) = ractor::concurrency::oneshot();
        if let Err(error) = self.cast(build(tx.into())) {
            let path = error.path.clone();
            return Err(match error.kind {
                SendErrorKind::Stopped => CallError::Stopped { path },
                SendErrorKind::RestartBacklogFull => CallError::Backlogged { path },
            });
        }
        // The deadline without a timer per call: see `deadline`.
        match super::deadline::within(timeout, &mut rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CallError::NoReply {
                path: self.shared.path.clone(),
            }),
            Err(_) => {
                // Closed before giving up: an answer sent from now on fails at its sender, who
                // may then undo what it did (a supervisor stops a child whose caller gave up),
                // and one that came in the meantime is taken rather than lost with its work.
                rx.close();
                rx.try_recv().map_err(|_| CallError::Timeout {
                    path: self.shared.path.clone(),
                    after: timeout,
                })
            }
        }
    }

    /// Makes the running instance suffer `kind` inside its handler, after the messages already
    /// queued. Returns false when no instance is running.
    pub fn inject_fault(&self, kind: FaultKind) -> bool {
        let slot = self.shared.lock();
        match (&slot.status, &slot.instance) {
            (HandleStatus::Running { .. }, Some(instance)) => {
                instance.send(Envelope::fault(kind)).is_ok()
            }
            _ => false,
        }
    }

    /// Binds a freshly started instance: buffered messages go to it first, in send order, and
    /// only then does the fast path see it. Called by the supervisor.
    pub(crate) fn bind(&self, instance: Mailbox<M>) {
        let instance = Arc::new(instance);
        let mut slot = self.shared.lock();
        let mut pending = std::mem::take(&mut slot.pending);
        pending.sort_by_key(|(seq, _)| *seq);
        let mut undelivered = Vec::new();
        for (seq, message) in pending {
            if !undelivered.is_empty() {
                undelivered.push((seq, message));
                continue;
            }
            if let Err(refused) =
                instance.send(Envelope::tracked(seq, message, self.shared.clone()))
                && let Some(message) = recover(refused)
            {
                // The new instance died already; keep the rest for the one after it.
                undelivered.push((seq, message));
            }
        }
        slot.pending = undelivered;
        slot.generation += 1;
        slot.status = HandleStatus::Running {
            generation: slot.generation,
        };
        let replaced = (
            slot.instance.replace(instance.clone()),
            self.shared.current.swap(Some(instance)),
        );
        self.shared.status_tx.send_replace(slot.status);
        drop(slot);
        drop(replaced);
    }

    /// Records that the running instance replaced its failed incarnation in place: the mailbox
    /// and the fast path stay as they are, only the generation moves on.
    pub(crate) fn rebind_in_place(&self) {
        let mut slot = self.shared.lock();
        if !slot.status.is_running() {
            return;
        }
        slot.generation += 1;
        slot.status = HandleStatus::Running {
            generation: slot.generation,
        };
        self.shared.status_tx.send_replace(slot.status);
    }

    /// Marks the child as restarting: new messages wait for the next instance.
    pub(crate) fn unbind(&self) {
        let mut slot = self.shared.lock();
        if slot.status == HandleStatus::Stopped {
            return;
        }
        slot.status = HandleStatus::Restarting;
        let released = (slot.instance.take(), self.shared.current.swap(None));
        self.shared.status_tx.send_replace(slot.status);
        drop(slot);
        drop(released);
    }

    /// Marks the child as stopped for good; waiting messages become dead letters (a request's
    /// caller sees [`CallError::NoReply`] because its reply port is dropped with it).
    pub(crate) fn stop_for_good(&self) {
        let mut slot = self.shared.lock();
        slot.status = HandleStatus::Stopped;
        let released = (slot.instance.take(), self.shared.current.swap(None));
        let dropped = std::mem::take(&mut slot.pending);
        self.shared.status_tx.send_replace(slot.status);
        drop(slot);
        drop(released);
        if !dropped.is_empty() {
            self.shared.dead_letter(dropped.len() as u64);
        }
    }

    /// Waits until an instance is running, or the child stops for good (then `false`).
    pub async fn wait_running(&self) -> bool {
        let mut status = self.watch_status();
        loop {
            match *status.borrow_and_update() {
                HandleStatus::Running { .. } => return true,
                HandleStatus::Stopped => return false,
                _ => {}
            }
            if status.changed().await.is_err() {
                return false;
            }
        }
    }

    /// The running instance's ractor cell, if any (for monitoring, or a kill). Stop a
    /// supervised actor through its supervisor or from inside ([`super::Context::stop`]): a
    /// supervised worker reads its messages from the kernel's mailbox in one handler that runs
    /// until the supervisor drains it or it stops itself, so ractor's `ActorCell::stop` and
    /// `drain` sent by anyone else do not reach it before then (a kill reaches it at once).
    pub fn instance(&self) -> Option<ActorCell> {
        self.shared.current.load().as_deref().map(Mailbox::cell)
    }
}

fn recover<M: Send + 'static>(refused: Option<Envelope<M>>) -> Option<M> {
    refused.and_then(Envelope::disarm)
}
