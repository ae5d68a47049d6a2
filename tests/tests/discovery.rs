//! Interface auto-discovery: pod veths that exist at start, that appear
//! later and that go away, found by name pattern and followed over netlink.

use std::time::Duration;

use tracegap_agent::{
    discover::Patterns,
    ebpf::Observer,
    interfaces::{self, Interfaces, Selection},
};
use tracegap_tests::{Node, collect_events, http::HttpServer, privileged};

/// Applies link changes until `done` holds or `timeout` passes.
async fn follow(
    observer: &mut Observer,
    interfaces: &mut Interfaces,
    timeout: Duration,
    done: impl Fn(&Observer) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(observer) {
        match tokio::time::timeout_at(deadline, interfaces.changed()).await {
            Ok(change) => interfaces::apply(observer, change),
            Err(_) => return false,
        }
    }
    true
}

#[tokio::test(flavor = "current_thread")]
async fn pod_veths_are_attached_when_they_appear_and_forgotten_when_they_go() -> anyhow::Result<()>
{
    if !privileged("pod_veths_are_attached_when_they_appear_and_forgotten_when_they_go") {
        return Ok(());
    }
    let mut node = Node::new(&["server"])?;
    let _server = HttpServer::start(node.pod("server"), 8080)?;
    let mut observer = Observer::load()?;
    let patterns = Patterns::new(&[node.veth_pattern()]);
    let mut interfaces =
        Interfaces::start(&mut observer, Selection::Discover(patterns.clone())).await?;
    // Present at start: attached before start() returns.
    let server_if = node.pod("server").host_if.clone();
    assert_eq!(observer.interfaces(), std::slice::from_ref(&server_if));

    // A pod scheduled later: attached as soon as its veth exists.
    node.add_pod("client")?;
    let client_if = node.pod("client").host_if.clone();
    assert!(
        follow(
            &mut observer,
            &mut interfaces,
            Duration::from_secs(5),
            |o| { o.interfaces().contains(&client_if) }
        )
        .await,
        "client veth {client_if} never attached: {:?}",
        observer.interfaces()
    );
    // The bridge and anything else on the host are left alone.
    assert!(!observer.interfaces().contains(&node.bridge));

    // Its first request is seen.
    let mut ring = observer.take_events()?;
    let url = format!("http://{}:8080/first", node.pod("server").ipv4);
    node.pod("client").curl(&url, &[])?;
    let events = collect_events(&mut ring, Duration::from_secs(3), |ev| {
        ev.iter().any(|e| e.payload.starts_with(b"HTTP/1.1 200"))
    });
    assert!(
        events.iter().any(|e| e.payload.starts_with(b"GET /first ")),
        "{events:?}"
    );

    // The pod goes away: its veth is forgotten, the others stay.
    node.remove_pod("client")?;
    assert!(
        follow(
            &mut observer,
            &mut interfaces,
            Duration::from_secs(10),
            |o| { !o.interfaces().contains(&client_if) }
        )
        .await,
        "client veth {client_if} never forgotten"
    );
    assert_eq!(observer.interfaces(), [server_if]);
    observer.detach_all()?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn an_explicit_interface_that_does_not_exist_is_a_clear_error() -> anyhow::Result<()> {
    if !privileged("an_explicit_interface_that_does_not_exist_is_a_clear_error") {
        return Ok(());
    }
    let mut observer = Observer::load()?;
    let err = Interfaces::start(&mut observer, Selection::Explicit(vec!["tgnone0".into()]))
        .await
        .err()
        .expect("attaching to a missing interface fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("tgnone0"), "{msg}");
    assert!(observer.interfaces().is_empty());
    Ok(())
}
