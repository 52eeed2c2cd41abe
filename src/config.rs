//! Node configuration: one merge path — command-line flags, then `TROUPE_<SECTION>__<KEY>`
//! environment variables, then the TOML file, then defaults — validated once at start.
//!
//! Unknown keys are errors (a typo must not be silently ignored), and every error names the key,
//! where the value came from, and what to do. The keys are those of the configuration example in
//! DESIGN.md; docs/CONFIGURATION.md lists them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use troupe_actors::ids::NodeId;

use crate::auth::Role;
pub use crate::provider::ProviderKind;
pub use providers::{MAX_PROVIDER_SECS, MAX_QUEUE_LIMIT, ProviderConfig, ProviderTimeouts};
pub use time::{MAX_RETENTION_SECS, MAX_TIME_SECS};
pub use troupe_actors::provider::{BreakerConfig, RetryConfig};

mod env;
mod providers;
mod time;

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's id; default: derived from the host name (stable across restarts).
    pub node_id: Option<NodeId>,
    /// Where the node keeps its token, store and cluster files; default: the per-user data dir.
    pub data_dir: Option<PathBuf>,
    /// The HTTP front end.
    pub http: HttpConfig,
    /// Bearer tokens.
    pub auth: AuthConfig,
    /// Agent runs.
    pub sessions: SessionsConfig,
    /// LLM providers (`[[providers]]`).
    pub providers: Vec<ProviderConfig>,
    /// The OpenAI-compatible gateway.
    pub gateway: GatewayConfig,
    /// Clustering.
    pub cluster: ClusterConfig,
    /// The event bus and event log.
    pub events: EventsConfig,
    /// Restart behaviour of the node's supervisors.
    pub supervision: SupervisionConfig,
    /// The HealthActor.
    pub health: HealthSettings,
    /// Logging.
    pub log: LogConfig,
    /// Debugging aids.
    pub debug: DebugConfig,
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Host names accepted in `Host` / `Origin` (DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Seconds a legacy MCP session (`Mcp-Session-Id`) may go without a request or a call in
    /// flight before the node closes it.
    pub mcp_session_idle_secs: u64,
    /// Seconds a client connection may accept none of what the node sends before the node
    /// closes it (a stalled reader of any stream).
    pub send_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()],
            max_body_bytes: 1024 * 1024,
            mcp_session_idle_secs: 300,
            send_timeout_secs: 60,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Tokens, stored as SHA-256 hashes of the bearer value.
    pub tokens: Vec<TokenConfig>,
    /// Requests per second each token may make (sustained).
    pub requests_per_second: u32,
    /// Requests each token may make in a burst.
    pub burst: u32,
    /// Links (event streams, WebSockets, MCP clients) each token may hold at once, of the
    /// node's 10,000.
    pub max_links_per_token: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            requests_per_second: 100,
            burst: 200,
            max_links_per_token: 1_000,
        }
    }
}

/// One entry of `auth.tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs and link listings (never the token itself).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Hex SHA-256 of the token (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
}

/// `[sessions]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Runs at once.
    pub max_concurrent: usize,
    /// Runs waiting for a slot.
    pub queue_capacity: usize,
    /// A run longer than this emits `session.long_running` (and again at each multiple).
    pub long_running_after_secs: u64,
    /// Timeout of a run that does not set one.
    pub default_timeout_secs: u64,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace_secs: u64,
    /// Working directories must resolve inside one of these.
    pub workspace_roots: Vec<PathBuf>,
    /// Programs sessions may run (empty: any, allowed only on a loopback listener).
    pub allowed_programs: Vec<String>,
    /// `session.output` events one session may publish per second (and the burst); output past
    /// that is coalesced into the next event (every line stays in the session's log).
    pub output_events_per_sec: u32,
    /// Sessions that ended (succeeded, failed, cancelled, timed out, interrupted) longer ago
    /// than this are deleted from the store with their transitions, output log and idempotency
    /// key. 0 keeps every session forever; otherwise at least 3600. Sessions that have not
    /// ended are never deleted.
    pub retention_secs: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            queue_capacity: 1024,
            long_running_after_secs: 60,
            default_timeout_secs: 3600,
            kill_grace_secs: 5,
            workspace_roots: Vec::new(),
            allowed_programs: Vec::new(),
            output_events_per_sec: 20,
            retention_secs: 30 * 24 * 3600,
        }
    }
}

/// The shortest `sessions.retention_secs` other than 0 (keep forever).
const MIN_SESSION_RETENTION_SECS: u64 = 3600;

/// The shortest `events.retention_secs` (there is no "keep forever" for events).
const MIN_EVENT_RETENTION_SECS: u64 = 60;

/// The largest `events.ring_capacity`: the ring is held in memory.
pub const MAX_RING_CAPACITY: usize = 1_000_000;

/// The largest `events.subscriber_buffer`: the fan-out channel allocates every slot at start.
pub const MAX_SUBSCRIBER_BUFFER: usize = 1 << 20;

/// `[gateway]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Model aliases: `fast = "openai/gpt-4o-mini"`.
    pub aliases: BTreeMap<String, String>,
    /// A streaming caller that takes nothing of what is ready for it for this long (it stopped
    /// reading, its socket still open) is taken for gone: its call gives back the provider's
    /// concurrency slot and budget, as when it disconnects. 1 to 3600.
    pub stalled_reader_secs: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            aliases: BTreeMap::new(),
            stalled_reader_secs: 60,
        }
    }
}

/// Membership timing profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterProfile {
    /// foca's LAN defaults.
    #[default]
    Lan,
    /// Fast failure detection (tests, demos).
    Fast,
}

