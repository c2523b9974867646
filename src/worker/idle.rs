//! Live sync: an IDLE session (RFC 2177) on the INBOX of each watched
//! identity, so new mail reaches Caliopen within seconds instead of at the
//! next poll.
//!
//! Which identities are watched: `imap.idle: all` (every active remote
//! identity), `identity` (those whose `infos.idle` is `true`), or `off`.
//! Who watches which is decided in Cassandra, not in memory, so any number
//! of workers share them ([`crate::store::idle_lease`]): every third of
//! `idle_lease_secs` a worker renews the leases it holds, says it is alive
//! (with its budget, `idle_max`), reads which identities want IDLE and which
//! are leased, and takes free ones up to its share: the identities divided
//! by the live workers, more when the others' budgets are full, never more
//! than its own budget. Above its share it hands sessions back, so a worker
//! added later gets its part. A worker killed with `kill -9` stops renewing,
//! its leases lapse, and the others take its identities at their next round.
//!
//! A session logs in, EXAMINEs INBOX and waits in IDLE. When the server
//! announces new mail (EXISTS) it leaves IDLE and syncs INBOX over the same
//! connection through the ordinary path ([`job::sync_scoped`]): the same
//! sync lock, marker, pipeline and checkpoint, so exactly-once holds exactly
//! as for an order. It also syncs once when the session starts (mail that
//! came while nobody watched), and again at once when INBOX grew while a
//! sync ran ([`imap::news`]: the server may say so only inside the sync's
//! answers), re-enters IDLE every `idle_renew_secs` (under
//! RFC 2177's 29 minutes), retries a sync another one held or one that
//! failed, and reconnects with backoff when the connection breaks. A server
//! without IDLE is recorded (a lease row owned by [`NO_IDLE_OWNER`] for an
//! hour) and its identity stays with polling. Polling goes on regardless:
//! the poller's schedule is the safety net for anything a session misses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_imap::imap_proto::{MailboxDatum, RequestId, Response, Status};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use uuid::Uuid;

use super::account;
use super::context::{Counters, Ctx};
use super::job::{self, Ended, Scope, SyncRequest};
use super::JobError;
use crate::config::IdleMode;
use crate::imap::fetch::{self, Reader};
use crate::imap::{self, ImapError, ImapSession};
use crate::renewal::{self, Renewal};
use crate::shutdown::{self, Shutdown};
use crate::store::identity::{infos, IdentityKind, Protocol, Status as IdStatus};
use crate::store::idle_lease::NO_IDLE_OWNER;
use crate::store::StoreError;

/// (user_id, identity_id).
pub type Key = (Uuid, Uuid);

/// Longest wait before reconnecting a broken session, or retrying a sync
/// that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Leases taken per round at most, so a new worker does not fire a burst of
/// thousands of Paxos rounds at once.
const CLAIMS_PER_ROUND: usize = 200;
/// Lease renewals in flight at once.
const RENEWALS_AT_ONCE: usize = 32;
/// Syncs in a row run at once because INBOX grew during the one before;
/// the next ones wait as a failed sync's retry does.
const GROWN_AT_ONCE: u32 = 10;
/// How long a server without IDLE is left to polling before it is asked again.
const NO_IDLE_RECHECK_SECS: u64 = 3600;
const SCAN_PAGE: i32 = 5000;
/// How often the identities wanting IDLE are read again (a paged read of
/// `user_identity`); leases are looked at every round, so the identities of
/// a dead worker are taken within a lease's life and a round.
const WANTED_RESCAN: Duration = Duration::from_secs(60);

/// Why a session ended for good (errors are retried inside it).
#[derive(Debug)]
enum SessionEnd {
    /// Its stop token fired (lease lost or handed back, shutdown).
    Stopped,
    /// The server does not offer IDLE.
    NoIdle,
    /// The identity cannot be watched as stored (deleted, no longer an
    /// active remote email identity, no usable credentials).
    Unusable(String),
}

