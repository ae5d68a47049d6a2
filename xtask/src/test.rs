//! `cargo xtask test` and `cargo xtask lint`.

use crate::{setup, toolchain};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip the VM tests on other kernels (`cargo xtask vm-test`), which
    /// run after the host's tests when running as root.
    #[arg(long)]
    pub no_vm: bool,
    /// Arguments passed on to `cargo test` (a test name filter, `--nocapture`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let route = setup::ensure(true)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "xtask test: not running as root: the end-to-end tests (network namespaces, \
             eBPF) will be SKIPPED, each with a message; run as root for the full suite"
        );
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // Unit tests and end-to-end tests, in the default members (the eBPF
    // crate only builds for the BPF target, through the agent's build.rs).
    let mut cmd = toolchain::cargo(&route);
    if root {
        // The container test runs the agent's image as deploy/base says:
        // built here, from this tree, and required (not skipped) in this run.
        crate::image::build(&route, None)?;
        cmd.env("TRACEGAP_REQUIRE_IMAGE", crate::image::IMAGE);
        // The TLS test's nginx and the cluster view's Prometheus: unpacked,
        // not installed, and required.
        cmd.env("TRACEGAP_NGINX", setup::nginx()?);
        cmd.env("TRACEGAP_PROMETHEUS_BIN", setup::prometheus()?);
        // The OpenTelemetry SDK's own propagators for other formats.
        cmd.env("TRACEGAP_OTEL_PYTHON", setup::otel_python()?);
        // The browser test: required when its tools could be installed.
        match setup::ensure_browser() {
            Ok(()) => {
                cmd.env("TRACEGAP_REQUIRE_BROWSER", "1");
            }
            Err(e) => println!("xtask test: the browser test will be SKIPPED: {e:#}"),
        }
    }
    cmd.args(["test", "--no-fail-fast"]);
    if !args.cargo_test_args.is_empty() {
        cmd.arg("--").args(&args.cargo_test_args);
    }
    let host = toolchain::run(&mut cmd);
    // The kernel-side tests again, on the other kernels users run: only
    // as root, and not when the run is filtered to some tests.
    let vm = if root && !args.no_vm && args.cargo_test_args.is_empty() {
        crate::vm::run(&crate::vm::VmTestArgs::default())
    } else {
        Ok(())
    };
    host.and(vm)
}

pub fn lint() -> anyhow::Result<()> {
    toolchain::run(toolchain::plain_cargo().args(["fmt", "--all", "--check"]))?;
    crate::layers::check(&toolchain::workspace_root())?;
    // Lints need no eBPF toolchain: build.rs skips the kernel object.
    toolchain::run(toolchain::plain_cargo().env("AYA_BUILD_SKIP", "1").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}
