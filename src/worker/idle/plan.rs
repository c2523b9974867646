//! One worker's round of live sync, without the sessions: keep its
//! membership row alive, read who else is alive, read again now and then
//! which identities want IDLE, and work out which of them are its own
//! ([`super::assign`]). [`super`] opens and stops the sessions; a bench
//! (`examples/live_assign_sim.rs`) runs this same code for many simulated
//! workers at once.
//!
//! At rest a round costs Cassandra two statements for the whole worker (a
//! plain write of its row, a one-partition read of the members), whatever
//! the sessions it holds. The read of the identities wanting IDLE (a paged
//! read of `user_identity`, plus the no-IDLE markers) is proportional to
//! the identities; it runs once every [`PlanSettings::rescan`], or less
//! often past 200 rows a second ([`rescan_every`]), so its cost per worker
//! stays flat as the identities grow.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::assign::{self, Key, Member};
use crate::config::IdleMode;
use crate::renewal::{renew_before, Renewal};
use crate::store::identity::{infos, IdentityKind, Protocol, Status as IdStatus};
use crate::store::{Store, StoreError};

const SCAN_PAGE: i32 = 5000;
/// Rows of `user_identity` a worker reads a second on average, at most,
/// to find the identities wanting IDLE: past `rescan` worth of them the
/// reads are spaced out, so the store's cost stays flat as identities grow.
const RESCAN_ROWS_PER_SEC: u64 = 200;
/// The longest wait between two reads of the identities wanting IDLE.
const RESCAN_MAX: Duration = Duration::from_secs(3600);

/// What a worker's planner needs to know about it.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub worker: String,
    /// `imap.idle_max`: its weight and cap.
    pub budget: u32,
    /// `imap.idle_lease_secs`: the life of its membership row.
    pub ttl: Duration,
    pub mode: IdleMode,
    /// How often the identities wanting IDLE are read again.
    pub rescan: Duration,
}

/// What a round says the worker should hold.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Exactly these identities (open the missing, stop the others).
    Hold(Arc<HashSet<Key>>),
    /// Keep what is held: the store failed this round, with time left.
    Keep,
    /// Stop every session: the membership row could not be renewed for
    /// half its life, so the others may soon take these identities.
    Cut(String),
}

/// The state of one worker's rounds.
pub struct Planner {
    store: Store,
    s: PlanSettings,
    /// When the last membership renewal that succeeded was sent.
    renewed: Option<Instant>,
    wanted: Vec<Key>,
    /// Bumped whenever `wanted` changes, so the assignment is worked out
    /// again only when the members or the identities changed.
    generation: u64,
    scanned: Option<Instant>,
    /// Rows of `user_identity` the last read went through.
    scanned_rows: usize,
    /// The inputs of the last assignment, and its results.
    computed: Option<(Vec<Member>, u64)>,
    mine: Arc<HashSet<Key>>,
    unassigned: usize,
    /// Reads of the identities wanting IDLE so far, and the statements
    /// they sent (counted on this planner's store; exact when no one else
    /// uses it meanwhile, as in the bench).
    pub rescans: u64,
    pub rescan_statements: u64,
}

impl Planner {
    pub fn new(store: Store, s: PlanSettings) -> Planner {
        Planner {
            store,
            s,
            renewed: None,
            wanted: Vec::new(),
            generation: 0,
            scanned: None,
            scanned_rows: 0,
            computed: None,
            mine: Arc::default(),
            unassigned: 0,
            rescans: 0,
            rescan_statements: 0,
        }
    }

    /// The identities wanting IDLE as last read.
    pub fn wanted(&self) -> usize {
        self.wanted.len()
    }

    /// Those no worker has room for, in the last assignment.
    pub fn unassigned(&self) -> usize {
        self.unassigned
    }

