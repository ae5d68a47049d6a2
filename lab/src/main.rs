//! `tracegap-lab`: the lab's programs. `run` drives the scenarios (what
//! `cargo xtask lab` calls); `service` and `load` are the programs it
//! starts inside the pods.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracegap_lab::{
    load::{LoadSpec, run as run_load},
    run::{INTERRUPTED, Options, run},
    scenario,
    service::{Behaviour, Propagator, Runtime, SamplerSpec, ServiceSpec},
};

/// Counts each thread's heap allocations for the bench's figures
/// (issue 33); otherwise the system allocator.
#[global_allocator]
static ALLOCATOR: tracegap_lab::bench::allocs::Counting = tracegap_lab::bench::allocs::Counting;

#[derive(Parser)]
#[command(
    name = "tracegap-lab",
    version,
    about = "The tracing lab on one machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios (as root): pods, services, tracegap, traffic, report.
    Run {
        /// Scenario to run (repeat); all of them when none is given.
        #[arg(long = "scenario", value_parser = clap::builder::PossibleValuesParser::new(scenario::ALL))]
        scenarios: Vec<String>,
        /// Short counts and delays.
        #[arg(long)]
        short: bool,
        /// Where the trace files and names files go.
        #[arg(long, default_value = "target/lab")]
        out: PathBuf,
        /// Run each node's agent from its image (`cargo xtask image`), as
        /// the DaemonSet in this kustomize directory says (podman).
        #[arg(long, value_name = "KUSTOMIZE_DIR", num_args = 0..=1, default_missing_value = "deploy/base")]
        container: Option<PathBuf>,
        /// After the scenarios, serve their traces over Jaeger's query API
        /// (and the UI, with --jaeger-ui) on this address until Ctrl-C.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:16686")]
        serve: Option<std::net::SocketAddr>,
        /// A Jaeger UI build directory (index.html, static/) to serve with
        /// --serve, configured with the Trace Quality page on.
        #[arg(long, value_name = "DIR", requires = "serve")]
        jaeger_ui: Option<PathBuf>,
        /// Pass every span the lab's store receives on to this OTLP/HTTP
        /// endpoint too: a Jaeger of your own (e.g. http://localhost:4318).
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// Put the trace store behind TLS, as a secured production one: its
        /// OTLP receiver asks for client certificates (mutual TLS), its
        /// query API for a bearer token and a tenant, with a CA made for
        /// the run. The agents, services and clients are given the files
        /// as a deployment gives them (with --container, as deploy/otlp-tls
        /// mounts its Secret).
        #[arg(long)]
        secure: bool,
    },
    /// What tracegap costs: data path, kernel, user space, memory, detection
    /// latency, each against its baseline (as root; `cargo xtask bench`).
    Bench {
        /// Short loads (a smoke run, not figures to quote).
        #[arg(long)]
        quick: bool,
        /// Where the Markdown table is written too.
        #[arg(long, default_value = "target/bench/bench.md")]
        out: PathBuf,
        /// An empty classifier (lab/bpf/floor.s assembled by `cargo xtask
        /// bench`): the baseline of the kernel figures.
        #[arg(long)]
        floor_object: Option<PathBuf>,
        /// Only the kernel programs on crafted packets (BPF_PROG_TEST_RUN),
        /// whole and with each step switched off, beside the empty program.
        #[arg(long, requires = "floor_object")]
        kernel: bool,
        /// Only what the thread programs add to each socket send and receive
        /// (BPF statistics off), beside the empty program.
        #[arg(long, conflicts_with = "kernel")]
        sockets: bool,
        /// Only what reading HTTPS through OpenSSL costs a request: wrk
        /// against the lab's TLS service, without the agent, with its
        /// OpenSSL probes off and on.
        #[arg(long, conflicts_with_all = ["kernel", "sockets"])]
        tls: bool,
        /// Only what a cluster-wide Trace Quality page costs: tracegap
        /// quality's report from a real Prometheus after the lab's load.
        #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls"])]
        quality: bool,
        /// Only what the agent costs a quiet node: CPU and wakeups at rest
        /// and at 10, 50 and 200 requests/s (HTTP/1.1, gRPC).
        #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls", "quality"])]
        rest: bool,
        /// Only user space on one core, no kernel or network: the
        /// pipeline's events/s, the agent's time and heap allocations per
        /// healthy HTTP/1.1 request and gRPC call, span export.
        #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls", "quality", "rest"])]
        pipeline: bool,
        /// Only where HTTP/1.1's p99 at saturation comes from: the echo
        /// load with nothing attached, the kernel programs alone, the
        /// agent, the agent at nice 19, with the scheduler's account of
        /// each side's threads.
        #[arg(long, conflicts_with_all = ["kernel", "sockets", "tls", "quality", "rest", "pipeline"])]
        tail: bool,
    },
    /// Holds N open flows in the agent's state and prints the peak RSS in
    /// KiB (used by `bench`).
    #[command(hide = true)]
    BenchMemory {
        #[arg(long)]
        flows: usize,
    },
    /// Runs N request/response pairs through the user-space pipeline and
    /// prints events/s: a target for a profiler (`perf record`).
    #[command(hide = true)]
    BenchPipeline {
        #[arg(long, default_value_t = 500_000)]
        pairs: usize,
    },
    /// One lab service (runs inside a pod).
    Service {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, value_enum, default_value_t = Behaviour::Instrumented)]
        behaviour: Behaviour,
        #[arg(long, value_enum, default_value_t = Propagator::W3c)]
        propagator: Propagator,
        /// parentbased_always_on, always_off or parentbased_traceidratio:R.
        #[arg(long, default_value = "parentbased_always_on")]
        sampler: SamplerSpec,
        /// URL to call for every request (repeat for a chain).
        #[arg(long)]
        downstream: Vec<String>,
        #[arg(long, default_value_t = 200)]
        status: u16,
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        delay: Duration,
        /// OTLP/HTTP endpoint for the service's own spans.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
        otlp: Option<String>,
        /// Serve gRPC (cleartext HTTP/2, any method of lab.Inventory)
        /// instead of HTTP/1.1. Downstream `grpc://host:port/pkg.Svc/Method`
        /// URLs are called over gRPC either way.
        #[arg(long)]
        grpc: bool,
        /// Bytes of extra metadata on each gRPC call made (a header block
        /// split over CONTINUATION frames past 16 KiB).
        #[arg(long, default_value_t = 0)]
        metadata_bytes: usize,
        /// Up to this long, at random, before each downstream call (the
        /// handler's work before it calls on), e.g. `20ms`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        think: Duration,
        /// Serve HTTPS through the system's OpenSSL (a self-signed
        /// certificate; HTTP/1.1, a thread per connection). Downstream
        /// `https://` URLs are called over TLS either way.
        #[arg(long)]
        tls: bool,
        /// How it serves requests at once: a thread each, or multiplexed on
        /// one async thread (HTTP/1.1 only).
        #[arg(long, value_enum, default_value_t = Runtime::Threads)]
        runtime: Runtime,
    },
    /// An instrumented client sending requests (runs inside a pod); prints
    /// a JSON summary.
    Load {
        #[arg(long)]
        name: String,
        #[arg(long)]
        target: String,
        /// Requests to send (0: until stopped).
        #[arg(long, default_value_t = 10)]
        count: u64,
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, value_enum, default_value_t = Propagator::W3c)]
        propagator: Propagator,
        /// Send no trace context at all.
        #[arg(long)]
        no_context: bool,
        #[arg(long, default_value_t = 1.0)]
        sample_ratio: f64,
        /// key=value (repeat).
        #[arg(long)]
        baggage: Vec<String>,
        #[arg(long)]
        otlp: Option<String>,
        /// Stop after this long (0s: no limit).
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        max_time: Duration,
    },
}

