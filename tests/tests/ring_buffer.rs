//! The whole chain on the real kernel: a TC program attached by the agent's
//! loader to a real veth sees real HTTP, and its event arrives through the
//! BPF ring buffer in user space.

use std::time::Duration;

use tracegap_agent::ebpf::{AttachMode, Observer};
use tracegap_common::{Direction, EventKind};
use tracegap_tests::{Node, collect_events, http::HttpServer, privileged};

/// The attach path is the one meant for this kernel: TCX links from 6.6
/// on (no qdisc involved), a netlink `clsact` filter before (the qdisc is
/// there). The kernel version is read here, apart from the agent's logic.
fn assert_attach_path(attached: &tracegap_agent::ebpf::Attached) -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut v = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    let want = if (major, minor) >= (6, 6) {
        AttachMode::Tcx
    } else {
        AttachMode::Netlink
    };
    assert_eq!(attached.mode, want, "kernel {}", release.trim());
    let qdiscs = tracegap_tests::run(std::process::Command::new("tc").args([
        "qdisc",
        "show",
        "dev",
        &attached.iface,
    ]))?;
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert_eq!(
        qdiscs.contains("clsact"),
        want == AttachMode::Netlink,
        "kernel {}: {qdiscs}",
        release.trim()
    );
    println!(
        "kernel {}: attached with {:?}",
        release.trim(),
        attached.mode
    );
    Ok(())
}

#[test]
fn http_request_on_a_veth_arrives_through_the_ring_buffer() -> anyhow::Result<()> {
    if !privileged("http_request_on_a_veth_arrives_through_the_ring_buffer") {
        return Ok(());
    }
    let node = Node::new(&["client", "server"])?;
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _http = HttpServer::start(server, 8080)?;

    let mut observer = Observer::load()?;
    let attached = observer.attach(&server.host_if)?;
    assert!(attached.new);
    assert_attach_path(&attached)?;
    let mut ring = observer.take_events()?;

    let url = format!("http://{}:8080/hello", server.ipv4);
    let body = client.curl(&url, &[])?;
    assert_eq!(body, "hello from tracegap-tests\n");

    let events = collect_events(&mut ring, Duration::from_secs(5), |ev| {
        ev.iter().any(|e| e.kind == EventKind::Response)
    });
    let request = events
        .iter()
        .find(|e| e.kind == EventKind::Request)
        .unwrap_or_else(|| panic!("no request event among {events:?}"));
    assert!(
        request.payload.starts_with(b"GET /hello HTTP/1.1\r\n"),
        "payload: {:?}",
        String::from_utf8_lossy(&request.payload)
    );
    assert_eq!(request.flow.dst.port, 8080);
    assert_eq!(request.flow.dst.ip, server.addr(false));
    assert_eq!(request.flow.src.ip, client.addr(false));
    // The host-side veth's egress is the way into the server pod.
    assert_eq!(request.direction, Direction::Egress);
    assert_eq!(request.ifindex, attached.ifindex);

    let response = events
        .iter()
        .find(|e| e.kind == EventKind::Response)
        .unwrap_or_else(|| panic!("no response event among {events:?}"));
    assert!(response.payload.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(response.flow, request.flow.reversed());
    assert_eq!(response.direction, Direction::Ingress);
    assert!(response.ts_ns >= request.ts_ns);

    // The counters saw the same thing.
    let counters = observer.counters()?;
    assert!(
        counters.http_requests >= 1 && counters.http_responses >= 1,
        "{counters:?}"
    );
    assert_eq!(counters.ringbuf_full, 0);
    // The client's veth is not watched: nothing was copied on its way out,
    // so the request was copied on its way in, not skipped.
    assert_eq!(counters.second_sightings_skipped, 0, "{counters:?}");

    // Detaching leaves nothing on the interface.
    observer.detach_all()?;
    assert!(observer.interfaces().is_empty());
    Ok(())
}

/// A burst larger than a batch, read by the agent's drain task: it comes in
/// batches of at most `MAX_BATCH` (the first one full, since the whole burst
/// was waiting), each record once, none lost or undecodable, and the drain
/// ends cleanly when its receiver goes.
#[test]
fn a_burst_comes_through_the_drain_task_in_bounded_batches_none_lost() -> anyhow::Result<()> {
    use tracegap_agent::{
        events::{self, EventStream, MAX_BATCH},
        metrics::Metrics,
    };
    if !privileged("a_burst_comes_through_the_drain_task_in_bounded_batches_none_lost") {
        return Ok(());
    }
    const REQUESTS: usize = 1500;
    let node = Node::new(&["client", "server"])?;
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _http = HttpServer::start(server, 8080)?;
    let mut observer = Observer::load()?;
    observer.attach(&server.host_if)?;
    let ring = observer.take_events()?;

    // One curl, one keep-alive connection, REQUESTS requests (URL globbing).
    let url = format!("http://{}:8080/burst/[1-{REQUESTS}]", server.ipv4);
    let body = client.curl(&url, &[])?;
    assert_eq!(body.lines().count(), REQUESTS, "every request answered");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let metrics = Metrics::new();
    let undecodable = metrics.events_undecodable.clone();
    let (batches, drained) = runtime.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let drain = tokio::spawn(events::drain(EventStream::new(ring)?, tx, undecodable));
        let mut batches = Vec::new();
        let (mut requests, mut responses) = (0, 0);
        while requests < REQUESTS || responses < REQUESTS {
            let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
            else {
                anyhow::bail!("{requests} requests and {responses} responses, then nothing");
            };
            requests += batch
                .iter()
                .filter(|e| e.kind == EventKind::Request)
                .count();
            responses += batch
                .iter()
                .filter(|e| e.kind == EventKind::Response)
                .count();
            batches.push(batch);
        }
        drop(rx);
        let drained = tokio::time::timeout(Duration::from_secs(5), drain).await;
        anyhow::Ok((batches, drained))
    })?;
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n <= MAX_BATCH), "{sizes:?}");
    assert_eq!(
        sizes[0], MAX_BATCH,
        "the waiting burst fills the first batch: {sizes:?}"
    );
    let mut paths: Vec<String> = batches
        .iter()
        .flatten()
        .filter(|e| e.kind == EventKind::Request)
        .filter_map(|e| {
            let line = e.payload.split(|&b| b == b' ').nth(1)?;
            Some(String::from_utf8_lossy(line).into_owned())
        })
        .collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), REQUESTS, "each request once");
    assert_eq!(metrics.events_undecodable.get(), 0);
    assert_eq!(observer.counters()?.ringbuf_full, 0);
    // The receiver gone, the drain ends by itself, with no event to wake it.
    assert!(
        matches!(drained, Ok(Ok(Ok(())))),
        "drain ended with {drained:?}"
    );
    observer.detach_all()?;
    Ok(())
}
