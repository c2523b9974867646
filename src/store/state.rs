//! Sync checkpoints of mailboxes other than INBOX, and the per-message
//! failure record.
//!
//! INBOX keeps Caliopen's keys in `user_identity.infos` (see `identity.rs`).
//! Other mailboxes get a row of `imap_mailbox_state` each, a table that
//! Caliopen's readers never look at, so adding mailboxes changes nothing for
//! them. A message whose hand-off fails gets a row of `imap_message_failure`
//! counting its tries; the checkpoint never moves past it until it succeeds
//! or has failed `max_message_tries` times, and then the row stays, marked
//! `stepped_over`, for operators (`imapctl listremotes`).

use cdrs_tokio::query_values;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{col, decode, Store, StoreError};

/// Where a mailbox's sync stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub uidvalidity: u32,
    /// Every UID up to and including this one was handed off (or stepped over).
    pub lastseenuid: u32,
}

/// A message that failed at least once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFailure {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub tries: u32,
    pub last_error: String,
    pub stepped_over: bool,
}

const SELECT_STATE: &str = "SELECT uidvalidity, lastseenuid FROM {ks}.imap_mailbox_state \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ?";
const SELECT_STATES: &str =
    "SELECT mailbox, uidvalidity, lastseenuid FROM {ks}.imap_mailbox_state \
     WHERE user_id = ? AND identity_id = ?";
const SAVE_STATE: &str = "UPDATE {ks}.imap_mailbox_state SET uidvalidity = ?, lastseenuid = ?, \
     lastsync = ? WHERE user_id = ? AND identity_id = ? AND mailbox = ?";
const DELETE_STATES: &str = "DELETE FROM {ks}.imap_mailbox_state \
     WHERE user_id = ? AND identity_id = ?";
const SELECT_FAILURES: &str = "SELECT mailbox, uidvalidity, uid, tries, last_error, stepped_over \
     FROM {ks}.imap_message_failure WHERE user_id = ? AND identity_id = ?";
const SAVE_FAILURE: &str = "UPDATE {ks}.imap_message_failure SET tries = ?, last_error = ?, \
     last_try = ?, stepped_over = ? \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ? AND uidvalidity = ? AND uid = ?";
const CLEAR_FAILURE: &str = "DELETE FROM {ks}.imap_message_failure \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ? AND uidvalidity = ? AND uid = ?";
const DELETE_FAILURES: &str = "DELETE FROM {ks}.imap_message_failure \
     WHERE user_id = ? AND identity_id = ?";
const SELECT_HIGH: &str = "SELECT uidvalidity, high_uid FROM {ks}.imap_high_water \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ?";
const SAVE_HIGH: &str = "UPDATE {ks}.imap_high_water SET uidvalidity = ?, high_uid = ? \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ?";
const DELETE_HIGHS: &str = "DELETE FROM {ks}.imap_high_water \
     WHERE user_id = ? AND identity_id = ?";
const SELECT_MAILBOX_ERRORS: &str = "SELECT mailbox, last_error, first_error, last_error_at \
     FROM {ks}.imap_mailbox_error WHERE user_id = ? AND identity_id = ?";
const SAVE_MAILBOX_ERROR: &str = "UPDATE {ks}.imap_mailbox_error SET last_error = ?, \
     first_error = ?, last_error_at = ? WHERE user_id = ? AND identity_id = ? AND mailbox = ?";
const CLEAR_MAILBOX_ERROR: &str = "DELETE FROM {ks}.imap_mailbox_error \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ?";
const DELETE_MAILBOX_ERRORS: &str = "DELETE FROM {ks}.imap_mailbox_error \
     WHERE user_id = ? AND identity_id = ?";

/// A mailbox that could not be synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxError {
    pub mailbox: String,
    pub last_error: String,
    pub first_error: Option<DateTime<Utc>>,
    pub last_error_at: Option<DateTime<Utc>>,
}

impl Store {
    pub async fn mailbox_checkpoint(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        mailbox: &str,
    ) -> Result<Option<Checkpoint>, StoreError> {
        const W: &str = "imap_mailbox_state row";
        let rows = self
            .rows(SELECT_STATE, query_values!(user_id, identity_id, mailbox))
            .await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let v: Option<i64> = col(r, "uidvalidity", W)?;
        let l: Option<i64> = col(r, "lastseenuid", W)?;
        Ok(Some(Checkpoint {
            uidvalidity: u32::try_from(v.unwrap_or(0)).map_err(|e| decode(W, e))?,
            lastseenuid: u32::try_from(l.unwrap_or(0)).map_err(|e| decode(W, e))?,
        }))
    }

    /// Every checkpoint of an identity's mailboxes but INBOX, in one
    /// query (a sync of many folders reads them all at once).
    pub async fn mailbox_checkpoints(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        const W: &str = "imap_mailbox_state row";
        let rows = self
            .rows(SELECT_STATES, query_values!(user_id, identity_id))
            .await?;
        rows.iter()
            .map(|r| {
                let m: Option<String> = col(r, "mailbox", W)?;
                let v: Option<i64> = col(r, "uidvalidity", W)?;
                let l: Option<i64> = col(r, "lastseenuid", W)?;
                Ok((
                    m.unwrap_or_default(),
                    Checkpoint {
                        uidvalidity: u32::try_from(v.unwrap_or(0)).map_err(|e| decode(W, e))?,
                        lastseenuid: u32::try_from(l.unwrap_or(0)).map_err(|e| decode(W, e))?,
                    },
                ))
            })
            .collect()
    }

