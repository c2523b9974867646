//! The Cassandra repository shared by every mode.
//!
//! One [`Store`] holds one driver session built from `store_settings`, and a
//! cache of prepared statements. Each table's rows and queries live in their
//! own file (`identity.rs`, `raw_message.rs`, ...); they write CQL templates
//! with a `{ks}` placeholder, which [`Store::prepared`] fills with the
//! configured keyspace and prepares once.
//!
//! The binaries never create tables: `config/schema.cql` does, applied by
//! `scripts/stack.sh` (or an operator). A missing table therefore shows up as
//! a clear error naming the statement, not as a silent schema change.

pub mod health;
pub mod identity;
pub mod idle_lease;
pub mod lease;
pub mod lock;
pub mod message;
pub mod objects;
pub mod raw_message;
pub mod resync;
pub mod sent;
pub mod state;
pub mod user;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cdrs_tokio::authenticators::{
    NoneAuthenticatorProvider, SaslAuthenticatorProvider, StaticPasswordAuthenticatorProvider,
};
use cdrs_tokio::cluster::session::{Session, SessionBuilder, TcpSessionBuilder};
use cdrs_tokio::cluster::{NodeTcpConfigBuilder, TcpConnectionManager};
use cdrs_tokio::consistency::Consistency;
use cdrs_tokio::frame::Envelope;
use cdrs_tokio::load_balancing::RoundRobinLoadBalancingStrategy;
use cdrs_tokio::query::{PreparedQuery, QueryValues};
use cdrs_tokio::statement::{StatementParams, StatementParamsBuilder};
use cdrs_tokio::transport::TransportTcp;
use cdrs_tokio::types::rows::Row;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};

use crate::config::{split_host_port, StoreSettings};

pub use cdrs_tokio::types::{ByName, IntoRustByName};

/// No Cassandra request may wait longer than this: a lost answer becomes an
/// error the job records, never a worker stuck for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type CSession = Session<
    TransportTcp,
    TcpConnectionManager,
    RoundRobinLoadBalancingStrategy<TransportTcp, TcpConnectionManager>,
>;

/// Store failures a caller may branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach Cassandra at {hosts}: {reason}")]
    Unavailable { hosts: String, reason: String },
    #[error("Cassandra query failed ({what}): {reason}")]
    Query { what: String, reason: String },
    #[error("unexpected data in Cassandra ({what}): {reason}")]
    Decode { what: String, reason: String },
}

/// A connected repository. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The driver session; replaced when it stops answering (see `stalled`).
    conn: RwLock<Arc<Conn>>,
    /// To build a new session.
    settings: StoreSettings,
    keyspace: String,
    consistency: Consistency,
    hosts: String,
    /// Requests in a row that got no answer.
    stalls: AtomicU32,
    /// One renewal at a time.
    renewing: tokio::sync::Mutex<()>,
    /// When the last renewal was tried.
    last_renewal: Mutex<Option<std::time::Instant>>,
    /// Queries sent by [`Store::ping`] (readiness checks), for tests.
    pings: std::sync::atomic::AtomicU64,
    /// Statements sent (every prepared statement, pages counted one by
    /// one) and, among them, lightweight transactions: what a test or a
    /// bench counts to show a loop's cost in Cassandra.
    statements: std::sync::atomic::AtomicU64,
    lwts: std::sync::atomic::AtomicU64,
}

/// A session and the statements prepared on it.
struct Conn {
    session: CSession,
    /// Prepared statements by CQL template.
    prepared: Mutex<HashMap<&'static str, Arc<PreparedQuery>>>,
}

/// Unanswered requests in a row after which the session is rebuilt.
const STALLS_BEFORE_RENEWAL: u32 = 3;

/// At most one new session per this interval.
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// The driver's "no node to send to" (see the test
/// `a_session_left_with_no_node_is_replaced` for how cdrs-tokio 9.0.2 gets
/// there with the whole cluster up but one node).
fn lost_every_node(e: &cdrs_tokio::error::Error) -> bool {
    matches!(e, cdrs_tokio::error::Error::General(m) if m.contains("No nodes available"))
}

