//! Prometheus metrics of the worker and the poller.
//!
//! Built on `prometheus-client`, the Prometheus project's own crate: typed
//! counters, gauges and histograms, and its text exposition, so the format
//! is not ours to get wrong. No metric has a per-user or per-identity
//! label: at 100k identities the series count would explode; the labels
//! are small fixed sets (outcome, kind).
//!
//! Counters move as the work happens (a message is counted when its hand-off
//! ends), so a scrape during a long sync sees it progress. Gauges that are
//! a view of state (memory budget, jobs in flight) are read at scrape time.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `outcome` of a sync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// `reason` a server throttled us (`imap::throttle::Reason` labels).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `kind` of a poller queue (imap, twitter, mastodon).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// `command` of an IMAP command sent (LOGIN, EXAMINE, UID FETCH...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: &'static str,
}

/// IMAP commands this process sent, by command name. Process-wide rather
/// than a field of [`WorkerMetrics`]: commands are sent deep in the IMAP
/// layer, which has no context to reach the worker's metrics through, and
/// a process runs one worker. The label set is the fixed list of command
/// names our code sends.
pub fn imap_commands() -> &'static Family<CommandLabel, Counter> {
    static F: std::sync::OnceLock<Family<CommandLabel, Counter>> = std::sync::OnceLock::new();
    F.get_or_init(Family::default)
}

/// `result` of a `need_job`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabel {
    pub result: &'static str,
}

/// The worker's metrics. Cheap to share (`Arc`); every field is itself
/// shared-state.
pub struct WorkerMetrics {
    registry: Registry,
    pub syncs_started: Counter,
    /// ok, account (the remote account failed), ours (an outage of ours or
    /// a fault of this machine), interrupted (shutdown, lost lock,
    /// deadline), busy (another sync held the lock), throttled (the server
    /// answered with load, or its host is being backed off).
    pub syncs_ended: Family<Outcome, Counter>,
    /// Throttling answers of servers, by reason.
    pub throttled: Family<ReasonLabel, Counter>,
    pub fetched: Counter,
    pub fetched_bytes: Counter,
    pub stored: Counter,
    pub handed_off: Counter,
    pub already_delivered: Counter,
    pub failed: Counter,
    pub stepped_over: Counter,
    pub gone: Counter,
    pub hand_off_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub connect_seconds: Histogram,
    pub jobs_in_flight: Gauge,
    pub job_slots: Gauge,
    pub memory_budget_bytes: Gauge,
    pub memory_in_use_bytes: Gauge,
    pub identities_disabled: Counter,
    pub busy_skips: Counter,
    pub idle_sessions: Gauge,
    pub idle_wakeups: Counter,
    /// Rounds of live sync's sharing loop, and the reads among them of the
    /// identities wanting IDLE (what a round costs in Cassandra is counted
    /// against these).
    pub idle_rounds: Counter,
    pub idle_rescans: Counter,
}

fn seconds_histogram(start: f64, count: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, 2.0, count))
}

impl WorkerMetrics {
    pub fn new() -> Arc<WorkerMetrics> {
        let mut m = WorkerMetrics {
            registry: Registry::default(),
            syncs_started: Counter::default(),
            syncs_ended: Family::default(),
            throttled: Family::default(),
            fetched: Counter::default(),
            fetched_bytes: Counter::default(),
            stored: Counter::default(),
            handed_off: Counter::default(),
            already_delivered: Counter::default(),
            failed: Counter::default(),
            stepped_over: Counter::default(),
            gone: Counter::default(),
            // 1 ms .. ~33 s
            hand_off_seconds: seconds_histogram(0.001, 16),
            // 10 ms .. ~3 h
            sync_seconds: seconds_histogram(0.01, 20),
            // 5 ms .. ~80 s
            connect_seconds: seconds_histogram(0.005, 15),
            jobs_in_flight: Gauge::default(),
            job_slots: Gauge::default(),
            memory_budget_bytes: Gauge::default(),
            memory_in_use_bytes: Gauge::default(),
            identities_disabled: Counter::default(),
            idle_sessions: Gauge::default(),
            idle_wakeups: Counter::default(),
            idle_rounds: Counter::default(),
            idle_rescans: Counter::default(),
            busy_skips: Counter::default(),
        };
        let mut r = Registry::with_prefix("caliopen_imap");
        m.register_syncs(&mut r);
        m.register_messages(&mut r);
        m.register_timings(&mut r);
        m.register_capacity(&mut r);
        m.registry = r;
        Arc::new(m)
    }

    /// Syncs: started, ended by outcome, and the IMAP commands they sent.
    fn register_syncs(&self, r: &mut Registry) {
        r.register("syncs_started", "Syncs started", self.syncs_started.clone());
        r.register(
            "imap_commands",
            "IMAP commands sent to servers, by command",
            imap_commands().clone(),
        );
        r.register(
            "syncs_ended",
            "Syncs ended, by outcome: ok, account, ours, interrupted, busy, throttled",
            self.syncs_ended.clone(),
        );
        r.register(
            "throttled",
            "Throttling answers of IMAP servers (never counted against accounts), by reason: \
             unavailable, limit, throttled, overquota, connections, bye",
            self.throttled.clone(),
        );
    }

