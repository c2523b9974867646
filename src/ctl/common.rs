//! What several imapctl commands share: reaching the services (failing fast
//! with a clear line), resolving the user and the identity, reading a
//! password without putting it on the command line, and following an order
//! to its end (`--wait`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use uuid::Uuid;

use crate::bus::wire::{ImapOrder, JobReport};
use crate::bus::{Bus, Retry};
use crate::config::WorkerSettings;
use crate::error;
use crate::shutdown::Shutdown;
use crate::store::identity::Identity;
use crate::store::Store;
use crate::worker::orders::PROGRESS_HEADER;

pub async fn store(s: &WorkerSettings) -> anyhow::Result<Store> {
    Ok(Store::connect(&s.store_settings, Duration::from_secs(15)).await?)
}

pub async fn bus(s: &WorkerSettings) -> anyhow::Result<Bus> {
    Ok(Bus::connect(
        &s.nats_url,
        "imapctl",
        Retry::Attempts(3),
        Shutdown::never(),
    )
    .await?)
}

pub fn parse_uuid(flag: &str, value: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(value.trim())
        .map_err(|_| error::usage(format!("--{flag}: not a UUID: {value:?}")))
}

/// Who the local user is, as given on the command line (checked before any
/// service is contacted).
pub enum UserRef {
    Id(Uuid),
    Name(String),
}

impl UserRef {
    pub fn parse(userid: &Option<String>, username: &Option<String>) -> anyhow::Result<UserRef> {
        match (userid, username) {
            (Some(_), Some(_)) => Err(error::usage("give --userid or --username, not both")),
            (None, None) => Err(error::usage("missing --userid (or --username)")),
            (Some(id), None) => Ok(UserRef::Id(parse_uuid("userid", id)?)),
            (None, Some(name)) if name.trim().is_empty() => {
                Err(error::usage("--username: must not be empty"))
            }
            (None, Some(name)) => Ok(UserRef::Name(name.clone())),
        }
    }

    /// The user's id; the user must exist.
    pub async fn resolve(&self, store: &Store) -> anyhow::Result<Uuid> {
        match self {
            UserRef::Id(id) => {
                if store.user_name(*id).await?.is_none() {
                    return Err(error::not_found(format!("no Caliopen user with id {id}")));
                }
                Ok(*id)
            }
            UserRef::Name(name) => store
                .user_id_by_name(name)
                .await?
                .ok_or_else(|| error::not_found(format!("no Caliopen user named {name:?}"))),
        }
    }
}

/// Which identity, as given on the command line.
pub enum IdentityRef {
    Id(Uuid),
    Identifier(String),
}

impl IdentityRef {
    pub fn parse(
        identifier: &Option<String>,
        remoteid: &Option<String>,
    ) -> anyhow::Result<IdentityRef> {
        match (identifier, remoteid) {
            (Some(_), Some(_)) => Err(error::usage("give --identifier or --remoteid, not both")),
            (None, None) => Err(error::usage("missing --identifier (or --remoteid)")),
            (None, Some(r)) => Ok(IdentityRef::Id(parse_uuid("remoteid", r)?)),
            (Some(login), None) if login.trim().is_empty() => {
                Err(error::usage("--identifier: must not be empty"))
            }
            (Some(login), None) => Ok(IdentityRef::Identifier(login.trim().to_string())),
        }
    }

    /// The stored identity; it must exist.
    pub async fn resolve(&self, store: &Store, user_id: Uuid) -> anyhow::Result<Identity> {
        let id = match self {
            IdentityRef::Id(id) => *id,
            IdentityRef::Identifier(login) => store
                .lookup_identity(user_id, login)
                .await?
                .ok_or_else(|| {
                    error::not_found(format!("user {user_id} has no remote identity {login:?}"))
                })?,
        };
        store
            .identity(user_id, id)
            .await?
            .ok_or_else(|| error::not_found(format!("user {user_id} has no identity {id}")))
    }
}

