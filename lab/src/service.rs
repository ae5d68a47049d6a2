//! Demo services for the end-to-end tests and the lab: real HTTP/1.1
//! servers in pods that call each other, each with a propagation behaviour
//! the seed lab shows: instrumented with the OpenTelemetry SDK (exporting
//! their own spans over OTLP), dropping headers, passing headers through
//! without a span, sampling against their parent, or speaking B3 only.

use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::tls::Conn;
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::{
        SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::{Sampler, SdkTracerProvider},
};

/// What a service does with the trace context of a request it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Behaviour {
    /// OpenTelemetry SDK: extracts context with its propagator, makes a
    /// server span and a client span per downstream call, injects downstream,
    /// exports its spans over OTLP.
    Instrumented,
    /// OpenTelemetry SDK for incoming requests only: a server span per
    /// request, exported, but downstream calls made with a plain HTTP
    /// client that carries no context (a Python service with the Flask
    /// instrumentation and not the requests one): propagation breaks
    /// inside an instrumented service.
    ServerSpansOnly,
    /// No tracing at all: downstream calls carry no context (the seed's
    /// service B "WITHOUT header propagation"). Without downstream calls,
    /// an uninstrumented leaf (the seed's nginx).
    DropsHeaders,
    /// No tracing, but copies the trace headers onto downstream calls as
    /// they came (a proxy or a mesh sidecar without tracing).
    PassesThrough,
}

/// A context format, as a propagator reads and writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Propagator {
    /// W3C `traceparent` + `baggage` (the OpenTelemetry SDK's propagators).
    W3c,
    /// Zipkin B3 single header `b3`.
    B3,
    /// Jaeger `uber-trace-id`.
    Jaeger,
}

/// The SDK sampler, named as `OTEL_TRACES_SAMPLER` names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerSpec {
    /// `parentbased_always_on`: the SDK's default.
    ParentBasedAlwaysOn,
    /// `always_off`: ignores the remote parent's decision.
    AlwaysOff,
    /// `parentbased_traceidratio:R`: roots sampled at ratio R.
    ParentBasedRatio(f64),
}

impl std::str::FromStr for SamplerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "parentbased_always_on" => Ok(Self::ParentBasedAlwaysOn),
            None if s == "always_off" => Ok(Self::AlwaysOff),
            Some(("parentbased_traceidratio", r)) => r
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .map(Self::ParentBasedRatio)
                .ok_or_else(|| format!("ratio {r:?} is not in 0..=1")),
            _ => Err(format!(
                "{s:?}: expected parentbased_always_on, always_off or parentbased_traceidratio:R"
            )),
        }
    }
}

impl std::fmt::Display for SamplerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ParentBasedAlwaysOn => f.write_str("parentbased_always_on"),
            Self::AlwaysOff => f.write_str("always_off"),
            Self::ParentBasedRatio(r) => write!(f, "parentbased_traceidratio:{r}"),
        }
    }
}

impl SamplerSpec {
    fn sampler(self) -> Sampler {
        match self {
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::ParentBasedRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }
}

/// One service: where it listens, how it behaves, whom it calls.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub port: u16,
    pub behaviour: Behaviour,
    /// The format an instrumented service reads and writes.
    pub propagator: Propagator,
    pub sampler: SamplerSpec,
    /// Downstream URLs `http://ip:port/path`, called in order per request.
    pub downstream: Vec<String>,
    /// Status to answer with.
    pub status: u16,
    /// Time spent per request before answering (a slow service).
    pub delay: Duration,
    /// OTLP/HTTP base endpoint for the SDK, e.g. `http://10.209.3.1:4318`.
    pub otlp: Option<String>,
    /// Serves gRPC (cleartext HTTP/2, any method of [`crate::grpc::SERVICE`])
    /// instead of HTTP/1.1.
    pub grpc: bool,
    /// Bytes of extra metadata (`x-lab-blob`) on each gRPC call it makes: a
    /// header block past HTTP/2's 16 KiB frame, split over CONTINUATION.
    pub metadata_bytes: usize,
    /// Up to this long, at random, before each downstream call: a
    /// handler's work before it calls on, which interleaves concurrent
    /// requests' calls.
    pub think: Duration,
    /// How it serves requests at once: a thread each, or multiplexed on
    /// one async thread.
    pub runtime: Runtime,
    /// Serves HTTPS through the system's OpenSSL ([`crate::tls`]; HTTP/1.1
    /// with a thread per connection). Downstream `https://` URLs are
    /// called over TLS either way.
    pub tls: bool,
}

