//! What a sync does when production surprises it: the processor is away or
//! silent, a message vanishes mid-sync, a folder is missing or named in
//! UTF-8, a message is too large, two orders for one identity arrive at
//! once, a worker died holding the lock. Each test names the guarantee it
//! proves (docs/guarantees.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use caliopen_imap::shutdown::Trigger;
use caliopen_imap::store::identity::{infos, SyncingMarker};
use caliopen_imap::store::raw_message::raw_message_id;
use caliopen_imap::worker::context::{Ctx, SyncHold};
use uuid::Uuid;

use crate::util::*;

/// How many times the processor stand-in saw each message id.
fn counts(seen: &Arc<Mutex<Vec<String>>>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for id in seen.lock().unwrap().iter() {
        *m.entry(id.clone()).or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_outage_never_steps_a_message_over() {
    let tag = unique("f1");
    let mut settings = worker_settings(&tag);
    settings.imap.max_message_tries = 2;
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, _, id) = mailbox_account(st, 6, 400).await;

    // Nobody serves the hand-off subject: max_message_tries + 2 syncs.
    for round in 0..4 {
        let rep = sync_once(&ctx, user, id.identity_id).await;
        assert!(!rep.ok, "round {round}: {rep:?}");
        assert!(rep.outage, "round {round}: {rep:?}");
        assert_eq!(rep.stepped_over, 0, "round {round}: {rep:?}");
        assert!(rep.error.contains("no processor"), "{}", rep.error);
    }
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert!(
        after.info(infos::LAST_FETCH_ERROR).contains("outage"),
        "recorded as our outage: {:?}",
        after.info(infos::LAST_FETCH_ERROR)
    );
    assert_eq!(
        after.info(infos::ERRORS_COUNT),
        "",
        "not counted against the account"
    );
    assert!(st
        .message_failures(user, id.identity_id)
        .await
        .unwrap()
        .is_empty());

    // The processor is back: everything is delivered, once.
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.handed_off, rep.stepped_over), (6, 0), "{rep:?}");
    assert_eq!(lda.seen.lock().unwrap().len(), 6);
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "6");
    assert_eq!(after.info(infos::LAST_FETCH_ERROR), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_processor_is_an_outage_and_a_poison_message_is_a_try() {
    let tag = unique("f2");
    let mut settings = worker_settings(&tag);
    settings.imap.lda_timeout_secs = 1;
    settings.imap.in_flight = 2;
    settings.imap.max_message_tries = 5;
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 4, 300).await;
    let (_, _, v) = mailbox_status(&login, "INBOX");

    // A processor that receives but never answers: an outage, no try.
    let client = async_nats::connect(&stack().nats_url).await.unwrap();
    let silent = client
        .subscribe(settings.lda.in_topic.clone())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.outage && !rep.ok, "{rep:?}");
    assert!(st
        .message_failures(user, id.identity_id)
        .await
        .unwrap()
        .is_empty());
    drop(silent);
    drop(client);

    // One message never answered while the others are: a poison message,
    // which counts a try (and only that one).
    let poison = raw_message_id(user, id.identity_id, "INBOX", v, 2).to_string();
    let p = poison.clone();
    let _lda = lda_answering_except(&settings.lda.in_topic, move |m| m == p).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep.outage, "{rep:?}");
    assert_eq!(rep.failed, 1, "{rep:?}");
    let f = st.message_failures(user, id.identity_id).await.unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].uid, f[0].tries), (2, 1));
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "1");
    assert!(
        after
            .info(infos::LAST_FETCH_ERROR)
            .contains("1 message(s) not handed off"),
        "a message left to retry is visible on the identity: {:?}",
        after.info(infos::LAST_FETCH_ERROR)
    );
    assert_eq!(after.info(infos::ERRORS_COUNT), "", "not the account's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_expunged_mid_sync_is_done_and_the_next_sync_fetches_nothing() {
    let tag = unique("f3");
    let mut settings = worker_settings(&tag);
    settings.imap.fetch_batch = 5;
    settings.imap.in_flight = 1;
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 20, 300).await;

    // When the processor sees the first message, 15..17 are expunged: the
    // sync has not fetched them yet (one message in flight, batches of 5).
    let once = std::sync::Once::new();
    let l = login.clone();
    let lda = lda(&settings.lda.in_topic, move |_| {
        once.call_once(|| {
            doveadm(
                &["expunge", "-u", &l, "mailbox", "INBOX", "uid", "15:17"],
                None,
            );
        });
        false
    })
    .await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 17, "{rep:?}");
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "20");

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.fetched, rep.handed_off), (0, 0), "{rep:?}");
    assert_eq!(lda.seen.lock().unwrap().len(), 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storing_again_never_undoes_a_delivery() {
    let tag = unique("f4");
    let settings = worker_settings(&tag);
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 5, 300).await;
    let (_, _, v) = mailbox_status(&login, "INBOX");
    assert!(sync_once(&ctx, user, id.identity_id).await.ok);

    // As after a crash before the checkpoint was saved: the checkpoint is
    // behind messages that were delivered.
    st.merge_infos(
        user,
        id.identity_id,
        [(infos::LASTSEENUID.to_string(), "0".to_string())].into(),
    )
    .await
    .unwrap();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.handed_off, rep.already_delivered), (0, 5), "{rep:?}");
    assert_eq!(lda.seen.lock().unwrap().len(), 5, "no second hand-off");
    for uid in 1..=5 {
        let rid = raw_message_id(user, id.identity_id, "INBOX", v, uid);
        assert_eq!(st.raw_message_delivered(rid).await.unwrap(), Some(true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf8_folders_sync_and_a_missing_folder_fails_alone() {
    let tag = unique("f5");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = folders_account(
        st,
        &[("INBOX", 1), ("Entwürfe", 2), ("日本語", 1), ("Archive", 3)],
        "INBOX,Entwürfe,DoesNotExist,日本語,Archive",
    )
    .await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!(rep.handed_off, 7, "{rep:?}");
    assert!(!rep.ok, "a folder failed: {rep:?}");
    assert_eq!(rep.mailbox_errors.len(), 1, "{rep:?}");
    assert_eq!(rep.mailbox_errors[0].mailbox, "DoesNotExist");
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::ERRORS_COUNT),
        "",
        "never counted against the account"
    );
    let errors = st.mailbox_errors(user, id.identity_id).await.unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].mailbox, "DoesNotExist");

    // X-Fetched-Imap-Box holds the decoded name, as the Go worker wrote it.
    let (_, _, v) = mailbox_status(&login, "Entwürfe");
    let rid = raw_message_id(user, id.identity_id, "Entwürfe", v, 1);
    let raw = st.raw_message_data(rid).await.unwrap().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode("Entwürfe");
    let head = String::from_utf8_lossy(&raw[..raw.len().min(2000)]).to_string();
    assert!(
        head.contains(&format!("X-Fetched-Imap-Box: {b64}\r\n")),
        "{head}"
    );
    assert_eq!(
        st.mailbox_checkpoint(user, id.identity_id, "日本語")
            .await
            .unwrap()
            .unwrap()
            .lastseenuid,
        1
    );

    // The folder appears: its error goes away, nothing else is fetched again.
    fill(&login, "DoesNotExist", 1, 300);
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 1, "{rep:?}");
    assert!(st
        .mailbox_errors(user, id.identity_id)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_stepped_over_at_once_and_listed() {
    let tag = unique("f6");
    let mut settings = worker_settings(&tag);
    settings.imap.max_message_size = 100_000;
    settings.imap.max_message_tries = 5;
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 1, 300_000);
    fill(&login, "INBOX", 3, 300);
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep.ok, "a message was stepped over: {rep:?}");
    assert_eq!((rep.handed_off, rep.stepped_over), (3, 1), "{rep:?}");
    assert_eq!(rep.stepped.len(), 1);
    assert_eq!(rep.stepped[0].uid, 1);
    assert!(
        rep.stepped[0].reason.contains("max_message_size"),
        "{rep:?}"
    );
    let f = st.message_failures(user, id.identity_id).await.unwrap();
    assert!(
        f.len() == 1 && f[0].stepped_over && f[0].tries == 1,
        "{f:?}"
    );
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "4");

    // The next sync is a true no-op.
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.fetched, rep.handed_off, rep.stepped_over), (0, 0, 0));
    assert_eq!(lda.seen.lock().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_to_two_workers_never_hands_a_message_off_twice() {
    let tag = unique("f7");
    let settings = worker_settings(&tag);
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (a, _ta) = context(settings.clone()).await;
    let (b, _tb) = context(settings).await;
    let (user, login, id) = mailbox_account(&a.store, 2, 300).await;
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..50 {
        fill(&login, "INBOX", 2, 300);
        // The second order lands a moment later, as it does from a queue:
        // late enough to lose the lock race, early enough to have read the
        // identity before the first sync saved its checkpoint.
        let lag = Duration::from_millis(rng.u64(0..4));
        let (ra, rb) = tokio::join!(sync_once(&a, user, id.identity_id), async {
            tokio::time::sleep(lag).await;
            sync_once(&b, user, id.identity_id).await
        });
        assert!(!ra.outage && !rb.outage, "{ra:?} {rb:?}");
    }
    let seen = counts(&lda.seen);
    assert_eq!(seen.len(), 102, "every message handed off");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handed off more than once: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_lock_lapses_and_its_marker_does_not_block() {
    let tag = unique("f8");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, _, id) = mailbox_account(st, 2, 300).await;

    // A worker that died mid-sync: its marker stays, its lock row lives
    // lock_ttl_secs at most.
    let since = chrono::Utc::now();
    assert!(st
        .take_sync_lock(
            user,
            id.identity_id,
            "dead-worker",
            since,
            settings.imap.lock_ttl_secs
        )
        .await
        .unwrap());
    st.merge_infos(
        user,
        id.identity_id,
        [
            (infos::SYNCING.to_string(), since.to_rfc3339()),
            (infos::SYNCING_OWNER.to_string(), "dead-worker".to_string()),
        ]
        .into(),
    )
    .await
    .unwrap();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.error.starts_with("skipped"), "locked: {rep:?}");
    let ttl = lock_ttl_left(user, id.identity_id);
    assert!(
        ttl > 0 && ttl <= settings.imap.lock_ttl_secs as i64,
        "the lock lapses within lock_ttl_secs: {ttl}"
    );

    // Once the row lapsed (deleted here, as its TTL would), our marker left
    // behind does not block: it is ours, and only the lock row counts.
    cql_exec(&format!(
        "DELETE FROM caliopen.imap_sync_lock WHERE user_id = {user} AND identity_id = {}",
        id.identity_id
    ));
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 2);
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::SYNCING),
        "",
        "marker cleared after the sync"
    );
    assert_eq!(after.info(infos::SYNCING_OWNER), "");

    // A marker a Go worker wrote (no owner) is honoured for 24 h.
    st.merge_infos(
        user,
        id.identity_id,
        [(infos::SYNCING.to_string(), chrono::Utc::now().to_rfc3339())].into(),
    )
    .await
    .unwrap();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.error.contains("Go worker"), "{rep:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sync_renews_its_lock() {
    let tag = unique("f9");
    let mut settings = worker_settings(&tag);
    settings.imap.lock_ttl_secs = 30;
    settings.imap.in_flight = 1;
    // Each hand-off takes 1 s: the sync outlives a renewal period (10 s).
    let _lda = lda_with_delay(&settings.lda.in_topic, Duration::from_secs(1), |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = ctx.store.clone();
    let (user, _, id) = mailbox_account(&st, 14, 300).await;
    let identity = id.identity_id;
    let c = ctx.clone();
    let run = tokio::spawn(async move { sync_once(&c, user, identity).await });
    // Watch the lock row while the sync runs: its write time moves on.
    let mut first = None;
    let mut renewed = false;
    while !run.is_finished() {
        if let Some(w) = lock_writetime(user, identity) {
            match first {
                None => first = Some(w),
                Some(f) if w > f => renewed = true,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rep = run.await.unwrap();
    assert!(rep.ok, "{rep:?}");
    assert!(renewed, "the lock was renewed while the sync ran");
    assert_eq!(lock_writetime(user, identity), None, "released at the end");
}

/// Seconds left on the lock row of an identity (`TTL(owner)`), 0 if none.
fn lock_ttl_left(user: Uuid, identity: Uuid) -> i64 {
    cql_value(&format!(
        "SELECT TTL(owner) FROM caliopen.imap_sync_lock WHERE user_id = {user} AND identity_id = {identity}"
    ))
    .and_then(|v| v.parse().ok())
    .unwrap_or(0)
}

/// `WRITETIME(owner)` of the lock row, `None` when there is no lock.
fn lock_writetime(user: Uuid, identity: Uuid) -> Option<i64> {
    cql_value(&format!(
        "SELECT WRITETIME(owner) FROM caliopen.imap_sync_lock WHERE user_id = {user} AND identity_id = {identity}"
    ))
    .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_no_trust_roots_refuses_to_start() {
    let s = stack();
    let tag = unique("f10");
    // No imap.ca_file, and the system roots pointed at nothing.
    let yaml = std::env::temp_dir().join(format!("caliopen-imap-{tag}.yaml"));
    std::fs::write(
        &yaml,
        format!(
            "nats_url: {}\nnats_topic_sender: outboundIMAP.{tag}\nstore_settings:\n  hosts: [\"{}\"]\n",
            s.nats_url, s.cassandra
        ),
    )
    .unwrap();
    let empty = std::env::temp_dir().join(unique("no-certs"));
    std::fs::create_dir_all(&empty).unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["worker", "-c", yaml.to_str().unwrap(), "start"])
        .env("SSL_CERT_FILE", empty.join("none.pem"))
        .env("SSL_CERT_DIR", &empty)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A worker that started anyway would run until killed: bound the wait.
    let mut status = None;
    for _ in 0..600 {
        if let Some(st) = child.try_wait().unwrap() {
            status = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "refused as a configuration error: {err}"
    );
    assert!(err.contains("no trusted CA certificate"), "{err}");
}

/// How the scripted server answers the commands of one sync.
#[derive(Clone, Copy)]
pub(crate) enum Script {
    /// Announces 100 bytes for UID 1, then sends a 200 KB body.
    UnderReportedSize,
    /// `UID SEARCH` answered `NO`.
    SearchRefused,
    /// The body FETCH sends UID 2 only and ends `NO` for UID 1, which SEARCH
    /// still finds (as Gmail and Exchange do for some messages).
    OneMessageRefused,
    /// Announces LIST-STATUS and CONDSTORE, then answers every LIST and
    /// STATUS with `BAD`.
    StatusRefused,
    /// Lists INBOX and a folder whose name is not valid modified UTF-7.
    BadFolderName,
    /// Offers IDLE. INBOX holds UID 1 until the first body FETCH, during
    /// which UID 2 arrives: announced only as `* 2 EXISTS` inside that
    /// FETCH answer, never again (no IDLE announces anything).
    NewMailDuringFetch,
    /// LOGIN answered `NO [THROTTLED]`, as Gmail does under load.
    LoginThrottled,
    /// LOGIN answered `* BYE` and the connection closed.
    ByeAtLogin,
    /// The body FETCH sends UID 2 only and ends `NO [UNAVAILABLE]`: the
    /// server is short of a subsystem for now, no message is at fault.
    FetchUnavailable,
}

/// What a scripted server has seen, for tests to wait on.
#[derive(Default)]
pub(crate) struct Seen {
    /// [`Script::NewMailDuringFetch`]: UID 2 has arrived.
    arrived: std::sync::atomic::AtomicBool,
    /// IDLE commands received after UID 2 arrived.
    pub(crate) idles_after_arrival: std::sync::atomic::AtomicUsize,
    /// LOGIN commands received.
    pub(crate) logins: std::sync::atomic::AtomicUsize,
    /// NOTIFY commands received (it offers none).
    pub(crate) notifies: std::sync::atomic::AtomicUsize,
}

/// [`Script::NewMailDuringFetch`]'s answer to a mailbox command, if it is one.
fn new_mail_during_fetch(cmd: &str, seen: &Seen, out: &mut Vec<u8>) -> Option<&'static str> {
    use std::sync::atomic::Ordering::SeqCst;
    let arrived = seen.arrived.load(SeqCst);
    let uids: &[u32] = if arrived { &[1, 2] } else { &[1] };
    // The UIDs a command names (`1`, `2:*`, `1:2`), among those present.
    let asked = |set: &str| -> Vec<u32> {
        let set = set.split(' ').next().unwrap_or("");
        let (lo, hi) = set.split_once(':').unwrap_or((set, set));
        let lo: u32 = lo.parse().unwrap_or(0);
        let hi: u32 = hi.parse().unwrap_or(u32::MAX);
        uids.iter()
            .copied()
            .filter(|u| (lo..=hi).contains(u))
            .collect()
    };
    if cmd.starts_with("CAPABILITY") {
        out.extend_from_slice(b"* CAPABILITY IMAP4rev1 IDLE\r\n");
    } else if cmd.starts_with("EXAMINE") {
        let n = uids.len();
        out.extend_from_slice(
            format!(
                "* {n} EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT {}] n\r\n",
                n + 1
            )
            .as_bytes(),
        );
        return Some("OK [READ-ONLY] done");
    } else if let Some(set) = cmd.strip_prefix("UID SEARCH UID ") {
        let found: Vec<String> = asked(set).iter().map(u32::to_string).collect();
        out.extend_from_slice(format!("* SEARCH {}\r\n", found.join(" ")).as_bytes());
    } else if let Some(set) = cmd.strip_prefix("UID FETCH ") {
        for u in asked(set) {
            let m = message(u as usize, 300);
            if cmd.contains("RFC822.SIZE") {
                out.extend_from_slice(
                    format!("* {u} FETCH (UID {u} RFC822.SIZE {})\r\n", m.len()).as_bytes(),
                );
            } else {
                out.extend_from_slice(
                    format!("* {u} FETCH (UID {u} FLAGS () BODY[] {{{}}}\r\n", m.len()).as_bytes(),
                );
                out.extend_from_slice(&m);
                out.extend_from_slice(b")\r\n");
            }
        }
        if !cmd.contains("RFC822.SIZE") && !arrived {
            seen.arrived.store(true, SeqCst);
            out.extend_from_slice(b"* 2 EXISTS\r\n");
        }
    } else {
        return None;
    }
    Some("OK done")
}

/// A small scripted IMAP server on loopback (plaintext, allowed for
/// loopback only), standing in for remote servers whose misbehaviour
/// Dovecot cannot be made to show. Mailbox: UIDs 1 and 2, UIDVALIDITY 7.
/// Run at the scripted server's LOGIN, before it answers.
pub(crate) type OnLogin = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

async fn scripted_server_with(script: Script, on_login: Option<OnLogin>) -> u16 {
    scripted_server(script, on_login).await.0
}

/// [`scripted_server_with`], and what the server sees.
pub(crate) async fn scripted_server(script: Script, on_login: Option<OnLogin>) -> (u16, Arc<Seen>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let small = message(2, 300);
    let big = message(1, 200_000);
    let seen = Arc::new(Seen::default());
    let seen_out = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (small, big) = (small.clone(), big.clone());
            let on_login = on_login.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w
                    .write_all(b"* OK [CAPABILITY IMAP4rev1] scripted\r\n")
                    .await;
                let mut idling: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    // DONE ends an IDLE (RFC 2177), which announced nothing.
                    if let Some(tag) = idling.take() {
                        let _ = w
                            .write_all(format!("{tag} OK idle done\r\n").as_bytes())
                            .await;
                        continue;
                    }
                    let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
                    let cmd = rest.to_ascii_uppercase();
                    if cmd == "IDLE" {
                        if seen.arrived.load(std::sync::atomic::Ordering::SeqCst) {
                            seen.idles_after_arrival
                                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        idling = Some(tag.to_string());
                        let _ = w.write_all(b"+ idling\r\n").await;
                        continue;
                    }
                    let mut out: Vec<u8> = Vec::new();
                    let body = |out: &mut Vec<u8>, uid: u32, data: &[u8]| {
                        out.extend_from_slice(
                            format!(
                                "* {uid} FETCH (UID {uid} FLAGS () BODY[] {{{}}}\r\n",
                                data.len()
                            )
                            .as_bytes(),
                        );
                        out.extend_from_slice(data);
                        out.extend_from_slice(b")\r\n");
                    };
                    if cmd.starts_with("NOTIFY") {
                        seen.notifies
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    if cmd.starts_with("LOGIN") {
                        seen.logins
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let Some(hook) = &on_login {
                            hook().await;
                        }
                        if matches!(script, Script::ByeAtLogin) {
                            let _ = w
                                .write_all(b"* BYE Too many sessions, come back later\r\n")
                                .await;
                            break;
                        }
                    }
                    let status_refused = matches!(script, Script::StatusRefused);
                    let live = matches!(script, Script::NewMailDuringFetch);
                    let done = if let Some(done) = live
                        .then(|| new_mail_during_fetch(&cmd, &seen, &mut out))
                        .flatten()
                    {
                        done
                    } else if cmd.starts_with("LOGIN") && matches!(script, Script::LoginThrottled) {
                        "NO [THROTTLED] Account exceeded command or bandwidth limits"
                    } else if cmd.starts_with("CAPABILITY") && status_refused {
                        out.extend_from_slice(
                            b"* CAPABILITY IMAP4rev1 LIST-EXTENDED LIST-STATUS CONDSTORE\r\n",
                        );
                        "OK done"
                    } else if cmd.starts_with("CAPABILITY") {
                        out.extend_from_slice(b"* CAPABILITY IMAP4rev1\r\n");
                        "OK done"
                    } else if status_refused
                        && (cmd.starts_with("LIST") || cmd.starts_with("STATUS"))
                    {
                        "BAD not today"
                    } else if matches!(script, Script::BadFolderName) && cmd.starts_with("LIST") {
                        out.extend_from_slice(b"* LIST () \"/\" INBOX\r\n");
                        out.extend_from_slice(b"* LIST () \"/\" \"bad&AEE-\"\r\n");
                        "OK done"
                    } else if cmd.starts_with("EXAMINE") {
                        out.extend_from_slice(
                            b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 3] n\r\n",
                        );
                        "OK [READ-ONLY] done"
                    } else if cmd.starts_with("UID SEARCH") {
                        if matches!(script, Script::SearchRefused) {
                            "NO search is not possible now"
                        } else {
                            let uids = cmd.trim_start_matches("UID SEARCH UID ").trim();
                            let found = if uids == "2" {
                                "2"
                            } else if uids == "1" {
                                "1"
                            } else {
                                "1 2"
                            };
                            out.extend_from_slice(format!("* SEARCH {found}\r\n").as_bytes());
                            "OK done"
                        }
                    } else if cmd.starts_with("UID FETCH") && cmd.contains("RFC822.SIZE") {
                        out.extend_from_slice(b"* 1 FETCH (UID 1 RFC822.SIZE 100)\r\n");
                        out.extend_from_slice(
                            format!("* 2 FETCH (UID 2 RFC822.SIZE {})\r\n", small.len()).as_bytes(),
                        );
                        "OK done"
                    } else if cmd.starts_with("UID FETCH") {
                        match script {
                            Script::OneMessageRefused => {
                                body(&mut out, 2, &small);
                                "NO message 1 cannot be fetched now"
                            }
                            Script::FetchUnavailable => {
                                body(&mut out, 2, &small);
                                "NO [UNAVAILABLE] backend down, try again later"
                            }
                            _ => {
                                body(&mut out, 1, &big);
                                body(&mut out, 2, &small);
                                "OK done"
                            }
                        }
                    } else if cmd.starts_with("LOGOUT") {
                        out.extend_from_slice(b"* BYE bye\r\n");
                        "OK bye"
                    } else {
                        "OK done"
                    };
                    out.extend_from_slice(format!("{tag} {done}\r\n").as_bytes());
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, seen_out)
}

/// An identity on the scripted server, and a context allowed to reach it.
async fn scripted_account(tag: &str, script: Script) -> (Ctx, Trigger, Uuid, Uuid, Lda) {
    scripted_account_with(tag, script, |_, _, _| None).await
}

async fn scripted_account_with<H>(
    tag: &str,
    script: Script,
    hook: H,
) -> (Ctx, Trigger, Uuid, Uuid, Lda)
where
    H: FnOnce(caliopen_imap::store::Store, Uuid, Uuid) -> Option<OnLogin>,
{
    let mut settings = worker_settings(tag);
    settings.imap.allow_plaintext_loopback = true;
    settings.imap.max_message_size = 100_000;
    settings.imap.max_message_tries = 3;
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, t) = context(settings).await;
    let (user, _) = new_user(&ctx.store).await;
    let identity = Uuid::new_v4();
    let port = scripted_server_with(script, hook(ctx.store.clone(), user, identity)).await;
    scripted_identity(&ctx.store, user, identity, port).await;
    (ctx, t, user, identity, lda)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_longer_than_announced_is_refused_on_arrival() {
    let (ctx, _t, user, identity, lda) =
        scripted_account(&unique("f11"), Script::UnderReportedSize).await;
    let rep = sync_once(&ctx, user, identity).await;
    assert_eq!((rep.handed_off, rep.stepped_over), (1, 1), "{rep:?}");
    assert!(rep.stepped[0].reason.contains("announced less"), "{rep:?}");
    let rid = raw_message_id(user, identity, "INBOX", 7, 1);
    assert_eq!(
        ctx.store.raw_message_delivered(rid).await.unwrap(),
        None,
        "never stored"
    );
    assert_eq!(lda.seen.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_answered_no_is_an_error_not_an_empty_mailbox() {
    let (ctx, _t, user, identity, _lda) =
        scripted_account(&unique("f12"), Script::SearchRefused).await;
    let rep = sync_once(&ctx, user, identity).await;
    assert!(!rep.ok && rep.error.contains("UID SEARCH"), "{rep:?}");
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "", "no checkpoint moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_server_keeps_refusing_is_a_failure_with_its_reason() {
    let (ctx, _t, user, identity, lda) =
        scripted_account(&unique("f13"), Script::OneMessageRefused).await;
    let rep = sync_once(&ctx, user, identity).await;
    assert_eq!((rep.handed_off, rep.failed), (1, 1), "{rep:?}");
    let f = ctx.store.message_failures(user, identity).await.unwrap();
    assert_eq!((f.len(), f[0].uid, f[0].tries), (1, 1, 1), "{f:?}");
    assert!(f[0].last_error.contains("cannot be fetched now"), "{f:?}");
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "0", "pinned before it");
    // After max_message_tries it is stepped over, and the checkpoint moves.
    sync_once(&ctx, user, identity).await;
    let rep = sync_once(&ctx, user, identity).await;
    assert_eq!(rep.stepped_over, 1, "{rep:?}");
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "2");
    assert_eq!(lda.seen.lock().unwrap().len(), 1, "UID 2 handed off once");
}

/// A server whose STATUS cannot be had: every sync opens the mailbox as
/// before, and nothing is taken as unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_status_opens_the_mailbox_as_before() {
    let (ctx, _t, user, identity, lda) =
        scripted_account(&unique("f15"), Script::StatusRefused).await;
    let rep = sync_once(&ctx, user, identity).await;
    // UID 1 is the scripted server's oversize message.
    assert_eq!((rep.handed_off, rep.stepped_over), (1, 1), "{rep:?}");
    assert_eq!(rep.folders_examined, 1, "{rep:?}");
    let rep = sync_once(&ctx, user, identity).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.folders_skipped, rep.folders_examined, rep.fetched),
        (0, 1, 0),
        "{rep:?}"
    );
    assert_eq!(lda.seen.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_syncs_every_folder_but_junk_and_trash_and_picks_up_new_ones() {
    let tag = unique("f14");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = folders_account(
        st,
        &[("INBOX", 1), ("Archive", 2), ("Junk", 3), ("Trash", 4)],
        "*",
    )
    .await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        rep.handed_off, 3,
        "INBOX and Archive, not Junk nor Trash: {rep:?}"
    );
    assert!(st
        .mailbox_checkpoint(user, id.identity_id, "Junk")
        .await
        .unwrap()
        .is_none());

    // A folder created later is picked up by the next sync.
    fill(&login, "Été", 2, 300);
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 2, "{rep:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_whose_lock_is_taken_away_stops_and_says_why() {
    let tag = unique("f15");
    let mut settings = worker_settings(&tag);
    settings.imap.lock_ttl_secs = 30;
    settings.imap.in_flight = 1;
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(500), |_| {
        false
    })
    .await;
    let (ctx, _t) = context(settings).await;
    let st = ctx.store.clone();
    let (user, _, id) = mailbox_account(&st, 60, 300).await;
    let identity = id.identity_id;
    let c = ctx.clone();
    let run = tokio::spawn(async move { sync_once(&c, user, identity).await });
    lda.wait_seen(1).await;
    // As `imapctl unlock --force` does.
    let lock = st.sync_lock(user, identity).await.unwrap().expect("held");
    assert!(st
        .force_release_sync_lock(user, identity, &lock.owner)
        .await
        .unwrap());
    let rep = run.await.unwrap();
    assert!(rep.interrupted && !rep.ok, "{rep:?}");
    assert!(rep.error.contains("lock was lost"), "{rep:?}");
    assert!(rep.handed_off < 60, "stopped before the end: {rep:?}");
    let after = st.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::LASTSEENUID),
        rep.handed_off.to_string(),
        "the checkpoint reached is saved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_stops_at_a_message_boundary_and_resumes() {
    let tag = unique("f16");
    let mut settings = worker_settings(&tag);
    settings.imap.job_deadline_secs = 5;
    settings.imap.in_flight = 1;
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(500), |_| {
        false
    })
    .await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _, id) = mailbox_account(st, 40, 300).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.interrupted && !rep.ok, "{rep:?}");
    assert!(rep.error.contains("job_deadline_secs"), "{rep:?}");
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    let cp: u64 = after.info(infos::LASTSEENUID).parse().unwrap();
    assert_eq!(cp, rep.handed_off, "checkpoint saved at the boundary");
    assert!(cp < 40);
    // The next syncs go on from there; nothing is handed off twice.
    let mut total = cp;
    for _ in 0..10 {
        let rep = sync_once(&ctx, user, id.identity_id).await;
        total += rep.handed_off;
        if rep.ok {
            break;
        }
    }
    assert_eq!(total, 40);
    assert_eq!(counts(&lda.seen).len(), 40);
    assert!(counts(&lda.seen).values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_worker_taking_the_marker_after_our_lock_makes_ours_stand_down() {
    // A Go worker that read the identity before our marker landed writes
    // its own marker later, replacing the whole infos map: here while we log in.
    let go_marker = "2026-11-26T10:00:00Z";
    let (ctx, _t, user, identity, lda) = scripted_account_with(
        &unique("f17"),
        Script::UnderReportedSize,
        |st, user, identity| {
            let hook: OnLogin = Arc::new(move || {
                let st = st.clone();
                Box::pin(async move {
                    st.remove_infos(user, identity, &[infos::SYNCING_OWNER])
                        .await
                        .unwrap();
                    st.merge_infos(
                        user,
                        identity,
                        [(infos::SYNCING.to_string(), go_marker.to_string())].into(),
                    )
                    .await
                    .unwrap();
                })
            });
            Some(hook)
        },
    )
    .await;
    let rep = sync_once(&ctx, user, identity).await;
    assert!(rep.error.contains("Go worker started a sync"), "{rep:?}");
    assert_eq!(lda.seen.lock().unwrap().len(), 0, "nothing handed off");
    let after = ctx.store.identity(user, identity).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::SYNCING),
        go_marker,
        "the Go worker's marker is left to it"
    );
    assert!(
        ctx.store.sync_lock(user, identity).await.unwrap().is_none(),
        "our lock released"
    );
}

