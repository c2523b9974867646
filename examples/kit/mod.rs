//! What the fault suite (`examples/faults/`) and the soak
//! (`examples/soak/`) both need, written once: the daemons they start and
//! watch, `doveadm`, stopping and starting a stack service, following a
//! sync order to its report, and the environment readers. Included by path
//! (`#[path = "../kit/mod.rs"] mod kit;`), as examples cannot share a library.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// Where daemons come from and where their logs go.
#[derive(Clone)]
pub struct Launch {
    /// The caliopen-imap binary.
    pub bin: PathBuf,
    /// The repository (the daemons' working directory).
    pub repo: PathBuf,
    /// The run's folder (daemon logs).
    pub work: PathBuf,
    /// The harness's name in its messages (`faults`, `soak`).
    pub tag: &'static str,
}

pub fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("${name} is not set (source the stack's env)"))
}

pub fn var_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| anyhow!("${name}: not a valid value: {v:?}")),
        _ => Ok(default),
    }
}

/// FNV-1a of `s`: a seed of its own for each named thing of a seeded run.
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

// ------------------------------------------------------------------ daemons
/// A worker or poller subprocess the harness watches: an exit it did not
/// cause is a crash.
pub struct Daemon {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
    pub crashes: u32,
    pub restarts: u32,
    launch: Launch,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ready: &'static str,
}

impl Daemon {
    pub async fn spawn(
        launch: &Launch,
        name: &'static str,
        args: Vec<String>,
        denv: Vec<(String, String)>,
        ready: &'static str,
    ) -> Result<Daemon> {
        // A log per daemon started (restarts append to it).
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let log = launch.work.join(format!("{name}-{n}.log"));
        let child = spawn_daemon(launch, &args, &denv, &log)?;
        let mut d = Daemon {
            name,
            child,
            log,
            crashes: 0,
            restarts: 0,
            args,
            env: denv,
            ready,
            launch: launch.clone(),
        };
        d.wait_ready().await?;
        Ok(d)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Wait until the log (appended to across restarts) shows `ready` once
    /// more than it did before this start.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let want = self.restarts as usize + 1;
        let until = Instant::now() + Duration::from_secs(180);
        while Instant::now() < until {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.matches(self.ready).count() >= want {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "{} exited during start ({st}); log: {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} not ready after 180 s; log: {}",
            self.name,
            self.log.display()
        )
    }

    /// Has it exited on its own? Counts a crash and restarts it.
    pub async fn check(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            self.crashes += 1;
            eprintln!(
                "[{}] CRASH: {} exited on its own ({st}); see {}",
                self.launch.tag,
                self.name,
                self.log.display()
            );
            self.restart().await?;
        }
        Ok(())
    }

    pub async fn restart(&mut self) -> Result<()> {
        let _ = self.child.kill().await;
        self.restarts += 1;
        self.child = spawn_daemon(&self.launch, &self.args, &self.env, &self.log)?;
        self.wait_ready().await
    }

    pub async fn kill9(&mut self) -> Result<()> {
        self.child.kill().await?; // SIGKILL
        Ok(())
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    pub async fn sigterm(&mut self, limit: Duration) -> Result<(Option<i32>, Duration)> {
        let t = Instant::now();
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(st) => Ok((st?.code(), t.elapsed())),
            Err(_) => {
                self.child.kill().await?;
                Ok((None, t.elapsed()))
            }
        }
    }

    pub async fn stop(mut self) -> Result<u32> {
        self.check_exit_only()?;
        let _ = self.sigterm(Duration::from_secs(40)).await;
        Ok(self.crashes)
    }

    pub fn check_exit_only(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            self.crashes += 1;
        }
        Ok(())
    }

    pub fn rss_kb(&self) -> u64 {
        self.pid().map(rss_kb).unwrap_or(0)
    }
}

/// VmRSS of `pid` in kB (0 when it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Pids of the daemons this run started, for the clean-up on Ctrl-C.
pub static STARTED_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The stack service this run has stopped and not yet started again.
pub static DOWN: Mutex<Option<String>> = Mutex::new(None);

