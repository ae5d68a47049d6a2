//! Command-line interface. Every flag has an environment fallback
//! (`TRACEGAP_*`), so the DaemonSet can configure the agent without args.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    agent::AgentConfig,
    cluster::ClusterConfig,
    discover::{DEFAULT_PATTERNS, Patterns},
    ebpf::KernelLog,
    export::{ExportConfig, OtlpProtocol},
    gap::span::{ExportMode, Identity},
    interfaces::Selection,
    reconcile::ReconcileConfig,
    tracestore::StoreKind,
};

/// tracegap: finds the holes in your distributed traces from the network.
#[derive(Debug, Parser)]
#[command(name = "tracegap", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The agent's log filter: `TRACEGAP_LOG` (default `info`), and the
    /// kernel's records when `--kernel-log` asks for them, whatever
    /// `TRACEGAP_LOG` says of other targets.
    pub fn log_filter(&self) -> EnvFilter {
        let filter =
            EnvFilter::try_from_env("TRACEGAP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let kernel_log = match &self.command {
            Command::Run(args) => args.kernel_log,
            Command::Observe(args) => args.kernel_log,
            Command::Report(_) | Command::Quality(_) => KernelLog::Off,
        };
        match kernel_log.directive().and_then(|d| d.parse().ok()) {
            Some(directive) => filter.add_directive(directive),
            None => filter,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: classify every hop, export synthetic spans for
    /// the gaps over OTLP, serve /metrics, /healthz and /readyz, and /report
    /// on its own (loopback) address.
    Run(Box<RunArgs>),
    /// Print every HTTP request and response seen on the wire, one per line.
    Observe(ObserveArgs),
    /// Print a running agent's per-edge gap report as a table (or, with
    /// --prometheus, the whole cluster's).
    Report(ReportArgs),
    /// Serve Jaeger's Trace Quality API and /report for the whole cluster,
    /// from every agent's counters in Prometheus (a small stateless
    /// Deployment).
    Quality(QualityArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub interfaces: InterfaceArgs,
    /// Address for /metrics, /healthz and /readyz (Prometheus, probes).
    #[arg(long, env = "TRACEGAP_LISTEN", default_value = "0.0.0.0:9464")]
    pub listen: SocketAddr,
    /// Address for /report and /api/quality-metrics (Jaeger's Trace Quality
    /// page), which name services and URL paths: loopback
    /// by default (read it on the node, or through `kubectl exec` or
    /// `port-forward`); `off` serves no /report.
    #[arg(long, env = "TRACEGAP_REPORT_LISTEN", default_value = "127.0.0.1:9465", value_parser = parse_report_listen)]
    pub report_listen: ReportListen,
    /// A Jaeger UI's origin (e.g. http://jaeger.example:16686) allowed to
    /// read /api/quality-metrics, its Trace Quality page, from the report
    /// address (CORS). Unset: same origin only.
    #[arg(long, env = "TRACEGAP_CORS_ORIGIN")]
    pub cors_origin: Option<String>,
    /// OTLP endpoint, e.g. http://jaeger-collector:4317 (gRPC) or
    /// http://jaeger-collector:4318 (HTTP; /v1/traces is appended).
    /// Unset: opentelemetry-otlp's default for the protocol
    /// (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is honoured too). https://: over
    /// TLS, trusting Mozilla's roots and the CA file
    /// OTEL_EXPORTER_OTLP_CERTIFICATE names; mutual TLS with
    /// OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY
    /// (each also as OTEL_EXPORTER_OTLP_TRACES_*).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport. OTEL_EXPORTER_OTLP_HEADERS and
    /// OTEL_EXPORTER_OTLP_TIMEOUT apply to both.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "grpc")]
    pub otlp_protocol: OtlpProtocol,
    /// Which hops become synthetic spans: only gaps (instrumented hops have
    /// their own spans), or all.
    #[arg(long, env = "TRACEGAP_EXPORT", value_enum, default_value_t = ExportMode::Gaps)]
    pub export: ExportMode,
    /// Export spans for unsampled hops too (by default they are counted).
    #[arg(long, env = "TRACEGAP_EXPORT_UNSAMPLED")]
    pub export_unsampled: bool,
    /// Record which thread wrote each call and which read each request
    /// (programs on socket sends and receives), so a thread-per-request
    /// service's calls are tied to the request they were made for; false:
    /// by the wire alone.
    #[arg(long, env = "TRACEGAP_THREAD_EVIDENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub thread_evidence: bool,
    /// Read HTTPS in the clear through OpenSSL: uprobes on SSL_read,
    /// SSL_write and their _ex forms in every libssl the node's processes
    /// map (found in /proc/PID/maps every 5s). Needs CAP_SYS_ADMIN (the
    /// kernel's price for a uprobe), CAP_SYS_PTRACE and, in a pod, hostPID
    /// (deploy/https); without them, or false, TLS connections are only
    /// counted, as unread.
    #[arg(long, env = "TRACEGAP_TLS_PLAINTEXT", default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_plaintext: bool,
    /// The kernel programs' rare diagnostics in this log, under target
    /// `kernel`, each with its flow: an HTTP/2 connection given up and why,
    /// a joined connection left unread, a record dropped on a full ring or
    /// cut at its copy budget. Chosen at start: off, the programs carry no
    /// log call at all.
    #[arg(long, env = "TRACEGAP_KERNEL_LOG", value_enum, default_value_t = KernelLog::Off)]
    pub kernel_log: KernelLog,
    /// Place a call the threads cannot tie (an async runtime's) under the
    /// request whose answer followed the call's answer, clearly before any
    /// other's (`tracegap.link.confidence=timing`). Off by default: on a
    /// busy or slow CPU a handler resumes late and timing is wrong now and
    /// then (measured: 5 of 144 under emulation); off, such calls stay
    /// unplaced, linked to their candidates.
    #[arg(long, env = "TRACEGAP_PLACE_BY_TIMING", default_value_t = false, action = clap::ArgAction::Set)]
    pub place_by_timing: bool,
    /// With no trace store: a service nobody declared whose pods on this
    /// node serve sampled traced requests this long (and
    /// --learn-uninstrumented-requests of them) without ever exporting a
    /// span is likely not instrumented, and its calls get spans marked
    /// `tracegap.gap.confidence=likely`. Exports the wire cannot see (a Unix
    /// socket, a sidecar over loopback) fool it: declare such services
    /// (annotation tracegap.io/instrumented, names file). 0s: off.
    #[arg(long, env = "TRACEGAP_LEARN_UNINSTRUMENTED_AFTER", default_value = "2m", value_parser = humantime::parse_duration)]
    pub learn_uninstrumented_after: Duration,
    /// See --learn-uninstrumented-after.
    #[arg(long, env = "TRACEGAP_LEARN_UNINSTRUMENTED_REQUESTS", default_value_t = crate::gap::silence::DEFAULT_REQUESTS)]
    pub learn_uninstrumented_requests: u64,
    #[command(flatten)]
    pub http: HttpServerArgs,
    /// Synthetic spans waiting for export at most; past it they are dropped
    /// and counted (tracegap_spans_dropped_total{reason="queue_full"}).
    #[arg(long, env = "TRACEGAP_EXPORT_QUEUE", default_value_t = 8192)]
    pub export_queue: usize,
    /// Service names by address, IP=NAME (repeat or comma-separate); unknown
    /// addresses are grouped as `external` (public) or `unknown` (private).
    #[arg(long = "service", env = "TRACEGAP_SERVICES", value_delimiter = ',', value_parser = parse_service)]
    pub services: Vec<(IpAddr, String)>,
    /// A file of identities, one `IP NAME [NAMESPACE/POD] [node=NODE]
    /// [uid=POD_UID] [host-network] [instrumented=BOOL]
    /// [kind=pod|service|node]` per line: the standalone stand-in for the
    /// Kubernetes API (Services as `kind=service`; a host-network pod,
    /// named by its processes' cgroups over OpenSSL, as `uid=... host-network`).
    #[arg(long, env = "TRACEGAP_NAMES_FILE")]
    pub names_file: Option<std::path::PathBuf>,
    /// Name pods and services from the Kubernetes API: auto (when running
    /// in a cluster: KUBERNETES_SERVICE_HOST is set), on, or off.
    #[arg(long, env = "TRACEGAP_KUBERNETES", value_enum, default_value_t = KubernetesMode::Auto)]
    pub kubernetes: KubernetesMode,
    /// This node's name (the DaemonSet sets it from spec.nodeName). With it,
    /// agents on several nodes report each hop once (the caller's node);
    /// standalone, name the nodes of pods in the names file (`node=NAME`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Namespaces to watch for remote pods and services (comma-separated);
    /// empty: cluster-wide. Pods on this node are always watched.
    #[arg(long, env = "TRACEGAP_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// A request without a response after this long is reported unanswered.
    #[arg(long, env = "TRACEGAP_RESPONSE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,
    /// The trace store to read traces back from: Jaeger's query service
    /// (http://jaeger-query:16686) or Grafana Tempo (http://tempo:3200).
    /// With it, gap spans are held for --settle-delay and corrected by what
    /// the services recorded (placed under the breaking service's own span,
    /// linked to the callee's own trace, dropped as duplicates), and each
    /// sampled hop into an instrumented service says whether its span
    /// arrived, was lost in the pipeline or never exported. Unset: the wire
    /// alone.
    #[arg(long, env = "TRACEGAP_TRACE_STORE")]
    pub trace_store: Option<String>,
    /// The trace store's API; auto asks it.
    #[arg(long, env = "TRACEGAP_TRACE_STORE_KIND", value_enum, default_value_t = StoreKind::Auto)]
    pub trace_store_kind: StoreKind,
    /// How long a hop waits before its trace is read: longer than the
    /// services' export delay (an SDK batch processor: 5 s) plus the
    /// collector's and the store's.
    #[arg(long, env = "TRACEGAP_SETTLE_DELAY", default_value = "10s", value_parser = humantime::parse_duration)]
    pub settle_delay: Duration,
    /// Queries per second to the trace store at most (per agent); a query
    /// past it waits for a later round, and a hop still unasked a settle
    /// delay later goes on unreconciled (its check counted not_checked).
    #[arg(long, env = "TRACEGAP_TRACE_STORE_QPS", default_value_t = crate::reconcile::DEFAULT_QPS)]
    pub trace_store_qps: u32,
    /// One query's time at most; a store slower than this is treated as away.
    #[arg(long, env = "TRACEGAP_TRACE_STORE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub trace_store_timeout: Duration,
    #[command(flatten)]
    pub trace_store_access: TraceStoreAccess,
}

/// The flags of a backend's TLS files and credentials (`--<name>-ca-file`,
/// ... and their `<ENV>_*` variables), and the [`crate::remote::Access`]
/// they make; one struct per backend, as clap has no flag prefixes.
macro_rules! access_args {
    ($(#[$doc:meta])* $name:ident, $flag:literal, $env:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Default, Args)]
        pub struct $name {
            #[arg(long = concat!($flag, "-ca-file"), env = concat!($env, "_CA_FILE"),
                help = concat!("PEM CA certificates to trust for an https:// ", $what, ", beside the built-in Mozilla roots"))]
            pub ca_file: Option<PathBuf>,
            #[arg(long = concat!($flag, "-client-cert"), env = concat!($env, "_CLIENT_CERT"), requires = "client_key",
                help = concat!("PEM client certificate for a ", $what, " that asks for one (mutual TLS)"))]
            pub client_cert: Option<PathBuf>,
            #[arg(long = concat!($flag, "-client-key"), env = concat!($env, "_CLIENT_KEY"), requires = "client_cert",
                help = "Its PEM private key")]
            pub client_key: Option<PathBuf>,
            #[arg(long = concat!($flag, "-token-file"), env = concat!($env, "_TOKEN_FILE"),
                help = concat!("A file holding the bearer token sent to the ", $what, " (read again when it changes, as Kubernetes rotates projected tokens)"))]
            pub token_file: Option<PathBuf>,
            #[arg(long = concat!($flag, "-user"), env = concat!($env, "_USER"), requires = "password_file",
                help = concat!("Basic authentication to the ", $what, " (a proxy in front of it): the user; the password in --", $flag, "-password-file"))]
            pub user: Option<String>,
            #[arg(long = concat!($flag, "-password-file"), env = concat!($env, "_PASSWORD_FILE"), requires = "user",
                help = "The file holding that user's password")]
            pub password_file: Option<PathBuf>,
            #[arg(long = concat!($flag, "-tenant"), env = concat!($env, "_TENANT"),
                help = "The tenant to read (X-Scope-OrgID, as multi-tenant gateways ask: Tempo, Mimir)")]
            pub tenant: Option<String>,
        }

        impl $name {
            pub fn access(&self) -> crate::remote::Access {
                let named = |what: &str, p: &Option<PathBuf>| {
                    p.clone().map(|p| (format!("--{}-{what}", $flag), p))
                };
                crate::remote::Access {
                    tls: crate::remote::TlsFiles {
                        ca: named("ca-file", &self.ca_file),
                        cert: named("client-cert", &self.client_cert),
                        key: named("client-key", &self.client_key),
                    },
                    token_file: named("token-file", &self.token_file),
                    basic: self
                        .user
                        .clone()
                        .zip(named("password-file", &self.password_file)),
                    tenant: self.tenant.clone(),
                }
            }
        }
    };
}

