//! One job from start to end: a sync of a stored identity (lock, connect,
//! every mailbox, state written back, lock released) or a fullfetch (the
//! same pipeline, no state). Failures are recorded on the identity as
//! CONTRACT §4 says, and every path releases the lock it took.

use std::sync::Arc;
use std::time::Duration;

// Dates in infos are written as Go's time.RFC3339 does: seconds, `Z`.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::account;
use super::checkpoint;
use super::context::{Counters, Ctx, SyncHold};
use super::pipeline::{sync_mailbox, MailboxJob, SyncFrom};
use super::resync;
use super::{Busy, JobError, Missing};
use crate::bus::wire::{orders, CacheOrder, JobReport};
use crate::imap::fetch::Reader;
use crate::imap::folders::Undecodable;
use crate::imap::{self, status, Account, ImapError, ImapSession};
use crate::metrics::InFlight;
use crate::renewal;
use crate::shutdown::{self, Shutdown};
use crate::store::identity::{
    mailbox_key, time_text, ErrorStreak, Identity, Status, SyncingMarker, Throttle, PROTOCOL_EMAIL,
};
use crate::store::raw_message::fullfetch_identity;

/// A `sync` order, validated.
#[derive(Clone)]
pub struct SyncRequest {
    pub user_id: Uuid,
    pub identity_id: Uuid,
    /// Overrides the stored password for this run only (never logged).
    pub password: String,
}

// The password is a secret: Debug says only whether there is one.
impl std::fmt::Debug for SyncRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncRequest")
            .field("user_id", &self.user_id)
            .field("identity_id", &self.identity_id)
            .field("password", &redacted(&self.password))
            .finish()
    }
}

/// A `fullfetch` order, validated.
#[derive(Clone)]
pub struct FullFetchRequest {
    pub user_id: Uuid,
    pub server: String,
    pub login: String,
    pub password: String,
    pub mailbox: String,
}

impl std::fmt::Debug for FullFetchRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FullFetchRequest")
            .field("user_id", &self.user_id)
            .field("server", &self.server)
            .field("login", &self.login)
            .field("password", &redacted(&self.password))
            .field("mailbox", &self.mailbox)
            .finish()
    }
}

fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

fn report(order: &str, user: Uuid, identity: Uuid) -> JobReport {
    JobReport {
        order: order.to_string(),
        user_id: user.to_string(),
        identity_id: identity.to_string(),
        ..Default::default()
    }
}

/// Fill the end of a report from a job's result.
fn conclude(rep: &mut JobReport, counters: &Counters, result: &Result<(), JobError>) {
    counters.fill(rep);
    rep.interrupted = matches!(result, Err(e) if e.is_interrupted());
    rep.busy = matches!(result, Err(JobError::Busy(_)));
    rep.outage = matches!(
        result,
        Err(JobError::Outage(_) | JobError::Store(_) | JobError::Bus(_))
    );
    rep.throttled = matches!(result, Err(e) if e.is_throttled());
    rep.ok =
        result.is_ok() && rep.failed == 0 && rep.stepped_over == 0 && rep.mailbox_errors.is_empty();
    if let Err(e) = result {
        rep.error = e.to_string();
    }
}

/// What part of an identity a sync covers, and over which connection.
#[derive(Default)]
pub struct Scope<'a> {
    /// Only this mailbox (an IDLE wake-up syncs the folder announced), if
    /// it is one the identity syncs (with `mailboxes: *`, the caller has
    /// checked it is a syncable folder); every mailbox when `None`.
    pub only: Option<&'a str>,
    /// A session already logged in (the IDLE one), used instead of a new
    /// connection and left open at the end.
    pub held: Option<(&'a mut ImapSession, &'a imap::ConnInfo)>,
    /// QRESYNC was enabled on the held session.
    pub qresync_on: bool,
}

/// Sync a stored identity. Never panics on bad data: every problem ends up
/// in the report (and, when it concerns the account, on the identity).
pub async fn sync_identity(ctx: &Ctx, req: SyncRequest, counters: Arc<Counters>) -> JobReport {
    sync_scoped(ctx, req, counters, Scope::default()).await.0
}

/// [`sync_identity`], limited to `scope`: the same lock, marker, pipeline
/// and checkpoints, so a live sync keeps every guarantee of a full one.
#[tracing::instrument(name = "job", skip_all,
    fields(user_id = %req.user_id, identity_id = %req.identity_id, order = orders::SYNC))]
