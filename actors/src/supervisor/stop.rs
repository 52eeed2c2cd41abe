//! Stop budgets: how the children of a supervisor share the time its own stop is given.
//!
//! Whoever stops a supervisor gives it a deadline: its parent (now + the child's
//! [`Shutdown`](super::Shutdown) timeout, which it kills it after) or [`stop_within`] (a tree's
//! root). The supervisor then stops its children in reverse start order within that deadline,
//! by the rule of [`StopBudget`], rather than giving each child its own full timeout one after
//! another, which could run past the deadline and get the supervisor killed with the children
//! it stops last (in a node's tree: the event bus, which must write what is queued and release
//! its id block in `post_stop`).
//!
//! The deadline travels beside the stop, not in it (ractor's stop and drain carry none): a table
//! of the stops under way, by the ractor id of the instance stopped, filled by the one who stops
//! it for as long as it waits ([`StopBy`]) and read by the supervisor in `post_stop`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use ractor::{ActorCell, ActorId};
use tokio::time::Instant;

/// Deadlines of the stops under way, by the ractor id of the instance being stopped.
static DEADLINES: LazyLock<Mutex<HashMap<ActorId, Instant>>> = LazyLock::new(Mutex::default);

fn deadlines() -> MutexGuard<'static, HashMap<ActorId, Instant>> {
    DEADLINES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records that the stop of `cell` must be over by a deadline, while it lives.
pub(crate) struct StopBy {
    id: ActorId,
}

impl StopBy {
    pub(crate) fn new(cell: &ActorCell, deadline: Instant) -> Self {
        let id = cell.get_id();
        deadlines().insert(id, deadline);
        Self { id }
    }
}

impl Drop for StopBy {
    fn drop(&mut self) {
        deadlines().remove(&self.id);
    }
}

/// When the stop of `cell` under way must be over, if whoever stops it said.
pub(crate) fn deadline_of(cell: &ActorCell) -> Option<Instant> {
    deadlines().get(&cell.get_id()).copied()
}

/// Stops a supervisor that has no parent (such as a tree's root) gracefully, its children
/// sharing `timeout` (see [`StopBudget`]), and kills it if it has not stopped by then.
/// Returns true when it stopped gracefully in time.
pub async fn stop_within(cell: &ActorCell, reason: Option<String>, timeout: Duration) -> bool {
    let _stop_by = StopBy::new(
        cell,
        crate::time::tokio_instant_after(Instant::now(), timeout),
    );
    let stopped = cell.stop_and_wait(reason, Some(timeout)).await.is_ok();
    if !stopped {
        let _ = cell.kill_and_wait(None).await;
    }
    stopped
}

/// How the children of one supervisor share the deadline of its stop.
///
/// At the start, with `B` the time left and `n` the children that will take time to stop (a
/// running child with a graceful shutdown), each child's *reserve* is the smaller of its own
/// shutdown timeout and `B / n`. The child stopped `k`-th may take its own timeout, but at most
/// what is left of the budget minus the reserves of the children stopped after it. So each child
/// gets at least its reserve whatever the children stopped before it do (the one stopped last
/// included), and may also use what those left unused; the stop of the last child ends by the
/// deadline. Over the budget, a child is killed at once.
pub(crate) struct StopBudget {
    deadline: Instant,
    /// Per child, in stop order: the sum of the reserves of the children stopped after it.
    after: Vec<Duration>,
}

impl StopBudget {
    /// `timeouts`: each child's own shutdown timeout, in stop order (zero for a child that
    /// takes no time to stop: none running, or killed at once).
    pub(crate) fn new(deadline: Instant, now: Instant, timeouts: &[Duration]) -> Self {
        let budget = deadline.saturating_duration_since(now);
        let taking_time = timeouts.iter().filter(|timeout| !timeout.is_zero()).count();
        let share = budget / u32::try_from(taking_time.max(1)).unwrap_or(u32::MAX);
        let mut after = vec![Duration::ZERO; timeouts.len()];
        let mut reserved = Duration::ZERO;
        for (position, timeout) in timeouts.iter().enumerate().rev() {
            after[position] = reserved;
            reserved += (*timeout).min(share);
        }
        Self { deadline, after }
    }

    /// How long the child at `position` in stop order may take at most, counted from `now`
    /// (before the cap of its own timeout).
    pub(crate) fn allowed(&self, position: usize, now: Instant) -> Duration {
        self.deadline
            .saturating_duration_since(now)
            .saturating_sub(self.after[position])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Stops children one after another, each taking all it is allowed (`None`) or the given
    /// time; returns how long each was given.
    fn run(budget_secs: u64, timeouts: &[Duration], takes: &[Option<Duration>]) -> Vec<Duration> {
        let start = Instant::now();
        let budget = StopBudget::new(start + S * budget_secs as u32, start, timeouts);
        let mut now = start;
        let mut given = Vec::new();
        for (position, timeout) in timeouts.iter().enumerate() {
            let allowed = budget.allowed(position, now).min(*timeout);
            given.push(allowed);
            now += takes[position].map_or(allowed, |took| took.min(allowed));
        }
        assert!(now <= start + S * budget_secs as u32, "past the deadline");
        given
    }

    #[test]
    fn the_child_stopped_last_keeps_its_reserve_when_the_first_ones_hang() {
        // A node's root by default: cluster, links, sessions, providers (60 s each), then
        // health, registry and the event bus (5 s each), within 30 s.
        let timeouts = [S * 60, S * 60, S * 60, S * 60, S * 5, S * 5, S * 5];
        let given = run(30, &timeouts, &[None; 7]);
        let share = S * 30 / 7;
        assert_eq!(given[0], S * 30 - share * 6);
        for (position, given) in given.iter().enumerate().skip(1) {
            assert_eq!(*given, share, "child {position}");
        }
    }

    #[test]
    fn a_child_may_use_what_the_ones_before_it_left() {
        // Shares of 4 s: the first child may take 4 (8 are kept for the two after it), the
        // second all of its 5 (4 are kept for the last), the last all that is left.
        let timeouts = [S * 5, S * 5, S * 60];
        let given = run(
            12,
            &timeouts,
            &[Some(Duration::ZERO), Some(Duration::ZERO), None],
        );
        assert_eq!(given, [S * 4, S * 5, S * 12]);
    }

    #[test]
    fn reserves_are_no_larger_than_the_childrens_own_timeouts() {
        // The bus needs at most 5 s: the supervisor before it may take 25 of 30.
        let given = run(30, &[S * 60, S * 5], &[None, None]);
        assert_eq!(given, [S * 25, S * 5]);
    }

    #[test]
    fn children_that_take_no_time_reserve_nothing() {
        let given = run(10, &[S * 60, Duration::ZERO, S * 60], &[None, None, None]);
        assert_eq!(given, [S * 5, Duration::ZERO, S * 5]);
    }

    #[test]
    fn past_the_deadline_every_child_is_allowed_nothing() {
        let start = Instant::now();
        let budget = StopBudget::new(start + S, start, &[S * 5, S * 5]);
        assert_eq!(budget.allowed(0, start + S * 2), Duration::ZERO);
        assert_eq!(budget.allowed(1, start + S * 2), Duration::ZERO);
    }
}
