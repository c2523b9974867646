//! imapworker: the daemon that fetches remote mail on orders.
//!
//! It queue-subscribes to `nats_topic_sender` (group `nats_queue`), so any
//! number of workers share the orders, and pulls scheduled jobs from the
//! poller (`need_job` on `nats_topic_poller`) whenever it has a free job
//! slot, at most `workers` pulls per throttle period. At most `workers` jobs
//! run at once (a semaphore). `deliver` orders have a small pool of their
//! own ([`DELIVER_SLOTS`]): a message to send must not wait behind long
//! syncs, since its requester gives up after 30 s. Orders are read as they
//! come and wait for their slot in memory, at most [`MAX_WAITING`] of them;
//! one waiting for a slot sends progress reports when asked, so `imapctl
//! --wait` knows the worker is alive. On SIGTERM/SIGINT it takes no new work, lets
//! running syncs stop at their next message boundary — each saves its
//! checkpoint and releases its lock — and exits once they are done or the
//! grace period is over.

pub mod account;
pub mod checkpoint;
pub mod context;
pub mod idle;
pub mod job;
pub mod orders;
pub mod pipeline;
pub mod renewal;
pub mod resync;
pub mod tracker;

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::bus::wire::{orders as names, Job, JobReport, NeedJob, OrderName};
use crate::bus::Message;
use crate::bus::{Bus, BusError, Retry};
use crate::cli::{WorkerArgs, WorkerCmd};
use crate::config::WorkerSettings;
use crate::imap::ImapError;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
use account::AccountError;
use context::Ctx;

/// `deliver` orders carried out at once, apart from the sync slots.
pub const DELIVER_SLOTS: usize = 2;

/// Orders read from NATS and waiting for a slot, at most. Beyond that the
/// worker reads no more orders until one starts (they wait in NATS).
pub const MAX_WAITING: usize = 256;

/// The last flush of the NATS connection on the way out.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a job did not complete.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(BusError),
    /// The stored account cannot be used as it is (no password, bad server...).
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(transparent)]
    NotFound(#[from] Missing),
    /// Another sync of the identity holds the lock or the marker.
    #[error("skipped: {0}")]
    Busy(#[from] Busy),
    /// An outage of ours (processor absent or silent, NATS, Cassandra): the
    /// mailbox stopped at the first message it touched, nothing was counted
    /// against the messages or the account.
    #[error("stopped by an outage on our side (not the account's): {0}")]
    Outage(String),
    /// Cut short (shutdown, lost lock, job deadline); what was reached is saved.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

/// What a sync order names that is not there to sync.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("no identity {identity_id} for user {user_id}")]
    Identity {
        user_id: uuid::Uuid,
        identity_id: uuid::Uuid,
    },
    #[error(
        "identity {identity_id} is not a remote email identity (type {kind:?}, protocol {protocol:?})"
    )]
    NotRemoteEmail {
        identity_id: uuid::Uuid,
        kind: String,
        protocol: String,
    },
}

/// Why a sync stood down: someone else holds the identity.
#[derive(Debug, thiserror::Error)]
pub enum Busy {
    #[error("a sync of this identity is already running on another worker")]
    LockHeld,
    /// A Go worker's `syncing` marker younger than the contract's 24 h.
    #[error(
        "a Caliopen Go worker marked this identity as syncing at {} \
         (imapctl unlock clears a marker it left behind)",
        crate::store::identity::time_text(*.since)
    )]
    GoMarker {
        since: chrono::DateTime<chrono::Utc>,
    },
    /// A Go worker wrote its marker over ours once we held the lock.
    #[error("a Caliopen Go worker started a sync of this identity at the same moment")]
    GoStarted,
    #[error("the identity's syncing marker keeps changing: another sync is starting")]
    MarkerKeepsChanging,
}

impl JobError {
    /// Does this failure say something about the remote account (and so
    /// count towards disabling it)? Our own outages do not, nor does one
    /// folder the server will not open.
    pub fn counts_against_account(&self) -> bool {
        match self {
            JobError::Imap(e) => !matches!(
                e,
                ImapError::Policy { .. } | ImapError::Mailbox { .. } | ImapError::Interrupted
            ),
            _ => false,
        }
    }

