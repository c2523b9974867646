//! Polite to providers: a server that answers load with a response code
//! (`[THROTTLED]`, `[LIMIT]`, Dovecot's connection limit) or a `BYE` at
//! login is throttling us, not refusing the account. Such a sync ends as
//! transient: never counted towards disabling the identity, shown in
//! `status` and in `caliopen_imap_throttled_total{reason}`, and the host
//! is backed off, so the next job for it ends early without connecting.
//!
//! The connection limit is real Dovecot's: a second Dovecot started here
//! from the stack's configuration with `mail_max_userip_connections = 1`
//! (Dovecot 2.3 checks the limit in its login process, before any userdb
//! lookup, so a per-user override in the shared stack is not possible).
//! `[THROTTLED]` and the BYE come from the scripted server stand-in.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use caliopen_imap::shutdown::Trigger;
use caliopen_imap::store::identity::{infos, time_text};
use caliopen_imap::worker::context::{Counters, Ctx};
use caliopen_imap::worker::job::{self, FullFetchRequest};
use chrono::Utc;
use uuid::Uuid;

use crate::ops::metric;
use crate::sync_faults::{scripted_server, Script, Seen};
use crate::util::*;

/// An identity on a scripted server, and a context allowed to reach it.
async fn scripted(tag: &str, script: Script) -> (Ctx, Trigger, Uuid, Uuid, std::sync::Arc<Seen>) {
    let mut settings = worker_settings(tag);
    settings.imap.allow_plaintext_loopback = true;
    let (ctx, t) = context(settings).await;
    let (port, seen) = scripted_server(script, None).await;
    let (user, _) = new_user(&ctx.store).await;
    let id = scripted_identity(&ctx.store, user, Uuid::new_v4(), port).await;
    (ctx, t, user, id.identity_id, seen)
}

fn throttled_total(ctx: &Ctx, reason: &str) -> f64 {
    let text = ctx.metrics.encode();
    metric(
        &text,
        &format!("caliopen_imap_throttled_total{{reason=\"{reason}\"}}"),
    )
}