access_args!(
    /// TLS and credentials for the trace store (`--trace-store`).
    TraceStoreAccess,
    "trace-store",
    "TRACEGAP_TRACE_STORE",
    "trace store"
);
access_args!(
    /// TLS and credentials for Prometheus (`--prometheus`).
    PrometheusAccess,
    "prometheus",
    "TRACEGAP_PROMETHEUS",
    "Prometheus"
);

/// Whether to watch the Kubernetes API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    Auto,
    On,
    Off,
}

/// Where /report is served, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportListen(pub Option<SocketAddr>);

fn parse_report_listen(s: &str) -> Result<ReportListen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(ReportListen(None));
    }
    s.parse()
        .map(|a| ReportListen(Some(a)))
        .map_err(|e| format!("{e}: expected ADDRESS:PORT or off"))
}

fn parse_service(s: &str) -> Result<(IpAddr, String), String> {
    crate::identity::parse_mapping(s).map_err(|e| e.to_string())
}

impl RunArgs {
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let mut services: Vec<(IpAddr, Identity)> = Vec::new();
        if let Some(path) = &self.names_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            services.extend(
                crate::identity::parse_names_file(&text)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
        services.extend(self.services.iter().map(|(ip, name)| {
            (
                *ip,
                Identity {
                    service: name.clone(),
                    ..Identity::default()
                },
            )
        }));
        Ok(AgentConfig {
            interfaces: self.interfaces.selection(),
            listen: self.listen,
            report_listen: self.report_listen.0,
            cors_origin: self.cors_origin.clone(),
            export: ExportConfig {
                protocol: self.otlp_protocol,
                endpoint: self.otlp_endpoint.clone().filter(|e| !e.is_empty()),
                queue: self.export_queue,
                tls: crate::remote::TlsFiles::from_otlp_env(),
                ..ExportConfig::default()
            },
            export_mode: self.export,
            export_unsampled: self.export_unsampled,
            thread_evidence: self.thread_evidence,
            tls_plaintext: self.tls_plaintext,
            kernel_log: self.kernel_log,
            place_by_timing: self.place_by_timing,
            silence: (!self.learn_uninstrumented_after.is_zero()).then_some(
                crate::gap::silence::SilenceConfig {
                    after: self.learn_uninstrumented_after,
                    requests: self.learn_uninstrumented_requests,
                },
            ),
            server_limits: self.http.limits(),
            services,
            response_timeout: self.response_timeout,
            node_name: self.node_name.clone(),
            reconcile: self
                .trace_store
                .as_ref()
                .filter(|u| !u.is_empty())
                .map(|url| ReconcileConfig {
                    kind: self.trace_store_kind,
                    settle: self.settle_delay,
                    qps: self.trace_store_qps,
                    timeout: self.trace_store_timeout,
                    access: self.trace_store_access.access(),
                    ..ReconcileConfig::new(url.clone())
                }),
            kubernetes: match self.kubernetes {
                KubernetesMode::On => true,
                KubernetesMode::Off => false,
                KubernetesMode::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            }
            .then(|| ClusterConfig {
                node_name: self.node_name.clone(),
                namespaces: self.namespaces.clone(),
            }),
        })
    }
}

