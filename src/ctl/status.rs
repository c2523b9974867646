//! `status`: the operator's view of remote identities, one user's or (with
//! `--all`) every user's, and a monitoring probe: it exits 1 when any
//! identity shown is unhealthy, so a cron job or a Nagios-style check can
//! alert on it without parsing anything.
//!
//! An identity is unhealthy when (each is a `problems` entry):
//! - it is not `active` (disabled after failing too long, or by hand);
//! - it has an error streak: `errorsCount` > 0 (the remote account fails)
//!   or `lastFetchError` set (the last sync failed, an outage of ours
//!   included: a successful sync clears both);
//! - or, with no account error counted, its server throttled the last sync
//!   (`throttled`: the reason, server and time; never counted towards
//!   disabling it, cleared by the next clean sync);
//! - messages were stepped over (`imap_message_failure`, `stepped_over`):
//!   they were never handed off, see `imapctl retry`;
//! - a folder cannot be synced (`imap_mailbox_error`);
//! - its sync lock is stale: not renewed for `lock_ttl_secs / 2`, so the
//!   sync that held it stopped (see `imapctl unlock`).
//!
//! Messages that failed but will be retried by the next sync are shown and
//! are not a problem by themselves.
//!
//! The next due time is computed from `last_check` + `pollinterval` the way
//! a leading poller computes it when it builds its schedule: the live
//! schedule exists only in the leader's memory, and asking it over NATS for
//! every identity would cost more than this read.
//!
//! It also says when messages over `raw_size_limit` cannot be stored now:
//! the object store does not answer (they wait in their mailbox, and the
//! sync that meets one stops there as an outage of ours), or none is
//! configured (they are stepped over). One line on stdout after the table,
//! on stderr with `--json`; it does not change the exit code, which is about
//! identities.
//!
//! `--all` pages through `user_identity` (the poller's scan) and prints each
//! page as it comes, so memory stays bounded at 100k identities; a table's
//! column widths are therefore per page.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{common, locks};
use crate::cli::StatusArgs;
use crate::config::WorkerSettings;
use crate::error;
use crate::poller::schedule::Interval;
use crate::store::identity::{infos, time_text, Identity, Status, Throttle};
use crate::store::{Store, StoreError};

/// Identities per page of `--all`.
const PAGE: i32 = 500;

