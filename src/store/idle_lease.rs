//! Who watches which identity with IDLE, and which workers share them.
//!
//! A row of `imap_idle_lease` per watched identity names the worker holding
//! its IDLE session. Like the sync lock ([`super::lock`]) it is taken with
//! `INSERT ... IF NOT EXISTS USING TTL`, renewed with `UPDATE ... IF owner`
//! and released with `DELETE ... IF owner`, so exactly one worker holds an
//! identity's session, and the rows of a worker killed with `kill -9` lapse
//! after the TTL for another to take. `imap_idle_worker` has one row per
//! live worker (also with a TTL): how many workers share the identities,
//! which is what spreads the sessions when a worker is added.

use cdrs_tokio::query::QueryValues;
use cdrs_tokio::query_values;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{col, decode, ttl, Store, StoreError};

/// The owner written for an identity whose server has no IDLE: no worker
/// tries it again until the row lapses.
pub const NO_IDLE_OWNER: &str = "-no-idle";

const TAKE: &str = "INSERT INTO {ks}.imap_idle_lease (user_id, identity_id, owner, since) \
     VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?";
const RENEW: &str = "UPDATE {ks}.imap_idle_lease USING TTL ? SET owner = ?, since = ? \
     WHERE user_id = ? AND identity_id = ? IF owner = ?";
const RELEASE: &str = "DELETE FROM {ks}.imap_idle_lease WHERE user_id = ? AND identity_id = ? \
     IF owner = ?";
const ALL: &str = "SELECT user_id, identity_id, owner FROM {ks}.imap_idle_lease";
const ALIVE: &str = "UPDATE {ks}.imap_idle_worker USING TTL ? SET held = ?, budget = ? \
     WHERE bucket = 0 AND worker = ?";
const WORKERS: &str = "SELECT worker, held, budget FROM {ks}.imap_idle_worker WHERE bucket = 0";
const GONE: &str = "DELETE FROM {ks}.imap_idle_worker WHERE bucket = 0 AND worker = ?";

const PAGE: i32 = 5000;

/// One lease row as read by the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleLease {
    pub user_id: Uuid,
    pub identity_id: Uuid,
    pub owner: String,
}

/// A live worker's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleWorker {
    pub worker: String,
    pub held: u32,
    pub budget: u32,
}

impl Store {
    /// Take the IDLE lease of an identity; `true` when `owner` holds it now.
    pub async fn take_idle_lease(
        &self,
        key: (Uuid, Uuid),
        owner: &str,
        since: DateTime<Utc>,
        ttl_secs: u64,
    ) -> Result<bool, StoreError> {
        self.lwt(
            TAKE,
            query_values!(key.0, key.1, owner, since, ttl(ttl_secs)),
        )
        .await
    }

    /// Renew a lease `owner` holds; `false` when it is not theirs any more.
    pub async fn renew_idle_lease(
        &self,
        key: (Uuid, Uuid),
        owner: &str,
        since: DateTime<Utc>,
        ttl_secs: u64,
    ) -> Result<bool, StoreError> {
        self.lwt(
            RENEW,
            query_values!(ttl(ttl_secs), owner, since, key.0, key.1, owner),
        )
        .await
    }

    /// Release a lease if `owner` holds it.
    pub async fn release_idle_lease(
        &self,
        key: (Uuid, Uuid),
        owner: &str,
    ) -> Result<bool, StoreError> {
        self.lwt(RELEASE, query_values!(key.0, key.1, owner)).await
    }

    /// Every lease held now (a paged full read: a row per watched identity).
    pub async fn idle_leases(&self) -> Result<Vec<IdleLease>, StoreError> {
        const W: &str = "imap_idle_lease row";
        let mut out = Vec::new();
        let mut state = None;
        loop {
            let (rows, next) = self
                .page(ALL, QueryValues::SimpleValues(vec![]), PAGE, state)
                .await?;
            for r in &rows {
                out.push(IdleLease {
                    user_id: col(r, "user_id", W)?.ok_or_else(|| decode(W, "null user_id"))?,
                    identity_id: col(r, "identity_id", W)?
                        .ok_or_else(|| decode(W, "null identity_id"))?,
                    owner: col(r, "owner", W)?.unwrap_or_default(),
                });
            }
            match next {
                Some(s) => state = Some(s),
                None => return Ok(out),
            }
        }
    }

    /// Say this worker is alive, holding `held` sessions of `budget`.
    pub async fn idle_worker_alive(
        &self,
        worker: &str,
        held: u32,
        budget: u32,
        ttl_secs: u64,
    ) -> Result<(), StoreError> {
        let (held, budget) = (
            held.min(i32::MAX as u32) as i32,
            budget.min(i32::MAX as u32) as i32,
        );
        self.exec(ALIVE, query_values!(ttl(ttl_secs), held, budget, worker))
            .await
            .map(|_| ())
    }

    /// The workers alive now.
    pub async fn idle_workers(&self) -> Result<Vec<IdleWorker>, StoreError> {
        const W: &str = "imap_idle_worker row";
        let rows = self
            .rows(WORKERS, QueryValues::SimpleValues(vec![]))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(IdleWorker {
                    worker: col(r, "worker", W)?.unwrap_or_default(),
                    held: col::<i32>(r, "held", W)?.unwrap_or(0).max(0) as u32,
                    budget: col::<i32>(r, "budget", W)?.unwrap_or(0).max(0) as u32,
                })
            })
            .collect()
    }

    /// Remove this worker's row (clean shutdown).
    pub async fn idle_worker_gone(&self, worker: &str) -> Result<(), StoreError> {
        self.exec(GONE, query_values!(worker)).await.map(|_| ())
    }
}
