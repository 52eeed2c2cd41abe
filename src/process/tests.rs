//! The runner against real processes (`sh`, `seq`, `sleep`). Every wait is on an event (a line,
//! the exit, a closed pipe) with a 10 s safety net, except where noted.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use troupe_actors::event::OutputStream;
use troupe_actors::ids::SessionId;
use troupe_actors::session::{
    CommandLine, ExitStatus, Leftover, LeftoverGroup, OutputLimits, ProcessEvent, ProcessInfo,
    ProcessRunner, ProcessSink, RunnerError,
};

use super::LocalRunner;
use super::group::{self, ProcStat};

const SAFETY_NET: Duration = Duration::from_secs(10);

async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(SAFETY_NET, future)
        .await
        .expect("timed out waiting for the process")
}

/// Hands every event to a channel.
struct ChannelSink(mpsc::UnboundedSender<ProcessEvent>);

impl ProcessSink for ChannelSink {
    fn deliver(&self, event: ProcessEvent) -> Result<(), ProcessEvent> {
        self.0.send(event).map_err(|error| error.0)
    }
}

fn channel_sink() -> (Arc<dyn ProcessSink>, mpsc::UnboundedReceiver<ProcessEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(ChannelSink(tx)), rx)
}

/// Refuses every event (a session that is gone).
struct RefusingSink;

impl ProcessSink for RefusingSink {
    fn deliver(&self, event: ProcessEvent) -> Result<(), ProcessEvent> {
        Err(event)
    }
}

fn session(name: &str) -> SessionId {
    SessionId::new(name).unwrap()
}

fn sh(script: &str) -> CommandLine {
    CommandLine {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::new(),
        env_remove: Vec::new(),
        workdir: std::env::temp_dir(),
    }
}

/// What a sink received, up to and including the exit.
#[derive(Debug, Default)]
struct Seen {
    stdout: Vec<String>,
    stderr: Vec<String>,
    output_events: usize,
    largest_batch: usize,
}

impl Seen {
    fn add(&mut self, event: ProcessEvent) -> Option<ExitStatus> {
        match event {
            ProcessEvent::Output { stream, lines } => {
                self.output_events += 1;
                self.largest_batch = self.largest_batch.max(lines.len());
                match stream {
                    OutputStream::Stdout => self.stdout.extend(lines),
                    OutputStream::Stderr => self.stderr.extend(lines),
                    OutputStream::Tokens => panic!("a process has no token stream"),
                }
                None
            }
            ProcessEvent::Exited(status) => Some(status),
        }
    }
}

/// Receives until the exit, then checks that nothing follows it: the runner forgets the
/// process (and drops the sink, closing the channel) after delivering its exit.
async fn until_exit(events: &mut mpsc::UnboundedReceiver<ProcessEvent>) -> (Seen, ExitStatus) {
    let mut seen = Seen::default();
    loop {
        let event = within(events.recv()).await.expect("the exit arrives");
        if let Some(status) = seen.add(event) {
            assert_eq!(
                within(events.recv()).await,
                None,
                "nothing after the exit, and the sink is released"
            );
            return (seen, status);
        }
    }
}

/// Receives output until `line` arrives on `stream`.
async fn until_line(
    events: &mut mpsc::UnboundedReceiver<ProcessEvent>,
    stream: OutputStream,
    line: &str,
) -> Seen {
    let mut seen = Seen::default();
    loop {
        let event = within(events.recv()).await.expect("the line arrives");
        assert!(seen.add(event).is_none(), "exited before printing {line:?}");
        let lines = match stream {
            OutputStream::Stdout => &seen.stdout,
            _ => &seen.stderr,
        };
        if lines.iter().any(|l| l == line) {
            return seen;
        }
    }
}

fn live_members(pgid: i32) -> Vec<ProcStat> {
    group::group_members(pgid)
        .unwrap()
        .into_iter()
        .filter(ProcStat::is_alive)
        .collect()
}

const fn code(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        signal: None,
    }
}

const fn signal(signal: i32) -> ExitStatus {
    ExitStatus {
        code: None,
        signal: Some(signal),
    }
}

#[tokio::test]
async fn lines_on_both_streams_arrive_in_order() {
    let runner = LocalRunner::default();
    let (sink, mut events) = channel_sink();
    let script = "echo out1; echo err1 >&2; echo out2; echo; printf 'err2\\r\\nno newline' >&2";
    let info = runner.start(&session("s-echo"), &sh(script), sink).unwrap();
    assert_eq!(
        info.pgid, info.pid as i32,
        "the process leads its own group"
    );
    assert!(info.start_ticks.is_some());
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(seen.stdout, ["out1", "out2", ""]);
    assert_eq!(seen.stderr, ["err1", "err2", "no newline"]);
    assert_eq!(status, code(0));
    assert!(status.success());
}

