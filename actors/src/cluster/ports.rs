//! The ports of the cluster: what the membership actor needs from the outside world,
//! implemented over QUIC by the node (`src/cluster`) and in memory by tests. Every method
//! returns at once: sends queue or drop, slow work comes back later as a message.

use std::net::SocketAddr;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::identity::NodeIdentity;
use super::meta::NodeMeta;
use crate::ids::NodeId;

/// Why a value could not be encoded or decoded by the membership codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("membership codec: {0}")]
pub struct CodecError(pub String);

/// The wire format of membership packets and metadata (the node plugs in its one wire codec).
pub trait MembershipCodec: Send + Sync + 'static {
    /// Encodes a foca header.
    fn encode_header(&self, header: &foca::Header<NodeIdentity>) -> Result<Vec<u8>, CodecError>;
    /// Decodes a header from the front of `bytes`; returns it and the bytes it used.
    fn decode_header(
        &self,
        bytes: &[u8],
    ) -> Result<(foca::Header<NodeIdentity>, usize), CodecError>;
    /// Encodes a member.
    fn encode_member(&self, member: &foca::Member<NodeIdentity>) -> Result<Vec<u8>, CodecError>;
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
    fn send(&self, to: &NodeIdentity, payload: Bytes);
    /// Finds out which node answers at `addr` (a seed given as an address only).
    fn resolve(&self, addr: SocketAddr) -> BoxFuture<'static, Result<NodeId, String>>;
    /// `from` sent a datagram that breaks the protocol: log it naming the peer, count it, and
    /// close the connection to `from` when [`WireFault::closes_connection`] says so. Never
    /// blocks.
    fn reject(&self, from: &NodeId, fault: WireFault, detail: &str);
    /// `from` told of `count` members this node did not take because it tracks as many as it
    /// may ([`crate::cluster::MAX_MEMBERS`]): count them (the membership logs them). Never
    /// blocks.
    fn members_refused(&self, from: &NodeId, count: usize);
    /// The membership forgot `node` (down for foca's `remove_down_after`): drop whatever is
    /// kept for sending to it (a made-up node must not keep a sender for good). Never blocks.
    fn forget(&self, node: &NodeId);
}

/// How a peer broke the cluster's wire protocol (the `reason` label of
/// `troupe_cluster_wire_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFault {
    /// A stream frame that does not decode as a frame.
    MalformedFrame,
    /// A stream frame whose length prefix is over the frame cap.
    OversizedFrame,
    /// A stream that ended inside a frame.
    TruncatedFrame,
    /// A relay handshake with a protocol version this node does not speak.
    UnknownVersion,
    /// A frame that is valid but out of turn (a batch before the handshake, an ack nobody
    /// asked for, …).
    UnexpectedFrame,
    /// A relayed event of another node than the peer that sent it.
    ForeignEvent,
    /// A membership datagram over the packet cap.
    OversizedDatagram,
    /// A membership datagram that does not decode (header, members or metadata).
    MalformedDatagram,
    /// A membership datagram that claims to come from another node than its connection's
    /// certificate (or from this node).
    SpoofedDatagram,
    /// Node metadata in a layout this build does not read (a newer node): the metadata is
    /// ignored, the rest of the datagram is used.
    UnknownMetaFormat,
    /// A membership datagram naming a generation (of any node, in the header, a member update
    /// or metadata) more than [`crate::cluster::MAX_GENERATION_LEAD`] ahead of this node's
    /// clock: the datagram is dropped.
    FutureGeneration,
}

impl WireFault {
    /// Every fault, for metrics.
    pub const ALL: [WireFault; 11] = [
        WireFault::MalformedFrame,
        WireFault::OversizedFrame,
        WireFault::TruncatedFrame,
        WireFault::UnknownVersion,
        WireFault::UnexpectedFrame,
        WireFault::ForeignEvent,
        WireFault::OversizedDatagram,
        WireFault::MalformedDatagram,
        WireFault::SpoofedDatagram,
        WireFault::UnknownMetaFormat,
        WireFault::FutureGeneration,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WireFault::MalformedFrame => "malformed_frame",
            WireFault::OversizedFrame => "oversized_frame",
            WireFault::TruncatedFrame => "truncated_frame",
            WireFault::UnknownVersion => "unknown_version",
            WireFault::UnexpectedFrame => "unexpected_frame",
            WireFault::ForeignEvent => "foreign_event",
            WireFault::OversizedDatagram => "oversized_datagram",
            WireFault::MalformedDatagram => "malformed_datagram",
            WireFault::SpoofedDatagram => "spoofed_datagram",
            WireFault::UnknownMetaFormat => "unknown_meta_format",
            WireFault::FutureGeneration => "future_generation",
        }
    }

    /// Whether the whole connection to the peer is closed (datagram faults: a datagram has no
    /// stream of its own to close, and a peer that sends broken membership packets is not one
    /// to keep gossiping with; it redials). Stream faults close only their stream (the
    /// connection also carries membership and other streams, which a broken frame on one
    /// stream does not affect), and unknown metadata formats only skip the metadata, so a
    /// newer node can still be a member. A generation from the future drops only its datagram:
    /// the sender may have only passed on what a node of an older build took, or its clock
    /// (and with it its own generation) may be wrong, which a redial does not mend.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            WireFault::OversizedDatagram
                | WireFault::MalformedDatagram
                | WireFault::SpoofedDatagram
        )
    }
}

/// foca's codec, over a [`MembershipCodec`].
pub(crate) struct FocaCodec(pub(crate) std::sync::Arc<dyn MembershipCodec>);

fn put(bytes: &[u8], mut buf: impl bytes::BufMut) -> Result<(), CodecError> {
    if buf.remaining_mut() < bytes.len() {
        return Err(CodecError(format!(
            "{} bytes do not fit in the {} left in the packet",
            bytes.len(),
            buf.remaining_mut()
        )));
    }
    buf.put_slice(bytes);
    Ok(())
}

impl foca::Codec<NodeIdentity> for FocaCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &foca::Header<NodeIdentity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), CodecError> {
        put(&self.0.encode_header(header)?, buf)
    }

    fn decode_header(
        &mut self,
        mut buf: impl bytes::Buf,
    ) -> Result<foca::Header<NodeIdentity>, CodecError> {
        let (header, used) = self.0.decode_header(buf.chunk())?;
        buf.advance(used);
        Ok(header)
    }

    fn encode_member(
        &mut self,
        member: &foca::Member<NodeIdentity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), CodecError> {
        put(&self.0.encode_member(member)?, buf)
    }

    fn decode_member(
        &mut self,
        mut buf: impl bytes::Buf,
    ) -> Result<foca::Member<NodeIdentity>, CodecError> {
        let (member, used) = self.0.decode_member(buf.chunk())?;
        buf.advance(used);
        Ok(member)
    }
}
