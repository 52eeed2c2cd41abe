//! Kernel benchmarks: message round trips, casts, restart latency, event fan-out.
//!
//! Run with: cargo bench -p troupe-actors --bench kernel
//!
//! Every timed loop runs inside a task on the benchmark's runtime (two workers, like the node's
//! small machines), as the node's own callers do (HTTP handlers, other actors). Timing from the
//! bench's main thread instead would add two OS thread wake-ups to every round trip, and would
//! measure those rather than the code.
//!
//! - `round_trip/*`: one request and its reply, to a supervised actor through its handle and,
//!   as the baseline in the same run, to a task over a raw tokio mpsc channel with a oneshot
//!   reply. The ratio of the medians is printed after criterion's report (target: the actor
//!   reaches ≥ 50 % of the raw channel's throughput). `bare_ractor_actor` is the same echo as a
//!   plain ractor actor (ractor's mailbox and loop alone): the floor the kernel builds on.
//!   `supervised_actor_without_deadline` sends the same request through the handle but awaits
//!   the reply without `call`'s deadline, to show what the deadline costs. Then, outside
//!   criterion, the raw channel and the actor alternate in blocks of 2,000 calls inside one task
//!   (ABBA order), and the ratio of their medians is printed: criterion runs scenarios seconds
//!   apart, and this kind of VM drifts by ±20 % between them.
//! - `casts/*`: a burst of 1,000 one-way messages followed by one request (external sender
//!   throughput), with the same baseline and printed ratio.
//! - `restart/*`: a supervised child panics in its handler and a request sent right after the
//!   fault is answered by the next instance. Two figures per restart are printed after
//!   criterion's report: panic → the next instance handling a message (the instant the handler
//!   panicked to the instant the next instance's handler was entered: the design's measure,
//!   target p99 < 20 µs), and fault sent → the answer back in the caller (that plus the
//!   fault's delivery and the reply's wake-up of the caller, which is what criterion's mean
//!   is of). `in_place`: one_for_one
//!   without backoff, where the child restarts inside its own actor; `respawn`: one_for_all (the
//!   child alone in its group), where the supervisor starts a new ractor actor. Both run with the
//!   WARN line formatted by a real `tracing` subscriber (into a sink) and `actor.restarted`
//!   published on a bus with a subscriber draining it. Both restart back to back, so a
//!   restart's WARN line and event overlap the next restart; `in_place_isolated` waits (untimed)
//!   for each restart's event before the next fault, as when restarts are rare.
//!   `no_fault_baseline` is the same loop and child without the fault: each request is a plain
//!   call, so its tail is what the runtime's scheduling alone costs a round trip in this loop.
//! - `fanout/N`: one event published, delivered to N subscribers (each a task).
//!
//! Intended panics go through a silent panic hook, so the numbers measure the kernel, not
//! stderr or backtrace capture.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ractor::RpcReplyPort;
use tokio::runtime::Runtime;
use tokio::sync::{Notify, mpsc, oneshot};

use troupe_actors::event::{
    BusShared, EventBus, EventBusActor, EventBusArgs, EventBusConfig, EventData, EventFilter,
    EventKind, KindPattern, ProviderRecovered,
};
use troupe_actors::ids::{ActorPath, NodeId};
use troupe_actors::kernel::{self, Actor, ActorError, ActorHandle, Context};
use troupe_actors::supervisor::{
    Backoff, ChildSpec, RestartIntensity, Strategy, Supervisor, SupervisorArgs, SupervisorConfig,
};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

struct Echo;

enum EchoMsg {
    Ask(u64, RpcReplyPort<u64>),
    Tell(u64),
    /// Panics inside the handler, as a real crash does, after noting when in [`CRASHED_AT`].
    Crash,
    /// Answers with the instant its handler was entered.
    AskWhen(RpcReplyPort<Instant>),
}

/// When the last `EchoMsg::Crash` panicked.
static CRASHED_AT: Mutex<Option<Instant>> = Mutex::new(None);

