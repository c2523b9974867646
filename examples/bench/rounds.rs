//! The full suite's order: the cached corpora and keyspaces, the store
//! ceiling's concurrency tuned once, then rounds that interleave every
//! scenario (each round in a rotated order, so a drift of the machine —
//! compaction, page cache, JIT — spreads over all), the production shape
//! (Cassandra pinned to a core of its own), large messages, 200
//! identities, the poller; live sync once; the 50k mailbox with --large.

use std::process::Command;

use anyhow::Result;

use crate::measure::settle;
use crate::scenarios::{MULTI_USERS, POLLER_IDENTITIES};
use crate::setup::{self, ensure_corpus, mailbox_field, tool, SEED};
use crate::{log, Suite};

/// The store ceiling's concurrency candidates (the best of these wins).
const STORE_CONCURRENCY_CANDIDATES: [u32; 3] = [16, 64, 256];
/// The large-message mailbox: every tenth message 1-20 MB (object storage).
const LARGE_MSGS: u64 = 200;

/// The scenarios of a round on the 1k and 10k mailboxes, rotated by round.
/// A new scenario of that kind is one more entry here and one more arm in
/// [`Suite::scenario`].
const SCENARIOS: [&str; 6] = [
    "fetch",
    "store",
    "storemark",
    "mbsync",
    "caliopen",
    "storeonly",
];

impl Suite {
    pub fn prepare(&mut self) -> Result<()> {
        let e = &self.env;
        log(&format!("preparing keyspaces {} and {}", e.ks, e.ks_poller));
        setup::apply_schema(e, &e.ks)?;
        setup::apply_schema(e, &e.ks_poller)?;
        log("preparing mailboxes (cached between runs)");
        ensure_corpus(e, "bench1k", 1000, "mixed")?;
        ensure_corpus(e, "bench10k", 10000, "mixed")?;
        ensure_corpus(e, "bench200L", LARGE_MSGS, "large")?;
        if e.flags.large {
            ensure_corpus(e, "bench50k", 50000, "mixed")?;
        }
        // 200 small mailboxes: quick to make, the test is about concurrency.
        log(&format!(
            "preparing {MULTI_USERS} small mailboxes bench200u1..{MULTI_USERS}"
        ));
        let done = e.work.join(format!("multi-{SEED}.done"));
        for i in 1..=MULTI_USERS {
            if !done.is_file() || i == MULTI_USERS {
                ensure_corpus(e, &format!("bench200u{i}"), 100 + (i * 37) % 101, "small")?;
            }
        }
        std::fs::write(&done, "")?;
        self.multi_bytes = (1..=MULTI_USERS)
            .map(|i| mailbox_field(e, &format!("bench200u{i}"), "vsize"))
            .sum::<Result<u64>>()?;
        log(&format!(
            "seeding {POLLER_IDENTITIES} identities into {} (kept between runs)",
            e.ks_poller
        ));
        let n = POLLER_IDENTITIES.to_string();
        let seeded = tool(
            e,
            None,
            &[
                "seed-identities",
                "--hosts",
                &e.cass_hosts,
                "--keyspace",
                &e.ks_poller,
                "--count",
                &n,
            ],
        )?;
        self.rec.record("poller_seed", "100k", 0, seeded)
    }

    /// The store ceiling is "as fast as the driver allows": the best
    /// concurrency on the 1k mailbox.
    pub fn tune_store(&mut self) -> Result<()> {
        let mut best = 0.0;
        self.store_conc = 64;
        for c in STORE_CONCURRENCY_CANDIDATES {
            self.run_store("bench1k", "1k", 0, c, "store_tuning", false)?;
            let rate = self.rec.last_rate().unwrap_or(0.0).floor();
            if rate > best {
                (best, self.store_conc) = (rate, c);
            }
        }
        log(&format!("store ceiling concurrency: {}", self.store_conc));
        Ok(())
    }

