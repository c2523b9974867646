//! `removeremote`: delete an identity, its lookups and our sync state, and
//! tell the poller to unschedule it.
//!
//! A sync running meanwhile would recreate a partial `user_identity` row
//! with its later UPDATEs. So the command takes the identity's sync lock
//! itself for the time of the deletion: while a sync holds it, it refuses;
//! once it holds it, no sync can start, and the deleted row stays deleted.

use std::process::ExitCode;

use chrono::Utc;

use super::{common, locks};
use crate::bus::wire::{orders, CacheOrder};
use crate::cli::RemoveRemoteArgs;
use crate::config::WorkerSettings;
use crate::error;
use crate::store::identity::Identity;
use crate::store::Store;

pub async fn run(a: RemoveRemoteArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let which = common::IdentityRef::parse(&a.identifier, &a.remoteid)?;
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    let id = which.resolve(&store, user_id).await?;
    let bus = common::bus(s).await?;

    let owner = format!("imapctl-removeremote-{}", std::process::id());
    let now = Utc::now();
    let taken = store
        .take_sync_lock(
            id.user_id,
            id.identity_id,
            &owner,
            now,
            s.imap.lock_ttl_secs,
        )
        .await?;
    if !taken {
        let held = locks::read(&store, &id, now)
            .await?
            .lock
            .map(|l| format!(" (lock {})", l.describe()))
            .unwrap_or_default();
        return Err(error::conflict(format!(
            "{}: a sync is running{held}: try again when it ends; \
             `imapctl unlock` clears a lock left by a stopped sync",
            id.identifier
        )));
    }
    let result = remove(&store, &id, now).await;
    // The row is gone either way: a lapsed TTL would free it too.
    if let Err(e) = store
        .release_sync_lock(id.user_id, id.identity_id, &owner)
        .await
    {
        tracing::warn!(error = %e, "cannot release removeremote's sync lock; it lapses by its TTL");
    }
    result?;

    let order = CacheOrder {
        identity_id: id.identity_id.to_string(),
        order: orders::CACHE_DELETE.into(),
        order_param: String::new(),
        protocol: id.protocol.to_string(),
        user_id: user_id.to_string(),
    };
    bus.publish(&s.nats_topic_poller_cache, &order).await?;
    bus.flush().await?;
    println!("removed {} ({})", id.identifier, id.identity_id);
    Ok(ExitCode::SUCCESS)
}

/// Under our lock: refuse over a Go worker's live marker, else delete.
async fn remove(store: &Store, id: &Identity, now: chrono::DateTime<Utc>) -> anyhow::Result<()> {
    if let Some(m) = locks::read(store, id, now)
        .await?
        .marker
        .filter(|m| m.honoured_by_go())
    {
        return Err(error::conflict(format!(
            "{}: {}, which may still be syncing: try again when it ends, or clear it \
             with `imapctl unlock --force`",
            id.identifier,
            m.describe()
        )));
    }
    store.delete_identity(id).await?;
    store.delete_sync_state(id.user_id, id.identity_id).await?;
    Ok(())
}
