//! gRPC for the lab's demo services, over cleartext HTTP/2 (tonic): a
//! server that answers any method of [`SERVICE`] with an empty message
//! after serving it as its spec says ([`crate::service::handle`]: context
//! from the metadata, the SDK's server span, downstream calls), and a
//! client whose calls from every thread of a service share one HTTP/2
//! connection per downstream: the streams of concurrent requests are in
//! flight on it at once, as with any gRPC channel.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::{
    body::Body,
    codegen::{BoxFuture, Service, http},
    metadata::{MetadataKey, MetadataValue},
    server::{NamedService, UnaryService},
    transport::{Channel, Endpoint},
};
use tonic_prost::ProstCodec;

use crate::service::{Inbound, ServiceSpec, handle};

/// The gRPC service every lab gRPC server serves, any method of it.
pub const SERVICE: &str = "lab.Inventory";

/// Header list size either side accepts: room for a 16 KiB metadata block
/// (h2's default is 16 KiB in all).
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// The client side: a runtime for the calls, and a channel (one HTTP/2
/// connection) per downstream authority.
struct Client {
    runtime: tokio::runtime::Runtime,
    channels: Mutex<HashMap<String, Channel>>,
}

fn client() -> Result<&'static Client, String> {
    static CLIENT: OnceLock<Result<Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // Built on first use, by a thread of the service's own process,
            // in its pod's network namespace.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            Ok(Client {
                runtime,
                channels: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Calls `grpc://authority/pkg.Service/Method` with `metadata` (and
/// `blob` bytes of `x-lab-blob`); the gRPC status code (0: OK).
pub fn call(url: &str, metadata: &[(String, String)], blob: usize) -> Result<u32, String> {
    let rest = url
        .strip_prefix("grpc://")
        .ok_or_else(|| format!("{url}: not a grpc:// URL"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let c = client()?;
    let channel = {
        let mut channels = c.channels.lock().map_err(|e| e.to_string())?;
        match channels.get(authority) {
            Some(ch) => ch.clone(),
            None => {
                let ch = {
                    let _guard = c.runtime.enter();
                    Endpoint::from_shared(format!("http://{authority}"))
                        .map_err(|e| e.to_string())?
                        .connect_timeout(Duration::from_secs(3))
                        .http2_max_header_list_size(MAX_HEADER_LIST)
                        .timeout(Duration::from_secs(5))
                        .connect_lazy()
                };
                channels.insert(authority.to_owned(), ch.clone());
                ch
            }
        }
    };
    unary(&c.runtime, channel, path, metadata, blob)
}

/// One unary call on `channel`, on `runtime`; the gRPC status code.
fn unary(
    runtime: &tokio::runtime::Runtime,
    channel: Channel,
    path: &str,
    metadata: &[(String, String)],
    blob: usize,
) -> Result<u32, String> {
    let mut request = tonic::Request::new(());
    for (k, v) in metadata {
        let key = MetadataKey::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
        let value: MetadataValue<_> = v.parse().map_err(|_| format!("metadata {k}: {v:?}"))?;
        request.metadata_mut().insert(key, value);
    }
    if blob > 0 {
        let value: MetadataValue<_> = "x"
            .repeat(blob)
            .parse()
            .map_err(|_| "blob metadata".to_owned())?;
        request.metadata_mut().insert("x-lab-blob", value);
    }
    let path = http::uri::PathAndQuery::try_from(path).map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| e.to_string())?;
        let codec = ProstCodec::<(), ()>::default();
        match grpc.unary(request, path, codec).await {
            Ok(_) => Ok(0),
            Err(status) => Ok(status.code() as u32),
        }
    })
}

/// A client of its own: one channel (one HTTP/2 connection, kept for as
/// long as the caller lives), on a runtime built in the creating thread's
/// network namespace, whatever else in the process calls gRPC.
pub struct Caller {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl Caller {
    /// Connects to `authority` (host:port) now.
    pub fn connect(authority: &str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5));
        let channel = runtime
            .block_on(endpoint.connect())
            .map_err(|e| e.to_string())?;
        Ok(Self { runtime, channel })
    }

    /// Calls `path` (`/pkg.Service/Method`) with `metadata`; the gRPC status
    /// code (0: OK).
    pub fn call(&self, path: &str, metadata: &[(String, String)]) -> Result<u32, String> {
        unary(&self.runtime, self.channel.clone(), path, metadata, 0)
    }
}

/// Serves gRPC on `spec.port` in the current thread's network namespace
/// until `stop` is set; `ready` is told whether listening worked.
pub fn serve_until(
    spec: Arc<ServiceSpec>,
    provider: Option<SdkTracerProvider>,
    stop: &Arc<AtomicBool>,
    ready: impl FnOnce(std::io::Result<()>),
) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return ready(Err(e)),
    };
    let listener = match runtime.block_on(tokio::net::TcpListener::bind(SocketAddr::from((
        Ipv6Addr::UNSPECIFIED,
        spec.port,
    )))) {
        Ok(l) => l,
        Err(e) => return ready(Err(e)),
    };
    ready(Ok(()));
    let server = AnyMethod {
        spec,
        provider: provider.clone(),
    };
    let stop = stop.clone();
    runtime.block_on(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let until = async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let r = tonic::transport::Server::builder()
            // The 16 KiB metadata scenario's block is past h2's default.
            .http2_max_header_list_size(MAX_HEADER_LIST)
            .add_service(server)
            .serve_with_incoming_shutdown(incoming, until)
            .await;
        if let Err(e) = r {
            eprintln!("gRPC server: {e}");
        }
    });
    if let Some(p) = provider {
        let _ = p.shutdown();
    }
}

/// Any method of [`SERVICE`]: served as the spec says, answered with an
/// empty message and the spec's status (200: OK, else UNAVAILABLE).
#[derive(Clone)]
struct AnyMethod {
    spec: Arc<ServiceSpec>,
    provider: Option<SdkTracerProvider>,
}

impl NamedService for AnyMethod {
    const NAME: &'static str = SERVICE;
}

impl Service<http::Request<Body>> for AnyMethod {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (spec, provider) = (self.spec.clone(), self.provider.clone());
        let path = req.uri().path().to_owned();
        let metadata: HashMap<String, String> = req
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr());
        Box::pin(async move {
            // The demo's work is blocking (its HTTP client, its delay).
            let ok = spec.status < 400;
            let served = tokio::task::spawn_blocking(move || {
                if let Some(cx) = handle(
                    &spec,
                    provider.as_ref(),
                    &metadata,
                    Inbound::Grpc(&path),
                    peer,
                ) {
                    cx.span().end();
                }
            })
            .await;
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<(), ()>::default());
            let answer = Answer(ok && served.is_ok());
            Ok(grpc.unary(answer, req).await)
        })
    }
}

struct Answer(bool);

impl UnaryService<()> for Answer {
    type Response = ();
    type Future = std::future::Ready<Result<tonic::Response<()>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
        std::future::ready(match self.0 {
            true => Ok(tonic::Response::new(())),
            false => Err(tonic::Status::unavailable("the lab service fails")),
        })
    }
}
