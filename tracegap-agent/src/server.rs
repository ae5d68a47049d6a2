//! The agent's HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the
//! event loop is turning) and `/readyz` (programs attached, exporter
//! running) on one address; `/report` (JSON) on another, because it names
//! services and URL paths: loopback by default, so only someone on the
//! node (or `kubectl exec`/`port-forward`) reads it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{clock::monotonic_ns, metrics::Metrics, report::Reporter};

/// A loop that has not turned for this long is unhealthy.
const STALL_NS: u64 = 30 * 1_000_000_000;

/// What the endpoints read; the event loop writes it.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub reporter: Mutex<Reporter>,
    pub ready: AtomicBool,
    heartbeat_ns: AtomicU64,
    api: std::sync::OnceLock<Arc<crate::cluster::ApiStatus>>,
}

impl Shared {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            reporter: Mutex::new(Reporter::default()),
            ready: AtomicBool::new(false),
            heartbeat_ns: AtomicU64::new(monotonic_ns()),
            api: std::sync::OnceLock::new(),
        }
    }

    /// The Kubernetes API's status, which `/readyz` reports.
    pub fn set_api(&self, status: Arc<crate::cluster::ApiStatus>) {
        let _ = self.api.set(status);
    }

    /// Called by the event loop on every turn.
    pub fn beat(&self) {
        self.heartbeat_ns.store(monotonic_ns(), Ordering::Relaxed);
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn report_json(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match s.reporter.lock() {
        Ok(r) => Json(r.report()).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn healthz(State(s): State<Arc<Shared>>) -> StatusCode {
    let age = monotonic_ns().saturating_sub(s.heartbeat_ns.load(Ordering::Relaxed));
    if age < STALL_NS {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// 200 `ok` when the programs are attached and the exporter runs; 503
/// `degraded: ...` while the Kubernetes API is away (the data path still
/// runs, with address-only names); 503 `starting` before that.
async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned());
    }
    match s.api.get().and_then(|a| a.degraded()) {
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: {why}\n"),
        ),
        None => (StatusCode::OK, "ok\n".to_owned()),
    }
}

/// `/metrics`, `/healthz` and `/readyz`: for Prometheus and the kubelet.
pub fn probes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

/// `/report`: the service graph with URL paths, for people on the node.
pub fn report(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/report", get(report_json))
        .with_state(shared)
}

/// Binds `addr` and serves `router` until the task is dropped. Binding is
/// done before returning, so a taken port is a start-up error.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((bound, task))
}
