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

/// Closes the legacy sessions of one node's `/mcp` that have been idle too long.
#[derive(Debug)]
pub(crate) struct IdleSessions {
    manager: Arc<LocalSessionManager>,
    idle: Duration,
    activity: DashMap<McpSessionId, Arc<Activity>>,
    /// The token each session was opened with (by name).
    owners: DashMap<McpSessionId, String>,
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
    /// Watches `manager`'s sessions; starts its reaper, which stops with `stop` or when the
    /// returned value is dropped.
    pub(crate) fn start(
        manager: Arc<LocalSessionManager>,
        idle: Duration,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let stop = stop.child_token();
        let this = Arc::new(Self {
            manager,
            idle,
            activity: DashMap::new(),
            owners: DashMap::new(),
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

    /// Notes that session `id` was opened with token `token`.
    pub(crate) fn opened(&self, id: &str, token: &str) {
        self.owners.insert(Arc::from(id), token.to_owned());
    }

    /// Session `id` was ended by its client.
    pub(crate) fn forget(&self, id: &str) {
        self.owners.remove(id);
        self.activity.remove(id);
    }

    /// How many live sessions token `token` opened (as of the last reap: those closed since
    /// may still count for up to a reaper tick).
    pub(crate) fn opened_by(&self, token: &str) -> usize {
        self.owners
            .iter()
            .filter(|owner| owner.value() == token)
            .count()
    }

    /// Closes the sessions idle past the allowance, and forgets those rmcp no longer has. A
    /// session seen here for the first time starts its idle time now.
    async fn reap(&self, now: Instant) {
        let live: HashSet<McpSessionId> =
            self.manager.sessions.read().await.keys().cloned().collect();
        self.activity.retain(|id, _| live.contains(id));
        self.owners.retain(|id, _| live.contains(id));
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
            self.owners.remove(&id);
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

    #[tokio::test(start_paused = true)]
    async fn a_call_in_flight_is_never_idle_and_the_idle_time_starts_when_it_ends() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let sessions = IdleSessions {
            manager: Arc::default(),
            idle: Duration::from_secs(60),
            activity: DashMap::from_iter([(Arc::from("s"), activity.clone())]),
            owners: DashMap::new(),
            reaper: CancellationToken::new(),
        };
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
        let sessions =
            IdleSessions::start(manager, Duration::from_secs(60), CancellationToken::new());
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
        let sessions = IdleSessions::start(Arc::default(), Duration::from_secs(300), node_stop);
        let reaper = sessions.reaper.clone();
        drop(sessions);
        assert!(reaper.is_cancelled());
    }
}
