//! The membership's ports over the QUIC endpoint: the wire codec for foca's packets and node
//! metadata, datagrams out through the endpoint's per-peer senders, datagrams in to the
//! MembershipActor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use futures::FutureExt;
use futures::future::BoxFuture;
use troupe_actors::cluster::{
    CodecError, DatagramTransport, MembershipCodec, MembershipMsg, NodeIdentity, NodeMeta,
    WireFault,
};
use troupe_actors::ids::NodeId;
use troupe_actors::kernel::ActorHandle;

use super::endpoint::{ClusterEndpoint, ClusterStats, DialError, Inbound};
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
            match endpoint.connect(addr, None).await {
                Ok((node, _)) => Ok(node),
                // The membership then leaves that seed alone.
                Err(DialError::Myself { .. }) => Ok(endpoint.node().clone()),
                Err(error) => Err(error.to_string()),
            }
        }
        .boxed()
    }

    fn reject(&self, from: &NodeId, fault: WireFault, detail: &str) {
        self.0.wire_fault(from, fault, detail, None);
    }

    fn members_refused(&self, _from: &NodeId, count: usize) {
        self.0
            .stats()
            .members_refused
            .fetch_add(count as u64, Ordering::Relaxed);
    }

    fn forget(&self, node: &NodeId) {
        self.0.forget_peer(node);
    }
}

/// Datagrams of one peer handed to the MembershipActor and not handled yet, at most: past it the
/// peer's datagrams are dropped (counted in `datagrams_dropped`), like UDP. The actor's mailbox
/// is not bounded, and the endpoint reads datagrams as fast as they arrive, so without it a
/// flooding peer grew the mailbox without end and held every other peer's datagrams (and the
/// actor's own timers) back behind its own.
pub const MAX_PEER_DATAGRAMS: usize = 256;

/// Incoming datagrams to the MembershipActor, at most [`MAX_PEER_DATAGRAMS`] of each peer at a
/// time.
pub struct MembershipInbound {
    membership: ActorHandle<MembershipMsg>,
    stats: Arc<ClusterStats>,
    in_flight: DashMap<NodeId, Arc<AtomicUsize>>,
}

