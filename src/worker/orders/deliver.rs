//! `deliver`: send a draft through Caliopen's SMTP sender, then, for a
//! remote identity, file a copy in the remote Sent mailbox (CONTRACT §5).
//!
//! The SMTP sender's reply is forwarded to the requester. Any failure on
//! the way answers the contract's shape:
//! `{"error": true, "message": "failed to handle order with error « … » "}`.
//!
//! Such an error makes the requester send the order again. So a message
//! the sender sent is recorded at once (`imap_sent_message`, see
//! `store/sent.rs`): the retry of a message whose copy in Sent failed only
//! files that copy, and answers the sender's first reply.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::time::Instant;
use uuid::Uuid;

use crate::bus::wire::{DeliveryReply, ImapOrder};
use crate::bus::Message;
use crate::imap::{self, ImapSession};
use crate::store::identity::TYPE_REMOTE;
use crate::worker::account;
use crate::worker::context::Ctx;

/// The SMTP sender's timeout (CONTRACT §5).
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the requester of a `deliver` waits for its answer (CONTRACT
/// §5). An order that waited longer for a free slot is not carried out: its
/// requester has given up, and may send it again, so sending it now could
/// send the message twice.
pub const REQUESTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The three ids a `deliver` names.
#[derive(Debug, Clone, Copy)]
pub struct DeliverRequest {
    pub user: Uuid,
    pub identity: Uuid,
    pub message: Uuid,
}

pub(super) fn parse(o: &ImapOrder) -> Result<DeliverRequest, String> {
    Ok(DeliverRequest {
        user: super::uuid_field("user_id", &o.user_id)?,
        identity: super::uuid_field("identity_id", &o.identity_id)?,
        message: super::uuid_field("message_id", &o.message_id)?,
    })
}

/// `received` is when the order was read from NATS.
pub async fn handle(ctx: &Ctx, msg: &Message, req: DeliverRequest, received: Instant) {
    if let Err(e) = still_wanted(received, Instant::now()) {
        tracing::warn!(subject = %msg.subject, user = %req.user, message = %req.message, error = %e, "deliver not carried out");
        reply_failure(ctx, msg, &e).await;
        return;
    }
    let reply = match deliver(ctx, msg, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, user = %req.user, message = %req.message, error = %e, "deliver failed");
            DeliveryReply {
                error: true,
                message: format!("failed to handle order with error « {e} » "),
            }
        }
    };
    ctx.bus.reply(msg, &reply).await;
}

/// A `deliver` with a missing or bad id: answered in the contract's
/// failure shape, unless its requester has given up already (then that is
/// what is said, as for a valid order).
pub(super) async fn refuse(ctx: &Ctx, msg: &Message, why: &str, received: Instant) {
    if let Err(e) = still_wanted(received, Instant::now()) {
        tracing::warn!(subject = %msg.subject, error = %e, "deliver not carried out");
        reply_failure(ctx, msg, &e).await;
        return;
    }
    tracing::warn!(subject = %msg.subject, error = %why, "deliver failed");
    reply_failure(ctx, msg, why).await;
}

/// Answer the contract's failure shape.
pub(crate) async fn reply_failure(ctx: &Ctx, msg: &Message, why: &str) {
    let reply = DeliveryReply {
        error: true,
        message: format!("failed to handle order with error « {why} » "),
    };
    ctx.bus.reply(msg, &reply).await;
}

/// Is the requester of an order received at `received` still waiting at `now`?
fn still_wanted(received: Instant, now: Instant) -> Result<(), String> {
    let waited = now.saturating_duration_since(received);
    if waited > REQUESTER_TIMEOUT {
        return Err(format!(
            "not sent: the order waited {} s for a free slot, longer than its requester waits ({} s)",
            waited.as_secs(),
            REQUESTER_TIMEOUT.as_secs()
        ));
    }
    Ok(())
}

/// Send the message (unless an earlier order of it did), then file its
/// copy in Sent (unless done already). Once the sender said "sent", the
/// answer is never an error that a retry would turn into a second send
/// unless that is recorded.
async fn deliver(ctx: &Ctx, msg: &Message, req: DeliverRequest) -> Result<DeliveryReply, String> {
    let DeliverRequest { user, message, .. } = req;
    let earlier = ctx
        .store
        .sent_message(user, message)
        .await
        .map_err(|e| e.to_string())?;
    let (reply, recorded) = match earlier {
        Some(sent) if sent.filed => {
            tracing::info!(user = %user, message = %message, "deliver of a message sent and filed already: nothing to do");
            return Ok(sent_reply(sent.reply));
        }
        Some(sent) => {
            tracing::info!(user = %user, message = %message, "deliver of a message sent already: filing its copy only");
            (sent_reply(sent.reply), true)
        }
        None => {
            let reply = send(ctx, msg).await?;
            if reply.error {
                return Ok(reply);
            }
            let recorded = match ctx.store.record_sent(user, message, &reply.message).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(user = %user, message = %message, error = %e, "sent, but cannot record it");
                    false
                }
            };
            (reply, recorded)
        }
    };
    match file_copy(ctx, req).await {
        Ok(()) => {
            if let Err(e) = ctx.store.record_filed(user, message).await {
                // A retry would file a second copy, never send again.
                tracing::warn!(user = %user, message = %message, error = %e, "filed, but cannot record it");
            }
            Ok(reply)
        }
        Err(e) if recorded => Err(e),
        Err(e) => {
            // An error would make the requester send it again, unrecorded.
            tracing::error!(user = %user, message = %message, error = %e, "sent, but its copy in Sent failed and the send could not be recorded: answering the sender's reply");
            Ok(reply)
        }
    }
}

