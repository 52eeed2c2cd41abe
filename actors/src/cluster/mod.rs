//! The cluster, actor side: who the members are (foca's SWIM in the [`membership`] actor, over
//! datagrams the node carries), what they say about themselves ([`meta`]), and the ports the
//! node implements ([`ports`]). No sockets here: the QUIC endpoint lives in `src/cluster`.

pub mod identity;
pub mod membership;
pub mod meta;
pub mod peer;
pub mod ports;
pub(crate) mod screen;

pub use identity::NodeIdentity;
pub use membership::{
    GenerationFloor, LocalMeta, MAX_PACKET_BYTES, MembershipActor, MembershipArgs, MembershipMsg,
    MembershipProfile, RelayPorts,
};
pub use meta::{
    BreakerPosition, MAX_META_BYTES, META_FORMAT, NodeLoad, NodeMeta, ProviderHealth, meta_budget,
};
pub use peer::{BatchError, LinkReports, PeerActor, PeerMsg, RelaySource};
pub use ports::{CodecError, DatagramTransport, MembershipCodec, WireFault};
pub use screen::{MAX_GENERATION_LEAD, MAX_MEMBERS};
