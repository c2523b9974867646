//! The run's settings and the tools it drives: the flags, the stack's
//! `STACK_*` environment (scripts/bench.sh sources `.stack/env`), this
//! run's subjects, keyspaces and bucket; `cqlsh`, `doveadm`, `bench_tool`
//! and the caliopen-imap binary; keyspaces, the cached corpora on Dovecot,
//! the identities, the worker's YAML and the machine's description.
//!
//! Everything a Caliopen-side measurement writes goes to keyspace
//! `caliopen_bench` (the poller's 100k identities to
//! `caliopen_bench_poller`, live sync to `caliopen_bench_live`), never to
//! `caliopen`, which the tests share.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::log;

/// The corpus's seed: the same bytes every run.
pub const SEED: u64 = 20261126;

/// What the run needs to know, read once.
pub struct Env {
    pub repo: PathBuf,
    pub bin: PathBuf,
    pub tool: PathBuf,
    pub lda: PathBuf,
    pub state: PathBuf,
    pub work: PathBuf,
    pub results: PathBuf,
    pub tag: String,
    pub ks: String,
    pub ks_poller: String,
    pub ks_live: String,
    pub bucket: String,
    pub imaps: String,
    pub imaps_port: String,
    pub cass_hosts: String,
    pub cass_pid: u32,
    pub nats: String,
    pub ca_file: String,
    cqlsh: String,
    pub dovecot_conf: String,
    pub flags: Flags,
    /// BENCH_IDLE_USERS, BENCH_IDLE_REST_SECS, BENCH_LIVE_MESSAGES: the
    /// live-sync runs shrunk for a quick try (1000, 60, 100).
    pub idle_users: u32,
    pub idle_rest_secs: u64,
    pub live_messages: u32,
}

/// `--large`, `--rounds N`, `--only live`.
#[derive(Clone)]
pub struct Flags {
    pub large: bool,
    pub rounds: u32,
    pub only_live: bool,
}

impl Flags {
    pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Flags> {
        let mut f = Flags {
            large: false,
            rounds: 3,
            only_live: false,
        };
        while let Some(a) = args.next() {
            match a.as_str() {
                "--large" => f.large = true,
                "--rounds" => f.rounds = args.next().unwrap_or_default().parse()?,
                "--only" => match args.next().as_deref() {
                    Some("live") => f.only_live = true,
                    _ => bail!("--only: live is the one subset"),
                },
                _ => bail!("usage: scripts/bench.sh [--large] [--rounds N] [--only live]"),
            }
        }
        Ok(f)
    }
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("${name} is not set (source .stack/env)"))
}