/// A datagram's bytes that give their peer's place back when the actor is done with them
/// (handled, or dropped with a message that was never delivered).
struct Counted {
    bytes: Bytes,
    in_flight: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl MembershipInbound {
    /// Datagrams to `membership`; those dropped are counted in `stats`.
    pub fn new(membership: ActorHandle<MembershipMsg>, stats: Arc<ClusterStats>) -> Self {
        Self {
            membership,
            stats,
            in_flight: DashMap::new(),
        }
    }

    /// Datagrams of `peer` handed to the actor and not handled yet.
    pub fn in_flight(&self, peer: &NodeId) -> usize {
        self.in_flight
            .get(peer)
            .map_or(0, |count| count.load(Ordering::Acquire))
    }
}

impl Inbound for MembershipInbound {
    fn datagram(&self, from: &NodeId, bytes: Bytes) {
        // Cloned out of the map: no lock of it is held below.
        let in_flight = self.in_flight.entry(from.clone()).or_default().clone();
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_PEER_DATAGRAMS {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            self.stats.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let bytes = Bytes::from_owner(Counted { bytes, in_flight });
        let _ = self.membership.cast(MembershipMsg::Datagram {
            from: from.clone(),
            bytes,
        });
    }
}

/// Attaches the membership actor to the endpoint.
pub fn attach(endpoint: &ClusterEndpoint, membership: ActorHandle<MembershipMsg>) {
    endpoint.attach(Arc::new(MembershipInbound::new(
        membership,
        endpoint.stats().clone(),
    )));
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use troupe_actors::cluster::{MAX_PACKET_BYTES, MembershipProfile, NodeLoad};
    use troupe_actors::node::{ClusterPorts, NodePorts, NodeTree, NodeTreeConfig};

    use super::*;
    use crate::cluster::ClusterEndpoint;

    fn identity(name: &str) -> NodeIdentity {
        NodeIdentity {
            node: NodeId::new(name).unwrap(),
            addr: "127.0.0.1:7071".parse().unwrap(),
            generation: 7,
        }
    }

    /// A membership packet as foca lays it out: a header, the number of members, the members.
    fn packet(from: &str, to: &str) -> Vec<u8> {
        let header = foca::Header {
            src: identity(from),
            src_incarnation: 3,
            dst: identity(to),
            message: foca::Message::Ping(1),
        };
        let mut packet = WireCodec.encode_header(&header).unwrap();
        packet.extend(2u16.to_be_bytes());
        for name in [from, "c"] {
            packet.extend(
                WireCodec
                    .encode_member(&foca::Member::alive(identity(name)))
                    .unwrap(),
            );
        }
        packet
    }

    fn meta() -> NodeMeta {
        NodeMeta {
            format: troupe_actors::cluster::META_FORMAT,
            node: NodeId::new("a").unwrap(),
            generation: 7,
            version: 2,
            http: Some("127.0.0.1:7070".into()),
            load: NodeLoad::default(),
            labels: BTreeMap::from([("zone".to_owned(), "z1".to_owned())]),
            providers: Vec::new(),
            leaving: false,
            truncated: false,
        }
    }

    #[test]
    fn headers_and_members_decode_back_to_back() {
        let identity = identity("a");
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
    }

    #[test]
    fn random_truncated_and_flipped_datagrams_decode_or_fail_never_panic() {
        let valid = packet("b", "a");
        let meta_bytes = WireCodec.encode_meta(&meta()).unwrap();
        assert_eq!(WireCodec.decode_meta(&meta_bytes).unwrap(), meta());
        for cut in 0..valid.len() {
            let _ = WireCodec.decode_header(&valid[..cut]);
            let _ = WireCodec.decode_member(&valid[cut..]);
        }
        for cut in 0..meta_bytes.len() {
            assert!(
                WireCodec.decode_meta(&meta_bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut decoded = 0;
        for seed in 0..20_000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let bytes: Vec<u8> = match seed % 3 {
                0 => (0..rng.usize(0..1200)).map(|_| rng.u8(..)).collect(),
                1 => {
                    let mut bytes = valid.clone();
                    for _ in 0..rng.usize(1..4) {
                        let at = rng.usize(..bytes.len());
                        bytes[at] ^= rng.u8(1..);
                    }
                    bytes
                }
                _ => {
                    let mut bytes = meta_bytes.clone();
                    let at = rng.usize(..bytes.len());
                    bytes[at] ^= rng.u8(1..);
                    bytes
                }
            };
            if let Ok((_, used)) = WireCodec.decode_header(&bytes) {
                assert!(used <= bytes.len());
                decoded += 1;
                let _ = WireCodec.decode_member(&bytes[used..]);
            }
            let _ = WireCodec.decode_meta(&bytes);
        }
        assert!(decoded > 0, "some flipped packets still decode");
    }

    /// The largest metadata a node sends fits in one membership packet beside the largest header
    /// of every message that carries metadata (node ids of the longest length, IPv6 addresses,
    /// the highest numbers) and foca's two 2-byte counts. foca puts an item in a packet only
    /// when all of it fits, so a larger one (up to 1 KB was allowed) never left the node: its
    /// peers never learnt its HTTP address, labels or load.
    #[test]
    fn the_largest_metadata_sent_fits_in_a_packet_beside_the_largest_header() {
        let longest = |name: &str| NodeIdentity {
            node: NodeId::new(name.repeat(troupe_actors::ids::MAX_ID_LEN)).unwrap(),
            addr: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap(),
            generation: u64::MAX,
        };
        let mut meta = NodeMeta {
            node: longest("a").node,
            generation: u64::MAX,
            version: u64::MAX,
            http: Some("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into()),
            labels: (0..100)
                .map(|n| (format!("label-{n:03}"), "v".repeat(20)))
                .collect(),
            ..meta()
        };
        let bytes = meta.fit(&WireCodec).unwrap();
        assert!(meta.truncated, "the labels did not all fit");
        assert_eq!(WireCodec.decode_meta(&bytes).unwrap(), meta);
        for message in [
            foca::Message::Ping(u8::MAX),
            foca::Message::Ack(u8::MAX),
            foca::Message::Gossip,
            foca::Message::Feed,
            foca::Message::Broadcast,
        ] {
            let header = foca::Header {
                src: longest("a"),
                src_incarnation: u16::MAX,
                dst: longest("b"),
                message,
            };
            let header = WireCodec.encode_header(&header).unwrap().len();
            assert!(
                header + 2 + 2 + bytes.len() <= MAX_PACKET_BYTES,
                "a header of {header} bytes and metadata of {} do not fit in {MAX_PACKET_BYTES}",
                bytes.len()
            );
        }
    }

    /// A peer's datagrams wait for the membership at most [`MAX_PEER_DATAGRAMS`] at a time: the
    /// rest of a flood is dropped and counted, another peer's datagrams still get through, and
    /// the places come back as the actor handles them.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_flooding_peer_queues_at_most_its_share_of_datagrams_for_the_membership() {
        let tree = clustered_node(Arc::new(Capture::default()), Default::default()).await;
        let membership = tree.cluster.as_ref().unwrap().1.clone();
        let stats = Arc::new(ClusterStats::default());
        let inbound = MembershipInbound::new(membership.clone(), stats.clone());
        let (b, c) = (NodeId::new("b").unwrap(), NodeId::new("c").unwrap());
        let ping = Bytes::from(packet("b", "a"));
        // No await in between: the actor handles none of them meanwhile.
        for _ in 0..10_000 {
            inbound.datagram(&b, ping.clone());
        }
        inbound.datagram(&c, Bytes::from(packet("c", "a")));
        assert_eq!(inbound.in_flight(&b), MAX_PEER_DATAGRAMS);
        assert_eq!(inbound.in_flight(&c), 1, "another peer is not held back");
        assert_eq!(
            stats.datagrams_dropped.load(Ordering::Relaxed),
            (10_000 - MAX_PEER_DATAGRAMS) as u64
        );
        // Once the actor has handled what was queued (one mailbox, in order), the places are
        // free again.
        membership
            .call(
                |reply| MembershipMsg::Leave { reply },
                Duration::from_secs(60),
            )
            .await
            .expect("the membership answers");
        assert_eq!(inbound.in_flight(&b), 0);
        assert_eq!(inbound.in_flight(&c), 0);
        inbound.datagram(&b, ping);
        assert_eq!(inbound.in_flight(&b), 1);
        tree.shutdown(Duration::from_secs(5)).await;
    }

    /// A node declared down rejoins as its next generation; that one is kept too, so a restart
    /// (after a clock step back) does not take it again and rejoin as the same incarnation.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_generation_renewed_after_being_declared_down_is_kept() {
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = {
            let kept = kept.clone();
            Arc::new(move |generation| kept.lock().unwrap().push(generation))
        };
        let generation = troupe_actors::cluster::GenerationFloor::new(0, Some(keep));
        let tree = clustered_node(Arc::new(Capture::default()), generation.clone()).await;
        let membership = tree.cluster.as_ref().unwrap().1.clone();
        let started = generation.highest();
        let a = NodeIdentity {
            generation: started,
            ..identity("a")
        };
        // b gossips that a is down.
        let header = foca::Header {
            src: identity("b"),
            src_incarnation: 0,
            dst: a.clone(),
            message: foca::Message::Gossip,
        };
        let mut packet = WireCodec.encode_header(&header).unwrap();
        packet.extend(1u16.to_be_bytes());
        packet.extend(WireCodec.encode_member(&foca::Member::down(a)).unwrap());
        membership
            .cast(MembershipMsg::Datagram {
                from: NodeId::new("b").unwrap(),
                bytes: Bytes::from(packet),
            })
            .unwrap();
        membership
            .call(
                |reply| MembershipMsg::Leave { reply },
                Duration::from_secs(60),
            )
            .await
            .expect("the membership answers");
        assert_eq!(
            generation.highest(),
            started + 1,
            "rejoined as the next one"
        );
        assert_eq!(*kept.lock().unwrap(), [started, started + 1], "and kept it");
        tree.shutdown(Duration::from_secs(5)).await;
    }

    /// A seed list shared by every node lists each node's own address, often in another form
    /// than the one it binds (here: another advertised address). Dialing it reaches this node,
    /// which refuses itself on both ends: that used to happen at every tick while the node was
    /// alone, two WARN lines and two `wrong_node` refusals each time. Now the seed is known to
    /// be this node after the first dial and left alone.
    #[tokio::test]
    async fn a_seed_that_is_this_node_is_dialed_once() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let files = crate::cluster::certs::init(
            &dir.path().join("ca"),
            &NodeId::new("a").unwrap(),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        let endpoint = ClusterEndpoint::bind(
            &crate::cluster::certs::load(&files).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            Arc::default(),
        )
        .unwrap();
        let ports = NodePorts {
            cluster: Some(ClusterPorts {
                addr: "127.0.0.1:1".parse().unwrap(),
                seeds: vec![endpoint.local_addr().unwrap()],
                profile: MembershipProfile::Fast,
                labels: BTreeMap::new(),
                codec: Arc::new(WireCodec),
                transport: Arc::new(QuicDatagrams(endpoint.clone())),
                relay: None,
                rng_seed: Some(1),
                generation: Default::default(),
            }),
            ..NodePorts::default()
        };
        let tree = NodeTree::start(NodeTreeConfig::new(NodeId::new("a").unwrap()), ports)
            .await
            .unwrap();
        attach(&endpoint, tree.cluster.as_ref().unwrap().1.clone());
        let refused = || endpoint.stats().refused(crate::cluster::Refusal::WrongNode);
        tokio::time::timeout(Duration::from_secs(30), async {
            while refused() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the first dial reaches this node");
        // Ten ticks of the fast profile: none dials the seed again.
        tokio::time::sleep(MembershipProfile::Fast.tick() * 10).await;
        assert_eq!(
            refused(),
            1,
            "only the first dial's inbound end was refused"
        );
        tree.shutdown(Duration::from_secs(5)).await;
        endpoint.close(Duration::from_secs(1)).await;
    }

    /// A transport that sends nowhere and remembers what was rejected.
    #[derive(Default)]
    struct Capture(Mutex<Vec<(NodeId, WireFault)>>);

    impl DatagramTransport for Capture {
        fn send(&self, _to: &NodeIdentity, _payload: Bytes) {}

        fn resolve(&self, addr: SocketAddr) -> BoxFuture<'static, Result<NodeId, String>> {
            async move { Err(format!("nothing at {addr}")) }.boxed()
        }

        fn reject(&self, from: &NodeId, fault: WireFault, _detail: &str) {
            self.0.lock().unwrap().push((from.clone(), fault));
        }

        fn members_refused(&self, _from: &NodeId, _count: usize) {}

        fn forget(&self, _node: &NodeId) {}
    }

    /// Node `a`'s tree with the cluster branch on the wire codec, its datagrams to `transport`.
    async fn clustered_node(
        transport: Arc<dyn DatagramTransport>,
        generation: troupe_actors::cluster::GenerationFloor,
    ) -> NodeTree {
        let ports = NodePorts {
            cluster: Some(ClusterPorts {
                addr: "127.0.0.1:7071".parse().unwrap(),
                seeds: Vec::new(),
                profile: MembershipProfile::Fast,
                labels: BTreeMap::new(),
                codec: Arc::new(WireCodec),
                transport,
                relay: None,
                rng_seed: Some(1),
                generation,
            }),
            ..NodePorts::default()
        };
        NodeTree::start(NodeTreeConfig::new(NodeId::new("a").unwrap()), ports)
            .await
            .unwrap()
    }

    /// A node whose clock went back since its last run still takes a generation above the one
    /// it used then, and keeps it; an in-process restart of the membership goes higher again,
    /// and keeps that too (before, only the start's generation was kept, after the start).
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_membership_takes_a_generation_above_every_one_used_before() {
        // A generation from "the future": the last run's clock was far ahead of this one's.
        let before = 4_000_000_000_000_000_000u64;
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = {
            let kept = kept.clone();
            Arc::new(move |generation| kept.lock().unwrap().push(generation))
        };
        let generation = troupe_actors::cluster::GenerationFloor::new(before, Some(keep));
        let tree = clustered_node(Arc::new(Capture::default()), generation.clone()).await;
        let load = || generation.highest();
        assert_eq!(load(), before + 1);
        assert_eq!(*kept.lock().unwrap(), [before + 1]);
        let membership = tree.cluster.as_ref().unwrap().1.clone();
        assert!(membership.inject_fault(troupe_actors::kernel::FaultKind::Panic));
        // Restarted after the supervisor's backoff (paused time moves on while all wait).
        for _ in 0..1_000 {
            if load() != before + 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(load(), before + 2, "the next incarnation is higher again");
        assert_eq!(*kept.lock().unwrap(), [before + 1, before + 2], "and kept");
        tree.shutdown(std::time::Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn thousands_of_broken_datagrams_through_the_membership_are_rejected_and_it_goes_on() {
        let capture = Arc::new(Capture::default());
        let tree = clustered_node(capture.clone(), Default::default()).await;
        let membership = tree.cluster.as_ref().unwrap().1.clone();
        let valid = packet("b", "a");
        let header_len = WireCodec.decode_header(&valid).unwrap().1;
        let b = NodeId::new("b").unwrap();
        for seed in 0..5_000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let bytes: Vec<u8> = match seed % 5 {
                0 => (0..rng.usize(0..1150)).map(|_| rng.u8(..)).collect(),
                // A good header, then noise for foca to decode as members and broadcasts.
                1 => {
                    let mut bytes = valid[..header_len].to_vec();
                    bytes.extend((0..rng.usize(0..200)).map(|_| rng.u8(..)));
                    bytes
                }
                2 => valid[..rng.usize(0..valid.len())].to_vec(),
                3 => {
                    let mut bytes = valid.clone();
                    let at = rng.usize(header_len..bytes.len());
                    bytes[at] ^= rng.u8(1..);
                    bytes
                }
                _ => (0..rng.usize(1151..2000)).map(|_| rng.u8(..)).collect(),
            };
            membership
                .cast(MembershipMsg::Datagram {
                    from: b.clone(),
                    bytes: Bytes::from(bytes),
                })
                .unwrap();
        }
        // The actor still answers, after every datagram above (one mailbox, in order).
        membership
            .call(
                |reply| MembershipMsg::Leave { reply },
                Duration::from_secs(60),
            )
            .await
            .expect("the membership answers");
        let rejected = capture.0.lock().unwrap().clone();
        assert!(rejected.iter().all(|(from, _)| *from == b));
        let count = |fault| rejected.iter().filter(|(_, f)| *f == fault).count();
        assert_eq!(count(WireFault::OversizedDatagram), 1_000);
        assert!(
            count(WireFault::MalformedDatagram) > 1_000,
            "{}",
            rejected.len()
        );
        let restarts: u64 = tree
            .directory
            .list()
            .iter()
            .map(|(_, entry)| entry.control.stats().snapshot().restarts)
            .sum();
        assert_eq!(restarts, 0, "nothing panicked");
        tree.shutdown(Duration::from_secs(5)).await;
    }
}
