//! Which inbound request caused each outbound call, measured against the
//! truth: a service that records its server spans and calls downstream
//! with a plain client (the context is lost), a random think time before
//! each call, 1 to 64 requests in flight. The service records which inbound
//! request each call was made for ([`crate::service::causes`]; tracegap
//! never reads it); each stitched span is then right (under the request
//! that caused it), wrong (under another), or unplaced (a root linked to
//! its candidates). The breaking service serves a thread per request or
//! multiplexes them on one async thread ([`Runtime`]). Used by the
//! `causality` test and `cargo xtask bench`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tracegap_agent::agent::AgentConfig;

use crate::{
    agent::Agent,
    netns::Node,
    service::{self, Behaviour, Runtime, ServiceSpec},
    store::{Received, Receiver},
};

/// Requests in flight, and requests made, per level.
pub const LEVELS: [(usize, usize); 4] = [(1, 24), (4, 48), (16, 96), (64, 192)];
/// The breaking service's think time before its call, at most.
pub const THINK: Duration = Duration::from_millis(20);

/// One level's outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Level {
    pub in_flight: usize,
    pub hops: usize,
    pub right: usize,
    pub wrong: usize,
    pub unplaced: usize,
    /// Unplaced hops with every candidate named whose cause was not among
    /// them (never expected: the cause is open when its call starts).
    pub cause_not_named: usize,
    /// Unplaced hops by why the threads could not tell
    /// (`tracegap.link.threads`).
    pub unplaced_why: std::collections::BTreeMap<String, usize>,
    /// Unplaced hops by why the answers could not
    /// (`tracegap.link.answers`).
    pub unplaced_answers: std::collections::BTreeMap<String, usize>,
    /// Wrong parents, as (cause, placed in, confidence, the call's
    /// port and how many of the level's calls were made from it).
    pub wrong_examples: Vec<(String, String, String, String, usize)>,
}

/// A whole measurement.
#[derive(Clone, Debug)]
pub struct Measured {
    pub levels: Vec<Level>,
    /// `tracegap_thread_evidence`'s source: tracepoints, fexit, none.
    pub source: String,
    /// Hops placed by their thread (`tracegap_stitched_causes_total`).
    pub by_thread: f64,
    /// Hops placed by timing (`tracegap_stitched_causes_total`).
    pub by_timing: f64,
    /// Hops placed by their answers' handoff (`tracegap_stitched_causes_total`).
    pub by_handoff: f64,
}

impl Measured {
    /// The levels as a table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "IN FLIGHT  HOPS  RIGHT PARENT  WRONG PARENT  UNPLACED (LINKED)  WHY UNPLACED\n",
        );
        for r in &self.levels {
            let why: Vec<String> = r
                .unplaced_why
                .iter()
                .chain(&r.unplaced_answers)
                .map(|(w, n)| format!("{w} x{n}"))
                .collect();
            out.push_str(&format!(
                "{:<9}  {:<4}  {:<12}  {:<12}  {:<17}  {}\n",
                r.in_flight,
                r.hops,
                r.right,
                r.wrong,
                r.unplaced,
                why.join(" ")
            ));
        }
        out
    }
}

