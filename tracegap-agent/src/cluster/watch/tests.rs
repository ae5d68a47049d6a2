//! The watcher against API server responses in the Kubernetes wire format
//! (lists, then watch streams of newline-delimited events with bookmarks,
//! a 410 Gone, and errors), served to the real kube client through
//! tower-test. No kube-apiserver can be installed from the registries this
//! project reaches, so these are recorded-shape responses, not a live API.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};

use super::*;

fn pod(uid: &str, name: &str, ip: &str, created: &str, extra: Value) -> Value {
    let mut p = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid,
            "resourceVersion": "1", "creationTimestamp": created,
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    });
    merge(&mut p, extra);
    p
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn list(kind: &str, rv: &str, items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": kind,
        "metadata": {"resourceVersion": rv}, "items": items,
    }))
    .unwrap_or_default()
}

fn events(evs: Vec<(&str, Value)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, o) in evs {
        out.extend(serde_json::to_vec(&json!({"type": t, "object": o})).unwrap_or_default());
        out.push(b'\n');
    }
    out
}

fn bookmark(kind: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}})
}

type Reply = (StatusCode, Vec<u8>);

/// Serves scripted replies per (path, is-watch), in order; once a script
/// runs out, requests are held open (a quiet watch).
fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    mut script: HashMap<(&'static str, bool), Vec<Reply>>,
    seen: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            if let Ok(mut s) = seen.lock() {
                s.push(uri.clone());
            }
            let path = req.uri().path().to_owned();
            let watch = uri.contains("watch=true");
            let key = script
                .keys()
                .find(|(p, w)| *p == path && *w == watch)
                .copied();
            match key
                .and_then(|k| script.get_mut(&k))
                .filter(|v| !v.is_empty())
            {
                Some(replies) => {
                    let (status, body) = replies.remove(0);
                    let resp = Response::builder()
                        .status(status)
                        .body(Body::from(body))
                        .expect("response");
                    send.send_response(resp);
                }
                None => held.push(send),
            }
        }
    })
}

