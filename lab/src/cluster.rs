//! A two-node cluster on one machine: each node a network namespace with
//! its own bridge, pod veths, routes, conntrack and kube-proxy-style
//! iptables rules; the nodes routed to each other over a veth; each node
//! reachable from the root namespace (where the trace store listens) over
//! an uplink veth.
//!
//! Services are ClusterIPs that exist only as DNAT rules, as with
//! kube-proxy in iptables mode: a chain per Service that picks a backend at
//! random (`-m statistic --mode random`, the probabilities kube-proxy
//! writes), installed on every node, so a call is translated on the
//! caller's node and may land on either.
//!
//! Addresses, for node subnet S (node-1's is S1): pods 10.209.S.0/24,
//! uplinks 10.208.S.0/24 (root .1, node .2), the node-to-node link
//! 10.207.S1.0/24 (node-1 .1, node-2 .2), ClusterIPs 10.96.S1.0/24.
//! Everything is removed when the cluster is dropped: deleting a node's
//! namespace takes its links and rules with it.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use tracegap_agent::{agent::AgentConfig, interfaces::Selection};

use crate::{
    agent::Agent,
    netns::{Node, Pod, run},
};

/// The agents' settle delay in the lab: its services export each span as
/// it ends, and its store is readable at once.
pub const RECONCILE_SETTLE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Queries per second each agent may make to the lab's store: every hop
/// is checked (the default, 20, samples them at production rates).
pub const RECONCILE_QPS: u32 = 2000;

/// A Service: a ClusterIP and port in front of pods.
#[derive(Clone, Debug)]
pub struct ServiceVip {
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub backends: Vec<SocketAddr>,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub services: Vec<ServiceVip>,
    /// Root-namespace routes to the pod networks, removed on drop.
    routes: Vec<String>,
    /// Root-namespace ends of the uplinks, deleted on drop: a namespace's
    /// teardown, which would take them along, runs later in a kernel
    /// worker, and a test that checks for leftovers must not race it.
    uplinks: Vec<String>,
}

/// The port every lab Service listens on, as Kubernetes Services often do.
pub const SERVICE_PORT: u16 = 80;

impl Cluster {
    /// Two nodes, `node-1` and `node-2`, with these pods on each.
    pub fn new(pods: [&[&str]; 2]) -> anyhow::Result<Self> {
        let mut c = Self {
            nodes: Vec::new(),
            services: Vec::new(),
            routes: Vec::new(),
            uplinks: Vec::new(),
        };
        for (i, pods) in pods.iter().enumerate() {
            c.nodes
                .push(Node::in_namespace(&format!("node-{}", i + 1), i, pods)?);
        }
        for node in &c.nodes {
            let (route, root_if) = uplink(node)?;
            c.uplinks.push(root_if);
            c.routes.push(route);
            let sysctl = |k: &str| run(node.command("sysctl").args(["-qw", k]));
            sysctl("net.ipv4.ip_forward=1")?;
            sysctl("net.ipv4.conf.all.rp_filter=0")?;
            // kube-proxy's requirement: bridged traffic (a response from a
            // backend to a client on the same bridge) passes conntrack, so
            // it is un-NATed.
            sysctl("net.bridge.bridge-nf-call-iptables=1")?;
        }
        c.link_nodes()?;
        // Host-network clients look the ClusterIP range up before DNAT
        // picks the backend (and reroutes): like a node's default route.
        let services = format!("10.96.{}.0/24", c.nodes[0].subnet);
        for node in &c.nodes {
            node.ip(&["route", "add", &services, "dev", &node.bridge])?;
        }
        Ok(c)
    }

    fn link_nodes(&self) -> anyhow::Result<()> {
        let (a, b) = (&self.nodes[0], &self.nodes[1]);
        let (a_ns, b_ns) = (ns(a)?, ns(b)?);
        run(std::process::Command::new("ip").args([
            "-n", a_ns, "link", "add", "peer", "type", "veth", "peer", "name", "peer", "netns",
            b_ns,
        ]))?;
        for here in [a, b] {
            let addr = format!("{}/24", self.link_address(here));
            here.ip(&["addr", "add", &addr, "dev", "peer"])?;
            here.ip(&["link", "set", "peer", "up"])?;
        }
        for (here, there) in [(a, b), (b, a)] {
            let via = self.link_address(there).to_string();
            here.ip(&["route", "add", &pod_cidr(there), "via", &via])?;
        }
        Ok(())
    }

