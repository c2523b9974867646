//! `test`: log that the order arrived (a liveness check of the bus).

use crate::bus::wire::{orders, ImapOrder, JobReport};
use crate::bus::Message;
use crate::worker::context::Ctx;

pub async fn handle(ctx: &Ctx, msg: &Message, order: ImapOrder) {
    tracing::info!(subject = %msg.subject, worker = %ctx.worker_id, user = %order.user_id, "test order received");
    let rep = JobReport {
        order: orders::TEST.into(),
        user_id: order.user_id,
        identity_id: order.identity_id,
        ok: true,
        ..Default::default()
    };
    ctx.bus.reply(msg, &rep).await;
}
