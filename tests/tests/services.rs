//! Calls through Services, as kube-proxy makes them: two nodes (network
//! namespaces with their own bridges, conntrack and iptables), real DNAT
//! rules for each ClusterIP with two backends, one agent per node attached
//! only to its node's veths, real HTTP servers and curl, a real OTLP
//! receiver. Each test asserts what both agents report and export together.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use tracegap_agent::{
    export::{ExportConfig, OtlpProtocol},
    gap::span::ExportMode,
    identity::parse_names_file,
    report::Report,
};
use tracegap_tests::{
    agent::Agent,
    cluster::Cluster,
    demo::{Behaviour, Service, ServiceSpec},
    otlp::{Received, Receiver},
    privileged,
};

/// Dropped in field order: servers, agents, receiver, then the cluster.
struct Lab {
    services: Vec<Service>,
    agents: Vec<Agent>,
    receiver: Receiver,
    cluster: Cluster,
}

/// A cluster with `pods` on each node, a Service per name in `services`
/// (its backends: the pods of that name on both nodes), and an agent per
/// node exporting every hop (`--export all`), so each hop's span shows
/// which agent exported it and which pod served it.
fn lab(pods: [&[&str]; 2], services: &[&str]) -> anyhow::Result<Lab> {
    let mut cluster = Cluster::new(pods)?;
    for name in services {
        cluster.add_service_for_pods(name)?;
    }
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let identities = parse_names_file(&cluster.names_file("lab"))?;
    let agents = cluster.start_agents(
        &Cluster::agent_config(
            ExportConfig {
                protocol: OtlpProtocol::Grpc,
                interval: Duration::from_millis(100),
                ..ExportConfig::default()
            },
            ExportMode::All,
            identities,
            Duration::from_secs(30),
        ),
        receiver.grpc.port(),
        None,
    )?;
    Ok(Lab {
        services: Vec::new(),
        agents,
        receiver,
        cluster,
    })
}

impl Lab {
    fn vip(&self, service: &str) -> Ipv4Addr {
        self.cluster
            .service_ip(service)
            .expect("a service of that name")
    }

    /// Starts `name` on every node that has a pod of that name.
    fn serve(
        &mut self,
        name: &str,
        behaviour: Behaviour,
        downstream: &[&str],
    ) -> anyhow::Result<()> {
        let downstream: Vec<String> = downstream
            .iter()
            .map(|d| format!("http://{}:80/next", self.vip(d)))
            .collect();
        let mut started = Vec::new();
        for (_, pod) in self.cluster.replicas(name) {
            let spec = ServiceSpec {
                downstream: downstream.clone(),
                otlp: None,
                ..ServiceSpec::new(name, 8080, behaviour)
            };
            started.push(spec.start(pod)?);
        }
        self.services.extend(started);
        Ok(())
    }

    /// `n` curls (with `args`) from the pod `from` on node `node` to `url`,
    /// each on a new connection (so kube-proxy picks a backend for each).
    fn curl(
        &self,
        node: usize,
        from: &str,
        url: &str,
        args: &[&str],
        n: usize,
    ) -> anyhow::Result<()> {
        let pod = self.cluster.nodes[node]
            .pods
            .iter()
            .find(|p| p.name == from)
            .expect("the client pod");
        for _ in 0..n {
            pod.curl(url, args)?;
        }
        Ok(())
    }

    /// Both agents' reports, edge by edge.
    fn reports(&self) -> anyhow::Result<Vec<Report>> {
        self.agents
            .iter()
            .map(|a| {
                let (status, body) = a.get_report()?;
                anyhow::ensure!(status == 200, "/report answered {status}");
                Ok(serde_json::from_str(&body)?)
            })
            .collect()
    }

    /// Hops on (source, destination) summed over both agents, per kind.
    fn kinds(&self, src: &str, dst: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for r in self.reports()? {
            for e in r
                .edges
                .iter()
                .filter(|e| e.source == src && e.destination == dst)
            {
                for (k, n) in &e.kinds {
                    *out.entry(k.clone()).or_default() += n;
                }
            }
        }
        Ok(out)
    }