    /// Adds a Service named `name` in front of the pods named `name` on
    /// every node (port 8080), as a Deployment's Service selects its pods.
    pub fn add_service_for_pods(&mut self, name: &str) -> anyhow::Result<Ipv4Addr> {
        let backends: Vec<SocketAddr> = self
            .replicas(name)
            .map(|(_, p)| SocketAddr::from((p.ipv4, 8080)))
            .collect();
        anyhow::ensure!(!backends.is_empty(), "no pod named {name} to serve {name}");
        self.add_service(name, &backends)
    }

    /// Adds a Service in front of `backends` on every node (kube-proxy
    /// programs every node alike) and returns its ClusterIP.
    pub fn add_service(&mut self, name: &str, backends: &[SocketAddr]) -> anyhow::Result<Ipv4Addr> {
        let ip = Ipv4Addr::new(10, 96, self.nodes[0].subnet, self.services.len() as u8 + 10);
        let chain = format!("TG-SVC-{}", self.services.len());
        for node in &self.nodes {
            let ipt = |args: &[&str]| {
                run(node
                    .command("iptables")
                    .args(["-w", "-t", "nat"])
                    .args(args))
            };
            if self.services.is_empty() {
                ipt(&["-N", "TG-SERVICES"])?;
                ipt(&["-A", "PREROUTING", "-j", "TG-SERVICES"])?;
                ipt(&["-A", "OUTPUT", "-j", "TG-SERVICES"])?;
            }
            ipt(&["-N", &chain])?;
            ipt(&[
                "-A",
                "TG-SERVICES",
                "-d",
                &format!("{ip}/32"),
                "-p",
                "tcp",
                "--dport",
                &SERVICE_PORT.to_string(),
                "-j",
                &chain,
            ])?;
            // kube-proxy's rule: backend i of n is taken with probability
            // 1/(n-i) among those left, so each gets 1/n.
            for (i, b) in backends.iter().enumerate() {
                let left = backends.len() - i;
                let to = b.to_string();
                let mut rule = vec!["-A", chain.as_str(), "-p", "tcp"];
                let p = format!("{:.5}", 1.0 / left as f64);
                if left > 1 {
                    rule.extend(["-m", "statistic", "--mode", "random", "--probability", &p]);
                }
                rule.extend(["-j", "DNAT", "--to-destination", &to]);
                ipt(&rule)?;
            }
        }
        self.services.push(ServiceVip {
            name: name.to_owned(),
            ip,
            port: SERVICE_PORT,
            backends: backends.to_vec(),
        });
        Ok(ip)
    }

    /// The node's address on the node-to-node link.
    fn link_address(&self, node: &Node) -> Ipv4Addr {
        Ipv4Addr::new(10, 207, self.nodes[0].subnet, node.index as u8 + 1)
    }

