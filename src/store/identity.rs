//! Remote identities: the `user_identity` row and its two lookup tables,
//! exactly as Caliopen writes and reads them (CONTRACT §3).
//!
//! Sync state of INBOX lives in the row's `infos` map under Caliopen's own
//! keys, so Caliopen's readers (API, frontend) keep seeing what they saw with
//! the Go worker. Writes touch single map entries (`infos = infos + ?`), never
//! the whole map, so concurrent writers of other keys are not overwritten.

use std::collections::HashMap;
use std::fmt;

use cdrs_tokio::query::QueryValues;
use cdrs_tokio::query_values;
use cdrs_tokio::types::rows::Row;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{col, decode, text_map, Store, StoreError};

/// `infos` keys (CONTRACT §3).
pub mod infos {
    pub const INSERVER: &str = "inserver";
    pub const OUTSERVER: &str = "outserver";
    pub const AUTHTYPE: &str = "authtype";
    pub const PROVIDER: &str = "provider";
    pub const POLLINTERVAL: &str = "pollinterval";
    pub const LASTSEENUID: &str = "lastseenuid";
    pub const UIDVALIDITY: &str = "uidvalidity";
    pub const LASTSYNC: &str = "lastsync";
    pub const SYNCING: &str = "syncing";
    /// Ours: the worker id that wrote `syncing`. A marker without it was
    /// written by a Go worker (honoured for the contract's 24 h); one with it
    /// is ours and only counts while our lock row (`imap_sync_lock`) lives.
    pub const SYNCING_OWNER: &str = "syncing_owner";
    pub const LAST_FETCH_ERROR: &str = "lastFetchError";
    pub const FIRST_ERROR_DATE: &str = "firstErrorDate";
    pub const LAST_ERROR_DATE: &str = "lastErrorDate";
    pub const ERRORS_COUNT: &str = "errorsCount";
    /// Ours: the last time a server throttled this identity's sync
    /// (`<reason> <RFC 3339 date> <host:port>`, see [`super::Throttle`]);
    /// cleared by a clean sync like the error streak.
    pub const THROTTLED: &str = "throttled";
    /// Ours: comma-separated mailboxes to sync (default INBOX).
    pub const MAILBOXES: &str = "mailboxes";
    /// Ours: `true` to watch INBOX with IDLE (live sync, `imap.idle: identity`).
    pub const IDLE: &str = "idle";
    /// Ours: `starttls`, `tls` or `plain` to override the choice by port.
    pub const SECURITY: &str = "security";
    /// Ours: an extra CA file (PEM) for this identity's server.
    pub const CAFILE: &str = "cafile";
    /// Ours: SHA-256 (hex) of the server certificate, pinned.
    pub const CERT_SHA256: &str = "cert_sha256";

    pub const AUTH_LOGIN: &str = "login-password";
    pub const AUTH_OAUTH2: &str = "Oauth2";
    pub const AUTH_OAUTH1: &str = "Oauth1";
}

/// `credentials` keys (CONTRACT §3; `oauh2refreshtoken` is Caliopen's spelling).
pub mod creds {
    pub const USERNAME_IN: &str = "inusername";
    pub const PASSWORD_IN: &str = "inpassword";
    pub const USERNAME: &str = "username";
    pub const ACCESS_TOKEN: &str = "oauth2accesstoken";
    pub const REFRESH_TOKEN: &str = "oauh2refreshtoken";
    pub const TOKEN_TYPE: &str = "tokentype";
    pub const TOKEN_EXPIRY: &str = "tokenexpiry";
}

pub const TYPE_REMOTE: &str = "remote";
pub const PROTOCOL_EMAIL: &str = "email";
pub const PROTOCOL_IMAP_LEGACY: &str = "imap";
pub const STATUS_ACTIVE: &str = "active";
pub const STATUS_INACTIVE: &str = "inactive";