    /// The IMAP side was stopped by the job's stop token.
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            JobError::Interrupted(_) | JobError::Imap(ImapError::Interrupted)
        )
    }
}

pub async fn run(
    args: WorkerArgs,
    settings: WorkerSettings,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    debug_assert!(matches!(args.cmd, WorkerCmd::Start(_)));
    if settings.lda.in_topic.is_empty() {
        tracing::info!("LDAConfig.in_topic is empty: store-only mode, no hand-off");
    }
    crate::imap::tls::check_trust(&settings.imap.ca_file).map_err(crate::error::Failure::Config)?;
    // Served before the services answer, so /readyz can say they do not.
    let metrics = crate::metrics::WorkerMetrics::new();
    let probe = Arc::new(Probe {
        metrics: metrics.clone(),
        ctx: std::sync::OnceLock::new(),
    });
    if !settings.metrics_addr.trim().is_empty() {
        crate::http::start(&settings.metrics_addr, probe.clone(), shutdown.clone()).await?;
    }
    let objects = crate::store::objects::from_worker_settings(&settings)
        .map_err(|e| crate::error::Failure::Config(e.to_string()))?;
    let store = Store::connect_retrying(&settings.store_settings, shutdown.clone()).await?;
    let bus = Bus::connect(
        &settings.nats_url,
        "imapworker",
        Retry::Forever,
        shutdown.clone(),
    )
    .await?;
    if let Some(o) = &objects {
        // Caliopen creates the bucket at start-up when missing; if the store
        // cannot be reached, say so now rather than at the first large message.
        o.ensure_bucket()
            .await
            .map_err(|e| crate::error::Failure::Unavailable(e.to_string()))?;
    }
    let ctx = Ctx::with_metrics(settings, store, bus, shutdown, metrics).with_objects(objects);
    let _ = probe.ctx.set(ctx.clone());
    serve(ctx).await?;
    Ok(ExitCode::SUCCESS)
}

/// What the worker's `/metrics` and `/readyz` answer.
struct Probe {
    metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Set once NATS and Cassandra were reached.
    ctx: std::sync::OnceLock<Ctx>,
}

impl crate::http::Probe for Probe {
    fn metrics(&self) -> String {
        if let Some(ctx) = self.ctx.get() {
            self.metrics
                .memory_in_use_bytes
                .set(ctx.memory_in_use() as i64);
        }
        self.metrics.encode()
    }

    /// Ready when NATS is connected and Cassandra answers a query.
    fn ready(&self) -> futures::future::BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let Some(ctx) = self.ctx.get() else {
                return Err("not ready: connecting to Cassandra and NATS".into());
            };
            let nats = ctx.bus.client().connection_state();
            if nats != async_nats::connection::State::Connected {
                return Err(format!("not ready: NATS is {nats:?}"));
            }
            match tokio::time::timeout(Duration::from_secs(3), ctx.store.ping()).await {
                Ok(Ok(())) => Ok("ready: NATS and Cassandra answer".into()),
                Ok(Err(e)) => Err(format!("not ready: {e}")),
                Err(_) => Err("not ready: Cassandra did not answer within 3 s".into()),
            }
        })
    }
}

