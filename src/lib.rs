//! caliopen-imap: Caliopen's IMAP importer as one multi-call binary.
//!
//! Three programs share this library: `imapworker` (a daemon fetching remote
//! mail on orders from NATS into Cassandra), `imapctl` (on-demand commands)
//! and `idpoller` (a daemon scheduling periodic syncs). State lives in
//! Cassandra and work is spread over a NATS queue group, so any number of
//! workers and a pair of pollers can run side by side.
//!
//! # Layout
//!
//! - `main.rs`: picks the mode from `argv[0]` or the first argument.
//! - [`app`]: logging, config, runtime, error → exit code, for every mode.
//! - [`logging`]: text or JSON log lines.
//! - [`metrics`], [`http`]: Prometheus metrics, `/healthz`, `/readyz`.
//! - [`cli`]: raw flags of every mode (argh).
//! - [`config`]: the one loader (defaults → YAML → environment), validation,
//!   redacted printing.
//! - [`error`]: error kinds callers branch on, and the exit codes.
//! - [`pidfile`]: the daemons' `start --pid-file`.
//! - [`shutdown`]: SIGINT/SIGTERM → one shutdown token.
//! - [`backoff`]: retry delays with jitter and a cap.
//! - [`renewal`]: renewing a row that lives a TTL (sync lock, IDLE and
//!   leader leases), each renewal bounded by the time left.
//! - [`bus`]: NATS connection and [`bus::wire`], the JSON shapes.
//! - [`store`]: Cassandra session and one file per table group.
//! - [`imap`]: TLS policy, connect/login, X-Fetched headers.
//! - [`worker`]: the daemon loop, one file per order, the sync pipeline.
//! - [`ctl`]: one file per imapctl command.
//! - [`poller`]: scan, schedule, job queues, leader lease.

pub mod app;
pub mod backoff;
pub mod bus;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod error;
pub mod http;
pub mod imap;
pub mod logging;
pub mod metrics;
pub mod pidfile;
pub mod poller;
pub mod renewal;
pub mod shutdown;
pub mod store;
pub mod worker;
