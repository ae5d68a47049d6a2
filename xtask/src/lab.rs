//! `cargo xtask lab`: the main job. Sets up what is missing, builds the lab
//! (with the agent and its eBPF programs inside), and runs the scenarios as
//! root. Ctrl-C reaches the lab too, which then removes what it made.

use anyhow::bail;

use crate::{setup, toolchain};

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Scenario to run (repeat); all twelve when none is given:
    /// broken-propagation, concurrent, fixed, uninstrumented, sampling, formats,
    /// baggage, collector-down, slow, flood, grpc, tls.
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
    /// The lab's trace store behind TLS, as a secured production one: OTLP
    /// over mutual TLS, the query API asking for a bearer token and a
    /// tenant, a CA made for the run (with --container: deploy/otlp-tls's
    /// DaemonSet, its Secret mounted).
    #[arg(long)]
    secure: bool,
    /// Run the whole lab this many times, each in OUT/run-N, and tally the
    /// runs and scenarios that passed: checks that depend on timing must
    /// hold every time.
    #[arg(long, default_value_t = 1, value_name = "N", conflicts_with = "serve")]
    repeat: u32,
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
    if args.repeat > 1 {
        return repeat(args);
    }
    toolchain::run(&mut lab_command(args, &args.out))
}

/// `--repeat N`: N runs, then the tally.
fn repeat(args: &LabArgs) -> anyhow::Result<()> {
    let root = toolchain::workspace_root();
    let mut failed_runs = Vec::new();
    let mut tally: std::collections::BTreeMap<String, (u32, u32)> = Default::default();
    for i in 1..=args.repeat {
        let out = format!("{}/run-{i}", args.out);
        println!("lab: run {i} of {} (output in {out})", args.repeat);
        let status = lab_command(args, &out).status()?;
        if status.code() == Some(130) {
            bail!("interrupted in run {i}");
        }
        if !status.success() {
            failed_runs.push(i);
        }
        let results =
            std::fs::read_to_string(root.join(&out).join("results.txt")).unwrap_or_default();
        for line in results.lines() {
            if let Some((name, verdict)) = line.split_once(' ') {
                let t = tally.entry(name.to_owned()).or_default();
                t.0 += u32::from(verdict == "passed");
                t.1 += 1;
            }
        }
    }
    println!(
        "\nlab: {} of {} runs passed",
        args.repeat - failed_runs.len() as u32,
        args.repeat
    );
    for (name, (passed, ran)) in &tally {
        println!("  {name:<20} passed {passed} of {ran}");
    }
    if !failed_runs.is_empty() {
        bail!("runs that failed: {failed_runs:?}");
    }
    Ok(())
}

fn lab_command(args: &LabArgs, out: &str) -> std::process::Command {
    let bin = toolchain::workspace_root().join("target/debug/tracegap-lab");
    let mut cmd = std::process::Command::new(bin);
    cmd.current_dir(toolchain::workspace_root())
        .args(["run", "--out", out]);
    for s in &args.scenarios {
        cmd.args(["--scenario", s]);
    }
    if args.short {
        cmd.arg("--short");
    }
    if args.container {
        cmd.arg(if args.secure {
            "--container=deploy/otlp-tls"
        } else {
            "--container=deploy/base"
        });
    }
    if args.secure {
        cmd.arg("--secure");
    }
    if let Some(e) = &args.otlp_endpoint {
        cmd.args(["--otlp-endpoint", e]);
    }
    if args.serve {
        cmd.arg("--serve");
        // The Trace Quality page from Prometheus, as in a cluster.
        match setup::prometheus() {
            Ok(bin) => {
                cmd.env("TRACEGAP_PROMETHEUS_BIN", bin);
            }
            Err(e) => println!(
                "lab: no Prometheus ({e:#}): the Trace Quality page sums the agents' reports"
            ),
        }
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
    cmd
}
