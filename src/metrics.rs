//! `/metrics`: Prometheus text, read at scrape time from the counters the actors already keep
//! (the actor directory's per-actor stats, the bus's per-kind counters, the registry's tables),
//! so serving metrics never sends a message to an actor or takes a lock an actor holds.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use troupe_actors::event::EventBus;

use crate::cluster::{ClusterStats, Refusal};
use crate::store::Store;
use troupe_actors::cluster::WireFault;
use troupe_actors::kernel::{ActorDirectory, ActorStatsSnapshot};
use troupe_actors::provider::stats::LATENCY_BUCKETS_SECS;
use troupe_actors::provider::{ProviderActorRef, ProviderStatus};
use troupe_actors::registry::RegistryTables;
use troupe_actors::session::{DURATION_BUCKETS_SECS, SessionState, SessionStats};

use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The node's metrics registry.
pub struct NodeMetrics {
    registry: Registry,
}

impl fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeMetrics")
    }
}

struct TreeCollector {
    directory: ActorDirectory,
    events: EventBus,
    tables: RegistryTables,
}

struct SessionsCollector {
    stats: Arc<SessionStats>,
}

impl fmt::Debug for SessionsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionsCollector")
    }
}

impl Collector for SessionsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        encode_sessions(&mut encoder, &self.stats)
    }
}

struct StoreCollector {
    store: Store,
}

impl fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let stats = self.store.stats();
        single(
            &mut encoder,
            "troupe_store_commits",
            "Durable write transactions of the store (each a group commit)",
            MetricType::Counter,
            ConstCounter::new(stats.commits),
        )?;
        single(
            &mut encoder,
            "troupe_store_failed_batches",
            "Write batches rolled back after a storage failure",
            MetricType::Counter,
            ConstCounter::new(stats.failed_batches),
        )?;
        single(
            &mut encoder,
            "troupe_store_dropped_appends",
            "Output lines batches and events not written to the store because too many writes \
             were waiting for the disk (or the store was closed)",
            MetricType::Counter,
            ConstCounter::new(stats.dropped_appends),
        )?;
        single(
            &mut encoder,
            "troupe_store_pruned_events",
            "Events deleted from the event log by retention (events.retention_secs, \
             events.retention_bytes)",
            MetricType::Counter,
            ConstCounter::new(stats.pruned_events),
        )?;
        single(
            &mut encoder,
            "troupe_store_pruned_sessions",
            "Ended sessions deleted by retention (sessions.retention_secs), with their \
             transitions and output",
            MetricType::Counter,
            ConstCounter::new(stats.pruned_sessions),
        )
    }
}

impl fmt::Debug for TreeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TreeCollector")
    }
}

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    value: M,
) -> fmt::Result {
    value.encode(encoder.encode_descriptor(name, help, None, kind)?)
}

impl Collector for TreeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let actors: Vec<ActorSample> = self
            .directory
            .list()
            .into_iter()
            .map(|(path, entry)| ActorSample {
                path: path.to_string(),
                running: entry.control.status().is_running(),
                stats: entry.control.stats().snapshot(),
            })
            .collect();
        encode_actors(&mut encoder, &actors, self.directory.restarts_total())?;
        family(
            &mut encoder,
            "troupe_events_published",
            "Events published on (or relayed to) this node's bus, by kind",
            MetricType::Counter,
            self.events
                .published_by_kind()
                .into_iter()
                .map(|(kind, count)| {
                    (
                        vec![("kind", kind.as_str().to_owned())],
                        ConstCounter::new(count),
                    )
                }),
        )?;
        single(
            &mut encoder,
            "troupe_events_dropped",
            "Events that could not be handed to the bus",
            MetricType::Counter,
            ConstCounter::new(self.events.dropped()),
        )?;
        single(
            &mut encoder,
            "troupe_event_subscribers",
            "Live subscriptions to the event bus",
            MetricType::Gauge,
            ConstGauge::new(i64::try_from(self.events.subscriber_count()).unwrap_or(i64::MAX)),
        )?;
        single(
            &mut encoder,
            "troupe_links",
            "Live client links",
            MetricType::Gauge,
            ConstGauge::new(i64::try_from(self.tables.links().len()).unwrap_or(i64::MAX)),
        )
    }
}

