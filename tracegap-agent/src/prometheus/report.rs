//! The report of the whole cluster over a window, from the agents' per-edge
//! counters: `tracegap_http_requests_total` (requests by context status and
//! format), `tracegap_callee_spans_total` (whether callees' spans reached
//! the store) and `tracegap_tls_unread_connections_total` (edges tracegap
//! cannot see inside), each summed across nodes ([`super::counts`]).
//! Example traces come from the gaps' exemplars (the latest per edge and
//! kind, where Prometheus keeps exemplars). What only an agent's memory
//! holds is left out: latencies and unanswered requests (not counted per
//! edge), the services' learned instrumentation.

use std::{collections::BTreeMap, time::Duration, time::SystemTime};

use super::{Error, Prometheus, counts::over_window};
use crate::report::{CalleeSpans, Edge, EncryptedEdge, Report};

/// Context statuses whose hops carried no valid context.
const NO_CONTEXT: &[&str] = &[
    "missing_context",
    "broken_propagation",
    "malformed_context",
    "unreadable",
];

const SOURCE: &str = "source_service";
const DESTINATION: &str = "destination_service";

fn edge_of(l: &BTreeMap<String, String>) -> (String, String) {
    let get = |k: &str| l.get(k).cloned().unwrap_or_default();
    (get(SOURCE), get(DESTINATION))
}

/// The cluster's report: every edge's hops in the `window` before `at`.
pub async fn cluster_report(
    prom: &Prometheus,
    window: Duration,
    at: SystemTime,
) -> Result<Report, Error> {
    let requests = over_window(
        prom,
        "tracegap_http_requests_total",
        &[SOURCE, DESTINATION, "context_status", "context_format"],
        window,
        at,
    )
    .await?;
    let callee = over_window(
        prom,
        "tracegap_callee_spans_total",
        &[SOURCE, DESTINATION, "outcome"],
        window,
        at,
    )
    .await?;
    let tls = over_window(
        prom,
        "tracegap_tls_unread_connections_total",
        &[SOURCE, DESTINATION, "server_name"],
        window,
        at,
    )
    .await?;
    let mut report = assemble(&requests, &callee, &tls);
    let start = at.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
    let exemplars = prom.exemplars("tracegap_gaps_total", start, at).await?;
    examples(&mut report, &exemplars);
    Ok(report)
}

/// Each edge's example trace per gap kind: the latest exemplar of its
/// gaps series (on any node).
pub fn examples(report: &mut Report, series: &[super::SeriesExemplars]) {
    let mut latest: BTreeMap<(String, String, String), (f64, String)> = BTreeMap::new();
    for s in series {
        let (src, dst) = edge_of(&s.labels);
        let kind = s.labels.get("kind").cloned().unwrap_or_default();
        for (labels, at) in &s.exemplars {
            let Some(trace) = labels.get("trace_id") else {
                continue;
            };
            let e = latest
                .entry((src.clone(), dst.clone(), kind.clone()))
                .or_insert((f64::MIN, String::new()));
            if *at >= e.0 {
                *e = (*at, trace.clone());
            }
        }
    }
    for edge in &mut report.edges {
        for ((src, dst, kind), (_, trace)) in &latest {
            if *src == edge.source && *dst == edge.destination {
                edge.examples.insert(kind.clone(), trace.clone());
            }
        }
    }
}

/// `tracegap report --prometheus URL`: the cluster's report over `window`,
/// as a table or (`json`) as `/report`'s JSON.
pub async fn print(
    url: &str,
    window: Duration,
    json: bool,
    access: &crate::remote::Access,
) -> anyhow::Result<()> {
    let prom = Prometheus::new(url, Duration::from_secs(30), access)?;
    let report = cluster_report(&prom, window, SystemTime::now()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::report::table(&report));
    }
    Ok(())
}

