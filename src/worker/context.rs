//! What every job of a worker process shares: settings, the store, the bus,
//! the worker's id, the shutdown token, and the memory budget for message
//! bodies in flight. Plus the counters a job fills and reports.

use std::collections::HashSet;
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

/// Shared by all jobs of one worker process. Cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    pub settings: Arc<WorkerSettings>,
    pub store: Store,
    pub bus: Bus,
    /// `hostname-pid-random`: names this process in locks and job pulls.
    pub worker_id: String,
    pub shutdown: Shutdown,
    /// Identities whose sync lock this process holds, so the locks of jobs
    /// abandoned at the end of the shutdown grace can still be released.
    pub locks: Arc<Mutex<HashSet<(Uuid, Uuid)>>>,
    /// Jobs skipped because their identity was busy (locked elsewhere).
    pub busy_skips: Arc<AtomicU64>,
    /// What `/metrics` shows.
    pub metrics: Arc<WorkerMetrics>,
    /// Where messages over `raw_size_limit` go (see [`Ctx::with_objects`]).
    pub objects: Option<Objects>,
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
            busy_skips: Arc::default(),
            metrics,
            objects: None,
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

    /// Note that this process holds (`true`) or released (`false`) the
    /// sync lock of an identity.
    pub fn note_lock(&self, key: (Uuid, Uuid), held: bool) {
        let mut set = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if held {
            set.insert(key);
        } else {
            set.remove(&key);
        }
    }

    /// Release every lock still noted (after jobs were abandoned).
    pub async fn release_noted_locks(&self) {
        let keys: Vec<(Uuid, Uuid)> = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for key in keys {
            match self.release_lock(key, true).await {
                Ok(()) => tracing::info!(identity = %key.1, "lock of an abandoned sync released"),
                Err(e) => {
                    tracing::error!(identity = %key.1, error = %e, "cannot release the lock of an abandoned sync")
                }
            }
        }
    }

    /// Release this process's sync lock of (user, identity) and, with
    /// `clear_marker`, Caliopen's `syncing` marker; forget the note when
    /// both succeed.
    pub async fn release_lock(
        &self,
        key: (Uuid, Uuid),
        clear_marker: bool,
    ) -> Result<(), crate::store::StoreError> {
        use crate::store::identity::infos;
        let (user, identity) = key;
        let released = self
            .store
            .release_sync_lock(user, identity, &self.worker_id)
            .await;
        let cleared = if clear_marker {
            self.store
                .remove_infos(user, identity, &[infos::SYNCING, infos::SYNCING_OWNER])
                .await
        } else {
            Ok(())
        };
        released.and(cleared)?;
        self.note_lock(key, false);
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
