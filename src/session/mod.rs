//! Sessions as the node's front ends use them: parse a request, submit it, read records and
//! output, cancel, follow output live. HTTP, MCP, the CLI and the embedding API all go through
//! [`SessionService`], so they apply the same policy and give the same answers.

pub mod chat;
pub mod commands;
pub mod request;

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use troupe_actors::event::{EventFilter, KindPattern};
use troupe_actors::ids::{NodeId, SessionId};
use troupe_actors::kernel::CallError;
use troupe_actors::node::Sessions;
use troupe_actors::session::{
    Admitted, CancelError, MANAGER_TIMEOUT, ManagerMsg, SessionRecord, SessionSpec, SessionState,
    StoreError, SubmitError,
};

use crate::store::{OutputLine, OutputPage, SessionPage, SessionQuery, Store};
use request::{RequestError, RequestPolicy, SessionRequest};
use troupe_actors::session::SessionStore as _;

/// A session as the API shows it: the record and, while queued, its place in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The record.
    pub record: SessionRecord,
    /// 1 = next, while queued.
    pub queue_position: Option<u64>,
    /// True when an earlier submission with the same idempotency key was returned.
    pub existing: bool,
}

/// A page of sessions as the API shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionViewPage {
    /// The sessions, newest first.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The request is malformed or against policy.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The manager refused the submission.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The cancellation failed.
    #[error(transparent)]
    Cancel(#[from] CancelError),
    /// No such session.
    #[error("no session {0}")]
    NotFound(SessionId),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// The session machinery did not answer (restarting or shutting down).
    #[error(transparent)]
    Unavailable(#[from] CallError),
    /// The request names another node (clustering is not configured).
    #[error("node {0} is not this node ({1}) and this node is not in a cluster")]
    UnknownNode(String, NodeId),
}

/// The node's session operations.
#[derive(Clone)]
pub struct SessionService {
    sessions: Sessions,
    store: Store,
    policy: Arc<RequestPolicy>,
    node: NodeId,
    events: troupe_actors::event::EventBus,
}

impl SessionService {
    /// Builds the service.
    pub fn new(
        sessions: Sessions,
        store: Store,
        policy: RequestPolicy,
        node: NodeId,
        events: troupe_actors::event::EventBus,
    ) -> Self {
        Self {
            sessions,
            store,
            policy: Arc::new(policy),
            node,
            events,
        }
    }

    /// Session counters (submitted, started, ended per state, running, queued).
    pub fn stats(&self) -> &Arc<troupe_actors::session::SessionStats> {
        &self.sessions.stats
    }

    /// The request policy (workspace roots, allowed programs).
    pub fn policy(&self) -> &RequestPolicy {
        &self.policy
    }

    /// Parses and submits a request as users type it.
    pub async fn spawn(&self, request: SessionRequest) -> Result<SessionView, SessionError> {
        if let Some(node) = &request.node
            && node != self.node.as_str()
        {
            return Err(SessionError::UnknownNode(node.clone(), self.node.clone()));
        }
        let spec = request.into_spec(&self.policy)?;
        self.submit(spec).await
    }

    /// Submits a typed spec (the embedding API; policy on workdir and program is the caller's).
    pub async fn submit(&self, spec: SessionSpec) -> Result<SessionView, SessionError> {
        let admitted: Admitted = self
            .sessions
            .manager
            .call(|reply| ManagerMsg::Submit { spec, reply }, MANAGER_TIMEOUT)
            .await??;
        Ok(SessionView {
            record: admitted.record,
            queue_position: admitted.position,
            existing: admitted.existing,
        })
    }

    /// One session.
    pub async fn get(&self, id: &SessionId) -> Result<SessionView, SessionError> {
        let record = troupe_actors::session::SessionStore::get(&self.store, id)
            .await?
            .ok_or_else(|| SessionError::NotFound(id.clone()))?;
        let queue_position = self.position(&record).await;
        Ok(SessionView {
            record,
            queue_position,
            existing: false,
        })
    }

    async fn position(&self, record: &SessionRecord) -> Option<u64> {
        self.positions(std::slice::from_ref(record))
            .await
            .pop()
            .flatten()
    }

    /// The queue positions of `records`, in their order (`None` for those not queued). When
    /// the manager does not answer (it is restarting), none is known.
    async fn positions(&self, records: &[SessionRecord]) -> Vec<Option<u64>> {
        let queued: Vec<SessionId> = records
            .iter()
            .filter(|record| record.state == SessionState::Queued)
            .map(|record| record.id.clone())
            .collect();
        let mut known = if queued.is_empty() {
            Vec::new()
        } else {
            let ids = queued.clone();
            self.sessions
                .manager
                .call(
                    |reply| ManagerMsg::Positions { ids, reply },
                    MANAGER_TIMEOUT,
                )
                .await
                .unwrap_or_default()
        }
        .into_iter();
        records
            .iter()
            .map(|record| {
                if record.state == SessionState::Queued {
                    known.next().flatten()
                } else {
                    None
                }
            })
            .collect()
    }

    /// A page of session records, newest first.
    pub async fn list(&self, query: SessionQuery) -> Result<SessionPage, SessionError> {
        Ok(self.store.list(query).await?)
    }

    /// A page of sessions as the API shows them: the records, newest first, with the queue
    /// positions of the queued ones.
    pub async fn list_views(&self, query: SessionQuery) -> Result<SessionViewPage, SessionError> {
        let page = self.store.list(query).await?;
        let positions = self.positions(&page.sessions).await;
        Ok(SessionViewPage {
            sessions: page
                .sessions
                .into_iter()
                .zip(positions)
                .map(|(record, queue_position)| SessionView {
                    record,
                    queue_position,
                    existing: false,
                })
                .collect(),
            next_cursor: page.next_cursor,
        })
    }

    /// Cancels a session; idempotent (an ended session is returned as it is).
    pub async fn cancel(&self, id: &SessionId) -> Result<SessionView, SessionError> {
        let id = id.clone();
        let record = self
            .sessions
            .manager
            .call(|reply| ManagerMsg::Cancel { id, reply }, MANAGER_TIMEOUT)
            .await??;
        Ok(SessionView {
            record,
            queue_position: None,
            existing: false,
        })
    }

    /// Whether a session of this node holds the idempotency key `key`.
    pub async fn holds_key(&self, key: &str) -> Result<bool, SessionError> {
        Ok(self.store.find_by_key(key).await?.is_some())
    }

    /// A page of a session's output log.
    pub async fn output(
        &self,
        id: &SessionId,
        offset: u64,
        limit: usize,
    ) -> Result<OutputPage, SessionError> {
        self.get(id).await?;
        Ok(self.store.output(id, offset, limit).await?)
    }

    /// A session's output from line `offset` on, live until the session ends. The store is the
    /// source of truth; session events only say when to look again, so no line is missed even
    /// when the event stream coalesced a flood.
    pub async fn follow(
        &self,
        id: &SessionId,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<OutputLine, SessionError>> + Send + 'static, SessionError>
    {
        self.get(id).await?;
        let wake = self.events.subscribe(EventFilter {
            kinds: vec![KindPattern::Family("session".into())],
            sessions: vec![id.clone()],
            nodes: Vec::new(),
        });
        let follow = Follow {
            service: self.clone(),
            id: id.clone(),
            next: offset,
            buffer: std::collections::VecDeque::new(),
            wake,
            finished: false,
            retry: FollowRetry::default(),
            pause: None,
            poll: FOLLOW_POLL,
        };
        Ok(futures::stream::unfold(follow, |mut follow| async move {
            follow.next_line().await.map(|item| (item, follow))
        }))
    }
}

struct Follow {
    service: SessionService,
    id: SessionId,
    next: u64,
    buffer: std::collections::VecDeque<OutputLine>,
    wake: troupe_actors::event::Subscription,
    finished: bool,
    retry: FollowRetry,
    /// How long to wait before the next read, after a failed one.
    pause: Option<Duration>,
    /// How long to wait for an event before looking again anyway ([`next_poll`]).
    poll: Duration,
}

/// How soon a follower looks at the store again without an event, after an event or new lines
/// (a safety net: an event may come before the store has committed the lines it announces).
const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// The longest a follower goes without looking, once its session stays quiet: the wait doubles
/// from [`FOLLOW_POLL`] after each look that found nothing, so a thousand followers of quiet
/// runs do not read the store a thousand times a second.
const FOLLOW_POLL_MAX: Duration = Duration::from_secs(16);

/// The wait before the next look after `waited` ended: [`FOLLOW_POLL`] when an event ended it,
/// twice as long (up to [`FOLLOW_POLL_MAX`]) when nothing came.
fn next_poll(waited: Duration, woken: bool) -> Duration {
    if woken {
        FOLLOW_POLL
    } else {
        (waited * 2).min(FOLLOW_POLL_MAX)
    }
}
/// Failed reads in a row after which a follower gives up.
const FOLLOW_MAX_FAILURES: u32 = 5;

/// What a follower does after its store reads fail: wait longer each time (1, 2, 4, 8 s), and
/// give up after [`FOLLOW_MAX_FAILURES`] in a row, rather than spin on a broken store.
#[derive(Debug, Default)]
struct FollowRetry {
    failures: u32,
}

impl FollowRetry {
    /// A read failed: how long to wait before the next, or `None` to give up.
    fn failed(&mut self) -> Option<Duration> {
        self.failures += 1;
        (self.failures < FOLLOW_MAX_FAILURES).then(|| FOLLOW_POLL * (1 << (self.failures - 1)))
    }

    /// A read worked: the count starts again.
    fn succeeded(&mut self) {
        self.failures = 0;
    }
}

impl Follow {
    async fn next_line(&mut self) -> Option<Result<OutputLine, SessionError>> {
        loop {
            if let Some(line) = self.buffer.pop_front() {
                return Some(Ok(line));
            }
            if self.finished {
                return None;
            }
            if let Some(pause) = self.pause.take() {
                tokio::time::sleep(pause).await;
            }
            match self.read().await {
                Ok(true) => {
                    self.poll = FOLLOW_POLL;
                    continue;
                }
                Ok(false) => {}
                Err(error) => {
                    match self.retry.failed() {
                        Some(pause) => self.pause = Some(pause),
                        None => self.finished = true,
                    }
                    return Some(Err(error));
                }
            }
            // Any event of the session (or a lag marker) is a reason to look again.
            let woken = tokio::time::timeout(self.poll, self.wake.recv())
                .await
                .is_ok();
            self.poll = next_poll(self.poll, woken);
        }
    }

    /// Reads the next lines into the buffer; true when there is something to go on with (lines,
    /// or the end).
    async fn read(&mut self) -> Result<bool, SessionError> {
        // Whether the session has ended must be read before the output, so that lines written
        // before the end are all in the page read next.
        let ended = self.service.get(&self.id).await?.record.state.is_terminal();
        let page = self.service.store.output(&self.id, self.next, 1000).await?;
        self.retry.succeeded();
        if let Some(last) = page.lines.last() {
            self.next = last.line;
        }
        let got_lines = !page.lines.is_empty();
        self.buffer.extend(page.lines);
        if !got_lines && ended {
            // The end is recorded after the last line: nothing more will come.
            self.finished = true;
        }
        Ok(got_lines || ended)
    }
}

#[cfg(test)]
mod follow_tests {
    use super::*;

    #[test]
    fn a_follower_of_a_quiet_run_looks_less_often_and_an_event_brings_it_back() {
        let mut poll = FOLLOW_POLL;
        let quiet: Vec<_> = (0..6)
            .map(|_| {
                poll = next_poll(poll, false);
                poll.as_secs()
            })
            .collect();
        assert_eq!(quiet, [2, 4, 8, 16, 16, 16]);
        assert_eq!(next_poll(poll, true), FOLLOW_POLL);
    }

    #[test]
    fn a_follower_waits_longer_after_each_failed_read_then_gives_up() {
        let mut retry = FollowRetry::default();
        let waits: Vec<_> = std::iter::from_fn(|| retry.failed()).collect();
        assert_eq!(
            waits,
            [1, 2, 4, 8].map(Duration::from_secs),
            "then it gives up"
        );
        retry.succeeded();
        assert_eq!(
            retry.failed(),
            Some(FOLLOW_POLL),
            "a read that works starts again"
        );
    }
}