pub async fn sync_scoped(
    ctx: &Ctx,
    req: SyncRequest,
    counters: Arc<Counters>,
    scope: Scope<'_>,
) -> (JobReport, Ended) {
    let _running = InFlight::new(&ctx.metrics.jobs_in_flight);
    let mut rep = report(orders::SYNC, req.user_id, req.identity_id);
    ctx.metrics.syncs_started.inc();
    let started = std::time::Instant::now();
    let result = imap::tallied(
        counters.imap_commands.clone(),
        sync_locked(ctx, &req, &counters, &mut rep, scope),
    )
    .await;
    conclude(&mut rep, &counters, &result);
    sync_metrics(ctx, &result, started);
    note_throttling(ctx, &result);
    if rep.ok {
        tracing::info!(user = %req.user_id, identity = %req.identity_id, fetched = rep.fetched,
            handed_off = rep.handed_off, folders_checked = rep.folders_checked,
            folders_skipped = rep.folders_skipped, folders_examined = rep.folders_examined,
            changes_recorded = rep.changes_recorded, imap_commands = rep.imap_commands,
            "sync done");
    } else if matches!(result, Err(JobError::Busy(_))) {
        ctx.busy_skips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.metrics.busy_skips.inc();
        tracing::info!(user = %req.user_id, identity = %req.identity_id, reason = %rep.error,
            "sync skipped: the identity is busy");
    } else {
        tracing::warn!(user = %req.user_id, identity = %req.identity_id, fetched = rep.fetched,
            handed_off = rep.handed_off, failed = rep.failed, stepped_over = rep.stepped_over,
            interrupted = rep.interrupted, outage = rep.outage, error = %rep.error,
            "sync ended with errors");
    }
    let ended = match &result {
        _ if rep.ok => Ended::Done,
        Err(JobError::Busy(_)) => Ended::Busy,
        _ => Ended::Failed,
    };
    (rep, ended)
}

/// How a sync ended, for callers that retry on their own (live sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Everything asked for was done.
    Done,
    /// Another sync holds the identity: try again once it is over.
    Busy,
    /// Something failed (recorded on the identity and in the report).
    Failed,
}

