//! The session request as users type it (DESIGN.md, "Shapes that users type"), parsed once at
//! the edge into a typed [`SessionSpec`], with the node's policy applied: working directories
//! must resolve inside the workspace roots (after symlinks), programs must be on the allow-list.
//!
//! ```json
//! {"kind": "command", "program": "sh", "args": ["-c", "echo hi"], "env": {"K": "V"},
//!  "workdir": ".", "timeout_secs": 600, "priority": 5, "labels": {"team": "web"},
//!  "idempotency_key": "optional", "node": "optional node id", "placement": "least_loaded"}
//! {"kind": "aider", "message": "add a test", "files": ["src/lib.rs"], "model": "fake/m1", "args": []}
//! {"kind": "chat", "model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
//! ```
//!
//! In a cluster, `placement` may also carry label constraints:
//! `"placement": {"strategy": "least_loaded", "labels": {"zone": "eu"}}` (see [`Placement`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use troupe_actors::session::{
    AiderSession, ChatMessage, ChatSession, CommandSession, SessionKind, SessionSpec,
};

/// The request body, every field of every kind; which ones apply is checked per kind. It
/// serializes back to the same shape (absent fields left out), which is how a request placed on
/// another node is forwarded there.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// `command`, `aider` or `chat`.
    pub kind: String,
    /// command: the program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// command, aider: arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// command: environment entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// command, aider: working directory (relative to the first workspace root, or absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// aider: the instruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// aider: files to edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
    /// aider, chat: the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// aider: let Aider use git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<bool>,
    /// chat: the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// 0 (lowest) to 9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Run on this node (cluster): a member's node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Let the cluster choose the node (`"least_loaded"`, optionally with label constraints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// Most label constraints in a placement (as many as a node may carry).
pub const MAX_PLACEMENT_LABELS: usize = 16;
/// Longest label name or value in a placement constraint, in bytes (as in `cluster.labels`).
pub const MAX_LABEL_BYTES: usize = 64;

/// How the cluster chooses the node of a session: `"least_loaded"` (the shape of DESIGN.md), or
/// `{"strategy": "least_loaded", "labels": {"zone": "eu"}}` to choose only among nodes whose
/// gossiped labels (`cluster.labels`) include every one of `labels`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The strategy as typed (only `least_loaded` exists; [`Placement::check`] says so).
    pub strategy: String,
    /// Labels the chosen node must carry, with these values.
    pub labels: BTreeMap<String, String>,
}

impl Placement {
    /// The only strategy.
    pub const LEAST_LOADED: &'static str = "least_loaded";

