//! What every job of a worker process shares: settings, the store, the bus,
//! the worker's id, the shutdown token, and the memory budget for message
//! bodies in flight. Plus the counters a job fills and reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::bus::wire::{JobReport, ReportedMailbox, ReportedMessage};
use crate::bus::Bus;
use crate::config::WorkerSettings;
use crate::metrics::WorkerMetrics;
use crate::shutdown::Shutdown;
use crate::store::objects::Objects;
use crate::store::raw_message::{
    load_raw_message, save_raw_message, Placement, RawMessage, SaveError,
};
use crate::store::Store;

/// Message bytes (all jobs of the process together) held between the IMAP
/// read and the end of the hand-off. With the per-sync `in_flight` bound this
/// keeps memory flat whatever the mailbox size.
const MEMORY_BUDGET: u64 = 32 * 1024 * 1024;

/// The first wait after a server throttled us; it doubles at each
/// throttling in a row (with jitter), up to [`HOST_BACKOFF_CAP`]. Constants
/// rather than settings: a job deferred by them waits for its next
/// schedule anyway (`pollinterval`, 15 minutes by default).
pub const HOST_BACKOFF_BASE: std::time::Duration = std::time::Duration::from_secs(30);
pub const HOST_BACKOFF_CAP: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// Hosts remembered at once, at most.
pub const HOST_BACKOFF_MAX: usize = 10_000;

/// Shared by all jobs of one worker process. Cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    pub settings: Arc<WorkerSettings>,
    pub store: Store,
    pub bus: Bus,
    /// `hostname-pid-random`: names this process in IDLE leases and job
    /// pulls, and begins the owner of each of its syncs ([`Ctx::sync_owner`]).
    pub worker_id: String,
    pub shutdown: Shutdown,
    /// The sync locks this process holds, by owner, so the locks of jobs
    /// abandoned at the end of the shutdown grace can still be released.
    pub locks: Arc<Mutex<HashMap<String, SyncHold>>>,
    /// Syncs started by this process: numbers each sync's owner.
    syncs: Arc<AtomicU64>,
    /// Jobs skipped because their identity was busy (locked elsewhere).
    pub busy_skips: Arc<AtomicU64>,
    /// What `/metrics` shows.
    pub metrics: Arc<WorkerMetrics>,
    /// Where messages over `raw_size_limit` go (see [`Ctx::with_objects`]).
    pub objects: Option<Objects>,
    /// Servers that throttled us lately, each backed off (see
    /// [`crate::backoff::Hosts`]): this process's own, for politeness.
    pub hosts: Arc<crate::backoff::Hosts>,
    /// Budget of message bytes in flight, in KiB permits.
    bytes: Arc<Semaphore>,
    bytes_total_kib: u32,
}

impl Ctx {
    pub fn new(settings: WorkerSettings, store: Store, bus: Bus, shutdown: Shutdown) -> Ctx {
        Ctx::with_metrics(settings, store, bus, shutdown, WorkerMetrics::new())
    }

    /// A context counting into `metrics` (made before the services answer,
    /// so `/metrics` serves from the start).
    pub fn with_metrics(
        settings: WorkerSettings,
        store: Store,
        bus: Bus,
        shutdown: Shutdown,
        metrics: Arc<WorkerMetrics>,
    ) -> Ctx {
        let worker_id = format!(
            "{}-{}-{:04x}",
            settings.hostname,
            std::process::id(),
            fastrand::u16(..)
        );
        // The budget must hold the largest message we accept.
        let budget = MEMORY_BUDGET.max(settings.imap.max_message_size + 1024 * 1024);
        let kib = (budget / 1024).min(u32::MAX as u64 / 2) as u32;
        metrics.job_slots.set(settings.workers as i64);
        metrics.memory_budget_bytes.set(kib as i64 * 1024);
        Ctx {
            settings: Arc::new(settings),
            store,
            bus,
            worker_id,
            shutdown,
            locks: Arc::default(),
            syncs: Arc::default(),
            busy_skips: Arc::default(),
            metrics,
            objects: None,
            hosts: Arc::new(crate::backoff::Hosts::new(
                HOST_BACKOFF_BASE,
                HOST_BACKOFF_CAP,
                HOST_BACKOFF_MAX,
            )),
            bytes: Arc::new(Semaphore::new(kib as usize)),
            bytes_total_kib: kib,
        }
    }

    /// Use this object store for messages over `raw_size_limit`.
    pub fn with_objects(mut self, objects: Option<Objects>) -> Ctx {
        self.objects = objects;
        self
    }

