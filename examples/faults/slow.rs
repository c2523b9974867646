//! The processor slower than the worker's hand-off timeout for some
//! messages: the late ones are handed off again (counted apart, as
//! downstream sees them twice) and nothing else repeats.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::case::{Case, Row};
use crate::common::{start_worker, wait_job};
use crate::suite::Suite;

/// The processor slower than the worker's hand-off timeout for some messages.
pub async fn scenario(suite: &Suite) -> Result<Row> {
    let mut row = Row {
        name: "processor slow".into(),
        ..Default::default()
    };
    let n = (suite.env.messages / 10).max(30);
    let mut case = Case::new(&suite.env, &suite.store, "slow", n).await?;
    let mut worker = start_worker(&suite.env).await?;
    let late = Duration::from_secs(suite.settings.imap.lda_timeout_secs + 2);
    suite.standin.set_slow(case.user, late, 20);
    let t = Instant::now();
    let o = wait_job(case.order(&suite.client, Duration::from_secs(300))).await;
    case.note(&o);
    row.rounds = 1;
    // Let the late answers arrive before the retry.
    tokio::time::sleep(Duration::from_secs(3)).await;
    case.snapshot(&suite.store).await?;
    if !case
        .sync_until_complete(&suite.client, &mut worker, Instant::now())
        .await?
    {
        row.blocked = true;
    }
    row.recover.push(Some(t.elapsed()));
    row.crashes = worker.stop().await?;
    case.count(&suite.store, &suite.standin, &mut row).await?;
    row.notes.push(format!(
        "processor slow: 20 answers {} s late (timeout {} s); {} of them handed off again (processed twice downstream)",
        late.as_secs(),
        suite.settings.imap.lda_timeout_secs,
        row.late
    ));
    Ok(row)
}
