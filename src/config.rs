//! The one configuration loader of every mode.
//!
//! Layers, later wins: built-in defaults (written next to each key below), the
//! YAML file (`-c/--config`, else `$CALIOPEN_IMAP_CONFIG`, else the first of
//! `/etc/caliopen/<name>.yaml`, `$CALIOPENROOT/src/backend/configs/<name>.yaml`
//! and `./<name>.yaml` that exists), then environment variables
//! `CALIOPEN_IMAP_<KEY>` with `__` between nested keys
//! (`CALIOPEN_IMAP_STORE_SETTINGS__KEYSPACE=test`).
//!
//! The key names are Caliopen's own (`imapworker.yaml`, `idpoller.yaml`), so a
//! file written for the Go binaries loads unchanged. Keys for features done
//! downstream (indexing) are accepted and ignored; settings that would change
//! behaviour but are not implemented (`use_vault: true`) are refused by
//! [`WorkerSettings::validate`] rather than silently ignored. Settings that
//! Caliopen's files do not have live in our own sections (`imap:`, `poller:`).
//!
//! Secrets (passwords, keys, credentials in URLs) never leave this module in
//! clear: [`redacted_json`] is what `config` subcommands print.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A configuration that cannot be found, read, parsed or accepted: one line
/// naming the source, the key and what was expected. The edge (`error.rs`)
/// maps it to the usage exit code; nothing here knows about exit codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `log_format`: how log lines are written (the logging module applies it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "CALIOPEN_IMAP_";

// ------------------------------------------------------------------ shared

/// Declare a settings section with each key's default written beside it
/// (the struct and its `Default` in one place, as stalwart writes them).
macro_rules! section {
    ($(#[$m:meta])* pub struct $name:ident {
        $($(#[$fm:meta])* pub $field:ident: $ty:ty = $default:expr,)*
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $($field: $default,)*
                }
            }
        }
    };
}

section! {
    /// `store_settings`: where state and raw messages live.
    pub struct StoreSettings {
        /// Cassandra contact points, `host` or `host:port` (port 9042 when absent).
        pub hosts: Vec<String> = vec!["127.0.0.1:9042".into()],
        /// Keyspace holding Caliopen's tables.
        pub keyspace: String = "caliopen".into(),
        /// gocql numbering: 1 = ONE, 4 = QUORUM, 6 = LOCAL_QUORUM...
        pub consistency_level: u16 = 1,
        /// Raw messages strictly larger than this (bytes) go to the object store,
        /// the row keeping only their `uri` (Caliopen's rule). At least 1.
        pub raw_size_limit: u64 = 1_048_576,
        /// Object store kind: only `s3` is supported. Needed (with an endpoint)
        /// when `imap.max_message_size` exceeds `raw_size_limit`.
        pub object_store: String = "s3".into(),
        pub object_store_settings: ObjectStoreSettings = ObjectStoreSettings::default(),
        /// Secrets from Vault: not implemented, so `true` is refused.
        pub use_vault: bool = false,
        pub vault_settings: VaultSettings = VaultSettings::default(),
        /// Optional Cassandra authentication (not in Caliopen's files).
        pub username: String = String::new(),
        pub password: String = String::new(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectStoreSettings {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub location: String,
    pub buckets: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct VaultSettings {
    pub url: String,
    pub username: String,
    pub password: String,
}

impl StoreSettings {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.hosts.is_empty() {
            errors.push("store_settings.hosts: expected at least one Cassandra host".into());
        }
        for h in &self.hosts {
            if let Err(e) = split_host_port(h, 9042) {
                errors.push(format!("store_settings.hosts: {e}"));
            }
        }
        if self.keyspace.is_empty()
            || !self
                .keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            errors.push(format!(
                "store_settings.keyspace: expected a CQL identifier, found {:?}",
                self.keyspace
            ));
        }
        if !(1..=10).contains(&self.consistency_level) {
            errors.push(format!(
                "store_settings.consistency_level: expected a gocql level 1..10 \
                 (1 = ONE, 4 = QUORUM, 6 = LOCAL_QUORUM), found {}",
                self.consistency_level
            ));
        }
        if self.use_vault {
            errors.push(
                "store_settings.use_vault: Vault is not supported by caliopen-imap; \
                 set it to false (credentials are read from Cassandra)"
                    .into(),
            );
        }
    }
}

fn validate_store_name(name: &str, errors: &mut Vec<String>) {
    if name != "cassandra" {
        errors.push(format!(
            "store_name: only \"cassandra\" is supported, found {name:?}"
        ));
    }
}

/// Split `host[:port]` into its parts; IPv6 literals go in brackets.
pub fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty host".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unclosed '[' in IPv6 address"))?;
        match tail.strip_prefix(':') {
            Some(p) => (h.to_string(), Some(p)),
            None if tail.is_empty() => (h.to_string(), None),
            None => return Err(format!("{s:?}: expected host:port")),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            Some(_) => return Err(format!("{s:?}: put IPv6 addresses in brackets")),
            None => (s.to_string(), None),
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("{s:?}: expected host:port"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: port must be a number from 1 to 65535"))?,
    };
    Ok((host, port))
}

