//! Process groups seen through `/proc` and reached through signals: who is in a group, when a
//! process started, and the rule that decides whether a group left over from before a node
//! restart may be killed. Linux only. Nothing here signals a group it has not just seen members
//! of.

use std::io;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use troupe_actors::ids::SessionId;
use troupe_actors::session::LeftoverGroup;

/// What `/proc/PID/stat` (and the `Uid:` line of `/proc/PID/status`) says about one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// Field 1.
    pub(super) pid: i32,
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub(super) state: u8,
    /// Field 5: the process group.
    pub(super) pgrp: i32,
    /// Field 22: start time in clock ticks since boot.
    pub(super) start_ticks: u64,
    /// The real uid: the first field of the `Uid:` line of `/proc/PID/status`.
    ///
    /// Not the owner of `/proc/PID`: the kernel shows the directory of a non-dumpable process
    /// (one that changed its credentials, ran a setuid or setgid program or file capabilities,
    /// or asked with `prctl(PR_SET_DUMPABLE, 0)`) as root's, whoever runs it. Taken from the
    /// owner, one such member of a session's group made the leftover rule refuse the whole
    /// group after a crash, whose processes then ran on. The real uid is also what `kill(2)`
    /// checks the node's uid against (with the saved set-user-id), so a process whose real uid
    /// is the node's is one the node may signal.
    pub(super) uid: u32,
}

impl ProcStat {
    /// Neither a zombie nor dead: a signal can still reach it.
    pub(super) fn is_alive(&self) -> bool {
        !matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses one `/proc/PID/stat` line. The second field (the command name, in parentheses) may
/// hold spaces and parentheses itself, so fields are counted from the *last* `)`.
pub(super) fn parse_stat(text: &str, uid: u32) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    if close < open {
        return None;
    }
    let pid = text[..open].trim().parse().ok()?;
    let mut fields = text[close + 1..].split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?; // field 3
    let _ppid = fields.next()?; // field 4
    let pgrp = fields.next()?.parse().ok()?; // field 5
    // Fields 6 (session) to 21 (itrealvalue) are 16 fields; the next one is field 22.
    let start_ticks = fields.nth(16)?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        pgrp,
        start_ticks,
        uid,
    })
}

/// The real uid from the text of `/proc/PID/status`: the first of the four fields (real,
/// effective, saved, filesystem) of its `Uid:` line.
pub(super) fn parse_real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A process from the texts of its `/proc/PID/stat` and `/proc/PID/status`.
pub(super) fn parse_proc(stat: &str, status: &str) -> Option<ProcStat> {
    parse_stat(stat, parse_real_uid(status)?)
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub(super) fn read_proc(pid: i32) -> io::Result<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_proc(&stat, &status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat or its status is not in the expected format"),
        )
    })
}

/// The real uid of process `pid` (see [`ProcStat::uid`]).
fn read_real_uid(pid: i32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_real_uid(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/status has no Uid: line in the expected format"),
        )
    })
}

/// The pid of every process in `/proc` now (entries that vanish while it is read are skipped).
fn pids() -> io::Result<impl Iterator<Item = i32>> {
    Ok(std::fs::read_dir("/proc")?.filter_map(|entry| {
        entry
            .ok()?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
    }))
}

