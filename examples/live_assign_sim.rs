//! Live sync's "who holds which session" layer at a scale this machine
//! cannot hold for real (issue 25): 100,000 identities wanting IDLE and 10
//! simulated workers, each a task with its own worker id and its own
//! Cassandra session, running the real round ([`plan::Planner`]: membership
//! row, members read, rescans, assignment) and the real choice of sessions
//! to open and stop ([`idle::changes`], at most `CLAIMS_PER_ROUND` opened a
//! round), against the real Cassandra. Only the IMAP sessions are left out:
//! a session "opened" is held at once.
//!
//! It reports, for each size: store statements per second at rest (all of
//! them, and apart the reads of the identities wanting IDLE), Cassandra's
//! CPU at rest (utime + stime of the Cassandra JVM from /proc, against a
//! window with no simulated worker), the share of identities that move when
//! an 11th worker joins, and the time from killing a worker (it stops
//! renewing, no clean exit) until all its identities are assigned, then
//! held, elsewhere.
//!
//! ```text
//! cargo run --release --example live_assign_sim -- [--sizes 100000,10000]
//!     [--workers 10] [--ttl 30] [--rest 60] [--baseline 30] [--quiet-rest 30]
//!     [--keyspace caliopen_bench_assign] [--out target/bench/live-assign.md]
//! ```
//! The stack's env (`$CALIOPEN_IMAP_STACK_DIR/env`: Cassandra's address,
//! cqlsh; `STACK_CASSANDRA_HOSTS` and `STACK_CQLSH` in the environment win)
//! and its Cassandra pid file are read from the stack dir. The
//! identities are written once per size into `KEYSPACE_SIZE` (its schema
//! from config/schema.cql) and kept for later runs.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use caliopen_imap::config::{IdleMode, StoreSettings};
use caliopen_imap::store::identity::{creds, infos, Identity};
use caliopen_imap::store::Store;
use caliopen_imap::worker::idle::plan::{Plan, PlanSettings, Planner};
use caliopen_imap::worker::idle::{self, Key, WANTED_RESCAN};
use futures::{StreamExt, TryStreamExt};
use tokio::time::Instant;
use uuid::Uuid;

struct Args {
    sizes: Vec<usize>,
    workers: usize,
    ttl: Duration,
    rest: Duration,
    baseline: Duration,
    quiet_rest: Duration,
    keyspace: String,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut flags: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let k = k
            .strip_prefix("--")
            .ok_or_else(|| anyhow!("unexpected argument {k:?}"))?;
        let v = it.next().ok_or_else(|| anyhow!("--{k} needs a value"))?;
        flags.insert(k.to_string(), v);
    }
    let num = |k: &str, d: u64| -> Result<u64> {
        flags
            .get(k)
            .map(|v| v.parse().with_context(|| format!("--{k}")))
            .unwrap_or(Ok(d))
    };
    let sizes = flags
        .get("sizes")
        .map(String::as_str)
        .unwrap_or("100000,10000")
        .split(',')
        .map(|s| s.trim().parse::<usize>().context("--sizes"))
        .collect::<Result<Vec<_>>>()?;
    Ok(Args {
        sizes,
        workers: num("workers", 10)? as usize,
        ttl: Duration::from_secs(num("ttl", 30)?),
        rest: Duration::from_secs(num("rest", 60)?),
        baseline: Duration::from_secs(num("baseline", 30)?),
        quiet_rest: Duration::from_secs(num("quiet-rest", 30)?),
        keyspace: flags
            .get("keyspace")
            .cloned()
            .unwrap_or_else(|| "caliopen_bench_assign".into()),
        out: flags
            .get("out")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/bench/live-assign.md")),
    })
}

/// The stack's env file as a map (`export K=V` lines).
fn stack_env() -> Result<(PathBuf, HashMap<String, String>)> {
    let dir = PathBuf::from(
        std::env::var("CALIOPEN_IMAP_STACK_DIR").context("CALIOPEN_IMAP_STACK_DIR is not set")?,
    );
    let text = std::fs::read_to_string(dir.join("env")).context("the stack's env file")?;
    let mut env: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // A private Cassandra (`stack.sh start cassandra` with other ports) is
    // named by the same variables in the environment.
    for k in ["STACK_CASSANDRA_HOSTS", "STACK_CQLSH"] {
        if let Ok(v) = std::env::var(k) {
            env.insert(k.to_string(), v);
        }
    }
    Ok((dir, env))
}

