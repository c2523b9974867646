//! Live sync: an IDLE session (RFC 2177) on the INBOX of each watched
//! identity, so new mail reaches Caliopen within seconds instead of at the
//! next poll.
//!
//! Which identities are watched: `imap.idle: all` (every active remote
//! identity), `identity` (those whose `infos.idle` is `true`), or `off`.
//! Who watches which is computed, not stored: every third of
//! `idle_lease_secs` each worker renews its one membership row (a TTL of
//! `idle_lease_secs`), reads the rows of the live workers, and works out
//! with the same deterministic rule as every other worker which of the
//! identities wanting IDLE are its own ([`assign`]: weighted rendezvous
//! hashing within the budgets, `idle_max`). It opens the sessions of its
//! own identities (at most [`CLAIMS_PER_ROUND`] a round) and stops the
//! others ([`plan`] is that round without the sessions). So the store's
//! work at rest grows with the workers, not the sessions.
//!
//! Nothing stops two workers from both holding one identity for a moment
//! (one has not yet seen a member come or go): harmless, since every sync
//! takes the identity's sync lock, which stays the one guard against two
//! syncs. A worker killed with `kill -9` stops renewing, its row lapses,
//! and the others take its identities at their next round. A worker that
//! cannot renew its row for half its life stops every session before the
//! others could take them. A clean stop deletes the row at once.
//!
//! What a session does once taken is [`session`].

pub mod assign;
pub mod plan;
mod session;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;

use super::context::Ctx;
use crate::config::IdleMode;
use crate::shutdown::{self, Shutdown};
use plan::{Plan, PlanSettings, Planner};
use session::{watch, SessionEnd};

/// (user_id, identity_id).
pub type Key = assign::Key;

/// Longest wait before reconnecting a broken session, or retrying a sync
/// that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Sessions opened per round at most, so a worker given thousands of
/// identities (at start, or when another dies) does not open them all at
/// once.
pub const CLAIMS_PER_ROUND: usize = 200;
/// How long a server without IDLE is left to polling before it is asked again.
const NO_IDLE_RECHECK_SECS: u64 = 3600;
/// How often the identities wanting IDLE are read again (a paged read of
/// `user_identity`, proportional to the identities, per worker).
pub const WANTED_RESCAN: Duration = Duration::from_secs(60);

/// What a worker holding `held` sessions does to hold `mine`: the sessions
/// to stop (no longer its own), and those to open (its own, not held yet:
/// at most [`CLAIMS_PER_ROUND`] a round and never past `budget`).
pub fn changes<'a>(
    held: impl Iterator<Item = &'a Key> + Clone,
    mine: &HashSet<Key>,
    budget: usize,
) -> (Vec<Key>, Vec<Key>) {
    let gone: Vec<Key> = held
        .clone()
        .filter(|k| !mine.contains(*k))
        .copied()
        .collect();
    let kept: HashSet<&Key> = held.filter(|k| mine.contains(*k)).collect();
    let room = budget.saturating_sub(kept.len()).min(CLAIMS_PER_ROUND);
    let new = mine
        .iter()
        .filter(|k| !kept.contains(k))
        .take(room)
        .copied()
        .collect();
    (gone, new)
}

struct Held {
    trigger: shutdown::Trigger,
    task: Id,
}

