//! A worker that ends before its mailbox loop ran (its first `post_start` fails or panics, or a
//! kill): what was queued for it goes back to its handle before its supervisor reacts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use troupe_actors::ids::ActorPath;
use troupe_actors::kernel::{self, Actor, ActorError, ActorHandle, Context, HandleStatus};
use troupe_actors::supervisor::{
    Backoff, ChildSpec, Supervisor, SupervisorArgs, SupervisorConfig, SupervisorHandle,
};

use crate::support::{Log, quiet_intended_panics};

/// How long anything here may take in real time before the test gives up.
const BOUND: Duration = Duration::from_secs(30);

/// How the first incarnation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Its `post_start` returns an error when the test opens the gate.
    Error,
    /// Its `post_start` panics when the test opens the gate.
    Panic,
    /// The test kills it while its `post_start` waits for the gate.
    KilledInPostStart,
    /// It kills itself in `pre_start`: its `post_start` never runs.
    KilledBeforePostStart,
    /// It kills itself at the end of a `post_start` that succeeds: its loop never runs.
    KilledBeforeItsLoop,
}

/// A worker whose first incarnation ends as told, and whose first state blocks the thread that
/// drops it until the test lets it go. Each message is logged as "<incarnation>: <message>".
struct Gated;

struct Shared {
    ending: Ending,
    log: Log,
    incarnations: AtomicU64,
    /// Told when the first `post_start` waits for its gate.
    at_gate: Mutex<Option<oneshot::Sender<()>>>,
    gate: Mutex<Option<oneshot::Receiver<()>>>,
    hold: Mutex<Option<mpsc::Receiver<()>>>,
}

struct GatedState {
    shared: Arc<Shared>,
    incarnation: u64,
    _hold: Option<Hold>,
}

/// Blocks the thread that drops it until the test sends the release (or `BOUND` passes). It
/// hands its worker's other tasks to another thread meanwhile (`block_in_place`), so the
/// supervisor, woken by this actor's exit, runs while the old state is being dropped.
struct Hold(mpsc::Receiver<()>);

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = tokio::task::block_in_place(|| self.0.recv_timeout(BOUND));
    }
}

impl Actor for Gated {
    type Msg = u32;
    type State = GatedState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        ctx: &Context<u32>,
        shared: Arc<Shared>,
    ) -> Result<GatedState, ActorError> {
        let incarnation = shared.incarnations.fetch_add(1, Ordering::SeqCst) + 1;
        let first = incarnation == 1;
        if first && shared.ending == Ending::KilledBeforePostStart {
            ctx.cell().kill();
        }
        let hold = shared.hold.lock().unwrap().take().map(Hold);
        Ok(GatedState {
            shared,
            incarnation,
            _hold: hold,
        })
    }

    async fn post_start(
        &self,
        ctx: &Context<u32>,
        state: &mut GatedState,
    ) -> Result<(), ActorError> {
        if state.incarnation > 1 {
            return Ok(());
        }
        let ending = state.shared.ending;
        if ending == Ending::KilledBeforeItsLoop {
            ctx.cell().kill();
            return Ok(());
        }
        let gate = state.shared.gate.lock().unwrap().take().unwrap();
        let at_gate = state.shared.at_gate.lock().unwrap().take().unwrap();
        let _ = at_gate.send(());
        let _ = gate.await;
        match ending {
            Ending::Panic => panic!("the first post_start was told to panic"),
            _ => Err("the first post_start fails".into()),
        }
    }

    async fn handle(
        &self,
        _ctx: &Context<u32>,
        message: u32,
        state: &mut GatedState,
    ) -> Result<(), ActorError> {
        state
            .shared
            .log
            .push(format!("{}: {message}", state.incarnation));
        Ok(())
    }
}

/// Messages queued for a worker that ends before its mailbox loop ran are redelivered to the
/// next instance ahead of messages sent after it runs: they go back to the handle before the
/// supervisor hears of the exit, not when ractor drops the ended instance's state (after
/// telling the supervisor, which may have started the next instance by then).
async fn queued_messages_keep_their_order(ending: Ending) {
    quiet_intended_panics();
    let (open, gate) = oneshot::channel();
    let (tell, at_gate) = oneshot::channel();
    let (release, hold) = mpsc::channel();
    let shared = Arc::new(Shared {
        ending,
        log: Log::default(),
        incarnations: AtomicU64::new(0),
        at_gate: Mutex::new(Some(tell)),
        gate: Mutex::new(Some(gate)),
        hold: Mutex::new(Some(hold)),
    });
    let path = ActorPath::root().child("sup");
    let supervisor: SupervisorHandle = ActorHandle::new(path.clone());
    let worker: ActorHandle<u32> = ActorHandle::new(path.child("gated"));
    let spec = {
        let shared = shared.clone();
        ChildSpec::worker(&worker, move || (Gated, shared.clone()))
    };
    // Buffered in the handle, then queued in the first instance's mailbox when it is bound.
    worker.cast(1).unwrap();
    worker.cast(2).unwrap();
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                backoff: Backoff::NONE,
                ..SupervisorConfig::default()
            },
            children: vec![spec],
            ..SupervisorArgs::default()
        },
        &supervisor,
    )
    .await
    .unwrap();
    if matches!(
        ending,
        Ending::Error | Ending::Panic | Ending::KilledInPostStart
    ) {
        tokio::time::timeout(BOUND, at_gate)
            .await
            .expect("post_start waits for its gate")
            .unwrap();
        match worker.instance() {
            Some(cell) if ending == Ending::KilledInPostStart => cell.kill(),
            _ => open.send(()).unwrap(),
        }
    }

    // The supervisor restarted it while the ended instance's state is still being dropped.
    let mut status = worker.watch_status();
    tokio::time::timeout(
        BOUND,
        status.wait_for(|status| *status == HandleStatus::Running { generation: 2 }),
    )
    .await
    .expect("restarted")
    .unwrap();
    worker.cast(3).unwrap();
    release.send(()).unwrap();
    for line in ["2: 1", "2: 2", "2: 3"] {
        tokio::time::timeout(BOUND, shared.log.wait_for(line))
            .await
            .unwrap_or_else(|_| panic!("{line} never came: {:?}", shared.log.lines()));
    }
    assert_eq!(shared.log.lines(), ["2: 1", "2: 2", "2: 3"], "{ending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_a_worker_whose_first_post_start_fails_keep_their_order() {
    queued_messages_keep_their_order(Ending::Error).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_a_worker_whose_first_post_start_panics_keep_their_order() {
    queued_messages_keep_their_order(Ending::Panic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_a_worker_killed_in_its_first_post_start_keep_their_order() {
    queued_messages_keep_their_order(Ending::KilledInPostStart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_a_worker_killed_before_its_post_start_keep_their_order() {
    queued_messages_keep_their_order(Ending::KilledBeforePostStart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_a_worker_killed_before_its_loop_ran_keep_their_order() {
    queued_messages_keep_their_order(Ending::KilledBeforeItsLoop).await;
}
