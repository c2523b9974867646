//! One job from start to end: a sync of a stored identity (lock, connect,
//! every mailbox, state written back, lock released) or a fullfetch (the
//! same pipeline, no state). Failures are recorded on the identity as
//! CONTRACT §4 says, and every path releases the lock it took.

use std::collections::HashMap;
use std::sync::Arc;

// Dates in infos are written as Go's time.RFC3339 does: seconds, `Z`.
use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use super::account::{self, AccountError};
use super::checkpoint;
use super::context::{Counters, Ctx};
use super::pipeline::{sync_mailbox, MailboxJob};
use super::JobError;
use crate::bus::wire::{orders, CacheOrder, JobReport};
use crate::imap::{self, Account, ImapSession};
use crate::store::identity::{infos, Identity, PROTOCOL_EMAIL, STATUS_INACTIVE};
use crate::store::raw_message::fullfetch_identity;

/// A `sync` order, validated.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub user_id: Uuid,
    pub identity_id: Uuid,
    /// Overrides the stored password for this run only (not logged).
    pub password: String,
}

/// A `fullfetch` order, validated.
#[derive(Clone)]
pub struct FullFetchRequest {
    pub user_id: Uuid,
    pub server: String,
    pub login: String,
    pub password: String,
    pub mailbox: String,
}

fn report(order: &str, user: Uuid, identity: Uuid) -> JobReport {
    JobReport {
        order: order.to_string(),
        user_id: user.to_string(),
        identity_id: identity.to_string(),
        ..Default::default()
    }
}

/// Sync a stored identity. Never panics on bad data: every problem ends up
/// in the report (and, when it concerns the account, on the identity).
pub async fn sync_identity(ctx: &Ctx, req: SyncRequest, counters: Arc<Counters>) -> JobReport {
    let mut rep = report(orders::SYNC, req.user_id, req.identity_id);
    let result = sync_locked(ctx, &req, &counters, &mut rep).await;
    counters.fill(&mut rep);
    match result {
        Ok(()) => rep.ok = rep.failed == 0,
        Err(e) => {
            rep.ok = false;
            rep.error = e.to_string();
        }
    }
    if rep.ok {
        tracing::info!(user = %req.user_id, identity = %req.identity_id, fetched = rep.fetched,
            handed_off = rep.handed_off, "sync done");
    } else {
        tracing::warn!(user = %req.user_id, identity = %req.identity_id, fetched = rep.fetched,
            handed_off = rep.handed_off, failed = rep.failed, error = %rep.error, "sync ended with errors");
    }
    rep
}

async fn sync_locked(
    ctx: &Ctx,
    req: &SyncRequest,
    counters: &Arc<Counters>,
    rep: &mut JobReport,
) -> Result<(), JobError> {
    let store = &ctx.store;
    let id = store
        .identity(req.user_id, req.identity_id)
        .await?
        .ok_or_else(|| {
            JobError::NotFound(format!(
                "no identity {} for user {}",
                req.identity_id, req.user_id
            ))
        })?;
    if !id.is_remote_email() {
        return Err(JobError::NotFound(format!(
            "identity {} is not a remote email identity (type {:?}, protocol {:?})",
            id.identity_id, id.kind, id.protocol
        )));
    }
    rep.mailboxes = id.mailboxes();

    // Caliopen's own marker first (a Go worker may still be running).
    let ttl = ctx.settings.imap.lock_ttl_secs;
    if let Some(since) = parse_time(id.info(infos::SYNCING)) {
        let age = Utc::now().signed_duration_since(since);
        if age.num_seconds() >= 0 && (age.num_seconds() as u64) < ttl {
            return Err(JobError::Busy(format!(
                "a sync of this identity is already running (since {})",
                since.to_rfc3339_opts(SecondsFormat::Secs, true)
            )));
        }
    }
    let now = Utc::now();
    if !store
        .take_sync_lock(id.user_id, id.identity_id, &ctx.worker_id, now, ttl)
        .await?
    {
        return Err(JobError::Busy(
            "a sync of this identity is already running on another worker".into(),
        ));
    }
    store
        .merge_infos(
            id.user_id,
            id.identity_id,
            HashMap::from([(
                infos::SYNCING.to_string(),
                now.to_rfc3339_opts(SecondsFormat::Secs, true),
            )]),
        )
        .await?;

    let key = (id.user_id, id.identity_id);
    ctx.note_lock(key, true);
    let result = sync_identity_inner(ctx, &id, &req.password, counters).await;

    // Whatever happened: the time of this attempt, the error if any, the lock.
    let _ = store
        .set_last_check(id.user_id, id.identity_id, Utc::now())
        .await;
    match &result {
        Ok(()) => {
            let _ = clear_errors(ctx, &id).await;
        }
        Err(e) => {
            if let Err(e2) = record_error(ctx, &id, e).await {
                tracing::error!(error = %e2, "cannot record the sync error on the identity");
            }
        }
    }
    if let Err(e) = ctx.release_lock(key).await {
        tracing::error!(identity = %id.identity_id, error = %e, "cannot release the sync lock");
    }
    result
}