    /// Waits until both agents together report `n` hops on the edge and
    /// the count holds still for a moment (a second report would show).
    fn settle(&self, src: &str, dst: &str, n: u64) -> anyhow::Result<BTreeMap<String, u64>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let kinds = self.kinds(src, dst)?;
            if kinds.values().sum::<u64>() >= n || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(800));
                return self.kinds(src, dst);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Synthetic spans of the edge, once `n` have arrived (and a moment
    /// more, for duplicates to show).
    fn spans(&self, service: &str, n: usize) -> Vec<Received> {
        let of = |s: &Received| s.synthetic() && s.service == service;
        let spans = self.receiver.wait_for(Duration::from_secs(15), |s| {
            s.iter().filter(|s| of(s)).count() >= n
        });
        std::thread::sleep(Duration::from_millis(800));
        let _ = spans;
        self.receiver.spans().into_iter().filter(of).collect()
    }
}

#[test]
fn a_call_through_a_service_on_one_node_is_one_hop_named_after_the_backend() -> anyhow::Result<()> {
    if !privileged("a_call_through_a_service_on_one_node_is_one_hop_named_after_the_backend") {
        return Ok(());
    }
    // Client and backend on node-1: the request is seen addressed to the
    // ClusterIP (leaving the client) and, translated, to the pod; the
    // response from the pod and, un-NATed, from the ClusterIP.
    let mut lab = lab([&["client", "service-b"], &["idle"]], &["service-b"])?;
    lab.serve("service-b", Behaviour::DropsHeaders, &[])?;
    let vip = lab.vip("service-b");
    lab.curl(
        0,
        "client",
        &format!("http://{vip}/checkout?token=s3cr3t"),
        &[],
        4,
    )?;
    let kinds = lab.settle("client", "service-b", 4)?;
    assert_eq!(
        kinds.values().sum::<u64>(),
        4,
        "one hop per request: {kinds:?}"
    );
    assert_eq!(kinds.get("missing_context"), Some(&4));
    // Named after the pod, with the Service beside it, by node-1 only.
    let reports = lab.reports()?;
    let edges: Vec<_> = reports.iter().flat_map(|r| r.edges.iter()).collect();
    assert!(
        edges.iter().all(|e| e.destination != vip.to_string()),
        "{edges:#?}"
    );
    let e = edges
        .iter()
        .find(|e| e.source == "client")
        .expect("the edge");
    assert_eq!(e.via, [format!("{vip}:80")]);
    assert_eq!(e.node.as_deref(), Some("node-1"));
    assert_eq!(e.unanswered, 0, "every response paired: {e:#?}");
    let spans = lab.spans("service-b", 4);
    assert_eq!(spans.len(), 4, "one span per hop");
    for s in &spans {
        assert_eq!(s.attr("server.address"), Some(vip.to_string()), "{s:?}");
        assert_eq!(
            s.attr("network.peer.address").as_deref(),
            Some(lab.cluster.nodes[0].pods[0].ipv4.to_string().as_str())
        );
        assert_eq!(
            s.attr("tracegap.service.address"),
            Some(format!("{vip}:80"))
        );
        assert_eq!(
            s.resource_attr("k8s.pod.name").as_deref(),
            Some("service-b-0")
        );
        assert_eq!(s.resource_attr("k8s.node.name").as_deref(), Some("node-1"));
        assert_eq!(s.attr("url.path").as_deref(), Some("/checkout"));
    }
    assert!(lab.agents[0].metric("tracegap_service_lookups_total{result=\"resolved\"}")? >= 4.0);
    Ok(())
}

