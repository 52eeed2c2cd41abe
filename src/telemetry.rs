//! Logging for the `troupe` binary: human-readable or JSON lines on standard error (standard
//! output stays free for command output and for the stdio MCP transport), and panics reported
//! as log events with their location. Libraries embedding a node install their own subscriber.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber and the panic hook. `filter` is a tracing filter directive
/// (`info`, `info,troupe=debug`); the configuration validated it already.
pub fn init(format: LogFormat, filter: &str) {
    init_with_writer(format, filter, std::io::stderr);
}

/// [`init`], with the lines going to `writer` instead of standard error (`troupe bench` keeps
/// a node's log in a file, so that the figures include its cost without flooding the terminal).
pub fn init_with_writer<W>(format: LogFormat, filter: &str, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
