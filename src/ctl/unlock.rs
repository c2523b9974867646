//! `unlock`: clear a sync lock, and Caliopen's `syncing` marker, left by a
//! sync that stopped without releasing them (a killed worker, a lost
//! Cassandra connection). A lock still being renewed belongs to a running
//! sync and is only cleared with `--force`; so is a Go worker's marker that
//! Go workers still honour, since nothing tells whether that worker lives.
//!
//! Everything is decided from one read before anything is cleared, and the
//! lock is deleted with `IF owner = <the owner read>`, so a lock taken or
//! renewed by someone else in between is never removed.

use std::process::ExitCode;

use chrono::Utc;

use super::{common, locks};
use crate::cli::UnlockArgs;
use crate::config::WorkerSettings;
use crate::error;
use crate::store::identity::infos;

pub async fn run(a: UnlockArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let which = common::IdentityRef::parse(&a.identifier, &a.remoteid)?;
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    let id = which.resolve(&store, user_id).await?;
    let now = Utc::now();
    let state = locks::read(&store, &id, now).await?;
    // A renewing sync renews every lock_ttl/3: two missed renewals = stopped.
    let stale_after = s.imap.lock_ttl_secs / 2;
    let who = &id.identifier;

    if !a.force {
        if let Some(l) = &state.lock {
            if l.renewed_secs_ago < stale_after {
                return Err(error::conflict(format!(
                    "{who}: the sync lock is live ({}); it goes when that sync ends, \
                     or clear it anyway with --force",
                    l.describe()
                )));
            }
        } else if let Some(m) = state.marker.as_ref().filter(|m| m.honoured_by_go()) {
            return Err(error::conflict(format!(
                "{who}: {}, which Go workers honour for 24 h and never renew; \
                 if no Go worker is syncing this identity, clear it with --force",
                m.describe()
            )));
        }
    }

    let mut done = Vec::new();
    if let Some(l) = &state.lock {
        let deleted = store
            .force_release_sync_lock(id.user_id, id.identity_id, &l.owner)
            .await?;
        if !deleted {
            return Err(error::conflict(format!(
                "{who}: the sync lock changed while clearing it (another sync took it): \
                 nothing cleared, see listremotes"
            )));
        }
        done.push(format!("the sync lock {}", l.describe()));
    }
    if let Some(m) = &state.marker {
        store
            .remove_infos(
                id.user_id,
                id.identity_id,
                &[infos::SYNCING, infos::SYNCING_OWNER],
            )
            .await?;
        done.push(format!("the {}", m.describe()));
    }
    if done.is_empty() {
        println!("{who}: nothing to unlock (no sync lock, no syncing marker)");
    } else {
        println!("{who}: cleared {}", done.join(" and "));
    }
    Ok(ExitCode::SUCCESS)
}
