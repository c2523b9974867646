//! The soak (`make soak`, driven by `scripts/soak.sh`): the whole system,
//! long, under mixed load and faults at once, where every other test runs
//! one fault at a time with one or two identities. On a private stack it
//! runs 2 pollers and 3 workers for a few hundred identities on Dovecot,
//! a steady mail generator (`generator`), a seeded fault injector
//! (`faults`), then quiesces and checks the whole history (`checks`),
//! times APPEND to hand-off (`latency`) and writes SOAK.md and a picture
//! (`report`). Exit 1 when a required zero is not zero.
//!
//! Settings (environment): `SOAK_MINUTES` (30), `SOAK_SEED` (random,
//! printed), `SOAK_RATE` (actions/s, 20), `SOAK_IDENTITIES` (200),
//! `SOAK_QUICK=1` (40 identities, 5 actions/s, report under target/),
//! `SOAK_REPORT` (the report's path), and the stack's `STACK_*` variables.

#[path = "../kit/mod.rs"]
mod kit;
#[path = "../../tests/support/processor.rs"]
mod processor;

mod checks;
mod faults;
mod generator;
mod latency;
mod report;
mod setup;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use uuid::Uuid;

use checks::Check;
use faults::{Injected, Targets};
use generator::GenLog;
use setup::{Env, Fleet, Ident, Recorder};

fn main() -> Result<()> {
    let env = Env::load()?;
    let rt = tokio::runtime::Runtime::new()?;
    let code = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(env.clone()) => r,
            _ = tokio::signal::ctrl_c() => { kit::clean_up(&env.launch); Ok(130) }
            _ = term.recv() => { kit::clean_up(&env.launch); Ok(143) }
        }
    })?;
    std::process::exit(code)
}

/// One RSS reading: (daemon, seconds since the load started, kB, restarts).
type Rss = (String, f64, u64, u32);

/// What the load phase leaves for the checks.
struct Load {
    t0: Instant,
    secs: f64,
    faults: Vec<Injected>,
    rss: Vec<Rss>,
    gen: Arc<Mutex<GenLog>>,
}

async fn run(env: Env) -> Result<i32> {
    let started = Instant::now();
    eprintln!(
        "[soak] seed {}, {} min, {} identities, {} actions/s; logs in {}",
        env.seed,
        env.minutes,
        env.identities,
        env.rate,
        env.launch.work.display()
    );
    anyhow::ensure!(
        env.launch.bin.is_file(),
        "{} not found",
        env.launch.bin.display()
    );
    let store = env.store().await?;
    let client = async_nats::connect(env.nats.as_str()).await?;
    let recorder = Recorder::start(&env).await?;
    let idents = Arc::new(setup::make_identities(&env, &store).await?);
    eprintln!(
        "[soak] {} identities made; starting the daemons",
        idents.len()
    );
    let mut fleet = Fleet::start(&env).await?;
    let load = load(&env, &mut fleet, &recorder, &client, &store, &idents).await?;
    eprintln!("[soak] load over; quiescing");
    for p in fleet.pollers.iter_mut() {
        p.sigterm(Duration::from_secs(40)).await?;
    }
    let bound = Duration::from_secs(if env.quick { 360 } else { 900 });
    let not_synced = checks::final_sync(&client, &idents, bound).await;
    let found = verify(
        &env, &mut fleet, &store, &recorder, &idents, &load, not_synced,
    )
    .await?;
    let mut checks = table(&found, &load);
    let mut notes = notes(&found, &load);
    let (rss_checks, rss_notes) = checks::rss_growth(&load.rss, load.secs, env.minutes >= 20.0);
    checks.extend(rss_checks);
    notes.extend(rss_notes);
    let seen = seen_by_msg(&recorder);
    let samples = latency::samples(&load.gen.lock().unwrap().appended, &seen, load.t0);
    let rep = report::Report {
        env: &env,
        checks: &checks,
        faults: &load.faults,
        samples: &samples,
        notes: &notes,
        load_secs: load.secs,
        total_secs: started.elapsed().as_secs_f64(),
    };
    let svg_name = if env.quick {
        "soak-latency-quick.svg"
    } else {
        "soak-latency.svg"
    };
    let dir = env
        .report
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    std::fs::create_dir_all(&dir)?;
    if let Err(e) = rep.svg(&dir.join(svg_name)) {
        eprintln!("[soak] the picture could not be drawn: {e:#}");
    }
    let md = rep.markdown(svg_name);
    std::fs::write(&env.report, &md)?;
    print!("{md}");
    eprintln!("[soak] report: {}", env.report.display());
    Ok(if checks.iter().any(Check::failed) {
        1
    } else {
        0
    })
}