struct Held {
    trigger: shutdown::Trigger,
    task: Id,
    since: DateTime<Utc>,
    renewed: Instant,
}

/// Run the live sync of this worker until `stop` fires (the worker's loop
/// ended); every lease it held is released on the way out.
pub async fn run(ctx: Ctx, slots: Arc<Semaphore>, mut stop: Shutdown) {
    let s = &ctx.settings.imap;
    if s.idle == IdleMode::Off || s.idle_max == 0 {
        return;
    }
    let every = (s.idle_lease() / 3).max(Duration::from_secs(1));
    let mut w = Watcher {
        ctx: ctx.clone(),
        slots,
        held: HashMap::new(),
        tasks: HashMap::new(),
        sessions: JoinSet::new(),
        wanted: HashSet::new(),
        scanned: None,
        short_warned: None,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            Some(r) = w.sessions.join_next_with_id(), if !w.sessions.is_empty() => w.ended(r).await,
            _ = tick.tick() => w.round().await,
        }
    }
    w.stop_all().await;
}

struct Watcher {
    ctx: Ctx,
    /// The worker's job slots: a live sync takes one like any other job.
    slots: Arc<Semaphore>,
    held: HashMap<Key, Held>,
    tasks: HashMap<Id, Key>,
    sessions: JoinSet<SessionEnd>,
    /// The identities wanting IDLE, as last read, and when.
    wanted: HashSet<Key>,
    scanned: Option<Instant>,
    /// When we last said that the budgets cannot cover every identity.
    short_warned: Option<Instant>,
}

impl Watcher {
    fn budget(&self) -> usize {
        self.ctx.settings.imap.idle_max as usize
    }

    fn lease_secs(&self) -> u64 {
        self.ctx.settings.imap.idle_lease_secs
    }

    /// One round: renew what we hold, then take or hand back sessions.
    async fn round(&mut self) {
        self.renew().await;
        if let Err(e) = self.balance().await {
            tracing::warn!(error = %e, "live sync: cannot share the IDLE sessions this round");
        }
        self.ctx.metrics.idle_sessions.set(self.held.len() as i64);
    }

    async fn renew(&mut self) {
        let store = &self.ctx.store;
        let me = self.ctx.worker_id.as_str();
        let ttl = self.lease_secs();
        let give_up = self.ctx.settings.imap.idle_lease() / 2;
        let due: Vec<(Key, DateTime<Utc>, Instant)> = self
            .held
            .iter()
            .map(|(k, h)| (*k, h.since, h.renewed))
            .collect();
        let results = renew_leases(due, give_up, |k, since| {
            store.renew_idle_lease(k, me, since, ttl)
        })
        .await;
        for (k, r) in results {
            let lost = match r {
                Renewal::Renewed { sent } => {
                    if let Some(h) = self.held.get_mut(&k) {
                        h.renewed = sent;
                    }
                    None
                }
                Renewal::Lost => Some("the IDLE lease was lost".to_string()),
                Renewal::Failed(e)
                    if self
                        .held
                        .get(&k)
                        .is_some_and(|h| h.renewed.elapsed() >= give_up) =>
                {
                    Some(format!("cannot renew the IDLE lease: {e}"))
                }
                Renewal::Failed(e) => {
                    tracing::warn!(identity = %k.1, error = %e, "cannot renew the IDLE lease yet");
                    None
                }
                Renewal::OutOfTime { waited } if waited.is_zero() => {
                    Some("cannot renew the IDLE lease for half its life".to_string())
                }
                Renewal::OutOfTime { waited } => Some(format!(
                    "cannot renew the IDLE lease: no answer within the {} ms left before \
                     half its life since its last renewal",
                    waited.as_millis()
                )),
            };
            if let Some(why) = lost {
                tracing::warn!(identity = %k.1, reason = %why, "stopping the IDLE session");
                self.stop(k);
            }
        }
    }

