//! The throughput sections: initial sync per mailbox, the production shape
//! (Cassandra pinned), the settle waits, large messages in object storage,
//! the store ceiling's tuning, scale (RSS, 200 identities) and the poller.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::{fmt, mb_s, ms, msgs_s, num, ratio, rss, secs, show, Data, Fig};

/// (scenario, label) of the initial-sync tables.
pub const SCEN: [(&str, &str); 6] = [
    (
        "fetch_ceiling",
        "Fetch ceiling: one bare `UID FETCH 1:* BODY.PEEK[]`, bodies dropped",
    ),
    (
        "store_ceiling",
        "Store ceiling: the corpus into `raw_message` + `user_raw_lookup`, no IMAP",
    ),
    (
        "store_ceiling_marked",
        "Store ceiling + an `UPDATE ... SET delivered = true` per row (a hand-off's second write)",
    ),
    (
        "mbsync",
        "mbsync (isync): one-way pull into a fresh Maildir",
    ),
    (
        "caliopen_initial",
        "caliopen-imap initial sync, hand-off to the processor",
    ),
    (
        "caliopen_store_only",
        "caliopen-imap initial sync, store-only (`in_topic: \"\"`)",
    ),
];

pub fn mailboxes(large: bool) -> Vec<String> {
    let mut v = vec!["1k".to_string(), "10k".to_string()];
    if large {
        v.push("50k".into());
    }
    v
}

pub fn initial(o: &mut String, d: &Data, mb: &str) {
    if !d.has_mailbox(mb) {
        return;
    }
    let _ = writeln!(o, "## Initial sync, {mb} mailbox\n");
    let fc = d.med("fetch_ceiling", mb, &msgs_s);
    let sc = d.med("store_ceiling", mb, &msgs_s);
    let msb = d.med("mbsync", mb, &msgs_s);
    o.push_str("| Scenario | msg/s | MB/s | wall s | peak RSS MiB | CPU s (process) | CPU s (Cassandra) | machine busy % | ÷ fetch ceiling | ÷ store ceiling | ÷ mbsync |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (s, label) in SCEN {
        if !d.has(s, mb) {
            continue;
        }
        let m = d.med(s, mb, &msgs_s);
        let mbcell = if s == "caliopen_initial" || s == "caliopen_store_only" {
            // The worker adds its X-Fetched headers; count the mailbox
            // bytes so MB/s compares with the ceilings.
            mailbox_mb_s(d, s, mb)
        } else {
            d.cell(s, mb, &mb_s, 1)
        };
        let _ = writeln!(
            o,
            "| {label} | {} | {mbcell} | {} | {} | {} | {} | {} | {} |",
            d.cell(s, mb, &msgs_s, 0),
            d.cell(s, mb, &secs, 2),
            cost_cells(d, s, mb),
            d.cell(s, mb, &|r| num(r, "busy_pct"), 0),
            ratio(m, fc),
            ratio(m, sc),
            ratio(m, msb)
        );
    }
    o.push('\n');
    resync(o, d, mb);
}

/// MB/s of a caliopen-imap row counted in the mailbox's bytes (from the
/// fetch ceiling of the same mailbox).
fn mailbox_mb_s(d: &Data, s: &str, mb: &str) -> String {
    match d.med("fetch_ceiling", mb, &|r| num(r, "bytes")) {
        Some(vs) if vs != 0.0 => d.cell(
            s,
            mb,
            &|r| super::div(vs, num(r, "secs")?).map(|v| v / 1e6),
            1,
        ),
        _ => "–".into(),
    }
}

