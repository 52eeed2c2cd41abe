//! What a waiting `spawn_session` tells its client while the session runs: progress
//! notifications (when the request carries a progress token) and log notifications
//! (`notifications/message`, only when the client asked for a log level, and only at or above it).
//!
//! A client asks for a level per request with `_meta["io.modelcontextprotocol/logLevel"]`
//! (2026-07-28), or once per session with `logging/setLevel` (2025-11-25 and older; the method no
//! longer exists in 2026-07-28). Pure functions of a session event: no I/O here.

// rmcp marks its logging types deprecated (SEP-2577 plans to remove logging from a later
// revision). 2026-07-28 still defines per-request log levels, and the issue asks for them.
#![allow(deprecated)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use rmcp::RoleServer;
use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam, ProtocolVersion};
use rmcp::service::RequestContext;
use serde_json::Value;
use troupe_actors::event::{Event, EventData};

/// The logger name of session log messages.
pub(crate) const SESSION_LOGGER: &str = "troupe.session";

/// Severity order of the MCP log levels (rmcp's enum has none): debug is 0, emergency 7.
pub(crate) fn rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

const LEVELS: [LoggingLevel; 8] = [
    LoggingLevel::Debug,
    LoggingLevel::Info,
    LoggingLevel::Notice,
    LoggingLevel::Warning,
    LoggingLevel::Error,
    LoggingLevel::Critical,
    LoggingLevel::Alert,
    LoggingLevel::Emergency,
];

/// The level a session's client set with `logging/setLevel` (shared by the clones of one
/// client's server).
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionLogLevel(Arc<AtomicU8>);

impl SessionLogLevel {
    /// Sets the level (0 in the cell means "none asked").
    pub(crate) fn set(&self, level: LoggingLevel) {
        self.0.store(rank(level) + 1, Ordering::Relaxed);
    }

    /// The level set, if any.
    pub(crate) fn get(&self) -> Option<LoggingLevel> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            stored => LEVELS.get(usize::from(stored - 1)).copied(),
        }
    }
}

/// True when the request uses the 2026-07-28 lifecycle (no sessions, no `logging/setLevel`).
pub(crate) fn is_stateless(ctx: &RequestContext<RoleServer>) -> bool {
    ctx.protocol_version()
        .is_some_and(|version| version.as_str() >= ProtocolVersion::V_2026_07_28.as_str())
}

/// The level the request asked for: its own `_meta` level, else (legacy sessions only) the one
/// set with `logging/setLevel`. `None`: send no log notifications.
pub(crate) fn requested_level(
    ctx: &RequestContext<RoleServer>,
    session: &SessionLogLevel,
) -> Option<LoggingLevel> {
    ctx.meta.log_level().or_else(|| {
        if is_stateless(ctx) {
            None
        } else {
            session.get()
        }
    })
}

/// The log message a session event makes, with its level: output lines are `debug`; the start,
/// progress and an ordinary end are `info`; a long run is `notice`; a rate limit and a
/// cancellation are `warning`; a failure, a timeout or an interruption is `error`. `data` is
/// the event as the event stream shows it (`event_json`).
pub(crate) fn log_message(
    event: &Event,
    event_json: Value,
) -> Option<LoggingMessageNotificationParam> {
    let level = match &event.data {
        EventData::SessionOutput(_) => LoggingLevel::Debug,
        EventData::SessionStarted(_)
        | EventData::SessionProgress(_)
        | EventData::SessionSucceeded(_) => LoggingLevel::Info,
        EventData::SessionLongRunning(_) => LoggingLevel::Notice,
        EventData::SessionRateLimited(_) | EventData::SessionCancelled(_) => LoggingLevel::Warning,
        EventData::SessionFailed(_)
        | EventData::SessionTimedOut(_)
        | EventData::SessionInterrupted(_) => LoggingLevel::Error,
        _ => return None,
    };
    let mut param = LoggingMessageNotificationParam::new(level, event_json);
    param.logger = Some(SESSION_LOGGER.to_owned());
    Some(param)
}

/// Whether a message at `level` goes to a client that asked for `asked`.
pub(crate) fn wanted(level: LoggingLevel, asked: Option<LoggingLevel>) -> bool {
    asked.is_some_and(|asked| rank(level) >= rank(asked))
}

/// What a progress notification says about a session event, if anything. The notification's
/// `progress` is the caller's step count (it only grows) and it carries no `total`: the session's
/// own `current`/`total`, when it reports them, are a different scale and go into the message
/// ("progress 3/10: …"), so `progress` can never exceed a `total`.
pub(crate) fn progress_message(data: &EventData) -> Option<String> {
    let message = match data {
        EventData::SessionStarted(_) => "started".to_owned(),
        EventData::SessionOutput(output) => {
            let last = output.lines.last().map(String::as_str).unwrap_or("");
            let last: String = last.chars().take(200).collect();
            format!("output line {}: {last}", output.first_line)
        }
        EventData::SessionProgress(progress) => match (progress.current, progress.total) {
            (Some(current), Some(total)) => {
                format!("progress {current}/{total}: {}", progress.message)
            }
            (Some(current), None) => format!("progress {current}: {}", progress.message),
            _ => format!("progress: {}", progress.message),
        },
        EventData::SessionRateLimited(_) => "rate limited by the provider; waiting".to_owned(),
        EventData::SessionLongRunning(_) => "still running".to_owned(),
        _ => return None,
    };
    Some(message)
}

#[cfg(test)]
mod tests {
    use troupe_actors::event::{SessionEnded, SessionProgress};

    use super::*;

    #[test]
    fn levels_are_ordered_and_a_message_goes_only_at_or_above_the_asked_level() {
        for pair in LEVELS.windows(2) {
            assert!(rank(pair[0]) < rank(pair[1]));
        }
        assert!(
            !wanted(LoggingLevel::Emergency, None),
            "nothing when none was asked"
        );
        assert!(wanted(LoggingLevel::Error, Some(LoggingLevel::Warning)));
        assert!(wanted(LoggingLevel::Warning, Some(LoggingLevel::Warning)));
        assert!(!wanted(LoggingLevel::Info, Some(LoggingLevel::Warning)));
    }

    #[test]
    fn the_session_level_starts_unset_and_keeps_the_last_one_set() {
        let level = SessionLogLevel::default();
        assert_eq!(level.get(), None);
        level.set(LoggingLevel::Debug);
        assert_eq!(level.clone().get(), Some(LoggingLevel::Debug));
        level.set(LoggingLevel::Emergency);
        assert_eq!(level.get(), Some(LoggingLevel::Emergency));
    }

    #[test]
    fn progress_never_carries_the_session_s_total() {
        // Regression: `progress` was a step count while `total` was the session's own total,
        // so a session reporting 1/2 after three output lines sent progress 4 of total 2.
        let data = EventData::SessionProgress(SessionProgress {
            message: "compiling".into(),
            current: Some(1),
            total: Some(2),
        });
        assert_eq!(
            progress_message(&data).as_deref(),
            Some("progress 1/2: compiling")
        );
        let ended = EventData::SessionSucceeded(SessionEnded {
            exit_code: Some(0),
            signal: None,
            reason: None,
            duration_ms: 1,
        });
        assert_eq!(progress_message(&ended), None);
    }
}
