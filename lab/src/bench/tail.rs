//! Where HTTP/1.1's p99 at saturation comes from (issue 33): the same
//! echo load with nothing attached, with tracegap's kernel programs alone
//! (their ring drained and dropped by a plain thread: the kernel path with
//! next to no reader), with the agent, and with the agent at the lowest
//! CPU weight. Beside each, the scheduler's account of the load's own
//! threads (the echo server's, wrk's) and of the reader's: time spent
//! runnable but waiting for a CPU, and involuntary switches (preempted).
//! A tail the kernel path makes shows without the agent; one the agent
//! makes by competing for the CPUs shows as the load's threads waiting.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tracegap_agent::ebpf::{LoadOptions, Observer};

use super::{
    Durations, Row, Spread, WRK_CONNECTIONS, Wrk, agent_config, pct, row, sched::Account, wrk,
};
use crate::{
    agent::{Agent, THREAD_NAME},
    http::{HttpServer, Serving},
    netns::Node,
    store::Receiver,
};

/// The thread that drains the kernel programs' ring alone.
const DRAIN_NAME: &str = "tg-drain";
/// The thread that samples the others.
const SAMPLER_NAME: &str = "tg-sched";
/// How often the threads are sampled: a connection's thread that ends
/// loses at most this much of its account.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Whose a thread is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Side {
    /// The echo server's threads (this process's, but for the others).
    Server,
    /// wrk's threads.
    Client,
    /// The agent's or the plain drain's.
    Reader,
}

/// Per side, what its threads did while the sampler ran: each thread's
/// last account less its first (a thread born meanwhile starts at zero).
#[derive(Default)]
struct Sampled {
    first: HashMap<(u32, u32), Account>,
    last: HashMap<(u32, u32), (Side, Account)>,
}

impl Sampled {
    /// Reads every thread's account; `initial`: the window starts now.
    /// This process's threads born later start at zero, wrk's at their
    /// first sample (it is found once it runs).
    fn sample(&mut self, wrk: &mut Option<u32>, initial: bool) {
        let mut tasks = Vec::new();
        let me = std::process::id();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            tasks.extend(dir.flatten().map(|t| (me, t.path())));
        }
        if wrk.is_none() {
            *wrk = child_named("wrk");
        }
        if let Some(pid) = *wrk
            && let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task"))
        {
            tasks.extend(dir.flatten().map(|t| (pid, t.path())));
        }
        for (pid, path) in tasks {
            let Some(tid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let side = match comm.trim_end() {
                SAMPLER_NAME => continue,
                _ if pid != me => Side::Client,
                THREAD_NAME | DRAIN_NAME => Side::Reader,
                _ => Side::Server,
            };
            let Some(a) = Account::of(&path) else {
                continue;
            };
            if initial || pid != me {
                self.first.entry((pid, tid)).or_insert(a);
            }
            self.last.insert((pid, tid), (side, a));
        }
    }

    fn totals(&self) -> HashMap<Side, Account> {
        let mut out: HashMap<Side, Account> = HashMap::new();
        for (key, (side, last)) in &self.last {
            let first = self.first.get(key).copied().unwrap_or_default();
            *out.entry(*side).or_default() += last.since(first);
        }
        out
    }
}

/// This process's child named `name` (`nsenter` execs the command,
/// so the wrk the bench started is its child): its pid. Any other wrk on
/// the machine is not this bench's.
fn child_named(name: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
        let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)?
            .parse::<u32>()
            .ok()?;
        (&stat[open + 1..close] == name && ppid == me).then_some(pid)
    })
}

/// One load: wrk's figures and the threads' accounts.
struct Measured {
    wrk: Wrk,
    sides: HashMap<Side, Account>,
}

impl Measured {
    /// `f` of `side`'s account per request.
    fn per_request(&self, side: Side, f: fn(&Account) -> u64) -> f64 {
        let a = self.sides.get(&side).copied().unwrap_or_default();
        f(&a) as f64 / self.wrk.requests.max(1.0)
    }
}

/// wrk's echo load while the threads are sampled.
fn measured(node: &Node, url: &str, d: Duration) -> anyhow::Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sampler = std::thread::Builder::new()
        .name(SAMPLER_NAME.into())
        .spawn(move || {
            let (mut sampled, mut wrk) = (Sampled::default(), None);
            sampled.sample(&mut wrk, true);
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE_EVERY);
                sampled.sample(&mut wrk, false);
            }
            sampled.totals()
        })?;
    let w = wrk(node, url, d);
    stop.store(true, Ordering::Relaxed);
    let sides = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
    Ok(Measured { wrk: w?, sides })
}

