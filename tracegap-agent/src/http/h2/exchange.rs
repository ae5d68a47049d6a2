//! HTTP/2 streams paired into exchanges: a request's header block, the
//! response's, and its trailers (where gRPC puts `grpc-status`), matched by
//! stream id on one connection, however many streams are in flight.
//!
//! A request whose header block names fields from HPACK table entries the
//! reader never saw (it joined the connection mid-way) is read for what can
//! be read: a W3C `traceparent` is recognised by its value alone (its shape
//! is unambiguous). Any other unknown field could be a trace header: such a
//! request is read for what it shows and marked partly read; with no
//! context among the fields read, its context is unknown (`unreadable`),
//! never missing.

use super::frame::{Direction, Error, Event};
use crate::http::context::Headers;

/// Streams open at once per connection at most; past it the oldest is
/// dropped (its response will find nothing to pair with).
pub const MAX_STREAMS: usize = 1024;

pub use super::fields::Fields;

/// One request and what came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub stream: u32,
    pub request: Fields,
    /// The final (non-1xx) response headers; None when the stream was
    /// reset or the connection ended first.
    pub response: Option<Fields>,
    pub trailers: Option<Fields>,
    /// Monotonic ns of the request's headers and of the stream's end.
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Exchange {
    pub fn method(&self) -> Option<&str> {
        self.request.header(":method")
    }

    /// The path, without its query.
    pub fn path(&self) -> Option<&str> {
        self.request
            .header(":path")
            .map(|p| p.split('?').next().unwrap_or(p))
    }

    pub fn authority(&self) -> Option<&str> {
        self.request.header(":authority")
    }

    pub fn status(&self) -> Option<u16> {
        self.response.as_ref()?.header(":status")?.parse().ok()
    }

    /// A gRPC call: `content-type: application/grpc[+proto|...]`.
    pub fn is_grpc(&self) -> bool {
        self.request
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/grpc"))
    }

    /// `grpc-status`, from the trailers (or a trailers-only response).
    pub fn grpc_status(&self) -> Option<u32> {
        [&self.trailers, &self.response]
            .into_iter()
            .flatten()
            .find_map(|f| f.header("grpc-status")?.parse().ok())
    }

    /// `rpc.service` and `rpc.method` from a gRPC path
    /// `/package.Service/Method`.
    pub fn rpc(&self) -> Option<(&str, &str)> {
        let (service, method) = self.path()?.strip_prefix('/')?.split_once('/')?;
        (!service.is_empty() && !method.is_empty() && !method.contains('/'))
            .then_some((service, method))
    }

    /// Whether trace context may have been in fields that could not be
    /// read (see [`Fields::incomplete`]).
    pub fn partly_read(&self) -> bool {
        self.request.incomplete()
    }
}

#[derive(Debug)]
struct Open {
    request: Fields,
    response: Option<Fields>,
    trailers: Option<Fields>,
    start_ns: u64,
    order: u64,
}

/// One HTTP/2 connection's two directions and its streams in flight.
#[derive(Debug)]
pub struct Connection {
    client: Direction,
    server: Direction,
    open: crate::FastMap<u32, Open>,
    opened: u64,
    /// Joined mid-way: its requests say so.
    joined: bool,
    /// The events of the bytes being read (reused: no allocation per read).
    events: Vec<Event>,
}

impl Connection {
    /// Seen from its preface.
    pub fn new() -> Self {
        Self {
            client: Direction::client(),
            server: Direction::server(),
            open: crate::FastMap::default(),
            opened: 0,
            joined: false,
            events: Vec::new(),
        }
    }

    /// From its start, read from OpenSSL's calls (see
    /// [`Direction::server_over_tls`]).
    pub fn over_tls() -> Self {
        Self {
            server: Direction::server_over_tls(),
            ..Self::new()
        }
    }

    /// Joined mid-connection, at a frame boundary in each direction.
    pub fn joined() -> Self {
        Self {
            client: Direction::joined(),
            server: Direction::joined(),
            joined: true,
            ..Self::new()
        }
    }

    /// Whether both directions' tables resolve every index.
    pub fn synchronised(&self) -> bool {
        self.client.synchronised() && self.server.synchronised()
    }

    /// The client's next bytes, seen at `ts_ns`.
    pub fn client_bytes(&mut self, bytes: &[u8], ts_ns: u64) -> Result<(), Error> {
        self.client_bytes_started(bytes, ts_ns, &mut Vec::new())
    }

    /// [`Self::client_bytes`], with the streams whose request began in
    /// them appended to `started` (see [`Self::request`]).
    pub fn client_bytes_started(
        &mut self,
        bytes: &[u8],
        ts_ns: u64,
        started: &mut Vec<u32>,
    ) -> Result<(), Error> {
        let mut events = std::mem::take(&mut self.events);
        let r = self.client.push(bytes, &mut events);
        self.client_events(&mut events, ts_ns, started);
        self.events = events;
        r
    }

