//! `tracegap run`: the node agent. The data path, end to end:
//!
//! ring buffer → [`ServiceNat`] (calls through a Service rebound to the pod
//! that served them) → [`Assembler`] (whole heads, no duplicates) → [`Pairer`]
//! (request + response), or for HTTP/2 [`Connections`] (frames, HPACK,
//! streams) → [`Hop`] → [`Engine`] (classification) →
//! metrics, report, and for gap hops a synthetic span offered to the
//! bounded export queue.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tracegap_common::{Direction, EventKind};

use crate::{
    clock::{WallClock, monotonic_ns},
    cluster::{self, ApiStatus, ClusterConfig},
    ebpf::{KernelLog, LoadOptions, Observer},
    events::{self, Endpoint, EventStream, RawEvent},
    export::{self, ExportConfig, SpanQueue},
    gap::{
        Engine, GapKind, Hop,
        classify::{RETENTION_NS, Verdict, formats_label},
        formats::FormatsRead,
        hop::{Reply, Request},
        silence::{Silence, SilenceConfig, Status as Silent},
        span::{self, ExportMode, Identity},
        threads::Turn,
    },
    http::{
        assemble::{Answer, Assembler, HEAD_TIMEOUT, Message, Pairer},
        h2::follow::{self, Connections, H2Stats},
        stream::BoundaryStats,
    },
    identity::{self, Directory},
    interfaces::{self, Interfaces, Selection},
    metrics::{BaggageLabels, GapLabels, Metrics, RequestLabels},
    nat::{self, Conntrack, LookupStats, ServiceNat},
    privileges,
    reconcile::{self, Ctx, HopFacts, ReconcileConfig, learned::Export},
    server::{self, Shared},
};

/// Paths that telemetry is exported to (OTLP/HTTP, OTLP/gRPC, Jaeger,
/// Zipkin). Those requests are the tracing system's own traffic, not
/// application hops; the agent's own exports would otherwise come back to
/// it as gaps, forever.
const TELEMETRY_PATHS: [&str; 9] = [
    "/v1/traces",
    "/v1/metrics",
    "/v1/logs",
    "/api/traces",
    "/api/v2/spans",
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
    "/jaeger.api_v2.CollectorService/PostSpans",
];

fn is_telemetry(req: &Request) -> bool {
    req.method() == "POST" && TELEMETRY_PATHS.contains(&req.path())
}

/// Local pod addresses remembered at most (cleared past it, then relearnt).
const MAX_LOCAL_IPS: usize = 64 * 1024;

/// Everything `tracegap run` is configured with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub interfaces: Selection,
    /// Where /metrics, /healthz and /readyz are served.
    pub listen: SocketAddr,
    /// Where /report is served: it names services and URL paths, so it
    /// has its own address, loopback by default. None: not served.
    pub report_listen: Option<SocketAddr>,
    /// The origin of a Jaeger UI allowed to call `/api/quality-metrics`
    /// on the report address (CORS); None: same origin only.
    pub cors_origin: Option<String>,
    pub export: ExportConfig,
    pub export_mode: ExportMode,
    pub export_unsampled: bool,
    /// Identities by address (`--service`, `--names-file`).
    pub services: Vec<(IpAddr, Identity)>,
    /// A request without a response after this long is reported unanswered.
    pub response_timeout: Duration,
    /// Watch the Kubernetes API for identities (None: standalone).
    pub kubernetes: Option<ClusterConfig>,
    /// This node's name: with it, each hop is reported by one node of
    /// several ([`cluster::reports_here`]) and the node's own addresses are
    /// named `node:NAME`. None: the only agent, which reports everything.
    pub node_name: Option<String>,
    /// Read traces back from the trace store and correct the spans by
    /// them (None: the wire alone).
    pub reconcile: Option<ReconcileConfig>,
    /// Record which thread wrote each call and read each request (the
    /// socket programs; see [`crate::gap::threads`]); off: timing alone.
    pub thread_evidence: bool,
    /// Read HTTPS through OpenSSL's calls (uprobes on every libssl the
    /// node's processes map; see [`crate::libssl`]); off: TLS connections
    /// are counted as unread.
    pub tls_plaintext: bool,
    /// What the kernel programs log into this log ([`crate::ebpf::kernel_log`]).
    pub kernel_log: KernelLog,
    /// Place a call under the request whose answer followed its own,
    /// clearly first (`timing`, see [`crate::gap::timing`]); off: such calls
    /// stay unplaced, linked to their candidates.
    pub place_by_timing: bool,
    /// Without a trace store: learn from the wire which services are
    /// likely not instrumented (see [`crate::gap::silence`]); None: off.
    pub silence: Option<SilenceConfig>,
    /// What the agent's HTTP servers grant one client.
    pub server_limits: server::ServerLimits,
}

/// The running agent's handles, for callers that embed it (tests).
pub struct Started {
    pub listen: SocketAddr,
    /// Where /report is served, if it is.
    pub report: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    pub directory: Arc<Directory>,
}

