use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::{
    events::Endpoint,
    http::{message::parse_head, testing::flow},
};

/// Emits `raw` (a head, maybe followed by body bytes) at `seq`.
fn emit(s: &mut Streams, flow: &Flow, seq: u32, ack: u32, raw: &[u8]) -> Option<u32> {
    let head = parse_head(raw).expect("a head");
    let after = &raw[head.len..];
    s.emit(flow, seq, ack, 0, Some(&head), true, after)
        .expect("not emitted before")
        .next
}

const POST: &[u8] = b"POST /upload HTTP/1.1\r\nContent-Length: 100\r\n\r\n";

#[test]
fn a_start_inside_a_body_is_not_a_message() {
    let mut s = Streams::default();
    let f = flow();
    assert_eq!(s.admit(&f, 1000, 5000), Admit::Accept);
    let next = emit(&mut s, &f, 1000, 5000, POST);
    let end = 1000 + POST.len() as u32 + 100;
    assert_eq!(next, Some(end));
    // "GET /evil HTTP/1.1" as the body's own segment.
    assert_eq!(
        s.admit(&f, 1000 + POST.len() as u32, 5000),
        Admit::InsideBody
    );
    assert_eq!(s.admit(&f, end - 20, 5000), Admit::InsideBody);
    assert_eq!(s.admit(&f, end, 5100), Admit::Accept);
    assert_eq!(s.stats.inside_body, 2);
}

#[test]
fn retransmissions_are_duplicates_and_a_reused_port_starts_afresh() {
    let mut s = Streams::default();
    let f = flow();
    let get = b"GET / HTTP/1.1\r\n\r\n";
    emit(&mut s, &f, 1000, 1, get);
    assert_eq!(s.admit(&f, 1000, 1), Admit::Duplicate);
    let head = parse_head(get).expect("a head");
    assert_eq!(
        s.emit(&f, 1000, 1, 0, Some(&head), true, &[]),
        Err(Duplicate)
    );
    // A new connection on the same ports: its sequence numbers start
    // anywhere, here far behind.
    assert_eq!(s.admit(&f, 1000u32.wrapping_sub(1 << 31), 1), Admit::Accept);
}

#[test]
fn a_reused_port_whose_sequence_numbers_run_on_is_a_new_connection() {
    let mut s = Streams::default();
    let (req, rsp) = (flow(), flow().reversed());
    let get = b"GET / HTTP/1.1\r\n\r\n";
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (get_len, ok_len) = (get.len() as u32, ok.len() as u32);
    emit(&mut s, &req, 1000, 5000, get);
    assert_eq!(s.admit(&rsp, 5000, 1000 + get_len), Admit::Accept);
    emit(&mut s, &rsp, 5000, 1000 + get_len, ok);
    // Three seconds later the client's port comes round again: the client's
    // sequence numbers ran on by ~50 MB (clock-driven), the server's start
    // just past the old connection's end (TIME_WAIT reuse: + 65537).
    let (seq, isn) = (1000 + 50_000_000, 5000 + ok_len + 65_537);
    assert_eq!(s.admit(&req, seq, isn + 1), Admit::Accept);
    emit(&mut s, &req, seq, isn + 1, get);
    // The answer: found at the request's acknowledgement.
    assert_eq!(s.admit(&rsp, isn + 1, seq + get_len), Admit::Resync);
    // Within one connection, a start past an unseen message that does not
    // acknowledge anything new stays unsynchronised.
    emit(&mut s, &rsp, isn + 1, seq + get_len, ok);
    let ahead = seq + get_len + 100;
    assert_eq!(
        s.admit(&req, ahead, isn + 1 + ok_len),
        Admit::Unsynchronised
    );
    assert_eq!(s.stats.unsynchronised, 1);
}

