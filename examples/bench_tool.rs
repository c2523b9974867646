//! The benchmark suite's helper (`examples/bench/` drives it): corpus
//! generation, the two ceilings, sync orders with timing, identity seeding
//! and the poller's `need_job` latency. One example with subcommands rather
//! than six, so the release build links one more binary, not six.
//!
//! Every subcommand prints one JSON line on stdout (the figures) and its
//! diagnostics on stderr.
//!
//! ```text
//! bench_tool corpus   --dir MAILDIR --count N --seed S [--first K] [--profile mixed|small|large]
//! bench_tool worker-yaml --tag T --workers N --in-topic SUBJ --keyspace KS --bucket B   (YAML, not JSON)
//! bench_tool fetch    --server H:P --login U --password-env VAR --ca FILE
//! bench_tool store    --dir MAILDIR --hosts H:P --keyspace KS --concurrency C [--mark yes|no]
//! bench_tool users    --hosts H:P --keyspace KS --logins PREFIX --count N --server H:P --password-env VAR
//!                     [--infos "key=value;key=value"]
//! bench_tool sync     --nats URL --subject SUBJ --user UUID --identity UUID
//! bench_tool sync-many --nats URL --subject SUBJ --hosts H:P --keyspace KS --list FILE
//! bench_tool seed-identities --hosts H:P --keyspace KS --count N [--concurrency C]
//! bench_tool need-job --nats URL --subject SUBJ [--rate R] [--clients C] [--secs S]
//! bench_tool live-latency --nats URL --in-topic SUBJ --server H:P --ca FILE --password-env VAR
//!                     --list FILE --logins PREFIX [--messages N] [--mode idle|order]
//!                     [--subject SUBJ] [--timeout SECS] [--folder F] [--worker-pid PID]
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use caliopen_imap::config::StoreSettings;
use caliopen_imap::imap::{self, Account, Auth, Security};
use caliopen_imap::store::identity::{creds, infos, Identity};
use caliopen_imap::store::raw_message::raw_message_id;
use caliopen_imap::store::Store;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use uuid::Uuid;

#[path = "../tests/support/worker_yaml.rs"]
mod worker_yaml;

#[path = "../tests/support/processor.rs"]
mod processor;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let flags = Flags::parse(args)?;
    let out = match cmd.as_str() {
        "corpus" => corpus(&flags)?,
        "worker-yaml" => {
            print!("{}", worker_yaml_of(&flags)?);
            return Ok(());
        }
        "fetch" => fetch(&flags).await?,
        "store" => store_ceiling(&flags).await?,
        "users" => users(&flags).await?,
        "sync" => sync(&flags).await?,
        "sync-many" => sync_many(&flags).await?,
        "seed-identities" => seed_identities(&flags).await?,
        "need-job" => need_job(&flags).await?,
        "live-latency" => live_latency(&flags).await?,
        other => bail!("unknown subcommand {other:?}; see the header of examples/bench_tool.rs"),
    };
    println!("{out}");
    Ok(())
}

// ------------------------------------------------------------------ flags

/// `--key value` pairs; nothing fancier is needed by a script-driven tool.
struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: impl Iterator<Item = String>) -> Result<Flags> {
        let mut map = HashMap::new();
        let mut args = args.peekable();
        while let Some(a) = args.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("expected --flag, found {a:?}"))?;
            let value = args
                .next()
                .ok_or_else(|| anyhow!("--{key} needs a value"))?;
            map.insert(key.to_string(), value);
        }
        Ok(Flags(map))
    }

    fn get(&self, key: &str) -> Result<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("missing --{key}"))
    }

    fn or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.0.get(key).map(String::as_str).unwrap_or(default)
    }

    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow!("--{key}: not a number: {v:?}")),
        }
    }

    /// A secret named by an environment variable, so it is not in `ps`.
    fn secret(&self, key: &str) -> Result<String> {
        let var = self.get(key)?;
        std::env::var(var).with_context(|| format!("--{key}: ${var} is not set"))
    }

    async fn store(&self) -> Result<Store> {
        let settings = StoreSettings {
            hosts: vec![self.get("hosts")?.to_string()],
            keyspace: self.get("keyspace")?.to_string(),
            ..Default::default()
        };
        Ok(Store::connect(&settings, Duration::from_secs(30)).await?)
    }
}