impl Store {
    /// Connect to the cluster in `settings`. Fails with
    /// [`StoreError::Unavailable`] ("cannot reach Cassandra at HOST:PORT:
    /// reason") rather than a driver dump, and within `timeout`.
    pub async fn connect(settings: &StoreSettings, timeout: Duration) -> Result<Store, StoreError> {
        let (session, hosts, consistency) = build_session(settings, timeout).await?;
        Ok(Store {
            inner: Arc::new(Inner {
                conn: RwLock::new(Arc::new(Conn {
                    session,
                    prepared: Mutex::new(HashMap::new()),
                })),
                settings: settings.clone(),
                keyspace: settings.keyspace.clone(),
                consistency,
                hosts,
                stalls: AtomicU32::new(0),
                renewing: tokio::sync::Mutex::new(()),
                last_renewal: Mutex::new(None),
                pings: Default::default(),
                statements: Default::default(),
                lwts: Default::default(),
            }),
        })
    }

    fn conn(&self) -> Arc<Conn> {
        self.inner
            .conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A request got no answer. After a few in a row the session is
    /// presumed wedged (seen once with cdrs-tokio: every later request
    /// waited for ever) and a new one replaces it.
    async fn stalled(&self) {
        let n = self.inner.stalls.fetch_add(1, Ordering::Relaxed) + 1;
        if n < STALLS_BEFORE_RENEWAL {
            return;
        }
        self.renew("Cassandra session stopped answering").await;
    }

    /// A request failed because the driver knows no node to send it to
    /// ([`lost_every_node`]): the session will not heal by itself, so a new
    /// one, built from the contact points, replaces it at once.
    async fn check_lost(&self, e: &cdrs_tokio::error::Error) {
        if lost_every_node(e) {
            self.renew("Cassandra session has no node left to send to")
                .await;
        }
    }

    /// Replace the session by a new one (one caller at a time, at most one
    /// attempt every [`RENEW_EVERY`], so a cluster that is really down is not
    /// hammered).
    async fn renew(&self, why: &str) {
        let Ok(_guard) = self.inner.renewing.try_lock() else {
            return; // another caller renews it
        };
        {
            let mut last = self
                .inner
                .last_renewal
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RENEW_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        tracing::warn!(hosts = %self.inner.hosts, "{why}: opening a new one");
        match build_session(&self.inner.settings, Duration::from_secs(20)).await {
            Ok((session, _, _)) => {
                let fresh = Arc::new(Conn {
                    session,
                    prepared: Mutex::new(HashMap::new()),
                });
                *self.inner.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                self.inner.stalls.store(0, Ordering::Relaxed);
                tracing::info!(hosts = %self.inner.hosts, "new Cassandra session open");
            }
            Err(e) => tracing::error!(error = %e, "cannot open a new Cassandra session"),
        }
    }

    fn answered(&self) {
        self.inner.stalls.store(0, Ordering::Relaxed);
    }

    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    pub fn hosts(&self) -> &str {
        &self.inner.hosts
    }

    /// The prepared statement of a `{ks}` template, prepared on first use.
    async fn prepared(
        &self,
        conn: &Conn,
        template: &'static str,
    ) -> Result<Arc<PreparedQuery>, StoreError> {
        // A plain mutex: held for a map lookup only, never across an await.
        if let Some(p) = conn.cache().get(template) {
            return Ok(p.clone());
        }
        let cql = template.replace("{ks}", &self.inner.keyspace);
        let what = || format!("prepare `{}`", first_words(&cql));
        let prepared =
            tokio::time::timeout(REQUEST_TIMEOUT, conn.session.prepare(cql.as_str())).await;
        match &prepared {
            Err(_) => self.stalled().await,
            Ok(Err(e)) => self.check_lost(e).await,
            Ok(Ok(_)) => {}
        }
        let p = prepared
            .map_err(|_| StoreError::Query {
                what: what(),
                reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            })?
            .map_err(|e| StoreError::Query {
                what: what(),
                reason: e.to_string(),
            })?;
        let p = Arc::new(p);
        conn.cache().insert(template, p.clone());
        Ok(p)
    }

    /// Run a statement with positional values at the configured consistency
    /// (see [`statement`] for what the driver is told about it).
    pub(crate) async fn exec(
        &self,
        template: &'static str,
        values: QueryValues,
    ) -> Result<Envelope, StoreError> {
        let conn = self.conn();
        let prepared = self.prepared(&conn, template).await?;
        let params = statement(template, values, self.inner.consistency).build();
        self.send(&conn, &prepared, &params, template).await
    }

    /// Send one statement on `conn`, bounded by [`REQUEST_TIMEOUT`]; an
    /// unanswered one counts towards renewing the session.
    async fn send(
        &self,
        conn: &Conn,
        prepared: &PreparedQuery,
        params: &StatementParams,
        template: &str,
    ) -> Result<Envelope, StoreError> {
        self.inner.statements.fetch_add(1, Ordering::Relaxed);
        let run = conn.session.exec_with_params(prepared, params);
        match tokio::time::timeout(REQUEST_TIMEOUT, run).await {
            Ok(r) => {
                self.answered();
                if let Err(e) = &r {
                    self.check_lost(e).await;
                }
                r.map_err(|e| StoreError::Query {
                    what: first_words(template),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                self.stalled().await;
                Err(StoreError::Query {
                    what: first_words(template),
                    reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
                })
            }
        }
    }

    /// Run a statement and return its rows.
    pub(crate) async fn rows(
        &self,
        template: &'static str,
        values: QueryValues,
    ) -> Result<Vec<Row>, StoreError> {
        let env = self.exec(template, values).await?;
        body_rows(env, template)
    }

    /// Run a lightweight transaction; `true` when it was applied.
    pub(crate) async fn lwt(
        &self,
        template: &'static str,
        values: QueryValues,
    ) -> Result<bool, StoreError> {
        self.inner.lwts.fetch_add(1, Ordering::Relaxed);
        let env = self.exec(template, values).await?;
        let rows = body_rows(env, template)?;
        match rows.first() {
            None => Ok(false),
            Some(r) => Ok(col::<bool>(r, "[applied]", template)?.unwrap_or(false)),
        }
    }

    /// Run one page of a statement with paging; the rows and the paging state.
    pub(crate) async fn page(
        &self,
        template: &'static str,
        values: QueryValues,
        page_size: i32,
        state: Option<cdrs_tokio::types::CBytes>,
    ) -> Result<(Vec<Row>, Option<cdrs_tokio::types::CBytes>), StoreError> {
        let conn = self.conn();
        let prepared = self.prepared(&conn, template).await?;
        let mut params =
            statement(template, values, self.inner.consistency).with_page_size(page_size);
        if let Some(s) = state {
            params = params.with_paging_state(s);
        }
        let env = self
            .send(&conn, &prepared, &params.build(), template)
            .await?;
        let body = env.response_body().map_err(|e| decode(template, e))?;
        let next = body
            .as_rows_metadata()
            .and_then(|m| m.paging_state.clone())
            .filter(|s| s.as_slice().is_some_and(|b| !b.is_empty()));
        let rows = body.into_rows().unwrap_or_default();
        Ok((rows, next))
    }

    /// Statements sent so far by this store (and its clones), pages of a
    /// paged read counted one by one; [`Store::ping`]'s are not counted.
    pub fn statements(&self) -> u64 {
        self.inner.statements.load(Ordering::Relaxed)
    }

    /// Lightweight transactions (Paxos rounds) among [`Store::statements`].
    pub fn lwts(&self) -> u64 {
        self.inner.lwts.load(Ordering::Relaxed)
    }

    /// Queries [`Store::ping`] has sent so far.
    pub fn pings(&self) -> u64 {
        self.inner.pings.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A cheap query proving the session works (used by readiness checks).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner
            .pings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = self
            .conn()
            .session
            .query("SELECT release_version FROM system.local")
            .await;
        if let Err(e) = &r {
            self.check_lost(e).await;
        }
        r.map(|_| ()).map_err(|e| StoreError::Unavailable {
            hosts: self.inner.hosts.clone(),
            reason: e.to_string(),
        })
    }
}

/// The parameters of one statement. Every statement runs at the configured
/// `consistency_level` (for a lightweight transaction, that is the level of
/// its commit). A lightweight transaction ([`conditional`]: our `IF ...`
/// statements, the sync lock and the leases) also names its serial
/// consistency, the level of its Paxos round, rather than leave it to the
/// server's default: SERIAL (a majority of all replicas), or LOCAL_SERIAL
/// when the configured level is a LOCAL_ one, so a deployment that keeps its
/// requests inside one data centre keeps its Paxos rounds there too. On a
/// cluster, with writes at QUORUM or LOCAL_QUORUM, two workers then can
/// never both win a lock, whichever node each of them reaches (docs/operations.md,
/// "Running on a cluster").
///
/// Every other statement is marked idempotent: a read, or a write of a row
/// keyed by deterministic ids whose values are the same when written twice
/// (no counter, no list; a map merged key by key). The driver's retry policy
/// sends an idempotent statement to the next node when the one it went to
/// fails (a connection lost with the node's death, an overloaded node);
/// any other it fails at once, which stops a running sync with an outage.
/// A lightweight transaction is never marked: run again, its Paxos round
/// may read its own first write and report it not applied.
fn statement(
    template: &str,
    values: QueryValues,
    consistency: Consistency,
) -> StatementParamsBuilder {
    let lwt = conditional(template);
    let b = StatementParamsBuilder::new()
        .with_values(values)
        .with_consistency(consistency)
        .idempotent(!lwt);
    if !lwt {
        return b;
    }
    let serial = match consistency {
        Consistency::LocalQuorum | Consistency::LocalOne => Consistency::LocalSerial,
        _ => Consistency::Serial,
    };
    b.with_serial_consistency(serial)
}

/// Is `cql` a lightweight transaction (`... IF NOT EXISTS`, `... IF owner = ?`)?
fn conditional(cql: &str) -> bool {
    cql.split_whitespace().any(|w| w.eq_ignore_ascii_case("IF"))
}

/// Open a driver session: (session, "host:port,..." for messages, consistency).
async fn build_session(
    settings: &StoreSettings,
    timeout: Duration,
) -> Result<(CSession, String, Consistency), StoreError> {
    let mut points = Vec::new();
    for h in &settings.hosts {
        let (host, port) = split_host_port(h, 9042).map_err(|e| StoreError::Unavailable {
            hosts: h.clone(),
            reason: e,
        })?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        points.push(format!("{host}:{port}"));
    }
    let hosts = points.join(",");
    let unavailable = |reason: String| StoreError::Unavailable {
        hosts: hosts.clone(),
        reason,
    };
    let consistency = Consistency::try_from(settings.consistency_level as i16)
        .map_err(|e| unavailable(format!("consistency_level: {e}")))?;

    let auth: Arc<dyn SaslAuthenticatorProvider + Send + Sync> = if settings.username.is_empty() {
        Arc::new(NoneAuthenticatorProvider)
    } else {
        Arc::new(StaticPasswordAuthenticatorProvider::new(
            &settings.username,
            &settings.password,
        ))
    };

    let build = async {
        // Fail fast when nothing listens: the driver would otherwise keep
        // retrying behind our back.
        let mut reached = false;
        let mut last_err = String::new();
        for p in &points {
            match tokio::net::TcpStream::connect(p.as_str()).await {
                Ok(_) => {
                    reached = true;
                    break;
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        if !reached {
            return Err(unavailable(last_err));
        }
        let config = NodeTcpConfigBuilder::new()
            .with_contact_points(points.iter().map(|p| p.as_str().into()).collect())
            .with_authenticator_provider(auth)
            .build()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        TcpSessionBuilder::new(RoundRobinLoadBalancingStrategy::new(), config)
            .build()
            .await
            .map_err(|e| unavailable(e.to_string()))
    };
    let session = tokio::time::timeout(timeout, build)
        .await
        .map_err(|_| unavailable(format!("no answer within {} s", timeout.as_secs())))??;
    Ok((session, hosts, consistency))
}

impl Conn {
    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Arc<PreparedQuery>>> {
        // A panic while holding it cannot leave the map half-written.
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn body_rows(env: Envelope, what: &str) -> Result<Vec<Row>, StoreError> {
    let body = env.response_body().map_err(|e| decode(what, e))?;
    Ok(body.into_rows().unwrap_or_default())
}

/// A TTL in seconds as CQL's `USING TTL ?` takes it (an int), capped.
pub(crate) fn ttl(secs: u64) -> i32 {
    secs.min(i32::MAX as u64) as i32
}

pub(crate) fn decode(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Decode {
        what: first_words(what),
        reason: e.to_string(),
    }
}

/// The start of a statement, enough to recognise it in an error.
fn first_words(cql: &str) -> String {
    let one_line: String = cql.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s: String = one_line.chars().take(60).collect();
    if one_line.chars().count() > 60 {
        s.push('…');
    }
    s
}

/// Read a column that may be null or absent.
pub(crate) fn col<T>(row: &Row, name: &str, what: &str) -> Result<Option<T>, StoreError>
where
    Row: IntoRustByName<T>,
{
    if !row.contains_column(name) {
        return Ok(None);
    }
    row.get_by_name(name).map_err(|e| decode(what, e))
}

/// Read a `map<text,text>` column; null is the empty map.
pub(crate) fn text_map(
    row: &Row,
    name: &str,
    what: &str,
) -> Result<HashMap<String, String>, StoreError> {
    use cdrs_tokio::types::map::Map;
    use cdrs_tokio::types::AsRust;
    let m: Option<Map> = col(row, name, what)?;
    match m {
        None => Ok(HashMap::new()),
        Some(m) => m
            .as_r_rust::<HashMap<String, String>>()
            .map_err(|e| decode(what, e)),
    }
}

impl Store {
    /// Daemons: connect, retrying with backoff until it works or shutdown
    /// is asked for (then the last error is returned).
    pub async fn connect_retrying(
        settings: &StoreSettings,
        mut shutdown: crate::shutdown::Shutdown,
    ) -> Result<Store, StoreError> {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
        loop {
            match Store::connect(settings, Duration::from_secs(20)).await {
                Ok(s) => return Ok(s),
                Err(e) if shutdown.is_triggered() => return Err(e),
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, "Cassandra not ready, retrying in {wait:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait() => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cdrs-tokio 9.0.2 can be left with no node to send to while the
    /// cluster is up: on a metadata refresh (after its control node died)
    /// it compares each node's gossip address (storage port) with its
    /// native address, finds them "changed", and sets every node to
    /// Unknown, which its load balancer skips for good. Measured with
    /// `make faults-cluster`: one Cassandra node of 3 killed, and every
    /// daemon answered "No nodes available in query plan!" until restarted.
    /// That error must replace the session at once, like a wedged one.
    #[test]
    fn a_session_left_with_no_node_is_replaced() {
        use cdrs_tokio::error::Error;
        assert!(lost_every_node(&Error::General(
            "No nodes available in query plan!".into()
        )));
        assert!(!lost_every_node(&Error::General("Unavailable".into())));
        assert!(!lost_every_node(&Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
    }

    /// Our `IF ...` statements (the sync lock, the poller lease) must run
    /// their Paxos round at SERIAL, or LOCAL_SERIAL when the configured level
    /// keeps to the local data centre; the commit and every other statement
    /// use the configured `consistency_level`.
    #[test]
    fn lightweight_transactions_carry_an_explicit_serial_consistency() {
        for (level, serial) in [
            (Consistency::One, Consistency::Serial),
            (Consistency::Quorum, Consistency::Serial),
            (Consistency::All, Consistency::Serial),
            (Consistency::LocalQuorum, Consistency::LocalSerial),
            (Consistency::LocalOne, Consistency::LocalSerial),
        ] {
            let lwt = "UPDATE {ks}.t SET a = ? WHERE k = ? IF a = ?";
            let p = statement(lwt, QueryValues::SimpleValues(vec![]), level).build();
            assert_eq!(p.query_params.consistency, level);
            assert_eq!(p.query_params.serial_consistency, Some(serial), "{level:?}");
            let plain = "UPDATE {ks}.t SET a = ? WHERE k = ?";
            let p = statement(plain, QueryValues::SimpleValues(vec![]), level).build();
            assert_eq!(p.query_params.consistency, level);
            assert_eq!(p.query_params.serial_consistency, None);
        }
    }

    /// Every CQL template (`const X: &str = "... {ks} ..."`) of the store's
    /// files, as the store prepares it (line continuations joined).
    fn store_templates() -> Vec<(String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let src = std::fs::read_to_string(&path).unwrap();
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            for part in src.split(": &str =").skip(1) {
                let Some(open) = part.find('"') else { continue };
                let body = &part[open + 1..];
                let Some(close) = body.find('"') else {
                    continue;
                };
                let lit = &body[..close];
                if !lit.contains("{ks}") {
                    continue;
                }
                let cql: String = lit
                    .split("\\\n")
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                out.push((file.clone(), cql));
            }
        }
        out
    }

    /// The driver sends a statement again to another node, after the node
    /// it went to died with it (an I/O error), only when the statement is
    /// marked idempotent (cdrs-tokio's default retry policy); otherwise
    /// the running sync stops with an outage. Every statement of ours but
    /// the lightweight transactions is idempotent: reads, and writes of
    /// rows keyed by deterministic ids, whose values (maps merged key by
    /// key included) are the same when written twice. A lightweight
    /// transaction is not (its second round may see its own first one), so
    /// it is never marked.
    #[test]
    fn writes_keyed_by_their_ids_are_idempotent_to_the_driver_and_lightweight_transactions_are_not()
    {
        let all = store_templates();
        let mut lwts = 0;
        for (file, cql) in &all {
            let p = statement(cql, QueryValues::SimpleValues(vec![]), Consistency::Quorum).build();
            let lwt = cql.contains(" IF NOT EXISTS")
                || cql.contains(" IF owner = ?")
                || cql.contains(" IF infos['syncing'] = ?");
            if lwt {
                lwts += 1;
                assert!(!p.is_idempotent, "{file}: {cql}");
                assert!(p.query_params.serial_consistency.is_some(), "{file}: {cql}");
            } else {
                assert!(p.is_idempotent, "{file}: {cql}");
                assert_eq!(p.query_params.serial_consistency, None, "{file}: {cql}");
            }
        }
        // The sync lock and the poller lease: take, renew, release; and the
        // clearing of our own `syncing` marker. (Live sync has none: its
        // membership rows are plain writes.)
        assert_eq!(lwts, 7, "{all:#?}");
        assert!(all.len() > 40, "templates found: {}", all.len());
    }

    /// What makes a write not idempotent besides a condition: a counter
    /// (`c = c + 1`) or a list append. The schema has neither, and the only
    /// self-relative updates are merges into the `map<text,text>` columns
    /// `infos` and `credentials` (CONTRACT §3), which give the same map
    /// when repeated.
    #[test]
    fn no_statement_increments_a_counter_or_appends_to_a_list() {
        let schema = include_str!("../../config/schema.cql").to_lowercase();
        assert!(
            !schema.contains("counter"),
            "a counter column in schema.cql"
        );
        assert!(!schema.contains("list<"), "a list column in schema.cql");
        for (file, cql) in store_templates() {
            let words: Vec<&str> = cql.split_whitespace().collect();
            for w in words.windows(4) {
                if w[1] == "=" && w[0] == w[2] {
                    assert!(
                        matches!(w[0], "infos" | "credentials") && matches!(w[3], "+" | "-"),
                        "{file}: {cql}"
                    );
                }
            }
        }
    }
}