/// `[cluster]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Runs the cluster endpoint (also turned on by `--cluster-listen`, `--join`, or seeds).
    pub enabled: bool,
    /// QUIC address.
    pub listen: SocketAddr,
    /// Addresses of nodes to join.
    pub seeds: Vec<SocketAddr>,
    /// Timing profile.
    pub profile: ClusterProfile,
    /// The cluster CA certificate (relative to the data dir unless absolute).
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// Labels gossiped with the node's metadata (placement constraints match them).
    pub labels: BTreeMap<String, String>,
}

impl ClusterConfig {
    /// True when the node runs its cluster endpoint: `enabled`, or seeds to join.
    pub fn is_enabled(&self) -> bool {
        self.enabled || !self.seeds.is_empty()
    }

    /// `path` resolved against the data directory unless absolute.
    pub fn resolve(&self, data_dir: &Path, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            data_dir.join(path)
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            seeds: Vec::new(),
            profile: ClusterProfile::Lan,
            ca: PathBuf::from("cluster/ca.pem"),
            cert: PathBuf::from("cluster/node.pem"),
            key: PathBuf::from("cluster/node.key"),
            labels: BTreeMap::new(),
        }
    }
}

/// `[events]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events kept in memory for replay.
    pub ring_capacity: usize,
    /// How far a subscriber may fall behind before it loses the oldest events.
    pub subscriber_buffer: usize,
    /// Seconds between SSE heartbeat comments.
    pub heartbeat_secs: u64,
    /// Persisted events older than this are deleted.
    pub retention_secs: u64,
    /// The persisted event log is trimmed to about this size.
    pub retention_bytes: u64,
    /// Milliseconds a batch of event and output appends alone may wait after the store's
    /// previous commit, gathering more (fewer commits under a flood; anything awaited, such as a
    /// session transition, commits at once). At most 60,000.
    pub log_linger_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            ring_capacity: 10_000,
            subscriber_buffer: 4_096,
            heartbeat_secs: 15,
            retention_secs: 7 * 24 * 3600,
            retention_bytes: 256 * 1024 * 1024,
            log_linger_ms: 10,
        }
    }
}

