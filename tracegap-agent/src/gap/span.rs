//! Synthetic spans: what a hop becomes in the trace, so the hop the
//! instrumentation missed shows up in Jaeger where it belongs and says why
//! it was missing.
//!
//! Placement: a hop that carried valid context joins that trace under the
//! span the caller sent; a hop whose caller dropped (or replaced) context is
//! stitched into the inbound request's trace, marked as inferred; anything
//! else starts a new trace rooted at the synthetic span.

use std::{net::IpAddr, time::SystemTime};

use opentelemetry::{
    KeyValue,
    trace::{SpanId, SpanKind, TraceId},
};
use serde::Serialize;

use super::{GapKind, Hop, Verdict, hop::Protocol, route};

/// Who is behind an address: what names the span's service and resource.
/// Filled by the Kubernetes watcher in a cluster and by the names file (or
/// `--service`) standalone: the gap engine never knows which.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// `service.name`: the Kubernetes workload or a configured name; the
    /// address itself when nothing better is known.
    pub service: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub node: Option<String>,
    pub pod_uid: Option<String>,
    /// Owning workload, e.g. `Deployment/checkout`.
    pub workload: Option<Workload>,
    /// Whether the pod makes its own spans: Some(false) makes a hop with
    /// context into it a gap (`uninstrumented`); None is unknown.
    pub instrumented: Option<bool>,
    /// The address is a ClusterIP Service, not a pod.
    pub is_service: bool,
    /// The address is a node's own (host-network pods share it): traffic
    /// from it is node traffic, never a pod's.
    pub is_node: bool,
    /// A host-network pod: its address is the node's, so it is known by its
    /// UID alone (a process in its cgroup names it, see [`crate::process`]).
    pub host_network: bool,
    /// The pod's labels (not exported: they can be many).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Ports the pod's containers declare (a hop to one of them is served
    /// by this pod).
    pub ports: Vec<u16>,
}

/// A pod's owning workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Deployment, StatefulSet, DaemonSet, Job, ReplicaSet, ...
    pub kind: String,
    pub name: String,
}

/// The name of every unnamed public address.
pub const EXTERNAL: &str = "external";
/// The name of every unnamed private, loopback or link-local address.
pub const UNKNOWN: &str = "unknown";

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                // 100.64.0.0/10, carrier-grade NAT: pod networks use it too.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
                && v6
                    .to_ipv4_mapped()
                    .is_none_or(|v4| is_public(IpAddr::V4(v4)))
        }
    }
}

impl Identity {
    /// A peer nobody named: grouped, not named by its address, so that
    /// metric labels, report edges and Jaeger's service list stay bounded
    /// however many clients the internet sends (the address itself is on
    /// the span, `client.address`/`server.address`). [`EXTERNAL`] for
    /// public addresses, [`UNKNOWN`] for private, loopback and link-local
    /// ones (in the cluster, but not in the names file or the API).
    pub fn unknown(ip: IpAddr) -> Self {
        Self {
            service: if is_public(ip) { EXTERNAL } else { UNKNOWN }.to_owned(),
            ..Self::default()
        }
    }

    /// One of a node's own addresses.
    pub fn node(name: &str) -> Self {
        Self {
            service: format!("node:{name}"),
            node: Some(name.to_owned()),
            is_node: true,
            ..Self::default()
        }
    }

    /// A pod (as opposed to a Service, a node, or an unknown address).
    pub fn is_pod(&self) -> bool {
        self.pod.is_some() && !self.is_service && !self.is_node
    }

