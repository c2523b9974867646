//! After the load: the final sync of every identity, then the whole
//! history checked against Dovecot, Cassandra, the stand-in's records and
//! the daemons' logs. The strict rule: every message present on Dovecot at
//! the end in a folder its identity syncs is stored once and handed off; a
//! message appended then expunged or moved before any sync saw it may be
//! missing, and is not counted.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use caliopen_imap::imap::utf7;
use caliopen_imap::store::raw_message::raw_message_id;
use caliopen_imap::store::Store;
use futures::StreamExt;
use uuid::Uuid;

use crate::faults::{self, Injected};
use crate::generator::Retired;
use crate::kit;
use crate::setup::{Env, Ident};

/// One line of the report's table.
pub struct Check {
    pub name: String,
    pub value: u64,
    /// Shown instead of the number when set.
    pub text: Option<String>,
    pub zero_required: bool,
}

impl Check {
    pub fn new(name: &str, value: u64, zero_required: bool) -> Check {
        Check {
            name: name.into(),
            value,
            text: None,
            zero_required,
        }
    }

    pub fn failed(&self) -> bool {
        self.zero_required && self.value != 0
    }
}

/// Order a sync of every identity until one finds nothing to do, within
/// `bound`; the identities that never got there.
pub async fn final_sync(
    client: &async_nats::Client,
    idents: &[Ident],
    bound: Duration,
) -> Vec<String> {
    let until = Instant::now() + bound;
    let left = futures::stream::iter(idents)
        .map(|id| async move {
            for _ in 0..40 {
                let o = kit::order_sync(
                    client.clone(),
                    "outboundIMAP".into(),
                    id.user,
                    id.identity,
                    Duration::from_secs(120),
                )
                .await;
                if o.complete() {
                    return None;
                }
                if Instant::now() > until {
                    break;
                }
                if !o.report.as_ref().is_some_and(|r| r["ok"] == true) {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
            }
            Some(id.login.clone())
        })
        .buffer_unordered(8)
        .filter_map(|x| async move { x })
        .collect::<Vec<_>>()
        .await;
    left
}

/// An identity's messages at the end: those present in the folders it
/// syncs, and every id its folders could ever have given (any UID below
/// UIDNEXT of a folder that exists or existed).
pub struct Present {
    pub expected: HashSet<Uuid>,
    pub universe: HashSet<Uuid>,
}

pub async fn present(env: &Env, id: &Ident, i: usize, retired: &[Retired]) -> Result<Present> {
    let mut s = env.imap(&id.login).await?;
    let names: Vec<(String, bool)> = s
        .list(Some(""), Some("*"))
        .await?
        .filter_map(|n| async move { n.ok() })
        .map(|n| {
            let attrs = format!("{:?}", n.attributes());
            let skip =
                attrs.contains("NoSelect") || attrs.contains("Junk") || attrs.contains("Trash");
            (n.name().to_string(), skip)
        })
        .collect()
        .await;
    let mut p = Present {
        expected: HashSet::new(),
        universe: HashSet::new(),
    };
    let add = |name: &str, uv: u32, next: u32, p: &mut Present| {
        for uid in 1..next {
            p.universe
                .insert(raw_message_id(id.user, id.identity, name, uv, uid));
        }
    };
    for (_, name, uv, next) in retired.iter().filter(|r| r.0 == i) {
        add(name, *uv, *next, &mut p);
    }
    for (wire, skip) in names {
        let name = utf7::decode(&wire).map_err(|e| anyhow!("{wire}: {e:?}"))?;
        let mb = s.select(&wire).await?;
        let uv = mb.uid_validity.unwrap_or(0);
        add(&name, uv, mb.uid_next.unwrap_or(0), &mut p);
        if skip || !id.syncs(&name) {
            continue;
        }
        for uid in s.uid_search("ALL").await? {
            p.expected
                .insert(raw_message_id(id.user, id.identity, &name, uv, uid));
        }
    }
    let _ = s.logout().await;
    Ok(p)
}

/// What the checks add up over every identity.
#[derive(Default)]
pub struct Tally {
    pub expected: u64,
    pub not_stored: u64,
    pub undelivered: u64,
    pub undelivered_gone: u64,
    pub foreign: u64,
    pub never_seen: u64,
    pub rows: u64,
}

/// Compare one identity's end state with Cassandra and the hand-offs.
pub async fn tally_one(
    store: &Store,
    p: &Present,
    id: &Ident,
    seen: &HashMap<Uuid, Vec<Instant>>,
    t: &mut Tally,
) -> Result<()> {
    let rows = store.raw_message_ids_of(id.user).await?;
    let states = futures::stream::iter(rows.iter().copied())
        .map(|r| async move { (r, store.raw_message_delivered(r).await) })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut delivered = HashMap::new();
    for (r, st) in states {
        delivered.insert(r, st? == Some(true));
    }
    t.expected += p.expected.len() as u64;
    t.rows += rows.len() as u64;
    for e in &p.expected {
        match delivered.get(e) {
            None => t.not_stored += 1,
            Some(false) => t.undelivered += 1,
            Some(true) if !seen.contains_key(e) => t.never_seen += 1,
            Some(true) => {}
        }
    }
    for (r, d) in &delivered {
        if !p.universe.contains(r) {
            t.foreign += 1;
        } else if !d && !p.expected.contains(r) {
            t.undelivered_gone += 1;
        }
    }
    Ok(())
}

/// Repeated hand-offs: (at a fault, outside any fault). A repeat is at a
/// fault when it, or the hand-off it repeats, falls in a fault's window
/// (from its start to 90 s after its end: a lock's life, a hand-off
/// timeout and a retry).
pub fn repeats(seen: &HashMap<Uuid, Vec<Instant>>, t0: Instant, faults: &[Injected]) -> (u64, u64) {
    let near = |at: Instant| {
        let s = at.saturating_duration_since(t0).as_secs_f64();
        faults
            .iter()
            .any(|f| s >= f.start - 2.0 && s <= f.end + 90.0)
    };
    let (mut at_fault, mut outside) = (0, 0);
    for times in seen.values() {
        for w in times.windows(2) {
            if near(w[0]) || near(w[1]) {
                at_fault += 1;
            } else {
                outside += 1;
            }
        }
    }
    (at_fault, outside)
}

/// `imapctl status --all --json`: (unhealthy, disabled, problems seen).
pub fn health(env: &Env) -> Result<(u64, u64, Vec<String>)> {
    let (_, out, err) = faults::ctl(env, &["status", "--all", "--json"])?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)
        .map_err(|e| anyhow!("imapctl status --all --json: {e}: {out}{err}"))?;
    let (mut unhealthy, mut disabled, mut problems) = (0, 0, Vec::new());
    for r in rows {
        if r["healthy"] != true {
            unhealthy += 1;
            problems.push(format!("{}: {}", r["identifier"], r["problems"]));
        }
        if r["state"] != "active" {
            disabled += 1;
        }
    }
    Ok((unhealthy, disabled, problems))
}

