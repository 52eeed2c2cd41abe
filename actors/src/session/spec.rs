//! What a session runs: the typed spec every front end builds from what users type (the JSON
//! shapes of DESIGN.md are parsed at the edge, in `src/`), and the record the node keeps.
//!
//! The spec is externally tagged so it crosses nodes through the wire codec; its size limits are
//! checked here, once, whatever the front end.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::aider::{MESSAGE_FLAG, aider_command};
use super::state::SessionState;
use crate::event::SessionKindTag;
use crate::ids::{NodeId, SessionId, Timestamp};

/// Limits on what a spec may hold (everything in it comes from outside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecLimits {
    /// Program, model and similar short fields.
    pub max_name_bytes: usize,
    /// Each argument, environment value, label value, file path.
    pub max_value_bytes: usize,
    /// Arguments, files, environment entries, labels (each).
    pub max_entries: usize,
    /// An Aider message, or all chat messages together. An Aider message is also one argument
    /// of Aider's command line, so it must fit [`MAX_ARG_STRLEN`] too.
    pub max_text_bytes: usize,
    /// Longest timeout a session may ask for.
    pub max_timeout_secs: u64,
    /// What the program, arguments and environment entries a spec gives a process may take in
    /// all, counted as `execve` counts them (each string with its NUL, and a pointer to it).
    ///
    /// Linux refuses a command line ("Argument list too long") whose arguments and environment
    /// together pass `ARG_MAX`, a quarter of the stack limit: 2 MiB with the common 8 MiB. The
    /// process also inherits the node's environment and gets the variables the node adds (the
    /// session id, the gateway's), so a spec may take only part of it: 1 MiB by default.
    /// Checked when a session is submitted, so a command line Linux would refuse is a 400 that
    /// says so, not an accepted session that takes a slot and then fails.
    pub max_command_line_bytes: usize,
}

/// Linux's limit on one argument or environment entry (`NAME=value`) of a program it starts,
/// its terminating NUL included (`MAX_ARG_STRLEN`, 32 pages): `execve` refuses a longer one
/// with "Argument list too long", whatever `ARG_MAX` allows in all.
pub const MAX_ARG_STRLEN: usize = 128 * 1024;

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            max_name_bytes: 256,
            max_value_bytes: 8 * 1024,
            max_entries: 256,
            max_text_bytes: 256 * 1024,
            max_timeout_secs: 7 * 24 * 3600,
            max_command_line_bytes: 1024 * 1024,
        }
    }
}

/// A spec outside the limits, naming the field and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The offending field, as users type it (`args[3]`, `env.PATH`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// `kind = "command"`: any program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSession {
    /// The program (a name looked up in PATH, or a path).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment entries added to (or replacing) the node's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory; must resolve inside the workspace roots.
    pub workdir: Option<PathBuf>,
}

/// `kind = "aider"`: the Aider preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiderSession {
    /// The instruction (`--message`).
    pub message: String,
    /// Files to edit, relative to the working directory.
    pub files: Vec<String>,
    /// Model name; with providers configured, routed through the node's gateway.
    pub model: Option<String>,
    /// Extra arguments passed to Aider.
    pub args: Vec<String>,
    /// Working directory; must resolve inside the workspace roots.
    pub workdir: Option<PathBuf>,
    /// Let Aider use git (`--no-git` otherwise).
    pub git: bool,
}

/// `kind = "chat"`: a built-in chat run through a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSession {
    /// `provider/model` or an alias.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
}

/// What kind of run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionKind {
    /// Any program.
    Command(CommandSession),
    /// Aider, non-interactively.
    Aider(AiderSession),
    /// A chat through a provider.
    Chat(ChatSession),
}

impl SessionKind {
    /// The kind's tag.
    pub fn tag(&self) -> SessionKindTag {
        match self {
            Self::Command(_) => SessionKindTag::Command,
            Self::Aider(_) => SessionKindTag::Aider,
            Self::Chat(_) => SessionKindTag::Chat,
        }
    }
}

/// Everything needed to run a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// What runs.
    pub kind: SessionKind,
    /// Timeout; `None` takes `sessions.default_timeout_secs`.
    pub timeout_secs: Option<u64>,
    /// 0 (lowest) to 9; higher runs first.
    pub priority: u8,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// The same key returns the existing session instead of starting another.
    pub idempotency_key: Option<String>,
}

/// Highest priority.
pub const MAX_PRIORITY: u8 = 9;

