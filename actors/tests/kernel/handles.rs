//! Delivery through restart-surviving handles: nothing sent is silently lost, order per sender
//! holds across restarts, and undeliverable messages come back to the sender.
//!
//! The delivery tests run against both restart paths. In place (one_for_one, no backoff) the
//! child keeps its mailbox, so per-sender order is strict. A respawn (here one_for_all, the
//! child alone in its group) hands the dying mailbox's messages back for redelivery, where a
//! send that raced with the crash may come after later ones: at most one per crash.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::RpcReplyPort;

use troupe_actors::ids::ActorPath;
use troupe_actors::kernel::{
    self, Actor, ActorError, ActorHandle, CallError, Context, FaultKind, HandleStatus,
    SendErrorKind,
};
use troupe_actors::supervisor::{
    Backoff, ChildSpec, RestartIntensity, Strategy, Supervisor, SupervisorArgs, SupervisorConfig,
    SupervisorHandle,
};

use crate::support::*;

/// Records every sequence number it handles, across all its instances.
struct Counter;

enum CounterMsg {
    Seq(u64),
    Echo(u64, RpcReplyPort<u64>),
    Poison(u64),
    /// Stops the instance normally (`Context::stop`); a permanent child is started again.
    Stop,
}

type Seen = Arc<Mutex<Vec<u64>>>;

impl Actor for Counter {
    type Msg = CounterMsg;
    type State = Seen;
    type Arguments = Seen;

    async fn pre_start(&self, _ctx: &Context<CounterMsg>, seen: Seen) -> Result<Seen, ActorError> {
        Ok(seen)
    }

    async fn handle(
        &self,
        ctx: &Context<CounterMsg>,
        message: CounterMsg,
        seen: &mut Seen,
    ) -> Result<(), ActorError> {
        match message {
            CounterMsg::Stop => ctx.stop(None),
            CounterMsg::Seq(seq) => seen.lock().unwrap().push(seq),
            CounterMsg::Echo(value, reply) => {
                let _ = reply.send(value);
            }
            CounterMsg::Poison(seq) => panic!("poison message {seq}"),
        }
        Ok(())
    }
}

/// How the supervised counter is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// one_for_one without backoff: the child restarts inside its own actor.
    InPlace,
    /// one_for_all with the child alone in its group: a new ractor actor each time.
    Respawn,
}

async fn supervised_counter(
    backlog: usize,
    path_kind: Path,
) -> (ActorHandle<CounterMsg>, Seen, SupervisorHandle) {
    quiet_intended_panics();
    let seen = Seen::default();
    let path = ActorPath::root().child("sup");
    let handle = ActorHandle::with_backlog(path.child("counter"), backlog);
    let spec = ChildSpec::worker(&handle, {
        let seen = seen.clone();
        move || (Counter, seen.clone())
    });
    let supervisor = ActorHandle::new(path);
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                strategy: match path_kind {
                    Path::InPlace => Strategy::OneForOne,
                    Path::Respawn => Strategy::OneForAll,
                },
                backoff: Backoff::NONE,
                intensity: RestartIntensity {
                    max_restarts: u32::MAX,
                    window: Duration::from_secs(60),
                },
                ..SupervisorConfig::default()
            },
            children: vec![spec],
            ..SupervisorArgs::default()
        },
        &supervisor,
    )
    .await
    .unwrap();
    (handle, seen, supervisor)
}

async fn wait_until_running_again(handle: &ActorHandle<CounterMsg>, after_generation: u64) {
    let mut status = handle.watch_status();
    tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|status| {
            matches!(status, HandleStatus::Running { generation } if *generation > after_generation)
        }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no restart past generation {after_generation} within 30 s; the handle is {:?}, \
             its counters {:?}",
            *handle.watch_status().borrow(),
            handle.stats().snapshot()
        )
    })
    .unwrap();
}