/// The load phase: the generator runs while the faults come on schedule;
/// daemons that exit on their own are restarted (and counted), RSS sampled.
async fn load(
    env: &Env,
    fleet: &mut Fleet,
    recorder: &Recorder,
    client: &async_nats::Client,
    store: &caliopen_imap::store::Store,
    idents: &Arc<Vec<Ident>>,
) -> Result<Load> {
    let t0 = Instant::now();
    let gen = Arc::new(Mutex::new(GenLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(generator::run(
        env.clone(),
        idents.clone(),
        gen.clone(),
        stop.clone(),
    ));
    let plan = faults::schedule(env);
    let mut rng = fastrand::Rng::with_seed(env.seed ^ 0xD0);
    let pids = Arc::new(Mutex::new(fleet.pids()));
    let sampler = tokio::spawn(sample_rss(pids.clone(), stop.clone(), t0));
    let (mut faults, mut next) = (Vec::new(), 0);
    while t0.elapsed() < env.run_for() {
        let now = t0.elapsed().as_secs_f64();
        if next < plan.len() && now >= plan[next].0 {
            let kind = plan[next].1;
            next += 1;
            eprintln!("[soak] {:.0} s: {}", now, kind.label());
            let mut t = Targets {
                env,
                fleet,
                recorder,
                client,
                store,
                idents,
                rng: &mut rng,
            };
            let note = match t.inject(kind).await {
                Ok(note) => note,
                Err(e) => {
                    heal(env, recorder).await;
                    format!("FAILED: {e:#}")
                }
            };
            let end = t0.elapsed().as_secs_f64();
            faults.push(Injected {
                kind,
                start: now,
                end,
                note,
            });
            *pids.lock().unwrap() = fleet.pids();
            continue;
        }
        if let Err(e) = fleet.watch().await {
            eprintln!("[soak] a daemon could not be started again: {e:#}");
        }
        *pids.lock().unwrap() = fleet.pids();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let _ = task.await;
    let rss = sampler.await.unwrap_or_default();
    Ok(Load {
        t0,
        secs,
        faults,
        rss,
        gen,
    })
}

/// After a fault that failed half-way: the service it stopped started
/// again, the processor answering again.
async fn heal(env: &Env, recorder: &Recorder) {
    let down = kit::DOWN.lock().unwrap().clone();
    if let Some(service) = down {
        if let Err(e) = kit::stack(&env.launch.repo, "start", &service).await {
            eprintln!("[soak] {service} could not be started again: {e:#}");
        }
    }
    if let Err(e) = recorder.set(setup::Mode::Normal).await {
        eprintln!("[soak] the processor stand-in could not answer again: {e:#}");
    }
}

/// Every 10 s until `stop`, the RSS of each daemon (by the pids the load
/// loop keeps current), apart from that loop so a long fault leaves no gap.
async fn sample_rss(
    pids: Arc<Mutex<Vec<setup::Running>>>,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Vec<Rss> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = t0.elapsed().as_secs_f64();
        for (name, pid, restarts) in pids.lock().unwrap().iter() {
            let kb = pid.map(kit::rss_kb).unwrap_or(0);
            if kb > 0 {
                out.push((name.clone(), now, kb, *restarts));
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    out
}

fn seen_by_msg(recorder: &Recorder) -> HashMap<Uuid, Vec<Instant>> {
    let mut m: HashMap<Uuid, Vec<Instant>> = HashMap::new();
    for h in recorder.seen.lock().unwrap().iter() {
        m.entry(h.msg).or_default().push(h.at);
    }
    m
}

/// What the checks found, before it is put in the table.
struct Findings {
    t: checks::Tally,
    handoffs: u64,
    at_fault: u64,
    outside: u64,
    not_synced: Vec<String>,
    locked: Vec<String>,
    unhealthy: u64,
    disabled: u64,
    problems: Vec<String>,
    panics: Vec<String>,
    crashes: u32,
}

/// Look at everything once the final sync is over; stops the workers.
async fn verify(
    env: &Env,
    fleet: &mut Fleet,
    store: &caliopen_imap::store::Store,
    recorder: &Recorder,
    idents: &[Ident],
    load: &Load,
    not_synced: Vec<String>,
) -> Result<Findings> {
    let locked = checks::locked(store, idents, Duration::from_secs(90)).await?;
    let (unhealthy, disabled, problems) = checks::health(env)?;
    let mut crashes = 0;
    for w in fleet.workers.drain(..) {
        crashes += w.stop().await?;
    }
    crashes += fleet.pollers.iter().map(|p| p.crashes).sum::<u32>();
    let seen = seen_by_msg(recorder);
    let retired = load.gen.lock().unwrap().retired.clone();
    let mut t = checks::Tally::default();
    for (i, id) in idents.iter().enumerate() {
        let p = checks::present(env, id, i, &retired).await?;
        checks::tally_one(store, &p, id, &seen, &mut t).await?;
    }
    let (at_fault, outside) = checks::repeats(&seen, load.t0, &load.faults);
    Ok(Findings {
        t,
        handoffs: seen.values().map(|v| v.len() as u64).sum(),
        at_fault,
        outside,
        not_synced,
        locked,
        unhealthy,
        disabled,
        problems,
        panics: checks::panics(env),
        crashes,
    })
}

/// The report's table: (check, value, zero required).
fn table(f: &Findings, load: &Load) -> Vec<Check> {
    let g = load.gen.lock().unwrap();
    let failed_faults = load.faults.iter().filter(|x| x.note.starts_with("FAILED"));
    let rows: [(&str, u64, bool); 20] = [
        (
            "messages present at the end in synced folders",
            f.t.expected,
            false,
        ),
        ("of those, not stored", f.t.not_stored, true),
        ("of those, stored but not delivered", f.t.undelivered, true),
        (
            "of those, delivered but never handed off",
            f.t.never_seen,
            true,
        ),
        (
            "rows no folder could have given (duplicates)",
            f.t.foreign,
            true,
        ),
        ("rows stored in all", f.t.rows, false),
        (
            "undelivered rows of messages gone since",
            f.t.undelivered_gone,
            false,
        ),
        ("hand-offs in all", f.handoffs, false),
        ("repeated hand-offs at a fault", f.at_fault, false),
        ("repeated hand-offs outside any fault", f.outside, true),
        (
            "identities the final sync could not finish",
            f.not_synced.len() as u64,
            true,
        ),
        (
            "identities still locked at the end",
            f.locked.len() as u64,
            true,
        ),
        (
            "identities unhealthy at the end (imapctl status)",
            f.unhealthy,
            true,
        ),
        ("identities disabled at the end", f.disabled, true),
        ("panics in the daemons' logs", f.panics.len() as u64, true),
        (
            "daemon exits not injected (restarted)",
            f.crashes as u64,
            true,
        ),
        ("faults injected", load.faults.len() as u64, false),
        (
            "faults that could not be injected",
            failed_faults.count() as u64,
            false,
        ),
        ("messages appended", g.appended.len() as u64, false),
        (
            "generator errors (actions refused during faults)",
            g.errors,
            false,
        ),
    ];
    rows.iter().map(|(n, v, z)| Check::new(n, *v, *z)).collect()
}

/// Notes under the table: what lies behind the numbers.
fn notes(f: &Findings, load: &Load) -> Vec<String> {
    let g = load.gen.lock().unwrap();
    let done: u64 = g.counts.values().sum();
    let mut notes = vec![format!(
        "generator: {done} actions in {:.0} s ({:.1}/s); {:?}; ticks skipped (every action slot busy): {}",
        load.secs,
        done as f64 / load.secs.max(1.0),
        g.counts,
        g.skipped
    )];
    if let Some(e) = &g.last_error {
        notes.push(format!("last generator error: {e}"));
    }
    for (what, list) in [
        ("not finished", &f.not_synced),
        ("locked", &f.locked),
        ("unhealthy", &f.problems),
        ("panic", &f.panics),
    ] {
        for l in list.iter().take(10) {
            notes.push(format!("{what}: {l}"));
        }
    }
    notes
}
