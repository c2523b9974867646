//! Live sync: IDLE sessions and their leases, against the real Dovecot.
//!
//! These tests opt identities in (`infos.idle = true`) in the shared
//! keyspace, where any worker with `imap.idle: identity` would see them:
//! they run one at a time, and every other test's worker has live sync off.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caliopen_imap::config::IdleMode;
use caliopen_imap::imap;
use caliopen_imap::metrics::Outcome;
use caliopen_imap::store::identity::infos;
use caliopen_imap::store::Store;
use caliopen_imap::worker::idle::assign::{assign, Member};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::sync_faults::{scripted_server, Script};
use crate::util::*;

/// One live-sync test at a time (see the module doc).
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Long enough for a real connection and a first sync on a busy machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// Opts an identity in to IDLE, and out again however the test ends.
struct OptedIn {
    user: Uuid,
    identity: Uuid,
}

impl OptedIn {
    async fn new(store: &Store, user: Uuid, identity: Uuid) -> OptedIn {
        store
            .merge_infos(
                user,
                identity,
                [(infos::IDLE.to_string(), "true".to_string())].into(),
            )
            .await
            .unwrap();
        OptedIn { user, identity }
    }
}

impl Drop for OptedIn {
    fn drop(&mut self) {
        // No runtime to lean on in Drop: cqlsh, synchronously.
        cql_exec(&format!(
            "UPDATE caliopen.user_identity SET infos['idle'] = 'false' \
             WHERE user_id = {} AND identity_id = {}",
            self.user, self.identity
        ));
    }
}

/// A worker process, killed with SIGKILL however the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn live_settings(tag: &str) -> caliopen_imap::config::WorkerSettings {
    let mut s = worker_settings(tag);
    s.imap.idle = IdleMode::Identity;
    s.imap.idle_lease_secs = 6;
    // IDLE left and entered again every 2 s: mail announced while that
    // happens must not be missed.
    s.imap.idle_renew_secs = 2;
    s
}

/// Append one message to `login`'s INBOX over IMAP, as a mail client would.
async fn append(login: &str, n: usize) {
    append_to(login, "INBOX", n).await
}

/// Append one message to `folder` of `login` over IMAP (a user's filter
/// files mail there).
async fn append_to(login: &str, folder: &str, n: usize) {
    let acc = dovecot_account(login);
    let (mut session, _) = imap::connect(&acc).await.expect("log in to append");
    session
        .append(folder, None, None, message(n, 200))
        .await
        .expect("APPEND");
    let _ = session.logout().await;
}

/// Create `folder` of `login` over IMAP, as a mail client would.
async fn create(login: &str, folder: &str) {
    let acc = dovecot_account(login);
    let (mut session, _) = imap::connect(&acc).await.expect("log in to create");
    session.create(folder).await.expect("CREATE");
    let _ = session.logout().await;
}

/// Sync `mailboxes` of the identity (`*`: every folder but Junk and Trash).
async fn sync_mailboxes(store: &Store, user: Uuid, identity: Uuid, mailboxes: &str) {
    store
        .merge_infos(
            user,
            identity,
            [(infos::MAILBOXES.to_string(), mailboxes.to_string())].into(),
        )
        .await
        .unwrap();
}

/// The sessions `worker` held at its last round, as its membership row
/// says (`None`: no row, the worker is gone).
async fn held_by(store: &Store, worker: &str) -> Option<u32> {
    store
        .idle_workers()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.worker == worker)
        .map(|w| w.held)
}

