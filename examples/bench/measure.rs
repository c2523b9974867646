//! What a measured step costs: peak and current RSS and CPU seconds of a
//! process from /proc, GNU time's figures for a command that exits, the
//! Cassandra JVM's CPU and the machine's busy share over a step (the
//! [`Meter`]), the wait for a quiet Cassandra before each step
//! ([`settle`]), and the processes the run starts ([`Proc`]), stopped
//! whatever happens.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::setup::{cql, Env};
use crate::{log, Recorder};

fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Peak resident set (kB).
pub fn hwm_kb(pid: u32) -> u64 {
    status_field(pid, "VmHWM:")
}

/// Resident set now (kB).
pub fn rss_kb(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

/// User + system CPU seconds of a process so far, to 1/100 s.
pub fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // (fields after the command, which may hold spaces, in parentheses)
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let ticks = f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0);
    round2(ticks / clk_tck())
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Busy and total jiffies of the whole machine.
fn sys_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let g = |i: usize| f.get(i).copied().unwrap_or(0.0);
    let busy = g(0) + g(1) + g(2) + g(5) + g(6) + g(7);
    (busy, busy + g(3) + g(4))
}

/// Brackets a measured step: adds the Cassandra JVM's CPU seconds and the
/// machine's busy share to its figures.
pub struct Meter {
    cass_pid: u32,
    cass0: f64,
    jiffies0: (f64, f64),
}

impl Meter {
    pub fn begin(env: &Env) -> Meter {
        Meter {
            cass_pid: env.cass_pid,
            cass0: cpu_s(env.cass_pid),
            jiffies0: sys_jiffies(),
        }
    }

    /// `out` with `cass_cpu_s` and `busy_pct` added.
    pub fn end(self, mut out: Value) -> Value {
        let cass = round2(cpu_s(self.cass_pid) - self.cass0);
        let (b1, t1) = sys_jiffies();
        let busy = 100.0 * (b1 - self.jiffies0.0) / (t1 - self.jiffies0.1 + 1.0);
        // (one decimal, cut as `bc` with scale=1 did)
        let busy = (busy * 10.0).trunc() / 10.0;
        if let Some(o) = out.as_object_mut() {
            o.insert("cass_cpu_s".into(), json!(cass));
            o.insert("busy_pct".into(), json!(busy));
        }
        out
    }
}

/// Wait until Cassandra runs no compaction and has none pending (left
/// behind by earlier rounds or tests, it would bill its CPU to whoever
/// runs next), and until the kernel has written back dirty pages.
/// Recorded as scenario `settle`.
pub fn settle(env: &Env, rec: &Recorder, label: &str, round: u32) -> Result<()> {
    let t0 = Instant::now();
    let (mut running, mut pending) = (1u64, 1u64);
    for _ in 0..600 {
        (running, pending) = compactions(env);
        if running == 0 && pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = Command::new("sync").status();
    for _ in 0..100 {
        let dirty = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("Dirty:")?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
            })
            .unwrap_or(0);
        if dirty < 10240 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t0.elapsed().as_secs();
    rec.record(
        "settle",
        label,
        round,
        json!({"secs": secs, "running_at_end": running, "pending_at_end": pending}),
    )
}

/// (compactions running, pending and active in the executor); (1, 1) when
/// Cassandra did not answer.
fn compactions(env: &Env) -> (u64, u64) {
    let Ok(out) = cql(
        env,
        "SELECT count(*) FROM system_views.sstable_tasks;
         SELECT pending_tasks, active_tasks FROM system_views.thread_pools
         WHERE name = 'CompactionExecutor';",
    ) else {
        return (1, 1);
    };
    let nums =
        |l: &str| -> Option<Vec<u64>> { l.split('|').map(|f| f.trim().parse().ok()).collect() };
    let running = out
        .lines()
        .filter_map(nums)
        .find(|v| v.len() == 1)
        .map(|v| v[0]);
    let pending = out
        .lines()
        .filter_map(nums)
        .find(|v| v.len() == 2)
        .map(|v| v[0] + v[1]);
    (running.unwrap_or(1), pending.unwrap_or(1))
}

/// A command run under GNU time: (wall seconds, peak RSS kB, CPU seconds).
pub fn timed(env: &Env, cmd: &[&str], pin: Option<&str>) -> Result<(f64, u64, f64)> {
    let out = env.work.join("mbsync.time");
    let mut c = Command::new("/usr/bin/time");
    c.args(["-f", "%M %U %S", "-o"]).arg(&out);
    if let Some(cores) = pin {
        c.args(["taskset", "-c", cores]);
    }
    let t0 = Instant::now();
    let st = c.args(cmd).stdin(Stdio::null()).status()?;
    let wall = t0.elapsed().as_secs_f64();
    if !st.success() {
        bail!("{cmd:?}: {st}");
    }
    let text = std::fs::read_to_string(&out)?;
    let f: Vec<&str> = text
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((wall, n(0) as u64, round2(n(1) + n(2))))
}

/// A daemon the run started (worker, poller, stand-in), its output in a
/// log file; SIGTERM then SIGKILL when dropped.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
        let f = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("{cmd:?}"))?;
        Ok(Proc {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait until the log contains `pattern`, at most `secs`.
    pub fn wait_log(&mut self, pattern: &str, secs: u64) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(pattern) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        bail!("no /{pattern}/ in {} after {secs}s", self.log.display())
    }

    /// SIGTERM, then wait (at most `secs`) for the process to go.
    pub fn stop(&mut self, secs: u64) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(10);
    }
}

/// Appends evidence to `hangs.txt`: the requests the Cassandra
/// connections have made so far.
pub fn hang_evidence(env: &Env) {
    let out = cql(env, "SELECT port, request_count FROM system_views.clients;")
        .unwrap_or_else(|e| format!("{e:#}\n"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(env.work.join("hangs.txt"))
    {
        let _ = f.write_all(out.as_bytes());
    }
    log("hang evidence appended to hangs.txt");
}

/// Sockets a process holds.
pub fn socket_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count() as u64
        })
        .unwrap_or(0)
}

/// Its established TCP connections to Dovecot's IMAPS port.
pub fn imap_conns(env: &Env, pid: u32) -> u64 {
    let filter = format!("( dport = :{} )", env.imaps_port);
    let out =
        crate::setup::run(Command::new("ss").args(["-Htnp", "state", "established", &filter]))
            .unwrap_or_default();
    let needle = format!("pid={pid},");
    out.lines().filter(|l| l.contains(&needle)).count() as u64
}

/// Dovecot's `imap` processes now.
pub fn dovecot_imap_procs() -> u64 {
    crate::setup::run(Command::new("pgrep").args(["-c", "-x", "imap"]))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Dovecot's sessions that found the inotify limit reached (and poll).
pub fn inotify_warnings(env: &Env) -> u64 {
    std::fs::read_to_string(env.state.join("dovecot/dovecot.log"))
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("Inotify instance limit"))
                .count() as u64
        })
        .unwrap_or(0)
}

pub fn inotify_limit() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
