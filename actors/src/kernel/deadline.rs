//! Call deadlines without a timer per call.
//!
//! [`ActorHandle::call`](super::ActorHandle::call) must give up after its deadline, yet nearly
//! every call is answered within microseconds. A tokio timer per call costs a registration in the
//! timer wheel and, whenever it is the runtime's earliest timer (an idle runtime, a benchmark, a
//! host program without other timers), a wake-up of the thread parked on the timer driver so that
//! it re-arms: on a 2-vCPU machine that more than doubled the cost of a round trip.
//!
//! A call first gives the answer one scheduling round (the actor usually runs right after its
//! caller yields); most calls end there, without reading the clock. Only a call still waiting
//! after that round needs its deadline, counted from then.
//!
//! For those, each runtime has one sweeper task. A waiting call puts its deadline into the sweeper's
//! table (one short lock, a slot of a slab) and takes it out when answered; the sweeper sleeps on
//! one ordinary tokio timer until the earliest deadline it knows, then fails the calls that are
//! due. A new deadline wakes the sweeper only when it is earlier than the one the sweeper sleeps
//! until, which with equal timeouts happens about once per timeout period, not once per call.
//! Because the sweeper sleeps on a tokio timer, paused test time (`start_paused`, `advance`)
//! drives call deadlines as it drives `tokio::time::timeout`, with one difference: the sweeper's
//! timer stays armed after the calls it was for are answered (until it fires), so a paused
//! runtime with nothing else to do may auto-advance to it. Like `tokio::time::timeout`, this
//! needs a runtime with its timer enabled.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::runtime::{Handle, Id};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The deadline passed before the future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

/// Awaits `future` for at most `timeout` (counted from the end of the scheduling round it was
/// first polled in), like `tokio::time::timeout`, without arming a timer for this call (see the
/// module docs). Outside a tokio runtime it falls back to
/// `tokio::time::timeout`, which needs one.
pub(crate) async fn within<F>(timeout: Duration, mut future: F) -> Result<F::Output, Elapsed>
where
    F: Future + Unpin,
{
    // Most calls are answered within the scheduling round that sent them (the actor runs right
    // after its caller yields): give the answer that round before registering a deadline, so
    // that such calls neither read the clock nor touch the sweeper's table. The deadline then
    // counts from the end of that round, which is microseconds later than the call's start.
    let mut round = std::pin::pin!(tokio::task::yield_now());
    let answered = std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = Pin::new(&mut future).poll(cx) {
            return Poll::Ready(Some(output));
        }
        round.as_mut().poll(cx).map(|()| None)
    })
    .await;
    if let Some(output) = answered {
        return Ok(output);
    }
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
        match &this.entry {
            Some(entry) => {
                // Woken without an answer: by the sweeper, or spuriously.
                if entry.table.expired_or_rewait(entry.key, cx.waker()) {
                    return Poll::Ready(Err(Elapsed));
                }
            }
            None => {
                if let Some(table) = this.table.take() {
                    this.entry = Some(table.register(this.deadline, cx.waker()));
                }
            }
        }
        Poll::Pending
    }
}

/// A registered deadline; dropping it (the call was answered or abandoned) takes it out.
struct Entry {
    table: Arc<Table>,
    key: usize,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.table.lock().remove(self.key);
    }
}

/// The deadlines of one runtime's waiting calls, and its sweeper's wake-up.
struct Table {
    state: Mutex<State>,
    sweeper: Notify,
}

/// One waiting call.
struct Waiting {
    deadline: Instant,
    /// Taken (and woken) by the sweeper when the deadline passes.
    waker: Option<Waker>,
    expired: bool,
}

/// The waiting calls in a slab: registering and removing are O(1) without an allocation once
/// the slab has grown; the sweeper, which wakes about once per timeout period, scans it.
struct State {
    slots: Vec<Option<Waiting>>,
    free: Vec<usize>,
    /// The deadline the sweeper will wake up for at the latest; `None` while it waits for a
    /// notification only. A deadline at or after this one needs no wake-up.
    sleeping_until: Option<Instant>,
}

impl State {
    fn insert(&mut self, waiting: Waiting) -> usize {
        match self.free.pop() {
            Some(key) => {
                self.slots[key] = Some(waiting);
                key
            }
            None => {
                self.slots.push(Some(waiting));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, key: usize) {
        if self.slots[key].take().is_some() {
            self.free.push(key);
        }
    }
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
                slots: Vec::new(),
                free: Vec::new(),
                sleeping_until: None,
            }),
            sweeper: Notify::new(),
        });
        tables.push((id, Arc::downgrade(&table)));
        runtime.spawn(sweep(table.clone()));
        table
    }

    fn register(self: Arc<Self>, deadline: Instant, waker: &Waker) -> Entry {
        let mut state = self.lock();
        let key = state.insert(Waiting {
            deadline,
            waker: Some(waker.clone()),
            expired: false,
        });
        let wake = state.sleeping_until.is_none_or(|until| deadline < until);
        if wake {
            state.sleeping_until = Some(deadline);
        }
        drop(state);
        if wake {
            // A stored permit if the sweeper is busy: it looks at the table again either way.
            self.sweeper.notify_one();
        }
        Entry { table: self, key }
    }

    /// True when the deadline of `key` has passed; otherwise `waker` is the one to wake.
    fn expired_or_rewait(&self, key: usize, waker: &Waker) -> bool {
        let mut state = self.lock();
        let Some(waiting) = state.slots[key].as_mut() else {
            unreachable!("an entry is removed only by its own drop")
        };
        if waiting.expired {
            return true;
        }
        if !waiting
            .waker
            .as_ref()
            .is_some_and(|known| known.will_wake(waker))
        {
            waiting.waker = Some(waker.clone());
        }
        false
    }

    /// Fails every call due at `now`; returns the next deadline to sleep until.
    fn expire_due(&self, now: Instant) -> Option<Instant> {
        let mut due = Vec::new();
        let mut state = self.lock();
        let mut next: Option<Instant> = None;
        for waiting in state.slots.iter_mut().flatten() {
            if waiting.expired {
                continue;
            }
            if waiting.deadline <= now {
                waiting.expired = true;
                due.extend(waiting.waker.take());
            } else {
                next = Some(next.map_or(waiting.deadline, |next| next.min(waiting.deadline)));
            }
        }
        state.sleeping_until = next;
        drop(state);
        for waker in due {
            waker.wake();
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
            table.lock().slots.iter().all(Option::is_none),
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
        assert!(
            Table::current()
                .unwrap()
                .lock()
                .slots
                .iter()
                .all(Option::is_none)
        );
        drop(unanswered);
    }
}
