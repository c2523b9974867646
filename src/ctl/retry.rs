//! `retry`: the way back after a processor fault. It hands off again, on
//! `LDAConfig.in_topic`, the raw messages of one identity that were stored
//! but never delivered: the ones stepped over after `max_message_tries`
//! (rows of `imap_message_failure`), and any other undelivered row of this
//! identity (a hand-off cut short by an outage or a crash). Each one that
//! the processor accepts is marked delivered and its failure row cleared.
//!
//! Exactly once per message: it runs under the identity's sync lock (owner
//! `imapctl-retry-<pid>`), so no sync hands the same message off meanwhile,
//! and it hands off only rows whose `delivered` is false, so a second run
//! finds nothing to do. The order, its JSON and the success rules are the
//! worker's (`process_raw`, "already imported" counts as success).
//!
//! Finding the undelivered rows: `user_raw_lookup` lists the user's raw
//! messages, not the identity's, so every one of the user's rows has its
//! `delivered` flag read, and an undelivered row is kept only when its id
//! recomputes from this identity: `raw_message_id(user, identity, mailbox,
//! uidvalidity, uid)`, with the mailbox and uid from its `X-Fetched-Imap-Box`
//! and `X-Fetched-Imap-Uid` headers and the uidvalidity of that mailbox's
//! checkpoint, high-water mark or failure rows. Rows of other identities
//! and of `fullfetch` never match. An undelivered row of a mailbox
//! generation that is no longer known (UIDVALIDITY changed) is not found.
//!
//! A stepped-over message that was never stored (larger than
//! `max_message_size`, or refused by the server) cannot be handed off from
//! the store: it stays listed, and `retry` says so.

use std::collections::{BTreeSet, HashMap};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::Utc;
use futures::stream::{self, StreamExt};
use uuid::Uuid;

use super::common;
use crate::bus::wire::{orders, ProcessRaw, ProcessRawReply};
use crate::bus::{Bus, BusError};
use crate::cli::RetryArgs;
use crate::config::WorkerSettings;
use crate::error;
use crate::store::identity::{mailbox_key, Identity};
use crate::store::raw_message::raw_message_id;
use crate::store::state::MessageFailure;
use crate::store::Store;

/// `delivered` reads in flight while looking over the user's rows.
const READS: usize = 16;

/// One message to hand off again.
struct Candidate {
    id: Uuid,
    mailbox: String,
    uidvalidity: u32,
    uid: u32,
    /// Its failure row, when it has one.
    failure: bool,
}

