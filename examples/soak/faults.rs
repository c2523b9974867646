//! The fault injector: a seeded schedule of the faults production meets,
//! one at a time, spread over the load: kill -9 and SIGTERM of workers and
//! pollers (each started again), NATS, Cassandra, Dovecot and S3 restarts,
//! a 30 s processor outage and a slow processor, a storm of sync orders,
//! and `imapctl unlock --force` of a running sync. Each fault is logged as
//! a window of time, so the checks can tell a repeat at a fault from one
//! without, and the latency picture can mark them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::kit;
use crate::setup::{Env, Fleet, Ident, Mode, Recorder};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Kill9Worker,
    TermWorker,
    Kill9Poller,
    TermPoller,
    Restart(&'static str),
    ProcessorOutage,
    ProcessorSlow,
    Storm,
    Unlock,
}

pub const KINDS: [Kind; 12] = [
    Kind::Kill9Worker,
    Kind::TermWorker,
    Kind::Kill9Poller,
    Kind::TermPoller,
    Kind::Restart("nats"),
    Kind::Restart("cassandra"),
    Kind::Restart("dovecot"),
    Kind::Restart("s3"),
    Kind::ProcessorOutage,
    Kind::ProcessorSlow,
    Kind::Storm,
    Kind::Unlock,
];

impl Kind {
    pub fn label(self) -> String {
        match self {
            Kind::Kill9Worker => "kill -9 worker".into(),
            Kind::TermWorker => "SIGTERM worker".into(),
            Kind::Kill9Poller => "kill -9 poller".into(),
            Kind::TermPoller => "SIGTERM poller".into(),
            Kind::Restart(s) => format!("{s} restart"),
            Kind::ProcessorOutage => "processor outage 30 s".into(),
            Kind::ProcessorSlow => "slow processor 30 s".into(),
            Kind::Storm => "storm of sync orders".into(),
            Kind::Unlock => "unlock --force of a running sync".into(),
        }
    }
}

/// One fault as it happened, in seconds since the load started.
#[derive(Clone, Debug)]
pub struct Injected {
    pub kind: Kind,
    pub start: f64,
    pub end: f64,
    pub note: String,
}

/// The faults and when each starts (seconds since the load started): about
/// one every 75 s between 10% and 85% of the run, every kind once before
/// any twice, in a seeded order; at least 4, a worker's kill -9 among them.
pub fn schedule(env: &Env) -> Vec<(f64, Kind)> {
    let secs = env.minutes * 60.0;
    let count = ((secs / 75.0).round() as usize).max(4);
    let mut rng = fastrand::Rng::with_seed(env.seed ^ 0xFA17);
    let mut kinds = Vec::new();
    while kinds.len() < count {
        let mut round = KINDS.to_vec();
        rng.shuffle(&mut round);
        kinds.extend(round);
    }
    kinds.truncate(count);
    // A short run draws only a few: a worker's kill -9 is always one.
    if !kinds.contains(&Kind::Kill9Worker) {
        kinds[0] = Kind::Kill9Worker;
    }
    let (from, to) = (secs * 0.10, secs * 0.85);
    let step = (to - from) / count as f64;
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, k)| (from + step * i as f64, k))
        .collect()
}

/// What a fault needs to reach.
pub struct Targets<'a> {
    pub env: &'a Env,
    pub fleet: &'a mut Fleet,
    pub recorder: &'a Recorder,
    pub client: &'a async_nats::Client,
    pub store: &'a caliopen_imap::store::Store,
    pub idents: &'a [Ident],
    pub rng: &'a mut fastrand::Rng,
}