/// `imapctl status --json` of one user's identities.
async fn status_rows(tag: &str, user: Uuid) -> Vec<serde_json::Value> {
    let cfg = worker_yaml(tag, "");
    let u = user.to_string();
    let out = tokio::task::spawn_blocking(move || {
        run(
            &[
                "ctl",
                "-c",
                cfg.to_str().unwrap(),
                "status",
                "--userid",
                &u,
                "--json",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_login_never_counts_against_the_account() {
    let tag = unique("pol1");
    let (ctx, _t, user, identity, seen) = scripted(&tag, Script::LoginThrottled).await;
    // An account failing for 100 h already: one more counted failure
    // would disable it (disable_after is 72 h).
    let first = time_text(Utc::now() - chrono::Duration::hours(100));
    ctx.store
        .merge_infos(
            user,
            identity,
            [
                (infos::ERRORS_COUNT.to_string(), "7".to_string()),
                (infos::FIRST_ERROR_DATE.to_string(), first.clone()),
                (infos::LAST_FETCH_ERROR.to_string(), "old".to_string()),
            ]
            .into(),
        )
        .await
        .unwrap();

    let rep = sync_once(&ctx, user, identity).await;
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(after.status, "active", "never disabled by throttling");
    assert_eq!(after.info(infos::ERRORS_COUNT), "7", "not counted");
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["throttled"], true, "{rep:?}");
    assert!(!rep.ok && rep.error.contains("THROTTLED"), "{rep:?}");
    assert_eq!(after.info(infos::FIRST_ERROR_DATE), first);
    assert!(after.info("throttled").contains("throttled"), "{after:?}");
    assert_eq!(throttled_total(&ctx, "throttled"), 1.0);

    // The host is backed off: the next job ends early, without a LOGIN.
    let rep = sync_once(&ctx, user, identity).await;
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["throttled"], true, "{rep:?}");
    assert!(rep.error.contains("backing off"), "{rep:?}");
    assert_eq!(seen.logins.load(Ordering::SeqCst), 1);
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(after.info(infos::ERRORS_COUNT), "7", "not counted");

    let rows = status_rows(&tag, user).await;
    assert_eq!(rows[0]["state"], "active");
    assert_eq!(rows[0]["throttled"]["reason"], "throttled", "{rows:?}");
    assert!(rows[0]["throttled"]["server"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bye_at_login_never_counts_against_the_account() {
    let tag = unique("pol2");
    let (ctx, _t, user, identity, seen) = scripted(&tag, Script::ByeAtLogin).await;
    let rep = sync_once(&ctx, user, identity).await;
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["throttled"], true, "{rep:?}");
    assert_eq!(seen.logins.load(Ordering::SeqCst), 1);
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::ERRORS_COUNT),
        "",
        "not counted: {after:?}"
    );
    assert!(after.info("throttled").contains("bye"), "{after:?}");
    assert_eq!(throttled_total(&ctx, "bye"), 1.0);
    let rows = status_rows(&tag, user).await;
    assert_eq!(rows[0]["throttled"]["reason"], "bye", "{rows:?}");
    assert_eq!(rows[0]["errors_count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_answered_unavailable_burns_no_message_try() {
    let tag = unique("pol4");
    let (ctx, _t, user, identity, _seen) = scripted(&tag, Script::FetchUnavailable).await;
    let _lda = lda(&ctx.settings.lda.in_topic, |_| false).await;
    let rep = sync_once(&ctx, user, identity).await;
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["throttled"], true, "{rep:?}");
    assert_eq!(rep.failed, 0, "no message is at fault: {rep:?}");
    let failures = ctx.store.message_failures(user, identity).await.unwrap();
    assert!(failures.is_empty(), "no try counted: {failures:?}");
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::ERRORS_COUNT),
        "",
        "not counted: {after:?}"
    );
    assert_ne!(
        after.info(infos::LASTSEENUID),
        "2",
        "no checkpoint past UID 1"
    );
    assert_eq!(throttled_total(&ctx, "unavailable"), 1.0);
}

/// A second Dovecot, from the stack's configuration, allowing one
/// connection per user and IP; stopped on drop.
struct LimitedDovecot {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl LimitedDovecot {
    fn start() -> LimitedDovecot {
        let dir = std::env::temp_dir().join(unique("dovecot-limit"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = stack();
        let conf: String = std::fs::read_to_string(&s.dovecot_conf)
            .unwrap()
            .lines()
            .map(|l| {
                let key = l.split('=').next().unwrap_or("").trim();
                match key {
                    "instance_name" => format!("instance_name = {}", unique("limit")),
                    "base_dir" => format!("base_dir = {}/run", dir.display()),
                    "state_dir" => format!("state_dir = {}/lib", dir.display()),
                    "log_path" => format!("log_path = {}/dovecot.log", dir.display()),
                    "mail_max_userip_connections" => "  mail_max_userip_connections = 1".into(),
                    "process_min_avail" => "  process_min_avail = 1".into(),
                    "port" if l.contains(&s.imaps_port.to_string()) => format!("    port = {port}"),
                    "port" => "    port = 0".into(),
                    _ => l.to_string(),
                }
            })
            .map(|l| l + "\n")
            .collect();
        let path = dir.join("dovecot.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("dovecot (the stack's) starts");
        // Dropped on the way out (a failed start included): stopped.
        let dovecot = LimitedDovecot {
            child,
            port,
            dir: dir.clone(),
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return dovecot;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the second Dovecot does not answer, see {}", dir.display());
    }
}

impl Drop for LimitedDovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its children.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_connection_limit_is_throttling_not_a_wrong_password() {
    let dovecot = LimitedDovecot::start();
    let server = format!("{}:{}", stack().imap_host, dovecot.port);
    let tag = unique("pol3");
    let (ctx, _t) = context(worker_settings(&tag)).await;
    let (user, _) = new_user(&ctx.store).await;
    let login = unique("dove");
    let id = new_identity(&ctx.store, user, &login, &server, &stack().password).await;

    // The user's phone holds the one connection allowed.
    let mut phone = dovecot_account(&login);
    phone.server = server.clone();
    let (_held, _) = caliopen_imap::imap::connect(&phone).await.unwrap();

    let rep = sync_once(&ctx, user, id.identity_id).await;
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["throttled"], true, "{rep:?}");
    assert!(
        rep.error.contains("Maximum number of connections"),
        "{rep:?}"
    );
    let after = ctx
        .store
        .identity(user, id.identity_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        after.info(infos::ERRORS_COUNT),
        "",
        "not counted: {after:?}"
    );
    assert_eq!(after.status, "active");
    assert!(after.info("throttled").contains("connections"), "{after:?}");
    assert_eq!(throttled_total(&ctx, "connections"), 1.0);

    // A fullfetch order for that account is throttled as well, and counted.
    let order = FullFetchRequest {
        user_id: user,
        server: server.clone(),
        login: login.clone(),
        password: stack().password.clone(),
        mailbox: "INBOX".into(),
    };
    let rep = job::fullfetch(&ctx, order, Counters::new()).await;
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["throttled"], true, "{rep:?}");
    assert_eq!(throttled_total(&ctx, "connections"), 2.0);
}