    /// One round; `held` is how many sessions the worker holds now (written
    /// in its row for operators and tests).
    pub async fn round(&mut self, held: usize) -> Plan {
        if let Err(plan) = self.renew(held).await {
            return plan;
        }
        let every = rescan_every(self.s.rescan, self.scanned_rows);
        if self.scanned.is_none_or(|t| t.elapsed() >= every) {
            match self.rescan().await {
                Ok(()) => {}
                Err(e) if self.scanned.is_none() => {
                    tracing::warn!(error = %e, "live sync: cannot read the identities wanting IDLE");
                    return Plan::Keep;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "live sync: cannot read the identities wanting IDLE again");
                }
            }
        }
        let members = match self.store.idle_workers().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "live sync: cannot read the live workers this round");
                return Plan::Keep;
            }
        };
        let mut members: Vec<Member> = members
            .into_iter()
            .filter(|w| w.worker != self.s.worker)
            .map(|w| Member {
                worker: w.worker,
                budget: w.budget,
            })
            .collect();
        members.push(Member {
            worker: self.s.worker.clone(),
            budget: self.s.budget,
        });
        members.sort();
        self.assign(members);
        Plan::Hold(self.mine.clone())
    }

    /// Renew the membership row, bounded by the time left before half its
    /// life since the last renewal that succeeded.
    async fn renew(&mut self, held: usize) -> Result<(), Plan> {
        let give_up = self.s.ttl / 2;
        let deadline = renewal_deadline(self.renewed, give_up);
        let (store, s) = (&self.store, &self.s);
        let call = async {
            store
                .idle_worker_alive(&s.worker, held as u32, s.budget, s.ttl.as_secs().max(1))
                .await
                .map(|()| true)
        };
        match membership_step(self.renewed, give_up, renew_before(deadline, call).await) {
            Step::Renewed(sent) => {
                self.renewed = Some(sent);
                Ok(())
            }
            Step::Retry(why) => {
                tracing::warn!(reason = %why, "live sync: cannot renew this worker's membership yet");
                Err(Plan::Keep)
            }
            Step::Cut(why) => Err(Plan::Cut(why)),
        }
    }

    async fn rescan(&mut self) -> Result<(), StoreError> {
        let sent = self.store.statements();
        let r = self.read_wanted().await;
        self.rescan_statements += self.store.statements() - sent;
        r
    }

    async fn read_wanted(&mut self) -> Result<(), StoreError> {
        let (mut wanted, rows) = wanted_counted(&self.store, self.s.mode).await?;
        self.scanned_rows = rows;
        let marked = self.store.no_idle_marks().await?;
        wanted.retain(|k| !marked.contains(k));
        let mut wanted: Vec<Key> = wanted.into_iter().collect();
        wanted.sort_unstable();
        if wanted != self.wanted {
            self.wanted = wanted;
            self.generation += 1;
        }
        self.scanned = Some(Instant::now());
        self.rescans += 1;
        Ok(())
    }

    fn assign(&mut self, members: Vec<Member>) {
        let inputs = (members, self.generation);
        if self.computed.as_ref() == Some(&inputs) {
            return;
        }
        let me = inputs.0.iter().position(|m| m.worker == self.s.worker);
        let owners = assign::assign(&inputs.0, &self.wanted);
        self.unassigned = owners.iter().filter(|o| o.is_none()).count();
        self.mine = Arc::new(
            owners
                .iter()
                .zip(&self.wanted)
                .filter(|(o, _)| o.is_some() && **o == me)
                .map(|(_, k)| *k)
                .collect(),
        );
        self.computed = Some(inputs);
    }

    /// Stop wanting `key` until the next read of the identities (its server
    /// has no IDLE; the marker written for it keeps it out after that).
    pub fn forget(&mut self, key: Key) {
        let before = self.wanted.len();
        self.wanted.retain(|k| *k != key);
        if self.wanted.len() != before {
            self.generation += 1;
        }
    }

    /// Change how often the identities wanting IDLE are read again.
    pub fn set_rescan(&mut self, every: Duration) {
        self.s.rescan = every;
    }

    /// Clean stop: delete the membership row so the others take over at
    /// their next round rather than after its TTL.
    pub async fn leave(&self) {
        if let Err(e) = self.store.idle_worker_gone(&self.s.worker).await {
            tracing::warn!(error = %e, "live sync: cannot remove this worker's membership row");
        }
    }
}

/// When a renewal must have answered: half the row's life after the last
/// renewal that succeeded; once that has passed (a failure, a long round),
/// half its life from now, so the worker keeps trying to rejoin rather than
/// give up for good.
pub(super) fn renewal_deadline(renewed: Option<Instant>, give_up: Duration) -> Instant {
    match renewed {
        Some(t) if t.elapsed() < give_up => t + give_up,
        _ => Instant::now() + give_up,
    }
}

