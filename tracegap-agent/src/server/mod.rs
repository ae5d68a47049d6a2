//! The agent's HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the
//! event loop is turning) and `/readyz` (programs attached, exporter
//! running) on one address; `/report` (JSON) on another, because it names
//! services and URL paths: loopback by default, so only someone on the
//! node (or `kubectl exec`/`port-forward`) reads it. Both under
//! [`limits`]: what a hostile client can hold is bounded.

pub mod limits;

pub use limits::{ServerLimits, serve};

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderValue, StatusCode, header},
    response::IntoResponse,
    routing::get,
};

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
    store: std::sync::OnceLock<Arc<crate::backend::BackendStatus>>,
    pub export: Arc<crate::backend::BackendStatus>,
}

impl Shared {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            reporter: Mutex::new(Reporter::default()),
            ready: AtomicBool::new(false),
            heartbeat_ns: AtomicU64::new(monotonic_ns()),
            api: std::sync::OnceLock::new(),
            store: std::sync::OnceLock::new(),
            export: Arc::default(),
        }
    }

    /// The Kubernetes API's status, which `/readyz` reports.
    pub fn set_api(&self, status: Arc<crate::cluster::ApiStatus>) {
        let _ = self.api.set(status);
    }

    /// The trace store's status, which `/readyz` notes.
    pub fn set_store(&self, status: Arc<crate::backend::BackendStatus>) {
        let _ = self.store.set(status);
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
/// runs, with address-only names); 503 `starting` before that. 503
/// `refused: ...` while the collector or the trace store has refused the
/// agent (TLS or credentials) and not taken it since start: settings to
/// fix, and a rollout should stop there. A store or collector that is away,
/// or refuses the agent after having taken it, adds a `note:` line and
/// keeps 200: the agent still finds and counts gaps, its metrics are still
/// to be scraped.
async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned());
    }
    if let Some(why) = s.api.get().and_then(|a| a.degraded()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: {why}\n"),
        );
    }
    let store = s.store.get();
    let refused: Vec<String> = [
        store.and_then(|st| st.refused_since_start()),
        s.export.refused_since_start(),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !refused.is_empty() {
        let lines: String = refused.iter().map(|r| format!("refused: {r}\n")).collect();
        return (StatusCode::SERVICE_UNAVAILABLE, lines);
    }
    let mut body = "ok\n".to_owned();
    for why in [store.and_then(|st| st.failing()), s.export.failing()]
        .into_iter()
        .flatten()
    {
        body.push_str(&format!("note: {why}\n"));
    }
    (StatusCode::OK, body)
}

/// `/metrics`, `/healthz` and `/readyz`: for Prometheus and the kubelet,
/// each endpoint under its own limit (a flood of `/metrics` leaves the
/// probes answering).
pub fn probes(shared: Arc<Shared>, limits: &ServerLimits) -> Router {
    let m = &shared.metrics.clone();
    Router::new()
        .route("/metrics", limits.endpoint(get(metrics), PROBES, m))
        .route("/healthz", limits.endpoint(get(healthz), PROBES, m))
        .route("/readyz", limits.endpoint(get(readyz), PROBES, m))
        .with_state(shared)
}

/// The servers' names in the metrics.
pub const PROBES: &str = "probes";
pub const REPORT: &str = "report";

/// `/report`: the service graph with URL paths, for people on the node;
/// `/api/quality-metrics`: the same, as Jaeger's Trace Quality page reads
/// it, with `Access-Control-Allow-Origin: cors_origin` when a Jaeger UI on
/// another origin calls it.
pub fn report(shared: Arc<Shared>, cors_origin: Option<String>, limits: &ServerLimits) -> Router {
    let m = &shared.metrics.clone();
    let quality = Router::new()
        .route(
            "/api/quality-metrics",
            limits.endpoint(get(quality_metrics), REPORT, m),
        )
        .with_state(shared.clone());
    let quality = allow_origin(quality, cors_origin);
    Router::new()
        .route("/report", limits.endpoint(get(report_json), REPORT, m))
        .with_state(shared)
        .merge(quality)
}

/// `router`'s answers, with `Access-Control-Allow-Origin: origin` when a
/// browser on that origin (a Jaeger UI elsewhere) may read them.
pub fn allow_origin(router: Router, origin: Option<String>) -> Router {
    match origin.and_then(|o| HeaderValue::from_str(&o).ok()) {
        Some(origin) => router.layer(axum::middleware::map_response(
            move |mut r: axum::response::Response| {
                let origin = origin.clone();
                async move {
                    r.headers_mut()
                        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                    r
                }
            },
        )),
        None => router,
    }
}

async fn quality_metrics(
    State(s): State<Arc<Shared>>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> axum::response::Response {
    let Some(service) = q.get("service").filter(|s| !s.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "service= is required\n").into_response();
    };
    match s.reporter.lock() {
        Ok(r) => {
            let scope = match &r.node {
                Some(node) => format!("since the agent on {node} started (hours= is not applied)"),
                None => "since this agent started (hours= is not applied)".to_owned(),
            };
            Json(crate::quality::quality_metrics(
                &r.report(),
                service,
                &scope,
            ))
            .into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The report gathers what reconciliation finds.
impl crate::reconcile::Findings for Shared {
    fn callee_span(
        &self,
        source: &str,
        destination: &str,
        outcome: crate::reconcile::Outcome,
        answer: Option<&str>,
        trace: &str,
    ) {
        if let Ok(mut r) = self.reporter.lock() {
            r.callee_span(source, destination, outcome, answer, trace);
        }
    }

    fn services(&self, statuses: Vec<crate::reconcile::learned::ServiceStatus>) {
        if let Ok(mut r) = self.reporter.lock() {
            r.services = statuses;
        }
    }
}
