//! The agent's image run as deploy/base's DaemonSet says, with podman.
//!
//! Nothing is copied by hand: the manifests are rendered with `kubectl
//! kustomize`, read into their k8s-openapi types, and every field of the
//! pod template is either translated into a `podman run` flag or named
//! here as meaningless on one host (scheduling, the API server's own
//! doings). A field this module does not know is an error, so the
//! manifest cannot grow a setting the container test silently skips.
//!
//! What the lab changes, as a cluster operator's overlay would: the
//! ConfigMap's values it must (its trace store, its veth names), and the
//! names file that stands in for the Kubernetes API it does not have.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container as K8sContainer, PodSpec, Probe},
};
use serde_json::Value;

use crate::netns::run;

/// podman's runtime: Debian's default (crun) refuses hybrid cgroup
/// layouts such as this machine's.
const RUNTIME: &str = "runc";

/// Pod-spec fields with no meaning for one container on one host.
const POD_FIELDS_IGNORED: [(&str, &str); 5] = [
    (
        "serviceAccountName",
        "no API server: the lab's names file stands in for it",
    ),
    (
        "dnsPolicy",
        "the node's resolver is the container's (host network)",
    ),
    ("priorityClassName", "scheduling"),
    ("tolerations", "scheduling"),
    ("nodeSelector", "scheduling"),
];

/// Container fields with no meaning here.
const CONTAINER_FIELDS_IGNORED: [(&str, &str); 2] = [
    (
        "imagePullPolicy",
        "offline: the image must be in local storage (--pull never)",
    ),
    (
        "livenessProbe",
        "the kubelet's restart policy; readiness is waited for",
    ),
];

/// An HTTP probe: path and port number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    pub path: String,
    pub port: u16,
}

/// How an environment variable gets its value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EnvValue {
    Literal(String),
    /// `fieldRef: spec.nodeName`.
    NodeName,
    /// `fieldRef: metadata.name`.
    PodName,
}

/// The DaemonSet's pod template, translated.
#[derive(Clone, Debug)]
pub struct PodTemplate {
    pub image: String,
    /// The container's `command` (entrypoint) and `args`.
    entrypoint: Option<Vec<String>>,
    args: Vec<String>,
    /// In order: envFrom first, then env (Kubernetes' precedence).
    env: Vec<(String, EnvValue)>,
    /// Security, resources, volumes and lifecycle as podman flags.
    flags: Vec<String>,
    /// Secret volumes' mounts: (the Secret's name, the path inside); each
    /// run says where its Secret's files are ([`Placement::secrets`]).
    pub secrets: Vec<(String, String)>,
    pub host_network: bool,
    pub readiness: Option<HttpProbe>,
    /// Capabilities the manifest adds (without CAP_), for tests that take
    /// one away.
    pub capabilities: Vec<String>,
    /// What was left out, and why.
    pub ignored: Vec<String>,
}

impl PodTemplate {
    /// The container's memory limit in bytes (`resources.limits.memory`).
    pub fn memory_limit(&self) -> Option<u64> {
        self.flags
            .iter()
            .find_map(|f| f.strip_prefix("--memory="))
            .and_then(|b| b.parse().ok())
    }
}

/// Renders a kustomize directory (`kubectl kustomize DIR`) into documents.
pub fn render(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let out = run(Command::new("kubectl").arg("kustomize").arg(dir))?;
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("reading what kubectl kustomize {} gave", dir.display()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// deploy/base, as the tests and the lab find it.
pub fn deploy_base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base")
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Kubernetes quantities as podman wants them: CPU in cores, memory in bytes.
fn cpu_cores(q: &str) -> anyhow::Result<f64> {
    match q.strip_suffix('m') {
        Some(milli) => Ok(milli.parse::<f64>()? / 1000.0),
        None => Ok(q.parse::<f64>()?),
    }
}

fn memory_bytes(q: &str) -> anyhow::Result<u64> {
    const UNITS: [(&str, u64); 6] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, unit) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return Ok(n.parse::<u64>()? * unit);
        }
    }
    Ok(q.parse()?)
}