// ------------------------------------------------------------------ worker

/// Settings of `imapworker` and `imapctl` (Caliopen's `imapworker.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// Jobs (syncs, fullfetches) run at once by one worker process.
    pub workers: usize,
    /// Name of this host, used in worker ids and the X-Fetched-Imap header.
    pub hostname: String,
    pub nats_url: String,
    /// Queue group shared by all workers.
    pub nats_queue: String,
    /// Subject where the poller serves jobs (`need_job`).
    pub nats_topic_poller: String,
    /// Subject of the poller's cache orders (`add`, `delete`...).
    pub nats_topic_poller_cache: String,
    /// Subject of orders to workers.
    pub nats_topic_sender: String,
    /// Older Caliopen files have it; accepted and unused.
    pub nats_topic_fetcher: String,
    pub store_name: String,
    pub store_settings: StoreSettings,
    #[serde(rename = "LDAConfig")]
    pub lda: LdaConfig,
    /// `text` (default) or `json` lines; env `CALIOPEN_IMAP_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `host:port` of the HTTP server for `/metrics`, `/healthz`, `/readyz`;
    /// empty (the default): no server.
    pub metrics_addr: String,
    /// caliopen-imap's own settings.
    pub imap: ImapSettings,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            workers: 10,
            hostname: default_hostname(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_queue: "IMAPworkers".into(),
            nats_topic_poller: "imapJobs".into(),
            nats_topic_poller_cache: "idCache".into(),
            nats_topic_sender: "outboundIMAP".into(),
            nats_topic_fetcher: String::new(),
            store_name: "cassandra".into(),
            store_settings: StoreSettings::default(),
            lda: LdaConfig::default(),
            log_format: Default::default(),
            metrics_addr: String::new(),
            imap: ImapSettings::default(),
        }
    }
}