    /// Checks the strategy and the constraints' sizes.
    pub fn check(&self) -> Result<(), RequestError> {
        if self.strategy != Self::LEAST_LOADED {
            return Err(RequestError::Invalid {
                field: "placement",
                message: format!(
                    "{:?}: the only placement strategy is \"least_loaded\"",
                    self.strategy.chars().take(40).collect::<String>()
                ),
            });
        }
        if self.labels.len() > MAX_PLACEMENT_LABELS {
            return Err(RequestError::Invalid {
                field: "placement",
                message: format!(
                    "{} label constraints; at most {MAX_PLACEMENT_LABELS}",
                    self.labels.len()
                ),
            });
        }
        for (key, value) in &self.labels {
            if key.is_empty() || key.len() > MAX_LABEL_BYTES || value.len() > MAX_LABEL_BYTES {
                return Err(RequestError::Invalid {
                    field: "placement",
                    message: format!(
                        "label constraint {:?}: names must be 1 to {MAX_LABEL_BYTES} bytes and \
                         values at most {MAX_LABEL_BYTES} bytes",
                        key.chars().take(80).collect::<String>()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Serialize for Placement {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.labels.is_empty() {
            return serializer.serialize_str(&self.strategy);
        }
        #[derive(Serialize)]
        struct Spec<'a> {
            strategy: &'a str,
            labels: &'a BTreeMap<String, String>,
        }
        Spec {
            strategy: &self.strategy,
            labels: &self.labels,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Placement {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PlacementVisitor;

        impl<'de> Visitor<'de> for PlacementVisitor {
            type Value = Placement;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"least_loaded\" or {\"strategy\": \"least_loaded\", \"labels\": {\"KEY\": \"VALUE\"}}",
                )
            }

            fn visit_str<E: de::Error>(self, strategy: &str) -> Result<Placement, E> {
                Ok(Placement {
                    strategy: strategy.to_owned(),
                    labels: BTreeMap::new(),
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Placement, A::Error> {
                let mut strategy = None;
                let mut labels = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "strategy" if strategy.is_none() => strategy = Some(map.next_value()?),
                        "labels" if labels.is_none() => labels = Some(map.next_value()?),
                        "strategy" | "labels" => {
                            return Err(de::Error::custom(format!(
                                "placement: duplicate field `{key}`"
                            )));
                        }
                        other => {
                            return Err(de::Error::unknown_field(other, &["strategy", "labels"]));
                        }
                    }
                }
                Ok(Placement {
                    strategy: strategy.ok_or_else(|| de::Error::missing_field("strategy"))?,
                    labels: labels.unwrap_or_default(),
                })
            }
        }

        deserializer.deserialize_any(PlacementVisitor)
    }
}

/// A request the node refuses, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not one of the kinds.
    #[error("unknown kind {0:?}; use \"command\", \"aider\" or \"chat\"")]
    UnknownKind(String),
    /// A field the kind needs is missing.
    #[error("`{field}` is required for kind {kind}")]
    Missing {
        /// The field.
        field: &'static str,
        /// The kind.
        kind: &'static str,
    },
    /// A field that does not apply to the kind.
    #[error("`{field}` does not apply to kind {kind}")]
    NotApplicable {
        /// The field.
        field: &'static str,
        /// The kind.
        kind: &'static str,
    },
    /// The program is not allowed.
    #[error(
        "program {program:?} is not in sessions.allowed_programs {allowed:?}; add it there to run it"
    )]
    ProgramNotAllowed {
        /// The program.
        program: String,
        /// The allow-list.
        allowed: Vec<String>,
    },
    /// The working directory is outside the roots or does not exist.
    #[error("{0}")]
    Workdir(String),
    /// A value that is invalid on its own.
    #[error("`{field}`: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl RequestError {
    /// The field at fault, when there is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::UnknownKind(_) => Some("kind"),
            Self::Missing { field, .. }
            | Self::NotApplicable { field, .. }
            | Self::Invalid { field, .. } => Some(field),
            Self::ProgramNotAllowed { .. } => Some("program"),
            Self::Workdir(_) => Some("workdir"),
        }
    }
}

/// The node's policy for requests.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    /// Canonical workspace roots (the first is the default working directory).
    pub workspace_roots: Vec<PathBuf>,
    /// Programs allowed; empty allows any.
    pub allowed_programs: Vec<String>,
}

impl RequestPolicy {
    /// Checks a program against the allow-list: an exact match of the string as configured
    /// (a bare name on the list does not admit a path that merely ends in that name).
    pub fn check_program(&self, program: &str) -> Result<(), RequestError> {
        if self.allowed_programs.is_empty() || self.allowed_programs.iter().any(|p| p == program) {
            Ok(())
        } else {
            Err(RequestError::ProgramNotAllowed {
                program: program.to_owned(),
                allowed: self.allowed_programs.clone(),
            })
        }
    }

