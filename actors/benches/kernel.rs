//! Kernel benchmarks: message round trips, restart latency, event fan-out.
//!
//! Run with: cargo bench -p troupe-actors --bench kernel
//!
//! - `round_trip/*`: one request and its reply, to a supervised actor through its handle and,
//!   as the baseline in the same run, over a raw tokio mpsc channel with a oneshot reply.
//! - `casts/*`: a burst of one-way messages followed by one request (external sender throughput).
//! - `restart`: a supervised child panics and a request sent right after the fault is answered by
//!   the next instance — panic to new instance handling messages. Per-restart p50/p99 are printed
//!   after criterion's report (criterion reports means).
//! - `fanout/N`: one event published, delivered to N subscribers (each a task).
//!
//! Intended panics go through a silent panic hook, so the numbers measure the kernel, not
//! stderr or backtrace capture.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ractor::RpcReplyPort;
use tokio::runtime::Runtime;
use tokio::sync::{Notify, mpsc, oneshot};

use troupe_actors::event::{
    BusShared, EventBus, EventBusActor, EventBusArgs, EventBusConfig, EventData, EventFilter,
    ProviderRecovered,
};
use troupe_actors::ids::{ActorPath, NodeId};
use troupe_actors::kernel::{self, Actor, ActorError, ActorHandle, Context, FaultKind};
use troupe_actors::supervisor::{
    Backoff, ChildSpec, RestartIntensity, Supervisor, SupervisorArgs, SupervisorConfig,
};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

struct Echo;

enum EchoMsg {
    Ask(u64, RpcReplyPort<u64>),
    Tell(u64),
}

impl Actor for Echo {
    type Msg = EchoMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(&self, _ctx: &Context<EchoMsg>, _args: ()) -> Result<u64, ActorError> {
        Ok(0)
    }

    async fn handle(
        &self,
        _ctx: &Context<EchoMsg>,
        message: EchoMsg,
        total: &mut u64,
    ) -> Result<(), ActorError> {
        match message {
            EchoMsg::Ask(value, reply) => {
                let _ = reply.send(value + *total);
            }
            EchoMsg::Tell(value) => *total = total.wrapping_add(value),
        }
        Ok(())
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A supervised `Echo` child with immediate restarts and no restart limit.
async fn supervised_echo() -> ActorHandle<EchoMsg> {
    let path = ActorPath::root().child("bench");
    let handle = ActorHandle::new(path.child("echo"));
    let spec = ChildSpec::worker(&handle, || (Echo, ()));
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                backoff: Backoff::NONE,
                intensity: RestartIntensity {
                    max_restarts: u32::MAX,
                    window: Duration::from_secs(1),
                },
                ..SupervisorConfig::default()
            },
            children: vec![spec],
            ..SupervisorArgs::default()
        },
        &ActorHandle::new(path),
    )
    .await
    .unwrap();
    handle
}

type RawRequest = (u64, oneshot::Sender<u64>);

fn raw_echo() -> mpsc::UnboundedSender<RawRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<RawRequest>();
    tokio::spawn(async move {
        let mut total = 0u64;
        while let Some((value, reply)) = rx.recv().await {
            total = total.wrapping_add(1);
            let _ = reply.send(value + total - total);
        }
    });
    tx
}

fn round_trip(c: &mut Criterion) {
    let rt = runtime();
    let handle = rt.block_on(supervised_echo());
    let raw = rt.block_on(async { raw_echo() });
    let mut group = c.benchmark_group("round_trip");
    group.throughput(Throughput::Elements(1));
    group.bench_function("tokio_mpsc", |b| {
        b.to_async(&rt).iter(|| {
            let raw = raw.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                raw.send((7, tx)).unwrap();
                rx.await.unwrap()
            }
        })
    });
    group.bench_function("supervised_actor", |b| {
        b.to_async(&rt).iter(|| {
            let handle = handle.clone();
            async move {
                handle
                    .call(|reply| EchoMsg::Ask(7, reply), CALL_TIMEOUT)
                    .await
                    .unwrap()
            }
        })
    });
    group.finish();
}