fn probe(p: &Probe, ports: &BTreeMap<String, u16>) -> anyhow::Result<HttpProbe> {
    let get = p.http_get.as_ref().context("only httpGet probes are run")?;
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => u16::try_from(*n)?,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => *ports
            .get(name)
            .with_context(|| format!("the probe names port {name:?}, which is not declared"))?,
    };
    Ok(HttpProbe {
        path: get.path.clone().unwrap_or_else(|| "/".to_owned()),
        port,
    })
}

impl PodTemplate {
    /// The template of the DaemonSet named `name` in rendered manifests,
    /// with the ConfigMaps it reads.
    pub fn from_manifests(docs: &[Value], name: &str) -> anyhow::Result<Self> {
        let ds = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
            .with_context(|| format!("no DaemonSet {name} in the manifests"))?;
        let ds: DaemonSet = serde_json::from_value(ds.clone())?;
        let config_maps: BTreeMap<String, ConfigMap> = docs
            .iter()
            .filter(|d| d["kind"] == "ConfigMap")
            .map(|d| {
                let cm: ConfigMap = serde_json::from_value(d.clone())?;
                Ok((cm.metadata.name.clone().unwrap_or_default(), cm))
            })
            .collect::<anyhow::Result<_>>()?;
        let spec = ds
            .spec
            .template
            .spec
            .context("the DaemonSet has no pod spec")?;
        Self::from_pod_spec(&spec, &config_maps)
    }

    fn from_pod_spec(
        spec: &PodSpec,
        config_maps: &BTreeMap<String, ConfigMap>,
    ) -> anyhow::Result<Self> {
        let mut t = Self {
            image: String::new(),
            entrypoint: None,
            args: Vec::new(),
            env: Vec::new(),
            flags: Vec::new(),
            secrets: Vec::new(),
            host_network: false,
            readiness: None,
            capabilities: Vec::new(),
            ignored: Vec::new(),
        };
        let mut volumes = BTreeMap::new();
        for key in keys(&serde_json::to_value(spec)?) {
            match key.as_str() {
                "containers" => {}
                "hostNetwork" => t.host_network = spec.host_network == Some(true),
                "hostPID" => {
                    if spec.host_pid == Some(true) {
                        t.flags.push("--pid=host".into());
                    }
                }
                "terminationGracePeriodSeconds" => {
                    if let Some(s) = spec.termination_grace_period_seconds {
                        t.flags.push(format!("--stop-timeout={s}"));
                    }
                }
                "volumes" => {
                    for v in spec.volumes.iter().flatten() {
                        let source = match (&v.host_path, &v.secret) {
                            (Some(host), _) => Volume::Host(host.path.clone()),
                            (None, Some(secret)) => {
                                Volume::Secret(secret.secret_name.clone().with_context(|| {
                                    format!("volume {}: a Secret without a name", v.name)
                                })?)
                            }
                            (None, None) => bail!(
                                "volume {}: only hostPath and Secret volumes are run",
                                v.name
                            ),
                        };
                        volumes.insert(v.name.clone(), source);
                    }
                }
                "securityContext" => {
                    let sc = serde_json::to_value(&spec.security_context)?;
                    for k in keys(&sc) {
                        match k.as_str() {
                            "seccompProfile" => t.seccomp(&sc["seccompProfile"])?,
                            other => bail!("pod securityContext.{other} is not translated"),
                        }
                    }
                }
                other => match POD_FIELDS_IGNORED.iter().find(|(k, _)| *k == other) {
                    Some((k, why)) => t.ignored.push(format!("{k}: {why}")),
                    None => bail!("the pod template sets {other}, which is not translated"),
                },
            }
        }
        let [c] = spec.containers.as_slice() else {
            bail!(
                "the agent's pod has {} containers, not one",
                spec.containers.len()
            );
        };
        t.container(c, config_maps, &volumes)?;
        Ok(t)
    }

