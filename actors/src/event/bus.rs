//! The EventBus: typed pub/sub for one node.
//!
//! Publishing is a cast into the bus actor's mailbox, so it never blocks the publisher. The actor
//! stamps each event with the next id of this node, keeps it in a recent-events ring for replay
//! (at most `ring_capacity` events and [`RING_BYTES`] of them: the oldest go first, and a replay
//! from before the ring reads the store), hands it to the persistence hook, and fans it out
//! through a broadcast channel. Each subscriber
//! reads the channel at its own pace; one that falls more than `subscriber_buffer` events behind
//! loses the oldest of them and receives one `events.lagged {missed}` marker instead.
//!
//! The channel's memory is bounded in bytes, not only in events: an event of more than
//! [`FANOUT_WHOLE_BYTES`] rides it as a weak reference, held by the ring alone, so the slots of
//! the channel keep at most `subscriber_buffer` small events alive besides what the ring holds
//! (before, 4,096 slots of the largest output events kept about 800 MiB alive after the ring had
//! let them go). A subscriber still behind such an event when the ring lets it go loses it, as
//! if it had lagged: it receives an `events.lagged` marker in its place (one for a run of them),
//! with the id to re-read after from the event log. A subscription's replay from the ring (a
//! tail, a resume) waits in it held the same way (its first event whole, so a marker for a
//! later one names a delivered event), so a slow reader of a long replay does not keep alive
//! what the ring let go either.
//!
//! What survives a restart of the bus actor: the fan-out channel (subscribers stay connected),
//! the sequence counters (ids keep growing), the highest sequence relayed per other node, and
//! publishes queued at the time of the crash (they are redelivered by the handle). What is
//! rebuilt: the ring, from the store when there is one (the large events in the channel that a
//! subscriber had not read yet were the old ring's: it gets an `events.lagged` marker for them).
//!
//! Ids never repeat, not even after the node is killed or its event log lost appends: with a
//! store, the bus hands out a sequence number only once the store has durably reserved it
//! ([`EventStore::reserve`]), asking for the next block of numbers well before the current one
//! runs out, so publishing does not wait in the steady state. A node that crashed starts past
//! its reservation (the numbers in between are never used); a clean stop gives back what was
//! not handed out ([`EventStore::release`]), so the numbering stays dense across clean restarts.
//!
//! Events of other nodes arrive in acknowledged batches ([`EventBus::relay_batch`]): the call
//! resolves once the bus has taken the batch, so a relay link that waits for it before it
//! acknowledges to the sender cannot outrun this node's bus. Duplicates (a `(node, seq)` not
//! above the highest one relayed from that node) are dropped; the highest ones are seeded from
//! the store at start, so a restarted node knows where each peer's stream stopped.
//!
//! A relayed batch whose write to the store failed is not acknowledged: the bus *rewinds* that
//! node's stream to just before the batch ([`EventBus::relayed_through`] answers the rewound
//! cursor; a link opened before the rewind is refused), the link fails, and the next link asks
//! the peer for those events again. The bus stores what comes again up to where it had got
//! without publishing it a second time, at the positions the events first had (the store keeps
//! an event it already has once), so the log has no hole and no subscriber sees a duplicate.

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;
use ractor::RpcReplyPort;
use tokio::sync::broadcast;

use super::filter::EventFilter;
use super::model::{Event, EventData, EventId, EventKind, EventsLagged};
use crate::ids::{NodeId, SessionId, Timestamp};
use crate::kernel::{Actor, ActorError, ActorHandle, CallError, Context, SendErrorKind};

/// How long front ends wait for the bus to answer a replay query.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relay link waits for the bus to take a batch before it gives up (and relinks).
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(30);
/// Sequence numbers reserved at a time; the next block is asked for when less than half of the
/// current one is left. After a crash at most two blocks of numbers go unused.
pub const RESERVE_BLOCK: u64 = 16_384;
/// Publishes that may wait for a reservation (a stalled disk); past that they are dropped and
/// counted, so a dead store cannot exhaust memory.
pub const MAX_UNRESERVED: usize = 100_000;
/// Bytes of publishes that may wait for a reservation (each counted by its payload's texts,
/// [`EventData::text_bytes`], and its place in the queue), besides [`MAX_UNRESERVED`]: past
/// either, publishes are dropped and counted alike. 64 MiB holds the 100,000 of usual sizes (a
/// `session.progress` counts about 150 bytes) and about 1,000 of the largest (a
/// `session.output` of 64 KiB of lines).
pub const MAX_UNRESERVED_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of events the replay ring keeps at most, besides `ring_capacity` events: past either
/// bound the oldest events leave it (a replay from before the ring reads the event log). Each
/// event counts three times its size ([`Event::approx_bytes`]): itself, and the SSE frame and
/// WebSocket frame the front ends keep in its `RenderCache` once a subscriber sent it (each its
/// JSON, about its size again). 256 MiB lets the default 10,000 events be of any usual size (a
/// `session.progress` counts about 1.3 KiB, a `session.output` of 64 lines of 100 bytes about
/// 25 KiB: 10,000 of those 240 MiB) and holds the ring to that when they are all of the largest
/// (64 KiB of lines, about 200 KiB: 1,300 of them), or when `events.ring_capacity` is raised to
/// as many as 1,000,000.
pub const RING_BYTES: usize = 256 * 1024 * 1024;
/// The largest event (by [`Event::approx_bytes`]) the fan-out channel holds itself; a larger one
/// rides it as a weak reference and lives as long as the ring (or a subscriber) holds it. With
/// the default `events.subscriber_buffer` (4,096), the channel keeps at most about 48 MiB alive
/// beyond the ring (each event with the two renderings the front ends may attach to it). Most
/// events are far smaller (a `session.progress` about 400 bytes); a `session.output` of a few
/// dozen lines is larger.
pub const FANOUT_WHOLE_BYTES: usize = 4096;
/// How long after a failed reservation the next attempt is made.
const RESERVE_RETRY: Duration = Duration::from_secs(1);
/// How long a reservation may take before it counts as failed (and is tried again).
const RESERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// One published event with its position in this node's arrival order.
#[derive(Debug, Clone)]
pub struct BusItem {
    /// Local arrival position (grows by one per event published or relayed here).
    pub pos: u64,
    /// The event.
    pub event: Arc<Event>,
}

