//! The fault suite (`make faults`, `make faults-quick`; driven by
//! `scripts/faults.sh`): it hurts a real worker and a real poller on the
//! real stack (kill -9, SIGTERM, NATS/Dovecot/Cassandra restarts, a missing
//! or slow processor, an expunge mid-sync, malformed payloads) and counts,
//! from Dovecot, Cassandra and a recording processor stand-in, whether any
//! message was lost, doubled or handed off twice. It exists because "nothing
//! lost, nothing doubled" is a claim about crashes, which no unit test sees.
//!
//! The processor stand-in here stands for Caliopen's processor (outside this
//! project). It answers `process_raw` and records every request it receives,
//! and can be made absent or slow.
//!
//! Settings come from the environment (see `scripts/faults.sh`):
//! `FAULTS_SEED` (printed; a random one by default), `FAULTS_QUICK=1`,
//! `FAULTS_ONLY=a,b` (scenario names), `FAULTS_RESTARTS=1` (service
//! restarts of the shared stack), `FAULTS_MESSAGES`, `FAULTS_KILL_ROUNDS`,
//! `FAULTS_PAYLOADS`, `FAULTS_RECOVER_MAX` (seconds a blocked identity is
//! waited for), and the stack's `STACK_*` variables.
//!
//! Output: one markdown table, notes, and exit 1 when a required zero is not.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use caliopen_imap::config::{self, StoreSettings, WorkerSettings};
use caliopen_imap::store::identity::{creds, infos, Identity};
use caliopen_imap::store::raw_message::raw_message_id;
use caliopen_imap::store::Store;
use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

/// The cluster scenario (`make faults-cluster`, `FAULTS_CLUSTER=1`).
#[path = "faults/cluster.rs"]
mod cluster;
#[path = "kit/mod.rs"]
mod kit;
#[path = "../tests/support/processor.rs"]
mod processor;

use kit::{fnv, order_sync, var, var_or, Daemon, Launch, Outcome, DOWN};
use processor::{Answer, Pace};

// ------------------------------------------------------------------ settings

/// Everything the run needs to know, read once from the environment.
#[derive(Clone)]
struct Env {
    repo: PathBuf,
    bin: PathBuf,
    work: PathBuf,
    tag: String,
    /// One NATS server, or a cluster's, comma-separated.
    nats: String,
    /// One Cassandra host, or a cluster's, comma-separated.
    cass_hosts: String,
    keyspace: String,
    /// `store_settings.consistency_level` of the daemons and the harness.
    consistency: u16,
    /// The cluster run (scripts/faults-cluster.sh): only its scenario.
    cluster: bool,
    imaps: String,
    ca_file: String,
    password: String,
    dovecot_conf: String,
    quick: bool,
    restarts: bool,
    messages: u32,
    kill_rounds: u32,
    payloads: u32,
    recover_max: Duration,
    outage: Duration,
    seed: u64,
    only: Option<Vec<String>>,
    keep: bool,
}

impl Env {
    fn load() -> Result<Env> {
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

    fn launch(&self) -> Launch {
        Launch {
            bin: self.bin.clone(),
            repo: self.repo.clone(),
            work: self.work.clone(),
            tag: "faults",
        }
    }

    fn mode(&self) -> &'static str {
        match (self.cluster, self.quick) {
            (true, _) => "cluster",
            (_, true) => "quick",
            _ => "full",
        }
    }

    fn nats_servers(&self) -> Vec<String> {
        self.nats.split(',').map(str::to_string).collect()
    }

    fn cass_host_list(&self) -> Vec<String> {
        self.cass_hosts.split(',').map(str::to_string).collect()
    }

