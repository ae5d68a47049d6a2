//! `cargo xtask bench`: what tracegap costs, each figure against its
//! baseline from the same run. Traffic stays between two namespaces the
//! bench creates; every load is bounded in time.

pub mod allocs;
pub mod grpc_stream;
pub mod healthy;
pub mod kernel;
mod quality;
mod rest;
mod sched;
mod sockets;
mod tail;
mod tls;

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use tracegap_agent::{
    agent::AgentConfig,
    clock::WallClock,
    events::{BatchDecoder, Endpoint, Flow, RawEvent},
    export::{self, ExportConfig, OtlpProtocol},
    gap::{
        Engine, Hop,
        hop::{Reply, Request},
        span::{self, ExportMode, Identity},
    },
    http::assemble::{Answer, Assembler, Message, Pairer},
    interfaces::Selection,
    metrics::Metrics,
};
use tracegap_common::{Direction, EventKind};

use crate::{
    agent::Agent,
    http::{HttpServer, Serving},
    netns::{Child, Node},
    store::Receiver,
};

/// How long each measured load runs.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    pub load: Duration,
    pub rounds: usize,
    /// Rounds of the kernel bench, and test-run batches per case in each.
    pub kernel_rounds: usize,
    pub kernel_batches: u32,
    /// Socket operations per block of the thread programs' own figure, and
    /// its blocks (see `sockets`).
    pub socket_ops: usize,
    pub socket_rounds: usize,
}

impl Durations {
    pub fn full() -> Self {
        Self {
            load: Duration::from_secs(8),
            rounds: 3,
            kernel_rounds: 7,
            kernel_batches: 100,
            socket_ops: 100_000,
            socket_rounds: 15,
        }
    }

    pub fn quick() -> Self {
        Self {
            load: Duration::from_secs(2),
            rounds: 1,
            kernel_rounds: 3,
            kernel_batches: 20,
            socket_ops: 40_000,
            socket_rounds: 5,
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub what: String,
    pub baseline: String,
    pub with: String,
    pub figure: String,
    pub target: String,
    pub met: Option<bool>,
}

fn row(
    what: &str,
    baseline: String,
    with: String,
    figure: String,
    target: &str,
    met: Option<bool>,
) -> Row {
    Row {
        what: what.to_owned(),
        baseline,
        with,
        figure,
        target: target.to_owned(),
        met,
    }
}

struct Wrk {
    rps: f64,
    /// Requests completed in the run.
    requests: f64,
    /// The mean latency (wrk's; h2load's mean time per request).
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time the whole machine was busy during the run, in seconds.
    busy_s: f64,
    /// CPU time of the agent's threads during the run, in seconds.
    agent_s: f64,
}

/// Clock ticks per second of /proc's CPU times (USER_HZ: 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Seconds of CPU time the machine spent busy since boot, over all CPUs:
/// everything in /proc/stat's `cpu` line but idle and iowait.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 =
        v.iter().take(8).sum::<f64>() - v.get(3).unwrap_or(&0.0) - v.get(4).unwrap_or(&0.0);
    busy / USER_HZ
}
/// CPU seconds (user + system) of this process's agent threads so far,
/// from the scheduler's account (ns, not `stat`'s 10 ms ticks). Threads
/// that ended are not counted: the runtime's workers live as long as the
/// agent.
fn agent_cpu_seconds() -> f64 {
    sched::Account::named(crate::agent::THREAD_NAME).run_ns as f64 / 1e9
}

fn ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

/// wrk's connections: each sends its next request as the last is
/// answered, so at saturation the mean latency is this many over the
/// requests/s (Little's law).
const WRK_CONNECTIONS: usize = 16;

fn wrk(node: &Node, url: &str, d: Duration) -> anyhow::Result<Wrk> {
    let (busy0, agent0) = (machine_busy_seconds(), agent_cpu_seconds());
    let out = crate::netns::run(
        node.pod("client")
            .command("wrk")
            .args(["-t2", &format!("-c{WRK_CONNECTIONS}"), "--latency"])
            // An instrumented caller's requests: valid context, so hops are
            // classified and counted but need no synthetic span.
            .args([
                "-H",
                "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ])
            .arg(format!("-d{}s", d.as_secs().max(1)))
            .arg(url),
    )?;
    let (busy1, agent1) = (machine_busy_seconds(), agent_cpu_seconds());
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(|r| r.trim().to_owned()))
    };
    Ok(Wrk {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output: {text}"))?,
        requests: text
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no request count in wrk's output: {text}"))?,
        // "Latency   229.00us  ..." (thread stats: avg, stdev, max), before
        // "Latency Distribution".
        mean_ms: field("Latency ")
            .and_then(|v| v.split_whitespace().next().and_then(ms))
            .context("no mean latency")?,
        p50_ms: field("50%").and_then(|v| ms(&v)).context("no p50")?,
        p99_ms: field("99%").and_then(|v| ms(&v)).context("no p99")?,
        busy_s: busy1 - busy0,
        agent_s: agent1 - agent0,
    })
}

/// h2load (nghttp2) from the client pod: gRPC unary calls over HTTP/2,
/// `-c4 -m16` (4 connections, 16 calls in flight on each), with context,
/// for `d`. h2load's summary has no latency percentiles: its mean time per
/// request is kept as `p50_ms`, its max as `p99_ms`, and the rows show no
/// latency (see [`http_rows`]).
fn h2load(node: &Node, url: &str, body: &std::path::Path, d: Duration) -> anyhow::Result<Wrk> {
    let (busy0, agent0) = (machine_busy_seconds(), agent_cpu_seconds());
    let out = crate::netns::run(
        node.pod("client")
            .command("h2load")
            .args(["-c4", "-m16", "-t2"])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .args([
                "-H",
                "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ])
            .arg("-d")
            .arg(body)
            .arg(format!("-D{}", d.as_secs().max(1)))
            .arg(url),
    )?;
    let (busy1, agent1) = (machine_busy_seconds(), agent_cpu_seconds());
    let text = String::from_utf8_lossy(&out.stdout);
    // "finished in 2.00s, 52123.50 req/s, 1.2MB/s"
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no req/s in h2load's output: {text}"))?;
    // "requests: 104247 total, 104247 started, 104247 done, 104247 succeeded, ..."
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|f| f.ends_with(" done")))
        .and_then(|f| f.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no request count in h2load's output: {text}"))?;
    // "time for request:   123us   4.56ms   789us   12us   95.00%"
    let times: Vec<f64> = text
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(3)
                .filter_map(ms)
                .collect()
        })
        .unwrap_or_default();
    let [_, max, mean] = times[..] else {
        bail!("no request times in h2load's output: {text}");
    };
    Ok(Wrk {
        rps,
        requests,
        mean_ms: mean,
        p50_ms: mean,
        p99_ms: max,
        busy_s: busy1 - busy0,
        agent_s: agent1 - agent0,
    })
}

