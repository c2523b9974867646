//! Serde types of every JSON shape exchanged over NATS (CONTRACT §2, §5).
//!
//! Only data lives here; the code acting on it is in `worker/`, `poller/` and
//! `ctl/`. Field names and order follow the Go structs of Caliopen, which
//! emit every field (no `omitempty`), so we do too, and we accept payloads
//! where any field is missing. The unit tests pin the exact JSON.

use serde::{Deserialize, Serialize};

/// An order to the workers on `nats_topic_sender` (Go `IMAPorder`), also the
/// `deliver` order (which carries `message_id`). Its `Debug` hides the
/// password; the JSON carries it, as the contract says.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImapOrder {
    pub order: String,
    pub user_id: String,
    pub identity_id: String,
    pub login: String,
    pub mailbox: String,
    pub password: String,
    pub server: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message_id: String,
}

impl std::fmt::Debug for ImapOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapOrder")
            .field("order", &self.order)
            .field("user_id", &self.user_id)
            .field("identity_id", &self.identity_id)
            .field("login", &self.login)
            .field("mailbox", &self.mailbox)
            .field("password", &hidden(&self.password))
            .field("server", &self.server)
            .field("message_id", &self.message_id)
            .finish()
    }
}

/// What `Debug` shows of a secret: whether there is one, never what.
pub fn hidden(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "<hidden>"
    }
}

/// Order names workers understand.
pub mod orders {
    pub const SYNC: &str = "sync";
    pub const FULLFETCH: &str = "fullfetch";
    pub const DELIVER: &str = "deliver";
    pub const TEST: &str = "test";
    pub const NEED_JOB: &str = "need_job";
    pub const NO_PENDING_JOB: &str = "no pending job";
    pub const PROCESS_RAW: &str = "process_raw";
    pub const CACHE_ADD: &str = "add";
    pub const CACHE_DELETE: &str = "delete";
    pub const CACHE_UPDATE_INTERVAL: &str = "update_interval";
}

/// A worker asking the poller for work: `{"worker":"id","order":{"order":"need_job"}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NeedJob {
    pub worker: String,
    pub order: OrderName,
}

/// `{"order": "..."}` alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrderName {
    pub order: String,
}

/// The poller's answer to `need_job`: a job, or only `order` set to
/// `no pending job` / `error ...`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Job {
    pub message_id: String,
    pub order: String,
    pub identity_id: String,
    pub user_id: String,
}

/// Orders to the poller's cache on `idCache`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheOrder {
    pub identity_id: String,
    pub order: String,
    pub order_param: String,
    pub protocol: String,
    pub user_id: String,
}

/// The hand-off of one stored raw message to Caliopen's processor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessRaw {
    pub order: String,
    pub user_id: String,
    pub identity_id: String,
    pub message_id: String,
}

/// The processor's answer: `message*` fields on success, `error` on failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessRawReply {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub discussion_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The downstream text meaning "already there", which counts as success.
pub const ALREADY_IMPORTED: &str = "message already imported for this user";

impl ProcessRawReply {
    /// Did the hand-off succeed (a duplicate counts as success)?
    pub fn is_success(&self) -> bool {
        self.error.is_empty() || self.error.contains(ALREADY_IMPORTED)
    }
}

/// Reply of the SMTP sender, forwarded to whoever asked for a `deliver`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeliveryReply {
    pub error: bool,
    pub message: String,
}

