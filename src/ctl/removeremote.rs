//! `removeremote`: delete an identity, its lookups and our sync state, and
//! tell the poller to unschedule it.

use std::process::ExitCode;

use super::common;
use crate::bus::wire::{orders, CacheOrder};
use crate::cli::RemoveRemoteArgs;
use crate::config::WorkerSettings;
use crate::error::Failure;

pub async fn run(a: RemoveRemoteArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let which = common::IdentityRef::parse(&a.identifier, &a.remoteid)?;
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    let id = which.resolve(&store, user_id).await?;
    let bus = common::bus(s).await?;
    store.delete_identity(&id).await.map_err(Failure::from)?;
    store
        .delete_sync_state(id.user_id, id.identity_id)
        .await
        .map_err(Failure::from)?;
    let order = CacheOrder {
        identity_id: id.identity_id.to_string(),
        order: orders::CACHE_DELETE.into(),
        order_param: String::new(),
        protocol: id.protocol.clone(),
        user_id: user_id.to_string(),
    };
    bus.publish(&s.nats_topic_poller_cache, &order)
        .await
        .map_err(Failure::from)?;
    bus.flush().await.map_err(Failure::from)?;
    println!("removed {} ({})", id.identifier, id.identity_id);
    Ok(ExitCode::SUCCESS)
}
