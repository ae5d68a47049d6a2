//! Export to a collector that requires TLS, as production ones do: a CA
//! made by the test (`tracegap_lab::pki`), the lab's OTLP receiver serving
//! gRPC and HTTP/protobuf over TLS, and over mutual TLS; the agent trusting
//! that CA through the files the OpenTelemetry variables name
//! (`OTEL_EXPORTER_OTLP_CERTIFICATE`, `..._CLIENT_CERTIFICATE`,
//! `..._CLIENT_KEY`). Spans arrive; a collector the agent cannot trust, or
//! one that wants a client certificate the agent lacks, gets nothing and
//! the failures are counted while the agent runs on; a file that is not
//! there stops the agent at start with the setting and the path named.
//! And the trace store read back over TLS with a bearer token and a
//! tenant, as behind an authenticating proxy or Tempo's gateway.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use tracegap_agent::{
    agent::AgentConfig,
    export::{ExportConfig, OtlpProtocol},
    reconcile::ReconcileConfig,
    remote::{Access, TlsFiles},
    tracestore::StoreKind,
};
use tracegap_lab::{
    pki::Pki,
    query::{QueryServer, Required},
};
use tracegap_tests::{
    Node,
    agent::Agent,
    agent_config,
    demo::{Behaviour, ServiceSpec},
    otlp::{Receiver, ServerTls},
    privileged,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn files(ca: Option<&PathBuf>, client: Option<(&PathBuf, &PathBuf)>) -> TlsFiles {
    let named = |var: &str, p: &PathBuf| Some((var.to_owned(), p.clone()));
    TlsFiles {
        ca: ca.and_then(|p| named("OTEL_EXPORTER_OTLP_CERTIFICATE", p)),
        cert: client.and_then(|(c, _)| named("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", c)),
        key: client.and_then(|(_, k)| named("OTEL_EXPORTER_OTLP_CLIENT_KEY", k)),
    }
}

fn config(node: &Node, receiver: &Receiver, protocol: OtlpProtocol, tls: TlsFiles) -> AgentConfig {
    let port = match protocol {
        OtlpProtocol::Grpc => receiver.grpc.port(),
        OtlpProtocol::HttpProtobuf => receiver.http.port(),
    };
    AgentConfig {
        export: ExportConfig {
            protocol,
            endpoint: Some(format!("https://127.0.0.1:{port}")),
            interval: Duration::from_millis(100),
            backoff: Duration::from_millis(100),
            tls,
            ..ExportConfig::default()
        },
        ..agent_config(node, receiver)
    }
}

fn server_tls(pki: &Pki, mutual: bool) -> anyhow::Result<ServerTls> {
    Ok(ServerTls {
        cert: Pki::read(&pki.server_cert)?,
        key: Pki::read(&pki.server_key)?,
        client_ca: if mutual {
            Some(Pki::read(&pki.ca)?)
        } else {
            None
        },
    })
}

/// One call without context into the server: a `missing_context` span.
fn call(node: &Node) -> anyhow::Result<()> {
    let url = format!("http://{}:8080/", node.pod("server").ipv4);
    node.pod("client").curl(&url, &[])?;
    Ok(())
}

fn arrives(receiver: &Receiver, via: &str) -> bool {
    !receiver
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().any(|s| s.synthetic() && s.via == via)
        })
        .is_empty()
}

