//! A real Prometheus (Debian's, unpacked by `cargo xtask setup`) scraping
//! the lab's agents every second: what the cluster-wide view reads in a
//! cluster. Agents that come and go are followed by reloading its
//! configuration (`/-/reload`: at once, where file-based discovery waits
//! up to 5 s, longer than a short scenario).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::netns::{Child, TempDir};

/// `rules.yaml`'s `spec` in `deploy/prometheus` (`dir`): a Prometheus rules
/// file as it stands.
pub fn rules_file(dir: &Path) -> anyhow::Result<serde_yaml::Value> {
    let rule: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("rules.yaml"))?)?;
    Ok(rule["spec"].clone())
}

/// A PromQL expression users are given.
#[derive(Clone, Debug)]
pub struct Shipped {
    /// Which rule or panel.
    pub what: String,
    pub expr: String,
    /// An alert's: it returns series only while it fires.
    pub filter: bool,
}

/// Every PromQL expression of `deploy/prometheus` (`dir`): the recording
/// rules', the alerts', the dashboard's (Grafana's `$__rate_interval` and
/// `$__range` as Grafana would fill them over a short run).
pub fn shipped_expressions(dir: &Path) -> anyhow::Result<Vec<Shipped>> {
    let mut out = Vec::new();
    for group in rules_file(dir)?["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let expr = rule["expr"].as_str().unwrap_or_default().to_owned();
            let (what, filter) = match (rule["record"].as_str(), rule["alert"].as_str()) {
                (Some(r), _) => (format!("record {r}"), false),
                (_, Some(a)) => (format!("alert {a}"), true),
                _ => anyhow::bail!("a rule neither records nor alerts: {rule:?}"),
            };
            out.push(Shipped { what, expr, filter });
        }
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dashboard.json"))?)?;
    for p in dash["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_default()
                .replace("$__rate_interval", "2m")
                .replace("$__range", "1h");
            out.push(Shipped {
                what: format!("panel {} {}", p["title"], t["refId"]),
                expr,
                filter: false,
            });
        }
    }
    Ok(out)
}

/// The cluster-wide view's test bed: two nodes, each with a client, a
/// service-b (no propagation, port 8080) and an agent, and a Prometheus
/// scraping both agents. Dropped in field order: servers, agents,
/// Prometheus, store, then the cluster.
pub struct TwoNodes {
    pub servers: Vec<crate::service::Service>,
    pub agents: Vec<crate::agent::Agent>,
    pub prometheus: Prometheus,
    pub receiver: crate::store::Receiver,
    /// The agents' configuration (for one restarted).
    pub config: tracegap_agent::agent::AgentConfig,
    pub cluster: crate::cluster::Cluster,
}

impl TwoNodes {
    /// Starts it all, the agents exporting as `export` says.
    pub fn start(
        binary: &Path,
        export: tracegap_agent::export::ExportConfig,
    ) -> anyhow::Result<Self> {
        use crate::{
            cluster::Cluster,
            service::{Behaviour, ServiceSpec},
        };
        let cluster = Cluster::new([&["client", "service-b"], &["client", "service-b"]])?;
        let receiver = crate::store::Receiver::start(Ipv4Addr::UNSPECIFIED.into())?;
        let config = Cluster::agent_config(
            export,
            tracegap_agent::gap::span::ExportMode::Gaps,
            tracegap_agent::identity::parse_names_file(&cluster.names_file("lab"))?,
            Duration::from_secs(30),
        );
        let agents = cluster.start_agents(&config, receiver.grpc.port(), None)?;
        let mut servers = Vec::new();
        for (_, pod) in cluster.replicas("service-b") {
            servers.push(ServiceSpec::new("service-b", 8080, Behaviour::DropsHeaders).start(pod)?);
        }
        let prometheus =
            Prometheus::start(binary, &agents.iter().map(|a| a.listen).collect::<Vec<_>>())?;
        Ok(Self {
            servers,
            agents,
            prometheus,
            receiver,
            config,
            cluster,
        })
    }

    /// Stops node `i`'s agent and starts it again where it was (the same
    /// addresses: the same series in Prometheus, reset).
    pub fn restart_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let listen = (self.agents[i].listen, self.agents[i].report);
        self.agents[i].stop_now()?;
        self.agents[i] = self.cluster.start_agent(
            i,
            &self.config,
            self.receiver.grpc.port(),
            None,
            Some(listen),
        )?;
        Ok(())
    }
}

/// A Prometheus the lab started; stopped (by its PID) and its data removed
/// when dropped.
pub struct Prometheus {
    child: Option<Child>,
    binary: PathBuf,
    pub addr: SocketAddr,
    dir: TempDir,
    /// Its `--web.config.file` (TLS, basic authentication), if any.
    web: bool,
    /// Served over TLS (the web config's `tls_server_config`).
    tls: bool,
}

/// The binary `cargo xtask test` names (`TRACEGAP_PROMETHEUS_BIN`).
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("TRACEGAP_PROMETHEUS_BIN").map(PathBuf::from)
}

/// The configuration scraping `targets` every second.
fn config(targets: &[SocketAddr]) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: tracegap-agents\n    static_configs:\n      - targets: [{}]\n",
        list.join(", ")
    )
}