    /// Take free identities up to this worker's share, hand back the
    /// surplus, and stop watching identities that no longer want IDLE.
    async fn balance(&mut self) -> Result<(), StoreError> {
        if self.scanned.is_none_or(|t| t.elapsed() >= WANTED_RESCAN) {
            self.wanted = wanted(&self.ctx).await?;
            self.scanned = Some(Instant::now());
        }
        self.drop_unwanted().await;
        let leased: HashSet<Key> = self
            .ctx
            .store
            .idle_leases()
            .await?
            .into_iter()
            .map(|l| (l.user_id, l.identity_id))
            .collect();
        let budget = self.budget();
        let target = self.my_share(budget).await?;
        if self.held.len() > target {
            self.hand_back_surplus(target).await;
            return Ok(());
        }
        let mut free: Vec<Key> = self.wanted.difference(&leased).copied().collect();
        fastrand::shuffle(&mut free);
        let want = (target - self.held.len()).min(CLAIMS_PER_ROUND);
        let taken = self.claim(free.into_iter().take(want)).await;
        self.warn_if_short(leased.len() + taken, budget);
        Ok(())
    }

    /// Stop watching the identities we hold that no longer want IDLE.
    async fn drop_unwanted(&mut self) {
        let gone: Vec<Key> = self
            .held
            .keys()
            .filter(|k| !self.wanted.contains(*k))
            .copied()
            .collect();
        for k in gone {
            tracing::info!(identity = %k.1, "identity no longer watched with IDLE");
            self.hand_back(k).await;
        }
    }

    /// Say we are alive with our budget, and work out how many sessions are
    /// ours to hold given the other live workers' budgets.
    async fn my_share(&self, budget: usize) -> Result<usize, StoreError> {
        let me = self.ctx.worker_id.as_str();
        self.ctx
            .store
            .idle_worker_alive(
                me,
                self.held.len() as u32,
                budget as u32,
                self.lease_secs() * 2,
            )
            .await?;
        let others: Vec<_> = self
            .ctx
            .store
            .idle_workers()
            .await?
            .into_iter()
            .filter(|w| w.worker != me)
            .collect();
        let room_elsewhere: usize = others.iter().map(|w| w.budget as usize).sum();
        Ok(share(
            self.wanted.len(),
            others.len() + 1,
            room_elsewhere,
            budget,
        ))
    }

    /// Hand back what we hold beyond `target`, for other workers to take.
    async fn hand_back_surplus(&mut self, target: usize) {
        let surplus: Vec<Key> = self
            .held
            .keys()
            .take(self.held.len() - target)
            .copied()
            .collect();
        tracing::info!(
            handed_back = surplus.len(),
            share = target,
            "live sync: handing IDLE sessions back to spread them"
        );
        for k in surplus {
            self.hand_back(k).await;
        }
    }

    /// Try to lease each of `free` and start a session on those won;
    /// returns how many were won.
    async fn claim(&mut self, free: impl Iterator<Item = Key>) -> usize {
        // Claimed side by side (each is a Paxos round); a lost race only
        // means that identity is someone else's.
        let store = &self.ctx.store;
        let me = self.ctx.worker_id.as_str();
        let ttl = self.lease_secs();
        let won: Vec<(Key, DateTime<Utc>)> = futures::stream::iter(free)
            .map(|k| async move {
                let now = Utc::now();
                (k, now, store.take_idle_lease(k, me, now, ttl).await)
            })
            .buffer_unordered(RENEWALS_AT_ONCE)
            .filter_map(|(k, now, r)| async move {
                match r {
                    Ok(true) => Some((k, now)),
                    Ok(false) => None,
                    Err(e) => {
                        tracing::warn!(identity = %k.1, error = %e, "cannot take an IDLE lease");
                        None
                    }
                }
            })
            .collect()
            .await;
        let taken = won.len();
        for (k, since) in won {
            self.start(k, since);
        }
        taken
    }

