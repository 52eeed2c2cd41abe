//! Node metadata gossiped with the membership protocol (foca custom broadcasts): load and
//! capacity, labels, providers with their breaker position, the HTTP address, and whether the
//! node is leaving. Versioned twice over: `format` is the layout (a node refuses a format it does
//! not know), `version` orders one node's updates (a higher one replaces a lower one). Every
//! encoded item stays within [`MAX_META_BYTES`]: [`NodeMeta::fit`] drops what does not fit and
//! says so.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use super::identity::NodeIdentity;
use super::ports::{CodecError, MembershipCodec};
use crate::ids::NodeId;

/// The layout of [`NodeMeta`] this build writes and reads.
pub const META_FORMAT: u8 = 1;
/// Largest encoded metadata item accepted from a peer.
pub const MAX_META_BYTES: usize = 1024;

/// The largest metadata item this node sends with `codec`: [`MAX_META_BYTES`], or less when
/// that would not fit in a membership packet after the largest header of a message that carries
/// metadata (a ping, an ack or a gossip between two node ids of the longest length at IPv6
/// addresses) and the two 2-byte counts foca writes. foca only puts an item in a packet with
/// room for all of it, so a larger one would never leave this node: peers would never learn its
/// HTTP address, labels or load.
pub fn meta_budget(codec: &dyn MembershipCodec) -> usize {
    let longest = NodeIdentity {
        node: NodeId::new("n".repeat(crate::ids::MAX_ID_LEN)).expect("a valid id"),
        addr: std::net::SocketAddr::new(std::net::Ipv6Addr::from(u128::MAX).into(), u16::MAX),
        generation: u64::MAX,
    };
    let header = foca::Header {
        src: longest.clone(),
        src_incarnation: foca::Incarnation::MAX,
        dst: longest,
        message: foca::Message::Ping(u8::MAX),
    };
    match codec.encode_header(&header) {
        Ok(bytes) => MAX_META_BYTES.min(
            super::membership::MAX_PACKET_BYTES
                .saturating_sub(bytes.len())
                .saturating_sub(2 * 2),
        ),
        // Nothing else encodes either; the item's own encoding says so.
        Err(_) => MAX_META_BYTES,
    }
}

/// How busy a node is and how much it can take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Sessions running.
    pub running: u32,
    /// Sessions waiting for a slot.
    pub queued: u32,
    /// Sessions it runs at once.
    pub max_concurrent: u32,
    /// Sessions it lets wait.
    pub queue_capacity: u32,
}

impl NodeLoad {
    /// True when a new session would be admitted (a free slot or room in the queue).
    pub fn has_room(&self) -> bool {
        self.running < self.max_concurrent || self.queued < self.queue_capacity
    }

    /// Work per slot: `(running + queued) / max_concurrent`; lower is less loaded. Summed as
    /// `f64`: the counters come from peers' gossip, and a `u32` sum of two large ones would
    /// panic in a debug build, or wrap to a small ratio that always wins placement.
    pub fn ratio(&self) -> f64 {
        (f64::from(self.running) + f64::from(self.queued)) / f64::from(self.max_concurrent.max(1))
    }
}

/// Where a provider's circuit breaker stands, as its node last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerPosition {
    /// Calls flow.
    Closed,
    /// Calls are refused.
    Open,
    /// Probe calls decide.
    HalfOpen,
}

/// One provider of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderHealth {
    /// Its configured name.
    pub name: String,
    /// Its breaker.
    pub breaker: BreakerPosition,
}

/// What a node tells the cluster about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Layout version ([`META_FORMAT`]).
    pub format: u8,
    /// The node.
    pub node: NodeId,
    /// The generation of the identity that published it.
    pub generation: u64,
    /// Grows with every update the node publishes.
    pub version: u64,
    /// Its HTTP address, when it serves HTTP.
    pub http: Option<String>,
    /// Load and capacity.
    pub load: NodeLoad,
    /// Labels (placement constraints match them).
    pub labels: BTreeMap<String, String>,
    /// Providers and their breakers.
    pub providers: Vec<ProviderHealth>,
    /// True when the node is leaving the cluster on purpose.
    pub leaving: bool,
    /// True when providers or labels were left out to stay under [`MAX_META_BYTES`].
    pub truncated: bool,
}

impl NodeMeta {
    /// The content without the bookkeeping, to tell whether anything changed.
    pub fn same_content(&self, other: &Self) -> bool {
        self.http == other.http
            && self.load == other.load
            && self.labels == other.labels
            && self.providers == other.providers
            && self.leaving == other.leaving
    }

