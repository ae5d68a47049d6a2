//! Kubernetes: who is behind each address (pods, their workloads and
//! services), kept current by watching the API, and which node reports a
//! hop so each is reported once cluster-wide.

pub mod attribute;
pub mod watch;

pub use watch::{ApiStatus, ClusterConfig};

use crate::gap::span::Identity;

/// Whether this node reports a hop. The rule, so that every hop is
/// reported once in the cluster: the node of the server pod when the
/// server is a pod; otherwise (a Service address seen before NAT, an
/// outside address, an unknown one) the client's node.
///
/// In a cluster, "this node" is known by name (`node`), and an identity
/// without a node falls back to whether its address was seen leaving a
/// watched veth (`*_local`). Standalone (no node name) there is one agent,
/// and it reports everything it sees.
pub fn reports_here(
    caller: &Identity,
    callee: &Identity,
    caller_local: bool,
    callee_local: bool,
    node: Option<&str>,
) -> bool {
    if node.is_none() {
        return true;
    }
    let on_this_node = |id: &Identity, seen_local: bool| match (node, id.node.as_deref()) {
        (Some(here), Some(there)) => here == there,
        _ => seen_local,
    };
    let callee_is_pod = callee.pod.is_some() && !callee.is_service;
    if callee_is_pod || callee_local {
        on_this_node(callee, callee_local)
    } else {
        on_this_node(caller, caller_local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str) -> Identity {
        Identity {
            service: "svc".into(),
            pod: Some("p".into()),
            node: Some(node.into()),
            ..Identity::default()
        }
    }

    #[test]
    fn each_hop_is_reported_by_exactly_one_node() {
        let service = Identity {
            service: "payments".into(),
            is_service: true,
            ..Identity::default()
        };
        let outside = Identity::unknown("203.0.113.9".parse().unwrap());
        // (caller, callee) → the node that must report.
        let cases = [
            (pod("a"), pod("b"), "b"),
            (pod("a"), pod("a"), "a"),
            (pod("a"), service.clone(), "a"),
            (pod("a"), outside.clone(), "a"),
            (outside.clone(), pod("b"), "b"),
        ];
        for (caller, callee, want) in cases {
            let reporters: Vec<&str> = ["a", "b", "c"]
                .into_iter()
                .filter(|n| {
                    let local = |id: &Identity| id.node.as_deref() == Some(*n);
                    reports_here(&caller, &callee, local(&caller), local(&callee), Some(n))
                })
                .collect();
            assert_eq!(reporters, [want], "{caller:?} -> {callee:?}");
        }
        // Standalone: one agent, it reports everything.
        let (a, b) = (pod("x"), Identity::default());
        assert!(reports_here(&a, &b, false, false, None));
        // In a cluster, identities without a node fall back to sightings.
        let anon = Identity::default();
        assert!(reports_here(&anon, &anon, true, false, Some("a")));
        assert!(!reports_here(&anon, &anon, false, false, Some("a")));
    }
}
