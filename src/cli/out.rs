//! What the client commands print on standard output. A reader that goes away early
//! (`troupe events --tail 200 | head -1`) is a normal end, not a failure: the command stops
//! quietly with exit code 141, what a program killed by SIGPIPE reports in a shell (Rust
//! ignores SIGPIPE, so a plain `println!` would panic instead).
//!
//! Not for `troupe mcp`'s protocol output (its transport handles a closed stdout) nor for
//! `troupe node`, which prints nothing there.

use std::io::Write;
use std::process::ExitCode;

/// Standard output was closed by its reader.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub(crate) struct StdoutClosed;

/// The exit code of a command whose standard output was closed: 128 + SIGPIPE.
pub(crate) const CLOSED_EXIT_CODE: u8 = 141;

/// Writes `text` to standard output and flushes it; a closed stdout is [`StdoutClosed`].
pub(crate) fn write(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(error) => Err(anyhow::Error::new(error).context("cannot write to standard output")),
    }
}

/// The exit code for a command's error when it is only that stdout was closed.
pub(crate) fn closed_exit_code(error: &anyhow::Error) -> Option<ExitCode> {
    error
        .chain()
        .any(|cause| cause.is::<StdoutClosed>())
        .then(|| ExitCode::from(CLOSED_EXIT_CODE))
}

/// `println!` that returns an error instead of panicking: `outln!("{x}")?`.
macro_rules! outln {
    () => {
        $crate::cli::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that returns an error instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::write(format_args!($($arg)*))
    };
}

pub(crate) use {out, outln};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_stdout_anywhere_in_the_chain_is_recognised() {
        let error = anyhow::Error::new(StdoutClosed).context("printing the list");
        assert_eq!(
            closed_exit_code(&error),
            Some(ExitCode::from(CLOSED_EXIT_CODE))
        );
        assert_eq!(closed_exit_code(&anyhow::anyhow!("other")), None);
    }
}
