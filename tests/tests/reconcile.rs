//! Reconciling the wire with the trace store, end to end: instrumented demo
//! services in pods exporting their own spans over OTLP/HTTP to a real
//! receiver, the lab's trace store answering Jaeger's query API over what
//! it received, and the agent on the pods' veths reading traces back
//! (`--trace-store`). Each test asserts what arrives in the store after
//! the settle delay: stitched spans under the breaking service's own span
//! and linked to the callee's own trace, no duplicate for a callee that
//! recorded the request itself, each missing-span cause, and the wire-only
//! behaviour when the store is away.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tracegap_agent::{
    agent::AgentConfig,
    reconcile::ReconcileConfig,
    report::{CalleeSpans, Report},
    tracestore::StoreKind,
};
use tracegap_tests::{
    Node,
    agent::Agent,
    agent_config,
    demo::{Behaviour, Propagator, Service, ServiceSpec},
    otlp::{Received, Receiver},
    privileged,
};

const T1: &str = "0af7651916cd43dd8448eb211c80319c";
const SETTLE: Duration = Duration::from_millis(800);

fn traceparent(trace: &str, parent: &str) -> String {
    format!("traceparent: 00-{trace}-{parent}-01")
}

/// Dropped in field order: services, agent, query API, receivers, node.
struct Lab {
    services: Vec<Service>,
    agent: Agent,
    _reader: Option<tracegap_lab::query::QueryServer>,
    receiver: Receiver,
    /// A second store that refuses every export (503), as a collector
    /// whose backend is down.
    refusing: Receiver,
    node: Node,
}

/// Which API the agent reads the store through.
enum Store {
    /// The lab's store's Jaeger query API.
    Jaeger,
    /// The lab's store answering as Grafana Tempo does (an imitation:
    /// Tempo cannot run here).
    Tempo,
    /// Somewhere else.
    At(String),
}

/// A node with `pods`, the agent reading traces back from `store` (its
/// kind detected), `instrumented` declared so in its names.
fn lab(pods: &[&str], store: Store, instrumented: &[&str]) -> anyhow::Result<Lab> {
    let declared: Vec<(&str, bool)> = instrumented.iter().map(|s| (*s, true)).collect();
    lab_declaring(pods, store, &declared)
}

/// As [`lab`], with services declared instrumented or not.
fn lab_declaring(pods: &[&str], store: Store, declared: &[(&str, bool)]) -> anyhow::Result<Lab> {
    lab_at_rate(pods, store, declared, 500)
}

/// As [`lab_declaring`], asking the store `qps` times a second at most.
fn lab_at_rate(
    pods: &[&str],
    store: Store,
    declared: &[(&str, bool)],
    qps: u32,
) -> anyhow::Result<Lab> {
    let node = Node::new(pods)?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let mut refusing = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    refusing.refuse();
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let reader = match &store {
        Store::At(_) => None,
        Store::Jaeger => Some(tracegap_lab::query::QueryServer::start(
            local,
            receiver.shared(),
            std::sync::Arc::default(),
            None,
        )?),
        Store::Tempo => Some(tracegap_lab::query::QueryServer::start_tempo(
            local,
            receiver.shared(),
        )?),
    };
    let url = match store {
        Store::At(url) => url,
        _ => format!(
            "http://127.0.0.1:{}",
            reader.as_ref().map_or(0, |r| r.addr.port())
        ),
    };
    let mut services = node.identities("lab");
    for (_, id) in &mut services {
        if let Some((_, d)) = declared.iter().find(|(s, _)| *s == id.service) {
            id.instrumented = Some(*d);
        }
    }
    let agent = Agent::start(AgentConfig {
        services,
        reconcile: Some(ReconcileConfig {
            kind: StoreKind::Auto,
            settle: SETTLE,
            qps,
            ..ReconcileConfig::new(url)
        }),
        ..agent_config(&node, &receiver)
    })?;
    Ok(Lab {
        services: Vec::new(),
        agent,
        _reader: reader,
        receiver,
        refusing,
        node,
    })
}