fn iperf(node: &Node, d: Duration) -> anyhow::Result<f64> {
    let server = node.pod("server").ipv4.to_string();
    let out = crate::netns::run(
        node.pod("client")
            .command("iperf3")
            .args(["-c", &server, "-p", "5201", "-J", "-t"])
            .arg(d.as_secs().max(1).to_string()),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no bits_per_second in iperf3's output")
}

pub(super) fn pct(with: f64, base: f64) -> f64 {
    (with / base - 1.0) * 100.0
}

/// An agent's configuration for [`tracegap_agent::replay::Replay`]: no
/// interface, collector, API or store is used.
fn replay_config() -> AgentConfig {
    AgentConfig {
        interfaces: Selection::Explicit(Vec::new()),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        report_listen: None,
        cors_origin: None,
        export: ExportConfig::default(),
        export_mode: ExportMode::Gaps,
        export_unsampled: false,
        services: Vec::new(),
        response_timeout: Duration::from_secs(30),
        kubernetes: None,
        node_name: None,
        reconcile: None,
        thread_evidence: false,
        tls_plaintext: false,
        kernel_log: Default::default(),
        place_by_timing: false,
        silence: Some(Default::default()),
        server_limits: Default::default(),
    }
}

fn agent_config(node: &Node, receiver: &Receiver) -> AgentConfig {
    AgentConfig {
        interfaces: Selection::Explicit(node.pods.iter().map(|p| p.host_if.clone()).collect()),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        report_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        cors_origin: None,
        export: ExportConfig {
            protocol: OtlpProtocol::Grpc,
            endpoint: Some(format!("http://127.0.0.1:{}", receiver.grpc.port())),
            ..ExportConfig::default()
        },
        export_mode: ExportMode::Gaps,
        export_unsampled: false,
        services: node.identities("bench"),
        response_timeout: Duration::from_secs(30),
        kubernetes: None,
        node_name: None,
        reconcile: None,
        thread_evidence: true,
        tls_plaintext: true,
        kernel_log: Default::default(),
        place_by_timing: false,
        silence: Some(Default::default()),
        server_limits: Default::default(),
    }
}

/// The kernel's run time and run count of the two TC programs (what the
/// per-packet figures divide), and the run time of every program the agent
/// loaded (the thread programs too: what tracegap costs the kernel).
fn bpf_stats(agent: &Agent) -> anyhow::Result<(f64, f64, f64)> {
    let tc = |metric: &str| -> anyhow::Result<f64> {
        Ok(
            agent.metric(&format!("{metric}{{program=\"tracegap_ingress\"}}"))?
                + agent.metric(&format!("{metric}{{program=\"tracegap_egress\"}}"))?,
        )
    };
    Ok((
        tc("tracegap_bpf_run_seconds")?,
        tc("tracegap_bpf_runs")?,
        agent.metric("tracegap_bpf_run_seconds{")?,
    ))
}

/// What the thread programs cost each socket operation (see `sockets`).
fn socket_row(ops: &sockets::SocketOps) -> Row {
    let ns = |v: f64| format!("{v:.1} ns");
    row(
        "each socket send or receive on the node (1 byte over a Unix pair, the socket no relay's; BPF statistics, blocks taking turns): ns per run, an empty program on the same tracepoints / the thread programs",
        ops.empty
            .as_ref()
            .map_or("- (no floor object)".to_owned(), |e| e.show(ns)),
        ops.threads.show(ns),
        ops.own().map_or("-".to_owned(), |own| {
            format!("{own:+.1} ns per run of the programs' own work; the rest is what any program there costs, mostly the statistics' clock reads")
        }),
        "-",
        None,
    )
}

/// Only the socket figure (`tracegap-lab bench --sockets`).
pub fn sockets_only(d: Durations, floor: Option<&[u8]>) -> anyhow::Result<String> {
    let ops = sockets::measure(floor, d.socket_ops, d.socket_rounds)?;
    let r = socket_row(&ops);
    Ok(format!(
        "| measure | baseline | with tracegap | figure |\n| --- | --- | --- | --- |\n| {} | {} | {} | {} |\n",
        r.what, r.baseline, r.with, r.figure
    ))
}

/// Only the HTTPS figures (`tracegap-lab bench --tls`).
pub fn tls_only(d: Durations) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    tls::rows(d, &mut rows)?;
    Ok(rows_table(&rows))
}

/// Only the cluster-wide view's figure (`tracegap-lab bench --quality`).
/// Only the agent at rest and at low rates (see `rest`).
pub fn pipeline_only(d: Durations) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    eprintln!("bench: user space on one core");
    user_space(d, &mut rows)?;
    Ok(rows_table(&rows))
}

pub fn rest_only(d: Durations) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    rest::rows(d, &mut rows)?;
    Ok(rows_table(&rows))
}

pub fn tail_only(d: Durations) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    tail::rows(d, &mut rows)?;
    Ok(rows_table(&rows))
}

pub fn quality_only(d: Durations) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    quality::rows(d, &mut rows)?;
    Ok(rows_table(&rows))
}

/// A part's rows as a table of their own (no `met` column: targets are
/// judged in the full run's).
fn rows_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| measure | baseline | with tracegap | figure | target |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.what, r.baseline, r.with, r.figure, r.target
        ));
    }
    out
}

/// An empty classifier attached beside tracegap's programs on the same
/// hooks, so the kernel's statistics say what any program costs there.
struct Floor {
    ebpf: aya::Ebpf,
}

impl Floor {
    const PROGRAM: &str = "tracegap_floor";

    fn load(object: &[u8]) -> anyhow::Result<Self> {
        let mut ebpf = aya::Ebpf::load(object).context("loading the floor program")?;
        let program: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(Self::PROGRAM)
            .context("no tracegap_floor in the floor object")?
            .try_into()?;
        program.load()?;
        Ok(Self { ebpf })
    }

    fn program(&self) -> anyhow::Result<&aya::programs::SchedClassifier> {
        Ok(self
            .ebpf
            .program(Self::PROGRAM)
            .context("no tracegap_floor")?
            .try_into()?)
    }

    fn attach(object: &[u8], ifaces: &[String]) -> anyhow::Result<Self> {
        let mut floor = Self::load(object)?;
        let program: &mut aya::programs::SchedClassifier = floor
            .ebpf
            .program_mut(Self::PROGRAM)
            .context("no tracegap_floor")?
            .try_into()?;
        for iface in ifaces {
            // Before 6.6 (no TCX) programs hang off a clsact qdisc; one that
            // is already there is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
            for hook in [
                aya::programs::TcAttachType::Ingress,
                aya::programs::TcAttachType::Egress,
            ] {
                program
                    .attach(iface, hook)
                    .with_context(|| format!("attaching the floor program to {iface}"))?;
            }
        }
        Ok(floor)
    }

    /// Run time (s) and runs so far.
    fn stats(&self) -> anyhow::Result<(f64, f64)> {
        let (time, runs) = run_stats(&self.ebpf, [Self::PROGRAM])?;
        Ok((time.as_secs_f64(), runs as f64))
    }
}

/// The run time and runs so far of `programs` in `ebpf`, added up, as the
/// kernel's statistics count them (while enabled).
fn run_stats<'a>(
    ebpf: &aya::Ebpf,
    programs: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<(std::time::Duration, u64)> {
    let mut sum = (std::time::Duration::ZERO, 0);
    for name in programs {
        let info = ebpf
            .program(name)
            .with_context(|| format!("no {name} loaded"))?
            .info()?;
        sum.0 += info.run_time();
        sum.1 += info.run_count();
    }
    Ok(sum)
}

