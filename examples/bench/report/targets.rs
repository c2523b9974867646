//! The Targets table: each goal of the project beside its measured figure
//! (10k mailbox medians unless said otherwise) and whether it was met.

use std::fmt::Write as _;

use serde_json::Value;

use super::{fmt, live, ms, msgs_s, num, nz, ratio, rss, secs, Data};

fn row(o: &mut String, label: &str, measured: &str, ok: Option<bool>) {
    let met = match ok {
        None => "–",
        Some(true) => "yes",
        Some(false) => "**no**",
    };
    let _ = writeln!(o, "| {label} | {measured} | {met} |");
}

/// Both figures present and non-zero: `f(x, y)`.
fn both<T>(x: Option<f64>, y: Option<f64>, f: impl Fn(f64, f64) -> T) -> Option<T> {
    Some(f(nz(x)?, nz(y)?))
}

/// A row comparing two CPU costs per message in µs, `a / b` held to
/// `bound` when there is one.
fn us_row(o: &mut String, label: &str, (a, b): (Option<f64>, Option<f64>), bound: Option<f64>) {
    let met = bound.and_then(|m| both(a, b, |a, b| a / b <= m));
    row(
        o,
        label,
        &format!("{} vs {} µs = {}", us(a), us(b), ratio(a, b)),
        met,
    );
}

fn per_msg(d: &Data, scenario: &str, key: &'static str) -> Option<f64> {
    d.med(scenario, "10k", &move |r: &Value| {
        super::div(num(r, key)?, num(r, "messages")?)
    })
}

/// µs per message, or "–".
fn us(v: Option<f64>) -> String {
    fmt(nz(v).map(|v| v * 1e6), 1)
}

/// The worst (highest) of several scenarios' figures; None when none or 0.
fn worst(d: &Data, of: &[(&str, &str)]) -> Option<f64> {
    let all: Vec<f64> = of
        .iter()
        .flat_map(|(s, mb)| d.values(s, mb, &rss))
        .collect();
    nz(Some(all.into_iter().fold(0.0, f64::max)))
}

pub fn section(o: &mut String, d: &Data) {
    o.push_str("## Targets\n\nMeasured on the 10k mailbox unless said otherwise (medians).\n\n");
    o.push_str("| Target | Measured | Met |\n|---|---|---|\n");
    throughput(o, d);
    cpu(o, d);
    production(o, d);
    resync_and_memory(o, d);
    poller(o, d);
    if d.any_scenario(|s| s.starts_with("live_")) {
        for (label, measured, ok) in live::goals(d) {
            row(o, &format!("Live sync: {label}"), &measured, ok);
        }
    }
    o.push('\n');
}

fn throughput(o: &mut String, d: &Data) {
    let m = |s| d.med(s, "10k", &msgs_s);
    let (ci, so, msb) = (m("caliopen_initial"), m("caliopen_store_only"), m("mbsync"));
    let (fc, sc) = (m("fetch_ceiling"), m("store_ceiling"));
    let low = [fc, sc]
        .into_iter()
        .flatten()
        .filter(|v| *v != 0.0)
        .reduce(f64::min);
    let low = if nz(fc).is_some() || nz(sc).is_some() {
        low
    } else {
        None
    };
    row(
        o,
        "Initial sync ≥ 1.0× mbsync msg/s",
        &format!(
            "{} vs {} msg/s = {}",
            fmt(ci, 0),
            fmt(msb, 0),
            ratio(ci, msb)
        ),
        both(ci, msb, |a, b| a / b >= 1.0),
    );
    row(
        o,
        "Initial sync ≥ 0.8× the lower ceiling",
        &format!(
            "{} vs {} msg/s = {}",
            fmt(ci, 0),
            fmt(low, 0),
            ratio(ci, low)
        ),
        both(ci, low, |a, b| a / b >= 0.8),
    );
    row(
        o,
        "Store-only vs hand-off within 10 %",
        &format!("{} vs {} msg/s = {}", fmt(so, 0), fmt(ci, 0), ratio(ci, so)),
        both(ci, so, |a, b| (a / b - 1.0).abs() <= 0.10),
    );
}

fn cpu(o: &mut String, d: &Data) {
    let cc = per_msg(d, "caliopen_initial", "cass_cpu_s");
    let scc = per_msg(d, "store_ceiling", "cass_cpu_s");
    us_row(
        o,
        "Sync's Cassandra CPU per message ≤ 1.15× the store ceiling's",
        (cc, scc),
        Some(1.15),
    );
    let scm = per_msg(d, "store_ceiling_marked", "cass_cpu_s");
    us_row(
        o,
        "(Its bound: the store ceiling with the delivered UPDATE a hand-off must make)",
        (cc, scm),
        None,
    );
    let wc = per_msg(d, "caliopen_initial", "proc_cpu_s");
    let mc = per_msg(d, "mbsync", "proc_cpu_s");
    us_row(
        o,
        "Worker CPU per message ≤ 0.5× mbsync's",
        (wc, mc),
        Some(0.5),
    );
}

