//! gRPC end to end: curl's HTTP/2 (nghttp2: HPACK with its dynamic table,
//! several calls on one connection) against a real gRPC server (the lab's
//! OTLP receiver, tonic), the agent on the client's veth, spans at the
//! receiver. A call is a hop named by the RPC conventions and carries its
//! gRPC status; the trace context in its metadata is read; OTLP/gRPC
//! exports on the same wire are telemetry, never hops.

use anyhow::Context;
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use tracegap_agent::{
    agent::AgentConfig, gap::span::Identity, interfaces::Selection, report::Report,
};
use tracegap_tests::{
    Node, TempDir,
    agent::Agent,
    agent_config,
    demo::{Behaviour, ServiceSpec},
    otlp::Receiver,
    privileged,
};

const T1: &str = "0af7651916cd43dd8448eb211c80319c";
const S1: &str = "b7ad6b7169203331";
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Dropped in field order: the agent, the receiver, then the node.
struct Grpc {
    agent: Agent,
    receiver: Receiver,
    node: Node,
    /// Holds `empty.grpc`: an empty message, gRPC-framed (uncompressed,
    /// length 0).
    dir: TempDir,
}

/// The agent on the client pod's veth, exporting to the receiver, which the
/// pods reach as a service that makes no spans of its own (`collector`): a
/// call carrying context into it is a gap to fill.
fn collector_config(node: &Node, receiver: &Receiver) -> AgentConfig {
    let mut services = node.identities("lab");
    services.push((
        IpAddr::V4(node.gateway()),
        Identity {
            service: "collector".into(),
            instrumented: Some(false),
            ..Default::default()
        },
    ));
    AgentConfig {
        interfaces: Selection::Explicit(vec![node.pod("client").host_if.clone()]),
        services,
        ..agent_config(node, receiver)
    }
}

impl Grpc {
    /// A client pod, the receiver on the host (its gRPC server is tonic),
    /// the agent on the client's veth exporting to the receiver.
    fn start() -> anyhow::Result<Self> {
        let node = Node::new(&["client"])?;
        let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
        let agent = Agent::start(collector_config(&node, &receiver))?;
        let dir = TempDir::new("grpc")?;
        std::fs::write(dir.path().join("empty.grpc"), [0u8; 5])?;
        Ok(Self {
            agent,
            receiver,
            node,
            dir,
        })
    }
}

