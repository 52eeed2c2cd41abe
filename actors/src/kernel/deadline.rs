//! Call deadlines without a timer per call.
//!
//! [`ActorHandle::call`](super::ActorHandle::call) must give up after its deadline, yet nearly
//! every call is answered within microseconds. A tokio timer per call costs a registration in the
//! timer wheel and, whenever it is the runtime's earliest timer (an idle runtime, a benchmark, a
//! host program without other timers), a wake-up of the thread parked on the timer driver so that
//! it re-arms: on a 2-vCPU machine that more than doubled the cost of a round trip.
//!
//! Instead each runtime has one sweeper task. A waiting call puts its deadline into the sweeper's
//! table (one short lock and a map insert) and takes it out when answered; the sweeper sleeps on
//! one ordinary tokio timer until the earliest deadline it knows, then fails the calls that are
//! due. A new deadline wakes the sweeper only when it is earlier than the one the sweeper sleeps
//! until, which with equal timeouts happens about once per timeout period, not once per call.
//! Because the sweeper sleeps on a tokio timer, paused test time (`start_paused`, `advance`)
//! drives call deadlines exactly as it drives `tokio::time::timeout`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::runtime::{Handle, Id};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The deadline passed before the future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

/// Awaits `future` for at most `timeout`, like `tokio::time::timeout`, without arming a timer for
/// this call (see the module docs). Outside a tokio runtime it falls back to
/// `tokio::time::timeout`, which needs one.
pub(crate) async fn within<F>(timeout: Duration, future: F) -> Result<F::Output, Elapsed>
where
    F: Future + Unpin,
{
    let Some(deadline) = Instant::now().checked_add(timeout) else {
        // Too far away to represent: no deadline at all.
        return Ok(future.await);
    };
    let Some(table) = Table::current() else {
        return tokio::time::timeout(timeout, future)
            .await
            .map_err(|_| Elapsed);
    };
    Within {
        future,
        table: Some(table),
        deadline,
        entry: None,
    }
    .await
}

struct Within<F> {
    future: F,
    /// The sweeper's table; taken when the entry is registered.
    table: Option<Arc<Table>>,
    deadline: Instant,
    /// Registered on the first poll that finds the future pending.
    entry: Option<Entry>,
}

impl<F: Future + Unpin> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(output) = Pin::new(&mut this.future).poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if this.entry.is_none()
            && let Some(table) = this.table.take()
        {
            this.entry = Some(table.register(this.deadline));
        }
        let Some(entry) = &this.entry else {
            unreachable!("the entry is registered above")
        };
        entry.expiry.waker.register(cx.waker());
        if entry.expiry.expired.load(Ordering::Acquire) {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    }
}

/// What the sweeper sets when a deadline passes, and whom it wakes.
#[derive(Default)]
struct Expiry {
    expired: AtomicBool,
    waker: AtomicWaker,
}

/// A registered deadline; dropping it (the call was answered or abandoned) takes it out.
struct Entry {
    table: Arc<Table>,
    key: (Instant, u64),
    expiry: Arc<Expiry>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if !self.expiry.expired.load(Ordering::Acquire) {
            self.table.lock().waiting.remove(&self.key);
        }
    }
}

/// The deadlines of one runtime's waiting calls, and its sweeper's wake-up.
struct Table {
    state: Mutex<State>,
    sweeper: Notify,
}

struct State {
    waiting: BTreeMap<(Instant, u64), Arc<Expiry>>,
    next_key: u64,
    /// The deadline the sweeper will wake up for at the latest; `None` while it waits for a
    /// notification only. A deadline at or after this one needs no wake-up.
    sleeping_until: Option<Instant>,
}

/// The tables of the live runtimes (weak: a table lives as long as its sweeper task).
static TABLES: Mutex<Vec<(Id, Weak<Table>)>> = Mutex::new(Vec::new());

