//! Clusters on loopback for `troupe demo` and `troupe bench cluster`: a scratch directory,
//! certificates from one CA, node configurations, and nodes run as child processes of this
//! binary, so a demo or a bench can stop one for real with SIGKILL (no leave, nothing sent: the
//! kernel closes its sockets).
//!
//! A child is the hidden command `troupe loopback-node`. It reads its configuration as one JSON
//! line on stdin, starts the node, answers with one JSON line on stdout (its id, pid and
//! addresses), and runs until its stdin closes (the parent stopped it, or died), SIGINT or
//! SIGTERM, or its root supervisor gave up. It writes no discovery entry. Children run in a
//! process group of their own, so a Ctrl-C in the terminal reaches the parent only, which then
//! stops them in order.

use std::collections::VecDeque;
use std::io::{BufRead as _, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use troupe_actors::ids::NodeId;

use crate::cluster::certs;
use crate::config::{ClusterProfile, Config};
use crate::node::Node;

/// The hidden subcommand that runs a child node.
const CHILD_COMMAND: &str = "loopback-node";
/// Largest configuration line a child accepts.
const MAX_SPEC_BYTES: u64 = 1024 * 1024;
/// How long a child may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to stop gracefully before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Log lines of a child kept for error messages.
const LOG_TAIL: usize = 200;

/// A scratch directory (mode 0700) under the system's temporary directory, removed on drop.
pub(super) struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates `<tmp>/<prefix>-<pid>-<random>`.
    pub(super) fn create(prefix: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| {
                format!(
                    "cannot create the scratch directory {} (set TMPDIR to a writable directory)",
                    path.display()
                )
            })?;
        Ok(Self { path })
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "troupe: cannot remove the scratch directory {}: {error}",
                self.path.display()
            );
        }
    }
}

/// Makes a cluster CA in `root/<first>/cluster` with the first node's certificate, and issues a
/// certificate for each other node into `root/<name>/cluster` (where their configuration looks
/// by default), as `troupe cluster init` and `troupe cluster issue` do.
pub(super) fn make_certificates(root: &Path, nodes: &[&str]) -> anyhow::Result<()> {
    let Some((first, others)) = nodes.split_first() else {
        bail!("no nodes to make certificates for");
    };
    let now = OffsetDateTime::now_utc();
    let ca_dir = root.join(first).join("cluster");
    certs::init(&ca_dir, &NodeId::new(first)?, now)
        .with_context(|| format!("cannot make the cluster CA in {}", ca_dir.display()))?;
    for name in others {
        let out = root.join(name).join("cluster");
        certs::issue(&ca_dir, &NodeId::new(name)?, &out, now)
            .with_context(|| format!("cannot issue a certificate for node {name}"))?;
    }
    Ok(())
}

/// The configuration of node `name` on loopback: data in `root/<name>`, HTTP and QUIC on
/// `127.0.0.1:0`, joining `seeds`, with the given membership profile, sessions allowed to run
/// in `root`, logging warnings only.
pub(super) fn node_config(
    root: &Path,
    name: &str,
    seeds: Vec<SocketAddr>,
    profile: ClusterProfile,
) -> anyhow::Result<Config> {
    let mut config = Config {
        node_id: Some(NodeId::new(name)?),
        data_dir: Some(root.join(name)),
        ..Config::default()
    };
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.cluster.enabled = true;
    config.cluster.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.cluster.profile = profile;
    config.cluster.seeds = seeds;
    config.sessions.workspace_roots = vec![root.to_owned()];
    config.log.level = "warn".into();
    Ok(config)
}

/// What a child reads on stdin.
#[derive(Serialize, Deserialize)]
struct ChildSpec {
    config: Config,
    http: bool,
}

/// What a child answers on stdout once its node runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChildReady {
    node: String,
    pid: u32,
    http: Option<SocketAddr>,
    cluster: SocketAddr,
}

/// A node running as a child process of this program.
pub(super) struct NodeChild {
    ready: ChildReady,
    data_dir: PathBuf,
    child: Child,
    /// Closing it asks the child to stop.
    stdin: Option<ChildStdin>,
    /// Kept open: the child's stdout after its ready line.
    _stdout: BufReader<ChildStdout>,
    logs: Arc<Mutex<VecDeque<String>>>,
}