fn var_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Env {
    pub fn load(flags: Flags) -> Result<Env> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let profile = std::env::var("BENCH_PROFILE").unwrap_or_else(|_| "release".into());
        let out = repo.join("target").join(&profile);
        let state = PathBuf::from(var("CALIOPEN_IMAP_STACK_DIR")?);
        let work = state.join("bench");
        std::fs::create_dir_all(&work)?;
        let results = work.join(if flags.only_live {
            "results-live.jsonl"
        } else {
            "results.jsonl"
        });
        let pid_text = std::fs::read_to_string(state.join("cassandra/cassandra.pid"))?;
        let tag = format!("bench{}", std::process::id());
        Ok(Env {
            bin: out.join("caliopen-imap"),
            tool: out.join("examples/bench_tool"),
            lda: out.join("examples/lda_standin"),
            repo,
            state,
            work,
            results,
            bucket: format!("caliopen-bench-{tag}"),
            tag,
            ks: "caliopen_bench".into(),
            ks_poller: "caliopen_bench_poller".into(),
            ks_live: "caliopen_bench_live".into(),
            imaps: format!("{}:{}", var("STACK_IMAP_HOST")?, var("STACK_IMAPS_PORT")?),
            imaps_port: var("STACK_IMAPS_PORT")?,
            cass_hosts: var("STACK_CASSANDRA_HOSTS")?,
            cass_pid: pid_text
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
                .parse()?,
            nats: var("STACK_NATS_URL")?,
            ca_file: var("STACK_IMAP_CA_FILE")?,
            cqlsh: var("STACK_CQLSH")?,
            dovecot_conf: var("STACK_DOVECOT_CONF")?,
            flags,
            idle_users: var_or("BENCH_IDLE_USERS", 1000),
            idle_rest_secs: var_or("BENCH_IDLE_REST_SECS", 60),
            live_messages: var_or("BENCH_LIVE_MESSAGES", 100),
        })
    }

    pub fn in_topic(&self) -> String {
        format!("inboundSMTP.{}", self.tag)
    }

    pub fn orders(&self) -> String {
        format!("outboundIMAP.{}", self.tag)
    }
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `bench_tool users`: COUNT identities in KEYSPACE for Dovecot users
/// PREFIX1.. on the stack's IMAPS server, with `extra` flags (`--infos`);
/// their `user identity login` lines in LIST.
pub fn users(
    e: &Env,
    keyspace: &str,
    (prefix, count): (&str, u64),
    extra: &[&str],
    list: &Path,
) -> Result<()> {
    let (n, l) = (count.to_string(), list.to_string_lossy().into_owned());
    let mut args = vec![
        "users",
        "--hosts",
        &e.cass_hosts,
        "--keyspace",
        keyspace,
        "--logins",
        prefix,
        "--count",
        &n,
        "--server",
        &e.imaps,
        "--password-env",
        "STACK_IMAP_PASSWORD",
        "--list",
        &l,
    ];
    args.extend_from_slice(extra);
    tool(e, None, &args)?;
    Ok(())
}

/// One bench_tool subcommand; its JSON line. `pin` runs it under taskset.
pub fn tool(env: &Env, pin: Option<&str>, args: &[&str]) -> Result<Value> {
    let mut cmd = match pin {
        Some(cores) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cores).arg(&env.tool);
            c
        }
        None => Command::new(&env.tool),
    };
    let out = run(cmd.args(args))?;
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("bench_tool {}: {line:?}", args[0]))
}

pub fn cqlsh(env: &Env, args: &[&str]) -> Result<String> {
    let (host, port) = env
        .cass_hosts
        .split_once(':')
        .unwrap_or((&env.cass_hosts, "9042"));
    run(Command::new(&env.cqlsh)
        .args(["--connect-timeout=20", "--request-timeout=120", host, port])
        .args(args))
}

pub fn cql(env: &Env, statements: &str) -> Result<String> {
    cqlsh(env, &["-e", statements])
}

pub fn doveadm(env: &Env, args: &[&str]) -> Result<String> {
    run(Command::new("doveadm")
        .arg("-c")
        .arg(&env.dovecot_conf)
        .args(args))
}

/// Our keyspaces get the project's schema, as stack.sh gives `caliopen`.
pub fn apply_schema(env: &Env, ks: &str) -> Result<()> {
    let schema = std::fs::read_to_string(env.repo.join("config/schema.cql"))?;
    let re_table = regex_lite_replace(&schema, ks);
    let path = env.work.join(format!("schema-{ks}.cql"));
    std::fs::write(&path, re_table)?;
    cqlsh(env, &["-f", &path.to_string_lossy()])?;
    Ok(())
}

/// `caliopen.` → `KS.` and `KEYSPACE IF NOT EXISTS caliopen` → `... KS`
/// (the sed of the former script, on word boundaries).
fn regex_lite_replace(schema: &str, ks: &str) -> String {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(schema.len());
    let mut rest = schema;
    while let Some(i) = rest.find("caliopen") {
        let (head, tail) = (&rest[..i], &rest[i + "caliopen".len()..]);
        out.push_str(head);
        let free_before = !out.chars().last().is_some_and(word);
        let dotted = tail.starts_with('.');
        let declared =
            out.ends_with("KEYSPACE IF NOT EXISTS ") && !tail.chars().next().is_some_and(word);
        out.push_str(if free_before && (dotted || declared) {
            ks
        } else {
            "caliopen"
        });
        rest = tail;
    }
    out.push_str(rest);
    out
}

