//! Membership over an in-memory transport that can cut links: three node trees, no sockets.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use troupe_actors::cluster::{
    CodecError, DatagramTransport, MembershipCodec, MembershipMsg, MembershipProfile, NodeIdentity,
    NodeMeta, WireFault,
};
use troupe_actors::event::{
    Delivery, Event, EventData, EventFilter, KindPattern, ReplayFrom, Subscription,
};
use troupe_actors::ids::NodeId;
use troupe_actors::kernel::ActorHandle;
use troupe_actors::node::{ClusterPorts, NodePorts, NodeTree, NodeTreeConfig};

/// JSON, so the test needs no binary codec (the node uses its wire codec).
struct JsonCodec;

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|error| CodecError(error.to_string()))
}

fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    let mut values = serde_json::Deserializer::from_slice(bytes).into_iter::<T>();
    let value = values
        .next()
        .ok_or_else(|| CodecError("empty".into()))?
        .map_err(|error| CodecError(error.to_string()))?;
    Ok((value, values.byte_offset()))
}

impl MembershipCodec for JsonCodec {
    fn encode_header(&self, header: &foca::Header<NodeIdentity>) -> Result<Vec<u8>, CodecError> {
        encode(header)
    }
    fn decode_header(
        &self,
        bytes: &[u8],
    ) -> Result<(foca::Header<NodeIdentity>, usize), CodecError> {
        decode_prefix(bytes)
    }
    fn encode_member(&self, member: &foca::Member<NodeIdentity>) -> Result<Vec<u8>, CodecError> {
        encode(member)
    }
    fn decode_member(
        &self,
        bytes: &[u8],
    ) -> Result<(foca::Member<NodeIdentity>, usize), CodecError> {
        decode_prefix(bytes)
    }
    fn encode_meta(&self, meta: &NodeMeta) -> Result<Vec<u8>, CodecError> {
        encode(meta)
    }
    fn decode_meta(&self, bytes: &[u8]) -> Result<NodeMeta, CodecError> {
        serde_json::from_slice(bytes).map_err(|error| CodecError(error.to_string()))
    }
}

/// Who is where, and which directed links are cut.
#[derive(Default)]
struct Net {
    nodes: HashMap<NodeId, ActorHandle<MembershipMsg>>,
    addrs: HashMap<SocketAddr, NodeId>,
    cut: HashSet<(NodeId, NodeId)>,
    rejected: Vec<(NodeId, WireFault)>,
}

#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Net>>);

impl Memory {
    fn cut_off(&self, node: &str) {
        let mut net = self.0.lock().unwrap();
        let node = NodeId::new(node).unwrap();
        let others: Vec<NodeId> = net.nodes.keys().filter(|n| **n != node).cloned().collect();
        for other in others {
            net.cut.insert((node.clone(), other.clone()));
            net.cut.insert((other, node.clone()));
        }
    }

    fn heal(&self) {
        self.0.lock().unwrap().cut.clear();
    }
}

/// One node's view of the in-memory network.
struct Port {
    me: NodeId,
    net: Memory,
}

impl DatagramTransport for Port {
    fn send(&self, to: &NodeIdentity, payload: Bytes) {
        let net = self.net.0.lock().unwrap();
        if net.cut.contains(&(self.me.clone(), to.node.clone())) {
            return;
        }
        if let Some(handle) = net.nodes.get(&to.node) {
            let _ = handle.cast(MembershipMsg::Datagram {
                from: self.me.clone(),
                bytes: payload,
            });
        }
    }

    fn resolve(&self, addr: SocketAddr) -> BoxFuture<'static, Result<NodeId, String>> {
        let net = self.net.0.lock().unwrap();
        let found = net
            .addrs
            .get(&addr)
            .cloned()
            .filter(|node| !net.cut.contains(&(self.me.clone(), node.clone())));
        async move { found.ok_or_else(|| format!("nothing answers at {addr}")) }.boxed()
    }

    fn reject(&self, from: &NodeId, fault: WireFault, _detail: &str) {
        self.net
            .0
            .lock()
            .unwrap()
            .rejected
            .push((from.clone(), fault));
    }
}

fn addr(index: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 7000 + index))
}

