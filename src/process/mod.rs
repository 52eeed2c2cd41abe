//! The node's process runner: [`LocalRunner`] runs session programs as local processes, each in
//! its own process group, and implements [`ProcessRunner`] for the SessionActors.
//!
//! It is a port implementation shared by every SessionActor, not an actor. Per process it
//! spawns one driver task on the runtime that called [`ProcessRunner::start`]; the driver owns
//! the child, reads both pipes and emits the events. [`ProcessRunner::terminate`] and
//! [`ProcessRunner::kill_leftovers`] spawn short-lived tasks for their SIGKILL follow-up. The
//! process table sits behind a `std` mutex that is held only to look up, insert or remove an
//! entry, never across an `.await` or a signal.
//!
//! # When a session's process is over
//!
//! The exit is reported (one [`ProcessEvent::Exited`], after all output) once the leader has
//! exited, its output pipes are drained and nothing of its process group is left alive:
//!
//! - Background jobs (grandchildren, same group) that keep stdout or stderr open keep the
//!   session running: their output is still the session's. It ends when they exit, or when
//!   [`ProcessRunner::terminate`] (cancel, timeout) kills the group. The reported status is the
//!   leader's.
//! - Background jobs that closed their output and outlive the leader are the session's
//!   leftovers: the runner sends the group SIGTERM, then SIGKILL after
//!   [`RunnerConfig::cleanup_grace`], before it reports the exit. No orphans.
//! - A process that left the group (`setsid`) but holds the pipes cannot be signalled through
//!   the group: once the group has no live member, the runner reads for
//!   `OUTSIDE_HOLDER_GRACE` (200 ms) more, then stops reading and reports the exit (while the
//!   session has no room for output, it first reads what the exited group may have left in
//!   the pipes, up to `LEFT_IN_PIPES`). When the
//!   session ends on its own, such a process is left running (it may be a server the session
//!   meant to start); [`ProcessRunner::terminate`] (cancel, timeout, shutdown) also stops every
//!   process that left the group, found by the session id in its environment.
//!
//! # Delivery
//!
//! Events go to the session's current sink, in order (each stream's lines in order; stdout and
//! stderr batches interleave as they are emitted). Once a sink refuses an event, that event and
//! every later one wait in a bounded backlog ([`RunnerConfig::backlog_lines`],
//! [`RunnerConfig::backlog_bytes`]; the oldest output lines go first, with a marker line saying
//! how many; the exit is never dropped) until [`ProcessRunner::reattach`] replays them to a new
//! sink. The runner forgets a process once a sink has taken its exit. `ProcessSink::deliver` is
//! called under the process's delivery lock: it must not block, nor call back into the runner.
//!
//! # What outlives what
//!
//! Processes outlive their driver: `kill_on_drop` is off, so if the runtime shuts down (or the
//! node is killed) the processes keep running, and the next node start finds their groups in
//! the store and hands them to [`ProcessRunner::kill_leftovers`].

pub(crate) mod delivery;
mod group;
mod output;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use troupe_actors::event::OutputStream;
use troupe_actors::ids::SessionId;
use troupe_actors::session::{
    CommandLine, ExitStatus, Leftover, LeftoverGroup, OutputLimits, ProcessEvent, ProcessInfo,
    ProcessRunner, ProcessSink, RunnerError, SESSION_ID_ENV,
};

use self::delivery::{BacklogLimits, Delivery};
use self::group::{Own, ProcStat};

/// How often a driver looks for live members of a group whose leader exited while its output
/// is still open.
const GROUP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How long output is still read after the group has no live member (only processes outside
/// the group can still hold the pipes then).
const OUTSIDE_HOLDER_GRACE: Duration = Duration::from_millis(200);

/// The most the exited group can have left in a process's two pipes: each holds at most
/// `/proc/sys/fs/pipe-max-size` (1 MiB by default), the most an unprivileged process can give
/// a pipe. Once this much more was read after the group died, the rest is an outside holder's.
const LEFT_IN_PIPES: u64 = 2 * 1024 * 1024;

/// Settings of a [`LocalRunner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Line cap and batching.
    pub output: OutputLimits,
    /// Output lines kept per process while its session takes no events.
    pub backlog_lines: usize,
    /// Bytes of output lines kept per process while its session takes no events.
    pub backlog_bytes: usize,
    /// After the leader exited and the output closed, how long leftover members of the group
    /// get between SIGTERM and SIGKILL.
    pub cleanup_grace: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            output: OutputLimits::default(),
            backlog_lines: 10_000,
            backlog_bytes: 16 * 1024 * 1024,
            cleanup_grace: Duration::from_secs(2),
        }
    }
}

