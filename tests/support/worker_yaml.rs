//! The configuration of a worker on the local stack with NATS subjects of
//! its own, as YAML for a worker process: one writer for the integration
//! tests and the benchmarks (the examples include this file by path), so
//! the keys they rely on are spelled once.

#![allow(dead_code)]

/// Where the local stack listens: the `STACK_*` variables that
/// `scripts/stack.sh up` writes to `.stack/env`.
#[derive(Debug, Clone, Default)]
pub struct StackAddrs {
    pub nats_url: String,
    pub cassandra: String,
    pub ca_file: String,
    pub s3_endpoint: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub s3_bucket: String,
}

impl StackAddrs {
    /// Read through `var` (the environment, or `.stack/env` parsed).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let need = |k: &str| var(k).ok_or_else(|| format!("{k} is not set (is the stack up?)"));
        Ok(Self {
            nats_url: need("STACK_NATS_URL")?,
            cassandra: need("STACK_CASSANDRA_HOSTS")?,
            ca_file: need("STACK_IMAP_CA_FILE")?,
            s3_endpoint: need("STACK_S3_ENDPOINT")?,
            s3_access_key: need("STACK_S3_ACCESS_KEY")?,
            s3_secret_key: need("STACK_S3_SECRET_KEY")?,
            s3_bucket: need("STACK_S3_BUCKET")?,
        })
    }
}

/// A worker's YAML: every subject ends in `.{tag}`.
pub struct WorkerYaml<'a> {
    pub stack: &'a StackAddrs,
    pub tag: &'a str,
    pub workers: u32,
    /// The hand-off subject; empty for store-only.
    pub in_topic: &'a str,
    pub keyspace: &'a str,
    /// `raw_messages` bucket; the stack's when empty.
    pub bucket: &'a str,
    /// Lines added at the end, inside the `imap:` block (indent them).
    pub imap_extra: &'a str,
}

impl WorkerYaml<'_> {
    pub fn render(&self) -> String {
        let s = self.stack;
        let tag = self.tag;
        let bucket = if self.bucket.is_empty() {
            &s.s3_bucket
        } else {
            self.bucket
        };
        format!(
            "# A worker on the local stack, with subjects of its own (.{tag}).\n\
             workers: {workers}\n\
             nats_url: {nats}\n\
             nats_queue: IMAPworkers.{tag}\n\
             nats_topic_sender: outboundIMAP.{tag}\n\
             nats_topic_poller: imapJobs.{tag}\n\
             nats_topic_poller_cache: idCache.{tag}\n\
             store_name: cassandra\n\
             store_settings:\n\
             \x20 hosts: [\"{cass}\"]\n\
             \x20 keyspace: {ks}\n\
             \x20 consistency_level: 1\n\
             \x20 object_store: s3     # messages over raw_size_limit (1 MiB)\n\
             \x20 object_store_settings:\n\
             \x20   endpoint: \"{endpoint}\"\n\
             \x20   access_key: \"{access}\"\n\
             \x20   secret_key: \"{secret}\"\n\
             \x20   buckets: {{raw_messages: \"{bucket}\"}}\n\
             LDAConfig:\n\
             \x20 in_topic: \"{in_topic}\"\n\
             imap:\n\
             \x20 ca_file: {ca}\n\
             \x20 poll_throttle_secs: 3600   # no poller: orders come from the caller\n\
             {extra}",
            workers = self.workers,
            nats = s.nats_url,
            cass = s.cassandra,
            ks = self.keyspace,
            endpoint = s.s3_endpoint,
            access = s.s3_access_key,
            secret = s.s3_secret_key,
            in_topic = self.in_topic,
            ca = s.ca_file,
            extra = self.imap_extra,
        )
    }
}
