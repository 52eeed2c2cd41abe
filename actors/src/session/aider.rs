//! The Aider preset: the command line that runs Aider non-interactively (through the node's
//! gateway when there is one), the reading of its output into rate-limit and error signals, and
//! the outcome decided from what it printed — Aider exits 0 even when it gave up.
//!
//! Pure: no processes, no clocks, no I/O. The SessionActor feeds the parser the lines its runner
//! delivers and publishes what comes out.
//!
//! # What Aider prints
//!
//! Verified against Aider 0.86.2 (with litellm 1.81.10), in its sources and by running it against
//! a local OpenAI-compatible server answering 429, 401, 404, 400, 500 and Anthropic-shaped 429 and
//! 529 (transcripts in `actors/tests/fixtures/aider/`). With `--no-pretty` every message goes to
//! standard output as a plain line; standard error carries only Python's own tracebacks.
//!
//! When a model call fails, `Coder.send_message` (`aider/coders/base_coder.py`) prints, one per
//! line:
//!
//! 1. `str(err)`, litellm's message: `litellm.<Class>: …` (`litellm/exceptions.py`), usually
//!    followed by a provider tag (`litellm_core_utils/exception_mapping_utils.py`):
//!    `litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached for gpt-4o …`,
//!    `litellm.RateLimitError: AnthropicException - b'{"type": "error", …}'`,
//!    `litellm.InternalServerError: AnthropicError - …` (Anthropic 529),
//!    `litellm.NotFoundError: OpenAIException - The model … does not exist …`,
//!    `litellm.AuthenticationError: AuthenticationError: OpenAIException - Incorrect API key …`,
//!    `litellm.BadRequestError: OpenAIException - …`,
//!    `litellm.InternalServerError: InternalServerError: OpenAIException - Connection error.` (what
//!    a refused connection to an OpenAI-compatible base looks like). The message can span lines.
//! 2. The error's description, when Aider has one (`aider/exceptions.py`), e.g.
//!    `The API provider has rate limited you. Try again later or check your quotas.`,
//!    `The API provider's servers are down or overloaded.`,
//!    `The API provider is not able to authenticate you. Check your API key.`
//! 3. For a retryable error, `Retrying in {delay:.1f} seconds...`: the delay starts at 0.125 s and
//!    doubles before each retry, so it prints 0.2 (0.25 rounded to even), 0.5, 1.0, 2.0, 4.0, 8.0,
//!    16.0, 32.0. When the next delay would pass 60 s — or the error is not retryable
//!    (authentication, bad request, not found, context window, image fetch) — Aider gives up
//!    silently: lines 1 and 2 without a line 3, then links it offers and a blank line. There is
//!    no "gave up after N retries" text. Aider then returns from `main` with status 0.
//!
//! Commit messages (`Model.simple_send_with_retries`, `aider/models.py`) print the same three
//! lines with `print`, and after giving up, `Failed to generate commit message!`; Aider then
//! commits with `(no commit message provided)`.
//!
//! A context window that is too small shows as `Model <name> has hit a token limit!` (not as a
//! litellm line). Progress shows as `Applied edit to <path>` (`apply_updates`),
//! `Commit <hash> <message>` (`aider/repo.py`) and `Tokens: <n> sent, <m> received.` after each
//! completed reply (`calculate_and_show_tokens_and_cost`, also with cache and cost parts).
//!
//! # How the parser reads it
//!
//! - A `litellm.<Class>: …` line opens an error block: at the start of a line, or after text a
//!   streamed reply left without a line ending, but then only with a `…Exception - ` tag. The
//!   block takes continuation lines, then Aider's description line.
//! - `Retrying in N seconds...` closes the block as retried: a rate limit gives
//!   [`AiderSignal::RateLimited`] with `retry_in = N` (as printed, to a tenth of a second) at once;
//!   other errors are counted in [`AiderSummary::retries`] and give no signal.
//! - Any other line after the description (or, without a description, a blank line, a line
//!   Aider prints itself, or the 257th line of the message) closes the block as given up: a rate limit gives `RateLimited` with
//!   `retry_in = None`, and every kind gives [`AiderSignal::Error`]. A block still open when the
//!   process exits is given up too ([`AiderOutputParser::finish`]). So every rate-limit
//!   occurrence yields exactly one `RateLimited`, and no signal waits longer than the next line.
//! - The provider is the tag's name lower-cased (`OpenAIException` → `openai`,
//!   `AnthropicException`/`AnthropicError` → `anthropic`, `GeminiException` → `gemini`,
//!   `Vertex_aiException` → `vertex_ai`), else one inferred from a model name in the line
//!   (`gpt-…`, `o1`/`o3`/`o4…` → openai, `claude-…` → anthropic, `gemini-…` → gemini). Through
//!   the gateway Aider speaks OpenAI, so the tag says `openai` whichever provider the gateway
//!   used; the gateway's own `provider.rate_limited` events name that one.
//! - Only standard output is read (see [`AiderOutputParser::feed`]).
//!
//! Known limits: a model reply line that itself starts with `litellm.<Class>Error: ` or
//! `Applied edit to ` is read as Aider's. Errors Aider reports as a bare Python exception (its
//! generic `except Exception` path) are not recognised.
//!
//! # Outcome rules ([`decide_outcome`]), in order
//!
//! 1. Killed by a signal, or an exit code other than 0: failed (the reason adds the rate limits
//!    and the last error seen).
//! 2. A file Aider could not write (`Unable to write file …`): failed, even if `Applied edit to`
//!    follows (Aider prints that line for a file it failed to write).
//! 3. An error Aider gave up on, with no applied edit, commit or completed model reply after it:
//!    failed. A rate limit given up on reads `rate limited by <provider>: Aider gave up after N
//!    rate-limit errors (M retries)…`; other errors name their kind and any earlier rate limits.
//!    Errors followed by progress (a commit-message call that gave up, then the commit) do not
//!    fail the run.
//! 4. `Only N reflections allowed, stopping.` with no edit applied at all: failed.
//! 5. Otherwise succeeded — including rate limits that were retried and then got a reply. Only
//!    positive evidence of failure fails a run that exited 0.