/// Runs session programs as local processes (Linux): own process group, stdin closed, output
/// read line by line, the group signalled as a whole. See the [module docs](self).
#[derive(Debug)]
pub struct LocalRunner {
    config: RunnerConfig,
    table: Arc<Table>,
}

impl LocalRunner {
    /// A runner with these output limits and the default backlog and cleanup settings. A
    /// `max_batch_lines` of 0 counts as 1.
    pub fn new(limits: OutputLimits) -> Self {
        Self::with_config(RunnerConfig {
            output: limits,
            ..RunnerConfig::default()
        })
    }

    /// A runner with every setting given.
    pub fn with_config(config: RunnerConfig) -> Self {
        Self {
            config,
            table: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    fn live(&self, session: &SessionId) -> Option<Arc<Process>> {
        match lock(&self.table).get(session) {
            Some(Slot::Live(process)) => Some(process.clone()),
            Some(Slot::Starting) | None => None,
        }
    }

    /// Resolves once `session`'s exit has been emitted (delivered or kept).
    #[cfg(test)]
    async fn exit_emitted(&self, session: &SessionId) {
        let process = self.live(session).expect("the runner knows the session");
        let mut done = process.done.subscribe();
        let _ = done.wait_for(|done| *done).await;
    }
}

impl Default for LocalRunner {
    fn default() -> Self {
        Self::with_config(RunnerConfig::default())
    }
}

impl ProcessRunner for LocalRunner {
    fn start(
        &self,
        session: &SessionId,
        command: &CommandLine,
        sink: Arc<dyn ProcessSink>,
    ) -> Result<ProcessInfo, RunnerError> {
        let spawn_error = |reason: String| RunnerError::Spawn {
            program: command.program.clone(),
            reason,
        };
        let runtime = Handle::try_current().map_err(|_| {
            spawn_error("the process runner must be called from within a tokio runtime".into())
        })?;
        check_workdir(command).map_err(spawn_error)?;
        let program = resolve_program(&command.program).map_err(spawn_error)?;
        let reservation = Reservation::new(&self.table, session)?;

        let mut child = build_command(session, &program, command)
            .spawn()
            .map_err(|error| spawn_error(describe_spawn_error(&error)))?;
        let (Some(pid), Some(stdout), Some(stderr)) =
            (child.id(), child.stdout.take(), child.stderr.take())
        else {
            // Cannot happen with piped streams; if it does, leave nothing behind.
            if let Some(pid) = child.id() {
                group::signal_group(pid as i32, Signal::SIGKILL);
            }
            return Err(spawn_error(
                "the process started without its output pipes".into(),
            ));
        };
        // Pids fit in i32 (pid_max is at most 2^22).
        let pgid = pid as i32;
        // The child cannot have been reaped yet (only the driver waits for it), so its /proc
        // entry is there, and its start time is set at fork, before exec.
        let start_ticks = match group::read_proc(pgid) {
            Ok(stat) => Some(stat.start_ticks),
            Err(error) => {
                tracing::warn!(%session, pid, %error, "cannot read the start time of a session process");
                None
            }
        };
        let info = ProcessInfo {
            pid,
            pgid,
            start_ticks,
        };
        let limits = BacklogLimits {
            lines: self.config.backlog_lines,
            bytes: self.config.backlog_bytes,
        };
        let process = Arc::new(Process {
            session: session.clone(),
            info,
            runtime: runtime.clone(),
            delivery: Mutex::new(Delivery::new(sink, limits)),
            done: watch::Sender::new(false),
        });
        reservation.fill(process.clone());
        tracing::info!(%session, pid, program = %command.program, "session process started");
        let pipes = Pipes { stdout, stderr };
        runtime.spawn(drive(
            process,
            self.table.clone(),
            child,
            pipes,
            self.config,
        ));
        Ok(info)
    }

    fn reattach(&self, session: &SessionId, sink: Arc<dyn ProcessSink>) -> Option<ProcessInfo> {
        let process = self.live(session)?;
        let exit_delivered = {
            let mut delivery = lock(&process.delivery);
            if delivery.exit_delivered() {
                // A sink took the exit a moment ago: the process is gone.
                return None;
            }
            delivery.reattach(sink);
            delivery.exit_delivered()
        };
        if exit_delivered {
            forget(&self.table, &process);
        }
        Some(process.info)
    }

    fn terminate(&self, session: &SessionId, grace: Duration) -> bool {
        let Some(process) = self.live(session) else {
            return false;
        };
        if lock(&process.delivery).exit_emitted() {
            return false;
        }
        let pgid = process.info.pgid;
        tracing::info!(%session, pgid, ?grace, "terminating a session's process group");
        group::signal_group(pgid, Signal::SIGTERM);
        // What left the group (`setsid`) is found by the session id in its environment.
        process
            .runtime
            .spawn(group::terminate_escaped(session.clone(), pgid, grace));
        let mut done = process.done.subscribe();
        let mut last_pass = KillGroupOnDrop {
            pgid,
            done: Some(done.clone()),
        };
        process.runtime.spawn(async move {
            let ended = tokio::time::timeout(grace, done.wait_for(|done| *done))
                .await
                .is_ok();
            last_pass.disarm();
            // Ok(Err(_)) counts too: the process is gone with its driver, its group was empty.
            if ended {
                return;
            }
            if group::has_live_members_async(pgid).await && !*done.borrow() {
                tracing::info!(
                    pgid,
                    ?grace,
                    "process group outlived SIGTERM; sending SIGKILL"
                );
                group::signal_group(pgid, Signal::SIGKILL);
            }
        });
        true
    }

    fn kill_leftovers(&self, leftovers: &[Leftover], grace: Duration) -> Vec<i32> {
        let own = match Own::current() {
            Ok(own) => own,
            Err(error) => {
                tracing::error!(%error, "cannot read /proc: leaving the recorded process groups alone");
                return Vec::new();
            }
        };
        let ours: Vec<i32> = lock(&self.table)
            .values()
            .filter_map(|slot| match slot {
                Slot::Live(process) => Some(process.info.pgid),
                Slot::Starting => None,
            })
            .collect();
        let mut groups: Vec<LeftoverGroup> = leftovers.iter().filter_map(|l| l.group).collect();
        // Processes still carrying one of the sessions' ids: a group never recorded (the node
        // stopped between the fork and the commit of `running`), or members that left it.
        let sessions: std::collections::HashSet<&str> =
            leftovers.iter().map(|l| l.session.as_str()).collect();
        match group::session_processes(&sessions, &own) {
            Ok(found) => {
                for (process, _) in found {
                    if !groups.iter().any(|g| g.pgid == process.pgrp) {
                        groups.push(LeftoverGroup {
                            pgid: process.pgrp,
                            start_ticks: None,
                        });
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot scan /proc for processes of sessions that ran before the restart");
            }
        }
        let mut signalled = Vec::new();
        let mut follow_up = Vec::new();
        for group in &groups {
            if ours.contains(&group.pgid) {
                tracing::info!(
                    pgid = group.pgid,
                    "leaving a recorded process group alone: it belongs to a running session"
                );
                continue;
            }
            let members = match group::group_members(group.pgid) {
                Ok(members) => members,
                Err(error) => {
                    tracing::warn!(pgid = group.pgid, %error, "cannot inspect a recorded process group; leaving it alone");
                    continue;
                }
            };
            match group::judge_leftover(group, &members, &own) {
                Ok(()) => {
                    tracing::info!(
                        pgid = group.pgid,
                        members = members.iter().filter(|m| m.is_alive()).count(),
                        "terminating a process group left over from before the restart"
                    );
                    group::signal_group(group.pgid, Signal::SIGTERM);
                    signalled.push(group.pgid);
                    follow_up.push((*group, members));
                }
                Err(reason) => {
                    tracing::info!(pgid = group.pgid, %reason, "leaving a recorded process group alone");
                }
            }
        }
        if !follow_up.is_empty() {
            let kill = move || kill_surviving_leftovers(&follow_up, &own);
            match Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        tokio::time::sleep(grace).await;
                        let _ = tokio::task::spawn_blocking(kill).await;
                    });
                }
                Err(_) => {
                    std::thread::spawn(move || {
                        std::thread::sleep(grace);
                        kill();
                    });
                }
            }
        }
        signalled
    }
}