/// How a service serves several requests at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// A thread per connection (Python threads, Java, Ruby, PHP, C).
    #[default]
    Threads,
    /// One async thread for all (tokio, asyncio, Node, Go): see
    /// [`crate::multiplexed`]. HTTP/1.1 only. A request's task reads its
    /// call's answer itself.
    Async,
    /// The same, but each call's answer is read by a task of its own and
    /// handed to the request's task (hyper's client connection task,
    /// asyncio's protocols): other tasks may run in between.
    AsyncHanded,
}

impl ServiceSpec {
    pub fn new(name: &str, port: u16, behaviour: Behaviour) -> Self {
        Self {
            name: name.to_owned(),
            port,
            behaviour,
            propagator: Propagator::W3c,
            sampler: SamplerSpec::ParentBasedAlwaysOn,
            downstream: Vec::new(),
            status: 200,
            delay: Duration::ZERO,
            otlp: None,
            grpc: false,
            metadata_bytes: 0,
            think: Duration::ZERO,
            runtime: Runtime::Threads,
            tls: false,
        }
    }
}

/// A running service; stops when dropped.
pub struct Service {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Service {
    /// The service serving on `thread` until `stop` is set.
    pub(crate) fn new(stop: Arc<AtomicBool>, thread: JoinHandle<()>) -> Self {
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) struct Headers<'a>(pub(crate) &'a HashMap<String, String>);
impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

pub(crate) struct Out<'a>(pub(crate) &'a mut Vec<(String, String)>);
impl Injector for Out<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

fn context(trace: &str, span: &str, sampled: bool) -> Option<SpanContext> {
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(
        trace,
        span,
        flags,
        true,
        TraceState::default(),
    ))
}

impl Propagator {
    /// The caller's context (and baggage, for W3C), as this format reads it.
    pub fn extract(self, h: &HashMap<String, String>) -> Context {
        let remote = match self {
            Self::W3c => {
                let cx = TraceContextPropagator::new().extract(&Headers(h));
                return BaggagePropagator::new().extract_with_context(&cx, &Headers(h));
            }
            Self::B3 => h.get("b3").and_then(|v| {
                let mut p = v.split('-');
                context(p.next()?, p.next()?, p.next() == Some("1"))
            }),
            Self::Jaeger => h.get("uber-trace-id").and_then(|v| {
                let mut p = v.split(':');
                let (t, s) = (p.next()?, p.next()?);
                let flags = p.nth(1)?;
                context(
                    &format!("{t:0>32}"),
                    &format!("{s:0>16}"),
                    u8::from_str_radix(flags, 16).ok()? & 1 == 1,
                )
            }),
        };
        remote
            .map(|sc| Context::new().with_remote_span_context(sc))
            .unwrap_or_default()
    }

    /// Writes `cx`'s span context (and baggage, for W3C) in this format.
    pub fn inject(self, cx: &Context, out: &mut Vec<(String, String)>) {
        let sc = cx.span().span_context().clone();
        match self {
            Self::W3c => {
                TraceContextPropagator::new().inject_context(cx, &mut Out(out));
                BaggagePropagator::new().inject_context(cx, &mut Out(out));
            }
            Self::B3 => out.push((
                "b3".into(),
                format!(
                    "{}-{}-{}",
                    sc.trace_id(),
                    sc.span_id(),
                    sc.is_sampled() as u8
                ),
            )),
            Self::Jaeger => out.push((
                "uber-trace-id".into(),
                format!(
                    "{}:{}:0:{}",
                    sc.trace_id(),
                    sc.span_id(),
                    sc.is_sampled() as u8
                ),
            )),
        }
    }
}

