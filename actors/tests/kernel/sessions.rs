//! Sessions through the node tree, with in-memory ports: the lifecycle, admission, cancel,
//! timeouts, recovery after restarts of the node and of the actors.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use troupe_actors::event::{
    Delivery, EventBusConfig, EventData, EventFilter, OutputStream, ReplayFrom, Subscription,
};
use troupe_actors::ids::{ActorPath, NodeId, SessionId, Timestamp};
use troupe_actors::kernel::{FaultKind, HandleStatus};
use troupe_actors::node::{NodePorts, NodeTree, NodeTreeConfig, SessionPorts};
use troupe_actors::session::*;
use troupe_actors::supervisor::Backoff;

use crate::support::*;

/// A runner whose processes the test drives.
#[derive(Default)]
struct ScriptedRunner {
    processes: Mutex<HashMap<SessionId, Arc<dyn ProcessSink>>>,
    started: Mutex<Vec<(SessionId, CommandLine)>>,
    terminated: Mutex<Vec<SessionId>>,
    /// Told of every terminate.
    terminate_seen: tokio::sync::Notify,
    /// When set, a terminated process does not exit by itself: the test emits its exit.
    keep_alive_on_terminate: std::sync::atomic::AtomicBool,
    leftovers: Mutex<Vec<Leftover>>,
    next_pid: Mutex<u32>,
}

impl ScriptedRunner {
    fn emit(&self, id: &SessionId, event: ProcessEvent) {
        let sink = self
            .processes
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .expect("a process");
        sink.deliver(event).expect("the session takes events");
    }

    fn exit(&self, id: &SessionId, code: i32) {
        self.emit(
            id,
            ProcessEvent::Exited(ExitStatus {
                code: Some(code),
                signal: None,
            }),
        );
        self.processes.lock().unwrap().remove(id);
    }

    fn starts(&self) -> usize {
        self.started.lock().unwrap().len()
    }

    /// The sink the runner delivers `id`'s process events to.
    fn sink(&self, id: &SessionId) -> Arc<dyn ProcessSink> {
        self.processes
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .expect("a process")
    }
}

impl ProcessRunner for ScriptedRunner {
    fn start(
        &self,
        session: &SessionId,
        command: &CommandLine,
        sink: Arc<dyn ProcessSink>,
    ) -> Result<ProcessInfo, RunnerError> {
        if command.program == "missing" {
            return Err(RunnerError::Spawn {
                program: "missing".into(),
                reason: "No such file or directory".into(),
            });
        }
        self.started
            .lock()
            .unwrap()
            .push((session.clone(), command.clone()));
        self.processes.lock().unwrap().insert(session.clone(), sink);
        let mut pid = self.next_pid.lock().unwrap();
        *pid += 1;
        Ok(ProcessInfo {
            pid: 1000 + *pid,
            pgid: 1000 + *pid as i32,
            start_ticks: Some(1),
        })
    }

    fn reattach(&self, session: &SessionId, sink: Arc<dyn ProcessSink>) -> Option<ProcessInfo> {
        let mut processes = self.processes.lock().unwrap();
        let slot = processes.get_mut(session)?;
        *slot = sink;
        Some(ProcessInfo {
            pid: 1,
            pgid: 1,
            start_ticks: None,
        })
    }

    fn terminate(&self, session: &SessionId, _grace: Duration) -> bool {
        self.terminated.lock().unwrap().push(session.clone());
        self.terminate_seen.notify_one();
        if self
            .keep_alive_on_terminate
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return self.processes.lock().unwrap().contains_key(session);
        }
        let Some(sink) = self.processes.lock().unwrap().remove(session) else {
            return false;
        };
        // The process dies of the SIGTERM.
        let _ = sink.deliver(ProcessEvent::Exited(ExitStatus {
            code: None,
            signal: Some(15),
        }));
        true
    }

    fn kill_leftovers(&self, leftovers: &[Leftover], _grace: Duration) -> Vec<i32> {
        self.leftovers.lock().unwrap().extend_from_slice(leftovers);
        leftovers
            .iter()
            .filter_map(|l| l.group.map(|g| g.pgid))
            .collect()
    }
}

/// A store in memory that enforces the transition table like the real one. Writes land only
/// after a short (paused-time) delay, so an event published before its write was awaited is
/// seen before the write: `Harness::expect` checks for that.
#[derive(Default)]
struct MemoryStore {
    data: Arc<Mutex<StoreData>>,
}

#[derive(Default)]
struct StoreData {
    records: BTreeMap<SessionId, SessionRecord>,
    transitions: Vec<(SessionId, Transition)>,
    output: Vec<String>,
    lines: BTreeMap<(SessionId, u64), (OutputStream, String)>,
    last_line: HashMap<SessionId, u64>,
    /// Writes that wait for the test before they land.
    gates: Vec<Gate>,
    /// Reads of a record that fail (a storage error) before they work again.
    failing_gets: usize,
    /// Transitions that fail (with an I/O error) before the next one succeeds.
    failing_transitions: usize,
    /// Transitions that land but are answered with an I/O error, as the real store's commit
    /// can fail after it reached the disk.
    landing_failures: usize,
    /// Creates that fail (with an I/O error) before the next one succeeds; counted when the
    /// write lands (after its gate, if one holds it).
    failing_creates: usize,
    /// Creates that land but are answered with an I/O error (see `landing_failures`).
    landing_creates: usize,
}

/// Holds back one kind of write of one session until the test opens it.
struct Gate {
    session: Option<SessionId>,
    what: GatedWrite,
    arrived: Arc<tokio::sync::Notify>,
    open: Arc<tokio::sync::Semaphore>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GatedWrite {
    /// Any create.
    Create,
    /// A transition to this state.
    To(SessionState),
    /// A read of the record (`get`): not a write, but held the same way.
    Get,
}

const WRITE_DELAY: Duration = Duration::from_millis(5);

impl MemoryStore {
    /// Holds back the next matching write until the returned opener is called; `arrived` is
    /// told when it is held.
    fn gate(
        &self,
        session: Option<SessionId>,
        what: GatedWrite,
    ) -> (Arc<tokio::sync::Notify>, Arc<tokio::sync::Semaphore>) {
        let arrived = Arc::new(tokio::sync::Notify::new());
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        self.data.lock().unwrap().gates.push(Gate {
            session,
            what,
            arrived: arrived.clone(),
            open: open.clone(),
        });
        (arrived, open)
    }

    /// The gate for this write, if one holds it (taken: it holds one write).
    fn gated(
        data: &Mutex<StoreData>,
        session: &SessionId,
        what: GatedWrite,
    ) -> Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Semaphore>)> {
        let mut data = data.lock().unwrap();
        let index = data.gates.iter().position(|gate| {
            gate.what == what && gate.session.as_ref().is_none_or(|s| s == session)
        })?;
        let gate = data.gates.remove(index);
        Some((gate.arrived, gate.open))
    }

    /// The record of `id` as `get` answers it now (`failing_gets` counted).
    fn read(data: &Mutex<StoreData>, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let mut data = data.lock().unwrap();
        if data.failing_gets > 0 {
            data.failing_gets -= 1;
            return Err(StoreError::Io("the disk is gone".into()));
        }
        Ok(data.records.get(id).cloned())
    }

    fn insert(&self, record: SessionRecord) {
        self.data
            .lock()
            .unwrap()
            .records
            .insert(record.id.clone(), record);
    }

    fn history(&self, id: &SessionId) -> Vec<SessionState> {
        let data = self.data.lock().unwrap();
        let mut states: Vec<_> = data
            .records
            .get(id)
            .map(|_| SessionState::Queued)
            .into_iter()
            .collect();
        states.extend(
            data.transitions
                .iter()
                .filter(|(s, _)| s == id)
                .map(|(_, t)| t.to),
        );
        states
    }

    fn transitions(&self) -> Vec<(SessionState, SessionState)> {
        self.data
            .lock()
            .unwrap()
            .transitions
            .iter()
            .map(|(_, t)| (t.from, t.to))
            .collect()
    }
}

impl SessionStore for MemoryStore {
    fn create(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        let data = self.data.clone();
        let gate = MemoryStore::gated(&self.data, &record.id, GatedWrite::Create);
        Box::pin(async move {
            if let Some((arrived, open)) = gate {
                arrived.notify_one();
                let _ = open.acquire().await.unwrap();
            }
            tokio::time::sleep(WRITE_DELAY).await;
            let mut data = data.lock().unwrap();
            if data.failing_creates > 0 {
                data.failing_creates -= 1;
                return Err(StoreError::Io("the disk is gone".into()));
            }
            data.records.insert(record.id.clone(), record);
            if data.landing_creates > 0 {
                data.landing_creates -= 1;
                return Err(StoreError::Io("the commit was reported failed".into()));
            }
            Ok(())
        })
    }

