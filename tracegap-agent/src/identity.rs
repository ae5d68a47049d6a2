//! Who is behind an address: names for services, for span resources and
//! metric labels. Filled from `--service IP=NAME` and, in a cluster, from
//! the Kubernetes API; an unknown address is named by itself.

use std::{
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use thiserror::Error;

use crate::gap::span::Identity;

/// A `--service` value that is not `IP=NAME`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("expected IP=NAME, got {0:?}")]
pub struct ParseError(String);

/// Parses `10.0.0.2=service-b`.
pub fn parse_mapping(s: &str) -> Result<(IpAddr, String), ParseError> {
    let (ip, name) = s.split_once('=').ok_or_else(|| ParseError(s.to_owned()))?;
    let ip = ip.trim().parse().map_err(|_| ParseError(s.to_owned()))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(ParseError(s.to_owned()));
    }
    Ok((ip, name.to_owned()))
}

/// A names file line that cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "line {line}: expected `IP NAME [NAMESPACE/POD] [node=NODE] [uid=POD_UID] [host-network] \
     [instrumented=true|false] [kind=pod|service|node]`, got {text:?}"
)]
pub struct NamesFileError {
    pub line: usize,
    pub text: String,
}

/// Reads a names file: one `IP NAME [NAMESPACE/POD] [node=NODE]
/// [uid=POD_UID] [host-network] [instrumented=BOOL] [kind=pod|service|node]`
/// per line, `#` comments and blank lines ignored. The standalone agent's
/// stand-in for the Kubernetes API: the same identities, written down.
///
/// - a pod (the default kind): NAME is its service name, NODE the node it
///   runs on (which node reports its hops, see [`crate::cluster::reports_here`]),
///   POD_UID its `metadata.uid` (what its processes' cgroups name);
///   `host-network`: the pod shares the node's address IP and is named by
///   its processes alone (over OpenSSL, see [`crate::process`]);
/// - `kind=service`: a Service's ClusterIP, NAMESPACE/POD read as
///   NAMESPACE/SERVICE; calls to it are followed to the pod behind it
///   ([`crate::nat`]);
/// - `kind=node`: one of a node's addresses (NAME is the node's name):
///   traffic from it is node traffic (host-network pods, NodePort SNAT).
pub fn parse_names_file(text: &str) -> Result<Vec<(IpAddr, Identity)>, NamesFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.split('#').next().unwrap_or_default().trim();
        if l.is_empty() {
            continue;
        }
        let bad = || NamesFileError {
            line: i + 1,
            text: raw.to_owned(),
        };
        let mut f = l.split_whitespace();
        let ip: IpAddr = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let service = f.next().ok_or_else(bad)?.to_owned();
        let mut id = Identity {
            service,
            ..Identity::default()
        };
        for token in f {
            match token.split_once('=') {
                Some(("instrumented", v)) => {
                    id.instrumented = Some(v.parse().map_err(|_| bad())?);
                }
                Some(("node", v)) if !v.is_empty() => id.node = Some(v.to_owned()),
                Some(("uid", v)) if !v.is_empty() => id.pod_uid = Some(v.to_owned()),
                None if token == "host-network" => id.host_network = true,
                Some(("kind", "pod")) => {}
                Some(("kind", "service")) => id.is_service = true,
                Some(("kind", "node")) => id = Identity::node(&id.service),
                Some(_) => return Err(bad()),
                None if id.pod.is_none() => {
                    let (n, p) = token.split_once('/').ok_or_else(bad)?;
                    id.namespace = Some(n.to_owned());
                    id.pod = Some(p.to_owned());
                }
                None => return Err(bad()),
            }
        }
        if id.is_service {
            // NAMESPACE/NAME of a Service is not a pod.
            id.pod = None;
        }
        if (id.is_service || id.is_node) && (id.host_network || id.pod_uid.is_some()) {
            return Err(bad());
        }
        out.push((ip, id));
    }
    Ok(out)
}

