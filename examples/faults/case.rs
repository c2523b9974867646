//! One identity on one seeded Dovecot mailbox, with the harness's view of
//! it (the reports of its syncs, snapshots of what was delivered when), and
//! the row a scenario fills: the counting of missing, doubled and repeated
//! hand-offs is written once here, so every scenario is judged alike
//! (docs/faults.md).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use caliopen_imap::store::identity::{creds, infos, Identity};
use caliopen_imap::store::raw_message::raw_message_id;
use caliopen_imap::store::Store;
use futures::StreamExt;
use serde_json::Value;
use uuid::Uuid;

use crate::common::{mailbox_uids, maildir_of, make_mailbox};
use crate::env::Env;
use crate::kit::{fnv, order_sync, Daemon, Outcome};
use crate::standin::{Rec, Standin};

/// What one scenario measured.
#[derive(Default)]
pub struct Row {
    pub name: String,
    pub rounds: u32,
    pub messages: usize,
    pub missing: usize,
    pub duplicates: usize,
    pub undelivered: usize,
    pub extra: usize,
    pub inflight: usize,
    pub late: usize,
    pub stepped: u64,
    pub crashes: u32,
    pub recover: Vec<Option<Duration>>,
    /// Shown instead of [`crate::report::fmt_recover`] of `recover` (one time per fault).
    pub recover_text: Option<String>,
    pub blocked: bool,
    pub notes: Vec<String>,
    /// Required zeros that were not zero, in words.
    pub failures: Vec<String>,
    pub skipped: Option<String>,
}

/// One identity on one Dovecot mailbox, with the harness's view of it.
pub struct Case {
    pub env: Env,
    pub name: String,
    pub login: String,
    pub user: Uuid,
    pub identity: Uuid,
    pub rng: fastrand::Rng,
    /// (when, delivered ids at that moment): a hand-off after it of one of
    /// these ids is an extra hand-off of a delivered message.
    pub snapshots: Vec<(Instant, HashSet<Uuid>)>,
    pub expunged: HashSet<u32>,
    pub uidvalidity: u32,
    pub reports: Vec<Value>,
}

impl Case {
    pub async fn new(env: &Env, store: &Store, name: &str, messages: u32) -> Result<Case> {
        let seed = env.seed ^ fnv(name);
        let login = format!("{}-{name}", env.tag);
        make_mailbox(env, &login, messages, seed)?;
        let (_, uidvalidity) = mailbox_uids(env, &login)?;
        let user = Uuid::new_v4();
        store.insert_user(user, &format!("{login}-user")).await?;
        let identity = Identity {
            user_id: user,
            identity_id: Uuid::new_v4(),
            credentials: HashMap::from([
                (creds::USERNAME_IN.to_string(), login.clone()),
                (creds::PASSWORD_IN.to_string(), env.password.clone()),
            ]),
            display_name: login.clone(),
            identifier: login.clone(),
            infos: HashMap::from([
                (infos::INSERVER.to_string(), env.imaps.clone()),
                (infos::AUTHTYPE.to_string(), infos::AUTH_LOGIN.to_string()),
                (infos::POLLINTERVAL.to_string(), "15".to_string()),
            ]),
            last_check: None,
            protocol: "email".into(),
            status: "active".into(),
            kind: "remote".into(),
        };
        store.insert_identity(&identity).await?;
        Ok(Case {
            env: env.clone(),
            name: name.into(),
            login,
            user,
            identity: identity.identity_id,
            rng: fastrand::Rng::with_seed(seed),
            snapshots: Vec::new(),
            expunged: HashSet::new(),
            uidvalidity,
            reports: Vec::new(),
        })
    }

    pub fn order(
        &self,
        client: &async_nats::Client,
        idle: Duration,
    ) -> tokio::task::JoinHandle<Outcome> {
        tokio::spawn(order_sync(
            client.clone(),
            self.env.subject("outboundIMAP"),
            self.user,
            self.identity,
            idle,
        ))
    }

    pub fn note(&mut self, o: &Outcome) {
        if let Some(r) = &o.report {
            self.reports.push(r.clone());
        }
    }

    /// The ids stored as delivered right now.
    pub async fn delivered(&self, store: &Store) -> Result<HashSet<Uuid>> {
        let ids = store.raw_message_ids_of(self.user).await?;
        let states = futures::stream::iter(ids)
            .map(|id| async move { (id, store.raw_message_delivered(id).await) })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let mut set = HashSet::new();
        for (id, st) in states {
            if st? == Some(true) {
                set.insert(id);
            }
        }
        Ok(set)
    }

    pub async fn snapshot(&mut self, store: &Store) -> Result<()> {
        let at = Instant::now();
        let set = self.delivered(store).await?;
        self.snapshots.push((at, set));
        Ok(())
    }

