//! imapctl: on-demand commands, one file each.
//!
//! Commands that only touch Cassandra (`addremote`, `listremotes`,
//! `removeremote`, `unlock`) do their work themselves; `syncremote` and `fullfetch`
//! publish an order for the workers and, with `--wait`, follow it to its end.
//! Every failure is one line on stderr and a documented exit code.

mod addremote;
mod common;
mod fullfetch;
mod listremotes;
mod locks;
mod removeremote;
mod retry;
pub mod status;
mod syncremote;
mod unlock;

use std::process::ExitCode;

use crate::cli::{CtlArgs, CtlCmd};
use crate::config::WorkerSettings;
use crate::shutdown::Shutdown;

pub async fn run(
    args: CtlArgs,
    settings: WorkerSettings,
    _shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    match args.cmd {
        CtlCmd::AddRemote(a) => addremote::run(a, &settings).await,
        CtlCmd::SyncRemote(a) => syncremote::run(a, &settings).await,
        CtlCmd::FullFetch(a) => fullfetch::run(a, &settings).await,
        CtlCmd::ListRemotes(a) => listremotes::run(a, &settings).await,
        CtlCmd::RemoveRemote(a) => removeremote::run(a, &settings).await,
        CtlCmd::Unlock(a) => unlock::run(a, &settings).await,
        CtlCmd::Status(a) => status::run(a, &settings).await,
        CtlCmd::Retry(a) => retry::run(a, &settings).await,
        // Printed by app before the runtime starts.
        CtlCmd::Config(_) => Ok(ExitCode::SUCCESS),
    }
}