pub async fn run(a: RetryArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let which = common::IdentityRef::parse(&a.identifier, &a.remoteid)?;
    let topic = s.lda.in_topic.clone();
    if topic.is_empty() {
        return Err(error::usage(
            "LDAConfig.in_topic is empty (store-only mode): there is no processor to hand off to",
        ));
    }
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    let id = which.resolve(&store, user_id).await?;
    let bus = common::bus(s).await?;
    let who = id.identifier.clone();

    let owner = format!("imapctl-retry-{}", std::process::id());
    let ttl = s.imap.lock_ttl_secs;
    let since = Utc::now();
    if !store
        .take_sync_lock(id.user_id, id.identity_id, &owner, since, ttl)
        .await?
    {
        return Err(error::conflict(format!(
            "{who}: a sync holds the lock: retry when it ends (see status)"
        )));
    }
    let result = retry_locked(s, &store, &bus, &id, &topic, &owner, since).await;
    let released = store
        .release_sync_lock(id.user_id, id.identity_id, &owner)
        .await;
    let summary = result?;
    if let Err(e) = released {
        eprintln!("imapctl: warning: cannot release the sync lock (it lapses in {ttl} s): {e}");
    }
    println!("{who}: {}", summary.line());
    Ok(if summary.failed > 0 {
        ExitCode::from(error::code::FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(Default)]
struct Summary {
    handed_off: u32,
    already_delivered: u32,
    not_stored: Vec<String>,
    failed: u32,
    first_error: String,
}

impl Summary {
    fn line(&self) -> String {
        let mut l = format!(
            "handed off {}, already delivered {}, failed {}",
            self.handed_off, self.already_delivered, self.failed
        );
        if !self.first_error.is_empty() {
            l.push_str(&format!(" ({})", self.first_error));
        }
        if !self.not_stored.is_empty() {
            l.push_str(&format!(
                "; never stored, left listed: {}",
                self.not_stored.join(", ")
            ));
        }
        l
    }
}

async fn retry_locked(
    s: &WorkerSettings,
    store: &Store,
    bus: &Bus,
    id: &Identity,
    topic: &str,
    owner: &str,
    since: chrono::DateTime<Utc>,
) -> anyhow::Result<Summary> {
    let (user, identity) = (id.user_id, id.identity_id);
    let list = candidates(store, id).await?;
    let timeout = s.imap.lda_timeout();
    let renew_every = Duration::from_secs((s.imap.lock_ttl_secs / 3).max(1));
    let mut renewed = Instant::now();
    let mut sum = Summary::default();
    for c in list {
        if renewed.elapsed() >= renew_every {
            let ok = store
                .renew_sync_lock(user, identity, owner, since, s.imap.lock_ttl_secs)
                .await?;
            if !ok {
                return Err(error::conflict(
                    "the sync lock was taken away (imapctl unlock --force?): stopped",
                ));
            }
            renewed = Instant::now();
        }
        retry_one(store, bus, topic, id, &c, timeout, &mut sum).await?;
    }
    Ok(sum)
}

/// Hand off one candidate again unless it is delivered already or was
/// never stored; clear its failure row once it is delivered.
async fn retry_one(
    store: &Store,
    bus: &Bus,
    topic: &str,
    id: &Identity,
    c: &Candidate,
    timeout: Duration,
    sum: &mut Summary,
) -> anyhow::Result<()> {
    let (user, identity) = (id.user_id, id.identity_id);
    let place = format!("{} uid {}", c.mailbox, c.uid);
    match store.raw_message_delivered(c.id).await? {
        None => {
            sum.not_stored.push(place);
            return Ok(());
        }
        Some(true) => sum.already_delivered += 1,
        Some(false) => match hand_off(bus, topic, user, identity, c.id, timeout).await {
            Ok(()) => {
                store.mark_delivered(c.id).await?;
                sum.handed_off += 1;
            }
            Err(HandOff::Unavailable(e)) => return Err(error::unavailable(e)),
            Err(HandOff::Refused(e)) => {
                sum.failed += 1;
                if sum.first_error.is_empty() {
                    sum.first_error = format!("{place}: {e}");
                }
                return Ok(());
            }
        },
    }
    if c.failure {
        store
            .clear_message_failure(user, identity, &c.mailbox, c.uidvalidity, c.uid)
            .await?;
    }
    Ok(())
}

/// What to hand off again, in mailbox and UID order: the stepped-over
/// messages (known by their failure rows), then the user's undelivered
/// raw messages whose id recomputes from this identity.
async fn candidates(store: &Store, id: &Identity) -> anyhow::Result<Vec<Candidate>> {
    let (user, identity) = (id.user_id, id.identity_id);
    let failures = store.message_failures(user, identity).await?;
    let generations = generations(store, id, &failures).await?;
    let mut todo: HashMap<Uuid, Candidate> = HashMap::new();
    for f in failures.iter().filter(|f| f.stepped_over) {
        let rid = raw_message_id(user, identity, &f.mailbox, f.uidvalidity, f.uid);
        todo.insert(
            rid,
            Candidate {
                id: rid,
                mailbox: f.mailbox.clone(),
                uidvalidity: f.uidvalidity,
                uid: f.uid,
                failure: true,
            },
        );
    }
    for rid in undelivered(store, user).await? {
        if todo.contains_key(&rid) {
            continue;
        }
        if let Some(c) = of_this_identity(store, id, rid, &generations, &failures).await? {
            todo.insert(rid, c);
        }
    }
    let mut list: Vec<Candidate> = todo.into_values().collect();
    list.sort_by(|a, b| {
        (&a.mailbox, a.uidvalidity, a.uid).cmp(&(&b.mailbox, b.uidvalidity, b.uid))
    });
    Ok(list)
}

/// The user's raw messages whose `delivered` is false.
async fn undelivered(store: &Store, user: Uuid) -> anyhow::Result<Vec<Uuid>> {
    let ids = store.raw_message_ids_of(user).await?;
    Ok(stream::iter(ids)
        .map(|rid| async move { (rid, store.raw_message_delivered(rid).await) })
        .buffer_unordered(READS)
        .filter_map(|(rid, d)| async move {
            match d {
                Ok(Some(false)) => Some(Ok(rid)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        })
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?)
}

/// The raw message `rid` as a candidate of `id`, when its headers name a
/// mailbox and UID whose id, under one of the identity's UIDVALIDITYs,
/// is `rid`.
async fn of_this_identity(
    store: &Store,
    id: &Identity,
    rid: Uuid,
    generations: &HashMap<String, BTreeSet<u32>>,
    failures: &[MessageFailure],
) -> anyhow::Result<Option<Candidate>> {
    let Some(data) = store.raw_message_data(rid).await? else {
        return Ok(None);
    };
    let Some((mailbox, uid)) = fetched_place(&data) else {
        return Ok(None);
    };
    // Keyed by the INBOX spelling of today; the id by the one it was
    // fetched under (a row fetched as `inbox` before INBOX had one).
    let Some(gens) = generations.get(mailbox_key(&mailbox)) else {
        return Ok(None);
    };
    let Some(v) = gens
        .iter()
        .copied()
        .find(|v| raw_message_id(id.user_id, id.identity_id, &mailbox, *v, uid) == rid)
    else {
        return Ok(None);
    };
    let failure = failures
        .iter()
        .any(|f| f.mailbox == mailbox && f.uidvalidity == v && f.uid == uid);
    Ok(Some(Candidate {
        id: rid,
        mailbox,
        uidvalidity: v,
        uid,
        failure,
    }))
}

/// The UIDVALIDITYs this identity knows for each mailbox: its checkpoint,
/// its high-water mark, and its failure rows.
async fn generations(
    store: &Store,
    id: &Identity,
    failures: &[MessageFailure],
) -> anyhow::Result<HashMap<String, BTreeSet<u32>>> {
    let mut out: HashMap<String, BTreeSet<u32>> = HashMap::new();
    for f in failures {
        out.entry(mailbox_key(&f.mailbox).to_string())
            .or_default()
            .insert(f.uidvalidity);
    }
    for mb in id.mailboxes() {
        if mb == "*" {
            continue;
        }
        let gens = out.entry(mb.clone()).or_default();
        if mb.eq_ignore_ascii_case("INBOX") {
            if let Some(v) = id.uidvalidity() {
                gens.insert(v);
            }
        } else if let Some(cp) = store
            .mailbox_checkpoint(id.user_id, id.identity_id, &mb)
            .await?
        {
            gens.insert(cp.uidvalidity);
        }
    }
    // `*` and folders dropped from the list: their high-water marks.
    let known: Vec<String> = out.keys().cloned().collect();
    for mb in known {
        if let Some((v, _)) = store.high_water(id.user_id, id.identity_id, &mb).await? {
            out.entry(mb).or_default().insert(v);
        }
    }
    Ok(out)
}

/// The mailbox and UID a stored raw message was fetched from, read from its
/// `X-Fetched-Imap-Box` (base64) and `X-Fetched-Imap-Uid` headers.
fn fetched_place(data: &[u8]) -> Option<(String, u32)> {
    let head = &data[..data.len().min(64 * 1024)];
    let text = String::from_utf8_lossy(head);
    let mut mailbox = None;
    let mut uid = None;
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("X-Fetched-Imap-Box: ") {
            mailbox = STANDARD
                .decode(v.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
        } else if let Some(v) = line.strip_prefix("X-Fetched-Imap-Uid: ") {
            uid = v.trim().parse().ok();
        }
        if mailbox.is_some() && uid.is_some() {
            break;
        }
    }
    Some((mailbox?, uid?))
}

enum HandOff {
    /// Nobody answers: stop, nothing counted.
    Unavailable(String),
    /// The processor said no, or did not answer in time.
    Refused(String),
}

/// `process_raw` as the worker sends it, with the worker's success rules.
async fn hand_off(
    bus: &Bus,
    topic: &str,
    user: Uuid,
    identity: Uuid,
    id: Uuid,
    timeout: Duration,
) -> Result<(), HandOff> {
    let order = ProcessRaw {
        order: orders::PROCESS_RAW.into(),
        user_id: user.to_string(),
        identity_id: identity.to_string(),
        message_id: id.to_string(),
    };
    match bus
        .request::<_, ProcessRawReply>(topic, &order, timeout)
        .await
    {
        Ok(reply) if reply.is_success() => Ok(()),
        Ok(reply) => Err(HandOff::Refused(format!("processor: {}", reply.error))),
        Err(BusError::NoResponders(subject)) => Err(HandOff::Unavailable(format!(
            "no processor listening on {subject:?}"
        ))),
        Err(e @ (BusError::TimedOut { .. } | BusError::BadReply { .. })) => {
            Err(HandOff::Refused(e.to_string()))
        }
        Err(e) => Err(HandOff::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_place_comes_from_the_fetched_headers() {
        let raw = format!(
            "X-Fetched-Imap: from x\n        (using y)\r\nX-Fetched-Imap-Box: {}\r\n\
             X-Fetched-Imap-Uid: 42\r\nSubject: hi\r\n\r\nX-Fetched-Imap-Uid: 7\r\n",
            STANDARD.encode("Entwürfe")
        );
        assert_eq!(
            fetched_place(raw.as_bytes()),
            Some(("Entwürfe".to_string(), 42))
        );
        assert_eq!(fetched_place(b"Subject: x\r\n\r\nbody"), None);
    }
}