    /// The pods named `name` (a service's replicas), with their nodes.
    pub fn replicas<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a Node, &'a Pod)> {
        self.nodes.iter().flat_map(move |n| {
            n.pods
                .iter()
                .filter(move |p| p.name == name)
                .map(move |p| (n, p))
        })
    }

    /// The ClusterIP of the Service `name`.
    pub fn service_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.services.iter().find(|v| v.name == name).map(|v| v.ip)
    }

    /// What every node's agent shares; [`Cluster::start_agents`] fills in
    /// the rest per node (interfaces, addresses, export endpoint, name).
    pub fn agent_config(
        export: tracegap_agent::export::ExportConfig,
        export_mode: tracegap_agent::gap::span::ExportMode,
        services: Vec<(std::net::IpAddr, tracegap_agent::gap::span::Identity)>,
        response_timeout: std::time::Duration,
    ) -> AgentConfig {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        AgentConfig {
            interfaces: Selection::Explicit(Vec::new()),
            listen: any,
            report_listen: Some(any),
            cors_origin: None,
            export,
            export_mode,
            export_unsampled: false,
            services,
            response_timeout,
            kubernetes: None,
            node_name: None,
            reconcile: None,
            thread_evidence: true,
            tls_plaintext: true,
            kernel_log: Default::default(),
            place_by_timing: false,
            silence: Some(Default::default()),
            server_limits: Default::default(),
        }
    }

    /// Starts an agent per node, as the DaemonSet would: in the node's
    /// namespace, on its pods' veths, listening on its uplink address (/report too),
    /// exporting to the trace store's gRPC port as the node reaches it,
    /// with its node name. `config` gives everything else (its interfaces,
    /// listen addresses, export endpoint and node name are replaced).
    pub fn start_agents(
        &self,
        config: &AgentConfig,
        store_grpc_port: u16,
        store_query_port: Option<u16>,
    ) -> anyhow::Result<Vec<Agent>> {
        (0..self.nodes.len())
            .map(|i| self.start_agent(i, config, store_grpc_port, store_query_port, None))
            .collect()
    }

    /// Starts node `i`'s agent (see [`Cluster::start_agents`]), on
    /// `listen` (its /metrics, then its /report addresses) when given, as
    /// one restarted where it was.
    pub fn start_agent(
        &self,
        i: usize,
        config: &AgentConfig,
        store_grpc_port: u16,
        store_query_port: Option<u16>,
        listen: Option<(SocketAddr, Option<SocketAddr>)>,
    ) -> anyhow::Result<Agent> {
        let node = &self.nodes[i];
        let mut c = config.clone();
        c.interfaces = Selection::Explicit(node.pods.iter().map(|p| p.host_if.clone()).collect());
        let any = SocketAddr::from((Self::node_address(node), 0));
        (c.listen, c.report_listen) = listen.unwrap_or((any, Some(any)));
        // Over TLS when the config trusts a CA for it (`--secure`).
        let scheme = |tls: &tracegap_agent::remote::TlsFiles| {
            if tls.ca.is_some() { "https" } else { "http" }
        };
        c.export.endpoint = Some(format!(
            "{}://{}:{store_grpc_port}",
            scheme(&c.export.tls),
            Self::store_address(node)
        ));
        c.node_name = Some(node.name.clone());
        if let (Some(r), Some(port)) = (&mut c.reconcile, store_query_port) {
            r.store = format!(
                "{}://{}:{port}",
                scheme(&r.access.tls),
                Self::store_address(node)
            );
        }
        Agent::start_in(c, node.netns.as_deref())
    }

    /// Starts an agent per node from its image, run as `template` (the
    /// DaemonSet's pod template) says, on the node's network as its host
    /// network. The lab's overlay on the ConfigMap: its trace store, its
    /// veths' names, a response timeout past its slowest
    /// request, and `names` (a names file, the stand-in for the
    /// Kubernetes API the lab does not have) mounted read-only. With
    /// `secured`, the store is reached over TLS: the manifest must mount
    /// Secret `tracegap-otlp-tls` (`deploy/otlp-tls`), which gets the run's
    /// files, and the trace store's settings point into it.
    pub fn start_container_agents(
        &self,
        template: &crate::container::PodTemplate,
        store_grpc_port: u16,
        store_query_port: u16,
        names: &std::path::Path,
        secured: Option<&crate::secure::Secured>,
    ) -> anyhow::Result<Vec<Agent>> {
        use crate::container::{AgentContainer, Placement};
        const NAMES_IN_CONTAINER: &str = "/etc/tracegap/names";
        let names = names
            .canonicalize()
            .with_context(|| format!("locating {}", names.display()))?;
        // With the path the manifest mounts the Secret at.
        let secured = secured
            .map(|s| {
                template
                    .secrets
                    .iter()
                    .find(|(name, _)| name == crate::secure::SECRET)
                    .map(|(_, inside)| (s, std::path::Path::new(inside)))
                    .with_context(|| format!(
                        "the store is behind TLS but the DaemonSet mounts no Secret {}: run it as deploy/otlp-tls says",
                        crate::secure::SECRET
                    ))
            })
            .transpose()?;
        let scheme = if secured.is_some() { "https" } else { "http" };
        self.nodes
            .iter()
            .map(|node| {
                let mut at = Placement {
                    node: node.name.clone(),
                    netns: node.netns.clone(),
                    reach: Some(Self::node_address(node).into()),
                    overlay: vec![
                        (
                            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                            format!("{scheme}://{}:{store_grpc_port}", Self::store_address(node)),
                        ),
                        ("TRACEGAP_IFACE_PATTERNS".into(), node.veth_pattern()),
                        ("TRACEGAP_NAMES_FILE".into(), NAMES_IN_CONTAINER.into()),
                        // The slow scenario's request takes 30 s, the
                        // default's limit.
                        ("TRACEGAP_RESPONSE_TIMEOUT".into(), "60s".into()),
                        // The store's query API, read back as a cluster's
                        // Jaeger would be, at the lab's pace.
                        (
                            "TRACEGAP_TRACE_STORE".into(),
                            format!(
                                "{scheme}://{}:{store_query_port}",
                                Self::store_address(node)
                            ),
                        ),
                        ("TRACEGAP_TRACE_STORE_KIND".into(), "jaeger".into()),
                        (
                            "TRACEGAP_SETTLE_DELAY".into(),
                            format!("{}ms", RECONCILE_SETTLE.as_millis()),
                        ),
                        ("TRACEGAP_TRACE_STORE_QPS".into(), RECONCILE_QPS.to_string()),
                    ],
                    files: vec![(names.clone(), NAMES_IN_CONTAINER.into())],
                    secrets: Vec::new(),
                    without: Vec::new(),
                };
                if let Some((s, mount)) = secured {
                    at.overlay.extend(s.container_store_settings(mount));
                    at.secrets
                        .push((crate::secure::SECRET.into(), s.secret_dir.clone()));
                }
                let name = format!("tracegap-lab-{}-{}", node.name, std::process::id());
                Agent::from_container(AgentContainer::start(template, &at, &name)?)
            })
            .collect()
    }

    /// Where pods on `node` reach the root namespace (the trace store).
    pub fn store_address(node: &Node) -> Ipv4Addr {
        Ipv4Addr::new(10, 208, node.subnet, 1)
    }

    /// The node's address on its uplink: its agent listens there.
    pub fn node_address(node: &Node) -> Ipv4Addr {
        Ipv4Addr::new(10, 208, node.subnet, 2)
    }

    /// The names file the standalone agents read: every pod with its node,
    /// every Service, every node address.
    pub fn names_file(&self, namespace: &str) -> String {
        let mut s = String::from(
            "# IP NAME [NAMESPACE/POD] [node=NODE] [instrumented=BOOL] [kind=pod|service|node]\n",
        );
        for node in &self.nodes {
            for (ip, id) in node.identities(namespace) {
                s.push_str(&format!(
                    "{ip} {} {namespace}/{} node={}\n",
                    id.service,
                    id.pod.unwrap_or_default(),
                    node.name,
                ));
            }
            for ip in [
                node.gateway(),
                Self::node_address(node),
                self.link_address(node),
            ] {
                s.push_str(&format!("{ip} {} kind=node\n", node.name));
            }
        }
        for v in &self.services {
            s.push_str(&format!(
                "{} {} {namespace}/{} kind=service\n",
                v.ip, v.name, v.name
            ));
        }
        s
    }
}

