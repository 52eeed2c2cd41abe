//! The MembershipActor: owns the node's foca (SWIM) instance and is the only code that touches
//! it. Every input (a datagram, a timer, an announce tick, a metadata tick, a leave request) is
//! fed to foca and then foca's runtime is drained at once: datagrams go to the transport (which
//! never blocks), timers become delayed messages to this actor, notifications and the new
//! membership state become `node.*` events and registry updates.
//!
//! Who a peer is comes from its certificate: a datagram whose header names another node than the
//! connection it arrived on is refused, so a node cannot speak for another. A datagram that
//! breaks the protocol (over the packet cap, undecodable, spoofed) is handed to the transport's
//! [`DatagramTransport::reject`], which logs it naming the peer, counts it and closes that
//! connection; it never reaches foca's state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, OwnedNotification, State as FocaState, Timer};
use ractor::RpcReplyPort;

use super::identity::NodeIdentity;
use super::meta::{
    BreakerPosition, META_FORMAT, MetaError, MetaHandler, NodeLoad, NodeMeta, ProviderHealth,
};
use super::peer::{PeerActor, PeerArgs, PeerMsg, RelaySource};
use super::ports::{DatagramTransport, FocaCodec, MembershipCodec, WireFault};
use super::screen::{MAX_GENERATION_LEAD, MAX_MEMBERS, Screen, Verdict};
use crate::event::{EventBus, EventData, NodeMembership};
use crate::ids::{NodeId, Timestamp};
use crate::kernel::{Actor, ActorError, ActorHandle, Context, SendErrorKind};
use crate::provider::ProviderActorRef;
use crate::provider::breaker::BreakerState;
use crate::registry::{MemberEntry, Registry, RegistryMsg};
use crate::session::SessionStats;
use crate::supervisor::{ChildPolicy, ChildSpec, SupervisorHandle, SupervisorMsg};

/// Largest membership datagram (fits a QUIC datagram on any path with the minimum MTU).
pub const MAX_PACKET_BYTES: usize = 1150;

/// Failure-detection timing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MembershipProfile {
    /// foca's LAN defaults (memberlist's): probe every second, suspicion scaled to the size.
    #[default]
    Lan,
    /// Fast detection for tests and demos: probe every 300 ms (RTT 100 ms), suspect to down
    /// after 900 ms, gossip every 100 ms, announce to down members every 2 s (so a healed
    /// partition joins up within seconds).
    Fast,
}

impl MembershipProfile {
    /// foca's configuration for this profile.
    pub fn foca_config(self) -> foca::Config {
        let mut config = foca::Config::new_lan(NonZeroU32::new(32).expect("32 > 0"));
        if self == MembershipProfile::Fast {
            config.probe_period = Duration::from_millis(300);
            config.probe_rtt = Duration::from_millis(100);
            config.suspect_to_down_after = Duration::from_millis(900);
            if let Some(gossip) = config.periodic_gossip.as_mut() {
                gossip.frequency = Duration::from_millis(100);
            }
            if let Some(announce) = config.periodic_announce_to_down_members.as_mut() {
                announce.frequency = Duration::from_secs(2);
            }
        }
        config.max_packet_size = std::num::NonZeroUsize::new(MAX_PACKET_BYTES).expect("1150 > 0");
        config
    }

    /// How often the seeds are announced to until the node is active, and the metadata is
    /// refreshed.
    pub fn tick(self) -> Duration {
        match self {
            MembershipProfile::Lan => Duration::from_secs(1),
            MembershipProfile::Fast => Duration::from_millis(200),
        }
    }
}

/// What a node says about itself in its metadata, besides load.
#[derive(Clone, Default)]
pub struct LocalMeta {
    /// Labels (placement constraints match them).
    pub labels: BTreeMap<String, String>,
    /// Sessions it runs at once.
    pub max_concurrent: u32,
    /// Sessions it lets wait.
    pub queue_capacity: u32,
    /// Its session counters (running, queued), when it runs sessions.
    pub stats: Option<Arc<SessionStats>>,
    /// Its providers, whose breakers it gossips.
    pub providers: Vec<ProviderActorRef>,
}