/// Headers a pass-through proxy copies.
const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "baggage",
    "uber-trace-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
];

/// Spans a lab program could not export (the store down): the lab reads it
/// at `/_lab/stats` to show what the services themselves lost.
pub static EXPORT_FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Calls this service made downstream, by the host it called (a
/// Service's ClusterIP in the lab), and how many of them failed: the lab
/// compares them with the hops tracegap reports on each edge (at
/// `/_lab/stats`). A call counts when it is made, not by its answer.
static CALLS: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

pub(crate) fn count_call(url: &str, failed: bool) {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', ':'])
        .next()
        .unwrap_or_default()
        .to_owned();
    if let Ok(mut calls) = CALLS.lock() {
        let c = calls.entry(host).or_default();
        c.0 += 1;
        c.1 += u64::from(failed);
    }
}

/// Which inbound request each HTTP downstream call was made for: the
/// call's own address (a connection per call) and the trace of the request
/// being served. Ground truth for the tests and the lab, never read by
/// tracegap.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cause {
    pub service: String,
    pub from: SocketAddr,
    pub trace_id: String,
    /// When the call was connected (ns since the Unix epoch): a port is
    /// taken again once its call closed, within one measurement too.
    pub at_unix_ns: u64,
}

/// Causes kept at most (the oldest go).
const MAX_CAUSES: usize = 1 << 20;

static CAUSES: std::sync::Mutex<Vec<Cause>> = std::sync::Mutex::new(Vec::new());

fn record_cause(c: Cause) {
    if let Ok(mut all) = CAUSES.lock() {
        if all.len() >= MAX_CAUSES {
            all.clear();
        }
        all.push(c);
    }
}

/// Every cause recorded in this process (`/_lab/causes` serves the same).
pub fn causes() -> Vec<Cause> {
    CAUSES.lock().map(|c| c.clone()).unwrap_or_default()
}

/// A random duration below `max` (zero for zero).
pub(crate) fn up_to(max: Duration) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    if max.is_zero() {
        return max;
    }
    // RandomState is seeded at random per instance: enough for jitter.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    max.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
}

