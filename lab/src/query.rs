//! Jaeger's query API over the lab's trace store, and a Jaeger UI build
//! served beside it: what the UI calls (`/api/services`, `/api/traces`,
//! ...), answered in the UI's envelope (`data`, `total`, `limit`,
//! `offset`, `errors`) with the same trace JSON as the lab's trace file.
//! So the lab's traces are searched by tag in the real UI, not only
//! uploaded into it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Component, Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::{Path as UrlPath, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};

use tracegap_agent::report::Report;

use crate::{files::jaeger_traces, store::Shared};

/// The line of the UI's index.html that Jaeger's query service replaces
/// with the UI configuration.
const CONFIG_LINE: &str = "const JAEGER_CONFIG = DEFAULT_CONFIG;";

/// Traces a search returns when the UI does not say (its own default).
const DEFAULT_LIMIT: usize = 20;

struct Ctx {
    store: Shared,
    /// tracegap's per-edge results, for the Trace Quality page.
    reports: Arc<std::sync::Mutex<Report>>,
    ui: Option<PathBuf>,
    /// The UI configuration (`JAEGER_CONFIG`).
    config: Value,
    /// `tracegap quality`, where the Trace Quality page is asked of
    /// Prometheus (both nodes summed); else `reports`.
    quality: Option<SocketAddr>,
    /// The traces as JSON, built again only when the store has grown.
    cache: std::sync::Mutex<(usize, Arc<Vec<Value>>)>,
}

impl Ctx {
    /// The store's query API alone: no UI, no reports.
    fn api_only(store: Shared) -> Arc<Self> {
        Arc::new(Self {
            store,
            reports: Arc::default(),
            ui: None,
            config: Value::Null,
            quality: None,
            cache: std::sync::Mutex::default(),
        })
    }
}

/// The query API (and the UI, when given a build directory) on its own
/// thread; stops when dropped.
pub struct QueryServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl QueryServer {
    /// Serves `store` on `addr` (and the Trace Quality API from
    /// `reports`), and the UI build in `ui` (its index.html, static/ and so
    /// on) configured as [`ui_config`] says.
    pub fn start(
        addr: SocketAddr,
        store: Shared,
        reports: Arc<std::sync::Mutex<Report>>,
        ui: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        Self::start_with_quality(addr, store, reports, ui, None)
    }

    /// [`QueryServer::start`], its Trace Quality page answered by
    /// `tracegap quality` at `quality` (the cluster-wide view, from
    /// Prometheus) when given.
    pub fn start_with_quality(
        addr: SocketAddr,
        store: Shared,
        reports: Arc<std::sync::Mutex<Report>>,
        ui: Option<PathBuf>,
        quality: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let config = ui_config();
        if let Some(dir) = &ui {
            let index = std::fs::read_to_string(dir.join("index.html"))
                .with_context(|| format!("{} is not a Jaeger UI build", dir.display()))?;
            anyhow::ensure!(
                index.contains(CONFIG_LINE),
                "{}/index.html has no `{CONFIG_LINE}` to configure",
                dir.display()
            );
        }
        let ctx = Arc::new(Ctx {
            store,
            reports,
            ui,
            config,
            quality,
            cache: std::sync::Mutex::default(),
        });
        Self::serve(addr, router(ctx))
    }

    /// Serves `store` as Grafana Tempo's query API answers (`/api/echo`,
    /// `/api/search` by `service.name`, `/api/traces/{id}` as OTLP JSON in
    /// Tempo's `batches` envelope): an imitation, since Tempo cannot run
    /// here, for the agent's Tempo reader to be tested end to end. Ids are
    /// hex (Tempo's JSON has base64; the reader takes both).
    pub fn start_tempo(addr: SocketAddr, store: Shared) -> anyhow::Result<Self> {
        let ctx = Ctx::api_only(store);
        let app = Router::new()
            .route("/api/echo", get(|| async { "echo" }))
            .route("/api/search", get(tempo_search))
            .route("/api/traces/{id}", get(tempo_trace))
            .with_state(ctx);
        Self::serve(addr, app)
    }