pub fn truncate_raw(env: &Env) -> Result<()> {
    cql(
        env,
        &format!(
            "TRUNCATE {0}.raw_message; TRUNCATE {0}.user_raw_lookup;",
            env.ks
        ),
    )?;
    Ok(())
}

/// Bytes of the raw messages stored now: in their Cassandra rows
/// (`raw_data`) and in the object store (rows with a `uri`).
pub fn stored_split(env: &Env) -> Result<Value> {
    let out = cql(
        env,
        &format!(
            "PAGING OFF; SELECT raw_size, uri FROM {}.raw_message;",
            env.ks
        ),
    )?;
    let (mut c, mut nc, mut o, mut no) = (0u64, 0u64, 0u64, 0u64);
    for line in out.lines() {
        let f: Vec<&str> = line.split('|').collect();
        let Some(size) = f.first().and_then(|s| s.trim().parse::<u64>().ok()) else {
            continue;
        };
        if f.len() != 2 {
            continue;
        }
        if f[1].contains("s3:") {
            (o, no) = (o + size, no + 1);
        } else {
            (c, nc) = (c + size, nc + 1);
        }
    }
    Ok(json!({"cass_bytes": c, "cass_msgs": nc, "s3_bytes": o, "s3_msgs": no}))
}

pub fn maildir_of(env: &Env, user: &str) -> Result<PathBuf> {
    let out = doveadm(env, &["user", "-f", "mail", user])?;
    let dir = out.trim().trim_start_matches("maildir:");
    Ok(PathBuf::from(dir.split(':').next().unwrap_or(dir)))
}

/// A field of `doveadm mailbox status` of INBOX (messages, vsize, uidnext).
pub fn mailbox_field(env: &Env, user: &str, field: &str) -> Result<u64> {
    mailbox_field_of(env, user, field, "INBOX")
}

pub fn mailbox_field_of(env: &Env, user: &str, field: &str, mailbox: &str) -> Result<u64> {
    let out = doveadm(
        env,
        &[
            "-f", "flow", "mailbox", "status", "-u", user, field, mailbox,
        ],
    )?;
    let key = format!("{field}=");
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&key)?.parse().ok())
        .with_context(|| format!("{user}: no {field} in {out:?}"))
}

