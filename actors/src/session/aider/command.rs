//! The command line of an Aider session: flags for a non-interactive run, the model, and — when
//! the node has providers — the pins that send every model call through the node's gateway.
//!
//! Pure: builds a [`CommandLine`], never looks at the filesystem or the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use crate::session::{AiderSession, CommandLine};

/// The program the preset runs (looked up in `PATH`).
pub const AIDER_PROGRAM: &str = "aider";

/// The flag the message is passed with, joined to it: one argument, which is why the message's
/// length is bounded by Linux's limit on one argument ([`crate::session::MAX_ARG_STRLEN`]).
pub const MESSAGE_FLAG: &str = "--message=";

/// Provider credentials and endpoints removed from Aider's environment when it goes through the
/// gateway, so that Aider does not pick up the node's own keys and call a provider directly.
/// This keeps them out of its environment only: a session runs as the node's user, which can
/// read the node's environment through `/proc`. `OPENAI_API_KEY` is not listed: it is replaced
/// by the session's gateway key.
///
/// The `AIDER_*` entries are Aider's own environment spellings of `--openai-api-base`,
/// `--openai-api-key`, `--anthropic-api-key`, `--api-key` and `--set-env`, which could otherwise
/// point it elsewhere or hand it a key.
///
/// The node's configured `api_key_env` names are not known here: the caller appends them to
/// [`CommandLine::env_remove`] when they are not in this list.
pub const GATEWAY_HIDDEN_ENV: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_API_BASE",
    "ANTHROPIC_BASE_URL",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "VERTEXAI_PROJECT",
    "VERTEXAI_LOCATION",
    "AZURE_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "AZURE_API_BASE",
    "OPENROUTER_API_KEY",
    "DEEPSEEK_API_KEY",
    "GROQ_API_KEY",
    "MISTRAL_API_KEY",
    "COHERE_API_KEY",
    "XAI_API_KEY",
    "TOGETHERAI_API_KEY",
    "FIREWORKS_AI_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "OPENAI_ORGANIZATION",
    "AIDER_OPENAI_API_BASE",
    "AIDER_OPENAI_API_KEY",
    "AIDER_ANTHROPIC_API_KEY",
    "AIDER_API_KEY",
    "AIDER_SET_ENV",
];

/// How an Aider session reaches the node's OpenAI-compatible gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayAccess {
    /// The gateway's base URL, the one OpenAI clients take (`http://127.0.0.1:7070/v1`).
    pub base_url: String,
    /// The session-scoped gateway key.
    pub api_key: String,
}

impl fmt::Debug for GatewayAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayAccess")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