/// A text column with a few values we act on. Any other value is kept as
/// written (`Other`), so a row read and written back is unchanged.
macro_rules! column_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $text:pat => $out:expr),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $var,)+
            /// Any other stored value, kept as written.
            Other(String),
        }

        impl $name {
            pub fn parse(s: &str) -> $name {
                match s {
                    $($text => $name::$var,)+
                    other => $name::Other(other.to_string()),
                }
            }

            /// The stored text.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$var => $out,)+
                    $name::Other(s) => s,
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::Other(String::new())
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

column_enum! {
    /// `user_identity.status`.
    Status {
        Active = "active" => STATUS_ACTIVE,
        Inactive = "inactive" => STATUS_INACTIVE,
    }
}

column_enum! {
    /// `user_identity.protocol` of the identities this project syncs.
    Protocol {
        Email = "email" => PROTOCOL_EMAIL,
        /// Older Caliopen rows say `imap`.
        ImapLegacy = "imap" => PROTOCOL_IMAP_LEGACY,
    }
}

column_enum! {
    /// `user_identity.type`.
    IdentityKind {
        Remote = "remote" => TYPE_REMOTE,
    }
}

/// Dates in `infos` and credentials as Go's `time.RFC3339` writes them:
/// seconds, `Z`. The one format this project writes them in.
pub fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A date of `infos`, written by us or by Go (any RFC 3339 offset).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// Caliopen's error streak in `infos` (CONTRACT §4 step 6), read once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorStreak {
    /// `errorsCount`: failures of the account in a row (0 when absent or bad).
    pub count: u64,
    /// `firstErrorDate`.
    pub first: Option<DateTime<Utc>>,
    /// `lastErrorDate`.
    pub last: Option<DateTime<Utc>>,
    /// `lastFetchError`: the last failure, ours or the account's.
    pub last_error: String,
}

impl ErrorStreak {
    /// The keys a success clears.
    pub const KEYS: [&'static str; 5] = [
        infos::LAST_FETCH_ERROR,
        infos::ERRORS_COUNT,
        infos::FIRST_ERROR_DATE,
        infos::LAST_ERROR_DATE,
        infos::THROTTLED,
    ];

    /// The entries that record a failure at `now`: the text and date
    /// always; when it `counts` against the account, one more in the count
    /// and the streak's first date (kept, or `now` for a new streak).
    pub fn record(
        &self,
        line: String,
        now: DateTime<Utc>,
        counts: bool,
    ) -> HashMap<String, String> {
        let mut entries = HashMap::from([
            (infos::LAST_FETCH_ERROR.to_string(), line),
            (infos::LAST_ERROR_DATE.to_string(), time_text(now)),
        ]);
        if counts {
            entries.insert(
                infos::ERRORS_COUNT.to_string(),
                (self.count + 1).to_string(),
            );
            entries.insert(
                infos::FIRST_ERROR_DATE.to_string(),
                time_text(self.first.unwrap_or(now)),
            );
        }
        entries
    }
}

/// The last throttling of an identity's sync (`infos.throttled`): which
/// server, why (a `throttle::Reason` label), when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Throttle {
    pub reason: String,
    pub at: String,
    pub server: String,
}

impl Throttle {
    /// The entry that records it.
    pub fn entry(reason: &str, at: DateTime<Utc>, server: &str) -> (String, String) {
        (
            infos::THROTTLED.to_string(),
            format!("{reason} {} {server}", time_text(at)),
        )
    }

    /// Read back from `infos.throttled`; `None` when absent or malformed.
    pub fn parse(text: &str) -> Option<Throttle> {
        let mut parts = text.trim().splitn(3, ' ');
        let (reason, at, server) = (parts.next()?, parts.next()?, parts.next()?);
        parse_time(at)?;
        Some(Throttle {
            reason: reason.to_string(),
            at: at.to_string(),
            server: server.to_string(),
        })
    }
}

/// The name a mailbox goes by wherever it feeds an id or a state row
/// (raw message ids, checkpoints, high-water marks, failure and error
/// rows): `INBOX` in any case is one mailbox (RFC 3501 §5.1) and is always
/// spelled `INBOX`; every other name is case-sensitive and kept as it is.
pub fn mailbox_key(name: &str) -> &str {
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX"
    } else {
        name
    }
}

/// Caliopen's `syncing` marker and our `syncing_owner` beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncingMarker<'a> {
    /// As stored (ours carry nanoseconds, and are compared as text).
    pub text: &'a str,
    /// Its start, when it parses.
    pub since: Option<DateTime<Utc>>,
    /// `syncing_owner`; empty on a Go worker's marker.
    pub owner: &'a str,
}

impl SyncingMarker<'_> {
    /// The marker of a sync started at `since`: RFC 3339 with nanoseconds
    /// (which Go's parser accepts), so each sync's marker is its own.
    pub fn text_of(since: DateTime<Utc>) -> String {
        since.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    }

    /// The entries that write a marker with its owner.
    pub fn entries(text: &str, owner: &str) -> HashMap<String, String> {
        HashMap::from([
            (infos::SYNCING.to_string(), text.to_string()),
            (infos::SYNCING_OWNER.to_string(), owner.to_string()),
        ])
    }
}