/// Wait until `worker`'s membership row says it holds `n` sessions.
async fn until_held(store: &Store, worker: &str, n: u32) {
    within("the membership row's count", async {
        while held_by(store, worker).await != Some(n) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// Wait until the in-process worker `w` holds `n` sessions.
async fn until_sessions(w: &WorkerHandle, n: i64) {
    within("the worker's sessions", async {
        while w.ctx.metrics.idle_sessions.get() != n {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// An identity syncing every folder (`mailboxes: *`), with one message in
/// INBOX and `folder` created if given, opted in; a worker holding its
/// session, once its first sync handed that message to the processor
/// stand-in. Returns the worker, the stand-in and the Dovecot login.
async fn every_folder_watched(
    store: &Store,
    prefix: &str,
    folder: Option<&str>,
) -> (WorkerHandle, Lda, String, OptedIn) {
    let tag = unique(prefix);
    let (user, login, id) = mailbox_account(store, 1, 300).await;
    if let Some(f) = folder {
        fill(&login, f, 0, 300);
    }
    sync_mailboxes(store, user, id.identity_id, "*").await;
    let opted = OptedIn::new(store, user, id.identity_id).await;
    let lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let w = start_worker(live_settings(&tag)).await;
    within("the first sync", lda.wait_seen(1)).await;
    (w, lda, login, opted)
}

/// Wait until `w` has ended at least `n` syncs well and runs none.
async fn syncs_over(w: &WorkerHandle, n: u64) {
    let m = &w.ctx.metrics;
    let ok = || {
        m.syncs_ended
            .get_or_create(&Outcome { outcome: "ok" })
            .get()
    };
    while ok() < n || m.syncs_started.get() > ok() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn within<F: std::future::Future<Output = T>, T>(what: &str, f: F) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {PATIENCE:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_reaches_the_processor_with_no_sync_order() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idle");
    let (user, login, id) = mailbox_account(&store, 2, 300).await;
    let _opted = OptedIn::new(&store, user, id.identity_id).await;
    let lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;

    let w = start_worker(live_settings(&tag)).await;
    // The session's first sync: what was there before anyone watched.
    within("the first sync", lda.wait_seen(2)).await;
    append(&login, 3).await;
    within("the appended message", lda.wait_seen(3)).await;

    // It came through an IDLE wake-up: no order was ever sent.
    assert!(w.ctx.metrics.idle_wakeups.get() >= 1);
    assert_eq!(w.ctx.metrics.idle_sessions.get(), 1);
    until_held(&store, &w.ctx.worker_id, 1).await;
    let (messages, uidnext, _) = mailbox_status(&login, "INBOX");
    assert_eq!((messages, uidnext), (3, 4));
    within("the checkpoint moving on", async {
        while store
            .identity(user, id.identity_id)
            .await
            .unwrap()
            .unwrap()
            .lastseenuid()
            != 3
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let me = w.ctx.worker_id.clone();
    w.stop().await;
    // A clean stop deletes the membership row: the others take over at once.
    assert_eq!(held_by(&store, &me).await, None);
}

/// With NOTIFY (the stack's Dovecot offers it), mail filed into a folder
/// other than INBOX is synced when the server announces it, over the same
/// one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mail_appended_to_another_folder_reaches_the_processor_with_no_sync_order() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let (w, lda, login, _opted) = every_folder_watched(&store, "idlenotify", Some("Filed")).await;
    append_to(&login, "Filed", 2).await;
    within("the message appended to Filed", lda.wait_seen(2)).await;
    append(&login, 3).await;
    within("the message appended to INBOX", lda.wait_seen(3)).await;
    append_to(&login, "Filed", 4).await;
    within("a second message appended to Filed", lda.wait_seen(4)).await;
    assert!(w.ctx.metrics.idle_wakeups.get() >= 3);
    w.stop().await;
    assert_eq!(
        lda.seen.lock().unwrap().len(),
        4,
        "nothing handed off twice"
    );
}

/// A session opening syncs each folder once. Opening a folder for the
/// first time can make the server create it (Dovecot's auto-subscribed
/// `Sent` exists on disk only once opened) and announce so with a
/// `* LIST`: that is the sync's own doing, not a change to sync again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_syncs_each_folder_once_when_it_opens() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let (w, lda, login, _opted) = every_folder_watched(&store, "idleonce", None).await;
    within("the first sync's end", syncs_over(&w, 1)).await;
    append(&login, 2).await;
    within("the appended message", lda.wait_seen(2)).await;
    within("its sync's end", syncs_over(&w, 2)).await;
    let started = w.ctx.metrics.syncs_started.get();
    w.stop().await;
    assert_eq!(
        started, 2,
        "one sync of every folder, then INBOX's for the new mail"
    );
}

/// A folder created while the session is open is watched too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_folder_created_while_the_session_is_open_is_watched() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let (w, lda, login, _opted) = every_folder_watched(&store, "idlecreate", None).await;
    create(&login, "Later").await;
    append_to(&login, "Later", 2).await;
    within("the message appended to the new folder", lda.wait_seen(2)).await;
    append_to(&login, "Later", 3).await;
    within("the next one", lda.wait_seen(3)).await;
    w.stop().await;
    assert_eq!(
        lda.seen.lock().unwrap().len(),
        3,
        "nothing handed off twice"
    );
}

/// Mail that arrives while a push sync runs, announced by the server only
/// inside that sync's FETCH answer (`* 2 EXISTS`) and never again at the
/// next IDLE, is synced before the session goes back to IDLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mail_announced_during_a_push_sync_is_synced_before_idle_again() {
    use std::sync::atomic::Ordering::SeqCst;
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idlerace");
    let mut settings = live_settings(&tag);
    settings.imap.allow_plaintext_loopback = true;
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (port, server) = scripted_server(Script::NewMailDuringFetch, None).await;
    let (user, _) = new_user(&store).await;
    let id = scripted_identity(&store, user, Uuid::new_v4(), port).await;
    let _opted = OptedIn::new(&store, user, id.identity_id).await;

    let w = start_worker(settings).await;
    // The session's first sync fetches UID 1, and UID 2 arrives meanwhile;
    // wait for the session to be back in IDLE after that.
    within("IDLE after the new mail arrived", async {
        while server.idles_after_arrival.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let seen = lda.seen.lock().unwrap().len();
    w.stop().await;
    assert_eq!(
        seen, 2,
        "UID 2, announced inside the FETCH answer, handed off before IDLE again"
    );
}

/// A live session whose server answers its login with load backs that
/// server off as any job does: counted by reason, and no connection to it
/// before the backoff ends (the scripted server standing in for a
/// throttling provider).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_live_session_backs_its_server_off() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idlethrottle");
    let mut settings = live_settings(&tag);
    settings.imap.allow_plaintext_loopback = true;
    let (port, seen) = scripted_server(Script::LoginThrottled, None).await;
    let (user, _) = new_user(&store).await;
    let id = scripted_identity(&store, user, Uuid::new_v4(), port).await;
    let server = format!("127.0.0.1:{port}");
    let _opted = OptedIn::new(&store, user, id.identity_id).await;

    let w = start_worker(settings).await;
    within("the server backed off", async {
        while w.ctx.hosts.waiting(&server, Instant::now()).is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let logins = seen.logins.load(std::sync::atomic::Ordering::SeqCst);
    let text = w.ctx.metrics.encode();
    w.stop().await;
    assert_eq!(logins, 1, "one login, then the backoff");
    assert!(
        text.contains("caliopen_imap_throttled_total{reason=\"throttled\"} 1"),
        "{text}"
    );
}

/// A server that offers IDLE but not NOTIFY (the scripted server standing
/// in for one) is watched as before: IDLE on INBOX, whatever `mailboxes`
/// says, and no NOTIFY sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_without_notify_is_watched_with_idle_on_inbox() {
    use std::sync::atomic::Ordering::SeqCst;
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idlenonotify");
    let mut settings = live_settings(&tag);
    settings.imap.allow_plaintext_loopback = true;
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (port, server) = scripted_server(Script::NewMailDuringFetch, None).await;
    let (user, _) = new_user(&store).await;
    let id = new_identity(
        &store,
        user,
        &unique("s"),
        &format!("127.0.0.1:{port}"),
        "pw",
    )
    .await;
    store
        .merge_infos(
            user,
            id.identity_id,
            [
                (infos::SECURITY.to_string(), "plain".to_string()),
                (infos::MAILBOXES.to_string(), "*".to_string()),
            ]
            .into(),
        )
        .await
        .unwrap();
    let _opted = OptedIn::new(&store, user, id.identity_id).await;

    let w = start_worker(settings).await;
    within("INBOX synced, then IDLE", async {
        while server.idles_after_arrival.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let seen = lda.seen.lock().unwrap().len();
    w.stop().await;
    assert_eq!(seen, 2, "INBOX's two messages handed off");
    assert_eq!(server.notifies.load(SeqCst), 0, "no NOTIFY sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_idle_holder_is_replaced_by_another_worker() {
    killed_holder_is_replaced("INBOX").await
}

/// The same with mail filed into another folder (NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_notify_holder_is_replaced_with_nothing_lost_in_another_folder() {
    killed_holder_is_replaced("Filed").await
}

/// Kill -9 the worker holding the session; another takes it over and
/// hands off what is appended to `folder` afterwards, once.
async fn killed_holder_is_replaced(folder: &str) {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idlekill");
    let (user, login, id) = mailbox_account(&store, 1, 300).await;
    if folder != "INBOX" {
        fill(&login, folder, 0, 300);
        sync_mailboxes(&store, user, id.identity_id, "*").await;
    }
    let _opted = OptedIn::new(&store, user, id.identity_id).await;
    let lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;

    // The first holder: a worker process, killed with SIGKILL below.
    let cfg = worker_yaml(&tag, "  idle: identity\n  idle_lease_secs: 6\n");
    let mut first = Killed(
        Command::new(bin())
            .args(["worker", "-c", cfg.to_str().unwrap(), "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    within("the first worker's sync", lda.wait_seen(1)).await;
    let pid = format!("-{}-", first.0.id());
    let first_id = within("the first worker's membership row", async {
        loop {
            let rows = store.idle_workers().await.unwrap();
            if let Some(w) = rows.iter().find(|w| w.worker.contains(&pid) && w.held == 1) {
                return w.worker.clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;

    // A second worker comes up while the first holds the session, named so
    // that the rule leaves the identity with the first: it leaves it alone
    // while the first is alive, then takes it once the first is dead.
    let key = (user, id.identity_id);
    let second_id = (0..)
        .map(|i| format!("{tag}-second-{i}"))
        .find(|cand| {
            let ms = [
                Member {
                    worker: first_id.clone(),
                    budget: 1000,
                },
                Member {
                    worker: cand.clone(),
                    budget: 1000,
                },
            ];
            assign(&ms, &[key]) == vec![Some(0)]
        })
        .unwrap();
    let second = start_worker_named(live_settings(&tag), &second_id).await;
    let rounds = second.ctx.metrics.idle_rounds.get();
    within("three rounds of the second worker", async {
        while second.ctx.metrics.idle_rounds.get() < rounds + 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(second.ctx.metrics.idle_sessions.get(), 0);
    assert_eq!(held_by(&store, &first_id).await, Some(1));
    first.0.kill().unwrap();
    let _ = first.0.wait();
    until_sessions(&second, 1).await;

    append_to(&login, folder, 2).await;
    within("the message appended after the kill", lda.wait_seen(2)).await;
    assert_eq!(
        lda.seen.lock().unwrap().len(),
        2,
        "nothing handed off twice"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_idle_session_is_opened_again() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idlekick");
    let (user, login, id) = mailbox_account(&store, 1, 300).await;
    let _opted = OptedIn::new(&store, user, id.identity_id).await;
    let lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let w = start_worker(live_settings(&tag)).await;
    within("the first sync", lda.wait_seen(1)).await;

    // The server drops every session of the user, ours included.
    doveadm(&["kick", &login], None);
    append(&login, 2).await;
    within("the message appended after the kick", lda.wait_seen(2)).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_a_worker_spreads_the_sessions() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idlespread");
    let mut opted = Vec::new();
    for _ in 0..4 {
        let (user, _, id) = mailbox_account(&store, 1, 100).await;
        opted.push(OptedIn::new(&store, user, id.identity_id).await);
    }
    let _lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let first = start_worker(live_settings(&tag)).await;
    until_sessions(&first, 4).await;
    let second = start_worker(live_settings(&tag)).await;
    within("two each", async {
        loop {
            let a = first.ctx.metrics.idle_sessions.get();
            let b = second.ctx.metrics.idle_sessions.get();
            if (a, b) == (2, 2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    // And their rows say so.
    until_held(&store, &first.ctx.worker_id, 2).await;
    until_held(&store, &second.ctx.worker_id, 2).await;
    second.stop().await;
    first.stop().await;
}

/// A session dropped on the way (a NAT forgetting it) is noticed by TCP
/// keepalive within minutes, not at the next re-IDLE: every IMAP socket has
/// it on, over implicit TLS and STARTTLS alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_imap_connection_has_tcp_keepalive() {
    let login = unique("keepalive");
    let tls = dovecot_account(&login);
    let mut starttls = tls.clone();
    starttls.server = format!("{}:{}", stack().imap_host, stack().starttls_port);
    starttls.security = imap::Security::StartTls;
    for acc in [tls, starttls] {
        let (mut session, _) = imap::connect(&acc).await.expect("log in");
        let ka = session
            .get_ref()
            .keepalive()
            .expect("socket options readable")
            .unwrap_or_else(|| panic!("no SO_KEEPALIVE on {:?}", acc.security));
        // A dead peer is noticed within a couple of minutes.
        assert!(ka.idle <= Duration::from_secs(60), "{ka:?}");
        assert!(ka.probes >= 1, "{ka:?}");
        assert!(
            ka.idle + ka.interval * ka.probes <= Duration::from_secs(150),
            "{ka:?}"
        );
        let _ = session.logout().await;
    }
}

/// Issue 25: at rest, what live sync asks of Cassandra each round is a
/// couple of statements for the whole worker (its membership row), not one
/// Paxos round per session held. Counted over rounds with no read of the
/// identities wanting IDLE among them (that read is counted apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_rest_live_sync_costs_a_few_statements_a_round_whatever_the_sessions() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = store().await;
    let tag = unique("idlecost");
    let mut opted = Vec::new();
    for _ in 0..4 {
        let (user, _, id) = mailbox_account(&store, 1, 100).await;
        opted.push(OptedIn::new(&store, user, id.identity_id).await);
    }
    let lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;
    let w = start_worker(live_settings(&tag)).await;
    let m = w.ctx.metrics.clone();
    within("four sessions and their first syncs", async {
        while m.idle_sessions.get() < 4 || lda.seen.lock().unwrap().len() < 4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let wait_rounds = |from: u64, n: u64| {
        let m = m.clone();
        async move {
            while m.idle_rounds.get() < from + n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (rounds, statements, lwts) = within("a window of rounds with no rescan", async {
        loop {
            // At rest: no sync running (a first sync's lock release is a
            // lightweight transaction of its own) nor started meanwhile.
            let (j0, busy) = (m.syncs_started.get(), m.jobs_in_flight.get());
            let (r0, s0, l0, x0) = (
                m.idle_rounds.get(),
                w.ctx.store.statements(),
                w.ctx.store.lwts(),
                m.idle_rescans.get(),
            );
            wait_rounds(r0, 5).await;
            let (r1, s1, l1) = (
                m.idle_rounds.get(),
                w.ctx.store.statements(),
                w.ctx.store.lwts(),
            );
            // A rescan running at the end of the window ends before the next round.
            wait_rounds(r1, 1).await;
            let quiet = busy == 0 && m.jobs_in_flight.get() == 0 && m.syncs_started.get() == j0;
            if quiet && m.idle_rescans.get() == x0 && m.idle_sessions.get() == 4 {
                return (r1 - r0, s1 - s0, l1 - l0);
            }
        }
    })
    .await;
    w.stop().await;
    assert_eq!(lwts, 0, "no Paxos round at rest ({rounds} rounds)");
    // A round that had begun when the window opened is counted in part.
    assert!(
        statements <= 2 * (rounds + 1),
        "{statements} statements in {rounds} rounds holding 4 sessions"
    );
}
