//! Which folders a live session syncs next, and when.
//!
//! The session's IMAP side ([`super`]) hears of changes (an EXISTS in IDLE,
//! a NOTIFY `STATUS` or `LIST`, the same said inside a sync's answers) as
//! [`News`]; this keeps, apart from any I/O so it is tested alone, what
//! those ask for: the folders the identity syncs that changed, every folder
//! at the start, a fresh folder listing when folders were created or
//! renamed; and when the next sync runs, with the backoff of syncs that did
//! not go through ([`Pace`]). Servers also announce folders none of whose
//! messages changed (Dovecot: a folder it creates on disk as we first open
//! it, one whose index a sync wrote): each word is weighed against the
//! message count and UIDNEXT the folder's last good sync read.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::super::MAX_BACKOFF;
use crate::imap::news::News;
use crate::imap::notify::Counts;
use crate::worker::job::Ended;

/// Syncs in a row run at once because a folder grew during the one before;
/// the next ones wait as a failed sync's retry does.
pub(super) const GROWN_AT_ONCE: u32 = 10;

/// What one sync covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// Every folder the identity syncs (when a NOTIFY session opens).
    All,
    Folder(String),
}

impl Target {
    /// As [`crate::worker::job::Scope::only`] takes it.
    pub(super) fn only(&self) -> Option<&str> {
        match self {
            Target::All => None,
            Target::Folder(f) => Some(f),
        }
    }
}

/// The folders a NOTIFY session watches: those the identity syncs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Watched {
    /// `mailboxes: *`: every syncable folder, as last listed.
    pub(super) star: bool,
    pub(super) names: BTreeSet<String>,
    /// With `star`, every folder the last listing named, synced or not: a
    /// `* LIST` of one of these (its creation on disk, say) asks for no
    /// new listing.
    pub(super) every: BTreeSet<String>,
}

/// A folder listing: the folders synced, and every folder named.
pub(super) type Listing = (BTreeSet<String>, BTreeSet<String>);

/// The syncs a session owes.
#[derive(Debug)]
pub(super) struct Wanted {
    /// `None`: IDLE on INBOX alone (no NOTIFY).
    watched: Option<Watched>,
    all: bool,
    folders: BTreeSet<String>,
    /// Folders were created or renamed: list them again (`mailboxes: *`).
    relist: bool,
    /// How each folder stood when the last sync of it that went through
    /// read it: an announcement that it stands so still is no news.
    known: BTreeMap<String, Counts>,
    sync_at: Option<Instant>,
    pace: Pace,
}

impl Wanted {
    /// IDLE on INBOX: INBOX first (mail that came while nobody watched).
    pub(super) fn inbox() -> Wanted {
        Wanted::new(None, false, ["INBOX".to_string()].into())
    }

    /// NOTIFY: every folder first, once.
    pub(super) fn notify(watched: Watched) -> Wanted {
        Wanted::new(Some(watched), true, BTreeSet::new())
    }

    fn new(watched: Option<Watched>, all: bool, folders: BTreeSet<String>) -> Wanted {
        Wanted {
            watched,
            all,
            folders,
            relist: false,
            known: BTreeMap::new(),
            sync_at: Some(Instant::now()),
            pace: Pace::new(),
        }
    }