/// Every process whose group is `pgid`, zombies included (filter with
/// [`ProcStat::is_alive`]). Processes that vanish while `/proc` is read are skipped.
pub(super) fn group_members(pgid: i32) -> io::Result<Vec<ProcStat>> {
    let mut members = Vec::new();
    for pid in pids()? {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The group from the stat line alone: the uid takes a second read (`status`, the
        // larger file for the kernel to write), worth it for the group's members only. The 0
        // stands in until then.
        let Some(stat) = parse_stat(&text, 0) else {
            continue;
        };
        if stat.pgrp != pgid {
            continue;
        }
        if let Ok(uid) = read_real_uid(pid) {
            members.push(ProcStat { uid, ..stat });
        }
    }
    Ok(members)
}

/// Live processes of the node's user (the node itself excepted) whose environment holds
/// `TROUPE_SESSION_ID=<id>` for one of `sessions`, each with that id: what is left of those
/// sessions, whatever group they are in now. Processes that vanish, or whose environment cannot
/// be read, are skipped.
pub(super) fn session_processes(
    sessions: &std::collections::HashSet<&str>,
    own: &Own,
) -> io::Result<Vec<(ProcStat, String)>> {
    let mut found = Vec::new();
    if sessions.is_empty() {
        return Ok(found);
    }
    let prefix = format!("{}=", troupe_actors::session::SESSION_ID_ENV);
    for pid in pids()? {
        let Ok(stat) = read_proc(pid) else { continue };
        if stat.pid == own.pid || stat.uid != own.uid || !stat.is_alive() {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let marked = environ.split(|byte| *byte == 0).find_map(|entry| {
            entry
                .strip_prefix(prefix.as_bytes())
                .and_then(|id| std::str::from_utf8(id).ok())
                .filter(|id| sessions.contains(id))
        });
        if let Some(session) = marked {
            found.push((stat, session.to_owned()));
        }
    }
    Ok(found)
}

/// Whether any process of the group can still receive a signal. An unreadable `/proc` counts
/// as "yes": callers use this to decide whether to keep waiting or to send SIGKILL, and both
/// are harmless for a live group.
pub(super) fn has_live_members(pgid: i32) -> bool {
    if group_is_empty(pgid) {
        return false;
    }
    match group_members(pgid) {
        Ok(members) => members.iter().any(ProcStat::is_alive),
        Err(error) => {
            tracing::warn!(pgid, %error, "cannot read /proc to inspect a process group");
            true
        }
    }
}

/// [`has_live_members`] off the async threads (a `/proc` scan reads one file per process).
pub(super) async fn has_live_members_async(pgid: i32) -> bool {
    if group_is_empty(pgid) {
        return false;
    }
    tokio::task::spawn_blocking(move || has_live_members(pgid))
        .await
        .unwrap_or(true)
}

/// True when no process at all is in the group: signal 0 to it finds none (`ESRCH`). One
/// syscall instead of a `/proc` scan, which reads a file per process on the machine and was most
/// of the cost of a short session on a busy machine. Anything else (members, zombies among them,
/// or a member of another user) leaves the answer to the scan.
fn group_is_empty(pgid: i32) -> bool {
    pgid > 1 && killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH)
}

/// Sends `signal` to the group. "No such process" (the group is gone) is not an error.
pub(super) fn signal_group(pgid: i32, signal: Signal) {
    if pgid <= 1 {
        // killpg(0) and killpg(1) would hit our own group or init's: never.
        tracing::error!(pgid, "refusing to signal an invalid process group");
        return;
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => tracing::warn!(pgid, %signal, %error, "cannot signal a process group"),
    }
}

/// Sends SIGTERM to the group, waits until it has no live member or `grace` has passed, then
/// sends SIGKILL if anything is left. For groups known to be ours (a session's own group).
pub(super) async fn terminate_group(pgid: i32, grace: Duration) {
    signal_group(pgid, Signal::SIGTERM);
    let deadline = troupe_actors::time::tokio_instant_after(tokio::time::Instant::now(), grace);
    // No event tells us when a process that is not our child dies (pidfd would need unsafe
    // code), so look at /proc with a backoff: quick for the usual fast exit, cheap otherwise.
    let mut pause = Duration::from_millis(5);
    loop {
        if !has_live_members_async(pgid).await {
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    tracing::info!(
        pgid,
        ?grace,
        "process group outlived SIGTERM; sending SIGKILL"
    );
    signal_group(pgid, Signal::SIGKILL);
}

/// Terminates what left session `session`'s group `pgid` (`setsid`) but still carries the
/// session's id in its environment: SIGTERM now, and after `grace` SIGKILL to every such process
/// still alive (found again, so one that left the group meanwhile is caught too). Only processes
/// of the node's user, never the node, and not the group's own members (the group is signalled
/// as a whole). Each signal goes to the process seen by the scan (same start time), never to a
/// reused pid. Returns the pids that got SIGTERM.
///
/// Dropped before its SIGKILL pass is done (its runtime stops: the node shuts down within the
/// grace), it sends the SIGKILL right then: nothing would look for these processes later, since
/// their session is recorded as ended.
pub(super) async fn terminate_escaped(session: SessionId, pgid: i32, grace: Duration) -> Vec<i32> {
    let mut last_pass = KillEscapedOnDrop {
        session: Some(session.clone()),
        pgid,
    };
    let first = signal_escaped(session.clone(), pgid, Signal::SIGTERM).await;
    if !first.is_empty() {
        tracing::info!(pgid, pids = ?first, "terminating processes that left the session's process group");
    }
    tokio::time::sleep(grace).await;
    let killed = signal_escaped(session, pgid, Signal::SIGKILL).await;
    last_pass.session = None;
    if !killed.is_empty() {
        tracing::info!(
            pgid,
            ?killed,
            ?grace,
            "processes that left the session's group were still there after the grace; sent SIGKILL"
        );
    }
    first
}

/// The SIGKILL pass of [`terminate_escaped`], done at once (a blocking `/proc` scan) when it is
/// dropped still armed.
struct KillEscapedOnDrop {
    /// `None` once the pass is done.
    session: Option<SessionId>,
    pgid: i32,
}

impl Drop for KillEscapedOnDrop {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let (done, mut answer) = tokio::sync::oneshot::channel();
        serve_escape_signals(vec![EscapeSignal {
            session,
            pgid: self.pgid,
            signal: Signal::SIGKILL,
            done,
        }]);
        if let Ok(killed) = answer.try_recv()
            && !killed.is_empty()
        {
            tracing::info!(
                pgid = self.pgid,
                ?killed,
                "processes that left the session's group were killed before the end of the grace: the node is stopping"
            );
        }
    }
}

/// One request for [`signal_escaped`], waiting for a scan.
struct EscapeSignal {
    session: SessionId,
    pgid: i32,
    signal: Signal,
    done: tokio::sync::oneshot::Sender<Vec<i32>>,
}

/// Requests waiting for the next scan: one scan of `/proc` serves all of them (a node shutting
/// down terminates every session at once; each scan reads a few files per process).
static WAITING_ESCAPE_SIGNALS: std::sync::Mutex<Vec<EscapeSignal>> =
    std::sync::Mutex::new(Vec::new());

/// Sends `signal` to `session`'s processes outside group `pgid`; their pids.
async fn signal_escaped(session: SessionId, pgid: i32, signal: Signal) -> Vec<i32> {
    static ONE_SCAN_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let (done, answer) = tokio::sync::oneshot::channel();
    lock_waiting().push(EscapeSignal {
        session,
        pgid,
        signal,
        done,
    });
    // Whoever holds the turn next takes every waiting request, this one included, unless an
    // earlier holder already did.
    if let Ok(_turn) = ONE_SCAN_AT_A_TIME.acquire().await {
        let batch = std::mem::take(&mut *lock_waiting());
        if !batch.is_empty() {
            let _ = tokio::task::spawn_blocking(move || serve_escape_signals(batch)).await;
        }
    }
    answer.await.unwrap_or_default()
}

fn lock_waiting() -> std::sync::MutexGuard<'static, Vec<EscapeSignal>> {
    WAITING_ESCAPE_SIGNALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One scan for every request of `batch`, and their signals.
fn serve_escape_signals(batch: Vec<EscapeSignal>) {
    let found = Own::current().and_then(|own| {
        let sessions: std::collections::HashSet<&str> = batch
            .iter()
            .map(|request| request.session.as_str())
            .collect();
        Ok((session_processes(&sessions, &own)?, own))
    });
    let (found, own) = match found {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(%error, "cannot scan /proc for processes that left a session's group");
            return;
        }
    };
    for request in batch {
        let mut signalled = Vec::new();
        for (process, session) in &found {
            if *session != request.session.as_str() || process.pgrp == request.pgid {
                continue;
            }
            // Still the process the scan saw, an instant later: not a reused pid.
            let same = read_proc(process.pid).is_ok_and(|now| {
                now.is_alive() && now.start_ticks == process.start_ticks && now.uid == own.uid
            });
            if same {
                signal_process(process.pid, request.signal);
                signalled.push(process.pid);
            }
        }
        let _ = request.done.send(signalled);
    }
}

/// Sends `signal` to one process. "No such process" (it is gone) is not an error.
fn signal_process(pid: i32, signal: Signal) {
    if pid <= 1 {
        tracing::error!(pid, "refusing to signal an invalid process");
        return;
    }
    match nix::sys::signal::kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => tracing::warn!(pid, %signal, %error, "cannot signal a process"),
    }
}