/// On SIGINT/SIGTERM: stop our daemons (by pid, when the pid is still
/// ours) and start again a service we had stopped, so the stack is whole.
pub fn clean_up(launch: &Launch) {
    for pid in STARTED_PIDS.lock().unwrap().iter() {
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd.contains("caliopen-imap") {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
    if let Some(service) = DOWN.lock().unwrap().take() {
        eprintln!("[{}] interrupted: starting {service} again", launch.tag);
        let _ = std::process::Command::new("bash")
            .arg(launch.repo.join("scripts/stack.sh"))
            .args(["start", &service])
            .status();
    }
}

/// Start `launch.bin ARGS` with `denv`, its output appended to `log`.
pub fn spawn_daemon(
    launch: &Launch,
    args: &[String],
    denv: &[(String, String)],
    log: &Path,
) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    let child = Command::new(&launch.bin)
        .args(args)
        .envs(denv.iter().cloned())
        .env("CALIOPEN_IMAP_LOG", "info")
        .env("NO_COLOR", "1")
        .current_dir(&launch.repo)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", launch.bin.display()))?;
    if let Some(pid) = child.id() {
        STARTED_PIDS.lock().unwrap().push(pid);
    }
    Ok(child)
}

// ------------------------------------------------------------------ stand-in

/// Switch the processor stand-in (for Caliopen's processor, outside this
/// project): its answering `task` is stopped, then, with `decide`, it is
/// subscribed again on `subject` in Caliopen's queue group and answers
/// with `decide`; without, it stays away (NATS answers "no responders").
pub async fn switch_standin<F>(
    client: &async_nats::Client,
    subject: &str,
    task: &Mutex<Option<tokio::task::JoinHandle<()>>>,
    decide: Option<F>,
) -> Result<()>
where
    F: FnMut(&crate::processor::ProcessRaw) -> (crate::processor::Answer, crate::processor::Pace)
        + Send
        + 'static,
{
    if let Some(t) = task.lock().unwrap().take() {
        t.abort();
    }
    let Some(decide) = decide else {
        // Make sure the server has dropped the subscription.
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.flush().await?;
        return Ok(());
    };
    let sub = client
        .queue_subscribe(subject.to_string(), "SMTPqueue".into())
        .await?;
    client.flush().await?;
    let serving = tokio::spawn(crate::processor::serve(client.clone(), sub, decide));
    *task.lock().unwrap() = Some(serving);
    Ok(())
}

// ------------------------------------------------------------------ Dovecot

/// `doveadm -c CONF ARGS...`; its stdout, or its stderr as the error.
pub fn doveadm(conf: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("doveadm")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .context("cannot run doveadm")?;
    if !out.status.success() {
        bail!(
            "doveadm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ------------------------------------------------------------------ services

/// `scripts/stack.sh stop|start SERVICE` on the stack given by
/// $CALIOPEN_IMAP_STACK_DIR; a stopped service is remembered in [`DOWN`]
/// until it is started again.
pub async fn stack(repo: &Path, cmd: &str, service: &str) -> Result<()> {
    if cmd == "stop" {
        *DOWN.lock().unwrap() = Some(service.to_string());
    }
    let st = Command::new("bash")
        .arg(repo.join("scripts/stack.sh"))
        .args([cmd, service])
        .stdin(Stdio::null())
        .status()
        .await?;
    if !st.success() {
        bail!("scripts/stack.sh {cmd} {service} failed ({st})");
    }
    if cmd == "start" {
        *DOWN.lock().unwrap() = None;
    }
    Ok(())
}

// ------------------------------------------------------------------ sync orders

/// How one ordered sync ended, as the harness saw it.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub report: Option<Value>,
    /// No final report: the worker died, or stayed silent too long.
    pub silent: bool,
    pub no_responders: bool,
}

impl Outcome {
    pub fn busy(&self) -> bool {
        self.report.as_ref().is_some_and(|r| {
            let e = r["error"].as_str().unwrap_or("");
            e.contains("skipped") || e.contains("already running")
        })
    }
    pub fn num(&self, k: &str) -> u64 {
        self.report
            .as_ref()
            .and_then(|r| r[k].as_u64())
            .unwrap_or(0)
    }
    pub fn complete(&self) -> bool {
        self.report
            .as_ref()
            .is_some_and(|r| r["ok"] == true && self.num("failed") == 0 && self.num("fetched") == 0)
    }
}

/// Send a sync order as a request and follow it to its final report;
/// `idle` bounds the silence between two messages (progress or final).
pub async fn order_sync(
    client: async_nats::Client,
    subject: String,
    user: Uuid,
    identity: Uuid,
    idle: Duration,
) -> Outcome {
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return Outcome {
            silent: true,
            ..Default::default()
        };
    };
    let order = json!({"order": "sync", "user_id": user.to_string(),
        "identity_id": identity.to_string(), "login": "", "mailbox": "",
        "password": "", "server": ""});
    let payload = serde_json::to_vec(&order).unwrap_or_default();
    if client
        .publish_with_reply(subject, inbox, payload.into())
        .await
        .is_err()
    {
        return Outcome {
            silent: true,
            ..Default::default()
        };
    }
    let _ = client.flush().await;
    loop {
        match tokio::time::timeout(idle, sub.next()).await {
            Ok(Some(msg)) => {
                if msg.status.is_some() {
                    return Outcome {
                        no_responders: true,
                        ..Default::default()
                    };
                }
                let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
                if v["progress"] != true {
                    return Outcome {
                        report: Some(v),
                        ..Default::default()
                    };
                }
            }
            _ => {
                return Outcome {
                    silent: true,
                    ..Default::default()
                }
            }
        }
    }
}
