//! Exporting synthetic spans over OTLP without ever holding up the data
//! path.
//!
//! The data path only *offers* a span to a bounded queue; a full queue drops
//! the span and counts it. One task drains the queue in batches and hands
//! them to a few exporters (two by default), so the next batch is encoded
//! while the collector reads the last one. Each groups its batch by service
//! (every service is its own OTLP resource, so Jaeger lists the hop under
//! the callee) and exports through opentelemetry-otlp (gRPC or
//! HTTP/protobuf). Each attempt is bounded in time by tracegap itself (a
//! collector that accepts connections and never answers must not hold an
//! exporter forever), and a failed attempt gets a fresh connection. A
//! failed export is retried with exponential back-off a bounded number of
//! times; meanwhile new spans wait in the queue or are dropped when it is
//! full. Memory is bounded by the queue, the batch being filled, one batch
//! per exporter and one handed over, whether the collector is down, slow or
//! fine, and export resumes on its own when the collector returns.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use opentelemetry::{
    InstrumentationScope,
    trace::{SpanContext, Status, TraceFlags, TraceState},
};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _,
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkError,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::{
    backend::{BackendStatus, Handshake, credentials_refused},
    gap::span::SyntheticSpan,
    metrics::Metrics,
    remote::Pem,
};

/// Errors from setting up the exporter.
#[derive(Debug, Error)]
pub enum Error {
    /// opentelemetry-otlp refused the configuration.
    #[error("building the OTLP exporter: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A certificate or key the OTLP variables name.
    #[error("the OTLP exporter's TLS files: {0}")]
    Tls(#[from] crate::remote::Error),
    #[error("the OTLP/HTTP client: {0}")]
    Client(String),
}

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317).
    #[value(name = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// How spans are exported.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub protocol: OtlpProtocol,
    /// None: opentelemetry-otlp reads `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`
    /// or uses the default for the protocol.
    pub endpoint: Option<String>,
    /// None: `OTEL_EXPORTER_OTLP_TIMEOUT`, or 10 s.
    pub timeout: Option<Duration>,
    /// Spans waiting for export at most.
    pub queue: usize,
    /// Spans per export call at most.
    pub batch: usize,
    /// Export calls in flight at most (one exporter, one connection each).
    pub concurrency: usize,
    /// A partial batch is sent after this long.
    pub interval: Duration,
    /// Attempts per batch before it is dropped.
    pub attempts: u32,
    /// First retry delay; doubles per attempt up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// CA and client certificate for TLS to the collector (default: the
    /// `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`, `..._CLIENT_CERTIFICATE`,
    /// `..._CLIENT_KEY` files).
    pub tls: crate::remote::TlsFiles,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            protocol: OtlpProtocol::Grpc,
            endpoint: None,
            timeout: None,
            queue: 8192,
            batch: 2048,
            concurrency: 2,
            interval: Duration::from_secs(1),
            attempts: 5,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            tls: crate::remote::TlsFiles::default(),
        }
    }
}

/// The data path's side of the exporter: offering never waits.
#[derive(Clone)]
pub struct SpanQueue {
    tx: mpsc::Sender<SyntheticSpan>,
    metrics: Arc<Metrics>,
}

impl SpanQueue {
    /// A queue whose spans go to the receiver returned, not to a
    /// collector ([`crate::replay`]).
    pub(crate) fn channel(
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Receiver<SyntheticSpan>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, metrics }, rx)
    }

    /// Queues a span; when the queue is full the span is dropped and counted.
    pub fn offer(&self, span: SyntheticSpan) {
        match self.tx.try_send(span) {
            Ok(()) => {
                self.metrics.export_queue.inc();
            }
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.dropped("queue_full"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.metrics.dropped("shutdown"),
        };
    }
}

