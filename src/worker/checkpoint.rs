//! Load and save a mailbox's checkpoint wherever it lives: INBOX in the
//! identity's `infos` (Caliopen's `uidvalidity` / `lastseenuid` keys), every
//! other mailbox in `imap_mailbox_state`.

use chrono::Utc;
use uuid::Uuid;

use super::context::Ctx;
use super::JobError;
use crate::store::identity::Identity;
use crate::store::state::Checkpoint;

pub fn is_inbox(mailbox: &str) -> bool {
    mailbox.eq_ignore_ascii_case("INBOX")
}

/// The checkpoint of `mailbox`, `None` before the first sync.
pub async fn load(ctx: &Ctx, id: &Identity, mailbox: &str) -> Result<Option<Checkpoint>, JobError> {
    if is_inbox(mailbox) {
        return Ok(id.uidvalidity().map(|uidvalidity| Checkpoint {
            uidvalidity,
            lastseenuid: id.lastseenuid(),
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
        let entries = Identity::inbox_checkpoint(cp.uidvalidity, cp.lastseenuid);
        ctx.store.merge_infos(user_id, identity_id, entries).await?;
    } else {
        ctx.store
            .save_mailbox_checkpoint(user_id, identity_id, mailbox, cp, Utc::now())
            .await?;
    }
    Ok(())
}