fn casts(c: &mut Criterion) {
    const BURST: u64 = 1_000;
    let rt = runtime();
    let handle = rt.block_on(supervised_echo());
    let raw = rt.block_on(async { raw_echo() });
    let (raw_tell, mut raw_told) = mpsc::unbounded_channel::<u64>();
    let raw_sink = rt.spawn(async move {
        let mut total = 0u64;
        while let Some(value) = raw_told.recv().await {
            total = total.wrapping_add(value);
        }
        total
    });
    let mut group = c.benchmark_group("casts");
    group.throughput(Throughput::Elements(BURST));
    group.bench_function("tokio_mpsc", |b| {
        b.to_async(&rt).iter(|| {
            let raw = raw.clone();
            let raw_tell = raw_tell.clone();
            async move {
                for value in 0..BURST {
                    raw_tell.send(value).unwrap();
                }
                let (tx, rx) = oneshot::channel();
                raw.send((1, tx)).unwrap();
                rx.await.unwrap()
            }
        })
    });
    group.bench_function("supervised_actor", |b| {
        b.to_async(&rt).iter(|| {
            let handle = handle.clone();
            async move {
                for value in 0..BURST {
                    handle.cast(EchoMsg::Tell(value)).unwrap();
                }
                handle
                    .call(|reply| EchoMsg::Ask(1, reply), CALL_TIMEOUT)
                    .await
                    .unwrap()
            }
        })
    });
    group.finish();
    drop(raw_tell);
    let _ = rt.block_on(raw_sink);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn restart(c: &mut Criterion) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let rt = runtime();
    let handle = rt.block_on(supervised_echo());
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    c.bench_function("restart", |b| {
        let samples = samples.clone();
        let handle = handle.clone();
        b.to_async(&rt).iter_custom(move |iters| {
            let samples = samples.clone();
            let handle = handle.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    assert!(handle.inject_fault(FaultKind::Panic));
                    handle
                        .call(|reply| EchoMsg::Ask(1, reply), CALL_TIMEOUT)
                        .await
                        .unwrap();
                    let took = started.elapsed();
                    total += took;
                    samples.lock().unwrap().push(took);
                }
                total
            }
        })
    });
    std::panic::set_hook(previous);
    let mut all = samples.lock().unwrap().clone();
    all.sort();
    if !all.is_empty() {
        println!(
            "restart latency over {} restarts: p50 {:?}, p99 {:?}, max {:?} (target: p99 < 20 µs)",
            all.len(),
            percentile(&all, 0.50),
            percentile(&all, 0.99),
            all[all.len() - 1]
        );
    }
}

fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("fanout");
    for subscribers in [1usize, 100, 1_000] {
        let bus = rt.block_on(async {
            let shared = BusShared::new(
                NodeId::new("bench").unwrap(),
                EventBusConfig {
                    ring_capacity: 10_000,
                    subscriber_buffer: 16_384,
                },
            );
            let handle = ActorHandle::new(ActorPath::root().child("event_bus"));
            kernel::spawn(
                EventBusActor,
                EventBusArgs {
                    shared: shared.clone(),
                    store: None,
                },
                &handle,
            )
            .await
            .unwrap();
            EventBus::new(handle, shared)
        });
        let delivered = Arc::new(AtomicUsize::new(0));
        let all_delivered = Arc::new(Notify::new());
        let tasks: Vec<_> = (0..subscribers)
            .map(|_| {
                let mut subscription = bus.subscribe(EventFilter::all());
                let delivered = delivered.clone();
                let all_delivered = all_delivered.clone();
                rt.spawn(async move {
                    while subscription.recv().await.is_some() {
                        if delivered.fetch_add(1, Ordering::AcqRel) + 1 == subscribers {
                            all_delivered.notify_one();
                        }
                    }
                })
            })
            .collect();
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.to_async(&rt).iter(|| {
                    let bus = bus.clone();
                    let delivered = delivered.clone();
                    let all_delivered = all_delivered.clone();
                    async move {
                        delivered.store(0, Ordering::Release);
                        let notified = all_delivered.notified();
                        bus.publish(
                            None,
                            EventData::ProviderRecovered(ProviderRecovered {
                                provider: "bench".into(),
                            }),
                        );
                        notified.await;
                    }
                })
            },
        );
        for task in tasks {
            task.abort();
        }
    }
    group.finish();
}

criterion_group!(benches, round_trip, casts, restart, fanout);
criterion_main!(benches);
