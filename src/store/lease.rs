//! The idpoller leader lease.
//!
//! Whoever holds the `idpoller_lease` row schedules; the others stand by.
//! The row is taken with `INSERT ... IF NOT EXISTS USING TTL` and renewed
//! with `UPDATE ... USING TTL ... IF owner = me`, both lightweight
//! transactions, so at most one poller holds it at any instant and a dead
//! leader's row vanishes after the TTL.

use cdrs_tokio::query_values;
use chrono::Utc;

use super::{Store, StoreError};

const TAKE: &str = "INSERT INTO {ks}.idpoller_lease (name, owner, since) VALUES (?, ?, ?) \
     IF NOT EXISTS USING TTL ?";
const RENEW: &str = "UPDATE {ks}.idpoller_lease USING TTL ? SET owner = ?, since = ? \
     WHERE name = ? IF owner = ?";
const DROP: &str = "DELETE FROM {ks}.idpoller_lease WHERE name = ? IF owner = ?";

impl Store {
    /// Take the lease if free, or renew it if `owner` holds it. `true` when
    /// `owner` holds it afterwards.
    pub async fn hold_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_secs: u32,
    ) -> Result<bool, StoreError> {
        let ttl = ttl_secs as i32;
        let now = Utc::now();
        if self
            .lwt(RENEW, query_values!(ttl, owner, now, name, owner))
            .await?
        {
            return Ok(true);
        }
        self.lwt(TAKE, query_values!(name, owner, now, ttl)).await
    }

    /// Give the lease up (clean shutdown), so a standby takes over at once.
    pub async fn drop_lease(&self, name: &str, owner: &str) -> Result<bool, StoreError> {
        self.lwt(DROP, query_values!(name, owner)).await
    }
}
