//! The fault suite's settings, read once from the environment, and what
//! follows from them: the daemons' environment overrides (this run's
//! subjects and keyspace), a Cassandra session, the worker's effective
//! settings. Kept apart so a scenario reads its knobs from one place.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use caliopen_imap::config::{self, StoreSettings, WorkerSettings};
use caliopen_imap::store::Store;

use crate::kit::{var, var_or, Launch};

/// Everything the run needs to know, read once from the environment.
#[derive(Clone)]
pub struct Env {
    pub repo: PathBuf,
    pub bin: PathBuf,
    pub work: PathBuf,
    pub tag: String,
    /// One NATS server, or a cluster's, comma-separated.
    pub nats: String,
    /// One Cassandra host, or a cluster's, comma-separated.
    pub cass_hosts: String,
    pub keyspace: String,
    /// `store_settings.consistency_level` of the daemons and the harness.
    pub consistency: u16,
    /// The cluster run (scripts/faults-cluster.sh): only its scenario.
    pub cluster: bool,
    pub imaps: String,
    pub ca_file: String,
    pub password: String,
    pub dovecot_conf: String,
    pub quick: bool,
    pub restarts: bool,
    pub messages: u32,
    pub kill_rounds: u32,
    pub payloads: u32,
    pub recover_max: Duration,
    pub outage: Duration,
    pub seed: u64,
    pub only: Option<Vec<String>>,
    pub keep: bool,
}