/// The limits of tracegap's HTTP servers (the agent's /metrics and probes
/// and /report; `tracegap quality`'s): what a hostile or broken client can
/// take of them.
#[derive(Debug, Args)]
pub struct HttpServerArgs {
    /// Time a client has to send a request's head, and to send its next
    /// one on a kept-alive connection.
    #[arg(long, env = "TRACEGAP_HTTP_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub http_header_timeout: std::time::Duration,
    /// Connections open at once per server; past it new ones are closed at
    /// once (tracegap_http_server_refused_total{reason="connections"}).
    #[arg(long, env = "TRACEGAP_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
    /// Connections open at once per server from one client address; past
    /// it new ones are closed at once (reason="connections_per_client").
    #[arg(
        long,
        env = "TRACEGAP_HTTP_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 64
    )]
    pub http_max_connections_per_client: usize,
    /// Requests served at once per endpoint; past it answered 503 at once
    /// (reason="busy").
    #[arg(long, env = "TRACEGAP_HTTP_MAX_IN_FLIGHT", default_value_t = 4)]
    pub http_max_in_flight: usize,
    /// Time to answer one request at most (503, reason="timeout").
    #[arg(long, env = "TRACEGAP_HTTP_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub http_request_timeout: std::time::Duration,
    /// Bytes of one request head at most (431 past it).
    #[arg(long, env = "TRACEGAP_HTTP_MAX_HEAD_BYTES", default_value_t = 16 * 1024)]
    pub http_max_head_bytes: usize,
}