#[test]
fn grpc_calls_are_hops_with_the_rpc_conventions_and_otlp_grpc_exports_are_not() -> anyhow::Result<()>
{
    if !privileged("grpc_calls_are_hops_with_the_rpc_conventions_and_otlp_grpc_exports_are_not") {
        return Ok(());
    }
    let Grpc {
        node,
        receiver,
        agent,
        dir,
    } = Grpc::start()?;
    let body = dir.path().join("empty.grpc");
    let data = format!("@{}", body.display());
    let base = format!("http://{}:{}", node.gateway(), receiver.grpc.port());
    let tp = format!("traceparent: 00-{T1}-{S1}-01");
    let call = |path: &str, extra: Option<&str>| {
        let mut a = vec![
            "--http2-prior-knowledge".to_owned(),
            "-o".into(),
            "/dev/null".into(),
            "-H".into(),
            "content-type: application/grpc".into(),
            "-H".into(),
            "te: trailers".into(),
            "--data-binary".into(),
            data.clone(),
        ];
        if let Some(h) = extra {
            a.extend(["-H".into(), h.to_owned()]);
        }
        a.push(format!("{base}{path}"));
        a
    };
    // tonic answers a method it does not serve with UNIMPLEMENTED and
    // resets the stream, which curl 7.88 reports as a framing error: its
    // exit status says nothing here, the wire and the receiver do.
    let curl = |mut args: Vec<String>| {
        let url = args.pop().unwrap_or_default();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = node.pod("client").curl(&url, &args);
    };
    // An export, a call with context, a call without: a connection each.
    curl(call(EXPORT, Some(&tp)));
    curl(call("/shop.Cart/AddItem", Some(&tp)));
    curl(call("/shop.Cart/Checkout", None));

    let spans = receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter().filter(|s| s.synthetic()).count() >= 2
    });
    let synthetic: Vec<_> = spans.iter().filter(|s| s.synthetic()).collect();
    let by_name = |name: &str| {
        synthetic
            .iter()
            .find(|s| s.span.name == name)
            .ok_or_else(|| {
                let m = agent.get("/metrics").map(|(_, b)| b).unwrap_or_default();
                let m: Vec<&str> = m
                    .lines()
                    .filter(|l| l.contains("h2") || l.contains("ignored"))
                    .collect();
                anyhow::anyhow!(
                    "no span {name}: {m:#?} {:#?}",
                    synthetic.iter().map(|s| &s.span.name).collect::<Vec<_>>()
                )
            })
    };
    // Context carried into a service that makes no span: the span joins
    // the caller's trace, under the caller's span.
    let add = by_name("shop.Cart/AddItem")?;
    assert_eq!(add.gap().as_deref(), Some("uninstrumented"));
    assert_eq!(
        (add.trace_id(), add.parent_span_id()),
        (T1.to_owned(), S1.to_owned())
    );
    assert_eq!(add.attr("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(add.attr("rpc.service").as_deref(), Some("shop.Cart"));
    assert_eq!(add.attr("rpc.method").as_deref(), Some("AddItem"));
    assert_eq!(add.attr("network.protocol.version").as_deref(), Some("2"));
    // tonic has no such service: UNIMPLEMENTED, in a trailers-only answer.
    assert_eq!(add.attr("rpc.grpc.status_code").as_deref(), Some("12"));
    assert_eq!(
        add.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    // No context: a gap of its own, in a new trace.
    let checkout = by_name("shop.Cart/Checkout")?;
    assert_eq!(checkout.gap().as_deref(), Some("missing_context"));
    assert_ne!(checkout.trace_id(), T1);
    // The export is not a hop: no span, not in the report.
    assert!(
        synthetic
            .iter()
            .all(|s| !s.span.name.contains("TraceService")),
        "{synthetic:#?}"
    );
    let (status, body) = agent.get_report()?;
    anyhow::ensure!(status == 200, "/report answered {status}");
    let report: Report = serde_json::from_str(&body)?;
    let edge = report
        .edges
        .iter()
        .find(|e| e.source == "client" && e.destination == "collector")
        .ok_or_else(|| anyhow::anyhow!("no client -> collector edge: {report:#?}"))?;
    let hops: u64 = edge.kinds.values().sum();
    assert_eq!(hops, 2, "{edge:#?}");
    drop(agent);
    drop(receiver);
    drop(node);
    Ok(())
}

#[test]
fn many_concurrent_streams_on_one_connection_are_each_read() -> anyhow::Result<()> {
    if !privileged("many_concurrent_streams_on_one_connection_are_each_read") {
        return Ok(());
    }
    if std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED many_concurrent_streams_on_one_connection_are_each_read: no h2load (nghttp2-client; cargo xtask setup installs it)"
        );
        return Ok(());
    }
    let g = Grpc::start()?;
    const CALLS: usize = 300;
    let base = format!("http://{}:{}", g.node.gateway(), g.receiver.grpc.port());
    let body = g.dir.path().join("empty.grpc");
    // h2load (nghttp2): one connection, 50 streams open at once, HPACK
    // with its dynamic table; first exports (telemetry), then calls.
    for path in [EXPORT, "/shop.Cart/AddItem"] {
        // On one CPU: a sender moving between CPUs can have its segments
        // reordered on the veth under load, which ends the kernel's
        // reading of the connection (README, limits); this test is about
        // streams, not that.
        let out = g
            .node
            .pod("client")
            .command("taskset")
            .args([
                "-c",
                "0",
                "h2load",
                "-n",
                &CALLS.to_string(),
                "-c",
                "1",
                "-m",
                "50",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-H",
                &format!("traceparent: 00-{T1}-{S1}-01"),
                "-d",
            ])
            .arg(&body)
            .arg(format!("{base}{path}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            text.contains(&format!("{CALLS} done")),
            "h2load: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every export paired with its answer and set aside; every call a hop.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut exports, mut hops) = (0.0, 0u64);
    while std::time::Instant::now() < deadline {
        exports = g
            .agent
            .metric("tracegap_ignored_requests_total{reason=\"telemetry\"}")?;
        let (_, body) = g.agent.get_report()?;
        let report: Report = serde_json::from_str(&body)?;
        hops = report
            .edges
            .iter()
            .filter(|e| e.source == "client" && e.destination == "collector")
            .flat_map(|e| e.kinds.values())
            .sum();
        if exports >= CALLS as f64 && hops >= CALLS as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = || {
        g.agent
            .get("/metrics")
            .map(|(_, b)| {
                b.lines()
                    .filter(|l| {
                        l.contains("h2") || l.contains("ignored") || l.contains("requests_total")
                    })
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(exports, CALLS as f64, "{:#?}", metrics());
    assert_eq!(hops, CALLS as u64, "{:#?}", metrics());
    // Nothing unread, nothing lost, the connection still followed.
    assert_eq!(
        g.agent.metric("tracegap_h2_unread_total")?,
        0.0,
        "{:#?}",
        metrics()
    );
    assert_eq!(
        g.agent
            .metric("tracegap_kernel_events_total{counter=\"h2_lost\"}")?,
        0.0,
        "{:#?}",
        metrics()
    );
    let spans = g.receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter().filter(|s| s.synthetic()).count() >= CALLS
    });
    let calls: Vec<_> = spans.iter().filter(|s| s.synthetic()).collect();
    assert_eq!(calls.len(), CALLS);
    assert!(calls.iter().all(|s| s.span.name == "shop.Cart/AddItem"
        && s.attr("rpc.grpc.status_code").as_deref() == Some("12")
        && s.parent_span_id() == S1));
    Ok(())
}

#[test]
fn a_grpc_service_that_drops_the_context_on_its_http_call_is_stitched() -> anyhow::Result<()> {
    if !privileged("a_grpc_service_that_drops_the_context_on_its_http_call_is_stitched") {
        return Ok(());
    }
    // gRPC in, HTTP/1.1 out: a gRPC service (no tracing) serving a call
    // that carries context, calling a web server without it. The call in
    // is read when it starts, so the call out, which ends first, is
    // related to it.
    let node = Node::new(&["client", "grpcsvc", "web"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let agent = Agent::start(agent_config(&node, &receiver))?;
    let web = tracegap_tests::http::HttpServer::start(node.pod("web"), 8080)?;
    let grpcsvc = ServiceSpec {
        grpc: true,
        downstream: vec![format!("http://{}:8080/items/7", node.pod("web").ipv4)],
        ..ServiceSpec::new("grpcsvc", 8080, Behaviour::DropsHeaders)
    }
    .start(node.pod("grpcsvc"))?;
    let dir = TempDir::new("grpc-in")?;
    let body = dir.path().join("empty.grpc");
    std::fs::write(&body, [0u8; 5])?;
    let data = format!("@{}", body.display());
    let tp = format!("traceparent: 00-{T1}-{S1}-01");
    let url = format!("http://{}:8080/lab.Inventory/Get", node.pod("grpcsvc").ipv4);
    node.pod("client").curl(
        &url,
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            &tp,
            "--data-binary",
            &data,
        ],
    )?;
    let spans = receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter()
            .any(|s| s.gap().as_deref() == Some("broken_propagation"))
    });
    let stitched = spans
        .iter()
        .find(|s| s.gap().as_deref() == Some("broken_propagation"))
        .ok_or_else(|| anyhow::anyhow!("no broken_propagation span: {spans:#?}"))?;
    // The web hop, in the gRPC caller's trace, under the span it sent.
    assert_eq!(stitched.span.name, "GET /items/{id}");
    assert_eq!(
        (stitched.trace_id(), stitched.parent_span_id()),
        (T1.to_owned(), S1.to_owned())
    );
    assert_eq!(stitched.attr("tracegap.link").as_deref(), Some("inferred"));
    // The gRPC call itself carried context into a service of unknown
    // instrumentation: a hop, no gap.
    let (_, body) = agent.get_report()?;
    let report: Report = serde_json::from_str(&body)?;
    let kinds = |src: &str, dst: &str| {
        report
            .edges
            .iter()
            .find(|e| e.source == src && e.destination == dst)
            .map(|e| e.kinds.clone())
    };
    assert!(
        kinds("client", "grpcsvc").is_some_and(|k| k.get("context_ok") == Some(&1)),
        "{report:#?}"
    );
    drop((grpcsvc, web, agent, receiver));
    Ok(())
}

#[test]
fn a_grpc_connection_between_two_pods_of_one_node_is_read_once() -> anyhow::Result<()> {
    let test = "a_grpc_connection_between_two_pods_of_one_node_is_read_once";
    if !privileged(test) {
        return Ok(());
    }
    // Caller and gRPC server on one node: their connection crosses two
    // watched veths. It must be read on one of them only, whatever its
    // segments start with: a server's answer leaving its pod starts with
    // a HEADERS frame, which once made the server's veth join the
    // connection a second time, and once its HPACK table filled with
    // insertions seen (a new traceparent per call), every call after was
    // a second hop (the lab's grpc scenario: 163 hops for 160 calls).
    const CALLS: u64 = 240;
    let node = Node::new(&["client", "caller", "inventory"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let agent = Agent::start(agent_config(&node, &receiver))?;
    let inventory = ServiceSpec {
        grpc: true,
        ..ServiceSpec::new("inventory", 8080, Behaviour::Instrumented)
    }
    .start(node.pod("inventory"))?;
    let caller = ServiceSpec {
        downstream: vec![format!(
            "grpc://{}:8080/lab.Inventory/Check",
            node.pod("inventory").ipv4
        )],
        // As the lab's service-d: HEADERS and CONTINUATION frames per call.
        metadata_bytes: 16 * 1024 + 512,
        ..ServiceSpec::new("caller", 8080, Behaviour::Instrumented)
    }
    .start(node.pod("caller"))?;
    let target = format!("http://{}:8080/stock", node.pod("caller").ipv4);
    // Four clients at once: the caller's calls overlap on its one channel.
    let loads: Vec<_> = (0..4)
        .map(|i| {
            let spec = tracegap_lab::load::LoadSpec {
                name: format!("client-{i}"),
                target: target.clone(),
                count: CALLS / 4,
                interval: Duration::from_millis(5),
                propagator: Some(tracegap_lab::service::Propagator::W3c),
                sample_ratio: 1.0,
                baggage: Vec::new(),
                otlp: None,
                max_time: Duration::from_secs(60),
            };
            node.pod("client")
                .spawn(move || tracegap_lab::load::run(&spec))
        })
        .collect::<Result<_, _>>()?;
    let mut ok = 0;
    for l in loads {
        ok += l
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
            .ok;
    }
    anyhow::ensure!(ok == CALLS, "{ok} of {CALLS} requests answered");
    let hops = |report: &Report, dst: &str| -> u64 {
        report
            .edges
            .iter()
            .filter(|e| e.source == "caller" && e.destination == dst)
            .map(|e| e.requests)
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut report;
    loop {
        let (_, body) = agent.get_report()?;
        report = serde_json::from_str::<Report>(&body)?;
        if hops(&report, "inventory") >= CALLS || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Settled: a late second reading would show now.
    std::thread::sleep(Duration::from_millis(500));
    let (_, body) = agent.get_report()?;
    report = serde_json::from_str::<Report>(&body)?;
    let joins = agent.metric("tracegap_kernel_events_total{counter=\"h2_joins\"}")?;
    let lost = agent.metric("tracegap_kernel_events_total{counter=\"h2_lost\"}")?;
    let errors = agent.metric("tracegap_kernel_events_total{counter=\"parse_errors\"}")?;
    assert_eq!(
        hops(&report, "inventory"),
        CALLS,
        "one hop per call; kernel joins {joins}, lost {lost}; {report:#?}"
    );
    // Opened after the programs loaded: read from its preface, and joined
    // again only where its reading was lost (a segment seen out of order
    // on a busy machine ends it: README, limits), never by the server's
    // veth beside the client's (its answers, and its trailers when they
    // start a segment of their own, once made it join).
    assert!(
        joins <= lost,
        "a connection seen from its start was joined {joins} times, lost {lost} times"
    );
    // Every copy made: a header block of 16.5 KiB is several chunks, and
    // the chunk after a short one once started past the segment's end.
    assert_eq!(errors, 0.0, "copies that failed");
    drop((caller, inventory, agent, receiver));
    Ok(())
}

/// A gRPC channel from the client pod to the receiver, kept open across
/// agent restarts: `calls(n)` makes `n` more calls on it (every tenth with
/// no trace context, the rest each with their own span id: the name
/// indexed once, each value a literal) and says how many were answered.
trait Channel {
    fn calls(&mut self, n: usize) -> anyhow::Result<usize>;
}

/// tonic (the h2 crate's HPACK) on a thread in the client pod.
struct Tonic {
    go: std::sync::mpsc::Sender<usize>,
    done: std::sync::mpsc::Receiver<anyhow::Result<usize>>,
}

impl Tonic {
    fn open(node: &Node, authority: String) -> anyhow::Result<Self> {
        let (go, go_rx) = std::sync::mpsc::channel::<usize>();
        let (done_tx, done) = std::sync::mpsc::channel::<anyhow::Result<usize>>();
        // Ends when `go` is dropped.
        node.pod("client").spawn(move || {
            let caller = match tracegap_lab::grpc::Caller::connect(&authority) {
                Ok(c) => c,
                Err(e) => return drop(done_tx.send(Err(anyhow::anyhow!("connect: {e}")))),
            };
            let mut n = 0usize;
            while let Ok(calls) = go_rx.recv() {
                let mut answered = 0;
                for _ in 0..calls {
                    n += 1;
                    let metadata = if n.is_multiple_of(10) {
                        vec![]
                    } else {
                        vec![("traceparent".to_owned(), format!("00-{T1}-{n:016x}-01"))]
                    };
                    if caller.call("/shop.Cart/AddItem", &metadata).is_ok() {
                        answered += 1;
                    }
                }
                let _ = done_tx.send(Ok(answered));
            }
        })?;
        Ok(Self { go, done })
    }
}

impl Channel for Tonic {
    fn calls(&mut self, n: usize) -> anyhow::Result<usize> {
        self.go.send(n)?;
        self.done.recv_timeout(Duration::from_secs(60))?
    }
}

/// gRPC C-core (Debian's python3-grpcio) in a process in the client pod
/// (tests/clients/grpcio_caller.py): it inserts a request's fixed fields
/// into the HPACK table once and refers to them by index ever after, so a
/// joined agent never learns them.
struct Grpcio {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    answers: std::sync::mpsc::Receiver<String>,
}

impl Grpcio {
    /// Debian's interpreter, where Debian's grpcio is (`cargo xtask setup`
    /// installs python3-grpcio), not whichever `python3` is first on PATH.
    const PYTHON: &str = "/usr/bin/python3";

    fn open(node: &Node, authority: String) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let found = std::process::Command::new(Self::PYTHON)
            .args(["-c", "import grpc"])
            .output();
        anyhow::ensure!(
            found.is_ok_and(|o| o.status.success()),
            "{} cannot import grpc: install python3-grpcio (cargo xtask setup does)",
            Self::PYTHON
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/grpcio_caller.py");
        let mut child = node
            .pod("client")
            .command(Self::PYTHON)
            .args([script, &authority, "/shop.Cart/AddItem"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("grpcio caller's stdout")?;
        let (tx, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            answers,
        })
    }
}

impl Channel for Grpcio {
    fn calls(&mut self, n: usize) -> anyhow::Result<usize> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().context("grpcio caller closed")?;
        writeln!(stdin, "{n}")?;
        stdin.flush()?;
        let line = self
            .answers
            .recv_timeout(Duration::from_secs(60))
            .context("grpcio caller: no answer (its errors are on stderr)")?;
        Ok(line.trim().parse()?)
    }
}

impl Drop for Grpcio {
    fn drop(&mut self) {
        // End of input ends the caller; the kill is for one that hangs.
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One channel kept open across an agent restart (a DaemonSet rollout):
/// `BEFORE` calls read whole by the first agent, then `AFTER` calls on the
/// same connection joined by the second, which must count at least 95% of
/// those with a context so and none without one as carrying one.
fn across_restart<C: Channel>(
    open: impl FnOnce(&Node, String) -> anyhow::Result<C>,
) -> anyhow::Result<()> {
    const BEFORE: usize = 40;
    const AFTER: usize = 200;
    // A call that carries its context into the collector, which is named
    // uninstrumented: the status every call with context should get.
    const CARRIED: &str = "uninstrumented";
    let node = Node::new(&["client"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let first = Agent::start(collector_config(&node, &receiver))?;
    let mut channel = open(
        &node,
        format!("{}:{}", node.gateway(), receiver.grpc.port()),
    )?;
    let requests = |agent: &Agent, status: &str| -> anyhow::Result<f64> {
        agent.metric(&format!(
            "tracegap_http_requests_total{{source_service=\"client\",destination_service=\"collector\",context_status=\"{status}\""
        ))
    };
    let wait_for = |agent: &Agent, calls: usize| -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            let seen: f64 = [CARRIED, "missing_context", "unreadable", "malformed"]
                .iter()
                .map(|s| requests(agent, s).unwrap_or(0.0))
                .sum();
            if seen >= calls as f64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    };
    let answered = channel.calls(BEFORE)?;
    anyhow::ensure!(answered == BEFORE, "{answered} of {BEFORE} answered");
    wait_for(&first, BEFORE)?;
    let dump = |agent: &Agent| -> String {
        agent
            .get("/metrics")
            .map(|(_, b)| {
                b.lines()
                    .filter(|l| l.contains("requests_total") || l.contains("h2_"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    };
    // From its preface: every call read whole.
    assert_eq!(
        requests(&first, CARRIED)?,
        (BEFORE - BEFORE / 10) as f64,
        "{}",
        dump(&first)
    );
    assert_eq!(requests(&first, "missing_context")?, (BEFORE / 10) as f64);
    assert_eq!(first.metric("tracegap_h2_joined_connections_total")?, 0.0);
    // The rollout: the agent stops (its programs detached) and a new one
    // starts while the channel stays open.
    first.stop()?;
    let second = Agent::start(collector_config(&node, &receiver))?;
    let answered = channel.calls(AFTER)?;
    anyhow::ensure!(answered == AFTER, "{answered} of {AFTER} answered");
    wait_for(&second, AFTER)?;
    let (ok, missing, unreadable, malformed) = (
        requests(&second, CARRIED)?,
        requests(&second, "missing_context")?,
        requests(&second, "unreadable")?,
        requests(&second, "malformed")?,
    );
    let with_context = (AFTER - AFTER / 10) as f64;
    let summary = format!(
        "after the restart: {ok} {CARRIED}, {missing} missing_context, {unreadable} unreadable, {malformed} malformed of {AFTER} calls ({with_context} with context)\n{}",
        dump(&second)
    );
    println!("{summary}");
    // The channel was joined, and read: at least 95% of the calls with a
    // context counted so, none taken for one with no context...
    assert_eq!(
        second.metric("tracegap_h2_joined_connections_total")?,
        1.0,
        "{summary}"
    );
    assert!(ok >= 0.95 * with_context, "{summary}");
    assert!(
        ok <= with_context,
        "a call without context read as one: {summary}"
    );
    // ...and a call without one never counted as carrying one; it is
    // missing or, where fields were not read, unreadable.
    assert!(missing <= (AFTER / 10) as f64, "{summary}");
    assert_eq!(malformed, 0.0, "{summary}");
    drop(channel);
    drop((second, receiver));
    Ok(())
}

#[test]
fn a_grpc_channel_open_across_an_agent_restart_is_read_after_it() -> anyhow::Result<()> {
    if !privileged("a_grpc_channel_open_across_an_agent_restart_is_read_after_it") {
        return Ok(());
    }
    across_restart(Tonic::open)
}

#[test]
fn a_grpc_c_core_channel_open_across_an_agent_restart_is_read_after_it() -> anyhow::Result<()> {
    if !privileged("a_grpc_c_core_channel_open_across_an_agent_restart_is_read_after_it") {
        return Ok(());
    }
    across_restart(Grpcio::open)
}