// ------------------------------------------------------------------ corpus

/// Display names and subjects with what real mail has: accents, other
/// scripts, an emoji. They go through RFC 2047 in headers and raw UTF-8 in
/// bodies.
const NAMES: &[&str] = &[
    "Zoé Lefèvre",
    "Jürgen Müller",
    "Søren Ørsted",
    "Åsa Öberg",
    "Łukasz Żółkiewski",
    "Μαρία Παπαδοπούλου",
    "Иван Петров",
    "山田 太郎",
    "José Niño",
    "Chloé Dubois",
    "Ana Lima",
    "Bob Smith",
];

const SUBJECTS: &[&str] = &[
    "Réunion de l'équipe",
    "Überprüfung des Angebots",
    "Отчёт за неделю",
    "会議のお知らせ",
    "Facture n°",
    "Re: déjeuner vendredi ?",
    "Fwd: photos de l'été 🌞",
    "Quarterly report",
    "Αίτηση άδειας",
    "Lançamento do projeto 🚀",
];

const WORDS: &[&str] = &[
    "le",
    "courrier",
    "électronique",
    "arrive",
    "à",
    "l'heure",
    "für",
    "Grüße",
    "über",
    "naïve",
    "café",
    "señor",
    "año",
    "München",
    "Ærøskøbing",
    "письмо",
    "почта",
    "メール",
    "これは",
    "テスト",
    "meeting",
    "tomorrow",
    "the",
    "report",
    "is",
    "attached",
    "please",
    "review",
    "before",
    "Friday",
    "déjà",
    "ça",
    "où",
    "être",
    "œuvre",
    "Straße",
    "δοκιμή",
    "ελληνικά",
    "and",
    "with",
    "a",
    "of",
    "to",
    "in",
];

/// `=?UTF-8?B?...?=` when the text is not plain ASCII.
fn encode_word(text: &str) -> String {
    if text.is_ascii() {
        return text.to_string();
    }
    format!(
        "=?UTF-8?B?{}?=",
        base64::engine::general_purpose::STANDARD.encode(text)
    )
}