impl Env {
    pub fn load() -> Result<Env> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let quick = var_or("FAULTS_QUICK", 0u8)? == 1;
        let cluster = var_or("FAULTS_CLUSTER", 0u8)? == 1;
        let seed = match std::env::var("FAULTS_SEED") {
            Ok(s) if !s.is_empty() => s.parse().context("FAULTS_SEED: not a number")?,
            _ => fastrand::u64(..1_000_000),
        };
        let tag = format!("faults{}x{}", std::process::id(), seed);
        let work = repo.join("target/faults").join(&tag);
        std::fs::create_dir_all(&work)?;
        Ok(Env {
            bin: std::env::var("CALIOPEN_IMAP_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|_| repo.join("target/debug/caliopen-imap")),
            repo,
            work,
            tag,
            nats: var("STACK_NATS_URL")?,
            cass_hosts: var("STACK_CASSANDRA_HOSTS")?,
            keyspace: var_or("FAULTS_KEYSPACE", "caliopen_faults".to_string())?,
            consistency: var_or("FAULTS_CONSISTENCY", 1u16)?,
            cluster,
            imaps: format!("{}:{}", var("STACK_IMAP_HOST")?, var("STACK_IMAPS_PORT")?),
            ca_file: var("STACK_IMAP_CA_FILE")?,
            password: var("STACK_IMAP_PASSWORD")?,
            dovecot_conf: var("STACK_DOVECOT_CONF")?,
            quick,
            restarts: var_or("FAULTS_RESTARTS", if quick { 0u8 } else { 1 })? == 1,
            messages: var_or(
                "FAULTS_MESSAGES",
                match (cluster, quick) {
                    (true, _) => 1000,
                    (_, true) => 300,
                    _ => 3000,
                },
            )?,
            kill_rounds: var_or("FAULTS_KILL_ROUNDS", if quick { 2 } else { 10 })?,
            payloads: var_or("FAULTS_PAYLOADS", if quick { 1000 } else { 10_000 })?,
            // Set from the worker's lock_ttl_secs in main() unless given.
            recover_max: Duration::from_secs(var_or("FAULTS_RECOVER_MAX", 0)?),
            outage: Duration::from_secs(var_or("FAULTS_OUTAGE_SECS", 25)?),
            seed,
            only: std::env::var("FAULTS_ONLY")
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| s.split(',').map(|x| x.trim().to_string()).collect()),
            keep: var_or("FAULTS_KEEP", 0u8)? == 1,
        })
    }

    pub fn launch(&self) -> Launch {
        Launch {
            bin: self.bin.clone(),
            repo: self.repo.clone(),
            work: self.work.clone(),
            tag: "faults",
        }
    }

    pub fn mode(&self) -> &'static str {
        match (self.cluster, self.quick) {
            (true, _) => "cluster",
            (_, true) => "quick",
            _ => "full",
        }
    }

    pub fn nats_servers(&self) -> Vec<String> {
        self.nats.split(',').map(str::to_string).collect()
    }

    pub fn cass_host_list(&self) -> Vec<String> {
        self.cass_hosts.split(',').map(str::to_string).collect()
    }

    /// The settings every daemon shares: addresses, keyspace, consistency.
    pub fn store_env(&self) -> [(&'static str, String); 4] {
        [
            ("NATS_URL", self.nats.clone()),
            (
                "STORE_SETTINGS__HOSTS",
                serde_json::to_string(&self.cass_host_list()).unwrap_or_default(),
            ),
            ("STORE_SETTINGS__KEYSPACE", self.keyspace.clone()),
            (
                "STORE_SETTINGS__CONSISTENCY_LEVEL",
                self.consistency.to_string(),
            ),
        ]
    }

    /// Subjects of this run only, so no other worker, poller or test sees them.
    pub fn subject(&self, base: &str) -> String {
        format!("{base}.{}", self.tag)
    }

    /// The shipped config/imapworker.yaml, with the stack's addresses, this
    /// run's subjects and keyspace as environment overrides (the daemons'
    /// own override mechanism), so every other value is the shipped one.
    pub fn daemon_env(&self) -> Vec<(String, String)> {
        let p = config::ENV_PREFIX;
        self.store_env()
            .into_iter()
            .chain([
                ("NATS_QUEUE", self.subject("IMAPworkers")),
                ("NATS_TOPIC_SENDER", self.subject("outboundIMAP")),
                ("NATS_TOPIC_POLLER", self.subject("imapJobs")),
                ("NATS_TOPIC_POLLER_CACHE", self.subject("idCache")),
                ("LDACONFIG__IN_TOPIC", self.subject("inboundSMTP")),
                ("LDACONFIG__OUT_TOPIC", self.subject("outboundSMTP")),
                ("IMAP__CA_FILE", self.ca_file.clone()),
            ])
            .map(|(k, v)| (format!("{p}{k}"), v))
            .collect()
    }

    pub fn poller_env(&self) -> Vec<(String, String)> {
        let p = config::ENV_PREFIX;
        self.store_env()
            .into_iter()
            .chain([
                ("NATS_QUEUE", self.subject("IDpoller")),
                ("NATS_TOPICS__IMAP", self.subject("imapJobs")),
                ("NATS_TOPICS__TWITTER", self.subject("twitterJobs")),
                ("NATS_TOPICS__MASTODON", self.subject("mastodonJobs")),
                ("NATS_TOPICS__ID_CACHE", self.subject("idCache")),
                ("POLLER__LEASE_NAME", self.tag.clone()),
            ])
            .map(|(k, v)| (format!("{p}{k}"), v))
            .collect()
    }

    pub async fn store(&self) -> Result<Store> {
        let settings = StoreSettings {
            hosts: self.cass_host_list(),
            keyspace: self.keyspace.clone(),
            consistency_level: self.consistency,
            ..Default::default()
        };
        Ok(Store::connect(&settings, Duration::from_secs(30)).await?)
    }

    /// The worker's effective settings, loaded the way the worker loads them.
    pub fn worker_settings(&self) -> Result<WorkerSettings> {
        for (k, v) in self.daemon_env() {
            // Single-threaded at this point (called before any task runs
            // that reads the environment); children inherit nothing from it.
            std::env::set_var(k, v);
        }
        let s: WorkerSettings = config::load(Some(&self.repo.join("config/imapworker.yaml")))
            .map_err(|e| anyhow!("{e}"))?;
        for (k, _) in self.daemon_env() {
            std::env::remove_var(k);
        }
        Ok(s)
    }
}
