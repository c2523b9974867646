//! Orders received on `nats_topic_sender`, one file per order.
//!
//! Bad input never kills the worker: malformed JSON, missing fields, bad
//! UUIDs and unknown orders are logged with the subject and, when the order
//! came as a request, answered with an error. Long jobs that came as a
//! request answer with a [`JobReport`] when they end; if the request carries
//! the [`PROGRESS_HEADER`] header (imapctl --wait does), progress reports
//! (`"progress": true`) are sent to the same reply subject while it runs.

pub(crate) mod deliver;
mod fullfetch;
mod sync;
mod test;

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::context::{Counters, Ctx};
use crate::bus::wire::{orders as names, ImapOrder, Job, JobReport};
use crate::bus::Message;

/// Header asking for progress reports on the reply subject.
pub const PROGRESS_HEADER: &str = "Caliopen-Imap-Progress";

/// Handle one message of the order subject, `received` at that instant.
pub async fn handle(ctx: &Ctx, msg: Message, received: tokio::time::Instant) {
    let subject = msg.subject.to_string();
    let order: ImapOrder = match serde_json::from_slice(&msg.payload) {
        Ok(o) => o,
        Err(e) => {
            let text = format!("unable to unmarshal order: {e}");
            tracing::warn!(subject = %subject, error = %text, "bad order");
            reply_error(ctx, &msg, "", &text).await;
            return;
        }
    };
    match order.order.as_str() {
        names::SYNC => sync::handle(ctx, &msg, order).await,
        names::FULLFETCH => fullfetch::handle(ctx, &msg, order).await,
        names::DELIVER => deliver::handle(ctx, &msg, order, received).await,
        names::TEST => test::handle(ctx, &msg, order).await,
        // A reply body of the poller that may land here: nothing to do.
        names::NO_PENDING_JOB => {}
        other => {
            let text = format!("unknown order {other:?}");
            tracing::warn!(subject = %subject, error = %text, "bad order");
            reply_error(ctx, &msg, other, &text).await;
        }
    }
}

/// Check an order's fields the way its handler does before acting, and do
/// nothing else: the entry point of the order fuzzer (`fuzz/`), so the
/// checks it exercises are the handlers' own.
pub fn validate(order: &ImapOrder) -> Result<(), String> {
    match order.order.as_str() {
        names::SYNC => sync::validate(order).map(drop),
        names::FULLFETCH => fullfetch::validate(order).map(drop),
        // deliver checks these three first (deliver.rs), then talks to NATS.
        names::DELIVER => {
            uuid_field("user_id", &order.user_id)?;
            uuid_field("identity_id", &order.identity_id)?;
            uuid_field("message_id", &order.message_id).map(drop)
        }
        names::TEST | names::NO_PENDING_JOB => Ok(()),
        other => Err(format!("unknown order {other:?}")),
    }
}

/// Run a job pulled from the poller (no one waits for its report).
pub async fn run_pulled(ctx: &Ctx, job: Job) {
    let order = ImapOrder {
        order: job.order,
        user_id: job.user_id,
        identity_id: job.identity_id,
        ..Default::default()
    };
    match sync::validate(&order) {
        Ok(req) => {
            let _ = super::job::sync_identity(ctx, req, Counters::new()).await;
        }
        Err(e) => {
            tracing::warn!(subject = %ctx.settings.nats_topic_poller, error = %e, "bad job from the poller")
        }
    }
}

/// Parse a UUID field, naming it in the error.
pub(super) fn uuid_field(name: &str, value: &str) -> Result<Uuid, String> {
    if value.trim().is_empty() {
        return Err(format!("missing {name}"));
    }
    Uuid::parse_str(value.trim()).map_err(|_| format!("{name} is not a UUID: {value:?}"))
}

/// Did the requester ask for progress reports?
pub fn wants_progress(msg: &Message) -> bool {
    msg.reply.is_some()
        && msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(PROGRESS_HEADER).is_some())
}

pub(crate) async fn reply_error(ctx: &Ctx, msg: &Message, order: &str, text: &str) {
    let rep = JobReport {
        order: order.to_string(),
        ok: false,
        error: text.to_string(),
        ..Default::default()
    };
    ctx.bus.reply(msg, &rep).await;
}

/// Run a job; while it runs, send progress reports if asked; then the final
/// report if the order was a request.
pub(super) async fn run_with_reports<F, Fut>(ctx: &Ctx, msg: &Message, base: JobReport, job: F)
where
    F: FnOnce(Arc<Counters>) -> Fut,
    Fut: std::future::Future<Output = JobReport>,
{
    let counters = Counters::new();
    let wants_progress = wants_progress(msg);
    let work = job(counters.clone());
    let rep = if wants_progress {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                rep = &mut work => break rep,
                _ = tick.tick() => {
                    let mut p = base.clone();
                    p.progress = true;
                    counters.fill(&mut p);
                    ctx.bus.reply(msg, &p).await;
                }
            }
        }
    } else {
        work.await
    };
    ctx.bus.reply(msg, &rep).await;
}
