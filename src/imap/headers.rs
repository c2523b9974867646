//! The `X-Fetched-*` headers prepended to every fetched message
//! (CONTRACT §4), in the byte format of Caliopen's Go worker: `Name: value`
//! lines ending in CRLF, the `X-Fetched-Imap` value folded with a bare LF and
//! eight spaces (the Go source used a raw string literal), dates in RFC 1123
//! with a numeric zone, mailbox names, flags and Gmail labels in base64.
//! Flags are spelled as go-imap spelled them (keywords lowercased); Gmail
//! labels are passed through as the server sent them, as the Go worker did.
//! Unlike the Go map, the order of the headers is fixed, so the same message
//! always gives the same bytes (apart from the fetch date).
//! Unlike the Go worker, a free-text value holding CR or LF is put on one
//! line, so no value can add a header of its own to the stored message.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, FixedOffset};

use super::ConnInfo;

/// What the headers say about one message.
#[derive(Debug, Clone)]
pub struct FetchedMeta<'a> {
    /// `inserver` as configured.
    pub server: &'a str,
    pub conn: &'a ConnInfo,
    /// The identity's display name.
    pub account: &'a str,
    pub mailbox: &'a str,
    pub user_id: &'a str,
    pub uid: u32,
    pub flags: &'a [String],
    pub gmail_msgid: Option<u64>,
    pub gmail_labels: &'a [String],
    pub date: DateTime<FixedOffset>,
}

/// Go's `time.RFC1123Z`: `Mon, 02 Jan 2006 15:04:05 -0700`.
pub fn rfc1123z(date: &DateTime<FixedOffset>) -> String {
    date.format("%a, %d %b %Y %H:%M:%S %z").to_string()
}

/// A free-text value with CR and LF turned into spaces: display names and
/// server names come from users and remote servers, and a line break in one
/// would start a header of its own (a forged `Bcc:`, say) in the stored
/// message. Values without them, all real ones, are unchanged.
fn one_line(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\r', '\n']) {
        value.replace(['\r', '\n'], " ").into()
    } else {
        value.into()
    }
}

/// Write the headers; the raw message is appended after them unchanged.
pub fn write(meta: &FetchedMeta<'_>, out: &mut Vec<u8>) {
    let proto = if meta.conn.imap4rev1 {
        "with IMAP4rev1 protocol"
    } else {
        ""
    };
    let line = |out: &mut Vec<u8>, name: &str, value: &str| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    line(
        out,
        "X-Fetched-Imap",
        &format!(
            "from {} ([{}])\n        (using {} with cipher {})\n        by imap-fetcher (Caliopen) {};\n        {}",
            one_line(meta.server),
            one_line(&meta.conn.remote_addr),
            one_line(&meta.conn.tls_version),
            one_line(&meta.conn.cipher),
            proto,
            rfc1123z(&meta.date)
        ),
    );
    line(out, "X-Fetched-Imap-Account", &one_line(meta.account));
    line(out, "X-Fetched-Imap-Box", &STANDARD.encode(meta.mailbox));
    line(out, "X-Fetched-Imap-For", &one_line(meta.user_id));
    line(out, "X-Fetched-Imap-Uid", &meta.uid.to_string());
    if !meta.flags.is_empty() {
        line(
            out,
            "X-Fetched-Imap-Flags",
            &STANDARD.encode(meta.flags.join("\r\n")),
        );
    }
    if meta.conn.gmail {
        if let Some(id) = meta.gmail_msgid {
            line(out, "X-Fetched-X-GM-MSGID", &id.to_string());
        }
        if !meta.gmail_labels.is_empty() {
            line(
                out,
                "X-Fetched-X-GM-LABELS",
                &STANDARD.encode(meta.gmail_labels.join("\r\n")),
            );
        }
    }
}

/// An IMAP flag as the Go worker wrote it: through go-imap's
/// `CanonicalFlag` (v1, the revision Caliopen vendored), which gives the
/// RFC 3501 system flags their RFC spelling and lowercases everything else
/// (`$Forwarded` becomes `$forwarded`, `NonJunk` becomes `nonjunk`).
/// Caliopen's Python side filters those markers by their lowercase names.
pub fn flag_name(f: &async_imap::types::Flag<'_>) -> String {
    use async_imap::types::Flag;
    let raw = match f {
        Flag::Seen => "\\Seen",
        Flag::Answered => "\\Answered",
        Flag::Flagged => "\\Flagged",
        Flag::Deleted => "\\Deleted",
        Flag::Draft => "\\Draft",
        Flag::Recent => "\\Recent",
        Flag::MayCreate => "\\*",
        Flag::Custom(c) => c,
    };
    canonical_flag(raw)
}