    /// Warn (at most every five minutes) when the identities wanting IDLE
    /// outnumber those `watched` and our budget is full.
    fn warn_if_short(&mut self, watched: usize, budget: usize) {
        let wanted_n = self.wanted.len();
        if wanted_n > watched && self.held.len() >= budget {
            let quiet = self
                .short_warned
                .is_some_and(|t| t.elapsed() < Duration::from_secs(300));
            if !quiet {
                self.short_warned = Some(Instant::now());
                tracing::warn!(
                    wanted = wanted_n,
                    watched,
                    budget,
                    "live sync: the workers' IDLE budgets (imap.idle_max) do not cover every \
                     identity; the others are polled only"
                );
            }
        }
    }

    fn start(&mut self, key: Key, since: DateTime<Utc>) {
        let (trigger, stop) = shutdown::channel();
        let (ctx, slots) = (self.ctx.clone(), self.slots.clone());
        let task = self
            .sessions
            .spawn(async move { watch(ctx, key, slots, stop).await })
            .id();
        self.tasks.insert(task, key);
        self.held.insert(
            key,
            Held {
                trigger,
                task,
                since,
                renewed: Instant::now(),
            },
        );
        tracing::debug!(identity = %key.1, "IDLE session taken");
    }

    /// Stop a session and forget it (its lease is not ours any more).
    fn stop(&mut self, key: Key) {
        if let Some(h) = self.held.remove(&key) {
            h.trigger.trigger();
            self.tasks.remove(&h.task);
        }
    }

    /// Stop a session and release its lease, so another worker takes it now.
    async fn hand_back(&mut self, key: Key) {
        self.stop(key);
        let _ = self
            .ctx
            .store
            .release_idle_lease(key, &self.ctx.worker_id)
            .await;
    }

    /// A session task ended by itself (or panicked).
    async fn ended(&mut self, r: Result<(Id, SessionEnd), tokio::task::JoinError>) {
        let (id, end) = match r {
            Ok((id, end)) => (id, end),
            Err(e) => {
                let id = e.id();
                tracing::error!(error = %e, "an IDLE session task failed");
                (id, SessionEnd::Unusable(format!("its task failed: {e}")))
            }
        };
        let Some(key) = self.tasks.remove(&id) else {
            return; // stopped by us already
        };
        self.held.remove(&key);
        let me = self.ctx.worker_id.clone();
        let store = &self.ctx.store;
        let _ = store.release_idle_lease(key, &me).await;
        match end {
            SessionEnd::Stopped => {}
            SessionEnd::NoIdle | SessionEnd::Unusable(_) => {
                if let SessionEnd::Unusable(why) = &end {
                    tracing::warn!(identity = %key.1, reason = %why,
                        "cannot watch this identity with IDLE for now: polling only");
                } else {
                    tracing::info!(identity = %key.1,
                        "the server does not offer IDLE: this identity is polled only");
                }
                let _ = store
                    .take_idle_lease(key, NO_IDLE_OWNER, Utc::now(), NO_IDLE_RECHECK_SECS)
                    .await;
            }
        }
        self.ctx.metrics.idle_sessions.set(self.held.len() as i64);
    }

    /// On shutdown: stop every session, let them log out, release the
    /// leases so other workers take over at once.
    async fn stop_all(mut self) {
        for h in self.held.values() {
            h.trigger.trigger();
        }
        let grace = self.ctx.settings.imap.shutdown_grace();
        let _ = tokio::time::timeout(grace, async {
            while self.sessions.join_next().await.is_some() {}
        })
        .await;
        self.sessions.abort_all();
        let store = &self.ctx.store;
        let me = self.ctx.worker_id.as_str();
        futures::stream::iter(self.held.keys().copied())
            .for_each_concurrent(RENEWALS_AT_ONCE, |k| async move {
                let _ = store.release_idle_lease(k, me).await;
            })
            .await;
        let _ = store.idle_worker_gone(me).await;
        self.ctx.metrics.idle_sessions.set(0);
    }
}

