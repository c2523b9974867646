//! Mail announced while a sync runs.
//!
//! A server reports a message that arrives during a command as an untagged
//! `* n EXISTS` inside that command's answer, for instance the next
//! `UID FETCH` after the `UID SEARCH` that could not see it yet. Once said,
//! the server owes no second announcement when the next IDLE starts. A live
//! sync would then leave that message for the next mail or the scheduled
//! poll. So every response our readers pass over is shown to [`seen`], and
//! a sync run inside [`watched`] learns afterwards, from [`Watch::grew`],
//! whether the mailbox it opened grew past what it opened with, and from
//! [`Watch::news`] which folders changed: the opened one that grew, and
//! those a NOTIFY session ([`super::notify`]) was told of meanwhile
//! (`* STATUS` of another folder, `* LIST` of a folder created, renamed
//! or deleted), which it owes no second word of either.
//!
//! A task-local rather than a parameter, as for the command count
//! ([`super::tallied`]): responses are read in many layers that share no
//! job context, and a sync's IMAP work runs in its own task.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_imap::imap_proto::{MailboxDatum, Response};

use super::notify::{self, Counts, Event};
use crate::store::identity::mailbox_key;

/// Folders named in one [`News`] at most; past it, every folder is news.
pub const MAX_NAMED: usize = 1000;

/// Which folders the responses said changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct News {
    /// Folders (UTF-8 names, INBOX spelled so) with new mail or expunges.
    pub folders: BTreeSet<String>,
    /// What the last word of a folder of `folders` said it holds now, when
    /// that word (a NOTIFY `* STATUS`) said so.
    pub said: BTreeMap<String, Counts>,
    /// Folders named by a `* LIST` (created, renamed or deleted).
    pub listed: BTreeSet<String>,
    /// Those of `listed` announced deleted (or not selectable).
    pub gone: BTreeSet<String>,
    /// How each folder a sync read (opened, or asked the STATUS of) stood
    /// then; `None` when its messages changed while the sync ran. Not
    /// news: what the news is weighed against ([`Counts`]).
    pub read: BTreeMap<String, Option<Counts>>,
    /// More than [`MAX_NAMED`] names were said: take every folder as news.
    pub overflow: bool,
}

impl News {
    pub fn is_empty(&self) -> bool {
        self.folders.is_empty() && self.listed.is_empty() && !self.overflow
    }

    /// Note one announcement.
    pub fn note(&mut self, event: &Event, selected: Option<&str>) {
        match event {
            Event::Changed { name, counts } => self.folder(name, *counts),
            Event::Listed { name, gone } => {
                if self.listed.len() < MAX_NAMED {
                    self.listed.insert(name.clone());
                    if *gone {
                        self.gone.insert(name.clone());
                    }
                } else {
                    self.overflow = true;
                }
            }
            Event::Exists(_) => {
                if let Some(name) = selected {
                    self.folder(name, None)
                }
            }
        }
    }

    fn folder(&mut self, name: &str, counts: Option<Counts>) {
        if self.folders.len() >= MAX_NAMED && !self.folders.contains(name) {
            self.overflow = true;
            return;
        }
        self.folders.insert(name.to_string());
        match counts {
            Some(c) => self.said.insert(name.to_string(), c),
            None => self.said.remove(name),
        };
    }

    /// Add `other`, said after `self`.
    pub fn merge(&mut self, other: News) {
        for f in &other.folders {
            self.folder(f, other.said.get(f).copied());
        }
        for l in other.listed {
            let gone = other.gone.contains(&l);
            self.note(&Event::Listed { name: l, gone }, None);
        }
        self.read.extend(other.read);
        self.overflow |= other.overflow;
    }
}

tokio::task_local! {
    static WATCH: Arc<Watch>;
}

/// What the responses of one sync said about the mailbox it opened last.
#[derive(Debug, Default)]
pub struct Watch {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The mailbox opened last.
    mailbox: Option<String>,
    /// The mailbox's message count as the responses tell it: set by the
    /// EXAMINE, less each expunge, and any EXISTS. `None` before an EXAMINE.
    count: Option<u32>,
    /// An EXISTS said more messages than `count` knew of.
    grew: bool,
    /// Every folder said to have changed.
    news: News,
    /// A command that asks for STATUS or LIST answers runs: those are
    /// answers, not announcements ([`asked`]).
    asking: bool,
}

