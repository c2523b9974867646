//! One live-sync session, once a worker holds it ([`super`] decides which).
//!
//! A session logs in and waits in IDLE over one connection, in one of two
//! modes:
//!
//! - **NOTIFY** (RFC 5465, [`imap::notify`]), where the server offers it
//!   and `imap.idle_notify` is on (the default): `NOTIFY SET` asks for
//!   new and expunged messages in every personal folder and for folders
//!   created, renamed or deleted. No mailbox stays selected between syncs,
//!   so every change is a `* STATUS F`; a change in a folder the identity
//!   syncs syncs that folder alone; a `* LIST` lists the folders again
//!   (`mailboxes: *`) and syncs a new one. It syncs every folder once when
//!   it opens (mail that came while nobody watched). An announcement of a
//!   folder standing as its last sync read it asks for nothing ([`wanted`]
//!   weighs it against the counts that sync saw).
//! - **IDLE on INBOX**, without NOTIFY: INBOX stays EXAMINEd, an EXISTS
//!   syncs INBOX, and INBOX is synced when the session opens. Other
//!   folders wait for the scheduled sync.
//!
//! Every sync goes over the same connection through the ordinary path
//! ([`job::sync_scoped`]): the same sync lock, marker, pipeline and
//! checkpoint, so exactly-once holds exactly as for an order. Which
//! folders are owed and when is [`wanted`]'s: a folder said to change
//! inside a sync's own answers ([`imap::news`]: the server may say so only
//! there) is synced again at once, and a sync another one held, or one
//! that failed, is retried with backoff. IDLE is entered again every
//! `idle_renew_secs` (under RFC 2177's 29 minutes), and a broken
//! connection is opened again with backoff. A server without IDLE is
//! recorded (a row of `imap_idle_lease` owned by
//! [`NO_IDLE_OWNER`](crate::store::idle_lease::NO_IDLE_OWNER) for an
//! hour) and its identity stays with polling. Polling goes on regardless:
//! the poller's schedule is the safety net for anything a session misses.

mod wanted;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_imap::imap_proto::{RequestId, Response, Status};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use self::wanted::{Listing, Target, Wanted, Watched};
use super::{Key, MAX_BACKOFF};
use crate::imap::fetch::{self, Reader};
use crate::imap::news::{self, News};
use crate::imap::notify::{self, Event};
use crate::imap::{self, Account, ConnInfo, ImapError, ImapSession};
use crate::shutdown::Shutdown;
use crate::store::identity::{mailbox_key, Identity, Status as IdStatus};
use crate::worker::account;
use crate::worker::context::{Counters, Ctx};
use crate::worker::job::{self, Ended, Scope, SyncRequest};
use crate::worker::JobError;