    /// The mailbox an EXISTS speaks of: INBOX stays selected in IDLE
    /// without NOTIFY; with it, nothing is selected between syncs.
    pub(super) fn selected(&self) -> Option<&'static str> {
        self.watched.is_none().then_some("INBOX")
    }

    pub(super) fn notifying(&self) -> bool {
        self.watched.is_some()
    }

    /// The folder listing is to be read again before the next sync.
    pub(super) fn relist_due(&self) -> bool {
        self.relist
    }

    /// The next sync, if one is due now.
    pub(super) fn due(&self) -> Option<Target> {
        if self.sync_at.is_none_or(|t| t > Instant::now()) {
            return None;
        }
        if self.all {
            return Some(Target::All);
        }
        self.folders.iter().next().cloned().map(Target::Folder)
    }

    /// When the session has to leave IDLE for a sync at the latest.
    pub(super) fn sync_at(&self) -> Option<Instant> {
        self.sync_at
    }

    /// Take in what was announced; whether it asks for anything.
    fn take(&mut self, news: News) -> bool {
        let Some(w) = &self.watched else {
            let inbox = news.overflow || news.folders.contains("INBOX");
            return inbox && self.folders.insert("INBOX".into());
        };
        let mut more = false;
        if news.overflow {
            more = !self.all;
            self.all = true;
        }
        let known = &self.known;
        // Said to stand as it stood when last synced: nothing came or went.
        let unchanged = |f: &String| news.said.get(f).is_some_and(|c| known.get(f) == Some(c));
        // A folder deleted, or never synced well, is listed news; one
        // synced before and said to exist was made real by our first
        // opening of it (Dovecot's auto-created folders), or was there.
        let fresh = |f: &String| news.gone.contains(f) || !known.contains_key(f);
        let mut owed: Vec<&String> = news.folders.iter().filter(|f| !unchanged(f)).collect();
        owed.extend(news.listed.iter().filter(|f| fresh(f)));
        if w.star
            && news
                .listed
                .iter()
                .any(|f| news.gone.contains(f) || !w.every.contains(f))
        {
            more |= !self.relist;
            self.relist = true;
        }
        for f in owed.into_iter().filter(|f| w.names.contains(*f)) {
            more |= self.folders.insert(f.clone());
        }
        more
    }

    /// News heard in IDLE: sync now if it asks for anything; whether it did.
    pub(super) fn woken(&mut self, news: News) -> bool {
        let more = self.take(news);
        if more {
            self.sync_at = Some(Instant::now());
        }
        more
    }

    /// A sync of `target` ended so, and its answers said `news`.
    pub(super) fn synced(&mut self, target: &Target, ended: Ended, news: News) {
        if matches!(ended, Ended::Done) {
            for (f, counts) in &news.read {
                match counts {
                    Some(c) => self.known.insert(f.clone(), *c),
                    None => self.known.remove(f),
                };
            }
            match target {
                Target::All => {
                    self.all = false;
                    self.folders.clear();
                }
                Target::Folder(f) => {
                    self.folders.remove(f);
                }
            }
        }
        let grew = self.take(news);
        let at = self.pace.next(ended, grew);
        let owed = self.all || !self.folders.is_empty() || self.relist;
        self.sync_at = at.or_else(|| owed.then(Instant::now));
    }

    /// The folders listed anew (`mailboxes: *`): new ones are synced, for
    /// they may hold mail already (created by a filter and filled at once).
    pub(super) fn relisted(&mut self, (names, every): Listing, news: News) {
        self.relist = false;
        if let Some(w) = &mut self.watched {
            let new: Vec<String> = names.difference(&w.names).cloned().collect();
            w.names = names;
            w.every = every;
            self.folders.retain(|f| w.names.contains(f));
            self.known.retain(|f, _| w.names.contains(f));
            self.folders.extend(new);
        }
        let mut news = news;
        news.listed.clear(); // our own LIST's answers
        news.gone.clear();
        self.take(news);
        if self.all || !self.folders.is_empty() {
            self.sync_at.get_or_insert_with(Instant::now);
        } else {
            // Nothing owed (a folder waiting for its retry is gone): no
            // wake-up for nothing.
            self.sync_at = None;
        }
    }
}