/// This worker's share of `wanted` sessions among `workers` live ones: an
/// even split, or more when the others' budgets (`room_elsewhere`) cannot
/// hold the rest; never more than `budget`.
fn share(wanted: usize, workers: usize, room_elsewhere: usize, budget: usize) -> usize {
    let even = wanted.div_ceil(workers.max(1));
    even.max(wanted.saturating_sub(room_elsewhere)).min(budget)
}

/// Renew the leases `due` (key, start, last renewal) side by side, each
/// bounded by the time left before half the lease's life since its last
/// renewal ([`renewal::renew_before`]): one renewal that hangs can neither
/// outlive its lease nor hold up the others and the round.
async fn renew_leases<F, Fut, E>(
    due: Vec<(Key, DateTime<Utc>, Instant)>,
    give_up: Duration,
    renew: F,
) -> Vec<(Key, Renewal<E>)>
where
    F: Fn(Key, DateTime<Utc>) -> Fut,
    Fut: std::future::Future<Output = Result<bool, E>>,
{
    let renew = &renew;
    futures::stream::iter(due)
        .map(|(k, since, renewed)| async move {
            (
                k,
                renewal::renew_before(renewed + give_up, renew(k, since)).await,
            )
        })
        .buffer_unordered(RENEWALS_AT_ONCE)
        .collect()
        .await
}

/// The identities that want an IDLE session now.
async fn wanted(ctx: &Ctx) -> Result<HashSet<Key>, StoreError> {
    let all = ctx.settings.imap.idle == IdleMode::All;
    let mut out = HashSet::new();
    let mut state = None;
    loop {
        let (page, next) = ctx.store.scan_identities(SCAN_PAGE, state).await?;
        for r in page {
            let email = matches!(r.protocol, Protocol::Email | Protocol::ImapLegacy);
            let opted = r
                .infos
                .get(infos::IDLE)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
            if r.kind == IdentityKind::Remote
                && r.status == IdStatus::Active
                && email
                && (all || opted)
            {
                out.insert((r.user_id, r.identity_id));
            }
        }
        match next {
            Some(s) => state = Some(s),
            None => return Ok(out),
        }
    }
}