section! {
    /// `LDAConfig`: the downstream message processor.
    pub struct LdaConfig {
        pub broker_type: String = "imap".into(),
        pub lda_workers_size: u32 = 2,
        pub log_received_mails: bool = false,
        /// Indexing happens downstream: accepted and ignored.
        pub index_name: String = String::new(),
        pub index_settings: IndexSettings = IndexSettings::default(),
        /// Subject of the `process_raw` hand-off; empty = store-only mode.
        pub in_topic: String = "inboundSMTP".into(),
        /// Subject of outbound mail (`deliver`).
        pub out_topic: String = "outboundSMTP".into(),
        pub nats_queue: String = "SMTPqueue".into(),
        #[serde(rename = "NotifierConfig")]
        pub notifier: NotifierConfig = NotifierConfig::default(),
        #[serde(rename = "Providers")]
        pub providers: Vec<Provider> = Vec::new(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct IndexSettings {
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NotifierConfig {
    pub admin_username: String,
}

/// An OAuth provider (`gmail`...): client credentials and, beyond Caliopen's
/// keys, `token_url` in `infos` to refresh access tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Provider {
    pub name: String,
    pub protocol: String,
    pub infos: BTreeMap<String, String>,
}

section! {
    /// `imap:`, caliopen-imap's own worker settings (absent from Caliopen's
    /// files). The `*_secs` keys take seconds, or a duration such as `"90s"`,
    /// `"5m"`, `"72h"` ([`secs`]); read them through the `Duration` methods.
    pub struct ImapSettings {
        /// Extra PEM CA file trusted beside the system roots (for example a
        /// private CA). Identities may add their own (`infos.cafile`).
        pub ca_file: String = String::new(),
        /// Allow plaintext IMAP (no TLS at all), and only to loopback addresses.
        pub allow_plaintext_loopback: bool = false,
        /// UIDs asked per `UID FETCH`.
        pub fetch_batch: u32 = 500,
        /// Messages between the fetch and the hand-off at once, per sync.
        pub in_flight: usize = 64,
        /// Save the checkpoint after this many handed-off messages.
        pub checkpoint_every: u32 = 200,
        /// Tries of one message's hand-off before it is stepped over (and listed).
        pub max_message_tries: u32 = 5,
        /// Largest message stored (64 MiB); larger ones are recorded as failures.
        /// Above `store_settings.raw_size_limit` a message goes to the object
        /// store, so this bounds what we accept into it.
        pub max_message_size: u64 = 64 * 1024 * 1024,
        /// TCP + TLS + greeting timeout.
        #[serde(deserialize_with = "secs::deserialize")]
        pub connect_timeout_secs: u64 = 30,
        /// Timeout of one IMAP response.
        #[serde(deserialize_with = "secs::deserialize")]
        pub io_timeout_secs: u64 = 120,
        /// `process_raw` hand-off timeout (Caliopen: 10 s).
        #[serde(deserialize_with = "secs::deserialize")]
        pub lda_timeout_secs: u64 = 10,
        /// Minimum time between two `need_job` requests (Caliopen: 10 s).
        #[serde(deserialize_with = "secs::deserialize")]
        pub poll_throttle_secs: u64 = 10,
        /// On SIGTERM, how long in-flight syncs may run to their checkpoint.
        #[serde(deserialize_with = "secs::deserialize")]
        pub shutdown_grace_secs: u64 = 30,
        /// Life of the sync lock row. The running sync renews it every third of
        /// this, so a worker killed with `kill -9` blocks its identities for at
        /// most this long. At least 30 s (a renewal is a Paxos round).
        #[serde(deserialize_with = "secs::deserialize")]
        pub lock_ttl_secs: u64 = 60,
        /// Longest run of one job; past it the job stops at its next message
        /// boundary, saves its checkpoint and frees its slot (the next sync
        /// resumes). Bounds a server that trickles its replies.
        #[serde(deserialize_with = "secs::deserialize")]
        pub job_deadline_secs: u64 = 3600,
        /// Login failures lasting longer than this disable the identity (72 h).
        #[serde(deserialize_with = "secs::deserialize")]
        pub disable_after_secs: u64 = 72 * 3600,
        /// Live sync: which identities get an IDLE session on INBOX, so new
        /// mail is synced when the server announces it: `identity` (those
        /// whose `infos.idle` is `true`, set by `imapctl addremote --idle`),
        /// `all` (every active remote identity) or `off`.
        pub idle: IdleMode = IdleMode::Identity,
        /// Live sync watches every folder the identity syncs over its one
        /// connection where the server offers NOTIFY (RFC 5465); `false`:
        /// INBOX only, as on servers without it.
        pub idle_notify: bool = true,
        /// IDLE sessions this worker holds at most (its connection budget).
        pub idle_max: u32 = 1000,
        /// Life of a worker's live-sync membership row; renewed every third
        /// of it. A dead worker's identities are picked up by others within
        /// this long and a third; a worker that cannot renew its row for
        /// half of it stops its sessions.
        #[serde(deserialize_with = "secs::deserialize")]
        pub idle_lease_secs: u64 = 30,
        /// IDLE is left and entered again after this long (RFC 2177 asks
        /// for less than 29 minutes, before servers drop the connection).
        #[serde(deserialize_with = "secs::deserialize")]
        pub idle_renew_secs: u64 = 25 * 60,
    }
}

/// `imap.idle`: which identities a worker watches with IDLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleMode {
    /// No IDLE session at all: polling only.
    Off,
    /// Identities whose `infos.idle` is `true`.
    Identity,
    /// Every active remote identity.
    All,
}

impl ImapSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn io_timeout(&self) -> Duration {
        Duration::from_secs(self.io_timeout_secs)
    }
    pub fn lda_timeout(&self) -> Duration {
        Duration::from_secs(self.lda_timeout_secs)
    }
    pub fn poll_throttle(&self) -> Duration {
        Duration::from_secs(self.poll_throttle_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    pub fn job_deadline(&self) -> Duration {
        Duration::from_secs(self.job_deadline_secs)
    }
    pub fn disable_after(&self) -> Duration {
        Duration::from_secs(self.disable_after_secs)
    }
    pub fn idle_lease(&self) -> Duration {
        Duration::from_secs(self.idle_lease_secs)
    }
    pub fn idle_renew(&self) -> Duration {
        Duration::from_secs(self.idle_renew_secs)
    }
}

/// `*_secs` keys: a number of seconds, as in every file written so far, or
/// a duration in the humantime style: `"90s"`, `"5m"`, `"72h"`, `"1h30m"`,
/// `"2d"`. A bad value is one line naming the key (see [`describe`]).
pub mod secs {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        struct Secs;
        impl Visitor<'_> for Secs {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of seconds or a duration such as \"90s\", \"5m\", \"72h\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Secs)
    }

    /// Seconds in `text`: digits alone, or `<n><unit>` pairs with units
    /// `s`, `m`, `h`, `d`.
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let bad = || {
            format!(
                "expected a number of seconds or a duration such as \"90s\", \"5m\", \"72h\", found {text:?}"
            )
        };
        if let Ok(n) = t.parse::<u64>() {
            return Ok(n);
        }
        let mut total: u64 = 0;
        let mut digits = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return Err(bad()),
            };
            let n: u64 = digits.parse().map_err(|_| bad())?;
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(bad)?;
            digits.clear();
        }
        if !digits.is_empty() || t.is_empty() {
            return Err(bad());
        }
        Ok(total)
    }
}

