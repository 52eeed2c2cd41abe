//! The event relay over QUIC streams.
//!
//! A node pulls each peer's own events: its PeerActor opens a link (one bidirectional stream)
//! and says `Hello {version, after}`; the peer answers `Welcome` (or `Refused` for a version it
//! does not speak) and then sends its own events after `after` — first what it still has (its
//! bus's ring, then its persisted event log), then live ones — in `Batch` frames, waiting for an
//! `Ack` of each before it sends the next. Frames are length-prefixed (u32, big endian) values
//! of the wire codec, each at most [`wire::MAX_FRAME_BYTES`]; a malformed, oversized or
//! unexpected frame ends that stream only, with a log line.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio_util::sync::{CancellationToken, DropGuard};
use troupe_actors::cluster::{LinkReports, NodeIdentity, RelaySource};
use troupe_actors::event::{
    Delivery, Event, EventBus, EventFilter, EventId, ReplayFrom, Subscription,
};
use troupe_actors::ids::NodeId;

use super::endpoint::ClusterEndpoint;
use super::remote::{RemoteAnswer, RemoteCall};
use crate::node::NodeCore;
use crate::store::Store;
use crate::wire::{self, WireError};

/// The relay protocol version this build speaks.
pub const RELAY_VERSION: u16 = 1;
/// Most events in one batch.
pub const MAX_BATCH: usize = 256;
/// How long the sender waits for an acknowledgement, and the receiver for the handshake.
const PATIENCE: Duration = Duration::from_secs(30);

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
    /// Sender → receiver: the handshake is accepted.
    Welcome {
        /// Protocol version.
        version: u16,
    },
    /// Sender → receiver: the handshake is refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// Sender → receiver: events of the sender, in sequence order.
    Batch(Vec<Event>),
    /// Receiver → sender: the receiver has everything up to this sequence number.
    Ack(u64),
    /// A request forwarded to the node that owns the session (the only frame of its stream).
    Call(RemoteCall),
    /// The answer to a [`Frame::Call`].
    Answer(RemoteAnswer),
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The stream failed or closed.
    #[error("stream: {0}")]
    Io(String),
    /// A frame could not be decoded or was too large.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer said something out of turn.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), RelayError> {
    let bytes = wire::encode(frame)?;
    let length = u32::try_from(bytes.len()).map_err(|_| WireError::TooLarge {
        size: bytes.len(),
        max: wire::MAX_FRAME_BYTES,
    })?;
    send.write_all(&length.to_be_bytes())
        .await
        .map_err(|error| RelayError::Io(error.to_string()))?;
    send.write_all(&bytes)
        .await
        .map_err(|error| RelayError::Io(error.to_string()))
}

/// Reads one frame (its size checked before anything is allocated).
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<Frame, RelayError> {
    let mut length = [0u8; 4];
    recv.read_exact(&mut length)
        .await
        .map_err(|error| RelayError::Io(error.to_string()))?;
    let length = u32::from_be_bytes(length) as usize;
    if length > wire::MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            size: length,
            max: wire::MAX_FRAME_BYTES,
        }
        .into());
    }
    let mut bytes = vec![0u8; length];
    recv.read_exact(&mut bytes)
        .await
        .map_err(|error| RelayError::Io(error.to_string()))?;
    Ok(wire::decode(&bytes)?)
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
}

impl RelayServer {
    fn own(&self) -> EventFilter {
        EventFilter {
            nodes: vec![self.node.clone()],
            ..EventFilter::default()
        }
    }

    /// Serves one link from `peer` until it ends.
    pub async fn serve(
        self,
        peer: NodeId,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        if let Err(error) = self.run(&peer, &mut send, &mut recv).await {
            tracing::debug!(%peer, %error, "relay stream ended");
        }
        let _ = send.finish();
    }

