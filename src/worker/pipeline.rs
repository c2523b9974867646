//! The sync pipeline of one mailbox: IMAP fetch → Cassandra → hand-off.
//!
//! A producer reads the mailbox through [`imap::fetch`](crate::imap::fetch)
//! in UID batches and streams each message, headers prepended, into a
//! bounded channel; a consumer keeps up to `imap.in_flight` messages in
//! store-and-hand-off at once. Both run in the same task (`join!`), so
//! fetching, writes and hand-offs overlap while the channel, the in-flight
//! bound and the process-wide byte budget cap memory.
//!
//! Steps per message: store `raw_message` with `delivered = false` (the id
//! is derived from the UID, so a refetch rewrites the same row), send
//! `process_raw`, then set `delivered = true`. The [`Tracker`] moves the
//! checkpoint over the unbroken run of finished UIDs only; it is saved every
//! `imap.checkpoint_every` messages and at the end.
//!
//! What each outcome does to a message ([`Outcome`]):
//! - handed off, already delivered, or expunged from the server: done;
//! - refused by the processor, or still on the server but unfetchable: one
//!   try; after `max_message_tries` it is stepped over and listed;
//! - larger than `max_message_size` (announced or real), or than
//!   `raw_size_limit` when no object store is configured: stepped over at
//!   once, since no retry can succeed;
//! - an outage of ours (no processor, NATS or Cassandra failing): the
//!   mailbox stops there, the checkpoint stays before it, no try is counted;
//! - a hand-off timeout: a try only if a hand-off sent after it succeeds
//!   (a poison message); if none does, the processor is silent: an outage.
//!
//! Before the first hand-off the highest UID of the run is saved as the
//! mailbox's high-water mark. Messages at or below the previous mark may
//! have been delivered by a sync that did not end cleanly (crash, failure
//! further down), so their `delivered` flag is read before a hand-off; a
//! clean sync leaves the mark at or below its checkpoint and pays nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use uuid::Uuid;

use super::checkpoint;
use super::context::{Counters, Ctx};
use super::resync;
use super::tracker::Tracker;
use super::JobError;
use crate::bus::wire::{orders, ProcessRaw, ProcessRawReply};
use crate::bus::BusError;
use crate::imap::fetch::{uid_set, Changes, MailboxInfo, Reader};
use crate::imap::headers::{self, FetchedMeta};
use crate::imap::{ConnInfo, ImapError, ImapSession};
use crate::shutdown::Shutdown;
use crate::store::identity::mailbox_key;
use crate::store::raw_message::{raw_message_id, RawMessage};
use crate::store::resync::MailboxStatus;
use crate::store::state::{Checkpoint, MessageFailure};

/// Where a mailbox's fetch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFrom {
    /// A fullfetch: every message, and no state read or written.
    FullFetch,
    /// The first sync of this mailbox: every message, state kept.
    First,
    /// A resync after this checkpoint.
    Resume(Checkpoint),
}

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
    /// UTF-8; encoded for the wire by the IMAP layer.
    pub mailbox: &'a str,
    pub from: SyncFrom,
    /// `(uidvalidity, modseq)` to EXAMINE `(QRESYNC ...)` from, on a
    /// session where QRESYNC is enabled (see [`super::resync`]).
    pub qresync: Option<(u32, u64)>,
    pub counters: &'a Counters,
    /// Fires on shutdown, a lost lock or the job deadline.
    pub stop: Shutdown,
}

impl MailboxJob<'_> {
    fn tracked(&self) -> bool {
        self.from != SyncFrom::FullFetch
    }

    /// The order this mailbox runs for, for the logs.
    fn order(&self) -> &'static str {
        match self.from {
            SyncFrom::FullFetch => orders::FULLFETCH,
            _ => orders::SYNC,
        }
    }
}

/// One message between the fetch and the end of its hand-off.
struct Fetched {
    uid: u32,
    item: Item,
}

enum Item {
    /// Its bytes (headers prepended) and its share of the memory budget,
    /// released when the hand-off ends.
    Message(RawMessage, OwnedSemaphorePermit),
    /// Can never be stored (too large).
    Refused(String),
    /// Still on the server, which would not send it.
    Unfetchable(String),
    /// Expunged while we synced.
    Gone,
}

enum Outcome {
    HandedOff,
    AlreadyDelivered,
    Gone,
    /// The processor said no (or answered nonsense): one try.
    Rejected(String),
    /// The server would not send it: one try.
    Unfetchable(String),
    /// No try can succeed: stepped over at once.
    Permanent(String),
    /// No answer in time: a try or an outage, decided later.
    TimedOut(String),
    /// Ours: stop the mailbox, count nothing against the message.
    Outage(String),
}