#[tokio::test]
async fn environment_workdir_and_stdin_are_set_up() {
    let runner = LocalRunner::default();
    let workdir = tempfile::tempdir().unwrap();
    let mut command = sh(
        "echo \"foo=$TROUPE_TEST_FOO\"; echo \"path=${PATH:+set}\"; echo \"home=${HOME-unset}\"; \
         pwd; cat; echo \"stdin=$?\"",
    );
    command
        .env
        .insert("TROUPE_TEST_FOO".into(), "bar baz".into());
    command.env_remove.push("HOME".into());
    command.workdir = workdir.path().to_path_buf();
    let (sink, mut events) = channel_sink();
    runner.start(&session("s-env"), &command, sink).unwrap();
    let (seen, status) = until_exit(&mut events).await;
    let pwd = workdir.path().canonicalize().unwrap();
    assert_eq!(
        seen.stdout,
        [
            "foo=bar baz".to_string(),
            "path=set".into(),
            "home=unset".into(),
            pwd.display().to_string(),
            "stdin=0".into(),
        ]
    );
    assert_eq!(status, code(0));
}

#[tokio::test]
async fn a_session_path_cannot_swap_the_program_and_the_session_id_is_set() {
    use std::os::unix::fs::PermissionsExt;

    // A directory with an impostor `sh`, put first in the session's own PATH.
    let impostors = tempfile::tempdir().unwrap();
    let fake = impostors.path().join("sh");
    std::fs::write(&fake, "#!/bin/sh\necho hijacked\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = sh("echo \"path=$PATH\"; echo \"id=$TROUPE_SESSION_ID\"; echo \"zero=$0\"");
    let path = format!("{}:/usr/bin:/bin", impostors.path().display());
    command.env.insert("PATH".into(), path.clone());
    let (sink, mut events) = channel_sink();
    let runner = LocalRunner::default();
    runner.start(&session("s-path"), &command, sink).unwrap();
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(
        seen.stdout,
        [format!("path={path}"), "id=s-path".into(), "zero=sh".into()],
        "the node's sh ran, with the session's PATH for what it runs itself"
    );
    assert_eq!(status, code(0));
}

#[tokio::test]
async fn invalid_utf8_is_replaced() {
    let runner = LocalRunner::default();
    let (sink, mut events) = channel_sink();
    runner
        .start(
            &session("s-utf8"),
            &sh("printf 'ok\\377\\376bad\\r\\n\\342\\202\\254\\n'"),
            sink,
        )
        .unwrap();
    let (seen, _) = until_exit(&mut events).await;
    assert_eq!(seen.stdout, ["ok\u{FFFD}\u{FFFD}bad", "€"]);
}

#[tokio::test]
async fn a_5_mb_line_without_newline_is_cut_to_the_cap() {
    let runner = LocalRunner::new(OutputLimits {
        max_line_bytes: 1000,
        ..OutputLimits::default()
    });
    let (sink, mut events) = channel_sink();
    let script = "head -c 5000000 /dev/zero | tr '\\0' x; printf '\\nafter'";
    runner.start(&session("s-long"), &sh(script), sink).unwrap();
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0));
    assert_eq!(seen.stdout.len(), 2);
    let expected = format!("{} …[cut 4999000 bytes]", "x".repeat(1000));
    assert_eq!(seen.stdout[0].len(), expected.len());
    assert_eq!(seen.stdout[0], expected);
    assert_eq!(seen.stdout[1], "after");
}

#[tokio::test]
async fn a_flood_arrives_coalesced_complete_and_in_order() {
    let runner = LocalRunner::default(); // 256 lines per batch at most
    let (sink, mut events) = channel_sink();
    let command = CommandLine {
        program: "seq".into(),
        args: vec!["1".into(), "100000".into()],
        ..sh("")
    };
    runner.start(&session("s-flood"), &command, sink).unwrap();
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0));
    assert_eq!(seen.stdout.len(), 100_000);
    assert!(
        seen.stdout
            .iter()
            .enumerate()
            .all(|(index, line)| *line == (index + 1).to_string()),
        "every line exactly once, in order"
    );
    assert!(seen.largest_batch <= 256);
    // 100 000 lines in batches of up to 256: at least 391 events. A batch cut short by the
    // 20 ms window needs the reader to stall that long, which a slow machine may do a few times.
    assert!(
        seen.output_events < 2_000,
        "{} events for 100 000 lines",
        seen.output_events
    );
}