impl HttpServerArgs {
    pub fn limits(&self) -> crate::server::ServerLimits {
        crate::server::ServerLimits {
            header_timeout: self.http_header_timeout,
            max_connections: self.http_max_connections,
            max_connections_per_client: self.http_max_connections_per_client,
            max_in_flight: self.http_max_in_flight,
            request_timeout: self.http_request_timeout,
            max_head_bytes: self.http_max_head_bytes,
        }
    }
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The agent's /report address (its --report-listen).
    #[arg(long, env = "TRACEGAP_AGENT", default_value = "127.0.0.1:9465")]
    pub agent: String,
    /// Instead of one agent's report since it started, the whole
    /// cluster's over --window, from the agents' counters in Prometheus
    /// (or Thanos, Mimir, VictoriaMetrics) at this base URL.
    #[arg(long, env = "TRACEGAP_PROMETHEUS")]
    pub prometheus: Option<String>,
    /// With --prometheus: the window counted.
    #[arg(long, env = "TRACEGAP_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Print the JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub prometheus_access: PrometheusAccess,
}

#[derive(Debug, Args)]
pub struct QualityArgs {
    /// Prometheus's base URL (or Thanos', Mimir's, VictoriaMetrics'),
    /// where the agents' /metrics are scraped.
    #[arg(long, env = "TRACEGAP_PROMETHEUS")]
    pub prometheus: String,
    /// Address for /api/quality-metrics, /report, /healthz and /readyz.
    #[arg(long, env = "TRACEGAP_LISTEN", default_value = "0.0.0.0:9466")]
    pub listen: SocketAddr,
    /// The window counted when a request names none (Jaeger UI's Trace
    /// Quality page sends `hours=`).
    #[arg(long, env = "TRACEGAP_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Each query to Prometheus at most.
    #[arg(long, env = "TRACEGAP_PROMETHEUS_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub prometheus_timeout: Duration,
    /// The origin of a Jaeger UI allowed to call /api/quality-metrics from
    /// the browser (Access-Control-Allow-Origin).
    #[arg(long, env = "TRACEGAP_CORS_ORIGIN")]
    pub cors_origin: Option<String>,
    #[command(flatten)]
    pub http: HttpServerArgs,
    #[command(flatten)]
    pub prometheus_access: PrometheusAccess,
}