    /// Bytes of the client's the kernel skipped (see [`Direction::gap`]).
    pub fn client_gap(&mut self, n: usize) {
        let mut events = std::mem::take(&mut self.events);
        self.client.gap(n, &mut events);
        self.client_events(&mut events, 0, &mut Vec::new());
        self.events = events;
    }

    /// Bytes of the server's the kernel skipped; streams a DATA frame in
    /// them ended are appended to `out`.
    pub fn server_gap(&mut self, n: usize, ts_ns: u64, out: &mut Vec<Exchange>) {
        let mut events = std::mem::take(&mut self.events);
        self.server.gap(n, &mut events);
        self.server_events(&mut events, ts_ns, out);
        self.events = events;
    }

    /// An open stream's request.
    pub fn request(&self, stream: u32) -> Option<&Fields> {
        self.open.get(&stream).map(|o| &o.request)
    }

    fn client_events(&mut self, events: &mut Vec<Event>, ts_ns: u64, started: &mut Vec<u32>) {
        for e in events.drain(..) {
            match e {
                Event::Headers { stream, block, .. } => {
                    if self.open.contains_key(&stream) {
                        // Request trailers: nothing to read in them.
                        continue;
                    }
                    if self.open.len() >= MAX_STREAMS
                        && let Some(oldest) = self
                            .open
                            .iter()
                            .min_by_key(|(_, o)| o.order)
                            .map(|(id, _)| *id)
                    {
                        self.open.remove(&oldest);
                    }
                    started.push(stream);
                    self.opened += 1;
                    let mut request = block;
                    request.joined = self.joined;
                    self.open.insert(
                        stream,
                        Open {
                            request,
                            response: None,
                            trailers: None,
                            start_ns: ts_ns,
                            order: self.opened,
                        },
                    );
                }
                Event::TableSize(n) => self.server.set_table_size(n),
                Event::EndStream { .. } => {}
            }
        }
    }

    /// The server's next bytes, seen at `ts_ns`; completed exchanges go to
    /// `out`.
    pub fn server_bytes(
        &mut self,
        bytes: &[u8],
        ts_ns: u64,
        out: &mut Vec<Exchange>,
    ) -> Result<(), Error> {
        let mut events = std::mem::take(&mut self.events);
        let r = self.server.push(bytes, &mut events);
        self.server_events(&mut events, ts_ns, out);
        self.events = events;
        r
    }

    fn server_events(&mut self, events: &mut Vec<Event>, ts_ns: u64, out: &mut Vec<Exchange>) {
        for e in events.drain(..) {
            match e {
                Event::Headers {
                    stream,
                    block,
                    end_stream,
                } => {
                    let Some(o) = self.open.get_mut(&stream) else {
                        continue;
                    };
                    let fields = block;
                    let informational =
                        fields.header(":status").is_some_and(|s| s.starts_with('1'));
                    if o.response.is_none() {
                        if !informational {
                            o.response = Some(fields);
                        }
                    } else {
                        o.trailers = Some(fields);
                    }
                    if end_stream {
                        self.complete(stream, ts_ns, out);
                    }
                }
                Event::EndStream { stream } => self.complete(stream, ts_ns, out),
                Event::TableSize(n) => self.client.set_table_size(n),
            }
        }
    }

    fn complete(&mut self, stream: u32, ts_ns: u64, out: &mut Vec<Exchange>) {
        if let Some(o) = self.open.remove(&stream) {
            out.push(Exchange {
                stream,
                request: o.request,
                response: o.response,
                trailers: o.trailers,
                start_ns: o.start_ns,
                end_ns: ts_ns,
            });
        }
    }

    /// Streams whose request started before `ts_ns` and that have no
    /// response headers yet: ended as unanswered (no response, no
    /// trailers), at `ts_ns`. A stream that was answered and streams on
    /// stays open until it ends.
    pub fn expire_before(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        let expired: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, o)| o.response.is_none() && o.start_ns < ts_ns)
            .map(|(id, _)| *id)
            .collect();
        for stream in expired {
            self.complete(stream, ts_ns, out);
        }
    }

    /// Requests still waiting for their responses.
    pub fn in_flight(&self) -> usize {
        self.open.len()
    }
}

