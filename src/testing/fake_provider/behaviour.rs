//! What the fake does with one request, parsed from a behaviour name.
//!
//! Names are kebab-case words with numbers as the last word (`429-retry-after-2`,
//! `slow-headers-300`); a `:` may stand for the last `-` (`fail-429-then-ok:2`). Parsing is
//! pure: this module never looks at a request, a clock or a socket.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What the fake does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer normally with the configured reply (`ok`, also `success`). The default.
    Success,
    /// Answer normally, replying with the last user message (`echo`).
    Echo,
    /// Answer with an error response shaped like the provider whose endpoint was called.
    Fail(Failure),
    /// Fail the first `times` requests that share an `x-fake-key` (or, without one, a model)
    /// with `first`, then answer normally (`fail-<behaviour>-then-ok:N`).
    FailThenOk {
        /// What the failing requests get; any behaviour except another `FailThenOk`.
        first: Box<Behaviour>,
        /// How many requests fail before the first success.
        times: u32,
    },
    /// Wait this long before sending anything, headers included (`slow-headers-MS`).
    SlowHeaders(Duration),
    /// Send the headers at once and the first body byte after this long (`slow-first-token-MS`).
    SlowFirstToken(Duration),
    /// Send the body in pieces with this long between them (`trickle-MS`).
    Trickle(Duration),
    /// Read the request, then drop the TCP connection with a reset and no response
    /// (`reset`, also `reset-before-headers`).
    ResetBeforeHeaders,
    /// Send the headers and part of the body, then close the connection without finishing it: a
    /// stream ends without its final event or `[DONE]` (`close-mid-stream`).
    CloseMidStream,
    /// Answer normally, but write the body in pieces cut through the middle of every JSON
    /// object and through every multi-byte UTF-8 character (`split-chunks`, also `split`).
    SplitChunks,
    /// Stream a few deltas, then the provider's in-stream error (Anthropic `event: error` with
    /// `overloaded_error`); a non-streaming request gets [`FailureKind::Overloaded`]
    /// (`stream-error`).
    StreamError,
    /// Stream only what comes before the first text (OpenAI's role chunk, Anthropic's
    /// `message_start` …; nothing for Gemini), then the provider's in-stream error (Anthropic
    /// `event: error` with `overloaded_error`); a non-streaming request gets
    /// [`FailureKind::Overloaded`] (`error-after-start`).
    ErrorAfterStart,
    /// Refuse the prompt by content filter: Gemini answers 200 with `promptFeedback.blockReason`
    /// `SAFETY` and no `candidates` (streamed: that one element); OpenAI and Anthropic answer
    /// their 400 `invalid_request_error` (`prompt-blocked`, also `blocked`).
    PromptBlocked,
}

/// An error response: what went wrong, and whether the body is wrapped in a JSON array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong; the provider shape decides status, headers and body.
    pub kind: FailureKind,
    /// Wrap the JSON error body in a one-element array, as Gemini sometimes does (name suffix
    /// `-array`, e.g. `429-retry-after-2-array`).
    pub array_wrapped: bool,
}

/// The failures the fake can answer with.
///
/// The status and body follow the endpoint that was called; see the table in
/// [the module documentation](super).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A per-minute rate limit (429), with an optional hint when to retry
    /// (`429`, `429-retry-after-S`, `429-retry-after-ms-MS`).
    RateLimited(Option<RetryAfter>),
    /// The account's quota or credit is spent; retrying will not help soon
    /// (`insufficient-quota`, also `per-day`).
    InsufficientQuota,
    /// The request alone is larger than the per-minute token limit (`request-too-large`).
    RequestTooLarge,
    /// The prompt does not fit the model's context window (`context-length-exceeded`).
    ContextLengthExceeded,
    /// The provider is overloaded (`overloaded`, also `529`).
    Overloaded,
    /// 500 Internal Server Error (`500`).
    InternalError,
    /// 502 Bad Gateway with an HTML body, as a proxy in front of a provider sends it (`502`).
    BadGateway,
    /// 503 Service Unavailable (`503`).
    Unavailable,
    /// 504 Gateway Timeout (`504`).
    GatewayTimeout,
}

