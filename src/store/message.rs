//! Caliopen's `message` rows, read by `deliver` to find a sent draft's raw
//! message and date.

use cdrs_tokio::query_values;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{col, Store, StoreError};

const SELECT: &str =
    "SELECT raw_msg_id, date FROM {ks}.message WHERE user_id = ? AND message_id = ?";
const INSERT: &str =
    "INSERT INTO {ks}.message (user_id, message_id, raw_msg_id, date) VALUES (?, ?, ?, ?)";

impl Store {
    /// (raw_msg_id, date) of a message, `None` when there is no such message.
    pub async fn message_raw(
        &self,
        user_id: Uuid,
        message_id: Uuid,
    ) -> Result<Option<(Option<Uuid>, Option<DateTime<Utc>>)>, StoreError> {
        const W: &str = "message row";
        let rows = self
            .rows(SELECT, query_values!(user_id, message_id))
            .await?;
        match rows.first() {
            None => Ok(None),
            Some(r) => Ok(Some((col(r, "raw_msg_id", W)?, col(r, "date", W)?))),
        }
    }

    /// Write a minimal message row (Caliopen's processor does this in a real
    /// deployment; tests and the demo need one).
    pub async fn insert_message(
        &self,
        user_id: Uuid,
        message_id: Uuid,
        raw_msg_id: Uuid,
        date: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.exec(INSERT, query_values!(user_id, message_id, raw_msg_id, date))
            .await
            .map(|_| ())
    }
}