/// SIGKILLs the leftover groups that still have live members, if they still pass the rule and
/// still hold a process seen at SIGTERM time (so a group that died and whose pgid was taken
/// again meanwhile is left alone).
fn kill_surviving_leftovers(groups: &[(LeftoverGroup, Vec<ProcStat>)], own: &Own) {
    for (group, before) in groups {
        let Ok(members) = group::group_members(group.pgid) else {
            continue;
        };
        let same_group = members.iter().any(|member| {
            member.is_alive()
                && before
                    .iter()
                    .any(|b| b.pid == member.pid && b.start_ticks == member.start_ticks)
        });
        if same_group && group::judge_leftover(group, &members, own).is_ok() {
            tracing::info!(
                pgid = group.pgid,
                "leftover process group outlived SIGTERM; sending SIGKILL"
            );
            group::signal_group(group.pgid, Signal::SIGKILL);
        }
    }
}

type Table = Mutex<HashMap<SessionId, Slot>>;

#[derive(Debug)]
enum Slot {
    /// `start` is spawning the process (keeps a second `start` out without holding the lock
    /// during the spawn).
    Starting,
    /// The runner has a process for the session.
    Live(Arc<Process>),
}

/// One process the runner knows.
struct Process {
    session: SessionId,
    info: ProcessInfo,
    /// Where terminate's follow-up task runs.
    runtime: Handle,
    delivery: Mutex<Delivery>,
    /// Set once the exit has been emitted (delivered or kept).
    done: watch::Sender<bool>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("session", &self.session)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Process {
    /// Delivers or keeps `event`; true once a sink has taken the exit.
    fn emit(&self, event: ProcessEvent) -> bool {
        let mut delivery = lock(&self.delivery);
        delivery.push(event);
        delivery.exit_delivered()
    }

    /// Resolves once the session has room for more output (see [`Delivery::ready`]).
    fn ready(&self) -> BoxFuture<'static, ()> {
        lock(&self.delivery).ready()
    }
}

