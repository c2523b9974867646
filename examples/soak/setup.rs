//! The soak's settings, its identities on Dovecot and Cassandra, its
//! daemons (2 pollers, 3 workers) and the processor stand-in that records
//! every hand-off. Kept apart from the load and the faults so each of those
//! reads only what it needs from here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use caliopen_imap::config::{self, StoreSettings};
use caliopen_imap::imap::{self, utf7, Account, Auth, ImapSession, Security};
use caliopen_imap::store::identity::{creds, infos, Identity};
use caliopen_imap::store::Store;
use futures::StreamExt;
use uuid::Uuid;

use crate::kit::{self, var, var_or, Daemon, Launch};
use crate::processor::{self, Answer, Pace};

/// The folders an identity may have besides INBOX; one has a UTF-8 name.
pub const FOLDERS: [&str; 4] = ["Archive", "Work", "Été 2026", "Lists"];

/// Everything the run needs to know, read once from the environment.
#[derive(Clone)]
pub struct Env {
    pub launch: Launch,
    pub nats: String,
    pub cass: String,
    pub keyspace: String,
    pub imaps: String,
    pub ca_file: String,
    pub password: String,
    pub s3_endpoint: String,
    pub minutes: f64,
    pub seed: u64,
    /// Generator actions per second.
    pub rate: f64,
    pub identities: usize,
    pub quick: bool,
    /// Where the report goes (SOAK.md, or under target/ for --quick).
    pub report: PathBuf,
    /// Raw messages larger than this go to S3 (set low so some do).
    pub raw_size_limit: u64,
}

