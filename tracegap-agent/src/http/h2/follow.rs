//! The kernel's HTTP/2 events ([`EventKind::Http2`]) into connections:
//! each direction's bytes in sequence order, the gaps the kernel skipped
//! (DATA) passed over at frame boundaries, requests reported as they start
//! (the engine relates a service's calls to what it was serving then) and
//! exchanges as they end.
//!
//! A connection is known from its client preface, or joined mid-way: the
//! kernel follows a connection already open (the agent restarted, and gRPC
//! connections live for hours) from a segment that starts with a HEADERS
//! frame. Its first header block says which side is the client (a request
//! starts with `:method`, `:path` or `:scheme`, a response with `:status`:
//! pseudo-header fields come first); the tables are read as joined (see
//! [`super::hpack::Decoder::joined`]): what an unseen entry names is not
//! guessed. An event of a connection neither starts is counted and dropped.

use serde::Serialize;
use tracegap_common::EventKind;

use super::{
    exchange::{Connection, Exchange, Fields},
    frame::PREFACE,
    hpack,
};
use crate::{
    FastMap,
    events::{Endpoint, Flow, RawEvent},
};

/// Connections followed at once at most; past it the least recently used
/// is dropped (its open streams counted as streams_dropped).
pub const MAX_CONNECTIONS: usize = 16 * 1024;
/// A connection with no event for this long is forgotten (its open streams
/// counted as streams_dropped): the kernel does not report a connection's end.
pub const IDLE_NS: u64 = 10 * 60 * 1_000_000_000;

/// What the connections said.
// Held by value, not boxed: a box would allocate per stream (issue 33).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Out {
    /// A request's header block (client → server flow).
    Started {
        flow: Flow,
        via: Option<Endpoint>,
        stream: u32,
        ts_ns: u64,
        request: Fields,
    },
    /// A stream ended: request, response, trailers.
    Done {
        flow: Flow,
        via: Option<Endpoint>,
        exchange: Exchange,
    },
}

/// Counts for metrics: connections, what could not be read, and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct H2Stats {
    pub connections: u64,
    /// Connections read from the middle (their preface unseen).
    pub joined: u64,
    /// Events of a connection whose preface was not seen.
    pub unknown_connection: u64,
    /// Directions that stopped on bytes that are not HTTP/2 as it should be.
    pub protocol_errors: u64,
    /// Connections the kernel stopped following.
    pub lost: u64,
    /// Streams dropped open: their connection was lost, idle or pushed out.
    pub streams_dropped: u64,
    /// Requests whose header block named table entries never seen (a
    /// joined connection, or after a lost block): classified from the
    /// fields read.
    pub partly_read: u64,
    /// Connections refused because the same client end is read on
    /// another interface already (between two pods of one node a
    /// connection crosses both veths): each stream is one hop.
    pub second_sightings: u64,
}

struct Conn {
    conn: Connection,
    /// Sequence number each direction's next byte has (None: none yet).
    client_next: Option<u32>,
    server_next: Option<u32>,
    via: Option<Endpoint>,
    last_ns: u64,
}

/// Every followed HTTP/2 connection on the node.
#[derive(Default)]
pub struct Connections {
    /// By client → server flow and interface.
    conns: FastMap<(Flow, u32), Conn>,
    /// Which of `conns` each client end is read in. A client's address
    /// and port make one connection at a time, whatever address it is
    /// seen going to (a Service's before DNAT, its pod's after).
    clients: FastMap<Endpoint, (Flow, u32)>,
    pub stats: H2Stats,
    /// Streams started and exchanges done by the event being read (reused:
    /// no allocation per event).
    started: Vec<u32>,
    done: Vec<Exchange>,
}

