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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use troupe_actors::session::{
    AiderSession, ChatMessage, ChatSession, CommandSession, SessionKind, SessionSpec,
};

/// The request body, every field of every kind; which ones apply is checked per kind.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// `command`, `aider` or `chat`.
    pub kind: String,
    /// command: the program.
    pub program: Option<String>,
    /// command, aider: arguments.
    pub args: Option<Vec<String>>,
    /// command: environment entries.
    pub env: Option<BTreeMap<String, String>>,
    /// command, aider: working directory (relative to the first workspace root, or absolute).
    pub workdir: Option<String>,
    /// aider: the instruction.
    pub message: Option<String>,
    /// aider: files to edit.
    pub files: Option<Vec<String>>,
    /// aider, chat: the model.
    pub model: Option<String>,
    /// aider: let Aider use git.
    pub git: Option<bool>,
    /// chat: the conversation.
    pub messages: Option<Vec<ChatMessage>>,
    /// Timeout in seconds.
    pub timeout_secs: Option<u64>,
    /// 0 (lowest) to 9.
    pub priority: Option<u8>,
    /// Labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Run on this node (cluster).
    pub node: Option<String>,
    /// `least_loaded` (cluster).
    pub placement: Option<String>,
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
                let workdir = policy.resolve_workdir(self.workdir.as_deref())?;
                SessionKind::Command(CommandSession {
                    program,
                    args: self.args.clone().unwrap_or_default(),
                    env: self.env.clone().unwrap_or_default(),
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
        if let Some(placement) = &self.placement
            && placement != "least_loaded"
        {
            return Err(RequestError::Invalid {
                field: "placement",
                message: format!("{placement:?}: the only placement is \"least_loaded\""),
            });
        }
        Ok(SessionSpec {
            kind,
            timeout_secs: self.timeout_secs,
            priority: self.priority.unwrap_or(5),
            labels: self.labels.unwrap_or_default(),
            idempotency_key: self.idempotency_key,
        })
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
}
