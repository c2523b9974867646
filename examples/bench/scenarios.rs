//! The measured scenarios of a round, one function each: the two ceilings,
//! mbsync, caliopen-imap's initial sync (and its resyncs), store-only and
//! large-message syncs, 200 identities at once, and the poller. Each
//! records one or more rows (`Recorder::record`); the report reads them by
//! scenario name. A new scenario is a function here and a line in
//! `rounds.rs`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};

use crate::measure::{cpu_s, hang_evidence, hwm_kb, round2, rss_kb, timed, Meter, Proc};
use crate::setup::{self, doveadm, mailbox_field, maildir_of, new_identity, tool, Env};
use crate::{log, Suite};

/// Seconds a sync may take to report before it counts as hung (the suite
/// goes on with a fresh worker rather than stalling).
pub const SYNC_TIMEOUT: u64 = 60;
/// Messages added for the incremental-sync measurement.
const INCREMENT: u64 = 100;
/// The poller's population and its need_job load.
pub const POLLER_IDENTITIES: u64 = 100000;
const NEED_JOB: [&str; 6] = ["--rate", "1000", "--clients", "10", "--secs", "10"];
/// 200 identities of 100 to 200 small messages each.
pub const MULTI_USERS: u64 = 200;

/// `value` with `extra`'s fields added (replacing any of the same name).
pub fn merge(mut value: Value, extra: Value) -> Value {
    if let (Some(o), Value::Object(e)) = (value.as_object_mut(), extra) {
        o.extend(e);
    }
    value
}

/// A copy of a field under another name (`messages` from `fetched`).
fn alias(v: &Value, from: &str) -> Value {
    v.get(from).cloned().unwrap_or(Value::Null)
}

