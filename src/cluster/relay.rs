//! The event relay over QUIC streams.
//!
//! A node pulls each peer's own events: its PeerActor opens a link (one bidirectional stream)
//! and says `Hello {version, after}`; the peer answers `Welcome {version, after}` (or `Refused`
//! for a version it does not speak), where `after` is where its stream starts (the receiver's
//! cursor, or its newest event when the receiver asked for new events only), and then sends its
//! own events after it: first what it still has (its bus's ring, then its persisted event log),
//! then live ones, in `Batch` frames of at most [`MAX_BATCH`] events. The receiver hands each
//! batch to its bus and acknowledges it (`Ack`) once the bus has taken it and the store has
//! written it; the sender keeps at most [`WINDOW`] batches unacknowledged, and the receiver holds
//! at most [`RECEIVE_BUDGET`] bytes of them (past it, it stops reading). So a slow receiver
//! (or its disk) slows its sender (whose live
//! subscription is bounded; on lag it re-reads from its ring and log), memory stays bounded on
//! both sides, and relay latency is not an acknowledgement round trip per batch.
//!
//! Frames are length-prefixed (u32, big endian) values of the wire codec, each at most
//! [`wire::MAX_FRAME_BYTES`], read without allocating more than what actually arrived. A
//! malformed, oversized, truncated or out-of-turn frame, or an unknown version, is a
//! [`WireFault`]: one WARN line naming the peer and the reason, one count in
//! `troupe_cluster_wire_errors_total{reason}`, and that stream is reset. Only the stream: the
//! connection also carries membership datagrams and other streams, whose framing a broken frame
//! here cannot affect, so they go on (a receiver's PeerActor opens a new link after a pause).
//!
//! What one peer's inbound streams hold is bounded over all its connections
//! ([`InboundLimits`]): at most [`PEER_STREAMS`] are served at once (a stream past it is reset
//! at once, logged and counted in `troupe_cluster_streams_refused_total`), and the first frame of
//! each (a `Hello` or a forwarded `Call`, up to [`wire::MAX_FRAME_BYTES`]) takes its size out of
//! the peer's [`PEER_FRAME_BYTES`] once its length prefix is read, before its body is: past the
//! budget the stream waits (within [`PATIENCE`]) and reads nothing more. A call keeps its share
//! while it is served. Acknowledgements are read with a cap of their own ([`MAX_ACK_BYTES`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use troupe_actors::cluster::{BatchError, LinkReports, NodeIdentity, RelaySource, WireFault};
use troupe_actors::event::{
    Delivery, Event, EventBus, EventFilter, EventId, ReplayFrom, Subscription,
};
use troupe_actors::ids::NodeId;

use super::endpoint::{ClusterEndpoint, ClusterStats, MAX_STREAMS, StreamHandler, log_wire_fault};
use super::remote::{RemoteAnswer, RemoteCall};
use crate::node::NodeCore;
use crate::store::Store;
use crate::wire::{self, WireError};

/// The relay protocol version this build speaks (2: `Welcome` says where the stream starts, and
/// several batches are in flight; 3: up to 256 of them, where a version-2 receiver refuses more
/// than 16).
pub const RELAY_VERSION: u16 = 3;
/// Most events in one batch.
pub const MAX_BATCH: usize = 256;
/// Batches a sender keeps unacknowledged per link. A batch is acknowledged once the receiver's
/// store wrote it, up to its append linger (10 ms) and a commit later, so the window must cover
/// that long: with 16, two nodes at 10,000 events/s had a relay p99 of 2.3–3.3 ms (the sender
/// held back), and a burst went at half the rate it does with 256 (docs/PERFORMANCE.md). At
/// most 256 × [`MAX_BATCH`] events wait for one receiver's disk.
pub const WINDOW: usize = 256;
/// Encoded bytes of relayed batches one link may hold between reading them and acknowledging
/// them (the bus and the store hold them meanwhile). At the budget the receiver stops reading
/// the stream until acknowledgements free some, and QUIC's flow control holds the sender back:
/// a peer cannot make this node hold [`WINDOW`] frames of [`wire::MAX_FRAME_BYTES`] (1 GiB) per
/// link. The sender's own batches stay far below it (256 events of a few hundred bytes each,
/// so [`WINDOW`] batches of them are about 13 MiB).
pub const RECEIVE_BUDGET: usize = 32 * 1024 * 1024;
const _: () = assert!(RECEIVE_BUDGET >= wire::MAX_FRAME_BYTES);
/// How long the sender waits for an acknowledgement when its window is full, and either side
/// for the handshake.
const PATIENCE: Duration = Duration::from_secs(30);
/// The stream reset code of a link ended for a wire fault.
const STREAM_PROTOCOL_VIOLATION: u32 = 2;
/// The stream reset (and stop) code of a stream refused because its peer has
/// [`InboundLimits::streams`] being served.
pub const STREAM_REFUSED: u32 = 3;
/// Streams of one peer served at once by default, over all its connections: as many as one
/// connection may open ([`MAX_STREAMS`]: a relay link, and a call in flight or an output
/// follow per stream), so a second connection (racing dials) does not double it.
pub const PEER_STREAMS: usize = MAX_STREAMS as usize;
/// Bytes of first frames one peer may have this node read at once by default: four frames of
/// the largest size. A forwarded call's body is at most `http.max_body_bytes` (1 MiB by
/// default), so a peer's sixteen largest calls at once go through; past it they wait.
pub const PEER_FRAME_BYTES: usize = 4 * wire::MAX_FRAME_BYTES;
/// Largest acknowledgement frame read (an `Ack` is a few bytes; anything larger on that stream
/// is a wire fault before its body is read).
pub const MAX_ACK_BYTES: usize = 64;

/// What one peer's inbound streams may hold at once, over all its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimits {
    /// Streams served at once; past it a new stream is refused (reset).
    pub streams: usize,
    /// Bytes of first frames read at once (each frame's size, once its length prefix is read;
    /// a call's until it is answered). At least [`wire::MAX_FRAME_BYTES`], so that any frame
    /// can be read.
    pub frame_bytes: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        Self {
            streams: PEER_STREAMS,
            frame_bytes: PEER_FRAME_BYTES,
        }
    }
}