impl WorkerSettings {
    /// Check values that deserialize fine but make no sense.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if !(1..=1000).contains(&self.workers) {
            errors.push(format!(
                "workers: expected 1 to 1000 concurrent jobs, found {}",
                self.workers
            ));
        }
        for (key, v) in [
            ("nats_url", &self.nats_url),
            ("nats_queue", &self.nats_queue),
            ("nats_topic_sender", &self.nats_topic_sender),
            ("nats_topic_poller", &self.nats_topic_poller),
            ("nats_topic_poller_cache", &self.nats_topic_poller_cache),
        ] {
            if v.trim().is_empty() {
                errors.push(format!("{key}: must not be empty"));
            }
        }
        if !self.nats_url.trim().is_empty() {
            if let Err(e) = nats_servers(&self.nats_url) {
                errors.push(e);
            }
        }
        validate_store_name(&self.store_name, &mut errors);
        self.store_settings.validate(&mut errors);
        let i = &self.imap;
        for (key, v, lo, hi) in [
            ("imap.fetch_batch", i.fetch_batch as u64, 1, 100_000),
            ("imap.in_flight", i.in_flight as u64, 1, 10_000),
            (
                "imap.checkpoint_every",
                i.checkpoint_every as u64,
                1,
                1_000_000,
            ),
            (
                "imap.max_message_tries",
                i.max_message_tries as u64,
                1,
                1000,
            ),
            ("imap.connect_timeout_secs", i.connect_timeout_secs, 1, 3600),
            ("imap.io_timeout_secs", i.io_timeout_secs, 1, 3600),
            ("imap.lda_timeout_secs", i.lda_timeout_secs, 1, 3600),
            ("imap.lock_ttl_secs", i.lock_ttl_secs, 30, 3600),
            ("imap.job_deadline_secs", i.job_deadline_secs, 5, 7 * 86400),
            ("imap.idle_max", i.idle_max as u64, 0, 100_000),
            ("imap.idle_lease_secs", i.idle_lease_secs, 3, 3600),
            ("imap.idle_renew_secs", i.idle_renew_secs, 1, 29 * 60 - 1),
            // `raw_size` is a CQL int; 0 would send every message to S3.
            (
                "imap.max_message_size",
                i.max_message_size,
                1,
                i32::MAX as u64,
            ),
            (
                "store_settings.raw_size_limit",
                self.store_settings.raw_size_limit,
                1,
                i32::MAX as u64,
            ),
        ] {
            if v < lo || v > hi {
                errors.push(format!("{key}: expected {lo} to {hi}, found {v}"));
            }
        }
        if !i.ca_file.is_empty() && !Path::new(&i.ca_file).is_file() {
            errors.push(format!("imap.ca_file: no such file {:?}", i.ca_file));
        }
        validate_listen(&self.metrics_addr, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// The servers of `nats_url`. It may list several servers of one NATS
/// cluster, comma-separated (the NATS convention, which Caliopen's Go client
/// follows too): the client connects to any of them and, when that server
/// goes, reconnects to another, so a worker or poller restarted while one
/// node is down still finds the cluster. Each entry must parse as a NATS
/// server address; the error names the key.
pub fn nats_servers(url: &str) -> Result<Vec<String>, String> {
    url.split(',')
        .map(|part| {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!(
                    "nats_url: empty server in {:?} (expected nats://host:port, several separated by commas)",
                    redact_url(url)
                ));
            }
            part.parse::<async_nats::ServerAddr>()
                .map(|_| part.to_string())
                .map_err(|e| format!("nats_url: {:?} is not a NATS server address: {e}", redact_url(part)))
        })
        .collect()
}

