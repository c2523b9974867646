//! The schedule: when each identity is next due, and the FIFO job queues.
//!
//! A `BinaryHeap` of due times (lazily invalidated by a per-entry
//! generation) drives the loop, as in stalwart's housekeeper: the poller
//! sleeps until the earliest due time, moves every due identity into its
//! kind's queue, and reschedules it one interval later. Queues are FIFO and
//! deduplicated on (user, identity, order); their total size is bounded.
//!
//! Time is `tokio::time::Instant`, so the tests run under paused time.
//! Wall-clock inputs (`last_check`) are converted once, on entry.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

/// Which worker kind serves an identity's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Imap,
    Twitter,
    Mastodon,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Imap, Kind::Twitter, Kind::Mastodon];

    /// The label of its queue in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Imap => "imap",
            Kind::Twitter => "twitter",
            Kind::Mastodon => "mastodon",
        }
    }

    /// `email` and legacy `imap` go to the IMAP workers.
    pub fn of_protocol(protocol: &str) -> Option<Kind> {
        match protocol {
            "email" | "imap" => Some(Kind::Imap),
            "twitter" => Some(Kind::Twitter),
            "mastodon" => Some(Kind::Mastodon),
            _ => None,
        }
    }
}

/// How often an identity is synced.
#[derive(Debug, Clone)]
pub enum Interval {
    /// Every n "minutes" (see `poller.minute_secs`).
    Minutes(u32),
    /// At the times of a cron expression (UTC).
    Cron(Box<cron::Schedule>),
}

