//! Folders on a real Dovecot: the `mailboxes: *` listing (special-use
//! \Junk and \Trash left out, \Noselect levels left out, names decoded),
//! and proof that mailbox names must go out in modified UTF-7.

use std::time::Duration;

use caliopen_imap::imap::{self, folders, utf7, Account, ImapError};
use caliopen_imap::shutdown::Shutdown;

use crate::util::{doveadm, imaps_server, unique};

fn account(login: &str) -> Account {
    crate::util::dovecot_account(login)
}

const IO: Duration = Duration::from_secs(30);

#[tokio::test]
async fn star_lists_selectable_folders_but_junk_and_trash() {
    let login = unique("folders");
    // Maildir++ separates levels with '.': creating "a.b" leaves "a" a
    // \Noselect level. doveadm takes UTF-8 names.
    doveadm(
        &[
            "mailbox",
            "create",
            "-u",
            &login,
            "Archive",
            "Entwürfe",
            "日本語",
            "a.b",
        ],
        None,
    );
    let (mut session, _) = imap::connect(&account(&login)).await.unwrap();

    let all = folders::list(&mut session, &imaps_server(), IO)
        .await
        .unwrap();
    let a = all
        .iter()
        .find(|f| f.wire == "a")
        .expect("the parent level");
    assert!(!a.selectable, "{a:?}");
    let junk = all.iter().find(|f| f.wire == "Junk").expect("Junk");
    assert_eq!(junk.special_use, Some(folders::SpecialUse::Junk));

    let names = folders::syncable(&mut session, &imaps_server(), IO)
        .await
        .unwrap();
    // Sent, Drafts, Trash and Junk are auto-created for every user.
    assert_eq!(
        names,
        [
            "INBOX",
            "Archive",
            "Drafts",
            "Entwürfe",
            "Sent",
            "a.b",
            "日本語"
        ]
    );
    session.logout().await.unwrap();
}

#[tokio::test]
async fn folder_names_must_be_sent_in_modified_utf7() {
    let login = unique("utf7");
    doveadm(&["mailbox", "create", "-u", &login, "Entwürfe"], None);
    let (mut session, _) = imap::connect(&account(&login)).await.unwrap();

    let raw = session.examine("Entwürfe").await;
    let err = raw
        .expect_err("the raw UTF-8 name must be refused")
        .to_string();
    assert!(err.contains("mUTF-7"), "{err}");

    let wire = utf7::encode("Entwürfe");
    assert_eq!(wire, "Entw&APw-rfe");
    let mailbox = session.examine(&wire).await.unwrap();
    assert_eq!(mailbox.exists, 0);
    session.logout().await.unwrap();
}

#[tokio::test]
async fn a_refused_command_is_an_error_not_an_empty_answer() {
    let login = unique("refused");
    doveadm(&["mailbox", "create", "-u", &login, "Archive"], None);
    let (mut session, _) = imap::connect(&account(&login)).await.unwrap();
    let server = imaps_server();
    let mut reader = imap::fetch::Reader::new(&mut session, &server, IO, Shutdown::never());
    let err = reader
        .run_checked("EXAMINE \"DoesNotExist\"", "EXAMINE", |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImapError::Protocol { during, reason, .. }
            if during == "EXAMINE" && reason.starts_with("NO ")),
        "{err}"
    );
    // The session is still usable after a NO.
    reader.run_checked("NOOP", "NOOP", |_| {}).await.unwrap();
    session.logout().await.unwrap();
}