impl Targets<'_> {
    /// Inject `kind` and wait until it is over (the service back, the
    /// daemon restarted and ready); returns a note for the report.
    pub async fn inject(&mut self, kind: Kind) -> Result<String> {
        let (env, nw, np) = (self.env, self.fleet.workers.len(), self.fleet.pollers.len());
        match kind {
            Kind::Kill9Worker | Kind::TermWorker => {
                let i = self.rng.usize(..nw);
                let d = &mut self.fleet.workers[i];
                stop(d, kind == Kind::Kill9Worker).await?;
                d.restart().await?;
                Ok(format!("worker {}", i + 1))
            }
            Kind::Kill9Poller | Kind::TermPoller => {
                let i = self.rng.usize(..np);
                let d = &mut self.fleet.pollers[i];
                stop(d, kind == Kind::Kill9Poller).await?;
                d.restart().await?;
                Ok(format!("poller {}", i + 1))
            }
            Kind::Restart(service) => {
                let repo = &env.launch.repo;
                kit::stack(repo, "stop", service).await?;
                tokio::time::sleep(Duration::from_secs(5)).await;
                let t = Instant::now();
                kit::stack(repo, "start", service).await?;
                Ok(format!("back in {:.0} s", t.elapsed().as_secs_f64() + 5.0))
            }
            Kind::ProcessorOutage | Kind::ProcessorSlow => {
                let mode = if kind == Kind::ProcessorOutage {
                    Mode::Absent
                } else {
                    Mode::Slow(Duration::from_secs(5))
                };
                self.recorder.set(mode).await?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                self.recorder.set(Mode::Normal).await?;
                Ok(format!("{mode:?}"))
            }
            Kind::Storm => self.storm().await,
            Kind::Unlock => self.unlock().await,
        }
    }

    /// Three sync orders per identity at once, as `imapctl syncremote`
    /// publishes them (no reply asked).
    async fn storm(&mut self) -> Result<String> {
        let mut n = 0;
        for _ in 0..3 {
            for id in self.idents {
                let order = json!({"order": "sync", "user_id": id.user.to_string(),
                    "identity_id": id.identity.to_string(), "login": "", "mailbox": "",
                    "password": "", "server": ""});
                self.client
                    .publish("outboundIMAP", serde_json::to_vec(&order)?.into())
                    .await?;
                n += 1;
            }
        }
        self.client.flush().await?;
        Ok(format!("{n} orders"))
    }

    /// Order a sync of a `*` identity, wait until its lock is taken, then
    /// `imapctl unlock --force` it.
    async fn unlock(&mut self) -> Result<String> {
        let stars: Vec<&Ident> = self.idents.iter().filter(|i| i.star).collect();
        let id = stars[self.rng.usize(..stars.len())];
        let job = tokio::spawn(kit::order_sync(
            self.client.clone(),
            "outboundIMAP".into(),
            id.user,
            id.identity,
            Duration::from_secs(60),
        ));
        let until = Instant::now() + Duration::from_secs(20);
        let mut held = false;
        while Instant::now() < until && !job.is_finished() {
            if self.store.sync_lock(id.user, id.identity).await?.is_some() {
                held = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = self.ctl(&[
            "unlock",
            "--username",
            &format!("{}-user", id.login),
            "--identifier",
            &id.login,
            "--force",
        ])?;
        let o = job.await.unwrap_or_default();
        Ok(format!(
            "{} (lock {}seen); imapctl: {}; the sync: {}",
            id.login,
            if held { "" } else { "not " },
            out.trim(),
            o.report
                .map(|r| r["error"].as_str().unwrap_or("ok").to_string())
                .unwrap_or_else(|| "no report".into())
        ))
    }

    /// `caliopen-imap ctl -c config/imapworker.yaml ARGS` on this stack;
    /// its output (stdout and stderr) and exit code.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        ctl(self.env, args).map(|(code, out, err)| format!("exit {code}: {out}{err}"))
    }
}

/// Run imapctl on this stack: (exit code, stdout, stderr).
pub fn ctl(env: &Env, args: &[&str]) -> Result<(i32, String, String)> {
    let cfg = env.launch.repo.join("config/imapworker.yaml");
    let out = std::process::Command::new(&env.launch.bin)
        .arg("ctl")
        .arg("-c")
        .arg(cfg)
        .args(args)
        .envs(env.worker_env(1000))
        .current_dir(&env.launch.repo)
        .output()
        .context("cannot run imapctl")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn stop(d: &mut kit::Daemon, kill9: bool) -> Result<()> {
    if kill9 {
        d.kill9().await
    } else {
        d.sigterm(Duration::from_secs(40)).await.map(|_| ())
    }
}
