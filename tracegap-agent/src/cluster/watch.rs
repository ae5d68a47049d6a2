//! Keeping the directory of identities current from the Kubernetes API:
//! watchers (list, then watch; relist on 410 Gone; back-off on errors) on
//! pods, services and replicasets, applied to one state that writes the
//! [`Directory`].
//!
//! IP reuse: an address belongs to the live pod that has it; when two pods
//! claim one (the old pod's deletion not seen yet), the newer pod wins, and
//! a deleted or finished pod releases its address only if it still owns it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        core::v1::{Pod, Service},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use super::attribute;
use crate::{gap::span::Workload, identity::Directory};

/// What to watch.
#[derive(Clone, Debug, Default)]
pub struct ClusterConfig {
    /// This node (`NODE_NAME` from the downward API).
    pub node_name: Option<String>,
    /// Namespaces whose pods and services to watch; empty: cluster-wide.
    /// Pods on this node are watched in every namespace either way.
    pub namespaces: Vec<String>,
}

/// Whether the API is reachable, for `/readyz` and logs.
#[derive(Default)]
pub struct ApiStatus {
    degraded: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl ApiStatus {
    pub fn degraded(&self) -> Option<String> {
        self.degraded.load(Ordering::Relaxed).then(|| {
            self.last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "kubernetes API unreachable".to_owned())
        })
    }

    fn failed(&self, e: &watcher::Error) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "kubernetes API: attribution degrades to addresses until it returns");
        }
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(format!("kubernetes API: {e}"));
        }
    }

    /// No client could be made (no in-cluster config, no kubeconfig).
    pub fn failed_to_connect(&self, e: &kube::Error) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "no kubernetes client: attribution by address only");
        }
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(format!("kubernetes client: {e}"));
        }
    }

    fn ok(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!("kubernetes API reachable again");
        }
    }
}

struct PodEntry {
    pod: Pod,
    /// The watch stream that reported it (a relist replaces its pods only).
    stream: usize,
}

/// Everything known, and who owns each address.
#[derive(Default)]
pub struct State {
    pods: HashMap<String, PodEntry>,
    /// ReplicaSet (namespace, name) → its Deployment.
    replicasets: HashMap<(String, String), Workload>,
    /// Address → (pod uid, creation time) of its owner.
    owners: HashMap<IpAddr, (String, Option<Time>)>,
    /// Addresses of services, by service uid, with their stream.
    services: HashMap<String, (Vec<IpAddr>, usize)>,
    /// Objects seen since a stream's relist began: what is not seen again
    /// by its end was deleted while the watch was down.
    relisting: HashMap<usize, std::collections::HashSet<String>>,
}

fn uid(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.uid
        .clone()
        .or_else(|| {
            Some(format!(
                "{}/{}",
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default()
            ))
        })
        .unwrap_or_default()
}

/// One change from one of the watchers (`stream` tells which).
pub struct Change {
    pub stream: usize,
    pub what: What,
}

pub enum What {
    Pod(watcher::Event<Pod>),
    Service(watcher::Event<Service>),
    ReplicaSet(watcher::Event<ReplicaSet>),
}

