//! The benchmark suite (`make bench`; `scripts/bench.sh` installs the
//! Debian peers, builds, and runs this): caliopen-imap against its fetch
//! and store ceilings and against mbsync, on the local stack (NATS,
//! Cassandra, Dovecot, S3 on loopback), then BENCHMARKS.md and its
//! pictures. The measuring itself is `examples/bench_tool.rs`, one process
//! per measurement as a worker or mbsync is; this drives it.
//!
//! ```text
//! bench [--large] [--rounds N] [--only live]      the suite (see scripts/bench.sh)
//! bench report RESULTS MACHINE [--rounds N] [--large] [--only live] [--wall S] [--total S] [--out FILE]
//!                                                 the report (and pictures) of earlier raw figures
//! ```
//!
//! Layout: `setup` (settings, the tools driven, corpora, identities),
//! `measure` (/proc, GNU time, Cassandra's CPU, the settle wait, the
//! processes started), `scenarios` (one function per measurement),
//! `rounds` (the suite's order), `live` (live sync), `report` (the
//! markdown), `charts` (the SVGs). Raw figures go to
//! `.stack/bench/results.jsonl`, one JSON object per measurement.

mod charts;
mod live;
mod measure;
mod report;
mod rounds;
mod scenarios;
mod setup;

use std::cell::RefCell;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::Value;

use measure::Proc;
use setup::{Env, Flags};

pub fn log(msg: &str) {
    eprintln!("[bench {}] {msg}", chrono::Local::now().format("%H:%M:%S"));
}

/// Appends one JSON object per measurement to the run's results file.
pub struct Recorder {
    path: PathBuf,
    last: RefCell<Option<Value>>,
}

impl Recorder {
    fn create(path: &Path) -> Result<Recorder> {
        std::fs::write(path, "")?;
        Ok(Recorder {
            path: path.to_path_buf(),
            last: RefCell::new(None),
        })
    }

    /// `{scenario, mailbox, round}` first, then the figures.
    pub fn record(&self, scenario: &str, mailbox: &str, round: u32, figures: Value) -> Result<()> {
        let mut line = format!(
            "{{\"scenario\":{},\"mailbox\":{},\"round\":{round}",
            Value::from(scenario),
            Value::from(mailbox)
        );
        if let Some(o) = figures.as_object() {
            for (k, v) in o
                .iter()
                .filter(|(k, _)| !["scenario", "mailbox", "round"].contains(&k.as_str()))
            {
                line.push_str(&format!(",{}:{v}", Value::from(k.as_str())));
            }
        }
        line.push_str("}\n");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)?
            .write_all(line.as_bytes())?;
        let brief: serde_json::Map<String, Value> = ["messages", "bytes", "secs", "rss_kb"]
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    figures.get(*k).cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        log(&format!(
            "{scenario} {mailbox} round {round}: {}",
            Value::Object(brief)
        ));
        *self.last.borrow_mut() = Some(figures);
        Ok(())
    }

    /// msg/s of the last row recorded.
    pub fn last_rate(&self) -> Option<f64> {
        self.last.borrow().as_ref().and_then(report::msgs_s)
    }
}

/// The run: its settings, its raw figures, the processor stand-in, and
/// the production shape's placement while it is on.
pub struct Suite {
    pub env: Env,
    pub rec: Recorder,
    pub lda: Option<Proc>,
    /// The cores (`taskset -c`) of everything but Cassandra, when pinned.
    pub pin: Option<&'static str>,
    /// `_pinned` while pinned: the scenarios' names then carry it.
    pub suffix: &'static str,
    pub store_conc: u32,
    pub multi_bytes: u64,
}

impl Suite {
    fn start_lda(&mut self) -> Result<()> {
        let e = &self.env;
        let mut cmd = Command::new(&e.lda);
        cmd.arg(&e.nats).arg(e.in_topic());
        let mut p = Proc::spawn(&mut cmd, &e.work.join("lda.log"))?;
        p.wait_log("answering", 10)?;
        self.lda = Some(p);
        Ok(())
    }