    /// Encodes the item, dropping providers and then labels (last first) until it fits in
    /// [`meta_budget`] (at most [`MAX_META_BYTES`]); `truncated` says when something was
    /// dropped.
    pub fn fit(&mut self, codec: &dyn MembershipCodec) -> Result<Vec<u8>, CodecError> {
        let budget = meta_budget(codec);
        loop {
            let bytes = codec.encode_meta(self)?;
            if bytes.len() <= budget {
                return Ok(bytes);
            }
            self.truncated = true;
            if self.providers.pop().is_some() {
                continue;
            }
            if let Some(last) = self.labels.keys().next_back().cloned() {
                self.labels.remove(&last);
                continue;
            }
            return Err(CodecError(format!(
                "node metadata is {} bytes without providers or labels; at most {budget}",
                bytes.len()
            )));
        }
    }
}

/// The key foca keeps a metadata broadcast under: a newer one of the same node replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaKey {
    node: NodeId,
    generation: u64,
    version: u64,
}

impl foca::Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node
            && (self.generation, self.version) >= (other.generation, other.version)
    }
}

/// Why a metadata item was refused.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Larger than [`MAX_META_BYTES`].
    #[error("metadata item of {0} bytes is larger than the {MAX_META_BYTES} allowed")]
    TooLarge(usize),
    /// Not decodable.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A layout this build does not know.
    #[error("metadata format {0} is unknown (this node reads format {META_FORMAT})")]
    UnknownFormat(u8),
}

/// Receives metadata broadcasts inside foca: keeps the newest version per node and hands new
/// ones to the membership actor through a channel the actor drains after every input. The
/// actor tells it, through another channel, which nodes it forgot, so that `newest` holds only
/// members (the actor's screen lets metadata of members only reach foca).
pub(crate) struct MetaHandler {
    codec: std::sync::Arc<dyn MembershipCodec>,
    newest: HashMap<NodeId, (u64, u64)>,
    updates: mpsc::Sender<NodeMeta>,
    forgotten: mpsc::Receiver<NodeId>,
}

/// The membership actor's ends of a [`MetaHandler`]'s channels.
pub(crate) struct MetaChannels {
    /// New metadata, to drain after every input.
    pub(crate) updates: mpsc::Receiver<NodeMeta>,
    /// Nodes the membership forgot.
    pub(crate) forget: mpsc::Sender<NodeId>,
}

impl MetaHandler {
    pub(crate) fn new(codec: std::sync::Arc<dyn MembershipCodec>) -> (Self, MetaChannels) {
        let (updates, receiver) = mpsc::channel();
        let (forget, forgotten) = mpsc::channel();
        (
            Self {
                codec,
                newest: HashMap::new(),
                updates,
                forgotten,
            },
            MetaChannels {
                updates: receiver,
                forget,
            },
        )
    }
}

impl foca::BroadcastHandler<NodeIdentity> for MetaHandler {
    type Key = MetaKey;
    type Error = MetaError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeIdentity>,
    ) -> Result<Option<MetaKey>, MetaError> {
        if data.len() > MAX_META_BYTES {
            return Err(MetaError::TooLarge(data.len()));
        }
        // Forgotten before this item, which may be of a node that came back since.
        while let Ok(node) = self.forgotten.try_recv() {
            self.newest.remove(&node);
        }
        let meta = self.codec.decode_meta(data)?;
        if meta.format != META_FORMAT {
            return Err(MetaError::UnknownFormat(meta.format));
        }
        let order = (meta.generation, meta.version);
        match self.newest.get(&meta.node) {
            Some(known) if *known >= order => return Ok(None),
            _ => {}
        }
        self.newest.insert(meta.node.clone(), order);
        let key = MetaKey {
            node: meta.node.clone(),
            generation: meta.generation,
            version: meta.version,
        };
        // The receiver lives as long as the actor that owns this handler.
        let _ = self.updates.send(meta);
        Ok(Some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_and_ratio_follow_the_counters() {
        let mut load = NodeLoad {
            running: 2,
            queued: 0,
            max_concurrent: 2,
            queue_capacity: 1,
        };
        assert!(load.has_room(), "the queue has room");
        load.queued = 1;
        assert!(!load.has_room());
        assert_eq!(load.ratio(), 1.5);
    }

    #[test]
    fn ratio_of_gossiped_counters_that_overflow_u32_neither_panics_nor_wraps() {
        let load = NodeLoad {
            running: u32::MAX,
            queued: 1,
            max_concurrent: 1,
            queue_capacity: 0,
        };
        // Wrapped, the sum would be 0 and this node the least loaded of all.
        assert_eq!(load.ratio(), f64::from(u32::MAX) + 1.0);
    }

    #[test]
    fn a_newer_key_invalidates_an_older_one_of_the_same_node_only() {
        use foca::Invalidates;
        let key = |node: &str, generation, version| MetaKey {
            node: NodeId::new(node).unwrap(),
            generation,
            version,
        };
        assert!(key("a", 1, 2).invalidates(&key("a", 1, 1)));
        assert!(key("a", 2, 0).invalidates(&key("a", 1, 9)));
        assert!(!key("a", 1, 1).invalidates(&key("a", 1, 2)));
        assert!(!key("b", 9, 9).invalidates(&key("a", 1, 1)));
    }
}
