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
//! `infos.syncing` is still written for Caliopen's readers (see `job.rs`).

use cdrs_tokio::query_values;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

const TAKE: &str = "INSERT INTO {ks}.imap_sync_lock (user_id, identity_id, owner, since) \
     VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?";
// Both cells are rewritten: a cell written by the INSERT would otherwise
// expire with the INSERT's TTL.
const RENEW: &str = "UPDATE {ks}.imap_sync_lock USING TTL ? SET owner = ?, since = ? \
     WHERE user_id = ? AND identity_id = ? IF owner = ?";
const RELEASE: &str = "DELETE FROM {ks}.imap_sync_lock WHERE user_id = ? AND identity_id = ? \
     IF owner = ?";

fn ttl(secs: u64) -> i32 {
    secs.min(i32::MAX as u64) as i32
}

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
}
