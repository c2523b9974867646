//! Raw messages: `raw_message` and `user_raw_lookup` (CONTRACT §3).
//!
//! The id of a fetched message is a UUIDv5 of (user, identity, mailbox,
//! UIDVALIDITY, UID) — see [`raw_message_id`] — so fetching the same message
//! again writes the same rows instead of a duplicate, and a UIDVALIDITY
//! change gives new ids rather than overwriting old messages with new ones.

use cdrs_tokio::query_values;
use cdrs_tokio::types::blob::Blob;
use uuid::Uuid;

use super::{col, Store, StoreError};

/// Namespace of raw message ids (a fixed random UUID, never to change: it
/// would give every message a new id).
pub const RAW_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f0c_7b1e_3a52_4c8e_9d2f_6b1a_0e4c_8d37);

/// The deterministic id of the message `uid` of `mailbox` at `uidvalidity`.
pub fn raw_message_id(
    user_id: Uuid,
    identity_id: Uuid,
    mailbox: &str,
    uidvalidity: u32,
    uid: u32,
) -> Uuid {
    let mut name = Vec::with_capacity(mailbox.len() + 64);
    name.extend_from_slice(user_id.as_bytes());
    name.extend_from_slice(identity_id.as_bytes());
    name.extend_from_slice(&(mailbox.len() as u32).to_be_bytes());
    name.extend_from_slice(mailbox.as_bytes());
    name.extend_from_slice(&uidvalidity.to_be_bytes());
    name.extend_from_slice(&uid.to_be_bytes());
    Uuid::new_v5(&RAW_ID_NAMESPACE, &name)
}

/// A fullfetch keeps no identity: its ids hang off the server and login.
pub fn fullfetch_identity(server: &str, login: &str) -> Uuid {
    Uuid::new_v5(
        &RAW_ID_NAMESPACE,
        format!(
            "fullfetch\0{}\0{}",
            server.to_lowercase(),
            login.to_lowercase()
        )
        .as_bytes(),
    )
}

const INSERT: &str =
    "INSERT INTO {ks}.raw_message (raw_msg_id, raw_data, raw_size, uri, delivered) \
     VALUES (?, ?, ?, ?, ?)";
const INSERT_LOOKUP: &str = "INSERT INTO {ks}.user_raw_lookup (user_id, raw_msg_id) VALUES (?, ?)";
const SET_DELIVERED: &str = "UPDATE {ks}.raw_message SET delivered = true WHERE raw_msg_id = ?";
const DELIVERED: &str = "SELECT delivered FROM {ks}.raw_message WHERE raw_msg_id = ?";
const SELECT: &str = "SELECT raw_data FROM {ks}.raw_message WHERE raw_msg_id = ?";
const IDS_OF_USER: &str = "SELECT raw_msg_id FROM {ks}.user_raw_lookup WHERE user_id = ?";

impl Store {
    /// Store a raw message (not yet delivered) and its user lookup row.
    pub async fn insert_raw_message(
        &self,
        user_id: Uuid,
        raw_msg_id: Uuid,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.insert_raw_message_as(user_id, raw_msg_id, data, false)
            .await
    }

    /// Store a raw message with its `delivered` flag already set: store-only
    /// mode has no hand-off to wait for, so it saves the second write.
    pub async fn insert_raw_message_as(
        &self,
        user_id: Uuid,
        raw_msg_id: Uuid,
        data: Vec<u8>,
        delivered: bool,
    ) -> Result<(), StoreError> {
        let size = data.len().min(i32::MAX as usize) as i32;
        let blob = Blob::from(data);
        let (a, b) = tokio::join!(
            self.exec(INSERT, query_values!(raw_msg_id, blob, size, "", delivered)),
            self.exec(INSERT_LOOKUP, query_values!(user_id, raw_msg_id)),
        );
        a?;
        b?;
        Ok(())
    }

    pub async fn mark_delivered(&self, raw_msg_id: Uuid) -> Result<(), StoreError> {
        self.exec(SET_DELIVERED, query_values!(raw_msg_id))
            .await
            .map(|_| ())
    }

    /// `Some(delivered)` when the message is stored, `None` when it is not.
    pub async fn raw_message_delivered(
        &self,
        raw_msg_id: Uuid,
    ) -> Result<Option<bool>, StoreError> {
        let rows = self.rows(DELIVERED, query_values!(raw_msg_id)).await?;
        match rows.first() {
            Some(r) => Ok(Some(
                col::<bool>(r, "delivered", "raw_message row")?.unwrap_or(false),
            )),
            None => Ok(None),
        }
    }

    /// Every raw message id stored for `user_id`.
    pub async fn raw_message_ids_of(&self, user_id: Uuid) -> Result<Vec<Uuid>, StoreError> {
        let rows = self.rows(IDS_OF_USER, query_values!(user_id)).await?;
        rows.iter()
            .filter_map(|r| col::<Uuid>(r, "raw_msg_id", "user_raw_lookup row").transpose())
            .collect()
    }

    pub async fn raw_message_data(&self, raw_msg_id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.rows(SELECT, query_values!(raw_msg_id)).await?;
        match rows.first() {
            Some(r) => Ok(col::<Blob>(r, "raw_data", "raw_message row")?.map(Blob::into_vec)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let u = Uuid::from_u128(1);
        let i = Uuid::from_u128(2);
        let a = raw_message_id(u, i, "INBOX", 7, 42);
        assert_eq!(a, raw_message_id(u, i, "INBOX", 7, 42));
        assert_ne!(a, raw_message_id(u, i, "INBOX", 8, 42));
        assert_ne!(a, raw_message_id(u, i, "INBOX", 7, 43));
        assert_ne!(a, raw_message_id(u, i, "Archive", 7, 42));
        assert_ne!(a, raw_message_id(u, Uuid::from_u128(3), "INBOX", 7, 42));
        assert_eq!(a.get_version_num(), 5);
    }
}
