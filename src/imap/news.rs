//! Mail announced while a sync runs.
//!
//! A server reports a message that arrives during a command as an untagged
//! `* n EXISTS` inside that command's answer, for instance the next
//! `UID FETCH` after the `UID SEARCH` that could not see it yet. Once said,
//! the server owes no second announcement when the next IDLE starts. A live
//! sync would then leave that message for the next mail or the scheduled
//! poll. So every response our readers pass over is shown to [`seen`], and
//! a sync run inside [`watched`] learns afterwards, from [`Watch::grew`],
//! whether the mailbox it opened grew past what it opened with.
//!
//! A task-local rather than a parameter, as for the command count
//! ([`super::tallied`]): responses are read in many layers that share no
//! job context, and a sync's IMAP work runs in its own task.

use std::sync::{Arc, Mutex};

use async_imap::imap_proto::{MailboxDatum, Response};

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
    /// The mailbox's message count as the responses tell it: set by the
    /// EXAMINE, less each expunge, and any EXISTS. `None` before an EXAMINE.
    count: Option<u32>,
    /// An EXISTS said more messages than `count` knew of.
    grew: bool,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Run `fut` with the mailbox news of its responses kept in `watch`.
pub async fn watched<F: std::future::Future>(watch: Arc<Watch>, fut: F) -> F::Output {
    WATCH.scope(watch, fut).await
}

/// A mailbox was opened with `exists` messages: what a sync covers starts
/// here, whatever was said before.
pub(crate) fn opened(exists: u32) {
    let _ = WATCH.try_with(|w| {
        *w.lock() = State {
            count: Some(exists),
            grew: false,
        }
    });
}

/// An untagged response read while a command ran.
pub(crate) fn seen(resp: &Response<'_>) {
    let _ = WATCH.try_with(|w| take(&mut w.lock(), resp));
}

fn take(st: &mut State, resp: &Response<'_>) {
    let Some(count) = st.count else {
        return;
    };
    match resp {
        Response::MailboxData(MailboxDatum::Exists(n)) => {
            st.grew |= *n > count;
            st.count = Some(*n);
        }
        Response::Expunge(_) => st.count = Some(count.saturating_sub(1)),
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
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_sync_sees_what_its_task_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let w = Watch::new();
        let (_, exists) = Response::parse(b"* 2 EXISTS\r\n").unwrap();
        rt.block_on(watched(w.clone(), async {
            seen(&exists);
            opened(1);
            seen(&exists);
        }));
        assert!(w.grew());
        seen(&exists); // outside: nobody watches, nothing happens
        let w = Watch::new();
        rt.block_on(watched(w.clone(), async {
            seen(&exists);
            opened(2);
        }));
        assert!(!w.grew(), "an EXISTS before the EXAMINE is covered by it");
    }
}