/// Addresses to identities, shared by the data path (reads) and whatever
/// keeps it current (writes).
#[derive(Default)]
pub struct Directory {
    /// Shared, not copied, with each hop that names them: a lookup per
    /// hop end allocates nothing.
    entries: RwLock<crate::FastMap<IpAddr, Arc<Identity>>>,
    /// Pods by UID, host-network ones too: what a process's cgroup names.
    pods: RwLock<crate::FastMap<String, Arc<Identity>>>,
    /// Service addresses among the entries: while there are none (no
    /// Services known), asking costs no lock.
    services: AtomicUsize,
}

impl Directory {
    /// The names file's (or `--service`'s) identities: a pod with a UID is
    /// known by it too; a host-network pod by it alone (its address is
    /// the node's).
    pub fn with_identities(ids: impl IntoIterator<Item = (IpAddr, Identity)>) -> Self {
        let d = Self::default();
        for (ip, id) in ids {
            if let Some(uid) = id.pod_uid.clone() {
                d.set_pod(uid, id.clone());
            }
            if !id.host_network {
                d.set(ip, id);
            }
        }
        d
    }

    /// A pod by its UID (a host-network one has no address of its own).
    pub fn set_pod(&self, uid: String, identity: Identity) {
        if let Ok(mut p) = self.pods.write() {
            p.insert(uid, Arc::new(identity));
        }
    }

    pub fn remove_pod(&self, uid: &str) {
        if let Ok(mut p) = self.pods.write() {
            p.remove(uid);
        }
    }

    /// The pod with UID `uid`, if known.
    pub fn pod(&self, uid: &str) -> Option<Arc<Identity>> {
        self.pods.read().ok().and_then(|p| p.get(uid).cloned())
    }

    /// `f` of the pod with UID `uid`, if known, without a copy of it (for
    /// every plaintext event).
    pub fn pod_with<R>(&self, uid: &str, f: impl FnOnce(&Identity) -> R) -> Option<R> {
        self.pods
            .read()
            .ok()
            .and_then(|p| p.get(uid).map(|id| f(id)))
    }

    pub fn set(&self, ip: IpAddr, identity: Identity) {
        if let Ok(mut e) = self.entries.write() {
            let added = identity.is_service;
            let removed = e
                .insert(ip, Arc::new(identity))
                .is_some_and(|old| old.is_service);
            self.count_services(added, removed);
        }
    }

    pub fn remove(&self, ip: &IpAddr) {
        if let Ok(mut e) = self.entries.write() {
            let removed = e.remove(ip).is_some_and(|old| old.is_service);
            self.count_services(false, removed);
        }
    }

    fn count_services(&self, added: bool, removed: bool) {
        match (added, removed) {
            (true, false) => {
                self.services.fetch_add(1, Ordering::Relaxed);
            }
            (false, true) => {
                self.services.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Whether `ip` is a Service's address (a ClusterIP): cheap, for every
    /// event.
    pub fn is_service(&self, ip: IpAddr) -> bool {
        self.services.load(Ordering::Relaxed) > 0
            && self
                .entries
                .read()
                .is_ok_and(|e| e.get(&ip).is_some_and(|i| i.is_service))
    }

    /// Names this node's own addresses (unless something already names
    /// them): traffic from them is node traffic, not a pod's.
    pub fn add_node_addresses(&self, node: &str, addrs: impl IntoIterator<Item = IpAddr>) {
        if let Ok(mut e) = self.entries.write() {
            for ip in addrs {
                e.entry(ip)
                    .or_insert_with(|| Arc::new(Identity::node(node)));
            }
        }
    }

    /// The identity of `ip`, or the address itself as the service name.
    pub fn lookup(&self, ip: IpAddr) -> Arc<Identity> {
        self.entries
            .read()
            .ok()
            .and_then(|e| e.get(&ip).cloned())
            .unwrap_or_else(|| Arc::new(Identity::unknown(ip)))
    }
}

/// This host's addresses (the node's, for an agent on the host network),
/// loopback and IPv6 link-local ones left out.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        let ip = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                let sa = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                let sa = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::from(sa.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if !ip.is_loopback() && !link_local && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_parse_and_unknown_addresses_are_grouped() {
        let (ip, name) = parse_mapping("10.0.0.2=service-b").unwrap();
        assert_eq!(name, "service-b");
        assert!(parse_mapping("10.0.0.2").is_err());
        assert!(parse_mapping("nope=x").is_err());
        assert!(parse_mapping("10.0.0.2=").is_err());
        let d = Directory::with_identities([(
            ip,
            Identity {
                service: name,
                ..Identity::default()
            },
        )]);
        assert_eq!(d.lookup(ip).service, "service-b");
        // Unnamed addresses are grouped, never named by themselves.
        let other: IpAddr = "fd00::9".parse().unwrap();
        assert_eq!(d.lookup(other).service, "unknown");
        let public: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(d.lookup(public).service, "external");
        assert_eq!(d.lookup("8.8.8.8".parse().unwrap()).service, "external");
        assert_eq!(d.lookup("100.64.3.4".parse().unwrap()).service, "unknown");
    }

    #[test]
    fn names_files_are_read_line_by_line() {
        let ids = parse_names_file(
            "# lab\n10.209.1.2 service-a lab/service-a-0\n\n10.209.1.3  service-b # no pod\n",
        )
        .unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].1.pod.as_deref(), Some("service-a-0"));
        assert_eq!(ids[0].1.namespace.as_deref(), Some("lab"));
        assert_eq!(ids[1].1.service, "service-b");
        assert_eq!(ids[1].1.pod, None);
        let e = parse_names_file("10.0.0.1 a\nnot-an-ip b\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse_names_file("10.0.0.1 a b c").is_err());
        let ids = parse_names_file("10.0.0.1 nginx lab/nginx-0 instrumented=false").unwrap();
        assert_eq!(ids[0].1.instrumented, Some(false));
        assert!(parse_names_file("10.0.0.1 a instrumented=maybe").is_err());
        assert!(parse_names_file("10.0.0.1 a nopod").is_err());
    }