    /// The settings every daemon shares: addresses, keyspace, consistency.
    fn store_env(&self) -> [(&'static str, String); 4] {
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
    fn subject(&self, base: &str) -> String {
        format!("{base}.{}", self.tag)
    }

    /// The shipped config/imapworker.yaml, with the stack's addresses, this
    /// run's subjects and keyspace as environment overrides (the daemons'
    /// own override mechanism), so every other value is the shipped one.
    fn daemon_env(&self) -> Vec<(String, String)> {
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

    fn poller_env(&self) -> Vec<(String, String)> {
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

    async fn store(&self) -> Result<Store> {
        let settings = StoreSettings {
            hosts: self.cass_host_list(),
            keyspace: self.keyspace.clone(),
            consistency_level: self.consistency,
            ..Default::default()
        };
        Ok(Store::connect(&settings, Duration::from_secs(30)).await?)
    }

    /// The worker's effective settings, loaded the way the worker loads them.
    fn worker_settings(&self) -> Result<WorkerSettings> {
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

// ------------------------------------------------------------------ stand-in

/// One `process_raw` received by the processor stand-in.
#[derive(Clone)]
struct Rec {
    at: Instant,
    user: Uuid,
    msg: Uuid,
    /// Answered after the worker's hand-off timeout (slow mode).
    late: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    /// Not subscribed: NATS answers "no responders".
    Absent,
}

struct StandinState {
    records: Vec<Rec>,
    /// Per user: how many requests so far (repeats included).
    counts: HashMap<Uuid, u64>,
    /// (user, count) at which to fire the trigger.
    trigger: Option<(Uuid, u64, tokio::sync::oneshot::Sender<()>)>,
    /// Reply delay for every request (makes a sync last long enough).
    delay: Duration,
    /// Requests of this user answered `slow_delay` late, at most `slow_left`.
    slow: Option<(Uuid, Duration)>,
    slow_left: u32,
}

/// The processor stand-in (for Caliopen's processor, not part of this
/// project): answers `process_raw`, records every request.
#[derive(Clone)]
struct Standin {
    state: Arc<Mutex<StandinState>>,
    client: async_nats::Client,
    subject: String,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Standin {
    async fn start(env: &Env) -> Result<Standin> {
        let client = async_nats::connect(env.nats_servers()).await?;
        let s = Standin {
            state: Arc::new(Mutex::new(StandinState {
                records: Vec::new(),
                counts: HashMap::new(),
                trigger: None,
                delay: Duration::ZERO,
                slow: None,
                slow_left: 0,
            })),
            client,
            subject: env.subject("inboundSMTP"),
            task: Arc::new(Mutex::new(None)),
        };
        s.set_mode(Mode::Normal).await?;
        Ok(s)
    }

    async fn set_mode(&self, mode: Mode) -> Result<()> {
        let me = self.clone();
        let decide = (mode == Mode::Normal).then_some(move |order: &processor::ProcessRaw| {
            let delay = me.record(order.user_id, order.message_id);
            (Answer::Ok, Pace::Each(delay))
        });
        kit::switch_standin(&self.client, &self.subject, &self.task, decide).await
    }

    /// Record one request; returns how long to wait before answering.
    fn record(&self, user: Uuid, msg: Uuid) -> Duration {
        let mut st = self.state.lock().unwrap();
        let mut delay = st.delay;
        let mut late = false;
        if let Some((u, d)) = st.slow {
            if u == user && st.slow_left > 0 {
                st.slow_left -= 1;
                delay = d;
                late = true;
            }
        }
        st.records.push(Rec {
            at: Instant::now(),
            user,
            msg,
            late,
        });
        let n = {
            let c = st.counts.entry(user).or_default();
            *c += 1;
            *c
        };
        if st
            .trigger
            .as_ref()
            .is_some_and(|(u, at, _)| *u == user && n >= *at)
        {
            if let Some((_, _, tx)) = st.trigger.take() {
                let _ = tx.send(());
            }
        }
        delay
    }

    /// Fires once `more` further requests of `user` have arrived.
    fn trigger_after(&self, user: Uuid, more: u64) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut st = self.state.lock().unwrap();
        let at = st.counts.get(&user).copied().unwrap_or(0) + more.max(1);
        st.trigger = Some((user, at, tx));
        rx
    }

    fn clear_trigger(&self) {
        self.state.lock().unwrap().trigger = None;
    }

    fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    fn set_slow(&self, user: Uuid, d: Duration, count: u32) {
        let mut st = self.state.lock().unwrap();
        st.slow = Some((user, d));
        st.slow_left = count;
    }

    fn records_of(&self, user: Uuid) -> Vec<Rec> {
        let st = self.state.lock().unwrap();
        st.records
            .iter()
            .filter(|r| r.user == user)
            .cloned()
            .collect()
    }

    /// How many distinct messages of `user` were handed off.
    fn distinct_of(&self, user: Uuid) -> usize {
        let st = self.state.lock().unwrap();
        st.records
            .iter()
            .filter(|r| r.user == user)
            .map(|r| r.msg)
            .collect::<HashSet<_>>()
            .len()
    }

    /// The first request of `user` received after `t`.
    fn first_after(&self, user: Uuid, t: Instant) -> Option<Instant> {
        let st = self.state.lock().unwrap();
        st.records
            .iter()
            .find(|r| r.user == user && r.at > t)
            .map(|r| r.at)
    }
}

// ------------------------------------------------------------------ daemons

async fn start_worker(env: &Env) -> Result<Daemon> {
    start_daemon(env, "worker", env.daemon_env(), "imapworker ready").await
}

async fn start_poller(env: &Env) -> Result<Daemon> {
    start_daemon(env, "poller", env.poller_env(), "this poller is the leader").await
}

/// `caliopen-imap <mode> -c config/<shipped file> start` with `denv`.
async fn start_daemon(
    env: &Env,
    mode: &'static str,
    denv: Vec<(String, String)>,
    ready: &'static str,
) -> Result<Daemon> {
    let file = if mode == "worker" {
        "imapworker.yaml"
    } else {
        "idpoller.yaml"
    };
    let yaml = env.repo.join("config").join(file);
    Daemon::spawn(
        &env.launch(),
        mode,
        vec![
            mode.into(),
            "-c".into(),
            yaml.display().to_string(),
            "start".into(),
        ],
        denv,
        ready,
    )
    .await
}

// ------------------------------------------------------------------ Dovecot

fn doveadm(env: &Env, args: &[&str]) -> Result<String> {
    kit::doveadm(&env.dovecot_conf, args)
}

async fn stack(env: &Env, cmd: &str, service: &str) -> Result<()> {
    kit::stack(&env.repo, cmd, service).await
}

fn maildir_of(env: &Env, user: &str) -> Result<PathBuf> {
    let s = doveadm(env, &["user", "-f", "mail", user])?;
    let s = s.trim().trim_start_matches("maildir:");
    Ok(PathBuf::from(s.split(':').next().unwrap_or(s)))
}

/// A seeded mailbox of `count` plain-text messages (1–24 KB).
fn make_mailbox(env: &Env, user: &str, count: u32, seed: u64) -> Result<()> {
    let dir = maildir_of(env, user)?;
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let words = [
        "courrier",
        "électronique",
        "für",
        "Grüße",
        "meeting",
        "report",
        "письмо",
        "メール",
        "naïve",
        "café",
        "the",
        "and",
        "déjà",
        "Straße",
    ];
    for i in 0..count {
        let mut rng = fastrand::Rng::with_seed(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        let mut m = format!(
            "From: Faults <faults@example.test>\r\nTo: {user}@example.test\r\n\
             Subject: fault suite {i}\r\nDate: Mon, 02 Jan 2023 10:00:00 +0000\r\n\
             Message-ID: <{seed}.{i}@faults.example.test>\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n"
        );
        let len = rng.usize(1_000..24_000);
        let mut col = 0;
        while m.len() < len {
            let w = words[rng.usize(..words.len())];
            if col > 70 {
                m.push_str("\r\n");
                col = 0;
            }
            m.push_str(w);
            m.push(' ');
            col += w.len() + 1;
        }
        m.push_str("\r\n");
        let name = format!(
            "{}.M{i}P{seed}.faults,S={len},W={len}:2,S",
            1_600_000_000 + i,
            len = m.len()
        );
        std::fs::write(dir.join("cur").join(name), m)?;
    }
    let st = std::process::Command::new("chown")
        .args(["-R", "mail:mail"])
        .arg(&dir)
        .status()?;
    if !st.success() {
        bail!("chown of {} failed", dir.display());
    }
    doveadm(env, &["force-resync", "-u", user, "INBOX"])?;
    let (n, _) = mailbox_uids(env, user)?;
    if n.len() != count as usize {
        bail!(
            "{user}: Dovecot sees {} messages, expected {count}",
            n.len()
        );
    }
    Ok(())
}

/// UIDs in INBOX and its UIDVALIDITY.
fn mailbox_uids(env: &Env, user: &str) -> Result<(Vec<u32>, u32)> {
    let s = doveadm(env, &["search", "-u", user, "mailbox", "INBOX", "ALL"])?;
    let uids = s
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    let st = doveadm(
        env,
        &[
            "-f",
            "flow",
            "mailbox",
            "status",
            "-u",
            user,
            "uidvalidity",
            "INBOX",
        ],
    )?;
    let uv = st
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uidvalidity="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no uidvalidity for {user}: {st:?}"))?;
    Ok((uids, uv))
}

// ------------------------------------------------------------------ services

/// What one scenario measured.
#[derive(Default)]
struct Row {
    name: String,
    rounds: u32,
    messages: usize,
    missing: usize,
    duplicates: usize,
    undelivered: usize,
    extra: usize,
    inflight: usize,
    late: usize,
    stepped: u64,
    crashes: u32,
    recover: Vec<Option<Duration>>,
    /// Shown instead of [`fmt_recover`] of `recover` (one time per fault).
    recover_text: Option<String>,
    blocked: bool,
    notes: Vec<String>,
    /// Required zeros that were not zero, in words.
    failures: Vec<String>,
    skipped: Option<String>,
}

/// One identity on one Dovecot mailbox, with the harness's view of it.
struct Case {
    env: Env,
    name: String,
    login: String,
    user: Uuid,
    identity: Uuid,
    rng: fastrand::Rng,
    /// (when, delivered ids at that moment): a hand-off after it of one of
    /// these ids is an extra hand-off of a delivered message.
    snapshots: Vec<(Instant, HashSet<Uuid>)>,
    expunged: HashSet<u32>,
    uidvalidity: u32,
    reports: Vec<Value>,
}

impl Case {
    async fn new(env: &Env, store: &Store, name: &str, messages: u32) -> Result<Case> {
        let seed = env.seed ^ fnv(name);
        let login = format!("{}-{name}", env.tag);
        make_mailbox(env, &login, messages, seed)?;
        let (_, uidvalidity) = mailbox_uids(env, &login)?;
        let user = Uuid::new_v4();
        store.insert_user(user, &format!("{login}-user")).await?;
        let identity = Identity {
            user_id: user,
            identity_id: Uuid::new_v4(),
            credentials: HashMap::from([
                (creds::USERNAME_IN.to_string(), login.clone()),
                (creds::PASSWORD_IN.to_string(), env.password.clone()),
            ]),
            display_name: login.clone(),
            identifier: login.clone(),
            infos: HashMap::from([
                (infos::INSERVER.to_string(), env.imaps.clone()),
                (infos::AUTHTYPE.to_string(), infos::AUTH_LOGIN.to_string()),
                (infos::POLLINTERVAL.to_string(), "15".to_string()),
            ]),
            last_check: None,
            protocol: "email".into(),
            status: "active".into(),
            kind: "remote".into(),
        };
        store.insert_identity(&identity).await?;
        Ok(Case {
            env: env.clone(),
            name: name.into(),
            login,
            user,
            identity: identity.identity_id,
            rng: fastrand::Rng::with_seed(seed),
            snapshots: Vec::new(),
            expunged: HashSet::new(),
            uidvalidity,
            reports: Vec::new(),
        })
    }

    fn order(
        &self,
        client: &async_nats::Client,
        idle: Duration,
    ) -> tokio::task::JoinHandle<Outcome> {
        tokio::spawn(order_sync(
            client.clone(),
            self.env.subject("outboundIMAP"),
            self.user,
            self.identity,
            idle,
        ))
    }

    fn note(&mut self, o: &Outcome) {
        if let Some(r) = &o.report {
            self.reports.push(r.clone());
        }
    }

    /// The ids stored as delivered right now.
    async fn delivered(&self, store: &Store) -> Result<HashSet<Uuid>> {
        let ids = store.raw_message_ids_of(self.user).await?;
        let states = futures::stream::iter(ids)
            .map(|id| async move { (id, store.raw_message_delivered(id).await) })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let mut set = HashSet::new();
        for (id, st) in states {
            if st? == Some(true) {
                set.insert(id);
            }
        }
        Ok(set)
    }

    async fn snapshot(&mut self, store: &Store) -> Result<()> {
        let at = Instant::now();
        let set = self.delivered(store).await?;
        self.snapshots.push((at, set));
        Ok(())
    }

    /// Order syncs until one finds nothing left to do, waiting out a busy
    /// identity for at most `recover_max` since `since`. Returns false when
    /// it never completed.
    async fn sync_until_complete(
        &mut self,
        client: &async_nats::Client,
        worker: &mut Daemon,
        since: Instant,
    ) -> Result<bool> {
        let mut ordered = 0;
        loop {
            worker.check().await?;
            let o = self.order(client, Duration::from_secs(120)).await?;
            self.note(&o);
            ordered += 1;
            if o.complete() {
                return Ok(true);
            }
            let waiting = o.busy() || o.no_responders || o.silent;
            if waiting && since.elapsed() > self.env.recover_max {
                eprintln!(
                    "[faults] {}: still refused after {:?}: {:?}",
                    self.name,
                    since.elapsed(),
                    o.report.as_ref().map(|r| r["error"].clone())
                );
                return Ok(false);
            }
            if !waiting && ordered > 30 {
                return Ok(false);
            }
            if waiting || o.report.as_ref().is_some_and(|r| r["ok"] != true) {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }

    /// Count everything into `row` (see docs/faults.md).
    async fn count(&self, store: &Store, standin: &Standin, row: &mut Row) -> Result<()> {
        let (uids, uv) = mailbox_uids(&self.env, &self.login)?;
        if uv != self.uidvalidity {
            row.notes
                .push(format!("{}: UIDVALIDITY changed", self.name));
        }
        let mbox = "INBOX";
        let expected: HashMap<Uuid, u32> = uids
            .iter()
            .map(|&u| (raw_message_id(self.user, self.identity, mbox, uv, u), u))
            .collect();
        let gone: HashSet<Uuid> = self
            .expunged
            .iter()
            .map(|&u| raw_message_id(self.user, self.identity, mbox, uv, u))
            .collect();
        let rows = store.raw_message_ids_of(self.user).await?;
        let states: Vec<(Uuid, Option<bool>)> = futures::stream::iter(rows.clone())
            .map(|id| async move { (id, store.raw_message_delivered(id).await) })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(|(id, r)| r.map(|d| (id, d)))
            .collect::<Result<_, _>>()?;
        let delivered: HashSet<Uuid> = states
            .iter()
            .filter(|(_, d)| *d == Some(true))
            .map(|(id, _)| *id)
            .collect();
        row.messages = expected.len();
        row.missing = expected.keys().filter(|id| !delivered.contains(id)).count();
        row.duplicates = rows
            .iter()
            .filter(|id| !expected.contains_key(id) && !gone.contains(id))
            .count();
        row.undelivered = states
            .iter()
            .filter(|(id, d)| *d != Some(true) && !gone.contains(id))
            .count();
        // Repeats, classified by the delivered snapshots taken before them.
        let recs = standin.records_of(self.user);
        let mut seen: HashMap<Uuid, bool> = HashMap::new(); // id → an earlier answer was late
        for r in &recs {
            if let Some(prev_late) = seen.get(&r.msg).copied() {
                let was_delivered = self
                    .snapshots
                    .iter()
                    .any(|(at, set)| *at < r.at && set.contains(&r.msg));
                if was_delivered {
                    row.extra += 1;
                } else if prev_late {
                    row.late += 1;
                } else {
                    row.inflight += 1;
                }
            }
            let e = seen.entry(r.msg).or_insert(false);
            *e |= r.late;
        }
        let failures = store.message_failures(self.user, self.identity).await?;
        row.stepped = failures.iter().filter(|f| f.stepped_over).count() as u64;
        row.stepped = row.stepped.max(
            self.reports
                .iter()
                .map(|r| r["stepped_over"].as_u64().unwrap_or(0))
                .sum(),
        );
        // Counted: retired, so the poller of a later run does not schedule
        // it (and make Dovecot recreate the removed mailbox).
        store
            .set_status(self.user, self.identity, "inactive")
            .await?;
        row.notes.push(format!(
            "{}: {} hand-offs for {} messages; {} syncs ordered",
            self.name,
            recs.len(),
            expected.len(),
            self.reports.len()
        ));
        Ok(())
    }

    fn cleanup(&self) {
        if self.env.keep {
            return;
        }
        if let Ok(dir) = maildir_of(&self.env, &self.login) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The mailbox goes with the case, on error paths too.
impl Drop for Case {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Shared by every scenario.
struct Suite {
    env: Env,
    settings: WorkerSettings,
    store: Store,
    client: async_nats::Client,
    standin: Standin,
}

impl Suite {
    /// Check the required zeros of a finished row.
    fn judge(row: &mut Row) {
        for (what, n) in [
            ("missing", row.missing),
            ("duplicate rows", row.duplicates),
            ("left undelivered", row.undelivered),
            ("extra hand-offs of delivered messages", row.extra),
            ("crashes", row.crashes as usize),
            ("stepped over", row.stepped as usize),
        ] {
            if n > 0 {
                row.failures.push(format!("{n} {what}"));
            }
        }
        if row.blocked {
            row.failures
                .push("the identity stayed refused (lock never given back in time)".into());
        }
    }

    /// Kill -9 of the worker at seeded points of a sync, `rounds` times.
    async fn kill9(&self) -> Result<Row> {
        let mut row = Row {
            name: "kill -9 worker".into(),
            ..Default::default()
        };
        let mut case = Case::new(&self.env, &self.store, "kill9", self.env.messages).await?;
        let mut worker = start_worker(&self.env).await?;
        let total = self.env.messages as u64;
        // The sync started by the recovery of the last round, still running.
        let mut running: Option<tokio::task::JoinHandle<Outcome>> = None;
        'rounds: for r in 0..self.env.kill_rounds {
            // From the stand-in's records, not Cassandra: the sync that
            // recovered is running, and must not race ahead meanwhile.
            let left = total.saturating_sub(self.standin.distinct_of(case.user) as u64);
            if left < 2 {
                row.notes.push(format!(
                    "kill -9: the mailbox was complete after {r} rounds"
                ));
                break;
            }
            // Spread the kill points so every round lands inside the sync.
            let share = (left / (self.env.kill_rounds - r) as u64).max(1);
            let target = case.rng.u64(1..=(share * 2).min(left - 1));
            let since = Instant::now();
            loop {
                let fired = self.standin.trigger_after(case.user, target);
                let job = match running.take() {
                    Some(j) => j,
                    None => case.order(&self.client, Duration::from_secs(300)),
                };
                let ended = tokio::select! {
                    _ = fired => None,
                    o = wait_job(job) => Some(o),
                };
                self.standin.clear_trigger();
                let Some(o) = ended else { break };
                case.note(&o);
                if o.complete() {
                    row.notes.push(format!(
                        "kill -9 round {}: the sync ended before the kill point",
                        r + 1
                    ));
                    break 'rounds;
                }
                if since.elapsed() > self.env.recover_max {
                    row.blocked = true;
                    break 'rounds;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            worker.kill9().await?;
            let t_fault = Instant::now();
            row.rounds += 1;
            case.snapshot(&self.store).await?;
            worker.restart().await?;
            // The next sync, ordered at once (refused while the lock holds).
            let (rec, job) = self.first_progress(&mut case, &mut worker, t_fault).await?;
            row.recover.push(rec);
            running = job;
            if rec.is_none() {
                row.blocked = true;
                break;
            }
        }
        if let Some(j) = running.take() {
            let o = wait_job(j).await;
            case.note(&o);
        }
        if !row.blocked
            && !case
                .sync_until_complete(&self.client, &mut worker, Instant::now())
                .await?
        {
            row.blocked = true;
        }
        row.crashes = worker.stop().await?;
        case.count(&self.store, &self.standin, &mut row).await?;
        Ok(row)
    }

    /// Order syncs until one hands something off (or reports completion):
    /// the time from `t_fault` to that first hand-off, and the sync still
    /// running, if any.
    async fn first_progress(
        &self,
        case: &mut Case,
        worker: &mut Daemon,
        t_fault: Instant,
    ) -> Result<(Option<Duration>, Option<tokio::task::JoinHandle<Outcome>>)> {
        while t_fault.elapsed() < self.env.recover_max {
            worker.check().await?;
            let fired = self.standin.trigger_after(case.user, 1);
            let mut job = case.order(&self.client, Duration::from_secs(300));
            tokio::select! {
                _ = fired => {
                    let at = self
                        .standin
                        .first_after(case.user, t_fault)
                        .unwrap_or_else(Instant::now);
                    return Ok((Some(at - t_fault), Some(job)));
                }
                o = &mut job => {
                    let o = o.unwrap_or(Outcome { silent: true, ..Default::default() });
                    case.note(&o);
                    if o.complete() {
                        self.standin.clear_trigger();
                        return Ok((Some(t_fault.elapsed()), None));
                    }
                }
            }
            self.standin.clear_trigger();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        self.standin.clear_trigger();
        Ok((None, None))
    }

    /// Order a sync (again while it is refused or unheard) until `target`
    /// more hand-offs have arrived: the sync then running, or `None` when a
    /// sync completed first.
    async fn order_until(
        &self,
        case: &mut Case,
        target: u64,
        idle: Duration,
    ) -> Result<Option<tokio::task::JoinHandle<Outcome>>> {
        let since = Instant::now();
        let fired = self.standin.trigger_after(case.user, target);
        tokio::pin!(fired);
        loop {
            let mut job = case.order(&self.client, idle);
            tokio::select! {
                _ = &mut fired => return Ok(Some(job)),
                o = &mut job => {
                    let o = o.unwrap_or(Outcome { silent: true, ..Default::default() });
                    case.note(&o);
                    if o.complete() || o.report.as_ref().is_some_and(|r| r["ok"] == true) {
                        self.standin.clear_trigger();
                        return Ok(None);
                    }
                }
            }
            if since.elapsed() > self.env.recover_max {
                self.standin.clear_trigger();
                bail!("no sync made progress within {:?}", self.env.recover_max);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// [`Suite::first_progress`], then the end of the sync it started.
    async fn recover(
        &self,
        case: &mut Case,
        worker: &mut Daemon,
        t_fault: Instant,
    ) -> Result<Option<Duration>> {
        let (rec, job) = self.first_progress(case, worker, t_fault).await?;
        if let Some(j) = job {
            let o = wait_job(j).await;
            case.note(&o);
        }
        Ok(rec)
    }

    /// SIGTERM mid-sync: exit 0 within the grace period, then complete.
    async fn sigterm(&self) -> Result<Row> {
        let mut row = Row {
            name: "SIGTERM mid-sync".into(),
            ..Default::default()
        };
        let mut case = Case::new(&self.env, &self.store, "sigterm", self.env.messages).await?;
        let mut worker = start_worker(&self.env).await?;
        // Answers in 200 ms (64 in flight): the signal lands mid-sync.
        self.standin.set_delay(Duration::from_millis(200));
        let target = case
            .rng
            .u64(self.env.messages as u64 / 5..=self.env.messages as u64 / 2);
        let Some(job) = self
            .order_until(&mut case, target, Duration::from_secs(300))
            .await?
        else {
            bail!("the sync ended before the fault point ({target} hand-offs)");
        };
        let grace = Duration::from_secs(self.settings.imap.shutdown_grace_secs);
        let (code, took) = worker.sigterm(grace + Duration::from_secs(10)).await?;
        let t_fault = Instant::now();
        row.rounds = 1;
        let o = wait_job(job).await;
        case.note(&o);
        self.standin.set_delay(Duration::ZERO);
        row.notes.push(format!(
            "SIGTERM: exit code {code:?} after {:.1} s; the report said ok={} handed_off={} interrupted={} error={:?}",
            took.as_secs_f64(),
            o.report.as_ref().map(|r| r["ok"].clone()).unwrap_or(Value::Null),
            o.num("handed_off"),
            o.report.as_ref().map(|r| r["interrupted"].clone()).unwrap_or(Value::Null),
            o.report.as_ref().map(|r| r["error"].clone()).unwrap_or(Value::Null),
        ));
        if code != Some(0) {
            row.failures
                .push(format!("worker exit code {code:?} after SIGTERM"));
        }
        let done = o.num("handed_off") + o.num("already_delivered");
        if o.report
            .as_ref()
            .is_some_and(|r| r["ok"] == true && r["interrupted"] != true)
            && done < self.env.messages as u64
        {
            row.failures
                .push("the interrupted sync reported plain success".into());
        }
        case.snapshot(&self.store).await?;
        worker.restart().await?;
        row.recover
            .push(self.recover(&mut case, &mut worker, t_fault).await?);
        self.finish(case, worker, row).await
    }

    /// A scenario's end: sync until the mailbox is complete, stop the
    /// worker, count what landed.
    async fn finish(&self, mut case: Case, mut worker: Daemon, mut row: Row) -> Result<Row> {
        if !case
            .sync_until_complete(&self.client, &mut worker, Instant::now())
            .await?
        {
            row.blocked = true;
        }
        row.crashes = worker.stop().await?;
        case.count(&self.store, &self.standin, &mut row).await?;
        Ok(row)
    }

    /// The processor absent for more than `max_message_tries` syncs.
    async fn processor_absent(&self) -> Result<Row> {
        let mut row = Row {
            name: "processor absent".into(),
            ..Default::default()
        };
        let n = (self.env.messages / 10).max(30);
        let mut case = Case::new(&self.env, &self.store, "absent", n).await?;
        let mut worker = start_worker(&self.env).await?;
        self.standin.set_mode(Mode::Absent).await?;
        let syncs = self.settings.imap.max_message_tries + 1;
        for _ in 0..syncs {
            let o = wait_job(case.order(&self.client, Duration::from_secs(300))).await;
            case.note(&o);
            row.rounds += 1;
            worker.check().await?;
        }
        let stepped_during: u64 = case
            .reports
            .iter()
            .map(|r| r["stepped_over"].as_u64().unwrap_or(0))
            .sum();
        self.standin.set_mode(Mode::Normal).await?;
        let t_back = Instant::now();
        let failed: Vec<String> = case
            .reports
            .iter()
            .map(|r| format!("{}/{}", r["failed"], r["stepped_over"]))
            .collect();
        row.notes.push(format!(
            "processor absent: {syncs} syncs without it (failed/stepped over per sync: {}); stepped over meanwhile: {stepped_during}",
            failed.join(" ")
        ));
        row.recover
            .push(self.recover(&mut case, &mut worker, t_back).await?);
        self.finish(case, worker, row).await
    }

    /// The processor slower than the worker's hand-off timeout for some messages.
    async fn processor_slow(&self) -> Result<Row> {
        let mut row = Row {
            name: "processor slow".into(),
            ..Default::default()
        };
        let n = (self.env.messages / 10).max(30);
        let mut case = Case::new(&self.env, &self.store, "slow", n).await?;
        let mut worker = start_worker(&self.env).await?;
        let late = Duration::from_secs(self.settings.imap.lda_timeout_secs + 2);
        self.standin.set_slow(case.user, late, 20);
        let t = Instant::now();
        let o = wait_job(case.order(&self.client, Duration::from_secs(300))).await;
        case.note(&o);
        row.rounds = 1;
        // Let the late answers arrive before the retry.
        tokio::time::sleep(Duration::from_secs(3)).await;
        case.snapshot(&self.store).await?;
        if !case
            .sync_until_complete(&self.client, &mut worker, Instant::now())
            .await?
        {
            row.blocked = true;
        }
        row.recover.push(Some(t.elapsed()));
        row.crashes = worker.stop().await?;
        case.count(&self.store, &self.standin, &mut row).await?;
        row.notes.push(format!(
            "processor slow: 20 answers {} s late (timeout {} s); {} of them handed off again (processed twice downstream)",
            late.as_secs(),
            self.settings.imap.lda_timeout_secs,
            row.late
        ));
        Ok(row)
    }

    /// A few seeded messages expunged (doveadm expunge) mid-sync.
    async fn expunge(&self) -> Result<Row> {
        let mut row = Row {
            name: "expunge mid-sync".into(),
            ..Default::default()
        };
        let mut case = Case::new(&self.env, &self.store, "expunge", self.env.messages).await?;
        let worker = start_worker(&self.env).await?;
        self.standin.set_delay(Duration::from_millis(200));
        let total = self.env.messages as u64;
        let target = case.rng.u64(total / 5..=total / 2);
        let Some(job) = self
            .order_until(&mut case, target, Duration::from_secs(300))
            .await?
        else {
            bail!("the sync ended before the fault point ({target} hand-offs)");
        };
        let (uids, _) = mailbox_uids(&self.env, &case.login)?;
        // Some around the point reached, some far ahead.
        let mut pick = Vec::new();
        for _ in 0..3 {
            let near = (target as usize + case.rng.usize(0..64)).min(uids.len() - 1);
            pick.push(uids[near]);
            pick.push(uids[case.rng.usize(uids.len() * 3 / 4..uids.len())]);
        }
        pick.sort_unstable();
        pick.dedup();
        let set: Vec<String> = pick.iter().map(u32::to_string).collect();
        doveadm(
            &self.env,
            &[
                "expunge",
                "-u",
                &case.login,
                "mailbox",
                "INBOX",
                "uid",
                &set.join(","),
            ],
        )?;
        let t_fault = Instant::now();
        case.expunged.extend(pick.iter().copied());
        row.rounds = 1;
        let o = wait_job(job).await;
        case.note(&o);
        self.standin.set_delay(Duration::ZERO);
        let handed: HashSet<Uuid> = self
            .standin
            .records_of(case.user)
            .iter()
            .map(|r| r.msg)
            .collect();
        let before = pick
            .iter()
            .filter(|&&u| {
                handed.contains(&raw_message_id(
                    case.user,
                    case.identity,
                    "INBOX",
                    case.uidvalidity,
                    u,
                ))
            })
            .count();
        row.notes.push(format!(
            "expunge: UIDs {} expunged ({before} of them fetched before); the sync said ok={:?} failed={} error={:?}",
            set.join(","),
            o.report.as_ref().map(|r| r["ok"].clone()),
            o.num("failed"),
            o.report.as_ref().map(|r| r["error"].clone())
        ));
        row.recover.push(
            self.standin
                .first_after(case.user, t_fault)
                .map(|t| t - t_fault),
        );
        case.snapshot(&self.store).await?;
        self.finish(case, worker, row).await
    }

    /// One shared service stopped mid-sync, then started again.
    async fn service_restart(&self, service: &str) -> Result<Row> {
        let name = match service {
            "nats" => "NATS restart",
            "dovecot" => "Dovecot restart",
            _ => "Cassandra stop/start",
        };
        let mut row = Row {
            name: name.into(),
            ..Default::default()
        };
        let mut case = Case::new(
            &self.env,
            &self.store,
            &format!("restart-{service}"),
            self.env.messages,
        )
        .await?;
        let mut worker = start_worker(&self.env).await?;
        // Slow answers (200 ms, 64 in flight) so the sync lasts long enough
        // for the fault to land in its middle.
        self.standin.set_delay(Duration::from_millis(200));
        let total = self.env.messages as u64;
        let target = case.rng.u64(total / 10..=total / 4);
        let Some(job) = self
            .order_until(&mut case, target, Duration::from_secs(60))
            .await?
        else {
            bail!("the sync ended before the fault point ({target} hand-offs)");
        };
        if service == "cassandra" {
            case.snapshot(&self.store).await?;
        }
        let t_fault = Instant::now();
        stack(&self.env, "stop", service).await?;
        let pause = if service == "cassandra" {
            self.env.outage
        } else {
            Duration::from_secs(3)
        };
        let rest = pause.saturating_sub(t_fault.elapsed());
        tokio::time::sleep(rest).await;
        stack(&self.env, "start", service).await?;
        let t_back = Instant::now();
        eprintln!(
            "[faults] {service} back after {:.1} s",
            t_fault.elapsed().as_secs_f64()
        );
        row.rounds = 1;
        self.standin.set_delay(Duration::ZERO);
        // Bounded: a report lost in a NATS restart must not stall the suite.
        let o = tokio::time::timeout(self.env.recover_max, wait_job(job))
            .await
            .unwrap_or(Outcome {
                silent: true,
                ..Default::default()
            });
        case.note(&o);
        row.notes.push(format!(
            "{name}: the interrupted sync said ok={:?} failed={} outage={:?} error={:?}{}",
            o.report.as_ref().map(|r| r["ok"].clone()),
            o.num("failed"),
            o.report.as_ref().map(|r| r["outage"].clone()),
            o.report.as_ref().map(|r| r["error"].clone()),
            if o.silent { " (no final report)" } else { "" }
        ));
        // The harness's own session may be dead after a Cassandra restart.
        let store = if service == "cassandra" {
            self.env.store().await?
        } else {
            self.store.clone()
        };
        if service != "cassandra" {
            case.snapshot(&store).await?;
        }
        worker.check().await?;
        // Recovered: the first hand-off once the service is back (not one
        // already in flight while it was going down).
        let rec = self
            .recover(&mut case, &mut worker, t_fault)
            .await?
            .map(|d| {
                self.standin
                    .first_after(case.user, t_back)
                    .map_or(d, |t| t - t_fault)
            });
        row.recover.push(rec);
        row.blocked = rec.is_none()
            || !case
                .sync_until_complete(&self.client, &mut worker, Instant::now())
                .await?;
        if let Some(r) = case.reports.iter().rev().find(|r| r["ok"] != true) {
            row.notes.push(format!("{name}: last failed report: {r}"));
        }
        {
            let id = store.identity(case.user, case.identity).await?;
            if let Some(id) = id {
                row.notes.push(format!(
                    "{name}: lastFetchError={:?} syncing={:?}",
                    id.info(infos::LAST_FETCH_ERROR),
                    id.info(infos::SYNCING)
                ));
            }
        }
        row.crashes = worker.stop().await?;
        case.count(&store, &self.standin, &mut row).await?;
        Ok(row)
    }

    /// Seeded malformed payloads on every subject the daemons listen on.
    async fn malformed(&self) -> Result<Row> {
        let mut row = Row {
            name: "malformed payloads".into(),
            ..Default::default()
        };
        let mut worker = start_worker(&self.env).await?;
        let mut poller = start_poller(&self.env).await?;
        let mut rng = fastrand::Rng::with_seed(self.env.seed ^ fnv("malformed"));
        // Warm both up (their first answers allocate) before measuring.
        self.answering(&worker, &poller).await?;
        let (w0, p0) = (worker.rss_kb(), poller.rss_kb());
        let subjects = [
            self.env.subject("outboundIMAP"),
            self.env.subject("imapJobs"),
            self.env.subject("twitterJobs"),
            self.env.subject("mastodonJobs"),
            self.env.subject("idCache"),
        ];
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(format!("{inbox}.*")).await?;
        let t = Instant::now();
        for i in 0..self.env.payloads {
            let subject = subjects[i as usize % subjects.len()].clone();
            let payload = malformed_payload(&mut rng);
            if rng.bool() {
                self.client
                    .publish_with_reply(subject, format!("{inbox}.{i}"), payload.into())
                    .await?;
            } else {
                self.client.publish(subject, payload.into()).await?;
            }
            if i % 200 == 199 {
                self.client.flush().await?;
                worker.check().await?;
                poller.check().await?;
            }
        }
        self.client.flush().await?;
        // Drain the answers until quiet.
        let mut answered = 0u64;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), replies.next()).await {
            answered += 1;
        }
        worker.check().await?;
        poller.check().await?;
        let ok = self.answering(&worker, &poller).await;
        let (w1, p1) = (worker.rss_kb(), poller.rss_kb());
        row.rounds = 1;
        row.messages = 0;
        row.notes.push(format!(
            "malformed: {} payloads over {} subjects in {:.1} s, {answered} answers; RSS worker {w0} → {w1} kB, poller {p0} → {p1} kB",
            self.env.payloads,
            subjects.len(),
            t.elapsed().as_secs_f64()
        ));
        if let Err(e) = ok {
            row.failures
                .push(format!("a daemon stopped answering: {e}"));
        }
        row.crashes = worker.stop().await? + poller.stop().await?;
        Ok(row)
    }

    /// Both daemons answer a well-formed request: the worker a sync of an
    /// unknown identity (an error report), the poller a `need_job`.
    async fn answering(&self, _worker: &Daemon, _poller: &Daemon) -> Result<()> {
        let o = order_sync(
            self.client.clone(),
            self.env.subject("outboundIMAP"),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Duration::from_secs(60),
        )
        .await;
        if o.report.is_none() {
            bail!("the worker did not answer a sync order within 60 s");
        }
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.request(
                self.env.subject("imapJobs"),
                r#"{"worker":"faults","order":{"order":"need_job"}}"#.into(),
            ),
        )
        .await;
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => bail!("the poller did not answer need_job: {e}"),
            Err(_) => bail!("the poller did not answer need_job within 30 s"),
        }
    }
}

async fn wait_job(job: tokio::task::JoinHandle<Outcome>) -> Outcome {
    job.await.unwrap_or(Outcome {
        silent: true,
        ..Default::default()
    })
}

/// One malformed payload: random bytes, broken JSON, wrong types, huge or
/// hostile values, valid shapes with bad ids. Sync and fullfetch orders only
/// ever name random identities or an unreachable loopback port.
fn malformed_payload(rng: &mut fastrand::Rng) -> Vec<u8> {
    let uuidish = |rng: &mut fastrand::Rng| -> Value {
        match rng.u8(..5) {
            0 => json!(Uuid::new_v4().to_string()),
            1 => json!(""),
            2 => json!("not-a-uuid"),
            3 => json!(rng.i64(..)),
            _ => json!(null),
        }
    };
    let order_name = |rng: &mut fastrand::Rng| -> Value {
        let names = [
            "sync",
            "fullfetch",
            "deliver",
            "test",
            "need_job",
            "add",
            "delete",
            "update_interval",
            "",
            "SYNC",
            "process_raw",
            "\u{0}",
            "ß",
        ];
        json!(names[rng.usize(..names.len())])
    };
    match rng.u8(..10) {
        0 => {
            let mut b = vec![0u8; rng.usize(0..512)];
            rng.fill(&mut b);
            b
        }
        1 => {
            // Truncated valid JSON.
            let s = json!({"order": "sync", "user_id": Uuid::new_v4().to_string(),
                "identity_id": Uuid::new_v4().to_string()})
            .to_string();
            let cut = rng.usize(0..s.len());
            s.as_bytes()[..cut].to_vec()
        }
        2 => {
            // Deep nesting.
            let d = rng.usize(1..2000);
            format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()
        }
        3 => {
            // A large string value (up to 256 KB).
            let big = "x".repeat(rng.usize(1..262_144));
            json!({"order": order_name(rng), "user_id": big, "identity_id": uuidish(rng)})
                .to_string()
                .into_bytes()
        }
        4 => json!({"order": {"order": order_name(rng)}, "worker": rng.u32(..)})
            .to_string()
            .into_bytes(),
        5 => {
            let protocol = ["email", "imap", "", "twitter"][rng.usize(..4)];
            json!({"order": order_name(rng), "user_id": uuidish(rng),
                "identity_id": uuidish(rng), "order_param": uuidish(rng),
                "protocol": protocol})
            .to_string()
            .into_bytes()
        }
        6 => json!({"order": "fullfetch", "user_id": Uuid::new_v4().to_string(),
            "login": "nobody", "password": "x", "server": format!("127.0.0.1:{}", rng.u16(1..3)),
            "mailbox": "INBOX"})
        .to_string()
        .into_bytes(),
        7 => json!([1, "two", null, {"order": order_name(rng)}])
            .to_string()
            .into_bytes(),
        8 => b"".to_vec(),
        _ => {
            // Valid UTF-8 JSON with invalid UTF-8 bytes spliced in.
            let mut b = json!({"order": order_name(rng), "user_id": uuidish(rng)})
                .to_string()
                .into_bytes();
            let at = rng.usize(0..b.len());
            b.insert(at, 0xff);
            b
        }
    }
}

// ------------------------------------------------------------------ the run

fn fmt_recover(r: &[Option<Duration>]) -> String {
    if r.is_empty() {
        return "—".into();
    }
    if r.iter().any(Option::is_none) {
        return "not recovered".into();
    }
    let max = r.iter().flatten().max().copied().unwrap_or_default();
    if r.len() == 1 {
        format!("{:.1} s", max.as_secs_f64())
    } else {
        format!("max {:.1} s", max.as_secs_f64())
    }
}

fn main() -> Result<()> {
    let env = Env::load()?;
    // Read before the runtime starts (this sets and unsets variables).
    let mut env = env;
    let settings = env.worker_settings()?;
    if env.recover_max.is_zero() {
        // A dead worker's lock must lapse within its TTL: wait that long
        // (plus a margin), but not for ever when the TTL is a day.
        let cap = if env.quick { 150 } else { 300 };
        env.recover_max = Duration::from_secs((settings.imap.lock_ttl_secs + 30).min(cap));
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(env.clone(), settings) => r,
            _ = tokio::signal::ctrl_c() => { kit::clean_up(&env.launch()); std::process::exit(130) }
            _ = term.recv() => { kit::clean_up(&env.launch()); std::process::exit(143) }
        }
    })
}

async fn run(env: Env, settings: WorkerSettings) -> Result<()> {
    let started = Instant::now();
    eprintln!(
        "[faults] seed {} ({} mode), tag {}, {} messages, lock_ttl_secs {} (a refused identity is waited for {} s), max_message_tries {}, logs in {}",
        env.seed,
        env.mode(),
        env.tag,
        env.messages,
        settings.imap.lock_ttl_secs,
        env.recover_max.as_secs(),
        settings.imap.max_message_tries,
        env.work.display()
    );
    if !env.bin.is_file() {
        bail!("{} not found: run `cargo build` first", env.bin.display());
    }
    let store = env.store().await?;
    let client = async_nats::connect(env.nats_servers()).await?;
    let standin = Standin::start(&env).await?;
    let suite = Suite {
        env: env.clone(),
        settings,
        store,
        client,
        standin,
    };
    let mut names: Vec<&str> = vec!["kill9", "sigterm", "absent", "slow", "expunge", "malformed"];
    if env.cluster {
        names = vec!["cluster"];
    } else if env.restarts {
        names.extend(["nats", "dovecot", "cassandra"]);
    }
    if let Some(only) = &env.only {
        names.retain(|n| only.iter().any(|o| o == n));
    }
    let mut rows = Vec::new();
    for name in names {
        eprintln!(
            "[faults] {name} (at {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        let res = match name {
            "kill9" => suite.kill9().await,
            "sigterm" => suite.sigterm().await,
            "absent" => suite.processor_absent().await,
            "slow" => suite.processor_slow().await,
            "expunge" => suite.expunge().await,
            "malformed" => suite.malformed().await,
            "cluster" => cluster::scenario(&suite).await,
            s => suite.service_restart(s).await,
        };
        // Whatever happened, leave every service running...
        let down = DOWN.lock().unwrap().clone();
        if let Some(service) = down {
            stack(&env, "start", &service).await?;
        }
        // ... and the stand-in answering normally.
        suite.standin.clear_trigger();
        suite.standin.set_delay(Duration::ZERO);
        suite.standin.set_mode(Mode::Normal).await?;
        let mut row = match res {
            Ok(r) => r,
            Err(e) => Row {
                name: name.into(),
                skipped: Some(format!("{e:#}")),
                failures: vec![format!("the scenario could not run: {e:#}")],
                ..Default::default()
            },
        };
        Suite::judge(&mut row);
        eprintln!(
            "[faults] {name}: {}",
            if row.failures.is_empty() {
                "ok".to_string()
            } else {
                row.failures.join("; ")
            }
        );
        rows.push(row);
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | rounds | messages | missing | duplicate rows | extra hand-offs | crashes | time to recover |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in &rows {
        if r.skipped.is_some() {
            let _ = writeln!(out, "| {} | — | — | — | — | — | — | did not run |", r.name);
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.rounds,
            if r.messages == 0 {
                "—".to_string()
            } else {
                r.messages.to_string()
            },
            r.missing,
            r.duplicates,
            r.extra,
            r.crashes,
            r.recover_text
                .clone()
                .unwrap_or_else(|| fmt_recover(&r.recover))
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "seed {} · {} mode · {:.0} s · worker {}",
        env.seed,
        env.mode(),
        started.elapsed().as_secs_f64(),
        env.bin.display()
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "- {}: in-flight repeats {}, late-answer repeats {}, left undelivered {}, stepped over {}",
            r.name, r.inflight, r.late, r.undelivered, r.stepped
        );
        for n in &r.notes {
            let _ = writeln!(out, "  - {n}");
        }
        for f in &r.failures {
            let _ = writeln!(out, "  - FAIL: {f}");
        }
    }
    print!("{out}");
    std::fs::write(env.work.join("table.md"), &out)?;
    if rows.iter().any(|r| !r.failures.is_empty()) {
        std::process::exit(1);
    }
    Ok(())
}
