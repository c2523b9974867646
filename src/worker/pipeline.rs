//! The sync pipeline of one mailbox: IMAP fetch → Cassandra → hand-off.
//!
//! One producer reads messages from the server in UID batches and streams
//! them, headers prepended, into a bounded channel; one consumer keeps up to
//! `imap.in_flight` messages in store-and-hand-off at once. Both run in the
//! same task (`join!`), so fetching, writes and hand-offs overlap while the
//! channel, the in-flight bound and the process-wide byte budget cap memory.
//!
//! Steps per message, in this order: store `raw_message` with
//! `delivered = false` (idempotent: the id is derived from the UID), send
//! `process_raw`, then set `delivered = true`. The [`Tracker`] moves the
//! checkpoint over the unbroken run of finished UIDs only, and it is saved
//! every `imap.checkpoint_every` messages, so a crash resumes close to where
//! it stopped and a failed hand-off is retried by the next sync.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use uuid::Uuid;

use super::checkpoint;
use super::context::{Counters, Ctx};
use super::tracker::Tracker;
use super::JobError;
use crate::bus::wire::{orders, ProcessRaw, ProcessRawReply};
use crate::imap::headers::{self, FetchedMeta};
use crate::imap::{ConnInfo, ImapError, ImapSession};
use crate::store::raw_message::raw_message_id;
use crate::store::state::{Checkpoint, MessageFailure};

/// Which mailbox, for whom, and whether state is kept.
pub struct MailboxJob<'a> {
    pub ctx: &'a Ctx,
    pub user_id: Uuid,
    pub identity_id: Uuid,
    /// `X-Fetched-Imap-Account`.
    pub display_name: &'a str,
    /// `inserver`, for `X-Fetched-Imap`.
    pub server: &'a str,
    pub conn: &'a ConnInfo,
    pub mailbox: &'a str,
    /// `Some(checkpoint)` for a sync (`None` inside = first sync); `None`
    /// for a fullfetch, which keeps no state at all.
    pub state: Option<Option<Checkpoint>>,
    pub counters: &'a Counters,
}

/// One message between the fetch and the end of its hand-off: its bytes
/// (headers prepended), or why it was not downloaded.
struct Fetched {
    uid: u32,
    raw: Result<Vec<u8>, String>,
    /// Its share of the memory budget, released when the hand-off ends.
    _permit: Option<OwnedSemaphorePermit>,
}

enum Outcome {
    HandedOff,
    AlreadyDelivered,
    Failed(String),
}

