//! Jaeger's query API: `/api/traces/{id}` and `/api/traces?service=...`,
//! the HTTP JSON API Jaeger's UI calls (`data` holds the traces; each
//! span names its process, the process its service).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{FutureExt as _, future::BoxFuture};
use serde_json::Value;

use super::{
    Error, Http, Kind, PEER_ADDRESS, PEER_PORT, Search, StoreKind, StoredSpan, Trace, TraceStore,
    normal_id,
};

/// A Jaeger query service at a base URL.
pub struct Jaeger {
    http: Http,
    base: String,
}

impl Jaeger {
    pub(crate) fn new(http: Http, base: String) -> Self {
        Self { http, base }
    }
}

fn micros(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros()
}

impl TraceStore for Jaeger {
    fn kind(&self) -> StoreKind {
        StoreKind::Jaeger
    }

    fn trace<'a>(&'a self, trace_id: &'a str) -> BoxFuture<'a, Result<Option<Trace>, Error>> {
        async move {
            let url = format!("{}/api/traces/{trace_id}", self.base);
            let Some(v) = self.http.get_json(&url, "Jaeger's trace JSON").await? else {
                return Ok(None);
            };
            let traces = traces(&v)?;
            Ok(traces.into_iter().find(|t| !t.is_empty()))
        }
        .boxed()
    }

    fn search<'a>(&'a self, q: &'a Search) -> BoxFuture<'a, Result<Vec<Trace>, Error>> {
        async move {
            let url = format!(
                "{}/api/traces?{}",
                self.base,
                query(&[
                    ("service", &q.service),
                    ("start", &micros(q.start).to_string()),
                    ("end", &micros(q.end).to_string()),
                    ("limit", &q.limit.to_string()),
                    ("lookback", "custom"),
                ])
            );
            match self.http.get_json(&url, "Jaeger's search JSON").await? {
                Some(v) => traces(&v),
                None => Ok(Vec::new()),
            }
        }
        .boxed()
    }
}

/// A URL query string of `pairs`, each name and value encoded
/// (`application/x-www-form-urlencoded`, as query APIs decode it).
pub fn query(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn decode_err(reason: impl Into<String>) -> Error {
    Error::Decode {
        expected: "Jaeger's trace JSON",
        reason: reason.into(),
    }
}

/// The traces of a Jaeger API answer (`{"data": [trace, ...]}`).
pub fn traces(v: &Value) -> Result<Vec<Trace>, Error> {
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| decode_err("no `data` array"))?;
    Ok(data.iter().map(trace).collect())
}

fn tag<'v>(tags: Option<&'v Value>, key: &str) -> Option<&'v Value> {
    tags?
        .as_array()?
        .iter()
        .find(|t| t.get("key").and_then(Value::as_str) == Some(key))?
        .get("value")
}