/// Builds the OTLP exporter and starts the export task. The task ends when
/// every [`SpanQueue`] is dropped, after a last flush.
pub fn start(
    config: ExportConfig,
    metrics: Arc<Metrics>,
    status: Arc<BackendStatus>,
) -> Result<(SpanQueue, tokio::task::JoinHandle<()>), Error> {
    // The TLS files are checked here, before anything is exported: a wrong
    // path is an error at start, not a failed export every second.
    let tls = config.tls.read()?;
    let exporters = (0..config.concurrency.max(1))
        .map(|_| build(&config, &tls))
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    tokio::spawn(first_check(config.clone(), tls, status.clone()));
    let task = tokio::spawn(run(exporters, rx, config, metrics.clone(), status));
    Ok((SpanQueue { tx, metrics }, task))
}

/// An exporter with the TLS files as `tls` holds them (read again for a
/// fresh connection after a failure, which picks up certificates rotated
/// on disk: cert-manager's).
fn build(config: &ExportConfig, tls: &Pem) -> Result<opentelemetry_otlp::SpanExporter, Error> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    Ok(match config.protocol {
        OtlpProtocol::Grpc => {
            // One retry layer only, ours (bounded, counted): the library's
            // own retries would multiply the attempts and hide the errors.
            let mut b = builder
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_retry_policy(RetryPolicy::disabled());
            if grpc_tls(config.endpoint.as_deref(), |v| std::env::var(v).ok()) {
                b = b.with_tls_config(tls.tonic());
            }
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e.clone());
            }
            if let Some(t) = config.timeout {
                b = b.with_timeout(t);
            }
            b.build()?
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = builder
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_retry_policy(RetryPolicy::disabled())
                .with_http_client(
                    tls.http_client()?
                        .build()
                        .map_err(|e| Error::Client(e.to_string()))?,
                );
            if let Some(e) = &config.endpoint {
                // An explicit endpoint is used as is by the library; the
                // OTLP convention is a base URL with the signal path added.
                b = b.with_endpoint(traces_url(e));
            }
            if let Some(t) = config.timeout {
                b = b.with_timeout(t);
            }
            b.build()?
        }
    })
}

/// Asks a TLS collector at start whether it takes the agent's TLS (its
/// certificate verified, ours accepted), before there is anything to
/// export: a refusal makes the agent not ready (see [`crate::backend`])
/// until an export succeeds.
async fn first_check(config: ExportConfig, tls: Pem, status: Arc<BackendStatus>) {
    if let Some(Handshake::Refused(why)) = handshake(&config, &tls).await {
        let collector = collector(&config);
        tracing::warn!(%collector, %why, "the collector refuses the agent's TLS: nothing is exported until it takes it (OTEL_EXPORTER_OTLP_CERTIFICATE, ..._CLIENT_CERTIFICATE, ..._CLIENT_KEY)");
        status.refused_at_start(format!("collector {collector}: {why}"));
    }
}

/// The collector as the settings name it, for messages.
fn collector(config: &ExportConfig) -> String {
    endpoint(config).unwrap_or_else(|| "(the default endpoint)".to_owned())
}

/// The endpoint set here or by the OpenTelemetry variables.
fn endpoint(config: &ExportConfig) -> Option<String> {
    config
        .endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty())
}

/// A TLS handshake with the collector, if it is reached over TLS; None
/// when it is not, or the handshake succeeds.
async fn handshake(config: &ExportConfig, tls: &Pem) -> Option<Handshake> {
    let e = endpoint(config)?;
    let (alpn, over_tls): (&[u8], bool) = match config.protocol {
        OtlpProtocol::Grpc => (b"h2", grpc_tls(Some(&e), |v| std::env::var(v).ok())),
        OtlpProtocol::HttpProtobuf => (b"http/1.1", e.to_ascii_lowercase().starts_with("https://")),
    };
    if !over_tls {
        return None;
    }
    let (host, port) = host_port(&e)?;
    let rustls = tls.rustls(&[alpn]).ok()?;
    let limit = config.timeout.unwrap_or(Duration::from_secs(5));
    tokio::task::spawn_blocking(move || crate::backend::tls_handshake(&host, port, rustls, limit))
        .await
        .ok()?
        .err()
}

