//! Local discovery: each running `troupe node` keeps a small JSON file in a per-user directory
//! so `troupe mcp` and `troupe nodes` find it without configuration.
//!
//! The directory is `TROUPE_DISCOVERY_DIR` when set, else `$XDG_RUNTIME_DIR/troupe/nodes`, else
//! `<local data dir>/troupe/nodes`; it is created 0700 and files are written 0600 (they name the
//! admin token's file, not the token). A node rewrites its file every [`REFRESH`] and removes it
//! on a clean shutdown. An entry not refreshed for [`STALE_AFTER`], or whose pid is gone, is stale:
//! readers ignore it and delete it. Staleness is a pure function of the entry, an explicit `now`
//! and whether the pid lives.
//!
//! An entry tells `troupe mcp` where to send the admin token it reads, so nothing in the
//! directory is trusted unless it is this user's: an existing directory owned by another user or
//! open to group or others is refused (reading and writing), and an entry file owned by another
//! user is skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often a node rewrites its entry.
pub const REFRESH: Duration = Duration::from_secs(10);
/// An entry older than this is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// Largest entry file read, in bytes.
const MAX_ENTRY_BYTES: u64 = 16 * 1024;
/// Most entries read from the directory.
const MAX_ENTRIES: usize = 1024;

/// One node's discovery entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The node's id.
    pub node_id: String,
    /// Its process id.
    pub pid: u32,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// The file holding its admin token.
    pub token_file: PathBuf,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When the entry was last written, in seconds since the Unix epoch.
    pub updated_at: u64,
    /// Whether the node is embedded in a `troupe mcp` (it stops when its stdio clients are
    /// gone) rather than run by `troupe node`. Absent in entries of older versions: `false`.
    #[serde(default)]
    pub embedded: bool,
}

impl Entry {
    /// Why the entry is stale at `now` (seconds since the epoch), if it is.
    pub fn stale_reason(&self, now: u64, pid_alive: bool) -> Option<String> {
        if !pid_alive {
            return Some(format!("process {} is gone", self.pid));
        }
        let age = now.saturating_sub(self.updated_at);
        (age > STALE_AFTER.as_secs())
            .then(|| format!("not refreshed for {age} s (stale after {STALE_AFTER:?})"))
    }

    /// The entry's file name.
    pub fn file_name(&self) -> String {
        format!("{}-{}.json", sanitize(&self.node_id), self.pid)
    }
}

fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Whether process `pid` exists and is this user's (signal 0). Entries are written by this
/// user's nodes, so a pid of another user's process (EPERM) is a reused pid: the node is gone.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Refuses `dir` unless it is owned by `uid` and closed to group and others: entries there
/// decide where the admin token goes.
fn check_dir(dir: &Path, uid: u32) -> std::io::Result<()> {
    use crate::ownership::{Exposure, NO_GROUP_OR_OTHER_ACCESS, exposure};
    let metadata = std::fs::metadata(dir)?;
    if !metadata.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the discovery directory {} is not a directory; remove it, or point \
                 TROUPE_DISCOVERY_DIR at a directory of your own",
                dir.display()
            ),
        ));
    }
    let Some(exposure) = exposure(&metadata, uid, NO_GROUP_OR_OTHER_ACCESS) else {
        return Ok(());
    };
    let fix = match exposure {
        Exposure::Owner { .. } => {
            "remove it (it is made again, private) if it is yours to remove".to_owned()
        }
        Exposure::Mode { .. } => format!("run `chmod 700 {}`", dir.display()),
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "the discovery directory {} {exposure}: another user could plant entries that \
             receive your admin token, or read yours; {fix}, or point TROUPE_DISCOVERY_DIR at a \
             directory of your own",
            dir.display()
        ),
    ))
}

/// The discovery directory.
pub fn directory() -> PathBuf {
    if let Some(dir) = std::env::var_os("TROUPE_DISCOVERY_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::runtime_dir()
        .or_else(dirs::data_local_dir)
        .map(|dir| dir.join("troupe").join("nodes"))
        .unwrap_or_else(|| PathBuf::from(".troupe").join("nodes"))
}

/// Writes `entry` into `dir` (atomically: a temporary file renamed over the entry); refuses a
/// directory that is not private to this user.
pub fn write(dir: &Path, entry: &Entry) -> std::io::Result<PathBuf> {
    write_as(dir, entry, crate::ownership::current_uid())
}

fn write_as(dir: &Path, entry: &Entry, uid: u32) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    check_dir(dir, uid)?;
    let path = dir.join(entry.file_name());
    let temporary = dir.join(format!(".{}.tmp", entry.file_name()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(&serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    Ok(path)
}

/// Live entries in `dir`, most recently started first; stale and unreadable ones are deleted,
/// files of other users skipped. A missing directory has none; one that is not private to this
/// user is refused, saying how to fix it.
pub fn live(dir: &Path, now: u64) -> std::io::Result<Vec<Entry>> {
    live_as(dir, now, crate::ownership::current_uid())
}

fn live_as(dir: &Path, now: u64, uid: u32) -> std::io::Result<Vec<Entry>> {
    use std::os::unix::fs::MetadataExt;
    match check_dir(dir, uid) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        checked => checked?,
    }
    let mut entries = Vec::new();
    for file in std::fs::read_dir(dir)?.flatten().take(MAX_ENTRIES) {
        let path = file.path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_file() && metadata.uid() == uid => {}
            Ok(metadata) => {
                tracing::warn!(
                    path = %path.display(),
                    owner = metadata.uid(),
                    "skipping a discovery entry that is not a file of yours"
                );
                continue;
            }
            Err(_) => continue,
        }
        let stale = match read_entry(&path) {
            Some(entry) => match entry.stale_reason(now, pid_alive(entry.pid)) {
                None => {
                    entries.push(entry);
                    continue;
                }
                Some(reason) => reason,
            },
            None => "unreadable".to_owned(),
        };
        tracing::info!(path = %path.display(), reason = %stale, "removing a stale discovery entry");
        let _ = std::fs::remove_file(&path);
    }
    entries.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then(a.node_id.cmp(&b.node_id))
    });
    Ok(entries)
}