/// Who the node is, so the leftover rule never aims at the node itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Own {
    /// The node's pid.
    pub(super) pid: i32,
    /// The node's process group.
    pub(super) pgrp: i32,
    /// The node's uid.
    pub(super) uid: u32,
}

impl Own {
    /// The running process.
    pub(super) fn current() -> io::Result<Self> {
        let stat = read_proc(std::process::id() as i32)?;
        Ok(Self {
            pid: stat.pid,
            pgrp: stat.pgrp,
            uid: stat.uid,
        })
    }
}

/// Decides whether a leftover group may be signalled; `Err` says why not.
///
/// The rule, in order:
/// 1. the pgid is a real group (> 1) that is not the node's own, and the node is not in it;
/// 2. at least one member is alive (zombies cannot be signalled);
/// 3. every member belongs to the node's user (its real uid, [`ProcStat::uid`], is the node's);
/// 4. with a recorded leader start time: if the leader (pid == pgid) is still there, it
///    started exactly then; and no member (zombies included) started before then.
///
/// Why 4 works: every process of a session's group is the leader or a descendant of it, so it
/// started at or after the leader. A member that started earlier means the pgid now names
/// someone else's group. The rule cannot catch one case: the recorded leader died, its pid was
/// reused by a newer process that made its own group, and that process died too, leaving only
/// children started after the recorded time. Without a recorded start time only 1 to 3 apply.
pub(super) fn judge_leftover(
    group: &LeftoverGroup,
    members: &[ProcStat],
    own: &Own,
) -> Result<(), String> {
    if group.pgid <= 1 {
        return Err("not a valid process group".into());
    }
    if group.pgid == own.pgrp || members.iter().any(|m| m.pid == own.pid) {
        return Err("it is the node's own process group".into());
    }
    if !members.iter().any(ProcStat::is_alive) {
        return Err("no live process is in it".into());
    }
    if let Some(other) = members.iter().find(|m| m.uid != own.uid) {
        return Err(format!(
            "process {} in it belongs to uid {}, not to the node's uid {}",
            other.pid, other.uid, own.uid
        ));
    }
    if let Some(recorded) = group.start_ticks {
        if let Some(leader) = members.iter().find(|m| m.pid == group.pgid)
            && leader.start_ticks != recorded
        {
            return Err(format!(
                "its leader started at tick {}, not at the recorded tick {recorded}: the pid was reused",
                leader.start_ticks
            ));
        }
        if let Some(older) = members.iter().find(|m| m.start_ticks < recorded) {
            return Err(format!(
                "process {} in it started at tick {}, before the recorded leader (tick {recorded})",
                older.pid, older.start_ticks
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(pid: i32, state: u8, start_ticks: u64) -> ProcStat {
        ProcStat {
            pid,
            state,
            pgrp: 500,
            start_ticks,
            uid: 1000,
        }
    }

    const OWN: Own = Own {
        pid: 42,
        pgrp: 42,
        uid: 1000,
    };

    fn group(start_ticks: Option<u64>) -> LeftoverGroup {
        LeftoverGroup {
            pgid: 500,
            start_ticks,
        }
    }

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name_parses() {
        let line = "4242 (my (odd) prog) name) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 \
                    20 0 1 0 987654 1234 56 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat = parse_stat(line, 7).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                pid: 4242,
                state: b'S',
                pgrp: 4240,
                start_ticks: 987654,
                uid: 7
            }
        );
        assert!(stat.is_alive());
        assert_eq!(parse_stat("12 (x) Z 1 2", 0), None, "truncated line");
        assert_eq!(parse_stat("garbage", 0), None);
    }

    /// Regression: the uid was the owner of `/proc/PID`, which the kernel shows as root for a
    /// non-dumpable or setuid process, so a leftover group holding one was refused as someone
    /// else's after a crash, its session recorded interrupted while its processes ran on.
    #[test]
    fn a_member_whose_proc_directory_is_root_s_counts_by_its_real_uid() {
        // A setuid-root program run by the node's user: real uid 1000, effective and saved 0;
        // its /proc/PID is root's.
        let setuid_status = "Name:\tpasswd\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t501\n\
                             Pid:\t501\nPPid:\t500\nTracerPid:\t0\nUid:\t1000\t0\t0\t0\n\
                             Gid:\t1000\t1000\t1000\t1000\nFDSize:\t64\n";
        let setuid_stat = "501 (passwd) S 500 500 500 0 -1 4194560 100 0 0 0 1 2 0 0 \
                           20 0 1 0 150 1234 56 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        // The group's leader, non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): every uid 1000, and
        // its /proc/PID root's too.
        let leader_status = "Name:\tagent\nState:\tS (sleeping)\nUid:\t1000\t1000\t1000\t1000\n";
        let leader_stat = "500 (agent) S 1 500 500 0 -1 4194560 100 0 0 0 1 2 0 0 \
                           20 0 1 0 100 1234 56 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let members = [
            parse_proc(leader_stat, leader_status).unwrap(),
            parse_proc(setuid_stat, setuid_status).unwrap(),
        ];
        assert_eq!(members[1].uid, 1000, "the real uid, not the effective one");
        assert_eq!((members[1].pgrp, members[1].start_ticks), (500, 150));
        assert_eq!(judge_leftover(&group(Some(100)), &members, &OWN), Ok(()));

        assert_eq!(
            parse_real_uid("Name:\tx\nGid:\t0\t0\t0\t0\n"),
            None,
            "no Uid: line"
        );
        assert_eq!(parse_real_uid("Uid:\tabc\t0\t0\t0\n"), None);
        assert_eq!(parse_proc(leader_stat, "Name:\tx\n"), None);
    }

    #[test]
    fn our_own_stat_is_readable() {
        let own = Own::current().unwrap();
        assert_eq!(own.pid, std::process::id() as i32);
        let stat = read_proc(own.pid).unwrap();
        assert!(stat.start_ticks > 0);
        assert!(
            group_members(own.pgrp)
                .unwrap()
                .iter()
                .any(|m| m.pid == own.pid)
        );
    }

    #[test]
    fn an_empty_group_is_known_without_a_scan() {
        use std::os::unix::process::CommandExt;

        let own = Own::current().unwrap();
        assert!(
            !group_is_empty(own.pgrp),
            "the node's own group has the node"
        );
        let mut child = std::process::Command::new("true")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        child.wait().unwrap();
        assert!(
            group_is_empty(pgid),
            "its only member exited and was reaped"
        );
        assert!(!has_live_members(pgid));
    }

    #[test]
    fn leftover_rule() {
        let members = [member(500, b'S', 100), member(501, b'S', 150)];
        assert_eq!(judge_leftover(&group(Some(100)), &members, &OWN), Ok(()));
        assert_eq!(judge_leftover(&group(None), &members, &OWN), Ok(()));
        // Leader alive but started at another time: the pid was reused.
        assert!(judge_leftover(&group(Some(90)), &members, &OWN).is_err());
        // Leader gone, a member older than the recorded leader: not ours.
        let orphans = [member(501, b'S', 150)];
        assert!(judge_leftover(&group(Some(200)), &orphans, &OWN).is_err());
        assert_eq!(judge_leftover(&group(Some(100)), &orphans, &OWN), Ok(()));
        // Only zombies: nothing to signal.
        let zombies = [member(501, b'Z', 150)];
        assert!(judge_leftover(&group(Some(100)), &zombies, &OWN).is_err());
        // An old zombie still counts as evidence that the group is not ours.
        let mixed = [member(501, b'S', 150), member(502, b'Z', 50)];
        assert!(judge_leftover(&group(Some(100)), &mixed, &OWN).is_err());
        // Someone else's process.
        let foreign = [ProcStat {
            uid: 0,
            ..member(501, b'S', 150)
        }];
        assert!(judge_leftover(&group(Some(100)), &foreign, &OWN).is_err());
        // The node's own group, or a group holding the node.
        let own_group = LeftoverGroup {
            pgid: 42,
            start_ticks: None,
        };
        assert!(judge_leftover(&own_group, &members, &OWN).is_err());
        let holding_us = [member(42, b'S', 150)];
        assert!(judge_leftover(&group(None), &holding_us, &OWN).is_err());
        let invalid = LeftoverGroup {
            pgid: 1,
            start_ticks: None,
        };
        assert!(judge_leftover(&invalid, &members, &OWN).is_err());
    }
}
