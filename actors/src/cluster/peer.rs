//! The PeerActor: one per cluster peer, under the ClusterSupervisor. It pulls the peer's own
//! events over a relay link (opened through the [`RelaySource`] port) and publishes them on this
//! node's bus with their original ids. It keeps the cursor: the highest sequence number of the
//! peer it has handed to the bus. A new link (after a disconnect, or when the peer comes back with
//! a new generation) asks for the events after that cursor, so nothing is lost and, since the bus
//! also drops any `(node, seq)` it has seen, nothing is duplicated.
//!
//! Flow control: a link hands over one batch at a time and waits for the answer (the new cursor)
//! before it acknowledges and reads the next, so at most one batch per peer is in this node's
//! memory; the sender waits for that acknowledgement before it sends more.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use ractor::RpcReplyPort;
use tokio_util::sync::DropGuard;

use super::identity::NodeIdentity;
use crate::event::{Event, EventBus};
use crate::ids::NodeId;
use crate::kernel::{Actor, ActorError, ActorHandle, Context};

/// How long after a failed link the next one is tried.
pub const RELINK_AFTER: Duration = Duration::from_millis(500);

/// Opens relay links (the node implements it over QUIC streams).
pub trait RelaySource: Send + Sync + 'static {
    /// Opens a link to `peer` asking for its events after `after` (`None`: only new ones).
    /// The link reports to `reports`; dropping the returned guard closes it.
    fn open(&self, peer: &NodeIdentity, after: Option<u64>, reports: LinkReports) -> DropGuard;
}

/// How a link reports to its PeerActor. Reports of a replaced link are ignored.
#[derive(Clone)]
pub struct LinkReports {
    peer: ActorHandle<PeerMsg>,
    link: u64,
}

impl LinkReports {
    /// Hands a batch (the peer's events, in order) to the actor; returns the cursor after it,
    /// to acknowledge to the sender.
    pub async fn batch(&self, events: Vec<Event>) -> Result<u64, String> {
        let link = self.link;
        self.peer
            .call(
                |reply| PeerMsg::Batch {
                    link,
                    events,
                    reply,
                },
                Duration::from_secs(30),
            )
            .await
            .map_err(|error| error.to_string())
    }

    /// The link ended (or never came up).
    pub fn down(&self, reason: String) {
        let _ = self.peer.cast(PeerMsg::LinkDown {
            link: self.link,
            reason,
        });
    }
}

/// The cursors of every peer; they outlive PeerActor instances (one writer: that peer's actor).
pub type RelayCursors = Arc<DashMap<NodeId, u64>>;

/// Arguments of a PeerActor.
#[derive(Clone)]
pub struct PeerArgs {
    /// The peer as membership last saw it.
    pub peer: NodeIdentity,
    /// Where relayed events go.
    pub events: EventBus,
    /// Opens links.
    pub source: Arc<dyn RelaySource>,
    /// Cursors kept across restarts.
    pub cursors: RelayCursors,
}

/// Messages of a PeerActor.
pub enum PeerMsg {
    /// The peer is up at this identity (a new generation or address relinks at once).
    Up(NodeIdentity),
    /// The peer is down or left: stop linking until it is up again.
    Down,
    /// A batch from link `link`.
    Batch {
        /// The link.
        link: u64,
        /// The peer's events.
        events: Vec<Event>,
        /// The cursor after the batch.
        reply: RpcReplyPort<u64>,
    },
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
    fn cursor(&self) -> Option<u64> {
        self.args
            .cursors
            .get(&self.args.peer.node)
            .map(|cursor| *cursor)
    }

    fn open(&mut self, ctx: &Context<PeerMsg>) {
        self.link += 1;
        let reports = LinkReports {
            peer: ctx.handle().clone(),
            link: self.link,
        };
        // Dropping the old guard closes the old link.
        self.guard = Some(
            self.args
                .source
                .open(&self.args.peer, self.cursor(), reports),
        );
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
            PeerMsg::Batch {
                link,
                events,
                reply,
            } => {
                if link != state.link {
                    return Ok(());
                }
                let node = state.args.peer.node.clone();
                let mut cursor = state.cursor().unwrap_or(0);
                for event in events {
                    if event.id.node != node || event.id.seq <= cursor {
                        continue;
                    }
                    cursor = event.id.seq;
                    state.args.events.relay(event);
                }
                state.args.cursors.insert(node, cursor);
                let _ = reply.send(cursor);
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