/// One supervised actor as `/metrics` reads it.
struct ActorSample {
    path: String,
    running: bool,
    stats: ActorStatsSnapshot,
}

/// The per-actor series (`troupe_actor_*{actor}`) and the node-wide restart total, which keeps
/// counting the restarts of children that are gone (ended sessions, closed links).
fn encode_actors(
    encoder: &mut DescriptorEncoder<'_>,
    actors: &[ActorSample],
    restarts_total: u64,
) -> fmt::Result {
    let label = |actor: &ActorSample| vec![("actor", actor.path.clone())];
    let counter = |pick: fn(&ActorStatsSnapshot) -> u64| {
        move |actor: &ActorSample| (label(actor), ConstCounter::new(pick(&actor.stats)))
    };
    single(
        encoder,
        "troupe_restarts",
        "Restarts of any actor of the node since it started (also of actors that are gone)",
        MetricType::Counter,
        ConstCounter::new(restarts_total),
    )?;
    family(
        encoder,
        "troupe_actor_up",
        "1 while an instance of the actor runs, 0 while it restarts or after it stopped",
        MetricType::Gauge,
        actors
            .iter()
            .map(|actor| (label(actor), ConstGauge::new(i64::from(actor.running)))),
    )?;
    family(
        encoder,
        "troupe_actor_restarts",
        "Restarts of the actor by its supervisor",
        MetricType::Counter,
        actors.iter().map(counter(|stats| stats.restarts)),
    )?;
    family(
        encoder,
        "troupe_actor_messages",
        "Messages the actor has handled",
        MetricType::Counter,
        actors.iter().map(counter(|stats| stats.processed)),
    )?;
    family(
        encoder,
        "troupe_actor_mailbox_depth",
        "Messages accepted for the actor and not handled yet",
        MetricType::Gauge,
        actors.iter().map(|actor| {
            (
                label(actor),
                ConstGauge::new(i64::try_from(actor.stats.mailbox_depth()).unwrap_or(i64::MAX)),
            )
        }),
    )?;
    family(
        encoder,
        "troupe_actor_busy_seconds",
        "Time the actor spent in its handler",
        MetricType::Counter,
        actors.iter().map(|actor| {
            (
                label(actor),
                ConstCounter::new(actor.stats.busy.as_secs_f64()),
            )
        }),
    )?;
    family(
        encoder,
        "troupe_actor_dead_letters",
        "Messages dropped because the actor stopped for good before handling them",
        MetricType::Counter,
        actors.iter().map(counter(|stats| stats.dead_letters)),
    )?;
    family(
        encoder,
        "troupe_actor_discarded",
        "Self-sends and timer messages of a failed instance of the actor, dropped instead of \
         reaching the next instance",
        MetricType::Counter,
        actors.iter().map(counter(|stats| stats.discarded)),
    )
}

