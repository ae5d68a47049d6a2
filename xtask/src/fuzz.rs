//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` for a bounded
//! time. libFuzzer needs a nightly compiler: rustup nightly (with
//! AddressSanitizer), or Debian's rustc-web with RUSTC_BOOTSTRAP=1, which
//! ships no sanitizer runtimes, so it fuzzes with coverage only.

use crate::toolchain::{self, Route};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Target to run (see fuzz/fuzz_targets); every target when omitted.
    target: Option<String>,
    /// Stop each target after this many seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Stop each target after this many executions (0: no limit).
    #[arg(long, default_value_t = 0)]
    runs: u64,
}

/// The targets in fuzz/fuzz_targets, in the order they run.
const TARGETS: [&str; 3] = ["http_head", "event_stream", "h2"];

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let route = crate::setup::ensure(false)?;
    if toolchain::installed_binary("cargo-fuzz").is_none() {
        toolchain::run(toolchain::plain_cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let targets = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    for target in targets {
        fuzz(&route, target, args)?;
    }
    Ok(())
}

fn fuzz(route: &Route, target: &str, args: &FuzzArgs) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(toolchain::workspace_root().join("fuzz"))
        .args(["run", route.toolchain(), "cargo", "fuzz", "run"]);
    if *route == Route::Debian {
        cmd.env("RUSTC_BOOTSTRAP", "1")
            .args(["--sanitizer", "none"]);
    }
    // The fuzz targets read the parsers only: no eBPF object needed.
    cmd.env("AYA_BUILD_SKIP", "1")
        .arg(target)
        .arg("--")
        .arg(format!("-max_total_time={}", args.seconds));
    if args.runs > 0 {
        cmd.arg(format!("-runs={}", args.runs));
    }
    toolchain::run(&mut cmd)
}
