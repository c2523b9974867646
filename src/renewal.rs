//! Keeping a row alive that lives a TTL: the sync lock of a running sync,
//! and (through [`renew_before`]) live sync's membership row and the
//! poller's leader lease.
//!
//! Each renewal is a Cassandra lightweight transaction, and a request may
//! wait up to the store's 30 s timeout: as long as a lock's whole life. A
//! renewal is therefore bounded by the time the holder has left before it
//! must give up (half the TTL after the last renewal that succeeded, counted
//! from when that renewal was sent), so a renewal that hangs is abandoned
//! and its holder stops before another worker could take the row.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// What one bounded renewal found.
#[derive(Debug)]
pub enum Renewal<E> {
    /// Renewed: the row is ours for another TTL from `sent`.
    Renewed { sent: Instant },
    /// The row is not ours any more (cleared, lapsed, taken).
    Lost,
    /// The store failed, with time still left to try again.
    Failed(E),
    /// No answer before the time left ran out (or none was left).
    OutOfTime { waited: Duration },
}

/// Send one renewal, bounded by the time left before `deadline`.
pub async fn renew_before<Fut, E>(deadline: Instant, call: Fut) -> Renewal<E>
where
    Fut: Future<Output = Result<bool, E>>,
{
    let sent = Instant::now();
    let left = deadline.saturating_duration_since(sent);
    if left.is_zero() {
        return Renewal::OutOfTime {
            waited: Duration::ZERO,
        };
    }
    match tokio::time::timeout(left, call).await {
        Ok(Ok(true)) => Renewal::Renewed { sent },
        Ok(Ok(false)) => Renewal::Lost,
        Ok(Err(e)) => Renewal::Failed(e),
        Err(_) => Renewal::OutOfTime { waited: left },
    }
}

/// Renew a sync lock of `ttl` every third of it, the first time a third of
/// it after `taken`; return why the sync must stop once the lock is lost
/// or could not be renewed for half the TTL.
pub async fn keep_lock<F, Fut, E>(ttl: Duration, taken: Instant, mut renew: F) -> String
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let every = ttl / 3;
    let give_up = ttl / 2;
    let mut renewed = taken;
    let mut failed: Option<String> = None;
    loop {
        tokio::time::sleep(every.min(Duration::from_secs(5)).max(every / 2)).await;
        if renewed.elapsed() < every {
            continue;
        }
        match renew_before(renewed + give_up, renew()).await {
            Renewal::Renewed { sent } => {
                renewed = sent;
                failed = None;
            }
            Renewal::Lost => return "the sync lock was lost (cleared or lapsed)".to_string(),
            Renewal::Failed(e) if renewed.elapsed() >= give_up => {
                return format!("cannot renew the sync lock: {e}")
            }
            Renewal::Failed(e) => {
                tracing::warn!(error = %e, "cannot renew the sync lock yet");
                failed = Some(e.to_string());
            }
            Renewal::OutOfTime { waited } => {
                return match failed {
                    Some(e) if waited.is_zero() => format!("cannot renew the sync lock: {e}"),
                    _ => format!(
                        "cannot renew the sync lock: no answer from Cassandra within the {} ms \
                         left before half the lock's TTL ({} s) since its last renewal",
                        waited.as_millis(),
                        ttl.as_secs()
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const TTL: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_lock_renewal_that_never_answers_is_abandoned_before_the_lock_lapses() {
        let taken = Instant::now();
        let ended = tokio::time::timeout(
            TTL,
            keep_lock(TTL, taken, || {
                std::future::pending::<Result<bool, String>>()
            }),
        )
        .await;
        let why = ended.expect("the sync is told to stop before the lock lapses");
        assert!(taken.elapsed() <= TTL / 2, "{:?}", taken.elapsed());
        assert!(why.contains("no answer"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn lock_renewals_that_succeed_keep_the_sync_going() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let kept = tokio::time::timeout(
            TTL * 10,
            keep_lock(TTL, Instant::now(), move || {
                c.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, String>(true) }
            }),
        )
        .await;
        assert!(kept.is_err(), "still syncing");
        assert!(
            calls.load(Ordering::Relaxed) >= 20,
            "every third of the TTL"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lock_stops_at_once_and_failures_stop_at_half_the_ttl() {
        let why = keep_lock(TTL, Instant::now(), || async { Ok::<_, String>(false) }).await;
        assert!(why.contains("lost"), "{why}");
        let taken = Instant::now();
        let why = keep_lock(TTL, taken, || async { Err::<bool, _>("down") }).await;
        assert!(why.contains("down"), "{why}");
        assert!(taken.elapsed() <= TTL / 2, "{:?}", taken.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_is_cut_at_its_deadline() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = renew_before(deadline, std::future::pending::<Result<bool, String>>()).await;
        assert!(matches!(r, Renewal::OutOfTime { .. }), "{r:?}");
        assert_eq!(Instant::now(), deadline);
        let r = renew_before(deadline, async { Ok::<_, String>(true) }).await;
        assert!(matches!(r, Renewal::OutOfTime { .. }), "none left: {r:?}");
    }
}
