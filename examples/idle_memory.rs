//! What a held IDLE connection costs in memory, measured: the heap this
//! process has live (counted by a global allocator wrapping the system's)
//! and its RSS, per connection, at each step a live-sync session takes.
//! Issue 23 asked for ≤ 64 KiB per held session; `scripts/bench.sh`'s live
//! part measures a whole worker's RSS, this one says where it goes.
//!
//! Each of `--sessions` tasks does what `worker/idle/session.rs` does on
//! its connection: `imap::connect` (TCP, TLS, LOGIN, CAPABILITY), EXAMINE
//! INBOX, IDLE up to the server's `+ idling`, then waits. The future of a
//! session itself (`watch`) is measured by the unit test
//! `an_idle_session_future_stays_small`.
//!
//! ```text
//! idle_memory --server H:P --ca FILE --password-env VAR [--login L] [--sessions N]
//!             [--layer tcp|tls]
//! ```
//!
//! With `--layer`, each task holds only a TCP connection or a TLS one
//! (sharing one config), so the layers' costs can be told apart.
//!
//! Prints a markdown table (bytes per session at each step) on stdout.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use caliopen_imap::imap::{self, Account, Auth, Security};
use tokio::sync::{Barrier, Notify};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap and RSS, in bytes.
#[derive(Clone, Copy)]
struct Mark {
    heap: usize,
    rss: usize,
}

fn mark() -> Mark {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .unwrap_or(0);
    Mark {
        heap: LIVE.load(Ordering::Relaxed),
        rss: rss * 1024,
    }
}

struct Flags {
    server: String,
    ca: String,
    password: String,
    login: String,
    sessions: usize,
    /// Hold only the TCP (`tcp`) or TLS (`tls`) layer.
    layer: Option<String>,
}

fn flags() -> Result<Flags> {
    let mut f = Flags {
        server: String::new(),
        ca: String::new(),
        password: String::new(),
        login: "idlemem".into(),
        sessions: 200,
        layer: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(k) = args.next() {
        let v = args.next().ok_or_else(|| anyhow!("{k} needs a value"))?;
        match k.as_str() {
            "--server" => f.server = v,
            "--ca" => f.ca = v,
            "--password-env" => f.password = std::env::var(&v).with_context(|| v.clone())?,
            "--login" => f.login = v,
            "--sessions" => f.sessions = v.parse()?,
            "--layer" => f.layer = Some(v),
            _ => bail!("unknown flag {k}"),
        }
    }
    if f.server.is_empty() || f.password.is_empty() {
        bail!("usage: idle_memory --server H:P --ca FILE --password-env VAR [--login L] [--sessions N]");
    }
    Ok(f)
}

fn account(f: &Flags) -> Account {
    Account {
        server: f.server.clone(),
        security: Security::Tls,
        auth: Auth::Login {
            user: f.login.clone(),
            password: f.password.clone(),
        },
        ca_files: if f.ca.is_empty() {
            vec![]
        } else {
            vec![f.ca.clone().into()]
        },
        pin: None,
        allow_plaintext_loopback: false,
        connect_timeout: Duration::from_secs(30),
        io_timeout: Duration::from_secs(30),
    }
}

/// The steps every session waits at, so each is measured for all at once.
struct Steps {
    reached: Barrier,
    go: Notify,
}

/// The layers under a session, held alone (`--layer`): what each costs.
async fn layer(acc: Account, which: String, steps: Arc<Steps>) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(&acc.server).await?;
    if which == "tls" {
        let files: Vec<&std::path::Path> = acc.ca_files.iter().map(|p| p.as_path()).collect();
        let config = imap::tls::shared_client_config(&files, None).map_err(|e| anyhow!(e))?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        for _ in 0..3 {
            step(&steps).await;
        }
        drop(tls);
    } else {
        for _ in 0..3 {
            step(&steps).await;
        }
        drop(tcp);
    }
    Ok(())
}

/// One held connection, stepping as a live-sync session does.
async fn session(acc: Account, layer_only: Option<String>, steps: Arc<Steps>) -> Result<()> {
    if let Some(which) = layer_only {
        return layer(acc, which, steps).await;
    }
    let (mut s, _info) = imap::connect(&acc).await?;
    step(&steps).await;
    s.examine("INBOX").await?;
    step(&steps).await;
    let tag = s.run_command("IDLE").await?;
    loop {
        let r = s.read_response().await?.ok_or_else(|| anyhow!("closed"))?;
        if matches!(
            r.parsed(),
            async_imap::imap_proto::Response::Continue { .. }
        ) {
            break;
        }
    }
    step(&steps).await;
    s.run_command_untagged("DONE").await?;
    let _ = tag;
    let _ = s.logout().await;
    Ok(())
}

async fn step(steps: &Steps) {
    let go = steps.go.notified();
    steps.reached.wait().await;
    go.await;
}

#[tokio::main]
async fn main() -> Result<()> {
    let f = flags()?;
    let n = f.sessions;
    imap::tls::install_provider();
    let ca = [std::path::Path::new(&f.ca)];
    // The system roots are read once per process and kept: not counted.
    drop(imap::tls::client_config(&ca, None));
    let base = mark();
    // What each connection kept before configs were shared.
    let one = imap::tls::client_config(&ca, None);
    let config_bytes = mark().heap - base.heap;
    drop(one);
    let steps = Arc::new(Steps {
        reached: Barrier::new(n + 1),
        go: Notify::new(),
    });
    let base = mark();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(session(account(&f), f.layer.clone(), steps.clone()));
    }
    let mut marks = Vec::new();
    for _ in ["connected", "examined", "idling"] {
        steps.reached.wait().await;
        tokio::time::sleep(Duration::from_millis(300)).await; // settle
        marks.push(mark());
        steps.go.notify_waiters();
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    report(n, config_bytes, base, &marks);
    Ok(())
}

fn report(n: usize, config_bytes: usize, base: Mark, marks: &[Mark]) {
    let per = |a: usize, b: usize| (a as f64 - b as f64) / n as f64 / 1024.0;
    println!("Held connections: {n} (to Dovecot, one task each)\n");
    println!("| step | heap KiB per session (cumulative) | RSS KiB per session (cumulative) |");
    println!("|---|---|---|");
    for (name, m) in [
        "connected (TCP, TLS, LOGIN, CAPABILITY)",
        "INBOX examined",
        "in IDLE",
    ]
    .iter()
    .zip(marks)
    {
        println!(
            "| {name} | {:.1} | {:.1} |",
            per(m.heap, base.heap),
            per(m.rss, base.rss)
        );
    }
    println!(
        "\nOne rustls ClientConfig with the system roots and the CA file: {:.1} KiB",
        config_bytes as f64 / 1024.0
    );
}
