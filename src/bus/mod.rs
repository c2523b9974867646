//! The NATS bus shared by every mode: connect with retry and backoff,
//! publish, request with a timeout, queue-subscribe, all in JSON.
//!
//! Errors that callers branch on (no responder, timeout, unreachable server)
//! come back as [`BusError`]; the JSON shapes themselves are in [`wire`].

pub mod wire;

use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backoff::Backoff;
use crate::config::redact_url;
use crate::shutdown::Shutdown;

pub use async_nats::{Message, Subscriber};

/// Bus failures a caller may want to tell apart.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot reach NATS at {url}: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("no subscriber on NATS subject {0:?}")]
    NoResponders(String),
    #[error("no reply on NATS subject {subject:?} within {secs} s")]
    TimedOut { subject: String, secs: u64 },
    #[error("bad reply on NATS subject {subject:?}: {reason}")]
    BadReply { subject: String, reason: String },
    #[error("NATS {op} on {subject:?} failed: {reason}")]
    Other {
        op: &'static str,
        subject: String,
        reason: String,
    },
}

/// How hard [`Bus::connect`] tries before giving up.
#[derive(Debug, Clone, Copy)]
pub enum Retry {
    /// Daemons: until connected or shut down.
    Forever,
    /// CLI: a few quick tries, then a clear error.
    Attempts(u32),
}

/// A connected NATS client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
}

impl Bus {
    /// Connect to `url`, retrying with exponential backoff and jitter.
    /// `url` may list several servers of one cluster, comma-separated
    /// ([`crate::config::nats_servers`]): each attempt tries them all, and
    /// the client later fails over between them (and the servers the cluster
    /// announces).
    pub async fn connect(
        url: &str,
        name: &str,
        retry: Retry,
        mut shutdown: Shutdown,
    ) -> Result<Bus, BusError> {
        let shown = redact_url(url);
        let servers = crate::config::nats_servers(url).map_err(|reason| BusError::Unavailable {
            url: shown.clone(),
            reason,
        })?;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let opts = async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(Duration::from_secs(5))
                .max_reconnects(None::<usize>);
            match opts.connect(servers.as_slice()).await {
                Ok(client) => {
                    tracing::debug!(url = %shown, "connected to NATS");
                    return Ok(Bus { client });
                }
                Err(e) => {
                    let give_up = matches!(retry, Retry::Attempts(n) if attempt >= n);
                    if give_up || shutdown.is_triggered() {
                        return Err(BusError::Unavailable {
                            url: shown,
                            reason: e.to_string(),
                        });
                    }
                    let wait = backoff.next_delay();
                    // A daemon says it is waiting; the CLI keeps its one error line.
                    if matches!(retry, Retry::Forever) {
                        tracing::warn!(url = %shown, attempt, error = %e, "NATS not reachable, retrying in {wait:?}");
                    } else {
                        tracing::debug!(url = %shown, attempt, error = %e, "NATS not reachable, retrying in {wait:?}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait() => {}
                    }
                }
            }
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Publish `value` as JSON.
    pub async fn publish<T: Serialize>(&self, subject: &str, value: &T) -> Result<(), BusError> {
        let payload = to_payload(value);
        self.client
            .publish(subject.to_string(), payload)
            .await
            .map_err(|e| other("publish", subject, e))
    }

    /// Publish raw bytes (replies to requests).
    pub async fn publish_bytes(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        self.client
            .publish(subject.to_string(), payload)
            .await
            .map_err(|e| other("publish", subject, e))
    }

    /// Publish `value` as JSON with a reply subject.
    pub async fn publish_with_reply<T: Serialize>(
        &self,
        subject: &str,
        reply: &str,
        value: &T,
    ) -> Result<(), BusError> {
        self.client
            .publish_with_reply(subject.to_string(), reply.to_string(), to_payload(value))
            .await
            .map_err(|e| other("publish", subject, e))
    }

    /// Make sure everything published so far reached the server.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.client.flush().await.map_err(|e| other("flush", "", e))
    }

    /// Send `value` as a request and decode the JSON reply.
    pub async fn request<T: Serialize, R: DeserializeOwned>(
        &self,
        subject: &str,
        value: &T,
        timeout: Duration,
    ) -> Result<R, BusError> {
        let msg = self
            .request_raw(subject, to_payload(value), timeout)
            .await?;
        serde_json::from_slice(&msg.payload).map_err(|e| BusError::BadReply {
            subject: subject.to_string(),
            reason: e.to_string(),
        })
    }

    /// Send raw bytes as a request; the reply message as it came.
    pub async fn request_raw(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let req = async_nats::client::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        self.client
            .send_request(subject.to_string(), req)
            .await
            .map_err(|e| {
                use async_nats::client::RequestErrorKind as K;
                match e.kind() {
                    K::NoResponders => BusError::NoResponders(subject.to_string()),
                    K::TimedOut => BusError::TimedOut {
                        subject: subject.to_string(),
                        secs: timeout.as_secs(),
                    },
                    _ => other("request", subject, e),
                }
            })
    }

    /// Subscribe to `subject` in queue group `queue`: each message reaches one member.
    pub async fn queue_subscribe(
        &self,
        subject: &str,
        queue: &str,
    ) -> Result<Subscriber, BusError> {
        self.client
            .queue_subscribe(subject.to_string(), queue.to_string())
            .await
            .map_err(|e| other("subscribe", subject, e))
    }

    /// Plain subscription (every subscriber gets every message).
    pub async fn subscribe(&self, subject: &str) -> Result<Subscriber, BusError> {
        self.client
            .subscribe(subject.to_string())
            .await
            .map_err(|e| other("subscribe", subject, e))
    }

    /// A fresh inbox subject for replies.
    pub fn new_inbox(&self) -> String {
        self.client.new_inbox()
    }

    /// Answer `msg` with `value` as JSON, if it was a request. A reply that
    /// cannot be sent is logged: the requester will time out, which it handles.
    pub async fn reply<T: Serialize>(&self, msg: &Message, value: &T) {
        if let Some(reply) = &msg.reply {
            if let Err(e) = self.publish(reply.as_str(), value).await {
                tracing::warn!(subject = %msg.subject, error = %e, "cannot send reply");
            }
        }
    }
}

fn to_payload<T: Serialize>(value: &T) -> Bytes {
    // Serialising our own plain structs cannot fail.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn other(op: &'static str, subject: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Other {
        op,
        subject: subject.to_string(),
        reason: e.to_string(),
    }
}