async fn start(net: &Memory, name: &str, index: u16, seeds: Vec<SocketAddr>) -> NodeTree {
    let node = NodeId::new(name).unwrap();
    let ports = NodePorts {
        cluster: Some(ClusterPorts {
            addr: addr(index),
            seeds,
            profile: MembershipProfile::Fast,
            labels: Default::default(),
            codec: Arc::new(JsonCodec),
            transport: Arc::new(Port {
                me: node.clone(),
                net: net.clone(),
            }),
            relay: None,
        }),
        ..NodePorts::default()
    };
    // Register the membership handle before the tree starts, so no datagram is lost.
    let tree = NodeTree::start(NodeTreeConfig::new(node.clone()), ports)
        .await
        .unwrap();
    let membership = tree.cluster.as_ref().unwrap().1.clone();
    let mut guard = net.0.lock().unwrap();
    guard.nodes.insert(node.clone(), membership);
    guard.addrs.insert(addr(index), node);
    drop(guard);
    tree
}

/// `node.*` events of a tree: those already in its ring, then live ones.
struct Watch {
    backlog: VecDeque<Arc<Event>>,
    live: Subscription,
    /// Events read but not waited for yet: (kind, node) → generations, oldest first.
    seen: HashMap<(String, String), VecDeque<Option<u64>>>,
}

impl Watch {
    async fn next(&mut self) -> Option<Arc<Event>> {
        if let Some(event) = self.backlog.pop_front() {
            return Some(event);
        }
        match self.live.recv().await? {
            Delivery::Event(event) => Some(event),
            Delivery::Lagged(_) => None,
        }
    }
}

async fn membership_events(tree: &NodeTree) -> Watch {
    let filter = EventFilter {
        kinds: vec![KindPattern::Family("node".into())],
        ..EventFilter::default()
    };
    let (live, replay) = tree
        .events
        .subscribe_from(ReplayFrom::Tail(1000), filter)
        .await
        .unwrap();
    Watch {
        backlog: replay.events.into(),
        live,
        seen: HashMap::new(),
    }
}

/// Waits for a `kind` event about `node` (generous bound: the fast profile needs ~1–2 s), in
/// whatever order events of different nodes arrive.
async fn wait_for(events: &mut Watch, kind: &str, node: &str) -> Option<u64> {
    let key = (kind.to_owned(), node.to_owned());
    if let Some(generation) = events.seen.get_mut(&key).and_then(VecDeque::pop_front) {
        return generation;
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let Some(event) = events.next().await else {
                continue;
            };
            let membership = match &event.data {
                EventData::NodeJoined(m)
                | EventData::NodeSuspected(m)
                | EventData::NodeDown(m)
                | EventData::NodeLeft(m) => m,
                _ => continue,
            };
            if event.data.kind().as_str() == kind && membership.node.as_str() == node {
                return membership.generation;
            }
            events
                .seen
                .entry((
                    event.data.kind().as_str().to_owned(),
                    membership.node.to_string(),
                ))
                .or_default()
                .push_back(membership.generation);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} for {node}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_join_a_cut_off_one_goes_down_and_rejoins_after_the_heal() {
    let net = Memory::default();
    let a = start(&net, "a", 1, Vec::new()).await;
    let mut a_events = membership_events(&a).await;
    let b = start(&net, "b", 2, vec![addr(1)]).await;
    let mut b_events = membership_events(&b).await;
    let c = start(&net, "c", 3, vec![addr(1)]).await;

    wait_for(&mut a_events, "node.joined", "b").await;
    wait_for(&mut a_events, "node.joined", "c").await;
    wait_for(&mut b_events, "node.joined", "c").await;
    let before = wait_for(&mut b_events, "node.joined", "a").await;
    assert!(before.is_some());

    // A partition isolates c: the others suspect it, then declare it down.
    net.cut_off("c");
    wait_for(&mut a_events, "node.suspected", "c").await;
    let down = wait_for(&mut b_events, "node.down", "c").await;
    // The member view follows (the registry applies it in its own mailbox).
    tokio::time::timeout(Duration::from_secs(30), async {
        while !b
            .registry
            .tables()
            .members()
            .iter()
            .any(|m| m.node.as_str() == "c" && m.state == "down")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("b's member view shows c down");

    // Healed, c learns it was declared down and comes back as a newer generation.
    net.heal();
    let back = wait_for(&mut b_events, "node.joined", "c").await;
    assert!(back > down, "{back:?} after {down:?}");

    let rejected = net.0.lock().unwrap().rejected.clone();
    assert!(rejected.is_empty(), "{rejected:?}");
    for tree in [a, b, c] {
        tree.shutdown(Duration::from_secs(5)).await;
    }
}