/// Cassandra's CPU time so far (utime + stime), in seconds.
fn cassandra_cpu(pid: u32, tick: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name in parentheses: state is field 3, so
    // utime (14) and stime (15) are the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let u: f64 = f.get(11).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    let s: f64 = f.get(12).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    Ok((u + s) / tick)
}

fn clock_tick() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Create the keyspace with the project's schema, through cqlsh.
fn apply_schema(env: &HashMap<String, String>, ks: &str) -> Result<()> {
    let schema = std::fs::read_to_string("config/schema.cql")?
        .replace("caliopen.", &format!("{ks}."))
        .replace(
            "KEYSPACE IF NOT EXISTS caliopen\n",
            &format!("KEYSPACE IF NOT EXISTS {ks}\n"),
        );
    let file = std::env::temp_dir().join(format!("schema-{ks}.cql"));
    std::fs::write(&file, schema)?;
    let hosts = env
        .get("STACK_CASSANDRA_HOSTS")
        .ok_or_else(|| anyhow!("no STACK_CASSANDRA_HOSTS"))?;
    let (host, port) = hosts
        .split_once(',')
        .map(|x| x.0)
        .unwrap_or(hosts)
        .split_once(':')
        .ok_or_else(|| anyhow!("host:port"))?;
    let cqlsh = env
        .get("STACK_CQLSH")
        .ok_or_else(|| anyhow!("no STACK_CQLSH"))?;
    let st = std::process::Command::new(cqlsh)
        .args([host, port, "-f"])
        .arg(&file)
        .status()?;
    if !st.success() {
        bail!("cqlsh -f {} failed", file.display());
    }
    Ok(())
}

async fn connect(hosts: &str, ks: &str) -> Result<Store> {
    let settings = StoreSettings {
        hosts: vec![hosts.to_string()],
        keyspace: ks.to_string(),
        ..Default::default()
    };
    Ok(Store::connect(&settings, Duration::from_secs(30)).await?)
}

fn identity(i: usize) -> Identity {
    let login = format!("assign{i}@example.test");
    Identity {
        user_id: Uuid::new_v4(),
        identity_id: Uuid::new_v4(),
        credentials: HashMap::from([
            (creds::USERNAME_IN.to_string(), login.clone()),
            (creds::PASSWORD_IN.to_string(), "unused".to_string()),
        ]),
        display_name: login.clone(),
        identifier: login,
        infos: HashMap::from([
            (infos::INSERVER.to_string(), "127.0.0.1:1".to_string()),
            (infos::AUTHTYPE.to_string(), infos::AUTH_LOGIN.to_string()),
            (infos::IDLE.to_string(), "true".to_string()),
        ]),
        last_check: None,
        protocol: "email".into(),
        status: "active".into(),
        kind: "remote".into(),
    }
}

/// Write `n` identities wanting IDLE unless the keyspace holds them already.
async fn seed(store: &Store, n: usize) -> Result<()> {
    let have = caliopen_imap::worker::idle::plan::wanted(store, IdleMode::Identity)
        .await?
        .len();
    if have == n {
        return Ok(());
    }
    if have != 0 {
        bail!(
            "keyspace {} holds {have} identities, not {n}: drop it first",
            store.keyspace()
        );
    }
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move { store.insert_identity(&identity(i)).await }
        })
        .buffer_unordered(256)
        .try_collect::<()>()
        .await?;
    eprintln!("seeded {n} identities in {:.0?}", started.elapsed());
    Ok(())
}

/// What a simulated worker shows the bench.
#[derive(Default)]
struct View {
    held: HashSet<Key>,
    mine: Arc<HashSet<Key>>,
    rounds: u64,
}

struct Sim {
    worker: String,
    store: Store,
    view: Arc<Mutex<View>>,
    killed: Arc<AtomicBool>,
    planner: Arc<tokio::sync::Mutex<Planner>>,
    task: tokio::task::JoinHandle<()>,
}

