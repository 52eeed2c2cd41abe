//! Supervisor behaviour: restarts with backoff, strategies, escalation, ordered shutdown,
//! failed restarts, dynamic children.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::ActorCell;
use tracing::Level;

use troupe_actors::event::{EventBus, EventBusConfig, EventData};
use troupe_actors::ids::ActorPath;
use troupe_actors::kernel::{self, ActorHandle, CallError, FaultKind, HandleStatus, SendErrorKind};
use troupe_actors::supervisor::{
    self, Backoff, ChildPolicy, ChildSpec, RestartIntensity, Shutdown, StartChildError, Strategy,
    Supervisor, SupervisorArgs, SupervisorConfig, SupervisorHandle,
};

use crate::support::*;

const MS: Duration = Duration::from_millis(1);

struct Tree {
    supervisor: SupervisorHandle,
    cell: ActorCell,
    children: Vec<ActorHandle<ProbeMsg>>,
    args: Vec<ProbeArgs>,
    bus: EventBus,
    log: Log,
}

fn probe_spec(parent: &ActorPath, args: &ProbeArgs) -> (ChildSpec, ActorHandle<ProbeMsg>) {
    let handle = ActorHandle::new(parent.child(args.name));
    let args = args.clone();
    let spec = ChildSpec::worker(&handle, move || (Probe, args.clone()));
    (spec, handle)
}

async fn tree(strategy: Strategy, names: &[&'static str], config: SupervisorConfig) -> Tree {
    let log = Log::default();
    let bus = start_bus(EventBusConfig::default()).await;
    let path = ActorPath::root().child("sup");
    let mut specs = Vec::new();
    let mut children = Vec::new();
    let mut args = Vec::new();
    for name in names {
        let probe = ProbeArgs::new(name, &log);
        let (spec, handle) = probe_spec(&path, &probe);
        specs.push(spec);
        children.push(handle);
        args.push(probe);
    }
    let supervisor = ActorHandle::new(path);
    let (cell, _join) = kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                strategy,
                jitter_seed: Some(7),
                ..config
            },
            children: specs,
            events: Some(bus.clone()),
            directory: None,
        },
        &supervisor,
    )
    .await
    .expect("supervisor starts");
    Tree {
        supervisor,
        cell,
        children,
        args,
        bus,
        log,
    }
}

fn backoff(min_ms: u64, max_ms: u64) -> SupervisorConfig {
    SupervisorConfig {
        backoff: Backoff {
            min: MS * min_ms as u32,
            max: MS * max_ms as u32,
        },
        ..SupervisorConfig::default()
    }
}

