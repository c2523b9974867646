//! One executable, three programs: by symlink name or by first argument.

use std::process::Command;

use crate::util::{run, symlink, text};

#[test]
fn ctl_help_by_symlink_and_by_subcommand() {
    let link = symlink("imapctl");
    let out = Command::new(&link).arg("--help").output().unwrap();
    assert!(out.status.success());
    let by_link = text(&out.stdout);
    for cmd in [
        "addremote",
        "syncremote",
        "fullfetch",
        "listremotes",
        "removeremote",
    ] {
        assert!(
            by_link.contains(cmd),
            "imapctl --help lacks {cmd}: {by_link}"
        );
    }
    assert!(by_link.starts_with("Usage: imapctl"));

    let out = run(&["ctl", "--help"], &[]);
    assert!(out.status.success());
    let by_sub = text(&out.stdout);
    assert!(by_sub.contains("syncremote"));
    assert!(by_sub.starts_with("Usage: caliopen-imap ctl"));
}

#[test]
fn worker_and_poller_by_symlink() {
    for (name, word) in [("imapworker", "start"), ("idpoller", "start")] {
        let out = Command::new(symlink(name)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name} --help");
        assert!(text(&out.stdout).contains(word));
    }
}

#[test]
fn unknown_mode_or_command_exits_2() {
    let out = run(&["nonsense"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown mode"));

    let out = run(&[], &[]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["ctl", "frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(symlink("imapworker")).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a mode without command is a usage error"
    );
}

#[test]
fn version_everywhere() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("caliopen-imap "));
    let out = Command::new(symlink("idpoller"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("idpoller "));
}

#[test]
fn go_style_equals_flags_are_accepted() {
    // cobra accepted --flag=value; a malformed UUID proves the value arrived.
    let out = run(&["ctl", "listremotes", "--userid=not-a-uuid"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not-a-uuid"),
        "{}",
        text(&out.stderr)
    );
}