/// `/_lab/stats`: spans the SDK failed to export, and the calls made per
/// host (`{"export_failed":N,"calls":{"10.96.0.3":{"made":N,"failed":N}}}`).
fn stats_json() -> String {
    let calls: serde_json::Map<String, serde_json::Value> = CALLS
        .lock()
        .map(|c| {
            c.iter()
                .map(|(h, (made, failed))| {
                    (
                        h.clone(),
                        serde_json::json!({"made": made, "failed": failed}),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "export_failed": EXPORT_FAILED.load(Ordering::Relaxed),
        "calls": calls,
    })
    .to_string()
}

/// Counts what the wrapped exporter fails to deliver.
#[derive(Debug)]
struct Counting<E>(E);

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counting<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.0.export(batch).await;
        if r.is_err() {
            EXPORT_FAILED.fetch_add(n, Ordering::Relaxed);
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// An SDK tracer provider for a lab program named `service`, exporting
/// each span as it ends over OTLP/HTTP to `otlp` (no export without it).
/// Build it in the thread whose network namespace the exports should use:
/// the blocking HTTP client starts its own thread here.
pub fn tracer_provider(service: &str, sampler: Sampler, otlp: Option<&str>) -> SdkTracerProvider {
    let mut b = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(
            Resource::builder_empty()
                .with_attributes([KeyValue::new("service.name", service.to_owned())])
                .build(),
        );
    tracegap_agent::remote::install_crypto_provider();
    if let Some(otlp) = otlp
        && let Some(client) = exporter_client(otlp)
        && let Ok(exporter) = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            // Fail fast when the store is down: a lab program must not
            // stall its requests on its own telemetry.
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .with_endpoint(format!("{}/v1/traces", otlp.trim_end_matches('/')))
            .with_timeout(Duration::from_secs(3))
            .build()
    {
        // Exports as each span ends: the store sees spans at once.
        b = b.with_simple_exporter(Counting(exporter));
    }
    b.build()
}

/// The exporter's HTTP client: over TLS for an https:// store, trusting
/// the CA and presenting the client certificate that the OpenTelemetry
/// variables name (`tracegap-lab run --secure`), as an SDK would. None,
/// said once, when they cannot be read: the program runs unexported.
fn exporter_client(otlp: &str) -> Option<reqwest::blocking::Client> {
    let b = reqwest::blocking::Client::builder().timeout(Duration::from_secs(3));
    let b = if otlp.starts_with("https://") {
        let tls = tracegap_agent::remote::TlsFiles::from_otlp_env()
            .read()
            .and_then(|pem| pem.rustls(&[b"http/1.1"]));
        match tls {
            Ok(config) => b.tls_backend_preconfigured(config),
            Err(e) => {
                eprintln!("no export to {otlp}: {e}");
                return None;
            }
        }
    } else {
        b
    };
    b.build()
        .map_err(|e| eprintln!("no export to {otlp}: {e}"))
        .ok()
}

impl ServiceSpec {
    pub(crate) fn provider(&self) -> Option<SdkTracerProvider> {
        let otlp = self.otlp.as_deref()?;
        Some(tracer_provider(
            &self.name,
            self.sampler.sampler(),
            Some(otlp),
        ))
    }

    pub(crate) fn instrumented(&self) -> bool {
        matches!(
            self.behaviour,
            Behaviour::Instrumented | Behaviour::ServerSpansOnly
        )
    }

    /// Serves HTTP/1.x, a thread per connection, in the current thread's
    /// network namespace until `stop` is set; `ready` is told whether
    /// listening worked. (See [`crate::serve`] for every kind of server.)
    pub fn serve_threads(
        self,
        provider: Option<SdkTracerProvider>,
        stop: &Arc<AtomicBool>,
        ready: impl FnOnce(std::io::Result<()>),
    ) {
        let listener = match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, self.port)))
        {
            Ok(l) => l,
            Err(e) => return ready(Err(e)),
        };
        if let Err(e) = listener.set_nonblocking(true) {
            return ready(Err(e));
        }
        ready(Ok(()));
        let spec = Arc::new(self);
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let (spec, provider, s) = (spec.clone(), provider.clone(), stop.clone());
                    workers.retain(|w| !w.is_finished());
                    workers.push(std::thread::spawn(move || {
                        // The handshake in the connection's own thread.
                        let conn = if spec.tls {
                            let _ = conn.set_nonblocking(false);
                            // A failed handshake (a readiness probe's bare
                            // connect) is the caller's to report.
                            match crate::tls::accept(conn) {
                                Ok(c) => c,
                                Err(_) => return,
                            }
                        } else {
                            Conn::Plain(conn)
                        };
                        serve(conn, &spec, provider.as_ref(), &s)
                    }));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => break,
            }
        }
        for w in workers {
            let _ = w.join();
        }
        if let Some(p) = provider {
            let _ = p.shutdown();
        }
    }
}

