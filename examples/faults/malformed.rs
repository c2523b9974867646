//! Seeded malformed payloads (random bytes, broken JSON, wrong types, huge
//! values, bad ids) on every subject the worker and the poller listen on:
//! neither may crash, stop answering, or grow without bound.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::case::Row;
use crate::common::{start_poller, start_worker};
use crate::kit::{fnv, order_sync, Daemon};
use crate::suite::Suite;

/// Seeded malformed payloads on every subject the daemons listen on.
pub async fn scenario(suite: &Suite) -> Result<Row> {
    let mut row = Row {
        name: "malformed payloads".into(),
        ..Default::default()
    };
    let mut worker = start_worker(&suite.env).await?;
    let mut poller = start_poller(&suite.env).await?;
    let mut rng = fastrand::Rng::with_seed(suite.env.seed ^ fnv("malformed"));
    // Warm both up (their first answers allocate) before measuring.
    answering(suite, &worker, &poller).await?;
    let (w0, p0) = (worker.rss_kb(), poller.rss_kb());
    let subjects = [
        suite.env.subject("outboundIMAP"),
        suite.env.subject("imapJobs"),
        suite.env.subject("twitterJobs"),
        suite.env.subject("mastodonJobs"),
        suite.env.subject("idCache"),
    ];
    let inbox = suite.client.new_inbox();
    let mut replies = suite.client.subscribe(format!("{inbox}.*")).await?;
    let t = Instant::now();
    for i in 0..suite.env.payloads {
        let subject = subjects[i as usize % subjects.len()].clone();
        let payload = malformed_payload(&mut rng);
        if rng.bool() {
            suite
                .client
                .publish_with_reply(subject, format!("{inbox}.{i}"), payload.into())
                .await?;
        } else {
            suite.client.publish(subject, payload.into()).await?;
        }
        if i % 200 == 199 {
            suite.client.flush().await?;
            worker.check().await?;
            poller.check().await?;
        }
    }
    suite.client.flush().await?;
    // Drain the answers until quiet.
    let mut answered = 0u64;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), replies.next()).await {
        answered += 1;
    }
    worker.check().await?;
    poller.check().await?;
    let ok = answering(suite, &worker, &poller).await;
    let (w1, p1) = (worker.rss_kb(), poller.rss_kb());
    row.rounds = 1;
    row.messages = 0;
    row.notes.push(format!(
        "malformed: {} payloads over {} subjects in {:.1} s, {answered} answers; RSS worker {w0} → {w1} kB, poller {p0} → {p1} kB",
        suite.env.payloads,
        subjects.len(),
        t.elapsed().as_secs_f64()
    ));
    if let Err(e) = ok {
        row.failures
            .push(format!("a daemon stopped answering: {e}"));
    }
    row.crashes = worker.stop().await? + poller.stop().await?;
    Ok(row)
}

/// Both daemons answer a well-formed request: the worker a sync of an
/// unknown identity (an error report), the poller a `need_job`.
async fn answering(suite: &Suite, _worker: &Daemon, _poller: &Daemon) -> Result<()> {
    let o = order_sync(
        suite.client.clone(),
        suite.env.subject("outboundIMAP"),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Duration::from_secs(60),
    )
    .await;
    if o.report.is_none() {
        bail!("the worker did not answer a sync order within 60 s");
    }
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        suite.client.request(
            suite.env.subject("imapJobs"),
            r#"{"worker":"faults","order":{"order":"need_job"}}"#.into(),
        ),
    )
    .await;
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("the poller did not answer need_job: {e}"),
        Err(_) => bail!("the poller did not answer need_job within 30 s"),
    }
}

/// One malformed payload: random bytes, broken JSON, wrong types, huge or
/// hostile values, valid shapes with bad ids. Sync and fullfetch orders only
/// ever name random identities or an unreachable loopback port.
fn malformed_payload(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(..10) {
        0 => {
            let mut b = vec![0u8; rng.usize(0..512)];
            rng.fill(&mut b);
            b
        }
        1 => {
            // Truncated valid JSON.
            let s = json!({"order": "sync", "user_id": Uuid::new_v4().to_string(),
                "identity_id": Uuid::new_v4().to_string()})
            .to_string();
            let cut = rng.usize(0..s.len());
            s.as_bytes()[..cut].to_vec()
        }
        2 => {
            // Deep nesting.
            let d = rng.usize(1..2000);
            format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()
        }
        3 => {
            // A large string value (up to 256 KB).
            let big = "x".repeat(rng.usize(1..262_144));
            json!({"order": order_name(rng), "user_id": big, "identity_id": uuidish(rng)})
                .to_string()
                .into_bytes()
        }
        4 => json!({"order": {"order": order_name(rng)}, "worker": rng.u32(..)})
            .to_string()
            .into_bytes(),
        5 => {
            let protocol = ["email", "imap", "", "twitter"][rng.usize(..4)];
            json!({"order": order_name(rng), "user_id": uuidish(rng),
                "identity_id": uuidish(rng), "order_param": uuidish(rng),
                "protocol": protocol})
            .to_string()
            .into_bytes()
        }
        6 => json!({"order": "fullfetch", "user_id": Uuid::new_v4().to_string(),
            "login": "nobody", "password": "x", "server": format!("127.0.0.1:{}", rng.u16(1..3)),
            "mailbox": "INBOX"})
        .to_string()
        .into_bytes(),
        7 => json!([1, "two", null, {"order": order_name(rng)}])
            .to_string()
            .into_bytes(),
        8 => b"".to_vec(),
        _ => {
            // Valid UTF-8 JSON with invalid UTF-8 bytes spliced in.
            let mut b = json!({"order": order_name(rng), "user_id": uuidish(rng)})
                .to_string()
                .into_bytes();
            let at = rng.usize(0..b.len());
            b.insert(at, 0xff);
            b
        }
    }
}

/// A value where an id goes: a fresh id, or something that is not one.
fn uuidish(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(..5) {
        0 => json!(Uuid::new_v4().to_string()),
        1 => json!(""),
        2 => json!("not-a-uuid"),
        3 => json!(rng.i64(..)),
        _ => json!(null),
    }
}

/// An order name: a real one, one of another daemon, or a wrong one.
fn order_name(rng: &mut fastrand::Rng) -> Value {
    let names = [
        "sync",
        "fullfetch",
        "deliver",
        "test",
        "need_job",
        "add",
        "delete",
        "update_interval",
        "",
        "SYNC",
        "process_raw",
        "\u{0}",
        "ß",
    ];
    json!(names[rng.usize(..names.len())])
}