/// `=?UTF-8?Q?...?=`: the other encoding real clients use for subjects.
fn encode_q(text: &str) -> String {
    if text.is_ascii() {
        return text.to_string();
    }
    let mut s = String::from("=?UTF-8?Q?");
    for b in text.bytes() {
        match b {
            b' ' => s.push('_'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b',' | b'-' => s.push(b as char),
            _ => s.push_str(&format!("={b:02X}")),
        }
    }
    s.push_str("?=");
    s
}

/// Lines of UTF-8 words, CRLF-terminated, until `len` bytes.
fn text_body(rng: &mut fastrand::Rng, len: usize, out: &mut Vec<u8>) {
    let start = out.len();
    let mut col = 0;
    while out.len() - start < len {
        let w = WORDS[rng.usize(..WORDS.len())];
        if col + w.len() > 72 {
            out.extend_from_slice(b"\r\n");
            col = 0;
        } else if col > 0 {
            out.push(b' ');
            col += 1;
        }
        out.extend_from_slice(w.as_bytes());
        col += w.len();
    }
    out.extend_from_slice(b"\r\n");
}

/// Message sizes of a corpus.
#[derive(Clone, Copy, PartialEq)]
enum Profile {
    /// 80 % 1–20 KB, 18 % 20–200 KB, 2 % 0.2–2 MB (about 50 KB on average).
    Mixed,
    /// Only the first bucket of `Mixed`.
    Small,
    /// Every tenth message 1–20 MB (over Caliopen's 1 MiB `raw_size_limit`:
    /// object storage), the others as `Mixed`.
    Large,
}

/// The size of message `idx`.
fn pick_size(rng: &mut fastrand::Rng, profile: Profile, idx: u64) -> usize {
    if profile == Profile::Large && idx.is_multiple_of(10) {
        return rng.usize(1_000_000..20_000_000);
    }
    let bucket = if profile == Profile::Small {
        0
    } else {
        rng.u32(0..100)
    };
    match bucket {
        0..=79 => rng.usize(1_000..20_000),
        80..=97 => rng.usize(20_000..200_000),
        _ => rng.usize(200_000..2_000_000),
    }
}

/// One message of about `size` bytes: RFC 2047 headers, a UTF-8 text part,
/// sometimes an HTML part, and base64 attachments filling the rest.
fn message(rng: &mut fastrand::Rng, seed: u64, idx: u64, size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(size + 2048);
    let from = NAMES[rng.usize(..NAMES.len())];
    let to = NAMES[rng.usize(..NAMES.len())];
    let subject = format!("{} {idx}", SUBJECTS[rng.usize(..SUBJECTS.len())]);
    let subject = if rng.bool() {
        encode_word(&subject)
    } else {
        encode_q(&subject)
    };
    // Dates from 2021, one message every ~4 hours (wrapping after ~45 years).
    let date = chrono::DateTime::from_timestamp(1_609_459_200 + (idx % 100_000) as i64 * 14_400, 0)
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S +0000");
    let boundary = format!("=_bench_{seed}_{idx}_{:08x}", rng.u32(..));
    let login = |n: &str| {
        n.chars()
            .filter(char::is_ascii_alphabetic)
            .collect::<String>()
            .to_lowercase()
    };
    m.extend_from_slice(
        format!(
            "Return-Path: <{f}@example.test>\r\nFrom: {fe} <{f}@example.test>\r\n\
             To: {te} <{t}@example.test>\r\nSubject: {subject}\r\nDate: {date}\r\n\
             Message-ID: <{seed}.{idx}.{r:016x}@bench.example.test>\r\nMIME-Version: 1.0\r\n",
            f = if login(from).is_empty() {
                "sender".into()
            } else {
                login(from)
            },
            fe = encode_word(from),
            t = if login(to).is_empty() {
                "rcpt".into()
            } else {
                login(to)
            },
            te = encode_word(to),
            r = rng.u64(..),
        )
        .as_bytes(),
    );
    // Small messages are plain text only, as most short mail is.
    if size < 3_000 {
        m.extend_from_slice(
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        );
        let len = size.saturating_sub(m.len());
        text_body(rng, len, &mut m);
        return m;
    }
    m.extend_from_slice(
        format!(
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n\
             This is a multi-part message in MIME format.\r\n"
        )
        .as_bytes(),
    );
    m.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n"
        )
        .as_bytes(),
    );
    let text_len = rng.usize(500..2_500).min(size / 2);
    text_body(rng, text_len, &mut m);
    if rng.u8(..4) == 0 {
        m.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Transfer-Encoding: 8bit\r\n\r\n<html><body><p>"
            )
            .as_bytes(),
        );
        text_body(rng, text_len / 2, &mut m);
        m.extend_from_slice(b"</p></body></html>\r\n");
    }
    // Attachments: one, sometimes two, sharing what is left.
    let parts = if rng.u8(..3) == 0 { 2 } else { 1 };
    let kinds = [
        ("application/pdf", "facture_été.pdf"),
        ("image/jpeg", "photo_Zoé.jpg"),
        ("application/octet-stream", "données.bin"),
        ("application/zip", "archive_übersicht.zip"),
    ];
    for p in 0..parts {
        let left = size.saturating_sub(m.len() + boundary.len() + 300);
        let share = if p + 1 == parts { left } else { left / 2 };
        let raw_len = share / 4 * 3;
        let (ctype, name) = kinds[rng.usize(..kinds.len())];
        m.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Type: {ctype}; name=\"{}\"\r\n\
                 Content-Disposition: attachment; filename=\"{}\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n",
                encode_word(name),
                encode_word(name)
            )
            .as_bytes(),
        );
        let mut data = vec![0u8; raw_len];
        rng.fill(&mut data);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
        for line in b64.as_bytes().chunks(76) {
            m.extend_from_slice(line);
            m.extend_from_slice(b"\r\n");
        }
    }
    m.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    m
}