/// The report from the three counters' sums.
pub fn assemble(
    requests: &[(BTreeMap<String, String>, u64)],
    callee: &[(BTreeMap<String, String>, u64)],
    tls: &[(BTreeMap<String, String>, u64)],
) -> Report {
    let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
    let mut without = BTreeMap::<(String, String), (u64, u64)>::new();
    for (l, n) in requests {
        let key = edge_of(l);
        let e = edges.entry(key.clone()).or_insert_with(|| Edge {
            source: key.0.clone(),
            destination: key.1.clone(),
            ..Edge::default()
        });
        let status = l.get("context_status").cloned().unwrap_or_default();
        let format = l.get("context_format").cloned().unwrap_or_default();
        e.requests += n;
        *e.kinds.entry(status.clone()).or_default() += n;
        *e.formats.entry(format).or_default() += n;
        let (none, unsampled) = without.entry(key).or_default();
        if NO_CONTEXT.contains(&status.as_str()) {
            *none += n;
        }
        if status == "unsampled" {
            *unsampled += n;
        }
    }
    for (key, e) in &mut edges {
        let (none, unsampled) = without.get(key).copied().unwrap_or_default();
        let all = e.requests.max(1) as f64;
        e.valid_context_share = (e.requests - none.min(e.requests)) as f64 / all;
        e.unsampled_share = unsampled as f64 / all;
    }
    let mut spans: BTreeMap<(String, String), CalleeSpans> = BTreeMap::new();
    for (l, n) in callee {
        let key = edge_of(l);
        let c = spans.entry(key.clone()).or_insert_with(|| CalleeSpans {
            source: key.0.clone(),
            destination: key.1.clone(),
            ..CalleeSpans::default()
        });
        match l.get("outcome").map(String::as_str) {
            Some("arrived") => c.arrived += n,
            Some("new_trace") => c.new_trace += n,
            Some("lost_in_pipeline") => c.lost_in_pipeline += n,
            Some("not_exported") => c.not_exported += n,
            Some("unknown") => c.unknown += n,
            Some("not_checked") => c.not_checked += n,
            Some("uninstrumented") => c.uninstrumented += n,
            _ => {}
        }
    }
    let mut encrypted: BTreeMap<(String, String), EncryptedEdge> = BTreeMap::new();
    for (l, n) in tls {
        let key = edge_of(l);
        let e = encrypted
            .entry(key.clone())
            .or_insert_with(|| EncryptedEdge {
                source: key.0.clone(),
                destination: key.1.clone(),
                ..EncryptedEdge::default()
            });
        e.connections += n;
        *e.server_names
            .entry(l.get("server_name").cloned().unwrap_or_default())
            .or_default() += n;
    }
    Report {
        edges: edges.into_values().collect(),
        overflow_hops: 0,
        callee_spans: spans.into_values().collect(),
        services: Vec::new(),
        encrypted: encrypted.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn sums_become_edges_with_their_shares() {
        let ab = |status: &str, format: &str| {
            l(&[
                (SOURCE, "a"),
                (DESTINATION, "b"),
                ("context_status", status),
                ("context_format", format),
            ])
        };
        let r = assemble(
            &[
                (ab("context_ok", "w3c"), 6),
                (ab("missing_context", "none"), 3),
                (ab("unsampled", "w3c"), 1),
            ],
            &[(
                l(&[
                    (SOURCE, "a"),
                    (DESTINATION, "b"),
                    ("outcome", "lost_in_pipeline"),
                ]),
                2,
            )],
            &[(
                l(&[(SOURCE, "a"), (DESTINATION, "c"), ("server_name", "c.test")]),
                4,
            )],
        );
        let [e] = r.edges.as_slice() else {
            panic!("{:?}", r.edges)
        };
        assert_eq!(e.requests, 10);
        assert_eq!(e.kinds.get("missing_context"), Some(&3));
        assert_eq!(e.formats.get("w3c"), Some(&7));
        assert!((e.valid_context_share - 0.7).abs() < 1e-9);
        assert!((e.unsampled_share - 0.1).abs() < 1e-9);
        assert_eq!(r.callee_spans[0].lost_in_pipeline, 2);
        assert_eq!(r.encrypted[0].server_names.get("c.test"), Some(&4));
    }

    #[test]
    fn the_latest_exemplar_of_any_node_is_the_edges_example() {
        let mut r = assemble(
            &[(
                l(&[
                    (SOURCE, "b"),
                    (DESTINATION, "c"),
                    ("context_status", "broken_propagation"),
                    ("context_format", "none"),
                ]),
                3,
            )],
            &[],
            &[],
        );
        let gaps = |node: &str, trace: &str, at: f64| super::super::SeriesExemplars {
            labels: l(&[
                (SOURCE, "b"),
                (DESTINATION, "c"),
                ("kind", "broken_propagation"),
                ("instance", node),
            ]),
            exemplars: vec![(l(&[("trace_id", trace)]), at)],
        };
        examples(
            &mut r,
            &[
                gaps("n1", "aa", 10.0),
                gaps("n2", "bb", 12.0),
                gaps("n1", "cc", 11.0),
            ],
        );
        assert_eq!(
            r.edges[0]
                .examples
                .get("broken_propagation")
                .map(String::as_str),
            Some("bb")
        );
    }
}