/// Takes every event, but has room for more only once the test opens it (a session busy in a
/// slow write).
struct GatedSink {
    events: mpsc::UnboundedSender<ProcessEvent>,
    open: tokio::sync::watch::Receiver<bool>,
}

impl GatedSink {
    /// A sink without room, its events, and the switch that gives it room.
    fn closed() -> (
        Arc<Self>,
        mpsc::UnboundedReceiver<ProcessEvent>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let (tx, events) = mpsc::unbounded_channel();
        let (open, opened) = tokio::sync::watch::channel(false);
        let sink = Arc::new(Self {
            events: tx,
            open: opened,
        });
        (sink, events, open)
    }
}

impl ProcessSink for GatedSink {
    fn deliver(&self, event: ProcessEvent) -> Result<(), ProcessEvent> {
        self.events.send(event).map_err(|error| error.0)
    }

    fn ready(&self) -> futures::future::BoxFuture<'static, ()> {
        let mut open = self.open.clone();
        Box::pin(async move {
            let _ = open.wait_for(|open| *open).await;
        })
    }
}

/// What the kernel says process `pid` is waiting in (`/proc/PID/wchan`): `None` where the
/// kernel does not say (no such file, or `0` for a process that is asleep).
fn waits_in(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/wchan"))
        .ok()
        .filter(|wchan| !wchan.is_empty() && wchan != "0")
}

/// Bytes process `pid` has written so far (`wchar` of `/proc/PID/io`).
fn written_by(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("wchar: "))
        .and_then(|value| value.trim().parse().ok())
}

/// Waits until process `pid` is blocked writing to a full pipe: its `wchan` names the pipe
/// write, or, where the kernel does not tell, it is alive and has written nothing more for
/// three looks 50 ms apart.
async fn blocked_in_its_write(pid: u32) {
    let mut still = 0;
    let mut last = None;
    loop {
        if let Some(wchan) = waits_in(pid) {
            if wchan.contains("pipe_write") {
                return;
            }
        } else {
            let now = written_by(pid);
            still = if now.is_some() && now == last {
                still + 1
            } else {
                0
            };
            last = now;
            if still >= 3 {
                return;
            }
        }
        // A bounded look at another process's state, which no event announces.
        tokio::time::sleep(Duration::from_millis(if waits_in(pid).is_some() {
            5
        } else {
            50
        }))
        .await;
    }
}

#[tokio::test]
async fn a_session_without_room_holds_its_process_back_and_loses_nothing() {
    let runner = LocalRunner::default();
    let (sink, mut events, open) = GatedSink::closed();
    let command = CommandLine {
        program: "seq".into(),
        args: vec!["1".into(), "300000".into()],
        ..sh("")
    };
    let info = runner.start(&session("s-held"), &command, sink).unwrap();
    // The runner reads once, then waits for room: `seq` fills the pipe and blocks in its write.
    // The read is awaited first: `seq` may block on the full pipe before the runner has read
    // it, and write one pipe more after that read.
    let mut seen = Seen::default();
    let first = within(events.recv()).await.expect("the first read's lines");
    assert!(seen.add(first).is_none(), "no exit while held");
    within(blocked_in_its_write(info.pid)).await;
    // And stays blocked: nothing more is read while there is no room. (Showing that something
    // does not happen takes a wait; without the hold, `seq` is done within it.)
    let written = written_by(info.pid);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        waits_in(info.pid).is_none_or(|wchan| wchan.contains("pipe_write")),
        "seq still blocked in its write"
    );
    assert_eq!(written_by(info.pid), written, "seq wrote nothing more");
    while let Ok(event) = events.try_recv() {
        assert!(seen.add(event).is_none(), "no exit while held");
    }
    assert!(
        seen.stdout.len() < 20_000,
        "about one read (64 KiB) of lines while held, not {}",
        seen.stdout.len()
    );

    open.send_replace(true);
    let (rest, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0));
    seen.stdout.extend(rest.stdout);
    assert_eq!(seen.stdout.len(), 300_000);
    assert!(
        seen.stdout
            .iter()
            .enumerate()
            .all(|(index, line)| *line == (index + 1).to_string()),
        "every line exactly once, in order"
    );
}

