//! How this node turns a session's spec into a command line: commands as given, Aider through
//! its preset, chat through providers.
//!
//! On a node with providers every process session gets the node's gateway and a key scoped to
//! it, so any agent that speaks OpenAI's API is counted against the providers' budgets and
//! its `provider.*` events carry its session. A `command` session gets [`GATEWAY_URL_ENV`] and
//! [`GATEWAY_KEY_ENV`], and the variables OpenAI SDKs and litellm read (`OPENAI_BASE_URL`,
//! `OPENAI_API_BASE`, `OPENAI_API_KEY`); a variable its spec's `env` sets keeps the spec's value.
//! The node's own provider keys (`api_key_env`) are removed from every such session unless its
//! spec sets them, so agents use the gateway by default. That keeps the keys out of the
//! session's own environment, not out of its reach: the session runs as the node's user and can
//! read the node's environment (`/proc/$PPID/environ`) and data directory (the admin token);
//! docs/CONFIGURATION.md, "Sessions run as the node's user".

use std::collections::BTreeMap;
use std::path::PathBuf;

use troupe_actors::session::aider::{AiderInterpreter, GatewayAccess, aider_command};
use troupe_actors::session::{
    CommandBuilder, CommandLine, OutputInterpreter, SessionKind, SessionRecord,
};

/// The gateway's base URL (`http://127.0.0.1:PORT/v1`) in a `command` session's environment.
pub const GATEWAY_URL_ENV: &str = "TROUPE_GATEWAY_URL";

/// The session's gateway key in a `command` session's environment.
pub const GATEWAY_KEY_ENV: &str = "TROUPE_GATEWAY_KEY";

/// Where process sessions send their model calls.
pub trait GatewayKeys: Send + Sync + 'static {
    /// The gateway's base URL and a key scoped to `record`'s session, when the node has
    /// providers; `None` leaves sessions to whatever their spec names.
    fn access_for(&self, record: &SessionRecord) -> Option<GatewayAccess>;
}

/// No gateway: sessions talk to their providers directly.
pub struct NoGateway;

impl GatewayKeys for NoGateway {
    fn access_for(&self, _record: &SessionRecord) -> Option<GatewayAccess> {
        None
    }
}

/// The node's command builder.
pub struct NodeCommands {
    gateway: Box<dyn GatewayKeys>,
    /// Environment variables holding provider keys (`[[providers]].api_key_env`): removed from
    /// sessions that go through the gateway, so agents use it by default (not a boundary: see
    /// the module's documentation).
    provider_key_env: Vec<String>,
    default_workdir: PathBuf,
}

impl NodeCommands {
    /// A builder using `gateway` for process sessions.
    pub fn new(
        gateway: Box<dyn GatewayKeys>,
        provider_key_env: Vec<String>,
        default_workdir: PathBuf,
    ) -> Self {
        Self {
            gateway,
            provider_key_env,
            default_workdir,
        }
    }
}

impl CommandBuilder for NodeCommands {
    fn command(&self, record: &SessionRecord) -> Result<CommandLine, String> {
        match &record.spec.kind {
            SessionKind::Command(command) => {
                let mut env = BTreeMap::new();
                let mut env_remove = Vec::new();
                if let Some(access) = self.gateway.access_for(record) {
                    env.extend(gateway_env(&access));
                    env_remove.extend(
                        self.provider_key_env
                            .iter()
                            .filter(|name| !command.env.contains_key(*name))
                            .cloned(),
                    );
                }
                // The spec's own values win.
                env.extend(command.env.clone());
                Ok(CommandLine {
                    program: command.program.clone(),
                    args: command.args.clone(),
                    env,
                    env_remove,
                    workdir: command
                        .workdir
                        .clone()
                        .unwrap_or_else(|| self.default_workdir.clone()),
                })
            }
            SessionKind::Aider(aider) => {
                let workdir = aider
                    .workdir
                    .clone()
                    .unwrap_or_else(|| self.default_workdir.clone());
                let access = self.gateway.access_for(record);
                let mut command = aider_command(aider, workdir, access.as_ref());
                if access.is_some() {
                    command
                        .env_remove
                        .extend(self.provider_key_env.iter().cloned());
                }
                Ok(command)
            }
            SessionKind::Chat(_) => Err(
                "chat sessions run through a provider of this node, and none is configured: \
                 add a [[providers]] section"
                    .into(),
            ),
        }
    }

