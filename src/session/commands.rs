//! How this node turns a session's spec into a command line: commands as given, Aider through
//! its preset (and the node's gateway, when providers are configured), chat through providers.

use std::path::PathBuf;

use troupe_actors::session::aider::{AiderInterpreter, GatewayAccess, aider_command};
use troupe_actors::session::{
    CommandBuilder, CommandLine, OutputInterpreter, SessionKind, SessionRecord,
};

/// Where Aider sessions send their model calls.
pub trait GatewayKeys: Send + Sync + 'static {
    /// The gateway's base URL and a key scoped to `record`'s session, when the node has
    /// providers; `None` runs Aider against whatever its spec names.
    fn access_for(&self, record: &SessionRecord) -> Option<GatewayAccess>;
}

/// No gateway: Aider talks to its providers directly.
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
    /// sessions that go through the gateway, so they cannot bypass it.
    provider_key_env: Vec<String>,
    default_workdir: PathBuf,
}

impl NodeCommands {
    /// A builder using `gateway` for Aider sessions.
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
            SessionKind::Command(command) => Ok(CommandLine {
                program: command.program.clone(),
                args: command.args.clone(),
                env: command.env.clone(),
                env_remove: Vec::new(),
                workdir: command
                    .workdir
                    .clone()
                    .unwrap_or_else(|| self.default_workdir.clone()),
            }),
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