/// Sync one mailbox. Returns when every fetched message has finished its
/// hand-off (or failed), the shutdown token fired, or the server failed; in
/// every case the checkpoint reached is saved before returning.
pub async fn sync_mailbox(job: &MailboxJob<'_>, session: &mut ImapSession) -> Result<(), JobError> {
    let ctx = job.ctx;
    let s = &ctx.settings.imap;
    let io = Duration::from_secs(s.io_timeout_secs);
    let server = job.server;
    let imap_err = |during: &str, e: async_imap::error::Error| {
        JobError::Imap(ImapError::Protocol {
            server: server.to_string(),
            during: during.to_string(),
            reason: e.to_string(),
        })
    };
    let timed_out = |during: &str| {
        JobError::Imap(ImapError::Timeout {
            server: server.to_string(),
            during: during.to_string(),
        })
    };

    let mb = tokio::time::timeout(io, session.examine(job.mailbox))
        .await
        .map_err(|_| timed_out("EXAMINE"))?
        .map_err(|e| imap_err(&format!("EXAMINE {}", job.mailbox), e))?;
    let uidvalidity = mb.uid_validity.unwrap_or(0);
    let tracked = job.state.is_some();
    let previous = job.state.flatten();
    let base = match previous {
        Some(cp) if cp.uidvalidity == uidvalidity && uidvalidity != 0 => cp.lastseenuid,
        Some(cp) => {
            tracing::warn!(
                mailbox = job.mailbox,
                old = cp.uidvalidity,
                new = uidvalidity,
                "UIDVALIDITY changed: fetching the whole mailbox again"
            );
            0
        }
        None => 0,
    };
    let save = |cp: u32| async move {
        if tracked {
            checkpoint::save(
                ctx,
                job.user_id,
                job.identity_id,
                job.mailbox,
                Checkpoint {
                    uidvalidity,
                    lastseenuid: cp,
                },
            )
            .await
        } else {
            Ok(())
        }
    };

    // Nothing new: no FETCH at all (the cheap path of a no-change resync).
    let nothing_new = mb.exists == 0 || mb.uid_next.is_some_and(|next| next <= base + 1);
    if nothing_new {
        if previous.map(|p| p.uidvalidity) != Some(uidvalidity) {
            save(base).await?;
        }
        return Ok(());
    }

    let found = tokio::time::timeout(io, session.uid_search(format!("UID {}:*", base + 1)))
        .await
        .map_err(|_| timed_out("UID SEARCH"))?
        .map_err(|e| imap_err("UID SEARCH", e))?;
    let mut tracker = Tracker::new(base, found.into_iter().collect());
    if tracker.is_empty() {
        if previous.map(|p| p.uidvalidity) != Some(uidvalidity) {
            save(base).await?;
        }
        return Ok(());
    }

    // Earlier failures of this mailbox generation.
    let mut failures: HashMap<u32, MessageFailure> = HashMap::new();
    if tracked {
        for f in ctx
            .store
            .message_failures(job.user_id, job.identity_id)
            .await?
        {
            if f.mailbox == job.mailbox && f.uidvalidity == uidvalidity {
                failures.insert(f.uid, f);
            }
        }
    }
    // After a failure, later messages were handed off already: check before
    // handing them off again.
    let check_delivered = failures.values().any(|f| !f.stepped_over);
    let stepped: Vec<u32> = failures
        .values()
        .filter(|f| f.stepped_over)
        .map(|f| f.uid)
        .collect();
    for uid in stepped {
        tracker.done(uid);
    }

    tracing::info!(
        mailbox = job.mailbox,
        uidvalidity,
        from_uid = base + 1,
        messages = tracker.len(),
        "fetching"
    );

    let (tx, rx) = mpsc::channel::<Fetched>(s.in_flight);
    let uids: Vec<u32> = tracker
        .uids()
        .iter()
        .copied()
        .filter(|u| !failures.get(u).is_some_and(|f| f.stepped_over))
        .collect();

    let producer = produce(job, session, uids, tx);
    let consumer = consume(
        job,
        rx,
        uidvalidity,
        check_delivered,
        &mut tracker,
        &mut failures,
        &save,
    );
    let (produced, consumed) = tokio::join!(producer, consumer);

    // Whatever happened, keep what was reached.
    let reached = tracker.checkpoint();
    let saved = save(reached).await;
    tracing::info!(mailbox = job.mailbox, checkpoint = reached, "mailbox done");
    produced?;
    consumed?;
    saved?;
    Ok(())
}

