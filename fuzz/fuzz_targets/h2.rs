//! Any bytes on an HTTP/2 connection, from its start or joined mid-way
//! (at every offset),
//! must give header blocks or an error, never a panic; and any header
//! block must decode or fail cleanly, whatever the table holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracegap_agent::http::h2::{
    exchange::Connection,
    frame::{Direction, PREFACE},
    hpack::Decoder,
};

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into pieces of varying size, so
    // frames straddle pushes as they straddle segments.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let mut with_preface = PREFACE.to_vec();
    with_preface.extend_from_slice(rest);
    for (mut d, bytes) in [
        (Direction::client(), with_preface.as_slice()),
        (Direction::server(), rest),
        (Direction::joined(), rest),
    ] {
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            if d.push(piece, &mut out).is_err() {
                assert!(d.lost());
                break;
            }
        }
    }
    // Joined at every offset of the same bytes, as an agent restart lands
    // anywhere in a connection: a frame boundary found or the direction
    // given up, never a panic (the first 256 offsets: each is a whole
    // pass over the input).
    for offset in 0..rest.len().min(256) {
        let mut d = Direction::joined();
        let mut out = Vec::new();
        for piece in rest[offset..].chunks(step) {
            if d.push(piece, &mut out).is_err() {
                assert!(d.lost());
                break;
            }
        }
    }
    // Both directions of one connection, the bytes split between them.
    let mut c = Connection::joined();
    let mut out = Vec::new();
    for (i, piece) in rest.chunks(step).enumerate() {
        let _ = if i % 2 == 0 {
            c.client_bytes(piece, i as u64)
        } else {
            c.server_bytes(piece, i as u64, &mut out)
        };
    }
    for e in &out {
        let _ = (e.rpc(), e.grpc_status(), e.status(), e.partly_read());
        let _ = tracegap_agent::http::context::Propagation::from_headers(&e.request);
    }
    for mut d in [Decoder::new(), Decoder::joined()] {
        d.set_allowed(usize::from(step) * 64);
        for block in rest.split(|b| *b == 0xff) {
            let _ = d.decode(block);
        }
    }
});
