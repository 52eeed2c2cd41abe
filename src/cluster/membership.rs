//! The membership's ports over the QUIC endpoint: the wire codec for foca's packets and node
//! metadata, datagrams out through the endpoint's per-peer senders, datagrams in to the
//! MembershipActor.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use troupe_actors::cluster::{
    CodecError, DatagramTransport, MembershipCodec, MembershipMsg, NodeIdentity, NodeMeta,
};
use troupe_actors::ids::NodeId;
use troupe_actors::kernel::ActorHandle;

use super::endpoint::{ClusterEndpoint, Inbound};
use crate::wire;

/// foca's packets and node metadata in the wire codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireCodec;

fn codec_error(error: wire::WireError) -> CodecError {
    CodecError(error.to_string())
}

impl MembershipCodec for WireCodec {
    fn encode_header(&self, header: &foca::Header<NodeIdentity>) -> Result<Vec<u8>, CodecError> {
        wire::encode(header).map_err(codec_error)
    }

    fn decode_header(
        &self,
        bytes: &[u8],
    ) -> Result<(foca::Header<NodeIdentity>, usize), CodecError> {
        wire::decode_prefix(bytes).map_err(codec_error)
    }

    fn encode_member(&self, member: &foca::Member<NodeIdentity>) -> Result<Vec<u8>, CodecError> {
        wire::encode(member).map_err(codec_error)
    }

    fn decode_member(
        &self,
        bytes: &[u8],
    ) -> Result<(foca::Member<NodeIdentity>, usize), CodecError> {
        wire::decode_prefix(bytes).map_err(codec_error)
    }

    fn encode_meta(&self, meta: &NodeMeta) -> Result<Vec<u8>, CodecError> {
        wire::encode(meta).map_err(codec_error)
    }

    fn decode_meta(&self, bytes: &[u8]) -> Result<NodeMeta, CodecError> {
        wire::decode(bytes).map_err(codec_error)
    }
}

/// Membership datagrams over the endpoint.
#[derive(Clone)]
pub struct QuicDatagrams(pub ClusterEndpoint);

impl DatagramTransport for QuicDatagrams {
    fn send(&self, to: &NodeIdentity, payload: Bytes) {
        self.0.send_datagram(&to.node, to.addr, payload);
    }

    fn resolve(&self, addr: SocketAddr) -> BoxFuture<'static, Result<NodeId, String>> {
        let endpoint = self.0.clone();
        async move {
            endpoint
                .connect(addr, None)
                .await
                .map(|(node, _)| node)
                .map_err(|error| error.to_string())
        }
        .boxed()
    }
}

/// Incoming datagrams to the MembershipActor.
pub struct MembershipInbound(pub ActorHandle<MembershipMsg>);

impl Inbound for MembershipInbound {
    fn datagram(&self, from: &NodeId, bytes: Bytes) {
        let _ = self.0.cast(MembershipMsg::Datagram {
            from: from.clone(),
            bytes,
        });
    }
}

/// Attaches the membership actor to the endpoint.
pub fn attach(endpoint: &ClusterEndpoint, membership: ActorHandle<MembershipMsg>) {
    endpoint.attach(Arc::new(MembershipInbound(membership)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_members_decode_back_to_back() {
        let identity = NodeIdentity {
            node: NodeId::new("a").unwrap(),
            addr: "127.0.0.1:7071".parse().unwrap(),
            generation: 7,
        };
        let header = foca::Header {
            src: identity.clone(),
            src_incarnation: 3,
            dst: identity.clone(),
            message: foca::Message::Announce,
        };
        let member = foca::Member::alive(identity);
        let mut packet = WireCodec.encode_header(&header).unwrap();
        packet.extend(WireCodec.encode_member(&member).unwrap());
        let (decoded, used) = WireCodec.decode_header(&packet).unwrap();
        assert_eq!(decoded, header);
        let (again, rest) = WireCodec.decode_member(&packet[used..]).unwrap();
        assert_eq!(again, member);
        assert_eq!(used + rest, packet.len());
        for cut in 0..packet.len() {
            let _ = WireCodec.decode_header(&packet[..cut]);
            let _ = WireCodec.decode_member(&packet[cut..]);
        }
    }
}
