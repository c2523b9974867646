//! Placeholder until the folder listing lands.
use std::time::Duration;

use super::{ImapError, ImapSession};

pub async fn syncable(_s: &mut ImapSession, _io: Duration) -> Result<Vec<String>, ImapError> {
    Ok(vec!["INBOX".into()])
}