fn encode_sessions(encoder: &mut DescriptorEncoder<'_>, stats: &SessionStats) -> fmt::Result {
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let gauge = |value: u64| ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    family(
        encoder,
        "troupe_sessions",
        "Sessions now running or queued, by state",
        MetricType::Gauge,
        [
            (
                vec![("state", "running".to_owned())],
                gauge(load(&stats.running)),
            ),
            (
                vec![("state", "queued".to_owned())],
                gauge(load(&stats.queued)),
            ),
        ],
    )?;
    family(
        encoder,
        "troupe_sessions_ended",
        "Sessions ended, by final state",
        MetricType::Counter,
        SessionState::ALL
            .iter()
            .enumerate()
            .filter(|(_, state)| state.is_terminal())
            .map(|(index, state)| {
                (
                    vec![("state", state.as_str().to_owned())],
                    ConstCounter::new(load(&stats.ended[index])),
                )
            }),
    )?;
    single(
        encoder,
        "troupe_sessions_submitted",
        "Sessions accepted",
        MetricType::Counter,
        ConstCounter::new(load(&stats.submitted)),
    )?;
    single(
        encoder,
        "troupe_sessions_refused",
        "Submissions refused because the queue was full",
        MetricType::Counter,
        ConstCounter::new(load(&stats.refused)),
    )?;
    single(
        encoder,
        "troupe_session_queue_depth",
        "Sessions waiting for a slot",
        MetricType::Gauge,
        gauge(load(&stats.queued)),
    )?;
    // Per-bucket counts: the encoder makes them cumulative.
    let buckets: Vec<(f64, u64)> = DURATION_BUCKETS_SECS
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(stats.duration_buckets.iter())
        .map(|(bound, count)| (bound, load(count)))
        .collect();
    let count = buckets.iter().map(|(_, count)| count).sum();
    let mut metric = encoder.encode_descriptor(
        "troupe_session_duration_seconds",
        "Run time of ended sessions",
        None,
        MetricType::Histogram,
    )?;
    metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        load(&stats.duration_ms_sum) as f64 / 1000.0,
        count,
        &buckets,
        None,
    )
}

struct ClusterCollector {
    stats: Arc<ClusterStats>,
}

impl fmt::Debug for ClusterCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterCollector")
    }
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let stats = &self.stats;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        family(
            &mut encoder,
            "troupe_cluster_refused",
            "Cluster peers refused, by reason (no_certificate, unknown_ca, expired, wrong_node, \
             handshake)",
            MetricType::Counter,
            Refusal::ALL.iter().map(|reason| {
                (
                    vec![("reason", reason.as_str().to_owned())],
                    ConstCounter::new(stats.refused(*reason)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "troupe_cluster_wire_errors",
            "Peers breaking the cluster wire protocol, by reason (malformed, oversized or \
             truncated frames, unknown versions, out-of-turn frames, foreign events, oversized, \
             malformed or spoofed datagrams, unknown metadata formats, generations from the \
             future)",
            MetricType::Counter,
            WireFault::ALL.iter().map(|fault| {
                (
                    vec![("reason", fault.as_str().to_owned())],
                    ConstCounter::new(stats.wire_errors(*fault)),
                )
            }),
        )?;
        single(
            &mut encoder,
            "troupe_cluster_members_refused",
            "New members the membership did not take because it tracks as many as it may \
             (1,024, down ones included until forgotten)",
            MetricType::Counter,
            ConstCounter::new(load(&stats.members_refused)),
        )?;
        single(
            &mut encoder,
            "troupe_cluster_streams_refused",
            "Streams of cluster peers refused (reset) because the peer had as many being served \
             as a peer may",
            MetricType::Counter,
            ConstCounter::new(load(&stats.streams_refused)),
        )?;
        single(
            &mut encoder,
            "troupe_cluster_connections",
            "Cluster connections established (both directions)",
            MetricType::Counter,
            ConstCounter::new(load(&stats.connections)),
        )?;
        family(
            &mut encoder,
            "troupe_cluster_datagrams",
            "Membership datagrams, by outcome",
            MetricType::Counter,
            [
                ("sent", load(&stats.datagrams_sent)),
                ("received", load(&stats.datagrams_received)),
                ("dropped", load(&stats.datagrams_dropped)),
            ]
            .map(|(outcome, count)| {
                (
                    vec![("outcome", outcome.to_owned())],
                    ConstCounter::new(count),
                )
            }),
        )
    }
}

impl NodeMetrics {
    /// A registry reading the node's actors, bus, registry and session counters.
    pub fn new(
        directory: ActorDirectory,
        events: EventBus,
        tables: RegistryTables,
        sessions: Option<Arc<SessionStats>>,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(TreeCollector {
            directory,
            events,
            tables,
        }));
        if let Some(stats) = sessions {
            registry.register_collector(Box::new(SessionsCollector { stats }));
        }
        Self { registry }
    }

    /// Adds the store's counters (`troupe_store_*`).
    pub fn with_store(mut self, store: Store) -> Self {
        self.registry
            .register_collector(Box::new(StoreCollector { store }));
        self
    }

    /// Adds per-provider series (`troupe_provider_*`), read from each provider's counters and
    /// last snapshot.
    pub fn add_providers(&mut self, providers: Vec<ProviderActorRef>) {
        if !providers.is_empty() {
            self.registry
                .register_collector(Box::new(ProviderCollector { providers }));
        }
    }

    /// Adds the cluster endpoint's counters.
    pub fn with_cluster(mut self, stats: Arc<ClusterStats>) -> Self {
        self.registry
            .register_collector(Box::new(ClusterCollector { stats }));
        self
    }

    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "metrics could not be rendered");
        }
        text
    }
}

