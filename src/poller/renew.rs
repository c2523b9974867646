//! Keeping the leader lease, in a task of its own.
//!
//! The leader renews its Cassandra lease every third of the TTL. When that
//! renewal ran inside the serving loop, a slow Cassandra (a request may take
//! up to the store's 30 s timeout) stopped `need_job` answers for as long,
//! past the workers' 5 s request timeout, and could keep a leader serving
//! after its lease had lapsed. Here the renewal runs beside the loop, which
//! only learns, through the task's end, that it must step down.
//!
//! A renewal that does not succeed in time ends the task before the lease
//! could lapse: two thirds of the TTL after the last renewal that succeeded
//! (counted from when it was sent), so a standby can never lead while we
//! still serve. Each renewal is bounded as the sync lock's and the IDLE
//! leases' are, by [`crate::renewal::renew_before`].

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::renewal::{renew_before, Renewal};

/// Why the leader must step down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Another poller holds the lease.
    Taken,
    /// No renewal succeeded for two thirds of the TTL: the lease may lapse.
    Unconfirmed,
}

/// Renew the lease (`renew` answers whether we hold it) every third of
/// `ttl`, starting from `held_since`, the instant the lease was last taken
/// or renewed. Returns only when the lease is lost or may be about to be.
pub async fn keep<F, Fut, E>(ttl: Duration, held_since: Instant, mut renew: F) -> Lost
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let every = ttl / 3;
    let margin = ttl * 2 / 3;
    let mut confirmed = held_since;
    let mut next = held_since + every;
    loop {
        tokio::time::sleep_until(next).await;
        match renew_before(confirmed + margin, renew()).await {
            Renewal::Renewed { sent } => {
                confirmed = sent;
                next = sent + every;
            }
            Renewal::Lost => return Lost::Taken,
            Renewal::Failed(e) => {
                tracing::warn!(error = %e, "cannot renew the lease");
                // Try again soon, still before the margin is spent.
                next = Instant::now() + every / 2;
            }
            Renewal::OutOfTime { waited } => {
                if !waited.is_zero() {
                    tracing::warn!(
                        waited_ms = waited.as_millis() as u64,
                        "lease renewal unanswered"
                    );
                }
                return Lost::Unconfirmed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const TTL: Duration = Duration::from_secs(15);

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_steps_down_before_the_lease_lapses() {
        let start = Instant::now();
        let lost = keep(TTL, start, || {
            std::future::pending::<Result<bool, String>>()
        })
        .await;
        assert_eq!(lost, Lost::Unconfirmed);
        assert!(start.elapsed() <= TTL * 2 / 3, "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_that_succeed_keep_the_lease() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let kept = tokio::time::timeout(
            TTL * 10,
            keep(TTL, Instant::now(), move || {
                c.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, String>(true) }
            }),
        )
        .await;
        assert!(kept.is_err(), "still leading");
        assert_eq!(calls.load(Ordering::Relaxed), 30, "every third of the TTL");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_by_another_poller_ends_at_once() {
        let lost = keep(TTL, Instant::now(), || async { Ok::<_, String>(false) }).await;
        assert_eq!(lost, Lost::Taken);
    }

    #[tokio::test(start_paused = true)]
    async fn one_failed_renewal_is_retried_and_errors_in_a_row_step_down() {
        // Fails once, then succeeds: still leading.
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let kept = tokio::time::timeout(
            TTL * 3,
            keep(TTL, Instant::now(), move || {
                let n = c.fetch_add(1, Ordering::Relaxed);
                async move {
                    if n == 0 {
                        Err("Cassandra timeout".to_string())
                    } else {
                        Ok(true)
                    }
                }
            }),
        )
        .await;
        assert!(kept.is_err(), "a single failure is survived");
        // Always failing: step down, before the lease could lapse.
        let start = Instant::now();
        let lost = keep(TTL, start, || async { Err::<bool, _>("down") }).await;
        assert_eq!(lost, Lost::Unconfirmed);
        assert!(start.elapsed() <= TTL * 2 / 3);
    }
}