/// go-imap v1's `CanonicalFlag`, on any spelling of a flag.
fn canonical_flag(flag: &str) -> String {
    const SYSTEM: [&str; 6] = [
        "\\Seen",
        "\\Answered",
        "\\Flagged",
        "\\Deleted",
        "\\Draft",
        "\\Recent",
    ];
    let lower = flag.to_lowercase();
    SYSTEM
        .iter()
        .find(|s| s.to_lowercase() == lower)
        .map_or(lower, |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes() {
        let conn = ConnInfo {
            remote_addr: "127.0.0.1:993".into(),
            tls_version: "tls1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            imap4rev1: true,
            gmail: false,
            ..Default::default()
        };
        let date = DateTime::parse_from_rfc3339("2026-01-02T03:04:05+01:00").unwrap();
        let flags = vec!["\\Seen".to_string(), "\\Answered".to_string()];
        let meta = FetchedMeta {
            server: "imap.example.org:993",
            conn: &conn,
            account: "Alice",
            mailbox: "INBOX",
            user_id: "u-1",
            uid: 42,
            flags: &flags,
            gmail_msgid: None,
            gmail_labels: &[],
            date,
        };
        let mut out = Vec::new();
        write(&meta, &mut out);
        let expected = "X-Fetched-Imap: from imap.example.org:993 ([127.0.0.1:993])\n        \
(using tls1.3 with cipher TLS_AES_256_GCM_SHA384)\n        \
by imap-fetcher (Caliopen) with IMAP4rev1 protocol;\n        \
Fri, 02 Jan 2026 03:04:05 +0100\r\n\
X-Fetched-Imap-Account: Alice\r\n\
X-Fetched-Imap-Box: SU5CT1g=\r\n\
X-Fetched-Imap-For: u-1\r\n\
X-Fetched-Imap-Uid: 42\r\n\
X-Fetched-Imap-Flags: XFNlZW4NClxBbnN3ZXJlZA==\r\n";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    /// The Go worker's flags went through go-imap's `CanonicalFlag`: RFC 3501
    /// system flags in their RFC case, every other keyword lowercased.
    /// Caliopen's Python side matches `$forwarded`, `nonjunk`... lowercase.
    #[test]
    fn keywords_are_lowercased_as_go_imap_did() {
        use async_imap::types::Flag;
        let raw = [
            Flag::Custom("$Label1".into()),
            Flag::Custom("$Forwarded".into()),
            Flag::Custom("NonJunk".into()),
            Flag::Custom("$MDNSent".into()),
            Flag::Seen,
            Flag::Custom("\\SEEN".into()),
            Flag::Custom("\\Junk".into()),
        ];
        let flags: Vec<String> = raw.iter().map(flag_name).collect();
        assert_eq!(
            flags,
            [
                "$label1",
                "$forwarded",
                "nonjunk",
                "$mdnsent",
                "\\Seen",
                "\\Seen",
                "\\junk"
            ]
        );
        let conn = ConnInfo::default();
        let date = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap();
        let meta = FetchedMeta {
            server: "s",
            conn: &conn,
            account: "a",
            mailbox: "INBOX",
            user_id: "u",
            uid: 1,
            flags: &flags[..5],
            gmail_msgid: None,
            gmail_labels: &[],
            date,
        };
        let mut out = Vec::new();
        write(&meta, &mut out);
        let text = String::from_utf8(out).unwrap();
        // base64 of "$label1\r\n$forwarded\r\nnonjunk\r\n$mdnsent\r\n\\Seen"
        assert!(
            text.ends_with(
                "X-Fetched-Imap-Flags: JGxhYmVsMQ0KJGZvcndhcmRlZA0Kbm9uanVuaw0KJG1kbnNlbnQNClxTZWVu\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn gmail_headers_only_on_gmail() {
        let mut conn = ConnInfo::default();
        let date = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap();
        let labels = vec!["\\Important".to_string(), "work".to_string()];
        let mk = |conn: &ConnInfo| {
            let meta = FetchedMeta {
                server: "imap.gmail.com:993",
                conn,
                account: "a",
                mailbox: "INBOX",
                user_id: "u",
                uid: 1,
                flags: &[],
                gmail_msgid: Some(1278455344230334865),
                gmail_labels: &labels,
                date,
            };
            let mut out = Vec::new();
            write(&meta, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert!(!mk(&conn).contains("X-GM"));
        conn.gmail = true;
        let s = mk(&conn);
        assert!(s.contains("X-Fetched-X-GM-MSGID: 1278455344230334865\r\n"));
        assert!(s.contains("X-Fetched-X-GM-LABELS: XEltcG9ydGFudA0Kd29yaw==\r\n"));
        assert!(!s.contains("X-Fetched-Imap-Flags"));
    }

    /// Found by the `headers` fuzzer: a display name (or server, or any
    /// other free-text value) holding CR or LF started a header of its own,
    /// e.g. a forged `Bcc:` in the stored message.
    #[test]
    fn values_never_start_a_header() {
        let conn = ConnInfo {
            remote_addr: "1.2.3.4:993\r\nX-A: 1".into(),
            tls_version: "t\n".into(),
            cipher: "c\rX-B: 2".into(),
            imap4rev1: false,
            gmail: false,
            ..Default::default()
        };
        let date = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap();
        let meta = FetchedMeta {
            server: "imap.example.org\nX-C: 3",
            conn: &conn,
            account: "Alice\r\nBcc: evil@example.org",
            mailbox: "INBOX",
            user_id: "u\n\nbody",
            uid: 1,
            flags: &[],
            gmail_msgid: None,
            gmail_labels: &[],
            date,
        };
        let mut out = Vec::new();
        write(&meta, &mut out);
        let text = String::from_utf8(out).unwrap();
        for line in text.trim_end_matches("\r\n").split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            assert!(
                line.starts_with("X-Fetched-") || line.starts_with("        "),
                "{line:?} in {text:?}"
            );
            assert!(!line.contains('\r'), "{text:?}");
        }
        assert!(text.contains("X-Fetched-Imap-Account: Alice  Bcc: evil@example.org\r\n"));
    }
}