/// Count a sync's end by outcome class (never per identity).
fn sync_metrics(ctx: &Ctx, result: &Result<(), JobError>, started: std::time::Instant) {
    let outcome = match result {
        Ok(()) => "ok",
        Err(JobError::Busy(_)) => "busy",
        Err(e) if e.is_interrupted() => "interrupted",
        Err(e) if e.is_throttled() => "throttled",
        Err(e) if e.counts_against_account() => "account",
        Err(_) => "ours",
    };
    ctx.metrics.sync_ended(outcome);
    if outcome != "busy" {
        ctx.metrics
            .sync_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// A server's throttling answer: counted by reason, and the server
/// (`host:port`, as every identity on it names it) backed off, so the next
/// jobs for it end early instead of hammering it.
fn note_throttling(ctx: &Ctx, result: &Result<(), JobError>) {
    if let Err(e) = result {
        throttled_by(ctx, e);
    }
}

/// If `e` is a server's throttling answer: count it, back the server off,
/// and how long it is left alone (a live session waits as long before it
/// connects again).
pub(crate) fn throttled_by(ctx: &Ctx, e: &JobError) -> Option<std::time::Duration> {
    let JobError::Imap(ImapError::Throttled { server, reason, .. }) = e else {
        return None;
    };
    ctx.metrics.throttled(reason.as_str());
    let wait = ctx.hosts.throttled(server, std::time::Instant::now());
    tracing::warn!(%server, %reason, wait_secs = wait.as_secs(),
        "the server throttled us: backing off from it (not counted against the account)");
    Some(wait)
}

/// The job ends here, before any lock or connection, while the identity's
/// server is backed off (a sync over a held session connects nothing and
/// goes on).
fn check_host_backoff(ctx: &Ctx, id: &Identity, scope: &Scope<'_>) -> Result<(), JobError> {
    if scope.held.is_some() {
        return Ok(());
    }
    host_backoff(ctx, id)
}

/// `Err(HostBackoff)` while the identity's server is backed off.
pub(crate) fn host_backoff(ctx: &Ctx, id: &Identity) -> Result<(), JobError> {
    let server = id.info(crate::store::identity::infos::INSERVER).trim();
    match ctx.hosts.waiting(server, std::time::Instant::now()) {
        Some(left) => Err(JobError::HostBackoff {
            server: server.to_string(),
            left,
        }),
        None => Ok(()),
    }
}

/// The contract's stale age of a `syncing` marker written by a Go worker.
const GO_MARKER_STALE: chrono::Duration = chrono::Duration::hours(24);

async fn sync_locked(
    ctx: &Ctx,
    req: &SyncRequest,
    counters: &Arc<Counters>,
    rep: &mut JobReport,
    scope: Scope<'_>,
) -> Result<(), JobError> {
    let store = &ctx.store;
    let id = load_identity(ctx, req.user_id, req.identity_id).await?;
    rep.mailboxes = id.mailboxes();
    go_marker_check(&id)?;
    check_host_backoff(ctx, &id, &scope)?;

    // Caliopen's marker goes first, before the lock's Paxos round: a Go
    // worker that reads it from now on stands down (see `claim_marker`).
    let since = Utc::now();
    let hold = SyncHold {
        key: (id.user_id, id.identity_id),
        owner: ctx.sync_owner(),
        marker: SyncingMarker::text_of(since),
    };
    write_marker(ctx, &hold).await?;
    let ttl = ctx.settings.imap.lock_ttl_secs;
    // The lock lives its TTL from no earlier than this.
    let taken = tokio::time::Instant::now();
    if !store
        .take_sync_lock(id.user_id, id.identity_id, &hold.owner, since, ttl)
        .await?
    {
        // The marker stays: the winner owns the identity's marker now and
        // clears it when its sync ends.
        return Err(Busy::LockHeld.into());
    }
    // From here on, every path releases the lock.
    ctx.note_lock(&hold, true);
    let whole = scope.only.is_none();
    let result = async {
        let id = claim_marker(ctx, req, &hold).await?;
        rep.mailboxes = id.mailboxes();
        let r = run_renewing(ctx, &hold, (since, taken), |stop| {
            sync_identity_inner(ctx, &id, &req.password, &hold, counters, scope, stop)
        })
        .await;
        Ok::<_, JobError>((id, r))
    }
    .await;
    let (id, result) = match result {
        Ok((id, r)) => (id, r),
        Err(e) => (id, Err(e)),
    };
    // Only the marker checks (`claim_marker`, `marker_still_ours`) stand
    // down with Busy once the lock is ours: a Go worker took the marker,
    // which is then its own to clear.
    let marker_ours = !matches!(result, Err(JobError::Busy(_)));

    // Whatever happened: the time of this attempt, the error if any, the lock.
    let _ = store
        .set_last_check(id.user_id, id.identity_id, Utc::now())
        .await;
    record_outcome(ctx, &id, counters, &result, whole).await;
    release(ctx, hold, marker_ours).await;
    result
}

/// Record how a sync ended on the identity: its error, or messages left
/// to retry, or a clean end that clears the error streak. Only a sync of
/// every folder (`whole`) clears it: the streak may come from a folder a
/// sync of INBOX alone (an IDLE wake-up) never looked at.
async fn record_outcome(
    ctx: &Ctx,
    id: &Identity,
    counters: &Counters,
    result: &Result<(), JobError>,
    whole: bool,
) {
    let left = counters.failed.load(std::sync::atomic::Ordering::Relaxed);
    match result {
        // Messages left to retry are a failure to see too (our side or
        // theirs is in each message's failure row): not the account's.
        Ok(()) if left > 0 => {
            let e = JobError::Outage(format!(
                "{left} message(s) not handed off, retried at the next sync \
                 (imapctl listremotes shows why)"
            ));
            if let Err(e2) = record_error(ctx, id, &e).await {
                tracing::error!(error = %e2, "cannot record the sync error on the identity");
            }
        }
        Ok(()) if whole => {
            let _ = clear_errors(ctx, id).await;
        }
        Ok(()) => {}
        Err(e) => {
            if let Err(e2) = record_error(ctx, id, e).await {
                tracing::error!(error = %e2, "cannot record the sync error on the identity");
            }
        }
    }
}

async fn load_identity(ctx: &Ctx, user_id: Uuid, identity_id: Uuid) -> Result<Identity, JobError> {
    let id = ctx
        .store
        .identity(user_id, identity_id)
        .await?
        .ok_or(Missing::Identity {
            user_id,
            identity_id,
        })?;
    if !id.is_remote_email() {
        return Err(Missing::NotRemoteEmail {
            identity_id: id.identity_id,
            kind: id.kind.to_string(),
            protocol: id.protocol.to_string(),
        }
        .into());
    }
    Ok(id)
}

/// A `syncing` marker without `syncing_owner` was written by a Caliopen Go
/// worker, which knows no other lock: honour it for the contract's 24 h.
/// Ours carry their owner and count only while our lock row lives.
fn go_marker_check(id: &Identity) -> Result<(), JobError> {
    let Some(marker) = id.syncing() else {
        return Ok(());
    };
    if !marker.owner.is_empty() {
        return Ok(());
    }
    if let Some(since) = marker.since {
        let age = Utc::now().signed_duration_since(since);
        if age >= chrono::Duration::zero() && age < GO_MARKER_STALE {
            return Err(Busy::GoMarker { since }.into());
        }
    }
    Ok(())
}

/// Write Caliopen's `syncing` marker, a value unique to this sync (RFC 3339
/// with nanoseconds, which Go's parser accepts), with the sync's owner
/// (our worker id and the sync's number) beside it.
async fn write_marker(ctx: &Ctx, hold: &SyncHold) -> Result<(), JobError> {
    let (user, identity) = hold.key;
    ctx.store
        .merge_infos(
            user,
            identity,
            SyncingMarker::entries(&hold.marker, &hold.owner),
        )
        .await?;
    Ok(())
}

/// Who holds Caliopen's `syncing` marker, as read back by a sync that
/// wrote `marker` as worker `me`.
enum Marker {
    /// As we wrote it.
    Ours,
    /// `syncing` changed under our `syncing_owner`, or our owner is gone
    /// with a marker in its place: a Go worker (it writes `syncing`, or the
    /// whole `infos` map) read the identity before ours landed.
    TakenByGo,
    /// Another sync of ours wrote after us (it lost the lock race).
    OtherOfOurs,
    /// Only a `syncing` without owner: a Go worker's, of any age.
    GoWorkers,
    /// None at all (cleared, for example by `imapctl unlock`).
    Absent,
}

fn marker_of(id: &Identity, me: &str, marker: &str) -> Marker {
    let (owner, syncing) = id.syncing().map_or(("", ""), |m| (m.owner, m.text));
    match (owner, syncing) {
        (o, s) if o == me && s == marker => Marker::Ours,
        (o, _) if o == me => Marker::TakenByGo,
        ("", "") => Marker::Absent,
        ("", _) => Marker::GoWorkers,
        _ => Marker::OtherOfOurs,
    }
}

fn go_took_it() -> JobError {
    Busy::GoStarted.into()
}

/// With the lock held, read the identity back (so the checkpoint synced
/// from is never older than the last sync's) and check the marker: ours,
/// go on; taken by a Go worker, or a fresh Go marker, stand down; written
/// over by another of ours or cleared, write ours again and check once more.
async fn claim_marker(ctx: &Ctx, req: &SyncRequest, hold: &SyncHold) -> Result<Identity, JobError> {
    for attempt in 0..2 {
        let id = load_identity(ctx, req.user_id, req.identity_id).await?;
        match marker_of(&id, &hold.owner, &hold.marker) {
            Marker::Ours => return Ok(id),
            Marker::TakenByGo => return Err(go_took_it()),
            Marker::GoWorkers => go_marker_check(&id)?,
            Marker::OtherOfOurs | Marker::Absent => {}
        }
        if attempt == 0 {
            write_marker(ctx, hold).await?;
        }
    }
    Err(Busy::MarkerKeepsChanging.into())
}

/// Look at the marker once more, logged in and before the first hand-off:
/// a Go worker that read the identity before our marker landed writes its
/// own only later, and replaces the whole `infos` map when it does (so our
/// `syncing_owner` disappears). Another of our workers that lost the lock
/// race may have written its own marker: that one is harmless.
async fn marker_still_ours(ctx: &Ctx, id: &Identity, hold: &SyncHold) -> Result<(), JobError> {
    let now = load_identity(ctx, id.user_id, id.identity_id).await?;
    match marker_of(&now, &hold.owner, &hold.marker) {
        Marker::Ours | Marker::OtherOfOurs => Ok(()),
        Marker::TakenByGo | Marker::GoWorkers | Marker::Absent => Err(go_took_it()),
    }
}

/// Run `work` with a stop token of its own, fired by the worker's shutdown,
/// the job deadline, or a lock that can no longer be renewed. The lock is
/// renewed every third of its TTL; a sync that cannot renew it for half the
/// TTL stops, so it ends before another worker could take the lock.
async fn run_renewing<F, Fut>(
    ctx: &Ctx,
    hold: &SyncHold,
    (since, taken): (DateTime<Utc>, tokio::time::Instant),
    work: F,
) -> Result<(), JobError>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), JobError>>,
{
    let (trigger, stop) = shutdown::channel();
    let trigger = Arc::new(trigger);
    let why: Why = Arc::default();
    let renewer = spawn_lock_renewal(ctx, hold, (since, taken), trigger.clone(), why.clone());
    let deadline = tokio::time::Instant::now() + ctx.settings.imap.job_deadline();
    let mut shutdown = ctx.shutdown.clone();
    let work = work(stop);
    tokio::pin!(work);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = shutdown.wait(), if !stopping => {
                stopping = true;
                why.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert("the worker is shutting down".into());
                trigger.trigger();
            }
            _ = tokio::time::sleep_until(deadline), if !stopping => {
                stopping = true;
                why.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(format!(
                    "the job ran longer than imap.job_deadline_secs ({} s)",
                    ctx.settings.imap.job_deadline_secs
                ));
                trigger.trigger();
            }
        }
    };
    renewer.abort();
    let _ = renewer.await;
    let reason = why.lock().unwrap_or_else(|p| p.into_inner()).take();
    match (result, reason) {
        (Err(e), Some(reason)) if e.is_interrupted() => Err(JobError::Interrupted(reason)),
        (r, _) => r,
    }
}