/// Persistence hook: the node writes every event to its store through this.
///
/// Every method is required, with no default: a wrapper around a store that forgot to pass
/// `reserve` or `release` on would silently turn id reservation off, and ids would repeat after
/// a crash. An in-memory store says so explicitly (`None`, nothing to release).
pub trait EventStore: Send + Sync + 'static {
    /// Called for every event, in arrival order, from inside the bus actor: it must not block
    /// (queue the write and batch it).
    fn append(&self, item: &BusItem);

    /// Stores again another node's event that was published here before but whose write
    /// failed: at `item.pos`, the position it first had (or a new one), unless the log has it
    /// already (by node and sequence number). `arrival` is the arrival position it is queued at,
    /// which [`EventStore::written`] waits for. Must not block.
    fn append_again(&self, item: &BusItem, arrival: u64);

    /// Where to continue after the node restarts: counters and the most recent events. May
    /// block (the bus calls it on tokio's blocking pool).
    fn resume(&self, ring_capacity: usize) -> StoreResume;

    /// Durably records that this node may hand out sequence numbers up to `through`, so that
    /// [`EventStore::resume`] after a crash answers at least `through`. `None`: nothing to wait
    /// for (this store keeps no ids across restarts). The future must resolve only once the
    /// reservation is durable; it must not block the caller (the bus awaits it in a task).
    fn reserve(&self, through: u64) -> Option<BoxFuture<'static, Result<(), String>>>;

    /// The bus stopped cleanly after handing out sequence numbers up to `last`: the reservation
    /// past it may be given back, so the next start continues at `last + 1`. Must not block.
    fn release(&self, last: u64);

    /// Resolves once the appends at arrival positions `positions` have been through the writer,
    /// without hurrying it: `Ok` when they are written, `Err` saying why when the write of any of
    /// them failed (or may have: a store that cannot tell answers `Err`, and the batch is only
    /// fetched again) or the store closed. The relay acknowledges a batch of another node's
    /// events only after `Ok`, so that what a peer was told is here is in the log, and the queue
    /// of such appends is bounded by the relay's window. `None`: nothing to wait for (this store
    /// writes nothing to wait for).
    fn written(
        &self,
        positions: RangeInclusive<u64>,
    ) -> Option<BoxFuture<'static, Result<(), String>>>;

    /// Another node's relayed stream continues after `seq` (its sender said the stream starts
    /// there: "new events only" on a first link), though none of those events may be stored:
    /// [`EventStore::resume`] must then answer at least `seq` for `node`, so that a restart
    /// resumes there instead of asking for new events only again, and losing what came in
    /// between. Must not block.
    fn relay_floor(&self, node: &NodeId, seq: u64);

    /// `node`'s events after `after` and through `through` will not come again (the peer no
    /// longer has them): a store that keeps, across restarts, where relayed events whose write
    /// failed are missing ([`StoreResume::gaps`]) stops waiting for them. Must not block.
    fn relay_lost(&self, node: &NodeId, after: u64, through: u64);
}

/// What the store remembers for the bus at start.
#[derive(Debug, Clone, Default)]
pub struct StoreResume {
    /// The highest sequence number this node may have handed out: its newest stored event, or
    /// its reservation when that is higher (after a crash).
    pub last_seq: u64,
    /// The highest arrival position ever assigned.
    pub last_pos: u64,
    /// The most recent events (oldest first) to seed the replay ring.
    pub recent: Vec<BusItem>,
    /// The highest sequence number stored of each other node (where its relayed stream
    /// continues).
    pub relayed: Vec<(NodeId, u64)>,
    /// The lowest sequence number of each other node that may be missing from the log below
    /// its highest one stored (a relayed batch whose write failed, not fetched again before the
    /// node stopped): its stream continues just before it, and what comes again up to the
    /// highest one stored is stored, not published (it was when it first came).
    pub gaps: Vec<(NodeId, u64)>,
}

/// Sizes of the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBusConfig {
    /// Events kept in memory for replay.
    pub ring_capacity: usize,
    /// How far a subscriber may fall behind before it loses events.
    pub subscriber_buffer: usize,
}

impl Default for EventBusConfig {
    fn default() -> Self {
        Self {
            ring_capacity: 10_000,
            subscriber_buffer: 4_096,
        }
    }
}

/// The parts of the bus that outlive one instance of the bus actor.
pub struct BusShared {
    node: NodeId,
    config: EventBusConfig,
    tx: broadcast::Sender<Fanned>,
    last_seq: AtomicU64,
    last_pos: AtomicU64,
    /// Sequence numbers up to this one are durably reserved (meaningful with a store).
    reserved: AtomicU64,
    /// Highest sequence number relayed here per other node (written by the bus actor only).
    relayed: DashMap<NodeId, u64>,
    /// Streams rewound after a failed write: what comes again up to `through` is stored, not
    /// published (written by the bus actor only).
    rewound: DashMap<NodeId, Rewound>,
    /// How many times each node's stream was rewound: a relay link opened before the latest
    /// rewind is refused, so that the next one asks from the rewound cursor.
    rewinds: DashMap<NodeId, u64>,
    /// Bumped after every rewind, for links waiting to hear of one.
    rewound_signal: tokio::sync::watch::Sender<u64>,
    /// Publishes waiting for a reservation, oldest first: they survive a crash of the instance
    /// that took them from its mailbox. Touched only by the current instance, in its handler.
    waiting: std::sync::Mutex<Waiting>,
    resumed: std::sync::Once,
    published_by_kind: Vec<AtomicU64>,
    dropped: AtomicU64,
    /// The ring's byte budget ([`RING_BYTES`]; smaller in tests).
    ring_bytes: usize,
    /// The bytes of publishes that may wait ([`MAX_UNRESERVED_BYTES`]; smaller in tests).
    max_unreserved_bytes: usize,
}

impl BusShared {
    /// Creates the shared parts for node `node`.
    pub fn new(node: NodeId, config: EventBusConfig) -> Arc<Self> {
        let (tx, _) = broadcast::channel(config.subscriber_buffer.max(1));
        Arc::new(Self {
            node,
            config,
            tx,
            last_seq: AtomicU64::new(0),
            last_pos: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            relayed: DashMap::new(),
            rewound: DashMap::new(),
            rewinds: DashMap::new(),
            rewound_signal: tokio::sync::watch::Sender::new(0),
            waiting: std::sync::Mutex::new(Waiting::default()),
            resumed: std::sync::Once::new(),
            published_by_kind: EventKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            dropped: AtomicU64::new(0),
            ring_bytes: RING_BYTES,
            max_unreserved_bytes: MAX_UNRESERVED_BYTES,
        })
    }
}

/// A node's relayed stream rewound after a failed write: its events after `from` and up to
/// `through` were published here but may be missing from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rewound {
    from: u64,
    through: u64,
    /// The arrival positions those events first had (those still in the ring when the stream
    /// was rewound), by sequence number: stored again, they go back there.
    positions: std::collections::BTreeMap<u64, u64>,
}

/// The bus's answer to a relayed batch.
pub struct RelayTaken {
    /// The highest sequence number of the node taken so far; `None`: refused, the link is older
    /// than the node's latest rewind.
    pub high: Option<u64>,
    /// Resolves once the events taken are written by the store ([`EventStore::written`]); when
    /// that failed, rewinds the node's stream to just before the batch's first event that went
    /// to the store, whether anyone still waits or not.
    written: Option<RewindUnlessWritten>,
}

/// Why a relayed batch was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RelayBatchError {
    /// The bus did not take it in time (or is gone).
    #[error(transparent)]
    Bus(#[from] CallError),
    /// The bus took it, but the store did not write it; the node's stream is rewound to before
    /// it ([`EventBus::relayed_through`]), so the next link fetches it again.
    #[error("the event log did not store the batch ({0}); it is fetched again")]
    NotWritten(String),
    /// The link was opened before the node's stream was rewound: not taken; the next link asks
    /// from the rewound cursor.
    #[error("the node's relayed stream was rewound since this link opened; it relinks")]
    Rewound,
}