/// OTLP's registered ports (gRPC, HTTP): a TLS connection to either is
/// taken for an export.
pub const OTLP_PORTS: [u16; 2] = [4317, 4318];

/// The addresses of the collector the agent exports to (its endpoint's
/// host, resolved once at start): the services of a cluster usually
/// export to the same one, and a TLS connection to it from a pod is taken
/// for an export whose answer cannot be read.
pub async fn collector_addresses(config: &ExportConfig) -> Vec<std::net::IpAddr> {
    let Some((host, port)) = endpoint(config).and_then(|e| host_port(&e)) else {
        return Vec::new();
    };
    match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(addrs) => addrs.map(|a| a.ip()).collect(),
        Err(e) => {
            tracing::debug!(%host, error = %e, "resolving the collector");
            Vec::new()
        }
    }
}

/// The host (an IPv6 address without its brackets) and port of an
/// endpoint URL, with or without a scheme; 443 for https without a port,
/// 4317 otherwise.
fn host_port(endpoint: &str) -> Option<(String, u16)> {
    let uri: axum::http::Uri = endpoint.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let https = uri
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"));
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 4317 });
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// Why the collector cannot be reached, when the exporter's error does not
/// say, and whether it refused the agent: for a TLS collector, a handshake
/// of our own; for OTLP/HTTP (whose library reports a refused certificate,
/// a reset and a refused connection alike as "network error"), one request
/// of our own to the same URL, with the same TLS, and its error's chain.
async fn cause(config: &ExportConfig, tls: &Pem) -> Option<(String, bool)> {
    match handshake(config, tls).await {
        Some(Handshake::Refused(why)) => return Some((why, true)),
        Some(Handshake::Away(why)) => return Some((why, false)),
        None => {}
    }
    if config.protocol != OtlpProtocol::HttpProtobuf {
        return None;
    }
    let url = traces_url(config.endpoint.as_deref()?);
    let client = tls
        .http_client()
        .ok()?
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let e = client.post(url).send().await.err()?;
    Some((crate::remote::error_chain(&e), false))
}

/// The OTLP/HTTP traces URL for a base endpoint (the signal path added).
fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/traces") {
        e.to_owned()
    } else {
        format!("{e}/v1/traces")
    }
}