/// The serving side's stream places and frame budgets, per peer (authenticated node ids only,
/// so the map grows with the cluster's certificates, not with what peers send).
pub struct InboundPeers {
    limits: InboundLimits,
    peers: DashMap<NodeId, Arc<PeerInbound>>,
}

struct PeerInbound {
    streams: Arc<Semaphore>,
    frames: Arc<Semaphore>,
    /// Streams refused since the last one served (one WARN line per such run).
    refused: AtomicU64,
}

/// A stream's place among its peer's streams served at once, and its peer's frame budget.
pub struct StreamSlot {
    _place: OwnedSemaphorePermit,
    frames: Arc<Semaphore>,
}

impl InboundPeers {
    /// Places and budgets of `limits` for every peer.
    pub fn new(limits: InboundLimits) -> Self {
        Self {
            limits: InboundLimits {
                streams: limits.streams,
                frame_bytes: limits.frame_bytes.max(wire::MAX_FRAME_BYTES),
            },
            peers: DashMap::new(),
        }
    }

    fn peer(&self, peer: &NodeId) -> Arc<PeerInbound> {
        // Cloned out of the map: no lock of it is held below.
        self.peers
            .entry(peer.clone())
            .or_insert_with(|| {
                Arc::new(PeerInbound {
                    streams: Arc::new(Semaphore::new(self.limits.streams)),
                    frames: Arc::new(Semaphore::new(self.limits.frame_bytes)),
                    refused: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// A place for a new stream of `peer`, or (when it has as many served as allowed) the
    /// number of its streams refused in a row, this one included.
    fn admit(&self, peer: &NodeId) -> Result<StreamSlot, u64> {
        let inbound = self.peer(peer);
        match inbound.streams.clone().try_acquire_owned() {
            Ok(place) => {
                let refused = inbound.refused.swap(0, Ordering::Relaxed);
                if refused > 0 {
                    tracing::info!(
                        %peer,
                        refused,
                        "cluster peer's streams are served again; some were refused meanwhile"
                    );
                }
                Ok(StreamSlot {
                    _place: place,
                    frames: inbound.frames.clone(),
                })
            }
            Err(_) => Err(inbound.refused.fetch_add(1, Ordering::Relaxed) + 1),
        }
    }

    /// Streams of `peer` being served.
    pub fn streams_served(&self, peer: &NodeId) -> usize {
        self.peers.get(peer).map_or(0, |inbound| {
            self.limits.streams - inbound.streams.available_permits()
        })
    }

    /// Bytes of `peer`'s frames being read (or, for calls, served) now.
    pub fn frame_bytes_held(&self, peer: &NodeId) -> usize {
        self.peers.get(peer).map_or(0, |inbound| {
            self.limits.frame_bytes - inbound.frames.available_permits()
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> InboundLimits {
        self.limits
    }
}

/// One frame of the relay protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Receiver → sender: the version spoken and where to start (`None`: new events only).
    Hello {
        /// Protocol version.
        version: u16,
        /// The highest sequence number of the sender's events the receiver has.
        after: Option<u64>,
    },
    /// Sender → receiver: the handshake is accepted; the stream holds the sender's events after
    /// `after`.
    Welcome {
        /// Protocol version.
        version: u16,
        /// The sequence number the stream starts after.
        after: u64,
    },
    /// Sender → receiver: the handshake is refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// Sender → receiver: events of the sender, in sequence order.
    Batch(Vec<Event>),
    /// Receiver → sender: one batch is taken; the receiver has everything up to this sequence
    /// number.
    Ack(u64),
    /// A request forwarded to the node that owns the session (the only frame of its stream).
    Call(RemoteCall),
    /// The answer to a [`Frame::Call`].
    Answer(RemoteAnswer),
}

impl Frame {
    /// The frame's name, for errors (a batch's contents do not belong in a log line).
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Refused { .. } => "refused",
            Frame::Batch(_) => "batch",
            Frame::Ack(_) => "ack",
            Frame::Call(_) => "call",
            Frame::Answer(_) => "answer",
        }
    }
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The stream or its connection failed, or a wait ran out.
    #[error("stream: {0}")]
    Io(String),
    /// The peer finished the stream between two frames.
    #[error("the peer ended the stream")]
    Ended,
    /// The peer refused the handshake.
    #[error("the peer refused the link: {0}")]
    Refused(String),
    /// The peer broke the wire protocol.
    #[error("{}: {detail}", fault.as_str())]
    Wire {
        /// How.
        fault: WireFault,
        /// What exactly.
        detail: String,
    },
    /// This side could not encode a frame.
    #[error("cannot encode a frame: {0}")]
    Encode(WireError),
}

impl RelayError {
    fn wire(fault: WireFault, detail: impl Into<String>) -> Self {
        RelayError::Wire {
            fault,
            detail: detail.into(),
        }
    }

    fn unexpected(expected: &str, got: &Frame) -> Self {
        Self::wire(
            WireFault::UnexpectedFrame,
            format!("expected {expected}, got {}", got.name()),
        )
    }

    /// The wire fault, when the peer broke the protocol.
    pub fn fault(&self) -> Option<WireFault> {
        match self {
            RelayError::Wire { fault, .. } => Some(*fault),
            _ => None,
        }
    }
}

fn io(error: impl std::fmt::Display) -> RelayError {
    RelayError::Io(error.to_string())
}

/// A frame as it goes on the stream: the length prefix, then the value.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, RelayError> {
    wire::encode_framed(frame).map_err(RelayError::Encode)
}

/// A [`Frame::Batch`] of events the bus shares (`Arc`s from its ring or a subscription), encoded
/// to exactly the bytes of `Frame::Batch(events)` without copying the events first.
pub fn encode_batch(events: &[Arc<Event>]) -> Result<Vec<u8>, RelayError> {
    wire::encode_framed(&BatchFrame(events)).map_err(RelayError::Encode)
}

/// Serializes as `Frame::Batch` does: the same variant (index 3, checked by a test against the
/// derived encoding), then the events as a sequence.
struct BatchFrame<'a>(&'a [Arc<Event>]);

impl Serialize for BatchFrame<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Events<'a>(&'a [Arc<Event>]);
        impl Serialize for Events<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.iter().map(|event| &**event))
            }
        }
        serializer.serialize_newtype_variant("Frame", 3, "Batch", &Events(self.0))
    }
}