/// tracegap's kernel programs on the node's veths with no agent: one
/// thread drains their ring and drops every record.
struct KernelOnly {
    observer: Observer,
    stop: Arc<AtomicBool>,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl KernelOnly {
    fn attach(node: &Node) -> anyhow::Result<Self> {
        let mut observer = Observer::load_with(LoadOptions {
            tls_plaintext: false,
            ..LoadOptions::default()
        })
        .context("loading tracegap's programs")?;
        for p in &node.pods {
            observer.attach(&p.host_if)?;
        }
        let mut ring = observer.take_events()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let drain = std::thread::Builder::new()
            .name(DRAIN_NAME.into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    while ring.next().is_some() {}
                    std::thread::sleep(Duration::from_millis(1));
                }
            })?;
        Ok(Self {
            observer,
            stop,
            drain: Some(drain),
        })
    }
}

impl Drop for KernelOnly {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
        let _ = self.observer.detach_all();
    }
}

/// The variants, in the order each round runs them.
const VARIANTS: [&str; 4] = [
    "nothing attached",
    "kernel programs only (their ring drained and dropped)",
    "the agent",
    "the agent at nice 19",
];

pub(super) fn rows(d: Durations, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let node = Node::new(&["client", "server"])?;
    let quiet = Serving {
        record: false,
        ..Serving::default()
    };
    let _http = HttpServer::start_with(node.pod("server"), 8080, quiet)?;
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("http://{}:8080/bench", node.pod("server").ipv4);
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let mut runs: Vec<Vec<Measured>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    for round in 0..d.rounds {
        eprintln!(
            "bench: the p99's source, round {} of {}",
            round + 1,
            d.rounds
        );
        runs[0].push(measured(&node, &url, d.load)?);
        {
            let _kernel = KernelOnly::attach(&node)?;
            std::thread::sleep(Duration::from_millis(300));
            runs[1].push(measured(&node, &url, d.load)?);
        }
        for (i, nice) in [(2, 0), (3, 19)] {
            let agent = Agent::start_with(agent_config(&node, &receiver), None, nice)?;
            std::thread::sleep(Duration::from_millis(300));
            runs[i].push(measured(&node, &url, d.load)?);
            agent.stop()?;
        }
    }
    let base = &runs[0];
    let med =
        |v: &[Measured], f: &dyn Fn(&Measured) -> f64| Spread::of(v.iter().map(f).collect()).med;
    let per_request =
        |side, f: fn(&Account) -> u64| move |x: &Measured| x.per_request(side, f) / 1e3;
    let show = |m: &[Measured]| {
        format!(
            "{:.0} requests/s, mean {:.3} ms ({WRK_CONNECTIONS} connections / requests/s: {:.3} ms), p99 {:.3} ms; per request: server threads wait {:.2} µs, preempted {:.1} times per 1k requests; wrk waits {:.2} µs; reader on a CPU {:.2} µs, waits {:.2} µs",
            med(m, &|x| x.wrk.rps),
            med(m, &|x| x.wrk.mean_ms),
            med(m, &|x| WRK_CONNECTIONS as f64 / x.wrk.rps * 1e3),
            med(m, &|x| x.wrk.p99_ms),
            med(m, &per_request(Side::Server, |a| a.wait_ns)),
            med(m, &|x| x.per_request(Side::Server, |a| a.preempted) * 1e3),
            med(m, &per_request(Side::Client, |a| a.wait_ns)),
            med(m, &per_request(Side::Reader, |a| a.run_ns)),
            med(m, &per_request(Side::Reader, |a| a.wait_ns)),
        )
    };
    let p99_noise = Spread::of(base.iter().map(|x| x.wrk.p99_ms).collect()).noise_pct();
    for (name, m) in VARIANTS.iter().zip(&runs).skip(1) {
        // Each round against the same round's baseline.
        let change = |f: fn(&Measured) -> f64| {
            Spread::of(base.iter().zip(m).map(|(b, w)| pct(f(w), f(b))).collect())
        };
        let (rps, mean, p99) = (
            change(|x| x.wrk.rps),
            change(|x| x.wrk.mean_ms),
            change(|x| x.wrk.p99_ms),
        );
        let waits = med(m, &per_request(Side::Server, |a| a.wait_ns))
            - med(base, &per_request(Side::Server, |a| a.wait_ns));
        rows.push(row(
            &format!(
                "where HTTP/1.1's p99 at saturation comes from (wrk -t2 -c{WRK_CONNECTIONS}, echo server): {name}"
            ),
            show(base),
            show(m),
            format!(
                "requests/s {:+.1}%, mean latency {:+.1}% (as Little's law has it from requests/s: {:+.1}%), p99 {:+.1}% (rounds {:+.1}…{:+.1}%; baseline's own rounds ±{p99_noise:.0}%); the server's threads wait {waits:+.2} µs more per request",
                rps.med,
                mean.med,
                (1.0 / (1.0 + rps.med / 100.0) - 1.0) * 100.0,
                p99.med,
                p99.min,
                p99.max
            ),
            "-",
            None,
        ));
    }
    Ok(())
}