fn read_entry(path: &Path) -> Option<Entry> {
    let metadata = std::fs::metadata(path).ok()?;
    if metadata.len() > MAX_ENTRY_BYTES {
        return None;
    }
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// A node's registration: refreshed by a task until dropped or [`Registration::remove`]d.
pub struct Registration {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// Writes `entry` into `dir` now and every [`REFRESH`].
    pub fn start(dir: PathBuf, mut entry: Entry) -> std::io::Result<Self> {
        entry.updated_at = now_secs();
        let path = write(&dir, &entry)?;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                entry.updated_at = now_secs();
                if let Err(error) = write(&dir, &entry) {
                    tracing::warn!(%error, dir = %dir.display(), "cannot refresh the discovery entry");
                }
            }
        });
        Ok(Self { path, task })
    }

    /// Stops refreshing and deletes the entry.
    pub fn remove(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }

    /// The entry's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory as `write` makes them: private to this user.
    fn private_dir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn entry(node: &str, pid: u32, updated_at: u64) -> Entry {
        Entry {
            node_id: node.into(),
            pid,
            http: "127.0.0.1:7070".parse().unwrap(),
            token_file: "/tmp/admin.token".into(),
            started_at: format!("2026-11-22T00:00:{:02}Z", updated_at % 60),
            updated_at,
            embedded: false,
        }
    }

    #[test]
    fn entries_are_stale_when_old_or_dead() {
        let fresh = entry("a", 1, 1_000);
        assert_eq!(fresh.stale_reason(1_030, true), None);
        assert!(
            fresh
                .stale_reason(1_031, true)
                .unwrap()
                .contains("not refreshed")
        );
        assert!(fresh.stale_reason(1_000, false).unwrap().contains("gone"));
    }

    #[test]
    fn live_keeps_fresh_entries_of_live_processes_and_deletes_the_rest() {
        let dir = private_dir();
        let me = std::process::id();
        let now = now_secs();
        write(dir.path(), &entry("fresh", me, now)).unwrap();
        let old = write(dir.path(), &entry("old", me, now - 100)).unwrap();
        // A pid far above pid_max never exists.
        let dead = write(dir.path(), &entry("dead", 999_999_999, now)).unwrap();
        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "{").unwrap();
        let found = live(dir.path(), now).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].node_id, "fresh");
        assert!(!old.exists() && !dead.exists() && !garbage.exists());
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let nodes = dir.path().join("nodes");
        let path = write(&nodes, &entry("a", 1, 1)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&nodes).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_directory_open_to_others_or_of_another_user_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = private_dir();
        let me = crate::ownership::current_uid();
        let now = now_secs();
        write(dir.path(), &entry("mine", std::process::id(), now)).unwrap();
        for mode in [0o777, 0o750, 0o701] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let error = live(dir.path(), now).unwrap_err().to_string();
            assert!(
                error.contains(&format!("mode {mode:04o}")) && error.contains("chmod 700"),
                "{error}"
            );
            let error = write(dir.path(), &entry("b", 1, now))
                .unwrap_err()
                .to_string();
            assert!(error.contains("chmod 700"), "{error}");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(live(dir.path(), now).unwrap().len(), 1);
        // Owned by someone else (as another user would see it).
        let error = live_as(dir.path(), now, me + 1).unwrap_err().to_string();
        assert!(error.contains(&format!("owned by uid {me}")), "{error}");
        let error = write_as(dir.path(), &entry("b", 1, now), me + 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("TROUPE_DISCOVERY_DIR"), "{error}");
        // A missing directory simply has no entries.
        assert!(live(&dir.path().join("none"), now).unwrap().is_empty());
    }

    #[test]
    fn entries_that_are_not_files_of_this_user_are_skipped_and_left_alone() {
        let dir = private_dir();
        let elsewhere = private_dir();
        let now = now_secs();
        let me = std::process::id();
        let planted = write(elsewhere.path(), &entry("planted", me, now)).unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&planted, &link).unwrap();
        let foreign = write(dir.path(), &entry("foreign", me, now)).unwrap();
        // Only root can give a file away; other users still test the symlink.
        let chowned = std::os::unix::fs::chown(&foreign, Some(65534), None).is_ok();
        if !chowned {
            std::fs::remove_file(&foreign).unwrap();
        }
        write(dir.path(), &entry("mine", me, now)).unwrap();
        let found = live(dir.path(), now).unwrap();
        let names: Vec<&str> = found.iter().map(|entry| entry.node_id.as_str()).collect();
        assert_eq!(names, ["mine"]);
        assert!(std::fs::symlink_metadata(&link).is_ok(), "not deleted");
        assert_eq!(foreign.exists(), chowned, "not deleted");
    }
}
