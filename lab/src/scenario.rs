//! The scenarios: one per lesson of the seed lab. Each builds its pods and
//! services, drives traffic, and says what tracegap must find.

use std::time::Duration;

use crate::{
    load::LoadSpec,
    service::{Behaviour, Propagator, SamplerSpec, ServiceSpec},
};

/// The scenario names, in the order they run.
pub const ALL: [&str; 12] = [
    "broken-propagation",
    "concurrent",
    "fixed",
    "uninstrumented",
    "sampling",
    "formats",
    "baggage",
    "collector-down",
    "slow",
    "flood",
    "grpc",
    "tls",
];

/// A service in a scenario: its pod is named after it.
pub struct Svc {
    pub spec: ServiceSpec,
    /// Downstream services by pod name, with the path to call.
    pub calls: Vec<(&'static str, &'static str)>,
}

/// A traffic source: an instrumented client in its own pod.
pub struct Load {
    pub pod: &'static str,
    /// The service it calls, and the path.
    pub target: (&'static str, &'static str),
    pub spec: LoadSpec,
    /// How many copies run at once.
    pub parallel: usize,
}

/// What the report must show.
pub enum Expect {
    /// Hops of this kind on this edge.
    Kind(&'static str, &'static str, &'static str),
    /// No gap anywhere.
    NoGaps,
    /// Baggage carried on this edge.
    BaggageCarried(&'static str, &'static str),
    /// A synthetic span of this gap lasting about this long.
    SpanLasting(&'static str, Duration),
    /// The trace store was down for a while; export resumed after.
    ExportRecovered,
    /// The synthetic spans of the breaking service's (first) calls to the
    /// callee (second) sit under the breaking service's own spans.
    Placed(&'static str, &'static str),
    /// The breaking service's (first) calls to the callee (second), made
    /// while it served many requests at once: each stitched span sits
    /// under the request that caused it (as the service itself recorded,
    /// `/_lab/causes`) or is left unplaced, linked to its candidates;
    /// none under a wrong one.
    Caused(&'static str, &'static str),
    /// The synthetic spans for calls into this callee link to its own
    /// new traces.
    Linked(&'static str),
    /// The first service's calls into the second that are `format_mismatch`
    /// have spans that link to the span that made each call in the trace
    /// the first service started (the second's own span is its child).
    LinkedDownstream(&'static str, &'static str),
    /// Every call from the first service into the second has a synthetic
    /// span of this gap, under the caller's span (in the caller's trace).
    Spanned(&'static str, &'static str, &'static str),
    /// Calls from the first to the second (instrumented) service without
    /// context add no span: the callee's own root span is the record.
    Suppressed(&'static str, &'static str),
    /// Hops on this edge whose callee's own span the store shows with this
    /// outcome (`arrived`, `new_trace`, ...), after the settle delay.
    CalleeSpans(&'static str, &'static str, &'static str),
    /// Every TLS connection's plaintext was read through OpenSSL: no edge
    /// is left encrypted and unread.
    AllTlsRead,
    /// The service's spans lost while the store refused them are counted
    /// `lost_in_pipeline`, as many as the service itself failed to export.
    SpansLost(&'static str),
    /// After the checks above: the agents restart (a DaemonSet rollout)
    /// while the services keep their connections, the load into the first
    /// service runs again, and the new agents' report shows the first's
    /// calls to the second (gRPC on the channel opened before the restart)
    /// each once, with their context.
    AcrossRestart(&'static str, &'static str),
    /// After the checks above: the agents restart with no trace store to
    /// ask, learning from the wire alone (quickly: a sampled request a
    /// node, a second ago); the loads that reach this callee run four times to
    /// teach them, then once more, and every call of that last run into it
    /// gets a span marked `likely`.
    WithoutStore(&'static str),
    /// The agent kept up: at least this share of the requests sent were
    /// classified, and it is still healthy.
    KeptUp(f64),
}

pub struct Scenario {
    pub name: &'static str,
    /// The seed lesson, in one line.
    pub lesson: &'static str,
    pub services: Vec<Svc>,
    pub loads: Vec<Load>,
    pub expect: Vec<Expect>,
    /// The trace store refuses exports (503) while the loads run, takes
    /// them again after.
    pub store_down: bool,
}

fn svc(name: &str, behaviour: Behaviour, calls: &[(&'static str, &'static str)]) -> Svc {
    Svc {
        spec: ServiceSpec::new(name, 8080, behaviour),
        calls: calls.to_vec(),
    }
}

fn load(pod: &'static str, target: (&'static str, &'static str), count: u64) -> Load {
    Load {
        pod,
        target,
        spec: LoadSpec {
            name: pod.to_owned(),
            target: String::new(),
            count,
            interval: Duration::from_millis(50),
            propagator: Some(Propagator::W3c),
            sample_ratio: 1.0,
            baggage: Vec::new(),
            otlp: None,
            max_time: Duration::from_secs(120),
        },
        parallel: 1,
    }
}

/// Builds a scenario; `short` shrinks counts and delays for the tests.
pub fn build(name: &str, short: bool) -> Option<Scenario> {
    let n = |short_n: u64, full_n: u64| if short { short_n } else { full_n };
    use Behaviour::*;
    use Expect::*;
    let s = match name {
        "broken-propagation" => {
            let mut bare = load("bare-client", ("service-c", "/inventory/7"), n(3, 10));
            bare.spec.propagator = None;
            Scenario {
                name: "broken-propagation",
                lesson: "service-b (instrumented, but its HTTP client is not) does not propagate trace headers: the trace stops at service-b",
                services: vec![
                    svc(
                        "service-b",
                        ServerSpansOnly,
                        &[("service-c", "/inventory/42")],
                    ),
                    svc("service-c", Instrumented, &[]),
                ],
                loads: vec![
                    load("service-a", ("service-b", "/checkout"), n(5, 20)),
                    bare,
                ],
                expect: vec![
                    Kind("service-b", "service-c", "broken_propagation"),
                    Kind("service-a", "service-b", "context_ok"),
                    CalleeSpans("service-a", "service-b", "arrived"),
                    Placed("service-b", "service-c"),
                    Linked("service-c"),
                    Kind("bare-client", "service-c", "missing_context"),
                    Suppressed("bare-client", "service-c"),
                ],
                store_down: false,
            }
        }
        "concurrent" => {
            let mut b = svc(
                "service-b",
                ServerSpansOnly,
                &[("service-c", "/inventory/42")],
            );
            b.spec.think = Duration::from_millis(20);
            let mut a = load("service-a", ("service-b", "/checkout"), n(4, 12));
            a.parallel = 16;
            a.spec.interval = Duration::from_millis(5);
            Scenario {
                name: "concurrent",
                lesson: "broken-propagation under load: service-b serves 16 callers at once and thinks up to 20 ms before its call; a call whose cause the evidence does not single out is linked to its candidates, never put under a wrong request",
                services: vec![b, svc("service-c", Instrumented, &[])],
                loads: vec![a],
                expect: vec![
                    Kind("service-b", "service-c", "broken_propagation"),
                    Caused("service-b", "service-c"),
                ],
                store_down: false,
            }
        }
        "fixed" => Scenario {
            name: "fixed",
            lesson: "service-b propagates the headers: one complete trace",
            services: vec![
                svc("service-b", Instrumented, &[("service-c", "/inventory/42")]),
                svc("service-c", Instrumented, &[]),
            ],
            loads: vec![load("service-a", ("service-b", "/checkout"), n(5, 20))],
            expect: vec![NoGaps, Kind("service-b", "service-c", "context_ok")],
            store_down: false,
        },
        "uninstrumented" => {
            // The seed's nginx: a leaf that makes no spans, and a gRPC
            // server with no instrumentation at all behind an instrumented
            // caller; declared by nobody (as in a real cluster): learned
            // from the trace store and the wire, call by call.
            let nginx = svc("nginx", DropsHeaders, &[]);
            let mut stock = svc("stock", DropsHeaders, &[]);
            stock.spec.grpc = true;
            Scenario {
                name: "uninstrumented",
                lesson: "hops without instrumentation: Jaeger shows the call to them, nothing inside",
                services: vec![
                    svc("proxy", PassesThrough, &[("service-c", "/items")]),
                    svc("service-c", Instrumented, &[]),
                    nginx,
                    svc(
                        "service-d",
                        Instrumented,
                        &[("stock", "grpc:/lab.Stock/Check")],
                    ),
                    stock,
                ],
                loads: vec![
                    load("service-a", ("proxy", "/orders/7"), n(5, 20)),
                    load("service-a", ("nginx", "/index.html"), n(3, 10)),
                    load("service-e", ("service-d", "/stock"), n(3, 10)),
                ],
                expect: vec![
                    Kind("proxy", "service-c", "passthrough"),
                    Kind("service-a", "proxy", "context_ok"),
                    CalleeSpans("service-a", "nginx", "uninstrumented"),
                    Spanned("service-a", "nginx", "uninstrumented"),
                    CalleeSpans("service-d", "stock", "uninstrumented"),
                    Spanned("service-d", "stock", "uninstrumented"),
                    WithoutStore("nginx"),
                    WithoutStore("stock"),
                ],
                store_down: false,
            }
        }
        "sampling" => {
            let mut a = load("service-a", ("service-b", "/"), n(40, 100));
            a.spec.sample_ratio = 0.1;
            a.spec.interval = Duration::from_millis(10);
            let mut x = load("service-x", ("service-s", "/"), n(5, 20));
            x.spec.interval = Duration::from_millis(20);
            let mut s = svc("service-s", Instrumented, &[("service-c", "/")]);
            s.spec.sampler = SamplerSpec::AlwaysOff;
            Scenario {
                name: "sampling",
                lesson: "service-a samples 10%; service-s's sampler ignores its parent",
                services: vec![
                    svc("service-b", Instrumented, &[("service-c", "/")]),
                    s,
                    svc("service-c", Instrumented, &[]),
                ],
                loads: vec![a, x],
                expect: vec![
                    Kind("service-a", "service-b", "unsampled"),
                    Kind("service-b", "service-c", "unsampled"),
                    Kind("service-s", "service-c", "sampling_inconsistent"),
                ],
                store_down: false,
            }
        }
        "formats" => {
            let mut b3 = load("b3-client", ("service-w", "/"), n(3, 10));
            b3.spec.propagator = Some(Propagator::B3);
            let mut jaeger = load("jaeger-client", ("service-w", "/"), n(3, 10));
            jaeger.spec.propagator = Some(Propagator::Jaeger);
            Scenario {
                name: "formats",
                lesson: "W3C, B3 and Jaeger callers of a W3C-only service",
                services: vec![
                    svc("service-w", Instrumented, &[("service-c", "/")]),
                    svc("service-c", Instrumented, &[]),
                ],
                loads: vec![load("w3c-client", ("service-w", "/"), n(3, 10)), b3, jaeger],
                expect: vec![
                    // The store shows what the wire cannot: service-w's
                    // spans for B3 and Jaeger callers are roots of new
                    // traces; for the W3C caller, children of its span.
                    // (Calls into service-w in B3 or Jaeger are mismatches
                    // where its node reports them, once it saw service-w
                    // start over for that format: on the other node they
                    // stay context_ok, so no count is expected here.)
                    CalleeSpans("b3-client", "service-w", "new_trace"),
                    CalleeSpans("jaeger-client", "service-w", "new_trace"),
                    CalleeSpans("w3c-client", "service-w", "arrived"),
                    Kind("service-w", "service-c", "format_mismatch"),
                    LinkedDownstream("service-w", "service-c"),
                    Kind("service-w", "service-c", "context_ok"),
                ],
                store_down: false,
            }
        }
        "baggage" => {
            let mut a = load("service-a", ("service-b", "/"), n(3, 10));
            a.spec.baggage = vec![("user-id".into(), "12345".into())];
            let mut bare = load("baggage-client", ("service-d", "/"), n(3, 10));
            bare.spec.propagator = None;
            bare.spec.baggage = vec![
                ("user-id".into(), "12345".into()),
                ("session-id".into(), "abc".into()),
            ];
            Scenario {
                name: "baggage",
                lesson: "baggage rides along with trace context, and without it",
                services: vec![
                    svc("service-b", Instrumented, &[("service-c", "/")]),
                    svc("service-c", Instrumented, &[]),
                    svc("service-d", DropsHeaders, &[]),
                ],
                loads: vec![a, bare],
                expect: vec![
                    BaggageCarried("service-b", "service-c"),
                    Kind("baggage-client", "service-d", "missing_context"),
                ],
                store_down: false,
            }
        }
        "collector-down" => {
            let mut a = load("service-a", ("service-b", "/"), n(150, 600));
            a.spec.interval = Duration::ZERO;
            Scenario {
                name: "collector-down",
                lesson: "the trace store is down under load (its collector answers 503): the services' lost spans and tracegap's drops are counted, export recovers",
                services: vec![
                    svc("service-b", ServerSpansOnly, &[("service-c", "/")]),
                    svc("service-c", Instrumented, &[]),
                ],
                loads: vec![a],
                expect: vec![
                    Kind("service-b", "service-c", "broken_propagation"),
                    ExportRecovered,
                    SpansLost("service-b"),
                ],
                store_down: true,
            }
        }
        "slow" => {
            let delay = if short {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(30)
            };
            let mut s = svc("slow-service", DropsHeaders, &[]);
            s.spec.delay = delay;
            let mut c = load("client", ("slow-service", "/report"), 1);
            c.spec.propagator = None;
            Scenario {
                name: "slow",
                lesson: "a slow request is one long span, not a gap in time",
                services: vec![s],
                loads: vec![c],
                expect: vec![SpanLasting("missing_context", delay)],
                store_down: false,
            }
        }
        "flood" => {
            let mut f = load("flood", ("service-c", "/"), n(250, 2500));
            f.spec.interval = Duration::ZERO;
            f.spec.propagator = None;
            f.spec.max_time = Duration::from_secs(60);
            f.parallel = 4;
            Scenario {
                name: "flood",
                lesson: "a bounded flood: back-pressure shows in the metrics, nothing crashes",
                services: vec![svc("service-c", DropsHeaders, &[])],
                loads: vec![f],
                expect: vec![KeptUp(0.95)],
                store_down: false,
            }
        }
        "grpc" => {
            // A gRPC server behind two HTTP/1.1 services: service-b (SDK
            // server spans, plain gRPC client) drops the context on its
            // call; service-d carries it, with 16.5 KiB of metadata (its
            // header block past HTTP/2's 16 KiB frame: HEADERS, then
            // CONTINUATION), four requests at a time, so its calls are
            // concurrent streams on its one connection.
            let mut inventory = svc("inventory", Instrumented, &[]);
            inventory.spec.grpc = true;
            let mut d = svc(
                "service-d",
                Instrumented,
                &[("inventory", "grpc:/lab.Inventory/Check")],
            );
            d.spec.metadata_bytes = 16 * 1024 + 512;
            let mut e = load("service-e", ("service-d", "/stock"), n(12, 40));
            e.parallel = 4;
            e.spec.interval = Duration::from_millis(20);
            Scenario {
                name: "grpc",
                lesson: "gRPC behind HTTP/1.1: service-b drops the context on its gRPC call to inventory; service-d carries it, many calls on one connection",
                services: vec![
                    svc(
                        "service-b",
                        ServerSpansOnly,
                        &[("inventory", "grpc:/lab.Inventory/Reserve")],
                    ),
                    d,
                    inventory,
                ],
                loads: vec![load("service-a", ("service-b", "/checkout"), n(5, 20)), e],
                expect: vec![
                    Kind("service-b", "inventory", "broken_propagation"),
                    Kind("service-a", "service-b", "context_ok"),
                    Placed("service-b", "inventory"),
                    Linked("inventory"),
                    Kind("service-d", "inventory", "context_ok"),
                    CalleeSpans("service-d", "inventory", "arrived"),
                    AcrossRestart("service-d", "inventory"),
                ],
                store_down: false,
            }
        }
        "tls" => {
            // broken-propagation over HTTPS: every service serves and calls
            // through the system's OpenSSL, which tracegap reads in the
            // clear; the wire carries ciphertext only.
            let mut b = svc(
                "service-b",
                ServerSpansOnly,
                &[("service-c", "https:/inventory/42")],
            );
            b.spec.tls = true;
            let mut c = svc("service-c", Instrumented, &[]);
            c.spec.tls = true;
            Scenario {
                name: "tls",
                lesson: "broken-propagation over HTTPS (OpenSSL): service-b drops the context on its call to service-c; tracegap reads both hops inside TLS",
                services: vec![b, c],
                loads: vec![load(
                    "service-a",
                    ("service-b", "https:/checkout"),
                    n(5, 20),
                )],
                expect: vec![
                    Kind("service-b", "service-c", "broken_propagation"),
                    Kind("service-a", "service-b", "context_ok"),
                    Placed("service-b", "service-c"),
                    AllTlsRead,
                ],
                store_down: false,
            }
        }
        _ => return None,
    };
    Some(s)
}
