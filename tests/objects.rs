//! Messages over `raw_size_limit` in the stack's real S3 server (versitygw),
//! laid out as Caliopen lays them out, and read back the way its Python
//! reader does: the row's `uri` split into bucket (host) and key (path),
//! then a plain signed GET (curl's SigV4, no code of ours).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use caliopen_imap::bus::wire::JobReport;
use caliopen_imap::store::objects::{self, Objects};
use caliopen_imap::store::raw_message::{raw_message_id, Placement};
use caliopen_imap::worker::context::{Counters, Ctx};
use caliopen_imap::worker::job::{self, SyncRequest};
use uuid::Uuid;

use crate::util::*;

const MB: usize = 1_000_000;

async fn sync_once(ctx: &Ctx, user: Uuid, identity: Uuid) -> JobReport {
    job::sync_identity(
        ctx,
        SyncRequest {
            user_id: user,
            identity_id: identity,
            password: String::new(),
        },
        Counters::new(),
    )
    .await
}

/// GET `uri` (`s3://bucket/key`) from `s3` with curl, as an outside client.
fn curl_get(s3: &S3, uri: &str) -> Vec<u8> {
    let (bucket, key) = objects::parse_uri(uri).unwrap_or_else(|| panic!("not an s3 uri: {uri}"));
    let out = Command::new("curl")
        .args([
            "-s",
            "-f",
            "-m",
            "60",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
        ])
        .arg(format!("{}:{}", s3.access_key, s3.secret_key))
        // The SHA-256 of the empty body, which S3 wants signed.
        .args(["-H", "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"])
        .arg(format!("http://{}/{bucket}/{key}", s3.endpoint))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl GET {uri}: exit {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Read `uri` back exactly as Caliopen's Python reader does
/// (`caliopen_main/message/core/raw.py`): split it, bucket = netloc and key =
/// path without slashes, then `Minio(...).get_object(bucket, key).data`.
fn caliopen_python_get(s3: &S3, uri: &str) -> Vec<u8> {
    const READER: &str = r#"
import os, sys
from urllib.parse import urlsplit
from minio import Minio
url = urlsplit(sys.argv[1])
assert url.scheme == "s3", url.scheme
client = Minio(os.environ["S3_ENDPOINT"], access_key=os.environ["S3_ACCESS_KEY"],
               secret_key=os.environ["S3_SECRET_KEY"], secure=False, region="us-east-1")
resp = client.get_object(url.netloc, url.path.strip("/"))
sys.stdout.buffer.write(resp.data)
"#;
    let out = Command::new(&s3.python)
        .args(["-c", READER, uri])
        .env("S3_ENDPOINT", &s3.endpoint)
        .env("S3_ACCESS_KEY", &s3.access_key)
        .env("S3_SECRET_KEY", &s3.secret_key)
        .output()
        .expect("python with minio");
    assert!(
        out.status.success(),
        "python minio get {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The fetched raw message minus the `X-Fetched-*` headers the worker
/// prepends is exactly `body`, what Dovecot holds.
fn assert_is_fetched(raw: &[u8], body: &[u8], what: &str) {
    assert!(raw.len() > body.len(), "{what}: too short");
    assert!(
        raw.ends_with(body),
        "{what}: not byte-identical to Dovecot's"
    );
    let head = String::from_utf8_lossy(&raw[..raw.len() - body.len()]);
    assert!(head.starts_with("X-Fetched-Imap: "), "{what}: {head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_land_in_the_bucket_and_read_back_through_the_uri() {
    let tag = unique("s3a");
    let settings = worker_settings(&tag);
    let limit = settings.store_settings.raw_size_limit as usize;
    // The processor refuses every message once: the next sync fetches them
    // again and must overwrite, not add.
    let refuse = Arc::new(AtomicBool::new(true));
    let r2 = refuse.clone();
    let lda = lda(&settings.lda.in_topic, move |_| r2.load(Ordering::SeqCst)).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let s3 = &stack().s3;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    let mut bodies = fill(&login, "INBOX", 1, 2000);
    bodies.extend(fill(&login, "INBOX", 1, 5 * MB));
    bodies.extend(fill(&login, "INBOX", 1, 40 * MB));
    // Exactly at the limit (with our headers): stays in the row.
    bodies.extend(fill(&login, "INBOX", 1, limit - 600));
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;
    let (_, _, uidvalidity) = mailbox_status(&login, "INBOX");
    let ids: Vec<Uuid> = (1..=4)
        .map(|uid| raw_message_id(user, id.identity_id, "INBOX", uidvalidity, uid))
        .collect();

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((rep.fetched, rep.handed_off), (4, 0), "{rep:?}");
    refuse.store(false, Ordering::SeqCst);
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.fetched, rep.handed_off, rep.stepped_over),
        (4, 4, 0),
        "{rep:?}"
    );
    assert_eq!(lda.seen.lock().unwrap().len(), 4);

    let reader = Objects::new(&ctx.settings.store_settings).unwrap();
    for (i, raw_id) in ids.iter().enumerate() {
        let (data_len, size, uri) = st.raw_message_layout(*raw_id).await.unwrap().unwrap();
        let body = &bodies[i];
        if body.len() > limit {
            // Caliopen's layout: empty raw_data, full raw_size, s3://bucket/id.
            assert_eq!(uri, format!("s3://{}/{raw_id}", s3.bucket), "uid {}", i + 1);
            assert_eq!(data_len, 0, "uid {}", i + 1);
            let object = caliopen_python_get(s3, &uri);
            assert_eq!(object.len(), size as usize, "uid {}: raw_size", i + 1);
            assert_is_fetched(&object, body, &format!("uid {}", i + 1));
            assert!(
                curl_get(s3, &uri) == object,
                "uid {}: curl reads the same",
                i + 1
            );
            // One object per id: the refetch overwrote it.
            let keys = reader.keys(&raw_id.to_string()).await.unwrap();
            assert_eq!(keys, vec![raw_id.to_string()], "uid {}", i + 1);
        } else {
            assert_eq!(uri, "", "uid {}", i + 1);
            assert_eq!(data_len, size as usize, "uid {}", i + 1);
            let raw = st.raw_message_data(*raw_id).await.unwrap().unwrap();
            assert_is_fetched(&raw, body, &format!("uid {}", i + 1));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_is_strictly_greater_as_in_caliopen() {
    let tag = unique("s3d");
    let (ctx, _t) = context(worker_settings(&tag)).await;
    let limit = ctx.settings.store_settings.raw_size_limit as usize;
    let (user, _) = new_user(&ctx.store).await;
    let at = Uuid::new_v4();
    let over = Uuid::new_v4();
    let p = ctx
        .save_raw_message(user, at, vec![b'a'; limit], false)
        .await
        .unwrap();
    assert_eq!(p, Placement::Inline);
    let p = ctx
        .save_raw_message(user, over, vec![b'b'; limit + 1], false)
        .await
        .unwrap();
    let uri = format!("s3://{}/{over}", stack().s3.bucket);
    assert_eq!(p, Placement::Object(uri.clone()));
    assert_eq!(
        ctx.store.raw_message_layout(at).await.unwrap(),
        Some((limit, limit as i32, String::new()))
    );
    assert_eq!(
        ctx.store.raw_message_layout(over).await.unwrap(),
        Some((0, limit as i32 + 1, uri.clone()))
    );
    assert_eq!(curl_get(&stack().s3, &uri), vec![b'b'; limit + 1]);
}

/// A private S3 server, started and stopped by `scripts/stack.sh s3-*` in
/// a folder of its own, so stopping it disturbs no other test.
struct PrivateS3 {
    dir: std::path::PathBuf,
    port: u16,
    /// Set: the server keeps users, managed on this port (`s3-admin`).
    admin_port: Option<u16>,
    s3: S3,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl PrivateS3 {
    fn new() -> PrivateS3 {
        let dir = std::env::temp_dir().join(unique("caliopen-imap-s3-"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let s3 = S3 {
            endpoint: format!("127.0.0.1:{port}"),
            access_key: "private-access".into(),
            secret_key: "private-secret-key".into(),
            bucket: "private-raw".into(),
            python: stack().s3.python.clone(),
        };
        PrivateS3 {
            dir,
            port,
            admin_port: None,
            s3,
        }
    }

    /// A server that keeps users: keys limited to buckets can be made.
    fn with_users() -> PrivateS3 {
        let mut s = PrivateS3::new();
        s.admin_port = Some(free_port());
        s
    }

    /// `versitygw admin ARGS` as the root key.
    fn admin(&self, args: &[&str]) {
        self.stack_sh_args("s3-admin", args);
    }

    fn stack_sh(&self, cmd: &str) {
        self.stack_sh_args(cmd, &[]);
    }

    fn stack_sh_args(&self, cmd: &str, args: &[&str]) {
        let mut c = Command::new(root().join("scripts/stack.sh"));
        if let Some(p) = self.admin_port {
            c.env("STACK_S3_ADMIN_PORT", p.to_string());
        }
        let out = c
            .arg(cmd)
            .args(args)
            .env("CALIOPEN_IMAP_STACK_DIR", &self.dir)
            .env("STACK_S3_PORT", self.port.to_string())
            .env("STACK_S3_ACCESS_KEY", &self.s3.access_key)
            .env("STACK_S3_SECRET_KEY", &self.s3.secret_key)
            .env("STACK_S3_BUCKET", &self.s3.bucket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stack.sh {cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/stack.sh"))
            .arg("s3-down")
            .env("CALIOPEN_IMAP_STACK_DIR", &self.dir)
            .env("STACK_S3_PORT", self.port.to_string())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_mid_sync_is_our_outage_and_loses_nothing() {
    let private = PrivateS3::new();
    private.stack_sh("s3-up");
    let tag = unique("s3b");
    let mut settings = worker_settings(&tag);
    set_s3(&mut settings, &private.s3);
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    let mut bodies = fill(&login, "INBOX", 1, 1000);
    bodies.extend(fill(&login, "INBOX", 1, 3 * MB));
    bodies.extend(fill(&login, "INBOX", 1, 1000));
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;
    let (_, _, uidvalidity) = mailbox_status(&login, "INBOX");

    // S3 goes away after start-up: the small first message lands, the large
    // one stops the mailbox as our outage.
    private.stack_sh("s3-down");
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep.ok, "{rep:?}");
    assert_eq!(rep.stepped_over, 0, "{rep:?}");
    assert!(
        st.message_failures(user, id.identity_id)
            .await
            .unwrap()
            .is_empty(),
        "an outage of ours is not the message's failure"
    );
    let large = raw_message_id(user, id.identity_id, "INBOX", uidvalidity, 2);
    assert_eq!(
        st.raw_message_delivered(large).await.unwrap(),
        None,
        "no row without its object"
    );
    let ident = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert!(
        ident
            .info(caliopen_imap::store::identity::infos::LASTSEENUID)
            .parse::<u32>()
            .unwrap_or(0)
            < 2,
        "the checkpoint did not step over the large message"
    );

    // Back: everything arrives, once.
    private.stack_sh("s3-up");
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.stepped_over, 0, "{rep:?}");
    let seen: std::collections::HashSet<String> =
        lda.seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        lda.seen.lock().unwrap().len(),
        3,
        "nothing handed off twice"
    );
    let (data_len, _, uri) = st.raw_message_layout(large).await.unwrap().unwrap();
    assert_eq!(
        (data_len, uri.as_str()),
        (0, format!("s3://private-raw/{large}").as_str())
    );
    assert_is_fetched(&curl_get(&private.s3, &uri), &bodies[1], "uid 2");
}

/// A worker configuration without an object store, whose messages may be
/// larger than `raw_size_limit` (as Caliopen's Go worker accepts it).
fn yaml_without_object_store(tag: &str) -> std::path::PathBuf {
    let yaml = worker_yaml(tag, "");
    let text = std::fs::read_to_string(&yaml).unwrap();
    let text = text.replace(
        &format!("endpoint: \"{}\"", stack().s3.endpoint),
        "endpoint: \"\"",
    );
    std::fs::write(&yaml, text).unwrap();
    yaml
}

/// Caliopen's Go worker starts and fails each large message; ours starts,
/// warns, and steps such a message over (next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_an_object_store_starts_and_warns() {
    let tag = unique("s3c");
    let yaml = yaml_without_object_store(&tag);
    let log = std::env::temp_dir().join(unique("s3c-log"));
    let mut worker = Command::new(bin())
        .args(["worker", "-c", yaml.to_str().unwrap(), "start"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let subject = worker_settings(&tag).nats_topic_sender;
    wait_until_worker_answers(&subject, &mut worker).await;
    let _ = worker.kill();
    let _ = worker.wait();
    let said = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        said.lines()
            .any(|l| l.contains("WARN") && l.contains("no object store is configured")),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_object_store_large_mail_is_stepped_over_and_listed() {
    let tag = unique("s3h");
    let mut settings = worker_settings(&tag);
    settings.store_settings.object_store_settings.endpoint = String::new();
    let limit = settings.store_settings.raw_size_limit as usize;
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 1, 1000);
    fill(&login, "INBOX", 1, limit + 1000);
    fill(&login, "INBOX", 1, 1000);
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;
    let (_, _, uidvalidity) = mailbox_status(&login, "INBOX");

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((rep.handed_off, rep.stepped_over), (2, 1), "{rep:?}");
    assert!(!rep.outage, "not an outage: no retry can succeed {rep:?}");
    assert_eq!(rep.stepped.len(), 1, "{rep:?}");
    assert_eq!(rep.stepped[0].uid, 2);
    let reason = &rep.stepped[0].reason;
    assert!(
        reason.contains("raw_size_limit") && reason.contains("no object store"),
        "{reason}"
    );
    assert_eq!(lda.seen.lock().unwrap().len(), 2);
    let failures = st.message_failures(user, id.identity_id).await.unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].stepped_over && failures[0].uid == 2);
    let large = raw_message_id(user, id.identity_id, "INBOX", uidvalidity, 2);
    assert_eq!(st.raw_message_delivered(large).await.unwrap(), None);
}

fn text_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Peak RSS (`VmHWM`) of a live process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

/// The memory bound with large messages: 64 MB + 2 x max_message_size.
/// It holds because a message is read straight into the buffer that is
/// later stored (no copies on the way), and its bytes are taken from the
/// process's byte budget before it is read. Before that, the fetch side
/// held a body up to three times outside the budget: 190-235 MB peak here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_memory_stays_bounded_with_large_messages() {
    let tag = unique("s3e");
    // The default max_message_size (64 MiB): the bound checked is the
    // issue's, 64 MB + 2 x max_message_size.
    let max: u64 = 64 << 20;
    let cfg = worker_yaml(&tag, "");
    let settings = worker_settings(&tag);
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 4, 30 * MB);
    fill(&login, "INBOX", 20, 300 * 1000);
    let id = new_identity(&st, user, &login, &imaps_server(), &stack().password).await;

    let mut worker = Command::new(bin())
        .args(["worker", "-c", cfg.to_str().unwrap(), "start"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = worker.id();
    wait_until_worker_answers(&settings.nats_topic_sender, &mut worker).await;
    let out = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            run(
                &[
                    "ctl",
                    "-c",
                    cfg.to_str().unwrap(),
                    "syncremote",
                    "--userid",
                    &user.to_string(),
                    "--remoteid",
                    &id.identity_id.to_string(),
                    "--wait",
                ],
                &[],
            )
        })
        .await
        .unwrap()
    };
    let peak = peak_rss(pid);
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(out.status.success(), "{}", text_of(&out));
    assert_eq!(lda.seen.lock().unwrap().len(), 24);
    let bound = 64_000_000 + 2 * max;
    eprintln!(
        "worker peak RSS {} MB (bound {} MB)",
        peak / 1_000_000,
        bound / 1_000_000
    );
    assert!(peak < bound, "peak RSS {peak} over {bound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_created_at_start_up() {
    let tag = unique("s3f");
    let mut settings = worker_settings(&tag);
    let mut s3 = stack().s3.clone();
    s3.bucket = unique("raw-");
    set_s3(&mut settings, &s3);
    let reader = Objects::new(&settings.store_settings).unwrap();
    assert!(reader.keys("").await.is_err(), "the bucket exists already");
    // context() does what `imapworker start` does: create it when missing.
    let (ctx, _t) = context(settings).await;
    let (user, _) = new_user(&ctx.store).await;
    let id = Uuid::new_v4();
    let limit = ctx.settings.store_settings.raw_size_limit as usize;
    let p = ctx
        .save_raw_message(user, id, vec![b'c'; limit + 1], false)
        .await
        .unwrap();
    let uri = format!("s3://{}/{id}", s3.bucket);
    assert_eq!(p, Placement::Object(uri.clone()));
    assert_eq!(caliopen_python_get(&s3, &uri).len(), limit + 1);
    // Created twice (another worker, a restart): still fine.
    reader.ensure_bucket().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_files_a_sent_message_whose_raw_is_in_s3() {
    let tag = unique("s3g");
    let settings = worker_settings(&tag);
    let w = start_worker(settings.clone()).await;
    let st = &w.ctx.store;
    let (user, login, id) = mailbox_account(st, 0, 0).await;
    smtp_sender_standin(&settings.lda.out_topic).await;
    // Caliopen stored the outgoing raw message in S3 (over the limit).
    let raw_id = Uuid::new_v4();
    let message_id = Uuid::new_v4();
    let draft = message(1, 2 * MB);
    let p = w
        .ctx
        .save_raw_message(user, raw_id, draft.clone(), false)
        .await
        .unwrap();
    assert!(matches!(p, Placement::Object(_)), "{p:?}");
    st.insert_message(user, message_id, raw_id, chrono::Utc::now())
        .await
        .unwrap();

    let order = serde_json::json!({"order": "deliver", "user_id": user.to_string(), "identity_id": id.identity_id.to_string(), "message_id": message_id.to_string()});
    let reply: serde_json::Value = bus()
        .await
        .request(
            &settings.nats_topic_sender,
            &order,
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(reply["error"], false, "{reply}");
    let filed = doveadm(&["fetch", "-u", &login, "text", "mailbox", "Sent"], None).stdout;
    let filed = String::from_utf8_lossy(&filed).replace("\r\n", "\n");
    let want = String::from_utf8_lossy(&draft).replace("\r\n", "\n");
    assert!(
        filed.len() >= want.len(),
        "filed {} bytes of {}",
        filed.len(),
        want.len()
    );
    assert!(
        filed.contains(want.trim_end()),
        "the full message filed in Sent"
    );
    w.stop().await;
}

/// A worker configuration on the stack whose object store is `s3`.
fn yaml_with_s3(tag: &str, extra: &str, s3: &S3) -> std::path::PathBuf {
    let yaml = worker_yaml(tag, extra);
    let ours = &stack().s3;
    let text = std::fs::read_to_string(&yaml)
        .unwrap()
        .replace(
            &format!("endpoint: \"{}\"", ours.endpoint),
            &format!("endpoint: \"{}\"", s3.endpoint),
        )
        .replace(
            &format!("access_key: \"{}\"", ours.access_key),
            &format!("access_key: \"{}\"", s3.access_key),
        )
        .replace(
            &format!("secret_key: \"{}\"", ours.secret_key),
            &format!("secret_key: \"{}\"", s3.secret_key),
        )
        .replace(
            &format!("raw_messages: \"{}\"", ours.bucket),
            &format!("raw_messages: \"{}\"", s3.bucket),
        );
    std::fs::write(&yaml, text).unwrap();
    yaml
}

/// `syncremote --wait` of one identity through the binary.
async fn syncremote_wait(
    cfg: &std::path::Path,
    user: Uuid,
    identity: Uuid,
) -> std::process::Output {
    let cfg = cfg.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        run(
            &[
                "ctl",
                "-c",
                &cfg,
                "syncremote",
                "--userid",
                &user.to_string(),
                "--remoteid",
                &identity.to_string(),
                "--wait",
            ],
            &[],
        )
    })
    .await
    .unwrap()
}

/// A key that may use its bucket and nothing else: it cannot list the
/// server's buckets (here: the bucket is shared with it, not its own, so
/// ListBuckets does not show it) nor create one. The start-up check asks
/// about the bucket itself (HEAD), as Caliopen's `BucketExists` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_to_its_bucket_starts_and_stores_large_mail() {
    let private = PrivateS3::with_users();
    private.stack_sh("s3-up");
    let limited = S3 {
        access_key: "limited-access".into(),
        secret_key: "limited-secret-key".into(),
        bucket: "shared-raw".into(),
        ..private.s3.clone()
    };
    let (key, secret) = (&limited.access_key, &limited.secret_key);
    private.admin(&["create-user", "-a", key, "-s", secret, "-r", "user"]);
    let root_key = &private.s3.access_key;
    private.admin(&[
        "create-bucket",
        "--bucket",
        &limited.bucket,
        "--owner",
        root_key,
        "--grant-full-control",
        key,
        "--object-ownership",
        "BucketOwnerPreferred",
    ]);
    let tag = unique("s3i");
    let cfg = yaml_with_s3(&tag, "log_format: json\n", &limited);
    let _lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let (child, _log) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || crate::ops::spawn_worker(&cfg, &[], "imapworker ready"))
            .await
            .unwrap()
    };
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let login = unique("dove");
    let bodies = fill(&login, "INBOX", 1, 2 * MB);
    let id = new_identity(&st, user, &login, &imaps_server(), &stack().password).await;
    let (_, _, uidvalidity) = mailbox_status(&login, "INBOX");
    let out = syncremote_wait(&cfg, user, id.identity_id).await;
    tokio::task::spawn_blocking(move || crate::ops::sigterm(child))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    let large = raw_message_id(user, id.identity_id, "INBOX", uidvalidity, 1);
    let uri = format!("s3://shared-raw/{large}");
    assert_is_fetched(&curl_get(&limited, &uri), &bodies[0], "uid 1");
}

/// S3 is needed only for messages over `raw_size_limit`: unreachable at
/// start, it keeps no one from starting; `/readyz` and `imapctl status` say
/// that large messages wait, and the small ones arrive meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_at_start_keeps_the_worker_from_nothing_but_large_mail() {
    let nowhere = S3 {
        endpoint: format!("127.0.0.1:{}", free_port()),
        ..stack().s3.clone()
    };
    let tag = unique("s3j");
    let extra = "log_format: json\nmetrics_addr: 127.0.0.1:0\n";
    let cfg = yaml_with_s3(&tag, extra, &nowhere);
    let lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let (child, log) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || crate::ops::spawn_worker(&cfg, &[], "imapworker ready"))
            .await
            .unwrap()
    };
    let addr = crate::ops::served_addr(&log);
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 1, 1000);
    fill(&login, "INBOX", 1, 2 * MB);
    let id = new_identity(&st, user, &login, &imaps_server(), &stack().password).await;
    let ready = crate::ops::readyz_becomes(&addr, 200).await;
    let out = syncremote_wait(&cfg, user, id.identity_id).await;
    let status = {
        let cfg = cfg.to_str().unwrap().to_string();
        let u = user.to_string();
        tokio::task::spawn_blocking(move || {
            run(&["ctl", "-c", &cfg, "status", "--userid", &u], &[])
        })
        .await
        .unwrap()
    };
    tokio::task::spawn_blocking(move || crate::ops::sigterm(child))
        .await
        .unwrap();
    assert!(
        ready.contains("messages over raw_size_limit wait"),
        "{ready}"
    );
    // The small message arrived; the large one waits (an outage of ours,
    // nothing stepped over), as when S3 goes away mid-run.
    assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
    assert_eq!(lda.seen.lock().unwrap().len(), 1);
    assert!(st
        .message_failures(user, id.identity_id)
        .await
        .unwrap()
        .is_empty());
    let said = text_of(&status);
    assert!(
        said.contains("messages over raw_size_limit (1048576 bytes) wait until it answers"),
        "{said}"
    );
}
