//! Local Caliopen users: resolve `--username` through `user_name`, and check
//! that a `--userid` names a user that exists.

use cdrs_tokio::query_values;
use uuid::Uuid;

use super::{col, Store, StoreError};

const BY_NAME: &str = "SELECT user_id FROM {ks}.user_name WHERE name = ?";
const BY_ID: &str = "SELECT user_id, name FROM {ks}.user WHERE user_id = ?";
const INSERT_USER: &str = "INSERT INTO {ks}.user (user_id, name) VALUES (?, ?)";
const INSERT_NAME: &str = "INSERT INTO {ks}.user_name (name, user_id) VALUES (?, ?)";

impl Store {
    pub async fn user_id_by_name(&self, name: &str) -> Result<Option<Uuid>, StoreError> {
        let rows = self.rows(BY_NAME, query_values!(name)).await?;
        match rows.first() {
            Some(r) => col(r, "user_id", "user_name row"),
            None => Ok(None),
        }
    }

    /// The user's name, or `None` when no such user exists.
    pub async fn user_name(&self, user_id: Uuid) -> Result<Option<String>, StoreError> {
        let rows = self.rows(BY_ID, query_values!(user_id)).await?;
        match rows.first() {
            Some(r) => Ok(Some(
                col::<String>(r, "name", "user row")?.unwrap_or_default(),
            )),
            None => Ok(None),
        }
    }

    /// Create a minimal local user (demo and tests; Caliopen's API does this
    /// in a real deployment).
    pub async fn insert_user(&self, user_id: Uuid, name: &str) -> Result<(), StoreError> {
        self.exec(INSERT_USER, query_values!(user_id, name)).await?;
        self.exec(INSERT_NAME, query_values!(name, user_id)).await?;
        Ok(())
    }
}
