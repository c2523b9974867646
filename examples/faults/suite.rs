//! What every scenario shares: the settings, a Cassandra session, a NATS
//! client and the processor stand-in, the judging of a row's required
//! zeros, and the steps scenarios repeat (order until a fault point, wait
//! for the first hand-off after a fault, sync to the end and count).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use caliopen_imap::config::WorkerSettings;
use caliopen_imap::store::Store;

use crate::case::{Case, Row};
use crate::common::wait_job;
use crate::env::Env;
use crate::kit::{Daemon, Outcome};
use crate::standin::Standin;

/// Shared by every scenario.
pub struct Suite {
    pub env: Env,
    pub settings: WorkerSettings,
    pub store: Store,
    pub client: async_nats::Client,
    pub standin: Standin,
}

impl Suite {
    /// Check the required zeros of a finished row.
    pub fn judge(row: &mut Row) {
        for (what, n) in [
            ("missing", row.missing),
            ("duplicate rows", row.duplicates),
            ("left undelivered", row.undelivered),
            ("extra hand-offs of delivered messages", row.extra),
            ("crashes", row.crashes as usize),
            ("stepped over", row.stepped as usize),
        ] {
            if n > 0 {
                row.failures.push(format!("{n} {what}"));
            }
        }
        if row.blocked {
            row.failures
                .push("the identity stayed refused (lock never given back in time)".into());
        }
    }

    /// Order syncs until one hands something off (or reports completion):
    /// the time from `t_fault` to that first hand-off, and the sync still
    /// running, if any.
    pub async fn first_progress(
        &self,
        case: &mut Case,
        worker: &mut Daemon,
        t_fault: Instant,
    ) -> Result<(Option<Duration>, Option<tokio::task::JoinHandle<Outcome>>)> {
        while t_fault.elapsed() < self.env.recover_max {
            worker.check().await?;
            let fired = self.standin.trigger_after(case.user, 1);
            let mut job = case.order(&self.client, Duration::from_secs(300));
            tokio::select! {
                _ = fired => {
                    let at = self
                        .standin
                        .first_after(case.user, t_fault)
                        .unwrap_or_else(Instant::now);
                    return Ok((Some(at - t_fault), Some(job)));
                }
                o = &mut job => {
                    let o = o.unwrap_or(Outcome { silent: true, ..Default::default() });
                    case.note(&o);
                    if o.complete() {
                        self.standin.clear_trigger();
                        return Ok((Some(t_fault.elapsed()), None));
                    }
                }
            }
            self.standin.clear_trigger();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        self.standin.clear_trigger();
        Ok((None, None))
    }

    /// Order a sync (again while it is refused or unheard) until `target`
    /// more hand-offs have arrived: the sync then running, or `None` when a
    /// sync completed first.
    pub async fn order_until(
        &self,
        case: &mut Case,
        target: u64,
        idle: Duration,
    ) -> Result<Option<tokio::task::JoinHandle<Outcome>>> {
        let since = Instant::now();
        let fired = self.standin.trigger_after(case.user, target);
        tokio::pin!(fired);
        loop {
            let mut job = case.order(&self.client, idle);
            tokio::select! {
                _ = &mut fired => return Ok(Some(job)),
                o = &mut job => {
                    let o = o.unwrap_or(Outcome { silent: true, ..Default::default() });
                    case.note(&o);
                    if o.complete() || o.report.as_ref().is_some_and(|r| r["ok"] == true) {
                        self.standin.clear_trigger();
                        return Ok(None);
                    }
                }
            }
            if since.elapsed() > self.env.recover_max {
                self.standin.clear_trigger();
                bail!("no sync made progress within {:?}", self.env.recover_max);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// [`Suite::first_progress`], then the end of the sync it started.
    pub async fn recover(
        &self,
        case: &mut Case,
        worker: &mut Daemon,
        t_fault: Instant,
    ) -> Result<Option<Duration>> {
        let (rec, job) = self.first_progress(case, worker, t_fault).await?;
        if let Some(j) = job {
            let o = wait_job(j).await;
            case.note(&o);
        }
        Ok(rec)
    }

    /// A scenario's end: sync until the mailbox is complete, stop the
    /// worker, count what landed.
    pub async fn finish(&self, mut case: Case, mut worker: Daemon, mut row: Row) -> Result<Row> {
        if !case
            .sync_until_complete(&self.client, &mut worker, Instant::now())
            .await?
        {
            row.blocked = true;
        }
        row.crashes = worker.stop().await?;
        case.count(&self.store, &self.standin, &mut row).await?;
        Ok(row)
    }
}