    /// [`QueryServer::start`] (Jaeger's API) over TLS, answering only
    /// requests with `required`'s credentials (401 otherwise), as a store
    /// behind an authenticating proxy does.
    pub fn start_secured(
        addr: SocketAddr,
        store: Shared,
        tls: crate::pki::ServerTls,
        required: Required,
    ) -> anyhow::Result<Self> {
        let ctx = Ctx::api_only(store);
        let required = Arc::new(required);
        let app = router(ctx).layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let required = required.clone();
                async move {
                    if required.admits(req.headers()) {
                        next.run(req).await
                    } else {
                        StatusCode::UNAUTHORIZED.into_response()
                    }
                }
            },
        ));
        Self::serve_on(addr, app, Some(tls))
    }

    fn serve(addr: SocketAddr, app: Router) -> anyhow::Result<Self> {
        Self::serve_on(addr, app, None)
    }

    fn serve_on(
        addr: SocketAddr,
        app: Router,
        tls: Option<crate::pki::ServerTls>,
    ) -> anyhow::Result<Self> {
        let acceptor = tls
            .map(|t| t.rustls())
            .transpose()?
            .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let stopped = async {
                    let _ = stop_rx.await;
                };
                let served = match acceptor {
                    Some(acceptor) => {
                        axum::serve(
                            crate::pki::TlsListener {
                                tcp: listener,
                                acceptor,
                            },
                            app,
                        )
                        .with_graceful_shutdown(stopped)
                        .await
                    }
                    None => {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(stopped)
                            .await
                    }
                };
                if let Err(e) = served {
                    eprintln!("query API: {e}");
                }
            });
        });
        Ok(Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// The credentials [`QueryServer::start_secured`] asks for, each when set.
#[derive(Clone, Debug, Default)]
pub struct Required {
    pub token: Option<String>,
    /// User and password.
    pub basic: Option<(String, String)>,
    /// `X-Scope-OrgID`.
    pub tenant: Option<String>,
}

impl Required {
    fn admits(&self, headers: &axum::http::HeaderMap) -> bool {
        use base64::Engine as _;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let auth = header("authorization");
        let token = self
            .token
            .as_ref()
            .is_none_or(|t| auth == Some(format!("Bearer {t}").as_str()));
        let basic = self.basic.as_ref().is_none_or(|(u, p)| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            auth == Some(format!("Basic {b64}").as_str())
        });
        let tenant = self
            .tenant
            .as_ref()
            .is_none_or(|t| header("x-scope-orgid") == Some(t.as_str()));
        token && basic && tenant
    }
}

/// Tempo's search: trace ids with a span of `service.name` starting in
/// `start..=end` (seconds).
async fn tempo_search(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(service) = q
        .get("tags")
        .and_then(|t| t.strip_prefix("service.name="))
        .map(|v| v.trim_matches('"').to_owned())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "tags=service.name=\"...\" expected",
        )
            .into_response();
    };
    let secs = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
    let (from, to) = (secs("start").unwrap_or(0), secs("end").unwrap_or(u64::MAX));
    let limit = q
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20usize);
    let Ok(spans) = ctx.store.spans.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let ids: BTreeSet<String> = spans
        .iter()
        .filter(|r| {
            let s = r.span.start_time_unix_nano / 1_000_000_000;
            r.service == service && s >= from && s <= to
        })
        .map(|r| r.trace_id())
        .take(limit)
        .collect();
    let traces: Vec<Value> = ids.iter().map(|id| json!({"traceID": id})).collect();
    axum::Json(json!({ "traces": traces })).into_response()
}

