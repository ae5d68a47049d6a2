//! The gap engine end to end: demo services in pods (instrumented with the
//! OpenTelemetry SDK and exporting their own spans, or broken in the ways
//! the seed lab shows), the agent on the pods' veths, and a real OTLP
//! receiver. Each test asserts the classification, the synthetic spans that
//! arrive (ids, kind, name, attributes, resource, timing) and that
//! instrumented hops get no duplicate.

use anyhow::Context as _;
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracegap_agent::{
    agent::AgentConfig,
    export::{ExportConfig, OtlpProtocol},
    report::Report,
};
use tracegap_tests::{
    Node,
    agent::Agent,
    agent_config,
    demo::{Behaviour, Propagator, SamplerSpec, Service, ServiceSpec},
    http,
    otlp::{Received, Receiver},
    privileged,
};

const T1: &str = "0af7651916cd43dd8448eb211c80319c";
const T2: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S1: &str = "b7ad6b7169203331";
/// A Jaeger UI's origin, allowed to read the Trace Quality API.
const JAEGER_ORIGIN: &str = "http://jaeger.example:16686";
/// OTLP span kinds.
const SERVER: i32 = 2;

/// Dropped in field order: services, agent, receiver, then the node.
struct Lab {
    services: Vec<Service>,
    agent: Agent,
    receiver: Receiver,
    node: Node,
}

fn config(node: &Node, receiver: &Receiver, export: ExportConfig) -> AgentConfig {
    AgentConfig {
        cors_origin: Some(JAEGER_ORIGIN.into()),
        export: ExportConfig {
            endpoint: Some(match export.protocol {
                OtlpProtocol::Grpc => format!("http://127.0.0.1:{}", receiver.grpc.port()),
                OtlpProtocol::HttpProtobuf => {
                    format!("http://127.0.0.1:{}", receiver.http.port())
                }
            }),
            ..export
        },
        ..agent_config(node, receiver)
    }
}

fn fast_export() -> ExportConfig {
    ExportConfig {
        protocol: OtlpProtocol::Grpc,
        interval: Duration::from_millis(100),
        ..ExportConfig::default()
    }
}

fn lab(pods: &[&str]) -> anyhow::Result<Lab> {
    lab_with(pods, fast_export(), Duration::from_secs(30))
}

fn lab_with(
    pods: &[&str],
    export: ExportConfig,
    response_timeout: Duration,
) -> anyhow::Result<Lab> {
    let node = Node::new(pods)?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let agent = Agent::start(AgentConfig {
        response_timeout,
        ..config(&node, &receiver, export)
    })?;
    Ok(Lab {
        node,
        receiver,
        agent,
        services: Vec::new(),
    })
}

impl Lab {
    fn url(&self, pod: &str, path: &str) -> String {
        format!("http://{}:8080{path}", self.node.pod(pod).ipv4)
    }

    fn start(
        &mut self,
        pod: &str,
        behaviour: Behaviour,
        downstream: &[&str],
    ) -> anyhow::Result<()> {
        self.start_with(pod, behaviour, downstream, |s| s)
    }

    fn start_with(
        &mut self,
        pod: &str,
        behaviour: Behaviour,
        downstream: &[&str],
        tweak: impl FnOnce(ServiceSpec) -> ServiceSpec,
    ) -> anyhow::Result<()> {
        let spec = ServiceSpec {
            downstream: downstream.iter().map(|d| d.to_string()).collect(),
            otlp: Some(format!(
                "http://{}:{}",
                self.node.gateway(),
                self.receiver.http.port()
            )),
            ..ServiceSpec::new(pod, 8080, behaviour)
        };
        self.services.push(tweak(spec).start(self.node.pod(pod))?);
        Ok(())
    }

    /// curl from `from`; returns the wall-clock window around the call.
    fn curl(
        &self,
        from: &str,
        url: &str,
        headers: &[&str],
    ) -> anyhow::Result<(SystemTime, SystemTime)> {
        let mut args = Vec::new();
        for h in headers {
            args.extend(["-H", h]);
        }
        let t0 = SystemTime::now();
        self.node.pod(from).curl(url, &args)?;
        Ok((t0, SystemTime::now()))
    }