/// One identity's session, reconnecting with backoff until it is stopped
/// or cannot be watched.
async fn watch(ctx: Ctx, key: Key, slots: Arc<Semaphore>, mut stop: Shutdown) -> SessionEnd {
    let mut backoff = Duration::from_secs(1);
    loop {
        let began = Instant::now();
        let e = match watch_once(&ctx, key, &slots, &mut stop).await {
            Ok(end) => return end,
            Err(JobError::Account(e)) => return SessionEnd::Unusable(e.to_string()),
            Err(JobError::NotFound(e)) => return SessionEnd::Unusable(e.to_string()),
            Err(e) => e,
        };
        if stop.is_triggered() {
            return SessionEnd::Stopped;
        }
        if began.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_secs(1); // it had been working for a while
        }
        tracing::warn!(identity = %key.1, error = %e, retry_in_secs = backoff.as_secs(),
            "IDLE session broken: reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait() => return SessionEnd::Stopped,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why an IDLE wait ended.
enum Wake {
    /// The server announced new mail.
    News,
    /// Time to re-enter IDLE, or to retry a sync.
    Timer,
    Stop,
}

/// Connect, then sync and IDLE in turn until stopped or the connection
/// breaks (an error, after which [`watch`] reconnects).
async fn watch_once(
    ctx: &Ctx,
    key: Key,
    slots: &Arc<Semaphore>,
    stop: &mut Shutdown,
) -> Result<SessionEnd, JobError> {
    let Some(mut id) = ctx.store.identity(key.0, key.1).await? else {
        return Ok(SessionEnd::Unusable("the identity is gone".into()));
    };
    if !id.is_remote_email() || id.status != IdStatus::Active {
        return Ok(SessionEnd::Unusable(
            "no longer an active remote email identity".into(),
        ));
    }
    account::ensure_fresh_token(ctx, &mut id).await?;
    let acc = account::from_identity(ctx, &id, "")?;
    let (mut session, conn) = tokio::select! {
        r = imap::connect(&acc) => r?,
        _ = stop.wait() => return Ok(SessionEnd::Stopped),
    };
    let io = acc.io_timeout;
    let server = acc.server.as_str();
    if !conn.caps.idle {
        job::logout(&mut session, &acc).await;
        return Ok(SessionEnd::NoIdle);
    }
    // ENABLE is refused once a mailbox is selected: now or never for this
    // session, so the syncs it runs can record QRESYNC changes.
    let qresync_on = conn.caps.qresync && job::enable_qresync(&mut session, &acc, stop).await?;
    // INBOX stays selected from here on (a live sync only EXAMINEs INBOX
    // again): whatever arrives after this is announced, at the latest when
    // the next IDLE starts.
    Reader::new(&mut session, server, io, stop.clone())
        .examine("INBOX")
        .await?;
    tracing::info!(identity = %key.1, server, "IDLE session open");
    let renew = ctx.settings.imap.idle_renew();
    // Sync once first: mail may have come while nobody watched.
    let mut sync_at = Some(Instant::now());
    let mut pace = Pace::new();
    loop {
        // A loop: a sync that saw INBOX grow asks for another at once.
        while sync_at.is_some_and(|t| t <= Instant::now()) && !stop.is_triggered() {
            let held = (&mut session, &conn, qresync_on);
            let (ended, grew) = push_sync(ctx, key, slots, held, stop).await;
            if grew {
                ctx.metrics.idle_wakeups.inc();
            }
            sync_at = pace.next(ended, grew);
        }
        if stop.is_triggered() {
            job::logout(&mut session, &acc).await;
            return Ok(SessionEnd::Stopped);
        }
        let until = Instant::now() + renew;
        let until = sync_at.map_or(until, |t| t.min(until));
        match idle_until(&mut session, io, server, until, stop).await? {
            Wake::News => {
                ctx.metrics.idle_wakeups.inc();
                sync_at = Some(Instant::now());
            }
            Wake::Timer => {}
            Wake::Stop => {
                job::logout(&mut session, &acc).await;
                return Ok(SessionEnd::Stopped);
            }
        }
    }
}

/// When a session syncs next: the backoff of syncs that did not go
/// through, and how many syncs in a row INBOX grew during.
struct Pace {
    retry: Duration,
    grown: u32,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            retry: Duration::from_secs(1),
            grown: 0,
        }
    }

    /// When to sync again after a sync that ended so, `grew` saying
    /// whether INBOX grew while it ran.
    fn next(&mut self, ended: Ended, grew: bool) -> Option<Instant> {
        let now = Instant::now();
        let at = match ended {
            Ended::Done if !grew => {
                *self = Pace::new();
                return None;
            }
            // INBOX grew, said only inside the sync's answers (the next
            // IDLE owes no word of it): again, now; after
            // GROWN_AT_ONCE in a row (a flood, or a server that says so
            // wrongly), with the backoff.
            Ended::Done => {
                self.grown += 1;
                if self.grown <= GROWN_AT_ONCE {
                    self.retry = Duration::from_secs(1);
                    return Some(now);
                }
                now + self.retry
            }
            // Another sync holds the identity; it may have passed INBOX
            // already, so ours runs once it is over.
            Ended::Busy => now + self.retry.min(Duration::from_secs(15)),
            Ended::Failed => now + self.retry,
        };
        self.retry = (self.retry * 2).min(MAX_BACKOFF);
        Some(at)
    }
}

