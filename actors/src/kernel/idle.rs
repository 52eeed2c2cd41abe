//! Work that may wait until the current runtime worker idles.
//!
//! Some work done on a hot path only needs to happen soon, not now: the announcement of a
//! restart in place (the supervisor's WARN line and `actor.restarted` event). Sent at once, its
//! wake-up of the supervisor lands in the worker's next-task slot; the restarted actor's answer
//! to its next caller then pushes the supervisor out of that slot, and tokio wakes a parked worker
//! to take it: a cross-CPU wake-up (an inter-processor interrupt on a VM, about 10 µs) on the path
//! of the request that follows the restart, in a few percent of restarts.
//!
//! [`when_worker_idles`] hands the work to tokio's deferred wake-ups, the same mechanism
//! `tokio::task::yield_now` uses: the worker runs it once it has run out of ready tasks and polled
//! its drivers, or at its next maintenance tick (every 61 task polls under load, tokio's
//! `event_interval`), whichever comes first. Tasks the work wakes then are scheduled without
//! waking another worker. Outside a runtime worker the work runs at once.
//!
//! The work is never lost: should the runtime drop its deferred wake-ups without running them
//! (it shuts down), the work runs when they are dropped.

use std::cell::Cell;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// Work waiting in the worker's deferred wake-ups; runs once, on wake or on drop.
struct Deferred {
    work: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

thread_local! {
    /// Deferred work is running on this thread (inside the scheduler's deferred wake-ups).
    static RUNNING: Cell<bool> = const { Cell::new(false) };
}

impl Deferred {
    fn run(&self) {
        let work = self
            .work
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(work) = work {
            /// Restores the flag however the work ends (a panic included).
            struct Restore(bool);
            impl Drop for Restore {
                fn drop(&mut self) {
                    RUNNING.set(self.0);
                }
            }
            let _restore = Restore(RUNNING.replace(true));
            work();
        }
    }
}

impl Wake for Deferred {
    fn wake(self: Arc<Self>) {
        self.run();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.run();
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        // Dropped without a wake (the runtime shut down): the work still happens.
        self.run();
    }
}

/// Runs `work` once the current runtime worker idles or reaches its next maintenance tick (see
/// the module docs); at once outside a runtime worker.
///
/// The work runs inside the scheduler's deferred wake-ups, like a waker's `wake`: it must be
/// short and must not block (no `block_in_place`, no blocking join or lock wait); a cast to an
/// actor is the intended kind of work.
pub(crate) fn when_worker_idles(work: impl FnOnce() + Send + 'static) {
    // Work deferred from deferred work runs at once: tokio holds its list of deferred wake-ups
    // while it wakes them, so deferring again from inside one would find it taken (and the
    // worker is idling anyway).
    if RUNNING.get() {
        work();
        return;
    }
    let deferred = Arc::new(Deferred {
        work: Mutex::new(Some(Box::new(work))),
    });
    let waker = Waker::from(deferred);
    let mut cx = Context::from_waker(&waker);
    // A yield's first poll hands its waker to the scheduler's deferred wake-ups (or wakes it at
    // once outside a runtime) and is pending; the future itself is not needed after that.
    let mut yielded = std::pin::pin!(tokio::task::yield_now());
    if let Poll::Ready(()) = yielded.as_mut().poll(&mut cx) {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn outside_a_runtime_the_work_runs_at_once() {
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        when_worker_idles(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn on_a_worker_the_work_waits_until_the_worker_idles() {
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        when_worker_idles(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "ran inside the poll that deferred it"
        );
        // Nothing else is ready: the worker idles, runs the work, then resumes this task.
        tokio::task::yield_now().await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_worker_that_never_idles_runs_the_work_at_its_maintenance_tick() {
        const EXCHANGES: usize = 1_000;
        let ran = Arc::new(AtomicUsize::new(0));
        let (to_pong, mut pong_inbox) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (to_ping, mut ping_inbox) = tokio::sync::mpsc::unbounded_channel::<()>();
        let pong = tokio::spawn(async move {
            while pong_inbox.recv().await.is_some() {
                let _ = to_ping.send(());
            }
        });
        let seen = ran.clone();
        let ping = tokio::spawn(async move {
            let counter = seen.clone();
            when_worker_idles(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            });
            // Two tasks waking each other keep the worker busy: it never runs out of tasks.
            for exchange in 0..EXCHANGES {
                if seen.load(Ordering::SeqCst) == 1 {
                    return Some(exchange);
                }
                to_pong.send(()).unwrap();
                ping_inbox.recv().await.unwrap();
            }
            None
        });
        let ran_at = ping.await.unwrap();
        pong.await.unwrap();
        let ran_at = ran_at.expect("the work waited for the busy worker to idle");
        assert!(ran_at > 0, "ran inside the poll that deferred it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn work_deferred_from_deferred_work_runs_too() {
        let ran = Arc::new(AtomicUsize::new(0));
        let outer = ran.clone();
        let (done, finished) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            when_worker_idles(move || {
                outer.fetch_add(1, Ordering::SeqCst);
                let inner = outer.clone();
                when_worker_idles(move || {
                    inner.fetch_add(1, Ordering::SeqCst);
                    let _ = done.send(());
                });
            });
        });
        finished.await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn work_left_in_a_runtime_that_shuts_down_still_runs() {
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async move {
            when_worker_idles(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            });
        });
        drop(runtime);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