/// Messages of the bus actor.
pub enum EventBusMsg {
    /// Publish an event of this node.
    Publish {
        /// The session it concerns.
        session: Option<SessionId>,
        /// Kind and payload.
        data: EventData,
        /// When it happened.
        at: Timestamp,
    },
    /// Publish a batch of events node `node` published (they keep their ids; any `(node, seq)`
    /// not above the highest one relayed from `node` is dropped); answered with that highest
    /// sequence number once the batch is taken.
    RelayBatch {
        /// The node whose events these are (events of any other node are dropped).
        node: NodeId,
        /// Where `node`'s stream starts, when the link just said so: nothing at or below it will
        /// come.
        floor: Option<u64>,
        /// Its events, in sequence order.
        events: Vec<Event>,
        /// The node's rewind count when the link handing it over opened
        /// ([`EventBus::relay_rewinds`]); a batch of an older link is refused.
        rewinds: Option<u64>,
        /// The highest sequence number of `node` taken so far, and when the batch is written.
        reply: RpcReplyPort<RelayTaken>,
    },
    /// The write of `node`'s events after `to` may have failed: store them again when they come
    /// again (without publishing them twice), and let the next link ask for what follows `to`.
    RelayRewind {
        /// The node whose stream it is.
        node: NodeId,
        /// The highest sequence number known to be written.
        to: u64,
        /// Answered once the rewind is in place.
        reply: RpcReplyPort<()>,
    },
    /// Answer a replay query from the ring.
    Replay {
        /// Where to start.
        from: ReplayFrom,
        /// Which events.
        filter: EventFilter,
        /// Where the answer goes.
        reply: RpcReplyPort<Replay>,
    },
    /// A reservation asked for by this bus ended.
    Reserved {
        /// Through which sequence number.
        through: u64,
        /// Whether it is durable, or why not.
        outcome: Result<(), String>,
    },
    /// Time to ask for a reservation again after a failure.
    RetryReserve,
}

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Every event after this id.
    After(EventId),
    /// The last `n` matching events.
    Tail(usize),
    /// The events of `id.node` with a sequence number above `id.seq` still in the ring (the
    /// relay's backfill; robust to ids that were never stored). `found` is true when the ring
    /// holds every such event: it holds one of that node at or below `id.seq`, or `id.seq` is
    /// at or past that node's newest.
    NodeAfter(EventId),
    /// Nothing: live events only.
    Now,
}

/// The answer to a replay query.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Matching events, oldest first.
    pub events: Vec<Arc<Event>>,
    /// The last arrival position at the time of the query; live events after it are new.
    pub through_pos: u64,
    /// For `After`: false when the id is not in the ring (too old, or unknown).
    pub found: bool,
    /// For `After` with `found == false`: events known to be missing before the ring's oldest.
    pub missed: u64,
    /// The oldest event still in the ring.
    pub oldest: Option<EventId>,
    /// The arrival position of the oldest event still in the ring: a replay that fills a gap
    /// from the event log reads the log up to (not including) this position.
    pub oldest_pos: Option<u64>,
    /// The newest event at the time of the query (at `through_pos`), whatever the filter: a
    /// stream that starts now can name it as where it starts.
    pub newest: Option<EventId>,
}

/// The bus actor.
pub struct EventBusActor;

/// Arguments of each bus instance.
pub struct EventBusArgs {
    /// Channel and counters shared across instances.
    pub shared: Arc<BusShared>,
    /// Where events are persisted, if anywhere.
    pub store: Option<Arc<dyn EventStore>>,
}

/// A publish waiting for its sequence number to be reserved.
struct Unreserved {
    session: Option<SessionId>,
    data: EventData,
    at: Timestamp,
}

impl Unreserved {
    /// What it counts against [`MAX_UNRESERVED_BYTES`]: its place in the queue and its texts.
    fn bytes(&self) -> usize {
        size_of::<Self>() + self.data.text_bytes()
    }
}

/// The publishes waiting for a reservation, oldest first, and their bytes.
#[derive(Default)]
struct Waiting {
    queue: VecDeque<Unreserved>,
    /// The sum of their [`Unreserved::bytes`].
    bytes: usize,
}

impl Waiting {
    fn len(&self) -> usize {
        self.queue.len()
    }

    fn push_back(&mut self, publish: Unreserved) {
        self.bytes += publish.bytes();
        self.queue.push_back(publish);
    }

    fn pop_front(&mut self) -> Option<Unreserved> {
        let publish = self.queue.pop_front()?;
        self.bytes -= publish.bytes();
        Some(publish)
    }

    /// Takes them all.
    fn take(&mut self) -> VecDeque<Unreserved> {
        self.bytes = 0;
        std::mem::take(&mut self.queue)
    }
}

/// The recent events kept for replay, oldest first: at most `capacity` of them and `budget`
/// bytes ([`ring_charge`]). Read as the `VecDeque` it is; added to by [`Ring::push`] only, which
/// keeps the count and bytes in step.
struct Ring {
    items: VecDeque<BusItem>,
    /// What each item counts against the budget, in the same order (computed once, at push).
    charges: VecDeque<u32>,
    /// Their sum.
    bytes: usize,
    capacity: usize,
    budget: usize,
}

impl Ring {
    fn new(capacity: usize, budget: usize) -> Self {
        let reserved = capacity.min(65_536);
        Self {
            items: VecDeque::with_capacity(reserved),
            charges: VecDeque::with_capacity(reserved),
            bytes: 0,
            capacity,
            budget,
        }
    }

    /// Adds the newest event, first taking out the oldest ones while either bound would be
    /// passed. The newest is always kept, even alone over the budget: the ring names the newest
    /// event ([`Replay::newest`]).
    fn push(&mut self, item: BusItem) {
        let charge = ring_charge(&item.event);
        while !self.items.is_empty()
            && (self.items.len() >= self.capacity || self.bytes + charge as usize > self.budget)
        {
            self.items.pop_front();
            if let Some(oldest) = self.charges.pop_front() {
                self.bytes -= oldest as usize;
            }
        }
        self.items.push_back(item);
        self.charges.push_back(charge);
        self.bytes += charge as usize;
    }
}

impl std::ops::Deref for Ring {
    type Target = VecDeque<BusItem>;

    fn deref(&self) -> &Self::Target {
        &self.items
    }
}

/// What an event counts against the ring's [`RING_BYTES`]: three times its size, for itself and
/// the two renderings the front ends may keep in it. Lengths only: this runs for every event.
/// (The store reads no more than [`RING_BYTES`] of them to seed the ring at a restart.)
pub fn ring_charge(event: &Event) -> u32 {
    u32::try_from(event.approx_bytes().saturating_mul(3)).unwrap_or(u32::MAX)
}

/// State of one bus instance.
pub struct EventBusState {
    shared: Arc<BusShared>,
    store: Option<Arc<dyn EventStore>>,
    ring: Ring,
    /// A reservation is being asked for.
    reserving: bool,
}

impl Actor for EventBusActor {
    type Msg = EventBusMsg;
    type State = EventBusState;
    type Arguments = EventBusArgs;

