//! A supervisor's restart book: its pure restart accounting ([`RestartTracker`]) and each
//! child's restart history, shared with the hosts of its children so that a child can restart in
//! place without a round trip to its supervisor.
//!
//! This is the one part of a supervisor's state used outside its handler. It sits behind a
//! mutex that is held only for pure bookkeeping: no await, no I/O, no logging, no sends.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::restart::{ChildRestarts, RestartDecision, RestartIntensity, RestartTracker};
use super::{ActorRestartedFacts, SupervisorMsg, announce_restart};
use crate::event::EventBus;
use crate::ids::ActorPath;
use crate::kernel::{ActorDirectory, ActorHandle, Admission, InPlaceRestarts, when_worker_idles};

pub(crate) struct RestartBook {
    inner: Mutex<BookInner>,
    directory: Option<ActorDirectory>,
}

struct BookInner {
    tracker: RestartTracker,
    rng: fastrand::Rng,
    children: HashMap<ActorPath, BookChild>,
}

#[derive(Default)]
struct BookChild {
    restarts: ChildRestarts,
    /// May this child restart in place right now (set while it runs, cleared while it is being
    /// stopped)?
    in_place: bool,
}

impl RestartBook {
    pub(crate) fn new(
        tracker: RestartTracker,
        rng: fastrand::Rng,
        directory: Option<ActorDirectory>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(BookInner {
                tracker,
                rng,
                children: HashMap::new(),
            }),
            directory,
        })
    }

    fn lock(&self) -> MutexGuard<'_, BookInner> {
        // Every step under this lock is a plain assignment or a call into the pure tracker;
        // a panic there leaves nothing half-written that matters, so poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn intensity(&self) -> RestartIntensity {
        self.lock().tracker.intensity()
    }

    pub(crate) fn add(&self, path: &ActorPath) {
        self.lock().children.entry(path.clone()).or_default();
    }

    pub(crate) fn remove(&self, path: &ActorPath) {
        self.lock().children.remove(path);
    }

    pub(crate) fn allow_in_place(&self, path: &ActorPath, allowed: bool) {
        if let Some(child) = self.lock().children.get_mut(path) {
            child.in_place = allowed;
        }
    }

    /// Records a failure the supervisor handles itself and decides.
    pub(crate) fn on_failure(&self, path: &ActorPath, now: Instant) -> RestartDecision {
        let mut inner = self.lock();
        let BookInner {
            tracker,
            rng,
            children,
        } = &mut *inner;
        let jitter = rng.f64();
        let child = children.entry(path.clone()).or_default();
        tracker.on_failure(&mut child.restarts, now, jitter)
    }

    /// Admits a restart in place: only when the child may restart in place, the restart is
    /// immediate, and it does not exceed the intensity. Then the failure is recorded; otherwise
    /// nothing is, and the failure reaches the supervisor the ordinary way.
    pub(crate) fn admit_in_place(&self, path: &ActorPath, now: Instant) -> Option<u32> {
        let mut inner = self.lock();
        let BookInner {
            tracker,
            rng,
            children,
        } = &mut *inner;
        let child = children.get_mut(path).filter(|child| child.in_place)?;
        if !tracker.restarts_immediately() || tracker.would_escalate(now) {
            return None;
        }
        match tracker.on_failure(&mut child.restarts, now, rng.f64()) {
            RestartDecision::Restart {
                restarts_in_window, ..
            } => Some(restarts_in_window),
            RestartDecision::Escalate { .. } => {
                unreachable!("would_escalate said this failure stays within the intensity")
            }
        }
    }

    /// Counts a completed restart of `path`, for the child and node-wide; returns the child's
    /// total. A child the supervisor already forgot (terminated while it restarted in place) is
    /// counted node-wide only, and not added back.
    pub(crate) fn record_restart(&self, path: &ActorPath) -> u64 {
        let total = match self.lock().children.get_mut(path) {
            Some(child) => {
                child.restarts.total += 1;
                child.restarts.total
            }
            None => 1,
        };
        if let Some(directory) = &self.directory {
            directory.record_restart();
        }
        total
    }

    pub(crate) fn total(&self, path: &ActorPath) -> u64 {
        self.lock()
            .children
            .get(path)
            .map_or(0, |child| child.restarts.total)
    }
}

/// Restarts in place not announced yet, oldest first, shared by the children's hosts (which add
/// them) and their supervisor (which announces them).
#[derive(Default)]
pub(crate) struct Unannounced {
    queue: Mutex<VecDeque<ActorRestartedFacts>>,
}

impl Unannounced {
    /// Adds one; true when it is the only one (nobody has been asked to announce yet).
    fn push(&self, facts: ActorRestartedFacts) -> bool {
        let mut queue = self.lock();
        queue.push_back(facts);
        queue.len() == 1
    }

