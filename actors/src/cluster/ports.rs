//! The ports of the cluster: what the membership and peer actors need from the outside world,
//! implemented over QUIC by the node (`src/cluster`) and in memory by [`super::memory`] (tests,
//! simulations). Every method returns at once: sends queue or drop, slow work comes back later as
//! a message to the actor that asked.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::identity::NodeIdentity;
use super::inbox::RelayInbox;
use super::membership::MembershipMsg;
use super::meta::NodeMeta;
use super::peer::PeerMsg;
use crate::event::Event;
use crate::ids::NodeId;
use crate::kernel::ActorHandle;

/// Why a value could not be encoded or decoded by the membership codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("membership codec: {0}")]
pub struct CodecError(pub String);

/// Why the transport could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Nothing answered at the address in time.
    #[error("{addr} is unreachable: {reason}")]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer answered but the connection was refused (certificate, version, identity).
    #[error("{addr} refused the connection: {reason}")]
    Refused {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The transport is shutting down.
    #[error("the cluster transport is closed")]
    Closed,
}

/// The wire format of membership packets and metadata (the node plugs in its one wire codec).
pub trait MembershipCodec: Send + Sync + 'static {
    /// Appends an encoded foca header to `out`.
    fn encode_header(
        &self,
        header: &foca::Header<NodeIdentity>,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError>;
    /// Decodes a header from the front of `bytes`; returns it and the bytes it used.
    fn decode_header(
        &self,
        bytes: &[u8],
    ) -> Result<(foca::Header<NodeIdentity>, usize), CodecError>;
    /// Appends an encoded member to `out`.
    fn encode_member(
        &self,
        member: &foca::Member<NodeIdentity>,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError>;
    /// Decodes a member from the front of `bytes`; returns it and the bytes it used.
    fn decode_member(
        &self,
        bytes: &[u8],
    ) -> Result<(foca::Member<NodeIdentity>, usize), CodecError>;
    /// Encodes a metadata item.
    fn encode_meta(&self, meta: &NodeMeta) -> Result<Vec<u8>, CodecError>;
    /// Decodes a metadata item that must use all of `bytes`.
    fn decode_meta(&self, bytes: &[u8]) -> Result<NodeMeta, CodecError>;
}

/// Carries membership datagrams. Like UDP: a datagram that cannot go now is dropped.
pub trait DatagramTransport: Send + Sync + 'static {
    /// Sends `payload` to `to` (dialing it first if needed). Never blocks.
    fn send(&self, to: &NodeIdentity, payload: Vec<u8>);
    /// Finds out which node answers at `addr` (a seed given as an address only).
    fn resolve(&self, addr: SocketAddr) -> BoxFuture<'static, Result<NodeId, TransportError>>;
    /// Largest payload [`DatagramTransport::send`] carries.
    fn max_payload(&self) -> usize;
}

/// Carries the event relay: one link per peer, from this node's events to that peer's bus.
pub trait RelayTransport: Send + Sync + 'static {
    /// Opens a link to `peer`. The link dials and shakes hands in the background and tells
    /// `reports` how it goes (up with the peer's cursor, acks, down).
    fn open(&self, peer: &NodeIdentity, reports: RelayReports) -> Box<dyn RelayLink>;
}

/// One open relay link. Dropping it closes it.
pub trait RelayLink: Send + 'static {
    /// Queues a batch (events of this node, in sequence order, without gaps). Never blocks; the
    /// caller bounds what is in flight by waiting for acks. Returns the batch when the link is
    /// closed.
    fn send(&mut self, batch: Vec<Arc<Event>>) -> Result<(), Vec<Arc<Event>>>;
}

/// What both sides of the transport need from the node's tree, handed over once at start.
#[derive(Clone)]
pub struct ClusterInbound {
    /// Where incoming datagrams go.
    pub membership: ActorHandle<MembershipMsg>,
    /// Where incoming relayed events go.
    pub relay: RelayInbox,
}

/// A whole cluster transport: datagrams, relay links, and the inbound side.
pub trait ClusterTransport: DatagramTransport + RelayTransport {
    /// Connects the inbound side to the tree (called once, when the tree starts).
    fn attach(&self, inbound: ClusterInbound);
}

/// Reads this node's persisted events, for a peer that must catch up.
pub trait EventLog: Send + Sync + 'static {
    /// This node's own events with a sequence number above `after`, oldest first, at most
    /// `limit`. Everything the bus accepted before the call is included (the log is flushed
    /// first); events retention already deleted are simply absent.
    fn own_events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<Arc<Event>>, String>>;
}

/// How a relay link reports to its PeerActor. Reports of a link that was replaced are ignored
/// by the actor (each link has its own number).
#[derive(Clone)]
pub struct RelayReports {
    peer: ActorHandle<PeerMsg>,
    link: u64,
}

impl RelayReports {
    pub(crate) fn new(peer: ActorHandle<PeerMsg>, link: u64) -> Self {
        Self { peer, link }
    }

    /// The link is up; the peer has this node's events up to `cursor`.
    pub fn up(&self, cursor: u64) {
        let _ = self.peer.cast(PeerMsg::LinkUp {
            link: self.link,
            cursor,
        });
    }

    /// The peer has handled this node's events up to `seq`.
    pub fn acked(&self, seq: u64) {
        let _ = self.peer.cast(PeerMsg::Acked {
            link: self.link,
            seq,
        });
    }

    /// The link is gone (or never came up).
    pub fn down(&self, reason: String) {
        let _ = self.peer.cast(PeerMsg::LinkDown {
            link: self.link,
            reason,
        });
    }
}