/// A `Starting` slot, removed again unless filled (a failed spawn leaves nothing behind).
struct Reservation<'a> {
    table: &'a Table,
    session: SessionId,
    filled: bool,
}

impl<'a> Reservation<'a> {
    fn new(table: &'a Table, session: &SessionId) -> Result<Self, RunnerError> {
        let mut slots = lock(table);
        if slots.contains_key(session) {
            return Err(RunnerError::AlreadyRunning(session.clone()));
        }
        slots.insert(session.clone(), Slot::Starting);
        Ok(Self {
            table,
            session: session.clone(),
            filled: false,
        })
    }

    fn fill(mut self, process: Arc<Process>) {
        lock(self.table).insert(self.session.clone(), Slot::Live(process));
        self.filled = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.filled {
            lock(self.table).remove(&self.session);
        }
    }
}

/// Removes `process` from the table (not a newer process of the same session).
fn forget(table: &Table, process: &Arc<Process>) {
    let mut slots = lock(table);
    if let Some(Slot::Live(known)) = slots.get(&process.session)
        && Arc::ptr_eq(known, process)
    {
        slots.remove(&process.session);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking sink must not take the whole runner down with a poisoned lock: the state
    // behind these locks stays consistent between statements.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Pipes {
    stdout: ChildStdout,
    stderr: ChildStderr,
}

/// Owns one process until its exit is emitted: reads its output, waits for it and its group,
/// cleans up leftovers, emits the exit. See the module docs for when a process is over.
async fn drive(
    process: Arc<Process>,
    table: Arc<Table>,
    mut child: Child,
    pipes: Pipes,
    config: RunnerConfig,
) {
    let pgid = process.info.pgid;
    let stop = CancellationToken::new();
    // While a pump waits for the session to have room, its pipe may still hold the exited
    // group's output: no outside holder is presumed until that much was read.
    let share = output::PumpShare::default();
    let pumps = async {
        tokio::join!(
            output::pump(
                pipes.stdout,
                OutputStream::Stdout,
                config.output,
                stop.clone(),
                (|| process.ready(), &share),
                |event| {
                    process.emit(event);
                },
            ),
            output::pump(
                pipes.stderr,
                OutputStream::Stderr,
                config.output,
                stop.clone(),
                (|| process.ready(), &share),
                |event| {
                    process.emit(event);
                },
            ),
        )
    };
    tokio::pin!(pumps);
    let mut drained = false;
    let mut status = None;
    let mut check = tokio::time::interval(GROUP_CHECK_INTERVAL);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // When the group was first seen gone, and the bytes read from the pipes by then.
    let mut group_gone: Option<(Instant, u64)> = None;
    let status = loop {
        if drained && let Some(status) = status {
            break status;
        }
        tokio::select! {
            _ = &mut pumps, if !drained => drained = true,
            waited = child.wait(), if status.is_none() => status = Some(exit_status(&waited)),
            // The leader exited but the output is still open: held by the group or by
            // someone outside it.
            _ = check.tick(), if status.is_some() && !drained && group_gone.is_none() => {
                if !group::has_live_members_async(pgid).await {
                    group_gone = Some((Instant::now(), share.read.load(Ordering::Acquire)));
                }
            }
            () = sleep_until(group_gone.map(|(at, _)| at + OUTSIDE_HOLDER_GRACE)),
                if group_gone.is_some() && !stop.is_cancelled() =>
            {
                let read_then = group_gone.map_or(0, |(_, read)| read);
                let read_since = share.read.load(Ordering::Acquire).saturating_sub(read_then);
                if share.held.load(Ordering::Acquire) > 0 && read_since < LEFT_IN_PIPES {
                    // Not read because the session had no room: what is in the pipes may be
                    // the exited group's own output. Give it another grace.
                    group_gone = Some((Instant::now(), read_then));
                    continue;
                }
                tracing::warn!(
                    session = %process.session,
                    pgid,
                    "a process outside the session's group holds its output open; no longer reading it"
                );
                stop.cancel();
            }
        }
    };
    if group::has_live_members_async(pgid).await {
        tracing::info!(
            session = %process.session,
            pgid,
            "the session's process exited and left processes behind; terminating them"
        );
        group::terminate_group(pgid, config.cleanup_grace).await;
    }
    tracing::info!(session = %process.session, pid = process.info.pid, ?status, "session process exited");
    let exit_delivered = process.emit(ProcessEvent::Exited(status));
    process.done.send_replace(true);
    if exit_delivered {
        forget(&table, &process);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

fn exit_status(waited: &std::io::Result<std::process::ExitStatus>) -> ExitStatus {
    match waited {
        Ok(status) => ExitStatus {
            code: status.code(),
            signal: status.signal(),
        },
        Err(error) => {
            tracing::error!(%error, "waiting for a session process failed");
            ExitStatus {
                code: None,
                signal: None,
            }
        }
    }
}

/// The directories searched when the node itself has no `PATH` (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// The executable `program` names: a path (it holds a `/`) as it is, a bare name looked up in
/// the *node's* `PATH`, never in the session's environment. The allow-list admits programs by
/// name, and a session that sets `PATH` in its `env` must not be able to swap the program for
/// one of its own: its `PATH` only reaches what the program itself runs. Relative entries of
/// the node's `PATH` (`.`, empty) are skipped, so the session's working directory is never
/// searched either.
fn resolve_program(program: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable_file(candidate))
        .ok_or_else(|| {
            "not found in PATH (the node's own: a session's env PATH is not searched); give a \
             full path or add its directory to the PATH the node runs with"
                .to_owned()
        })
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

fn build_command(session: &SessionId, program: &Path, command: &CommandLine) -> Command {
    let mut built = Command::new(program);
    built
        // argv[0] stays the name the session gave, as if its shell had looked it up.
        .arg0(&command.program)
        .args(&command.args)
        .current_dir(&command.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false)
        .process_group(0);
    for name in &command.env_remove {
        built.env_remove(name);
    }
    built.envs(&command.env);
    // Set last, so nothing overrides it: it is how a restarted node finds the session's
    // processes even when it never recorded their group (see `kill_leftovers`).
    built.env(SESSION_ID_ENV, session.as_str());
    built
}

/// Checks the working directory first: the OS reports a missing one as a missing program.
fn check_workdir(command: &CommandLine) -> Result<(), String> {
    let workdir = &command.workdir;
    match std::fs::metadata(workdir) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "the working directory {} is not a directory",
            workdir.display()
        )),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "the working directory {} does not exist",
            workdir.display()
        )),
        Err(error) => Err(format!(
            "the working directory {} is not usable: {error}",
            workdir.display()
        )),
    }
}