/// A process that exited with output still in its pipe while the session had no room is not
/// taken for an outside holder of the pipe: its last lines are read once there is room.
#[tokio::test]
async fn output_left_in_the_pipe_while_the_session_has_no_room_is_read_after_the_exit() {
    let runner = LocalRunner::default();
    let (sink, mut events, open) = GatedSink::closed();
    // The first line is read alone; then the session has no room, and the rest (about 49 KB,
    // less than the pipe's buffer) waits in the pipe while the process exits.
    let script = "echo first; sleep 0.2; seq 1 10000";
    let info = runner.start(&session("s-left"), &sh(script), sink).unwrap();
    let pid = i32::try_from(info.pid).unwrap();
    wait_gone(pid, "the script did not finish writing into the pipe").await;
    // Longer than the outside-holder grace (200 ms) and a group check (100 ms): the runner used
    // to stop reading here and lose what was in the pipe. (A wait for something not to happen.)
    tokio::time::sleep(Duration::from_millis(600)).await;
    open.send_replace(true);
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0));
    assert_eq!(
        seen.stdout.len(),
        10_001,
        "every line, the last ones included"
    );
    assert_eq!(seen.stdout.last().map(String::as_str), Some("10000"));
}

/// Has room again a millisecond after each look: a session that keeps up, slowly.
struct SlowSink(mpsc::UnboundedSender<ProcessEvent>);

impl ProcessSink for SlowSink {
    fn deliver(&self, event: ProcessEvent) -> Result<(), ProcessEvent> {
        self.0.send(event).map_err(|error| error.0)
    }

    fn ready(&self) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(Duration::from_millis(1)))
    }
}

/// A process outside the group that never stops writing does not hold the exit of a session
/// whose pumps keep waiting for room: once more was read than the exited group could have left
/// in the pipes, the rest is taken for the outside holder's.
#[tokio::test]
async fn an_outside_writer_does_not_hold_the_exit_while_the_session_is_slow() {
    let runner = LocalRunner::default();
    let (tx, mut events) = mpsc::unbounded_channel();
    let script = "setsid yes & echo \"escaped $!\"; exit 0";
    runner
        .start(&session("s-yes"), &sh(script), Arc::new(SlowSink(tx)))
        .unwrap();
    let mut escaped = None;
    let status = tokio::time::timeout(SAFETY_NET, async {
        loop {
            match events.recv().await.expect("the exit arrives") {
                ProcessEvent::Output { lines, .. } => {
                    if escaped.is_none() {
                        escaped = lines
                            .iter()
                            .find_map(|line| line.strip_prefix("escaped "))
                            .and_then(|pid| pid.parse::<i32>().ok());
                    }
                }
                ProcessEvent::Exited(status) => return status,
            }
        }
    })
    .await;
    // The writer is not the runner's to kill (the session ended on its own): the test cleans
    // up after itself, also when it fails.
    let escaped = escaped.expect("the script printed the writer's pid");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(escaped),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(
        status.expect("the exit arrives while the writer writes"),
        code(0)
    );
}

#[tokio::test]
async fn exit_codes_and_signal_deaths_are_reported() {
    let runner = LocalRunner::default();
    for (name, script, expected) in [
        ("s-exit-0", "true", code(0)),
        ("s-exit-7", "exit 7", code(7)),
        ("s-kill-9", "kill -KILL $$", signal(9)),
        ("s-term", "kill -TERM $$", signal(15)),
    ] {
        let (sink, mut events) = channel_sink();
        runner.start(&session(name), &sh(script), sink).unwrap();
        let (_, status) = until_exit(&mut events).await;
        assert_eq!(status, expected, "{script}");
        assert!(
            !runner.terminate(&session(name), Duration::ZERO),
            "forgotten"
        );
    }
}

#[tokio::test]
async fn spawn_failures_are_clear_and_leave_nothing_behind() {
    let runner = LocalRunner::default();
    let id = session("s-fail");
    let spawn_reason = |command: &CommandLine| {
        let (sink, _events) = channel_sink();
        match runner.start(&id, command, sink) {
            Err(RunnerError::Spawn { program, reason }) => {
                assert_eq!(program, command.program);
                reason
            }
            other => panic!("expected a spawn error, got {other:?}"),
        }
    };

    let missing = CommandLine {
        program: "troupe-no-such-program".into(),
        ..sh("")
    };
    assert!(spawn_reason(&missing).contains("not found in PATH"));
    let missing_path = CommandLine {
        program: "/nonexistent/troupe-program".into(),
        ..sh("")
    };
    assert!(spawn_reason(&missing_path).contains("no such file"));

    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("script.sh");
    std::fs::write(&not_executable, "#!/bin/sh\necho hi\n").unwrap();
    let not_executable = CommandLine {
        program: not_executable.display().to_string(),
        ..sh("")
    };
    assert!(spawn_reason(&not_executable).contains("permission denied"));

    let mut bad_workdir = sh("true");
    bad_workdir.workdir = dir.path().join("missing");
    let reason = spawn_reason(&bad_workdir);
    assert!(
        reason.contains("does not exist") && reason.contains("missing"),
        "{reason}"
    );

    // Nothing was kept for the session: it can start now, and only once at a time.
    let (sink, mut events) = channel_sink();
    runner.start(&id, &sh("sleep 1000"), sink).unwrap();
    let (sink, _) = channel_sink();
    assert_eq!(
        runner.start(&id, &sh("true"), sink).unwrap_err(),
        RunnerError::AlreadyRunning(id.clone())
    );
    assert!(runner.terminate(&id, Duration::from_secs(5)));
    assert_eq!(until_exit(&mut events).await.1, signal(15));
}

