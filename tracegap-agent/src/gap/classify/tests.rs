//! The classification rules on hand-built hops: each rule, the order they
//! apply in, and how concurrent inbound requests are resolved.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::{
    events::{Endpoint, Flow},
    http::context::{Baggage, Propagation, b3_single, traceparent},
};

const T1: &str = "0af7651916cd43dd8448eb211c80319c";
const T2: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn ep(last: u8, port: u16) -> Endpoint {
    Endpoint {
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
        port,
    }
}

/// The request `h` was made with, as the agent records it when it starts.
fn started(e: &mut Engine, h: &Hop) {
    e.request_started(&Arc::new(Request::new(
        h.start_ns,
        h.flow,
        h.seq,
        h.method(),
        h.path(),
        h.host(),
        h.propagation().clone(),
        h.truncated,
    )));
}

fn tp(trace: &str, span: &str, sampled: bool) -> Found {
    traceparent(&format!("00-{trace}-{span}-0{}", sampled as u8))
}

/// A hop from pod `from` to pod `to`, over [start, end] in ms.
fn hop(from: u8, to: u8, start_ms: u64, end_ms: u64, contexts: Vec<Found>) -> Hop {
    let flow = Flow {
        src: ep(from, 40000 + start_ms as u16),
        dst: ep(to, 8080),
    };
    let propagation = Propagation {
        contexts: contexts.into(),
        ..Default::default()
    };
    Hop {
        flow,
        seq: start_ms as u32,
        request: Arc::new(Request::new(
            start_ms * 1_000_000,
            flow,
            start_ms as u32,
            "GET",
            "/",
            None,
            propagation,
            false,
        )),
        status: Some(200),
        start_ns: start_ms * 1_000_000,
        end_ns: end_ms * 1_000_000,
        start: std::time::UNIX_EPOCH,
        unanswered: false,
        truncated: false,
        joined: false,
        unknown_fields: 0,
        via: None,
        protocol: Default::default(),
        grpc_status: None,
        user_agent: None,
        server: None,
    }
}

