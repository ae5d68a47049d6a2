//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` for a bounded
//! time. libFuzzer needs a nightly compiler: rustup nightly (with
//! AddressSanitizer), or Debian's rustc-web with RUSTC_BOOTSTRAP=1, which
//! ships no sanitizer runtimes, so it fuzzes with coverage only.

use crate::toolchain::{self, Route};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Target to run (see fuzz/fuzz_targets).
    #[arg(default_value = "http_head")]
    target: String,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let route = crate::setup::ensure(false)?;
    if toolchain::installed_binary("cargo-fuzz").is_none() {
        toolchain::run(toolchain::plain_cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(toolchain::workspace_root().join("fuzz"))
        .args(["run", route.toolchain(), "cargo", "fuzz", "run"]);
    if route == Route::Debian {
        cmd.env("RUSTC_BOOTSTRAP", "1")
            .args(["--sanitizer", "none"]);
    }
    // The fuzz targets read the parsers only: no eBPF object needed.
    cmd.env("AYA_BUILD_SKIP", "1")
        .arg(&args.target)
        .arg("--")
        .arg(format!("-max_total_time={}", args.seconds));
    toolchain::run(&mut cmd)
}