/// Arguments of each MembershipActor instance.
#[derive(Clone)]
pub struct MembershipArgs {
    /// This node.
    pub node: NodeId,
    /// Its cluster address (as peers should dial it).
    pub addr: SocketAddr,
    /// Addresses to announce to until the node is active.
    pub seeds: Vec<SocketAddr>,
    /// Timing.
    pub profile: MembershipProfile,
    /// The wire format.
    pub codec: Arc<dyn MembershipCodec>,
    /// Datagrams out.
    pub transport: Arc<dyn DatagramTransport>,
    /// Where `node.*` events go.
    pub events: EventBus,
    /// Where the member view goes.
    pub registry: Registry,
    /// What this node gossips about itself.
    pub local: LocalMeta,
    /// The event relay: a PeerActor per member, when relaying.
    pub relay: Option<RelayPorts>,
    /// Seed of foca's random choices (probe order, gossip targets); `None`: a random seed. Tests
    /// pass one so a scenario plays out the same way every time.
    pub rng_seed: Option<u64>,
    /// The highest generation used so far ([`crate::node::ClusterPorts::generation`]).
    pub generation: GenerationFloor,
}

/// The highest membership generation this node has used, shared by the membership's
/// incarnations, and the host's way of keeping it across runs: each incarnation takes a
/// generation above it (see [`crate::node::ClusterPorts::generation`]).
#[derive(Clone, Default)]
pub struct GenerationFloor {
    used: Arc<std::sync::atomic::AtomicU64>,
    keep: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

impl GenerationFloor {
    /// Above `floor` (the highest an earlier run used); `keep` is told every generation taken,
    /// to keep it for the next run. It runs inside the membership actor: it must not block
    /// (hand a file write to a thread).
    pub fn new(floor: u64, keep: Option<Arc<dyn Fn(u64) + Send + Sync>>) -> Self {
        Self {
            used: Arc::new(floor.into()),
            keep,
        }
    }

    /// The highest generation used so far.
    pub fn highest(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }

    /// An incarnation took `generation`.
    fn take(&self, generation: u64) {
        let before = self
            .used
            .fetch_max(generation, std::sync::atomic::Ordering::AcqRel);
        if generation > before
            && let Some(keep) = &self.keep
        {
            keep(generation);
        }
    }
}

impl std::fmt::Debug for GenerationFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationFloor")
            .field("highest", &self.highest())
            .field("kept", &self.keep.is_some())
            .finish()
    }
}

/// What the membership needs to run a PeerActor per member.
#[derive(Clone)]
pub struct RelayPorts {
    /// Where PeerActors are started (the ClusterSupervisor).
    pub supervisor: SupervisorHandle,
    /// Opens relay links.
    pub source: Arc<dyn RelaySource>,
    /// The PeerActors started so far (outlive MembershipActor instances).
    pub peers: Arc<dashmap::DashMap<NodeId, ActorHandle<PeerMsg>>>,
}

impl RelayPorts {
    /// Tells the peer's actor that it is up (starting the actor the first time) or down.
    fn update(&self, identity: &NodeIdentity, up: bool, events: &EventBus) {
        // Cloned out of the map: nothing below may hold one of its locks.
        let known = self.peers.get(&identity.node).map(|peer| peer.clone());
        if let Some(peer) = known {
            let message = if up {
                PeerMsg::Up(identity.clone())
            } else {
                PeerMsg::Down
            };
            match peer.cast(message) {
                Err(refused) if refused.kind == SendErrorKind::Stopped => {
                    // Stopped for good: its supervisor stopped its children (the cluster
                    // branch restarted). Another is started below when the member is up.
                    self.peers.remove(&identity.node);
                }
                // Taken, or kept for the actor's next instance (or refused by a full restart
                // backlog, which only a flood of member changes could fill).
                _ => return,
            }
        }
        if !up {
            return;
        }
        let name = format!("peer-{}", identity.node);
        let handle = ActorHandle::new(self.supervisor.path().child(&name));
        self.peers.insert(identity.node.clone(), handle.clone());
        let args = PeerArgs {
            peer: identity.clone(),
            events: events.clone(),
            source: self.source.clone(),
        };
        let spec = ChildSpec::worker(&handle, move || (PeerActor, args.clone()))
            .policy(ChildPolicy::Permanent);
        let supervisor = self.supervisor.clone();
        let peers = self.peers.clone();
        let node = identity.node.clone();
        tokio::spawn(async move {
            if let Err(error) = supervisor.start_child(spec).await {
                tracing::warn!(peer = %node, %error, "the relay PeerActor did not start");
                peers.remove(&node);
            }
        });
    }
}