/// Write `count` messages as Maildir files into DIR/cur (Dovecot picks them
/// up at the next force-resync). Message `first + i` is the same bytes for
/// the same seed on every run: each message has its own PRNG stream.
fn corpus(f: &Flags) -> Result<serde_json::Value> {
    let dir = PathBuf::from(f.get("dir")?);
    let count: u64 = f.num("count", 0)?;
    let seed: u64 = f.num("seed", 1)?;
    let first: u64 = f.num("first", 0)?;
    let profile = match f.or("profile", "mixed") {
        "mixed" => Profile::Mixed,
        "small" => Profile::Small,
        "large" => Profile::Large,
        p => bail!("--profile: mixed, small or large, found {p:?}"),
    };
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let started = Instant::now();
    let mut bytes = 0u64;
    for idx in first..first + count {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ idx);
        let size = pick_size(&mut rng, profile, idx);
        let m = message(&mut rng, seed, idx, size);
        // Some read, some flagged: FLAGS come back in X-Fetched-Imap-Flags.
        let flags = match rng.u8(..10) {
            0..=5 => "S",
            6 => "FS",
            _ => "",
        };
        let name = format!(
            "{}.M{idx}P{seed}.bench,S={len},W={len}:2,{flags}",
            1_600_000_000 + idx,
            len = m.len()
        );
        std::fs::write(dir.join("cur").join(name), &m)?;
        bytes += m.len() as u64;
    }
    Ok(json!({
        "messages": count,
        "bytes": bytes,
        "secs": started.elapsed().as_secs_f64(),
    }))
}

/// A worker's YAML on the stack named by the `STACK_*` environment (the
/// benchmark sources `.stack/env`), with subjects ending in `.TAG`.
fn worker_yaml_of(f: &Flags) -> Result<String> {
    let stack =
        worker_yaml::StackAddrs::from_vars(|k| std::env::var(k).ok()).map_err(|e| anyhow!(e))?;
    Ok(worker_yaml::WorkerYaml {
        stack: &stack,
        tag: f.get("tag")?,
        workers: f.num("workers", 10)?,
        in_topic: f.or("in-topic", ""),
        keyspace: f.get("keyspace")?,
        bucket: f.or("bucket", ""),
        imap_extra: "",
    }
    .render())
}

// ------------------------------------------------------------------ ceilings

