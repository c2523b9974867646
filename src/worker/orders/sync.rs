//! `sync`: sync a stored remote identity.

use crate::bus::wire::{orders, ImapOrder, JobReport};
use crate::bus::Message;
use crate::worker::context::Ctx;
use crate::worker::job::{self, SyncRequest};

pub fn parse(o: &ImapOrder) -> Result<SyncRequest, String> {
    Ok(SyncRequest {
        user_id: super::uuid_field("user_id", &o.user_id)?,
        identity_id: super::uuid_field("identity_id", &o.identity_id)?,
        password: o.password.clone(),
    })
}

pub async fn handle(ctx: &Ctx, msg: &Message, req: SyncRequest) {
    tracing::info!(user = %req.user_id, identity = %req.identity_id, "sync order");
    let base = JobReport {
        order: orders::SYNC.into(),
        user_id: req.user_id.to_string(),
        identity_id: req.identity_id.to_string(),
        ..Default::default()
    };
    super::run_with_reports(ctx, msg, base, |c| job::sync_identity(ctx, req, c)).await;
}