impl RelayPorts {
    /// The membership forgot `node`: its PeerActor is stopped and forgotten. The stop is queued
    /// in the supervisor's mailbox now, ahead of the start of another one should the node come
    /// back (that start is sent later, from a task), so the two cannot cross.
    fn forget(&self, node: &NodeId) {
        if self.peers.remove(node).is_none() {
            return;
        }
        let (reply, _ignored) = ractor::concurrency::oneshot();
        let stop = SupervisorMsg::TerminateChild {
            name: format!("peer-{node}"),
            reply: reply.into(),
        };
        if self.supervisor.cast(stop).is_err() {
            // Stopped for good: so are its children.
            tracing::debug!(peer = %node, "no supervisor to stop the relay PeerActor");
        }
    }
}

/// Messages of the MembershipActor.
pub enum MembershipMsg {
    /// A datagram from `from` (named by its certificate).
    Datagram {
        /// The sender.
        from: NodeId,
        /// The packet.
        bytes: Bytes,
    },
    /// A foca timer fired.
    Timer(Timer<NodeIdentity>),
    /// Announce to the seeds (until active) and refresh this node's metadata.
    Tick,
    /// A seed address was resolved to a node.
    Resolved {
        /// The seed.
        addr: SocketAddr,
        /// The node answering there, or why none did.
        node: Result<NodeId, String>,
    },
    /// This node's HTTP address, once it is bound.
    SetHttp(String),
    /// Leave the cluster (clean shutdown); answered once the leave is sent.
    Leave {
        /// Answered when done.
        reply: RpcReplyPort<()>,
    },
}

type Swim = Foca<NodeIdentity, FocaCodec, FastRng, MetaHandler>;

/// foca's randomness, from fastrand (seeded by [`MembershipArgs::rng_seed`] or by fastrand's
/// own per-thread seed).
pub(crate) struct FastRng(fastrand::Rng);

impl rand::TryRng for FastRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.0.u32(..))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.0.u64(..))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dst);
        Ok(())
    }
}

/// A member as this node last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    identity: NodeIdentity,
    state: &'static str,
}

/// The state of one MembershipActor instance.
pub struct MembershipState {
    args: MembershipArgs,
    swim: Swim,
    runtime: AccumulatingRuntime<NodeIdentity>,
    meta_updates: std::sync::mpsc::Receiver<NodeMeta>,
    /// Tells the metadata handler inside foca which nodes were forgotten.
    meta_forget: std::sync::mpsc::Sender<NodeId>,
    identity: NodeIdentity,
    active: bool,
    leaving: bool,
    seen: HashMap<NodeId, Seen>,
    metas: HashMap<NodeId, NodeMeta>,
    left: HashSet<NodeId>,
    http: Option<String>,
    published: Option<NodeMeta>,
    meta_version: u64,
    /// Since when each suspected identity is suspected (noted at ticks).
    suspected_since: HashMap<NodeIdentity, tokio::time::Instant>,
    /// foca's suspect-to-down timeout.
    suspect_timeout: Duration,
    /// Seeds that turned out to be this node (its own address in another form): not dialed
    /// again, which would only be refused as this node on both ends, at every tick.
    own_seeds: HashSet<SocketAddr>,
    /// When new members were last refused in a log line ([`MAX_MEMBERS`]), and how many were
    /// refused since: one line a minute at most, however long a flood lasts.
    members_refused_logged: Option<tokio::time::Instant>,
    members_refused_unlogged: usize,
}

/// How often at most the refusal of new members past [`MAX_MEMBERS`] is logged.
const MEMBERS_REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// The MembershipActor.
pub struct MembershipActor;

fn membership(identity: &NodeIdentity) -> NodeMembership {
    NodeMembership {
        node: identity.node.clone(),
        addr: Some(identity.addr.to_string()),
        generation: Some(identity.generation),
    }
}