/// Tempo's trace by id: OTLP JSON in a `batches` envelope.
async fn tempo_trace(State(ctx): State<Arc<Ctx>>, UrlPath(id): UrlPath<String>) -> Response {
    let id = id.to_ascii_lowercase();
    let of: Vec<crate::store::Received> = match ctx.store.spans.lock() {
        Ok(spans) => spans
            .iter()
            .filter(|r| r.trace_id() == id)
            .cloned()
            .collect(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    if of.is_empty() {
        return (StatusCode::NOT_FOUND, "trace not found").into_response();
    }
    match crate::files::otlp_json(&of)
        .ok()
        .and_then(|j| serde_json::from_str::<Value>(&j).ok())
    {
        Some(v) => axum::Json(json!({ "batches": v["resourceSpans"] })).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

impl Drop for QueryServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/api/services", get(services))
        .route(
            "/api/services/{service}/operations",
            get(service_operations),
        )
        .route("/api/operations", get(operations))
        .route("/api/traces", get(search))
        .route("/api/traces/{id}", get(trace))
        .route("/api/dependencies", get(dependencies))
        // The UI (2.x) lists services and operations through the v3 API.
        .route("/api/v3/services", get(services_v3))
        .route("/api/v3/operations", get(operations_v3))
        .route("/api/quality-metrics", get(quality))
        .fallback(ui)
        .with_state(ctx)
}

/// The UI's envelope.
fn envelope(data: Value, total: usize) -> Response {
    axum::Json(json!({"data": data, "total": total, "limit": 0, "offset": 0, "errors": null}))
        .into_response()
}

fn error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        axum::Json(json!({"data": null, "total": 0, "limit": 0, "offset": 0,
            "errors": [{"code": status.as_u16(), "msg": msg}]})),
    )
        .into_response()
}

fn traces(ctx: &Ctx) -> Arc<Vec<Value>> {
    let count = ctx.store.spans.lock().map(|s| s.len()).unwrap_or(0);
    if let Ok(cache) = ctx.cache.lock()
        && cache.0 == count
        && count > 0
    {
        return cache.1.clone();
    }
    let (spans, down) = ctx.store.snapshot();
    let built = Arc::new(jaeger_traces(&spans, &down));
    if let Ok(mut cache) = ctx.cache.lock() {
        *cache = (spans.len(), built.clone());
    }
    built
}

/// The traces holding a span that `pick` picks, built from those traces'
/// spans alone: what a reader asking for one trace, or searching one
/// service's recent spans, needs without the whole store as JSON (the
/// agents read traces back while the store grows).
fn traces_with(ctx: &Ctx, pick: impl Fn(&crate::store::Received) -> bool) -> Vec<Value> {
    let Ok(spans) = ctx.store.spans.lock() else {
        return Vec::new();
    };
    let ids: BTreeSet<String> = spans
        .iter()
        .filter(|s| pick(s))
        .map(|s| s.trace_id())
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let of: Vec<crate::store::Received> = spans
        .iter()
        .filter(|s| ids.contains(&s.trace_id()))
        .cloned()
        .collect();
    drop(spans);
    let down = ctx.store.down.lock().map(|d| d.clone()).unwrap_or_default();
    jaeger_traces(&of, &down)
}

/// (service, operation, span kind) of every span in a trace.
fn span_services(t: &Value) -> Vec<(String, String, String)> {
    let spans = t["spans"].as_array().cloned().unwrap_or_default();
    spans
        .iter()
        .map(|s| {
            let pid = s["processID"].as_str().unwrap_or_default();
            let service = t["processes"][pid]["serviceName"]
                .as_str()
                .unwrap_or_default();
            let kind = tag_text(s, "span.kind").unwrap_or_default();
            (
                service.to_owned(),
                s["operationName"].as_str().unwrap_or_default().to_owned(),
                kind,
            )
        })
        .collect()
}

/// A tag's value as the search compares it: its text.
fn tag_text(span: &Value, key: &str) -> Option<String> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| match &t["value"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
}

async fn services(State(ctx): State<Arc<Ctx>>) -> Response {
    let all = service_names(&ctx);
    let n = all.len();
    envelope(json!(all), n)
}

fn service_names(ctx: &Ctx) -> BTreeSet<String> {
    traces(ctx)
        .iter()
        .flat_map(span_services)
        .map(|(s, _, _)| s)
        .collect()
}

fn operation_names(ctx: &Ctx, service: &str, kind: Option<&String>) -> BTreeSet<(String, String)> {
    traces(ctx)
        .iter()
        .flat_map(span_services)
        .filter(|(s, _, k)| s == service && kind.is_none_or(|want| want == k))
        .map(|(_, op, k)| (op, k))
        .collect()
}

async fn services_v3(State(ctx): State<Arc<Ctx>>) -> Response {
    axum::Json(json!({ "services": service_names(&ctx) })).into_response()
}

async fn operations_v3(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let service = q.get("service").cloned().unwrap_or_default();
    let kind = q.get("spanKind").filter(|k| !k.is_empty());
    let ops: Vec<Value> = operation_names(&ctx, &service, kind)
        .into_iter()
        .map(|(n, k)| json!({"name": n, "spanKind": k}))
        .collect();
    axum::Json(json!({ "operations": ops })).into_response()
}

async fn service_operations(
    State(ctx): State<Arc<Ctx>>,
    UrlPath(service): UrlPath<String>,
) -> Response {
    let ops: BTreeSet<String> = operation_names(&ctx, &service, None)
        .into_iter()
        .map(|(op, _)| op)
        .collect();
    let n = ops.len();
    envelope(json!(ops), n)
}

async fn operations(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let service = q.get("service").cloned().unwrap_or_default();
    let kind = q.get("spanKind").filter(|k| !k.is_empty());
    let data: Vec<Value> = operation_names(&ctx, &service, kind)
        .iter()
        .map(|(n, k)| json!({"name": n, "spanKind": k}))
        .collect();
    let n = data.len();
    envelope(json!(data), n)
}

/// A Go duration as the UI writes them ("1.2s", "100ms", "50us").
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(n * scale))
}