impl Connections {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections whose HPACK tables still hold entries never seen (joined
    /// mid-way, or after a block the kernel could not copy): their
    /// requests may be read in part.
    pub fn unsynchronised(&self) -> usize {
        self.conns
            .values()
            .filter(|c| !c.conn.synchronised())
            .count()
    }

    /// Feeds one [`EventKind::Http2`] event.
    pub fn push(&mut self, e: &RawEvent, lost: bool, out: &mut Vec<Out>) {
        debug_assert_eq!(e.kind, EventKind::Http2);
        let (key, client) = if self.conns.contains_key(&(e.flow, e.ifindex)) {
            ((e.flow, e.ifindex), true)
        } else if self.conns.contains_key(&(e.flow.reversed(), e.ifindex)) {
            ((e.flow.reversed(), e.ifindex), false)
        } else if !lost && e.payload.starts_with(PREFACE) {
            // No interface: plaintext from OpenSSL's calls.
            let conn = if e.ifindex == 0 {
                Connection::over_tls()
            } else {
                Connection::new()
            };
            if !self.insert((e.flow, e.ifindex), conn, e) {
                return;
            }
            ((e.flow, e.ifindex), true)
        } else if let Some(side) = (!lost).then(|| first_block_side(&e.payload)).flatten() {
            let key = match side {
                Side::Client => (e.flow, e.ifindex),
                Side::Server => (e.flow.reversed(), e.ifindex),
            };
            if !self.insert(key, Connection::joined(), e) {
                return;
            }
            self.stats.joined += 1;
            (key, side == Side::Client)
        } else {
            if !lost {
                self.stats.unknown_connection += 1;
            }
            return;
        };
        if lost {
            self.stats.lost += 1;
            self.drop_conn(&key);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.last_ns = c.last_ns.max(e.ts_ns);
        if c.via.is_none() {
            c.via = e.via;
        }
        let next = if client {
            &mut c.client_next
        } else {
            &mut c.server_next
        };
        let mut bytes = &e.payload[..];
        let mut gap = 0usize;
        if let Some(n) = *next {
            let ahead = e.seq.wrapping_sub(n) as i32;
            if ahead < 0 {
                // Bytes already read (a retransmission): only the new tail.
                let seen = (-(ahead as i64)) as usize;
                if seen >= bytes.len() {
                    return;
                }
                bytes = &bytes[seen..];
            } else {
                gap = ahead as usize;
            }
        }
        *next = Some(e.seq.wrapping_add(e.payload.len() as u32).max_seq(*next));
        let (flow, via) = (key.0, c.via);
        let (started, done) = (&mut self.started, &mut self.done);
        let result = if client {
            if gap > 0 {
                c.conn.client_gap(gap);
            }
            c.conn.client_bytes_started(bytes, e.ts_ns, started)
        } else {
            if gap > 0 {
                c.conn.server_gap(gap, e.ts_ns, done);
            }
            c.conn.server_bytes(bytes, e.ts_ns, done)
        };
        if result.is_err() {
            self.stats.protocol_errors += 1;
        }
        for stream in started.drain(..) {
            if let Some(request) = c.conn.request(stream) {
                if request.incomplete() {
                    self.stats.partly_read += 1;
                }
                out.push(Out::Started {
                    flow,
                    via,
                    stream,
                    ts_ns: e.ts_ns,
                    request: request.clone(),
                });
            }
        }
        for exchange in done.drain(..) {
            out.push(Out::Done {
                flow,
                via,
                exchange,
            });
        }
    }

    /// Streams asked before `ts_ns` and not answered: ended, unanswered.
    pub fn expire_before(&mut self, ts_ns: u64, out: &mut Vec<Out>) {
        for ((flow, _), c) in &mut self.conns {
            let mut done = Vec::new();
            c.conn.expire_before(ts_ns, &mut done);
            for exchange in done {
                out.push(Out::Done {
                    flow: *flow,
                    via: c.via,
                    exchange,
                });
            }
        }
    }

    /// Starts reading a connection; false (counted) if its client end is
    /// read on another interface already.
    fn insert(&mut self, key: (Flow, u32), conn: Connection, e: &RawEvent) -> bool {
        let client = key.0.src;
        if let Some(other) = self.clients.get(&client)
            && other.1 != key.1
            && self.conns.contains_key(other)
        {
            self.stats.second_sightings += 1;
            return false;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.evict_oldest();
        }
        self.clients.insert(client, key);
        self.stats.connections += 1;
        let c = Conn {
            conn,
            client_next: None,
            server_next: None,
            via: e.via,
            last_ns: e.ts_ns,
        };
        self.conns.insert(key, c);
        true
    }

    /// Forgets connections idle since before `ts_ns`.
    pub fn forget_before(&mut self, ts_ns: u64) {
        let idle: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_ns < ts_ns)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.drop_conn(&k);
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(k) = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.last_ns)
            .map(|(k, _)| *k)
        {
            self.drop_conn(&k);
        }
    }