/// Waits for the agent to count a failed export.
fn fails(agent: &Agent) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = agent.metric("tracegap_export_errors_total")?;
        if n > 0.0 {
            return Ok(n);
        }
        anyhow::ensure!(Instant::now() < deadline, "no export error counted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn spans_reach_a_collector_over_tls_and_mutual_tls_and_an_untrusted_one_gets_none()
-> anyhow::Result<()> {
    if !privileged("spans_reach_a_collector_over_tls_and_mutual_tls_and_an_untrusted_one_gets_none")
    {
        return Ok(());
    }
    let pki = Pki::new("collector", &[LOCALHOST])?;
    let other = Pki::new("other", &[LOCALHOST])?;
    let node = Node::new(&["client", "server"])?;
    let _server =
        ServiceSpec::new("server", 8080, Behaviour::Instrumented).start(node.pod("server"))?;

    // gRPC over TLS, the CA from OTEL_EXPORTER_OTLP_CERTIFICATE.
    let receiver = Receiver::start_tls(LOCALHOST, server_tls(&pki, false)?)?;
    let agent = Agent::start(config(
        &node,
        &receiver,
        OtlpProtocol::Grpc,
        files(Some(&pki.ca), None),
    ))?;
    call(&node)?;
    assert!(arrives(&receiver, "grpc"), "no span over gRPC with TLS");
    agent.stop()?;

    // OTLP/HTTP over mutual TLS: the receiver requires the client
    // certificate the CA signed.
    let receiver = Receiver::start_tls(LOCALHOST, server_tls(&pki, true)?)?;
    let agent = Agent::start(config(
        &node,
        &receiver,
        OtlpProtocol::HttpProtobuf,
        files(Some(&pki.ca), Some((&pki.client_cert, &pki.client_key))),
    ))?;
    call(&node)?;
    assert!(
        arrives(&receiver, "http"),
        "no span over HTTP with mutual TLS"
    );
    agent.stop()?;

    // Nothing arrives, the failures are counted, the agent runs on, not
    // ready (asked at start, before there is anything to export): at a
    // collector that wants a client certificate the agent lacks or whose
    // certificate has expired, and at
    // one whose certificate another CA signed (not trusted); over both
    // transports.
    // (A refused client certificate reaches a TLS 1.3 client as an alert
    // after its side of the handshake, or, when the server closes first,
    // as the connection closed.)
    let expired = Some((&pki.expired_cert, &pki.expired_key));
    for (signer, mutual, client, why, causes) in [
        (
            &pki,
            true,
            None,
            "without a client certificate",
            &["CertificateRequired", "connection closed"][..],
        ),
        (
            &pki,
            true,
            expired,
            "with an expired client certificate",
            &["CertificateExpired", "connection closed"][..],
        ),
        (
            &other,
            false,
            None,
            "to an untrusted collector",
            &["UnknownIssuer"][..],
        ),
    ] {
        for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
            let receiver = Receiver::start_tls(LOCALHOST, server_tls(signer, mutual)?)?;
            let agent = Agent::start(config(
                &node,
                &receiver,
                protocol,
                files(Some(&pki.ca), client),
            ))?;
            // Not ready, in a line naming the collector and why.
            let said = |body: &str| {
                body.lines().any(|l| {
                    l.starts_with("refused: collector https://127.0.0.1")
                        && causes.iter().any(|c| l.contains(c))
                })
            };
            let body = readyz_until(&agent, 503, &said)?;
            assert!(!body.contains("ok"), "{protocol:?} {why}: {body}");
            call(&node)?;
            fails(&agent)?;
            assert!(receiver.spans().is_empty(), "{protocol:?} {why}");
            let (status, body) = agent.get("/readyz")?;
            assert_eq!(status, 503, "{protocol:?} {why}: {body}");
            assert!(said(&body), "{protocol:?} {why}: {body}");
            agent.stop()?;
        }
    }

    // The CA file rotated to the one that signed the collector: read again
    // for the next attempt, the export succeeds and the agent is ready by
    // itself.
    let rotating = pki.dir.join("rotating-ca.pem");
    std::fs::copy(&pki.ca, &rotating)?;
    let receiver = Receiver::start_tls(LOCALHOST, server_tls(&other, false)?)?;
    let agent = Agent::start(config(
        &node,
        &receiver,
        OtlpProtocol::Grpc,
        files(Some(&rotating), None),
    ))?;
    readyz_until(&agent, 503, &|b| b.contains("UnknownIssuer"))?;
    std::fs::copy(&other.ca, &rotating)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !arrives(&receiver, "grpc") {
        anyhow::ensure!(Instant::now() < deadline, "no span after the CA rotated");
        call(&node)?;
    }
    readyz_until(&agent, 200, &|b| b.starts_with("ok"))?;
    agent.stop()?;

    // Files that are not right stop the agent at start, saying which.
    let receiver = Receiver::start_tls(LOCALHOST, server_tls(&pki, false)?)?;
    let missing = pki.dir.join("no-such-ca.pem");
    let err = Agent::start(config(
        &node,
        &receiver,
        OtlpProtocol::Grpc,
        files(Some(&missing), None),
    ))
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && err.contains("no-such-ca.pem"),
        "{err}"
    );
    let err = Agent::start(config(
        &node,
        &receiver,
        OtlpProtocol::Grpc,
        files(Some(&pki.client_key), None),
    ))
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(err.contains("no PEM certificate"), "{err}");
    let err = Agent::start(config(
        &node,
        &receiver,
        OtlpProtocol::HttpProtobuf,
        TlsFiles {
            key: None,
            ..files(Some(&pki.ca), Some((&pki.client_cert, &pki.client_key)))
        },
    ))
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE is set without a client key"),
        "{err}"
    );
    // Never the key's contents.
    let key = String::from_utf8(Pki::read(&pki.client_key)?)?;
    let body = key.lines().nth(1).unwrap_or_default();
    assert!(!err.contains(body));
    Ok(())
}