fn restarted(data: &EventData) -> &troupe_actors::event::ActorRestarted {
    match data {
        EventData::ActorRestarted(restarted) => restarted,
        other => panic!("expected actor.restarted, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_panicking_child_is_restarted_after_its_backoff_and_siblings_are_untouched() {
    let (capture, _guard) = Capture::install();
    let tree = tree(Strategy::OneForOne, &["a", "b", "c"], backoff(100, 1_000)).await;
    let mut events = all_events(&tree.bus);
    let before = tokio::time::Instant::now();

    tree.children[1].cast(ProbeMsg::Panic).unwrap();
    let event = next_event(&mut events).await;
    let waited = before.elapsed();

    let restart = restarted(&event.data);
    assert_eq!(restart.supervisor.as_str(), "sup");
    assert_eq!(restart.child.as_str(), "sup/b");
    assert!(
        restart.reason.contains("b was told to panic"),
        "{}",
        restart.reason
    );
    assert_eq!(restart.restart_count, 1);
    assert_eq!(restart.restarts_in_window, 1);
    assert_eq!(
        restart.delay_ms, 100,
        "the first restart waits exactly backoff.min"
    );
    assert!(waited >= MS * 100 && waited < MS * 150, "waited {waited:?}");

    assert_eq!(ping(&tree.children[1]).await, 2, "b runs a second instance");
    assert_eq!(ping(&tree.children[0]).await, 1, "a untouched");
    assert_eq!(ping(&tree.children[2]).await, 1, "c untouched");
    assert_eq!(
        tree.log.lines(),
        ["a started", "b started", "c started", "b started"]
    );

    let warnings = capture.with_message(Level::WARN, "actor restarted");
    assert_eq!(warnings.len(), 1, "exactly one WARN line per restart");
    let fields = &warnings[0].fields;
    assert_eq!(fields["supervisor"], "sup");
    assert_eq!(fields["child"], "sup/b");
    assert!(fields["reason"].contains("b was told to panic"));
    assert_eq!(fields["restart_count"], "1");
    assert_eq!(fields["restarts_in_window"], "1");
    assert_eq!(fields["window_secs"], "60");
    assert!(
        events.try_recv().is_none(),
        "exactly one actor.restarted event"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn backoff_grows_with_consecutive_failures_of_the_same_child() {
    let tree = tree(Strategy::OneForOne, &["a"], backoff(100, 10_000)).await;
    let mut events = all_events(&tree.bus);
    let mut delays = Vec::new();
    for _ in 0..4 {
        tree.children[0].cast(ProbeMsg::Panic).unwrap();
        delays.push(restarted(&next_event(&mut events).await.data).delay_ms);
    }
    assert_eq!(delays[0], 100);
    for (step, delay) in delays.iter().enumerate().skip(1) {
        let top = 100 << step;
        assert!(
            (top / 2..=top).contains(delay),
            "restart {step}: {delay} ms not in [{}, {top}]",
            top / 2
        );
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn one_for_all_restarts_every_child_stopping_in_reverse_and_starting_in_order() {
    let tree = tree(Strategy::OneForAll, &["a", "b", "c"], backoff(10, 100)).await;
    let mut events = all_events(&tree.bus);
    tree.log.clear();

    tree.children[1].cast(ProbeMsg::Panic).unwrap();
    let mut children = Vec::new();
    for _ in 0..3 {
        let event = next_event(&mut events).await;
        children.push(restarted(&event.data).child.to_string());
    }
    assert_eq!(children, ["sup/a", "sup/b", "sup/c"]);
    assert_eq!(
        tree.log.lines(),
        [
            "c stopped",
            "a stopped",
            "a started",
            "b started",
            "c started"
        ],
        "b crashed (no post_stop); c and a stop in reverse order, all start in order"
    );
    for child in &tree.children {
        assert_eq!(ping(child).await, 2);
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    let tree = tree(
        Strategy::RestForOne,
        &["a", "b", "c", "d"],
        backoff(10, 100),
    )
    .await;
    let mut events = all_events(&tree.bus);
    tree.log.clear();

    tree.children[1].cast(ProbeMsg::Panic).unwrap();
    let mut children = Vec::new();
    for _ in 0..3 {
        children.push(
            restarted(&next_event(&mut events).await.data)
                .child
                .to_string(),
        );
    }
    assert_eq!(children, ["sup/b", "sup/c", "sup/d"]);
    assert_eq!(
        tree.log.lines(),
        [
            "d stopped",
            "c stopped",
            "b started",
            "c started",
            "d started"
        ]
    );
    assert_eq!(
        ping(&tree.children[0]).await,
        1,
        "a was started before b: untouched"
    );
    assert_eq!(ping(&tree.children[3]).await, 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn too_many_restarts_escalate_to_the_parent_which_restarts_the_subtree() {
    let (capture, _guard) = Capture::install();
    let log = Log::default();
    let bus = start_bus(EventBusConfig::default()).await;
    let outer_path = ActorPath::root().child("outer");
    let inner_path = outer_path.child("inner");
    let probe = ProbeArgs::new("x", &log);
    let (x_spec, x) = probe_spec(&inner_path, &probe);
    let inner: SupervisorHandle = ActorHandle::new(inner_path.clone());
    let inner_args = SupervisorArgs {
        config: SupervisorConfig {
            intensity: RestartIntensity {
                max_restarts: 2,
                window: Duration::from_secs(10),
            },
            backoff: Backoff::NONE,
            ..SupervisorConfig::default()
        },
        children: vec![x_spec],
        events: Some(bus.clone()),
        directory: None,
    };
    let outer: SupervisorHandle = ActorHandle::new(outer_path);
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                backoff: Backoff::NONE,
                ..SupervisorConfig::default()
            },
            children: vec![ChildSpec::supervisor(&inner, move || {
                (Supervisor, inner_args.clone())
            })],
            events: Some(bus.clone()),
            directory: None,
        },
        &outer,
    )
    .await
    .unwrap();
    let mut events = all_events(&bus);

    for expected_generation in 2..=3 {
        x.cast(ProbeMsg::Panic).unwrap();
        let event = next_event(&mut events).await;
        assert_eq!(restarted(&event.data).child.as_str(), "outer/inner/x");
        assert_eq!(ping(&x).await, expected_generation);
    }
    // The third failure inside the window is one too many for the inner supervisor.
    x.cast(ProbeMsg::Panic).unwrap();
    let escalated = next_event(&mut events).await;
    match &escalated.data {
        EventData::ActorEscalated(escalated) => {
            assert_eq!(escalated.supervisor.as_str(), "outer/inner");
            assert_eq!(escalated.child.as_str(), "outer/inner/x");
            assert_eq!(escalated.restarts_in_window, 3);
        }
        other => panic!("expected actor.escalated, got {other:?}"),
    }
    let restart = next_event(&mut events).await;
    let restart = restarted(&restart.data);
    assert_eq!(restart.supervisor.as_str(), "outer");
    assert_eq!(restart.child.as_str(), "outer/inner");
    assert!(restart.reason.contains("escalated"), "{}", restart.reason);

    assert_eq!(
        ping(&x).await,
        4,
        "the same handle reaches the instance started by the restarted inner supervisor"
    );
    assert_eq!(
        capture
            .with_message(
                Level::ERROR,
                "supervisor gives up after too many restarts; escalating to its parent"
            )
            .len(),
        1
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failing_pre_start_counts_as_a_failed_restart() {
    let (capture, _guard) = Capture::install();
    let tree = tree(Strategy::OneForOne, &["a"], backoff(100, 10_000)).await;
    let mut events = all_events(&tree.bus);
    tree.args[0].failing_starts.store(2, Ordering::SeqCst);
    let before = tokio::time::Instant::now();

    tree.children[0].cast(ProbeMsg::Panic).unwrap();
    let event = next_event(&mut events).await;
    let restart = restarted(&event.data);
    assert!(
        restart.reason.contains("restart failed in pre_start"),
        "{}",
        restart.reason
    );
    assert_eq!(
        restart.restarts_in_window, 3,
        "two failed starts and the panic"
    );
    assert!(
        before.elapsed() >= MS * 400,
        "waited {:?}: 100 ms, then at least 100 and 200 more",
        before.elapsed()
    );
    assert_eq!(
        tree.log.lines(),
        [
            "a started",
            "a failed to start",
            "a failed to start",
            "a started"
        ]
    );
    assert_eq!(
        capture
            .with_message(Level::WARN, "restart attempt failed; retrying")
            .len(),
        2
    );
    assert_eq!(
        capture.with_message(Level::WARN, "actor restarted").len(),
        1
    );
    assert_eq!(ping(&tree.children[0]).await, 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn failing_pre_starts_exhaust_the_intensity_and_escalate() {
    let config = SupervisorConfig {
        intensity: RestartIntensity {
            max_restarts: 2,
            window: Duration::from_secs(60),
        },
        ..backoff(10, 100)
    };
    let tree = tree(Strategy::OneForOne, &["a"], config).await;
    let mut events = all_events(&tree.bus);
    tree.args[0].failing_starts.store(10, Ordering::SeqCst);
    tree.children[0].cast(ProbeMsg::Panic).unwrap();
    let event = next_event(&mut events).await;
    assert!(
        matches!(event.data, EventData::ActorEscalated(_)),
        "{:?}",
        event.data
    );
    tree.cell.wait(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(
        tree.log.lines(),
        ["a started", "a failed to start", "a failed to start"]
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn stopping_a_supervisor_stops_children_gracefully_in_reverse_order() {
    let tree = tree(Strategy::OneForOne, &["a", "b", "c"], backoff(10, 100)).await;
    tree.log.clear();
    tree.cell.stop_and_wait(None, None).await.unwrap();
    assert_eq!(tree.log.lines(), ["c stopped", "b stopped", "a stopped"]);
}

/// A worker reads the kernel's own mailbox; a graceful stop still lets it handle everything
/// queued before the stop, then runs `post_stop` (without the drain request to that mailbox it
/// would be killed after its 5 s shutdown timeout, and "a stopped" would be missing).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_graceful_stop_handles_the_messages_queued_before_it() {
    let tree = tree(Strategy::OneForOne, &["a"], backoff(10, 100)).await;
    tree.log.clear();
    for _ in 0..3 {
        tree.children[0].cast(ProbeMsg::Fired).unwrap();
    }
    let before = tokio::time::Instant::now();
    tree.cell.stop_and_wait(None, None).await.unwrap();
    assert_eq!(
        tree.log.lines(),
        ["a fired", "a fired", "a fired", "a stopped"]
    );
    assert!(
        before.elapsed() < Duration::from_secs(5),
        "stopped by its drain, not killed at its shutdown timeout"
    );
}

/// A child started just before a sibling fails to start is stopped gracefully: its
/// `post_stop` runs (the drain sent right after its start must not overtake the start of its
/// mailbox loop).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_child_started_before_a_sibling_fails_to_start_is_stopped_gracefully() {
    let log = Log::default();
    let path = ActorPath::root().child("sup");
    let (a_spec, _a) = probe_spec(&path, &ProbeArgs::new("a", &log));
    let b_args = ProbeArgs::new("b", &log);
    b_args.failing_starts.store(1, Ordering::SeqCst);
    let (b_spec, _b) = probe_spec(&path, &b_args);
    let supervisor: SupervisorHandle = ActorHandle::new(path);
    let started = kernel::spawn(
        Supervisor,
        SupervisorArgs {
            children: vec![a_spec, b_spec],
            ..SupervisorArgs::default()
        },
        &supervisor,
    )
    .await;
    assert!(started.is_err(), "the tree cannot start without b");
    assert_eq!(log.lines(), ["a started", "b failed to start", "a stopped"]);
}

/// Busy time counts the time spent inside handlers, also when messages are handled back to
/// back in one run of the mailbox loop (they share clock reads), and it is counted as each
/// message ends, not when the run does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_time_counts_the_time_inside_handlers() {
    let tree = tree(Strategy::OneForOne, &["a"], backoff(10, 100)).await;
    let child = &tree.children[0];
    for _ in 0..3 {
        child
            .cast(ProbeMsg::Busy(Duration::from_millis(20)))
            .unwrap();
    }
    // The ping is answered from inside its handler, before it is itself counted; the three
    // busy messages before it are.
    ping(child).await;
    let stats = child.stats().snapshot();
    assert!(stats.busy >= Duration::from_millis(60), "{stats:?}");
    assert!(stats.processed >= 3, "{stats:?}");
}

/// A flooded worker yields to the other tasks of its runtime as any tokio task does (its
/// mailbox loop spends the cooperative budget per message): on a one-thread runtime, a task
/// spawned after a flood of 10,000 messages runs long before the flood is handled.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_flooded_worker_lets_other_tasks_run() {
    let tree = tree(Strategy::OneForOne, &["a"], backoff(10, 100)).await;
    tree.log.clear();
    for _ in 0..10_000 {
        tree.children[0].cast(ProbeMsg::Fired).unwrap();
    }
    let log = tree.log.clone();
    let handled_when_it_ran = tokio::spawn(async move { log.lines().len() })
        .await
        .unwrap();
    assert!(
        handled_when_it_ran < 1_000,
        "the other task waited for {handled_when_it_ran} messages"
    );
    ping(&tree.children[0]).await;
    assert_eq!(tree.log.lines().len(), 10_000);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_child_that_does_not_stop_in_time_is_killed() {
    quiet_intended_panics();
    let (capture, _guard) = Capture::install();
    let log = Log::default();
    let path = ActorPath::root().child("sup");
    let (slow_spec, slow) = probe_spec(&path, &ProbeArgs::new("slow", &log));
    let (quick_spec, _quick) = probe_spec(&path, &ProbeArgs::new("quick", &log));
    let supervisor: SupervisorHandle = ActorHandle::new(path);
    let (cell, _) = kernel::spawn(
        Supervisor,
        SupervisorArgs {
            children: vec![
                quick_spec,
                slow_spec.shutdown(Shutdown::Graceful(Duration::from_secs(1))),
            ],
            ..SupervisorArgs::default()
        },
        &supervisor,
    )
    .await
    .unwrap();
    slow.cast(ProbeMsg::Busy(Duration::from_secs(3600)))
        .unwrap();
    tokio::task::yield_now().await;
    log.clear();

    let before = tokio::time::Instant::now();
    cell.stop_and_wait(None, None).await.unwrap();
    let took = before.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(
        log.lines(),
        ["quick stopped"],
        "the slow child was killed: no post_stop"
    );
    let kills = capture.with_message(Level::WARN, "child did not stop in time; killing it");
    assert_eq!(kills.len(), 1);
    assert_eq!(kills[0].fields["child"], "sup/slow");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn dynamic_children_follow_their_policies_and_the_max_children_bound() {
    quiet_intended_panics();
    let log = Log::default();
    let path = ActorPath::root().child("dyn");
    let supervisor: SupervisorHandle = ActorHandle::new(path.clone());
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                max_children: Some(3),
                backoff: Backoff::NONE,
                ..SupervisorConfig::default()
            },
            ..SupervisorArgs::default()
        },
        &supervisor,
    )
    .await
    .unwrap();

    let (temporary, temporary_handle) = probe_spec(&path, &ProbeArgs::new("temporary", &log));
    let (transient, transient_handle) = probe_spec(&path, &ProbeArgs::new("transient", &log));
    let (transient2, transient2_handle) = probe_spec(&path, &ProbeArgs::new("transient2", &log));
    supervisor
        .start_child(temporary.policy(ChildPolicy::Temporary))
        .await
        .unwrap();
    supervisor
        .start_child(transient.policy(ChildPolicy::Transient))
        .await
        .unwrap();
    supervisor
        .start_child(transient2.policy(ChildPolicy::Transient))
        .await
        .unwrap();

    let (extra, _) = probe_spec(&path, &ProbeArgs::new("extra", &log));
    assert_eq!(
        supervisor.start_child(extra).await,
        Err(StartChildError::MaxChildren { max: 3 })
    );
    let (duplicate, _) = probe_spec(&path, &ProbeArgs::new("transient", &log));
    assert_eq!(
        supervisor.start_child(duplicate).await,
        Err(StartChildError::AlreadyExists("transient".into()))
    );

    // temporary: a panic removes it for good
    let mut status = temporary_handle.watch_status();
    temporary_handle.cast(ProbeMsg::Panic).unwrap();
    status
        .wait_for(|status| *status == HandleStatus::Stopped)
        .await
        .unwrap();
    let refused = temporary_handle.cast(ProbeMsg::Panic).unwrap_err();
    assert_eq!(refused.kind, SendErrorKind::Stopped);

    // transient: a panic restarts it, a normal exit removes it
    transient_handle.cast(ProbeMsg::Panic).unwrap();
    assert_eq!(ping(&transient_handle).await, 2);
    let mut status = transient2_handle.watch_status();
    transient2_handle.cast(ProbeMsg::StopNormally).unwrap();
    status
        .wait_for(|status| *status == HandleStatus::Stopped)
        .await
        .unwrap();

    let children = supervisor.children().await.unwrap();
    let names: Vec<_> = children.iter().map(|c| c.path.to_string()).collect();
    assert_eq!(names, ["dyn/transient"]);
    assert_eq!(children[0].restarts, 1);

    assert!(supervisor.terminate_child("transient").await.unwrap());
    assert!(!supervisor.terminate_child("transient").await.unwrap());
    assert_eq!(transient_handle.status(), HandleStatus::Stopped);
}

/// A supervisor with a stop budget and two children: `hung` (stopped first: busy for an hour, so
/// its drain never gets through; a 60 s shutdown timeout) and `last` (stopped last, logs
/// "last stopped" in `post_stop`). `hung` is busy and the log is clear when this returns.
fn hung_then_last(
    path: &ActorPath,
    log: &Log,
) -> (SupervisorArgs, ActorHandle<ProbeMsg>, ActorHandle<ProbeMsg>) {
    let (last_spec, last) = probe_spec(path, &ProbeArgs::new("last", log));
    let (hung_spec, hung) = probe_spec(path, &ProbeArgs::new("hung", log));
    let args = SupervisorArgs {
        children: vec![
            last_spec,
            hung_spec.shutdown(Shutdown::Graceful(Duration::from_secs(60))),
        ],
        ..SupervisorArgs::default()
    };
    (args, last, hung)
}

async fn make_busy(hung: &ActorHandle<ProbeMsg>, log: &Log) {
    assert!(hung.wait_running().await);
    hung.cast(ProbeMsg::Busy(Duration::from_secs(3600)))
        .unwrap();
    tokio::task::yield_now().await;
    log.clear();
}

/// A supervisor given 10 s to stop (its parent kills it after its 10 s shutdown timeout) does
/// not give its first child the 60 s of that child's own timeout: the child is killed after
/// 10 s minus the reserve of the child stopped after it (the smaller of its own 5 s and half of
/// the 10 s), and the last child still stops gracefully, its `post_stop` run, before the parent's
/// deadline. Each child getting its own full timeout, the supervisor would be killed at 10 s,
/// and the last child with it, without `post_stop`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_hung_child_does_not_take_the_stop_budget_of_the_children_stopped_after_it() {
    let (capture, _guard) = Capture::install();
    let log = Log::default();
    let outer_path = ActorPath::root().child("outer");
    let mid_path = outer_path.child("mid");
    let (mid_args, _last, hung) = hung_then_last(&mid_path, &log);
    let mid: SupervisorHandle = ActorHandle::new(mid_path);
    let outer: SupervisorHandle = ActorHandle::new(outer_path);
    let (outer_cell, _) = kernel::spawn(
        Supervisor,
        SupervisorArgs {
            children: vec![
                ChildSpec::supervisor(&mid, move || (Supervisor, mid_args.clone()))
                    .shutdown(Shutdown::Graceful(Duration::from_secs(10))),
            ],
            ..SupervisorArgs::default()
        },
        &outer,
    )
    .await
    .unwrap();
    make_busy(&hung, &log).await;

    let before = tokio::time::Instant::now();
    let stopping = tokio::spawn(async move { outer_cell.stop_and_wait(None, None).await });
    let logged = tokio::time::timeout(Duration::from_secs(10), log.wait_for("last stopped")).await;
    assert!(
        logged.is_ok(),
        "the last child did not stop gracefully within its supervisor's 10 s: {:?}",
        log.lines()
    );
    assert_eq!(before.elapsed(), Duration::from_secs(5));
    stopping.await.unwrap().unwrap();
    assert_eq!(
        log.lines(),
        ["last stopped"],
        "hung was killed: no post_stop"
    );
    let kills = capture.with_message(Level::WARN, "child did not stop in time; killing it");
    assert_eq!(kills.len(), 1, "mid stopped in time: {kills:?}");
    assert_eq!(kills[0].fields["child"], "outer/mid/hung");
    assert_eq!(kills[0].fields["timeout_ms"], "5000");
    assert_eq!(kills[0].fields["shutdown_ms"], "60000");
}

/// The same for a supervisor without a parent (a node's root) stopped with `stop_within`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_root_stopped_within_a_timeout_shares_it_among_its_children() {
    let log = Log::default();
    let path = ActorPath::root().child("root");
    let (args, _last, hung) = hung_then_last(&path, &log);
    let root: SupervisorHandle = ActorHandle::new(path);
    let (cell, _) = kernel::spawn(Supervisor, args, &root).await.unwrap();
    make_busy(&hung, &log).await;

    let before = tokio::time::Instant::now();
    let stopping = tokio::spawn(async move {
        supervisor::stop_within(&cell, Some("shutdown".to_owned()), Duration::from_secs(10)).await
    });
    let logged = tokio::time::timeout(Duration::from_secs(10), log.wait_for("last stopped")).await;
    assert!(
        logged.is_ok(),
        "the last child did not stop gracefully within the root's 10 s: {:?}",
        log.lines()
    );
    assert_eq!(before.elapsed(), Duration::from_secs(5));
    assert!(stopping.await.unwrap(), "the root stopped gracefully");
    assert_eq!(log.lines(), ["last stopped"]);
}

/// Waits (in paused time) until `handle` is stopped for good; false if an hour passes first.
async fn stops_within_an_hour(handle: &ActorHandle<ProbeMsg>) -> bool {
    let mut status = handle.watch_status();
    tokio::time::timeout(
        Duration::from_secs(3_600),
        status.wait_for(|status| *status == HandleStatus::Stopped),
    )
    .await
    .is_ok()
}

/// A `StartChild` that waited in the mailbox of a supervisor busy restarting another child (a
/// slow `pre_start`) past its caller's deadline starts nothing once the supervisor gets to it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_start_child_whose_caller_gave_up_while_it_waited_starts_nothing() {
    quiet_intended_panics();
    let tree = tree(Strategy::OneForOne, &["a"], backoff(10, 10)).await;
    let a = &tree.children[0];
    // a's next start takes 40 s, inside the supervisor's handler.
    tree.args[0].slow_start_ms.store(40_000, Ordering::SeqCst);
    a.cast(ProbeMsg::Panic).unwrap();
    tree.log.wait_for("a starting slowly").await;

    let (late, late_handle) =
        probe_spec(tree.supervisor.path(), &ProbeArgs::new("late", &tree.log));
    let outcome = tree.supervisor.start_child(late).await;
    assert!(
        matches!(
            outcome,
            Err(StartChildError::Unavailable(CallError::Timeout { .. }))
        ),
        "{outcome:?}"
    );
    // The supervisor is free once a runs again; it handled the request before this call.
    let mut status = a.watch_status();
    status
        .wait_for(|status| *status == HandleStatus::Running { generation: 2 })
        .await
        .unwrap();
    let children = tree.supervisor.children().await.unwrap();
    let names: Vec<_> = children.iter().map(|c| c.path.to_string()).collect();
    assert_eq!(names, ["sup/a"], "the caller was told the start failed");
    assert_eq!(late_handle.status(), HandleStatus::Starting);
    assert!(
        !tree.log.lines().iter().any(|line| line.starts_with("late")),
        "{:?}",
        tree.log.lines()
    );
}

/// A dynamic child whose `pre_start` outlasts its caller's deadline is stopped for good and
/// forgotten once it started: its caller was told the start failed.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_dynamic_child_whose_caller_gave_up_while_it_started_is_stopped() {
    let tree = tree(Strategy::OneForOne, &["a"], backoff(10, 10)).await;
    let slow = ProbeArgs::new("slow", &tree.log);
    slow.slow_start_ms.store(40_000, Ordering::SeqCst);
    let (spec, slow_handle) = probe_spec(tree.supervisor.path(), &slow);
    let outcome = tree.supervisor.start_child(spec).await;
    assert!(
        matches!(
            outcome,
            Err(StartChildError::Unavailable(CallError::Timeout { .. }))
        ),
        "{outcome:?}"
    );
    assert!(
        stops_within_an_hour(&slow_handle).await,
        "the caller was told the start failed, yet the child runs: {:?}",
        slow_handle.status()
    );
    assert_eq!(
        tree.log.lines(),
        [
            "a started",
            "slow starting slowly",
            "slow started",
            "slow stopped"
        ]
    );
    let children = tree.supervisor.children().await.unwrap();
    let names: Vec<_> = children.iter().map(|c| c.path.to_string()).collect();
    assert_eq!(names, ["sup/a"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn fault_injection_reaches_any_hosted_actor_including_supervisors() {
    let tree = tree(Strategy::OneForOne, &["a"], backoff(10, 100)).await;
    let mut events = all_events(&tree.bus);
    assert!(tree.children[0].inject_fault(FaultKind::Error));
    let event = next_event(&mut events).await;
    assert!(
        restarted(&event.data)
            .reason
            .contains("fault injected: error in sup/a")
    );
    // A root supervisor that panics has nobody to restart it: it just dies.
    assert!(tree.supervisor.inject_fault(FaultKind::Panic));
    tree.cell.wait(Some(Duration::from_secs(5))).await.unwrap();
}

fn no_backoff() -> SupervisorConfig {
    SupervisorConfig {
        backoff: Backoff::NONE,
        ..SupervisorConfig::default()
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_child_restarted_in_place_keeps_its_mailbox_and_is_announced_once() {
    let (capture, _guard) = Capture::install();
    let tree = tree(Strategy::OneForOne, &["a", "b"], no_backoff()).await;
    let mut events = all_events(&tree.bus);
    let a = &tree.children[0];
    let instance = a.instance().unwrap().get_id();

    // Queued behind the poison: handled by the next incarnation, in order.
    a.cast(ProbeMsg::Panic).unwrap();
    let pings: Vec<_> = (0..3)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { ping(&a).await })
        })
        .collect();
    for answered in pings {
        assert_eq!(answered.await.unwrap(), 2, "the next incarnation answers");
    }
    assert_eq!(
        a.instance().unwrap().get_id(),
        instance,
        "restarted in place: the same ractor actor and mailbox"
    );

    let event = next_event(&mut events).await;
    let restart = restarted(&event.data);
    assert_eq!(restart.supervisor.as_str(), "sup");
    assert_eq!(restart.child.as_str(), "sup/a");
    assert_eq!(restart.restart_count, 1);
    assert_eq!(restart.restarts_in_window, 1);
    assert_eq!(restart.delay_ms, 0);
    assert!(
        restart.reason.contains("a was told to panic"),
        "{}",
        restart.reason
    );
    let warnings = capture.with_message(Level::WARN, "actor restarted");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].fields["child"], "sup/a");
    assert_eq!(warnings[0].fields["restart_count"], "1");

    assert_eq!(ping(&tree.children[1]).await, 1, "the sibling is untouched");
    assert_eq!(
        tree.log.lines(),
        ["a started", "b started", "a started"],
        "a failed incarnation runs no post_stop"
    );
    let children = tree.supervisor.children().await.unwrap();
    assert_eq!(children[0].restarts, 1);
    assert_eq!(a.stats().snapshot().restarts, 1);
    assert_eq!(a.stats().snapshot().mailbox_depth(), 0);
}

/// Restarts in place handled in one run of the mailbox are announced in the order they happened
/// (their announcements wait until the worker idles, and tokio wakes what waits that way last
/// first).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn restarts_in_place_in_one_run_are_announced_in_order() {
    let (capture, _guard) = Capture::install();
    let tree = tree(Strategy::OneForOne, &["a"], no_backoff()).await;
    let mut events = all_events(&tree.bus);
    let a = &tree.children[0];
    for _ in 0..3 {
        a.cast(ProbeMsg::Panic).unwrap();
    }
    assert_eq!(
        ping(a).await,
        4,
        "three restarts, then the fourth incarnation answers"
    );
    let mut counts = Vec::new();
    for _ in 0..3 {
        counts.push(restarted(&next_event(&mut events).await.data).restart_count);
    }
    assert_eq!(counts, [1, 2, 3]);
    let warnings = capture.with_message(Level::WARN, "actor restarted");
    let logged: Vec<&str> = warnings
        .iter()
        .map(|warning| warning.fields["restart_count"].as_str())
        .collect();
    assert_eq!(logged, ["1", "2", "3"]);
}

/// A restart in place is announced before a later restart of the same child that its supervisor
/// handles itself (here: one over the intensity, which escalates).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restart_in_place_is_announced_before_what_its_supervisor_does_next() {
    let tree = tree(Strategy::OneForOne, &["a"], one_restart_a_minute()).await;
    let mut events = all_events(&tree.bus);
    let a = &tree.children[0];
    // The first panic restarts in place; the second, in the same run, is one too many.
    a.cast(ProbeMsg::Panic).unwrap();
    a.cast(ProbeMsg::Panic).unwrap();
    let first = next_event(&mut events).await;
    assert_eq!(restarted(&first.data).restart_count, 1);
    let second = next_event(&mut events).await;
    assert!(
        matches!(second.data, EventData::ActorEscalated(_)),
        "{:?}",
        second.data
    );
    tree.cell.wait(Some(Duration::from_secs(5))).await.unwrap();
}

/// Immediate restarts, and one at most within a minute.
fn one_restart_a_minute() -> SupervisorConfig {
    SupervisorConfig {
        intensity: RestartIntensity {
            max_restarts: 1,
            window: Duration::from_secs(60),
        },
        ..no_backoff()
    }
}

/// Yields until `log` has `line` (the actors under test run on this thread).
async fn until_logged(log: &Log, line: &str) {
    while !log.lines().iter().any(|logged| logged == line) {
        tokio::task::yield_now().await;
    }
}

/// A restart in place that completes while the supervisor itself restarts another child (a
/// slow `pre_start`) is announced before that child's restart, which completes later.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restart_in_place_is_announced_before_a_respawn_that_completes_after_it() {
    let tree = tree(Strategy::OneForOne, &["a", "w"], no_backoff()).await;
    let mut events = all_events(&tree.bus);
    let (a, w) = (&tree.children[0], &tree.children[1]);
    // w's restart in place fails in pre_start, so its supervisor starts it again: slowly.
    tree.args[1].failing_starts.store(1, Ordering::SeqCst);
    tree.args[1].slow_start_ms.store(50, Ordering::SeqCst);
    w.cast(ProbeMsg::Panic).unwrap();
    until_logged(&tree.log, "w starting slowly").await;
    // Meanwhile a restarts in place, and is done first.
    a.cast(ProbeMsg::Panic).unwrap();
    assert_eq!(ping(a).await, 2);
    let first = next_event(&mut events).await;
    let second = next_event(&mut events).await;
    let order = [first, second].map(|event| restarted(&event.data).child.name().to_owned());
    assert_eq!(order, ["a", "w"]);
}

/// A restart in place that completes while its supervisor escalates (stopping its children) is
/// still announced, once.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restart_in_place_completed_during_an_escalation_is_announced() {
    let tree = tree(Strategy::OneForOne, &["a", "b"], one_restart_a_minute()).await;
    let mut events = all_events(&tree.bus);
    // a restarts in place (1 of 1) and is slow to start; b is killed meanwhile: one too many.
    tree.args[0].slow_start_ms.store(100, Ordering::SeqCst);
    tree.children[0].cast(ProbeMsg::Panic).unwrap();
    until_logged(&tree.log, "a starting slowly").await;
    tree.children[1].instance().unwrap().kill();
    tree.cell.wait(Some(Duration::from_secs(5))).await.unwrap();
    let mut kinds = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await
    {
        if let troupe_actors::event::Delivery::Event(event) = delivery {
            match &event.data {
                EventData::ActorRestarted(restart) => {
                    kinds.push(format!("restarted {}", restart.child.name()));
                }
                EventData::ActorEscalated(_) => kinds.push("escalated".into()),
                _ => {}
            }
        }
    }
    assert_eq!(kinds, ["escalated", "restarted a"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn self_sends_and_timers_of_a_failed_incarnation_never_reach_the_next() {
    let tree = tree(Strategy::OneForOne, &["a"], no_backoff()).await;
    let a = &tree.children[0];

    // A timer armed by incarnation 1 dies with it.
    a.cast(ProbeMsg::Arm(Duration::from_secs(1))).unwrap();
    a.cast(ProbeMsg::Panic).unwrap();
    assert_eq!(ping(a).await, 2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!tree.log.lines().contains(&"a fired".to_owned()));

    // A self-send queued by incarnation 2 just before it panics is discarded, and counted.
    a.cast(ProbeMsg::FireThenPanic).unwrap();
    assert_eq!(ping(a).await, 3);
    assert!(!tree.log.lines().contains(&"a fired".to_owned()));
    let stats = a.stats().snapshot();
    assert_eq!(stats.discarded, 1);
    assert_eq!(
        stats.mailbox_depth(),
        0,
        "nothing discarded stays in the depth"
    );

    // The running incarnation's own timer fires.
    a.cast(ProbeMsg::Arm(Duration::from_secs(1))).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ping(a).await, 3);
    let fired = tree.log.lines().iter().filter(|l| *l == "a fired").count();
    assert_eq!(fired, 1);
}

/// OTP: a temporary child stopped because a sibling failed is not restarted with the group.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn temporary_siblings_are_not_restarted_by_one_for_all_or_rest_for_one() {
    for strategy in [Strategy::OneForAll, Strategy::RestForOne] {
        let log = Log::default();
        let bus = start_bus(EventBusConfig::default()).await;
        let path = ActorPath::root().child("group");
        let (a_spec, a) = probe_spec(&path, &ProbeArgs::new("a", &log));
        let (t_spec, t) = probe_spec(&path, &ProbeArgs::new("t", &log));
        let (c_spec, c) = probe_spec(&path, &ProbeArgs::new("c", &log));
        let supervisor: SupervisorHandle = ActorHandle::new(path.clone());
        kernel::spawn(
            Supervisor,
            SupervisorArgs {
                config: SupervisorConfig {
                    strategy,
                    ..no_backoff()
                },
                children: vec![a_spec, t_spec.policy(ChildPolicy::Temporary), c_spec],
                events: Some(bus.clone()),
                directory: None,
            },
            &supervisor,
        )
        .await
        .unwrap();
        let mut events = all_events(&bus);
        let mut t_status = t.watch_status();

        a.cast(ProbeMsg::Panic).unwrap();
        let mut restarted_children = Vec::new();
        for _ in 0..2 {
            let event = next_event(&mut events).await;
            restarted_children.push(restarted(&event.data).child.to_string());
        }
        assert_eq!(restarted_children, ["group/a", "group/c"], "{strategy:?}");
        t_status
            .wait_for(|status| *status == HandleStatus::Stopped)
            .await
            .unwrap();
        assert_eq!(
            t.cast(ProbeMsg::Panic).unwrap_err().kind,
            SendErrorKind::Stopped,
            "{strategy:?}"
        );
        assert_eq!(ping(&a).await, 2);
        assert_eq!(ping(&c).await, 2);
        let names: Vec<String> = supervisor
            .children()
            .await
            .unwrap()
            .iter()
            .map(|child| child.path.to_string())
            .collect();
        assert_eq!(names, ["group/a", "group/c"], "{strategy:?}");
        assert_eq!(
            log.lines(),
            [
                "a started",
                "t started",
                "c started",
                "c stopped",
                "t stopped",
                "a started",
                "c started"
            ],
            "{strategy:?}: siblings stop in reverse order; the temporary one stays stopped"
        );
    }
}