/// Identities whose sync lock is still held, after waiting up to `bound`
/// for syncs that were running to end.
pub async fn locked(store: &Store, idents: &[Ident], bound: Duration) -> Result<Vec<String>> {
    let until = Instant::now() + bound;
    loop {
        let mut held = Vec::new();
        for id in idents {
            if let Some(l) = store.sync_lock(id.user, id.identity).await? {
                held.push(format!("{} (owner {})", id.login, l.owner));
            }
        }
        if held.is_empty() || Instant::now() > until {
            return Ok(held);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Lines with `panicked` in the daemons' logs.
pub fn panics(env: &Env) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir(&env.launch.work) else {
        return found;
    };
    for e in dir.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for l in text.lines().filter(|l| l.contains("panicked")) {
            found.push(format!("{}: {l}", e.file_name().to_string_lossy()));
        }
    }
    found
}

/// RSS of each daemon over the second half of the load, from the samples
/// of its last start: growth from the first third to the last third of
/// those samples. A check per daemon (a zero is required for runs of 20
/// minutes or more: growth under 20%, over at least 5 minutes since its
/// last start), and a note with the numbers.
pub fn rss_growth(
    rss: &[(String, f64, u64, u32)],
    load_secs: f64,
    required: bool,
) -> (Vec<Check>, Vec<String>) {
    let mut names: Vec<&String> = rss.iter().map(|r| &r.0).collect();
    names.dedup();
    names.sort();
    names.dedup();
    let (mut checks, mut notes) = (Vec::new(), Vec::new());
    for name in names {
        let mine: Vec<_> = rss.iter().filter(|r| &r.0 == name).collect();
        let last = mine.last().map(|r| r.3).unwrap_or(0);
        let window: Vec<&&(String, f64, u64, u32)> = mine
            .iter()
            .filter(|r| r.1 >= load_secs / 2.0 && r.3 == last)
            .collect();
        let span = match (window.first(), window.last()) {
            (Some(a), Some(b)) => b.1 - a.1,
            _ => 0.0,
        };
        let half: Vec<u64> = window.iter().map(|r| r.2).collect();
        let third = half.len() / 3;
        let mut c = Check::new(
            &format!("RSS growth over the second half, {name}"),
            0,
            required,
        );
        if third == 0 {
            c.zero_required = false;
            c.text = Some("too few samples since its last start".into());
        } else {
            // A process warms up in its first minutes: a start late in the
            // run says nothing about a leak.
            if span < 300.0 {
                c.zero_required = false;
            }
            let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len() as f64;
            let (a, b) = (mean(&half[..third]), mean(&half[half.len() - third..]));
            let growth = (b / a.max(1.0) - 1.0) * 100.0;
            c.value = u64::from(growth > 20.0);
            c.text = Some(format!(
                "{growth:+.0}% ({:.0} → {:.0} MB)",
                a / 1024.0,
                b / 1024.0
            ));
        }
        let peak = mine.iter().map(|r| r.2).max().unwrap_or(0);
        notes.push(format!(
            "{name}: peak RSS {} MB, {} restarts",
            peak / 1024,
            last
        ));
        checks.push(c);
    }
    (checks, notes)
}
