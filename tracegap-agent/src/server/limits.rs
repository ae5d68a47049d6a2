//! What the agent's HTTP servers grant a client: the limits every exposed
//! server in this ecosystem has (Go's `ReadHeaderTimeout`, node_exporter's
//! `--web.max-requests`, the Collector's `confighttp` timeouts). The agent
//! runs with `hostNetwork` in a DaemonSet, its metrics port open to any pod
//! that reaches the node: without them, idle half-sent requests hold
//! memory until the agent is OOM-killed, and a flood of `/metrics` takes
//! CPU from the event pipeline.
//!
//! hyper's own mechanisms: its header-read timeout (which also closes a
//! kept-alive connection idle that long) and head-size bound; tower's
//! concurrency limit with load shedding and its timeout, per endpoint; caps
//! on open connections in the accept loop, in all and per client address
//! (past them a new connection is closed at once). Each refusal is counted.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, error_handling::HandleErrorLayer, http::StatusCode, routing::MethodRouter};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tower::ServiceBuilder;

use crate::metrics::Metrics;

/// The limits, per server. Defaults a user never needs to touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time to send a request's head; also how long a kept-alive
    /// connection may sit idle waiting for its next request.
    pub header_timeout: Duration,
    /// Connections open at once; past it new ones are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one address: one hostile pod cannot
    /// take the slots Prometheus and the kubelet need.
    pub max_connections_per_client: usize,
    /// Requests served at once per endpoint; past it they are answered
    /// 503 at once (Prometheus retries on its next scrape).
    pub max_in_flight: usize,
    /// Time to answer one request at most (503 past it).
    pub request_timeout: Duration,
    /// Bytes of one request head at most (431 past it).
    pub max_head_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_connections_per_client: 64,
            max_in_flight: 4,
            request_timeout: Duration::from_secs(10),
            max_head_bytes: 16 * 1024,
        }
    }
}

impl ServerLimits {
    /// `route` behind its own concurrency limit (load shed past it) and
    /// timeout; refusals counted for `server`.
    pub fn endpoint<S: Clone + Send + Sync + 'static>(
        &self,
        route: MethodRouter<S>,
        server: &'static str,
        metrics: &Arc<Metrics>,
    ) -> MethodRouter<S> {
        let m = metrics.clone();
        route.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |e: tower::BoxError| {
                    let reason = if e.is::<tower::timeout::error::Elapsed>() {
                        "timeout"
                    } else {
                        "busy"
                    };
                    m.server_refused(server, reason);
                    async move { (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")) }
                }))
                .load_shed()
                // One semaphore for the endpoint, whatever clones the
                // router makes per request.
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    self.max_in_flight,
                ))
                .timeout(self.request_timeout),
        )
    }
}

/// Binds `addr` and serves `router` under `limits` until the task is
/// dropped; `server` names it in the metrics. Binding is done before
/// returning, so a taken port is a start-up error.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    server: &'static str,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(accept(listener, router, server, limits, metrics));
    Ok((bound, task))
}

/// Connections closed since memory was last given back, past which it is.
const CLOSED_BEFORE_TRIM: usize = 256;

async fn accept(
    listener: tokio::net::TcpListener,
    router: Router,
    server: &'static str,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let per_client: Arc<std::sync::Mutex<crate::FastMap<std::net::IpAddr, usize>>> = Arc::default();
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, most likely: wait for some to close
                // rather than spin.
                tracing::warn!(error = %e, server, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.server_refused(server, "connections");
            drop(stream);
            continue;
        };
        let client = peer.ip().to_canonical();
        let admitted = per_client.lock().is_ok_and(|mut m| {
            let n = m.entry(client).or_insert(0);
            if *n >= limits.max_connections_per_client {
                return false;
            }
            *n += 1;
            true
        });
        if !admitted {
            metrics.server_refused(server, "connections_per_client");
            drop(stream);
            continue;
        }
        let gauge = metrics.server_connections(server);
        gauge.inc();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let (closed, open, per_client) = (closed.clone(), open.clone(), per_client.clone());
        let max = limits.max_connections;
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_header_size(limits.max_head_bytes)
                .max_buf_size(limits.max_head_bytes.max(8192));
            // Errors are the client's (a timeout, a bad head): hyper has
            // answered or closed; nothing to add.
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
            drop(permit);
            gauge.dec();
            if let Ok(mut m) = per_client.lock()
                && let Some(n) = m.get_mut(&client)
            {
                *n -= 1;
                if *n == 0 {
                    m.remove(&client);
                }
            }
            // A burst gone: give its buffers back to the system, once every
            // connection is closed (glibc keeps freed memory otherwise).
            let n = closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n >= CLOSED_BEFORE_TRIM && open.available_permits() == max {
                closed.store(0, std::sync::atomic::Ordering::Relaxed);
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        });
    }
}

/// Returns freed heap memory to the system.
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, routing::get};
    use tower::ServiceExt as _;

    use super::*;

    fn request() -> axum::http::Request<Body> {
        axum::http::Request::get("/slow")
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn an_endpoint_past_its_requests_in_flight_or_its_time_answers_503_and_counts() {
        let metrics = Arc::new(Metrics::default());
        let limits = ServerLimits {
            max_in_flight: 1,
            request_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        };
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let wait = Arc::new(tokio::sync::Mutex::new(Some(wait)));
        let slow = get(move || {
            let wait = wait.clone();
            async move {
                if let Some(w) = wait.lock().await.take() {
                    let _ = w.await;
                }
                "done"
            }
        });
        let router: Router =
            Router::new().route("/slow", limits.endpoint(slow, "probes", &metrics));
        // The first holds the one slot; the second is shed at once.
        let first = tokio::spawn(router.clone().oneshot(request()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = router.clone().oneshot(request()).await.unwrap();
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The first is never released: answered 503 at its time.
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(release);
        // Free again: answered.
        let third = router.oneshot(request()).await.unwrap();
        assert_eq!(third.status(), StatusCode::OK);
        let text = metrics.encode();
        for reason in ["busy", "timeout"] {
            let line = format!(
                "tracegap_http_server_refused_total{{server=\"probes\",reason=\"{reason}\"}} 1"
            );
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
    }
}