fn tag_str(tags: Option<&Value>, key: &str) -> Option<String> {
    tag(tags, key).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

fn trace(t: &Value) -> Trace {
    let processes = t.get("processes");
    let Some(spans) = t.get("spans").and_then(Value::as_array) else {
        return Vec::new();
    };
    spans
        .iter()
        .filter_map(|s| {
            let trace_id = normal_id(s.get("traceID")?.as_str()?, 32)?;
            let span_id = normal_id(s.get("spanID")?.as_str()?, 16)?;
            // The parent: a CHILD_OF reference in this trace (OpenTelemetry
            // spans have one at most; links are FOLLOWS_FROM).
            let parent_span_id = s
                .get("references")
                .and_then(Value::as_array)
                .and_then(|refs| {
                    refs.iter().find(|r| {
                        r.get("refType").and_then(Value::as_str) == Some("CHILD_OF")
                            && r.get("traceID")
                                .and_then(Value::as_str)
                                .and_then(|t| normal_id(t, 32))
                                .as_deref()
                                == Some(trace_id.as_str())
                    })
                })
                .and_then(|r| normal_id(r.get("spanID")?.as_str()?, 16));
            let process = s
                .get("processID")
                .and_then(Value::as_str)
                .and_then(|p| processes?.get(p))
                .or_else(|| s.get("process"));
            let service = process
                .and_then(|p| p.get("serviceName"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let tags = s.get("tags");
            let kind = match tag_str(tags, "span.kind").as_deref() {
                Some("server") => Kind::Server,
                Some("client") => Kind::Client,
                _ => Kind::Other,
            };
            let start_us = s.get("startTime").and_then(Value::as_u64)?;
            let duration_us = s.get("duration").and_then(Value::as_u64).unwrap_or(0);
            let start = UNIX_EPOCH + Duration::from_micros(start_us);
            let synthetic = matches!(tag(tags, "tracegap.synthetic"), Some(Value::Bool(true)))
                || tag_str(tags, "tracegap.synthetic").as_deref() == Some("true");
            Some(StoredSpan {
                trace_id,
                span_id,
                parent_span_id,
                service,
                kind,
                name: s
                    .get("operationName")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                start,
                end: start + Duration::from_micros(duration_us),
                synthetic,
                peer: PEER_ADDRESS
                    .iter()
                    .find_map(|k| tag_str(tags, k)?.parse().ok()),
                peer_port: PEER_PORT
                    .iter()
                    .find_map(|k| tag_str(tags, k)?.parse().ok()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jaeger_trace_is_read_with_parents_services_kinds_and_peers() {
        let v: Value = serde_json::from_str(
            r#"{"data":[{"traceID":"4bf92f3577b34da6a3ce929d0e0e4736","spans":[
              {"traceID":"4bf92f3577b34da6a3ce929d0e0e4736","spanID":"00f067aa0ba902b7",
               "operationName":"GET /checkout","references":[],"startTime":1700000000000000,
               "duration":5000,"tags":[{"key":"span.kind","type":"string","value":"client"}],
               "processID":"p1"},
              {"traceID":"4bf92f3577b34da6a3ce929d0e0e4736","spanID":"b7ad6b7169203331",
               "operationName":"GET /checkout","references":[
                 {"refType":"FOLLOWS_FROM","traceID":"0af7651916cd43dd8448eb211c80319c","spanID":"1111111111111111"},
                 {"refType":"CHILD_OF","traceID":"4bf92f3577b34da6a3ce929d0e0e4736","spanID":"00f067aa0ba902b7"}],
               "startTime":1700000000001000,"duration":3000,
               "tags":[{"key":"span.kind","type":"string","value":"server"},
                       {"key":"network.peer.address","type":"string","value":"10.0.0.1"},
                       {"key":"network.peer.port","type":"int64","value":40000},
                       {"key":"tracegap.synthetic","type":"bool","value":true}],
               "processID":"p2"}],
              "processes":{"p1":{"serviceName":"service-a","tags":[]},"p2":{"serviceName":"service-b","tags":[]}}}],
             "total":0,"limit":0,"offset":0,"errors":null}"#,
        )
        .unwrap();
        let t = &traces(&v).unwrap()[0];
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].service, "service-a");
        assert_eq!(t[0].kind, Kind::Client);
        assert_eq!(t[0].parent_span_id, None);
        assert!(!t[0].synthetic);
        let b = &t[1];
        assert_eq!(b.service, "service-b");
        assert_eq!(b.kind, Kind::Server);
        // The CHILD_OF in its own trace, not the link.
        assert_eq!(b.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(b.peer, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(b.peer_port, Some(40000));
        assert!(b.synthetic);
        assert_eq!(
            b.end.duration_since(b.start).unwrap(),
            Duration::from_millis(3)
        );
        assert!(traces(&serde_json::json!({"errors": ["nope"]})).is_err());
        assert_eq!(
            query(&[("service", "svc a/b"), ("tags", "{\"k\":\"v\"}")]),
            "service=svc+a%2Fb&tags=%7B%22k%22%3A%22v%22%7D"
        );
    }
}
