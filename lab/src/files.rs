//! The lab's trace files: every span the store received, as OTLP JSON
//! (`TracesData`) and as a Jaeger JSON trace file that the Jaeger UI opens
//! with Search → "Upload" (the `/api/traces` response format).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, TracesData},
};
use serde_json::{Value, json};

use crate::store::{Downtime, Received, text};

/// OTLP JSON, one resource per service.
pub fn otlp_json(spans: &[Received]) -> anyhow::Result<String> {
    let mut by_service: BTreeMap<String, (Vec<_>, Vec<_>)> = BTreeMap::new();
    for s in spans {
        let e = by_service
            .entry(s.service.clone())
            .or_insert_with(|| (s.resource.clone(), Vec::new()));
        e.1.push(s.span.clone());
    }
    let data = TracesData {
        resource_spans: by_service
            .into_values()
            .map(|(attributes, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes,
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope::default()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    };
    Ok(serde_json::to_string_pretty(&data)?)
}

/// A Jaeger tag with the attribute's own type (bool, int64, float64,
/// string; arrays, maps and bytes as their JSON text).
fn typed_tag(key: &str, value: Option<&AnyValue>) -> Value {
    let (kind, v) = match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::BoolValue(b)) => ("bool", json!(b)),
        Some(any_value::Value::IntValue(i)) => ("int64", json!(i)),
        Some(any_value::Value::DoubleValue(d)) => ("float64", json!(d)),
        Some(any_value::Value::StringValue(s)) => ("string", json!(s)),
        _ => ("string", json!(value.map(text).unwrap_or_default())),
    };
    json!({"key": key, "type": kind, "value": v})
}

fn tags(attrs: &[KeyValue]) -> Vec<Value> {
    attrs
        .iter()
        .map(|kv| typed_tag(&kv.key, kv.value.as_ref()))
        .collect()
}

/// How long after a span a caller's span may still be on its way to the
/// store (the SDKs' batch delay and the export).
const EXPORT_SLACK: Duration = Duration::from_secs(5);

/// Why a span's parent is not in the store, as well as the lab can tell.
fn missing_parent(s: &Received, down: &[Downtime]) -> String {
    let parent = s.parent_span_id();
    if matches!(
        s.gap().as_deref(),
        Some("unsampled" | "sampling_inconsistent")
    ) {
        return format!(
            "parent span {parent} is not recorded: the caller did not sample this trace \
             (its context said not recorded), so its span was never exported"
        );
    }
    let at = |nanos: u64| UNIX_EPOCH + Duration::from_nanos(nanos);
    let (start, end) = (
        at(s.span.start_time_unix_nano),
        at(s.span.end_time_unix_nano),
    );
    let during_downtime = down.iter().any(|d| {
        let until = d.until.unwrap_or(SystemTime::now());
        d.from <= end + EXPORT_SLACK && start <= until
    });
    if during_downtime {
        format!(
            "parent span {parent} is not recorded: the trace store was down while the caller \
             exported it, and the caller's SDK dropped it"
        )
    } else {
        format!(
            "parent span {parent} is not recorded: the caller did not export it (it is not \
             instrumented for export, or lost it); nothing more is coming"
        )
    }
}

/// Jaeger's JSON trace file (`{"data": [trace, ...]}`). `down`: when the
/// store was down, to say why a parent span is missing.
pub fn jaeger_json(spans: &[Received], down: &[Downtime]) -> anyhow::Result<String> {
    let data = jaeger_traces(spans, down);
    Ok(serde_json::to_string_pretty(&json!({ "data": data }))?)
}

