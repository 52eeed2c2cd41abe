//! The parser and the outcome rules against real Aider transcripts
//! (`actors/tests/fixtures/aider/`, provenance in its README), table-driven; and against the fake
//! `aider` used by integration tests (`tests/fixtures/fake-aider.sh`), so the two cannot drift.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::*;
use crate::event::OutputStream;
use crate::session::{AiderSession, ExitStatus};

macro_rules! transcript {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!("../../../tests/fixtures/aider/", $name)),
        )
    };
}

const EXIT_0: ExitStatus = ExitStatus {
    code: Some(0),
    signal: None,
};
const EXIT_1: ExitStatus = ExitStatus {
    code: Some(1),
    signal: None,
};
const SIGTERM: ExitStatus = ExitStatus {
    code: None,
    signal: Some(15),
};

/// Retry delays Aider prints before it gives up (0.125 s doubled, up to 60 s).
const FULL_SCHEDULE: [Option<u64>; 9] = [
    Some(200),
    Some(500),
    Some(1_000),
    Some(2_000),
    Some(4_000),
    Some(8_000),
    Some(16_000),
    Some(32_000),
    None,
];

enum Expected {
    Succeeded,
    /// The reason starts with this.
    Failed(&'static str),
}

struct Case {
    transcript: (&'static str, &'static str),
    exit: ExitStatus,
    /// Provider named by every `RateLimited`.
    provider: Option<&'static str>,
    /// `retry_in` of each `RateLimited`, in milliseconds, in order.
    rate_limits: Vec<Option<u64>>,
    /// Kinds of the `Error` signals, in order.
    errors: Vec<AiderErrorKind>,
    /// `Retrying in` lines.
    retries: u32,
    applied_edits: u32,
    commits: u32,
    model_replies: u32,
    outcome: Expected,
}

fn cases() -> Vec<Case> {
    use AiderErrorKind::*;
    vec![
        Case {
            transcript: transcript!("ok_no_git.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![],
            retries: 0,
            applied_edits: 1,
            commits: 0,
            model_replies: 1,
            outcome: Expected::Succeeded,
        },
        Case {
            transcript: transcript!("ok_git_commit.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![],
            retries: 0,
            applied_edits: 1,
            commits: 1,
            model_replies: 1,
            outcome: Expected::Succeeded,
        },
        Case {
            transcript: transcript!("rate_limited_then_ok.txt"),
            exit: EXIT_0,
            provider: Some("openai"),
            rate_limits: vec![Some(200), Some(500)],
            errors: vec![],
            retries: 2,
            applied_edits: 1,
            commits: 0,
            model_replies: 1,
            outcome: Expected::Succeeded,
        },
        Case {
            transcript: transcript!("rate_limited_gave_up.txt"),
            exit: EXIT_0,
            provider: Some("openai"),
            rate_limits: FULL_SCHEDULE.to_vec(),
            errors: vec![RateLimit],
            retries: 8,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "rate limited by openai: Aider gave up after 9 rate-limit errors (8 retries): \
                 litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached for gpt-4o",
            ),
        },
        Case {
            transcript: transcript!("rate_limited_during_lint_fix.txt"),
            exit: EXIT_0,
            provider: Some("openai"),
            rate_limits: FULL_SCHEDULE.to_vec(),
            errors: vec![RateLimit],
            retries: 8,
            applied_edits: 1,
            commits: 0,
            model_replies: 1,
            outcome: Expected::Failed(
                "rate limited by openai: Aider gave up after 9 rate-limit errors (8 retries), \
                 after applying 1 edit: litellm.RateLimitError:",
            ),
        },
        Case {
            transcript: transcript!("rate_limited_commit_message.txt"),
            exit: EXIT_0,
            provider: Some("openai"),
            rate_limits: [FULL_SCHEDULE, FULL_SCHEDULE].concat(),
            errors: vec![RateLimit, RateLimit],
            retries: 16,
            applied_edits: 1,
            commits: 1,
            model_replies: 1,
            outcome: Expected::Succeeded,
        },
        Case {
            transcript: transcript!("anthropic_rate_limited_killed.txt"),
            exit: SIGTERM,
            provider: Some("anthropic"),
            rate_limits: FULL_SCHEDULE[..6].to_vec(),
            errors: vec![],
            retries: 6,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "aider was killed by signal 15; rate limited by anthropic 6 times",
            ),
        },
        Case {
            transcript: transcript!("anthropic_overloaded_killed.txt"),
            exit: SIGTERM,
            provider: None,
            rate_limits: vec![],
            errors: vec![],
            retries: 6,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed("aider was killed by signal 15"),
        },
        Case {
            transcript: transcript!("server_error_gave_up.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![ServerError],
            retries: 8,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "the provider's servers failed: litellm.InternalServerError: InternalServerError: \
                 OpenAIException - The server had an error",
            ),
        },
        Case {
            transcript: transcript!("connection_refused_gave_up.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![ServerError],
            retries: 8,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "the provider's servers failed: litellm.InternalServerError: InternalServerError: \
                 OpenAIException - Connection error.",
            ),
        },
        Case {
            transcript: transcript!("auth_error.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![Authentication],
            retries: 0,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "the provider refused the API key: litellm.AuthenticationError:",
            ),
        },
        Case {
            transcript: transcript!("model_not_found.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![NotFound],
            retries: 0,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "the provider does not know the model: litellm.NotFoundError: OpenAIException - \
                 The model `fake-m9` does not exist",
            ),
        },
        Case {
            transcript: transcript!("bad_request.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![BadRequest],
            retries: 0,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "the provider rejected the request: litellm.BadRequestError:",
            ),
        },
        Case {
            transcript: transcript!("context_window.txt"),
            exit: EXIT_0,
            provider: None,
            rate_limits: vec![],
            errors: vec![ContextWindowExceeded],
            retries: 0,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed(
                "the model's token limit was hit: Model openai/fake-m1 has hit a token limit!",
            ),
        },
        Case {
            transcript: transcript!("crash.txt"),
            exit: EXIT_1,
            provider: None,
            rate_limits: vec![],
            errors: vec![],
            retries: 0,
            applied_edits: 0,
            commits: 0,
            model_replies: 0,
            outcome: Expected::Failed("aider exited with code 1"),
        },
    ]
}

struct Parsed {
    signals: Vec<AiderSignal>,
    /// Signals `finish` still had to give.
    at_finish: usize,
    summary: AiderSummary,
}

fn parse(text: &str) -> Parsed {
    let mut parser = AiderOutputParser::new();
    let mut signals = Vec::new();
    for line in text.lines() {
        signals.extend(parser.feed(OutputStream::Stdout, line));
    }
    let at_finish = parser.finish();
    let count = at_finish.len();
    signals.extend(at_finish);
    Parsed {
        signals,
        at_finish: count,
        summary: parser.summary(),
    }
}

fn check(case: &Case, name: &str, parsed: &Parsed) {
    let mut rate_limits = Vec::new();
    let mut errors = Vec::new();
    for signal in &parsed.signals {
        match signal {
            AiderSignal::RateLimited {
                provider,
                retry_in,
                line,
            } => {
                assert_eq!(provider.as_deref(), case.provider, "{name}: provider");
                assert!(
                    line.starts_with("litellm.RateLimitError: "),
                    "{name}: rate-limit line {line:?}"
                );
                rate_limits.push(retry_in.map(|delay| delay.as_millis() as u64));
            }
            AiderSignal::Error { kind, .. } => errors.push(*kind),
        }
    }
    assert_eq!(rate_limits, case.rate_limits, "{name}: rate limits");
    assert_eq!(errors, case.errors, "{name}: errors");
    let summary = &parsed.summary;
    assert_eq!(
        summary.rate_limits as usize,
        case.rate_limits.len(),
        "{name}: summary.rate_limits"
    );
    assert_eq!(summary.retries, case.retries, "{name}: retries");
    assert_eq!(summary.applied_edits, case.applied_edits, "{name}: edits");
    assert_eq!(summary.commits, case.commits, "{name}: commits");
    assert_eq!(summary.model_replies, case.model_replies, "{name}: replies");
    match (&case.outcome, decide_outcome(case.exit, summary)) {
        (Expected::Succeeded, AiderOutcome::Succeeded) => {}
        (Expected::Failed(prefix), AiderOutcome::Failed { reason }) => {
            assert!(
                reason.starts_with(prefix),
                "{name}: reason {reason:?} does not start with {prefix:?}"
            );
        }
        (_, outcome) => panic!("{name}: unexpected outcome {outcome:?}"),
    }
}

#[test]
fn aider_transcripts_give_the_expected_signals_and_outcomes() {
    for case in cases() {
        let (name, text) = case.transcript;
        let parsed = parse(text);
        check(&case, name, &parsed);
        // Every transcript ends its error blocks with a line of its own: nothing waits for
        // the process to exit.
        assert_eq!(parsed.at_finish, 0, "{name}: signals held until finish");
    }
}

#[test]
fn aider_transcripts_read_the_same_with_crlf_line_endings() {
    for case in cases() {
        let (name, text) = case.transcript;
        let whole = parse(text);
        let crlf = parse(&text.replace('\n', "\r\n"));
        assert_eq!(crlf.signals, whole.signals, "{name}: CRLF");
        assert_eq!(crlf.summary, whole.summary, "{name}: CRLF");
    }
}

#[test]
fn aider_rate_limit_signal_is_emitted_on_its_retrying_line() {
    // Live events: the signal for a retried rate limit comes with the `Retrying` line, not later.
    let (_, text) = transcript!("rate_limited_then_ok.txt");
    let mut parser = AiderOutputParser::new();
    let mut emitted_on = Vec::new();
    for line in text.lines() {
        if !parser.feed(OutputStream::Stdout, line).is_empty() {
            emitted_on.push(line);
        }
    }
    assert_eq!(
        emitted_on,
        ["Retrying in 0.2 seconds...", "Retrying in 0.5 seconds..."]
    );
}

#[test]
fn aider_retries_of_other_errors_give_no_signal_until_aider_gives_up() {
    let (_, text) = transcript!("server_error_gave_up.txt");
    let mut parser = AiderOutputParser::new();
    let lines: Vec<&str> = text.lines().collect();
    let last_retry = lines
        .iter()
        .rposition(|line| line.starts_with("Retrying in "))
        .unwrap();
    for line in &lines[..=last_retry] {
        assert!(parser.feed(OutputStream::Stdout, line).is_empty(), "{line}");
    }
    let rest: Vec<AiderSignal> = lines[last_retry + 1..]
        .iter()
        .flat_map(|line| parser.feed(OutputStream::Stdout, line))
        .collect();
    assert!(matches!(
        rest.as_slice(),
        [AiderSignal::Error {
            kind: AiderErrorKind::ServerError,
            ..
        }]
    ));
}

fn fake_aider() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fake-aider.sh")
}

