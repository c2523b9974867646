//! A few seeded messages expunged on Dovecot (doveadm expunge) while a sync
//! fetches them: the sync must carry on, and the counts must leave the
//! expunged messages out rather than call them missing.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use caliopen_imap::store::raw_message::raw_message_id;
use uuid::Uuid;

use crate::case::{Case, Row};
use crate::common::{doveadm, mailbox_uids, start_worker, wait_job};
use crate::suite::Suite;

/// A few seeded messages expunged (doveadm expunge) mid-sync.
pub async fn scenario(suite: &Suite) -> Result<Row> {
    let mut row = Row {
        name: "expunge mid-sync".into(),
        ..Default::default()
    };
    let mut case = Case::new(&suite.env, &suite.store, "expunge", suite.env.messages).await?;
    let worker = start_worker(&suite.env).await?;
    suite.standin.set_delay(Duration::from_millis(200));
    let total = suite.env.messages as u64;
    let target = case.rng.u64(total / 5..=total / 2);
    let Some(job) = suite
        .order_until(&mut case, target, Duration::from_secs(300))
        .await?
    else {
        bail!("the sync ended before the fault point ({target} hand-offs)");
    };
    let (uids, _) = mailbox_uids(&suite.env, &case.login)?;
    // Some around the point reached, some far ahead.
    let mut pick = Vec::new();
    for _ in 0..3 {
        let near = (target as usize + case.rng.usize(0..64)).min(uids.len() - 1);
        pick.push(uids[near]);
        pick.push(uids[case.rng.usize(uids.len() * 3 / 4..uids.len())]);
    }
    pick.sort_unstable();
    pick.dedup();
    let set: Vec<String> = pick.iter().map(u32::to_string).collect();
    doveadm(
        &suite.env,
        &[
            "expunge",
            "-u",
            &case.login,
            "mailbox",
            "INBOX",
            "uid",
            &set.join(","),
        ],
    )?;
    let t_fault = Instant::now();
    case.expunged.extend(pick.iter().copied());
    row.rounds = 1;
    let o = wait_job(job).await;
    case.note(&o);
    suite.standin.set_delay(Duration::ZERO);
    let handed: HashSet<Uuid> = suite
        .standin
        .records_of(case.user)
        .iter()
        .map(|r| r.msg)
        .collect();
    let before = pick
        .iter()
        .filter(|&&u| {
            handed.contains(&raw_message_id(
                case.user,
                case.identity,
                "INBOX",
                case.uidvalidity,
                u,
            ))
        })
        .count();
    row.notes.push(format!(
        "expunge: UIDs {} expunged ({before} of them fetched before); the sync said ok={:?} failed={} error={:?}",
        set.join(","),
        o.report.as_ref().map(|r| r["ok"].clone()),
        o.num("failed"),
        o.report.as_ref().map(|r| r["error"].clone())
    ));
    row.recover.push(
        suite
            .standin
            .first_after(case.user, t_fault)
            .map(|t| t - t_fault),
    );
    case.snapshot(&suite.store).await?;
    suite.finish(case, worker, row).await
}
