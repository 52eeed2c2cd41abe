//! The session state machine: queued → starting → running → succeeded | failed | cancelled |
//! timed_out | interrupted. Pure: every transition is checked against one table, and an invalid
//! one is a typed error — a state is never silently overwritten.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Accepted, waiting for a slot.
    Queued,
    /// Its process is being launched.
    Starting,
    /// Its process runs.
    Running,
    /// It ended well.
    Succeeded,
    /// It ended badly (non-zero exit, or an agent that gave up).
    Failed,
    /// Someone cancelled it.
    Cancelled,
    /// It ran past its timeout.
    TimedOut,
    /// It was running (or starting) when its node stopped or crashed.
    Interrupted,
}

impl SessionState {
    /// Every state, in lifecycle order.
    pub const ALL: [SessionState; 8] = [
        Self::Queued,
        Self::Starting,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
        Self::Interrupted,
    ];

    /// True once nothing more can happen to the session.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut | Self::Interrupted
        )
    }

    /// The name used in JSON and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
            Self::Interrupted => "interrupted",
        }
    }

    /// Whether `self → to` is allowed.
    pub fn can_become(self, to: SessionState) -> bool {
        use SessionState::*;
        matches!(
            (self, to),
            (Queued, Starting | Cancelled | Interrupted)
                | (
                    Starting,
                    Running | Failed | Cancelled | TimedOut | Interrupted
                )
                | (
                    Running,
                    Succeeded | Failed | Cancelled | TimedOut | Interrupted
                )
        )
    }

    /// Checks `self → to`.
    pub fn transition(self, to: SessionState) -> Result<SessionState, InvalidTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SessionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown session state {s:?}; states are queued, starting, running, \
                     succeeded, failed, cancelled, timed_out, interrupted"
                )
            })
    }
}

/// A transition the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a session cannot go from {from} to {to}")]
pub struct InvalidTransition {
    /// The current state.
    pub from: SessionState,
    /// The refused next state.
    pub to: SessionState,
}

#[cfg(test)]
mod tests {
    use super::SessionState::{self, *};

    /// The whole table: every (from, to) pair, with the answer spelled out.
    #[test]
    fn the_transition_table_is_exactly_the_documented_one() {
        let allowed: &[(SessionState, &[SessionState])] = &[
            (Queued, &[Starting, Cancelled, Interrupted]),
            (
                Starting,
                &[Running, Failed, Cancelled, TimedOut, Interrupted],
            ),
            (
                Running,
                &[Succeeded, Failed, Cancelled, TimedOut, Interrupted],
            ),
            (Succeeded, &[]),
            (Failed, &[]),
            (Cancelled, &[]),
            (TimedOut, &[]),
            (Interrupted, &[]),
        ];
        for (from, targets) in allowed {
            for to in SessionState::ALL {
                let expected = targets.contains(&to);
                assert_eq!(from.can_become(to), expected, "{from} -> {to}");
                match from.transition(to) {
                    Ok(next) => {
                        assert!(expected);
                        assert_eq!(next, to);
                    }
                    Err(error) => {
                        assert!(!expected);
                        assert_eq!((error.from, error.to), (*from, to));
                        assert_eq!(
                            error.to_string(),
                            format!("a session cannot go from {from} to {to}")
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn terminal_states_are_the_ones_without_exits() {
        for state in SessionState::ALL {
            let has_exit = SessionState::ALL.iter().any(|to| state.can_become(*to));
            assert_eq!(state.is_terminal(), !has_exit, "{state}");
        }
    }

    #[test]
    fn states_parse_from_their_names() {
        for state in SessionState::ALL {
            assert_eq!(state.as_str().parse::<SessionState>(), Ok(state));
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{state}\"")
            );
        }
        assert!("done".parse::<SessionState>().is_err());
    }
}
