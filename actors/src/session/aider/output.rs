//! Reading Aider's output line by line: rate limits, errors it gave up on, and signs of progress.
//!
//! Pure: fed lines, returns signals and keeps a bounded summary (counters and at most a few
//! lines). See the parent module for the exact strings and where they come from.

use std::time::Duration;

use crate::event::OutputStream;

/// Something worth telling the session about, read from Aider's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AiderSignal {
    /// The provider rate-limited Aider (one per occurrence, retried or not).
    RateLimited {
        /// The provider the line names, lower-cased (`openai`, `anthropic`, `gemini`,
        /// `vertex_ai`…), else one inferred from a model name in the line.
        provider: Option<String>,
        /// How long Aider said it waits before retrying (as printed, to a tenth of a second);
        /// `None` when it did not retry (it gave up, or exited).
        retry_in: Option<Duration>,
        /// The line that reported it (the `litellm.RateLimitError: …` line when there is one).
        line: String,
    },
    /// An error Aider did not retry: it gave up on the request.
    Error {
        /// What went wrong.
        kind: AiderErrorKind,
        /// The line that reported it.
        line: String,
    },
}

/// What kind of error Aider gave up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AiderErrorKind {
    /// `RateLimitError`, `RouterRateLimitError`: rate limited until Aider stopped retrying.
    RateLimit,
    /// `AuthenticationError`, `PermissionDeniedError`: the key was refused.
    Authentication,
    /// `NotFoundError`: usually an unknown model.
    NotFound,
    /// `BadRequestError` and the other refusals of the request itself (unprocessable entity,
    /// unsupported parameters, content policy, image fetch).
    BadRequest,
    /// The context window (or output limit) is exhausted: `ContextWindowExceededError`, or
    /// Aider's `Model … has hit a token limit!`.
    ContextWindowExceeded,
    /// `APIConnectionError`, given up after retries.
    Connection,
    /// `Timeout`, given up after retries.
    Timeout,
    /// `InternalServerError`, `ServiceUnavailableError`, `BadGatewayError`, `APIError`: given up
    /// after retries. (litellm reports a refused connection to an OpenAI-compatible base as
    /// `InternalServerError … Connection error.`)
    ServerError,
    /// Aider could not write an edited file (`Unable to write file …`).
    FileWrite,
    /// Any other `litellm.…Error` Aider gave up on.
    Other,
}

impl AiderErrorKind {
    /// A short description, for reasons shown to users.
    pub fn describe(self) -> &'static str {
        match self {
            Self::RateLimit => "rate limited",
            Self::Authentication => "the provider refused the API key",
            Self::NotFound => "the provider does not know the model",
            Self::BadRequest => "the provider rejected the request",
            Self::ContextWindowExceeded => "the model's token limit was hit",
            Self::Connection => "Aider could not connect to the provider",
            Self::Timeout => "the provider timed out",
            Self::ServerError => "the provider's servers failed",
            Self::FileWrite => "Aider could not write a file",
            Self::Other => "Aider stopped on an error",
        }
    }
}

/// An error Aider gave up on, as kept in the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AiderError {
    /// What went wrong.
    pub kind: AiderErrorKind,
    /// The line that reported it.
    pub line: String,
}

/// What the output showed, in counters and a few lines: the input of
/// [`decide_outcome`](super::decide_outcome).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AiderSummary {
    /// Rate-limit occurrences (retried or not).
    pub rate_limits: u32,
    /// The provider named by the last rate limit that named one.
    pub rate_limit_provider: Option<String>,
    /// `Retrying in N seconds...` lines (rate limits and other transient errors).
    pub retries: u32,
    /// `Applied edit to …` lines.
    pub applied_edits: u32,
    /// `Commit <hash> …` lines.
    pub commits: u32,
    /// Completed model replies (`Tokens: … N received.` with N > 0).
    pub model_replies: u32,
    /// The last error Aider gave up on, if no edit, commit or model reply came after it.
    pub fatal_error: Option<AiderError>,
    /// The first `Unable to write file …` line: an edit that is not on disk, whatever follows.
    pub write_failure: Option<String>,
    /// Aider printed `Only N reflections allowed, stopping.`
    pub reflections_exhausted: bool,
    /// `Empty response received from LLM…` warnings.
    pub empty_responses: u32,
}

