//! What user space allocates per event in the steady state, counted by a
//! counting global allocator (issue 33): a count, not a time, so it holds
//! on any machine. Figures per event are the bench's; this holds the line.
//!
//! The steady state: 8 client pods on keep-alive connections, each past
//! the engine's per-pod history bound ([`MAX_PER_POD`] requests), so that
//! each new request takes the place of one forgotten, as on a node that
//! has run a while (or whose history ages out, 120 s).

use tracegap_agent::gap::classify::MAX_PER_POD;
use tracegap_lab::bench::{UserSpace, allocs, healthy};

#[global_allocator]
static COUNTING: allocs::Counting = allocs::Counting;

const CONNECTIONS: u32 = 8;
/// Calls per connection before counting: past the history bound.
const WARM_CALLS: usize = MAX_PER_POD + 1024;
const COUNTED_CALLS: usize = 4096;

fn stream() -> (tracegap_lab::bench::Records, usize) {
    let calls = (WARM_CALLS + COUNTED_CALLS) * CONNECTIONS as usize;
    let warm_events = 2 * WARM_CALLS * CONNECTIONS as usize;
    (healthy::records(CONNECTIONS, calls as u32), warm_events)
}

#[test]
fn parsing_pairing_and_classifying_a_healthy_hop_allocates_nothing() {
    assert!(
        allocs::installed(),
        "the counting allocator is not installed"
    );
    let (records, warm) = stream();
    let mut u = UserSpace::default();
    let (per_event, spans) = healthy::allocations_per_event(&mut u, &records, warm);
    assert_eq!(spans, 0, "a healthy stream has no gap to export");
    eprintln!("allocations per event: {per_event:.4}");
    assert!(per_event < 0.01, "{per_event:.4} allocations per event");
}

/// `records` through the agent's pipeline: allocations per event past
/// `warm` events, and the report (a healthy stream exports no span).
fn through_the_agent(
    records: &tracegap_lab::bench::Records,
    warm: usize,
) -> (f64, tracegap_agent::report::Report) {
    assert!(
        allocs::installed(),
        "the counting allocator is not installed"
    );
    let mut r = tracegap_agent::replay::Replay::new(&healthy::replay_config(CONNECTIONS));
    let (per_event, spans) = healthy::agent_allocations_per_event(&mut r, records, warm);
    assert_eq!(spans, 0, "a healthy stream has no gap to export");
    (per_event, r.report())
}

#[test]
fn the_agents_pipeline_allocates_nothing_per_event_for_a_healthy_hop() {
    let (records, warm) = stream();
    let (per_event, report) = through_the_agent(&records, warm);
    let hops: u64 = report.edges.iter().map(|e| e.requests).sum();
    assert_eq!(hops as usize * 2, records.len(), "every hop reported");
    eprintln!("allocations per event: {per_event:.4}");
    assert!(per_event < 0.01, "{per_event:.4} allocations per event");
}

#[test]
fn the_agents_pipeline_allocates_nothing_per_grpc_call_for_a_healthy_hop() {
    let calls = (WARM_CALLS + COUNTED_CALLS) * CONNECTIONS as usize;
    let records = tracegap_lab::bench::grpc_stream::records(CONNECTIONS, calls as u32);
    // Each connection's preface and SETTINGS, then two events per call.
    let warm = 2 * CONNECTIONS as usize + 2 * WARM_CALLS * CONNECTIONS as usize;
    let (per_event, report) = through_the_agent(&records, warm);
    let hops: u64 = report.edges.iter().map(|e| e.requests).sum();
    assert_eq!(hops as usize, calls, "every call reported");
    assert!(
        report
            .edges
            .iter()
            .all(|e| e.kinds.keys().all(|k| k == "context_ok")),
        "{report:?}"
    );
    eprintln!("allocations per call: {:.4}", 2.0 * per_event);
    assert!(
        per_event < 0.01,
        "{:.4} allocations per call",
        2.0 * per_event
    );
}