impl Prometheus {
    /// Starts `binary` on a free loopback port, scraping `targets`, and
    /// waits until it is ready.
    pub fn start(binary: &Path, targets: &[SocketAddr]) -> anyhow::Result<Self> {
        Self::start_with(binary, targets, None)
    }

    /// [`Prometheus::start`] with `web` as its `--web.config.file` (e.g.
    /// `basic_auth_users`, `tls_server_config`): ready once it answers,
    /// 401 included (and, over TLS, the 400 it gives a plain request).
    pub fn start_with(
        binary: &Path,
        targets: &[SocketAddr],
        web: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("prometheus")?;
        if let Some(web) = web {
            std::fs::write(dir.path().join("web.yml"), web)?;
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let mut p = Self {
            child: None,
            binary: binary.to_owned(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            dir,
            web: web.is_some(),
            tls: web.is_some_and(|w| w.contains("tls_server_config")),
        };
        p.write_config(targets)?;
        p.resume()?;
        Ok(p)
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    fn write_config(&self, targets: &[SocketAddr]) -> anyhow::Result<()> {
        let tmp = self.dir.path().join("prometheus.yml.tmp");
        std::fs::write(&tmp, config(targets))?;
        std::fs::rename(tmp, self.dir.path().join("prometheus.yml"))?;
        Ok(())
    }

    /// Scrapes `targets` from now on: the configuration replaced, and
    /// reloaded before this returns.
    pub fn set_targets(&self, targets: &[SocketAddr]) -> anyhow::Result<()> {
        use std::io::{Read as _, Write as _};
        self.write_config(targets)?;
        if self.child.is_none() {
            return Ok(());
        }
        let mut c = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(3))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            c,
            "POST /-/reload HTTP/1.0\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.addr
        )?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        anyhow::ensure!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "Prometheus did not reload: {}",
            answer.lines().next().unwrap_or_default()
        );
        Ok(())
    }

    /// Stops it (its data kept): Prometheus away.
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Starts it again on its data and waits until it is ready.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.binary);
        if self.web {
            cmd.arg(format!("--web.config.file={}", d.join("web.yml").display()));
        }
        self.child = Some(Child::spawn(
            cmd.arg(format!(
                "--config.file={}",
                d.join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", d.join("data").display()))
            .arg(format!("--web.listen-address={}", self.addr))
            .arg("--web.enable-lifecycle")
            // The gaps' example traces.
            .arg("--enable-feature=exemplar-storage")
            .current_dir(d),
        )?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if crate::http::get(self.addr, "/-/ready")
                .is_ok_and(|(s, _)| s == 200 || (self.web && s == 401) || (self.tls && s == 400))
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "Prometheus ({}) not ready in 30 s",
                self.binary.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value of an instant query that returns one series (0 when it
    /// returns none).
    pub fn value(&self, query: &str) -> anyhow::Result<f64> {
        let q: String = url::form_urlencoded::byte_serialize(query.as_bytes()).collect();
        let (status, body) = crate::http::get(self.addr, &format!("/api/v1/query?query={q}"))?;
        anyhow::ensure!(status == 200, "Prometheus answered {status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let result = v["data"]["result"]
            .as_array()
            .context("no result in Prometheus's answer")?;
        match result.as_slice() {
            [] => Ok(0.0),
            [one] => one["value"][1]
                .as_str()
                .context("no value")?
                .parse()
                .context("not a number"),
            many => anyhow::bail!("{} series for {query}", many.len()),
        }
    }

    /// Waits until `query`'s value is `want` (Prometheus has scraped what
    /// the agents count now), or 20 s.
    pub fn wait_for(&self, query: &str, want: f64) -> anyhow::Result<()> {
        self.wait_for_within(query, want, Duration::from_secs(20))
    }

    /// [`Prometheus::wait_for`], `within` at most.
    pub fn wait_for_within(&self, query: &str, want: f64, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.value(query)?;
            if (got - want).abs() < 1e-9 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{query} is {got} in Prometheus, not {want}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `tracegap quality` over a Prometheus, on a loopback port, in a thread
/// of its own; stopped when dropped.
pub struct Quality {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Quality {
    pub fn start(prometheus: &str) -> anyhow::Result<Self> {
        Self::start_with(prometheus, Default::default())
    }

    /// [`Quality::start`] reaching Prometheus with `access`'s TLS and
    /// credentials.
    pub fn start_with(
        prometheus: &str,
        access: tracegap_agent::remote::Access,
    ) -> anyhow::Result<Self> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let config = tracegap_agent::prometheus::serve::QualityConfig {
            prometheus: prometheus.to_owned(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            window: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
            cors_origin: None,
            limits: Default::default(),
            access,
        };
        let thread = std::thread::Builder::new()
            .name("tg-quality".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("tracegap quality: {e}");
                        return;
                    }
                };
                let stopped = async {
                    let _ = stop_rx.await;
                };
                if let Err(e) = rt.block_on(tracegap_agent::prometheus::serve::run(
                    config,
                    stopped,
                    Some(bound_tx),
                )) {
                    eprintln!("tracegap quality: {e:#}");
                }
            })?;
        let addr = bound_rx
            .blocking_recv()
            .context("tracegap quality did not start")?;
        Ok(Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Quality {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
