//! `cargo xtask lab`: the main job. Sets up what is missing, builds the lab
//! (with the agent and its eBPF programs inside), and runs the scenarios as
//! root. Ctrl-C reaches the lab too, which then removes what it made.

use anyhow::bail;

use crate::{setup, toolchain};

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Scenario to run (repeat); all ten when none is given:
    /// broken-propagation, fixed, uninstrumented, sampling, formats,
    /// baggage, collector-down, slow, flood, grpc.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Short counts and delays (a 2 s slow request instead of 30 s).
    #[arg(long)]
    short: bool,
    /// Where the trace files go.
    #[arg(long, default_value = "target/lab")]
    out: String,
    /// Run each node's agent from its image (built first, `cargo xtask
    /// image`) as deploy/base's DaemonSet says, with podman, instead of
    /// in-process.
    #[arg(long)]
    container: bool,
    /// After the scenarios, serve their traces over Jaeger's query API and
    /// a Jaeger UI on http://127.0.0.1:16686 until Ctrl-C (links printed).
    #[arg(long)]
    serve: bool,
    /// The Jaeger UI build to serve (its index.html and static/); default:
    /// ../shared/jaeger-ui/build beside the repository, when it is there.
    #[arg(long, value_name = "DIR", requires = "serve")]
    jaeger_ui: Option<std::path::PathBuf>,
    /// Pass every span the lab's store receives on to this OTLP/HTTP
    /// endpoint too: a Jaeger of your own (e.g. http://localhost:4318).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

pub fn run(args: &LabArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the lab creates network namespaces and loads eBPF programs: run it as root \
             (sudo -E cargo xtask lab)"
        );
    }
    let route = setup::ensure(true)?;
    if args.container {
        crate::image::build(&route, None)?;
    }
    toolchain::run(toolchain::cargo(&route).args(["build", "--package", "tracegap-lab"]))?;
    let bin = toolchain::workspace_root().join("target/debug/tracegap-lab");
    let mut cmd = std::process::Command::new(bin);
    cmd.current_dir(toolchain::workspace_root())
        .args(["run", "--out", &args.out]);
    for s in &args.scenarios {
        cmd.args(["--scenario", s]);
    }
    if args.short {
        cmd.arg("--short");
    }
    if args.container {
        cmd.arg("--container=deploy/base");
    }
    if let Some(e) = &args.otlp_endpoint {
        cmd.args(["--otlp-endpoint", e]);
    }
    if args.serve {
        cmd.arg("--serve");
        let beside = toolchain::workspace_root().join("../shared/jaeger-ui/build");
        match args
            .jaeger_ui
            .clone()
            .or_else(|| beside.is_dir().then_some(beside))
        {
            Some(ui) => {
                cmd.arg("--jaeger-ui").arg(ui);
            }
            None => {
                println!("lab: no Jaeger UI build (--jaeger-ui DIR): serving the query API only")
            }
        }
    }
    toolchain::run(&mut cmd)
}