/// `metrics_addr`: empty, or an address to listen on (`127.0.0.1:9464`,
/// `[::]:9464`).
fn validate_listen(addr: &str, errors: &mut Vec<String>) {
    if !addr.trim().is_empty() && addr.trim().parse::<std::net::SocketAddr>().is_err() {
        errors.push(format!(
            "metrics_addr: expected ip:port (for example 127.0.0.1:9464), found {addr:?}"
        ));
    }
}

// ------------------------------------------------------------------ poller

/// Settings of `idpoller` (Caliopen's `idpoller.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PollerSettings {
    /// Minutes between two scans of `user_identity`.
    pub scan_interval: u64,
    /// Identity protocols to schedule.
    pub remote_protocols: Vec<String>,
    pub store_name: String,
    pub store_settings: StoreSettings,
    pub nats_url: String,
    /// Queue group of the pollers.
    pub nats_queue: String,
    pub nats_topics: PollerTopics,
    /// `text` (default) or `json` lines; env `CALIOPEN_IMAP_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `host:port` of the HTTP server for `/metrics`, `/healthz`, `/readyz`;
    /// empty (the default): no server.
    pub metrics_addr: String,
    /// caliopen-imap's own poller settings.
    pub poller: PollerOwn,
}

impl Default for PollerSettings {
    fn default() -> Self {
        PollerSettings {
            scan_interval: 180,
            remote_protocols: ["email", "imap", "twitter", "mastodon"]
                .map(String::from)
                .to_vec(),
            store_name: "cassandra".into(),
            store_settings: StoreSettings::default(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_queue: "IDpoller".into(),
            nats_topics: PollerTopics::default(),
            log_format: Default::default(),
            metrics_addr: String::new(),
            poller: PollerOwn::default(),
        }
    }
}

section! {
    /// `nats_topics` of Caliopen's `idpoller.yaml`.
    pub struct PollerTopics {
        pub id_cache: String = "idCache".into(),
        pub imap: String = "imapJobs".into(),
        pub twitter: String = "twitterJobs".into(),
        pub mastodon: String = "mastodonJobs".into(),
    }
}

section! {
    /// `poller:`, caliopen-imap's own poller settings.
    pub struct PollerOwn {
        /// Seconds in one "minute" of `pollinterval` / `scan_interval`. 60 in
        /// production; tests set 1 to get sub-minute intervals.
        #[serde(deserialize_with = "secs::deserialize")]
        pub minute_secs: u64 = 60,
        /// Leader lease time to live: a standby takes over within it.
        #[serde(deserialize_with = "secs::deserialize")]
        pub lease_ttl_secs: u64 = 15,
        /// Name of the lease row: pollers sharing it form one leader/standby group.
        pub lease_name: String = "idpoller".into(),
        /// Most jobs waiting in one queue; beyond it the oldest due jobs wait for
        /// the next tick instead of piling up.
        pub queue_limit: usize = 200_000,
        /// Concurrent Cassandra reads while scanning.
        pub scan_concurrency: usize = 16,
    }
}

impl PollerOwn {
    pub fn minute(&self) -> Duration {
        Duration::from_secs(self.minute_secs)
    }
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }
}

