//! The container image (`make image`, `Containerfile`): Caliopen's two
//! entrypoint commands run unchanged in it, as its non-root user, against
//! the stack on the host network. The worker syncs a mailbox into Cassandra
//! (ordered by the image's own `imapctl`) and both daemons stop on SIGTERM
//! within `shutdown_grace_secs`.
//!
//! Skipped with a notice where podman is not installed or the image was not
//! built; `make test` builds it first wherever podman is.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::ops::{http_get, readyz_becomes};
use crate::util::*;

/// `imap.shutdown_grace_secs` of the worker under test, and the time
/// `podman stop` leaves before it kills: exit 0 means a stop within it.
const GRACE_SECS: u64 = 10;

/// The uid the image runs as (deploy/image.sh).
const IMAGE_USER: &str = "10001:10001";

/// `caliopen-imap:<version>`, as `make image` tags it, or `CALIOPEN_IMAP_IMAGE`.
fn image() -> String {
    std::env::var("CALIOPEN_IMAP_IMAGE")
        .unwrap_or_else(|_| format!("caliopen-imap:{}", env!("CARGO_PKG_VERSION")))
}

/// podman with this machine's settings (runc, ulimits) unless the caller
/// gave a `CONTAINERS_CONF` of their own.
fn podman(args: &[&str]) -> Output {
    let mut cmd = Command::new("podman");
    if std::env::var_os("CONTAINERS_CONF").is_none() {
        cmd.env("CONTAINERS_CONF", root().join("deploy/containers.conf"));
    }
    cmd.args(args).stdin(Stdio::null()).output().unwrap()
}

/// The same, off the runtime's threads (the processor stand-in runs there).
async fn podman_async(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        podman(&a)
    })
    .await
    .unwrap()
}

/// The image to test, or None (with a notice) where there is none.
fn built_image() -> Option<String> {
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("podman is not installed: the image test is skipped");
        return None;
    }
    let image = image();
    if !podman(&["image", "exists", &image]).status.success() {
        eprintln!("image {image} is not built (make image): the image test is skipped");
        return None;
    }
    Some(image)
}

/// A container, removed on drop even when the test fails.
struct Container(String);

impl Container {
    /// `podman run -d` on the host network with `etc` as /etc/caliopen,
    /// the daemon's HTTP port at `port`, and `cmd` as the command.
    fn start(image: &str, etc: &Path, port: u16, cmd: &[&str]) -> Container {
        let name = unique("caliopen-imap-test");
        let vol = format!("{}:/etc/caliopen:ro", etc.display());
        let metrics = format!("CALIOPEN_IMAP_METRICS_ADDR=127.0.0.1:{port}");
        let mut args = vec!["run", "-d", "--name", &name, "--network", "host"];
        args.extend(["-v", &vol, "-e", &metrics, image]);
        args.extend(cmd);
        let out = podman(&args);
        assert!(out.status.success(), "podman run: {}", text(&out.stderr));
        Container(name)
    }

    fn inspect(&self, format: &str) -> String {
        text(&podman(&["inspect", "--format", format, &self.0]).stdout)
            .trim()
            .to_string()
    }

    fn running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    /// The contents of `path` inside the container.
    fn read(&self, path: &str) -> String {
        let to = std::env::temp_dir().join(unique("image-cp"));
        let out = podman(&["cp", &format!("{}:{path}", self.0), to.to_str().unwrap()]);
        assert!(out.status.success(), "podman cp: {}", text(&out.stderr));
        std::fs::read_to_string(&to).unwrap()
    }

    /// `podman stop -t GRACE_SECS` (the image's STOPSIGNAL, then SIGKILL
    /// once the grace is over); the exit code and the logs.
    async fn stop(&self) -> (String, String) {
        let out = podman_async(&["stop", "-t", &GRACE_SECS.to_string(), &self.0]).await;
        assert!(out.status.success(), "podman stop: {}", text(&out.stderr));
        (self.inspect("{{.State.ExitCode}}"), self.logs())
    }