/// Why a job's stop token fired; the first reason wins.
type Why = Arc<std::sync::Mutex<Option<String>>>;

/// Renew the sync lock in a task of its own ([`renewal::keep_lock`]); when
/// it is lost, or cannot be renewed for half the TTL, say why and fire
/// `trigger`.
fn spawn_lock_renewal(
    ctx: &Ctx,
    hold: &SyncHold,
    (since, taken): (DateTime<Utc>, tokio::time::Instant),
    trigger: Arc<shutdown::Trigger>,
    why: Why,
) -> tokio::task::JoinHandle<()> {
    let ttl = ctx.settings.imap.lock_ttl_secs;
    let ctx = ctx.clone();
    let ((user, identity), owner) = (hold.key, hold.owner.clone());
    tokio::spawn(async move {
        let reason = renewal::keep_lock(Duration::from_secs(ttl), taken, || {
            ctx.store
                .renew_sync_lock(user, identity, &owner, since, ttl)
        })
        .await;
        tracing::warn!(identity = %identity, reason = %reason, "stopping the sync");
        why.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
        trigger.trigger();
    })
}

/// Release the lock and, when it is still ours, the marker; when Cassandra
/// cannot be reached, keep trying in the background for a while (the lock
/// row also lapses by itself). A retry that lands late touches only this
/// sync's own lock and marker (`hold`'s owner and value), never those of a
/// later sync of the identity, in this process or another.
async fn release(ctx: &Ctx, hold: SyncHold, marker_ours: bool) {
    let key = hold.key;
    if let Err(e) = ctx.release_lock(&hold, marker_ours).await {
        tracing::warn!(identity = %key.1, error = %e, "cannot release the sync lock yet: retrying in the background");
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            let until = tokio::time::Instant::now() + Duration::from_secs(600);
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(delay).await;
                match ctx.release_lock(&hold, marker_ours).await {
                    Ok(()) => {
                        tracing::info!(identity = %key.1, "sync lock released");
                        return;
                    }
                    Err(_) => delay = (delay * 2).min(Duration::from_secs(30)),
                }
            }
            tracing::error!(identity = %key.1, "gave up releasing the sync lock (its row lapses by itself)");
        });
    }
}

