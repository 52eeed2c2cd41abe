//! The node's QUIC endpoint: one UDP socket serving and dialing, TLS 1.3 with the ring
//! provider, mutual authentication against the cluster CA.
//!
//! Every connection, in either direction, is checked twice: rustls verifies the peer's chain
//! against the CA (a certificate from another CA, an expired one, or none is refused), then the
//! node id is read from the certificate's common name and compared with the id expected (when
//! dialing a known node) and with this node's own id. A refusal is one WARN log line with the
//! reason and one increment of `troupe_cluster_refused_total{reason}`.
//!
//! Membership datagrams are sent through per-peer tasks so the sender never waits: a datagram
//! that cannot go now (queue full, dial failed, connection lost) is dropped, like UDP.
//!
//! A peer that breaks the wire protocol ([`WireFault`]) is one WARN log line naming it and the
//! reason and one increment of `troupe_cluster_wire_errors_total{reason}`; a datagram fault also
//! closes that peer's connection (see [`WireFault::closes_connection`]), a stream fault only its
//! stream (closed by the relay). Nothing else is affected: other peers, other connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use troupe_actors::cluster::{MAX_PACKET_BYTES, WireFault};
use troupe_actors::ids::NodeId;

use super::certs::{self, NodeCredentials, SERVER_NAME};

/// The ALPN protocol of troupe's cluster connections (a version of the whole protocol).
pub const ALPN: &[u8] = b"troupe-cluster/1";
/// How long a dial (QUIC and TLS handshakes) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection with no traffic for this long is closed (keep-alives run at a third of it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams waiting per peer before new ones are dropped.
const PEER_QUEUE: usize = 256;
/// Bytes of datagrams a connection holds until it can transmit them (quinn's default).
const DATAGRAM_SEND_BUFFER: usize = 1024 * 1024;
/// Streams a peer may have open at once on one connection: its relay link, and one per call
/// forwarded to this node that is still in flight, each output follow for as long as it runs.
/// (quinn's default, 100, made a node that followed 100 runs of another wait for a stream,
/// then report a healthy owner unreachable.)
pub const MAX_STREAMS: u32 = 4096;
/// The application close code of a connection closed for a protocol violation.
pub const PROTOCOL_VIOLATION: u32 = 2;
/// Connections one node id may have open to this node at once (either side dialed). Two: dials
/// racing between the same pair leave one in each direction. A newer one closes the oldest
/// (never the reverse: a peer that restarted must not be held off by its previous connection,
/// still open here until its idle timeout), so a peer opening connection after connection,
/// each with [`MAX_STREAMS`] streams and their buffers, gets no more than two.
pub const MAX_PEER_CONNECTIONS: usize = 2;
/// The application close code of a connection closed because the same node opened a newer one
/// past [`MAX_PEER_CONNECTIONS`].
pub const SUPERSEDED: u32 = 3;
/// Bytes a peer may send on one connection, over all its streams, that this node has not read
/// yet. quinn's default bounds only each stream (1.25 MB), so [`MAX_STREAMS`] streams this
/// node does not read (those waiting for their peer's frame budget in the relay) could buffer
/// 5 GB. The price of a bound: streams left unread (a follow whose client stalls, until the
/// HTTP send deadline ends it) hold the whole connection back once they fill it, so it is 51
/// streams' windows.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// It presented no certificate.
    NoCertificate,
    /// Its certificate is not signed by the cluster CA.
    UnknownCa,
    /// Its certificate has expired (or is not valid yet).
    Expired,
    /// Its certificate names another node than the one expected (or this node).
    WrongNode,
    /// Another handshake failure (protocol, ALPN, timeout, closed by the peer).
    Handshake,
}

impl Refusal {
    /// Every reason, for metrics.
    pub const ALL: [Refusal; 5] = [
        Refusal::NoCertificate,
        Refusal::UnknownCa,
        Refusal::Expired,
        Refusal::WrongNode,
        Refusal::Handshake,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::WrongNode => "wrong_node",
            Refusal::Handshake => "handshake",
        }
    }

    /// Classifies a handshake error by what rustls and quinn say.
    fn classify(error: &str) -> Self {
        let lower = error.to_ascii_lowercase();
        if lower.contains("no certificates") || lower.contains("certificate required") {
            Refusal::NoCertificate
        } else if lower.contains("unknownissuer")
            || lower.contains("unknown issuer")
            || lower.contains("unknown ca")
            || lower.contains("badsignature")
        {
            Refusal::UnknownCa
        } else if lower.contains("expired")
            || lower.contains("notvalidyet")
            || lower.contains("not valid yet")
        {
            Refusal::Expired
        } else {
            Refusal::Handshake
        }
    }
}

