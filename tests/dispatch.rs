//! One executable, three programs: by symlink name or by first argument.

use std::process::{Command, Output};

use crate::util::{run, stack, symlink, text, unique, worker_yaml};

#[test]
fn ctl_help_by_symlink_and_by_subcommand() {
    let link = symlink("imapctl");
    let out = Command::new(&link).arg("--help").output().unwrap();
    assert!(out.status.success());
    let by_link = text(&out.stdout);
    for cmd in [
        "addremote",
        "syncremote",
        "fullfetch",
        "listremotes",
        "removeremote",
    ] {
        assert!(
            by_link.contains(cmd),
            "imapctl --help lacks {cmd}: {by_link}"
        );
    }
    assert!(by_link.starts_with("Usage: imapctl"));

    let out = run(&["ctl", "--help"], &[]);
    assert!(out.status.success());
    let by_sub = text(&out.stdout);
    assert!(by_sub.contains("syncremote"));
    assert!(by_sub.starts_with("Usage: caliopen-imap ctl"));
}

#[test]
fn worker_and_poller_by_symlink() {
    for (name, word) in [("imapworker", "start"), ("idpoller", "start")] {
        let out = Command::new(symlink(name)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name} --help");
        assert!(text(&out.stdout).contains(word));
    }
}

#[test]
fn unknown_mode_or_command_exits_2() {
    let out = run(&["nonsense"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown mode"));

    let out = run(&[], &[]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["ctl", "frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(symlink("imapworker")).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a mode without command is a usage error"
    );
}

#[test]
fn version_everywhere() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("caliopen-imap "));
    let out = Command::new(symlink("idpoller"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("idpoller "));
}

#[test]
fn go_style_equals_flags_are_accepted() {
    // cobra accepted --flag=value; a malformed UUID proves the value arrived.
    let out = run(&["ctl", "listremotes", "--userid=not-a-uuid"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not-a-uuid"),
        "{}",
        text(&out.stderr)
    );
}

// ------------------------------------------------ the original's command lines

/// A folder holding `imapworker.yaml` and `idpoller.yaml` for the stack, as
/// Caliopen's containers mount /etc/caliopen. Topics and lease carry `tag`,
/// so `config` output proves which file was read.
fn etc_caliopen(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("etc-caliopen"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(worker_yaml(tag, ""), dir.join("imapworker.yaml")).unwrap();
    let s = stack();
    std::fs::write(
        dir.join("idpoller.yaml"),
        format!(
            "scan_interval: 2\nstore_settings:\n  hosts: [\"{}\"]\nnats_url: {}\n\
             nats_topics:\n  id_cache: idCache.{tag}\n  imap: imapJobs.{tag}\n\
             poller:\n  lease_name: lease{tag}\n",
            s.cassandra, s.nats_url
        ),
    )
    .unwrap();
    dir
}

fn prog(name: &str, args: &[&str], cwd: Option<&std::path::Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(symlink(name));
    cmd.args(args).stdin(std::process::Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("CALIOPEN_IMAP_") || k == "CALIOPENROOT" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().unwrap()
}

#[test]
fn caliopen_config_names_and_paths_are_found() {
    let tag = unique("cfgname");
    let dir = etc_caliopen(&tag);
    let d = dir.to_str().unwrap();
    let file = dir.join("imapworker.yaml");
    let f = file.to_str().unwrap();
    let topic = format!("outboundIMAP.{tag}");
    let configpath_eq = format!("--configpath={d}");
    let config_eq = format!("--config={f}");
    let forms: Vec<(&str, Vec<&str>)> = vec![
        // Dockerfile.imap-worker's flags, with `config` for `start`.
        (
            "imapworker",
            vec!["config", "-c", "imapworker", "--configpath", d],
        ),
        (
            "imapworker",
            vec!["-c", "imapworker", "--configpath", d, "config"],
        ),
        (
            "imapworker",
            vec!["--config=imapworker", &configpath_eq, "config"],
        ),
        ("imapworker", vec!["config", "-v", "--configpath", d]),
        (
            "imapctl",
            vec!["config", "-c", "imapworker", "--configpath", d],
        ),
        ("imapctl", vec!["--configpath", d, "config"]),
        // Today's `-c FILE`, in both places and spellings.
        ("imapworker", vec!["-c", f, "config"]),
        ("imapworker", vec!["config", "--config", f]),
        ("imapctl", vec!["config", &config_eq]),
    ];
    for (name, args) in forms {
        let out = prog(name, &args, None, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name} {args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains(&topic),
            "{name} {args:?} read another file"
        );
    }
    // idpoller, as Dockerfile.identity-poller names it.
    let out = prog(
        "idpoller",
        &["config", "-c", "idpoller", "--configpath", d],
        None,
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("lease{tag}")));

    // $CALIOPENROOT/src/backend/configs/, then the working directory.
    let root = std::env::temp_dir().join(unique("croot"));
    let cfgs = root.join("src/backend/configs");
    std::fs::create_dir_all(&cfgs).unwrap();
    std::fs::copy(&file, cfgs.join("imapworker.yaml")).unwrap();
    let r = root.to_str().unwrap();
    let out = prog(
        "imapctl",
        &["-c", "imapworker", "config"],
        None,
        &[("CALIOPENROOT", r)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&topic));
    let out = prog("imapctl", &["config", "-c", "imapworker"], Some(&dir), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&topic));

    // A name found nowhere: one line saying where we looked, exit 2.
    let out = prog(
        "imapworker",
        &["start", "-c", "nosuch", "--configpath", d],
        None,
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nosuch.yaml") && err.contains(d), "{err}");
}

#[test]
fn go_version_flags_and_command() {
    for (name, args) in [
        ("imapworker", vec!["start", "-V"]),
        ("imapworker", vec!["--version"]),
        ("idpoller", vec!["-V", "start"]),
        ("imapctl", vec!["version"]),
        ("imapctl", vec!["-V"]),
    ] {
        let out = prog(name, &args, None, &[]);
        assert_eq!(out.status.code(), Some(0), "{name} {args:?}");
        assert!(
            text(&out.stdout).starts_with(&format!("{name} ")),
            "{name} {args:?}"
        );
    }
}

/// Start a daemon, wait for its pid file, refuse a second one on the same
/// file, SIGTERM the first: exit 0 and the file is gone.
fn pid_file_round(name: &str, go_config: &str, dir: &std::path::Path) {
    let pid_file = dir.join(format!("{name}.pid"));
    let args = [
        "start",
        "-c",
        go_config,
        "--configpath",
        dir.to_str().unwrap(),
        "-p",
        pid_file.to_str().unwrap(),
    ];
    let mut child = Command::new(symlink(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Bounded wait for the daemon to get that far (not a timing assertion).
    let mut written = None;
    for _ in 0..600 {
        if let Ok(t) = std::fs::read_to_string(&pid_file) {
            if !t.trim().is_empty() {
                written = Some(t);
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let written = written.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{name}: no pid file")
    });
    assert_eq!(written.trim(), child.id().to_string());

    let out = prog(name, &args, None, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{name} second start: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("pid file") && err.contains(&child.id().to_string()),
        "{err}"
    );
    assert!(pid_file.exists(), "the live file is left alone");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{name} after SIGTERM");
    assert!(!pid_file.exists(), "{name} left its pid file");
}

#[test]
fn dockerfile_entrypoints_run_with_their_pid_files() {
    let tag = unique("pid");
    let dir = etc_caliopen(&tag);
    // src/backend/Dockerfile.imap-worker and Dockerfile.identity-poller.
    pid_file_round("imapworker", "imapworker", &dir);
    pid_file_round("idpoller", "idpoller", &dir);
}

/// A stop asked for while a daemon still waits for NATS at start-up is a
/// clean stop (exit 0, as after any SIGTERM), not the "cannot reach NATS"
/// failure of a start that gave up.
#[test]
fn a_daemon_stopped_while_it_waits_for_nats_exits_0() {
    use std::io::{BufRead, BufReader};
    let tag = unique("dsp-nonats");
    let closed = "nats://127.0.0.1:1";
    let worker = std::fs::read_to_string(worker_yaml(&tag, ""))
        .unwrap()
        .replace(&stack().nats_url, closed);
    let poller = format!(
        "store_settings:\n  hosts: [\"{}\"]\nnats_url: {closed}\n\
         poller:\n  lease_name: {tag}\n",
        stack().cassandra
    );
    for (mode, yaml) in [("worker", worker), ("poller", poller)] {
        let path = std::env::temp_dir().join(format!("{tag}-{mode}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let mut child = Command::new(crate::util::bin())
            .args([mode, "-c", path.to_str().unwrap(), "start"])
            .env("CALIOPEN_IMAP_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let retrying = line.contains("NATS not reachable");
            seen.push(line);
            if retrying {
                break;
            }
        }
        assert!(
            seen.last()
                .is_some_and(|l| l.contains("NATS not reachable")),
            "{mode}: no retry logged: {seen:?}"
        );
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{mode}: {rest:?}");
    }
}