/// min, median and max of a figure's rounds.
#[derive(Clone, Copy, Debug)]
struct Spread {
    min: f64,
    med: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Self {
                min: 0.0,
                med: 0.0,
                max: 0.0,
            };
        }
        Self {
            min: v[0],
            med: v[v.len() / 2],
            max: v[v.len() - 1],
        }
    }

    /// "median (min–max)", each through `f`.
    fn show(&self, f: impl Fn(f64) -> String) -> String {
        format!("{} ({}–{})", f(self.med), f(self.min), f(self.max))
    }

    /// Half the range, as a share of the median: how far apart the rounds
    /// of one side were.
    fn noise_pct(&self) -> f64 {
        if self.med == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.med * 100.0
        }
    }
}

/// The HTTP rows for one server: requests/s, p50, p99 and CPU per request,
/// each round's baseline against the same round's run with tracegap.
/// A figure of each round without and with the agent, and the change in %.
fn per_round(base: &[Wrk], with: &[Wrk], f: fn(&Wrk) -> f64) -> (Spread, Spread, Spread) {
    let b: Vec<f64> = base.iter().map(f).collect();
    let w: Vec<f64> = with.iter().map(f).collect();
    let ratio: Vec<f64> = b.iter().zip(&w).map(|(b, w)| pct(*w, *b)).collect();
    (Spread::of(b), Spread::of(w), Spread::of(ratio))
}

fn http_rows(
    what: &str,
    base: &[Wrk],
    with: &[Wrk],
    kernel_s: &[f64],
    // Targets: requests/s fewer, p99 added (None: no latency rows, the
    // client reports no percentiles), CPU added, in %.
    targets: (f64, Option<f64>, f64),
    rows: &mut Vec<Row>,
) {
    let f0 = |v: f64| format!("{v:.0}");
    let per_round = |f: fn(&Wrk) -> f64| per_round(base, with, f);
    let (b, w, r) = per_round(|x| x.rps);
    let loss = -r.med;
    rows.push(row(
        &format!("{what}: requests/s"),
        b.show(f0),
        w.show(f0),
        format!(
            "{:+.1}% fewer (rounds {:+.1}…{:+.1}%)",
            loss, -r.max, -r.min
        ),
        &format!("≤ {}% fewer", targets.0),
        Some(loss <= targets.0),
    ));
    if let Some(p99_target) = targets.1 {
        latency_rows(what, (base, with), p99_target, rows);
    }
    cpu_row(what, (base, with), kernel_s, targets.2, rows);
}

fn latency_rows(what: &str, (base, with): (&[Wrk], &[Wrk]), p99_target: f64, rows: &mut Vec<Row>) {
    let f3 = |v: f64| format!("{v:.3} ms");
    let per_round = |f: fn(&Wrk) -> f64| per_round(base, with, f);
    let (b, w, r) = per_round(|x| x.p50_ms);
    rows.push(row(
        &format!("{what}: p50 latency"),
        b.show(f3),
        w.show(f3),
        format!("{:+.1}%", r.med),
        "-",
        None,
    ));
    let (b, w, r) = per_round(|x| x.p99_ms);
    rows.push(row(
        &format!("{what}: p99 latency"),
        b.show(f3),
        w.show(f3),
        format!(
            "{:+.1}% (rounds {:+.1}…{:+.1}%; baseline's own rounds ±{:.0}%)",
            r.med,
            r.min,
            r.max,
            b.noise_pct()
        ),
        &format!("≤ +{p99_target}%"),
        Some(r.med <= p99_target),
    ));
}

fn cpu_row(
    what: &str,
    (base, with): (&[Wrk], &[Wrk]),
    kernel_s: &[f64],
    target: f64,
    rows: &mut Vec<Row>,
) {
    // What a request costs the machine, and what tracegap adds to it: the
    // figure that carries over to other loads. At saturation every
    // microsecond tracegap takes is one the client and server lose.
    let us = |t: f64, n: f64| if n > 0.0 { t / n * 1e6 } else { 0.0 };
    let machine = Spread::of(base.iter().map(|x| us(x.busy_s, x.requests)).collect());
    let kernel = Spread::of(
        with.iter()
            .zip(kernel_s)
            .map(|(x, k)| us(*k, x.requests))
            .collect(),
    );
    let agent = Spread::of(with.iter().map(|x| us(x.agent_s, x.requests)).collect());
    let added = kernel.med + agent.med;
    let share = added / machine.med * 100.0;
    rows.push(row(
        &format!("{what}: CPU per request, machine total / added by tracegap (kernel + agent)"),
        machine.show(|v| format!("{v:.1} µs")),
        format!("+{added:.2} µs ({:.2} + {:.2})", kernel.med, agent.med),
        format!("+{share:.1}% of the machine's CPU per request"),
        &format!("≤ {target}%"),
        Some(share <= target),
    ));
}