/// When a rate-limited client may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// Whole seconds: a `retry-after` header, or Gemini's `RetryInfo.retryDelay` "Ns".
    Seconds(u64),
    /// Milliseconds: a `retry-after-ms` header, or Gemini's `RetryInfo.retryDelay` "N.NNNs".
    Millis(u64),
}

impl RetryAfter {
    /// The wait as a duration.
    pub fn as_duration(self) -> Duration {
        match self {
            Self::Seconds(seconds) => Duration::from_secs(seconds),
            Self::Millis(millis) => Duration::from_millis(millis),
        }
    }
}

/// A behaviour name that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BehaviourParseError {
    /// No behaviour has this name.
    #[error("unknown fake behaviour '{name}'; known: {KNOWN_BEHAVIOURS}")]
    Unknown {
        /// The name as given.
        name: String,
    },
    /// A number in the name is missing, not a number, or too large.
    #[error("fake behaviour '{name}' needs a whole number where it has '{word}'")]
    BadNumber {
        /// The name as given.
        name: String,
        /// The word that should have been a number.
        word: String,
    },
    /// `fail-…-then-ok` inside another `fail-…-then-ok`.
    #[error("fake behaviour '{name}' nests fail-…-then-ok; give the failure once")]
    Nested {
        /// The name as given.
        name: String,
    },
    /// The `-array` suffix on something that is not an error response.
    #[error("fake behaviour '{name}': the -array suffix only applies to error responses")]
    ArrayOnNonFailure {
        /// The name as given.
        name: String,
    },
}

/// Every name the parser knows, for error messages and documentation.
pub const KNOWN_BEHAVIOURS: &str = "ok, echo, 429, 429-retry-after-S, 429-retry-after-ms-MS, \
     insufficient-quota, request-too-large, context-length-exceeded, overloaded, 500, 502, 503, \
     504, slow-headers-MS, slow-first-token-MS, trickle-MS, reset, close-mid-stream, \
     split-chunks, stream-error, error-after-start, prompt-blocked, fail-<behaviour>-then-ok:N, \
     and <error>-array";

impl FromStr for Behaviour {
    type Err = BehaviourParseError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let normalised = name.trim().to_ascii_lowercase().replace(':', "-");
        let words: Vec<&str> = normalised.split('-').collect();
        parse_words(name, &words)
    }
}