impl PollerSettings {
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if self.scan_interval == 0 {
            errors.push("scan_interval: expected a number of minutes above 0".into());
        }
        if self.remote_protocols.is_empty() {
            errors.push("remote_protocols: expected at least one protocol".into());
        }
        if let Err(e) = nats_servers(&self.nats_url) {
            errors.push(e);
        }
        validate_store_name(&self.store_name, &mut errors);
        self.store_settings.validate(&mut errors);
        if self.poller.minute_secs == 0 {
            errors.push("poller.minute_secs: expected 1 or more".into());
        }
        validate_listen(&self.metrics_addr, &mut errors);
        if !(3..=600).contains(&self.poller.lease_ttl_secs) {
            errors.push(format!(
                "poller.lease_ttl_secs: expected 3 to 600, found {}",
                self.poller.lease_ttl_secs
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

// ------------------------------------------------------------------ loading

/// What `-c` and `--configpath` name, as a file to load.
///
/// The Go binaries took `-c NAME` (viper's config name, no extension) and
/// searched `--configpath`, then `$CALIOPENROOT/src/backend/configs/`, then
/// the working directory. We keep that, and keep `-c FILE`: a value that is
/// an existing file, or ends in `.yaml`/`.yml`, is a file. `--configpath`
/// alone searches for the mode's Go default name (`go_name`). Neither given:
/// `None`, and [`config_path`] picks the default.
pub fn locate(
    config: Option<&Path>,
    configpath: Option<&Path>,
    go_name: &str,
) -> Result<Option<PathBuf>, ConfigError> {
    let name = match (config, configpath) {
        (None, None) => return Ok(None),
        (Some(c), _) => {
            let is_file_name = c
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
            if is_file_name || c.is_file() {
                return Ok(Some(c.to_path_buf()));
            }
            c.to_string_lossy().into_owned()
        }
        (None, Some(_)) => go_name.to_string(),
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    dirs.extend(configpath.map(Path::to_path_buf));
    if let Some(root) = std::env::var_os("CALIOPENROOT").filter(|r| !r.is_empty()) {
        dirs.push(PathBuf::from(root).join("src/backend/configs"));
    }
    dirs.push(PathBuf::from("."));
    for dir in &dirs {
        for ext in ["yaml", "yml"] {
            let candidate = dir.join(format!("{name}.{ext}"));
            if candidate.is_file() {
                return Ok(Some(candidate));
            }
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(ConfigError(format!(
        "config {name:?}: no {name}.yaml or {name}.yml in {}",
        searched.join(", ")
    )))
}

/// Where the file layer comes from.
pub fn config_path(explicit: Option<&Path>, mode_file: &str) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(format!("{ENV_PREFIX}CONFIG")) {
        if !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    // Then where the Go binaries looked with no flag at all (their default
    // name, in $CALIOPENROOT/src/backend/configs/ and the working directory).
    let mut candidates = vec![PathBuf::from(format!("/etc/caliopen/{mode_file}.yaml"))];
    if let Some(root) = std::env::var_os("CALIOPENROOT").filter(|r| !r.is_empty()) {
        candidates.push(PathBuf::from(root).join(format!("src/backend/configs/{mode_file}.yaml")));
    }
    candidates.push(PathBuf::from(format!("{mode_file}.yaml")));
    candidates.into_iter().find(|p| p.is_file())
}

/// Load settings: defaults, then the file, then the environment. Any error
/// comes back as one line naming the source, the key and what was expected.
pub fn load<T>(path: Option<&Path>) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned,
{
    let text = match path {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!("config file {}: cannot read: {e}", path.display()))
        })?,
        None => String::new(),
    };
    from_yaml_str(&text, path)
}

/// [`load`] with the file's text already read: defaults, then `text` (YAML;
/// blank means no file), then the environment. `path` only names the source
/// in errors. One path for the daemons and the config fuzzer.
pub fn from_yaml_str<T>(text: &str, path: Option<&Path>) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned,
{
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    // A YAML file whose top level is not a mapping is an error, not an
    // empty configuration.
    if !text.trim().is_empty() {
        fig = fig.merge(Yaml::string(text));
    }
    fig = fig.merge(env_provider());
    fig.extract::<T>()
        .map_err(|e| ConfigError(describe(e, path)))
}

/// `CALIOPEN_IMAP_A__B` sets key `a.b`. Caliopen's two CamelCase sections keep
/// their case so an override reaches them too.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .ignore(&["CONFIG", "LOG"])
        .map(|key| {
            let path = key.as_str().to_ascii_lowercase().replace("__", ".");
            let mut parts: Vec<String> = path.split('.').map(str::to_string).collect();
            for p in parts.iter_mut() {
                match p.as_str() {
                    "ldaconfig" => *p = "LDAConfig".into(),
                    "notifierconfig" => *p = "NotifierConfig".into(),
                    "providers" => *p = "Providers".into(),
                    _ => {}
                }
            }
            parts.join(".").into()
        })
        .lowercase(false)
}

fn describe(err: figment::Error, path: Option<&Path>) -> String {
    let mut lines = Vec::new();
    for e in err {
        let source = match e.metadata.as_ref() {
            Some(m) if m.name.contains("environment") => "environment".to_string(),
            Some(m) if m.name.contains("Serialized") => "defaults".to_string(),
            _ => match path {
                Some(p) => format!("config file {}", p.display()),
                None => "configuration".into(),
            },
        };
        let key = e.path.join(".");
        let key = if key.is_empty() {
            "top level".to_string()
        } else if source == "environment" {
            format!(
                "variable {ENV_PREFIX}{}",
                key.to_uppercase().replace('.', "__")
            )
        } else {
            format!("key {key}")
        };
        let kind = match &e.kind {
            figment::error::Kind::Message(m) => m.clone(),
            k => k.to_string(),
        };
        lines.push(format!("{source}: {key}: {kind}"));
    }
    lines.join("; ")
}

/// Turn validation messages into the one error line.
pub fn invalid(path: Option<&Path>, errors: Vec<String>) -> ConfigError {
    let source = match path {
        Some(p) => format!("config file {}", p.display()),
        None => "configuration".into(),
    };
    ConfigError(format!("{source}: {}", errors.join("; ")))
}

fn default_hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

// ------------------------------------------------------------------ printing

/// Keys whose values are secrets wherever they appear.
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k == "access_key"
        || k.contains("token")
        || k == "inpassword"
}

/// Settings as pretty JSON with every secret replaced by `"<redacted>"` and
/// credentials removed from URLs.
pub fn redacted_json<T: Serialize>(settings: &T) -> String {
    let mut v = serde_json::to_value(settings).unwrap_or(serde_json::Value::Null);
    redact(&mut v, "");
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn redact(v: &mut serde_json::Value, key: &str) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                redact(v, k);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| redact(v, key)),
        Value::String(s) if is_secret_key(key) && !s.is_empty() => {
            *s = "<redacted>".into();
        }
        Value::String(s) => *s = redact_url(s),
        _ => {}
    }
}