/// One `user_identity` row.
#[derive(Clone, Default, PartialEq)]
pub struct Identity {
    pub user_id: Uuid,
    pub identity_id: Uuid,
    pub credentials: HashMap<String, String>,
    pub display_name: String,
    pub identifier: String,
    /// Caliopen's string map: read through the typed accessors below
    /// (`error_streak`, `syncing`, `uidvalidity`...), which know its keys.
    pub infos: HashMap<String, String>,
    pub last_check: Option<DateTime<Utc>>,
    pub protocol: Protocol,
    pub status: Status,
    pub kind: IdentityKind,
}

// Credentials are secrets: Debug shows their keys only.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cred_keys: Vec<&String> = self.credentials.keys().collect();
        cred_keys.sort();
        f.debug_struct("Identity")
            .field("user_id", &self.user_id)
            .field("identity_id", &self.identity_id)
            .field("identifier", &self.identifier)
            .field("display_name", &self.display_name)
            .field("protocol", &self.protocol)
            .field("status", &self.status)
            .field("type", &self.kind)
            .field("infos", &self.infos)
            .field("credentials", &cred_keys)
            .field("last_check", &self.last_check)
            .finish()
    }
}

impl Identity {
    pub fn info(&self, key: &str) -> &str {
        self.infos.get(key).map(String::as_str).unwrap_or("")
    }

    pub fn is_remote_email(&self) -> bool {
        self.kind == IdentityKind::Remote
            && matches!(self.protocol, Protocol::Email | Protocol::ImapLegacy)
    }

    /// The error streak keys, read once.
    pub fn error_streak(&self) -> ErrorStreak {
        ErrorStreak {
            count: self.info(infos::ERRORS_COUNT).trim().parse().unwrap_or(0),
            first: parse_time(self.info(infos::FIRST_ERROR_DATE)),
            last: parse_time(self.info(infos::LAST_ERROR_DATE)),
            last_error: self.info(infos::LAST_FETCH_ERROR).to_string(),
        }
    }

    /// Does any error streak key exist?
    pub fn has_error_keys(&self) -> bool {
        ErrorStreak::KEYS
            .iter()
            .any(|k| self.infos.contains_key(*k))
    }

    /// The `syncing` marker, `None` when absent.
    pub fn syncing(&self) -> Option<SyncingMarker<'_>> {
        let text = self.info(infos::SYNCING);
        let owner = self.info(infos::SYNCING_OWNER);
        (!text.is_empty() || !owner.is_empty()).then(|| SyncingMarker {
            text,
            since: parse_time(text),
            owner,
        })
    }

    /// INBOX's `uidvalidity`, `None` before the first sync (or when bad).
    pub fn uidvalidity(&self) -> Option<u32> {
        self.info(infos::UIDVALIDITY).trim().parse().ok()
    }

    /// The entry that records a sync's end at `at`.
    pub fn lastsync(at: DateTime<Utc>) -> HashMap<String, String> {
        HashMap::from([(infos::LASTSYNC.to_string(), time_text(at))])
    }

    /// The entries that save INBOX's checkpoint.
    pub fn inbox_checkpoint(uidvalidity: u32, lastseenuid: u32) -> HashMap<String, String> {
        HashMap::from([
            (infos::UIDVALIDITY.to_string(), uidvalidity.to_string()),
            (infos::LASTSEENUID.to_string(), lastseenuid.to_string()),
        ])
    }

    /// INBOX's `lastseenuid`, 0 when absent or bad.
    pub fn lastseenuid(&self) -> u32 {
        self.info(infos::LASTSEENUID).trim().parse().unwrap_or(0)
    }

    /// Mailboxes to sync: `infos.mailboxes` (comma-separated), default
    /// INBOX; INBOX in any case is spelled `INBOX` (see [`mailbox_key`]).
    pub fn mailboxes(&self) -> Vec<String> {
        let mut list: Vec<String> = Vec::new();
        for name in self.info(infos::MAILBOXES).split(',').map(str::trim) {
            let name = mailbox_key(name);
            if !name.is_empty() && !list.iter().any(|m| m == name) {
                list.push(name.to_string());
            }
        }
        if list.is_empty() {
            vec!["INBOX".into()]
        } else {
            list
        }
    }

    fn from_row(row: &Row) -> Result<Identity, StoreError> {
        const W: &str = "user_identity row";
        Ok(Identity {
            user_id: col(row, "user_id", W)?.ok_or_else(|| decode(W, "null user_id"))?,
            identity_id: col(row, "identity_id", W)?
                .ok_or_else(|| decode(W, "null identity_id"))?,
            credentials: text_map(row, "credentials", W)?,
            display_name: col(row, "display_name", W)?.unwrap_or_default(),
            identifier: col(row, "identifier", W)?.unwrap_or_default(),
            infos: text_map(row, "infos", W)?,
            last_check: col(row, "last_check", W)?,
            protocol: text_col(row, "protocol", W)?,
            status: text_col(row, "status", W)?,
            kind: text_col(row, "type", W)?,
        })
    }
}