    fn report(&self) -> anyhow::Result<Report> {
        let (status, body) = self.agent.get_report()?;
        anyhow::ensure!(status == 200, "/report answered {status}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Hops of `kind` on the edge, from the agent's report.
    fn kind_count(&self, src: &str, dst: &str, kind: &str) -> anyhow::Result<u64> {
        Ok(self
            .report()?
            .edges
            .iter()
            .find(|e| e.source == src && e.destination == dst)
            .and_then(|e| e.kinds.get(kind).copied())
            .unwrap_or(0))
    }

    /// Waits until the report shows `n` hops of `kind` on the edge.
    fn wait_kind(&self, src: &str, dst: &str, kind: &str, n: u64) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.kind_count(src, dst, kind)? < n {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{src} -> {dst}: expected {n} {kind}, report: {:#?}",
                self.report()?
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn synthetic(&self, gap: &str, n: usize) -> Vec<Received> {
        let spans = self.receiver.wait_for(Duration::from_secs(10), |s| {
            s.iter().filter(|s| s.gap().as_deref() == Some(gap)).count() >= n
        });
        spans
            .into_iter()
            .filter(|s| s.gap().as_deref() == Some(gap))
            .collect()
    }
}

/// A GET with the whole response (head and body) as text.
fn raw_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The span lies within the client's view of the call. Two milliseconds of
/// slack cover the kernel-to-wall clock conversion.
fn assert_within(s: &Received, (t0, t1): (SystemTime, SystemTime)) {
    let slack = Duration::from_millis(2);
    let (start, end) = (
        time(s.span.start_time_unix_nano),
        time(s.span.end_time_unix_nano),
    );
    assert!(start + slack >= t0, "span starts before the call: {s:?}");
    assert!(end <= t1 + slack, "span ends after the call: {s:?}");
    assert!(start <= end);
}

fn tp(trace: &str, span: &str, flags: &str) -> String {
    format!("traceparent: 00-{trace}-{span}-{flags}")
}

#[test]
fn broken_propagation_then_fixed() -> anyhow::Result<()> {
    if !privileged("broken_propagation_then_fixed") {
        return Ok(());
    }
    let mut lab = lab(&["client", "service-b", "service-c"])?;
    lab.start("service-c", Behaviour::Instrumented, &[])?;
    let inventory = lab.url("service-c", "/inventory/42");
    lab.start("service-b", Behaviour::DropsHeaders, &[&inventory])?;

    let window = lab.curl(
        "client",
        &lab.url("service-b", "/checkout"),
        &[&tp(T1, S1, "01")],
    )?;
    lab.wait_kind("service-b", "service-c", "broken_propagation", 1)?;
    lab.wait_kind("client", "service-b", "context_ok", 1)?;
    let spans = lab.synthetic("broken_propagation", 1);
    let [s] = spans.as_slice() else {
        panic!("one synthetic span expected: {spans:#?}");
    };
    // Stitched into the caller's trace, under the span that called B.
    assert_eq!(s.trace_id(), T1);
    assert_eq!(s.parent_span_id(), S1);
    assert_eq!(s.span.kind, SERVER);
    assert_eq!(s.span.name, "GET /inventory/{id}");
    assert_eq!(s.service, "service-c");
    assert_eq!(
        s.resource_attr("k8s.namespace.name").as_deref(),
        Some("lab")
    );
    assert_eq!(
        s.resource_attr("k8s.pod.name").as_deref(),
        Some("service-c-0")
    );
    assert_eq!(s.attr("tracegap.link").as_deref(), Some("inferred"));
    assert_eq!(s.attr("tracegap.link.confidence").as_deref(), Some("sole"));
    assert_eq!(s.attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(s.attr("url.path").as_deref(), Some("/inventory/42"));
    assert_eq!(s.attr("http.response.status_code").as_deref(), Some("200"));
    assert_eq!(s.attr("server.port").as_deref(), Some("8080"));
    let b = lab.node.pod("service-b").ipv4.to_string();
    assert_eq!(s.attr("client.address"), Some(b.clone()));
    assert_eq!(s.attr("network.peer.address"), Some(b));
    assert_eq!(
        s.attr("tracegap.caller.service").as_deref(),
        Some("service-b")
    );
    assert_within(s, window);
    // C's own span exists, in a trace of its own: that is the tear.
    let own = lab.receiver.wait_for(Duration::from_secs(5), |s| {
        s.iter().any(|s| !s.synthetic() && s.service == "service-c")
    });
    let c = own
        .iter()
        .find(|s| !s.synthetic() && s.service == "service-c")
        .expect("service-c exports its own span");
    assert_ne!(c.trace_id(), T1);
    // The services' own span exports crossed the veths and were not hops.
    assert!(
        lab.agent
            .metric("tracegap_ignored_requests_total{reason=\"telemetry\"}")?
            >= 1.0
    );

    // Fixed: B is instrumented and propagates.
    lab.services.remove(1);
    lab.start("service-b", Behaviour::Instrumented, &[&inventory])?;
    lab.curl(
        "client",
        &lab.url("service-b", "/checkout"),
        &[&tp(T2, S1, "01")],
    )?;
    lab.wait_kind("service-b", "service-c", "context_ok", 1)?;
    let spans = lab.receiver.wait_for(Duration::from_secs(5), |s| {
        s.iter()
            .filter(|s| s.trace_id() == T2 && !s.synthetic())
            .count()
            >= 3
    });
    let t2: Vec<_> = spans.iter().filter(|s| s.trace_id() == T2).collect();
    // B's server and client spans, C's server span: and nothing synthetic.
    assert_eq!(t2.len(), 3, "{t2:#?}");
    assert!(t2.iter().all(|s| !s.synthetic()));
    // Give the exporter a few intervals: still no duplicate.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.receiver
            .spans()
            .iter()
            .all(|s| !(s.synthetic() && s.trace_id() == T2))
    );
    assert_eq!(
        lab.kind_count("service-b", "service-c", "broken_propagation")?,
        1
    );

    // What a person sees: metrics, probes, and the report table.
    assert!(
        lab.agent.metric(
            "tracegap_gaps_total{kind=\"broken_propagation\",source_service=\"service-b\",destination_service=\"service-c\"}"
        )? >= 1.0
    );
    assert!(lab.agent.metric("tracegap_spans_exported_total")? >= 1.0);
    assert_eq!(lab.agent.get("/healthz")?.0, 200);
    assert_eq!(lab.agent.get("/readyz")?.0, 200);
    let table = tracegap_agent::report::table(&lab.report()?);
    assert!(table.contains("service-b -> service-c"), "{table}");
    assert!(table.contains("broken_propagation=1"), "{table}");
    // Jaeger's Trace Quality page for service-b: it drops the context on
    // its calls, and the failing example is the broken trace.
    let addr = lab.agent.report.expect("a report address");
    let raw = raw_get(addr, "/api/quality-metrics?service=service-b&hours=48")?;
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("access-control-allow-origin: {JAEGER_ORIGIN}")),
        "{head}"
    );
    let q: serde_json::Value = serde_json::from_str(body)?;
    let out = q["metrics"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "Context propagated out"))
        .expect("the propagation metric");
    assert_eq!(out["failureCount"], 1, "{out}");
    assert_eq!(out["failureExamples"][0]["traceID"], T1, "{out}");
    assert!(raw_get(addr, "/api/quality-metrics")?.starts_with("HTTP/1.1 400"));
    // Latency is the request's, as the wire saw it: a chain of quick calls.
    let report = lab.report()?;
    for e in &report.edges {
        assert!(e.p99_ms.is_some_and(|p| p > 0.0 && p < 1000.0), "{e:?}");
    }
    lab.agent.stop()?;
    Ok(())
}

#[test]
fn an_uninstrumented_passthrough_proxy_gets_its_span_and_secrets_stay_out() -> anyhow::Result<()> {
    if !privileged("an_uninstrumented_passthrough_proxy_gets_its_span_and_secrets_stay_out") {
        return Ok(());
    }
    let mut lab = lab(&["client", "proxy", "service-c"])?;
    lab.start("service-c", Behaviour::Instrumented, &[])?;
    let c = lab.url("service-c", "/items");
    lab.start("proxy", Behaviour::PassesThrough, &[&c])?;
    let window = lab.curl(
        "client",
        &lab.url("proxy", "/orders/123?token=s3cr3t"),
        &[
            &tp(T1, S1, "01"),
            "Authorization: Bearer s3cr3t",
            "Cookie: session=s3cr3t",
            "baggage: user-id=12345,session-id=abc",
        ],
    )?;
    // The proxy's fault shows on the edge leaving it; the call into it
    // carried valid context.
    lab.wait_kind("proxy", "service-c", "passthrough", 1)?;
    lab.wait_kind("client", "proxy", "context_ok", 1)?;
    let spans = lab.synthetic("passthrough", 1);
    let [s] = spans.as_slice() else {
        panic!("{spans:#?}");
    };
    assert_eq!(s.trace_id(), T1);
    assert_eq!(s.parent_span_id(), S1);
    assert_eq!(s.service, "proxy");
    assert_eq!(s.span.kind, SERVER);
    assert_eq!(s.span.name, "GET /orders/{id}");
    assert_eq!(s.attr("url.path").as_deref(), Some("/orders/123"));
    assert_eq!(s.attr("tracegap.link").as_deref(), Some("carried"));
    assert_within(s, window);
    // C's own span hangs off the client's span id too: the proxy made none.
    let all = lab.receiver.wait_for(Duration::from_secs(5), |s| {
        s.iter().any(|s| !s.synthetic() && s.service == "service-c")
    });
    let c_span = all
        .iter()
        .find(|s| !s.synthetic() && s.service == "service-c")
        .expect("service-c's own span");
    assert_eq!(
        (c_span.trace_id(), c_span.parent_span_id()),
        (T1.to_owned(), S1.to_owned())
    );
    // The synthetic span encloses the downstream call, as the proxy did.
    assert!(s.span.start_time_unix_nano <= c_span.span.start_time_unix_nano + 2_000_000);
    // No secret, no query string, in anything exported.
    for span in lab.receiver.spans() {
        let text = format!("{:?}", span.span.attributes);
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(!text.contains("token"), "{text}");
    }
    // The proxy carried the baggage on.
    let report = lab.report()?;
    let edge = report
        .edges
        .iter()
        .find(|e| e.source == "proxy" && e.destination == "service-c")
        .expect("edge");
    assert_eq!((edge.baggage_carried, edge.baggage_dropped), (1, 0));
    lab.agent.stop()?;
    Ok(())
}

#[test]
fn sampling_against_the_parent_and_unsampled_traces() -> anyhow::Result<()> {
    if !privileged("sampling_against_the_parent_and_unsampled_traces") {
        return Ok(());
    }
    let mut lab = lab(&["client", "service-s", "service-c"])?;
    lab.start("service-c", Behaviour::Instrumented, &[])?;
    let c = lab.url("service-c", "/leaf");
    // Instrumented with a sampler that ignores its remote parent.
    lab.start_with("service-s", Behaviour::Instrumented, &[&c], |s| {
        ServiceSpec {
            sampler: SamplerSpec::AlwaysOff,
            ..s
        }
    })?;
    lab.curl("client", &lab.url("service-s", "/"), &[&tp(T1, S1, "01")])?;
    lab.wait_kind("service-s", "service-c", "sampling_inconsistent", 1)?;
    let spans = lab.synthetic("sampling_inconsistent", 1);
    let [s] = spans.as_slice() else {
        panic!("{spans:#?}");
    };
    assert_eq!(s.trace_id(), T1);
    // Under the (unrecorded) span S made: not the client's.
    assert_ne!(s.parent_span_id(), S1);
    assert_eq!(s.service, "service-c");
    assert!(
        s.attr("tracegap.gap.detail")
            .is_some_and(|d| d.contains("sampled=1") && d.contains("sampled=0"))
    );

    // A trace its root chose not to sample: counted, not exported.
    lab.curl("client", &lab.url("service-c", "/"), &[&tp(T2, S1, "00")])?;
    lab.wait_kind("client", "service-c", "unsampled", 1)?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(lab.receiver.spans().iter().all(|s| s.trace_id() != T2));
    let report = lab.report()?;
    let edge = report
        .edges
        .iter()
        .find(|e| e.source == "client" && e.destination == "service-c")
        .expect("edge");
    assert_eq!(edge.unsampled_share, 1.0);
    assert!(
        lab.agent.metric(
            "tracegap_http_requests_total{source_service=\"client\",destination_service=\"service-c\",context_status=\"unsampled\",context_format=\"w3c\"}"
        )? == 1.0
    );
    lab.agent.stop()?;
    Ok(())
}

#[test]
fn context_formats_malformed_and_missing_context() -> anyhow::Result<()> {
    if !privileged("context_formats_malformed_and_missing_context") {
        return Ok(());
    }
    // This one exports over OTLP/HTTP with protobuf bodies.
    let mut lab = lab_with(
        &["client", "service-w", "service-c"],
        ExportConfig {
            protocol: OtlpProtocol::HttpProtobuf,
            ..fast_export()
        },
        Duration::from_secs(30),
    )?;
    lab.start_with("service-c", Behaviour::Instrumented, &[], |s| ServiceSpec {
        propagator: Propagator::B3,
        ..s
    })?;
    let c = lab.url("service-c", "/b3");
    // W3C only, called with B3: it starts a new trace downstream.
    lab.start("service-w", Behaviour::Instrumented, &[&c])?;
    let window = lab.curl(
        "client",
        &lab.url("service-w", "/"),
        &[&format!("b3: {T1}-{S1}-1")],
    )?;
    lab.wait_kind("service-w", "service-c", "format_mismatch", 1)?;
    let spans = lab.synthetic("format_mismatch", 1);
    let s = &spans[0];
    assert_eq!(
        (s.trace_id(), s.parent_span_id()),
        (T1.to_owned(), S1.to_owned())
    );
    assert_eq!(s.attr("tracegap.link").as_deref(), Some("inferred"));
    assert!(
        s.attr("tracegap.downstream.trace_id")
            .is_some_and(|t| t != T1)
    );
    // Its fix: service-w reads no B3.
    let fix = s.attr("tracegap.gap.fix").unwrap_or_default();
    assert!(
        fix.contains("received a b3 context and sent a new w3c trace")
            && fix.contains("OTEL_PROPAGATORS=tracecontext,baggage,b3"),
        "{fix}"
    );
    assert_within(s, window);
    // Seen not to read B3, service-w is told so when called with B3 again:
    // its caller propagated, into a trace service-w starts over.
    lab.curl(
        "client",
        &lab.url("service-w", "/"),
        &[&format!("b3: {T2}-{S1}-1")],
    )?;
    lab.wait_kind("client", "service-w", "format_mismatch", 1)?;
    let fix = lab
        .report()?
        .edges
        .iter()
        .find(|e| e.source == "client" && e.destination == "service-w")
        .and_then(|e| e.fixes.get("format_mismatch").cloned())
        .unwrap_or_default();
    assert!(
        fix.contains("the callee does not read b3")
            && fix.contains("OTEL_PROPAGATORS=tracecontext,baggage,b3"),
        "{fix}"
    );

    // Both formats in one request, naming different traces.
    lab.curl(
        "client",
        &lab.url("service-c", "/both"),
        &[&tp(T1, S1, "01"), &format!("b3: {T2}-{S1}-1")],
    )?;
    lab.wait_kind("client", "service-c", "format_mismatch", 1)?;

    // The seed's malformed traceparent, and no context at all.
    let window = lab.curl(
        "client",
        &lab.url("service-c", "/bad"),
        &["traceparent: 00-trace123-span123-01"],
    )?;
    lab.wait_kind("client", "service-c", "malformed_context", 1)?;
    let spans = lab.synthetic("malformed_context", 1);
    let s = &spans[0];
    assert_eq!(s.span.parent_span_id, Vec::<u8>::new(), "a new root");
    assert!(
        s.attr("tracegap.gap.detail")
            .is_some_and(|d| d.contains("trace-id"))
    );
    assert_within(s, window);
    lab.curl("client", &lab.url("service-c", "/none"), &[])?;
    lab.wait_kind("client", "service-c", "missing_context", 1)?;
    let spans = lab.synthetic("missing_context", 1);
    assert_eq!(spans[0].span.parent_span_id, Vec::<u8>::new());
    assert_eq!(spans[0].service, "service-c");

    // Other tracers' formats: each its own, none of them "no context".
    let others: [(&str, &[&str]); 7] = [
        (
            "datadog",
            &[
                "x-datadog-trace-id: 1234567890",
                "x-datadog-parent-id: 9876543210",
                "x-datadog-sampling-priority: 1",
            ],
        ),
        (
            "xray",
            &[
                "X-Amzn-Trace-Id: Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
            ],
        ),
        (
            "cloudtrace",
            &["X-Cloud-Trace-Context: 105445aa7843bc8bf206b12000100000/1;o=1"],
        ),
        (
            "ottracer",
            &[
                "ot-tracer-traceid: 0af7651916cd43dd",
                "ot-tracer-spanid: b7ad6b7169203331",
                "ot-tracer-sampled: true",
            ],
        ),
        (
            "grpc-trace-bin",
            &["grpc-trace-bin: AABkZWFkYmVlZmRlYWRiZWVmAQAAAAAAAAABAgE"],
        ),
        // SkyWalking: trace "a.b.c", its ids convert to no W3C one.
        (
            "sw8",
            &["sw8: 1-YS5iLmM=-ZC5lLmY=-3-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTAuMC4wLjE6ODA4MA=="],
        ),
        // A Datadog tracer speaking W3C: its state in tracestate.
        (
            "w3c+datadog",
            &[
                "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "tracestate: dd=s:1;p:00f067aa0ba902b7;t.dm:-4",
            ],
        ),
    ];
    for (_, headers) in &others {
        lab.curl("client", &lab.url("service-c", "/other"), headers)?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = lab.report()?;
        let edge = r
            .edges
            .iter()
            .find(|e| e.source == "client" && e.destination == "service-c");
        let formats = edge.map(|e| e.formats.clone()).unwrap_or_default();
        if others.iter().all(|(f, _)| formats.get(*f) == Some(&1)) {
            assert_eq!(
                edge.and_then(|e| e.kinds.get("missing_context")),
                Some(&1),
                "only the request with none: {edge:?}"
            );
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "formats: {formats:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SkyWalking's hop joins no trace: a root naming SkyWalking's trace,
    // and a fix that names no propagator to add.
    let is_sw8 =
        |s: &Received| s.synthetic() && s.attr("tracegap.context.format").as_deref() == Some("sw8");
    let sw = lab
        .receiver
        .wait_for(Duration::from_secs(10), |all| all.iter().any(is_sw8))
        .into_iter()
        .find(is_sw8)
        .expect("the sw8 hop's span");
    assert_eq!(
        sw.attr("tracegap.context.foreign_trace_id").as_deref(),
        Some("a.b.c")
    );
    assert_eq!(sw.span.parent_span_id, Vec::<u8>::new(), "a new root");
    assert!(
        sw.attr("tracegap.gap.fix")
            .is_some_and(|f| f.contains("no OpenTelemetry propagator reads")),
        "{sw:?}"
    );
    assert!(
        lab.receiver
            .spans()
            .iter()
            .filter(|s| s.synthetic())
            .all(|s| s.via == "http")
    );
    lab.agent.stop()?;
    Ok(())
}

#[test]
fn export_survives_a_collector_outage_with_bounded_memory() -> anyhow::Result<()> {
    if !privileged("export_survives_a_collector_outage_with_bounded_memory") {
        return Ok(());
    }
    let node = Node::new(&["client", "service-c"])?;
    let mut receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let queue = 16;
    let agent = Agent::start(config(
        &node,
        &receiver,
        ExportConfig {
            queue,
            batch: 8,
            attempts: 2,
            backoff: Duration::from_millis(200),
            timeout: Some(Duration::from_secs(1)),
            ..fast_export()
        },
    ))?;
    let _c = tracegap_tests::http::HttpServer::start(node.pod("service-c"), 8080)?;
    let to = SocketAddr::from((node.pod("service-c").ipv4, 8080));
    let requests = |prefix: &str, n: usize| -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("GET /{prefix}/{i} HTTP/1.1\r\nHost: c\r\n\r\n").into_bytes())
            .collect()
    };
    let wait_for = |what: &str, cond: &dyn Fn() -> anyhow::Result<bool>| -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !cond()? {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{what}: {}",
                agent.get("/metrics")?.1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    // Down: connections are refused; every failed batch is counted and
    // dropped after its attempts.
    receiver.stop();
    http::exchange(node.pod("client"), to, requests("down", 50), Duration::ZERO)?;
    wait_for("failed exports are counted and dropped", &|| {
        Ok(agent.metric("tracegap_export_errors_total")? > 0.0
            && agent.metric("tracegap_spans_dropped_total{reason=\"export_failed\"}")? > 0.0)
    })?;
    // Slow: a collector that accepts and never answers. Each export waits
    // for its timeout; the queue fills and what does not fit is dropped.
    let black_hole = std::net::TcpListener::bind(receiver.grpc)?;
    http::exchange(
        node.pod("client"),
        to,
        requests("slow", 200),
        Duration::ZERO,
    )?;
    wait_for("a full queue drops spans", &|| {
        Ok(agent.metric("tracegap_spans_dropped_total{reason=\"queue_full\"}")? > 0.0)
    })?;
    assert!(agent.metric("tracegap_export_queue_spans")? <= queue as f64);
    drop(black_hole);
    // The collector comes back: the backlog drains (exported, or dropped
    // once its attempts are spent), and new gaps are exported again.
    receiver.resume()?;
    // Drained: each of the 250 spans so far was exported or dropped, none
    // is queued, in a batch or still to come from the agent's pipeline.
    let settled = || -> anyhow::Result<bool> {
        let done = agent.metric("tracegap_spans_exported_total")?
            + agent.metric("tracegap_spans_dropped_total{reason=\"queue_full\"}")?
            + agent.metric("tracegap_spans_dropped_total{reason=\"export_failed\"}")?;
        Ok(done >= 250.0 && agent.metric("tracegap_export_queue_spans")? == 0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !settled()? {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the backlog never drained: {}",
            agent.get("/metrics")?.1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    http::exchange(
        node.pod("client"),
        to,
        requests("after", 3),
        Duration::from_millis(100),
    )?;
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter()
            .filter(|s| s.attr("url.path").is_some_and(|p| p.starts_with("/after/")))
            .count()
            == 3
    });
    let after = spans
        .iter()
        .filter(|s| s.attr("url.path").is_some_and(|p| p.starts_with("/after/")))
        .count();
    assert_eq!(
        after,
        3,
        "export did not resume: {}",
        agent.get("/metrics")?.1
    );
    assert!(agent.metric("tracegap_spans_exported_total")? >= 3.0);
    agent.stop()?;
    Ok(())
}

#[test]
fn a_request_that_never_gets_an_answer_is_reported_with_its_wait() -> anyhow::Result<()> {
    if !privileged("a_request_that_never_gets_an_answer_is_reported_with_its_wait") {
        return Ok(());
    }
    let lab = lab_with(&["client", "stuck"], fast_export(), Duration::from_secs(1))?;
    // Accepts, reads, never answers.
    let silent = lab.node.pod("stuck").spawn(|| -> std::io::Result<()> {
        use std::io::Read as _;
        let l = std::net::TcpListener::bind("0.0.0.0:8080")?;
        let (mut c, _) = l.accept()?;
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf)?;
        std::thread::sleep(Duration::from_millis(2500));
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(100));
    lab.node.pod("client").send_tcp(
        (lab.node.pod("stuck").ipv4, 8080).into(),
        vec![b"GET /hang HTTP/1.1\r\nHost: stuck\r\n\r\n".to_vec()],
        Duration::from_millis(2000),
    )?;
    let spans = lab.synthetic("missing_context", 1);
    let s = &spans[0];
    assert_eq!(s.attr("tracegap.unanswered").as_deref(), Some("true"));
    assert_eq!(s.attr("http.response.status_code"), None);
    let status = s.span.status.as_ref().expect("an error status");
    assert_eq!(status.code, 2, "ERROR");
    assert!(
        status.message.starts_with("no response within"),
        "{status:?}"
    );
    let waited = s.span.end_time_unix_nano - s.span.start_time_unix_nano;
    assert!((1_000_000_000..1_100_000_000).contains(&waited), "{waited}");
    let report = lab.report()?;
    assert_eq!(report.edges[0].unanswered, 1);
    assert!(
        lab.agent
            .metric("tracegap_http_unanswered_requests_total")?
            == 1.0
    );
    let _ = silent.join();
    Ok(())
}

#[test]
fn a_head_not_read_whole_is_unreadable_never_missing_context() -> anyhow::Result<()> {
    if !privileged("a_head_not_read_whole_is_unreadable_never_missing_context") {
        return Ok(());
    }
    // Every hop exported (`--export all`), so each request's verdict can be
    // read off its span by its path.
    let node = Node::new(&["client", "service-b"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let agent = Agent::start(AgentConfig {
        export_mode: tracegap_agent::gap::span::ExportMode::All,
        ..config(&node, &receiver, fast_export())
    })?;
    let _b = ServiceSpec::new("service-b", 8080, Behaviour::DropsHeaders)
        .start(node.pod("service-b"))?;
    let url = |path: &str| format!("http://{}:8080{path}", node.pod("service-b").ipv4);
    // KB of other headers (a cookie, a JWT, forwarded headers) around the
    // context; the kernel copies 32 KiB of a head (HEADER_BUDGET).
    let budget = tracegap_common::HEADER_BUDGET as usize;
    let tp = tp(T1, S1, "01");
    let mut expected = Vec::new();
    for kb in [1usize, 8, 16, 24, 30, 40, 48] {
        for at in ["start", "middle", "end", "none"] {
            let mut headers: Vec<String> = (0..kb)
                .map(|i| format!("x-filler-{i}: {}", "a".repeat(1000)))
                .collect();
            let before = match at {
                "start" => 0,
                "middle" => kb / 2,
                _ => kb,
            };
            if at != "none" {
                headers.insert(before, tp.clone());
            }
            let path = format!("/h{kb}k/{at}");
            let mut args = Vec::new();
            for h in &headers {
                args.extend(["-H", h.as_str()]);
            }
            node.pod("client").curl(&url(&path), &args)?;
            // Bytes of the head up to the context's end (all of it for none).
            let read_to = 200 + 1016 * if at == "none" { kb } else { before + 1 };
            let whole = 200 + 1016 * kb + if at == "none" { 0 } else { tp.len() };
            let kind = match at {
                "none" if whole <= budget => "missing_context",
                "none" => "unreadable",
                _ if read_to <= budget => "context_ok",
                _ => "unreadable",
            };
            expected.push((path, kind));
        }
    }
    let spans = receiver.wait_for(Duration::from_secs(15), |s| {
        s.iter().filter(|s| s.synthetic()).count() >= expected.len()
    });
    let mut wrong = Vec::new();
    for (path, kind) in &expected {
        let got: Vec<String> = spans
            .iter()
            .filter(|s| s.synthetic() && s.attr("url.path").as_deref() == Some(path.as_str()))
            .map(|s| s.gap().unwrap_or_default())
            .collect();
        if got != [kind.to_string()] {
            wrong.push(format!("{path}: expected {kind}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Counted as its own status, never among the gaps.
    let report: Report = serde_json::from_str(&agent.get_report()?.1)?;
    let edge = report
        .edges
        .iter()
        .find(|e| e.source == "client" && e.destination == "service-b")
        .expect("the edge");
    let unreadable = expected.iter().filter(|(_, k)| *k == "unreadable").count() as u64;
    assert_eq!(edge.kinds.get("unreadable"), Some(&unreadable), "{edge:?}");
    assert_eq!(
        agent.metric("tracegap_gaps_total{kind=\"unreadable\"")?,
        0.0,
        "not a gap"
    );
    Ok(())
}

/// An HTTP/2 frame: 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: a literal field without indexing (one-byte lengths).
fn h2_literal(b: &mut Vec<u8>, name: &str, value: &str) {
    b.push(0x00);
    b.push(name.len() as u8);
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
}

#[test]
fn an_http2_request_whose_context_sits_in_fields_not_decoded_is_unreadable() -> anyhow::Result<()> {
    if !privileged("an_http2_request_whose_context_sits_in_fields_not_decoded_is_unreadable") {
        return Ok(());
    }
    const PORT: u16 = 8082;
    const HEADERS: u8 = 1;
    const END: u8 = 4 | 1; // END_HEADERS | END_STREAM
    let node = Node::new(&["client", "service-b"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let agent = Agent::start(AgentConfig {
        export_mode: tracegap_agent::gap::span::ExportMode::All,
        ..config(&node, &receiver, fast_export())
    })?;
    // A connection as an agent restarted mid-way sees it: no preface, the
    // client's HPACK table filled before (index 62 is an entry inserted
    // then, unknown here). Its requests, each its own stream:
    let tp = |span: &str| format!("00-{T1}-{span}-01");
    let block = |path: &str| {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        h2_literal(&mut b, ":path", path);
        b
    };
    // 1: the context a literal field: read.
    let mut one = block("/literal");
    h2_literal(&mut one, "traceparent", &tp("00000000000000e1"));
    // 3: its name an unknown entry, its value literal: known by its shape.
    let mut three = block("/shape");
    let v = tp("00000000000000e3");
    three.extend([0x0f, 0x2f, v.len() as u8]);
    three.extend_from_slice(v.as_bytes());
    // 5: a whole field from the unknown entry (the context may be it).
    let mut five = block("/unknown-entry");
    five.push(0xbe);
    // 7: every field read, none a context.
    let seven = block("/none");
    let writes: Vec<Vec<u8>> = [(1, one), (3, three), (5, five), (7, seven)]
        .into_iter()
        .map(|(id, b)| h2_frame(HEADERS, END, id, &b))
        .collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = node
        .pod("service-b")
        .spawn(move || -> std::io::Result<()> {
            use std::io::{Read as _, Write as _};
            let listener = std::net::TcpListener::bind(("0.0.0.0", PORT))?;
            let _ = ready_tx.send(());
            let (mut c, _) = listener.accept()?;
            c.set_read_timeout(Some(Duration::from_millis(300)))?;
            // Answers each stream once the client has written them all.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            for id in [1u32, 3, 5, 7] {
                c.write_all(&h2_frame(HEADERS, END, id, &[0x88]))?; // :status 200
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        })?;
    ready_rx.recv_timeout(Duration::from_secs(5))?;
    let to: SocketAddr = (node.pod("service-b").ipv4, PORT).into();
    node.pod("client")
        .spawn(move || -> std::io::Result<()> {
            use std::io::{Read as _, Write as _};
            let mut c = std::net::TcpStream::connect(to)?;
            c.set_nodelay(true)?;
            for w in writes {
                c.write_all(&w)?;
                std::thread::sleep(Duration::from_millis(40));
            }
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut answers = Vec::new();
            let _ = c.read_to_end(&mut answers);
            Ok(())
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let _ = server.join();
    let expected = [
        ("/literal", "context_ok"),
        ("/shape", "context_ok"),
        ("/unknown-entry", "unreadable"),
        ("/none", "missing_context"),
    ];
    let spans = receiver.wait_for(Duration::from_secs(15), |s| {
        s.iter().filter(|s| s.synthetic()).count() >= expected.len()
    });
    let got: Vec<(String, String)> = expected
        .iter()
        .map(|(path, _)| {
            let kinds: Vec<String> = spans
                .iter()
                .filter(|s| s.synthetic() && s.attr("url.path").as_deref() == Some(path))
                .map(|s| s.gap().unwrap_or_default())
                .collect();
            (path.to_string(), kinds.join(","))
        })
        .collect();
    let want: Vec<(String, String)> = expected
        .iter()
        .map(|(p, k)| (p.to_string(), k.to_string()))
        .collect();
    assert_eq!(got, want);
    // Each span says it was read on a joined connection; the one with a
    // field not read says how many.
    let read: Vec<(String, Option<String>, Option<String>)> = spans
        .iter()
        .filter(|s| s.synthetic())
        .map(|s| {
            (
                s.attr("url.path").unwrap_or_default(),
                s.attr("tracegap.h2.joined"),
                s.attr("tracegap.h2.unknown_fields"),
            )
        })
        .collect();
    for (path, joined, unknown) in &read {
        assert_eq!(joined.as_deref(), Some("true"), "{read:?}");
        let want = (path == "/unknown-entry").then(|| "1".to_owned());
        assert_eq!(unknown, &want, "{read:?}");
    }
    assert_eq!(agent.metric("tracegap_h2_joined_connections_total")?, 1.0);
    assert_eq!(agent.metric("tracegap_h2_partly_read_requests_total")?, 1.0);
    assert_eq!(
        agent.metric("tracegap_gaps_total{kind=\"unreadable\"")?,
        0.0,
        "not a gap"
    );
    Ok(())
}

#[test]
fn without_a_trace_store_a_service_that_never_exports_is_likely_uninstrumented_until_it_does()
-> anyhow::Result<()> {
    if !privileged("without_a_trace_store_a_service_that_never_exports") {
        return Ok(());
    }
    let node = Node::new(&["client", "silent"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    // Learned quickly here: 5 sampled requests over a second (by default
    // 20 over two minutes). No names declare anything, no store is asked.
    let agent = Agent::start(AgentConfig {
        silence: Some(tracegap_agent::gap::silence::SilenceConfig {
            after: Duration::from_secs(1),
            requests: 5,
        }),
        ..config(&node, &receiver, fast_export())
    })?;
    let mut lab = Lab {
        services: Vec::new(),
        agent,
        receiver,
        node,
    };
    // Records nothing and exports nothing.
    lab.start("silent", Behaviour::DropsHeaders, &[])?;
    let url = lab.url("silent", "/");
    let call = |lab: &Lab, n: u64| -> anyhow::Result<()> {
        let tp = format!("traceparent: 00-{T1}-{n:016x}-01");
        lab.curl("client", &url, &[tp.as_str()])?;
        Ok(())
    };
    let status = |lab: &Lab| -> anyhow::Result<Option<bool>> {
        Ok(lab
            .report()?
            .services
            .into_iter()
            .find(|s| s.service == "silent")
            .and_then(|s| s.instrumented))
    };
    for n in 1..=5 {
        call(&lab, n)?;
        std::thread::sleep(Duration::from_millis(300));
    }
    // Not yet: each of these was served before it was learned.
    let spans = |lab: &Lab| -> Vec<Received> {
        lab.receiver
            .spans()
            .into_iter()
            .filter(|s| s.synthetic() && s.service == "silent")
            .collect()
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(spans(&lab).is_empty(), "{:#?}", spans(&lab));
    for n in 6..=10 {
        call(&lab, n)?;
    }
    let got = lab
        .receiver
        .wait_for(Duration::from_secs(10), |s| {
            s.iter()
                .filter(|s| s.synthetic() && s.service == "silent")
                .count()
                >= 5
        })
        .into_iter()
        .filter(|s| s.synthetic() && s.service == "silent")
        .collect::<Vec<_>>();
    let mut parents: Vec<String> = got.iter().map(|s| s.parent_span_id()).collect();
    parents.sort();
    assert_eq!(
        parents,
        (6..=10u64).map(|n| format!("{n:016x}")).collect::<Vec<_>>(),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .all(|s| s.gap().as_deref() == Some("uninstrumented")
                && s.attr("tracegap.gap.confidence").as_deref() == Some("likely")
                && s.trace_id() == T1
                && s.attr("tracegap.gap.detail")
                    .is_some_and(|d| d.contains("exported no span"))),
        "{got:#?}"
    );
    assert_eq!(
        lab.agent
            .metric("tracegap_likely_uninstrumented_spans_total")?,
        5.0
    );
    // The report says so (it is refreshed every second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while status(&lab)? != Some(false) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(&lab)?, Some(false), "{:?}", lab.report()?.services);
    // Redeployed with an SDK: its first export flips it, and its calls
    // get no span of tracegap's from then on.
    lab.services.clear();
    lab.start("silent", Behaviour::Instrumented, &[])?;
    call(&lab, 11)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status(&lab)? != Some(true) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(&lab)?, Some(true), "{:?}", lab.report()?.services);
    for n in 12..=16 {
        call(&lab, n)?;
    }
    // Its own spans arrive; none of tracegap's for these calls.
    let own = lab.receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter()
            .filter(|s| !s.synthetic() && s.service == "silent")
            .count()
            >= 6
    });
    assert!(
        own.iter()
            .filter(|s| !s.synthetic() && s.service == "silent")
            .count()
            >= 6
    );
    let late: Vec<String> = spans(&lab)
        .iter()
        .map(|s| s.parent_span_id())
        .filter(|p| p.as_str() > format!("{:016x}", 11u64).as_str())
        .collect();
    assert!(late.is_empty(), "{late:?}");
    Ok(())
}

/// A Python service whose calls go out through `requests` without the
/// context it received: listens on 8080, calls `sys.argv[1]`.
fn python_relay() -> String {
    tracegap_tests::python_server(
        ", requests",
        "requests.get(sys.argv[1], timeout=5)",
        "http.server.ThreadingHTTPServer((\"0.0.0.0\", 8080), H).serve_forever()",
    )
}

/// The gap says what would close it, from what the wire showed: a Python
/// service calling out through `requests` without the context it received
/// is told to instrument `requests`, on the report and on the span.
#[test]
fn a_broken_python_requests_caller_is_told_its_fix() -> anyhow::Result<()> {
    if !privileged("a_broken_python_requests_caller_is_told_its_fix") {
        return Ok(());
    }
    let mut lab = lab(&["client", "relay", "service-c"])?;
    lab.start("service-c", Behaviour::Instrumented, &[])?;
    let _relay = tracegap_tests::Child::spawn(lab.node.pod("relay").command("python3").args([
        "-c",
        &python_relay(),
        &lab.url("service-c", "/stock"),
    ]))?;
    let url = lab.url("relay", "/order");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lab.curl("client", &url, &[&tp(T1, S1, "01")]).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the relay never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.wait_kind("relay", "service-c", "broken_propagation", 1)?;
    let report = lab.report()?;
    let edge = report
        .edges
        .iter()
        .find(|e| e.source == "relay" && e.destination == "service-c")
        .expect("the relay's edge");
    let fix = edge.fixes.get("broken_propagation").expect("a fix");
    assert!(
        fix.contains("Python requests") && fix.contains("opentelemetry-instrumentation-requests"),
        "{fix}"
    );
    let spans = lab.synthetic("broken_propagation", 1);
    assert_eq!(spans[0].attr("tracegap.gap.fix").as_ref(), Some(fix));
    // The call without a context into the relay: curl, told as such.
    lab.curl("client", &url, &[])?;
    lab.wait_kind("client", "relay", "missing_context", 1)?;
    let report = lab.report()?;
    let fix = report
        .edges
        .iter()
        .find(|e| e.source == "client" && e.destination == "relay")
        .and_then(|e| e.fixes.get("missing_context"))
        .cloned()
        .unwrap_or_default();
    assert!(fix.contains("curl"), "{fix}");
    lab.agent.stop()?;
    Ok(())
}

/// Other tracers' formats as OpenTelemetry services send them: the Python
/// SDK with the official contrib propagators (X-Ray, Google Cloud Trace,
/// OpenTracing; `cargo xtask test` installs them, tests/clients) calls a
/// W3C-only relay. Each format is named, never missing; where the ids
/// convert, tracegap's spans join the caller's own trace; the relay's new
/// trace is a format mismatch whose fix names the propagator; and the
/// X-Ray caller is then told the relay does not read X-Ray.
#[test]
fn other_tracers_formats_from_the_opentelemetry_sdk_are_named_joined_and_fixed()
-> anyhow::Result<()> {
    if !privileged("other_tracers_formats_from_the_opentelemetry_sdk_are_named_joined_and_fixed") {
        return Ok(());
    }
    let Some(python) = std::env::var_os("TRACEGAP_OTEL_PYTHON") else {
        println!(
            "SKIPPED other_tracers_formats_from_the_opentelemetry_sdk_are_named_joined_and_fixed: TRACEGAP_OTEL_PYTHON unset (cargo xtask test sets it)"
        );
        return Ok(());
    };
    let python = python.to_string_lossy().into_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/otel_caller.py");
    let mut lab = lab(&["client", "service-w", "service-c"])?;
    lab.start("service-c", Behaviour::Instrumented, &[])?;
    let c = lab.url("service-c", "/stock");
    lab.start("service-w", Behaviour::Instrumented, &[&c])?;
    let url = lab.url("service-w", "/order");
    let edge = |lab: &Lab, src: &str, dst: &str| -> anyhow::Result<_> {
        Ok(lab
            .report()?
            .edges
            .into_iter()
            .find(|e| e.source == src && e.destination == dst)
            .unwrap_or_default())
    };
    // (OTEL_PROPAGATORS, the format's name, whether its ids are W3C's
    // whole: OpenTracing's carry the low 64 bits of the trace id.)
    for (i, (propagator, format, whole)) in [
        ("xray", "xray", true),
        ("gcp_trace", "cloudtrace", true),
        ("ottrace", "ottracer", false),
    ]
    .into_iter()
    .enumerate()
    {
        let out = lab
            .node
            .pod("client")
            .command(&python)
            .env("OTEL_PROPAGATORS", propagator)
            .args([script, &url, &url])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{propagator}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let traces: Vec<String> = serde_json::from_slice(&out.stdout)?;
        let sdk = traces.first().context("no trace id")?.clone();
        let joined = if whole {
            sdk.clone()
        } else {
            format!("{:0>32}", &sdk[16..])
        };
        // The relay started a W3C trace of its own: a format mismatch,
        // placed in the caller's trace, its fix the propagator to add.
        lab.wait_kind(
            "service-w",
            "service-c",
            "format_mismatch",
            2 * i as u64 + 2,
        )?;
        let span = lab
            .receiver
            .wait_for(Duration::from_secs(10), |all| {
                all.iter().any(|s| s.synthetic() && s.trace_id() == joined)
            })
            .into_iter()
            .find(|s| s.synthetic() && s.trace_id() == joined)
            .with_context(|| format!("{propagator}: no span in the caller's trace {joined}"))?;
        assert_eq!(span.gap().as_deref(), Some("format_mismatch"), "{span:?}");
        assert_eq!(span.service, "service-c");
        let fix = span.attr("tracegap.gap.fix").unwrap_or_default();
        assert!(
            fix.contains(&format!(
                "received a {format} context and sent a new w3c trace"
            )),
            "{propagator}: {fix}"
        );
        // Both requests' contexts read, the unpadded span id too.
        let into_w = edge(&lab, "client", "service-w")?;
        assert_eq!(into_w.formats.get(format), Some(&2), "{into_w:?}");
        for not in ["missing_context", "malformed_context"] {
            assert_eq!(into_w.kinds.get(not), None, "{into_w:?}");
        }
    }
    let w = edge(&lab, "service-w", "service-c")?;
    assert!(
        w.fixes
            .get("format_mismatch")
            .is_some_and(|f| f.contains("OTEL_PROPAGATORS=tracecontext,baggage,ottrace")),
        "the latest fix names the latest format's propagator: {w:?}"
    );
    // The X-Ray caller again: the relay is known not to read X-Ray now.
    let mismatches = lab.kind_count("client", "service-w", "format_mismatch")?;
    let out = lab
        .node
        .pod("client")
        .command(&python)
        .env("OTEL_PROPAGATORS", "xray")
        .args([script, &url])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Judged once its hop is settled: one mismatch more than before it.
    lab.wait_kind("client", "service-w", "format_mismatch", mismatches + 1)?;
    let fix = edge(&lab, "client", "service-w")?
        .fixes
        .get("format_mismatch")
        .cloned()
        .unwrap_or_default();
    assert!(
        fix.contains("the callee does not read xray")
            && fix.contains("OTEL_PROPAGATORS=tracecontext,baggage,xray"),
        "{fix}"
    );
    lab.agent.stop()?;
    Ok(())
}