    fn transition(
        &self,
        record: SessionRecord,
        transition: Transition,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let data = self.data.clone();
        let gate = MemoryStore::gated(&self.data, &record.id, GatedWrite::To(transition.to));
        Box::pin(async move {
            if let Some((arrived, open)) = gate {
                arrived.notify_one();
                let _ = open.acquire().await.unwrap();
            }
            tokio::time::sleep(WRITE_DELAY).await;
            let mut data = data.lock().unwrap();
            if data.failing_transitions > 0 {
                data.failing_transitions -= 1;
                return Err(StoreError::Io("the disk is gone".into()));
            }
            match data.records.get(&record.id).map(|r| r.state) {
                None => Err(StoreError::NotFound(record.id.clone())),
                Some(actual) if actual != transition.from || !actual.can_become(transition.to) => {
                    Err(StoreError::Conflict {
                        id: record.id.clone(),
                        expected: transition.from,
                        actual,
                    })
                }
                Some(_) => {
                    data.transitions.push((record.id.clone(), transition));
                    data.records.insert(record.id.clone(), record);
                    if data.landing_failures > 0 {
                        data.landing_failures -= 1;
                        return Err(StoreError::Io("the commit was reported failed".into()));
                    }
                    Ok(())
                }
            }
        })
    }

    fn update(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        let data = self.data.clone();
        Box::pin(async move {
            tokio::time::sleep(WRITE_DELAY).await;
            let mut data = data.lock().unwrap();
            if data.failing_transitions > 0 {
                data.failing_transitions -= 1;
                return Err(StoreError::Io("the disk is gone".into()));
            }
            match data.records.get(&record.id).map(|r| r.state) {
                None => Err(StoreError::NotFound(record.id.clone())),
                Some(actual) if actual != record.state || actual.is_terminal() => {
                    Err(StoreError::Conflict {
                        id: record.id.clone(),
                        expected: record.state,
                        actual,
                    })
                }
                Some(_) => {
                    data.records.insert(record.id.clone(), record);
                    Ok(())
                }
            }
        })
    }

    /// Like the real store: a line number seen before is taken for a redelivery and skipped.
    fn append_output(&self, id: &SessionId, stream: OutputStream, first: u64, lines: &[String]) {
        let mut data = self.data.lock().unwrap();
        let last = data.last_line.get(id).copied().unwrap_or(0);
        for (line, text) in (first..).zip(lines) {
            if line > last {
                data.output.push(text.clone());
                data.lines
                    .insert((id.clone(), line), (stream, text.clone()));
                data.last_line.insert(id.clone(), line);
            }
        }
    }

