//! The SessionActor: one per agent run, a transient child of the SessionSupervisor.
//!
//! Each instance starts from the durable record, never from its spawn arguments: a restarted
//! instance re-reads the store and carries on from the last recorded state. The process belongs
//! to the runner, not to the actor, and its output and exit status arrive through the actor's
//! restart-surviving handle. So a crash of the actor loses neither, and the run is reported once:
//! the store refuses a second terminal transition.
//!
//! Every state change is durable before its event is published. A stop request (cancel, timeout,
//! node shutdown) is durable before the process is signalled, and the output interpreter of a
//! new instance first reads the output log the earlier ones wrote: so a restarted instance
//! decides the same outcome its predecessor would have.

use std::time::Duration;

use ractor::RpcReplyPort;

use super::chat::ChatInterpreter;
use super::context::{HandleSink, OutputCredit, OutputInterpreter, OutputSignal, SessionContext};
use super::flood::{GateDecision, MAX_EVENT_LINE_BYTES, OutputGate, for_event};
use super::manager::ManagerMsg;
use super::ports::{ExitStatus, ProcessEvent, StoreError};
use super::spec::{ChatSession, ProcessInfo, SessionKind, SessionRecord, StopRequest, Transition};
use super::state::SessionState;
use crate::event::{
    EventData, SessionEnded, SessionLongRunning, SessionOutput, SessionRateLimited, SessionStarted,
};
use crate::ids::{SessionId, Timestamp};
use crate::kernel::{Actor, ActorError, ActorHandle, Context};

/// Messages of a SessionActor.
pub enum SessionMsg {
    /// Output or exit of the session's process (from the runner), with what it counts against
    /// the sink's output budget until it is handled.
    Process(ProcessEvent, OutputCredit),
    /// Stop the run (SIGTERM to its process group, SIGKILL after the grace period).
    Cancel {
        /// The record as it stands (still running: the end is announced by an event).
        reply: RpcReplyPort<SessionRecord>,
    },
    /// The run's timeout passed.
    Deadline,
    /// The run passed the long-running threshold this many times.
    LongRunning(u32),
    /// No exit status arrived for a process the runner no longer knows.
    ProcessLost,
    /// The node is shutting down: stop the process and record the run as interrupted.
    Interrupt,
    /// The record as it stands.
    Get(RpcReplyPort<SessionRecord>),
    /// Output held back by the per-session event bound may go out now (timer).
    FlushOutput,
    /// Launch the run: no event of a process an earlier instance may have started came in
    /// (timer; see `post_start`).
    Launch,
    /// Try again to record the run's end, whose write failed (timer; see [`PendingEnd`]).
    RetryEnd,
}

/// Arguments of a SessionActor.
#[derive(Clone)]
pub struct SessionArgs {
    /// The session.
    pub id: SessionId,
    /// Shared ports and settings.
    pub context: SessionContext,
    /// Told when the run ends.
    pub manager: ActorHandle<ManagerMsg>,
}

/// The SessionActor.
pub struct SessionActor;

/// State of one instance.
pub struct SessionActorState {
    args: SessionArgs,
    record: SessionRecord,
    interpreter: Option<Box<dyn OutputInterpreter>>,
    /// The bound on this session's `session.output` events.
    gate: OutputGate,
    /// The run ended (or could not start): stop after `post_start`.
    done: bool,
    /// The run ended, but recording its end failed: tried again until it is written.
    pending_end: Option<PendingEnd>,
    /// When the run started, on the runtime's clock (derived once per instance from the durable
    /// wall-clock `started_at`), so timers and elapsed times agree.
    anchor: tokio::time::Instant,
}

/// What a new instance found when it looked for its run.
enum Reattached {
    /// The runner still has the session's process.
    Process(ProcessInfo),
    /// The chat runner still has the session's run.
    Chat,
    /// Nobody knows the run.
    Unknown,
}

