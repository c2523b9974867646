//! imapctl against the stack: rows written as Caliopen reads them, orders
//! followed to their end, every bad flag a one-line error and its exit code,
//! and passwords kept off the command line and out of the output.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use caliopen_imap::store::identity::infos;
use futures::StreamExt;

use crate::util::*;

/// Run `caliopen-imap ctl -c CONFIG args...` without blocking the runtime.
async fn ctl(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut full = vec!["ctl".to_string(), "-c".into(), config.display().to_string()];
    full.extend(args.iter().map(|s| s.to_string()));
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = full.iter().map(String::as_str).collect();
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(&a, &e)
    })
    .await
    .unwrap()
}

/// `syncremote --userid USER --identifier LOGIN --wait`.
async fn sync_wait(config: &Path, user: uuid::Uuid, login: &str) -> Output {
    let user = user.to_string();
    ctl(
        config,
        &[
            "syncremote",
            "--userid",
            &user,
            "--identifier",
            login,
            "--wait",
        ],
        &[],
    )
    .await
}

fn assert_fails(out: &Output, code: i32, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stderr: {err} stdout: {}",
        text(&out.stdout)
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

fn cql(query: &str) -> String {
    let cqlsh = std::fs::read_to_string(root().join(".stack/env"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("export STACK_CQLSH=").map(str::to_string))
        .unwrap();
    let host = stack().cassandra.split(':').collect::<Vec<_>>();
    let out = Command::new(cqlsh.trim_matches('"'))
        .args([host[0], host[1], "-e", query])
        .output()
        .unwrap();
    text(&out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addremote_writes_what_caliopen_reads_and_tells_the_poller() {
    let tag = unique("c1");
    let cfg = worker_yaml(&tag, "");
    let st = store().await;
    let (user, name) = new_user(&st).await;
    let b = bus().await;
    let mut cache = b.subscribe(&format!("idCache.{tag}")).await.unwrap();
    b.flush().await.unwrap();

    let out = ctl(
        &cfg,
        &[
            "addremote",
            "--login",
            "Bob.Smith@Example.test",
            "--pass-env",
            "BOB_PW",
            "--server",
            "imap.example.test:993",
            "--username",
            &name,
            "--pollinterval",
            "30",
        ],
        &[("BOB_PW", "b0b-secret")],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("b0b-secret"));
    let new_id: uuid::Uuid = text(&out.stdout).trim().parse().unwrap();

    let id = st.identity(user, new_id).await.unwrap().unwrap();
    assert_eq!(id.identifier, "bob.smith@example.test");
    assert_eq!(id.display_name, "Bob.Smith@Example.test");
    assert_eq!(
        (id.kind.as_str(), id.protocol.as_str(), id.status.as_str()),
        ("remote", "email", "active")
    );
    assert_eq!(id.info(infos::INSERVER), "imap.example.test:993");
    assert_eq!(id.info(infos::AUTHTYPE), "login-password");
    assert_eq!(id.info(infos::POLLINTERVAL), "30");
    assert_eq!(
        id.credentials.get("inusername").map(String::as_str),
        Some("Bob.Smith@Example.test")
    );
    assert_eq!(
        id.credentials.get("inpassword").map(String::as_str),
        Some("b0b-secret")
    );
    assert_eq!(
        st.lookup_identity(user, "bob.smith@example.test")
            .await
            .unwrap(),
        Some(new_id)
    );
    let types = cql(&format!(
        "SELECT identity_id FROM caliopen.identity_type_lookup WHERE type = 'remote' AND user_id = {user}"
    ));
    assert!(types.contains(&new_id.to_string()), "{types}");

    let msg = tokio::time::timeout(Duration::from_secs(5), cache.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["order"], "add");
    assert_eq!(v["identity_id"], new_id.to_string());
    assert_eq!(v["user_id"], user.to_string());
    assert_eq!(v["order_param"], "30");
    assert_eq!(v["protocol"], "email");

    // Same login again: a conflict.
    let out = ctl(
        &cfg,
        &[
            "addremote",
            "--login",
            "bob.smith@example.test",
            "--no-pass",
            "--server",
            "imap.example.test:993",
            "--userid",
            &user.to_string(),
        ],
        &[],
    )
    .await;
    assert_fails(&out, 4, "already has a remote identity");

    // removeremote deletes it and tells the poller.
    let out = ctl(
        &cfg,
        &[
            "removeremote",
            "--userid",
            &user.to_string(),
            "--identifier",
            "Bob.Smith@example.test",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(st.identity(user, new_id).await.unwrap().is_none());
    let msg = tokio::time::timeout(Duration::from_secs(5), cache.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["order"], "delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addremote_then_syncremote_wait_lands_the_mailbox() {
    let tag = unique("c2");
    let cfg = worker_yaml(&tag, "");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let w = start_worker(settings).await;
    let (user, name) = new_user(&w.ctx.store).await;
    let login = unique("dove");
    fill(&login, "INBOX", 6, 700);
    let pwfile = std::env::temp_dir().join(unique("pw"));
    std::fs::write(&pwfile, format!("{}\n", stack().password)).unwrap();

    let out = ctl(
        &cfg,
        &[
            "addremote",
            "--login",
            &login,
            "--pass-file",
            pwfile.to_str().unwrap(),
            "--server",
            &imaps_server(),
            "--username",
            &name,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Watch our own command line while it waits: no password there.
    let child = {
        let mut c = Command::new(bin());
        c.args([
            "ctl",
            "-c",
            cfg.to_str().unwrap(),
            "syncremote",
            "--username",
            &name,
            "--identifier",
            &login,
            "--wait",
        ]);
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        c.spawn().unwrap()
    };
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
    assert!(!text(&cmdline).contains(&stack().password));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("fetched 6, handed off 6"), "{said}");
    assert!(!said.contains(&stack().password) && !text(&out.stderr).contains(&stack().password));

    let rows = w.ctx.store.raw_message_ids_of(user).await.unwrap();
    assert_eq!(rows.len(), 6);

    // listremotes shows where the sync stands.
    let out = ctl(&cfg, &["listremotes", "--username", &name], &[]).await;
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(
        table.contains(&login.to_lowercase()) && table.contains("LASTSEENUID"),
        "{table}"
    );
    let out = ctl(&cfg, &["listremotes", "--username", &name, "--json"], &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["lastseenuid"], "6");
    assert_eq!(v[0]["status"], "active");

    // A second sync: nothing new, nothing doubled.
    let out = sync_wait(&cfg, user, &login).await;
    assert!(
        text(&out.stdout).contains("fetched 0"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(w.ctx.store.raw_message_ids_of(user).await.unwrap().len(), 6);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_with_wait_exits_non_zero_and_names_the_error() {
    let tag = unique("c3");
    let cfg = worker_yaml(&tag, "");
    let w = start_worker(worker_settings(&tag)).await;
    let (user, _) = new_user(&w.ctx.store).await;
    let login = unique("dove");
    let out = ctl(
        &cfg,
        &[
            "addremote",
            "--login",
            &login,
            "--pass-env",
            "PW",
            "--server",
            &imaps_server(),
            "--userid",
            &user.to_string(),
        ],
        &[("PW", "not-the-password")],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sync_wait(&cfg, user, &login).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("not-the-password"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_give_one_line_and_their_exit_code() {
    let tag = unique("c4");
    let cfg = worker_yaml(&tag, "");
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let u = user.to_string();

    assert_fails(
        &ctl(
            &cfg,
            &["syncremote", "--userid", "12345", "--identifier", "x"],
            &[],
        )
        .await,
        2,
        "not a UUID",
    );
    assert_fails(
        &ctl(
            &cfg,
            &[
                "addremote",
                "--login",
                "a",
                "--no-pass",
                "--server",
                "imap.example.test",
                "--userid",
                &u,
            ],
            &[],
        )
        .await,
        2,
        "host:port",
    );
    assert_fails(
        &ctl(
            &cfg,
            &[
                "addremote",
                "--login",
                "a",
                "--no-pass",
                "--server",
                "imap.example.test:99999",
                "--userid",
                &u,
            ],
            &[],
        )
        .await,
        2,
        "port",
    );
    assert_fails(
        &ctl(
            &cfg,
            &[
                "addremote",
                "--login",
                "a",
                "--no-pass",
                "--server",
                "h:993",
                "--userid",
                &u,
                "--pollinterval",
                "9999",
            ],
            &[],
        )
        .await,
        2,
        "--pollinterval",
    );
    assert_fails(
        &ctl(
            &cfg,
            &[
                "addremote",
                "--login",
                "a",
                "--pass-env",
                "NOPE_NOT_SET",
                "--server",
                "h:993",
                "--userid",
                &u,
            ],
            &[],
        )
        .await,
        2,
        "NOPE_NOT_SET",
    );
    assert_fails(
        &ctl(
            &cfg,
            &[
                "addremote",
                "--login",
                "a",
                "--pass-file",
                "/nonexistent/pw",
                "--server",
                "h:993",
                "--userid",
                &u,
            ],
            &[],
        )
        .await,
        2,
        "/nonexistent/pw",
    );
    assert_fails(
        &ctl(
            &cfg,
            &["listremotes", "--userid", &u, "--username", "x"],
            &[],
        )
        .await,
        2,
        "not both",
    );
    assert_fails(
        &ctl(
            &cfg,
            &["listremotes", "--userid", &uuid::Uuid::new_v4().to_string()],
            &[],
        )
        .await,
        3,
        "no Caliopen user",
    );
    assert_fails(
        &ctl(&cfg, &["listremotes", "--username", &unique("ghost")], &[]).await,
        3,
        "no Caliopen user",
    );
    assert_fails(
        &ctl(
            &cfg,
            &[
                "syncremote",
                "--userid",
                &u,
                "--identifier",
                "nobody@example.test",
            ],
            &[],
        )
        .await,
        3,
        "no remote identity",
    );
    assert_fails(
        &ctl(
            &cfg,
            &[
                "syncremote",
                "--userid",
                &u,
                "--remoteid",
                &uuid::Uuid::new_v4().to_string(),
            ],
            &[],
        )
        .await,
        3,
        "has no identity",
    );
    let out = ctl(
        &cfg,
        &[
            "addremote",
            "--login",
            "nopw@example.test",
            "--no-pass",
            "--server",
            "h:993",
            "--userid",
            &u,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_fails(
        &ctl(
            &cfg,
            &[
                "syncremote",
                "--userid",
                &u,
                "--identifier",
                "nopw@example.test",
            ],
            &[],
        )
        .await,
        2,
        "no password is stored",
    );

    // Services down: exit code 5, one clear line.
    let no_cassandra = worker_yaml(&tag, "");
    let text_cfg = std::fs::read_to_string(&no_cassandra)
        .unwrap()
        .replace(&stack().cassandra, "127.0.0.1:1");
    std::fs::write(&no_cassandra, text_cfg).unwrap();
    assert_fails(
        &ctl(&no_cassandra, &["listremotes", "--userid", &u], &[]).await,
        5,
        "cannot reach Cassandra at 127.0.0.1:1",
    );
    let no_nats = worker_yaml(&format!("{tag}n"), "");
    let text_cfg = std::fs::read_to_string(&no_nats)
        .unwrap()
        .replace(&stack().nats_url, "nats://127.0.0.1:1");
    std::fs::write(&no_nats, text_cfg).unwrap();
    assert_fails(
        &ctl(
            &no_nats,
            &[
                "fullfetch",
                "--login",
                "a",
                "--pass-env",
                "PW",
                "--server",
                "h:993",
                "--userid",
                &u,
            ],
            &[("PW", "x")],
        )
        .await,
        5,
        "cannot reach NATS",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fullfetch_wait_and_no_worker() {
    let tag = unique("c5");
    let cfg = worker_yaml(&tag, "");
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let u = user.to_string();
    // Nobody listens: said at once, not after a timeout.
    let out = ctl(
        &cfg,
        &[
            "fullfetch",
            "--login",
            "a",
            "--pass-env",
            "PW",
            "--server",
            &imaps_server(),
            "--userid",
            &u,
            "--wait",
        ],
        &[("PW", "x")],
    )
    .await;
    assert_fails(&out, 5, "no imapworker is listening");

    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let w = start_worker(settings).await;
    let login = unique("dove");
    fill(&login, "INBOX", 4, 300);
    let out = ctl(
        &cfg,
        &[
            "fullfetch",
            "--login",
            &login,
            "--pass-env",
            "PW",
            "--server",
            &imaps_server(),
            "--userid",
            &u,
            "--wait",
        ],
        &[("PW", &stack().password)],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("handed off 4"));
    // Without --wait: the seed's behaviour, publish and quit.
    let out = ctl(
        &cfg,
        &[
            "fullfetch",
            "--login",
            &login,
            "--pass-env",
            "PW",
            "--server",
            &imaps_server(),
            "--userid",
            &u,
        ],
        &[("PW", &stack().password)],
    )
    .await;
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("order sent"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncremote_wait_ends_when_the_worker_is_killed() {
    let tag = unique("c6");
    // One hand-off at a time to a slow processor: the sync cannot finish
    // before the kill.
    let cfg = worker_yaml(&tag, "  in_flight: 1\n");
    let settings = worker_settings(&tag);
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(300), |_| {
        false
    })
    .await;
    let st = store().await;
    let (user, login, _id) = mailbox_account(&st, 40, 300).await;

    let mut worker = Command::new(bin())
        .args(["worker", "-c", cfg.to_str().unwrap(), "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Until the worker listens, --wait would say at once that none does.
    let b = bus().await;
    let started = std::time::Instant::now();
    loop {
        let test = caliopen_imap::bus::wire::ImapOrder {
            order: "test".into(),
            ..Default::default()
        };
        let asked = b
            .request::<_, caliopen_imap::bus::wire::JobReport>(
                &settings.nats_topic_sender,
                &test,
                Duration::from_secs(1),
            )
            .await;
        if asked.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "worker never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let waiting = {
        let cfg = cfg.clone();
        let user = user.to_string();
        tokio::spawn(async move { sync_wait(&cfg, user.parse().unwrap(), &login).await })
    };
    while lda.seen.lock().unwrap().len() < 3 {
        assert!(!waiting.is_finished(), "--wait ended before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill().unwrap(); // SIGKILL
    let _ = worker.wait();
    let out = waiting.await.unwrap();
    assert!(
        lda.seen.lock().unwrap().len() < 40,
        "the sync did not finish"
    );
    assert_fails(&out, 5, "the worker stopped answering");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncremote_wait_behind_a_long_sync_is_not_taken_for_a_dead_worker() {
    let tag = unique("c7");
    let cfg = worker_yaml(&tag, "");
    let mut settings = worker_settings(&tag);
    settings.workers = 1;
    settings.imap.in_flight = 1;
    // The only job slot is held longer than --wait's silence limit.
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(300), |_| {
        false
    })
    .await;
    let w = start_worker(settings.clone()).await;
    let st = w.ctx.store.clone();
    let (user, _, long) = mailbox_account(&st, 60, 300).await;
    let short = unique("dove");
    fill(&short, "INBOX", 2, 300);
    new_identity(&st, user, &short, &imaps_server(), &stack().password).await;

    let b = bus().await;
    let first = {
        let order = caliopen_imap::bus::wire::ImapOrder {
            order: "sync".into(),
            user_id: user.to_string(),
            identity_id: long.identity_id.to_string(),
            ..Default::default()
        };
        let subject = settings.nats_topic_sender.clone();
        tokio::spawn(async move {
            b.request::<_, caliopen_imap::bus::wire::JobReport>(
                &subject,
                &order,
                Duration::from_secs(120),
            )
            .await
            .unwrap()
        })
    };
    while lda.seen.lock().unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = sync_wait(&cfg, user, &short).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("fetched 2, handed off 2"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        first.is_finished(),
        "the second sync waited for the first one's slot"
    );
    assert!(first.await.unwrap().ok);
    w.stop().await;
}