/// client -> service-b -> service-c: service-b records its server span
/// but calls service-c with a plain client, so no context crosses and
/// service-c starts traces of its own. `instrumented`: declared so.
fn broken_chain(store: Store, instrumented: &[&str]) -> anyhow::Result<Lab> {
    let mut lab = lab(&["client", "service-b", "service-c"], store, instrumented)?;
    let port = lab.receiver.http.port();
    lab.start(
        "service-b",
        Behaviour::ServerSpansOnly,
        &["service-c"],
        port,
        |s| s,
    )?;
    lab.start("service-c", Behaviour::Instrumented, &[], port, |s| s)?;
    Ok(lab)
}

impl Lab {
    fn url(&self, pod: &str, path: &str) -> String {
        format!("http://{}:8080{path}", self.node.pod(pod).ipv4)
    }

    /// Starts a service in `pod`, exporting its spans to `store`.
    fn start(
        &mut self,
        pod: &str,
        behaviour: Behaviour,
        downstream: &[&str],
        otlp_port: u16,
        tweak: impl FnOnce(ServiceSpec) -> ServiceSpec,
    ) -> anyhow::Result<()> {
        let spec = ServiceSpec {
            downstream: downstream.iter().map(|d| self.url(d, "/next")).collect(),
            otlp: Some(format!("http://{}:{otlp_port}", self.node.gateway())),
            ..ServiceSpec::new(pod, 8080, behaviour)
        };
        self.services.push(tweak(spec).start(self.node.pod(pod))?);
        Ok(())
    }

    fn curl(&self, from: &str, url: &str, headers: &[&str]) -> anyhow::Result<()> {
        let mut args = Vec::new();
        for h in headers {
            args.extend(["-H", *h]);
        }
        self.node.pod(from).curl(url, &args)?;
        Ok(())
    }

