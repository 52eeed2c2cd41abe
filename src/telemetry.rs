//! Logging for the `troupe` binary: human-readable or JSON lines on standard error (standard
//! output stays free for command output and for the stdio MCP transport), and panics reported
//! as log events with their location. Libraries embedding a node install their own subscriber.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber and the panic hook. `filter` is a tracing filter directive
/// (`info`, `info,troupe=debug`); the configuration validated it already. Colours only on a
/// terminal, and not with `NO_COLOR` set: a log file, journald or the client of `troupe mcp`
/// that keeps its stderr gets plain text.
pub fn init(format: LogFormat, filter: &str) {
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    install(format, filter, std::io::stderr, ansi);
}

/// [`init`], with the lines going to `writer` instead of standard error (`troupe bench` keeps
/// a node's log in a file, so that the figures include its cost without flooding the terminal);
/// no colours.
pub fn init_with_writer<W>(format: LogFormat, filter: &str, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    install(format, filter, writer, false);
}

/// Whether log lines carry ANSI colours: on a terminal, unless `NO_COLOR` is set to anything
/// but the empty string (<https://no-color.org>).
fn colours(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

fn install<W>(format: LogFormat, filter: &str, writer: W, ansi: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Pretty => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    if installed.is_ok() {
        install_panic_hook();
    }
}

/// Reports panics as ERROR events (an actor's panic is also reported by its supervisor's
/// restart line; this one carries the source location).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("(non-text panic payload)");
        let location = info
            .location()
            .map(|location| format!("{}:{}", location.file(), location.line()))
            .unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(panic = %message, %location, %backtrace, "panic");
        } else {
            tracing::error!(panic = %message, %location, "panic");
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(!colours(false, None));
        assert!(!colours(true, Some("1".as_ref())));
        // NO_COLOR set but empty does not count (no-color.org).
        assert!(colours(true, Some("".as_ref())));
        assert!(!colours(false, Some("".as_ref())));
    }
}
