//! The cluster scenario of the fault suite (`make faults-cluster`, driven by
//! `scripts/faults-cluster.sh`, which starts a 3-node Cassandra at
//! replication factor 3 and a 3-node NATS cluster first). It exists because
//! the claims "nothing lost, nothing doubled" and "a standby poller takes
//! over" depend on consistency levels and client fail-over that a single
//! node never exercises.
//!
//! Two workers and two pollers run on the cluster with the shipped configs,
//! `consistency_level: 4` (QUORUM) and every server listed. The accounts
//! are synced by the pollers' jobs (`pollinterval` 15 with `minute_secs: 1`,
//! so every 15 s), as in production; while they sync, the harness kills
//! (SIGKILL) one Cassandra node, one NATS node and the leading poller, at
//! seeded points of the hand-offs. At the end it orders syncs until each
//! account has nothing left, then counts as every scenario does
//! ([`Case::count`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use caliopen_imap::config;
use caliopen_imap::store::Store;
use uuid::Uuid;

use crate::case::{Case, Row};
use crate::common::start_daemon;
use crate::env::Env;
use crate::kit::{fnv, var, var_or, Daemon};
use crate::suite::Suite;

/// What the leader logs once it holds the lease, and what a standby logs.
const LEADER_READY: &str = "this poller is the leader";
const STANDBY_READY: &str = "waiting for the lease";
const SERVED: &str = "caliopen_idpoller_need_job_total{result=\"served\"}";
const LEASE_HELD: &str = "caliopen_idpoller_lease_held";
/// The tables written only by lightweight transactions.
const LWT_TABLES: [&str; 3] = ["imap_sync_lock", "imap_idle_lease", "idpoller_lease"];

/// Pid files of the cluster's servers, from the driver script.
fn pid_files(var_name: &str) -> Result<Vec<PathBuf>> {
    let v = var(var_name)?;
    Ok(v.split(',').map(PathBuf::from).collect())
}

