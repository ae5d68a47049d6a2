//! Prometheus metrics, named by the Prometheus conventions (`tracegap_`
//! prefix, `_total` counters, base units).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::ebpf::Counters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source_service: String,
    pub destination_service: String,
    /// The hop's classification (`context_ok`, `missing_context`, ...).
    pub context_status: String,
    /// `none`, `w3c`, `jaeger`, `b3multi`, `b3`, or several joined by `+`.
    pub context_format: String,
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
    pub gaps: Family<GapLabels, Counter>,
    pub baggage: Family<BaggageLabels, Counter>,
    pub unanswered: Counter,
    pub spans_exported: Counter,
    pub spans_dropped: Family<ReasonLabels, Counter>,
    pub export_errors: Counter,
    pub export_queue: Gauge,
    pub ringbuf_lost: Counter,
    pub kernel: Family<KernelLabels, Counter>,
    pub interfaces: Gauge,
    pub ignored: Family<ReasonLabels, Counter>,
    pub service_lookups: Family<ResultLabels, Counter>,
    pub starts_ignored: Family<ReasonLabels, Counter>,
    pub resyncs: Counter,
    pub boundaries_lost: Counter,
    pub bpf_run_seconds: Family<ProgramLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub bpf_runs: Family<ProgramLabels, Gauge>,
    last_kernel: std::sync::Mutex<Counters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
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
            spans_exported: Counter::default(),
            spans_dropped: Family::default(),
            export_errors: Counter::default(),
            export_queue: Gauge::default(),
            ringbuf_lost: Counter::default(),
            kernel: Family::default(),
            interfaces: Gauge::default(),
            ignored: Family::default(),
            service_lookups: Family::default(),
            starts_ignored: Family::default(),
            resyncs: Counter::default(),
            boundaries_lost: Counter::default(),
            bpf_run_seconds: Family::default(),
            bpf_runs: Family::default(),
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
            "ignored_requests",
            "Requests not treated as hops, by reason (telemetry: span exports)",
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
            "bpf_run_seconds",
            "Time the kernel spent in each program since BPF statistics were enabled (kernel.bpf_stats_enabled)",
            m.bpf_run_seconds.clone(),
        );
        registry.register(
            "bpf_runs",
            "Runs of each program since BPF statistics were enabled",
            m.bpf_runs.clone(),
        );
        Self { registry, ..m }
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
            if n > l {
                self.starts_ignored
                    .get_or_create(&ReasonLabels {
                        reason: reason.to_owned(),
                    })
                    .inc_by(n - l);
            }
        }
        self.resyncs
            .inc_by(now.resyncs.saturating_sub(last.resyncs));
        self.boundaries_lost
            .inc_by(now.lost.saturating_sub(last.lost));
        *last = now;
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