    fn report(&self) -> anyhow::Result<Report> {
        let (status, body) = self.agent.get_report()?;
        anyhow::ensure!(status == 200, "/report answered {status}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until `n` hops are classified and nothing is held any more.
    fn settle(&self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let hops: u64 = self.report()?.edges.iter().map(|e| e.requests).sum();
            let held = self.agent.metric("tracegap_reconcile_pending")?;
            let queued = self.agent.metric("tracegap_export_queue_spans")?;
            if hops >= n && held == 0.0 && queued == 0.0 {
                // The last batch in flight.
                std::thread::sleep(Duration::from_millis(500));
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "not settled: {hops} of {n} hops, {held} held, {queued} queued"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn synthetic(&self, service: &str) -> Vec<Received> {
        self.receiver
            .spans()
            .into_iter()
            .filter(|s| s.synthetic() && s.service == service)
            .collect()
    }

    fn own(&self, service: &str) -> Vec<Received> {
        self.receiver
            .spans()
            .into_iter()
            .filter(|s| !s.synthetic() && s.service == service)
            .collect()
    }

    fn callee_spans(&self, src: &str, dst: &str) -> anyhow::Result<CalleeSpans> {
        Ok(self
            .report()?
            .callee_spans
            .into_iter()
            .find(|c| c.source == src && c.destination == dst)
            .unwrap_or_default())
    }
}

#[test]
fn a_stitched_span_sits_under_the_breaking_service_s_own_span_and_links_the_callee_s_trace()
-> anyhow::Result<()> {
    if !privileged("a_stitched_span_sits_under_the_breaking_service_s_own_span") {
        return Ok(());
    }
    stitched_under_the_breaking_span(Store::Jaeger)
}

#[test]
fn the_same_through_tempo_s_api() -> anyhow::Result<()> {
    if !privileged("the_same_through_tempo_s_api") {
        return Ok(());
    }
    stitched_under_the_breaking_span(Store::Tempo)
}

fn stitched_under_the_breaking_span(store: Store) -> anyhow::Result<()> {
    let lab = broken_chain(store, &[])?;
    let parents = ["00f067aa0ba902b7", "00f067aa0ba902b8", "00f067aa0ba902b9"];
    for p in parents {
        lab.curl(
            "client",
            &lab.url("service-b", "/checkout"),
            &[&traceparent(T1, p)],
        )?;
    }
    // 3 client -> b, 3 b -> c.
    lab.settle(6)?;
    let stitched = lab.synthetic("service-c");
    assert_eq!(
        stitched.len(),
        3,
        "one stitched span per call: {stitched:#?}"
    );
    let b_spans = lab.own("service-b");
    let c_roots: Vec<Received> = lab
        .own("service-c")
        .into_iter()
        .filter(|s| s.span.parent_span_id.is_empty())
        .collect();
    assert_eq!(b_spans.len(), 3);
    assert_eq!(c_roots.len(), 3);
    for s in &stitched {
        assert_eq!(s.trace_id(), T1, "stitched into the caller's trace");
        // Under service-b's own server span, not beside it under the
        // client's: the span id that never crossed the wire.
        let parent = b_spans
            .iter()
            .find(|b| b.span_id() == s.parent_span_id())
            .unwrap_or_else(|| panic!("parent {} is not service-b's: {s:#?}", s.parent_span_id()));
        assert!(parents.contains(&parent.parent_span_id().as_str()));
        assert_eq!(s.attr("tracegap.parent").as_deref(), Some("store"));
        // Linked to service-c's own root span for that very request.
        assert_eq!(s.span.links.len(), 1, "{s:#?}");
        let link = &s.span.links[0];
        let root = c_roots
            .iter()
            .find(|r| r.span.span_id == link.span_id && r.span.trace_id == link.trace_id)
            .expect("the link names one of service-c's root spans");
        assert_eq!(
            s.attr("tracegap.callee.trace_id"),
            Some(root.trace_id()),
            "the callee's trace id, searchable"
        );
    }
    // Each root linked once: one request's record, not shared.
    let mut linked: Vec<_> = stitched
        .iter()
        .map(|s| s.span.links[0].span_id.clone())
        .collect();
    linked.sort();
    linked.dedup();
    assert_eq!(linked.len(), 3);
    // The hops into service-b: its span arrived under the client's.
    let into_b = lab.callee_spans("client", "service-b")?;
    assert_eq!(
        (into_b.arrived, into_b.lost_in_pipeline),
        (3, 0),
        "{into_b:?}"
    );
    assert_eq!(
        lab.agent
            .metric("tracegap_reconciled_spans_total{action=\"placed\"}")?,
        3.0
    );
    assert_eq!(
        lab.agent
            .metric("tracegap_reconciled_spans_total{action=\"linked\"}")?,
        3.0
    );
    // What the store showed is learned.
    let learned = lab.report()?.services;
    assert!(
        learned
            .iter()
            .any(|s| s.service == "service-c" && s.instrumented == Some(true)),
        "{learned:?}"
    );
    Ok(())
}

#[test]
fn a_bare_call_into_a_service_that_records_it_adds_no_span_but_one_into_a_silent_service_does()
-> anyhow::Result<()> {
    if !privileged("a_bare_call_into_a_service_that_records_it_adds_no_span") {
        return Ok(());
    }
    let mut lab = lab(&["client", "service-c", "service-d"], Store::Jaeger, &[])?;
    let port = lab.receiver.http.port();
    lab.start("service-c", Behaviour::Instrumented, &[], port, |s| s)?;
    lab.start("service-d", Behaviour::DropsHeaders, &[], port, |s| s)?;
    for _ in 0..4 {
        lab.curl("client", &lab.url("service-c", "/items"), &[])?;
        lab.curl("client", &lab.url("service-d", "/items"), &[])?;
    }
    lab.settle(8)?;
    let report = lab.report()?;
    let kind = |dst: &str| {
        report
            .edges
            .iter()
            .find(|e| e.source == "client" && e.destination == dst)
            .and_then(|e| e.kinds.get("missing_context").copied())
    };
    // Both are gaps on the wire: the client sent no context.
    assert_eq!(kind("service-c"), Some(4));
    assert_eq!(kind("service-d"), Some(4));
    // service-c recorded each request as a root span of its own: no
    // synthetic duplicate beside it. service-d recorded nothing: its hops
    // are tracegap's spans only.
    assert_eq!(lab.own("service-c").len(), 4);
    assert!(
        lab.synthetic("service-c").is_empty(),
        "{:#?}",
        lab.synthetic("service-c")
    );
    assert_eq!(lab.synthetic("service-d").len(), 4);
    assert_eq!(
        lab.agent
            .metric("tracegap_reconciled_spans_total{action=\"suppressed\"}")?,
        4.0
    );
    Ok(())
}

#[test]
fn a_missing_span_says_whether_it_arrived_was_lost_never_left_or_started_a_new_trace()
-> anyhow::Result<()> {
    if !privileged("a_missing_span_says_whether_it_arrived") {
        return Ok(());
    }
    // quiet exports to a port nobody listens on (connection refused: no
    // HTTP exchange to see), declared instrumented as an operator would;
    // elsewhere exports to a collector that takes its spans (200) and
    // keeps them from the store the agent reads: the facts disagree.
    let mut lab = lab(
        &["client", "fine", "lossy", "quiet", "b3-only", "elsewhere"],
        Store::Jaeger,
        &["quiet", "elsewhere"],
    )?;
    let other = tracegap_tests::otlp::Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let (good, bad) = (lab.receiver.http.port(), lab.refusing.http.port());
    lab.start("fine", Behaviour::Instrumented, &[], good, |s| s)?;
    lab.start("lossy", Behaviour::Instrumented, &[], bad, |s| s)?;
    let closed = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?
        .local_addr()?
        .port();
    lab.start("quiet", Behaviour::Instrumented, &[], closed, |s| s)?;
    lab.start(
        "elsewhere",
        Behaviour::Instrumented,
        &[],
        other.http.port(),
        |s| s,
    )?;
    lab.start("b3-only", Behaviour::Instrumented, &[], good, |s| {
        ServiceSpec {
            propagator: Propagator::B3,
            ..s
        }
    })?;
    let mut parent = 0x1000u64;
    for svc in ["fine", "lossy", "quiet", "b3-only", "elsewhere"] {
        for _ in 0..3 {
            parent += 1;
            lab.curl(
                "client",
                &lab.url(svc, "/"),
                &[&traceparent(T1, &format!("{parent:016x}"))],
            )?;
        }
    }
    lab.settle(12)?;
    let got = |svc: &str| lab.callee_spans("client", svc);
    let fine = got("fine")?;
    assert_eq!(
        (fine.arrived, fine.lost_in_pipeline, fine.not_exported),
        (3, 0, 0),
        "{fine:?}"
    );
    let lossy = got("lossy")?;
    assert_eq!(lossy.lost_in_pipeline, 3, "{lossy:?}");
    assert_eq!(lossy.export_answers.get("503"), Some(&3), "{lossy:?}");
    assert_eq!(lossy.example.as_deref(), Some(T1));
    let quiet = got("quiet")?;
    assert_eq!(quiet.not_exported, 3, "{quiet:?}");
    // Taken (200) and not in the store: unknown, never lost_in_pipeline.
    let elsewhere = got("elsewhere")?;
    assert_eq!(
        (elsewhere.unknown, elsewhere.lost_in_pipeline),
        (3, 0),
        "{elsewhere:?}"
    );
    assert!(other.spans().iter().any(|s| s.service == "elsewhere"));
    // b3-only cannot read traceparent: its spans are roots of new traces.
    let b3 = got("b3-only")?;
    assert_eq!(b3.new_trace, 3, "{b3:?}");
    assert_eq!(
        lab.agent
            .metric("tracegap_callee_spans_total{source_service=\"client\",destination_service=\"lossy\",outcome=\"lost_in_pipeline\"}")?,
        3.0
    );
    // The Trace Quality page fails lossy on it, with the trace.
    let (status, body) = lab
        .agent
        .get_report_path("/api/quality-metrics?service=lossy")?;
    assert_eq!(status, 200);
    let q: serde_json::Value = serde_json::from_str(&body)?;
    let m = q["metrics"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["name"] == "Spans reach the trace store")
        })
        .cloned()
        .expect("the metric");
    assert_eq!(m["failureCount"], 3);
    assert_eq!(m["failureExamples"][0]["traceID"], T1);
    Ok(())
}

#[test]
fn a_trace_store_that_is_away_leaves_the_wire_s_spans_as_they_are_with_a_note() -> anyhow::Result<()>
{
    if !privileged("a_trace_store_that_is_away") {
        return Ok(());
    }
    let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    // service-c declared instrumented: a direct, sampled call into it is a
    // check the store cannot answer.
    let lab = broken_chain(
        Store::At(format!("http://127.0.0.1:{closed}")),
        &["service-c"],
    )?;
    for p in ["00f067aa0ba902b7", "00f067aa0ba902b8"] {
        lab.curl(
            "client",
            &lab.url("service-b", "/checkout"),
            &[&traceparent(T1, p)],
        )?;
    }
    lab.curl(
        "client",
        &lab.url("service-c", "/"),
        &[&traceparent(T1, "00f067aa0ba902b9")],
    )?;
    lab.settle(5)?;
    // The spans go out as the wire alone places them: under the span the
    // client sent, unlinked.
    let stitched = lab.synthetic("service-c");
    assert_eq!(stitched.len(), 2);
    for s in &stitched {
        assert!(s.parent_span_id().starts_with("00f067aa0ba902b"), "{s:#?}");
        assert!(s.span.links.is_empty());
        assert_eq!(s.attr("tracegap.parent"), None);
    }
    assert_eq!(
        lab.agent
            .metric("tracegap_reconciled_spans_total{action=\"unreconciled\"}")?,
        2.0
    );
    assert!(
        lab.agent
            .metric("tracegap_trace_store_queries_total{query=\"trace\",outcome=\"store_away\"}")?
            > 0.0
    );
    let (status, body) = lab.agent.get("/readyz")?;
    assert_eq!(status, 200, "still ready: the data path runs");
    assert!(
        body.contains("note: trace store") && body.contains(&closed.to_string()),
        "{body}"
    );
    // Nothing claimed about callees: the store could not say. Each check
    // of a callee known to record (service-c declared, service-b seen
    // exporting) waited for the store, then counts as not checked.
    let report = lab.report()?;
    let not_checked: u64 = report.callee_spans.iter().map(|c| c.not_checked).sum();
    assert_eq!(not_checked, 3, "{:?}", report.callee_spans);
    for c in &report.callee_spans {
        assert_eq!(
            c.arrived + c.new_trace + c.lost_in_pipeline + c.not_exported + c.unknown,
            0,
            "{c:?}"
        );
        assert_eq!(c.example, None, "{c:?}");
    }
    Ok(())
}

#[test]
fn checks_the_query_rate_puts_off_are_asked_in_a_later_round_not_dropped() -> anyhow::Result<()> {
    if !privileged("checks_the_query_rate_puts_off") {
        return Ok(());
    }
    // Two queries a second: five sampled calls, each in a trace of its
    // own, come due within a round or two, more than the rate allows.
    let mut lab = lab_at_rate(&["client", "fine"], Store::Jaeger, &[("fine", true)], 2)?;
    let port = lab.receiver.http.port();
    lab.start("fine", Behaviour::Instrumented, &[], port, |s| s)?;
    let n = 5u64;
    for i in 0..n {
        let trace = format!("{:032x}", 0x5eed_0000u64 + i);
        lab.curl(
            "client",
            &lab.url("fine", "/"),
            &[&traceparent(&trace, "00f067aa0ba902b7")],
        )?;
    }
    lab.settle(n)?;
    let deferred = lab
        .agent
        .metric("tracegap_trace_store_queries_total{query=\"trace\",outcome=\"rate_limited\"}")?;
    assert!(
        deferred > 0.0,
        "the rate was never spent: the test shows nothing"
    );
    let fine = lab.callee_spans("client", "fine")?;
    assert_eq!((fine.arrived, fine.not_checked), (n, 0), "{fine:?}");
    Ok(())
}

#[test]
fn what_the_store_shows_of_a_service_outweighs_what_was_guessed_or_declared() -> anyhow::Result<()>
{
    if !privileged("what_the_store_shows_of_a_service_outweighs") {
        return Ok(());
    }
    // silent: receives sampled context, records nothing, exports nothing.
    // recorder: records every request, but is declared uninstrumented.
    let mut lab = lab_declaring(
        &["client", "silent", "recorder"],
        Store::Jaeger,
        &[("recorder", false)],
    )?;
    let port = lab.receiver.http.port();
    lab.start("silent", Behaviour::DropsHeaders, &[], port, |s| s)?;
    lab.start("recorder", Behaviour::Instrumented, &[], port, |s| s)?;
    let n = tracegap_agent::reconcile::learned::UNINSTRUMENTED_AFTER;
    let mut parent = 0x2000u64;
    let mut call = |lab: &Lab, svc: &str| -> anyhow::Result<()> {
        parent += 1;
        lab.curl(
            "client",
            &lab.url(svc, "/"),
            &[&traceparent(T1, &format!("{parent:016x}"))],
        )
    };
    for _ in 0..n {
        call(&lab, "silent")?;
    }
    for _ in 0..3 {
        call(&lab, "recorder")?;
    }
    lab.settle(n + 3)?;
    // Learned: silent does not record.
    let services = lab.report()?.services;
    let silent = services.iter().find(|s| s.service == "silent");
    assert_eq!(
        silent.and_then(|s| s.instrumented),
        Some(false),
        "{services:?}"
    );
    // Each call that taught it got its span when its check found nothing
    // of silent (nothing declared: nobody said so), the evidence on it.
    let learned = lab.synthetic("silent");
    assert_eq!(learned.len(), n as usize);
    assert!(
        learned.iter().all(|s| {
            s.gap().as_deref() == Some("uninstrumented")
                && s.attr("tracegap.gap.detail")
                    .is_some_and(|d| d.contains("learned") && d.contains("no export"))
                && s.trace_id() == T1
        }),
        "{learned:#?}"
    );
    assert_eq!(
        lab.agent
            .metric("tracegap_reconciled_spans_total{action=\"uninstrumented\"}")?,
        n as f64
    );
    // The report's callee-span table says why there was no span of its own.
    let checks = lab.callee_spans("client", "silent")?;
    assert_eq!(checks.uninstrumented, n, "{checks:?}");
    // ...and its next hops are gaps, with spans of tracegap's as before.
    for _ in 0..3 {
        call(&lab, "silent")?;
    }
    lab.settle(n + 6)?;
    let kinds = lab
        .report()?
        .edges
        .into_iter()
        .find(|e| e.source == "client" && e.destination == "silent")
        .map(|e| e.kinds)
        .unwrap_or_default();
    assert_eq!(kinds.get("context_ok"), Some(&n), "{kinds:?}");
    assert_eq!(kinds.get("uninstrumented"), Some(&3), "{kinds:?}");
    assert_eq!(lab.synthetic("silent").len(), n as usize + 3);
    // Redeployed with an SDK: it records and exports, and its calls get
    // no span of tracegap's from the first one on (each is decided when
    // its check runs, by what is known then).
    drop(lab.services.remove(0));
    lab.start("silent", Behaviour::Instrumented, &[], port, |s| s)?;
    for _ in 0..3 {
        call(&lab, "silent")?;
    }
    lab.settle(n + 9)?;
    assert_eq!(lab.own("silent").len(), 3);
    assert_eq!(lab.synthetic("silent").len(), n as usize + 3);
    let services = lab.report()?.services;
    let silent = services.iter().find(|s| s.service == "silent");
    assert_eq!(
        silent.and_then(|s| s.instrumented),
        Some(true),
        "{services:?}"
    );
    assert_eq!(lab.callee_spans("client", "silent")?.arrived, 3);
    // recorder's hops are uninstrumented as declared, but its own spans are
    // in the store under the context it was sent: no duplicates.
    assert_eq!(lab.own("recorder").len(), 3);
    assert!(
        lab.synthetic("recorder").is_empty(),
        "{:#?}",
        lab.synthetic("recorder")
    );
    Ok(())
}
