//! What a node pays when little is happening (issue 40): the agent's CPU,
//! and how often its threads wake, with its veths attached and no traffic,
//! and at low request rates over HTTP/1 and gRPC. Most nodes carry tens to
//! hundreds of requests a second, and a DaemonSet is paid on every node.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use super::{Durations, Row, agent_config, row};
use crate::{
    agent::Agent,
    http::{HttpServer, Serving},
    netns::{Node, Pod},
    store::Receiver,
};

/// Request rates measured, per second.
const RATES: [u32; 3] = [10, 50, 200];
/// The targets: at rest, and at about 40 gRPC calls a second (checked at
/// 50), in percent of a core.
const REST_TARGET: f64 = 0.1;
const GRPC_TARGET: f64 = 0.3;

/// The agent's threads so far: nanoseconds on a CPU (schedstat's run
/// time: the 10 ms ticks of `stat` are too coarse for a quiet agent), and
/// voluntary context switches (how often they went to sleep, so how often
/// they were woken).
fn agent_threads() -> (u64, u64) {
    let a = super::sched::Account::named(crate::agent::THREAD_NAME);
    (a.run_ns, a.voluntary)
}

/// One measured window: the agent's CPU in percent of a core, its wakeups
/// per second, and the calls made per second.
struct Window {
    cpu_pct: f64,
    wakeups: f64,
    rate: f64,
}

/// Runs `load` (it returns how many calls it made) for `window` while the
/// agent's CPU time and wakeups are counted.
fn measure(
    window: Duration,
    load: impl FnOnce(Duration) -> anyhow::Result<u64>,
) -> anyhow::Result<Window> {
    let ((ns0, woke0), t0) = (agent_threads(), Instant::now());
    let calls = load(window)?;
    let took = t0.elapsed().as_secs_f64();
    let (ns, woke) = agent_threads();
    Ok(Window {
        cpu_pct: ns.saturating_sub(ns0) as f64 / 1e9 / took * 100.0,
        wakeups: woke.saturating_sub(woke0) as f64 / took,
        rate: calls as f64 / took,
    })
}

/// HTTP/1.1 requests with valid context (an instrumented caller's), one
/// keep-alive connection, `rate` a second for `window`.
fn http_paced(pod: &Pod, to: SocketAddr, rate: u32, window: Duration) -> anyhow::Result<u64> {
    let n = (rate as f64 * window.as_secs_f64()).round().max(1.0) as usize;
    let req = b"GET /rest HTTP/1.1\r\nHost: s\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n".to_vec();
    let answers = crate::http::exchange(pod, to, vec![req; n], paced_gap(rate))?;
    Ok(answers.len() as u64)
}

/// The pause between calls for `rate` a second (the calls themselves take
/// a fraction of a millisecond here).
fn paced_gap(rate: u32) -> Duration {
    Duration::from_secs_f64(1.0 / rate.max(1) as f64)
}

/// Unary gRPC calls with valid context on one HTTP/2 connection (a gRPC
/// client's channel), `rate` a second for `window`.
fn grpc_paced(pod: &Pod, authority: String, rate: u32, window: Duration) -> anyhow::Result<u64> {
    pod.spawn(move || -> anyhow::Result<u64> {
        let caller = crate::grpc::Caller::connect(&authority).map_err(anyhow::Error::msg)?;
        let context = [(
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )];
        let (start, mut n) = (Instant::now(), 0);
        while start.elapsed() < window {
            // Any status: the bench's server serves no method (an
            // UNIMPLEMENTED answer, every call still a hop).
            let _ = caller.call("/bench.Echo/Call", &context);
            n += 1;
            std::thread::sleep(paced_gap(rate));
        }
        Ok(n)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("gRPC caller thread panicked"))?
}

pub(super) fn rows(d: Durations, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let window = if d.rounds > 1 {
        Duration::from_secs(12)
    } else {
        Duration::from_secs(3)
    };
    let node = Node::new(&["client", "server"])?;
    let _http = HttpServer::start_with(
        node.pod("server"),
        8080,
        Serving {
            record: false,
            ..Serving::default()
        },
    )?;
    let grpc_server = node
        .pod("server")
        .spawn(|| Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))?
        .join()
        .map_err(|_| anyhow::anyhow!("gRPC server thread panicked"))??;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let server = node.pod("server").ipv4;
    let http_to = SocketAddr::from((server, 8080));
    let grpc_to = format!("{server}:{}", grpc_server.grpc.port());

    let agent = Agent::start(agent_config(&node, &receiver))?;
    // Its start (loading, attaching, the first scans) is not rest.
    std::thread::sleep(Duration::from_secs(2));
    let rest = measure(window, |w| {
        std::thread::sleep(w);
        Ok(0)
    })?;
    rows.push(row(
        &format!(
            "agent CPU at rest: {} veths attached, no traffic",
            node.pods.len()
        ),
        "not running: 0".into(),
        format!("{:.3}% of a core", rest.cpu_pct),
        format!("{:.1} wakeups/s", rest.wakeups),
        &format!("≤ {REST_TARGET}% of a core"),
        Some(rest.cpu_pct <= REST_TARGET),
    ));
    for (proto, grpc) in [("HTTP/1.1", false), ("gRPC", true)] {
        for rate in RATES {
            let w = measure(window, |w| {
                if grpc {
                    grpc_paced(node.pod("client"), grpc_to.clone(), rate, w)
                } else {
                    http_paced(node.pod("client"), http_to, rate, w)
                }
            })?;
            let per_call_us = if w.rate > 0.0 {
                (w.cpu_pct - rest.cpu_pct).max(0.0) / 100.0 / w.rate * 1e6
            } else {
                0.0
            };
            let (target, met) = if grpc && rate == 50 {
                (
                    format!("≤ {GRPC_TARGET}% of a core (issue 40: at ~40 calls/s)"),
                    Some(w.cpu_pct <= GRPC_TARGET),
                )
            } else {
                ("-".to_owned(), None)
            };
            rows.push(row(
                &format!("agent CPU, {proto} at {rate}/s (valid context, one connection)"),
                format!("at rest: {:.3}%", rest.cpu_pct),
                format!("{:.3}% of a core", w.cpu_pct),
                format!(
                    "{:.1} calls/s; {per_call_us:.0} µs per call above rest; {:.1} wakeups/s",
                    w.rate, w.wakeups
                ),
                &target,
                met,
            ));
        }
    }
    // What batching by age costs: a gap's span waits for its wakeup.
    let n = if d.rounds > 1 { 100 } else { 20 };
    let lat = super::detection_ms(&node, http_to, &receiver, n, paced_gap(RATES[0]))?;
    agent.stop()?;
    rows.push(super::detection_row(
        &format!(
            "detection latency at {}/s, gap request → span at the receiver (the kernel wakes the agent by amount or after {} ms)",
            RATES[0],
            tracegap_common::WAKEUP_AGE_NS / 1_000_000
        ),
        &lat,
        "; export batches every 1 s",
    ));
    Ok(())
}