/// Every accepted message handled exactly once, in send order — except that a send racing with
/// a crash (admitted by the dying mailbox just before it closed) may arrive after later ones: at
/// most one such message per crash.
fn assert_in_order_but_for_crash_races(seen: &[u64], accepted: &[u64], crashes: u64) {
    let mut sorted = seen.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        sorted.len(),
        accepted.len(),
        "every accepted message handled once"
    );
    assert_eq!(
        sorted, accepted,
        "exactly the accepted messages, none lost, none twice"
    );
    let late = seen.windows(2).filter(|pair| pair[1] < pair[0]).count() as u64;
    assert!(
        late <= crashes,
        "{late} out-of-order deliveries for {crashes} crashes: order broke beyond crash races"
    );
}

fn generation(handle: &ActorHandle<CounterMsg>) -> u64 {
    match handle.status() {
        HandleStatus::Running { generation } => generation,
        _ => 0,
    }
}

/// What one run of the acceptance scenario saw.
struct Chaos {
    seen: Vec<u64>,
    accepted: Vec<u64>,
    returned: Vec<u64>,
    answered: u64,
    restarts: u64,
}

/// The acceptance scenario: `restarts` restarts while one task casts numbered messages
/// and another keeps calling, every message accounted for.
async fn restarts_while_sending(path_kind: Path, restarts: u64) -> Chaos {
    let (handle, seen, supervisor) = supervised_counter(usize::MAX, path_kind).await;
    let chaos_done = Arc::new(AtomicBool::new(false));

    let sender = tokio::spawn({
        let handle = handle.clone();
        let chaos_done = chaos_done.clone();
        async move {
            let mut accepted = Vec::new();
            let mut returned = Vec::new();
            let mut seq = 0u64;
            while !chaos_done.load(Ordering::Relaxed) && seq < 5_000_000 {
                match handle.cast(CounterMsg::Seq(seq)) {
                    Ok(()) => accepted.push(seq),
                    Err(error) => match error.into_message() {
                        CounterMsg::Seq(back) => returned.push(back),
                        _ => unreachable!(),
                    },
                }
                seq += 1;
                if seq.is_multiple_of(64) {
                    // Keep the mailbox realistic: a crash hands back everything queued.
                    while handle.stats().snapshot().mailbox_depth() > 256
                        && !chaos_done.load(Ordering::Relaxed)
                    {
                        tokio::task::yield_now().await;
                    }
                    tokio::task::yield_now().await;
                }
            }
            (accepted, returned)
        }
    });

    let caller = tokio::spawn({
        let handle = handle.clone();
        let chaos_done = chaos_done.clone();
        async move {
            let mut answered = 0u64;
            while !chaos_done.load(Ordering::Relaxed) {
                let value = answered;
                let reply = handle
                    .call(
                        |port| CounterMsg::Echo(value, port),
                        Duration::from_secs(30),
                    )
                    .await;
                assert_eq!(reply, Ok(value), "a call during restarts must be answered");
                answered += 1;
            }
            answered
        }
    });

    for _ in 0..restarts {
        let before = generation(&handle);
        assert!(
            handle.inject_fault(FaultKind::Panic),
            "instance {before} is running"
        );
        wait_until_running_again(&handle, before).await;
    }
    chaos_done.store(true, Ordering::Relaxed);
    let (accepted, returned) = sender.await.unwrap();
    let answered = caller.await.unwrap();

    // Everything accepted is eventually handled.
    tokio::time::timeout(Duration::from_secs(30), async {
        while seen.lock().unwrap().len() < accepted.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every accepted message is handled");
    // The supervisor handles one message at a time: once it answers this, it has finished
    // accounting for the last restart (a respawn is counted after its instance is bound).
    let children = supervisor.children().await.unwrap();
    assert_eq!(children[0].restarts, handle.stats().snapshot().restarts);

    let seen = seen.lock().unwrap().clone();
    Chaos {
        seen,
        accepted,
        returned,
        answered,
        restarts: handle.stats().snapshot().restarts,
    }
}

const RESTARTS: u64 = 2_000;

/// In place, the mailbox survives the crash: every accepted message is handled exactly once and
/// strictly in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_restarts_in_place_lose_no_message_and_keep_strict_send_order() {
    let chaos = restarts_while_sending(Path::InPlace, RESTARTS).await;
    assert_eq!(
        chaos.seen.len(),
        chaos.accepted.len(),
        "no loss, no duplicate"
    );
    assert_eq!(
        chaos.seen, chaos.accepted,
        "handled exactly the accepted messages, in send order"
    );
    assert!(
        chaos.returned.is_empty(),
        "an unbounded backlog never refuses"
    );
    assert_eq!(chaos.restarts, RESTARTS);
    assert!(
        chaos.accepted.len() > RESTARTS as usize,
        "the sender ran during the restarts"
    );
    assert!(chaos.answered > 0);
}

/// Respawned, the dying mailbox hands its messages back: every accepted message is handled
/// exactly once, in send order except for sends that raced with a crash (at most one each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_respawns_lose_no_message_and_keep_order_but_for_crash_races() {
    let chaos = restarts_while_sending(Path::Respawn, RESTARTS).await;
    assert_in_order_but_for_crash_races(&chaos.seen, &chaos.accepted, RESTARTS);
    assert!(
        chaos.returned.is_empty(),
        "an unbounded backlog never refuses"
    );
    assert_eq!(chaos.restarts, RESTARTS);
    assert!(
        chaos.accepted.len() > RESTARTS as usize,
        "the sender ran during the restarts"
    );
    assert!(chaos.answered > 0);
}