#[test]
fn a_lost_boundary_is_found_again_at_the_acknowledged_start() {
    let mut s = Streams::default();
    let (req, rsp) = (flow(), flow().reversed());
    // A chunked upload whose last chunk was not copied.
    let chunked = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    assert_eq!(emit(&mut s, &req, 1000, 7000, chunked), None);
    // A start inside it: not at an acknowledged boundary.
    assert_eq!(s.admit(&req, 1200, 7000), Admit::Unsynchronised);
    // The server answers once it has read the whole request, up to 1500.
    assert_eq!(s.admit(&rsp, 7000, 1500), Admit::Accept);
    emit(
        &mut s,
        &rsp,
        7000,
        1500,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(s.admit(&req, 1400, 7038), Admit::Unsynchronised);
    assert_eq!(s.admit(&req, 1500, 7038), Admit::Resync);
    assert_eq!((s.stats.unsynchronised, s.stats.resyncs), (2, 1));
}

#[test]
fn a_chunked_body_copied_whole_gives_the_next_start() {
    let mut s = Streams::default();
    let f = flow();
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nTrailer: t\r\n\r\nHTTP/1.1";
    let head_len = parse_head(raw).expect("head").len;
    let body = b"3;x=y\r\nabc\r\n0\r\nTrailer: t\r\n\r\n".len();
    assert_eq!(emit(&mut s, &f, 0, 0, raw), Some((head_len + body) as u32));
}

#[test]
fn chunked_lengths() {
    assert_eq!(chunked_len(b"0\r\n\r\n"), Some(5));
    assert_eq!(chunked_len(b"a\r\n0123456789\r\n0\r\n\r\nGET"), Some(20));
    assert_eq!(chunked_len(b"a\r\n0123456789\r\n"), None);
    assert_eq!(chunked_len(b"zz\r\n"), None);
    assert_eq!(chunked_len(b"5\r\nhelloXX0\r\n\r\n"), None);
    assert_eq!(chunked_len(b"ffffffffffffffff\r\n"), None);
    assert_eq!(chunked_len(b""), None);
}

#[test]
fn responses_to_head_1xx_204_and_304_have_no_body() {
    let mut s = Streams::default();
    let (req, rsp) = (flow(), flow().reversed());
    emit(&mut s, &req, 1000, 50, b"HEAD /h HTTP/1.1\r\n\r\n");
    emit(&mut s, &req, 1021, 50, b"GET /g HTTP/1.1\r\n\r\n");
    let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
    // The interim response does not answer the HEAD...
    assert_eq!(
        emit(&mut s, &rsp, 50, 1040, cont),
        Some(50 + cont.len() as u32)
    );
    // ... so the final one still answers it: no body despite its length.
    let to_head = b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n";
    let at = 50 + cont.len() as u32;
    assert_eq!(
        emit(&mut s, &rsp, at, 1040, to_head),
        Some(at + to_head.len() as u32)
    );
    // The GET's response has its body.
    let at = at + to_head.len() as u32;
    let to_get = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
    assert_eq!(
        emit(&mut s, &rsp, at, 1040, to_get),
        Some(at + to_get.len() as u32 + 10)
    );
    let mut at = at + to_get.len() as u32 + 10;
    for status in ["204 No Content", "304 Not Modified"] {
        let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n");
        let next = at + raw.len() as u32;
        assert_eq!(emit(&mut s, &rsp, at, 0, raw.as_bytes()), Some(next));
        at = next;
    }
}

#[test]
fn an_upgraded_connection_carries_no_more_http() {
    let mut s = Streams::default();
    let (req, rsp) = (flow(), flow().reversed());
    emit(
        &mut s,
        &req,
        1000,
        50,
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
    );
    emit(
        &mut s,
        &rsp,
        50,
        1041,
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    );
    assert_eq!(s.admit(&req, 1041, 87), Admit::Tunnel);
    assert_eq!(s.admit(&rsp, 87, 1041), Admit::Tunnel);
}

#[test]
fn connect_tunnels_after_its_2xx_only() {
    let mut s = Streams::default();
    let (req, rsp) = (flow(), flow().reversed());
    let connect = b"CONNECT db:5432 HTTP/1.1\r\n\r\n";
    emit(&mut s, &req, 1000, 50, connect);
    let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
    emit(&mut s, &rsp, 50, 1000 + connect.len() as u32, ok);
    assert_eq!(
        s.admit(&req, 1000 + connect.len() as u32, 50),
        Admit::Tunnel
    );
}

#[test]
fn conflicting_content_lengths_are_no_length() {
    let mut s = Streams::default();
    let f = flow();
    let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\n";
    assert_eq!(emit(&mut s, &f, 0, 0, raw), None);
    assert_eq!(s.admit(&f, raw.len() as u32 + 5, 0), Admit::Unsynchronised);
}

#[test]
fn pipelined_heads_deeper_than_remembered_stay_bounded() {
    let mut s = Streams::default();
    let f = flow();
    let get = b"GET / HTTP/1.1\r\n\r\n";
    let mut seq = 0u32;
    for _ in 0..100 {
        seq = emit(&mut s, &f, seq, 0, get).expect("bodiless");
    }
    assert_eq!(seq, 100 * get.len() as u32);
    assert_eq!(s.len(), 1);
}

#[test]
fn the_stream_table_is_bounded_and_forgets_its_oldest_half_across_the_clock_wrap() {
    // An entry stays at 32 bytes with its key: the bound is memory too.
    assert!(std::mem::size_of::<Stream>() <= 24);
    let mut s = Streams::default();
    let head = parse_head(b"GET / HTTP/1.1\r\n\r\n").expect("a head");
    let flow_n = |n: u32| Flow {
        src: Endpoint {
            ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)),
            port: 40000,
        },
        ..flow()
    };
    // Millisecond times that cross u32::MAX ms halfway through.
    let start_ms = u64::from(u32::MAX) - MAX_STREAMS as u64 / 2;
    let at = |i: u32| (start_ms + u64::from(i)) * 1_000_000;
    for i in 0..MAX_STREAMS as u32 {
        s.emit(&flow_n(i), 1, 1, at(i), Some(&head), true, &[])
            .expect("a new flow");
    }
    assert_eq!(s.map.len(), MAX_STREAMS);
    let i = MAX_STREAMS as u32;
    s.emit(&flow_n(i), 1, 1, at(i), Some(&head), true, &[])
        .expect("a new flow");
    assert!(s.map.len() <= MAX_STREAMS / 2 + 1, "{}", s.map.len());
    // The newest half survived, wrap or not: a start seen again is a
    // duplicate only where the stream was kept.
    assert_eq!(s.admit(&flow_n(i - 1), 1, 1), Admit::Duplicate);
    assert_eq!(s.admit(&flow_n(i - 10), 1, 1), Admit::Duplicate);
    assert_eq!(s.admit(&flow_n(0), 1, 1), Admit::Accept);
    assert_eq!(s.admit(&flow_n(10), 1, 1), Admit::Accept);
}