/// client -> breaker (server spans, plain client: the context is lost,
/// `think` before its call; serving as `runtime` says) -> leaf, on one
/// node, the agent on its veths (`thread_evidence` on or off, placing by
/// timing or not), `levels` driven one after the other.
pub fn measure(
    levels: &[(usize, usize)],
    thread_evidence: bool,
    place_by_timing: bool,
    runtime: Runtime,
) -> anyhow::Result<Measured> {
    let node = Node::new(&["client", "breaker", "leaf"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let agent = Agent::start(AgentConfig {
        thread_evidence,
        place_by_timing,
        ..crate::agent::config_for(&node, &receiver)
    })?;
    let otlp = format!("http://{}:{}", node.gateway(), receiver.http.port());
    let url = |pod: &str, path: &str| format!("http://{}:8080{path}", node.pod(pod).ipv4);
    let leaf = ServiceSpec {
        otlp: Some(otlp.clone()),
        ..ServiceSpec::new("leaf", 8080, Behaviour::Instrumented)
    }
    .start(node.pod("leaf"))?;
    let breaker = ServiceSpec {
        otlp: Some(otlp),
        downstream: vec![url("leaf", "/stock")],
        think: THINK,
        runtime,
        ..ServiceSpec::new("breaker", 8080, Behaviour::ServerSpansOnly)
    }
    .start(node.pod("breaker"))?;
    let breaker_ip = node.pod("breaker").ipv4.to_string();
    // Trace ids unique to this measurement: the causes are process-wide.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        & 0xffff_ffff;

    let mut out = Vec::new();
    let mut total = 0;
    for (row, &(in_flight, n)) in levels.iter().enumerate() {
        let traces: Arc<Vec<String>> = Arc::new(
            (0..n)
                .map(|i| format!("{run:08x}{:02x}{i:022x}", row + 1))
                .collect(),
        );
        let next = Arc::new(AtomicUsize::new(0));
        // Only this level's spans and causes: a port of an earlier level's
        // call may be taken again by this one's.
        let (spans_before, causes_before) = (receiver.spans().len(), service::causes().len());
        let mut callers = Vec::new();
        for _ in 0..in_flight {
            let (traces, next, target) =
                (traces.clone(), next.clone(), url("breaker", "/checkout"));
            callers.push(node.pod("client").spawn(move || -> anyhow::Result<()> {
                while let Some(t) = traces.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let tp = format!("00-{t}-b7ad6b7169203331-01");
                    let status = service::call(&target, &[("traceparent".into(), tp)])?;
                    anyhow::ensure!(status == 200, "breaker answered {status}");
                }
                Ok(())
            })?);
        }
        for c in callers {
            c.join()
                .map_err(|_| anyhow::anyhow!("a caller panicked"))??;
        }
        total += n;
        let stitched = |s: &Received| {
            s.synthetic() && s.service == "leaf" && s.gap().as_deref() == Some("broken_propagation")
        };
        let spans = receiver.wait_for(Duration::from_secs(30), |all| {
            all.iter().filter(|s| stitched(s)).count() >= total
        });
        let spans: Vec<&Received> = spans
            .iter()
            .skip(spans_before)
            .filter(|s| stitched(s))
            .collect();
        anyhow::ensure!(
            spans.len() >= n,
            "{} stitched spans of {n} hops",
            spans.len()
        );
        // The truth, by the breaker's end of each call: by address and port,
        // as the record is the process's and another test's breaker, in a
        // namespace of its own, may call from the same port at once; and by
        // time, as a port is taken again once its call has closed.
        let mut causes: HashMap<(String, String), Vec<(u64, String)>> = HashMap::new();
        for c in service::causes()
            .into_iter()
            .skip(causes_before)
            .filter(|c| c.service == "breaker")
        {
            causes
                .entry((c.from.ip().to_string(), c.from.port().to_string()))
                .or_default()
                .push((c.at_unix_ns, c.trace_id));
        }
        let mut r = Level {
            in_flight,
            ..Level::default()
        };
        for s in spans {
            anyhow::ensure!(
                s.attr("network.peer.address") == Some(breaker_ip.clone()),
                "a stitched span not from the breaker: {s:?}"
            );
            let port = s.attr("network.peer.port").unwrap_or_default();
            let from_port = causes
                .get(&(breaker_ip.clone(), port.clone()))
                .with_context(|| format!("no cause recorded for the call from port {port}"))?;
            // The call connected just before its request's first packet.
            let start = s.span.start_time_unix_nano;
            let (_, truth) = from_port
                .iter()
                .min_by_key(|(at, _)| at.abs_diff(start))
                .with_context(|| format!("no cause recorded for the call from port {port}"))?;
            if !traces.contains(truth) {
                continue; // another level's
            }
            r.hops += 1;
            match s.attr("tracegap.link").as_deref() {
                Some("inferred") if s.trace_id() == *truth => r.right += 1,
                Some("inferred") => {
                    r.wrong += 1;
                    r.wrong_examples.push((
                        truth.clone(),
                        s.trace_id(),
                        s.attr("tracegap.link.confidence").unwrap_or_default(),
                        port.clone(),
                        from_port.len(),
                    ));
                }
                Some("unplaced") => {
                    r.unplaced += 1;
                    *r.unplaced_why
                        .entry(s.attr("tracegap.link.threads").unwrap_or_default())
                        .or_default() += 1;
                    *r.unplaced_answers
                        .entry(s.attr("tracegap.link.answers").unwrap_or_default())
                        .or_default() += 1;
                    let named: Vec<String> = s
                        .span
                        .links
                        .iter()
                        .map(|l| crate::store::hex(&l.trace_id))
                        .collect();
                    let candidates: usize = s
                        .attr("tracegap.link.candidates")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    anyhow::ensure!(candidates >= 2, "unplaced with {candidates} candidates");
                    if named.len() == candidates && !named.contains(truth) {
                        r.cause_not_named += 1;
                    }
                }
                other => anyhow::bail!("a stitched span with link {other:?}: {s:?}"),
            }
        }
        anyhow::ensure!(r.hops == n, "{} of {n} calls stitched: {r:?}", r.hops);
        out.push(r);
    }
    let source = ["tracepoints", "fexit", "none"]
        .into_iter()
        .find(|s| {
            agent
                .metric(&format!("tracegap_thread_evidence{{source=\"{s}\"}}"))
                .is_ok_and(|v| v == 1.0)
        })
        .unwrap_or("none")
        .to_owned();
    let by_thread = agent.metric("tracegap_stitched_causes_total{confidence=\"thread\"}")?;
    let by_timing = agent.metric("tracegap_stitched_causes_total{confidence=\"timing\"}")?;
    let by_handoff = agent.metric("tracegap_stitched_causes_total{confidence=\"handoff\"}")?;
    drop((breaker, leaf, agent));
    Ok(Measured {
        levels: out,
        source,
        by_thread,
        by_timing,
        by_handoff,
    })
}
