//! TLS between pods: HTTPS through OpenSSL is read in the clear (uprobes
//! on libssl, tied to the connection by the thread programs) and makes
//! hops like cleartext; what no probe reads (GnuTLS at both ends here) is
//! counted per edge with the server name the client asked for. Real
//! servers and clients in network namespaces: Python's `http.server`
//! (OpenSSL), `gnutls-serv`, `curl` (OpenSSL), Python `requests`
//! (OpenSSL), `gnutls-cli`.

use std::time::{Duration, Instant};

use tracegap_agent::report::Report;
use tracegap_tests::{
    Child, Node, TempDir, agent::Agent, agent_config, otlp::Receiver, privileged,
};

/// Python's HTTPS server (OpenSSL underneath): HTTP/1.1, keep-alive.
const OPENSSL_PORT: u16 = 8443;
/// GnuTLS's: no probe reads it.
const GNUTLS_PORT: u16 = 9443;
const NAME: &str = "inventory.test";
const TP: &str = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Python's HTTPS server: OpenSSL underneath, through its `ssl` module.
fn server() -> String {
    tracegap_tests::python_server(
        ", ssl",
        "pass",
        "s = http.server.ThreadingHTTPServer((\"0.0.0.0\", int(sys.argv[1])), H)\n\
         c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         c.load_cert_chain(sys.argv[2], sys.argv[3])\n\
         s.socket = c.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()",
    )
}

/// Python's HTTPS server in the node's `server` pod on [`OPENSSL_PORT`],
/// with a certificate for [`NAME`] made in `dir`: the server, and the key
/// and certificate files.
fn python_https(
    node: &Node,
    dir: &std::path::Path,
) -> anyhow::Result<(Child, (std::path::PathBuf, std::path::PathBuf))> {
    let (key, cert) = tracegap_tests::self_signed(dir, NAME)?;
    let child = Child::spawn(
        node.pod("server")
            .command("python3")
            .args(["-c", &server(), &OPENSSL_PORT.to_string()])
            .arg(&cert)
            .arg(&key),
    )?;
    Ok((child, (key, cert)))
}

