//! SIGTERM mid-sync: the worker must exit 0 within its grace period, its
//! sync must not report plain success for work it did not do, and a later
//! sync must complete the mailbox.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::case::{Case, Row};
use crate::common::{start_worker, wait_job};
use crate::suite::Suite;

/// SIGTERM mid-sync: exit 0 within the grace period, then complete.
pub async fn scenario(suite: &Suite) -> Result<Row> {
    let mut row = Row {
        name: "SIGTERM mid-sync".into(),
        ..Default::default()
    };
    let mut case = Case::new(&suite.env, &suite.store, "sigterm", suite.env.messages).await?;
    let mut worker = start_worker(&suite.env).await?;
    // Answers in 200 ms (64 in flight): the signal lands mid-sync.
    suite.standin.set_delay(Duration::from_millis(200));
    let target = case
        .rng
        .u64(suite.env.messages as u64 / 5..=suite.env.messages as u64 / 2);
    let Some(job) = suite
        .order_until(&mut case, target, Duration::from_secs(300))
        .await?
    else {
        bail!("the sync ended before the fault point ({target} hand-offs)");
    };
    let grace = Duration::from_secs(suite.settings.imap.shutdown_grace_secs);
    let (code, took) = worker.sigterm(grace + Duration::from_secs(10)).await?;
    let t_fault = Instant::now();
    row.rounds = 1;
    let o = wait_job(job).await;
    case.note(&o);
    suite.standin.set_delay(Duration::ZERO);
    row.notes.push(format!(
        "SIGTERM: exit code {code:?} after {:.1} s; the report said ok={} handed_off={} interrupted={} error={:?}",
        took.as_secs_f64(),
        o.report.as_ref().map(|r| r["ok"].clone()).unwrap_or(Value::Null),
        o.num("handed_off"),
        o.report.as_ref().map(|r| r["interrupted"].clone()).unwrap_or(Value::Null),
        o.report.as_ref().map(|r| r["error"].clone()).unwrap_or(Value::Null),
    ));
    if code != Some(0) {
        row.failures
            .push(format!("worker exit code {code:?} after SIGTERM"));
    }
    let done = o.num("handed_off") + o.num("already_delivered");
    if o.report
        .as_ref()
        .is_some_and(|r| r["ok"] == true && r["interrupted"] != true)
        && done < suite.env.messages as u64
    {
        row.failures
            .push("the interrupted sync reported plain success".into());
    }
    case.snapshot(&suite.store).await?;
    worker.restart().await?;
    row.recover
        .push(suite.recover(&mut case, &mut worker, t_fault).await?);
    suite.finish(case, worker, row).await
}
