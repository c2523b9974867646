//! What imapctl knows about a running or stranded sync of one identity: our
//! lock row (`imap_sync_lock`) and Caliopen's `infos.syncing` marker. Shared
//! by `listremotes` (show it), `unlock` (clear it) and `removeremote` (refuse
//! to delete under a running sync).
//!
//! A `syncing` marker without `syncing_owner` was written by a Go worker (or
//! by a worker of ours too old to write the owner). Go workers never renew it
//! and honour it for 24 h (CONTRACT §5), so only its age says anything.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::store::identity::{time_text, Identity};
use crate::store::lock::LockInfo;
use crate::store::Store;
use crate::store::StoreError;

/// How long a Go worker honours its `syncing` marker.
pub const GO_MARKER_HONOURED_SECS: u64 = 24 * 3600;

/// The sync-related state of one identity.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncState {
    pub lock: Option<LockView>,
    pub marker: Option<Marker>,
}

/// The lock row, ready to print.
#[derive(Debug, Clone, Serialize)]
pub struct LockView {
    pub owner: String,
    pub since: String,
    /// RFC 3339 time of the last renewal.
    pub renewed: String,
    pub renewed_secs_ago: u64,
    /// Seconds until Cassandra drops the row; null without a TTL.
    pub expires_in_secs: Option<u32>,
}

/// Caliopen's `infos.syncing` marker.
#[derive(Debug, Clone, Serialize)]
pub struct Marker {
    /// The value as stored (an RFC 3339 time when well formed).
    pub since: String,
    /// `infos.syncing_owner`; null for a Go worker's marker.
    pub owner: Option<String>,
    /// Seconds since `since`; null when it does not parse.
    pub age_secs: Option<u64>,
}

impl Marker {
    pub fn by_go_worker(&self) -> bool {
        self.owner.is_none()
    }

    /// A Go worker's marker that Go workers still honour.
    pub fn honoured_by_go(&self) -> bool {
        self.by_go_worker() && self.age_secs.is_some_and(|a| a < GO_MARKER_HONOURED_SECS)
    }
}

fn rfc3339(t: Option<DateTime<Utc>>) -> String {
    t.map(time_text).unwrap_or_default()
}

/// Read the lock row and the marker of `id`.
pub async fn read(
    store: &Store,
    id: &Identity,
    now: DateTime<Utc>,
) -> Result<SyncState, StoreError> {
    let lock = store
        .sync_lock(id.user_id, id.identity_id)
        .await?
        .map(|l| view(&l, now));
    let marker = id.syncing().filter(|m| !m.text.is_empty()).map(|m| Marker {
        since: m.text.to_string(),
        owner: Some(m.owner).filter(|o| !o.is_empty()).map(str::to_string),
        age_secs: m
            .since
            .map(|t| now.signed_duration_since(t).num_seconds().max(0) as u64),
    });
    Ok(SyncState { lock, marker })
}

pub fn view(l: &LockInfo, now: DateTime<Utc>) -> LockView {
    LockView {
        owner: l.owner.clone(),
        since: rfc3339(l.since),
        renewed: rfc3339(l.renewed),
        renewed_secs_ago: l.renewed_secs_ago(now),
        expires_in_secs: l.expires_in,
    }
}

impl LockView {
    /// `held by W since T, renewed N s ago, expires in M s`.
    pub fn describe(&self) -> String {
        let expiry = match self.expires_in_secs {
            Some(s) => format!("expires in {s} s"),
            None => "no expiry".into(),
        };
        format!(
            "held by {} since {}, renewed {} s ago, {expiry}",
            self.owner, self.since, self.renewed_secs_ago
        )
    }
}

impl Marker {
    pub fn describe(&self) -> String {
        match &self.owner {
            Some(o) => format!("syncing marker of {o} since {}", self.since),
            None => format!("syncing marker of a Go worker since {}", self.since),
        }
    }
}