impl QualityArgs {
    pub fn config(&self) -> crate::prometheus::serve::QualityConfig {
        crate::prometheus::serve::QualityConfig {
            prometheus: self.prometheus.clone(),
            listen: self.listen,
            window: self.window,
            timeout: self.prometheus_timeout,
            cors_origin: self.cors_origin.clone(),
            limits: self.http.limits(),
            access: self.prometheus_access.access(),
        }
    }
}

/// Which interfaces to attach to.
#[derive(Debug, Args)]
pub struct InterfaceArgs {
    /// Interfaces to attach to (repeat or comma-separate). Without it, pod
    /// veths are discovered by --iface-pattern and followed as they come
    /// and go.
    #[arg(long = "iface", env = "TRACEGAP_IFACES", value_delimiter = ',')]
    pub ifaces: Vec<String>,
    /// Name patterns of pod veths' host ends (`*` and `?` wildcards); the
    /// defaults cover bridge/flannel, Calico, Cilium and other CNIs.
    #[arg(
        long = "iface-pattern",
        env = "TRACEGAP_IFACE_PATTERNS",
        value_delimiter = ',',
        default_values_t = DEFAULT_PATTERNS.map(String::from)
    )]
    pub patterns: Vec<String>,
}

impl InterfaceArgs {
    pub fn selection(&self) -> Selection {
        if self.ifaces.is_empty() {
            Selection::Discover(Patterns::new(&self.patterns))
        } else {
            Selection::Explicit(self.ifaces.clone())
        }
    }
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub interfaces: InterfaceArgs,
    /// Stop after this many messages (0: run until SIGINT/SIGTERM).
    #[arg(long, default_value_t = 0, env = "TRACEGAP_COUNT")]
    pub count: u64,
    /// As `run --kernel-log`.
    #[arg(long, env = "TRACEGAP_KERNEL_LOG", value_enum, default_value_t = KernelLog::Off)]
    pub kernel_log: KernelLog,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `filter` lets a debug event of `target` through.
    fn shows(filter: EnvFilter, target: &'static str) -> bool {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || match target {
            "kernel" => tracing::enabled!(target: "kernel", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "tracegap_agent", tracing::Level::DEBUG),
        })
    }

    #[test]
    fn kernel_log_debug_shows_the_kernels_records_and_nothing_else_more() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).expect("parses");
        let on = parse(&["tracegap", "run", "--kernel-log", "debug"]);
        assert!(shows(on.log_filter(), "kernel"));
        assert!(!shows(on.log_filter(), "agent"));
        let off = parse(&["tracegap", "run"]);
        assert!(!shows(off.log_filter(), "kernel"));
        let Command::Run(args) = on.command else {
            panic!("run")
        };
        assert_eq!(args.kernel_log, KernelLog::Debug);
        assert!(Cli::try_parse_from(["tracegap", "run", "--kernel-log", "loud"]).is_err());
    }

    #[test]
    fn each_backend_has_its_own_tls_and_credential_flags() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let Ok(Cli {
            command: Command::Run(run),
            ..
        }) = parse(&[
            "tracegap",
            "run",
            "--trace-store",
            "https://tempo:3200",
            "--trace-store-ca-file",
            "/etc/ca.pem",
            "--trace-store-token-file",
            "/var/run/token",
            "--trace-store-tenant",
            "team-a",
        ])
        else {
            panic!("run parses")
        };
        let a = run.trace_store_access.access();
        assert_eq!(
            a.tls.ca,
            Some(("--trace-store-ca-file".into(), "/etc/ca.pem".into()))
        );
        assert_eq!(
            a.token_file,
            Some(("--trace-store-token-file".into(), "/var/run/token".into()))
        );
        assert_eq!(a.tenant.as_deref(), Some("team-a"));
        // A user needs its password file, a certificate its key.
        assert!(parse(&["tracegap", "run", "--trace-store-user", "u"]).is_err());
        assert!(
            parse(&[
                "tracegap",
                "quality",
                "--prometheus",
                "x",
                "--prometheus-client-cert",
                "c"
            ])
            .is_err()
        );
        let Ok(Cli {
            command: Command::Quality(q),
            ..
        }) = parse(&[
            "tracegap",
            "quality",
            "--prometheus",
            "https://mimir/prometheus",
            "--prometheus-user",
            "reader",
            "--prometheus-password-file",
            "/etc/password",
        ])
        else {
            panic!("quality parses")
        };
        assert_eq!(
            q.config().access.basic,
            Some((
                "reader".into(),
                ("--prometheus-password-file".into(), "/etc/password".into())
            ))
        );
    }
}
