//! One shared service (NATS, Dovecot or Cassandra) stopped mid-sync, then
//! started again (`scripts/stack.sh stop|start`; the full suite only): the
//! interrupted sync must end, and the next one complete, with nothing lost
//! or doubled.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use caliopen_imap::store::identity::infos;
use caliopen_imap::store::Store;

use crate::case::{Case, Row};
use crate::common::{stack, start_worker, wait_job};
use crate::kit::Outcome;
use crate::suite::Suite;

/// One shared service stopped mid-sync, then started again.
pub async fn scenario(suite: &Suite, service: &str) -> Result<Row> {
    let name = match service {
        "nats" => "NATS restart",
        "dovecot" => "Dovecot restart",
        _ => "Cassandra stop/start",
    };
    let mut row = Row {
        name: name.into(),
        ..Default::default()
    };
    let mut case = Case::new(
        &suite.env,
        &suite.store,
        &format!("restart-{service}"),
        suite.env.messages,
    )
    .await?;
    let mut worker = start_worker(&suite.env).await?;
    // Slow answers (200 ms, 64 in flight) so the sync lasts long enough
    // for the fault to land in its middle.
    suite.standin.set_delay(Duration::from_millis(200));
    let total = suite.env.messages as u64;
    let target = case.rng.u64(total / 10..=total / 4);
    let Some(job) = suite
        .order_until(&mut case, target, Duration::from_secs(60))
        .await?
    else {
        bail!("the sync ended before the fault point ({target} hand-offs)");
    };
    if service == "cassandra" {
        case.snapshot(&suite.store).await?;
    }
    let (t_fault, t_back) = outage(suite, service).await?;
    row.rounds = 1;
    suite.standin.set_delay(Duration::ZERO);
    // Bounded: a report lost in a NATS restart must not stall the suite.
    let o = tokio::time::timeout(suite.env.recover_max, wait_job(job))
        .await
        .unwrap_or(Outcome {
            silent: true,
            ..Default::default()
        });
    case.note(&o);
    row.notes.push(interrupted(name, &o));
    // The harness's own session may be dead after a Cassandra restart.
    let store = if service == "cassandra" {
        suite.env.store().await?
    } else {
        suite.store.clone()
    };
    if service != "cassandra" {
        case.snapshot(&store).await?;
    }
    worker.check().await?;
    // Recovered: the first hand-off once the service is back (not one
    // already in flight while it was going down).
    let rec = suite
        .recover(&mut case, &mut worker, t_fault)
        .await?
        .map(|d| {
            suite
                .standin
                .first_after(case.user, t_back)
                .map_or(d, |t| t - t_fault)
        });
    row.recover.push(rec);
    row.blocked = rec.is_none()
        || !case
            .sync_until_complete(&suite.client, &mut worker, Instant::now())
            .await?;
    notes_after(&store, &case, name, &mut row).await?;
    row.crashes = worker.stop().await?;
    case.count(&store, &suite.standin, &mut row).await?;
    Ok(row)
}

/// Stop `service`, wait out the outage (longer for Cassandra), start it
/// again: when it went down and when it was back.
async fn outage(suite: &Suite, service: &str) -> Result<(Instant, Instant)> {
    let t_fault = Instant::now();
    stack(&suite.env, "stop", service).await?;
    let pause = if service == "cassandra" {
        suite.env.outage
    } else {
        Duration::from_secs(3)
    };
    let rest = pause.saturating_sub(t_fault.elapsed());
    tokio::time::sleep(rest).await;
    stack(&suite.env, "start", service).await?;
    let t_back = Instant::now();
    eprintln!(
        "[faults] {service} back after {:.1} s",
        t_fault.elapsed().as_secs_f64()
    );
    Ok((t_fault, t_back))
}

/// What the sync the outage interrupted said of it.
fn interrupted(name: &str, o: &Outcome) -> String {
    format!(
        "{name}: the interrupted sync said ok={:?} failed={} outage={:?} error={:?}{}",
        o.report.as_ref().map(|r| r["ok"].clone()),
        o.num("failed"),
        o.report.as_ref().map(|r| r["outage"].clone()),
        o.report.as_ref().map(|r| r["error"].clone()),
        if o.silent { " (no final report)" } else { "" }
    )
}

/// The last failed report, and the error and syncing state the identity
/// was left with.
async fn notes_after(store: &Store, case: &Case, name: &str, row: &mut Row) -> Result<()> {
    if let Some(r) = case.reports.iter().rev().find(|r| r["ok"] != true) {
        row.notes.push(format!("{name}: last failed report: {r}"));
    }
    if let Some(id) = store.identity(case.user, case.identity).await? {
        row.notes.push(format!(
            "{name}: lastFetchError={:?} syncing={:?}",
            id.info(infos::LAST_FETCH_ERROR),
            id.info(infos::SYNCING)
        ));
    }
    Ok(())
}