fn ns(node: &Node) -> anyhow::Result<&str> {
    node.netns
        .as_deref()
        .context("a cluster node has a namespace")
}

/// Connects the node to the root namespace; returns the root's route to
/// the node's pods and the root end of the link.
fn uplink(node: &Node) -> anyhow::Result<(String, String)> {
    let s = node.subnet;
    let root_if = format!("tgu{s}x{}", node.index);
    run(std::process::Command::new("ip").args([
        "link",
        "add",
        &root_if,
        "type",
        "veth",
        "peer",
        "name",
        "uplink",
        "netns",
        ns(node)?,
    ]))?;
    let ip = |args: &[&str]| run(std::process::Command::new("ip").args(args)).map(|_| ());
    let (root_addr, node_addr) = (Cluster::store_address(node), Cluster::node_address(node));
    ip(&["addr", "add", &format!("{root_addr}/24"), "dev", &root_if])?;
    ip(&["link", "set", &root_if, "up"])?;
    node.ip(&["addr", "add", &format!("{node_addr}/24"), "dev", "uplink"])?;
    node.ip(&["link", "set", "uplink", "up"])?;
    let route = pod_cidr(node);
    ip(&["route", "add", &route, "via", &node_addr.to_string()])?;
    Ok((route, root_if))
}

/// The node's pod network (its bridge's subnet).
fn pod_cidr(node: &Node) -> String {
    format!("{}/24", Ipv4Addr::from(u32::from(node.gateway()) & !0xff))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &self.routes {
            let _ = run(std::process::Command::new("ip").args(["route", "del", r]));
        }
        for l in &self.uplinks {
            let _ = run(std::process::Command::new("ip").args(["link", "del", l]));
        }
        // The nodes go next.
    }
}