    fn logs(&self) -> String {
        let logs = podman(&["logs", &self.0]);
        format!("{}{}", text(&logs.stdout), text(&logs.stderr))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

/// Wait until `c`'s daemon listens on `addr` (bounded, not a timing assertion).
async fn listening(addr: &str, c: &Container) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        assert!(c.running(), "the daemon exited:\n{}", c.logs());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("nothing listens on {addr}:\n{}", c.logs());
}

/// A port free on loopback now (for the daemons' HTTP server).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// /etc/caliopen for the containers: the stack's worker YAML (subjects of
/// `tag`) with the stack's CA beside it, and a poller of its own lease.
fn config_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("image-etc"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&stack().ca_file, dir.join("ca.pem")).unwrap();
    let grace = format!("  shutdown_grace_secs: {GRACE_SECS}\n");
    let worker = std::fs::read_to_string(worker_yaml(tag, &grace))
        .unwrap()
        .replace(&stack().ca_file, "/etc/caliopen/ca.pem");
    std::fs::write(dir.join("imapworker.yaml"), worker).unwrap();
    let lease = format!("lease-{tag}");
    std::fs::copy(
        crate::poller::poller_yaml(tag, &lease),
        dir.join("idpoller.yaml"),
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caliopen_entrypoints_run_in_the_image_sync_and_stop_on_sigterm() {
    let Some(image) = built_image() else { return };
    let tag = unique("img");
    let etc = config_dir(&tag);
    let st = store().await;
    let (user, login, _) = mailbox_account(&st, 3, 500).await;
    let lda = lda(&format!("inboundSMTP.{tag}"), |_| false).await;

    // Caliopen's Dockerfile.imap-worker command, verbatim.
    let port = free_port();
    let worker = Container::start(
        &image,
        &etc,
        port,
        &[
            "imapworker",
            "start",
            "-c",
            "imapworker",
            "--configpath",
            "/etc/caliopen",
            "-p",
            "/imapworker.pid",
        ],
    );
    wait_for_worker(&format!("outboundIMAP.{tag}"), || {
        worker.running() || {
            eprintln!("{}", worker.logs());
            false
        }
    })
    .await;
    assert_eq!(worker.inspect("{{.Config.User}}"), IMAGE_USER);
    assert_eq!(
        worker.read("/imapworker.pid").trim(),
        "1",
        "pid 1 in its own file"
    );
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    readyz_becomes(&addr, 200).await;

    // The image's imapctl orders the sync and waits for its result.
    let vol = format!("{}:/etc/caliopen:ro", etc.display());
    let u = user.to_string();
    let out = podman_async(&[
        "run",
        "--rm",
        "--network",
        "host",
        "-v",
        &vol,
        &image,
        "imapctl",
        "--configpath",
        "/etc/caliopen",
        "syncremote",
        "--userid",
        &u,
        "--identifier",
        &login,
        "--wait",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    lda.wait_seen(3).await;
    let ids = st.raw_message_ids_of(user).await.unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
    for id in ids {
        assert_eq!(st.raw_message_delivered(id).await.unwrap(), Some(true));
    }

    // Caliopen's Dockerfile.identity-poller command, verbatim.
    let pport = free_port();
    let poller = Container::start(
        &image,
        &etc,
        pport,
        &[
            "idpoller",
            "start",
            "-c",
            "idpoller",
            "--configpath",
            "/etc/caliopen",
            "-p",
            "/idpoller.pid",
        ],
    );
    let paddr = format!("127.0.0.1:{pport}");
    listening(&paddr, &poller).await;
    // Ready first as a standby, then leading: the lease is this test's own.
    let mut ready = String::new();
    for _ in 0..300 {
        ready = readyz_becomes(&paddr, 200).await;
        if ready.contains("ready: leading") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready.contains("ready: leading"), "{ready}");

    for (c, pid_file, stopped) in [
        (&worker, "/imapworker.pid", "imapworker stopped"),
        (&poller, "/idpoller.pid", "idpoller stopped"),
    ] {
        let (code, logs) = c.stop().await;
        assert_eq!(code, "0", "exit code after SIGTERM:\n{logs}");
        assert!(logs.contains(stopped), "{logs}");
        // Not removable by the image's user: emptied, stale for the next start.
        assert_eq!(c.read(pid_file), "", "{pid_file} after the stop");
    }
}

/// deploy/compose.yaml runs the image `make image` tags, with Caliopen's
/// entrypoint commands (a version bump or an edit there shows here).
#[test]
fn compose_file_runs_the_image_make_image_builds_with_caliopens_commands() {
    let compose = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    let want = format!(
        "${{CALIOPEN_IMAP_IMAGE:-caliopen-imap:{}}}",
        env!("CARGO_PKG_VERSION")
    );
    let images: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(images, [want.as_str(); 3]);
    for cmd in [
        "[imapworker, start, -c, imapworker, --configpath, /etc/caliopen, -p, /imapworker.pid]",
        "[idpoller, start, -c, idpoller, --configpath, /etc/caliopen, -p, /idpoller.pid]",
    ] {
        assert!(compose.contains(&format!("command: {cmd}")), "{cmd}");
    }
}