impl Default for Connection {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::h2::testing::frame;
    use crate::http::{context::Propagation, h2::frame::PREFACE};

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// Literal fields; `index` ones are added to the table (§6.2.1).
    fn block(fields: &[(&str, &str)], index: bool) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in fields {
            b.push(if index { 0x40 } else { 0x00 });
            for s in [n, v] {
                b.push(s.len() as u8);
                b.extend_from_slice(s.as_bytes());
            }
        }
        b
    }

    const HEADERS: u8 = 1;
    const SETTINGS: u8 = 4;
    const DATA: u8 = 0;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;

    fn request(stream: u32, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut fields = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "inventory:50051"),
            ("content-type", "application/grpc"),
        ];
        fields.extend_from_slice(extra);
        let mut w = frame(HEADERS, END_HEADERS, stream, &block(&fields, false));
        w.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 2, 8, 1]));
        w
    }

    fn response(stream: u32, grpc_status: &str) -> Vec<u8> {
        let mut w = frame(
            HEADERS,
            END_HEADERS,
            stream,
            &block(
                &[(":status", "200"), ("content-type", "application/grpc")],
                false,
            ),
        );
        w.extend(frame(DATA, 0, stream, &[0, 0, 0, 0, 1, 9]));
        w.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &block(&[("grpc-status", grpc_status)], false),
        ));
        w
    }

    #[test]
    fn concurrent_grpc_calls_on_one_connection_pair_by_stream() {
        let mut c = Connection::new();
        let mut out = Vec::new();
        let mut client = PREFACE.to_vec();
        for s in [1u32, 3, 5] {
            let tp = format!("00-0af7651916cd43dd8448eb211c8031{s:02x}-b7ad6b7169203331-01");
            client.extend(request(
                s,
                "/shop.Inventory/Reserve",
                &[("traceparent", &tp)],
            ));
        }
        c.client_bytes(&client, 100).unwrap();
        assert_eq!(c.in_flight(), 3);
        // Answers out of order: 5, then 1, then 3 (failing).
        c.server_bytes(&response(5, "0"), 200, &mut out).unwrap();
        c.server_bytes(&response(1, "0"), 300, &mut out).unwrap();
        c.server_bytes(&response(3, "14"), 400, &mut out).unwrap();
        assert_eq!(c.in_flight(), 0);
        let ids: Vec<u32> = out.iter().map(|e| e.stream).collect();
        assert_eq!(ids, [5, 1, 3]);
        let e = &out[2];
        assert!(e.is_grpc());
        assert_eq!(e.rpc(), Some(("shop.Inventory", "Reserve")));
        assert_eq!((e.status(), e.grpc_status()), (Some(200), Some(14)));
        assert_eq!((e.start_ns, e.end_ns), (100, 400));
        let ctx = Propagation::from_headers(&e.request);
        assert_eq!(
            ctx.primary().map(|c| c.trace_id.as_str()),
            Some("0af7651916cd43dd8448eb211c803103")
        );
        assert!(!e.partly_read());
    }

    #[test]
    fn joined_mid_connection_a_traceparent_is_known_by_its_shape_and_the_rest_partly_read() {
        let mut c = Connection::joined();
        let mut out = Vec::new();
        // Stream 7's request: :method from the static table, the trace
        // header from an entry inserted before the reader joined (index
        // 62) with a new value (literal, indexed name 62).
        let mut b = vec![0x83, 0x0f, 0x2f];
        b.push(TP.len() as u8);
        b.extend_from_slice(TP.as_bytes());
        c.client_bytes(&frame(HEADERS, END_HEADERS | END_STREAM, 7, &b), 10)
            .unwrap();
        // Stream 9's: an unknown field whose value could be anything.
        c.client_bytes(
            &frame(HEADERS, END_HEADERS | END_STREAM, 9, &[0x83, 0xbe]),
            20,
        )
        .unwrap();
        for s in [7, 9] {
            c.server_bytes(
                &frame(HEADERS, END_HEADERS | END_STREAM, s, &[0x88]),
                30,
                &mut out,
            )
            .unwrap();
        }
        let seven = &out[0];
        assert_eq!(seven.request.inferred, 1);
        assert!(!seven.partly_read());
        assert_eq!(
            Propagation::from_headers(&seven.request)
                .primary()
                .map(|c| c.parent_span_id.as_str()),
            Some("b7ad6b7169203331")
        );
        assert_eq!(seven.status(), Some(200));
        let nine = &out[1];
        assert!(nine.partly_read(), "{nine:?}");
        assert_eq!(nine.request.unknown, 1);
        // Both say where they were read: on a connection joined mid-way.
        assert!(seven.request.joined && nine.request.joined);
        assert!(!c.synchronised());
        // Its own insertions it can read: from the start, all of them.
        let mut fresh = Connection::new();
        let mut w = PREFACE.to_vec();
        w.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &block(&[("traceparent", TP)], true),
        ));
        w.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0xbe]));
        fresh.client_bytes(&w, 1).unwrap();
        let mut out = Vec::new();
        // The server's preface first, as a server writes it.
        fresh
            .server_bytes(&frame(SETTINGS, 0, 0, &[]), 2, &mut out)
            .unwrap();
        for s in [1, 3] {
            fresh
                .server_bytes(
                    &frame(HEADERS, END_HEADERS | END_STREAM, s, &[0x88]),
                    2,
                    &mut out,
                )
                .unwrap();
        }
        assert!(
            out.iter()
                .all(|e| e.request.header("traceparent") == Some(TP) && !e.request.joined)
        );
        assert!(fresh.synchronised());
    }
}