fn sent_reply(message: String) -> DeliveryReply {
    DeliveryReply {
        error: false,
        message,
    }
}

/// The order goes as it came to Caliopen's SMTP sender; its answer.
async fn send(ctx: &Ctx, msg: &Message) -> Result<DeliveryReply, String> {
    let topic = &ctx.settings.lda.out_topic;
    if topic.is_empty() {
        return Err("LDAConfig.out_topic is empty: no SMTP sender to deliver through".into());
    }
    let sent = ctx
        .bus
        .request_raw(topic, msg.payload.clone(), SMTP_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&sent.payload)
        .map_err(|e| format!("bad reply from the SMTP sender: {e}"))
}

/// For a remote identity, APPEND the sent message to its Sent mailbox.
async fn file_copy(ctx: &Ctx, req: DeliverRequest) -> Result<(), String> {
    let DeliverRequest {
        user,
        identity,
        message,
    } = req;
    let Some(mut id) = ctx
        .store
        .identity(user, identity)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(()); // sent; no identity to file it for
    };
    if id.kind != TYPE_REMOTE {
        return Ok(());
    }
    let (raw_id, date) = ctx
        .store
        .message_raw(user, message)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no message {message} for user {user}"))?;
    let raw_id = raw_id.ok_or_else(|| format!("message {message} has no raw message"))?;
    // Caliopen keeps a large one in the object store, the row holding its uri.
    let raw = ctx
        .load_raw_message(raw_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("raw message {raw_id} not found"))?;

    // An expired OAuth2 token is refreshed first, as a sync does.
    account::ensure_fresh_token(ctx, &mut id)
        .await
        .map_err(|e| e.0)?;
    let acc = account::from_identity(ctx, &id, "").map_err(|e| e.0)?;
    let (mut session, _) = imap::connect(&acc).await.map_err(|e| e.to_string())?;
    let filed = file_in_sent(
        &mut session,
        &raw,
        date.unwrap_or_else(Utc::now),
        acc.io_timeout,
    )
    .await;
    crate::worker::job::logout(&mut session, &acc).await;
    filed?;
    tracing::info!(user = %user, message = %message, "sent message filed in the remote Sent mailbox");
    Ok(())
}

/// APPEND `raw` to the Sent mailbox: the one with the `\Sent` special use,
/// else the first whose name contains "Sent".
async fn file_in_sent(
    session: &mut ImapSession,
    raw: &[u8],
    date: DateTime<Utc>,
    io: Duration,
) -> Result<(), String> {
    use async_imap::imap_proto::NameAttribute;
    let mut special = None;
    let mut by_name = None;
    {
        crate::imap::sent("LIST");
        let mut names = tokio::time::timeout(io, session.list(Some(""), Some("*")))
            .await
            .map_err(|_| "LIST timed out".to_string())?
            .map_err(|e| format!("LIST: {e}"))?;
        while let Some(n) = tokio::time::timeout(io, names.next())
            .await
            .map_err(|_| "LIST timed out".to_string())?
        {
            let n = n.map_err(|e| format!("LIST: {e}"))?;
            if n.attributes()
                .iter()
                .any(|a| matches!(a, NameAttribute::Sent))
            {
                special.get_or_insert_with(|| n.name().to_string());
            } else if n.name().contains("Sent") {
                by_name.get_or_insert_with(|| n.name().to_string());
            }
        }
    }
    let mailbox = special
        .or(by_name)
        .ok_or("the remote account has no Sent mailbox")?;
    let when = format!("\"{}\"", date.format("%d-%b-%Y %H:%M:%S +0000"));
    crate::imap::sent("APPEND");
    tokio::time::timeout(
        io,
        session.append(&mailbox, Some("(\\Seen)"), Some(&when), raw),
    )
    .await
    .map_err(|_| "APPEND timed out".to_string())?
    .map_err(|e| format!("APPEND to {mailbox}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_whose_requester_gave_up_is_not_carried_out() {
        let received = Instant::now();
        assert!(still_wanted(received, received).is_ok());
        assert!(still_wanted(received, received + REQUESTER_TIMEOUT).is_ok());
        let e = still_wanted(
            received,
            received + REQUESTER_TIMEOUT + Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.contains("not sent") && e.contains("31 s"), "{e}");
    }
}
