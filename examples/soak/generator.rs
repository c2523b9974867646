//! The mail generator: at a steady rate, IMAP actions on random folders of
//! random identities, as users and other mail clients make them: APPENDs
//! (some over `raw_size_limit`, so they go to S3), expunges, moves (COPY
//! then EXPUNGE), flag changes, and now and then a folder created, renamed
//! and deleted. Every APPEND is recorded with its unique Message-ID, the
//! UID the server gave it and the time, so the checks can find it in
//! Cassandra and the latency can be timed to its hand-off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use caliopen_imap::imap::{utf7, ImapSession};
use caliopen_imap::store::raw_message::raw_message_id;
use futures::StreamExt;
use uuid::Uuid;

use crate::setup::{Env, Ident};

/// One APPEND the generator made.
#[derive(Clone, Copy)]
pub struct Appended {
    /// Its raw message id, as the worker computes it.
    pub key: Uuid,
    pub at: Instant,
    /// INBOX of an IDLE identity (else it waits for a scheduled sync).
    pub idle: bool,
    /// In a folder its identity syncs.
    pub synced: bool,
}

/// A folder that existed for a while: (identity, name, UIDVALIDITY,
/// UIDNEXT), so the ids of its messages count as legitimate.
pub type Retired = (usize, String, u32, u32);

/// What the generator did.
#[derive(Default)]
pub struct GenLog {
    pub appended: Vec<Appended>,
    pub retired: Vec<Retired>,
    pub counts: std::collections::BTreeMap<&'static str, u64>,
    pub errors: u64,
    /// Ticks with every action slot busy (the rate was not kept).
    pub skipped: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Append { big: bool },
    Expunge,
    Move,
    Flags,
    Cycle,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Append { big: false } => "append",
            Action::Append { big: true } => "append over raw_size_limit",
            Action::Expunge => "expunge",
            Action::Move => "move (COPY + EXPUNGE)",
            Action::Flags => "flag change",
            Action::Cycle => "folder create/rename/delete",
        }
    }

    fn pick(rng: &mut fastrand::Rng) -> Action {
        match rng.u32(..1000) {
            0..=29 => Action::Append { big: true },
            30..=99 => Action::Expunge,
            100..=169 => Action::Move,
            170..=249 => Action::Flags,
            250..=253 => Action::Cycle,
            _ => Action::Append { big: false },
        }
    }
}

/// The actions in flight at once, at most.
const SLOTS: usize = 24;

/// Act at `env.rate` per second until `stop`, then wait for the actions
/// still running.
pub async fn run(
    env: Env,
    idents: Arc<Vec<Ident>>,
    log: Arc<Mutex<GenLog>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(env.seed ^ 0x5EED);
    let slots = Arc::new(tokio::sync::Semaphore::new(SLOTS));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / env.rate.max(0.01)));
    // A late tick (a busy machine) is made up at once, so the rate holds
    // on average; the action slots still bound what runs at once.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log.lock().unwrap().skipped += 1;
            continue;
        };
        n += 1;
        let i = rng.usize(..idents.len());
        let mut action = Action::pick(&mut rng);
        if matches!(action, Action::Cycle) && !idents[i].star {
            action = Action::Append { big: false };
        }
        let ctx = Act {
            env: env.clone(),
            id: idents[i].clone(),
            i,
            n,
            rng: fastrand::Rng::with_seed(env.seed ^ n.wrapping_mul(0x9E37_79B9)),
            log: log.clone(),
        };
        tokio::spawn(async move {
            let log = ctx.log.clone();
            let r = ctx.act(action).await;
            let mut l = log.lock().unwrap();
            *l.counts.entry(action.name()).or_default() += 1;
            if let Err(e) = r {
                l.errors += 1;
                l.last_error = Some(format!("{}: {e:#}", action.name()));
            }
            drop(permit);
        });
    }
    let _ = slots.acquire_many(SLOTS as u32).await;
}

/// One action on one identity.
struct Act {
    env: Env,
    id: Ident,
    i: usize,
    n: u64,
    rng: fastrand::Rng,
    log: Arc<Mutex<GenLog>>,
}

