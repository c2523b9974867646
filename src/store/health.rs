//! The health of the services behind a daemon, as its `/readyz` tells it:
//! Cassandra, and the object store where one is configured. One background
//! task checks them every [`REFRESH`]; a probe reads the last answers from
//! memory.
//!
//! Why: `/readyz` used to query Cassandra on every request, so a burst of
//! probes (several kubelets, a load balancer, a script in a loop) held as
//! many connections and queries. Now Cassandra sees at most one query per
//! period, whatever the probes do (test
//! `ops::a_burst_of_readiness_probes_queries_cassandra_once_per_refresh`).
//!
//! The object store is needed only for messages over `raw_size_limit`, so
//! its state never makes a daemon unready: while it does not answer, large
//! messages wait and the daemon says so. Its check is the start-up one (a
//! HEAD on the bucket, which is created when missing), repeated, so a
//! store that comes back is used again without a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::objects::Objects;
use super::Store;
use crate::shutdown::Shutdown;

/// How often the services are checked.
pub const REFRESH: Duration = Duration::from_secs(5);

/// One check waits this long for its answer.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The last answers; `None` before the first check (and, for the object
/// store, when none is configured). `Err` holds why, for the probe's text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    pub store: Option<Result<(), String>>,
    pub objects: Option<Result<(), String>>,
}

/// The last answers, refreshed in the background. Cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    last: Arc<Mutex<Checked>>,
}

impl Health {
    /// Check once (bounded by the check's timeout), then every
    /// [`REFRESH`] in the background until `shutdown`: a process that says
    /// it is ready has its first answer, so `/readyz` never reports
    /// "waiting for the first answer" after the "ready" log line.
    pub async fn start(store: Store, objects: Option<Objects>, shutdown: Shutdown) -> Health {
        let health = Health::default();
        health.check(&store, objects.as_ref()).await;
        let h = health.clone();
        tokio::spawn(async move { h.run(store, objects, shutdown).await });
        health
    }

    /// What the last check found.
    pub fn last(&self) -> Checked {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn run(&self, store: Store, objects: Option<Objects>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            self.check(&store, objects.as_ref()).await;
        }
    }

    /// Ask both stores once and keep their answers.
    async fn check(&self, store: &Store, objects: Option<&Objects>) {
        let (s, o) = tokio::join!(check_store(store), async {
            match objects {
                Some(o) => Some(check_objects(o).await),
                None => None,
            }
        });
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        log_object_store_change(last.objects.as_ref(), o.as_ref());
        *last = Checked {
            store: Some(s),
            objects: o,
        };
    }
}

async fn check_store(store: &Store) -> Result<(), String> {
    match tokio::time::timeout(TIMEOUT, store.ping()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "Cassandra did not answer within {} s",
            TIMEOUT.as_secs()
        )),
    }
}

async fn check_objects(objects: &Objects) -> Result<(), String> {
    match tokio::time::timeout(TIMEOUT, objects.ensure_bucket()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the object store did not answer within {} s",
            TIMEOUT.as_secs()
        )),
    }
}

/// Say when the object store stops or starts answering (the first check
/// included: a store down at start-up is worth a warning).
fn log_object_store_change(before: Option<&Result<(), String>>, now: Option<&Result<(), String>>) {
    match (before, now) {
        (Some(Err(_)), Some(Ok(()))) => tracing::info!("the object store answers again"),
        (None | Some(Ok(())), Some(Err(e))) => tracing::warn!(
            error = %e,
            "the object store does not answer: messages over raw_size_limit wait until it does"
        ),
        _ => {}
    }
}
