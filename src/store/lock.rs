//! The per-identity sync lock.
//!
//! The Go worker read `infos.syncing` and then wrote it: two workers could
//! both see it free and both sync. Here the lock is a row of
//! `imap_sync_lock` taken with `INSERT ... IF NOT EXISTS` (a Paxos round in
//! Cassandra), so exactly one taker wins. The row lives `lock_ttl_secs`
//! (a minute by default) and the running sync renews it every third of that
//! with `UPDATE ... IF owner = ?`, so a worker killed with `kill -9` stops
//! blocking its identities within a minute, while a live one keeps its lock
//! however long the sync runs. It is released with `DELETE ... IF owner = ?`,
//! so a worker can only release (or renew) its own lock.
//! The owner is unique to one sync (the worker's id and the number of the
//! sync in that process), so a late release of an earlier sync of the same
//! worker can never remove a later one's lock.
//! `infos.syncing` is still written for Caliopen's readers (see `job.rs`),
//! and cleared with a condition on its value and owner for the same reason.
//!
//! imapctl reads the row ([`Store::sync_lock`]) to show a running sync and
//! clears a lock whose owner stopped renewing it
//! ([`Store::force_release_sync_lock`]): WRITETIME(owner) is the last
//! renewal, TTL(owner) the seconds left, both kept by Cassandra itself.

use cdrs_tokio::query_values;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{col, ttl, Store, StoreError};

const TAKE: &str = "INSERT INTO {ks}.imap_sync_lock (user_id, identity_id, owner, since) \
     VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?";
// Both cells are rewritten: a cell written by the INSERT would otherwise
// expire with the INSERT's TTL.
const RENEW: &str = "UPDATE {ks}.imap_sync_lock USING TTL ? SET owner = ?, since = ? \
     WHERE user_id = ? AND identity_id = ? IF owner = ?";
const RELEASE: &str = "DELETE FROM {ks}.imap_sync_lock WHERE user_id = ? AND identity_id = ? \
     IF owner = ?";

// Caliopen's marker, removed only as the sync that wrote it left it: a later
// sync's marker (another `syncing` or `syncing_owner`) stays.
const CLEAR_MARKER: &str = "UPDATE {ks}.user_identity SET infos = infos - ? \
     WHERE user_id = ? AND identity_id = ? \
     IF infos['syncing'] = ? AND infos['syncing_owner'] = ?";

const READ: &str = "SELECT owner, since, WRITETIME(owner) AS renewed, TTL(owner) AS expires_in \
     FROM {ks}.imap_sync_lock WHERE user_id = ? AND identity_id = ?";
const PUT_AT: &str = "INSERT INTO {ks}.imap_sync_lock (user_id, identity_id, owner, since) \
     VALUES (?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?";

/// A sync lock as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// Who holds it: `<worker id>/<sync number>`, or `imapctl-removeremote-<pid>`.
    pub owner: String,
    /// When the sync took it.
    pub since: Option<DateTime<Utc>>,
    /// When it was last written (taken or renewed).
    pub renewed: Option<DateTime<Utc>>,
    /// Seconds until it lapses, if it has a TTL.
    pub expires_in: Option<u32>,
}

impl LockInfo {
    /// Seconds since the last renewal (0 if in the future or unknown).
    pub fn renewed_secs_ago(&self, now: DateTime<Utc>) -> u64 {
        self.renewed
            .map(|r| now.signed_duration_since(r).num_seconds().max(0) as u64)
            .unwrap_or(0)
    }
}

impl Store {
    /// The lock of (user, identity), if one is held.
    pub async fn sync_lock(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<Option<LockInfo>, StoreError> {
        const W: &str = "imap_sync_lock row";
        let rows = self.rows(READ, query_values!(user_id, identity_id)).await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let renewed = col::<i64>(r, "renewed", W)?.and_then(DateTime::<Utc>::from_timestamp_micros);
        Ok(Some(LockInfo {
            owner: col(r, "owner", W)?.unwrap_or_default(),
            since: col(r, "since", W)?,
            renewed,
            expires_in: col::<i32>(r, "expires_in", W)?.map(|t| t.max(0) as u32),
        }))
    }

    /// Delete the lock if `owner` (as read just before) still holds it, so a
    /// lock taken or renewed by someone else in between is never removed.
    /// `true` when it was deleted.
    pub async fn force_release_sync_lock(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        owner: &str,
    ) -> Result<bool, StoreError> {
        self.release_sync_lock(user_id, identity_id, owner).await
    }

    /// Write a lock row as if `owner` had last renewed it at `written`: for
    /// tests and the fault harness, which cannot wait for a real lock to age.
    pub async fn put_sync_lock_at(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        owner: &str,
        since: DateTime<Utc>,
        written: DateTime<Utc>,
        ttl_secs: u32,
    ) -> Result<(), StoreError> {
        let ttl = ttl_secs.min(i32::MAX as u32) as i32;
        let ts = written.timestamp_micros();
        self.exec(
            PUT_AT,
            query_values!(user_id, identity_id, owner, since, ttl, ts),
        )
        .await
        .map(|_| ())
    }

    /// Try to take the lock; `true` when this caller now holds it.
    pub async fn take_sync_lock(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        owner: &str,
        since: DateTime<Utc>,
        ttl_secs: u64,
    ) -> Result<bool, StoreError> {
        self.lwt(
            TAKE,
            query_values!(user_id, identity_id, owner, since, ttl(ttl_secs)),
        )
        .await
    }

    /// Give the lock `owner` holds another `ttl_secs`; `false` when it is no
    /// longer theirs (it lapsed or was cleared by `imapctl unlock --force`).
    pub async fn renew_sync_lock(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        owner: &str,
        since: DateTime<Utc>,
        ttl_secs: u64,
    ) -> Result<bool, StoreError> {
        self.lwt(
            RENEW,
            query_values!(ttl(ttl_secs), owner, since, user_id, identity_id, owner),
        )
        .await
    }

    /// Release the lock if `owner` holds it; `true` when it was released.
    pub async fn release_sync_lock(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        owner: &str,
    ) -> Result<bool, StoreError> {
        self.lwt(RELEASE, query_values!(user_id, identity_id, owner))
            .await
    }

    /// Remove Caliopen's `syncing` marker (and `syncing_owner`) if they are
    /// still `text` and `owner`, as one sync wrote them; `true` when removed.
    pub async fn clear_syncing_marker(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        text: &str,
        owner: &str,
    ) -> Result<bool, StoreError> {
        use super::identity::infos;
        let keys = vec![infos::SYNCING.to_string(), infos::SYNCING_OWNER.to_string()];
        self.lwt(
            CLEAR_MARKER,
            query_values!(keys, user_id, identity_id, text, owner),
        )
        .await
    }
}