    async fn pre_start(
        &self,
        ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let shared = args.shared;
        let mut ring = Ring::new(shared.config.ring_capacity, shared.ring_bytes);
        if let Some(store) = &args.store {
            // `resume` blocks (a store flushes its queued appends and reads its log): off the
            // runtime's workers, which this start would otherwise hold for as long as that takes.
            let resume = {
                let store = Arc::clone(store);
                let capacity = shared.config.ring_capacity;
                tokio::task::spawn_blocking(move || store.resume(capacity))
                    .await
                    .map_err(|error| format!("reading the event store to resume failed: {error}"))?
            };
            shared.resumed.call_once(|| {
                shared
                    .last_seq
                    .fetch_max(resume.last_seq, Ordering::Relaxed);
                // Nothing past what may have been handed out is reserved yet.
                shared
                    .reserved
                    .fetch_max(resume.last_seq, Ordering::Relaxed);
                shared
                    .last_pos
                    .fetch_max(resume.last_pos, Ordering::Relaxed);
                let relayed = resume.relayed.iter().map(|(node, seq)| (node, *seq));
                let in_ring = resume
                    .recent
                    .iter()
                    .map(|item| (&item.event.id.node, item.event.id.seq));
                for (node, seq) in relayed.chain(in_ring) {
                    if *node != shared.node {
                        let mut high = shared.relayed.entry(node.clone()).or_insert(0);
                        *high = (*high).max(seq);
                    }
                }
                for (node, gap) in &resume.gaps {
                    let high = shared.relayed.get(node).map_or(0, |high| *high);
                    if *node != shared.node && *gap >= 1 && *gap <= high {
                        tracing::warn!(
                            %node,
                            from = *gap,
                            through = high,
                            "relayed events whose write failed before the restart are missing \
                             from the log; they are fetched from the peer again"
                        );
                        shared.rewound.insert(
                            node.clone(),
                            Rewound {
                                from: gap - 1,
                                through: high,
                                positions: Default::default(),
                            },
                        );
                    }
                }
            });
            for item in resume.recent {
                ring.push(item);
            }
        }
        let mut state = EventBusState {
            shared,
            store: args.store,
            ring,
            reserving: false,
        };
        // Reserve ahead at once, so the first publishes do not wait for the disk.
        state.reserve_ahead(ctx);
        Ok(state)
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            EventBusMsg::Publish { session, data, at } => {
                state.publish(ctx, Unreserved { session, data, at });
            }
            EventBusMsg::RelayBatch {
                node,
                floor,
                events,
                rewinds,
                reply,
            } => {
                let current = state.shared.rewinds.get(&node).map_or(0, |count| *count);
                let taken = if rewinds.is_some_and(|rewinds| rewinds < current) {
                    RelayTaken {
                        high: None,
                        written: None,
                    }
                } else {
                    state.relay_batch(ctx.handle(), &node, floor, events)
                };
                let _ = reply.send(taken);
            }
            EventBusMsg::RelayRewind { node, to, reply } => {
                state.rewind(node, to);
                let _ = reply.send(());
            }
            EventBusMsg::Replay {
                from,
                filter,
                reply,
            } => {
                let _ = reply.send(state.replay(&from, &filter));
            }
            EventBusMsg::Reserved { through, outcome } => {
                state.reserving = false;
                match outcome {
                    Ok(()) => {
                        state.shared.reserved.fetch_max(through, Ordering::Relaxed);
                        state.hand_out(ctx);
                    }
                    Err(error) => {
                        tracing::warn!(
                            %error,
                            waiting = state.waiting().len(),
                            "event ids could not be reserved in the store; publishes wait and the \
                             reservation is tried again"
                        );
                        ctx.send_after(RESERVE_RETRY, EventBusMsg::RetryReserve);
                    }
                }
            }
            EventBusMsg::RetryReserve => state.reserve_ahead(ctx),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _ctx: &Context<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        let unreserved = state.waiting().take();
        if !unreserved.is_empty() {
            let count = unreserved.len() as u64;
            state.shared.dropped.fetch_add(count, Ordering::Relaxed);
            tracing::warn!(
                count,
                "events dropped at shutdown: their ids were not reserved yet"
            );
        }
        if let Some(store) = &state.store {
            // Every id handed out is at most `last`; a later start continues right after it.
            let last = state.shared.last_seq.load(Ordering::Relaxed);
            state.shared.reserved.store(last, Ordering::Relaxed);
            store.release(last);
        }
        Ok(())
    }
}

impl EventBusState {
    /// Publishes an event of this node once its sequence number is reserved, keeping the order
    /// of publishes.
    fn publish(&mut self, ctx: &Context<EventBusMsg>, publish: Unreserved) {
        let (waiting, waiting_bytes) = {
            let waiting = self.waiting();
            (waiting.len(), waiting.bytes)
        };
        if waiting == 0 && self.is_reserved(self.next_seq()) {
            self.stamp(publish);
            self.reserve_ahead(ctx);
            return;
        }
        if waiting >= MAX_UNRESERVED
            || waiting_bytes + publish.bytes() > self.shared.max_unreserved_bytes
        {
            let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            if dropped.is_multiple_of(1000) {
                tracing::warn!(
                    waiting,
                    waiting_bytes,
                    "event dropped: too many publishes wait for the store to reserve ids"
                );
            }
            return;
        }
        self.waiting().push_back(publish);
        self.hand_out(ctx);
    }