/// A folder whose name the server sent in a form that is not valid
/// modified UTF-7 cannot be opened or stored by name: it is a visible
/// error of that folder (the row, the `--wait` result, `imapctl status`),
/// and the other folders sync on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_name_that_is_not_modified_utf7_is_a_folder_error() {
    let (ctx, _t, user, identity, lda) =
        scripted_account(&unique("f18"), Script::BadFolderName).await;
    ctx.store
        .merge_infos(
            user,
            identity,
            [(infos::MAILBOXES.to_string(), "*".to_string())].into(),
        )
        .await
        .unwrap();
    let rep = sync_once(&ctx, user, identity).await;
    assert!(!rep.ok, "{rep:?}");
    let bad: Vec<_> = rep
        .mailbox_errors
        .iter()
        .filter(|m| m.mailbox == "bad&AEE-")
        .collect();
    assert_eq!(bad.len(), 1, "{rep:?}");
    assert!(bad[0].reason.contains("modified UTF-7"), "{rep:?}");
    assert_eq!(
        lda.seen.lock().unwrap().len(),
        1,
        "INBOX synced all the same"
    );

    let rows = ctx.store.mailbox_errors(user, identity).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].mailbox, "bad&AEE-");
    let first = rows[0].first_error;
    let id = ctx.store.identity(user, identity).await.unwrap().unwrap();
    let row = caliopen_imap::ctl::status::row(&ctx.store, &ctx.settings, &id, chrono::Utc::now())
        .await
        .unwrap();
    assert!(!row.healthy, "{:?}", row.problems);
    assert_eq!(row.folder_errors[0].mailbox, "bad&AEE-");

    // The next sync lists it again: the error stays, from the same date.
    let rep = sync_once(&ctx, user, identity).await;
    assert_eq!(rep.mailbox_errors.len(), 1, "{rep:?}");
    let rows = ctx.store.mailbox_errors(user, identity).await.unwrap();
    assert_eq!((rows.len(), rows[0].first_error), (1, first), "{rows:?}");
}