/// The handlers' shared behaviour, so the kernel's actor and the bare ractor one echo alike.
fn echo(message: EchoMsg, total: &mut u64) {
    match message {
        EchoMsg::Ask(value, reply) => {
            let _ = reply.send(value + *total);
        }
        EchoMsg::Tell(value) => *total = total.wrapping_add(value),
        EchoMsg::Crash => {
            *CRASHED_AT.lock().unwrap() = Some(Instant::now());
            panic!("bench: the child crashes");
        }
        EchoMsg::AskWhen(reply) => {
            let _ = reply.send(Instant::now());
        }
    }
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
        echo(message, total);
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
async fn supervised_echo(strategy: Strategy, events: Option<EventBus>) -> ActorHandle<EchoMsg> {
    let path = ActorPath::root().child("bench");
    let handle = ActorHandle::new(path.child("echo"));
    let spec = ChildSpec::worker(&handle, || (Echo, ()));
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                strategy,
                backoff: Backoff::NONE,
                intensity: RestartIntensity {
                    max_restarts: u32::MAX,
                    window: Duration::from_secs(1),
                },
                ..SupervisorConfig::default()
            },
            children: vec![spec],
            events,
            ..SupervisorArgs::default()
        },
        &ActorHandle::new(path),
    )
    .await
    .unwrap();
    handle
}

type RawRequest = (u64, oneshot::Sender<u64>);

/// The same echo as a bare ractor actor: ractor's own mailbox and loop, no handle, envelope,
/// counters or supervision. What the kernel adds is the gap between this and the handle.
struct BareEcho;

impl ractor::Actor for BareEcho {
    type Msg = EchoMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<EchoMsg>,
        _args: (),
    ) -> Result<u64, ractor::ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        _myself: ractor::ActorRef<EchoMsg>,
        message: EchoMsg,
        total: &mut u64,
    ) -> Result<(), ractor::ActorProcessingErr> {
        echo(message, total);
        Ok(())
    }
}

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

/// Per-operation times of one scenario, one entry per criterion sample.
#[derive(Clone, Default)]
struct PerOp(Arc<Mutex<Vec<Duration>>>);

impl PerOp {
    fn median(&self) -> Option<Duration> {
        let mut all = self.0.lock().unwrap().clone();
        all.sort();
        (!all.is_empty()).then(|| all[all.len() / 2])
    }
}

/// Runs `iters` operations in one task on `rt` and returns their total time; records the time
/// per operation (of `ops_per_iter` each) in `per_op`.
fn timed_in_task<F, Fut>(
    rt: &Runtime,
    iters: u64,
    ops_per_iter: u64,
    per_op: &PerOp,
    routine: F,
) -> Duration
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = u64> + Send,
{
    let took = rt.block_on(async move {
        tokio::spawn(async move {
            let started = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(routine().await);
            }
            started.elapsed()
        })
        .await
        .unwrap()
    });
    let ops = (iters * ops_per_iter).max(1);
    per_op
        .0
        .lock()
        .unwrap()
        .push(took / u32::try_from(ops).unwrap_or(u32::MAX));
    took
}

fn print_ratio(scenario: &str, raw: &PerOp, actor: &PerOp, target: &str) {
    if let (Some(raw), Some(actor)) = (raw.median(), actor.median()) {
        println!(
            "{scenario}: raw channel {raw:?} per message, supervised actor {actor:?} per message: \
             the actor reaches {:.0} % of the raw throughput ({target})",
            100.0 * raw.as_secs_f64() / actor.as_secs_f64()
        );
    }
}

fn round_trip(c: &mut Criterion) {
    let rt = runtime();
    let handle = rt.block_on(supervised_echo(Strategy::OneForOne, None));
    let raw = rt.block_on(async { raw_echo() });
    let (raw_times, actor_times) = (PerOp::default(), PerOp::default());
    let mut group = c.benchmark_group("round_trip");
    group.throughput(Throughput::Elements(1));
    group.bench_function("tokio_mpsc", |b| {
        b.iter_custom(|iters| {
            let raw = raw.clone();
            timed_in_task(&rt, iters, 1, &raw_times, move || {
                let raw = raw.clone();
                async move {
                    let (tx, rx) = oneshot::channel();
                    raw.send((7, tx)).unwrap();
                    rx.await.unwrap()
                }
            })
        })
    });
    group.bench_function("supervised_actor", |b| {
        b.iter_custom(|iters| {
            let handle = handle.clone();
            timed_in_task(&rt, iters, 1, &actor_times, move || {
                let handle = handle.clone();
                async move {
                    handle
                        .call(|reply| EchoMsg::Ask(7, reply), CALL_TIMEOUT)
                        .await
                        .unwrap()
                }
            })
        })
    });
    let bare = rt.block_on(async { ractor::Actor::spawn(None, BareEcho, ()).await.unwrap().0 });
    let bare_times = PerOp::default();
    group.bench_function("bare_ractor_actor", |b| {
        b.iter_custom(|iters| {
            let bare = bare.clone();
            timed_in_task(&rt, iters, 1, &bare_times, move || {
                let bare = bare.clone();
                async move {
                    let (tx, rx) = ractor::concurrency::oneshot();
                    bare.send_message(EchoMsg::Ask(7, tx.into())).unwrap();
                    rx.await.unwrap()
                }
            })
        })
    });
    let untimed_times = PerOp::default();
    group.bench_function("supervised_actor_without_deadline", |b| {
        b.iter_custom(|iters| {
            let handle = handle.clone();
            timed_in_task(&rt, iters, 1, &untimed_times, move || {
                let handle = handle.clone();
                async move {
                    let (tx, rx) = ractor::concurrency::oneshot();
                    assert!(handle.cast(EchoMsg::Ask(7, tx.into())).is_ok());
                    rx.await.unwrap()
                }
            })
        })
    });
    group.finish();
    print_ratio("round trip", &raw_times, &actor_times, "target ≥ 50 %");
    print_ratio(
        "round trip, bare ractor actor (ractor's own floor)",
        &raw_times,
        &bare_times,
        "for comparison",
    );
    print_ratio(
        "round trip without deadline",
        &raw_times,
        &untimed_times,
        "for comparison",
    );
    interleaved_round_trips(&rt, raw, handle);
}

