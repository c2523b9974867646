//! Asking the server how each mailbox stands without opening it: STATUS
//! (RFC 3501 §6.3.10), or one LIST-STATUS (RFC 5819) for all of them.
//!
//! A resync of an identity with many folders used to EXAMINE every one of
//! them just to learn that nothing changed. One `LIST ... RETURN (STATUS
//! ...)` answers for every folder in a single round trip; the worker then
//! opens only the folders whose UIDVALIDITY, UIDNEXT or HIGHESTMODSEQ moved.
//!
//! Anything we cannot read is left out of the answer, never guessed: a
//! mailbox without a status here takes the normal (EXAMINE) path.

use std::collections::HashMap;

use async_imap::imap_proto::{MailboxDatum, Response, StatusAttribute};

use super::fetch::{quoted, Reader};
use super::folders::Folder;
use super::{utf7, Extensions, ImapError};

/// What STATUS said about one mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FolderStatus {
    pub uidvalidity: Option<u32>,
    pub uidnext: Option<u32>,
    pub messages: Option<u32>,
    pub highestmodseq: Option<u64>,
}

impl FolderStatus {
    fn from_attrs(attrs: &[StatusAttribute]) -> FolderStatus {
        let mut st = FolderStatus::default();
        for a in attrs {
            match a {
                StatusAttribute::UidValidity(v) => st.uidvalidity = Some(*v),
                StatusAttribute::UidNext(n) => st.uidnext = Some(*n),
                StatusAttribute::Messages(m) => st.messages = Some(*m),
                StatusAttribute::HighestModSeq(m) => st.highestmodseq = Some(*m),
                _ => {}
            }
        }
        st
    }
}

/// Mailbox names per LIST-STATUS command for an explicit list.
const PATTERNS_PER_LIST: usize = 100;

/// STATUS commands sent before their answers are read.
const STATUS_PER_ROUND_TRIP: usize = 50;

/// Statuses by UTF-8 mailbox name (INBOX spelled `INBOX`).
pub type Statuses = HashMap<String, FolderStatus>;

/// The key of `name` in [`Statuses`]: INBOX is case-insensitive.
pub fn key(name: &str) -> String {
    crate::store::identity::mailbox_key(name).to_string()
}

/// The STATUS items asked for: HIGHESTMODSEQ only of a CONDSTORE server.
pub fn items(caps: Extensions) -> &'static str {
    if caps.condstore {
        "(UIDVALIDITY UIDNEXT MESSAGES HIGHESTMODSEQ)"
    } else {
        "(UIDVALIDITY UIDNEXT MESSAGES)"
    }
}

/// Put one STATUS answer into `out`, keyed by its decoded name.
fn take(out: &mut Statuses, wire: &str, attrs: &[StatusAttribute]) {
    if let Ok(name) = utf7::decode(wire) {
        if out.len() < super::folders::MAX_FOLDERS {
            out.insert(key(&name), FolderStatus::from_attrs(attrs));
        }
    }
}

/// Every folder (`LIST "" "*"`) and the status of each, in one command
/// (needs LIST-STATUS). Special-use attributes are asked for as
/// [`super::folders::list`] does.
pub async fn list_with_status(
    reader: &mut Reader<'_>,
    caps: Extensions,
) -> Result<(Vec<Folder>, Statuses), ImapError> {
    let ret = if caps.special_use {
        format!("RETURN (SPECIAL-USE STATUS {})", items(caps))
    } else {
        format!("RETURN (STATUS {})", items(caps))
    };
    let cmd = format!("LIST \"\" \"*\" {ret}");
    let mut folders = Vec::new();
    let mut statuses = Statuses::new();
    let mut too_many = false;
    let listing = reader.run_checked(&cmd, "LIST-STATUS", |resp| match resp {
        Response::MailboxData(MailboxDatum::List(data)) => {
            if folders.len() >= super::folders::MAX_FOLDERS {
                too_many = true;
            } else {
                folders.push(Folder::from_list(&data.name, &data.name_attributes));
            }
        }
        Response::MailboxData(MailboxDatum::Status { mailbox, status }) => {
            take(&mut statuses, mailbox, status)
        }
        _ => {}
    });
    super::news::asked(listing).await?;
    if too_many {
        return Err(ImapError::Protocol {
            server: reader.server().to_string(),
            during: "LIST-STATUS".into(),
            reason: format!("more than {} folders", super::folders::MAX_FOLDERS),
        });
    }
    Ok((folders, statuses))
}