mod command;
mod outcome;
mod output;

#[cfg(test)]
mod tests;

pub use command::{AIDER_PROGRAM, GATEWAY_HIDDEN_ENV, GatewayAccess, MESSAGE_FLAG, aider_command};
pub use outcome::{AiderOutcome, decide_outcome};
pub use output::{AiderError, AiderErrorKind, AiderOutputParser, AiderSignal, AiderSummary};

/// The Aider parser as a session's [`OutputInterpreter`](super::OutputInterpreter): rate limits
/// become `session.rate_limited` events, and the outcome comes from [`decide_outcome`].
#[derive(Debug, Default)]
pub struct AiderInterpreter {
    parser: AiderOutputParser,
}

impl AiderInterpreter {
    /// A fresh interpreter.
    pub fn new() -> Self {
        Self::default()
    }

    fn signals(signals: Vec<AiderSignal>) -> Vec<super::OutputSignal> {
        signals
            .into_iter()
            .filter_map(|signal| match signal {
                AiderSignal::RateLimited {
                    provider,
                    retry_in,
                    line,
                } => Some(super::OutputSignal::RateLimited {
                    provider,
                    retry_in,
                    line,
                }),
                AiderSignal::Error { .. } => None,
            })
            .collect()
    }
}

impl super::OutputInterpreter for AiderInterpreter {
    fn feed(&mut self, stream: crate::event::OutputStream, line: &str) -> Vec<super::OutputSignal> {
        Self::signals(self.parser.feed(stream, line))
    }

    fn finish(&mut self) -> Vec<super::OutputSignal> {
        Self::signals(self.parser.finish())
    }

    fn outcome(&self, exit: &super::ExitStatus) -> Option<Result<(), String>> {
        Some(match decide_outcome(*exit, &self.parser.summary()) {
            AiderOutcome::Succeeded => Ok(()),
            AiderOutcome::Failed { reason } => Err(reason),
        })
    }
}
