//! The lab's gRPC server: answers any method of [`super::SERVICE`] with an
//! empty message after serving it as its spec says
//! ([`crate::service::handle`]: context from the metadata, the SDK's server
//! span, downstream calls).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc,
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
    server::{NamedService, UnaryService},
};
use tonic_prost::ProstCodec;

use super::{MAX_HEADER_LIST, SERVICE};
use crate::service::{Inbound, ServiceSpec, handle};

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