    fn read_output(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<LoggedLine>, StoreError>> {
        let lines = self
            .data
            .lock()
            .unwrap()
            .lines
            .range((id.clone(), after + 1)..=(id.clone(), u64::MAX))
            .take(limit)
            .map(|((_, line), (stream, text))| LoggedLine {
                line: *line,
                stream: *stream,
                text: text.clone(),
            })
            .collect();
        Box::pin(async move { Ok(lines) })
    }

    fn output_lines(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        let last = self.data.lock().unwrap().last_line.get(id).copied();
        Box::pin(async move { Ok(last.unwrap_or(0)) })
    }

    fn find_by_key(
        &self,
        key: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let found = self
            .data
            .lock()
            .unwrap()
            .records
            .values()
            .find(|r| r.spec.idempotency_key.as_deref() == Some(key))
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn get(&self, id: &SessionId) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        if let Some((arrived, open)) = MemoryStore::gated(&self.data, id, GatedWrite::Get) {
            let data = self.data.clone();
            let id = id.clone();
            return Box::pin(async move {
                arrived.notify_one();
                let _ = open.acquire().await.unwrap();
                MemoryStore::read(&data, &id)
            });
        }
        let found = MemoryStore::read(&self.data, id);
        Box::pin(async move { found })
    }

    fn unfinished(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>> {
        let mut found: Vec<_> = self
            .data
            .lock()
            .unwrap()
            .records
            .values()
            .filter(|r| !r.state.is_terminal())
            .cloned()
            .collect();
        found.sort_by_key(|r| r.created_at);
        Box::pin(async move { Ok(found) })
    }
}

struct Commands;

impl CommandBuilder for Commands {
    fn command(&self, record: &SessionRecord) -> Result<CommandLine, String> {
        match &record.spec.kind {
            SessionKind::Command(command) => Ok(CommandLine {
                program: command.program.clone(),
                args: command.args.clone(),
                env: command.env.clone(),
                env_remove: Vec::new(),
                workdir: "/tmp".into(),
            }),
            SessionKind::Aider(aider) => Ok(CommandLine {
                program: "aider".into(),
                args: vec![format!("--message={}", aider.message)],
                env: BTreeMap::new(),
                env_remove: Vec::new(),
                workdir: "/tmp".into(),
            }),
            _ => Err("only commands and Aider in these tests".into()),
        }
    }

    fn interpreter(&self, record: &SessionRecord) -> Option<Box<dyn OutputInterpreter>> {
        match record.spec.kind {
            SessionKind::Aider(_) => Some(Box::new(aider::AiderInterpreter::new())),
            _ => None,
        }
    }
}

struct Harness {
    tree: NodeTree,
    runner: Arc<ScriptedRunner>,
    store: Arc<MemoryStore>,
    events: Subscription,
    /// Session events received but not expected yet (order holds per session, not across).
    seen: std::collections::VecDeque<(SessionId, &'static str, EventData)>,
}

impl Harness {
    async fn start(settings: SessionSettings, store: Arc<MemoryStore>) -> Self {
        Self::start_with(settings, store, EventBusConfig::default()).await
    }

    async fn start_with(
        settings: SessionSettings,
        store: Arc<MemoryStore>,
        events: EventBusConfig,
    ) -> Self {
        let runner = Arc::new(ScriptedRunner::default());
        Self::start_on(settings, store, events, runner)
            .await
            .unwrap()
    }

    /// A node tree on `store` whose processes are `runner`'s; the tree's start may fail.
    async fn start_on(
        settings: SessionSettings,
        store: Arc<MemoryStore>,
        events: EventBusConfig,
        runner: Arc<ScriptedRunner>,
    ) -> Result<Self, troupe_actors::node::NodeTreeError> {
        quiet_intended_panics();
        let mut config = NodeTreeConfig::new(NodeId::new("n1").unwrap());
        config.sessions = settings;
        config.events = events;
        config.supervision.backoff = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(10),
        };
        let ports = NodePorts {
            cluster: None,
            event_store: None,
            sessions: Some(SessionPorts {
                runner: runner.clone(),
                store: store.clone(),
                commands: Arc::new(Commands),
                chats: None,
            }),
            providers: Vec::new(),
        };
        let tree = NodeTree::start(config, ports).await?;
        // From the start of the ring: recovery publishes while the tree starts.
        let (events, _) = tree
            .events
            .subscribe_from(
                ReplayFrom::Tail(10_000),
                EventFilter {
                    kinds: vec!["session.*".parse().unwrap(), "actor.*".parse().unwrap()],
                    ..EventFilter::all()
                },
            )
            .await
            .unwrap();
        Ok(Self {
            tree,
            runner,
            store,
            events,
            seen: Default::default(),
        })
    }

    fn sessions(&self) -> &troupe_actors::node::Sessions {
        self.tree.session_manager.as_ref().unwrap()
    }

    async fn submit(&self, spec: SessionSpec) -> Result<Admitted, SubmitError> {
        self.sessions()
            .manager
            .call(|reply| ManagerMsg::Submit { spec, reply }, MANAGER_TIMEOUT)
            .await
            .unwrap()
    }

    /// Submits `spec` from a task of its own, for a test that holds the submission's store
    /// write meanwhile.
    fn submit_in_background(
        &self,
        spec: SessionSpec,
    ) -> tokio::task::JoinHandle<
        Result<Result<Admitted, SubmitError>, troupe_actors::kernel::CallError>,
    > {
        let manager = self.sessions().manager.clone();
        tokio::spawn(async move {
            manager
                .call(|reply| ManagerMsg::Submit { spec, reply }, MANAGER_TIMEOUT)
                .await
        })
    }

    async fn cancel(&self, id: &SessionId) -> Result<SessionRecord, CancelError> {
        let id = id.clone();
        self.sessions()
            .manager
            .call(|reply| ManagerMsg::Cancel { id, reply }, MANAGER_TIMEOUT)
            .await
            .unwrap()
    }

    /// The next session event (skipping `actor.*`), as (session, kind name).
    async fn next(&mut self) -> (SessionId, &'static str, EventData) {
        loop {
            let event = next_event(&mut self.events).await;
            if let Some(session) = &event.session {
                return (session.clone(), event.kind().as_str(), event.data.clone());
            }
        }
    }

    /// The next event of session `id`, which must be `kind`.
    async fn expect(&mut self, id: &SessionId, kind: &str) -> EventData {
        let index = loop {
            if let Some(index) = self.seen.iter().position(|(session, _, _)| session == id) {
                break index;
            }
            let event = self.next().await;
            self.seen.push_back(event);
        };
        let (session, got, data) = self.seen.remove(index).unwrap();
        assert_eq!(
            (&session, got),
            (id, kind),
            "expected {kind} of {id}, got {got} of {session}"
        );
        // Durable before announced: when the event arrives, its state is already stored.
        if let Some(state) = kind
            .strip_prefix("session.")
            .and_then(|s| s.parse::<SessionState>().ok())
        {
            let history = self.store.history(id);
            assert!(
                history.contains(&state),
                "{kind} published before it was stored: {history:?}"
            );
        }
        data
    }

    /// Asks the manager to drain, in the background, and returns once it has taken the request
    /// in (a call sent after it is answered); the handle gives the drain's answer.
    async fn drain_in_background(
        &self,
    ) -> tokio::task::JoinHandle<Result<(), troupe_actors::kernel::CallError>> {
        let manager = self.sessions().manager.clone();
        let drained = tokio::spawn(async move {
            manager
                .call(|reply| ManagerMsg::Drain { reply }, MANAGER_TIMEOUT)
                .await
        });
        tokio::task::yield_now().await;
        self.sessions()
            .manager
            .call(ManagerMsg::Summary, MANAGER_TIMEOUT)
            .await
            .unwrap();
        drained
    }

    /// Asserts that no event of `id` is left: none among those set aside, none queued.
    async fn assert_no_more_events_of(&mut self, id: &SessionId) {
        assert!(
            self.seen.iter().all(|(session, _, _)| session != id),
            "{:?}",
            self.seen
        );
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(1), self.events.recv()).await
        {
            if let Delivery::Event(event) = delivery {
                assert_ne!(event.session.as_ref(), Some(id), "{:?}", event.kind());
            }
        }
    }

    /// Waits for `id`'s `session.failed` saying its actor could not be started, and checks that
    /// the store went `queued → starting → failed`.
    async fn expect_failed_to_start(&mut self, id: &SessionId) {
        match self.expect(id, "session.failed").await {
            EventData::SessionFailed(ended) => {
                let reason = ended.reason.unwrap();
                assert!(reason.contains("could not be started"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            self.store.history(id),
            [
                SessionState::Queued,
                SessionState::Starting,
                SessionState::Failed
            ]
        );
    }

    async fn running(&self, id: &SessionId) {
        let handle = loop {
            if let Some(handle) = self.sessions().shared.handle(id) {
                break handle;
            }
            tokio::task::yield_now().await;
        };
        assert!(handle.wait_running().await);
    }
}

fn command(program: &str) -> SessionSpec {
    SessionSpec {
        kind: SessionKind::Command(CommandSession {
            program: program.into(),
            args: vec!["-c".into(), "echo hi".into()],
            env: BTreeMap::new(),
            workdir: None,
        }),
        timeout_secs: None,
        priority: 5,
        labels: BTreeMap::new(),
        idempotency_key: None,
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_session_runs_to_success_with_every_step_durable_before_its_event() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let admitted = h.submit(command("sh")).await.unwrap();
    assert_eq!(admitted.position, None, "a free slot: it starts at once");
    let id = admitted.record.id.clone();
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    h.runner.emit(
        &id,
        ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: vec!["hi".into()],
        },
    );
    match h.expect(&id, "session.output").await {
        EventData::SessionOutput(output) => {
            assert_eq!(output.lines, ["hi"]);
            assert_eq!(output.first_line, 1);
        }
        other => panic!("{other:?}"),
    }
    h.runner.exit(&id, 0);
    h.expect(&id, "session.succeeded").await;
    assert_eq!(
        h.store.transitions(),
        [
            (SessionState::Queued, SessionState::Starting),
            (SessionState::Starting, SessionState::Running),
            (SessionState::Running, SessionState::Succeeded),
        ]
    );
    assert_eq!(h.store.data.lock().unwrap().output, ["hi"]);
}

/// One batch of long lines: the event carries the first 64 KiB of them and counts the rest as
/// skipped; the log has them all.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_output_event_carries_at_most_64_kib_of_lines_and_the_log_has_every_line() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    // 64 lines (the default lines per event) of 16 KiB (a process's longest): 1 MiB.
    let lines: Vec<String> = (0..64).map(|n| format!("{n:x<16384}")).collect();
    h.runner.emit(
        &id,
        ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: lines.clone(),
        },
    );
    match h.expect(&id, "session.output").await {
        EventData::SessionOutput(output) => {
            assert_eq!(output.lines, lines[..4], "64 KiB of lines");
            assert_eq!((output.first_line, output.skipped), (1, 60));
        }
        other => panic!("{other:?}"),
    }
    h.runner.exit(&id, 0);
    h.expect(&id, "session.succeeded").await;
    assert_eq!(h.store.data.lock().unwrap().output, lines);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failing_exit_code_and_a_missing_program_fail() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    h.runner.exit(&id, 3);
    match h.expect(&id, "session.failed").await {
        EventData::SessionFailed(ended) => {
            assert_eq!(ended.exit_code, Some(3));
            assert_eq!(ended.reason.as_deref(), Some("exit code 3"));
        }
        other => panic!("{other:?}"),
    }
    let missing = h.submit(command("missing")).await.unwrap().record.id;
    h.expect(&missing, "session.queued").await;
    match h.expect(&missing, "session.failed").await {
        EventData::SessionFailed(ended) => {
            assert!(ended.reason.unwrap().contains("No such file"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_session_whose_actor_cannot_start_fails_and_the_queue_moves_on() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    // The session actor's first read of its record fails: its pre_start fails.
    h.store.data.lock().unwrap().failing_gets = 1;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect_failed_to_start(&id).await;
    assert_eq!(h.runner.starts(), 0, "no process ran");
    // The next session runs.
    let next = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&next, "session.queued").await;
    h.expect(&next, "session.started").await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn admission_queues_by_priority_then_age_and_refuses_past_capacity() {
    let settings = SessionSettings {
        max_concurrent: 1,
        queue_capacity: 2,
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    let first = h.submit(command("sh")).await.unwrap();
    assert_eq!(first.position, None);
    let low = h.submit(command("sh")).await.unwrap();
    assert_eq!(low.position, Some(1));
    let mut urgent = command("sh");
    urgent.priority = 9;
    let high = h.submit(urgent).await.unwrap();
    assert_eq!(high.position, Some(1), "higher priority overtakes");
    let refused = h.submit(command("sh")).await.unwrap_err();
    assert!(
        matches!(
            refused,
            SubmitError::QueueFull {
                running: 1,
                queued: 2,
                capacity: 2,
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(
        h.store.data.lock().unwrap().records.len(),
        3,
        "nothing stored for the refused one"
    );

    let first = first.record.id;
    h.expect(&first, "session.queued").await;
    h.expect(&first, "session.started").await;
    h.running(&first).await;
    h.runner.exit(&first, 0);
    h.expect(&low.record.id, "session.queued").await;
    h.expect(&high.record.id, "session.queued").await;
    h.expect(&first, "session.succeeded").await;
    h.expect(&high.record.id, "session.started").await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn cancelling_a_queued_session_never_starts_it_and_a_running_one_is_terminated() {
    let settings = SessionSettings {
        max_concurrent: 1,
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    let running = h.submit(command("sh")).await.unwrap().record.id;
    let queued = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&running, "session.queued").await;
    h.expect(&queued, "session.queued").await;
    h.expect(&running, "session.started").await;

    let record = h.cancel(&queued).await.unwrap();
    assert_eq!(record.state, SessionState::Cancelled);
    h.expect(&queued, "session.cancelled").await;

    h.running(&running).await;
    h.cancel(&running).await.unwrap();
    h.expect(&running, "session.cancelled").await;
    assert_eq!(
        *h.runner.terminated.lock().unwrap(),
        std::slice::from_ref(&running)
    );
    assert_eq!(
        h.runner.starts(),
        1,
        "the cancelled queued session never started"
    );
    // Idempotent: cancelling again returns the ended record.
    assert_eq!(
        h.cancel(&running).await.unwrap().state,
        SessionState::Cancelled
    );
    assert!(matches!(
        h.cancel(&SessionId::new("s-unknown").unwrap()).await,
        Err(CancelError::NotFound(_))
    ));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_session_past_its_timeout_is_terminated_and_long_runs_are_announced() {
    let settings = SessionSettings {
        long_running_after: Duration::from_secs(60),
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    let mut spec = command("sh");
    spec.timeout_secs = Some(150);
    let id = h.submit(spec).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    let started = tokio::time::Instant::now();
    for expected in [60, 120] {
        match h.expect(&id, "session.long_running").await {
            EventData::SessionLongRunning(long) => {
                assert!((expected..expected + 2).contains(&long.elapsed_secs))
            }
            other => panic!("{other:?}"),
        }
    }
    h.expect(&id, "session.timed_out").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(149) && took < Duration::from_secs(152),
        "{took:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_crashed_session_actor_resumes_its_run_and_reports_it_once() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    h.runner.emit(
        &id,
        ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: vec!["before".into()],
        },
    );
    h.expect(&id, "session.output").await;
    let handle = h.sessions().shared.handle(&id).unwrap();
    assert!(handle.inject_fault(FaultKind::Panic));
    // Output and exit while the actor restarts reach the next instance.
    h.runner.emit(
        &id,
        ProcessEvent::Output {
            stream: OutputStream::Stderr,
            lines: vec!["after".into()],
        },
    );
    h.runner.exit(&id, 0);
    let mut kinds = Vec::new();
    loop {
        let event = next_event(&mut h.events).await;
        kinds.push(event.kind().as_str());
        if event.kind().as_str() == "session.succeeded" {
            break;
        }
    }
    assert_eq!(
        kinds,
        ["actor.restarted", "session.output", "session.succeeded"]
    );
    assert_eq!(h.runner.starts(), 1, "the process was not started twice");
    assert_eq!(
        h.store.data.lock().unwrap().output,
        ["before", "after"],
        "the next instance numbers its lines after the first one's"
    );
    let ends = h
        .store
        .transitions()
        .iter()
        .filter(|(_, to)| to.is_terminal())
        .count();
    assert_eq!(ends, 1);
    let mut status = handle.watch_status();
    status
        .wait_for(|s| *s == HandleStatus::Stopped)
        .await
        .unwrap();
}

/// Regression: after a restart each run left from before was recorded as ended first and its
/// process group killed only after the last one was recorded; a store failure part way through
/// left the runs recorded so far with their processes running, never to be looked at again.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_runs_left_from_before_a_restart_are_killed_before_any_is_recorded_as_ended() {
    let store = Arc::new(MemoryStore::default());
    for (id, pgid) in [("s-a", 4242), ("s-b", 4343)] {
        store.insert(SessionRecord {
            id: SessionId::new(id).unwrap(),
            node: NodeId::new("n1").unwrap(),
            spec: command("sh"),
            state: SessionState::Running,
            created_at: Timestamp::now(),
            started_at: Some(Timestamp::now()),
            ended_at: None,
            exit_code: None,
            signal: None,
            reason: None,
            process: Some(ProcessInfo {
                pid: pgid as u32,
                pgid,
                start_ticks: Some(7),
            }),
            output_lines: 0,
            stop_requested: None,
        });
    }
    // A run's `interrupted` fails on the way.
    store.data.lock().unwrap().failing_transitions = 1;
    let runner = Arc::new(ScriptedRunner::default());
    let started = Harness::start_on(
        SessionSettings::default(),
        store.clone(),
        EventBusConfig::default(),
        runner.clone(),
    )
    .await;
    let mut killed: Vec<i32> = runner
        .leftovers
        .lock()
        .unwrap()
        .iter()
        .filter_map(|leftover| leftover.group.map(|group| group.pgid))
        .collect();
    killed.sort_unstable();
    killed.dedup();
    assert_eq!(killed, [4242, 4343], "both killed, whatever the store did");
    if started.is_ok() {
        // The manager was restarted after its failed recovery, and recorded both as ended.
        let ended = |id: &str| {
            let data = store.data.lock().unwrap();
            data.records[&SessionId::new(id).unwrap()]
                .state
                .is_terminal()
        };
        until(|| ended("s-a") && ended("s-b")).await;
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn after_a_node_restart_running_sessions_are_interrupted_and_queued_ones_run() {
    let store = Arc::new(MemoryStore::default());
    let record = |id: &str, state: SessionState, pgid: Option<i32>| SessionRecord {
        id: SessionId::new(id).unwrap(),
        node: NodeId::new("n1").unwrap(),
        spec: command("sh"),
        state,
        created_at: Timestamp::now(),
        started_at: pgid.map(|_| Timestamp::now()),
        ended_at: None,
        exit_code: None,
        signal: None,
        reason: None,
        process: pgid.map(|pgid| ProcessInfo {
            pid: pgid as u32,
            pgid,
            start_ticks: Some(7),
        }),
        output_lines: 0,
        stop_requested: None,
    };
    let cancelling = SessionRecord {
        stop_requested: Some(StopRequest::Cancel),
        ..record("s-was-cancelling", SessionState::Running, Some(4343))
    };
    for r in [
        record("s-was-running", SessionState::Running, Some(4242)),
        // Killed between its fork and the `running` commit: no group recorded.
        record("s-was-starting", SessionState::Starting, None),
        cancelling,
        record("s-was-queued", SessionState::Queued, None),
        record("s-was-done", SessionState::Succeeded, None),
    ] {
        store.insert(r);
    }
    let mut h = Harness::start(SessionSettings::default(), store).await;
    let was_running = SessionId::new("s-was-running").unwrap();
    let was_queued = SessionId::new("s-was-queued").unwrap();
    match h.expect(&was_running, "session.interrupted").await {
        EventData::SessionInterrupted(ended) => {
            assert!(ended.reason.unwrap().contains("node stopped"))
        }
        other => panic!("{other:?}"),
    }
    let was_starting = SessionId::new("s-was-starting").unwrap();
    h.expect(&was_starting, "session.interrupted").await;
    let was_cancelling = SessionId::new("s-was-cancelling").unwrap();
    match h.expect(&was_cancelling, "session.cancelled").await {
        EventData::SessionCancelled(ended) => {
            assert!(ended.reason.unwrap().contains("cancelled on request"))
        }
        other => panic!("{other:?}"),
    }
    h.expect(&was_queued, "session.started").await;
    let mut leftovers = h.runner.leftovers.lock().unwrap().clone();
    leftovers.sort_by(|a, b| a.session.cmp(&b.session));
    let group = |pgid| {
        Some(LeftoverGroup {
            pgid,
            start_ticks: Some(7),
        })
    };
    assert_eq!(
        leftovers,
        [
            Leftover {
                session: was_cancelling,
                group: group(4343),
            },
            Leftover {
                session: was_running,
                group: group(4242),
            },
            Leftover {
                session: was_starting,
                group: None,
            },
        ],
        "every one of them, with or without a recorded group"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restarted_manager_adopts_running_sessions_and_the_queue() {
    let settings = SessionSettings {
        max_concurrent: 1,
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    let running = h.submit(command("sh")).await.unwrap().record.id;
    let queued = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&running, "session.queued").await;
    h.expect(&queued, "session.queued").await;
    h.expect(&running, "session.started").await;
    h.running(&running).await;

    let manager = ActorPath::parse("sessions/manager").unwrap();
    h.tree.inject_fault(&manager, FaultKind::Panic).unwrap();
    assert!(matches!(
        h.next_restart().await.as_str(),
        "sessions/manager"
    ));
    assert_eq!(
        h.runner.starts(),
        1,
        "the running session was not restarted"
    );
    h.runner.exit(&running, 0);
    h.expect(&running, "session.succeeded").await;
    h.expect(&queued, "session.started").await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_same_idempotency_key_returns_the_same_session() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let mut spec = command("sh");
    spec.idempotency_key = Some("job-7".into());
    let first = h.submit(spec.clone()).await.unwrap();
    let second = h.submit(spec).await.unwrap();
    assert!(second.existing);
    assert_eq!(first.record.id, second.record.id);
    h.expect(&first.record.id, "session.queued").await;
    h.expect(&first.record.id, "session.started").await;
    assert_eq!(h.runner.starts(), 1);
}

impl Harness {
    async fn next_restart(&mut self) -> String {
        loop {
            let event = next_event(&mut self.events).await;
            if let EventData::ActorRestarted(restart) = &event.data {
                return restart.child.to_string();
            }
        }
    }
}

impl Harness {
    /// The events of session `id` from now until its end, as kinds, with the end's data.
    async fn until_end(&mut self, id: &SessionId) -> (Vec<&'static str>, EventData) {
        let mut kinds = Vec::new();
        loop {
            let (session, kind, data) = match self.seen.iter().position(|(s, _, _)| s == id) {
                Some(index) => self.seen.remove(index).unwrap(),
                None => self.next().await,
            };
            if session != *id {
                self.seen.push_back((session, kind, data));
                continue;
            }
            kinds.push(kind);
            let end = kind
                .strip_prefix("session.")
                .and_then(|s| s.parse::<SessionState>().ok())
                .is_some_and(SessionState::is_terminal);
            if end {
                return (kinds, data);
            }
        }
    }

    fn keep_processes_alive_on_terminate(&self) {
        self.runner
            .keep_alive_on_terminate
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Crashes the session's actor and waits until its next instance runs.
    async fn crash_session_actor(&mut self, id: &SessionId) {
        let handle = self.sessions().shared.handle(id).unwrap();
        assert!(handle.inject_fault(FaultKind::Panic));
        assert_eq!(self.next_restart().await, format!("sessions/{id}"));
        assert!(handle.wait_running().await);
    }

    fn record(&self, id: &SessionId) -> SessionRecord {
        self.store.data.lock().unwrap().records[id].clone()
    }

    fn terminal_transitions(&self, id: &SessionId) -> usize {
        self.store
            .data
            .lock()
            .unwrap()
            .transitions
            .iter()
            .filter(|(session, t)| session == id && t.to.is_terminal())
            .count()
    }
}

fn killed_by_sigterm() -> ProcessEvent {
    ProcessEvent::Exited(ExitStatus {
        code: None,
        signal: Some(15),
    })
}

/// Regression: the cancel lived only in the crashed instance, so the next one read the SIGTERM
/// death as a failure ("killed by signal 15").
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cancel_survives_a_crash_of_the_session_actor_between_the_signal_and_the_exit() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    h.keep_processes_alive_on_terminate();
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    let answer = h.cancel(&id).await.unwrap();
    assert_eq!(answer.state, SessionState::Running, "still running");
    assert_eq!(answer.stop_requested, Some(StopRequest::Cancel));
    assert_eq!(
        h.record(&id).stop_requested,
        Some(StopRequest::Cancel),
        "durable before the process was signalled"
    );
    assert_eq!(
        *h.runner.terminated.lock().unwrap(),
        std::slice::from_ref(&id)
    );

    h.crash_session_actor(&id).await;
    h.runner.emit(&id, killed_by_sigterm());
    match h.expect(&id, "session.cancelled").await {
        EventData::SessionCancelled(ended) => {
            assert_eq!(ended.signal, Some(15));
            assert_eq!(ended.reason.as_deref(), Some("cancelled on request"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.terminal_transitions(&id), 1);
    assert_eq!(h.record(&id).state, SessionState::Cancelled);
}

/// Regression: after a restart the backlog replayed the exit before the re-armed deadline fired,
/// so a timed-out run was recorded as failed.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_timeout_survives_a_crash_of_the_session_actor_between_the_signal_and_the_exit() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    h.keep_processes_alive_on_terminate();
    let mut spec = command("sh");
    spec.timeout_secs = Some(10);
    let id = h.submit(spec).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    // The deadline passes: the stop is recorded, then the process is signalled.
    h.runner.terminate_seen.notified().await;
    assert_eq!(h.record(&id).stop_requested, Some(StopRequest::Timeout));

    // The actor crashes; the exit arrives while it restarts.
    let handle = h.sessions().shared.handle(&id).unwrap();
    assert!(handle.inject_fault(FaultKind::Panic));
    h.runner.emit(&id, killed_by_sigterm());
    assert_eq!(h.next_restart().await, format!("sessions/{id}"));
    match h.expect(&id, "session.timed_out").await {
        EventData::SessionTimedOut(ended) => {
            assert_eq!(ended.reason.as_deref(), Some("ran past its timeout of 10s"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.terminal_transitions(&id), 1);
}

/// Regression: the new instance's Aider interpreter started empty, so a give-up printed before
/// the crash and Aider's exit 0 after it ended as `succeeded`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_aider_give_up_printed_before_a_crash_still_fails_the_run_that_exits_0() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let spec = SessionSpec {
        kind: SessionKind::Aider(AiderSession {
            message: "add a greet function".into(),
            files: Vec::new(),
            model: None,
            args: Vec::new(),
            workdir: None,
            git: false,
        }),
        ..command("sh")
    };
    let id = h.submit(spec).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    let transcript = include_str!("../fixtures/aider/rate_limited_gave_up.txt");
    h.runner.emit(
        &id,
        ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: transcript.lines().map(str::to_owned).collect(),
        },
    );
    h.expect(&id, "session.output").await;
    let mut rate_limits = 0;
    while rate_limits < 9 {
        match h.expect(&id, "session.rate_limited").await {
            EventData::SessionRateLimited(_) => rate_limits += 1,
            other => panic!("{other:?}"),
        }
    }

    h.crash_session_actor(&id).await;
    h.runner.exit(&id, 0);
    let (kinds, end) = h.until_end(&id).await;
    assert_eq!(kinds, ["session.failed"], "no signal is published twice");
    match end {
        EventData::SessionFailed(ended) => {
            assert_eq!(ended.exit_code, Some(0));
            let reason = ended.reason.unwrap();
            assert!(
                reason.contains("Aider gave up after 9 rate-limit errors"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Regression: the pending submission (and its caller's reply) lived in the crashed instance:
/// the caller got an error for a stored session, which then stayed queued until the next start
/// of the node.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_submission_in_flight_when_the_manager_crashes_is_answered_and_runs() {
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::Create);
    let mut h = Harness::start(SessionSettings::default(), store).await;
    let submission = h.submit_in_background(command("sh"));
    held.notified().await;
    let path = ActorPath::parse("sessions/manager").unwrap();
    h.tree.inject_fault(&path, FaultKind::Panic).unwrap();
    assert_eq!(h.next_restart().await, "sessions/manager");
    open.add_permits(1);

    let admitted = submission
        .await
        .unwrap()
        .expect("the manager answers")
        .expect("the submission is accepted");
    let id = admitted.record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    h.runner.exit(&id, 0);
    h.expect(&id, "session.succeeded").await;
    assert_eq!(h.runner.starts(), 1);
}

/// Regression: a submission whose store write was in flight when the node began to shut down
/// was started once written, after the running sessions had been told to stop, so nothing
/// stopped it and the shutdown waited for it to end on its own (30 s in the node).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_submission_stored_while_the_node_shuts_down_waits_for_the_next_start() {
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::Create);
    let h = Harness::start(SessionSettings::default(), store.clone()).await;
    let submission = h.submit_in_background(command("sh"));
    held.notified().await;
    let drained = h.drain_in_background().await;
    open.add_permits(1);

    let admitted = submission
        .await
        .unwrap()
        .expect("the manager answers")
        .expect("the stored submission is accepted");
    assert_eq!(admitted.position, Some(1), "queued for the next start");
    drained
        .await
        .unwrap()
        .expect("the drain is answered: nothing runs");
    assert_eq!(h.runner.starts(), 0, "never started while shutting down");
    assert_eq!(store.history(&admitted.record.id), [SessionState::Queued]);
}

/// Regression: a session taken off the queue still reads `queued` in the store until its actor
/// records `starting`; a manager restarted in between queued it again, its second actor was
/// refused (`AlreadyExists`) and the live run was recorded as failed.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_session_just_taken_off_the_queue_is_not_queued_again_by_a_restarted_manager() {
    let settings = SessionSettings {
        max_concurrent: 1,
        ..SessionSettings::default()
    };
    let store = Arc::new(MemoryStore::default());
    let mut h = Harness::start(settings, store.clone()).await;
    let first = h.submit(command("sh")).await.unwrap().record.id;
    let second = h.submit(command("sh")).await.unwrap();
    assert_eq!(second.position, Some(1));
    let second = second.record.id;
    h.expect(&first, "session.queued").await;
    h.expect(&second, "session.queued").await;
    h.expect(&first, "session.started").await;
    h.running(&first).await;

    // The second one's actor will wait in its `queued → starting` write.
    let (held, open) = store.gate(Some(second.clone()), GatedWrite::To(SessionState::Starting));
    h.runner.exit(&first, 0);
    h.expect(&first, "session.succeeded").await;
    held.notified().await;
    assert_eq!(h.record(&second).state, SessionState::Queued);

    let path = ActorPath::parse("sessions/manager").unwrap();
    h.tree.inject_fault(&path, FaultKind::Panic).unwrap();
    assert_eq!(h.next_restart().await, "sessions/manager");
    let summary = h
        .sessions()
        .manager
        .call(ManagerMsg::Summary, MANAGER_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        (summary.running, summary.queued),
        (1, 0),
        "adopted as running, not queued again"
    );

    open.add_permits(1);
    h.expect(&second, "session.started").await;
    h.running(&second).await;
    h.runner.exit(&second, 0);
    h.expect(&second, "session.succeeded").await;
    assert_eq!(h.runner.starts(), 2, "each session started once");
    assert_eq!(
        store.history(&second),
        [
            SessionState::Queued,
            SessionState::Starting,
            SessionState::Running,
            SessionState::Succeeded
        ]
    );
}

/// A session busy in a slow write holds its process's output back: once about a megabyte is
/// on its way to the actor, its sink has no room (the runner stops reading the pipe), and it has
/// room again once the actor has caught up, with every line kept.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_session_held_in_a_write_holds_its_process_output_back_and_loses_none() {
    use futures::FutureExt as _;

    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::To(SessionState::Running));
    let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    // The process runs; its session's actor waits in its `starting → running` write.
    held.notified().await;
    let sink = h.runner.sink(&id);
    // 256 lines of 1,000 bytes: 256 KiB counted per batch (each line with its `String`).
    let batch: Vec<String> = (0..256).map(|i| format!("{i:0>1000}")).collect();
    let mut delivered = 0;
    while sink.ready().now_or_never().is_some() {
        assert!(delivered < 16, "the sink never ran out of room");
        sink.deliver(ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: batch.clone(),
        })
        .unwrap();
        delivered += 1;
    }
    assert_eq!(delivered, 4, "room for 1 MiB on its way, not more");
    let room = tokio::spawn(sink.ready());
    tokio::task::yield_now().await;
    assert!(!room.is_finished(), "no room while the actor is held");

    open.add_permits(1);
    room.await.unwrap();
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.runner.exit(&id, 0);
    loop {
        match h.next().await {
            (session, "session.succeeded", _) if session == id => break,
            (session, "session.output", _) if session == id => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let stored = store.data.lock().unwrap().output.len();
    assert_eq!(stored, delivered * batch.len(), "every line kept");
}

/// A flooding session next to a quiet one: the flood is coalesced to a few events that still
/// account for every line, and a subscriber with a small buffer loses nothing of the quiet one.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_flooding_session_cannot_push_a_quiet_sessions_events_out_of_a_subscribers_buffer() {
    let buffer = 64;
    let mut h = Harness::start_with(
        SessionSettings::default(),
        Arc::default(),
        EventBusConfig {
            subscriber_buffer: buffer,
            ..EventBusConfig::default()
        },
    )
    .await;
    let quiet = h.submit(command("sh")).await.unwrap().record.id;
    let chatty = h.submit(command("sh")).await.unwrap().record.id;
    for id in [&quiet, &chatty] {
        h.expect(id, "session.queued").await;
        h.expect(id, "session.started").await;
        h.running(id).await;
    }
    // A watcher that reads nothing until the end.
    let mut watcher = h.tree.events.subscribe(EventFilter {
        kinds: vec!["session.*".parse().unwrap()],
        ..EventFilter::all()
    });
    let mut ends = h.tree.events.subscribe(EventFilter {
        kinds: vec!["session.succeeded".parse().unwrap()],
        ..EventFilter::all()
    });

    h.runner.emit(
        &quiet,
        ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: vec!["the quiet one speaks".into()],
        },
    );
    let flood: u64 = 20_000;
    for line in 0..flood {
        h.runner.emit(
            &chatty,
            ProcessEvent::Output {
                stream: OutputStream::Stderr,
                lines: vec![format!("flood {line}")],
            },
        );
    }
    h.runner.exit(&chatty, 0);
    h.runner.exit(&quiet, 0);
    for _ in 0..2 {
        next_event(&mut ends).await;
    }

    let mut quiet_lines = Vec::new();
    let mut chatty_events = 0;
    let mut chatty_lines = 0;
    let mut chatty_next = 1;
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(1), watcher.recv()).await;
        let Ok(Some(delivery)) = delivery else { break };
        let event = match delivery {
            Delivery::Event(event) => event,
            other => panic!("the watcher lost events: {other:?}"),
        };
        if let EventData::SessionOutput(output) = &event.data {
            if event.session.as_ref() == Some(&quiet) {
                quiet_lines.extend(output.lines.clone());
            } else {
                assert_eq!(output.first_line, chatty_next, "contiguous, in order");
                chatty_events += 1;
                chatty_lines += output.lines.len() as u64 + output.skipped;
                chatty_next = output.first_line + output.lines.len() as u64 + output.skipped;
            }
        }
    }
    assert_eq!(quiet_lines, ["the quiet one speaks"]);
    assert_eq!(
        chatty_lines, flood,
        "every line accounted for, in the events or as skipped"
    );
    assert!(
        chatty_events < buffer / 2,
        "{chatty_events} output events for a flood of {flood} batches"
    );
    assert_eq!(
        h.store.data.lock().unwrap().last_line[&chatty],
        flood,
        "the log has every line"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_registry_knows_where_sessions_are_until_they_end() {
    let settings = SessionSettings {
        max_concurrent: 1,
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    let running = h.submit(command("sh")).await.unwrap().record.id;
    let queued = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&running, "session.queued").await;
    h.expect(&queued, "session.queued").await;
    h.expect(&running, "session.started").await;
    h.running(&running).await;
    let tables = h.tree.registry.tables().clone();
    let known = |tables: &troupe_actors::registry::RegistryTables| {
        tables
            .sessions()
            .into_iter()
            .map(|entry| (entry.id, entry.node.to_string()))
            .collect::<Vec<_>>()
    };
    until(|| known(&tables).len() == 2).await;
    let mut expected = vec![
        (running.clone(), "n1".to_owned()),
        (queued.clone(), "n1".to_owned()),
    ];
    expected.sort();
    assert_eq!(known(&tables), expected);

    h.cancel(&queued).await.unwrap();
    h.expect(&queued, "session.cancelled").await;
    h.runner.exit(&running, 0);
    h.expect(&running, "session.succeeded").await;
    until(|| known(&tables).is_empty()).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn health_reports_the_sessions_as_fields() {
    use troupe_actors::health::{ComponentFigures, HealthStatus};

    let settings = SessionSettings {
        max_concurrent: 1,
        queue_capacity: 1,
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    let running = h.submit(command("sh")).await.unwrap().record.id;
    let queued = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&running, "session.queued").await;
    h.expect(&queued, "session.queued").await;
    h.expect(&running, "session.started").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = h.tree.health.report().await.unwrap();
    let sessions = &report.components["sessions"];
    assert_eq!(sessions.status, HealthStatus::Degraded, "the queue is full");
    let Some(ComponentFigures::Sessions(figures)) = &sessions.figures else {
        panic!("no figures: {sessions:?}")
    };
    assert_eq!(
        (
            figures.running,
            figures.queued,
            figures.max_concurrent,
            figures.queue_capacity
        ),
        (1, 1, 1, 1)
    );
    let longest = figures.longest_running.as_ref().expect("one runs");
    assert_eq!(longest.id, running);
    assert!(longest.since <= Timestamp::now());
}

/// Waits until the actor whose status this is has stopped for good.
async fn stopped(status: &mut tokio::sync::watch::Receiver<HandleStatus>) {
    tokio::time::timeout(
        Duration::from_secs(3600),
        status.wait_for(|status| matches!(status, HandleStatus::Stopped)),
    )
    .await
    .expect("the actor stops")
    .expect("its handle lives");
}

/// Yields until `condition` holds (other tasks run meanwhile); fails after many rounds.
async fn until(mut condition: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the condition never held");
}

/// Sends `message` to session `id`'s actor now (queued behind whatever it is doing).
fn cast_to_session(h: &Harness, id: &SessionId, message: SessionMsg) {
    let handle = h
        .sessions()
        .shared
        .handle(id)
        .expect("the session has an actor");
    assert!(handle.cast(message).is_ok(), "the session takes messages");
}

/// Regression: a cancel or a deadline handled after the process had exited on its own (its exit
/// still queued behind it) was recorded as the run's end: a run that exited 0 read `cancelled`
/// (or `timed_out`) with exit code 0, though nothing was stopped.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_stop_that_comes_after_the_process_exited_on_its_own_does_not_decide_the_end() {
    for stop in ["cancel", "deadline"] {
        let store = Arc::new(MemoryStore::default());
        let (held, open) = store.gate(None, GatedWrite::To(SessionState::Running));
        let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
        let id = h.submit(command("sh")).await.unwrap().record.id;
        // The process runs; its actor waits in its `starting → running` write.
        held.notified().await;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let message = match stop {
            "cancel" => SessionMsg::Cancel {
                reply: reply.into(),
            },
            _ => SessionMsg::Deadline,
        };
        cast_to_session(&h, &id, message);
        // The process exits by itself: its exit is queued behind the stop.
        h.runner.exit(&id, 0);
        open.add_permits(1);

        h.expect(&id, "session.queued").await;
        h.expect(&id, "session.started").await;
        let (kinds, end) = h.until_end(&id).await;
        assert_eq!(kinds, ["session.succeeded"], "{stop}: {end:?}");
        let record = h.record(&id);
        assert_eq!(
            (record.state, record.exit_code, record.stop_requested),
            (SessionState::Succeeded, Some(0), None),
            "{stop}"
        );
        if stop == "cancel" {
            let answered = answer.await.expect("the cancel is answered");
            assert_eq!(answered.stop_requested, None, "nothing was stopped");
        }
        assert_eq!(
            *h.runner.terminated.lock().unwrap(),
            std::slice::from_ref(&id),
            "{stop}: the runner was asked, and had nothing left to stop"
        );
    }
}

/// Regression: when the `starting → running` write failed after the process had started, the
/// actor's next instance found the process and recorded `running`, but never published
/// `session.started` (nor counted the start): followers saw the run jump from `queued` to its end.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_run_recorded_running_by_the_next_instance_of_its_actor_is_announced_started_once() {
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::To(SessionState::Running));
    let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    held.notified().await;
    // The process runs; the write that records it fails, and the actor with it.
    store.data.lock().unwrap().failing_transitions = 1;
    open.add_permits(1);
    // The next instance finds the process and records it.
    while h.record(&id).state != SessionState::Running {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    h.runner.exit(&id, 0);

    let (kinds, _) = h.until_end(&id).await;
    assert_eq!(kinds, ["session.started", "session.succeeded"]);
    assert_eq!(h.runner.starts(), 1, "the process was not started twice");
    let stats = &h.sessions().stats;
    assert_eq!(stats.started.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// Regression: a queued session whose cancellation could not be stored was taken off the queue
/// all the same: the caller was told the cancel failed, yet the session never ran, a retry
/// answered its `queued` record without cancelling it, and the next start of the node ran it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_queued_session_whose_cancel_could_not_be_stored_stays_queued() {
    let settings = SessionSettings {
        max_concurrent: 1,
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    let running = h.submit(command("sh")).await.unwrap().record.id;
    let queued = h.submit(command("sh")).await.unwrap().record.id;
    let later = h.submit(command("sh")).await.unwrap().record.id;
    for id in [&running, &queued, &later] {
        h.expect(id, "session.queued").await;
    }
    h.expect(&running, "session.started").await;
    h.running(&running).await;

    h.store.data.lock().unwrap().failing_transitions = 1;
    let refused = h.cancel(&queued).await.unwrap_err();
    assert!(matches!(refused, CancelError::Store(_)), "{refused:?}");
    let positions = h
        .sessions()
        .manager
        .call(
            |reply| ManagerMsg::Positions {
                ids: vec![queued.clone(), later.clone()],
                reply,
            },
            MANAGER_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(positions, [Some(1), Some(2)], "back in its place");

    // A retry cancels it.
    let cancelled = h.cancel(&queued).await.unwrap();
    assert_eq!(cancelled.state, SessionState::Cancelled);
    h.expect(&queued, "session.cancelled").await;
    h.runner.exit(&running, 0);
    h.expect(&running, "session.succeeded").await;
    h.expect(&later, "session.started").await;
    assert_eq!(h.runner.starts(), 2, "the cancelled one never ran");
}

/// Regression: a cancel of a session just taken off the queue (its record still `queued`, its
/// actor writing `starting`) waited in the actor's mailbox while the actor went on to launch the
/// program, which was then terminated: part of its work done, although a queued session that is
/// cancelled never starts. The launch now comes after what is already in the mailbox.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cancel_that_arrives_while_the_start_is_recorded_never_launches_the_program() {
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::To(SessionState::Starting));
    let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    held.notified().await;
    assert_eq!(h.record(&id).state, SessionState::Queued);

    let manager = h.sessions().manager.clone();
    let cancel = {
        let id = id.clone();
        tokio::spawn(async move {
            manager
                .call(|reply| ManagerMsg::Cancel { id, reply }, MANAGER_TIMEOUT)
                .await
                .unwrap()
        })
    };
    // Every task runs until it waits (time is paused): the cancel is in the actor's mailbox.
    tokio::time::sleep(Duration::from_millis(1)).await;
    open.add_permits(1);

    let record = cancel.await.unwrap().unwrap();
    assert_eq!(record.state, SessionState::Cancelled);
    let (kinds, _) = h.until_end(&id).await;
    assert_eq!(kinds, ["session.cancelled"]);
    assert_eq!(h.runner.starts(), 0, "the program never ran");
}

/// Regression: a process that exited while the store failed lost its exit status. The write of
/// the run's end failed, the actor's handler returned the error and was restarted, which
/// consumed the exit (the runner forgets a process once its exit is delivered); the next
/// instance found no process and recorded the run `interrupted` ("process was lost") after
/// waiting for it, instead of `failed` with exit code 3. Now the end is written again, with
/// backoff, until the store takes it, without a restart.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_exit_whose_end_could_not_be_recorded_is_recorded_once_the_store_takes_it() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;

    // The first three attempts fail (at the exit, then 1 s and 2 s later).
    h.store.data.lock().unwrap().failing_transitions = 3;
    h.runner.exit(&id, 3);
    let mut kinds = Vec::new();
    let end = loop {
        let event = next_event(&mut h.events).await;
        kinds.push(event.kind().as_str());
        if event.kind().as_str().starts_with("session.") && kinds.len() < 10 {
            if let EventData::SessionFailed(ended) = &event.data {
                break ended.clone();
            }
            panic!("expected session.failed, got {kinds:?}");
        }
    };
    assert_eq!(kinds, ["session.failed"], "no restart, one end");
    assert_eq!(end.exit_code, Some(3));
    assert_eq!(h.store.data.lock().unwrap().failing_transitions, 0);
    let stored = h.store.data.lock().unwrap().records[&id].clone();
    assert_eq!(stored.state, SessionState::Failed);
    assert_eq!(stored.exit_code, Some(3));
    assert_eq!(h.runner.starts(), 1);
}

/// Regression: the write of a run's end was reported failed but had landed (redb's commit can
/// fail after the new header reached the disk); the retry found the session `failed` and took
/// it for an earlier instance's end, so the actor stopped without publishing `session.failed`:
/// followers waited for good. Now the retry reads the record, sees its own end (same state,
/// time and exit) and announces it, once.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_end_whose_write_was_reported_failed_but_landed_is_announced_once() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    let mut status = h.sessions().shared.handle(&id).unwrap().watch_status();

    h.store.data.lock().unwrap().landing_failures = 1;
    h.runner.exit(&id, 3);
    match h.expect(&id, "session.failed").await {
        EventData::SessionFailed(ended) => assert_eq!(ended.exit_code, Some(3)),
        other => panic!("{other:?}"),
    }
    stopped(&mut status).await;
    assert_eq!(h.store.data.lock().unwrap().landing_failures, 0);
    assert_eq!(
        h.store.history(&id),
        [
            SessionState::Queued,
            SessionState::Starting,
            SessionState::Running,
            SessionState::Failed
        ],
        "recorded once"
    );
    // Nothing more of it, however long one waits: one end, announced once.
    tokio::time::sleep(Duration::from_secs(120)).await;
    h.assert_no_more_events_of(&id).await;
}

/// The other side of the test above: an end that someone else recorded while this instance's
/// own write failed (and did not land) is not announced by this instance.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_end_recorded_by_someone_else_while_the_write_failed_is_not_announced_again() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;
    let mut status = h.sessions().shared.handle(&id).unwrap().watch_status();

    h.store.data.lock().unwrap().failing_transitions = 1;
    let (first_arrived, first_open) = h
        .store
        .gate(Some(id.clone()), GatedWrite::To(SessionState::Failed));
    h.runner.exit(&id, 3);
    first_arrived.notified().await;
    let (retry_arrived, retry_open) = h
        .store
        .gate(Some(id.clone()), GatedWrite::To(SessionState::Failed));
    first_open.add_permits(1);
    retry_arrived.notified().await;
    // Before the retry lands, the record is ended by someone else: the same end as this
    // instance's but for its time, which tells the two apart.
    {
        let mut data = h.store.data.lock().unwrap();
        assert_eq!(data.failing_transitions, 0, "the first attempt failed");
        let record = data.records.get_mut(&id).unwrap();
        record.state = SessionState::Failed;
        record.exit_code = Some(3);
        record.reason = Some("exit code 3".into());
        record.ended_at = Some(Timestamp::from_micros(1));
    }
    retry_open.add_permits(1);
    stopped(&mut status).await;
    h.assert_no_more_events_of(&id).await;
}

/// Regression: when the `starting → running` write failed after the process had started, and
/// the process exited before the actor's next instance looked for it, that instance found no
/// process and started the program a second time: the work ran twice, the run was reported with
/// the first process's exit, and the second one ran on with nobody to stop it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_process_that_ended_while_its_actor_restarted_is_not_started_again() {
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::To(SessionState::Running));
    let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    held.notified().await;
    // The process prints, exits, and the runner forgets it; the write that records it fails.
    h.runner.emit(
        &id,
        ProcessEvent::Output {
            stream: OutputStream::Stdout,
            lines: vec!["done".into()],
        },
    );
    h.runner.exit(&id, 0);
    store.data.lock().unwrap().failing_transitions = 1;
    open.add_permits(1);

    let (kinds, end) = h.until_end(&id).await;
    assert_eq!(
        kinds,
        ["session.started", "session.output", "session.succeeded"]
    );
    match end {
        EventData::SessionSucceeded(ended) => assert_eq!(ended.exit_code, Some(0)),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.runner.starts(), 1, "the program ran once");
    assert_eq!(
        store.history(&id),
        [
            SessionState::Queued,
            SessionState::Starting,
            SessionState::Running,
            SessionState::Succeeded
        ]
    );
    assert_eq!(h.store.data.lock().unwrap().output, ["done"]);
}

/// The other side of the wait above: a run recorded `starting` whose process nobody knows and
/// of which no event comes was never started, and is launched once the wait is over; a cancel
/// meanwhile ends it without launching anything.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_starting_run_of_which_nothing_is_known_is_launched_after_the_wait_or_cancelled() {
    let store = Arc::new(MemoryStore::default());
    let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
    let starting = |id: &str| SessionRecord {
        id: SessionId::new(id).unwrap(),
        node: NodeId::new("n1").unwrap(),
        spec: command("sh"),
        state: SessionState::Starting,
        created_at: Timestamp::now(),
        started_at: None,
        ended_at: None,
        exit_code: None,
        signal: None,
        reason: None,
        process: None,
        output_lines: 0,
        stop_requested: None,
    };
    let (launched, cancelled) = (starting("s-to-launch"), starting("s-to-cancel"));
    store.insert(launched.clone());
    store.insert(cancelled.clone());
    // A restarted manager adopts them and gives each an actor, which finds no process.
    let path = ActorPath::parse("sessions/manager").unwrap();
    h.tree.inject_fault(&path, FaultKind::Panic).unwrap();
    assert_eq!(h.next_restart().await, "sessions/manager");
    h.running(&cancelled.id).await;
    let record = h.cancel(&cancelled.id).await.unwrap();
    assert_eq!(record.state, SessionState::Cancelled);
    h.expect(&cancelled.id, "session.cancelled").await;

    let waited = tokio::time::Instant::now();
    h.expect(&launched.id, "session.started").await;
    assert!(
        waited.elapsed() >= Duration::from_secs(4),
        "launched after the wait"
    );
    h.running(&launched.id).await;
    h.runner.exit(&launched.id, 0);
    h.expect(&launched.id, "session.succeeded").await;
    assert_eq!(h.runner.starts(), 1, "only the one not cancelled ran");
}

/// Regression: the node's drain (shutdown) lived in the manager instance that received it. A
/// manager that restarted meanwhile dropped the drain's answer, so the node went on to stop the
/// tree while sessions still ran, and the new instance, not knowing the node was shutting down,
/// started queued sessions that nothing would stop.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_drain_outlives_a_restart_of_the_manager() {
    let settings = SessionSettings {
        max_concurrent: 1,
        ..SessionSettings::default()
    };
    let mut h = Harness::start(settings, Arc::default()).await;
    h.keep_processes_alive_on_terminate();
    let running = h.submit(command("sh")).await.unwrap().record.id;
    let queued = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&running, "session.queued").await;
    h.expect(&queued, "session.queued").await;
    h.expect(&running, "session.started").await;
    h.running(&running).await;

    let manager = h.sessions().manager.clone();
    let drained = tokio::spawn(async move {
        manager
            .call(|reply| ManagerMsg::Drain { reply }, MANAGER_TIMEOUT)
            .await
    });
    h.runner.terminate_seen.notified().await;
    let path = ActorPath::parse("sessions/manager").unwrap();
    h.tree.inject_fault(&path, FaultKind::Panic).unwrap();
    assert_eq!(h.next_restart().await, "sessions/manager");
    let summary = h
        .sessions()
        .manager
        .call(ManagerMsg::Summary, MANAGER_TIMEOUT)
        .await
        .unwrap();
    assert_eq!((summary.running, summary.queued), (1, 1));
    assert!(!drained.is_finished(), "answered only once nothing runs");

    h.runner.emit(&running, killed_by_sigterm());
    h.runner.processes.lock().unwrap().remove(&running);
    h.expect(&running, "session.interrupted").await;
    drained
        .await
        .unwrap()
        .expect("the drain is answered by the next instance");
    assert_eq!(h.runner.starts(), 1, "nothing started while shutting down");
    assert_eq!(h.record(&queued).state, SessionState::Queued);
    let refused = h.submit(command("sh")).await.unwrap_err();
    assert!(matches!(refused, SubmitError::ShuttingDown), "{refused:?}");
}

/// Regression: a cancel whose stop request could not be stored (the session's actor failed on
/// it, and its answer with it) was answered with the stored record, as if it had been taken:
/// the caller saw a running session and waited for an end that nothing would bring.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cancel_the_session_could_not_record_is_an_error_to_retry() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    h.running(&id).await;

    h.store.data.lock().unwrap().failing_transitions = 1;
    let refused = h.cancel(&id).await.unwrap_err();
    assert!(
        matches!(&refused, CancelError::Unavailable(session) if *session == id),
        "{refused:?}"
    );
    assert!(
        h.runner.terminated.lock().unwrap().is_empty(),
        "nothing signalled"
    );

    // The actor restarted; the retry is taken.
    h.running(&id).await;
    let record = h.cancel(&id).await.unwrap();
    assert_eq!(record.stop_requested, Some(StopRequest::Cancel));
    h.expect(&id, "session.cancelled").await;
}

/// Regression: a cancel of a session whose submission was still being stored (its id known
/// through the same idempotency key) answered `NotFound` for an id the node had just handed
/// out, or its `queued` record without cancelling it; the session then ran.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cancel_of_a_session_still_being_stored_is_an_error_to_retry() {
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::Create);
    let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
    let mut spec = command("sh");
    spec.idempotency_key = Some("job-9".into());
    let first = h.submit_in_background(spec.clone());
    held.notified().await;
    let same = h.submit(spec).await.unwrap();
    assert!(same.existing);
    let id = same.record.id;

    let refused = h.cancel(&id).await.unwrap_err();
    assert!(
        matches!(&refused, CancelError::Unavailable(session) if *session == id),
        "{refused:?}"
    );
    open.add_permits(1);
    first.await.unwrap().unwrap().unwrap();
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    // The retry, once the session is stored, is taken.
    h.running(&id).await;
    let record = h.cancel(&id).await.unwrap();
    assert_eq!(record.stop_requested, Some(StopRequest::Cancel));
    h.expect(&id, "session.cancelled").await;
}

/// Regression: a submission whose store write failed freed its slot without starting what
/// waited behind it: with one slot, B, queued behind A's write, waited for some unrelated
/// message to the manager (forever on an idle node).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_submission_whose_store_write_fails_lets_the_next_one_start() {
    let settings = SessionSettings {
        max_concurrent: 1,
        ..SessionSettings::default()
    };
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::Create);
    let mut h = Harness::start(settings, store.clone()).await;
    let first = h.submit_in_background(command("sh"));
    held.notified().await;
    let second = h.submit(command("sh")).await.unwrap();
    assert_eq!(
        second.position,
        Some(1),
        "behind the first, which holds the slot"
    );
    let second = second.record.id;
    h.expect(&second, "session.queued").await;

    store.data.lock().unwrap().failing_creates = 1;
    open.add_permits(1);
    let refused = first.await.unwrap().unwrap().unwrap_err();
    assert!(matches!(refused, SubmitError::Store(_)), "{refused:?}");
    // Nothing else is sent to the manager: the failure itself frees the slot.
    h.expect(&second, "session.started").await;
    assert_eq!(h.runner.starts(), 1);
}

/// Regression: a submission whose create was reported failed but had landed (redb's commit can
/// fail after it reached the disk) was refused to its caller, who would submit it again, while
/// its record stayed queued in the store, run by nobody until the node restarted (and then run
/// as well). Now the manager reads the record back: it is there, so the submission is accepted.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_submission_whose_create_was_reported_failed_but_landed_is_accepted() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    h.store.data.lock().unwrap().landing_creates = 1;
    let admitted = h.submit(command("sh")).await.expect("accepted");
    let id = admitted.record.id;
    assert_eq!(h.store.data.lock().unwrap().landing_creates, 0);
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.started").await;
    assert_eq!(h.runner.starts(), 1);

