//! Prometheus metrics, named by the Prometheus conventions (`tracegap_`
//! prefix, `_total` counters, base units).

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, exemplar::CounterWithExemplar, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::ebpf::Counters;

/// Label sets each per-edge metric family (`http_requests`, `gaps`,
/// `baggage_requests`) holds at most. Past it, a new edge is counted under
/// `source_service="_overflow"`, `destination_service="_overflow"` (its
/// other labels kept) and in `tracegap_metric_series_overflow_total`. Unnamed
/// peers are grouped already (`external`, `unknown`); the bound holds
/// whatever the names file or the cluster holds.
pub const MAX_EDGE_SERIES: usize = 2000;
/// What an edge past [`MAX_EDGE_SERIES`] is counted as.
pub const OVERFLOW: &str = "_overflow";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetricLabels {
    pub metric: &'static str,
}

/// Label sets of a per-edge family.
trait Edge: EncodeLabelSet + Clone + std::hash::Hash + Eq {
    /// Its source and destination labels set to [`OVERFLOW`].
    fn overflow(&mut self);
}

macro_rules! edge {
    ($($t:ty),*) => {$(
        impl Edge for $t {
            fn overflow(&mut self) {
                self.source_service = OVERFLOW.into();
                self.destination_service = OVERFLOW.into();
            }
        }
    )*};
}
edge!(
    RequestLabels,
    GapLabels,
    BaggageLabels,
    CalleeSpanLabels,
    TlsLabels
);

/// Service names as label values, shared: a hop's labels are built from
/// them without an allocation (issue 33). Holds [`Interned::MAX`] names
/// at most; past it a name is allocated each time (still counted right).
#[derive(Default)]
pub struct Interned(crate::FastMap<String, Arc<str>>);

impl Interned {
    const MAX: usize = 16 * 1024;

    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.0.get(name) {
            return a.clone();
        }
        let a: Arc<str> = name.into();
        if self.0.len() < Self::MAX {
            self.0.insert(name.to_owned(), a.clone());
        }
        a
    }
}

/// The pipeline's handles on its `http_requests` series, by their labels:
/// a hop finds its edge's counter with one small lookup instead of hashing
/// its labels twice (admission, family) under two locks (issue 33). Only
/// admitted series are kept (an edge past [`MAX_EDGE_SERIES`] is counted,
/// and counted as overflow, each time); the families never drop a series,
/// so a handle stays the series'. Bounded by admission itself (one handle
/// per admitted series); past [`RequestCounters::MAX`] it would start over,
/// a guard should the two bounds ever part.
#[derive(Default)]
pub struct RequestCounters(crate::FastMap<RequestLabels, Counter>);

impl RequestCounters {
    const MAX: usize = MAX_EDGE_SERIES;
}

/// The label sets admitted to each per-edge family.
#[derive(Default)]
struct EdgeSeries {
    requests: Admitted,
    gaps: Admitted,
    baggage: Admitted,
    callee_spans: Admitted,
    tls: Admitted,
    tls_read: Admitted,
}

/// The label sets admitted to one family, by hash.
#[derive(Default)]
struct Admitted(std::sync::Mutex<std::collections::HashSet<u64>>);