    fn seccomp(&mut self, profile: &Value) -> anyhow::Result<()> {
        match profile["type"].as_str() {
            // podman's default profile is its RuntimeDefault.
            Some("RuntimeDefault") => {}
            Some("Unconfined") => self.flags.push("--security-opt=seccomp=unconfined".into()),
            other => bail!("seccompProfile {other:?} is not translated"),
        }
        Ok(())
    }

    fn container(
        &mut self,
        c: &K8sContainer,
        config_maps: &BTreeMap<String, ConfigMap>,
        volumes: &BTreeMap<String, Volume>,
    ) -> anyhow::Result<()> {
        let mut ports = BTreeMap::new();
        for p in c.ports.iter().flatten() {
            if let Some(name) = &p.name {
                ports.insert(name.clone(), u16::try_from(p.container_port)?);
            }
        }
        let mut seccomp_set = false;
        for key in keys(&serde_json::to_value(c)?) {
            match key.as_str() {
                "name" => {}
                // With the host's network there is nothing to publish; the
                // names serve the probes.
                "ports" => {}
                "image" => self.image = c.image.clone().unwrap_or_default(),
                "command" => self.entrypoint = c.command.clone(),
                "args" => self.args = c.args.clone().unwrap_or_default(),
                "envFrom" => {
                    for from in c.env_from.iter().flatten() {
                        let name = from
                            .config_map_ref
                            .as_ref()
                            .map(|r| r.name.clone())
                            .context("only configMapRef envFrom is translated")?;
                        let cm = config_maps.get(&name).with_context(|| {
                            format!("envFrom names ConfigMap {name}, not in the manifests")
                        })?;
                        for (k, v) in cm.data.iter().flatten() {
                            self.env.push((k.clone(), EnvValue::Literal(v.clone())));
                        }
                    }
                }
                "env" => {
                    for e in c.env.iter().flatten() {
                        let value = match (&e.value, &e.value_from) {
                            (Some(v), None) => EnvValue::Literal(v.clone()),
                            (None, Some(from)) => {
                                match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                                    Some("spec.nodeName") => EnvValue::NodeName,
                                    Some("metadata.name") => EnvValue::PodName,
                                    other => bail!(
                                        "env {}: valueFrom {other:?} is not translated",
                                        e.name
                                    ),
                                }
                            }
                            _ => bail!("env {}: neither a value nor a fieldRef", e.name),
                        };
                        self.env.push((e.name.clone(), value));
                    }
                }
                "readinessProbe" => {
                    let p = c.readiness_probe.as_ref().context("readinessProbe")?;
                    self.readiness = Some(probe(p, &ports)?);
                }
                "resources" => {
                    let r = c.resources.as_ref().context("resources")?;
                    for (k, q) in r.limits.iter().flatten() {
                        match k.as_str() {
                            "cpu" => self.flags.push(format!("--cpus={}", cpu_cores(&q.0)?)),
                            "memory" => {
                                self.flags.push(format!("--memory={}", memory_bytes(&q.0)?))
                            }
                            other => bail!("resources.limits.{other} is not translated"),
                        }
                    }
                    for (k, q) in r.requests.iter().flatten() {
                        match k.as_str() {
                            // The kubelet's mapping: 1 core = 1024 shares.
                            "cpu" => self.flags.push(format!(
                                "--cpu-shares={}",
                                ((cpu_cores(&q.0)? * 1024.0) as u64).max(2)
                            )),
                            "memory" => self
                                .flags
                                .push(format!("--memory-reservation={}", memory_bytes(&q.0)?)),
                            other => bail!("resources.requests.{other} is not translated"),
                        }
                    }
                }
                "securityContext" => {
                    let sc = c.security_context.as_ref().context("securityContext")?;
                    let v = serde_json::to_value(sc)?;
                    for k in keys(&v) {
                        match k.as_str() {
                            "privileged" => {
                                if sc.privileged == Some(true) {
                                    self.flags.push("--privileged".into());
                                }
                            }
                            "allowPrivilegeEscalation" => {
                                if sc.allow_privilege_escalation == Some(false) {
                                    self.flags.push("--security-opt=no-new-privileges".into());
                                }
                            }
                            "readOnlyRootFilesystem" => {
                                if sc.read_only_root_filesystem == Some(true) {
                                    // Kubernetes mounts no tmpfs of its own.
                                    self.flags.push("--read-only".into());
                                    self.flags.push("--read-only-tmpfs=false".into());
                                }
                            }
                            "capabilities" => {
                                let caps = sc.capabilities.as_ref().context("capabilities")?;
                                for d in caps.drop.iter().flatten() {
                                    self.flags.push(format!("--cap-drop={d}"));
                                }
                                self.capabilities = caps.add.clone().unwrap_or_default();
                            }
                            "runAsUser" => {
                                if let Some(u) = sc.run_as_user {
                                    self.flags.push(format!("--user={u}"));
                                }
                            }
                            "seccompProfile" => {
                                seccomp_set = true;
                                self.seccomp(&v["seccompProfile"])?;
                            }
                            other => bail!("container securityContext.{other} is not translated"),
                        }
                    }
                }
                "volumeMounts" => {
                    for m in c.volume_mounts.iter().flatten() {
                        let source = volumes
                            .get(&m.name)
                            .with_context(|| format!("volumeMount {}: no such volume", m.name))?;
                        match source {
                            Volume::Host(host) => {
                                let ro = if m.read_only == Some(true) { ":ro" } else { "" };
                                self.flags
                                    .push(format!("--volume={host}:{}{ro}", m.mount_path));
                            }
                            // Kubernetes mounts a Secret read-only whatever
                            // the mount says.
                            Volume::Secret(name) => {
                                self.secrets.push((name.clone(), m.mount_path.clone()))
                            }
                        }
                    }
                }
                other => match CONTAINER_FIELDS_IGNORED.iter().find(|(k, _)| *k == other) {
                    Some((k, why)) => self.ignored.push(format!("{k}: {why}")),
                    None => bail!("the agent's container sets {other}, which is not translated"),
                },
            }
        }
        if !seccomp_set && !self.flags.iter().any(|f| f.contains("seccomp")) {
            // Kubernetes' default without a profile is Unconfined; podman's
            // is its own profile.
            self.flags.push("--security-opt=seccomp=unconfined".into());
        }
        anyhow::ensure!(
            !self.image.is_empty(),
            "the agent's container names no image"
        );
        Ok(())
    }

    /// The environment the agent sees on `node`, with `overlay` on top
    /// (as a kustomize patch of the ConfigMap would be).
    pub fn env(
        &self,
        node: &str,
        pod: &str,
        overlay: &[(String, String)],
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (k, v) in &self.env {
            let value = match v {
                EnvValue::Literal(s) => s.clone(),
                EnvValue::NodeName => node.to_owned(),
                EnvValue::PodName => pod.to_owned(),
            };
            env.insert(k.clone(), value);
        }
        for (k, v) in overlay {
            env.insert(k.clone(), v.clone());
        }
        env
    }
}