/// What a membership renewal means for the sessions.
#[derive(Debug)]
pub(super) enum Step {
    Renewed(Instant),
    /// Failed, with time left before half the row's life: try next round.
    Retry(String),
    /// Half the row's life has gone by since the last renewal (or none ever
    /// succeeded): the sessions must stop before others take them over.
    Cut(String),
}

pub(super) fn membership_step<E: std::fmt::Display>(
    renewed: Option<Instant>,
    give_up: Duration,
    r: Renewal<E>,
) -> Step {
    let why = match r {
        Renewal::Renewed { sent } => return Step::Renewed(sent),
        Renewal::Lost => "not written".to_string(),
        Renewal::Failed(e) => e.to_string(),
        Renewal::OutOfTime { waited } => format!(
            "no answer within the {} ms left before half its life",
            waited.as_millis()
        ),
    };
    if renewed.is_none_or(|t| t.elapsed() >= give_up) {
        Step::Cut(format!("cannot renew this worker's membership: {why}"))
    } else {
        Step::Retry(why)
    }
}

/// The identities that want an IDLE session now (a paged read of every
/// identity).
pub async fn wanted(store: &Store, mode: IdleMode) -> Result<HashSet<Key>, StoreError> {
    Ok(wanted_counted(store, mode).await?.0)
}

/// How long after a read of `rows` identities the next one is due: the
/// worker's `every`, or longer so that it reads at most
/// [`RESCAN_ROWS_PER_SEC`] rows a second on average (at most an hour).
fn rescan_every(every: Duration, rows: usize) -> Duration {
    let spread = Duration::from_secs(rows as u64 / RESCAN_ROWS_PER_SEC);
    every.max(spread).min(RESCAN_MAX.max(every))
}

/// [`wanted`], and how many rows of `user_identity` were read to find them.
async fn wanted_counted(
    store: &Store,
    mode: IdleMode,
) -> Result<(HashSet<Key>, usize), StoreError> {
    let all = mode == IdleMode::All;
    let mut out = HashSet::new();
    if mode == IdleMode::Off {
        return Ok((out, 0));
    }
    let mut state = None;
    let mut rows = 0;
    loop {
        let (page, next) = store.scan_identities(SCAN_PAGE, state).await?;
        rows += page.len();
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
            None => return Ok((out, rows)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identities_are_read_again_less_often_as_they_grow() {
        let every = Duration::from_secs(60);
        assert_eq!(rescan_every(every, 0), every);
        assert_eq!(rescan_every(every, 10_000), every);
        // 100,000 identities: each worker reads about 200 rows a second on
        // average, not 1,667: flat in the identities past 12,000.
        assert_eq!(rescan_every(every, 100_000), Duration::from_secs(500));
        assert_eq!(rescan_every(every, 1_000_000), Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_membership_renewal_that_never_answers_stops_the_sessions_before_the_row_lapses() {
        let ttl = Duration::from_secs(30);
        let last = Instant::now();
        // A round a third of the TTL later: the renewal hangs.
        tokio::time::advance(ttl / 3).await;
        let hung = renew_before(
            last + ttl / 2,
            std::future::pending::<Result<bool, String>>(),
        )
        .await;
        assert!(last.elapsed() <= ttl / 2, "{:?}", last.elapsed());
        let step = membership_step(Some(last), ttl / 2, hung);
        assert!(matches!(step, Step::Cut(_)), "{step:?}");
        // A failure with time left is tried again next round.
        let last = Instant::now();
        tokio::time::advance(ttl / 3).await;
        let step = membership_step(
            Some(last),
            ttl / 2,
            Renewal::<String>::Failed("down".into()),
        );
        assert!(matches!(step, Step::Retry(_)), "{step:?}");
        // Past half its life (a round that took long): the renewal is still
        // sent, with half a life from now to answer, and rejoins.
        let long_ago = Instant::now();
        tokio::time::advance(ttl).await;
        assert!(renewal_deadline(Some(long_ago), ttl / 2) > Instant::now());
        let r = renew_before(renewal_deadline(Some(long_ago), ttl / 2), async {
            Ok::<_, String>(true)
        })
        .await;
        let step = membership_step(Some(long_ago), ttl / 2, r);
        assert!(matches!(step, Step::Renewed(_)), "{step:?}");
        // Never renewed: nothing may be held.
        let step = membership_step(None, ttl / 2, Renewal::<String>::Failed("down".into()));
        assert!(matches!(step, Step::Cut(_)), "{step:?}");
    }
}
