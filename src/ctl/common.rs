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
use crate::error::{self, Failure};
use crate::shutdown::Shutdown;
use crate::store::identity::Identity;
use crate::store::Store;
use crate::worker::orders::PROGRESS_HEADER;

pub async fn store(s: &WorkerSettings) -> anyhow::Result<Store> {
    Ok(Store::connect(&s.store_settings, Duration::from_secs(15))
        .await
        .map_err(Failure::from)?)
}

pub async fn bus(s: &WorkerSettings) -> anyhow::Result<Bus> {
    Ok(Bus::connect(
        &s.nats_url,
        "imapctl",
        Retry::Attempts(3),
        Shutdown::never(),
    )
    .await
    .map_err(Failure::from)?)
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
                if store.user_name(*id).await.map_err(Failure::from)?.is_none() {
                    return Err(error::not_found(format!("no Caliopen user with id {id}")));
                }
                Ok(*id)
            }
            UserRef::Name(name) => store
                .user_id_by_name(name)
                .await
                .map_err(Failure::from)?
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
                .await
                .map_err(Failure::from)?
                .ok_or_else(|| {
                    error::not_found(format!("user {user_id} has no remote identity {login:?}"))
                })?,
        };
        store
            .identity(user_id, id)
            .await
            .map_err(Failure::from)?
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

/// Send an order. Without `wait`: publish, flush, done. With `wait`: send it
/// as a request asking for progress, show progress on stderr, print the
/// final report, and exit non-zero when the job failed.
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
        bus.publish(subject, order).await.map_err(Failure::from)?;
        bus.flush().await.map_err(Failure::from)?;
        println!("{what}: order sent on {subject}");
        return Ok(ExitCode::SUCCESS);
    }
    let inbox = bus.new_inbox();
    let mut replies = bus.subscribe(&inbox).await.map_err(Failure::from)?;
    let mut headers = HeaderMap::new();
    headers.insert(PROGRESS_HEADER, "1");
    let payload = serde_json::to_vec(order)?;
    bus.client()
        .publish_with_reply_and_headers(subject.clone(), inbox.clone(), headers, payload.into())
        .await
        .map_err(|e| error::unavailable(format!("cannot publish on {subject}: {e}")))?;
    bus.flush().await.map_err(Failure::from)?;

    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        let msg = match tokio::time::timeout_at(deadline, replies.next()).await {
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
        let rep: JobReport = match serde_json::from_slice(&msg.payload) {
            Ok(r) => r,
            Err(e) => return Err(error::failed(format!("bad reply from the worker: {e}"))),
        };
        if rep.progress {
            if tty {
                eprint!(
                    "\r{what}: fetched {}, handed off {}, failed {}   ",
                    rep.fetched, rep.handed_off, rep.failed
                );
            }
            continue;
        }
        if tty {
            eprintln!();
        }
        if rep.ok {
            println!("{}", summary(what, &rep));
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("imapctl: {}", summary(what, &rep));
        return Ok(ExitCode::from(error::code::FAILED));
    }
}

pub fn summary(what: &str, r: &JobReport) -> String {
    let mut s = format!(
        "{what}: fetched {}, handed off {}, already delivered {}, failed {}, stepped over {}",
        r.fetched, r.handed_off, r.already_delivered, r.failed, r.stepped_over
    );
    if !r.error.is_empty() {
        s.push_str(&format!("; error: {}", r.error));
    } else if !r.ok {
        s.push_str("; some messages will be retried at the next sync");
    }
    s
}