/// Where and how one agent container runs.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// The node's name (spec.nodeName).
    pub node: String,
    /// The node's network namespace (`ip netns` name): the container's
    /// host network. None: this machine's own.
    pub netns: Option<String>,
    /// An address of the node that the caller reaches (the probes').
    pub reach: Option<IpAddr>,
    /// ConfigMap values replaced or added.
    pub overlay: Vec<(String, String)>,
    /// Files bound read-only into the container: (host path, path inside).
    pub files: Vec<(PathBuf, String)>,
    /// The Secrets the manifest mounts: (name, a directory of its files,
    /// one per key, with the volume's mode).
    pub secrets: Vec<(String, PathBuf)>,
    /// Capabilities the manifest adds that this run leaves out (a test of
    /// their necessity).
    pub without: Vec<String>,
}

/// Where a pod volume's files come from.
enum Volume {
    /// A directory of the node.
    Host(String),
    /// A Secret, by name: the run supplies its files.
    Secret(String),
}

/// One running agent container; removed (stopped with SIGTERM first) when
/// dropped.
pub struct AgentContainer {
    pub name: String,
    pub env: BTreeMap<String, String>,
    pub netns: Option<String>,
    pub metrics: SocketAddr,
    pub readiness: Option<HttpProbe>,
    removed: bool,
}

