//! Per-actor counters, kept in atomics so `/metrics` and the HealthActor can read them without
//! asking the actor. Each counter has one writer: the handle and the instance's self-sends
//! (enqueued), the hosted actor (processed, busy time, discarded self-sends) or whoever restarts
//! it: the owning supervisor, or the instance itself when it restarts in place (restarts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A counter on its own cache line: senders bump `enqueued` on one core while the actor bumps
/// `processed` on another, and sharing a line would bounce it between them on every message.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct OwnLine(AtomicU64);

impl std::ops::Deref for OwnLine {
    type Target = AtomicU64;

    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

/// Counters of one supervised actor, across all its instances.
#[derive(Debug, Default)]
pub struct ActorStats {
    pub(crate) enqueued: OwnLine,
    pub(crate) processed: OwnLine,
    pub(crate) busy_nanos: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) discarded: AtomicU64,
}

/// A point-in-time copy of [`ActorStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActorStatsSnapshot {
    /// Messages accepted for this actor (sent through its handle).
    pub enqueued: u64,
    /// Messages its instances finished handling.
    pub processed: u64,
    /// Time spent inside handlers.
    pub busy: Duration,
    /// Times the supervisor restarted it.
    pub restarts: u64,
    /// Messages dropped because it stopped for good before handling them.
    pub dead_letters: u64,
    /// Self-sends and timer messages of an instance that ended before handling them.
    pub discarded: u64,
}

impl ActorStatsSnapshot {
    /// Messages accepted but not yet handled (approximate: counters are read one by one).
    /// A message whose handler panicked counts as handled; a self-send that its instance never
    /// handled counts as discarded. Neither stays in the depth.
    pub fn mailbox_depth(&self) -> u64 {
        self.enqueued
            .saturating_sub(self.processed)
            .saturating_sub(self.discarded)
    }
}

impl ActorStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> ActorStatsSnapshot {
        ActorStatsSnapshot {
            enqueued: self.enqueued.load(Ordering::Relaxed),
            processed: self.processed.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed)),
            restarts: self.restarts.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn record_busy(&self, busy: Duration) {
        self.busy_nanos
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }
}
