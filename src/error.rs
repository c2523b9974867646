//! Error kinds that callers branch on, and the one place that turns an error
//! into a process exit code.
//!
//! Library code returns `anyhow::Error` with context at the edges; where a
//! caller (or the exit code) must tell failures apart, the root cause is one
//! of the [`Failure`] kinds below. [`exit_code`] walks the error chain, so a
//! kind wrapped in any amount of context still maps to its documented code.

use std::process::ExitCode;

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
    /// stopped answering, or a job was cut short by a worker's shutdown or
    /// an outage: running it again later should do.
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

/// The exit code for an error: the first [`Failure`] found in its chain
/// decides; anything else is a plain failure.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    let code = err
        .chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map(Failure::code)
        .unwrap_or(code::FAILED);
    ExitCode::from(code)
}

/// Print an error the way every mode does: one line, causes joined by ": ".
pub fn report(prog: &str, err: &anyhow::Error) {
    eprintln!("{prog}: error: {err:#}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn kind_survives_context() {
        let err: anyhow::Result<()> = Err(not_found("no such user 'bob'"));
        let err = err.context("addremote").unwrap_err();
        assert_eq!(exit_code(&err), ExitCode::from(code::NOT_FOUND));
        assert_eq!(format!("{err:#}"), "addremote: no such user 'bob'");
    }

    #[test]
    fn plain_errors_are_failures() {
        let err = anyhow::anyhow!("boom");
        assert_eq!(exit_code(&err), ExitCode::from(code::FAILED));
    }
}