impl PartialEq for Interval {
    fn eq(&self, other: &Interval) -> bool {
        match (self, other) {
            (Interval::Minutes(a), Interval::Minutes(b)) => a == b,
            (Interval::Cron(a), Interval::Cron(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

pub const DEFAULT_MINUTES: u32 = 15;

/// Parse a cron expression; 5 fields (minute precision) get a leading `0`
/// for seconds. An expression that could fire more than once a minute (a
/// 6-field one with several seconds, such as `* * * * * *`) is refused: it
/// would mean a login to the remote server every second.
pub fn parse_cron(s: &str) -> Result<cron::Schedule, String> {
    use cron::TimeUnitSpec;
    let fields = s.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {}", s.trim())
    } else {
        s.trim().to_string()
    };
    let c = cron::Schedule::from_str(&full).map_err(|e| e.to_string())?;
    if c.seconds().count() > 1 {
        return Err(format!(
            "{:?} can fire more than once a minute: give one value in the seconds field, \
             or use 5 fields (at most once a minute)",
            s.trim()
        ));
    }
    Ok(c)
}

impl Interval {
    /// `pollinterval` as stored: minutes with 0 < n < 4320, or a cron
    /// expression; empty is the default. Invalid values give the default and
    /// a message to log.
    pub fn parse(s: &str) -> (Interval, Option<String>) {
        let t = s.trim();
        if t.is_empty() {
            return (Interval::Minutes(DEFAULT_MINUTES), None);
        }
        if let Ok(n) = t.parse::<i64>() {
            if n > 0 && n < 4320 {
                return (Interval::Minutes(n as u32), None);
            }
            return (
                Interval::Minutes(DEFAULT_MINUTES),
                Some(format!(
                    "pollinterval {n} out of 1..4319: using {DEFAULT_MINUTES}"
                )),
            );
        }
        match parse_cron(t) {
            Ok(c) => (Interval::Cron(Box::new(c)), None),
            Err(e) => (
                Interval::Minutes(DEFAULT_MINUTES),
                Some(format!(
                    "pollinterval {t:?} is neither minutes nor a cron expression ({e}): using {DEFAULT_MINUTES}"
                )),
            ),
        }
    }

    /// When a leader that (re)builds its schedule now makes an identity
    /// last checked at `last_check` due: one interval after it, or at once.
    /// `imapctl status` shows it, since the live schedule is in the
    /// leader's memory only.
    pub fn due_after(&self, last_check: DateTime<Utc>, minute: Duration) -> DateTime<Utc> {
        last_check
            + chrono::Duration::from_std(self.delay_after(last_check, minute))
                .unwrap_or(chrono::Duration::zero())
    }

    /// The first due time after `after` (wall clock), as a delay from it.
    fn delay_after(&self, after: DateTime<Utc>, minute: Duration) -> Duration {
        match self {
            Interval::Minutes(n) => minute * *n,
            Interval::Cron(c) => c
                .after(&after)
                .next()
                .and_then(|t| (t - after).to_std().ok())
                // A cron with no future time: check again in a day.
                .unwrap_or(Duration::from_secs(86_400)),
        }
    }
}

/// (user, identity).
pub type Key = (Uuid, Uuid);

#[derive(Debug)]
struct Entry {
    kind: Kind,
    interval: Interval,
    generation: u64,
}

/// The whole schedule of the leader.
#[derive(Debug)]
pub struct Schedule {
    minute: Duration,
    queue_limit: usize,
    entries: HashMap<Key, Entry>,
    heap: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    next_generation: u64,
    queues: HashMap<Kind, VecDeque<Key>>,
    queued: HashSet<(Kind, Key)>,
}

impl Schedule {
    pub fn new(minute: Duration, queue_limit: usize) -> Schedule {
        Schedule {
            minute,
            queue_limit,
            entries: HashMap::new(),
            heap: BinaryHeap::new(),
            next_generation: 0,
            queues: HashMap::new(),
            queued: HashSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.entries.contains_key(key)
    }

    pub fn interval(&self, key: &Key) -> Option<&Interval> {
        self.entries.get(key).map(|e| &e.interval)
    }

    /// Jobs waiting in all queues.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Jobs waiting in the queue of `kind`.
    pub fn queued_of(&self, kind: Kind) -> usize {
        self.queues.get(&kind).map_or(0, VecDeque::len)
    }

    fn push(&mut self, key: Key, kind: Kind, interval: Interval, due: Instant) {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.entries.insert(
            key,
            Entry {
                kind,
                interval,
                generation,
            },
        );
        self.heap.push(Reverse((due, generation, key)));
    }

    /// Add or replace an identity, due one interval after `last_check`
    /// (at once when it never ran or that time is past).
    pub fn upsert(
        &mut self,
        key: Key,
        kind: Kind,
        interval: Interval,
        last_check: Option<DateTime<Utc>>,
    ) {
        let now = Instant::now();
        let wall = Utc::now();
        let due = match last_check {
            None => now,
            Some(lc) => {
                let next = lc
                    + chrono::Duration::from_std(interval.delay_after(lc, self.minute))
                        .unwrap_or(chrono::Duration::zero());
                match (next - wall).to_std() {
                    Ok(d) => now + d,
                    Err(_) => now, // in the past: due now
                }
            }
        };
        self.push(key, kind, interval, due);
    }

    /// Add an identity due right now (idCache `add`).
    pub fn add_now(&mut self, key: Key, kind: Kind, interval: Interval) {
        self.push(key, kind, interval, Instant::now());
    }

    /// Change the interval; next due one new interval from now.
    pub fn reschedule(&mut self, key: Key, interval: Interval) -> bool {
        let Some(kind) = self.entries.get(&key).map(|e| e.kind) else {
            return false;
        };
        let due = Instant::now() + interval.delay_after(Utc::now(), self.minute);
        self.push(key, kind, interval, due);
        true
    }

    /// Forget an identity and drop its queued jobs.
    pub fn remove(&mut self, key: &Key) -> bool {
        let Some(e) = self.entries.remove(key) else {
            return false;
        };
        if self.queued.remove(&(e.kind, *key)) {
            if let Some(q) = self.queues.get_mut(&e.kind) {
                q.retain(|k| k != key);
            }
        }
        true
    }

    /// When the next identity is due.
    pub fn next_due(&mut self) -> Option<Instant> {
        // Drop stale heap items so the answer is exact.
        while let Some(Reverse((_, generation, key))) = self.heap.peek() {
            match self.entries.get(key) {
                Some(e) if e.generation == *generation => break,
                _ => {
                    self.heap.pop();
                }
            }
        }
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Queue every identity due at `now` and reschedule it. Returns how many
    /// jobs were queued.
    pub fn release_due(&mut self, now: Instant) -> usize {
        let mut queued = 0;
        let wall = Utc::now();
        while let Some(Reverse((due, generation, key))) = self.heap.peek().copied() {
            if due > now {
                break;
            }
            self.heap.pop();
            let Some(e) = self.entries.get(&key) else {
                continue;
            };
            if e.generation != generation {
                continue;
            }
            let kind = e.kind;
            let next = now + e.interval.delay_after(wall, self.minute);
            self.heap.push(Reverse((next, generation, key)));
            if self.queued.len() >= self.queue_limit {
                // Full: this round is skipped, the next one will come.
                continue;
            }
            if self.queued.insert((kind, key)) {
                self.queues.entry(kind).or_default().push_back(key);
                queued += 1;
            }
        }
        queued
    }

    /// The oldest job of `kind`.
    pub fn pop_job(&mut self, kind: Kind) -> Option<Key> {
        let key = self.queues.get_mut(&kind)?.pop_front()?;
        self.queued.remove(&(kind, key));
        Some(key)
    }

    /// Everything forgotten (when leadership is lost).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.heap.clear();
        self.queues.clear();
        self.queued.clear();
    }

    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.entries.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u128) -> Key {
        (Uuid::from_u128(n), Uuid::from_u128(n + 1000))
    }

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn never_checked_is_due_at_once_and_recurs() {
        let mut s = Schedule::new(MIN, 100);
        s.upsert(k(1), Kind::Imap, Interval::Minutes(15), None);
        assert_eq!(s.release_due(Instant::now()), 1);
        assert_eq!(s.pop_job(Kind::Imap), Some(k(1)));
        assert_eq!(s.pop_job(Kind::Imap), None);
        tokio::time::advance(14 * MIN).await;
        assert_eq!(s.release_due(Instant::now()), 0);
        tokio::time::advance(MIN).await;
        assert_eq!(s.release_due(Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn last_check_decides_the_first_due_time() {
        let mut s = Schedule::new(MIN, 100);
        let recent = Utc::now() - chrono::Duration::minutes(5);
        let old = Utc::now() - chrono::Duration::minutes(60);
        s.upsert(k(1), Kind::Imap, Interval::Minutes(15), Some(recent));
        s.upsert(k(2), Kind::Imap, Interval::Minutes(15), Some(old));
        assert_eq!(s.release_due(Instant::now()), 1, "only the overdue one");
        assert_eq!(s.pop_job(Kind::Imap), Some(k(2)));
        tokio::time::advance(10 * MIN).await;
        assert_eq!(s.release_due(Instant::now()), 1);
        assert_eq!(s.pop_job(Kind::Imap), Some(k(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn queues_are_fifo_deduplicated_and_per_kind() {
        let mut s = Schedule::new(MIN, 100);
        s.add_now(k(1), Kind::Imap, Interval::Minutes(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        s.add_now(k(2), Kind::Imap, Interval::Minutes(1));
        s.add_now(k(3), Kind::Twitter, Interval::Minutes(1));
        s.release_due(Instant::now());
        // A later round while k(1) still waits: no duplicate.
        tokio::time::advance(MIN).await;
        s.release_due(Instant::now());
        assert_eq!(s.queued(), 3);
        assert_eq!(s.pop_job(Kind::Imap), Some(k(1)));
        assert_eq!(s.pop_job(Kind::Imap), Some(k(2)));
        assert_eq!(s.pop_job(Kind::Imap), None);
        assert_eq!(s.pop_job(Kind::Twitter), Some(k(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn remove_and_reschedule() {
        let mut s = Schedule::new(MIN, 100);
        s.add_now(k(1), Kind::Imap, Interval::Minutes(5));
        s.release_due(Instant::now());
        assert!(s.remove(&k(1)));
        assert_eq!(s.pop_job(Kind::Imap), None, "queued job dropped too");
        assert_eq!(s.next_due(), None);

        s.add_now(k(2), Kind::Imap, Interval::Minutes(5));
        s.release_due(Instant::now());
        s.pop_job(Kind::Imap);
        assert!(s.reschedule(k(2), Interval::Minutes(30)));
        tokio::time::advance(29 * MIN).await;
        assert_eq!(s.release_due(Instant::now()), 0);
        tokio::time::advance(MIN).await;
        assert_eq!(s.release_due(Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_is_bounded() {
        let mut s = Schedule::new(MIN, 2);
        for i in 0..5 {
            s.add_now(k(i), Kind::Imap, Interval::Minutes(1));
        }
        assert_eq!(s.release_due(Instant::now()), 2);
        assert_eq!(s.queued(), 2);
        assert_eq!(s.len(), 5, "the others stay scheduled");
    }

    #[test]
    fn intervals() {
        assert_eq!(Interval::parse("").0, Interval::Minutes(15));
        assert_eq!(Interval::parse("30").0, Interval::Minutes(30));
        let (i, warn) = Interval::parse("5000");
        assert_eq!(i, Interval::Minutes(15));
        assert!(warn.is_some());
        let (i, warn) = Interval::parse("0");
        assert_eq!(i, Interval::Minutes(15));
        assert!(warn.is_some());
        assert!(matches!(
            Interval::parse("*/5 * * * *").0,
            Interval::Cron(_)
        ));
        // More than once a minute: refused, the default is used instead.
        for fast in [
            "* * * * * *",
            "*/10 * * * * *",
            "0,30 * * * * *",
            "* * * * * * *",
        ] {
            let (i, warn) = Interval::parse(fast);
            assert_eq!(i, Interval::Minutes(15), "{fast}");
            assert!(warn.unwrap().contains("more than once a minute"), "{fast}");
        }
        assert!(matches!(
            Interval::parse("30 */5 * * * *").0,
            Interval::Cron(_)
        ));
        let (i, warn) = Interval::parse("banana");
        assert_eq!(i, Interval::Minutes(15));
        assert!(warn.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn cron_interval_is_due_at_its_times() {
        let mut s = Schedule::new(MIN, 10);
        let (every_minute, _) = Interval::parse("* * * * *");
        s.upsert(k(1), Kind::Imap, every_minute, Some(Utc::now()));
        let due = s.next_due().unwrap();
        assert!(due <= Instant::now() + MIN);
    }
}
