//! The port that runs `chat` sessions, [`ChatRunner`], and how a chat run's events read.
//!
//! A chat run is delivered to its session exactly like a process: through a [`ProcessSink`]
//! (the session's restart-surviving handle), as [`ProcessEvent::Output`] and then one
//! [`ProcessEvent::Exited`]. So the SessionActor stores, publishes, times out and cancels chat
//! runs with the same machinery as processes.
//!
//! Conventions of a chat run's events:
//! - The reply arrives as `Output { stream: Tokens, lines }` where each entry of `lines` is a
//!   piece of text as it streamed in (pieces may hold line breaks): the session's output log,
//!   concatenated in order, is the reply.
//! - A failure is one `Output { stream: Stderr }` line saying what went wrong, then
//!   `Exited { code: Some(1) }`. Success is `Exited { code: Some(0) }`. A run stopped by
//!   [`ChatRunner::cancel`] exits with no code and no signal.

use std::sync::Arc;

use super::context::OutputInterpreter;
use super::ports::{ExitStatus, ProcessSink, RunnerError};
use super::spec::ChatSession;
use crate::event::OutputStream;
use crate::ids::SessionId;

/// Runs chat sessions through the node's providers.
pub trait ChatRunner: Send + Sync + 'static {
    /// Starts the run of `chat` for `session`; its events go to `sink`.
    fn start(
        &self,
        session: &SessionId,
        chat: &ChatSession,
        sink: Arc<dyn ProcessSink>,
    ) -> Result<(), RunnerError>;

    /// Points a run's events at a new sink (after a restart of the session's actor); events the
    /// old sink refused are delivered first. False when the runner does not know the session.
    fn reattach(&self, session: &SessionId, sink: Arc<dyn ProcessSink>) -> bool;

    /// Stops the run; it then exits with no code. False when it is not running.
    fn cancel(&self, session: &SessionId) -> bool;
}

/// Reads a chat run's events: its outcome is its exit code, and a failure's reason is the
/// error line the runner printed.
#[derive(Debug, Default)]
pub struct ChatInterpreter {
    error: Option<String>,
}

impl OutputInterpreter for ChatInterpreter {
    fn feed(&mut self, stream: OutputStream, line: &str) -> Vec<super::OutputSignal> {
        if stream == OutputStream::Stderr {
            self.error = Some(line.to_owned());
        }
        Vec::new()
    }

    fn outcome(&self, exit: &ExitStatus) -> Option<Result<(), String>> {
        Some(if exit.success() {
            Ok(())
        } else {
            Err(self
                .error
                .clone()
                .unwrap_or_else(|| super::describe_exit(exit)))
        })
    }
}

/// A runner error for a chat session on a node without providers.
pub(super) fn no_providers() -> String {
    "chat sessions run through the node's providers, and none is configured: add a \
     [[providers]] section"
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_failure_reads_as_the_line_the_runner_printed() {
        let mut interpreter = ChatInterpreter::default();
        interpreter.feed(OutputStream::Tokens, "Hello");
        let ok = ExitStatus {
            code: Some(0),
            signal: None,
        };
        assert_eq!(interpreter.outcome(&ok), Some(Ok(())));
        let failed = ExitStatus {
            code: Some(1),
            signal: None,
        };
        assert_eq!(
            interpreter.outcome(&failed),
            Some(Err("exit code 1".into()))
        );
        interpreter.feed(OutputStream::Stderr, "openai/gpt-4o: rate limited");
        assert_eq!(
            interpreter.outcome(&failed),
            Some(Err("openai/gpt-4o: rate limited".into()))
        );
    }
}
