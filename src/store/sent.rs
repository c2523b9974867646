//! `imap_sent_message`: the messages `deliver` had sent, so that a retried
//! `deliver` of one of them never sends it twice.
//!
//! Caliopen's SMTP sender sends, then filing the copy in the remote Sent
//! mailbox may fail; the requester is answered with an error and sends the
//! order again. The row written as soon as the sender said "sent" turns
//! that retry into a filing only. Both writes are keyed by the order's ids
//! and idempotent.

use cdrs_tokio::query_values;
use chrono::Utc;
use uuid::Uuid;

use super::{col, Store, StoreError};

const SELECT: &str = "SELECT reply, filed FROM {ks}.imap_sent_message \
     WHERE user_id = ? AND message_id = ?";
const RECORD: &str = "INSERT INTO {ks}.imap_sent_message (user_id, message_id, reply, sent_at, \
     filed) VALUES (?, ?, ?, ?, false)";
const FILED: &str = "UPDATE {ks}.imap_sent_message SET filed = true \
     WHERE user_id = ? AND message_id = ?";

/// A message the SMTP sender sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The sender's `message` in its answer.
    pub reply: String,
    /// Its copy is in the remote Sent mailbox (or needs none).
    pub filed: bool,
}

impl Store {
    /// What `deliver` did with `message_id` already, if it had it sent.
    pub async fn sent_message(
        &self,
        user_id: Uuid,
        message_id: Uuid,
    ) -> Result<Option<Sent>, StoreError> {
        const W: &str = "imap_sent_message row";
        let rows = self
            .rows(SELECT, query_values!(user_id, message_id))
            .await?;
        match rows.first() {
            None => Ok(None),
            Some(r) => Ok(Some(Sent {
                reply: col::<String>(r, "reply", W)?.unwrap_or_default(),
                filed: col::<bool>(r, "filed", W)?.unwrap_or(false),
            })),
        }
    }

    /// The SMTP sender sent `message_id` and answered `reply`.
    pub async fn record_sent(
        &self,
        user_id: Uuid,
        message_id: Uuid,
        reply: &str,
    ) -> Result<(), StoreError> {
        self.exec(
            RECORD,
            query_values!(user_id, message_id, reply.to_string(), Utc::now()),
        )
        .await
        .map(|_| ())
    }

    /// Its copy is filed: a later `deliver` of it does nothing but answer.
    pub async fn record_filed(&self, user_id: Uuid, message_id: Uuid) -> Result<(), StoreError> {
        self.exec(FILED, query_values!(user_id, message_id))
            .await
            .map(|_| ())
    }
}