const SELECT_ONE: &str = "SELECT user_id, identity_id, credentials, display_name, identifier, \
     infos, last_check, protocol, status, type FROM {ks}.user_identity \
     WHERE user_id = ? AND identity_id = ?";
const SELECT_USER: &str = "SELECT user_id, identity_id, credentials, display_name, identifier, \
     infos, last_check, protocol, status, type FROM {ks}.user_identity WHERE user_id = ?";
const SCAN: &str = "SELECT user_id, identity_id, infos, last_check, protocol, status, type \
     FROM {ks}.user_identity";
const INSERT: &str = "INSERT INTO {ks}.user_identity (user_id, identity_id, credentials, \
     display_name, identifier, infos, last_check, protocol, status, type) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
const INSERT_LOOKUP: &str = "INSERT INTO {ks}.identity_lookup \
     (identifier, protocol, user_id, identity_id) VALUES (?, ?, ?, ?)";
const INSERT_TYPE_LOOKUP: &str = "INSERT INTO {ks}.identity_type_lookup \
     (type, user_id, identity_id) VALUES (?, ?, ?)";
const SELECT_LOOKUP: &str = "SELECT identity_id FROM {ks}.identity_lookup \
     WHERE identifier = ? AND protocol = ? AND user_id = ?";
const DELETE: &str = "DELETE FROM {ks}.user_identity WHERE user_id = ? AND identity_id = ?";
const DELETE_LOOKUP: &str = "DELETE FROM {ks}.identity_lookup \
     WHERE identifier = ? AND protocol = ? AND user_id = ?";
const DELETE_TYPE_LOOKUP: &str = "DELETE FROM {ks}.identity_type_lookup \
     WHERE type = ? AND user_id = ? AND identity_id = ?";
const MERGE_INFOS: &str = "UPDATE {ks}.user_identity SET infos = infos + ? \
     WHERE user_id = ? AND identity_id = ?";
const REMOVE_INFOS: &str = "UPDATE {ks}.user_identity SET infos = infos - ? \
     WHERE user_id = ? AND identity_id = ?";
const MERGE_CREDENTIALS: &str = "UPDATE {ks}.user_identity SET credentials = credentials + ? \
     WHERE user_id = ? AND identity_id = ?";
const SET_LAST_CHECK: &str = "UPDATE {ks}.user_identity SET last_check = ? \
     WHERE user_id = ? AND identity_id = ?";
const SET_STATUS: &str = "UPDATE {ks}.user_identity SET status = ? \
     WHERE user_id = ? AND identity_id = ?";

/// A lighter row for the poller's scan (no credentials).
#[derive(Debug, Clone, PartialEq)]
pub struct ScanRow {
    pub user_id: Uuid,
    pub identity_id: Uuid,
    pub infos: HashMap<String, String>,
    pub last_check: Option<DateTime<Utc>>,
    pub protocol: Protocol,
    pub status: Status,
    pub kind: IdentityKind,
}

/// A text column read into one of the enums above (null reads as empty).
fn text_col<T: for<'a> From<&'a str>>(row: &Row, name: &str, what: &str) -> Result<T, StoreError> {
    let text: Option<String> = col(row, name, what)?;
    Ok(T::from(text.as_deref().unwrap_or("")))
}

impl Store {
    pub async fn identity(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
    ) -> Result<Option<Identity>, StoreError> {
        let rows = self
            .rows(SELECT_ONE, query_values!(user_id, identity_id))
            .await?;
        rows.first().map(Identity::from_row).transpose()
    }

    pub async fn identities_of(&self, user_id: Uuid) -> Result<Vec<Identity>, StoreError> {
        let rows = self.rows(SELECT_USER, query_values!(user_id)).await?;
        rows.iter().map(Identity::from_row).collect()
    }

