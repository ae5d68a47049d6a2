//! `tracegap quality`: Jaeger's Trace Quality API (`/api/quality-metrics`)
//! and `/report` for the whole cluster, each request a few queries to
//! Prometheus; no state of its own, so any number of replicas, restarted
//! at will. `/readyz` is Prometheus's readiness: a page it could not fill
//! says why, and so does the probe.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    response::IntoResponse as _,
    routing::get,
};

use super::{Prometheus, report::cluster_report};
use crate::{
    metrics::Metrics,
    server::{ServerLimits, allow_origin, serve},
};

/// `tracegap quality`'s settings.
#[derive(Clone, Debug)]
pub struct QualityConfig {
    /// Prometheus's base URL (or Thanos', Mimir's, VictoriaMetrics').
    pub prometheus: String,
    /// Where to serve.
    pub listen: SocketAddr,
    /// The window counted when the caller names none (the UI's `hours=`
    /// names one).
    pub window: Duration,
    /// Each query's bound.
    pub timeout: Duration,
    /// The origin of a Jaeger UI allowed to call the API from the browser.
    pub cors_origin: Option<String>,
    pub limits: ServerLimits,
    /// TLS and credentials for Prometheus.
    pub access: crate::remote::Access,
}

/// The longest window asked for (Prometheus keeps 15 days by default).
const MAX_WINDOW: Duration = Duration::from_secs(31 * 24 * 3600);

struct Served {
    prom: Prometheus,
    window: Duration,
}

/// Serves until `stop` resolves; returns the address it bound (through
/// `bound`) as soon as it listens.
pub async fn run(
    config: QualityConfig,
    stop: impl std::future::Future<Output = ()>,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let prom = Prometheus::new(&config.prometheus, config.timeout, &config.access)?;
    if let Err(e) = prom.ready().await {
        tracing::warn!(error = %e, "Prometheus is not ready: the page says so until it is");
    }
    let served = Arc::new(Served {
        prom,
        window: config.window,
    });
    let (addr, task) = serve(
        config.listen,
        router(served, config.cors_origin),
        "quality",
        config.limits,
        Arc::new(Metrics::new()),
    )
    .await
    .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.listen))?;
    tracing::info!(listen = %addr, prometheus = %config.prometheus, "serving /api/quality-metrics and /report");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    stop.await;
    task.abort();
    Ok(())
}

fn router(served: Arc<Served>, cors_origin: Option<String>) -> Router {
    let api = Router::new()
        .route("/api/quality-metrics", get(quality))
        .route("/report", get(report))
        .with_state(served.clone());
    let api = allow_origin(api, cors_origin);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(served)
        .merge(api)
}

type Params = Query<std::collections::BTreeMap<String, String>>;

/// The window a request asks for: `hours=` (the UI's), else the default.
fn window(q: &Params, default: Duration) -> Duration {
    q.get("hours")
        .and_then(|h| h.parse::<f64>().ok())
        .filter(|h| h.is_finite() && *h > 0.0)
        .map(|h| Duration::from_secs_f64(h * 3600.0).clamp(Duration::from_secs(60), MAX_WINDOW))
        .unwrap_or(default)
}

/// A window as people say it (`1h`, `90m`).
fn spoken(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{}m", s.div_ceil(60))
    }
}

fn unavailable(e: &super::Error) -> axum::response::Response {
    (
        StatusCode::BAD_GATEWAY,
        format!("tracegap quality cannot read the agents' counters: {e}\n"),
    )
        .into_response()
}

async fn quality(State(s): State<Arc<Served>>, q: Params) -> axum::response::Response {
    let Some(service) = q.get("service").filter(|s| !s.is_empty()).cloned() else {
        return (StatusCode::BAD_REQUEST, "service= is required\n").into_response();
    };
    let w = window(&q, s.window);
    match cluster_report(&s.prom, w, SystemTime::now()).await {
        Ok(r) => {
            let scope = format!(
                "every node, the last {} (Prometheus at {})",
                spoken(w),
                s.prom.url()
            );
            Json(crate::quality::quality_metrics(&r, &service, &scope)).into_response()
        }
        Err(e) => unavailable(&e),
    }
}

/// `/report`: JSON, or the table `tracegap report` prints for a client
/// that asks for text (`Accept: text/plain`, or `?format=table`, e.g.
/// from curl).
async fn report(
    State(s): State<Arc<Served>>,
    headers: axum::http::HeaderMap,
    q: Params,
) -> axum::response::Response {
    let w = window(&q, s.window);
    let table = q.get("format").is_some_and(|f| f == "table")
        || headers
            .get(axum::http::header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("text/plain"));
    match cluster_report(&s.prom, w, SystemTime::now()).await {
        Ok(r) if table => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            crate::report::table(&r),
        )
            .into_response(),
        Ok(r) => Json(r).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn ready(State(s): State<Arc<Served>>) -> axum::response::Response {
    match s.prom.ready().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uis_hours_are_the_window_within_bounds() {
        let q = |s: &str| Query(serde_urlencoded_pairs(s));
        let d = Duration::from_secs(3600);
        assert_eq!(window(&q("hours=2"), d), Duration::from_secs(7200));
        assert_eq!(window(&q("hours=0.001"), d), Duration::from_secs(60));
        assert_eq!(window(&q("hours=-1"), d), d);
        assert_eq!(window(&q("hours=NaN"), d), d);
        assert_eq!(window(&q(""), d), d);
        assert_eq!(window(&q("hours=100000"), d), MAX_WINDOW);
        assert_eq!(spoken(Duration::from_secs(7200)), "2h");
        assert_eq!(spoken(Duration::from_secs(90 * 60)), "90m");
    }

    fn serde_urlencoded_pairs(s: &str) -> std::collections::BTreeMap<String, String> {
        url::form_urlencoded::parse(s.as_bytes())
            .into_owned()
            .collect()
    }
}