#[test]
fn after_an_exchange_that_closes_its_connection_the_next_start_is_a_new_connections() {
    let mut s = Streams::default();
    let (req, rsp) = (flow(), flow().reversed());
    let get = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (get_len, ok_len) = (get.len() as u32, ok.len() as u32);
    emit(&mut s, &req, 1000, 5000, get);
    // Its answer, at its place, and its copy from another interface.
    assert_eq!(s.admit(&rsp, 5000, 1000 + get_len), Admit::Accept);
    emit(&mut s, &rsp, 5000, 1000 + get_len, ok);
    assert_eq!(s.admit(&rsp, 5000, 1000 + get_len), Admit::Duplicate);
    // The server closed first; 10 ms later the client's port comes round
    // again: its sequence numbers ran on by only ~160 kB (less than a
    // clock-driven gap tells), the server's are new.
    let seq = 1000 + 160_000;
    assert_eq!(s.admit(&req, seq, 90_000), Admit::Accept);
    emit(&mut s, &req, seq, 90_000, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(s.admit(&rsp, 89_999, seq + 18), Admit::Accept);
    assert_eq!(s.stats.unsynchronised, 0);
    assert_eq!(s.stats.lost, 0);
    // A keep-alive connection: the same start stays a lost boundary.
    let mut k = Streams::default();
    let keep = b"GET / HTTP/1.1\r\n\r\n";
    emit(&mut k, &req, 1000, 5000, keep);
    emit(&mut k, &rsp, 5000, 1000 + keep.len() as u32, ok);
    assert_eq!(
        k.admit(&req, 1000 + 160_000, 5000 + ok_len),
        Admit::Unsynchronised
    );
}

#[test]
fn a_response_that_closes_its_connection_ends_both_directions() {
    let mut s = Streams::default();
    let (req, rsp) = (flow(), flow().reversed());
    let get = b"GET / HTTP/1.1\r\n\r\n";
    let ok = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok";
    emit(&mut s, &req, 1000, 5000, get);
    let head = parse_head(ok).expect("a head");
    let answer = s
        .emit(
            &rsp,
            5000,
            1000 + get.len() as u32,
            0,
            Some(&head),
            true,
            b"ok",
        )
        .expect("not emitted before");
    // What the agent learns from it: the client may take its port again.
    assert!(answer.ends_connection);
    assert_eq!(s.admit(&req, 1000 + 200_000, 77), Admit::Accept);
    // An interim answer ends nothing.
    let mut i = Streams::default();
    emit(&mut i, &req, 1000, 5000, b"GET / HTTP/1.1\r\n\r\n");
    emit(
        &mut i,
        &rsp,
        5000,
        1018,
        b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n",
    );
    assert_ne!(i.admit(&req, 1000 + 200_000, 5000), Admit::Accept);
}
