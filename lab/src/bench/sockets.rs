//! What the thread programs cost each socket send and receive on the node,
//! beside an empty program on the same two tracepoints: a loop of one-byte
//! sends and reads over a socket pair, the kernel's statistics timing each
//! run, in blocks that take turns. The socket is no relay's (an echo
//! server's, a load generator's, most of a node's): after its first
//! operation the programs find it in their memo, as they find any such
//! socket, a TCP one too. The statistics time every run between two clock
//! reads, so the empty program's figure is mostly that measurement, and
//! what the programs do themselves is their figure less the empty one's.
//! (The loop's CPU time with and without the programs, statistics off,
//! spreads by ±15% per block on this kind of machine: no figure.)

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
};

use anyhow::Context as _;
use tracegap_agent::ebpf::Observer;

use super::{Spread, run_stats};

/// Nanoseconds per program run, each block's.
pub struct SocketOps {
    /// The empty program's (None without the floor object).
    pub empty: Option<Spread>,
    pub threads: Spread,
}

impl SocketOps {
    /// What the programs do beyond what any program on these hooks costs
    /// (ns per run).
    pub fn own(&self) -> Option<f64> {
        self.empty.as_ref().map(|e| self.threads.med - e.med)
    }
}

/// The empty raw tracepoint programs of `lab/bpf/floor.s`.
const FLOOR_PROGRAMS: [(&str, &str); 2] = [
    ("tracegap_floor_send", "sock_send_length"),
    ("tracegap_floor_recv", "sock_recv_length"),
];

/// `blocks` turns of every configuration, `ops` operations (half sends,
/// half receives) per block.
pub fn measure(floor: Option<&[u8]>, ops: usize, blocks: usize) -> anyhow::Result<SocketOps> {
    let mut floor = floor
        .map(|object| -> anyhow::Result<aya::Ebpf> {
            let mut ebpf = aya::Ebpf::load(object).context("loading the floor object")?;
            for (name, _) in FLOOR_PROGRAMS {
                program(&mut ebpf, name)?.load()?;
            }
            Ok(ebpf)
        })
        .transpose()?;
    let mut observer = Observer::load().context("loading tracegap's programs")?;
    anyhow::ensure!(
        observer.thread_evidence().as_str() == "tracepoints",
        "the thread programs are not on the socket tracepoints: {:?}",
        observer.thread_evidence()
    );
    observer.set_thread_programs(false)?;
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF statistics")?;
    let (mut a, mut b) = UnixStream::pair()?;
    let mut run = || -> std::io::Result<()> {
        let mut byte = [0u8; 1];
        for _ in 0..ops / 2 {
            a.write_all(&[1])?;
            b.read_exact(&mut byte)?;
        }
        Ok(())
    };
    let (mut empty, mut threads) = (vec![], vec![]);
    for _ in 0..blocks {
        if let Some(ebpf) = floor.as_mut() {
            let mut links = Vec::new();
            for (name, tp) in FLOOR_PROGRAMS {
                links.push((name, program(ebpf, name)?.attach(tp)?));
            }
            let before = floor_stats(ebpf)?;
            run()?;
            empty.push(per_run(before, floor_stats(ebpf)?));
            for (name, link) in links {
                program(ebpf, name)?.detach(link)?;
            }
        }
        observer.set_thread_programs(true)?;
        let before = thread_stats(&observer)?;
        run()?;
        threads.push(per_run(before, thread_stats(&observer)?));
        observer.set_thread_programs(false)?;
    }
    Ok(SocketOps {
        empty: (!empty.is_empty()).then(|| Spread::of(empty)),
        threads: Spread::of(threads),
    })
}

fn program<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &str,
) -> anyhow::Result<&'a mut aya::programs::RawTracePoint> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("no {name} in the floor object"))?
        .try_into()?)
}

/// ns per run between two (run time in ns, runs) readings.
fn per_run(before: (f64, f64), after: (f64, f64)) -> f64 {
    (after.0 - before.0) / (after.1 - before.1).max(1.0)
}

fn floor_stats(ebpf: &aya::Ebpf) -> anyhow::Result<(f64, f64)> {
    let (time, runs) = run_stats(ebpf, FLOOR_PROGRAMS.map(|(name, _)| name))?;
    Ok((time.as_nanos() as f64, runs as f64))
}

/// The thread programs' (every program but the TC pair, which sees no
/// packet here).
fn thread_stats(observer: &Observer) -> anyhow::Result<(f64, f64)> {
    let mut sum = (0.0, 0.0);
    for (_, time, runs) in observer.program_stats()? {
        sum.0 += time.as_nanos() as f64;
        sum.1 += runs as f64;
    }
    Ok(sum)
}
