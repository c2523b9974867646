//! Error kinds that callers branch on, and the one place that turns an error
//! into a process exit code.
//!
//! Library code returns typed errors ([`StoreError`], [`BusError`], ...) or
//! `anyhow::Error` with context at the edges; where the exit code must tell
//! failures apart and no subsystem error says it, the root cause is one of
//! the [`Failure`] kinds below. Errors keep their type all the way up:
//! [`exit`], called once in `app::run`, walks the chain once to pick the
//! code and prints the one line, as ripgrep's `main` does.

use std::process::ExitCode;

use crate::bus::BusError;
use crate::config::ConfigError;
use crate::pidfile::PidFileError;
use crate::store::StoreError;

/// Exit codes, documented in the README ("Exit codes").
pub mod code {
    /// Everything asked for was done.
    pub const OK: u8 = 0;
    /// The work ran and failed (a sync reported errors, a remote refused the login...).
    pub const FAILED: u8 = 1;
    /// Bad command line, bad configuration file or value.
    pub const USAGE: u8 = 2;
    /// A user, identity or other named record does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The record already exists (for example a remote identity for that login).
    pub const CONFLICT: u8 = 4;
    /// Cassandra or NATS could not be reached, no worker listens or one
    /// stopped answering, or a job was cut short by a worker's shutdown, an
    /// outage or a server throttling it: running it again later should do.
    pub const UNAVAILABLE: u8 = 5;
}

/// A failure whose kind matters to the caller or to the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

impl Failure {
    pub fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) | Failure::Config(_) => code::USAGE,
            Failure::NotFound(_) => code::NOT_FOUND,
            Failure::Conflict(_) => code::CONFLICT,
            Failure::Unavailable(_) => code::UNAVAILABLE,
            Failure::Failed(_) => code::FAILED,
        }
    }
}

/// Shorthand constructors, so call sites read `Err(usage!("..."))`-free.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Failure::Usage(msg.into()).into()
}
pub fn not_found(msg: impl Into<String>) -> anyhow::Error {
    Failure::NotFound(msg.into()).into()
}
pub fn conflict(msg: impl Into<String>) -> anyhow::Error {
    Failure::Conflict(msg.into()).into()
}
pub fn unavailable(msg: impl Into<String>) -> anyhow::Error {
    Failure::Unavailable(msg.into()).into()
}
pub fn failed(msg: impl Into<String>) -> anyhow::Error {
    Failure::Failed(msg.into()).into()
}

/// The documented code of one error of a chain, if its type says one:
/// an unreachable Cassandra or NATS is "run it again later", any other
/// store or bus error a plain failure.
fn code_of(e: &(dyn std::error::Error + 'static)) -> Option<u8> {
    if let Some(f) = e.downcast_ref::<Failure>() {
        return Some(f.code());
    }
    if e.downcast_ref::<ConfigError>().is_some() {
        return Some(code::USAGE);
    }
    if let Some(e) = e.downcast_ref::<PidFileError>() {
        return Some(match e {
            PidFileError::Held(_) => code::CONFLICT,
            PidFileError::Io(_) => code::FAILED,
        });
    }
    if let Some(e) = e.downcast_ref::<StoreError>() {
        return Some(match e {
            StoreError::Unavailable { .. } => code::UNAVAILABLE,
            _ => code::FAILED,
        });
    }
    if let Some(e) = e.downcast_ref::<BusError>() {
        return Some(match e {
            BusError::Unavailable { .. } => code::UNAVAILABLE,
            _ => code::FAILED,
        });
    }
    None
}

/// The exit code for an error: the first error of its chain whose type
/// says a code decides; anything else is a plain failure.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain().find_map(code_of).unwrap_or(code::FAILED)
}

/// The edge: print `err` as one line (causes joined by ": ") and return
/// the exit code its chain asks for.
pub fn exit(prog: &str, err: &anyhow::Error) -> ExitCode {
    eprintln!("{prog}: error: {err:#}");
    ExitCode::from(exit_code(err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn kind_survives_context() {
        let err: anyhow::Result<()> = Err(not_found("no such user 'bob'"));
        let err = err.context("addremote").unwrap_err();
        assert_eq!(exit_code(&err), code::NOT_FOUND);
        assert_eq!(format!("{err:#}"), "addremote: no such user 'bob'");
    }

    #[test]
    fn config_and_pid_file_errors_map_to_their_codes() {
        let err = anyhow::Error::from(ConfigError("bad key".into())).context("worker");
        assert_eq!(exit_code(&err), code::USAGE);
        assert_eq!(format!("{err:#}"), "worker: bad key");
        let held = anyhow::Error::from(PidFileError::Held("held".into()));
        assert_eq!(exit_code(&held), code::CONFLICT);
        let io = anyhow::Error::from(PidFileError::Io("io".into()));
        assert_eq!(exit_code(&io), code::FAILED);
    }

    #[test]
    fn plain_errors_are_failures() {
        let err = anyhow::anyhow!("boom");
        assert_eq!(exit_code(&err), code::FAILED);
    }

    #[test]
    fn store_and_bus_errors_keep_their_type_to_the_edge() {
        let unreachable: anyhow::Result<()> = Err(StoreError::Unavailable {
            hosts: "127.0.0.1:9042".into(),
            reason: "refused".into(),
        }
        .into());
        let err = unreachable.context("listremotes").unwrap_err();
        assert_eq!(exit_code(&err), code::UNAVAILABLE);
        assert_eq!(
            format!("{err:#}"),
            "listremotes: cannot reach Cassandra at 127.0.0.1:9042: refused"
        );
        let query = anyhow::Error::from(StoreError::Query {
            what: "x".into(),
            reason: "y".into(),
        });
        assert_eq!(exit_code(&query), code::FAILED);
        let nats = anyhow::Error::from(BusError::Unavailable {
            url: "nats://127.0.0.1:4222".into(),
            reason: "refused".into(),
        });
        assert_eq!(exit_code(&nats), code::UNAVAILABLE);
        let silent = anyhow::Error::from(BusError::NoResponders("s".into()));
        assert_eq!(exit_code(&silent), code::FAILED);
    }
}
