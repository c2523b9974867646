//! One IDLE session, once a worker holds it ([`super`] decides which).
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
//! without IDLE is recorded (a lease row owned by
//! [`NO_IDLE_OWNER`](crate::store::idle_lease::NO_IDLE_OWNER) for an
//! hour) and its identity stays with polling. Polling goes on regardless:
//! the poller's schedule is the safety net for anything a session misses.

use std::sync::Arc;
use std::time::Duration;

use async_imap::imap_proto::{MailboxDatum, RequestId, Response, Status};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Key, MAX_BACKOFF};
use crate::imap::fetch::{self, Reader};
use crate::imap::{self, ImapError, ImapSession};
use crate::shutdown::Shutdown;
use crate::store::identity::Status as IdStatus;
use crate::worker::account;
use crate::worker::context::{Counters, Ctx};
use crate::worker::job::{self, Ended, Scope, SyncRequest};
use crate::worker::JobError;

/// Syncs in a row run at once because INBOX grew during the one before;
/// the next ones wait as a failed sync's retry does.
const GROWN_AT_ONCE: u32 = 10;

/// Why a session ended for good (errors are retried inside it).
#[derive(Debug)]
pub(super) enum SessionEnd {
    /// Its stop token fired (lease lost or handed back, shutdown).
    Stopped,
    /// The server does not offer IDLE.
    NoIdle,
    /// The identity cannot be watched as stored (deleted, no longer an
    /// active remote email identity, no usable credentials).
    Unusable(String),
}

/// One identity's session, reconnecting with backoff until it is stopped
/// or cannot be watched.
pub(super) async fn watch(
    ctx: Ctx,
    key: Key,
    slots: Arc<Semaphore>,
    mut stop: Shutdown,
) -> SessionEnd {
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
    // Boxed: the sync's state (tens of KiB) then lives only while it runs,
    // not in every idle session's task (see docs/performance.md).
    let sync = Box::pin(job::sync_scoped(ctx, req, Counters::new(), scope));
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

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, F: std::future::Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A held session's task is its `watch` future, for as long as the
    /// session lives: whatever that future holds inline (the largest state
    /// of anything it awaits) is paid by every session, syncing or not.
    /// Larger steps (a sync, an OAuth2 refresh) are boxed where they are
    /// awaited so only a running one costs memory. Was 58 KiB (debug and
    /// release builds alike), now ~4 KiB; see docs/performance.md.
    #[test]
    fn an_idle_session_future_stays_small() {
        let size = future_size(watch);
        assert!(size <= 8 * 1024, "watch future: {size} bytes");
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
}