    /// Resource attributes, per the OpenTelemetry resource conventions.
    pub fn resource(&self) -> Vec<KeyValue> {
        let mut r = vec![KeyValue::new("service.name", self.service.clone())];
        if let Some(ns) = &self.namespace {
            r.push(KeyValue::new("k8s.namespace.name", ns.clone()));
        }
        if let Some(p) = &self.pod {
            r.push(KeyValue::new("k8s.pod.name", p.clone()));
        }
        if let Some(n) = &self.node {
            r.push(KeyValue::new("k8s.node.name", n.clone()));
        }
        if let Some(u) = &self.pod_uid {
            r.push(KeyValue::new("k8s.pod.uid", u.clone()));
        }
        if let Some(w) = &self.workload {
            // k8s.deployment.name, k8s.statefulset.name, ...
            r.push(KeyValue::new(
                format!("k8s.{}.name", w.kind.to_ascii_lowercase()),
                w.name.clone(),
            ));
        }
        r
    }
}

/// Which hops become spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportMode {
    /// Only gap hops: instrumented hops already have their spans.
    Gaps,
    /// Every hop (duplicates the spans of instrumented services).
    All,
}

/// One span to export.
#[derive(Clone, Debug)]
pub struct SyntheticSpan {
    /// The service the span is listed under, and its resource.
    pub identity: Identity,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `SpanId::INVALID` for a root span.
    pub parent_span_id: SpanId,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Some(description) when the span's status is ERROR.
    pub error: Option<String>,
    /// Spans this one links to (OTLP span links), each with its
    /// `tracegap.link.kind`: the callee's own trace for the same request,
    /// found in the trace store (`callee_trace`), an inbound request that
    /// may have caused an unplaced hop (`candidate`), or the span that made
    /// a stitched call in the trace its caller started instead of carrying
    /// the one it served (`downstream_trace`, from the wire).
    pub links: Vec<(TraceId, SpanId, &'static str)>,
}

fn trace_id(hex: &str) -> Option<TraceId> {
    TraceId::from_hex(hex)
        .ok()
        .filter(|t| *t != TraceId::INVALID)
}

fn span_id(hex: &str) -> Option<SpanId> {
    SpanId::from_hex(hex).ok().filter(|s| *s != SpanId::INVALID)
}

/// New random ids, from the SDK's generator.
fn new_ids() -> (TraceId, SpanId) {
    use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator};
    let g = RandomIdGenerator::default();
    (g.new_trace_id(), g.new_span_id())
}

/// Whether a hop with this verdict becomes a span.
///
/// A `passthrough` hop is not one: its callee received valid context and
/// has its own span. The span missing is the pass-through caller's, made by
/// [`passthrough`] from the request that caller was serving.
pub fn wanted(kind: GapKind, mode: ExportMode, export_unsampled: bool) -> bool {
    match kind {
        GapKind::Unsampled => export_unsampled,
        _ if mode == ExportMode::All => true,
        GapKind::Passthrough => false,
        k => k.is_gap(),
    }
}

/// The span of a service that passed its context through: `hop` is the
/// request it was serving (its `verdict.forwarded` > 0), `callee` the
/// pass-through service. It sits under the caller's span, where the
/// service's own span would be, and lasts as long as the request did.
pub fn passthrough(
    hop: &Hop,
    verdict: &Verdict,
    caller: &Identity,
    callee: &Identity,
) -> SyntheticSpan {
    let v = Verdict {
        kind: GapKind::Passthrough,
        detail: format!(
            "passed the context on unchanged to {} downstream request(s): no span of its own",
            verdict.forwarded
        )
        .into(),
        ..verdict.clone()
    };
    let mut s = build(hop, &v, caller, callee, true);
    s.attributes.push(KeyValue::new(
        "tracegap.passthrough.forwarded",
        verdict.forwarded as i64,
    ));
    s
}