    /// The publishes waiting for a reservation (only this instance touches them, never across
    /// an await).
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // A poisoned lock means a handler panicked while holding it; the queue itself is intact.
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn next_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::Relaxed) + 1
    }

    fn is_reserved(&self, seq: u64) -> bool {
        self.store.is_none() || seq <= self.shared.reserved.load(Ordering::Relaxed)
    }

    /// Publishes the waiting events whose sequence numbers are reserved now, then reserves
    /// ahead.
    fn hand_out(&mut self, ctx: &Context<EventBusMsg>) {
        while self.is_reserved(self.next_seq()) {
            let Some(publish) = self.waiting().pop_front() else {
                break;
            };
            self.stamp(publish);
        }
        self.reserve_ahead(ctx);
    }

    fn stamp(&mut self, publish: Unreserved) {
        let seq = self.shared.last_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let event = Event {
            rendered: Default::default(),
            id: EventId::new(self.shared.node.clone(), seq),
            at: publish.at,
            session: publish.session,
            data: publish.data,
        };
        self.accept(event);
    }

    /// Asks the store for the next block of sequence numbers when less than half a block is
    /// reserved past what is handed out and waiting.
    fn reserve_ahead(&mut self, ctx: &Context<EventBusMsg>) {
        let Some(store) = &self.store else { return };
        if self.reserving {
            return;
        }
        let wanted = self.shared.last_seq.load(Ordering::Relaxed) + self.waiting().len() as u64;
        if self.shared.reserved.load(Ordering::Relaxed) >= wanted + RESERVE_BLOCK / 2 {
            return;
        }
        let through = wanted + RESERVE_BLOCK;
        match store.reserve(through) {
            None => {
                self.shared.reserved.fetch_max(through, Ordering::Relaxed);
            }
            Some(reservation) => {
                self.reserving = true;
                let bus = ctx.handle().clone();
                tokio::spawn(async move {
                    let outcome = match tokio::time::timeout(RESERVE_TIMEOUT, reservation).await {
                        Ok(outcome) => outcome,
                        Err(_) => Err(format!("no answer within {RESERVE_TIMEOUT:?}")),
                    };
                    // A bus that stopped for good no longer needs it.
                    let _ = bus.cast(EventBusMsg::Reserved { through, outcome });
                });
            }
        }
    }

    /// Takes a batch of `node`'s events; returns the highest sequence number of `node` taken,
    /// and when the store has written what was taken.
    fn relay_batch(
        &mut self,
        bus: &ActorHandle<EventBusMsg>,
        node: &NodeId,
        floor: Option<u64>,
        events: Vec<Event>,
    ) -> RelayTaken {
        let before = self.shared.last_pos.load(Ordering::Relaxed);
        let (high, first_stored) = self.take_relayed(node, floor, events);
        let high = Some(high);
        let last = self.shared.last_pos.load(Ordering::Relaxed);
        let written = match (&self.store, first_stored) {
            (Some(store), Some(first)) if last > before => {
                store.written(before + 1..=last).map(|written| {
                    RewindUnlessWritten(Some(Box::new(PendingWrite {
                        written,
                        bus: bus.clone(),
                        node: node.clone(),
                        to: first - 1,
                    })))
                })
            }
            _ => None,
        };
        RelayTaken { high, written }
    }

    /// Publishes and stores `node`'s events above its highest one, and stores again (without
    /// publishing) those of a rewound stretch. Returns the highest sequence number of `node`
    /// taken and the first one handed to the store in this batch.
    fn take_relayed(
        &mut self,
        node: &NodeId,
        floor: Option<u64>,
        events: Vec<Event>,
    ) -> (u64, Option<u64>) {
        if *node == self.shared.node {
            return (0, None);
        }
        let mut high = self.shared.relayed.get(node).map_or(0, |high| *high);
        // The bounds only: the positions stay in the map (looked up per event stored again).
        let mut rewound = self
            .shared
            .rewound
            .get(node)
            .map(|rewound| (rewound.from, rewound.through));
        if let Some(floor) = floor {
            if floor > high {
                high = floor;
                if let Some(store) = &self.store {
                    store.relay_floor(node, floor);
                }
            }
            // The peer no longer has what it does not send: nothing to wait for below it.
            if let Some((from, through)) = &mut rewound
                && floor > *from
            {
                if let Some(store) = &self.store {
                    store.relay_lost(node, *from, floor.min(*through));
                }
                *from = floor;
            }
        }
        let mut first_stored = None;
        for event in events {
            let seq = event.id.seq;
            if event.id.node != *node {
                continue;
            }
            if let Some((from, through)) = &mut rewound
                && seq > *through
                && *from < *through
            {
                // The peer went past the stretch without sending the rest: it no longer has it.
                tracing::warn!(
                    %node,
                    from = *from + 1,
                    through = *through,
                    "relayed events whose write failed did not come again (the peer no longer \
                     has them); this node's log lacks them"
                );
                if let Some(store) = &self.store {
                    store.relay_lost(node, *from, *through);
                }
                *from = *through;
            }
            if seq > high {
                high = seq;
                first_stored.get_or_insert(seq);
                self.accept(event);
            } else if let Some((from, through)) = &mut rewound
                && seq > *from
                && seq <= *through
            {
                if seq > *from + 1
                    && let Some(store) = &self.store
                {
                    // The peer has none of those in between (its own log lost them).
                    store.relay_lost(node, *from, seq - 1);
                }
                *from = seq;
                first_stored.get_or_insert(seq);
                // Kept (not taken): should this write fail too, the next refetch goes back
                // there as well, even once the ring has moved on.
                let first_pos = self
                    .shared
                    .rewound
                    .get(node)
                    .and_then(|rewound| rewound.positions.get(&seq).copied());
                self.store_again(event, first_pos);
            }
        }
        self.shared.relayed.insert(node.clone(), high);
        match rewound {
            Some((from, through)) if from < through => {
                if let Some(mut rewound) = self.shared.rewound.get_mut(node) {
                    rewound.from = from;
                }
            }
            Some(_) => {
                self.shared.rewound.remove(node);
                tracing::info!(%node, "the relayed events whose write failed came again");
            }
            None => {}
        }
        (high, first_stored)
    }

    /// The write of `node`'s events after `to` may have failed: what comes again up to the
    /// highest one taken is stored, not published, and links opened before now are refused.
    fn rewind(&mut self, node: NodeId, to: u64) {
        let high = self.shared.relayed.get(&node).map_or(0, |high| *high);
        if to >= high {
            return;
        }
        tracing::warn!(
            %node,
            from = to + 1,
            through = high,
            "relayed events were not stored; they are fetched from the peer again"
        );
        let positions = self
            .ring
            .iter()
            .filter(|item| item.event.id.node == node && item.event.id.seq > to)
            .map(|item| (item.event.id.seq, item.pos));
        let mut rewound = self.shared.rewound.entry(node.clone()).or_insert(Rewound {
            from: to,
            through: high,
            positions: Default::default(),
        });
        rewound.from = rewound.from.min(to);
        rewound.through = rewound.through.max(high);
        for (seq, pos) in positions {
            rewound.positions.entry(seq).or_insert(pos);
        }
        drop(rewound);
        // After the cursor moved: a link that reads this count and then the cursor (in that
        // order) either has the new cursor or is refused.
        *self.shared.rewinds.entry(node).or_insert(0) += 1;
        self.shared.rewound_signal.send_modify(|count| *count += 1);
    }

    /// Hands a relayed event to the store alone, back at the position it first had when that
    /// is known: it was published when it first came.
    fn store_again(&mut self, event: Event, first_pos: Option<u64>) {
        let Some(store) = &self.store else {
            return;
        };
        let arrival = self.shared.last_pos.fetch_add(1, Ordering::Relaxed) + 1;
        store.append_again(
            &BusItem {
                pos: first_pos.unwrap_or(arrival),
                event: Arc::new(event),
            },
            arrival,
        );
    }

    fn accept(&mut self, event: Event) {
        let pos = self.shared.last_pos.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.published_by_kind[event.kind().index()].fetch_add(1, Ordering::Relaxed);
        let item = BusItem {
            pos,
            event: Arc::new(event),
        };
        if let Some(store) = &self.store {
            store.append(&item);
        }
        let fanned = Fanned::of(&item);
        self.ring.push(item);
        // No receivers is fine: nobody is listening right now.
        let _ = self.shared.tx.send(fanned);
    }

    fn replay(&self, from: &ReplayFrom, filter: &EventFilter) -> Replay {
        Replay {
            newest: self.ring.back().map(|item| item.event.id.clone()),
            ..self.replay_matching(from, filter)
        }
    }

    fn replay_matching(&self, from: &ReplayFrom, filter: &EventFilter) -> Replay {
        let through_pos = self.shared.last_pos.load(Ordering::Relaxed);
        let oldest = self.ring.front().map(|item| item.event.id.clone());
        let oldest_pos = self.ring.front().map(|item| item.pos);
        let matching = |item: &&BusItem| filter.matches(&item.event);
        match from {
            ReplayFrom::Now => Replay {
                through_pos,
                found: true,
                oldest,
                oldest_pos,
                ..Replay::default()
            },
            ReplayFrom::Tail(n) => {
                let mut events: Vec<_> = self
                    .ring
                    .iter()
                    .rev()
                    .filter(matching)
                    .take(*n)
                    .map(|item| item.event.clone())
                    .collect();
                events.reverse();
                Replay {
                    events,
                    through_pos,
                    found: true,
                    missed: 0,
                    oldest,
                    oldest_pos,
                    newest: None,
                }
            }
            ReplayFrom::NodeAfter(cursor) => {
                let of_node = |item: &&BusItem| item.event.id.node == cursor.node;
                let covered = self
                    .ring
                    .iter()
                    .filter(of_node)
                    .any(|item| item.event.id.seq <= cursor.seq);
                let newest = if cursor.node == self.shared.node {
                    self.shared.last_seq.load(Ordering::Relaxed)
                } else {
                    self.shared
                        .relayed
                        .get(&cursor.node)
                        .map_or(0, |high| *high)
                };
                let events = self
                    .ring
                    .iter()
                    .filter(of_node)
                    .filter(|item| item.event.id.seq > cursor.seq)
                    .filter(matching)
                    .map(|item| item.event.clone())
                    .collect();
                Replay {
                    events,
                    through_pos,
                    found: covered || cursor.seq >= newest,
                    missed: 0,
                    oldest,
                    oldest_pos,
                    newest: None,
                }
            }
            ReplayFrom::After(cursor) => {
                let found_at = self.ring.iter().rposition(|item| item.event.id == *cursor);
                let start = found_at.map_or(0, |index| index + 1);
                let events = self
                    .ring
                    .iter()
                    .skip(start)
                    .filter(matching)
                    .map(|item| item.event.clone())
                    .collect();
                let missed = match (found_at, self.ring.front()) {
                    (None, Some(first))
                        if first.event.id.node == cursor.node
                            && first.event.id.seq > cursor.seq =>
                    {
                        first.event.id.seq - cursor.seq - 1
                    }
                    _ => 0,
                };
                Replay {
                    events,
                    through_pos,
                    found: found_at.is_some(),
                    missed,
                    oldest,
                    oldest_pos,
                    newest: None,
                }
            }
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event that passed the filter.
    Event(Arc<Event>),
    /// This subscriber lost events; re-read after `resume_after` from the event log.
    Lagged(EventsLagged),
}

/// An event as the fan-out channel carries it: small ones whole, larger ones
/// ([`FANOUT_WHOLE_BYTES`]) as a weak reference to the ring's, with what filters look at.
#[derive(Clone)]
struct Fanned {
    pos: u64,
    event: Held,
}

#[derive(Clone)]
enum Held {
    Whole(Arc<Event>),
    /// Alive while the ring (or a subscriber) holds the event; its kind, session and node are
    /// kept to filter on after it is gone.
    Weak {
        event: std::sync::Weak<Event>,
        kind: EventKind,
        session: Option<SessionId>,
        node: NodeId,
    },
}

impl Fanned {
    fn of(item: &BusItem) -> Self {
        Self {
            pos: item.pos,
            event: Held::of(&item.event),
        }
    }
}

impl Held {
    /// Small events whole, larger ones ([`FANOUT_WHOLE_BYTES`]) as a weak reference.
    fn of(event: &Arc<Event>) -> Self {
        if event.approx_bytes() > FANOUT_WHOLE_BYTES {
            Held::Weak {
                event: Arc::downgrade(event),
                kind: event.kind(),
                session: event.session.clone(),
                node: event.id.node.clone(),
            }
        } else {
            Held::Whole(event.clone())
        }
    }

    fn matches(&self, filter: &EventFilter) -> bool {
        match self {
            Held::Whole(event) => filter.matches(event),
            Held::Weak {
                kind,
                session,
                node,
                ..
            } => filter.matches_parts(*kind, session.as_ref(), node),
        }
    }

    /// The event, unless the ring let it go.
    fn upgrade(self) -> Option<Arc<Event>> {
        match self {
            Held::Whole(event) => Some(event),
            Held::Weak { event, .. } => event.upgrade(),
        }
    }
}

/// A replayed delivery waiting in a subscription's backlog. Its events are held as the fan-out
/// channel holds them (large ones weakly), so a subscriber slow to read a long replay does not
/// keep alive what the ring let go; one gone when its turn comes becomes an `events.lagged`
/// marker (one for a run of them) that says to resume after the last event delivered.
enum Backlogged {
    Event(Held),
    Lagged(EventsLagged),
}

impl From<Delivery> for Backlogged {
    fn from(delivery: Delivery) -> Self {
        match delivery {
            // Already taken (it waits behind a marker): held whole.
            Delivery::Event(event) => Backlogged::Event(Held::Whole(event)),
            Delivery::Lagged(lagged) => Backlogged::Lagged(lagged),
        }
    }
}

/// What a subscription took from the channel.
enum Received {
    Item(Fanned),
    Lagged(u64),
    Empty,
    Closed,
}

/// A live subscription, optionally preceded by a replay.
pub struct Subscription {
    rx: broadcast::Receiver<Fanned>,
    filter: EventFilter,
    backlog: VecDeque<Backlogged>,
    skip_through: u64,
    last_id: Option<EventId>,
    /// Events that passed the filter but were gone (the ring had let them go) when received,
    /// not reported yet: reported as one `events.lagged` before the next delivery.
    gone: u64,
    /// Events the channel dropped for this subscriber, held back until the next item shows
    /// which of them the replay had already delivered (see [`Subscription::lost_before`]).
    dropped: u64,
}

impl Subscription {
    /// The next delivery; `None` once the node's bus is gone.
    pub async fn recv(&mut self) -> Option<Delivery> {
        if let Some(delivery) = self.next_backlog() {
            return Some(self.note(delivery));
        }
        loop {
            let received = if self.gone > 0 {
                // A run of gone events is reported once, as soon as nothing else is ready.
                self.take_now()
            } else {
                match self.rx.recv().await {
                    Ok(item) => Received::Item(item),
                    Err(broadcast::error::RecvError::Lagged(missed)) => Received::Lagged(missed),
                    Err(broadcast::error::RecvError::Closed) => Received::Closed,
                }
            };
            if let Some(outcome) = self.take(received) {
                return outcome;
            }
        }
    }

    /// The next delivery if one is ready now (to batch writes).
    pub fn try_recv(&mut self) -> Option<Delivery> {
        if let Some(delivery) = self.next_backlog() {
            return Some(self.note(delivery));
        }
        loop {
            let received = self.take_now();
            if let Some(outcome) = self.take(received) {
                return outcome;
            }
        }
    }

    fn take_now(&mut self) -> Received {
        match self.rx.try_recv() {
            Ok(item) => Received::Item(item),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => Received::Lagged(missed),
            Err(broadcast::error::TryRecvError::Empty) => Received::Empty,
            Err(broadcast::error::TryRecvError::Closed) => Received::Closed,
        }
    }

    /// What to hand out for what was taken from the channel: `Some` to return it, `None` to take
    /// the next. Gone events not reported yet come first, as one marker.
    fn take(&mut self, received: Received) -> Option<Option<Delivery>> {
        let delivery = match received {
            Received::Item(item) => match self.admit_after_drop(item) {
                Admitted::Event(event) => Delivery::Event(event),
                Admitted::Gone => {
                    self.gone += 1;
                    return None;
                }
                Admitted::Skipped => return None,
            },
            Received::Lagged(missed) => {
                // The next item tells how many of them the replay had delivered.
                self.dropped += missed;
                return None;
            }
            Received::Empty | Received::Closed if self.gone + self.dropped > 0 => {
                self.gone += std::mem::take(&mut self.dropped);
                let gone = std::mem::take(&mut self.gone);
                return Some(Some(self.lagged(gone)));
            }
            Received::Empty | Received::Closed => return Some(None),
        };
        if self.gone > 0 {
            // The marker goes first; the event waits in the backlog.
            self.backlog.push_front(delivery.into());
            let gone = std::mem::take(&mut self.gone);
            return Some(Some(self.lagged(gone)));
        }
        Some(Some(self.note(delivery)))
    }

    /// Takes the replayed deliveries not received yet (for a one-shot replay without live
    /// events).
    pub fn take_backlog(&mut self) -> Vec<Delivery> {
        let mut backlog = Vec::with_capacity(self.backlog.len());
        while let Some(delivery) = self.take_next_backlog() {
            backlog.push(delivery);
        }
        backlog
    }

    /// The next replayed delivery not received yet, without waiting for live events; `None`
    /// once the replay is consumed.
    pub fn take_next_backlog(&mut self) -> Option<Delivery> {
        let delivery = self.next_backlog()?;
        Some(self.note(delivery))
    }

    /// Removes the `events.lagged` marker a subscription starts with when its resume point was
    /// older than the ring, and returns it: the caller fills that gap from the event log
    /// itself. `None` when the subscription did not start with a gap.
    pub fn take_gap_marker(&mut self) -> Option<EventsLagged> {
        match self.backlog.front() {
            Some(Backlogged::Lagged(_)) => match self.backlog.pop_front() {
                Some(Backlogged::Lagged(lagged)) => Some(lagged),
                _ => None,
            },
            _ => None,
        }
    }

    /// Replaces the filter (for links whose client changes its subscription). Replayed events
    /// not received yet are filtered again, so everything a subscription hands out passes its
    /// current filter.
    pub fn set_filter(&mut self, filter: EventFilter) {
        self.backlog.retain(|delivery| match delivery {
            Backlogged::Event(held) => held.matches(&filter),
            Backlogged::Lagged(_) => true,
        });
        self.filter = filter;
    }

    /// The current filter.
    pub fn filter(&self) -> &EventFilter {
        &self.filter
    }

    /// Counts `id` as the last event delivered, for events the caller delivered from elsewhere
    /// before this subscription's own (a replay's gap read from the event log): a lag marker
    /// then says to resume after it, not before what the caller already delivered.
    pub fn delivered(&mut self, id: EventId) {
        self.last_id = Some(id);
    }

    /// The id of the last event delivered.
    pub fn last_id(&self) -> Option<&EventId> {
        self.last_id.as_ref()
    }

    /// Turns the subscription into a stream of deliveries.
    pub fn into_stream(self) -> impl futures::Stream<Item = Delivery> + Send + Unpin {
        Box::pin(futures::stream::unfold(
            self,
            |mut subscription| async move {
                let delivery = subscription.recv().await?;
                Some((delivery, subscription))
            },
        ))
    }

    /// [`Subscription::admit`], after counting the events the channel dropped just before
    /// `item` that the replay had not delivered as gone (one marker with the gone ones).
    fn admit_after_drop(&mut self, item: Fanned) -> Admitted {
        let dropped = std::mem::take(&mut self.dropped);
        self.gone += self.lost_before(item.pos, dropped);
        self.admit(item)
    }

    /// Of the `dropped` items the channel dropped right before the one at `pos`, those the
    /// subscriber never received: the ones after the replay's `skip_through`. A subscription
    /// opened with a replay subscribes before asking for it, so the channel may overflow with
    /// events the replay delivers anyway; those are not lost. The dropped items hold distinct
    /// positions below `pos`, so at most `pos - 1 - skip_through` of them are past the replay
    /// (exactly that many when the positions are dense; an event stored again takes a position
    /// without riding the channel, so the count may be over, never under).
    fn lost_before(&self, pos: u64, dropped: u64) -> u64 {
        dropped.min(pos.saturating_sub(1).saturating_sub(self.skip_through))
    }

    /// The next replayed delivery, not noted yet; events the ring let go since the replay are
    /// reported as one marker before what follows them (or at the end of the backlog).
    fn next_backlog(&mut self) -> Option<Delivery> {
        while let Some(item) = self.backlog.pop_front() {
            let delivery = match item {
                Backlogged::Lagged(lagged) => Delivery::Lagged(lagged),
                Backlogged::Event(held) => match held.upgrade() {
                    Some(event) => Delivery::Event(event),
                    None => {
                        self.gone += 1;
                        continue;
                    }
                },
            };
            if self.gone > 0 {
                self.backlog.push_front(delivery.into());
                break;
            }
            return Some(delivery);
        }
        // Only the backlog leaves `gone` set between calls.
        (self.gone > 0).then(|| {
            let gone = std::mem::take(&mut self.gone);
            self.lagged(gone)
        })
    }

    fn admit(&self, item: Fanned) -> Admitted {
        if item.pos <= self.skip_through {
            return Admitted::Skipped;
        }
        match item.event {
            Held::Whole(event) if self.filter.matches(&event) => Admitted::Event(event),
            Held::Weak {
                event,
                kind,
                session,
                node,
            } if self.filter.matches_parts(kind, session.as_ref(), &node) => {
                event.upgrade().map_or(Admitted::Gone, Admitted::Event)
            }
            _ => Admitted::Skipped,
        }
    }

    fn note(&mut self, delivery: Delivery) -> Delivery {
        if let Delivery::Event(event) = &delivery {
            self.last_id = Some(event.id.clone());
        }
        delivery
    }

    fn lagged(&self, missed: u64) -> Delivery {
        Delivery::Lagged(EventsLagged {
            missed,
            resume_after: self.last_id.clone(),
        })
    }
}

/// What a subscription makes of an item of the channel.
enum Admitted {
    Event(Arc<Event>),
    /// It passed the filter, but the ring had let it go.
    Gone,
    /// Filtered out, or a duplicate of the replay.
    Skipped,
}

/// The bus as callers use it: publish, subscribe, replay. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    handle: ActorHandle<EventBusMsg>,
    shared: Arc<BusShared>,
}

