//! When a legacy Streamable HTTP session (protocol 2025-11-25 and older, `Mcp-Session-Id`)
//! ends for want of its client.
//!
//! rmcp's own idle timer counts messages only: a session that sends and receives nothing for
//! its `keep_alive` is closed, even while one of its calls waits (a `spawn_session` with
//! `wait: true` on a quiet run), and that call's answer is lost with it. So rmcp's timer is off
//! and this reaper replaces it: a session is closed once it has had no call in flight and no
//! request for `http.mcp_session_idle_secs`. It also ends sessions whose client initialized and
//! never came back, which rmcp's timer used to catch.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use rmcp::transport::streamable_http_server::SessionManager;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An rmcp session id (the `Mcp-Session-Id` header's value).
type McpSessionId = Arc<str>;

/// The longest session id kept when rmcp's table cannot be asked (rmcp's ids are UUIDs).
const MAX_SESSION_ID: usize = 64;

/// The most legacy sessions one token may hold at once. A session lives until its client ends
/// it or has been quiet for `http.mcp_session_idle_secs`, with no connection open meanwhile, so
/// without a bound one token could open sessions (each a task and its queues in rmcp) faster
/// than they expire.
pub(crate) const MAX_SESSIONS_PER_TOKEN: usize = 256;

/// What one session is doing: calls in flight, and when it last did anything.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(now),
        }
    }

    fn touch(&self) {
        *self
            .last
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Instant::now();
    }

    /// How long it has been idle; zero while a call is in flight.
    fn idle_for(&self, now: Instant) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        now.saturating_duration_since(
            *self
                .last
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }
}

