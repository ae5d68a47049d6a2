//! From Kubernetes objects to identities: the rules, as pure functions.
//!
//! Service name, in order: `OTEL_SERVICE_NAME` in the pod spec's
//! environment (what the pod's own spans say), the label
//! `app.kubernetes.io/name`, the label `app`, the owning workload's name,
//! the pod's name.
//!
//! Instrumented, in order: the annotation `tracegap.io/instrumented`
//! ("true"/"false") overrides; an OpenTelemetry Operator injection
//! annotation (`instrumentation.opentelemetry.io/inject-*`, not "false")
//! or any `OTEL_*` variable in a container's environment means yes;
//! otherwise unknown (code can configure an SDK without either).

use std::net::IpAddr;

use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Pod, Service},
};

use crate::gap::span::{Identity, Workload};

/// The annotation with which an operator says whether a pod makes spans.
pub const INSTRUMENTED_ANNOTATION: &str = "tracegap.io/instrumented";
const OPERATOR_INJECT_PREFIX: &str = "instrumentation.opentelemetry.io/inject-";

/// The controller among a set of owner references, as (kind, name).
fn controller(
    owners: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
) -> Option<(String, String)> {
    owners?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.clone(), o.name.clone()))
}

/// The workload a ReplicaSet belongs to (its Deployment), if any.
pub fn replicaset_owner(rs: &ReplicaSet) -> Option<Workload> {
    controller(rs.metadata.owner_references.as_ref()).map(|(kind, name)| Workload { kind, name })
}

/// The workload that owns a pod. `replicaset` answers for a ReplicaSet name
/// in the pod's namespace: its Deployment when known.
pub fn workload(pod: &Pod, replicaset: impl Fn(&str) -> Option<Workload>) -> Option<Workload> {
    let (kind, name) = controller(pod.metadata.owner_references.as_ref())?;
    if kind == "ReplicaSet" {
        return Some(replicaset(&name).unwrap_or(Workload { kind, name }));
    }
    Some(Workload { kind, name })
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The service name of a pod, by the rule in the module documentation.
pub fn service_name(pod: &Pod, workload: Option<&Workload>) -> String {
    let from_env = pod.spec.as_ref().and_then(|s| {
        s.containers.iter().find_map(|c| {
            c.env.as_ref()?.iter().find_map(|e| {
                (e.name == "OTEL_SERVICE_NAME")
                    .then(|| e.value.clone())
                    .flatten()
                    .filter(|v| !v.is_empty())
            })
        })
    });
    from_env
        .or_else(|| label(pod, "app.kubernetes.io/name").map(str::to_owned))
        .or_else(|| label(pod, "app").map(str::to_owned))
        .or_else(|| workload.map(|w| w.name.clone()))
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default()
}

/// Whether a pod makes its own spans, by the rule in the module documentation.
pub fn instrumented(pod: &Pod) -> Option<bool> {
    let annotations = pod.metadata.annotations.as_ref();
    if let Some(v) = annotations.and_then(|a| a.get(INSTRUMENTED_ANNOTATION)) {
        return v.parse().ok();
    }
    let injected = annotations.is_some_and(|a| {
        a.iter()
            .any(|(k, v)| k.starts_with(OPERATOR_INJECT_PREFIX) && v != "false")
    });
    let otel_env = pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| {
            c.env
                .as_ref()
                .is_some_and(|env| env.iter().any(|e| e.name.starts_with("OTEL_")))
        })
    });
    (injected || otel_env).then_some(true)
}

/// Whether a pod's IP stands for the pod: not host-network (its IP is the
/// node's, shared by every host-network pod), and [`running`].
pub fn owns_its_ip(pod: &Pod) -> bool {
    !host_network(pod) && running(pod)
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// Not finished (a finished pod's IP is free for the next pod) nor being
/// deleted.
pub fn running(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    !finished && pod.metadata.deletion_timestamp.is_none()
}

/// The pod's IPs (IPv4 and IPv6 on dual-stack clusters).
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(st) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = st
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = st.pod_ip.as_ref().and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

/// A pod's identity.
pub fn pod_identity(pod: &Pod, workload: Option<Workload>) -> Identity {
    Identity {
        service: service_name(pod, workload.as_ref()),
        namespace: pod.metadata.namespace.clone(),
        pod: pod.metadata.name.clone(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        pod_uid: pod.metadata.uid.clone(),
        workload,
        instrumented: instrumented(pod),
        is_service: false,
        is_node: false,
        host_network: host_network(pod),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ports: pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect(),
    }
}

/// A ClusterIP Service's addresses and identity (headless ones have none).
pub fn service_identity(svc: &Service) -> (Vec<IpAddr>, Identity) {
    let ips = svc
        .spec
        .as_ref()
        .map(|s| {
            s.cluster_ips
                .iter()
                .flatten()
                .chain(s.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect::<std::collections::BTreeSet<IpAddr>>()
                .into_iter()
                .collect()
        })
        .unwrap_or_default();
    let id = Identity {
        service: svc.metadata.name.clone().unwrap_or_default(),
        namespace: svc.metadata.namespace.clone(),
        is_service: true,
        ..Identity::default()
    };
    (ips, id)
}