/// Builds the span for a hop. `callee_is_pod`: the callee is a pod (on
/// any node), so the span is its SERVER span, listed under it; otherwise (a
/// Service nobody resolved, an address outside the cluster) only the
/// caller's side is known: a CLIENT span under the caller.
pub fn build(
    hop: &Hop,
    verdict: &Verdict,
    caller: &Identity,
    callee: &Identity,
    callee_is_pod: bool,
) -> SyntheticSpan {
    let (new_trace, span) = new_ids();
    let mut attributes = Vec::with_capacity(20);
    let mut links = Vec::new();
    let (trace, parent) = match (&verdict.link, verdict.kind) {
        (Some(link), GapKind::BrokenPropagation | GapKind::FormatMismatch) => {
            let placed = link.confidence.places();
            attributes.push(KeyValue::new(
                "tracegap.link",
                if placed { "inferred" } else { "unplaced" },
            ));
            attributes.push(KeyValue::new(
                "tracegap.link.confidence",
                link.confidence.as_str(),
            ));
            match link.confidence {
                super::Confidence::Ambiguous {
                    candidates,
                    threads,
                    answers,
                } => {
                    attributes.push(KeyValue::new("tracegap.link.candidates", candidates as i64));
                    // Why the threads could not tell: a thread serving
                    // several requests at once, no write turn seen, or no
                    // match.
                    attributes.push(KeyValue::new("tracegap.link.threads", threads));
                    // Why the answers could not: none named the call,
                    // several did, or the pod's record does not earn
                    // trust (yet).
                    attributes.push(KeyValue::new("tracegap.link.answers", answers.as_str()));
                }
                super::Confidence::Timing { candidates }
                | super::Confidence::Handoff { candidates } => {
                    attributes.push(KeyValue::new("tracegap.link.candidates", candidates as i64));
                }
                _ => {}
            }
            if let Some(c) = hop.context() {
                // The trace the downstream call went on in, for searching,
                // and a link to the span that made the call there (the
                // caller started that trace: a format it could not read, or
                // a context it dropped): from the wire, exact, store or not.
                attributes.push(KeyValue::new(
                    "tracegap.downstream.trace_id",
                    c.trace_id.to_string(),
                ));
                if let (Some(t), Some(s)) = (trace_id(&c.trace_id), span_id(&c.parent_span_id)) {
                    links.push((t, s, "downstream_trace"));
                }
            }
            if placed {
                (
                    trace_id(&link.context.trace_id),
                    span_id(&link.context.parent_span_id),
                )
            } else {
                // A trace of its own, linked to each request that may
                // have caused it: Jaeger shows the candidates, not a guess.
                links.extend(link.candidates.iter().filter_map(|c| {
                    Some((
                        trace_id(&c.trace_id)?,
                        span_id(&c.parent_span_id)?,
                        "candidate",
                    ))
                }));
                (None, None)
            }
        }
        _ => match hop.context() {
            Some(c) => {
                attributes.push(KeyValue::new("tracegap.link", "carried"));
                (trace_id(&c.trace_id), span_id(&c.parent_span_id))
            }
            None => (None, None),
        },
    };
    let (trace, parent) = match (trace, parent) {
        (Some(t), Some(p)) => (t, p),
        _ => (new_trace, SpanId::INVALID),
    };

    // gRPC: the RPC conventions' name (`pkg.Service/Method`); HTTP: the
    // method and the path's route template.
    let name = match hop.rpc() {
        Some((service, method)) => format!("{service}/{method}"),
        // The method not read (an HTTP/2 field from an entry never
        // seen): the HTTP conventions' name for an unknown method.
        None if hop.method().is_empty() => "HTTP".to_owned(),
        None => format!("{} {}", hop.method(), route::template(hop.path())),
    };
    let (kind, identity, peer) = if callee_is_pod {
        (SpanKind::Server, callee.clone(), hop.caller())
    } else {
        (SpanKind::Client, caller.clone(), hop.callee())
    };
    let server_address = hop
        .host()
        .map(|h| host_name(h).to_owned())
        .unwrap_or_else(|| hop.callee().ip.to_string());
    // A field not read (HTTP/2 from a table entry never seen) is left
    // out, never guessed.
    if !hop.method().is_empty() {
        attributes.push(KeyValue::new(
            "http.request.method",
            hop.method().to_owned(),
        ));
    }
    if !hop.path().is_empty() {
        attributes.push(KeyValue::new("url.path", hop.path().to_owned()));
    }
    attributes.extend([
        KeyValue::new("server.address", server_address),
        KeyValue::new("server.port", i64::from(hop.callee().port)),
        KeyValue::new("client.address", hop.caller().ip.to_string()),
        KeyValue::new("network.peer.address", peer.ip.to_string()),
        KeyValue::new("network.peer.port", i64::from(peer.port)),
        KeyValue::new("network.transport", "tcp"),
        KeyValue::new("tracegap.synthetic", true),
        KeyValue::new("tracegap.gap", verdict.kind.as_str()),
        KeyValue::new("tracegap.gap.detail", verdict.detail.clone()),
    ]);
    if let Some(f) = hop.fix(
        verdict.kind,
        verdict.link.as_ref().map(|l| l.context.format),
    ) {
        attributes.push(KeyValue::new("tracegap.gap.fix", f));
    }
    if let Some(s) = hop.status {
        attributes.push(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    if hop.protocol != Protocol::Http1 {
        attributes.push(KeyValue::new(
            "network.protocol.version",
            hop.protocol.version(),
        ));
    }
    if let Some((service, method)) = hop.rpc() {
        attributes.extend([
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_owned()),
            KeyValue::new("rpc.method", method.to_owned()),
        ]);
        if let Some(g) = hop.grpc_status {
            attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(g)));
        }
    }
    if let Some(f) = hop.format() {
        attributes.push(KeyValue::new("tracegap.context.format", f));
    }
    if let Some((_, trace)) = hop.propagation().foreign_only() {
        // The trace as the caller's tracer knows it, to find it there.
        attributes.push(KeyValue::new(
            "tracegap.context.foreign_trace_id",
            trace.to_owned(),
        ));
    }
    if let Some(via) = hop.via {
        // The Service the client called; server.address stays the pod that
        // served it (the HTTP server conventions' local server).
        attributes.push(KeyValue::new("tracegap.service.address", via.to_string()));
    }
    if callee_is_pod {
        attributes.push(KeyValue::new(
            "tracegap.caller.service",
            caller.service.clone(),
        ));
    } else {
        attributes.push(KeyValue::new(
            "tracegap.callee.service",
            callee.service.clone(),
        ));
    }
    if verdict.baggage_dropped {
        attributes.push(KeyValue::new("tracegap.baggage.dropped", true));
    }
    if hop.truncated {
        attributes.push(KeyValue::new("tracegap.headers.truncated", true));
    }
    if hop.joined {
        attributes.push(KeyValue::new("tracegap.h2.joined", true));
    }
    if hop.unknown_fields > 0 {
        attributes.push(KeyValue::new(
            "tracegap.h2.unknown_fields",
            i64::from(hop.unknown_fields),
        ));
    }
    // Server spans: 5xx is an error, 4xx is the client's. Client spans: both.
    // gRPC (its conventions): any status but OK on a client span; on a
    // server span, only those that are the server's fault.
    let grpc_error = hop.grpc_status.filter(|&g| {
        g != 0 && (kind == SpanKind::Client || matches!(g, 2 | 4 | 12 | 13 | 14 | 15))
    });
    let error = match (grpc_error.filter(|_| hop.rpc().is_some()), hop.status) {
        (Some(g), _) => {
            attributes.push(KeyValue::new("error.type", g.to_string()));
            Some(format!("gRPC status {g}"))
        }
        (None, None) => {
            attributes.push(KeyValue::new("tracegap.unanswered", true));
            attributes.push(KeyValue::new("error.type", "timeout"));
            Some(format!("no response within {:?}", hop.duration()))
        }
        (None, Some(s)) if s >= 500 || (s >= 400 && kind == SpanKind::Client) => {
            attributes.push(KeyValue::new("error.type", s.to_string()));
            Some(format!("HTTP {s}"))
        }
        (None, Some(_)) => None,
    };
    SyntheticSpan {
        identity,
        trace_id: trace,
        span_id: span,
        parent_span_id: parent,
        kind,
        name,
        start: hop.start,
        end: hop.end(),
        attributes,
        error,
        links,
    }
}