/// The lock row's owner and the `syncing` marker (text, owner) as stored now.
async fn lock_and_marker(
    st: &caliopen_imap::store::Store,
    user: Uuid,
    identity: Uuid,
) -> (Option<String>, String, String) {
    let lock = st.sync_lock(user, identity).await.unwrap().map(|l| l.owner);
    let id = st.identity(user, identity).await.unwrap().unwrap();
    let (text, owner) = (id.info(infos::SYNCING), id.info(infos::SYNCING_OWNER));
    (lock, text.to_string(), owner.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_release_of_an_earlier_sync_leaves_a_later_syncs_lock_and_marker() {
    let tag = unique("f18");
    let mut settings = worker_settings(&tag);
    settings.imap.in_flight = 1;
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(300), |_| {
        false
    })
    .await;
    let (ctx, _t) = context(settings).await;
    let st = ctx.store.clone();
    let (user, login, id) = mailbox_account(&st, 1, 300).await;
    let identity = id.identity_id;

    // Sync A of this process: what it holds while it runs.
    let c = ctx.clone();
    let a = tokio::spawn(async move { sync_once(&c, user, identity).await });
    lda.wait_seen(1).await;
    let (a_lock, a_marker, a_owner) = lock_and_marker(&st, user, identity).await;
    let a_lock = a_lock.expect("sync A holds the lock");
    assert!(a.await.unwrap().ok);

    // Sync B of the same process, running.
    fill(&login, "INBOX", 20, 300);
    let c = ctx.clone();
    let b = tokio::spawn(async move { sync_once(&c, user, identity).await });
    lda.wait_seen(2).await;
    let (b_lock, b_marker, b_owner) = lock_and_marker(&st, user, identity).await;
    assert!(b_lock.is_some(), "sync B holds the lock");

    assert_ne!(
        b_lock.as_deref(),
        Some(a_lock.as_str()),
        "one owner per sync"
    );
    assert!(
        a_lock.starts_with(&format!("{}/", ctx.worker_id)),
        "named after the worker: {a_lock}"
    );

    // A's release, retried late in the background (Cassandra was away when
    // A ended), lands now.
    assert_eq!(a_owner, a_lock, "the marker names the lock's owner");
    let a_hold = SyncHold {
        key: (user, identity),
        owner: a_lock,
        marker: a_marker,
    };
    ctx.release_lock(&a_hold, true).await.unwrap();

    assert_eq!(
        lock_and_marker(&st, user, identity).await,
        (b_lock, b_marker, b_owner),
        "sync B's lock and marker are left as they were"
    );
    // A sync of another worker loses the lock race to B: its marker,
    // written before its Paxos round, stays over B's for B to clear.
    let loser = SyncingMarker::text_of(chrono::Utc::now());
    st.merge_infos(
        user,
        identity,
        SyncingMarker::entries(&loser, "another-worker/1"),
    )
    .await
    .unwrap();
    let rep = b.await.unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 20);
    assert_eq!(
        lock_and_marker(&st, user, identity).await,
        (None, String::new(), String::new()),
        "B released its lock and cleared the marker left over its own"
    );
}