/// Why a session ended for good (errors are retried inside it).
#[derive(Debug)]
pub(super) enum SessionEnd {
    /// Its stop token fired (no longer this worker's identity, membership lost, shutdown).
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
        // A server throttling us, or backed off already: left alone as
        // long as every job leaves it.
        let host = match &e {
            JobError::HostBackoff { left, .. } => Some(*left),
            e => job::throttled_by(&ctx, e),
        };
        let wait = host.map_or(backoff, |h| h.max(backoff));
        tracing::warn!(identity = %key.1, error = %e, retry_in_secs = wait.as_secs(),
            "IDLE session broken: reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait() => return SessionEnd::Stopped,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why an IDLE wait ended.
enum Wake {
    /// The server announced changes.
    News(News),
    /// Time to re-enter IDLE, or to retry a sync.
    Timer,
    Stop,
}

/// The logged-in connection a session works over.
struct Conn {
    session: ImapSession,
    info: ConnInfo,
    acc: Account,
    qresync_on: bool,
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
    job::host_backoff(ctx, &id)?;
    account::ensure_fresh_token(ctx, &mut id).await?;
    let acc = account::from_identity(ctx, &id, "")?;
    let (mut session, info) = tokio::select! {
        // Boxed, as the other long steps below: a held session's task then
        // carries only what waiting in IDLE needs (see docs/performance.md).
        r = Box::pin(imap::connect(&acc)) => r?,
        _ = stop.wait() => return Ok(SessionEnd::Stopped),
    };
    ctx.hosts.served(&acc.server);
    if !info.caps.idle {
        job::logout(&mut session, &acc).await;
        return Ok(SessionEnd::NoIdle);
    }
    // ENABLE is refused once a mailbox is selected: now or never for this
    // session, so the syncs it runs can record QRESYNC changes.
    let qresync_on = info.caps.qresync && job::enable_qresync(&mut session, &acc, stop).await?;
    let mut c = Conn {
        session,
        info,
        acc,
        qresync_on,
    };
    let mut wanted = Box::pin(open(ctx, &id, &mut c, stop)).await?;
    tracing::info!(identity = %key.1, server = c.acc.server, notify = wanted.notifying(),
        "IDLE session open");
    let end = run(ctx, key, slots, &mut c, &mut wanted, stop).await;
    if matches!(end, Ok(SessionEnd::Stopped)) {
        job::logout(&mut c.session, &c.acc).await;
    }
    end
}

/// Set the session up for its mode: NOTIFY and the folders to watch, or
/// INBOX EXAMINEd for IDLE alone.
async fn open(ctx: &Ctx, id: &Identity, c: &mut Conn, stop: &Shutdown) -> Result<Wanted, JobError> {
    let (server, io) = (c.acc.server.as_str(), c.acc.io_timeout);
    if ctx.settings.imap.idle_notify && c.info.caps.notify {
        let mut reader = Reader::new(&mut c.session, server, io, stop.clone());
        if notify::set(&mut reader).await? {
            let star = id.mailboxes().iter().any(|m| m == "*");
            let ((names, every), _) = if star {
                listed(c, stop).await?
            } else {
                let names = id.mailboxes().into_iter().collect();
                ((names, BTreeSet::new()), News::default())
            };
            // Everything is synced first: what was said so far is covered.
            return Ok(Wanted::notify(Watched { star, names, every }));
        }
    }
    // INBOX stays selected from here on (a live sync only EXAMINEs INBOX
    // again): whatever arrives after this is announced, at the latest when
    // the next IDLE starts.
    Reader::new(&mut c.session, server, io, stop.clone())
        .examine("INBOX")
        .await?;
    Ok(Wanted::inbox())
}

/// The folders `mailboxes: *` syncs and every folder, listed now, and
/// what was announced meanwhile.
async fn listed(c: &mut Conn, stop: &Shutdown) -> Result<(Listing, News), JobError> {
    let (server, io, caps) = (c.acc.server.as_str(), c.acc.io_timeout, c.info.caps);
    let watch = news::Watch::new();
    let listing = imap::folders::list_known(&mut c.session, server, io, caps);
    let mut stop = stop.clone();
    let folders = tokio::select! {
        r = news::watched(watch.clone(), listing) => r?,
        _ = stop.wait() => return Err(JobError::Interrupted("stopped while listing folders".into())),
    };
    let every = folders
        .iter()
        .filter(|f| f.selectable)
        .filter_map(|f| f.name.as_deref().ok().map(|n| mailbox_key(n).to_string()))
        .collect();
    let (names, _) = imap::folders::syncable_names(server, folders);
    let mut news = watch.news();
    news.merge(notify::drain(&mut c.session, None));
    Ok(((names.into_iter().collect(), every), news))
}

/// Sync what is owed, then IDLE, in turn, until stopped.
async fn run(
    ctx: &Ctx,
    key: Key,
    slots: &Arc<Semaphore>,
    c: &mut Conn,
    wanted: &mut Wanted,
    stop: &mut Shutdown,
) -> Result<SessionEnd, JobError> {
    let renew = ctx.settings.imap.idle_renew();
    loop {
        // A loop: a sync that saw a folder change asks for another at once.
        while !stop.is_triggered() {
            if wanted.relist_due() {
                let (listing, news) = Box::pin(listed(c, stop)).await?;
                wanted.relisted(listing, news);
                continue;
            }
            let Some(target) = wanted.due() else { break };
            let job = (&target, wanted.notifying());
            let (ended, news) = Box::pin(push_sync(ctx, key, slots, c, job, stop)).await;
            if !news.folders.is_empty() {
                ctx.metrics.idle_wakeups.inc();
            }
            wanted.synced(&target, ended, news);
        }
        if stop.is_triggered() {
            return Ok(SessionEnd::Stopped);
        }
        let until = Instant::now() + renew;
        let until = wanted.sync_at().map_or(until, |t| t.min(until));
        let (io, server) = (c.acc.io_timeout, c.acc.server.as_str());
        let selected = wanted.selected();
        match idle_until(&mut c.session, (io, server), selected, until, stop).await? {
            Wake::News(news) => {
                if wanted.woken(news) {
                    ctx.metrics.idle_wakeups.inc();
                }
            }
            Wake::Timer => {}
            Wake::Stop => return Ok(SessionEnd::Stopped),
        }
    }
}

/// One IDLE: enter it, wait for news, `until` or the stop token, then
/// leave it (DONE). Driven response by response rather than through
/// async-imap's IDLE handle, which hands an EXISTS sent while IDLE starts
/// to a side channel: that is precisely the mail that came in between.
/// `selected` is the mailbox an EXISTS speaks of.
async fn idle_until(
    session: &mut ImapSession,
    (io, server): (Duration, &str),
    selected: Option<&str>,
    until: Instant,
    stop: &mut Shutdown,
) -> Result<Wake, JobError> {
    imap::sent("IDLE");
    let tag = bounded(io, server, "IDLE", session.run_command("IDLE")).await?;
    let mut news = News::default();
    // Up to the server's "+ idling".
    loop {
        match next(session, io, server, "IDLE", &tag).await? {
            Seen::Continue => break,
            // Refused (or ended at once): no IDLE here after all.
            Seen::Tagged(r) => {
                let why = r.err().unwrap_or_else(|| "ended before it began".into());
                return Err(broken(server, "IDLE", why));
            }
            Seen::Event(e) => news.note(&e, selected),
            Seen::Other => {}
        }
    }
    let mut wake = loop {
        if !news.is_empty() {
            break Wake::News(std::mem::take(&mut news));
        }
        tokio::select! {
            r = session.read_response() => match r {
                Ok(Some(resp)) => match classify(resp.parsed(), &tag) {
                    Seen::Event(e) => news.note(&e, selected),
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
    };
    bounded(io, server, "DONE", session.run_command_untagged("DONE")).await?;
    loop {
        match next(session, io, server, "DONE", &tag).await? {
            Seen::Tagged(Ok(())) => break,
            Seen::Tagged(Err(why)) => return Err(broken(server, "DONE", why)),
            Seen::Event(e) => news.note(&e, selected),
            _ => {}
        }
    }
    if !news.is_empty() {
        wake = match wake {
            Wake::News(mut n) => {
                n.merge(news);
                Wake::News(n)
            }
            Wake::Timer => Wake::News(news),
            // Stopping: the next holder syncs every folder when it opens.
            Wake::Stop => Wake::Stop,
        };
    }
    Ok(wake)
}

/// What one response during IDLE says.
enum Seen {
    /// `+ idling`.
    Continue,
    /// The tagged end of the IDLE command, with the server's text if not OK.
    Tagged(Result<(), String>),
    /// New mail, or a folder created, renamed or deleted.
    Event(Event),
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
        r => notify::event(r).map_or(Seen::Other, Seen::Event),
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

/// Sync `target` over the session, in one of the worker's job slots; and
/// which folders its answers said changed meanwhile (see [`imap::news`]).
/// With NOTIFY the folder is left afterwards (no mailbox selected: every
/// change is then a `* STATUS`), inside the same watch so that mail
/// announced before it is left is not missed.
async fn push_sync(
    ctx: &Ctx,
    key: Key,
    slots: &Arc<Semaphore>,
    c: &mut Conn,
    (target, notifying): (&Target, bool),
    stop: &mut Shutdown,
) -> (Ended, News) {
    let _slot = tokio::select! {
        p = slots.clone().acquire_owned() => p,
        _ = stop.wait() => return (Ended::Busy, News::default()),
    };
    let req = SyncRequest {
        user_id: key.0,
        identity_id: key.1,
        password: String::new(),
    };
    let watch = news::Watch::new();
    let sync = async {
        let scope = Scope {
            only: target.only(),
            held: Some((&mut c.session, &c.info)),
            qresync_on: c.qresync_on,
        };
        // Boxed: the sync's state (tens of KiB) then lives only while it
        // runs, not in every idle session's task (see docs/performance.md).
        let ended = Box::pin(job::sync_scoped(ctx, req, Counters::new(), scope))
            .await
            .1;
        if notifying && ended != Ended::Busy {
            unselect(c, stop).await;
        }
        ended
    };
    let ended = news::watched(watch.clone(), sync).await;
    let mut news = watch.news();
    // Without NOTIFY, INBOX stays selected: an EXISTS set aside is INBOX's.
    let selected = (!notifying).then_some("INBOX");
    news.merge(notify::drain(&mut c.session, selected));
    (ended, news)
}

/// Leave the mailbox a sync opened (UNSELECT, else CLOSE, harmless on a
/// mailbox opened read-only). A failure is left to the next IDLE to find.
async fn unselect(c: &mut Conn, stop: &Shutdown) {
    let cmd = if c.info.caps.unselect {
        "UNSELECT"
    } else {
        "CLOSE"
    };
    imap::sent(if c.info.caps.unselect {
        "UNSELECT"
    } else {
        "OTHER"
    });
    let mut reader = Reader::new(
        &mut c.session,
        &c.acc.server,
        c.acc.io_timeout,
        stop.clone(),
    );
    if let Err(e) = reader.command(cmd, |_| {}).await {
        tracing::debug!(error = %e, "leaving the mailbox failed");
    }
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
    /// release builds alike), now ~4.7 KiB with NOTIFY; see docs/performance.md.
    #[test]
    fn an_idle_session_future_stays_small() {
        let size = future_size(watch);
        assert!(size <= 8 * 1024, "watch future: {size} bytes");
    }
}
