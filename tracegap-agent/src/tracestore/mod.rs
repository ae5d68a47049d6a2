//! Reading traces back from the store the spans went to: Jaeger's query
//! API or Grafana Tempo's, behind one trait. The wire shows what crossed
//! it; only the store knows which spans the services themselves recorded
//! (a breaking service's own server span, a callee's own new trace, the
//! span a collector lost). [`crate::reconcile`] asks it.

pub mod jaeger;
pub mod tempo;

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use serde_json::Value;
use thiserror::Error;

/// Errors from reading the trace store.
#[derive(Debug, Error)]
pub enum Error {
    /// No connection, or the connection broke.
    #[error("trace store unreachable: {0}")]
    Unreachable(String),
    /// The TLS handshake failed: the store's certificate does not verify,
    /// or it refused ours.
    #[error("trace store refused TLS: {0}: check --trace-store-ca-file, --trace-store-client-cert")]
    TlsRefused(String),
    /// No answer within the query timeout.
    #[error("trace store did not answer within {0:?}")]
    Timeout(Duration),
    /// An answer other than 200 (or 404 for a trace it does not hold).
    #[error("trace store answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    /// An answer that is not the API's JSON.
    #[error("trace store answer is not {expected}: {reason}")]
    Decode {
        expected: &'static str,
        reason: String,
    },
    /// Auto-detection found neither API at the URL.
    #[error(
        "{url} answers neither Jaeger's query API (/api/services) nor Tempo's (/api/echo); give --trace-store-kind"
    )]
    Unknown { url: String },
    /// The HTTP client could not be built, or a credential file read.
    #[error("the HTTP client: {0}")]
    Client(String),
    /// 401 or 403: the credentials (token, user and password, tenant).
    #[error(
        "trace store refused the credentials (HTTP {0}): check --trace-store-token-file, --trace-store-user and --trace-store-password-file, --trace-store-tenant"
    )]
    Denied(u16),
}

/// Which API the store speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// Ask the URL: `/api/services` answering `{"data": [...]}` is Jaeger,
    /// `/api/echo` answering `echo` is Tempo.
    Auto,
    /// Jaeger's query service (`/api/traces/{id}`, `/api/traces?service=`),
    /// port 16686.
    Jaeger,
    /// Grafana Tempo (`/api/traces/{id}` as OTLP JSON, `/api/search`),
    /// port 3200.
    Tempo,
}

/// A span kind as the stores record it (both follow OpenTelemetry's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
    Other,
}

/// One span as the store holds it, in the terms reconciliation needs.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// None: a root span.
    pub parent_span_id: Option<String>,
    pub service: String,
    pub kind: Kind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// tracegap's own (`tracegap.synthetic=true`): never evidence of what a
    /// service recorded.
    pub synthetic: bool,
    /// The peer a server span says called it (`client.address`,
    /// `network.peer.address`, or their older names), and its port.
    pub peer: Option<IpAddr>,
    pub peer_port: Option<u16>,
}

/// A trace: its spans, in no particular order.
pub type Trace = Vec<StoredSpan>;

/// Traces with spans of `service` starting in `start..=end`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Search {
    pub service: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub limit: usize,
}

/// A trace store that can be asked for a trace and searched.
pub trait TraceStore: Send + Sync {
    /// Which API this is.
    fn kind(&self) -> StoreKind;
    /// The trace with this id (32 hex digits); None when the store holds
    /// none of its spans.
    fn trace<'a>(&'a self, trace_id: &'a str) -> BoxFuture<'a, Result<Option<Trace>, Error>>;
    /// Traces with spans of a service in a time window.
    fn search<'a>(&'a self, q: &'a Search) -> BoxFuture<'a, Result<Vec<Trace>, Error>>;
}

/// An HTTP GET client for JSON APIs, bounded in time, with the store's
/// TLS and credentials.
#[derive(Clone)]
pub(crate) struct Http {
    client: std::sync::Arc<crate::remote::AuthClient>,
    timeout: Duration,
}

impl Http {
    pub(crate) fn new(timeout: Duration, access: &crate::remote::Access) -> Result<Self, Error> {
        let client = access
            .client(timeout)
            .map_err(|e| Error::Client(e.to_string()))?;
        Ok(Self {
            client: std::sync::Arc::new(client),
            timeout,
        })
    }

    /// GETs `url`; None on 404.
    pub(crate) async fn get_json(
        &self,
        url: &str,
        expected: &'static str,
    ) -> Result<Option<Value>, Error> {
        let bytes = match self.get(url).await? {
            Some(b) => b,
            None => return Ok(None),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Decode {
                expected,
                reason: e.to_string(),
            })
    }