fn resync(o: &mut String, d: &Data, mb: &str) {
    let messages: Fig = &|r| num(r, "messages");
    o.push_str("| Resync | wall ms | messages | |\n|---|---|---|---|\n");
    let _ = writeln!(
        o,
        "| No change, worker time (order → final report) | {} | {} | |",
        d.cell("caliopen_nochange", mb, &ms, 1),
        d.cell("caliopen_nochange", mb, messages, 0)
    );
    let _ = writeln!(
        o,
        "| No change, `ctl syncremote --wait` wall (with CLI start-up) | {} | 0 | |",
        d.cell("caliopen_nochange_ctl", mb, &ms, 1)
    );
    let _ = writeln!(
        o,
        "| Incremental, 100 new messages, worker time | {} | {} | |",
        d.cell("caliopen_incremental", mb, &ms, 1),
        d.cell("caliopen_incremental", mb, messages, 0)
    );
    let _ = writeln!(
        o,
        "| Worker peak RSS over initial + resyncs + incremental | {} MiB | | |\n",
        d.cell("caliopen_worker_end", mb, &rss, 1)
    );
}

pub fn production(o: &mut String, d: &Data) {
    if !d.has("caliopen_initial_pinned", "10k") && !d.has("mbsync_pinned", "10k") {
        return;
    }
    let mb = "10k";
    o.push_str("## Production shape, 10k mailbox\n\n");
    o.push_str(
        "Cassandra's JVM pinned to core 0 (`taskset`), as on machines of its own; the \
         worker (or mbsync), Dovecot, NATS and the processor stand-in on core 1.\n\n",
    );
    let msb = d.med("mbsync_pinned", mb, &msgs_s);
    let scp = d.med("store_ceiling_pinned", mb, &msgs_s);
    o.push_str("| Scenario | msg/s | wall s | peak RSS MiB | CPU s (process) | CPU s (Cassandra) | ÷ store ceiling | ÷ mbsync |\n");
    o.push_str("|---|---|---|---|---|---|---|---|\n");
    for (s, label) in [
        ("store_ceiling_pinned", SCEN[1].1),
        ("store_ceiling_marked_pinned", SCEN[2].1),
        ("mbsync_pinned", "mbsync (isync)"),
        (
            "caliopen_initial_pinned",
            "caliopen-imap initial sync, hand-off",
        ),
    ] {
        let m = d.med(s, mb, &msgs_s);
        let _ = writeln!(
            o,
            "| {label} | {} | {} | {} | {} | {} |",
            d.cell(s, mb, &msgs_s, 0),
            d.cell(s, mb, &secs, 2),
            cost_cells(d, s, mb),
            ratio(m, scp),
            ratio(m, msb)
        );
    }
    o.push('\n');
}

/// A run's cost cells, in that order: peak RSS, the process's CPU,
/// Cassandra's CPU.
fn cost_cells(d: &Data, s: &str, mb: &str) -> String {
    [
        d.cell(s, mb, &rss, 1),
        d.cell(s, mb, &|r| num(r, "proc_cpu_s"), 1),
        d.cell(s, mb, &|r| num(r, "cass_cpu_s"), 1),
    ]
    .join(" | ")
}

/// The settle waits before each measured scenario (the live-sync
/// scenarios' waits are theirs, not a round's).
pub fn waits(o: &mut String, d: &Data) {
    let waits: Vec<&Value> = d
        .raw()
        .iter()
        .filter(|r| r.get("scenario").and_then(Value::as_str) == Some("settle"))
        .filter(|r| {
            !matches!(
                r.get("mailbox").and_then(Value::as_str),
                Some("live" | "idle")
            )
        })
        .collect();
    if waits.is_empty() {
        return;
    }
    let mut per_round: BTreeMap<i64, f64> = BTreeMap::new();
    for r in &waits {
        let round = r.get("round").and_then(Value::as_i64).unwrap_or(0);
        *per_round.entry(round).or_default() += num(r, "secs").unwrap_or(0.0);
    }
    let busy = |r: &&&Value, k: &str| num(r, k).is_some_and(|v| v != 0.0);
    let late = waits
        .iter()
        .filter(|r| busy(r, "running_at_end") || busy(r, "pending_at_end"))
        .count();
    let longest = waits
        .iter()
        .filter_map(|r| num(r, "secs"))
        .fold(f64::NEG_INFINITY, f64::max);
    let rounds: Vec<String> = per_round
        .iter()
        .map(|(k, v)| format!("round {k}: {v:.0} s"))
        .collect();
    let _ = writeln!(
        o,
        "Before each measured scenario the suite waited until Cassandra ran and queued no \
         compaction (`system_views.sstable_tasks`, the `CompactionExecutor` pool) and dirty \
         pages were written back: {} waits, {}, longest {longest:.0} s{}\n",
        waits.len(),
        rounds.join(", "),
        if late > 0 {
            format!("; {late} gave up after 600 s with work still queued.")
        } else {
            ".".into()
        }
    );
}

