//! idpoller: schedule a periodic sync job for every active remote identity
//! and serve the jobs to workers.
//!
//! The Go poller kept its schedule and queues in one process's memory. Here
//! any number of pollers may run; exactly one — the holder of the Cassandra
//! lease (`store/lease.rs`) — schedules and serves. The others wait and try
//! to take the lease every third of its TTL, so a standby takes over within
//! about one TTL (15 s by default) of the leader's death. A new leader
//! rebuilds everything from Cassandra: every identity whose `last_check` is
//! older than its interval is due at once, so no sync is skipped by a
//! restart or a switch. The leader alone subscribes to the job subjects and
//! `idCache`, so a job is popped from exactly one queue; should a switch hand
//! out a job twice, the workers' sync lock makes the second a no-op.
//!
//! SIGHUP re-reads the configuration (scan interval, protocols, topics).

pub mod orders;
pub mod renew;
pub mod scan;
pub mod schedule;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bus::{Bus, Message, Retry, Subscriber};
use crate::cli::PollerArgs;
use crate::config::{self, PollerSettings};
use crate::metrics::PollerMetrics;
use crate::shutdown::Shutdown;
use crate::store::health::Health;
use crate::store::{Store, StoreError};
use schedule::{Kind, Schedule};

pub async fn run(
    args: PollerArgs,
    settings: PollerSettings,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    // Served before the services answer, so /readyz can say they do not.
    let metrics = PollerMetrics::new();
    let probe = Arc::new(Probe {
        metrics: metrics.clone(),
        parts: OnceLock::new(),
    });
    if !settings.metrics_addr.trim().is_empty() {
        crate::http::start(&settings.metrics_addr, probe.clone(), shutdown.clone()).await?;
    }
    let store = Store::connect_retrying(&settings.store_settings, shutdown.clone()).await?;
    let bus = Bus::connect(
        &settings.nats_url,
        "idpoller",
        Retry::Forever,
        shutdown.clone(),
    )
    .await?;
    let health = Health::start(store.clone(), None, shutdown.clone()).await;
    let _ = probe.parts.set((health, bus.clone()));
    let path = config::config_path(args.config.as_deref(), "idpoller");
    let owner = format!(
        "{}-{}-{:04x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "idpoller".into()),
        std::process::id(),
        fastrand::u16(..)
    );
    let mut poller = Poller {
        settings,
        path,
        store,
        bus,
        owner,
        shutdown,
        metrics,
    };
    poller.run().await?;
    Ok(ExitCode::SUCCESS)
}

struct Poller {
    settings: PollerSettings,
    /// Where SIGHUP re-reads the configuration from.
    path: Option<PathBuf>,
    store: Store,
    bus: Bus,
    /// Our name in the lease.
    owner: String,
    shutdown: Shutdown,
    metrics: Arc<PollerMetrics>,
}

/// Shows the lease held in the metrics while it lives; on drop (however
/// leading ends) the gauges fall back to a standby's.
struct Leading(Arc<PollerMetrics>);

impl Leading {
    fn new(m: Arc<PollerMetrics>) -> Leading {
        m.lease_held.set(1);
        Leading(m)
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.lease_held.set(0);
        self.0.scheduled.set(0);
        for k in Kind::ALL {
            self.0.set_queued(k.name(), 0);
        }
    }
}

/// What the poller's `/metrics` and `/readyz` answer.
struct Probe {
    metrics: Arc<PollerMetrics>,
    /// Set once Cassandra and NATS were reached.
    parts: OnceLock<(Health, Bus)>,
}

impl crate::http::Probe for Probe {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    /// Ready when NATS is connected and Cassandra answered the last
    /// background check (no query per probe); says whether
    /// this poller leads or stands by (both are ready).
    fn ready(&self) -> futures::future::BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let Some((health, bus)) = self.parts.get() else {
                return Err("not ready: connecting to Cassandra and NATS".into());
            };
            let nats = bus.client().connection_state();
            if nats != async_nats::connection::State::Connected {
                return Err(format!("not ready: NATS is {nats:?}"));
            }
            // The last background check: no query here (store::health).
            match health.last().store {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(format!("not ready: {e}")),
                None => return Err("not ready: waiting for Cassandra's first answer".into()),
            }
            let role = if self.metrics.lease_held.get() == 1 {
                "leading"
            } else {
                "standby"
            };
            Ok(format!("ready: {role}"))
        })
    }
}