#[derive(Debug, Serialize)]
pub struct Stepped {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub tries: u32,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct FolderError {
    pub mailbox: String,
    pub error: String,
    pub since: Option<String>,
    pub last: Option<String>,
}

/// One identity's line of the report.
#[derive(Debug, Serialize)]
pub struct Row {
    pub user_id: String,
    pub identity_id: String,
    pub identifier: String,
    /// `user_identity.status`: active or inactive.
    pub state: String,
    pub healthy: bool,
    /// Why it is unhealthy (empty when healthy).
    pub problems: Vec<String>,
    pub last_sync: String,
    pub last_check: Option<String>,
    /// Computed from `last_check` + `pollinterval`; null when inactive.
    pub next_due: Option<String>,
    pub errors_count: u64,
    pub first_error_date: String,
    pub last_fetch_error: String,
    /// The last time a server throttled a sync of it (reason, server, at).
    pub throttled: Option<Throttle>,
    /// Failed, to be retried by the next sync.
    pub failing_messages: u32,
    pub stepped_over: Vec<Stepped>,
    pub folder_errors: Vec<FolderError>,
    pub sync_lock: Option<locks::LockView>,
    /// `running` or `stale` while a lock row exists.
    pub lock_state: Option<String>,
    pub syncing_marker: Option<locks::Marker>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    time_text(t)
}

/// Read everything `status` shows about one identity.
pub async fn row(
    store: &Store,
    s: &WorkerSettings,
    id: &Identity,
    now: DateTime<Utc>,
) -> Result<Row, StoreError> {
    let (failures, mailbox_errors, sync) = tokio::join!(
        store.message_failures(id.user_id, id.identity_id),
        store.mailbox_errors(id.user_id, id.identity_id),
        locks::read(store, id, now),
    );
    let failures = failures?;
    let mailbox_errors = mailbox_errors?;
    let sync = sync?;
    let stale_after = s.imap.lock_ttl_secs / 2;
    let lock_state = sync.lock.as_ref().map(|l| {
        if l.renewed_secs_ago >= stale_after {
            "stale".to_string()
        } else {
            "running".to_string()
        }
    });
    let streak = id.error_streak();
    let (errors_count, last_fetch_error) = (streak.count, streak.last_error);
    let stepped: Vec<Stepped> = failures
        .iter()
        .filter(|f| f.stepped_over)
        .map(|f| Stepped {
            mailbox: f.mailbox.clone(),
            uidvalidity: f.uidvalidity,
            uid: f.uid,
            tries: f.tries,
            reason: f.last_error.clone(),
        })
        .collect();
    let folder_errors: Vec<FolderError> = mailbox_errors
        .into_iter()
        .map(|e| FolderError {
            mailbox: e.mailbox,
            error: e.last_error,
            since: e.first_error.map(rfc3339),
            last: e.last_error_at.map(rfc3339),
        })
        .collect();

    let mut row = Row {
        user_id: id.user_id.to_string(),
        identity_id: id.identity_id.to_string(),
        identifier: id.identifier.clone(),
        state: id.status.to_string(),
        healthy: true,
        problems: Vec::new(),
        last_sync: id.info(infos::LASTSYNC).to_string(),
        last_check: id.last_check.map(rfc3339),
        next_due: next_due(id, now),
        errors_count,
        first_error_date: id.info(infos::FIRST_ERROR_DATE).to_string(),
        last_fetch_error,
        throttled: Throttle::parse(id.info(infos::THROTTLED)),
        failing_messages: failures.iter().filter(|f| !f.stepped_over).count() as u32,
        stepped_over: stepped,
        folder_errors,
        sync_lock: sync.lock,
        lock_state,
        syncing_marker: sync.marker,
    };
    row.problems = problems(&row);
    row.healthy = row.problems.is_empty();
    Ok(row)
}

/// What makes an identity unhealthy (the module's doc lists them).
fn problems(r: &Row) -> Vec<String> {
    let mut problems = Vec::new();
    if r.state != Status::Active.as_str() {
        problems.push(format!("state {:?}", r.state));
    }
    match &r.throttled {
        Some(t) if r.errors_count == 0 => problems.push(format!(
            "throttled by {} ({}) at {}: transient, not counted against the account",
            t.server, t.reason, t.at
        )),
        _ if r.errors_count > 0 || !r.last_fetch_error.is_empty() => {
            problems.push(format!("error streak ({} account errors)", r.errors_count))
        }
        _ => {}
    }
    if !r.stepped_over.is_empty() {
        problems.push(format!("{} message(s) stepped over", r.stepped_over.len()));
    }
    if !r.folder_errors.is_empty() {
        problems.push(format!("{} folder error(s)", r.folder_errors.len()));
    }
    if r.lock_state.as_deref() == Some("stale") {
        problems.push("stale sync lock".into());
    }
    problems
}

/// When the next sync is due, as a leader building its schedule computes
/// it (never checked: due at once); none while inactive.
fn next_due(id: &Identity, now: DateTime<Utc>) -> Option<String> {
    let minute = Duration::from_secs(60);
    (id.status == Status::Active).then(|| {
        let (interval, _) = Interval::parse(id.info(infos::POLLINTERVAL));
        match id.last_check {
            Some(lc) => rfc3339(interval.due_after(lc, minute).max(now)),
            None => rfc3339(now),
        }
    })
}

/// Prints rows as they come: a JSON array written piece by piece, or a
/// table per page.
struct Printer {
    json: bool,
    unhealthy_only: bool,
    first: bool,
    shown: usize,
    unhealthy: usize,
}

impl Printer {
    fn page(&mut self, rows: Vec<Row>) -> anyhow::Result<()> {
        let rows: Vec<Row> = rows
            .into_iter()
            .filter(|r| !self.unhealthy_only || !r.healthy)
            .collect();
        self.shown += rows.len();
        self.unhealthy += rows.iter().filter(|r| !r.healthy).count();
        let mut out = std::io::stdout().lock();
        if self.json {
            for r in &rows {
                let sep = if self.first { "[\n" } else { ",\n" };
                self.first = false;
                write!(out, "{sep}{}", serde_json::to_string_pretty(r)?)?;
            }
            return Ok(());
        }
        if rows.is_empty() {
            return Ok(());
        }
        print_table(&mut out, &rows, self.first)?;
        self.first = false;
        Ok(())
    }

    fn end(&mut self) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            writeln!(out, "{}", if self.first { "[]" } else { "\n]" })?;
        } else if self.shown == 0 {
            writeln!(out, "no remote identity to show")?;
        } else {
            writeln!(
                out,
                "{} identit{} shown, {} unhealthy",
                self.shown,
                if self.shown == 1 { "y" } else { "ies" },
                self.unhealthy
            )?;
        }
        Ok(())
    }
}

