//! Live sync, one round: the identity with 200 folders (first sync, resync
//! with nothing new and with one new message, against mbsync), the
//! APPEND → `process_raw` latency with IDLE and with a `sync` order sent
//! right after each APPEND, and 1,000 identities held in IDLE by one worker
//! (RSS per session, connections, CPU at rest). It runs in a keyspace of
//! its own: a worker with `imap.idle: all` holds a session for every active
//! remote identity it finds, so only the scenario's may be there.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::{json, Map, Value};

use crate::measure::{self, cpu_s, hwm_kb, round2, rss_kb, settle, Proc};
use crate::scenarios::{mbsyncrc, merge};
use crate::setup::{self, cql, doveadm, tool, Env, SEED};
use crate::{log, Suite};

/// Latency: few sessions (Dovecot's instant IDLE wake-ups are capped by
/// the mail user's inotify instances).
const LIVE_ACCOUNTS: u32 = 10;
/// Seconds a message may take to reach the stand-in: past Dovecot's 30 s
/// polling fallback, so a slow wake-up is measured rather than lost.
const LIVE_TIMEOUT: &str = "40";
/// How long the 1,000 sessions may take to be established.
const IDLE_RAMP_SECS: u64 = 180;
const FOLDERS: u32 = 200;
/// Resyncs of the 200 folders (no change, one new message) measured each.
const LIVE_REPEAT: u32 = 3;

/// A worker of the live keyspace and the address of its /metrics.
/// The folder mail is filed into for the NOTIFY latency row.
const LIVE_FOLDER: &str = "Filed";

struct LiveWorker {
    proc: Proc,
    metrics: String,
}

impl Suite {
    pub fn run_live(&self) -> Result<()> {
        log(&format!(
            "live sync: 200 folders, IDLE latency, {} IDLE sessions",
            self.env.idle_users
        ));
        setup::apply_schema(&self.env, &self.env.ks_live)?;
        settle(&self.env, &self.rec, "live", 1)?;
        self.run_folders()?;
        self.run_live_latency()?;
        self.run_idle_1k()
    }