/// The leader's subscriptions.
struct Subs {
    imap: Subscriber,
    twitter: Subscriber,
    mastodon: Subscriber,
    cache: Subscriber,
}

enum Led {
    Shutdown,
    LostLease,
}

impl Poller {
    fn lease_ttl(&self) -> Duration {
        self.settings.poller.lease_ttl()
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let mut shutdown = self.shutdown.clone();
        let mut hup = signal(SignalKind::hangup())?;
        tracing::info!(owner = %self.owner, "idpoller started: waiting for the lease");
        loop {
            // Standby until we hold the lease.
            let ttl = self.lease_ttl();
            let asked = Instant::now();
            match self
                .store
                .hold_lease(
                    &self.settings.poller.lease_name,
                    &self.owner,
                    ttl.as_secs() as u32,
                )
                .await
            {
                Ok(true) => {
                    tracing::info!(owner = %self.owner, "lease taken: this poller is the leader");
                    match self.lead(&mut hup, asked).await {
                        Ok(Led::Shutdown) => {
                            let _ = self
                                .store
                                .drop_lease(&self.settings.poller.lease_name, &self.owner)
                                .await;
                            break;
                        }
                        Ok(Led::LostLease) => {
                            tracing::warn!("lease lost: back to standby");
                            continue;
                        }
                        // Never a dead daemon: give the lease up so a
                        // standby can serve, and try again later.
                        Err(e) => {
                            tracing::error!(error = %e, "cannot lead: stepping down");
                            let _ = self
                                .store
                                .drop_lease(&self.settings.poller.lease_name, &self.owner)
                                .await;
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reach the lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(ttl / 3) => {}
                _ = shutdown.wait() => break,
                _ = hup.recv() => self.reload(),
            }
        }
        tracing::info!("idpoller stopped");
        Ok(())
    }

    /// SIGHUP: re-read the configuration; a bad file keeps the old one.
    fn reload(&mut self) {
        match config::load::<PollerSettings>(self.path.as_deref()).and_then(|s| {
            s.validate()
                .map(|_| s)
                .map_err(|e| config::invalid(self.path.as_deref(), e))
        }) {
            Ok(s) => {
                tracing::info!(
                    scan_interval = s.scan_interval,
                    protocols = ?s.remote_protocols,
                    "configuration reloaded"
                );
                self.settings = s;
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused, keeping the running configuration")
            }
        }
    }

    async fn subscribe(&self) -> anyhow::Result<Subs> {
        let t = &self.settings.nats_topics;
        let q = &self.settings.nats_queue;
        Ok(Subs {
            imap: self.bus.queue_subscribe(&t.imap, q).await?,
            twitter: self.bus.queue_subscribe(&t.twitter, q).await?,
            mastodon: self.bus.queue_subscribe(&t.mastodon, q).await?,
            cache: self.bus.queue_subscribe(&t.id_cache, q).await?,
        })
    }

    /// Lead: scan, schedule and serve until shutdown or the lease is lost.
    /// `held_since` is when the request that took the lease was sent.
    async fn lead(
        &mut self,
        hup: &mut tokio::signal::unix::Signal,
        held_since: Instant,
    ) -> anyhow::Result<Led> {
        let minute = self.settings.poller.minute();
        let _leading = Leading::new(self.metrics.clone());
        let (scan_tx, scan_rx) = mpsc::channel(1);
        let mut lead = Lead {
            sched: Schedule::new(minute, self.settings.poller.queue_limit),
            subs: self.subscribe().await?,
            scan_tx,
            scan_rx,
            next_scan: Some(Instant::now()),
            renewal: self.spawn_renewal(held_since),
        };
        let mut shutdown = self.shutdown.clone();
        let outcome = loop {
            self.show_schedule(&mut lead.sched);
            self.start_scan_if_due(&mut lead);
            match lead.next_event(hup, &mut shutdown).await {
                Event::Shutdown => break Led::Shutdown,
                Event::Hangup => self.hangup(&mut lead).await?,
                Event::LeaseLost(why) => {
                    tracing::warn!(why = ?why.ok(), "stepping down: the lease is not ours for sure any more");
                    break Led::LostLease;
                }
                Event::Scanned(res) => self.scanned(&mut lead, res),
                Event::Due => {
                    let n = lead.sched.release_due(Instant::now());
                    if n > 0 {
                        tracing::debug!(jobs = n, queued = lead.sched.queued(), "jobs due");
                    }
                }
                Event::NeedJob(kind, m) => self.serve_job(&mut lead.sched, kind, m).await,
                Event::Cache(m) => {
                    match orders::cache_order(
                        &mut lead.sched,
                        &self.settings.remote_protocols,
                        &m.payload,
                    ) {
                        Ok(what) => tracing::info!(subject = %m.subject, "{what}"),
                        Err(e) => {
                            tracing::warn!(subject = %m.subject, error = %e, "bad cache order")
                        }
                    }
                }
            }
        };
        // Stop serving before anyone else may lead.
        lead.subs.unsubscribe().await;
        let _ = self.bus.flush().await;
        lead.sched.clear();
        Ok(outcome)
    }

    /// The renewal runs beside the serving loop (`renew.rs`), so a slow
    /// Cassandra never delays a `need_job` answer; its end means "step
    /// down". Aborted when we stop leading.
    fn spawn_renewal(&self, held_since: Instant) -> AbortOnDrop<renew::Lost> {
        let store = self.store.clone();
        let name = self.settings.poller.lease_name.clone();
        let owner = self.owner.clone();
        let ttl = self.lease_ttl();
        AbortOnDrop(tokio::spawn(async move {
            renew::keep(ttl, held_since, move || {
                let (store, name, owner) = (store.clone(), name.clone(), owner.clone());
                async move { store.hold_lease(&name, &owner, ttl.as_secs() as u32).await }
            })
            .await
        }))
    }

    /// SIGHUP while leading: re-read the file, subscribe again when the
    /// topics changed, and apply new protocols and interval with a fresh
    /// scan (after the running one, if any).
    async fn hangup(&mut self, lead: &mut Lead) -> anyhow::Result<()> {
        let before = self.settings.nats_topics.clone();
        self.reload();
        let t = &self.settings.nats_topics;
        if t.imap != before.imap
            || t.twitter != before.twitter
            || t.mastodon != before.mastodon
            || t.id_cache != before.id_cache
        {
            lead.subs = self.subscribe().await?;
        }
        if lead.next_scan.is_some() {
            lead.next_scan = Some(Instant::now());
        }
        Ok(())
    }

    fn show_schedule(&self, sched: &mut Schedule) {
        self.metrics.scheduled.set(sched.len() as i64);
        for k in Kind::ALL {
            self.metrics.set_queued(k.name(), sched.queued_of(k));
        }
    }

    /// Start a scan in a task of its own when one is due; its result comes
    /// back as [`Event::Scanned`].
    fn start_scan_if_due(&self, lead: &mut Lead) {
        if lead.next_scan.is_none_or(|t| Instant::now() < t) {
            return;
        }
        lead.next_scan = None;
        let store = self.store.clone();
        let protocols = self.settings.remote_protocols.clone();
        let tx = lead.scan_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(scan::scan(&store, &protocols).await).await;
        });
    }

    /// A scan ended: apply it, and say when the next one starts.
    fn scanned(&self, lead: &mut Lead, res: Option<Result<scan::ScanResult, StoreError>>) {
        let minute = self.settings.poller.minute();
        let scan_every = minute * self.settings.scan_interval.max(1) as u32;
        let mut next = Instant::now() + scan_every;
        match res {
            Some(Ok(r)) => {
                self.metrics.scan_seconds.observe(r.elapsed.as_secs_f64());
                apply_scan(&mut lead.sched, r);
            }
            Some(Err(e)) => {
                self.metrics.scans_failed.inc();
                tracing::error!(error = %e, "scan failed, retrying in a minute");
                next = Instant::now() + minute.min(scan_every);
            }
            None => {}
        }
        lead.next_scan = Some(next);
    }

    async fn serve_job(&self, sched: &mut Schedule, kind: Kind, m: Message) {
        // Due jobs first, so a request never waits for the next tick.
        sched.release_due(Instant::now());
        let reply = orders::answer_need_job(sched, kind, &m.payload);
        let wire = reply.wire();
        if reply.is_error() {
            tracing::warn!(subject = %m.subject, reply = %wire.order, "bad job request");
        }
        self.metrics.served(reply.outcome());
        self.bus.reply(&m, &wire).await;
    }
}

/// The leader's state between two events.
struct Lead {
    sched: Schedule,
    subs: Subs,
    /// Scans run in a task; their results come back here.
    scan_tx: mpsc::Sender<Result<scan::ScanResult, StoreError>>,
    scan_rx: mpsc::Receiver<Result<scan::ScanResult, StoreError>>,
    /// When the next scan starts; `None` while one runs.
    next_scan: Option<Instant>,
    /// The lease renewal; its end means "step down".
    renewal: AbortOnDrop<renew::Lost>,
}

/// What woke the leader.
enum Event {
    Shutdown,
    Hangup,
    LeaseLost(Result<renew::Lost, tokio::task::JoinError>),
    Scanned(Option<Result<scan::ScanResult, StoreError>>),
    /// A job or a scan came due.
    Due,
    NeedJob(Kind, Message),
    Cache(Message),
}

impl Lead {
    /// The one wait of the leader, as in stalwart's housekeeper: until the
    /// next due time (a job or a scan; none while nothing is scheduled and
    /// a scan runs) or the first message, signal or task end.
    async fn next_event(
        &mut self,
        hup: &mut tokio::signal::unix::Signal,
        shutdown: &mut Shutdown,
    ) -> Event {
        let wake = match (self.sched.next_due(), self.next_scan) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let due = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let subs = &mut self.subs;
        tokio::select! {
            _ = shutdown.wait() => Event::Shutdown,
            _ = hup.recv() => Event::Hangup,
            lost = &mut self.renewal.0 => Event::LeaseLost(lost),
            res = self.scan_rx.recv() => Event::Scanned(res),
            _ = due => Event::Due,
            Some(m) = subs.imap.next() => Event::NeedJob(Kind::Imap, m),
            Some(m) = subs.twitter.next() => Event::NeedJob(Kind::Twitter, m),
            Some(m) = subs.mastodon.next() => Event::NeedJob(Kind::Mastodon, m),
            Some(m) = subs.cache.next() => Event::Cache(m),
        }
    }
}

impl Subs {
    async fn unsubscribe(&mut self) {
        for s in [
            &mut self.imap,
            &mut self.twitter,
            &mut self.mastodon,
            &mut self.cache,
        ] {
            let _ = s.unsubscribe().await;
        }
    }
}

/// A task handle that aborts its task when dropped, so no renewal outlives
/// the leadership it was for.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Make the schedule match a scan: add the new, drop the gone, reschedule
/// the changed. Identities already scheduled with the same interval keep
/// their due time.
fn apply_scan(sched: &mut Schedule, r: scan::ScanResult) {
    let mut added = 0;
    let mut changed = 0;
    let gone: Vec<_> = sched
        .keys()
        .filter(|k| !r.targets.contains_key(k))
        .copied()
        .collect();
    for k in &gone {
        sched.remove(k);
    }
    for (key, t) in r.targets {
        match sched.interval(&key) {
            Some(i) if *i == t.interval => {}
            Some(_) => {
                changed += 1;
                sched.upsert(key, t.kind, t.interval, t.last_check);
            }
            None => {
                added += 1;
                sched.upsert(key, t.kind, t.interval, t.last_check);
            }
        }
    }
    tracing::info!(
        rows = r.rows,
        scheduled = sched.len(),
        added,
        removed = gone.len(),
        changed,
        elapsed_ms = r.elapsed.as_millis() as u64,
        "scan applied"
    );
}