impl MembershipState {
    /// Feeds whatever foca produced to the transport, the timers, the events and the registry.
    fn drain(&mut self, ctx: &Context<MembershipMsg>) {
        while let Some((to, bytes)) = self.runtime.to_send() {
            self.args.transport.send(&to, bytes);
        }
        while let Some((delay, timer)) = self.runtime.to_schedule() {
            ctx.send_after(delay, MembershipMsg::Timer(timer));
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::Active => {
                    if !self.active {
                        tracing::info!(node = %self.identity, "joined the cluster");
                    }
                    self.active = true;
                }
                OwnedNotification::Idle => {
                    tracing::info!(node = %self.identity, "no other member is reachable");
                    self.active = false;
                }
                OwnedNotification::Rejoin(identity) => {
                    tracing::warn!(
                        node = %identity,
                        "this node was declared down; rejoined as a new generation"
                    );
                    // Kept like a start's: the next start must go above this one too.
                    self.args.generation.take(identity.generation);
                    self.identity = identity;
                }
                OwnedNotification::Defunct => {
                    tracing::warn!(node = %self.identity, "this node was declared down");
                    self.active = false;
                }
                _ => {}
            }
        }
        while let Ok(meta) = self.meta_updates.try_recv() {
            if meta.leaving {
                self.left.insert(meta.node.clone());
            }
            let node = meta.node.clone();
            self.metas.insert(node.clone(), meta);
            if let Some(seen) = self.seen.get(&node).cloned() {
                self.register(&seen);
            }
        }
        self.sync_view();
    }

    /// Compares foca's membership with what was last seen: publishes `node.*` events for the
    /// changes and updates the registry.
    fn sync_view(&mut self) {
        let current: Vec<(NodeIdentity, FocaState)> = self
            .swim
            .iter_membership_state()
            .map(|member| (member.id().clone(), member.state()))
            .collect();
        // Several identities of one node (generations) may be known: the newest wins.
        let mut newest: HashMap<NodeId, (NodeIdentity, FocaState)> = HashMap::new();
        for (identity, state) in current {
            if identity.node == self.identity.node {
                continue;
            }
            match newest.get(&identity.node) {
                Some((known, _)) if known.generation > identity.generation => {}
                _ => {
                    newest.insert(identity.node.clone(), (identity, state));
                }
            }
        }
        let forgotten: Vec<NodeId> = self
            .seen
            .keys()
            .filter(|node| !newest.contains_key(*node))
            .cloned()
            .collect();
        for node in &forgotten {
            self.forget(node);
        }
        let mut joined = false;
        for (node, (identity, state)) in newest {
            let before = self.seen.get(&node).cloned();
            let renamed = before
                .as_ref()
                .is_some_and(|seen| seen.identity.generation != identity.generation);
            let was_up = before
                .as_ref()
                .is_some_and(|seen| matches!(seen.state, "alive" | "suspect"));
            let now = match state {
                FocaState::Alive => "alive",
                FocaState::Suspect => "suspect",
                FocaState::Down if self.left.contains(&node) => "left",
                FocaState::Down => "down",
            };
            let seen = Seen {
                identity: identity.clone(),
                state: now,
            };
            if before.as_ref() != Some(&seen) {
                // The view first, so whoever reacts to the event finds the member in it.
                self.register(&seen);
            }
            if renamed && now != "down" && now != "left" {
                // A restarted node: a new generation, even if the old one was never seen down.
                joined = true;
                self.left.remove(&node);
                self.args
                    .events
                    .publish(None, EventData::NodeJoined(membership(&identity)));
            } else {
                match (was_up, now) {
                    (false, "alive" | "suspect") => {
                        joined = true;
                        self.left.remove(&node);
                        self.args
                            .events
                            .publish(None, EventData::NodeJoined(membership(&identity)));
                    }
                    (true, "suspect") if before.as_ref().is_some_and(|s| s.state == "alive") => {
                        self.args
                            .events
                            .publish(None, EventData::NodeSuspected(membership(&identity)));
                    }
                    (true, "down") => {
                        self.args
                            .events
                            .publish(None, EventData::NodeDown(membership(&identity)));
                    }
                    (true, "left") => {
                        self.args
                            .events
                            .publish(None, EventData::NodeLeft(membership(&identity)));
                    }
                    _ => {}
                }
            }
            if let Some(relay) = &self.args.relay
                && (before.as_ref().map(|seen| (&seen.identity, seen.state))
                    != Some((&identity, now)))
            {
                relay.update(
                    &identity,
                    matches!(now, "alive" | "suspect"),
                    &self.args.events,
                );
            }
            if before.as_ref() != Some(&seen) {
                self.seen.insert(node, seen);
            }
        }
        if joined {
            // A member that (re)joined has none of this node's metadata: foca disseminates a
            // broadcast a bounded number of times, and the last one may be long gone. Gossip it
            // again, under a new version, even though it did not change.
            self.published = None;
            self.publish_meta();
        }
    }

    /// A restarted instance starts from what the last one knew (the registry's member view).
    /// Members that were up are handed to foca as alive, so foca probes them: one that went
    /// down meanwhile is declared down by the usual suspicion, with its `node.down` (nobody else
    /// may be left to gossip it, and a member this instance never knew would never be
    /// reported); one that is alive stays so, without a second `node.joined`; one that
    /// restarted is learnt under its new generation. A suspect is handed over as alive too (a
    /// suspicion foca did not raise itself would never be refuted by the member, which does not
    /// hear of it): the view shows it alive until foca suspects it again. Members that were
    /// down or had left are handed over as down, so stale gossip about their old generation
    /// cannot bring them back.
    /// Their relay PeerActors are told they are up (started again if the cluster branch
    /// restarted with them). On a first start the registry lists no member.
    fn inherit(&mut self) {
        let members: Vec<MemberEntry> = self
            .args
            .registry
            .tables()
            .members()
            .into_iter()
            .filter(|member| member.node != self.identity.node)
            .collect();
        let mut known = Vec::with_capacity(members.len());
        for member in members {
            let Ok(addr) = member.addr.parse::<SocketAddr>() else {
                continue;
            };
            let state = match member.state.as_str() {
                "alive" => "alive",
                "suspect" => "suspect",
                "left" => "left",
                _ => "down",
            };
            let leaving = member.meta.as_ref().is_some_and(|meta| meta.leaving);
            if state == "left" || leaving {
                self.left.insert(member.node.clone());
            }
            if let Some(meta) = member.meta {
                self.metas.insert(member.node.clone(), meta);
            }
            let identity = NodeIdentity {
                node: member.node,
                addr,
                generation: member.generation,
            };
            known.push((identity, state));
        }
        if known.is_empty() {
            return;
        }
        let updates = known.iter().map(|(identity, state)| {
            if matches!(*state, "alive" | "suspect") {
                foca::Member::alive(identity.clone())
            } else {
                foca::Member::down(identity.clone())
            }
        });
        if let Err(error) = self.swim.apply_many(updates, false, &mut self.runtime) {
            tracing::warn!(%error, "cannot hand the known members to the restarted membership");
        }
        // Only what foca took is in the view: anything else is learnt again from scratch.
        let taken: HashSet<NodeIdentity> = self
            .swim
            .iter_membership_state()
            .map(|member| member.id().clone())
            .collect();
        let mut probed = 0;
        for (identity, state) in known {
            if !taken.contains(&identity) {
                continue;
            }
            let up = matches!(state, "alive" | "suspect");
            if up {
                probed += 1;
                if let Some(relay) = &self.args.relay {
                    relay.update(&identity, true, &self.args.events);
                }
            }
            self.seen
                .insert(identity.node.clone(), Seen { identity, state });
        }
        tracing::info!(
            node = %self.identity,
            members = probed,
            "membership restarted; probing the members the previous instance knew"
        );
    }

    /// `from` told of members past [`MAX_MEMBERS`]: counted by the transport, logged once a
    /// minute at most.
    fn members_refused(&mut self, from: &NodeId, refused: &[NodeId]) {
        self.args.transport.members_refused(from, refused.len());
        self.members_refused_unlogged += refused.len();
        let now = tokio::time::Instant::now();
        if self
            .members_refused_logged
            .is_some_and(|at| now.duration_since(at) < MEMBERS_REFUSED_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            peer = %from,
            refused = self.members_refused_unlogged,
            example = ?refused.first(),
            max = MAX_MEMBERS,
            "new members refused: this node tracks as many members as it may (down ones count \
             until they are forgotten, a day after they went down); a cluster this large is not \
             supported, or a member gossips made-up nodes"
        );
        self.members_refused_logged = Some(now);
        self.members_refused_unlogged = 0;
    }

    /// foca forgot `node` (down for its `remove_down_after`): so does everything kept for it
    /// here, in the registry, in the relay and in the transport, so that member ids that come
    /// and go (or were made up) leave nothing behind.
    fn forget(&mut self, node: &NodeId) {
        tracing::debug!(member = %node, "member forgotten: down for foca's remove_down_after");
        self.seen.remove(node);
        self.metas.remove(node);
        self.left.remove(node);
        // The receiver lives in foca, as long as this state.
        let _ = self.meta_forget.send(node.clone());
        self.args
            .registry
            .update(RegistryMsg::MemberDown(node.clone()));
        if let Some(relay) = &self.args.relay {
            relay.forget(node);
        }
        self.args.transport.forget(node);
    }

    fn register(&self, seen: &Seen) {
        let meta = self
            .metas
            .get(&seen.identity.node)
            .filter(|meta| meta.generation == seen.identity.generation)
            .cloned();
        self.args
            .registry
            .update(RegistryMsg::MemberUp(MemberEntry {
                node: seen.identity.node.clone(),
                addr: seen.identity.addr.to_string(),
                generation: seen.identity.generation,
                state: seen.state.to_owned(),
                meta,
            }));
    }

    /// This node's metadata now.
    fn local_meta(&self) -> NodeMeta {
        let local = &self.args.local;
        let load = |counter: &std::sync::atomic::AtomicU64| {
            u32::try_from(counter.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
        };
        NodeMeta {
            format: META_FORMAT,
            node: self.identity.node.clone(),
            generation: self.identity.generation,
            version: self.meta_version,
            http: self.http.clone(),
            load: NodeLoad {
                running: local.stats.as_ref().map_or(0, |stats| load(&stats.running)),
                queued: local.stats.as_ref().map_or(0, |stats| load(&stats.queued)),
                max_concurrent: local.max_concurrent,
                queue_capacity: local.queue_capacity,
            },
            labels: local.labels.clone(),
            providers: local
                .providers
                .iter()
                .map(|provider| {
                    let now = tokio::time::Instant::now().into_std();
                    ProviderHealth {
                        name: provider.name().to_owned(),
                        breaker: match provider.shared().snapshot().breaker.state(now) {
                            BreakerState::Closed => BreakerPosition::Closed,
                            BreakerState::Open { .. } => BreakerPosition::Open,
                            BreakerState::HalfOpen => BreakerPosition::HalfOpen,
                        },
                    }
                })
                .collect(),
            leaving: self.leaving,
            truncated: false,
        }
    }

    /// Gossips this node's metadata when it changed (or when the identity did).
    fn publish_meta(&mut self) {
        let mut meta = self.local_meta();
        if let Some(published) = &self.published
            && published.same_content(&meta)
            && published.generation == meta.generation
        {
            return;
        }
        self.meta_version += 1;
        meta.version = self.meta_version;
        match meta.fit(self.args.codec.as_ref()) {
            Ok(bytes) => {
                if let Err(error) = self.swim.add_broadcast(&bytes) {
                    tracing::warn!(%error, "node metadata was not gossiped");
                }
                self.published = Some(meta);
            }
            Err(error) => tracing::warn!(%error, "node metadata cannot be encoded"),
        }
    }

    /// Concludes suspicions that outlived twice foca's timeout as foca's own timer would have:
    /// down. foca forgets its pending timers when this node renews its identity (after being
    /// declared down itself, e.g. across a healed partition), which would otherwise leave a
    /// member suspected for good in this view when nobody refutes it.
    fn conclude_stale_suspicions(&mut self) {
        let now = tokio::time::Instant::now();
        let suspects: Vec<(NodeIdentity, foca::Incarnation)> = self
            .swim
            .iter_membership_state()
            .filter(|member| member.state() == FocaState::Suspect)
            .map(|member| (member.id().clone(), member.incarnation()))
            .collect();
        self.suspected_since
            .retain(|identity, _| suspects.iter().any(|(suspect, _)| suspect == identity));
        let mut stale = Vec::new();
        for (identity, incarnation) in suspects {
            let since = *self.suspected_since.entry(identity.clone()).or_insert(now);
            if now.duration_since(since) > self.suspect_timeout * 2 {
                tracing::info!(
                    member = %identity,
                    "a suspicion outlived its timeout (its timer was lost when this node renewed \
                     its identity); concluding it: down"
                );
                stale.push(foca::Member::new(identity, incarnation, FocaState::Down));
            }
        }
        if !stale.is_empty()
            && let Err(error) = self
                .swim
                .apply_many(stale.into_iter(), true, &mut self.runtime)
        {
            tracing::debug!(%error, "concluding a stale suspicion failed");
        }
    }

    fn announce(&mut self, ctx: &Context<MembershipMsg>) {
        for addr in self.args.seeds.clone() {
            if addr == self.args.addr || self.own_seeds.contains(&addr) {
                continue;
            }
            let resolving = self.args.transport.resolve(addr);
            let myself = ctx.handle().clone();
            tokio::spawn(async move {
                let node = resolving.await;
                let _ = myself.cast(MembershipMsg::Resolved { addr, node });
            });
        }
    }
}

