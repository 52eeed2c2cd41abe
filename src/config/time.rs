//! The upper bounds of the time settings, node and providers alike, and the one way their
//! refusal is worded: it names the key and the range, in the key's unit.
//!
//! A duration that does not fit the clock made `Instant + Duration` panic
//! (`supervision.shutdown_timeout_secs = u64::MAX`, at the node's shutdown, before the store was
//! closed). Every time setting is kept far inside the clock here; the code that turns one into a
//! deadline saturates as well (`troupe_actors::time`), for embedders that skip validation. Lower
//! bounds, which differ in meaning from key to key, are checked where the keys are, with their
//! own reasons.

use super::{Config, ConfigError};

/// The longest most time settings may be, in seconds: a day. Nothing the node waits for, tries
/// again after or counts over is worth longer.
pub const MAX_TIME_SECS: u64 = 24 * 3600;

/// The longest retention (`events.retention_secs`, `sessions.retention_secs`), in seconds: a
/// century, far beyond any record worth keeping, far inside the clock.
pub const MAX_RETENTION_SECS: u64 = 100 * 365 * 24 * 3600;

/// The longest `sessions.long_running_after_secs`: a week, the longest a session may run.
const MAX_LONG_RUNNING_SECS: u64 = 7 * 24 * 3600;

/// The unit of a time setting, as its key's suffix says.
#[derive(Debug, Clone, Copy)]
pub(super) enum TimeUnit {
    /// `_secs`
    Secs,
    /// `_ms`
    Millis,
}

/// The upper bound of a time setting: seconds, and how the error says it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Most {
    secs: u64,
    words: &'static str,
}

/// A day.
pub(super) const A_DAY: Most = Most {
    secs: MAX_TIME_SECS,
    words: "a day",
};

/// A week.
const A_WEEK: Most = Most {
    secs: MAX_LONG_RUNNING_SECS,
    words: "a week",
};

/// A century.
const A_CENTURY: Most = Most {
    secs: MAX_RETENTION_SECS,
    words: "a century",
};

/// Refuses `value` of `key` above `most`, saying the range (from `least`) in `unit`.
pub(super) fn at_most(
    key: &str,
    value: u64,
    least: u64,
    most: Most,
    unit: TimeUnit,
) -> Result<(), ConfigError> {
    let (max, unit) = match unit {
        TimeUnit::Secs => (most.secs, "seconds"),
        TimeUnit::Millis => (most.secs * 1000, "milliseconds"),
    };
    if value > max {
        return Err(ConfigError::Semantic {
            key: key.to_owned(),
            message: format!(
                "{value} is out of range: use {least} to {max} {unit} ({} at most)",
                most.words
            ),
        });
    }
    Ok(())
}