/// Fetch ceiling: log in with the project's own connect code, then one bare
/// `UID FETCH 1:* BODY.PEEK[]`, bodies counted and dropped.
async fn fetch(f: &Flags) -> Result<serde_json::Value> {
    let acc = Account {
        server: f.get("server")?.to_string(),
        security: Security::Tls,
        auth: Auth::Login {
            user: f.get("login")?.to_string(),
            password: f.secret("password-env")?,
        },
        ca_files: vec![PathBuf::from(f.get("ca")?)],
        pin: None,
        allow_plaintext_loopback: false,
        connect_timeout: Duration::from_secs(30),
        io_timeout: Duration::from_secs(300),
    };
    let started = Instant::now();
    let (mut session, _info) = imap::connect(&acc).await?;
    let mb = session.examine("INBOX").await?;
    let (mut messages, mut bytes) = (0u64, 0u64);
    {
        let mut stream = session.uid_fetch("1:*", "BODY.PEEK[]").await?;
        while let Some(item) = stream.next().await {
            let item = item?;
            if let Some(body) = item.body() {
                messages += 1;
                bytes += body.len() as u64;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = session.logout().await;
    if messages != mb.exists as u64 {
        bail!("fetched {messages} messages, the mailbox has {}", mb.exists);
    }
    Ok(json!({"messages": messages, "bytes": bytes, "secs": secs}))
}

/// Store ceiling: the corpus files written into `raw_message` and
/// `user_raw_lookup` through the project's store code, `concurrency` writes
/// at once, no IMAP. Files are read inside the timed loop too (from the page
/// cache: the mailbox was just read by Dovecot), as the worker reads IMAP.
async fn store_ceiling(f: &Flags) -> Result<serde_json::Value> {
    let dir = PathBuf::from(f.get("dir")?).join("cur");
    let concurrency: usize = f.num("concurrency", 64)?;
    // `--mark`: every row is then also marked delivered by an UPDATE of its
    // own, as after a hand-off (the second write a sync has and this
    // ceiling has not).
    let mark = match f.or("mark", "no") {
        "no" => false,
        "yes" => true,
        m => bail!("--mark: yes or no, found {m:?}"),
    };
    let store = f.store().await?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    let user = Uuid::new_v4();
    let identity = Uuid::new_v4();
    // Prepare the statements outside the timed part, like a warm worker.
    store
        .insert_raw_message(user, Uuid::new_v4(), b"warm-up".to_vec())
        .await?;
    store.mark_delivered(Uuid::new_v4()).await?;
    let started = Instant::now();
    let bytes: u64 = futures::stream::iter(files.iter().enumerate())
        .map(|(i, p)| {
            let store = store.clone();
            async move {
                let data = tokio::fs::read(p).await?;
                let len = data.len() as u64;
                let id = raw_message_id(user, identity, "INBOX", 1, i as u32 + 1);
                store.insert_raw_message(user, id, data).await?;
                if mark {
                    store.mark_delivered(id).await?;
                }
                Ok::<u64, anyhow::Error>(len)
            }
        })
        .buffer_unordered(concurrency)
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await?;
    Ok(json!({
        "messages": files.len(),
        "bytes": bytes,
        "secs": started.elapsed().as_secs_f64(),
        "concurrency": concurrency,
        "mark": mark,
    }))
}

// ------------------------------------------------------------------ identities

/// A Caliopen user and a remote identity for each of `count` Dovecot logins
/// (`PREFIX1`...), written as `ctl addremote` writes them. Prints nothing
/// but the JSON summary; `user identity login` lines go to `--list`.
async fn users(f: &Flags) -> Result<serde_json::Value> {
    let store = f.store().await?;
    let prefix = f.get("logins")?;
    let count: usize = f.num("count", 0)?;
    let server = f.get("server")?;
    let password = f.secret("password-env")?;
    let list = PathBuf::from(f.get("list")?);
    // Keys added to every identity's infos (`mailboxes=*`, `idle=true`).
    let mut extra: Vec<(String, String)> = Vec::new();
    for kv in f.or("infos", "").split(';').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--infos: expected key=value, found {kv:?}"))?;
        extra.push((k.to_string(), v.to_string()));
    }
    let extra = &extra;
    let started = Instant::now();
    let made: Vec<String> = futures::stream::iter(1..=count)
        .map(|i| {
            let store = store.clone();
            let login = format!("{prefix}{i}");
            let password = password.clone();
            async move {
                let user_id = Uuid::new_v4();
                store
                    .insert_user(user_id, &format!("bench-{user_id}"))
                    .await?;
                let mut id = remote_identity(user_id, &login, server, &password);
                id.infos.extend(extra.iter().cloned());
                store.insert_identity(&id).await?;
                Ok::<String, anyhow::Error>(format!("{user_id} {} {login}", id.identity_id))
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    std::fs::write(&list, made.join("\n") + "\n")?;
    Ok(json!({"identities": made.len(), "secs": started.elapsed().as_secs_f64()}))
}

fn remote_identity(user_id: Uuid, login: &str, server: &str, password: &str) -> Identity {
    Identity {
        user_id,
        identity_id: Uuid::new_v4(),
        credentials: HashMap::from([
            (creds::USERNAME_IN.to_string(), login.to_string()),
            (creds::PASSWORD_IN.to_string(), password.to_string()),
        ]),
        display_name: login.to_string(),
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
    }
}

/// `count` active remote identities for the poller to schedule, unless the
/// keyspace already holds exactly that many (they are kept between runs).
async fn seed_identities(f: &Flags) -> Result<serde_json::Value> {
    let store = f.store().await?;
    let count: usize = f.num("count", 100_000)?;
    let concurrency: usize = f.num("concurrency", 128)?;
    let started = Instant::now();
    let mut existing = 0usize;
    let mut state = None;
    loop {
        let (page, next) = store.scan_identities(5000, state).await?;
        existing += page.len();
        match next {
            Some(s) => state = Some(s),
            None => break,
        }
    }
    if existing == count {
        return Ok(
            json!({"identities": count, "seeded": 0, "secs": started.elapsed().as_secs_f64()}),
        );
    }
    if existing != 0 {
        bail!("keyspace holds {existing} identities, expected 0 or {count}: truncate it first");
    }
    futures::stream::iter(0..count)
        .map(|i| {
            let store = store.clone();
            async move {
                let id = remote_identity(
                    Uuid::new_v4(),
                    &format!("poll{i}@example.test"),
                    "127.0.0.1:1",
                    "unused",
                );
                store.insert_identity(&id).await
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(json!({"identities": count, "seeded": count, "secs": started.elapsed().as_secs_f64()}))
}

// ------------------------------------------------------------------ sync orders

fn sync_order(user: &str, identity: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "order": "sync", "user_id": user, "identity_id": identity,
        "login": "", "mailbox": "", "password": "", "server": "",
    }))
    .expect("static JSON")
}

/// Wait on `sub` for the next final (non-progress) job report.
async fn final_report(
    sub: &mut async_nats::Subscriber,
    deadline: Instant,
) -> Result<serde_json::Value> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, sub.next())
            .await
            .map_err(|_| anyhow!("no job report before the deadline"))?
            .ok_or_else(|| anyhow!("NATS subscription closed"))?;
        if msg.status.is_some() {
            bail!("NATS status {:?}: is the worker listening?", msg.status);
        }
        let v: serde_json::Value = serde_json::from_slice(&msg.payload)?;
        if v["progress"] != true {
            return Ok(v);
        }
    }
}

/// One sync order as a request; the time is from the order to the worker's
/// final report, which is what the worker spends (no CLI start-up).
async fn sync(f: &Flags) -> Result<serde_json::Value> {
    let client = async_nats::connect(f.get("nats")?).await?;
    let subject = f.get("subject")?.to_string();
    let timeout = Duration::from_secs(f.num("timeout", 1800)?);
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client.flush().await?;
    let payload = sync_order(f.get("user")?, f.get("identity")?);
    let started = Instant::now();
    client
        .publish_with_reply(subject, inbox, payload.into())
        .await?;
    client.flush().await?;
    let rep = final_report(&mut sub, started + timeout).await?;
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({
        "secs": secs,
        "ok": rep["ok"],
        "fetched": rep["fetched"],
        "handed_off": rep["handed_off"],
        "failed": rep["failed"],
        "error": rep["error"],
    }))
}

/// Every `user identity` of `--list` ordered at once (one publish each);
/// done when every final report is in, then every identity's `lastsync` is
/// checked in Cassandra.
async fn sync_many(f: &Flags) -> Result<serde_json::Value> {
    let client = async_nats::connect(f.get("nats")?).await?;
    let store = f.store().await?;
    let subject = f.get("subject")?.to_string();
    let timeout = Duration::from_secs(f.num("timeout", 1800)?);
    let text = std::fs::read_to_string(f.get("list")?)?;
    let pairs: Vec<(Uuid, Uuid)> = read_list(&text)?
        .into_iter()
        .map(|(u, i, _)| (u, i))
        .collect();
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client.flush().await?;
    let started = Instant::now();
    for (u, i) in &pairs {
        client
            .publish_with_reply(
                subject.clone(),
                inbox.clone(),
                sync_order(&u.to_string(), &i.to_string()).into(),
            )
            .await?;
    }
    client.flush().await?;
    let (mut ok, mut fetched, mut failed) = (0u64, 0u64, 0u64);
    let mut errors = Vec::new();
    for _ in 0..pairs.len() {
        let rep = final_report(&mut sub, started + timeout).await?;
        if rep["ok"] == true {
            ok += 1;
        } else if errors.len() < 5 {
            errors.push(rep["error"].clone());
        }
        fetched += rep["fetched"].as_u64().unwrap_or(0);
        failed += rep["failed"].as_u64().unwrap_or(0);
    }
    let secs = started.elapsed().as_secs_f64();
    // The contract's view of "synced": `lastsync` written back.
    let mut with_lastsync = 0;
    for (u, i) in &pairs {
        if let Some(id) = store.identity(*u, *i).await? {
            if !id.info(infos::LASTSYNC).is_empty() {
                with_lastsync += 1;
            }
        }
    }
    Ok(json!({
        "identities": pairs.len(), "ok": ok, "with_lastsync": with_lastsync,
        "messages": fetched, "failed": failed, "errors": errors, "secs": secs,
    }))
}

/// The `user identity login` lines that `users` writes.
fn read_list(text: &str) -> Result<Vec<(Uuid, Uuid, String)>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            let (Some(u), Some(i)) = (w.next(), w.next()) else {
                bail!("bad line {l:?}: expected `user identity [login]`");
            };
            Ok((u.parse()?, i.parse()?, w.next().unwrap_or("").to_string()))
        })
        .collect()
}