/// The round trip once more, with the raw channel and the actor in alternating blocks inside one
/// task (in ABBA order), so that both meet the machine in the same state: criterion runs the
/// two scenarios seconds apart, and this VM's speed drifts between them. Prints the medians of
/// the per-block times and the ratio of those medians, with the spread of the per-round ratios.
fn interleaved_round_trips(
    rt: &Runtime,
    raw: mpsc::UnboundedSender<RawRequest>,
    handle: ActorHandle<EchoMsg>,
) {
    const BLOCK: u32 = 2_000;
    const ROUNDS: usize = 400;
    let (raws, actors) = rt.block_on(async move {
        tokio::spawn(async move {
            let raw_block = || {
                let raw = raw.clone();
                async move {
                    let started = Instant::now();
                    for _ in 0..BLOCK {
                        let (tx, rx) = oneshot::channel();
                        raw.send((7, tx)).unwrap();
                        std::hint::black_box(rx.await.unwrap());
                    }
                    started.elapsed() / BLOCK
                }
            };
            let actor_block = || {
                let handle = handle.clone();
                async move {
                    let started = Instant::now();
                    for _ in 0..BLOCK {
                        let answer = handle
                            .call(|reply| EchoMsg::Ask(7, reply), CALL_TIMEOUT)
                            .await
                            .unwrap();
                        std::hint::black_box(answer);
                    }
                    started.elapsed() / BLOCK
                }
            };
            let (mut raws, mut actors) = (Vec::new(), Vec::new());
            for round in 0..ROUNDS {
                if round % 2 == 0 {
                    raws.push(raw_block().await);
                    actors.push(actor_block().await);
                } else {
                    actors.push(actor_block().await);
                    raws.push(raw_block().await);
                }
            }
            (raws, actors)
        })
        .await
        .unwrap()
    });
    let mut ratios: Vec<f64> = raws
        .iter()
        .zip(&actors)
        .map(|(raw, actor)| raw.as_secs_f64() / actor.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = |mut times: Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (raw, actor) = (median(raws), median(actors));
    println!(
        "round trip, interleaved ({ROUNDS} rounds of {BLOCK} calls each way): raw channel \
         {raw:?}, supervised actor {actor:?} per message: the actor reaches {:.0} % of the raw \
         throughput (per-round ratio p10 {:.0} %, p90 {:.0} %; target ≥ 50 %)",
        100.0 * raw.as_secs_f64() / actor.as_secs_f64(),
        100.0 * ratios[ratios.len() / 10],
        100.0 * ratios[ratios.len() * 9 / 10],
    );
}

fn casts(c: &mut Criterion) {
    const BURST: u64 = 1_000;
    let rt = runtime();
    let handle = rt.block_on(supervised_echo(Strategy::OneForOne, None));
    let raw = rt.block_on(async { raw_echo() });
    let (raw_tell, mut raw_told) = mpsc::unbounded_channel::<u64>();
    let raw_sink = rt.spawn(async move {
        let mut total = 0u64;
        while let Some(value) = raw_told.recv().await {
            total = total.wrapping_add(value);
        }
        total
    });
    let (raw_times, actor_times) = (PerOp::default(), PerOp::default());
    let mut group = c.benchmark_group("casts");
    group.throughput(Throughput::Elements(BURST));
    group.bench_function("tokio_mpsc", |b| {
        b.iter_custom(|iters| {
            let raw = raw.clone();
            let raw_tell = raw_tell.clone();
            timed_in_task(&rt, iters, BURST, &raw_times, move || {
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
        })
    });
    group.bench_function("supervised_actor", |b| {
        b.iter_custom(|iters| {
            let handle = handle.clone();
            timed_in_task(&rt, iters, BURST, &actor_times, move || {
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
        })
    });
    group.finish();
    drop(raw_tell);
    let _ = rt.block_on(raw_sink);
    print_ratio("casts", &raw_times, &actor_times, "no target set");
}

/// Prints p50/p99/max of `samples`, when there are any.
fn print_percentiles(scenario: &str, what: &str, samples: &Mutex<Vec<Duration>>, target: &str) {
    let mut all = samples.lock().unwrap().clone();
    all.sort();
    if let Some(max) = all.last() {
        println!(
            "{scenario} latency over {} {what}: p50 {:?}, p99 {:?}, max {max:?}{target}",
            all.len(),
            percentile(&all, 0.50),
            percentile(&all, 0.99),
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A bus with one subscriber that drains everything, as the node's event log does.
fn draining_bus(rt: &Runtime) -> EventBus {
    rt.block_on(async {
        let shared = BusShared::new(NodeId::new("bench").unwrap(), EventBusConfig::default());
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
        let bus = EventBus::new(handle, shared);
        let mut subscription = bus.subscribe(EventFilter::all());
        tokio::spawn(async move { while subscription.recv().await.is_some() {} });
        bus
    })
}

fn restart(c: &mut Criterion) {
    // The restart's WARN line is formatted for real (into a sink), as a node's log would.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::WARN)
            .with_writer(std::io::sink)
            .finish(),
    );
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let rt = runtime();
    let mut group = c.benchmark_group("restart");
    for (name, strategy, isolated, fault) in [
        ("in_place", Strategy::OneForOne, false, true),
        ("respawn", Strategy::OneForAll, false, true),
        ("in_place_isolated", Strategy::OneForOne, true, true),
        ("no_fault_baseline", Strategy::OneForOne, false, false),
    ] {
        let bus = draining_bus(&rt);
        let handle = rt.block_on(supervised_echo(strategy, Some(bus.clone())));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let recovered = Arc::new(Mutex::new(Vec::new()));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let samples = samples.clone();
                let recovered = recovered.clone();
                let handle = handle.clone();
                let mut announced = (isolated && fault).then(|| {
                    bus.subscribe(EventFilter {
                        kinds: vec![KindPattern::Exact(EventKind::ActorRestarted)],
                        ..EventFilter::all()
                    })
                });
                rt.block_on(async move {
                    tokio::spawn(async move {
                        let mut total = Duration::ZERO;
                        let mut taken = Vec::with_capacity(iters as usize);
                        let mut back = Vec::with_capacity(iters as usize);
                        for _ in 0..iters {
                            let started = Instant::now();
                            if fault {
                                assert!(handle.cast(EchoMsg::Crash).is_ok());
                            }
                            let entered =
                                handle.call(EchoMsg::AskWhen, CALL_TIMEOUT).await.unwrap();
                            let took = started.elapsed();
                            total += took;
                            taken.push(took);
                            if fault {
                                let crashed = CRASHED_AT.lock().unwrap().take();
                                let crashed = crashed.expect("the child crashed before answering");
                                back.push(entered.saturating_duration_since(crashed));
                            }
                            if let Some(announced) = &mut announced {
                                // Untimed: the restart's WARN line and event are done before
                                // the next fault, as when restarts are rare.
                                assert!(announced.recv().await.is_some());
                            }
                        }
                        samples.lock().unwrap().extend(taken);
                        recovered.lock().unwrap().extend(back);
                        total
                    })
                    .await
                    .unwrap()
                })
            })
        });
        let (what, target) = if fault {
            ("restarts, fault sent → the answer back in the caller", "")
        } else {
            ("calls without a fault, the baseline", "")
        };
        print_percentiles(&format!("restart/{name}"), what, &samples, target);
        print_percentiles(
            &format!("restart/{name}"),
            "restarts, panic → the next instance handling a message",
            &recovered,
            " (target: p99 < 20 µs)",
        );
    }
    group.finish();
    std::panic::set_hook(previous);
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