/// Counters of the endpoint (read by `/metrics`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    refused: [AtomicU64; 5],
    wire_errors: [AtomicU64; WireFault::ALL.len()],
    /// Connections established (both directions).
    pub connections: AtomicU64,
    /// Datagrams dropped (queue full, no connection, too large).
    pub datagrams_dropped: AtomicU64,
    /// Datagrams received.
    pub datagrams_received: AtomicU64,
    /// Datagrams sent.
    pub datagrams_sent: AtomicU64,
    /// Streams refused because their peer had as many being served as allowed (the relay's
    /// `InboundLimits::streams`).
    pub streams_refused: AtomicU64,
    /// New members the membership did not take, past its cap
    /// ([`troupe_actors::cluster::MAX_MEMBERS`]).
    pub members_refused: AtomicU64,
}

impl ClusterStats {
    fn refuse(&self, reason: Refusal) {
        let index = Refusal::ALL.iter().position(|r| *r == reason).unwrap_or(4);
        self.refused[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Peers refused for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        let index = Refusal::ALL.iter().position(|r| *r == reason).unwrap_or(4);
        self.refused[index].load(Ordering::Relaxed)
    }

    /// Counts one wire error.
    pub fn wire_error(&self, fault: WireFault) {
        if let Some(index) = WireFault::ALL.iter().position(|f| *f == fault) {
            self.wire_errors[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wire errors of kind `fault` so far.
    pub fn wire_errors(&self, fault: WireFault) -> u64 {
        WireFault::ALL
            .iter()
            .position(|f| *f == fault)
            .map_or(0, |index| self.wire_errors[index].load(Ordering::Relaxed))
    }
}

/// Counts and logs (WARN, naming the peer and the reason) one wire fault; closing what must be
/// closed is the caller's part.
pub fn log_wire_fault(stats: &ClusterStats, peer: &NodeId, fault: WireFault, detail: &str) {
    stats.wire_error(fault);
    tracing::warn!(
        %peer,
        reason = fault.as_str(),
        detail,
        closes = match fault {
            WireFault::UnknownMetaFormat => "nothing (the metadata is skipped)",
            WireFault::FutureGeneration => "nothing (the datagram is dropped)",
            fault if fault.closes_connection() => "connection",
            _ => "stream",
        },
        "cluster peer broke the wire protocol"
    );
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TLS configuration could not be built from the credentials.
    #[error("cluster TLS: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error(
        "cannot listen on {addr} (UDP): {source}; choose another address with \
         --cluster-listen or cluster.listen"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a dial failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// Nothing answered in time, or the connection failed before TLS was done.
    #[error("{addr} is unreachable: {reason}")]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The handshake or the identity check failed.
    #[error("{addr} was refused ({}): {reason}", refusal.as_str())]
    Refused {
        /// Where.
        addr: SocketAddr,
        /// The class of refusal.
        refusal: Refusal,
        /// Why.
        reason: String,
    },
    /// The address (dialed without a node id) is this node's own, in another form (a seed list
    /// shared by every node lists it).
    #[error("{addr} is this node")]
    Myself {
        /// Where.
        addr: SocketAddr,
    },
    /// The endpoint is shutting down.
    #[error("the cluster endpoint is closed")]
    Closed,
}

/// Receives what peers send on their connections.
pub trait Inbound: Send + Sync + 'static {
    /// A datagram from `from` (authenticated by its certificate).
    fn datagram(&self, from: &NodeId, bytes: Bytes);
}

/// Handles a bidirectional stream a peer opened (the event relay).
pub type StreamHandler = Arc<dyn Fn(NodeId, quinn::SendStream, quinn::RecvStream) + Send + Sync>;

struct Inner {
    node: NodeId,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    connections: DashMap<NodeId, quinn::Connection>,
    /// Every connection admitted per peer and not known closed, oldest first (at most
    /// [`MAX_PEER_CONNECTIONS`]); `connections` holds the newest.
    open: DashMap<NodeId, Vec<quinn::Connection>>,
    senders: DashMap<NodeId, mpsc::Sender<(SocketAddr, Bytes)>>,
    /// Datagrams queued for the per-peer senders and not yet handed to a connection or dropped
    /// (the queue alone does not say it: a sender takes a datagram out before it dials).
    datagrams_pending: AtomicU64,
    inbound: OnceLock<Arc<dyn Inbound>>,
    streams: OnceLock<StreamHandler>,
    stats: Arc<ClusterStats>,
    closed: CancellationToken,
}

/// The node's QUIC endpoint. Cheap to clone.
#[derive(Clone)]
pub struct ClusterEndpoint {
    inner: Arc<Inner>,
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("10 s is a valid idle timeout"),
    ));
    transport.keep_alive_interval(Some(IDLE_TIMEOUT / 3));
    transport.datagram_receive_buffer_size(Some(256 * 1024));
    transport.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    transport.max_concurrent_bidi_streams(MAX_STREAMS.into());
    transport.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    Arc::new(transport)
}

fn tls_configs(
    credentials: &NodeCredentials,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), EndpointError> {
    let tls = |error: &dyn std::fmt::Display| EndpointError::Tls(error.to_string());
    let provider = crate::tls::provider();
    let mut roots = RootCertStore::empty();
    roots.add(credentials.ca.clone()).map_err(|e| tls(&e))?;
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| tls(&e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(credentials.chain.clone(), credentials.key.clone_key())
        .map_err(|e| tls(&e))?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(credentials.chain.clone(), credentials.key.clone_key())
        .map_err(|e| tls(&e))?;
    client.alpn_protocols = vec![ALPN.to_vec()];

    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server).map_err(|e| tls(&e))?,
    ));
    server_config.transport_config(transport_config());
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client).map_err(|e| tls(&e))?,
    ));
    client_config.transport_config(transport_config());
    Ok((server_config, client_config))
}

