//! A healthy node's traffic as the kernel reports it: keep-alive
//! connections, each request with valid, sampled W3C context, each answered
//! 200. Nothing in it is a gap, so user space should only pair and count:
//! what it allocates per event in the steady state is the figure
//! ([`super::allocs`]).

use tracegap_common::{Direction, EventKind};

use super::{Records, UserSpace, ep, event};
use tracegap_agent::{
    agent::AgentConfig,
    events::{BatchDecoder, Flow},
    gap::span::Identity,
    replay::Replay,
};

/// `calls` requests and their responses on `connections` keep-alive
/// connections (round robin), encoded as ring-buffer records.
pub fn records(connections: u32, calls: u32) -> Records {
    let mut r = Records {
        bytes: Vec::new(),
        bounds: Vec::new(),
    };
    // Each connection's next sequence numbers, each way.
    let mut seqs: Vec<(u32, u32)> = (0..connections)
        .map(|c| (c.wrapping_mul(7919), c.wrapping_mul(104_729) ^ 0x5555))
        .collect();
    let rsp: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    for i in 0..calls {
        let c = i % connections;
        let flow = Flow {
            src: ep(1 + c, 40000),
            dst: ep(100_000 + c % 8, 8080),
        };
        let req = format!(
            "GET /api/items/{} HTTP/1.1\r\nHost: shop:8080\r\nUser-Agent: bench\r\n\
             traceparent: 00-{:032x}-{:016x}-01\r\nAccept: */*\r\n\r\n",
            i % 1000,
            0x0af7_6519_16cd_43dd_8448_eb21_1c80_0000u128 + u128::from(i),
            0xb7ad_6b71_6920_0000u64 + u64::from(i),
        );
        let (req_seq, rsp_seq) = seqs[c as usize];
        let req_end = req_seq.wrapping_add(req.len() as u32);
        let rsp_end = rsp_seq.wrapping_add(rsp.len() as u32);
        seqs[c as usize] = (req_end, rsp_end);
        let ts = u64::from(i) * 20_000;
        for e in [
            event(
                (ts, flow, 1, Direction::Egress, EventKind::Request),
                (req_seq, rsp_seq),
                req.into_bytes(),
            ),
            event(
                (
                    ts + 10_000,
                    flow.reversed(),
                    1,
                    Direction::Ingress,
                    EventKind::Response,
                ),
                (rsp_seq, req_end),
                rsp.to_vec(),
            ),
        ] {
            let at = r.bytes.len();
            e.encode_into(&mut r.bytes);
            r.bounds.push((at, r.bytes.len()));
        }
    }
    r
}

/// What the steady state allocates per event: `records` are decoded (as
/// the agent decodes a ring-buffer batch) and pushed through `u`; the
/// first `warm` records are not counted (maps and buffers grow to their
/// working size there). Returns (allocations per event counted, spans
/// built: a healthy stream builds none).
pub fn allocations_per_event(u: &mut UserSpace, records: &Records, warm: usize) -> (f64, usize) {
    let mut spans = 0;
    let mut on_span = |s| {
        std::hint::black_box(s);
        spans += 1;
    };
    let mut counted = 0u64;
    let mut events = 0usize;
    let mut decoder = BatchDecoder::default();
    let mut batch = Vec::with_capacity(super::BATCH);
    for (i, records) in records.batches(super::BATCH).enumerate() {
        let (_, n) = super::allocs::during(|| {
            decoder.decode_all(records, &mut batch);
            for e in batch.drain(..) {
                u.push(e, &mut on_span);
            }
        });
        if i * super::BATCH >= warm {
            counted += n;
            events += super::BATCH;
        }
    }
    (counted as f64 / events.max(1) as f64, spans)
}

/// The agent's configuration for a replay of [`records`]: its callers and
/// callees named (as the Kubernetes API names pods), gaps exported, no
/// trace store.
pub fn replay_config(connections: u32) -> AgentConfig {
    let named = |ip: u32, service: &str| {
        let ep = ep(ip, 0);
        (
            ep.ip,
            Identity {
                service: service.to_owned(),
                namespace: Some("bench".into()),
                pod: Some(format!("{service}-{ip}")),
                ..Identity::unknown(ep.ip)
            },
        )
    };
    let mut services: Vec<_> = (0..connections).map(|c| named(1 + c, "client")).collect();
    services.extend((0..8).map(|c| named(100_000 + c, "shop")));
    AgentConfig {
        services,
        ..super::replay_config()
    }
}

/// [`allocations_per_event`] through the agent's own pipeline
/// ([`Replay`]): metrics, the report and identities too.
pub fn agent_allocations_per_event(r: &mut Replay, records: &Records, warm: usize) -> (f64, usize) {
    let s = agent_steady_state(r, records, warm);
    (s.allocations_per_event, s.spans)
}

/// What the agent's pipeline did per event past `warm` events.
#[derive(Clone, Copy, Debug)]
pub struct SteadyState {
    pub allocations_per_event: f64,
    pub ns_per_event: f64,
    /// Spans built over the whole stream.
    pub spans: usize,
}

/// `records` through `r` a ring-buffer batch at a time, as the agent
/// drains and handles them; past the first `warm` events, timed and their
/// allocations counted.
pub fn agent_steady_state(r: &mut Replay, records: &Records, warm: usize) -> SteadyState {
    let (mut counted, mut events, mut took) = (0u64, 0usize, std::time::Duration::ZERO);
    let mut decoder = BatchDecoder::default();
    let mut batch = Vec::with_capacity(super::BATCH);
    for (i, records) in records.batches(super::BATCH).enumerate() {
        let t = std::time::Instant::now();
        let (_, n) = super::allocs::during(|| {
            decoder.decode_all(records, &mut batch);
            for e in batch.drain(..) {
                r.push(e);
            }
            r.batch_done();
        });
        if i * super::BATCH >= warm {
            took += t.elapsed();
            counted += n;
            events += super::BATCH;
        }
    }
    r.finish();
    let spans = r.take_spans(drop);
    SteadyState {
        allocations_per_event: counted as f64 / events.max(1) as f64,
        ns_per_event: took.as_nanos() as f64 / events.max(1) as f64,
        spans,
    }
}
