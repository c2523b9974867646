//! `deliver`: send a draft through the SMTP sender, then file it in the
//! remote Sent mailbox (CONTRACT §5). Not implemented yet: the order is
//! answered with the contract's failure shape so no requester hangs.

use crate::bus::wire::{DeliveryReply, ImapOrder};
use crate::bus::Message;
use crate::worker::context::Ctx;

pub async fn handle(ctx: &Ctx, msg: &Message, order: ImapOrder) {
    let text = "deliver is not supported yet by caliopen-imap";
    tracing::warn!(subject = %msg.subject, user = %order.user_id, message = %order.message_id, "{text}");
    let rep = DeliveryReply {
        error: true,
        message: format!("failed to handle order with error « {text} » "),
    };
    ctx.bus.reply(msg, &rep).await;
}