impl Watch {
    pub fn new() -> Arc<Watch> {
        Arc::new(Watch::default())
    }

    /// Did the mailbox grow after it was opened (new mail the sync may
    /// have missed)?
    pub fn grew(&self) -> bool {
        self.lock().grew
    }

    /// The folders said to have changed (the opened one if it grew).
    pub fn news(&self) -> News {
        self.lock().news.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Run `fut` with the mailbox news of its responses kept in `watch`.
pub async fn watched<F: std::future::Future>(watch: Arc<Watch>, fut: F) -> F::Output {
    WATCH.scope(watch, fut).await
}

/// `mailbox` was opened with `exists` messages and UIDNEXT `uidnext`: what
/// a sync of it covers starts here, whatever was said of it before.
pub(crate) fn opened(mailbox: &str, exists: u32, uidnext: Option<u32>) {
    let _ = WATCH.try_with(|w| {
        let mut st = w.lock();
        let mailbox = mailbox_key(mailbox).to_string();
        st.news.folders.remove(&mailbox);
        st.news.said.remove(&mailbox);
        let counts = uidnext.map(|uidnext| Counts {
            messages: exists,
            uidnext,
        });
        st.news.read.insert(mailbox.clone(), counts);
        st.mailbox = Some(mailbox);
        st.count = Some(exists);
        st.grew = false;
    });
}

/// Run `fut`, a command asking for STATUS or LIST answers, with those
/// answers not taken for NOTIFY announcements. An announcement among them
/// is missed, but the answer itself says how that folder stands, and that
/// is what the sync acts on.
pub(crate) async fn asked<F: std::future::Future>(fut: F) -> F::Output {
    struct Asking;
    impl Drop for Asking {
        fn drop(&mut self) {
            let _ = WATCH.try_with(|w| w.lock().asking = false);
        }
    }
    let _ = WATCH.try_with(|w| w.lock().asking = true);
    let _asking = Asking;
    fut.await
}

/// An untagged response read while a command ran.
pub(crate) fn seen(resp: &Response<'_>) {
    let _ = WATCH.try_with(|w| take(&mut w.lock(), resp));
}

fn take(st: &mut State, resp: &Response<'_>) {
    match notify::event(resp) {
        // The answer of our own STATUS: how the folder stands. Two that
        // differ (an announcement among the answers): it changed while
        // read, and which one the sync acted on is not known here.
        Some(Event::Changed { name, counts }) if st.asking => {
            let read = st.news.read.entry(name).or_insert(counts);
            if *read != counts {
                *read = None;
            }
        }
        Some(e @ (Event::Changed { .. } | Event::Listed { .. })) if !st.asking => {
            st.news.note(&e, None)
        }
        _ => {}
    }
    let Some(count) = st.count else {
        return;
    };
    match resp {
        Response::MailboxData(MailboxDatum::Exists(n)) => {
            if *n > count {
                st.grew = true;
                let opened = st.mailbox.clone();
                st.news.note(&Event::Exists(*n), opened.as_deref());
                changed_since_read(st);
            }
            st.count = Some(*n);
        }
        Response::Expunge(_) => {
            st.count = Some(count.saturating_sub(1));
            changed_since_read(st);
        }
        // QRESYNC's form of EXPUNGE (RFC 7162 §3.2.10); EARLIER ones are
        // history, not a change of the count.
        Response::Vanished {
            earlier: false,
            uids,
        } => {
            let gone: u64 = uids
                .iter()
                .map(|r| u64::from(r.end().abs_diff(*r.start())) + 1)
                .sum();
            st.count = Some(count.saturating_sub(gone.min(u64::from(u32::MAX)) as u32));
            changed_since_read(st);
        }
        _ => {}
    }
}

/// The mailbox opened last lost or got messages after it was read.
fn changed_since_read(st: &mut State) {
    if let Some(m) = &st.mailbox {
        st.news.read.insert(m.clone(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &'static [u8]) -> Response<'static> {
        Response::parse(line).unwrap().1
    }

    /// `sync` run as a sync is, under a new watch; that watch.
    fn watching(sync: impl std::future::Future<Output = ()>) -> Arc<Watch> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let w = Watch::new();
        rt.block_on(watched(w.clone(), sync));
        w
    }

    fn feed(st: &mut State, line: &[u8]) {
        let (_, resp) = Response::parse(line).unwrap();
        take(st, &resp);
    }

    #[test]
    fn only_growth_past_the_opened_count_is_news() {
        let mut st = State::default();
        feed(&mut st, b"* 9 EXISTS\r\n");
        assert!(!st.grew, "nothing opened yet");
        st.count = Some(3);
        feed(&mut st, b"* 3 EXISTS\r\n");
        assert!(!st.grew, "the same count again");
        feed(&mut st, b"* 2 EXPUNGE\r\n");
        feed(&mut st, b"* VANISHED 5:6\r\n");
        feed(&mut st, b"* VANISHED (EARLIER) 1:100\r\n");
        assert_eq!(st.count, Some(0));
        // One expunged, one new: the count is back where it was, and it is news.
        feed(&mut st, b"* 1 EXISTS\r\n");
        assert!(st.grew);
    }

    #[test]
    fn notify_announcements_name_their_folders() {
        let w = watching(async {
            seen(&parse(b"* STATUS Archive (MESSAGES 2 UIDNEXT 3)\r\n"));
            seen(&parse(b"* STATUS Sent (MESSAGES 2 UIDNEXT 3)\r\n"));
            seen(&parse(b"* LIST () \".\" New\r\n"));
            // Opening Sent covers what was said of it before.
            opened("Sent", 2, None);
            seen(&parse(b"* STATUS Entw&APw-rfe (MESSAGES 1)\r\n"));
            // The answers of our own LIST and STATUS are no news.
            asked(async { seen(&parse(b"* STATUS Drafts (MESSAGES 1)\r\n")) }).await;
            asked(async { seen(&parse(b"* LIST () \".\" Drafts\r\n")) }).await;
        });
        let news = w.news();
        let names = |s: &[&str]| s.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(news.folders, names(&["Archive", "Entwürfe"]));
        assert_eq!(news.listed, names(&["New"]));
        assert!(!w.grew());
    }

    #[test]
    fn a_sync_keeps_how_the_folders_it_read_stood() {
        let w = watching(async {
            opened("Sent", 0, Some(1));
            asked(async { seen(&parse(b"* STATUS Drafts (MESSAGES 1 UIDNEXT 5)\r\n")) }).await;
            asked(async {
                seen(&parse(b"* STATUS Junk (MESSAGES 1 UIDNEXT 5)\r\n"));
                seen(&parse(b"* STATUS Junk (MESSAGES 2 UIDNEXT 6)\r\n"));
            })
            .await;
            seen(&parse(
                b"* STATUS Archive (MESSAGES 2 UIDNEXT 3 UNSEEN 1)\r\n",
            ));
            seen(&parse(b"* STATUS Later (MESSAGES 2)\r\n"));
            opened("inbox", 1, Some(2));
            seen(&parse(b"* 2 EXISTS\r\n"));
            seen(&parse(b"* LIST () \".\" Later\r\n"));
            seen(&parse(b"* LIST (\\NonExistent) \".\" Old\r\n"));
        });
        let news = w.news();
        let counts = |messages, uidnext| Counts { messages, uidnext };
        assert_eq!(
            news.read,
            BTreeMap::from([
                ("Sent".into(), Some(counts(0, 1))),
                ("Drafts".into(), Some(counts(1, 5))),
                ("Junk".into(), None),  // it changed while it was read
                ("INBOX".into(), None), // it grew after it was opened
            ])
        );
        let names = |s: &[&str]| s.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(news.folders, names(&["Archive", "INBOX", "Later"]));
        assert_eq!(
            news.said,
            BTreeMap::from([("Archive".into(), counts(2, 3))])
        );
        assert_eq!(news.listed, names(&["Later", "Old"]));
        assert_eq!(news.gone, names(&["Old"]));
    }

    #[test]
    fn a_sync_sees_what_its_task_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let w = Watch::new();
        let (_, exists) = Response::parse(b"* 2 EXISTS\r\n").unwrap();
        rt.block_on(watched(w.clone(), async {
            seen(&exists);
            opened("inbox", 1, None);
            seen(&exists);
        }));
        assert!(w.grew());
        assert_eq!(w.news().folders, BTreeSet::from(["INBOX".to_string()]));
        seen(&exists); // outside: nobody watches, nothing happens
        let w = Watch::new();
        rt.block_on(watched(w.clone(), async {
            seen(&exists);
            opened("INBOX", 2, None);
        }));
        assert!(!w.grew(), "an EXISTS before the EXAMINE is covered by it");
        assert!(w.news().is_empty());
    }
}
