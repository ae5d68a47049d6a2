//! The tracegap agent, run in-process on its own runtime thread, as the
//! DaemonSet would run it on a node: attached to the node's pod veths,
//! exporting to a real OTLP receiver.

use std::{sync::Arc, thread::JoinHandle};

use tracegap_agent::{
    agent::{AgentConfig, Started, run},
    server::Shared,
};

/// An agent on every pod veth of `node`, /metrics and /report on
/// loopback, exporting gap spans to `receiver` over OTLP/gRPC every 100 ms
/// (its readers wait for spans, not for full batches), naming the node's
/// pods as services in namespace `lab`. A caller changes what it is about
/// with `AgentConfig { .., ..config_for(node, receiver) }`.
pub fn config_for(node: &crate::netns::Node, receiver: &crate::store::Receiver) -> AgentConfig {
    use std::net::{Ipv4Addr, SocketAddr};
    use tracegap_agent::export::{ExportConfig, OtlpProtocol};
    AgentConfig {
        interfaces: tracegap_agent::interfaces::Selection::Explicit(
            node.pods.iter().map(|p| p.host_if.clone()).collect(),
        ),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        report_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        cors_origin: None,
        export: ExportConfig {
            endpoint: Some(format!("http://127.0.0.1:{}", receiver.grpc.port())),
            protocol: OtlpProtocol::Grpc,
            interval: std::time::Duration::from_millis(100),
            ..ExportConfig::default()
        },
        export_mode: tracegap_agent::gap::span::ExportMode::Gaps,
        export_unsampled: false,
        services: node.identities("lab"),
        response_timeout: std::time::Duration::from_secs(30),
        kubernetes: None,
        node_name: None,
        reconcile: None,
        thread_evidence: true,
        // Off for the many tests that share this config and run side by
        // side (each agent would attach its own pair to every socket
        // operation of the machine); the TLS tests turn it on.
        tls_plaintext: false,
        kernel_log: Default::default(),
        place_by_timing: false,
        silence: Some(Default::default()),
        server_limits: Default::default(),
    }
}

/// A running agent; stopped (programs detached) when dropped.
pub struct Agent {
    /// Where /metrics and the probes are served.
    pub listen: std::net::SocketAddr,
    /// Where /report is served (the agent's own address for it).
    pub report: Option<std::net::SocketAddr>,
    /// The in-process agent's state (None for a container).
    pub shared: Option<Arc<Shared>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    container: Option<crate::container::AgentContainer>,
}

impl Agent {
    pub fn start(config: AgentConfig) -> anyhow::Result<Self> {
        Self::start_in(config, None)
    }

    /// Starts the agent in the network namespace `netns` (a cluster node's):
    /// its threads, the links it attaches to, its sockets and its conntrack
    /// queries are the node's, as for an agent on that node's host network.
    pub fn start_in(config: AgentConfig, netns: Option<&str>) -> anyhow::Result<Self> {
        Self::start_with(config, netns, 0)
    }

