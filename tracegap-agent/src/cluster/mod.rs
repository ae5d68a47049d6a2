//! Kubernetes: who is behind each address (pods, their workloads and
//! services), kept current by watching the API, and which node reports a
//! hop so each is reported once cluster-wide.

pub mod attribute;
pub mod watch;

pub use watch::{ApiStatus, ClusterConfig};

use crate::gap::span::Identity;

/// Whether this node reports a hop. The rule, so that every hop is
/// reported once in the cluster: **the caller's node** when the caller is a
/// pod; otherwise (node traffic, an address outside the cluster, an unknown
/// one) the callee's node.
///
/// Why the caller's: most gaps are the caller's doing (it dropped the
/// context, started a new trace, flipped the sampling decision, passed the
/// context through without a span) and only its node has seen what the
/// caller was serving at the time; it is also where kube-proxy translated
/// a Service address, so its conntrack knows the backend. The callee's own
/// part, `uninstrumented`, comes from its identity, which every node has.
///
/// In a cluster, "this node" is known by name (`node`), and an identity
/// without a node falls back to whether its address was seen leaving a
/// watched veth (`*_local`). Without a node name there is one agent, and it
/// reports everything it sees.
pub fn reports_here(
    caller: &Identity,
    callee: &Identity,
    caller_local: bool,
    callee_local: bool,
    node: Option<&str>,
) -> bool {
    if is_pod(caller, caller_local) {
        on_this_node(caller, caller_local, node)
    } else {
        on_this_node(callee, callee_local, node)
    }
}

/// Whether `id` is a pod: by its identity, or, unnamed, because its address
/// was seen leaving a watched pod veth (a node's own address never is).
pub fn is_pod(id: &Identity, seen_local: bool) -> bool {
    id.is_pod() || (seen_local && !id.is_node)
}

/// Whether `id` is on this node: by name when both are known, else by
/// whether its address was seen leaving a watched veth. Without a node name
/// (the only agent), everything is.
pub fn on_this_node(id: &Identity, seen_local: bool, node: Option<&str>) -> bool {
    match (node, id.node.as_deref()) {
        (None, _) => true,
        (Some(here), Some(there)) => here == there,
        (Some(_), None) => seen_local,
    }
}

/// Whether `id` is known to be on this node: seen leaving a watched veth,
/// or named on this node. Unlike [`on_this_node`], never true of an
/// address nothing placed here (the only agent, no node name, has seen
/// its own pods send).
pub fn known_here(id: &Identity, seen_local: bool, node: Option<&str>) -> bool {
    seen_local || matches!((node, id.node.as_deref()), (Some(here), Some(there)) if here == there)
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
            (pod("a"), pod("b"), "a"),
            (pod("a"), pod("a"), "a"),
            (pod("a"), service.clone(), "a"),
            (pod("a"), outside.clone(), "a"),
            (outside.clone(), pod("b"), "b"),
            // A host-network client on node c (its address is c's).
            (Identity::node("c"), pod("b"), "b"),
            (pod("b"), Identity::node("c"), "b"),
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

    #[test]
    fn a_pod_is_known_here_when_named_here_or_seen_sending_here() {
        // Named on this node though never seen sending (its connections
        // all read on a local caller's veth).
        assert!(known_here(&pod("a"), false, Some("a")));
        assert!(!known_here(&pod("b"), false, Some("a")));
        assert!(known_here(&pod("b"), true, Some("a")));
        // No names: only what was seen. The only agent does not place
        // every address on its node.
        let anon = Identity::default();
        assert!(!known_here(&anon, false, None));
        assert!(known_here(&anon, true, None));
        assert!(!known_here(&pod("a"), false, None));
    }
}
