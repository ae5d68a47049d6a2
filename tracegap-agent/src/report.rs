//! The per-edge gap report: what `/report` serves and `tracegap report`
//! prints. An edge is (source service, destination service).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub use crate::reconcile::learned::ServiceStatus;
use crate::{
    events::Endpoint,
    gap::{GapKind, Hop, Verdict},
    http::context::HexId,
};

/// An edge's key borrowed: a map keyed by owned names looked up with
/// borrowed ones (the `Borrow` a tuple of Strings lacks).
trait EdgeKey {
    fn key(&self) -> (&str, &str);
}

impl EdgeKey for (String, String) {
    fn key(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl EdgeKey for (&str, &str) {
    fn key(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn EdgeKey + 'a> for (String, String) {
    fn borrow(&self) -> &(dyn EdgeKey + 'a) {
        self
    }
}

impl PartialEq for dyn EdgeKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn EdgeKey + '_ {}

impl PartialOrd for dyn EdgeKey + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn EdgeKey + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// Latency samples kept per edge (the most recent ones).
pub const LATENCY_SAMPLES: usize = 1024;
/// Edges tracked at most; hops on further edges count in `overflow_hops`.
pub const MAX_EDGES: usize = 4096;
/// Service addresses listed per edge at most.
pub const MAX_VIA: usize = 8;

#[derive(Default)]
struct EdgeStats {
    requests: u64,
    valid_context: u64,
    unsampled: u64,
    unanswered: u64,
    kinds: BTreeMap<GapKind, u64>,
    /// Inline ids: a hop replaces its kind's example without allocating.
    examples: BTreeMap<GapKind, HexId<32>>,
    fixes: BTreeMap<GapKind, String>,
    formats: BTreeMap<String, u64>,
    baggage_carried: u64,
    baggage_dropped: u64,
    latencies_us: VecDeque<u64>,
    via: BTreeSet<Endpoint>,
}

/// The report's view of one edge.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    /// Service addresses (ClusterIP:port) the source called the destination
    /// through; empty when it called the pod directly.
    #[serde(default)]
    pub via: Vec<String>,
    /// The node whose agent reported the edge (None: a standalone agent).
    #[serde(default)]
    pub node: Option<String>,
    pub requests: u64,
    /// Share of requests that carried a valid context (0..=1).
    pub valid_context_share: f64,
    /// Share of requests whose context said "not sampled".
    pub unsampled_share: f64,
    pub unanswered: u64,
    /// Hops per classification.
    pub kinds: BTreeMap<String, u64>,
    /// Most recent trace id per gap kind: the synthetic span's trace when
    /// one was exported, else the trace the request carried.
    pub examples: BTreeMap<String, String>,
    /// Per gap kind, what would close it, from the latest such hop (see
    /// [`crate::gap::fix`]).
    #[serde(default)]
    pub fixes: BTreeMap<String, String>,
    pub formats: BTreeMap<String, u64>,
    pub baggage_carried: u64,
    pub baggage_dropped: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Whether the callees of one edge recorded their own spans: hops whose
/// callee should have (instrumented, sent a sampled context it reads),
/// checked against the trace store after the settle delay by the agent on
/// the callee's node, which sees the callee's own exports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CalleeSpans {
    pub source: String,
    pub destination: String,
    #[serde(default)]
    pub node: Option<String>,
    /// The callee's span is in the trace, under the span the caller sent.
    pub arrived: u64,
    /// The callee's span is in a trace of its own: it did not read the
    /// context it was sent.
    pub new_trace: u64,
    /// The callee exported (its OTLP request was seen) and the span never
    /// arrived: lost between the service and the store.
    pub lost_in_pipeline: u64,
    /// No export from the callee was seen: it never sent the span.
    pub not_exported: u64,
    /// The facts disagree: the collector took the callee's exports (2xx)
    /// and the span is not in the store. Neither a gap nor a finding.
    #[serde(default)]
    pub unknown: u64,
    /// The trace store could not be asked in time (away, or its query
    /// rate spent for longer than a settle delay): nothing known.
    #[serde(default)]
    pub not_checked: u64,
    /// Nobody declared the callee and it shows no sign of recording spans
    /// (nothing of it in the store around the request, no export from
    /// it): tracegap's span stands in for its own.
    #[serde(default)]
    pub uninstrumented: u64,
    /// For lost and unknown spans: the collector's answers to the callee's exports
    /// (`503`, `no answer`, ...) and how often.
    pub export_answers: BTreeMap<String, u64>,
    /// The most recent trace missing the callee's span.
    pub example: Option<String>,
}

/// Connections on one edge that tracegap saw start (a TLS ClientHello)
/// and cannot read: encrypted, so none of their requests is a hop.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EncryptedEdge {
    pub source: String,
    pub destination: String,
    #[serde(default)]
    pub node: Option<String>,
    pub connections: u64,
    /// Server names asked for (SNI; `""`: none sent), at most
    /// [`MAX_NAMES`] of them; the rest under `"_other"`.
    pub server_names: BTreeMap<String, u64>,
    /// Protocols offered (ALPN, e.g. `h2` for gRPC over TLS), joined by `,`.
    pub alpn: BTreeMap<String, u64>,
}

/// Server names (and ALPN offers) listed per encrypted edge at most.
pub const MAX_NAMES: usize = 8;

/// The whole report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub edges: Vec<Edge>,
    pub overflow_hops: u64,
    /// Per edge, whether callees' spans reached the store (with a trace
    /// store to ask: `--trace-store`).
    #[serde(default)]
    pub callee_spans: Vec<CalleeSpans>,
    /// Per service, its instrumentation as learned.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Per edge, the TLS connections tracegap cannot see inside.
    #[serde(default)]
    pub encrypted: Vec<EncryptedEdge>,
}

