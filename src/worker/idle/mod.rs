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
//! What a session does once taken is [`session`].

mod session;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use uuid::Uuid;

use super::context::Ctx;
use crate::config::IdleMode;
use crate::renewal::{self, Renewal};
use crate::shutdown::{self, Shutdown};
use crate::store::identity::{infos, IdentityKind, Protocol, Status as IdStatus};
use crate::store::idle_lease::NO_IDLE_OWNER;
use crate::store::StoreError;
use session::{watch, SessionEnd};

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
/// How long a server without IDLE is left to polling before it is asked again.
const NO_IDLE_RECHECK_SECS: u64 = 3600;
const SCAN_PAGE: i32 = 5000;
/// How often the identities wanting IDLE are read again (a paged read of
/// `user_identity`); leases are looked at every round, so the identities of
/// a dead worker are taken within a lease's life and a round.
const WANTED_RESCAN: Duration = Duration::from_secs(60);

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
        self.ctx.metrics.idle_rounds.inc();
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
            self.ctx.metrics.idle_rescans.inc();
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
