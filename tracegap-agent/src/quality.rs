//! Jaeger's Trace Quality page, fed by tracegap: the UI's `TQualityMetrics`
//! (scores, metrics with pass and failure counts and example traces,
//! details tables) computed from the per-edge report for one service.
//! Jaeger itself never implemented this API; its UI calls
//! `GET <qualityMetrics.apiEndpoint>?service=&hours=`.

use serde_json::{Value, json};

use crate::report::{Edge, Report};

/// Where the page's "documentation" links point.
pub const DOCS: &str = "https://example.invalid/tracegap#finding-gaps-tracegap-run";

/// One metric before it becomes JSON.
struct Metric {
    name: &'static str,
    category: &'static str,
    description: &'static str,
    weight: f64,
    pass: u64,
    fail: u64,
    exempt: u64,
    /// Trace ids of failing hops, most telling first.
    examples: Vec<String>,
    /// Edges with failures: (source, destination, requests, failures,
    /// what would close them).
    rows: Vec<(String, String, u64, u64, String)>,
}

fn kind(e: &Edge, k: &str) -> u64 {
    e.kinds.get(k).copied().unwrap_or(0)
}

/// A metric over `edges`, failing on the gap kinds `failing` and exempting
/// `exempt` (hops that cannot pass or fail, e.g. unsampled ones).
fn metric(
    (name, category, description, weight): (&'static str, &'static str, &'static str, f64),
    edges: &[&Edge],
    failing: &[&str],
    exempt: &[&str],
) -> Metric {
    let mut m = Metric {
        name,
        category,
        description,
        weight,
        pass: 0,
        fail: 0,
        exempt: 0,
        examples: Vec::new(),
        rows: Vec::new(),
    };
    for e in edges {
        let fail: u64 = failing.iter().map(|k| kind(e, k)).sum();
        let ex: u64 = exempt.iter().map(|k| kind(e, k)).sum();
        m.fail += fail;
        m.exempt += ex;
        m.pass += e.requests.saturating_sub(fail + ex);
        if fail > 0 {
            let fix = failing
                .iter()
                .filter(|k| kind(e, k) > 0)
                .find_map(|k| e.fixes.get(*k))
                .cloned()
                .unwrap_or_default();
            m.rows.push((
                e.source.clone(),
                e.destination.clone(),
                e.requests,
                fail,
                fix,
            ));
            for k in failing {
                if let Some(t) = e.examples.get(*k)
                    && !m.examples.contains(t)
                {
                    m.examples.push(t.clone());
                }
            }
        }
    }
    m
}

fn examples(ids: &[String]) -> Value {
    json!(
        ids.iter()
            .take(5)
            .map(|t| json!({"traceID": t}))
            .collect::<Vec<_>>()
    )
}

impl Metric {
    fn json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "category": self.category,
            "description": self.description,
            "metricDocumentationLink": DOCS,
            "metricWeight": self.weight,
            "passCount": self.pass,
            "failureCount": self.fail,
            "failureExamples": examples(&self.examples),
            "exemptionCount": self.exempt,
        });
        if !self.rows.is_empty() {
            v["details"] = json!([{
                "header": "Edges with failures",
                "columns": [
                    {"key": "source", "label": "Caller"},
                    {"key": "destination", "label": "Callee"},
                    {"key": "requests", "label": "Requests"},
                    {"key": "failures", "label": "Failing"},
                    {"key": "fix", "label": "What would close it"},
                ],
                "rows": self.rows.iter().map(|(s, d, r, f, fix)| json!({
                    "source": s, "destination": d, "requests": r, "failures": f, "fix": fix,
                })).collect::<Vec<_>>(),
            }]);
        }
        v
    }
}