/// Sync one mailbox. Returns when every fetched message has finished its
/// hand-off (or failed), the stop token fired, an outage stopped it, or the
/// server failed; in every case the checkpoint reached is saved first.
#[tracing::instrument(name = "mailbox", skip_all, fields(user_id = %job.user_id,
    identity_id = %job.identity_id, mailbox = job.mailbox, order = job.order()))]
pub async fn sync_mailbox(job: &MailboxJob<'_>, session: &mut ImapSession) -> Result<(), JobError> {
    let ctx = job.ctx;
    let io = ctx.settings.imap.io_timeout();
    let mut reader = Reader::new(session, job.server, io, job.stop.clone());
    let mut changes = Changes::with_cap(resync::MAX_CHANGES);
    let mb = examine(job, &mut reader, &mut changes).await?;
    let uidvalidity = mb.uidvalidity;
    let base = start_after(job, uidvalidity);
    if job.tracked() && job.qresync.is_some_and(|(v, _)| v == uidvalidity) {
        record_changes(job, uidvalidity, base, &changes).await?;
    }
    let save = |cp: u32| async move {
        if !job.tracked() {
            return Ok(());
        }
        let checkpoint = Checkpoint {
            uidvalidity,
            lastseenuid: cp,
        };
        settle(|| checkpoint::save(ctx, job.user_id, job.identity_id, job.mailbox, checkpoint))
            .await
    };

    let mut tracker = Tracker::new(base, new_uids(&mut reader, mb, base).await?);
    let mut failures = earlier_failures(job, uidvalidity, base, tracker.uids()).await?;
    if tracker.is_empty() {
        // A new generation of the mailbox starts with a checkpoint.
        let known = matches!(job.from, SyncFrom::Resume(cp) if cp.uidvalidity == uidvalidity);
        if job.tracked() && !known {
            save(base).await?;
        }
        // No message waits for a retry (any such is gone): a clean end.
        save_status(job, mb, base).await?;
        return Ok(());
    }
    for f in failures.values().filter(|f| f.stepped_over) {
        tracker.done(f.uid);
    }
    let check_upto = high_water(job, uidvalidity, tracker.uids()).await?;
    tracing::info!(
        mailbox = job.mailbox,
        uidvalidity,
        from_uid = base + 1,
        messages = tracker.len(),
        "fetching"
    );
    let run = Consumer {
        job,
        uidvalidity,
        check_upto,
        tracker: &mut tracker,
        failures: &mut failures,
        answered_upto: 0,
    };
    let ended = run.run(&mut reader, &save).await;

    // Whatever happened, keep what was reached.
    let reached = tracker.checkpoint();
    let saved = save(reached).await;
    tracing::info!(mailbox = job.mailbox, checkpoint = reached, "mailbox done");
    ended?;
    saved?;
    if job.stop.is_triggered() && !tracker.complete() {
        return Err(JobError::Interrupted(
            "stopped before the end of the mailbox".into(),
        ));
    }
    // Only a clean end is remembered as the mailbox's state: with a retry
    // pending, the next sync must open it again.
    if tracker.complete() && failures.values().all(|f| f.stepped_over) {
        save_status(job, mb, reached).await?;
    }
    Ok(())
}

/// Called once no hand-off is in flight: if some had timed out, the
/// processor is silent (every hand-off sent after them ended and none
/// succeeded), which is an outage.
fn note_silent_processor(timed_out: &mut Pending, outage: &mut Option<String>) {
    if !timed_out.is_empty() {
        outage.get_or_insert_with(|| format!("no answer from the processor ({})", timed_out[0].2));
        timed_out.clear();
    }
}

/// Open the mailbox read-only, the way the job can: with QRESYNC (the
/// changes since the last sync land in `changes`), with CONDSTORE (for the
/// HIGHESTMODSEQ of the next sync), or plainly.
async fn examine(
    job: &MailboxJob<'_>,
    reader: &mut Reader<'_>,
    changes: &mut Changes,
) -> Result<MailboxInfo, JobError> {
    match job.qresync {
        Some((v, m)) => reader.examine_qresync(job.mailbox, v, m, changes).await,
        // Tracked on a CONDSTORE server: HIGHESTMODSEQ for the next sync.
        None if job.tracked() && job.conn.caps.condstore => {
            reader.examine_condstore(job.mailbox).await
        }
        None => reader.examine(job.mailbox).await,
    }
    .map_err(imap_err)
}