    fn scenario(&self, s: &str, user: &str, label: &str, round: u32) -> Result<()> {
        let c = self.store_conc;
        match s {
            "fetch" => self.run_fetch(user, label, round),
            "store" => self.run_store(user, label, round, c, "store_ceiling", false),
            "storemark" => self.run_store(user, label, round, c, "store_ceiling_marked", true),
            "mbsync" => self.run_mbsync(user, label, round),
            "caliopen" => self.run_caliopen(user, label, round),
            "storeonly" => self.run_caliopen_store_only(user, label, round),
            other => anyhow::bail!("no scenario {other:?}"),
        }
    }

    pub fn round(&mut self, round: u32) -> Result<()> {
        log(&format!("round {round} of {}", self.env.flags.rounds));
        for k in 0..SCENARIOS.len() {
            let s = SCENARIOS[(k + round as usize - 1) % SCENARIOS.len()];
            for (user, label) in [("bench1k", "1k"), ("bench10k", "10k")] {
                settle(&self.env, &self.rec, label, round)?;
                self.scenario(s, user, label, round)?;
            }
        }
        self.production_shape(round)?;
        log(&format!("large messages, round {round}"));
        settle(&self.env, &self.rec, "200L", round)?;
        self.run_fetch("bench200L", "200L", round)?;
        self.run_mbsync("bench200L", "200L", round)?;
        settle(&self.env, &self.rec, "200L", round)?;
        self.run_caliopen_large("bench200L", "200L", round)?;
        self.run_multi(10, round)?;
        self.run_multi(50, round)?;
        self.run_poller(round)
    }

    /// Cassandra on core 0 (as on machines of its own), the rest on core 1.
    fn production_shape(&mut self, round: u32) -> Result<()> {
        log(&format!(
            "production shape (Cassandra on core 0, the rest on core 1), round {round}"
        ));
        self.pin(true);
        let r = (|| -> Result<()> {
            let (c, e) = (self.store_conc, &self.env);
            settle(e, &self.rec, "10k", round)?;
            self.run_store("bench10k", "10k", round, c, "store_ceiling", false)?;
            settle(e, &self.rec, "10k", round)?;
            self.run_store("bench10k", "10k", round, c, "store_ceiling_marked", true)?;
            settle(e, &self.rec, "10k", round)?;
            self.run_mbsync("bench10k", "10k", round)?;
            settle(e, &self.rec, "10k", round)?;
            self.run_caliopen("bench10k", "10k", round)
        })();
        self.pin(false);
        r
    }

    /// The production shape's placement (`on`), or every core for all.
    /// Worker, Dovecot, NATS, the stand-in and mbsync share core 1.
    pub fn pin(&mut self, on: bool) {
        let all = format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
        );
        let (cass, rest) = if on {
            ("0".to_string(), "1".to_string())
        } else {
            (all.clone(), all)
        };
        let taskset = |cores: &str, pid: &str| {
            let _ = Command::new("taskset")
                .args(["-a", "-p", "-c", cores, pid])
                .output();
        };
        taskset(&cass, &self.env.cass_pid.to_string());
        let pgrep =
            |args: &[&str]| setup::run(Command::new("pgrep").args(args)).unwrap_or_default();
        let nats =
            std::fs::read_to_string(self.env.state.join("nats/nats.pid")).unwrap_or_default();
        let mut pids: Vec<String> = pgrep(&["-x", "dovecot"])
            .lines()
            .map(String::from)
            .collect();
        pids.extend(pgrep(&["-f", "^dovecot/"]).lines().map(String::from));
        pids.push(nats.chars().filter(char::is_ascii_digit).collect());
        pids.extend(self.lda.as_ref().map(|p| p.pid().to_string()));
        for p in pids.iter().filter(|p| !p.is_empty()) {
            taskset(&rest, p);
        }
        (self.pin, self.suffix) = if on {
            (Some("1"), "_pinned")
        } else {
            (None, "")
        };
    }

    pub fn large_mailbox(&self) -> Result<()> {
        log("large mailbox (one round)");
        let c = self.store_conc;
        self.run_fetch("bench50k", "50k", 1)?;
        self.run_store("bench50k", "50k", 1, c, "store_ceiling", false)?;
        self.run_mbsync("bench50k", "50k", 1)?;
        self.run_caliopen("bench50k", "50k", 1)?;
        self.run_caliopen_store_only("bench50k", "50k", 1)
    }
}