/// Waits until `ok` or 15 s.
fn until(mut ok: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn https_through_openssl_is_read_as_hops_and_what_no_probe_reads_is_counted_with_its_server_name()
-> anyhow::Result<()> {
    let test = "https_through_openssl_is_read_as_hops_and_what_no_probe_reads_is_counted_with_its_server_name";
    if !privileged(test) {
        return Ok(());
    }
    let node = Node::new(&["client", "server"])?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let agent = Agent::start(tracegap_agent::agent::AgentConfig {
        tls_plaintext: true,
        ..agent_config(&node, &receiver)
    })?;
    let libraries = agent.metric("tracegap_openssl_libraries_probed")?;
    anyhow::ensure!(
        libraries >= 1.0,
        "no libssl probed on this machine: {}",
        agent.get("/metrics")?.1
    );
    let dir = TempDir::new("tls-edge")?;
    let (_openssl, (key, cert)) = python_https(&node, dir.path())?;
    let _gnutls = Child::spawn(
        node.pod("server")
            .command("gnutls-serv")
            .args(["--http", "--quiet", "--port", &GNUTLS_PORT.to_string()])
            .arg("--x509keyfile")
            .arg(&key)
            .arg("--x509certfile")
            .arg(&cert),
    )?;
    let ip = node.pod("server").ipv4;
    let url = |port: u16, path: &str| format!("https://{NAME}:{port}{path}");
    let resolve = |port: u16| format!("{NAME}:{port}:{ip}");
    let curl = |port: u16, path: &str| {
        node.pod("client").curl(
            &url(port, path),
            &["-k", "--http1.1", "--resolve", &resolve(port), "-H", TP],
        )
    };
    // Both servers may take a moment to listen. Each probe is a TLS
    // connection of its own, read or counted like the rest: counted here.
    let mut tries = [0u32; 2];
    for (i, port) in [OPENSSL_PORT, GNUTLS_PORT].into_iter().enumerate() {
        until(|| {
            tries[i] += 1;
            Ok(curl(port, "/ready").is_ok())
        })?;
    }
    // Read at both ends (curl's and the server's OpenSSL): each request
    // once. Two on one keep-alive connection.
    node.pod("client").curl(
        &url(OPENSSL_PORT, "/orders?token=secret"),
        &[
            "-k",
            "--http1.1",
            "--resolve",
            &resolve(OPENSSL_PORT),
            "-H",
            TP,
            "--next",
            "-k",
            "--http1.1",
            "--resolve",
            &resolve(OPENSSL_PORT),
            "-H",
            TP,
            &url(OPENSSL_PORT, "/orders/2"),
        ],
    )?;
    // Python requests (OpenSSL through its ssl module), without a context.
    tracegap_tests::run(node.pod("client").command("python3").args([
        "-c",
        &format!(
            "import requests, urllib3\n\
             urllib3.disable_warnings()\n\
             r = requests.get('https://{ip}:{OPENSSL_PORT}/cart', verify=False)\n\
             assert r.status_code == 200, r.status_code"
        ),
    ]))?;
    // Read at curl's end alone: the server is GnuTLS.
    curl(GNUTLS_PORT, "/status")?;
    // Neither end is OpenSSL: counted as unread, with its server name.
    tracegap_tests::run(node.pod("client").command("sh").arg("-c").arg(format!(
        "printf 'GET /blind HTTP/1.1\\r\\nHost: {NAME}\\r\\n\\r\\n' | \
                 timeout 5 gnutls-cli --insecure --sni-hostname {NAME} --port {GNUTLS_PORT} {ip}"
    )))?;

    let hops = "tracegap_http_requests_total";
    let probes = f64::from(tries[0] + tries[1]);
    // Curl's probes that failed (a server not listening yet) made no TLS
    // connection; the ones that got through did, one each.
    let read_wanted = 2.0 + 1.0 + 1.0 + 2.0;
    until(|| Ok(agent.metric(hops)? >= read_wanted))?;
    let edge = "{source_service=\"client\",destination_service=\"server\"";
    until(|| Ok(agent.metric(&format!("tracegap_tls_unread_connections_total{edge}"))? >= 1.0))?;
    // Read connections: the three keep-alive ones, the GnuTLS status call
    // and the two successful probes.
    let read = agent.metric(&format!("tracegap_tls_read_connections_total{edge}"))?;
    let body = agent.get("/metrics")?.1;
    assert_eq!(read, 5.0, "{body}");
    // Exactly the requests made, though most were read at both ends.
    assert_eq!(agent.metric(hops)?, read_wanted, "{body} ({probes} probes)");
    let unread = agent.metric(&format!(
        "tracegap_tls_unread_connections_total{edge},server_name=\"{NAME}\"}}"
    ))?;
    assert_eq!(unread, 1.0, "{body}");
    let chunks = agent.metric("tracegap_kernel_events_total{counter=\"tls_plaintext_chunks\"}")?;
    assert!(chunks >= read_wanted, "{body}");
    assert!(!body.contains("token"), "{body}");

    let report: Report = serde_json::from_str(&agent.get_report()?.1)?;
    let [e] = report.edges.as_slice() else {
        panic!("one edge: {:?}", report.edges)
    };
    assert_eq!(
        (e.source.as_str(), e.destination.as_str()),
        ("client", "server")
    );
    assert_eq!(e.requests, 6, "{e:?}");
    // Curl sent the context on its five calls; requests sent none.
    assert_eq!(e.kinds.get("missing_context"), Some(&1), "{:?}", e.kinds);
    assert_eq!(e.unanswered, 0, "{e:?}");
    let [enc] = report.encrypted.as_slice() else {
        panic!("one encrypted edge: {:?}", report.encrypted)
    };
    assert_eq!(enc.connections, 1, "{enc:?}");
    assert_eq!(enc.server_names.get(NAME), Some(&1), "{enc:?}");
    let raw = agent.get_report()?.1;
    assert!(!raw.contains("token"), "{raw}");
    agent.stop()?;
    Ok(())
}

/// HTTP/2 over TLS (ALPN `h2`): `nghttpd` (OpenSSL) serving, `curl` and
/// `h2load` (OpenSSL both) calling. Each stream is one hop, read at both
/// ends and counted once; the context `curl` sent is read from HPACK.
#[test]
fn http2_over_tls_through_openssl_is_read_stream_by_stream() -> anyhow::Result<()> {
    if !privileged("http2_over_tls_through_openssl_is_read_stream_by_stream") {
        return Ok(());
    }
    let node = Node::new(&["client", "server"])?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let agent = Agent::start(tracegap_agent::agent::AgentConfig {
        tls_plaintext: true,
        ..agent_config(&node, &receiver)
    })?;
    let dir = TempDir::new("tls-h2")?;
    let (key, cert) = tracegap_tests::self_signed(dir.path(), NAME)?;
    let htdocs = dir.path().join("htdocs");
    std::fs::create_dir_all(&htdocs)?;
    // A body larger than a frame: DATA the walk passes over.
    std::fs::write(htdocs.join("stock"), "7\n".repeat(40_000))?;
    let _server = Child::spawn(
        node.pod("server")
            .command("nghttpd")
            .arg("-d")
            .arg(&htdocs)
            .arg(OPENSSL_PORT.to_string())
            .arg(&key)
            .arg(&cert),
    )?;
    let ip = node.pod("server").ipv4;
    let url = format!("https://{NAME}:{OPENSSL_PORT}/stock?token=secret");
    let resolve = format!("{NAME}:{OPENSSL_PORT}:{ip}");
    let args = ["-k", "--http2", "--resolve", &resolve, "-H", TP];
    until(|| Ok(node.pod("client").curl(&url, &args).is_ok()))?;
    // Two streams on one connection.
    let mut both = args.to_vec();
    both.extend(["--next", "-k", "--http2", "--resolve", &resolve, "-H", TP]);
    both.push(&url);
    node.pod("client").curl(&url, &both)?;
    // h2load: five streams, no context.
    tracegap_tests::run(node.pod("client").command("h2load").args([
        "-n",
        "5",
        "-c",
        "1",
        &format!("https://{ip}:{OPENSSL_PORT}/stock"),
    ]))?;

    let hops = "tracegap_http_requests_total";
    // The readiness probe's successful call, two, five.
    let wanted = 1.0 + 2.0 + 5.0;
    until(|| Ok(agent.metric(hops)? >= wanted)).map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}",
            agent.get("/metrics").map(|b| b.1).unwrap_or_default()
        )
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let body = agent.get("/metrics")?.1;
    assert_eq!(agent.metric(hops)?, wanted, "{body}");
    // The probe's, curl's and h2load's connections, each followed once
    // though read at both ends.
    assert_eq!(agent.metric("tracegap_h2_connections")?, 3.0, "{body}");
    let report: Report = serde_json::from_str(&agent.get_report()?.1)?;
    let [e] = report.edges.as_slice() else {
        panic!("one edge: {:?}", report.edges)
    };
    assert_eq!(e.requests, 8, "{e:?}");
    assert_eq!(e.unanswered, 0, "{e:?}");
    assert_eq!(e.kinds.get("missing_context"), Some(&5), "{:?}", e.kinds);
    assert_eq!(e.formats.get("w3c"), Some(&3), "{:?}", e.formats);
    assert!(!body.contains("token"), "{body}");
    agent.stop()?;
    Ok(())
}

