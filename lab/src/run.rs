//! Running scenarios: a two-node cluster of pods, each service replicated
//! on both nodes behind a kube-proxy-style ClusterIP, the services as
//! processes in their namespaces, one tracegap agent per node on that
//! node's veths, the trace store, traffic through the ClusterIPs, then the
//! per-node reports, the trees, the verdict. Everything is removed after
//! each scenario, also on failure or Ctrl-C (drops run on every path).

use std::{
    collections::BTreeSet,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tracegap_agent::{
    agent::AgentConfig,
    export::{ExportConfig, OtlpProtocol},
    gap::silence::SilenceConfig,
    gap::span::ExportMode,
    reconcile::ReconcileConfig,
    report::{Report, table},
    tracestore::StoreKind,
    tracestore::jaeger::query,
};

use crate::{
    agent::Agent,
    cluster::{Cluster, SERVICE_PORT},
    cluster::{RECONCILE_QPS, RECONCILE_SETTLE},
    files,
    load::LoadSummary,
    netns::{Child, Node, Pod},
    query::QueryServer,
    scenario::{self, Expect, Scenario},
    secure::Secured,
    store::{Downtime, Received, Receiver},
    tree,
};

/// Set by the signal handler; long waits give up when it is set.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// How the lab runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub scenarios: Vec<String>,
    /// Short counts and delays (the tests).
    pub short: bool,
    /// Where the trace files go.
    pub out: PathBuf,
    /// The `tracegap-lab` binary, run in the pods as services and clients.
    pub lab_bin: PathBuf,
    /// Run the agents from their image as this pod template (deploy/base's
    /// DaemonSet) says, instead of in-process.
    pub container: Option<crate::container::PodTemplate>,
    /// After the scenarios, serve the traces and the UI until Ctrl-C.
    pub serve: Option<Serve>,
    /// Pass every span the store receives on to this OTLP/HTTP endpoint
    /// too (a Jaeger of the user's own, e.g. http://localhost:4318).
    pub forward: Option<String>,
    /// A Prometheus binary: it scrapes every agent of the run, and the
    /// served Trace Quality page is `tracegap quality` over it (both nodes
    /// summed, as in a cluster).
    pub prometheus: Option<PathBuf>,
    /// The store behind TLS, as a secured production one: its OTLP
    /// receiver over mutual TLS, its query API asking for a token and a
    /// tenant (see [`crate::secure`]).
    pub secure: bool,
}

impl Options {
    /// Short runs of `scenarios` with in-process agents, their files in
    /// `out`, nothing served or passed on: what the tests run.
    pub fn short(scenarios: &[&str], out: PathBuf, lab_bin: PathBuf) -> Self {
        Self {
            scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
            short: true,
            out,
            lab_bin,
            container: None,
            serve: None,
            forward: None,
            prometheus: None,
            secure: false,
        }
    }
}

/// Where the finished run's traces are served, with which UI.
#[derive(Clone, Debug)]
pub struct Serve {
    pub addr: SocketAddr,
    /// A Jaeger UI build (its index.html and static/).
    pub ui: Option<PathBuf>,
}

/// One scenario's result.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub report: Report,
    /// One line per finding, and whether each expectation held.
    pub verdict: Vec<String>,
    pub passed: bool,
    /// Example traces, rendered.
    pub trees: Vec<String>,
    /// Their trace ids.
    pub examples: Vec<String>,
    /// Spans the store received during the scenario.
    pub spans: Vec<Received>,
}

struct Ctx<'a> {
    /// Field order is drop order: the agents detach before the cluster goes.
    agents: Vec<Agent>,
    children: Vec<Child>,
    cluster: Cluster,
    store: &'a mut Receiver,
    opts: &'a Options,
    /// Services that serve HTTPS: their `/_lab/...` answers too.
    tls: std::collections::HashSet<String>,
    /// Scraping the agents, when the run has one.
    prometheus: Option<&'a crate::prometheus::Prometheus>,
    /// The store's CA and credentials, when it is behind TLS.
    secured: Option<&'a Secured>,
}