    /// Order syncs until one finds nothing left to do, waiting out a busy
    /// identity for at most `recover_max` since `since`. Returns false when
    /// it never completed.
    pub async fn sync_until_complete(
        &mut self,
        client: &async_nats::Client,
        worker: &mut Daemon,
        since: Instant,
    ) -> Result<bool> {
        let mut ordered = 0;
        loop {
            worker.check().await?;
            let o = self.order(client, Duration::from_secs(120)).await?;
            self.note(&o);
            ordered += 1;
            if o.complete() {
                return Ok(true);
            }
            let waiting = o.busy() || o.no_responders || o.silent;
            if waiting && since.elapsed() > self.env.recover_max {
                eprintln!(
                    "[faults] {}: still refused after {:?}: {:?}",
                    self.name,
                    since.elapsed(),
                    o.report.as_ref().map(|r| r["error"].clone())
                );
                return Ok(false);
            }
            if !waiting && ordered > 30 {
                return Ok(false);
            }
            if waiting || o.report.as_ref().is_some_and(|r| r["ok"] != true) {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }

    /// Count everything into `row` (see docs/faults.md).
    pub async fn count(&self, store: &Store, standin: &Standin, row: &mut Row) -> Result<()> {
        let (uids, uv) = mailbox_uids(&self.env, &self.login)?;
        if uv != self.uidvalidity {
            row.notes
                .push(format!("{}: UIDVALIDITY changed", self.name));
        }
        let mbox = "INBOX";
        let expected: HashMap<Uuid, u32> = uids
            .iter()
            .map(|&u| (raw_message_id(self.user, self.identity, mbox, uv, u), u))
            .collect();
        let gone: HashSet<Uuid> = self
            .expunged
            .iter()
            .map(|&u| raw_message_id(self.user, self.identity, mbox, uv, u))
            .collect();
        let rows = store.raw_message_ids_of(self.user).await?;
        let states: Vec<(Uuid, Option<bool>)> = futures::stream::iter(rows.clone())
            .map(|id| async move { (id, store.raw_message_delivered(id).await) })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(|(id, r)| r.map(|d| (id, d)))
            .collect::<Result<_, _>>()?;
        let delivered: HashSet<Uuid> = states
            .iter()
            .filter(|(_, d)| *d == Some(true))
            .map(|(id, _)| *id)
            .collect();
        row.messages = expected.len();
        row.missing = expected.keys().filter(|id| !delivered.contains(id)).count();
        row.duplicates = rows
            .iter()
            .filter(|id| !expected.contains_key(id) && !gone.contains(id))
            .count();
        row.undelivered = states
            .iter()
            .filter(|(id, d)| *d != Some(true) && !gone.contains(id))
            .count();
        let recs = standin.records_of(self.user);
        self.classify_repeats(&recs, row);
        let failures = store.message_failures(self.user, self.identity).await?;
        row.stepped = failures.iter().filter(|f| f.stepped_over).count() as u64;
        row.stepped = row.stepped.max(
            self.reports
                .iter()
                .map(|r| r["stepped_over"].as_u64().unwrap_or(0))
                .sum(),
        );
        // Counted: retired, so the poller of a later run does not schedule
        // it (and make Dovecot recreate the removed mailbox).
        store
            .set_status(self.user, self.identity, "inactive")
            .await?;
        row.notes.push(format!(
            "{}: {} hand-offs for {} messages; {} syncs ordered",
            self.name,
            recs.len(),
            expected.len(),
            self.reports.len()
        ));
        Ok(())
    }

    /// Repeats, classified by the delivered snapshots taken before them:
    /// extra (the message was delivered), late (an earlier answer came
    /// after the timeout) or in flight.
    fn classify_repeats(&self, recs: &[Rec], row: &mut Row) {
        let mut seen: HashMap<Uuid, bool> = HashMap::new(); // id → an earlier answer was late
        for r in recs {
            if let Some(prev_late) = seen.get(&r.msg).copied() {
                let was_delivered = self
                    .snapshots
                    .iter()
                    .any(|(at, set)| *at < r.at && set.contains(&r.msg));
                if was_delivered {
                    row.extra += 1;
                } else if prev_late {
                    row.late += 1;
                } else {
                    row.inflight += 1;
                }
            }
            let e = seen.entry(r.msg).or_insert(false);
            *e |= r.late;
        }
    }

    pub fn cleanup(&self) {
        if self.env.keep {
            return;
        }
        if let Ok(dir) = maildir_of(&self.env, &self.login) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The mailbox goes with the case, on error paths too.
impl Drop for Case {
    fn drop(&mut self) {
        self.cleanup();
    }
}