/// The node id in a connection's peer certificate.
fn peer_node(connection: &quinn::Connection) -> Result<NodeId, String> {
    let identity = connection
        .peer_identity()
        .ok_or_else(|| "the peer presented no certificate".to_owned())?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "the peer's identity is not a certificate chain".to_owned())?;
    let leaf = chain
        .first()
        .ok_or_else(|| "the peer presented no certificate".to_owned())?;
    certs::node_id_of(leaf)
}

impl ClusterEndpoint {
    /// Binds the endpoint on `listen` with this node's credentials and starts accepting.
    pub fn bind(
        credentials: &NodeCredentials,
        listen: SocketAddr,
        stats: Arc<ClusterStats>,
    ) -> Result<Self, EndpointError> {
        let (server, client) = tls_configs(credentials)?;
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| EndpointError::Bind {
            addr: listen,
            source,
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind {
            addr: listen,
            source,
        })?;
        let this = Self {
            inner: Arc::new(Inner {
                node: credentials.node.clone(),
                endpoint,
                client,
                connections: DashMap::new(),
                open: DashMap::new(),
                senders: DashMap::new(),
                datagrams_pending: AtomicU64::new(0),
                inbound: OnceLock::new(),
                streams: OnceLock::new(),
                stats,
                closed: CancellationToken::new(),
            }),
        };
        tokio::spawn(this.clone().accept_loop());
        Ok(this)
    }

    /// This node's id (from its certificate).
    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ClusterStats> {
        &self.inner.stats
    }

    /// Connects the inbound side (once; later calls are ignored).
    pub fn attach(&self, inbound: Arc<dyn Inbound>) {
        let _ = self.inner.inbound.set(inbound);
    }

    /// Sets what handles streams peers open (once; later calls are ignored).
    pub fn set_stream_handler(&self, handler: StreamHandler) {
        let _ = self.inner.streams.set(handler);
    }

    /// Nodes with an open connection.
    pub fn connected(&self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self
            .inner
            .connections
            .iter()
            .filter(|entry| entry.value().close_reason().is_none())
            .map(|entry| entry.key().clone())
            .collect();
        nodes.sort();
        nodes
    }