    fn drop_conn(&mut self, key: &(Flow, u32)) {
        if let Some(c) = self.conns.remove(key) {
            self.stats.streams_dropped += c.conn.in_flight() as u64;
        }
        if self.clients.get(&key.0.src) == Some(key) {
            self.clients.remove(&key.0.src);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// Which side sent `bytes`, a HEADERS frame first, by the first
/// pseudo-header its block names: a request's (`:authority`, `:method`,
/// `:path`, `:scheme`) or a response's (`:status`), from the static table
/// or a literal's name, past fields from entries never seen. None: no such
/// field in the frame, or not a HEADERS frame of a client-initiated (odd)
/// stream.
fn first_block_side(bytes: &[u8]) -> Option<Side> {
    let h = bytes.get(..9)?;
    let (kind, flags) = (h[3], h[4]);
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    if kind != 0x1 || stream % 2 == 0 {
        return None;
    }
    let mut at = 9;
    let mut pad = 0;
    if flags & 0x8 != 0 {
        pad = usize::from(*bytes.get(at)?);
        at += 1;
    }
    if flags & 0x20 != 0 {
        at += 5;
    }
    // The frame may go on past what the event holds: what it holds counts.
    let end = (9 + len).checked_sub(pad)?.min(bytes.len());
    match hpack::first_pseudo_header(bytes.get(at..end)?)?.as_slice() {
        b":status" => Some(Side::Server),
        _ => Some(Side::Client),
    }
}

/// The later of two sequence numbers (wrapping), for a direction's end.
trait MaxSeq {
    fn max_seq(self, other: Option<u32>) -> u32;
}

impl MaxSeq for u32 {
    fn max_seq(self, other: Option<u32>) -> u32 {
        match other {
            Some(o) if (o.wrapping_sub(self) as i32) > 0 => o,
            _ => self,
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::http::h2::testing::frame;
    use crate::http::testing::flow;

    /// POST, http, `path` (literals, not indexed).
    fn request(stream: u32, path: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86, 0x04, path.len() as u8];
        b.extend_from_slice(path.as_bytes());
        frame(1, 4, stream, &b)
    }

    fn ev(flow: Flow, seq: u32, payload: &[u8]) -> RawEvent {
        crate::http::testing::event(EventKind::Http2, flow, 7, seq, payload)
    }

    fn started(out: &[Out]) -> Vec<u32> {
        out.iter()
            .filter_map(|o| match o {
                Out::Started { stream, .. } => Some(*stream),
                Out::Done { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_connection_is_known_by_its_preface_and_read_across_skipped_bytes() {
        let mut c = Connections::default();
        let mut out = Vec::new();
        let mut first = PREFACE.to_vec();
        first.extend(request(1, "/a"));
        c.push(&ev(flow(), 1000, &first), false, &mut out);
        // A DATA frame's header (it ends the stream), its payload skipped
        // by the kernel, then the next request after the gap.
        let end = 1000 + first.len() as u32;
        c.push(&ev(flow(), end, &frame(0, 1, 1, &[])[..9]), false, &mut out);
        c.push(
            &ev(flow(), end + 9 + 300, &request(3, "/b")),
            false,
            &mut out,
        );
        // A retransmission of the last event: nothing new.
        c.push(
            &ev(flow(), end + 9 + 300, &request(3, "/b")),
            false,
            &mut out,
        );
        assert_eq!(started(&out), [1, 3]);
        assert_eq!(c.stats.protocol_errors, 0, "{:?}", c.stats);
        // The server's first bytes: a response on stream 1, ending it.
        let mut rsp = frame(4, 0, 0, &[]);
        rsp.extend(frame(1, 5, 1, &[0x88]));
        c.push(&ev(flow().reversed(), 50, &rsp), false, &mut out);
        let done: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Out::Done {
                    exchange, flow: f, ..
                } => Some((exchange.stream, exchange.status(), *f)),
                Out::Started { .. } => None,
            })
            .collect();
        assert_eq!(done, [(1, Some(200), flow())]);
    }

    #[test]
    fn a_connection_seen_on_two_interfaces_is_read_on_the_first_only() {
        let mut c = Connections::default();
        let mut out = Vec::new();
        let on = |ifindex: u32, flow: Flow, seq: u32, payload: &[u8]| {
            crate::http::testing::event(EventKind::Http2, flow, ifindex, seq, payload)
        };
        let mut first = PREFACE.to_vec();
        first.extend(request(1, "/a"));
        // The client's veth: from the preface.
        c.push(&on(7, flow(), 1000, &first), false, &mut out);
        // The server's veth, after DNAT (the same client end, another
        // destination): joined at the server's answer, then a request.
        let mut dnat = flow();
        dnat.dst.port = 8080;
        c.push(
            &on(9, dnat.reversed(), 50, &frame(1, 4, 1, &[0x88])),
            false,
            &mut out,
        );
        let next = 1000 + first.len() as u32;
        c.push(&on(9, dnat, next, &request(3, "/b")), false, &mut out);
        c.push(&on(7, flow(), next, &request(3, "/b")), false, &mut out);
        assert_eq!(started(&out), [1, 3], "each stream once");
        // Each event there that could start a reading is refused.
        assert_eq!(c.stats.second_sightings, 2, "{:?}", c.stats);
        assert_eq!(c.stats.joined, 0, "{:?}", c.stats);
        // Once the first reading is gone, the other interface may read it.
        c.forget_before(u64::MAX);
        c.push(&on(9, dnat, next + 100, &request(5, "/c")), false, &mut out);
        assert_eq!(started(&out), [1, 3, 5]);
    }

    #[test]
    fn a_connection_the_kernel_lost_or_never_started_is_not_read() {
        let mut c = Connections::default();
        let mut out = Vec::new();
        // No preface seen, and no HEADERS frame to join at: counted.
        c.push(&ev(flow(), 5, &frame(0, 0, 1, b"body")), false, &mut out);
        assert_eq!(c.stats.unknown_connection, 1);
        let mut first = PREFACE.to_vec();
        first.extend(request(1, "/a"));
        c.push(&ev(flow(), 1000, &first), false, &mut out);
        assert_eq!(c.len(), 1);
        // The kernel lost it: dropped, its open stream counted.
        c.push(&ev(flow(), 2000, &[]), true, &mut out);
        assert!(c.is_empty());
        assert_eq!(
            (c.stats.lost, c.stats.streams_dropped),
            (1, 1),
            "{:?}",
            c.stats
        );
        // What comes after is of an unknown connection, until a segment
        // starts with a request again (the kernel joins it there too).
        c.push(&ev(flow(), 2000, &frame(0, 1, 1, b"end")), false, &mut out);
        assert_eq!(started(&out), [1]);
        assert_eq!(c.stats.unknown_connection, 2);
        c.push(&ev(flow(), 2100, &request(3, "/b")), false, &mut out);
        assert_eq!(started(&out), [1, 3]);
        assert_eq!(c.stats.joined, 1);
    }

    #[test]
    fn a_connection_joined_mid_way_is_read_from_either_sides_first_block() {
        // The response side first: the connection is keyed by the client.
        let mut c = Connections::default();
        let mut out = Vec::new();
        c.push(
            &ev(flow().reversed(), 50, &frame(1, 5, 1, &[0x88])),
            false,
            &mut out,
        );
        assert_eq!((c.len(), c.stats.joined), (1, 1));
        // Then a request: literal fields, readable without the table.
        c.push(&ev(flow(), 1000, &request(3, "/a")), false, &mut out);
        assert_eq!(started(&out), [3]);
        // A request naming a dynamic entry never seen: read for what it
        // shows, the entry not guessed at, and counted partly read.
        let mut b = vec![0x83, 0x86, 0x04, 2, b'/', b'b', 0xbe];
        let f = frame(1, 4, 5, &std::mem::take(&mut b));
        c.push(
            &ev(flow(), 1000 + request(3, "/a").len() as u32, &f),
            false,
            &mut out,
        );
        assert_eq!(started(&out), [3, 5]);
        assert_eq!(c.stats.partly_read, 1, "{:?}", c.stats);
        let Some(Out::Started {
            request: fields, ..
        }) = out.last()
        else {
            panic!("{out:?}")
        };
        assert!(fields.incomplete());
        assert_eq!(fields.unknown, 1);
        // A first block that starts from the dynamic table says nothing.
        let mut d = Connections::default();
        let other = Flow {
            src: crate::events::Endpoint {
                port: 40001,
                ..flow().src
            },
            ..flow()
        };
        d.push(&ev(other, 7, &frame(1, 4, 1, &[0xbe])), false, &mut out);
        assert_eq!((d.len(), d.stats.unknown_connection), (0, 1));
        // Nor does a frame of a server-initiated (even) stream.
        d.push(&ev(other, 7, &frame(1, 4, 2, &[0x82])), false, &mut out);
        assert_eq!(d.stats.unknown_connection, 2);
        // Nor a known regular field before any pseudo-header (`te`, a
        // literal name, no indexing).
        let te = [
            0x00, 2, b't', b'e', 8, b't', b'r', b'a', b'i', b'l', b'e', b'r', b's', 0x83,
        ];
        d.push(&ev(other, 7, &frame(1, 4, 1, &te)), false, &mut out);
        assert_eq!(d.stats.unknown_connection, 3);
        // gRPC C-core's order: `:path` and `:authority` from its table,
        // then `:method POST` from the static one: a request, joined there
        // and read, the two fields not read counted.
        let core = [0xbf, 0xbe, 0x83, 0x86];
        d.push(&ev(other, 9, &frame(1, 4, 7, &core)), false, &mut out);
        assert_eq!((d.len(), d.stats.joined), (1, 1), "{:?}", d.stats);
        assert_eq!(started(&out).last(), Some(&7));
        // A padded response whose `:status` follows an unknown entry.
        let mut e = Connections::default();
        let padded = [2, 0xbe, 0x88, 0, 0];
        e.push(
            &ev(other.reversed(), 9, &frame(1, 0xc, 9, &padded)),
            false,
            &mut out,
        );
        assert_eq!((e.len(), e.stats.joined), (1, 1), "{:?}", e.stats);
    }

    #[test]
    fn a_request_never_answered_ends_unanswered_and_idle_connections_go() {
        let mut c = Connections::default();
        let mut out = Vec::new();
        let mut first = PREFACE.to_vec();
        first.extend(request(1, "/a"));
        c.push(&ev(flow(), 1000, &first), false, &mut out);
        out.clear();
        c.expire_before(500, &mut out);
        assert!(out.is_empty());
        c.expire_before(2000, &mut out);
        match out.as_slice() {
            [Out::Done { exchange, .. }] => {
                assert_eq!(exchange.stream, 1);
                assert!(exchange.response.is_none() && exchange.trailers.is_none());
            }
            other => panic!("{other:?}"),
        }
        c.forget_before(2000);
        assert!(c.is_empty());
    }
}