/// Reads Aider's output line by line (see the parent module for the rules).
#[derive(Debug, Clone, Default)]
pub struct AiderOutputParser {
    summary: AiderSummary,
    pending: Option<Pending>,
}

impl AiderOutputParser {
    /// A parser that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one line (without its line ending). Only standard output is read: Aider prints every
    /// message there, and lines of another stream, arriving through another pipe, cannot be
    /// placed in order with it.
    pub fn feed(&mut self, stream: OutputStream, line: &str) -> Vec<AiderSignal> {
        let mut signals = Vec::new();
        if stream != OutputStream::Stdout {
            return signals;
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        let kind = classify(line);

        if let Some(pending) = self.pending.take() {
            match kind {
                Line::Retrying(delay) => {
                    self.resolve_retried(pending, delay, &mut signals);
                    return signals;
                }
                Line::Description(described) if !pending.described => {
                    self.pending = Some(Pending {
                        described: true,
                        // A rate-limit description outranks a vaguer class name.
                        kind: if described == AiderErrorKind::RateLimit {
                            described
                        } else {
                            pending.kind
                        },
                        ..pending
                    });
                    return signals;
                }
                Line::Unknown
                    if !pending.described
                        && pending.continuation_lines < MAX_CONTINUATION_LINES =>
                {
                    // A continuation line of a multi-line error message.
                    self.pending = Some(Pending {
                        continuation_lines: pending.continuation_lines + 1,
                        ..pending
                    });
                    return signals;
                }
                // The block ended without a retry: Aider gave up on that request.
                _ => signals.extend(gave_up(&mut self.summary, pending)),
            }
        }

        match kind {
            Line::Litellm(error) => {
                self.pending = Some(Pending {
                    kind: error.kind,
                    provider: error.provider,
                    line: line.to_owned(),
                    described: false,
                    continuation_lines: 0,
                });
            }
            Line::Description(kind) => {
                // The description without its error line (cut, or printed by another path).
                self.pending = Some(Pending {
                    kind,
                    provider: None,
                    line: line.to_owned(),
                    described: true,
                    continuation_lines: 0,
                });
            }
            Line::Retrying(_) => self.summary.retries += 1,
            Line::TokenLimit => {
                self.fatal(AiderErrorKind::ContextWindowExceeded, line, &mut signals);
            }
            Line::WriteFailure => {
                if self.summary.write_failure.is_none() {
                    self.summary.write_failure = Some(line.to_owned());
                }
                self.fatal(AiderErrorKind::FileWrite, line, &mut signals);
            }
            Line::ReflectionsExhausted => self.summary.reflections_exhausted = true,
            Line::EmptyResponse => self.summary.empty_responses += 1,
            Line::AppliedEdit => {
                self.summary.applied_edits += 1;
                self.summary.fatal_error = None;
            }
            Line::Commit => {
                self.summary.commits += 1;
                self.summary.fatal_error = None;
            }
            Line::ModelReply => {
                self.summary.model_replies += 1;
                self.summary.fatal_error = None;
            }
            Line::Blank | Line::CommitMessageFailed | Line::Unknown => {}
        }
        signals
    }

    /// The process exited: an error block still open was given up on. Returns its signals.
    /// Calling it again returns nothing.
    pub fn finish(&mut self) -> Vec<AiderSignal> {
        match self.pending.take() {
            Some(pending) => gave_up(&mut self.summary, pending),
            None => Vec::new(),
        }
    }

    /// What the output showed so far, counting an error block still open as given up (which is
    /// what it is once the process has exited).
    pub fn summary(&self) -> AiderSummary {
        let mut summary = self.summary.clone();
        if let Some(pending) = self.pending.clone() {
            gave_up(&mut summary, pending);
        }
        summary
    }

    fn resolve_retried(
        &mut self,
        pending: Pending,
        delay: Duration,
        signals: &mut Vec<AiderSignal>,
    ) {
        self.summary.retries += 1;
        if pending.kind == AiderErrorKind::RateLimit {
            count_rate_limit(&mut self.summary, &pending);
            signals.push(AiderSignal::RateLimited {
                provider: pending.provider,
                retry_in: Some(delay),
                line: pending.line,
            });
        }
    }

    fn fatal(&mut self, kind: AiderErrorKind, line: &str, signals: &mut Vec<AiderSignal>) {
        self.summary.fatal_error = Some(AiderError {
            kind,
            line: line.to_owned(),
        });
        signals.push(AiderSignal::Error {
            kind,
            line: line.to_owned(),
        });
    }
}

/// An error block whose fate (retried or given up) is not known yet.
#[derive(Debug, Clone)]
struct Pending {
    kind: AiderErrorKind,
    provider: Option<String>,
    line: String,
    /// Aider's description line was printed: the next line is `Retrying…` or not.
    described: bool,
    /// Lines of the error message after its first.
    continuation_lines: u32,
}

/// An error message longer than this (a traceback, say) is taken as ended: the block is closed
/// as given up rather than held open for ever.
const MAX_CONTINUATION_LINES: u32 = 256;

/// What one line of output is.
enum Line {
    Blank,
    /// `litellm.<Class>: …`
    Litellm(LitellmError),
    /// One of Aider's descriptions of an error.
    Description(AiderErrorKind),
    /// `Retrying in N seconds...`
    Retrying(Duration),
    /// `Model … has hit a token limit!`
    TokenLimit,
    /// `Unable to write file …`
    WriteFailure,
    /// `Only N reflections allowed, stopping.`
    ReflectionsExhausted,
    /// `Empty response received from LLM. Check your provider account?`
    EmptyResponse,
    /// `Failed to generate commit message!` (follows a weak-model error Aider gave up on)
    CommitMessageFailed,
    /// `Applied edit to …`
    AppliedEdit,
    /// `Commit <hash> …`
    Commit,
    /// `Tokens: … N received.` with N > 0
    ModelReply,
    /// Anything else: model replies, banners, continuation lines of an error.
    Unknown,
}

fn classify(line: &str) -> Line {
    if line.trim().is_empty() {
        Line::Blank
    } else if let Some(error) = litellm_error(line) {
        Line::Litellm(error)
    } else if let Some(kind) = description_kind(line) {
        Line::Description(kind)
    } else if let Some(delay) = retry_delay(line) {
        Line::Retrying(delay)
    } else if line.starts_with("Model ") && line.ends_with(" has hit a token limit!") {
        Line::TokenLimit
    } else if line.starts_with("Unable to write file ") {
        Line::WriteFailure
    } else if line.starts_with("Only ") && line.ends_with(" reflections allowed, stopping.") {
        Line::ReflectionsExhausted
    } else if line.starts_with("Empty response received from LLM") {
        Line::EmptyResponse
    } else if line == "Failed to generate commit message!" {
        Line::CommitMessageFailed
    } else if line.starts_with("Applied edit to ") {
        Line::AppliedEdit
    } else if is_commit(line) {
        Line::Commit
    } else if is_model_reply(line) {
        Line::ModelReply
    } else {
        Line::Unknown
    }
}

fn gave_up(summary: &mut AiderSummary, pending: Pending) -> Vec<AiderSignal> {
    let mut signals = Vec::with_capacity(2);
    if pending.kind == AiderErrorKind::RateLimit {
        count_rate_limit(summary, &pending);
        signals.push(AiderSignal::RateLimited {
            provider: pending.provider,
            retry_in: None,
            line: pending.line.clone(),
        });
    }
    summary.fatal_error = Some(AiderError {
        kind: pending.kind,
        line: pending.line.clone(),
    });
    signals.push(AiderSignal::Error {
        kind: pending.kind,
        line: pending.line,
    });
    signals
}

fn count_rate_limit(summary: &mut AiderSummary, pending: &Pending) {
    summary.rate_limits += 1;
    if pending.provider.is_some() {
        summary.rate_limit_provider.clone_from(&pending.provider);
    }
}

/// A `litellm.<Class>: …` line.
struct LitellmError {
    kind: AiderErrorKind,
    provider: Option<String>,
}

const LITELLM: &str = "litellm.";

/// Recognises `litellm.<Class>: …` at the start of a line, or after text that a streamed reply
/// left without a line ending (then only with a provider tag, `…Exception - `, so that a model
/// reply merely mentioning `litellm.RateLimitError:` does not count).
fn litellm_error(line: &str) -> Option<LitellmError> {
    let start = line.find(LITELLM)?;
    let (class, after) = line[start + LITELLM.len()..].split_once(": ")?;
    if !is_class_name(class) {
        return None;
    }
    let tag = provider_tag(after);
    if start > 0 && tag.is_none() {
        return None;
    }
    Some(LitellmError {
        kind: class_kind(class),
        provider: tag.or_else(|| provider_from_model(after)),
    })
}

fn is_class_name(word: &str) -> bool {
    !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric())
        && ((word.len() > "Error".len() && word.ends_with("Error")) || word == "Timeout")
}

