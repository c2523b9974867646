//! What several scenarios do the same way: start the worker or the poller
//! with the shipped configs and this run's overrides, make a seeded Dovecot
//! mailbox and read its UIDs, stop or start a stack service, and wait for a
//! sync order's outcome. (What the soak needs too is in `examples/kit/`.)

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use crate::env::Env;
use crate::kit::{self, Daemon, Outcome};

pub async fn start_worker(env: &Env) -> Result<Daemon> {
    start_daemon(env, "worker", env.daemon_env(), "imapworker ready").await
}

pub async fn start_poller(env: &Env) -> Result<Daemon> {
    start_daemon(env, "poller", env.poller_env(), "this poller is the leader").await
}

/// `caliopen-imap <mode> -c config/<shipped file> start` with `denv`.
pub async fn start_daemon(
    env: &Env,
    mode: &'static str,
    denv: Vec<(String, String)>,
    ready: &'static str,
) -> Result<Daemon> {
    let file = if mode == "worker" {
        "imapworker.yaml"
    } else {
        "idpoller.yaml"
    };
    let yaml = env.repo.join("config").join(file);
    Daemon::spawn(
        &env.launch(),
        mode,
        vec![
            mode.into(),
            "-c".into(),
            yaml.display().to_string(),
            "start".into(),
        ],
        denv,
        ready,
    )
    .await
}

// ------------------------------------------------------------------ Dovecot

pub fn doveadm(env: &Env, args: &[&str]) -> Result<String> {
    kit::doveadm(&env.dovecot_conf, args)
}

pub async fn stack(env: &Env, cmd: &str, service: &str) -> Result<()> {
    kit::stack(&env.repo, cmd, service).await
}

pub fn maildir_of(env: &Env, user: &str) -> Result<PathBuf> {
    let s = doveadm(env, &["user", "-f", "mail", user])?;
    let s = s.trim().trim_start_matches("maildir:");
    Ok(PathBuf::from(s.split(':').next().unwrap_or(s)))
}

/// A seeded mailbox of `count` plain-text messages (1–24 KB).
pub fn make_mailbox(env: &Env, user: &str, count: u32, seed: u64) -> Result<()> {
    let dir = maildir_of(env, user)?;
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let words = [
        "courrier",
        "électronique",
        "für",
        "Grüße",
        "meeting",
        "report",
        "письмо",
        "メール",
        "naïve",
        "café",
        "the",
        "and",
        "déjà",
        "Straße",
    ];
    for i in 0..count {
        let mut rng = fastrand::Rng::with_seed(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        let mut m = format!(
            "From: Faults <faults@example.test>\r\nTo: {user}@example.test\r\n\
             Subject: fault suite {i}\r\nDate: Mon, 02 Jan 2023 10:00:00 +0000\r\n\
             Message-ID: <{seed}.{i}@faults.example.test>\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n"
        );
        let len = rng.usize(1_000..24_000);
        let mut col = 0;
        while m.len() < len {
            let w = words[rng.usize(..words.len())];
            if col > 70 {
                m.push_str("\r\n");
                col = 0;
            }
            m.push_str(w);
            m.push(' ');
            col += w.len() + 1;
        }
        m.push_str("\r\n");
        let name = format!(
            "{}.M{i}P{seed}.faults,S={len},W={len}:2,S",
            1_600_000_000 + i,
            len = m.len()
        );
        std::fs::write(dir.join("cur").join(name), m)?;
    }
    let st = std::process::Command::new("chown")
        .args(["-R", "mail:mail"])
        .arg(&dir)
        .status()?;
    if !st.success() {
        bail!("chown of {} failed", dir.display());
    }
    doveadm(env, &["force-resync", "-u", user, "INBOX"])?;
    let (n, _) = mailbox_uids(env, user)?;
    if n.len() != count as usize {
        bail!(
            "{user}: Dovecot sees {} messages, expected {count}",
            n.len()
        );
    }
    Ok(())
}

/// UIDs in INBOX and its UIDVALIDITY.
pub fn mailbox_uids(env: &Env, user: &str) -> Result<(Vec<u32>, u32)> {
    let s = doveadm(env, &["search", "-u", user, "mailbox", "INBOX", "ALL"])?;
    let uids = s
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    let st = doveadm(
        env,
        &[
            "-f",
            "flow",
            "mailbox",
            "status",
            "-u",
            user,
            "uidvalidity",
            "INBOX",
        ],
    )?;
    let uv = st
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uidvalidity="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no uidvalidity for {user}: {st:?}"))?;
    Ok((uids, uv))
}

pub async fn wait_job(job: tokio::task::JoinHandle<Outcome>) -> Outcome {
    job.await.unwrap_or(Outcome {
        silent: true,
        ..Default::default()
    })
}