    /// Checks a command's environment against the allow-list: with programs allowed by name,
    /// no dynamic loader variable (`LD_*`, `DYLD_*`: `LD_PRELOAD` and the like make an allowed
    /// program run code it does not contain). Without an allow-list any program runs anyway.
    pub fn check_env(&self, env: &BTreeMap<String, String>) -> Result<(), RequestError> {
        if self.allowed_programs.is_empty() {
            return Ok(());
        }
        match env
            .keys()
            .find(|key| key.starts_with("LD_") || key.starts_with("DYLD_"))
        {
            None => Ok(()),
            Some(key) => Err(RequestError::Invalid {
                field: "env",
                message: format!(
                    "{key} is refused while sessions.allowed_programs is set: the dynamic loader \
                     would make an allowed program run other code; remove it from env"
                ),
            }),
        }
    }

    /// Resolves a working directory: relative to the first root, symlinks resolved, and inside
    /// one of the roots.
    pub fn resolve_workdir(&self, requested: Option<&str>) -> Result<PathBuf, RequestError> {
        let Some(default_root) = self.workspace_roots.first() else {
            return Err(RequestError::Workdir(
                "no workspace roots are configured; set sessions.workspace_roots".into(),
            ));
        };
        let wanted = match requested {
            None => default_root.clone(),
            Some(path) if Path::new(path).is_absolute() => PathBuf::from(path),
            Some(path) => default_root.join(path),
        };
        let resolved = std::fs::canonicalize(&wanted).map_err(|error| {
            RequestError::Workdir(format!(
                "workdir {} cannot be used: {error}",
                wanted.display()
            ))
        })?;
        if !resolved.is_dir() {
            return Err(RequestError::Workdir(format!(
                "workdir {} is not a directory",
                resolved.display()
            )));
        }
        if !self
            .workspace_roots
            .iter()
            .any(|root| resolved.starts_with(root))
        {
            let roots: Vec<String> = self
                .workspace_roots
                .iter()
                .map(|root| root.display().to_string())
                .collect();
            return Err(RequestError::Workdir(format!(
                "workdir {} is outside the workspace roots [{}]; add it to sessions.workspace_roots",
                resolved.display(),
                roots.join(", ")
            )));
        }
        Ok(resolved)
    }
}

impl SessionRequest {
    /// Parses the request into a spec under `policy`.
    pub fn into_spec(self, policy: &RequestPolicy) -> Result<SessionSpec, RequestError> {
        let kind = match self.kind.as_str() {
            "command" => {
                self.refuse(
                    "command",
                    &[
                        ("message", self.message.is_some()),
                        ("files", self.files.is_some()),
                        ("model", self.model.is_some()),
                        ("git", self.git.is_some()),
                        ("messages", self.messages.is_some()),
                    ],
                )?;
                let program = self.program.clone().ok_or(RequestError::Missing {
                    field: "program",
                    kind: "command",
                })?;
                if program.is_empty() {
                    return Err(RequestError::Invalid {
                        field: "program",
                        message: "must not be empty".into(),
                    });
                }
                policy.check_program(&program)?;
                let env = self.env.clone().unwrap_or_default();
                policy.check_env(&env)?;
                let workdir = policy.resolve_workdir(self.workdir.as_deref())?;
                SessionKind::Command(CommandSession {
                    program,
                    args: self.args.clone().unwrap_or_default(),
                    env,
                    workdir: Some(workdir),
                })
            }
            "aider" => {
                self.refuse(
                    "aider",
                    &[
                        ("program", self.program.is_some()),
                        ("env", self.env.is_some()),
                        ("messages", self.messages.is_some()),
                    ],
                )?;
                let message = self.message.clone().ok_or(RequestError::Missing {
                    field: "message",
                    kind: "aider",
                })?;
                policy.check_program("aider")?;
                let workdir = policy.resolve_workdir(self.workdir.as_deref())?;
                for (index, file) in self.files.iter().flatten().enumerate() {
                    let path = Path::new(file);
                    if path.is_absolute()
                        || path
                            .components()
                            .any(|c| matches!(c, std::path::Component::ParentDir))
                    {
                        return Err(RequestError::Invalid {
                            field: "files",
                            message: format!(
                                "files[{index}] {file:?} must be relative to the working directory, without `..`"
                            ),
                        });
                    }
                }
                SessionKind::Aider(AiderSession {
                    message,
                    files: self.files.clone().unwrap_or_default(),
                    model: self.model.clone(),
                    args: self.args.clone().unwrap_or_default(),
                    workdir: Some(workdir),
                    git: self.git.unwrap_or(false),
                })
            }
            "chat" => {
                self.refuse(
                    "chat",
                    &[
                        ("program", self.program.is_some()),
                        ("args", self.args.is_some()),
                        ("env", self.env.is_some()),
                        ("workdir", self.workdir.is_some()),
                        ("message", self.message.is_some()),
                        ("files", self.files.is_some()),
                        ("git", self.git.is_some()),
                    ],
                )?;
                SessionKind::Chat(ChatSession {
                    model: self.model.clone().ok_or(RequestError::Missing {
                        field: "model",
                        kind: "chat",
                    })?,
                    messages: self.messages.clone().ok_or(RequestError::Missing {
                        field: "messages",
                        kind: "chat",
                    })?,
                })
            }
            other => return Err(RequestError::UnknownKind(other.chars().take(40).collect())),
        };
        self.check_target()?;
        Ok(SessionSpec {
            kind,
            timeout_secs: self.timeout_secs,
            priority: self.priority.unwrap_or(5),
            labels: self.labels.unwrap_or_default(),
            idempotency_key: self.idempotency_key,
        })
    }