/// Writes one frame (one write, so prefix and value leave together).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    send: &mut W,
    frame: &Frame,
) -> Result<(), RelayError> {
    let framed = encode_frame(frame)?;
    send.write_all(&framed).await.map_err(io)
}

/// Reads one frame. Its size is checked before anything is read into memory, and memory grows
/// only with the bytes that actually arrive. A stream that ends between frames is
/// [`RelayError::Ended`]; inside one, a [`WireFault::TruncatedFrame`].
pub async fn read_frame<R: AsyncRead + Unpin>(recv: &mut R) -> Result<Frame, RelayError> {
    Ok(read_sized_frame(recv).await?.0)
}

/// [`read_frame`], with the frame's encoded size (without its length prefix).
async fn read_sized_frame<R: AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<(Frame, usize), RelayError> {
    let (frame, size, _) = read_frame_limited(recv, wire::MAX_FRAME_BYTES, None).await?;
    Ok((frame, size))
}

/// [`read_sized_frame`] for frames of at most `max` bytes; with a `budget`, the frame takes its
/// size out of it once its length prefix is read, before its body is (waiting, and reading
/// nothing more, while the budget is spent), and the share comes back with the frame.
async fn read_frame_limited<R: AsyncRead + Unpin>(
    recv: &mut R,
    max: usize,
    budget: Option<&Arc<Semaphore>>,
) -> Result<(Frame, usize, Option<OwnedSemaphorePermit>), RelayError> {
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
        let read = recv.read(&mut prefix[filled..]).await.map_err(io)?;
        if read == 0 {
            return Err(if filled == 0 {
                RelayError::Ended
            } else {
                RelayError::wire(
                    WireFault::TruncatedFrame,
                    format!("the stream ended {filled} bytes into a length prefix"),
                )
            });
        }
        filled += read;
    }
    let length = u32::from_be_bytes(prefix) as usize;
    if length > max {
        return Err(RelayError::wire(
            WireFault::OversizedFrame,
            format!("a frame of {length} bytes; at most {max}"),
        ));
    }
    let share = match budget {
        // Within u32: the prefix is one.
        Some(budget) => Some(
            budget
                .clone()
                .acquire_many_owned(u32::try_from(length).expect("a u32 prefix"))
                .await
                .map_err(|_| io("the frame budget closed"))?,
        ),
        None => None,
    };
    let mut bytes = Vec::with_capacity(length.min(64 * 1024));
    (&mut *recv)
        .take(length as u64)
        .read_to_end(&mut bytes)
        .await
        .map_err(io)?;
    if bytes.len() < length {
        return Err(RelayError::wire(
            WireFault::TruncatedFrame,
            format!(
                "the stream ended {} bytes into a frame of {length}",
                bytes.len()
            ),
        ));
    }
    let frame = wire::decode(&bytes)
        .map_err(|error| RelayError::wire(WireFault::MalformedFrame, error.to_string()))?;
    Ok((frame, length, share))
}

/// Ends a stream after `outcome`: finished when it ended well, reset (and, for a wire fault,
/// logged as such and counted) otherwise.
fn close_stream(
    stats: &ClusterStats,
    peer: &NodeId,
    side: &str,
    send: &mut quinn::SendStream,
    outcome: &Result<(), RelayError>,
) {
    match outcome {
        Ok(()) | Err(RelayError::Ended) => {
            let _ = send.finish();
        }
        Err(error) => {
            match error {
                RelayError::Wire { fault, detail } => log_wire_fault(stats, peer, *fault, detail),
                RelayError::Refused(reason) => {
                    tracing::warn!(%peer, side, %reason, "relay link refused by the peer");
                }
                error => tracing::debug!(%peer, side, %error, "relay stream ended"),
            }
            // A handshake this side refused ends with its `Refused` frame: finish, so that the
            // frame arrives (a reset would discard it).
            if error.fault() == Some(WireFault::UnknownVersion) && side == "sender" {
                let _ = send.finish();
            } else {
                let _ = send.reset(STREAM_PROTOCOL_VIOLATION.into());
            }
        }
    }
}

/// The sending side: answers links opened by peers with this node's events.
#[derive(Clone)]
pub struct RelayServer {
    /// This node.
    pub node: NodeId,
    /// Its bus.
    pub events: EventBus,
    /// Its event log.
    pub store: Store,
    /// Where forwarded calls run: the node's core and its admin token (set once it exists).
    pub calls: Arc<std::sync::OnceLock<(std::sync::Weak<NodeCore>, String)>>,
    /// Where wire faults are counted.
    pub stats: Arc<ClusterStats>,
    /// What each peer's streams may hold at once.
    pub inbound: Arc<InboundPeers>,
}

impl RelayServer {
    fn own(&self) -> EventFilter {
        EventFilter {
            nodes: vec![self.node.clone()],
            ..EventFilter::default()
        }
    }

    /// Serves one stream from `peer` (holding its `slot`) until it ends.
    async fn serve(
        self,
        peer: NodeId,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        slot: StreamSlot,
    ) {
        let outcome = self.run(&peer, &mut send, recv, &slot).await;
        close_stream(&self.stats, &peer, "sender", &mut send, &outcome);
    }