/// Feeds hops as the agent would: every start in time order, then each
/// completion in end order. Returns verdicts in the order hops were given.
fn run(hops: &[Hop]) -> Vec<Verdict> {
    let mut e = Engine::default();
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, h) in hops.iter().enumerate() {
        events.push((h.start_ns, false, i));
        events.push((h.end_ns, true, i));
    }
    events.sort();
    let mut out = vec![None; hops.len()];
    for (_, done, i) in events {
        let h = &hops[i];
        if done {
            // Pod 9 is known not to be instrumented.
            let instrumented = (h.callee().ip == ep(9, 0).ip).then_some(false);
            out[i] = Some(e.classify(h, instrumented));
        } else {
            started(&mut e, h);
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn kinds(v: &[Verdict]) -> Vec<GapKind> {
    v.iter().map(|v| v.kind).collect()
}

#[test]
fn a_lone_request_is_judged_on_its_own_headers() {
    let v = run(&[
        hop(1, 2, 0, 5, vec![]),
        hop(1, 3, 10, 15, vec![tp(T1, "b7ad6b7169203331", true)]),
        hop(1, 4, 20, 25, vec![tp(T1, "b7ad6b7169203331", false)]),
        hop(1, 5, 30, 35, vec![traceparent("00-trace123-span123-01")]),
        hop(1, 6, 40, 45, vec![b3_single("0")]),
    ]);
    use GapKind::*;
    assert_eq!(
        kinds(&v),
        [
            MissingContext,
            ContextOk,
            Unsampled,
            MalformedContext,
            Unsampled
        ]
    );
    assert!(v[3].detail.contains("trace-id"), "{}", v[3].detail);
}

#[test]
fn two_formats_naming_different_traces_are_a_mismatch() {
    let v = run(&[hop(
        1,
        2,
        0,
        5,
        vec![
            tp(T1, "b7ad6b7169203331", true),
            b3_single(&format!("{T2}-00f067aa0ba902b7-1")),
        ],
    )]);
    assert_eq!(v[0].kind, GapKind::FormatMismatch);
    // The same trace in both formats is fine.
    let v = run(&[hop(
        1,
        2,
        0,
        5,
        vec![
            tp(T1, "b7ad6b7169203331", true),
            b3_single(&format!("{T1}-b7ad6b7169203331-1")),
        ],
    )]);
    assert_eq!(v[0].kind, GapKind::ContextOk);
}

#[test]
fn a_call_without_context_while_serving_a_traced_request_is_broken_propagation() {
    // A(1) → B(2) traced; B → C(3) with nothing, inside the window.
    let v = run(&[
        hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(2, 3, 10, 20, vec![]),
    ]);
    assert_eq!(kinds(&v), [GapKind::ContextOk, GapKind::BrokenPropagation]);
    let link = v[1].link.as_ref().unwrap();
    assert_eq!(link.context.trace_id, T1);
    assert_eq!(link.context.parent_span_id, "aaaaaaaaaaaaaaaa");
    assert_eq!(link.confidence, Confidence::Sole);
    // After the inbound request ended, a call is not attributed to it.
    let v = run(&[
        hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(2, 3, 60, 70, vec![]),
    ]);
    assert_eq!(v[1].kind, GapKind::MissingContext);
    assert!(v[1].link.is_none());
    // Starting a new trace instead of continuing is broken as well.
    let v = run(&[
        hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(2, 3, 10, 20, vec![tp(T2, "cccccccccccccccc", true)]),
    ]);
    assert_eq!(v[1].kind, GapKind::BrokenPropagation);
}

#[test]
fn forwarding_the_same_parent_span_is_passthrough_and_a_new_span_is_not() {
    // A → P → C, P forwards A's parent span id unchanged.
    let v = run(&[
        hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(2, 3, 10, 20, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
    ]);
    // The fault is P's, on the edge leaving it; the hop into P records
    // that P forwarded its context unchanged (P's span gets added there).
    assert_eq!(kinds(&v), [GapKind::ContextOk, GapKind::Passthrough]);
    assert_eq!((v[0].forwarded, v[1].forwarded), (1, 0));
    assert_eq!(v[1].link.as_ref().unwrap().confidence, Confidence::Exact);
    // An instrumented B makes its own span: a new parent id downstream.
    let v = run(&[
        hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(2, 3, 10, 20, vec![tp(T1, "bbbbbbbbbbbbbbbb", true)]),
    ]);
    assert_eq!(kinds(&v), [GapKind::ContextOk, GapKind::ContextOk]);
    assert_eq!(v[0].forwarded, 0);
    assert_eq!(v[1].link.as_ref().unwrap().confidence, Confidence::Exact);
}

#[test]
fn flipping_the_sampled_flag_downstream_is_inconsistent() {
    let v = run(&[
        hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(2, 3, 10, 20, vec![tp(T1, "bbbbbbbbbbbbbbbb", false)]),
    ]);
    assert_eq!(
        kinds(&v),
        [GapKind::ContextOk, GapKind::SamplingInconsistent]
    );
    // Unsampled all along is consistent: just unsampled.
    let v = run(&[
        hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", false)]),
        hop(2, 3, 10, 20, vec![tp(T1, "bbbbbbbbbbbbbbbb", false)]),
    ]);
    assert_eq!(kinds(&v), [GapKind::Unsampled, GapKind::Unsampled]);
}

#[test]
fn b3_in_and_a_new_w3c_trace_out_is_a_format_mismatch() {
    let v = run(&[
        hop(
            1,
            2,
            0,
            50,
            vec![b3_single(&format!("{T1}-aaaaaaaaaaaaaaaa-1"))],
        ),
        hop(2, 3, 10, 20, vec![tp(T2, "bbbbbbbbbbbbbbbb", true)]),
    ]);
    assert_eq!(v[1].kind, GapKind::FormatMismatch);
    assert_eq!(v[1].link.as_ref().unwrap().context.trace_id, T1);
    // Translated faithfully (same trace, other format): fine.
    let v = run(&[
        hop(
            1,
            2,
            0,
            50,
            vec![b3_single(&format!("{T1}-aaaaaaaaaaaaaaaa-1"))],
        ),
        hop(2, 3, 10, 20, vec![tp(T1, "bbbbbbbbbbbbbbbb", true)]),
    ]);
    assert_eq!(v[1].kind, GapKind::ContextOk);
}

#[test]
fn concurrent_inbound_requests_resolve_by_trace_or_stay_ambiguous() {
    // B serves two traced requests at once, then calls C.
    let a1 = hop(1, 2, 0, 100, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]);
    let a2 = hop(4, 2, 5, 100, vec![tp(T2, "dddddddddddddddd", true)]);
    // Without context: ambiguous, both named, neither a parent.
    let v = run(&[a1.clone(), a2.clone(), hop(2, 3, 10, 20, vec![])]);
    assert_eq!(v[2].kind, GapKind::BrokenPropagation);
    let link = v[2].link.as_ref().unwrap();
    assert_eq!(
        link.confidence,
        Confidence::Ambiguous {
            candidates: 2,
            threads: "no_write_turn",
            answers: HandoffSeen::NotAsked,
        }
    );
    assert!(!link.confidence.places());
    let named: Vec<&str> = link
        .candidates
        .iter()
        .map(|c| c.trace_id.as_str())
        .collect();
    assert_eq!(named, [T2, T1], "newest first");
    // With T1's context: the trace id settles it, whatever the order.
    let v = run(&[
        a1,
        a2,
        hop(2, 3, 10, 20, vec![tp(T1, "bbbbbbbbbbbbbbbb", true)]),
    ]);
    assert_eq!(v[2].kind, GapKind::ContextOk);
    assert_eq!(v[2].link.as_ref().unwrap().confidence, Confidence::Exact);
    assert_eq!(v[2].link.as_ref().unwrap().context.trace_id, T1);
}

#[test]
fn baggage_that_stops_at_a_service_is_reported() {
    let mut inbound = hop(1, 2, 0, 50, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]);
    inbound.propagation_mut().baggage = Some(Baggage {
        entries: 1,
        bytes: 9,
        keys: vec!["user-id".into()],
    });
    let v = run(&[
        inbound,
        hop(2, 3, 10, 20, vec![tp(T1, "bbbbbbbbbbbbbbbb", true)]),
    ]);
    assert!(v[1].baggage_dropped);
    assert!(!v[0].baggage_dropped);
}

#[test]
fn memory_is_bounded_and_old_requests_are_forgotten() {
    let mut e = Engine::default();
    for i in 0..(MAX_PER_POD as u64 + 100) {
        let h = hop(1, 2, i, i + 1, vec![]);
        started(&mut e, &h);
    }
    let (pods, reqs) = e.remembered();
    assert_eq!(pods, 2);
    assert_eq!(reqs, 2 * MAX_PER_POD);
    e.forget_before(u64::MAX);
    assert_eq!(e.remembered(), (0, 0));
}

#[test]
fn context_into_a_callee_known_uninstrumented_is_a_gap() {
    let v = run(&[
        hop(1, 9, 0, 5, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(1, 9, 10, 15, vec![tp(T1, "aaaaaaaaaaaaaaaa", false)]),
        hop(1, 9, 20, 25, vec![]),
        hop(1, 2, 30, 35, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
    ]);
    use GapKind::*;
    assert_eq!(
        kinds(&v),
        [Uninstrumented, Unsampled, MissingContext, ContextOk]
    );
    assert!(Uninstrumented.is_gap());
}

#[test]
fn an_http2_request_partly_read_is_unreadable_unless_a_context_was_read() {
    // Fields from HPACK entries never seen (a joined connection): no
    // context among those read is not a missing context.
    let mut partly = hop(1, 2, 0, 5, vec![]);
    partly.protocol = Protocol::Http2;
    partly.truncated = true;
    let v = run(&[partly.clone()]);
    assert_eq!(v[0].kind, GapKind::Unreadable);
    assert!(v[0].detail.contains("HPACK"), "{}", v[0].detail);
    assert!(!v[0].kind.is_gap());
    // A traceparent read (by name or by its value's shape): classified as
    // any request.
    partly.propagation_mut().contexts = [tp(T1, "b7ad6b7169203331", true)].into_iter().collect();
    assert_eq!(run(&[partly])[0].kind, GapKind::ContextOk);
    // Read whole, with no context: missing.
    let mut whole = hop(1, 2, 0, 5, vec![]);
    whole.protocol = Protocol::Http2;
    assert_eq!(run(&[whole])[0].kind, GapKind::MissingContext);
}

/// Pod 2 serves two traced requests at once from pod 1 (`round` apart),
/// each calling pod 3 without context; the answers' write turns name the
/// calls as `names` says (per call: which call's port the answer of its
/// request names, None for none). Returns the calls' confidences.
fn handed_rounds(
    e: &mut Engine,
    rounds: std::ops::Range<u64>,
    names: [Option<usize>; 2],
) -> Vec<Confidence> {
    use super::super::threads::{Tid, Turn};
    use tracegap_common::ThreadTurn;
    let mut out = Vec::new();
    for r in rounds {
        let t = r * 100;
        let traces = [T1, T2];
        let inbound: Vec<Hop> = (0..2)
            .map(|i| {
                hop(
                    1,
                    2,
                    t + i,
                    t + 20 + i,
                    vec![tp(traces[i as usize], "aaaaaaaaaaaaaaaa", true)],
                )
            })
            .collect();
        let calls: Vec<Hop> = (0..2)
            .map(|i| hop(2, 3, t + 5 + i, t + 10 + i, vec![]))
            .collect();
        for h in inbound.iter().chain(&calls) {
            started(e, h);
        }
        for (i, h) in inbound.iter().enumerate() {
            e.thread_turn(Turn {
                ts_ns: h.end_ns - 1,
                client: h.flow.src,
                side: ThreadTurn::ServerWrote,
                thread: Tid { pid: 2, tid: 2 },
                after_call: names[i].map(|c| calls[c].flow.src.port),
            });
        }
        for h in &inbound {
            e.classify(h, None);
        }
        for h in &calls {
            out.push(
                e.classify(h, None)
                    .link
                    .expect("a traced caller")
                    .confidence,
            );
        }
    }
    out
}

#[test]
fn the_answers_place_a_multiplexed_pods_calls_only_once_its_record_is_clean() {
    let mut e = Engine::default();
    // Each request's answer names its own call: 32 calls to earn trust,
    // then placed.
    let learning = handed_rounds(&mut e, 0..16, [Some(0), Some(1)]);
    assert!(
        learning.iter().all(|c| matches!(
            c,
            Confidence::Ambiguous {
                answers: HandoffSeen::Unproven,
                ..
            }
        )),
        "{learning:?}"
    );
    let placed = handed_rounds(&mut e, 16..20, [Some(0), Some(1)]);
    assert!(
        placed
            .iter()
            .all(|c| *c == Confidence::Handoff { candidates: 2 }),
        "{placed:?}"
    );
    // Both answers name the first call: contested, and the second unnamed;
    // the record is no longer clean, and a clean name is not trusted.
    let contested = handed_rounds(&mut e, 20..22, [Some(0), Some(0)]);
    assert!(
        matches!(
            contested[0],
            Confidence::Ambiguous {
                answers: HandoffSeen::Contested,
                ..
            }
        ),
        "{contested:?}"
    );
    assert!(
        matches!(
            contested[1],
            Confidence::Ambiguous {
                answers: HandoffSeen::Unnamed,
                ..
            }
        ),
        "{contested:?}"
    );
    let distrusted = handed_rounds(&mut e, 22..23, [Some(0), Some(1)]);
    assert!(
        distrusted.iter().all(|c| matches!(
            c,
            Confidence::Ambiguous {
                answers: HandoffSeen::Unproven,
                ..
            }
        )),
        "{distrusted:?}"
    );
}

#[test]
fn a_callee_seen_not_to_read_a_format_gets_it_as_a_mismatch_and_a_foreign_context_is_never_missing()
{
    use crate::{gap::formats::FormatsRead, http::context::xray};
    let xr = || xray("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1");
    // A(1) → B(2) in X-Ray; B → C(3) in a new W3C trace: B reads no X-Ray.
    let hops = [
        hop(1, 2, 0, 50, vec![xr()]),
        hop(2, 3, 10, 20, vec![tp(T1, "cccccccccccccccc", true)]),
        hop(1, 2, 60, 70, vec![xr()]),
    ];
    let mut v = run(&hops);
    assert_eq!(v[1].kind, GapKind::FormatMismatch);
    let mut formats = FormatsRead::default();
    // Learnt from B's call; A's calls into B judged with it.
    formats.learn("b", &hops[1], &v[1]);
    formats.learn("a", &hops[2], &v[2]);
    assert_eq!(v[2].kind, GapKind::ContextOk);
    formats.judge("b", &hops[2], &mut v[2]);
    assert_eq!(v[2].kind, GapKind::FormatMismatch);
    assert!(
        v[2].detail.contains("callee does not read xray"),
        "{}",
        v[2].detail
    );
    // Another service, and a B seen continuing X-Ray once, are left as
    // they were.
    let mut other = v[0].clone();
    formats.judge("c", &hops[0], &mut other);
    assert_eq!(other.kind, GapKind::ContextOk);
    let continued = [
        hop(1, 2, 100, 150, vec![xr()]),
        hop(
            2,
            3,
            110,
            120,
            vec![tp(
                "5759e988bd862e3fe1be46a994272793",
                "cccccccccccccccc",
                true,
            )],
        ),
    ];
    let w = run(&continued);
    formats.learn("b", &continued[1], &w[1]);
    let mut again = v[0].clone();
    formats.judge("b", &hops[0], &mut again);
    assert_eq!(again.kind, GapKind::ContextOk);

    // SkyWalking alone: propagated, into no W3C trace; a relay's sw8
    // call names what it received.
    let sw = crate::http::context::sw8(
        "1-YS5iLmM=-ZC5lLmY=-3-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTAuMC4wLjE6ODA4MA==",
    );
    let v = run(&[
        hop(1, 4, 200, 210, vec![sw.clone()]),
        hop(1, 2, 300, 350, vec![tp(T1, "aaaaaaaaaaaaaaaa", true)]),
        hop(2, 3, 310, 320, vec![sw]),
    ]);
    assert_eq!(v[0].kind, GapKind::FormatMismatch);
    assert!(v[0].detail.contains("sw8"), "{}", v[0].detail);
    assert_eq!(v[2].kind, GapKind::FormatMismatch);
    assert!(
        v[2].detail.contains("received w3c and sent only sw8"),
        "{}",
        v[2].detail
    );
    assert_eq!(
        v[2].link.as_ref().map(|l| l.confidence),
        Some(Confidence::Sole)
    );
}