async fn spawn_worker(hosts: &str, ks: &str, worker: String, ttl: Duration) -> Result<Sim> {
    let store = connect(hosts, ks).await?;
    let budget = 100_000; // idle_max's ceiling: the budgets never bind here
    let planner = Arc::new(tokio::sync::Mutex::new(Planner::new(
        store.clone(),
        PlanSettings {
            worker: worker.clone(),
            budget,
            ttl,
            mode: IdleMode::Identity,
            rescan: WANTED_RESCAN,
        },
    )));
    let view = Arc::new(Mutex::new(View::default()));
    let killed = Arc::new(AtomicBool::new(false));
    let (p, v, k) = (planner.clone(), view.clone(), killed.clone());
    let task = tokio::spawn(async move {
        // Workers do not start in step.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1000))).await;
        let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_secs(1)));
        // As the worker's loop: a long round delays the next, no burst after.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if k.load(Ordering::Relaxed) {
                return; // killed: no renewal, no clean exit
            }
            let held = v.lock().unwrap().held.len();
            let plan = p.lock().await.round(held).await;
            let mut view = v.lock().unwrap();
            match plan {
                Plan::Keep => {}
                Plan::Cut(_) => view.held.clear(),
                Plan::Hold(mine) => {
                    let (gone, new) = idle::changes(view.held.iter(), &mine, budget as usize);
                    for g in gone {
                        view.held.remove(&g);
                    }
                    view.held.extend(new);
                    view.mine = mine;
                }
            }
            view.rounds += 1;
        }
    });
    Ok(Sim {
        worker,
        store,
        view,
        killed,
        planner,
        task,
    })
}