/// Whether the gRPC endpoint is reached over TLS, as the OpenTelemetry
/// variables say: an `https://` endpoint, or one without a scheme unless
/// `OTEL_EXPORTER_OTLP_(TRACES_)INSECURE=true`; the default endpoint
/// (`http://localhost:4317`) and `http://` ones are not.
fn grpc_tls(endpoint: Option<&str>, var: impl Fn(&str) -> Option<String>) -> bool {
    let Some(e) = endpoint
        .map(str::to_owned)
        .or_else(|| var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return false;
    };
    let e = e.to_ascii_lowercase();
    if e.starts_with("https://") {
        return true;
    }
    if e.contains("://") {
        return false;
    }
    !var("OTEL_EXPORTER_OTLP_TRACES_INSECURE")
        .or_else(|| var("OTEL_EXPORTER_OTLP_INSECURE"))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("tracegap")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// The SDK's span record for a synthetic span.
pub fn span_data(s: SyntheticSpan, scope: &InstrumentationScope) -> SpanData {
    let parent_valid = s.parent_span_id != opentelemetry::trace::SpanId::INVALID;
    let mut links = SpanLinks::default();
    links.links = s
        .links
        .iter()
        .map(|(t, sp, kind)| {
            opentelemetry::trace::Link::new(
                SpanContext::new(*t, *sp, TraceFlags::SAMPLED, true, TraceState::default()),
                vec![opentelemetry::KeyValue::new("tracegap.link.kind", *kind)],
                0,
            )
        })
        .collect();
    SpanData {
        span_context: SpanContext::new(
            s.trace_id,
            s.span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: s.parent_span_id,
        parent_span_is_remote: parent_valid,
        span_kind: s.kind,
        name: s.name.into(),
        start_time: s.start,
        end_time: s.end,
        attributes: s.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links,
        status: match s.error {
            Some(e) => Status::error(e),
            None => Status::Unset,
        },
        instrumentation_scope: scope.clone(),
    }
}

async fn run(
    exporters: Vec<opentelemetry_otlp::SpanExporter>,
    mut rx: mpsc::Receiver<SyntheticSpan>,
    config: ExportConfig,
    metrics: Arc<Metrics>,
    status: Arc<BackendStatus>,
) {
    // Capacity 1: one batch handed over while every exporter is busy; past
    // that, spans wait in (or are dropped from) the bounded queue.
    let (batches, handed) = mpsc::channel::<Vec<SyntheticSpan>>(1);
    let handed = Arc::new(tokio::sync::Mutex::new(handed));
    let workers: Vec<_> = exporters
        .into_iter()
        .map(|exporter| {
            tokio::spawn(export_worker(
                exporter,
                handed.clone(),
                config.clone(),
                metrics.clone(),
                status.clone(),
            ))
        })
        .collect();
    let mut batch = Vec::with_capacity(config.batch);
    loop {
        let open = fill(&mut rx, &mut batch, &config, &metrics).await;
        if !batch.is_empty() && batches.send(std::mem::take(&mut batch)).await.is_err() {
            break;
        }
        if !open {
            break;
        }
    }
    drop(batches);
    for w in workers {
        let _ = w.await;
    }
}

/// Exports the batches it is handed until the hand-over closes.
async fn export_worker(
    mut exporter: opentelemetry_otlp::SpanExporter,
    handed: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<SyntheticSpan>>>>,
    config: ExportConfig,
    metrics: Arc<Metrics>,
    status: Arc<BackendStatus>,
) {
    let scope = scope();
    loop {
        // The lock is held only while waiting for a batch, not while
        // exporting it: the next worker takes the next batch.
        let Some(batch) = handed.lock().await.recv().await else {
            break;
        };
        export_batch(&mut exporter, batch, &config, &metrics, &status, &scope).await;
    }
    if let Err(e) = exporter.shutdown() {
        tracing::debug!(error = %e, "shutting the OTLP exporter down");
    }
}

/// Waits for the first span, then gathers more until the batch is full or
/// `interval` has passed. Returns false once the queue is closed and empty.
async fn fill(
    rx: &mut mpsc::Receiver<SyntheticSpan>,
    batch: &mut Vec<SyntheticSpan>,
    config: &ExportConfig,
    metrics: &Metrics,
) -> bool {
    // The queue gauge counts what is in the queue: each span leaves it here.
    let take = |batch: &mut Vec<SyntheticSpan>, s| {
        metrics.export_queue.dec();
        batch.push(s);
    };
    match rx.recv().await {
        Some(s) => take(batch, s),
        None => return false,
    }
    let deadline = tokio::time::Instant::now() + config.interval;
    while batch.len() < config.batch {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(s)) => take(batch, s),
            Ok(None) => return false,
            Err(_) => break,
        }
    }
    true
}