async fn sync_identity_inner(
    ctx: &Ctx,
    id: &Identity,
    password: &str,
    hold: &SyncHold,
    counters: &Arc<Counters>,
    scope: Scope<'_>,
    mut stop: Shutdown,
) -> Result<(), JobError> {
    let mut id = id.clone();
    account::ensure_fresh_token(ctx, &mut id).await?;
    let id = &id;
    let acc = account::from_identity(ctx, id, password)?;
    let mut opened = None;
    let ours = scope.held.is_none();
    let (session, conn) = match scope.held {
        Some((session, conn)) => (session, conn),
        None => {
            let connecting = std::time::Instant::now();
            let new = tokio::select! {
                r = imap::connect(&acc) => r?,
                _ = stop.wait() => return Err(JobError::Interrupted("stopped while connecting".into())),
            };
            ctx.metrics
                .connect_seconds
                .observe(connecting.elapsed().as_secs_f64());
            ctx.hosts.served(&acc.server);
            let (session, conn) = opened.insert(new);
            (session, &*conn)
        }
    };
    let result = async {
        marker_still_ours(ctx, id, hold).await?;
        let remote = Remote {
            session,
            acc: &acc,
            conn,
            qresync_on: scope.qresync_on && !ours,
        };
        sync_mailboxes(ctx, id, remote, counters, scope.only, &stop).await
    }
    .await;
    if ours {
        logout(session, &acc).await;
    }
    if result.is_ok() && !stop.is_triggered() {
        ctx.store
            .merge_infos(id.user_id, id.identity_id, Identity::lastsync(Utc::now()))
            .await?;
    }
    result
}

/// The logged-in connection a sync works over.
struct Remote<'a> {
    session: &'a mut ImapSession,
    acc: &'a Account,
    conn: &'a imap::ConnInfo,
    /// QRESYNC was enabled on it already (an IDLE session enables it before
    /// selecting INBOX: ENABLE is refused once a mailbox is selected).
    qresync_on: bool,
}

/// `[mailbox]` if the identity syncs it, else none: named in its list, or
/// through `*`, which syncs every folder but Junk and Trash: the caller (a
/// live session, which listed the folders) vouches that it is one of them.
fn one_of(id: &Identity, mailbox: &str) -> Vec<String> {
    let listed = id.mailboxes();
    let named =
        |m: &String| m == mailbox || (checkpoint::is_inbox(m) && checkpoint::is_inbox(mailbox));
    let star = listed.iter().any(|m| m == "*");
    if star || listed.iter().any(named) {
        vec![mailbox_key(mailbox).to_string()]
    } else {
        Vec::new()
    }
}

