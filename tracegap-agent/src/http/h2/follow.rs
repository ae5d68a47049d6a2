//! The kernel's HTTP/2 events ([`EventKind::Http2`]) into connections:
//! each direction's bytes in sequence order, the gaps the kernel skipped
//! (DATA) passed over at frame boundaries, requests reported as they start
//! (the engine relates a service's calls to what it was serving then) and
//! exchanges as they end.
//!
//! A connection is known from its client preface: the kernel follows only
//! connections whose start it saw, so an event of an unknown connection
//! (the agent restarted while the kernel's maps lived on) is counted and
//! dropped, never decoded without its table.

use serde::Serialize;
use tracegap_common::EventKind;

use super::{
    exchange::{Connection, Exchange, Fields},
    frame::PREFACE,
};
use crate::{
    FastMap,
    events::{Endpoint, Flow, RawEvent},
};

/// Connections followed at once at most; past it the least recently used
/// is dropped (its open streams counted as unobservable).
pub const MAX_CONNECTIONS: usize = 16 * 1024;
/// A connection with no event for this long is forgotten (its open streams
/// counted as unobservable): the kernel does not report a connection's end.
pub const IDLE_NS: u64 = 10 * 60 * 1_000_000_000;

/// What the connections said.
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

/// Counts for metrics: what could not be read, and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct H2Stats {
    pub connections: u64,
    /// Events of a connection whose preface was not seen.
    pub unknown_connection: u64,
    /// Directions that stopped on bytes that are not HTTP/2 as it should be.
    pub protocol_errors: u64,
    /// Connections the kernel stopped following.
    pub lost: u64,
    /// Streams dropped open: their connection was lost, idle or pushed out.
    pub streams_dropped: u64,
    /// Requests whose header block named table entries never seen (after a
    /// lost block): not classified.
    pub unobservable: u64,
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
    pub stats: H2Stats,
}

impl Connections {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Feeds one [`EventKind::Http2`] event.
    pub fn push(&mut self, e: &RawEvent, lost: bool, out: &mut Vec<Out>) {
        debug_assert_eq!(e.kind, EventKind::Http2);
        let (key, client) = if self.conns.contains_key(&(e.flow, e.ifindex)) {
            ((e.flow, e.ifindex), true)
        } else if self.conns.contains_key(&(e.flow.reversed(), e.ifindex)) {
            ((e.flow.reversed(), e.ifindex), false)
        } else if !lost && e.payload.starts_with(PREFACE) {
            if self.conns.len() >= MAX_CONNECTIONS {
                self.evict_oldest();
            }
            self.stats.connections += 1;
            let c = Conn {
                conn: Connection::new(),
                client_next: None,
                server_next: None,
                via: e.via,
                last_ns: e.ts_ns,
            };
            self.conns.insert((e.flow, e.ifindex), c);
            ((e.flow, e.ifindex), true)
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
        let mut done = Vec::new();
        let (result, started) = if client {
            let mut started = Vec::new();
            if gap > 0 {
                c.conn.client_gap(gap);
            }
            let r = c.conn.client_bytes_started(bytes, e.ts_ns, &mut started);
            (r, started)
        } else {
            if gap > 0 {
                c.conn.server_gap(gap, e.ts_ns, &mut done);
            }
            (c.conn.server_bytes(bytes, e.ts_ns, &mut done), Vec::new())
        };
        if result.is_err() {
            self.stats.protocol_errors += 1;
        }
        for stream in started {
            if let Some(request) = c.conn.request(stream) {
                if request.incomplete() {
                    self.stats.unobservable += 1;
                    continue;
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
        for exchange in done {
            if exchange.unobservable() {
                continue;
            }
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
                if !exchange.unobservable() {
                    out.push(Out::Done {
                        flow: *flow,
                        via: c.via,
                        exchange,
                    });
                }
            }
        }
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
    use tracegap_common::Direction;

    use super::*;
    use crate::http::testing::flow;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// POST, http, `path` (literals, not indexed).
    fn request(stream: u32, path: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86, 0x04, path.len() as u8];
        b.extend_from_slice(path.as_bytes());
        frame(1, 4, stream, &b)
    }

    fn ev(flow: Flow, seq: u32, payload: &[u8]) -> RawEvent {
        RawEvent {
            ts_ns: u64::from(seq),
            flow,
            ifindex: 7,
            direction: Direction::Ingress,
            kind: EventKind::Http2,
            seq,
            ack: 0,
            short_start: false,
            segment_len: payload.len() as u32,
            budget_exhausted: false,
            payload: payload.to_vec().into(),
            via: None,
        }
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
    fn a_connection_the_kernel_lost_or_never_started_is_not_read() {
        let mut c = Connections::default();
        let mut out = Vec::new();
        // No preface seen: counted, not decoded.
        c.push(&ev(flow(), 5, &request(1, "/x")), false, &mut out);
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
        // What comes after is of an unknown connection.
        c.push(&ev(flow(), 2000, &request(3, "/b")), false, &mut out);
        assert_eq!(started(&out), [1]);
        assert_eq!(c.stats.unknown_connection, 2);
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
