//! RFC 5465 NOTIFY: one connection told of new mail in every folder.
//!
//! IDLE (RFC 2177) only announces the selected mailbox, so watching every
//! folder with IDLE takes a connection per folder, which providers' limits
//! (Gmail: 15 per account, shared with the user's phone and desktop) soon
//! forbid. With `NOTIFY SET` a server announces, during IDLE as between
//! commands, `* STATUS F (...)` when folder F (not selected) gets or loses
//! messages, `* n EXISTS` for the selected one, and `* LIST` when a folder
//! is created, renamed or deleted. async-imap knows no NOTIFY: [`set`] sends
//! the command raw and [`event`] reads the announcements from the parsed
//! responses; the live-sync session decides what to sync.
//!
//! What Dovecot 2.3 sends, tried by hand against the stack's: no
//! announcement at all for the `SET` itself (without its `STATUS` option,
//! which would send a STATUS of every folder); `* STATUS Other (MESSAGES 1
//! UIDNEXT 2 UNSEEN 1 HIGHESTMODSEQ 2)` on an APPEND to a folder not
//! selected, within about half a second, and also while no command runs;
//! `* LIST () "." New1` on CREATE, `* LIST (\NonExistent) "." New2` on
//! DELETE, and `* LIST () "." New2 ("OLDNAME" (New1))` on RENAME, a form
//! imap-proto cannot parse (the session then breaks and is opened again).

use async_imap::imap_proto::{MailboxDatum, Response};

use super::fetch::Reader;
use super::news::News;
use super::{utf7, ImapError, ImapSession};
use crate::store::identity::mailbox_key;

/// The events asked for: new and expunged messages in the selected mailbox
/// and in every personal folder, and folders created, renamed or deleted.
/// RFC 5465 §5 wants MessageNew and MessageExpunge together.
pub const SET: &str = "NOTIFY SET (selected (MessageNew MessageExpunge)) \
                       (personal (MessageNew MessageExpunge MailboxName))";

/// One announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `* n EXISTS`: the selected mailbox holds `n` messages.
    Exists(u32),
    /// `* STATUS F (...)`: F, not selected, got or lost messages.
    Changed(String),
    /// `* LIST (...) d F`: F was created, renamed (F is the new name) or
    /// deleted (`\NonExistent`).
    Listed(String),
}

/// The announcement a response is, if any. Folder names come decoded
/// (UTF-8, INBOX spelled so), as every folder name past the wire; a name
/// that does not decode is no announcement (such a folder is not synced).
pub fn event(resp: &Response<'_>) -> Option<Event> {
    match resp {
        Response::MailboxData(MailboxDatum::Exists(n)) => Some(Event::Exists(*n)),
        Response::MailboxData(MailboxDatum::Status { mailbox, .. }) => {
            folder_name(mailbox).map(Event::Changed)
        }
        Response::MailboxData(MailboxDatum::List(data)) => {
            folder_name(&data.name).map(Event::Listed)
        }
        _ => None,
    }
}

/// A wire (modified UTF-7) folder name as the rest of the program names it.
pub fn folder_name(wire: &str) -> Option<String> {
    utf7::decode(wire).ok().map(|n| mailbox_key(&n).to_string())
}

/// `NOTIFY SET` ([`SET`]): `Ok(false)` when the server refuses it (the
/// session then watches INBOX alone, as without NOTIFY).
pub async fn set(reader: &mut Reader<'_>) -> Result<bool, ImapError> {
    super::sent("NOTIFY");
    match reader.command(SET, |_| {}).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(no)) => {
            tracing::warn!(server = reader.server(), reason = no, "NOTIFY refused");
            Ok(false)
        }
        Err(e @ ImapError::Protocol { .. }) => {
            tracing::warn!(error = %e, "NOTIFY refused");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The announcements async-imap set aside: its typed commands (EXAMINE,
/// LOGOUT...) hand the untagged responses they do not expect to a side
/// channel (bounded, dropped when full), where NOTIFY's land when they
/// arrive during one. `selected` is the mailbox an EXISTS speaks of.
pub fn drain(session: &mut ImapSession, selected: Option<&str>) -> News {
    use async_imap::types::UnsolicitedResponse as U;
    let mut news = News::default();
    while let Ok(u) = session.unsolicited_responses.try_recv() {
        let e = match u {
            U::Status { mailbox, .. } => folder_name(&mailbox).map(Event::Changed),
            U::Exists(n) => Some(Event::Exists(n)),
            U::Other(resp) => event(resp.parsed()),
            _ => None,
        };
        if let Some(e) = e {
            news.note(&e, selected);
        }
    }
    news
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(line: &[u8]) -> Option<Event> {
        let (rest, resp) = Response::parse(line).expect("parses");
        assert!(rest.is_empty());
        event(&resp)
    }

    #[test]
    fn what_dovecot_announces_is_read() {
        assert_eq!(
            ev(b"* STATUS Other (MESSAGES 1 UIDNEXT 2 UNSEEN 1 HIGHESTMODSEQ 2)\r\n"),
            Some(Event::Changed("Other".into()))
        );
        assert_eq!(
            ev(b"* STATUS \"a b/Entw&APw-rfe\" (MESSAGES 1)\r\n"),
            Some(Event::Changed("a b/Entwürfe".into()))
        );
        assert_eq!(
            ev(b"* STATUS inbox (MESSAGES 1)\r\n"),
            Some(Event::Changed("INBOX".into()))
        );
        assert_eq!(ev(b"* 4 EXISTS\r\n"), Some(Event::Exists(4)));
        assert_eq!(
            ev(b"* LIST () \".\" New1\r\n"),
            Some(Event::Listed("New1".into()))
        );
        assert_eq!(
            ev(b"* LIST (\\NonExistent) \".\" New2\r\n"),
            Some(Event::Listed("New2".into()))
        );
        assert_eq!(ev(b"* OK Still here\r\n"), None);
        assert_eq!(ev(b"* 3 EXPUNGE\r\n"), None);
        assert_eq!(ev(b"* STATUS bad&AEE- (MESSAGES 1)\r\n"), None);
    }

    #[test]
    fn a_rename_announcement_is_beyond_imap_proto() {
        // Why a RENAME breaks a NOTIFY session (see the module doc): the
        // OLDNAME extended data of RFC 5258 is not parsed.
        let r = Response::parse(b"* LIST () \".\" New2 (\"OLDNAME\" (New1))\r\n");
        assert!(r.is_err() || !r.unwrap().0.is_empty());
    }

    #[test]
    fn the_command_is_one_line() {
        assert!(!SET.contains("  ") && !SET.contains('\n'), "{SET}");
        assert!(SET.starts_with("NOTIFY SET (selected (MessageNew MessageExpunge)) (personal"));
    }
}
