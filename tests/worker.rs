//! The worker against Dovecot, Cassandra and NATS: what lands, what is
//! retried, what is never doubled. The processor downstream is a stand-in
//! (`util::lda`).

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use caliopen_imap::bus::wire::{ImapOrder, JobReport};
use caliopen_imap::store::identity::infos;
use caliopen_imap::store::raw_message::raw_message_id;
use uuid::Uuid;

use crate::util::*;

/// Raw message ids stored for `user` (via user_raw_lookup).
async fn stored_ids(
    st: &caliopen_imap::store::Store,
    user: Uuid,
    identity: Uuid,
    uidvalidity: u32,
    uids: &[u32],
) -> Vec<(u32, Option<bool>)> {
    let mut out = Vec::new();
    for uid in uids {
        let id = raw_message_id(user, identity, "INBOX", uidvalidity, *uid);
        out.push((*uid, st.raw_message_delivered(id).await.unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sync_then_nothing_then_only_new() {
    let tag = unique("w1");
    let settings = worker_settings(&tag);
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    let bodies = fill(&login, "INBOX", 12, 3000);
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.fetched, rep.handed_off, rep.failed), (12, 12, 0));
    assert_eq!(lda.seen.lock().unwrap().len(), 12);

    let (_, uidnext, uidvalidity) = mailbox_status(&login, "INBOX");
    let uids: Vec<u32> = (1..uidnext).collect();
    for (uid, delivered) in stored_ids(st, user, id.identity_id, uidvalidity, &uids).await {
        assert_eq!(delivered, Some(true), "uid {uid}");
    }
    // Bytes: our headers, then the message exactly as Dovecot holds it.
    let raw = st
        .raw_message_data(raw_message_id(
            user,
            id.identity_id,
            "INBOX",
            uidvalidity,
            3,
        ))
        .await
        .unwrap()
        .unwrap();
    let body = &bodies[2];
    assert!(raw.ends_with(body), "body not byte-exact");
    let head = String::from_utf8(raw[..raw.len() - body.len()].to_vec()).unwrap();
    assert!(
        head.starts_with(&format!(
            "X-Fetched-Imap: from {} ([127.0.0.1:{}])\n        (using tls1.",
            imaps_server(),
            stack().imaps_port
        )),
        "{head}"
    );
    assert!(head.contains("        by imap-fetcher (Caliopen) with IMAP4rev1 protocol;\n        "));
    assert!(head.contains(&format!("\r\nX-Fetched-Imap-Account: Display {login}\r\n")));
    assert!(head.contains("\r\nX-Fetched-Imap-Box: SU5CT1g=\r\n"));
    assert!(head.contains(&format!("\r\nX-Fetched-Imap-For: {user}\r\n")));
    assert!(head.contains("\r\nX-Fetched-Imap-Uid: 3\r\n"));
    assert!(head.ends_with("\r\n"));

    // State written back the Caliopen way.
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::UIDVALIDITY), uidvalidity.to_string());
    assert_eq!(after.info(infos::LASTSEENUID), (uidnext - 1).to_string());
    assert!(!after.info(infos::LASTSYNC).is_empty());
    assert_eq!(after.info(infos::SYNCING), "", "lock marker released");
    assert!(after.last_check.is_some());

    // Nothing new: nothing fetched.
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched, 0);

    // New mail: only the new messages.
    fill(&login, "INBOX", 3, 500);
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.fetched, rep.handed_off), (3, 3));
    assert_eq!(lda.seen.lock().unwrap().len(), 15);
    let seen: HashSet<String> = lda.seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(seen.len(), 15, "no message handed off twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_change_refetches_without_duplicates() {
    let tag = unique("w2");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 4, 800).await;
    assert!(sync_once(&ctx, user, id.identity_id).await.ok);
    let (_, _, v1) = mailbox_status(&login, "INBOX");

    doveadm(
        &[
            "mailbox",
            "update",
            "-u",
            &login,
            "--uid-validity",
            &(v1 + 1000).to_string(),
            "INBOX",
        ],
        None,
    );
    let (_, _, v2) = mailbox_status(&login, "INBOX");
    assert_ne!(v1, v2);

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched, 4, "whole mailbox fetched again");
    // New ids for the new generation; the old rows are untouched, and a
    // third sync adds nothing.
    for (_, d) in stored_ids(st, user, id.identity_id, v2, &[1, 2, 3, 4]).await {
        assert_eq!(d, Some(true));
    }
    for (_, d) in stored_ids(st, user, id.identity_id, v1, &[1, 2, 3, 4]).await {
        assert_eq!(d, Some(true));
    }
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!(rep.fetched, 0);
    assert_eq!(
        st.raw_message_ids_of(user).await.unwrap().len(),
        8,
        "4 per generation, no duplicate"
    );
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::UIDVALIDITY), v2.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_hand_off_is_retried_and_nothing_after_it_is_lost() {
    let tag = unique("w3");
    let settings = worker_settings(&tag);
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 8, 600).await;
    let (_, _, v) = mailbox_status(&login, "INBOX");
    let k = raw_message_id(user, id.identity_id, "INBOX", v, 3).to_string();

    // The processor fails message 3 only.
    let kk = k.clone();
    let lda1 = lda(&settings.lda.in_topic, move |m| m == kk).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep.ok);
    assert_eq!((rep.fetched, rep.handed_off, rep.failed), (8, 7, 1));
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::LASTSEENUID),
        "2",
        "checkpoint stops before the failed message"
    );
    drop(lda1);

    // Next sync: the processor is fine again; 3 goes through, 4..8 are not
    // handed off twice.
    let lda2 = lda(&settings.lda.in_topic, |_| false).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 1);
    assert_eq!(rep.already_delivered, 5);
    assert_eq!(lda2.seen.lock().unwrap().as_slice(), &[k]);
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "8");
    for (uid, d) in stored_ids(st, user, id.identity_id, v, &[1, 2, 3, 4, 5, 6, 7, 8]).await {
        assert_eq!(d, Some(true), "uid {uid}");
    }
    assert!(st
        .message_failures(user, id.identity_id)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_is_stepped_over_and_listed() {
    let tag = unique("w4");
    let mut settings = worker_settings(&tag);
    settings.imap.max_message_tries = 2;
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 3, 600).await;
    let (_, _, v) = mailbox_status(&login, "INBOX");
    let bad = raw_message_id(user, id.identity_id, "INBOX", v, 2).to_string();
    let _lda = lda(&settings.lda.in_topic, move |m| m == bad).await;

    let r1 = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((r1.failed, r1.stepped_over), (1, 0));
    let r2 = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((r2.failed, r2.stepped_over), (0, 1), "{r2:?}");
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(
        after.info(infos::LASTSEENUID),
        "3",
        "stepped over only after max tries"
    );
    let f = st.message_failures(user, id.identity_id).await.unwrap();
    assert_eq!(f.len(), 1);
    assert!(f[0].stepped_over && f[0].uid == 2 && f[0].tries == 2);
    assert!(f[0].last_error.contains("chosen failure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_race_and_exactly_one_syncs() {
    let tag = unique("w5");
    let settings = worker_settings(&tag);
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(20), |_| false).await;
    let (a, _ta) = context(settings.clone()).await;
    let (b, _tb) = context(settings).await;
    let (user, _, id) = mailbox_account(&a.store, 10, 500).await;
    let (ra, rb) = tokio::join!(
        sync_once(&a, user, id.identity_id),
        sync_once(&b, user, id.identity_id)
    );
    let skipped = [&ra, &rb]
        .iter()
        .filter(|r| r.error.starts_with("skipped"))
        .count();
    assert_eq!(skipped, 1, "{ra:?} {rb:?}");
    assert_eq!(ra.fetched + rb.fetched, 10);
    assert_eq!(lda.seen.lock().unwrap().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_updates_the_error_counters() {
    let tag = unique("w6");
    let settings = worker_settings(&tag);
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let id = new_identity(st, user, &unique("dove"), &imaps_server(), "wrong-password").await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep.ok);
    assert!(rep.error.contains("refused"), "{}", rep.error);
    let rep2 = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep2.ok);
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::ERRORS_COUNT), "2");
    assert!(after.info(infos::LAST_FETCH_ERROR).contains("refused"));
    assert!(!after.info(infos::FIRST_ERROR_DATE).is_empty());
    assert!(!after.info(infos::LAST_ERROR_DATE).is_empty());
    assert_eq!(after.status, "active", "not yet 72 h");
    assert_eq!(after.info(infos::SYNCING), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_for_too_long_disables_the_identity() {
    use futures::StreamExt;
    let tag = unique("w7");
    let settings = worker_settings(&tag);
    let (ctx, _t) = context(settings.clone()).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let id = new_identity(st, user, &unique("dove"), &imaps_server(), "wrong-password").await;
    let first = (chrono::Utc::now() - chrono::Duration::hours(73)).to_rfc3339();
    st.merge_infos(
        user,
        id.identity_id,
        [(infos::FIRST_ERROR_DATE.to_string(), first)].into(),
    )
    .await
    .unwrap();
    let mut cache = ctx
        .bus
        .subscribe(&settings.nats_topic_poller_cache)
        .await
        .unwrap();
    ctx.bus.flush().await.unwrap();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep.ok);
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.status, "inactive");
    let msg = tokio::time::timeout(Duration::from_secs(5), cache.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["order"], "delete");
    assert_eq!(v["identity_id"], id.identity_id.to_string());
    assert_eq!(v["protocol"], "email");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_is_a_clear_error_without_fallback() {
    let tag = unique("w8");
    let mut settings = worker_settings(&tag);
    settings.imap.ca_file = String::new();
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let id = new_identity(
        st,
        user,
        &unique("dove"),
        &imaps_server(),
        &stack().password,
    )
    .await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(!rep.ok);
    assert!(rep.error.contains("TLS"), "{}", rep.error);
    assert!(
        rep.error.contains("not trusted") || rep.error.contains("UnknownIssuer"),
        "{}",
        rep.error
    );
    assert_eq!(rep.fetched, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_pinned_certificate() {
    let tag = unique("w9");
    let mut settings = worker_settings(&tag);
    settings.imap.ca_file = String::new();
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 2, 300);
    // Pin the server certificate instead of trusting a CA.
    let pem = std::fs::read_to_string(
        std::path::Path::new(&stack().ca_file).with_file_name("server.pem"),
    )
    .unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let pin: String = ring::digest::digest(&ring::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let server = format!("{}:{}", stack().imap_host, stack().starttls_port);
    let id = new_identity(st, user, &login, &server, &stack().password).await;
    st.merge_infos(
        user,
        id.identity_id,
        [
            (infos::SECURITY.to_string(), "starttls".to_string()),
            (infos::CERT_SHA256.to_string(), pin),
        ]
        .into(),
    )
    .await
    .unwrap();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_neither_fatal_nor_silently_lost() {
    let tag = unique("w10");
    let mut settings = worker_settings(&tag);
    settings.imap.max_message_tries = 1;
    // Below the 30 MiB message (the default, 64 MiB, would accept it).
    settings.imap.max_message_size = 20 * 1024 * 1024;
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 1, 200);
    fill(&login, "INBOX", 1, 30 * 1024 * 1024);
    fill(&login, "INBOX", 1, 200);
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    // The large one is refused from its announced size, never downloaded.
    assert_eq!(
        (rep.fetched, rep.handed_off, rep.stepped_over),
        (2, 2, 1),
        "{rep:?}"
    );
    assert_eq!(lda.seen.lock().unwrap().len(), 2);
    let f = st.message_failures(user, id.identity_id).await.unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].uid, 2);
    assert!(
        f[0].last_error.contains("exceeds imap.max_message_size"),
        "{}",
        f[0].last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_only_mode_needs_no_processor() {
    let tag = unique("w11");
    let mut settings = worker_settings(&tag);
    settings.lda.in_topic = String::new();
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 5, 400).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 5);
    let (_, _, v) = mailbox_status(&login, "INBOX");
    for (_, d) in stored_ids(st, user, id.identity_id, v, &[1, 2, 3, 4, 5]).await {
        assert_eq!(d, Some(true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_mailboxes_keep_inbox_state_where_caliopen_reads_it() {
    let tag = unique("w12");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 2, 300);
    fill(&login, "Sent", 3, 300);
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;
    st.merge_infos(
        user,
        id.identity_id,
        [(infos::MAILBOXES.to_string(), "INBOX,Sent".to_string())].into(),
    )
    .await
    .unwrap();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched, 5);
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.info(infos::LASTSEENUID), "2");
    let sent = st
        .mailbox_checkpoint(user, id.identity_id, "Sent")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sent.lastseenuid, 3);
    assert_eq!(sync_once(&ctx, user, id.identity_id).await.fetched, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_over_nats_and_bad_input_never_kill_the_worker() {
    let tag = unique("w13");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let w = start_worker(settings.clone()).await;
    let b = bus().await;
    let subject = &settings.nats_topic_sender;
    let t = Duration::from_secs(10);

    let bad = b.request_raw(subject, "{not json".into(), t).await.unwrap();
    let rep: JobReport = serde_json::from_slice(&bad.payload).unwrap();
    assert!(!rep.ok && rep.error.contains("unmarshal"), "{rep:?}");

    let o = ImapOrder {
        order: "sync".into(),
        user_id: "nope".into(),
        identity_id: Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let rep: JobReport = b.request(subject, &o, t).await.unwrap();
    assert!(rep.error.contains("user_id is not a UUID"), "{rep:?}");

    let o = ImapOrder {
        order: "sync".into(),
        user_id: Uuid::new_v4().to_string(),
        identity_id: Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let rep: JobReport = b.request(subject, &o, t).await.unwrap();
    assert!(rep.error.contains("no identity"), "{rep:?}");

    let o = ImapOrder {
        order: "dance".into(),
        ..Default::default()
    };
    let rep: JobReport = b.request(subject, &o, t).await.unwrap();
    assert!(rep.error.contains("unknown order"), "{rep:?}");

    let o = ImapOrder {
        order: "deliver".into(),
        message_id: Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let rep: serde_json::Value = b.request(subject, &o, t).await.unwrap();
    assert_eq!(rep["error"], true);
    assert!(rep["message"]
        .as_str()
        .unwrap()
        .starts_with("failed to handle order with error « "));

    // Still alive, and a real fullfetch goes through.
    let o = ImapOrder {
        order: "test".into(),
        ..Default::default()
    };
    let rep: JobReport = b.request(subject, &o, t).await.unwrap();
    assert!(rep.ok);

    let (user, _) = new_user(&w.ctx.store).await;
    let login = unique("dove");
    fill(&login, "Archive", 3, 300);
    let o = ImapOrder {
        order: "fullfetch".into(),
        user_id: user.to_string(),
        login: login.clone(),
        password: stack().password.clone(),
        server: imaps_server(),
        mailbox: "Archive".into(),
        ..Default::default()
    };
    let rep: JobReport = b
        .request(subject, &o, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 3);
    // A fullfetch again: same ids, nothing doubled, nothing handed off twice.
    let rep: JobReport = b
        .request(subject, &o, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!((rep.handed_off, rep.already_delivered), (0, 3), "{rep:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_sync_then_restart_resumes_from_the_checkpoint() {
    use std::process::{Command, Stdio};
    let tag = unique("w14");
    let cfg = worker_yaml(&tag, "  checkpoint_every: 5\n  in_flight: 4\n");
    let settings = worker_settings(&tag);
    // A slow processor, so the sync is still running when SIGTERM comes.
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(40), |_| false).await;
    let st = store().await;
    let (user, _) = new_user(&st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 120, 300);
    let id = new_identity(&st, user, &login, &imaps_server(), &stack().password).await;

    let mut worker = Command::new(bin())
        .args(["worker", "-c", cfg.to_str().unwrap(), "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let order = ImapOrder {
        order: "sync".into(),
        user_id: user.to_string(),
        identity_id: id.identity_id.to_string(),
        ..Default::default()
    };
    wait_until_worker_answers(&settings.nats_topic_sender, &mut worker).await;
    // As a request: the worker's report must say the sync was cut short.
    let pending = {
        let (b, subject, order) = (
            bus().await,
            settings.nats_topic_sender.clone(),
            order.clone(),
        );
        tokio::spawn(async move {
            b.request::<_, JobReport>(&subject, &order, Duration::from_secs(120))
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(60), lda.wait_seen(30))
        .await
        .expect("sync did not progress");
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let code = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(code.code(), Some(0), "clean exit on SIGTERM");
    let rep = pending.await.unwrap().expect("the report of the cut sync");
    assert!(
        rep.interrupted && !rep.ok,
        "reported as interrupted: {rep:?}"
    );
    assert!(rep.error.contains("shutting down"), "{rep:?}");

    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    let cp: u32 = after.info(infos::LASTSEENUID).parse().unwrap();
    assert!((25..120).contains(&cp), "checkpoint {cp} saved mid-way");
    assert_eq!(after.info(infos::SYNCING), "", "lock marker released");
    assert!(
        st.take_sync_lock(user, id.identity_id, "probe", chrono::Utc::now(), 60)
            .await
            .unwrap(),
        "lock released"
    );
    st.release_sync_lock(user, id.identity_id, "probe")
        .await
        .unwrap();

    // Restart: it goes on from the checkpoint, and ends with every message
    // stored once.
    let (ctx, _t) = context(settings).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched as u32, 120 - cp, "resumed after the checkpoint");
    let ids = st.raw_message_ids_of(user).await.unwrap();
    assert_eq!(ids.len(), 120);
    let unique_seen: HashSet<String> = lda.seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(unique_seen.len(), 120);
}

/// A stand-in for an OAuth provider's token endpoint (outside this
/// project): it answers one refresh with `at-2`/`rt-2`, chunked, and hands
/// over the request it got. Returns its port.
async fn token_endpoint() -> (u16, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("client_secret") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"access_token":"at-2","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-2"}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        let _ = tx.send(String::from_utf8_lossy(&got).to_string());
    });
    (port, rx)
}

/// Settings whose provider `testprov` refreshes tokens at `port`.
fn with_token_endpoint(
    mut settings: caliopen_imap::config::WorkerSettings,
    port: u16,
) -> caliopen_imap::config::WorkerSettings {
    settings.imap.allow_plaintext_loopback = true;
    settings.lda.providers = vec![caliopen_imap::config::Provider {
        name: "testprov".into(),
        protocol: "email".into(),
        infos: [
            ("client_id".to_string(), "cid".to_string()),
            ("client_secret".to_string(), "c s".to_string()),
            (
                "token_url".to_string(),
                format!("http://127.0.0.1:{port}/token"),
            ),
        ]
        .into(),
    }];
    settings
}

/// Make `identity` an Oauth2 one of provider `testprov`, its token expired.
async fn expired_oauth2(st: &caliopen_imap::store::Store, user: Uuid, identity: Uuid) {
    st.merge_infos(
        user,
        identity,
        [
            (infos::AUTHTYPE.to_string(), "Oauth2".to_string()),
            (infos::PROVIDER.to_string(), "testprov".to_string()),
        ]
        .into(),
    )
    .await
    .unwrap();
    st.merge_credentials(
        user,
        identity,
        [
            ("username".to_string(), "someone".to_string()),
            ("oauth2accesstoken".to_string(), "at-1".to_string()),
            ("oauh2refreshtoken".to_string(), "rt-1".to_string()),
            (
                "tokenexpiry".to_string(),
                "2020-01-01T00:00:00Z".to_string(),
            ),
        ]
        .into(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_oauth2_token_is_refreshed_and_stored() {
    let (port, rx) = token_endpoint().await;
    let tag = unique("w15");
    let settings = with_token_endpoint(worker_settings(&tag), port);
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let id = new_identity(st, user, &unique("dove"), &imaps_server(), "").await;
    expired_oauth2(st, user, id.identity_id).await;

    let rep = sync_once(&ctx, user, id.identity_id).await;
    let request = rx.await.unwrap();
    assert!(request.starts_with("POST /token HTTP/1.1\r\n"), "{request}");
    assert!(
        request.contains(
            "grant_type=refresh_token&refresh_token=rt-1&client_id=cid&client_secret=c%20s"
        ),
        "{request}"
    );
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.credentials["oauth2accesstoken"], "at-2");
    assert_eq!(after.credentials["oauh2refreshtoken"], "rt-2");
    assert_eq!(after.credentials["tokentype"], "Bearer");
    let exp = chrono::DateTime::parse_from_rfc3339(&after.credentials["tokenexpiry"]).unwrap();
    assert!(exp > chrono::Utc::now());
    // This Dovecot offers no XOAUTH2: the login itself is refused, and said so.
    assert!(!rep.ok);
    assert!(rep.error.contains("refused"), "{}", rep.error);
}

/// A deliberately broken IMAP server on loopback (plaintext, allowed for
/// loopback only): it sends `greeting`, then `answer` to everything it
/// reads, and hangs up at once when `answer` is empty.
async fn hostile_server(greeting: &'static [u8], answer: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || answer.is_empty() {
                        break;
                    }
                    let _ = s.write_all(answer).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_servers_are_recorded_on_the_identity_and_never_crash_the_worker() {
    let tag = unique("w16");
    let mut settings = worker_settings(&tag);
    settings.imap.allow_plaintext_loopback = true;
    settings.imap.io_timeout_secs = 2;
    settings.imap.connect_timeout_secs = 2;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    // A BYE at the greeting, or a hang-up at LOGIN, is the server turning
    // us away (throttling): recorded, never counted against the account
    // (see tests/polite.rs).
    let cases: [(&'static [u8], &'static [u8], &str); 4] = [
        (b"\x00\xffgarbage that is not IMAP\r\n", b"", "1"),
        (b"* OK ready\r\n", b"", ""), // hangs up at the first command
        (
            b"* OK ready\r\n",
            b"* 1 FETCH (BODY[] {99999999999999}\r\n",
            "1",
        ),
        (b"* BYE go away\r\n", b"", ""),
    ];
    for (greeting, answer, counted) in cases {
        let port = hostile_server(greeting, answer).await;
        let id = new_identity(st, user, &unique("h"), &format!("127.0.0.1:{port}"), "pw").await;
        st.merge_infos(
            user,
            id.identity_id,
            [(infos::SECURITY.to_string(), "plain".to_string())].into(),
        )
        .await
        .unwrap();
        let rep = sync_once(&ctx, user, id.identity_id).await;
        assert!(!rep.ok, "{rep:?}");
        assert!(!rep.error.is_empty());
        let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
        assert!(
            !after.info(infos::LAST_FETCH_ERROR).is_empty(),
            "error recorded"
        );
        assert_eq!(after.info(infos::ERRORS_COUNT), counted, "{rep:?}");
        assert_eq!(after.info(infos::SYNCING), "", "lock released");
    }
    // Plaintext is refused when not allowed, before any byte is exchanged.
    let (strict, _t2) = context(worker_settings(&unique("w16s"))).await;
    let port = hostile_server(b"* OK ready\r\n", b"").await;
    let id = new_identity(st, user, &unique("h"), &format!("127.0.0.1:{port}"), "pw").await;
    st.merge_infos(
        user,
        id.identity_id,
        [(infos::SECURITY.to_string(), "plain".to_string())].into(),
    )
    .await
    .unwrap();
    let rep = sync_once(&strict, user, id.identity_id).await;
    assert!(
        rep.error.contains("plaintext IMAP is allowed only"),
        "{}",
        rep.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_sends_then_files_the_message_in_the_remote_sent_mailbox() {
    use futures::StreamExt;
    let tag = unique("w17");
    let settings = worker_settings(&tag);
    let w = start_worker(settings.clone()).await;
    let st = &w.ctx.store;
    let (user, login, id) = mailbox_account(st, 0, 0).await;
    // A stand-in for Caliopen's SMTP sender (outside this project).
    let smtp = async_nats::connect(&stack().nats_url).await.unwrap();
    let mut sub = smtp
        .subscribe(settings.lda.out_topic.clone())
        .await
        .unwrap();
    smtp.flush().await.unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<serde_json::Value>(4);
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let _ = seen_tx
                .send(serde_json::from_slice(&m.payload).unwrap())
                .await;
            if let Some(r) = m.reply {
                let _ = smtp
                    .publish(
                        r,
                        br#"{"error":false,"message":"sent by stand-in"}"#.to_vec().into(),
                    )
                    .await;
            }
        }
    });

    let raw_id = Uuid::new_v4();
    let message_id = Uuid::new_v4();
    let draft = message(1, 400);
    st.insert_raw_message(user, raw_id, draft.clone())
        .await
        .unwrap();
    st.insert_message(user, message_id, raw_id, chrono::Utc::now())
        .await
        .unwrap();

    let b = bus().await;
    let order = serde_json::json!({"order": "deliver", "user_id": user.to_string(), "identity_id": id.identity_id.to_string(), "message_id": message_id.to_string()});
    let reply: serde_json::Value = b
        .request(&settings.nats_topic_sender, &order, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"error": false, "message": "sent by stand-in"})
    );
    let forwarded = seen_rx.recv().await.unwrap();
    assert_eq!(forwarded["message_id"], message_id.to_string());

    let (count, _, _) = mailbox_status(&login, "Sent");
    assert_eq!(count, 1, "filed in Sent");
    let flags = text(
        &doveadm(
            &[
                "-f", "flow", "fetch", "-u", &login, "flags", "mailbox", "Sent",
            ],
            None,
        )
        .stdout,
    );
    assert!(flags.contains("\\Seen"), "{flags}");

    // An unknown message: the contract's failure reply.
    let order = serde_json::json!({"order": "deliver", "user_id": user.to_string(), "identity_id": id.identity_id.to_string(), "message_id": Uuid::new_v4().to_string()});
    let reply: serde_json::Value = b
        .request(&settings.nats_topic_sender, &order, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(reply["error"], true);
    assert!(
        reply["message"].as_str().unwrap().contains("no message"),
        "{reply}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_show_a_password_or_a_token() {
    use std::process::{Command, Stdio};
    let tag = unique("w18");
    let cfg = worker_yaml(&tag, "");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let st = store().await;
    // A password login...
    let (user, _login, id) = mailbox_account(&st, 2, 300).await;
    // ...and an XOAUTH2 one with a known token (this Dovecot refuses it,
    // after it was sent).
    let token = format!("tok-{}", Uuid::new_v4().simple());
    let oauth = new_identity(&st, user, &unique("dove"), &imaps_server(), "").await;
    st.merge_infos(
        user,
        oauth.identity_id,
        [(infos::AUTHTYPE.to_string(), "Oauth2".to_string())].into(),
    )
    .await
    .unwrap();
    st.merge_credentials(
        user,
        oauth.identity_id,
        [
            ("username".to_string(), "someone".to_string()),
            ("oauth2accesstoken".to_string(), token.clone()),
        ]
        .into(),
    )
    .await
    .unwrap();

    let log_path = std::env::temp_dir().join(format!("{tag}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut worker = Command::new(bin())
        .args(["worker", "-c", cfg.to_str().unwrap(), "start"])
        .env("CALIOPEN_IMAP_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let b = bus().await;
    wait_until_worker_answers(&settings.nats_topic_sender, &mut worker).await;
    for (identity, password) in [
        (id.identity_id, stack().password.clone()),
        (oauth.identity_id, String::new()),
    ] {
        // The password also rides in the order, over NATS.
        let order = ImapOrder {
            order: "sync".into(),
            user_id: user.to_string(),
            identity_id: identity.to_string(),
            password,
            ..Default::default()
        };
        let rep: JobReport = b
            .request(&settings.nats_topic_sender, &order, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(rep.ok, identity == id.identity_id, "{rep:?}");
    }
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();

    let logged = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(logged.contains("TRACE"), "trace logging was on");
    let sasl = base64::engine::general_purpose::STANDARD
        .encode(format!("user=someone\x01auth=Bearer {token}\x01\x01"));
    for secret in [stack().password.as_str(), token.as_str(), sasl.as_str()] {
        assert!(
            !logged.contains(secret),
            "a secret is in the trace logs ({} bytes of logs)",
            logged.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_goes_through_while_a_slow_sync_holds_every_slot() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tag = unique("w19");
    let mut settings = worker_settings(&tag);
    settings.workers = 1;
    settings.imap.in_flight = 1;
    // A slow processor: the sync holds the only job slot for a while.
    let lda = lda_with_delay(&settings.lda.in_topic, Duration::from_millis(300), |_| {
        false
    })
    .await;
    let w = start_worker(settings.clone()).await;
    let st = w.ctx.store.clone();
    let (user, login, id) = mailbox_account(&st, 30, 300).await;
    smtp_sender_standin(&settings.lda.out_topic).await;
    let message_id = outgoing_message(&st, user).await;

    let b = bus().await;
    let sync_ended = std::sync::Arc::new(AtomicBool::new(false));
    let sync = {
        let (b, ended, subject) = (
            b.clone(),
            sync_ended.clone(),
            settings.nats_topic_sender.clone(),
        );
        let order = ImapOrder {
            order: "sync".into(),
            user_id: user.to_string(),
            identity_id: id.identity_id.to_string(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let rep: JobReport = b
                .request(&subject, &order, Duration::from_secs(120))
                .await
                .unwrap();
            ended.store(true, Ordering::SeqCst);
            rep
        })
    };
    lda.wait_seen(2).await;
    let order = serde_json::json!({"order": "deliver", "user_id": user.to_string(), "identity_id": id.identity_id.to_string(), "message_id": message_id.to_string()});
    let reply: serde_json::Value = b
        .request(&settings.nats_topic_sender, &order, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(reply["error"], false, "{reply}");
    assert!(
        !sync_ended.load(Ordering::SeqCst),
        "the deliver was answered only after the sync had ended"
    );
    assert_eq!(mailbox_status(&login, "Sent").0, 1, "filed in Sent");
    let rep = sync.await.unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 30);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_refreshes_an_expired_oauth2_token_before_filing_in_sent() {
    let (port, rx) = token_endpoint().await;
    let tag = unique("w20");
    let settings = with_token_endpoint(worker_settings(&tag), port);
    let w = start_worker(settings.clone()).await;
    let st = w.ctx.store.clone();
    let (user, _login, id) = mailbox_account(&st, 0, 0).await;
    expired_oauth2(&st, user, id.identity_id).await;
    smtp_sender_standin(&settings.lda.out_topic).await;
    let message_id = outgoing_message(&st, user).await;
    let order = serde_json::json!({"order": "deliver", "user_id": user.to_string(), "identity_id": id.identity_id.to_string(), "message_id": message_id.to_string()});
    let reply: serde_json::Value = bus()
        .await
        .request(&settings.nats_topic_sender, &order, Duration::from_secs(30))
        .await
        .unwrap();
    // Asked before the answer came; the bound only keeps a failure from hanging.
    let request = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the token endpoint was never asked")
        .unwrap();
    assert!(request.contains("refresh_token=rt-1"), "{request}");
    let after = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(after.credentials["oauth2accesstoken"], "at-2");
    // This Dovecot offers no XOAUTH2: the login with the new token is
    // refused, and said so.
    assert_eq!(reply["error"], true, "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("refused"),
        "{reply}"
    );
    w.stop().await;
}

/// Keywords reach Caliopen as the Go worker wrote them: lowercased by
/// go-imap's `CanonicalFlag`, system flags in their RFC spelling, in the
/// order the server listed them (issue 15, item 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywords_are_stored_lowercase_as_the_go_worker_did() {
    let tag = unique("kw");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, _) = new_user(st).await;
    let login = unique("dove");
    fill(&login, "INBOX", 1, 200);
    doveadm(
        &[
            "flags",
            "add",
            "-u",
            &login,
            "$Label1 $Forwarded NonJunk $MDNSent \\Seen",
            "mailbox",
            "INBOX",
            "uid",
            "1",
        ],
        None,
    );
    let id = new_identity(st, user, &login, &imaps_server(), &stack().password).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    let (_, _, uidvalidity) = mailbox_status(&login, "INBOX");
    let raw = st
        .raw_message_data(raw_message_id(
            user,
            id.identity_id,
            "INBOX",
            uidvalidity,
            1,
        ))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let b64 = raw
        .split("\r\n")
        .find_map(|l| l.strip_prefix("X-Fetched-Imap-Flags: "))
        .unwrap_or_else(|| panic!("no flags header in {raw}"));
    let flags = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let flags = String::from_utf8(flags).unwrap();
    // `\Recent` depends on which session saw the message first: not ours
    // to pin. The rest is Dovecot's order (system flags, then keywords as
    // registered), spelled as go-imap spelled it.
    let got = flags.replace("\\Recent\r\n", "");
    assert_eq!(
        got, "\\Seen\r\n$label1\r\n$forwarded\r\nnonjunk\r\n$mdnsent",
        "header {b64}"
    );
}

/// A `need_job` the poller does not answer waits its 5 s timeout; the
/// worker keeps reading orders meanwhile (issue 21, item 3). A poller
/// stand-in holds the worker's first pull unanswered; an order sent then
/// is answered; only then does the stand-in answer the pull, with a job,
/// and the worker runs it: the pull was still waiting. Had the pull held
/// up the order loop, the order's answer would have come after the pull's
/// timeout, and the job, answered too late, would never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_job_pull_does_not_hold_up_the_orders() {
    use caliopen_imap::bus::wire::Job;
    use futures::StreamExt;
    let tag = unique("w21");
    let settings = worker_settings(&tag);
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let st = store().await;
    let (user, _login, id) = mailbox_account(&st, 2, 300).await;
    // A poller stand-in that answers nothing until told.
    let poller = async_nats::connect(&stack().nats_url).await.unwrap();
    let mut pulls = poller
        .subscribe(settings.nats_topic_poller.clone())
        .await
        .unwrap();
    poller.flush().await.unwrap();
    // The worker pulls as it starts (a free slot, no throttle yet).
    let w = start_worker(settings.clone()).await;
    let pull = tokio::time::timeout(Duration::from_secs(30), pulls.next())
        .await
        .expect("the worker never pulled a job")
        .unwrap();
    let pull_reply = pull.reply.expect("need_job is a request");

    let test = ImapOrder {
        order: "test".into(),
        user_id: user.to_string(),
        ..Default::default()
    };
    let rep: JobReport = bus()
        .await
        .request(&settings.nats_topic_sender, &test, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(rep.ok, "{rep:?}");

    let job = Job {
        message_id: String::new(),
        order: "sync".into(),
        identity_id: id.identity_id.to_string(),
        user_id: user.to_string(),
    };
    poller
        .publish(pull_reply, serde_json::to_vec(&job).unwrap().into())
        .await
        .unwrap();
    poller.flush().await.unwrap();
    // The bound only keeps a failure from hanging.
    tokio::time::timeout(Duration::from_secs(60), lda.wait_seen(2))
        .await
        .expect("the pulled job never ran: the order was read only after the pull gave up");
    w.stop().await;
}

/// The SMTP sender sent the message, then filing it in Sent failed (here:
/// the remote login is refused): the requester gets an error and sends the
/// order again. The retry must not send the message a second time: it only
/// files it, and answers with the sender's first reply. A third order,
/// once all is done, does nothing again (issue 21, item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_deliver_never_sends_the_message_twice() {
    use caliopen_imap::store::identity::creds;
    let tag = unique("w22");
    let settings = worker_settings(&tag);
    let w = start_worker(settings.clone()).await;
    let st = w.ctx.store.clone();
    let (user, login, id) = mailbox_account(&st, 0, 0).await;
    let sends = smtp_sender_standin(&settings.lda.out_topic).await;
    let message_id = outgoing_message(&st, user).await;
    let set_password = |p: &str| {
        let st = st.clone();
        let p = p.to_string();
        async move {
            st.merge_credentials(
                user,
                id.identity_id,
                [(creds::PASSWORD_IN.to_string(), p)].into(),
            )
            .await
            .unwrap()
        }
    };
    let b = bus().await;
    let order = serde_json::json!({"order": "deliver", "user_id": user.to_string(), "identity_id": id.identity_id.to_string(), "message_id": message_id.to_string()});
    let deliver = || async {
        b.request::<_, serde_json::Value>(
            &settings.nats_topic_sender,
            &order,
            Duration::from_secs(30),
        )
        .await
        .unwrap()
    };

    set_password("not-the-password").await;
    let reply = deliver().await;
    assert_eq!(reply["error"], true, "{reply}");
    assert_eq!(sends.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(mailbox_status(&login, "Sent").0, 0);

    set_password(&stack().password).await;
    let reply = deliver().await;
    assert_eq!(
        reply,
        serde_json::json!({"error": false, "message": "sent #1"}),
        "the retry answers with the first send's reply"
    );
    assert_eq!(
        sends.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the retry sent the message again"
    );
    assert_eq!(mailbox_status(&login, "Sent").0, 1, "filed in Sent");

    let reply = deliver().await;
    assert_eq!(reply["error"], false, "{reply}");
    assert_eq!(sends.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(mailbox_status(&login, "Sent").0, 1, "filed once");
    w.stop().await;
}

/// A message Caliopen would hand to `deliver`: its raw row and its message
/// row; its message id.
async fn outgoing_message(st: &caliopen_imap::store::Store, user: Uuid) -> Uuid {
    let (raw_id, message_id) = (Uuid::new_v4(), Uuid::new_v4());
    st.insert_raw_message(user, raw_id, message(1, 400))
        .await
        .unwrap();
    st.insert_message(user, message_id, raw_id, chrono::Utc::now())
        .await
        .unwrap();
    message_id
}
