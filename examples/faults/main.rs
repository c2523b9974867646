//! The fault suite (`make faults`, `make faults-quick`; driven by
//! `scripts/faults.sh`): it hurts a real worker and a real poller on the
//! real stack (kill -9, SIGTERM, NATS/Dovecot/Cassandra restarts, a missing
//! or slow processor, an expunge mid-sync, malformed payloads) and counts,
//! from Dovecot, Cassandra and a recording processor stand-in, whether any
//! message was lost, doubled or handed off twice. It exists because "nothing
//! lost, nothing doubled" is a claim about crashes, which no unit test sees.
//!
//! The processor stand-in here stands for Caliopen's processor (outside this
//! project). It answers `process_raw` and records every request it receives,
//! and can be made absent or slow.
//!
//! Settings come from the environment (see `scripts/faults.sh`):
//! `FAULTS_SEED` (printed; a random one by default), `FAULTS_QUICK=1`,
//! `FAULTS_ONLY=a,b` (scenario names), `FAULTS_RESTARTS=1` (service
//! restarts of the shared stack), `FAULTS_MESSAGES`, `FAULTS_KILL_ROUNDS`,
//! `FAULTS_PAYLOADS`, `FAULTS_RECOVER_MAX` (seconds a blocked identity is
//! waited for), and the stack's `STACK_*` variables.
//!
//! Output: one markdown table, notes, and exit 1 when a required zero is not.
//!
//! Layout: this file loads the settings (`env`) and runs the scenarios;
//! each scenario has its own file (`kill9`, `sigterm`, `absent`, `slow`,
//! `expunge`, `restart`, `malformed`, `cluster`); `suite` and `case` hold
//! what they share and the counting, `standin` the processor stand-in,
//! `common` the daemons and Dovecot helpers, `report` the table. What the
//! soak needs too is in `examples/kit/`.

#[path = "../kit/mod.rs"]
mod kit;
#[path = "../../tests/support/processor.rs"]
mod processor;

mod absent;
mod case;
/// The cluster scenario (`make faults-cluster`, `FAULTS_CLUSTER=1`).
mod cluster;
mod common;
mod env;
mod expunge;
mod kill9;
mod malformed;
mod report;
mod restart;
mod sigterm;
mod slow;
mod standin;
mod suite;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use caliopen_imap::config::WorkerSettings;

use case::Row;
use env::Env;
use kit::DOWN;
use standin::{Mode, Standin};
use suite::Suite;

fn main() -> Result<()> {
    let env = Env::load()?;
    // Read before the runtime starts (this sets and unsets variables).
    let mut env = env;
    let settings = env.worker_settings()?;
    if env.recover_max.is_zero() {
        // A dead worker's lock must lapse within its TTL: wait that long
        // (plus a margin), but not for ever when the TTL is a day.
        let cap = if env.quick { 150 } else { 300 };
        env.recover_max = Duration::from_secs((settings.imap.lock_ttl_secs + 30).min(cap));
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(env.clone(), settings) => r,
            _ = tokio::signal::ctrl_c() => { kit::clean_up(&env.launch()); std::process::exit(130) }
            _ = term.recv() => { kit::clean_up(&env.launch()); std::process::exit(143) }
        }
    })
}

async fn run(env: Env, settings: WorkerSettings) -> Result<()> {
    let started = Instant::now();
    eprintln!(
        "[faults] seed {} ({} mode), tag {}, {} messages, lock_ttl_secs {} (a refused identity is waited for {} s), max_message_tries {}, logs in {}",
        env.seed,
        env.mode(),
        env.tag,
        env.messages,
        settings.imap.lock_ttl_secs,
        env.recover_max.as_secs(),
        settings.imap.max_message_tries,
        env.work.display()
    );
    if !env.bin.is_file() {
        bail!("{} not found: run `cargo build` first", env.bin.display());
    }
    let store = env.store().await?;
    let client = async_nats::connect(env.nats_servers()).await?;
    let standin = Standin::start(&env).await?;
    let suite = Suite {
        env: env.clone(),
        settings,
        store,
        client,
        standin,
    };
    let mut rows = Vec::new();
    for name in scenario_names(&env) {
        eprintln!(
            "[faults] {name} (at {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        rows.push(run_scenario(&suite, name).await?);
    }
    let out = report::markdown(&env, &rows, started);
    print!("{out}");
    std::fs::write(env.work.join("table.md"), &out)?;
    if rows.iter().any(|r| !r.failures.is_empty()) {
        std::process::exit(1);
    }
    Ok(())
}

/// The scenarios of this run, in order: the cluster's alone, or the
/// single-node ones (service restarts in the full suite), less those
/// `FAULTS_ONLY` leaves out.
fn scenario_names(env: &Env) -> Vec<&'static str> {
    let mut names: Vec<&str> = vec!["kill9", "sigterm", "absent", "slow", "expunge", "malformed"];
    if env.cluster {
        names = vec!["cluster"];
    } else if env.restarts {
        names.extend(["nats", "dovecot", "cassandra"]);
    }
    if let Some(only) = &env.only {
        names.retain(|n| only.iter().any(|o| o == n));
    }
    names
}

/// One scenario, then the stack and the stand-in put back as they were
/// whatever happened, and its row judged (one that could not run fails).
async fn run_scenario(suite: &Suite, name: &str) -> Result<Row> {
    let res = match name {
        "kill9" => kill9::scenario(suite).await,
        "sigterm" => sigterm::scenario(suite).await,
        "absent" => absent::scenario(suite).await,
        "slow" => slow::scenario(suite).await,
        "expunge" => expunge::scenario(suite).await,
        "malformed" => malformed::scenario(suite).await,
        "cluster" => cluster::scenario(suite).await,
        s => restart::scenario(suite, s).await,
    };
    // Whatever happened, leave every service running...
    let down = DOWN.lock().unwrap().clone();
    if let Some(service) = down {
        common::stack(&suite.env, "start", &service).await?;
    }
    // ... and the stand-in answering normally.
    suite.standin.clear_trigger();
    suite.standin.set_delay(Duration::ZERO);
    suite.standin.set_mode(Mode::Normal).await?;
    let mut row = match res {
        Ok(r) => r,
        Err(e) => Row {
            name: name.into(),
            skipped: Some(format!("{e:#}")),
            failures: vec![format!("the scenario could not run: {e:#}")],
            ..Default::default()
        },
    };
    Suite::judge(&mut row);
    eprintln!(
        "[faults] {name}: {}",
        if row.failures.is_empty() {
            "ok".to_string()
        } else {
            row.failures.join("; ")
        }
    );
    Ok(row)
}
