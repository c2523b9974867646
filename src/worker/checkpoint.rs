//! Load and save a mailbox's checkpoint wherever it lives: INBOX in the
//! identity's `infos` (Caliopen's `uidvalidity` / `lastseenuid` keys), every
//! other mailbox in `imap_mailbox_state`.

use std::collections::HashMap;

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

/// The checkpoints of every mailbox but INBOX, read at once: a hint that
/// saves a query per folder. A mailbox missing from it is read with
/// [`load`], so a short answer can never pass for "never synced".
pub async fn load_others(
    ctx: &Ctx,
    id: &Identity,
) -> Result<HashMap<String, Checkpoint>, JobError> {
    Ok(ctx
        .store
        .mailbox_checkpoints(id.user_id, id.identity_id)
        .await?
        .into_iter()
        .collect())
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
