//! Cheap resync against Dovecot: unchanged folders are skipped on their
//! LIST-STATUS answer without EXAMINE, a changed one is opened and only its
//! new mail fetched, and QRESYNC's flag changes and expunges are recorded
//! without fetching a body.

use std::collections::HashSet;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_folders_are_skipped_on_status_and_only_the_changed_one_is_examined() {
    let tag = unique("rs1");
    let settings = worker_settings(&tag);
    let lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = folders_account(
        st,
        &[("INBOX", 2), ("Archive", 2), ("Work", 1), ("Lists", 1)],
        "*",
    )
    .await;

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched, 6);
    // INBOX, Archive, Drafts, Lists, Sent, Work (Junk and Trash left out).
    assert_eq!(rep.folders_checked, 6, "{rep:?}");
    assert_eq!(rep.folders_examined, 6, "a first sync opens every folder");
    println!("first sync: {} IMAP commands", rep.imap_commands);

    // Nothing changed: no EXAMINE at all.
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (
            rep.folders_checked,
            rep.folders_skipped,
            rep.folders_examined
        ),
        (6, 6, 0),
        "{rep:?}"
    );
    assert_eq!(rep.fetched, 0);
    println!(
        "no-change resync of 6 folders: {} IMAP commands",
        rep.imap_commands
    );

    // New mail in one folder: that folder only is opened, its new message
    // only is fetched.
    fill(&login, "Archive", 1, 300);
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.folders_skipped, rep.folders_examined),
        (5, 1),
        "{rep:?}"
    );
    assert_eq!((rep.fetched, rep.handed_off), (1, 1), "{rep:?}");
    lda.wait_seen(7).await;
    let seen: HashSet<String> = lda.seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(seen.len(), 7, "nothing handed off twice");
    let archive = st
        .mailbox_checkpoint(user, id.identity_id, "Archive")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(archive.lastseenuid, 3);

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((rep.folders_skipped, rep.folders_examined), (6, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_folder_list_is_checked_in_one_command_and_a_new_generation_is_not_skipped() {
    let tag = unique("rs2");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = folders_account(
        st,
        &[("INBOX", 1), ("Work", 1), ("Entwürfe", 1)],
        "INBOX,Work,Entwürfe",
    )
    .await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched, 3);

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.folders_skipped, rep.folders_examined),
        (3, 0),
        "{rep:?}"
    );
    println!(
        "no-change resync of 3 listed folders: {} IMAP commands",
        rep.imap_commands
    );

    // Work recreated with the same number of messages: another
    // UIDVALIDITY, so it is opened and fetched again.
    doveadm(&["mailbox", "delete", "-u", &login, "Work"], None);
    fill(&login, "Work", 1, 300);
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.folders_skipped, rep.folders_examined),
        (2, 1),
        "{rep:?}"
    );
    assert_eq!(rep.fetched, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qresync_records_a_flag_change_and_an_expunge_without_fetching_a_body() {
    let tag = unique("rs3");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = mailbox_account(st, 3, 300).await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched, 3);
    let (_, _, uidvalidity) = mailbox_status(&login, "INBOX");

    doveadm(
        &[
            "flags",
            "add",
            "-u",
            &login,
            "\\Flagged",
            "mailbox",
            "INBOX",
            "uid",
            "1",
        ],
        None,
    );
    doveadm(
        &["expunge", "-u", &login, "mailbox", "INBOX", "uid", "2"],
        None,
    );

    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.folders_examined, 1, "{rep:?}");
    assert_eq!(
        rep.fetched, 0,
        "a flag change or an expunge fetches no body"
    );
    assert_eq!(rep.changes_recorded, 2, "{rep:?}");

    let mut changes = st.message_changes(user, id.identity_id).await.unwrap();
    changes.sort_by_key(|c| c.uid);
    assert_eq!(changes.len(), 2, "{changes:?}");
    let (flagged, gone) = (&changes[0], &changes[1]);
    assert_eq!(
        (
            flagged.mailbox.as_str(),
            flagged.uidvalidity,
            flagged.uid,
            flagged.expunged
        ),
        ("INBOX", uidvalidity, 1, false)
    );
    assert!(
        flagged.flags.split(' ').any(|f| f == "\\Flagged"),
        "{flagged:?}"
    );
    assert!(flagged.modseq.is_some());
    assert_eq!((gone.uid, gone.expunged), (2, true), "{gone:?}");

    // Recorded once: the next sync has nothing to open.
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        (rep.folders_examined, rep.changes_recorded),
        (0, 0),
        "{rep:?}"
    );
}

