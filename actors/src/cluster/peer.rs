//! The PeerActor: one per cluster peer, under the ClusterSupervisor. It keeps a relay link open
//! to the peer (through the [`RelaySource`] port) while the peer is up; the link pulls the peer's
//! own events and hands them to this node's bus, which keeps their original ids.
//!
//! The cursor is the bus's: the highest sequence number of the peer the bus has taken (seeded
//! from the event log when the node starts). A new link (after a disconnect, a crash of this
//! actor, the peer's return with a new generation, or this node's restart) asks for the events
//! after it, so nothing is lost, and since the bus drops any `(node, seq)` not above it, nothing
//! is duplicated.
//!
//! Flow control: a link hands a batch to the bus and waits until the bus has taken it and the
//! store has written it before it acknowledges it to the sender, which keeps only a few
//! unacknowledged batches in flight. So a slow bus or disk here slows the sender, what the
//! sender was told is here is in the log, and memory per peer stays bounded end to end. A batch
//! the store failed to write is never acknowledged: the bus rewinds the cursor to before it and
//! the link ends, so the next one fetches it again.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::DropGuard;

use super::identity::NodeIdentity;
use crate::event::{Event, EventBus, EventId, RelayBatchError};
use crate::ids::NodeId;
use crate::kernel::{Actor, ActorError, ActorHandle, CallError, Context};

/// How long after a failed link the next one is tried.
pub const RELINK_AFTER: Duration = Duration::from_millis(500);

/// Opens relay links (the node implements it over QUIC streams).
pub trait RelaySource: Send + Sync + 'static {
    /// Opens a link to `peer` asking for its events after `after` (`None`: only new ones).
    /// The link reports to `reports`; dropping the returned guard closes it.
    fn open(&self, peer: &NodeIdentity, after: Option<u64>, reports: LinkReports) -> DropGuard;
}

/// Why a batch was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch holds an event of another node than the peer (a peer speaks only for itself).
    #[error("the batch holds event {0} of another node than the peer")]
    ForeignEvent(EventId),
    /// The bus did not take it in time (or is gone).
    #[error("the bus did not take the batch: {0}")]
    Bus(#[from] CallError),
    /// The bus took it but the store did not write it: it is not acknowledged, and the next
    /// link asks for it again.
    #[error("{0}")]
    NotWritten(String),
}

impl From<RelayBatchError> for BatchError {
    fn from(error: RelayBatchError) -> Self {
        match error {
            RelayBatchError::Bus(error) => Self::Bus(error),
            error @ (RelayBatchError::NotWritten(_) | RelayBatchError::Rewound) => {
                Self::NotWritten(error.to_string())
            }
        }
    }
}

/// How a link hands over what it receives, and tells its PeerActor that it ended. Reports of a
/// replaced link are ignored.
#[derive(Clone)]
pub struct LinkReports {
    peer: ActorHandle<PeerMsg>,
    link: u64,
    node: NodeId,
    events: EventBus,
    /// The node's rewind count when the link opened: after a rewind, the link's batches are
    /// refused and the next link asks from the rewound cursor.
    rewinds: u64,
}

impl LinkReports {
    /// The peer this link is to.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The peer said its stream starts after `after`; returns the cursor to expect events after
    /// (the higher of the two: nothing at or below it is taken).
    pub async fn welcome(&self, after: u64) -> Result<u64, BatchError> {
        Ok(self
            .events
            .relay_batch_of_link(&self.node, Some(self.rewinds), Some(after), Vec::new())
            .await?)
    }

    /// Hands a batch (the peer's events, in order) to the bus at once; the future resolves once
    /// the bus has taken it and the store has written it, with the cursor to acknowledge to the
    /// sender. Batches handed over
    /// one after another are taken in that order, so a link may hand over the next one before
    /// the previous one is answered.
    pub fn batch(
        &self,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<u64, BatchError>> + Send + 'static {
        let foreign = events
            .iter()
            .find(|event| event.id.node != self.node)
            .map(|event| event.id.clone());
        let taken = match foreign {
            Some(id) => Err(BatchError::ForeignEvent(id)),
            None => {
                Ok(self
                    .events
                    .relay_batch_of_link(&self.node, Some(self.rewinds), None, events))
            }
        };
        async move { Ok(taken?.await?) }
    }

    /// Resolves once the peer's stream has been rewound since the link opened (a relayed write
    /// failed): the link must end, so that the next one asks from the rewound cursor.
    pub fn rewound(&self) -> impl Future<Output = ()> + Send + 'static {
        self.events.relay_rewound(&self.node, self.rewinds)
    }

    /// The link ended (or never came up).
    pub fn down(&self, reason: String) {
        let _ = self.peer.cast(PeerMsg::LinkDown {
            link: self.link,
            reason,
        });
    }
}

/// Arguments of a PeerActor.
#[derive(Clone)]
pub struct PeerArgs {
    /// The peer as membership last saw it.
    pub peer: NodeIdentity,
    /// Where relayed events go.
    pub events: EventBus,
    /// Opens links.
    pub source: Arc<dyn RelaySource>,
}

/// Messages of a PeerActor.
pub enum PeerMsg {
    /// The peer is up at this identity (a new generation or address relinks at once).
    Up(NodeIdentity),
    /// The peer is down or left: stop linking until it is up again.
    Down,
    /// Link `link` ended.
    LinkDown {
        /// The link.
        link: u64,
        /// Why.
        reason: String,
    },
    /// Time to try link `link` again.
    Relink {
        /// The link that failed.
        link: u64,
    },
}

/// State of a PeerActor.
pub struct PeerState {
    args: PeerArgs,
    up: bool,
    link: u64,
    guard: Option<DropGuard>,
}

impl PeerState {
    fn open(&mut self, ctx: &Context<PeerMsg>) {
        self.link += 1;
        let node = self.args.peer.node.clone();
        // In this order: a rewind in between makes the link's batches refused, not lost.
        let rewinds = self.args.events.relay_rewinds(&node);
        let cursor = self.args.events.relayed_through(&node);
        let reports = LinkReports {
            peer: ctx.handle().clone(),
            link: self.link,
            node,
            events: self.args.events.clone(),
            rewinds,
        };
        // Dropping the old guard closes the old link first.
        self.guard = None;
        self.guard = Some(self.args.source.open(&self.args.peer, cursor, reports));
    }
}

/// The PeerActor.
pub struct PeerActor;

impl Actor for PeerActor {
    type Msg = PeerMsg;
    type State = PeerState;
    type Arguments = PeerArgs;

    async fn pre_start(
        &self,
        ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let mut state = PeerState {
            args,
            up: true,
            link: 0,
            guard: None,
        };
        state.open(ctx);
        Ok(state)
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            PeerMsg::Up(identity) => {
                let changed = identity != state.args.peer;
                state.args.peer = identity;
                if changed || !state.up {
                    state.up = true;
                    state.open(ctx);
                }
            }
            PeerMsg::Down => {
                state.up = false;
                state.guard = None;
            }
            PeerMsg::LinkDown { link, reason } => {
                if link == state.link && state.up {
                    tracing::debug!(peer = %state.args.peer, %reason, "relay link down");
                    state.guard = None;
                    ctx.send_after(RELINK_AFTER, PeerMsg::Relink { link });
                }
            }
            PeerMsg::Relink { link } => {
                if link == state.link && state.up && state.guard.is_none() {
                    state.open(ctx);
                }
            }
        }
        Ok(())
    }
}