/// The password from exactly one of `--pass`, `--pass-env`, `--pass-file`,
/// else from a prompt when `prompt` is set and stdin is a terminal.
pub fn password(
    pass: &Option<String>,
    pass_env: &Option<String>,
    pass_file: &Option<PathBuf>,
    prompt: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let given = [pass.is_some(), pass_env.is_some(), pass_file.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given > 1 {
        return Err(error::usage(
            "give only one of --pass, --pass-env and --pass-file",
        ));
    }
    if let Some(p) = pass {
        return Ok(Some(p.clone()));
    }
    if let Some(var) = pass_env {
        return match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            Ok(_) => Err(error::usage(format!(
                "--pass-env: environment variable {var} is empty"
            ))),
            Err(_) => Err(error::usage(format!(
                "--pass-env: environment variable {var} is not set"
            ))),
        };
    }
    if let Some(path) = pass_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| error::usage(format!("--pass-file {}: {e}", path.display())))?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            return Err(error::usage(format!(
                "--pass-file {}: the first line is empty",
                path.display()
            )));
        }
        return Ok(Some(line));
    }
    if let Some(question) = prompt {
        if std::io::stdin().is_terminal() {
            let p = rpassword::prompt_password(question)
                .map_err(|e| error::usage(format!("cannot read the password: {e}")))?;
            return Ok((!p.is_empty()).then_some(p));
        }
    }
    Ok(None)
}

/// `host:port` with an explicit port.
pub fn server(value: &str) -> anyhow::Result<String> {
    let v = value.trim();
    if !v.contains(':') || v.ends_with(']') {
        return Err(error::usage(format!(
            "--server: expected host:port (for example imap.example.org:993), found {value:?}"
        )));
    }
    crate::config::split_host_port(v, 993).map_err(|e| error::usage(format!("--server: {e}")))?;
    Ok(v.to_string())
}

/// How long `--wait` goes without hearing from the worker before it says
/// the worker stopped answering (exit 5). While a job runs, or waits for a
/// free job slot, the worker sends a progress report every second
/// (`worker/orders/mod.rs`), so this much silence means it died, hangs, or
/// lost NATS for far longer than a reconnect takes (2–3 s).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(15);

/// At most this many stepped-over messages are listed in the final report;
/// `imapctl listremotes` lists them all.
const MAX_LISTED: usize = 20;

