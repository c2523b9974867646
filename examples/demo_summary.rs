//! What `make demo` prints at the end: a readable account of what landed in
//! Cassandra for one Caliopen user (identities, sync state, raw messages).
//!
//! `cargo run --example demo_summary -- CONFIG USERNAME`

use std::process::ExitCode;
use std::time::Duration;

use caliopen_imap::config::{self, WorkerSettings};
use caliopen_imap::store::identity::infos;
use caliopen_imap::store::Store;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cfg, username] = args.as_slice() else {
        eprintln!("usage: demo_summary CONFIG USERNAME");
        return ExitCode::from(2);
    };
    match run(cfg, username).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo_summary: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: &str, username: &str) -> anyhow::Result<()> {
    let settings: WorkerSettings = config::load(Some(std::path::Path::new(cfg)))?;
    let store = Store::connect(&settings.store_settings, Duration::from_secs(15)).await?;
    let user = store
        .user_id_by_name(username)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no user {username:?}"))?;
    println!("Caliopen user {username} ({user})");
    println!();
    println!("Remote identities (user_identity):");
    for id in store.identities_of(user).await? {
        println!(
            "  {:<28} {}  status={}  uidvalidity={}  lastseenuid={}  lastsync={}  errors={}",
            id.identifier,
            id.info(infos::INSERVER),
            id.status,
            id.info(infos::UIDVALIDITY),
            id.info(infos::LASTSEENUID),
            id.info(infos::LASTSYNC),
            if id.info(infos::ERRORS_COUNT).is_empty() {
                "0"
            } else {
                id.info(infos::ERRORS_COUNT)
            },
        );
    }
    let ids = store.raw_message_ids_of(user).await?;
    let mut delivered = 0;
    let mut bytes = 0usize;
    let mut samples = Vec::new();
    // Messages over raw_size_limit: in the object store, the row keeps the uri.
    let mut in_s3 = Vec::new();
    let mut s3_bytes = 0usize;
    for id in &ids {
        if store.raw_message_delivered(*id).await? == Some(true) {
            delivered += 1;
        }
        if let Some((_, size, uri)) = store.raw_message_layout(*id).await? {
            if !uri.is_empty() {
                s3_bytes += size.max(0) as usize;
                in_s3.push(format!(
                    "{uri}  raw_size {} ({}), raw_data empty",
                    size,
                    human(size.max(0) as usize)
                ));
                continue;
            }
        }
        if let Some(data) = store.raw_message_data(*id).await? {
            bytes += data.len();
            samples.push(describe(&data));
        }
    }
    println!();
    println!(
        "Raw messages (raw_message + user_raw_lookup): {} stored, {} delivered to the processor, {} in Cassandra rows",
        ids.len(),
        delivered,
        human(bytes)
    );
    // In UID order, the first few.
    samples.sort_by_key(|(uid, _)| *uid);
    for (_, s) in samples.into_iter().take(5) {
        println!("  {s}");
    }
    println!();
    println!(
        "Over store_settings.raw_size_limit, in the object store (S3): {} message{}, {}",
        in_s3.len(),
        if in_s3.len() == 1 { "" } else { "s" },
        human(s3_bytes)
    );
    for s in &in_s3 {
        println!("  {s}");
    }
    Ok(())
}

/// (uid, `uid 3  Subject: ...  (12.3 KB)`) from a stored message.
fn describe(data: &[u8]) -> (u32, String) {
    let head_end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(data.len().min(8192));
    let head = String::from_utf8_lossy(&data[..head_end]);
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let uid = field("X-Fetched-Imap-Uid:");
    let line = format!(
        "uid {:<4} {:<50} ({:.1} KB)",
        field("X-Fetched-Imap-Uid:"),
        format!("Subject: {}", field("Subject:"))
            .chars()
            .take(50)
            .collect::<String>(),
        data.len() as f64 / 1024.0
    );
    (uid.parse().unwrap_or(0), line)
}

/// `12.3 KB`, `4.5 MB`.
fn human(bytes: usize) -> String {
    if bytes < 1_000_000 {
        format!("{:.1} KB", bytes as f64 / 1e3)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}