/// Jaeger's JSON trace format, one entry per trace, in trace id order:
/// what Jaeger's query API answers and its UI reads.
pub fn jaeger_traces(spans: &[Received], down: &[Downtime]) -> Vec<Value> {
    let mut traces: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for s in spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    traces
        .into_iter()
        .map(|(trace_id, spans)| {
            let recorded: BTreeSet<String> = spans.iter().map(|s| s.span_id()).collect();
            // A process per service and resource (each pod of a service is
            // its own process, with its k8s.* tags).
            let mut processes: BTreeMap<(String, String), (String, Vec<Value>)> = BTreeMap::new();
            let jspans: Vec<Value> = spans
                .iter()
                .map(|s| {
                    let resource: Vec<KeyValue> = s
                        .resource
                        .iter()
                        .filter(|kv| kv.key != "service.name")
                        .cloned()
                        .collect();
                    let resource_tags = tags(&resource);
                    let n = processes.len() + 1;
                    let pid = processes
                        .entry((s.service.clone(), Value::from(resource_tags.clone()).to_string()))
                        .or_insert_with(|| (format!("p{n}"), resource_tags))
                        .0
                        .clone();
                    let mut span_tags = tags(&s.span.attributes);
                    span_tags.push(typed_tag(
                        "span.kind",
                        Some(&AnyValue {
                            value: Some(any_value::Value::StringValue(
                                match s.span.kind {
                                    2 => "server",
                                    3 => "client",
                                    4 => "producer",
                                    5 => "consumer",
                                    _ => "internal",
                                }
                                .into(),
                            )),
                        }),
                    ));
                    if s.span.status.as_ref().is_some_and(|st| st.code == 2) {
                        span_tags.push(json!({"key": "error", "type": "bool", "value": true}));
                    }
                    let mut warnings = Vec::new();
                    // A reference to a span that will never come makes the
                    // UI call the trace incomplete and "still being
                    // collected", which is false: such a span is shown as a
                    // root of its own, its parent's id and the reason in
                    // its warning. (No nearer recorded ancestor is known
                    // to refer to instead: spans name only their parent.)
                    let references = if s.span.parent_span_id.is_empty() {
                        vec![]
                    } else if !recorded.contains(&s.parent_span_id()) {
                        warnings.push(missing_parent(s, down));
                        vec![]
                    } else {
                        // Span links (tracegap's to the callee's own trace)
                        // as Jaeger's OTLP receiver keeps them: FOLLOWS_FROM
                        // references after the parent, which the UI lists
                        // under the span's References.
                        let mut refs = vec![json!({
                            "refType": "CHILD_OF",
                            "traceID": trace_id,
                            "spanID": s.parent_span_id(),
                        })];
                        refs.extend(s.span.links.iter().map(|l| {
                            json!({
                                "refType": "FOLLOWS_FROM",
                                "traceID": crate::store::hex(&l.trace_id),
                                "spanID": crate::store::hex(&l.span_id),
                            })
                        }));
                        refs
                    };
                    json!({
                        "traceID": trace_id,
                        "spanID": s.span_id(),
                        "operationName": s.span.name,
                        "references": references,
                        "startTime": s.span.start_time_unix_nano / 1000,
                        "duration": s.span.end_time_unix_nano.saturating_sub(s.span.start_time_unix_nano) / 1000,
                        "tags": span_tags,
                        "logs": [],
                        "processID": pid,
                        "warnings": if warnings.is_empty() { Value::Null } else { json!(warnings) },
                    })
                })
                .collect();
            let processes: serde_json::Map<String, Value> = processes
                .into_iter()
                .map(|((service, _), (pid, tags))| (pid, json!({"serviceName": service, "tags": tags})))
                .collect();
            json!({"traceID": trace_id, "spans": jspans, "processes": processes, "warnings": null})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::trace::v1::Span;

    use super::*;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn span(
        service: &str,
        pod: &str,
        id: u8,
        parent: Option<u8>,
        attrs: Vec<KeyValue>,
    ) -> Received {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Received {
            service: service.into(),
            resource: vec![
                kv(
                    "service.name",
                    any_value::Value::StringValue(service.into()),
                ),
                kv("k8s.pod.name", any_value::Value::StringValue(pod.into())),
            ],
            span: Span {
                trace_id: vec![7; 16],
                span_id: vec![id; 8],
                parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
                name: "GET /".into(),
                kind: 2,
                start_time_unix_nano: start,
                end_time_unix_nano: start + 1_000_000,
                attributes: attrs,
                ..Default::default()
            },
            via: "grpc",
            arrived: SystemTime::now(),
        }
    }

    fn trace(spans: &[Received], down: &[Downtime]) -> Value {
        let text = jaeger_json(spans, down).expect("written");
        let v: Value = serde_json::from_str(&text).expect("json");
        v["data"][0].clone()
    }

    fn by_id(t: &Value, id: u8) -> &Value {
        let want = hex(&[id; 8]);
        t["spans"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["spanID"] == want.as_str()))
            .expect("the span")
    }

    fn hex(b: &[u8]) -> String {
        crate::store::hex(b)
    }

    #[test]
    fn tags_keep_their_types_and_processes_carry_the_resource() {
        let attrs = vec![
            kv("tracegap.synthetic", any_value::Value::BoolValue(true)),
            kv("server.port", any_value::Value::IntValue(8080)),
            kv("url.path", any_value::Value::StringValue("/x".into())),
        ];
        let spans = [
            span("service-b", "service-b-1", 1, None, attrs),
            span("service-b", "service-b-2", 2, Some(1), vec![]),
        ];
        let t = trace(&spans, &[]);
        let tag = |s: &Value, k: &str| {
            s["tags"]
                .as_array()
                .and_then(|t| t.iter().find(|t| t["key"] == k).cloned())
                .expect("the tag")
        };
        let root = by_id(&t, 1);
        assert_eq!(
            tag(root, "tracegap.synthetic"),
            json!({"key": "tracegap.synthetic", "type": "bool", "value": true})
        );
        assert_eq!(tag(root, "server.port")["type"], "int64");
        assert_eq!(tag(root, "server.port")["value"], 8080);
        assert_eq!(tag(root, "url.path")["type"], "string");
        // Two pods of one service: two processes, each with its pod.
        let (p1, p2) = (&by_id(&t, 1)["processID"], &by_id(&t, 2)["processID"]);
        assert_ne!(p1, p2);
        let process = &t["processes"][p1.as_str().expect("pid")];
        assert_eq!(process["serviceName"], "service-b");
        assert_eq!(
            process["tags"],
            json!([{"key": "k8s.pod.name", "type": "string", "value": "service-b-1"}])
        );
        // The parent is recorded: no warning.
        assert_eq!(by_id(&t, 2)["warnings"], Value::Null);
    }

    #[test]
    fn a_span_whose_parent_is_not_recorded_says_why() {
        let unsampled = vec![kv(
            "tracegap.gap",
            any_value::Value::StringValue("unsampled".into()),
        )];
        let spans = [
            span("service-c", "c-1", 1, Some(9), unsampled),
            span("service-c", "c-1", 2, Some(8), vec![]),
        ];
        let t = trace(&spans, &[]);
        let warning = |id| {
            by_id(&t, id)["warnings"][0]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        assert!(warning(1).contains("did not sample"), "{}", warning(1));
        assert!(warning(2).contains("did not export"), "{}", warning(2));
        assert!(warning(2).contains(&hex(&[8; 8])), "{}", warning(2));
        // The same span while the store was down.
        let down = [Downtime {
            from: SystemTime::now() - Duration::from_secs(10),
            until: None,
        }];
        let t = trace(&spans[1..], &down);
        let w = by_id(&t, 2)["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(w.contains("store was down"), "{w}");
    }
}