impl State {
    fn workload_of(&self, pod: &Pod) -> Option<Workload> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        attribute::workload(pod, |rs| {
            self.replicasets.get(&(ns.clone(), rs.to_owned())).cloned()
        })
    }

    fn publish_pod(&mut self, key: &str, dir: &Directory) {
        let Some(entry) = self.pods.get(key) else {
            return;
        };
        let pod = &entry.pod;
        let ips = attribute::pod_ips(pod);
        // By UID, host-network pods too (a process's cgroup names them),
        // while they run.
        if attribute::running(pod) {
            dir.set_pod(
                key.to_owned(),
                attribute::pod_identity(pod, self.workload_of(pod)),
            );
        } else {
            dir.remove_pod(key);
        }
        if !attribute::owns_its_ip(pod) {
            // Finished, deleting or host-network: release what it owns.
            for ip in ips {
                if self.owners.get(&ip).is_some_and(|(u, _)| u == key) {
                    self.owners.remove(&ip);
                    dir.remove(&ip);
                }
            }
            return;
        }
        let created = pod.metadata.creation_timestamp.clone();
        let id = attribute::pod_identity(pod, self.workload_of(pod));
        for ip in ips {
            let newer = match self.owners.get(&ip) {
                None => true,
                Some((u, _)) if u == key => true,
                Some((_, t)) => created.as_ref().map(|c| &c.0) >= t.as_ref().map(|t| &t.0),
            };
            if newer {
                self.owners.insert(ip, (key.to_owned(), created.clone()));
                dir.set(ip, id.clone());
            }
        }
    }

    fn remove_pod(&mut self, key: &str, dir: &Directory) {
        let Some(entry) = self.pods.remove(key) else {
            return;
        };
        dir.remove_pod(key);
        for ip in attribute::pod_ips(&entry.pod) {
            if self.owners.get(&ip).is_some_and(|(u, _)| u == key) {
                self.owners.remove(&ip);
                dir.remove(&ip);
                // Another live pod may have the address already.
                let heir = self
                    .pods
                    .iter()
                    .filter(|(_, e)| {
                        attribute::owns_its_ip(&e.pod) && attribute::pod_ips(&e.pod).contains(&ip)
                    })
                    .max_by(|a, b| {
                        let t =
                            |e: &PodEntry| e.pod.metadata.creation_timestamp.clone().map(|t| t.0);
                        t(a.1).cmp(&t(b.1))
                    })
                    .map(|(k, _)| k.clone());
                if let Some(h) = heir {
                    self.publish_pod(&h, dir);
                }
            }
        }
    }

    fn relist_begins(&mut self, stream: usize) {
        self.relisting.insert(stream, Default::default());
    }

    fn relisted(&mut self, stream: usize, key: &str) {
        if let Some(s) = self.relisting.get_mut(&stream) {
            s.insert(key.to_owned());
        }
    }

    /// Ends a relist: what the stream had and did not list again is gone.
    fn relist_done(&mut self, stream: usize, dir: &Directory) {
        let Some(seen) = self.relisting.remove(&stream) else {
            return;
        };
        let stale_pods: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, e)| e.stream == stream && !seen.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale_pods {
            self.remove_pod(&k, dir);
        }
        let stale_services: Vec<String> = self
            .services
            .iter()
            .filter(|(k, (_, s))| *s == stream && !seen.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale_services {
            for ip in self
                .services
                .remove(&k)
                .map(|(ips, _)| ips)
                .unwrap_or_default()
            {
                dir.remove(&ip);
            }
        }
    }

    /// Applies one change to the state and the directory.
    pub fn apply(&mut self, change: Change, dir: &Directory) {
        let stream = change.stream;
        match change.what {
            What::Pod(ev) => match ev {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    let key = uid(&p.metadata);
                    self.relisted(stream, &key);
                    self.pods.insert(key.clone(), PodEntry { pod: p, stream });
                    self.publish_pod(&key, dir);
                }
                watcher::Event::Delete(p) => self.remove_pod(&uid(&p.metadata), dir),
                watcher::Event::Init => self.relist_begins(stream),
                watcher::Event::InitDone => self.relist_done(stream, dir),
            },
            What::Service(ev) => match ev {
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                    let key = uid(&s.metadata);
                    self.relisted(stream, &key);
                    let (ips, id) = attribute::service_identity(&s);
                    for ip in &ips {
                        dir.set(*ip, id.clone());
                    }
                    self.services.insert(key, (ips, stream));
                }
                watcher::Event::Delete(s) => {
                    let ips = self.services.remove(&uid(&s.metadata)).map(|(ips, _)| ips);
                    for ip in ips.unwrap_or_default() {
                        dir.remove(&ip);
                    }
                }
                watcher::Event::Init => self.relist_begins(stream),
                watcher::Event::InitDone => self.relist_done(stream, dir),
            },
            What::ReplicaSet(ev) => {
                let (rs, deleted) = match ev {
                    watcher::Event::Apply(r) | watcher::Event::InitApply(r) => (r, false),
                    watcher::Event::Delete(r) => (r, true),
                    // A stale ReplicaSet only names pods that are gone too.
                    watcher::Event::Init | watcher::Event::InitDone => return,
                };
                let ns = rs.metadata.namespace.clone().unwrap_or_default();
                let name = rs.metadata.name.clone().unwrap_or_default();
                let key = (ns.clone(), name.clone());
                match (deleted, attribute::replicaset_owner(&rs)) {
                    (false, Some(w)) => {
                        self.replicasets.insert(key, w);
                    }
                    _ => {
                        self.replicasets.remove(&key);
                    }
                }
                // Pods of this ReplicaSet may have been named before it was known.
                let owned: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, e)| {
                        e.pod.metadata.namespace.as_deref() == Some(ns.as_str())
                            && e.pod
                                .metadata
                                .owner_references
                                .iter()
                                .flatten()
                                .any(|o| o.name == name)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in owned {
                    self.publish_pod(&k, dir);
                }
            }
        }
    }
}

fn stream<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(watcher::Event<K>) -> What,
) -> BoxStream<'static, Result<What, watcher::Error>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |r| r.map(wrap))
        .boxed()
}

/// The watch streams for a configuration.
pub fn streams(
    client: &Client,
    cfg: &ClusterConfig,
) -> Vec<BoxStream<'static, Result<What, watcher::Error>>> {
    let mut out = Vec::new();
    let any = watcher::Config::default();
    if cfg.namespaces.is_empty() {
        out.push(stream(
            Api::<Pod>::all(client.clone()),
            any.clone(),
            What::Pod,
        ));
        out.push(stream(
            Api::<Service>::all(client.clone()),
            any.clone(),
            What::Service,
        ));
        out.push(stream(
            Api::<ReplicaSet>::all(client.clone()),
            any,
            What::ReplicaSet,
        ));
        return out;
    }
    if let Some(node) = &cfg.node_name {
        let local = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        out.push(stream(Api::<Pod>::all(client.clone()), local, What::Pod));
    }
    for ns in &cfg.namespaces {
        out.push(stream(
            Api::<Pod>::namespaced(client.clone(), ns),
            any.clone(),
            What::Pod,
        ));
        out.push(stream(
            Api::<Service>::namespaced(client.clone(), ns),
            any.clone(),
            What::Service,
        ));
        out.push(stream(
            Api::<ReplicaSet>::namespaced(client.clone(), ns),
            any.clone(),
            What::ReplicaSet,
        ));
    }
    out
}

/// Follows the API until the task is dropped: never gives up (the watchers
/// back off and retry), and marks `status` degraded while it fails.
pub async fn run(client: Client, cfg: ClusterConfig, dir: Arc<Directory>, status: Arc<ApiStatus>) {
    let numbered = streams(&client, &cfg)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.map(move |r| r.map(|what| Change { stream: i, what }))
                .boxed()
        });
    let mut all = futures::stream::select_all(numbered);
    let mut state = State::default();
    while let Some(item) = all.next().await {
        match item {
            Ok(change) => {
                status.ok();
                state.apply(change, &dir);
            }
            Err(e) => status.failed(&e),
        }
    }
}

#[cfg(test)]
mod tests;