impl Ctx<'_> {
    /// The agents (started again) are Prometheus's targets from now on.
    fn agents_started(&self) -> anyhow::Result<()> {
        if let Some(p) = self.prometheus {
            p.set_targets(&self.agents.iter().map(|a| a.listen).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    /// Waits (20 s at most each: Prometheus takes up targets new to it
    /// within about 10 s) until Prometheus scrapes each agent and has what
    /// it counts now, and twice more: before the agents stop, so nothing
    /// they counted is missing from the cluster-wide view, and each series
    /// has the two samples a `rate()` over it needs.
    fn scraped(&self) {
        let Some(p) = self.prometheus else {
            return;
        };
        for a in &self.agents {
            let Ok(n) = a.metric("tracegap_http_requests_total") else {
                continue;
            };
            let up = format!("sum(up{{instance=\"{}\"}})", a.listen);
            let query = format!(
                "sum(tracegap_http_requests_total{{instance=\"{}\"}})",
                a.listen
            );
            let within = Duration::from_secs(20);
            if let Err(e) = p
                .wait_for_within(&up, 1.0, within)
                .and_then(|()| p.wait_for_within(&query, n, within))
            {
                eprintln!("lab: Prometheus behind the agent at {}: {e:#}", a.listen);
            }
        }
        // Two more scrapes (one a second).
        std::thread::sleep(Duration::from_millis(2200));
    }

    /// GET `path` of one of `service`'s replicas, over TLS if it serves it.
    fn lab_get(&self, service: &str, pod: &Pod, path: &str) -> anyhow::Result<(u16, String)> {
        let addr = SocketAddr::from((pod.ipv4, 8080));
        crate::http::get_over(addr, path, self.tls.contains(service))
    }

    /// The trace store as pods on `node` reach it.
    fn otlp(&self, node: &Node) -> String {
        format!(
            "{}://{}:{}",
            if self.secured.is_some() {
                "https"
            } else {
                "http"
            },
            Cluster::store_address(node),
            self.store.http.port()
        )
    }

    /// A service's URL: its ClusterIP. A path `grpc:/pkg.Svc/Method` is a
    /// gRPC method: `grpc://ip:port/pkg.Svc/Method`; `https:/path` is
    /// called over TLS.
    fn url(&self, service: &str, path: &str) -> String {
        let ip = self
            .cluster
            .service_ip(service)
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        if let Some(method) = path.strip_prefix("grpc:") {
            format!("grpc://{ip}:{SERVICE_PORT}{method}")
        } else if let Some(path) = path.strip_prefix("https:") {
            format!("https://{ip}:{SERVICE_PORT}{path}")
        } else {
            format!("http://{ip}:{SERVICE_PORT}{path}")
        }
    }

    fn in_pod(&self, pod: &Pod) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &pod.netns])
            .arg(&self.opts.lab_bin);
        if let Some(s) = self.secured {
            c.envs(s.exporter_env());
        }
        c
    }

    fn start_service(&mut self, svc: &scenario::Svc) -> anyhow::Result<()> {
        let replicas: Vec<(String, Pod)> = self
            .cluster
            .replicas(&svc.spec.name)
            .map(|(n, p)| (self.otlp(n), p.clone()))
            .collect();
        for (otlp, pod) in replicas {
            self.start_replica(svc, &pod, &otlp)?;
        }
        Ok(())
    }

    fn start_replica(&mut self, svc: &scenario::Svc, pod: &Pod, otlp: &str) -> anyhow::Result<()> {
        let s = &svc.spec;
        let mut cmd = self.in_pod(pod);
        cmd.args(["service", "--name", &s.name, "--port", "8080"])
            .arg("--behaviour")
            .arg(value_name(&s.behaviour))
            .arg("--propagator")
            .arg(value_name(&s.propagator))
            .arg("--sampler")
            .arg(s.sampler.to_string())
            .arg("--status")
            .arg(s.status.to_string())
            .arg("--delay")
            .arg(format!("{}ms", s.delay.as_millis()))
            .arg("--otlp")
            .arg(otlp)
            .arg("--metadata-bytes")
            .arg(s.metadata_bytes.to_string())
            .arg("--think")
            .arg(format!("{}ms", s.think.as_millis()));
        if s.grpc {
            cmd.arg("--grpc");
        }
        if s.tls {
            cmd.arg("--tls");
        }
        for (pod, path) in &svc.calls {
            cmd.arg("--downstream").arg(self.url(pod, path));
        }
        self.children.push(Child::spawn(&mut cmd)?);
        // Ready when it accepts connections.
        let addr = SocketAddr::from((pod.ipv4, 8080));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("{} did not start listening", s.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn run_load(&self, l: &scenario::Load) -> anyhow::Result<LoadSummary> {
        let s = &l.spec;
        let (node, pod) = self
            .cluster
            .replicas(l.pod)
            .next()
            .with_context(|| format!("no pod {}", l.pod))?;
        let mut cmd = self.in_pod(pod);
        cmd.args(["load", "--name", &s.name])
            .arg("--target")
            .arg(self.url(l.target.0, l.target.1))
            .arg("--count")
            .arg(s.count.to_string())
            .arg("--interval")
            .arg(format!("{}ms", s.interval.as_millis()))
            .arg("--sample-ratio")
            .arg(s.sample_ratio.to_string())
            .arg("--max-time")
            .arg(format!("{}s", s.max_time.as_secs()))
            .arg("--otlp")
            .arg(self.otlp(node));
        match s.propagator {
            Some(p) => cmd.arg("--propagator").arg(value_name(&p)),
            None => cmd.arg("--no-context"),
        };
        for (k, v) in &s.baggage {
            cmd.arg("--baggage").arg(format!("{k}={v}"));
        }
        let children: Vec<_> = (0..l.parallel.max(1))
            .map(|_| {
                cmd.stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .stdin(Stdio::null())
                    .spawn()
                    .with_context(|| format!("spawning {cmd:?}"))
            })
            .collect::<Result<_, _>>()?;
        // Progress on stderr for long loads (the slow request, the flood).
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let ticker = {
            let (done, pod, started) = (done.clone(), l.pod.to_owned(), Instant::now());
            std::thread::spawn(move || {
                let mut next = Duration::from_secs(5);
                while !done.load(Ordering::Relaxed) {
                    if started.elapsed() >= next {
                        eprintln!("  ... {pod} still sending, {}s", next.as_secs());
                        next += Duration::from_secs(5);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let mut total = LoadSummary::default();
        let waited = children
            .into_iter()
            .map(|c| c.wait_with_output())
            .collect::<Result<Vec<_>, _>>();
        done.store(true, Ordering::Relaxed);
        let _ = ticker.join();
        for out in waited? {
            let s: LoadSummary = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("reading the load summary of {}", l.pod))?;
            total.sent += s.sent;
            total.ok += s.ok;
            total.errors += s.errors;
            total.sampled += s.sampled;
            total.traces.extend(s.traces);
            total.traces_sampled.extend(s.traces_sampled);
        }
        Ok(total)
    }

    /// Spans a service's replicas could not export (their `/_lab/stats`).
    fn export_failed(&self, service: &str) -> anyhow::Result<u64> {
        let mut failed = 0;
        for (_, pod) in self.cluster.replicas(service) {
            let (status, body) = self.lab_get(service, pod, "/_lab/stats")?;
            anyhow::ensure!(status == 200, "/_lab/stats answered {status}");
            let v: serde_json::Value = serde_json::from_str(&body)?;
            failed += v["export_failed"]
                .as_u64()
                .context("no export_failed in /_lab/stats")?;
        }
        Ok(failed)
    }

    /// The calls `service`'s replicas made, by the Service they called:
    /// (made, failed), as the service itself counted them.
    fn calls_made(
        &self,
        service: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, (u64, u64)>> {
        let mut by = std::collections::BTreeMap::new();
        for (_, pod) in self.cluster.replicas(service) {
            let (status, body) = self.lab_get(service, pod, "/_lab/stats")?;
            anyhow::ensure!(status == 200, "/_lab/stats answered {status}");
            let v: serde_json::Value = serde_json::from_str(&body)?;
            for (host, c) in v["calls"].as_object().into_iter().flatten() {
                let name = self
                    .cluster
                    .services
                    .iter()
                    .find(|s| s.ip.to_string() == *host)
                    .map_or_else(|| host.clone(), |s| s.name.clone());
                let e: &mut (u64, u64) = by.entry(name).or_default();
                e.0 += c["made"].as_u64().unwrap_or_default();
                e.1 += c["failed"].as_u64().unwrap_or_default();
            }
        }
        Ok(by)
    }

    /// Which request each call of a service's replicas was made for, by
    /// the call's own address: what the service recorded itself.
    fn causes(
        &self,
        service: &str,
    ) -> anyhow::Result<std::collections::HashMap<SocketAddr, String>> {
        let mut by = std::collections::HashMap::new();
        for (_, pod) in self.cluster.replicas(service) {
            let (status, body) = self.lab_get(service, pod, "/_lab/causes")?;
            anyhow::ensure!(status == 200, "/_lab/causes answered {status}");
            let causes: Vec<crate::service::Cause> = serde_json::from_str(&body)?;
            by.extend(causes.into_iter().map(|c| (c.from, c.trace_id)));
        }
        Ok(by)
    }

    /// Every node's report, one after the other: each edge says which
    /// node's agent reported it.
    fn report(&self) -> anyhow::Result<Report> {
        let mut all = Report::default();
        for agent in &self.agents {
            let (status, body) = agent.get_report()?;
            anyhow::ensure!(status == 200, "/report answered {status}");
            merge(&mut all, serde_json::from_str(&body)?);
        }
        Ok(all)
    }

    /// Each node's agent's own losses ([`Agent::losses`]), one line, or
    /// None when no agent counted any.
    fn losses(&self) -> Option<String> {
        let per_node: Vec<String> = self
            .agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a.losses() {
                Ok(l) if l.is_empty() => None,
                Ok(l) => Some(format!("node-{}: {}", i + 1, l.join(", "))),
                Err(e) => Some(format!("node-{}: {e:#}", i + 1)),
            })
            .collect();
        (!per_node.is_empty()).then(|| per_node.join("; "))
    }

    /// A metric summed over the nodes' agents.
    fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        self.agents.iter().map(|a| a.metric(prefix)).sum()
    }

    fn hops(&self) -> anyhow::Result<u64> {
        Ok(self.report()?.edges.iter().map(|e| e.requests).sum())
    }

    /// Waits until the agent has classified `at_least` hops and its count
    /// stops moving, then until its export queue is empty.
    fn settle(&self, at_least: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut last, mut still_since) = (u64::MAX, Instant::now());
        loop {
            check_interrupted()?;
            let n = self.hops()?;
            if n != last {
                (last, still_since) = (n, Instant::now());
            }
            let quiet = still_since.elapsed() > Duration::from_millis(600);
            if (n >= at_least && quiet) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Held for the settle delay, then read back from the store.
        let deadline = deadline.max(Instant::now() + RECONCILE_SETTLE + Duration::from_secs(10));
        while self.metric("tracegap_reconcile_pending")? > 0.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        while self.metric("tracegap_export_queue_spans")? > 0.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // The batch in flight: the lab's in-process agents export every
        // 200 ms, the ConfigMap's every second (the agent's default).
        let in_flight = if self.opts.container.is_some() {
            1200
        } else {
            400
        };
        std::thread::sleep(Duration::from_millis(in_flight));
        Ok(())
    }
}

/// tracegap's spans stitching `callee`'s hops into their callers' traces.
fn stitched<'s>(spans: &'s [Received], callee: &str) -> Vec<&'s Received> {
    spans
        .iter()
        .filter(|s| {
            s.synthetic() && s.service == callee && s.gap().as_deref() == Some("broken_propagation")
        })
        .collect()
}

/// What reading the trace store back cost and did in a scenario: queries
/// made (not those rate-limited or skipped while it was away) per second
/// per node, and what became of the held spans.
fn reconcile_cost(ctx: &Ctx, took: Duration, report: &Report) -> anyhow::Result<String> {
    let mut queries = 0.0;
    for q in ["trace", "search"] {
        for o in ["found", "not_found", "error"] {
            queries += ctx.metric(&format!(
                "tracegap_trace_store_queries_total{{query=\"{q}\",outcome=\"{o}\"}}"
            ))?;
        }
    }
    let action = |a: &str| {
        ctx.metric(&format!(
            "tracegap_reconciled_spans_total{{action=\"{a}\"}}"
        ))
    };
    let hops: u64 = report.edges.iter().map(|e| e.requests).sum();
    let nodes = ctx.agents.len().max(1) as f64;
    Ok(format!(
        "info trace store read back: {queries} queries for {hops} hops in {:.1}s ({:.1}/s per node); \
         spans placed {}, linked {}, suppressed {}, unchanged {}, added for uninstrumented callees {}",
        took.as_secs_f64(),
        queries / took.as_secs_f64().max(0.001) / nodes,
        action("placed")?,
        action("linked")?,
        action("suppressed")?,
        action("unchanged")?,
        action("uninstrumented")?,
    ))
}

/// Adds one node's report to the cluster's.
fn merge(all: &mut Report, r: Report) {
    all.edges.extend(r.edges);
    all.overflow_hops += r.overflow_hops;
    all.callee_spans.extend(r.callee_spans);
    all.services.extend(r.services);
}

/// A finding in a sentence; `fix`, the report's for the edge and kind,
/// says which side of a format mismatch does not read the other's format.
fn explain(kind: &str, src: &str, dst: &str, fix: Option<&str>) -> String {
    match kind {
        "broken_propagation" => format!(
            "{src} was serving a traced request and called {dst} without its context: \
             {dst}'s spans start new traces; tracegap stitched the call into the original \
             trace (inferred link)"
        ),
        "passthrough" => format!(
            "{src} passed the trace headers on to {dst} without a span of its own: an \
             uninstrumented hop, invisible in Jaeger; tracegap added its span"
        ),
        "missing_context" => format!("requests from {src} to {dst} carry no trace context"),
        "unsampled" => format!("traces reaching {dst} are not sampled: counted, not exported"),
        "sampling_inconsistent" => format!(
            "{src} received sampled traces and sent them on unsampled: its sampler ignores \
             the parent, the trace will be torn at {dst}"
        ),
        "malformed_context" => format!("{src} sends an invalid trace context to {dst}"),
        "uninstrumented" => format!(
            "{dst} is not instrumented: the trace shows the call to it and nothing inside; \
             tracegap added its span"
        ),
        // The callee seen starting over for this caller's format.
        "format_mismatch" if fix.is_some_and(|f| f.starts_with("the callee does not read")) => {
            format!(
                "{dst} does not read the context format {src} sends: its traces start over \
                 at {dst}"
            )
        }
        "format_mismatch" => format!(
            "{src} did not understand its caller's context format and started new traces \
             towards {dst}"
        ),
        _ => format!("{src} -> {dst}: {kind}"),
    }
}

fn check(
    e: &Expect,
    report: &Report,
    ctx: &Ctx,
    spans: &[Received],
    sent: u64,
) -> anyhow::Result<(bool, String)> {
    // An edge may be reported by both nodes (by each for the calls its
    // pods made): summed.
    let edges = |s: &str, d: &str| -> Vec<&tracegap_agent::report::Edge> {
        report
            .edges
            .iter()
            .filter(|e| e.source == s && e.destination == d)
            .collect()
    };
    Ok(match e {
        Expect::Kind(s, d, k) => {
            let n: u64 = edges(s, d).iter().filter_map(|e| e.kinds.get(*k)).sum();
            (n > 0, format!("{k} on {s} -> {d}: {n}"))
        }
        Expect::NoGaps => {
            let gaps: u64 = report
                .edges
                .iter()
                .flat_map(|e| e.kinds.iter())
                .filter(|(k, _)| *k != "context_ok" && *k != "unsampled")
                .map(|(_, n)| n)
                .sum();
            (gaps == 0, format!("no gaps: {gaps} found"))
        }
        Expect::AllTlsRead => {
            let unread: u64 = report.encrypted.iter().map(|e| e.connections).sum();
            (
                unread == 0,
                format!("TLS connections left unread: {unread}"),
            )
        }
        Expect::BaggageCarried(s, d) => {
            let n: u64 = edges(s, d).iter().map(|e| e.baggage_carried).sum();
            (n > 0, format!("baggage carried on {s} -> {d}: {n}"))
        }
        Expect::SpanLasting(gap, want) => {
            let got = spans
                .iter()
                .filter(|s| s.gap().as_deref() == Some(*gap))
                .map(|s| {
                    Duration::from_nanos(
                        s.span
                            .end_time_unix_nano
                            .saturating_sub(s.span.start_time_unix_nano),
                    )
                })
                .max()
                .unwrap_or_default();
            let ok = got >= *want && got < *want + Duration::from_secs(2);
            (
                ok,
                format!("{gap} span lasting {got:.1?} (request delayed {want:?})"),
            )
        }
        Expect::ExportRecovered => {
            let errors = ctx.metric("tracegap_export_errors_total")?;
            let dropped = ctx.metric("tracegap_spans_dropped_total")?;
            let exported = ctx.metric("tracegap_spans_exported_total")?;
            let synthetic = spans.iter().filter(|s| s.synthetic()).count();
            (
                errors > 0.0 && synthetic > 0,
                format!(
                    "store down: {errors} export errors, {dropped} spans dropped; \
                     {exported} exported, {synthetic} arrived after it came back"
                ),
            )
        }
        Expect::Placed(breaking, callee) => {
            let all = ctx.store.spans();
            let own: std::collections::HashSet<String> = all
                .iter()
                .filter(|s| s.service == *breaking && !s.synthetic())
                .map(|s| s.span_id())
                .collect();
            let stitched = stitched(spans, callee);
            let placed = stitched
                .iter()
                .filter(|s| own.contains(&s.parent_span_id()))
                .count();
            (
                !stitched.is_empty() && placed == stitched.len(),
                format!(
                    "placed under {breaking}'s own spans: {placed} of {} stitched {callee} spans",
                    stitched.len()
                ),
            )
        }
        Expect::Caused(breaking, callee) => {
            let causes = ctx.causes(breaking)?;
            let stitched = stitched(spans, callee);
            let (mut right, mut wrong, mut unplaced, mut untold) = (0, 0, 0, 0);
            for s in &stitched {
                let from = s
                    .attr("network.peer.address")
                    .zip(s.attr("network.peer.port"))
                    .and_then(|(a, p)| format!("{a}:{p}").parse::<SocketAddr>().ok());
                match (from.and_then(|f| causes.get(&f)), s.attr("tracegap.link")) {
                    (None, _) => untold += 1,
                    (Some(t), Some(l)) if l == "inferred" && s.trace_id() == *t => right += 1,
                    (Some(_), Some(l)) if l == "inferred" => wrong += 1,
                    (Some(_), _) => unplaced += 1,
                }
            }
            (
                !stitched.is_empty() && wrong == 0 && untold == 0,
                format!(
                    "{breaking}'s calls to {callee} against what {breaking} recorded: {right} under the request that caused them, {wrong} under a wrong one, {unplaced} unplaced (linked to their candidates){}",
                    if untold > 0 {
                        format!(", {untold} with no cause recorded")
                    } else {
                        String::new()
                    }
                ),
            )
        }
        Expect::Linked(callee) => {
            let all = ctx.store.spans();
            let roots: std::collections::HashSet<(String, String)> = all
                .iter()
                .filter(|s| {
                    s.service == *callee && !s.synthetic() && s.span.parent_span_id.is_empty()
                })
                .map(|s| (s.trace_id(), s.span_id()))
                .collect();
            let stitched = stitched(spans, callee);
            let linked = stitched
                .iter()
                .filter(|s| {
                    s.span.links.iter().any(|l| {
                        roots.contains(&(
                            crate::store::hex(&l.trace_id),
                            crate::store::hex(&l.span_id),
                        ))
                    })
                })
                .count();
            (
                !stitched.is_empty() && linked == stitched.len(),
                format!(
                    "linked to {callee}'s own trace: {linked} of {} stitched spans",
                    stitched.len()
                ),
            )
        }
        Expect::LinkedDownstream(caller, callee) => {
            let all = ctx.store.spans();
            // The callee's own spans, by (trace, parent): each is the child
            // of the span that called it.
            let called: std::collections::HashSet<(String, String)> = all
                .iter()
                .filter(|s| s.service == *callee && !s.synthetic())
                .map(|s| (s.trace_id(), s.parent_span_id()))
                .collect();
            let mismatched: Vec<&Received> = spans
                .iter()
                .filter(|s| {
                    s.synthetic()
                        && s.service == *callee
                        && s.attr("tracegap.caller.service").as_deref() == Some(*caller)
                        && s.gap().as_deref() == Some("format_mismatch")
                })
                .collect();
            let linked = mismatched
                .iter()
                .filter(|s| {
                    s.span.links.iter().any(|l| {
                        crate::store::link_kind(l).as_deref() == Some("downstream_trace")
                            && called.contains(&(
                                crate::store::hex(&l.trace_id),
                                crate::store::hex(&l.span_id),
                            ))
                    })
                })
                .count();
            (
                !mismatched.is_empty() && linked == mismatched.len(),
                format!(
                    "format_mismatch spans of {caller}'s calls into {callee} linked to the trace {caller} started, at the span {callee}'s own is under: {linked} of {}",
                    mismatched.len()
                ),
            )
        }
        Expect::Suppressed(caller, callee) => {
            let bare: u64 = edges(caller, callee).iter().map(|e| e.requests).sum();
            let added = spans
                .iter()
                .filter(|s| {
                    s.synthetic() && s.attr("tracegap.caller.service").as_deref() == Some(*caller)
                })
                .count();
            (
                bare > 0 && added == 0,
                format!(
                    "{bare} calls without context from {caller} into {callee}, which records its own: {added} spans added"
                ),
            )
        }
        Expect::Spanned(caller, callee, gap) => {
            let calls: u64 = edges(caller, callee).iter().map(|e| e.requests).sum();
            let theirs: Vec<_> = spans
                .iter()
                .filter(|s| {
                    s.synthetic()
                        && s.service == *callee
                        && s.attr("tracegap.caller.service").as_deref() == Some(*caller)
                })
                .collect();
            let under = theirs
                .iter()
                .filter(|s| s.gap().as_deref() == Some(*gap) && !s.span.parent_span_id.is_empty())
                .count() as u64;
            (
                calls > 0 && under == calls && theirs.len() as u64 == calls,
                format!(
                    "{calls} calls from {caller} into {callee}: {under} {gap} spans under the caller's, {} synthetic spans in all",
                    theirs.len()
                ),
            )
        }
        Expect::CalleeSpans(src, dst, outcome) => {
            let of = |c: &tracegap_agent::report::CalleeSpans| match *outcome {
                "arrived" => c.arrived,
                "new_trace" => c.new_trace,
                "lost_in_pipeline" => c.lost_in_pipeline,
                "not_exported" => c.not_exported,
                "unknown" => c.unknown,
                "uninstrumented" => c.uninstrumented,
                _ => 0,
            };
            let on_edge = report
                .callee_spans
                .iter()
                .filter(|c| c.source == *src && c.destination == *dst);
            let (n, all): (u64, u64) = on_edge.fold((0, 0), |(n, all), c| {
                (
                    n + of(c),
                    all + c.arrived
                        + c.new_trace
                        + c.lost_in_pipeline
                        + c.not_exported
                        + c.unknown
                        + c.uninstrumented,
                )
            });
            (
                n > 0 && n == all,
                format!("{dst}'s spans for {src}'s calls in the store: {outcome} {n} of {all}"),
            )
        }
        Expect::SpansLost(_) | Expect::AcrossRestart(..) | Expect::WithoutStore(_) => {
            // Judged later (once the agents stop; after the restart).
            (true, String::new())
        }
        Expect::KeptUp(share) => {
            let hops: u64 = report.edges.iter().map(|e| e.requests).sum();
            let lost = ctx.metric("tracegap_ringbuf_lost_events_total")?;
            let dropped = ctx.metric("tracegap_spans_dropped_total")?;
            let exported = ctx.metric("tracegap_spans_exported_total")?;
            let mut healthy = true;
            for a in &ctx.agents {
                healthy &= a.get("/healthz")?.0 == 200;
            }
            let ok = healthy && hops as f64 >= sent as f64 * share;
            (
                ok,
                format!(
                    "{hops} of {sent} requests classified; ring buffer lost {lost} events; \
                     {exported} spans exported, {dropped} dropped; healthy: {healthy}"
                ),
            )
        }
    })
}

/// The restart step (see [`Expect::AcrossRestart`]): the agents stop and
/// start again while `src` keeps its connections open; the load into
/// `src` runs again; the new agents must read `src`'s calls to `dst` each
/// once, at least 95% of them with their context, and say they joined.
fn across_restart(
    ctx: &mut Ctx,
    sc: &Scenario,
    config: Option<&AgentConfig>,
    (store_port, query_port): (u16, u16),
    src: &str,
    dst: &str,
) -> anyhow::Result<(bool, String)> {
    let Some(config) = config else {
        return Ok((
            true,
            "info the agents run as containers: no restart step".to_owned(),
        ));
    };
    let load = sc
        .loads
        .iter()
        .find(|l| l.target.0 == src)
        .with_context(|| format!("no load into {src}"))?;
    let calls = |ctx: &Ctx| -> anyhow::Result<(u64, u64)> {
        Ok(ctx.calls_made(src)?.get(dst).copied().unwrap_or((0, 0)))
    };
    let before = calls(ctx)?;
    ctx.scraped();
    for a in &mut ctx.agents {
        a.stop_now()?;
    }
    ctx.agents = ctx
        .cluster
        .start_agents(config, store_port, Some(query_port))?;
    ctx.agents_started()?;
    let sent = ctx.run_load(load)?.sent;
    let after = calls(ctx)?;
    let (made, failed) = (after.0 - before.0, after.1 - before.1);
    ctx.settle(sent + made)?;
    let report = ctx.report()?;
    let edge = |f: &dyn Fn(&tracegap_agent::report::Edge) -> u64| -> u64 {
        report
            .edges
            .iter()
            .filter(|e| e.source == src && e.destination == dst)
            .map(f)
            .sum()
    };
    let read = edge(&|e| e.requests);
    let with_context = edge(&|e| e.kinds.get("context_ok").copied().unwrap_or(0));
    let joined = ctx.metric("tracegap_h2_joined_connections_total")?;
    let ok =
        failed == 0 && read == made && with_context as f64 >= 0.95 * made as f64 && joined >= 1.0;
    Ok((
        ok,
        format!(
            "across an agent restart: {src} made {made} calls to {dst} on its open connection ({failed} failed); the new agents read {read}, {with_context} with their context; {joined} connection(s) joined"
        ),
    ))
}

/// The no-store step (see [`Expect::WithoutStore`]): the agents restart
/// with no trace store and a quick learning rule; the loads that reach the
/// `callees` (directly, or through the service they target) run twice to
/// teach the agents, then once more; each callee's calls in that last run
/// must each have got a `likely` span. One verdict line per callee.
fn without_store(
    ctx: &mut Ctx,
    sc: &Scenario,
    config: Option<&AgentConfig>,
    (store_port, query_port): (u16, u16),
    callees: &[&str],
) -> anyhow::Result<Vec<String>> {
    let Some(config) = config else {
        return Ok(vec![
            "info the agents run as containers: no step without the store".to_owned(),
        ]);
    };
    let reaches = |l: &&scenario::Load, callee: &str| {
        l.target.0 == callee
            || sc
                .services
                .iter()
                .any(|s| s.spec.name == l.target.0 && s.calls.iter().any(|(c, _)| *c == callee))
    };
    let loads: Vec<&scenario::Load> = sc
        .loads
        .iter()
        .filter(|l| callees.iter().any(|c| reaches(l, c)))
        .collect();
    ctx.scraped();
    for a in &mut ctx.agents {
        a.stop_now()?;
    }
    let quick = AgentConfig {
        reconcile: None,
        silence: Some(SilenceConfig {
            after: Duration::from_secs(1),
            requests: 1,
        }),
        ..config.clone()
    };
    ctx.agents = ctx
        .cluster
        .start_agents(&quick, store_port, Some(query_port))?;
    ctx.agents_started()?;
    // Taught: each node's pods of each callee serve sampled requests over
    // more than a second. Four rounds: a gRPC caller keeps one connection,
    // to one pod of the callee, so each caller pod must be reached.
    for _ in 0..4 {
        for l in &loads {
            ctx.run_load(l)?;
        }
    }
    std::thread::sleep(Duration::from_millis(1200));
    let spans_of = |ctx: &Ctx, callee: &str| -> usize {
        ctx.store
            .spans()
            .iter()
            .filter(|s| {
                s.synthetic()
                    && s.service == callee
                    && s.attr("tracegap.gap.confidence").as_deref() == Some("likely")
            })
            .count()
    };
    let before: Vec<usize> = callees.iter().map(|c| spans_of(ctx, c)).collect();
    // Calls into a callee, as the agents reported them (each once).
    let hops_into = |ctx: &Ctx, callee: &str| -> anyhow::Result<u64> {
        Ok(ctx
            .report()?
            .edges
            .iter()
            .filter(|e| e.destination == callee)
            .map(|e| e.requests)
            .sum())
    };
    let taught: u64 = callees
        .iter()
        .map(|c| hops_into(ctx, c))
        .sum::<anyhow::Result<u64>>()?;
    ctx.settle(taught)?;
    let received: Vec<u64> = callees
        .iter()
        .map(|c| hops_into(ctx, c))
        .collect::<anyhow::Result<_>>()?;
    let mut sent = 0;
    for l in &loads {
        sent += ctx.run_load(l)?.sent;
    }
    ctx.settle(received.iter().sum::<u64>() + sent)?;
    let served: Vec<u64> = callees
        .iter()
        .zip(&received)
        .map(|(c, before)| Ok(hops_into(ctx, c)? - before))
        .collect::<anyhow::Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && callees
            .iter()
            .zip(&before)
            .zip(&served)
            .any(|((c, b), n)| spans_of(ctx, c) - b < *n as usize)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(callees
        .iter()
        .zip(&before)
        .zip(&served)
        .map(|((c, b), n)| {
            let got = spans_of(ctx, c) - b;
            let ok = *n > 0 && got == *n as usize;
            format!(
                "{} without a store, once learned from the wire: {got} likely-uninstrumented spans for {n} calls into {c}",
                if ok { "ok  " } else { "FAIL" }
            )
        })
        .collect())
}

/// Runs one scenario on a fresh two-node cluster with an agent per node.
///
/// Every service runs on both nodes behind its ClusterIP; the load clients
/// take turns on the nodes. So each call is translated (DNAT) on its
/// caller's node and lands on either node at random: same-node and
/// cross-node hops, every one of them through a Service.
pub fn run_one(
    sc: &Scenario,
    (store, reader, secured): (&mut Receiver, &QueryServer, Option<&Secured>),
    prometheus: Option<&crate::prometheus::Prometheus>,
    opts: &Options,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let began = Instant::now();
    let services: Vec<&str> = sc.services.iter().map(|s| s.spec.name.as_str()).collect();
    let mut per_node: [BTreeSet<&str>; 2] = [BTreeSet::new(), BTreeSet::new()];
    for n in &mut per_node {
        n.extend(services.iter().copied());
    }
    for (i, l) in sc.loads.iter().enumerate() {
        // A client pod stays on the node it was first put on.
        if !per_node.iter().any(|n| n.contains(l.pod)) {
            per_node[i % 2].insert(l.pod);
        }
    }
    let pods: [Vec<&str>; 2] = per_node.map(|n| n.into_iter().collect());
    let mut cluster = Cluster::new([&pods[0], &pods[1]])?;
    for name in &services {
        cluster.add_service_for_pods(name)?;
    }
    // The standalone agents' identities come from a names file, as with
    // `tracegap run --names-file`: pods with their nodes, the Services, the
    // nodes' own addresses; no service declared instrumented or not (the
    // agents learn it).
    let names = opts.out.join(format!("{}.names", sc.name));
    std::fs::write(&names, cluster.names_file("lab"))?;
    let identities = tracegap_agent::identity::parse_names_file(&std::fs::read_to_string(&names)?)
        .with_context(|| format!("reading {}", names.display()))?;
    // Kept for the restart step (see `across_restart`).
    let agent_config = opts.container.is_none().then(|| AgentConfig {
        reconcile: Some(ReconcileConfig {
            kind: StoreKind::Jaeger,
            settle: RECONCILE_SETTLE,
            qps: RECONCILE_QPS,
            access: secured.map(Secured::store_access).unwrap_or_default(),
            // Replaced per node by the store's address there.
            ..ReconcileConfig::new(String::new())
        }),
        ..Cluster::agent_config(
            ExportConfig {
                protocol: OtlpProtocol::Grpc,
                interval: Duration::from_millis(200),
                queue: 2048,
                attempts: 3,
                tls: secured.map(Secured::export_tls).unwrap_or_default(),
                ..ExportConfig::default()
            },
            ExportMode::Gaps,
            identities,
            Duration::from_secs(60),
        )
    });
    let ports = (store.grpc.port(), reader.addr.port());
    let agents = match (&opts.container, &agent_config) {
        (Some(template), _) => {
            // The ConfigMap's settings, but for what the lab must change.
            cluster.start_container_agents(
                template,
                store.grpc.port(),
                reader.addr.port(),
                &names,
                secured,
            )?
        }
        (None, config) => cluster.start_agents(
            config.as_ref().context("the standalone agents' config")?,
            ports.0,
            Some(ports.1),
        )?,
    };
    let mut ctx = Ctx {
        agents,
        children: Vec::new(),
        cluster,
        store,
        opts,
        tls: sc
            .services
            .iter()
            .filter(|s| s.spec.tls)
            .map(|s| s.spec.name.clone())
            .collect(),
        prometheus,
        secured,
    };
    ctx.agents_started()?;
    let first_span = ctx.store.spans().len();
    for s in &sc.services {
        ctx.start_service(s)?;
    }
    if sc.store_down {
        writeln!(out, "  the trace store refuses exports (503)")?;
        ctx.store.refuse();
    }
    let mut sent = 0;
    let mut summaries = Vec::new();
    for l in &sc.loads {
        check_interrupted()?;
        writeln!(
            out,
            "  {} x{} -> {}: {} requests",
            l.pod, l.parallel, l.target.0, l.spec.count
        )?;
        let s = ctx.run_load(l)?;
        sent += s.sent;
        summaries.push(s);
    }
    let mut resumed_at = None;
    if sc.store_down {
        ctx.settle(sent)?;
        writeln!(out, "  the trace store takes exports again")?;
        ctx.store.accept();
        resumed_at = Some(ctx.store.spans().len());
        let again = scenario::Load {
            spec: crate::load::LoadSpec {
                count: 5,
                interval: Duration::from_millis(100),
                ..sc.loads[0].spec.clone()
            },
            pod: sc.loads[0].pod,
            target: sc.loads[0].target,
            parallel: 1,
        };
        sent += ctx.run_load(&again)?.sent;
    }
    ctx.settle(sent)?;
    let report = ctx.report()?;
    // Before any restart below replaces the agents that read the loads.
    let losses = ctx.losses();
    let all = ctx.store.spans();
    let spans: Vec<Received> = all[resumed_at.unwrap_or(first_span).min(all.len())..].to_vec();
    let mut verdict = Vec::new();
    let mut passed = true;
    for e in sc.expect.iter().filter(|e| {
        !matches!(
            e,
            Expect::SpansLost(_) | Expect::AcrossRestart(..) | Expect::WithoutStore(_)
        )
    }) {
        let (ok, line) = check(e, &report, &ctx, &spans, sent)?;
        passed &= ok;
        verdict.push(format!("{} {line}", if ok { "ok  " } else { "FAIL" }));
    }
    // Each hop once, cluster-wide: every request a client sent is one hop,
    // reported by exactly one of the two agents. (A flood may lose events
    // to a full ring buffer; it must still never count one twice.)
    let mut sent_by: std::collections::BTreeMap<&str, u64> = Default::default();
    for (l, s) in sc.loads.iter().zip(&summaries) {
        *sent_by.entry(l.pod).or_default() += s.sent;
    }
    if sc.store_down {
        // The extra load after the store came back is from the first pod.
        let total: u64 = summaries.iter().map(|s| s.sent).sum();
        *sent_by.entry(sc.loads[0].pod).or_default() += sent - total;
    }
    let flood = sc.expect.iter().any(|e| matches!(e, Expect::KeptUp(_)));
    for (pod, n) in sent_by {
        let hops: u64 = report
            .edges
            .iter()
            .filter(|e| e.source == pod)
            .map(|e| e.requests)
            .sum();
        let ok = hops == n || (flood && hops <= n);
        passed &= ok;
        verdict.push(format!(
            "{} each hop once: {pod} sent {n} requests, {hops} hops reported across both nodes",
            if ok { "ok  " } else { "FAIL" }
        ));
    }
    // Each hop once on every edge whose true count is known: the calls
    // each service made, counted by the service itself (HTTP/1.1 and
    // gRPC alike). A destination some of whose calls failed is shown, not
    // judged: a call that failed may or may not have left as a request.
    for svc in sc
        .services
        .iter()
        .filter(|s| !s.spec.grpc && !s.calls.is_empty())
    {
        let name = svc.spec.name.as_str();
        for (dst, (made, failed)) in ctx.calls_made(name)? {
            let hops: u64 = report
                .edges
                .iter()
                .filter(|e| e.source == name && e.destination == dst)
                .map(|e| e.requests)
                .sum();
            let ok = if failed > 0 || flood {
                hops <= made
            } else {
                hops == made
            };
            passed &= ok;
            verdict.push(format!(
                "{} each hop once: {name} made {made} calls to {dst} ({failed} failed), {hops} hops reported across both nodes",
                if ok { "ok  " } else { "FAIL" }
            ));
        }
    }
    // Per edge across both nodes.
    let mut found: std::collections::BTreeMap<(&str, &str, &str), (u64, Option<&str>)> =
        Default::default();
    for e in &report.edges {
        for (k, n) in &e.kinds {
            if k != "context_ok" {
                let f = found
                    .entry((k.as_str(), e.source.as_str(), e.destination.as_str()))
                    .or_default();
                f.0 += n;
                f.1 = f.1.or(e.fixes.get(k).map(String::as_str));
            }
        }
    }
    let mut findings: Vec<String> = found
        .into_iter()
        .map(|((k, s, d), (n, fix))| format!("{k} x{n}: {}", explain(k, s, d, fix)))
        .collect();
    if findings.is_empty() {
        findings.push("complete: every hop carried valid context".to_owned());
    }
    // Example traces: one per gap kind seen, plus the first sampled trace.
    let mut examples: Vec<String> = report
        .edges
        .iter()
        .flat_map(|e| e.examples.iter())
        .filter(|(k, _)| *k != "context_ok" && *k != "unsampled")
        .map(|(_, t)| t.clone())
        .collect();
    if let Some(t) = summaries
        .iter()
        .flat_map(|s| s.traces.iter().zip(&s.traces_sampled))
        .find(|(_, sampled)| **sampled)
        .map(|(t, _)| t.clone())
    {
        examples.push(t);
    }
    examples.sort();
    examples.dedup();
    examples.truncate(3);
    let trees = examples
        .iter()
        .filter_map(|t| {
            let of: Vec<&Received> = spans.iter().filter(|s| &s.trace_id() == t).collect();
            (!of.is_empty()).then(|| tree::render(t, &of))
        })
        .collect();
    verdict.push(reconcile_cost(&ctx, began.elapsed(), &report)?);
    for e in &sc.expect {
        let Expect::AcrossRestart(src, dst) = e else {
            continue;
        };
        writeln!(out, "  the agents restart; {src}'s connections stay open")?;
        let (ok, line) = across_restart(&mut ctx, sc, agent_config.as_ref(), ports, src, dst)?;
        passed &= ok;
        verdict.push(format!("{} {line}", if ok { "ok  " } else { "FAIL" }));
    }
    let callees: Vec<&str> = sc
        .expect
        .iter()
        .filter_map(|e| match e {
            Expect::WithoutStore(callee) => Some(*callee),
            _ => None,
        })
        .collect();
    if !callees.is_empty() {
        writeln!(
            out,
            "  the agents restart with no trace store: the wire alone"
        )?;
        for line in without_store(&mut ctx, sc, agent_config.as_ref(), ports, &callees)? {
            passed &= !line.starts_with("FAIL");
            verdict.push(line);
        }
    }
    let outcome = Outcome {
        name: sc.name.to_owned(),
        report,
        verdict: findings.into_iter().chain(verdict).collect(),
        passed,
        trees,
        examples,
        spans,
    };
    ctx.scraped();
    for a in &mut ctx.agents {
        a.stop_now()?;
    }
    let mut outcome = outcome;
    if sc.store_down {
        // Asked after the agent stopped, so the question is not a hop.
        let lost: u64 = sc
            .services
            .iter()
            .filter_map(|s| ctx.export_failed(&s.spec.name).ok())
            .sum();
        outcome.verdict.push(format!(
            "info the services could not export {lost} of their own spans while the store was down"
        ));
    }
    for e in &sc.expect {
        let Expect::SpansLost(service) = e else {
            continue;
        };
        let failed = ctx.export_failed(service)?;
        let into = |f: fn(&tracegap_agent::report::CalleeSpans) -> u64| -> u64 {
            outcome
                .report
                .callee_spans
                .iter()
                .filter(|c| c.destination == *service)
                .map(f)
                .sum()
        };
        let (lost, arrived, unexported) = (
            into(|c| c.lost_in_pipeline),
            into(|c| c.arrived),
            into(|c| c.not_exported),
        );
        let mut answers: std::collections::BTreeMap<String, u64> = Default::default();
        for c in outcome
            .report
            .callee_spans
            .iter()
            .filter(|c| c.destination == *service)
        {
            for (a, n) in &c.export_answers {
                *answers.entry(a.clone()).or_default() += n;
            }
        }
        // Hops into the service whose callee span was never checked (the
        // store could not be asked within a settle delay, counted by the
        // agent as not_checked, or no check was made at all): each may be
        // one of the lost spans, so they are the margin, shown, never a
        // guess.
        let decided = arrived + lost + unexported + into(|c| c.new_trace) + into(|c| c.unknown);
        let hops: u64 = outcome
            .report
            .edges
            .iter()
            .filter(|e| e.destination == *service)
            .filter_map(|e| e.kinds.get("context_ok"))
            .sum();
        let unchecked = hops.saturating_sub(decided);
        let uninstrumented = into(|c| c.uninstrumented);
        let (ok, text) = if ctx.secured.is_some() {
            // Its exports go over TLS: the agents cannot read the 503s, so
            // a missing span is unknown ("lost or never sent"), never
            // lost_in_pipeline, not_exported or uninstrumented.
            let unread = answers
                .get(tracegap_agent::reconcile::learned::ENCRYPTED)
                .copied()
                .unwrap_or(0);
            (
                lost == 0
                    && unexported == 0
                    && uninstrumented == 0
                    && unread > 0
                    && unread <= failed
                    && unread + unchecked >= failed,
                format!(
                    "{service}'s spans unknown, its exports over TLS unread: {unread} (collector answered {answers:?}), as many as {service} itself failed to export: {failed}, less the hops not checked: {unchecked}; lost_in_pipeline {lost}, not exported {unexported}, uninstrumented {uninstrumented}, {arrived} arrived"
                ),
            )
        } else {
            (
                lost > 0 && lost <= failed && lost + unchecked >= failed,
                format!(
                    "{service}'s spans lost_in_pipeline: {lost} (collector answered {answers:?}), as many as {service} itself failed to export: {failed}, less the hops not checked: {unchecked} ({} counted not_checked by the agents); {arrived} arrived, {unexported} not exported",
                    into(|c| c.not_checked)
                ),
            )
        };
        outcome.passed &= ok;
        outcome
            .verdict
            .push(format!("{} {text}", if ok { "ok  " } else { "FAIL" }));
    }
    if !outcome.passed {
        // Whether the agents know they missed something (a full ring, a
        // head not parsed, a backend not found) or saw nothing amiss.
        outcome.verdict.push(match losses {
            Some(l) => format!("info the agents' own losses while the loads ran: {l}"),
            None => "info the agents counted no losses while the loads ran".to_owned(),
        });
    }
    drop(ctx);
    Ok(outcome)
}

/// Runs the chosen scenarios; writes the trace files at the end. With
/// [`Options::serve`], then serves the traces and the Jaeger UI until
/// Ctrl-C.
pub fn run(opts: &Options, out: &mut dyn Write) -> anyhow::Result<Vec<Outcome>> {
    let done = run_keeping(opts, out)?;
    if let Some(serve) = &opts.serve {
        serve_until_interrupted(&done, serve, out)?;
    }
    Ok(done.outcomes)
}

/// A finished lab run, with its trace store still up.
pub struct Finished {
    pub outcomes: Vec<Outcome>,
    pub store: Receiver,
    /// The Prometheus that scraped the run's agents, if it had one.
    pub prometheus: Option<crate::prometheus::Prometheus>,
    /// Every scenario's report, both nodes' edges.
    pub reports: std::sync::Arc<std::sync::Mutex<Report>>,
}

/// [`run`], keeping the store.
pub fn run_keeping(opts: &Options, out: &mut dyn Write) -> anyhow::Result<Finished> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let secured = opts.secure.then(Secured::new).transpose()?;
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let mut store = match &secured {
        Some(s) => Receiver::start_tls(any, s.receiver_tls()?)?,
        None => Receiver::start(any)?,
    };
    // The store's Jaeger query API, which the agents read traces back from.
    let reader = match &secured {
        Some(s) => QueryServer::start_secured(
            SocketAddr::from((any, 0)),
            store.shared(),
            s.query_tls()?,
            s.required(),
        )?,
        None => QueryServer::start(
            SocketAddr::from((any, 0)),
            store.shared(),
            std::sync::Arc::default(),
            None,
        )?,
    };
    if secured.is_some() {
        writeln!(
            out,
            "the trace store is behind TLS: OTLP on {} and {} asks for a client certificate of the run's CA, its query API on {} for a bearer token and tenant {:?}",
            store.grpc.port(),
            store.http.port(),
            reader.addr.port(),
            crate::secure::TENANT
        )?;
    }
    if let Some(endpoint) = &opts.forward {
        store.forward_to(endpoint)?;
        writeln!(out, "passing every span on to {endpoint} too")?;
    }
    // Without it the run goes on; the served page is then the lab's own
    // sum of the agents' reports.
    let prometheus = match &opts.prometheus {
        Some(bin) => match crate::prometheus::Prometheus::start(bin, &[]) {
            Ok(p) => {
                writeln!(out, "Prometheus on {} scrapes every agent", p.url())?;
                Some(p)
            }
            Err(e) => {
                writeln!(
                    out,
                    "no Prometheus ({e:#}): the Trace Quality page sums the agents' reports"
                )?;
                None
            }
        },
        None => None,
    };
    let mut outcomes = Vec::new();
    let mut file_spans = Vec::new();
    let total = opts.scenarios.len();
    for (i, name) in opts.scenarios.iter().enumerate() {
        check_interrupted()?;
        let sc = scenario::build(name, opts.short).with_context(|| {
            format!("no scenario {name:?}; known: {}", scenario::ALL.join(", "))
        })?;
        writeln!(out, "\n== {}/{total} {}: {} ==", i + 1, sc.name, sc.lesson)?;
        let started = Instant::now();
        let o = run_one(
            &sc,
            (&mut store, &reader, secured.as_ref()),
            prometheus.as_ref(),
            opts,
            out,
        )?;
        write!(out, "{}", table(&o.report))?;
        for t in &o.trees {
            write!(out, "{t}")?;
        }
        for v in &o.verdict {
            writeln!(out, "  {v}")?;
        }
        writeln!(
            out,
            "  verdict: {} ({:.1}s)",
            if o.passed {
                "as expected"
            } else {
                "UNEXPECTED"
            },
            started.elapsed().as_secs_f64()
        )?;
        file_spans.extend(keep_for_files(&o.spans, &o.examples));
        outcomes.push(o);
    }
    write_files(&opts.out, &file_spans, &store.downtimes())?;
    writeln!(
        out,
        "\n{} spans stored, {} of them (at most {TRACES_PER_SCENARIO} traces per scenario) in the trace files:\n  {}\n  {}\nOpen the Jaeger one in any Jaeger UI (for example jaegertracing/all-in-one on \
         http://localhost:16686): Search -> \"Upload\" -> choose traces.jaeger.json.",
        store.spans().len(),
        file_spans.len(),
        opts.out.join("spans.otlp.json").display(),
        opts.out.join("traces.jaeger.json").display()
    )?;
    let mut all = Report::default();
    for o in &outcomes {
        merge(&mut all, o.report.clone());
    }
    Ok(Finished {
        outcomes,
        store,
        prometheus,
        reports: std::sync::Arc::new(std::sync::Mutex::new(all)),
    })
}

/// The links a person opens: each scenario's gaps as a tag search, its
/// example traces, and each service's Trace Quality page.
pub fn links(base: &str, done: &Finished) -> Vec<String> {
    let mut lines = Vec::new();
    let mut services = BTreeSet::new();
    for o in &done.outcomes {
        lines.push(format!("  {}:", o.name));
        let mut kinds = BTreeSet::new();
        for e in &o.report.edges {
            services.insert(e.source.clone());
            services.insert(e.destination.clone());
            for k in e.kinds.keys().filter(|k| *k != "context_ok") {
                kinds.insert((e.destination.clone(), k.clone()));
            }
        }
        for (service, kind) in kinds {
            let tags = format!("{{\"tracegap.gap\":\"{kind}\"}}");
            lines.push(format!(
                "    {kind} at {service}: {base}/search?{}",
                query(&[("service", &service), ("tags", &tags), ("limit", "20")])
            ));
        }
        for id in o.examples.iter().take(2) {
            lines.push(format!("    example trace: {base}/trace/{id}"));
        }
    }
    lines.push("  Trace Quality, per service:".into());
    for s in services {
        lines.push(format!(
            "    {base}/quality-metrics?{}",
            query(&[("service", &s)])
        ));
    }
    lines
}

/// Serves the finished run's traces (Jaeger's query API) and the Jaeger UI
/// until Ctrl-C.
fn serve_until_interrupted(
    done: &Finished,
    serve: &Serve,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // The Trace Quality page as a cluster's: tracegap quality over the
    // Prometheus that scraped both nodes' agents.
    let quality = match &done.prometheus {
        Some(p) => Some(crate::prometheus::Quality::start(&p.url())?),
        None => None,
    };
    let server = crate::query::QueryServer::start_with_quality(
        serve.addr,
        done.store.shared(),
        done.reports.clone(),
        serve.ui.clone(),
        quality.as_ref().map(|q| q.addr),
    )?;
    if let (Some(p), Some(q)) = (&done.prometheus, &quality) {
        writeln!(
            out,
            "\nPrometheus on {} (every agent of the run, scraped each second); tracegap quality on http://{} answers the Trace Quality page, both nodes summed",
            p.url(),
            q.addr
        )?;
    }
    let base = format!("http://{}", server.addr);
    match &serve.ui {
        Some(_) => writeln!(out, "\nThe Jaeger UI on {base}, with the lab's traces:")?,
        None => writeln!(
            out,
            "\nJaeger's query API on {base}/api/ (no UI: give --jaeger-ui DIR, a Jaeger UI build):"
        )?,
    }
    for l in links(&base, done) {
        writeln!(out, "{l}")?;
    }
    writeln!(out, "Ctrl-C stops.")?;
    out.flush()?;
    while !INTERRUPTED.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Traces per scenario written to the files: enough to browse, small
/// enough for the Jaeger UI to open (the flood alone makes 20 000 spans).
pub const TRACES_PER_SCENARIO: usize = 50;

fn keep_for_files(spans: &[Received], examples: &[String]) -> Vec<Received> {
    let mut kept: std::collections::HashSet<String> = examples.iter().cloned().collect();
    let limit = TRACES_PER_SCENARIO + kept.len();
    spans
        .iter()
        .filter(|s| {
            let t = s.trace_id();
            kept.contains(&t) || (kept.len() < limit && kept.insert(t))
        })
        .cloned()
        .collect()
}

fn write_files(dir: &Path, spans: &[Received], down: &[Downtime]) -> anyhow::Result<()> {
    std::fs::write(dir.join("spans.otlp.json"), files::otlp_json(spans)?)?;
    std::fs::write(
        dir.join("traces.jaeger.json"),
        files::jaeger_json(spans, down)?,
    )?;
    Ok(())
}

/// A value as the `service` and `load` commands take it.
fn value_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}