impl Suite {
    /// A fresh worker process per measured sync, so its peak RSS is its own.
    pub fn start_worker(&self, yaml: &Path, name: &str) -> Result<Proc> {
        let mut cmd = match self.pin {
            Some(cores) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cores]).arg(&self.env.bin);
                c
            }
            None => Command::new(&self.env.bin),
        };
        cmd.env("CALIOPEN_IMAP_LOG", "info")
            .arg("worker")
            .arg("-c")
            .arg(yaml)
            .arg("start");
        let mut p = Proc::spawn(&mut cmd, &self.env.work.join(format!("worker-{name}.log")))?;
        p.wait_log("imapworker ready", 60)?;
        Ok(p)
    }

    /// The worker's report of one sync order, with its timing; a sync with
    /// no report within SYNC_TIMEOUT is marked hung.
    pub fn tool_sync(&self, user: &str, identity: &str) -> Value {
        let t = SYNC_TIMEOUT.to_string();
        let subject = self.env.orders();
        let args = [
            "sync",
            "--nats",
            &self.env.nats,
            "--subject",
            &subject,
            "--user",
            user,
            "--identity",
            identity,
            "--timeout",
            &t,
        ];
        tool(&self.env, None, &args).unwrap_or_else(|_| {
            json!({"secs": SYNC_TIMEOUT, "ok": false, "hung": true,
                   "error": "no final report within the timeout (worker hung?)"})
        })
    }

    /// Records a hung sync (true) and stops its worker, or does nothing.
    pub fn hung(
        &self,
        scenario: &str,
        label: &str,
        round: u32,
        out: &Value,
        worker: &mut Proc,
    ) -> Result<bool> {
        if out.get("hung") != Some(&Value::Bool(true)) {
            return Ok(false);
        }
        self.rec.record(scenario, label, round, out.clone())?;
        log(&format!(
            "{scenario} {label} round {round}: HUNG, see {}",
            worker.log.display()
        ));
        hang_evidence(&self.env);
        // A hung job keeps the worker for its whole shutdown grace: no need.
        worker.stop(5);
        Ok(true)
    }

    /// Fetch ceiling: one bare UID FETCH 1:* BODY.PEEK[] of the mailbox.
    pub fn run_fetch(&self, user: &str, label: &str, round: u32) -> Result<()> {
        let e = &self.env;
        let m = Meter::begin(e);
        let out = tool(
            e,
            None,
            &[
                "fetch",
                "--server",
                &e.imaps,
                "--login",
                user,
                "--password-env",
                "STACK_IMAP_PASSWORD",
                "--ca",
                &e.ca_file,
            ],
        )?;
        self.rec.record("fetch_ceiling", label, round, m.end(out))
    }

    /// Store ceiling: the same bytes into raw_message + user_raw_lookup, no
    /// IMAP; with `mark`, every row is then marked delivered by an UPDATE
    /// of its own (the second write a hand-off makes).
    pub fn run_store(
        &self,
        user: &str,
        label: &str,
        round: u32,
        conc: u32,
        scenario: &str,
        mark: bool,
    ) -> Result<()> {
        let e = &self.env;
        setup::truncate_raw(e)?;
        let dir = maildir_of(e, user)?.to_string_lossy().into_owned();
        let conc = conc.to_string();
        let m = Meter::begin(e);
        let args = [
            "store",
            "--dir",
            &dir,
            "--hosts",
            &e.cass_hosts,
            "--keyspace",
            &e.ks,
            "--concurrency",
            &conc,
            "--mark",
            if mark { "yes" } else { "no" },
        ];
        let out = tool(e, self.pin, &args)?;
        self.rec.record(
            &format!("{scenario}{}", self.suffix),
            label,
            round,
            m.end(out),
        )
    }

    /// mbsync: one-way pull into a fresh Maildir. It matches the
    /// certificate's CN, not IP SANs (STACK.md), hence `localhost` and the
    /// server certificate. Bytes are the mailbox's. FSync off: neither
    /// Dovecot (mail_fsync=never) nor Cassandra (periodic commit log)
    /// syncs per message in this setup.
    pub fn run_mbsync(&self, user: &str, label: &str, round: u32) -> Result<()> {
        let e = &self.env;
        let near = e.work.join("mbsync-near");
        let _ = std::fs::remove_dir_all(&near);
        std::fs::create_dir_all(&near)?;
        let conf = e.work.join("mbsyncrc");
        std::fs::write(&conf, mbsyncrc(e, "bench", user, &near, "INBOX", ""))?;
        let m = Meter::begin(e);
        let (secs, rss, cpu) = timed(
            e,
            &["mbsync", "-q", "-c", &conf.to_string_lossy(), "pull"],
            self.pin,
        )?;
        let n = ["cur", "new"]
            .iter()
            .filter_map(|d| std::fs::read_dir(near.join("INBOX").join(d)).ok())
            .map(|d| d.count())
            .sum::<usize>();
        let bytes = mailbox_field(e, user, "vsize")?;
        let out =
            json!({"messages": n, "bytes": bytes, "secs": secs, "rss_kb": rss, "proc_cpu_s": cpu});
        self.rec
            .record(&format!("mbsync{}", self.suffix), label, round, m.end(out))
    }

    /// caliopen-imap with the hand-off: initial sync, then on the same
    /// identity and worker a no-change resync (timed by us, and through
    /// `ctl syncremote --wait` as an operator sees it), then an incremental
    /// sync of INCREMENT new messages.
    pub fn run_caliopen(&self, user: &str, label: &str, round: u32) -> Result<()> {
        let e = &self.env;
        let yaml = e.work.join("worker-handoff.yaml");
        setup::worker_yaml(e, &yaml, 10, &e.in_topic(), &e.ks, "  idle: \"off\"\n")?;
        setup::truncate_raw(e)?;
        let mut w = self.start_worker(&yaml, &format!("handoff-{label}-{round}"))?;
        let (u, id) = new_identity(e, &yaml, user)?;
        let cpu0 = cpu_s(w.pid());
        let m = Meter::begin(e);
        let out = self.tool_sync(&u, &id);
        let scenario = format!("caliopen_initial{}", self.suffix);
        if self.hung(&scenario, label, round, &out, &mut w)? {
            return Ok(());
        }
        let out = m.end(out);
        let extra = json!({"messages": alias(&out, "fetched"), "bytes": null, "rss_kb": hwm_kb(w.pid()),
                           "proc_cpu_s": round2(cpu_s(w.pid()) - cpu0)});
        self.rec
            .record(&scenario, label, round, merge(out, extra))?;
        if self.suffix.is_empty() {
            self.resyncs(user, label, round, &yaml, &mut w, (&u, &id))?;
        }
        w.stop(40);
        Ok(())
    }

    fn resyncs(
        &self,
        user: &str,
        label: &str,
        round: u32,
        yaml: &Path,
        w: &mut Proc,
        ids: (&str, &str),
    ) -> Result<()> {
        let e = &self.env;
        let out = self.tool_sync(ids.0, ids.1);
        if self.hung("caliopen_nochange", label, round, &out, w)? {
            return Ok(());
        }
        let extra = json!({"messages": alias(&out, "fetched")});
        self.rec
            .record("caliopen_nochange", label, round, merge(out, extra))?;
        let t0 = Instant::now();
        let _ = setup::run(Command::new(&e.bin).arg("ctl").arg("-c").arg(yaml).args([
            "syncremote",
            "--userid",
            ids.0,
            "--remoteid",
            ids.1,
            "--wait",
            "--timeout",
            &SYNC_TIMEOUT.to_string(),
        ]));
        let secs = t0.elapsed().as_secs_f64();
        self.rec.record(
            "caliopen_nochange_ctl",
            label,
            round,
            json!({"messages": 0, "secs": secs}),
        )?;

        // INCREMENT new messages, put in place before the clock starts,
        // taken away afterwards so the mailbox stays the cached corpus
        // (numbered apart from every earlier run: Dovecot remembers the
        // names of expunged files and warns when one comes back).
        let uidnext = mailbox_field(e, user, "uidnext")?;
        let dir = maildir_of(e, user)?;
        let now = chrono::Utc::now().timestamp() as u64;
        let first = 10_000_000 + (now % 100_000) * 1000 + round as u64 * INCREMENT;
        setup::corpus(e, &dir, INCREMENT, first, "mixed")?;
        doveadm(e, &["force-resync", "-u", user, "INBOX"])?;
        let out = self.tool_sync(ids.0, ids.1);
        doveadm(
            e,
            &[
                "expunge",
                "-u",
                user,
                "mailbox",
                "INBOX",
                "uid",
                &format!("{uidnext}:*"),
            ],
        )?;
        if self.hung("caliopen_incremental", label, round, &out, w)? {
            return Ok(());
        }
        let extra = json!({"messages": alias(&out, "fetched")});
        self.rec
            .record("caliopen_incremental", label, round, merge(out, extra))?;
        self.rec.record(
            "caliopen_worker_end",
            label,
            round,
            json!({"rss_kb": hwm_kb(w.pid())}),
        )
    }

    /// One first sync by a fresh worker of a fresh identity, recorded as
    /// SCENARIO with the worker's peak RSS and CPU, and with `split` where
    /// the bytes went.
    pub fn first_sync(
        &self,
        scenario: &str,
        topic: &str,
        split: bool,
        user: &str,
        label: &str,
        round: u32,
    ) -> Result<()> {
        let e = &self.env;
        let yaml = e.work.join(format!("worker-{scenario}.yaml"));
        setup::worker_yaml(e, &yaml, 10, topic, &e.ks, "  idle: \"off\"\n")?;
        setup::truncate_raw(e)?;
        let mut w = self.start_worker(&yaml, &format!("{scenario}-{label}-{round}"))?;
        let (u, id) = new_identity(e, &yaml, user)?;
        let cpu0 = cpu_s(w.pid());
        let m = Meter::begin(e);
        let out = self.tool_sync(&u, &id);
        if self.hung(scenario, label, round, &out, &mut w)? {
            return Ok(());
        }
        let out = m.end(out);
        let mut extra = json!({"messages": alias(&out, "fetched"), "rss_kb": hwm_kb(w.pid()),
                               "proc_cpu_s": round2(cpu_s(w.pid()) - cpu0)});
        if split {
            extra = merge(extra, setup::stored_split(e)?);
        }
        self.rec.record(scenario, label, round, merge(out, extra))?;
        w.stop(40);
        Ok(())
    }

    /// caliopen-imap in store-only mode (`in_topic` empty): no hand-off.
    pub fn run_caliopen_store_only(&self, user: &str, label: &str, round: u32) -> Result<()> {
        self.first_sync("caliopen_store_only", "", false, user, label, round)
    }

    /// caliopen-imap on the large-message mailbox: initial sync with
    /// hand-off, and where the bytes went (Cassandra rows or S3).
    pub fn run_caliopen_large(&self, user: &str, label: &str, round: u32) -> Result<()> {
        self.first_sync(
            "caliopen_large",
            &self.env.in_topic(),
            true,
            user,
            label,
            round,
        )
    }

    /// 200 identities ordered at once to one worker with WORKERS job slots.
    pub fn run_multi(&self, workers: u32, round: u32) -> Result<()> {
        let e = &self.env;
        let yaml = e.work.join("worker-multi.yaml");
        setup::worker_yaml(e, &yaml, workers, &e.in_topic(), &e.ks, "  idle: \"off\"\n")?;
        setup::truncate_raw(e)?;
        let mut w = self.start_worker(&yaml, &format!("multi-{workers}-{round}"))?;
        let list = e.work.join("multi.list");
        setup::users(e, &e.ks, ("bench200u", MULTI_USERS), &[], &list)?;
        let list = list.to_string_lossy().into_owned();
        let cpu0 = cpu_s(w.pid());
        let m = Meter::begin(e);
        let (subject, t) = (e.orders(), SYNC_TIMEOUT.to_string());
        let out = tool(
            e,
            None,
            &[
                "sync-many",
                "--nats",
                &e.nats,
                "--subject",
                &subject,
                "--hosts",
                &e.cass_hosts,
                "--keyspace",
                &e.ks,
                "--list",
                &list,
                "--timeout",
                &t,
            ],
        )
        .unwrap_or_else(|_| json!({"secs": SYNC_TIMEOUT, "ok": 0, "hung": true}));
        let scenario = format!("multi_w{workers}");
        if self.hung(&scenario, "200x", round, &out, &mut w)? {
            return Ok(());
        }
        let out = m.end(out);
        let extra = json!({"bytes": self.multi_bytes, "rss_kb": hwm_kb(w.pid()), "proc_cpu_s": round2(cpu_s(w.pid()) - cpu0)});
        self.rec
            .record(&scenario, "200x", round, merge(out, extra))?;
        w.stop(40);
        Ok(())
    }

    /// The poller over 100k identities: full scan time from its own log,
    /// its memory with everything scheduled, then need_job latency under
    /// load, and the harness's own floor against a do-nothing responder.
    pub fn run_poller(&self, round: u32) -> Result<()> {
        let e = &self.env;
        let yaml = e.work.join("poller.yaml");
        std::fs::write(&yaml, poller_yaml(e, round))?;
        let log_path = e.work.join(format!("poller-{round}.log"));
        let mut cmd = Command::new(&e.bin);
        cmd.env("CALIOPEN_IMAP_LOG", "info")
            .arg("poller")
            .arg("-c")
            .arg(&yaml)
            .arg("start");
        let mut p = Proc::spawn(&mut cmd, &log_path)?;
        p.wait_log("scan applied", 300)?;
        let ms = scan_elapsed_ms(&std::fs::read_to_string(&log_path)?).unwrap_or(0.0);
        std::thread::sleep(std::time::Duration::from_secs(1)); // let the schedule settle
        self.rec.record(
            "poller_scan",
            "100k",
            round,
            json!({"messages": POLLER_IDENTITIES, "secs": ms / 1000.0,
            "rss_kb": rss_kb(p.pid()), "hwm_kb": hwm_kb(p.pid())}),
        )?;
        let m = Meter::begin(e);
        let jobs = format!("imapJobs.{}", e.tag);
        let mut args = vec!["need-job", "--nats", &e.nats, "--subject", &jobs];
        args.extend(NEED_JOB);
        let out = m.end(tool(e, None, &args)?);
        self.rec.record(
            "poller_need_job",
            "100k",
            round,
            merge(out, json!({"rss_kb": hwm_kb(p.pid())})),
        )?;
        p.stop(40);
        let floor = e.in_topic();
        args[4] = &floor;
        let out = tool(e, None, &args)?;
        self.rec.record("need_job_floor", "100k", round, out)
    }
}