/// Run the live sync of this worker until `stop` fires (the worker's loop
/// ended); its membership row is deleted on the way out.
pub async fn run(ctx: Ctx, slots: Arc<Semaphore>, mut stop: Shutdown) {
    let s = &ctx.settings.imap;
    if s.idle == IdleMode::Off || s.idle_max == 0 {
        return;
    }
    let every = (s.idle_lease() / 3).max(Duration::from_secs(1));
    let planner = Planner::new(
        ctx.store.clone(),
        PlanSettings {
            worker: ctx.worker_id.clone(),
            budget: s.idle_max,
            ttl: s.idle_lease(),
            mode: s.idle,
            rescan: WANTED_RESCAN,
        },
    );
    let mut w = Watcher {
        ctx: ctx.clone(),
        slots,
        planner,
        held: HashMap::new(),
        tasks: HashMap::new(),
        sessions: JoinSet::new(),
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
    planner: Planner,
    held: HashMap<Key, Held>,
    tasks: HashMap<Id, Key>,
    sessions: JoinSet<SessionEnd>,
    /// When we last said that the budgets cannot cover every identity.
    short_warned: Option<Instant>,
}

impl Watcher {
    /// One round: renew the membership, then open or stop sessions.
    async fn round(&mut self) {
        let rescans = self.planner.rescans;
        match self.planner.round(self.held.len()).await {
            Plan::Keep => {}
            Plan::Cut(why) => {
                if !self.held.is_empty() {
                    tracing::warn!(reason = %why, sessions = self.held.len(),
                        "live sync: stopping every IDLE session");
                    let all: Vec<Key> = self.held.keys().copied().collect();
                    for k in all {
                        self.stop(k);
                    }
                }
            }
            Plan::Hold(mine) => self.follow(&mine),
        }
        self.ctx.metrics.idle_sessions.set(self.held.len() as i64);
        self.ctx.metrics.idle_rounds.inc();
        self.ctx
            .metrics
            .idle_rescans
            .inc_by(self.planner.rescans - rescans);
    }

    /// Stop the sessions no longer ours, open (some of) those that are.
    fn follow(&mut self, mine: &HashSet<Key>) {
        let budget = self.ctx.settings.imap.idle_max as usize;
        let (gone, new) = changes(self.held.keys(), mine, budget);
        if !gone.is_empty() {
            tracing::info!(
                stopped = gone.len(),
                "live sync: IDLE sessions now another worker's (or no longer wanted)"
            );
        }
        for k in gone {
            self.stop(k);
        }
        for k in new {
            self.start(k);
        }
        self.warn_if_short();
    }

    /// Warn (at most every five minutes) when the identities wanting IDLE
    /// outnumber what the live workers' budgets can hold.
    fn warn_if_short(&mut self) {
        let short = self.planner.unassigned();
        if short == 0 {
            return;
        }
        let quiet = self
            .short_warned
            .is_some_and(|t| t.elapsed() < Duration::from_secs(300));
        if !quiet {
            self.short_warned = Some(Instant::now());
            tracing::warn!(
                wanted = self.planner.wanted(),
                unwatched = short,
                budget = self.ctx.settings.imap.idle_max,
                "live sync: the workers' IDLE budgets (imap.idle_max) do not cover every \
                 identity; the others are polled only"
            );
        }
    }

    fn start(&mut self, key: Key) {
        let (trigger, stop) = shutdown::channel();
        let (ctx, slots) = (self.ctx.clone(), self.slots.clone());
        let task = self
            .sessions
            .spawn(async move { watch(ctx, key, slots, stop).await })
            .id();
        self.tasks.insert(task, key);
        self.held.insert(key, Held { trigger, task });
        tracing::debug!(identity = %key.1, "IDLE session opened");
    }

    /// Stop a session and forget it.
    fn stop(&mut self, key: Key) {
        if let Some(h) = self.held.remove(&key) {
            h.trigger.trigger();
            self.tasks.remove(&h.task);
        }
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
                // Not reopened here before the next read of the identities,
                // nor anywhere before the marker lapses.
                self.planner.forget(key);
                let _ = self.ctx.store.mark_no_idle(key, NO_IDLE_RECHECK_SECS).await;
            }
        }
        self.ctx.metrics.idle_sessions.set(self.held.len() as i64);
    }

    /// On shutdown: stop every session, let them log out, delete the
    /// membership row so other workers take over at their next round.
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
        self.planner.leave().await;
        self.ctx.metrics.idle_sessions.set(0);
    }
}
