//! `fullfetch`: fetch every message of a mailbox into a user's account,
//! keeping no sync state.

use crate::bus::wire::{orders, ImapOrder, JobReport};
use crate::bus::Message;
use crate::config::split_host_port;
use crate::store::identity::mailbox_key;
use crate::worker::context::Ctx;
use crate::worker::job::{self, FullFetchRequest};

pub(super) fn parse(o: &ImapOrder) -> Result<FullFetchRequest, String> {
    let user_id = super::uuid_field("user_id", &o.user_id)?;
    split_host_port(&o.server, 993).map_err(|e| format!("server: {e}"))?;
    if o.login.trim().is_empty() {
        return Err("missing login".into());
    }
    if o.password.is_empty() {
        return Err("missing password".into());
    }
    // INBOX in any case is one mailbox: one spelling, one set of ids.
    let mailbox = if o.mailbox.trim().is_empty() {
        "INBOX".to_string()
    } else {
        mailbox_key(&o.mailbox).to_string()
    };
    Ok(FullFetchRequest {
        user_id,
        server: o.server.trim().to_string(),
        login: o.login.trim().to_string(),
        password: o.password.clone(),
        mailbox,
    })
}

pub async fn handle(ctx: &Ctx, msg: &Message, req: FullFetchRequest) {
    tracing::info!(user = %req.user_id, server = %req.server, mailbox = %req.mailbox, "fullfetch order");
    let base = JobReport {
        order: orders::FULLFETCH.into(),
        user_id: req.user_id.to_string(),
        mailboxes: vec![req.mailbox.clone()],
        ..Default::default()
    };
    super::run_with_reports(ctx, msg, base, |c| job::fullfetch(ctx, req, c)).await;
}