/// Debian's nginx terminating TLS, HTTP/1.1 and HTTP/2 (ALPN `h2`) on one
/// port, as a cluster's ingress or a service's sidecar would: curl over
/// both, Python `requests` over HTTP/1.1. nginx (`TRACEGAP_NGINX`, which
/// `cargo xtask test` unpacks from Debian's package) links OpenSSL: every
/// request is read at both ends and counted once.
#[test]
fn nginx_terminating_tls_is_read_over_http1_and_http2() -> anyhow::Result<()> {
    if !privileged("nginx_terminating_tls_is_read_over_http1_and_http2") {
        return Ok(());
    }
    let Some(nginx) = std::env::var_os("TRACEGAP_NGINX") else {
        eprintln!(
            "SKIPPED nginx_terminating_tls_is_read_over_http1_and_http2: TRACEGAP_NGINX unset (cargo xtask test sets it)"
        );
        return Ok(());
    };
    let node = Node::new(&["client", "server"])?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let agent = Agent::start(tracegap_agent::agent::AgentConfig {
        tls_plaintext: true,
        ..agent_config(&node, &receiver)
    })?;
    let dir = TempDir::new("tls-nginx")?;
    let (key, cert) = tracegap_tests::self_signed(dir.path(), NAME)?;
    let d = dir.path().display();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1;\n\
             pid {d}/nginx.pid; error_log stderr warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 listen {OPENSSL_PORT} ssl http2;\n\
                 ssl_certificate {}; ssl_certificate_key {};\n\
                 location / {{ return 200 \"stock: 7\\n\"; }}\n\
               }}\n\
             }}\n",
            cert.display(),
            key.display()
        ),
    )?;
    let _nginx = Child::spawn(
        node.pod("server")
            .command(&nginx.to_string_lossy())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-e", "stderr"]),
    )?;
    let ip = node.pod("server").ipv4;
    let url = format!("https://{NAME}:{OPENSSL_PORT}/orders?token=secret");
    let resolve = format!("{NAME}:{OPENSSL_PORT}:{ip}");
    let curl = |version: &'static str, twice: bool| {
        let mut a = vec!["-k", version, "--resolve", &resolve, "-H", TP];
        if twice {
            // A second request on the same connection.
            a.extend(["--next", "-k", version, "--resolve", &resolve, "-H", TP]);
            a.push(&url);
        }
        node.pod("client").curl(&url, &a).map(|_| ())
    };
    // nginx may take a moment to listen. One request per probe: of two,
    // the first refused and the second served, curl says success (its
    // last transfer's) for one hop.
    until(|| Ok(curl("--http1.1", false).is_ok()))?;
    curl("--http1.1", true)?;
    curl("--http2", true)?;
    tracegap_tests::run(node.pod("client").command("python3").args([
        "-c",
        &format!(
            "import requests, urllib3\n\
             urllib3.disable_warnings()\n\
             r = requests.get('https://{ip}:{OPENSSL_PORT}/cart', verify=False)\n\
             assert r.status_code == 200, r.status_code"
        ),
    ]))?;

    let hops = "tracegap_http_requests_total";
    // The probe that got through and two over HTTP/1.1, two over HTTP/2,
    // one from requests.
    let wanted = 6.0;
    until(|| Ok(agent.metric(hops)? >= wanted)).map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}",
            agent.get("/metrics").map(|b| b.1).unwrap_or_default()
        )
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let body = agent.get("/metrics")?.1;
    assert_eq!(agent.metric(hops)?, wanted, "{body}");
    assert_eq!(agent.metric("tracegap_h2_connections")?, 1.0, "{body}");
    let report: Report = serde_json::from_str(&agent.get_report()?.1)?;
    let [e] = report.edges.as_slice() else {
        panic!("one edge: {:?}", report.edges)
    };
    assert_eq!(e.requests, 6, "{e:?}");
    assert_eq!(e.unanswered, 0, "{e:?}");
    assert_eq!(e.formats.get("w3c"), Some(&5), "{:?}", e.formats);
    assert_eq!(e.kinds.get("missing_context"), Some(&1), "{:?}", e.kinds);
    assert!(report.encrypted.is_empty(), "{:?}", report.encrypted);
    assert!(!body.contains("token"), "{body}");
    agent.stop()?;
    Ok(())
}