/// An end the store did not take yet. The run is over (its process exited, or it never ran), and
/// this instance is the only one that knows how: an error from the handler would restart the
/// actor and lose the message being handled, so an exit status (which the runner forgets once
/// delivered) would be recorded as a lost process. Instead the write is tried again, after
/// [`END_RETRY_FIRST`] doubling up to [`END_RETRY_MAX`], for as long as it fails (a full disk,
/// the store reopening its file); the session keeps its slot meanwhile, answers `Get` and
/// `Cancel` with its record as it stands, and ignores the rest.
///
/// Every attempt writes the same record (the end's time is the first attempt's), because a
/// write reported failed may have landed (the store's commit can fail after it reached the
/// disk): an attempt that then finds the session already ended reads the stored record, and when
/// it is this end, exactly, announces it as its own (see [`SessionActorState::end`]).
struct PendingEnd {
    state: SessionState,
    reason: Option<String>,
    status: Option<ExitStatus>,
    /// When the run ended: the time of the first attempt, which every attempt records.
    at: Timestamp,
    /// The wait before the next attempt.
    retry_in: Duration,
}

/// The first wait before recording a failed end again.
const END_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const END_RETRY_MAX: Duration = Duration::from_secs(30);

/// How long to wait for the exit status of a process the runner does not know any more.
const LOST_PROCESS_WAIT: Duration = Duration::from_secs(5);