/// Remember what EXAMINE said, once the mailbox synced cleanly: the next
/// sync compares the server's STATUS with it (see [`super::resync`]).
async fn save_status(
    job: &MailboxJob<'_>,
    mb: MailboxInfo,
    lastseenuid: u32,
) -> Result<(), JobError> {
    if !job.tracked() || mb.uidvalidity == 0 {
        return Ok(());
    }
    let st = MailboxStatus {
        uidvalidity: mb.uidvalidity,
        uidnext: mb.uid_next.unwrap_or(0),
        lastseenuid,
        messages: mb.exists,
        highestmodseq: resync::modseq(mb.highestmodseq),
    };
    let ctx = job.ctx;
    settle(|| resync::save_status(ctx, job.user_id, job.identity_id, job.mailbox, st)).await
}

/// Record the flag changes and expunges a QRESYNC EXAMINE reported for the
/// messages handed off already (UIDs up to `base`).
async fn record_changes(
    job: &MailboxJob<'_>,
    uidvalidity: u32,
    base: u32,
    changes: &Changes,
) -> Result<(), JobError> {
    if changes.dropped > 0 {
        tracing::warn!(
            mailbox = job.mailbox,
            dropped = changes.dropped,
            kept = resync::MAX_CHANGES,
            "more flag changes and expunges than are recorded at once: the rest are not recorded"
        );
    }
    let rows = resync::changes_of(job.mailbox, uidvalidity, base, changes);
    if !rows.is_empty() {
        tracing::info!(
            mailbox = job.mailbox,
            changes = rows.len(),
            "recording flag changes and expunges"
        );
    }
    let ctx = job.ctx;
    settle(|| resync::record(ctx, job.counters, job.user_id, job.identity_id, &rows)).await
}

/// The UID after which this sync starts: the checkpoint, unless the
/// mailbox was recreated (another UIDVALIDITY) or this is a first sync.
fn start_after(job: &MailboxJob<'_>, uidvalidity: u32) -> u32 {
    match job.from {
        SyncFrom::Resume(cp) if cp.uidvalidity == uidvalidity && uidvalidity != 0 => cp.lastseenuid,
        SyncFrom::Resume(cp) => {
            tracing::warn!(
                mailbox = job.mailbox,
                old = cp.uidvalidity,
                new = uidvalidity,
                "UIDVALIDITY changed: fetching the whole mailbox again"
            );
            0
        }
        SyncFrom::First | SyncFrom::FullFetch => 0,
    }
}

/// The UIDs above `base`. When UIDNEXT shows nothing new, none, and not a
/// single command sent (the cheap path of a no-change resync).
async fn new_uids(
    reader: &mut Reader<'_>,
    mb: MailboxInfo,
    base: u32,
) -> Result<Vec<u32>, JobError> {
    let nothing_new = mb.exists == 0 || mb.uid_next.is_some_and(|next| next <= base + 1);
    if nothing_new {
        return Ok(Vec::new());
    }
    reader
        .search(&format!("{}:*", base + 1))
        .await
        .map_err(imap_err)
}

fn imap_err(e: ImapError) -> JobError {
    match e {
        ImapError::Interrupted => {
            JobError::Interrupted("stopped while waiting on the server".into())
        }
        e => JobError::Imap(e),
    }
}

/// A store write that must land: retried a few times with backoff, so a
/// Cassandra restart of a few seconds does not lose the checkpoint reached.
async fn settle<F, Fut>(mut write: F) -> Result<(), JobError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), JobError>>,
{
    let mut delay = Duration::from_millis(500);
    let mut tries = 0;
    loop {
        match write().await {
            Ok(()) => return Ok(()),
            Err(e) if tries >= 5 => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot save the sync state yet: retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
                tries += 1;
            }
        }
    }
}

/// Earlier failures of this mailbox generation, but the rows of messages
/// this sync learns are gone, which it drops (see [`gone_failures`]).
/// `present` are the UIDs above `base` that `UID SEARCH` found.
async fn earlier_failures(
    job: &MailboxJob<'_>,
    uidvalidity: u32,
    base: u32,
    present: &[u32],
) -> Result<HashMap<u32, MessageFailure>, JobError> {
    let mut failures = HashMap::new();
    if !job.tracked() {
        return Ok(failures);
    }
    let store = &job.ctx.store;
    // A row written under another spelling of INBOX is INBOX's.
    let rows = store.message_failures(job.user_id, job.identity_id).await?;
    let (mine, gone) = gone_failures(job.mailbox, uidvalidity, base, present, rows);
    for f in &gone {
        tracing::info!(
            mailbox = job.mailbox,
            uidvalidity = f.uidvalidity,
            uid = f.uid,
            tries = f.tries,
            "message with a failure row gone from the server: row dropped"
        );
        let at = (
            job.user_id,
            job.identity_id,
            &f.mailbox,
            f.uidvalidity,
            f.uid,
        );
        store
            .clear_message_failure(at.0, at.1, at.2, at.3, at.4)
            .await?;
    }
    Counters::add(&job.counters.gone, gone.len() as u64);
    job.ctx.metrics.gone.inc_by(gone.len() as u64);
    for f in mine {
        failures.insert(f.uid, f);
    }
    Ok(failures)
}