/// `elapsed_ms` of the first `scan applied` line (the log is coloured:
/// escapes stripped first).
fn scan_elapsed_ms(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("scan applied"))?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let v = plain.split("elapsed_ms=").nth(1)?;
    v.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

fn poller_yaml(e: &Env, round: u32) -> String {
    let t = &e.tag;
    format!(
        "# Generated by examples/bench: its own keyspace, subjects and lease.
scan_interval: 180
remote_protocols: [email, imap, twitter, mastodon]
store_name: cassandra
store_settings:
  hosts: [\"{}\"]
  keyspace: {}
  consistency_level: 1
nats_url: {}
nats_queue: IDpoller.{t}
nats_topics:
  id_cache: idCache.{t}
  imap: imapJobs.{t}
  twitter: twitterJobs.{t}
  mastodon: mastodonJobs.{t}
poller:
  lease_name: {t}-{round}
",
        e.cass_hosts, e.ks_poller, e.nats
    )
}

/// mbsync's configuration: one-way pull of PATTERNS into a Maildir.
pub fn mbsyncrc(
    e: &Env,
    account: &str,
    user: &str,
    near: &Path,
    patterns: &str,
    extra: &str,
) -> String {
    format!(
        "FSync no

IMAPAccount {account}
Host localhost
Port {port}
User {user}
PassCmd \"printenv STACK_IMAP_PASSWORD\"
SSLType IMAPS
SystemCertificates no
CertificateFile {cert}

IMAPStore far
Account {account}

MaildirStore near
Path {near}/
Inbox {near}/INBOX
{extra}
Channel pull
Far :far:
Near :near:
Patterns {patterns}
Sync Pull
Create Near
SyncState *
",
        port = e.imaps_port,
        cert = e.state.join("tls/server.pem").display(),
        near = near.display()
    )
}