    async fn run(
        &self,
        peer: &NodeId,
        send: &mut quinn::SendStream,
        mut recv: quinn::RecvStream,
        slot: &StreamSlot,
    ) -> Result<(), RelayError> {
        let first = read_frame_limited(&mut recv, wire::MAX_FRAME_BYTES, Some(&slot.frames));
        let (hello, _, share) = tokio::time::timeout(PATIENCE, first)
            .await
            .map_err(|_| io("no hello in time"))??;
        let after = match hello {
            Frame::Call(call) => {
                let core = self
                    .calls
                    .get()
                    .and_then(|(core, token)| core.upgrade().map(|core| (core, token.clone())));
                // The call's body is held until it is answered: so is its share.
                let served = super::remote::serve_call(core, peer, call, send).await;
                drop(share);
                return served;
            }
            Frame::Hello { version, after } if version == RELAY_VERSION => after,
            Frame::Hello { version, .. } => {
                let reason = format!(
                    "relay version {version} is not spoken here (this node speaks {RELAY_VERSION})"
                );
                write_frame(
                    send,
                    &Frame::Refused {
                        reason: reason.clone(),
                    },
                )
                .await?;
                return Err(RelayError::wire(WireFault::UnknownVersion, reason));
            }
            other => return Err(RelayError::unexpected("hello", &other)),
        };
        drop(share);
        // Live events are buffered from now on; what came before is read back below.
        let mut live = self.events.subscribe(self.own());
        let newest = self.events.last_seq();
        let start = after.unwrap_or(newest);
        if start > newest {
            tracing::warn!(
                %peer,
                asked_after = start,
                newest,
                "a peer asks for this node's events after a sequence number it never reached \
                 (was this node's data directory replaced?); nothing up to it reaches the peer"
            );
        }
        write_frame(
            send,
            &Frame::Welcome {
                version: RELAY_VERSION,
                after: start,
            },
        )
        .await?;
        let mut out = Outbox::new(send, recv);
        let mut last = start;
        if after.is_some() {
            last = self.backfill(last, &mut out).await?;
        }
        loop {
            let batch = tokio::select! {
                batch = next_batch(&mut live, last) => batch,
                failed = out.failed() => return Err(failed),
            };
            match batch {
                LiveBatch::Events(events) => last = out.send(&events).await?.max(last),
                LiveBatch::Lagged => last = self.backfill(last, &mut out).await?,
                LiveBatch::Closed => return Ok(()),
            }
        }
    }

    /// Sends this node's events after `after` that are still known (the ring, else the log);
    /// returns the last sequence number sent (or `after`).
    async fn backfill(&self, after: u64, out: &mut Outbox<'_>) -> Result<u64, RelayError> {
        let mut last = after;
        loop {
            let replay = self
                .events
                .replay(
                    ReplayFrom::NodeAfter(EventId::new(self.node.clone(), last)),
                    self.own(),
                )
                .await
                .map_err(|error| io(format!("the bus did not answer: {error}")))?;
            let in_ring: Vec<Arc<Event>> = replay
                .events
                .into_iter()
                .filter(|event| event.id.seq > last)
                .collect();
            if !replay.found {
                // The ring does not reach back to `last`: older events come from the log, up to
                // the ring's oldest. Appends queued for the log are committed first, so an event
                // that left the ring before its commit is read, not skipped.
                let ring_first = in_ring.first().map(|event| event.id.seq);
                self.store
                    .flush()
                    .await
                    .map_err(|error| io(format!("the event log did not commit: {error}")))?;
                let page: Vec<Arc<Event>> = self
                    .store
                    .node_events_after(&self.node, last, MAX_BATCH)
                    .await
                    .map_err(|error| io(format!("the event log did not answer: {error}")))?
                    .into_iter()
                    .map(|item| item.event)
                    .filter(|event| ring_first.is_none_or(|first| event.id.seq < first))
                    .collect();
                if !page.is_empty() {
                    last = out.send(&page).await?.max(last);
                    continue;
                }
                // Nothing older in the log (retention deleted it, or it never got there): what
                // the ring has is all there is.
            }
            for chunk in in_ring.chunks(MAX_BATCH) {
                last = out.send(chunk).await?.max(last);
            }
            return Ok(last);
        }
    }
}

/// The sending half of a link: batches go out as long as fewer than [`WINDOW`] are
/// unacknowledged; a task reads the acknowledgements.
struct Outbox<'a> {
    send: &'a mut quinn::SendStream,
    window: Arc<Semaphore>,
    ended: oneshot::Receiver<RelayError>,
    _reader: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<'a> Outbox<'a> {
    fn new(send: &'a mut quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let window = Arc::new(Semaphore::new(WINDOW));
        let (report, ended) = oneshot::channel();
        let reader = tokio::spawn(read_acks(recv, window.clone(), report));
        Self {
            send,
            window,
            ended,
            _reader: AbortOnDrop(reader),
        }
    }

    /// Resolves when the acknowledgements stop (the peer ended the stream or broke the
    /// protocol).
    async fn failed(&mut self) -> RelayError {
        (&mut self.ended)
            .await
            .unwrap_or_else(|_| io("the acknowledgement reader stopped"))
    }

    /// Sends a batch (split when too large for a frame) once the window has room; returns the
    /// highest sequence number sent.
    async fn send(&mut self, events: &[Arc<Event>]) -> Result<u64, RelayError> {
        let Some(last) = events.last().map(|event| event.id.seq) else {
            return Ok(0);
        };
        let framed = match encode_batch(events) {
            Ok(framed) => framed,
            Err(RelayError::Encode(WireError::TooLarge { .. })) => {
                if events.len() == 1 {
                    tracing::warn!(event = %events[0].id, "event too large to relay; skipped");
                    return Ok(last);
                }
                let (first, second) = events.split_at(events.len() / 2);
                Box::pin(self.send(first)).await?;
                return Box::pin(self.send(second)).await;
            }
            Err(error) => return Err(error),
        };
        let window = self.window.clone();
        let permit = tokio::select! {
            permit = tokio::time::timeout(PATIENCE, window.acquire()) => match permit {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(io("the window closed")),
                Err(_) => return Err(io("no acknowledgement in time")),
            },
            failed = self.failed() => return Err(failed),
        };
        // Given back by the acknowledgement of this batch.
        permit.forget();
        self.send.write_all(&framed).await.map_err(io)?;
        Ok(last)
    }
}

