//! Which folders `mailboxes: *` syncs: every selectable folder of the
//! account except the special-use `\Junk` and `\Trash` (RFC 6154), asked of
//! the server at each sync so folders created later are picked up.
//!
//! Names come back decoded (UTF-8): the rest of the program, like
//! Caliopen's Go worker through go-imap, only ever sees UTF-8 names, and
//! [`super::utf7::encode`] turns them back into wire form at EXAMINE.
//!
//! The order is stable (INBOX first, then by name) so logs and `--wait`
//! results read the same from one sync to the next.

use std::time::Duration;

use async_imap::imap_proto::{MailboxDatum, NameAttribute, Response};

use super::fetch::Reader;
use super::{utf7, ImapError, ImapSession};
use crate::shutdown::Shutdown;
use crate::store::identity::mailbox_key;

/// More folders than any real account has; a server listing more is
/// refused rather than held in memory.
pub const MAX_FOLDERS: usize = 10_000;

/// The RFC 6154 special uses we act on (the others sync as usual).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialUse {
    Junk,
    Trash,
    Sent,
    Drafts,
    Archive,
    All,
    Flagged,
}

/// One LIST entry, as the server described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// The name as sent on the wire (modified UTF-7).
    pub wire: String,
    /// The UTF-8 name, or why the wire name does not decode.
    pub name: Result<String, utf7::Utf7Error>,
    /// False for `\Noselect` and `\NonExistent` (a hierarchy level only).
    pub selectable: bool,
    pub special_use: Option<SpecialUse>,
}

impl Folder {
    pub(crate) fn from_list(name: &str, attrs: &[NameAttribute<'_>]) -> Folder {
        let mut selectable = true;
        let mut special_use = None;
        for a in attrs {
            match a {
                NameAttribute::NoSelect => selectable = false,
                // RFC 5258: \NonExistent implies \Noselect.
                NameAttribute::Extension(x) if x.eq_ignore_ascii_case("\\NonExistent") => {
                    selectable = false
                }
                NameAttribute::Junk => special_use = Some(SpecialUse::Junk),
                NameAttribute::Trash => special_use = Some(SpecialUse::Trash),
                NameAttribute::Sent => special_use = Some(SpecialUse::Sent),
                NameAttribute::Drafts => special_use = Some(SpecialUse::Drafts),
                NameAttribute::Archive => special_use = Some(SpecialUse::Archive),
                NameAttribute::All => special_use = Some(SpecialUse::All),
                NameAttribute::Flagged => special_use = Some(SpecialUse::Flagged),
                _ => {}
            }
        }
        Folder {
            wire: name.to_string(),
            name: utf7::decode(name),
            selectable,
            special_use,
        }
    }

    /// Whether `mailboxes: *` syncs this folder.
    pub fn syncable(&self) -> bool {
        self.selectable
            && !matches!(
                self.special_use,
                Some(SpecialUse::Junk) | Some(SpecialUse::Trash)
            )
    }
}

/// Every folder of the account (`LIST "" "*"`), in the server's order.
///
/// When the server has LIST-EXTENDED and SPECIAL-USE, the special-use
/// attributes are asked for explicitly (`RETURN (SPECIAL-USE)`): RFC 6154
/// only promises them then, although Dovecot and Gmail send them with a
/// plain LIST too.
pub async fn list(
    session: &mut ImapSession,
    server: &str,
    io_timeout: Duration,
) -> Result<Vec<Folder>, ImapError> {
    super::sent("CAPABILITY");
    let caps = tokio::time::timeout(io_timeout, session.capabilities())
        .await
        .map_err(|_| ImapError::Timeout {
            server: server.to_string(),
            during: "CAPABILITY".into(),
        })?
        .map_err(|e| ImapError::Protocol {
            server: server.to_string(),
            during: "CAPABILITY".into(),
            reason: e.to_string(),
        })?;
    let caps = super::Extensions::from_caps(|c| caps.has_str(c));
    list_known(session, server, io_timeout, caps).await
}

/// [`list`] with the server's extensions already known (read at login),
/// so no CAPABILITY is sent.
pub async fn list_known(
    session: &mut ImapSession,
    server: &str,
    io_timeout: Duration,
    caps: super::Extensions,
) -> Result<Vec<Folder>, ImapError> {
    let command = if caps.list_extended && caps.special_use {
        "LIST \"\" \"*\" RETURN (SPECIAL-USE)"
    } else {
        "LIST \"\" \"*\""
    };
    let mut folders = Vec::new();
    let mut too_many = false;
    // The caller bounds the whole listing with the job's stop token.
    let mut reader = Reader::new(session, server, io_timeout, Shutdown::never());
    let listing = reader.run_checked(command, "LIST", |resp| {
        if let Response::MailboxData(MailboxDatum::List(data)) = resp {
            if folders.len() >= MAX_FOLDERS {
                too_many = true;
            } else {
                folders.push(Folder::from_list(&data.name, &data.name_attributes));
            }
        }
    });
    super::news::asked(listing).await?;
    if too_many {
        return Err(ImapError::Protocol {
            server: server.to_string(),
            during: "LIST".into(),
            reason: format!("more than {MAX_FOLDERS} folders"),
        });
    }
    Ok(folders)
}

/// The UTF-8 names `mailboxes: *` syncs: selectable, neither `\Junk` nor
/// `\Trash`, INBOX first and the rest sorted.
///
/// A name that is not valid modified UTF-7 is left out: it could be
/// neither stored as UTF-8 nor asked for again ([`syncable_names`] says
/// which, for the caller to record as folder errors). A refused LIST is
/// an error, never an empty account.
pub async fn syncable(
    session: &mut ImapSession,
    server: &str,
    io_timeout: Duration,
) -> Result<Vec<String>, ImapError> {
    let folders = list(session, server, io_timeout).await?;
    Ok(syncable_names(server, folders).0)
}

/// A syncable folder whose name the server sent in a form that does not
/// decode: it cannot be opened or stored by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// The name as the server sent it.
    pub wire: String,
    /// Why it does not decode.
    pub reason: String,
}