/// One IDLE: enter it, wait for new mail, `until` or the stop token, then
/// leave it (DONE). Driven response by response rather than through
/// async-imap's IDLE handle, which hands an EXISTS sent while IDLE starts
/// to a side channel: that is precisely the mail that came in between.
async fn idle_until(
    session: &mut ImapSession,
    io: Duration,
    server: &str,
    until: Instant,
    stop: &mut Shutdown,
) -> Result<Wake, JobError> {
    imap::sent("IDLE");
    let tag = bounded(io, server, "IDLE", session.run_command("IDLE")).await?;
    let mut news = false;
    // Up to the server's "+ idling".
    loop {
        match next(session, io, server, "IDLE", &tag).await? {
            Seen::Continue => break,
            // Refused (or ended at once): no IDLE here after all.
            Seen::Tagged(r) => {
                let why = r.err().unwrap_or_else(|| "ended before it began".into());
                return Err(broken(server, "IDLE", why));
            }
            Seen::Exists => news = true,
            Seen::Other => {}
        }
    }
    let mut wake = if news {
        Wake::News
    } else {
        loop {
            tokio::select! {
                r = session.read_response() => match r {
                    Ok(Some(resp)) => match classify(resp.parsed(), &tag) {
                        Seen::Exists => break Wake::News,
                        Seen::Tagged(_) => return Err(broken(server, "IDLE", "the server ended IDLE")),
                        // EXPUNGE, flag changes, keep-alives: nothing to fetch.
                        Seen::Continue | Seen::Other => {}
                    },
                    Ok(None) => return Err(broken(server, "IDLE", "the server closed the connection")),
                    Err(e) => return Err(broken(server, "IDLE", e)),
                },
                _ = tokio::time::sleep_until(until) => break Wake::Timer,
                _ = stop.wait() => break Wake::Stop,
            }
        }
    };
    bounded(io, server, "DONE", session.run_command_untagged("DONE")).await?;
    loop {
        match next(session, io, server, "DONE", &tag).await? {
            Seen::Tagged(Ok(())) => return Ok(wake),
            Seen::Tagged(Err(why)) => return Err(broken(server, "DONE", why)),
            Seen::Exists if matches!(wake, Wake::Timer) => wake = Wake::News,
            _ => {}
        }
    }
}

/// What one response during IDLE says.
enum Seen {
    /// `+ idling`.
    Continue,
    /// The tagged end of the IDLE command, with the server's text if not OK.
    Tagged(Result<(), String>),
    /// New mail.
    Exists,
    Other,
}

fn classify(r: &Response<'_>, tag: &RequestId) -> Seen {
    match r {
        Response::Continue { .. } => Seen::Continue,
        Response::Done {
            tag: t,
            status,
            outcome,
        } if t == tag => match status {
            Status::Ok => Seen::Tagged(Ok(())),
            other => Seen::Tagged(Err(format!(
                "{other:?} {}",
                outcome.information.as_deref().unwrap_or("")
            ))),
        },
        Response::MailboxData(MailboxDatum::Exists(_)) => Seen::Exists,
        _ => Seen::Other,
    }
}

/// The next response, classified, bounded by the I/O timeout.
async fn next(
    session: &mut ImapSession,
    io: Duration,
    server: &str,
    during: &str,
    tag: &RequestId,
) -> Result<Seen, JobError> {
    Ok(fetch::next_response(session, server, io, during, |r| classify(r, tag)).await?)
}

