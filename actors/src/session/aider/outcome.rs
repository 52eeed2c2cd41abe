//! How an Aider session ended, from its exit status and what its output showed (Aider exits 0
//! even when it gave up). The rules are listed in the parent module.

use super::output::{AiderErrorKind, AiderSummary};
use crate::session::ExitStatus;

/// How an Aider run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AiderOutcome {
    /// It did what it was asked, as far as its output tells.
    Succeeded,
    /// It did not.
    Failed {
        /// Why, in words, quoting the line that showed it.
        reason: String,
    },
}

/// The longest part of an output line quoted in a reason.
const QUOTE_MAX_CHARS: usize = 240;

/// Decides the outcome (rules in the parent module, checked in this order).
pub fn decide_outcome(exit: ExitStatus, summary: &AiderSummary) -> AiderOutcome {
    let failed = |reason: String| AiderOutcome::Failed { reason };
    if exit.signal.is_some() || !exit.success() {
        let ended = match (exit.signal, exit.code) {
            (Some(signal), _) => format!("aider was killed by signal {signal}"),
            (None, Some(code)) => format!("aider exited with code {code}"),
            (None, None) => "aider ended without an exit code".to_owned(),
        };
        let mut reason = ended;
        if summary.rate_limits > 0 {
            reason.push_str(&format!("; {}", rate_limited(summary)));
        }
        if let Some(error) = &summary.fatal_error {
            reason.push_str(&format!("; last error: {}", quote(&error.line)));
        }
        return failed(reason);
    }
    if let Some(line) = &summary.write_failure {
        return failed(format!(
            "{}{}: {}",
            AiderErrorKind::FileWrite.describe(),
            after_rate_limits(summary),
            quote(line)
        ));
    }
    if let Some(error) = &summary.fatal_error {
        let partial = match summary.applied_edits {
            0 => String::new(),
            1 => ", after applying 1 edit".to_owned(),
            edits => format!(", after applying {edits} edits"),
        };
        let what = if error.kind == AiderErrorKind::RateLimit {
            format!(
                "{}: Aider gave up after {}{partial}",
                rate_limited_by(summary),
                counted(summary.rate_limits, "rate-limit error", "rate-limit errors")
                    + &format!(" ({})", counted(summary.retries, "retry", "retries"))
            )
        } else {
            format!(
                "{}{}{partial}",
                error.kind.describe(),
                after_rate_limits(summary)
            )
        };
        return failed(format!("{what}: {}", quote(&error.line)));
    }
    if summary.reflections_exhausted && summary.applied_edits == 0 {
        return failed(
            "Aider stopped at its reflection limit without applying any edit".to_owned(),
        );
    }
    AiderOutcome::Succeeded
}

fn rate_limited_by(summary: &AiderSummary) -> String {
    match &summary.rate_limit_provider {
        Some(provider) => format!("rate limited by {provider}"),
        None => "rate limited".to_owned(),
    }
}

/// `rate limited by openai 3 times`
fn rate_limited(summary: &AiderSummary) -> String {
    format!(
        "{} {}",
        rate_limited_by(summary),
        counted(summary.rate_limits, "time", "times")
    )
}

/// ` (after being rate limited by openai 3 times)`, or nothing.
fn after_rate_limits(summary: &AiderSummary) -> String {
    if summary.rate_limits == 0 {
        String::new()
    } else {
        format!(" (after being {})", rate_limited(summary))
    }
}

fn counted(count: u32, one: &str, many: &str) -> String {
    if count == 1 {
        format!("1 {one}")
    } else {
        format!("{count} {many}")
    }
}