/// Read messages batch by batch and send them down the channel. Oversized
/// messages are not downloaded: they are sent as failures straight away.
async fn produce(
    job: &MailboxJob<'_>,
    session: &mut ImapSession,
    uids: Vec<u32>,
    tx: mpsc::Sender<Fetched>,
) -> Result<(), JobError> {
    let ctx = job.ctx;
    let s = &ctx.settings.imap;
    let io = Duration::from_secs(s.io_timeout_secs);
    let mut shutdown = ctx.shutdown.clone();
    let server = job.server.to_string();
    let imap_err = |during: &str, reason: String| {
        JobError::Imap(ImapError::Protocol {
            server: server.clone(),
            during: during.to_string(),
            reason,
        })
    };
    let items = if job.conn.gmail {
        "(UID FLAGS BODY.PEEK[] X-GM-MSGID X-GM-LABELS)"
    } else {
        "(UID FLAGS BODY.PEEK[])"
    };
    let user = job.user_id.to_string();

    for batch in uids.chunks(s.fetch_batch as usize) {
        if shutdown.is_triggered() {
            return Ok(());
        }
        // Sizes first, so a huge message is refused without downloading it.
        let mut wanted = Vec::with_capacity(batch.len());
        {
            let set = uid_set(batch);
            let mut stream = tokio::time::timeout(io, session.uid_fetch(&set, "(UID RFC822.SIZE)"))
                .await
                .map_err(|_| imap_err("UID FETCH sizes", "timed out".into()))?
                .map_err(|e| imap_err("UID FETCH sizes", e.to_string()))?;
            loop {
                let item = tokio::time::timeout(io, stream.next())
                    .await
                    .map_err(|_| imap_err("UID FETCH sizes", "timed out".into()))?;
                let Some(item) = item else { break };
                let f = item.map_err(|e| imap_err("UID FETCH sizes", e.to_string()))?;
                let (Some(uid), size) = (f.uid, f.size) else {
                    continue;
                };
                if size.is_some_and(|n| n as u64 > s.max_message_size) {
                    Counters::add(&job.counters.fetched, 1);
                    let reason = format!(
                        "message of {} bytes exceeds imap.max_message_size ({} bytes)",
                        size.unwrap_or(0),
                        s.max_message_size
                    );
                    let refused = Fetched {
                        uid,
                        raw: Err(reason),
                        _permit: None,
                    };
                    if tx.send(refused).await.is_err() {
                        return Ok(());
                    }
                } else {
                    wanted.push(uid);
                }
            }
        }
        if wanted.is_empty() {
            continue;
        }
        wanted.sort_unstable();

        let set = uid_set(&wanted);
        let mut stream = tokio::time::timeout(io, session.uid_fetch(&set, items))
            .await
            .map_err(|_| imap_err("UID FETCH", "timed out".into()))?
            .map_err(|e| imap_err("UID FETCH", e.to_string()))?;
        loop {
            let item = tokio::select! {
                r = tokio::time::timeout(io, stream.next()) => r
                    .map_err(|_| imap_err("UID FETCH", "timed out".into()))?,
                _ = shutdown.wait() => return Ok(()),
            };
            let Some(item) = item else { break };
            let f = item.map_err(|e| imap_err("UID FETCH", e.to_string()))?;
            let Some(uid) = f.uid else { continue };
            let Some(body) = f.body() else {
                // A FETCH without the body (flag updates arrive this way too).
                continue;
            };
            Counters::add(&job.counters.fetched, 1);
            let flags: Vec<String> = f.flags().map(|fl| headers::flag_name(&fl)).collect();
            let labels: Vec<String> = f
                .gmail_labels()
                .map(|l| l.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default();
            let meta = FetchedMeta {
                server: job.server,
                conn: job.conn,
                account: job.display_name,
                mailbox: job.mailbox,
                user_id: &user,
                uid,
                flags: &flags,
                gmail_msgid: f.gmail_msg_id().copied(),
                gmail_labels: &labels,
                date: Utc::now().fixed_offset(),
            };
            // Both waits are backpressure: they end when hand-offs finish, or
            // at shutdown.
            let permit = tokio::select! {
                p = ctx.reserve_bytes(body.len() + 1024) => p,
                _ = shutdown.wait() => return Ok(()),
            };
            let mut raw = Vec::with_capacity(body.len() + 512);
            headers::write(&meta, &mut raw);
            raw.extend_from_slice(body);
            let fetched = Fetched {
                uid,
                raw: Ok(raw),
                _permit: Some(permit),
            };
            let sent = tokio::select! {
                r = tx.send(fetched) => r.is_ok(),
                _ = shutdown.wait() => false,
            };
            if !sent {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Keep up to `in_flight` hand-offs going; account for each result.
async fn consume<F, Fut>(
    job: &MailboxJob<'_>,
    mut rx: mpsc::Receiver<Fetched>,
    uidvalidity: u32,
    check_delivered: bool,
    tracker: &mut Tracker,
    failures: &mut HashMap<u32, MessageFailure>,
    save: &F,
) -> Result<(), JobError>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(), JobError>>,
{
    let ctx = job.ctx;
    let s = &ctx.settings.imap;
    let tracked = job.state.is_some();
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    let mut since_save = 0u32;
    let mut last_saved = tracker.checkpoint();
    let mut shutdown = ctx.shutdown.clone();
    // After a shutdown request: the hand-offs in flight get this long to end.
    let mut cut_at: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(365 * 86400);
    loop {
        if !open && inflight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            // Shutdown: take nothing more; what is queued stays unfetched as
            // far as the checkpoint knows, and the next sync fetches it again.
            _ = shutdown.wait(), if cut_at.is_none() => {
                open = false;
                rx.close();
                cut_at = Some(tokio::time::Instant::now() + shutdown_cut(s.shutdown_grace_secs));
            }
            _ = tokio::time::sleep_until(cut_at.unwrap_or(far)), if cut_at.is_some() => {
                tracing::warn!(mailbox = job.mailbox, abandoned = inflight.len(),
                    "shutdown: hand-offs still running are abandoned (fetched again next time)");
                break;
            }
            Some((uid, outcome)) = inflight.next(), if !inflight.is_empty() => {
                match outcome {
                    Outcome::HandedOff | Outcome::AlreadyDelivered => {
                        if matches!(outcome, Outcome::HandedOff) {
                            Counters::add(&job.counters.handed_off, 1);
                        } else {
                            Counters::add(&job.counters.already_delivered, 1);
                        }
                        tracker.done(uid);
                        if tracked && failures.remove(&uid).is_some() {
                            ctx.store
                                .clear_message_failure(job.user_id, job.identity_id, job.mailbox, uidvalidity, uid)
                                .await?;
                        }
                    }
                    Outcome::Failed(reason) => {
                        let stepped = record_failure(job, failures, uidvalidity, uid, &reason).await?;
                        if stepped {
                            Counters::add(&job.counters.stepped_over, 1);
                            tracker.done(uid);
                        } else {
                            Counters::add(&job.counters.failed, 1);
                        }
                    }
                }
                since_save += 1;
                if since_save >= s.checkpoint_every && tracker.checkpoint() != last_saved {
                    last_saved = tracker.checkpoint();
                    since_save = 0;
                    save(last_saved).await?;
                }
            }
            msg = rx.recv(), if open && inflight.len() < s.in_flight => {
                match msg {
                    Some(m) => inflight.push(hand_off(job, m, uidvalidity, check_delivered)),
                    None => open = false,
                }
            }
            else => break,
        }
    }
    Ok(())
}

/// Count a failure of `uid`; `true` when it has now failed too often and is
/// stepped over (it stays listed for operators).
async fn record_failure(
    job: &MailboxJob<'_>,
    failures: &mut HashMap<u32, MessageFailure>,
    uidvalidity: u32,
    uid: u32,
    reason: &str,
) -> Result<bool, JobError> {
    let ctx = job.ctx;
    let max = ctx.settings.imap.max_message_tries;
    tracing::warn!(
        mailbox = job.mailbox,
        uid,
        error = reason,
        "message not handed off"
    );
    if job.state.is_none() {
        // fullfetch keeps no state: the failure is counted in its report only.
        return Ok(false);
    }
    let f = failures.entry(uid).or_insert_with(|| MessageFailure {
        mailbox: job.mailbox.to_string(),
        uidvalidity,
        uid,
        tries: 0,
        last_error: String::new(),
        stepped_over: false,
    });
    f.tries += 1;
    f.last_error = reason.to_string();
    f.stepped_over = f.tries >= max;
    if f.stepped_over {
        tracing::error!(
            mailbox = job.mailbox,
            uid,
            tries = f.tries,
            error = reason,
            "message failed too often: stepped over (listed by imapctl listremotes)"
        );
    }
    ctx.store
        .save_message_failure(job.user_id, job.identity_id, f, Utc::now())
        .await?;
    Ok(f.stepped_over)
}

/// Store one message and hand it off.
async fn hand_off(
    job: &MailboxJob<'_>,
    m: Fetched,
    uidvalidity: u32,
    check_delivered: bool,
) -> (u32, Outcome) {
    let ctx = job.ctx;
    let uid = m.uid;
    let raw = match m.raw {
        Ok(raw) => raw,
        Err(reason) => return (uid, Outcome::Failed(reason)),
    };
    let id = raw_message_id(job.user_id, job.identity_id, job.mailbox, uidvalidity, uid);
    if check_delivered {
        match ctx.store.raw_message_delivered(id).await {
            Ok(Some(true)) => return (uid, Outcome::AlreadyDelivered),
            Ok(_) => {}
            Err(e) => return (uid, Outcome::Failed(e.to_string())),
        }
    }
    let topic = &ctx.settings.lda.in_topic;
    let store_only = topic.is_empty();
    if let Err(e) = ctx
        .store
        .insert_raw_message_as(job.user_id, id, raw, store_only)
        .await
    {
        return (uid, Outcome::Failed(e.to_string()));
    }
    if store_only {
        return (uid, Outcome::HandedOff);
    }
    let order = ProcessRaw {
        order: orders::PROCESS_RAW.into(),
        user_id: job.user_id.to_string(),
        identity_id: job.identity_id.to_string(),
        message_id: id.to_string(),
    };
    let timeout = Duration::from_secs(ctx.settings.imap.lda_timeout_secs);
    match ctx
        .bus
        .request::<_, ProcessRawReply>(topic, &order, timeout)
        .await
    {
        Ok(reply) if reply.is_success() => {}
        Ok(reply) => return (uid, Outcome::Failed(format!("processor: {}", reply.error))),
        Err(e) => return (uid, Outcome::Failed(e.to_string())),
    }
    match ctx.store.mark_delivered(id).await {
        Ok(()) => (uid, Outcome::HandedOff),
        Err(e) => (uid, Outcome::Failed(e.to_string())),
    }
}

/// How long in-flight hand-offs may run on after a shutdown request: part
/// of the grace period, so the checkpoint and the lock release still fit in.
fn shutdown_cut(grace_secs: u64) -> Duration {
    Duration::from_secs((grace_secs / 2).clamp(1, 10))
}

/// `1:3,5,7:9` from ascending UIDs.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8, 9]), "1:3,5,7:9");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(uid_set(&[]), "");
    }
}
