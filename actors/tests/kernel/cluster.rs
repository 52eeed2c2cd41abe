//! Membership scenarios over an in-memory transport that can cut links one way or both: node
//! trees with no sockets, on a current-thread runtime with paused time and a seeded RNG for
//! foca, so every run plays the same way, however loaded the machine is. Each scenario is a list
//! of steps (start a node, cut or heal links, wait for an event or a view, stay quiet for a
//! while), as chitchat's cluster tests do.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use troupe_actors::cluster::{
    CodecError, DatagramTransport, MAX_MEMBERS, MAX_PACKET_BYTES, MembershipCodec, MembershipMsg,
    MembershipProfile, NodeIdentity, NodeMeta, WireFault,
};
use troupe_actors::event::{Delivery, EventData, EventFilter, KindPattern};
use troupe_actors::ids::{ActorPath, NodeId};
use troupe_actors::kernel::{ActorHandle, FaultKind};
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

fn id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// Who is where, which directed links are cut, and what was rejected.
#[derive(Default)]
struct Net {
    nodes: HashMap<NodeId, ActorHandle<MembershipMsg>>,
    addrs: HashMap<SocketAddr, NodeId>,
    /// `(from, to)`: datagrams from `from` to `to` are lost.
    cut: HashSet<(NodeId, NodeId)>,
    rejected: Vec<(NodeId, NodeId, WireFault)>,
    /// Per node: new members it refused past its cap.
    members_refused: HashMap<NodeId, usize>,
    /// `(node, member)`: the node's membership forgot the member.
    forgotten: Vec<(NodeId, NodeId)>,
}

#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Net>>);

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
        // A dial needs both directions.
        let found = net.addrs.get(&addr).cloned().filter(|node| {
            !net.cut.contains(&(self.me.clone(), node.clone()))
                && !net.cut.contains(&(node.clone(), self.me.clone()))
        });
        async move { found.ok_or_else(|| format!("nothing answers at {addr}")) }.boxed()
    }

    fn reject(&self, from: &NodeId, fault: WireFault, _detail: &str) {
        let mut net = self.net.0.lock().unwrap();
        let me = self.me.clone();
        net.rejected.push((me, from.clone(), fault));
    }

    fn members_refused(&self, _from: &NodeId, count: usize) {
        let mut net = self.net.0.lock().unwrap();
        *net.members_refused.entry(self.me.clone()).or_default() += count;
    }

    fn forget(&self, node: &NodeId) {
        let mut net = self.net.0.lock().unwrap();
        let me = self.me.clone();
        net.forgotten.push((me, node.clone()));
    }
}

/// A `node.*` event as one node saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    about: String,
    generation: Option<u64>,
}

/// Every `node.*` event each node published, in order, and a bell rung on each.
#[derive(Clone, Default)]
struct Journal {
    seen: Arc<Mutex<BTreeMap<String, Vec<Seen>>>>,
    bell: Arc<Notify>,
}

impl Journal {
    fn of(&self, node: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    fn len(&self) -> BTreeMap<String, usize> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .map(|(node, events)| (node.clone(), events.len()))
            .collect()
    }
}

