//! kill -9 of the worker at seeded points of a sync, several rounds on one
//! mailbox: a crash at any point must lose nothing, store nothing twice
//! and hand off again only what was in flight. The lock a dead worker
//! holds lapses with its TTL, so recovery is timed per round.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::case::{Case, Row};
use crate::common::{start_worker, wait_job};
use crate::kit::Outcome;
use crate::suite::Suite;

/// Kill -9 of the worker at seeded points of a sync, `rounds` times.
pub async fn scenario(suite: &Suite) -> Result<Row> {
    let mut row = Row {
        name: "kill -9 worker".into(),
        ..Default::default()
    };
    let mut case = Case::new(&suite.env, &suite.store, "kill9", suite.env.messages).await?;
    let mut worker = start_worker(&suite.env).await?;
    let total = suite.env.messages as u64;
    // The sync started by the recovery of the last round, still running.
    let mut running: Option<tokio::task::JoinHandle<Outcome>> = None;
    for r in 0..suite.env.kill_rounds {
        // From the stand-in's records, not Cassandra: the sync that
        // recovered is running, and must not race ahead meanwhile.
        let left = total.saturating_sub(suite.standin.distinct_of(case.user) as u64);
        if left < 2 {
            row.notes.push(format!(
                "kill -9: the mailbox was complete after {r} rounds"
            ));
            break;
        }
        // Spread the kill points so every round lands inside the sync.
        let share = (left / (suite.env.kill_rounds - r) as u64).max(1);
        let target = case.rng.u64(1..=(share * 2).min(left - 1));
        match reach_kill_point(suite, &mut case, &mut running, target).await {
            Point::Reached => {}
            Point::Ended => {
                row.notes.push(format!(
                    "kill -9 round {}: the sync ended before the kill point",
                    r + 1
                ));
                break;
            }
            Point::Blocked => {
                row.blocked = true;
                break;
            }
        }
        worker.kill9().await?;
        let t_fault = Instant::now();
        row.rounds += 1;
        case.snapshot(&suite.store).await?;
        worker.restart().await?;
        // The next sync, ordered at once (refused while the lock holds).
        let (rec, job) = suite
            .first_progress(&mut case, &mut worker, t_fault)
            .await?;
        row.recover.push(rec);
        running = job;
        if rec.is_none() {
            row.blocked = true;
            break;
        }
    }
    if let Some(j) = running.take() {
        let o = wait_job(j).await;
        case.note(&o);
    }
    if !row.blocked
        && !case
            .sync_until_complete(&suite.client, &mut worker, Instant::now())
            .await?
    {
        row.blocked = true;
    }
    row.crashes = worker.stop().await?;
    case.count(&suite.store, &suite.standin, &mut row).await?;
    Ok(row)
}

/// How a round's wait for its kill point ended.
enum Point {
    Reached,
    /// A sync completed the mailbox first.
    Ended,
    /// The identity stayed refused for longer than `recover_max`.
    Blocked,
}

/// Order a sync (or go on with the one still running) until `target` more
/// hand-offs have arrived: the point where the worker is killed.
async fn reach_kill_point(
    suite: &Suite,
    case: &mut Case,
    running: &mut Option<tokio::task::JoinHandle<Outcome>>,
    target: u64,
) -> Point {
    let since = Instant::now();
    loop {
        let fired = suite.standin.trigger_after(case.user, target);
        let job = match running.take() {
            Some(j) => j,
            None => case.order(&suite.client, Duration::from_secs(300)),
        };
        let ended = tokio::select! {
            _ = fired => None,
            o = wait_job(job) => Some(o),
        };
        suite.standin.clear_trigger();
        let Some(o) = ended else {
            return Point::Reached;
        };
        case.note(&o);
        if o.complete() {
            return Point::Ended;
        }
        if since.elapsed() > suite.env.recover_max {
            return Point::Blocked;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