/// The upper bounds of the node's own time settings (the providers' are checked with their
/// tables). Those not listed are bounded where their other rules are: `http.send_timeout_secs`,
/// `http.mcp_session_idle_secs`, `sessions.default_timeout_secs`,
/// `gateway.stalled_reader_secs`, `events.log_linger_ms`.
pub(super) fn validate(config: &Config) -> Result<(), ConfigError> {
    use TimeUnit::{Millis, Secs};
    let sessions = &config.sessions;
    let supervision = &config.supervision;
    let settings = [
        (
            "sessions.long_running_after_secs",
            sessions.long_running_after_secs,
            0,
            A_WEEK,
            Secs,
        ),
        (
            "sessions.kill_grace_secs",
            sessions.kill_grace_secs,
            0,
            A_DAY,
            Secs,
        ),
        (
            "sessions.retention_secs",
            sessions.retention_secs,
            0,
            A_CENTURY,
            Secs,
        ),
        (
            "events.heartbeat_secs",
            config.events.heartbeat_secs,
            1,
            A_DAY,
            Secs,
        ),
        (
            "events.retention_secs",
            config.events.retention_secs,
            60,
            A_CENTURY,
            Secs,
        ),
        (
            "supervision.window_secs",
            supervision.window_secs,
            1,
            A_DAY,
            Secs,
        ),
        (
            "supervision.backoff_min_ms",
            supervision.backoff_min_ms,
            0,
            A_DAY,
            Millis,
        ),
        (
            "supervision.backoff_max_ms",
            supervision.backoff_max_ms,
            0,
            A_DAY,
            Millis,
        ),
        (
            "supervision.shutdown_timeout_secs",
            supervision.shutdown_timeout_secs,
            1,
            A_DAY,
            Secs,
        ),
        ("health.tick_ms", config.health.tick_ms, 1, A_DAY, Millis),
        (
            "health.window_secs",
            config.health.window_secs,
            1,
            A_DAY,
            Secs,
        ),
    ];
    for (key, value, least, most, unit) in settings {
        at_most(key, value, least, most, unit)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `supervision.shutdown_timeout_secs = u64::MAX` passed validation and panicked
    /// the node at shutdown ("overflow when adding duration to instant"), leaving the store
    /// open; the other time settings had no upper bound either.
    #[test]
    fn every_time_setting_refuses_u64_max_naming_the_key_and_range() {
        type Set = fn(&mut Config);
        let cases: [(&str, &str, Set); 16] = [
            ("http.mcp_session_idle_secs", "1 to 604800", |c| {
                c.http.mcp_session_idle_secs = u64::MAX
            }),
            ("http.send_timeout_secs", "1 to 3600", |c| {
                c.http.send_timeout_secs = u64::MAX
            }),
            (
                "sessions.long_running_after_secs",
                "0 to 604800 seconds",
                |c| c.sessions.long_running_after_secs = u64::MAX,
            ),
            ("sessions.default_timeout_secs", "1 to 604800", |c| {
                c.sessions.default_timeout_secs = u64::MAX
            }),
            ("sessions.kill_grace_secs", "0 to 86400 seconds", |c| {
                c.sessions.kill_grace_secs = u64::MAX
            }),
            ("sessions.retention_secs", "0 to 3153600000 seconds", |c| {
                c.sessions.retention_secs = u64::MAX
            }),
            ("gateway.stalled_reader_secs", "1 to 3600", |c| {
                c.gateway.stalled_reader_secs = u64::MAX
            }),
            ("events.heartbeat_secs", "1 to 86400 seconds", |c| {
                c.events.heartbeat_secs = u64::MAX
            }),
            ("events.retention_secs", "60 to 3153600000 seconds", |c| {
                c.events.retention_secs = u64::MAX
            }),
            ("events.log_linger_ms", "over 60000", |c| {
                c.events.log_linger_ms = u64::MAX
            }),
            ("supervision.window_secs", "1 to 86400 seconds", |c| {
                c.supervision.window_secs = u64::MAX
            }),
            (
                "supervision.backoff_min_ms",
                "0 to 86400000 milliseconds",
                |c| {
                    c.supervision.backoff_min_ms = u64::MAX;
                    c.supervision.backoff_max_ms = u64::MAX;
                },
            ),
            (
                "supervision.backoff_max_ms",
                "0 to 86400000 milliseconds",
                |c| c.supervision.backoff_max_ms = u64::MAX,
            ),
            (
                "supervision.shutdown_timeout_secs",
                "1 to 86400 seconds",
                |c| c.supervision.shutdown_timeout_secs = u64::MAX,
            ),
            ("health.tick_ms", "1 to 86400000 milliseconds", |c| {
                c.health.tick_ms = u64::MAX
            }),
            ("health.window_secs", "1 to 86400 seconds", |c| {
                c.health.window_secs = u64::MAX
            }),
        ];
        for (key, range, set) in cases {
            let mut config = Config::default();
            set(&mut config);
            let error = config.validate().expect_err(key).to_string();
            assert!(
                error.contains(&format!("`{key}`")) && error.contains(range),
                "{key}: {error}"
            );
        }
        // The bounds themselves are allowed.
        let mut config = Config::default();
        config.sessions.long_running_after_secs = MAX_LONG_RUNNING_SECS;
        config.sessions.kill_grace_secs = MAX_TIME_SECS;
        config.sessions.retention_secs = MAX_RETENTION_SECS;
        config.events.heartbeat_secs = MAX_TIME_SECS;
        config.events.retention_secs = MAX_RETENTION_SECS;
        config.supervision.window_secs = MAX_TIME_SECS;
        config.supervision.backoff_max_ms = MAX_TIME_SECS * 1000;
        config.supervision.shutdown_timeout_secs = MAX_TIME_SECS;
        config.health.tick_ms = MAX_TIME_SECS * 1000;
        config.health.window_secs = MAX_TIME_SECS;
        config.validate().unwrap();
    }
}