#[test]
fn two_agents_report_each_hop_once_across_nodes_and_backends() -> anyhow::Result<()> {
    if !privileged("two_agents_report_each_hop_once_across_nodes_and_backends") {
        return Ok(());
    }
    // service-b has a backend on each node; the client is on node-1. Each
    // new connection is translated on node-1 and lands on either node.
    let mut lab = lab([&["client", "service-b"], &["service-b"]], &["service-b"])?;
    lab.serve("service-b", Behaviour::DropsHeaders, &[])?;
    let vip = lab.vip("service-b");
    let n = 24;
    lab.curl(0, "client", &format!("http://{vip}/items/1"), &[], n)?;
    let kinds = lab.settle("client", "service-b", n as u64)?;
    assert_eq!(kinds.values().sum::<u64>(), n as u64, "{kinds:?}");
    // Reported by the caller's node only, though node-2 saw its share.
    for r in lab.reports()? {
        for e in &r.edges {
            assert_eq!(e.node.as_deref(), Some("node-1"), "{e:#?}");
        }
    }
    // With every hop exported, exactly one span per hop, cluster-wide; both
    // backends served some, and each span names the pod that served it.
    let spans = lab.spans("service-b", n);
    assert_eq!(spans.len(), n, "one span per hop across both agents");
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for s in &spans {
        *by_pod
            .entry(s.resource_attr("k8s.pod.name").unwrap_or_default())
            .or_default() += 1;
        assert_eq!(
            s.attr("tracegap.service.address"),
            Some(format!("{vip}:80"))
        );
    }
    assert_eq!(by_pod.len(), 2, "both backends served: {by_pod:?}");
    // What node-2 saw of the cross-node hops it did not report it did
    // classify: its kernel copied them (a remote client is not local).
    assert!(lab.agents[1].metric("tracegap_kernel_events_total{counter=\"http_requests\"}")? > 0.0);
    Ok(())
}

#[test]
fn broken_propagation_through_services_is_found_once_and_stitched() -> anyhow::Result<()> {
    if !privileged("broken_propagation_through_services_is_found_once_and_stitched") {
        return Ok(());
    }
    // client → ClusterIP → b (either node) → ClusterIP → c (either node);
    // b drops the context. b's node relates b's inbound request to its
    // outbound call, whichever nodes the calls crossed.
    let mut lab = lab(
        [
            &["client", "service-b", "service-c"],
            &["service-b", "service-c"],
        ],
        &["service-b", "service-c"],
    )?;
    lab.serve("service-c", Behaviour::DropsHeaders, &[])?;
    lab.serve("service-b", Behaviour::DropsHeaders, &["service-c"])?;
    let vip = lab.vip("service-b");
    let n = 12;
    let tp = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    lab.curl(
        0,
        "client",
        &format!("http://{vip}/checkout"),
        &["-H", tp],
        n,
    )?;
    let kinds = lab.settle("service-b", "service-c", n as u64)?;
    assert_eq!(
        kinds.get("broken_propagation"),
        Some(&(n as u64)),
        "{kinds:?}"
    );
    assert_eq!(kinds.values().sum::<u64>(), n as u64, "{kinds:?}");
    let spans: Vec<Received> = lab
        .spans("service-c", n)
        .into_iter()
        .filter(|s| s.gap().as_deref() == Some("broken_propagation"))
        .collect();
    assert_eq!(spans.len(), n, "one stitched span per hop");
    for s in &spans {
        // Stitched into the client's trace, under the client's span.
        assert_eq!(s.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.parent_span_id(), "b7ad6b7169203331");
        assert_eq!(s.attr("tracegap.link").as_deref(), Some("inferred"));
    }
    Ok(())
}