fn quote(line: &str) -> String {
    let line = line.trim();
    match line.char_indices().nth(QUOTE_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::output::AiderError;
    use super::*;

    const EXIT_0: ExitStatus = ExitStatus {
        code: Some(0),
        signal: None,
    };

    fn failed_reason(outcome: AiderOutcome) -> String {
        match outcome {
            AiderOutcome::Failed { reason } => reason,
            AiderOutcome::Succeeded => panic!("expected a failure"),
        }
    }

    #[test]
    fn aider_outcome_non_zero_exit_fails_whatever_the_output() {
        let summary = AiderSummary {
            applied_edits: 2,
            model_replies: 1,
            ..AiderSummary::default()
        };
        let exit = ExitStatus {
            code: Some(1),
            signal: None,
        };
        assert_eq!(
            decide_outcome(exit, &summary),
            AiderOutcome::Failed {
                reason: "aider exited with code 1".into()
            }
        );
        let killed = ExitStatus {
            code: None,
            signal: Some(15),
        };
        assert_eq!(
            failed_reason(decide_outcome(killed, &summary)),
            "aider was killed by signal 15"
        );
    }

    #[test]
    fn aider_outcome_clean_exit_without_errors_succeeds() {
        assert_eq!(
            decide_outcome(EXIT_0, &AiderSummary::default()),
            AiderOutcome::Succeeded
        );
        // Retried rate limits followed by a reply are not a failure.
        let summary = AiderSummary {
            rate_limits: 2,
            retries: 2,
            model_replies: 1,
            applied_edits: 1,
            ..AiderSummary::default()
        };
        assert_eq!(decide_outcome(EXIT_0, &summary), AiderOutcome::Succeeded);
    }

    #[test]
    fn aider_outcome_rate_limit_given_up_names_the_rate_limit() {
        let summary = AiderSummary {
            rate_limits: 9,
            rate_limit_provider: Some("openai".into()),
            retries: 8,
            fatal_error: Some(AiderError {
                kind: AiderErrorKind::RateLimit,
                line:
                    "litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached"
                        .into(),
            }),
            ..AiderSummary::default()
        };
        assert_eq!(
            failed_reason(decide_outcome(EXIT_0, &summary)),
            "rate limited by openai: Aider gave up after 9 rate-limit errors (8 retries): \
             litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached"
        );
    }

    #[test]
    fn aider_outcome_other_fatal_errors_mention_earlier_rate_limits() {
        let summary = AiderSummary {
            rate_limits: 1,
            retries: 1,
            fatal_error: Some(AiderError {
                kind: AiderErrorKind::Authentication,
                line: "litellm.AuthenticationError: AuthenticationError: OpenAIException - bad key"
                    .into(),
            }),
            ..AiderSummary::default()
        };
        assert_eq!(
            failed_reason(decide_outcome(EXIT_0, &summary)),
            "the provider refused the API key (after being rate limited 1 time): \
             litellm.AuthenticationError: AuthenticationError: OpenAIException - bad key"
        );
    }

    #[test]
    fn aider_outcome_write_failure_fails_even_after_applied_edits() {
        let summary = AiderSummary {
            applied_edits: 1,
            write_failure: Some(
                "Unable to write file src/lib.rs: [Errno 13] Permission denied".into(),
            ),
            ..AiderSummary::default()
        };
        assert_eq!(
            failed_reason(decide_outcome(EXIT_0, &summary)),
            "Aider could not write a file: Unable to write file src/lib.rs: [Errno 13] Permission denied"
        );
    }

    #[test]
    fn aider_outcome_reflection_limit_fails_only_without_edits() {
        let mut summary = AiderSummary {
            reflections_exhausted: true,
            model_replies: 4,
            ..AiderSummary::default()
        };
        assert!(matches!(
            decide_outcome(EXIT_0, &summary),
            AiderOutcome::Failed { .. }
        ));
        summary.applied_edits = 1;
        assert_eq!(decide_outcome(EXIT_0, &summary), AiderOutcome::Succeeded);
    }

    #[test]
    fn aider_outcome_quotes_long_lines_cut_on_a_char_boundary() {
        let line = "é".repeat(QUOTE_MAX_CHARS + 10);
        let quoted = quote(&line);
        assert_eq!(quoted.chars().count(), QUOTE_MAX_CHARS + 1);
        assert!(quoted.ends_with('…'));
    }
}