fn print_table(out: &mut impl Write, rows: &[Row], header_too: bool) -> anyhow::Result<()> {
    const HEADER: [&str; 9] = [
        "IDENTIFIER",
        "USER",
        "STATE",
        "HEALTH",
        "LASTSYNC",
        "NEXT DUE",
        "ERRORS",
        "STEPPED",
        "LOCK",
    ];
    let table: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.identifier.clone(),
                r.user_id.clone(),
                r.state.clone(),
                if r.healthy { "ok" } else { "UNHEALTHY" }.into(),
                or_dash(&r.last_sync),
                r.next_due.clone().unwrap_or_else(|| "-".into()),
                r.errors_count.to_string(),
                r.stepped_over.len().to_string(),
                r.lock_state.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let lines = super::common::table_lines(&HEADER, &table);
    let skip = usize::from(!header_too);
    for l in &lines[skip..] {
        writeln!(out, "{l}")?;
    }
    for r in rows {
        let who = &r.identifier;
        for p in &r.problems {
            writeln!(out, "{who}: {p}")?;
        }
        if !r.last_fetch_error.is_empty() {
            let since = match r.first_error_date.as_str() {
                "" => String::new(),
                d => format!(" (failing since {d})"),
            };
            writeln!(out, "{who}: last error{since}: {}", r.last_fetch_error)?;
        }
        for m in &r.stepped_over {
            writeln!(
                out,
                "{who}: stepped over {} uid {} ({} tries): {}",
                m.mailbox, m.uid, m.tries, m.reason
            )?;
        }
        for f in &r.folder_errors {
            writeln!(out, "{who}: folder {:?}: {}", f.mailbox, f.error)?;
        }
        if r.failing_messages > 0 {
            writeln!(
                out,
                "{who}: {} message(s) failed and will be retried at the next sync",
                r.failing_messages
            )?;
        }
        if let Some(l) = &r.sync_lock {
            writeln!(out, "{who}: sync lock {}", l.describe())?;
        }
    }
    Ok(())
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

pub async fn run(a: StatusArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let user = match (a.all, &a.userid, &a.username) {
        (true, None, None) => None,
        (true, _, _) => return Err(error::usage("give --all or a user, not both")),
        (false, id, name) => Some(common::UserRef::parse(id, name)?),
    };
    let store = common::store(s).await?;
    let mut printer = Printer {
        json: a.json,
        unhealthy_only: a.unhealthy,
        first: true,
        shown: 0,
        unhealthy: 0,
    };
    let now = Utc::now();
    match user {
        Some(u) => {
            let user_id = u.resolve(&store).await?;
            let mut ids: Vec<Identity> = store
                .identities_of(user_id)
                .await?
                .into_iter()
                .filter(Identity::is_remote_email)
                .collect();
            ids.sort_by(|a, b| a.identifier.cmp(&b.identifier));
            let mut rows = Vec::with_capacity(ids.len());
            for id in &ids {
                rows.push(row(&store, s, id, now).await?);
            }
            printer.page(rows)?;
        }
        None => {
            let mut state = None;
            loop {
                let (page, next) = store.scan_identities(PAGE, state).await?;
                let mut rows = Vec::new();
                for r in page {
                    // The scan row has no identifier: read the identity.
                    let Some(id) = store.identity(r.user_id, r.identity_id).await? else {
                        continue; // removed since the page was read
                    };
                    if id.is_remote_email() {
                        rows.push(row(&store, s, &id, now).await?);
                    }
                }
                printer.page(rows)?;
                match next {
                    Some(n) => state = Some(n),
                    None => break,
                }
            }
        }
    }
    printer.end()?;
    if let Some(note) = large_messages_note(s).await {
        if a.json {
            eprintln!("imapctl: {note}");
        } else {
            println!("{note}");
        }
    }
    Ok(if printer.unhealthy > 0 {
        ExitCode::from(error::code::FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Why messages over `raw_size_limit` cannot be stored now, if they cannot:
/// the worker's start-up check (a HEAD on the bucket), made from here.
async fn large_messages_note(s: &WorkerSettings) -> Option<String> {
    const WAIT: Duration = Duration::from_secs(5);
    let limit = s.store_settings.raw_size_limit;
    let objects = match crate::store::objects::from_worker_settings(s) {
        Ok(o) => o,
        Err(e) => return Some(format!("object store: {e}")),
    };
    let Some(objects) = objects else {
        return crate::store::objects::without_store_warning(s, None).map(|_| {
            format!(
                "no object store is configured: messages over raw_size_limit ({limit} bytes) \
                 are stepped over"
            )
        });
    };
    let why = match tokio::time::timeout(WAIT, objects.bucket_exists()).await {
        Ok(Ok(true)) => return None,
        Ok(Ok(false)) => format!(
            "bucket {:?} does not exist yet (a worker creates it)",
            objects.bucket_name()
        ),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "the object store did not answer within {} s",
            WAIT.as_secs()
        ),
    };
    Some(format!(
        "{why}: messages over raw_size_limit ({limit} bytes) wait until it answers"
    ))
}
