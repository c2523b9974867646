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
pub mod resync;
pub mod tracker;

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
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
use crate::store::health::{Checked, Health};
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
    /// The identity's server throttled a sync of this process lately: not
    /// connecting until its backoff is over (the job is retried at its next
    /// schedule). Transient, like the throttling itself.
    #[error(
        "not connecting: {server} throttled us lately, backing off {} s more \
         (retried at the next schedule)",
        .left.as_secs().max(1)
    )]
    HostBackoff {
        server: String,
        left: std::time::Duration,
    },
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
    /// folder the server will not open, nor a server throttling us.
    pub fn counts_against_account(&self) -> bool {
        match self {
            JobError::Imap(e) => !matches!(
                e,
                ImapError::Policy { .. }
                    | ImapError::Mailbox { .. }
                    | ImapError::Interrupted
                    | ImapError::Throttled { .. }
            ),
            _ => false,
        }
    }

    /// The server throttled us, or its host is being backed off: transient,
    /// never the account's failure.
    pub fn is_throttled(&self) -> bool {
        matches!(
            self,
            JobError::HostBackoff { .. } | JobError::Imap(ImapError::Throttled { .. })
        )
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
    crate::imap::tls::check_trust(&settings.imap.ca_file).map_err(crate::config::ConfigError)?;
    // Served before the services answer, so /readyz can say they do not.
    let metrics = crate::metrics::WorkerMetrics::new();
    let probe = Probe::new(metrics.clone());
    if !settings.metrics_addr.trim().is_empty() {
        crate::http::start(&settings.metrics_addr, probe.clone(), shutdown.clone()).await?;
    }
    let objects = crate::store::objects::from_worker_settings(&settings)
        .map_err(|e| crate::config::ConfigError(e.to_string()))?;
    if let Some(w) = crate::store::objects::without_store_warning(&settings, objects.as_ref()) {
        tracing::warn!("{w}");
    }
    let store = Store::connect_retrying(&settings.store_settings, shutdown.clone()).await?;
    let bus = Bus::connect(
        &settings.nats_url,
        "imapworker",
        Retry::Forever,
        shutdown.clone(),
    )
    .await?;
    let ctx = Ctx::with_metrics(settings, store, bus, shutdown, metrics).with_objects(objects);
    probe.attach(ctx.clone()).await;
    serve(ctx).await?;
    Ok(ExitCode::SUCCESS)
}

/// What the worker's `/metrics` and `/readyz` answer.
pub struct Probe {
    metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Set once NATS and Cassandra were reached.
    parts: std::sync::OnceLock<(Ctx, Health)>,
}

impl Probe {
    /// Served before the services answer: not ready until [`Probe::attach`].
    pub fn new(metrics: Arc<crate::metrics::WorkerMetrics>) -> Arc<Probe> {
        Arc::new(Probe {
            metrics,
            parts: std::sync::OnceLock::new(),
        })
    }

    /// NATS and Cassandra were reached: from now on, check Cassandra and
    /// the object store in the background (which also creates the bucket
    /// when missing, as Caliopen does at start-up) until shutdown.
    pub async fn attach(&self, ctx: Ctx) {
        let health =
            Health::start(ctx.store.clone(), ctx.objects.clone(), ctx.shutdown.clone()).await;
        let _ = self.parts.set((ctx, health));
    }
}

impl crate::http::Probe for Probe {
    fn metrics(&self) -> String {
        if let Some((ctx, _)) = self.parts.get() {
            self.metrics
                .memory_in_use_bytes
                .set(ctx.memory_in_use() as i64);
        }
        self.metrics.encode()
    }

    /// Ready when NATS is connected and Cassandra answered the last check;
    /// no query is made here (see [`crate::store::health`]).
    fn ready(&self) -> futures::future::BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let Some((ctx, health)) = self.parts.get() else {
                return Err("not ready: connecting to Cassandra and NATS".into());
            };
            let nats = ctx.bus.client().connection_state();
            if nats != async_nats::connection::State::Connected {
                return Err(format!("not ready: NATS is {nats:?}"));
            }
            readiness(&health.last())
        })
    }
}

/// The `/readyz` answer once NATS is connected. The object store does not
/// make the worker unready: only messages over `raw_size_limit` need it.
fn readiness(c: &Checked) -> Result<String, String> {
    match &c.store {
        None => return Err("not ready: waiting for Cassandra's first answer".into()),
        Some(Err(e)) => return Err(format!("not ready: {e}")),
        Some(Ok(())) => {}
    }
    Ok(match &c.objects {
        None => "ready: NATS and Cassandra answer".into(),
        Some(Ok(())) => "ready: NATS, Cassandra and the object store answer".into(),
        Some(Err(e)) => format!(
            "ready: NATS and Cassandra answer; the object store does not ({e}): \
             messages over raw_size_limit wait until it does"
        ),
    })
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
    // The `need_job` in flight (one at a time), with the slot it holds. It
    // waits in its own branch: a poller slow to answer (up to the request's
    // 5 s timeout) never holds up the reading of orders.
    let mut pulling: Option<BoxFuture<'static, Pulled>> = None;
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
            _ = tokio::time::sleep_until(pull_at),
                if pulling.is_none() && pools.slots.available_permits() > 0 => {
                pulling = start_pull(&ctx, &pools, &mut pulls);
            }
            (job, permit) = async { pulling.as_mut().expect("guarded").await }, if pulling.is_some() => {
                pulling = None;
                run_pulled(&ctx, &mut pulls, &mut jobs, job, permit);
            }
        }
    }

    // No new work from here on; a pull still waiting gives its slot back.
    drop(pulling);
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

/// A pull's answer and the job slot it held while waiting for it.
type Pulled = (Option<Job>, OwnedSemaphorePermit);

/// Take a free slot and ask the poller for a job for it; `None` when an
/// order took the slot meanwhile. The slot stays taken until the answer:
/// a job runs in it, or it is freed when there is none.
fn start_pull(ctx: &Ctx, pools: &Pools, pulls: &mut Pulls) -> Option<BoxFuture<'static, Pulled>> {
    let permit = pools.slots.clone().try_acquire_owned().ok()?;
    pulls.sent();
    let ctx = ctx.clone();
    Some(Box::pin(async move { (pull_job(&ctx).await, permit) }))
}

/// Run a pulled job in the slot its pull held; with none, free the slot
/// and pull again only a throttle period later.
fn run_pulled(
    ctx: &Ctx,
    pulls: &mut Pulls,
    jobs: &mut JoinSet<()>,
    job: Option<Job>,
    permit: OwnedSemaphorePermit,
) {
    match job {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_store_never_makes_the_worker_unready() {
        let checked = |store, objects| Checked { store, objects };
        assert!(readiness(&checked(None, None)).is_err());
        let down = readiness(&checked(Some(Err("no host".into())), None)).unwrap_err();
        assert!(down.contains("no host"), "{down}");
        let ok = readiness(&checked(Some(Ok(())), None)).unwrap();
        assert_eq!(ok, "ready: NATS and Cassandra answer");
        let s3_down = readiness(&checked(Some(Ok(())), Some(Err("refused".into())))).unwrap();
        assert!(
            s3_down.contains("refused") && s3_down.contains("messages over raw_size_limit wait"),
            "{s3_down}"
        );
        assert!(readiness(&checked(Some(Ok(())), Some(Ok(()))))
            .unwrap()
            .contains("object store answer"));
    }
}