#[test]
fn a_client_port_taken_again_is_named_after_each_connections_backend() -> anyhow::Result<()> {
    if !privileged("a_client_port_taken_again_is_named_after_each_connections_backend") {
        return Ok(());
    }
    // The client asks `Connection: close` from the same few ports: the
    // server closes first, so each port is free again at once, and each
    // new connection on it is sent to either backend. A new connection's
    // initial sequence number on the same four-tuple lands just ahead of
    // the last one's, so only the closing exchange tells the agent that
    // the next request on the port is another connection's.
    let mut lab = lab(
        [&["client", "service-b", "service-c"], &["service-b"]],
        &["service-b", "service-c"],
    )?;
    lab.serve("service-c", Behaviour::DropsHeaders, &[])?;
    lab.serve("service-b", Behaviour::DropsHeaders, &["service-c"])?;
    let vip = lab.vip("service-b");
    let args = ["--local-port", "41000-41003", "-H", "Connection: close"];
    // Back to back (a port taken again within milliseconds): every
    // request is one hop, none lost as a message out of its stream.
    let rapid = 12;
    lab.curl(0, "client", &format!("http://{vip}/rapid"), &args, rapid)?;
    let hops = lab.settle("client", "service-b", rapid as u64)?;
    assert_eq!(
        hops.values().sum::<u64>(),
        rapid as u64,
        "one hop per request: {hops:?}"
    );
    lab.settle("service-b", "service-c", rapid as u64)?;
    // Each backend calls service-c once per request it serves, and that
    // call is reported by the backend's own node: the truth each hop's
    // pod is checked against. Paced so that the agent has read each
    // exchange before the port is taken again (conntrack answers for the
    // connection on the port when asked: see README, Services).
    let served = |lab: &Lab| -> anyhow::Result<BTreeMap<String, usize>> {
        let mut served = BTreeMap::new();
        for r in lab.reports()? {
            for e in r
                .edges
                .iter()
                .filter(|e| e.source == "service-b" && e.destination == "service-c")
            {
                let pod = match e.node.as_deref() {
                    Some("node-1") => "service-b-0",
                    _ => "service-b-1",
                };
                *served.entry(pod.to_owned()).or_insert(0) += e.requests as usize;
            }
        }
        Ok(served)
    };
    let before = served(&lab)?;
    let paced = 16;
    for _ in 0..paced {
        lab.curl(0, "client", &format!("http://{vip}/paced"), &args, 1)?;
        std::thread::sleep(Duration::from_millis(300));
    }
    lab.settle("client", "service-b", (rapid + paced) as u64)?;
    lab.settle("service-b", "service-c", (rapid + paced) as u64)?;
    let mut truth = served(&lab)?;
    for (pod, n) in &before {
        *truth.entry(pod.clone()).or_insert(0) -= n;
    }
    truth.retain(|_, n| *n > 0);
    let mut named = BTreeMap::new();
    for s in lab
        .spans("service-b", rapid + paced)
        .into_iter()
        .filter(|s| s.attr("url.path").as_deref() == Some("/paced"))
    {
        *named
            .entry(s.resource_attr("k8s.pod.name").unwrap_or_default())
            .or_insert(0) += 1;
    }
    assert_eq!(truth.values().sum::<usize>(), paced, "{truth:?}");
    assert_eq!(truth.len(), 2, "both backends served: {truth:?}");
    assert_eq!(
        named, truth,
        "each hop named after the pod that served it (spans by pod, against each pod's calls)"
    );
    Ok(())
}

#[test]
fn node_traffic_is_named_after_the_node_never_a_pod() -> anyhow::Result<()> {
    if !privileged("node_traffic_is_named_after_the_node_never_a_pod") {
        return Ok(());
    }
    // A host-network client on node-2 (the node's own namespace) calls the
    // Service; the DNAT happens in node-2's OUTPUT chain, and the backend
    // on node-1 sees the node's address as the client.
    let mut lab = lab([&["service-b"], &["idle"]], &["service-b"])?;
    lab.serve("service-b", Behaviour::DropsHeaders, &[])?;
    let vip = lab.vip("service-b");
    for _ in 0..3 {
        tracegap_tests::run(
            lab.cluster.nodes[1]
                .command("curl")
                .args(["-sS", "--max-time", "5", "-o", "/dev/null"])
                .arg(format!("http://{vip}/health")),
        )?;
    }
    let kinds = lab.settle("node:node-2", "service-b", 3)?;
    assert_eq!(kinds.values().sum::<u64>(), 3, "{kinds:?}");
    for r in lab.reports()? {
        for e in &r.edges {
            // The callee's node reports node traffic; no pod is blamed.
            assert_eq!(
                (e.source.as_str(), e.node.as_deref()),
                ("node:node-2", Some("node-1"))
            );
        }
    }
    Ok(())
}