impl SessionSpec {
    /// Checks every size against `limits`.
    pub fn validate(&self, limits: &SpecLimits) -> Result<(), SpecError> {
        let check = Checker { limits };
        if self.priority > MAX_PRIORITY {
            return Err(error(
                "priority",
                format!("{} is above the maximum of 9", self.priority),
            ));
        }
        if let Some(timeout) = self.timeout_secs {
            if timeout == 0 {
                return Err(error("timeout_secs", "must be at least 1".into()));
            }
            if timeout > limits.max_timeout_secs {
                return Err(error(
                    "timeout_secs",
                    format!(
                        "{timeout} is above the maximum of {}",
                        limits.max_timeout_secs
                    ),
                ));
            }
        }
        check.entries("labels", self.labels.len())?;
        for (key, value) in &self.labels {
            check.name(&format!("labels.{key}"), key)?;
            if key.contains('=') {
                // A listing's `label=KEY=VALUE` splits at the first `=`: it could never be found.
                return Err(error(
                    &format!("labels.{key}"),
                    "a label's name cannot hold '=' (a listing's label=KEY=VALUE filter splits \
                     at the first '=')"
                        .into(),
                ));
            }
            check.value(&format!("labels.{key}"), value)?;
        }
        if let Some(key) = &self.idempotency_key {
            check.name("idempotency_key", key)?;
        }
        match &self.kind {
            SessionKind::Command(command) => {
                check.name("program", &command.program)?;
                check.entries("args", command.args.len())?;
                for (index, arg) in command.args.iter().enumerate() {
                    check.value(&format!("args[{index}]"), arg)?;
                }
                check.entries("env", command.env.len())?;
                for (key, value) in &command.env {
                    if key.is_empty() || key.contains(['=', '\0']) {
                        return Err(error(
                            &format!("env.{key}"),
                            "names must be non-empty and contain no '=' or NUL".into(),
                        ));
                    }
                    check.name(&format!("env.{key}"), key)?;
                    check.value(&format!("env.{key}"), value)?;
                    if let Some(why) = refused_env(key) {
                        return Err(error(&format!("env.{key}"), why.into()));
                    }
                }
                if let Some(workdir) = &command.workdir {
                    check.value("workdir", &workdir.to_string_lossy())?;
                }
                let mut line = CommandLineSize::default();
                line.add("program", command.program.len())?;
                for (index, arg) in command.args.iter().enumerate() {
                    line.add(&format!("args[{index}]"), arg.len())?;
                }
                for (key, value) in &command.env {
                    line.add(&format!("env.{key}"), key.len() + 1 + value.len())?;
                }
                line.check_total(limits)?;
            }
            SessionKind::Aider(aider) => {
                check.text("message", &aider.message)?;
                if aider.message.trim().is_empty() {
                    return Err(error("message", "must not be empty".into()));
                }
                check.entries("files", aider.files.len())?;
                for (index, file) in aider.files.iter().enumerate() {
                    check.value(&format!("files[{index}]"), file)?;
                }
                if let Some(model) = &aider.model {
                    check.name("model", model)?;
                }
                check.entries("args", aider.args.len())?;
                for (index, arg) in aider.args.iter().enumerate() {
                    check.value(&format!("args[{index}]"), arg)?;
                }
                if let Some(workdir) = &aider.workdir {
                    check.value("workdir", &workdir.to_string_lossy())?;
                }
                let message_arg = MESSAGE_FLAG.len() + aider.message.len();
                if message_arg + 1 > MAX_ARG_STRLEN {
                    return Err(error(
                        "message",
                        format!(
                            "{} bytes is more than fits in one argument: Aider gets the message as \
                             `{MESSAGE_FLAG}<message>`, and Linux refuses an argument over \
                             {MAX_ARG_STRLEN} bytes with its NUL (MAX_ARG_STRLEN), so at most {} \
                             bytes fit; shorten it, or write it to a file in the workspace and run \
                             Aider as a command session with --message-file",
                            aider.message.len(),
                            MAX_ARG_STRLEN - 1 - MESSAGE_FLAG.len(),
                        ),
                    ));
                }
                for (index, file) in aider.files.iter().enumerate() {
                    CommandLineSize::default().add(&format!("files[{index}]"), file.len() + 2)?;
                }
                for (index, arg) in aider.args.iter().enumerate() {
                    CommandLineSize::default().add(&format!("args[{index}]"), arg.len())?;
                }
                // The whole line as the preset builds it (without the gateway's few arguments,
                // which the headroom left for the node's own covers).
                let built = aider_command(aider, PathBuf::new(), None);
                let mut line = CommandLineSize::default();
                line.add("program", built.program.len())?;
                for arg in &built.args {
                    line.add("args", arg.len())?;
                }
                for (key, value) in &built.env {
                    line.add("env", key.len() + 1 + value.len())?;
                }
                line.check_total(limits)?;
            }
            SessionKind::Chat(chat) => {
                check.name("model", &chat.model)?;
                if chat.messages.is_empty() {
                    return Err(error("messages", "must hold at least one message".into()));
                }
                check.entries("messages", chat.messages.len())?;
                let total: usize = chat.messages.iter().map(|m| m.content.len()).sum();
                if total > limits.max_text_bytes {
                    return Err(error(
                        "messages",
                        format!(
                            "{total} bytes of content is more than the {} allowed",
                            limits.max_text_bytes
                        ),
                    ));
                }
                for (index, message) in chat.messages.iter().enumerate() {
                    if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
                        return Err(error(
                            &format!("messages[{index}].role"),
                            format!("{:?}: use system, user or assistant", message.role),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The environment variable every session process gets, holding its session id (the node sets
/// it; a spec may not). It also lets a node that restarts after a crash find the processes of
/// sessions whose process group it never recorded.
pub const SESSION_ID_ENV: &str = "TROUPE_SESSION_ID";

/// Why a spec may not set the environment variable `key`, if it may not.
///
/// The program allow-list decides which executable a session runs; the environment must not
/// undo that. The dynamic loader's variables (`LD_PRELOAD`, `LD_LIBRARY_PATH`, `LD_AUDIT`, every
/// `LD_*`) and glibc's `GCONV_PATH` make any program load shared objects of the caller's
/// choosing, i.e. run code the allow-list never admitted, so they are refused. `PATH` is
/// allowed: the runner looks a bare program name up in the node's own `PATH`, never in the
/// session's, so a session's `PATH` only affects what its program itself runs. Variables a
/// program interprets itself (`PYTHONPATH`, `NODE_OPTIONS`, `BASH_ENV`, …) are like its
/// arguments: what they can make it do is part of what allowing that program means.
pub fn refused_env(key: &str) -> Option<&'static str> {
    if key.starts_with("LD_") || key == "GCONV_PATH" {
        Some(
            "variables that make the dynamic loader load other code (LD_*, GCONV_PATH) are \
             refused: they would run code the program allow-list never admitted",
        )
    } else if key == SESSION_ID_ENV {
        Some("the node sets TROUPE_SESSION_ID to the session's id itself")
    } else {
        None
    }
}

fn error(field: &str, message: String) -> SpecError {
    SpecError {
        field: field.to_owned(),
        message,
    }
}

/// A command line's size as `execve` counts it, and Linux's limit on each of its strings.
#[derive(Default)]
struct CommandLineSize {
    /// Bytes so far: every string with its NUL, and a pointer to it.
    total: usize,
}

impl CommandLineSize {
    /// Counts one argument or environment entry of `len` bytes (without its NUL), which
    /// `field` gave.
    fn add(&mut self, field: &str, len: usize) -> Result<(), SpecError> {
        if len + 1 > MAX_ARG_STRLEN {
            return Err(error(
                field,
                format!(
                    "{len} bytes is more than fits in one argument or environment entry: Linux \
                     refuses one over {MAX_ARG_STRLEN} bytes with its NUL (MAX_ARG_STRLEN); pass \
                     large inputs in a file instead"
                ),
            ));
        }
        self.total += len + 1 + std::mem::size_of::<usize>();
        Ok(())
    }

    fn check_total(&self, limits: &SpecLimits) -> Result<(), SpecError> {
        if self.total > limits.max_command_line_bytes {
            return Err(error(
                "args",
                format!(
                    "the program, arguments and environment entries take {} bytes as Linux \
                     counts them (each with its NUL and a pointer), more than the {} allowed: \
                     Linux refuses a command line past ARG_MAX (commonly 2 MiB) for them and the \
                     node's own environment together; pass large inputs in a file instead",
                    self.total, limits.max_command_line_bytes
                ),
            ));
        }
        Ok(())
    }
}

struct Checker<'a> {
    limits: &'a SpecLimits,
}

impl Checker<'_> {
    fn bounded(&self, field: &str, value: &str, max: usize) -> Result<(), SpecError> {
        if value.len() > max {
            return Err(error(
                field,
                format!("{} bytes is more than the {max} allowed", value.len()),
            ));
        }
        if value.contains('\0') {
            return Err(error(field, "must not contain NUL characters".into()));
        }
        Ok(())
    }

    fn name(&self, field: &str, value: &str) -> Result<(), SpecError> {
        if value.is_empty() {
            return Err(error(field, "must not be empty".into()));
        }
        self.bounded(field, value, self.limits.max_name_bytes)
    }

    fn value(&self, field: &str, value: &str) -> Result<(), SpecError> {
        self.bounded(field, value, self.limits.max_value_bytes)
    }

    fn text(&self, field: &str, value: &str) -> Result<(), SpecError> {
        self.bounded(field, value, self.limits.max_text_bytes)
    }

    fn entries(&self, field: &str, count: usize) -> Result<(), SpecError> {
        if count > self.limits.max_entries {
            return Err(error(
                field,
                format!(
                    "{count} entries is more than the {} allowed",
                    self.limits.max_entries
                ),
            ));
        }
        Ok(())
    }
}

/// What the node keeps about a session (persisted; returned by the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session.
    pub id: SessionId,
    /// The node that owns it.
    pub node: NodeId,
    /// What it runs.
    pub spec: SessionSpec,
    /// Where it is.
    pub state: SessionState,
    /// When it was accepted.
    pub created_at: Timestamp,
    /// When its process started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
    /// Exit code of its process.
    pub exit_code: Option<i32>,
    /// Signal that ended its process.
    pub signal: Option<i32>,
    /// Why it ended the way it did, in words.
    pub reason: Option<String>,
    /// Its process (kept so a node restarted after a crash can terminate leftovers).
    pub process: Option<ProcessInfo>,
    /// Lines of output so far.
    pub output_lines: u64,
    /// A stop asked for while the session ran (cancel, timeout, node shutdown), recorded before
    /// its process was signalled: the run's outcome follows from it even when the session's
    /// actor restarts between the signal and the exit.
    #[serde(default)]
    pub stop_requested: Option<StopRequest>,
}

/// Why a running session was asked to stop; the strongest request decides its end state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopRequest {
    /// Its timeout passed: it ends `timed_out`.
    Timeout,
    /// Someone cancelled it: it ends `cancelled` (even if its timeout passes meanwhile).
    Cancel,
    /// The node is shutting down: it ends `interrupted` (whatever was asked before).
    Interrupt,
}

impl StopRequest {
    /// The state the session ends in.
    pub fn end_state(self) -> SessionState {
        match self {
            Self::Timeout => SessionState::TimedOut,
            Self::Cancel => SessionState::Cancelled,
            Self::Interrupt => SessionState::Interrupted,
        }
    }

    /// Why the process is signalled, for logs.
    pub fn why(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Cancel => "cancel requested",
            Self::Interrupt => "the node is shutting down",
        }
    }
}

/// One recorded change of state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Before.
    pub from: SessionState,
    /// After.
    pub to: SessionState,
    /// When.
    pub at: Timestamp,
    /// Why, when there is something to say.
    pub reason: Option<String>,
}

/// A process as the runner started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Process id of the leader.
    pub pid: u32,
    /// Its process group (the leader's pid: every session runs in its own group).
    pub pgid: i32,
    /// The leader's start time in clock ticks since boot (`/proc/PID/stat` field 22), to tell it
    /// apart from an unrelated process that reused the pid.
    pub start_ticks: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: Vec<String>) -> SessionSpec {
        SessionSpec {
            kind: SessionKind::Command(CommandSession {
                program: "sh".into(),
                args,
                env: BTreeMap::new(),
                workdir: None,
            }),
            timeout_secs: None,
            priority: 5,
            labels: BTreeMap::new(),
            idempotency_key: None,
        }
    }

    #[test]
    fn a_reasonable_spec_passes() {
        command(vec!["-c".into(), "echo hi".into()])
            .validate(&SpecLimits::default())
            .unwrap();
    }

    #[test]
    fn every_limit_names_its_field() {
        let limits = SpecLimits::default();
        let mut spec = command(vec!["x".repeat(limits.max_value_bytes + 1)]);
        assert_eq!(spec.validate(&limits).unwrap_err().field, "args[0]");
        spec = command(vec!["a".into(); limits.max_entries + 1]);
        assert_eq!(spec.validate(&limits).unwrap_err().field, "args");
        spec = command(vec![]);
        spec.priority = 10;
        assert_eq!(spec.validate(&limits).unwrap_err().field, "priority");
        spec.priority = 0;
        spec.timeout_secs = Some(0);
        assert_eq!(spec.validate(&limits).unwrap_err().field, "timeout_secs");
        spec.timeout_secs = None;
        if let SessionKind::Command(command) = &mut spec.kind {
            command.env.insert("A=B".into(), "x".into());
        }
        assert_eq!(spec.validate(&limits).unwrap_err().field, "env.A=B");
        for key in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "GCONV_PATH",
            SESSION_ID_ENV,
        ] {
            let mut spec = command(vec![]);
            if let SessionKind::Command(command) = &mut spec.kind {
                command.env.insert(key.into(), "/tmp/x".into());
            }
            let refused = spec.validate(&limits).unwrap_err();
            assert_eq!(refused.field, format!("env.{key}"));
        }
        let mut path = command(vec![]);
        if let SessionKind::Command(command) = &mut path.kind {
            command
                .env
                .insert("PATH".into(), "/tmp/evil:/usr/bin".into());
            command.env.insert("LANG".into(), "C.UTF-8".into());
        }
        assert_eq!(path.validate(&limits), Ok(()), "PATH itself is allowed");
        let mut chat = command(vec![]);
        chat.kind = SessionKind::Chat(ChatSession {
            model: "m".into(),
            messages: vec![ChatMessage {
                role: "robot".into(),
                content: "hi".into(),
            }],
        });
        assert_eq!(
            chat.validate(&limits).unwrap_err().field,
            "messages[0].role"
        );
        // A label name with '=' could never be found by a listing's label=KEY=VALUE.
        let mut labelled = command(vec![]);
        labelled.labels.insert("a=b".into(), "c".into());
        assert_eq!(labelled.validate(&limits).unwrap_err().field, "labels.a=b");
    }

    /// Regression: unknown fields inside a chat message were dropped without a word, though
    /// every other unknown field of a spawn request is refused.
    #[test]
    fn a_chat_message_with_an_unknown_field_is_refused() {
        let message = serde_json::json!({"role": "user", "content": "hi", "bogus": 1});
        let error = serde_json::from_value::<ChatMessage>(message).unwrap_err();
        assert!(error.to_string().contains("bogus"), "{error}");
    }

    fn aider(message: String) -> SessionSpec {
        SessionSpec {
            kind: SessionKind::Aider(AiderSession {
                message,
                files: vec!["src/lib.rs".into()],
                model: None,
                args: Vec::new(),
                workdir: None,
                git: false,
            }),
            ..command(vec![])
        }
    }

    /// Regression: a spec Linux cannot run was accepted (202), took a slot and ended `failed`
    /// with "Argument list too long": a 200 KiB Aider message is one argument, over Linux's
    /// 128 KiB per argument; and 256 arguments of 8 KiB each are 2 MiB, `ARG_MAX` itself.
    #[test]
    fn a_command_line_linux_would_refuse_is_refused() {
        let limits = SpecLimits::default();
        let refused = aider("x".repeat(200 * 1024)).validate(&limits).unwrap_err();
        assert_eq!(refused.field, "message");
        assert!(refused.message.contains("MAX_ARG_STRLEN"), "{refused}");
        assert!(refused.message.contains("--message-file"), "{refused}");
        // The longest message that fits: `--message=` and the NUL take the rest of 128 KiB.
        let longest = MAX_ARG_STRLEN - 1 - MESSAGE_FLAG.len();
        assert_eq!(aider("x".repeat(longest)).validate(&limits), Ok(()));
        assert_eq!(
            aider("x".repeat(longest + 1))
                .validate(&limits)
                .unwrap_err()
                .field,
            "message"
        );

        let big = command(vec!["x".repeat(limits.max_value_bytes); limits.max_entries]);
        let refused = big.validate(&limits).unwrap_err();
        assert_eq!(refused.field, "args");
        assert!(refused.message.contains("ARG_MAX"), "{refused}");
        // 120 arguments of 8 KiB with their NULs and pointers: just under 1 MiB.
        let fits = command(vec!["x".repeat(limits.max_value_bytes); 120]);
        assert_eq!(fits.validate(&limits), Ok(()));

        // One string over 128 KiB, when the limits on values would allow it.
        let loose = SpecLimits {
            max_value_bytes: 1024 * 1024,
            ..limits
        };
        let mut env = command(vec![]);
        if let SessionKind::Command(command) = &mut env.kind {
            command.env.insert("BIG".into(), "x".repeat(MAX_ARG_STRLEN));
        }
        assert_eq!(env.validate(&loose).unwrap_err().field, "env.BIG");
        let arg = command(vec!["x".repeat(MAX_ARG_STRLEN)]);
        assert_eq!(arg.validate(&loose).unwrap_err().field, "args[0]");
    }
}
