//! `syncremote`: order a sync of a stored identity; `--wait` follows it.

use std::process::ExitCode;

use super::common;
use crate::bus::wire::{orders, ImapOrder};
use crate::cli::SyncRemoteArgs;
use crate::config::WorkerSettings;
use crate::error;
use crate::store::identity::creds;

pub async fn run(a: SyncRemoteArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let which = common::IdentityRef::parse(&a.identifier, &a.remoteid)?;
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    let id = which.resolve(&store, user_id).await?;
    let stored = id
        .credentials
        .get(creds::PASSWORD_IN)
        .is_some_and(|p| !p.is_empty())
        || !id
            .credentials
            .get(creds::ACCESS_TOKEN)
            .is_none_or(|t| t.is_empty());
    let prompt = format!("IMAP password for {}: ", id.identifier);
    let password = common::password(
        &a.pass,
        &a.pass_env,
        &a.pass_file,
        (!stored).then_some(prompt.as_str()),
    )?;
    if !stored && password.is_none() {
        return Err(error::usage(format!(
            "no password is stored for {}: give one with --pass-env, --pass-file or --pass",
            id.identifier
        )));
    }
    let bus = common::bus(s).await?;
    let order = ImapOrder {
        order: orders::SYNC.into(),
        user_id: user_id.to_string(),
        identity_id: id.identity_id.to_string(),
        password: password.unwrap_or_default(),
        ..Default::default()
    };
    let what = format!("sync of {}", id.identifier);
    common::send_order(s, &bus, &order, a.wait, a.timeout, &what).await
}