/// `nats://user:pass@host` → `nats://<redacted>@host`; each server of a
/// comma-separated list (`nats_url`) on its own.
pub fn redact_url(s: &str) -> String {
    if s.contains(',') && s.contains("://") {
        return s.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        if let Some((_, host)) = rest.rsplit_once('@') {
            return format!("{scheme}://<redacted>@{host}");
        }
    }
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secs_keys_take_numbers_as_before_or_durations() {
        let s: WorkerSettings = from_yaml_str(
            "imap:\n  lock_ttl_secs: 90\n  job_deadline_secs: 2h\n  disable_after_secs: \"1d12h\"\n",
            None,
        )
        .unwrap();
        assert_eq!(s.imap.lock_ttl_secs, 90);
        assert_eq!(s.imap.job_deadline(), Duration::from_secs(7200));
        assert_eq!(s.imap.disable_after_secs, 36 * 3600);
        assert_eq!(s.imap.io_timeout(), Duration::from_secs(120), "default");
        let p: PollerSettings =
            from_yaml_str("poller:\n  minute_secs: 1\n  lease_ttl_secs: 5s\n", None).unwrap();
        assert_eq!(p.poller.minute(), Duration::from_secs(1));
        assert_eq!(p.poller.lease_ttl(), Duration::from_secs(5));
        let err = from_yaml_str::<WorkerSettings>("imap:\n  lock_ttl_secs: soon\n", None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("key imap.lock_ttl_secs"), "{err}");
        assert!(err.contains(r#"found "soon""#), "{err}");
        for bad in ["", "5x", "m", "5m3", "-1"] {
            assert!(secs::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(secs::parse(" 1h30m ").unwrap(), 5400);
    }

    #[test]
    fn config_names_are_looked_up_as_the_go_binaries_did() {
        let dir = std::env::temp_dir().join(format!("cfg-locate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("imapworker.yaml");
        std::fs::write(&file, "workers: 1\n").unwrap();
        // -c NAME --configpath DIR (Caliopen's entrypoint).
        assert_eq!(
            locate(Some(Path::new("imapworker")), Some(&dir), "x").unwrap(),
            Some(file.clone())
        );
        // --configpath alone: the Go default name.
        assert_eq!(
            locate(None, Some(&dir), "imapworker").unwrap(),
            Some(file.clone())
        );
        // -c FILE keeps its meaning, existing or not (load reports a missing one).
        assert_eq!(locate(Some(&file), None, "x").unwrap(), Some(file.clone()));
        assert_eq!(
            locate(Some(Path::new("/nowhere/a.yml")), Some(&dir), "x").unwrap(),
            Some(PathBuf::from("/nowhere/a.yml"))
        );
        assert_eq!(locate(None, None, "x").unwrap(), None);
        // A name found nowhere: one line naming where we looked.
        let err = locate(Some(Path::new("nosuchname")), Some(&dir), "x").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nosuchname.yaml") && text.contains(&dir.display().to_string()));
        assert!(!text.contains('\n'));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("cassandra", 9042).unwrap(),
            ("cassandra".into(), 9042)
        );
        assert_eq!(split_host_port("a.b:993", 1).unwrap(), ("a.b".into(), 993));
        assert_eq!(
            split_host_port("[::1]:143", 1).unwrap(),
            ("::1".into(), 143)
        );
        assert!(split_host_port("a.b:99999", 1).is_err());
        assert!(split_host_port("a.b:", 1).is_err());
        assert!(split_host_port("::1", 1).is_err());
        assert!(split_host_port("", 1).is_err());
        assert!(split_host_port("http://x", 1).is_err());
    }

    #[test]
    fn redaction() {
        let mut s = WorkerSettings {
            nats_url: "nats://u:p@h:4222".into(),
            ..Default::default()
        };
        s.store_settings.vault_settings.password = "hunter2".into();
        s.store_settings.object_store_settings.secret_key = "k3y".into();
        s.store_settings.object_store_settings.access_key = "AKID0".into();
        let out = redacted_json(&s);
        assert!(!out.contains("hunter2"));
        assert!(!out.contains("k3y"));
        assert!(!out.contains("AKID0"));
        assert!(!out.contains("u:p"));
        assert!(out.contains("nats://<redacted>@h:4222"));
    }

    #[test]
    fn a_zero_raw_size_limit_is_refused_not_read_as_everything_to_s3() {
        let mut s = WorkerSettings::default();
        s.store_settings.raw_size_limit = 0;
        let e = s.validate().unwrap_err().join("\n");
        assert!(
            e.contains("store_settings.raw_size_limit: expected 1 to"),
            "{e}"
        );
        let mut s = WorkerSettings::default();
        s.imap.max_message_size = 0;
        assert!(s.validate().is_err());
        assert_eq!(WorkerSettings::default().imap.max_message_size, 64 << 20);
    }

    #[test]
    fn nats_url_may_list_several_servers_of_a_cluster() {
        // One server, as Caliopen's files have it.
        assert_eq!(
            nats_servers("nats://127.0.0.1:4222").unwrap(),
            vec!["nats://127.0.0.1:4222"]
        );
        // The NATS convention: comma-separated, spaces allowed.
        assert_eq!(
            nats_servers("nats://a:4222, nats://b:4223 ,c:4224").unwrap(),
            vec!["nats://a:4222", "nats://b:4223", "c:4224"]
        );
        // An empty entry or one that is not an address is refused, by name.
        for bad in [
            "",
            "nats://a:4222,",
            "nats://a:4222,,nats://b:4222",
            "nats://a:notaport",
        ] {
            let e = nats_servers(bad).unwrap_err();
            assert!(e.starts_with("nats_url: "), "{bad:?}: {e}");
        }
        let s = WorkerSettings {
            nats_url: "nats://a:4222,nats://b:4222".into(),
            ..Default::default()
        };
        s.validate().unwrap();
        let s = PollerSettings {
            nats_url: "nats://a:4222,,".into(),
            ..Default::default()
        };
        let e = s.validate().unwrap_err().join("\n");
        assert!(e.contains("nats_url: "), "{e}");
    }

    #[test]
    fn every_credential_of_a_server_list_is_redacted() {
        let out = redact_url("nats://u:p1@a:4222,nats://u:p2@b:4222");
        assert!(!out.contains("p1") && !out.contains("p2"), "{out}");
        assert_eq!(out, "nats://<redacted>@a:4222,nats://<redacted>@b:4222");
    }

    #[test]
    fn defaults_are_valid() {
        WorkerSettings::default().validate().unwrap();
        PollerSettings::default().validate().unwrap();
    }
}