/// A child that stops itself and is started again gets what was queued behind the stop, and
/// what was sent while it restarted, in send order: the stopped instance's mailbox hands its
/// messages back when it stops, not when the supervisor is done with the exit (by then the
/// next instance may have had messages sent later). One sender on the other worker keeps
/// sending through 20 stops. As with a crash, a send that races with the mailbox closing may
/// still come late, at most one per stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_behind_a_stop_reach_the_next_instance_in_send_order() {
    const STOPS: u64 = 20;
    let (handle, seen, _supervisor) = supervised_counter(usize::MAX, Path::InPlace).await;
    let sender = tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut next = 0u64;
            for _ in 0..STOPS {
                let before = generation(&handle);
                let mut status = handle.watch_status();
                handle.cast(CounterMsg::Stop).unwrap();
                // Through the stop and the restart (bounded: the actor must keep up), one
                // scheduling round per 64 messages.
                for _ in 0..5_000 {
                    handle.cast(CounterMsg::Seq(next)).unwrap();
                    next += 1;
                    if next.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                tokio::time::timeout(
                    Duration::from_secs(30),
                    status.wait_for(|status| {
                        matches!(status, HandleStatus::Running { generation } if *generation > before)
                    }),
                )
                .await
                .expect("the child restarts after its stop")
                .unwrap();
                // And a little after.
                for _ in 0..200 {
                    handle.cast(CounterMsg::Seq(next)).unwrap();
                    next += 1;
                }
            }
            next
        }
    });
    let sent = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("the sender finished")
        .unwrap();
    assert_eq!(
        handle
            .call(|port| CounterMsg::Echo(0, port), Duration::from_secs(30))
            .await,
        Ok(0)
    );
    let seen = seen.lock().unwrap().clone();
    // Before the fix every message queued behind a stop could come late: hundreds per stop.
    assert_in_order_but_for_crash_races(&seen, &(0..sent).collect::<Vec<_>>(), STOPS);
}

