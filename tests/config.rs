//! The config loader: Caliopen's own files load unchanged, environment
//! overrides win, bad values are refused naming the key.

use crate::util::{root, run, text};

fn fixture(name: &str) -> String {
    root()
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn caliopen_worker_file_loads_unchanged_and_secrets_are_redacted() {
    let out = run(
        &[
            "worker",
            "-c",
            &fixture("imapworker.caliopen.yaml"),
            "config",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["workers"], 2);
    assert_eq!(v["nats_url"], "nats://nats:4222");
    assert_eq!(v["store_settings"]["hosts"][0], "cassandra");
    assert_eq!(v["LDAConfig"]["in_topic"], "inboundSMTP");
    assert_eq!(v["LDAConfig"]["Providers"][0]["name"], "gmail");
    for secret in [
        "FIXTURE_SECRET_KEY_NOT_REAL",
        "fixture-vault-password",
        "fixture-client-secret",
        "FIXTURE_ACCESS_KEY",
    ] {
        assert!(!shown.contains(secret), "{secret} printed");
    }
}

#[test]
fn caliopen_poller_file_loads_unchanged() {
    let out = run(
        &["poller", "-c", &fixture("idpoller.caliopen.yaml"), "config"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["scan_interval"], 180);
    assert_eq!(v["nats_topics"]["mastodon"], "mastodonJobs");
    assert_eq!(v["nats_queue"], "IDpoller");
}

#[test]
fn ctl_reads_the_worker_file() {
    let out = run(
        &["ctl", "-c", &fixture("imapworker.caliopen.yaml"), "config"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn environment_overrides_win() {
    let out = run(
        &[
            "worker",
            "-c",
            &fixture("imapworker.caliopen.yaml"),
            "config",
        ],
        &[
            ("CALIOPEN_IMAP_NATS_URL", "nats://elsewhere:4222"),
            ("CALIOPEN_IMAP_STORE_SETTINGS__KEYSPACE", "other_ks"),
            ("CALIOPEN_IMAP_LDACONFIG__IN_TOPIC", ""),
            ("CALIOPEN_IMAP_WORKERS", "7"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nats_url"], "nats://elsewhere:4222");
    assert_eq!(v["store_settings"]["keyspace"], "other_ks");
    assert_eq!(v["LDAConfig"]["in_topic"], "");
    assert_eq!(v["workers"], 7);
}

#[test]
fn config_file_from_the_environment() {
    let out = run(
        &["worker", "config"],
        &[("CALIOPEN_IMAP_CONFIG", &fixture("imapworker.caliopen.yaml"))],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nats://nats:4222"));
}

fn refused(yaml: &str, mode: &str) -> String {
    let path = std::env::temp_dir().join(crate::util::unique("bad-config") + ".yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = run(&[mode, "-c", path.to_str().unwrap(), "config"], &[]);
    assert_eq!(out.status.code(), Some(2), "accepted: {yaml}");
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(path.to_str().unwrap()),
        "file not named: {err}"
    );
    err
}

#[test]
fn bad_values_are_refused_naming_the_key() {
    let e = refused("store_settings:\n  consistency_level: abc\n", "worker");
    assert!(e.contains("store_settings.consistency_level"), "{e}");
    let e = refused("store_settings:\n  consistency_level: 42\n", "worker");
    assert!(e.contains("consistency_level"), "{e}");
    let e = refused("workers: -3\n", "worker");
    assert!(e.contains("workers"), "{e}");
    let e = refused("store_settings:\n  use_vault: true\n", "worker");
    assert!(e.contains("use_vault"), "{e}");
    let e = refused("store_name: mysql\n", "worker");
    assert!(e.contains("store_name"), "{e}");
    let e = refused("scan_interval: soon\n", "poller");
    assert!(e.contains("scan_interval"), "{e}");
    let e = refused("imap:\n  idle: sometimes\n", "worker");
    assert!(e.contains("imap.idle") && e.contains("identity"), "{e}");
    let e = refused("imap:\n  idle_renew_secs: 30m\n", "worker");
    assert!(e.contains("imap.idle_renew_secs"), "{e}");
    let e = refused("workers: [1\n", "worker");
    assert!(!e.is_empty());
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = run(
        &["worker", "-c", "/nonexistent/imapworker.yaml", "config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/imapworker.yaml"));
}

#[test]
fn shipped_configs_are_valid() {
    for (mode, f) in [
        ("worker", "config/imapworker.yaml"),
        ("poller", "config/idpoller.yaml"),
    ] {
        let path = root().join(f);
        let out = run(&[mode, "-c", path.to_str().unwrap(), "config"], &[]);
        assert!(out.status.success(), "{f}: {}", text(&out.stderr));
    }
}