pub fn large(o: &mut String, d: &Data) {
    let mb = "200L";
    if !d.has_mailbox(mb) {
        return;
    }
    o.push_str("## Large messages: object storage\n\n");
    o.push_str(
        "200 messages, every tenth of 1–20 MB. The worker runs with Caliopen's shipped \
         `raw_size_limit` (1 MiB): larger messages go to the S3 bucket (versitygw on \
         loopback), the row keeps their `uri`. Hand-off to the processor stand-in.\n\n",
    );
    let fc = d.med("fetch_ceiling", mb, &msgs_s);
    let msb = d.med("mbsync", mb, &msgs_s);
    o.push_str("| Scenario | msg/s | MB/s | wall s | peak RSS MiB | CPU s (process) | CPU s (Cassandra) | ÷ fetch ceiling | ÷ mbsync |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for (s, label) in [
        SCEN[0],
        SCEN[3],
        (
            "caliopen_large",
            "caliopen-imap initial sync, hand-off, large messages in S3",
        ),
    ] {
        if !d.has(s, mb) {
            continue;
        }
        let m = d.med(s, mb, &msgs_s);
        let mbcell = if s == "caliopen_large" {
            mailbox_mb_s(d, s, mb)
        } else {
            d.cell(s, mb, &mb_s, 1)
        };
        let _ = writeln!(
            o,
            "| {label} | {} | {mbcell} | {} | {} | {} | {} |",
            d.cell(s, mb, &msgs_s, 0),
            d.cell(s, mb, &secs, 2),
            cost_cells(d, s, mb),
            ratio(m, fc),
            ratio(m, msb)
        );
    }
    o.push('\n');
    where_bytes(o, d, mb);
}

fn where_bytes(o: &mut String, d: &Data, mb: &str) {
    o.push_str("| Where caliopen-imap put the bytes | messages | MB | share of bytes |\n|---|---|---|---|\n");
    let total = d.med("caliopen_large", mb, &|r| {
        Some(num(r, "cass_bytes")? + num(r, "s3_bytes")?)
    });
    for (key, label) in [
        ("cass", "Cassandra rows (`raw_data`)"),
        ("s3", "S3 bucket (row with `uri`)"),
    ] {
        let bytes_key = format!("{key}_bytes");
        let msgs_key = format!("{key}_msgs");
        let b = d.med("caliopen_large", mb, &|r| num(r, &bytes_key));
        let share = match (b, total) {
            (Some(b), Some(t)) if t != 0.0 => Some(100.0 * b / t),
            _ => None,
        };
        let _ = writeln!(
            o,
            "| {label} | {} | {} | {} % |",
            d.cell("caliopen_large", mb, &|r| num(r, &msgs_key), 0),
            fmt(b.map(|b| b / 1e6), 1),
            fmt(share, 0)
        );
    }
    o.push('\n');
}

pub fn tuning(o: &mut String, d: &Data) {
    let tun = d.rows("store_tuning", "1k");
    if tun.is_empty() {
        return;
    }
    let parts: Vec<String> = tun
        .iter()
        .map(|r| {
            let rate = msgs_s(r)
                .map(super::thousands)
                .unwrap_or_else(|| "–".into());
            format!("{} → {rate} msg/s", show(r.get("concurrency")))
        })
        .collect();
    let _ = writeln!(
        o,
        "Store ceiling concurrency (1k mailbox, once, the best is used above): {}.\n",
        parts.join(", ")
    );
}