fn describe_spawn_error(error: &std::io::Error) -> String {
    match error.kind() {
        // The program was found (a bare name is resolved first), so it vanished meanwhile or
        // names an interpreter (`#!`) that does not exist.
        std::io::ErrorKind::NotFound => {
            format!("no such file, or its interpreter is missing ({error})")
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied: the file is not executable, or a directory on its path or the \
             working directory is not accessible ({error})"
        ),
        _ => error.to_string(),
    }
}

/// The SIGKILL that follows a terminate's grace, sent at once when the task waiting out the
/// grace is dropped while still armed: the node stopped within the grace (its runtime went,
/// with the task), and a group that ignored SIGTERM would otherwise run on after it. Sent only
/// while the group's leader has not been reaped (`done` false), so the group id is still its
/// own and cannot have been reused.
struct KillGroupOnDrop {
    pgid: i32,
    /// `None` once the grace is over (the task decides) or disarmed.
    done: Option<watch::Receiver<bool>>,
}

impl KillGroupOnDrop {
    /// The grace is over: the task that holds this decides.
    fn disarm(&mut self) {
        self.done = None;
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let Some(done) = self.done.take() else {
            return;
        };
        if *done.borrow() {
            return;
        }
        tracing::info!(
            pgid = self.pgid,
            "the node is stopping within a session's grace; sending SIGKILL to its process group"
        );
        group::signal_group(self.pgid, Signal::SIGKILL);
    }
}