/// Split the failure rows of `mailbox` into those of this generation that
/// still stand, and those of messages known gone: waiting for a retry, and
/// either above the checkpoint (`base`) and no longer found by `UID
/// SEARCH` (`present`), or of an older generation (UIDVALIDITY changed).
/// Such a row could never be retried, and would keep the folder from ever
/// being skipped. Rows stepped over stay: they are listed for operators,
/// and `imapctl retry` hands off their stored copies.
fn gone_failures(
    mailbox: &str,
    uidvalidity: u32,
    base: u32,
    present: &[u32],
    rows: Vec<MessageFailure>,
) -> (Vec<MessageFailure>, Vec<MessageFailure>) {
    let mut mine = Vec::new();
    let mut gone = Vec::new();
    for f in rows {
        if mailbox_key(&f.mailbox) != mailbox {
            continue;
        }
        let missing = f.uid > base && present.binary_search(&f.uid).is_err();
        if !f.stepped_over && (f.uidvalidity != uidvalidity || missing) {
            gone.push(f);
        } else if f.uidvalidity == uidvalidity {
            mine.push(f);
        }
    }
    (mine, gone)
}

/// Read the previous high-water mark and save this run's. Returns the UID
/// up to which `delivered` must be checked before a hand-off.
async fn high_water(job: &MailboxJob<'_>, uidvalidity: u32, uids: &[u32]) -> Result<u32, JobError> {
    if !job.tracked() {
        // A fullfetch keeps no mark: any message may be stored already.
        return Ok(u32::MAX);
    }
    let store = &job.ctx.store;
    let previous = match store
        .high_water(job.user_id, job.identity_id, job.mailbox)
        .await?
    {
        Some((v, high)) if v == uidvalidity => high,
        _ => 0,
    };
    let top = uids.last().copied().unwrap_or(0);
    if top > previous {
        store
            .save_high_water(job.user_id, job.identity_id, job.mailbox, uidvalidity, top)
            .await?;
    }
    Ok(previous)
}

/// Read messages batch by batch and send them down the channel. Messages
/// larger than `max_message_size` are not downloaded; whatever the server
/// does not send is told apart as gone (expunged) or unfetchable.
async fn produce(
    job: &MailboxJob<'_>,
    reader: &mut Reader<'_>,
    uids: Vec<u32>,
    tx: mpsc::Sender<Fetched>,
) -> Result<(), ImapError> {
    for batch in uids.chunks(job.ctx.settings.imap.fetch_batch as usize) {
        if job.stop.is_triggered() {
            return Ok(());
        }
        let Some((wanted, refused)) = sizes_and_refusals(job, reader, batch, &tx).await? else {
            return Ok(());
        };
        let Some((received, no_text)) = bodies(job, reader, &wanted, &tx).await? else {
            return Ok(());
        };
        // What the server did not send at all: gone, or there but refused.
        let unanswered: Vec<u32> = batch
            .iter()
            .copied()
            .filter(|u| !received.contains(u) && !refused.contains(u))
            .collect();
        if !unanswered.is_empty() && !unanswered_ones(job, reader, unanswered, no_text, &tx).await?
        {
            return Ok(());
        }
    }
    Ok(())
}

/// The sizes of `batch` (so a huge message is refused without downloading
/// it): those to fetch, with their sizes, in UID order, and those refused;
/// `None` when the job stops.
async fn sizes_and_refusals(
    job: &MailboxJob<'_>,
    reader: &mut Reader<'_>,
    batch: &[u32],
    tx: &mpsc::Sender<Fetched>,
) -> Result<Option<(BTreeMap<u32, u32>, HashSet<u32>)>, ImapError> {
    let (max, setting) = job.ctx.message_limit();
    let (sizes, _) = reader.sizes(batch).await?;
    let in_batch: HashSet<u32> = batch.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut refused = HashSet::new();
    let mut wanted = BTreeMap::new();
    for (uid, size) in sizes {
        if !in_batch.contains(&uid) || !seen.insert(uid) {
            continue;
        }
        if size as u64 > max {
            refused.insert(uid);
            let reason = format!("message of {size} bytes exceeds {setting}");
            if !send(job, tx, uid, Item::Refused(reason)).await {
                return Ok(None);
            }
        } else {
            wanted.insert(uid, size);
        }
    }
    Ok(Some((wanted, refused)))
}

