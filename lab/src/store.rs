//! A real OTLP receiver for the tests, built from the official OTLP protobuf
//! definitions (opentelemetry-proto): gRPC `TraceService/Export` and
//! OTLP/HTTP `POST /v1/traces` with protobuf bodies. It keeps every span it
//! receives with its resource, and can be stopped and started again on the
//! same ports (a collector that goes away and comes back).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::Span,
};
use prost::Message as _;

/// A span as received, with its resource's `service.name`.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub resource: Vec<KeyValue>,
    pub span: Span,
    /// "grpc" or "http".
    pub via: &'static str,
    /// When the store received it.
    pub arrived: std::time::SystemTime,
}

impl Received {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A span attribute as text (strings as is, others formatted).
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }

    pub fn resource_attr(&self, key: &str) -> Option<String> {
        attr(&self.resource, key)
    }

    pub fn synthetic(&self) -> bool {
        self.attr("tracegap.synthetic").as_deref() == Some("true")
    }

    pub fn gap(&self) -> Option<String> {
        self.attr("tracegap.gap")
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn text(v: &AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// A span link's `tracegap.link.kind` (`callee_trace`, `candidate`).
pub fn link_kind(link: &opentelemetry_proto::tonic::trace::v1::span::Link) -> Option<String> {
    attr(&link.attributes, "tracegap.link.kind")
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(text)
}

type Store = Arc<Mutex<Vec<Received>>>;

/// Where received batches are passed on (a Jaeger of the user's own), if
/// anywhere.
type Forward = Arc<Mutex<Option<std::sync::mpsc::SyncSender<ExportTraceServiceRequest>>>>;

/// Batches waiting to be passed on at most; past it they are not.
const FORWARD_QUEUE: usize = 1024;
/// The name of the receiver's thread (its runtime serves OTLP and the
/// query API on it).
pub const RECEIVER_THREAD: &str = "lab-receiver";

fn store(spans: &Store, forward: &Forward, req: ExportTraceServiceRequest, via: &'static str) {
    if let Ok(f) = forward.lock()
        && let Some(tx) = f.as_ref()
    {
        // A slow or absent Jaeger must not hold up the lab.
        let _ = tx.try_send(req.clone());
    }
    let Ok(mut s) = spans.lock() else { return };
    let arrived = std::time::SystemTime::now();
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let service = attr(&resource, "service.name").unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                s.push(Received {
                    service: service.clone(),
                    resource: resource.clone(),
                    span,
                    via,
                    arrived,
                });
            }
        }
    }
}

/// Set while the store refuses exports (a collector whose backend is
/// down: it answers, and says no).
type Refusing = Arc<std::sync::atomic::AtomicBool>;

/// Keeps a stopped receiver's port bound without listening: connections
/// to it are refused, as to a collector that is down, but the port cannot
/// be handed to another socket's connect() in the meantime (seen in CI: a
/// port chosen from the ephemeral range, let go of for seconds, was taken
/// by some test's outgoing connection and the receiver could not come
/// back). Both ends set SO_REUSEADDR, so a listener binds beside it.
fn hold(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Binds `addr` again after [`Receiver::stop`]: a listener closed there
/// a moment ago (a test's black hole) may leave connections closing that
/// refuse the bind for a while ("Address already in use", seen once in
/// CI), so it is tried for up to 5 s.
async fn rebind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            bound => return bound,
        }
    }
}

fn refusing(r: &Refusing) -> bool {
    r.load(std::sync::atomic::Ordering::Relaxed)
}

struct Grpc(Store, Forward, Refusing);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if refusing(&self.2) {
            return Err(tonic::Status::unavailable("the trace store is down"));
        }
        store(&self.0, &self.1, request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver. Runs on its own thread and runtime; `stop` and `start`
/// take it down and bring it back on the same ports.
pub struct Receiver {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    spans: Store,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
    /// When it was stopped and resumed: spans sent then were lost.
    down: Arc<Mutex<Vec<Downtime>>>,
    forward: Forward,
    refusing: Refusing,
    /// While stopped: the ports kept bound, not listening (see [`hold`]).
    held: Vec<tokio::net::TcpSocket>,
    /// Served over TLS (both ports) when set.
    tls: Option<ServerTls>,
}

pub use crate::pki::ServerTls;
use crate::pki::TlsListener;

/// What readers of the store share with it (the query API).
#[derive(Clone, Default)]
pub struct Shared {
    pub spans: Arc<Mutex<Vec<Received>>>,
    pub down: Arc<Mutex<Vec<Downtime>>>,
}

impl Shared {
    /// Every span so far, and the store's downtimes.
    pub fn snapshot(&self) -> (Vec<Received>, Vec<Downtime>) {
        let spans = self.spans.lock().map(|s| s.clone()).unwrap_or_default();
        let down = self.down.lock().map(|d| d.clone()).unwrap_or_default();
        (spans, down)
    }
}

/// A time the store was down (`until` None: still down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Downtime {
    pub from: std::time::SystemTime,
    pub until: Option<std::time::SystemTime>,
}

