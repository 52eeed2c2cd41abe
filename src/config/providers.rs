//! The `[[providers]]` tables of the configuration and their validation.
//!
//! The `breaker` and `retry` tables are the actor crate's own settings types
//! ([`BreakerConfig`], [`RetryConfig`]): every key they have can be set, and nothing is copied
//! between two shapes of the same thing. Validation names the key (`providers[1].breaker.
//! failure_rate`) and says what would be right.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe_actors::provider::{BreakerConfig, RetryConfig};

use super::ConfigError;
use super::time::TimeUnit as Unit;
use crate::provider::ProviderKind;

/// Most calls one provider may hold waiting for budget or a slot (`max_queue`).
pub const MAX_QUEUE_LIMIT: usize = 1_000_000;

/// The longest any time setting of a provider may be, in seconds: a day (timeouts, retry waits
/// and delays, the breaker's cool-downs, probe timeout and window). A call is not worth keeping
/// longer, and deadlines computed from longer ones need not fit the clock: `u64::MAX` seconds
/// made `Instant + Duration` panic, or a deadline fall back to the present.
pub const MAX_PROVIDER_SECS: u64 = super::time::MAX_TIME_SECS;

/// One `[[providers]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name used in routes (`name/model`) and events.
    pub name: String,
    /// API shape.
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Models served.
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests per minute allowed.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per minute allowed.
    #[serde(default)]
    pub tpm: Option<u32>,
    /// Calls at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Calls waiting for budget or a slot, at most; past it a call is refused at once (429).
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// `provider/model` to try, in order, when this one cannot serve.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Circuit breaker.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Timeouts of the provider's HTTP client.
    #[serde(default)]
    pub timeouts: ProviderTimeouts,
}

impl ProviderConfig {
    /// A provider with every optional key at its default.
    pub fn new(name: impl Into<String>, kind: ProviderKind, base_url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind,
            base_url: base_url.into(),
            api_key_env: None,
            models: Vec::new(),
            rpm: None,
            tpm: None,
            max_concurrency: default_max_concurrency(),
            max_queue: default_max_queue(),
            fallback: Vec::new(),
            breaker: BreakerConfig::default(),
            retry: RetryConfig::default(),
            timeouts: ProviderTimeouts::default(),
        }
    }
}

fn default_max_concurrency() -> usize {
    64
}

fn default_max_queue() -> usize {
    1024
}

/// `timeouts = { … }` of a provider. The first-byte and between-chunks timeouts can be given in
/// seconds or in milliseconds (one of the two).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderTimeouts {
    /// Establishing a connection, in milliseconds.
    pub connect_ms: u64,
    /// From sending a request to the first byte of the answer (for a stream: its first event),
    /// in seconds. Default 120.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_byte_secs: Option<u64>,
    /// The same in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    /// Longest gap between two pieces of an answer, in seconds. Default 60.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub between_chunks_secs: Option<u64>,
    /// The same in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub between_chunks_ms: Option<u64>,
}

impl Default for ProviderTimeouts {
    fn default() -> Self {
        Self {
            connect_ms: 5_000,
            first_byte_secs: None,
            first_byte_ms: None,
            between_chunks_secs: None,
            between_chunks_ms: None,
        }
    }
}

impl ProviderTimeouts {
    /// Default of the first-byte timeout.
    pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(120);
    /// Default of the between-chunks timeout.
    pub const DEFAULT_BETWEEN_CHUNKS: Duration = Duration::from_secs(60);

    /// Establishing a connection.
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }

    /// From sending to the first byte.
    pub fn first_byte(&self) -> Duration {
        either(
            self.first_byte_secs,
            self.first_byte_ms,
            Self::DEFAULT_FIRST_BYTE,
        )
    }

    /// The longest gap inside an answer.
    pub fn between_chunks(&self) -> Duration {
        either(
            self.between_chunks_secs,
            self.between_chunks_ms,
            Self::DEFAULT_BETWEEN_CHUNKS,
        )
    }
}

fn either(secs: Option<u64>, millis: Option<u64>, default: Duration) -> Duration {
    match (secs, millis) {
        (_, Some(millis)) => Duration::from_millis(millis),
        (Some(secs), None) => Duration::from_secs(secs),
        (None, None) => default,
    }
}

