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

use async_imap::imap_proto::{MailboxDatum, Response, StatusAttribute};

use super::fetch::Reader;
use super::folders::Folder;
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
    /// `* STATUS F (...)`: F, not selected, got or lost messages; it now
    /// stands at `counts` when the server said so.
    Changed {
        name: String,
        counts: Option<Counts>,
    },
    /// `* LIST (...) d F`: F was created, renamed (F is the new name) or
    /// deleted (`gone`: `\NonExistent`).
    Listed { name: String, gone: bool },
}

/// How many messages a folder holds and the UID its next one gets: equal
/// counts at two moments mean no message came or went in between (an
/// expunge lowers MESSAGES, an arrival raises UIDNEXT). A server may
/// announce a folder whose messages did not change (Dovecot does when a
/// folder's index is written, as when it is first opened): this tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub messages: u32,
    pub uidnext: u32,
}

impl Counts {
    /// From a STATUS response's attributes, if it has both.
    pub fn of(status: &[StatusAttribute]) -> Option<Counts> {
        let (mut messages, mut uidnext) = (None, None);
        for a in status {
            match a {
                StatusAttribute::Messages(n) => messages = Some(*n),
                StatusAttribute::UidNext(n) => uidnext = Some(*n),
                _ => {}
            }
        }
        Some(Counts {
            messages: messages?,
            uidnext: uidnext?,
        })
    }
}

/// The announcement a response is, if any. Folder names come decoded
/// (UTF-8, INBOX spelled so), as every folder name past the wire; a name
/// that does not decode is no announcement (such a folder is not synced).
pub fn event(resp: &Response<'_>) -> Option<Event> {
    match resp {
        Response::MailboxData(MailboxDatum::Exists(n)) => Some(Event::Exists(*n)),
        Response::MailboxData(MailboxDatum::Status { mailbox, status }) => changed(mailbox, status),
        Response::MailboxData(MailboxDatum::List(data)) => {
            let listed = Folder::from_list(&data.name, &data.name_attributes);
            folder_name(&data.name).map(|name| Event::Listed {
                name,
                // RFC 5258: \NonExistent implies \Noselect.
                gone: !listed.selectable,
            })
        }
        _ => None,
    }
}

fn changed(mailbox: &str, status: &[StatusAttribute]) -> Option<Event> {
    folder_name(mailbox).map(|name| Event::Changed {
        name,
        counts: Counts::of(status),
    })
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
            U::Status {
                mailbox,
                attributes,
            } => changed(&mailbox, &attributes),
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

    fn changed(name: &str, counts: Option<(u32, u32)>) -> Event {
        Event::Changed {
            name: name.into(),
            counts: counts.map(|(messages, uidnext)| Counts { messages, uidnext }),
        }
    }

    fn listed(name: &str, gone: bool) -> Event {
        Event::Listed {
            name: name.into(),
            gone,
        }
    }

    #[test]
    fn what_dovecot_announces_is_read() {
        assert_eq!(
            ev(b"* STATUS Other (MESSAGES 1 UIDNEXT 2 UNSEEN 1 HIGHESTMODSEQ 2)\r\n"),
            Some(changed("Other", Some((1, 2))))
        );
        assert_eq!(
            ev(b"* STATUS \"a b/Entw&APw-rfe\" (MESSAGES 1)\r\n"),
            Some(changed("a b/Entwürfe", None))
        );
        assert_eq!(
            ev(b"* STATUS inbox (UIDNEXT 7 MESSAGES 1)\r\n"),
            Some(changed("INBOX", Some((1, 7))))
        );
        assert_eq!(ev(b"* 4 EXISTS\r\n"), Some(Event::Exists(4)));
        assert_eq!(ev(b"* LIST () \".\" New1\r\n"), Some(listed("New1", false)));
        assert_eq!(
            ev(b"* LIST (\\NonExistent) \".\" New2\r\n"),
            Some(listed("New2", true))
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