/// What a worker answers when an order came as a request (ours, used by
/// `imapctl --wait`): counts and the error, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobReport {
    pub order: String,
    pub user_id: String,
    pub identity_id: String,
    /// `true` when everything asked for was done.
    pub ok: bool,
    /// `true` while a job is running (progress reports), `false` in the final one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub progress: bool,
    pub mailboxes: Vec<String>,
    /// Messages read from the server.
    pub fetched: u64,
    /// Messages stored and accepted by the processor (or stored, in store-only mode).
    pub handed_off: u64,
    /// Messages already delivered earlier, not handed off again.
    pub already_delivered: u64,
    /// Messages whose store or hand-off failed this time (retried next sync).
    pub failed: u64,
    /// Messages that failed too often and were stepped over (listed for operators).
    pub stepped_over: u64,
    /// Set when the job failed or was skipped.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The job was cut short by the worker's shutdown: what was reached is
    /// saved, the rest waits for the next sync.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// The sync did not run: another sync of the identity holds it (its
    /// lock, or a Go worker's `syncing` marker). Not a failure: a conflict.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub busy: bool,
    /// The job stopped on an outage of ours (processor, NATS, Cassandra,
    /// object store), not of the remote account: nothing was stepped over.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub outage: bool,
    /// The server throttled us (a load or limit answer, a BYE at login), or
    /// its host is being backed off after one: nothing was counted against
    /// the account, run it again later.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub throttled: bool,
    /// Messages that can never be handed off, stepped over by this job, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stepped: Vec<ReportedMessage>,
    /// Mailboxes that could not be synced (missing, unselectable...), with why;
    /// the other mailboxes of the identity were synced all the same.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mailbox_errors: Vec<ReportedMailbox>,
    /// Mailboxes a sync considered, skipped on their STATUS without EXAMINE,
    /// and opened (EXAMINE).
    #[serde(skip_serializing_if = "is_zero")]
    pub folders_checked: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub folders_skipped: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub folders_examined: u64,
    /// Flag changes and expunges recorded in `imap_message_change`.
    #[serde(skip_serializing_if = "is_zero")]
    pub changes_recorded: u64,
    /// IMAP commands the job sent, LOGIN and LOGOUT included.
    #[serde(skip_serializing_if = "is_zero")]
    pub imap_commands: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A message named in a [`JobReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportedMessage {
    pub mailbox: String,
    pub uid: u32,
    pub reason: String,
}

/// A mailbox named in a [`JobReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportedMailbox {
    pub mailbox: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imap_order_matches_go() {
        // What Caliopen's Go side marshals for an IMAPorder.
        let go = r#"{"order":"sync","user_id":"u","identity_id":"i","login":"","mailbox":"","password":"","server":""}"#;
        let o: ImapOrder = serde_json::from_str(go).unwrap();
        assert_eq!(o.order, "sync");
        assert_eq!(serde_json::to_string(&o).unwrap(), go);
    }

    #[test]
    fn imap_order_debug_hides_the_password() {
        let o = ImapOrder {
            order: "fullfetch".into(),
            login: "bob".into(),
            password: "s3cr3t-pw".into(),
            ..Default::default()
        };
        let d = format!("{o:?} {o:#?}");
        assert!(!d.contains("s3cr3t-pw"), "{d}");
        assert!(d.contains("<hidden>") && d.contains("bob"), "{d}");
        // The JSON still carries it.
        assert!(serde_json::to_string(&o).unwrap().contains("s3cr3t-pw"));
    }

    #[test]
    fn deliver_order_keeps_message_id() {
        let o: ImapOrder = serde_json::from_str(
            r#"{"order":"deliver","user_id":"u","identity_id":"i","message_id":"m"}"#,
        )
        .unwrap();
        assert_eq!(o.message_id, "m");
        assert!(serde_json::to_string(&o)
            .unwrap()
            .contains(r#""message_id":"m""#));
    }

    #[test]
    fn need_job_matches_go() {
        let go = r#"{"worker":"w1","order":{"order":"need_job"}}"#;
        let n: NeedJob = serde_json::from_str(go).unwrap();
        assert_eq!(n.order.order, orders::NEED_JOB);
        assert_eq!(serde_json::to_string(&n).unwrap(), go);
    }

    #[test]
    fn job_replies_match_go() {
        let go = r#"{"message_id":"","order":"sync","identity_id":"i","user_id":"u"}"#;
        let j: Job = serde_json::from_str(go).unwrap();
        assert_eq!(serde_json::to_string(&j).unwrap(), go);
        let none: Job = serde_json::from_str(r#"{"order":"no pending job"}"#).unwrap();
        assert_eq!(none.order, orders::NO_PENDING_JOB);
        let err: Job = serde_json::from_str(r#"{"order":"error : unknown order"}"#).unwrap();
        assert!(err.order.starts_with("error"));
    }

    #[test]
    fn cache_order_matches_go() {
        let go = r#"{"identity_id":"i","order":"add","order_param":"15","protocol":"email","user_id":"u"}"#;
        let c: CacheOrder = serde_json::from_str(go).unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), go);
    }

    #[test]
    fn process_raw_and_replies() {
        let go = r#"{"order":"process_raw","user_id":"u","identity_id":"i","message_id":"m"}"#;
        let p: ProcessRaw = serde_json::from_str(go).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), go);
        let ok: ProcessRawReply =
            serde_json::from_str(r#"{"message":"OK","message_id":"x","discussion_id":"d"}"#)
                .unwrap();
        assert!(ok.is_success());
        let dup: ProcessRawReply =
            serde_json::from_str(r#"{"error":"message already imported for this user"}"#).unwrap();
        assert!(dup.is_success());
        let bad: ProcessRawReply = serde_json::from_str(r#"{"error":"store down"}"#).unwrap();
        assert!(!bad.is_success());
    }

    #[test]
    fn delivery_reply() {
        let r: DeliveryReply = serde_json::from_str(r#"{"error":false,"message":"sent"}"#).unwrap();
        assert!(!r.error);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"error":false,"message":"sent"}"#
        );
    }
}