/// Waits for `/readyz` to answer `status` with a body `said` accepts;
/// returns the body.
fn readyz_until(agent: &Agent, status: u16, said: &dyn Fn(&str) -> bool) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, body) = agent.get("/readyz")?;
        if s == status && said(&body) {
            return Ok(body);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "/readyz answered {s}, not {status}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `metric` to pass zero.
fn counted(agent: &Agent, metric: &str) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = agent.metric(metric).unwrap_or(0.0);
        if n > 0.0 {
            return Ok(n);
        }
        anyhow::ensure!(Instant::now() < deadline, "{metric} stayed 0");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_trace_store_is_read_over_tls_with_a_token_and_a_refusal_is_said() -> anyhow::Result<()> {
    if !privileged("the_trace_store_is_read_over_tls_with_a_token_and_a_refusal_is_said") {
        return Ok(());
    }
    let pki = Pki::new("store", &[LOCALHOST])?;
    let node = Node::new(&["client", "server"])?;
    let receiver = Receiver::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let _server = ServiceSpec {
        otlp: Some(format!(
            "http://{}:{}",
            node.gateway(),
            receiver.http.port()
        )),
        ..ServiceSpec::new("server", 8080, Behaviour::Instrumented)
    }
    .start(node.pod("server"))?;
    let store = QueryServer::start_secured(
        std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        receiver.shared(),
        server_tls(&pki, false)?,
        Required {
            token: Some("s3cret-t0ken".into()),
            basic: None,
            tenant: Some("team-a".into()),
        },
    )?;
    let token = pki.dir.join("token");
    std::fs::write(&token, "s3cret-t0ken\n")?;
    let agent_with = |token_file: &PathBuf| -> anyhow::Result<Agent> {
        Agent::start(AgentConfig {
            reconcile: Some(ReconcileConfig {
                kind: StoreKind::Auto,
                settle: Duration::from_millis(800),
                access: Access {
                    tls: TlsFiles {
                        ca: Some(("--trace-store-ca-file".into(), pki.ca.clone())),
                        ..TlsFiles::default()
                    },
                    token_file: Some(("--trace-store-token-file".into(), token_file.clone())),
                    basic: None,
                    tenant: Some("team-a".into()),
                },
                ..ReconcileConfig::new(format!("https://127.0.0.1:{}", store.addr.port()))
            }),
            ..agent_config(&node, &receiver)
        })
    };
    let sampled = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let url = format!("http://{}:8080/", node.pod("server").ipv4);

    // Read back: the server's own span found in its trace.
    let agent = agent_with(&token)?;
    node.pod("client").curl(&url, &["-H", sampled])?;
    counted(
        &agent,
        "tracegap_trace_store_queries_total{query=\"trace\",outcome=\"found\"}",
    )?;
    agent.stop()?;

    // A token the store does not take: /readyz says so, in one line, and
    // nothing of the token.
    let wrong = pki.dir.join("wrong-token");
    std::fs::write(&wrong, "n0t-the-t0ken\n")?;
    let agent = agent_with(&wrong)?;
    node.pod("client").curl(&url, &["-H", sampled])?;
    // Refused since start: not ready.
    let note = readyz_until(&agent, 503, &|b| b.contains("refused the credentials"))?;
    assert!(note.starts_with("refused: trace store https://"), "{note}");
    assert!(note.contains("HTTP 401"), "{note}");
    assert!(!note.contains("t0ken"), "{note}");
    // And counted apart from other errors.
    counted(
        &agent,
        "tracegap_trace_store_queries_total{query=\"connect\",outcome=\"denied\"}",
    )?;
    agent.stop()?;

    // No token file: the agent does not start, and says which file.
    let err = agent_with(&pki.dir.join("no-token"))
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        err.contains("--trace-store-token-file") && err.contains("no-token"),
        "{err}"
    );
    Ok(())
}