/// Hard limits podman may ask for: its defaults exceed what some machines
/// allow ("setrlimit RLIMIT_NOFILE: Operation not permitted").
fn ulimit_flags() -> Vec<String> {
    let hard = |resource| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct it is given.
        if unsafe { libc::getrlimit(resource, &mut r) } == 0 {
            r.rlim_max.min(1 << 20)
        } else {
            1024
        }
    };
    let nofile = hard(libc::RLIMIT_NOFILE).min(65536);
    // runc sets it after dropping CAP_SYS_RESOURCE; the agent runs a few
    // threads.
    let nproc = hard(libc::RLIMIT_NPROC).min(4096);
    vec![
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ]
}

/// Whether podman has `image` in local storage.
pub fn image_present(image: &str) -> bool {
    Command::new("podman")
        .args(["image", "exists", image])
        .status()
        .is_ok_and(|s| s.success())
}

impl AgentContainer {
    /// `podman run -d` of the template on `at`.
    pub fn start(t: &PodTemplate, at: &Placement, name: &str) -> anyhow::Result<Self> {
        let args = Self::podman_args(t, at, name)?;
        // A container left by an interrupted run of the same name.
        let _ = Command::new("podman").args(["rm", "-f", name]).output();
        if let Err(e) = run(Command::new("podman").args(&args)) {
            // A runtime failure leaves the container created, not running.
            let _ = Command::new("podman").args(["rm", "-f", name]).output();
            return Err(e.context(format!("starting the agent container on {}", at.node)));
        }
        let env = t.env(&at.node, name, &at.overlay);
        let listen: SocketAddr = env
            .get("TRACEGAP_LISTEN")
            .map(String::as_str)
            .unwrap_or("0.0.0.0:9464")
            .parse()?;
        let host = at.reach.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        Ok(Self {
            name: name.to_owned(),
            env,
            netns: at.netns.clone(),
            metrics: SocketAddr::new(host, listen.port()),
            readiness: t.readiness.clone(),
            removed: false,
        })
    }

