//! HTTPS through OpenSSL: what reading its plaintext costs a request. The
//! same load three times a round: without the agent, with it and its
//! OpenSSL probes off (`--tls-plaintext=false`: TLS counted, not read),
//! and with them on (every request read in the clear, a hop). wrk links
//! OpenSSL, and so does the lab's TLS service: each request passes four
//! probed calls (the client's write and read, the server's read and
//! write), each an entry and a return probe.

use std::{net::Ipv4Addr, time::Duration};

use tracegap_agent::agent::AgentConfig;

use super::{Durations, Row, Spread, agent_config, bpf_stats, http_rows, row, wrk};
use crate::{
    agent::Agent,
    netns::Node,
    service::{Behaviour, ServiceSpec},
    store::Receiver,
};

const PORT: u16 = 8443;

pub(super) fn rows(d: Durations, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let node = Node::new(&["client", "server"])?;
    let receiver = Receiver::start(Ipv4Addr::LOCALHOST.into())?;
    let spec = ServiceSpec {
        tls: true,
        ..ServiceSpec::new("server", PORT, Behaviour::DropsHeaders)
    };
    let _server = spec.start(node.pod("server"))?;
    let url = format!("https://{}:{PORT}/", node.pod("server").ipv4);
    // BPF run-time statistics, on while this is held: the programs' own
    // time (the uprobes' traps are not in it).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let (mut base, mut off, mut on) = (vec![], vec![], vec![]);
    let (mut off_kernel, mut on_kernel, mut read) = (vec![], vec![], vec![]);
    let mut unread = 0.0;
    for round in 0..d.rounds {
        eprintln!(
            "bench: HTTPS through OpenSSL, round {} of {}",
            round + 1,
            d.rounds
        );
        base.push(wrk(&node, &url, d.load)?);
        for probes in [false, true] {
            let agent = Agent::start(AgentConfig {
                tls_plaintext: probes,
                ..agent_config(&node, &receiver)
            })?;
            std::thread::sleep(Duration::from_millis(300));
            let (_, _, k0) = bpf_stats(&agent)?;
            let hops0 = agent.metric("tracegap_http_requests_total")?;
            let w = wrk(&node, &url, d.load)?;
            std::thread::sleep(Duration::from_millis(600));
            let (_, _, k1) = bpf_stats(&agent)?;
            if probes {
                let hops = agent.metric("tracegap_http_requests_total")? - hops0;
                read.push(hops / w.requests.max(1.0) * 100.0);
                unread += agent.metric("tracegap_tls_unread_connections_total")?;
                on_kernel.push(k1 - k0);
                on.push(w);
            } else {
                off_kernel.push(k1 - k0);
                off.push(w);
            }
            agent.stop()?;
        }
    }
    let what = "HTTPS, HTTP/1.1 over OpenSSL (wrk -t2 -c16 against the lab's TLS service)";
    http_rows(
        &format!("{what}, the agent with its OpenSSL probes off"),
        &base,
        &off,
        &off_kernel,
        (5.0, Some(10.0), 5.0),
        rows,
    );
    // With the probes: against the agent without them, same round. No
    // target: a uprobe's cost is the kernel's trap on each probed call
    // (eight per request here, an entry and a return at each of the four
    // calls), which no program of tracegap's can make cheaper.
    let pair = |f: fn(&super::Wrk) -> f64| {
        let ratio: Vec<f64> = off
            .iter()
            .zip(&on)
            .map(|(a, b)| super::pct(f(b), f(a)))
            .collect();
        (
            Spread::of(off.iter().map(f).collect()),
            Spread::of(on.iter().map(f).collect()),
            Spread::of(ratio),
        )
    };
    let (o, n, r) = pair(|w| w.rps);
    rows.push(row(
        &format!("{what}: requests/s, the agent with its OpenSSL probes off / on"),
        o.show(|v| format!("{v:.0}")),
        n.show(|v| format!("{v:.0}")),
        format!("{:+.1}%", r.med),
        "-",
        None,
    ));
    for (name, f) in [
        ("p50", (|w: &super::Wrk| w.p50_ms) as fn(&super::Wrk) -> f64),
        ("p99", |w: &super::Wrk| w.p99_ms),
    ] {
        let (o, n, r) = pair(f);
        rows.push(row(
            &format!("{what}: {name} latency, probes off / on"),
            o.show(|v| format!("{v:.3} ms")),
            n.show(|v| format!("{v:.3} ms")),
            format!("{:+.1}%", r.med),
            "-",
            None,
        ));
    }
    let agent_us = Spread::of(
        on.iter()
            .map(|w| w.agent_s / w.requests.max(1.0) * 1e6)
            .collect(),
    );
    let programs_us = Spread::of(
        on.iter()
            .zip(&on_kernel)
            .map(|(w, k)| k / w.requests.max(1.0) * 1e6)
            .collect(),
    );
    // The probes' own cost: the machine's CPU per request with them on
    // against off, same round (the uprobes' traps, which no BPF statistic
    // counts, are in it).
    let us = |w: &super::Wrk| w.busy_s / w.requests.max(1.0) * 1e6;
    let (o, n) = (
        Spread::of(off.iter().map(us).collect()),
        Spread::of(on.iter().map(us).collect()),
    );
    let added: Vec<f64> = off.iter().zip(&on).map(|(a, b)| us(b) - us(a)).collect();
    let added = Spread::of(added);
    let read = Spread::of(read);
    rows.push(row(
        &format!(
            "{what}: the machine's CPU per request, probes off / on; requests read as hops with them on (TLS connections left unread: {unread:.0})"
        ),
        o.show(|v| format!("{v:.1} µs")),
        n.show(|v| format!("{v:.1} µs")),
        format!(
            "{:+.1} µs per request ({:+.1}%; of it the agent's {:.1} µs and every program's {:.1} µs, the rest the uprobes' traps), four probed calls; {} of the requests read",
            added.med,
            added.med / o.med * 100.0,
            agent_us.med,
            programs_us.med,
            read.show(|v| format!("{v:.0}%"))
        ),
        "every request read",
        Some(read.min >= 99.0),
    ));
    Ok(())
}