/// Fetch the bodies of `wanted` (UID → announced size) and send each down
/// the channel: the UIDs received, and the server's `NO` text if it ended
/// the FETCH so; `None` when the job stops.
///
/// The memory of each message is reserved from the process's byte budget
/// before it is read (from its announced size, topped up if it is bigger),
/// so every message byte the worker holds is counted.
async fn bodies(
    job: &MailboxJob<'_>,
    reader: &mut Reader<'_>,
    wanted: &BTreeMap<u32, u32>,
    tx: &mpsc::Sender<Fetched>,
) -> Result<Option<(HashSet<u32>, Option<String>)>, ImapError> {
    let mut received = HashSet::new();
    let to_fetch: Vec<u32> = wanted.keys().copied().collect();
    if to_fetch.is_empty() {
        return Ok(Some((received, None)));
    }
    let (max, setting) = job.ctx.message_limit();
    let mut bodies = reader.bodies(&to_fetch, job.conn.gmail).await?;
    // Servers send in UID order as a rule; the next expected is the
    // smallest not received yet.
    let mut pending: BTreeSet<u32> = wanted.keys().copied().collect();
    loop {
        let expected = pending.first().map_or(0, |u| wanted[u] as usize);
        // Backpressure: ends when hand-offs finish, or when the consumer
        // stopped taking messages.
        let mut permit = tokio::select! {
            p = job.ctx.reserve_bytes(expected + BLOCK + HEADERS) => p,
            _ = tx.closed() => return Ok(None),
        };
        let Some(b) = bodies.next().await? else {
            break;
        };
        let uid = b.uid;
        if !pending.remove(&uid) || !received.insert(uid) {
            continue;
        }
        Counters::add(&job.counters.fetched, 1);
        job.ctx.metrics.fetched.inc();
        job.ctx.metrics.fetched_bytes.inc_by(b.data.len() as u64);
        let item = if b.data.len() as u64 > max {
            Item::Refused(format!(
                "message of {} bytes (the server announced less) exceeds {setting}",
                b.data.len()
            ))
        } else {
            tokio::select! {
                _ = job.ctx.top_up_bytes(&mut permit, b.held + HEADERS) => {}
                _ = tx.closed() => return Ok(None),
            }
            Item::Message(with_headers(job, b), permit)
        };
        if !send(job, tx, uid, item).await {
            return Ok(None);
        }
    }
    Ok(Some((received, bodies.status().err())))
}

/// Over a message's size, what reading it may hold: the reader's buffer
/// grows in blocks of 4 KiB.
const BLOCK: usize = 4 * 1024;

/// Room for the headers we add.
const HEADERS: usize = 1024;