/// The command line that runs `spec` in `workdir` (already checked against the workspace
/// roots), through `gateway` when there is one.
///
/// Arguments, in order:
/// 1. `--message=<message>` `--yes-always` `--no-check-update` `--no-show-model-warnings`
///    `--no-pretty` `--analytics-disable`, then `--no-git` unless `spec.git`. The `=` forms keep a
///    message or model that starts with `-` from being read as a flag.
/// 2. The model: as given without a gateway (`--model=<m>`); with one, `--model=openai/<m>`,
///    which is how Aider (litellm) addresses a model on a custom OpenAI-compatible base — litellm
///    strips exactly that one `openai/`, so the gateway receives `<m>` unchanged, provider prefix
///    included. `--weak-model` and `--editor-model` are pinned to the same name, because Aider
///    would otherwise pick its own (`gpt-4o-mini` for `gpt-4o`), a name the gateway may not route.
/// 3. `spec.args`.
/// 4. With a gateway, after the extra arguments so that they win (Aider's parser keeps the last
///    value): `--openai-api-base=<url>` and `--set-env=OPENAI_BASE_URL=<url>`. Aider loads `.env`
///    files from the workspace with override, so environment variables alone could be replaced
///    by a project's own `.env`; these two flags are applied after it. (`OPENAI_BASE_URL` is the
///    one litellm reads first.) The key stays out of the argument list, which other local users
///    can read.
/// 5. The files, as positional arguments. Not after `--`: Aider's parser (configargparse) appends
///    list-valued settings from `.aider.conf.yml` or `AIDER_*` variables (such as `read`) after
///    the command line, and after `--` they would become file names. A file whose name starts
///    with `-` is passed as `./<name>`.
///
/// Environment: `COLUMNS=1000` (Aider's console wraps at the terminal width otherwise),
/// `NO_COLOR=1`, `TERM=dumb`, and `PYTHONUNBUFFERED=1` (output arrives line by line, in order,
/// instead of when Python's pipe buffer fills). With a gateway also `OPENAI_API_BASE`,
/// `OPENAI_BASE_URL` and `OPENAI_API_KEY`, and [`GATEWAY_HIDDEN_ENV`] removed.
///
/// Without a model and with a gateway, Aider picks its default model from the keys it sees
/// (`OPENAI_API_KEY`: an OpenAI model), and asks the gateway for it by its bare name.
pub fn aider_command(
    spec: &AiderSession,
    workdir: PathBuf,
    gateway: Option<&GatewayAccess>,
) -> CommandLine {
    let mut args = vec![
        format!("{MESSAGE_FLAG}{}", spec.message),
        "--yes-always".to_owned(),
        "--no-check-update".to_owned(),
        "--no-show-model-warnings".to_owned(),
        "--no-pretty".to_owned(),
        "--analytics-disable".to_owned(),
    ];
    if !spec.git {
        args.push("--no-git".to_owned());
    }
    if let Some(model) = &spec.model {
        match gateway {
            None => args.push(format!("--model={model}")),
            Some(_) => {
                let routed = format!("openai/{model}");
                args.push(format!("--model={routed}"));
                args.push(format!("--weak-model={routed}"));
                args.push(format!("--editor-model={routed}"));
            }
        }
    }
    args.extend(spec.args.iter().cloned());
    if let Some(gateway) = gateway {
        args.push(format!("--openai-api-base={}", gateway.base_url));
        args.push(format!("--set-env=OPENAI_BASE_URL={}", gateway.base_url));
    }
    args.extend(spec.files.iter().map(|file| {
        if file.starts_with('-') {
            format!("./{file}")
        } else {
            file.clone()
        }
    }));

    let mut env = BTreeMap::from([
        ("COLUMNS".to_owned(), "1000".to_owned()),
        ("NO_COLOR".to_owned(), "1".to_owned()),
        ("TERM".to_owned(), "dumb".to_owned()),
        ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
    ]);
    let mut env_remove = Vec::new();
    if let Some(gateway) = gateway {
        env.insert("OPENAI_API_BASE".to_owned(), gateway.base_url.clone());
        env.insert("OPENAI_BASE_URL".to_owned(), gateway.base_url.clone());
        env.insert("OPENAI_API_KEY".to_owned(), gateway.api_key.clone());
        env_remove.extend(GATEWAY_HIDDEN_ENV.iter().map(|name| (*name).to_owned()));
    }

    CommandLine {
        program: AIDER_PROGRAM.to_owned(),
        args,
        env,
        env_remove,
        workdir,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AiderSession {
        AiderSession {
            message: "add a test".into(),
            files: vec!["src/lib.rs".into(), "-odd.rs".into()],
            model: Some("fake/m1".into()),
            args: vec!["--map-tokens".into(), "0".into()],
            workdir: None,
            git: false,
        }
    }

    fn gateway() -> GatewayAccess {
        GatewayAccess {
            base_url: "http://127.0.0.1:7070/v1".into(),
            api_key: "tg-session-key".into(),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    #[test]
    fn aider_command_without_gateway_is_exact() {
        let command = aider_command(&spec(), PathBuf::from("/srv/agents/w"), None);
        assert_eq!(command.program, "aider");
        assert_eq!(command.workdir, PathBuf::from("/srv/agents/w"));
        assert_eq!(
            command.args,
            strings(&[
                "--message=add a test",
                "--yes-always",
                "--no-check-update",
                "--no-show-model-warnings",
                "--no-pretty",
                "--analytics-disable",
                "--no-git",
                "--model=fake/m1",
                "--map-tokens",
                "0",
                "src/lib.rs",
                "./-odd.rs",
            ])
        );
        assert_eq!(
            command.env,
            BTreeMap::from([
                ("COLUMNS".to_owned(), "1000".to_owned()),
                ("NO_COLOR".to_owned(), "1".to_owned()),
                ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
                ("TERM".to_owned(), "dumb".to_owned()),
            ])
        );
        assert!(command.env_remove.is_empty());
    }

    #[test]
    fn aider_command_with_gateway_is_exact() {
        let mut spec = spec();
        spec.git = true;
        let command = aider_command(&spec, PathBuf::from("/srv/agents/w"), Some(&gateway()));
        assert_eq!(
            command.args,
            strings(&[
                "--message=add a test",
                "--yes-always",
                "--no-check-update",
                "--no-show-model-warnings",
                "--no-pretty",
                "--analytics-disable",
                "--model=openai/fake/m1",
                "--weak-model=openai/fake/m1",
                "--editor-model=openai/fake/m1",
                "--map-tokens",
                "0",
                "--openai-api-base=http://127.0.0.1:7070/v1",
                "--set-env=OPENAI_BASE_URL=http://127.0.0.1:7070/v1",
                "src/lib.rs",
                "./-odd.rs",
            ])
        );
        assert_eq!(
            command.env,
            BTreeMap::from([
                ("COLUMNS".to_owned(), "1000".to_owned()),
                ("NO_COLOR".to_owned(), "1".to_owned()),
                (
                    "OPENAI_API_BASE".to_owned(),
                    "http://127.0.0.1:7070/v1".to_owned()
                ),
                ("OPENAI_API_KEY".to_owned(), "tg-session-key".to_owned()),
                (
                    "OPENAI_BASE_URL".to_owned(),
                    "http://127.0.0.1:7070/v1".to_owned()
                ),
                ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
                ("TERM".to_owned(), "dumb".to_owned()),
            ])
        );
        assert_eq!(command.env_remove, strings(GATEWAY_HIDDEN_ENV));
        for hidden in [
            "ANTHROPIC_API_KEY",
            "GEMINI_API_KEY",
            "AIDER_OPENAI_API_BASE",
        ] {
            assert!(command.env_remove.iter().any(|name| name == hidden));
        }
        assert!(
            !command
                .env_remove
                .iter()
                .any(|name| name == "OPENAI_API_KEY")
        );
        // The key never appears in the arguments (they are readable by other local users).
        assert!(
            !command
                .args
                .iter()
                .any(|arg| arg.contains("tg-session-key"))
        );
    }

    #[test]
    fn aider_command_keeps_a_provider_prefixed_model_whole_behind_openai() {
        let mut spec = spec();
        spec.model = Some("openai/gpt-4o-mini".into());
        let command = aider_command(&spec, PathBuf::from("/w"), Some(&gateway()));
        assert!(
            command
                .args
                .contains(&"--model=openai/openai/gpt-4o-mini".to_owned())
        );
    }

    #[test]
    fn aider_command_without_model_passes_no_model_flags() {
        let mut spec = spec();
        spec.model = None;
        for gateway in [None, Some(gateway())] {
            let command = aider_command(&spec, PathBuf::from("/w"), gateway.as_ref());
            assert!(
                !command.args.iter().any(|arg| arg.starts_with("--model")
                    || arg.starts_with("--weak-model")
                    || arg.starts_with("--editor-model")),
                "{:?}",
                command.args
            );
        }
    }

    #[test]
    fn aider_message_starting_with_dashes_stays_one_value() {
        let mut spec = spec();
        spec.message = "--help me\nwith two lines".into();
        let command = aider_command(&spec, PathBuf::from("/w"), None);
        assert_eq!(command.args[0], "--message=--help me\nwith two lines");
    }

    #[test]
    fn gateway_access_debug_hides_the_key() {
        let shown = format!("{:?}", gateway());
        assert!(shown.contains("127.0.0.1:7070"));
        assert!(!shown.contains("tg-session-key"), "{shown}");
    }
}
