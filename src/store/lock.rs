//! The per-identity sync lock.
//!
//! The Go worker read `infos.syncing` and then wrote it: two workers could
//! both see it free and both sync. Here the lock is a row of
//! `imap_sync_lock` taken with `INSERT ... IF NOT EXISTS` (a Paxos round in
//! Cassandra), so exactly one taker wins. The row carries a TTL equal to the
//! stale-lock age (24 h by default): a worker that dies holding it cannot
//! block the identity longer than that. It is released with
//! `DELETE ... IF owner = ?`, so a worker can only release its own lock.
//! `infos.syncing` is still written for Caliopen's readers.

use cdrs_tokio::query_values;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

const TAKE: &str = "INSERT INTO {ks}.imap_sync_lock (user_id, identity_id, owner, since) \
     VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?";
const RELEASE: &str = "DELETE FROM {ks}.imap_sync_lock WHERE user_id = ? AND identity_id = ? \
     IF owner = ?";

impl Store {
    /// Try to take the lock; `true` when this caller now holds it.
    pub async fn take_sync_lock(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        owner: &str,
        since: DateTime<Utc>,
        ttl_secs: u64,
    ) -> Result<bool, StoreError> {
        let ttl = ttl_secs.min(i32::MAX as u64) as i32;
        self.lwt(TAKE, query_values!(user_id, identity_id, owner, since, ttl))
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
}
