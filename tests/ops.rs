//! Operations: `imapctl status` as a monitoring probe and `imapctl retry`
//! as the way back after a processor fault, against the real stack with
//! the processor stand-in (`util::lda`).

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use caliopen_imap::bus::wire::JobReport;
use caliopen_imap::store::raw_message::raw_message_id;
use caliopen_imap::worker::context::Counters;
use caliopen_imap::worker::job::{self, SyncRequest};
use uuid::Uuid;

use crate::util::*;

async fn sync_once(
    ctx: &caliopen_imap::worker::context::Ctx,
    user: Uuid,
    identity: Uuid,
) -> JobReport {
    let req = SyncRequest {
        user_id: user,
        identity_id: identity,
        password: String::new(),
    };
    job::sync_identity(ctx, req, Counters::new()).await
}

/// Run `caliopen-imap ctl -c CONFIG args...` without blocking the runtime.
async fn ctl(config: &Path, args: &[&str]) -> Output {
    let mut full = vec!["ctl".to_string(), "-c".into(), config.display().to_string()];
    full.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = full.iter().map(String::as_str).collect();
        run(&a, &[])
    })
    .await
    .unwrap()
}

fn status_json(out: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_codes_and_retry_redelivers_a_stepped_over_message_exactly_once() {
    let tag = unique("ops1");
    let cfg = worker_yaml(&tag, "");
    let mut settings = worker_settings(&tag);
    settings.imap.max_message_tries = 1;
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 3, 600).await;
    let (_, _, v) = mailbox_status(&login, "INBOX");
    let bad = raw_message_id(user, id.identity_id, "INBOX", v, 2).to_string();
    let refuse = Arc::new(AtomicBool::new(true));
    let (r2, b2) = (refuse.clone(), bad.clone());
    let lda = lda(&settings.lda.in_topic, move |m| {
        m == b2 && r2.load(Ordering::SeqCst)
    })
    .await;
    let u = user.to_string();

    // Never synced: healthy (due at once), exit 0.
    let out = ctl(&cfg, &["status", "--userid", &u, "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows = status_json(&out);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["healthy"], true);
    assert!(rows[0]["next_due"].is_string());

    // The processor refuses uid 2: stepped over at once (max tries 1).
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((rep.handed_off, rep.stepped_over), (2, 1), "{rep:?}");
    let out = ctl(&cfg, &["status", "--userid", &u, "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let rows = status_json(&out);
    assert_eq!(rows[0]["healthy"], false);
    assert_eq!(rows[0]["stepped_over"][0]["uid"], 2);
    assert!(rows[0]["stepped_over"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("chosen failure"));
    let table = ctl(&cfg, &["status", "--userid", &u]).await;
    assert_eq!(table.status.code(), Some(1));
    let t = text(&table.stdout);
    assert!(
        t.contains("UNHEALTHY") && t.contains("stepped over INBOX uid 2"),
        "{t}"
    );

    // The processor is fixed: retry hands uid 2 off, once.
    refuse.store(false, Ordering::SeqCst);
    let out = ctl(&cfg, &["retry", "--userid", &u, "--identifier", &login]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("handed off 1,"),
        "{}",
        text(&out.stdout)
    );
    let count = |id: &str| lda.seen.lock().unwrap().iter().filter(|s| *s == id).count();
    assert_eq!(count(&bad), 1);
    assert_eq!(
        st.raw_message_delivered(bad.parse().unwrap())
            .await
            .unwrap(),
        Some(true)
    );
    assert!(st
        .message_failures(user, id.identity_id)
        .await
        .unwrap()
        .is_empty());
    let out = ctl(&cfg, &["status", "--userid", &u]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    // Again: nothing left, nothing handed off twice; a sync neither.
    let out = ctl(&cfg, &["retry", "--userid", &u, "--identifier", &login]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("handed off 0,"),
        "{}",
        text(&out.stdout)
    );
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!(rep.handed_off, 0, "{rep:?}");
    assert_eq!(count(&bad), 1);
    assert_eq!(lda.seen.lock().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_unhealthy_for_an_inactive_or_failing_identity_and_refuses_bad_flags() {
    let tag = unique("ops2");
    let cfg = worker_yaml(&tag, "");
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let u = user.to_string();
    // No remote identity: nothing unhealthy.
    let out = ctl(&cfg, &["status", "--userid", &u]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = new_identity(&st, user, &unique("dove"), &imaps_server(), "pw").await;
    st.set_status(user, id.identity_id, "inactive")
        .await
        .unwrap();
    let out = ctl(&cfg, &["status", "--userid", &u, "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let rows = status_json(&out);
    assert!(rows[0]["next_due"].is_null());
    assert!(rows[0]["problems"][0]
        .as_str()
        .unwrap()
        .contains("inactive"));
    // --unhealthy keeps it; an unknown user is 3; --all with a user is 2.
    let out = ctl(&cfg, &["status", "--userid", &u, "--unhealthy", "--json"]).await;
    assert_eq!(status_json(&out).len(), 1);
    let out = ctl(&cfg, &["status", "--userid", &Uuid::new_v4().to_string()]).await;
    assert_eq!(out.status.code(), Some(3));
    let out = ctl(&cfg, &["status", "--all", "--userid", &u]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr).trim().lines().count(), 1);
}

/// A worker subprocess with `log_format`/`CALIOPEN_IMAP_LOG_FORMAT` set;
/// returns it and the file its stderr goes to, once it is ready.
pub fn spawn_worker(
    cfg: &Path,
    env: &[(&str, &str)],
    ready: &str,
) -> (std::process::Child, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!("{}.log", unique("ops-worker")));
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["worker", "-c", cfg.to_str().unwrap(), "start"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("CALIOPEN_IMAP_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    // Bounded wait for the daemon to get that far (not a timing assertion).
    for _ in 0..600 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(ready)
        {
            return (child, log);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "worker not ready: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// SIGTERM the daemon; its exit code.
pub fn sigterm(mut child: std::process::Child) -> Option<i32> {
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap().code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_and_carry_the_identity_fields() {
    let tag = unique("ops3");
    let cfg = worker_yaml(&tag, "log_format: json\n");
    let st = store().await;
    let (user, login, id) = mailbox_account(&st, 3, 400).await;
    let _lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let (child, log) = tokio::task::spawn_blocking(move || {
        spawn_worker(&cfg, &[("CALIOPEN_IMAP_LOG", "trace")], "imapworker ready")
    })
    .await
    .unwrap();
    let cfg = worker_yaml(&tag, "");
    let u = user.to_string();
    let out = ctl(
        &cfg,
        &[
            "syncremote",
            "--userid",
            &u,
            "--identifier",
            &login,
            "--wait",
        ],
    )
    .await;
    tokio::task::spawn_blocking(move || sigterm(child))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let logs = std::fs::read_to_string(&log).unwrap();
    // At trace level, where the IMAP and NATS crates would print the wire.
    assert!(logs.contains("\"level\":\"TRACE\""), "trace logging was on");
    assert!(!logs.contains(&stack().password), "a password in the logs");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    let ours: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["span"]["identity_id"] == id.identity_id.to_string())
        .collect();
    let (uid, iid) = (user.to_string(), id.identity_id.to_string());
    for l in &ours {
        assert_eq!(l["span"]["user_id"], uid.as_str(), "{l}");
        assert_eq!(l["span"]["order"], "sync", "{l}");
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    let msg = |m: &str| ours.iter().find(|l| l["message"] == m).copied();
    for m in ["fetching", "mailbox done"] {
        let l = msg(m).unwrap_or_else(|| panic!("no {m:?} line in {logs}"));
        assert_eq!(l["span"]["mailbox"], "INBOX", "{l}");
        assert_eq!(l["span"]["identity_id"], iid.as_str());
    }
    assert!(msg("sync done").is_some(), "{logs}");
}

/// `GET path` over HTTP/1.1 from a daemon's metrics address: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {buf:?}"));
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// The value of one series (`name` or `name{labels}`) in an exposition.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The address a JSON-logging daemon said it serves metrics on.
pub fn served_addr(log: &Path) -> String {
    let logs = std::fs::read_to_string(log).unwrap();
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "serving /metrics, /healthz, /readyz")
        .and_then(|l| l["addr"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no metrics address in {logs}"))
}

pub async fn get(addr: &str, path: &str) -> (u16, String) {
    let (a, p) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || http_get(&a, &p))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_the_synced_amounts() {
    let tag = unique("ops4");
    let cfg = worker_yaml(&tag, "log_format: json\nmetrics_addr: 127.0.0.1:0\n");
    let st = store().await;
    let (user, login, _) = mailbox_account(&st, 4, 500).await;
    let _lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let (child, log) =
        tokio::task::spawn_blocking(move || spawn_worker(&cfg, &[], "imapworker ready"))
            .await
            .unwrap();
    let addr = served_addr(&log);
    let (code, ready) = get(&addr, "/readyz").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(get(&addr, "/healthz").await.0, 200);
    let (code, before) = get(&addr, "/metrics").await;
    assert_eq!(code, 200);

    let cfg = worker_yaml(&tag, "");
    let u = user.to_string();
    let out = ctl(
        &cfg,
        &[
            "syncremote",
            "--userid",
            &u,
            "--identifier",
            &login,
            "--wait",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Counted before the result was sent: no wait needed.
    let (_, after) = get(&addr, "/metrics").await;
    let code = tokio::task::spawn_blocking(move || sigterm(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0));

    let delta = |s: &str| metric(&after, s) - metric(&before, s);
    let p = "caliopen_imap_";
    for (series, want) in [
        ("syncs_started_total", 1.0),
        ("syncs_ended_total{outcome=\"ok\"}", 1.0),
        ("messages_fetched_total", 4.0),
        ("messages_stored_total", 4.0),
        ("messages_handed_off_total", 4.0),
        ("messages_already_delivered_total", 0.0),
        ("messages_failed_total", 0.0),
        ("messages_stepped_over_total", 0.0),
        ("hand_off_seconds_count", 4.0),
        ("sync_seconds_count", 1.0),
        ("imap_connect_seconds_count", 1.0),
    ] {
        assert_eq!(delta(&format!("{p}{series}")), want, "{series}:\n{after}");
    }
    assert!(
        delta("caliopen_imap_fetched_bytes_total") >= 4.0 * 500.0,
        "{after}"
    );
    assert_eq!(metric(&after, "caliopen_imap_jobs_in_flight"), 0.0);
    assert_eq!(metric(&after, "caliopen_imap_job_slots"), 4.0);
    assert!(metric(&after, "caliopen_imap_memory_budget_bytes") > 0.0);
    assert_eq!(metric(&after, "caliopen_imap_memory_in_use_bytes"), 0.0);
    assert!(!after.contains(&u), "no per-user label");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_unready_while_nats_cannot_be_reached() {
    let tag = unique("ops5");
    // A port nobody serves: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = worker_yaml(&tag, "log_format: json\nmetrics_addr: 127.0.0.1:0\n");
    let text_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&stack().nats_url, &format!("nats://127.0.0.1:{port}"));
    std::fs::write(&cfg, text_cfg).unwrap();
    let (child, log) = tokio::task::spawn_blocking(move || {
        spawn_worker(&cfg, &[], "serving /metrics, /healthz, /readyz")
    })
    .await
    .unwrap();
    let addr = served_addr(&log);
    let (code, body) = get(&addr, "/readyz").await;
    let (live, _) = get(&addr, "/healthz").await;
    let (mcode, _) = get(&addr, "/metrics").await;
    // Still connecting: it stops without having run (exit code not checked).
    tokio::task::spawn_blocking(move || sigterm(child))
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not ready"), "{body}");
    assert_eq!((live, mcode), (200, 200));
}

/// A TCP relay to the stack's NATS that the test can cut and restore, so
/// a daemon sees NATS go away and come back without the shared NATS
/// stopping for everyone else.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(port: u16) -> Relay {
        let upstream = stack().nats_url.trim_start_matches("nats://").to_string();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut down, _)) = listener.accept().await {
                let upstream = upstream.clone();
                conns.spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Relay { port, task }
    }

    /// Close the listener and every relayed connection.
    fn cut(self) -> u16 {
        self.task.abort();
        self.port
    }
}

/// Poll `/readyz` until its status is `want` (bounded; not a timing test).
pub async fn readyz_becomes(addr: &str, want: u16) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        let (code, body) = get(addr, "/readyz").await;
        if code == want {
            return body;
        }
        last = body;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {want}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_goes_unready_when_nats_goes_away_and_ready_when_it_is_back() {
    let tag = unique("ops6");
    let relay = Relay::start(0).await;
    let cfg = worker_yaml(&tag, "log_format: json\nmetrics_addr: 127.0.0.1:0\n");
    let text_cfg = std::fs::read_to_string(&cfg).unwrap().replace(
        &stack().nats_url,
        &format!("nats://127.0.0.1:{}", relay.port),
    );
    std::fs::write(&cfg, text_cfg).unwrap();
    let (child, log) =
        tokio::task::spawn_blocking(move || spawn_worker(&cfg, &[], "imapworker ready"))
            .await
            .unwrap();
    let addr = served_addr(&log);
    let ready = readyz_becomes(&addr, 200).await;
    assert!(ready.contains("ready"), "{ready}");

    let port = relay.cut();
    let down = readyz_becomes(&addr, 503).await;
    assert!(down.contains("NATS"), "{down}");
    assert_eq!(get(&addr, "/healthz").await.0, 200, "alive all the same");

    let _relay = Relay::start(port).await;
    readyz_becomes(&addr, 200).await;
    let code = tokio::task::spawn_blocking(move || sigterm(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poller_metrics_count_need_job_and_show_the_lease() {
    use caliopen_imap::bus::wire::{Job, NeedJob, OrderName};
    let tag = unique("ops7");
    let s = stack();
    let cfg = std::env::temp_dir().join(format!("idpoller-{tag}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "scan_interval: 60\nremote_protocols: [mastodon]\nstore_settings:\n  hosts: [\"{}\"]\n\
             nats_url: {}\nnats_topics:\n  id_cache: idCache.{tag}\n  imap: imapJobs.{tag}\n  \
             twitter: twitterJobs.{tag}\n  mastodon: mastodonJobs.{tag}\n\
             log_format: json\nmetrics_addr: 127.0.0.1:0\n\
             poller:\n  lease_ttl_secs: 3\n  lease_name: {}\n",
            s.cassandra,
            s.nats_url,
            unique("lease")
        ),
    )
    .unwrap();
    let log = std::env::temp_dir().join(format!("{tag}.log"));
    let child = std::process::Command::new(bin())
        .args(["poller", "-c", cfg.to_str().unwrap(), "start"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Bounded wait until it leads.
    let mut addr = None;
    for _ in 0..300 {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if t.contains("lease taken") {
            addr = Some(served_addr(&log));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let Some(addr) = addr else {
        let code = tokio::task::spawn_blocking(move || sigterm(child)).await;
        panic!(
            "never led ({code:?}): {}",
            std::fs::read_to_string(&log).unwrap()
        );
    };
    let ready = readyz_becomes(&addr, 200).await;
    assert!(ready.contains("leading"), "{ready}");
    let (_, before) = get(&addr, "/metrics").await;
    assert_eq!(
        metric(&before, "caliopen_idpoller_lease_held"),
        1.0,
        "{before}"
    );

    let b = bus().await;
    let req = NeedJob {
        worker: "test".into(),
        order: OrderName {
            order: "need_job".into(),
        },
    };
    let mut asked = 0.0;
    let mut served = 0.0;
    for _ in 0..5 {
        let subject = format!("mastodonJobs.{tag}");
        if let Ok(j) = b
            .request::<_, Job>(&subject, &req, std::time::Duration::from_secs(5))
            .await
        {
            asked += 1.0;
            if j.order == "sync" {
                served += 1.0;
            }
        }
    }
    let (_, after) = get(&addr, "/metrics").await;
    let code = tokio::task::spawn_blocking(move || sigterm(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let delta = |s: &str| metric(&after, s) - metric(&before, s);
    assert!(asked > 0.0);
    assert_eq!(
        delta("caliopen_idpoller_need_job_total{result=\"served\"}"),
        served,
        "{after}"
    );
    assert_eq!(
        delta("caliopen_idpoller_need_job_total{result=\"empty\"}"),
        asked - served,
        "{after}"
    );
    assert!(after.contains("caliopen_idpoller_queue_depth{kind=\"mastodon\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_each_kind_of_problem() {
    use caliopen_imap::store::state::MailboxError;
    let tag = unique("ops8");
    let cfg = worker_yaml(&tag, "");
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let u = user.to_string();
    let streak = new_identity(&st, user, &unique("a"), &imaps_server(), "pw").await;
    let folder = new_identity(&st, user, &unique("b"), &imaps_server(), "pw").await;
    let locked = new_identity(&st, user, &unique("c"), &imaps_server(), "pw").await;
    st.merge_infos(
        user,
        streak.identity_id,
        std::collections::HashMap::from([
            ("errorsCount".to_string(), "3".to_string()),
            ("lastFetchError".to_string(), "login refused".to_string()),
        ]),
    )
    .await
    .unwrap();
    let now = chrono::Utc::now();
    st.save_mailbox_error(
        user,
        folder.identity_id,
        &MailboxError {
            mailbox: "Archive".into(),
            last_error: "no such mailbox".into(),
            first_error: Some(now),
            last_error_at: Some(now),
        },
    )
    .await
    .unwrap();
    // Last renewed 10 minutes ago: its sync stopped.
    let old = now - chrono::Duration::minutes(10);
    st.put_sync_lock_at(user, locked.identity_id, "dead-worker", old, old, 3600)
        .await
        .unwrap();

    let out = ctl(&cfg, &["status", "--userid", &u, "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let rows = status_json(&out);
    let problems = |id: &caliopen_imap::store::identity::Identity| -> String {
        let r = rows
            .iter()
            .find(|r| r["identity_id"] == id.identity_id.to_string())
            .unwrap();
        assert_eq!(r["healthy"], false);
        r["problems"].to_string()
    };
    assert!(problems(&streak).contains("error streak"));
    assert!(problems(&folder).contains("folder error"));
    assert!(problems(&locked).contains("stale sync lock"));

    // --all pages over every user's identities; --unhealthy keeps ours.
    let out = ctl(&cfg, &["status", "--all", "--unhealthy", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let all = status_json(&out);
    assert!(all.iter().all(|r| r["healthy"] == false));
    for id in [&streak, &folder, &locked] {
        let i = id.identity_id.to_string();
        assert!(all.iter().any(|r| r["identity_id"] == i.as_str()), "{i}");
    }
    st.force_release_sync_lock(user, locked.identity_id, "dead-worker")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_hands_off_what_an_outage_left_undelivered_and_the_next_sync_does_not_again() {
    let tag = unique("ops9");
    let cfg = worker_yaml(&tag, "");
    let settings = worker_settings(&tag);
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 5, 400).await;
    let (_, _, v) = mailbox_status(&login, "INBOX");
    // No processor: an outage of ours; what was stored stays undelivered.
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.outage, "{rep:?}");
    let ids: Vec<Uuid> = (1..=5)
        .map(|uid| raw_message_id(user, id.identity_id, "INBOX", v, uid))
        .collect();
    let mut stored = 0;
    for i in &ids {
        if st.raw_message_delivered(*i).await.unwrap() == Some(false) {
            stored += 1;
        }
    }
    assert!(stored >= 1, "the outage left nothing stored");

    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let u = user.to_string();
    let out = ctl(&cfg, &["retry", "--userid", &u, "--identifier", &login]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("handed off {stored},")),
        "{stored}: {}",
        text(&out.stdout)
    );
    // The next sync hands off the rest, and not those again.
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    let seen = lda.seen.lock().unwrap().clone();
    for i in &ids {
        let n = seen.iter().filter(|s| **s == i.to_string()).count();
        assert_eq!(n, 1, "{i} handed off {n} times: {seen:?}");
    }
}

#[test]
fn service_units_pass_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: deploy/verify.sh not run");
        return;
    }
    let out = std::process::Command::new("sh")
        .arg(root().join("deploy/verify.sh"))
        .arg(bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// A worker context with its stores attached to a readiness probe, served
/// on a free port: the context, its shutdown trigger, the address.
async fn probed_worker(
    tag: &str,
) -> (
    caliopen_imap::worker::context::Ctx,
    caliopen_imap::shutdown::Trigger,
    String,
) {
    use caliopen_imap::worker::Probe;
    let (ctx, t) = context(worker_settings(&unique(tag))).await;
    let probe = Probe::new(ctx.metrics.clone());
    probe.attach(ctx.clone()).await;
    let addr = caliopen_imap::http::start("127.0.0.1:0", probe, ctx.shutdown.clone())
        .await
        .unwrap()
        .to_string();
    (ctx, t, addr)
}

/// A worker that has attached its stores (and so logs "imapworker ready")
/// has had Cassandra's first answer: `/readyz` is 200 at once, not 503
/// "waiting for Cassandra's first answer" until a background check lands
/// (seen failing `ops::metrics_move_by_exactly_the_synced_amounts` on a
/// loaded machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_known_as_soon_as_the_stores_are_attached() {
    let (_ctx, _t, addr) = probed_worker("ops10").await;
    let (code, body) = tokio::task::spawn_blocking(move || http_get(&addr, "/readyz"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
}

/// `/readyz` answers from a state refreshed in the background: a burst of
/// probes costs at most one Cassandra query per refresh period, not one
/// each (each held a connection while it waited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_readiness_probes_queries_cassandra_once_per_refresh() {
    let (ctx, _t, addr) = probed_worker("ops9").await;
    readyz_becomes(&addr, 200).await;
    let before = ctx.store.pings();
    let started = std::time::Instant::now();
    let probes: Vec<_> = (0..60)
        .map(|_| {
            let a = addr.clone();
            tokio::task::spawn_blocking(move || http_get(&a, "/readyz"))
        })
        .collect();
    for p in probes {
        let (code, body) = p.await.unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // A periodic task runs at most floor(t / period) + 1 times in t.
    let refresh = caliopen_imap::store::health::REFRESH.as_secs_f64();
    let periods = (started.elapsed().as_secs_f64() / refresh).floor() as u64 + 1;
    let queries = ctx.store.pings() - before;
    assert!(
        queries <= periods,
        "{queries} queries for 60 probes within {periods} refresh period(s)"
    );
}