impl NodeChild {
    /// Starts a node with `config` in a child process (serving HTTP when `http`), and waits
    /// until it runs.
    pub(super) async fn start(config: Config, http: bool) -> anyhow::Result<Self> {
        let name = config.resolved_node_id().to_string();
        let data_dir = config.resolved_data_dir();
        let program = std::env::current_exe()
            .context("cannot find this program's path to start a node from it")?;
        let mut child = Command::new(&program)
            .arg(CHILD_COMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} for node {name}", program.display()))?;
        let logs: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let stderr = child.stderr.take().context("the child has no stderr")?;
        let log_reader = {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut logs = logs.lock().unwrap_or_else(|poison| poison.into_inner());
                    if logs.len() == LOG_TAIL {
                        logs.pop_front();
                    }
                    logs.push_back(line);
                }
            })
        };
        let mut stdin = child.stdin.take().context("the child has no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("the child has no stdout")?);
        let mut line = serde_json::to_string(&ChildSpec { config, http })?;
        line.push('\n');
        // The log of a child that failed to start, once it has exited (or after 5 s).
        let failed_log = async |child: &mut Child| {
            let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(status)) => status.to_string(),
                _ => "still running".to_owned(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), log_reader).await;
            let logs = logs.lock().unwrap_or_else(|poison| poison.into_inner());
            format!(
                "({status}); its log:\n{}",
                logs.iter().cloned().collect::<Vec<_>>().join("\n")
            )
        };
        if let Err(error) = stdin.write_all(line.as_bytes()).await {
            bail!(
                "node {name} did not take its configuration: {error} {}",
                failed_log(&mut child).await
            );
        }
        let mut answer = String::new();
        let read = tokio::time::timeout(START_TIMEOUT, stdout.read_line(&mut answer)).await;
        let ready = match read {
            Ok(Ok(n)) if n > 0 => serde_json::from_str::<ChildReady>(&answer)
                .with_context(|| format!("node {name} answered {answer:?}"))?,
            Ok(Err(error)) => bail!("cannot read node {name}'s answer: {error}"),
            Ok(Ok(_)) => bail!(
                "node {name} exited before it ran {}",
                failed_log(&mut child).await
            ),
            Err(_) => {
                let _ = child.start_kill();
                bail!(
                    "node {name} did not start within {}s {}",
                    START_TIMEOUT.as_secs(),
                    failed_log(&mut child).await
                );
            }
        };
        Ok(Self {
            ready,
            data_dir,
            child,
            stdin: Some(stdin),
            _stdout: stdout,
            logs,
        })
    }

    /// The node id.
    pub(super) fn name(&self) -> &str {
        &self.ready.node
    }

    /// The child's process id.
    pub(super) fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// The node's HTTP address (when it serves HTTP).
    pub(super) fn http(&self) -> Option<SocketAddr> {
        self.ready.http
    }

    /// The node's cluster (QUIC) address.
    pub(super) fn cluster(&self) -> SocketAddr {
        self.ready.cluster
    }

    /// The node's data directory.
    pub(super) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The last lines the node logged.
    pub(super) fn log_tail(&self) -> String {
        let logs = self
            .logs
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        logs.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Sends SIGKILL now: the node stops without a word (no leave, no closing of its
    /// connections; the kernel closes its sockets).
    pub(super) fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .start_kill()
            .with_context(|| format!("cannot kill node {}", self.ready.node))
    }

    /// Waits until the process exited (after [`NodeChild::kill`]).
    pub(super) async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        Ok(self.child.wait().await?)
    }

    /// True while the process runs.
    pub(super) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the node gracefully (it leaves the cluster), then kills it if it has not exited
    /// within 20 s. Returns how it ended.
    pub(super) async fn stop(&mut self) -> Option<ExitStatus> {
        drop(self.stdin.take());
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await.ok()
            }
        }
    }
}

/// `troupe loopback-node` options: none; the configuration comes on stdin.
#[derive(Debug, clap::Args)]
pub(super) struct ChildArgs {}

/// Runs a child node (the hidden `troupe loopback-node`).
pub(super) async fn run_child(_args: ChildArgs) -> anyhow::Result<ExitCode> {
    // stdin is read on a thread of its own: a blocked read there never holds the runtime's
    // shutdown, and its end (EOF) tells that the parent stopped us or is gone.
    let (spec_tx, spec_rx) = tokio::sync::oneshot::channel();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut stdin = stdin.lock();
            let mut line = String::new();
            let read = (&mut stdin).take(MAX_SPEC_BYTES).read_line(&mut line);
            let _ = spec_tx.send(read.map(|_| line));
            let mut sink = [0u8; 256];
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = closed_tx.send(());
        })
        .context("cannot start the stdin reader")?;
    let line = spec_rx
        .await
        .context("the stdin reader stopped")?
        .context("cannot read the configuration from stdin")?;
    if line.trim().is_empty() {
        bail!(
            "expected the node's configuration as one JSON line on stdin; `troupe {CHILD_COMMAND}` \
             is started by `troupe demo` and `troupe bench cluster`, use `troupe node` to run a node"
        );
    }
    let spec: ChildSpec = serde_json::from_str(&line).with_context(|| {
        format!("the configuration on stdin is not valid (at most {MAX_SPEC_BYTES} bytes of JSON)")
    })?;
    spec.config.validate()?;
    crate::telemetry::init(spec.config.log.format, &spec.config.log.level);
    crate::tls::install_default_provider();
    let signal = super::node::shutdown_signal()?;
    let mut builder = Node::builder().config(spec.config);
    if !spec.http {
        builder = builder.without_http();
    }
    let node = builder.start().await?;
    let ready = ChildReady {
        node: node.node_id().to_string(),
        pid: std::process::id(),
        http: node.http_addr(),
        cluster: node.cluster_addr().context(
            "the node has no cluster address; the configuration must enable the cluster",
        )?,
    };
    println!("{}", serde_json::to_string(&ready)?);
    let failed = tokio::select! {
        () = signal => false,
        _ = closed_rx => false,
        () = node.wait() => true,
    };
    if failed {
        tracing::error!("the node's root supervisor gave up; shutting down");
    }
    node.shutdown().await;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