    fn reset_live(&self) -> Result<()> {
        let ks = &self.env.ks_live;
        cql(&self.env, &format!(
            "TRUNCATE {ks}.user_identity; TRUNCATE {ks}.identity_lookup; TRUNCATE {ks}.identity_type_lookup;
             TRUNCATE {ks}.imap_idle_lease; TRUNCATE {ks}.imap_idle_worker;"))?;
        Ok(())
    }

    /// A worker on the live keyspace, IDLE `all` or off, with /metrics.
    fn live_worker(&self, topic: &str, idle: bool, name: &str) -> Result<LiveWorker> {
        let e = &self.env;
        let yaml = e.work.join(format!("worker-{name}.yaml"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics = format!("127.0.0.1:{port}");
        // `live-idle-inbox`: IDLE on INBOX alone, as on a server without NOTIFY.
        let notify = if name == "live-idle-inbox" {
            "  idle_notify: false\n"
        } else {
            ""
        };
        let idle = if idle {
            format!("  idle: all\n  idle_max: {}\n{notify}", e.idle_users)
        } else {
            "  idle: \"off\"\n".into()
        };
        setup::worker_yaml(
            e,
            &yaml,
            10,
            topic,
            &e.ks_live,
            &format!("{idle}metrics_addr: {metrics}\n"),
        )?;
        Ok(LiveWorker {
            proc: self.start_worker(&yaml, name)?,
            metrics,
        })
    }

    /// `bench_tool users` on the live keyspace: COUNT identities for
    /// Dovecot users PREFIX1.., with INFOS; their `user identity login`
    /// lines in LIST.
    fn live_users(&self, prefix: &str, count: u32, infos: &str, list: &Path) -> Result<()> {
        let e = &self.env;
        setup::users(
            e,
            &e.ks_live,
            (prefix, count.into()),
            &["--infos", infos],
            list,
        )
    }

    /// One identity with `mailboxes: *` over FOLDERS folders: first sync,
    /// then LIVE_REPEAT times a no-change resync and a resync after 1 new
    /// message in 1 folder; commands from the worker's counter. mbsync does
    /// the same on the same account.
    fn run_folders(&self) -> Result<()> {
        let e = &self.env;
        let user = "bench200f1";
        ensure_folders(e, user)?;
        self.reset_live()?;
        let mut w = self.live_worker(&e.in_topic(), false, "folders")?;
        let list = e.work.join("folders.list");
        self.live_users("bench200f", 1, "mailboxes=*", &list)?;
        let text = std::fs::read_to_string(&list)?;
        let ids: Vec<&str> = text.split_whitespace().collect();
        ensure!(ids.len() >= 2, "{}: no identity", list.display());
        let uidnext = setup::mailbox_field_of(e, user, "uidnext", "f100")?;
        let ids = (ids[0], ids[1]);
        if !self.folders_sync(&mut w, ids, "live_folders_first", 1)? {
            return Ok(());
        }
        for r in 1..=LIVE_REPEAT {
            if !self.folders_sync(&mut w, ids, "live_folders_nochange", r)? {
                return Ok(());
            }
            add_one(e, user, "f100")?;
            if !self.folders_sync(&mut w, ids, "live_folders_one_new", r)? {
                return Ok(());
            }
        }
        w.proc.stop(40);
        let expunge = |e: &Env| {
            doveadm(
                e,
                &[
                    "expunge",
                    "-u",
                    user,
                    "mailbox",
                    "f100",
                    "uid",
                    &format!("{uidnext}:*"),
                ],
            )
        };
        expunge(e)?;
        let _ = std::fs::remove_dir_all(e.work.join("mbsync-folders"));
        self.mbsync_folders(user, "mbsync_folders_first", 1)?;
        // (its first run after the pull took 0.3 to 1.3 s in trial runs,
        // its later ones 0.3 to 0.6 s, with the same commands: kept apart)
        self.mbsync_folders(user, "mbsync_folders_nochange_after_pull", 1)?;
        for r in 1..=LIVE_REPEAT {
            self.mbsync_folders(user, "mbsync_folders_nochange", r)?;
            add_one(e, user, "f100")?;
            self.mbsync_folders(user, "mbsync_folders_one_new", r)?;
        }
        expunge(e)?;
        Ok(())
    }

    /// Records worker time, messages and the commands sent by one sync
    /// order; false when it hung.
    fn folders_sync(
        &self,
        w: &mut LiveWorker,
        ids: (&str, &str),
        scenario: &str,
        round: u32,
    ) -> Result<bool> {
        let c0 = commands(&w.metrics);
        let out = self.tool_sync(ids.0, ids.1);
        if self.hung(scenario, "200f", round, &out, &mut w.proc)? {
            return Ok(false);
        }
        let c1 = commands(&w.metrics);
        let extra = merge(
            json!({"messages": out.get("fetched").cloned().unwrap_or(Value::Null)}),
            commands_delta(c0, c1),
        );
        self.rec
            .record(scenario, "200f", round, merge(out, extra))?;
        Ok(true)
    }

    /// mbsync on the same folders (Junk and Trash left out, as `mailboxes:
    /// *` does); the lines it sends are counted from its debug output.
    fn mbsync_folders(&self, user: &str, scenario: &str, round: u32) -> Result<()> {
        let e = &self.env;
        let near = e.work.join("mbsync-folders");
        std::fs::create_dir_all(&near)?;
        let conf = e.work.join("mbsyncrc-folders");
        std::fs::write(
            &conf,
            mbsyncrc(
                e,
                "folders",
                user,
                &near,
                "* !Junk !Trash",
                "SubFolders Verbatim\n",
            ),
        )?;
        let log_path = e.work.join(format!("{scenario}.mbsync.log"));
        let t0 = Instant::now();
        let out = Command::new("mbsync")
            .args(["-Dn", "-c"])
            .arg(&conf)
            .arg("pull")
            .output()?;
        let secs = t0.elapsed().as_secs_f64();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&log_path, &text)?;
        ensure!(
            out.status.success(),
            "mbsync failed, see {}",
            log_path.display()
        );
        // mbsync -Dn prints what it sends as `>>> TAG COMMAND...`.
        let sent: Vec<&str> = text.lines().filter(|l| l.starts_with(">>> ")).collect();
        let selects = sent.iter().filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 3
                && w[1].chars().all(|c| c.is_ascii_digit())
                && (w[2] == "SELECT" || w[2] == "EXAMINE")
        });
        self.rec.record(
            scenario,
            "200f",
            round,
            json!({"secs": secs, "commands_total": sent.len(), "selects": selects.count()}),
        )
    }

    /// Latency from APPEND to the processor stand-in, over LIVE_ACCOUNTS
    /// accounts: a worker with `imap.idle: all` (no poller, no orders),
    /// then the on-demand peer (a `sync` order right after each APPEND, to
    /// a worker without IDLE). The stand-in is served by bench_tool itself
    /// on a subject of its own, so it sees each hand-off at once.
    fn run_live_latency(&self) -> Result<()> {
        let e = &self.env;
        let topic = format!("{}.live", e.in_topic());
        let list = e.work.join("live.list");
        self.reset_live()?;
        // Empty, the filed folder too: the identities are new, so their
        // first syncs would hand off a previous run's messages while the
        // latency tool counts arrivals.
        for (i, folder) in (1..=LIVE_ACCOUNTS).flat_map(|i| [(i, "INBOX"), (i, LIVE_FOLDER)]) {
            let user = format!("benchlive{i}");
            let _ = doveadm(e, &["expunge", "-u", &user, "mailbox", folder, "all"]);
        }
        // Every folder synced, so a NOTIFY session watches a filed folder too.
        self.live_users("benchlive", LIVE_ACCOUNTS, "idle=true;mailboxes=*", &list)?;
        let mut w = self.live_worker(&topic, true, "live-idle")?;
        // (each session syncs its folders once before its first IDLE)
        let (n, secs) = wait_idle(&w.metrics, LIVE_ACCOUNTS as u64, 60);
        wait_syncs_done(&w.metrics, 60);
        let label = format!("{LIVE_ACCOUNTS}acc");
        let limit = measure::inotify_limit();
        if n.is_none_or(|n| n < 1) {
            self.rec.record(
                "live_latency_idle",
                &label,
                1,
                json!({"messages": 0, "sessions": n,
                "skipped": "the worker holds no IDLE session"}),
            )?;
        } else {
            let out = self.latency_tool(&topic, &list, &["--mode", "idle"])?;
            self.rec.record(
                "live_latency_idle",
                &label,
                1,
                merge(
                    out,
                    json!({"sessions": n, "ramp_secs": secs, "inotify_max_user_instances": limit}),
                ),
            )?;
        }
        let pid = w.proc.pid().to_string();
        self.live_latency_more(
            &topic,
            &list,
            "live_latency_notify_folder",
            &label,
            &[
                "--mode",
                "idle",
                "--folder",
                LIVE_FOLDER,
                "--worker-pid",
                &pid,
            ],
        )?;
        w.proc.stop(40);
        let mut w = self.live_worker(&topic, true, "live-idle-inbox")?;
        wait_idle(&w.metrics, LIVE_ACCOUNTS as u64, 60);
        wait_syncs_done(&w.metrics, 60);
        let pid = w.proc.pid().to_string();
        self.live_latency_more(
            &topic,
            &list,
            "live_latency_idle_inbox_only",
            &label,
            &["--mode", "idle", "--worker-pid", &pid],
        )?;
        w.proc.stop(40);
        let mut w = self.live_worker(&topic, false, "live-order")?;
        let orders = e.orders();
        let out = self.latency_tool(&topic, &list, &["--mode", "order", "--subject", &orders])?;
        self.rec.record("live_latency_order", &label, 1, out)?;
        w.proc.stop(40);
        Ok(())
    }

    /// One more latency row with the worker already holding its sessions:
    /// NOTIFY for mail filed outside INBOX, or IDLE on INBOX only.
    fn live_latency_more(
        &self,
        topic: &str,
        list: &Path,
        scenario: &str,
        label: &str,
        args: &[&str],
    ) -> Result<()> {
        let out = self.latency_tool(topic, list, args)?;
        self.rec.record(scenario, label, 1, out)
    }

    fn latency_tool(&self, topic: &str, list: &Path, mode: &[&str]) -> Result<Value> {
        let e = &self.env;
        let (l, n) = (
            list.to_string_lossy().into_owned(),
            e.live_messages.to_string(),
        );
        let mut args = vec![
            "live-latency",
            "--nats",
            &e.nats,
            "--in-topic",
            topic,
            "--server",
            &e.imaps,
            "--ca",
            &e.ca_file,
            "--password-env",
            "STACK_IMAP_PASSWORD",
            "--list",
            &l,
            "--messages",
            &n,
            "--timeout",
            LIVE_TIMEOUT,
        ];
        args.extend(mode);
        tool(e, None, &args)
    }

    /// IDLE_USERS identities, one worker with `imap.idle: all`: sessions
    /// reached, RSS against the same worker configuration without IDLE,
    /// connections, CPU at rest, Dovecot's processes.
    fn run_idle_1k(&self) -> Result<()> {
        let e = &self.env;
        self.reset_live()?;
        self.live_users(
            "benchidle",
            e.idle_users,
            "idle=true",
            &e.work.join("idle1k.list"),
        )?;
        // The baseline: the same identities, IDLE off, at rest after start-up.
        let mut w = self.live_worker(&e.in_topic(), false, "idle1k-off")?;
        std::thread::sleep(Duration::from_secs(5));
        let rss0 = rss_kb(w.proc.pid());
        // Cassandra's own floor over the same window, live sync off: what
        // the window with the sessions costs above it is live sync's.
        settle(e, &self.rec, "idle-off", 1)?;
        let cass0 = cpu_s(e.cass_pid);
        std::thread::sleep(Duration::from_secs(e.idle_rest_secs));
        let cass_base = round2(cpu_s(e.cass_pid) - cass0);
        w.proc.stop(40);
        let procs0 = measure::dovecot_imap_procs();
        let warn0 = measure::inotify_warnings(e);
        let mut w = self.live_worker(&e.in_topic(), true, "idle1k")?;
        let (mut n, secs) = wait_idle(&w.metrics, e.idle_users as u64, IDLE_RAMP_SECS);
        // A session is counted held when it opens; its first sync queues
        // for the job slots and may run on after: at rest starts once the
        // syncs are done.
        wait_syncs_done(&w.metrics, IDLE_RAMP_SECS);
        std::thread::sleep(Duration::from_secs(5));
        // (the sessions held when the readings are taken)
        if let Some(m) = scrape(&w.metrics).map(|t| gauge(&t, "caliopen_imap_idle_sessions")) {
            n = m.map(|v| v as u64).or(n);
        }
        let pid = w.proc.pid();
        let now = json!({"rss_kb": rss_kb(pid), "sockets": measure::socket_count(pid), "imap_conns": measure::imap_conns(e, pid),
                         "procs1": measure::dovecot_imap_procs()});
        // At rest means Cassandra too: the sessions' first syncs leave
        // compactions behind, which would be billed to live sync.
        settle(e, &self.rec, "idle", 1)?;
        let (cpu0, cass0) = (cpu_s(pid), cpu_s(e.cass_pid));
        if n.is_some_and(|n| n > 0) {
            std::thread::sleep(Duration::from_secs(e.idle_rest_secs));
        }
        let rest = json!({"cpu": round2(cpu_s(pid) - cpu0), "cass": round2(cpu_s(e.cass_pid) - cass0),
                          "cass_base": cass_base});
        let row = idle_row(e, n, secs, rss0, &now, &rest, (procs0, warn0), pid);
        self.rec
            .record("live_idle_1k", &format!("{}id", e.idle_users), 1, row)?;
        w.proc.stop(60);
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn idle_row(
    e: &Env,
    n: Option<u64>,
    secs: u64,
    rss0: u64,
    now: &Value,
    rest: &Value,
    before: (u64, u64),
    pid: u32,
) -> Value {
    let rss1 = now["rss_kb"].as_u64().unwrap_or(0);
    let procs1 = now["procs1"].as_u64().unwrap_or(0);
    let per = n
        .filter(|n| *n > 0)
        .map(|n| (rss1 as f64 - rss0 as f64) / n as f64);
    json!({"identities": e.idle_users, "sessions": n, "ramp_secs": secs, "rss_base_kb": rss0, "rss_kb": rss1,
           "rss_end_kb": rss_kb(pid), "hwm_kb": hwm_kb(pid), "per_session_kb": per,
           "sockets": now["sockets"], "imap_conns": now["imap_conns"],
           "dovecot_imap_procs": procs1 as i64 - before.0 as i64, "dovecot_imap_procs_all": procs1,
           "rest_secs": e.idle_rest_secs, "rest_cpu_s": rest["cpu"], "rest_cass_cpu_s": rest["cass"],
           "rest_cass_base_cpu_s": rest["cass_base"],
           "dovecot_inotify_warnings": measure::inotify_warnings(e) as i64 - before.1 as i64,
           "inotify_max_user_instances": measure::inotify_limit()})
}

/// The worker's /metrics text, or None when it did not answer.
fn scrape(addr: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", &format!("http://{addr}/metrics")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The value of a sample (name with its labels, as exposed); None while
/// the worker has no such metric.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == name)
        .filter_map(|(_, v)| v.trim().parse().ok())
        .next_back()
}

/// The worker's IMAP commands so far, by command; None while it does not
/// count them.
fn commands(addr: &str) -> Option<BTreeMap<String, f64>> {
    let text = scrape(addr).unwrap_or_default();
    if !text
        .lines()
        .any(|l| l.starts_with("# TYPE caliopen_imap_imap_commands"))
    {
        return None;
    }
    let mut m = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("caliopen_imap_imap_commands_total{"))
    {
        let Some(cmd) = l
            .split("command=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *m.entry(cmd.to_string()).or_insert(0.0) += v;
    }
    Some(m)
}

/// The commands sent between two readings and their sum (before a
/// worker's first command its /metrics has no such family: none sent).
fn commands_delta(
    before: Option<BTreeMap<String, f64>>,
    after: Option<BTreeMap<String, f64>>,
) -> Value {
    let Some(after) = after else {
        return json!({"commands": null, "commands_total": null});
    };
    let before = before.unwrap_or_default();
    let d: Map<String, Value> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).unwrap_or(&0.0)))
        .filter(|(_, v)| *v > 0.0)
        .map(|(k, v)| (k, json!(v as u64)))
        .collect();
    let total: u64 = d.values().filter_map(Value::as_u64).sum();
    json!({"commands": d, "commands_total": total})
}

