//! `cargo xtask bench`: builds the lab in release mode (the agent inside it,
//! with its eBPF programs) and runs `tracegap-lab bench` as root. The table
//! goes to stdout and to target/bench/bench.md.

use anyhow::bail;

use crate::{setup, toolchain};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Short loads: a smoke run, not figures to quote.
    #[arg(long)]
    quick: bool,
    /// Only the kernel programs on crafted packets, whole and with each
    /// step switched off, beside an empty program (BPF_PROG_TEST_RUN).
    #[arg(long)]
    kernel: bool,
    /// Only what the thread programs add to each socket send and receive,
    /// with the kernel's statistics off, beside an empty program.
    #[arg(long, conflicts_with = "kernel")]
    sockets: bool,
    /// Only what reading HTTPS through OpenSSL costs a request: wrk over
    /// TLS without the agent, with its OpenSSL probes off and on.
    #[arg(long, conflicts_with_all = ["kernel", "sockets"])]
    tls: bool,
    /// Only what a cluster-wide Trace Quality page costs: tracegap
    /// quality's report from a real Prometheus after the lab's load.
    #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls"])]
    quality: bool,
    /// Only what the agent costs a quiet node: its CPU and wakeups with its
    /// veths attached and no traffic, and at 10, 50 and 200 requests/s
    /// over HTTP/1.1 and gRPC.
    #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls", "quality"])]
    rest: bool,
    /// Only user space on one core, without the kernel or a network: the
    /// pipeline's events/s, the agent's time and heap allocations per
    /// healthy HTTP/1.1 request and gRPC call, span export.
    #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls", "quality", "rest"])]
    pipeline: bool,
    /// Only where HTTP/1.1's p99 at saturation comes from: the echo load
    /// with nothing attached, the kernel programs alone, the agent, the
    /// agent at nice 19, with the scheduler's account of each side's
    /// threads (waiting for a CPU, preempted).
    #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls", "quality", "rest", "pipeline"])]
    tail: bool,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench creates network namespaces and loads eBPF programs: run it as root");
    }
    let route = setup::ensure(true)?;
    if !args.kernel && !args.sockets && !args.pipeline {
        setup::ensure_packages(&["wrk", "iperf3", "nghttp2-client"])?;
    }
    toolchain::run(toolchain::cargo(&route).args([
        "build",
        "--release",
        "--package",
        "tracegap-lab",
    ]))?;
    let root = toolchain::workspace_root();
    // The kernel figures' baseline: an empty program, assembled here.
    let floor = root.join("target/bench/floor.o");
    std::fs::create_dir_all(root.join("target/bench"))?;
    toolchain::assemble_bpf(&root.join("lab/bpf/floor.s"), &floor)?;
    let mut cmd = std::process::Command::new(root.join("target/release/tracegap-lab"));
    cmd.current_dir(&root)
        .args(["bench", "--out", "target/bench/bench.md", "--floor-object"])
        .arg(&floor);
    if args.quick {
        cmd.arg("--quick");
    }
    if args.kernel {
        cmd.arg("--kernel");
    }
    if args.sockets {
        cmd.arg("--sockets");
    }
    if args.tls {
        cmd.arg("--tls");
    }
    if args.quality {
        cmd.arg("--quality");
    }
    if args.rest {
        cmd.arg("--rest");
    }
    if args.pipeline {
        cmd.arg("--pipeline");
    }
    if args.tail {
        cmd.arg("--tail");
    }
    if !args.kernel && !args.sockets && !args.tls && !args.pipeline && !args.tail {
        // The cluster-wide view's row: Debian's Prometheus, unpacked.
        match setup::prometheus() {
            Ok(bin) => {
                cmd.env("TRACEGAP_PROMETHEUS_BIN", bin);
            }
            Err(e) => println!("bench: no Prometheus ({e:#}): no cluster-view row"),
        }
    }
    toolchain::run(&mut cmd)
}