/// Every identity assigned (or held) by exactly one live worker?
fn partition(sims: &[Sim], n: usize, held: bool) -> bool {
    let mut all = HashSet::with_capacity(n);
    let mut total = 0;
    for s in sims.iter().filter(|s| !s.killed.load(Ordering::Relaxed)) {
        let v = s.view.lock().unwrap();
        let set: Vec<Key> = if held {
            v.held.iter().copied().collect()
        } else {
            v.mine.iter().copied().collect()
        };
        total += set.len();
        all.extend(set);
    }
    total == n && all.len() == n
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    let mut said = Instant::now();
    while !f() {
        if said.elapsed() > Duration::from_secs(30) {
            said = Instant::now();
            eprintln!("  still waiting: {what} ({:.0?})", started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

fn owners(sims: &[Sim]) -> HashMap<Key, String> {
    let mut out = HashMap::new();
    for s in sims.iter().filter(|s| !s.killed.load(Ordering::Relaxed)) {
        for k in s.view.lock().unwrap().mine.iter() {
            out.insert(*k, s.worker.clone());
        }
    }
    out
}

fn statements(sims: &[Sim]) -> (u64, u64) {
    sims.iter().fold((0, 0), |(a, b), s| {
        (a + s.store.statements(), b + s.store.lwts())
    })
}

async fn rescan_statements(sims: &[Sim]) -> u64 {
    let mut t = 0;
    for s in sims {
        t += s.planner.lock().await.rescan_statements;
    }
    t
}

/// Store statements per second and Cassandra CPU (share of a core) over `d`.
struct Window {
    statements: f64,
    lwts: u64,
    rescan_statements: f64,
    cpu: f64,
}

async fn window(sims: &[Sim], d: Duration, pid: u32, tick: f64) -> Result<Window> {
    let (s0, l0) = statements(sims);
    let r0 = rescan_statements(sims).await;
    let c0 = cassandra_cpu(pid, tick)?;
    let t0 = Instant::now();
    tokio::time::sleep(d).await;
    let secs = t0.elapsed().as_secs_f64();
    let c1 = cassandra_cpu(pid, tick)?;
    let (s1, l1) = statements(sims);
    let r1 = rescan_statements(sims).await;
    Ok(Window {
        statements: (s1 - s0) as f64 / secs,
        lwts: l1 - l0,
        rescan_statements: (r1 - r0) as f64 / secs,
        cpu: (c1 - c0) / secs * 100.0,
    })
}

struct Row {
    n: usize,
    workers: usize,
    converge: Duration,
    baseline_cpu: f64,
    rest: Window,
    quiet: Window,
    moved_join: f64,
    join_secs: Duration,
    moved_kill_others: usize,
    kill_assigned: Duration,
    kill_held: Duration,
    dead_had: usize,
    most_gained: usize,
}

async fn run_size(a: &Args, env: &HashMap<String, String>, pid: u32, n: usize) -> Result<Row> {
    let tick = clock_tick();
    let hosts = env
        .get("STACK_CASSANDRA_HOSTS")
        .ok_or_else(|| anyhow!("no STACK_CASSANDRA_HOSTS"))?
        .clone();
    let ks = format!("{}_{n}", a.keyspace);
    apply_schema(env, &ks)?;
    let store = connect(&hosts, &ks).await?;
    seed(&store, n).await?;
    let limit = a.ttl * 20 + Duration::from_secs(300);
    eprintln!(
        "[{n}] baseline: Cassandra with no simulated worker, {:?}",
        a.baseline
    );
    let baseline = window(&[], a.baseline, pid, tick).await?;
    let tag = format!("{:04x}", fastrand::u16(..));
    let mut sims = Vec::new();
    for i in 0..a.workers {
        sims.push(spawn_worker(&hosts, &ks, format!("sim-{tag}-{i}"), a.ttl).await?);
    }
    let converge = until("every identity assigned once", limit, || {
        partition(&sims, n, false)
    })
    .await
    .inspect_err(|_| {
        for s in &sims {
            let v = s.view.lock().unwrap();
            eprintln!(
                "{}: rounds {} held {} mine {}",
                s.worker,
                v.rounds,
                v.held.len(),
                v.mine.len()
            );
        }
    })?;
    eprintln!(
        "[{n}] converged in {converge:.1?}; at rest for {:?}",
        a.rest
    );
    let rest = window(&sims, a.rest, pid, tick).await?;
    for s in &sims {
        s.planner
            .lock()
            .await
            .set_rescan(Duration::from_secs(86_400));
    }
    eprintln!("[{n}] at rest, no rescan, for {:?}", a.quiet_rest);
    let quiet = window(&sims, a.quiet_rest, pid, tick).await?;
    for s in &sims {
        s.planner.lock().await.set_rescan(WANTED_RESCAN);
    }
    eprintln!(
        "[{n}] at rest: {:.1} statements/s ({:.1} rescans), CPU {:.1} %; no rescan: {:.2}/s, CPU {:.1} %; baseline CPU {:.1} %",
        rest.statements, rest.rescan_statements, rest.cpu, quiet.statements, quiet.cpu, baseline.cpu
    );
    eprintln!("[{n}] an 11th worker joins");
    // An 11th worker joins.
    let before = owners(&sims);
    sims.push(spawn_worker(&hosts, &ks, format!("sim-{tag}-{}", a.workers), a.ttl).await?);
    let started = Instant::now();
    let newest = sims.len() - 1;
    until("the new worker's share assigned", limit, || {
        sims[newest].view.lock().unwrap().rounds >= 1 && partition(&sims, n, false)
    })
    .await?;
    let join_secs = started.elapsed();
    let after = owners(&sims);
    let moved = before
        .iter()
        .filter(|(k, w)| after.get(*k) != Some(*w))
        .count();
    eprintln!("[{n}] moved {moved} in {join_secs:.1?}; killing a worker");
    // Kill worker 0: it stops renewing, with no clean exit.
    let dead = sims[0].view.lock().unwrap().mine.clone();
    let before = owners(&sims);
    sims[0].killed.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let assigned = until("the dead worker's identities assigned", limit, || {
        partition(&sims, n, false)
    })
    .await?;
    let after = owners(&sims);
    let others_moved = before
        .iter()
        .filter(|(k, w)| !dead.contains(*k) && after.get(*k) != Some(*w))
        .count();
    // Each survivor opens its part of the dead worker's sessions at most
    // CLAIMS_PER_ROUND a round: the rounds that takes, after the assignment.
    let mut gained: HashMap<&String, usize> = HashMap::new();
    for k in dead.iter() {
        if let Some(w) = after.get(k) {
            *gained.entry(w).or_default() += 1;
        }
    }
    let most = gained.values().copied().max().unwrap_or(0);
    let held = t0.elapsed() + (a.ttl / 3) * most.div_ceil(idle::CLAIMS_PER_ROUND) as u32;
    for s in &sims {
        s.killed.store(true, Ordering::Relaxed);
        s.task.abort();
        s.planner.lock().await.leave().await;
    }
    Ok(Row {
        n,
        workers: a.workers,
        converge,
        baseline_cpu: baseline.cpu,
        rest,
        quiet,
        moved_join: moved as f64 / n as f64,
        join_secs,
        moved_kill_others: others_moved,
        kill_assigned: assigned,
        kill_held: held,
        dead_had: dead.len(),
        most_gained: most,
    })
}

fn report(a: &Args, rows: &[Row]) -> String {
    let mut s =
        String::from("## Live sync: assignment and membership at scale (simulated workers)\n\n");
    s += &format!(
        "{} simulated workers (tasks in one process, each with its own worker id and Cassandra \
         session) run the real round of `worker::idle::plan` and the real choice of sessions \
         (`worker::idle::changes`, at most 200 opened a round) against the stack's Cassandra; \
         the IMAP sessions are left out. Membership rows live {} s, renewed every {} s; the \
         identities wanting IDLE are read again every {} s, or less often past 12,000 of them \
         (a worker reads at most 200 rows a second on average: every 500 s at 100,000), so a \
         window at rest should hold one read at least. Cassandra's CPU is utime + stime of \
         its JVM over the window, in % of one core; the machine (2 cores) was shared with other \
         work meanwhile, so the baseline (no simulated worker) is given beside it.\n\n",
        a.workers,
        a.ttl.as_secs(),
        (a.ttl / 3).as_secs(),
        WANTED_RESCAN.as_secs()
    );
    s += "| identities | statements/s at rest (of which rescans) | Paxos rounds at rest | statements/s, no rescan | Cassandra CPU: baseline / at rest / no rescan | moved when an 11th joins | kill: all reassigned / all held again (estimated) | others' identities moved by the kill |\n|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        s += &format!(
            "| {} | {:.1} ({:.1}) | {} | {:.2} | {:.1} % / {:.1} % / {:.1} % | {:.1} % (1/{} = {:.1} %; {:.0} s) | {:.1} s / {:.0} s ({} identities, at most {} to one survivor) | {} |\n",
            r.n,
            r.rest.statements,
            r.rest.rescan_statements,
            r.rest.lwts + r.quiet.lwts,
            r.quiet.statements,
            r.baseline_cpu,
            r.rest.cpu,
            r.quiet.cpu,
            r.moved_join * 100.0,
            r.workers + 1,
            100.0 / (r.workers + 1) as f64,
            r.join_secs.as_secs_f64(),
            r.kill_assigned.as_secs_f64(),
            r.kill_held.as_secs_f64(),
            r.dead_had,
            r.most_gained,
            r.moved_kill_others,
        );
    }
    s += &format!(
        "\nWindows: at rest {} s (sessions may still be opening: that costs the layer no \
         statement), at rest without rescans {} s, baseline {} s. First assignment (every \
         identity assigned to exactly one worker): {}. Moves and reassignment are measured on \
         the assignment; \"all held again\" adds the rounds the survivor with the most new \
         identities needs to open them, 200 a round.\n",
        a.rest.as_secs(),
        a.quiet_rest.as_secs(),
        a.baseline.as_secs(),
        rows.iter()
            .map(|r| format!("{:.0} s at {}", r.converge.as_secs_f64(), r.n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    caliopen_imap::logging::init("warn");
    let (dir, env) = stack_env()?;
    let pid: u32 = std::fs::read_to_string(dir.join("cassandra/cassandra.pid"))
        .context("the stack's Cassandra pid file")?
        .trim()
        .parse()
        .context("Cassandra pid")?;
    let mut rows = Vec::new();
    for &n in &a.sizes {
        rows.push(run_size(&a, &env, pid, n).await?);
    }
    let md = report(&a, &rows);
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, &md)?;
    print!("{md}");
    Ok(())
}