    /// [`Agent::start_in`], its threads at `nice` (19: the lowest CPU
    /// weight, about what a DaemonSet requesting 50m of CPU gets against
    /// busy pods).
    pub fn start_with(config: AgentConfig, netns: Option<&str>, nice: i32) -> anyhow::Result<Self> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Started>();
        let ns = netns
            .map(|n| std::fs::File::open(format!("/var/run/netns/{n}")))
            .transpose()?;
        let thread = std::thread::Builder::new().name(THREAD_NAME.into()).spawn(
            move || -> anyhow::Result<()> {
                if let Some(ns) = ns {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: setns on this thread; the runtime's threads are
                    // spawned from it and inherit the namespace.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error().into());
                    }
                }
                // Per thread on Linux: this one runs the event loop, the
                // runtime's workers the rest.
                let renice = move || {
                    if nice != 0 {
                        // SAFETY: setpriority on the calling thread (who = 0).
                        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
                    }
                };
                renice();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name(THREAD_NAME)
                    .on_thread_start(renice)
                    .enable_all()
                    .build()?;
                rt.block_on(run(
                    config,
                    async {
                        let _ = stop_rx.await;
                    },
                    Some(started_tx),
                ))
            },
        )?;
        match started_rx.blocking_recv() {
            Ok(s) => Ok(Self {
                listen: s.listen,
                report: s.report,
                shared: Some(s.shared),
                stop: Some(stop_tx),
                thread: Some(thread),
                container: None,
            }),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e.context("the agent failed to start")),
                _ => anyhow::bail!("the agent stopped before it was ready"),
            },
        }
    }

    /// An agent running from its image (see [`crate::container`]), once
    /// its readiness probe passes.
    pub fn from_container(container: crate::container::AgentContainer) -> anyhow::Result<Self> {
        container.wait_ready(std::time::Duration::from_secs(30))?;
        Ok(Self {
            listen: container.metrics,
            report: None,
            shared: None,
            stop: None,
            thread: None,
            container: Some(container),
        })
    }

    /// The container the agent runs in, if it does.
    pub fn container(&self) -> Option<&crate::container::AgentContainer> {
        self.container.as_ref()
    }

    /// Stops the agent and returns how its run ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_now()
    }

    /// Stops the agent (programs detached); later calls do nothing.
    pub fn stop_now(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.container.take() {
            return c.remove();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the agent thread panicked"))?,
            None => Ok(()),
        }
    }

    /// GET `path` from the agent's HTTP endpoint: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http::get(self.listen, path)
    }

    /// GET /report from the agent's report address: (status, body).
    pub fn get_report(&self) -> anyhow::Result<(u16, String)> {
        if let Some(c) = &self.container {
            return c.get_report();
        }
        let addr = self
            .report
            .ok_or_else(|| anyhow::anyhow!("this agent serves no /report"))?;
        crate::http::get(addr, "/report")
    }

    /// GET `path` from the agent's report address (in-process agents).
    pub fn get_report_path(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let addr = self
            .report
            .ok_or_else(|| anyhow::anyhow!("this agent serves no report address"))?;
        crate::http::get(addr, path)
    }

    /// The agent's own accounts of what it could not read or lost (events
    /// a full ring buffer dropped, heads it could not parse, requests never
    /// answered, Service backends not found, ...): every non-zero sample of
    /// [`LOSS_METRICS`], as `name{labels} value`. What a failed scenario
    /// prints beside its verdict, so a missing hop says whether the agent
    /// knows it missed something.
    pub fn losses(&self) -> anyhow::Result<Vec<String>> {
        let (status, body) = self.get("/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body
            .lines()
            .filter(|l| LOSS_METRICS.iter().any(|m| l.starts_with(m)))
            .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
            .map(|l| l.trim_start_matches("tracegap_").to_owned())
            .collect())
    }

    /// The value of a metric sample line that starts with `prefix`
    /// (name and labels), summed over matching lines.
    pub fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        let (status, body) = self.get("/metrics")?;
        // A 503 (the endpoint busy) has no samples: not a zero.
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop_now() {
            eprintln!("agent: {e:#}");
        }
    }
}

/// The agent's counters of what it lost or could not read (see
/// [`Agent::losses`]).
pub const LOSS_METRICS: &[&str] = &[
    "tracegap_ringbuf_lost_events_total",
    "tracegap_events_undecodable_total",
    "tracegap_kernel_events_total{counter=\"parse_errors\"}",
    "tracegap_kernel_events_total{counter=\"header_budget_exhausted\"}",
    "tracegap_kernel_events_total{counter=\"h2_lost\"}",
    "tracegap_kernel_events_total{counter=\"h2_server_preface_missed\"}",
    "tracegap_kernel_events_total{counter=\"tls_unnamed_calls\"}",
    "tracegap_http_unanswered_requests_total",
    "tracegap_http_starts_ignored_total",
    "tracegap_http_messages_unpaired_total",
    "tracegap_http_boundaries_lost_total",
    "tracegap_service_lookups_total{result=\"not_found\"}",
    "tracegap_service_lookups_total{result=\"failed\"}",
    "tracegap_h2_unread_total",
    "tracegap_h2_partly_read_requests_total",
    "tracegap_spans_dropped_total",
];

/// Name of every thread an in-process agent runs on, so its CPU time can be
/// told apart from the load generator's and the servers'.
pub const THREAD_NAME: &str = "tg-agent";