/// The daemon loop; returns after a shutdown, once jobs have finished.
pub async fn serve(ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.settings.clone();
    let mut shutdown = ctx.shutdown.clone();
    let mut orders = ctx
        .bus
        .queue_subscribe(&s.nats_topic_sender, &s.nats_queue)
        .await?;
    tracing::info!(
        worker = %ctx.worker_id,
        subject = %s.nats_topic_sender,
        queue = %s.nats_queue,
        jobs = s.workers,
        "imapworker ready"
    );
    let pools = Pools {
        slots: Arc::new(Semaphore::new(s.workers)),
        deliver: Arc::new(Semaphore::new(DELIVER_SLOTS)),
    };
    let waiting = Arc::new(Semaphore::new(MAX_WAITING));
    // Room to read one more order.
    let mut room: Option<OwnedSemaphorePermit> = None;
    let mut jobs = JoinSet::new();
    let mut pulls = Pulls::new(s.imap.poll_throttle(), s.workers);
    let mut lost = false;
    // Live sync runs beside the orders, in the same job slots.
    let (end_live, live_stop) = crate::shutdown::channel();
    let live = tokio::spawn(idle::run(ctx.clone(), pools.slots.clone(), live_stop));

    loop {
        // Reap finished jobs so the set does not grow.
        while jobs.try_join_next().is_some() {}
        let pull_at = pulls.next_at();
        tokio::select! {
            _ = shutdown.wait() => break,
            // A job ended: its slot may serve a pull now.
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            p = waiting.clone().acquire_owned(), if room.is_none() => {
                room = Some(p.expect("waiting semaphore never closed"));
            }
            msg = orders.next(), if room.is_some() => {
                let Some(msg) = msg else {
                    // Only a closed client ends a subscription: exit non-zero
                    // (after the running jobs) so a supervisor restarts us.
                    tracing::error!("order subscription closed: stopping");
                    lost = true;
                    break;
                };
                spawn_order(&ctx, &mut jobs, &pools, msg, room.take());
            }
            _ = tokio::time::sleep_until(pull_at), if pools.slots.available_permits() > 0 => {
                pull(&ctx, &pools, &mut pulls, &mut jobs).await;
            }
        }
    }

    // No new work from here on.
    let _ = orders.unsubscribe().await;
    // The live sync stops on the same shutdown (or right now, if the
    // subscription was lost) and releases its leases.
    end_live.trigger();
    tokio::join!(drain(&ctx, &mut jobs), async {
        let _ = live.await;
    });
    if lost {
        anyhow::bail!("the NATS order subscription closed");
    }
    tracing::info!("imapworker stopped");
    Ok(())
}

/// The job slots: `workers` for syncs and fullfetches, a few for `deliver`.
struct Pools {
    slots: Arc<Semaphore>,
    deliver: Arc<Semaphore>,
}

/// Read an order once and run it in a task of its own once its pool has a
/// slot; `in_waiting` is its place among the orders waiting for one.
fn spawn_order(
    ctx: &Ctx,
    jobs: &mut JoinSet<()>,
    pools: &Pools,
    msg: Message,
    in_waiting: Option<OwnedSemaphorePermit>,
) {
    let received = Instant::now();
    let order = orders::Order::from_json(&msg.payload);
    let is_deliver = orders::Order::is_deliver(&order);
    let pool = if is_deliver {
        pools.deliver.clone()
    } else {
        pools.slots.clone()
    };
    let ctx = ctx.clone();
    jobs.spawn(async move {
        // Orders take slots first come, first served; the loop never holds
        // one they wait for.
        let Some(permit) = wait_for_slot(&ctx, &msg, is_deliver, pool).await else {
            return;
        };
        drop(in_waiting);
        orders::handle(&ctx, &msg, order, received).await;
        drop(permit);
    });
}

/// Ask the poller for a job for a free slot, and run it in that slot.
async fn pull(ctx: &Ctx, pools: &Pools, pulls: &mut Pulls, jobs: &mut JoinSet<()>) {
    let Ok(permit) = pools.slots.clone().try_acquire_owned() else {
        return; // taken by an order meanwhile
    };
    pulls.sent();
    match pull_job(ctx).await {
        Some(job) => {
            let ctx = ctx.clone();
            jobs.spawn(async move {
                orders::run_pulled(&ctx, job).await;
                drop(permit);
            });
        }
        None => pulls.found_none(),
    }
}

/// When the next `need_job` may be sent: at most `limit` per throttle
/// window, as if each job slot were its own loop pulling once per period,
/// and not before a throttle period after a pull that found nothing.
struct Pulls {
    throttle: Duration,
    limit: usize,
    /// Instants of the pulls within the last window.
    recent: VecDeque<Instant>,
    not_before: Instant,
}

