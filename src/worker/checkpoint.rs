//! Load and save a mailbox's checkpoint wherever it lives: INBOX in the
//! identity's `infos` (Caliopen's `uidvalidity` / `lastseenuid` keys), every
//! other mailbox in `imap_mailbox_state`.

use std::collections::HashMap;

use chrono::Utc;
use uuid::Uuid;

use super::context::Ctx;
use super::JobError;
use crate::store::identity::{infos, Identity};
use crate::store::state::Checkpoint;

pub fn is_inbox(mailbox: &str) -> bool {
    mailbox.eq_ignore_ascii_case("INBOX")
}

/// The checkpoint of `mailbox`, `None` before the first sync.
pub async fn load(ctx: &Ctx, id: &Identity, mailbox: &str) -> Result<Option<Checkpoint>, JobError> {
    if is_inbox(mailbox) {
        let v = id.info(infos::UIDVALIDITY).trim().parse::<u32>().ok();
        let l = id
            .info(infos::LASTSEENUID)
            .trim()
            .parse::<u32>()
            .unwrap_or(0);
        return Ok(v.map(|uidvalidity| Checkpoint {
            uidvalidity,
            lastseenuid: l,
        }));
    }
    Ok(ctx
        .store
        .mailbox_checkpoint(id.user_id, id.identity_id, mailbox)
        .await?)
}

pub async fn save(
    ctx: &Ctx,
    user_id: Uuid,
    identity_id: Uuid,
    mailbox: &str,
    cp: Checkpoint,
) -> Result<(), JobError> {
    if is_inbox(mailbox) {
        let entries = HashMap::from([
            (infos::UIDVALIDITY.to_string(), cp.uidvalidity.to_string()),
            (infos::LASTSEENUID.to_string(), cp.lastseenuid.to_string()),
        ]);
        ctx.store.merge_infos(user_id, identity_id, entries).await?;
    } else {
        ctx.store
            .save_mailbox_checkpoint(user_id, identity_id, mailbox, cp, Utc::now())
            .await?;
    }
    Ok(())
}