/// Wait until the worker holds WANT IDLE sessions, at most SECS, giving up
/// earlier when the count has not moved for 30 s; then until each
/// session's first sync has ended. (sessions reached, None without the
/// gauge; seconds it took)
fn wait_idle(addr: &str, want: u64, secs: u64) -> (Option<u64>, u64) {
    let t0 = Instant::now();
    let (mut last, mut moved, mut n) = (None::<u64>, Instant::now(), None::<u64>);
    while t0.elapsed().as_secs() < secs {
        if let Some(text) = scrape(addr) {
            match gauge(&text, "caliopen_imap_idle_sessions") {
                None if t0.elapsed().as_secs() >= 10 => break,
                None => {}
                Some(v) => {
                    let v = v as u64;
                    n = Some(v);
                    if v >= want {
                        break;
                    }
                    if last != Some(v) {
                        (last, moved) = (Some(v), Instant::now());
                    }
                    if moved.elapsed().as_secs() >= 30 {
                        break;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    if let Some(n) = n {
        while t0.elapsed().as_secs() < secs {
            let ok = scrape(addr)
                .and_then(|t| gauge(&t, "caliopen_imap_syncs_ended_total{outcome=\"ok\"}"));
            if ok.is_some_and(|ok| ok as u64 >= n) {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    (n, t0.elapsed().as_secs())
}

/// Dovecot user USER with FOLDERS folders f001... of 2 to 5 small
/// messages each, kept between runs like the other corpora.
fn ensure_folders(e: &Env, user: &str) -> Result<()> {
    let done = e.work.join(format!("folders-{SEED}.done"));
    let listed = |e: &Env| {
        doveadm(e, &["mailbox", "list", "-u", user, "f*"])
            .map(|o| o.lines().count())
            .unwrap_or(0)
    };
    if done.is_file() && listed(e) == FOLDERS as usize {
        return Ok(());
    }
    log(&format!("generating {FOLDERS} folders for {user}"));
    let dir = setup::maildir_of(e, user)?;
    let _ = std::fs::remove_dir_all(&dir);
    for i in 1..=FOLDERS as u64 {
        setup::corpus(
            e,
            &dir.join(format!(".f{i:03}")),
            2 + i % 4,
            i * 10,
            "small",
        )?;
    }
    setup::run(Command::new("chown").args(["-R", "mail:mail"]).arg(&dir))?;
    doveadm(e, &["force-resync", "-u", user, "*"])?;
    ensure!(
        listed(e) == FOLDERS as usize,
        "{user}: Dovecot does not list {FOLDERS} folders"
    );
    std::fs::write(done, "")?;
    Ok(())
}

/// One new small message in FOLDER of USER, through Dovecot.
fn add_one(e: &Env, user: &str, folder: &str) -> Result<()> {
    let one = e.work.join("one-new");
    let _ = std::fs::remove_dir_all(&one);
    let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64;
    setup::corpus(e, &one, 1, 90_000_000 + nanos % 1_000_000, "small")?;
    let file = std::fs::read_dir(one.join("cur"))?
        .filter_map(|f| f.ok())
        .map(|f| f.path())
        .next();
    let file = file.ok_or_else(|| anyhow::anyhow!("no message in {}", one.display()))?;
    doveadm_save(e, user, folder, &file)?;
    let _ = std::fs::remove_dir_all(&one);
    Ok(())
}

fn doveadm_save(e: &Env, user: &str, folder: &str, file: &Path) -> Result<()> {
    let st = Command::new("doveadm")
        .arg("-c")
        .arg(&e.dovecot_conf)
        .args(["save", "-u", user, "-m", folder])
        .stdin(std::fs::File::open(file)?)
        .status()?;
    ensure!(st.success(), "doveadm save: {st}");
    Ok(())
}

/// Wait (at most `max_secs`) until the worker's ended syncs stop growing
/// for 5 s in a row.
fn wait_syncs_done(addr: &str, max_secs: u64) {
    let ended = |addr: &str| -> f64 {
        scrape(addr).map_or(0.0, |t| {
            t.lines()
                .filter(|l| l.starts_with("caliopen_imap_syncs_ended_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
    };
    let started = std::time::Instant::now();
    let (mut last, mut still) = (ended(addr), 0);
    while still < 5 && started.elapsed().as_secs() < max_secs {
        std::thread::sleep(Duration::from_secs(1));
        let now = ended(addr);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}