fn read_head(conn: &mut impl Read, buf: &mut Vec<u8>, stop: &AtomicBool) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = header_map(&head)
                .get("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..end + 4 + len);
            return Some(head);
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

pub(crate) fn header_map(head: &str) -> HashMap<String, String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// What a request came as: an HTTP/1.1 GET of a path, or a gRPC call of
/// `/pkg.Service/Method`.
pub(crate) enum Inbound<'a> {
    Http(&'a str),
    Grpc(&'a str),
}

/// One request being served: the caller's context, the SDK's server span
/// (when instrumented), and what the handler knows to call downstream.
pub(crate) struct Serving<'a> {
    spec: &'a ServiceSpec,
    headers: &'a HashMap<String, String>,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// The server span's context, to end once answered.
    pub server_cx: Option<Context>,
    /// The inbound trace, for the causes the service records.
    inbound_trace: Option<String>,
}

impl<'a> Serving<'a> {
    /// Reads the caller's context from `headers` (HTTP headers or gRPC
    /// metadata) and starts the server span.
    pub(crate) fn begin(
        spec: &'a ServiceSpec,
        provider: Option<&SdkTracerProvider>,
        headers: &'a HashMap<String, String>,
        inbound: &Inbound<'_>,
        peer: Option<SocketAddr>,
    ) -> Self {
        let parent = spec.propagator.extract(headers);
        let tracer = provider.map(|p| p.tracer("tracegap-demo"));
        let server_cx = tracer.as_ref().map(|t| {
            // The HTTP and RPC server conventions' attributes, as
            // instrumentation libraries set them: the peer is what tells
            // one connection's span from another's.
            let (name, mut attributes) = match inbound {
                Inbound::Http(path) => (
                    format!("GET {path}"),
                    vec![
                        KeyValue::new("http.request.method", "GET"),
                        KeyValue::new("url.path", path.to_string()),
                    ],
                ),
                Inbound::Grpc(path) => {
                    let (service, method) = path
                        .trim_start_matches('/')
                        .split_once('/')
                        .unwrap_or((path, ""));
                    (
                        format!("{service}/{method}"),
                        vec![
                            KeyValue::new("rpc.system", "grpc"),
                            KeyValue::new("rpc.service", service.to_owned()),
                            KeyValue::new("rpc.method", method.to_owned()),
                        ],
                    )
                }
            };
            attributes.push(KeyValue::new("server.port", i64::from(spec.port)));
            if let Some(peer) = peer {
                attributes.push(KeyValue::new(
                    "client.address",
                    peer.ip().to_canonical().to_string(),
                ));
                attributes.push(KeyValue::new("client.port", i64::from(peer.port())));
            }
            let span = t
                .span_builder(name)
                .with_kind(SpanKind::Server)
                .with_attributes(attributes)
                .start_with_context(t, &parent);
            parent.with_span(span)
        });
        let inbound_trace = {
            let sc = parent.span().span_context().clone();
            sc.is_valid().then(|| sc.trace_id().to_string())
        };
        Self {
            spec,
            headers,
            tracer,
            server_cx,
            inbound_trace,
        }
    }

    /// A downstream call's client span (when it makes one) and the
    /// headers it sends, as the service behaves.
    pub(crate) fn outbound(&self, url: &str) -> (Option<Context>, Vec<(String, String)>) {
        let mut out = Vec::new();
        let client_cx = match (&self.tracer, &self.server_cx) {
            (_, _) if self.spec.behaviour == Behaviour::ServerSpansOnly => None,
            (Some(t), Some(cx)) => {
                let name = match url.starts_with("grpc://") {
                    true => path_of(url).trim_start_matches('/').to_owned(),
                    false => format!("GET {}", path_of(url)),
                };
                let span = t
                    .span_builder(name)
                    .with_kind(SpanKind::Client)
                    .start_with_context(t, cx);
                Some(cx.with_span(span))
            }
            _ => None,
        };
        match (self.spec.behaviour, &client_cx) {
            (_, Some(cx)) => self.spec.propagator.inject(cx, &mut out),
            (Behaviour::PassesThrough, None) => {
                for h in TRACE_HEADERS {
                    if let Some(v) = self.headers.get(h) {
                        out.push((h.to_owned(), v.clone()));
                    }
                }
            }
            _ => {}
        }
        (client_cx, out)
    }

    /// Notes that the call from `from` was made for this request (the
    /// truth the causality measurement checks tracegap against).
    pub(crate) fn caused(&self, from: SocketAddr) {
        if let Some(t) = self.inbound_trace.as_ref() {
            record_cause(Cause {
                service: self.spec.name.clone(),
                from,
                trace_id: t.clone(),
                at_unix_ns: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            });
        }
    }
}

/// Serves one request as `spec` behaves, whatever carried it: the caller's
/// context read from `headers` (HTTP headers or gRPC metadata), the SDK's
/// server span (returned, to end once answered), each downstream call with
/// its client span and context, then the delay.
pub(crate) fn handle(
    spec: &ServiceSpec,
    provider: Option<&SdkTracerProvider>,
    headers: &HashMap<String, String>,
    inbound: Inbound<'_>,
    peer: Option<SocketAddr>,
) -> Option<Context> {
    let serving = Serving::begin(spec, provider, headers, &inbound, peer);
    let path = match inbound {
        Inbound::Http(p) | Inbound::Grpc(p) => p,
    };
    for url in &spec.downstream {
        let (client_cx, out) = serving.outbound(url);
        std::thread::sleep(up_to(spec.think));
        let called = if url.starts_with("grpc://") {
            crate::grpc::call(url, &out, spec.metadata_bytes).map(|_| ())
        } else {
            call_from(url, &out, |from| serving.caused(from))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        count_call(url, called.is_err());
        if let Err(e) = called {
            eprintln!("{}: calling {url} for {path}: {e}", spec.name);
        }
        if let Some(cx) = client_cx {
            cx.span().end();
        }
    }
    if !spec.delay.is_zero() {
        std::thread::sleep(spec.delay);
    }
    serving.server_cx
}

fn serve(
    mut conn: Conn,
    spec: &ServiceSpec,
    provider: Option<&SdkTracerProvider>,
    stop: &AtomicBool,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut conn, &mut buf, stop) {
        let headers = header_map(&head);
        let target = head.split(' ').nth(1).unwrap_or("/").to_owned();
        if target == "/_lab/stats" || target == "/_lab/causes" {
            let body = if target == "/_lab/stats" {
                stats_json()
            } else {
                serde_json::to_string(&causes()).unwrap_or_default()
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes());
            return;
        }
        let path = target.split('?').next().unwrap_or("/").to_owned();
        let peer = conn.peer_addr().ok();
        let server_cx = handle(spec, provider, &headers, Inbound::Http(&path), peer);
        if let Some(cx) = server_cx {
            cx.span().end();
        }
        if conn.write_all(answer(spec).as_bytes()).is_err() {
            return;
        }
        if headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            return;
        }
    }
}

/// The answer to a request `spec` served: its status and a greeting.
pub(crate) fn answer(spec: &ServiceSpec) -> String {
    let body = format!("{} says hi\n", spec.name);
    let reason = if spec.status < 400 { "OK" } else { "Error" };
    format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        spec.status,
        body.len()
    )
}

/// The path of an `http://authority/path` (or `grpc://`) URL.
pub fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/').map_or("/", |i| &rest[i..])
}

/// GET `url` (http://ip:port/path) with `headers`, reading the whole answer.
pub fn call(url: &str, headers: &[(String, String)]) -> std::io::Result<u16> {
    call_from(url, headers, |_| {})
}

/// As [`call`]; `connected` is told the call's own address before the
/// request is sent.
fn call_from(
    url: &str,
    headers: &[(String, String)],
    connected: impl FnOnce(SocketAddr),
) -> std::io::Result<u16> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("http://").unwrap_or(url)),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    // A name (a Kubernetes Service) or an address.
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address"))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut c = if tls {
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        crate::tls::connect(tcp, host)?
    } else {
        Conn::Plain(tcp)
    };
    connected(c.local_addr()?);
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes())?;
    let mut answer = Vec::new();
    c.read_to_end(&mut answer)?;
    let status = String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(status)
}