fn parse_words(name: &str, words: &[&str]) -> Result<Behaviour, BehaviourParseError> {
    if let ["fail", first @ .., "then", "ok", times] = words {
        let first = parse_words(name, first)?;
        if matches!(first, Behaviour::FailThenOk { .. }) {
            return Err(BehaviourParseError::Nested {
                name: name.to_owned(),
            });
        }
        let times = number(name, times)?;
        let times = u32::try_from(times).map_err(|_| bad_number(name, &times.to_string()))?;
        return Ok(Behaviour::FailThenOk {
            first: Box::new(first),
            times,
        });
    }
    let (words, array_wrapped) = match words {
        [rest @ .., "array"] => (rest, true),
        _ => (words, false),
    };
    let fail = |kind| {
        Ok(Behaviour::Fail(Failure {
            kind,
            array_wrapped,
        }))
    };
    let millis = |word: &&str| number(name, word).map(Duration::from_millis);
    let behaviour = match words {
        ["ok"] | ["success"] => Ok(Behaviour::Success),
        ["echo"] => Ok(Behaviour::Echo),
        ["429"] => fail(FailureKind::RateLimited(None)),
        ["429", "retry", "after", "ms", n] => fail(FailureKind::RateLimited(Some(
            RetryAfter::Millis(number(name, n)?),
        ))),
        ["429", "retry", "after", n] => fail(FailureKind::RateLimited(Some(RetryAfter::Seconds(
            number(name, n)?,
        )))),
        ["insufficient", "quota"] | ["per", "day"] => fail(FailureKind::InsufficientQuota),
        ["request", "too", "large"] => fail(FailureKind::RequestTooLarge),
        ["context", "length", "exceeded"] => fail(FailureKind::ContextLengthExceeded),
        ["overloaded"] | ["529"] => fail(FailureKind::Overloaded),
        ["500"] => fail(FailureKind::InternalError),
        ["502"] => fail(FailureKind::BadGateway),
        ["503"] => fail(FailureKind::Unavailable),
        ["504"] => fail(FailureKind::GatewayTimeout),
        ["slow", "headers", n] => Ok(Behaviour::SlowHeaders(millis(n)?)),
        ["slow", "first", "token", n] => Ok(Behaviour::SlowFirstToken(millis(n)?)),
        ["trickle", n] => Ok(Behaviour::Trickle(millis(n)?)),
        ["reset"] | ["reset", "before", "headers"] => Ok(Behaviour::ResetBeforeHeaders),
        ["close", "mid", "stream"] => Ok(Behaviour::CloseMidStream),
        ["split"] | ["split", "chunks"] => Ok(Behaviour::SplitChunks),
        ["stream", "error"] => Ok(Behaviour::StreamError),
        ["error", "after", "start"] => Ok(Behaviour::ErrorAfterStart),
        ["prompt", "blocked"] | ["blocked"] => Ok(Behaviour::PromptBlocked),
        _ => Err(BehaviourParseError::Unknown {
            name: name.to_owned(),
        }),
    }?;
    if array_wrapped && !matches!(behaviour, Behaviour::Fail(_)) {
        return Err(BehaviourParseError::ArrayOnNonFailure {
            name: name.to_owned(),
        });
    }
    Ok(behaviour)
}

fn number(name: &str, word: &str) -> Result<u64, BehaviourParseError> {
    word.parse().map_err(|_| bad_number(name, word))
}

fn bad_number(name: &str, word: &str) -> BehaviourParseError {
    BehaviourParseError::BadNumber {
        name: name.to_owned(),
        word: word.to_owned(),
    }
}