    /// The identity id of `identifier` for `user_id`, under any of the
    /// remote email protocols (`email`, legacy `imap`).
    pub async fn lookup_identity(
        &self,
        user_id: Uuid,
        identifier: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        let identifier = identifier.to_lowercase();
        for protocol in [PROTOCOL_EMAIL, PROTOCOL_IMAP_LEGACY] {
            let rows = self
                .rows(
                    SELECT_LOOKUP,
                    query_values!(identifier.clone(), protocol, user_id),
                )
                .await?;
            if let Some(r) = rows.first() {
                if let Some(id) = col::<Uuid>(r, "identity_id", "identity_lookup row")? {
                    return Ok(Some(id));
                }
            }
        }
        Ok(None)
    }

    /// Write a new identity and both lookup rows.
    pub async fn insert_identity(&self, id: &Identity) -> Result<(), StoreError> {
        self.exec(
            INSERT,
            query_values!(
                id.user_id,
                id.identity_id,
                id.credentials.clone(),
                id.display_name.clone(),
                id.identifier.clone(),
                id.infos.clone(),
                id.last_check,
                id.protocol.to_string(),
                id.status.to_string(),
                id.kind.to_string()
            ),
        )
        .await?;
        self.exec(
            INSERT_LOOKUP,
            query_values!(
                id.identifier.clone(),
                id.protocol.to_string(),
                id.user_id,
                id.identity_id
            ),
        )
        .await?;
        self.exec(
            INSERT_TYPE_LOOKUP,
            query_values!(id.kind.to_string(), id.user_id, id.identity_id),
        )
        .await?;
        Ok(())
    }

    /// Delete an identity and its lookup rows.
    pub async fn delete_identity(&self, id: &Identity) -> Result<(), StoreError> {
        self.exec(
            DELETE_LOOKUP,
            query_values!(id.identifier.clone(), id.protocol.to_string(), id.user_id),
        )
        .await?;
        self.exec(
            DELETE_TYPE_LOOKUP,
            query_values!(id.kind.to_string(), id.user_id, id.identity_id),
        )
        .await?;
        self.exec(DELETE, query_values!(id.user_id, id.identity_id))
            .await?;
        Ok(())
    }

    /// Set some `infos` entries, leaving the others alone.
    pub async fn merge_infos(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        entries: HashMap<String, String>,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.exec(MERGE_INFOS, query_values!(entries, user_id, identity_id))
            .await
            .map(|_| ())
    }

