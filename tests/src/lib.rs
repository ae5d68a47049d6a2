//! Helpers for tracegap's end-to-end tests. The pods, services, OTLP
//! receiver and in-process agent are the lab's (`tracegap-lab`), so the
//! tests and `cargo xtask lab` exercise the same parts.

pub mod memcg;

pub use tracegap_lab::{
    agent, cluster, http,
    netns::{Child, Node, Pod, TempDir, run},
    service as demo, store as otlp,
};

/// An agent on every pod veth of `node`, /metrics and /report on
/// loopback, exporting gap spans to `receiver` over OTLP/gRPC every 100 ms
/// (the tests wait for spans, not for full batches), naming the node's pods
/// as services in namespace `lab`. A test changes what it is about with
/// `AgentConfig { .., ..agent_config(node, receiver) }`.
pub fn agent_config(node: &Node, receiver: &otlp::Receiver) -> tracegap_agent::agent::AgentConfig {
    use std::net::{Ipv4Addr, SocketAddr};
    use tracegap_agent::export::{ExportConfig, OtlpProtocol};
    tracegap_agent::agent::AgentConfig {
        interfaces: tracegap_agent::interfaces::Selection::Explicit(
            node.pods.iter().map(|p| p.host_if.clone()).collect(),
        ),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        report_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        cors_origin: None,
        export: ExportConfig {
            endpoint: Some(format!("http://127.0.0.1:{}", receiver.grpc.port())),
            protocol: OtlpProtocol::Grpc,
            interval: std::time::Duration::from_millis(100),
            ..ExportConfig::default()
        },
        export_mode: tracegap_agent::gap::span::ExportMode::Gaps,
        export_unsampled: false,
        services: node.identities("lab"),
        response_timeout: std::time::Duration::from_secs(30),
        kubernetes: None,
        node_name: None,
        reconcile: None,
        thread_evidence: true,
    }
}

/// Whether the tests that need the kernel can run; prints why not.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED {test}: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN for netns)"
        );
        return false;
    }
    true
}

/// Reads events from the ring buffer until `done` says the test has what it
/// needs or `timeout` passes; returns everything read.
pub fn collect_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    timeout: std::time::Duration,
    done: impl Fn(&[tracegap_agent::events::RawEvent]) -> bool,
) -> Vec<tracegap_agent::events::RawEvent> {
    let deadline = std::time::Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        while let Some(record) = ring.next() {
            match tracegap_agent::events::RawEvent::decode(&record) {
                Ok(e) => events.push(e),
                Err(e) => panic!("undecodable event: {e}"),
            }
        }
        if done(&events) || std::time::Instant::now() >= deadline {
            return events;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