impl Admitted {
    /// Whether `labels` may have a series of its own.
    fn admit(&self, labels: &impl std::hash::Hash) -> bool {
        use std::hash::BuildHasher as _;
        static HASH: std::sync::LazyLock<std::hash::RandomState> =
            std::sync::LazyLock::new(std::hash::RandomState::new);
        let h = HASH.hash_one(labels);
        let Ok(mut set) = self.0.lock() else {
            return false;
        };
        if set.contains(&h) {
            return true;
        }
        if set.len() >= MAX_EDGE_SERIES {
            return false;
        }
        set.insert(h);
        true
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Shared names ([`Interned`]): counted per hop, built per hop.
    pub source_service: Arc<str>,
    pub destination_service: Arc<str>,
    /// The hop's classification (`context_ok`, `missing_context`, ...).
    pub context_status: &'static str,
    /// `none`, `w3c`, `jaeger`, `b3multi`, `b3`, `datadog`, `xray`,
    /// `cloudtrace`, `ottracer`, `grpc-trace-bin`, or several joined by `+`.
    pub context_format: std::borrow::Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GapLabels {
    pub kind: String,
    pub source_service: String,
    pub destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub server: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfidenceLabels {
    pub confidence: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BaggageLabels {
    pub source_service: String,
    pub destination_service: String,
    /// `carried` or `dropped` (arrived at the caller, not sent on).
    pub propagation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CalleeSpanLabels {
    pub source_service: String,
    pub destination_service: String,
    /// `arrived`, `new_trace`, `lost_in_pipeline`, `not_exported` or `unknown`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub source_service: String,
    pub destination_service: String,
    /// The ClientHello's SNI; empty when it sent none (or none readable).
    pub server_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// `trace` (by id) or `search`.
    pub query: &'static str,
    /// `found`, `not_found`, `error`, `rate_limited` or `store_away`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

/// An exemplar's labels: the trace it points at (OpenTelemetry's and
/// Grafana's name for it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabels {
    pub trace_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelLabels {
    pub counter: String,
}

/// Every metric the agent exposes.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// With the trace of the latest gap as its exemplar (OpenMetrics): the
    /// cluster-wide view's example traces.
    pub gaps: Family<GapLabels, CounterWithExemplar<TraceLabels>>,
    pub baggage: Family<BaggageLabels, Counter>,
    pub unanswered: Counter,
    pub likely_uninstrumented_spans: Counter,
    pub spans_exported: Counter,
    pub spans_dropped: Family<ReasonLabels, Counter>,
    pub export_errors: Counter,
    pub export_queue: Gauge,
    pub ringbuf_lost: Counter,
    pub events_undecodable: Counter,
    pub kernel: Family<KernelLabels, Counter>,
    pub interfaces: Gauge,
    pub ignored: Family<ReasonLabels, Counter>,
    pub service_lookups: Family<ResultLabels, Counter>,
    pub starts_ignored: Family<ReasonLabels, Counter>,
    pub messages_unpaired: Family<ReasonLabels, Counter>,
    pub resyncs: Counter,
    pub boundaries_lost: Counter,
    pub h2_connections: Gauge,
    pub h2_unread: Family<ReasonLabels, Counter>,
    pub h2_partly_read: Counter,
    pub h2_joined: Counter,
    pub h2_unsynchronised: Gauge,
    pub server_connections: Family<ServerLabels, Gauge>,
    pub server_refused: Family<RefusalLabels, Counter>,
    pub bpf_run_seconds: Family<ProgramLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub bpf_runs: Family<ProgramLabels, Gauge>,
    pub series_overflow: Family<MetricLabels, Counter>,
    pub callee_spans: Family<CalleeSpanLabels, Counter>,
    pub tls_unread: Family<TlsLabels, Counter>,
    pub tls_read: Family<TlsLabels, Counter>,
    pub openssl_libraries: Gauge,
    pub tls_process_ends: Family<IdentityLabels, Counter>,
    pub store_queries: Family<QueryLabels, Counter>,
    pub reconciled: Family<ActionLabels, Counter>,
    pub reconcile_pending: Gauge,
    pub thread_evidence: Family<SourceLabels, Gauge>,
    pub causes: Family<ConfidenceLabels, Counter>,
    admitted: EdgeSeries,
    /// The last trace of each gaps series (as many as its admitted series).
    gap_traces: std::sync::Mutex<std::collections::HashMap<GapLabels, String>>,
    last_kernel: std::sync::Mutex<Counters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds to `family`'s `reason` what a running count gained since it was
/// last `l` (now `n`).
fn add_since(family: &Family<ReasonLabels, Counter>, reason: &str, n: u64, l: u64) {
    if n > l {
        family
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc_by(n - l);
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tracegap");
        let m = Self {
            requests: Family::default(),
            gaps: Family::default(),
            baggage: Family::default(),
            unanswered: Counter::default(),
            likely_uninstrumented_spans: Counter::default(),
            spans_exported: Counter::default(),
            spans_dropped: Family::default(),
            export_errors: Counter::default(),
            export_queue: Gauge::default(),
            ringbuf_lost: Counter::default(),
            events_undecodable: Counter::default(),
            kernel: Family::default(),
            interfaces: Gauge::default(),
            ignored: Family::default(),
            service_lookups: Family::default(),
            starts_ignored: Family::default(),
            messages_unpaired: Family::default(),
            resyncs: Counter::default(),
            boundaries_lost: Counter::default(),
            h2_connections: Gauge::default(),
            h2_unread: Family::default(),
            h2_partly_read: Counter::default(),
            h2_joined: Counter::default(),
            h2_unsynchronised: Gauge::default(),
            server_connections: Family::default(),
            server_refused: Family::default(),
            bpf_run_seconds: Family::default(),
            bpf_runs: Family::default(),
            series_overflow: Family::default(),
            callee_spans: Family::default(),
            tls_unread: Family::default(),
            tls_read: Family::default(),
            openssl_libraries: Gauge::default(),
            tls_process_ends: Family::default(),
            store_queries: Family::default(),
            reconciled: Family::default(),
            reconcile_pending: Gauge::default(),
            thread_evidence: Family::default(),
            causes: Family::default(),
            admitted: Default::default(),
            gap_traces: Default::default(),
            last_kernel: std::sync::Mutex::new(Counters::default()),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests observed per edge, by context status and format",
            m.requests.clone(),
        );
        registry.register("gaps", "Trace gaps found, by kind and edge", m.gaps.clone());
        registry.register(
            "baggage_requests",
            "Requests whose caller had baggage, by whether it was carried on",
            m.baggage.clone(),
        );
        registry.register(
            "http_unanswered_requests",
            "Requests that got no response within the timeout",
            m.unanswered.clone(),
        );
        registry.register(
            "likely_uninstrumented_spans",
            "Spans added, with no trace store to ask, for calls into services likely not instrumented: their pods on this node served sampled traced requests for a while and never exported a span (--learn-uninstrumented-after, --learn-uninstrumented-requests)",
            m.likely_uninstrumented_spans.clone(),
        );
        registry.register(
            "spans_exported",
            "Synthetic spans accepted by the OTLP endpoint",
            m.spans_exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Synthetic spans dropped, by reason (queue_full, export_failed, shutdown)",
            m.spans_dropped.clone(),
        );
        registry.register(
            "export_errors",
            "Failed OTLP export calls (each retry counts)",
            m.export_errors.clone(),
        );
        registry.register(
            "export_queue_spans",
            "Synthetic spans waiting for export",
            m.export_queue.clone(),
        );
        registry.register(
            "ringbuf_lost_events",
            "Kernel events lost because the ring buffer was full",
            m.ringbuf_lost.clone(),
        );
        registry.register(
            "kernel_events",
            "Kernel-side counters (packets, tcp_payload, http_requests, ...)",
            m.kernel.clone(),
        );
        registry.register(
            "attached_interfaces",
            "Interfaces the programs are attached to",
            m.interfaces.clone(),
        );
        registry.register(
            "events_undecodable",
            "Ring-buffer records that did not decode (never expected: a sign of an agent and programs from different builds)",
            m.events_undecodable.clone(),
        );
        registry.register(
            "ignored_requests",
            "Requests not treated as hops, by reason (telemetry: span exports; tls_elsewhere: OpenSSL plaintext of a connection with no end among this node's pods, counted per chunk: another agent's, where several share a kernel)",
            m.ignored.clone(),
        );
        registry.register(
            "service_lookups",
            "Connections to a Service address whose backend pod was looked up in conntrack, by result (resolved, not_found, failed)",
            m.service_lookups.clone(),
        );
        registry.register(
            "http_starts_ignored",
            "Segments that begin like an HTTP message but are not read as one, by reason (duplicate: a retransmission or a second sighting; inside_body: within the previous message's body; unsynchronised: the stream lost its boundary and this is not where it resumes; tunnel: after an upgrade or CONNECT)",
            m.starts_ignored.clone(),
        );
        registry.register(
            "http_messages_unpaired",
            "HTTP/1.x messages read but made into no hop, by reason (unparsed_head: the head did not parse, cut short or not HTTP after all; orphan_response: a response with no request waiting on its flow, its request unseen: sent before the agent started, or lost)",
            m.messages_unpaired.clone(),
        );
        registry.register(
            "http_boundaries_lost",
            "Times a stream lost track of where its next message starts (a chunked body or a message start not seen, a head cut short)",
            m.boundaries_lost.clone(),
        );
        registry.register(
            "resyncs",
            "Times a stream that lost its message boundary found it again at an acknowledged start",
            m.resyncs.clone(),
        );
        registry.register(
            "h2_connections",
            "Cleartext HTTP/2 connections followed now (from their client preface on)",
            m.h2_connections.clone(),
        );
        registry.register(
            "h2_unread",
            "HTTP/2 that could not be read, by reason (unknown_connection: events of a connection whose preface was not seen; protocol_error: bytes that are not HTTP/2 as it should be; lost: connections the kernel stopped following; streams_dropped: streams open when their connection was lost or went idle)",
            m.h2_unread.clone(),
        );
        registry.register(
            "http_server_connections",
            "Connections open to the agent's own HTTP servers (server: probes for /metrics /healthz /readyz, report for /report and the Trace Quality API)",
            m.server_connections.clone(),
        );
        registry.register(
            "http_server_refused",
            "What the agent's own HTTP servers refused, by server and reason (connections: past the cap, closed at once; connections_per_client: past one address's cap, closed at once; busy: past an endpoint's requests in flight, answered 503; timeout: not answered in time, 503)",
            m.server_refused.clone(),
        );
        registry.register(
            "h2_partly_read_requests",
            "HTTP/2 requests with fields from HPACK table entries never seen (a connection joined mid-way, as after an agent restart, or read on after a block the kernel could not copy): classified from the fields read; with no trace context among them, unreadable",
            m.h2_partly_read.clone(),
        );
        registry.register(
            "h2_joined_connections",
            "HTTP/2 connections read from the middle, their start unseen (open before the agent started: after a restart, every long-lived gRPC channel)",
            m.h2_joined.clone(),
        );
        registry.register(
            "h2_unsynchronised_connections",
            "HTTP/2 connections followed whose HPACK tables still hold entries never seen (joined mid-way, or after a block the kernel could not copy): their requests may be read in part until the entries seen since fill the tables",
            m.h2_unsynchronised.clone(),
        );
        registry.register(
            "bpf_run_seconds",
            "Time the kernel spent in each program since BPF statistics were enabled (kernel.bpf_stats_enabled)",
            m.bpf_run_seconds.clone(),
        );
        registry.register(
            "bpf_runs",
            "Runs of each program since BPF statistics were enabled",
            m.bpf_runs.clone(),
        );
        registry.register(
            "metric_series_overflow",
            "Increments counted under the _overflow edge because a per-edge family reached its series bound, by metric",
            m.series_overflow.clone(),
        );
        registry.register(
            "tls_unread_connections",
            "TLS connections seen starting on the wire (a ClientHello) whose contents tracegap cannot read: encrypted edges, with the server name the client asked for; their requests are in no other tracegap figure",
            m.tls_unread.clone(),
        );
        registry.register(
            "tls_read_connections",
            "TLS connections seen starting on the wire (a ClientHello) whose plaintext OpenSSL's probes delivered: their requests are read like cleartext ones, by edge and server name",
            m.tls_read.clone(),
        );
        registry.register(
            "openssl_libraries_probed",
            "OpenSSL library files (libssl, by device and inode) whose SSL_read/SSL_write calls are read, in every process that maps them",
            m.openssl_libraries.clone(),
        );
        registry.register(
            "tls_process_ends",
            "Ends of connections read through OpenSSL, by what the process's cgroup says of its identity: pod (a pod's container: the hop's end is that pod, host-network ones included), unknown_pod (a pod UID not (yet) known from the API), node (a process of the node, in no pod), gone (the process had ended before its cgroup was read), no_host_pids (the agent does not share the node's PID namespace: hostPID). Ends other than pod are named by their address",
            m.tls_process_ends.clone(),
        );
        registry.register(
            "callee_spans",
            "Hops whose callee (instrumented, sent a sampled context) should have recorded a span, by what the trace store holds after the settle delay: arrived; new_trace (in a trace of its own: the callee did not read the context); lost_in_pipeline (the callee exported, the span never arrived); not_exported (no export seen from the callee); unknown (the collector took the callee's exports, 2xx, and the span is not in the store: the facts disagree); not_checked (the store could not be asked within a settle delay: nothing known); uninstrumented (a callee nobody declared, with no sign of recording spans: nothing of it in the store around the request, no export from it; tracegap's span stands in)",
            m.callee_spans.clone(),
        );
        registry.register(
            "trace_store_queries",
            "Queries to the trace store, by query (trace, search) and outcome (found, not_found, error; rate_limited: put off to a later round; store_away: a span sent on unreconciled)",
            m.store_queries.clone(),
        );
        registry.register(
            "reconciled_spans",
            "Synthetic spans after the trace store was read, by action (placed: under the breaking service's own span; linked: to the callee's own trace; suppressed: the callee's own span is there; unchanged; unreconciled: the store could not be asked; uninstrumented: a call whose callee showed no sign of recording spans, no span of it for the context sent and none of its own in the store, no export from it)",
            m.reconciled.clone(),
        );
        registry.register(
            "thread_evidence",
            "Where the threads' turns (which thread wrote each call, which read each request) come from on this kernel: 1 for the source in use (tracepoints, fexit, none)",
            m.thread_evidence.clone(),
        );
        registry.register(
            "stitched_causes",
            "Hops sent without the context of a request their caller was serving, by how that request was found: exact (same trace), sole (the only one open), thread (the writing thread read it), handoff (its answer was written right after the call's answer was read, by that thread), timing (its answer followed the call's, clearly first), ambiguous (not placed: a root linked to its candidates)",
            m.causes.clone(),
        );
        registry.register(
            "reconcile_pending",
            "Synthetic spans and hop checks waiting for the settle delay",
            m.reconcile_pending.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a callee-span outcome on its edge, within [`MAX_EDGE_SERIES`].
    pub fn callee_span(&self, l: CalleeSpanLabels) {
        self.count_edge(
            &self.callee_spans,
            &self.admitted.callee_spans,
            "callee_spans",
            l,
        );
    }

    /// Counts an encrypted connection on its edge, within [`MAX_EDGE_SERIES`].
    pub fn tls_unread(&self, l: TlsLabels) {
        self.count_edge(
            &self.tls_unread,
            &self.admitted.tls,
            "tls_unread_connections",
            l,
        );
    }

    /// Counts an encrypted connection read through OpenSSL, within
    /// [`MAX_EDGE_SERIES`].
    pub fn tls_read(&self, l: TlsLabels) {
        self.count_edge(
            &self.tls_read,
            &self.admitted.tls_read,
            "tls_read_connections",
            l,
        );
    }

    pub fn tls_process_end(&self, identity: &'static str) {
        self.tls_process_ends
            .get_or_create(&IdentityLabels { identity })
            .inc();
    }

    pub fn store_query(&self, query: &'static str, outcome: &'static str, n: u64) {
        self.store_queries
            .get_or_create(&QueryLabels { query, outcome })
            .inc_by(n);
    }

    pub fn reconciled(&self, action: &'static str) {
        self.reconciled
            .get_or_create(&ActionLabels { action })
            .inc();
    }

    /// Counts a hop on its edge, within [`MAX_EDGE_SERIES`].
    pub fn request(&self, l: RequestLabels) {
        self.count_edge(&self.requests, &self.admitted.requests, "http_requests", l);
    }

    /// [`Self::request`], through the caller's handles on the series.
    pub fn request_through(&self, handles: &mut RequestCounters, l: RequestLabels) {
        if let Some(c) = handles.0.get(&l) {
            c.inc();
            return;
        }
        if !self.admitted.requests.admit(&l) {
            // Past the bound: counted on the overflow edge, no handle kept
            // (the admission set was asked once, as for any other hop).
            let l = self.overflowed("http_requests", l);
            self.requests.get_or_create(&l).inc();
            return;
        }
        let c = self.requests.get_or_create(&l).clone();
        c.inc();
        if handles.0.len() >= RequestCounters::MAX {
            handles.0.clear();
        }
        handles.0.insert(l, c);
    }

    /// Counts a gap on its edge, within [`MAX_EDGE_SERIES`].
    /// `trace`: the gap's example trace (its synthetic span's, else the
    /// request's), the series' exemplar from now on.
    pub fn gap(&self, l: GapLabels, trace: Option<&str>) {
        let l = self.admit_edge(&self.admitted.gaps, "gaps", l);
        // A gap with no trace keeps the series' last one (an increment
        // without an exemplar would clear it).
        let trace = match (trace, self.gap_traces.lock()) {
            (Some(t), Ok(mut last)) => {
                last.insert(l.clone(), t.to_owned());
                Some(t.to_owned())
            }
            (None, Ok(last)) => last.get(&l).cloned(),
            (t, Err(_)) => t.map(str::to_owned),
        };
        self.gaps.get_or_create(&l).inc_by(
            1,
            trace.map(|trace_id| TraceLabels { trace_id }),
            Some(std::time::SystemTime::now()),
        );
    }

    /// Counts a request with baggage on its edge, within [`MAX_EDGE_SERIES`].
    pub fn baggage(&self, l: BaggageLabels) {
        self.count_edge(&self.baggage, &self.admitted.baggage, "baggage_requests", l);
    }

    /// Counts under `l`, or under the overflow edge once `family` holds
    /// [`MAX_EDGE_SERIES`] other label sets.
    fn count_edge<L: Edge>(
        &self,
        family: &Family<L, Counter>,
        admitted: &Admitted,
        metric: &'static str,
        l: L,
    ) {
        family
            .get_or_create(&self.admit_edge(admitted, metric, l))
            .inc();
    }

    /// `l`, or `l` on the overflow edge once its family holds
    /// [`MAX_EDGE_SERIES`] other label sets.
    fn admit_edge<L: Edge>(&self, admitted: &Admitted, metric: &'static str, l: L) -> L {
        if admitted.admit(&l) {
            l
        } else {
            self.overflowed(metric, l)
        }
    }

    /// `l` on the overflow edge, counted in `series_overflow`.
    fn overflowed<L: Edge>(&self, metric: &'static str, mut l: L) -> L {
        self.series_overflow
            .get_or_create(&MetricLabels { metric })
            .inc();
        l.overflow();
        l
    }

    /// A refusal by the agent's own HTTP server `server`.
    pub fn server_refused(&self, server: &str, reason: &str) {
        self.server_refused
            .get_or_create(&RefusalLabels {
                server: server.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The open-connections gauge of the agent's HTTP server `server`.
    pub fn server_connections(&self, server: &str) -> Gauge {
        self.server_connections
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .clone()
    }

    pub fn ignored(&self, reason: &str) {
        self.ignored
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Adds the lookups made since the last call (`last` is updated).
    pub fn service_lookups(
        &self,
        now: crate::nat::LookupStats,
        last: &mut crate::nat::LookupStats,
    ) {
        for (result, n, l) in [
            ("resolved", now.resolved, last.resolved),
            ("not_found", now.not_found, last.not_found),
            ("failed", now.failed, last.failed),
        ] {
            if n > l {
                self.service_lookups
                    .get_or_create(&ResultLabels { result })
                    .inc_by(n - l);
            }
        }
        *last = now;
    }

    /// Adds what HTTP/2 reading skipped since the last call (`last` is
    /// updated), and sets the followed connections.
    pub fn h2(
        &self,
        now: crate::http::h2::follow::H2Stats,
        (connections, unsynchronised): (usize, usize),
        last: &mut crate::http::h2::follow::H2Stats,
    ) {
        self.h2_connections.set(connections as i64);
        self.h2_unsynchronised.set(unsynchronised as i64);
        self.h2_joined
            .inc_by(now.joined.saturating_sub(last.joined));
        for (reason, n, l) in [
            (
                "unknown_connection",
                now.unknown_connection,
                last.unknown_connection,
            ),
            ("protocol_error", now.protocol_errors, last.protocol_errors),
            ("lost", now.lost, last.lost),
            ("streams_dropped", now.streams_dropped, last.streams_dropped),
            (
                "second_sighting",
                now.second_sightings,
                last.second_sightings,
            ),
        ] {
            add_since(&self.h2_unread, reason, n, l);
        }
        self.h2_partly_read
            .inc_by(now.partly_read.saturating_sub(last.partly_read));
        *last = now;
    }

    /// Adds the boundary decisions made since the last call (`last` is updated).
    pub fn boundaries(
        &self,
        now: crate::http::stream::BoundaryStats,
        last: &mut crate::http::stream::BoundaryStats,
    ) {
        for (reason, n, l) in [
            ("duplicate", now.duplicates, last.duplicates),
            ("inside_body", now.inside_body, last.inside_body),
            ("unsynchronised", now.unsynchronised, last.unsynchronised),
            ("tunnel", now.tunnel, last.tunnel),
        ] {
            add_since(&self.starts_ignored, reason, n, l);
        }
        self.resyncs
            .inc_by(now.resyncs.saturating_sub(last.resyncs));
        self.boundaries_lost
            .inc_by(now.lost.saturating_sub(last.lost));
        *last = now;
    }

    /// An HTTP/1.x message made into no hop (`unparsed_head`,
    /// `orphan_response`).
    pub fn message_unpaired(&self, reason: &str) {
        self.messages_unpaired
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn dropped(&self, reason: &str) {
        self.dropped_n(reason, 1);
    }

    pub fn dropped_n(&self, reason: &str, n: u64) {
        self.spans_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }

    /// Turns the kernel's running totals into counter increments.
    pub fn kernel_counters(&self, now: Counters) {
        let Ok(mut last) = self.last_kernel.lock() else {
            return;
        };
        for ((name, now), (_, before)) in now.iter().zip(last.iter()) {
            let delta = now.saturating_sub(before);
            if delta == 0 {
                continue;
            }
            if name == "ringbuf_full" {
                self.ringbuf_lost.inc_by(delta);
            }
            self.kernel
                .get_or_create(&KernelLabels {
                    counter: name.to_owned(),
                })
                .inc_by(delta);
        }
        *last = now;
    }

    /// Records each program's run time and count (from the kernel).
    pub fn program_stats(&self, stats: &[(&str, std::time::Duration, u64)]) {
        for (name, time, count) in stats {
            let l = ProgramLabels {
                program: (*name).to_owned(),
            };
            self.bpf_run_seconds
                .get_or_create(&l)
                .set(time.as_secs_f64());
            self.bpf_runs.get_or_create(&l).set(*count as i64);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_gap_carries_its_trace_as_the_series_exemplar() {
        let m = Metrics::new();
        let l = || GapLabels {
            kind: "broken_propagation".into(),
            source_service: "b".into(),
            destination_service: "c".into(),
        };
        let line = || {
            let text = m.encode();
            text.lines()
                .find(|l| l.starts_with("tracegap_gaps_total{"))
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("{text}"))
        };
        m.gap(l(), Some("0af7651916cd43dd8448eb211c80319c"));
        m.gap(l(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        // OpenMetrics: value, then `# {labels} value timestamp`.
        let with = r#"# {trace_id="4bf92f3577b34da6a3ce929d0e0e4736"} 1"#;
        assert!(line().contains(&format!("}} 2 {with}")), "{}", line());
        // A gap without a trace keeps the last one.
        m.gap(l(), None);
        assert!(line().contains(&format!("}} 3 {with}")), "{}", line());
    }
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::identity::Directory;

    fn series(text: &str, family: &str) -> usize {
        text.lines().filter(|l| l.starts_with(family)).count()
    }

    #[test]
    fn a_hundred_thousand_unknown_clients_stay_within_the_series_bound() {
        let m = Metrics::new();
        let directory = Directory::default();
        for i in 0..100_000u32 {
            // Half public, half private: each a client of its own.
            let ip = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(0x0800_0000 + i))
            } else {
                IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + i))
            };
            let caller = directory.lookup(ip);
            m.request(RequestLabels {
                source_service: caller.service.as_str().into(),
                destination_service: "checkout".into(),
                context_status: "missing_context",
                context_format: "none".into(),
            });
            m.gap(
                GapLabels {
                    kind: "missing_context".into(),
                    source_service: caller.service.clone(),
                    destination_service: "checkout".into(),
                },
                None,
            );
        }
        let text = m.encode();
        let total = text.lines().filter(|l| !l.starts_with('#')).count();
        let requests = series(&text, "tracegap_http_requests_total{");
        eprintln!("100000 unknown clients: {requests} http_requests series, {total} series in all");
        assert_eq!(requests, 2, "external and unknown");
        // The agent's own gauges and counters, and these few.
        assert!(total < 24, "{text}");
    }

    #[test]
    fn named_edges_past_the_bound_go_to_the_overflow_series() {
        let m = Metrics::new();
        for i in 0..(MAX_EDGE_SERIES + 500) {
            m.request(RequestLabels {
                source_service: format!("svc-{i}").into(),
                destination_service: "checkout".into(),
                context_status: "context_ok",
                context_format: "w3c".into(),
            });
        }
        let text = m.encode();
        let requests = series(&text, "tracegap_http_requests_total{");
        eprintln!(
            "{} named callers: {requests} http_requests series",
            MAX_EDGE_SERIES + 500
        );
        assert_eq!(requests, MAX_EDGE_SERIES + 1);
        assert!(text.contains("source_service=\"_overflow\""));
        assert!(
            text.contains("tracegap_metric_series_overflow_total{metric=\"http_requests\"} 500")
        );
    }

    #[test]
    fn counting_through_handles_counts_as_counting_by_labels() {
        // The same hops, once by labels and once through the pipeline's
        // handles: every series and the overflow count come out equal.
        let (by_labels, through) = (Metrics::new(), Metrics::new());
        let mut handles = RequestCounters::default();
        for round in 0..3 {
            for i in 0..(MAX_EDGE_SERIES + 100) {
                let l = RequestLabels {
                    source_service: format!("svc-{i}").into(),
                    destination_service: "checkout".into(),
                    context_status: if round == 1 {
                        "missing_context"
                    } else {
                        "context_ok"
                    },
                    context_format: "w3c".into(),
                };
                by_labels.request(l.clone());
                through.request_through(&mut handles, l);
            }
        }
        let (a, b) = (by_labels.encode(), through.encode());
        let lines = |t: &str| -> Vec<String> {
            let mut v: Vec<String> = t
                .lines()
                .filter(|l| {
                    l.starts_with("tracegap_http_requests_total{")
                        || l.starts_with("tracegap_metric_series_overflow_total{")
                })
                .map(str::to_owned)
                .collect();
            v.sort();
            v
        };
        assert_eq!(lines(&a), lines(&b));
        assert!(b.contains("tracegap_http_requests_total{source_service=\"svc-7\",destination_service=\"checkout\",context_status=\"context_ok\",context_format=\"w3c\"} 2"), "{b}");
        // The handles kept are bounded.
        assert!(handles.0.len() <= RequestCounters::MAX);
    }
}