#[tokio::test]
async fn terminate_leaves_no_process_of_the_group() {
    let runner = LocalRunner::default();
    let id = session("s-terminate");
    let (sink, mut events) = channel_sink();
    let info = runner
        .start(
            &id,
            &sh("sleep 1000 & sleep 1000 & echo started; wait"),
            sink,
        )
        .unwrap();
    until_line(&mut events, OutputStream::Stdout, "started").await;
    assert_eq!(live_members(info.pgid).len(), 3, "sh and two sleeps");
    let leader = group::read_proc(info.pgid).unwrap();
    assert_eq!(info.start_ticks, Some(leader.start_ticks));
    assert!(runner.terminate(&id, Duration::from_secs(5)));
    let (_, status) = until_exit(&mut events).await;
    assert_eq!(status, signal(15));
    assert!(live_members(info.pgid).is_empty());
    assert!(!runner.terminate(&id, Duration::ZERO), "already exited");
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace() {
    let runner = LocalRunner::default();
    let id = session("s-stubborn");
    let (sink, mut events) = channel_sink();
    let info = runner
        .start(
            &id,
            &sh("trap '' TERM; sleep 1000 & echo started; wait"),
            sink,
        )
        .unwrap();
    until_line(&mut events, OutputStream::Stdout, "started").await;
    assert!(runner.terminate(&id, Duration::from_millis(200)));
    let (_, status) = until_exit(&mut events).await;
    assert_eq!(status, signal(9));
    assert!(live_members(info.pgid).is_empty());
}

#[tokio::test]
async fn a_background_job_holding_the_output_keeps_the_session_until_terminated() {
    let runner = LocalRunner::default();
    let id = session("s-background");
    let (sink, mut events) = channel_sink();
    // The background job says when the leader is gone: `kill -0` still reaches a zombie, so
    // it fails only once the runner has reaped the leader.
    let script = "(while kill -0 $$ 2>/dev/null; do sleep 0.01; done; echo leader-gone; \
                  exec sleep 1000) & exit 0";
    let info = runner.start(&id, &sh(script), sink).unwrap();
    until_line(&mut events, OutputStream::Stdout, "leader-gone").await;
    // The leader is gone, but the job holds the pipes: the session is not over, so terminate
    // still applies.
    assert!(runner.terminate(&id, Duration::from_secs(5)));
    let (_, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0), "the leader's own status");
    assert!(live_members(info.pgid).is_empty());
}

#[tokio::test]
async fn a_background_job_that_closed_the_output_is_cleaned_up_at_exit() {
    let runner = LocalRunner::default();
    let (sink, mut events) = channel_sink();
    let info = runner
        .start(
            &session("s-leftover"),
            &sh("sleep 1000 >/dev/null 2>&1 & echo $!"),
            sink,
        )
        .unwrap();
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0));
    let sleeper: i32 = seen.stdout[0].parse().unwrap();
    assert!(
        group::read_proc(sleeper)
            .ok()
            .is_none_or(|stat| !stat.is_alive()),
        "the background job is gone"
    );
    assert!(live_members(info.pgid).is_empty());
}

#[tokio::test]
async fn output_held_open_outside_the_group_does_not_hold_the_exit() {
    let runner = LocalRunner::default();
    let (sink, mut events) = channel_sink();
    runner
        .start(&session("s-setsid"), &sh("setsid sleep 30 & echo $!"), sink)
        .unwrap();
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0));
    // The escaped process is not the runner's to kill; the test cleans up after itself.
    let escaped: i32 = seen.stdout[0].parse().unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(escaped),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The pid a session's script printed as `escaped PID` (a process that left its group),