/// Sync each mailbox of the identity in turn from its checkpoint. A folder
/// the server will not open is recorded as that folder's error and the
/// others go on; folder errors of folders no longer synced are cleared.
/// A folder whose STATUS shows it unchanged is not opened at all (see
/// [`resync`]).
async fn sync_mailboxes(
    ctx: &Ctx,
    id: &Identity,
    remote: Remote<'_>,
    counters: &Arc<Counters>,
    only: Option<&str>,
    stop: &Shutdown,
) -> Result<(), JobError> {
    let Remote {
        session,
        acc,
        conn,
        qresync_on,
    } = remote;
    let (mailboxes, statuses, undecodable) = match only {
        // A wake-up: no LIST, and no STATUS of the mailbox the session has
        // selected (RFC 3501 §6.3.10 advises against it); the server just
        // said it changed.
        Some(m) => (one_of(id, m), status::Statuses::default(), Vec::new()),
        None => mailboxes_of(id, session, acc, conn, stop).await?,
    };
    let known = ctx.store.mailbox_errors(id.user_id, id.identity_id).await?;
    listing_errors(
        ctx,
        id,
        only.is_none(),
        (&mailboxes, &undecodable),
        &known,
        counters,
    )
    .await?;
    let past = Past::load(ctx, id).await?;
    let mut qresync = qresync_on;
    Counters::add(&counters.folders_checked, mailboxes.len() as u64);
    for mailbox in &mailboxes {
        if stop.is_triggered() {
            return Err(JobError::Interrupted("stopped between mailboxes".into()));
        }
        let cp = match past.checkpoints.get(mailbox) {
            Some(cp) if !checkpoint::is_inbox(mailbox) => Some(*cp),
            _ => checkpoint::load(ctx, id, mailbox).await?,
        };
        let earlier = known.iter().find(|k| &k.mailbox == mailbox);
        let key = status::key(mailbox);
        let last = past.statuses.get(&key);
        let trouble = earlier.is_some() || past.retrying.contains(mailbox);
        if resync::skippable(cp, statuses.get(&key), last, trouble) {
            Counters::add(&counters.folders_skipped, 1);
            continue;
        }
        if conn.caps.qresync && !qresync {
            qresync = enable_qresync(session, acc, stop).await?;
        }
        let job = MailboxJob {
            ctx,
            user_id: id.user_id,
            identity_id: id.identity_id,
            display_name: display_name(id),
            server: &acc.server,
            conn,
            mailbox,
            from: cp.map_or(SyncFrom::First, SyncFrom::Resume),
            qresync: qresync.then(|| resync::qresync_from(cp, last)).flatten(),
            counters,
            stop: stop.clone(),
        };
        Counters::add(&counters.folders_examined, 1);
        let outcome = sync_mailbox(&job, session).await;
        folder_synced(ctx, id, mailbox, earlier, outcome, counters).await?;
    }
    tracing::info!(identity = %id.identity_id,
        checked = mailboxes.len(),
        skipped = counters.folders_skipped.load(std::sync::atomic::Ordering::Relaxed),
        examined = counters.folders_examined.load(std::sync::atomic::Ordering::Relaxed),
        qresync, "folders checked");
    Ok(())
}

/// What earlier syncs left about an identity's folders: their last STATUS,
/// the folders with messages to try again, and their checkpoints (INBOX's
/// is on the identity row, read per folder by [`checkpoint::load`]).
struct Past {
    statuses: resync::Known,
    retrying: std::collections::HashSet<String>,
    checkpoints: std::collections::HashMap<String, crate::store::state::Checkpoint>,
}

impl Past {
    async fn load(ctx: &Ctx, id: &Identity) -> Result<Past, JobError> {
        let (user, identity) = (id.user_id, id.identity_id);
        let statuses = resync::known(ctx.store.mailbox_statuses(user, identity).await?);
        let retrying = resync::retrying(ctx.store.message_failures(user, identity).await?);
        let checkpoints = checkpoint::load_others(ctx, id).await?;
        Ok(Past {
            statuses,
            retrying,
            checkpoints,
        })
    }
}

/// The name shown for the identity: its display name, else its login.
fn display_name(id: &Identity) -> &str {
    if id.display_name.is_empty() {
        id.identifier.as_str()
    } else {
        id.display_name.as_str()
    }
}

/// Settle one folder's sync: a folder error of an earlier sync is cleared
/// once it syncs; a folder the server would not open becomes that folder's
/// error and the others go on; any other error ends the job.
async fn folder_synced(
    ctx: &Ctx,
    id: &Identity,
    mailbox: &str,
    earlier: Option<&crate::store::state::MailboxError>,
    outcome: Result<(), JobError>,
    counters: &Counters,
) -> Result<(), JobError> {
    match outcome {
        Ok(()) if earlier.is_some() => Ok(ctx
            .store
            .clear_mailbox_error(id.user_id, id.identity_id, mailbox)
            .await?),
        Ok(()) => Ok(()),
        Err(JobError::Imap(e @ ImapError::Mailbox { .. })) => {
            folder_failed(ctx, id, mailbox, earlier, &e.to_string(), counters).await
        }
        Err(e) => Err(e),
    }
}