    /// Announces every restart not announced yet, oldest first, under `supervisor`.
    pub(crate) fn announce(
        &self,
        supervisor: &ActorPath,
        intensity: RestartIntensity,
        events: Option<&EventBus>,
    ) {
        let queued: Vec<ActorRestartedFacts> = self.lock().drain(..).collect();
        for facts in queued {
            announce_restart(supervisor, intensity, events, facts);
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<ActorRestartedFacts>> {
        // Pushes and drains only: a panic cannot leave the queue half-written.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a child's host holds to restart in place under this supervisor.
pub(crate) struct ChildRestartHook {
    pub(crate) book: Arc<RestartBook>,
    pub(crate) supervisor: ActorHandle<SupervisorMsg>,
    pub(crate) events: Option<EventBus>,
    pub(crate) unannounced: Arc<Unannounced>,
}

impl InPlaceRestarts for ChildRestartHook {
    fn admit(&self, path: &ActorPath) -> Option<Admission> {
        self.book
            .admit_in_place(path, super::now())
            .map(|restarts_in_window| Admission { restarts_in_window })
    }

    fn record(&self, path: &ActorPath) -> u64 {
        self.book.record_restart(path)
    }

    fn report(&self, path: &ActorPath, admission: Admission, restart_count: u64, reason: String) {
        let first = self.unannounced.push(ActorRestartedFacts {
            child: path.clone(),
            reason,
            restart_count,
            restarts_in_window: admission.restarts_in_window,
            delay_ms: 0,
        });
        if !first {
            // Asked for already; that announcement takes this one too, in order.
            return;
        }
        let supervisor = self.supervisor.clone();
        let book = Arc::clone(&self.book);
        let events = self.events.clone();
        let unannounced = Arc::clone(&self.unannounced);
        // The supervisor is asked once this worker idles, not before the restarted child's next
        // message: waking it now would put a cross-CPU wake-up on that message's path (see
        // `kernel::idle`). It announces everything queued, oldest first, and does so before it
        // handles any exit of a child and when it stops, so no restart is announced after a
        // later one. If it is gone for good, the queue is announced here.
        when_worker_idles(move || {
            if supervisor.cast(SupervisorMsg::AnnounceInPlace).is_err() {
                unannounced.announce(supervisor.path(), book.intensity(), events.as_ref());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::supervisor::{Backoff, RestartIntensity};

    fn book(max_restarts: u32, backoff: Backoff) -> Arc<RestartBook> {
        let tracker = RestartTracker::new(
            RestartIntensity {
                max_restarts,
                window: Duration::from_secs(10),
            },
            backoff,
        );
        RestartBook::new(
            tracker,
            fastrand::Rng::with_seed(1),
            Some(ActorDirectory::new()),
        )
    }

    #[test]
    fn a_restart_in_place_is_admitted_only_when_allowed_immediate_and_within_the_intensity() {
        let path = ActorPath::root().child("a");
        let book = book(2, Backoff::NONE);
        let now = Instant::now();
        book.add(&path);
        assert_eq!(book.admit_in_place(&path, now), None, "not running yet");
        book.allow_in_place(&path, true);
        assert_eq!(book.admit_in_place(&path, now), Some(1));
        assert_eq!(book.admit_in_place(&path, now), Some(2));
        assert_eq!(
            book.admit_in_place(&path, now),
            None,
            "a third failure in the window escalates: the supervisor must see it"
        );
        assert!(
            matches!(
                book.on_failure(&path, now),
                RestartDecision::Escalate {
                    restarts_in_window: 3
                }
            ),
            "the refused admission recorded nothing, so the supervisor counts it once"
        );

        let slow = book_with_backoff();
        slow.add(&path);
        slow.allow_in_place(&path, true);
        assert_eq!(
            slow.admit_in_place(&path, now),
            None,
            "a backoff means a respawn"
        );
    }

    fn book_with_backoff() -> Arc<RestartBook> {
        book(
            10,
            Backoff {
                min: Duration::from_millis(10),
                max: Duration::from_millis(100),
            },
        )
    }

    #[test]
    fn restarts_are_counted_per_child_and_node_wide_and_a_forgotten_child_is_not_added_back() {
        let path = ActorPath::root().child("a");
        let book = book(10, Backoff::NONE);
        book.add(&path);
        assert_eq!(book.record_restart(&path), 1);
        assert_eq!(book.record_restart(&path), 2);
        assert_eq!(book.total(&path), 2);
        book.remove(&path);
        book.record_restart(&path);
        assert_eq!(book.total(&path), 0, "not added back");
        let directory = book.directory.as_ref().unwrap();
        assert_eq!(directory.restarts_total(), 3);
    }
}
