//! The state of a cheap resync: what the server last said about each synced
//! mailbox (`imap_mailbox_status`), and the flag changes and expunges a
//! QRESYNC server reported (`imap_message_change`).
//!
//! Both tables are ours alone. The status row is a cache of the server's
//! answer that lets a later sync skip an unchanged mailbox without EXAMINE;
//! the checkpoint itself stays where it was (INBOX in Caliopen's `infos`,
//! the others in `imap_mailbox_state`). Change rows are keyed by message, so
//! writing one twice (a sync repeated after a crash) changes nothing.

use cdrs_tokio::query_values;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{col, decode, Store, StoreError};

/// What STATUS or EXAMINE said about a mailbox when it last synced cleanly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailboxStatus {
    pub uidvalidity: u32,
    pub uidnext: u32,
    /// The checkpoint that sync reached: a checkpoint set back since (by
    /// hand, to fetch again) must not be skipped over.
    pub lastseenuid: u32,
    pub messages: u32,
    /// `None` from a server without CONDSTORE.
    pub highestmodseq: Option<u64>,
}

/// One message's change as the server reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageChange {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    /// Space-separated, as the server spelled them; empty for an expunge.
    pub flags: String,
    pub modseq: Option<u64>,
    pub expunged: bool,
}

const SELECT_STATUSES: &str =
    "SELECT mailbox, uidvalidity, uidnext, lastseenuid, messages, highestmodseq \
     FROM {ks}.imap_mailbox_status WHERE user_id = ? AND identity_id = ?";
const SAVE_STATUS: &str = "UPDATE {ks}.imap_mailbox_status SET uidvalidity = ?, uidnext = ?, \
     lastseenuid = ?, messages = ?, highestmodseq = ?, checked_at = ? \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ?";
const DELETE_STATUSES: &str = "DELETE FROM {ks}.imap_mailbox_status \
     WHERE user_id = ? AND identity_id = ?";
const SAVE_FLAGS: &str = "UPDATE {ks}.imap_message_change SET flags = ?, modseq = ?, \
     expunged = false, changed_at = ? \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ? AND uidvalidity = ? AND uid = ?";
const SAVE_EXPUNGE: &str = "UPDATE {ks}.imap_message_change SET expunged = true, changed_at = ? \
     WHERE user_id = ? AND identity_id = ? AND mailbox = ? AND uidvalidity = ? AND uid = ?";
const SELECT_CHANGES: &str = "SELECT mailbox, uidvalidity, uid, flags, modseq, expunged \
     FROM {ks}.imap_message_change WHERE user_id = ? AND identity_id = ?";
const DELETE_CHANGES: &str = "DELETE FROM {ks}.imap_message_change \
     WHERE user_id = ? AND identity_id = ?";

/// Change rows written at once; bounds the writes in flight.
const WRITES_IN_FLIGHT: usize = 16;

impl Store {
    /// Every mailbox status row of an identity, by mailbox (UTF-8 name).
    pub async fn mailbox_statuses(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<Vec<(String, MailboxStatus)>, StoreError> {
        const W: &str = "imap_mailbox_status row";
        let rows = self
            .rows(SELECT_STATUSES, query_values!(user_id, identity_id))
            .await?;
        let u32_of = |v: Option<i64>| u32::try_from(v.unwrap_or(0)).map_err(|e| decode(W, e));
        rows.iter()
            .map(|r| {
                let mailbox: String = col(r, "mailbox", W)?.unwrap_or_default();
                let modseq: Option<i64> = col(r, "highestmodseq", W)?;
                Ok((
                    mailbox,
                    MailboxStatus {
                        uidvalidity: u32_of(col(r, "uidvalidity", W)?)?,
                        uidnext: u32_of(col(r, "uidnext", W)?)?,
                        lastseenuid: u32_of(col(r, "lastseenuid", W)?)?,
                        messages: u32_of(col(r, "messages", W)?)?,
                        highestmodseq: modseq
                            .map(|m| u64::try_from(m).map_err(|e| decode(W, e)))
                            .transpose()?,
                    },
                ))
            })
            .collect()
    }

    pub async fn save_mailbox_status(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        mailbox: &str,
        st: MailboxStatus,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        // RFC 7162 keeps mod-sequences below 2^63: they fit a bigint.
        let modseq = st.highestmodseq.and_then(|m| i64::try_from(m).ok());
        self.exec(
            SAVE_STATUS,
            query_values!(
                st.uidvalidity as i64,
                st.uidnext as i64,
                st.lastseenuid as i64,
                st.messages as i64,
                modseq,
                at,
                user_id,
                identity_id,
                mailbox
            ),
        )
        .await
        .map(|_| ())
    }

    /// Write `changes` (each an upsert of its message's row), a few at a time.
    pub async fn save_message_changes(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        changes: &[MessageChange],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        // Chunks rather than a stream of closures: the job's future must
        // stay Send, which borrowing closures in a stream break.
        for chunk in changes.chunks(WRITES_IN_FLIGHT) {
            let mut writes = Vec::with_capacity(chunk.len());
            for c in chunk {
                writes.push(self.save_message_change(user_id, identity_id, c, at));
            }
            futures::future::try_join_all(writes).await?;
        }
        Ok(())
    }

    async fn save_message_change(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        c: &MessageChange,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if c.expunged {
            self.exec(
                SAVE_EXPUNGE,
                query_values!(
                    at,
                    user_id,
                    identity_id,
                    c.mailbox.clone(),
                    c.uidvalidity as i64,
                    c.uid as i64
                ),
            )
            .await
            .map(|_| ())
        } else {
            let modseq = c.modseq.and_then(|m| i64::try_from(m).ok());
            self.exec(
                SAVE_FLAGS,
                query_values!(
                    c.flags.clone(),
                    modseq,
                    at,
                    user_id,
                    identity_id,
                    c.mailbox.clone(),
                    c.uidvalidity as i64,
                    c.uid as i64
                ),
            )
            .await
            .map(|_| ())
        }
    }

    /// The recorded changes of an identity (for a consumer, and tests).
    pub async fn message_changes(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<Vec<MessageChange>, StoreError> {
        const W: &str = "imap_message_change row";
        let rows = self
            .rows(SELECT_CHANGES, query_values!(user_id, identity_id))
            .await?;
        rows.iter()
            .map(|r| {
                let modseq: Option<i64> = col(r, "modseq", W)?;
                Ok(MessageChange {
                    mailbox: col(r, "mailbox", W)?.unwrap_or_default(),
                    uidvalidity: u32::try_from(col::<i64>(r, "uidvalidity", W)?.unwrap_or(0))
                        .map_err(|e| decode(W, e))?,
                    uid: u32::try_from(col::<i64>(r, "uid", W)?.unwrap_or(0))
                        .map_err(|e| decode(W, e))?,
                    flags: col(r, "flags", W)?.unwrap_or_default(),
                    modseq: modseq.and_then(|m| u64::try_from(m).ok()),
                    expunged: col(r, "expunged", W)?.unwrap_or(false),
                })
            })
            .collect()
    }

    /// Forget an identity's resync state (when it is removed).
    pub async fn delete_resync_state(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<(), StoreError> {
        self.exec(DELETE_STATUSES, query_values!(user_id, identity_id))
            .await?;
        self.exec(DELETE_CHANGES, query_values!(user_id, identity_id))
            .await?;
        Ok(())
    }
}