/// The folder errors a listing settles: those of folders no longer synced
/// are cleared (only by a sync of every folder, `whole`), and a listed
/// folder whose name does not decode is an error of that folder.
async fn listing_errors(
    ctx: &Ctx,
    id: &Identity,
    whole: bool,
    (mailboxes, undecodable): (&[String], &[Undecodable]),
    known: &[crate::store::state::MailboxError],
    counters: &Counters,
) -> Result<(), JobError> {
    let listed =
        |m: &str| mailboxes.iter().any(|n| n == m) || undecodable.iter().any(|u| u.wire == m);
    for gone in known.iter().filter(|k| whole && !listed(&k.mailbox)) {
        ctx.store
            .clear_mailbox_error(id.user_id, id.identity_id, &gone.mailbox)
            .await?;
    }
    for u in undecodable {
        let earlier = known.iter().find(|k| k.mailbox == u.wire);
        folder_failed(ctx, id, &u.wire, earlier, &u.reason, counters).await?;
    }
    Ok(())
}

/// `ENABLE QRESYNC` (RFC 7162 §3.2.3), once per session and only when a
/// folder is about to be opened. `false` when the server refused it: the
/// sync goes on as it would without QRESYNC.
pub(crate) async fn enable_qresync(
    session: &mut ImapSession,
    acc: &Account,
    stop: &Shutdown,
) -> Result<bool, JobError> {
    let mut reader = Reader::new(session, &acc.server, acc.io_timeout, stop.clone());
    match reader.run_checked("ENABLE QRESYNC", "ENABLE", |_| {}).await {
        Ok(()) => Ok(true),
        Err(ImapError::Interrupted) => Err(JobError::Interrupted(
            "stopped while waiting on the server".into(),
        )),
        Err(e @ ImapError::Protocol { .. }) => {
            tracing::warn!(error = %e, "QRESYNC not enabled: flag changes and expunges not recorded");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The mailboxes to sync: `infos.mailboxes`, where `*` means every
/// selectable folder but Junk and Trash, listed anew at each sync; and the
/// server's STATUS of each, asked in the same round trip when the server
/// has LIST-STATUS. A status that cannot be had is only left out (the
/// mailbox is then opened as before); a refused folder listing is an error.
/// Listed folders whose names do not decode come apart, to be recorded as
/// folder errors.
async fn mailboxes_of(
    id: &Identity,
    session: &mut ImapSession,
    acc: &Account,
    conn: &imap::ConnInfo,
    stop: &Shutdown,
) -> Result<(Vec<String>, status::Statuses, Vec<Undecodable>), JobError> {
    let listed = id.mailboxes();
    let caps = conn.caps;
    let server = acc.server.as_str();
    let interrupted = || JobError::Interrupted("stopped while listing folders".into());
    if listed.iter().any(|m| m == "*") {
        if caps.list_status {
            let mut reader = Reader::new(session, server, acc.io_timeout, stop.clone());
            match status::list_with_status(&mut reader, caps).await {
                Ok((folders, statuses)) => {
                    let (names, bad) = imap::folders::syncable_names(server, folders);
                    return Ok((names, statuses, bad));
                }
                Err(ImapError::Interrupted) => return Err(interrupted()),
                Err(e @ ImapError::Protocol { .. }) => {
                    tracing::warn!(error = %e, "LIST-STATUS failed: listing folders without it")
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut stop2 = stop.clone();
        let folders = tokio::select! {
            r = imap::folders::list_known(session, server, acc.io_timeout, caps) => r?,
            _ = stop2.wait() => return Err(interrupted()),
        };
        let (names, bad) = imap::folders::syncable_names(server, folders);
        let statuses = statuses_of(session, acc, caps, &names, stop).await?;
        return Ok((names, statuses, bad));
    }
    let statuses = statuses_of(session, acc, caps, &listed, stop).await?;
    Ok((listed, statuses, Vec::new()))
}

/// The STATUS of `names`; a server error leaves them all without one.
async fn statuses_of(
    session: &mut ImapSession,
    acc: &Account,
    caps: imap::Extensions,
    names: &[String],
    stop: &Shutdown,
) -> Result<status::Statuses, JobError> {
    let mut reader = Reader::new(session, &acc.server, acc.io_timeout, stop.clone());
    match status::statuses(&mut reader, caps, names).await {
        Ok(st) => Ok(st),
        Err(ImapError::Interrupted) => Err(JobError::Interrupted(
            "stopped while asking folder statuses".into(),
        )),
        Err(e @ ImapError::Protocol { .. }) => {
            tracing::warn!(error = %e, "STATUS failed: every folder is opened");
            Ok(status::Statuses::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// Record an error of one folder: shown by listremotes and in the report,
/// never counted against the account; the other folders sync on.
async fn folder_failed(
    ctx: &Ctx,
    id: &Identity,
    mailbox: &str,
    earlier: Option<&crate::store::state::MailboxError>,
    reason: &str,
    counters: &Counters,
) -> Result<(), JobError> {
    tracing::warn!(identity = %id.identity_id, mailbox, error = reason, "mailbox not synced");
    counters.mailbox_failed(mailbox, reason);
    let now = Utc::now();
    let e = crate::store::state::MailboxError {
        mailbox: mailbox.to_string(),
        last_error: reason.to_string(),
        first_error: Some(earlier.and_then(|k| k.first_error).unwrap_or(now)),
        last_error_at: Some(now),
    };
    ctx.store
        .save_mailbox_error(id.user_id, id.identity_id, &e)
        .await?;
    Ok(())
}

/// Fetch a whole mailbox into a user's account, keeping no state.
#[tracing::instrument(name = "job", skip_all, fields(user_id = %req.user_id,
    identity_id = %fullfetch_identity(&req.server, &req.login), order = orders::FULLFETCH))]
pub async fn fullfetch(ctx: &Ctx, req: FullFetchRequest, counters: Arc<Counters>) -> JobReport {
    let _running = InFlight::new(&ctx.metrics.jobs_in_flight);
    let identity_id = fullfetch_identity(&req.server, &req.login);
    let mut rep = report(orders::FULLFETCH, req.user_id, identity_id);
    rep.mailboxes = vec![req.mailbox.clone()];
    let tally = counters.imap_commands.clone();
    let result = imap::tallied(tally, async {
        let acc = account::from_order(ctx, &req.server, &req.login, &req.password)?;
        let connecting = std::time::Instant::now();
        let (mut session, conn) = imap::connect(&acc).await?;
        ctx.metrics
            .connect_seconds
            .observe(connecting.elapsed().as_secs_f64());
        let job = MailboxJob {
            ctx,
            user_id: req.user_id,
            identity_id,
            display_name: &req.login,
            server: &acc.server,
            conn: &conn,
            mailbox: &req.mailbox,
            from: SyncFrom::FullFetch,
            qresync: None,
            counters: &counters,
            stop: ctx.shutdown.clone(),
        };
        let r = sync_mailbox(&job, &mut session).await;
        logout(&mut session, &acc).await;
        r
    })
    .await;
    conclude(&mut rep, &counters, &result);
    note_throttling(ctx, &result);
    tracing::info!(user = %req.user_id, server = %req.server, fetched = rep.fetched,
        imap_commands = rep.imap_commands,
        handed_off = rep.handed_off, failed = rep.failed, error = %rep.error, "fullfetch done");
    rep
}

/// LOGOUT, politely and briefly: the work is done whatever it answers.
pub(crate) async fn logout(session: &mut ImapSession, acc: &Account) {
    imap::sent("LOGOUT");
    let _ = tokio::time::timeout(
        acc.io_timeout.min(std::time::Duration::from_secs(5)),
        session.logout(),
    )
    .await;
}

/// Record a failed sync on the identity (CONTRACT §4 step 6). Failures of the
/// remote account count towards disabling it; ours (store, bus) do not.
async fn record_error(ctx: &Ctx, id: &Identity, err: &JobError) -> Result<(), JobError> {
    if matches!(err, JobError::Busy(_) | JobError::NotFound(_)) || err.is_interrupted() {
        return Ok(());
    }
    let now = Utc::now();
    let streak = id.error_streak();
    let counts = err.counts_against_account();
    let mut entries = streak.record(err.to_string(), now, counts);
    if let JobError::Imap(ImapError::Throttled { server, reason, .. }) = err {
        entries.extend([Throttle::entry(reason.as_str(), now, server)]);
    }
    if counts {
        let first = streak.first.unwrap_or(now);
        ctx.store
            .merge_infos(id.user_id, id.identity_id, entries)
            .await?;
        let lasting = now.signed_duration_since(first).num_seconds();
        if lasting > ctx.settings.imap.disable_after().as_secs() as i64 {
            tracing::warn!(identity = %id.identity_id, since = %time_text(first),
                "identity failing for too long: disabling it");
            ctx.store
                .set_status(id.user_id, id.identity_id, Status::Inactive)
                .await?;
            ctx.metrics.identities_disabled.inc();
            let order = CacheOrder {
                identity_id: id.identity_id.to_string(),
                order: orders::CACHE_DELETE.into(),
                order_param: String::new(),
                protocol: PROTOCOL_EMAIL.into(),
                user_id: id.user_id.to_string(),
            };
            ctx.bus
                .publish(&ctx.settings.nats_topic_poller_cache, &order)
                .await
                .map_err(JobError::Bus)?;
        }
    } else {
        ctx.store
            .merge_infos(id.user_id, id.identity_id, entries)
            .await?;
    }
    Ok(())
}

async fn clear_errors(ctx: &Ctx, id: &Identity) -> Result<(), JobError> {
    if id.has_error_keys() {
        ctx.store
            .remove_infos(id.user_id, id.identity_id, &ErrorStreak::KEYS)
            .await?;
    }
    Ok(())
}
