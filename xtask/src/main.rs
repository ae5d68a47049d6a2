//! `cargo xtask`: the front door for building and testing tracegap.

mod bench;
mod fuzz;
mod image;
mod lab;
mod layers;
mod setup;
mod test;
mod toolchain;
mod verifier;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Set up, build and test tracegap")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building the eBPF programs needs (idempotent; as root on
    /// Debian/Ubuntu it installs, elsewhere it prints what to install).
    Setup(setup::SetupArgs),
    /// Build the agent with its embedded eBPF programs.
    Build(BuildArgs),
    /// The agent's OCI image, offline (buildah, FROM scratch, a static
    /// binary): deploy/Containerfile's agent stage, tagged tracegap:VERSION
    /// in podman's storage and saved as target/image/tracegap.oci.tar.
    Image(image::ImageArgs),
    /// The tracing lab on this machine (as root): every seed scenario, what
    /// tracegap finds, the traces as trees and as a Jaeger JSON file.
    Lab(lab::LabArgs),
    /// Set up if needed, build, then run the unit and end-to-end tests.
    Test(test::TestArgs),
    /// cargo fmt --check, import circles between files (agent, lab), and
    /// cargo clippy on the user-space crates.
    Lint,
    /// What tracegap costs the node, each figure against its baseline from
    /// the same run (as root): a Markdown table on stdout and in
    /// target/bench/bench.md.
    Bench(bench::BenchArgs),
    /// The kernel-side end-to-end tests inside qemu VMs on other kernels
    /// (Debian's 6.1 and 6.12 by default).
    VmTest(vm::VmTestArgs),
    /// Instructions verified and the memory charged while loading, per
    /// program, on this host and the VM kernels (6.1 and 6.12 by default):
    /// a Markdown table on stdout and in target/verifier.md.
    Verifier(verifier::VerifierArgs),
    /// Fuzz the user-space HTTP parsers for a bounded time (cargo-fuzz).
    Fuzz(fuzz::FuzzArgs),
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Build in release mode.
    #[arg(long)]
    release: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(args) => setup::run(&args).map(|_| ()),
        Command::Build(args) => {
            let route = setup::ensure(false)?;
            let mut cmd = toolchain::cargo(&route);
            cmd.args(["build", "--package", "tracegap-agent"]);
            if args.release {
                cmd.arg("--release");
            }
            toolchain::run(&mut cmd)
        }
        Command::Image(args) => image::run(&args),
        Command::Lab(args) => lab::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Lint => test::lint(),
        Command::Bench(args) => bench::run(&args),
        Command::VmTest(args) => vm::run(&args),
        Command::Verifier(args) => verifier::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    }
}
