//! The lab's trace files: every span the store received, as OTLP JSON
//! (`TracesData`) and as a Jaeger JSON trace file that the Jaeger UI opens
//! with "Search → Upload JSON" (the `/api/traces` response format).

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    common::v1::InstrumentationScope,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, TracesData},
};
use serde_json::{Value, json};

use crate::store::Received;

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

fn tag(key: &str, value: String) -> Value {
    json!({"key": key, "type": "string", "value": value})
}

/// Jaeger's JSON trace format, one entry per trace.
pub fn jaeger_json(spans: &[Received]) -> anyhow::Result<String> {
    let mut traces: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for s in spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    let data: Vec<Value> = traces
        .into_iter()
        .map(|(trace_id, spans)| {
            let mut processes: BTreeMap<String, String> = BTreeMap::new();
            let jspans: Vec<Value> = spans
                .iter()
                .map(|s| {
                    let n = processes.len() + 1;
                    let pid = processes
                        .entry(s.service.clone())
                        .or_insert_with(|| format!("p{n}"))
                        .clone();
                    let mut tags: Vec<Value> = s
                        .span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = s.attr(&kv.key).unwrap_or_default();
                            tag(&kv.key, v)
                        })
                        .collect();
                    tags.push(tag(
                        "span.kind",
                        match s.span.kind {
                            2 => "server",
                            3 => "client",
                            _ => "internal",
                        }
                        .into(),
                    ));
                    if s.span.status.as_ref().is_some_and(|st| st.code == 2) {
                        tags.push(json!({"key": "error", "type": "bool", "value": true}));
                    }
                    let references = if s.span.parent_span_id.is_empty() {
                        vec![]
                    } else {
                        vec![json!({
                            "refType": "CHILD_OF",
                            "traceID": trace_id,
                            "spanID": s.parent_span_id(),
                        })]
                    };
                    json!({
                        "traceID": trace_id,
                        "spanID": s.span_id(),
                        "operationName": s.span.name,
                        "references": references,
                        "startTime": s.span.start_time_unix_nano / 1000,
                        "duration": s.span.end_time_unix_nano.saturating_sub(s.span.start_time_unix_nano) / 1000,
                        "tags": tags,
                        "logs": [],
                        "processID": pid,
                        "warnings": null,
                    })
                })
                .collect();
            let processes: serde_json::Map<String, Value> = processes
                .into_iter()
                .map(|(service, pid)| (pid, json!({"serviceName": service, "tags": []})))
                .collect();
            json!({"traceID": trace_id, "spans": jspans, "processes": processes, "warnings": null})
        })
        .collect();
    Ok(serde_json::to_string_pretty(&json!({ "data": data }))?)
}
