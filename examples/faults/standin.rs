//! The processor stand-in (for Caliopen's processor, outside this project):
//! it answers `process_raw`, records every request with its time, can be
//! made absent, slow for some answers, or fire a trigger after a number of
//! requests. Every count of the suite (repeats, late answers, time to
//! recover) is read from its records.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use uuid::Uuid;

use crate::env::Env;
use crate::kit;
use crate::processor::{self, Answer, Pace};

/// One `process_raw` received by the processor stand-in.
#[derive(Clone)]
pub struct Rec {
    pub at: Instant,
    pub user: Uuid,
    pub msg: Uuid,
    /// Answered after the worker's hand-off timeout (slow mode).
    pub late: bool,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Normal,
    /// Not subscribed: NATS answers "no responders".
    Absent,
}

struct StandinState {
    records: Vec<Rec>,
    /// Per user: how many requests so far (repeats included).
    counts: HashMap<Uuid, u64>,
    /// (user, count) at which to fire the trigger.
    trigger: Option<(Uuid, u64, tokio::sync::oneshot::Sender<()>)>,
    /// Reply delay for every request (makes a sync last long enough).
    delay: Duration,
    /// Requests of this user answered `slow_delay` late, at most `slow_left`.
    slow: Option<(Uuid, Duration)>,
    slow_left: u32,
}

/// The processor stand-in (for Caliopen's processor, not part of this
/// project): answers `process_raw`, records every request.
#[derive(Clone)]
pub struct Standin {
    state: Arc<Mutex<StandinState>>,
    client: async_nats::Client,
    subject: String,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Standin {
    pub async fn start(env: &Env) -> Result<Standin> {
        let client = async_nats::connect(env.nats_servers()).await?;
        let s = Standin {
            state: Arc::new(Mutex::new(StandinState {
                records: Vec::new(),
                counts: HashMap::new(),
                trigger: None,
                delay: Duration::ZERO,
                slow: None,
                slow_left: 0,
            })),
            client,
            subject: env.subject("inboundSMTP"),
            task: Arc::new(Mutex::new(None)),
        };
        s.set_mode(Mode::Normal).await?;
        Ok(s)
    }

    pub async fn set_mode(&self, mode: Mode) -> Result<()> {
        let me = self.clone();
        let decide = (mode == Mode::Normal).then_some(move |order: &processor::ProcessRaw| {
            let delay = me.record(order.user_id, order.message_id);
            (Answer::Ok, Pace::Each(delay))
        });
        kit::switch_standin(&self.client, &self.subject, &self.task, decide).await
    }

    /// Record one request; returns how long to wait before answering.
    fn record(&self, user: Uuid, msg: Uuid) -> Duration {
        let mut st = self.state.lock().unwrap();
        let mut delay = st.delay;
        let mut late = false;
        if let Some((u, d)) = st.slow {
            if u == user && st.slow_left > 0 {
                st.slow_left -= 1;
                delay = d;
                late = true;
            }
        }
        st.records.push(Rec {
            at: Instant::now(),
            user,
            msg,
            late,
        });
        let n = {
            let c = st.counts.entry(user).or_default();
            *c += 1;
            *c
        };
        if st
            .trigger
            .as_ref()
            .is_some_and(|(u, at, _)| *u == user && n >= *at)
        {
            if let Some((_, _, tx)) = st.trigger.take() {
                let _ = tx.send(());
            }
        }
        delay
    }

    /// Fires once `more` further requests of `user` have arrived.
    pub fn trigger_after(&self, user: Uuid, more: u64) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut st = self.state.lock().unwrap();
        let at = st.counts.get(&user).copied().unwrap_or(0) + more.max(1);
        st.trigger = Some((user, at, tx));
        rx
    }

    pub fn clear_trigger(&self) {
        self.state.lock().unwrap().trigger = None;
    }

    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    pub fn set_slow(&self, user: Uuid, d: Duration, count: u32) {
        let mut st = self.state.lock().unwrap();
        st.slow = Some((user, d));
        st.slow_left = count;
    }

    pub fn records_of(&self, user: Uuid) -> Vec<Rec> {
        let st = self.state.lock().unwrap();
        st.records
            .iter()
            .filter(|r| r.user == user)
            .cloned()
            .collect()
    }

    /// How many distinct messages of `user` were handed off.
    pub fn distinct_of(&self, user: Uuid) -> usize {
        let st = self.state.lock().unwrap();
        st.records
            .iter()
            .filter(|r| r.user == user)
            .map(|r| r.msg)
            .collect::<HashSet<_>>()
            .len()
    }

    /// The first request of `user` received after `t`.
    pub fn first_after(&self, user: Uuid, t: Instant) -> Option<Instant> {
        let st = self.state.lock().unwrap();
        st.records
            .iter()
            .find(|r| r.user == user && r.at > t)
            .map(|r| r.at)
    }
}
