//! Cheap multi-folder resync: which mailboxes a sync may leave unopened,
//! and the QRESYNC changes it records.
//!
//! At the start of a sync the server is asked how every mailbox stands
//! (one LIST-STATUS, or STATUS per mailbox: see [`crate::imap::status`]).
//! A mailbox is skipped, with no EXAMINE, only when all of this holds:
//! it was synced before (a checkpoint), its UIDVALIDITY is the one of the
//! checkpoint, its UIDNEXT shows no UID past the checkpoint (or is the one
//! recorded at its last clean sync: mail deleted unseen), no message of
//! it waits for a retry, it has no folder error on record, and, on a
//! CONDSTORE server, its HIGHESTMODSEQ is the one recorded at its last
//! clean sync. Anything else (no answer, an answer we cannot read, a
//! server without UIDVALIDITY) takes the normal path: nothing with new
//! mail is ever skipped.
//!
//! With QRESYNC, a mailbox that is opened is opened with the mod-sequence
//! of its last clean sync, and the server's report of flag changes and
//! expunges since then is written to `imap_message_change` for a later
//! consumer. Caliopen sees none of this: the messages it receives, and how,
//! are unchanged.

use std::collections::{HashMap, HashSet};

use chrono::Utc;

use super::context::{Counters, Ctx};
use super::JobError;
use crate::imap::fetch::Changes;
use crate::imap::status::{self, FolderStatus};
use crate::store::resync::{MailboxStatus, MessageChange};
use crate::store::state::{Checkpoint, MessageFailure};

/// Flag changes and expunges kept from one mailbox's QRESYNC answer. Past
/// it the rest are counted and logged, not recorded; the mailbox's new
/// HIGHESTMODSEQ is still stored, so the flood is not asked for again at
/// every sync.
pub const MAX_CHANGES: usize = 10_000;

/// The statuses recorded at the last clean sync of each mailbox.
pub type Known = HashMap<String, MailboxStatus>;

/// The recorded statuses, keyed as [`status::key`] keys them.
pub fn known(rows: Vec<(String, MailboxStatus)>) -> Known {
    rows.into_iter()
        .map(|(m, st)| (status::key(&m), st))
        .collect()
}

/// The mailboxes with a message waiting for a retry (INBOX spelled `INBOX`).
pub fn retrying(failures: Vec<MessageFailure>) -> HashSet<String> {
    failures
        .into_iter()
        .filter(|f| !f.stepped_over)
        .map(|f| crate::store::identity::mailbox_key(&f.mailbox).to_string())
        .collect()
}

/// Whether a mailbox can be left unopened: see the module's rules.
/// `trouble` is a pending retry or a folder error on record.
pub fn skippable(
    cp: Option<Checkpoint>,
    now: Option<&FolderStatus>,
    last: Option<&MailboxStatus>,
    trouble: bool,
) -> bool {
    if trouble {
        return false;
    }
    let (Some(cp), Some(now)) = (cp, now) else {
        return false;
    };
    let (Some(uidvalidity), Some(uidnext)) = (now.uidvalidity, now.uidnext) else {
        return false;
    };
    if uidvalidity == 0 || uidvalidity != cp.uidvalidity {
        return false;
    }
    // No UID past the checkpoint, or none given out since the last clean
    // sync: mail deleted before any sync saw it (a server-side filter,
    // another client) leaves UIDNEXT above the checkpoint for good.
    let none_past_checkpoint = u64::from(uidnext) <= u64::from(cp.lastseenuid) + 1;
    let none_since_last = last.is_some_and(|l| {
        l.uidvalidity == uidvalidity && l.uidnext == uidnext && cp.lastseenuid >= l.lastseenuid
    });
    if !(none_past_checkpoint || none_since_last) {
        return false;
    }
    match modseq(now.highestmodseq) {
        // A server without CONDSTORE (or a mailbox without mod-sequences):
        // UIDs are all there is to compare, and they say nothing is new.
        None => true,
        Some(m) => last.is_some_and(|l| l.uidvalidity == uidvalidity && l.highestmodseq == Some(m)),
    }
}

/// A HIGHESTMODSEQ of 0 means "no mod-sequences here" (RFC 7162 §3.1.2.1).
pub fn modseq(m: Option<u64>) -> Option<u64> {
    m.filter(|m| *m != 0)
}

