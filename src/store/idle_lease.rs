//! Which workers share the live sync, and which identities' servers have no
//! IDLE.
//!
//! `imap_idle_worker` has one row per live worker (partition `bucket = 1`),
//! written by a plain `UPDATE ... USING TTL` every round
//! of its live sync: its budget (`idle_max`, the weight of its share) and
//! the sessions it holds. A worker killed with `kill -9` stops writing and
//! its row lapses after the TTL; a clean stop deletes it. Each worker reads
//! the partition once a round and computes from it who watches which
//! identity (`worker::idle::assign`): the store's work at rest is a write
//! and a one-partition read per worker and round, whatever the sessions.
//!
//! Bucket 0 holds the rows of the workers of before (one lease per session,
//! issue 25); a new worker never reads it, so during a rolling upgrade the
//! two kinds do not count each other as members.
//!
//! `imap_idle_lease` once held a lease per watched identity. It now holds
//! only the markers of identities whose server has no IDLE
//! ([`NO_IDLE_OWNER`], one hour), written plainly and read only when a
//! worker reads the identities wanting IDLE again; the lease rows of workers
//! of before lapse by themselves.

use std::collections::HashSet;

use cdrs_tokio::query::QueryValues;
use cdrs_tokio::query_values;
use chrono::Utc;
use uuid::Uuid;

use super::{col, decode, ttl, Store, StoreError};

/// The owner written for an identity whose server has no IDLE: no worker
/// tries it again until the row lapses.
pub const NO_IDLE_OWNER: &str = "-no-idle";

const MARK: &str = "INSERT INTO {ks}.imap_idle_lease (user_id, identity_id, owner, since) \
     VALUES (?, ?, ?, ?) USING TTL ?";
const ALL: &str = "SELECT user_id, identity_id, owner FROM {ks}.imap_idle_lease";
const ALIVE: &str = "UPDATE {ks}.imap_idle_worker USING TTL ? SET held = ?, budget = ? \
     WHERE bucket = 1 AND worker = ?";
const MEMBERS: &str = "SELECT worker, held, budget FROM {ks}.imap_idle_worker WHERE bucket = 1";
const GONE: &str = "DELETE FROM {ks}.imap_idle_worker WHERE bucket = 1 AND worker = ?";

const PAGE: i32 = 5000;

/// A live worker's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleWorker {
    pub worker: String,
    /// Sessions it held when it last wrote its row.
    pub held: u32,
    pub budget: u32,
}

impl Store {
    /// Record that `key`'s server has no IDLE (or the identity cannot be
    /// watched), for `ttl_secs`.
    pub async fn mark_no_idle(&self, key: (Uuid, Uuid), ttl_secs: u64) -> Result<(), StoreError> {
        self.exec(
            MARK,
            query_values!(key.0, key.1, NO_IDLE_OWNER, Utc::now(), ttl(ttl_secs)),
        )
        .await
        .map(|_| ())
    }

    /// The identities marked by [`Store::mark_no_idle`] (a paged read of
    /// `imap_idle_lease`, which holds only these markers, and for a while
    /// after an upgrade the lapsing leases of the workers of before).
    pub async fn no_idle_marks(&self) -> Result<HashSet<(Uuid, Uuid)>, StoreError> {
        const W: &str = "imap_idle_lease row";
        let mut out = HashSet::new();
        let mut state = None;
        loop {
            let (rows, next) = self
                .page(ALL, QueryValues::SimpleValues(vec![]), PAGE, state)
                .await?;
            for r in &rows {
                let owner: Option<String> = col(r, "owner", W)?;
                if owner.as_deref() != Some(NO_IDLE_OWNER) {
                    continue;
                }
                out.insert((
                    col(r, "user_id", W)?.ok_or_else(|| decode(W, "null user_id"))?,
                    col(r, "identity_id", W)?.ok_or_else(|| decode(W, "null identity_id"))?,
                ));
            }
            match next {
                Some(s) => state = Some(s),
                None => return Ok(out),
            }
        }
    }

    /// Say this worker is alive, holding `held` sessions of `budget`, for
    /// `ttl_secs`.
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

    /// The workers alive now (one partition: a row per worker).
    pub async fn idle_workers(&self) -> Result<Vec<IdleWorker>, StoreError> {
        const W: &str = "imap_idle_worker row";
        let rows = self
            .rows(MEMBERS, QueryValues::SimpleValues(vec![]))
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

    /// Remove this worker's row (clean shutdown): the others take its
    /// identities at their next round.
    pub async fn idle_worker_gone(&self, worker: &str) -> Result<(), StoreError> {
        self.exec(GONE, query_values!(worker)).await.map(|_| ())
    }
}
