//! Logs: human-readable text by default, JSON lines for log collectors.
//!
//! Logging starts before the configuration is read, so that reading it can
//! be traced; the format is therefore chosen twice:
//! - at start, from `CALIOPEN_IMAP_LOG_FORMAT` (`text` or `json`), which is
//!   also the environment override of the `log_format` key;
//! - once the settings are loaded, from `log_format` (file or environment),
//!   swapped in through a reload layer before anything else is logged
//!   (a file that does not load is reported on one plain line, as always).
//!
//! In JSON each line is one object: `timestamp`, `level`, the event's
//! fields flattened (`message` included), and `span`, the fields of the
//! innermost span. Jobs and mailboxes run in spans (`worker/job.rs`,
//! `worker/pipeline.rs`) carrying `user_id`, `identity_id`, `order` and, per
//! mailbox, `mailbox`, so every line about a sync says whose it is.
//! Secrets are never in a field: credentials types hide them in `Debug`,
//! and the crates in [`WIRE_LOGGERS`] are capped at `debug` whatever the
//! filter asks: at `trace` they print the bytes they send (`LOGIN "user"
//! "password"`, XOAUTH2 tokens, orders carrying passwords).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

pub use crate::config::LogFormat;

/// The environment variable read before the configuration loads.
pub const FORMAT_ENV: &str = "CALIOPEN_IMAP_LOG_FORMAT";

/// The format asked for by [`FORMAT_ENV`], before any settings load.
fn format_from_env() -> LogFormat {
    match std::env::var(FORMAT_ENV).as_deref().map(str::trim) {
        Ok(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// Settings that carry a `log_format`.
pub trait LogSettings {
    fn log_format(&self) -> LogFormat;
}

impl LogSettings for crate::config::WorkerSettings {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

impl LogSettings for crate::config::PollerSettings {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

struct State {
    handle: reload::Handle<Boxed, Registry>,
    format: std::sync::Mutex<LogFormat>,
}

static STATE: OnceLock<State> = OnceLock::new();

fn layer(format: LogFormat) -> Boxed {
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        // Colours only for a person at a terminal, never into a file.
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}

/// Logs go to stderr. `CALIOPEN_IMAP_LOG` takes a tracing filter
/// (`debug`, `caliopen_imap=trace`...); without it, `default` (the caller
/// picks it: `info` for daemons, `warn` for the CLI so its own output stays
/// readable, `debug` with `-v`).
pub fn init(default: &str) {
    let filter = std::env::var("CALIOPEN_IMAP_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let format = format_from_env();
    let (fmt, handle) = reload::Layer::new(layer(format));
    let capped = tracing_subscriber::filter::filter_fn(|m| !secret_bearing(m.target(), *m.level()));
    if tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .with(capped)
        .try_init()
        .is_ok()
    {
        let _ = STATE.set(State {
            handle,
            format: std::sync::Mutex::new(format),
        });
    }
}

/// Switch to the format the settings ask for (a no-op when unchanged).
pub fn apply(format: LogFormat) {
    let Some(state) = STATE.get() else { return };
    let mut current = state.format.lock().unwrap_or_else(|p| p.into_inner());
    if *current != format && state.handle.reload(layer(format)).is_ok() {
        *current = format;
    }
}

/// Crates whose `trace` logs hold wire bytes: IMAP commands (async-imap,
/// imap-proto) and NATS operations with their payloads and CONNECT
/// credentials (async-nats).
pub const WIRE_LOGGERS: [&str; 3] = ["async_imap", "imap_proto", "async_nats"];

/// Would a record of `target` at `level` risk printing a secret?
pub fn secret_bearing(target: &str, level: tracing::Level) -> bool {
    level > tracing::Level::DEBUG
        && WIRE_LOGGERS.iter().any(|c| {
            target == *c
                || target
                    .strip_prefix(c)
                    .is_some_and(|rest| rest.starts_with("::"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn wire_loggers_are_capped_at_debug() {
        assert!(secret_bearing("async_imap::imap_stream", Level::TRACE));
        assert!(secret_bearing("async_nats", Level::TRACE));
        assert!(!secret_bearing("async_nats::connection", Level::DEBUG));
        assert!(!secret_bearing("async_imapx", Level::TRACE));
        assert!(!secret_bearing("caliopen_imap::worker", Level::TRACE));
    }
}