fn production(o: &mut String, d: &Data) {
    let ccp = per_msg(d, "caliopen_initial_pinned", "cass_cpu_s");
    let scp = per_msg(d, "store_ceiling_pinned", "cass_cpu_s");
    us_row(
        o,
        "Production shape: sync's Cassandra CPU per message ≤ 1.15× the store ceiling's",
        (ccp, scp),
        Some(1.15),
    );
    let m = |s| d.med(s, "10k", &msgs_s);
    let (pc, pm) = (m("caliopen_initial_pinned"), m("mbsync_pinned"));
    row(
        o,
        "Production shape: initial sync ≥ 1.0× mbsync",
        &format!("{} vs {} msg/s = {}", fmt(pc, 0), fmt(pm, 0), ratio(pc, pm)),
        both(pc, pm, |a, b| a / b >= 1.0),
    );
    let lcp = [m("fetch_ceiling"), m("store_ceiling_pinned")]
        .into_iter()
        .flatten()
        .filter(|v| *v != 0.0)
        .reduce(f64::min);
    row(
        o,
        "Production shape: initial sync ≥ 0.8× the lower ceiling (fetch, or store pinned)",
        &format!(
            "{} vs {} msg/s = {}",
            fmt(pc, 0),
            fmt(lcp, 0),
            ratio(pc, lcp)
        ),
        both(pc, lcp, |a, b| a / b >= 0.8),
    );
}

fn resync_and_memory(o: &mut String, d: &Data) {
    let nc = d.med("caliopen_nochange", "10k", &ms);
    row(
        o,
        "No-change resync of 10k ≤ 100 ms (worker time)",
        &format!("{} ms", fmt(nc, 1)),
        nz(nc).map(|v| v <= 100.0),
    );
    let inc = d.med("caliopen_incremental", "10k", &secs);
    row(
        o,
        "Incremental 100 ≤ 0.5 s",
        &format!("{} s", fmt(inc, 3)),
        nz(inc).map(|v| v <= 0.5),
    );
    let peak = worst(
        d,
        &[
            ("caliopen_worker_end", "10k"),
            ("caliopen_initial", "10k"),
            ("caliopen_store_only", "10k"),
        ],
    );
    row(
        o,
        "Worker peak RSS ≤ 64 MB (10k, worst round)",
        &format!("{} MiB", fmt(peak, 1)),
        peak.map(|v| v <= 64.0),
    );
    let lp = worst(d, &[("caliopen_large", "200L")]);
    let bound = (64e6 + 2.0 * 64.0 * 1048576.0) / 1048576.0;
    row(
        o,
        &format!(
            "Worker RSS with 1–20 MB messages ≤ 64 MB + 2 × max_message_size ({bound:.0} MiB; worst round)"
        ),
        &format!("{} MiB", fmt(lp, 1)),
        lp.map(|v| v <= bound),
    );
    let mp = worst(d, &[("multi_w10", "200x"), ("multi_w50", "200x")]);
    row(
        o,
        "200 identities RSS ≤ 256 MB (worst)",
        &format!("{} MiB", fmt(mp, 1)),
        mp.map(|v| v <= 256.0),
    );
}

fn poller(o: &mut String, d: &Data) {
    let scan = d.med("poller_scan", "100k", &secs);
    row(
        o,
        "Poller full scan (100k) ≤ 10 s",
        &format!("{} s", fmt(scan, 2)),
        nz(scan).map(|v| v <= 10.0),
    );
    let prss = worst(d, &[("poller_scan", "100k"), ("poller_need_job", "100k")]);
    row(
        o,
        "Poller RSS ≤ 150 MB (worst)",
        &format!("{} MiB", fmt(prss, 1)),
        prss.map(|v| v <= 150.0),
    );
    let p99 = d.med("poller_need_job", "100k", &|r| num(r, "p99_ms"));
    let floor = d.med("need_job_floor", "100k", &|r| num(r, "p99_ms"));
    row(
        o,
        "need_job p99 ≤ 2 ms at 1,000 req/s",
        &format!(
            "{} ms (harness floor with a do-nothing responder: {} ms)",
            fmt(p99, 2),
            fmt(floor, 2)
        ),
        nz(p99).map(|v| v <= 2.0),
    );
}
