//! The node's directory of supervised actors: path → status, counters and fault injection.
//!
//! It is a read-side cache: each entry is written only by the supervisor that owns that child
//! (when the child is added and when it is removed for good), and read lock-free by `/metrics`,
//! the HealthActor and the fault-injection API. It also counts the node's restarts: one counter
//! that only grows, also when a restarted child is later removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::handle::{ActorHandle, FaultKind, HandleStatus};
use super::stats::ActorStats;
use crate::ids::ActorPath;

/// Whether a child is a worker or a supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildKind {
    /// An actor doing work.
    Worker,
    /// An actor supervising others.
    Supervisor,
}

/// What the directory can do with an actor without knowing its message type.
pub trait ActorControl: Send + Sync {
    /// The child's lifecycle status.
    fn status(&self) -> HandleStatus;
    /// Its counters.
    fn stats(&self) -> &Arc<ActorStats>;
    /// Makes the running instance suffer a fault inside its handler.
    fn inject_fault(&self, kind: FaultKind) -> bool;
    /// Marks the actor as stopped for good (used when the whole tree has stopped).
    fn stop_for_good(&self);
}

impl<M: Send + 'static> ActorControl for ActorHandle<M> {
    fn status(&self) -> HandleStatus {
        ActorHandle::status(self)
    }

    fn stats(&self) -> &Arc<ActorStats> {
        ActorHandle::stats(self)
    }

    fn inject_fault(&self, kind: FaultKind) -> bool {
        ActorHandle::inject_fault(self, kind)
    }

    fn stop_for_good(&self) {
        ActorHandle::stop_for_good(self);
    }
}

/// One directory entry.
#[derive(Clone)]
pub struct DirectoryEntry {
    /// Worker or supervisor.
    pub kind: ChildKind,
    /// Status, counters and fault injection.
    pub control: Arc<dyn ActorControl>,
}

/// Why a fault could not be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// No actor has that path.
    #[error("no actor at path {0}")]
    UnknownActor(String),
    /// The actor exists but no instance is running right now.
    #[error("actor {0} is not running right now (restarting or stopped)")]
    NotRunning(String),
}

/// Path → entry, shared by every supervisor of one node.
#[derive(Clone, Default)]
pub struct ActorDirectory {
    entries: Arc<DashMap<ActorPath, DirectoryEntry>>,
    restarts: Arc<AtomicU64>,
}

impl ActorDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn insert(&self, path: ActorPath, entry: DirectoryEntry) {
        self.entries.insert(path, entry);
    }

    /// Removes the entry at `path` if it is still the one of `control`'s actor. A supervisor that
    /// died abruptly drops its state (and removes its dynamic children) after its parent was
    /// told; by then a restarted supervisor may have registered a new actor at the same path,
    /// whose entry must stay.
    pub(crate) fn remove(&self, path: &ActorPath, control: &dyn ActorControl) {
        self.entries.remove_if(path, |_, entry| {
            Arc::ptr_eq(entry.control.stats(), control.stats())
        });
    }

    /// Counts one restart of any actor of the node.
    pub(crate) fn record_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Restarts of every actor of the node since it started. It only grows: removing a child
    /// (a session, a link) that had restarted does not take its restarts away.
    pub fn restarts_total(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// The entry at `path`.
    pub fn get(&self, path: &ActorPath) -> Option<DirectoryEntry> {
        self.entries.get(path).map(|entry| entry.value().clone())
    }

    /// Every entry, sorted by path.
    pub fn list(&self) -> Vec<(ActorPath, DirectoryEntry)> {
        let mut all: Vec<_> = self
            .entries
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Makes the actor at `path` panic (or fail) inside its handler.
    pub fn inject_fault(&self, path: &ActorPath, kind: FaultKind) -> Result<(), FaultError> {
        let entry = self
            .get(path)
            .ok_or_else(|| FaultError::UnknownActor(path.to_string()))?;
        if entry.control.inject_fault(kind) {
            Ok(())
        } else {
            Err(FaultError::NotRunning(path.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(handle: &ActorHandle<()>) -> DirectoryEntry {
        DirectoryEntry {
            kind: ChildKind::Worker,
            control: Arc::new(handle.clone()),
        }
    }

    #[test]
    fn a_late_removal_leaves_a_newer_actor_at_the_same_path_registered() {
        let directory = ActorDirectory::new();
        let path = ActorPath::root().child("sessions").child("s1");
        let old = ActorHandle::<()>::new(path.clone());
        let new = ActorHandle::<()>::new(path.clone());
        directory.insert(path.clone(), entry(&old));
        // A restarted supervisor registers a new actor at the path before the old one's state
        // is dropped.
        directory.insert(path.clone(), entry(&new));
        directory.remove(&path, &old);
        let kept = directory.get(&path).expect("the newer entry stays");
        assert!(Arc::ptr_eq(kept.control.stats(), new.stats()));
        directory.remove(&path, &new);
        assert!(directory.get(&path).is_none());
    }
}