thread_local! {
    /// The table of the runtime this thread last called from, to skip the global lookup.
    static LOCAL: std::cell::RefCell<Option<(Id, Weak<Table>)>> =
        const { std::cell::RefCell::new(None) };
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few map operations without a panic path.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current runtime's table, its sweeper started on first use.
    fn current() -> Option<Arc<Self>> {
        let runtime = Handle::try_current().ok()?;
        let id = runtime.id();
        let cached = LOCAL.with(|local| match &*local.borrow() {
            Some((cached, table)) if *cached == id => table.upgrade(),
            _ => None,
        });
        if let Some(table) = cached {
            return Some(table);
        }
        let table = Self::of_runtime(&runtime, id);
        LOCAL.with(|local| *local.borrow_mut() = Some((id, Arc::downgrade(&table))));
        Some(table)
    }

    fn of_runtime(runtime: &Handle, id: Id) -> Arc<Self> {
        let mut tables = TABLES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tables.retain(|(_, table)| table.strong_count() > 0);
        if let Some(table) = tables
            .iter()
            .find(|(known, _)| *known == id)
            .and_then(|(_, table)| table.upgrade())
        {
            return table;
        }
        let table = Arc::new(Self {
            state: Mutex::new(State {
                waiting: BTreeMap::new(),
                next_key: 0,
                sleeping_until: None,
            }),
            sweeper: Notify::new(),
        });
        tables.push((id, Arc::downgrade(&table)));
        runtime.spawn(sweep(table.clone()));
        table
    }

    fn register(self: Arc<Self>, deadline: Instant) -> Entry {
        let expiry = Arc::new(Expiry::default());
        let mut state = self.lock();
        let key = (deadline, state.next_key);
        state.next_key += 1;
        state.waiting.insert(key, expiry.clone());
        let wake = state.sleeping_until.is_none_or(|until| deadline < until);
        if wake {
            state.sleeping_until = Some(deadline);
        }
        drop(state);
        if wake {
            // A stored permit if the sweeper is busy: it looks at the table again either way.
            self.sweeper.notify_one();
        }
        Entry {
            table: self,
            key,
            expiry,
        }
    }

    /// Fails every call due at `now`; returns the next deadline to sleep until.
    fn expire_due(&self, now: Instant) -> Option<Instant> {
        let mut due = Vec::new();
        let mut state = self.lock();
        while let Some(entry) = state.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        let next = state.waiting.first_key_value().map(|((at, _), _)| *at);
        state.sleeping_until = next;
        drop(state);
        for expiry in due {
            expiry.expired.store(true, Ordering::Release);
            expiry.waker.wake();
        }
        next
    }
}

/// The sweeper: sleeps until the earliest deadline (or a notification of an earlier one) and
/// fails the calls that are due. Ends with its runtime.
async fn sweep(table: Arc<Table>) {
    loop {
        match table.expire_due(Instant::now()) {
            Some(next) => {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = table.sweeper.notified() => {}
                }
            }
            None => table.sweeper.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pending_future_fails_at_its_deadline_and_not_before() {
        let (_tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let started = Instant::now();
        let waited = within(Duration::from_secs(5), rx).await;
        assert_eq!(waited.map_err(|_| ()).err(), Some(()));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_before_the_deadline_wins_and_leaves_nothing_registered() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.send(7).unwrap();
        });
        assert_eq!(within(Duration::from_secs(5), rx).await, Ok(Ok(7)));
        answer.await.unwrap();
        let table = Table::current().unwrap();
        assert!(
            table.lock().waiting.is_empty(),
            "the answered call is removed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_wakes_a_sweeper_sleeping_until_a_later_one() {
        let (_long_tx, long_rx) = tokio::sync::oneshot::channel::<u32>();
        let long = tokio::spawn(within(Duration::from_secs(60), long_rx));
        tokio::task::yield_now().await;
        let (_short_tx, short_rx) = tokio::sync::oneshot::channel::<u32>();
        let started = Instant::now();
        assert!(within(Duration::from_secs(2), short_rx).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(!long.is_finished(), "the later deadline has not passed");
        assert!(long.await.unwrap().is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_calls_each_end_by_answer_or_deadline() {
        // Even calls have a long deadline and are answered; odd ones a short one and are not.
        // Every one ends the way it must, and the table ends empty.
        let mut waiting = Vec::new();
        let mut answers = Vec::new();
        let mut unanswered = Vec::new();
        for index in 0..200u32 {
            let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
            if index % 2 == 0 {
                waiting.push(tokio::spawn(within(Duration::from_secs(60), rx)));
                answers.push((index, tx));
            } else {
                waiting.push(tokio::spawn(within(Duration::from_millis(20), rx)));
                unanswered.push(tx);
            }
        }
        for (index, tx) in answers {
            tx.send(index).unwrap();
        }
        let mut outcomes = Vec::new();
        for call in waiting {
            outcomes.push(match call.await.unwrap() {
                Ok(Ok(value)) => Some(value),
                Err(Elapsed) => None,
                Ok(Err(_)) => unreachable!("no sender is dropped before the end"),
            });
        }
        let expected: Vec<Option<u32>> = (0..200)
            .map(|index| (index % 2 == 0).then_some(index))
            .collect();
        assert_eq!(outcomes, expected);
        assert!(Table::current().unwrap().lock().waiting.is_empty());
        drop(unanswered);
    }
}
