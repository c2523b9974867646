//! The processor absent (no responders) for more syncs than
//! `max_message_tries`: messages may fail but must not be stepped over for
//! an outage of ours, and everything lands once it is back.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::case::{Case, Row};
use crate::common::{start_worker, wait_job};
use crate::standin::Mode;
use crate::suite::Suite;

/// The processor absent for more than `max_message_tries` syncs.
pub async fn scenario(suite: &Suite) -> Result<Row> {
    let mut row = Row {
        name: "processor absent".into(),
        ..Default::default()
    };
    let n = (suite.env.messages / 10).max(30);
    let mut case = Case::new(&suite.env, &suite.store, "absent", n).await?;
    let mut worker = start_worker(&suite.env).await?;
    suite.standin.set_mode(Mode::Absent).await?;
    let syncs = suite.settings.imap.max_message_tries + 1;
    for _ in 0..syncs {
        let o = wait_job(case.order(&suite.client, Duration::from_secs(300))).await;
        case.note(&o);
        row.rounds += 1;
        worker.check().await?;
    }
    let stepped_during: u64 = case
        .reports
        .iter()
        .map(|r| r["stepped_over"].as_u64().unwrap_or(0))
        .sum();
    suite.standin.set_mode(Mode::Normal).await?;
    let t_back = Instant::now();
    let failed: Vec<String> = case
        .reports
        .iter()
        .map(|r| format!("{}/{}", r["failed"], r["stepped_over"]))
        .collect();
    row.notes.push(format!(
        "processor absent: {syncs} syncs without it (failed/stepped over per sync: {}); stepped over meanwhile: {stepped_during}",
        failed.join(" ")
    ));
    row.recover
        .push(suite.recover(&mut case, &mut worker, t_back).await?);
    suite.finish(case, worker, row).await
}