/// Runs the fake `aider` with the preset's command line (program replaced by the script).
fn run_fake(scenario: &str, gateway: Option<&GatewayAccess>) -> (ExitStatus, String) {
    let spec = AiderSession {
        message: "add a test".into(),
        files: vec!["src/lib.rs".into()],
        model: Some("fake/m1".into()),
        args: vec![],
        workdir: None,
        git: false,
    };
    let command = aider_command(&spec, std::env::temp_dir(), gateway);
    let mut process = Command::new(fake_aider());
    process
        .args(&command.args)
        .envs(&command.env)
        .current_dir(&command.workdir)
        .env("FAKE_AIDER_SCENARIO", scenario)
        .env("ANTHROPIC_API_KEY", "node-secret");
    for name in &command.env_remove {
        process.env_remove(name);
    }
    let output = process.output().expect("run tests/fixtures/fake-aider.sh");
    let status = ExitStatus {
        code: output.status.code(),
        signal: None,
    };
    (status, String::from_utf8(output.stdout).unwrap())
}

#[test]
fn aider_fake_script_scenarios_read_like_real_aider() {
    let gateway = GatewayAccess {
        base_url: "http://127.0.0.1:9/v1".into(),
        api_key: "session-key".into(),
    };

    let (exit, stdout) = run_fake("ok", Some(&gateway));
    assert_eq!(exit, EXIT_0);
    let parsed = parse(&stdout);
    assert!(parsed.signals.is_empty(), "{:?}", parsed.signals);
    assert_eq!(parsed.summary.applied_edits, 1);
    assert_eq!(
        decide_outcome(exit, &parsed.summary),
        AiderOutcome::Succeeded
    );
    assert!(stdout.contains(
        "fake-aider: argv: [--message=add a test] [--yes-always] [--no-check-update] \
         [--no-show-model-warnings] [--no-pretty] [--analytics-disable] [--no-git] \
         [--model=openai/fake/m1] [--weak-model=openai/fake/m1] [--editor-model=openai/fake/m1] \
         [--openai-api-base=http://127.0.0.1:9/v1] \
         [--set-env=OPENAI_BASE_URL=http://127.0.0.1:9/v1] [src/lib.rs]\n"
    ));
    assert!(stdout.contains("fake-aider: OPENAI_API_BASE=http://127.0.0.1:9/v1\n"));
    assert!(stdout.contains("fake-aider: OPENAI_API_KEY set\n"));
    // The node's own key was in the environment; the preset removed it.
    assert!(
        stdout.contains("fake-aider: provider keys: none\n"),
        "{stdout}"
    );

    let (exit, stdout) = run_fake("rate-limited", Some(&gateway));
    assert_eq!(exit, EXIT_0);
    let parsed = parse(&stdout);
    let delays: Vec<Option<Duration>> = parsed
        .signals
        .iter()
        .filter_map(|signal| match signal {
            AiderSignal::RateLimited { retry_in, .. } => Some(*retry_in),
            AiderSignal::Error { .. } => None,
        })
        .collect();
    assert_eq!(
        delays,
        [
            Some(Duration::from_millis(200)),
            Some(Duration::from_millis(500)),
            Some(Duration::from_secs(1)),
            None
        ]
    );
    match decide_outcome(exit, &parsed.summary) {
        AiderOutcome::Failed { reason } => assert!(
            reason.starts_with("rate limited by openai: Aider gave up after 4 rate-limit errors"),
            "{reason}"
        ),
        AiderOutcome::Succeeded => panic!("a rate-limited run that gave up succeeded"),
    }

    let (exit, stdout) = run_fake("crash", None);
    assert_eq!(exit, EXIT_1);
    assert!(stdout.contains("# Uncaught RuntimeError in base_coder.py line 934\n"));
    assert!(matches!(
        decide_outcome(exit, &parse(&stdout).summary),
        AiderOutcome::Failed { .. }
    ));
}