/// The mod-sequence to EXAMINE `(QRESYNC ...)` from: the one recorded at
/// the last clean sync of the same mailbox generation.
pub fn qresync_from(cp: Option<Checkpoint>, last: Option<&MailboxStatus>) -> Option<(u32, u64)> {
    let (cp, last) = (cp?, last?);
    (cp.uidvalidity != 0 && last.uidvalidity == cp.uidvalidity)
        .then_some(())
        .and(modseq(last.highestmodseq).map(|m| (cp.uidvalidity, m)))
}

/// The changes of messages handed off already (UID at or below `upto`):
/// a new message's flags travel with it, its expunge before we saw it is
/// nobody's business.
pub fn changes_of(mailbox: &str, uidvalidity: u32, upto: u32, c: &Changes) -> Vec<MessageChange> {
    let mut out = Vec::new();
    for r in &c.vanished {
        let end = (*r.end()).min(upto);
        for uid in *r.start()..=end {
            if uid == 0 {
                continue;
            }
            out.push(MessageChange {
                mailbox: mailbox.to_string(),
                uidvalidity,
                uid,
                flags: String::new(),
                modseq: None,
                expunged: true,
            });
        }
    }
    for (uid, flags, modseq) in &c.flags {
        if *uid > upto {
            continue;
        }
        out.push(MessageChange {
            mailbox: mailbox.to_string(),
            uidvalidity,
            uid: *uid,
            flags: flags.join(" "),
            modseq: *modseq,
            expunged: false,
        });
    }
    out
}

/// Remember a mailbox's state after a clean sync.
pub async fn save_status(
    ctx: &Ctx,
    user_id: uuid::Uuid,
    identity_id: uuid::Uuid,
    mailbox: &str,
    st: MailboxStatus,
) -> Result<(), JobError> {
    ctx.store
        .save_mailbox_status(user_id, identity_id, mailbox, st, Utc::now())
        .await?;
    Ok(())
}

