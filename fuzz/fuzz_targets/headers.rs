//! The X-Fetched headers from arbitrary fields (display names, server
//! names, flags and labels come from users and remote servers). Must never
//! panic, and must never let a value start a header of its own: the output
//! is exactly the X-Fetched-* lines, each folded only by LF + spaces.
#![no_main]

use arbitrary::Arbitrary;
use caliopen_imap::imap::headers::{write, FetchedMeta};
use caliopen_imap::imap::ConnInfo;
use chrono::{DateTime, FixedOffset};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    server: String,
    remote_addr: String,
    tls_version: String,
    cipher: String,
    imap4rev1: bool,
    gmail: bool,
    account: String,
    mailbox: String,
    user_id: String,
    uid: u32,
    flags: Vec<String>,
    gmail_msgid: Option<u64>,
    gmail_labels: Vec<String>,
    secs: i64,
    offset: i32,
}

fuzz_target!(|i: Input| {
    let conn = ConnInfo {
        remote_addr: i.remote_addr,
        tls_version: i.tls_version,
        cipher: i.cipher,
        imap4rev1: i.imap4rev1,
        gmail: i.gmail,
    };
    let zone = FixedOffset::east_opt(i.offset % 86_400).unwrap();
    let Some(date) = DateTime::from_timestamp(i.secs, 0) else {
        return;
    };
    let meta = FetchedMeta {
        server: &i.server,
        conn: &conn,
        account: &i.account,
        mailbox: &i.mailbox,
        user_id: &i.user_id,
        uid: i.uid,
        flags: &i.flags,
        gmail_msgid: i.gmail_msgid,
        gmail_labels: &i.gmail_labels,
        date: date.with_timezone(&zone),
    };
    let mut out = Vec::new();
    write(&meta, &mut out);
    assert!(out.ends_with(b"\r\n"));
    let text = &out[..out.len() - 2];
    for line in text.split(|&b| b == b'\n') {
        // A line is either a header's own CRLF-ended first line or a fold.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            line.starts_with(b"X-Fetched-") || line.starts_with(b" ") || line.starts_with(b"\t"),
            "a value started a line of its own: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            !line.contains(&b'\r'),
            "stray CR: {:?}",
            String::from_utf8_lossy(line)
        );
    }
});