    async fn accept_loop(self) {
        loop {
            let incoming = tokio::select! {
                () = self.inner.closed.cancelled() => return,
                incoming = self.inner.endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { return };
            let this = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let connecting = match incoming.accept() {
                    Ok(connecting) => connecting,
                    Err(error) => {
                        this.refused(remote, Refusal::Handshake, &error.to_string(), "inbound");
                        return;
                    }
                };
                match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                    Ok(Ok(connection)) => {
                        if let Err((refusal, reason)) = this.admit(&connection, None) {
                            this.refused(remote, refusal, &reason, "inbound");
                        }
                    }
                    Ok(Err(error)) => {
                        let reason = error.to_string();
                        this.refused(remote, Refusal::classify(&reason), &reason, "inbound");
                    }
                    Err(_) => this.refused(
                        remote,
                        Refusal::Handshake,
                        "the handshake did not finish in time",
                        "inbound",
                    ),
                }
            });
        }
    }

    fn refused(&self, remote: SocketAddr, refusal: Refusal, reason: &str, direction: &str) {
        self.inner.stats.refuse(refusal);
        tracing::warn!(
            %remote,
            direction,
            reason = refusal.as_str(),
            detail = reason,
            "cluster peer refused"
        );
    }

    /// Checks the node id in the peer's certificate and keeps the connection.
    fn admit(
        &self,
        connection: &quinn::Connection,
        expected: Option<&NodeId>,
    ) -> Result<NodeId, (Refusal, String)> {
        let refuse = |refusal: Refusal, reason: String| {
            connection.close(1u32.into(), reason.as_bytes());
            Err((refusal, reason))
        };
        let node = match peer_node(connection) {
            Ok(node) => node,
            Err(reason) => return refuse(Refusal::NoCertificate, reason),
        };
        if node == self.inner.node {
            return refuse(
                Refusal::WrongNode,
                format!("the peer's certificate names this node ({node}); node ids must be unique"),
            );
        }
        if let Some(expected) = expected
            && *expected != node
        {
            return refuse(
                Refusal::WrongNode,
                format!("expected node {expected}, the certificate names {node}"),
            );
        }
        self.inner.stats.connections.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = %node, remote = %connection.remote_address(), "cluster connection up");
        self.inner
            .connections
            .insert(node.clone(), connection.clone());
        let superseded: Vec<quinn::Connection> = {
            let mut open = self.inner.open.entry(node.clone()).or_default();
            open.retain(|open| open.close_reason().is_none());
            open.push(connection.clone());
            let excess = open.len().saturating_sub(MAX_PEER_CONNECTIONS);
            open.drain(..excess).collect()
        };
        for old in superseded {
            tracing::info!(
                peer = %node,
                remote = %old.remote_address(),
                max = MAX_PEER_CONNECTIONS,
                "closing the peer's oldest connection: it opened a newer one, and a node keeps \
                 at most this many open to each peer"
            );
            old.close(
                SUPERSEDED.into(),
                b"superseded by a newer connection of the same node",
            );
        }
        tokio::spawn(
            self.clone()
                .read_datagrams(node.clone(), connection.clone()),
        );
        tokio::spawn(
            self.clone()
                .accept_streams(node.clone(), connection.clone()),
        );
        Ok(node)
    }

    async fn read_datagrams(self, node: NodeId, connection: quinn::Connection) {
        loop {
            let datagram = tokio::select! {
                () = self.inner.closed.cancelled() => return,
                datagram = connection.read_datagram() => datagram,
            };
            match datagram {
                Ok(bytes) if bytes.len() > MAX_PACKET_BYTES => {
                    // Checked here, before anything queues it: the connection closes, so a
                    // flood of them ends with the first.
                    self.wire_fault(
                        &node,
                        WireFault::OversizedDatagram,
                        &format!("{} bytes; at most {MAX_PACKET_BYTES}", bytes.len()),
                        Some(&connection),
                    );
                }
                Ok(bytes) => {
                    self.inner
                        .stats
                        .datagrams_received
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(inbound) = self.inner.inbound.get() {
                        inbound.datagram(&node, bytes);
                    }
                }
                Err(error) => {
                    tracing::debug!(peer = %node, %error, "cluster connection closed");
                    self.inner
                        .connections
                        .remove_if(&node, |_, open| open.stable_id() == connection.stable_id());
                    if let Some(mut open) = self.inner.open.get_mut(&node) {
                        open.retain(|open| open.stable_id() != connection.stable_id());
                    }
                    self.inner.open.remove_if(&node, |_, open| open.is_empty());
                    return;
                }
            }
        }
    }

    async fn accept_streams(self, node: NodeId, connection: quinn::Connection) {
        loop {
            let stream = tokio::select! {
                () = self.inner.closed.cancelled() => return,
                stream = connection.accept_bi() => stream,
            };
            let Ok((send, recv)) = stream else { return };
            match self.inner.streams.get() {
                Some(handler) => handler(node.clone(), send, recv),
                None => {
                    let mut send = send;
                    let _ = send.reset(0u32.into());
                }
            }
        }
    }

    /// An open connection to `node`, or a new one to `addr` (which must be `node`'s, when
    /// `node` is given). Returns the peer's node id and the connection.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        node: Option<&NodeId>,
    ) -> Result<(NodeId, quinn::Connection), DialError> {
        if let Some(node) = node
            && let Some(open) = self.inner.connections.get(node)
            && open.close_reason().is_none()
        {
            return Ok((node.clone(), open.clone()));
        }
        if node.is_none() {
            // An address only (a seed, resolved again on every membership tick until the node
            // has joined): the connection open to it, whichever side dialed. Another dial would
            // open another connection, kept open for good by its keep-alives.
            let open = self.inner.connections.iter().find_map(|entry| {
                let connection = entry.value();
                (connection.close_reason().is_none() && connection.remote_address() == addr)
                    .then(|| (entry.key().clone(), connection.clone()))
            });
            if let Some(open) = open {
                return Ok(open);
            }
        }
        if self.inner.closed.is_cancelled() {
            return Err(DialError::Closed);
        }
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client.clone(), addr, SERVER_NAME)
            .map_err(|error| DialError::Unreachable {
                addr,
                reason: error.to_string(),
            })?;
        let connection = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                let reason = error.to_string();
                let refusal = Refusal::classify(&reason);
                if matches!(error, quinn::ConnectionError::TimedOut) {
                    return Err(DialError::Unreachable { addr, reason });
                }
                self.refused(addr, refusal, &reason, "outbound");
                return Err(DialError::Refused {
                    addr,
                    refusal,
                    reason,
                });
            }
            Err(_) => {
                return Err(DialError::Unreachable {
                    addr,
                    reason: format!("no answer within {DIAL_TIMEOUT:?}"),
                });
            }
        };
        if node.is_none() && peer_node(&connection).as_ref() == Ok(&self.inner.node) {
            // Not a peer that claims this node's id: this node answered its own dial.
            connection.close(0u32.into(), b"this node");
            return Err(DialError::Myself { addr });
        }
        match self.admit(&connection, node) {
            Ok(peer) => Ok((peer, connection)),
            Err((refusal, reason)) => {
                self.refused(addr, refusal, &reason, "outbound");
                Err(DialError::Refused {
                    addr,
                    refusal,
                    reason,
                })
            }
        }
    }

    /// Sends a datagram to `node` at `addr` without waiting: it is queued for that peer's task,
    /// which dials when needed; dropped when the queue is full or the peer is unreachable.
    pub fn send_datagram(&self, node: &NodeId, addr: SocketAddr, bytes: Bytes) {
        if self.inner.closed.is_cancelled() {
            return;
        }
        let sender = self
            .inner
            .senders
            .entry(node.clone())
            .or_insert_with(|| {
                let (sender, receiver) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(self.clone().peer_sender(node.clone(), receiver));
                sender
            })
            .clone();
        self.inner.datagrams_pending.fetch_add(1, Ordering::AcqRel);
        if sender.try_send((addr, bytes)).is_err() {
            self.inner.datagrams_pending.fetch_sub(1, Ordering::AcqRel);
            self.inner
                .stats
                .datagrams_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops the datagram sender of `node` (the membership forgot it): its task ends once it
    /// has handled what is queued. A node that comes back gets a new one.
    pub fn forget_peer(&self, node: &NodeId) {
        self.inner.senders.remove(node);
    }

    /// One peer's datagram sender: dials lazily (with [`DIAL_TIMEOUT`]), drops on error.
    async fn peer_sender(self, node: NodeId, mut queue: mpsc::Receiver<(SocketAddr, Bytes)>) {
        let dropped = |count: u64| {
            self.inner
                .stats
                .datagrams_dropped
                .fetch_add(count, Ordering::Relaxed);
        };
        // Each datagram taken out of the queue is pending until it is handed to the connection
        // or dropped.
        let handled = |count: u64| {
            self.inner
                .datagrams_pending
                .fetch_sub(count, Ordering::AcqRel);
        };
        loop {
            let next = tokio::select! {
                () = self.inner.closed.cancelled() => return,
                next = queue.recv() => next,
            };
            let Some((addr, bytes)) = next else { return };
            let connection = match self.connect(addr, Some(&node)).await {
                Ok((_, connection)) => connection,
                Err(error) => {
                    tracing::debug!(peer = %node, %error, "datagram dropped");
                    // What queued up during the failed dial goes too: the peer is unreachable.
                    let mut count = 1;
                    while queue.try_recv().is_ok() {
                        count += 1;
                    }
                    dropped(count);
                    handled(count);
                    continue;
                }
            };
            match connection.send_datagram(bytes) {
                Ok(()) => {
                    self.inner
                        .stats
                        .datagrams_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::debug!(peer = %node, %error, "datagram dropped");
                    dropped(1);
                }
            }
            handled(1);
        }
    }

    /// `peer` broke the wire protocol: one WARN line naming it and the reason, one count in
    /// `troupe_cluster_wire_errors_total{reason}`, and, for the faults that warrant it, the
    /// connection closed (`connection`, or else the one open to `peer`). A stream fault's stream
    /// is closed by its reader.
    pub fn wire_fault(
        &self,
        peer: &NodeId,
        fault: WireFault,
        detail: &str,
        connection: Option<&quinn::Connection>,
    ) {
        log_wire_fault(&self.inner.stats, peer, fault, detail);
        if !fault.closes_connection() {
            return;
        }
        let close = |connection: &quinn::Connection| {
            connection.close(PROTOCOL_VIOLATION.into(), fault.as_str().as_bytes());
        };
        match connection {
            Some(connection) => close(connection),
            None => {
                if let Some(open) = self.inner.connections.get(peer) {
                    close(&open);
                }
            }
        }
    }

    /// True while a datagram given to [`ClusterEndpoint::send_datagram`] is neither dropped nor
    /// transmitted.
    fn datagrams_unsent(&self) -> bool {
        self.inner.datagrams_pending.load(Ordering::Acquire) > 0
            || self.inner.connections.iter().any(|connection| {
                // quinn counts a queued datagram as its payload plus its own size (a `Bytes`,
                // 32 bytes), and keeps one such size in reserve even when nothing is queued: an
                // empty buffer shows at least `DATAGRAM_SEND_BUFFER - 64`, one queued datagram
                // (a byte or more) less than that.
                connection.close_reason().is_none()
                    && connection.datagram_send_buffer_space() < DATAGRAM_SEND_BUFFER - 64
            })
    }

    /// The largest datagram a connection to `node` carries now, if one is open.
    pub fn max_datagram_size(&self, node: &NodeId) -> Option<usize> {
        self.inner
            .connections
            .get(node)
            .and_then(|connection| connection.max_datagram_size())
    }

    /// Closes every connection and the socket, waiting up to `timeout` for peers to learn it.
    pub async fn close(&self, timeout: Duration) {
        // Let what is queued (the leave announcement) go out first, briefly: every datagram
        // handed to a connection (a peer's sender may still be dialing for it) and transmitted
        // by it (closing a connection discards the datagrams it still holds).
        let deadline = tokio::time::Instant::now() + timeout / 2;
        while tokio::time::Instant::now() < deadline && self.datagrams_unsent() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.closed.cancel();
        self.inner
            .endpoint
            .close(0u32.into(), b"node shutting down");
        let _ = tokio::time::timeout(timeout, self.inner.endpoint.wait_idle()).await;
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::cluster::certs::{NodeFiles, init, issue, issue_node, load, load_unchecked};

    struct Collect(mpsc::UnboundedSender<(NodeId, Bytes)>);

    impl Inbound for Collect {
        fn datagram(&self, from: &NodeId, bytes: Bytes) {
            let _ = self.0.send((from.clone(), bytes));
        }
    }

    fn id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// A CA in `dir/ca` with node `a`, and node `names` issued from it.
    fn cluster(dir: &std::path::Path, names: &[&str]) -> Vec<NodeCredentials> {
        let now = OffsetDateTime::now_utc();
        let home = init(&dir.join("ca"), &id("a"), now).unwrap();
        let mut all = vec![load(&home).unwrap()];
        for name in names {
            let files = issue(&dir.join("ca"), &id(name), &dir.join(name), now).unwrap();
            all.push(load(&files).unwrap());
        }
        all
    }

    fn bind(credentials: &NodeCredentials) -> ClusterEndpoint {
        ClusterEndpoint::bind(credentials, loopback(), Arc::default()).unwrap()
    }

    #[tokio::test]
    async fn two_nodes_of_one_ca_connect_and_exchange_datagrams() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &["b"]);
        let a = bind(&creds[0]);
        let b = bind(&creds[1]);
        let (sender, mut received) = mpsc::unbounded_channel();
        b.attach(Arc::new(Collect(sender)));
        let b_addr = b.local_addr().unwrap();
        let (peer, _) = a.connect(b_addr, Some(&id("b"))).await.unwrap();
        assert_eq!(peer, id("b"));
        a.send_datagram(&id("b"), b_addr, Bytes::from_static(b"ping"));
        let (from, bytes) = received.recv().await.unwrap();
        assert_eq!(from, id("a"), "the sender is named by its certificate");
        assert_eq!(&bytes[..], b"ping");
        assert!(a.max_datagram_size(&id("b")).unwrap() >= 1150);

        a.close(Duration::from_secs(1)).await;
        b.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_peer_may_keep_thousands_of_streams_open_at_once() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &["b"]);
        let a = bind(&creds[0]);
        let b = bind(&creds[1]);
        // b keeps every stream a opens, as a long output follow does.
        let (opened, mut held) = mpsc::unbounded_channel();
        b.set_stream_handler(Arc::new(move |_, send, recv| {
            let _ = opened.send((send, recv));
        }));
        let b_addr = b.local_addr().unwrap();
        let (_, connection) = a.connect(b_addr, Some(&id("b"))).await.unwrap();
        let count = 1_000;
        let mut kept = Vec::new();
        let opening = async {
            for _ in 0..count {
                let (mut send, recv) = connection.open_bi().await.unwrap();
                // A stream reaches the peer with its first bytes.
                send.write_all(b"x").await.unwrap();
                kept.push((send, recv));
            }
            for _ in 0..count {
                held.recv().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), opening)
            .await
            .expect("every stream opens while the others stay open");
        a.close(Duration::from_secs(1)).await;
        b.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_peer_from_another_ca_is_refused_both_ways_and_counted() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let ours = cluster(dir.path(), &[]);
        let theirs = {
            let other = dir.path().join("other");
            load(&init(&other.join("ca"), &id("x"), OffsetDateTime::now_utc()).unwrap()).unwrap()
        };
        let a = bind(&ours[0]);
        let x = bind(&theirs);
        let error = x.connect(a.local_addr().unwrap(), None).await.unwrap_err();
        assert!(matches!(error, DialError::Refused { .. }), "{error}");
        let error = a.connect(x.local_addr().unwrap(), None).await.unwrap_err();
        match error {
            DialError::Refused { refusal, .. } => assert_eq!(refusal, Refusal::UnknownCa),
            other => panic!("{other}"),
        }
        assert!(a.stats().refused(Refusal::UnknownCa) >= 1);
        assert!(x.stats().refused(Refusal::UnknownCa) >= 1);
    }

    #[tokio::test]
    async fn an_expired_certificate_is_refused_as_expired() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &[]);
        let a = bind(&creds[0]);
        let ca_dir = dir.path().join("ca");
        let now = OffsetDateTime::now_utc();
        let (cert, key) = issue_node(
            &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(ca_dir.join("ca.key")).unwrap(),
            &id("old"),
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
        let old_dir = dir.path().join("old");
        std::fs::create_dir_all(&old_dir).unwrap();
        let files = NodeFiles::in_dir(&old_dir);
        std::fs::copy(ca_dir.join("ca.pem"), &files.ca).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        // The node itself would refuse to start with it (`load`): only peers see it here.
        let old = bind(&load_unchecked(&files).unwrap());
        let error = old.connect(a.local_addr().unwrap(), None).await;
        // The client side may finish its handshake before the server's verdict arrives; the
        // server's refusal is what counts.
        drop(error);
        wait_refused(&a, Refusal::Expired).await;
        let error = a
            .connect(old.local_addr().unwrap(), None)
            .await
            .unwrap_err();
        match error {
            DialError::Refused { refusal, .. } => assert_eq!(refusal, Refusal::Expired),
            other => panic!("{other}"),
        }
    }

    /// A certificate whose validity has not begun (a node whose clock is behind its issuer's
    /// by more than the hour of slack) is refused as `expired` too, as [`Refusal::Expired`]
    /// says; rustls words it "not valid yet", which was counted as a plain handshake failure.
    #[tokio::test]
    async fn a_certificate_not_valid_yet_is_refused_as_expired() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &[]);
        let a = bind(&creds[0]);
        let ca_dir = dir.path().join("ca");
        let now = OffsetDateTime::now_utc();
        let (cert, key) = issue_node(
            &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(ca_dir.join("ca.key")).unwrap(),
            &id("early"),
            now + time::Duration::days(1),
            now + time::Duration::days(30),
        )
        .unwrap();
        let early_dir = dir.path().join("early");
        std::fs::create_dir_all(&early_dir).unwrap();
        let files = NodeFiles::in_dir(&early_dir);
        std::fs::copy(ca_dir.join("ca.pem"), &files.ca).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        // The node itself would refuse to start with it (`load`): only peers see it here.
        let early = bind(&load_unchecked(&files).unwrap());
        let error = a
            .connect(early.local_addr().unwrap(), None)
            .await
            .unwrap_err();
        match error {
            DialError::Refused { refusal, .. } => assert_eq!(refusal, Refusal::Expired),
            other => panic!("{other}"),
        }
        assert_eq!(a.stats().refused(Refusal::Handshake), 0);
    }

    /// Waits (bounded) until `endpoint` counted a refusal for `reason`. The counter has no
    /// notification to wait on; a regression fails here after 30 s instead of hanging.
    async fn wait_refused(endpoint: &ClusterEndpoint, reason: Refusal) {
        let counted = tokio::time::timeout(Duration::from_secs(30), async {
            while endpoint.stats().refused(reason) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(counted.is_ok(), "no {} refusal counted", reason.as_str());
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &[]);
        let a = bind(&creds[0]);
        let mut roots = RootCertStore::empty();
        roots.add(creds[0].ca.clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let config =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).unwrap()));
        let anonymous = quinn::Endpoint::client(loopback()).unwrap();
        let connecting = anonymous
            .connect_with(config, a.local_addr().unwrap(), SERVER_NAME)
            .unwrap();
        if let Ok(connection) = connecting.await {
            // TLS 1.3 clients finish before the server checks them; the server then closes.
            let _ = connection.closed().await;
        }
        wait_refused(&a, Refusal::NoCertificate).await;
    }

    #[tokio::test]
    async fn a_certificate_naming_another_node_than_expected_is_refused() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &["b"]);
        let a = bind(&creds[0]);
        let b = bind(&creds[1]);
        let error = a
            .connect(b.local_addr().unwrap(), Some(&id("c")))
            .await
            .unwrap_err();
        match error {
            DialError::Refused {
                refusal, reason, ..
            } => {
                assert_eq!(refusal, Refusal::WrongNode);
                assert!(reason.contains("expected node c"), "{reason}");
            }
            other => panic!("{other}"),
        }
        assert_eq!(a.stats().refused(Refusal::WrongNode), 1);
    }

    /// A peer could open any number of connections, each with its own [`MAX_STREAMS`] streams
    /// and their buffers. Past [`MAX_PEER_CONNECTIONS`] of one node id, its oldest connection is
    /// closed: the newest ones stay, so a peer that restarted is never held off by its old one.
    #[tokio::test]
    async fn a_third_connection_of_one_peer_closes_its_oldest() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &["b"]);
        let a = bind(&creds[0]);
        let b = bind(&creds[1]);
        let a_addr = a.local_addr().unwrap();
        let mut dialed = Vec::new();
        for count in 1..=3u64 {
            // Dialed directly: `connect` would reuse the connection open to a.
            let connection = b
                .inner
                .endpoint
                .connect_with(b.inner.client.clone(), a_addr, SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            dialed.push(connection);
            // a admits it after the handshake; polled, bounded (no notification to wait on).
            tokio::time::timeout(Duration::from_secs(30), async {
                while a.stats().connections.load(Ordering::Relaxed) < count {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("a admits the connection");
        }
        let closed = tokio::time::timeout(Duration::from_secs(30), dialed[0].closed())
            .await
            .expect("the oldest connection is closed");
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, SUPERSEDED.into());
            }
            other => panic!("{other}"),
        }
        assert!(dialed[1].close_reason().is_none(), "the second stays open");
        assert!(dialed[2].close_reason().is_none(), "the newest stays open");
        assert_eq!(
            a.inner.open.get(&id("b")).unwrap().len(),
            MAX_PEER_CONNECTIONS
        );
        a.close(Duration::from_secs(1)).await;
        b.close(Duration::from_secs(1)).await;
    }

    /// What a node sends just before it closes (its leave) reaches the peer, also when the
    /// connection to the peer was not open yet: the peer's sender takes the datagram out of its
    /// queue before it dials, and the close used to wait only for the queue.
    #[tokio::test]
    async fn a_datagram_sent_just_before_close_reaches_the_peer() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &["b"]);
        let b = bind(&creds[1]);
        let (sender, mut received) = mpsc::unbounded_channel();
        b.attach(Arc::new(Collect(sender)));
        let b_addr = b.local_addr().unwrap();
        for connected in [false, true] {
            let a = bind(&creds[0]);
            if connected {
                a.connect(b_addr, Some(&id("b"))).await.unwrap();
            }
            a.send_datagram(&id("b"), b_addr, Bytes::from_static(b"leave"));
            a.close(Duration::from_secs(4)).await;
            let (from, bytes) = tokio::time::timeout(Duration::from_secs(10), received.recv())
                .await
                .unwrap_or_else(|_| panic!("the datagram was lost (connected first: {connected})"))
                .unwrap();
            assert_eq!((from, &bytes[..]), (id("a"), &b"leave"[..]));
        }
        b.close(Duration::from_secs(1)).await;
    }

    /// A seed is resolved by its address on every membership tick until the node has joined:
    /// each of those dials used to open another connection, which its keep-alives then kept
    /// open for good. A node id is not needed to reuse the one already open to that address.
    #[tokio::test]
    async fn resolving_an_address_again_reuses_the_connection_open_to_it() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let creds = cluster(dir.path(), &["b"]);
        let a = bind(&creds[0]);
        let b = bind(&creds[1]);
        let b_addr = b.local_addr().unwrap();
        let (peer, first) = a.connect(b_addr, None).await.unwrap();
        assert_eq!(peer, id("b"));
        for _ in 0..5 {
            let (peer, again) = a.connect(b_addr, None).await.unwrap();
            assert_eq!(peer, id("b"));
            assert_eq!(again.stable_id(), first.stable_id(), "the same connection");
        }
        assert_eq!(a.stats().connections.load(Ordering::Relaxed), 1);
        // Once b has admitted the connection from its side, b's own dial back to a's address
        // finds it too. (Polled, bounded: admission has no notification to wait on.)
        tokio::time::timeout(Duration::from_secs(30), async {
            while b.connected().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("b admits the connection");
        let (peer, back) = b.connect(a.local_addr().unwrap(), None).await.unwrap();
        assert_eq!(peer, id("a"));
        assert_eq!(b.stats().connections.load(Ordering::Relaxed), 1);
        assert!(back.close_reason().is_none());
        a.close(Duration::from_secs(1)).await;
        b.close(Duration::from_secs(1)).await;
    }
}