/// Send an order. Without `wait`: publish, flush, done. With `wait`: send it
/// as a request asking for progress, show progress on stderr, print the
/// final report, and exit non-zero when the job did not do everything.
pub async fn send_order(
    s: &WorkerSettings,
    bus: &Bus,
    order: &ImapOrder,
    wait: bool,
    timeout_secs: u64,
    what: &str,
) -> anyhow::Result<ExitCode> {
    let subject = &s.nats_topic_sender;
    if !wait {
        bus.publish(subject, order).await?;
        bus.flush().await?;
        println!("{what}: order sent on {subject}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut replies = request_with_progress(bus, subject, order).await?;
    let rep = final_report(&mut replies, subject, timeout_secs, what).await?;
    let (code, text) = outcome(what, &rep);
    if code == error::code::OK {
        println!("{text}");
    } else {
        eprintln!("imapctl: {text}");
    }
    Ok(ExitCode::from(code))
}

/// Send `order` as a request asking for progress reports; the replies come
/// on the returned subscription.
async fn request_with_progress(
    bus: &Bus,
    subject: &str,
    order: &ImapOrder,
) -> anyhow::Result<async_nats::Subscriber> {
    let inbox = bus.new_inbox();
    let replies = bus.subscribe(&inbox).await?;
    let mut headers = HeaderMap::new();
    headers.insert(PROGRESS_HEADER, "1");
    let payload = serde_json::to_vec(order)?;
    bus.client()
        .publish_with_reply_and_headers(subject.to_string(), inbox, headers, payload.into())
        .await
        .map_err(|e| error::unavailable(format!("cannot publish on {subject}: {e}")))?;
    bus.flush().await?;
    Ok(replies)
}

/// Show progress on a terminal until the final report comes. Fails when no
/// worker listens, when it goes silent for [`SILENCE_LIMIT`], or past
/// `timeout_secs`.
async fn final_report(
    replies: &mut async_nats::Subscriber,
    subject: &str,
    timeout_secs: u64,
    what: &str,
) -> anyhow::Result<JobReport> {
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        let silence_ends = tokio::time::Instant::now() + SILENCE_LIMIT;
        let msg = match tokio::time::timeout_at(deadline.min(silence_ends), replies.next()).await {
            Err(_) if silence_ends < deadline => {
                if tty {
                    eprintln!();
                }
                return Err(error::unavailable(format!(
                    "{what}: the worker stopped answering (nothing heard for {} s): \
                     it may have died or lost NATS; run the order again",
                    SILENCE_LIMIT.as_secs()
                )));
            }
            Err(_) => {
                return Err(error::failed(format!(
                    "{what}: no result within {timeout_secs} s (the worker may still be running)"
                )))
            }
            Ok(None) => {
                return Err(error::unavailable(
                    "the NATS connection closed while waiting",
                ))
            }
            Ok(Some(m)) => m,
        };
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(error::unavailable(format!(
                "no imapworker is listening on {subject}: start one with `imapworker start`"
            )));
        }
        let rep: JobReport = serde_json::from_slice(&msg.payload)
            .map_err(|e| error::failed(format!("bad reply from the worker: {e}")))?;
        if !rep.progress {
            if tty {
                eprintln!();
            }
            return Ok(rep);
        }
        if tty {
            eprint!(
                "\r{what}: fetched {}, handed off {}, failed {}   ",
                rep.fetched, rep.handed_off, rep.failed
            );
        }
    }
}

/// The exit code and the text of a final report.
///
/// - not run because another sync holds the identity: 4, conflict, as for
///   the other commands that meet the lock (one line: that sync does the
///   work; `imapctl status` shows its lock);
/// - interrupted by the worker's shutdown, or stopped on an outage of ours
///   (processor, NATS, Cassandra): 5, unavailable; running it again later
///   finishes the work;
/// - failed, messages left to retry or stepped over, mailboxes not synced: 1;
/// - else 0.
pub fn outcome(what: &str, r: &JobReport) -> (u8, String) {
    if r.busy {
        let why = r.error.strip_prefix("skipped: ").unwrap_or(&r.error);
        let text = format!(
            "{what}: not run: {why}; that sync fetches the mail (imapctl status shows its lock)"
        );
        return (error::code::CONFLICT, text);
    }
    let mut text = summary(what, r);
    for m in r.stepped.iter().take(MAX_LISTED) {
        text.push_str(&format!(
            "\n  stepped over: {} uid {}: {}",
            m.mailbox, m.uid, m.reason
        ));
    }
    if r.stepped.len() > MAX_LISTED {
        text.push_str(&format!(
            "\n  ... and {} more (imapctl listremotes lists them)",
            r.stepped.len() - MAX_LISTED
        ));
    }
    for m in &r.mailbox_errors {
        text.push_str(&format!(
            "\n  mailbox {} not synced: {}",
            m.mailbox, m.reason
        ));
    }
    let code = if r.interrupted || r.outage || r.throttled {
        error::code::UNAVAILABLE
    } else if !r.ok || r.stepped_over > 0 || !r.stepped.is_empty() || !r.mailbox_errors.is_empty() {
        error::code::FAILED
    } else {
        error::code::OK
    };
    (code, text)
}

