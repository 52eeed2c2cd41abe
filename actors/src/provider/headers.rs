//! Parsing of providers' rate-limit and retry headers into plain values.
//!
//! Takes header (name, value) pairs as strings, so it needs no HTTP crate, and an explicit
//! `now_wall` for absolute timestamps. A malformed value is ignored (read as absent); nothing
//! here panics on what a provider sends.

use std::time::{Duration, SystemTime};

/// What a provider's rate-limit headers say about its budget. Absent or malformed headers are
/// `None`.
///
/// Resets are relative: how long until that budget is full again (OpenAI sends them that way;
/// Anthropic's timestamps are converted against the wall clock given to the parser).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitSnapshot {
    /// Requests left in the current window.
    pub requests_remaining: Option<u64>,
    /// Tokens left in the current window.
    pub tokens_remaining: Option<u64>,
    /// How long until the request budget is full again.
    pub requests_reset: Option<Duration>,
    /// How long until the token budget is full again.
    pub tokens_reset: Option<Duration>,
}

impl RateLimitSnapshot {
    /// Reads OpenAI-style (`x-ratelimit-*`) and Anthropic-style (`anthropic-ratelimit-*`)
    /// headers; names are case-insensitive. For Anthropic, the combined `tokens` figure is taken
    /// when present, else the smaller of `input-tokens` and `output-tokens` (with that one's
    /// reset). Timestamps in the past read as a zero reset.
    pub fn from_headers<I, K, V>(headers: I, now_wall: SystemTime) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut snapshot = Self::default();
        let mut input_tokens = TokenFigure::default();
        let mut output_tokens = TokenFigure::default();
        for (name, value) in headers {
            let name = name.as_ref().trim().to_ascii_lowercase();
            let value = value.as_ref().trim();
            match name.as_str() {
                "x-ratelimit-remaining-requests" | "anthropic-ratelimit-requests-remaining" => {
                    first(&mut snapshot.requests_remaining, parse_count(value));
                }
                "x-ratelimit-remaining-tokens" | "anthropic-ratelimit-tokens-remaining" => {
                    first(&mut snapshot.tokens_remaining, parse_count(value));
                }
                "x-ratelimit-reset-requests" => {
                    first(&mut snapshot.requests_reset, parse_go_duration(value))
                }
                "x-ratelimit-reset-tokens" => {
                    first(&mut snapshot.tokens_reset, parse_go_duration(value))
                }
                "anthropic-ratelimit-requests-reset" => {
                    first(&mut snapshot.requests_reset, reset_at(value, now_wall));
                }
                "anthropic-ratelimit-tokens-reset" => {
                    first(&mut snapshot.tokens_reset, reset_at(value, now_wall))
                }
                "anthropic-ratelimit-input-tokens-remaining" => {
                    first(&mut input_tokens.remaining, parse_count(value));
                }
                "anthropic-ratelimit-input-tokens-reset" => {
                    first(&mut input_tokens.reset, reset_at(value, now_wall))
                }
                "anthropic-ratelimit-output-tokens-remaining" => {
                    first(&mut output_tokens.remaining, parse_count(value));
                }
                "anthropic-ratelimit-output-tokens-reset" => {
                    first(&mut output_tokens.reset, reset_at(value, now_wall));
                }
                _ => {}
            }
        }
        if snapshot.tokens_remaining.is_none() {
            let tighter = input_tokens.tighter(output_tokens);
            snapshot.tokens_remaining = tighter.remaining;
            first(&mut snapshot.tokens_reset, tighter.reset);
        }
        snapshot
    }

    /// True when no header said anything.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The longest retry hint taken from a provider: a longer one (a misbehaving upstream's
/// `retry-after: 18446744073709551615`) is read as this.
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(24 * 3600);

/// The provider's "retry after" hint, at most [`MAX_RETRY_HINT`]: `retry-after-ms` (milliseconds, OpenAI) when present and
/// valid, else `retry-after` (seconds, integer or decimal, or an HTTP-date relative to
/// `now_wall`; a date in the past is zero).
pub fn retry_after<I, K, V>(headers: I, now_wall: SystemTime) -> Option<Duration>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut millis = None;
    let mut seconds = None;
    for (name, value) in headers {
        let name = name.as_ref().trim();
        let value = value.as_ref();
        if name.eq_ignore_ascii_case("retry-after-ms") {
            first(&mut millis, parse_retry_after_ms(value));
        } else if name.eq_ignore_ascii_case("retry-after") {
            first(&mut seconds, parse_retry_after(value, now_wall));
        }
    }
    millis.or(seconds)
}