    /// Checks `node` and `placement` on their own (not against the cluster): a valid node id,
    /// a known strategy with bounded constraints, and not both.
    pub fn check_target(&self) -> Result<(), RequestError> {
        if let Some(node) = &self.node
            && let Err(error) = troupe_actors::ids::NodeId::new(node)
        {
            return Err(RequestError::Invalid {
                field: "node",
                message: format!(
                    "{:?} is not a node id: {}; use a member's id as \
                     GET /v1/cluster/members lists them",
                    node.chars().take(80).collect::<String>(),
                    error.reason
                ),
            });
        }
        if let Some(placement) = &self.placement {
            placement.check()?;
            if self.node.is_some() {
                return Err(RequestError::Invalid {
                    field: "placement",
                    message: "give `node` or `placement`, not both".into(),
                });
            }
        }
        Ok(())
    }

    fn refuse(
        &self,
        kind: &'static str,
        fields: &[(&'static str, bool)],
    ) -> Result<(), RequestError> {
        match fields.iter().find(|(_, present)| *present) {
            Some((field, _)) => Err(RequestError::NotApplicable { field, kind }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(root: &Path, allowed: &[&str]) -> RequestPolicy {
        RequestPolicy {
            workspace_roots: vec![std::fs::canonicalize(root).unwrap()],
            allowed_programs: allowed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn parse(json: &str) -> Result<SessionRequest, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn the_documented_shapes_parse() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("proj")).unwrap();
        let policy = policy(dir.path(), &[]);
        let command = parse(
            r#"{"kind": "command", "program": "sh", "args": ["-c", "echo hi"], "env": {"K": "V"},
            "workdir": "proj", "timeout_secs": 600, "priority": 7, "labels": {"team": "web"},
            "idempotency_key": "k1", "placement": "least_loaded"}"#,
        )
        .unwrap()
        .into_spec(&policy)
        .unwrap();
        assert_eq!(command.priority, 7);
        assert_eq!(command.idempotency_key.as_deref(), Some("k1"));
        match command.kind {
            SessionKind::Command(c) => {
                assert_eq!(c.workdir.unwrap(), policy.workspace_roots[0].join("proj"));
                assert_eq!(c.env["K"], "V");
            }
            other => panic!("{other:?}"),
        }
        let aider = parse(r#"{"kind": "aider", "message": "add a test", "files": ["src/lib.rs"], "model": "fake/m1", "args": []}"#)
            .unwrap()
            .into_spec(&policy)
            .unwrap();
        assert!(
            matches!(aider.kind, SessionKind::Aider(ref a) if a.files == ["src/lib.rs"] && !a.git)
        );
        let chat = parse(r#"{"kind": "chat", "model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}"#)
            .unwrap()
            .into_spec(&policy)
            .unwrap();
        assert!(matches!(chat.kind, SessionKind::Chat(_)));
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        assert!(parse(r#"{"kind": "command", "program": "sh", "colour": "red"}"#).is_err());
        let dir = tempfile::tempdir().unwrap();
        let error = parse(r#"{"kind": "robot"}"#)
            .unwrap()
            .into_spec(&policy(dir.path(), &[]))
            .unwrap_err();
        assert_eq!(error.field(), Some("kind"));
        let error = parse(r#"{"kind": "command", "program": "sh", "message": "x"}"#)
            .unwrap()
            .into_spec(&policy(dir.path(), &[]))
            .unwrap_err();
        assert_eq!(
            error,
            RequestError::NotApplicable {
                field: "message",
                kind: "command"
            }
        );
        let error = parse(r#"{"kind": "command"}"#)
            .unwrap()
            .into_spec(&policy(dir.path(), &[]))
            .unwrap_err();
        assert_eq!(
            error,
            RequestError::Missing {
                field: "program",
                kind: "command"
            }
        );
    }

    #[test]
    fn workdirs_must_resolve_inside_the_roots_after_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("ok")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("escape")).unwrap();
        let policy = policy(&root, &[]);
        assert!(policy.resolve_workdir(Some("ok")).is_ok());
        assert!(policy.resolve_workdir(None).is_ok());
        for bad in [
            "../outside",
            "escape",
            "/etc",
            "missing",
            "ok/../../outside",
        ] {
            let error = policy.resolve_workdir(Some(bad)).unwrap_err();
            assert!(matches!(error, RequestError::Workdir(_)), "{bad}: {error}");
        }
        let message = policy
            .resolve_workdir(Some("/etc"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("outside the workspace roots"), "{message}");
        assert!(message.contains("sessions.workspace_roots"), "{message}");
    }

    #[test]
    fn programs_must_match_the_allow_list_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy(dir.path(), &["sh", "aider"]);
        assert!(policy.check_program("sh").is_ok());
        assert!(
            policy.check_program("/tmp/evil/sh").is_err(),
            "a path ending in an allowed name"
        );
        assert!(policy.check_program("bash").is_err());
        let error = parse(r#"{"kind": "command", "program": "rm", "args": ["-rf", "/"]}"#)
            .unwrap()
            .into_spec(&policy)
            .unwrap_err();
        assert!(error.to_string().contains("sessions.allowed_programs"));
    }

    #[test]
    fn with_an_allow_list_the_env_cannot_load_other_code_into_an_allowed_program() {
        let dir = tempfile::tempdir().unwrap();
        let request = |env: &str| {
            parse(&format!(
                r#"{{"kind": "command", "program": "sh", "args": ["-c", "true"], "env": {env}}}"#
            ))
            .unwrap()
        };
        for env in [
            r#"{"LD_PRELOAD": "./evil.so"}"#,
            r#"{"K": "V", "LD_LIBRARY_PATH": "."}"#,
            r#"{"DYLD_INSERT_LIBRARIES": "./evil.dylib"}"#,
        ] {
            let error = request(env)
                .into_spec(&policy(dir.path(), &["sh"]))
                .unwrap_err();
            assert_eq!(error.field(), Some("env"), "{env}: {error}");
            assert!(
                error.to_string().contains("sessions.allowed_programs"),
                "{error}"
            );
        }
        assert!(
            request(r#"{"K": "V", "OLD_LD_THING": "1"}"#)
                .into_spec(&policy(dir.path(), &["sh"]))
                .is_ok()
        );
        assert!(
            request(r#"{"LD_PRELOAD": "x.so"}"#)
                .into_spec(&policy(dir.path(), &[]))
                .is_ok(),
            "without an allow-list, any program runs anyway"
        );
    }

    #[test]
    fn aider_files_stay_inside_the_workdir() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [r#"["/etc/passwd"]"#, r#"["../x"]"#, r#"["a/../../x"]"#] {
            let json = format!(r#"{{"kind": "aider", "message": "m", "files": {bad}}}"#);
            let error = parse(&json)
                .unwrap()
                .into_spec(&policy(dir.path(), &[]))
                .unwrap_err();
            assert_eq!(error.field(), Some("files"), "{bad}");
        }
    }

    #[test]
    fn placement_is_a_strategy_name_or_a_strategy_with_label_constraints() {
        let plain =
            parse(r#"{"kind": "command", "program": "sh", "placement": "least_loaded"}"#).unwrap();
        let placement = plain.placement.clone().unwrap();
        assert_eq!(placement.strategy, "least_loaded");
        assert!(placement.labels.is_empty());
        assert!(plain.check_target().is_ok());
        // It serializes back to the shape it came in.
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"kind": "command", "program": "sh", "placement": "least_loaded"})
        );

        let constrained = parse(
            r#"{"kind": "command", "program": "sh",
                "placement": {"strategy": "least_loaded", "labels": {"zone": "eu", "gpu": "yes"}}}"#,
        )
        .unwrap();
        let placement = constrained.placement.clone().unwrap();
        assert_eq!(placement.labels["zone"], "eu");
        assert_eq!(placement.labels.len(), 2);
        assert!(constrained.check_target().is_ok());
        let again: SessionRequest =
            serde_json::from_value(serde_json::to_value(&constrained).unwrap()).unwrap();
        assert_eq!(again.placement, constrained.placement);

        // Unknown strategies, unknown fields, oversized constraints and both targets are refused.
        let error = parse(r#"{"kind": "command", "program": "sh", "placement": "random"}"#)
            .unwrap()
            .check_target()
            .unwrap_err();
        assert_eq!(error.field(), Some("placement"));
        assert!(error.to_string().contains("least_loaded"), "{error}");
        assert!(
            parse(r#"{"kind": "command", "program": "sh", "placement": {"strategy": "least_loaded", "zone": "eu"}}"#)
                .is_err()
        );
        assert!(
            parse(
                r#"{"kind": "command", "program": "sh", "placement": {"labels": {"zone": "eu"}}}"#
            )
            .is_err()
        );
        assert!(parse(r#"{"kind": "command", "program": "sh", "placement": 3}"#).is_err());
        let many: BTreeMap<String, String> =
            (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let too_many = SessionRequest {
            kind: "command".into(),
            placement: Some(Placement {
                strategy: "least_loaded".into(),
                labels: many,
            }),
            ..SessionRequest::default()
        };
        assert_eq!(
            too_many.check_target().unwrap_err().field(),
            Some("placement")
        );
        let long = SessionRequest {
            placement: Some(Placement {
                strategy: "least_loaded".into(),
                labels: [("zone".to_owned(), "x".repeat(65))].into(),
            }),
            ..SessionRequest::default()
        };
        assert!(long.check_target().is_err());
        let both = parse(
            r#"{"kind": "command", "program": "sh", "node": "b", "placement": "least_loaded"}"#,
        )
        .unwrap();
        assert!(
            both.check_target()
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
    }

    #[test]
    fn an_invalid_node_is_refused_not_ignored() {
        for bad in ["", "has space", "a/b", &"n".repeat(65)] {
            let request = SessionRequest {
                kind: "command".into(),
                node: Some(bad.to_owned()),
                ..SessionRequest::default()
            };
            let error = request.check_target().unwrap_err();
            assert_eq!(error.field(), Some("node"), "{bad:?}");
            assert!(
                error.to_string().contains("GET /v1/cluster/members"),
                "{error}"
            );
        }
        let good = SessionRequest {
            node: Some("node-b".into()),
            ..SessionRequest::default()
        };
        assert!(good.check_target().is_ok());
    }
}