fn kill9_from(pid_file: &Path) -> Result<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .with_context(|| format!("cannot read {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("no pid in {}", pid_file.display()))?;
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    if !st.success() {
        bail!("kill -9 {pid} ({}) failed", pid_file.display());
    }
    Ok(pid)
}

/// A loopback address nothing listens on now, for a poller's metrics.
fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// One value of a daemon's `/metrics` (`name` with its labels), if it answers.
async fn metric(addr: &str, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .ok()
        .flatten()
}

/// A poller on the cluster: jobs every 15 s (`pollinterval` 15 with a
/// 1-second "minute"), its metrics on `metrics`.
async fn start_cluster_poller(env: &Env, metrics: &str, ready: &'static str) -> Result<Daemon> {
    let p = config::ENV_PREFIX;
    let mut denv = env.poller_env();
    denv.push((format!("{p}POLLER__MINUTE_SECS"), "1".into()));
    denv.push((format!("{p}METRICS_ADDR"), metrics.into()));
    start_daemon(env, "poller", denv, ready).await
}

/// A worker on the cluster, with `in_flight` hand-offs per sync.
async fn start_cluster_worker(env: &Env, in_flight: u32) -> Result<Daemon> {
    let mut denv = env.daemon_env();
    denv.push((
        format!("{}IMAP__IN_FLIGHT", config::ENV_PREFIX),
        in_flight.to_string(),
    ));
    start_daemon(env, "worker", denv, "imapworker ready").await
}

/// Retry a read of the harness a few times: a request that was in flight
/// to the node just killed fails, and the driver needs a moment to route
/// around it (the daemons' own failures are what the run measures).
async fn retried<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tries < 10 => {
                tries += 1;
                eprintln!("[faults] cluster: {what} failed ({e:#}), again in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Snapshot the delivered ids of every account, stamped when the read
/// ended: a later hand-off of one of them is an extra hand-off. (Syncs go
/// on during the read; stamping its start could count a repeat that was in
/// flight as extra.)
async fn snapshot_all(cases: &mut [Case], store: &Store) -> Result<()> {
    for c in cases.iter_mut() {
        let set = retried("a snapshot", || c.delivered(store)).await?;
        c.snapshots.push((Instant::now(), set));
    }
    Ok(())
}

/// One fault of the run.
struct Kill {
    what: String,
    at: Instant,
    /// Accounts with hand-offs still to come when it struck.
    unfinished: Vec<Uuid>,
}

/// The run's settings (environment) and the cluster's pid files, from the
/// driver script.
struct Knobs {
    accounts: u32,
    /// How late the stand-in answers, so the syncs last long enough.
    delay: Duration,
    in_flight: u32,
    /// How long the pollers' syncs are waited for.
    limit: Duration,
    cass: Vec<PathBuf>,
    nats: Vec<PathBuf>,
}

impl Knobs {
    fn load() -> Result<Knobs> {
        Ok(Knobs {
            accounts: var_or("FAULTS_CLUSTER_ACCOUNTS", 3)?,
            delay: Duration::from_millis(var_or("FAULTS_CLUSTER_DELAY_MS", 500)?),
            in_flight: var_or("FAULTS_CLUSTER_IN_FLIGHT", 8)?,
            limit: Duration::from_secs(var_or("FAULTS_CLUSTER_MAX_SECS", 600)?),
            cass: pid_files("FAULTS_CLUSTER_CASS_PIDS")?,
            nats: pid_files("FAULTS_CLUSTER_NATS_PIDS")?,
        })
    }
}

/// The scenario's state from start to count: its accounts, its daemons,
/// the faults struck and what the standby poller did after the leader's.
struct Run<'a> {
    suite: &'a Suite,
    knobs: Knobs,
    row: Row,
    rng: fastrand::Rng,
    cases: Vec<Case>,
    /// Messages of every account.
    total: usize,
    workers: Vec<Daemon>,
    /// The pollers' metrics addresses; a killed poller's slot is `None`.
    addrs: [String; 2],
    pollers: Vec<Option<Daemon>>,
    t0: Instant,
    kills: Vec<Kill>,
    /// (kill time, the survivor's index): waiting for the standby to serve.
    poller_watch: Option<(Instant, usize)>,
    lease_after: Option<Duration>,
    served_after: Option<Duration>,
}

pub async fn scenario(suite: &Suite) -> Result<Row> {
    let mut run = Run::start(suite).await?;
    run.strike_faults().await?;
    let synced_in = run.t0.elapsed();
    run.complete().await?;
    run.recovery();
    run.notes(synced_in);
    run.count_all().await?;
    run.outages();
    run.stop().await
}

impl<'a> Run<'a> {
    /// The accounts, then 2 workers and 2 pollers (the first takes the
    /// lease and schedules the accounts at once).
    async fn start(suite: &'a Suite) -> Result<Run<'a>> {
        let env = &suite.env;
        let knobs = Knobs::load()?;
        let row = Row {
            name: "Cassandra node, NATS node, leading poller killed".into(),
            ..Default::default()
        };
        let rng = fastrand::Rng::with_seed(env.seed ^ fnv("cluster"));
        let mut cases = Vec::new();
        for i in 0..knobs.accounts {
            cases.push(Case::new(env, &suite.store, &format!("cluster{i}"), env.messages).await?);
        }
        let total = cases.len() * env.messages as usize;
        // Answers 500 ms late, 8 in flight per sync: 16 messages/s per account
        // at most, so the syncs last about a minute, long enough for three
        // faults and a poller fail-over (unthrottled, 3 × 1,000 took 12 s).
        suite.standin.set_delay(knobs.delay);
        let workers = vec![
            start_cluster_worker(env, knobs.in_flight).await?,
            start_cluster_worker(env, knobs.in_flight).await?,
        ];
        let addrs = [free_addr()?, free_addr()?];
        let pollers = vec![
            Some(start_cluster_poller(env, &addrs[0], LEADER_READY).await?),
            Some(start_cluster_poller(env, &addrs[1], STANDBY_READY).await?),
        ];
        Ok(Run {
            suite,
            knobs,
            row,
            rng,
            cases,
            total,
            workers,
            addrs,
            pollers,
            t0: Instant::now(),
            kills: Vec::new(),
            poller_watch: None,
            lease_after: None,
            served_after: None,
        })
    }

    /// While the pollers' jobs sync the accounts: the three kills at their
    /// seeded points, then until everything is handed off and the standby
    /// poller served (or the time limit).
    async fn strike_faults(&mut self) -> Result<()> {
        let total = self.total;
        let rng = &mut self.rng;
        let frac =
            |rng: &mut fastrand::Rng, lo: f64| (total as f64 * (lo + rng.f64() * 0.1)) as usize;
        let points = [frac(rng, 0.10), frac(rng, 0.35), frac(rng, 0.55)];
        loop {
            let progress: usize = self
                .cases
                .iter()
                .map(|c| self.suite.standin.distinct_of(c.user))
                .sum();
            for w in self.workers.iter_mut() {
                w.check().await?;
            }
            for p in self.pollers.iter_mut().flatten() {
                p.check().await?;
            }
            let next = self.kills.len();
            if next < points.len() && progress >= points[next] {
                self.strike(next, progress).await?;
            }
            self.watch_standby().await;
            let poller_settled = self.kills.len() == points.len() && self.poller_watch.is_none();
            if progress >= total && poller_settled {
                break;
            }
            if self.t0.elapsed() > self.knobs.limit {
                self.row.notes.push(format!(
                    "stopped waiting after {} s: {progress}/{total} handed off, {} faults",
                    self.knobs.limit.as_secs(),
                    self.kills.len()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Fault number `next`: a Cassandra node, a NATS node, then the poller
    /// that holds the lease, each SIGKILLed.
    async fn strike(&mut self, next: usize, progress: usize) -> Result<()> {
        let messages = self.suite.env.messages as usize;
        let unfinished = self
            .cases
            .iter()
            .filter(|c| self.suite.standin.distinct_of(c.user) < messages)
            .map(|c| c.user)
            .collect();
        let what = match next {
            0 => {
                let i = self.rng.usize(..self.knobs.cass.len());
                let pid = kill9_from(&self.knobs.cass[i])?;
                format!("Cassandra node {} (pid {pid})", i + 1)
            }
            1 => {
                let i = self.rng.usize(..self.knobs.nats.len());
                let pid = kill9_from(&self.knobs.nats[i])?;
                format!("NATS node {} (pid {pid})", i + 1)
            }
            _ => self.kill_leader().await?,
        };
        let at = Instant::now();
        let total = self.total;
        eprintln!(
            "[faults] cluster: killed {what} at {progress}/{total} hand-offs ({:.1} s)",
            (at - self.t0).as_secs_f64()
        );
        self.row.notes.push(format!(
            "killed {what} at {progress}/{total} hand-offs, {:.1} s into the run",
            (at - self.t0).as_secs_f64()
        ));
        self.kills.push(Kill {
            what,
            at,
            unfinished,
        });
        self.row.rounds += 1;
        // Delivered by now and handed off again later: extra.
        snapshot_all(&mut self.cases, &self.suite.store).await
    }

    /// SIGKILL the poller whose metrics say it holds the lease, and watch
    /// the other from now on.
    async fn kill_leader(&mut self) -> Result<String> {
        let mut leader = None;
        for (i, a) in self.addrs.iter().enumerate() {
            if self.pollers[i].is_some() && metric(a, LEASE_HELD).await == Some(1.0) {
                leader = Some(i);
            }
        }
        let i = leader.ok_or_else(|| anyhow!("no poller says it holds the lease"))?;
        let mut p = self.pollers[i].take().expect("checked above");
        let pid = p.pid().unwrap_or(0);
        p.kill9().await?;
        self.poller_watch = Some((Instant::now(), 1 - i));
        Ok(format!("leading poller {} (pid {pid})", i + 1))
    }

    /// After the leader's kill: when the standby held the lease, and when
    /// it served its first job (given up after 120 s).
    async fn watch_standby(&mut self) {
        let poller_limit = Duration::from_secs(120);
        let Some((t, j)) = self.poller_watch else {
            return;
        };
        if self.lease_after.is_none() && metric(&self.addrs[j], LEASE_HELD).await == Some(1.0) {
            self.lease_after = Some(t.elapsed());
        }
        if metric(&self.addrs[j], SERVED).await.unwrap_or(0.0) > 0.0 {
            self.served_after = Some(t.elapsed());
            self.poller_watch = None;
        } else if t.elapsed() > poller_limit {
            self.poller_watch = None;
        }
    }

    /// Whatever the pollers left: order syncs until each account is complete.
    async fn complete(&mut self) -> Result<()> {
        self.suite.standin.set_delay(Duration::ZERO);
        snapshot_all(&mut self.cases, &self.suite.store).await?;
        for c in self.cases.iter_mut() {
            if !c
                .sync_until_complete(&self.suite.client, &mut self.workers[0], Instant::now())
                .await?
            {
                self.row.blocked = true;
            }
        }
        Ok(())
    }

    /// Recovery: for the nodes, until every account that still had work
    /// handed off again; for the poller, until the standby served a job.
    /// "Again" is the (in_flight + 1)-th hand-off after the kill: the first
    /// `in_flight` may have been stored before it and sent just after.
    fn recovery(&mut self) {
        let in_flight = self.knobs.in_flight;
        let mut shown = Vec::new();
        for (k, kill) in self.kills.iter().enumerate() {
            let rec = if k == 2 {
                self.served_after
            } else {
                kill.unfinished
                    .iter()
                    .map(|u| {
                        let after: Vec<Instant> = self
                            .suite
                            .standin
                            .records_of(*u)
                            .iter()
                            .map(|r| r.at)
                            .filter(|t| *t > kill.at)
                            .collect();
                        after.get(in_flight as usize).map(|t| *t - kill.at)
                    })
                    .try_fold(Duration::ZERO, |m, d| d.map(|d| m.max(d)))
            };
            self.row.recover.push(rec);
            let label = ["Cassandra", "NATS", "poller"][k];
            shown.push(match rec {
                Some(d) => format!("{label} {:.1} s", d.as_secs_f64()),
                None => format!("{label} not recovered"),
            });
            if rec.is_none() {
                self.row
                    .failures
                    .push(format!("no recovery after the kill of the {}", kill.what));
            }
        }
        self.row.recover_text = Some(shown.join(" · "));
    }

    /// The standby's take-over and the run's shape, for the report.
    fn notes(&mut self, synced_in: Duration) {
        let env = &self.suite.env;
        self.row.notes.push(format!(
            "the standby poller held the lease {} and served its first job {} after the leader's kill (lease_ttl_secs 15)",
            self.lease_after.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            self.served_after.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        ));
        self.row.notes.push(format!(
            "{} accounts × {} messages handed off in {:.0} s by the pollers' jobs ({} in flight per sync, answers {} ms late); consistency_level {} (4 = QUORUM), LWTs at SERIAL; Cassandra heap {} per node",
            self.knobs.accounts,
            env.messages,
            synced_in.as_secs_f64(),
            self.knobs.in_flight,
            self.knobs.delay.as_millis(),
            env.consistency,
            std::env::var("FAULTS_CLUSTER_HEAP").unwrap_or_else(|_| "?".into())
        ));
    }

    /// Every account counted as a single-node scenario counts it, summed.
    async fn count_all(&mut self) -> Result<()> {
        let suite = self.suite;
        for c in &self.cases {
            let r = retried("counting", || async {
                let mut r = Row::default();
                c.count(&suite.store, &suite.standin, &mut r).await?;
                Ok(r)
            })
            .await?;
            let row = &mut self.row;
            row.messages += r.messages;
            row.missing += r.missing;
            row.duplicates += r.duplicates;
            row.undelivered += r.undelivered;
            row.extra += r.extra;
            row.inflight += r.inflight;
            row.late += r.late;
            row.stepped += r.stepped;
            row.notes.extend(r.notes);
        }
        Ok(())
    }

    /// What the daemons went through, from their logs (the killed
    /// poller's not counted).
    fn outages(&mut self) {
        let mut logs: Vec<PathBuf> = self.workers.iter().map(|w| w.log.clone()).collect();
        logs.extend(self.pollers.iter().flatten().map(|p| p.log.clone()));
        let text: String = logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect();
        judge_outages(&text, &mut self.row);
    }

    async fn stop(mut self) -> Result<Row> {
        for w in self.workers {
            self.row.crashes += w.stop().await?;
        }
        for p in self.pollers.into_iter().flatten() {
            self.row.crashes += p.stop().await?;
        }
        Ok(self.row)
    }
}

/// The syncs that ended on an outage, by cause. A lightweight transaction
/// (lock, leases) is never sent again by the driver: one that met the dead
/// node may stop its sync. Any other statement is idempotent and goes to
/// the next node: a running sync must carry on (docs/operations.md,
/// "Running on a cluster"). A session the driver left with no node (see
/// the renewals below) fails its statement at once, idempotent or not.
fn judge_outages(text: &str, row: &mut Row) {
    let outages: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sync ended with errors") && l.contains("outage=true"))
        .collect();
    let (no_node, cassandra): (Vec<&str>, Vec<&str>) = outages
        .iter()
        .filter(|l| l.contains("Cassandra"))
        .partition(|l| l.contains("No nodes available"));
    let (by_lwt, by_cassandra): (Vec<&str>, Vec<&str>) = cassandra
        .iter()
        .partition(|l| LWT_TABLES.iter().any(|t| l.contains(t)));
    if !by_cassandra.is_empty() {
        row.failures.push(format!(
            "{} syncs stopped by a failed Cassandra statement that the driver could have sent to another node",
            by_cassandra.len()
        ));
        for l in by_cassandra.iter().take(3) {
            row.notes.push(format!("stopped: {l}"));
        }
    }
    let renewals = text
        .lines()
        .filter(|l| l.contains("no node left to send to: opening a new one"))
        .count();
    row.notes.push(format!(
        "syncs ended by an outage on our side (then resumed by a later job): {} in all; by a Cassandra statement other than a lightweight transaction (required 0): {}; by a lightweight transaction (lock or lease, never resent): {}; by a session left with no node: {}; Cassandra sessions replaced because the driver had no node left: {renewals} (the killed poller's log not counted)",
        outages.len(),
        by_cassandra.len(),
        by_lwt.len(),
        no_node.len()
    ));
}
