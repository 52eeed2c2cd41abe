//! Local discovery: each running `troupe node` keeps a small JSON file in a per-user directory
//! so `troupe mcp` and `troupe nodes` find it without configuration.
//!
//! The directory is `TROUPE_DISCOVERY_DIR` when set, else `$XDG_RUNTIME_DIR/troupe/nodes`, else
//! `<local data dir>/troupe/nodes`; it is created 0700 and files are written 0600 (they name the
//! admin token's file, not the token). A node rewrites its file every [`REFRESH`] and removes it
//! on a clean shutdown. An entry not refreshed for [`STALE_AFTER`], or whose pid is gone, is stale:
//! readers ignore it and delete it. Staleness is a pure function of the entry, an explicit `now`
//! and whether the pid lives.

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

/// Whether process `pid` exists (signal 0).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        // It exists but belongs to someone else.
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
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

/// Writes `entry` into `dir` (atomically: a temporary file renamed over the entry).
pub fn write(dir: &Path, entry: &Entry) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
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

/// Live entries in `dir`, most recently started first; stale and unreadable ones are deleted.
pub fn live(dir: &Path, now: u64) -> Vec<Entry> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    for file in read.flatten().take(MAX_ENTRIES) {
        let path = file.path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
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
    entries
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
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let now = now_secs();
        write(dir.path(), &entry("fresh", me, now)).unwrap();
        let old = write(dir.path(), &entry("old", me, now - 100)).unwrap();
        // A pid far above pid_max never exists.
        let dead = write(dir.path(), &entry("dead", 999_999_999, now)).unwrap();
        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "{").unwrap();
        let found = live(dir.path(), now);
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
}