/// Make Dovecot user USER hold exactly COUNT generated messages; a mailbox
/// that already does is kept (same seed, same bytes), anything else is
/// rebuilt from scratch.
pub fn ensure_corpus(env: &Env, user: &str, count: u64, profile: &str) -> Result<()> {
    if mailbox_field(env, user, "messages").ok() == Some(count) {
        return Ok(());
    }
    let dir = maildir_of(env, user)?;
    if profile != "small" {
        log(&format!(
            "generating {count} messages ({profile}) for {user} in {}",
            dir.display()
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    corpus(env, &dir, count, 0, profile)?;
    doveadm(env, &["force-resync", "-u", user, "INBOX"])?;
    ensure!(
        mailbox_field(env, user, "messages")? == count,
        "{user}: Dovecot does not see {count} messages after the resync"
    );
    Ok(())
}

/// `bench_tool corpus` into DIR (message numbers from FIRST), owned by
/// Dovecot's `mail` user.
pub fn corpus(env: &Env, dir: &Path, count: u64, first: u64, profile: &str) -> Result<()> {
    let (count, first, seed) = (count.to_string(), first.to_string(), SEED.to_string());
    let d = dir.to_string_lossy();
    let mut args = vec![
        "corpus",
        "--dir",
        &d,
        "--count",
        &count,
        "--seed",
        &seed,
        "--profile",
        profile,
    ];
    if first != "0" {
        args.extend(["--first", &first]);
    }
    tool(env, None, &args)?;
    run(Command::new("chown").args(["-R", "mail:mail"]).arg(dir))?;
    Ok(())
}

/// A Caliopen user (the API's job in production) and, through the real
/// `ctl addremote`, a fresh remote identity for Dovecot user LOGIN: a new
/// identity makes the next sync a first sync. (user, identity)
pub fn new_identity(env: &Env, yaml: &Path, login: &str) -> Result<(String, String)> {
    let user = uuid::Uuid::new_v4().to_string();
    cql(
        env,
        &format!(
            "INSERT INTO {0}.user (user_id, name) VALUES ({user}, 'bench-{user}');
             INSERT INTO {0}.user_name (name, user_id) VALUES ('bench-{user}', {user});",
            env.ks
        ),
    )?;
    let id = run(Command::new(&env.bin).arg("ctl").arg("-c").arg(yaml).args([
        "addremote",
        "--login",
        login,
        "--pass-env",
        "STACK_IMAP_PASSWORD",
        "--server",
        &env.imaps,
        "--userid",
        &user,
    ]))?;
    Ok((user, id.trim().to_string()))
}

/// A worker's YAML (the same writer as the tests'), syncing on order only
/// unless `idle` says otherwise; live sync adds its metrics address.
pub fn worker_yaml(
    env: &Env,
    path: &Path,
    workers: u32,
    in_topic: &str,
    ks: &str,
    tail: &str,
) -> Result<()> {
    let out = run(Command::new(&env.tool).args([
        "worker-yaml",
        "--tag",
        &env.tag,
        "--workers",
        &workers.to_string(),
        "--in-topic",
        in_topic,
        "--keyspace",
        ks,
        "--bucket",
        &env.bucket,
    ]))?;
    // (the file ends inside its `imap:` block)
    std::fs::write(path, format!("{out}{tail}"))?;
    Ok(())
}

/// The machine and the versions of everything measured.
pub fn machine_json(env: &Env) -> Value {
    let sh = |c: &str| {
        run(Command::new("bash").arg("-c").arg(c))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let java = format!(
        "$(dirname \"$(readlink -f /proc/{}/exe)\")/java -version 2>&1 | head -1",
        env.cass_pid
    );
    let commit = format!(
        "cd {} && echo \"$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo ' + uncommitted changes')\"",
        env.repo.display()
    );
    let cass = cql(env, "SELECT release_version FROM system.local").unwrap_or_default();
    let cass = cass
        .lines()
        .map(str::trim)
        .find(|l| l.split('.').count() == 3 && l.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .unwrap_or_default();
    json!({
        "date": chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        "cpu": sh("awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo"),
        "cores": sh("nproc"),
        "mem": sh("awk '/^MemTotal/ {printf \"%.1f GiB\", $2 / 1048576}' /proc/meminfo"),
        "kernel": sh("uname -sr"),
        "os": sh(". /etc/os-release && echo \"$PRETTY_NAME\""),
        "rustc": sh("rustc --version"),
        "dovecot": sh("dovecot --version"),
        "cassandra": cass,
        "java": sh(&java),
        "nats": sh("nats-server --version"),
        "mbsync": sh("mbsync --version"),
        "commit": sh(&commit),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_moves_to_the_bench_keyspace() {
        let s = "CREATE KEYSPACE IF NOT EXISTS caliopen WITH x;\nCREATE TABLE caliopen.user (caliopen_x int);";
        assert_eq!(
            super::regex_lite_replace(s, "caliopen_bench"),
            "CREATE KEYSPACE IF NOT EXISTS caliopen_bench WITH x;\nCREATE TABLE caliopen_bench.user (caliopen_x int);"
        );
    }
}
