//! Latency from APPEND to hand-off: each recorded APPEND in a synced folder
//! joined with the first `process_raw` the stand-in saw for its raw message
//! id. Two classes: INBOX of an IDLE identity (the live sync's promise:
//! seconds) and everything else (the poller's: its interval).

use std::collections::HashMap;
use std::time::Instant;

use uuid::Uuid;

use crate::generator::Appended;

/// One timed message.
#[derive(Clone, Copy)]
pub struct Sample {
    /// When it was appended, minutes since the load started.
    pub at_min: f64,
    pub secs: f64,
    pub idle: bool,
}

pub fn samples(
    appended: &[Appended],
    seen: &HashMap<Uuid, Vec<Instant>>,
    t0: Instant,
) -> Vec<Sample> {
    appended
        .iter()
        .filter(|a| a.synced)
        .filter_map(|a| {
            let first = seen.get(&a.key)?.first()?;
            Some(Sample {
                at_min: a.at.saturating_duration_since(t0).as_secs_f64() / 60.0,
                secs: first.saturating_duration_since(a.at).as_secs_f64(),
                idle: a.idle,
            })
        })
        .collect()
}

/// p50, p99 and max of one class.
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn stats(samples: &[Sample], idle: bool) -> Option<Stats> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.idle == idle)
        .map(|s| s.secs)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Some(Stats {
        n: v.len(),
        p50: q(0.50),
        p99: q(0.99),
        max: v[v.len() - 1],
    })
}

pub fn fmt(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!(
            "{} messages: p50 {:.1} s, p99 {:.1} s, max {:.1} s",
            s.n, s.p50, s.p99, s.max
        ),
        None => "no sample".into(),
    }
}

/// Per minute of the run (by APPEND time): (minute, IDLE p50 and max,
/// polled p50 and max), for the report's table beside the picture.
pub fn per_minute(samples: &[Sample]) -> Vec<(usize, Option<Stats>, Option<Stats>)> {
    let last = samples.iter().map(|s| s.at_min as usize).max().unwrap_or(0);
    (0..=last)
        .map(|m| {
            let in_minute: Vec<Sample> = samples
                .iter()
                .filter(|s| s.at_min as usize == m)
                .copied()
                .collect();
            (m, stats(&in_minute, true), stats(&in_minute, false))
        })
        .collect()
}

/// "p50 / max" of a minute's class, or a dash.
pub fn brief(s: &Option<Stats>) -> String {
    s.as_ref()
        .map(|s| format!("{:.1} / {:.1} ({})", s.p50, s.max, s.n))
        .unwrap_or_else(|| "—".into())
}