/// The one-line summary of a report.
pub fn summary(what: &str, r: &JobReport) -> String {
    let mut s = format!(
        "{what}: fetched {}, handed off {}, already delivered {}, failed {}, stepped over {}",
        r.fetched, r.handed_off, r.already_delivered, r.failed, r.stepped_over
    );
    if r.interrupted {
        s.push_str("; interrupted by the worker's shutdown: run it again to finish");
    }
    if r.outage {
        s.push_str(
            "; stopped on an outage of ours (processor, NATS or Cassandra): \
             nothing was stepped over, run it again later",
        );
    }
    if r.throttled {
        s.push_str(
            "; the server throttled us (not counted against the account): run it again later",
        );
    }
    if !r.error.is_empty() {
        s.push_str(&format!("; error: {}", r.error));
    } else if !r.ok && !r.interrupted && !r.outage && !r.throttled {
        s.push_str("; some messages will be retried at the next sync");
    }
    if !r.mailbox_errors.is_empty() {
        s.push_str(&format!(
            "; {} mailbox(es) not synced",
            r.mailbox_errors.len()
        ));
    }
    s
}

/// Columns padded to their widest cell, two spaces apart: the header line
/// first, then one line per row.
pub fn table_lines<R: AsRef<[String]>>(header: &[&str], rows: &[R]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.as_ref()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(&mut header.iter().copied())];
    out.extend(
        rows.iter()
            .map(|r| line(&mut r.as_ref().iter().map(String::as_str))),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::wire::{ReportedMailbox, ReportedMessage};

    fn report() -> JobReport {
        JobReport {
            ok: true,
            fetched: 10,
            handed_off: 10,
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_job_exits_0() {
        let (code, text) = outcome("sync of a", &report());
        assert_eq!(code, 0);
        assert_eq!(
            text,
            "sync of a: fetched 10, handed off 10, already delivered 0, failed 0, stepped over 0"
        );
    }

    #[test]
    fn an_interrupted_job_exits_5_and_says_so() {
        let mut r = report();
        r.ok = false;
        r.interrupted = true;
        let (code, text) = outcome("sync of a", &r);
        assert_eq!(code, error::code::UNAVAILABLE);
        assert!(
            text.contains("interrupted by the worker's shutdown"),
            "{text}"
        );
        // Even if a worker called an interrupted job ok.
        r.ok = true;
        assert_eq!(outcome("x", &r).0, error::code::UNAVAILABLE);
        let mut r = report();
        r.ok = false;
        r.outage = true;
        r.error = "processor unreachable".into();
        let (code, text) = outcome("sync of a", &r);
        assert_eq!(code, error::code::UNAVAILABLE);
        assert!(
            text.contains("outage") && text.contains("processor unreachable"),
            "{text}"
        );
    }

    #[test]
    fn stepped_messages_and_failed_mailboxes_are_listed_and_exit_1() {
        let mut r = report();
        r.stepped_over = 25;
        r.stepped = (0..25)
            .map(|uid| ReportedMessage {
                mailbox: "INBOX".into(),
                uid,
                reason: "too large".into(),
            })
            .collect();
        r.mailbox_errors = vec![ReportedMailbox {
            mailbox: "Archive".into(),
            reason: "no such mailbox".into(),
        }];
        let (code, text) = outcome("sync of a", &r);
        assert_eq!(code, error::code::FAILED);
        assert!(
            text.contains("stepped over: INBOX uid 3: too large"),
            "{text}"
        );
        assert!(text.contains("... and 5 more"), "{text}");
        assert!(
            text.contains("mailbox Archive not synced: no such mailbox"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1 + MAX_LISTED + 1 + 1);
        // A count alone (older workers) is enough to fail.
        let mut r = report();
        r.stepped_over = 1;
        assert_eq!(outcome("x", &r).0, error::code::FAILED);
        let mut r = report();
        r.mailbox_errors = vec![ReportedMailbox::default()];
        assert_eq!(outcome("x", &r).0, error::code::FAILED);
    }

    #[test]
    fn a_failed_job_exits_1() {
        let mut r = report();
        r.ok = false;
        r.failed = 2;
        let (code, text) = outcome("x", &r);
        assert_eq!(code, error::code::FAILED);
        assert!(text.contains("retried at the next sync"), "{text}");
    }
}