/// The status of each of `names` (UTF-8). With LIST-STATUS and
/// LIST-EXTENDED, one `LIST "" (name1 name2 ...) RETURN (STATUS ...)`; else
/// one STATUS per mailbox, pipelined. A mailbox the server says nothing about (it
/// does not exist, STATUS answered NO) is simply absent from the answer.
pub async fn statuses(
    reader: &mut Reader<'_>,
    caps: Extensions,
    names: &[String],
) -> Result<Statuses, ImapError> {
    super::news::asked(statuses_asked(reader, caps, names)).await
}

async fn statuses_asked(
    reader: &mut Reader<'_>,
    caps: Extensions,
    names: &[String],
) -> Result<Statuses, ImapError> {
    let mut out = Statuses::new();
    if names.is_empty() {
        return Ok(out);
    }
    // A name with a LIST wildcard would match other folders: STATUS it.
    let (plain, wild): (Vec<&String>, Vec<&String>) = names
        .iter()
        .partition(|n| !n.contains('*') && !n.contains('%'));
    let mut one_by_one: Vec<&String> = wild;
    if caps.list_status && caps.list_extended {
        // Patterns in bounded groups: a command line stays well under
        // the line lengths servers accept (Dovecot: 64 KiB).
        for group in plain.chunks(PATTERNS_PER_LIST) {
            let patterns: Vec<String> = group.iter().map(|n| quoted(&utf7::encode(n))).collect();
            let cmd = format!(
                "LIST \"\" ({}) RETURN (STATUS {})",
                patterns.join(" "),
                items(caps)
            );
            reader
                .run_checked(&cmd, "LIST-STATUS", |resp| {
                    if let Response::MailboxData(MailboxDatum::Status { mailbox, status }) = resp {
                        take(&mut out, mailbox, status)
                    }
                })
                .await?;
        }
    } else {
        one_by_one.extend(plain);
    }
    // One STATUS per mailbox, sent in pipelined groups: a round trip per
    // group, not per mailbox; the groups keep what is in flight small.
    for group in one_by_one.chunks(STATUS_PER_ROUND_TRIP) {
        let cmds: Vec<String> = group
            .iter()
            .map(|n| format!("STATUS {} {}", quoted(&utf7::encode(n)), items(caps)))
            .collect();
        // A NO (no such mailbox) leaves it out: EXAMINE then says why.
        let _no_is_fine = reader
            .pipelined(&cmds, |resp| {
                if let Response::MailboxData(MailboxDatum::Status { mailbox, status }) = resp {
                    take(&mut out, mailbox, status)
                }
            })
            .await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_status(line: &[u8]) -> (String, FolderStatus) {
        let (_, resp) = Response::parse(line).unwrap();
        let Response::MailboxData(MailboxDatum::Status { mailbox, status }) = resp else {
            panic!("not a STATUS: {resp:?}")
        };
        let mut out = Statuses::new();
        take(&mut out, &mailbox, &status);
        out.into_iter().next().unwrap()
    }

    #[test]
    fn status_answers() {
        let (name, st) = parse_status(
            b"* STATUS \"Entw&APw-rfe\" (MESSAGES 3 UIDNEXT 4 UIDVALIDITY 77 HIGHESTMODSEQ 9)\r\n",
        );
        assert_eq!(name, "Entwürfe");
        assert_eq!(
            st,
            FolderStatus {
                uidvalidity: Some(77),
                uidnext: Some(4),
                messages: Some(3),
                highestmodseq: Some(9),
            }
        );
        let (name, st) = parse_status(b"* STATUS inbox (UIDNEXT 1)\r\n");
        assert_eq!(name, "INBOX");
        assert_eq!(st.uidvalidity, None);
    }

    #[test]
    fn items_follow_condstore() {
        let mut caps = Extensions::default();
        assert!(!items(caps).contains("HIGHESTMODSEQ"));
        caps.condstore = true;
        assert!(items(caps).contains("HIGHESTMODSEQ"));
    }
}