/// The host part of a Host header (`name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        events::{Endpoint, Flow},
        gap::{Confidence, Link},
        http::context::{Propagation, traceparent},
    };

    fn hop(ctx: Option<&str>, status: Option<u16>) -> Hop {
        let ep = |l, port| Endpoint {
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, l)),
            port,
        };
        let flow = Flow {
            src: ep(1, 40000),
            dst: ep(2, 8080),
        };
        let propagation = Propagation {
            contexts: ctx.map(traceparent).into_iter().collect(),
            ..Default::default()
        };
        Hop {
            flow,
            seq: 1,
            request: std::sync::Arc::new(crate::gap::hop::Request::new(
                1_000_000,
                flow,
                1,
                "GET",
                "/users/42",
                Some("service-b:8080"),
                propagation,
                false,
            )),
            status,
            start_ns: 1_000_000,
            end_ns: 4_000_000,
            start: std::time::UNIX_EPOCH + std::time::Duration::from_secs(100),
            unanswered: status.is_none(),
            truncated: false,
            joined: false,
            unknown_fields: 0,
            via: None,
            protocol: Default::default(),
            grpc_status: None,
            user_agent: None,
            server: None,
        }
    }

    fn verdict(kind: GapKind, link: Option<Link>) -> Verdict {
        Verdict {
            kind,
            detail: "why".into(),
            link,
            forwarded: 0,
            continued: 0,
            baggage_dropped: false,
        }
    }

    fn attr<'a>(s: &'a SyntheticSpan, key: &str) -> Option<&'a opentelemetry::Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    fn ids() -> (Identity, Identity) {
        (
            Identity {
                service: "service-a".into(),
                ..Default::default()
            },
            Identity {
                service: "service-b".into(),
                namespace: Some("lab".into()),
                ..Default::default()
            },
        )
    }

    #[test]
    fn carried_context_places_the_span_under_the_callers_span() {
        let h = hop(
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some(503),
        );
        let mut h = h;
        h.via = Some(Endpoint {
            ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            port: 80,
        });
        let (a, b) = ids();
        // service-b received this and sent it on unchanged twice.
        let mut v = verdict(GapKind::ContextOk, None);
        v.forwarded = 2;
        let s = passthrough(&h, &v, &a, &b);
        assert_eq!(
            attr(&s, "tracegap.passthrough.forwarded"),
            Some(&opentelemetry::Value::I64(2))
        );
        assert_eq!(
            attr(&s, "tracegap.service.address").map(|v| v.as_str().into_owned()),
            Some("10.96.0.10:80".into())
        );
        assert!(!wanted(GapKind::Passthrough, ExportMode::Gaps, false));
        assert!(wanted(GapKind::Passthrough, ExportMode::All, false));
        assert_eq!(s.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.parent_span_id.to_string(), "b7ad6b7169203331");
        assert_ne!(s.span_id, SpanId::INVALID);
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(s.name, "GET /users/{id}");
        assert_eq!(s.identity.service, "service-b");
        assert_eq!(s.error.as_deref(), Some("HTTP 503"));
        assert_eq!(
            attr(&s, "tracegap.gap").map(|v| v.as_str().into_owned()),
            Some("passthrough".into())
        );
        assert_eq!(
            attr(&s, "server.address").map(|v| v.as_str().into_owned()),
            Some("service-b".into())
        );
        assert_eq!(
            s.end.duration_since(s.start).unwrap(),
            std::time::Duration::from_millis(3)
        );
        // Only the caller's side known: a CLIENT span under the caller.
        let s = build(&h, &verdict(GapKind::Passthrough, None), &a, &b, false);
        assert_eq!(s.kind, SpanKind::Client);
        assert_eq!(s.identity.service, "service-a");
    }

    #[test]
    fn a_grpc_hop_follows_the_rpc_conventions() {
        let (a, b) = ids();
        let mut h = hop(None, Some(200));
        h.protocol = super::Protocol::Grpc;
        h.set_method_path("POST", "/shop.Cart/AddItem");
        h.grpc_status = Some(14);
        let s = build(&h, &verdict(GapKind::MissingContext, None), &a, &b, true);
        let get = |k| attr(&s, k).map(|v| v.as_str().into_owned());
        assert_eq!(s.name, "shop.Cart/AddItem");
        assert_eq!(get("rpc.system").as_deref(), Some("grpc"));
        assert_eq!(get("rpc.service").as_deref(), Some("shop.Cart"));
        assert_eq!(get("rpc.method").as_deref(), Some("AddItem"));
        assert_eq!(get("network.protocol.version").as_deref(), Some("2"));
        assert_eq!(
            attr(&s, "rpc.grpc.status_code"),
            Some(&opentelemetry::Value::I64(14))
        );
        // UNAVAILABLE is the server's fault: an error on its span, though
        // HTTP said 200.
        assert_eq!(s.error.as_deref(), Some("gRPC status 14"));
        // NOT_FOUND is the caller's: not an error on the server's span,
        // an error on the client's.
        h.grpc_status = Some(5);
        let s = build(&h, &verdict(GapKind::MissingContext, None), &a, &b, true);
        assert_eq!(s.error, None);
        let s = build(&h, &verdict(GapKind::MissingContext, None), &a, &b, false);
        assert_eq!(s.error.as_deref(), Some("gRPC status 5"));
        // HTTP/2 without gRPC keeps the HTTP name.
        h.protocol = super::Protocol::Http2;
        let s = build(&h, &verdict(GapKind::MissingContext, None), &a, &b, true);
        assert_eq!(s.name, "POST /shop.Cart/AddItem");
        assert!(attr(&s, "rpc.system").is_none());
    }

    #[test]
    fn a_joined_connections_call_says_so_and_leaves_out_what_it_could_not_read() {
        let (a, b) = ids();
        // After an agent restart: :path and content-type came from table
        // entries never seen; :method too.
        let mut h = hop(None, Some(200));
        h.protocol = super::Protocol::Http2;
        h.set_method_path("", "");
        h.joined = true;
        h.unknown_fields = 4;
        let s = build(&h, &verdict(GapKind::MissingContext, None), &a, &b, true);
        let get = |k| attr(&s, k).cloned();
        assert_eq!(s.name, "HTTP");
        assert_eq!(
            get("tracegap.h2.joined"),
            Some(opentelemetry::Value::Bool(true))
        );
        assert_eq!(
            get("tracegap.h2.unknown_fields"),
            Some(opentelemetry::Value::I64(4))
        );
        for absent in [
            "http.request.method",
            "url.path",
            "rpc.method",
            "rpc.system",
        ] {
            assert!(get(absent).is_none(), "{absent} guessed");
        }
        // A connection seen from its start says neither.
        h.joined = false;
        h.unknown_fields = 0;
        h.set_method_path("POST", "/shop.Cart/AddItem");
        let s = build(&h, &verdict(GapKind::MissingContext, None), &a, &b, true);
        assert!(attr(&s, "tracegap.h2.joined").is_none());
        assert!(attr(&s, "tracegap.h2.unknown_fields").is_none());
        assert!(attr(&s, "http.request.method").is_some());
    }

    fn valid(tp: &str) -> crate::http::context::SpanContext {
        match traceparent(tp) {
            crate::http::context::Found::Valid(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn broken_propagation_is_stitched_into_the_inbound_trace_as_inferred() {
        let link = Link {
            context: valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            confidence: Confidence::Sole,
            baggage: false,
            candidates: Vec::new(),
        };
        let (a, b) = ids();
        let s = build(
            &hop(None, Some(200)),
            &verdict(GapKind::BrokenPropagation, Some(link)),
            &a,
            &b,
            true,
        );
        assert_eq!(s.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(
            attr(&s, "tracegap.link").map(|v| v.as_str().into_owned()),
            Some("inferred".into())
        );
        assert_eq!(
            attr(&s, "tracegap.link.confidence").map(|v| v.as_str().into_owned()),
            Some("sole".into())
        );
        assert!(s.links.is_empty());
    }

    #[test]
    fn a_format_mismatch_is_stitched_and_links_the_span_that_made_the_call_in_the_new_trace() {
        // The caller was served B3 (here as the inbound context) and sent
        // W3C with a trace of its own: the hop's context.
        let link = Link {
            context: valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            confidence: Confidence::Sole,
            baggage: false,
            candidates: Vec::new(),
        };
        let (a, b) = ids();
        let s = build(
            &hop(
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                Some(200),
            ),
            &verdict(GapKind::FormatMismatch, Some(link)),
            &a,
            &b,
            true,
        );
        assert_eq!(s.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.parent_span_id.to_string(), "00f067aa0ba902b7");
        let links: Vec<(String, String, &str)> = s
            .links
            .iter()
            .map(|(t, sp, k)| (t.to_string(), sp.to_string(), *k))
            .collect();
        assert_eq!(
            links,
            [(
                "0af7651916cd43dd8448eb211c80319c".to_owned(),
                "b7ad6b7169203331".to_owned(),
                "downstream_trace"
            )]
        );
    }

    #[test]
    fn an_ambiguous_hop_is_parented_under_none_of_its_candidates_and_links_each() {
        let candidates = vec![
            valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            valid("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ];
        let link = Link {
            context: candidates[0].clone(),
            confidence: Confidence::Ambiguous {
                candidates: 2,
                threads: "unmatched",
                answers: crate::gap::HandoffSeen::Unnamed,
            },
            baggage: false,
            candidates,
        };
        let (a, b) = ids();
        let s = build(
            &hop(None, Some(200)),
            &verdict(GapKind::BrokenPropagation, Some(link)),
            &a,
            &b,
            true,
        );
        assert_ne!(s.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(s.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert_eq!(
            attr(&s, "tracegap.link").map(|v| v.as_str().into_owned()),
            Some("unplaced".into())
        );
        assert_eq!(
            attr(&s, "tracegap.link.candidates").map(|v| v.as_str().into_owned()),
            Some("2".into())
        );
        let linked: Vec<(String, String, &str)> = s
            .links
            .iter()
            .map(|(t, sp, k)| (t.to_string(), sp.to_string(), *k))
            .collect();
        assert_eq!(
            linked,
            [
                (
                    "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                    "00f067aa0ba902b7".to_owned(),
                    "candidate"
                ),
                (
                    "0af7651916cd43dd8448eb211c80319c".to_owned(),
                    "b7ad6b7169203331".to_owned(),
                    "candidate"
                ),
            ]
        );
    }

    #[test]
    fn no_context_roots_a_new_trace_and_unanswered_is_an_error() {
        let (a, b) = ids();
        let s = build(
            &hop(None, None),
            &verdict(GapKind::MissingContext, None),
            &a,
            &b,
            true,
        );
        assert_ne!(s.trace_id, TraceId::INVALID);
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert!(s.error.as_deref().unwrap().starts_with("no response"));
        // Never a query string, never a credential: they are not in a hop.
        assert!(s.attributes.iter().all(|kv| {
            let v = kv.value.as_str();
            !v.contains('?') && !kv.key.as_str().contains("authorization")
        }));
    }

    #[test]
    fn only_gaps_are_exported_by_default() {
        assert!(wanted(GapKind::MissingContext, ExportMode::Gaps, false));
        assert!(!wanted(GapKind::ContextOk, ExportMode::Gaps, false));
        assert!(wanted(GapKind::ContextOk, ExportMode::All, false));
        assert!(!wanted(GapKind::Unsampled, ExportMode::All, false));
        assert!(wanted(GapKind::Unsampled, ExportMode::Gaps, true));
        assert_eq!(host_name("[fd00::1]:80"), "fd00::1");
        assert_eq!(host_name("svc"), "svc");
    }
}