/// Reads acknowledgements, one per batch, each giving back a place in the window; reports why
/// they stopped.
async fn read_acks(
    mut recv: quinn::RecvStream,
    window: Arc<Semaphore>,
    report: oneshot::Sender<RelayError>,
) {
    let error = loop {
        match read_frame_limited(&mut recv, MAX_ACK_BYTES, None).await {
            Ok((Frame::Ack(_), _, _)) => {
                if window.available_permits() >= WINDOW {
                    break RelayError::wire(
                        WireFault::UnexpectedFrame,
                        "an acknowledgement of no batch",
                    );
                }
                window.add_permits(1);
            }
            Ok((other, _, _)) => break RelayError::unexpected("an acknowledgement", &other),
            Err(error) => break error,
        }
    };
    let _ = report.send(error);
}

enum LiveBatch {
    Events(Vec<Arc<Event>>),
    Lagged,
    Closed,
}

/// Waits for the next live events (newer than `last`), then takes what else is ready.
async fn next_batch(live: &mut Subscription, last: u64) -> LiveBatch {
    let mut events = Vec::new();
    let mut next = live.recv().await;
    loop {
        match next {
            None => {
                return if events.is_empty() {
                    LiveBatch::Closed
                } else {
                    LiveBatch::Events(events)
                };
            }
            Some(Delivery::Lagged(_)) => return LiveBatch::Lagged,
            Some(Delivery::Event(event)) => {
                if event.id.seq > last {
                    events.push(event);
                }
            }
        }
        if events.len() >= MAX_BATCH {
            return LiveBatch::Events(events);
        }
        next = live.try_recv();
        if next.is_none() {
            if events.is_empty() {
                next = live.recv().await;
                continue;
            }
            return LiveBatch::Events(events);
        }
    }
}

/// The receiving side: opens links for PeerActors.
#[derive(Clone)]
pub struct QuicRelaySource(pub ClusterEndpoint);

impl RelaySource for QuicRelaySource {
    fn open(&self, peer: &NodeIdentity, after: Option<u64>, reports: LinkReports) -> DropGuard {
        let cancel = CancellationToken::new();
        let endpoint = self.0.clone();
        let peer = peer.clone();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                outcome = link(&endpoint, &peer, after, &reports) => {
                    let reason = match outcome {
                        Ok(()) => "the peer ended the stream".to_owned(),
                        Err(error) => error.to_string(),
                    };
                    reports.down(reason);
                }
            }
        });
        cancel.drop_guard()
    }
}

async fn link(
    endpoint: &ClusterEndpoint,
    peer: &NodeIdentity,
    after: Option<u64>,
    reports: &LinkReports,
) -> Result<(), RelayError> {
    let (_, connection) = endpoint
        .connect(peer.addr, Some(&peer.node))
        .await
        .map_err(io)?;
    // Waits only while the peer's stream limit is reached; never for ever.
    let (mut send, mut recv) = tokio::time::timeout(PATIENCE, connection.open_bi())
        .await
        .map_err(|_| {
            io(format!(
                "no stream to {} within {PATIENCE:?}: it has as many open as it allows",
                peer.node
            ))
        })?
        .map_err(io)?;
    let outcome = receive(&mut send, &mut recv, peer, after, reports).await;
    close_stream(
        endpoint.stats(),
        &peer.node,
        "receiver",
        &mut send,
        &outcome,
    );
    outcome
}

/// The receiving half of a link: the handshake, then every batch handed to the bus and
/// acknowledged once the bus took it.
async fn receive(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    peer: &NodeIdentity,
    after: Option<u64>,
    reports: &LinkReports,
) -> Result<(), RelayError> {
    write_frame(
        send,
        &Frame::Hello {
            version: RELAY_VERSION,
            after,
        },
    )
    .await?;
    let start = match tokio::time::timeout(PATIENCE, read_frame(recv))
        .await
        .map_err(|_| io("no welcome in time"))??
    {
        Frame::Welcome { version, after } if version == RELAY_VERSION => after,
        Frame::Welcome { version, .. } => {
            return Err(RelayError::wire(
                WireFault::UnknownVersion,
                format!("welcome with relay version {version}; this node speaks {RELAY_VERSION}"),
            ));
        }
        Frame::Refused { reason } => return Err(RelayError::Refused(reason)),
        other => return Err(RelayError::unexpected("welcome", &other)),
    };
    if let Some(after) = after
        && start < after
    {
        tracing::warn!(
            %peer,
            cursor = after,
            start,
            "a peer starts its stream before the cursor; what it sends up to the cursor is \
             dropped as already seen"
        );
    }
    let batch_error = |error: BatchError| match error {
        BatchError::ForeignEvent(id) => RelayError::wire(
            WireFault::ForeignEvent,
            format!("event {id} is not the peer's own"),
        ),
        error @ (BatchError::Bus(_) | BatchError::NotWritten(_)) => io(error),
    };
    reports.welcome(start).await.map_err(batch_error)?;
    tracing::debug!(%peer, ?after, start, "relay link up");
    // Batches go to the bus as they arrive; their acknowledgements follow, in order, once the
    // bus has taken each and the store has written it (the sender never has more than WINDOW
    // unacknowledged, and this side holds at most RECEIVE_BUDGET bytes of them).
    let (taking, mut taken) = tokio::sync::mpsc::channel(WINDOW);
    let budget = Arc::new(Semaphore::new(RECEIVE_BUDGET));
    let read = take_batches(recv, &budget, &taking, |events| reports.batch(events));
    let acknowledge = async {
        while let Some((batch, held)) = taken.recv().await {
            let cursor = batch.await.map_err(batch_error)?;
            write_frame(send, &Frame::Ack(cursor)).await?;
            drop(held);
        }
        Ok(())
    };
    tokio::select! {
        outcome = read => outcome,
        outcome = acknowledge => outcome,
        () = reports.rewound() => Err(io(
            "a relayed write failed: the peer's stream was rewound; the next link asks again",
        )),
    }
}