async fn sync_identity_inner(
    ctx: &Ctx,
    id: &Identity,
    password: &str,
    counters: &Arc<Counters>,
) -> Result<(), JobError> {
    let mut id = id.clone();
    account::ensure_fresh_token(ctx, &mut id)
        .await
        .map_err(|AccountError(e)| JobError::Account(e))?;
    let id = &id;
    let acc = account::from_identity(ctx, id, password)
        .map_err(|AccountError(e)| JobError::Account(e))?;
    let (mut session, conn) = imap::connect(&acc).await?;
    let display = if id.display_name.is_empty() {
        id.identifier.as_str()
    } else {
        id.display_name.as_str()
    };
    let mut result = Ok(());
    for mailbox in id.mailboxes() {
        if ctx.shutdown.is_triggered() {
            break;
        }
        let state = checkpoint::load(ctx, id, &mailbox).await?;
        let job = MailboxJob {
            ctx,
            user_id: id.user_id,
            identity_id: id.identity_id,
            display_name: display,
            server: &acc.server,
            conn: &conn,
            mailbox: &mailbox,
            state: Some(state),
            counters,
        };
        if let Err(e) = sync_mailbox(&job, &mut session).await {
            result = Err(e);
            break;
        }
    }
    logout(&mut session, &acc).await;
    if result.is_ok() && !ctx.shutdown.is_triggered() {
        ctx.store
            .merge_infos(
                id.user_id,
                id.identity_id,
                HashMap::from([(
                    infos::LASTSYNC.to_string(),
                    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
                )]),
            )
            .await?;
    }
    result
}

/// Fetch a whole mailbox into a user's account, keeping no state.
pub async fn fullfetch(ctx: &Ctx, req: FullFetchRequest, counters: Arc<Counters>) -> JobReport {
    let identity_id = fullfetch_identity(&req.server, &req.login);
    let mut rep = report(orders::FULLFETCH, req.user_id, identity_id);
    rep.mailboxes = vec![req.mailbox.clone()];
    let result = async {
        let acc = account::from_order(ctx, &req.server, &req.login, &req.password)
            .map_err(|AccountError(e)| JobError::Account(e))?;
        let (mut session, conn) = imap::connect(&acc).await?;
        let job = MailboxJob {
            ctx,
            user_id: req.user_id,
            identity_id,
            display_name: &req.login,
            server: &acc.server,
            conn: &conn,
            mailbox: &req.mailbox,
            state: None,
            counters: &counters,
        };
        let r = sync_mailbox(&job, &mut session).await;
        logout(&mut session, &acc).await;
        r
    }
    .await;
    counters.fill(&mut rep);
    match result {
        Ok(()) => rep.ok = rep.failed == 0,
        Err(e) => rep.error = e.to_string(),
    }
    tracing::info!(user = %req.user_id, server = %req.server, fetched = rep.fetched,
        handed_off = rep.handed_off, failed = rep.failed, error = %rep.error, "fullfetch done");
    rep
}

/// LOGOUT, politely and briefly: the work is done whatever it answers.
pub(crate) async fn logout(session: &mut ImapSession, acc: &Account) {
    let _ = tokio::time::timeout(
        acc.io_timeout.min(std::time::Duration::from_secs(5)),
        session.logout(),
    )
    .await;
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// Record a failed sync on the identity (CONTRACT §4 step 6). Failures of the
/// remote account count towards disabling it; ours (store, bus) do not.
async fn record_error(ctx: &Ctx, id: &Identity, err: &JobError) -> Result<(), JobError> {
    if matches!(err, JobError::Busy(_) | JobError::NotFound(_)) {
        return Ok(());
    }
    let now = Utc::now();
    let line = err.to_string();
    let mut entries = HashMap::from([
        (infos::LAST_FETCH_ERROR.to_string(), line),
        (
            infos::LAST_ERROR_DATE.to_string(),
            now.to_rfc3339_opts(SecondsFormat::Secs, true),
        ),
    ]);
    if err.counts_against_account() {
        let count = id
            .info(infos::ERRORS_COUNT)
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            + 1;
        entries.insert(infos::ERRORS_COUNT.to_string(), count.to_string());
        let first = parse_time(id.info(infos::FIRST_ERROR_DATE)).unwrap_or(now);
        entries.insert(
            infos::FIRST_ERROR_DATE.to_string(),
            first.to_rfc3339_opts(SecondsFormat::Secs, true),
        );
        ctx.store
            .merge_infos(id.user_id, id.identity_id, entries)
            .await?;
        let lasting = now.signed_duration_since(first).num_seconds();
        if lasting > ctx.settings.imap.disable_after_secs as i64 {
            tracing::warn!(identity = %id.identity_id, since = %first.to_rfc3339_opts(SecondsFormat::Secs, true),
                "identity failing for too long: disabling it");
            ctx.store
                .set_status(id.user_id, id.identity_id, STATUS_INACTIVE)
                .await?;
            let order = CacheOrder {
                identity_id: id.identity_id.to_string(),
                order: orders::CACHE_DELETE.into(),
                order_param: String::new(),
                protocol: PROTOCOL_EMAIL.into(),
                user_id: id.user_id.to_string(),
            };
            ctx.bus
                .publish(&ctx.settings.nats_topic_poller_cache, &order)
                .await
                .map_err(JobError::Bus)?;
        }
    } else {
        ctx.store
            .merge_infos(id.user_id, id.identity_id, entries)
            .await?;
    }
    Ok(())
}

async fn clear_errors(ctx: &Ctx, id: &Identity) -> Result<(), JobError> {
    let keys = [
        infos::LAST_FETCH_ERROR,
        infos::ERRORS_COUNT,
        infos::FIRST_ERROR_DATE,
        infos::LAST_ERROR_DATE,
    ];
    if keys.iter().any(|k| id.infos.contains_key(*k)) {
        ctx.store
            .remove_infos(id.user_id, id.identity_id, &keys)
            .await?;
    }
    Ok(())
}