/// What a search asks for: `/api/traces?service=&operation=&tags=&...`.
#[derive(Debug, Default)]
pub struct Search {
    pub service: Option<String>,
    pub operation: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// µs since the epoch.
    pub start: Option<u64>,
    pub end: Option<u64>,
    pub min_duration: Option<Duration>,
    pub max_duration: Option<Duration>,
    pub limit: usize,
}

impl Search {
    pub fn from_query(q: &BTreeMap<String, String>) -> Result<Self, String> {
        let some = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
        let tags = match some("tags") {
            Some(text) => {
                let v: BTreeMap<String, Value> = serde_json::from_str(&text)
                    .map_err(|e| format!("tags: not a JSON object: {e}"))?;
                v.into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect()
            }
            None => BTreeMap::new(),
        };
        let number = |k: &str| -> Result<Option<u64>, String> {
            some(k)
                .map(|v| v.parse().map_err(|_| format!("{k}: not a number: {v}")))
                .transpose()
        };
        let duration = |k: &str| -> Result<Option<Duration>, String> {
            some(k)
                .map(|v| parse_duration(&v).ok_or_else(|| format!("{k}: not a duration: {v}")))
                .transpose()
        };
        Ok(Self {
            service: some("service"),
            operation: some("operation").filter(|o| o != "all"),
            tags,
            start: number("start")?,
            end: number("end")?,
            min_duration: duration("minDuration")?,
            max_duration: duration("maxDuration")?,
            limit: number("limit")?.map_or(DEFAULT_LIMIT, |l| l as usize),
        })
    }

    /// Whether a span of the trace matches every criterion.
    pub fn matches(&self, t: &Value) -> bool {
        let spans = t["spans"].as_array().cloned().unwrap_or_default();
        spans.iter().any(|s| {
            let pid = s["processID"].as_str().unwrap_or_default();
            let process = &t["processes"][pid];
            let service_ok = self
                .service
                .as_ref()
                .is_none_or(|want| process["serviceName"] == want.as_str());
            let op_ok = self
                .operation
                .as_ref()
                .is_none_or(|want| s["operationName"] == want.as_str());
            let start = s["startTime"].as_u64().unwrap_or(0);
            let duration = Duration::from_micros(s["duration"].as_u64().unwrap_or(0));
            let time_ok =
                self.start.is_none_or(|v| start >= v) && self.end.is_none_or(|v| start <= v);
            let duration_ok = self.min_duration.is_none_or(|d| duration >= d)
                && self.max_duration.is_none_or(|d| duration <= d);
            let tags_ok = self.tags.iter().all(|(k, v)| {
                tag_text(s, k).or_else(|| tag_text(process, k)).as_deref() == Some(v.as_str())
            });
            service_ok && op_ok && time_ok && duration_ok && tags_ok
        })
    }
}