/// The reading half of a link after the handshake: hands every batch over (`hand`, which starts
/// taking it) and queues what it returned on `taking`, with the batch's share of `budget`,
/// which the acknowledging half gives back once the batch is acknowledged. When the budget is
/// spent it waits before handing the next batch over, and reads nothing more meanwhile.
/// Anything but a batch, a batch of more than [`MAX_BATCH`] events, or one more than [`WINDOW`]
/// unacknowledged ends the link as a wire fault.
async fn take_batches<R, T>(
    recv: &mut R,
    budget: &Arc<Semaphore>,
    taking: &tokio::sync::mpsc::Sender<(T, tokio::sync::OwnedSemaphorePermit)>,
    mut hand: impl FnMut(Vec<Event>) -> T,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
{
    loop {
        let (events, size) = match read_sized_frame(recv).await? {
            (Frame::Batch(events), size) => (events, size),
            (other, _) => return Err(RelayError::unexpected("a batch", &other)),
        };
        if events.len() > MAX_BATCH {
            return Err(RelayError::wire(
                WireFault::OversizedFrame,
                format!("a batch of {} events; at most {MAX_BATCH}", events.len()),
            ));
        }
        if taking.capacity() == 0 {
            return Err(RelayError::wire(
                WireFault::UnexpectedFrame,
                format!("more than {WINDOW} batches unacknowledged"),
            ));
        }
        // A frame is at most MAX_FRAME_BYTES (checked by the read), within the budget and u32.
        let share = u32::try_from(size).expect("a frame's size fits u32");
        let held = budget
            .clone()
            .acquire_many_owned(share)
            .await
            .map_err(|_| io("the receive budget closed"))?;
        if taking.send((hand(events), held)).await.is_err() {
            return Err(io("the acknowledgements stopped"));
        }
    }
}

/// Attaches relay serving to an endpoint's inbound streams: each in a task of its own while its
/// peer has fewer than [`InboundLimits::streams`] served, else reset and stopped at once
/// ([`STREAM_REFUSED`]), counted, and logged once per run of refusals.
pub fn serve_streams(server: RelayServer) -> StreamHandler {
    Arc::new(
        move |peer, mut send, mut recv| match server.inbound.admit(&peer) {
            Ok(slot) => {
                tokio::spawn(server.clone().serve(peer, send, recv, slot));
            }
            Err(refused) => {
                server.stats.streams_refused.fetch_add(1, Ordering::Relaxed);
                if refused == 1 {
                    tracing::warn!(
                        %peer,
                        max = server.inbound.limits().streams,
                        "cluster peer has as many streams being served as a peer may; its new ones \
                         are refused (reset) until some end"
                    );
                }
                let _ = send.reset(STREAM_REFUSED.into());
                let _ = recv.stop(STREAM_REFUSED.into());
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use troupe_actors::event::{EventData, OutputStream, SessionOutput};
    use troupe_actors::ids::Timestamp;

    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            rendered: Default::default(),
            id: EventId::new(NodeId::new("a").unwrap(), seq),
            at: Timestamp::from_micros(1_700_000_000_000_000 + seq),
            session: None,
            data: EventData::SessionOutput(SessionOutput {
                stream: OutputStream::Stdout,
                first_line: seq,
                lines: vec![format!("line {seq} é🦀"), String::new()],
                skipped: 0,
            }),
        }
    }

    /// One frame of every kind the relay speaks.
    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: RELAY_VERSION,
                after: Some(7),
            },
            Frame::Hello {
                version: RELAY_VERSION,
                after: None,
            },
            Frame::Welcome {
                version: RELAY_VERSION,
                after: 42,
            },
            Frame::Refused {
                reason: "relay version 99 is not spoken here".into(),
            },
            Frame::Batch((1..=5).map(event).collect()),
            Frame::Ack(u64::MAX),
            Frame::Call(RemoteCall {
                method: "GET".into(),
                uri: "/v1/sessions/s-1".into(),
                body: Vec::new(),
            }),
            Frame::Answer(RemoteAnswer {
                status: 200,
                body: b"{}".to_vec(),
                more: true,
                retry_after: Some(3),
            }),
        ]
    }

    /// Reads every frame of `bytes` until the stream ends or breaks; returns them and the end.
    async fn read_all(mut bytes: &[u8]) -> (Vec<Frame>, RelayError) {
        let mut frames = Vec::new();
        loop {
            match read_frame(&mut bytes).await {
                Ok(frame) => frames.push(frame),
                Err(error) => return (frames, error),
            }
        }
    }

    #[tokio::test]
    async fn every_frame_round_trips_and_a_stream_of_them_ends_cleanly() {
        let mut stream = Vec::new();
        for frame in samples() {
            let framed = encode_frame(&frame).unwrap();
            assert_eq!(read_frame(&mut framed.as_slice()).await.unwrap(), frame);
            stream.extend(framed);
        }
        let (frames, end) = read_all(&stream).await;
        assert_eq!(frames, samples());
        assert!(matches!(end, RelayError::Ended), "{end}");
    }

    #[tokio::test]
    async fn a_batch_of_shared_events_encodes_to_the_bytes_of_its_frame() {
        for count in [0, 1, 5, MAX_BATCH] {
            let events: Vec<Event> = (1..=count as u64).map(event).collect();
            let shared: Vec<Arc<Event>> = events.iter().cloned().map(Arc::new).collect();
            let framed = encode_batch(&shared).unwrap();
            assert_eq!(framed, encode_frame(&Frame::Batch(events.clone())).unwrap());
            let decoded = read_frame(&mut framed.as_slice()).await.unwrap();
            assert_eq!(decoded, Frame::Batch(events), "{count} events");
        }
    }

    #[test]
    fn a_frame_too_large_is_refused_when_encoded() {
        let mut huge = event(1);
        huge.data = EventData::SessionOutput(SessionOutput {
            stream: OutputStream::Stdout,
            first_line: 1,
            lines: vec!["x".repeat(wire::MAX_FRAME_BYTES)],
            skipped: 0,
        });
        let error = encode_batch(&[Arc::new(huge)]).unwrap_err();
        assert!(
            matches!(error, RelayError::Encode(WireError::TooLarge { .. })),
            "{error}"
        );
    }

    #[tokio::test]
    async fn every_truncation_of_every_frame_is_a_truncated_frame_or_a_clean_end() {
        for frame in samples() {
            let framed = encode_frame(&frame).unwrap();
            for cut in 0..framed.len() {
                let error = read_frame(&mut &framed[..cut]).await.unwrap_err();
                if cut == 0 {
                    assert!(matches!(error, RelayError::Ended), "{error}");
                } else {
                    assert_eq!(
                        error.fault(),
                        Some(WireFault::TruncatedFrame),
                        "{} cut at {cut}: {error}",
                        frame.name()
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_the_body_is_read() {
        // The writer stays open and sends nothing more: reading the body would wait forever.
        let (mut writer, mut reader) = tokio::io::duplex(64);
        writer
            .write_all(&((wire::MAX_FRAME_BYTES + 1) as u32).to_be_bytes())
            .await
            .unwrap();
        let error = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut reader))
            .await
            .expect("refused at once")
            .unwrap_err();
        assert_eq!(error.fault(), Some(WireFault::OversizedFrame), "{error}");
        let error = read_frame(&mut u32::MAX.to_be_bytes().as_slice())
            .await
            .unwrap_err();
        assert_eq!(error.fault(), Some(WireFault::OversizedFrame));
    }

    #[tokio::test]
    async fn random_streams_are_frames_or_wire_faults_never_panics() {
        let mut faults = std::collections::HashMap::new();
        for seed in 0..20_000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let bytes: Vec<u8> = match seed % 4 {
                // Pure noise.
                0 => (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect(),
                // A plausible length prefix and a body of exactly that length: noise that gets
                // through to the decoder.
                1 => {
                    let length = rng.usize(0..600);
                    let mut framed = (length as u32).to_be_bytes().to_vec();
                    framed.extend((0..length).map(|_| rng.u8(..)));
                    framed
                }
                // A valid frame with bytes flipped.
                2 => {
                    let frames = samples();
                    let mut framed = encode_frame(&frames[rng.usize(..frames.len())]).unwrap();
                    for _ in 0..rng.usize(1..4) {
                        let at = rng.usize(..framed.len());
                        framed[at] ^= rng.u8(1..);
                    }
                    framed
                }
                // Valid frames, then noise.
                _ => {
                    let mut framed = Vec::new();
                    for frame in samples().into_iter().take(rng.usize(1..8)) {
                        framed.extend(encode_frame(&frame).unwrap());
                    }
                    framed.extend((0..rng.usize(1..64)).map(|_| rng.u8(..)));
                    framed
                }
            };
            let (frames, end) = read_all(&bytes).await;
            // Whatever was decoded is a frame that encodes again.
            for frame in &frames {
                encode_frame(frame).unwrap();
            }
            let label = match &end {
                RelayError::Ended => "ended",
                RelayError::Wire { fault, .. } => fault.as_str(),
                other => panic!("seed {seed}: a byte slice cannot fail with {other}"),
            };
            *faults.entry(label).or_insert(0u32) += 1;
        }
        // The cases reach every outcome a reader can have.
        for outcome in [
            "ended",
            "truncated_frame",
            "malformed_frame",
            "oversized_frame",
        ] {
            assert!(faults.get(outcome).copied().unwrap_or(0) > 0, "{faults:?}");
        }
    }

    /// A batch of `count` events whose frame is about `bytes` long.
    fn heavy_batch(first: u64, count: u64, bytes: usize) -> Vec<u8> {
        let line = "x".repeat(bytes / count as usize);
        let events = (first..first + count)
            .map(|seq| {
                let mut event = event(seq);
                if let EventData::SessionOutput(output) = &mut event.data {
                    output.lines = vec![line.clone()];
                }
                event
            })
            .collect();
        encode_frame(&Frame::Batch(events)).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_holds_at_most_its_budget_of_unacknowledged_batches() {
        let frame = heavy_batch(1, 1, 10_000);
        // Room for two of these frames and not three.
        let budget = Arc::new(Semaphore::new(frame.len() * 5 / 2));
        let (mut writer, mut reader) = tokio::io::duplex(4096);
        let sender = tokio::spawn(async move {
            for seq in 1..=10 {
                writer
                    .write_all(&heavy_batch(seq, 1, 10_000))
                    .await
                    .unwrap();
            }
            writer
        });
        let (taking, mut taken) = tokio::sync::mpsc::channel(WINDOW);
        let handed = std::sync::atomic::AtomicU64::new(0);
        let read = take_batches(&mut reader, &budget, &taking, |events| {
            handed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            events[0].id.seq
        });
        let mut read = std::pin::pin!(read);
        // Nothing is acknowledged: the reader hands two batches over, then waits (and reads no
        // further: the sender is stuck once the pipe's buffer is full).
        let waiting = tokio::time::timeout(Duration::from_secs(60), read.as_mut()).await;
        assert!(waiting.is_err(), "the reader ended: {waiting:?}");
        assert_eq!(handed.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert!(!sender.is_finished(), "the sender wrote everything");
        // Acknowledging the first gives its share back: the third is handed over.
        let (seq, held) = taken.recv().await.unwrap();
        assert_eq!(seq, 1);
        drop(held);
        let waiting = tokio::time::timeout(Duration::from_secs(60), read.as_mut()).await;
        assert!(waiting.is_err(), "the reader ended: {waiting:?}");
        assert_eq!(handed.load(std::sync::atomic::Ordering::Relaxed), 3);
        // With every batch acknowledged as it comes, all ten get through.
        let acknowledge = async {
            for expected in 2..=10 {
                let (seq, held) = taken.recv().await.unwrap();
                assert_eq!(seq, expected);
                drop(held);
            }
        };
        tokio::select! {
            outcome = read => panic!("the reader ended: {outcome:?}"),
            () = acknowledge => {}
        }
        assert_eq!(handed.load(std::sync::atomic::Ordering::Relaxed), 10);
        drop(sender.await.unwrap());
    }

    /// A peer opening more streams than it may have served, each with the length prefix of a
    /// frame of the largest size and one byte of it, used to have every stream served and
    /// read (4,096 streams per connection of 4 MiB each, 16 GiB, for up to PATIENCE). Now the
    /// streams past its cap are reset at once and counted, only as many frames as its budget
    /// holds are read, and another peer is served as before.
    #[tokio::test]
    async fn a_peer_past_its_stream_cap_is_refused_and_its_frames_wait_for_its_budget() {
        use crate::cluster::certs;
        use crate::cluster::endpoint::ClusterEndpoint;
        use crate::store::{Store, StoreConfig};
        use troupe_actors::node::{NodePorts, NodeTree, NodeTreeConfig};

        crate::tls::install_default_provider();
        let id = |name: &str| NodeId::new(name).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = dir.path().join("ca");
        let mut credentials = vec![certs::load(&certs::init(&ca, &id("a"), now).unwrap()).unwrap()];
        for name in ["b", "c"] {
            let files = certs::issue(&ca, &id(name), &dir.path().join(name), now).unwrap();
            credentials.push(certs::load(&files).unwrap());
        }
        let bind = |credentials| {
            ClusterEndpoint::bind(credentials, "127.0.0.1:0".parse().unwrap(), Arc::default())
                .unwrap()
        };
        let (a, b, c) = (
            bind(&credentials[0]),
            bind(&credentials[1]),
            bind(&credentials[2]),
        );
        let tree = NodeTree::start(NodeTreeConfig::new(id("a")), NodePorts::default())
            .await
            .unwrap();
        let store = Store::open(dir.path().join("a"), id("a"), StoreConfig::default())
            .await
            .unwrap();
        let limits = InboundLimits {
            streams: 8,
            frame_bytes: 2 * wire::MAX_FRAME_BYTES,
        };
        let inbound = Arc::new(InboundPeers::new(limits));
        a.set_stream_handler(serve_streams(RelayServer {
            node: id("a"),
            events: tree.events.clone(),
            store,
            // No node core: a call is answered 503 (shutting_down), which is enough here.
            calls: Arc::default(),
            stats: a.stats().clone(),
            inbound: inbound.clone(),
        }));
        let a_addr = a.local_addr().unwrap();

        // b: twelve streams, each the prefix of a frame of the largest size and one byte.
        let (_, to_a) = b.connect(a_addr, Some(&id("a"))).await.unwrap();
        let mut streams = Vec::new();
        for _ in 0..12 {
            let (mut send, recv) = to_a.open_bi().await.unwrap();
            let mut start = (wire::MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
            start.push(0);
            send.write_all(&start).await.unwrap();
            streams.push((send, recv));
        }
        // a serves eight (its cap) and refuses the other four; two frames take the whole budget
        // and the other six wait for it. Polled, bounded: the counters have no notification.
        let settled = tokio::time::timeout(Duration::from_secs(30), async {
            while a.stats().streams_refused.load(Ordering::Relaxed) < 4
                || inbound.frame_bytes_held(&id("b")) < limits.frame_bytes
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            settled.is_ok(),
            "refused {}, holding {} bytes",
            a.stats().streams_refused.load(Ordering::Relaxed),
            inbound.frame_bytes_held(&id("b"))
        );
        assert_eq!(inbound.streams_served(&id("b")), 8);
        assert_eq!(inbound.frame_bytes_held(&id("b")), limits.frame_bytes);
        assert_eq!(a.stats().streams_refused.load(Ordering::Relaxed), 4);
        // The refused ones are the last four (streams arrive in order), reset with their code.
        for (index, (_, recv)) in streams.iter_mut().enumerate().skip(8) {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(30), recv.read(&mut byte))
                .await
                .unwrap_or_else(|_| panic!("stream {index} was not refused"));
            match read {
                Err(quinn::ReadError::Reset(code)) => assert_eq!(code, STREAM_REFUSED.into()),
                other => panic!("stream {index}: {other:?}"),
            }
        }

        // c is served as before: its call is answered.
        let (_, c_to_a) = c.connect(a_addr, Some(&id("a"))).await.unwrap();
        let (mut send, mut recv) = c_to_a.open_bi().await.unwrap();
        let call = Frame::Call(RemoteCall {
            method: "GET".into(),
            uri: "/v1/sessions".into(),
            body: Vec::new(),
        });
        write_frame(&mut send, &call).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv))
            .await
            .expect("c's call is answered")
            .unwrap();
        assert!(
            matches!(answer, Frame::Answer(RemoteAnswer { status: 503, .. })),
            "{answer:?}"
        );

        // b's streams end: their places and shares come back.
        to_a.close(0u32.into(), b"done");
        let released = tokio::time::timeout(Duration::from_secs(30), async {
            while inbound.streams_served(&id("b")) > 0 || inbound.frame_bytes_held(&id("b")) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(released.is_ok(), "b's places and budget were given back");
        a.close(Duration::from_secs(1)).await;
        b.close(Duration::from_secs(1)).await;
        c.close(Duration::from_secs(1)).await;
        tree.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_batch_over_the_event_cap_ends_the_link_as_a_wire_fault() {
        let budget = Arc::new(Semaphore::new(RECEIVE_BUDGET));
        let (taking, _taken) = tokio::sync::mpsc::channel(WINDOW);
        let mut stream = heavy_batch(1, MAX_BATCH as u64, 1000);
        stream.extend(heavy_batch(
            1 + MAX_BATCH as u64,
            MAX_BATCH as u64 + 1,
            1000,
        ));
        let mut handed = 0;
        let error = take_batches(&mut stream.as_slice(), &budget, &taking, |events| {
            handed += 1;
            events.len()
        })
        .await
        .unwrap_err();
        assert_eq!(error.fault(), Some(WireFault::OversizedFrame), "{error}");
        assert!(error.to_string().contains("257 events"), "{error}");
        assert_eq!(
            handed, 1,
            "the batch at the cap is taken, the one over it is not"
        );
    }
}