fn class_kind(class: &str) -> AiderErrorKind {
    use AiderErrorKind::*;
    match class {
        "RateLimitError" | "RouterRateLimitError" => RateLimit,
        "AuthenticationError" | "PermissionDeniedError" => Authentication,
        "NotFoundError" => NotFound,
        "BadRequestError"
        | "UnprocessableEntityError"
        | "UnsupportedParamsError"
        | "InvalidRequestError"
        | "ContentPolicyViolationError"
        | "ImageFetchError"
        | "JSONSchemaValidationError"
        | "RejectedRequestError" => BadRequest,
        "ContextWindowExceededError" => ContextWindowExceeded,
        "APIConnectionError" => Connection,
        "Timeout" => Timeout,
        "InternalServerError"
        | "ServiceUnavailableError"
        | "BadGatewayError"
        | "APIError"
        | "OpenAIError"
        | "AzureOpenAIError"
        | "APIResponseValidationError" => ServerError,
        _ => Other,
    }
}

/// The provider tag litellm puts before ` - `: `OpenAIException`, `AnthropicException`,
/// `AnthropicError`, `GeminiException`, `Vertex_aiException`…, after any repeated class names
/// (`RateLimitError: OpenAIException - …`, `litellm.RateLimitError: Vertex_aiException - …`).
fn provider_tag(after: &str) -> Option<String> {
    let mut rest = after;
    loop {
        let unprefixed = rest.strip_prefix(LITELLM).unwrap_or(rest);
        match unprefixed.split_once(": ") {
            Some((head, tail))
                if !head.is_empty()
                    && head.split(' ').all(|word| {
                        !word.is_empty() && word.chars().all(char::is_alphanumeric)
                    }) =>
            {
                rest = tail;
            }
            _ => break,
        }
    }
    let (word, tail) = rest.split_once(' ')?;
    if !(tail.starts_with("- ") || tail.contains(" - ")) {
        return None;
    }
    let name = word
        .strip_suffix("Exception")
        .or_else(|| word.strip_suffix("Error"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let name = name.to_ascii_lowercase();
    Some(match name.as_str() {
        "vertexai" | "vertex_ai_beta" => "vertex_ai".to_owned(),
        _ => name,
    })
}

/// A provider inferred from a well-known model name in the text (`… for gpt-4o …`).
fn provider_from_model(text: &str) -> Option<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        .find_map(|word| {
            let word = word.to_ascii_lowercase();
            let provider = if word.starts_with("gpt-")
                || word.starts_with("chatgpt-")
                || ["o1", "o3", "o4"]
                    .iter()
                    .any(|o| word == *o || word.starts_with(&format!("{o}-")))
            {
                "openai"
            } else if word.starts_with("claude-") {
                "anthropic"
            } else if word.starts_with("gemini-") {
                "gemini"
            } else {
                return None;
            };
            Some(provider.to_owned())
        })
}

/// The descriptions Aider prints under an error (`aider/exceptions.py`, and `get_ex_info`).
fn description_kind(line: &str) -> Option<AiderErrorKind> {
    use AiderErrorKind::*;
    Some(match line.trim() {
        "The API provider has rate limited you. Try again later or check your quotas." => RateLimit,
        "The API provider's servers are down or overloaded." => ServerError,
        "The API provider is not able to authenticate you. Check your API key." => Authentication,
        "The API provider timed out without returning a response. They may be down or overloaded." => {
            Timeout
        }
        "The API provider has refused the request due to a safety policy about the content."
        | "The API provider was unable to fetch one or more images." => BadRequest,
        "OpenRouter or the upstream API provider is down, overloaded or rate limiting your requests." => {
            Connection
        }
        "Insufficient credits with the API provider. Please add credits."
        | "You need to: pip install boto3" => Other,
        _ => return None,
    })
}

/// `Retrying in 0.2 seconds...` (Aider prints the delay with one decimal).
fn retry_delay(line: &str) -> Option<Duration> {
    let seconds: f64 = line
        .trim()
        .strip_prefix("Retrying in ")?
        .strip_suffix(" seconds...")?
        .parse()
        .ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// `Commit 1477f06 feat: Add greet function`.
fn is_commit(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("Commit ") else {
        return false;
    };
    let Some((hash, _message)) = rest.split_once(' ') else {
        return false;
    };
    (7..=40).contains(&hash.len()) && hash.chars().all(|c| c.is_ascii_hexdigit())
}

/// `Tokens: 651 sent, 28 received.` (also with cache and cost parts) with a non-zero count.
fn is_model_reply(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("Tokens: ") else {
        return false;
    };
    let Some(end) = rest.find(" received.") else {
        return false;
    };
    // `28`, `1.2k`, `12k`, `1.1M`: any non-zero digit before the unit.
    let count = rest[..end].rsplit([' ', ',']).next().unwrap_or("");
    count
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .any(|c| matches!(c, '1'..='9'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(lines: &[&str]) -> (Vec<AiderSignal>, AiderParserCheck) {
        let mut parser = AiderOutputParser::new();
        let mut signals = Vec::new();
        for line in lines {
            signals.extend(parser.feed(OutputStream::Stdout, line));
        }
        let before_finish = signals.len();
        signals.extend(parser.finish());
        let summary = parser.summary();
        (
            signals,
            AiderParserCheck {
                before_finish,
                summary,
            },
        )
    }

    struct AiderParserCheck {
        before_finish: usize,
        summary: AiderSummary,
    }

    const OPENAI_429: &str = "litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached for gpt-4o in organization org-abc123 on requests per min (RPM): Limit 3, Used 3, Requested 1.";
    const RATE_LIMITED: &str =
        "The API provider has rate limited you. Try again later or check your quotas.";

    #[test]
    fn aider_rate_limit_is_signalled_on_its_retrying_line() {
        let mut parser = AiderOutputParser::new();
        assert!(parser.feed(OutputStream::Stdout, OPENAI_429).is_empty());
        assert!(parser.feed(OutputStream::Stdout, RATE_LIMITED).is_empty());
        assert_eq!(
            parser.feed(OutputStream::Stdout, "Retrying in 0.5 seconds..."),
            vec![AiderSignal::RateLimited {
                provider: Some("openai".into()),
                retry_in: Some(Duration::from_millis(500)),
                line: OPENAI_429.into(),
            }]
        );
        assert!(parser.finish().is_empty());
        let summary = parser.summary();
        assert_eq!(summary.rate_limits, 1);
        assert_eq!(summary.retries, 1);
        assert_eq!(summary.fatal_error, None);
    }

    #[test]
    fn aider_rate_limit_given_up_is_signalled_on_the_next_line() {
        let mut parser = AiderOutputParser::new();
        parser.feed(OutputStream::Stdout, OPENAI_429);
        parser.feed(OutputStream::Stdout, RATE_LIMITED);
        let signals = parser.feed(OutputStream::Stdout, "");
        assert_eq!(
            signals,
            vec![
                AiderSignal::RateLimited {
                    provider: Some("openai".into()),
                    retry_in: None,
                    line: OPENAI_429.into(),
                },
                AiderSignal::Error {
                    kind: AiderErrorKind::RateLimit,
                    line: OPENAI_429.into(),
                },
            ]
        );
        assert_eq!(
            parser.summary().fatal_error.map(|error| error.kind),
            Some(AiderErrorKind::RateLimit)
        );
    }

    #[test]
    fn aider_error_block_open_at_exit_is_given_up_by_finish() {
        let mut parser = AiderOutputParser::new();
        parser.feed(OutputStream::Stdout, OPENAI_429);
        // The summary already counts it as given up; finish() emits its signals once.
        assert_eq!(parser.summary().rate_limits, 1);
        assert_eq!(parser.finish().len(), 2);
        assert!(parser.finish().is_empty());
        assert_eq!(parser.summary().rate_limits, 1);
    }

    #[test]
    fn aider_multi_line_error_waits_for_a_blank_line() {
        let (signals, check) = feed_all(&[
            "litellm.APIConnectionError: OllamaException - Traceback (most recent call last):",
            "  File \"x.py\", line 3, in f",
            "ConnectionRefusedError: [Errno 111] Connection refused",
            "Retrying in 0.2 seconds...",
            "litellm.APIConnectionError: OllamaException - Traceback (most recent call last):",
            "ConnectionRefusedError: [Errno 111] Connection refused",
            "",
        ]);
        assert_eq!(check.before_finish, 1);
        assert_eq!(
            signals,
            vec![AiderSignal::Error {
                kind: AiderErrorKind::Connection,
                line: "litellm.APIConnectionError: OllamaException - Traceback (most recent call last):".into(),
            }]
        );
        assert_eq!(check.summary.retries, 1);
        assert_eq!(check.summary.rate_limits, 0);
    }

    #[test]
    fn aider_error_block_is_not_held_open_for_ever() {
        let mut parser = AiderOutputParser::new();
        parser.feed(
            OutputStream::Stdout,
            "litellm.APIConnectionError: OllamaException - Traceback (most recent call last):",
        );
        for _ in 0..MAX_CONTINUATION_LINES {
            assert!(
                parser
                    .feed(OutputStream::Stdout, "  File \"x.py\"")
                    .is_empty()
            );
        }
        assert_eq!(
            parser.feed(OutputStream::Stdout, "  File \"x.py\"").len(),
            1,
            "given up after the longest message"
        );
    }

    #[test]
    fn aider_progress_after_an_error_clears_it() {
        let (_, check) = feed_all(&[
            OPENAI_429,
            RATE_LIMITED,
            "Failed to generate commit message!",
            "Commit 1477f06 (no commit message provided)",
        ]);
        assert_eq!(check.summary.fatal_error, None);
        assert_eq!(check.summary.commits, 1);
        assert_eq!(check.summary.rate_limits, 1);

        // An error without a description line ends at the next line Aider prints itself.
        let (signals, check) = feed_all(&[
            "Applied edit to hello.py",
            "litellm.NotFoundError: OpenAIException - The model `fake-m9` does not exist or you do not have access to it.",
            "Failed to generate commit message!",
            "Commit 1477f06 (no commit message provided)",
        ]);
        assert_eq!(check.before_finish, 1);
        assert!(matches!(
            signals[0],
            AiderSignal::Error {
                kind: AiderErrorKind::NotFound,
                ..
            }
        ));
        assert_eq!(check.summary.fatal_error, None);
    }

    #[test]
    fn aider_stderr_is_not_parsed() {
        let mut parser = AiderOutputParser::new();
        assert!(parser.feed(OutputStream::Stderr, OPENAI_429).is_empty());
        assert!(parser.finish().is_empty());
        assert_eq!(parser.summary(), AiderSummary::default());
    }

    #[test]
    fn aider_provider_tags_are_normalised() {
        let cases = [
            (OPENAI_429, Some("openai")),
            (
                "litellm.RateLimitError: AnthropicException - b'{\"type\": \"error\"}'",
                Some("anthropic"),
            ),
            (
                "litellm.InternalServerError: AnthropicError - b'{\"type\": \"error\"}'",
                Some("anthropic"),
            ),
            (
                "litellm.RateLimitError: litellm.RateLimitError: Vertex_aiException - {\"error\": {\"code\": 429}}",
                Some("vertex_ai"),
            ),
            (
                "litellm.RateLimitError: litellm.RateLimitError: GeminiException - {\"error\": {\"code\": 429, \"status\": \"RESOURCE_EXHAUSTED\"}}",
                Some("gemini"),
            ),
            (
                "litellm.Timeout: Timeout Error: OpenAIException - Request timed out.",
                Some("openai"),
            ),
            (
                "litellm.RateLimitError: Rate limit reached for claude-sonnet-4-5",
                Some("anthropic"),
            ),
            ("litellm.RateLimitError: slow down", None),
        ];
        for (line, provider) in cases {
            let error = litellm_error(line).unwrap_or_else(|| panic!("not recognised: {line}"));
            assert_eq!(error.provider.as_deref(), provider, "{line}");
        }
    }

    #[test]
    fn aider_litellm_lines_are_recognised_only_in_their_shape() {
        // Mid-line (after a streamed reply without a line ending), with a provider tag.
        let glued = "Here is the planlitellm.APIConnectionError: APIConnectionError: OpenAIException - Connection error.";
        assert_eq!(
            litellm_error(glued).map(|error| error.kind),
            Some(AiderErrorKind::Connection)
        );
        // A reply mentioning the class is not an error.
        for line in [
            "Catch litellm.RateLimitError: it is raised on 429.",
            "    except litellm.RateLimitError:",
            "litellm.rate_limit: 3",
            "litellm.Error: x",
        ] {
            assert!(litellm_error(line).is_none(), "{line}");
        }
    }

    #[test]
    fn aider_retry_delays_parse_as_printed() {
        for (line, millis) in [
            ("Retrying in 0.2 seconds...", 200),
            ("Retrying in 0.5 seconds...", 500),
            ("Retrying in 1.0 seconds...", 1000),
            ("Retrying in 32.0 seconds...", 32_000),
        ] {
            assert_eq!(retry_delay(line), Some(Duration::from_millis(millis)));
        }
        for line in [
            "Retrying in soon seconds...",
            "Retrying in -1.0 seconds...",
            "Retrying in 0.5 seconds",
        ] {
            assert_eq!(retry_delay(line), None, "{line}");
        }
    }

    #[test]
    fn aider_progress_lines() {
        assert!(is_commit("Commit 1477f06 feat: Add greet function"));
        assert!(!is_commit("Commit edits to the repo"));
        assert!(is_model_reply("Tokens: 651 sent, 28 received."));
        assert!(is_model_reply(
            "Tokens: 2.3k sent, 1.1k cache write, 12k cache hit, 340 received. Cost: $0.0045 message, $0.01 session."
        ));
        assert!(is_model_reply("Tokens: 12k sent, 1.2k received."));
        assert!(!is_model_reply("Tokens: 651 sent, 0 received."));
        assert!(!is_model_reply("Tokens: lots"));
    }
}