    /// Messages: read, stored, handed off, failed, stepped over, gone.
    fn register_messages(&self, r: &mut Registry) {
        r.register(
            "messages_fetched",
            "Messages read from IMAP servers",
            self.fetched.clone(),
        );
        r.register(
            "fetched_bytes",
            "Bytes of messages read from IMAP servers",
            self.fetched_bytes.clone(),
        );
        r.register(
            "messages_stored",
            "Messages written to raw_message",
            self.stored.clone(),
        );
        r.register(
            "messages_handed_off",
            "Messages stored and handed off to the processor (or stored, in store-only mode)",
            self.handed_off.clone(),
        );
        r.register(
            "messages_already_delivered",
            "Messages found delivered already, not handed off again",
            self.already_delivered.clone(),
        );
        r.register(
            "messages_failed",
            "Message tries that failed (retried at the next sync)",
            self.failed.clone(),
        );
        r.register(
            "messages_stepped_over",
            "Messages stepped over after too many tries or as never storable",
            self.stepped_over.clone(),
        );
        r.register(
            "messages_gone",
            "Messages expunged from the server during a sync",
            self.gone.clone(),
        );
    }

    /// Durations: hand-off, whole sync, IMAP connect.
    fn register_timings(&self, r: &mut Registry) {
        r.register(
            "hand_off_seconds",
            "Time from storing a message to the processor's answer",
            self.hand_off_seconds.clone(),
        );
        r.register(
            "sync_seconds",
            "Duration of syncs (skipped busy ones excluded)",
            self.sync_seconds.clone(),
        );
        r.register(
            "imap_connect_seconds",
            "IMAP connect, TLS and login time",
            self.connect_seconds.clone(),
        );
    }

    /// Capacity: jobs, memory budget, disabled identities, busy skips, IDLE.
    fn register_capacity(&self, r: &mut Registry) {
        r.register(
            "jobs_in_flight",
            "Jobs running now",
            self.jobs_in_flight.clone(),
        );
        r.register(
            "job_slots",
            "Jobs that may run at once (the workers setting)",
            self.job_slots.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "Bytes of messages the process may hold between fetch and hand-off",
            self.memory_budget_bytes.clone(),
        );
        r.register(
            "memory_in_use_bytes",
            "Bytes of the memory budget held now",
            self.memory_in_use_bytes.clone(),
        );
        r.register(
            "identities_disabled",
            "Identities set inactive after failing too long",
            self.identities_disabled.clone(),
        );
        r.register(
            "busy_skips",
            "Sync orders skipped because another sync held the identity's lock",
            self.busy_skips.clone(),
        );
        r.register(
            "idle_sessions",
            "IDLE sessions held now (live sync), one per watched identity",
            self.idle_sessions.clone(),
        );
        r.register(
            "idle_wakeups",
            "Syncs started because an IDLE session announced new mail",
            self.idle_wakeups.clone(),
        );
        r.register(
            "idle_rounds",
            "Rounds of live sync's loop sharing the IDLE sessions between workers",
            self.idle_rounds.clone(),
        );
        r.register(
            "idle_rescans",
            "Reads of the identities wanting IDLE (a paged read of user_identity)",
            self.idle_rescans.clone(),
        );
    }

    /// Count a sync's end.
    pub fn sync_ended(&self, outcome: &'static str) {
        self.syncs_ended.get_or_create(&Outcome { outcome }).inc();
    }

    /// Count a server's throttling answer.
    pub fn throttled(&self, reason: &'static str) {
        self.throttled.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Counts a sync or fullfetch job in flight while it lives (the jobs the
/// `workers` slots are for).
pub struct InFlight(Gauge);

impl InFlight {
    pub fn new(g: &Gauge) -> InFlight {
        g.inc();
        InFlight(g.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The poller's metrics.
pub struct PollerMetrics {
    registry: Registry,
    pub scheduled: Gauge,
    pub queued: Family<KindLabel, Gauge>,
    pub need_job: Family<ServedLabel, Counter>,
    pub scan_seconds: Histogram,
    pub scans_failed: Counter,
    pub lease_held: Gauge<i64, AtomicI64>,
}

impl PollerMetrics {
    pub fn new() -> Arc<PollerMetrics> {
        let mut m = PollerMetrics {
            registry: Registry::with_prefix("caliopen_idpoller"),
            scheduled: Gauge::default(),
            queued: Family::default(),
            need_job: Family::default(),
            // 10 ms .. ~3 min
            scan_seconds: seconds_histogram(0.01, 15),
            scans_failed: Counter::default(),
            lease_held: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "identities_scheduled",
            "Identities in the leader's schedule",
            m.scheduled.clone(),
        );
        r.register(
            "queue_depth",
            "Jobs due and waiting for a worker, by kind",
            m.queued.clone(),
        );
        r.register(
            "need_job",
            "need_job requests answered, by result: served, empty, error",
            m.need_job.clone(),
        );
        r.register(
            "scan_seconds",
            "Duration of a scan of user_identity",
            m.scan_seconds.clone(),
        );
        r.register("scans_failed", "Scans that failed", m.scans_failed.clone());
        r.register(
            "lease_held",
            "1 while this poller leads, 0 while it stands by",
            m.lease_held.clone(),
        );
        Arc::new(m)
    }

    pub fn served(&self, result: &'static str) {
        self.need_job.get_or_create(&ServedLabel { result }).inc();
    }

    pub fn set_queued(&self, kind: &'static str, n: usize) {
        self.queued.get_or_create(&KindLabel { kind }).set(n as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = WorkerMetrics::new();
        m.fetched.inc_by(3);
        m.sync_ended("ok");
        let t = m.encode();
        assert!(t.contains("caliopen_imap_messages_fetched_total 3"), "{t}");
        assert!(
            t.contains("caliopen_imap_syncs_ended_total{outcome=\"ok\"} 1"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
        let p = PollerMetrics::new();
        p.set_queued("imap", 2);
        p.lease_held.set(1);
        let t = p.encode();
        assert!(
            t.contains("caliopen_idpoller_queue_depth{kind=\"imap\"} 2"),
            "{t}"
        );
        assert!(t.contains("caliopen_idpoller_lease_held 1"), "{t}");
    }
}