fn trace_start(t: &Value) -> u64 {
    t["spans"]
        .as_array()
        .and_then(|s| s.iter().filter_map(|s| s["startTime"].as_u64()).min())
        .unwrap_or(0)
}

async fn search(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<BTreeMap<String, String>>,
    uri: axum::http::Uri,
) -> Response {
    // The UI's links to example traces: `?traceID=a&traceID=b`.
    let ids: Vec<String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("traceID="))
        .map(str::to_ascii_lowercase)
        .collect();
    if !ids.is_empty() {
        let found: Vec<Value> = traces(&ctx)
            .iter()
            .filter(|t| {
                t["traceID"]
                    .as_str()
                    .is_some_and(|id| ids.iter().any(|i| i == id))
            })
            .cloned()
            .collect();
        let n = found.len();
        return envelope(json!(found), n);
    }
    let search = match Search::from_query(&q) {
        Ok(s) => s,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
    };
    let candidates = match (&search.service, search.start, search.end) {
        // A service's spans in a window (what the agents ask): only the
        // traces that can match are built.
        (Some(service), Some(from), Some(to)) => Arc::new(traces_with(&ctx, |r| {
            let us = r.span.start_time_unix_nano / 1000;
            &r.service == service && us >= from && us <= to
        })),
        _ => traces(&ctx),
    };
    let mut found: Vec<Value> = candidates
        .iter()
        .filter(|t| search.matches(t))
        .cloned()
        .collect();
    // Newest first, as Jaeger lists them.
    found.sort_by_key(|t| std::cmp::Reverse(trace_start(t)));
    found.truncate(search.limit);
    let n = found.len();
    envelope(json!(found), n)
}

async fn trace(State(ctx): State<Arc<Ctx>>, UrlPath(id): UrlPath<String>) -> Response {
    let id = id.to_ascii_lowercase();
    match traces_with(&ctx, |r| r.trace_id() == id).pop() {
        Some(t) => envelope(json!([t]), 1),
        None => error(StatusCode::NOT_FOUND, "trace not found"),
    }
}

