//! Where the checkpoint of a mailbox may move to.
//!
//! Messages are handed off concurrently and finish in any order. The
//! checkpoint (`lastseenuid`) may only cover the unbroken run of UIDs, in
//! server order, that are done — handed off, or stepped over after too many
//! failures. A failed message stops the run: nothing after it is skipped by
//! the next sync, which is what makes a failed hand-off lossless.

/// Progress over the sorted UIDs of one sync of one mailbox.
#[derive(Debug)]
pub struct Tracker {
    /// The checkpoint this sync started from.
    base: u32,
    /// UIDs to handle, ascending.
    uids: Vec<u32>,
    done: Vec<bool>,
    /// Index of the first UID not yet done.
    next: usize,
}

impl Tracker {
    /// `uids` must be ascending and all above `base`.
    pub fn new(base: u32, mut uids: Vec<u32>) -> Tracker {
        uids.retain(|u| *u > base);
        uids.sort_unstable();
        uids.dedup();
        let n = uids.len();
        Tracker {
            base,
            uids,
            done: vec![false; n],
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.uids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uids.is_empty()
    }

    pub fn uids(&self) -> &[u32] {
        &self.uids
    }

    /// Mark `uid` as done (handed off, already delivered, stepped over, or
    /// gone from the server). Unknown UIDs are ignored.
    pub fn done(&mut self, uid: u32) {
        if let Ok(i) = self.uids.binary_search(&uid) {
            self.done[i] = true;
            while self.next < self.uids.len() && self.done[self.next] {
                self.next += 1;
            }
        }
    }

    /// The highest UID such that it and every listed UID below it are done.
    pub fn checkpoint(&self) -> u32 {
        if self.next == 0 {
            self.base
        } else {
            self.uids[self.next - 1]
        }
    }

    /// Is every listed UID done?
    pub fn complete(&self) -> bool {
        self.next == self.uids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_over_unbroken_runs_only() {
        let mut t = Tracker::new(10, vec![11, 12, 15, 20, 21]);
        assert_eq!(t.checkpoint(), 10);
        t.done(12);
        assert_eq!(t.checkpoint(), 10, "11 is not done yet");
        t.done(11);
        assert_eq!(t.checkpoint(), 12);
        t.done(20);
        t.done(21);
        assert_eq!(t.checkpoint(), 12, "15 failed: nothing after it is covered");
        assert!(!t.complete());
        t.done(15);
        assert_eq!(t.checkpoint(), 21);
        assert!(t.complete());
    }

    #[test]
    fn ignores_uids_at_or_below_base_and_unknown() {
        let mut t = Tracker::new(5, vec![3, 5, 6, 6, 7]);
        assert_eq!(t.uids(), &[6, 7]);
        t.done(99);
        t.done(4);
        assert_eq!(t.checkpoint(), 5);
        t.done(6);
        assert_eq!(t.checkpoint(), 6);
    }

    #[test]
    fn empty_is_complete() {
        let t = Tracker::new(7, vec![]);
        assert!(t.complete());
        assert_eq!(t.checkpoint(), 7);
    }
}