/// Parses one `retry-after` value: delay-seconds (`"20"`, also decimals such as `"0.5"`) or an
/// HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`) relative to `now_wall`; at most
/// [`MAX_RETRY_HINT`].
pub fn parse_retry_after(value: &str, now_wall: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Some(duration) = parse_decimal(value, Duration::from_secs(1)) {
        return Some(duration.min(MAX_RETRY_HINT));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now_wall)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_HINT),
    )
}

/// Parses one `retry-after-ms` value: milliseconds, integer or decimal; at most
/// [`MAX_RETRY_HINT`].
pub fn parse_retry_after_ms(value: &str) -> Option<Duration> {
    parse_decimal(value.trim(), Duration::from_millis(1)).map(|delay| delay.min(MAX_RETRY_HINT))
}

/// Parses a Go-style duration as OpenAI's reset headers send them: `"1s"`, `"6m0s"`,
/// `"20ms"`, `"1h2m3.5s"`, `"0.5s"`, `"250us"`; a bare `"0"` is zero. The protobuf JSON form
/// Gemini uses for `retryDelay` (`"13s"`, `"0.5s"`) is a special case. Signs are refused: a
/// negative delay means nothing here.
pub fn parse_go_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = value;
    let mut total_nanos: u128 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        let nanos = decimal_times(number, unit_nanos)?;
        total_nanos = total_nanos.checked_add(nanos)?;
        rest = after;
    }
    duration_from_nanos(total_nanos)
}

/// Parses an RFC 3339 timestamp (`2024-06-07T12:00:30Z`, with optional fractional seconds and
/// a `Z` or `±hh:mm` offset).
pub fn parse_rfc3339(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    if value.len() > 64 || !value.is_ascii() {
        return None;
    }
    let bytes = value.as_bytes();
    // A numeric offset: `+hh:mm` or `-hh:mm` at the end, after the seconds.
    let offset_at = value
        .len()
        .checked_sub(6)
        .filter(|&at| at >= 19 && matches!(bytes[at], b'+' | b'-') && bytes[at + 3] == b':');
    let Some(at) = offset_at else {
        // `Z` or nothing: UTC. The weak parser also takes a space for `T`; that is harmless.
        if !value.ends_with(['Z', 'z']) {
            return None;
        }
        let utc = &value[..value.len() - 1];
        return humantime::parse_rfc3339_weak(utc).ok();
    };
    let (local, offset) = value.split_at(at);
    let hours: u64 = offset.get(1..3)?.parse().ok()?;
    let minutes: u64 = offset.get(4..6)?.parse().ok()?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    let offset = Duration::from_secs(hours * 3600 + minutes * 60);
    let local = humantime::parse_rfc3339_weak(local).ok()?;
    // Local time = UTC + offset, so UTC = local - offset (for `+`), local + offset (for `-`).
    if offset_is_negative(value, at) {
        local.checked_add(offset)
    } else {
        local.checked_sub(offset)
    }
}

/// Anthropic's and Gemini's remaining figures are plain non-negative integers.
fn parse_count(value: &str) -> Option<u64> {
    value.parse().ok()
}

/// An RFC 3339 reset time as a delay from `now_wall` (zero when already past).
fn reset_at(value: &str, now_wall: SystemTime) -> Option<Duration> {
    let at = parse_rfc3339(value)?;
    Some(at.duration_since(now_wall).unwrap_or(Duration::ZERO))
}

fn offset_is_negative(value: &str, at: usize) -> bool {
    value.as_bytes().get(at) == Some(&b'-')
}

/// Keeps the first valid value of a repeated header.
fn first<T>(slot: &mut Option<T>, value: Option<T>) {
    if slot.is_none() {
        *slot = value;
    }
}

/// One of Anthropic's per-direction token figures.
#[derive(Debug, Clone, Copy, Default)]
struct TokenFigure {
    remaining: Option<u64>,
    reset: Option<Duration>,
}

