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
use troupe_actors::cluster::WireFault;
use troupe_actors::kernel::ActorDirectory;
use troupe_actors::provider::ProviderActorRef;
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
    sessions: Option<Arc<SessionStats>>,
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
        let actors: Vec<_> = self
            .directory
            .list()
            .into_iter()
            .map(|(path, entry)| {
                let label = vec![("actor", path.to_string())];
                (
                    label,
                    entry.control.status(),
                    entry.control.stats().snapshot(),
                )
            })
            .collect();
        family(
            &mut encoder,
            "troupe_actor_up",
            "1 while an instance of the actor runs, 0 while it restarts or after it stopped",
            MetricType::Gauge,
            actors.iter().map(|(labels, status, _)| {
                (
                    labels.clone(),
                    ConstGauge::new(i64::from(status.is_running())),
                )
            }),
        )?;
        family(
            &mut encoder,
            "troupe_actor_restarts",
            "Restarts of the actor by its supervisor",
            MetricType::Counter,
            actors
                .iter()
                .map(|(labels, _, stats)| (labels.clone(), ConstCounter::new(stats.restarts))),
        )?;
        family(
            &mut encoder,
            "troupe_actor_messages",
            "Messages the actor has handled",
            MetricType::Counter,
            actors
                .iter()
                .map(|(labels, _, stats)| (labels.clone(), ConstCounter::new(stats.processed))),
        )?;
        family(
            &mut encoder,
            "troupe_actor_mailbox_depth",
            "Messages accepted for the actor and not handled yet",
            MetricType::Gauge,
            actors.iter().map(|(labels, _, stats)| {
                (
                    labels.clone(),
                    ConstGauge::new(i64::try_from(stats.mailbox_depth()).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "troupe_actor_busy_seconds",
            "Time the actor spent in its handler",
            MetricType::Counter,
            actors.iter().map(|(labels, _, stats)| {
                (labels.clone(), ConstCounter::new(stats.busy.as_secs_f64()))
            }),
        )?;
        family(
            &mut encoder,
            "troupe_actor_dead_letters",
            "Messages dropped because the actor stopped for good before handling them",
            MetricType::Counter,
            actors
                .iter()
                .map(|(labels, _, stats)| (labels.clone(), ConstCounter::new(stats.dead_letters))),
        )?;
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
        )?;
        if let Some(sessions) = &self.sessions {
            encode_sessions(&mut encoder, sessions)?;
        }
        Ok(())
    }
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
             malformed or spoofed datagrams, unknown metadata formats)",
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
            sessions,
        }));
        Self { registry }
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
        family(
            &mut encoder,
            "troupe_provider_latency_seconds_sum",
            "Sum of call latencies (from sending to the end of the answer)",
            MetricType::Counter,
            statuses.iter().map(|status| {
                (
                    label(&status.name),
                    ConstCounter::new(status.counters.latency_seconds_sum),
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
