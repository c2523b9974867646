//! imapctl against the stack: rows written as Caliopen reads them, orders
//! followed to their end, every bad flag a one-line error and its exit code,
//! and passwords kept off the command line and out of the output.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use caliopen_imap::store::identity::infos;
use futures::StreamExt;

use crate::sync_faults::{scripted_server, Script};
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
    cql_exec(query)
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

/// A sync the server throttles ends `--wait` with exit 5 ("run it again
/// later"), not 1 (the scripted server stand-in answers LOGIN
/// `NO [THROTTLED]`, as Gmail does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_sync_with_wait_exits_5() {
    let tag = unique("c3t");
    let cfg = worker_yaml(&tag, "");
    let mut settings = worker_settings(&tag);
    settings.imap.allow_plaintext_loopback = true;
    let w = start_worker(settings).await;
    let (port, _seen) = scripted_server(Script::LoginThrottled, None).await;
    let (user, _) = new_user(&w.ctx.store).await;
    let id = scripted_identity(&w.ctx.store, user, uuid::Uuid::new_v4(), port).await;
    let out = sync_wait(&cfg, user, &id.identifier).await;
    assert_fails(&out, 5, "THROTTLED");
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

// ------------------------------------------------ the Go imapctl's command lines

/// Run the `imapctl` symlink with `args` as they are, without blocking.
async fn imapctl(args: Vec<String>, env: Vec<(String, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(symlink("imapctl"));
        cmd.args(&args).stdin(Stdio::null());
        for (k, _) in std::env::vars() {
            if k.starts_with("CALIOPEN_IMAP_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env);
        cmd.output().unwrap()
    })
    .await
    .unwrap()
}

fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A folder with `imapworker.yaml`, as Caliopen mounts /etc/caliopen.
fn etc_with_worker_yaml(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("etc-ctl"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(worker_yaml(tag, ""), dir.join("imapworker.yaml")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_imapctl_short_flags_work_before_or_after_the_command() {
    let tag = unique("cgo");
    let etc = etc_with_worker_yaml(&tag);
    let etc = etc.to_str().unwrap();
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let w = start_worker(settings).await;
    let (user, name) = new_user(&w.ctx.store).await;
    let login = unique("dove");
    fill(&login, "INBOX", 3, 300);
    let server = imaps_server();
    let pw = stack().password.clone();

    // addremote.go: -u -s -l -p -m -d; the persistent flags after the command.
    let out = imapctl(
        words(&[
            "addremote",
            "-u",
            &name,
            "-s",
            &server,
            "-l",
            &login,
            "-p",
            &pw,
            "-m",
            "INBOX",
            "-d",
            "Go Display",
            "-c",
            "imapworker",
            "--configpath",
            etc,
        ]),
        vec![],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id_id = w
        .ctx
        .store
        .lookup_identity(user, &login)
        .await
        .unwrap()
        .expect("identity written");
    let id = w.ctx.store.identity(user, id_id).await.unwrap().unwrap();
    assert_eq!(id.display_name, "Go Display");
    assert_eq!(id.info(infos::INSERVER), server);

    // syncremote.go: -u -r -p; the persistent flags before the command.
    let rid = id_id.to_string();
    let out = imapctl(
        words(&[
            "-c",
            "imapworker",
            "--configpath",
            etc,
            "syncremote",
            "-u",
            &name,
            "-r",
            &rid,
            "-p",
            &pw,
            "--wait",
        ]),
        vec![],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("fetched 3"),
        "{}",
        text(&out.stdout)
    );

    // fullfetch.go: -u -s -m -l -p, with -v.
    let out = imapctl(
        words(&[
            "fullfetch",
            "-u",
            &name,
            "-s",
            &server,
            "-m",
            "INBOX",
            "-l",
            &login,
            "-p",
            &pw,
            "-v",
            "-c",
            "imapworker",
            "--configpath",
            etc,
            "--wait",
        ]),
        vec![],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("handed off 3"),
        "{}",
        text(&out.stdout)
    );
    w.stop().await;
}

// ------------------------------------------------ locks: visible and clearable

/// `unlock -u NAME --identifier LOGIN [--force]`.
async fn unlock(cfg: &Path, name: &str, login: &str, force: bool) -> Output {
    let mut a = vec!["unlock", "-u", name, "--identifier", login];
    if force {
        a.push("--force");
    }
    ctl(cfg, &a, &[]).await
}

/// listremotes --json, the row of `login`.
async fn remote_json(cfg: &Path, name: &str, login: &str) -> serde_json::Value {
    let out = ctl(cfg, &["listremotes", "-u", name, "--json"], &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|r| r["identifier"] == login.to_lowercase())
        .unwrap()
        .clone()
}

// Each case has its own identity: a lock row written "in the past" loses
// against a newer write of the same row (last write wins), whatever its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listremotes_shows_locks_and_unlock_clears_only_stale_ones() {
    let tag = unique("lk");
    // lock_ttl 60: a lock not renewed for 30 s is stale.
    let cfg = worker_yaml(&tag, "  lock_ttl_secs: 60\n");
    let st = store().await;
    let (user, name) = new_user(&st).await;
    let now = chrono::Utc::now();
    let marker = |owner: Option<&str>| {
        let mut m =
            std::collections::HashMap::from([(infos::SYNCING.to_string(), now.to_rfc3339())]);
        if let Some(o) = owner {
            m.insert(infos::SYNCING_OWNER.to_string(), o.to_string());
        }
        m
    };

    // Nothing held: unlock says so, exit 0.
    let free = unique("dove");
    new_identity(&st, user, &free, &imaps_server(), "x").await;
    let out = unlock(&cfg, &name, &free, false).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nothing to unlock"));

    // A live lock (just renewed) with our marker: shown, refused without
    // --force, cleared with it.
    let live = unique("dove");
    let id = new_identity(&st, user, &live, &imaps_server(), "x").await;
    let (u, i) = (user, id.identity_id);
    st.put_sync_lock_at(u, i, "worker-live", now, now, 60)
        .await
        .unwrap();
    st.merge_infos(u, i, marker(Some("worker-live")))
        .await
        .unwrap();
    let v = remote_json(&cfg, &name, &live).await;
    assert_eq!(v["sync_lock"]["owner"], "worker-live");
    assert!(v["sync_lock"]["expires_in_secs"].as_u64().unwrap() <= 60);
    assert_eq!(v["syncing_marker"]["owner"], "worker-live");
    let out = ctl(&cfg, &["listremotes", "-u", &name], &[]).await;
    let table = text(&out.stdout);
    assert!(table.contains("running"), "{table}");
    assert!(
        table.contains(&format!(
            "{}: sync lock held by worker-live since",
            live.to_lowercase()
        )),
        "{table}"
    );
    let out = unlock(&cfg, &name, &live, false).await;
    assert_fails(&out, 4, "live");
    assert!(st.sync_lock(u, i).await.unwrap().is_some());
    let out = unlock(&cfg, &name, &live, true).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("worker-live"));
    assert!(st.sync_lock(u, i).await.unwrap().is_none());

    // A lock last renewed 10 minutes ago: stale, cleared with the marker.
    let stale = unique("dove");
    let id = new_identity(&st, user, &stale, &imaps_server(), "x").await;
    let (u, i) = (user, id.identity_id);
    let old = now - chrono::Duration::minutes(10);
    st.put_sync_lock_at(u, i, "worker-dead", old, old, 3600)
        .await
        .unwrap();
    st.merge_infos(u, i, marker(Some("worker-dead")))
        .await
        .unwrap();
    let out = ctl(&cfg, &["listremotes", "-u", &name], &[]).await;
    assert!(text(&out.stdout).contains("stale"), "{}", text(&out.stdout));
    let out = unlock(&cfg, &name, &stale, false).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(
        said.contains("cleared the sync lock held by worker-dead"),
        "{said}"
    );
    assert!(st.sync_lock(u, i).await.unwrap().is_none());
    let after = st.identity(u, i).await.unwrap().unwrap();
    assert_eq!(after.info(infos::SYNCING), "");
    assert_eq!(after.info(infos::SYNCING_OWNER), "");

    // A Go worker's marker (no syncing_owner, no lock row): shown as such,
    // refused while Go workers honour it, cleared with --force.
    let go = unique("dove");
    let id = new_identity(&st, user, &go, &imaps_server(), "x").await;
    let (u, i) = (user, id.identity_id);
    st.merge_infos(u, i, marker(None)).await.unwrap();
    let out = ctl(&cfg, &["listremotes", "-u", &name], &[]).await;
    let table = text(&out.stdout);
    assert!(table.contains("go-marker"), "{table}");
    assert!(
        table.contains("syncing marker of a Go worker since"),
        "{table}"
    );
    let v = remote_json(&cfg, &name, &go).await;
    assert!(v["syncing_marker"]["owner"].is_null());
    assert!(v["sync_lock"].is_null());
    let out = unlock(&cfg, &name, &go, false).await;
    assert_fails(&out, 4, "Go worker");
    let out = unlock(&cfg, &name, &go, true).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Go worker"));
    let after = st.identity(u, i).await.unwrap().unwrap();
    assert_eq!(after.info(infos::SYNCING), "");

    // Unknown identity: not found.
    let out = unlock(&cfg, &name, "nobody@nowhere", false).await;
    assert_fails(&out, 3, "nobody@nowhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removeremote_refuses_under_a_running_sync_and_holds_the_lock_itself() {
    let tag = unique("rmlk");
    let cfg = worker_yaml(&tag, "");
    let st = store().await;
    let (user, name) = new_user(&st).await;
    let login = unique("dove");
    let id = new_identity(&st, user, &login, &imaps_server(), "x").await;
    let (u, i) = (user, id.identity_id);

    // A sync holds the lock: refused, one line, conflict, row kept.
    assert!(st
        .take_sync_lock(u, i, "worker-busy", chrono::Utc::now(), 60)
        .await
        .unwrap());
    let out = ctl(
        &cfg,
        &["removeremote", "-u", &name, "--identifier", &login],
        &[],
    )
    .await;
    assert_fails(&out, 4, "imapctl unlock");
    assert!(text(&out.stderr).contains("worker-busy"));
    assert!(st.identity(u, i).await.unwrap().is_some(), "kept");
    assert!(st.release_sync_lock(u, i, "worker-busy").await.unwrap());

    // A Go worker's fresh `syncing` marker: it may be syncing, so refused
    // too; `unlock -r ID --force` (Go-style flags) clears it.
    st.merge_infos(
        u,
        i,
        std::collections::HashMap::from([(
            infos::SYNCING.to_string(),
            chrono::Utc::now().to_rfc3339(),
        )]),
    )
    .await
    .unwrap();
    let out = ctl(
        &cfg,
        &["removeremote", "-u", &name, "--identifier", &login],
        &[],
    )
    .await;
    assert_fails(&out, 4, "Go worker");
    assert!(st.identity(u, i).await.unwrap().is_some(), "kept");
    assert!(
        st.sync_lock(u, i).await.unwrap().is_none(),
        "its lock released"
    );
    let rid = i.to_string();
    let out = ctl(&cfg, &["unlock", "-u", &name, "-r", &rid, "--force"], &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Free: removed, and the lock it took is gone too.
    let out = ctl(
        &cfg,
        &["removeremote", "-u", &name, "--identifier", &login],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(st.identity(u, i).await.unwrap().is_none());
    assert!(st.sync_lock(u, i).await.unwrap().is_none(), "lock released");
    // So a sync that wanted to start meanwhile could not have: it needed
    // that lock, which removeremote held while deleting (checked above by
    // the refusal the other way round).
}

/// The seed README's examples, word for word, with the configuration found
/// where the Go imapctl found it without a flag ($CALIOPENROOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_readme_examples_work_unchanged() {
    let tag = unique("seed");
    let root = std::env::temp_dir().join(unique("caliopenroot"));
    let cfgs = root.join("src/backend/configs");
    std::fs::create_dir_all(&cfgs).unwrap();
    std::fs::copy(worker_yaml(&tag, ""), cfgs.join("imapworker.yaml")).unwrap();
    let env = vec![(
        "CALIOPENROOT".to_string(),
        root.to_str().unwrap().to_string(),
    )];
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let w = start_worker(settings).await;
    let (user, _) = new_user(&w.ctx.store).await;
    let u = user.to_string();
    let login = unique("dove");
    fill(&login, "INBOX", 2, 300);
    let server = imaps_server();
    let pw = stack().password.clone();

    let out = imapctl(
        words(&[
            "addremote",
            "--login",
            &login,
            "--pass",
            &pw,
            "--server",
            &server,
            "--userid",
            &u,
        ]),
        env.clone(),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = imapctl(
        words(&["syncremote", "--userid", &u, "--identifier", &login]),
        env.clone(),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("order sent"));
    // The order was published and quit, as the seed did; wait (bounded) for
    // the worker to have stored both messages.
    let mut n = 0;
    for _ in 0..300 {
        n = w.ctx.store.raw_message_ids_of(user).await.unwrap().len();
        if n == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 2, "the sync ordered by syncremote");
    let out = imapctl(
        words(&[
            "fullfetch",
            "--login",
            &login,
            "--pass",
            &pw,
            "--server",
            &server,
            "--mailbox",
            "INBOX",
            "--userid",
            &u,
        ]),
        env,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
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
    wait_until_worker_answers(&settings.nats_topic_sender, &mut worker).await;

    let mut waiting = {
        let cfg = cfg.clone();
        let user = user.to_string();
        tokio::spawn(async move { sync_wait(&cfg, user.parse().unwrap(), &login).await })
    };
    tokio::select! {
        _ = lda.wait_seen(3) => {}
        r = &mut waiting => panic!("--wait ended before the kill: {r:?}"),
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
    lda.wait_seen(2).await;
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

/// A sync that did not run because another one holds the identity is a
/// conflict (4), as for the other commands that meet the lock, not a
/// failure of the account (1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncremote_wait_while_another_worker_syncs_is_a_conflict() {
    let tag = unique("c8");
    let cfg = worker_yaml(&tag, "");
    let w = start_worker(worker_settings(&tag)).await;
    let st = w.ctx.store.clone();
    let (user, _) = new_user(&st).await;
    let login = unique("dove");
    let id = new_identity(&st, user, &login, &imaps_server(), &stack().password).await;
    let (u, i) = (user, id.identity_id);
    assert!(st
        .take_sync_lock(u, i, "worker-elsewhere", chrono::Utc::now(), 60)
        .await
        .unwrap());
    let out = sync_wait(&cfg, user, &login).await;
    assert_fails(&out, 4, "already running on another worker");
    assert!(
        text(&out.stderr).contains("not run"),
        "{}",
        text(&out.stderr)
    );
    assert!(st
        .release_sync_lock(u, i, "worker-elsewhere")
        .await
        .unwrap());
    w.stop().await;
}