impl Pulls {
    fn new(throttle: Duration, limit: usize) -> Pulls {
        Pulls {
            throttle,
            limit,
            recent: VecDeque::new(),
            not_before: Instant::now(),
        }
    }

    fn next_at(&mut self) -> Instant {
        while self
            .recent
            .front()
            .is_some_and(|t| t.elapsed() >= self.throttle)
        {
            self.recent.pop_front();
        }
        match self.recent.front() {
            Some(first) if self.recent.len() >= self.limit => {
                self.not_before.max(*first + self.throttle)
            }
            _ => self.not_before,
        }
    }

    fn sent(&mut self) {
        self.recent.push_back(Instant::now());
    }

    fn found_none(&mut self) {
        self.not_before = Instant::now() + self.throttle;
    }
}

/// Wait for the running jobs to reach a checkpoint, at most the grace
/// period; then abandon the rest and release their locks, and flush NATS.
async fn drain(ctx: &Ctx, jobs: &mut JoinSet<()>) {
    let grace = ctx.settings.imap.shutdown_grace();
    tracing::info!(
        running = jobs.len(),
        "stopping: waiting for running jobs to reach a checkpoint"
    );
    let drained =
        tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = jobs.len(),
            "grace period over: abandoning jobs and releasing their locks"
        );
        jobs.abort_all();
        while jobs.join_next().await.is_some() {}
        // Their locks would block those identities for lock_ttl_secs.
        ctx.release_noted_locks().await;
    }
    // The last replies and records must reach NATS, but a server that is
    // gone must not hold the exit.
    if tokio::time::timeout(FINAL_FLUSH_TIMEOUT, ctx.bus.flush())
        .await
        .is_err()
    {
        tracing::warn!("NATS did not confirm the last messages in time: exiting anyway");
    }
}

/// Wait for a permit of `pool` for the order in `msg`. Meanwhile, if the
/// requester asked for progress, tell it every second that the order waits,
/// so it knows the worker is alive. `None` when the worker shuts down first
/// (the requester is told so).
async fn wait_for_slot(
    ctx: &Ctx,
    msg: &Message,
    is_deliver: bool,
    pool: Arc<Semaphore>,
) -> Option<OwnedSemaphorePermit> {
    let mut shutdown = ctx.shutdown.clone();
    let progress = orders::wants_progress(msg);
    let acquire = pool.acquire_owned();
    tokio::pin!(acquire);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            p = &mut acquire => return Some(p.expect("slot semaphores are never closed")),
            _ = shutdown.wait() => {
                let why = "the worker is shutting down: order not started, send it again";
                if is_deliver {
                    orders::deliver::reply_failure(ctx, msg, why).await;
                } else {
                    orders::reply_error(ctx, msg, "", why).await;
                }
                return None;
            }
            _ = tick.tick(), if progress => {
                let waiting = JobReport { progress: true, ..Default::default() };
                ctx.bus.reply(msg, &waiting).await;
            }
        }
    }
}

/// Ask the poller for one job. `None` when there is none (or no poller).
async fn pull_job(ctx: &Ctx) -> Option<Job> {
    let req = NeedJob {
        worker: ctx.worker_id.clone(),
        order: OrderName {
            order: names::NEED_JOB.into(),
        },
    };
    let subject = &ctx.settings.nats_topic_poller;
    match ctx
        .bus
        .request::<_, Job>(subject, &req, Duration::from_secs(5))
        .await
    {
        Ok(job) if job.order == names::SYNC => Some(job),
        Ok(job) if job.order == names::NO_PENDING_JOB => None,
        Ok(job) => {
            tracing::warn!(subject = %subject, reply = %job.order, "poller answered need_job with an error");
            None
        }
        Err(BusError::NoResponders(_)) => {
            tracing::debug!(subject = %subject, "no poller is serving jobs");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot pull a job from the poller");
            None
        }
    }
}