/// Collects hops into per-edge statistics.
#[derive(Default)]
pub struct Reporter {
    edges: BTreeMap<(String, String), EdgeStats>,
    callee_spans: BTreeMap<(String, String), CalleeSpans>,
    encrypted: BTreeMap<(String, String), EncryptedEdge>,
    /// Set by reconciliation as it learns.
    pub services: Vec<ServiceStatus>,
    overflow_hops: u64,
    /// This agent's node, written on every edge.
    pub node: Option<String>,
}

fn quantile(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)] as f64 / 1000.0)
}

impl Reporter {
    /// Records what the store holds of a callee's span for one hop;
    /// `answer`: the collector's answer to the callee's export, for a lost
    /// span; `trace`: the hop's trace.
    pub fn callee_span(
        &mut self,
        source: &str,
        destination: &str,
        outcome: crate::reconcile::Outcome,
        answer: Option<&str>,
        trace: &str,
    ) {
        use crate::reconcile::Outcome;
        let key = (source.to_owned(), destination.to_owned());
        if !self.callee_spans.contains_key(&key) && self.callee_spans.len() >= MAX_EDGES {
            return;
        }
        let c = self.callee_spans.entry(key).or_insert_with(|| CalleeSpans {
            source: source.to_owned(),
            destination: destination.to_owned(),
            ..Default::default()
        });
        match outcome {
            Outcome::Arrived => c.arrived += 1,
            Outcome::NewTrace => c.new_trace += 1,
            Outcome::LostInPipeline => c.lost_in_pipeline += 1,
            Outcome::NotExported => c.not_exported += 1,
            Outcome::Unknown => c.unknown += 1,
            Outcome::NotChecked => c.not_checked += 1,
            Outcome::Uninstrumented => c.uninstrumented += 1,
        }
        if let Some(a) = answer {
            *c.export_answers.entry(a.to_owned()).or_default() += 1;
        }
        if !matches!(outcome, Outcome::Arrived | Outcome::NotChecked) {
            c.example = Some(trace.to_owned());
        }
    }

    /// Records one classified hop; `trace` is the example trace id for it.
    pub fn record(
        &mut self,
        source: &str,
        destination: &str,
        hop: &Hop,
        verdict: &Verdict,
        format: &str,
        trace: Option<HexId<32>>,
    ) {
        // Looked up by reference: a known edge's hop builds no key.
        let key = (source, destination);
        if !self.edges.contains_key(&key as &dyn EdgeKey) {
            if self.edges.len() >= MAX_EDGES {
                self.overflow_hops += 1;
                return;
            }
            self.edges.insert(
                (source.to_owned(), destination.to_owned()),
                EdgeStats::default(),
            );
        }
        let Some(e) = self.edges.get_mut(&key as &dyn EdgeKey) else {
            return;
        };
        e.requests += 1;
        if hop.context().is_some() {
            e.valid_context += 1;
        }
        if verdict.kind == GapKind::Unsampled {
            e.unsampled += 1;
        }
        if hop.unanswered {
            e.unanswered += 1;
        } else {
            if e.latencies_us.len() >= LATENCY_SAMPLES {
                e.latencies_us.pop_front();
            }
            e.latencies_us.push_back(hop.duration().as_micros() as u64);
        }
        *e.kinds.entry(verdict.kind).or_default() += 1;
        if let Some(t) = trace {
            e.examples.insert(verdict.kind, t);
        }
        // A fix is a gap's (a healthy hop has none to look for).
        if verdict.kind.is_gap()
            && let Some(f) = hop.fix(
                verdict.kind,
                verdict.link.as_ref().map(|l| l.context.format),
            )
        {
            e.fixes.insert(verdict.kind, f);
        }
        match e.formats.get_mut(format) {
            Some(n) => *n += 1,
            None => {
                e.formats.insert(format.to_owned(), 1);
            }
        }
        if let Some(via) = hop.via
            && e.via.len() < MAX_VIA
        {
            e.via.insert(via);
        }
        if verdict.baggage_dropped {
            e.baggage_dropped += 1;
        } else if hop.propagation().baggage.is_some() {
            e.baggage_carried += 1;
        }
    }

