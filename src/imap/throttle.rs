//! Answers that mean "not now": a server under load, or enforcing its
//! limits, says so with a response code or a `BYE`, not with silence.
//! Such an answer is the server throttling us, not the account failing:
//! it must never count towards disabling the identity (72 h of Gmail's
//! `[THROTTLED]` would otherwise disable a healthy account).
//!
//! The codes are RFC 5530's `[UNAVAILABLE]`, `[LIMIT]` and `[OVERQUOTA]`,
//! Gmail's `[THROTTLED]`, and Dovecot's connection limit, which it words
//! "Maximum number of connections from user+IP exceeded" (2.3 answers
//! LOGIN `NO [LIMIT]` with it; older versions send it in a `BYE`).
//! imap-proto knows none of these codes, so it leaves them at the head of
//! the response's text, and async-imap hands NO and BAD over as text only:
//! they are read from the text here.

use std::fmt;

/// Why a server throttled us: a small closed set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `[UNAVAILABLE]`: a subsystem of the server is down for now.
    Unavailable,
    /// `[LIMIT]`: a limit of the server was reached.
    Limit,
    /// `[THROTTLED]` (Gmail): too many commands or too much bandwidth.
    Throttled,
    /// `[OVERQUOTA]` (Gmail words bandwidth limits with it too).
    OverQuota,
    /// Too many connections for the user (Dovecot's
    /// `mail_max_userip_connections`, Gmail's 15 per account).
    Connections,
    /// A `BYE` (or a hang-up) with no code we know.
    Bye,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::Unavailable,
        Reason::Limit,
        Reason::Throttled,
        Reason::OverQuota,
        Reason::Connections,
        Reason::Bye,
    ];

    /// The metric label and the word stored on the identity.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unavailable => "unavailable",
            Reason::Limit => "limit",
            Reason::Throttled => "throttled",
            Reason::OverQuota => "overquota",
            Reason::Connections => "connections",
            Reason::Bye => "bye",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What servers say when a user has too many connections open. The most
/// specific reason, so it is looked for before the response codes
/// (Dovecot puts it after `[LIMIT]`).
const CONNECTION_WORDS: [&str; 4] = [
    "maximum number of connections",
    "too many simultaneous connections",
    "too many connections",
    "connection limit",
];

/// The response codes of load, as written inside `[...]`.
const CODES: [(&str, Reason); 4] = [
    ("UNAVAILABLE", Reason::Unavailable),
    ("LIMIT", Reason::Limit),
    ("THROTTLED", Reason::Throttled),
    ("OVERQUOTA", Reason::OverQuota),
];

/// The reason of a `NO` or `BAD` text, if it is one of load; `None` for
/// every other refusal (a wrong password stays the account's failure).
pub fn classify(text: &str) -> Option<Reason> {
    let lower = text.to_ascii_lowercase();
    if CONNECTION_WORDS.iter().any(|w| lower.contains(w)) {
        return Some(Reason::Connections);
    }
    code_of(text)
}

/// The reason of a `BYE`: always load or a hang-up, never the account's
/// fault (a wrong password is answered `NO`).
pub fn classify_bye(text: &str) -> Reason {
    classify(text).unwrap_or(Reason::Bye)
}

/// The first bracketed response code of `text` that is one of [`CODES`].
fn code_of(text: &str) -> Option<Reason> {
    text.match_indices('[').find_map(|(i, _)| {
        let rest = &text[i + 1..];
        let end = rest.find([']', ' ']).unwrap_or(rest.len());
        let atom = &rest[..end];
        CODES
            .iter()
            .find(|(code, _)| atom.eq_ignore_ascii_case(code))
            .map(|(_, r)| *r)
    })
}

/// The server's own words in an async-imap NO or BAD error, which wraps
/// them as `no response: code: None, info: Some("...")`.
pub fn server_text(e: &async_imap::error::Error) -> String {
    use async_imap::error::Error;
    match e {
        Error::No(s) | Error::Bad(s) => info_of(s).unwrap_or(s).to_string(),
        other => other.to_string(),
    }
}

fn info_of(s: &str) -> Option<&str> {
    let start = s.find("info: Some(\"")? + "info: Some(\"".len();
    let body = &s[start..];
    Some(body.strip_suffix("\")").unwrap_or(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_answers_of_real_servers() {
        let cases = [
            // Dovecot 2.3, LOGIN over mail_max_userip_connections.
            (
                "[LIMIT] Maximum number of connections from user+IP exceeded \
                 (mail_max_userip_connections=10)",
                Some(Reason::Connections),
            ),
            // Older Dovecot, in a BYE.
            (
                "Maximum number of connections from user+IP exceeded \
                 (mail_max_userip_connections=10)",
                Some(Reason::Connections),
            ),
            (
                "[THROTTLED] Account exceeded command or bandwidth limits",
                Some(Reason::Throttled),
            ),
            (
                "[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)",
                Some(Reason::OverQuota),
            ),
            (
                "[UNAVAILABLE] Temporary authentication failure. (Failure)",
                Some(Reason::Unavailable),
            ),
            ("[limit] too busy", Some(Reason::Limit)),
            (
                "[ALERT] Too many simultaneous connections. (Failure)",
                Some(Reason::Connections),
            ),
            // A wrong password, a missing mailbox: not load.
            ("[AUTHENTICATIONFAILED] Authentication failed.", None),
            ("[NONEXISTENT] Unknown Mailbox: Foo", None),
            ("Invalid credentials (Failure)", None),
            // A code word that is not a code.
            ("no [LIMITED] edition here", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(classify(text), want, "{text}");
        }
    }

    #[test]
    fn every_bye_is_load() {
        assert_eq!(classify_bye("Server shutting down"), Reason::Bye);
        assert_eq!(
            classify_bye("[UNAVAILABLE] backend down"),
            Reason::Unavailable
        );
    }

    #[test]
    fn the_servers_words_out_of_async_imaps_error() {
        use async_imap::error::Error;
        let e = Error::No("code: None, info: Some(\"[THROTTLED] slow down\")".into());
        assert_eq!(server_text(&e), "[THROTTLED] slow down");
        assert_eq!(classify(&server_text(&e)), Some(Reason::Throttled));
        let plain = Error::Bad("odd".into());
        assert_eq!(server_text(&plain), "odd");
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
    }
}
