//! The alert and recording rules (`deploy/prometheus/`) in a real
//! Prometheus (Debian's `prometheus` package) scraping a live worker on
//! loopback: the worker's series arrive, the rules load without error and
//! are evaluated on them. Each rule's own behaviour is unit-tested by
//! `make rules` (`promtool test rules`). Skipped with a notice where
//! prometheus is not installed.

use std::process::{Child, Command, Stdio};

use crate::ops::{http_get, served_addr, sigterm, spawn_worker};
use crate::util::*;

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    /// Scrape `target` every second and evaluate the project's rules.
    fn start(target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(unique("prometheus"));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = root().join("deploy/prometheus/caliopen-imap.rules.yml");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n\
             \x20 - job_name: caliopen-imap\n\
             \x20   static_configs: [{{targets: [\"{target}\"]}}]\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Prometheus { child, addr, log }
    }

    /// GET an API path until `done` holds for its body (bounded wait, not
    /// a timing assertion); the body.
    fn until(&mut self, path: &str, done: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..600 {
            assert!(self.child.try_wait().unwrap().is_none(), "{}", self.logs());
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                let (code, body) = http_get(&self.addr, path);
                if code == 200 && done(&body) {
                    return body;
                }
                last = body;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{path} never as expected: {last}\n{}", self.logs());
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed() -> bool {
    let found = Command::new("prometheus").arg("--version").output().is_ok();
    if !found {
        eprintln!("prometheus is not installed: the Prometheus test is skipped");
    }
    found
}

#[test]
fn a_real_prometheus_scrapes_a_live_worker_and_evaluates_the_rules() {
    if !installed() {
        return;
    }
    let tag = unique("prom");
    let cfg = worker_yaml(&tag, "log_format: json\nmetrics_addr: 127.0.0.1:0\n");
    let (worker, log) = spawn_worker(&cfg, &[], "imapworker ready");
    let mut prom = Prometheus::start(&served_addr(&log));

    // The worker's own series, scraped.
    let body = prom.until("/api/v1/query?query=caliopen_imap_job_slots", |b| {
        b.contains("\"job\":\"caliopen-imap\"")
    });
    assert!(body.contains("\"4\"]"), "4 slots (workers: 4): {body}");
    // A recording rule evaluated on them: no job running.
    let body = prom.until(
        "/api/v1/query?query=instance:caliopen_imap_job_slots_used:ratio",
        |b| b.contains("\"value\":["),
    );
    assert!(body.contains("\"0\"]"), "{body}");
    // Every rule loaded and evaluated without error, and the one that sees
    // no poller lease (none is scraped here) goes pending.
    let rules = prom.until("/api/v1/rules", |b| {
        b.contains("caliopen-imap-alerts") && !b.contains("\"health\":\"unknown\"")
    });
    assert!(!rules.contains("\"health\":\"err\""), "{rules}");
    prom.until("/api/v1/alerts", |b| {
        b.contains("CaliopenImapNoPollerLeading")
    });
    drop(prom);
    assert_eq!(sigterm(worker), Some(0));
}
