//! Helpers of the integration tests: the running local stack (from
//! `.stack/env`, written by `scripts/stack.sh up`), unique names so tests
//! can run in parallel without seeing each other, Dovecot mailboxes, and a
//! stand-in for Caliopen's message processor.
//!
//! Every test uses its own NATS subjects, Caliopen user and Dovecot user, so
//! the real services are shared but the tests stay independent.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use caliopen_imap::bus::{Bus, Retry};
use caliopen_imap::config::WorkerSettings;
use caliopen_imap::shutdown::{self, Shutdown, Trigger};
use caliopen_imap::store::identity::{creds, infos, Identity};
use caliopen_imap::store::Store;
use caliopen_imap::worker::context::Ctx;
use uuid::Uuid;

#[path = "support/processor.rs"]
pub mod processor;
#[path = "support/worker_yaml.rs"]
pub mod worker_yaml;
pub use processor::{Answer, Pace};
use worker_yaml::{StackAddrs, WorkerYaml};

/// Where the stack listens (from `.stack/env`).
#[derive(Debug, Clone)]
pub struct Stack {
    pub nats_url: String,
    pub cassandra: String,
    pub imap_host: String,
    pub imaps_port: u16,
    pub starttls_port: u16,
    pub ca_file: String,
    pub password: String,
    pub dovecot_conf: String,
    /// The S3 server (`STACK_S3_*`); required: large messages go there.
    pub s3: S3,
    /// The addresses a worker's YAML needs.
    pub addrs: StackAddrs,
}

/// Where the stack's S3 server listens, with its keys and bucket.
#[derive(Debug, Clone)]
pub struct S3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// A Python with Caliopen's S3 client (`minio`), to read objects back
    /// the way Caliopen's reader does.
    pub python: String,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The stack's state folder (`.stack`, or `CALIOPEN_IMAP_STACK_DIR`).
pub fn stack_dir() -> PathBuf {
    std::env::var("CALIOPEN_IMAP_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".stack"))
}

pub fn stack() -> &'static Stack {
    static S: OnceLock<Stack> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::var("CALIOPEN_IMAP_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root().join(".stack"));
        let path = dir.join("env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}. Start the stack first: scripts/stack.sh up (make test does)",
                path.display()
            )
        });
        let mut env = HashMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line
                .trim()
                .strip_prefix("export ")
                .and_then(|l| l.split_once('='))
            {
                env.insert(
                    k.to_string(),
                    v.trim_matches('"').trim_matches('\'').to_string(),
                );
            }
        }
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing from {}", path.display()))
        };
        Stack {
            nats_url: get("STACK_NATS_URL"),
            cassandra: get("STACK_CASSANDRA_HOSTS"),
            imap_host: get("STACK_IMAP_HOST"),
            imaps_port: get("STACK_IMAPS_PORT").parse().unwrap(),
            starttls_port: get("STACK_IMAP_STARTTLS_PORT").parse().unwrap(),
            ca_file: get("STACK_IMAP_CA_FILE"),
            password: get("STACK_IMAP_PASSWORD"),
            dovecot_conf: get("STACK_DOVECOT_CONF"),
            s3: S3 {
                endpoint: env.get("STACK_S3_ENDPOINT").cloned().unwrap_or_else(|| {
                    panic!(
                        "STACK_S3_ENDPOINT missing from {}: this stack has no S3 server yet; \
                         run scripts/stack.sh up again (it adds one)",
                        path.display()
                    )
                }),
                access_key: get("STACK_S3_ACCESS_KEY"),
                secret_key: get("STACK_S3_SECRET_KEY"),
                bucket: get("STACK_S3_BUCKET"),
                python: get("STACK_S3_PYTHON"),
            },
            addrs: StackAddrs::from_vars(|k| env.get(k).cloned())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    })
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed) + 1000 * fastrand::u64(..1000)
    )
}

pub fn imaps_server() -> String {
    format!("{}:{}", stack().imap_host, stack().imaps_port)
}

