//! The live-sync section: APPEND → `process_raw` latency (IDLE and the
//! on-demand peer), 1,000 identities held in IDLE, the 200-folder resync
//! against mbsync; and the goals stated beside them (also listed under
//! Targets).

use std::fmt::Write as _;

use serde_json::Value;

use super::{fmt, g, ms, num, show, thousands, Data};

/// A row of a live scenario as the report reads it.
fn field<'a>(r: Option<&'a Value>, k: &str) -> Option<&'a Value> {
    r.and_then(|r| r.get(k)).filter(|v| !v.is_null())
}

fn commands_cell(r: Option<&Value>) -> String {
    let Some(r) = r else {
        return "–".into();
    };
    let Some(c) = r.get("commands").and_then(Value::as_object) else {
        return "n/a (no command counter)".into();
    };
    let mut parts: Vec<(&String, f64)> = c
        .iter()
        .map(|(k, v)| (k, v.as_f64().unwrap_or(0.0)))
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let list: Vec<String> = parts
        .iter()
        .map(|(k, v)| format!("{k} {}", g(*v)))
        .collect();
    let total = g(num(r, "commands_total").unwrap_or(0.0));
    if list.is_empty() {
        total
    } else {
        format!("{total} ({})", list.join(", "))
    }
}

/// The commands of each run of a live scenario: one cell when every run
/// sent the same, else each run's.
fn commands_rounds(d: &Data, scenario: &str) -> String {
    let mut rs = d.all_of(scenario);
    rs.sort_by_key(|r| r.get("round").and_then(Value::as_i64).unwrap_or(0));
    let cells: Vec<String> = rs.iter().map(|r| commands_cell(Some(r))).collect();
    match cells.first() {
        None => "–".into(),
        Some(c) if cells.iter().all(|x| x == c) => c.clone(),
        _ => rs
            .iter()
            .zip(&cells)
            .map(|(r, c)| format!("run {}: {c}", show(r.get("round"))))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

pub fn goal(ok: Option<bool>) -> &'static str {
    match ok {
        None => "–",
        Some(true) => "met",
        Some(false) => "**missed**",
    }
}

/// (goal, measured, met) of live sync: the section states them beside its
/// figures, the Targets table lists them with the others.
pub fn goals(d: &Data) -> Vec<(String, String, Option<bool>)> {
    let p50 = d.one("live_latency_idle").and_then(|r| num(r, "p50_ms"));
    let k = d.one("live_idle_1k");
    let sessions = field(k, "sessions").is_some_and(|v| v.as_f64() != Some(0.0));
    let cpu = k.and_then(|r| num(r, "rest_cpu_s")).filter(|_| sessions);
    let rest = field(k, "rest_secs")
        .and_then(Value::as_f64)
        .filter(|v| *v != 0.0)
        .unwrap_or(60.0);
    let counted: Vec<&Value> = d
        .all_of("live_folders_nochange")
        .into_iter()
        .filter(|r| field(Some(r), "commands").is_some())
        .collect();
    let (measured, ok) = if counted.is_empty() {
        (
            "n/a (the worker does not count its commands)".to_string(),
            None,
        )
    } else {
        let worst = counted
            .iter()
            .filter_map(|r| num(r, "commands_total"))
            .fold(f64::MIN, f64::max);
        let opened = counted
            .iter()
            .map(|r| {
                r["commands"]
                    .as_object()
                    .map(|c| {
                        c.iter()
                            .filter(|(k, _)| *k == "EXAMINE" || *k == "SELECT")
                            .filter_map(|(_, v)| v.as_f64())
                            .sum::<f64>()
                    })
                    .unwrap_or(0.0)
            })
            .fold(f64::MIN, f64::max);
        let text = format!(
            "at most {} commands, {} EXAMINE/SELECT, over {} run(s)",
            g(worst),
            g(opened),
            counted.len()
        );
        (text, Some(worst <= 10.0))
    };
    let identities = field(k, "identities")
        .and_then(Value::as_f64)
        .unwrap_or(1000.0);
    vec![
        (
            "IDLE push: APPEND → `process_raw` p50 < 1 s".into(),
            format!("{} ms", fmt(p50, 1)),
            p50.map(|p| p < 1000.0),
        ),
        (
            format!(
                "{} IDLE sessions: worker CPU at rest near 0 (≤ 1 % of a core)",
                thousands(identities)
            ),
            format!("{} s over {} s", fmt(cpu, 2), show(Some(&rest_value(k)))),
            cpu.map(|c| c / rest <= 0.01),
        ),
        (
            "No-change 200-folder resync within a few round-trips (≤ 10 commands in every run)"
                .into(),
            measured,
            ok,
        ),
        cassandra_goal(k, rest, identities),
    ]
}

/// Live sync's Cassandra CPU at rest: the window with the sessions less
/// the same window with live sync off (Cassandra's own floor), per 1,000
/// sessions. Runs from before the floor was measured have no verdict.
fn cassandra_goal(k: Option<&Value>, rest: f64, identities: f64) -> (String, String, Option<bool>) {
    let with = k.and_then(|r| num(r, "rest_cass_cpu_s"));
    let floor = k.and_then(|r| num(r, "rest_cass_base_cpu_s"));
    let n = field(k, "sessions")
        .and_then(Value::as_f64)
        .filter(|n| *n > 0.0);
    let per_1k = match (with, floor, n) {
        (Some(a), Some(b), Some(n)) => Some(100.0 * (a - b) / rest * 1000.0 / n),
        _ => None,
    };
    // Below the floor: live sync's share is lost in Cassandra's own
    // variation from one window to the next.
    let noise = if per_1k.is_some_and(|p| p < 0.0) {
        "; under the floor: within its own variation"
    } else {
        ""
    };
    (
        format!(
            "{} IDLE sessions: Cassandra CPU for live sync at rest < 1 % of a core per 1,000 sessions",
            thousands(identities)
        ),
        format!(
            "{} % ({} s with the sessions less {} s with live sync off, over {} s{noise})",
            fmt(per_1k, 2),
            fmt(with, 2),
            fmt(floor, 2),
            g(rest)
        ),
        per_1k.map(|p| p < 1.0),
    )
}

/// `rest_secs` as the row has it (60 when the row has none).
fn rest_value(k: Option<&Value>) -> Value {
    field(k, "rest_secs")
        .filter(|v| v.as_f64() != Some(0.0))
        .cloned()
        .unwrap_or(Value::from(60))
}

pub fn section(o: &mut String, d: &Data) {
    let live = |s: &str| s.starts_with("live_") || s.starts_with("mbsync_folders");
    if !d.any_scenario(live)
        && !d
            .hangs
            .iter()
            .any(|r| show(r.get("scenario")).starts_with("live_"))
    {
        return;
    }
    o.push_str(
        "## Live sync\n\nOne round. The worker runs with `imap.idle: all` (a live session for \
         every active remote identity: NOTIFY and IDLE over one connection, as the stack's \
         Dovecot offers NOTIFY, unless a row says otherwise) and no poller; the processor stand-in is \
         `tests/support/processor.rs`, served by `bench_tool live-latency` itself so it \
         timestamps each `process_raw` as it arrives.\n\n",
    );
    let goals = goals(d);
    latency(o, d, &goals);
    idle_1k(o, d, &goals);
    folders(o, d, &goals);
}

fn latency(o: &mut String, d: &Data, goals: &[(String, String, Option<bool>)]) {
    let idle = d.one("live_latency_idle");
    let order = d.one("live_latency_order");
    let filed = d.one("live_latency_notify_folder");
    let inbox_only = d.one("live_latency_idle_inbox_only");
    let lim = field(idle, "inotify_max_user_instances")
        .or_else(|| field(d.one("live_idle_1k"), "inotify_max_user_instances"))
        .filter(|v| v.as_f64() != Some(0.0));
    let lr = if idle.is_some_and(|r| field(Some(r), "skipped").is_none()) {
        idle
    } else {
        order
    };
    let or_dash = |k: &str| field(lr, k).map_or("–".into(), |v| show(Some(v)));
    let _ = writeln!(
        o,
        "### Latency: APPEND on Dovecot → `process_raw` at the processor\n\n{} messages \
         appended one by one over IMAP (`APPEND`, round-robin over {} accounts that were \
         synced once); each timed from the APPEND's tagged OK to the stand-in receiving its \
         `process_raw`, the next APPEND waiting for it. Dovecot wakes an IDLE session through \
         inotify; the `mail` user's `fs.inotify.max_user_instances` here is {}, past which \
         Dovecot's sessions fall back to checking every 30 s, so this runs with few \
         sessions.\n",
        or_dash("appended"),
        or_dash("accounts"),
        lim.map_or("–".into(), |v| show(Some(v)))
    );
    o.push_str("| | handed off | lost | min ms | p50 ms | p90 ms | p99 ms | max ms |\n");
    o.push_str("|---|---|---|---|---|---|---|---|\n");
    for (r, label) in [
        (idle, "IDLE push (`imap.idle: all`), INBOX, NOTIFY on"),
        (
            filed,
            "NOTIFY push, mail filed into another folder (`Filed`), same worker",
        ),
        (
            inbox_only,
            "IDLE on INBOX only (`imap.idle_notify: false`), INBOX",
        ),
        (
            order,
            "On demand: a `sync` order sent right after each APPEND, no IDLE",
        ),
    ] {
        let f = |k: &str| fmt(r.and_then(|r| num(r, k)), 1);
        match r {
            None => {
                let _ = writeln!(o, "| {label} | – | – | – | – | – | – | – |");
            }
            Some(r) if field(Some(r), "skipped").is_some() => {
                let _ = writeln!(
                    o,
                    "| {label} | not run: {} | | | | | | |",
                    show(r.get("skipped"))
                );
            }
            Some(r) => {
                let lost = field(Some(r), "lost").map_or("0".into(), |v| show(Some(v)));
                let _ = writeln!(
                    o,
                    "| {label} | {} | {lost} | {} | {} | {} | {} | {} |",
                    show(r.get("messages")),
                    f("min_ms"),
                    f("p50_ms"),
                    f("p90_ms"),
                    f("p99_ms"),
                    f("max_ms")
                );
            }
        }
    }
    o.push_str(
        "| The original (Go imapworker): the poller's interval, 15 min by default | – | – | | \
         ≈ 450,000 (half an interval) | | | 900,000 |\n\n",
    );
    o.push_str(
        "Dovecot itself waits 500 ms after a mailbox changes before it tells an IDLE session \
         (`NOTIFY_DELAY_MSECS` in its `lib-storage/mailbox-watch.c`, to batch changes): that \
         is the floor of the IDLE row, and why an order sent at once (which asks Dovecot \
         directly) can be quicker. IDLE needs no one to send that order.\n\n",
    );
    conns_line(o, filed, inbox_only);
    let (label, measured, ok) = &goals[0];
    let _ = writeln!(o, "Goal: {label}: {measured}, {}.\n", goal(*ok));
}

fn idle_1k(o: &mut String, d: &Data, goals: &[(String, String, Option<bool>)]) {
    let k = d.one("live_idle_1k");
    let ids = field(k, "identities")
        .and_then(Value::as_f64)
        .unwrap_or(1000.0);
    let _ = writeln!(
        o,
        "### {} identities with `imap.idle: all`\n",
        thousands(ids)
    );
    let Some(k) = k else {
        o.push_str("Not run.\n\n");
        return;
    };
    let _ = writeln!(
        o,
        "{} Dovecot users, each with an identity (`idle` = \"true\") in the bench keyspace; \
         one worker with `idle_max: {}`. Baseline: the same worker configuration with IDLE \
         off on the same identities, at rest 5 s after start-up.\n",
        thousands(ids),
        show(k.get("identities"))
    );
    idle_table(o, k, ids, goals[1].2);
    cassandra_rows(o, k, &goals[3]);
}

/// The readings of the 1,000-session run, one row each.
fn idle_table(o: &mut String, k: &Value, ids: f64, cpu_goal: Option<bool>) {
    let n = field(Some(k), "sessions").and_then(Value::as_f64);
    let kb = |key: &str| fmt(num(k, key).map(|v| v / 1024.0), 1);
    let rest = rest_value(Some(k));
    let rest_s = rest.as_f64().unwrap_or(60.0);
    let held = match n {
        None => "n/a (no gauge)".to_string(),
        Some(n) => format!(
            "{} of {}, after {} s",
            thousands(n),
            thousands(ids),
            field(Some(k), "ramp_secs").map_or("–".into(), |v| show(Some(v)))
        ),
    };
    o.push_str("| | | Goal |\n|---|---|---|\n");
    let _ = writeln!(
        o,
        "| IDLE sessions held (`caliopen_imap_idle_sessions`) | {held} | |"
    );
    let _ = writeln!(
        o,
        "| Worker RSS without IDLE / with the sessions (MiB) | {} / {} (peak {}) | |",
        kb("rss_base_kb"),
        kb("rss_kb"),
        kb("hwm_kb")
    );
    let _ = writeln!(
        o,
        "| RSS per held session (KiB) | {} | reported |",
        fmt(num(k, "per_session_kb"), 1)
    );
    let _ = writeln!(
        o,
        "| Worker sockets / TCP connections to Dovecot's IMAPS port | {} / {} | |",
        show(k.get("sockets")),
        show(k.get("imap_conns"))
    );
    let cpu = num(k, "rest_cpu_s").filter(|_| n.is_some_and(|n| n != 0.0));
    let _ = writeln!(
        o,
        "| Worker CPU over {} s at rest (s) | {} ({} % of a core) | near 0 (≤ 1 % of a core): {} |",
        show(Some(&rest)),
        fmt(cpu, 2),
        fmt(cpu.map(|c| 100.0 * c / rest_s), 2),
        goal(cpu_goal)
    );
    let cass = num(k, "rest_cass_cpu_s");
    let _ = writeln!(
        o,
        "| Cassandra CPU over the same {} s (s), after its compactions settled: live \
         sync's membership rows and reads (no Paxos round), and whatever else ran on the machine | {} ({} % of a core) | |",
        show(Some(&rest)),
        fmt(cass, 2),
        fmt(cass.map(|c| 100.0 * c / rest_s), 1)
    );
    let floor = num(k, "rest_cass_base_cpu_s");
    if floor.is_some() {
        let _ = writeln!(
            o,
            "| Cassandra CPU over {} s at rest with live sync off (the same worker, IDLE off, \
             before the sessions): its own floor | {} ({} % of a core) | |",
            show(Some(&rest)),
            fmt(floor, 2),
            fmt(floor.map(|c| 100.0 * c / rest_s), 1)
        );
    }
    let _ = writeln!(
        o,
        "| Dovecot `imap` processes added (all now) | {} ({}) | |",
        show(k.get("dovecot_imap_procs")),
        show(k.get("dovecot_imap_procs_all"))
    );
    if let Some(w) = field(Some(k), "dovecot_inotify_warnings") {
        let _ = writeln!(
            o,
            "| Dovecot sessions past the inotify limit ({} instances for `mail`), which check \
             every 30 s instead of at once | {} | |",
            field(Some(k), "inotify_max_user_instances").map_or("–".into(), |v| show(Some(v))),
            show(Some(w))
        );
    }
    o.push('\n');
}

/// The verdict on live sync's Cassandra cost, under the table.
fn cassandra_rows(
    o: &mut String,
    k: &Value,
    (label, measured, ok): &(String, String, Option<bool>),
) {
    if num(k, "rest_cass_base_cpu_s").is_some() {
        let _ = writeln!(o, "Goal: {label}: {measured}, {}.\n", goal(*ok));
    }
}

fn folders(o: &mut String, d: &Data, goals: &[(String, String, Option<bool>)]) {
    let runs = d
        .values_any("live_folders_nochange", &|r| num(r, "secs"))
        .len()
        .max(1);
    let _ = writeln!(
        o,
        "### 200 folders\n\nOne identity with `mailboxes: *` (every folder from LIST but Junk \
         and Trash): 200 folders `f001`–`f200` of 2–5 small messages each, plus INBOX, Sent \
         and Drafts. After the first sync, a resync with nothing new and one after 1 new \
         message in folder `f100`, each {runs} times: median (min–max). The worker's commands \
         are the delta of its `caliopen_imap_imap_commands_total` over each sync order (a \
         STATUS inside a LIST-STATUS is not a command of its own); mbsync's are the lines it \
         sends (`mbsync -Dn`, `>>> ` lines), on the same account and folders (`Patterns * \
         !Junk !Trash`, one-way pull into a Maildir).\n"
    );
    o.push_str("| | wall ms | messages | commands sent |\n|---|---|---|---|\n");
    for (sc, label) in [
        ("live_folders_first", "caliopen-imap first sync"),
        ("live_folders_nochange", "caliopen-imap resync, nothing new"),
        (
            "live_folders_one_new",
            "caliopen-imap resync, 1 new message in 1 folder",
        ),
    ] {
        let _ = match d.one(sc) {
            None => writeln!(o, "| {label} | – | – | – |"),
            Some(r) => writeln!(
                o,
                "| {label} | {} | {} | {} |",
                d.cell_any(sc, &ms, 1),
                r.get("messages").map_or("–".into(), |v| show(Some(v))),
                commands_rounds(d, sc)
            ),
        };
    }
    for (sc, label) in [
        ("mbsync_folders_first", "mbsync first pull"),
        (
            "mbsync_folders_nochange_after_pull",
            "mbsync, nothing new, its first run after the pull",
        ),
        ("mbsync_folders_nochange", "mbsync, nothing new"),
        (
            "mbsync_folders_one_new",
            "mbsync, 1 new message in 1 folder",
        ),
    ] {
        let _ = match d.one(sc) {
            None => writeln!(o, "| {label} | – | – | – |"),
            Some(r) => writeln!(
                o,
                "| {label} | {} | | {} ({} SELECT) |",
                d.cell_any(sc, &ms, 1),
                show(r.get("commands_total")),
                r.get("selects").map_or("–".into(), |v| show(Some(v)))
            ),
        };
    }
    let (label, measured, ok) = &goals[2];
    let _ = writeln!(
        o,
        "\nGoal: {label}, not 200 SELECTs: {measured}, {}.\n",
        goal(*ok)
    );
}

/// The IMAP connections the worker held per identity in the NOTIFY and
/// INBOX-only runs, and what a filed message waits for without NOTIFY.
fn conns_line(o: &mut String, filed: Option<&Value>, inbox_only: Option<&Value>) {
    let per = |r: Option<&Value>| fmt(r.and_then(|r| num(r, "conns_per_identity")), 2);
    let _ = writeln!(
        o,
        "IMAP connections the worker holds per identity: {} with NOTIFY (every synced \
         folder watched), {} with IDLE on INBOX only, where mail filed into another folder \
         waits for the next scheduled sync (`interval`, 15 min by default).\n",
        per(filed),
        per(inbox_only)
    );
}