/// Messages asked for and not sent: still there (the server would not
/// send them: `no_text` is its reason, if it gave one) or gone. `false`
/// when the job stops.
async fn unanswered_ones(
    job: &MailboxJob<'_>,
    reader: &mut Reader<'_>,
    unanswered: Vec<u32>,
    no_text: Option<String>,
    tx: &mpsc::Sender<Fetched>,
) -> Result<bool, ImapError> {
    let still: HashSet<u32> = reader
        .search(&uid_set(&unanswered))
        .await?
        .into_iter()
        .collect();
    for uid in unanswered {
        let item = if still.contains(&uid) {
            Item::Unfetchable(match &no_text {
                Some(t) => format!("the server refused to send it: NO {t}"),
                None => "the server did not send it".to_string(),
            })
        } else {
            Item::Gone
        };
        if !send(job, tx, uid, item).await {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Send one item down the channel; `false` when the consumer is gone or
/// the job is stopping.
async fn send(job: &MailboxJob<'_>, tx: &mpsc::Sender<Fetched>, uid: u32, item: Item) -> bool {
    let mut stop = job.stop.clone();
    tokio::select! {
        r = tx.send(Fetched { uid, item }) => r.is_ok(),
        _ = stop.wait() => false,
    }
}

/// The raw message as stored: X-Fetched headers, then the server's bytes
/// (not copied).
fn with_headers(job: &MailboxJob<'_>, b: crate::imap::fetch::Body) -> RawMessage {
    let user = job.user_id.to_string();
    let flags: Vec<String> = b
        .flags
        .iter()
        .map(|f| headers::flag_name(&async_imap::types::Flag::from(f.as_str())))
        .collect();
    let meta = FetchedMeta {
        server: job.server,
        conn: job.conn,
        account: job.display_name,
        mailbox: job.mailbox,
        user_id: &user,
        uid: b.uid,
        flags: &flags,
        gmail_msgid: b.gmail_msgid,
        gmail_labels: &b.gmail_labels,
        date: Utc::now().fixed_offset(),
    };
    let mut head = Vec::with_capacity(512);
    headers::write(&meta, &mut head);
    RawMessage::new(head, b.data)
}

/// The consuming half of a mailbox sync: hand-offs in flight and the
/// bookkeeping of their outcomes.
struct Consumer<'j, 'a> {
    job: &'j MailboxJob<'a>,
    uidvalidity: u32,
    /// `delivered` is read first for UIDs up to this one.
    check_upto: u32,
    tracker: &'j mut Tracker,
    failures: &'j mut HashMap<u32, MessageFailure>,
    /// The latest (in sending order) hand-off the processor answered.
    answered_upto: u64,
}

/// Hand-offs that timed out and wait for a verdict: `(sequence, uid, why)`.
type Pending = Vec<(u64, u32, String)>;

impl Consumer<'_, '_> {
    /// Fetch the tracker's UIDs (but those stepped over) and hand them off,
    /// the two halves running side by side.
    async fn run<F, Fut>(mut self, reader: &mut Reader<'_>, save: &F) -> Result<(), JobError>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = Result<(), JobError>>,
    {
        let (tx, rx) = mpsc::channel::<Fetched>(self.job.ctx.settings.imap.in_flight);
        let uids: Vec<u32> = self
            .tracker
            .uids()
            .iter()
            .copied()
            .filter(|u| !self.failures.get(u).is_some_and(|f| f.stepped_over))
            .collect();
        let job = self.job;
        let (produced, consumed) =
            tokio::join!(produce(job, reader, uids, tx), self.consume(rx, save));
        consumed?;
        produced.map_err(imap_err)
    }

    /// Keep up to `in_flight` hand-offs going; account for each result.
    async fn consume<F, Fut>(
        &mut self,
        mut rx: mpsc::Receiver<Fetched>,
        save: &F,
    ) -> Result<(), JobError>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = Result<(), JobError>>,
    {
        let job = self.job;
        let s = &job.ctx.settings.imap;
        let mut inflight = FuturesUnordered::new();
        let mut open = true;
        let mut since_save = 0u32;
        let mut last_saved = self.tracker.checkpoint();
        let mut stop = job.stop.clone();
        // After a stop: the hand-offs in flight get this long to end.
        let mut cut_at: Option<tokio::time::Instant> = None;
        let mut seq = 0u64;
        let mut timed_out: Pending = Vec::new();
        let mut outage: Option<String> = None;
        let uidvalidity = self.uidvalidity;
        loop {
            if inflight.is_empty() {
                note_silent_processor(&mut timed_out, &mut outage);
            }
            if outage.is_some() && open {
                open = false;
                rx.close();
            }
            if !open && inflight.is_empty() {
                break;
            }
            let paused = !timed_out.is_empty();
            tokio::select! {
                biased;
                // Stop: take nothing more; what is queued stays unfetched as
                // far as the checkpoint knows, and the next sync fetches it.
                _ = stop.wait(), if cut_at.is_none() => {
                    open = false;
                    rx.close();
                    cut_at = Some(tokio::time::Instant::now() + shutdown_cut(s.shutdown_grace()));
                }
                _ = tokio::time::sleep_until(cut_at.unwrap_or_else(tokio::time::Instant::now)), if cut_at.is_some() => {
                    tracing::warn!(mailbox = job.mailbox, abandoned = inflight.len(),
                        "stopping: hand-offs still running are abandoned (fetched again next time)");
                    break;
                }
                Some((n, uid, outcome)) = inflight.next(), if !inflight.is_empty() => {
                    self.account(n, uid, outcome, &mut timed_out, &mut outage).await?;
                    since_save += 1;
                    if since_save >= s.checkpoint_every && self.tracker.checkpoint() != last_saved {
                        last_saved = self.tracker.checkpoint();
                        since_save = 0;
                        save(last_saved).await?;
                    }
                }
                msg = rx.recv(), if open && !paused && inflight.len() < s.in_flight => {
                    match msg {
                        Some(m) => {
                            seq += 1;
                            let n = seq;
                            let check = m.uid <= self.check_upto;
                            inflight.push(async move {
                                let (uid, outcome) = hand_off(job, m, uidvalidity, check).await;
                                (n, uid, outcome)
                            });
                        }
                        None => open = false,
                    }
                }
                else => break,
            }
        }
        outage.map_or(Ok(()), |reason| Err(JobError::Outage(reason)))
    }

    /// Account for one finished hand-off (`n` is its place in sending order).
    async fn account(
        &mut self,
        n: u64,
        uid: u32,
        outcome: Outcome,
        timed_out: &mut Pending,
        outage: &mut Option<String>,
    ) -> Result<(), JobError> {
        let counters = self.job.counters;
        match outcome {
            Outcome::HandedOff | Outcome::AlreadyDelivered | Outcome::Gone => {
                match outcome {
                    Outcome::HandedOff => {
                        Counters::add(&counters.handed_off, 1);
                        self.job.ctx.metrics.handed_off.inc();
                    }
                    Outcome::AlreadyDelivered => {
                        Counters::add(&counters.already_delivered, 1);
                        self.job.ctx.metrics.already_delivered.inc();
                    }
                    _ => {
                        tracing::info!(
                            mailbox = self.job.mailbox,
                            uid,
                            "message expunged during the sync"
                        );
                        Counters::add(&counters.gone, 1);
                        self.job.ctx.metrics.gone.inc();
                    }
                }
                self.done(uid).await?;
                if !matches!(outcome, Outcome::Gone) {
                    self.answered_upto = self.answered_upto.max(n);
                    // The processor answered a hand-off sent after these:
                    // they are poison messages, not an outage.
                    let (poison, wait): (Pending, Pending) =
                        timed_out.drain(..).partition(|(m, _, _)| *m < n);
                    *timed_out = wait;
                    for (_, u, reason) in poison {
                        self.failed(u, &reason, false).await?;
                    }
                }
            }
            Outcome::Rejected(reason) | Outcome::Unfetchable(reason) => {
                self.failed(uid, &reason, false).await?
            }
            Outcome::Permanent(reason) => self.failed(uid, &reason, true).await?,
            // A hand-off sent after it was answered already: poison.
            Outcome::TimedOut(reason) if n < self.answered_upto => {
                self.failed(uid, &reason, false).await?
            }
            Outcome::TimedOut(reason) => timed_out.push((n, uid, reason)),
            Outcome::Outage(reason) => {
                tracing::warn!(mailbox = self.job.mailbox, uid, error = %reason,
                    "outage on our side: the mailbox stops here, nothing counted against the message");
                outage.get_or_insert(reason);
            }
        }
        Ok(())
    }

    async fn done(&mut self, uid: u32) -> Result<(), JobError> {
        let job = self.job;
        self.tracker.done(uid);
        // Cleared under the mailbox name it was written with.
        if let Some(f) = self.failures.remove(&uid).filter(|_| job.tracked()) {
            job.ctx
                .store
                .clear_message_failure(
                    job.user_id,
                    job.identity_id,
                    &f.mailbox,
                    self.uidvalidity,
                    uid,
                )
                .await?;
        }
        Ok(())
    }

    /// Count a failed try of `uid` (or, `permanent`, give up on it at once);
    /// a message that has failed too often is stepped over: the checkpoint
    /// moves past it and it stays listed for operators.
    async fn failed(&mut self, uid: u32, reason: &str, permanent: bool) -> Result<(), JobError> {
        let job = self.job;
        let max = job.ctx.settings.imap.max_message_tries;
        tracing::warn!(
            mailbox = job.mailbox,
            uid,
            error = reason,
            "message not handed off"
        );
        let f = self.failures.entry(uid).or_insert_with(|| MessageFailure {
            mailbox: job.mailbox.to_string(),
            uidvalidity: self.uidvalidity,
            uid,
            tries: 0,
            last_error: String::new(),
            stepped_over: false,
        });
        f.tries += 1;
        f.last_error = reason.to_string();
        f.stepped_over = permanent || f.tries >= max;
        if f.stepped_over {
            tracing::error!(
                mailbox = job.mailbox,
                uid,
                tries = f.tries,
                error = reason,
                "message stepped over (listed by imapctl listremotes)"
            );
        }
        if job.tracked() {
            job.ctx
                .store
                .save_message_failure(job.user_id, job.identity_id, f, Utc::now())
                .await?;
        }
        if f.stepped_over {
            job.counters.step_over(job.mailbox, uid, reason);
            job.ctx.metrics.stepped_over.inc();
            self.tracker.done(uid);
        } else {
            Counters::add(&job.counters.failed, 1);
            job.ctx.metrics.failed.inc();
        }
        Ok(())
    }
}

/// Store one message and hand it off.
async fn hand_off(
    job: &MailboxJob<'_>,
    m: Fetched,
    uidvalidity: u32,
    check: bool,
) -> (u32, Outcome) {
    let uid = m.uid;
    let outcome = match m.item {
        Item::Message(raw, _permit) => store_and_hand_off(job, uid, raw, uidvalidity, check).await,
        Item::Refused(reason) => Outcome::Permanent(reason),
        Item::Unfetchable(reason) => Outcome::Unfetchable(reason),
        Item::Gone => Outcome::Gone,
    };
    (uid, outcome)
}

async fn store_and_hand_off(
    job: &MailboxJob<'_>,
    uid: u32,
    raw: RawMessage,
    uidvalidity: u32,
    check: bool,
) -> Outcome {
    let ctx = job.ctx;
    let id = raw_message_id(job.user_id, job.identity_id, job.mailbox, uidvalidity, uid);
    if check {
        // May be stored and delivered already: never store it again over a
        // delivered row, never hand it off twice.
        match ctx.store.raw_message_delivered(id).await {
            Ok(Some(true)) => return Outcome::AlreadyDelivered,
            Ok(_) => {}
            Err(e) => return Outcome::Outage(e.to_string()),
        }
    }
    let topic = &ctx.settings.lda.in_topic;
    let store_only = topic.is_empty();
    if let Err(e) = ctx.save_raw_message(job.user_id, id, raw, store_only).await {
        return Outcome::Outage(e.to_string());
    }
    ctx.metrics.stored.inc();
    if store_only {
        return Outcome::HandedOff;
    }
    let order = ProcessRaw {
        order: orders::PROCESS_RAW.into(),
        user_id: job.user_id.to_string(),
        identity_id: job.identity_id.to_string(),
        message_id: id.to_string(),
    };
    let timeout = ctx.settings.imap.lda_timeout();
    let sent = std::time::Instant::now();
    let answer = ctx
        .bus
        .request::<_, ProcessRawReply>(topic, &order, timeout)
        .await;
    ctx.metrics
        .hand_off_seconds
        .observe(sent.elapsed().as_secs_f64());
    match answer {
        Ok(reply) if reply.is_success() => {}
        Ok(reply) => return Outcome::Rejected(format!("processor: {}", reply.error)),
        Err(e @ BusError::TimedOut { .. }) => return Outcome::TimedOut(e.to_string()),
        Err(e @ BusError::BadReply { .. }) => return Outcome::Rejected(e.to_string()),
        Err(BusError::NoResponders(subject)) => {
            return Outcome::Outage(format!("no processor listening on {subject:?}"))
        }
        Err(e) => return Outcome::Outage(e.to_string()),
    }
    match ctx.store.mark_delivered(id).await {
        Ok(()) => Outcome::HandedOff,
        Err(e) => Outcome::Outage(e.to_string()),
    }
}

/// How long in-flight hand-offs may run on after a stop: part of the grace
/// period, so the checkpoint and the lock release still fit in.
fn shutdown_cut(grace: Duration) -> Duration {
    (grace / 2).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mailbox: &str, uidvalidity: u32, uid: u32, stepped_over: bool) -> MessageFailure {
        MessageFailure {
            mailbox: mailbox.into(),
            uidvalidity,
            uid,
            tries: 1,
            last_error: String::new(),
            stepped_over,
        }
    }

    #[test]
    fn only_rows_of_messages_known_gone_are_dropped() {
        let rows = vec![
            row("INBOX", 7, 5, false), // still found: stays
            row("inbox", 7, 6, false), // INBOX's, gone: dropped
            row("INBOX", 7, 8, true),  // stepped over: stays
            row("INBOX", 6, 9, false), // an older generation: dropped
            row("INBOX", 6, 10, true), // ... but stepped over: left alone
            row("Work", 7, 6, false),  // another mailbox
            row("INBOX", 7, 2, false), // at or below the checkpoint: stays
        ];
        let (mine, gone) = gone_failures("INBOX", 7, 4, &[5, 7], rows);
        let uids = |v: &[MessageFailure]| v.iter().map(|f| f.uid).collect::<Vec<_>>();
        assert_eq!(uids(&mine), [5, 8, 2]);
        assert_eq!(uids(&gone), [6, 9]);
        assert_eq!(gone[0].mailbox, "inbox", "cleared under its own spelling");
    }
}