// ------------------------------------------------------------------ poller

/// `need_job` latency: `clients` connections each sending `rate / clients`
/// requests per second on a fixed schedule (open loop: a slow answer does
/// not delay the next request) for `secs` seconds.
async fn need_job(f: &Flags) -> Result<serde_json::Value> {
    let url = f.get("nats")?.to_string();
    let subject = f.get("subject")?.to_string();
    let rate: f64 = f.num("rate", 1000.0)?;
    let clients: usize = f.num("clients", 10)?;
    let secs: f64 = f.num("secs", 10.0)?;
    let period = Duration::from_secs_f64(clients as f64 / rate);
    let per_client = (secs * rate / clients as f64) as usize;
    let payload = bytes::Bytes::from_static(br#"{"worker":"bench","order":{"order":"need_job"}}"#);

    let mut conns = Vec::new();
    for _ in 0..clients {
        let c = async_nats::connect(&url).await?;
        // One request first: the mux inbox subscription is set up outside
        // the measured part.
        c.request(subject.clone(), payload.clone()).await?;
        conns.push(c);
    }
    let jobs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in conns {
        let subject = subject.clone();
        let payload = payload.clone();
        let jobs = jobs.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                tick.tick().await;
                let c = c.clone();
                let subject = subject.clone();
                let payload = payload.clone();
                let jobs = jobs.clone();
                inflight.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let r = c.request(subject, payload).await;
                    let us = t.elapsed().as_micros() as u64;
                    match r {
                        Ok(m) => {
                            if serde_json::from_slice::<serde_json::Value>(&m.payload)
                                .is_ok_and(|v| v["order"] == "sync")
                            {
                                jobs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Some(us)
                        }
                        Err(_) => None,
                    }
                }));
            }
            let mut lat = Vec::with_capacity(per_client);
            let mut errors = 0u64;
            for h in inflight {
                match h.await {
                    Ok(Some(us)) => lat.push(us),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    Ok(json!({
        "requests": lat.len() as u64 + errors,
        "errors": errors,
        "jobs": jobs.load(std::sync::atomic::Ordering::Relaxed),
        "rate": (lat.len() as f64) / elapsed,
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
        "max_ms": pct(1.0), "secs": elapsed,
    }))
}

// ------------------------------------------------------------------ live sync

/// A small message of its own for the latency run.
fn live_message(n: usize) -> Vec<u8> {
    format!(
        "From: Zoé <zoe@example.test>\r\nTo: bench@example.test\r\n\
         Subject: live {n}\r\nDate: Fri, 27 Nov 2026 04:00:00 +0000\r\n\
         Message-ID: <live.{n}.{}@bench.example.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nArrivé à l'instant.\r\n",
        Uuid::new_v4()
    )
    .into_bytes()
}

/// Live-sync latency: `--messages` APPENDs, round-robin over the accounts
/// of `--list`, one at a time; for each, the time from the APPEND's tagged
/// OK to the processor stand-in (served here, on `--in-topic`, with the
/// project's stand-in code) receiving a `process_raw`. The next APPEND waits
/// for it. `--mode idle`: the worker's IDLE sessions notice the message;
/// `--mode order`: a `sync` order goes to `--subject` right after the OK
/// (the on-demand peer). Three messages that never arrive end the run.
/// `--folder F` appends to F (created if need be) instead of INBOX: mail
/// a user's filter files there, which only a NOTIFY session sees at once.
/// `--worker-pid PID` adds the connections that process holds to the
/// server's port, per identity (what live sync costs a provider).
async fn live_latency(f: &Flags) -> Result<serde_json::Value> {
    let client = async_nats::connect(f.get("nats")?).await?;
    let in_topic = f.get("in-topic")?.to_string();
    let mode = f.or("mode", "idle").to_string();
    let order_subject = match mode.as_str() {
        "idle" => None,
        "order" => Some(f.get("subject")?.to_string()),
        m => bail!("--mode: idle or order, found {m:?}"),
    };
    let messages: usize = f.num("messages", 100)?;
    let timeout = Duration::from_secs(f.num("timeout", 60)?);
    let accounts = read_list(&std::fs::read_to_string(f.get("list")?)?)?;
    if accounts.is_empty() || accounts.iter().any(|a| a.2.is_empty()) {
        bail!("--list: expected `user identity login` lines");
    }
    let password = f.secret("password-env")?;

    let sub = client.queue_subscribe(in_topic, "SMTPqueue".into()).await?;
    client.flush().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    tokio::spawn(processor::serve(client.clone(), sub, move |_| {
        let _ = tx.send(Instant::now());
        (
            processor::Answer::Ok,
            processor::Pace::Serial(Duration::ZERO),
        )
    }));

    let mut sessions = Vec::with_capacity(accounts.len());
    for (_, _, login) in &accounts {
        let acc = Account {
            server: f.get("server")?.to_string(),
            security: Security::Tls,
            auth: Auth::Login {
                user: login.clone(),
                password: password.clone(),
            },
            ca_files: vec![PathBuf::from(f.get("ca")?)],
            pin: None,
            allow_plaintext_loopback: false,
            connect_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(60),
        };
        sessions.push(imap::connect(&acc).await?.0);
    }
    let folder = f.or("folder", "INBOX").to_string();
    live_folder_ready(&mut sessions, &folder).await;
    let conns = match f.0.get("worker-pid") {
        Some(pid) => Some(worker_imap_conns(pid, f.get("server")?)?),
        None => None,
    };

    let started = Instant::now();
    let mut lat_ms = Vec::with_capacity(messages);
    let mut lost = 0usize;
    let mut appended = 0usize;
    for n in 0..messages {
        let k = n % accounts.len();
        // Anything left over (a late duplicate) is not this message's.
        while rx.try_recv().is_ok() {}
        sessions[k]
            .append(&folder, None, None, live_message(n))
            .await?;
        let ok_at = Instant::now();
        appended += 1;
        if let Some(subject) = &order_subject {
            let (user, identity, _) = &accounts[k];
            client
                .publish(
                    subject.clone(),
                    sync_order(&user.to_string(), &identity.to_string()).into(),
                )
                .await?;
        }
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(at)) => {
                lat_ms.push(at.saturating_duration_since(ok_at).as_secs_f64() * 1000.0);
            }
            _ => {
                lost += 1;
                eprintln!("live-latency: message {n} not handed off within {timeout:?}");
                if lost == 3 {
                    break;
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    for s in &mut sessions {
        let _ = s.logout().await;
    }
    lat_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| -> Option<f64> {
        if lat_ms.is_empty() {
            return None;
        }
        let i = ((lat_ms.len() as f64 * p).ceil() as usize).clamp(1, lat_ms.len()) - 1;
        Some(lat_ms[i])
    };
    Ok(json!({
        "mode": mode,
        "folder": folder,
        "imap_conns": conns,
        "conns_per_identity": conns.map(|c| c as f64 / accounts.len() as f64),
        "accounts": accounts.len(),
        "appended": appended,
        "messages": lat_ms.len(),
        "lost": lost,
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
        "max_ms": pct(1.0), "min_ms": lat_ms.first(),
        "secs": secs,
        // every message's, sorted, for the report's distribution picture
        "lat_ms": lat_ms.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
    }))
}

/// Create `folder` in every account unless it is INBOX (one that exists
/// already is fine).
async fn live_folder_ready(sessions: &mut [imap::ImapSession], folder: &str) {
    if folder.eq_ignore_ascii_case("INBOX") {
        return;
    }
    for s in sessions.iter_mut() {
        let _ = s.create(folder).await;
    }
}

/// Established connections of process `pid` to the port of `server`
/// (`host:port`), as `ss` lists them.
fn worker_imap_conns(pid: &str, server: &str) -> Result<usize> {
    let port = server.rsplit(':').next().unwrap_or("993");
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .context("ss")?;
    let needle = format!("pid={pid},");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_lines_carry_the_login_or_not() {
        let (u, i) = (Uuid::new_v4(), Uuid::new_v4());
        let got = read_list(&format!("{u} {i} benchlive3\n\n{u} {i}\n")).unwrap();
        assert_eq!(got[0], (u, i, "benchlive3".to_string()));
        assert_eq!(got[1], (u, i, String::new()));
        assert!(read_list("not-a-uuid").is_err());
        assert!(read_list(&format!("{u}\n")).is_err());
    }

    #[test]
    fn live_messages_are_distinct() {
        assert_ne!(live_message(1), live_message(1));
        assert!(String::from_utf8(live_message(7))
            .unwrap()
            .contains("Subject: live 7\r\n"));
    }
}
