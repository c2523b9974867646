//! `listremotes`: a user's remote identities and where their syncs stand,
//! as a table or (`--json`) as machine output. Messages stepped over after
//! too many failures are listed here, so nothing is skipped unseen, and so
//! is a running or stranded sync: its lock (owner, start, last renewal,
//! expiry) and Caliopen's `syncing` marker, a Go worker's included.

use std::process::ExitCode;

use serde::Serialize;

use chrono::{DateTime, Utc};

use super::{common, locks};
use crate::cli::ListRemotesArgs;
use crate::config::WorkerSettings;
use crate::store::identity::{infos, Identity};
use crate::store::{Store, StoreError};

#[derive(Debug, Serialize)]
struct Row {
    identity_id: String,
    identifier: String,
    server: String,
    status: String,
    pollinterval: String,
    lastsync: String,
    lastseenuid: String,
    errors: String,
    last_error: String,
    failing_messages: u32,
    stepped_over: Vec<String>,
    /// Our lock row, while a sync holds it.
    sync_lock: Option<locks::LockView>,
    /// `infos.syncing` (owner null: written by a Go worker).
    syncing_marker: Option<locks::Marker>,
}

pub async fn run(a: ListRemotesArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    let mut rows = Vec::new();
    let now = Utc::now();
    for id in store.identities_of(user_id).await? {
        if id.is_remote_email() {
            rows.push(row(&store, &id, now).await?);
        }
    }
    rows.sort_by(|a, b| a.identifier.cmp(&b.identifier));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("user {user_id} has no remote identity");
    } else {
        print_table(&rows, s.imap.lock_ttl_secs / 2);
    }
    Ok(ExitCode::SUCCESS)
}

/// Read what is shown of one identity.
async fn row(store: &Store, id: &Identity, now: DateTime<Utc>) -> Result<Row, StoreError> {
    let failures = store.message_failures(id.user_id, id.identity_id).await?;
    let stepped = failures
        .iter()
        .filter(|f| f.stepped_over)
        .map(|f| {
            format!(
                "{} uid {} ({} tries): {}",
                f.mailbox, f.uid, f.tries, f.last_error
            )
        })
        .collect();
    let sync = locks::read(store, id, now).await?;
    Ok(Row {
        identity_id: id.identity_id.to_string(),
        identifier: id.identifier.clone(),
        server: id.info(infos::INSERVER).to_string(),
        status: id.status.to_string(),
        pollinterval: id.info(infos::POLLINTERVAL).to_string(),
        lastsync: id.info(infos::LASTSYNC).to_string(),
        lastseenuid: id.info(infos::LASTSEENUID).to_string(),
        errors: id.info(infos::ERRORS_COUNT).to_string(),
        last_error: id.info(infos::LAST_FETCH_ERROR).to_string(),
        failing_messages: failures.iter().filter(|f| !f.stepped_over).count() as u32,
        stepped_over: stepped,
        sync_lock: sync.lock,
        syncing_marker: sync.marker,
    })
}

/// The `SYNC` column. A lock not renewed for `stale_after` seconds is
/// what `unlock` clears without --force.
fn sync_column(r: &Row, stale_after: u64) -> String {
    match (&r.sync_lock, &r.syncing_marker) {
        (Some(l), _) if l.renewed_secs_ago >= stale_after => "stale".into(),
        (Some(_), _) => "running".into(),
        (None, Some(m)) if m.by_go_worker() => "go-marker".into(),
        (None, Some(_)) => "marker".into(),
        (None, None) => "-".into(),
    }
}

/// The table, then a line for each lock, marker and message of note.
fn print_table(rows: &[Row], stale_after: u64) {
    let header = [
        "ID",
        "IDENTIFIER",
        "SERVER",
        "STATUS",
        "POLL",
        "LASTSYNC",
        "LASTSEENUID",
        "ERRORS",
        "SYNC",
        "LAST ERROR",
    ];
    let table: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            [
                r.identity_id.clone(),
                r.identifier.clone(),
                r.server.clone(),
                r.status.clone(),
                r.pollinterval.clone(),
                r.lastsync.clone(),
                r.lastseenuid.clone(),
                r.errors.clone(),
                sync_column(r, stale_after),
                r.last_error.chars().take(60).collect(),
            ]
        })
        .collect();
    for l in super::common::table_lines(&header, &table) {
        println!("{l}");
    }
    for r in rows {
        if let Some(l) = &r.sync_lock {
            println!("{}: sync lock {}", r.identifier, l.describe());
        }
        if let Some(m) = &r.syncing_marker {
            println!("{}: {}", r.identifier, m.describe());
        }
        for s in &r.stepped_over {
            println!("stepped over in {}: {s}", r.identifier);
        }
        if r.failing_messages > 0 {
            println!(
                "{}: {} message(s) failed and will be retried at the next sync",
                r.identifier, r.failing_messages
            );
        }
    }
}
