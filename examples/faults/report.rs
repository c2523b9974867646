//! The suite's output: one markdown table (a row per scenario), the run's
//! seed and mode, then each scenario's repeats, notes and failures. Printed
//! and written to `target/faults/<tag>/table.md` by the runner.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::case::Row;
use crate::env::Env;

pub fn fmt_recover(r: &[Option<Duration>]) -> String {
    if r.is_empty() {
        return "—".into();
    }
    if r.iter().any(Option::is_none) {
        return "not recovered".into();
    }
    let max = r.iter().flatten().max().copied().unwrap_or_default();
    if r.len() == 1 {
        format!("{:.1} s", max.as_secs_f64())
    } else {
        format!("max {:.1} s", max.as_secs_f64())
    }
}

/// The whole report of the run, as printed.
pub fn markdown(env: &Env, rows: &[Row], started: Instant) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | rounds | messages | missing | duplicate rows | extra hand-offs | crashes | time to recover |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        if r.skipped.is_some() {
            let _ = writeln!(out, "| {} | — | — | — | — | — | — | did not run |", r.name);
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.rounds,
            if r.messages == 0 {
                "—".to_string()
            } else {
                r.messages.to_string()
            },
            r.missing,
            r.duplicates,
            r.extra,
            r.crashes,
            r.recover_text
                .clone()
                .unwrap_or_else(|| fmt_recover(&r.recover))
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "seed {} · {} mode · {:.0} s · worker {}",
        env.seed,
        env.mode(),
        started.elapsed().as_secs_f64(),
        env.bin.display()
    );
    for r in rows {
        let _ = writeln!(
            out,
            "- {}: in-flight repeats {}, late-answer repeats {}, left undelivered {}, stepped over {}",
            r.name, r.inflight, r.late, r.undelivered, r.stepped
        );
        for n in &r.notes {
            let _ = writeln!(out, "  - {n}");
        }
        for f in &r.failures {
            let _ = writeln!(out, "  - FAIL: {f}");
        }
    }
    out
}