/// before the session's exit.
async fn escaped_pid(events: &mut mpsc::UnboundedReceiver<ProcessEvent>) -> i32 {
    let mut seen = Seen::default();
    loop {
        let event = within(events.recv()).await.expect("the line arrives");
        assert!(seen.add(event).is_none(), "exited early");
        if let Some(pid) = seen.stdout.iter().find_map(|l| l.strip_prefix("escaped ")) {
            return pid.parse().unwrap();
        }
    }
}

/// Starts `script` as session `id`; it puts a process out of the session's group and prints
/// `escaped PID`. Returns the session's process, its events, and the escaped process's pid and
/// group (checked to be another).
async fn start_with_escapee(
    runner: &LocalRunner,
    id: &SessionId,
    script: &str,
) -> (ProcessInfo, mpsc::UnboundedReceiver<ProcessEvent>, i32, i32) {
    let (sink, mut events) = channel_sink();
    let info = runner.start(id, &sh(script), sink).unwrap();
    let escaped = escaped_pid(&mut events).await;
    let escaped_group = group::read_proc(escaped).unwrap().pgrp;
    assert_ne!(escaped_group, info.pgid, "setsid left the session's group");
    (info, events, escaped, escaped_group)
}

/// Waits until process `pid` is gone (or a zombie); past the safety net, kills it (the test
/// cleans up after itself) and fails with `survived`.
async fn wait_gone(pid: i32, survived: &str) {
    let deadline = std::time::Instant::now() + SAFETY_NET;
    while group::read_proc(pid).is_ok_and(|stat| stat.is_alive()) {
        if std::time::Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{survived}");
        }
        // No event tells a test when a process that is not its child dies: look again soon.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Cancelling a session stops what it started, also a daemon that left its group (`setsid`,
/// pipes closed) and that no group signal reaches.
#[tokio::test]
async fn terminate_also_stops_processes_that_left_the_group() {
    let runner = LocalRunner::default();
    let id = session("s-daemon");
    let (_, mut events, escaped, _) = start_with_escapee(
        &runner,
        &id,
        "setsid sh -c 'echo \"escaped $$\"; exec sleep 1000 >/dev/null 2>&1 </dev/null' & \
         exec sleep 1000",
    )
    .await;
    assert!(runner.terminate(&id, Duration::from_secs(5)));
    let (_, status) = until_exit(&mut events).await;
    assert_eq!(status, signal(15));
    wait_gone(
        escaped,
        "the process that left the group survived the cancel",
    )
    .await;
}

/// What leaves the group after the SIGTERM (here from the SIGTERM handler itself, 300 ms in) is
/// found again at the end of the grace and killed.
#[tokio::test]
async fn terminate_also_stops_what_leaves_the_group_during_the_grace() {
    let runner = LocalRunner::default();
    let (sink, mut events) = channel_sink();
    let id = session("s-late");
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("escaped");
    let script = format!(
        "trap 'sleep 0.3; setsid sh -c \"echo \\$\\$ > {file}; exec sleep 1000\" \
         </dev/null >/dev/null 2>&1 & exit 0' TERM; echo ready; while :; do sleep 0.05; done",
        file = pid_file.display()
    );
    runner.start(&id, &sh(&script), sink).unwrap();
    until_line(&mut events, OutputStream::Stdout, "ready").await;
    assert!(runner.terminate(&id, Duration::from_secs(2)));
    let (_, status) = until_exit(&mut events).await;
    assert_eq!(status, code(0), "the SIGTERM handler exits 0");
    let escaped: i32 = within(async {
        loop {
            if let Ok(text) = std::fs::read_to_string(&pid_file)
                && let Ok(pid) = text.trim().parse()
            {
                return pid;
            }
            // The handler writes the file 300 ms after the SIGTERM; nothing announces it.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    wait_gone(escaped, "what left the group during the grace survived").await;
}

#[tokio::test]
async fn refused_events_wait_for_reattach_and_the_exit_comes_once() {
    let runner = LocalRunner::default();
    let id = session("s-refused");
    let script = "echo a; echo b; echo e >&2; printf c; exit 3";
    let info = runner
        .start(&id, &sh(script), Arc::new(RefusingSink))
        .unwrap();
    runner.exit_emitted(&id).await;
    assert!(!runner.terminate(&id, Duration::ZERO), "the process exited");

    let (sink, mut events) = channel_sink();
    assert_eq!(runner.reattach(&id, sink), Some(info));
    let (seen, status) = until_exit(&mut events).await;
    assert_eq!(seen.stdout, ["a", "b", "c"]);
    assert_eq!(seen.stderr, ["e"]);
    assert_eq!(status, code(3));
    let (sink, _) = channel_sink();
    assert_eq!(runner.reattach(&id, sink), None, "forgotten after the exit");
}

#[tokio::test]
async fn reattach_replays_then_continues_live() {
    let runner = LocalRunner::default();
    let id = session("s-live");
    runner
        .start(
            &id,
            &sh("echo before; echo warn >&2; exec sleep 1000"),
            Arc::new(RefusingSink),
        )
        .unwrap();
    let (sink, mut events) = channel_sink();
    assert!(runner.reattach(&id, sink).is_some());
    // Whether the lines were kept or come live, they come once and in order.
    let mut seen = until_line(&mut events, OutputStream::Stdout, "before").await;
    assert!(runner.terminate(&id, Duration::from_secs(5)));
    let (rest, status) = until_exit(&mut events).await;
    seen.stderr.extend(rest.stderr);
    seen.stdout.extend(rest.stdout);
    assert_eq!(seen.stdout, ["before"]);
    assert_eq!(seen.stderr, ["warn"]);
    assert_eq!(status, signal(15));
}

#[tokio::test]
async fn unknown_sessions() {
    let runner = LocalRunner::default();
    let (sink, _) = channel_sink();
    assert_eq!(runner.reattach(&session("s-unknown"), sink), None);
    assert!(!runner.terminate(&session("s-unknown"), Duration::ZERO));
}

/// A process group started by the test itself, as a node before a crash would have left it.
struct Stray {
    child: tokio::process::Child,
    output: BufReader<tokio::process::ChildStdout>,
    pgid: i32,
    start_ticks: u64,
}

impl Stray {
    /// Starts `script` in a new group and waits for its first line.
    async fn start(script: &str) -> Self {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pgid = child.id().unwrap() as i32;
        let start_ticks = group::read_proc(pgid).unwrap().start_ticks;
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        within(output.read_line(&mut line)).await.unwrap();
        assert_eq!(line, "started\n");
        Self {
            child,
            output,
            pgid,
            start_ticks,
        }
    }

    /// Waits until every process of the group has closed the output (they exit), and returns
    /// the leader's status.
    async fn wait_gone(mut self) -> std::process::ExitStatus {
        let mut rest = String::new();
        within(tokio::io::AsyncReadExt::read_to_string(
            &mut self.output,
            &mut rest,
        ))
        .await
        .unwrap();
        let status = within(self.child.wait()).await.unwrap();
        // A process closes its files a moment before it turns into a zombie, and no event
        // marks a non-child's death without unsafe code (pidfd): poll /proc briefly.
        let deadline = std::time::Instant::now() + SAFETY_NET;
        while !live_members(self.pgid).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the group survived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        status
    }
}

#[tokio::test]
async fn kill_leftovers_kills_a_recorded_group_but_not_a_mismatched_one() {
    use std::os::unix::process::ExitStatusExt;

    let runner = LocalRunner::default();
    let stray = Stray::start("trap '' TERM; sleep 1000 & sleep 1000 & echo started; wait").await;
    let recorded = |start_ticks| Leftover {
        session: session("s-stray"),
        group: Some(LeftoverGroup {
            pgid: stray.pgid,
            start_ticks,
        }),
    };
    let grace = Duration::from_millis(100);

    // Recorded later than the leader really started: its members are older than the recorded
    // leader, so the pgid must name someone else's group.
    assert_eq!(
        runner.kill_leftovers(&[recorded(Some(stray.start_ticks + 1))], grace),
        Vec::<i32>::new()
    );
    // Recorded earlier: fine for the members, but the leader is alive with another start time
    // (the pid was reused). This direction is the dangerous one; the leader check catches it.
    assert_eq!(
        runner.kill_leftovers(&[recorded(Some(stray.start_ticks - 1))], grace),
        Vec::<i32>::new()
    );
    assert_eq!(live_members(stray.pgid).len(), 3, "left alone");

    // The right record: SIGTERM (ignored here), then SIGKILL after the grace.
    assert_eq!(
        runner.kill_leftovers(&[recorded(Some(stray.start_ticks))], grace),
        [stray.pgid]
    );
    let status = stray.wait_gone().await;
    assert_eq!(status.signal(), Some(9));
}

#[tokio::test]
async fn kill_leftovers_kills_the_rest_of_a_group_whose_leader_died() {
    let runner = LocalRunner::default();
    let mut stray = Stray::start("sleep 1000 & echo started").await;
    within(stray.child.wait()).await.unwrap();
    assert_eq!(live_members(stray.pgid).len(), 1, "the sleep is left");
    let recorded = Leftover {
        session: session("s-stray"),
        group: Some(LeftoverGroup {
            pgid: stray.pgid,
            start_ticks: Some(stray.start_ticks),
        }),
    };
    assert_eq!(
        runner.kill_leftovers(std::slice::from_ref(&recorded), Duration::from_secs(5)),
        [stray.pgid]
    );
    stray.wait_gone().await;
    // Nothing left to signal now.
    assert_eq!(
        runner.kill_leftovers(&[recorded], Duration::ZERO),
        Vec::<i32>::new()
    );
}

/// The node may die between starting a session's process and recording its group: the next
/// start finds the processes by the session id in their environment, also ones that left the
/// group.
#[tokio::test]
async fn kill_leftovers_finds_the_processes_of_a_session_whose_group_was_never_recorded() {
    let before_the_crash = LocalRunner::default();
    let id = session("s-unrecorded");
    let (info, mut events, escaped, escaped_group) = start_with_escapee(
        &before_the_crash,
        &id,
        "setsid sh -c 'echo \"escaped $$\"; exec sleep 1000 >/dev/null 2>&1' & \
         sleep 1000 & wait",
    )
    .await;

    let after_the_restart = LocalRunner::default();
    let other = Leftover {
        session: session("s-someone-else"),
        group: None,
    };
    assert_eq!(
        after_the_restart.kill_leftovers(std::slice::from_ref(&other), Duration::ZERO),
        Vec::<i32>::new(),
        "no process carries that session's id"
    );
    let mut signalled = after_the_restart.kill_leftovers(
        &[Leftover {
            session: id.clone(),
            group: None,
        }],
        Duration::from_secs(5),
    );
    signalled.sort_unstable();
    let mut expected = vec![info.pgid, escaped_group];
    expected.sort_unstable();
    assert_eq!(signalled, expected);
    let (_, status) = until_exit(&mut events).await;
    assert_eq!(status, signal(15));
    wait_gone(escaped, "the escaped process survived").await;
}

/// Regression: the SIGKILL that follows a terminate's grace, for what left the session's group,
/// ran in a task of the node's runtime; a node that shut down within the grace (its sessions
/// interrupted, their groups gone at once) dropped that task, and a process that left the group
/// and ignored SIGTERM ran on, its session recorded as ended, never to be looked for again.
#[test]
fn what_left_the_group_is_killed_when_the_runtime_stops_within_the_grace() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let runner = LocalRunner::default();
    let id = session("s-stubborn");
    let escaped = runtime.block_on(async {
        let (_, mut events, escaped, _) = start_with_escapee(
            &runner,
            &id,
            "setsid sh -c 'trap \"\" TERM; echo \"escaped $$\"; \
             exec sleep 1000 >/dev/null 2>&1 </dev/null' & exec sleep 1000",
        )
        .await;
        assert!(runner.terminate(&id, Duration::from_secs(60)));
        let (_, status) = until_exit(&mut events).await;
        assert_eq!(status, signal(15), "the group itself dies of the SIGTERM");
        escaped
    });
    // The node stops: its runtime goes, with the task that would have sent the SIGKILL.
    drop(runtime);
    let checker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    checker.block_on(wait_gone(
        escaped,
        "a process that left the group and ignored SIGTERM outlived the node",
    ));
}

/// Regression: the SIGKILL that follows a terminate's grace for the session's own group ran in a
/// task of the node's runtime; a node that stopped within the grace dropped that task, and a
/// group that ignored SIGTERM ran on after the node (as the review found with a drain that
/// timed out under a grace longer than the shutdown timeout).
#[test]
fn a_group_ignoring_sigterm_is_killed_when_the_runtime_stops_within_the_grace() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let runner = LocalRunner::default();
    let id = session("s-stubborn-group");
    let info = runtime.block_on(async {
        let (sink, mut events) = channel_sink();
        let info = runner
            .start(
                &id,
                &sh("trap '' TERM; sleep 1000 & echo started; wait"),
                sink,
            )
            .unwrap();
        until_line(&mut events, OutputStream::Stdout, "started").await;
        assert!(runner.terminate(&id, Duration::from_secs(60)));
        info
    });
    assert!(!live_members(info.pgid).is_empty(), "SIGTERM was ignored");
    // The node stops: its runtime goes, with the task that would have sent the SIGKILL.
    drop(runtime);
    let checker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    checker.block_on(within(async {
        while !live_members(info.pgid).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));
}