/// Prints the canonical name, which parses back to the same behaviour.
impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Success => f.write_str("ok"),
            Self::Echo => f.write_str("echo"),
            Self::Fail(failure) => failure.fmt(f),
            Self::FailThenOk { first, times } => write!(f, "fail-{first}-then-ok:{times}"),
            Self::SlowHeaders(d) => write!(f, "slow-headers-{}", d.as_millis()),
            Self::SlowFirstToken(d) => write!(f, "slow-first-token-{}", d.as_millis()),
            Self::Trickle(d) => write!(f, "trickle-{}", d.as_millis()),
            Self::ResetBeforeHeaders => f.write_str("reset"),
            Self::CloseMidStream => f.write_str("close-mid-stream"),
            Self::SplitChunks => f.write_str("split-chunks"),
            Self::StreamError => f.write_str("stream-error"),
            Self::ErrorAfterStart => f.write_str("error-after-start"),
            Self::PromptBlocked => f.write_str("prompt-blocked"),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::RateLimited(None) => f.write_str("429"),
            FailureKind::RateLimited(Some(RetryAfter::Seconds(s))) => {
                write!(f, "429-retry-after-{s}")
            }
            FailureKind::RateLimited(Some(RetryAfter::Millis(ms))) => {
                write!(f, "429-retry-after-ms-{ms}")
            }
            FailureKind::InsufficientQuota => f.write_str("insufficient-quota"),
            FailureKind::RequestTooLarge => f.write_str("request-too-large"),
            FailureKind::ContextLengthExceeded => f.write_str("context-length-exceeded"),
            FailureKind::Overloaded => f.write_str("overloaded"),
            FailureKind::InternalError => f.write_str("500"),
            FailureKind::BadGateway => f.write_str("502"),
            FailureKind::Unavailable => f.write_str("503"),
            FailureKind::GatewayTimeout => f.write_str("504"),
        }?;
        if self.array_wrapped {
            f.write_str("-array")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str) -> Behaviour {
        name.parse().unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn fail(kind: FailureKind) -> Behaviour {
        Behaviour::Fail(Failure {
            kind,
            array_wrapped: false,
        })
    }

    #[test]
    fn names_parse_to_their_behaviours() {
        assert_eq!(parse("ok"), Behaviour::Success);
        assert_eq!(parse("Success"), Behaviour::Success);
        assert_eq!(
            parse("429-retry-after-2"),
            fail(FailureKind::RateLimited(Some(RetryAfter::Seconds(2))))
        );
        assert_eq!(
            parse("429-retry-after-ms-250"),
            fail(FailureKind::RateLimited(Some(RetryAfter::Millis(250))))
        );
        assert_eq!(parse("429"), fail(FailureKind::RateLimited(None)));
        assert_eq!(parse("529"), fail(FailureKind::Overloaded));
        assert_eq!(parse("per-day"), fail(FailureKind::InsufficientQuota));
        assert_eq!(
            parse("slow-headers:300"),
            Behaviour::SlowHeaders(Duration::from_millis(300))
        );
        assert_eq!(
            parse("429-retry-after-2-array"),
            Behaviour::Fail(Failure {
                kind: FailureKind::RateLimited(Some(RetryAfter::Seconds(2))),
                array_wrapped: true,
            })
        );
        assert_eq!(
            parse("fail-429-then-ok:2"),
            Behaviour::FailThenOk {
                first: Box::new(fail(FailureKind::RateLimited(None))),
                times: 2
            }
        );
        assert_eq!(
            parse("fail-reset-then-ok-1"),
            Behaviour::FailThenOk {
                first: Box::new(Behaviour::ResetBeforeHeaders),
                times: 1
            }
        );
    }

    #[test]
    fn every_canonical_name_round_trips() {
        for name in [
            "ok",
            "echo",
            "429",
            "429-retry-after-2",
            "429-retry-after-ms-250",
            "insufficient-quota",
            "request-too-large",
            "context-length-exceeded",
            "overloaded",
            "500",
            "502",
            "503",
            "504",
            "slow-headers-300",
            "slow-first-token-200",
            "trickle-20",
            "reset",
            "close-mid-stream",
            "split-chunks",
            "stream-error",
            "error-after-start",
            "prompt-blocked",
            "429-retry-after-2-array",
            "insufficient-quota-array",
            "fail-429-retry-after-ms-100-then-ok:3",
            "fail-slow-headers-50-then-ok:1",
            "fail-error-after-start-then-ok:1",
        ] {
            assert_eq!(parse(name).to_string(), name);
        }
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        let unknown = "nonsense".parse::<Behaviour>().unwrap_err();
        assert!(matches!(unknown, BehaviourParseError::Unknown { .. }));
        assert!(unknown.to_string().contains("known: ok, echo"), "{unknown}");
        assert!(matches!(
            "429-retry-after-soon".parse::<Behaviour>(),
            Err(BehaviourParseError::BadNumber { word, .. }) if word == "soon"
        ));
        assert!(matches!(
            "slow-headers".parse::<Behaviour>(),
            Err(BehaviourParseError::Unknown { .. })
        ));
        assert!(matches!(
            "fail-fail-429-then-ok:1-then-ok:1".parse::<Behaviour>(),
            Err(BehaviourParseError::Nested { .. })
        ));
        assert!(matches!(
            "echo-array".parse::<Behaviour>(),
            Err(BehaviourParseError::ArrayOnNonFailure { .. })
        ));
        assert!(matches!(
            "fail-429-then-ok:99999999999".parse::<Behaviour>(),
            Err(BehaviourParseError::BadNumber { .. })
        ));
    }
}
