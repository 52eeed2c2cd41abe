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