/// Starts the watcher on a client; returns what it writes.
fn watch(client: Client) -> (Arc<Directory>, Arc<ApiStatus>, tokio::task::JoinHandle<()>) {
    let dir = Arc::new(Directory::default());
    let status = Arc::new(ApiStatus::default());
    let task = tokio::spawn(run(
        client,
        ClusterConfig::default(),
        dir.clone(),
        status.clone(),
    ));
    (dir, status, task)
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

fn change(what: What) -> Change {
    Change { stream: 0, what }
}

fn typed_pod(v: Value) -> Pod {
    serde_json::from_value(v).expect("pod")
}

#[test]
fn a_reused_address_belongs_to_the_newer_live_pod() {
    let mut state = State::default();
    let dir = Directory::default();
    let old = typed_pod(pod(
        "a",
        "old",
        "10.1.0.5",
        "2026-11-24T08:00:00Z",
        json!({}),
    ));
    let new = typed_pod(pod(
        "b",
        "new",
        "10.1.0.5",
        "2026-11-24T09:00:00Z",
        json!({}),
    ));
    state.apply(change(What::Pod(watcher::Event::Apply(new.clone()))), &dir);
    // The old pod's update arriving late does not take the address back...
    state.apply(change(What::Pod(watcher::Event::Apply(old.clone()))), &dir);
    assert_eq!(dir.lookup(ip("10.1.0.5")).pod.as_deref(), Some("new"));
    // ...and its deletion does not remove the new pod's name.
    state.apply(change(What::Pod(watcher::Event::Delete(old))), &dir);
    assert_eq!(dir.lookup(ip("10.1.0.5")).pod.as_deref(), Some("new"));
    // A pod that finished releases its address.
    let mut done = new;
    if let Some(s) = done.status.as_mut() {
        s.phase = Some("Succeeded".into());
    }
    state.apply(change(What::Pod(watcher::Event::Apply(done))), &dir);
    assert_eq!(dir.lookup(ip("10.1.0.5")).pod, None);
}

#[test]
fn a_host_network_pod_is_known_by_its_uid_not_by_the_nodes_address() {
    let mut state = State::default();
    let dir = Directory::default();
    let exporter = typed_pod(pod(
        "h",
        "node-exporter",
        "10.0.0.4",
        "2026-11-24T08:00:00Z",
        json!({"spec": {"hostNetwork": true}}),
    ));
    state.apply(
        change(What::Pod(watcher::Event::Apply(exporter.clone()))),
        &dir,
    );
    assert_eq!(dir.lookup(ip("10.0.0.4")).pod, None, "the node's address");
    let id = dir.pod("h").expect("known by its uid");
    assert_eq!(id.pod.as_deref(), Some("node-exporter"));
    assert!(id.host_network && id.is_pod());
    assert_eq!(id.node.as_deref(), Some("node-1"));
    state.apply(change(What::Pod(watcher::Event::Delete(exporter))), &dir);
    assert!(dir.pod("h").is_none());
    // A pod with its own address is known both ways, until it finishes.
    let mut a = typed_pod(pod("a", "a", "10.1.0.5", "2026-11-24T08:00:00Z", json!({})));
    state.apply(change(What::Pod(watcher::Event::Apply(a.clone()))), &dir);
    assert_eq!(
        dir.pod("a").and_then(|p| p.pod.clone()).as_deref(),
        Some("a")
    );
    if let Some(s) = a.status.as_mut() {
        s.phase = Some("Failed".into());
    }
    state.apply(change(What::Pod(watcher::Event::Apply(a))), &dir);
    assert!(dir.pod("a").is_none());
}

#[test]
fn a_relist_forgets_what_was_deleted_while_the_watch_was_down() {
    let mut state = State::default();
    let dir = Directory::default();
    let a = typed_pod(pod("a", "a", "10.1.0.5", "2026-11-24T08:00:00Z", json!({})));
    let b = typed_pod(pod("b", "b", "10.1.0.6", "2026-11-24T08:00:00Z", json!({})));
    state.apply(change(What::Pod(watcher::Event::Apply(a))), &dir);
    state.apply(change(What::Pod(watcher::Event::Apply(b.clone()))), &dir);
    // Another stream's pod is not touched by this stream's relist.
    let other = typed_pod(pod("o", "o", "10.1.0.7", "2026-11-24T08:00:00Z", json!({})));
    state.apply(
        Change {
            stream: 1,
            what: What::Pod(watcher::Event::Apply(other)),
        },
        &dir,
    );
    for ev in [
        watcher::Event::Init,
        watcher::Event::InitApply(b),
        watcher::Event::InitDone,
    ] {
        state.apply(change(What::Pod(ev)), &dir);
    }
    assert_eq!(
        dir.lookup(ip("10.1.0.5")).pod,
        None,
        "a was deleted meanwhile"
    );
    assert_eq!(dir.lookup(ip("10.1.0.6")).pod.as_deref(), Some("b"));
    assert_eq!(dir.lookup(ip("10.1.0.7")).pod.as_deref(), Some("o"));
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test]
async fn names_follow_pods_owners_services_and_ip_reuse_through_410_gone() {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let rs_owned = json!({"metadata": {
        "labels": {"app.kubernetes.io/name": "checkout"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "checkout-7d9f", "uid": "rs1", "controller": true}]}});
    let a = pod(
        "a",
        "checkout-7d9f-x1",
        "10.1.0.5",
        "2026-11-24T08:00:00Z",
        rs_owned,
    );
    // B reuses A's address; its ADDED comes before A's DELETED.
    let b = pod(
        "b",
        "db-0",
        "10.1.0.5",
        "2026-11-24T09:00:00Z",
        json!({"metadata": {
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
            "name": "db", "uid": "ss1", "controller": true}]}}),
    );
    let c = pod(
        "c",
        "cart-5c2a-zz",
        "10.1.0.7",
        "2026-11-24T09:00:00Z",
        json!({
        "spec": {"containers": [{"name": "app", "image": "x",
            "env": [{"name": "OTEL_SERVICE_NAME", "value": "cart"}]}]}}),
    );
    let host = pod(
        "h",
        "node-exporter-q",
        "192.168.0.10",
        "2026-11-24T09:00:00Z",
        json!({"spec": {"hostNetwork": true}}),
    );
    let nginx = pod(
        "n",
        "nginx-1",
        "10.1.0.9",
        "2026-11-24T09:00:00Z",
        json!({"metadata": {
        "labels": {"app": "nginx"},
        "annotations": {"tracegap.io/instrumented": "false"}}}),
    );
    let gone = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 20 (25)", "reason": "Expired", "code": 410});
    let ok = StatusCode::OK;
    let script = HashMap::from([
        (
            ("/api/v1/pods", false),
            vec![
                (ok, list("PodList", "10", vec![a.clone()])),
                (
                    ok,
                    list(
                        "PodList",
                        "30",
                        vec![b.clone(), c.clone(), host.clone(), nginx.clone()],
                    ),
                ),
            ],
        ),
        (
            ("/api/v1/pods", true),
            vec![
                (
                    ok,
                    events(vec![
                        ("ADDED", c.clone()),
                        ("ADDED", b.clone()),
                        ("DELETED", a.clone()),
                        ("BOOKMARK", bookmark("Pod", "20")),
                    ]),
                ),
                (ok, events(vec![("ERROR", gone)])),
            ],
        ),
        (
            ("/apis/apps/v1/replicasets", false),
            vec![(
                ok,
                list(
                    "ReplicaSetList",
                    "5",
                    vec![json!({
                        "apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "metadata": {"name": "checkout-7d9f", "namespace": "shop", "uid": "rs1",
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                "name": "checkout", "uid": "d1", "controller": true}]},
                    })],
                ),
            )],
        ),
        (
            ("/api/v1/services", false),
            vec![(
                ok,
                list(
                    "ServiceList",
                    "7",
                    vec![
                        json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "payments", "namespace": "shop", "uid": "s1"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}}),
                        json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "headless", "namespace": "shop", "uid": "s2"},
                "spec": {"clusterIP": "None"}}),
                    ],
                ),
            )],
        ),
    ]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = serve(handle, script, seen.clone());
    let (dir, status, task) = watch(client);

    // After the relist: B owns the reused address, named by its StatefulSet.
    eventually("the relist after 410", || {
        seen.lock()
            .map(|s| {
                s.iter()
                    .filter(|u| u.starts_with("/api/v1/pods?") && !u.contains("watch=true"))
                    .count()
                    >= 2
            })
            .unwrap_or(false)
    })
    .await;
    eventually("10.1.0.5 is db-0", || {
        dir.lookup(ip("10.1.0.5")).pod.as_deref() == Some("db-0")
    })
    .await;
    let b_id = dir.lookup(ip("10.1.0.5"));
    assert_eq!(b_id.service, "db");
    assert_eq!(
        b_id.workload
            .as_ref()
            .map(|w| (w.kind.as_str(), w.name.as_str())),
        Some(("StatefulSet", "db"))
    );
    assert_eq!(b_id.pod_uid.as_deref(), Some("b"));
    assert_eq!(b_id.namespace.as_deref(), Some("shop"));
    assert_eq!(b_id.node.as_deref(), Some("node-1"));
    // OTEL_SERVICE_NAME wins, and says the pod is instrumented.
    let c_id = dir.lookup(ip("10.1.0.7"));
    assert_eq!(
        (c_id.service.as_str(), c_id.instrumented),
        ("cart", Some(true))
    );
    // The annotation says nginx is not.
    let n_id = dir.lookup(ip("10.1.0.9"));
    assert_eq!(
        (n_id.service.as_str(), n_id.instrumented),
        ("nginx", Some(false))
    );
    // A ClusterIP resolves to its Service; a host-network pod's address is
    // the node's, not the pod's.
    let s_id = dir.lookup(ip("10.96.0.10"));
    assert!(s_id.is_service);
    assert_eq!(s_id.service, "payments");
    assert_eq!(dir.lookup(ip("192.168.0.10")).pod, None);
    assert!(status.degraded().is_none());
    task.abort();
    server.abort();
}

