//! A hop: one HTTP request from a caller to a callee, with its response (or
//! the lack of one) and the trace context it carried.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    clock::WallClock,
    events::{Endpoint, Flow},
    http::{
        assemble::{Message, Waiting},
        context::{Found, Propagation, SpanContext},
        h2::exchange::{Exchange, Fields},
        message::StartLine,
    },
};

/// What carried a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Http1,
    /// An HTTP/2 stream.
    Http2,
    /// An HTTP/2 stream with a gRPC content type.
    Grpc,
}

impl Protocol {
    /// `network.protocol.version`.
    pub fn version(self) -> &'static str {
        match self {
            Self::Http1 => "1.1",
            Self::Http2 | Self::Grpc => "2",
        }
    }
}

/// What came back for a request: when, and its status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Monotonic time: an HTTP/1.x response's first segment, an HTTP/2
    /// stream's end.
    pub ts_ns: u64,
    /// None: an HTTP/2 stream that ended without response headers (reset).
    pub status: Option<u16>,
    /// gRPC's status code (trailers, or a trailers-only response).
    pub grpc_status: Option<u32>,
    /// The first product token of its `Server` header (what the callee
    /// runs, for the fix of an uninstrumented one).
    pub server: Option<Token>,
}

/// A header's first product token (`nginx/1.22.1`), at most 32 bytes: kept
/// by value, as replies are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    bytes: [u8; 32],
    len: u8,
}

