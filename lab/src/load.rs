//! The lab's traffic: an instrumented client (the seed's service-a, which
//! curls service-b with a `traceparent`), as a real program. Each request
//! is the root of a trace made with the OpenTelemetry SDK, sampled at a
//! ratio, with its context injected in the chosen format (or none).

use std::time::{Duration, Instant};

use opentelemetry::{
    Context, KeyValue,
    baggage::BaggageExt as _,
    trace::{SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::trace::Sampler;
use serde::{Deserialize, Serialize};

use crate::service::{Propagator, call, path_of, tracer_provider};

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// The client's service name (its spans' `service.name`).
    pub name: String,
    pub target: String,
    /// 0: until stopped.
    pub count: u64,
    /// Pause between requests.
    pub interval: Duration,
    /// None: requests carry no trace context at all.
    pub propagator: Option<Propagator>,
    /// Share of root traces sampled (0..=1).
    pub sample_ratio: f64,
    /// W3C baggage members `key=value` sent with every request.
    pub baggage: Vec<(String, String)>,
    /// OTLP/HTTP base endpoint for the client's own spans.
    pub otlp: Option<String>,
    /// Stop early after this long, whatever the count (zero: no limit).
    pub max_time: Duration,
}

/// What happened, printed as JSON by `tracegap-lab load`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadSummary {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub sampled: u64,
    /// Trace ids of the first requests (at most 20), sampled or not.
    pub traces: Vec<String>,
    /// Whether each of `traces` was sampled.
    pub traces_sampled: Vec<bool>,
}

/// Sends the requests, one after the other.
pub fn run(spec: &LoadSpec) -> LoadSummary {
    let provider = tracer_provider(
        &spec.name,
        Sampler::TraceIdRatioBased(spec.sample_ratio),
        spec.otlp.as_deref(),
    );
    let tracer = provider.tracer("tracegap-lab-load");
    let mut summary = LoadSummary::default();
    let started = Instant::now();
    let count = if spec.count == 0 {
        u64::MAX
    } else {
        spec.count
    };
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(spec.interval);
        }
        if !spec.max_time.is_zero() && started.elapsed() >= spec.max_time {
            break;
        }
        let mut headers = Vec::new();
        let span = tracer
            .span_builder(format!("GET {}", path_of(&spec.target)))
            .with_kind(SpanKind::Client)
            .start(&tracer);
        let mut cx = Context::new().with_span(span);
        if !spec.baggage.is_empty() {
            cx = cx.with_baggage(
                spec.baggage
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            );
        }
        let sc = cx.span().span_context().clone();
        match spec.propagator {
            Some(p) => p.inject(&cx, &mut headers),
            None if !spec.baggage.is_empty() => {
                // Baggage without trace context: only the baggage header.
                let members: Vec<String> = spec
                    .baggage
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                headers.push(("baggage".into(), members.join(",")));
            }
            None => {}
        }
        summary.sent += 1;
        match call(&spec.target, &headers) {
            Ok(status) if (200..400).contains(&status) => summary.ok += 1,
            _ => summary.errors += 1,
        }
        if sc.is_sampled() {
            summary.sampled += 1;
        }
        if summary.traces.len() < 20 {
            summary.traces.push(sc.trace_id().to_string());
            summary.traces_sampled.push(sc.is_sampled());
        }
        cx.span().end();
    }
    let _ = provider.shutdown();
    summary
}