async fn export_batch(
    exporter: &mut opentelemetry_otlp::SpanExporter,
    batch: Vec<SyntheticSpan>,
    config: &ExportConfig,
    metrics: &Metrics,
    status: &BackendStatus,
    scope: &InstrumentationScope,
) {
    // One resource per service: Jaeger files spans under service.name.
    type Key = (String, Option<String>, Option<String>);
    let mut groups: BTreeMap<Key, (Vec<opentelemetry::KeyValue>, Vec<SpanData>)> = BTreeMap::new();
    for s in batch {
        let key = (
            s.identity.service.clone(),
            s.identity.namespace.clone(),
            s.identity.pod.clone(),
        );
        let resource = s.identity.resource();
        groups
            .entry(key)
            .or_insert_with(|| (resource, Vec::new()))
            .1
            .push(span_data(s, scope));
    }
    for (_, (resource, spans)) in groups {
        let resource = Resource::builder_empty().with_attributes(resource).build();
        let n = spans.len() as u64;
        let mut delay = config.backoff;
        let mut attempt = 1;
        let limit = attempt_limit(config);
        loop {
            exporter.set_resource(&resource);
            // Bounded here, whatever the transport does: a collector that
            // accepts connections and never speaks can hold a connection
            // attempt longer than the library's request timeout.
            let result = tokio::time::timeout(limit, exporter.export(spans.clone()))
                .await
                .unwrap_or(Err(OTelSdkError::Timeout(limit)));
            match result {
                Ok(()) => {
                    metrics.spans_exported.inc_by(n);
                    status.reached();
                    break;
                }
                Err(e) => {
                    metrics.export_errors.inc();
                    // Read once, for the diagnosis and the fresh connection.
                    let tls = config.tls.read();
                    let cause = match &tls {
                        Ok(tls) => cause(config, tls).await,
                        Err(_) => None,
                    };
                    let (why, refused) = match cause {
                        Some((cause, refused)) => (format!("{e}: {cause}"), refused),
                        None => (e.to_string(), false),
                    };
                    let refused = refused || credentials_refused(&e.to_string());
                    status.failed(format!("collector {}: {why}", collector(config)), refused);
                    // A fresh connection for the next attempt: the failed
                    // one may be wedged (half-open, or stuck connecting).
                    match tls.map_err(Error::from).and_then(|tls| build(config, &tls)) {
                        Ok(fresh) => {
                            let _ = exporter.shutdown();
                            *exporter = fresh;
                        }
                        Err(e) => tracing::debug!(error = %e, "rebuilding the OTLP exporter"),
                    }
                    if attempt >= config.attempts {
                        tracing::warn!(error = %e, spans = n, attempt, "OTLP export failed; dropping the batch");
                        metrics.dropped_n("export_failed", n);
                        break;
                    }
                    tracing::debug!(error = %e, spans = n, attempt, ?delay, "OTLP export failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(config.max_backoff);
                    attempt += 1;
                }
            }
        }
    }
}

/// How long one export attempt may take in all: the request timeout
/// (`OTEL_EXPORTER_OTLP_TIMEOUT`'s default, 10 s, when not set here) and a
/// second for connecting.
fn attempt_limit(config: &ExportConfig) -> Duration {
    config.timeout.unwrap_or(Duration::from_secs(10)) + Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoints_host_and_port_for_the_handshake() {
        let hp = host_port;
        assert_eq!(
            hp("https://collector:4317"),
            Some(("collector".into(), 4317))
        );
        assert_eq!(
            hp("https://collector/v1/traces"),
            Some(("collector".into(), 443))
        );
        assert_eq!(
            hp("collector.observability:4317"),
            Some(("collector.observability".into(), 4317))
        );
        assert_eq!(
            hp("https://[fd00::1]:4318/"),
            Some(("fd00::1".into(), 4318))
        );
        assert_eq!(hp("https://[fd00::1]"), Some(("fd00::1".into(), 443)));
        assert_eq!(
            hp("https://user@collector:4317"),
            Some(("collector".into(), 4317))
        );
        assert_eq!(hp("https://:4317"), None);
    }

    #[test]
    fn grpc_goes_over_tls_as_the_opentelemetry_variables_say() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let none = vars(&[]);
        assert!(grpc_tls(Some("https://collector:4317"), none));
        assert!(!grpc_tls(Some("http://collector:4317"), none));
        // Nothing set: the library's http://localhost:4317.
        assert!(!grpc_tls(None, none));
        assert!(grpc_tls(
            None,
            vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "HTTPS://collector:4317")])
        ));
        let traces_first = vars(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://b:4317"),
        ]);
        assert!(!grpc_tls(None, traces_first));
        // No scheme: TLS unless insecure.
        assert!(grpc_tls(Some("collector:4317"), none));
        assert!(!grpc_tls(
            Some("collector:4317"),
            vars(&[("OTEL_EXPORTER_OTLP_INSECURE", "true")])
        ));
    }
}
