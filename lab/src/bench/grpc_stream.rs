//! A healthy node's gRPC traffic as the kernel reports it: unary calls on
//! long-lived HTTP/2 connections, each with valid, sampled W3C context,
//! header blocks HPACK-coded as a Go or Java client codes them (every
//! field indexed into the dynamic table, a new `traceparent` per call
//! pushing old entries out), each call answered `grpc-status: 0`.

use tracegap_agent::events::{Flow, RawEvent};
use tracegap_common::{Direction, EventKind};

use super::{Records, ep};

/// The static table indices the encoder names (RFC 7541 Appendix A).
const STATIC_NAMES: [(&str, usize); 6] = [
    (":authority", 1),
    (":path", 4),
    ("content-type", 31),
    ("user-agent", 58),
    (":status", 8),
    ("grpc-status", 0),
];
/// Whole static fields used.
const STATIC_FIELDS: [((&str, &str), usize); 3] = [
    ((":method", "POST"), 3),
    ((":scheme", "http"), 6),
    ((":status", "200"), 8),
];

/// One direction's HPACK encoder: incremental indexing of every field,
/// plain (not Huffman) strings, a 4096-byte table.
#[derive(Default)]
struct Encoder {
    /// Newest first.
    table: Vec<(String, String)>,
    size: usize,
}

impl Encoder {
    const MAX: usize = 4096;

    fn integer(out: &mut Vec<u8>, first: u8, prefix: u8, mut v: usize) {
        let max = (1usize << prefix) - 1;
        if v < max {
            out.push(first | v as u8);
            return;
        }
        out.push(first | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        Self::integer(out, 0, 7, s.len());
        out.extend_from_slice(s.as_bytes());
    }

    fn field(&mut self, out: &mut Vec<u8>, name: &str, value: &str) {
        if let Some((_, i)) = STATIC_FIELDS
            .iter()
            .find(|((n, v), _)| *n == name && *v == value)
        {
            return Self::integer(out, 0x80, 7, *i);
        }
        if let Some(at) = self.table.iter().position(|(n, v)| n == name && v == value) {
            return Self::integer(out, 0x80, 7, 62 + at);
        }
        let name_index = STATIC_NAMES
            .iter()
            .find(|(n, i)| *n == name && *i > 0)
            .map(|(_, i)| *i)
            .or_else(|| {
                self.table
                    .iter()
                    .position(|(n, _)| n == name)
                    .map(|at| 62 + at)
            });
        match name_index {
            Some(i) => Self::integer(out, 0x40, 6, i),
            None => {
                out.push(0x40);
                Self::string(out, name);
            }
        }
        Self::string(out, value);
        self.table.insert(0, (name.to_owned(), value.to_owned()));
        self.size += name.len() + value.len() + 32;
        while self.size > Self::MAX {
            if let Some((n, v)) = self.table.pop() {
                self.size -= n.len() + v.len() + 32;
            }
        }
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

const HEADERS: u8 = 1;
const DATA: u8 = 0;
const SETTINGS: u8 = 4;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// One connection's state: its flow, sequence numbers and encoders.
struct Conn {
    flow: Flow,
    seq: (u32, u32),
    enc: (Encoder, Encoder),
    next_stream: u32,
}

/// `calls` unary calls round robin on `connections` connections, encoded
/// as ring-buffer records: per connection its preface and SETTINGS, then
/// per call the client's segment (HEADERS, DATA) and the server's (HEADERS,
/// DATA, trailers).
pub fn records(connections: u32, calls: u32) -> Records {
    let mut r = Records {
        bytes: Vec::new(),
        bounds: Vec::new(),
    };
    let push = |r: &mut Records, e: RawEvent| {
        let at = r.bytes.len();
        e.encode_into(&mut r.bytes);
        r.bounds.push((at, r.bytes.len()));
    };
    let event = |flow: Flow, direction, seq, ts_ns, payload: Vec<u8>| {
        super::event(
            (ts_ns, flow, 1, direction, EventKind::Http2),
            (seq, 0),
            payload,
        )
    };
    let mut conns: Vec<Conn> = (0..connections)
        .map(|c| Conn {
            flow: Flow {
                src: ep(1 + c, 41000),
                dst: ep(100_000 + c % 8, 50051),
            },
            seq: (c.wrapping_mul(7919), c.wrapping_mul(104_729)),
            enc: Default::default(),
            next_stream: 1,
        })
        .collect();
    for c in &mut conns {
        let mut client = tracegap_agent::http::h2::frame::PREFACE.to_vec();
        frame(&mut client, SETTINGS, 0, 0, &[]);
        let mut server = Vec::new();
        frame(&mut server, SETTINGS, 0, 0, &[]);
        let (cs, ss) = (client.len() as u32, server.len() as u32);
        push(&mut r, event(c.flow, Direction::Egress, c.seq.0, 0, client));
        push(
            &mut r,
            event(c.flow.reversed(), Direction::Ingress, c.seq.1, 0, server),
        );
        c.seq = (c.seq.0.wrapping_add(cs), c.seq.1.wrapping_add(ss));
    }
    // A small protobuf message behind gRPC's 5-byte prefix.
    let message = [0u8, 0, 0, 0, 4, 0x08, 0x2a, 0x10, 0x01];
    for i in 0..calls {
        let c = &mut conns[(i % connections) as usize];
        let stream = c.next_stream;
        c.next_stream += 2;
        let ts = 1_000_000 + u64::from(i) * 20_000;
        let mut block = Vec::new();
        let tp = format!(
            "00-{:032x}-{:016x}-01",
            0x0af7_6519_16cd_43dd_8448_eb21_1c80_0000u128 + u128::from(i),
            0xb7ad_6b71_6920_0000u64 + u64::from(i),
        );
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/shop.Inventory/Check"),
            (":authority", "inventory:50051"),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.70.0"),
            ("te", "trailers"),
            ("grpc-timeout", "1S"),
            ("traceparent", tp.as_str()),
        ] {
            c.enc.0.field(&mut block, n, v);
        }
        let mut client = Vec::new();
        frame(&mut client, HEADERS, END_HEADERS, stream, &block);
        frame(&mut client, DATA, END_STREAM, stream, &message);
        let mut headers = Vec::new();
        for (n, v) in [(":status", "200"), ("content-type", "application/grpc")] {
            c.enc.1.field(&mut headers, n, v);
        }
        let mut trailers = Vec::new();
        for (n, v) in [("grpc-status", "0"), ("grpc-message", "")] {
            c.enc.1.field(&mut trailers, n, v);
        }
        let mut server = Vec::new();
        frame(&mut server, HEADERS, END_HEADERS, stream, &headers);
        frame(&mut server, DATA, 0, stream, &message);
        frame(
            &mut server,
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &trailers,
        );
        let (cs, ss) = (client.len() as u32, server.len() as u32);
        push(
            &mut r,
            event(c.flow, Direction::Egress, c.seq.0, ts, client),
        );
        push(
            &mut r,
            event(
                c.flow.reversed(),
                Direction::Ingress,
                c.seq.1,
                ts + 10_000,
                server,
            ),
        );
        c.seq = (c.seq.0.wrapping_add(cs), c.seq.1.wrapping_add(ss));
    }
    r
}