#[tokio::test]
async fn owners_resolve_when_the_replicaset_arrives_after_the_pod() {
    let mut state = State::default();
    let dir = Directory::default();
    let p: Pod = serde_json::from_value(pod(
        "a",
        "checkout-7d9f-x1",
        "10.1.0.5",
        "2026-11-24T08:00:00Z",
        json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "checkout-7d9f", "uid": "rs1", "controller": true}]}}),
    ))
    .expect("pod");
    state.apply(change(What::Pod(watcher::Event::Apply(p))), &dir);
    // Named after its ReplicaSet until the ReplicaSet is known...
    assert_eq!(dir.lookup(ip("10.1.0.5")).service, "checkout-7d9f");
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "checkout-7d9f", "namespace": "shop", "uid": "rs1",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                "name": "checkout", "uid": "d1", "controller": true}]}}))
    .expect("rs");
    state.apply(change(What::ReplicaSet(watcher::Event::Apply(rs))), &dir);
    // ...then after its Deployment.
    let id = dir.lookup(ip("10.1.0.5"));
    assert_eq!(id.service, "checkout");
    assert_eq!(
        id.workload.as_ref().map(|w| w.kind.clone()),
        Some("Deployment".to_owned())
    );
}

#[tokio::test]
async fn losing_the_api_degrades_and_attribution_recovers_when_it_returns() {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let unavailable = (
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "message": "the server is currently unable to handle the request",
        "reason": "ServiceUnavailable", "code": 503}))
        .unwrap_or_default(),
    );
    let p = pod(
        "a",
        "web-0",
        "10.1.0.8",
        "2026-11-24T08:00:00Z",
        json!({"metadata": {"labels": {"app": "web"}}}),
    );
    let script = HashMap::from([
        (
            ("/api/v1/pods", false),
            vec![
                unavailable.clone(),
                unavailable,
                (StatusCode::OK, list("PodList", "3", vec![p])),
            ],
        ),
        (
            ("/api/v1/services", false),
            vec![(StatusCode::OK, list("ServiceList", "1", vec![]))],
        ),
        (
            ("/apis/apps/v1/replicasets", false),
            vec![(StatusCode::OK, list("ReplicaSetList", "1", vec![]))],
        ),
    ]);
    let server = serve(handle, script, Arc::new(Mutex::new(Vec::new())));
    let (dir, status, task) = watch(client);
    eventually("degraded while the API fails", || {
        status.degraded().is_some()
    })
    .await;
    // Meanwhile the address is one of the unnamed.
    assert_eq!(dir.lookup(ip("10.1.0.8")).service, "unknown");
    eventually("recovered", || dir.lookup(ip("10.1.0.8")).service == "web").await;
    eventually("no longer degraded", || status.degraded().is_none()).await;
    task.abort();
    server.abort();
}
