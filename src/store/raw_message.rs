//! Raw messages: `raw_message` and `user_raw_lookup` (CONTRACT §3).
//!
//! The id of a fetched message is a UUIDv5 of (user, identity, mailbox,
//! UIDVALIDITY, UID) — see [`raw_message_id`] — so fetching the same message
//! again writes the same rows instead of a duplicate, and a UIDVALIDITY
//! change gives new ids rather than overwriting old messages with new ones.

use bytes::Bytes;
use cdrs_tokio::query_values;
use cdrs_tokio::types::blob::Blob;
use uuid::Uuid;

use super::objects::{ObjectError, Objects};
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
const LAYOUT: &str = "SELECT raw_data, raw_size, uri FROM {ks}.raw_message WHERE raw_msg_id = ?";
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

    /// Store the row of a raw message kept in the object store: empty
    /// `raw_data`, the full `raw_size` and the object's `uri` (Caliopen's
    /// layout). The object must be written first.
    pub async fn insert_raw_message_ref(
        &self,
        user_id: Uuid,
        raw_msg_id: Uuid,
        size: usize,
        uri: &str,
        delivered: bool,
    ) -> Result<(), StoreError> {
        let size = size.min(i32::MAX as usize) as i32;
        let (a, b) = tokio::join!(
            self.exec(
                INSERT,
                query_values!(raw_msg_id, Blob::from(Vec::new()), size, uri, delivered)
            ),
            self.exec(INSERT_LOOKUP, query_values!(user_id, raw_msg_id)),
        );
        a?;
        b?;
        Ok(())
    }

    /// `(raw_data, raw_size, uri)` of a stored raw message.
    pub async fn raw_message_full(
        &self,
        raw_msg_id: Uuid,
    ) -> Result<Option<(Vec<u8>, i32, String)>, StoreError> {
        let rows = self.rows(LAYOUT, query_values!(raw_msg_id)).await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let data =
            col::<Blob>(r, "raw_data", "raw_message row")?.map_or(Vec::new(), Blob::into_vec);
        let size = col::<i32>(r, "raw_size", "raw_message row")?.unwrap_or(0);
        let uri = col::<String>(r, "uri", "raw_message row")?.unwrap_or_default();
        Ok(Some((data, size, uri)))
    }

    /// `(raw_data length, raw_size, uri)` of a stored raw message.
    pub async fn raw_message_layout(
        &self,
        raw_msg_id: Uuid,
    ) -> Result<Option<(usize, i32, String)>, StoreError> {
        let rows = self.rows(LAYOUT, query_values!(raw_msg_id)).await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let data = col::<Blob>(r, "raw_data", "raw_message row")?.map_or(0, |b| b.into_vec().len());
        let size = col::<i32>(r, "raw_size", "raw_message row")?.unwrap_or(0);
        let uri = col::<String>(r, "uri", "raw_message row")?.unwrap_or_default();
        Ok(Some((data, size, uri)))
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

/// Why a raw message could not be saved. Every case is an outage of ours.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Cannot happen once the start-up check passed (see [`super::objects::needed`]).
    #[error("message of {size} bytes exceeds store_settings.raw_size_limit ({limit}) and no object store is configured")]
    NoObjectStore { size: usize, limit: u64 },
    /// A row points at the object store, but none is configured.
    #[error("raw message {0} is in the object store ({1}) and no object store is configured")]
    NoObjectStoreToRead(Uuid, String),
}

/// A raw message on its way to the store: the headers we prepend, then the
/// server's bytes. They stay apart so that prepending a few hundred bytes
/// never copies a message of many megabytes: the object store uploads the
/// two pieces in turn, and only a message small enough for its row is
/// joined into one buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMessage {
    head: Vec<u8>,
    body: Bytes,
}

impl RawMessage {
    pub fn new(head: Vec<u8>, body: Bytes) -> Self {
        Self { head, body }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, in order, in two pieces.
    pub fn pieces(&self) -> [&[u8]; 2] {
        [&self.head, &self.body]
    }

    /// The bytes in one buffer (a copy, unless there is no head).
    pub fn into_vec(self) -> Vec<u8> {
        if self.head.is_empty() {
            return self.body.into();
        }
        let mut all = self.head;
        all.extend_from_slice(&self.body);
        all
    }
}

impl From<Vec<u8>> for RawMessage {
    fn from(all: Vec<u8>) -> Self {
        Self::new(Vec::new(), Bytes::from(all))
    }
}

/// Where a saved raw message's bytes went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// In `raw_message.raw_data`.
    Inline,
    /// In the object store, at this `uri`.
    Object(String),
}

/// Save a fetched raw message as Caliopen does: up to `raw_size_limit` bytes
/// in the row; strictly larger, the object first (key: the bare id), then a
/// row pointing at it, so a row never points at a missing object.
pub async fn save_raw_message(
    store: &Store,
    objects: Option<&Objects>,
    raw_size_limit: u64,
    user_id: Uuid,
    raw_msg_id: Uuid,
    data: RawMessage,
    delivered: bool,
) -> Result<Placement, SaveError> {
    if data.len() as u64 <= raw_size_limit {
        store
            .insert_raw_message_as(user_id, raw_msg_id, data.into_vec(), delivered)
            .await?;
        return Ok(Placement::Inline);
    }
    let Some(objects) = objects else {
        return Err(SaveError::NoObjectStore {
            size: data.len(),
            limit: raw_size_limit,
        });
    };
    let key = raw_msg_id.to_string();
    objects.put(&key, &data.pieces()).await?;
    let uri = objects.uri(&key);
    let size = data.len();
    drop(data);
    store
        .insert_raw_message_ref(user_id, raw_msg_id, size, &uri, delivered)
        .await?;
    Ok(Placement::Object(uri))
}

/// A raw message's bytes, from its row or, when the row holds only a `uri`
/// (Caliopen put it in the object store), from the object.
pub async fn load_raw_message(
    store: &Store,
    objects: Option<&Objects>,
    raw_msg_id: Uuid,
) -> Result<Option<Vec<u8>>, SaveError> {
    let Some((data, _size, uri)) = store.raw_message_full(raw_msg_id).await? else {
        return Ok(None);
    };
    if !data.is_empty() || uri.is_empty() {
        return Ok(Some(data));
    }
    let Some(objects) = objects else {
        return Err(SaveError::NoObjectStoreToRead(raw_msg_id, uri));
    };
    Ok(Some(objects.get_uri(&uri).await?))
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

    #[test]
    fn a_raw_message_is_its_head_then_its_body() {
        let m = RawMessage::new(b"X-A: 1\r\n".to_vec(), Bytes::from_static(b"body"));
        assert_eq!(m.len(), 12);
        assert_eq!(m.pieces(), [&b"X-A: 1\r\n"[..], &b"body"[..]]);
        assert_eq!(m.into_vec(), b"X-A: 1\r\nbody");
        let whole = RawMessage::from(b"all".to_vec());
        assert_eq!((whole.len(), whole.into_vec()), (3, b"all".to_vec()));
        assert!(RawMessage::default().is_empty());
    }
}