    /// Remove some `infos` entries.
    pub async fn remove_infos(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        keys: &[&str],
    ) -> Result<(), StoreError> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        self.exec(REMOVE_INFOS, query_values!(keys, user_id, identity_id))
            .await
            .map(|_| ())
    }

    pub async fn merge_credentials(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        entries: HashMap<String, String>,
    ) -> Result<(), StoreError> {
        self.exec(
            MERGE_CREDENTIALS,
            query_values!(entries, user_id, identity_id),
        )
        .await
        .map(|_| ())
    }

    pub async fn set_last_check(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.exec(SET_LAST_CHECK, query_values!(at, user_id, identity_id))
            .await
            .map(|_| ())
    }

    pub async fn set_status(
        &self,
        user_id: Uuid,
        identity_id: Uuid,
        status: impl Into<Status>,
    ) -> Result<(), StoreError> {
        self.exec(
            SET_STATUS,
            query_values!(status.into().to_string(), user_id, identity_id),
        )
        .await
        .map(|_| ())
    }

    /// One page of a full scan of `user_identity` (the poller's).
    pub async fn scan_identities(
        &self,
        page_size: i32,
        state: Option<cdrs_tokio::types::CBytes>,
    ) -> Result<(Vec<ScanRow>, Option<cdrs_tokio::types::CBytes>), StoreError> {
        const W: &str = "user_identity scan";
        let (rows, next) = self
            .page(SCAN, QueryValues::SimpleValues(vec![]), page_size, state)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(ScanRow {
                user_id: col(row, "user_id", W)?.ok_or_else(|| decode(W, "null user_id"))?,
                identity_id: col(row, "identity_id", W)?
                    .ok_or_else(|| decode(W, "null identity_id"))?,
                infos: text_map(row, "infos", W)?,
                last_check: col(row, "last_check", W)?,
                protocol: text_col(row, "protocol", W)?,
                status: text_col(row, "status", W)?,
                kind: text_col(row, "type", W)?,
            });
        }
        Ok((out, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_credentials() {
        let mut id = Identity::default();
        id.credentials
            .insert(creds::PASSWORD_IN.into(), "hunter2".into());
        let shown = format!("{id:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("inpassword"));
    }

    #[test]
    fn column_values_round_trip_as_stored() {
        for text in ["active", "inactive", "", "Paused"] {
            assert_eq!(Status::parse(text).as_str(), text);
        }
        assert_eq!(Status::parse("active"), Status::Active);
        assert_eq!(Protocol::parse("imap"), Protocol::ImapLegacy);
        assert_eq!(IdentityKind::parse("remote"), IdentityKind::Remote);
        assert_eq!(Protocol::parse("twitter"), "twitter");
    }

    #[test]
    fn the_error_streak_reads_and_writes_caliopens_keys() {
        let mut id = Identity::default();
        assert_eq!(id.error_streak(), ErrorStreak::default());
        let t0 = parse_time("2026-01-02T03:04:05Z").unwrap();
        let e = id.error_streak().record("refused".into(), t0, true);
        assert_eq!(e[infos::ERRORS_COUNT], "1");
        assert_eq!(e[infos::FIRST_ERROR_DATE], "2026-01-02T03:04:05Z");
        assert_eq!(e[infos::LAST_ERROR_DATE], "2026-01-02T03:04:05Z");
        assert_eq!(e[infos::LAST_FETCH_ERROR], "refused");
        id.infos.extend(e);
        // A Go worker's date with an offset is read too.
        id.infos.insert(
            infos::FIRST_ERROR_DATE.into(),
            "2026-01-02T04:04:05+01:00".into(),
        );
        let t1 = t0 + chrono::Duration::hours(1);
        let e = id.error_streak().record("again".into(), t1, true);
        assert_eq!(e[infos::ERRORS_COUNT], "2");
        assert_eq!(e[infos::FIRST_ERROR_DATE], "2026-01-02T03:04:05Z");
        // Ours do not count: text and date only.
        let e = id.error_streak().record("ours".into(), t1, false);
        assert_eq!(e.len(), 2);
        assert!(id.has_error_keys());
    }

    #[test]
    fn a_throttling_is_kept_and_read_back() {
        let t0 = parse_time("2026-01-02T03:04:05Z").unwrap();
        let (k, v) = Throttle::entry("limit", t0, "imap.example.com:993");
        assert_eq!(k, infos::THROTTLED);
        assert_eq!(v, "limit 2026-01-02T03:04:05Z imap.example.com:993");
        let t = Throttle::parse(&v).unwrap();
        assert_eq!(
            (t.reason.as_str(), t.at.as_str(), t.server.as_str()),
            ("limit", "2026-01-02T03:04:05Z", "imap.example.com:993")
        );
        assert_eq!(Throttle::parse("limit yesterday x"), None);
        assert_eq!(Throttle::parse(""), None);
        assert!(
            ErrorStreak::KEYS.contains(&infos::THROTTLED),
            "a clean sync clears it"
        );
    }

    #[test]
    fn the_syncing_marker_and_the_checkpoint_keys() {
        let mut id = Identity::default();
        assert!(id.syncing().is_none());
        assert_eq!((id.uidvalidity(), id.lastseenuid()), (None, 0));
        id.infos.insert(
            infos::SYNCING.into(),
            "2026-01-02T03:04:05.123456789Z".into(),
        );
        let m = id.syncing().unwrap();
        assert_eq!(m.owner, "");
        assert_eq!(m.text, "2026-01-02T03:04:05.123456789Z");
        assert!(m.since.is_some());
        id.infos.insert(infos::UIDVALIDITY.into(), " 7".into());
        id.infos.insert(infos::LASTSEENUID.into(), "x".into());
        assert_eq!((id.uidvalidity(), id.lastseenuid()), (Some(7), 0));
    }

    #[test]
    fn mailboxes_default_to_inbox() {
        let mut id = Identity::default();
        assert_eq!(id.mailboxes(), vec!["INBOX"]);
        id.infos
            .insert(infos::MAILBOXES.into(), "INBOX, Archive ,".into());
        assert_eq!(id.mailboxes(), vec!["INBOX", "Archive"]);
        // INBOX is one mailbox in any case; other names keep their case.
        id.infos.insert(
            infos::MAILBOXES.into(),
            "inbox,Archive,Inbox,archive".into(),
        );
        assert_eq!(id.mailboxes(), vec!["INBOX", "Archive", "archive"]);
    }
}