    /// GETs `url`'s body; None on 404.
    pub(crate) async fn get(&self, url: &str) -> Result<Option<bytes::Bytes>, Error> {
        let sent = self
            .client
            .get(url)
            .map_err(|e| Error::Client(e.to_string()))?
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| self.error(e))?;
        let status = sent.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if status == 401 || status == 403 {
            return Err(Error::Denied(status));
        }
        let body = sent.bytes().await.map_err(|e| self.error(e))?;
        if status != 200 {
            return Err(Error::Status {
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            });
        }
        Ok(Some(body))
    }

    fn error(&self, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            Error::Timeout(self.timeout)
        } else if let Some(why) = crate::backend::refusal(&e) {
            Error::TlsRefused(why)
        } else {
            Error::Unreachable(crate::remote::error_chain(&e))
        }
    }
}

/// A reader for the store at `url` (its base, e.g. http://jaeger-query:16686),
/// asking it which API it speaks when `kind` is [`StoreKind::Auto`].
pub async fn connect(
    url: &str,
    kind: StoreKind,
    timeout: Duration,
    access: &crate::remote::Access,
) -> Result<Box<dyn TraceStore>, Error> {
    let base = url.trim_end_matches('/').to_owned();
    let http = Http::new(timeout, access)?;
    let kind = match kind {
        StoreKind::Auto => detect(&http, &base).await?,
        k => k,
    };
    Ok(match kind {
        StoreKind::Tempo => Box::new(tempo::Tempo::new(http, base)),
        _ => Box::new(jaeger::Jaeger::new(http, base)),
    })
}

async fn detect(http: &Http, base: &str) -> Result<StoreKind, Error> {
    // Jaeger's query service serves its UI for unknown paths, so its answer
    // is recognised by shape, not by status.
    match http
        .get_json(&format!("{base}/api/services"), "Jaeger's services")
        .await
    {
        Ok(Some(v)) if v.get("data").is_some() => return Ok(StoreKind::Jaeger),
        // Said as it is, not as "neither API".
        Err(e @ Error::Denied(_)) => return Err(e),
        _ => {}
    }
    match http.get(&format!("{base}/api/echo")).await? {
        Some(b) if b.trim_ascii() == b"echo" => Ok(StoreKind::Tempo),
        _ => Err(Error::Unknown {
            url: base.to_owned(),
        }),
    }
}

/// An id as 32 (or 16) lowercase hex digits, from hex of any length (Jaeger
/// drops leading zeros) or base64 (Tempo's JSON encodes bytes so).
pub(crate) fn normal_id(s: &str, digits: usize) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let hex = if s.len() <= digits && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("{:0>digits$}", s.to_ascii_lowercase())
    } else {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        if bytes.len() * 2 != digits {
            return None;
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    (hex.bytes().any(|b| b != b'0')).then_some(hex)
}

/// Attribute keys naming a server span's peer, newest conventions first.
pub(crate) const PEER_ADDRESS: [&str; 4] = [
    "client.address",
    "network.peer.address",
    "net.sock.peer.addr",
    "net.peer.ip",
];
pub(crate) const PEER_PORT: [&str; 4] = [
    "client.port",
    "network.peer.port",
    "net.sock.peer.port",
    "net.peer.port",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_that_accepts_and_never_answers_times_out_and_one_that_is_not_there_is_unreachable()
     {
        // Accepts connections (the kernel's backlog) and never reads them.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let started = std::time::Instant::now();
        let e = connect(
            &url,
            StoreKind::Jaeger,
            Duration::from_millis(200),
            &Default::default(),
        )
        .await
        .unwrap()
        .trace("0af7651916cd43dd8448eb211c80319c")
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(silent);
        let e = connect(
            &url,
            StoreKind::Auto,
            Duration::from_millis(200),
            &Default::default(),
        )
        .await
        .err()
        .expect("nothing there to detect");
        assert!(matches!(e, Error::Unreachable(_)), "{e}");
        assert!(e.to_string().contains("refused"), "{e}");
    }

    #[test]
    fn ids_are_normalised_from_hex_and_base64() {
        assert_eq!(
            normal_id("af7651916cd43dd8448eb211c80319c", 32).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(
            normal_id("B7AD6B7169203331", 16).as_deref(),
            Some("b7ad6b7169203331")
        );
        // Tempo: base64 of the 8 bytes.
        assert_eq!(
            normal_id("t61rcWkgMzE=", 16).as_deref(),
            Some("b7ad6b7169203331")
        );
        assert_eq!(normal_id("", 16), None);
        assert_eq!(normal_id("0000000000000000", 16), None);
        assert_eq!(normal_id("not an id!", 16), None);
    }
}
