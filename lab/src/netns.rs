//! "Pods" as network namespaces on a bridge: a node without Kubernetes,
//! with the host-side veths where tracegap attaches. The bridge lives in the
//! root namespace (the tests' one-node lab) or in a namespace of its own,
//! the node's (the lab's cluster, [`crate::cluster`]).
//!
//! Everything a [`Node`] creates is removed when it is dropped, also on a
//! panic. Traffic stays between the namespaces it made and the node.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// A bridge with pods attached: a node.
pub struct Node {
    /// Short unique tag used in every name this node creates.
    tag: String,
    pub bridge: String,
    /// Third octet of 10.209.X.0/24 and the X of fd00:7467:X::/64.
    pub subnet: u8,
    pub pods: Vec<Pod>,
    /// Index of the next pod: never reused, so addresses stay unique.
    next_pod: usize,
    /// The node's own network namespace, where its bridge, its pods' host
    /// veths and its agent live; None: the root namespace.
    pub netns: Option<String>,
    /// The node's name (Kubernetes' `spec.nodeName`), and its replica
    /// number in pod names (`service-b-1`).
    pub name: String,
    pub index: usize,
}

/// A network namespace with one veth to the node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// Network namespace name (`ip netns`).
    pub netns: String,
    /// Host-side veth: where tracegap attaches.
    pub host_if: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Node {
    /// Creates a bridge in the root namespace and `pods` namespaces
    /// attached to it.
    pub fn new(pods: &[&str]) -> anyhow::Result<Self> {
        Self::create(pods, None)
    }

    /// Creates a node in a network namespace of its own, named `name`
    /// (replica `index` in pod names), with `pods` on its bridge. Pods route
    /// through the node (their default gateway), so it can forward and NAT
    /// their traffic as a cluster node does.
    pub fn in_namespace(name: &str, index: usize, pods: &[&str]) -> anyhow::Result<Self> {
        Self::create(pods, Some((name, index)))
    }

    fn create(pods: &[&str], own: Option<(&str, usize)>) -> anyhow::Result<Self> {
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xfffff);
        // Spread concurrent test processes over the 10.209.0.0/16 range.
        let subnet = ((pid.wrapping_mul(7) + n * 13) % 250 + 1) as u8;
        let bridge = format!("tgb{tag}");
        let netns = own.map(|_| format!("tgn{tag}"));
        if let Some(ns) = &netns {
            ip(&["netns", "add", ns])?;
        }
        // Recorded before anything else can fail, so Drop removes it.
        let mut node = Self {
            tag,
            bridge,
            subnet,
            pods: Vec::new(),
            next_pod: 2,
            netns,
            name: own.map_or_else(|| "node".to_owned(), |(n, _)| n.to_owned()),
            index: own.map_or(0, |(_, i)| i),
        };
        if node.netns.is_some() {
            node.ip(&["link", "set", "lo", "up"])?;
        }
        node.ip(&["link", "add", &node.bridge, "type", "bridge"])?;
        // The node's own address on the pod network: pods reach host
        // services (the tests' OTLP receiver) through it.
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", node.gateway()),
            "dev",
            &node.bridge,
        ])?;
        node.ip(&["link", "set", &node.bridge, "up"])?;
        for name in pods {
            node.add_pod(name)?;
        }
        Ok(node)
    }

    /// `ip` in the node's namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        match &self.netns {
            Some(ns) => {
                let mut full = vec!["-n", ns.as_str()];
                full.extend_from_slice(args);
                ip(&full)
            }
            None => ip(args),
        }
    }

    /// A command run in the node's network namespace.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg("--")
                    .arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Adds a pod to the running node (a pod scheduled later).
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.next_pod;
        self.next_pod += 1;
        let netns = format!("tg{}p{i}", self.tag);
        let host_if = format!("tgv{}p{i}", self.tag);
        let ipv4 = Ipv4Addr::new(10, 209, self.subnet, i as u8);
        let ipv6: Ipv6Addr = format!("fd00:7467:{}::{i}", self.subnet).parse()?;
        ip(&["netns", "add", &netns])?;
        // Recorded before anything else can fail, so Drop removes it.
        self.pods.push(Pod {
            name: name.to_owned(),
            netns: netns.clone(),
            host_if: host_if.clone(),
            ipv4,
            ipv6,
        });
        self.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        self.ip(&["link", "set", &host_if, "master", &self.bridge, "up"])?;
        let x = |args: &[&str]| -> anyhow::Result<()> {
            let mut full = vec!["-n", netns.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        x(&["link", "set", "lo", "up"])?;
        x(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        x(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])?;
        x(&["link", "set", "eth0", "up"])?;
        if self.netns.is_some() {
            let gw = self.gateway().to_string();
            x(&["route", "add", "default", "via", &gw])?;
        }
        Ok(())
    }

    /// Removes a pod: its namespace, and with it both veth ends.
    pub fn remove_pod(&mut self, name: &str) -> anyhow::Result<()> {
        let at = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let pod = self.pods.remove(at);
        let _ = self.ip(&["link", "del", &pod.host_if]);
        ip(&["netns", "del", &pod.netns])
    }

    /// Each pod's identity as the agent should know it: service = pod
    /// name, in Kubernetes namespace `namespace`, pod `<name>-<index>`, on
    /// this node when it has a namespace of its own.
    pub fn identities(
        &self,
        namespace: &str,
    ) -> Vec<(IpAddr, tracegap_agent::gap::span::Identity)> {
        self.pods
            .iter()
            .map(|p| {
                (
                    IpAddr::V4(p.ipv4),
                    tracegap_agent::gap::span::Identity {
                        service: p.name.clone(),
                        namespace: Some(namespace.to_owned()),
                        pod: Some(format!("{}-{}", p.name, self.index)),
                        node: self.netns.as_ref().map(|_| self.name.clone()),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// The node's address on its pod network (on the bridge).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 209, self.subnet, 1)
    }

    /// A name pattern matching the host veths of this node's pods only.
    pub fn veth_pattern(&self) -> String {
        format!("tgv{}p*", self.tag)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the peer.
        for pod in &self.pods {
            // The veth first: a namespace lives on while anything (a
            // socket in TIME_WAIT, a thread) still refers to it, and its
            // veth with it; deleting the host end deletes both ends now.
            let _ = self.ip(&["link", "del", &pod.host_if]);
            let _ = ip(&["netns", "del", &pod.netns]);
        }
        let _ = self.ip(&["link", "del", &self.bridge]);
        if let Some(ns) = &self.netns {
            // Takes its remaining links (uplinks, node links) and its
            // iptables rules with it.
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl Pod {
    /// A command that runs inside this pod's network namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Address to reach this pod at, in the given family.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }

    /// Runs `f` on a new thread that lives in this pod's network namespace,
    /// so sockets it opens belong to the pod.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<T>> {
        let ns = File::open(format!("/var/run/netns/{}", self.netns))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            // SAFETY: setns on this thread only (network namespaces are per-thread).
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            let _ = tx.send(if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            });
            if rc != 0 {
                panic!("setns failed");
            }
            f()
        });
        rx.recv()?.context("entering the pod's network namespace")?;
        Ok(handle)
    }

    /// From inside the pod: connects to `to`, writes `writes` one by one,
    /// and keeps the connection open for `linger` so answers can come back.
    pub fn send_tcp(
        &self,
        to: std::net::SocketAddr,
        writes: Vec<Vec<u8>>,
        linger: std::time::Duration,
    ) -> anyhow::Result<()> {
        self.spawn(move || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut c = std::net::TcpStream::connect(to)?;
            for w in writes {
                c.write_all(&w)?;
            }
            std::thread::sleep(linger);
            Ok(())
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        Ok(())
    }

    /// curl from inside the pod; returns stdout. `args` go before the URL.
    pub fn curl(&self, url: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = run(self
            .command("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .arg(url))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A directory removed with its contents when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tracegap-{label}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process the test started; killed (by its PID) and reaped when dropped.
pub struct Child(std::process::Child);

impl Child {
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self(child))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
