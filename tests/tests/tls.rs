//! TLS between pods: what tracegap cannot read, it says, per edge, with the
//! server name the client asked for (real openssl server, real curl and
//! Python clients, in network namespaces).

use std::time::Duration;

use tracegap_agent::report::Report;
use tracegap_tests::{
    Child, Node, TempDir, agent::Agent, agent_config, otlp::Receiver, privileged,
};

const PORT: u16 = 8443;
const NAME: &str = "inventory.test";

#[test]
fn an_encrypted_edge_is_counted_with_its_server_name_and_never_read_as_a_hop() -> anyhow::Result<()>
{
    if !privileged("an_encrypted_edge_is_counted_with_its_server_name_and_never_read_as_a_hop") {
        return Ok(());
    }
    let node = Node::new(&["client", "server"])?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let agent = Agent::start(agent_config(&node, &receiver))?;
    let dir = TempDir::new("tls-edge")?;
    let (key, cert) = tracegap_tests::self_signed(dir.path(), NAME)?;
    // s_server -www answers each GET with a page over HTTP/1.0, inside TLS.
    let _server = Child::spawn(
        node.pod("server")
            .command("openssl")
            .args(["s_server", "-www", "-quiet", "-accept", &PORT.to_string()])
            .arg("-key")
            .arg(&key)
            .arg("-cert")
            .arg(&cert),
    )?;
    let ip = node.pod("server").ipv4;
    let tp = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let by_name = format!("https://{NAME}:{PORT}/orders?token=secret");
    let resolve = format!("{NAME}:{PORT}:{ip}");
    // The server may take a moment to listen: the first call is retried.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while node
        .pod("client")
        .curl(&by_name, &["-k", "--resolve", &resolve, "-H", tp])
        .is_err()
    {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no TLS server");
        std::thread::sleep(Duration::from_millis(100));
    }
    node.pod("client")
        .curl(&by_name, &["-k", "--resolve", &resolve, "-H", tp])?;
    // Python's ssl (OpenSSL too), with a server name and ALPN of its own.
    tracegap_tests::run(node.pod("client").command("python3").args([
        "-c",
        &format!(
            "import socket, ssl\n\
             c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE\n\
             c.set_alpn_protocols(['http/1.1'])\n\
             s = c.wrap_socket(socket.create_connection(('{ip}', {PORT})), server_hostname='{NAME}')\n\
             s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); s.recv(100); s.close()"
        ),
    ]))?;
    // By address: no server name sent.
    node.pod("client")
        .curl(&format!("https://{ip}:{PORT}/"), &["-k", "-H", tp])?;

    let edge = "tracegap_tls_unread_connections_total{source_service=\"client\",destination_service=\"server\"";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.metric(edge)? < 4.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let named = agent.metric(&format!("{edge},server_name=\"{NAME}\"}}"))?;
    let unnamed = agent.metric(&format!("{edge},server_name=\"\"}}"))?;
    let body = agent.get("/metrics")?.1;
    assert_eq!((named, unnamed), (3.0, 1.0), "{body}");
    // Nothing read from inside: no hop, no span, no query string.
    assert_eq!(agent.metric("tracegap_http_requests_total")?, 0.0, "{body}");
    assert!(!body.contains("token"), "{body}");
    let report: Report = serde_json::from_str(&agent.get_report()?.1)?;
    assert!(report.edges.is_empty(), "{:?}", report.edges);
    let [e] = report.encrypted.as_slice() else {
        panic!("one encrypted edge: {:?}", report.encrypted)
    };
    assert_eq!(
        (e.source.as_str(), e.destination.as_str()),
        ("client", "server")
    );
    assert_eq!(e.connections, 4);
    assert_eq!(e.server_names.get(NAME), Some(&3));
    assert_eq!(e.server_names.get(""), Some(&1));
    // curl offers h2 and http/1.1, Python http/1.1 alone.
    assert_eq!(e.alpn.get("http/1.1"), Some(&1), "{:?}", e.alpn);
    assert_eq!(e.alpn.values().sum::<u64>(), 4);
    let table = tracegap_agent::report::table(&report);
    assert!(table.contains("ENCRYPTED (TLS)"), "{table}");
    assert!(table.contains(&format!("{NAME}=3")), "{table}");
    assert!(receiver.spans().is_empty());
    agent.stop()?;
    Ok(())
}
