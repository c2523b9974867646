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
use super::job::{FullFetchRequest, SyncRequest};
use crate::bus::wire::{orders as names, ImapOrder, Job, JobReport};
use crate::bus::Message;

/// Header asking for progress reports on the reply subject.
pub const PROGRESS_HEADER: &str = "Caliopen-Imap-Progress";

/// One order, read once from its JSON into the type its handler acts on,
/// as mini-redis's `Command::from_frame` turns a frame into one command.
/// The wire shape stays the flat [`ImapOrder`] (CONTRACT §2): its `order`
/// field names the variant, and only that variant's fields are read.
#[derive(Debug)]
pub enum Order {
    Sync(SyncRequest),
    FullFetch(FullFetchRequest),
    Deliver(deliver::DeliverRequest),
    /// `test` only logs what it got, so it keeps the order as it came.
    Test(ImapOrder),
    /// A reply body of the poller that may land on the order subject.
    NoPendingJob,
}

/// An order refused before anything ran. Its `Display` is the text of the
/// error reply and of the log line.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not the JSON of an order.
    #[error("unable to unmarshal order: {0}")]
    Unparsable(serde_json::Error),
    /// An order name no worker knows; the reply echoes it.
    #[error("unknown order {0:?}")]
    Unknown(String),
    /// A known order with a missing or bad field; answered in the shape of
    /// that order's replies.
    #[error("{reason}")]
    BadFields { order: &'static str, reason: String },
}

impl Order {
    /// Read an order from the payload of a message on the order subject.
    pub fn from_json(payload: &[u8]) -> Result<Order, Refused> {
        let order: ImapOrder = serde_json::from_slice(payload).map_err(Refused::Unparsable)?;
        Order::parse(order)
    }

    /// Check the fields the named order needs and keep them typed.
    pub fn parse(o: ImapOrder) -> Result<Order, Refused> {
        let bad = |order| move |reason| Refused::BadFields { order, reason };
        match o.order.as_str() {
            names::SYNC => sync::parse(&o).map(Order::Sync).map_err(bad(names::SYNC)),
            names::FULLFETCH => fullfetch::parse(&o)
                .map(Order::FullFetch)
                .map_err(bad(names::FULLFETCH)),
            names::DELIVER => deliver::parse(&o)
                .map(Order::Deliver)
                .map_err(bad(names::DELIVER)),
            names::TEST => Ok(Order::Test(o)),
            names::NO_PENDING_JOB => Ok(Order::NoPendingJob),
            _ => Err(Refused::Unknown(o.order)),
        }
    }

    /// `deliver` has slots of its own (see `worker::serve`).
    pub fn is_deliver(parsed: &Result<Order, Refused>) -> bool {
        matches!(
            parsed,
            Ok(Order::Deliver(_))
                | Err(Refused::BadFields {
                    order: names::DELIVER,
                    ..
                })
        )
    }
}

/// Handle one message of the order subject, read as `parsed`, `received`
/// at that instant.
pub async fn handle(
    ctx: &Ctx,
    msg: &Message,
    parsed: Result<Order, Refused>,
    received: tokio::time::Instant,
) {
    match parsed {
        Ok(Order::Sync(req)) => sync::handle(ctx, msg, req).await,
        Ok(Order::FullFetch(req)) => fullfetch::handle(ctx, msg, req).await,
        Ok(Order::Deliver(req)) => deliver::handle(ctx, msg, req, received).await,
        Ok(Order::Test(order)) => test::handle(ctx, msg, order).await,
        Ok(Order::NoPendingJob) => {}
        Err(refused) => refuse(ctx, msg, refused, received).await,
    }
}

/// Log a refused order with its subject and answer it, when it came as a
/// request, in the shape its requester reads.
async fn refuse(ctx: &Ctx, msg: &Message, refused: Refused, received: tokio::time::Instant) {
    let text = refused.to_string();
    match &refused {
        Refused::Unparsable(_) => {
            tracing::warn!(subject = %msg.subject, error = %text, "bad order");
            reply_error(ctx, msg, "", &text).await;
        }
        Refused::Unknown(name) => {
            tracing::warn!(subject = %msg.subject, error = %text, "bad order");
            reply_error(ctx, msg, name, &text).await;
        }
        Refused::BadFields {
            order: names::DELIVER,
            ..
        } => deliver::refuse(ctx, msg, &text, received).await,
        Refused::BadFields { order, .. } => {
            tracing::warn!(subject = %msg.subject, error = %text, "bad {order} order");
            reply_error(ctx, msg, order, &text).await;
        }
    }
}

/// Check an order's fields the way its handler does before acting, and do
/// nothing else: the entry point of the order fuzzer (`fuzz/`), so the
/// checks it exercises are the handlers' own.
pub fn validate(order: &ImapOrder) -> Result<(), String> {
    Order::parse(order.clone())
        .map(drop)
        .map_err(|r| r.to_string())
}

/// Run a job pulled from the poller (no one waits for its report).
pub async fn run_pulled(ctx: &Ctx, job: Job) {
    let order = ImapOrder {
        order: job.order,
        user_id: job.user_id,
        identity_id: job.identity_id,
        ..Default::default()
    };
    match sync::parse(&order) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(json: &str) -> String {
        Order::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn each_order_is_read_once_into_its_own_type() {
        let u = "00000000-0000-0000-0000-000000000001";
        let sync = format!(r#"{{"order":"sync","user_id":"{u}","identity_id":"{u}"}}"#);
        assert!(matches!(
            Order::from_json(sync.as_bytes()),
            Ok(Order::Sync(_))
        ));
        let ff = format!(
            r#"{{"order":"fullfetch","user_id":"{u}","server":"h:993","login":"a","password":"p"}}"#
        );
        match Order::from_json(ff.as_bytes()) {
            Ok(Order::FullFetch(r)) => assert_eq!(r.mailbox, "INBOX"),
            other => panic!("{other:?}"),
        }
        let d = format!(
            r#"{{"order":"deliver","user_id":"{u}","identity_id":"{u}","message_id":"{u}"}}"#
        );
        let d = Order::from_json(d.as_bytes());
        assert!(matches!(d, Ok(Order::Deliver(_))) && Order::is_deliver(&d));
        assert!(matches!(
            Order::from_json(br#"{"order":"test"}"#),
            Ok(Order::Test(_))
        ));
        assert!(matches!(
            Order::from_json(br#"{"order":"no pending job"}"#),
            Ok(Order::NoPendingJob)
        ));
    }

    #[test]
    fn refusals_keep_their_reply_text() {
        assert_eq!(refused(r#"{"order":"dance"}"#), r#"unknown order "dance""#);
        assert_eq!(refused("{}"), r#"unknown order """#);
        assert!(refused("{").starts_with("unable to unmarshal order: "));
        assert_eq!(refused(r#"{"order":"sync"}"#), "missing user_id");
        assert_eq!(
            refused(r#"{"order":"sync","user_id":"x"}"#),
            r#"user_id is not a UUID: "x""#
        );
        let bad_deliver = Order::from_json(br#"{"order":"deliver"}"#);
        assert!(Order::is_deliver(&bad_deliver));
        assert_eq!(bad_deliver.unwrap_err().to_string(), "missing user_id");
        assert!(!Order::is_deliver(&Order::from_json(b"{")));
    }
}