    // A create that did not land is still refused.
    h.store.data.lock().unwrap().failing_creates = 1;
    let refused = h.submit(command("sh")).await.unwrap_err();
    assert!(matches!(refused, SubmitError::Store(_)), "{refused:?}");
}

/// Regression: a shutdown's drain that waited for a submission whose store write was in flight
/// was not answered when that write failed (nothing ran any more), so the node waited out its
/// whole shutdown timeout.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_drain_waiting_for_a_submission_whose_store_write_fails_is_answered() {
    let store = Arc::new(MemoryStore::default());
    let (held, open) = store.gate(None, GatedWrite::Create);
    let h = Harness::start(SessionSettings::default(), store.clone()).await;
    let submission = h.submit_in_background(command("sh"));
    held.notified().await;
    let drained = h.drain_in_background().await;
    assert!(!drained.is_finished(), "the submission holds a slot");

    store.data.lock().unwrap().failing_creates = 1;
    open.add_permits(1);
    let refused = submission.await.unwrap().unwrap().unwrap_err();
    assert!(matches!(refused, SubmitError::Store(_)), "{refused:?}");
    drained
        .await
        .unwrap()
        .expect("the drain is answered once the failed submission let its slot go");
}

/// Regression: a shutdown's drain that waited for a session whose actor was being started was
/// not answered when that start failed (nothing ran any more), so the node waited out its whole
/// shutdown timeout.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_drain_waiting_for_a_session_whose_actor_cannot_start_is_answered() {
    let store = Arc::new(MemoryStore::default());
    // The session actor's read of its record (its pre_start) waits for the test.
    let (held, open) = store.gate(None, GatedWrite::Get);
    let mut h = Harness::start(SessionSettings::default(), store.clone()).await;
    let id = h.submit(command("sh")).await.unwrap().record.id;
    held.notified().await;
    let drained = h.drain_in_background().await;
    assert!(
        !drained.is_finished(),
        "the session being started holds a slot"
    );

    // The read fails: the actor's pre_start fails.
    store.data.lock().unwrap().failing_gets = 1;
    open.add_permits(1);
    h.expect(&id, "session.queued").await;
    h.expect(&id, "session.failed").await;
    drained
        .await
        .unwrap()
        .expect("the drain is answered once the failed start let its slot go");
    assert_eq!(h.runner.starts(), 0);
}

/// Regression: when a session's actor could not be started and the write recording that failed
/// too, nothing wrote it again: the session stayed `queued` in the store, with no queue entry
/// and no actor, until the node restarted.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_start_failure_whose_record_cannot_be_written_is_written_again() {
    let mut h = Harness::start(SessionSettings::default(), Arc::default()).await;
    {
        let mut data = h.store.data.lock().unwrap();
        // The session actor's read of its record fails (its pre_start fails), and so do the
        // first two attempts to record that.
        data.failing_gets = 1;
        data.failing_transitions = 2;
    }
    let id = h.submit(command("sh")).await.unwrap().record.id;
    h.expect(&id, "session.queued").await;
    h.expect_failed_to_start(&id).await;
    assert_eq!(h.store.data.lock().unwrap().failing_transitions, 0);
    assert_eq!(h.runner.starts(), 0, "no process ran");
}
