//! Exponential backoff with full jitter and a cap, for every retry loop
//! (NATS and Cassandra connects, the worker's job pull, IMAP reconnects).
//!
//! Jitter spreads the retries of many workers restarted at once, so a
//! recovering server is not hit by all of them in the same millisecond.
//!
//! [`Hosts`] keeps one such backoff per IMAP server (`host:port`) that
//! throttled us, so every identity on that server waits, not just the one
//! that was told. It lives in one process's memory: it is politeness, not
//! correctness (a job it defers is retried at its next schedule), and
//! each worker backs off on its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: uniform in [ceiling/2, ceiling], ceiling = min(cap, base * 2^attempt).
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.cap);
        let half = ceiling / 2;
        half + ceiling.mul_f64(fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The servers (`host:port`, any case) a process backs off from, each
/// until a time. Bounded: at
/// most `max` hosts are remembered; past that, those whose wait is over
/// are forgotten first, and a new host is not remembered while every
/// slot still waits (its jobs then try it as usual).
#[derive(Debug)]
pub struct Hosts {
    base: Duration,
    cap: Duration,
    max: usize,
    slots: Mutex<HashMap<String, Slot>>,
}

#[derive(Debug)]
struct Slot {
    backoff: Backoff,
    until: Instant,
}

impl Hosts {
    pub fn new(base: Duration, cap: Duration, max: usize) -> Hosts {
        Hosts {
            base,
            cap,
            max,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A panic elsewhere cannot leave the map half-written.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `host` throttled us at `now`: wait the next delay of its backoff
    /// (exponential with jitter, capped) before trying it again. The delay.
    pub fn throttled(&self, host: &str, now: Instant) -> Duration {
        let key = host.to_ascii_lowercase();
        let mut slots = self.slots();
        if !slots.contains_key(&key) && slots.len() >= self.max {
            slots.retain(|_, s| s.until > now);
        }
        if !slots.contains_key(&key) && slots.len() >= self.max {
            return Duration::ZERO;
        }
        let slot = slots.entry(key).or_insert_with(|| Slot {
            backoff: Backoff::new(self.base, self.cap),
            until: now,
        });
        let delay = slot.backoff.next_delay();
        slot.until = now + delay;
        delay
    }

    /// How long `host` is still to be left alone at `now`, if it is.
    pub fn waiting(&self, host: &str, now: Instant) -> Option<Duration> {
        let slots = self.slots();
        let until = slots.get(&host.to_ascii_lowercase())?.until;
        (until > now).then(|| until - now)
    }

    /// `host` let us in: its backoff starts over.
    pub fn served(&self, host: &str) {
        let key = host.to_ascii_lowercase();
        let mut slots = self.slots();
        if slots.contains_key(&key) {
            slots.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_host_waits_longer_each_time_until_it_serves() {
        let hosts = Hosts::new(Duration::from_secs(30), Duration::from_secs(600), 10);
        let t0 = Instant::now();
        assert_eq!(hosts.waiting("imap.example.com", t0), None);
        let d1 = hosts.throttled("IMAP.example.com", t0);
        assert!(d1 >= Duration::from_secs(15) && d1 <= Duration::from_secs(30));
        assert!(hosts.waiting("imap.example.com", t0).is_some());
        assert_eq!(hosts.waiting("other.example.com", t0), None, "per host");
        assert_eq!(hosts.waiting("imap.example.com", t0 + d1), None);
        let later = t0 + d1;
        let d2 = hosts.throttled("imap.example.com", later);
        assert!(d2 >= Duration::from_secs(30) && d2 <= Duration::from_secs(60));
        for _ in 0..20 {
            assert!(hosts.throttled("imap.example.com", later) <= Duration::from_secs(600));
        }
        hosts.served("imap.example.com");
        assert_eq!(hosts.waiting("imap.example.com", later), None);
        assert!(hosts.throttled("imap.example.com", later) <= Duration::from_secs(30));
    }

    #[test]
    fn hosts_remembered_are_bounded() {
        let hosts = Hosts::new(Duration::from_secs(30), Duration::from_secs(600), 2);
        let t0 = Instant::now();
        hosts.throttled("a", t0);
        hosts.throttled("b", t0);
        assert_eq!(hosts.throttled("c", t0), Duration::ZERO, "full: not kept");
        assert_eq!(hosts.waiting("c", t0), None);
        // Once a's and b's waits are over, their slots are reused.
        let late = t0 + Duration::from_secs(3600);
        assert!(hosts.throttled("c", late) > Duration::ZERO);
        assert!(hosts.waiting("c", late).is_some());
    }

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