    async fn run(
        &self,
        peer: &NodeId,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), RelayError> {
        let hello = tokio::time::timeout(PATIENCE, read_frame(recv))
            .await
            .map_err(|_| RelayError::Protocol("no hello in time".into()))??;
        if let Frame::Call(call) = hello {
            let core = self
                .calls
                .get()
                .and_then(|(core, token)| core.upgrade().map(|core| (core, token.clone())));
            return super::remote::serve_call(core, peer, call, send).await;
        }
        let after = match hello {
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
                return Err(RelayError::Protocol(reason));
            }
            other => {
                return Err(RelayError::Protocol(format!(
                    "expected hello, got {other:?}"
                )));
            }
        };
        write_frame(
            send,
            &Frame::Welcome {
                version: RELAY_VERSION,
            },
        )
        .await?;
        // Live events are buffered from now on; what came before is read back below.
        let mut live = self.events.subscribe(self.own());
        let mut last = match after {
            Some(after) => self.backfill(after, send, recv).await?,
            None => 0,
        };
        loop {
            let batch = next_batch(&mut live, last).await;
            match batch {
                LiveBatch::Events(events) => {
                    last = self.send_batch(events, send, recv).await?.max(last);
                }
                LiveBatch::Lagged => {
                    last = self.backfill(last, send, recv).await?;
                }
                LiveBatch::Closed => return Ok(()),
            }
        }
    }

    /// Sends this node's events after `after` that are still known (the ring, else the log);
    /// returns the last sequence number sent (or `after`).
    async fn backfill(
        &self,
        mut after: u64,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<u64, RelayError> {
        loop {
            let from = if after == 0 {
                ReplayFrom::Tail(usize::MAX)
            } else {
                ReplayFrom::After(EventId::new(self.node.clone(), after))
            };
            let replay = self
                .events
                .replay(from, self.own())
                .await
                .map_err(|error| RelayError::Io(format!("the bus did not answer: {error}")))?;
            if replay.found || after == 0 {
                let events: Vec<Event> = replay
                    .events
                    .iter()
                    .filter(|event| event.id.seq > after)
                    .map(|event| Event::clone(event))
                    .collect();
                for chunk in events.chunks(MAX_BATCH) {
                    after = self
                        .send_batch(chunk.to_vec(), send, recv)
                        .await?
                        .max(after);
                }
                return Ok(after);
            }
            // Older than the ring: page through the persisted log.
            let page = self
                .store
                .events_after(
                    &EventId::new(self.node.clone(), after),
                    &self.own(),
                    MAX_BATCH,
                )
                .await
                .map_err(|error| {
                    RelayError::Io(format!("the event log did not answer: {error}"))
                })?;
            let events: Vec<Event> = page
                .events
                .into_iter()
                .map(|item| Event::clone(&item.event))
                .filter(|event| event.id.seq > after)
                .collect();
            if events.is_empty() {
                // Retention already deleted them (or the log has nothing newer): whatever the
                // ring has after `after` is all there is.
                let replay = self
                    .events
                    .replay(ReplayFrom::Tail(usize::MAX), self.own())
                    .await
                    .map_err(|error| RelayError::Io(format!("the bus did not answer: {error}")))?;
                let events: Vec<Event> = replay
                    .events
                    .iter()
                    .filter(|event| event.id.seq > after)
                    .map(|event| Event::clone(event))
                    .collect();
                for chunk in events.chunks(MAX_BATCH) {
                    after = self
                        .send_batch(chunk.to_vec(), send, recv)
                        .await?
                        .max(after);
                }
                return Ok(after);
            }
            after = self.send_batch(events, send, recv).await?.max(after);
        }
    }

    /// Sends a batch (split when too large for a frame) and waits for its acknowledgement;
    /// returns the highest sequence number sent.
    async fn send_batch(
        &self,
        events: Vec<Event>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<u64, RelayError> {
        let Some(last) = events.last().map(|event| event.id.seq) else {
            return Ok(0);
        };
        let frame = Frame::Batch(events);
        match wire::encode(&frame) {
            Err(WireError::TooLarge { .. }) => {
                let Frame::Batch(mut events) = frame else {
                    unreachable!("built above")
                };
                if events.len() == 1 {
                    tracing::warn!(event = %events[0].id, "event too large to relay; skipped");
                    return Ok(last);
                }
                let second = events.split_off(events.len() / 2);
                Box::pin(self.send_batch(events, send, recv)).await?;
                return Box::pin(self.send_batch(second, send, recv)).await;
            }
            Err(error) => return Err(error.into()),
            Ok(_) => {}
        }
        write_frame(send, &frame).await?;
        match tokio::time::timeout(PATIENCE, read_frame(recv)).await {
            Ok(Ok(Frame::Ack(_))) => Ok(last),
            Ok(Ok(other)) => Err(RelayError::Protocol(format!("expected ack, got {other:?}"))),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(RelayError::Protocol("no acknowledgement in time".into())),
        }
    }
}

enum LiveBatch {
    Events(Vec<Event>),
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
                    events.push(Event::clone(&event));
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
                outcome = link(endpoint, &peer, after, &reports) => {
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
    endpoint: ClusterEndpoint,
    peer: &NodeIdentity,
    after: Option<u64>,
    reports: &LinkReports,
) -> Result<(), RelayError> {
    let (_, connection) = endpoint
        .connect(peer.addr, Some(&peer.node))
        .await
        .map_err(|error| RelayError::Io(error.to_string()))?;
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|error| RelayError::Io(error.to_string()))?;
    write_frame(
        &mut send,
        &Frame::Hello {
            version: RELAY_VERSION,
            after,
        },
    )
    .await?;
    match tokio::time::timeout(PATIENCE, read_frame(&mut recv))
        .await
        .map_err(|_| RelayError::Protocol("no welcome in time".into()))??
    {
        Frame::Welcome { version } if version == RELAY_VERSION => {}
        Frame::Refused { reason } => return Err(RelayError::Protocol(reason)),
        other => {
            return Err(RelayError::Protocol(format!(
                "expected welcome, got {other:?}"
            )));
        }
    }
    tracing::debug!(%peer, ?after, "relay link up");
    loop {
        match read_frame(&mut recv).await {
            Ok(Frame::Batch(events)) => {
                let cursor = reports.batch(events).await.map_err(RelayError::Io)?;
                write_frame(&mut send, &Frame::Ack(cursor)).await?;
            }
            Ok(other) => {
                return Err(RelayError::Protocol(format!(
                    "expected a batch, got {other:?}"
                )));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Attaches relay serving to an endpoint's inbound streams.
pub fn serve_streams(
    server: RelayServer,
) -> Arc<dyn Fn(NodeId, quinn::SendStream, quinn::RecvStream) + Send + Sync> {
    Arc::new(move |peer, send, recv| {
        tokio::spawn(server.clone().serve(peer, send, recv));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_garbage_or_oversized_frames_are_errors() {
        let frame = Frame::Hello {
            version: RELAY_VERSION,
            after: Some(7),
        };
        let bytes = wire::encode(&frame).unwrap();
        let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
        framed.extend(&bytes);
        assert_eq!(read_frame(&mut framed.as_slice()).await.unwrap(), frame);

        let oversized = ((wire::MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut oversized.as_slice()).await,
            Err(RelayError::Wire(WireError::TooLarge { .. }))
        ));
        for seed in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let length = rng.usize(0..64);
            let mut noise: Vec<u8> = (length as u32).to_be_bytes().to_vec();
            noise.extend((0..rng.usize(0..80)).map(|_| rng.u8(..)));
            let _ = read_frame(&mut noise.as_slice()).await;
        }
        for cut in 0..framed.len() {
            assert!(read_frame(&mut &framed[..cut]).await.is_err());
        }
    }
}
