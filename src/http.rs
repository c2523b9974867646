//! The operations HTTP server of the daemons: `/metrics` (Prometheus
//! text), `/healthz` (liveness) and `/readyz` (readiness), on
//! `metrics_addr`, off unless set.
//!
//! A minimal hyper 1 HTTP/1.1 server: three GET routes need no framework.
//! Connections are bounded (a semaphore) and each has a header-read timeout,
//! so a scraper that misbehaves cannot hold the daemon's memory. The server
//! starts before the daemon connects to NATS and Cassandra, so `/readyz`
//! can say "not ready" while they are unreachable.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ConfigError;
use crate::shutdown::Shutdown;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// What the routes answer, given by the daemon.
pub trait Probe: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
    /// `Ok(text)` when ready, `Err(why)` when not.
    fn ready(&self) -> BoxFuture<'_, Result<String, String>>;
}

/// Bind `addr` (a bind error is the caller's: a bad address is a
/// configuration error) and serve until shutdown.
pub async fn start(
    addr: &str,
    probe: Arc<dyn Probe>,
    shutdown: Shutdown,
) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = addr
        .trim()
        .parse()
        .map_err(|e| ConfigError(format!("metrics_addr {addr:?}: {e}")))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ConfigError(format!("metrics_addr {addr}: cannot listen: {e}")))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz");
    tokio::spawn(serve(listener, probe, shutdown));
    Ok(local)
}

async fn serve(listener: TcpListener, probe: Arc<dyn Probe>, mut shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.wait() => return,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let probe = probe.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let probe = probe.clone();
                let sd = sd.clone();
                async move { Ok::<_, Infallible>(route(&*probe, &sd, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(permit);
        });
    }
}

fn text(status: StatusCode, body: String, content_type: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

async fn route(
    probe: &dyn Probe,
    shutdown: &Shutdown,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), PLAIN);
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            probe.metrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        // Answered by the daemon's runtime: the process and its loop are
        // alive; after a shutdown request it says so, for the supervisor.
        "/healthz" if shutdown.is_triggered() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into(), PLAIN)
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => match probe.ready().await {
            Ok(t) => text(StatusCode::OK, format!("{t}\n"), PLAIN),
            Err(t) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{t}\n"), PLAIN),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".into(),
            PLAIN,
        ),
    }
}