impl EventBus {
    /// Wraps the bus actor's handle and shared parts.
    pub fn new(handle: ActorHandle<EventBusMsg>, shared: Arc<BusShared>) -> Self {
        Self { handle, shared }
    }

    /// The node this bus belongs to.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    /// The bus actor's handle.
    pub fn handle(&self) -> &ActorHandle<EventBusMsg> {
        &self.handle
    }

    /// Publishes an event of this node. Never blocks; if the bus is gone for good (the node is
    /// shutting down) or cannot buffer more while it restarts, the event is counted as dropped.
    pub fn publish(&self, session: Option<SessionId>, data: EventData) {
        let message = EventBusMsg::Publish {
            session,
            data,
            at: Timestamp::now(),
        };
        if let Err(error) = self.handle.cast(message) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            match error.kind {
                SendErrorKind::Stopped => tracing::debug!("event dropped: the bus has stopped"),
                SendErrorKind::RestartBacklogFull => {
                    tracing::warn!("event dropped: the bus is restarting and its backlog is full")
                }
            }
        }
    }

    /// Publishes a batch of events that node `node` published, keeping their ids. The batch is
    /// handed to the bus at once (so batches handed over one after another are taken in that
    /// order, without waiting for each other); the future resolves once the bus has taken it,
    /// and the store has written what it took, with the highest sequence number of `node`
    /// taken so far (what a relay link acknowledges). `floor`: `node`'s stream starts after it
    /// (nothing at or below it will come). Events of other nodes and duplicates are dropped.
    pub fn relay_batch(
        &self,
        node: &NodeId,
        floor: Option<u64>,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<u64, RelayBatchError>> + Send + 'static {
        self.relay_batch_of_link(node, None, floor, events)
    }

    /// [`EventBus::relay_batch`] for a link opened when `node`'s rewind count was `rewinds`
    /// ([`EventBus::relay_rewinds`]): refused ([`RelayBatchError::Rewound`]) once the stream was
    /// rewound since.
    pub fn relay_batch_of_link(
        &self,
        node: &NodeId,
        rewinds: Option<u64>,
        floor: Option<u64>,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<u64, RelayBatchError>> + Send + 'static {
        let (reply, answer) = ractor::concurrency::oneshot();
        let sent = self.handle.cast(EventBusMsg::RelayBatch {
            node: node.clone(),
            floor,
            events,
            rewinds,
            reply: reply.into(),
        });
        let path = self.handle.path().clone();
        async move {
            if let Err(error) = sent {
                return Err(match error.kind {
                    SendErrorKind::Stopped => CallError::Stopped { path },
                    SendErrorKind::RestartBacklogFull => CallError::Backlogged { path },
                }
                .into());
            }
            match crate::kernel::within(RELAY_TIMEOUT, answer).await {
                Ok(Ok(RelayTaken { high, written })) => {
                    let high = high.ok_or(RelayBatchError::Rewound)?;
                    if let Some(written) = written {
                        written.wait().await?;
                    }
                    Ok(high)
                }
                Ok(Err(_)) => Err(CallError::NoReply { path }.into()),
                Err(_) => Err(CallError::Timeout {
                    path,
                    after: RELAY_TIMEOUT,
                }
                .into()),
            }
        }
    }

    /// How many times `node`'s relayed stream was rewound; read before
    /// [`EventBus::relayed_through`] when a link opens.
    pub fn relay_rewinds(&self, node: &NodeId) -> u64 {
        self.shared.rewinds.get(node).map_or(0, |count| *count)
    }

    /// Resolves once `node`'s relayed stream has been rewound more than `since` times: a link
    /// opened at `since` ends then, even when its peer sends nothing, so that the next one asks
    /// from the rewound cursor.
    pub fn relay_rewound(
        &self,
        node: &NodeId,
        since: u64,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Subscribed before the count is read: no rewind falls between the two.
        let mut signal = self.shared.rewound_signal.subscribe();
        let (shared, node) = (self.shared.clone(), node.clone());
        async move {
            loop {
                if shared
                    .rewinds
                    .get(&node)
                    .is_some_and(|count| *count > since)
                {
                    return;
                }
                if signal.changed().await.is_err() {
                    // The bus's shared state is gone with every handle: no rewind will come.
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Where `node`'s relayed stream continues here: the highest sequence number of `node`
    /// relayed here (from this run or, after a restart, from the store), or, while a stretch
    /// whose write failed is being fetched again, just before it; `None` when none ever was.
    pub fn relayed_through(&self, node: &NodeId) -> Option<u64> {
        match self.shared.rewound.get(node) {
            Some(rewound) => Some(rewound.from),
            None => self.shared.relayed.get(node).map(|high| *high),
        }
    }

    /// Subscribes to live events only.
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        Subscription {
            rx: self.shared.tx.subscribe(),
            filter,
            backlog: VecDeque::new(),
            skip_through: 0,
            last_id: None,
            gone: 0,
            dropped: 0,
        }
    }

    /// Subscribes with a replay from the ring first: exactly the events after `from`, then live
    /// ones, without a gap or a duplicate. When `from` is an id no longer in the ring, the
    /// subscription starts with an `events.lagged` marker, then the ring.
    pub async fn subscribe_from(
        &self,
        from: ReplayFrom,
        filter: EventFilter,
    ) -> Result<(Subscription, Replay), CallError> {
        // Subscribe before asking, so nothing published in between is missed; the replay's
        // `through_pos` tells which live items are duplicates of it.
        let rx = self.shared.tx.subscribe();
        let replay = self.replay(from.clone(), filter.clone()).await?;
        let mut backlog = VecDeque::with_capacity(replay.events.len() + 1);
        if let ReplayFrom::After(cursor) = &from
            && !replay.found
        {
            backlog.push_back(Backlogged::Lagged(EventsLagged {
                missed: replay.missed,
                resume_after: Some(cursor.clone()),
            }));
        }
        // Large events weakly, as the channel holds them: a slow reader of a long replay must
        // not keep alive what the ring let go. The first is held whole, so a marker for those
        // after it always names a delivered event to resume after (a tail has no id before it).
        backlog.extend(replay.events.iter().enumerate().map(|(index, event)| {
            Backlogged::Event(if index == 0 {
                Held::Whole(event.clone())
            } else {
                Held::of(event)
            })
        }));
        // Where a lag marker says to resume before anything was delivered: the resume point, or
        // for a subscription that starts now (or with a tail) the newest event when it opened,
        // whatever the filter (a tail's events, when delivered, move it back to the last of
        // them, which is as good: nothing between matched).
        let last_id = match &from {
            ReplayFrom::After(cursor) => Some(cursor.clone()),
            ReplayFrom::Now | ReplayFrom::Tail(_) => replay.newest.clone(),
            ReplayFrom::NodeAfter(_) => None,
        };
        let subscription = Subscription {
            rx,
            filter,
            backlog,
            skip_through: replay.through_pos,
            last_id,
            gone: 0,
            dropped: 0,
        };
        Ok((subscription, replay))
    }

    /// Asks the ring for events.
    pub async fn replay(&self, from: ReplayFrom, filter: EventFilter) -> Result<Replay, CallError> {
        self.handle
            .call(
                |reply| EventBusMsg::Replay {
                    from,
                    filter,
                    reply,
                },
                REPLAY_TIMEOUT,
            )
            .await
    }

    /// Live subscribers right now.
    pub fn subscriber_count(&self) -> usize {
        self.shared.tx.receiver_count()
    }

    /// Events published (or relayed) here, per kind, in [`EventKind::ALL`] order.
    pub fn published_by_kind(&self) -> Vec<(EventKind, u64)> {
        EventKind::ALL
            .iter()
            .map(|kind| {
                (
                    *kind,
                    self.shared.published_by_kind[kind.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Events that could not be handed to the bus (it had stopped, or its backlog was full).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The highest sequence number this node has published.
    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::Relaxed)
    }
}

/// A relayed batch's write that someone waits for.
struct PendingWrite {
    written: BoxFuture<'static, Result<(), String>>,
    bus: ActorHandle<EventBusMsg>,
    node: NodeId,
    /// Where to rewind the node's stream to if the write fails.
    to: u64,
}

/// Rewinds the stream when a batch's write fails even if its waiter is gone (a link closed
/// while the write was pending): otherwise nobody would fetch the batch again.
struct RewindUnlessWritten(Option<Box<PendingWrite>>);

impl RewindUnlessWritten {
    /// Waits for the write; when it failed, rewinds the stream before answering, so that the
    /// next link asks for the batch again.
    async fn wait(mut self) -> Result<(), RelayBatchError> {
        let outcome = match self.0.as_mut() {
            Some(pending) => pending.written.as_mut().await,
            None => Ok(()),
        };
        // Resolved: nothing left for `drop` to do.
        let pending = self.0.take();
        if let (Err(reason), Some(pending)) = (outcome, pending) {
            rewind(&pending.bus, pending.node, pending.to).await?;
            return Err(RelayBatchError::NotWritten(reason));
        }
        Ok(())
    }
}

impl Drop for RewindUnlessWritten {
    fn drop(&mut self) {
        let Some(pending) = self.0.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let PendingWrite {
                    written,
                    bus,
                    node,
                    to,
                } = *pending;
                if written.await.is_err() {
                    let _ = rewind(&bus, node, to).await;
                }
            });
        }
    }
}

/// Puts a rewind of `node`'s relayed stream in place ([`EventBusMsg::RelayRewind`]).
async fn rewind(handle: &ActorHandle<EventBusMsg>, node: NodeId, to: u64) -> Result<(), CallError> {
    handle
        .call(
            |reply| EventBusMsg::RelayRewind { node, to, reply },
            RELAY_TIMEOUT,
        )
        .await
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod tests;