/// One step of a scenario.
enum Step {
    /// Start a node that joins through the given nodes' addresses.
    Start(&'static str, &'static [&'static str]),
    /// Lose every datagram from the first node to the second (one way only).
    Cut(&'static str, &'static str),
    /// Cut every link between the groups, both ways.
    Partition(&'static [&'static [&'static str]]),
    /// Restore every link.
    Heal,
    /// Wait (virtual time, bounded) until `at` published `kind` about `about` since the last
    /// mark.
    Expect {
        at: &'static str,
        kind: &'static str,
        about: &'static str,
    },
    /// Wait (virtual time, bounded) until every running node's member view has every other one
    /// alive.
    Converged,
    /// Remember where every journal stands (what `Expect` and `Quiet` look after).
    Mark,
    /// Let this much virtual time pass, then check that no node published any of `kinds` since
    /// the last mark.
    Quiet(Duration, &'static [&'static str]),
}

/// A scenario's world: the nodes, the network, the journals.
struct World {
    net: Memory,
    trees: BTreeMap<&'static str, NodeTree>,
    addrs: BTreeMap<&'static str, SocketAddr>,
    journal: Journal,
    mark: BTreeMap<String, usize>,
    /// Generations each node first joined with, as the others reported it.
    first_generation: HashMap<String, u64>,
    profile: MembershipProfile,
    /// Virtual time any single wait may take.
    bound: Duration,
}

impl World {
    /// The fast profile: a failure is detected within ~1.5 s, a split heals within seconds.
    fn new() -> Self {
        Self::with_profile(MembershipProfile::Fast, Duration::from_secs(60))
    }

    fn with_profile(profile: MembershipProfile, bound: Duration) -> Self {
        Self {
            net: Memory::default(),
            trees: BTreeMap::new(),
            addrs: BTreeMap::new(),
            journal: Journal::default(),
            mark: BTreeMap::new(),
            first_generation: HashMap::new(),
            profile,
            bound,
        }
    }

    async fn run(&mut self, steps: Vec<Step>) {
        for (index, step) in steps.into_iter().enumerate() {
            self.step(index, step).await;
        }
    }

    async fn step(&mut self, index: usize, step: Step) {
        match step {
            Step::Start(name, seeds) => self.start(name, seeds).await,
            Step::Cut(from, to) => {
                self.net.0.lock().unwrap().cut.insert((id(from), id(to)));
            }
            Step::Partition(groups) => {
                let mut net = self.net.0.lock().unwrap();
                for (i, group) in groups.iter().enumerate() {
                    for other in groups.iter().skip(i + 1) {
                        for a in group.iter() {
                            for b in other.iter() {
                                net.cut.insert((id(a), id(b)));
                                net.cut.insert((id(b), id(a)));
                            }
                        }
                    }
                }
            }
            Step::Heal => self.net.0.lock().unwrap().cut.clear(),
            Step::Mark => self.mark = self.journal.len(),
            Step::Expect { at, kind, about } => {
                let journal = self.journal.clone();
                let from = self.mark.get(at).copied().unwrap_or(0);
                let found = tokio::time::timeout(self.bound, async {
                    loop {
                        let bell = journal.bell.notified();
                        if journal.of(at)[from.min(journal.of(at).len())..]
                            .iter()
                            .any(|seen| seen.kind == kind && seen.about == about)
                        {
                            return;
                        }
                        bell.await;
                    }
                })
                .await;
                assert!(
                    found.is_ok(),
                    "step {index}: no {kind} about {about} at {at}; it saw {:?}",
                    self.journal.of(at)
                );
            }
            Step::Converged => {
                // Some view changes publish no event (a suspect refuted back to alive, metadata):
                // look at the views every 50 ms of virtual time.
                let done = tokio::time::timeout(self.bound, async {
                    while !self.converged() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
                assert!(
                    done.is_ok(),
                    "step {index}: views never converged: {}; events: {:?}",
                    self.views(),
                    self.trees
                        .keys()
                        .map(|node| (node, self.journal.of(node)))
                        .collect::<Vec<_>>()
                );
            }
            Step::Quiet(time, kinds) => {
                tokio::time::sleep(time).await;
                for (node, from) in &self.mark {
                    let noisy: Vec<Seen> = self.journal.of(node)[*from..]
                        .iter()
                        .filter(|seen| kinds.contains(&seen.kind))
                        .cloned()
                        .collect();
                    assert!(
                        noisy.is_empty(),
                        "step {index}: {node} published {noisy:?} in a quiet period"
                    );
                }
            }
        }
    }

    fn converged(&self) -> bool {
        self.trees.iter().all(|(name, tree)| {
            let members = tree.registry.tables().members();
            self.trees
                .keys()
                .filter(|other| *other != name)
                .all(|other| {
                    members
                        .iter()
                        .any(|member| member.node.as_str() == *other && member.state == "alive")
                })
        })
    }

    fn views(&self) -> String {
        self.trees
            .iter()
            .map(|(name, tree)| {
                let members: Vec<String> = tree
                    .registry
                    .tables()
                    .members()
                    .iter()
                    .map(|member| format!("{}={}", member.node, member.state))
                    .collect();
                format!("{name}: [{}]", members.join(" "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn start(&mut self, name: &'static str, seeds: &[&str]) {
        let index = u16::try_from(self.addrs.len()).unwrap() + 1;
        let addr = SocketAddr::from(([10, 0, 0, 1], 7000 + index));
        let node = id(name);
        let ports = NodePorts {
            cluster: Some(ClusterPorts {
                addr,
                seeds: seeds.iter().map(|seed| self.addrs[seed]).collect(),
                profile: self.profile,
                labels: Default::default(),
                codec: Arc::new(JsonCodec),
                transport: Arc::new(Port {
                    me: node.clone(),
                    net: self.net.clone(),
                }),
                relay: None,
                rng_seed: Some(u64::from(index)),
                generation: Default::default(),
            }),
            ..NodePorts::default()
        };
        let tree = NodeTree::start(NodeTreeConfig::new(node.clone()), ports)
            .await
            .unwrap();
        // The journal subscribes before anything can be published about the others.
        let filter = EventFilter {
            kinds: vec![KindPattern::Family("node".into())],
            ..EventFilter::default()
        };
        let mut live = tree.events.subscribe(filter);
        let journal = self.journal.clone();
        tokio::spawn(async move {
            while let Some(delivery) = live.recv().await {
                let Delivery::Event(event) = delivery else {
                    panic!("the journal of {name} lagged");
                };
                let membership = match &event.data {
                    EventData::NodeJoined(m)
                    | EventData::NodeSuspected(m)
                    | EventData::NodeDown(m)
                    | EventData::NodeLeft(m) => m,
                    _ => continue,
                };
                journal
                    .seen
                    .lock()
                    .unwrap()
                    .entry(name.to_owned())
                    .or_default()
                    .push(Seen {
                        kind: event.data.kind().as_str(),
                        about: membership.node.to_string(),
                        generation: membership.generation,
                    });
                journal.bell.notify_waiters();
            }
        });
        let membership = tree.cluster.as_ref().unwrap().1.clone();
        let mut net = self.net.0.lock().unwrap();
        net.nodes.insert(node.clone(), membership);
        net.addrs.insert(addr, node);
        drop(net);
        self.addrs.insert(name, addr);
        self.trees.insert(name, tree);
    }

    /// The generations other nodes reported for `about` in `node.joined`, oldest first.
    fn joined_generations(&self, about: &str) -> Vec<u64> {
        let mut generations: Vec<u64> = self
            .trees
            .keys()
            .flat_map(|node| self.journal.of(node))
            .filter(|seen| seen.kind == "node.joined" && seen.about == about)
            .filter_map(|seen| seen.generation)
            .collect();
        generations.sort_unstable();
        generations.dedup();
        generations
    }

    fn note_first_generation(&mut self, about: &str) {
        let first = self.joined_generations(about)[0];
        self.first_generation.insert(about.to_owned(), first);
    }

    fn rejected(&self) -> Vec<(NodeId, NodeId, WireFault)> {
        self.net.0.lock().unwrap().rejected.clone()
    }

    async fn shutdown(self) {
        for tree in self.trees.into_values() {
            tree.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn expect(at: &'static str, kind: &'static str, about: &'static str) -> Step {
    Step::Expect { at, kind, about }
}

/// Three nodes joined through `a`, every view converged.
fn three_joined() -> Vec<Step> {
    vec![
        Step::Start("a", &[]),
        Step::Start("b", &["a"]),
        Step::Start("c", &["a"]),
        expect("a", "node.joined", "b"),
        expect("a", "node.joined", "c"),
        expect("b", "node.joined", "c"),
        expect("c", "node.joined", "b"),
        Step::Converged,
    ]
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_partitioned_member_is_suspected_then_down_and_rejoins_newer_after_the_heal() {
    let mut world = World::new();
    world.run(three_joined()).await;
    world.note_first_generation("c");
    world
        .run(vec![
            Step::Mark,
            Step::Partition(&[&["a", "b"], &["c"]]),
            expect("a", "node.suspected", "c"),
            expect("a", "node.down", "c"),
            expect("b", "node.down", "c"),
            // The isolated side sees the others fail too.
            expect("c", "node.down", "a"),
            expect("c", "node.down", "b"),
            Step::Mark,
            Step::Heal,
            expect("a", "node.joined", "c"),
            expect("b", "node.joined", "c"),
            Step::Converged,
        ])
        .await;
    let generations = world.joined_generations("c");
    let first = world.first_generation["c"];
    assert!(
        generations.iter().any(|generation| *generation > first),
        "c came back as a newer generation than {first}: {generations:?}"
    );
    assert!(world.rejected().is_empty(), "{:?}", world.rejected());
    world.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn asymmetric_loss_between_two_members_is_bridged_by_the_third_without_suspicion() {
    let mut world = World::new();
    world.run(three_joined()).await;
    world
        .run(vec![
            Step::Mark,
            // a's datagrams to b are lost; b's to a arrive. Direct probes between them fail one
            // way or the other; indirect probes through c succeed, so nobody is suspected.
            Step::Cut("a", "b"),
            Step::Quiet(
                Duration::from_secs(30),
                &["node.suspected", "node.down", "node.left", "node.joined"],
            ),
            Step::Converged,
            Step::Heal,
            Step::Quiet(
                Duration::from_secs(5),
                &["node.suspected", "node.down", "node.left", "node.joined"],
            ),
        ])
        .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn losing_every_path_one_way_gets_a_member_declared_down() {
    let mut world = World::new();
    world.run(three_joined()).await;
    world
        .run(vec![
            Step::Mark,
            // c still hears everything but nothing it says arrives: to the others it is dead.
            Step::Cut("c", "a"),
            Step::Cut("c", "b"),
            expect("a", "node.down", "c"),
            expect("b", "node.down", "c"),
            Step::Mark,
            Step::Heal,
            expect("a", "node.joined", "c"),
            Step::Converged,
        ])
        .await;
    world.shutdown().await;
}

impl World {
    /// Panics `name`'s MembershipActor (its supervisor starts another instance).
    fn crash_membership(&self, name: &str) {
        let path = ActorPath::parse("cluster/membership").unwrap();
        self.trees[name]
            .inject_fault(&path, FaultKind::Panic)
            .unwrap();
    }
}

/// A restarted MembershipActor starts from the members the last instance knew: a live one stays
/// in the view without a new `node.joined`, and one that died while the actor restarted (with
/// nobody left to gossip it) is still declared down.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restarted_membership_keeps_the_live_members_and_declares_a_dead_one_down() {
    let mut world = World::new();
    world
        .run(vec![
            Step::Start("a", &[]),
            Step::Start("b", &["a"]),
            expect("a", "node.joined", "b"),
            expect("b", "node.joined", "a"),
            Step::Converged,
            Step::Mark,
        ])
        .await;
    world.crash_membership("a");
    world
        .run(vec![
            Step::Quiet(
                Duration::from_secs(10),
                &["node.suspected", "node.down", "node.left"],
            ),
            Step::Converged,
        ])
        .await;
    let about_b: Vec<Seen> = world.journal.of("a")[world.mark["a"]..]
        .iter()
        .filter(|seen| seen.about == "b")
        .cloned()
        .collect();
    assert!(
        about_b.is_empty(),
        "a said {about_b:?} about b, which never left"
    );

    // b dies while a's membership restarts: a's new instance must still find out.
    world
        .run(vec![Step::Mark, Step::Partition(&[&["a"], &["b"]])])
        .await;
    world.crash_membership("a");
    world.run(vec![expect("a", "node.down", "b")]).await;
    world.shutdown().await;
}

/// Two halves that each declared the other down only find each other again by announcing to
/// down members (both halves stay active, so neither announces to its seeds).
fn two_against_two_split_and_heal() -> Vec<Step> {
    vec![
        Step::Start("a", &[]),
        Step::Start("b", &["a"]),
        Step::Start("c", &["a"]),
        Step::Start("d", &["a"]),
        expect("a", "node.joined", "d"),
        expect("d", "node.joined", "b"),
        expect("d", "node.joined", "c"),
        Step::Converged,
        Step::Mark,
        Step::Partition(&[&["a", "b"], &["c", "d"]]),
        expect("a", "node.down", "c"),
        expect("a", "node.down", "d"),
        expect("b", "node.down", "c"),
        expect("b", "node.down", "d"),
        expect("c", "node.down", "a"),
        expect("c", "node.down", "b"),
        expect("d", "node.down", "a"),
        expect("d", "node.down", "b"),
        // Each half stays whole meanwhile.
        Step::Quiet(Duration::from_secs(5), &["node.left"]),
        Step::Mark,
        Step::Heal,
        expect("a", "node.joined", "c"),
        expect("c", "node.joined", "a"),
        Step::Converged,
    ]
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_two_against_two_split_declares_the_other_half_down_and_heals_into_one_cluster() {
    let mut world = World::new();
    world.run(two_against_two_split_and_heal()).await;
    world.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn with_the_lan_profile_a_split_heals_too_within_its_slower_announcements() {
    // foca's LAN timing announces to down members every 65 s.
    let mut world = World::with_profile(MembershipProfile::Lan, Duration::from_secs(600));
    world.run(two_against_two_split_and_heal()).await;
    world.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn garbage_datagrams_are_rejected_naming_the_sender_and_change_nothing() {
    let mut world = World::new();
    world.run(three_joined()).await;
    let a = world.trees["a"].cluster.as_ref().unwrap().1.clone();
    let mut rng = fastrand::Rng::with_seed(6);
    let garbage = |rng: &mut fastrand::Rng, lengths: std::ops::Range<usize>| -> Bytes {
        let len = rng.usize(lengths);
        (0..len).map(|_| rng.u8(..)).collect::<Vec<u8>>().into()
    };
    for round in 0..2_000 {
        let bytes = match round % 4 {
            // Random bytes.
            0 => garbage(&mut rng, 0..1150),
            // Over the packet cap.
            1 => garbage(&mut rng, 1151..4096),
            // A JSON value that is no header.
            2 => Bytes::from(format!("{{\"n\":{round}}}")),
            // A header claiming to be another node than the sender.
            _ => Bytes::from(
                serde_json::to_vec(&foca::Header {
                    src: NodeIdentity {
                        node: id("c"),
                        addr: "10.0.0.1:7003".parse().unwrap(),
                        generation: 1,
                    },
                    src_incarnation: 0,
                    dst: NodeIdentity {
                        node: id("a"),
                        addr: "10.0.0.1:7001".parse().unwrap(),
                        generation: 1,
                    },
                    message: foca::Message::Announce,
                })
                .unwrap(),
            ),
        };
        a.cast(MembershipMsg::Datagram {
            from: id("b"),
            bytes,
        })
        .unwrap();
    }
    world
        .run(vec![
            Step::Mark,
            Step::Quiet(
                Duration::from_secs(5),
                &["node.suspected", "node.down", "node.left", "node.joined"],
            ),
            Step::Converged,
        ])
        .await;
    let rejected = world.rejected();
    assert_eq!(rejected.len(), 2_000, "every garbage datagram is rejected");
    assert!(
        rejected
            .iter()
            .all(|(at, from, _)| at.as_str() == "a" && from.as_str() == "b")
    );
    let count = |fault| rejected.iter().filter(|(_, _, f)| *f == fault).count();
    assert_eq!(count(WireFault::OversizedDatagram), 500);
    assert_eq!(count(WireFault::SpoofedDatagram), 500);
    assert_eq!(count(WireFault::MalformedDatagram), 1_000);
    let restarts = world.trees["a"]
        .directory
        .list()
        .iter()
        .map(|(_, entry)| entry.control.stats().snapshot().restarts)
        .sum::<u64>();
    assert_eq!(restarts, 0, "no actor of a restarted");
    world.shutdown().await;
}

impl World {
    /// `about`'s identity as `at` sees it.
    fn identity_in_view(&self, at: &str, about: &str) -> NodeIdentity {
        let member = self.trees[at]
            .registry
            .tables()
            .members()
            .into_iter()
            .find(|member| member.node.as_str() == about)
            .unwrap_or_else(|| panic!("{at} does not know {about}"));
        NodeIdentity {
            node: member.node,
            addr: member.addr.parse().unwrap(),
            generation: member.generation,
        }
    }

    /// Hands `to`'s membership a datagram from `from` as foca lays one out: a gossip header
    /// from `from`'s identity to `to`'s (as a third node sees them), the member updates, no
    /// metadata.
    fn gossip(&self, from: &str, to: &str, members: &[foca::Member<NodeIdentity>]) {
        let third = self
            .trees
            .keys()
            .find(|node| **node != from && **node != to)
            .copied();
        // Each node's identity as another node sees it (a node does not list itself).
        let (src, dst) = match third {
            Some(third) => (
                self.identity_in_view(third, from),
                self.identity_in_view(third, to),
            ),
            None => (
                self.identity_in_view(to, from),
                self.identity_in_view(from, to),
            ),
        };
        let header = foca::Header {
            src,
            src_incarnation: 0,
            dst,
            message: foca::Message::Gossip,
        };
        let mut packet = JsonCodec.encode_header(&header).unwrap();
        packet.extend(u16::try_from(members.len()).unwrap().to_be_bytes());
        for member in members {
            packet.extend(JsonCodec.encode_member(member).unwrap());
        }
        assert!(packet.len() <= MAX_PACKET_BYTES, "{} bytes", packet.len());
        self.trees[to]
            .cluster
            .as_ref()
            .unwrap()
            .1
            .cast(MembershipMsg::Datagram {
                from: id(from),
                bytes: Bytes::from(packet),
            })
            .unwrap();
    }

    fn members_of(&self, at: &str) -> Vec<troupe_actors::registry::MemberEntry> {
        self.trees[at].registry.tables().members()
    }
}

/// A member gossiping `alive(b#u64::MAX)` used to make every node take that identity for b:
/// b, whose renewals add one to its own generation, could never outbid it, so its packets were
/// refused as an older incarnation and it was declared down for foca's remove_down_after (a
/// day), as often as the member liked. A generation more than a day ahead of the clock is now a
/// wire fault: the datagram is dropped and b stays as it was.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_member_gossiping_another_ones_identity_from_the_future_changes_nothing() {
    let mut world = World::new();
    world.run(three_joined()).await;
    let b = world.identity_in_view("a", "b");
    let forged = NodeIdentity {
        generation: u64::MAX,
        ..b.clone()
    };
    world.run(vec![Step::Mark]).await;
    world.gossip("c", "a", &[foca::Member::alive(forged)]);
    // a's verdict, whichever it is, comes without time passing. Taken, the forged identity set
    // off a storm at one instant (a refuses b as older and tells it so, b renews by one and
    // tries again, …), in which virtual time never moved on: look before any time passes.
    for _ in 0..10_000 {
        if !world.rejected().is_empty() || world.identity_in_view("a", "b") != b {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        world.identity_in_view("a", "b"),
        b,
        "a's view of b is unchanged"
    );
    assert_eq!(
        world.rejected(),
        [(id("a"), id("c"), WireFault::FutureGeneration)]
    );
    world
        .run(vec![
            Step::Quiet(
                Duration::from_secs(10),
                &["node.suspected", "node.down", "node.left", "node.joined"],
            ),
            Step::Converged,
        ])
        .await;
    assert_eq!(world.identity_in_view("a", "b"), b, "and stays so");
    world.shutdown().await;
}

/// A member gossiping thousands of made-up nodes used to give each a registry entry, a `seen`
/// entry (and on a node, a relay actor and a datagram sender), never removed. A node now tracks
/// at most MAX_MEMBERS members: the rest are left out of the packets that name them, counted,
/// and the real members go on as before.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_flood_of_made_up_members_leaves_the_member_table_at_its_cap() {
    let mut world = World::new();
    world
        .run(vec![
            Step::Start("a", &[]),
            Step::Start("b", &["a"]),
            expect("a", "node.joined", "b"),
            expect("b", "node.joined", "a"),
            Step::Converged,
        ])
        .await;
    let generation = world.identity_in_view("a", "b").generation;
    let fakes: Vec<foca::Member<NodeIdentity>> = (0..5_000u32)
        .map(|n| {
            foca::Member::alive(NodeIdentity {
                node: id(&format!("fake-{n:04}")),
                addr: SocketAddr::from(([10, 9, (n / 250) as u8, (n % 250) as u8 + 1], 7000)),
                generation,
            })
        })
        .collect();
    for chunk in fakes.chunks(6) {
        world.gossip("b", "a", chunk);
    }
    world
        .run(vec![Step::Quiet(Duration::from_secs(1), &[])])
        .await;
    let members = world.members_of("a");
    assert!(
        members.len() <= MAX_MEMBERS,
        "a tracks {} members; at most {MAX_MEMBERS}",
        members.len()
    );
    assert!(
        members
            .iter()
            .any(|member| member.node.as_str() == "b" && member.state == "alive"),
        "b is still a member"
    );
    let refused = world
        .net
        .0
        .lock()
        .unwrap()
        .members_refused
        .get(&id("a"))
        .copied();
    assert_eq!(
        refused,
        Some(5_000 - (MAX_MEMBERS - 1)),
        "every made-up member past the cap is counted"
    );
    assert!(world.rejected().is_empty(), "{:?}", world.rejected());
    world.run(vec![Step::Converged]).await;
    world.shutdown().await;
}

/// A member foca forgot (down for its remove_down_after, a day) is forgotten by the rest of the
/// node too: its registry entry and what the transport kept for it. Before, made-up or departed
/// members stayed in the registry and kept their datagram senders for good.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_member_down_for_a_day_is_forgotten_by_the_registry_and_the_transport() {
    let mut world = World::new();
    world.run(three_joined()).await;
    world
        .run(vec![
            Step::Mark,
            Step::Partition(&[&["a", "b"], &["c"]]),
            expect("a", "node.down", "c"),
            expect("b", "node.down", "c"),
            // foca passes the news on a bounded number of times; past that, nothing brings c
            // back once forgotten (time jumps below, and news still on its way would).
            Step::Quiet(Duration::from_secs(60), &[]),
        ])
        .await;
    assert!(world.members_of("a").iter().any(|m| m.node.as_str() == "c"));
    tokio::time::advance(Duration::from_secs(24 * 60 * 60 + 60)).await;
    world
        .run(vec![Step::Quiet(Duration::from_secs(1), &[])])
        .await;
    let members = world.members_of("a");
    assert!(
        !members.iter().any(|m| m.node.as_str() == "c"),
        "a forgot c: {members:?}"
    );
    assert!(
        members
            .iter()
            .any(|m| m.node.as_str() == "b" && m.state == "alive"),
        "and kept b: {members:?}"
    );
    assert!(
        world
            .net
            .0
            .lock()
            .unwrap()
            .forgotten
            .contains(&(id("a"), id("c"))),
        "a's transport was told to forget c"
    );
    world.shutdown().await;
}