    pub async fn save_mailbox_checkpoint(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        mailbox: &str,
        cp: Checkpoint,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.exec(
            SAVE_STATE,
            query_values!(
                cp.uidvalidity as i64,
                cp.lastseenuid as i64,
                at,
                user_id,
                identity_id,
                mailbox
            ),
        )
        .await
        .map(|_| ())
    }

    pub async fn message_failures(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<Vec<MessageFailure>, StoreError> {
        const W: &str = "imap_message_failure row";
        let rows = self
            .rows(SELECT_FAILURES, query_values!(user_id, identity_id))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(MessageFailure {
                    mailbox: col(r, "mailbox", W)?.unwrap_or_default(),
                    uidvalidity: col::<i64>(r, "uidvalidity", W)?.unwrap_or(0) as u32,
                    uid: col::<i64>(r, "uid", W)?.unwrap_or(0) as u32,
                    tries: col::<i32>(r, "tries", W)?.unwrap_or(0).max(0) as u32,
                    last_error: col(r, "last_error", W)?.unwrap_or_default(),
                    stepped_over: col(r, "stepped_over", W)?.unwrap_or(false),
                })
            })
            .collect()
    }

    pub async fn save_message_failure(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        f: &MessageFailure,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.exec(
            SAVE_FAILURE,
            query_values!(
                f.tries as i32,
                f.last_error.clone(),
                at,
                f.stepped_over,
                user_id,
                identity_id,
                f.mailbox.clone(),
                f.uidvalidity as i64,
                f.uid as i64
            ),
        )
        .await
        .map(|_| ())
    }

    pub async fn clear_message_failure(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        mailbox: &str,
        uidvalidity: u32,
        uid: u32,
    ) -> Result<(), StoreError> {
        self.exec(
            CLEAR_FAILURE,
            query_values!(
                user_id,
                identity_id,
                mailbox,
                uidvalidity as i64,
                uid as i64
            ),
        )
        .await
        .map(|_| ())
    }

    /// The high-water mark of `mailbox`: `(uidvalidity, high_uid)`.
    pub async fn high_water(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        mailbox: &str,
    ) -> Result<Option<(u32, u32)>, StoreError> {
        const W: &str = "imap_high_water row";
        let rows = self
            .rows(SELECT_HIGH, query_values!(user_id, identity_id, mailbox))
            .await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let v: i64 = col(r, "uidvalidity", W)?.unwrap_or(0);
        let h: i64 = col(r, "high_uid", W)?.unwrap_or(0);
        Ok(Some((
            u32::try_from(v).map_err(|e| decode(W, e))?,
            u32::try_from(h).map_err(|e| decode(W, e))?,
        )))
    }

    pub async fn save_high_water(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        mailbox: &str,
        uidvalidity: u32,
        high_uid: u32,
    ) -> Result<(), StoreError> {
        self.exec(
            SAVE_HIGH,
            query_values!(
                uidvalidity as i64,
                high_uid as i64,
                user_id,
                identity_id,
                mailbox
            ),
        )
        .await
        .map(|_| ())
    }

    pub async fn mailbox_errors(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<Vec<MailboxError>, StoreError> {
        const W: &str = "imap_mailbox_error row";
        let rows = self
            .rows(SELECT_MAILBOX_ERRORS, query_values!(user_id, identity_id))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(MailboxError {
                    mailbox: col(r, "mailbox", W)?.unwrap_or_default(),
                    last_error: col(r, "last_error", W)?.unwrap_or_default(),
                    first_error: col(r, "first_error", W)?,
                    last_error_at: col(r, "last_error_at", W)?,
                })
            })
            .collect()
    }

    pub async fn save_mailbox_error(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        e: &MailboxError,
    ) -> Result<(), StoreError> {
        self.exec(
            SAVE_MAILBOX_ERROR,
            query_values!(
                e.last_error.clone(),
                e.first_error,
                e.last_error_at,
                user_id,
                identity_id,
                e.mailbox.clone()
            ),
        )
        .await
        .map(|_| ())
    }

    pub async fn clear_mailbox_error(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        mailbox: &str,
    ) -> Result<(), StoreError> {
        self.exec(
            CLEAR_MAILBOX_ERROR,
            query_values!(user_id, identity_id, mailbox),
        )
        .await
        .map(|_| ())
    }

    /// Forget all of an identity's own state (when it is removed).
    pub async fn delete_sync_state(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<(), StoreError> {
        self.exec(DELETE_STATES, query_values!(user_id, identity_id))
            .await?;
        self.exec(DELETE_FAILURES, query_values!(user_id, identity_id))
            .await?;
        self.exec(DELETE_HIGHS, query_values!(user_id, identity_id))
            .await?;
        self.exec(DELETE_MAILBOX_ERRORS, query_values!(user_id, identity_id))
            .await?;
        self.delete_resync_state(user_id, identity_id).await?;
        Ok(())
    }
}
