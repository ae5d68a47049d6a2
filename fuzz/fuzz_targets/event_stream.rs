//! Arbitrary sequences of kernel events (starts, continuations, responses,
//! retransmissions, out-of-order sequence numbers, interleaved flows, short
//! starts, cut budgets) through the whole user-space path: assembler,
//! pairer, classifier, span builder. Invariants: no panic; no response
//! paired with a request of another flow; every request read starts where
//! the bytes sent on its flow really hold its start line; state bounded.
#![no_main]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use libfuzzer_sys::fuzz_target;
use tracegap_agent::{
    clock::WallClock,
    events::{Endpoint, Flow, RawEvent},
    gap::{
        classify::Engine,
        hop::{Hop, Reply, Request},
        span,
    },
    http::{
        assemble::{Answer, Assembler, MAX_PENDING_PER_FLOW, Message, Pairer},
        message::StartLine,
    },
};
use tracegap_common::{Direction, EventKind};

const PIECES: [&[u8]; 8] = [
    b"GET /a HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
    b"POST /u HTTP/1.1\r\ncontent-length: 10\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /evil HTTP/1.1\r\nx: y\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\n\r\n",
];

fn flow(i: u8) -> Flow {
    let a = Endpoint {
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + (i & 1))),
        port: 40000 + u16::from(i & 2),
    };
    let b = Endpoint {
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
        port: 80,
    };
    if i & 4 == 0 {
        Flow { src: a, dst: b }
    } else {
        Flow { src: b, dst: a }
    }
}

fuzz_target!(|data: &[u8]| {
    let clock = WallClock::new();
    let (mut a, mut pairer, mut engine) = (
        Assembler::default(),
        Pairer::<Arc<Request>>::default(),
        Engine::default(),
    );
    // Per flow: the bytes sent, by sequence number (what the wire held).
    let mut wire: HashMap<Flow, HashMap<u32, u8>> = HashMap::new();
    let mut seqs: HashMap<Flow, u32> = HashMap::new();
    let mut out: Vec<Message> = Vec::new();
    let mut ts = 1u64;
    let mut it = data.chunks(6);
    while let Some(op) = it.next() {
        let [kind, f, piece, cut, jump, ack] = <[u8; 6]>::try_from(op).unwrap_or([0; 6]);
        let flow = flow(f);
        let base = seqs.entry(flow).or_insert(1000);
        // Mostly in order; sometimes back (retransmission) or ahead (loss).
        let seq = match jump % 8 {
            0 => base.wrapping_sub(u32::from(jump)),
            1 => base.wrapping_add(u32::from(jump) * 3),
            _ => *base,
        };
        let mut payload = PIECES[usize::from(piece) % PIECES.len()].to_vec();
        if cut & 0x80 != 0 {
            payload.truncate(usize::from(cut & 0x7f).max(1));
        }
        // A retransmission carries the bytes already sent there.
        let bytes = wire.entry(flow).or_default();
        for (i, b) in payload.iter_mut().enumerate() {
            *b = *bytes.entry(seq.wrapping_add(i as u32)).or_insert(*b);
        }
        *seqs.get_mut(&flow).expect("inserted") = seq.wrapping_add(payload.len() as u32);
        ts += 1000;
        let e = RawEvent {
            ts_ns: ts,
            flow,
            ifindex: u32::from(f >> 6),
            direction: Direction::Ingress,
            kind: match kind % 4 {
                0 => EventKind::Request,
                1 => EventKind::Response,
                _ => EventKind::Continuation,
            },
            seq,
            ack: u32::from(ack) * 19 + 1000,
            short_start: payload.len() < 8,
            segment_len: payload.len() as u32,
            budget_exhausted: kind & 0x10 != 0,
            payload: payload.into(),
            via: None,
        };
        a.push(e, &mut out);
        if kind & 0x20 != 0 {
            a.flush_before(ts, &mut out);
        }
        for m in out.drain(..) {
            if let Ok(head) = &m.head
                && let StartLine::Request { method, .. } = &head.start
            {
                let bytes = &wire[&m.flow];
                let at: Vec<u8> = (0..method.len() as u32)
                    .filter_map(|i| bytes.get(&m.seq.wrapping_add(i)).copied())
                    .collect();
                assert_eq!(
                    at,
                    method.as_bytes(),
                    "a request read where its bytes are not"
                );
            }
            if let Some(req) = Request::from_message(&m) {
                let req = Arc::new(req);
                engine.request_started(&req);
                pairer.request(m.flow, req);
            } else if let Answer::Answered { request, skipped } = pairer.response(&m) {
                assert_eq!(request.flow, m.flow.reversed(), "paired across flows");
                for s in skipped.iter().chain([&request]) {
                    assert_eq!(s.flow, m.flow.reversed());
                }
                let hop = Hop::new(&clock, &request, Reply::from_message(&m), m.ts_ns);
                let v = engine.classify(&hop, None);
                let id = span::Identity::default();
                let _ = span::build(&hop, &v, &id, &id, true);
            }
        }
        assert!(pairer.pending() <= 8 * MAX_PENDING_PER_FLOW);
    }
    for req in pairer.expire_before(u64::MAX) {
        let hop = Hop::new(&clock, &req, None, ts);
        let _ = engine.classify(&hop, None);
    }
});