    fn interpreter(&self, record: &SessionRecord) -> Option<Box<dyn OutputInterpreter>> {
        match record.spec.kind {
            SessionKind::Aider(_) => Some(Box::new(AiderInterpreter::new())),
            _ => None,
        }
    }
}

/// What a `command` session is given to reach the gateway.
fn gateway_env(access: &GatewayAccess) -> [(String, String); 5] {
    let url = access.base_url.clone();
    let key = access.api_key.clone();
    [
        (GATEWAY_URL_ENV.to_owned(), url.clone()),
        (GATEWAY_KEY_ENV.to_owned(), key.clone()),
        ("OPENAI_BASE_URL".to_owned(), url.clone()),
        ("OPENAI_API_BASE".to_owned(), url),
        ("OPENAI_API_KEY".to_owned(), key),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use troupe_actors::ids::{NodeId, SessionId, Timestamp};
    use troupe_actors::session::{CommandSession, SessionSpec, SessionState};

    struct Keys;

    impl GatewayKeys for Keys {
        fn access_for(&self, record: &SessionRecord) -> Option<GatewayAccess> {
            Some(GatewayAccess {
                base_url: "http://127.0.0.1:7070/v1".into(),
                api_key: format!("tsk_for_{}", record.id),
            })
        }
    }

    fn record(env: &[(&str, &str)]) -> SessionRecord {
        let command = CommandSession {
            program: "agent".into(),
            args: vec!["--go".into()],
            env: env
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            workdir: None,
        };
        SessionRecord {
            id: SessionId::new("s-1").unwrap(),
            node: NodeId::new("n").unwrap(),
            spec: SessionSpec {
                kind: SessionKind::Command(command),
                timeout_secs: None,
                priority: 5,
                labels: BTreeMap::new(),
                idempotency_key: None,
            },
            state: SessionState::Queued,
            created_at: Timestamp::from_micros(0),
            started_at: None,
            ended_at: None,
            exit_code: None,
            signal: None,
            reason: None,
            process: None,
            output_lines: 0,
            stop_requested: None,
        }
    }

    fn builder(gateway: Box<dyn GatewayKeys>) -> NodeCommands {
        NodeCommands::new(
            gateway,
            vec!["NODE_OPENAI_KEY".into(), "SPEC_KEEPS_THIS".into()],
            PathBuf::from("/srv/agents"),
        )
    }

    #[test]
    fn a_command_session_gets_the_gateway_and_its_own_key() {
        let line = builder(Box::new(Keys)).command(&record(&[])).unwrap();
        let url = "http://127.0.0.1:7070/v1";
        for (name, value) in [
            ("TROUPE_GATEWAY_URL", url),
            ("TROUPE_GATEWAY_KEY", "tsk_for_s-1"),
            ("OPENAI_BASE_URL", url),
            ("OPENAI_API_BASE", url),
            ("OPENAI_API_KEY", "tsk_for_s-1"),
        ] {
            assert_eq!(
                line.env.get(name).map(String::as_str),
                Some(value),
                "{name}"
            );
        }
        assert_eq!(line.env_remove, ["NODE_OPENAI_KEY", "SPEC_KEEPS_THIS"]);
        assert_eq!(line.program, "agent");
        assert_eq!(line.args, ["--go"]);
        assert_eq!(line.workdir, PathBuf::from("/srv/agents"));
    }

    #[test]
    fn the_specs_own_environment_wins_over_the_gateways() {
        let spec_env = [
            ("OPENAI_BASE_URL", "https://example.invalid/v1"),
            ("SPEC_KEEPS_THIS", "mine"),
        ];
        let line = builder(Box::new(Keys)).command(&record(&spec_env)).unwrap();
        assert_eq!(line.env["OPENAI_BASE_URL"], "https://example.invalid/v1");
        assert_eq!(line.env["SPEC_KEEPS_THIS"], "mine");
        assert_eq!(line.env["OPENAI_API_KEY"], "tsk_for_s-1");
        assert_eq!(
            line.env_remove,
            ["NODE_OPENAI_KEY"],
            "the spec set the other"
        );
    }

    #[test]
    fn without_providers_a_command_runs_as_given() {
        let line = builder(Box::new(NoGateway))
            .command(&record(&[("K", "V")]))
            .unwrap();
        assert_eq!(line.env, BTreeMap::from([("K".to_owned(), "V".to_owned())]));
        assert!(line.env_remove.is_empty());
    }
}