impl Env {
    pub fn load() -> Result<Env> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let quick = var_or("SOAK_QUICK", 0u8)? == 1;
        let seed = match std::env::var("SOAK_SEED") {
            Ok(s) if !s.is_empty() => s.parse().context("SOAK_SEED: not a number")?,
            _ => fastrand::u64(..1_000_000),
        };
        let work = repo.join("target/soak").join(format!("run-{seed}"));
        // A replayed seed starts with no log of the run before.
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let default_report = if quick {
            repo.join("target/soak/SOAK-quick.md")
        } else {
            repo.join("SOAK.md")
        };
        Ok(Env {
            launch: Launch {
                bin: std::env::var("CALIOPEN_IMAP_BIN")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| repo.join("target/debug/caliopen-imap")),
                repo,
                work,
                tag: "soak",
            },
            nats: var("STACK_NATS_URL")?,
            cass: var("STACK_CASSANDRA_HOSTS")?,
            keyspace: var_or("STACK_CASSANDRA_KEYSPACE", "caliopen".to_string())?,
            imaps: format!("{}:{}", var("STACK_IMAP_HOST")?, var("STACK_IMAPS_PORT")?),
            ca_file: var("STACK_IMAP_CA_FILE")?,
            password: var("STACK_IMAP_PASSWORD")?,
            s3_endpoint: var("STACK_S3_ENDPOINT")?,
            minutes: var_or("SOAK_MINUTES", 30.0)?,
            seed,
            rate: var_or("SOAK_RATE", if quick { 5.0 } else { 20.0 })?,
            identities: var_or("SOAK_IDENTITIES", if quick { 40 } else { 200 })?,
            quick,
            report: std::env::var("SOAK_REPORT")
                .map(PathBuf::from)
                .unwrap_or(default_report),
            raw_size_limit: var_or("SOAK_RAW_SIZE_LIMIT", 65_536)?,
        })
    }

    pub fn run_for(&self) -> Duration {
        Duration::from_secs_f64(self.minutes * 60.0)
    }

    /// Overrides (the daemons' own environment mechanism) on the shipped
    /// config files: this stack's addresses, and a low `raw_size_limit`.
    fn common_env(&self) -> Vec<(String, String)> {
        let hosts: Vec<&str> = self.cass.split(',').collect();
        [
            ("NATS_URL", self.nats.clone()),
            (
                "STORE_SETTINGS__HOSTS",
                serde_json::to_string(&hosts).unwrap_or_default(),
            ),
            ("STORE_SETTINGS__KEYSPACE", self.keyspace.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{}{k}", config::ENV_PREFIX), v))
        .collect()
    }

    pub fn worker_env(&self, idle_max: u32) -> Vec<(String, String)> {
        let p = config::ENV_PREFIX;
        let mut e = self.common_env();
        e.extend(
            [
                (
                    "STORE_SETTINGS__RAW_SIZE_LIMIT",
                    self.raw_size_limit.to_string(),
                ),
                (
                    "STORE_SETTINGS__OBJECT_STORE_SETTINGS__ENDPOINT",
                    self.s3_endpoint.clone(),
                ),
                ("IMAP__CA_FILE", self.ca_file.clone()),
                ("IMAP__LOCK_TTL_SECS", "30".into()),
                ("IMAP__IDLE_MAX", idle_max.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (format!("{p}{k}"), v)),
        );
        e
    }

    pub fn poller_env(&self) -> Vec<(String, String)> {
        self.common_env()
    }

    pub async fn store(&self) -> Result<Store> {
        let settings = StoreSettings {
            hosts: self.cass.split(',').map(str::to_string).collect(),
            keyspace: self.keyspace.clone(),
            ..Default::default()
        };
        Ok(Store::connect(&settings, Duration::from_secs(30)).await?)
    }

    pub fn account(&self, login: &str) -> Account {
        Account {
            server: self.imaps.clone(),
            security: Security::Tls,
            auth: Auth::Login {
                user: login.to_string(),
                password: self.password.clone(),
            },
            ca_files: vec![self.ca_file.clone().into()],
            pin: None,
            allow_plaintext_loopback: false,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
        }
    }

    pub async fn imap(&self, login: &str) -> Result<ImapSession> {
        let (s, _) = imap::connect(&self.account(login)).await?;
        Ok(s)
    }
}

// ------------------------------------------------------------------ identities

/// One soak identity: a Dovecot user with 3 to 5 folders.
#[derive(Clone, Debug)]
pub struct Ident {
    pub login: String,
    pub user: Uuid,
    pub identity: Uuid,
    /// Its folders (UTF-8 names), INBOX first.
    pub folders: Vec<String>,
    /// `mailboxes: *` (every folder, those created later too).
    pub star: bool,
    /// The folders it syncs when not `star`.
    pub listed: Vec<String>,
    pub idle: bool,
}

impl Ident {
    pub fn syncs(&self, folder: &str) -> bool {
        self.star || self.listed.iter().any(|f| f == folder)
    }
}

/// The shape of identity `i`: a third `*`, a third listing every folder,
/// a third listing all but its last; every other one with IDLE.
fn shape(env: &Env, i: usize) -> Ident {
    let mut rng = fastrand::Rng::with_seed(env.seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
    let extra = rng.usize(2..=4);
    let mut pool = FOLDERS.to_vec();
    rng.shuffle(&mut pool);
    let mut folders = vec!["INBOX".to_string()];
    folders.extend(pool[..extra].iter().map(|s| s.to_string()));
    let listed = match i % 3 {
        0 => Vec::new(),
        1 => folders.clone(),
        _ => folders[..folders.len() - 1].to_vec(),
    };
    Ident {
        login: format!("soak{}x{i}", env.seed),
        user: Uuid::new_v4(),
        identity: Uuid::new_v4(),
        folders,
        star: i.is_multiple_of(3),
        listed,
        idle: i.is_multiple_of(2),
    }
}

/// Make the Dovecot folders and the Cassandra rows of every identity.
pub async fn make_identities(env: &Env, store: &Store) -> Result<Vec<Ident>> {
    let all: Vec<Ident> = (0..env.identities).map(|i| shape(env, i)).collect();
    let made = futures::stream::iter(all.clone())
        .map(|id| async move { make_one(env, store, &id).await })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for r in made {
        r?;
    }
    Ok(all)
}

async fn make_one(env: &Env, store: &Store, id: &Ident) -> Result<()> {
    let mut s = env.imap(&id.login).await?;
    for f in id.folders.iter().skip(1) {
        // Already there when a seed is replayed on the same stack.
        let _ = s.create(utf7::encode(f)).await;
    }
    let _ = s.logout().await;
    store
        .insert_user(id.user, &format!("{}-user", id.login))
        .await?;
    let mut inf = HashMap::from([
        (infos::INSERVER.to_string(), env.imaps.clone()),
        (infos::AUTHTYPE.to_string(), infos::AUTH_LOGIN.to_string()),
        (infos::POLLINTERVAL.to_string(), "1".to_string()),
        (
            infos::MAILBOXES.to_string(),
            if id.star {
                "*".to_string()
            } else {
                id.listed.join(",")
            },
        ),
    ]);
    if id.idle {
        inf.insert(infos::IDLE.into(), "true".into());
    }
    let identity = Identity {
        user_id: id.user,
        identity_id: id.identity,
        credentials: HashMap::from([
            (creds::USERNAME_IN.to_string(), id.login.clone()),
            (creds::PASSWORD_IN.to_string(), env.password.clone()),
        ]),
        display_name: id.login.clone(),
        identifier: id.login.clone(),
        infos: inf,
        last_check: None,
        protocol: "email".into(),
        status: "active".into(),
        kind: "remote".into(),
    };
    store.insert_identity(&identity).await?;
    Ok(())
}

// ------------------------------------------------------------------ daemons

/// The soak's daemons: 3 workers (the last with a small `idle_max`, so
/// sessions move between workers) and 2 pollers (a leader and a standby).
pub struct Fleet {
    pub workers: Vec<Daemon>,
    pub pollers: Vec<Daemon>,
}

/// A daemon as the RSS sampler sees it: (name, pid, restarts so far).
pub type Running = (String, Option<u32>, u32);

pub const WORKER_READY: &str = "imapworker ready";
/// Both pollers log it at start, leader or standby.
pub const POLLER_READY: &str = "waiting for the lease";

impl Fleet {
    pub async fn start(env: &Env) -> Result<Fleet> {
        let cfg = |f: &str| env.launch.repo.join("config").join(f).display().to_string();
        let args = |mode: &str, file: &str| -> Vec<String> {
            vec![mode.into(), "-c".into(), cfg(file), "start".into()]
        };
        let mut workers = Vec::new();
        for idle_max in [1000, 1000, 5] {
            workers.push(
                Daemon::spawn(
                    &env.launch,
                    "worker",
                    args("worker", "imapworker.yaml"),
                    env.worker_env(idle_max),
                    WORKER_READY,
                )
                .await?,
            );
        }
        let mut pollers = Vec::new();
        for _ in 0..2 {
            pollers.push(
                Daemon::spawn(
                    &env.launch,
                    "poller",
                    args("poller", "idpoller.yaml"),
                    env.poller_env(),
                    POLLER_READY,
                )
                .await?,
            );
        }
        Ok(Fleet { workers, pollers })
    }

    pub fn all(&mut self) -> impl Iterator<Item = &mut Daemon> {
        self.workers.iter_mut().chain(self.pollers.iter_mut())
    }

    /// Each daemon's name, pid and restarts, for the RSS sampler.
    pub fn pids(&self) -> Vec<Running> {
        let named = |v: &Vec<Daemon>| -> Vec<Running> {
            v.iter()
                .enumerate()
                .map(|(k, d)| (format!("{} {}", d.name, k + 1), d.pid(), d.restarts))
                .collect()
        };
        let mut all = named(&self.workers);
        all.extend(named(&self.pollers));
        all
    }

    /// Restart whatever exited on its own (each counted as a crash).
    pub async fn watch(&mut self) -> Result<()> {
        for d in self.all() {
            d.check().await?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ stand-in

/// One `process_raw` the processor stand-in received.
#[derive(Clone, Copy)]
pub struct Handoff {
    pub at: Instant,
    pub msg: Uuid,
}

/// How the stand-in behaves now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Normal,
    /// Unsubscribed: NATS answers "no responders".
    Absent,
    /// Each answer this late.
    Slow(Duration),
}

/// The processor stand-in (for Caliopen's message processor, which is not
/// part of this project): answers every `process_raw` and records it.
#[derive(Clone)]
pub struct Recorder {
    pub seen: Arc<Mutex<Vec<Handoff>>>,
    delay: Arc<Mutex<Duration>>,
    client: async_nats::Client,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Recorder {
    pub async fn start(env: &Env) -> Result<Recorder> {
        let r = Recorder {
            seen: Arc::default(),
            delay: Arc::default(),
            client: async_nats::connect(env.nats.as_str()).await?,
            task: Arc::default(),
        };
        r.set(Mode::Normal).await?;
        Ok(r)
    }

    pub async fn set(&self, mode: Mode) -> Result<()> {
        *self.delay.lock().unwrap() = match mode {
            Mode::Slow(d) => d,
            _ => Duration::ZERO,
        };
        let (seen, delay) = (self.seen.clone(), self.delay.clone());
        let decide = (mode != Mode::Absent).then_some(move |o: &processor::ProcessRaw| {
            seen.lock().unwrap().push(Handoff {
                at: Instant::now(),
                msg: o.message_id,
            });
            (Answer::Ok, Pace::Each(*delay.lock().unwrap()))
        });
        kit::switch_standin(&self.client, "inboundSMTP", &self.task, decide).await
    }
}