    #[test]
    fn names_files_name_nodes_services_and_where_pods_run() {
        let ids = parse_names_file(
            "10.209.1.2 service-b lab/service-b-0 node=node-1\n\
             10.96.0.10 service-b lab/service-b kind=service\n\
             10.208.1.2 node-1 kind=node\n",
        )
        .unwrap();
        assert_eq!(ids[0].1.node.as_deref(), Some("node-1"));
        assert!(ids[0].1.is_pod());
        let svc = &ids[1].1;
        assert!(svc.is_service && !svc.is_pod());
        assert_eq!(
            (svc.namespace.as_deref(), svc.pod.as_deref()),
            (Some("lab"), None)
        );
        let node = &ids[2].1;
        assert!(node.is_node && !node.is_pod());
        assert_eq!(node.service, "node:node-1");
        assert!(parse_names_file("10.0.0.1 a kind=cluster").is_err());
        assert!(parse_names_file("10.0.0.1 a kind=node host-network").is_err());
        let d = Directory::with_identities(ids.clone());
        assert!(d.is_service(ids[1].0) && !d.is_service(ids[0].0));
        // A node's addresses never rename what is known already.
        d.add_node_addresses("node-1", [ids[0].0, "10.208.1.9".parse().unwrap()]);
        assert_eq!(d.lookup(ids[0].0).service, "service-b");
        assert_eq!(
            d.lookup("10.208.1.9".parse().unwrap()).service,
            "node:node-1"
        );
    }

    #[test]
    fn host_network_pods_are_known_by_their_uid_alone() {
        let ids = parse_names_file(
            "10.208.1.2 node-1 kind=node\n\
             10.208.1.2 node-exporter monitoring/node-exporter-x node=node-1 uid=7f1c host-network\n\
             10.209.1.2 service-b lab/service-b-0 uid=aa01\n",
        )
        .unwrap();
        assert!(ids[1].1.host_network && ids[1].1.is_pod());
        let d = Directory::with_identities(ids);
        // The node's address stays the node's.
        assert_eq!(
            d.lookup("10.208.1.2".parse().unwrap()).service,
            "node:node-1"
        );
        assert_eq!(
            d.pod("7f1c").map(|p| p.service.clone()).as_deref(),
            Some("node-exporter")
        );
        assert_eq!(
            d.pod("aa01").map(|p| p.service.clone()).as_deref(),
            Some("service-b")
        );
        assert_eq!(d.lookup("10.209.1.2".parse().unwrap()).service, "service-b");
        d.remove_pod("7f1c");
        assert!(d.pod("7f1c").is_none());
    }
}
