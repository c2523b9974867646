//! Placeholder while the poller mode is written.
use std::process::ExitCode;

pub async fn run(
    _args: crate::cli::PollerArgs,
    _settings: crate::config::PollerSettings,
    _shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