/// Both ways of asking, against Dovecot: one LIST-STATUS for a list of
/// names, and STATUS one by one (a server without LIST-STATUS); a missing
/// folder is absent from either answer, never an error.
#[tokio::test]
async fn status_one_by_one_and_in_one_list_answer_the_same() {
    use caliopen_imap::imap::{self, fetch::Reader, status};
    use caliopen_imap::shutdown::Shutdown;

    let login = unique("rs4");
    fill(&login, "INBOX", 2, 200);
    fill(&login, "Entwürfe", 1, 200);
    let acc = dovecot_account(&login);
    // More than one pipelined group of STATUS commands (50 a group).
    let many: Vec<String> = (0..60).map(|i| format!("g{i:02}")).collect();
    let mut args = vec!["mailbox", "create", "-u", &login];
    args.extend(many.iter().map(String::as_str));
    doveadm(&args, None);
    let (mut session, conn) = imap::connect(&acc).await.unwrap();
    assert!(conn.caps.list_status && conn.caps.condstore && conn.caps.qresync);
    let mut names: Vec<String> = ["INBOX", "Entwürfe", "Missing"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.extend(many);
    let server = imaps_server();
    let mut reader = Reader::new(&mut session, &server, acc.io_timeout, Shutdown::never());
    let listed = status::statuses(&mut reader, conn.caps, &names)
        .await
        .unwrap();
    let mut plain = conn.caps;
    plain.list_status = false;
    let one_by_one = status::statuses(&mut reader, plain, &names).await.unwrap();
    assert_eq!(listed, one_by_one);
    assert_eq!(listed.len(), 62, "{listed:?}");
    // The session is in step after a pipeline with a NO in it.
    reader.run_checked("NOOP", "NOOP", |_| {}).await.unwrap();
    let inbox = listed["INBOX"];
    let (messages, uidnext, uidvalidity) = mailbox_status(&login, "INBOX");
    assert_eq!(
        (inbox.messages, inbox.uidnext, inbox.uidvalidity),
        (Some(messages), Some(uidnext), Some(uidvalidity))
    );
    assert!(inbox.highestmodseq.is_some());
    assert_eq!(listed["Entwürfe"].messages, Some(1));
    session.logout().await.unwrap();
}

/// The benchmark goal: a no-change resync of 200 folders in a few round
/// trips (`make bench` measures its time; here only the commands count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_folders_resync_without_a_change_in_a_few_commands() {
    let tag = unique("rs5");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = folders_account(st, &[("INBOX", 1)], "*").await;
    let names: Vec<String> = (0..196).map(|i| format!("f{i:03}")).collect();
    let mut args = vec!["mailbox", "create", "-u", &login];
    args.extend(names.iter().map(String::as_str));
    doveadm(&args, None);
    for name in names.iter().step_by(20) {
        fill(&login, name, 1, 200);
    }
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert!(rep.ok, "{rep:?}");
    // 196 + INBOX, Drafts, Sent (Junk and Trash left out).
    assert_eq!(rep.folders_checked, 199, "{rep:?}");
    println!(
        "first sync of 199 folders: {} IMAP commands",
        rep.imap_commands
    );
    let started = std::time::Instant::now();
    let rep = sync_once(&ctx, user, id.identity_id).await;
    // Printed before the checks, so a build without the skip measures too.
    println!(
        "no-change resync of 199 folders: {} IMAP commands, {} EXAMINE, {:?}",
        rep.imap_commands,
        rep.folders_examined,
        started.elapsed()
    );
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.folders_skipped, rep.folders_examined), (199, 0));
    assert!(rep.imap_commands <= 5, "{rep:?}");
}

/// Mail deleted before a sync saw it (a server-side filter, another
/// client) leaves UIDNEXT above the checkpoint for good; the folder is
/// still skipped once a clean sync has seen that UIDNEXT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_whose_newest_mail_went_unseen_is_skipped_after_one_sync() {
    let tag = unique("rs6");
    let settings = worker_settings(&tag);
    let _lda = lda(&settings.lda.in_topic, |_| false).await;
    let (ctx, _t) = context(settings).await;
    let st = &ctx.store;
    let (user, login, id) = folders_account(st, &[("INBOX", 3)], "INBOX").await;
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!((rep.ok, rep.fetched), (true, 3), "{rep:?}");

    // UID 4 comes and goes between two syncs.
    fill(&login, "INBOX", 1, 200);
    doveadm(
        &["expunge", "-u", &login, "mailbox", "INBOX", "uid", "4"],
        None,
    );
    // UIDNEXT moved: the folder is opened once, and nothing is there.
    let rep = sync_once(&ctx, user, id.identity_id).await;
    assert_eq!(
        (rep.ok, rep.folders_examined, rep.fetched),
        (true, 1, 0),
        "{rep:?}"
    );
    // From then on nothing changed, though UIDNEXT (5) stays past the
    // checkpoint's last UID + 1 (4).
    for _ in 0..2 {
        let rep = sync_once(&ctx, user, id.identity_id).await;
        assert!(rep.ok, "{rep:?}");
        assert_eq!(
            (rep.folders_skipped, rep.folders_examined, rep.fetched),
            (1, 0, 0),
            "{rep:?}"
        );
    }
}
