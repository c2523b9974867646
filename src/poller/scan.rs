//! The scan: page through `user_identity` and keep the identities to
//! schedule (active, remote, protocol in `remote_protocols`).
//!
//! One paged full-table read streams the whole table in token order, which
//! is what Cassandra serves fastest: no read per identity, no index. The
//! scan runs in its own task and hands its result to the poller loop, which
//! keeps answering `need_job` meanwhile.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::schedule::{Interval, Key, Kind};
use crate::store::identity::{infos, IdentityKind, Status};
use crate::store::{Store, StoreError};

/// One identity to schedule.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: Kind,
    pub interval: Interval,
    pub last_check: Option<DateTime<Utc>>,
}

pub struct ScanResult {
    pub targets: HashMap<Key, Target>,
    pub rows: usize,
    pub elapsed: std::time::Duration,
}

const PAGE: i32 = 5000;

pub async fn scan(store: &Store, protocols: &[String]) -> Result<ScanResult, StoreError> {
    let started = Instant::now();
    let mut targets = HashMap::new();
    let mut rows = 0usize;
    let mut state = None;
    loop {
        let (page, next) = store.scan_identities(PAGE, state).await?;
        rows += page.len();
        for r in page {
            if r.kind != IdentityKind::Remote || r.status != Status::Active {
                continue;
            }
            if !protocols.iter().any(|p| r.protocol == p.as_str()) {
                continue;
            }
            let Some(kind) = Kind::of_protocol(r.protocol.as_str()) else {
                continue;
            };
            let raw = r
                .infos
                .get(infos::POLLINTERVAL)
                .map(String::as_str)
                .unwrap_or("");
            let (interval, warning) = Interval::parse(raw);
            if let Some(w) = warning {
                tracing::warn!(user = %r.user_id, identity = %r.identity_id, "{w}");
            }
            targets.insert(
                (r.user_id, r.identity_id),
                Target {
                    kind,
                    interval,
                    last_check: r.last_check,
                },
            );
        }
        match next {
            Some(s) => state = Some(s),
            None => break,
        }
    }
    Ok(ScanResult {
        targets,
        rows,
        elapsed: started.elapsed(),
    })
}