/// The account of Dovecot user `login` on the stack, as a mail client of
/// the tests would use it (IMAPS, the stack's CA).
pub fn dovecot_account(login: &str) -> caliopen_imap::imap::Account {
    use caliopen_imap::imap::{Account, Auth, Security};
    Account {
        server: imaps_server(),
        security: Security::Tls,
        auth: Auth::Login {
            user: login.to_string(),
            password: stack().password.clone(),
        },
        ca_files: vec![stack().ca_file.clone().into()],
        pin: None,
        allow_plaintext_loopback: false,
        connect_timeout: Duration::from_secs(10),
        io_timeout: Duration::from_secs(30),
    }
}

/// Worker settings for the stack, with subjects of this test only.
pub fn worker_settings(tag: &str) -> WorkerSettings {
    let s = stack();
    let mut w = WorkerSettings::default();
    w.nats_url = s.nats_url.clone();
    w.store_settings.hosts = vec![s.cassandra.clone()];
    w.imap.ca_file = s.ca_file.clone();
    w.nats_topic_sender = format!("outboundIMAP.{tag}");
    w.nats_topic_poller = format!("imapJobs.{tag}");
    w.nats_topic_poller_cache = format!("idCache.{tag}");
    w.lda.in_topic = format!("inboundSMTP.{tag}");
    w.lda.out_topic = format!("outboundSMTP.{tag}");
    w.imap.poll_throttle_secs = 3600; // no poller in worker tests
                                      // No live sync unless the test asks: its scan would see other tests' identities.
    w.imap.idle = caliopen_imap::config::IdleMode::Off;
    w.workers = 4;
    set_s3(&mut w, &s.s3);
    w
}

/// Point the settings at an S3 server (messages over `raw_size_limit`).
pub fn set_s3(w: &mut WorkerSettings, s3: &S3) {
    let o = &mut w.store_settings.object_store_settings;
    o.endpoint = s3.endpoint.clone();
    o.access_key = s3.access_key.clone();
    o.secret_key = s3.secret_key.clone();
    o.buckets.insert("raw_messages".into(), s3.bucket.clone());
}