impl Receiver {
    /// Starts on `ip` with ports chosen by the kernel.
    pub fn start(ip: std::net::IpAddr) -> anyhow::Result<Self> {
        Self::start_with(ip, None)
    }

    /// As [`Receiver::start`], both ports over TLS.
    pub fn start_tls(ip: std::net::IpAddr, tls: ServerTls) -> anyhow::Result<Self> {
        Self::start_with(ip, Some(tls))
    }

    fn start_with(ip: std::net::IpAddr, tls: Option<ServerTls>) -> anyhow::Result<Self> {
        // Both held open until served: a port let go of between choosing
        // and serving can be chosen again, by the other one or by another
        // test ("Address already in use").
        let grpc = std::net::TcpListener::bind((ip, 0))?;
        let http = std::net::TcpListener::bind((ip, 0))?;
        let mut r = Self {
            grpc: grpc.local_addr()?,
            http: http.local_addr()?,
            spans: Store::default(),
            forward: Forward::default(),
            running: None,
            down: Arc::default(),
            refusing: Refusing::default(),
            held: Vec::new(),
            tls,
        };
        r.serve(Some((grpc, http)))?;
        Ok(r)
    }

    /// Starts serving again (after [`Receiver::stop`]), on the same ports.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.serve(None)?;
        self.held.clear();
        if let Ok(mut down) = self.down.lock()
            && let Some(d) = down.last_mut().filter(|d| d.until.is_none())
        {
            d.until = Some(std::time::SystemTime::now());
        }
        Ok(())
    }

    /// The times it was down (stopped until resumed).
    pub fn downtimes(&self) -> Vec<Downtime> {
        self.down.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The spans and downtimes, shared with readers that outlive a call.
    pub fn shared(&self) -> Shared {
        Shared {
            spans: self.spans.clone(),
            down: self.down.clone(),
        }
    }

    fn serve(
        &mut self,
        listeners: Option<(std::net::TcpListener, std::net::TcpListener)>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(self.running.is_none(), "already running");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (grpc, http, spans) = (self.grpc, self.http, self.spans.clone());
        let forward = self.forward.clone();
        let refuse = self.refusing.clone();
        let tls = self.tls.clone();
        let serve = move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = async {
                    Ok::<_, anyhow::Error>(match listeners {
                        Some((g, h)) => {
                            g.set_nonblocking(true)?;
                            h.set_nonblocking(true)?;
                            (
                                tokio::net::TcpListener::from_std(g)?,
                                tokio::net::TcpListener::from_std(h)?,
                            )
                        }
                        None => (rebind(grpc).await?, rebind(http).await?),
                    })
                }
                .await;
                let (g, h) = match bound {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let http_spans = spans.clone();
                let http_forward = forward.clone();
                let http_refuse = refuse.clone();
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let spans = http_spans.clone();
                        let forward = http_forward.clone();
                        let refuse = http_refuse.clone();
                        async move {
                            if refusing(&refuse) {
                                // What an OpenTelemetry Collector answers
                                // when it cannot pass data on (retryable).
                                return (
                                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                    [("content-type", "text/plain")],
                                    b"the trace store is down".to_vec(),
                                );
                            }
                            match ExportTraceServiceRequest::decode(body) {
                                Ok(req) => {
                                    store(&spans, &forward, req, "http");
                                    (
                                        axum::http::StatusCode::OK,
                                        [("content-type", "application/x-protobuf")],
                                        ExportTraceServiceResponse {
                                            partial_success: None,
                                        }
                                        .encode_to_vec(),
                                    )
                                }
                                Err(_) => (
                                    axum::http::StatusCode::BAD_REQUEST,
                                    [("content-type", "text/plain")],
                                    b"not an ExportTraceServiceRequest".to_vec(),
                                ),
                            }
                        }
                    }),
                );
                let mut builder = tonic::transport::Server::builder();
                let mut https = None;
                if let Some(t) = &tls {
                    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
                    let mut c =
                        ServerTlsConfig::new().identity(Identity::from_pem(&t.cert, &t.key));
                    if let Some(ca) = &t.client_ca {
                        c = c.client_ca_root(Certificate::from_pem(ca));
                    }
                    builder = match builder.tls_config(c) {
                        Ok(b) => b,
                        Err(e) => return eprintln!("receiver gRPC TLS: {e}"),
                    };
                    https = match t.rustls() {
                        Ok(c) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(c))),
                        Err(e) => return eprintln!("receiver HTTP TLS: {e}"),
                    };
                }
                let grpc_server = builder
                    .add_service(TraceServiceServer::new(Grpc(spans, forward, refuse)))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(g));
                let http_server = async move {
                    match https {
                        Some(acceptor) => axum::serve(TlsListener { tcp: h, acceptor }, app).await,
                        None => axum::serve(h, app).await,
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    r = grpc_server => if let Err(e) = r { eprintln!("receiver gRPC: {e}") },
                    r = http_server => if let Err(e) = r { eprintln!("receiver HTTP: {e}") },
                }
            });
        };
        // Named: the bench reads its CPU time (is the receiver what bounds
        // an export's rate?).
        let thread = std::thread::Builder::new()
            .name(RECEIVER_THREAD.into())
            .spawn(serve)?;
        ready_rx.recv()??;
        self.running = Some((stop_tx, thread));
        Ok(())
    }

    /// Stops serving: connections are refused until [`Receiver::resume`].
    pub fn stop(&mut self) {
        if let Some((tx, thread)) = self.running.take() {
            let _ = tx.send(());
            let _ = thread.join();
            self.held = [self.grpc, self.http]
                .into_iter()
                .filter_map(|addr| hold(addr).ok())
                .collect();
            if let Ok(mut down) = self.down.lock() {
                down.push(Downtime {
                    from: std::time::SystemTime::now(),
                    until: None,
                });
            }
        }
    }

    /// Refuses exports until [`Receiver::accept`]: OTLP/HTTP answers 503,
    /// OTLP/gRPC UNAVAILABLE, as a collector whose backend is down does.
    /// Unlike [`Receiver::stop`], the exports are HTTP exchanges the wire
    /// shows, with the answer.
    pub fn refuse(&mut self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut down) = self.down.lock() {
            down.push(Downtime {
                from: std::time::SystemTime::now(),
                until: None,
            });
        }
    }

    /// Takes exports again after [`Receiver::refuse`].
    pub fn accept(&mut self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut down) = self.down.lock()
            && let Some(d) = down.last_mut().filter(|d| d.until.is_none())
        {
            d.until = Some(std::time::SystemTime::now());
        }
    }

    /// Passes every batch received from now on to an OTLP/HTTP endpoint
    /// too (`http://jaeger:4318`; `/v1/traces` is appended), so the lab's
    /// traces land in a Jaeger of the user's own. Best effort, on its own
    /// thread: what cannot be sent is counted and reported once.
    pub fn forward_to(&mut self, endpoint: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        tracegap_agent::remote::install_crypto_provider();
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<ExportTraceServiceRequest>(FORWARD_QUEUE);
        std::thread::Builder::new()
            .name("lab-forward".into())
            .spawn(move || {
                let mut failed = 0u64;
                for req in rx {
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/x-protobuf")
                        .body(req.encode_to_vec())
                        .send()
                        .and_then(|r| r.error_for_status());
                    if let Err(e) = sent {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("lab: passing spans on to {url} failed: {e} (counting on)");
                        }
                    }
                }
                if failed > 0 {
                    eprintln!("lab: {failed} batches could not be passed on to {url}");
                }
            })?;
        if let Ok(mut f) = self.forward.lock() {
            *f = Some(tx);
        }
        Ok(())
    }

    /// How many spans arrived so far.
    pub fn count(&self) -> usize {
        self.spans.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until `done` holds for the spans received, or `timeout`.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };

    use super::*;

    fn request(name: &str) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue("svc".into())),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        name: name.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn spans_are_kept_and_passed_on_to_another_otlp_receiver() -> anyhow::Result<()> {
        let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
        let jaeger = Receiver::start(loopback)?;
        let mut lab = Receiver::start(loopback)?;
        lab.forward_to(&format!("http://{}", jaeger.http))?;
        tracegap_agent::remote::install_crypto_provider();
        let client = reqwest::blocking::Client::new();
        let status = client
            .post(format!("http://{}/v1/traces", lab.http))
            .header("content-type", "application/x-protobuf")
            .body(request("GET /passed-on").encode_to_vec())
            .send()?
            .status();
        assert!(status.is_success(), "{status}");
        assert_eq!(lab.count(), 1);
        let there = jaeger.wait_for(Duration::from_secs(5), |s| !s.is_empty());
        assert_eq!(there.len(), 1, "{there:?}");
        assert_eq!(there[0].span.name, "GET /passed-on");
        assert_eq!(there[0].service, "svc");

        // An endpoint that is down loses nothing in the lab's own store.
        let mut alone = Receiver::start(loopback)?;
        alone.forward_to("http://127.0.0.1:9")?;
        client
            .post(format!("http://{}/v1/traces", alone.http))
            .header("content-type", "application/x-protobuf")
            .body(request("GET /kept").encode_to_vec())
            .send()?;
        assert_eq!(alone.count(), 1);
        Ok(())
    }
}