impl Token {
    pub fn of(header: &str) -> Option<Self> {
        let t = header.split_whitespace().next()?;
        let mut end = t.len().min(32);
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 32];
        bytes[..end].copy_from_slice(&t.as_bytes()[..end]);
        Some(Self {
            bytes,
            len: end as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl Reply {
    /// A response message's; None if it is not a response.
    pub fn from_message(m: &Message) -> Option<Self> {
        match m.head.as_ref().map(|h| &h.start) {
            Ok(StartLine::Response { status, .. }) => Some(Self {
                ts_ns: m.ts_ns,
                status: Some(*status),
                grpc_status: None,
                server: m
                    .head
                    .as_ref()
                    .ok()
                    .and_then(|h| h.header("server"))
                    .and_then(Token::of),
            }),
            _ => None,
        }
    }

    /// An HTTP/2 exchange's.
    pub fn from_exchange(x: &Exchange) -> Self {
        use crate::http::context::Headers as _;
        Self {
            ts_ns: x.end_ns,
            status: x.status(),
            grpc_status: x.grpc_status(),
            server: x
                .response
                .as_ref()
                .and_then(|f| f.header("server"))
                .and_then(Token::of),
        }
    }
}

/// A request's method, path and Host bytes: [`TEXT_INLINE`] inline.
type RequestText = smallvec::SmallVec<[u8; TEXT_INLINE]>;
/// Bytes of method, path and Host a request record holds without an
/// allocation: a REST path or a gRPC method and an in-cluster host fit.
const TEXT_INLINE: usize = 96;

/// A request waiting for its response: what its hop is built from, read
/// out of the head once, when the request is seen. The pairer and the
/// engine share it (`Arc`), so an open flow costs one compact record, not
/// a parsed head and copies of its contexts.
#[derive(Clone, Debug)]
pub struct Request {
    /// Monotonic time of the request's first segment.
    pub ts_ns: u64,
    pub flow: Flow,
    /// Sequence number of the request's first byte: its identity on the flow.
    pub seq: u32,
    /// Acknowledgement number it carried (see [`Waiting::ack`]).
    pub ack: u32,
    /// Read after its flow lost and found its boundary (see [`Waiting::resynced`]).
    pub resynced: bool,
    /// The head did not fit what the kernel copies.
    pub truncated: bool,
    /// HTTP/2: read on a connection joined mid-way.
    pub joined: bool,
    /// HTTP/2: fields that named table entries never seen (not read).
    pub unknown_fields: u16,
    /// Sent by a telemetry exporter: paired, so its response is not taken
    /// for another's, but never reported.
    pub telemetry: bool,
    /// The Service address the client addressed, if it went through one.
    pub via: Option<Endpoint>,
    pub protocol: Protocol,
    /// Method, path and Host, one after the other, in the record itself
    /// when they fit (most do): no allocation of their own.
    text: RequestText,
    method_end: u32,
    path_end: u32,
    has_host: bool,
    pub propagation: Propagation,
    /// The first product token of its `User-Agent` (the caller's HTTP
    /// client, for a gap's fix).
    pub user_agent: Option<Token>,
}

impl Request {
    /// `path` without its query string.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ts_ns: u64,
        flow: Flow,
        seq: u32,
        method: &str,
        path: &str,
        host: Option<&str>,
        propagation: Propagation,
        truncated: bool,
    ) -> Self {
        let host_s = host.unwrap_or("");
        let mut text = RequestText::new();
        text.extend_from_slice(method.as_bytes());
        text.extend_from_slice(path.as_bytes());
        text.extend_from_slice(host_s.as_bytes());
        Self {
            ts_ns,
            flow,
            seq,
            ack: 0,
            resynced: false,
            truncated,
            joined: false,
            unknown_fields: 0,
            telemetry: false,
            via: None,
            protocol: Protocol::Http1,
            method_end: method.len() as u32,
            path_end: (method.len() + path.len()) as u32,
            has_host: host.is_some(),
            text,
            propagation,
            user_agent: None,
        }
    }

    /// The request in `m`; None if `m` is a response or has no head.
    pub fn from_message(m: &Message) -> Option<Self> {
        let head = m.head.as_ref().ok()?;
        let StartLine::Request { method, path, .. } = &head.start else {
            return None;
        };
        let mut req = Self::new(
            m.ts_ns,
            m.flow,
            m.seq,
            method,
            path,
            head.header("host"),
            Propagation::from_head(head),
            m.truncated,
        );
        req.via = m.via;
        req.ack = m.ack;
        req.resynced = m.resynced;
        req.user_agent = head.header("user-agent").and_then(Token::of);
        Some(req)
    }

    /// The request on an HTTP/2 stream, from its header block: `seq` is
    /// the stream id, its identity on the connection.
    pub fn from_h2(ts_ns: u64, flow: Flow, stream: u32, fields: &Fields) -> Self {
        use crate::http::context::Headers as _;
        let path = fields.header(":path").unwrap_or("");
        let path = path.split('?').next().unwrap_or(path);
        let mut req = Self::new(
            ts_ns,
            flow,
            stream,
            fields.header(":method").unwrap_or(""),
            path,
            fields.header(":authority"),
            Propagation::from_headers(fields),
            // Fields from table entries never seen: not read whole.
            fields.incomplete(),
        );
        req.joined = fields.joined;
        req.unknown_fields = fields.unknown.min(u16::MAX as usize) as u16;
        req.user_agent = fields.header("user-agent").and_then(Token::of);
        req.protocol = if fields
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/grpc"))
        {
            Protocol::Grpc
        } else {
            Protocol::Http2
        };
        req
    }

    /// Bytes `from..to` of the text: whole strs put side by side, so
    /// always UTF-8 at these bounds.
    fn text(&self, from: u32, to: Option<u32>) -> &str {
        let to = to.map_or(self.text.len(), |t| t as usize);
        self.text
            .get(from as usize..to)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    pub fn method(&self) -> &str {
        self.text(0, Some(self.method_end))
    }

    pub fn path(&self) -> &str {
        self.text(self.method_end, Some(self.path_end))
    }

    pub fn host(&self) -> Option<&str> {
        self.has_host.then(|| self.text(self.path_end, None))
    }
}

impl Waiting for Arc<Request> {
    fn ts_ns(&self) -> u64 {
        self.ts_ns
    }

    fn ack(&self) -> u32 {
        self.ack
    }

    fn resynced(&self) -> bool {
        self.resynced
    }
}

/// Everything the engine knows about one request/response exchange.
#[derive(Clone, Debug)]
pub struct Hop {
    /// The request's flow: caller → callee.
    pub flow: Flow,
    /// Sequence number of the request's first byte: its identity on the flow.
    pub seq: u32,
    /// Its request, shared with the pairer and the engine: method, path,
    /// Host and contexts are read from it, not copied per hop.
    pub request: Arc<Request>,
    /// None: no response came (see `unanswered`).
    pub status: Option<u16>,
    /// Monotonic time of the request's first segment.
    pub start_ns: u64,
    /// Monotonic time of the response's first segment, or when it was given up.
    pub end_ns: u64,
    /// Wall-clock time of `start_ns`.
    pub start: SystemTime,
    /// No response within the timeout: `end_ns` is when the engine gave up.
    pub unanswered: bool,
    /// The request head did not fit what the kernel copies.
    pub truncated: bool,
    /// HTTP/2: read on a connection joined mid-way, and the fields that
    /// could not be read (see [`Request`]).
    pub joined: bool,
    pub unknown_fields: u16,
    /// The Service address the client called, when kube-proxy translated it
    /// to the callee (see [`crate::nat`]).
    pub via: Option<Endpoint>,
    pub protocol: Protocol,
    /// gRPC's status code, for a gRPC call that got one.
    pub grpc_status: Option<u32>,
    /// The caller's `User-Agent` and the callee's `Server`, first tokens.
    pub user_agent: Option<Token>,
    pub server: Option<Token>,
}

impl Hop {
    /// Builds a hop from a request and its response (None: unanswered,
    /// given up at `gave_up_ns`).
    pub fn new(
        clock: &WallClock,
        request: &Arc<Request>,
        response: Option<Reply>,
        gave_up_ns: u64,
    ) -> Self {
        let status = response.and_then(|r| r.status);
        let end_ns = response.map_or(gave_up_ns, |r| r.ts_ns).max(request.ts_ns);
        Self {
            flow: request.flow,
            seq: request.seq,
            request: request.clone(),
            status,
            start_ns: request.ts_ns,
            end_ns,
            start: clock.system_time(request.ts_ns),
            unanswered: response.is_none(),
            truncated: request.truncated,
            joined: request.joined,
            unknown_fields: request.unknown_fields,
            via: request.via,
            protocol: request.protocol,
            grpc_status: response.and_then(|r| r.grpc_status),
            user_agent: request.user_agent,
            server: response.and_then(|r| r.server),
        }
    }

    /// What would close a gap of `kind` on this hop (see [`super::fix`]);
    /// `received`: the format of the request its caller was serving.
    pub fn fix(
        &self,
        kind: super::classify::GapKind,
        received: Option<crate::http::context::Format>,
    ) -> Option<String> {
        let sent: smallvec::SmallVec<[_; 4]> = self
            .propagation()
            .contexts
            .iter()
            .map(|c| c.format())
            .collect();
        super::fix::fix(
            kind,
            self.user_agent.as_ref().map(Token::as_str),
            self.server.as_ref().map(Token::as_str),
            &sent,
            received,
        )
    }

    /// gRPC's service and method (`/pkg.Service/Method`), for a gRPC call.
    pub fn rpc(&self) -> Option<(&str, &str)> {
        if self.protocol != Protocol::Grpc {
            return None;
        }
        let (service, method) = self.path().strip_prefix('/')?.split_once('/')?;
        (!service.is_empty() && !method.is_empty() && !method.contains('/'))
            .then_some((service, method))
    }

    pub fn caller(&self) -> Endpoint {
        self.flow.src
    }

    pub fn method(&self) -> &str {
        self.request.method()
    }

    /// Path without query string.
    pub fn path(&self) -> &str {
        self.request.path()
    }

    /// `Host` header (`:authority`), if sent.
    pub fn host(&self) -> Option<&str> {
        self.request.host()
    }

    pub fn propagation(&self) -> &Propagation {
        &self.request.propagation
    }

    pub fn callee(&self) -> Endpoint {
        self.flow.dst
    }

    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }

    pub fn end(&self) -> SystemTime {
        self.start + self.duration()
    }

    /// The context a tracer would continue: the first valid one.
    pub fn context(&self) -> Option<&SpanContext> {
        self.propagation().primary()
    }

    /// The format of the first context header set, valid or not.
    pub fn format(&self) -> Option<&'static str> {
        self.propagation()
            .contexts
            .first()
            .map(|c| c.format().as_str())
    }

    pub fn malformed(&self) -> Option<&Found> {
        self.propagation()
            .contexts
            .iter()
            .find(|c| matches!(c, Found::Malformed { .. }))
    }
}
#[cfg(test)]
impl Hop {
    /// Tests: the hop as if its request had had another method and path.
    pub(crate) fn set_method_path(&mut self, method: &str, path: &str) {
        let r = &self.request;
        let mut new = Request::new(
            r.ts_ns,
            r.flow,
            r.seq,
            method,
            path,
            r.host(),
            r.propagation.clone(),
            r.truncated,
        );
        new = Request {
            text: new.text,
            method_end: new.method_end,
            path_end: new.path_end,
            ..(**r).clone()
        };
        self.request = Arc::new(new);
    }

    /// Tests: the contexts and baggage its request carried.
    pub(crate) fn propagation_mut(&mut self) -> &mut Propagation {
        &mut Arc::make_mut(&mut self.request).propagation
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::events::Endpoint;

    fn flow() -> Flow {
        let ep = |last, port| Endpoint {
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
            port,
        };
        Flow {
            src: ep(1, 40000),
            dst: ep(2, 80),
        }
    }

    #[test]
    fn a_request_record_gives_back_method_path_and_host() {
        let p = Propagation::default();
        let r = Request::new(
            1,
            flow(),
            7,
            "GET",
            "/users/1",
            Some("shop:80"),
            p.clone(),
            false,
        );
        assert_eq!(
            (r.method(), r.path(), r.host()),
            ("GET", "/users/1", Some("shop:80"))
        );
        // No Host is not an empty Host.
        let r = Request::new(1, flow(), 7, "POST", "/", None, p.clone(), false);
        assert_eq!((r.method(), r.path(), r.host()), ("POST", "/", None));
        let r = Request::new(1, flow(), 7, "GET", "/", Some(""), p, false);
        assert_eq!(r.host(), Some(""));
    }
}