/// The filtering and ordering of [`syncable`], apart so it is testable;
/// with the syncable folders whose names do not decode.
pub fn syncable_names(server: &str, folders: Vec<Folder>) -> (Vec<String>, Vec<Undecodable>) {
    let mut names: Vec<String> = Vec::new();
    let mut bad = Vec::new();
    for f in folders {
        if !f.syncable() {
            continue;
        }
        match f.name {
            Ok(name) => names.push(mailbox_key(&name).to_string()),
            Err(e) => {
                tracing::warn!(server, "folder not synced: {e}");
                bad.push(Undecodable {
                    wire: f.wire,
                    reason: format!("{e}: the folder cannot be opened or stored by this name"),
                });
            }
        }
    }
    // INBOX is case-insensitive (RFC 3501 §5.1); servers send it as they
    // like, and it is spelled `INBOX` from here on.
    names.sort_by(|a, b| {
        let (ai, bi) = (a == "INBOX", b == "INBOX");
        bi.cmp(&ai).then_with(|| a.cmp(b))
    });
    names.dedup();
    (names, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn folder(wire: &str, attrs: &[NameAttribute<'static>]) -> Folder {
        Folder::from_list(wire, attrs)
    }

    #[test]
    fn filters_and_orders() {
        let ext = |s: &'static str| NameAttribute::Extension(Cow::Borrowed(s));
        let folders = vec![
            folder("a", &[NameAttribute::NoSelect, ext("\\HasChildren")]),
            folder("a.b", &[ext("\\HasNoChildren")]),
            folder("&ZeVnLIqe-", &[]),
            folder("Entw&APw-rfe", &[]),
            folder("Archive", &[NameAttribute::Archive]),
            folder("Sent", &[NameAttribute::Sent]),
            folder("Trash", &[NameAttribute::Trash]),
            folder("Junk", &[NameAttribute::Junk]),
            folder("gone", &[ext("\\NonExistent")]),
            folder("bad&AEE-", &[]),
            folder("Inbox", &[]),
        ];
        let (names, bad) = syncable_names("s", folders);
        assert_eq!(
            names,
            ["INBOX", "Archive", "Entwürfe", "Sent", "a.b", "日本語"]
        );
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].wire, "bad&AEE-");
        assert!(bad[0].reason.contains("modified UTF-7"), "{bad:?}");
    }
}