/// Output lines read per page when a new instance replays the log to its interpreter.
const REPLAY_PAGE: usize = 1000;

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionActorState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        _ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let record = args
            .context
            .store
            .get(&args.id)
            .await?
            .ok_or_else(|| format!("session {} is not in the store", args.id))?;
        let interpreter: Option<Box<dyn OutputInterpreter>> = match record.spec.kind {
            SessionKind::Chat(_) => Some(Box::new(ChatInterpreter::default())),
            _ => args.context.commands.interpreter(&record),
        };
        let gate = OutputGate::new(
            args.context.settings.output_events_per_sec,
            tokio::time::Instant::now(),
        );
        Ok(SessionActorState {
            args,
            record,
            interpreter,
            gate,
            done: false,
            pending_end: None,
            anchor: tokio::time::Instant::now(),
        })
    }

    async fn post_start(
        &self,
        ctx: &Context<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        // Launching happens here, not in pre_start: the SessionSupervisor waits for a child's
        // pre_start, and two durable writes plus a fork there would serialize every session
        // start of the node behind one mailbox.
        let sink = || std::sync::Arc::new(HandleSink::new(ctx.handle().clone()));
        if matches!(
            state.record.state,
            SessionState::Starting | SessionState::Running
        ) {
            // A previous instance may have appended lines the record does not count.
            let appended = state
                .args
                .context
                .store
                .output_lines(&state.args.id)
                .await?;
            state.record.output_lines = state.record.output_lines.max(appended);
            // What earlier instances saw decides the outcome too (Aider's give-up before a
            // crash, then exit 0): the new interpreter reads it first.
            state.replay_output(appended).await?;
        }
        match state.record.state {
            SessionState::Queued => {
                state.persist(SessionState::Starting, None).await?;
                // Launched after what is in the mailbox already: a cancel (or a shutdown's
                // interrupt) sent while the record still said `queued` ends the run before its
                // program starts (see the `Starting` branch of `handle`).
                if ctx.send_self(SessionMsg::Launch).is_err() {
                    // Stopping already: the next instance (if any) starts from the record.
                    return Ok(());
                }
            }
            // The earlier instance started the run but did not record it (its write failed,
            // or it crashed before): record it and announce it, which that instance never did.
            SessionState::Starting => match state.reattach(sink()) {
                Reattached::Process(process) => {
                    state.record.process = Some(process);
                    state.record.started_at.get_or_insert_with(Timestamp::now);
                    state.persist(SessionState::Running, None).await?;
                    let program = program_of(&state.record).to_owned();
                    state.announce_start(program, Some(process.pid));
                }
                Reattached::Chat => {
                    state.record.started_at.get_or_insert_with(Timestamp::now);
                    state.persist(SessionState::Running, None).await?;
                    let program = program_of(&state.record).to_owned();
                    state.announce_start(program, None);
                }
                // Either the earlier instance never started it, or it started it and the
                // process ended while this one took over: its exit was delivered to this
                // actor's handle (so the runner forgot it) and waits in the mailbox. Launching
                // now would run the program a second time; wait for an event of that process
                // first, and launch only when none came.
                Reattached::Unknown => {
                    ctx.send_after(LOST_PROCESS_WAIT, SessionMsg::Launch);
                }
            },
            SessionState::Running => {
                if matches!(state.reattach(sink()), Reattached::Unknown) {
                    // Either its exit status is already on its way to this handle, or it is lost.
                    ctx.send_after(LOST_PROCESS_WAIT, SessionMsg::ProcessLost);
                } else if let Some(stop) = state.record.stop_requested {
                    // The earlier instance may have crashed between recording the request and
                    // signalling the process: signal it (again).
                    let _ = state.terminate(stop.why());
                }
            }
            _ => state.done = true,
        }
        if state.done {
            state.finished(ctx);
            return Ok(());
        }
        let started_at = state.record.started_at.unwrap_or_else(Timestamp::now);
        let now = tokio::time::Instant::now();
        state.anchor = now.checked_sub(elapsed_since(started_at)).unwrap_or(now);
        let elapsed = state.anchor.elapsed();
        let settings = &state.args.context.settings;
        let timeout = state
            .record
            .spec
            .timeout_secs
            .map_or(settings.default_timeout, Duration::from_secs);
        ctx.send_after(timeout.saturating_sub(elapsed), SessionMsg::Deadline);
        let threshold = settings.long_running_after;
        if !threshold.is_zero() {
            let passed = (elapsed.as_secs_f64() / threshold.as_secs_f64()).floor() as u32;
            let next = passed + 1;
            // A threshold too large to multiply never comes: no notice is due.
            if let Some(at) = threshold.checked_mul(next) {
                ctx.send_after(at.saturating_sub(elapsed), SessionMsg::LongRunning(next));
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        if state.record.state.is_terminal() {
            if let SessionMsg::Cancel { reply } | SessionMsg::Get(reply) = message {
                let _ = reply.send(state.record.clone());
            }
            return Ok(());
        }
        if let Some(pending) = state.pending_end.take() {
            // The run is over; only its end is left to record.
            match message {
                SessionMsg::RetryEnd => state.retry_end(ctx, pending).await?,
                SessionMsg::Cancel { reply } | SessionMsg::Get(reply) => {
                    state.pending_end = Some(pending);
                    let _ = reply.send(state.record.clone());
                }
                _ => state.pending_end = Some(pending),
            }
            return Ok(());
        }
        if state.record.state == SessionState::Starting {
            // Waiting to launch again (see `post_start`): nothing of this run is known to run.
            if matches!(message, SessionMsg::Process(..)) {
                // The earlier instance's process ran: record that, then take its event below.
                state.found_earlier_run().await?;
            } else {
                let (stop, reply) = match message {
                    SessionMsg::Launch => {
                        state.launch(ctx).await?;
                        if state.done {
                            state.finished(ctx);
                        }
                        return Ok(());
                    }
                    SessionMsg::Cancel { reply } => (StopRequest::Cancel, Some(reply)),
                    SessionMsg::Deadline => (StopRequest::Timeout, None),
                    SessionMsg::Interrupt => (StopRequest::Interrupt, None),
                    SessionMsg::Get(reply) => {
                        let _ = reply.send(state.record.clone());
                        return Ok(());
                    }
                    SessionMsg::Process(..)
                    | SessionMsg::FlushOutput
                    | SessionMsg::LongRunning(_)
                    | SessionMsg::ProcessLost
                    | SessionMsg::RetryEnd => return Ok(()),
                };
                // Nothing to signal: the run ends here.
                let reason = state.stop_reason(stop);
                state.end(ctx, stop.end_state(), Some(reason), None).await?;
                if let Some(reply) = reply {
                    let _ = reply.send(state.record.clone());
                }
                return Ok(());
            }
        }
        match message {
            SessionMsg::Launch | SessionMsg::RetryEnd => {}
            SessionMsg::Process(ProcessEvent::Output { stream, lines }, _credit) => {
                state.output(ctx, stream, lines);
            }
            SessionMsg::FlushOutput => {
                let decision = state.gate.flush(tokio::time::Instant::now());
                state.gated(ctx, decision);
            }
            SessionMsg::Process(ProcessEvent::Exited(status), _credit) => {
                state.exited(ctx, status).await?;
            }
            SessionMsg::Cancel { reply } => {
                state.request_stop(StopRequest::Cancel).await?;
                let _ = reply.send(state.record.clone());
            }
            SessionMsg::Deadline => state.request_stop(StopRequest::Timeout).await?,
            SessionMsg::LongRunning(multiple) => {
                let threshold = state.args.context.settings.long_running_after;
                let elapsed = state.anchor.elapsed();
                state.publish(EventData::SessionLongRunning(SessionLongRunning {
                    elapsed_secs: elapsed.as_secs(),
                    threshold_secs: threshold.as_secs(),
                }));
                let next = multiple + 1;
                if let Some(at) = threshold.checked_mul(next) {
                    ctx.send_after(at.saturating_sub(elapsed), SessionMsg::LongRunning(next));
                }
            }
            SessionMsg::Interrupt => state.request_stop(StopRequest::Interrupt).await?,
            SessionMsg::ProcessLost => {
                let lost = "the session's process was lost (its exit status never arrived)";
                let (end, reason) = match state.record.stop_requested {
                    Some(stop) => (
                        stop.end_state(),
                        format!("{}; {lost}", state.stop_reason(stop)),
                    ),
                    None => (SessionState::Interrupted, lost.to_owned()),
                };
                state.end(ctx, end, Some(reason), None).await?;
            }
            SessionMsg::Get(reply) => {
                let _ = reply.send(state.record.clone());
            }
        }
        Ok(())
    }
}

fn elapsed_since(at: Timestamp) -> Duration {
    Timestamp::now()
        .as_micros()
        .checked_sub(at.as_micros())
        .map_or(Duration::ZERO, Duration::from_micros)
}

impl SessionActorState {
    fn publish(&self, data: EventData) {
        self.args
            .context
            .events
            .publish(Some(self.args.id.clone()), data);
    }

    /// Records `self.record.state → to` durably.
    async fn persist(
        &mut self,
        to: SessionState,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        self.persist_at(to, reason, Timestamp::now()).await
    }

    /// [`Self::persist`], the transition made at `at`.
    async fn persist_at(
        &mut self,
        to: SessionState,
        reason: Option<String>,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let (next, transition) = self.next_record(to, reason, at);
        self.args
            .context
            .store
            .transition(next.clone(), transition)
            .await?;
        self.record = next;
        Ok(())
    }

    /// The record after `self.record.state → to` at `at`, and that transition.
    fn next_record(
        &self,
        to: SessionState,
        reason: Option<String>,
        at: Timestamp,
    ) -> (SessionRecord, Transition) {
        let transition = Transition {
            from: self.record.state,
            to,
            at,
            reason: reason.clone(),
        };
        let mut next = self.record.clone();
        next.state = to;
        if reason.is_some() {
            next.reason = reason;
        }
        if to.is_terminal() {
            next.ended_at = Some(at);
        }
        (next, transition)
    }

    /// Records a stop request durably, then signals the process (SIGTERM, SIGKILL after the
    /// grace). A request no stronger than one already recorded changes nothing.
    ///
    /// A request that finds nothing to stop (the process exited on its own, its exit still on
    /// its way to this actor) is taken back, so the exit decides the end: a run that exited 0
    /// just before a cancel or its deadline is handled ends `succeeded`, not `cancelled` or
    /// `timed_out`.
    async fn request_stop(&mut self, stop: StopRequest) -> Result<(), StoreError> {
        let asked = self.record.stop_requested;
        if asked.is_some_and(|asked| asked >= stop) {
            return Ok(());
        }
        self.record_stop(Some(stop)).await?;
        if !self.terminate(stop.why()) {
            self.record_stop(asked).await?;
        }
        Ok(())
    }

    /// Records `stop` as the run's stop request, durably.
    async fn record_stop(&mut self, stop: Option<StopRequest>) -> Result<(), StoreError> {
        let mut next = self.record.clone();
        next.stop_requested = stop;
        self.args.context.store.update(next.clone()).await?;
        self.record = next;
        Ok(())
    }

    /// The reason recorded for a run that ended after `stop`.
    fn stop_reason(&self, stop: StopRequest) -> String {
        match stop {
            StopRequest::Interrupt => "the node shut down while the session was running".into(),
            StopRequest::Cancel => "cancelled on request".into(),
            StopRequest::Timeout => {
                let timeout = self.record.spec.timeout_secs.map_or(
                    self.args.context.settings.default_timeout,
                    Duration::from_secs,
                );
                format!("ran past its timeout of {}s", timeout.as_secs())
            }
        }
    }

    /// Feeds the interpreter the stored output up to line `through`, discarding its signals
    /// (an earlier instance published them).
    async fn replay_output(&mut self, through: u64) -> Result<(), StoreError> {
        let Some(interpreter) = self.interpreter.as_mut() else {
            return Ok(());
        };
        let store = self.args.context.store.clone();
        let mut after = 0;
        while after < through {
            let page = store.read_output(&self.args.id, after, REPLAY_PAGE).await?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.line;
            for line in page.iter().filter(|line| line.line <= through) {
                let _ = interpreter.feed(line.stream, &line.text);
            }
        }
        Ok(())
    }

    /// Points the run's events at this instance: its process's, or its chat run's.
    fn reattach(&self, sink: std::sync::Arc<HandleSink>) -> Reattached {
        let context = &self.args.context;
        if let SessionKind::Chat(_) = self.record.spec.kind {
            let known = context
                .chats
                .as_ref()
                .is_some_and(|chats| chats.reattach(&self.args.id, sink));
            return if known {
                Reattached::Chat
            } else {
                Reattached::Unknown
            };
        }
        match context.runner.reattach(&self.args.id, sink) {
            Some(process) => Reattached::Process(process),
            None => Reattached::Unknown,
        }
    }

    /// Starts the process, or the chat run (state is `starting`).
    async fn launch(&mut self, ctx: &Context<SessionMsg>) -> Result<(), StoreError> {
        if let SessionKind::Chat(chat) = &self.record.spec.kind {
            let chat = chat.clone();
            return self.launch_chat(ctx, &chat).await;
        }
        let context = self.args.context.clone();
        let command = match context.commands.command(&self.record) {
            Ok(command) => command,
            Err(reason) => {
                self.fail_to_start(reason).await?;
                return Ok(());
            }
        };
        let sink = std::sync::Arc::new(HandleSink::new(ctx.handle().clone()));
        match context.runner.start(&self.args.id, &command, sink) {
            Ok(process) => {
                self.record.process = Some(process);
                self.record.started_at = Some(Timestamp::now());
                self.persist(SessionState::Running, None).await?;
                self.announce_start(command.program, Some(process.pid));
                Ok(())
            }
            Err(error) => self.fail_to_start(error.to_string()).await,
        }
    }

    async fn launch_chat(
        &mut self,
        ctx: &Context<SessionMsg>,
        chat: &ChatSession,
    ) -> Result<(), StoreError> {
        let context = self.args.context.clone();
        let Some(chats) = &context.chats else {
            return self.fail_to_start(super::chat::no_providers()).await;
        };
        let sink = std::sync::Arc::new(HandleSink::new(ctx.handle().clone()));
        match chats.start(&self.args.id, chat, sink) {
            Ok(()) => {
                self.record.started_at = Some(Timestamp::now());
                self.persist(SessionState::Running, None).await?;
                self.announce_start(program_of(&self.record).to_owned(), None);
                Ok(())
            }
            Err(error) => self.fail_to_start(error.to_string()).await,
        }
    }

    /// A process event came while this instance waited to launch the run: the earlier instance
    /// had started it without recording it. Records it running and announces it (pid unknown).
    async fn found_earlier_run(&mut self) -> Result<(), StoreError> {
        self.record.started_at.get_or_insert_with(Timestamp::now);
        self.persist(SessionState::Running, None).await?;
        let program = program_of(&self.record).to_owned();
        self.announce_start(program, None);
        Ok(())
    }

    /// Counts the run as started and publishes `session.started` (its `running` is recorded).
    fn announce_start(&self, program: String, pid: Option<u32>) {
        self.args
            .context
            .stats
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish(EventData::SessionStarted(SessionStarted { program, pid }));
    }

    async fn fail_to_start(&mut self, reason: String) -> Result<(), StoreError> {
        self.persist(SessionState::Failed, Some(reason.clone()))
            .await?;
        self.announce_end(SessionState::Failed, Some(reason), None);
        self.done = true;
        Ok(())
    }

    fn output(
        &mut self,
        ctx: &Context<SessionMsg>,
        stream: crate::event::OutputStream,
        lines: Vec<String>,
    ) {
        if lines.is_empty() {
            return;
        }
        let first_line = self.record.output_lines + 1;
        self.record.output_lines += lines.len() as u64;
        self.args
            .context
            .store
            .append_output(&self.args.id, stream, first_line, &lines);
        let mut signals = Vec::new();
        if let Some(interpreter) = self.interpreter.as_mut() {
            for line in &lines {
                signals.extend(interpreter.feed(stream, line));
            }
        }
        let per_event = self.args.context.settings.lines_per_event.max(1);
        let (lines, skipped) = for_event(lines, per_event, MAX_EVENT_LINE_BYTES);
        let decision = self.gate.offer(
            tokio::time::Instant::now(),
            SessionOutput {
                stream,
                first_line,
                lines,
                skipped,
            },
        );
        self.gated(ctx, decision);
        self.signal(signals);
    }

    /// Publishes what the output gate lets out and arms its flush timer.
    fn gated(&self, ctx: &Context<SessionMsg>, decision: GateDecision) {
        for output in decision.publish {
            self.publish(EventData::SessionOutput(output));
        }
        if let Some(after) = decision.flush_after {
            ctx.send_after(after, SessionMsg::FlushOutput);
        }
    }

    fn signal(&self, signals: Vec<OutputSignal>) {
        for signal in signals {
            match signal {
                OutputSignal::RateLimited {
                    provider,
                    retry_in,
                    line,
                } => self.publish(EventData::SessionRateLimited(SessionRateLimited {
                    provider,
                    retry_in_ms: retry_in.map(|delay| delay.as_millis() as u64),
                    line,
                })),
            }
        }
    }

    /// Signals the run to stop; false when there was nothing left to stop.
    fn terminate(&self, why: &str) -> bool {
        let context = &self.args.context;
        let stopped = match (&self.record.spec.kind, &context.chats) {
            (SessionKind::Chat(_), Some(chats)) => chats.cancel(&self.args.id),
            (SessionKind::Chat(_), None) => false,
            _ => context
                .runner
                .terminate(&self.args.id, context.settings.kill_grace),
        };
        if !stopped {
            tracing::debug!(session = %self.args.id, why, "nothing to terminate: the process already exited");
        }
        stopped
    }

    async fn exited(
        &mut self,
        ctx: &Context<SessionMsg>,
        status: ExitStatus,
    ) -> Result<(), StoreError> {
        if let Some(interpreter) = self.interpreter.as_mut() {
            let signals = interpreter.finish();
            self.signal(signals);
        }
        let (state, reason) = if let Some(stop) = self.record.stop_requested {
            (stop.end_state(), Some(self.stop_reason(stop)))
        } else {
            let verdict = self
                .interpreter
                .as_ref()
                .and_then(|interpreter| interpreter.outcome(&status));
            match verdict {
                Some(Ok(())) => (SessionState::Succeeded, None),
                Some(Err(reason)) => (SessionState::Failed, Some(reason)),
                None if status.success() => (SessionState::Succeeded, None),
                None => (SessionState::Failed, Some(describe_exit(&status))),
            }
        };
        self.end(ctx, state, reason, Some(status)).await
    }

    async fn end(
        &mut self,
        ctx: &Context<SessionMsg>,
        state: SessionState,
        reason: Option<String>,
        status: Option<ExitStatus>,
    ) -> Result<(), StoreError> {
        if let Some(status) = status {
            self.record.exit_code = status.code;
            self.record.signal = status.signal;
        }
        // A retry records the end the first attempt tried to (see `PendingEnd`).
        let at = self
            .pending_end
            .as_ref()
            .map_or_else(Timestamp::now, |pending| pending.at);
        let failure = match self.persist_at(state, reason.clone(), at).await {
            Ok(()) => None,
            Err(StoreError::Conflict { actual, .. }) if actual.is_terminal() => {
                match self.own_end_landed(state, &reason, at).await {
                    // An attempt of this instance reported failed had landed: the end is
                    // recorded, and not announced yet.
                    Ok(Some(stored)) => {
                        self.record = stored;
                        None
                    }
                    Ok(None) => {
                        // Already recorded by an earlier instance: never report a run twice.
                        self.record.state = actual;
                        self.finished(ctx);
                        return Ok(());
                    }
                    Err(error) => Some(error),
                }
            }
            // The storage failed; anything else would fail again the same way.
            Err(error @ (StoreError::Io(_) | StoreError::InUse(_))) => Some(error),
            Err(error) => return Err(error),
        };
        if let Some(error) = failure {
            let retry_in = self
                .pending_end
                .as_ref()
                .map_or(END_RETRY_FIRST, |pending| pending.retry_in);
            tracing::warn!(
                session = %self.args.id,
                end = %state,
                %error,
                retry_in = ?retry_in,
                "the session's end could not be recorded; trying again"
            );
            ctx.send_after(retry_in, SessionMsg::RetryEnd);
            self.pending_end = Some(PendingEnd {
                state,
                reason,
                status,
                at,
                retry_in: (retry_in * 2).min(END_RETRY_MAX),
            });
            return Ok(());
        }
        self.pending_end = None;
        // Output held back by the event bound goes out before the end.
        if let Some(output) = self.gate.drain() {
            self.publish(EventData::SessionOutput(output));
        }
        self.announce_end(state, reason, status);
        self.finished(ctx);
        Ok(())
    }

    /// Records an end whose write failed before (see [`PendingEnd`]).
    async fn retry_end(
        &mut self,
        ctx: &Context<SessionMsg>,
        pending: PendingEnd,
    ) -> Result<(), StoreError> {
        let PendingEnd {
            state,
            reason,
            status,
            at,
            retry_in,
        } = pending;
        // Kept for `end` to record the same end again and to double the wait, should this
        // attempt fail too.
        self.pending_end = Some(PendingEnd {
            state,
            reason: None,
            status: None,
            at,
            retry_in,
        });
        // An error here is not a storage failure but a refusal of the end itself (the record
        // changed under this instance): a new instance starts from the stored record.
        self.end(ctx, state, reason, status).await
    }

    /// After an attempt to record the end found the session ended: the stored record when it is
    /// the end this instance wrote in an attempt reported failed (the same state, time, reason
    /// and exit), `None` when someone else ended it (or no attempt of this instance failed), an
    /// error when the record cannot be read (the caller tries again later).
    async fn own_end_landed(
        &mut self,
        state: SessionState,
        reason: &Option<String>,
        at: Timestamp,
    ) -> Result<Option<SessionRecord>, StoreError> {
        if self.pending_end.is_none() {
            return Ok(None);
        }
        let (written, _) = self.next_record(state, reason.clone(), at);
        let stored = self.args.context.store.get(&self.args.id).await?;
        Ok(stored.filter(|stored| {
            stored.state == written.state
                && stored.ended_at == written.ended_at
                && stored.reason == written.reason
                && stored.exit_code == written.exit_code
                && stored.signal == written.signal
        }))
    }

    fn announce_end(
        &self,
        state: SessionState,
        reason: Option<String>,
        status: Option<ExitStatus>,
    ) {
        let duration = if self.record.started_at.is_some() {
            self.anchor.elapsed()
        } else {
            elapsed_since(self.record.created_at)
        };
        self.args.context.stats.record_end(state, duration);
        let ended = SessionEnded {
            exit_code: status.and_then(|s| s.code),
            signal: status.and_then(|s| s.signal),
            reason,
            duration_ms: duration.as_millis() as u64,
        };
        let data = match state {
            SessionState::Succeeded => EventData::SessionSucceeded(ended),
            SessionState::Cancelled => EventData::SessionCancelled(ended),
            SessionState::TimedOut => EventData::SessionTimedOut(ended),
            SessionState::Interrupted => EventData::SessionInterrupted(ended),
            _ => EventData::SessionFailed(ended),
        };
        self.publish(data);
    }

    /// Tells the manager the slot is free and stops (a normal exit: transient, not restarted).
    fn finished(&mut self, ctx: &Context<SessionMsg>) {
        self.done = true;
        let _ = self.args.manager.cast(ManagerMsg::Finished {
            id: self.args.id.clone(),
        });
        ctx.stop(None);
    }
}

/// "exit code 3", "killed by signal 9".
pub fn describe_exit(status: &ExitStatus) -> String {
    match (status.code, status.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "ended without an exit status".into(),
    }
}

/// The program a spec runs, for events (no arguments: they may hold secrets).
pub fn program_of(record: &SessionRecord) -> &str {
    match &record.spec.kind {
        SessionKind::Command(command) => &command.program,
        SessionKind::Aider(_) => "aider",
        SessionKind::Chat(_) => "chat",
    }
}