/// Reads one counter of a provider.
type CounterPick = fn(&troupe_actors::provider::ProviderCounters) -> u64;

struct ProviderCollector {
    providers: Vec<ProviderActorRef>,
}

impl fmt::Debug for ProviderCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProviderCollector")
    }
}

impl Collector for ProviderCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let statuses: Vec<_> = self
            .providers
            .iter()
            .map(ProviderActorRef::status)
            .collect();
        let label = |name: &str| vec![("provider", name.to_owned())];
        family(
            &mut encoder,
            "troupe_provider_calls",
            "Provider calls that ended, by outcome",
            MetricType::Counter,
            statuses.iter().flat_map(|status| {
                let counters = &status.counters;
                [
                    ("succeeded", counters.succeeded),
                    ("failed", counters.failed),
                    ("abandoned", counters.abandoned),
                ]
                .map(|(outcome, count)| {
                    (
                        vec![
                            ("provider", status.name.clone()),
                            ("outcome", outcome.to_owned()),
                        ],
                        ConstCounter::new(count),
                    )
                })
            }),
        )?;
        let counters: [(&str, &str, CounterPick); 6] = [
            ("troupe_provider_retries", "Retries decided", |c| c.retries),
            (
                "troupe_provider_rate_limited",
                "429s from the provider",
                |c| c.rate_limited,
            ),
            (
                "troupe_provider_throttled",
                "Calls refused by troupe's own budget, concurrency limit or queue bound",
                |c| c.throttled,
            ),
            (
                "troupe_provider_breaker_rejections",
                "Calls refused by the open circuit breaker",
                |c| c.breaker_rejections,
            ),
            (
                "troupe_provider_breaker_opened",
                "Circuit breaker openings",
                |c| c.breaker_opened,
            ),
            (
                "troupe_provider_fallbacks",
                "Calls moved on to a fallback",
                |c| c.fallbacks,
            ),
        ];
        for (name, help, pick) in counters {
            family(
                &mut encoder,
                name,
                help,
                MetricType::Counter,
                statuses.iter().map(|status| {
                    (
                        label(&status.name),
                        ConstCounter::new(pick(&status.counters)),
                    )
                }),
            )?;
        }
        // Per-bucket counts: the encoder makes them cumulative.
        let mut latency = encoder.encode_descriptor(
            "troupe_provider_latency_seconds",
            "Call latency, from sending a request to the end of the answer (or the failure)",
            None,
            MetricType::Histogram,
        )?;
        for status in &statuses {
            let counters = &status.counters;
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_SECS
                .iter()
                .copied()
                .chain(std::iter::once(f64::INFINITY))
                .zip(counters.latency_buckets.iter().copied())
                .collect();
            let count = buckets.iter().map(|(_, count)| count).sum();
            latency
                .encode_family(&label(&status.name))?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    counters.latency_seconds_sum,
                    count,
                    &buckets,
                    None,
                )?;
        }
        // Budget: only the limits that are set.
        let dimensions = |status: &ProviderStatus| {
            let budget = status.budget;
            [
                ("requests", budget.rpm, budget.requests_left),
                ("tokens", budget.tpm, budget.tokens_left),
            ]
            .into_iter()
            .filter_map(|(dimension, limit, left)| Some((dimension, limit?, left?)))
            .map(|(dimension, limit, left)| {
                let labels = vec![
                    ("provider", status.name.clone()),
                    ("dimension", dimension.to_owned()),
                ];
                (labels, limit, left)
            })
            .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "troupe_provider_budget_left",
            "What troupe's own per-minute budget has left now (requests or tokens)",
            MetricType::Gauge,
            statuses
                .iter()
                .flat_map(dimensions)
                .map(|(labels, _, left)| (labels, ConstGauge::new(i64::from(left)))),
        )?;
        family(
            &mut encoder,
            "troupe_provider_budget_limit",
            "troupe's own per-minute budget (rpm, tpm)",
            MetricType::Gauge,
            statuses
                .iter()
                .flat_map(dimensions)
                .map(|(labels, limit, _)| (labels, ConstGauge::new(i64::from(limit)))),
        )?;
        family(
            &mut encoder,
            "troupe_provider_queued",
            "Calls waiting for budget or a concurrency slot",
            MetricType::Gauge,
            statuses.iter().map(|status| {
                (
                    label(&status.name),
                    ConstGauge::new(i64::try_from(status.queued).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "troupe_provider_in_flight",
            "Calls in flight now",
            MetricType::Gauge,
            statuses.iter().map(|status| {
                (
                    label(&status.name),
                    ConstGauge::new(i64::try_from(status.in_flight).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "troupe_provider_breaker_open",
            "1 while the circuit breaker is open or half-open",
            MetricType::Gauge,
            statuses.iter().map(|status| {
                (
                    label(&status.name),
                    ConstGauge::new(i64::from(status.breaker.state != "closed")),
                )
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use troupe_actors::event::OutputStream;
    use troupe_actors::ids::{NodeId, SessionId};
    use troupe_actors::session::SessionStore;

    use super::*;

    fn render(collector: impl Collector + 'static) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    fn assert_has(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "{line:?} is not in:\n{text}"
            );
        }
    }

    #[test]
    fn ended_sessions_count_per_final_state_and_fill_the_duration_histogram() {
        let stats = Arc::new(SessionStats::default());
        stats.record_end(SessionState::Succeeded, Duration::from_millis(50));
        stats.record_end(SessionState::Failed, Duration::from_secs(2));
        stats.record_end(SessionState::Cancelled, Duration::from_secs(7200));
        let text = render(SessionsCollector { stats });
        assert_has(
            &text,
            &[
                "troupe_sessions_ended_total{state=\"succeeded\"} 1",
                "troupe_sessions_ended_total{state=\"failed\"} 1",
                "troupe_sessions_ended_total{state=\"cancelled\"} 1",
                "troupe_sessions_ended_total{state=\"timed_out\"} 0",
                "troupe_sessions_ended_total{state=\"interrupted\"} 0",
                // Cumulative buckets: 0.05 s, 2 s, then 2 h past the last bound.
                "troupe_session_duration_seconds_bucket{le=\"0.1\"} 1",
                "troupe_session_duration_seconds_bucket{le=\"1.0\"} 1",
                "troupe_session_duration_seconds_bucket{le=\"5.0\"} 2",
                "troupe_session_duration_seconds_bucket{le=\"3600.0\"} 2",
                "troupe_session_duration_seconds_bucket{le=\"+Inf\"} 3",
                "troupe_session_duration_seconds_sum 7202.05",
                "troupe_session_duration_seconds_count 3",
            ],
        );
        assert!(
            !text.contains("troupe_sessions_ended_total{state=\"running\"}"),
            "only final states: {text}"
        );
    }

    struct Actors(Vec<ActorSample>, u64);

    impl fmt::Debug for Actors {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Actors")
        }
    }

    impl Collector for Actors {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
            encode_actors(&mut encoder, &self.0, self.1)
        }
    }

    #[test]
    fn per_actor_counters_discarded_included_and_the_node_restart_total_are_exported() {
        let restarting = ActorSample {
            path: "sessions/s-1".into(),
            running: false,
            stats: ActorStatsSnapshot {
                enqueued: 10,
                processed: 7,
                busy: Duration::from_millis(1500),
                restarts: 2,
                dead_letters: 1,
                discarded: 2,
            },
        };
        let quiet = ActorSample {
            path: "registry".into(),
            running: true,
            stats: ActorStatsSnapshot::default(),
        };
        // The node counted 5 restarts: 3 of them of actors no longer in the directory.
        let text = render(Actors(vec![quiet, restarting], 5));
        assert_has(
            &text,
            &[
                "troupe_restarts_total 5",
                "troupe_actor_discarded_total{actor=\"sessions/s-1\"} 2",
                "troupe_actor_discarded_total{actor=\"registry\"} 0",
                "troupe_actor_restarts_total{actor=\"sessions/s-1\"} 2",
                "troupe_actor_dead_letters_total{actor=\"sessions/s-1\"} 1",
                "troupe_actor_messages_total{actor=\"sessions/s-1\"} 7",
                "troupe_actor_busy_seconds_total{actor=\"sessions/s-1\"} 1.5",
                // 10 accepted, 7 handled, 2 discarded: 1 waits.
                "troupe_actor_mailbox_depth{actor=\"sessions/s-1\"} 1",
                "troupe_actor_up{actor=\"sessions/s-1\"} 0",
                "troupe_actor_up{actor=\"registry\"} 1",
            ],
        );
    }

    #[tokio::test]
    async fn appends_the_store_drops_are_exported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            NodeId::new("n1").unwrap(),
            crate::store::StoreConfig {
                // No append may wait for the disk: every one is dropped and counted.
                max_pending_appends: 0,
                ..crate::store::StoreConfig::default()
            },
        )
        .await
        .unwrap();
        let session = SessionId::new("s-1").unwrap();
        store.append_output(&session, OutputStream::Stdout, 1, &["a".to_owned()]);
        store.append_output(&session, OutputStream::Stdout, 2, &["b".to_owned()]);
        let text = render(StoreCollector {
            store: store.clone(),
        });
        assert_has(
            &text,
            &[
                "troupe_store_dropped_appends_total 2",
                "troupe_store_failed_batches_total 0",
                "troupe_store_pruned_sessions_total 0",
            ],
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn events_deleted_by_retention_are_counted() {
        use troupe_actors::event::{
            BusItem, Event, EventData, EventId, EventStore, SessionProgress,
        };
        use troupe_actors::ids::Timestamp;

        let dir = tempfile::tempdir().unwrap();
        let node = NodeId::new("n1").unwrap();
        let store = Store::open(
            dir.path(),
            node.clone(),
            crate::store::StoreConfig {
                event_retention_count: 2,
                ..crate::store::StoreConfig::default()
            },
        )
        .await
        .unwrap();
        for seq in 1..=5 {
            store.append(&BusItem {
                pos: seq,
                event: std::sync::Arc::new(Event {
                    rendered: Default::default(),
                    id: EventId::new(node.clone(), seq),
                    at: Timestamp::now(),
                    session: None,
                    data: EventData::SessionProgress(SessionProgress {
                        message: format!("step {seq}"),
                        current: Some(seq),
                        total: None,
                    }),
                }),
            });
        }
        store.flush().await.unwrap();
        let text = render(StoreCollector {
            store: store.clone(),
        });
        assert_has(&text, &["troupe_store_pruned_events_total 3"]);
        store.close().await.unwrap();
    }
}