/// Which of foca's refusals are the peer breaking the protocol (the rest are ordinary: a
/// message for an older identity, a stale probe).
fn classify(error: &foca::Error) -> Option<WireFault> {
    match error {
        foca::Error::DataTooBig => Some(WireFault::OversizedDatagram),
        foca::Error::MalformedPacket | foca::Error::Decode(_) => Some(WireFault::MalformedDatagram),
        foca::Error::DataFromOurselves | foca::Error::IndirectForOurselves => {
            Some(WireFault::SpoofedDatagram)
        }
        foca::Error::CustomBroadcast(inner) => match inner.downcast_ref::<MetaError>() {
            Some(MetaError::UnknownFormat(_)) => Some(WireFault::UnknownMetaFormat),
            _ => Some(WireFault::MalformedDatagram),
        },
        _ => None,
    }
}

impl Actor for MembershipActor {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        // Higher than every generation used before, by this process or (when the host keeps
        // it) an earlier one: peers take the highest generation of a node id for its current
        // incarnation.
        let identity = NodeIdentity::fresh(args.node.clone(), args.addr, args.generation.highest());
        args.generation.take(identity.generation);
        let ahead = Duration::from_micros(
            identity
                .generation
                .saturating_sub(Timestamp::now().as_micros()),
        );
        if ahead > MAX_GENERATION_LEAD {
            tracing::warn!(
                node = %identity,
                ahead_hours = ahead.as_secs() / 3600,
                "this node's generation is more than a day ahead of its clock (it is one more \
                 than the highest an earlier run kept, in <data_dir>/cluster/generation, whose \
                 clock was ahead); peers refuse such generations: set the clock right, or \
                 remove that file if the clock is right now"
            );
        }
        let (handler, meta) = MetaHandler::new(args.codec.clone());
        let config = args.profile.foca_config();
        let suspect_timeout = config.suspect_to_down_after;
        let swim = Foca::with_custom_broadcast(
            identity.clone(),
            config,
            FastRng(match args.rng_seed {
                Some(seed) => fastrand::Rng::with_seed(seed),
                None => fastrand::Rng::new(),
            }),
            FocaCodec(args.codec.clone()),
            handler,
        );
        let tick = args.profile.tick();
        ctx.send_interval(tick, || MembershipMsg::Tick);
        let _ = ctx.send_self(MembershipMsg::Tick);
        tracing::info!(node = %identity, seeds = args.seeds.len(), "membership started");
        let mut state = MembershipState {
            args,
            swim,
            runtime: AccumulatingRuntime::new(),
            meta_updates: meta.updates,
            meta_forget: meta.forget,
            identity,
            active: false,
            leaving: false,
            seen: HashMap::new(),
            metas: HashMap::new(),
            left: HashSet::new(),
            http: None,
            published: None,
            meta_version: 0,
            suspected_since: HashMap::new(),
            suspect_timeout,
            own_seeds: HashSet::new(),
            members_refused_logged: None,
            members_refused_unlogged: 0,
        };
        state.inherit();
        Ok(state)
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            MembershipMsg::Datagram { from, bytes } => {
                let transport = state.args.transport.clone();
                let reject = |fault: WireFault, detail: String| {
                    transport.reject(&from, fault, &detail);
                };
                if bytes.len() > MAX_PACKET_BYTES {
                    reject(
                        WireFault::OversizedDatagram,
                        format!("{} bytes; at most {MAX_PACKET_BYTES}", bytes.len()),
                    );
                    return Ok(());
                }
                let screen = Screen {
                    codec: state.args.codec.as_ref(),
                    me: &state.identity.node,
                    now_micros: Timestamp::now().as_micros(),
                    tracked: state.swim.iter_membership_state().len(),
                    max_members: MAX_MEMBERS,
                };
                let seen = &state.seen;
                let bytes = match screen.check(&from, &bytes, |node| seen.contains_key(node)) {
                    Verdict::Fault(fault, detail) => {
                        reject(fault, detail);
                        return Ok(());
                    }
                    Verdict::SenderRefused { refused } => {
                        state.members_refused(&from, &refused);
                        return Ok(());
                    }
                    Verdict::UnknownTarget { about } => {
                        tracing::debug!(
                            peer = %from,
                            %about,
                            "an indirect probe about a node that is not a member here; ignored"
                        );
                        return Ok(());
                    }
                    Verdict::Pass {
                        bytes,
                        refused,
                        unknown_meta,
                    } => {
                        if !refused.is_empty() {
                            state.members_refused(&from, &refused);
                        }
                        if !unknown_meta.is_empty() {
                            tracing::debug!(
                                peer = %from,
                                nodes = ?unknown_meta,
                                "metadata of nodes that are not members left out"
                            );
                        }
                        bytes
                    }
                };
                if state.leaving {
                    return Ok(());
                }
                if let Err(error) = state.swim.handle_data(&bytes, &mut state.runtime) {
                    match classify(&error) {
                        Some(fault) => reject(fault, error.to_string()),
                        None => {
                            tracing::debug!(peer = %from, %error, "datagram refused by the membership");
                        }
                    }
                }
            }
            MembershipMsg::Timer(timer) => {
                if let Err(error) = state.swim.handle_timer(timer, &mut state.runtime) {
                    tracing::debug!(%error, "membership timer failed");
                }
            }
            MembershipMsg::Tick => {
                if state.leaving {
                    return Ok(());
                }
                state.conclude_stale_suspicions();
                state.publish_meta();
                if !state.active || state.swim.num_members() == 0 {
                    state.announce(ctx);
                }
            }
            MembershipMsg::Resolved { addr, node } => match node {
                Ok(node) if node == state.identity.node => {
                    tracing::debug!(%addr, "a seed is this node; not announced to again");
                    state.own_seeds.insert(addr);
                }
                Ok(node) => {
                    if !state.active || state.swim.num_members() == 0 {
                        let seed = NodeIdentity {
                            node,
                            addr,
                            generation: 0,
                        };
                        if let Err(error) = state.swim.announce(seed, &mut state.runtime) {
                            tracing::debug!(%addr, %error, "announce failed");
                        }
                    }
                }
                Err(error) => tracing::debug!(%addr, %error, "seed unreachable; retrying"),
            },
            MembershipMsg::SetHttp(http) => {
                state.http = Some(http);
                state.publish_meta();
            }
            MembershipMsg::Leave { reply } => {
                if !state.leaving {
                    state.leaving = true;
                    state.publish_meta();
                    // Push the leaving metadata out, then the leave itself.
                    let _ = state.swim.gossip(&mut state.runtime);
                    if let Err(error) = state.swim.leave_cluster(&mut state.runtime) {
                        tracing::debug!(%error, "leave failed");
                    }
                    tracing::info!(node = %state.identity, "left the cluster");
                }
                state.drain(ctx);
                let _ = reply.send(());
                return Ok(());
            }
        }
        state.drain(ctx);
        Ok(())
    }
}