    /// Counts a TLS connection on its edge: `server_name` from its
    /// ClientHello, `alpn` its offers joined by `,`.
    pub fn encrypted(&mut self, source: &str, destination: &str, server_name: &str, alpn: &str) {
        let key = (source.to_owned(), destination.to_owned());
        if !self.encrypted.contains_key(&key) && self.encrypted.len() >= MAX_EDGES {
            self.overflow_hops += 1;
            return;
        }
        let e = self.encrypted.entry(key).or_insert_with(|| EncryptedEdge {
            source: source.to_owned(),
            destination: destination.to_owned(),
            ..EncryptedEdge::default()
        });
        e.connections += 1;
        for (map, key) in [(&mut e.server_names, server_name), (&mut e.alpn, alpn)] {
            let key = if map.contains_key(key) || map.len() < MAX_NAMES {
                key
            } else {
                "_other"
            };
            *map.entry(key.to_owned()).or_default() += 1;
        }
    }

    pub fn report(&self) -> Report {
        let edges = self
            .edges
            .iter()
            .map(|((source, destination), e)| {
                let mut lat: Vec<u64> = e.latencies_us.iter().copied().collect();
                lat.sort_unstable();
                let share = |n: u64| n as f64 / e.requests.max(1) as f64;
                Edge {
                    source: source.clone(),
                    destination: destination.clone(),
                    via: e.via.iter().map(Endpoint::to_string).collect(),
                    node: self.node.clone(),
                    requests: e.requests,
                    valid_context_share: share(e.valid_context),
                    unsampled_share: share(e.unsampled),
                    unanswered: e.unanswered,
                    kinds: e
                        .kinds
                        .iter()
                        .map(|(k, n)| (k.as_str().to_owned(), *n))
                        .collect(),
                    examples: e
                        .examples
                        .iter()
                        .map(|(k, t)| (k.as_str().to_owned(), t.to_string()))
                        .collect(),
                    fixes: e
                        .fixes
                        .iter()
                        .map(|(k, f)| (k.as_str().to_owned(), f.clone()))
                        .collect(),
                    formats: e.formats.clone(),
                    baggage_carried: e.baggage_carried,
                    baggage_dropped: e.baggage_dropped,
                    p50_ms: quantile(&lat, 0.5),
                    p99_ms: quantile(&lat, 0.99),
                }
            })
            .collect();
        Report {
            edges,
            overflow_hops: self.overflow_hops,
            callee_spans: self
                .callee_spans
                .values()
                .map(|c| CalleeSpans {
                    node: self.node.clone(),
                    ..c.clone()
                })
                .collect(),
            services: self.services.clone(),
            encrypted: self
                .encrypted
                .values()
                .map(|e| EncryptedEdge {
                    node: self.node.clone(),
                    ..e.clone()
                })
                .collect(),
        }
    }
}