/// Checks every `[[providers]]` table: names, URLs, limits, breaker, retry, timeouts and
/// fallbacks.
pub(super) fn validate(providers: &[ProviderConfig]) -> Result<(), ConfigError> {
    let mut names = BTreeSet::new();
    for (index, provider) in providers.iter().enumerate() {
        let key = format!("providers[{index}]");
        if provider.name.is_empty()
            || !provider
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(semantic(
                &format!("{key}.name"),
                format!("{:?}: use letters, digits, '-' and '_' only", provider.name),
            ));
        }
        if !names.insert(provider.name.as_str()) {
            return Err(semantic(
                &format!("{key}.name"),
                format!("provider {:?} is defined twice", provider.name),
            ));
        }
        if !(provider.base_url.starts_with("http://") || provider.base_url.starts_with("https://"))
        {
            return Err(semantic(
                &format!("{key}.base_url"),
                format!(
                    "{:?} must start with http:// or https://",
                    provider.base_url
                ),
            ));
        }
        if provider.max_concurrency == 0 {
            return Err(semantic(
                &format!("{key}.max_concurrency"),
                "must be at least 1".into(),
            ));
        }
        if provider.max_queue == 0 || provider.max_queue > MAX_QUEUE_LIMIT {
            return Err(semantic(
                &format!("{key}.max_queue"),
                format!(
                    "{} is out of range: use 1 to {MAX_QUEUE_LIMIT}",
                    provider.max_queue
                ),
            ));
        }
        for (name, limit) in [("rpm", provider.rpm), ("tpm", provider.tpm)] {
            if limit == Some(0) {
                return Err(semantic(
                    &format!("{key}.{name}"),
                    "0 would refuse every call; leave it out for no limit".into(),
                ));
            }
        }
        validate_breaker(&key, &provider.breaker)?;
        validate_retry(&key, &provider.retry)?;
        validate_timeouts(&key, &provider.timeouts)?;
    }
    for (index, provider) in providers.iter().enumerate() {
        let key = format!("providers[{index}].fallback");
        for target in &provider.fallback {
            let Some((name, model, to)) = target.split_once('/').and_then(|(name, model)| {
                let to = providers.iter().find(|other| other.name == name)?;
                (!model.is_empty()).then_some((name, model, to))
            }) else {
                return Err(semantic(
                    &key,
                    format!(
                        "{target:?} must be PROVIDER/MODEL with a provider defined in \
                         [[providers]]"
                    ),
                ));
            };
            if name == provider.name {
                return Err(semantic(
                    &key,
                    format!(
                        "{target:?} falls back to the provider itself, which the failure that \
                         makes it fall back affects too; name another provider"
                    ),
                ));
            }
            if !to.models.is_empty() && !to.models.iter().any(|served| served == model) {
                return Err(semantic(
                    &key,
                    format!(
                        "{target:?}: provider {name:?} does not serve {model:?}; it serves: {}; \
                         add it to that provider's `models`, or fall back to one of those",
                        to.models.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_breaker(key: &str, breaker: &BreakerConfig) -> Result<(), ConfigError> {
    let at = |name: &str| format!("{key}.breaker.{name}");
    if !(0.0..=1.0).contains(&breaker.failure_rate) {
        return Err(semantic(
            &at("failure_rate"),
            format!(
                "{} is not a fraction: use 0 (rule off) up to 1 (e.g. 0.5 opens the breaker \
                 when half of the calls in the window failed)",
                breaker.failure_rate
            ),
        ));
    }
    if breaker.failure_rate > 0.0 {
        if breaker.min_calls == 0 {
            return Err(semantic(
                &at("min_calls"),
                "must be at least 1 while failure_rate is on (set failure_rate = 0 to turn the \
                 rule off)"
                    .into(),
            ));
        }
        if breaker.window_secs == 0 {
            return Err(semantic(
                &at("window_secs"),
                "must be at least 1 while failure_rate is on (set failure_rate = 0 to turn the \
                 rule off)"
                    .into(),
            ));
        }
    }
    if breaker.failure_threshold == 0 && breaker.failure_rate == 0.0 {
        return Err(semantic(
            &at("failure_threshold"),
            "and failure_rate are both 0, so the breaker could never open; turn one of them on"
                .into(),
        ));
    }
    for (name, value) in [
        ("open_secs", breaker.open_secs),
        ("probe_timeout_secs", breaker.probe_timeout_secs),
        ("half_open_probes", u64::from(breaker.half_open_probes)),
    ] {
        if value == 0 {
            return Err(semantic(&at(name), "must be at least 1".into()));
        }
    }
    for (name, value, least) in [
        ("open_secs", breaker.open_secs, 1),
        ("max_open_secs", breaker.max_open_secs, 1),
        ("probe_timeout_secs", breaker.probe_timeout_secs, 1),
        ("window_secs", breaker.window_secs, 0),
    ] {
        at_most_a_day(&at(name), value, least, Unit::Secs)?;
    }
    if breaker.max_open_secs < breaker.open_secs {
        return Err(semantic(
            &at("max_open_secs"),
            format!(
                "{} is below open_secs ({}): the cool-down cap must be at least the first \
                 cool-down",
                breaker.max_open_secs, breaker.open_secs
            ),
        ));
    }
    Ok(())
}

fn validate_retry(key: &str, retry: &RetryConfig) -> Result<(), ConfigError> {
    let at = |name: &str| format!("{key}.retry.{name}");
    if retry.max_attempts == 0 {
        return Err(semantic(
            &at("max_attempts"),
            "must be at least 1 (the first call counts; 1 means no retries)".into(),
        ));
    }
    for (name, value, least, unit) in [
        ("base_ms", retry.base_ms, 0, Unit::Millis),
        ("max_delay_ms", retry.max_delay_ms, 0, Unit::Millis),
        ("max_wait_secs", retry.max_wait_secs, 0, Unit::Secs),
    ] {
        at_most_a_day(&at(name), value, least, unit)?;
    }
    if retry.base_ms > retry.max_delay_ms {
        return Err(semantic(
            &at("base_ms"),
            format!(
                "{} exceeds max_delay_ms ({}): the first backoff step cannot be above the cap",
                retry.base_ms, retry.max_delay_ms
            ),
        ));
    }
    Ok(())
}

fn validate_timeouts(key: &str, timeouts: &ProviderTimeouts) -> Result<(), ConfigError> {
    let at = |name: &str| format!("{key}.timeouts.{name}");
    for (secs_name, secs, millis_name, millis) in [
        (
            "first_byte_secs",
            timeouts.first_byte_secs,
            "first_byte_ms",
            timeouts.first_byte_ms,
        ),
        (
            "between_chunks_secs",
            timeouts.between_chunks_secs,
            "between_chunks_ms",
            timeouts.between_chunks_ms,
        ),
    ] {
        if secs.is_some() && millis.is_some() {
            return Err(semantic(
                &at(millis_name),
                format!("set {secs_name} or {millis_name}, not both"),
            ));
        }
    }
    for (name, value) in [
        ("connect_ms", Some(timeouts.connect_ms)),
        ("first_byte_secs", timeouts.first_byte_secs),
        ("first_byte_ms", timeouts.first_byte_ms),
        ("between_chunks_secs", timeouts.between_chunks_secs),
        ("between_chunks_ms", timeouts.between_chunks_ms),
    ] {
        if value == Some(0) {
            return Err(semantic(&at(name), "must be at least 1".into()));
        }
        let unit = if name.ends_with("_ms") {
            Unit::Millis
        } else {
            Unit::Secs
        };
        if let Some(value) = value {
            at_most_a_day(&at(name), value, 1, unit)?;
        }
    }
    Ok(())
}

/// Refuses `value` of `key` above [`MAX_PROVIDER_SECS`], saying the range (from `least`).
fn at_most_a_day(key: &str, value: u64, least: u64, unit: Unit) -> Result<(), ConfigError> {
    super::time::at_most(key, value, least, super::time::A_DAY, unit)
}

fn semantic(key: &str, message: String) -> ConfigError {
    ConfigError::Semantic {
        key: key.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One provider with `extra` keys, through the configuration's own parsing and validation.
    fn provider(extra: &str) -> Result<Vec<ProviderConfig>, String> {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        let text = format!(
            "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\n{extra}\n"
        );
        let config: super::super::Config = Figment::from(Toml::string(&text))
            .extract()
            .map_err(|error| super::super::describe_in(error, None))
            .map_err(|error| error.to_string())?;
        config.validate().map_err(|error| error.to_string())?;
        Ok(config.providers)
    }

    #[test]
    fn every_breaker_key_and_the_queue_bound_are_settable() {
        let providers = provider(
            "max_queue = 7\nbreaker = { failure_threshold = 0, open_secs = 2, max_open_secs = 9, \
             half_open_probes = 3, probe_timeout_secs = 4, failure_rate = 0.25, min_calls = 8, \
             window_secs = 10 }",
        )
        .unwrap();
        let provider = &providers[0];
        assert_eq!(provider.max_queue, 7);
        assert_eq!(
            provider.breaker,
            BreakerConfig {
                failure_threshold: 0,
                open_secs: 2,
                max_open_secs: 9,
                half_open_probes: 3,
                probe_timeout_secs: 4,
                failure_rate: 0.25,
                min_calls: 8,
                window_secs: 10,
            }
        );
        let spec = crate::provider::provider_spec(provider).unwrap();
        assert_eq!(spec.max_queue, 7);
        assert_eq!(spec.policy.breaker, provider.breaker);
    }

    #[test]
    fn defaults_are_those_of_the_policies() {
        let provider = &provider("").unwrap()[0];
        assert_eq!(provider.breaker, BreakerConfig::default());
        assert_eq!(provider.retry, RetryConfig::default());
        assert_eq!(provider.max_queue, 1024);
        assert_eq!(provider.timeouts.first_byte(), Duration::from_secs(120));
        assert_eq!(provider.timeouts.between_chunks(), Duration::from_secs(60));
        assert_eq!(provider.timeouts.connect(), Duration::from_secs(5));
        assert_eq!(
            provider,
            &ProviderConfig::new("a", ProviderKind::OpenAi, "http://x")
        );
    }

    #[test]
    fn timeouts_take_seconds_or_milliseconds() {
        let provider =
            &provider("timeouts = { first_byte_ms = 150, between_chunks_secs = 2 }").unwrap()[0];
        assert_eq!(provider.timeouts.first_byte(), Duration::from_millis(150));
        assert_eq!(provider.timeouts.between_chunks(), Duration::from_secs(2));
        let error = provider_error("timeouts = { first_byte_ms = 150, first_byte_secs = 1 }");
        assert!(
            error.contains("providers[0].timeouts.first_byte_ms") && error.contains("not both"),
            "{error}"
        );
        let error = provider_error("timeouts = { between_chunks_ms = 0 }");
        assert!(
            error.contains("providers[0].timeouts.between_chunks_ms"),
            "{error}"
        );
    }

    fn provider_error(extra: &str) -> String {
        provider(extra).expect_err(extra)
    }

    #[test]
    fn every_time_setting_is_at_most_a_day_and_its_error_names_the_key_and_range() {
        // Before, u64::MAX passed: retry.max_wait_secs panicked in the call loop ("overflow
        // when adding durations"), first_byte_secs in the client, a huge probe_timeout_secs
        // made probes expire at once.
        type Set = fn(&mut ProviderConfig);
        let cases: [(&str, &str, Set); 12] = [
            ("retry.max_wait_secs", "0 to 86400 seconds", |p| {
                p.retry.max_wait_secs = u64::MAX
            }),
            ("retry.base_ms", "0 to 86400000 milliseconds", |p| {
                p.retry.base_ms = u64::MAX
            }),
            ("retry.max_delay_ms", "0 to 86400000 milliseconds", |p| {
                p.retry.max_delay_ms = u64::MAX
            }),
            ("breaker.probe_timeout_secs", "1 to 86400 seconds", |p| {
                p.breaker.probe_timeout_secs = u64::MAX
            }),
            ("breaker.open_secs", "1 to 86400 seconds", |p| {
                p.breaker.open_secs = u64::MAX
            }),
            ("breaker.max_open_secs", "1 to 86400 seconds", |p| {
                p.breaker.max_open_secs = u64::MAX
            }),
            ("breaker.window_secs", "0 to 86400 seconds", |p| {
                p.breaker.window_secs = u64::MAX
            }),
            ("timeouts.connect_ms", "1 to 86400000 milliseconds", |p| {
                p.timeouts.connect_ms = u64::MAX
            }),
            ("timeouts.first_byte_secs", "1 to 86400 seconds", |p| {
                p.timeouts.first_byte_secs = Some(u64::MAX)
            }),
            (
                "timeouts.first_byte_ms",
                "1 to 86400000 milliseconds",
                |p| p.timeouts.first_byte_ms = Some(u64::MAX),
            ),
            ("timeouts.between_chunks_secs", "1 to 86400 seconds", |p| {
                p.timeouts.between_chunks_secs = Some(u64::MAX)
            }),
            (
                "timeouts.between_chunks_ms",
                "1 to 86400000 milliseconds",
                |p| p.timeouts.between_chunks_ms = Some(u64::MAX),
            ),
        ];
        for (key, range, set) in cases {
            let mut provider = ProviderConfig::new("a", ProviderKind::OpenAi, "http://x");
            set(&mut provider);
            let config = super::super::Config {
                providers: vec![provider.clone()],
                ..Default::default()
            };
            let error = config.validate().expect_err(key).to_string();
            assert!(
                error.contains(&format!("providers[0].{key}"))
                    && error.contains(&u64::MAX.to_string())
                    && error.contains(range),
                "{key}: {error}"
            );
        }
        // A day is allowed; a day and a second, written in the file, is not.
        provider(
            "retry = { max_wait_secs = 86400, max_delay_ms = 86400000 }
             timeouts = { first_byte_secs = 86400, between_chunks_ms = 86400000, \
             connect_ms = 86400000 }
             breaker = { open_secs = 86400, max_open_secs = 86400, probe_timeout_secs = 86400, \
             window_secs = 86400 }",
        )
        .unwrap();
        let error = provider_error("timeouts = { first_byte_secs = 86401 }");
        assert!(
            error.contains("providers[0].timeouts.first_byte_secs")
                && error.contains("use 1 to 86400 seconds"),
            "{error}"
        );
        let error = provider_error("retry = { max_wait_secs = 9223372036854775807 }");
        assert!(
            error.contains("providers[0].retry.max_wait_secs"),
            "{error}"
        );
    }

    #[test]
    fn bad_breaker_retry_and_queue_values_name_their_key() {
        for (extra, key) in [
            ("breaker = { failure_rate = 1.5 }", "breaker.failure_rate"),
            ("breaker = { failure_rate = -0.1 }", "breaker.failure_rate"),
            ("breaker = { failure_rate = nan }", "breaker.failure_rate"),
            ("breaker = { min_calls = 0 }", "breaker.min_calls"),
            ("breaker = { window_secs = 0 }", "breaker.window_secs"),
            (
                "breaker = { failure_threshold = 0, failure_rate = 0.0 }",
                "breaker.failure_threshold",
            ),
            ("breaker = { open_secs = 0 }", "breaker.open_secs"),
            (
                "breaker = { open_secs = 60, max_open_secs = 30 }",
                "breaker.max_open_secs",
            ),
            (
                "breaker = { half_open_probes = 0 }",
                "breaker.half_open_probes",
            ),
            (
                "breaker = { probe_timeout_secs = 0 }",
                "breaker.probe_timeout_secs",
            ),
            ("breaker = { failure_rates = 0.5 }", "failure_rates"),
            ("retry = { max_attempts = 0 }", "retry.max_attempts"),
            ("retry = { base_ms = 9000 }", "retry.base_ms"),
            ("max_queue = 0", "max_queue"),
            ("rpm = 0", "providers[0].rpm"),
            ("tpm = 0", "providers[0].tpm"),
            ("max_queue = 1000001", "max_queue"),
        ] {
            let error = provider_error(extra);
            assert!(error.contains(key), "{extra}: {error}");
        }
        let error = provider_error("rpm = 0");
        assert!(error.contains("leave it out for no limit"), "{error}");
        // Off rules need no companions.
        provider("breaker = { failure_rate = 0.0, min_calls = 0, window_secs = 0 }").unwrap();
    }

    /// Two providers through the configuration's parsing and validation: `a` serves `m`, `b`
    /// serves `m2` and has `fallback`.
    fn with_fallback(fallback: &str) -> Result<(), String> {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        let text = format!(
            "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\n\
             models = [\"m\"]\n\
             [[providers]]\nname = \"b\"\nkind = \"openai\"\nbase_url = \"http://y\"\n\
             models = [\"m2\"]\nfallback = [{fallback}]\n\
             [[providers]]\nname = \"any\"\nkind = \"openai\"\nbase_url = \"http://z\"\n"
        );
        let config: super::super::Config = Figment::from(Toml::string(&text))
            .extract()
            .map_err(|error| error.to_string())?;
        config.validate().map_err(|error| error.to_string())
    }

    #[test]
    fn a_fallback_must_be_served_by_its_provider_and_not_be_the_provider_itself() {
        with_fallback("\"a/m\"").unwrap();
        // A provider without a `models` list serves any model.
        with_fallback("\"any/whatever\"").unwrap();
        let error = with_fallback("\"a/zzz\"").unwrap_err();
        assert!(
            error.contains("providers[1].fallback")
                && error.contains("does not serve \"zzz\"")
                && error.contains("it serves: m"),
            "{error}"
        );
        let error = with_fallback("\"b/m2\"").unwrap_err();
        assert!(
            error.contains("providers[1].fallback") && error.contains("the provider itself"),
            "{error}"
        );
    }
}