    /// The largest message this worker can keep, and what says so (for the
    /// reason of a message over it): `imap.max_message_size`, or
    /// `raw_size_limit` when no object store is configured (a larger message
    /// has nowhere to go). A message over it is stepped over at once, since
    /// no retry can succeed.
    pub fn message_limit(&self) -> (u64, String) {
        let s = &self.settings;
        let limit = s.store_settings.raw_size_limit;
        if self.objects.is_none() && s.imap.max_message_size > limit {
            let why = format!(
                "store_settings.raw_size_limit ({limit} bytes) and no object store is configured"
            );
            (limit, why)
        } else {
            let max = s.imap.max_message_size;
            (max, format!("imap.max_message_size ({max} bytes)"))
        }
    }

    /// Store a fetched raw message, in its row or in the object store
    /// (then its row), as its size asks.
    pub async fn save_raw_message(
        &self,
        user_id: Uuid,
        raw_msg_id: Uuid,
        data: impl Into<RawMessage>,
        delivered: bool,
    ) -> Result<Placement, SaveError> {
        let limit = self.settings.store_settings.raw_size_limit;
        let objects = self.objects.as_ref();
        save_raw_message(
            &self.store,
            objects,
            limit,
            user_id,
            raw_msg_id,
            data.into(),
            delivered,
        )
        .await
    }

    /// A stored raw message's bytes, from its row or its object.
    pub async fn load_raw_message(&self, raw_msg_id: Uuid) -> Result<Option<Vec<u8>>, SaveError> {
        load_raw_message(&self.store, self.objects.as_ref(), raw_msg_id).await
    }

    /// The owner of a new sync's lock and marker: this worker's id, `/`,
    /// and the sync's number in this process. Unique to the sync, so what
    /// one sync left behind (a release retried late) can never undo a later
    /// sync of the same identity in the same process.
    pub fn sync_owner(&self) -> String {
        let n = self.syncs.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}/{n}", self.worker_id)
    }

    /// Note that this process holds (`true`) or released (`false`) a sync
    /// lock.
    pub fn note_lock(&self, hold: &SyncHold, held: bool) {
        let mut set = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if held {
            set.insert(hold.owner.clone(), hold.clone());
        } else {
            set.remove(&hold.owner);
        }
    }

    /// Release every lock still noted (after jobs were abandoned).
    pub async fn release_noted_locks(&self) {
        let holds: Vec<SyncHold> = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, h)| h)
            .collect();
        for hold in holds {
            let identity = hold.key.1;
            match self.release_lock(&hold, true).await {
                Ok(()) => {
                    tracing::info!(identity = %identity, "lock of an abandoned sync released")
                }
                Err(e) => {
                    tracing::error!(identity = %identity, error = %e, "cannot release the lock of an abandoned sync")
                }
            }
        }
    }

    /// Release the sync lock `hold` names and, with `clear_marker`,
    /// Caliopen's `syncing` marker if it is still the one that sync wrote;
    /// forget the note when both succeed. A lock or marker of another sync
    /// (a later one of this process included) is left alone.
    pub async fn release_lock(
        &self,
        hold: &SyncHold,
        clear_marker: bool,
    ) -> Result<(), crate::store::StoreError> {
        let (user, identity) = hold.key;
        // The marker first, while the lock may still be ours (see `clear_marker`).
        let cleared = if clear_marker {
            self.clear_marker(hold).await
        } else {
            Ok(())
        };
        let released = self
            .store
            .release_sync_lock(user, identity, &hold.owner)
            .await;
        released.and(cleared)?;
        self.note_lock(hold, false);
        Ok(())
    }

    /// Clear the `syncing` marker `hold`'s sync wrote, if it is still
    /// there. A sync of ours that lost the lock race to this one wrote its
    /// own over ours and left it for the winner to clear: that one is
    /// cleared too, but only while our lock row still stands, so no later
    /// sync can have taken the lock and claimed its marker; and only as read
    /// (a conditional write), so a marker written since stays.
    async fn clear_marker(&self, hold: &SyncHold) -> Result<(), crate::store::StoreError> {
        let (user, identity) = hold.key;
        let st = &self.store;
        if st
            .clear_syncing_marker(user, identity, &hold.marker, &hold.owner)
            .await?
        {
            return Ok(());
        }
        let ours = st.sync_lock(user, identity).await?;
        if ours.is_none_or(|l| l.owner != hold.owner) {
            return Ok(());
        }
        let Some(id) = st.identity(user, identity).await? else {
            return Ok(());
        };
        // An empty owner is a Go worker's; our own owner under another
        // value is a Go worker's write too (see `job::marker_of`).
        if let Some(m) = id
            .syncing()
            .filter(|m| !m.owner.is_empty() && m.owner != hold.owner)
        {
            st.clear_syncing_marker(user, identity, m.text, m.owner)
                .await?;
        }
        Ok(())
    }

    /// Bytes of the memory budget held now.
    pub fn memory_in_use(&self) -> u64 {
        let free = self.bytes.available_permits() as u64;
        (self.bytes_total_kib as u64).saturating_sub(free) * 1024
    }

    /// Wait until `len` bytes of message may be held in memory.
    pub async fn reserve_bytes(&self, len: usize) -> OwnedSemaphorePermit {
        self.acquire_kib(self.kib_of(len)).await
    }

    /// Wait until `permit` holds `len` bytes (or the whole budget, which a
    /// message never needs more of), growing it if it holds less.
    pub async fn top_up_bytes(&self, permit: &mut OwnedSemaphorePermit, len: usize) {
        let held = permit.num_permits() as u32;
        let want = self.kib_of(len);
        if want > held {
            permit.merge(self.acquire_kib(want - held).await);
        }
    }

    /// `len` bytes in budget units (KiB, rounded up, at most the budget).
    fn kib_of(&self, len: usize) -> u32 {
        (len.div_ceil(1024) as u64).min(self.bytes_total_kib as u64) as u32
    }

    async fn acquire_kib(&self, kib: u32) -> OwnedSemaphorePermit {
        self.bytes
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the memory budget semaphore is never closed")
    }
}