impl TokenFigure {
    /// The figure with fewer tokens left; on a tie (or when neither says), the later reset.
    fn tighter(self, other: Self) -> Self {
        match (self.remaining, other.remaining) {
            (Some(a), Some(b)) if a < b => self,
            (Some(a), Some(b)) if b < a => other,
            (Some(_), None) => self,
            (None, Some(_)) => other,
            _ => Self {
                remaining: self.remaining,
                reset: later(self.reset, other.reset),
            },
        }
    }
}

fn later(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// A non-negative decimal number (`"12"`, `"0.5"`, `"1."` is refused) times `unit`.
fn parse_decimal(value: &str, unit: Duration) -> Option<Duration> {
    duration_from_nanos(decimal_times(value, unit.as_nanos())?)
}

/// `number` (digits, optionally a dot and more digits) times `unit_nanos`, exactly, in
/// nanoseconds; fractions below a nanosecond are dropped.
fn decimal_times(number: &str, unit_nanos: u128) -> Option<u128> {
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    let digits_only = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty())
        || !digits_only(whole)
        || !digits_only(fraction)
        || (number.contains('.') && fraction.is_empty())
    {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos = whole.checked_mul(unit_nanos)?;
    // Fractions are exact to a nanosecond: take at most 18 digits (unit_nanos ≤ 3.6e12).
    let fraction = &fraction[..fraction.len().min(18)];
    if !fraction.is_empty() {
        let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
        let digits: u128 = fraction.parse().ok()?;
        nanos = nanos.checked_add(digits.checked_mul(unit_nanos)? / scale)?;
    }
    Some(nanos)
}

fn duration_from_nanos(nanos: u128) -> Option<Duration> {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, subsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-06-07T12:00:00Z, the wall clock of every test.
    fn now_wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_717_761_600)
    }

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// A table row's headers.
    type Headers<'a> = &'a [(&'a str, &'a str)];

    fn snapshot(headers: Headers<'_>) -> RateLimitSnapshot {
        RateLimitSnapshot::from_headers(headers.iter().copied(), now_wall())
    }

    #[test]
    fn openai_headers() {
        // As api.openai.com sends them on a chat completion.
        let headers = [
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-limit-tokens", "200000"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-remaining-tokens", "199958"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-reset-tokens", "12ms"),
            ("content-type", "application/json"),
        ];
        assert_eq!(
            snapshot(&headers),
            RateLimitSnapshot {
                requests_remaining: Some(499),
                tokens_remaining: Some(199_958),
                requests_reset: Some(ms(120)),
                tokens_reset: Some(ms(12)),
            }
        );
    }

    #[test]
    fn openai_headers_with_long_resets_and_mixed_case_names() {
        let headers = [
            ("X-RateLimit-Remaining-Requests", " 0 "),
            ("X-Ratelimit-Remaining-Tokens", "0"),
            ("X-RateLimit-Reset-Requests", "1h2m3.5s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        assert_eq!(
            snapshot(&headers),
            RateLimitSnapshot {
                requests_remaining: Some(0),
                tokens_remaining: Some(0),
                requests_reset: Some(secs(3723) + ms(500)),
                tokens_reset: Some(secs(360)),
            }
        );
    }

    #[test]
    fn anthropic_headers() {
        // As api.anthropic.com sends them; the wall clock is 12:00:00Z.
        let headers = [
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2024-06-07T12:00:01Z"),
            ("anthropic-ratelimit-tokens-limit", "40000"),
            ("anthropic-ratelimit-tokens-remaining", "39000"),
            ("anthropic-ratelimit-tokens-reset", "2024-06-07T12:00:30.5Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "30000"),
            ("anthropic-ratelimit-output-tokens-remaining", "8000"),
            ("request-id", "req_018EeWyXxfu5pfWkrYcMdjWG"),
        ];
        assert_eq!(
            snapshot(&headers),
            RateLimitSnapshot {
                requests_remaining: Some(49),
                tokens_remaining: Some(39_000),
                requests_reset: Some(secs(1)),
                tokens_reset: Some(secs(30) + ms(500)),
            },
            "the combined tokens figure wins over the per-direction ones"
        );
    }

    #[test]
    fn anthropic_input_and_output_token_figures_give_the_tighter_one() {
        let cases: &[(Headers<'_>, Option<u64>, Option<Duration>)] = &[
            (
                &[
                    ("anthropic-ratelimit-input-tokens-remaining", "30000"),
                    (
                        "anthropic-ratelimit-input-tokens-reset",
                        "2024-06-07T12:00:05Z",
                    ),
                    ("anthropic-ratelimit-output-tokens-remaining", "800"),
                    (
                        "anthropic-ratelimit-output-tokens-reset",
                        "2024-06-07T12:00:50Z",
                    ),
                ],
                Some(800),
                Some(secs(50)),
            ),
            (
                &[
                    ("anthropic-ratelimit-input-tokens-remaining", "0"),
                    (
                        "anthropic-ratelimit-input-tokens-reset",
                        "2024-06-07T12:00:05Z",
                    ),
                    ("anthropic-ratelimit-output-tokens-remaining", "800"),
                    (
                        "anthropic-ratelimit-output-tokens-reset",
                        "2024-06-07T12:00:50Z",
                    ),
                ],
                Some(0),
                Some(secs(5)),
            ),
            (
                &[
                    ("anthropic-ratelimit-input-tokens-remaining", "100"),
                    (
                        "anthropic-ratelimit-input-tokens-reset",
                        "2024-06-07T12:00:05Z",
                    ),
                    ("anthropic-ratelimit-output-tokens-remaining", "100"),
                    (
                        "anthropic-ratelimit-output-tokens-reset",
                        "2024-06-07T12:00:09Z",
                    ),
                ],
                Some(100),
                Some(secs(9)),
            ),
            (
                &[("anthropic-ratelimit-output-tokens-remaining", "70")],
                Some(70),
                None,
            ),
            (
                &[
                    (
                        "anthropic-ratelimit-input-tokens-reset",
                        "2024-06-07T12:00:05Z",
                    ),
                    (
                        "anthropic-ratelimit-output-tokens-reset",
                        "2024-06-07T12:00:07Z",
                    ),
                ],
                None,
                Some(secs(7)),
            ),
        ];
        for (headers, remaining, reset) in cases {
            let snapshot = snapshot(headers);
            assert_eq!(
                (snapshot.tokens_remaining, snapshot.tokens_reset),
                (*remaining, *reset),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn a_reset_in_the_past_is_zero() {
        let headers = [("anthropic-ratelimit-requests-reset", "2024-06-07T11:59:00Z")];
        assert_eq!(snapshot(&headers).requests_reset, Some(Duration::ZERO));
    }

    #[test]
    fn malformed_values_are_ignored_and_never_panic() {
        let headers = [
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "lots"),
            ("x-ratelimit-reset-requests", "soon"),
            ("x-ratelimit-reset-tokens", ""),
            ("anthropic-ratelimit-requests-reset", "2024-13-07T12:00:00Z"),
            ("anthropic-ratelimit-tokens-reset", "yesterday"),
            ("anthropic-ratelimit-input-tokens-remaining", "1.5"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2024-06-07T12:00:00Ω",
            ),
        ];
        let snapshot = snapshot(&headers);
        assert!(snapshot.is_empty(), "{snapshot:?}");
        assert!(self::snapshot(&[]).is_empty());
    }

    #[test]
    fn a_repeated_header_keeps_its_first_valid_value() {
        let headers = [
            ("x-ratelimit-remaining-requests", "junk"),
            ("x-ratelimit-remaining-requests", "7"),
            ("x-ratelimit-remaining-requests", "9"),
        ];
        assert_eq!(snapshot(&headers).requests_remaining, Some(7));
        assert!(!snapshot(&headers).is_empty());
    }

    #[test]
    fn from_headers_takes_owned_strings_too() {
        let headers = vec![("X-RATELIMIT-REMAINING-TOKENS".to_owned(), "12".to_owned())];
        assert_eq!(
            RateLimitSnapshot::from_headers(headers, now_wall()).tokens_remaining,
            Some(12)
        );
    }

    #[test]
    fn go_durations() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("1s", Some(secs(1))),
            ("6m0s", Some(secs(360))),
            ("20ms", Some(ms(20))),
            ("1h2m3.5s", Some(secs(3723) + ms(500))),
            ("0.5s", Some(ms(500))),
            ("13s", Some(secs(13))),
            ("13.962123s", Some(Duration::from_nanos(13_962_123_000))),
            ("2m59.56s", Some(ms(179_560))),
            ("250us", Some(Duration::from_micros(250))),
            ("250µs", Some(Duration::from_micros(250))),
            ("7ns", Some(Duration::from_nanos(7))),
            ("1.5h", Some(secs(5400))),
            (".5s", Some(ms(500))),
            ("0", Some(Duration::ZERO)),
            (" 3s ", Some(secs(3))),
            ("0.0000000001s", Some(Duration::ZERO)),
            ("", None),
            ("5", None),
            ("-1s", None),
            ("+1s", None),
            ("1.s", None),
            ("1.2.3s", None),
            ("1d", None),
            ("s", None),
            ("1s junk", None),
            ("99999999999999999999999h", None),
            ("1e3s", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_go_duration(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn rfc3339_timestamps() {
        let noon = now_wall();
        let cases: &[(&str, Option<SystemTime>)] = &[
            ("2024-06-07T12:00:00Z", Some(noon)),
            ("2024-06-07T12:00:00.250Z", Some(noon + ms(250))),
            ("2024-06-07t12:00:00z", None),
            ("2024-06-07T12:00:00+00:00", Some(noon)),
            ("2024-06-07T14:00:00+02:00", Some(noon)),
            ("2024-06-07T07:30:00-04:30", Some(noon)),
            ("2024-06-07T12:00:01.5+00:00", Some(noon + ms(1500))),
            ("2024-06-07T12:00:00", None),
            ("2024-06-07T12:00:00+25:00", None),
            ("2024-06-07T12:00:00+ab:00", None),
            ("2024-02-30T12:00:00Z", None),
            ("1969-12-31T23:59:59Z", None),
            ("2024-06-07", None),
            ("Fri, 07 Jun 2024 12:00:00 GMT", None),
            ("2024-06-07T12:00:00Zé", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_rfc3339(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn retry_after_values() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("20", Some(secs(20))),
            ("0", Some(Duration::ZERO)),
            ("1.5", Some(ms(1500))),
            (" 7 ", Some(secs(7))),
            ("Fri, 07 Jun 2024 12:00:30 GMT", Some(secs(30))),
            ("Fri, 07 Jun 2024 11:00:00 GMT", Some(Duration::ZERO)),
            ("Friday, 07-Jun-24 12:00:30 GMT", Some(secs(30))),
            ("-5", None),
            ("soon", None),
            ("", None),
            ("1e3", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_retry_after(text, now_wall()), *expected, "{text:?}");
        }
        assert_eq!(parse_retry_after_ms("2000"), Some(secs(2)));
        assert_eq!(
            parse_retry_after_ms("12.5"),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(parse_retry_after_ms("x"), None);
    }

    #[test]
    fn retry_hints_longer_than_a_day_are_read_as_a_day() {
        let huge = "18446744073709551615.5";
        assert_eq!(parse_retry_after(huge, now_wall()), Some(MAX_RETRY_HINT));
        assert_eq!(
            parse_retry_after("Wed, 07 Jun 2124 12:00:00 GMT", now_wall()),
            Some(MAX_RETRY_HINT)
        );
        assert_eq!(parse_retry_after_ms(huge), Some(MAX_RETRY_HINT));
        assert_eq!(
            retry_after([("retry-after", huge)], now_wall()),
            Some(MAX_RETRY_HINT)
        );
        assert_eq!(parse_retry_after("86399", now_wall()), Some(secs(86_399)));
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let cases: &[(Headers<'_>, Option<Duration>)] = &[
            (
                &[("retry-after", "2"), ("retry-after-ms", "1500")],
                Some(ms(1500)),
            ),
            (
                &[("Retry-After-Ms", "1500"), ("Retry-After", "2")],
                Some(ms(1500)),
            ),
            (&[("retry-after", "2")], Some(secs(2))),
            (
                &[("retry-after-ms", "junk"), ("retry-after", "2")],
                Some(secs(2)),
            ),
            (
                &[("retry-after", "Fri, 07 Jun 2024 12:01:00 GMT")],
                Some(secs(60)),
            ),
            (&[("x-ratelimit-reset-requests", "2s")], None),
            (&[], None),
        ];
        for (headers, expected) in cases {
            assert_eq!(
                retry_after(headers.iter().copied(), now_wall()),
                *expected,
                "{headers:?}"
            );
        }
    }
}
