//! Grafana Tempo's API: `/api/traces/{id}` answers the trace as OTLP JSON
//! (`batches` of resource spans; ids in base64, as Tempo's JSON encodes
//! bytes), `/api/search` lists trace ids, which are then read by id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{FutureExt as _, future::BoxFuture};
use serde_json::Value;

use super::{
    Error, Http, Kind, PEER_ADDRESS, PEER_PORT, Search, StoreKind, StoredSpan, Trace, TraceStore,
    jaeger::query, normal_id,
};

/// A Tempo query frontend at a base URL.
pub struct Tempo {
    http: Http,
    base: String,
}

impl Tempo {
    pub(crate) fn new(http: Http, base: String) -> Self {
        Self { http, base }
    }
}

impl TraceStore for Tempo {
    fn kind(&self) -> StoreKind {
        StoreKind::Tempo
    }

    fn trace<'a>(&'a self, trace_id: &'a str) -> BoxFuture<'a, Result<Option<Trace>, Error>> {
        async move {
            let url = format!("{}/api/traces/{trace_id}", self.base);
            match self.http.get_json(&url, "Tempo's OTLP JSON").await? {
                Some(v) => trace(&v).map(|t| (!t.is_empty()).then_some(t)),
                None => Ok(None),
            }
        }
        .boxed()
    }

    fn search<'a>(&'a self, q: &'a Search) -> BoxFuture<'a, Result<Vec<Trace>, Error>> {
        async move {
            let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            // Whole seconds: widened so the window is inside.
            let url = format!(
                "{}/api/search?{}",
                self.base,
                query(&[
                    ("tags", &format!("service.name=\"{}\"", q.service)),
                    ("start", &secs(q.start).to_string()),
                    ("end", &(secs(q.end) + 1).to_string()),
                    ("limit", &q.limit.to_string()),
                ])
            );
            let Some(v) = self.http.get_json(&url, "Tempo's search JSON").await? else {
                return Ok(Vec::new());
            };
            let ids = search_ids(&v)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(t) = self.trace(&id).await? {
                    out.push(t);
                }
            }
            Ok(out)
        }
        .boxed()
    }
}

fn decode_err(reason: impl Into<String>) -> Error {
    Error::Decode {
        expected: "Tempo's OTLP JSON",
        reason: reason.into(),
    }
}

/// The trace ids of a search answer (`{"traces": [{"traceID": ...}]}`).
pub fn search_ids(v: &Value) -> Result<Vec<String>, Error> {
    let traces = v
        .get("traces")
        .and_then(Value::as_array)
        .ok_or_else(|| decode_err("no `traces` array in the search answer"))?;
    Ok(traces
        .iter()
        .filter_map(|t| normal_id(t.get("traceID")?.as_str()?, 32))
        .collect())
}