/// Runs the agent until `stop` completes. `started` receives the bound
/// address and shared state once the agent is ready.
pub async fn run(
    config: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
    started: Option<tokio::sync::oneshot::Sender<Started>>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared::new(metrics.clone()));
    if let Ok(mut r) = shared.reporter.lock() {
        r.node = config.node_name.clone();
    }
    let directory = Arc::new(Directory::with_identities(config.services.clone()));
    if let Some(node) = &config.node_name {
        match identity::host_addresses() {
            Ok(addrs) => directory.add_node_addresses(node, addrs),
            Err(e) => tracing::warn!(error = %e, "listing this node's addresses"),
        }
    }
    let limits = &config.server_limits;
    let (listen, server) = server::serve(
        config.listen,
        server::probes(shared.clone(), limits),
        server::PROBES,
        *limits,
        shared.metrics.clone(),
    )
    .await
    .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(%listen, "serving /metrics /healthz /readyz");
    let report = match config.report_listen {
        Some(addr) => {
            let (bound, task) = server::serve(
                addr,
                server::report(shared.clone(), config.cors_origin.clone(), limits),
                server::REPORT,
                *limits,
                shared.metrics.clone(),
            )
            .await
            .with_context(|| format!("listening on {addr} for /report"))?;
            tracing::info!(listen = %bound, "serving /report and /api/quality-metrics");
            Some((bound, task))
        }
        None => None,
    };
    let mut observer = Observer::load_with(LoadOptions {
        thread_evidence: config.thread_evidence,
        kernel_log: config.kernel_log,
        tls_plaintext: config.tls_plaintext,
        ..LoadOptions::default()
    })
    .context("loading the eBPF programs")
    .map_err(privileges::explain)?;
    // Read while the programs run; ends with this function.
    let kernel_log = observer.take_kernel_log().map(|r| {
        tokio::spawn(async move {
            if let Err(e) = r.drain().await {
                tracing::warn!(error = %e, "the kernel programs' log is no longer read");
            }
        })
    });
    metrics
        .thread_evidence
        .get_or_create(&crate::metrics::SourceLabels {
            source: observer.thread_evidence().as_str().to_owned(),
        })
        .set(1);
    let watcher = config.kubernetes.clone().map(|cluster| {
        let status = Arc::new(ApiStatus::default());
        shared.set_api(status.clone());
        tokio::spawn(watch_cluster(cluster, directory.clone(), status))
    });
    let result = async {
        let interfaces = Interfaces::start(&mut observer, config.interfaces.clone())
            .await
            .map_err(|e| privileges::explain(e.into()))?;
        let (queue, exporter) =
            export::start(config.export.clone(), metrics.clone(), shared.export.clone())
                .context("starting export")?;
        // The store's TLS files and credentials are checked now: a wrong
        // path stops the agent, it is not a store "away" for ever.
        if let Some(rc) = &config.reconcile {
            rc.access
                .client(rc.timeout)
                .context("the trace store's TLS files and credentials")?;
        }
        let reconciler = config.reconcile.clone().map(|rc| {
            let (handle, status, task) =
                reconcile::start(rc, queue.clone(), shared.metrics.clone(), shared.clone());
            shared.set_store(status);
            (handle, task)
        });
        let (reconcile, reconcile_task) = match reconciler {
            Some((h, t)) => (Some(h), Some(t)),
            None => (None, None),
        };
        let stream = EventStream::new(observer.take_events()?)?;
        let (tx, batches) = tokio::sync::mpsc::channel(events::BATCHES_QUEUED);
        let drain = tokio::spawn(events::drain(
            stream,
            tx,
            metrics.events_undecodable.clone(),
        ));
        // OpenSSL's libraries probed before the agent says it is ready, so
        // the first HTTPS call after is read; then kept up by a scan.
        let mut openssl = None;
        if observer.reads_openssl() {
            let lacking = privileges::Privileges::current()
                .map(|p| p.missing_optional())
                .unwrap_or_default();
            for c in lacking {
                tracing::warn!(
                    "missing capabilities: {} ({}): HTTPS through the libraries only other processes map is counted as unread, not read",
                    c.name,
                    c.needed_for
                );
            }
            let (scanner, found) = tokio::task::spawn_blocking(|| {
                let mut scanner = crate::libssl::Scanner::default();
                let found = scanner.scan(std::path::Path::new("/proc"));
                (scanner, found)
            })
            .await
            .unwrap_or_default();
            let mut tracker = crate::libssl::Tracker::default();
            probe_libraries(&mut observer, &mut tracker, found, &metrics);
            let (tx, found) = tokio::sync::mpsc::channel(1);
            openssl = Some(OpenSsl {
                tracker,
                found,
                scan: tokio::spawn(crate::libssl::watch(scanner, tx)),
            });
        }
        shared.ready.store(true, Ordering::Relaxed);
        if let Some(tx) = started {
            let _ = tx.send(Started {
                listen,
                report: report.as_ref().map(|(a, _)| *a),
                shared: shared.clone(),
                directory: directory.clone(),
            });
        }
        let mut pipeline =
            Pipeline::new(&config, shared.clone(), directory.clone(), queue, reconcile);
        pipeline.relays = observer.take_relays()?;
        pipeline.collectors = export::collector_addresses(&config.export)
            .await
            .into_iter()
            .collect();
        pipeline.tls_waiting = openssl.is_some().then(Default::default);
        if openssl.is_some() {
            let cgroups = crate::process::Cgroups::new(std::path::Path::new("/proc"));
            if !cgroups.host_pids() {
                tracing::warn!(
                    "not in the node's PID namespace (hostPID): HTTPS calls are named by their addresses only, host-network pods as their node"
                );
            }
            pipeline.cgroups = Some(cgroups);
        }
        let looped = event_loop(
            &mut observer,
            interfaces,
            batches,
            &mut openssl,
            &mut pipeline,
            stop,
        )
        .await;
        if let Some(o) = &openssl {
            o.scan.abort();
        }
        let looped = match looped {
            // The drain ended first: its error is the one to report.
            Err(Stopped::DrainEnded) => match drain.await {
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("reading the ring buffer")),
                Ok(Ok(())) => Err(anyhow::anyhow!("the ring buffer drain ended")),
                Err(e) => Err(anyhow::Error::new(e).context("the ring buffer drain failed")),
            },
            Ok(()) => {
                drain.abort();
                Ok(())
            }
        };
        shared.ready.store(false, Ordering::Relaxed);
        // Close the queue; give the exporter a bounded time for a last flush
        // (held spans go to it unreconciled first).
        drop(pipeline);
        if let Some(t) = reconcile_task
            && tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .is_err()
        {
            tracing::warn!("reconciliation did not hand its held spans over within 2s");
        }
        if tokio::time::timeout(Duration::from_secs(5), exporter)
            .await
            .is_err()
        {
            tracing::warn!("export did not finish within 5s; remaining spans dropped");
        }
        looped
    }
    .await;
    // Detach before reporting any error, so nothing stays attached.
    let detached = observer.detach_all();
    if let Some(t) = kernel_log {
        t.abort();
    }
    server.abort();
    if let Some((_, task)) = report {
        task.abort();
    }
    if let Some(w) = watcher {
        w.abort();
    }
    result?;
    detached?;
    Ok(())
}