pub fn scale(o: &mut String, d: &Data, mailboxes: &[String]) {
    o.push_str("## Scale\n\n");
    let _ = writeln!(
        o,
        "| Worker peak RSS (MiB), initial sync with hand-off | {} |\n|---|{}",
        mailboxes.join(" | "),
        "---|".repeat(mailboxes.len())
    );
    for (s, label) in [
        ("caliopen_initial", "caliopen-imap worker"),
        ("mbsync", "mbsync"),
    ] {
        let cells: Vec<String> = mailboxes.iter().map(|mb| d.cell(s, mb, &rss, 1)).collect();
        let _ = writeln!(o, "| {label} | {} |", cells.join(" | "));
    }
    o.push_str(
        "\n200 identities (Dovecot users of 100–200 messages of 1–20 KB each, ≈ 30,000 \
         messages in all) ordered at once (200 `sync` orders published together) to one \
         worker; done when every final report is in and every identity has `lastsync`.\n\n",
    );
    o.push_str("| `workers` | wall s | msg/s | MB/s | peak RSS MiB | CPU s (worker) | CPU s (Cassandra) | machine busy % | identities ok / with lastsync |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for wk in [10, 50] {
        let s = format!("multi_w{wk}");
        let mb = "200x";
        let mut ok: Vec<String> = d
            .rows(&s, mb)
            .iter()
            .map(|r| {
                format!(
                    "{}/{} of {}",
                    show(r.get("ok")),
                    show(r.get("with_lastsync")),
                    show(r.get("identities"))
                )
            })
            .collect();
        ok.sort();
        ok.dedup();
        let ok = if ok.is_empty() {
            "–".into()
        } else {
            ok.join(", ")
        };
        let _ = writeln!(
            o,
            "| {wk} | {} | {} | {} | {} | {} | {ok} |",
            d.cell(&s, mb, &secs, 2),
            d.cell(&s, mb, &msgs_s, 0),
            d.cell(&s, mb, &mb_s, 1),
            cost_cells(d, &s, mb),
            d.cell(&s, mb, &|r| num(r, "busy_pct"), 0)
        );
    }
    o.push('\n');
}

pub fn poller(o: &mut String, d: &Data) {
    let identities = d
        .rows("poller_seed", "100k")
        .first()
        .and_then(|r| num(r, "identities"))
        .unwrap_or(100000.0);
    let _ = writeln!(
        o,
        "## Poller\n\n{} active remote identities in keyspace `caliopen_bench_poller` \
         (seeded once, kept between runs), a fresh poller per round. Full-scan time from its \
         `scan applied` log line; then `need_job` at 1000 requests/s from 10 NATS \
         connections for 10 s (open loop), every identity being due.\n",
        super::thousands(identities)
    );
    let (p, f, mb) = ("poller_need_job", "need_job_floor", "100k");
    let c = |s: &str, k: &'static str, digits| d.cell(s, mb, &move |r| num(r, k), digits);
    o.push_str("| | |\n|---|---|\n");
    let _ = writeln!(
        o,
        "| Full scan (s) | {} |",
        d.cell("poller_scan", mb, &secs, 2)
    );
    let _ = writeln!(
        o,
        "| RSS with all scheduled (MiB) | {} |",
        d.cell("poller_scan", mb, &rss, 1)
    );
    let _ = writeln!(
        o,
        "| Peak RSS after the need_job load (MiB) | {} |",
        d.cell(p, mb, &rss, 1)
    );
    for (q, k) in [
        ("p50", "p50_ms"),
        ("p90", "p90_ms"),
        ("p99", "p99_ms"),
        ("max", "max_ms"),
    ] {
        let _ = writeln!(o, "| need_job {q} (ms) | {} |", c(p, k, 2));
    }
    let _ = writeln!(
        o,
        "| Harness floor: same load against a do-nothing responder, p50 / p99 (ms) | {} / {} |",
        c(f, "p50_ms", 2),
        c(f, "p99_ms", 2)
    );
    let _ = writeln!(o, "| Achieved rate (req/s) | {} |", c(p, "rate", 0));
    let _ = writeln!(
        o,
        "| Jobs handed out / errors | {} / {} |\n",
        c(p, "jobs", 0),
        c(p, "errors", 0)
    );
}