/// The YAML of `worker_settings(tag)`, for subprocesses; `imap_extra`
/// lines go inside its `imap:` block.
pub fn worker_yaml(tag: &str, imap_extra: &str) -> PathBuf {
    // No live sync unless the test asks: its scan would see other tests' identities.
    let imap_extra = &if imap_extra.contains("idle:") {
        imap_extra.to_string()
    } else {
        format!("  idle: off\n{imap_extra}")
    };
    let text = WorkerYaml {
        stack: &stack().addrs,
        tag,
        workers: 4,
        in_topic: &format!("inboundSMTP.{tag}"),
        keyspace: "caliopen",
        bucket: "",
        imap_extra,
    }
    .render();
    let path = std::env::temp_dir().join(format!("caliopen-imap-{tag}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn store() -> Store {
    let mut w = WorkerSettings::default();
    w.store_settings.hosts = vec![stack().cassandra.clone()];
    Store::connect(&w.store_settings, Duration::from_secs(30))
        .await
        .expect("Cassandra of the stack")
}

pub async fn bus() -> Bus {
    Bus::connect(
        &stack().nats_url,
        "tests",
        Retry::Attempts(5),
        Shutdown::never(),
    )
    .await
    .expect("NATS of the stack")
}

/// A Caliopen user with a unique name.
pub async fn new_user(store: &Store) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let name = unique("user");
    store.insert_user(id, &name).await.unwrap();
    (id, name)
}

/// A remote identity for Dovecot user `login`, as addremote writes it.
pub async fn new_identity(
    store: &Store,
    user: Uuid,
    login: &str,
    server: &str,
    password: &str,
) -> Identity {
    new_identity_with_id(store, user, Uuid::new_v4(), login, server, password).await
}

/// The same, with the identity id chosen by the caller.
pub async fn new_identity_with_id(
    store: &Store,
    user: Uuid,
    identity_id: Uuid,
    login: &str,
    server: &str,
    password: &str,
) -> Identity {
    let id = Identity {
        user_id: user,
        identity_id,
        credentials: HashMap::from([
            (creds::USERNAME_IN.to_string(), login.to_string()),
            (creds::PASSWORD_IN.to_string(), password.to_string()),
        ]),
        display_name: format!("Display {login}"),
        identifier: login.to_lowercase(),
        infos: HashMap::from([
            (infos::INSERVER.to_string(), server.to_string()),
            (infos::AUTHTYPE.to_string(), infos::AUTH_LOGIN.to_string()),
            (infos::POLLINTERVAL.to_string(), "15".to_string()),
        ]),
        last_check: None,
        protocol: "email".into(),
        status: "active".into(),
        kind: "remote".into(),
    };
    store.insert_identity(&id).await.unwrap();
    id
}

/// A Caliopen user, a fresh Dovecot user with `count` small messages in
/// each of `folders`, and a remote identity syncing `mailboxes`.
pub async fn folders_account(
    store: &Store,
    folders: &[(&str, usize)],
    mailboxes: &str,
) -> (Uuid, String, Identity) {
    let (user, _) = new_user(store).await;
    let login = unique("dove");
    for (folder, count) in folders {
        fill(&login, folder, *count, 300);
    }
    let id = new_identity(store, user, &login, &imaps_server(), &stack().password).await;
    store
        .merge_infos(
            user,
            id.identity_id,
            [(infos::MAILBOXES.to_string(), mailboxes.to_string())].into(),
        )
        .await
        .unwrap();
    (user, login, id)
}

/// A Caliopen user, a fresh Dovecot user with `count` messages of about
/// `size` bytes in INBOX, and a remote identity linking them.
pub async fn mailbox_account(store: &Store, count: usize, size: usize) -> (Uuid, String, Identity) {
    let (user, _) = new_user(store).await;
    let login = unique("dove");
    fill(&login, "INBOX", count, size);
    let id = new_identity(store, user, &login, &imaps_server(), &stack().password).await;
    (user, login, id)
}

/// A remote identity of `user` on the scripted server stand-in at `port`
/// (plain IMAP on loopback).
pub async fn scripted_identity(
    store: &Store,
    user: Uuid,
    identity_id: Uuid,
    port: u16,
) -> Identity {
    let server = format!("127.0.0.1:{port}");
    let id = new_identity_with_id(store, user, identity_id, &unique("s"), &server, "pw").await;
    store
        .merge_infos(
            user,
            identity_id,
            [(infos::SECURITY.to_string(), "plain".to_string())].into(),
        )
        .await
        .unwrap();
    id
}

// ------------------------------------------------------------------ Dovecot

pub fn doveadm(args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("doveadm");
    cmd.arg("-c").arg(&stack().dovecot_conf).args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("doveadm");
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "doveadm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A test message, CRLF line ends, some non-ASCII.
pub fn message(n: usize, body_len: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Zoé <zoe@example.test>\r\nTo: someone@example.test\r\nSubject: test {n} é\r\n\
         Message-ID: <{n}.{}@example.test>\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
        fastrand::u64(..)
    )
    .into_bytes();
    let line = "Ceci est un message de test, avec des accents: àéèü.\r\n";
    while m.len() < body_len {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// Put `count` messages into `mailbox` of Dovecot user `user`.
pub fn fill(user: &str, mailbox: &str, count: usize, body_len: usize) -> Vec<Vec<u8>> {
    if !mailbox.eq_ignore_ascii_case("INBOX") {
        // Create it if needed (an existing one makes doveadm complain: fine).
        let _ = Command::new("doveadm")
            .arg("-c")
            .arg(&stack().dovecot_conf)
            .args(["mailbox", "create", "-u", user, mailbox])
            .output();
    }
    let mut all = Vec::new();
    for i in 0..count {
        let m = message(i, body_len);
        doveadm(&["save", "-u", user, "-m", mailbox], Some(&m));
        all.push(m);
    }
    all
}

/// (messages, uidnext, uidvalidity).
pub fn mailbox_status(user: &str, mailbox: &str) -> (u32, u32, u32) {
    let out = doveadm(
        &[
            "-f",
            "flow",
            "mailbox",
            "status",
            "-u",
            user,
            "messages uidnext uidvalidity",
            mailbox,
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |k: &str| -> u32 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {text:?}"))
    };
    (field("messages"), field("uidnext"), field("uidvalidity"))
}

// ------------------------------------------------------------------ worker

/// A worker running in this process; `stop` triggers its shutdown.
pub struct WorkerHandle {
    pub ctx: Ctx,
    trigger: Trigger,
    join: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    pub async fn stop(self) {
        self.trigger.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.join).await;
    }
}

pub async fn context(settings: WorkerSettings) -> (Ctx, Trigger) {
    let (trigger, shutdown) = shutdown::channel();
    let store = Store::connect(&settings.store_settings, Duration::from_secs(30))
        .await
        .unwrap();
    let bus = Bus::connect(
        &settings.nats_url,
        "test-worker",
        Retry::Attempts(5),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let objects = caliopen_imap::store::objects::from_worker_settings(&settings).unwrap();
    if let Some(o) = &objects {
        o.ensure_bucket().await.unwrap();
    }
    (
        Ctx::new(settings, store, bus, shutdown).with_objects(objects),
        trigger,
    )
}

/// Sync `identity` once, in-process.
pub async fn sync_once(
    ctx: &caliopen_imap::worker::context::Ctx,
    user: Uuid,
    identity: Uuid,
) -> caliopen_imap::bus::wire::JobReport {
    caliopen_imap::worker::job::sync_identity(
        ctx,
        caliopen_imap::worker::job::SyncRequest {
            user_id: user,
            identity_id: identity,
            password: String::new(),
        },
        caliopen_imap::worker::context::Counters::new(),
    )
    .await
}

pub async fn start_worker(settings: WorkerSettings) -> WorkerHandle {
    let (ctx, trigger) = context(settings).await;
    serve_worker(ctx, trigger).await
}

/// A worker named `id` (a test that must know who wins an assignment).
pub async fn start_worker_named(settings: WorkerSettings, id: &str) -> WorkerHandle {
    let (mut ctx, trigger) = context(settings).await;
    ctx.worker_id = id.to_string();
    serve_worker(ctx, trigger).await
}

async fn serve_worker(ctx: Ctx, trigger: Trigger) -> WorkerHandle {
    let c = ctx.clone();
    let join = tokio::spawn(async move {
        caliopen_imap::worker::serve(c).await.unwrap();
    });
    // Ready once it answers on its subject: it has subscribed.
    wait_for_worker(&ctx.settings.nats_topic_sender, || !join.is_finished()).await;
    WorkerHandle { ctx, trigger, join }
}

// ------------------------------------------------------------------ processor stand-in

/// A stand-in for Caliopen's message processor (not part of this project):
/// answers `process_raw` like it does, failing the requests `fail` picks.
pub struct Lda {
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// How many are in `seen`, to wait on.
    count: tokio::sync::watch::Receiver<usize>,
    join: tokio::task::JoinHandle<()>,
}

impl Lda {
    /// Wait until `n` messages were answered with success.
    pub async fn wait_seen(&self, n: usize) {
        let mut count = self.count.clone();
        count
            .wait_for(|c| *c >= n)
            .await
            .expect("the stand-in is running");
    }
}

impl Drop for Lda {
    fn drop(&mut self) {
        self.join.abort();
    }
}

pub async fn lda<F>(subject: &str, fail: F) -> Lda
where
    F: Fn(&str) -> bool + Send + 'static,
{
    lda_with_delay(subject, Duration::ZERO, fail).await
}

pub async fn lda_with_delay<F>(subject: &str, delay: Duration, fail: F) -> Lda
where
    F: Fn(&str) -> bool + Send + 'static,
{
    lda_answering(subject, delay, move |id| {
        if fail(id) {
            Answer::Fail
        } else {
            Answer::Ok
        }
    })
    .await
}

/// A stand-in processor that never answers the requests `silent` picks
/// (and answers the others with success): a poison message's timeout.
pub async fn lda_answering_except<F>(subject: &str, silent: F) -> Lda
where
    F: Fn(&str) -> bool + Send + 'static,
{
    lda_answering(subject, Duration::ZERO, move |id| {
        if silent(id) {
            Answer::Silent
        } else {
            Answer::Ok
        }
    })
    .await
}

/// The processor stand-in: answers each `process_raw` as `answer` picks,
/// after `delay` (which holds the next answers too, as one busy processor
/// would); the messages answered with success are recorded in `seen`.
pub async fn lda_answering<F>(subject: &str, delay: Duration, answer: F) -> Lda
where
    F: Fn(&str) -> Answer + Send + 'static,
{
    let client = async_nats::connect(&stack().nats_url).await.unwrap();
    let sub = client.subscribe(subject.to_string()).await.unwrap();
    // The subscription has reached the server when this returns.
    client.flush().await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (counted, count) = tokio::sync::watch::channel(0);
    let s2 = seen.clone();
    let join = tokio::spawn(processor::serve(client, sub, move |order| {
        let id = order.message_id.to_string();
        let a = answer(&id);
        if a == Answer::Ok {
            let mut seen = s2.lock().unwrap();
            seen.push(id);
            counted.send_replace(seen.len());
        }
        (a, Pace::Serial(delay))
    }));
    Lda { seen, count, join }
}

// ------------------------------------------------------------------ cqlsh

/// Run CQL through the stack's cqlsh (for what the Store does not expose,
/// such as TTL and WRITETIME); its standard output.
pub fn cql_exec(query: &str) -> String {
    let cqlsh = std::fs::read_to_string(stack_dir().join("env"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("export STACK_CQLSH=").map(str::to_string))
        .unwrap();
    let host = stack().cassandra.split(':').collect::<Vec<_>>();
    let out = Command::new(cqlsh.trim_matches('"'))
        .args([host[0], host[1], "-e", query])
        .output()
        .unwrap();
    assert!(out.status.success(), "cqlsh {query}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The single value a one-column, one-row CQL query returns.
pub fn cql_value(query: &str) -> Option<String> {
    let out = cql_exec(query);
    let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
    lines.find(|l| l.starts_with("---"))?;
    let v = lines.next()?;
    if v.starts_with('(') || v == "null" {
        None
    } else {
        Some(v.to_string())
    }
}

/// Wait until a worker process answers a `test` order on `subject`: it has
/// subscribed. Fails if the process exits, or after 30 s.
pub async fn wait_until_worker_answers(subject: &str, worker: &mut std::process::Child) {
    wait_for_worker(subject, || worker.try_wait().unwrap().is_none()).await
}

/// Wait until a worker answers a `test` order on `subject`, asking `alive`
/// between tries; fails when it says no, or after 30 s.
pub async fn wait_for_worker(subject: &str, mut alive: impl FnMut() -> bool) {
    use caliopen_imap::bus::wire::{ImapOrder, JobReport};
    let b = bus().await;
    let started = std::time::Instant::now();
    let test = ImapOrder {
        order: "test".into(),
        ..Default::default()
    };
    while b
        .request::<_, JobReport>(subject, &test, Duration::from_secs(1))
        .await
        .is_err()
    {
        assert!(alive(), "the worker exited");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "worker never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ binary

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_caliopen-imap"))
}

/// A symlink named `name` to the binary, in a temp folder.
pub fn symlink(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("cimap-bin"));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join(name);
    std::os::unix::fs::symlink(bin(), &link).unwrap();
    link
}

/// Run the binary with `args`; environment overrides cleared.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("CALIOPEN_IMAP_") && k != "CALIOPEN_IMAP_STACK_DIR" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    cmd.output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// A stand-in for Caliopen's SMTP sender (outside this project): it answers
/// every `deliver` hand-off on `topic` with `{"error":false,"message":"sent #n"}`,
/// n counting from 1, and counts the sends in the returned counter.
pub async fn smtp_sender_standin(topic: &str) -> Arc<std::sync::atomic::AtomicUsize> {
    use futures::StreamExt;
    let smtp = async_nats::connect(&stack().nats_url).await.unwrap();
    let mut sub = smtp.subscribe(topic.to_string()).await.unwrap();
    smtp.flush().await.unwrap();
    let sends = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sends.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(r) = m.reply {
                let answer = format!(r#"{{"error":false,"message":"sent #{n}"}}"#);
                let _ = smtp.publish(r, answer.into_bytes().into()).await;
            }
        }
    });
    sends
}