/// Data path, kernel cost and detection latency, on real veths.
fn data_path(
    d: Durations,
    floor: Option<&[u8]>,
    ops: &sockets::SocketOps,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // What one head may be, in the kernel: a runtime bound (the copy loop
    // is bounded by the HTTP/2 segment budget), so the verifier's figures
    // (`cargo xtask verifier`) barely move with it.
    rows.push(row(
        "HTTP/1 head copied by the kernel at most (HEADER_BUDGET; past it the head is unreadable, never missing_context)",
        "16 KiB (until issue 38)".to_owned(),
        format!("{} KiB", tracegap_common::HEADER_BUDGET / 1024),
        "nginx's default limit: 32 KiB".to_owned(),
        "≥ 32 KiB",
        Some(tracegap_common::HEADER_BUDGET >= 32 * 1024),
    ));
    let node = Node::new(&["client", "server"])?;
    let quiet = Serving {
        record: false,
        ..Serving::default()
    };
    let _http = HttpServer::start_with(node.pod("server"), 8080, quiet)?;
    // A service that works ~200 µs of CPU per request: what a user's
    // service looks like next to an echo server.
    let _busy = HttpServer::start_with(
        node.pod("server"),
        8081,
        Serving {
            cpu_per_request: Duration::from_micros(200),
            ..quiet
        },
    )?;
    let _iperf = Child::spawn(
        node.pod("server")
            .command("iperf3")
            .args(["-s", "-p", "5201"]),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let server = node.pod("server").ipv4;
    let (echo, busy) = (
        format!("http://{server}:8080/bench"),
        format!("http://{server}:8081/bench"),
    );
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    // A gRPC server in the server pod (the receiver's tonic), and calls to
    // a method it does not serve: an UNIMPLEMENTED answer as cheap as the
    // echo server's, every call still a hop.
    let grpc_server = node
        .pod("server")
        .spawn(|| Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))?
        .join()
        .map_err(|_| anyhow::anyhow!("gRPC server thread panicked"))??;
    let grpc = format!(
        "http://{server}:{}/bench.Echo/Call",
        grpc_server.grpc.port()
    );
    let grpc_dir = crate::netns::TempDir::new("bench-grpc")?;
    let grpc_body = grpc_dir.path().join("empty.grpc");
    std::fs::write(&grpc_body, [0u8; 5])?;
    // BPF run-time statistics, on while this is held.
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF statistics")?;

    let (mut base_w, mut with_w, mut base_b, mut with_b) = (vec![], vec![], vec![], vec![]);
    let (mut base_t, mut with_t, mut floor_t) = (vec![], vec![], vec![]);
    let (mut echo_kernel, mut busy_kernel) = (vec![], vec![]);
    let (mut thread_kernel, mut without_threads, mut without_threads_kernel) =
        (vec![], vec![], vec![]);
    // The thread programs' runs during the echo load (every program's
    // runs but the TC ones'), for their cost per run.
    let mut thread_runs = vec![];
    let (mut with_low, mut low_kernel, mut lost) = (vec![], vec![], 0.0);
    // Events the kernel could not hand over (ring buffer full), per load.
    let (mut lost_echo, mut lost_busy, mut lost_grpc) = (0.0, 0.0, 0.0);
    let (mut base_g, mut with_g, mut grpc_kernel) = (vec![], vec![], vec![]);
    // The echo load with a flood of /metrics scrapes at the agent.
    let (mut with_flood, mut lost_flood, mut scrapes) = (vec![], 0.0, (0u64, 0u64));
    // Per round: ns per non-HTTP packet, per header packet, per empty run.
    let (mut non_http, mut header, mut empty) = (vec![], vec![], vec![]);
    let (mut headers_seen, mut bulk_runs) = (0.0, 0.0);
    let ifaces: Vec<String> = node.pods.iter().map(|p| p.host_if.clone()).collect();
    for round in 0..d.rounds {
        eprintln!("bench: data path, round {} of {}", round + 1, d.rounds);
        base_w.push(wrk(&node, &echo, d.load)?);
        base_b.push(wrk(&node, &busy, d.load)?);
        base_t.push(iperf(&node, d.load)?);
        base_g.push(h2load(&node, &grpc, &grpc_body, d.load)?);
        if let Some(object) = floor {
            // The same bulk load with only the empty program attached, on
            // the same hooks: what any program costs per packet here.
            let fl = Floor::attach(object, &ifaces)?;
            let (ft0, fr0) = fl.stats()?;
            floor_t.push(iperf(&node, d.load)?);
            let (ft1, fr1) = fl.stats()?;
            if fr1 > fr0 {
                empty.push((ft1 - ft0) / (fr1 - fr0) * 1e9);
            }
        }
        let agent = Agent::start(agent_config(&node, &receiver))?;
        std::thread::sleep(Duration::from_millis(300));
        let full = || agent.metric("tracegap_kernel_events_total{counter=\"ringbuf_full\"}");
        let (t0, r0, k0) = bpf_stats(&agent)?;
        let all0 = agent.metric("tracegap_bpf_runs{")?;
        let h0 = agent.metric("tracegap_kernel_events_total{counter=\"http_")?;
        let lost_echo0 = full()?;
        with_w.push(wrk(&node, &echo, d.load)?);
        std::thread::sleep(Duration::from_millis(600));
        let (t1, r1, k1) = bpf_stats(&agent)?;
        thread_runs.push((agent.metric("tracegap_bpf_runs{")? - all0) - (r1 - r0));
        let h1 = agent.metric("tracegap_kernel_events_total{counter=\"http_")?;
        lost_echo += full()? - lost_echo0;
        with_t.push(iperf(&node, d.load)?);
        std::thread::sleep(Duration::from_millis(600));
        let (t2, r2, k2) = bpf_stats(&agent)?;
        let lost_busy0 = full()?;
        with_b.push(wrk(&node, &busy, d.load)?);
        std::thread::sleep(Duration::from_millis(600));
        let (_, _, k3) = bpf_stats(&agent)?;
        lost_busy += full()? - lost_busy0;
        let lost_grpc0 = full()?;
        with_g.push(h2load(&node, &grpc, &grpc_body, d.load)?);
        std::thread::sleep(Duration::from_millis(600));
        let (_, _, k6) = bpf_stats(&agent)?;
        lost_grpc += full()? - lost_grpc0;
        grpc_kernel.push(k6 - k3);
        let lost_flood0 = full()?;
        let flood = crate::http::MetricsFlood::start(agent.listen, 8);
        with_flood.push(wrk(&node, &echo, d.load)?);
        let (ok, shed) = flood.stop();
        scrapes = (scrapes.0 + ok, scrapes.1 + shed);
        std::thread::sleep(Duration::from_millis(600));
        lost_flood += full()? - lost_flood0;
        agent.stop()?;
        // The agent at the lowest CPU weight, as a node would run it
        // beside busy services: what the services gain, what it loses.
        let agent = Agent::start_with(agent_config(&node, &receiver), None, 19)?;
        std::thread::sleep(Duration::from_millis(300));
        let (_, _, k4) = bpf_stats(&agent)?;
        let lost0 = agent.metric("tracegap_kernel_events_total{counter=\"ringbuf_full\"}")?;
        with_low.push(wrk(&node, &echo, d.load)?);
        std::thread::sleep(Duration::from_millis(600));
        let (_, _, k5) = bpf_stats(&agent)?;
        lost += agent.metric("tracegap_kernel_events_total{counter=\"ringbuf_full\"}")? - lost0;
        agent.stop()?;
        low_kernel.push(k5 - k4);
        echo_kernel.push(k1 - k0);
        busy_kernel.push(k3 - k2);
        thread_kernel.push((k1 - k0) - (t1 - t0));
        // The same echo load without the thread programs: what recording
        // which thread wrote and read each request costs, same run.
        let agent = Agent::start(AgentConfig {
            thread_evidence: false,
            place_by_timing: false,
            server_limits: Default::default(),
            ..agent_config(&node, &receiver)
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let (_, _, k7) = bpf_stats(&agent)?;
        without_threads.push(wrk(&node, &echo, d.load)?);
        std::thread::sleep(Duration::from_millis(600));
        let (_, _, k8) = bpf_stats(&agent)?;
        agent.stop()?;
        without_threads_kernel.push(k8 - k7);
        // Per packet: the bulk phase is all non-HTTP packets; in the HTTP
        // phase the non-HTTP ones (ACKs) cost what bulk packets cost, the
        // rest is the header packets'.
        let (runs, headers) = (r1 - r0, h1 - h0);
        if r2 > r1 {
            let nh = (t2 - t1) / (r2 - r1) * 1e9;
            non_http.push(nh);
            if headers > 0.0 {
                header.push(((t1 - t0) * 1e9 - (runs - headers).max(0.0) * nh) / headers);
            }
        }
        (headers_seen, bulk_runs) = (headers_seen + headers, bulk_runs + r2 - r1);
    }
    http_rows(
        &format!(
            "HTTP/1.1 keep-alive, echo server at saturation (wrk -t2 -c16, with traceparent; events lost to a full ring buffer: {lost_echo:.0})"
        ),
        &base_w,
        &with_w,
        &echo_kernel,
        (5.0, Some(10.0), 5.0),
        rows,
    );
    // tracegap's own CPU per request (kernel programs + agent), with the
    // thread programs and without, each round's median.
    let tracegap_us = |w: &[Wrk], k: &[f64]| {
        Spread::of(
            w.iter()
                .zip(k)
                .map(|(x, k)| (x.agent_s + k) / x.requests.max(1.0) * 1e6)
                .collect(),
        )
    };
    let (with_us, without_us) = (
        tracegap_us(&with_w, &echo_kernel),
        tracegap_us(&without_threads, &without_threads_kernel),
    );
    let added = (with_us.med / without_us.med - 1.0) * 100.0;
    let thread_only = Spread::of(
        with_w
            .iter()
            .zip(&thread_kernel)
            .map(|(x, k)| k / x.requests.max(1.0) * 1e6)
            .collect(),
    );
    let runs_per_request = Spread::of(
        with_w
            .iter()
            .zip(&thread_runs)
            .map(|(x, n)| n / x.requests.max(1.0))
            .collect(),
    );
    let ns_per_run = Spread::of(
        thread_kernel
            .iter()
            .zip(&thread_runs)
            .map(|(k, n)| k / n.max(1.0) * 1e9)
            .collect(),
    );
    // Per request, two bounds: the programs' time as the statistics count
    // it (their clock reads included: more than the programs cost), and
    // their own work above an empty program on the same hooks (see
    // `sockets`; the hooks' own dispatch left out).
    let upper = thread_only.med / without_us.med * 100.0;
    let own_us = ops.own().map(|own| runs_per_request.med * own / 1e3);
    rows.push(socket_row(ops));
    rows.push(row(
        "thread evidence, echo server at saturation (wrk -t2 -c16): tracegap's CPU per request (kernel + agent), without the thread programs / what they add as the kernel's statistics count it",
        without_us.show(|v| format!("{v:.2} µs")),
        format!("+{:.3} µs", thread_only.med),
        format!(
            "{upper:+.1}% ({:.1} runs per request, one per socket send or receive, at {:.0} ns each, the statistics' clock reads included); their own work above an empty program: {}; the whole, with / without: {added:+.1}%",
            runs_per_request.med,
            ns_per_run.med,
            own_us.map_or("-".to_owned(), |u| format!(
                "{u:+.3} µs ({:+.1}%)",
                u / without_us.med * 100.0
            )),
        ),
        "≤ +5%",
        Some(upper <= 5.0),
    ));
    // The same load with eight scrapers hammering /metrics: the event
    // pipeline must not pay for the agent's HTTP server.
    let (rps, rps_flood) = (
        Spread::of(with_w.iter().map(|x| x.rps).collect()),
        Spread::of(with_flood.iter().map(|x| x.rps).collect()),
    );
    let flood_loss = -pct(rps_flood.med, rps.med);
    rows.push(row(
        &format!(
            "echo load with the agent, without / with a /metrics flood (8 scrapers: {} answered, {} shed 503; events lost to a full ring buffer: {lost_flood:.0}): requests/s",
            scrapes.0, scrapes.1
        ),
        rps.show(|v| format!("{v:.0}")),
        rps_flood.show(|v| format!("{v:.0}")),
        format!("{flood_loss:+.1}% fewer requests/s; {lost_flood:.0} events lost"),
        "0 events lost",
        Some(lost_flood == 0.0),
    ));
    http_rows(
        &format!(
            "the same with the agent at nice 19 (lowest CPU weight; events lost to a full ring buffer: {lost:.0})"
        ),
        &base_w,
        &with_low,
        &low_kernel,
        (5.0, Some(10.0), 5.0),
        rows,
    );
    http_rows(
        &format!(
            "HTTP/1.1 keep-alive, a service spending 200 µs CPU per request (wrk -t2 -c16; events lost to a full ring buffer: {lost_busy:.0})"
        ),
        &base_b,
        &with_b,
        &busy_kernel,
        (1.0, Some(1.0), 1.0),
        rows,
    );
    http_rows(
        &format!(
            "gRPC unary calls over HTTP/2, tonic at saturation (h2load -c4 -m16, with traceparent; every call a hop; events lost to a full ring buffer: {lost_grpc:.0})"
        ),
        &base_g,
        &with_g,
        &grpc_kernel,
        (5.0, None, 5.0),
        rows,
    );

    let gbit = |v: f64| format!("{:.2} Gbit/s", v / 1e9);
    let (bt, tt) = (Spread::of(base_t.clone()), Spread::of(with_t.clone()));
    let effect = pct(tt.med, bt.med);
    let noise = bt.noise_pct().max(tt.noise_pct());
    let floor_bulk = if floor_t.is_empty() {
        String::new()
    } else {
        let ft = Spread::of(floor_t);
        format!("; empty program {:+.2}%", pct(ft.med, bt.med))
    };
    // A difference smaller than the rounds' own spread is no figure.
    let (figure, met) = if effect.abs() <= noise {
        (
            format!("noise: {effect:+.2}% within ±{noise:.1}%{floor_bulk}"),
            None,
        )
    } else {
        (
            format!("{effect:+.2}% (rounds ±{noise:.1}%){floor_bulk}"),
            Some(effect.abs() <= 1.0),
        )
    };
    rows.push(row(
        "bulk TCP throughput (iperf3)",
        bt.show(gbit),
        tt.show(gbit),
        figure,
        "within 1%",
        met,
    ));

    let e = Spread::of(empty);
    let floor_cell = if e.med > 0.0 {
        e.show(|v| format!("{v:.0} ns"))
    } else {
        "- (no floor object)".to_owned()
    };
    let per_packet = |what: &str, v: Vec<f64>, n: String, limit: f64| {
        let s = Spread::of(v);
        let times = if e.med > 0.0 { s.med / e.med } else { 0.0 };
        row(
            what,
            floor_cell.clone(),
            s.show(|v| format!("{v:.0} ns")),
            if e.med > 0.0 {
                format!("{times:.1}× the empty program; {n}")
            } else {
                n
            },
            &format!("≤ {limit}× empty"),
            (e.med > 0.0).then_some(times <= limit),
        )
    };
    rows.push(per_packet(
        "kernel on the veths (bpf_stats): ns per non-HTTP packet",
        non_http,
        format!("{bulk_runs:.0} runs"),
        1.5,
    ));
    rows.push(per_packet(
        "kernel on the veths (bpf_stats): ns per HTTP header packet",
        header,
        format!("{headers_seen:.0} headers"),
        4.0,
    ));

    // Detection latency: a gap request on the wire → its span at the store.
    let agent = Agent::start(agent_config(&node, &receiver))?;
    std::thread::sleep(Duration::from_millis(300));
    let n = if d.rounds > 1 { 50 } else { 15 };
    let to = SocketAddr::from((node.pod("server").ipv4, 8080));
    let lat = detection_ms(&node, to, &receiver, n, Duration::from_millis(100))?;
    agent.stop()?;
    rows.push(detection_row(
        "detection latency, gap request → span at the receiver",
        &lat,
        "",
    ));
    Ok(())
}

/// The detection-latency row for `lat` (sorted ms): its p50 and p99
/// against the 2 s target; `note` after the span count.
fn detection_row(what: &str, lat: &[f64], note: &str) -> Row {
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    row(
        what,
        "-".into(),
        format!("p50 {:.0} ms, p99 {:.0} ms", q(0.5), q(0.99)),
        format!("{} spans{note}", lat.len()),
        "p99 < 2 s",
        Some(q(0.99) < 2000.0),
    )
}

/// `n` requests without context (each a gap) from the client pod to `to`,
/// one every `gap` on one connection, while an agent exports to
/// `receiver`: each one's span's arrival after its start, in ms, sorted.
fn detection_ms(
    node: &Node,
    to: SocketAddr,
    receiver: &Receiver,
    n: usize,
    gap: Duration,
) -> anyhow::Result<Vec<f64>> {
    let before = receiver.count();
    let reqs = (0..n)
        .map(|i| format!("GET /detect/{i} HTTP/1.1\r\nHost: s\r\n\r\n").into_bytes())
        .collect();
    crate::http::exchange(node.pod("client"), to, reqs, gap)?;
    let spans = receiver.wait_for(Duration::from_secs(15), |s| s.len() >= before + n);
    let mut lat: Vec<f64> = spans[before.min(spans.len())..]
        .iter()
        .filter(|s| {
            s.attr("url.path")
                .is_some_and(|p| p.starts_with("/detect/"))
        })
        .filter_map(|s| {
            let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(s.span.start_time_unix_nano);
            s.arrived
                .duration_since(start)
                .ok()
                .map(|d| d.as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    if lat.is_empty() {
        bail!("no synthetic span arrived for the detection-latency requests");
    }
    Ok(lat)
}

fn ep(i: u32, port: u16) -> Endpoint {
    Endpoint {
        ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
        port,
    }
}

/// A recorded-shape event stream: request and response heads on many
/// flows, half of them with W3C context, as the kernel would send them.
/// Lazy, as the ring buffer delivers them: a test that holds state
/// measures the state, not the stream.
pub fn events(n_pairs: usize) -> impl Iterator<Item = RawEvent> {
    (0..n_pairs).flat_map(|i| {
        let flow = Flow {
            // A flow of its own per pair: 5000 clients x 20000 ports.
            src: ep(1 + (i % 5000) as u32, 30000 + ((i / 5000) % 20000) as u16),
            dst: ep(100_000 + (i % 50) as u32, 8080),
        };
        let ctx = if i % 2 == 0 {
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
        } else {
            ""
        };
        let req = format!(
            "GET /api/items/{i} HTTP/1.1\r\nHost: shop:8080\r\nUser-Agent: bench\r\n{ctx}Accept: */*\r\n\r\n"
        );
        let ts = i as u64 * 1000;
        let seq = (i as u32).wrapping_mul(7919);
        let rsp =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                .to_vec();
        // Each end acknowledges what the other sent, as TCP does.
        let (rsp_seq, req_end) = (seq ^ 0x5555, seq.wrapping_add(req.len() as u32));
        [
            event(
                (ts, flow, 1, Direction::Ingress, EventKind::Request),
                (seq, rsp_seq),
                req.into_bytes(),
            ),
            event(
                (ts + 500, flow.reversed(), 2, Direction::Ingress, EventKind::Response),
                (rsp_seq, req_end),
                rsp,
            ),
        ]
    })
}

/// A whole segment's event as the kernel reports it: (time, flow,
/// interface, direction, kind), (sequence, acknowledgement), payload.
fn event(
    (ts_ns, flow, ifindex, direction, kind): (u64, Flow, u32, Direction, EventKind),
    (seq, ack): (u32, u32),
    payload: Vec<u8>,
) -> RawEvent {
    RawEvent {
        ts_ns,
        flow,
        ifindex,
        direction,
        kind,
        seq,
        ack,
        short_start: false,
        segment_len: payload.len() as u32,
        budget_exhausted: false,
        payload: payload.into(),
        via: None,
    }
}

/// Everything user space does per event, on this thread: assemble, pair,
/// classify, and build a span for each gap. Its state lives on between
/// pushes, as the agent's does: a steady state can be measured.
pub struct UserSpace {
    clock: WallClock,
    assembler: Assembler,
    pairer: Pairer<Arc<Request>>,
    engine: Engine,
    messages: Vec<Message>,
    id: Identity,
}

impl Default for UserSpace {
    fn default() -> Self {
        Self {
            clock: WallClock::new(),
            assembler: Assembler::default(),
            pairer: Pairer::default(),
            engine: Engine::default(),
            messages: Vec::new(),
            id: Identity::default(),
        }
    }
}

impl UserSpace {
    /// One event; each span built is handed to `on_span`.
    pub fn push(&mut self, e: RawEvent, on_span: &mut impl FnMut(span::SyntheticSpan)) {
        self.assembler.push(e, &mut self.messages);
        for m in self.messages.drain(..) {
            if let Some(req) = Request::from_message(&m) {
                let req = self.engine.record(req);
                self.engine.request_started(&req);
                self.pairer.request(m.flow, req);
            } else if let Answer::Answered { request: req, .. } = self.pairer.response(&m) {
                let hop = Hop::new(&self.clock, &req, Reply::from_message(&m), m.ts_ns);
                let v = self.engine.classify(&hop, None);
                if span::wanted(v.kind, ExportMode::Gaps, false) {
                    on_span(span::build(&hop, &v, &self.id, &self.id, true));
                }
            }
        }
    }
}

fn run_pipeline(
    events: impl IntoIterator<Item = RawEvent>,
    mut on_span: impl FnMut(span::SyntheticSpan),
) {
    let mut u = UserSpace::default();
    for e in events {
        u.push(e, &mut on_span);
    }
}

/// Events as the ring buffer holds them: records back to back.
pub struct Records {
    bytes: Vec<u8>,
    /// Where each record starts and ends in `bytes`.
    bounds: Vec<(usize, usize)>,
}

impl Records {
    pub fn len(&self) -> usize {
        self.bounds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bounds.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.bounds.iter().map(|&(a, b)| &self.bytes[a..b])
    }

    /// The records in batches of `n`, as the agent drains the ring.
    fn batches(&self, n: usize) -> impl Iterator<Item = impl Iterator<Item = &[u8]>> {
        self.bounds
            .chunks(n)
            .map(|c| c.iter().map(|&(a, b)| &self.bytes[a..b]))
    }
}

/// Records the agent reads from the ring at once at most.
const BATCH: usize = tracegap_agent::events::MAX_BATCH;

/// [`events`] encoded as the kernel writes them.
pub fn records(n_pairs: usize) -> Records {
    let mut r = Records {
        bytes: Vec::new(),
        bounds: Vec::new(),
    };
    for e in events(n_pairs) {
        let at = r.bytes.len();
        e.encode_into(&mut r.bytes);
        r.bounds.push((at, r.bytes.len()));
    }
    r
}

/// What the agent does from ring-buffer record to span: decode the
/// records a batch at a time (their payloads copied out into one buffer),
/// then [`UserSpace`]. Returns spans built.
pub fn pipeline_records(records: &Records) -> usize {
    let mut spans = 0;
    let mut on_span = |s| {
        std::hint::black_box(s);
        spans += 1;
    };
    let (mut u, mut decoder) = (UserSpace::default(), BatchDecoder::default());
    let mut batch = Vec::with_capacity(BATCH);
    for records in records.batches(BATCH) {
        decoder.decode_all(records, &mut batch);
        for e in batch.drain(..) {
            u.push(e, &mut on_span);
        }
    }
    spans
}

/// [`run_pipeline`], counting the spans built. Returns spans built.
pub fn pipeline(events: Vec<RawEvent>) -> usize {
    let mut spans = 0;
    run_pipeline(events, |s| {
        std::hint::black_box(s);
        spans += 1;
    });
    spans
}

fn user_space(d: Durations, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let pairs = if d.rounds > 1 { 250_000 } else { 50_000 };
    // Generated before the clock starts: the figure is the pipeline's,
    // from ring-buffer record to span, as the agent runs it (each record
    // decoded and its payload copied out, then freed once handled: the
    // allocator sees what it sees in the agent).
    let recs = records(pairs);
    let n = recs.len() as f64;
    // The baseline: the least any reader does per record, on the same
    // records: copy its payload out and hash its flow. It says what this
    // machine's core and memory do, so the ratio carries to other machines.
    let mut floor_rates = Vec::new();
    for _ in 0..3 {
        let hasher = std::hash::RandomState::new();
        let t = Instant::now();
        for r in recs.iter() {
            use std::hash::BuildHasher as _;
            // The flow key sits after the 8-byte timestamp; the payload
            // after the header.
            std::hint::black_box(hasher.hash_one(r.get(8..48)));
            std::hint::black_box(
                r.get(tracegap_common::EVENT_HEADER_LEN..)
                    .map(<[u8]>::to_vec),
            );
        }
        floor_rates.push(n / t.elapsed().as_secs_f64());
    }
    let floor = Spread::of(floor_rates);
    let mut rates = Vec::new();
    let mut spans = 0;
    for _ in 0..d.rounds.max(1) {
        let t = Instant::now();
        spans = pipeline_records(&recs);
        rates.push(n / t.elapsed().as_secs_f64());
    }
    let rate = Spread::of(rates);
    let k = |v: f64| format!("{:.0}k/s", v / 1000.0);
    rows.push(row(
        "user space: events/s from ring-buffer record through decode, parse, pair, classify, span (1 core)",
        format!("{} (copy + hash of each record)", floor.show(k)),
        rate.show(k),
        format!(
            "{:.1}% of the baseline's rate; {spans} spans built",
            rate.med / floor.med * 100.0
        ),
        "≥ 2000k/s",
        Some(rate.med >= 2_000_000.0),
    ));
    agent_pipeline(d, 1e9 / floor.med, rows);

    // Export to a real OTLP receiver (gRPC, default batching).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(EXPORT_THREAD)
        .enable_all()
        .build()?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let n_spans = if d.rounds > 1 { 100_000 } else { 20_000 };
    // Half of the generated hops are gaps: twice as many pairs as spans.
    let mut built = Vec::with_capacity(n_spans);
    run_pipeline(events(n_spans * 2), |s| built.push(s));
    let metrics = std::sync::Arc::new(Metrics::new());
    let cfg = ExportConfig {
        endpoint: Some(format!("http://127.0.0.1:{}", receiver.grpc.port())),
        queue: n_spans + 1,
        ..ExportConfig::default()
    };
    let total = built.len();
    let t = Instant::now();
    let cpu0 = (
        sched::Account::named(EXPORT_THREAD).run_ns,
        sched::Account::named(crate::store::RECEIVER_THREAD).run_ns,
    );
    rt.block_on(async {
        let (queue, task) = export::start(cfg, metrics.clone(), Default::default())?;
        for s in built {
            queue.offer(s);
        }
        drop(queue);
        let _ = task.await;
        Ok::<_, anyhow::Error>(())
    })?;
    // Counted, not copied: copying 100k received spans per poll would take
    // the CPU the export is measured on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.count() < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = receiver.count();
    let took = t.elapsed().as_secs_f64();
    let rate = got as f64 / took;
    // Whose CPU bounds the rate: the exporter's (tracegap's: batching,
    // encoding, gRPC) or the receiver's one thread (the lab's: decoding and
    // storing every span).
    let exporter_ns = sched::Account::named(EXPORT_THREAD)
        .run_ns
        .saturating_sub(cpu0.0) as f64;
    let receiver_ns = sched::Account::named(crate::store::RECEIVER_THREAD)
        .run_ns
        .saturating_sub(cpu0.1) as f64;
    let per_span_us = exporter_ns / got.max(1) as f64 / 1e3;
    rows.push(row(
        "user space: spans/s exported over OTLP/gRPC to a real receiver",
        "-".into(),
        format!("{:.0}k spans/s", rate / 1000.0),
        format!(
            "{got} of {total} received; the exporter's CPU {per_span_us:.2} µs per span ({:.0}k spans/s per core), the receiver's one thread busy {:.0}% of the run",
            1e3 / per_span_us.max(1e-9),
            receiver_ns / 1e9 / took * 100.0
        ),
        "≥ 200k/s",
        Some(rate >= 200_000.0),
    ));
    Ok(())
}

/// The agent's own pipeline ([`tracegap_agent::replay::Replay`]: assembly,
/// HTTP/2, pairing, classification, identities, metrics, the report) on a
/// healthy node's traffic in the steady state: per HTTP/1.1 request and
/// per unary gRPC call, its time on one core and its heap allocations
/// (counted by the lab's allocator). `floor_ns`: the copy-and-hash
/// baseline per event.
fn agent_pipeline(d: Durations, floor_ns: f64, rows: &mut Vec<Row>) {
    use tracegap_agent::{gap::classify::MAX_PER_POD, replay::Replay};
    const CONNECTIONS: u32 = 8;
    // Past the engine's per-pod history: each request replaces one.
    let warm_calls = (MAX_PER_POD + 1024) * CONNECTIONS as usize;
    let calls = warm_calls + if d.rounds > 1 { 100_000 } else { 20_000 };
    let counting = allocs::installed();
    for (what, records, warm, target_ns) in [
        (
            "HTTP/1.1 request",
            healthy::records(CONNECTIONS, calls as u32),
            2 * warm_calls,
            1000.0,
        ),
        (
            "unary gRPC call",
            grpc_stream::records(CONNECTIONS, calls as u32),
            2 * CONNECTIONS as usize + 2 * warm_calls,
            600.0,
        ),
    ] {
        let mut ns = Vec::new();
        let mut allocations = 0.0;
        for _ in 0..d.rounds.max(1) {
            let mut r = Replay::new(&healthy::replay_config(CONNECTIONS));
            let s = healthy::agent_steady_state(&mut r, &records, warm);
            // Two events per call: its request's and its answer's.
            ns.push(2.0 * s.ns_per_event);
            allocations = 2.0 * s.allocations_per_event;
        }
        let ns = Spread::of(ns);
        let allocated = if counting {
            format!("{allocations:.3} allocations")
        } else {
            "allocations not counted (no counting allocator)".into()
        };
        rows.push(row(
            &format!(
                "user space: the agent's whole pipeline per healthy {what}, steady state (1 core)"
            ),
            format!("{:.0} ns (copy + hash of its two records)", 2.0 * floor_ns),
            format!("{} ns, {allocated}", ns.show(|v| format!("{v:.0}"))),
            format!("{:.1}× the baseline", ns.med / (2.0 * floor_ns)),
            &format!("≤ {target_ns:.0} ns, 0 allocations"),
            Some(ns.med <= target_ns && counting && allocations < 0.01),
        ));
    }
}

/// The export bench's runtime threads.
const EXPORT_THREAD: &str = "tg-export";

/// Peak RSS (VmHWM) of this process, in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Holds `flows` concurrent open flows with a request in flight each (the
/// agent's per-flow state), then reports this process's peak RSS.
pub fn hold_flows(flows: usize) -> u64 {
    // Requests only: every flow stays open, nothing completes. The state
    // is dropped when the pipeline returns; VmHWM keeps its peak.
    let requests = events(flows).filter(|e| e.kind == EventKind::Request);
    run_pipeline(requests, |_| {});
    peak_rss_kib()
}

fn memory(lab_bin: &std::path::Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let rss = |n: usize| -> anyhow::Result<u64> {
        let out = crate::netns::run(Command::new(lab_bin).args([
            "bench-memory",
            "--flows",
            &n.to_string(),
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    let base = rss(0)?;
    let mut figures = HashMap::new();
    for n in [1_000, 10_000, 100_000] {
        figures.insert(n, rss(n)?);
    }
    let mib = |k: u64| k as f64 / 1024.0;
    let f100k = figures[&100_000];
    let per_flow = (f100k.saturating_sub(figures[&10_000])) as f64 * 1024.0 / 90_000.0;
    rows.push(row(
        "memory: peak RSS with 1k / 10k / 100k open flows",
        format!("{:.1} MiB (no flows)", mib(base)),
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            mib(figures[&1_000]),
            mib(figures[&10_000]),
            mib(f100k)
        ),
        format!("~{per_flow:.0} B per flow"),
        "< 64 MiB at 100k, linear",
        Some(mib(f100k) < 64.0),
    ));
    Ok(())
}

/// Which request each call was made for, at 1 to 64 in flight, for a
/// thread-per-request service (with the thread programs, and the same run
/// without them as the baseline) and for an async one (see
/// [`crate::causality`]).
fn causality(rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use crate::{
        causality::{LEVELS, measure},
        service::Runtime,
    };
    let with = measure(&LEVELS, true, false, Runtime::Threads)?;
    let without = measure(&LEVELS, false, false, Runtime::Threads)?;
    let show = |l: &crate::causality::Level| {
        format!(
            "{} right, {} wrong, {} unplaced",
            l.right, l.wrong, l.unplaced
        )
    };
    for (w, b) in with.levels.iter().zip(&without.levels) {
        let share = w.right as f64 / w.hops.max(1) as f64 * 100.0;
        rows.push(row(
            &format!(
                "stitching a thread-per-request service's calls, {} in flight ({} hops, think time up to {} ms; thread turns from {}): parents against the service's own record, without / with thread evidence",
                w.in_flight,
                w.hops,
                crate::causality::THINK.as_millis(),
                with.source
            ),
            show(b),
            show(w),
            format!("{share:.1}% under the right parent, {} under a wrong one", w.wrong + b.wrong),
            "≥ 99% right, 0 wrong",
            Some(share >= 99.0 && w.wrong + b.wrong == 0),
        ));
    }
    let without = measure(&LEVELS, false, false, Runtime::Async)?;
    let with = measure(&LEVELS, true, false, Runtime::Async)?;
    for (a, b) in with.levels.iter().zip(&without.levels) {
        let share = a.right as f64 / a.hops.max(1) as f64 * 100.0;
        rows.push(row(
            &format!(
                "stitching an async service's calls (one thread for all requests, each reading its call's answer), {} in flight ({} hops): parents against its own record, without / with thread evidence (handoff)",
                a.in_flight, a.hops,
            ),
            show(b),
            show(a),
            format!("{share:.1}% under the right parent, {} under a wrong one", a.wrong),
            if a.in_flight == 16 { "≥ 90% right, 0 wrong" } else { "0 wrong" },
            Some(a.wrong + b.wrong == 0 && (a.in_flight != 16 || share >= 90.0)),
        ));
    }
    let unplaced = measure(&LEVELS, true, false, Runtime::AsyncHanded)?;
    let timed = measure(&LEVELS, true, true, Runtime::AsyncHanded)?;
    for (a, b) in timed.levels.iter().zip(&unplaced.levels) {
        let share = a.right as f64 / a.hops.max(1) as f64 * 100.0;
        rows.push(row(
            &format!(
                "stitching an async service's calls whose answers are handed between tasks (handoff distrusted), {} in flight ({} hops): parents against its own record, by default / with --place-by-timing",
                a.in_flight, a.hops,
            ),
            show(b),
            show(a),
            format!("{share:.1}% under the right parent, {} under a wrong one", a.wrong),
            "0 wrong",
            Some(a.wrong + b.wrong == 0),
        ));
    }
    Ok(())
}

/// Runs everything and renders the table.
/// `floor`: the assembled `lab/bpf/floor.s`, the kernel figures' baseline
/// (None: they are shown without one).
pub fn run(
    d: Durations,
    lab_bin: &std::path::Path,
    floor: Option<&[u8]>,
) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    // First, while the kernel's statistics are off.
    eprintln!("bench: the thread programs on each socket send and receive");
    let ops = sockets::measure(floor, d.socket_ops, d.socket_rounds)?;
    eprintln!("bench: data path (wrk, iperf3, BPF statistics, detection latency)");
    data_path(d, floor, &ops, &mut rows)?;
    eprintln!("bench: where HTTP/1.1's p99 at saturation comes from");
    tail::rows(d, &mut rows)?;
    eprintln!("bench: the agent at rest and at low request rates");
    rest::rows(d, &mut rows)?;
    eprintln!("bench: HTTPS through OpenSSL");
    tls::rows(d, &mut rows)?;
    eprintln!("bench: the cluster-wide view from Prometheus");
    quality::rows(d, &mut rows)?;
    eprintln!("bench: user-space pipeline and export");
    user_space(d, &mut rows)?;
    eprintln!("bench: memory");
    memory(lab_bin, &mut rows)?;
    eprintln!("bench: stitching under load, against the breaking service's own record");
    causality(&mut rows)?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {cpu}, {cpus} CPUs; kernel {}; load {} s x {} round(s) per figure.\n",
        kernel.trim(),
        d.load.as_secs(),
        d.rounds
    );
    out.push_str("| measure | baseline | with tracegap | figure | target | met |\n| --- | --- | --- | --- | --- | --- |\n");
    for r in &rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {met} |",
            r.what, r.baseline, r.with, r.figure, r.target
        );
    }
    Ok(out)
}