    /// Everything after `podman`.
    pub fn podman_args(t: &PodTemplate, at: &Placement, name: &str) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(t.host_network, "the agent's pod must use the host network");
        let mut a: Vec<String> = vec![
            format!("--runtime={RUNTIME}"),
            "run".into(),
            "--detach".into(),
            "--pull=never".into(),
            format!("--name={name}"),
            format!("--hostname={}", at.node),
        ];
        a.extend(ulimit_flags());
        a.push(match &at.netns {
            Some(ns) => format!("--network=ns:/var/run/netns/{ns}"),
            None => "--network=host".into(),
        });
        a.extend(t.flags.iter().cloned());
        let added: Vec<&String> = t
            .capabilities
            .iter()
            .filter(|c| !at.without.contains(c))
            .collect();
        for w in &at.without {
            anyhow::ensure!(t.capabilities.contains(w), "the manifest does not add {w}");
        }
        for c in added {
            a.push(format!("--cap-add={c}"));
        }
        for (k, v) in t.env(&at.node, name, &at.overlay) {
            a.push(format!("--env={k}={v}"));
        }
        for (host, inside) in &at.files {
            a.push(format!("--volume={}:{inside}:ro", host.display()));
        }
        for (secret, inside) in &t.secrets {
            let host = at
                .secrets
                .iter()
                .find(|(name, _)| name == secret)
                .map(|(_, dir)| dir)
                .with_context(|| {
                    format!("the DaemonSet mounts Secret {secret}, which this run does not have")
                })?;
            a.push(format!("--volume={}:{inside}:ro", host.display()));
        }
        if let Some(e) = &t.entrypoint {
            a.push(format!("--entrypoint={}", serde_json::to_string(e)?));
        }
        a.push(t.image.clone());
        a.extend(t.args.iter().cloned());
        Ok(a)
    }

    /// Whether it has exited, and with what code.
    pub fn exit_code(&self) -> anyhow::Result<Option<i32>> {
        let out = run(Command::new("podman").args([
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            &self.name,
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        match (words.next(), words.next()) {
            (Some("exited" | "stopped"), Some(code)) => Ok(Some(code.parse()?)),
            _ => Ok(None),
        }
    }

    /// The agent's process id, as the host sees it.
    fn pid(&self) -> anyhow::Result<String> {
        let out = run(Command::new("podman").args([
            "inspect",
            "--format",
            "{{.State.Pid}}",
            &self.name,
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The agent process's resident memory now, in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")?;
        Ok(kib * 1024)
    }

    /// The most memory the container's cgroup has been charged since it
    /// started, in bytes: its processes and what the kernel charges to
    /// them, the verifier's memory while the programs load among it
    /// (cgroup v2's `memory.peak`, v1's `memory.max_usage_in_bytes`).
    pub fn memory_peak(&self) -> anyhow::Result<u64> {
        let pid = self.pid()?;
        let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        for line in groups.lines() {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next(), f.next(), f.next().unwrap_or_default());
            let file = match controllers {
                Some(c) if c.split(',').any(|c| c == "memory") => {
                    format!("/sys/fs/cgroup/memory{path}/memory.max_usage_in_bytes")
                }
                Some("") => format!("/sys/fs/cgroup{path}/memory.peak"),
                _ => continue,
            };
            if let Ok(text) = std::fs::read_to_string(&file) {
                return Ok(text.trim().parse()?);
            }
        }
        bail!("no memory peak in the cgroups of pid {pid}: {groups}")
    }

    /// What it printed (stdout and stderr).
    pub fn logs(&self) -> String {
        Command::new("podman")
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    /// Waits for the readiness probe to pass, as the kubelet would;
    /// fails with the container's log if it exits first.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let probe = self
            .readiness
            .clone()
            .context("the template has no readinessProbe")?;
        let addr = SocketAddr::new(self.metrics.ip(), probe.port);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.exit_code()? {
                bail!("the agent container exited ({code}):\n{}", self.logs());
            }
            if let Ok((200, _)) = crate::http::get(addr, &probe.path) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}{} not ready after {timeout:?}:\n{}",
                    addr,
                    probe.path,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for it to exit; its code and log.
    pub fn wait_exit(&self, timeout: Duration) -> anyhow::Result<(i32, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.exit_code()? {
                return Ok((code, self.logs()));
            }
            if Instant::now() > deadline {
                bail!("still running after {timeout:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// GET /report on the node, where it is served (loopback by default):
    /// as `kubectl exec` would, from inside the node's network namespace.
    pub fn get_report(&self) -> anyhow::Result<(u16, String)> {
        let addr = self
            .env
            .get("TRACEGAP_REPORT_LISTEN")
            .map(String::as_str)
            .unwrap_or("127.0.0.1:9465");
        let url = format!("http://{addr}/report");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        let out = run(cmd.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", &url]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        Ok((code.trim().parse()?, body.to_owned()))
    }

    /// Stops it (SIGTERM, then the grace period) and removes it.
    pub fn remove(&mut self) -> anyhow::Result<()> {
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        run(Command::new("podman").args(["rm", "--force", "--time=10", &self.name])).map(drop)
    }
}

impl Drop for AgentContainer {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("removing container {}: {e:#}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_read_as_kubernetes_writes_them() {
        assert_eq!(cpu_cores("50m").ok(), Some(0.05));
        assert_eq!(cpu_cores("2").ok(), Some(2.0));
        assert_eq!(memory_bytes("256Mi").ok(), Some(256 << 20));
        assert_eq!(memory_bytes("1G").ok(), Some(1_000_000_000));
        assert!(memory_bytes("lots").is_err());
    }
}