/// The report as a terminal table, worst edges (most gaps) first.
pub fn table(report: &Report) -> String {
    let mut edges: Vec<&Edge> = report.edges.iter().collect();
    let gaps = |e: &Edge| -> u64 {
        e.kinds
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "context_ok" | "unsampled" | "unreadable"))
            .map(|(_, n)| n)
            .sum()
    };
    edges.sort_by(|a, b| gaps(b).cmp(&gaps(a)).then(b.requests.cmp(&a.requests)));
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    // Columns shown only when some edge has them: a standalone agent
    // without Services prints what it always did.
    let with_via = edges.iter().any(|e| !e.via.is_empty());
    let with_node = edges.iter().any(|e| e.node.is_some());
    let mut rows = vec![vec![
        "EDGE".to_owned(),
        "VIA".to_owned(),
        "NODE".to_owned(),
        "REQS".to_owned(),
        "CTX%".to_owned(),
        "UNSAMPLED%".to_owned(),
        "P50ms".to_owned(),
        "P99ms".to_owned(),
        "GAPS".to_owned(),
        "EXAMPLE TRACE".to_owned(),
    ]];
    for e in edges {
        let kinds: Vec<String> = e
            .kinds
            .iter()
            .filter(|(k, _)| *k != "context_ok")
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        let example = e
            .kinds
            .keys()
            .filter(|k| *k != "context_ok")
            .find_map(|k| e.examples.get(k).map(|t| format!("{k}:{t}")))
            .unwrap_or_default();
        rows.push(vec![
            format!("{} -> {}", e.source, e.destination),
            if e.via.is_empty() {
                "-".to_owned()
            } else {
                e.via.join(",")
            },
            e.node.clone().unwrap_or_else(|| "-".to_owned()),
            e.requests.to_string(),
            format!("{:.0}", e.valid_context_share * 100.0),
            format!("{:.0}", e.unsampled_share * 100.0),
            ms(e.p50_ms),
            ms(e.p99_ms),
            if kinds.is_empty() {
                "-".to_owned()
            } else {
                kinds.join(" ")
            },
            example,
        ]);
    }
    let shown = |c: &usize| (*c != 1 || with_via) && (*c != 2 || with_node);
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .filter(|(c, _)| shown(c))
            .map(|(_, (v, w))| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if report.overflow_hops > 0 {
        out.push_str(&format!(
            "({} hops on edges past the {MAX_EDGES}-edge limit not shown)\n",
            report.overflow_hops
        ));
    }
    out.push_str(&callee_table(&report.callee_spans));
    out.push_str(&encrypted_table(&report.encrypted));
    out
}

/// The encrypted edges: connections tracegap saw start and cannot read.
fn encrypted_table(edges: &[EncryptedEdge]) -> String {
    if edges.is_empty() {
        return String::new();
    }
    let list = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, n)| format!("{}={n}", if k.is_empty() { "(none)" } else { k }))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = String::from(
        "\nENCRYPTED (TLS): connections tracegap cannot see inside; their requests are in no row above\n",
    );
    for e in edges {
        out.push_str(&format!(
            "{} -> {}  connections={}  sni: {}  alpn: {}\n",
            e.source,
            e.destination,
            e.connections,
            list(&e.server_names),
            list(&e.alpn)
        ));
    }
    out
}

/// The callee-span checks as a table: whether each edge's callees' own
/// spans reached the trace store, and why not.
fn callee_table(checks: &[CalleeSpans]) -> String {
    if checks.is_empty() {
        return String::new();
    }
    let mut rows = vec![[
        "CALLEE SPANS".to_owned(),
        "NODE".to_owned(),
        "ARRIVED".to_owned(),
        "NEW_TRACE".to_owned(),
        "LOST_IN_PIPELINE".to_owned(),
        "NOT_EXPORTED".to_owned(),
        "UNKNOWN".to_owned(),
        "NOT_CHECKED".to_owned(),
        "UNINSTRUMENTED".to_owned(),
        "COLLECTOR ANSWERED".to_owned(),
        "EXAMPLE TRACE".to_owned(),
    ]];
    for c in checks {
        let answers: Vec<String> = c
            .export_answers
            .iter()
            .map(|(a, n)| format!("{a} x{n}"))
            .collect();
        rows.push([
            format!("{} -> {}", c.source, c.destination),
            c.node.clone().unwrap_or_else(|| "-".to_owned()),
            c.arrived.to_string(),
            c.new_trace.to_string(),
            c.lost_in_pipeline.to_string(),
            c.not_exported.to_string(),
            c.unknown.to_string(),
            c.not_checked.to_string(),
            c.uninstrumented.to_string(),
            if answers.is_empty() {
                "-".to_owned()
            } else {
                answers.join(" ")
            },
            c.example.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `tracegap report`: fetches `/report` from the agent at `agent` (its
/// --report-listen) and prints it, as a table or (`json`) as it came.
pub fn fetch_and_print(agent: &str, json: bool) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};

    use anyhow::Context as _;
    let mut conn = std::net::TcpStream::connect(agent)
        .with_context(|| format!("connecting to the agent at {}", agent))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        conn,
        "GET /report HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n\r\n",
        agent
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the agent's answer has no HTTP head")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "the agent answered: {}",
        head.lines().next().unwrap_or_default()
    );
    let report: Report = serde_json::from_str(body).context("reading the report")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}