/// A request of a session in progress: the session is not idle until it is dropped.
#[derive(Debug)]
#[must_use = "the session counts as busy only while the guard lives"]
pub(crate) struct Busy(Option<Arc<Activity>>);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(activity) = self.0.take() {
            activity.touch();
            activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A token's place for a session whose `initialize` is running ([`IdleSessions::reserve`]):
/// it becomes the session's with [`Reservation::opened`], and is given back when dropped
/// without (the answer carried no session).
#[derive(Debug)]
#[must_use = "the place is given back when the reservation is dropped"]
pub(crate) struct Reservation {
    sessions: Arc<IdleSessions>,
    /// `None` once the place is the session's.
    token: Option<String>,
}

impl Reservation {
    /// The `initialize` opened session `id`: the place is the session's until it ends.
    pub(crate) fn opened(mut self, id: &str) {
        let Some(token) = self.token.take() else {
            return;
        };
        if let Some(previous) = self.sessions.owners.insert(Arc::from(id), token) {
            // rmcp's ids are fresh UUIDs; a repeat would otherwise count twice.
            self.sessions.release(&previous);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.sessions.release(&token);
        }
    }
}

/// Closes the legacy sessions of one node's `/mcp` that have been idle too long, and counts
/// each token's sessions against its bound.
#[derive(Debug)]
pub(crate) struct IdleSessions {
    manager: Arc<LocalSessionManager>,
    idle: Duration,
    activity: DashMap<McpSessionId, Arc<Activity>>,
    /// The token each session was opened with (by name).
    owners: DashMap<McpSessionId, String>,
    /// How many places each token holds: its sessions in `owners`, and the `initialize`
    /// requests running for it ([`Reservation`]s). Never more than `max_per_token`.
    held: DashMap<String, usize>,
    /// The most sessions one token may hold ([`MAX_SESSIONS_PER_TOKEN`] on a node).
    max_per_token: usize,
    /// Ends the reaper: with the node's stop, or when this goes (a router built for one
    /// forwarded cluster call has its own, gone with the call).
    reaper: CancellationToken,
}

impl Drop for IdleSessions {
    fn drop(&mut self) {
        self.reaper.cancel();
    }
}

impl IdleSessions {
    /// Watches `manager`'s sessions, of which one token may hold `max_per_token`; starts its
    /// reaper, which stops with `stop` or when the returned value is dropped.
    pub(crate) fn start(
        manager: Arc<LocalSessionManager>,
        idle: Duration,
        max_per_token: usize,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let stop = stop.child_token();
        let this = Arc::new(Self {
            manager,
            idle,
            activity: DashMap::new(),
            owners: DashMap::new(),
            held: DashMap::new(),
            max_per_token,
            reaper: stop.clone(),
        });
        let reaper = Arc::downgrade(&this);
        // Often enough that a session outlives its allowance by at most a quarter of it.
        let tick = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let Some(this) = reaper.upgrade() else { return };
                this.reap(Instant::now()).await;
            }
        });
        this
    }

    /// Session `id` (from a request's `Mcp-Session-Id`) handles a request until the guard goes.
    /// An id rmcp has no session for (a stateless request's header says what its client likes)
    /// is not kept: the map holds sessions only.
    pub(crate) fn busy(&self, id: &str) -> Busy {
        if let Some(activity) = self.activity.get(id) {
            let activity = activity.clone();
            activity.in_flight.fetch_add(1, Ordering::AcqRel);
            activity.touch();
            return Busy(Some(activity));
        }
        // A session not seen by the reaper yet. The sessions' lock is held only for a moment
        // (a session's creation or close): taken, it says; busy, the id is kept, as before.
        let known = match self.manager.sessions.try_read() {
            Ok(sessions) => sessions.contains_key(id),
            Err(_) => id.len() <= MAX_SESSION_ID,
        };
        if !known {
            return Busy(None);
        }
        let activity = self
            .activity
            .entry(Arc::from(id))
            .or_insert_with(|| Arc::new(Activity::new(Instant::now())))
            .clone();
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Busy(Some(activity))
    }

    /// The most sessions one token may hold.
    pub(crate) fn max_per_token(&self) -> usize {
        self.max_per_token
    }

    /// A place for one more session of `token`, taken before its `initialize` runs, unless the
    /// token holds its most already (its sessions and the `initialize` requests running for
    /// it). Taken and counted in one step, so concurrent `initialize` requests cannot all pass
    /// a check made before any of their sessions is recorded.
    pub(crate) fn reserve(self: &Arc<Self>, token: &str) -> Option<Reservation> {
        let mut held = self.held.entry(token.to_owned()).or_insert(0);
        if *held >= self.max_per_token {
            return None;
        }
        *held += 1;
        drop(held);
        Some(Reservation {
            sessions: Arc::clone(self),
            token: Some(token.to_owned()),
        })
    }

    /// Gives back one place of `token`.
    fn release(&self, token: &str) {
        if let Some(mut held) = self.held.get_mut(token) {
            *held = held.saturating_sub(1);
        }
        self.held.remove_if(token, |_, held| *held == 0);
    }

    /// Forgets session `id`'s owner, giving its place back.
    fn disown(&self, id: &str) {
        if let Some((_, token)) = self.owners.remove(id) {
            self.release(&token);
        }
    }

    /// Session `id` was ended by its client.
    pub(crate) fn forget(&self, id: &str) {
        self.disown(id);
        self.activity.remove(id);
    }

    /// How many places token `token` holds: its live sessions (as of the last reap: those
    /// closed since may still count for up to a reaper tick) and its `initialize` requests
    /// running.
    #[cfg(test)]
    fn opened_by(&self, token: &str) -> usize {
        self.held.get(token).map_or(0, |held| *held)
    }

    /// Closes the sessions idle past the allowance, and forgets those rmcp no longer has. A
    /// session seen here for the first time starts its idle time now. Only entries that were
    /// here before rmcp's sessions were read are forgotten for not being among them: one
    /// recorded meanwhile (a session created after the read) is left for the next reap.
    async fn reap(&self, now: Instant) {
        let seen_owners: Vec<McpSessionId> = self
            .owners
            .iter()
            .map(|owner| owner.key().clone())
            .collect();
        let seen_activity: Vec<McpSessionId> = self
            .activity
            .iter()
            .map(|activity| activity.key().clone())
            .collect();
        let live: HashSet<McpSessionId> =
            self.manager.sessions.read().await.keys().cloned().collect();
        for id in seen_activity.iter().filter(|id| !live.contains(*id)) {
            self.activity.remove(id);
        }
        for id in seen_owners.iter().filter(|id| !live.contains(*id)) {
            self.disown(id);
        }
        for id in live {
            let idle = self
                .activity
                .entry(id.clone())
                .or_insert_with(|| Arc::new(Activity::new(now)))
                .idle_for(now);
            if idle < self.idle {
                continue;
            }
            self.activity.remove(&id);
            self.disown(&id);
            match self.manager.close_session(&id).await {
                Ok(()) => tracing::info!(
                    mcp_session = %id,
                    idle_secs = idle.as_secs(),
                    "closed an MCP session whose client has been quiet past http.mcp_session_idle_secs"
                ),
                Err(error) => {
                    tracing::debug!(mcp_session = %id, %error, "an idle MCP session was gone already");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions of `manager` without a reaper of their own (the test reaps), `max` per token.
    fn unreaped(manager: Arc<LocalSessionManager>, max: usize) -> Arc<IdleSessions> {
        Arc::new(IdleSessions {
            manager,
            idle: Duration::from_secs(60),
            activity: DashMap::new(),
            owners: DashMap::new(),
            held: DashMap::new(),
            max_per_token: max,
            reaper: CancellationToken::new(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_flight_is_never_idle_and_the_idle_time_starts_when_it_ends() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let sessions = unreaped(Arc::default(), MAX_SESSIONS_PER_TOKEN);
        sessions.activity.insert(Arc::from("s"), activity.clone());
        let busy = sessions.busy("s");
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(activity.idle_for(Instant::now()), Duration::ZERO);
        drop(busy);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(activity.idle_for(Instant::now()), Duration::from_secs(5));
    }

    /// Regression: every request's `Mcp-Session-Id` went into the activity map, also the ones
    /// rmcp has no session for (a stateless request can carry any), until the next reap.
    #[tokio::test(start_paused = true)]
    async fn only_sessions_rmcp_has_are_counted() {
        let manager = Arc::new(LocalSessionManager::default());
        let (real, _transport) = manager.create_session().await.unwrap();
        let sessions = IdleSessions::start(
            manager,
            Duration::from_secs(60),
            8,
            CancellationToken::new(),
        );
        let made_up = sessions.busy("made-up");
        assert!(sessions.activity.is_empty());
        drop(made_up);
        let busy = sessions.busy(&real);
        assert_eq!(sessions.activity.len(), 1);
        tokio::time::advance(Duration::from_secs(600)).await;
        sessions.reap(Instant::now()).await;
        assert_eq!(sessions.activity.len(), 1, "busy, not reaped");
        drop(busy);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_ends_when_its_sessions_go_even_if_the_node_runs_on() {
        let node_stop = CancellationToken::new();
        let sessions = IdleSessions::start(Arc::default(), Duration::from_secs(300), 8, node_stop);
        let reaper = sessions.reaper.clone();
        drop(sessions);
        assert!(reaper.is_cancelled());
    }

    /// A token's places: at most its bound, taken by running `initialize` requests and kept by
    /// the sessions they opened; a request that opened none, and a session ended, give theirs
    /// back.
    #[tokio::test]
    async fn a_token_holds_at_most_its_bound_of_places_and_gets_each_back() {
        let sessions = unreaped(Arc::default(), 2);
        let first = sessions.reserve("dash").unwrap();
        let second = sessions.reserve("dash").unwrap();
        assert!(
            sessions.reserve("dash").is_none(),
            "two running initializes fill it"
        );
        assert!(
            sessions.reserve("ops").is_some(),
            "another token has its own"
        );
        first.opened("s-1");
        drop(second);
        assert_eq!(sessions.opened_by("dash"), 1);
        let third = sessions.reserve("dash").unwrap();
        assert!(sessions.reserve("dash").is_none());
        third.opened("s-2");
        sessions.forget("s-1");
        assert_eq!(sessions.opened_by("dash"), 1);
        assert!(sessions.reserve("dash").is_some());
    }

    /// Regression: a reap read rmcp's live sessions, then dropped every owner entry not among
    /// them, also one recorded in between (a session created after the read): that session
    /// no longer counted against its token, which could then open more than its bound.
    #[tokio::test]
    async fn a_reap_keeps_an_owner_recorded_after_it_read_the_live_sessions() {
        let manager = Arc::new(LocalSessionManager::default());
        let sessions = unreaped(manager.clone(), 8);
        // rmcp's table is busy (a session being created): the reap waits to read it.
        let creating = manager.sessions.write().await;
        let reap = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.reap(Instant::now()).await }
        });
        tokio::task::yield_now().await;
        assert!(!reap.is_finished(), "the reap waits for rmcp's table");
        // The session is created and its initialize answered meanwhile.
        sessions.reserve("dash").unwrap().opened("s-new");
        drop(creating);
        reap.await.unwrap();
        assert_eq!(
            sessions.opened_by("dash"),
            1,
            "the new session still counts"
        );
        assert!(sessions.owners.contains_key("s-new"));
        // The next reap, which sees it recorded and not live, forgets it.
        sessions.reap(Instant::now()).await;
        assert_eq!(sessions.opened_by("dash"), 0);
    }
}