/// The Trace Quality page of `service`, from `report`. `scope` says what
/// the counts cover (e.g. "since this agent started on node-1").
pub fn quality_metrics(report: &Report, service: &str, scope: &str) -> Value {
    let calls: Vec<&Edge> = report
        .edges
        .iter()
        .filter(|e| e.source == service)
        .collect();
    let called: Vec<&Edge> = report
        .edges
        .iter()
        .filter(|e| e.destination == service)
        .collect();
    let both: Vec<&Edge> = report
        .edges
        .iter()
        .filter(|e| e.source == service || e.destination == service)
        .collect();
    let metrics = [
        metric(
            (
                "Context propagated out",
                "propagation",
                "Calls this service makes carry the trace context it received \
                 (failing: broken propagation, no context at all).",
                1.0,
            ),
            &calls,
            &["broken_propagation", "missing_context"],
            &["unreadable"],
        ),
        metric(
            (
                "Context received",
                "propagation",
                "Calls to this service arrive with a trace context.",
                1.0,
            ),
            &called,
            &["missing_context", "broken_propagation"],
            &["unreadable"],
        ),
        metric(
            (
                "Context well-formed",
                "propagation",
                "Trace context headers parse, and caller and callee speak the same \
                 format (W3C, B3, Jaeger).",
                0.5,
            ),
            &both,
            &["malformed_context", "format_mismatch"],
            &["unreadable"],
        ),
        metric(
            (
                "Sampling consistent",
                "sampling",
                "The sampled flag is honoured along the call (unsampled hops are exempt).",
                0.5,
            ),
            &both,
            &["sampling_inconsistent"],
            &["unsampled", "unreadable"],
        ),
        metric(
            (
                "Instrumented callee",
                "instrumentation",
                "The called service records its own span (failing: known uninstrumented, \
                 or it forwards context without a span of its own).",
                1.0,
            ),
            &called,
            &["uninstrumented", "passthrough"],
            &["unreadable"],
        ),
    ];
    let mut baggage = Metric {
        name: "Baggage carried",
        category: "propagation",
        description: "Baggage this service received is passed on to its callees.",
        weight: 0.25,
        pass: calls.iter().map(|e| e.baggage_carried).sum(),
        fail: calls.iter().map(|e| e.baggage_dropped).sum(),
        exempt: 0,
        examples: Vec::new(),
        rows: Vec::new(),
    };
    for e in calls.iter().filter(|e| e.baggage_dropped > 0) {
        baggage.rows.push((
            e.source.clone(),
            e.destination.clone(),
            e.requests,
            e.baggage_dropped,
            "the caller drops the baggage it receives: propagate baggage with the context (OTEL_PROPAGATORS=tracecontext,baggage)".to_owned(),
        ));
    }
    // Checked against the trace store (with --trace-store): the service's
    // own spans for sampled requests into it.
    let mut stored = Metric {
        name: "Spans reach the trace store",
        category: "instrumentation",
        description: "For sampled requests into this service, its own span is in the trace \
                      store under the caller's (failing: in a trace of its own, lost between \
                      the service and the store, never exported, or not recorded at all).",
        weight: 1.0,
        pass: 0,
        fail: 0,
        exempt: 0,
        examples: Vec::new(),
        rows: Vec::new(),
    };
    for c in report
        .callee_spans
        .iter()
        .filter(|c| c.destination == service)
    {
        let fail = c.new_trace + c.lost_in_pipeline + c.not_exported + c.uninstrumented;
        stored.pass += c.arrived;
        stored.fail += fail;
        if fail > 0 {
            stored.rows.push((
                c.source.clone(),
                c.destination.clone(),
                c.arrived + fail,
                fail,
                String::new(),
            ));
            if let Some(t) = &c.example
                && !stored.examples.contains(t)
            {
                stored.examples.push(t.clone());
            }
        }
    }
    // Not scored: encryption is no fault of the service's, but what it
    // hides from every other figure here is said.
    let mut readable = Metric {
        name: "Readable on the wire",
        category: "visibility",
        description: "Connections to or from this service whose requests tracegap reads \
                      (passing: hops read; failing: TLS connections it saw start and cannot \
                      see inside, whose requests are in no other figure on this page).",
        weight: 0.0,
        pass: 0,
        fail: 0,
        exempt: 0,
        examples: Vec::new(),
        rows: Vec::new(),
    };
    for e in report
        .encrypted
        .iter()
        .filter(|e| e.source == service || e.destination == service)
    {
        readable.fail += e.connections;
        readable.rows.push((
            e.source.clone(),
            e.destination.clone(),
            e.connections,
            e.connections,
            "read through OpenSSL only: a TLS stack no probe reads".to_owned(),
        ));
    }
    if readable.fail > 0 {
        readable.pass = both.iter().map(|e| e.requests).sum();
    }
    let scores: Vec<Value> = [
        ("propagation", "Context propagation"),
        ("sampling", "Sampling"),
        ("instrumentation", "Instrumentation"),
    ]
    .iter()
    .map(|(key, label)| {
        let (mut got, mut max) = (0.0, 0.0);
        for m in metrics
            .iter()
            .chain([&baggage, &stored])
            .filter(|m| m.category == *key)
        {
            let judged = m.pass + m.fail;
            if judged > 0 {
                got += m.weight * m.pass as f64 / judged as f64;
                max += m.weight;
            }
        }
        let value = if max > 0.0 {
            (100.0 * got / max).round()
        } else {
            100.0
        };
        json!({"key": key, "label": label, "max": 100, "value": value})
    })
    .collect();
    let hops: u64 = both.iter().map(|e| e.requests).sum();
    let blind = if readable.fail > 0 {
        format!(
            " It also saw {} TLS connections it cannot see inside (\"Readable on the wire\").",
            readable.fail
        )
    } else {
        String::new()
    };
    json!({
        "traceQualityDocumentationLink": DOCS,
        "bannerText": format!(
            "tracegap saw {hops} hops to or from {service} on the wire, {scope}.{blind} \
             Failing examples open the traces, with tracegap's synthetic spans where the gaps are."
        ),
        "scores": scores,
        "metrics": metrics
            .iter()
            .chain([&baggage, &stored, &readable])
            .filter(|m| m.pass + m.fail + m.exempt > 0)
            .map(Metric::json)
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(source: &str, destination: &str, requests: u64, kinds: &[(&str, u64)]) -> Edge {
        Edge {
            source: source.into(),
            destination: destination.into(),
            requests,
            kinds: kinds.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            examples: kinds
                .iter()
                .map(|(k, _)| (k.to_string(), format!("trace-{source}-{k}")))
                .collect(),
            ..Edge::default()
        }
    }

    fn metric_named<'a>(v: &'a Value, name: &str) -> &'a Value {
        v["metrics"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .expect("the metric")
    }

    #[test]
    fn a_service_that_drops_the_context_fails_propagation_with_an_example() {
        let report = Report {
            callee_spans: Vec::new(),
            services: Vec::new(),
            encrypted: Vec::new(),
            edges: vec![
                edge("service-a", "service-b", 10, &[("context_ok", 10)]),
                edge(
                    "service-b",
                    "service-c",
                    10,
                    &[("broken_propagation", 4), ("context_ok", 6)],
                ),
            ],
            overflow_hops: 0,
        };
        let b = quality_metrics(&report, "service-b", "in a test");
        let out = metric_named(&b, "Context propagated out");
        assert_eq!(
            (out["passCount"].as_u64(), out["failureCount"].as_u64()),
            (Some(6), Some(4))
        );
        assert_eq!(
            out["failureExamples"][0]["traceID"],
            "trace-service-b-broken_propagation"
        );
        assert_eq!(out["details"][0]["rows"][0]["destination"], "service-c");
        let received = metric_named(&b, "Context received");
        assert_eq!(received["failureCount"], 0);
        assert_eq!(received["passCount"], 10);
        let score = |key: &str| {
            b["scores"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["key"] == key))
                .map(|s| s["value"].clone())
        };
        assert!(
            score("propagation")
                .and_then(|v| v.as_f64())
                .is_some_and(|v| v < 100.0)
        );
        assert_eq!(score("instrumentation"), Some(json!(100.0)));
        // service-a only sees clean hops.
        let a = quality_metrics(&report, "service-a", "in a test");
        assert_eq!(
            metric_named(&a, "Context propagated out")["failureCount"],
            0
        );
        assert!(
            b["bannerText"]
                .as_str()
                .is_some_and(|t| t.contains("20 hops"))
        );
    }

    #[test]
    fn spans_lost_on_the_way_to_the_store_fail_the_callee_with_the_trace_as_example() {
        let report = Report {
            callee_spans: vec![crate::report::CalleeSpans {
                source: "service-a".into(),
                destination: "service-b".into(),
                arrived: 7,
                lost_in_pipeline: 3,
                example: Some("lost-trace".into()),
                ..Default::default()
            }],
            services: Vec::new(),
            encrypted: Vec::new(),
            edges: vec![edge("service-a", "service-b", 10, &[("context_ok", 10)])],
            overflow_hops: 0,
        };
        let b = quality_metrics(&report, "service-b", "in a test");
        let m = metric_named(&b, "Spans reach the trace store");
        assert_eq!(
            (m["passCount"].as_u64(), m["failureCount"].as_u64()),
            (Some(7), Some(3))
        );
        assert_eq!(m["failureExamples"][0]["traceID"], "lost-trace");
        // Only the callee is judged by it.
        let a = quality_metrics(&report, "service-a", "in a test");
        assert!(a["metrics"].as_array().is_some_and(|ms| {
            ms.iter()
                .all(|m| m["name"] != "Spans reach the trace store")
        }));
    }

    #[test]
    fn unsampled_hops_are_exempt_and_an_unknown_service_scores_nothing_against_it() {
        let report = Report {
            callee_spans: Vec::new(),
            services: Vec::new(),
            encrypted: Vec::new(),
            edges: vec![edge(
                "a",
                "b",
                5,
                &[("unsampled", 2), ("sampling_inconsistent", 1)],
            )],
            overflow_hops: 0,
        };
        let a = quality_metrics(&report, "a", "test");
        let s = metric_named(&a, "Sampling consistent");
        assert_eq!(
            (
                s["passCount"].as_u64(),
                s["failureCount"].as_u64(),
                s["exemptionCount"].as_u64()
            ),
            (Some(2), Some(1), Some(2))
        );
        let none = quality_metrics(&report, "nobody", "test");
        assert!(
            none["scores"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["value"] == 100.0))
        );
    }

    #[test]
    fn encrypted_connections_are_said_on_the_page_and_not_scored() {
        let report = Report {
            edges: vec![edge("a", "b", 4, &[("context_ok", 4)])],
            encrypted: vec![crate::report::EncryptedEdge {
                source: "a".into(),
                destination: "vault".into(),
                connections: 3,
                ..Default::default()
            }],
            ..Report::default()
        };
        let v = quality_metrics(&report, "a", "last hour");
        let m = metric_named(&v, "Readable on the wire");
        assert_eq!(m["passCount"], 4);
        assert_eq!(m["failureCount"], 3);
        assert!(
            v["bannerText"]
                .as_str()
                .unwrap_or("")
                .contains("3 TLS connections")
        );
        // Propagation stays 100: the TLS is no fault of the service's.
        assert!(
            v["scores"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["value"] == 100.0))
        );
        // A service with no encrypted edge has no such metric.
        let v = quality_metrics(&report, "b", "last hour");
        assert!(
            v["metrics"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m["name"] != "Readable on the wire"))
        );
    }
}