/// `[supervision]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Restarts a supervisor tolerates within the window.
    pub max_restarts: u32,
    /// The window.
    pub window_secs: u64,
    /// First restart delay.
    pub backoff_min_ms: u64,
    /// Largest restart delay.
    pub backoff_max_ms: u64,
    /// How long a graceful shutdown of the node may take before actors are killed.
    pub shutdown_timeout_secs: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            window_secs: 60,
            backoff_min_ms: 10,
            backoff_max_ms: 5_000,
            shutdown_timeout_secs: 30,
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// How often health is aggregated.
    pub tick_ms: u64,
    /// Restarts are counted over this window.
    pub window_secs: u64,
    /// Restarts inside the window that make the node degraded.
    pub degraded_after_restarts: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            tick_ms: 1_000,
            window_secs: 60,
            degraded_after_restarts: 3,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `info,troupe=debug`, ….
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// `[debug]`
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// Enables `POST /v1/admin/faults`.
    pub fault_injection: bool,
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--node-id`
    pub node_id: Option<String>,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
    /// `--log-level`
    pub log_level: Option<String>,
    /// `--cluster-listen`
    pub cluster_listen: Option<SocketAddr>,
    /// `--join` (added to the seeds)
    pub join: Vec<SocketAddr>,
    /// `--fault-injection`
    pub fault_injection: Option<bool>,
}

/// A configuration that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file given with `--config` does not exist.
    #[error("config file {0} does not exist; check the --config path")]
    MissingFile(PathBuf),
    /// A key is unknown, or a value has the wrong type or form.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// Values are well-formed but do not make sense together.
    #[error("invalid configuration: `{key}`: {message}")]
    Semantic {
        /// The offending key.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// Refuses environment variables that are a configuration key written with one underscore
/// between section and key (`TROUPE_HTTP_LISTEN` for `TROUPE_HTTP__LISTEN`), which the merge
/// would otherwise pass over without a word, and `TROUPE_PROVIDERS`, which only the file sets.
/// Other `TROUPE_*` variables (`TROUPE_URL`, the gateway variables of sessions…) are left alone.
fn misspelled_env_keys(names: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    for name in names {
        let Some(rest) = name.strip_prefix("TROUPE_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        if rest.contains("__") {
            continue;
        }
        if rest == "providers" {
            return Err(ConfigError::Semantic {
                key: "providers".into(),
                message: format!(
                    "{name} is not read: [[providers]] can only be set in the configuration file"
                ),
            });
        }
        let Some(sections) = defaults.as_object() else {
            return Ok(());
        };
        for (section, keys) in sections {
            let key = rest
                .strip_prefix(section.as_str())
                .and_then(|key| key.strip_prefix('_'));
            if let (Some(key), Some(keys)) = (key, keys.as_object())
                && keys.contains_key(key)
            {
                return Err(ConfigError::Semantic {
                    key: format!("{section}.{key}"),
                    message: format!(
                        "{name} is not read: write TROUPE_{}__{} (two underscores between the \
                         section and the key)",
                        section.to_ascii_uppercase(),
                        key.to_ascii_uppercase()
                    ),
                });
            }
        }
    }
    Ok(())
}

impl Config {
    /// Loads and validates the configuration: flags > environment > `file` > defaults.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        misspelled_env_keys(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))?;
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(env::TroupeEnv::new());
        figment = overrides.apply(figment);
        let mut config: Config = figment
            .extract()
            .map_err(|error| describe_in(error, Some(&figment)))?;
        config.cluster.seeds.extend(overrides.join.iter().copied());
        config.cluster.seeds.dedup();
        if overrides.cluster_listen.is_some() || !overrides.join.is_empty() {
            config.cluster.enabled = true;
        }
        config.validate().map_err(|error| match error {
            ConfigError::Semantic { key, mut message } => {
                if let Some(source) = source_of(&figment, &key) {
                    message.push_str(&format!(" (from {source})"));
                }
                ConfigError::Semantic { key, message }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// The node id: configured, or derived from the host name.
    pub fn resolved_node_id(&self) -> NodeId {
        self.node_id.clone().unwrap_or_else(derived_node_id)
    }

    /// The data directory: configured, or the per-user data directory.
    pub fn resolved_data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let semantic = |key: &str, message: String| ConfigError::Semantic {
            key: key.to_owned(),
            message,
        };
        time::validate(self)?;
        if self.http.max_body_bytes < 1024 {
            return Err(semantic(
                "http.max_body_bytes",
                "must be at least 1024 bytes".into(),
            ));
        }
        if !(1..=7 * 24 * 3600).contains(&self.http.mcp_session_idle_secs) {
            return Err(semantic(
                "http.mcp_session_idle_secs",
                "must be 1 to 604800 seconds (a week)".into(),
            ));
        }
        if !(1..=3600).contains(&self.http.send_timeout_secs) {
            return Err(semantic(
                "http.send_timeout_secs",
                format!(
                    "{} is outside 1 to 3600 seconds (an hour)",
                    self.http.send_timeout_secs
                ),
            ));
        }
        for (index, token) in self.auth.tokens.iter().enumerate() {
            let valid =
                token.sha256.len() == 64 && token.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                return Err(semantic(
                    &format!("auth.tokens[{index}].sha256"),
                    format!(
                        "token {:?}: expected 64 hex characters (the SHA-256 of the token: \
                         printf %s TOKEN | sha256sum)",
                        token.name
                    ),
                ));
            }
            if token.name.is_empty() || token.name.len() > 64 {
                return Err(semantic(
                    &format!("auth.tokens[{index}].name"),
                    "must be 1 to 64 characters".into(),
                ));
            }
            // A token's name keys its rate limit and link quota: sharing a name shares them.
            if let Some(reserved) = crate::auth::RESERVED_TOKEN_NAMES
                .iter()
                .find(|reserved| token.name.eq_ignore_ascii_case(reserved))
            {
                return Err(semantic(
                    &format!("auth.tokens[{index}].name"),
                    format!(
                        "{:?} is reserved for the node's own {} (token names key each token's \
                         rate limit and link quota); give this token another name",
                        token.name,
                        if *reserved == crate::auth::ADMIN_PRINCIPAL {
                            "admin token, the data directory's admin.token"
                        } else {
                            "stdio MCP client of troupe mcp"
                        }
                    ),
                ));
            }
            if let Some(first) = self.auth.tokens[..index]
                .iter()
                .position(|earlier| earlier.name == token.name)
            {
                return Err(semantic(
                    &format!("auth.tokens[{index}].name"),
                    format!(
                        "{:?} is also the name of auth.tokens[{first}]; token names key each \
                         token's rate limit and link quota, so give each token its own name",
                        token.name
                    ),
                ));
            }
        }
        if self.auth.requests_per_second == 0 || self.auth.burst == 0 {
            return Err(semantic(
                "auth.requests_per_second",
                "requests_per_second and burst must be at least 1".into(),
            ));
        }
        if !(1..=10_000).contains(&self.auth.max_links_per_token) {
            return Err(semantic(
                "auth.max_links_per_token",
                format!(
                    "{} is out of range; use 1 to 10000 (the node serves 10,000 links in all)",
                    self.auth.max_links_per_token
                ),
            ));
        }
        if self.cluster.labels.len() > 16 {
            return Err(semantic(
                "cluster.labels",
                format!("{} labels; at most 16", self.cluster.labels.len()),
            ));
        }
        for (key, value) in &self.cluster.labels {
            if key.is_empty() || key.len() > 64 || value.len() > 64 {
                return Err(semantic(
                    &format!("cluster.labels.{key}"),
                    "label names must be 1 to 64 bytes and values at most 64 bytes".into(),
                ));
            }
        }
        if self.sessions.output_events_per_sec == 0 {
            return Err(semantic(
                "sessions.output_events_per_sec",
                "must be at least 1".into(),
            ));
        }
        if self.sessions.max_concurrent == 0 {
            return Err(semantic(
                "sessions.max_concurrent",
                "must be at least 1".into(),
            ));
        }
        if self.sessions.queue_capacity == 0 {
            return Err(semantic(
                "sessions.queue_capacity",
                "must be at least 1 (sessions that may wait for a slot)".into(),
            ));
        }
        let max_timeout = troupe_actors::session::SpecLimits::default().max_timeout_secs;
        if !(1..=max_timeout).contains(&self.sessions.default_timeout_secs) {
            return Err(semantic(
                "sessions.default_timeout_secs",
                format!(
                    "{} is outside 1 to {max_timeout} seconds (a week), the range a session's own \
                     timeout_secs may take",
                    self.sessions.default_timeout_secs
                ),
            ));
        }
        if (1..MIN_SESSION_RETENTION_SECS).contains(&self.sessions.retention_secs) {
            return Err(semantic(
                "sessions.retention_secs",
                format!(
                    "{} is under {MIN_SESSION_RETENTION_SECS} (an hour): an ended session's record \
                     (how it ended) and its idempotency key would be gone before a client could \
                     be expected to read or retry them; use at least \
                     {MIN_SESSION_RETENTION_SECS}, or 0 to keep sessions forever",
                    self.sessions.retention_secs
                ),
            ));
        }
        if !(1..=3600).contains(&self.gateway.stalled_reader_secs) {
            return Err(semantic(
                "gateway.stalled_reader_secs",
                format!(
                    "{} is out of range: use 1 to 3600 (seconds a streaming caller may take \
                     nothing before its call is given up)",
                    self.gateway.stalled_reader_secs
                ),
            ));
        }
        providers::validate(&self.providers)?;
        if !(1..=MAX_RING_CAPACITY).contains(&self.events.ring_capacity) {
            return Err(semantic(
                "events.ring_capacity",
                format!(
                    "{} is out of range: use 1 to {MAX_RING_CAPACITY} (events kept in memory)",
                    self.events.ring_capacity
                ),
            ));
        }
        if !(1..=MAX_SUBSCRIBER_BUFFER).contains(&self.events.subscriber_buffer) {
            return Err(semantic(
                "events.subscriber_buffer",
                format!(
                    "{} is out of range: use 1 to {MAX_SUBSCRIBER_BUFFER} (each slot is allocated \
                     when the node starts)",
                    self.events.subscriber_buffer
                ),
            ));
        }
        if self.events.heartbeat_secs == 0 {
            return Err(semantic(
                "events.heartbeat_secs",
                "must be at least 1 (seconds between heartbeats)".into(),
            ));
        }
        if self.events.retention_secs < MIN_EVENT_RETENTION_SECS {
            return Err(semantic(
                "events.retention_secs",
                format!(
                    "{} is under {MIN_EVENT_RETENTION_SECS} (a minute): events would be deleted \
                     almost as soon as they are written (0 does not mean \"keep\" here, as it does \
                     in sessions.retention_secs); to keep events longer, set a large value, e.g. \
                     31536000 for a year, and bound the log with events.retention_bytes",
                    self.events.retention_secs
                ),
            ));
        }
        if self.events.log_linger_ms > 60_000 {
            return Err(semantic(
                "events.log_linger_ms",
                format!(
                    "{} is over 60000 (a minute): appends that long unwritten would be lost in a \
                     crash for nothing",
                    self.events.log_linger_ms
                ),
            ));
        }
        if self.supervision.window_secs == 0 {
            return Err(semantic(
                "supervision.window_secs",
                "is 0; use 1 or more (seconds): with 0 no restart would count against \
                 supervision.max_restarts, so a child that always fails would be restarted \
                 forever"
                    .into(),
            ));
        }
        if self.supervision.backoff_min_ms > self.supervision.backoff_max_ms {
            return Err(semantic(
                "supervision.backoff_min_ms",
                "must not exceed supervision.backoff_max_ms".into(),
            ));
        }
        if self.supervision.backoff_min_ms == 0 && self.supervision.backoff_max_ms > 0 {
            return Err(semantic(
                "supervision.backoff_min_ms",
                format!(
                    "is 0 while supervision.backoff_max_ms is {}; use 1 to {} (milliseconds), \
                     or set both to 0 for immediate restarts",
                    self.supervision.backoff_max_ms, self.supervision.backoff_max_ms
                ),
            ));
        }
        if self.supervision.shutdown_timeout_secs == 0 {
            return Err(semantic(
                "supervision.shutdown_timeout_secs",
                "is 0; use 1 or more (seconds): with 0 a node shutdown would kill every actor \
                 instead of stopping it"
                    .into(),
            ));
        }
        if self.health.tick_ms == 0 {
            return Err(semantic("health.tick_ms", "must be at least 1".into()));
        }
        if self.health.window_secs == 0 {
            return Err(semantic(
                "health.window_secs",
                "is 0; use 1 or more (seconds): with 0 no restart would be counted, so restarts \
                 would never make the node degraded"
                    .into(),
            ));
        }
        if self.health.degraded_after_restarts == 0 {
            return Err(semantic(
                "health.degraded_after_restarts",
                "must be at least 1: with 0 the node would report itself degraded with no \
                 restart at all"
                    .into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|error| {
            semantic(
                "log.level",
                format!(
                    "{:?} is not a log filter ({error}); use e.g. \"info\" or \"info,troupe=debug\"",
                    self.log.level
                ),
            )
        })?;
        if !self.http.listen.ip().is_loopback() {
            if self.auth.tokens.is_empty() {
                return Err(semantic(
                    "auth.tokens",
                    format!(
                        "the node listens on {}, which is not a loopback address; configure \
                         auth.tokens (so access does not rest on the generated admin token \
                         alone) or listen on 127.0.0.1",
                        self.http.listen
                    ),
                ));
            }
            if self.sessions.allowed_programs.is_empty() {
                return Err(semantic(
                    "sessions.allowed_programs",
                    format!(
                        "the node listens on {}, which is not a loopback address; list the \
                         programs sessions may run in sessions.allowed_programs, or listen on \
                         127.0.0.1",
                        self.http.listen
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Overrides {
    fn apply(&self, mut figment: Figment) -> Figment {
        fn set<T: Serialize>(figment: Figment, key: &str, value: &Option<T>) -> Figment {
            match value {
                Some(value) => figment.merge(Serialized::default(key, value)),
                None => figment,
            }
        }
        figment = set(figment, "http.listen", &self.listen);
        figment = set(figment, "data_dir", &self.data_dir);
        figment = set(figment, "node_id", &self.node_id);
        figment = set(figment, "log.format", &self.log_format);
        figment = set(figment, "log.level", &self.log_level);
        figment = set(figment, "cluster.listen", &self.cluster_listen);
        set(figment, "debug.fault_injection", &self.fault_injection)
    }
}

/// A key's path as the docs and the validation messages write it: `providers[0].rpm`.
fn key_path(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.bytes().all(|byte| byte.is_ascii_digit()) && !key.is_empty() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(&part.to_ascii_lowercase());
        }
    }
    key
}

/// Renders figment's errors as `` `section.key`: what is wrong (where the value came from) ``.
/// `figment`, when given, is the merged configuration, to quote a refused value from.
fn describe_in(error: figment::Error, figment: Option<&Figment>) -> ConfigError {
    let messages: Vec<String> = error
        .into_iter()
        .map(|error| {
            let key = key_path(&error.path);
            let mut message = if key.is_empty() {
                error.kind.to_string()
            } else if error
                .kind
                .to_string()
                .contains("invalid socket address syntax")
            {
                // Addresses are `SocketAddr`s: say what is expected, as the flags do.
                let value = figment
                    .and_then(|figment| value_at(figment, &error.path))
                    .and_then(|value| serde_json::to_string(&value).ok())
                    .map(|value| format!("{value} "))
                    .unwrap_or_default();
                format!(
                    "`{key}`: {value}is not IP:PORT; use an IP address and a port, e.g. \
                     127.0.0.1:7070 or [::1]:7070 (host names are not resolved)"
                )
            } else {
                format!("`{key}`: {}", error.kind)
            };
            if let Some(metadata) = &error.metadata {
                if metadata.name.contains("environment") && !error.path.is_empty() {
                    let variable = format!("TROUPE_{}", error.path.join("__")).to_ascii_uppercase();
                    message.push_str(&format!(" (from the environment variable {variable})"));
                } else if let Some(figment::Source::File(path)) = &metadata.source {
                    message.push_str(&format!(" (from {})", path.display()));
                } else if let Some(figment::Source::Code(_)) = &metadata.source {
                    message.push_str(" (from the command line)");
                } else {
                    message.push_str(&format!(" (from {})", metadata.name));
                }
            }
            if let figment::error::Kind::UnknownField(_, _) = error.kind {
                message
                    .push_str("; remove it, or check its spelling against docs/CONFIGURATION.md");
            }
            message
        })
        .collect();
    ConfigError::Invalid(messages.join("; "))
}

/// The merged value at `path` (keys and array indices), to quote it in an error.
fn value_at(figment: &Figment, path: &[String]) -> Option<figment::value::Value> {
    use figment::value::Value;
    let (first, rest) = path.split_first()?;
    let mut value = figment.find_value(first).ok()?;
    for part in rest {
        value = match value {
            Value::Dict(_, mut dict) => dict.remove(part)?,
            Value::Array(_, mut items) => {
                let index: usize = part.parse().ok()?;
                (index < items.len()).then(|| items.swap_remove(index))?
            }
            _ => return None,
        };
    }
    Some(value)
}

/// Where the value of `key` (as validation names it: `providers[0].rpm`) came from: a file,
/// an environment variable or the command line; `None` for a default.
fn source_of(figment: &Figment, key: &str) -> Option<String> {
    let path = key.split('[').next().unwrap_or(key);
    let metadata = figment.find_metadata(path)?;
    if metadata.name.contains("environment") {
        let variable = path
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join("__")
            .to_ascii_uppercase();
        return Some(format!("the environment variable TROUPE_{variable}"));
    }
    match &metadata.source {
        Some(figment::Source::File(file)) => Some(file.display().to_string()),
        // The defaults are serialized from `Config` itself; the flags from their own values.
        Some(figment::Source::Code(_)) if metadata.name != std::any::type_name::<Config>() => {
            Some("the command line".to_owned())
        }
        _ => None,
    }
}

/// A node id from the host name: lowercased, with characters ids do not allow replaced by `-`.
pub fn derived_node_id() -> NodeId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let cleaned: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let cleaned = cleaned.trim_start_matches(['-', '.']);
    NodeId::new(cleaned).unwrap_or_else(|_| NodeId::new("node").expect("a valid literal id"))
}

/// `$XDG_DATA_HOME/troupe` (or the platform's equivalent); `./.troupe` when there is none.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|dir| dir.join("troupe"))
        .unwrap_or_else(|| PathBuf::from(".troupe"))
}

// figment's `Jail` closures return figment's (large) error type; that is its API.
#[allow(clippy::result_large_err)]
#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &Jail, file: Option<&str>, overrides: &Overrides) -> Result<Config, String> {
        let path = file.map(|contents| {
            jail.create_file("troupe.toml", contents).unwrap();
            jail.directory().join("troupe.toml")
        });
        Config::load(path.as_deref(), overrides).map_err(|error| error.to_string())
    }

    #[test]
    fn the_design_example_is_accepted() {
        Jail::expect_with(|jail| {
            let example = r#"
node_id = "a"
data_dir = "/var/lib/troupe"

[http]
listen = "127.0.0.1:7070"
allowed_hosts = ["localhost", "127.0.0.1"]

[auth]
tokens = [{ name = "ci", role = "operator", sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" }]

[sessions]
max_concurrent = 8
queue_capacity = 1024
long_running_after_secs = 60
default_timeout_secs = 3600
kill_grace_secs = 5
workspace_roots = ["/srv/agents"]
allowed_programs = ["aider", "claude", "sh"]

[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-4o", "gpt-4o-mini"]
rpm = 500
tpm = 200000
max_concurrency = 64
fallback = ["anthropic/claude-sonnet-4-5"]
breaker = { failure_threshold = 5, open_secs = 30, half_open_probes = 1 }
retry = { max_attempts = 4, base_ms = 250, max_delay_ms = 8000, max_wait_secs = 60 }

[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
models = ["claude-sonnet-4-5"]

[cluster]
listen = "127.0.0.1:7071"
seeds = ["10.0.0.2:7071"]
profile = "lan"
ca = "cluster/ca.pem"
cert = "cluster/node.pem"
key = "cluster/node.key"

[debug]
fault_injection = false
"#;
            let config = load_in(jail, Some(example), &Overrides::default()).unwrap();
            assert_eq!(config.node_id.unwrap().as_str(), "a");
            assert_eq!(config.providers[0].retry.max_delay_ms, 8000);
            assert_eq!(config.auth.tokens[0].role, Role::Operator);
            assert_eq!(config.cluster.seeds.len(), 1);
            Ok(())
        });
    }

    #[test]
    fn flags_beat_environment_beats_file_beats_defaults() {
        Jail::expect_with(|jail| {
            let file = "[http]\nlisten = \"127.0.0.1:1111\"\n[sessions]\nmax_concurrent = 3\n";
            jail.set_env("TROUPE_HTTP__LISTEN", "127.0.0.1:2222");
            jail.set_env("TROUPE_NODE_ID", "from-env");
            let config = load_in(jail, Some(file), &Overrides::default()).unwrap();
            assert_eq!(config.http.listen.port(), 2222, "env beats file");
            assert_eq!(config.sessions.max_concurrent, 3, "file beats default");
            assert_eq!(
                config.sessions.queue_capacity, 1024,
                "defaults fill the rest"
            );
            assert_eq!(config.node_id.as_ref().unwrap().as_str(), "from-env");
            let overrides = Overrides {
                listen: Some("127.0.0.1:3333".parse().unwrap()),
                node_id: Some("from-flag".into()),
                ..Overrides::default()
            };
            let config = load_in(jail, Some(file), &overrides).unwrap();
            assert_eq!(config.http.listen.port(), 3333, "flags beat env");
            assert_eq!(config.node_id.unwrap().as_str(), "from-flag");
            Ok(())
        });
    }

    #[test]
    fn a_config_key_with_one_underscore_is_refused_and_unrelated_variables_pass() {
        let names = |names: &[&str]| {
            names
                .iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>()
        };
        let error = misspelled_env_keys(names(&["TROUPE_HTTP_LISTEN"]).into_iter())
            .unwrap_err()
            .to_string();
        assert!(error.contains("TROUPE_HTTP__LISTEN"), "{error}");
        let error = misspelled_env_keys(names(&["TROUPE_SESSIONS_MAX_CONCURRENT"]).into_iter())
            .unwrap_err()
            .to_string();
        assert!(error.contains("sessions.max_concurrent"), "{error}");
        assert!(misspelled_env_keys(names(&["TROUPE_PROVIDERS"]).into_iter()).is_err());
        misspelled_env_keys(
            names(&[
                "TROUPE_HTTP__LISTEN",
                "TROUPE_NODE_ID",
                "TROUPE_URL",
                "TROUPE_TOKEN",
                "TROUPE_SESSION_ID",
                "TROUPE_GATEWAY_URL",
                "TROUPE_GATEWAY_KEY",
                "TROUPE_DISCOVERY_DIR",
                "TROUPE_HTTP_SOMETHING_ELSE",
            ])
            .into_iter(),
        )
        .unwrap();
    }

    /// Regression: `TROUPE_NODE_ID=7` failed with "invalid type: found unsigned int `7`,
    /// expected a string": environment values were all parsed as TOML values.
    #[test]
    fn string_keys_from_the_environment_keep_values_that_look_like_numbers() {
        Jail::expect_with(|jail| {
            jail.set_env("TROUPE_NODE_ID", "7");
            jail.set_env("TROUPE_DATA_DIR", "1.5");
            jail.set_env("TROUPE_CLUSTER__LABELS__RACK", "3");
            jail.set_env("TROUPE_CLUSTER__LABELS__SPOT", "true");
            jail.set_env("TROUPE_CLUSTER__CA", "2024");
            // Other keys are still parsed as TOML values.
            jail.set_env("TROUPE_SESSIONS__MAX_CONCURRENT", "4");
            jail.set_env("TROUPE_DEBUG__FAULT_INJECTION", "true");
            jail.set_env("TROUPE_HTTP__ALLOWED_HOSTS", "[\"a\", \"b\"]");
            jail.set_env("TROUPE_HTTP__LISTEN", "[::1]:7070");
            let config = load_in(jail, None, &Overrides::default())?;
            assert_eq!(config.node_id.unwrap().as_str(), "7");
            assert_eq!(config.data_dir.unwrap(), PathBuf::from("1.5"));
            assert_eq!(config.cluster.labels["rack"], "3");
            assert_eq!(config.cluster.labels["spot"], "true");
            assert_eq!(config.cluster.ca, PathBuf::from("2024"));
            assert_eq!(config.sessions.max_concurrent, 4);
            assert!(config.debug.fault_injection);
            assert_eq!(config.http.allowed_hosts, ["a", "b"]);
            assert_eq!(config.http.listen, "[::1]:7070".parse().unwrap());

            // A bad value still names its variable.
            jail.set_env("TROUPE_NODE_ID", "bad id!");
            let error = load_in(jail, None, &Overrides::default()).unwrap_err();
            assert!(
                error.contains("node_id") && error.contains("TROUPE_NODE_ID"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn unrelated_troupe_variables_are_not_config_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("TROUPE_URL", "http://127.0.0.1:7070");
            jail.set_env("TROUPE_TOKEN", "secret");
            jail.set_env("TROUPE_DISCOVERY_DIR", "/tmp/x");
            load_in(jail, None, &Overrides::default()).unwrap();
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_names_the_key_and_its_source() {
        Jail::expect_with(|jail| {
            let error = load_in(
                jail,
                Some("[http]\nlisten_addr = \"x\"\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(error.contains("listen_addr"), "{error}");
            assert!(error.contains("troupe.toml"), "{error}");
            assert!(error.contains("check its spelling"), "{error}");

            jail.set_env("TROUPE_SESSIONS__MAX_CONCURENT", "4");
            let error = load_in(jail, None, &Overrides::default()).unwrap_err();
            assert!(error.contains("max_concurent"), "{error}");
            assert!(error.contains("TROUPE_SESSIONS__MAX_CONCURENT"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_of_a_provider_names_it_as_the_docs_do() {
        Jail::expect_with(|jail| {
            let error = load_in(
                jail,
                Some(
                    "[[providers]]\nname = \"p\"\nkind = \"openai\"\n\
                     base_url = \"http://127.0.0.1:9/v1\"\nrpm = \"many\"\n",
                ),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(error.contains("`providers[0].rpm`"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_names_the_key() {
        Jail::expect_with(|jail| {
            let error = load_in(
                jail,
                Some("[http]\nlisten = \"nowhere\"\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(error.contains("http.listen"), "{error}");

            let error =
                load_in(jail, Some("node_id = \"bad id!\"\n"), &Overrides::default()).unwrap_err();
            assert!(error.contains("node_id"), "{error}");

            let error = load_in(
                jail,
                Some("[log]\nlevel = \"info,[\"\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(error.contains("log.level"), "{error}");

            let error = load_in(
                jail,
                Some("[events]\nlog_linger_ms = 60001\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(error.contains("events.log_linger_ms"), "{error}");

            for bad in [0, 7 * 24 * 3600 + 1] {
                let error = load_in(
                    jail,
                    Some(&format!("[sessions]\ndefault_timeout_secs = {bad}\n")),
                    &Overrides::default(),
                )
                .unwrap_err();
                assert!(error.contains("sessions.default_timeout_secs"), "{error}");
            }

            let error = load_in(
                jail,
                Some("[http]\nmcp_session_idle_secs = 0\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(error.contains("http.mcp_session_idle_secs"), "{error}");

            for bad in [0, 3601] {
                let error = load_in(
                    jail,
                    Some(&format!("[http]\nsend_timeout_secs = {bad}\n")),
                    &Overrides::default(),
                )
                .unwrap_err();
                assert!(error.contains("http.send_timeout_secs"), "{error}");
            }

            for bad in [0, 3601] {
                let error = load_in(
                    jail,
                    Some(&format!("[gateway]\nstalled_reader_secs = {bad}\n")),
                    &Overrides::default(),
                )
                .unwrap_err();
                assert!(error.contains("gateway.stalled_reader_secs"), "{error}");
                assert!(error.contains("use 1 to 3600"), "{error}");
            }

            for bad in [1, 3599] {
                let error = load_in(
                    jail,
                    Some(&format!("[sessions]\nretention_secs = {bad}\n")),
                    &Overrides::default(),
                )
                .unwrap_err();
                assert!(error.contains("sessions.retention_secs"), "{error}");
                assert!(error.contains("0 to keep sessions forever"), "{error}");
            }
            for good in [0, 3600] {
                let config = load_in(
                    jail,
                    Some(&format!("[sessions]\nretention_secs = {good}\n")),
                    &Overrides::default(),
                )
                .unwrap();
                assert_eq!(config.sessions.retention_secs, good);
            }
            Ok(())
        });
    }

    #[test]
    fn zeros_that_would_break_the_node_and_huge_event_buffers_are_refused() {
        Jail::expect_with(|jail| {
            for (file, key, says) in [
                (
                    "[events]\nsubscriber_buffer = 4294967296\n",
                    "events.subscriber_buffer",
                    "use 1 to 1048576",
                ),
                (
                    "[events]\nsubscriber_buffer = 9223372036854775807\n",
                    "events.subscriber_buffer",
                    "use 1 to 1048576",
                ),
                (
                    "[events]\nsubscriber_buffer = 0\n",
                    "events.subscriber_buffer",
                    "use 1 to 1048576",
                ),
                (
                    "[events]\nring_capacity = 1000001\n",
                    "events.ring_capacity",
                    "use 1 to 1000000",
                ),
                (
                    "[events]\nring_capacity = 0\n",
                    "events.ring_capacity",
                    "use 1 to 1000000",
                ),
                (
                    "[auth]\nmax_links_per_token = 0\n",
                    "auth.max_links_per_token",
                    "use 1 to 10000",
                ),
                (
                    "[auth]\nmax_links_per_token = 10001\n",
                    "auth.max_links_per_token",
                    "use 1 to 10000",
                ),
                (
                    "[events]\nretention_secs = 0\n",
                    "events.retention_secs",
                    "0 does not mean \"keep\"",
                ),
                (
                    "[events]\nretention_secs = 59\n",
                    "events.retention_secs",
                    "set a large value",
                ),
                (
                    "[events]\nheartbeat_secs = 0\n",
                    "events.heartbeat_secs",
                    "at least 1",
                ),
                (
                    "[sessions]\nqueue_capacity = 0\n",
                    "sessions.queue_capacity",
                    "at least 1",
                ),
                (
                    "[health]\ndegraded_after_restarts = 0\n",
                    "health.degraded_after_restarts",
                    "at least 1",
                ),
                (
                    "[health]\nwindow_secs = 0\n",
                    "health.window_secs",
                    "use 1 or more",
                ),
                (
                    "[supervision]\nwindow_secs = 0\n",
                    "supervision.window_secs",
                    "use 1 or more",
                ),
                (
                    "[supervision]\nwindow_secs = 0\nbackoff_min_ms = 0\nbackoff_max_ms = 0\n",
                    "supervision.window_secs",
                    "use 1 or more",
                ),
                (
                    "[supervision]\nshutdown_timeout_secs = 0\n",
                    "supervision.shutdown_timeout_secs",
                    "use 1 or more",
                ),
                (
                    "[supervision]\nbackoff_min_ms = 0\n",
                    "supervision.backoff_min_ms",
                    "use 1 to 5000",
                ),
                (
                    "[supervision]\nbackoff_min_ms = 0\nbackoff_max_ms = 1\n",
                    "supervision.backoff_min_ms",
                    "use 1 to 1",
                ),
            ] {
                let error = load_in(jail, Some(file), &Overrides::default()).unwrap_err();
                assert!(
                    error.contains(key) && error.contains(says),
                    "{file}: {error}"
                );
            }
            let config = load_in(
                jail,
                Some(
                    "[events]\nsubscriber_buffer = 1048576\nring_capacity = 1000000\n\
                     retention_secs = 60\nheartbeat_secs = 1\n[sessions]\nqueue_capacity = 1\n\
                     [health]\ndegraded_after_restarts = 1\nwindow_secs = 1\n\
                     [supervision]\nwindow_secs = 1\nshutdown_timeout_secs = 1\n\
                     backoff_min_ms = 1\nbackoff_max_ms = 1\n",
                ),
                &Overrides::default(),
            )
            .unwrap();
            assert_eq!(config.events.subscriber_buffer, 1 << 20);
            assert_eq!(config.supervision.window_secs, 1);
            // Both backoff bounds at 0 (immediate restarts) stay allowed.
            let config = load_in(
                jail,
                Some("[supervision]\nbackoff_min_ms = 0\nbackoff_max_ms = 0\n"),
                &Overrides::default(),
            )
            .unwrap();
            assert_eq!(config.supervision.backoff_max_ms, 0);
            Ok(())
        });
    }

    #[test]
    fn an_address_with_a_host_name_says_ip_port_wherever_it_comes_from() {
        Jail::expect_with(|jail| {
            let error = load_in(
                jail,
                Some("[cluster]\nseeds = [\"10.0.0.2:7071\", \"localhost:7071\"]\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(
                error.contains("`cluster.seeds[1]`: \"localhost:7071\" is not IP:PORT")
                    && error.contains("host names are not resolved")
                    && error.contains("troupe.toml"),
                "{error}"
            );
            let error = load_in(
                jail,
                Some("[http]\nlisten = \"127.0.0.1\"\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(
                error.contains("`http.listen`: \"127.0.0.1\" is not IP:PORT"),
                "{error}"
            );
            jail.set_env("TROUPE_CLUSTER__LISTEN", "localhost:7071");
            let error = load_in(jail, None, &Overrides::default()).unwrap_err();
            assert!(
                error.contains("`cluster.listen`: \"localhost:7071\" is not IP:PORT")
                    && error.contains("TROUPE_CLUSTER__LISTEN"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_value_refused_by_validation_names_where_it_came_from() {
        Jail::expect_with(|jail| {
            let error = load_in(
                jail,
                Some("[sessions]\nmax_concurrent = 0\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(
                error.contains("sessions.max_concurrent") && error.contains("troupe.toml)"),
                "{error}"
            );
            let error = load_in(
                jail,
                Some("[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\nrpm = 0\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(
                error.contains("providers[0].rpm") && error.contains("troupe.toml)"),
                "{error}"
            );
            let overrides = Overrides {
                log_level: Some("info,[".into()),
                ..Overrides::default()
            };
            let error = load_in(jail, None, &overrides).unwrap_err();
            assert!(error.contains("(from the command line)"), "{error}");
            // A rule broken by a default names no source.
            let overrides = Overrides {
                listen: Some("0.0.0.0:7070".parse().unwrap()),
                ..Overrides::default()
            };
            let error = load_in(jail, None, &overrides).unwrap_err();
            assert!(
                error.contains("auth.tokens") && !error.contains("(from"),
                "{error}"
            );
            jail.set_env("TROUPE_LOG__LEVEL", "info,[");
            let error = load_in(jail, None, &Overrides::default()).unwrap_err();
            assert!(
                error.contains("log.level")
                    && error.contains("(from the environment variable TROUPE_LOG__LEVEL)"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_public_listener_requires_tokens_and_a_program_allow_list() {
        Jail::expect_with(|jail| {
            let overrides = Overrides {
                listen: Some("0.0.0.0:7070".parse().unwrap()),
                ..Overrides::default()
            };
            let error = load_in(jail, None, &overrides).unwrap_err();
            assert!(error.contains("auth.tokens"), "{error}");
            let with_token = "[auth]\ntokens = [{ name = \"ci\", role = \"admin\", sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\" }]\n";
            let error = load_in(jail, Some(with_token), &overrides).unwrap_err();
            assert!(error.contains("sessions.allowed_programs"), "{error}");
            let complete = format!("{with_token}[sessions]\nallowed_programs = [\"sh\"]\n");
            load_in(jail, Some(&complete), &overrides).unwrap();
            Ok(())
        });
    }

    /// Regression: a configured token named `admin` (the admin token's name), or two tokens
    /// with one name, shared one rate-limit bucket and one link quota.
    #[test]
    fn token_names_must_be_unique_and_not_the_nodes_own() {
        let token = |name: &str| TokenConfig {
            name: name.into(),
            role: Role::Viewer,
            sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        };
        let with = |names: &[&str]| {
            let mut config = Config::default();
            config.auth.tokens = names.iter().map(|name| token(name)).collect();
            config.validate().map_err(|error| error.to_string())
        };
        with(&["ci", "dash", "CI"]).unwrap();
        let error = with(&["ci", "dash", "ci"]).unwrap_err();
        assert!(
            error.contains("`auth.tokens[2].name`")
                && error.contains("\"ci\" is also the name of auth.tokens[0]"),
            "{error}"
        );
        for reserved in ["admin", "Admin", "stdio"] {
            let error = with(&["ci", reserved]).unwrap_err();
            assert!(
                error.contains("`auth.tokens[1].name`")
                    && error.contains(&format!("{reserved:?} is reserved"))
                    && error.contains("another name"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error_not_a_default() {
        let error = Config::load(
            Some(Path::new("/nonexistent/troupe.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(matches!(error, ConfigError::MissingFile(_)));
    }

    #[test]
    fn fallbacks_must_name_configured_providers() {
        Jail::expect_with(|jail| {
            let file = "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\nfallback = [\"b/m\"]\n";
            let error = load_in(jail, Some(file), &Overrides::default()).unwrap_err();
            assert!(error.contains("providers[0].fallback"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn derived_node_ids_are_valid() {
        let id = derived_node_id();
        assert!(!id.as_str().is_empty());
    }
}
