//! gRPC for the lab's demo services, over cleartext HTTP/2 (tonic): a
//! client whose calls from every thread of a service share one HTTP/2
//! connection per downstream (the streams of concurrent requests are in
//! flight on it at once, as with any gRPC channel), and the server
//! ([`server`]).

pub mod server;

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use tonic::{
    codegen::http,
    metadata::{MetadataKey, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_prost::ProstCodec;

/// The gRPC service every lab gRPC server serves, any method of it.
pub const SERVICE: &str = "lab.Inventory";

/// Header list size either side accepts: room for a 16 KiB metadata block
/// (h2's default is 16 KiB in all).
pub(crate) const MAX_HEADER_LIST: u32 = 64 * 1024;

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