    fn finish(&mut self) {
        // The run's bucket (versitygw's posix backend keeps a bucket as a directory).
        let _ = std::fs::remove_dir_all(self.env.state.join("s3/data").join(&self.env.bucket));
        if let Some(mut p) = self.lda.take() {
            p.stop(40);
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("report") {
        return report_only(&args[1..]);
    }
    let flags = Flags::parse(args.into_iter())?;
    let env = Env::load(flags)?;
    std::fs::write(env.work.join("hangs.txt"), "")?;
    let suite_start = Instant::now();
    let mut s = Suite {
        rec: Recorder::create(&env.results)?,
        env,
        lda: None,
        pin: None,
        suffix: "",
        store_conc: 64,
        multi_bytes: 0,
    };
    let r = if s.env.flags.only_live {
        live_only(&mut s)
    } else {
        full(&mut s)
    };
    s.finish();
    r?;
    let machine = setup::machine_json(&s.env);
    std::fs::write(s.env.work.join("machine.json"), machine.to_string())?;
    let wall = suite_start.elapsed().as_secs();
    // (BENCH_T0: when scripts/bench.sh started, before the build)
    let total = std::env::var("BENCH_T0")
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(wall, |t0| {
            (chrono::Utc::now().timestamp() as u64).saturating_sub(t0)
        });
    let flags = s.env.flags.clone();
    let (out, pictures, prefix) = if flags.only_live {
        (s.env.work.join("LIVE.md"), s.env.work.clone(), "")
    } else {
        (
            s.env.repo.join("BENCHMARKS.md"),
            s.env.repo.join("docs/bench"),
            "docs/bench/",
        )
    };
    write_report(
        &s.env.results,
        machine,
        &flags,
        (wall, total),
        &out,
        (&pictures, prefix),
    )?;
    log(&format!(
        "{} written: {total} s in all, {wall} s after the build",
        out.display()
    ));
    Ok(())
}

fn full(s: &mut Suite) -> Result<()> {
    s.prepare()?;
    s.start_lda()?;
    s.tune_store()?;
    for round in 1..=s.env.flags.rounds {
        s.round(round)?;
    }
    // Live sync: one round (its figures are per-message latencies and
    // at-rest readings, not throughputs that need several rounds).
    s.run_live()?;
    if s.env.flags.large {
        s.large_mailbox()?;
    }
    setup::truncate_raw(&s.env)
}

fn live_only(s: &mut Suite) -> Result<()> {
    s.start_lda()?;
    s.run_live()
}

/// The markdown and its pictures from a results file.
fn write_report(
    results: &Path,
    machine: Value,
    flags: &Flags,
    times: (u64, u64),
    out: &Path,
    pics: (&Path, &str),
) -> Result<()> {
    let text = std::fs::read_to_string(results).with_context(|| results.display().to_string())?;
    let data = report::Data::parse(&text)?;
    let mailboxes = report::sync_mailboxes(flags.large);
    let pictures = charts::draw(&data, &mailboxes, pics.0, pics.1)?;
    let run = report::Run {
        machine,
        wall: times.0,
        total: times.1,
        rounds: if flags.only_live { 1 } else { flags.rounds },
        large: flags.large,
        only_live: flags.only_live,
        pictures,
    };
    std::fs::write(out, report::markdown(&data, &run) + "\n")?;
    Ok(())
}

/// `bench report RESULTS MACHINE [...]`: the report of earlier figures,
/// on stdout unless `--out FILE` (pictures beside FILE, or none on stdout).
fn report_only(args: &[String]) -> Result<()> {
    let (results, machine) = match args {
        [r, m, ..] => (PathBuf::from(r), PathBuf::from(m)),
        _ => anyhow::bail!("usage: bench report RESULTS MACHINE [--rounds N] [--large] [--only live] [--wall S] [--total S] [--out FILE]"),
    };
    let mut rest: Vec<String> = Vec::new();
    let (mut wall, mut total, mut out) = (0, 0, None::<PathBuf>);
    let mut it = args[2..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--wall" => wall = it.next().map_or(Ok(0), |v| v.parse())?,
            "--total" => total = it.next().map_or(Ok(0), |v| v.parse())?,
            "--out" => out = it.next().map(PathBuf::from),
            _ => rest.push(a.clone()),
        }
    }
    let flags = Flags::parse(rest.into_iter())?;
    let machine: Value = serde_json::from_str(&std::fs::read_to_string(&machine)?)?;
    match out {
        Some(out) => {
            let dir = out.parent().unwrap_or(Path::new(".")).to_path_buf();
            write_report(&results, machine, &flags, (wall, total), &out, (&dir, ""))
        }
        None => {
            let data = report::Data::parse(&std::fs::read_to_string(&results)?)?;
            let run = report::Run {
                machine,
                wall,
                total,
                rounds: if flags.only_live { 1 } else { flags.rounds },
                large: flags.large,
                only_live: flags.only_live,
                pictures: Vec::new(),
            };
            println!("{}", report::markdown(&data, &run));
            Ok(())
        }
    }
}