/// SIGINT and SIGTERM set a flag: the lab stops at its next check and
/// unwinds, removing what it made; services and clients just stop.
fn on_signal(flag: &'static AtomicBool, stop: Option<Arc<AtomicBool>>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            if tracegap_agent::shutdown::signal_received().await.is_ok() {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(s) = stop {
                    s.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracegap_agent::remote::install_crypto_provider();
    // The in-process agents' own logs, when asked for (RUST_LOG, e.g.
    // `tracegap_agent=debug`): off otherwise, so the run's output stays
    // the lab's.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    match Cli::parse().command {
        Cmd::Run {
            scenarios,
            short,
            out,
            container,
            serve,
            jaeger_ui,
            otlp_endpoint,
            secure,
        } => {
            on_signal(&INTERRUPTED, None)?;
            let scenarios = if scenarios.is_empty() {
                scenario::ALL.iter().map(|s| s.to_string()).collect()
            } else {
                scenarios
            };
            let container = match container {
                Some(dir) => {
                    let docs = tracegap_lab::container::render(&dir)?;
                    let t =
                        tracegap_lab::container::PodTemplate::from_manifests(&docs, "tracegap")?;
                    anyhow::ensure!(
                        tracegap_lab::container::image_present(&t.image),
                        "no image {} in podman's storage: build it with `cargo xtask image`",
                        t.image
                    );
                    Some(t)
                }
                None => None,
            };
            let opts = Options {
                scenarios,
                short,
                out,
                lab_bin: std::env::current_exe().context("locating tracegap-lab")?,
                container,
                // Served, the Trace Quality page is the cluster-wide view's
                // (`cargo xtask lab` unpacks Debian's Prometheus).
                prometheus: serve.and(tracegap_lab::prometheus::binary()),
                serve: serve.map(|addr| tracegap_lab::run::Serve {
                    addr,
                    ui: jaeger_ui,
                }),
                forward: otlp_endpoint,
                secure,
            };
            let outcomes = match run(&opts, &mut std::io::stdout()) {
                Ok(o) => o,
                Err(_) if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) => {
                    eprintln!("interrupted: what the lab created has been removed");
                    std::process::exit(130);
                }
                Err(e) => return Err(e),
            };
            // One line per scenario, for `cargo xtask lab --repeat` to tally.
            let results: String = outcomes
                .iter()
                .map(|o| {
                    format!(
                        "{} {}\n",
                        o.name,
                        if o.passed { "passed" } else { "FAILED" }
                    )
                })
                .collect();
            std::fs::write(opts.out.join("results.txt"), results)?;
            let failed: Vec<_> = outcomes
                .iter()
                .filter(|o| !o.passed)
                .map(|o| &o.name)
                .collect();
            anyhow::ensure!(failed.is_empty(), "unexpected results in: {failed:?}");
            Ok(())
        }
        Cmd::Bench {
            quick,
            out,
            floor_object,
            kernel,
            sockets,
            tls,
            quality,
            rest,
            pipeline,
            tail,
        } => {
            let d = if quick {
                tracegap_lab::bench::Durations::quick()
            } else {
                tracegap_lab::bench::Durations::full()
            };
            let floor = floor_object.map(std::fs::read).transpose()?;
            let mut table = String::new();
            if sockets {
                table = tracegap_lab::bench::sockets_only(d, floor.as_deref())?;
            } else if tls {
                table = tracegap_lab::bench::tls_only(d)?;
            } else if quality {
                table = tracegap_lab::bench::quality_only(d)?;
            } else if rest {
                table = tracegap_lab::bench::rest_only(d)?;
            } else if pipeline {
                table = tracegap_lab::bench::pipeline_only(d)?;
            } else if tail {
                table = tracegap_lab::bench::tail_only(d)?;
            } else if !kernel {
                table = tracegap_lab::bench::run(d, &std::env::current_exe()?, floor.as_deref())?;
                table.push('\n');
            }
            if let Some(floor) = floor
                .as_ref()
                .filter(|_| !sockets && !tls && !quality && !rest && !pipeline && !tail)
            {
                eprintln!("bench: kernel programs on crafted packets (BPF_PROG_TEST_RUN)");
                table.push_str(&tracegap_lab::bench::kernel::run(
                    floor,
                    d.kernel_rounds,
                    d.kernel_batches,
                )?);
            }
            println!("{table}");
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&out, &table)?;
            eprintln!("bench: written to {}", out.display());
            Ok(())
        }
        Cmd::BenchPipeline { pairs } => {
            let records = tracegap_lab::bench::records(pairs);
            let n = records.len() as f64;
            let t = std::time::Instant::now();
            let spans = tracegap_lab::bench::pipeline_records(&records);
            println!(
                "{:.0} events/s, {spans} spans",
                n / t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::BenchMemory { flows } => {
            println!("{}", tracegap_lab::bench::hold_flows(flows));
            Ok(())
        }
        Cmd::Service {
            name,
            port,
            behaviour,
            propagator,
            sampler,
            downstream,
            status,
            delay,
            otlp,
            grpc,
            metadata_bytes,
            think,
            tls,
            runtime,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            on_signal(&INTERRUPTED, Some(stop.clone()))?;
            let spec = ServiceSpec {
                propagator,
                sampler,
                downstream,
                status,
                delay,
                otlp,
                grpc,
                metadata_bytes,
                think,
                runtime,
                tls,
                ..ServiceSpec::new(&name, port, behaviour)
            };
            let mut failed = None;
            spec.serve_until(&stop, |r| failed = r.err());
            match failed {
                Some(e) => Err(e).context("listening"),
                None => Ok(()),
            }
        }
        Cmd::Load {
            name,
            target,
            count,
            interval,
            propagator,
            no_context,
            sample_ratio,
            baggage,
            otlp,
            max_time,
        } => {
            let baggage = baggage
                .iter()
                .map(|b| {
                    b.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("--baggage {b:?} is not key=value"))
                })
                .collect::<anyhow::Result<_>>()?;
            let summary = run_load(&LoadSpec {
                name,
                target,
                count,
                interval,
                propagator: (!no_context).then_some(propagator),
                sample_ratio,
                baggage,
                otlp,
                max_time,
            });
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
    }
}