/// A sync lock held by one sync, with the marker that sync wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncHold {
    /// (user_id, identity_id).
    pub key: (Uuid, Uuid),
    /// The lock's owner, also written as `syncing_owner` ([`Ctx::sync_owner`]).
    pub owner: String,
    /// The `syncing` value the sync wrote.
    pub marker: String,
}

/// Live counts of one job, readable while it runs (progress replies).
#[derive(Debug, Default)]
pub struct Counters {
    pub fetched: AtomicU64,
    pub handed_off: AtomicU64,
    pub already_delivered: AtomicU64,
    pub failed: AtomicU64,
    pub stepped_over: AtomicU64,
    /// Messages expunged from the server while the sync ran (done, nothing lost).
    pub gone: AtomicU64,
    /// What was stepped over, and why, for the final report.
    pub stepped: Mutex<Vec<ReportedMessage>>,
    /// Mailboxes that could not be synced, and why.
    pub mailbox_errors: Mutex<Vec<ReportedMailbox>>,
    /// Mailboxes considered by a sync, skipped on their STATUS (no
    /// EXAMINE), and opened.
    pub folders_checked: AtomicU64,
    pub folders_skipped: AtomicU64,
    pub folders_examined: AtomicU64,
    /// Flag changes and expunges recorded from QRESYNC answers.
    pub changes_recorded: AtomicU64,
    /// IMAP commands this job sent (see [`crate::imap::tallied`]).
    pub imap_commands: Arc<AtomicU64>,
}

impl Counters {
    pub fn new() -> Arc<Counters> {
        Arc::new(Counters::default())
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copy the counts into a report.
    pub fn fill(&self, r: &mut JobReport) {
        r.fetched = self.fetched.load(Ordering::Relaxed);
        r.handed_off = self.handed_off.load(Ordering::Relaxed);
        r.already_delivered = self.already_delivered.load(Ordering::Relaxed);
        r.failed = self.failed.load(Ordering::Relaxed);
        r.stepped_over = self.stepped_over.load(Ordering::Relaxed);
        r.stepped = lock(&self.stepped).clone();
        r.mailbox_errors = lock(&self.mailbox_errors).clone();
        r.folders_checked = self.folders_checked.load(Ordering::Relaxed);
        r.folders_skipped = self.folders_skipped.load(Ordering::Relaxed);
        r.folders_examined = self.folders_examined.load(Ordering::Relaxed);
        r.changes_recorded = self.changes_recorded.load(Ordering::Relaxed);
        r.imap_commands = self.imap_commands.load(Ordering::Relaxed);
    }

    /// Note a message stepped over by this job.
    pub fn step_over(&self, mailbox: &str, uid: u32, reason: &str) {
        Counters::add(&self.stepped_over, 1);
        lock(&self.stepped).push(ReportedMessage {
            mailbox: mailbox.to_string(),
            uid,
            reason: reason.to_string(),
        });
    }

    /// Note a mailbox this job could not sync.
    pub fn mailbox_failed(&self, mailbox: &str, reason: &str) {
        lock(&self.mailbox_errors).push(ReportedMailbox {
            mailbox: mailbox.to_string(),
            reason: reason.to_string(),
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