/// Calls between services: a span whose recorded parent is another
/// service's.
async fn dependencies(State(ctx): State<Arc<Ctx>>) -> Response {
    let mut calls: BTreeMap<(String, String), u64> = BTreeMap::new();
    for t in traces(&ctx).iter() {
        let spans = t["spans"].as_array().cloned().unwrap_or_default();
        let service_of = |s: &Value| {
            let pid = s["processID"].as_str().unwrap_or_default();
            t["processes"][pid]["serviceName"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let by_id: BTreeMap<&str, &Value> = spans
            .iter()
            .filter_map(|s| Some((s["spanID"].as_str()?, s)))
            .collect();
        for s in &spans {
            let Some(parent) = s["references"][0]["spanID"]
                .as_str()
                .and_then(|p| by_id.get(p))
            else {
                continue;
            };
            let (from, to) = (service_of(parent), service_of(s));
            if from != to {
                *calls.entry((from, to)).or_default() += 1;
            }
        }
    }
    let data: Vec<Value> = calls
        .into_iter()
        .map(|((parent, child), n)| json!({"parent": parent, "child": child, "callCount": n}))
        .collect();
    let n = data.len();
    envelope(json!(data), n)
}

/// The UI configuration the lab injects: the Trace Quality page on, fed by
/// tracegap. A Jaeger operator sets the same `qualityMetrics` block in
/// their `ui-config.json`, with the agent's (or a proxy's) address.
pub fn ui_config() -> Value {
    json!({
        "qualityMetrics": {
            "menuEnabled": true,
            "menuLabel": "Trace Quality",
            "apiEndpoint": "/api/quality-metrics",
        },
        "dependencies": {"menuEnabled": true},
    })
}

/// Jaeger's Trace Quality page for a service, from every node's report.
async fn quality(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(service) = q.get("service").filter(|s| !s.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "service= is required");
    };
    if let Some(addr) = ctx.quality {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(q.iter())
            .finish();
        let asked = tokio::task::spawn_blocking(move || {
            crate::http::get(addr, &format!("/api/quality-metrics?{query}"))
        })
        .await;
        return match asked {
            Ok(Ok((status, body))) => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response(),
            Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, &format!("tracegap quality: {e:#}")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
    }
    let Ok(report) = ctx.reports.lock() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "report lock poisoned");
    };
    axum::Json(tracegap_agent::quality::quality_metrics(
        &report,
        service,
        "in this lab run, by both nodes' agents (hours= is not applied)",
    ))
    .into_response()
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json" | "map") => "application/json",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The UI: files of the build; any other path is the single-page app's
/// index.html, configured.
async fn ui(State(ctx): State<Arc<Ctx>>, uri: axum::http::Uri) -> Response {
    let Some(dir) = &ctx.ui else {
        return error(
            StatusCode::NOT_FOUND,
            "no Jaeger UI is served (--jaeger-ui)",
        );
    };
    let rel = Path::new(uri.path().trim_start_matches('/'));
    let safe = rel.components().all(|c| matches!(c, Component::Normal(_)));
    if safe && !rel.as_os_str().is_empty() && !uri.path().starts_with("/api/") {
        let file = dir.join(rel);
        if file.is_file()
            && let Ok(bytes) = std::fs::read(&file)
        {
            return ([(header::CONTENT_TYPE, content_type(&file))], bytes).into_response();
        }
    }
    if uri.path().starts_with("/api/") {
        return error(StatusCode::NOT_FOUND, "no such API");
    }
    match std::fs::read_to_string(dir.join("index.html")) {
        Ok(index) => {
            let config = format!("const JAEGER_CONFIG = {};", ctx.config);
            (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                index.replace(CONFIG_LINE, &config),
            )
                .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_the_ui_writes_them() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("50us"), Some(Duration::from_micros(50)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }

    #[test]
    fn a_search_matches_service_operation_tags_and_duration_on_one_span() {
        let t = json!({
            "traceID": "ab",
            "processes": {"p1": {"serviceName": "a", "tags": [{"key": "k8s.pod.name", "type": "string", "value": "a-1"}]},
                          "p2": {"serviceName": "c", "tags": []}},
            "spans": [
                {"spanID": "1", "processID": "p1", "operationName": "GET /", "startTime": 100, "duration": 2000,
                 "tags": [{"key": "span.kind", "type": "string", "value": "server"}]},
                {"spanID": "2", "processID": "p2", "operationName": "GET /c", "startTime": 150, "duration": 500,
                 "tags": [{"key": "tracegap.gap", "type": "string", "value": "broken_propagation"},
                          {"key": "tracegap.synthetic", "type": "bool", "value": true}]}
            ]
        });
        let q = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Search::from_query(&m).expect("a valid search")
        };
        assert!(
            q(&[
                ("service", "c"),
                ("tags", r#"{"tracegap.gap":"broken_propagation"}"#)
            ])
            .matches(&t)
        );
        assert!(q(&[("tags", r#"{"tracegap.synthetic":"true"}"#)]).matches(&t));
        // The tag is on c's span, not a's.
        assert!(
            !q(&[
                ("service", "a"),
                ("tags", r#"{"tracegap.gap":"broken_propagation"}"#)
            ])
            .matches(&t)
        );
        assert!(q(&[("service", "a"), ("tags", r#"{"k8s.pod.name":"a-1"}"#)]).matches(&t));
        assert!(!q(&[("service", "c"), ("minDuration", "1ms")]).matches(&t));
        assert!(
            q(&[
                ("service", "a"),
                ("minDuration", "1ms"),
                ("operation", "GET /")
            ])
            .matches(&t)
        );
        assert!(!q(&[("start", "200")]).matches(&t));
        let bad: BTreeMap<String, String> = [("tags".to_string(), "not json".to_string())].into();
        assert!(Search::from_query(&bad).is_err());
    }
}