/// Sync INBOX over the IDLE session, in one of the worker's job slots;
/// and whether INBOX grew past what that sync opened (see [`imap::news`]).
async fn push_sync(
    ctx: &Ctx,
    key: Key,
    slots: &Arc<Semaphore>,
    (session, conn, qresync_on): (&mut ImapSession, &imap::ConnInfo, bool),
    stop: &mut Shutdown,
) -> (Ended, bool) {
    let _slot = tokio::select! {
        p = slots.clone().acquire_owned() => p,
        _ = stop.wait() => return (Ended::Busy, false),
    };
    let req = SyncRequest {
        user_id: key.0,
        identity_id: key.1,
        password: String::new(),
    };
    let scope = Scope {
        only: Some("INBOX"),
        held: Some((session, conn)),
        qresync_on,
    };
    let news = imap::news::Watch::new();
    let sync = job::sync_scoped(ctx, req, Counters::new(), scope);
    let ended = imap::news::watched(news.clone(), sync).await.1;
    (ended, news.grew())
}

/// One IMAP step bounded by the I/O timeout.
async fn bounded<T, E: std::fmt::Display>(
    io: Duration,
    server: &str,
    during: &str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, JobError> {
    match tokio::time::timeout(io, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(broken(server, during, e)),
        Err(_) => Err(ImapError::Timeout {
            server: server.to_string(),
            during: during.to_string(),
        }
        .into()),
    }
}

fn broken(server: &str, during: &str, reason: impl std::fmt::Display) -> JobError {
    ImapError::Protocol {
        server: server.to_string(),
        during: during.to_string(),
        reason: reason.to_string(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_renewal_that_never_answers_is_abandoned_before_the_lease_lapses() {
        let lease = Duration::from_secs(30);
        let last = Instant::now();
        // A round a third of the lease later: one renewal hangs, one answers.
        tokio::time::advance(lease / 3).await;
        let (hung, fine) = ((Uuid::nil(), Uuid::nil()), (Uuid::nil(), Uuid::max()));
        let due = vec![(hung, Utc::now(), last), (fine, Utc::now(), last)];
        let round = renew_leases(due, lease / 2, |k, _| async move {
            if k == hung {
                std::future::pending::<Result<bool, String>>().await
            } else {
                Ok(true)
            }
        });
        let results = tokio::time::timeout(lease - lease / 3, round)
            .await
            .expect("the round ends before the hung lease could lapse");
        assert!(last.elapsed() <= lease / 2, "{:?}", last.elapsed());
        let of = |k| results.iter().find(|(key, _)| *key == k).map(|(_, r)| r);
        assert!(
            matches!(of(hung), Some(Renewal::OutOfTime { .. })),
            "{results:?}"
        );
        assert!(
            matches!(of(fine), Some(Renewal::Renewed { .. })),
            "{results:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_that_saw_inbox_grow_is_followed_by_another_within_bounds() {
        let mut pace = Pace::new();
        let now = Instant::now();
        assert_eq!(pace.next(Ended::Done, false), None);
        for _ in 0..GROWN_AT_ONCE {
            assert_eq!(pace.next(Ended::Done, true), Some(now), "at once");
        }
        // Growth every time: a flood, or a server that says so wrongly.
        assert_eq!(
            pace.next(Ended::Done, true),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(
            pace.next(Ended::Done, true),
            Some(now + Duration::from_secs(2))
        );
        // A sync that saw nothing new ends it.
        assert_eq!(pace.next(Ended::Done, false), None);
        assert_eq!(pace.next(Ended::Done, true), Some(now));
        assert_eq!(
            pace.next(Ended::Failed, false),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(
            pace.next(Ended::Failed, false),
            Some(now + Duration::from_secs(2))
        );
    }

    #[test]
    fn sessions_are_shared_evenly_within_budgets() {
        // Alone: everything, up to the budget.
        assert_eq!(share(1000, 1, 0, 1000), 1000);
        assert_eq!(share(1500, 1, 0, 1000), 1000);
        // A second worker with room: half each.
        assert_eq!(share(1000, 2, 1000, 1000), 500);
        assert_eq!(share(1001, 2, 1000, 1000), 501);
        // The other's budget is small: we carry the rest.
        assert_eq!(share(1000, 2, 100, 1000), 900);
        // Nothing wanted, nothing held.
        assert_eq!(share(0, 3, 3000, 1000), 0);
    }
}