/// When a session syncs next: the backoff of syncs that did not go
/// through, and how many syncs in a row a folder grew during.
#[derive(Debug)]
struct Pace {
    retry: Duration,
    grown: u32,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            retry: Duration::from_secs(1),
            grown: 0,
        }
    }

    /// When to sync again after a sync that ended so, `grew` saying
    /// whether a watched folder changed while it ran (`None`: only if
    /// other folders are owed).
    fn next(&mut self, ended: Ended, grew: bool) -> Option<Instant> {
        let now = Instant::now();
        let at = match ended {
            Ended::Done if !grew => {
                *self = Pace::new();
                return None;
            }
            // New mail, said only inside the sync's answers (the next
            // IDLE owes no word of it): again, now; after GROWN_AT_ONCE
            // in a row (a flood, or a server that says so wrongly), with
            // the backoff.
            Ended::Done => {
                self.grown += 1;
                if self.grown <= GROWN_AT_ONCE {
                    self.retry = Duration::from_secs(1);
                    return Some(now);
                }
                now + self.retry
            }
            // Another sync holds the identity; it may have passed the
            // folder already, so ours runs once it is over.
            Ended::Busy => now + self.retry.min(Duration::from_secs(15)),
            Ended::Failed => now + self.retry,
        };
        self.retry = (self.retry * 2).min(MAX_BACKOFF);
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn news(folders: &[&str], listed: &[&str]) -> News {
        News {
            folders: names(folders),
            listed: names(listed),
            ..News::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_that_saw_a_folder_grow_is_followed_by_another_within_bounds() {
        let mut pace = Pace::new();
        let now = Instant::now();
        assert_eq!(pace.next(Ended::Done, false), None);
        for _ in 0..GROWN_AT_ONCE {
            assert_eq!(pace.next(Ended::Done, true), Some(now), "at once");
        }
        // Growth every time: a flood, or a server that says so wrongly.
        assert_eq!(
            pace.next(Ended::Done, true),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(
            pace.next(Ended::Done, true),
            Some(now + Duration::from_secs(2))
        );
        // A sync that saw nothing new ends it.
        assert_eq!(pace.next(Ended::Done, false), None);
        assert_eq!(pace.next(Ended::Done, true), Some(now));
        assert_eq!(
            pace.next(Ended::Failed, false),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(
            pace.next(Ended::Failed, false),
            Some(now + Duration::from_secs(2))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_notify_only_inbox_is_synced() {
        let mut w = Wanted::inbox();
        assert_eq!(w.due(), Some(Target::Folder("INBOX".into())));
        w.synced(
            &Target::Folder("INBOX".into()),
            Ended::Done,
            News::default(),
        );
        assert_eq!(w.due(), None);
        assert!(!w.woken(news(&["Archive"], &["New"])));
        assert!(w.woken(news(&["INBOX"], &[])));
        assert_eq!(w.due(), Some(Target::Folder("INBOX".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn with_notify_each_watched_folder_that_changed_is_synced() {
        let watched = Watched {
            star: false,
            names: names(&["INBOX", "Archive", "Later"]),
            every: BTreeSet::new(),
        };
        let mut w = Wanted::notify(watched);
        assert_eq!(w.due(), Some(Target::All));
        // Archive changed while everything was synced: again, at once.
        w.synced(&Target::All, Ended::Done, news(&["Archive", "Junk"], &[]));
        assert_eq!(w.due(), Some(Target::Folder("Archive".into())));
        w.synced(
            &Target::Folder("Archive".into()),
            Ended::Done,
            News::default(),
        );
        assert_eq!(w.due(), None);
        assert!(!w.woken(news(&["Junk"], &[])), "not synced: ignored");
        // A folder of the list created: synced (it may hold mail).
        assert!(w.woken(news(&["INBOX"], &["Later"])));
        let mut order = Vec::new();
        while let Some(t) = w.due() {
            w.synced(&t, Ended::Done, News::default());
            order.push(t);
        }
        assert_eq!(
            order,
            [
                Target::Folder("INBOX".into()),
                Target::Folder("Later".into())
            ]
        );
        assert!(!w.relist_due(), "an explicit list is never listed again");
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_folder_a_new_folder_is_listed_and_synced() {
        let watched = Watched {
            star: true,
            names: names(&["INBOX", "Archive"]),
            every: names(&["INBOX", "Archive", "Junk"]),
        };
        let mut w = Wanted::notify(watched);
        w.synced(&Target::All, Ended::Done, News::default());
        assert!(w.woken(news(&[], &["Filtered"])));
        assert!(w.relist_due());
        w.relisted(
            (
                names(&["INBOX", "Archive", "Filtered"]),
                names(&["INBOX", "Archive", "Filtered", "Junk"]),
            ),
            news(&[], &["INBOX", "Archive", "Filtered"]),
        );
        assert!(!w.relist_due());
        assert_eq!(w.due(), Some(Target::Folder("Filtered".into())));
        w.synced(
            &Target::Folder("Filtered".into()),
            Ended::Busy,
            News::default(),
        );
        assert_eq!(w.due(), None, "retried after the backoff");
        // Deleted meanwhile: no longer owed.
        w.relisted((names(&["INBOX"]), names(&["INBOX"])), News::default());
        assert_eq!(w.sync_at(), None, "nothing owed, no wake-up");
        assert!(w.woken(news(&["Archive", "INBOX"], &[])));
        assert_eq!(w.due(), Some(Target::Folder("INBOX".into())));
    }

    /// Dovecot announces folders whose messages did not change: those it
    /// created on disk as the first sync opened them (with a `* LIST`),
    /// and a `* STATUS` of folders whose index that sync wrote. Seen in
    /// the 1,000-session bench: every session synced twice on opening.
    #[tokio::test(start_paused = true)]
    async fn a_folder_announced_as_it_was_synced_asks_for_nothing() {
        let c = |messages, uidnext| Counts { messages, uidnext };
        let watched = Watched {
            star: true,
            names: names(&["INBOX", "Sent"]),
            every: names(&["INBOX", "Sent", "Junk"]),
        };
        let mut w = Wanted::notify(watched);
        let read = News {
            read: [
                ("INBOX".into(), Some(c(1, 2))),
                ("Sent".into(), Some(c(0, 1))),
            ]
            .into(),
            ..News::default()
        };
        w.synced(&Target::All, Ended::Done, read);
        assert_eq!(w.due(), None);
        let mut same = news(&["INBOX", "Sent", "Junk"], &["Sent", "Junk"]);
        same.said = [("INBOX".into(), c(1, 2)), ("Sent".into(), c(0, 1))].into();
        assert!(!w.woken(same), "as synced, and created as listed");
        assert!(!w.relist_due());
        let mut more = news(&["INBOX"], &[]);
        more.said = [("INBOX".into(), c(2, 3))].into();
        assert!(w.woken(more), "new mail");
        assert_eq!(w.due(), Some(Target::Folder("INBOX".into())));
        w.synced(
            &Target::Folder("INBOX".into()),
            Ended::Done,
            News::default(),
        );
        // Said with no counts: news.
        assert!(w.woken(news(&["Sent"], &[])));
        w.synced(&Target::Folder("Sent".into()), Ended::Done, News::default());
        // Deleted and created again: news, and listed again.
        let mut again = news(&[], &["Sent"]);
        again.gone = names(&["Sent"]);
        assert!(w.woken(again));
        assert!(w.relist_due());
    }
}