/// Write the changes a QRESYNC EXAMINE reported; idempotent (one row per
/// message, its latest state).
pub async fn record(
    ctx: &Ctx,
    counters: &Counters,
    user_id: uuid::Uuid,
    identity_id: uuid::Uuid,
    changes: &[MessageChange],
) -> Result<(), JobError> {
    if changes.is_empty() {
        return Ok(());
    }
    ctx.store
        .save_message_changes(user_id, identity_id, changes, Utc::now())
        .await?;
    Counters::add(&counters.changes_recorded, changes.len() as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(uidvalidity: u32, lastseenuid: u32) -> Option<Checkpoint> {
        Some(Checkpoint {
            uidvalidity,
            lastseenuid,
        })
    }

    fn now(v: u32, next: u32, modseq: Option<u64>) -> FolderStatus {
        FolderStatus {
            uidvalidity: Some(v),
            uidnext: Some(next),
            messages: Some(1),
            highestmodseq: modseq,
        }
    }

    fn last(v: u32, modseq: Option<u64>) -> MailboxStatus {
        MailboxStatus {
            uidvalidity: v,
            uidnext: 5,
            lastseenuid: 4,
            messages: 4,
            highestmodseq: modseq,
        }
    }

    #[test]
    fn only_a_mailbox_known_unchanged_is_skipped() {
        let l = last(7, Some(40));
        // Unchanged.
        assert!(skippable(
            cp(7, 4),
            Some(&now(7, 5, Some(40))),
            Some(&l),
            false
        ));
    }

    #[test]
    fn a_mailbox_never_synced_or_without_status_is_opened() {
        let l = last(7, Some(40));
        // Never synced, or no answer for it.
        assert!(!skippable(
            None,
            Some(&now(7, 5, Some(40))),
            Some(&l),
            false
        ));
        assert!(!skippable(cp(7, 4), None, Some(&l), false));
    }

    #[test]
    fn new_mail_opens_the_mailbox() {
        let l = last(7, Some(40));
        // New mail.
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 6, Some(41))),
            Some(&l),
            false
        ));
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 6, Some(40))),
            Some(&l),
            false
        ));
    }

    #[test]
    fn a_new_generation_opens_the_mailbox() {
        let l = last(7, Some(40));
        // A new generation, even with the same UIDNEXT.
        assert!(!skippable(
            cp(7, 4),
            Some(&now(8, 5, Some(40))),
            Some(&l),
            false
        ));
    }

    #[test]
    fn changed_flags_or_expunges_open_the_mailbox() {
        let l = last(7, Some(40));
        // Flags changed or something expunged.
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 5, Some(41))),
            Some(&l),
            false
        ));
    }

    #[test]
    fn condstore_without_a_recorded_modseq_opens_the_mailbox() {
        // CONDSTORE server but no mod-sequence recorded yet.
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 5, Some(40))),
            None,
            false
        ));
    }

    #[test]
    fn a_pending_retry_or_folder_error_opens_the_mailbox() {
        let l = last(7, Some(40));
        // A retry pending or a folder error on record.
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 5, Some(40))),
            Some(&l),
            true
        ));
    }

    #[test]
    fn a_missing_or_zero_uidvalidity_opens_the_mailbox() {
        let l = last(7, Some(40));
        // No UIDVALIDITY (unreadable answer) or a zero one.
        let mut odd = now(7, 5, Some(40));
        odd.uidvalidity = None;
        assert!(!skippable(cp(7, 4), Some(&odd), Some(&l), false));
        assert!(!skippable(cp(0, 4), Some(&now(0, 5, None)), None, false));
    }

    #[test]
    fn without_condstore_uids_decide() {
        // No CONDSTORE: UIDs decide.
        assert!(skippable(cp(7, 4), Some(&now(7, 5, None)), None, false));
        assert!(skippable(cp(7, 4), Some(&now(7, 5, Some(0))), None, false));
    }

    #[test]
    fn uids_expunged_unseen_leave_the_mailbox_skippable() {
        let l = last(7, Some(40));
        // UIDs given out and expunged before any sync saw them: UIDNEXT
        // stays past the checkpoint, and is the one of the last clean sync.
        let unseen = MailboxStatus {
            uidnext: 9,
            ..last(7, Some(40))
        };
        assert!(skippable(
            cp(7, 4),
            Some(&now(7, 9, Some(40))),
            Some(&unseen),
            false
        ));
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 10, Some(40))),
            Some(&unseen),
            false
        ));
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 9, Some(40))),
            Some(&l),
            false
        ));
        // ... unless the checkpoint was set back since (to fetch again).
        let rewound = MailboxStatus {
            lastseenuid: 8,
            ..unseen
        };
        assert!(!skippable(
            cp(7, 4),
            Some(&now(7, 9, Some(40))),
            Some(&rewound),
            false
        ));
    }

    #[test]
    fn a_checkpoint_at_the_top_of_the_uid_space_is_skippable() {
        // The checkpoint at the very top of the UID space.
        assert!(skippable(
            cp(7, u32::MAX),
            Some(&now(7, u32::MAX, None)),
            None,
            false
        ));
    }

    #[test]
    fn qresync_starts_from_the_same_generation_only() {
        assert_eq!(
            qresync_from(cp(7, 4), Some(&last(7, Some(40)))),
            Some((7, 40))
        );
        assert_eq!(qresync_from(cp(7, 4), Some(&last(6, Some(40)))), None);
        assert_eq!(qresync_from(cp(7, 4), Some(&last(7, None))), None);
        assert_eq!(qresync_from(None, Some(&last(7, Some(40)))), None);
    }

    #[test]
    fn only_changes_of_messages_seen_are_kept() {
        let mut c = Changes::with_cap(100);
        for line in [
            &b"* VANISHED (EARLIER) 2,9:11\r\n"[..],
            b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Flagged) MODSEQ (50))\r\n",
            b"* 2 FETCH (UID 12 FLAGS () MODSEQ (51))\r\n",
        ] {
            let (_, resp) = async_imap::imap_proto::Response::parse(line).unwrap();
            c.take(&resp);
        }
        let out = changes_of("INBOX", 7, 10, &c);
        let got: Vec<(u32, bool, &str)> = out
            .iter()
            .map(|c| (c.uid, c.expunged, c.flags.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, true, ""),
                (9, true, ""),
                (10, true, ""),
                (1, false, "\\Seen \\Flagged")
            ]
        );
        assert_eq!(out[3].modseq, Some(50));
    }
}
