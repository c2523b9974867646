//! Placeholder while the worker mode is written.
use std::process::ExitCode;

pub async fn run(
    _args: crate::cli::WorkerArgs,
    _settings: crate::config::WorkerSettings,
    _shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