impl Act {
    async fn act(mut self, action: Action) -> Result<()> {
        let folder = if self.rng.bool() {
            "INBOX".to_string()
        } else {
            self.id.folders[self.rng.usize(..self.id.folders.len())].clone()
        };
        let mut s = self.env.imap(&self.id.login).await?;
        let r = match action {
            Action::Append { big } => self.append(&mut s, &folder, big).await,
            Action::Expunge => self.remove(&mut s, &folder, None).await,
            Action::Move => {
                let to = self.id.folders[self.rng.usize(..self.id.folders.len())].clone();
                self.remove(&mut s, &folder, Some(&to)).await
            }
            Action::Flags => self.flags(&mut s, &folder).await,
            Action::Cycle => self.cycle(&mut s).await,
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), s.logout()).await;
        r
    }

    /// APPEND one message; record it with the UID the server gave it.
    async fn append(&mut self, s: &mut ImapSession, folder: &str, big: bool) -> Result<()> {
        let wire = utf7::encode(folder);
        let uv = s
            .select(&wire)
            .await?
            .uid_validity
            .ok_or_else(|| anyhow!("no UIDVALIDITY for {folder}"))?;
        let mid = format!("<soak.{}.{}@soak.example.test>", self.env.seed, self.n);
        let size = if big {
            self.env.raw_size_limit as usize + self.rng.usize(1_000..60_000)
        } else {
            self.rng.usize(500..4_000)
        };
        let at = Instant::now();
        s.append(&wire, None, None, message(&self.id.login, &mid, size))
            .await?;
        let uid = s
            .uid_search(format!("HEADER Message-ID \"{mid}\""))
            .await?
            .into_iter()
            .max()
            .ok_or_else(|| anyhow!("{mid} not found after its APPEND"))?;
        let key = raw_message_id(self.id.user, self.id.identity, folder, uv, uid);
        self.log.lock().unwrap().appended.push(Appended {
            key,
            at,
            idle: self.id.idle && folder == "INBOX",
            synced: self.id.syncs(folder),
        });
        Ok(())
    }

    /// Expunge one random message of `folder`, copied first to `to` (a move).
    async fn remove(&mut self, s: &mut ImapSession, folder: &str, to: Option<&str>) -> Result<()> {
        s.select(utf7::encode(folder)).await?;
        let uids: Vec<u32> = s.uid_search("ALL").await?.into_iter().collect();
        if uids.is_empty() {
            return Ok(());
        }
        let uid = uids[self.rng.usize(..uids.len())].to_string();
        if let Some(to) = to {
            s.uid_copy(&uid, utf7::encode(to)).await?;
        }
        s.uid_store(&uid, "+FLAGS.SILENT (\\Deleted)")
            .await?
            .collect::<Vec<_>>()
            .await;
        s.uid_expunge(&uid).await?.collect::<Vec<_>>().await;
        Ok(())
    }

    async fn flags(&mut self, s: &mut ImapSession, folder: &str) -> Result<()> {
        s.select(utf7::encode(folder)).await?;
        let uids: Vec<u32> = s.uid_search("ALL").await?.into_iter().collect();
        if uids.is_empty() {
            return Ok(());
        }
        let uid = uids[self.rng.usize(..uids.len())].to_string();
        let change = [
            "+FLAGS.SILENT (\\Flagged)",
            "-FLAGS.SILENT (\\Seen)",
            "+FLAGS.SILENT (\\Seen)",
        ][self.rng.usize(..3)];
        s.uid_store(&uid, change).await?.collect::<Vec<_>>().await;
        Ok(())
    }

    /// A folder created with two messages, renamed 20 s later, deleted
    /// 20 s after that (a `*` identity lists it anew at each sync).
    async fn cycle(&mut self, s: &mut ImapSession) -> Result<()> {
        let name = format!("Tmp {}", self.n);
        let renamed = format!("{name} renamed");
        s.create(utf7::encode(&name)).await?;
        for k in 0..2 {
            let mid = format!("<soak.{}.{}.{k}@soak.example.test>", self.env.seed, self.n);
            s.append(
                utf7::encode(&name),
                None,
                None,
                message(&self.id.login, &mid, 800),
            )
            .await?;
        }
        tokio::time::sleep(Duration::from_secs(20)).await;
        self.retire(s, &name).await?;
        s.rename(utf7::encode(&name), utf7::encode(&renamed))
            .await?;
        tokio::time::sleep(Duration::from_secs(20)).await;
        self.retire(s, &renamed).await?;
        s.delete(utf7::encode(&renamed)).await?;
        Ok(())
    }

    async fn retire(&self, s: &mut ImapSession, name: &str) -> Result<()> {
        let st = s
            .status(utf7::encode(name), "(UIDVALIDITY UIDNEXT)")
            .await?;
        let (uv, next) = (st.uid_validity.unwrap_or(0), st.uid_next.unwrap_or(0));
        self.log
            .lock()
            .unwrap()
            .retired
            .push((self.i, name.to_string(), uv, next));
        Ok(())
    }
}

/// A plain-text message of about `size` bytes.
fn message(login: &str, mid: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Soak <soak@example.test>\r\nTo: {login}@example.test\r\n\
         Subject: soak {mid}\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: {mid}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n"
    );
    let line = "soak test line, courrier électronique, Grüße, メール\r\n";
    while m.len() < size {
        m.push_str(line);
    }
    m.into_bytes()
}