/// An OTLP JSON value (`{"stringValue": ...}`, `{"intValue": "42"}`) as text.
fn any_value(v: &Value) -> Option<String> {
    let (_, inner) = v.as_object()?.iter().next()?;
    Some(match inner {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

fn attribute(attrs: Option<&Value>, key: &str) -> Option<String> {
    attrs?
        .as_array()?
        .iter()
        .find(|kv| kv.get("key").and_then(Value::as_str) == Some(key))
        .and_then(|kv| any_value(kv.get("value")?))
}

fn nanos(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        n => n.as_u64(),
    }
}

/// The spans of a trace in OTLP JSON: Tempo's `{"batches": [...]}`, its v2
/// `{"trace": {"resourceSpans": [...]}}`, or plain `{"resourceSpans": ...}`.
pub fn trace(v: &Value) -> Result<Trace, Error> {
    let v = v.get("trace").unwrap_or(v);
    let batches = v
        .get("batches")
        .or_else(|| v.get("resourceSpans"))
        .and_then(Value::as_array)
        .ok_or_else(|| decode_err("no `batches` or `resourceSpans`"))?;
    let mut out = Vec::new();
    for rs in batches {
        let service = attribute(
            rs.get("resource").and_then(|r| r.get("attributes")),
            "service.name",
        )
        .unwrap_or_default();
        let scopes = rs
            .get("scopeSpans")
            .or_else(|| rs.get("instrumentationLibrarySpans"))
            .and_then(Value::as_array);
        for scope in scopes.into_iter().flatten() {
            let spans = scope.get("spans").and_then(Value::as_array);
            for s in spans.into_iter().flatten() {
                if let Some(span) = span(s, &service) {
                    out.push(span);
                }
            }
        }
    }
    Ok(out)
}

fn span(s: &Value, service: &str) -> Option<StoredSpan> {
    let attrs = s.get("attributes");
    let kind = match s.get("kind") {
        Some(Value::String(k)) => match k.trim_start_matches("SPAN_KIND_") {
            "SERVER" => Kind::Server,
            "CLIENT" => Kind::Client,
            _ => Kind::Other,
        },
        Some(Value::Number(n)) => match n.as_u64() {
            Some(2) => Kind::Server,
            Some(3) => Kind::Client,
            _ => Kind::Other,
        },
        _ => Kind::Other,
    };
    let start = UNIX_EPOCH + Duration::from_nanos(nanos(s.get("startTimeUnixNano"))?);
    let end = nanos(s.get("endTimeUnixNano"))
        .map(|n| UNIX_EPOCH + Duration::from_nanos(n))
        .unwrap_or(start);
    Some(StoredSpan {
        trace_id: normal_id(s.get("traceId")?.as_str()?, 32)?,
        span_id: normal_id(s.get("spanId")?.as_str()?, 16)?,
        parent_span_id: s
            .get("parentSpanId")
            .and_then(Value::as_str)
            .and_then(|p| normal_id(p, 16)),
        service: service.to_owned(),
        kind,
        name: s
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        start,
        end,
        synthetic: attribute(attrs, "tracegap.synthetic").as_deref() == Some("true"),
        peer: PEER_ADDRESS
            .iter()
            .find_map(|k| attribute(attrs, k)?.parse().ok()),
        peer_port: PEER_PORT
            .iter()
            .find_map(|k| attribute(attrs, k)?.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tempo_trace_is_read_from_base64_ids_and_string_nanos() {
        // As Tempo 2.x answers /api/traces/{id} with Accept: application/json.
        let v: Value = serde_json::from_str(
            r#"{"batches":[{"resource":{"attributes":[
                 {"key":"service.name","value":{"stringValue":"service-c"}}]},
               "scopeSpans":[{"scope":{"name":"x"},"spans":[
                 {"traceId":"S/kvNXezTaajzpKdDg5HNg==","spanId":"t61rcWkgMzE=","parentSpanId":"",
                  "name":"GET /inventory/42","kind":"SPAN_KIND_SERVER",
                  "startTimeUnixNano":"1700000000001000000","endTimeUnixNano":"1700000000004000000",
                  "attributes":[{"key":"client.address","value":{"stringValue":"10.0.0.2"}},
                                {"key":"network.peer.port","value":{"intValue":"41000"}}]}]}]}]}"#,
        )
        .unwrap();
        let t = trace(&v).unwrap();
        assert_eq!(t.len(), 1);
        let s = &t[0];
        assert_eq!(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.span_id, "b7ad6b7169203331");
        assert_eq!(s.parent_span_id, None);
        assert_eq!(s.service, "service-c");
        assert_eq!(s.kind, Kind::Server);
        assert_eq!(s.peer, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(s.peer_port, Some(41000));
        assert!(!s.synthetic);
        assert_eq!(
            s.end.duration_since(s.start).unwrap(),
            Duration::from_millis(3)
        );
        // v2's envelope, hex ids and numeric kinds.
        let v2 = serde_json::json!({"trace": {"resourceSpans": [{"resource": {"attributes": []},
            "scopeSpans": [{"spans": [{"traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
            "spanId": "b7ad6b7169203331", "parentSpanId": "00f067aa0ba902b7", "kind": 3,
            "startTimeUnixNano": 5u64, "endTimeUnixNano": 6u64}]}]}]}});
        let t = trace(&v2).unwrap();
        assert_eq!(t[0].kind, Kind::Client);
        assert_eq!(t[0].parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(
            search_ids(
                &serde_json::json!({"traces": [{"traceID": "af7651916cd43dd8448eb211c80319c"}]})
            )
            .unwrap(),
            vec!["0af7651916cd43dd8448eb211c80319c".to_owned()]
        );
        assert!(trace(&serde_json::json!({"nope": 1})).is_err());
    }
}