/// Sends 20,000 messages, every hundredth a poison; returns what was handled, what was
/// accepted (the non-poison ones) and the number of poisons.
async fn poison_run(path_kind: Path) -> (Vec<u64>, Vec<u64>, u64, ActorHandle<CounterMsg>) {
    let (handle, seen, _supervisor) = supervised_counter(usize::MAX, path_kind).await;
    let mut poisoned = HashSet::new();
    let mut accepted = Vec::new();
    for seq in 0..20_000u64 {
        let message = if seq % 100 == 99 {
            poisoned.insert(seq);
            CounterMsg::Poison(seq)
        } else {
            accepted.push(seq);
            CounterMsg::Seq(seq)
        };
        assert!(handle.cast(message).is_ok());
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while seen.lock().unwrap().len() < accepted.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every non-poison message is handled");
    // The last message sent is a poison: its restart can come after every other message.
    wait_until_running_again(&handle, poisoned.len() as u64).await;
    let seen = seen.lock().unwrap().clone();
    (seen, accepted, poisoned.len() as u64, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_consumed_and_the_rest_are_handled_in_order_in_place() {
    let (seen, accepted, poisons, handle) = poison_run(Path::InPlace).await;
    assert_eq!(
        seen, accepted,
        "strict order: the mailbox survived every crash"
    );
    assert_eq!(handle.stats().snapshot().restarts, poisons);
    assert_eq!(
        handle.stats().snapshot().mailbox_depth(),
        0,
        "a handler that panicked counts as handled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_consumed_and_the_rest_are_redelivered_after_a_respawn() {
    let (seen, accepted, poisons, handle) = poison_run(Path::Respawn).await;
    assert_in_order_but_for_crash_races(&seen, &accepted, poisons);
    assert_eq!(
        handle.stats().snapshot().mailbox_depth(),
        0,
        "a handler that panicked counts as handled"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_full_restart_backlog_hands_the_message_back() {
    quiet_intended_panics();
    let log = Log::default();
    let path = ActorPath::root().child("sup");
    let handle = ActorHandle::with_backlog(path.child("a"), 2);
    let args = ProbeArgs::new("a", &log);
    let spec = ChildSpec::worker(&handle, move || (Probe, args.clone()));
    let supervisor: SupervisorHandle = ActorHandle::new(path);
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                backoff: Backoff {
                    min: Duration::from_secs(10),
                    max: Duration::from_secs(10),
                },
                ..SupervisorConfig::default()
            },
            children: vec![spec],
            ..SupervisorArgs::default()
        },
        &supervisor,
    )
    .await
    .unwrap();
    handle.cast(ProbeMsg::Panic).unwrap();
    let mut status = handle.watch_status();
    status
        .wait_for(|status| *status == HandleStatus::Restarting)
        .await
        .unwrap();

    let (first, second) = (
        tokio::spawn({
            let handle = handle.clone();
            async move { handle.call(ProbeMsg::Ping, Duration::from_secs(60)).await }
        }),
        tokio::spawn({
            let handle = handle.clone();
            async move { handle.call(ProbeMsg::Ping, Duration::from_secs(60)).await }
        }),
    );
    tokio::task::yield_now().await;
    let refused = handle.cast(ProbeMsg::StopNormally).unwrap_err();
    assert_eq!(refused.kind, SendErrorKind::RestartBacklogFull);
    assert!(matches!(refused.into_message(), ProbeMsg::StopNormally));
    let third = handle.call(ProbeMsg::Ping, Duration::from_secs(60)).await;
    assert!(matches!(third, Err(CallError::Backlogged { .. })));

    // The buffered calls reach the new instance once the backoff has passed.
    assert_eq!(first.await.unwrap(), Ok(2));
    assert_eq!(second.await.unwrap(), Ok(2));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_call_to_a_stopped_actor_fails_fast_with_a_typed_error() {
    let log = Log::default();
    let handle = ActorHandle::new(ActorPath::root().child("lonely"));
    let (cell, _) = kernel::spawn(Probe, ProbeArgs::new("lonely", &log), &handle)
        .await
        .unwrap();
    assert_eq!(ping(&handle).await, 1);
    cell.stop_and_wait(None, None).await.unwrap();
    // Unsupervised: nobody marks it stopped, so the call times out rather than hanging.
    let answer = handle.call(ProbeMsg::Ping, Duration::from_secs(1)).await;
    assert!(
        matches!(answer, Err(CallError::Timeout { .. })),
        "{answer:?}"
    );
}
