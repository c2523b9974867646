//! What a sync keeps per mailbox, against Dovecot: a sync of INBOX alone
//! clears only what it covered, a failure row of a message expunged since
//! is dropped, and `inbox`, `Inbox` and `INBOX` are one mailbox.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use caliopen_imap::store::identity::infos;
use caliopen_imap::store::raw_message::raw_message_id;
use caliopen_imap::worker::context::{Counters, Ctx};
use caliopen_imap::worker::job::{self, Scope, SyncRequest};
use uuid::Uuid;

use crate::util::*;

/// The sync an IDLE wake-up runs: INBOX alone (over a connection of its
/// own here, the same path otherwise).
async fn sync_inbox_only(
    ctx: &Ctx,
    user: Uuid,
    identity: Uuid,
) -> caliopen_imap::bus::wire::JobReport {
    let req = SyncRequest {
        user_id: user,
        identity_id: identity,
        password: String::new(),
    };
    let scope = Scope {
        only: Some("INBOX"),
        ..Default::default()
    };
    job::sync_scoped(ctx, req, Counters::new(), scope).await.0
}

/// The ids the processor stand-in refuses, filled once they are known.
type Refused = Arc<Mutex<HashSet<String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_of_inbox_alone_keeps_the_error_of_another_folder() {
    let settings = worker_settings(&unique("mb1"));
    let refused: Refused = Default::default();
    let r2 = refused.clone();
    let _lda = lda(&settings.lda.in_topic, move |id| {
        r2.lock().unwrap().contains(id)
    })
    .await;
    let (ctx, _t) = context(settings).await;
    let (user, login, id) =
        folders_account(&ctx.store, &[("INBOX", 1), ("Work", 1)], "INBOX,Work").await;
    let (_, _, work_v) = mailbox_status(&login, "Work");
    let bad = raw_message_id(user, id.identity_id, "Work", work_v, 1);
    refused.lock().unwrap().insert(bad.to_string());

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((rep.handed_off, rep.failed), (1, 1), "{rep:?}");
    let after = ctx.store.identity(user, id.identity_id).await.unwrap();
    let error = after.unwrap().info(infos::LAST_FETCH_ERROR).to_string();
    assert!(error.contains("not handed off"), "{error}");

    // A wake-up: INBOX alone, cleanly. Work's message still waits.
    fill(&login, "INBOX", 1, 300);
    let rep = sync_inbox_only(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 1, "{rep:?}");
    let after = ctx.store.identity(user, id.identity_id).await.unwrap();
    let after = after.unwrap();
    assert_eq!(
        after.info(infos::LAST_FETCH_ERROR),
        error,
        "an INBOX-only sync never covered Work: its error stays"
    );
    assert!(!after.info(infos::LAST_ERROR_DATE).is_empty());

    // A full sync that covers Work cleanly clears it.
    refused.lock().unwrap().clear();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    let after = ctx.store.identity(user, id.identity_id).await.unwrap();
    assert_eq!(after.unwrap().info(infos::LAST_FETCH_ERROR), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_row_of_a_message_expunged_since_is_dropped() {
    let settings = worker_settings(&unique("mb2"));
    let refused: Refused = Default::default();
    let r2 = refused.clone();
    let lda = lda(&settings.lda.in_topic, move |id| {
        r2.lock().unwrap().contains(id)
    })
    .await;
    let (ctx, _t) = context(settings).await;
    let (user, login, id) =
        folders_account(&ctx.store, &[("INBOX", 1), ("Work", 2)], "INBOX,Work").await;
    let identity = id.identity_id;
    let (_, _, work_v) = mailbox_status(&login, "Work");
    let bad = raw_message_id(user, identity, "Work", work_v, 1);
    refused.lock().unwrap().insert(bad.to_string());

    let rep = sync_once(&ctx, user, identity).await;
    assert_eq!((rep.handed_off, rep.failed), (2, 1), "{rep:?}");
    let f = ctx.store.message_failures(user, identity).await.unwrap();
    assert_eq!((f.len(), f[0].uid, f[0].stepped_over), (1, 1, false));

    // The message is deleted on the server before it could be retried.
    let out = doveadm(
        &["expunge", "-u", &login, "mailbox", "Work", "uid", "1"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rep = sync_once(&ctx, user, identity).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 0, "UID 2 was delivered already: {rep:?}");
    let f = ctx.store.message_failures(user, identity).await.unwrap();
    assert!(f.is_empty(), "the row of a message gone is dropped: {f:?}");

    // Nothing left to retry: both folders are skipped on their STATUS.
    let rep = sync_once(&ctx, user, identity).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.folders_checked, rep.folders_skipped),
        (2, 2),
        "{rep:?}"
    );
    assert_eq!(lda.seen.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_in_any_case_is_one_mailbox_for_ids_and_state() {
    let settings = worker_settings(&unique("mb3"));
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let (user, login, id) = folders_account(&ctx.store, &[("INBOX", 3)], "inbox").await;
    let identity = id.identity_id;
    let rep = sync_once(&ctx, user, identity).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.handed_off, 3, "{rep:?}");
    let (_, _, v) = mailbox_status(&login, "INBOX");
    let expected: HashSet<String> = (1..=3)
        .map(|uid| raw_message_id(user, identity, "INBOX", v, uid).to_string())
        .collect();
    let seen: HashSet<String> = lda.seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(seen, expected, "ids of `inbox` are those of INBOX");

    // A crash before the checkpoint was saved: the next sync, an IDLE
    // wake-up of INBOX, must find the messages delivered.
    ctx.store
        .remove_infos(user, identity, &[infos::LASTSEENUID])
        .await
        .unwrap();
    let rep = sync_inbox_only(&ctx, user, identity).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.handed_off, rep.already_delivered),
        (0, 3),
        "nothing handed off twice: {rep:?}"
    );
    assert_eq!(lda.seen.lock().unwrap().len(), 3);
}
