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
            _ = tokio::signal::ctrl_c() => { clean_up(&env); Ok(130) }
            _ = term.recv() => { clean_up(&env); Ok(143) }
        }
    })?;
    std::process::exit(code)
}

/// On SIGINT/SIGTERM: kill our daemons (by pid, when still ours) and start
/// again a service we had stopped.
fn clean_up(env: &Env) {
    for pid in kit::STARTED_PIDS.lock().unwrap().iter() {
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd.contains("caliopen-imap") {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
    if let Some(service) = kit::DOWN.lock().unwrap().take() {
        let _ = std::process::Command::new("bash")
            .arg(env.launch.repo.join("scripts/stack.sh"))
            .args(["start", &service])
            .status();
    }
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
    let (checks, notes) = verify(
        &env, &mut fleet, &store, &recorder, &idents, &load, not_synced,
    )
    .await?;
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
    let (mut faults, mut rss, mut next, mut sampled) = (Vec::new(), Vec::new(), 0, -10.0);
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
            let note = t
                .inject(kind)
                .await
                .unwrap_or_else(|e| format!("FAILED: {e:#}"));
            let end = t0.elapsed().as_secs_f64();
            faults.push(Injected {
                kind,
                start: now,
                end,
                note,
            });
            continue;
        }
        fleet.watch().await?;
        if now - sampled >= 10.0 {
            sampled = now;
            for (k, d) in fleet.all().enumerate() {
                let name = format!("{} {}", d.name, if k < 3 { k + 1 } else { k - 2 });
                rss.push((name, now, d.rss_kb(), d.restarts));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let _ = task.await;
    Ok(Load {
        t0,
        secs,
        faults,
        rss,
        gen,
    })
}

fn seen_by_msg(recorder: &Recorder) -> HashMap<Uuid, Vec<Instant>> {
    let mut m: HashMap<Uuid, Vec<Instant>> = HashMap::new();
    for h in recorder.seen.lock().unwrap().iter() {
        m.entry(h.msg).or_default().push(h.at);
    }
    m
}

/// Every check of the run, and notes saying what lies behind the numbers.
async fn verify(
    env: &Env,
    fleet: &mut Fleet,
    store: &caliopen_imap::store::Store,
    recorder: &Recorder,
    idents: &[Ident],
    load: &Load,
    not_synced: Vec<String>,
) -> Result<(Vec<Check>, Vec<String>)> {
    let mut notes = Vec::new();
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
    let panics = checks::panics(env);
    let (rss_checks, rss_notes) = checks::rss_growth(&load.rss, load.secs, env.minutes >= 20.0);
    let g = load.gen.lock().unwrap();
    let c = Check::new;
    let mut out = vec![
        c(
            "messages present at the end in synced folders",
            t.expected,
            false,
        ),
        c("of those, not stored", t.not_stored, true),
        c("of those, stored but not delivered", t.undelivered, true),
        c(
            "of those, delivered but never handed off",
            t.never_seen,
            true,
        ),
        c(
            "rows no folder could have given (duplicates)",
            t.foreign,
            true,
        ),
        c("rows stored in all", t.rows, false),
        c(
            "undelivered rows of messages gone since",
            t.undelivered_gone,
            false,
        ),
        c(
            "hand-offs in all",
            seen.values().map(|v| v.len() as u64).sum(),
            false,
        ),
        c("repeated hand-offs at a fault", at_fault, false),
        c("repeated hand-offs outside any fault", outside, true),
        c(
            "identities the final sync could not finish",
            not_synced.len() as u64,
            true,
        ),
        c(
            "identities still locked at the end",
            locked.len() as u64,
            true,
        ),
        c(
            "identities unhealthy at the end (imapctl status)",
            unhealthy,
            true,
        ),
        c("identities disabled at the end", disabled, true),
        c("panics in the daemons' logs", panics.len() as u64, true),
        c(
            "daemon exits not injected (restarted)",
            crashes as u64,
            true,
        ),
        c("faults injected", load.faults.len() as u64, false),
        c(
            "faults that could not be injected",
            load.faults
                .iter()
                .filter(|f| f.note.starts_with("FAILED"))
                .count() as u64,
            false,
        ),
        c("messages appended", g.appended.len() as u64, false),
        c(
            "generator errors (actions refused during faults)",
            g.errors,
            false,
        ),
    ];
    out.extend(rss_checks);
    notes.push(format!(
        "generator actions: {:?}; ticks skipped (all {} slots busy): {}",
        g.counts, 12, g.skipped
    ));
    if let Some(e) = &g.last_error {
        notes.push(format!("last generator error: {e}"));
    }
    for (what, list) in [
        ("not finished", &not_synced),
        ("locked", &locked),
        ("unhealthy", &problems),
        ("panic", &panics),
    ] {
        for l in list.iter().take(10) {
            notes.push(format!("{what}: {l}"));
        }
    }
    notes.extend(rss_notes);
    Ok((out, notes))
}