/// Connects to the API (in-cluster or kubeconfig) and follows it. Until a
/// client can be made, the agent runs with address-only names and says so.
async fn watch_cluster(cfg: ClusterConfig, dir: Arc<Directory>, status: Arc<ApiStatus>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match kube::Client::try_default().await {
            Ok(client) => {
                tracing::info!(node = ?cfg.node_name, namespaces = ?cfg.namespaces, "watching the kubernetes API");
                return crate::cluster::watch::run(client, cfg, dir, status).await;
            }
            Err(e) => {
                status.failed_to_connect(&e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// OpenSSL's libraries: those probed, and the scan that finds them.
struct OpenSsl {
    tracker: crate::libssl::Tracker,
    found: tokio::sync::mpsc::Receiver<crate::libssl::Found>,
    scan: tokio::task::JoinHandle<()>,
}

/// Probes the libraries a scan found new, leaves the ones gone.
fn probe_libraries(
    observer: &mut Observer,
    tracker: &mut crate::libssl::Tracker,
    found: crate::libssl::Found,
    metrics: &Metrics,
) {
    let changes = tracker.update(&found.node, &found.mapped);
    for l in changes.probe {
        match observer.probe_openssl(l.file, &l.path) {
            Ok(n) => {
                tracing::info!(library = %l.path.display(), functions = n, "reading OpenSSL's plaintext")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "an OpenSSL library left unprobed: its connections are counted as unread"
            ),
        }
    }
    for f in changes.leave {
        observer.unprobe_openssl(f);
    }
    metrics
        .openssl_libraries
        .set(observer.openssl_files().len() as i64);
}

/// Why [`event_loop`] returned other than by being stopped.
enum Stopped {
    /// The drain task ended: the ring buffer can no longer be read.
    DrainEnded,
}

/// The pipeline's loop: batches from the drain task (see [`events::drain`])
/// through the data path, interface changes, and the periodic work.
async fn event_loop(
    observer: &mut Observer,
    mut interfaces: Interfaces,
    mut batches: tokio::sync::mpsc::Receiver<Vec<RawEvent>>,
    openssl: &mut Option<OpenSsl>,
    p: &mut Pipeline,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Stopped> {
    tokio::pin!(stop);
    let mut ticked = tokio::time::Instant::now();
    let mut last_batch = ticked;
    let mut messages = Vec::new();
    let mut h2_out = Vec::new();
    loop {
        // While events come, or work is due soon, the periodic work (and
        // the counters it brings up to date) runs often; after a second
        // without events it waits longer: an idle node's agent sleeps
        // (issue 40).
        let period = if p.work_due_soon() || last_batch.elapsed() < IDLE_TICK {
            TICK
        } else {
            IDLE_TICK
        };
        tokio::select! {
            () = &mut stop => {
                p.release_deferred(true);
                return Ok(());
            }
            batch = batches.recv() => {
                let Some(batch) = batch else {
                    p.release_deferred(true);
                    return Err(Stopped::DrainEnded);
                };
                last_batch = tokio::time::Instant::now();
                // Each event's messages and streams go through at once, in
                // the ring's order: a request must be known as started
                // before a call its service made meanwhile is classified
                // (an HTTP/2 request and an HTTP/1.1 call in one batch).
                for e in batch {
                    p.event(e, &mut messages, &mut h2_out);
                }
            }
            found = async {
                match openssl.as_mut() {
                    Some(o) => o.found.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match (found, openssl.as_mut()) {
                    (Some(found), Some(o)) => {
                        probe_libraries(observer, &mut o.tracker, found, &p.shared.metrics);
                    }
                    // The scan ended (its task panicked): what is probed
                    // stays, and the branch is not polled again.
                    _ => {
                        tracing::warn!("OpenSSL's libraries are no longer scanned");
                        *openssl = None;
                    }
                }
            }
            change = interfaces.changed() => {
                interfaces::apply(observer, change);
                p.shared.metrics.interfaces.set(observer.interfaces().len() as i64);
            }
            () = tokio::time::sleep_until(ticked + period) => {
                ticked = tokio::time::Instant::now();
                p.tick(&mut messages, &mut h2_out);
                match observer.counters() {
                    Ok(c) => p.shared.metrics.kernel_counters(c),
                    Err(e) => tracing::warn!(error = %e, "reading kernel counters"),
                }
                if let Ok(stats) = observer.program_stats() {
                    p.shared.metrics.program_stats(&stats);
                }
                p.shared.metrics.interfaces.set(observer.interfaces().len() as i64);
                p.shared.beat();
            }
        }
        for m in messages.drain(..) {
            p.message(m);
        }
        for o in h2_out.drain(..) {
            p.h2_stream(o);
        }
        p.release_deferred(false);
    }
}

fn ctx(c: &crate::http::context::SpanContext) -> Ctx {
    Ctx {
        trace_id: c.trace_id.to_string(),
        parent_span_id: c.parent_span_id.to_string(),
    }
}

fn facts(
    hop: &Hop,
    caller: &Identity,
    callee: &Identity,
    received: Option<Ctx>,
    serving: Option<Ctx>,
) -> HopFacts {
    HopFacts {
        caller: caller.service.clone(),
        callee: callee.service.clone(),
        caller_addr: hop.caller(),
        callee_ip: hop.callee().ip,
        start: hop.start,
        end: hop.end(),
        received,
        serving,
        callee_declared: callee.instrumented,
        unplaced: false,
        unread_format: false,
    }
}

/// The span of a call into a pod learned (not declared) to record no spans:
/// the hop's verdict as `uninstrumented`, under the caller's span.
fn learned_uninstrumented(
    hop: &Hop,
    verdict: &Verdict,
    caller: &Identity,
    callee: &Identity,
    detail: String,
) -> span::SyntheticSpan {
    let v = Verdict {
        kind: GapKind::Uninstrumented,
        detail: detail.into(),
        ..verdict.clone()
    };
    span::build(hop, &v, caller, callee, true)
}

/// A hop's (or a connection's) two ends, as [`Pipeline::ends`] finds them.
struct Ends {
    caller: Arc<Identity>,
    callee: Arc<Identity>,
    caller_local: bool,
    callee_local: bool,
}

/// The user-space data path's state.
pub(crate) struct Pipeline {
    clock: WallClock,
    nat: ServiceNat,
    /// Lookups already counted in the metrics.
    nat_counted: LookupStats,
    /// Boundary decisions already counted in the metrics.
    boundaries_counted: BoundaryStats,
    assembler: Assembler,
    pairer: Pairer<Arc<Request>>,
    /// HTTP/2 connections: their streams are paired by id, not here.
    h2: Connections,
    /// HTTP/2 counts already counted in the metrics.
    h2_counted: H2Stats,
    /// Service names as metric label values.
    labels: crate::metrics::Interned,
    /// The edges' request counters, found without hashing their labels
    /// under the families' locks.
    request_counters: crate::metrics::RequestCounters,
    /// HTTP/2 streams started and not yet done: their request records,
    /// which their ends share (built once per stream).
    h2_open: crate::FastMap<(crate::events::Flow, u32), Arc<Request>>,
    engine: Engine,
    /// The context formats each service was seen to read, or not.
    formats: FormatsRead,
    /// Addresses seen sending from a watched pod veth: pods on this node.
    local: HashSet<IpAddr>,
    /// The collector's addresses: a pod's TLS connection to one (or to an
    /// OTLP port) is an export whose answer cannot be read.
    collectors: HashSet<IpAddr>,
    shared: Arc<Shared>,
    directory: Arc<Directory>,
    queue: SpanQueue,
    /// Held spans and callee checks, read back from the trace store.
    reconcile: Option<reconcile::Handle>,
    /// With no store: services likely not instrumented, from the wire.
    silence: Option<Silence>,
    /// When the report last got the silence's statuses.
    silence_reported_ns: u64,
    export_mode: ExportMode,
    export_unsampled: bool,
    response_timeout: Duration,
    last_resync_ns: u64,
    node: Option<String>,
    /// Hops waiting for evidence of their cause (a write turn, answers).
    deferred: std::collections::VecDeque<Deferred>,
    /// The held hops by their caller's address: how many, and the latest
    /// start (kept while any is held), for [`Pipeline::waits_for_calls`]
    /// without a walk of the held ones.
    held_calls: HashMap<IpAddr, (usize, u64)>,
    /// Pods whose threads the kernel records (None: no thread programs).
    relays: Option<crate::ebpf::threads::Relays>,
    /// TLS connections whose plaintext OpenSSL's probes may still deliver
    /// (None: no probes, a hello is counted unread at once).
    tls_waiting: Option<crate::tls::Waiting<HelloSeen>>,
    /// The processes at the ends of connections read through OpenSSL.
    owners: crate::process::Owners,
    /// Their cgroups, read (None: no OpenSSL probes).
    cgroups: Option<crate::process::Cgroups>,
}

/// A TLS connection's hello, as it will be counted: its edge, its server
/// name and the protocols it offered.
struct HelloSeen {
    /// Client to server.
    flow: crate::events::Flow,
    caller: String,
    callee: String,
    server_name: String,
    alpn: String,
}

/// A hop held for evidence of its cause.
struct Deferred {
    until_ns: u64,
    req: Arc<Request>,
    rsp: Option<Reply>,
    gave_up_ns: u64,
}

/// How long a call waits for evidence of its cause at most: its write
/// turn (sent when the writer's send returns, usually microseconds after
/// the request was seen) or the answers of the requests its caller was
/// serving (timing; usually within a millisecond of the call's own).
const HOLD_NS: u64 = 250_000_000;
/// Hops held at most; past it they are classified at once.
const MAX_DEFERRED: usize = 4096;
/// HTTP/2 streams whose request record is kept for their end at most
/// (past it an end builds its own).
const MAX_H2_OPEN: usize = 64 * 1024;
/// How long a connection's processes are remembered with no plaintext
/// read on it (a pooled connection idle longer is named by its addresses
/// until its `SSL*` is named anew).
const OWNER_IDLE_NS: u64 = 15 * 60 * 1_000_000_000;

/// The periodic work's period while events come or work is due soon
/// (heads to flush, hops held for evidence, TLS connections waiting for
/// their plaintext).
const TICK: Duration = Duration::from_millis(250);
/// Its period after this long without events: requests still waiting for
/// an answer are given up on at most this late after the response timeout.
const IDLE_TICK: Duration = Duration::from_secs(1);

impl Pipeline {
    /// Whether anything is due within a fraction of a second.
    fn work_due_soon(&self) -> bool {
        self.assembler.partials() > 0
            || !self.deferred.is_empty()
            || self.tls_waiting.as_ref().is_some_and(|w| !w.is_empty())
    }

    pub(crate) fn new(
        config: &AgentConfig,
        shared: Arc<Shared>,
        directory: Arc<Directory>,
        queue: SpanQueue,
        reconcile: Option<reconcile::Handle>,
    ) -> Self {
        let conntrack = Conntrack::open()
            .inspect_err(|e| {
                tracing::warn!(
                    error = %e,
                    "conntrack cannot be asked: calls through Service addresses stay named after the Service"
                )
            })
            .ok();
        Self {
            clock: WallClock::new(),
            nat: ServiceNat::new(conntrack),
            nat_counted: LookupStats::default(),
            boundaries_counted: BoundaryStats::default(),
            assembler: Assembler::default(),
            pairer: Pairer::default(),
            h2: Connections::default(),
            h2_counted: H2Stats::default(),
            labels: Default::default(),
            request_counters: Default::default(),
            h2_open: Default::default(),
            engine: Engine::new(config.place_by_timing),
            formats: FormatsRead::default(),
            local: HashSet::new(),
            collectors: HashSet::new(),
            shared,
            directory,
            queue,
            silence: config
                .silence
                .filter(|_| reconcile.is_none())
                .map(Silence::new),
            silence_reported_ns: 0,
            reconcile,
            export_mode: config.export_mode,
            export_unsampled: config.export_unsampled,
            response_timeout: config.response_timeout,
            last_resync_ns: monotonic_ns(),
            node: config.node_name.clone(),
            deferred: std::collections::VecDeque::new(),
            held_calls: HashMap::new(),
            relays: None,
            tls_waiting: None,
            owners: Default::default(),
            cgroups: None,
        }
    }

    /// One event from the ring, taken as far as it goes: its messages and
    /// streams, their hops, classified, counted and exported.
    pub(crate) fn event(
        &mut self,
        mut e: RawEvent,
        messages: &mut Vec<Message>,
        h2_out: &mut Vec<follow::Out>,
    ) {
        if e.kind == EventKind::Thread {
            // Keyed by the client's end, which no NAT rewrites.
            if let Some(t) = Turn::from_event(&e) {
                self.engine.thread_turn(t);
            }
            return;
        }
        let directory = &self.directory;
        self.nat.translate(&mut e, |ip| directory.is_service(ip));
        if e.kind == EventKind::Owner {
            self.owner(&e);
            return;
        }
        // Plaintext from OpenSSL (no interface): a process's socket, not a
        // pod veth's traffic.
        if e.ifindex == 0 {
            if !self.ours(&e.flow) {
                self.shared.metrics.ignored("tls_elsewhere");
                return;
            }
            self.owners.touch(&e);
            self.tls_plaintext(&e.flow);
        } else if e.direction == Direction::Ingress {
            self.local_ip(e.flow.src.ip);
        } else if e.kind == EventKind::TlsHello {
            // Into a pod veth: the pod it goes to is this node's, though
            // it may never send cleartext.
            self.local_ip(e.flow.dst.ip);
        }
        if e.kind == EventKind::TlsHello {
            self.tls_hello(&e);
        } else if e.kind == EventKind::Http2 {
            self.h2.push(&e, e.payload.is_empty(), h2_out);
            for o in h2_out.drain(..) {
                self.h2_stream(o);
            }
        } else {
            self.assembler.push(e, messages);
            for m in messages.drain(..) {
                self.message(m);
            }
        }
    }

    pub(crate) fn tick(&mut self, messages: &mut Vec<Message>, h2_out: &mut Vec<follow::Out>) {
        let now = monotonic_ns();
        self.assembler
            .flush_before(now.saturating_sub(HEAD_TIMEOUT.as_nanos() as u64), messages);
        let cutoff = now.saturating_sub(self.response_timeout.as_nanos() as u64);
        for req in self.pairer.expire_before(cutoff) {
            let gave_up = req.ts_ns + self.response_timeout.as_nanos() as u64;
            self.hop(&req, None, gave_up);
        }
        self.h2.expire_before(cutoff, h2_out);
        // Streams that ended unseen (their connection lost or forgotten):
        // their records go once they are past any answer.
        let stale = cutoff.saturating_sub(self.response_timeout.as_nanos() as u64);
        self.h2_open.retain(|_, r| r.ts_ns >= stale);
        self.h2.forget_before(now.saturating_sub(follow::IDLE_NS));
        self.shared.metrics.h2(
            self.h2.stats,
            (self.h2.len(), self.h2.unsynchronised()),
            &mut self.h2_counted,
        );
        self.engine.forget_before(now.saturating_sub(RETENTION_NS));
        self.owners.forget_before(now.saturating_sub(OWNER_IDLE_NS));
        let unread = self
            .tls_waiting
            .as_mut()
            .map(|w| w.expired(now))
            .unwrap_or_default();
        for seen in unread {
            self.tls_unread(seen);
        }
        self.nat
            .forget_before(now.saturating_sub(2 * nat::REVALIDATE_NS));
        self.shared
            .metrics
            .service_lookups(self.nat.stats, &mut self.nat_counted);
        self.shared
            .metrics
            .boundaries(self.assembler.boundaries(), &mut self.boundaries_counted);
        if let Some(s) = &self.silence
            && now.saturating_sub(self.silence_reported_ns) > 1_000_000_000
            && let Ok(mut r) = self.shared.reporter.lock()
        {
            r.services = s.statuses(now).into_iter().map(Into::into).collect();
            self.silence_reported_ns = now;
        }
        // NTP may step the wall clock: re-anchor now and then.
        if now.saturating_sub(self.last_resync_ns) > 60_000_000_000 {
            self.clock.resync();
            self.last_resync_ns = now;
        }
    }

    /// A request the engine relates later calls to; a pod seen both
    /// serving and calling becomes a relay, whose threads the kernel
    /// records from then on.
    fn started(&mut self, req: &Arc<Request>) {
        self.engine.request_started(req);
        if let Some(r) = &mut self.relays {
            for ip in [req.flow.src.ip, req.flow.dst.ip] {
                if self.engine.is_relay(ip) {
                    r.mark(ip, req.ts_ns);
                }
            }
        }
    }

    /// A TLS connection's ClientHello: counted on its edge as one whose
    /// requests tracegap cannot read, with the server name it asked for.
    fn tls_hello(&mut self, e: &RawEvent) {
        let hello = match crate::tls::ClientHello::parse(&e.payload) {
            Ok(h) => h,
            Err(err) => {
                tracing::debug!(flow = %e.flow, error = %err, "TLS ClientHello");
                crate::tls::ClientHello::default()
            }
        };
        self.encrypted_export(e);
        let ends = self.ends(e.flow.src, e.flow.dst);
        // Seen on both nodes of a cross-node connection: counted once.
        if !self.reports_here(&ends) {
            return;
        }
        let seen = HelloSeen {
            flow: e.flow,
            caller: ends.caller.service.clone(),
            callee: ends.callee.service.clone(),
            server_name: hello.server_name.unwrap_or_default(),
            alpn: hello.alpn.join(","),
        };
        // With OpenSSL's probes on, its plaintext may follow: unread is
        // decided when none has come in a while.
        let seen = match &mut self.tls_waiting {
            Some(w) => w.hello(e.flow, e.ts_ns, seen),
            None => Some(seen),
        };
        if let Some(seen) = seen {
            self.tls_unread(seen);
        }
    }

    /// A pod of this node opening a TLS connection to the collector (or to
    /// an OTLP port): it exports spans, and whether the collector takes
    /// them cannot be read. A missing span of it is then `unknown`, never
    /// taken for "not exported", nor the pod for uninstrumented.
    fn encrypted_export(&mut self, e: &RawEvent) {
        let (client, server) = (e.flow.src, e.flow.dst);
        if !(self.collectors.contains(&server.ip) || export::OTLP_PORTS.contains(&server.port)) {
            return;
        }
        let Some(exporter) = self.exporter(client.ip, e.ts_ns) else {
            return;
        };
        if let Some(r) = &self.reconcile {
            r.encrypted_export(&exporter.service, client.ip);
        }
    }

    /// The pod of this node at `ip` that exported spans at `ts_ns`, told
    /// to the silence learner; None for an address that is not one.
    fn exporter(&mut self, ip: IpAddr, ts_ns: u64) -> Option<Arc<Identity>> {
        if !self.local.contains(&ip) {
            return None;
        }
        let exporter = self.directory.lookup(ip);
        if exporter.is_node {
            return None;
        }
        if let Some(s) = &mut self.silence {
            s.exported(&exporter.service, ts_ns);
        }
        Some(exporter)
    }

    /// Plaintext from OpenSSL on `flow`: its connection, if its hello is
    /// waiting, is one read.
    fn tls_plaintext(&mut self, flow: &crate::events::Flow) {
        if let Some(seen) = self.tls_waiting.as_mut().and_then(|w| w.plaintext(flow)) {
            // Named again: its processes are announced by now (the hello
            // leaves before the first call names the connection).
            let ends = self.ends(seen.flow.src, seen.flow.dst);
            self.shared.metrics.tls_read(crate::metrics::TlsLabels {
                source_service: ends.caller.service.clone(),
                destination_service: ends.callee.service.clone(),
                server_name: seen.server_name,
            });
        }
    }

    /// A process at one end of a connection OpenSSL's probes read: its
    /// cgroup's pod, if any, is that end's identity from now on.
    fn owner(&mut self, e: &RawEvent) {
        let Some(cgroups) = self.cgroups.as_mut() else {
            return;
        };
        let Some(owner) = self.owners.announced(e, cgroups).cloned() else {
            return;
        };
        if !self.ours(&e.flow) {
            return;
        }
        use crate::process::{Origin, Owner, Unread};
        let identity = match owner {
            Owner::Read(Origin::Pod { uid, .. })
                if self.directory.pod_with(&uid, |_| ()).is_some() =>
            {
                "pod"
            }
            Owner::Read(Origin::Pod { .. }) => "unknown_pod",
            Owner::Read(Origin::Node) => "node",
            Owner::Unread(Unread::Gone) => "gone",
            Owner::Unread(Unread::NoHostPids) => "no_host_pids",
        };
        self.shared.metrics.tls_process_end(identity);
    }

    /// The identity of `end` of its connection to `peer`, and whether it
    /// is a pod of this node's: its process's pod, where OpenSSL's probes
    /// announced one; else its address's.
    fn end(&self, end: Endpoint, peer: Endpoint) -> (Arc<Identity>, bool) {
        let local = self.local.contains(&end.ip);
        match self
            .owners
            .pod(end, peer)
            .and_then(|uid| self.directory.pod(&uid))
        {
            // A process of this kernel: where its pod runs is by name.
            Some(pod) => (pod, true),
            None => (self.directory.lookup(end.ip), local),
        }
    }

    /// An encrypted connection nothing read: counted on its edge and in
    /// the report.
    fn tls_unread(&self, seen: HelloSeen) {
        self.shared.metrics.tls_unread(crate::metrics::TlsLabels {
            source_service: seen.caller.clone(),
            destination_service: seen.callee.clone(),
            server_name: seen.server_name.clone(),
        });
        if let Ok(mut r) = self.shared.reporter.lock() {
            r.encrypted(&seen.caller, &seen.callee, &seen.server_name, &seen.alpn);
        }
    }

    /// Who a hop's two ends are, and whether each is a pod of this node.
    fn ends(&self, caller: Endpoint, callee: Endpoint) -> Ends {
        let (caller_id, caller_local) = self.end(caller, callee);
        let (callee_id, callee_local) = self.end(callee, caller);
        Ends {
            caller: caller_id,
            callee: callee_id,
            caller_local,
            callee_local,
        }
    }

    /// Whether this node reports what passed between `ends`: once, where
    /// a cross-node connection is seen on both nodes.
    fn reports_here(&self, ends: &Ends) -> bool {
        cluster::reports_here(
            &ends.caller,
            &ends.callee,
            ends.caller_local,
            ends.callee_local,
            self.node.as_deref(),
        )
    }

    /// Whether OpenSSL plaintext on `flow` is this agent's to read: an end
    /// is a pod of this node (seen on its veths, or placed on it by name).
    /// The uprobes see every process of the kernel, which on a node is the
    /// node's; where agents share a kernel (the lab's nodes, tests run side
    /// by side) the others' are left to them.
    fn ours(&self, flow: &crate::events::Flow) -> bool {
        [flow.src.ip, flow.dst.ip].iter().any(|ip| {
            self.local.contains(ip)
                || self.node.is_some() && self.directory.lookup(*ip).node == self.node
        }) || [(flow.src, flow.dst), (flow.dst, flow.src)]
            .into_iter()
            .filter_map(|(end, peer)| self.owners.pod(end, peer))
            .filter_map(|uid| {
                self.directory
                    .pod_with(&uid, |pod| self.node.is_none() || pod.node == self.node)
            })
            .any(|here| here)
    }

    /// An address seen sending from a watched pod veth.
    fn local_ip(&mut self, ip: IpAddr) {
        if self.local.len() >= MAX_LOCAL_IPS {
            self.local.clear();
        }
        self.local.insert(ip);
    }

    /// An HTTP/2 stream's start or end: the engine learns of a request as
    /// it starts (a service's calls are related to what it was serving
    /// then), the hop is made as it ends.
    fn h2_stream(&mut self, o: follow::Out) {
        match o {
            follow::Out::Started {
                flow,
                via,
                stream,
                ts_ns,
                request,
            } => {
                let mut req = Request::from_h2(ts_ns, flow, stream, &request);
                req.via = via;
                if !is_telemetry(&req) {
                    let req = self.engine.record(req);
                    self.started(&req);
                    if self.h2_open.len() < MAX_H2_OPEN {
                        self.h2_open.insert((flow, stream), req);
                    }
                }
            }
            follow::Out::Done {
                flow,
                via,
                exchange,
            } => {
                let started = self
                    .h2_open
                    .remove(&(flow, exchange.stream))
                    // Its own start's (not a stream of an earlier
                    // connection between the same ends that ended unseen).
                    .filter(|r| r.ts_ns == exchange.start_ns);
                let req = match started {
                    // The record its start made (telemetry never has one).
                    Some(req) => req,
                    None => {
                        let mut req = Request::from_h2(
                            exchange.start_ns,
                            flow,
                            exchange.stream,
                            &exchange.request,
                        );
                        req.via = via;
                        if is_telemetry(&req) {
                            self.shared.metrics.ignored("telemetry");
                            req.telemetry = true;
                        }
                        self.engine.record(req)
                    }
                };
                let answered = exchange.response.is_some() || exchange.trailers.is_some();
                let reply = answered.then(|| Reply::from_exchange(&exchange));
                self.hop(&req, reply, exchange.end_ns);
            }
        }
    }

    fn message(&mut self, m: Message) {
        if m.head.is_err() {
            tracing::debug!(flow = %m.flow, "unparsed message head");
            self.shared.metrics.message_unpaired("unparsed_head");
            return;
        }
        if m.is_request() {
            let Some(mut req) = Request::from_message(&m) else {
                return;
            };
            if is_telemetry(&req) {
                // Still paired, so the response is not taken for another's.
                self.shared.metrics.ignored("telemetry");
                req.telemetry = true;
            }
            let req = self.engine.record(req);
            if !req.telemetry {
                self.started(&req);
            }
            if let Some(pushed_out) = self.pairer.request(m.flow, req) {
                let now = monotonic_ns();
                self.hop(&pushed_out, None, now);
            }
        } else {
            match self.pairer.response(&m) {
                Answer::Answered { request, skipped } => {
                    // The client may take its port again at once, for a
                    // new connection the Service may send elsewhere.
                    if let Some(via) = request.via
                        && m.ends_connection
                    {
                        self.nat.closed(&crate::events::Flow {
                            src: request.flow.src,
                            dst: via,
                        });
                    }
                    for unseen in skipped {
                        self.hop(&unseen, None, m.ts_ns);
                    }
                    self.hop(&request, Reply::from_message(&m), m.ts_ns);
                }
                Answer::Orphan => self.shared.metrics.message_unpaired("orphan_response"),
                Answer::Interim => {}
            }
        }
    }

    /// An OTLP export a pod on this node made, and the collector's answer:
    /// what the callee checks need to tell a lost span from an unsent one.
    fn export_seen(&mut self, req: &Arc<Request>, rsp: Option<Reply>, gave_up_ns: u64) {
        if self.reconcile.is_none() && self.silence.is_none() {
            return;
        }
        let hop = Hop::new(&self.clock, req, rsp, gave_up_ns);
        let Some(exporter) = self.exporter(hop.caller().ip, req.ts_ns) else {
            return;
        };
        let Some(r) = &self.reconcile else { return };
        r.export_seen(
            &exporter.service,
            Export {
                ip: hop.caller().ip,
                at: hop.end(),
                status: hop.status,
                grpc_status: hop.grpc_status,
            },
        );
    }

    /// A finished exchange. A call whose cause evidence not in yet may
    /// decide (its thread's write turn, the answers' timing) waits for it
    /// a moment ([`HOLD_NS`]).
    fn hop(&mut self, req: &Arc<Request>, rsp: Option<Reply>, gave_up_ns: u64) {
        if req.telemetry {
            self.export_seen(req, rsp, gave_up_ns);
            return;
        }
        let hop = Hop::new(&self.clock, req, rsp, gave_up_ns);
        // Known answered at once: the calls held before it are timed by
        // this answer.
        self.engine.ended(&hop);
        let now = monotonic_ns();
        if self.deferred.len() < MAX_DEFERRED
            && (self.engine.awaits(&hop) || self.waits_for_calls(&hop))
        {
            let held = self.held_calls.entry(req.flow.src.ip).or_default();
            *held = (held.0 + 1, held.1.max(req.ts_ns));
            self.deferred.push_back(Deferred {
                // Evidence the kernel wrote by now is read that much
                // later at most (it wakes the agent by amount or age,
                // issue 40): held that much longer.
                until_ns: now + HOLD_NS + crate::events::READ_LATENESS.as_nanos() as u64,
                req: req.clone(),
                rsp,
                gave_up_ns,
            });
            return;
        }
        self.settle_hop(hop);
    }

    /// Whether a call `hop`'s callee made while serving it is held still:
    /// its verdict teaches which formats the callee reads, which judges
    /// `hop` ([`FormatsRead`]), so `hop` settles after it (the held ones
    /// settle in order).
    fn waits_for_calls(&self, hop: &Hop) -> bool {
        self.held_calls
            .get(&hop.callee().ip)
            .is_some_and(|(_, latest)| *latest >= hop.start_ns)
    }

    /// Hops held for evidence: each as it arrives, or at its time (`all`:
    /// now, shutting down). In the order they ended: a call placed takes
    /// its request from the later ones (one to one).
    pub(crate) fn release_deferred(&mut self, all: bool) {
        if self.deferred.is_empty() {
            return;
        }
        let now = monotonic_ns();
        let held = std::mem::take(&mut self.deferred);
        for d in held {
            let hop = Hop::new(&self.clock, &d.req, d.rsp, d.gave_up_ns);
            if all || now >= d.until_ns || !(self.engine.awaits(&hop) || self.waits_for_calls(&hop))
            {
                let caller = d.req.flow.src.ip;
                if let Some(held) = self.held_calls.get_mut(&caller) {
                    held.0 -= 1;
                    if held.0 == 0 {
                        self.held_calls.remove(&caller);
                    }
                }
                self.settle_hop(hop);
            } else {
                self.deferred.push_back(d);
            }
        }
    }

    /// Classifies a hop, counts and reports it, and makes its span.
    fn settle_hop(&mut self, hop: Hop) {
        let ends = self.ends(hop.caller(), hop.callee());
        let reports_here = self.reports_here(&ends);
        let Ends {
            caller,
            callee,
            callee_local,
            ..
        } = ends;
        // Declared (names file, annotation) first; else what the trace
        // store and the wire have shown of the service.
        let instrumented = callee.instrumented.or_else(|| {
            self.reconcile
                .as_ref()
                .and_then(|r| r.instrumented(&callee.service))
        });
        let mut verdict = self.engine.classify(&hop, instrumented);
        self.formats.learn(&caller.service, &hop, &verdict);
        self.formats.judge(&callee.service, &hop, &mut verdict);
        let node = self.node.as_deref();
        // Whether this node watches the callee's pods (and so sees their
        // exports): a pod whose HTTP/2 connections all run to local callers
        // may never be seen sending here (each such connection is read on
        // the caller's veth alone), but its node is named.
        let callee_here = cluster::known_here(&callee, callee_local, node);
        // Whether an undeclared callee records spans is its node's to find
        // out, call by call (below): uninstrumented only as learned so far.
        let learned_only = verdict.kind == GapKind::Uninstrumented && callee.instrumented.is_none();
        let uninstrumented_wanted = span::wanted(
            GapKind::Uninstrumented,
            self.export_mode,
            self.export_unsampled,
        );
        // A callee that called on in this trace under a span id of its own
        // makes spans, whatever its sampler keeps: never uninstrumented.
        if verdict.continued > 0 && callee.instrumented.is_none() {
            if let Some(r) = &self.reconcile {
                r.ids_seen(&callee.service);
            }
            if let Some(s) = &mut self.silence
                && callee_here
            {
                s.continued(&callee.service, monotonic_ns());
            }
        }
        // The callee's own span should be in the trace: checked on its node,
        // which sees its exports. A callee nobody declared gets its
        // uninstrumented span from that check when the store shows nothing
        // of it and it exports nothing: from the first call, on the node
        // that sees its exports, wherever the hop is reported.
        // A context in a format the callee was seen not to read is checked
        // too: the store says whether it started over (`new_trace`).
        let unread_format = verdict.kind == GapKind::FormatMismatch && verdict.link.is_none();
        let checked = self.reconcile.is_some()
            && (verdict.kind == GapKind::ContextOk || learned_only || unread_format)
            && verdict.forwarded == 0
            && callee.instrumented != Some(false)
            && cluster::is_pod(&callee, callee_local)
            && hop.context().is_some_and(|c| c.sampled == Some(true));
        if let Some(r) = &self.reconcile
            && checked
            && cluster::on_this_node(&callee, callee_local, node)
            && let Some(c) = hop.context()
        {
            // Its detail, with the evidence, is written when the check runs.
            let absent =
                (callee.instrumented.is_none() && verdict.continued == 0 && uninstrumented_wanted)
                    .then(|| {
                        learned_uninstrumented(
                            &hop,
                            &verdict,
                            &caller,
                            &callee,
                            "callee is not instrumented (learned)".into(),
                        )
                    });
            if let Some(s) = r.expect(facts(&hop, &caller, &callee, Some(ctx(c)), None), absent) {
                self.queue.offer(s);
            }
        }
        // No trace store: a callee nobody declared whose pods here have
        // served sampled requests a while and never exported gets its span
        // on its node (the one that sees its exports), marked likely.
        if let Some(s) = &mut self.silence
            && callee_here
            && callee.instrumented.is_none()
            && verdict.kind == GapKind::ContextOk
            && verdict.forwarded == 0
            && verdict.continued == 0
            && cluster::is_pod(&callee, callee_local)
            && hop.context().is_some_and(|c| c.sampled == Some(true))
        {
            let now = monotonic_ns();
            if let Silent::LikelySilent { sampled, over } = s.status(&callee.service, now)
                && uninstrumented_wanted
            {
                let mut likely = learned_uninstrumented(
                    &hop,
                    &verdict,
                    &caller,
                    &callee,
                    format!(
                        "callee is likely not instrumented (from the wire alone): its pods on this node served {sampled} sampled traced requests over {}s and exported no span; if it exports another way (a Unix socket, a sidecar), declare it (tracegap.io/instrumented)",
                        over.as_secs()
                    ),
                );
                likely.attributes.push(opentelemetry::KeyValue::new(
                    "tracegap.gap.confidence",
                    "likely",
                ));
                self.shared.metrics.likely_uninstrumented_spans.inc();
                self.queue.offer(likely);
            }
            s.served(&callee.service, now);
        }
        // A callee that passed this request's context on unchanged has no
        // span for it: its node (the one that saw what it sent) adds it,
        // whichever node reports the hop itself.
        if verdict.forwarded > 0
            && self.export_mode == ExportMode::Gaps
            && callee.instrumented != Some(false)
            && (self.export_unsampled || hop.context().is_some_and(|c| c.sampled != Some(false)))
            && cluster::on_this_node(&callee, callee_local, node)
        {
            self.queue
                .offer(span::passthrough(&hop, &verdict, &caller, &callee));
        }
        // Classified either way (the engine relates hops), reported once.
        if !reports_here {
            return;
        }
        let format = formats_label(&hop.propagation().contexts);
        let m = &self.shared.metrics;
        m.request_through(
            &mut self.request_counters,
            RequestLabels {
                source_service: self.labels.get(&caller.service),
                destination_service: self.labels.get(&callee.service),
                context_status: verdict.kind.as_str(),
                context_format: format.clone(),
            },
        );
        if let Some(l) = &verdict.link
            && matches!(
                verdict.kind,
                GapKind::BrokenPropagation | GapKind::FormatMismatch
            )
        {
            m.causes
                .get_or_create(&crate::metrics::ConfidenceLabels {
                    confidence: l.confidence.as_str().to_owned(),
                })
                .inc();
        }
        if hop.unanswered {
            m.unanswered.inc();
        }
        if verdict.link.as_ref().is_some_and(|l| l.baggage) {
            m.baggage(BaggageLabels {
                source_service: caller.service.clone(),
                destination_service: callee.service.clone(),
                propagation: if verdict.baggage_dropped {
                    "dropped"
                } else {
                    "carried"
                }
                .to_owned(),
            });
        }
        let mut example = hop
            .context()
            .map(|c| c.trace_id.clone())
            .or_else(|| verdict.link.as_ref().map(|l| l.context.trace_id.clone()));
        // A learned uninstrumented callee's span comes from its check.
        if span::wanted(verdict.kind, self.export_mode, self.export_unsampled)
            && !(learned_only && checked)
        {
            let callee_is_pod = cluster::is_pod(&callee, callee_local);
            let s = span::build(&hop, &verdict, &caller, &callee, callee_is_pod);
            example = Some(s.trace_id.to_string().into());
            match &self.reconcile {
                Some(r) => {
                    // What the callee was sent and reads, or, for a
                    // stitched span, the request the caller was serving.
                    let (received, serving) = match (&verdict.link, verdict.kind) {
                        (Some(l), GapKind::BrokenPropagation | GapKind::FormatMismatch) => {
                            (None, l.confidence.places().then(|| ctx(&l.context)))
                        }
                        (_, GapKind::MissingContext | GapKind::MalformedContext) => (None, None),
                        _ => (hop.context().map(ctx), None),
                    };
                    let facts = HopFacts {
                        unplaced: s.links.iter().any(|(_, _, kind)| *kind == "candidate"),
                        unread_format,
                        ..facts(&hop, &caller, &callee, received, serving)
                    };
                    if let Some(s) = r.hold(s, facts) {
                        self.queue.offer(s);
                    }
                }
                None => self.queue.offer(s),
            }
        }
        tracing::trace!(
            node = self.node.as_deref().unwrap_or("-"), flow = %hop.flow,
            caller = ?caller.pod, callee = ?callee.pod, reports_here,
            start_ns = hop.start_ns, gap = %verdict.kind, "hop"
        );
        if verdict.kind != GapKind::ContextOk {
            tracing::debug!(
                caller = %caller.service, callee = %callee.service,
                method = %hop.method(), path = %hop.path(), gap = %verdict.kind,
                detail = %verdict.detail, "hop"
            );
        }
        if verdict.kind.is_gap() {
            self.shared.metrics.gap(
                GapLabels {
                    kind: verdict.kind.as_str().to_owned(),
                    source_service: caller.service.clone(),
                    destination_service: callee.service.clone(),
                },
                example.as_deref(),
            );
        }
        if let Ok(mut r) = self.shared.reporter.lock() {
            r.record(
                &caller.service,
                &callee.service,
                &hop,
                &verdict,
                &format,
                example,
            );
        }
    }
}