/// A cgroup tree the test made, removed (deepest first) when dropped; its
/// processes have ended by then.
struct Cgroups(Vec<std::path::PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A host-network pod (a node agent, an ingress controller) has the
/// node's address: by its address, what it calls is the node's doing. Its
/// process's cgroup names it: the kubelet's systemd layout, made here on
/// the machine's cgroup v2 mount, and curl run from the node's network
/// once inside that pod's cgroup and once outside any, to a pod's HTTPS
/// server.
#[test]
fn a_host_network_pods_https_calls_are_named_by_its_processs_cgroup() -> anyhow::Result<()> {
    let test = "a_host_network_pods_https_calls_are_named_by_its_processs_cgroup";
    if !privileged(test) {
        return Ok(());
    }
    let Some(v2) = tracegap_tests::cgroup2_mount() else {
        eprintln!("SKIPPED {test}: no cgroup v2 mount");
        return Ok(());
    };
    const UID: &str = "5b0c7e1a-2f3d-4c5e-8a9b-0c1d2e3f4a5b";
    let node = Node::new(&["server"])?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let mut config = tracegap_agent::agent::AgentConfig {
        tls_plaintext: true,
        ..agent_config(&node, &receiver)
    };
    let gateway = std::net::IpAddr::from(node.gateway());
    config
        .services
        .push((gateway, tracegap_agent::gap::span::Identity::node("node-1")));
    config.services.push((
        gateway,
        tracegap_agent::gap::span::Identity {
            service: "node-exporter".into(),
            namespace: Some("monitoring".into()),
            pod: Some("node-exporter-7x2kq".into()),
            pod_uid: Some(UID.into()),
            host_network: true,
            ..Default::default()
        },
    ));
    let agent = Agent::start(config)?;
    let dir = TempDir::new("tls-hostnet")?;
    let (_server, _) = python_https(&node, dir.path())?;
    // The kubelet's layout under the systemd driver, below a root of the
    // test's own.
    let mut made = Cgroups(Vec::new());
    let mut at = v2.join(format!("tracegap-test-{}", std::process::id()));
    for part in [
        String::new(),
        "kubepods.slice".into(),
        "kubepods-besteffort.slice".into(),
        format!("kubepods-besteffort-pod{}.slice", UID.replace('-', "_")),
        format!("cri-containerd-{}.scope", "c0ffee".repeat(10) + "c0ff"),
    ] {
        if !part.is_empty() {
            at = at.join(part);
        }
        std::fs::create_dir(&at)?;
        made.0.push(at.clone());
    }
    let ip = node.pod("server").ipv4;
    let url = format!("https://{NAME}:{OPENSSL_PORT}/metrics?token=secret");
    let curl = format!(
        "curl -sS -k --max-time 10 --resolve {NAME}:{OPENSSL_PORT}:{ip} '{url}' -o /dev/null"
    );
    // From the node's network (this namespace), without a context: a
    // gap, whose span names its caller.
    until(|| {
        Ok(std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{curl} -H 'X-Probe: 1'"))
            .status()?
            .success())
    })?;
    tracegap_tests::run(std::process::Command::new("sh").arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && exec {curl}",
        at.display()
    )))?;

    let hops = "tracegap_http_requests_total";
    let by = |source: &str| {
        format!("{hops}{{source_service=\"{source}\",destination_service=\"server\"")
    };
    until(|| Ok(agent.metric(&by("node-exporter"))? >= 1.0)).map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}",
            agent.get("/metrics").map(|b| b.1).unwrap_or_default()
        )
    })?;
    until(|| Ok(agent.metric(&by("node:node-1"))? >= 1.0))?;
    std::thread::sleep(Duration::from_millis(500));
    let body = agent.get("/metrics")?.1;
    // The probe that got through, by address; the pod's call, by process.
    assert_eq!(agent.metric(&by("node:node-1"))?, 1.0, "{body}");
    assert_eq!(agent.metric(&by("node-exporter"))?, 1.0, "{body}");
    assert_eq!(agent.metric(hops)?, 2.0, "{body}");
    assert!(
        agent.metric("tracegap_tls_process_ends_total{identity=\"pod\"}")? >= 1.0,
        "{body}"
    );
    // The gap's span: the host-network pod as its caller.
    let spans = receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter()
            .any(|s| s.attr("tracegap.caller.service").as_deref() == Some("node-exporter"))
    });
    let span = spans
        .iter()
        .find(|s| s.attr("tracegap.caller.service").as_deref() == Some("node-exporter"))
        .ok_or_else(|| anyhow::anyhow!("no span from node-exporter's call"))?;
    assert_eq!(
        span.resource_attr("service.name").as_deref(),
        Some("server")
    );
    assert!(!body.contains("token"), "{body}");
    agent.stop()?;
    Ok(())
}
