//! The whole cluster in one view: two nodes, an agent on each, a real
//! Prometheus (Debian's, `TRACEGAP_PROMETHEUS_BIN`, which `cargo xtask
//! test` unpacks) scraping both, and `tracegap quality` reading it. What it
//! serves is the sum of the two agents' own reports; an agent restarted
//! loses nothing of it; Prometheus away is said, on the page and by
//! `/readyz`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use tracegap_agent::{
    export::{ExportConfig, OtlpProtocol},
    prometheus::{Prometheus as PromClient, report::cluster_report},
    report::Report,
};
use tracegap_tests::{
    agent::Agent,
    cluster::Cluster,
    privileged,
    prometheus::{self, TwoNodes},
};

const TP: &str = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn deploy(file: &str) -> std::path::PathBuf {
    deploy_dir().join(file)
}

fn deploy_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

/// Expressions over what this test's traffic does not make (no trace store
/// to check callee spans against, no TLS): run, and empty.
const NOT_MADE_HERE: &[&str] = &[
    "tracegap_callee_spans_total",
    "tracegap_tls_unread_connections_total",
];

/// Hops per (source, destination, kind), summed over `reports`.
fn kinds(reports: &[Report]) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    for r in reports {
        for e in &r.edges {
            for (k, n) in &e.kinds {
                *out.entry((e.source.clone(), e.destination.clone(), k.clone()))
                    .or_default() += n;
            }
        }
    }
    out
}

fn report_of(agent: &Agent) -> anyhow::Result<Report> {
    let (status, body) = agent.get_report()?;
    anyhow::ensure!(status == 200, "/report answered {status}");
    Ok(serde_json::from_str(&body)?)
}

/// `n` curls from node `node`'s client to its own service-b pod.
fn curl(cluster: &Cluster, node: usize, context: bool, n: usize) -> anyhow::Result<()> {
    let pods = &cluster.nodes[node].pods;
    let client = pods.iter().find(|p| p.name == "client").expect("client");
    let server = pods.iter().find(|p| p.name == "service-b").expect("server");
    let url = format!("http://{}:8080/items", server.ipv4);
    let args: &[&str] = if context { &["-H", TP] } else { &[] };
    for _ in 0..n {
        client.curl(&url, args)?;
    }
    Ok(())
}

/// Waits until the agents together report `n` hops.
fn settle(agents: &[&Agent], n: u64) -> anyhow::Result<Vec<Report>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reports: Vec<Report> = agents
            .iter()
            .map(|a| report_of(a))
            .collect::<Result<_, _>>()?;
        let hops: u64 = kinds(&reports).values().sum();
        if hops >= n {
            return Ok(reports);
        }
        anyhow::ensure!(Instant::now() < deadline, "{hops} hops of {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// A metric of the Trace Quality page by name: (pass, fail).
fn counts(page: &serde_json::Value, name: &str) -> (u64, u64) {
    let m = page["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no metric {name:?}: {page}"));
    (
        m["passCount"].as_u64().unwrap_or_default(),
        m["failureCount"].as_u64().unwrap_or_default(),
    )
}

#[test]
fn the_cluster_view_is_both_agents_summed_and_survives_a_restart() -> anyhow::Result<()> {
    let test = "the_cluster_view_is_both_agents_summed_and_survives_a_restart";
    if !privileged(test) {
        return Ok(());
    }
    let Some(binary) = prometheus::binary() else {
        eprintln!("SKIPPED {test}: TRACEGAP_PROMETHEUS_BIN unset (cargo xtask test sets it)");
        return Ok(());
    };
    let mut bed = TwoNodes::start(
        &binary,
        ExportConfig {
            protocol: OtlpProtocol::Grpc,
            interval: Duration::from_millis(100),
            ..ExportConfig::default()
        },
    )?;

    // Node 1: 3 with a context, 2 without; node 2: 1 and 4.
    curl(&bed.cluster, 0, true, 3)?;
    curl(&bed.cluster, 0, false, 2)?;
    curl(&bed.cluster, 1, true, 1)?;
    curl(&bed.cluster, 1, false, 4)?;
    let reports = settle(&bed.agents.iter().collect::<Vec<_>>(), 10)?;
    let both = kinds(&reports);
    // Each agent reported its own node's share.
    assert!(reports.iter().all(|r| !r.edges.is_empty()), "{reports:#?}");
    let total = "sum(tracegap_http_requests_total)";
    bed.prometheus.wait_for(total, 10.0)?;

    let client = PromClient::new(
        &bed.prometheus.url(),
        Duration::from_secs(5),
        &Default::default(),
    )?;
    let hour = Duration::from_secs(3600);
    let cluster_view = block_on(cluster_report(&client, hour, SystemTime::now()))?;
    assert_eq!(kinds(std::slice::from_ref(&cluster_view)), both);
    let [edge] = cluster_view.edges.as_slice() else {
        panic!("one edge: {cluster_view:#?}")
    };
    assert_eq!(edge.requests, 10);
    // The example trace: the latest gap's on either node (its exemplar).
    let example = edge.examples.get("missing_context").expect("an example");
    assert!(
        reports.iter().any(|r| r
            .edges
            .iter()
            .any(|e| e.examples.get("missing_context") == Some(example))),
        "{example} is an agent's example: {reports:#?}"
    );
    assert_eq!(edge.formats.get("w3c"), Some(&4), "{edge:?}");
    assert!((edge.valid_context_share - 0.4).abs() < 1e-9, "{edge:?}");

    // Every expression of the rules and the dashboard runs; each over
    // what this traffic makes returns series (a rate, once each series
    // has two samples: two scrapes more).
    std::thread::sleep(Duration::from_millis(2500));
    let exprs = prometheus::shipped_expressions(&deploy_dir())?;
    assert!(exprs.len() >= 20, "{exprs:?}");
    for prometheus::Shipped { what, expr, filter } in &exprs {
        let found = block_on(client.query(expr, SystemTime::now()))
            .map_err(|e| anyhow::anyhow!("{what}: {expr}: {e}"))?;
        let made = !NOT_MADE_HERE.iter().any(|m| expr.contains(m));
        if made && !filter {
            assert!(!found.is_empty(), "{what} returned no series: {expr}");
        }
    }

    // The Trace Quality page and /report, served from Prometheus.
    let quality = tracegap_tests::prometheus::Quality::start(&bed.prometheus.url())?;
    let addr = quality.addr;
    let (status, body) =
        tracegap_tests::http::get(addr, "/api/quality-metrics?service=service-b&hours=1")?;
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(counts(&page, "Context received"), (4, 6), "{page}");
    let received = page["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "Context received"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        received["failureExamples"][0]["traceID"].as_str(),
        Some(example.as_str()),
        "{received}"
    );
    assert!(body.contains("every node, the last 1h"), "{body}");
    let (status, body) = tracegap_tests::http::get(addr, "/report")?;
    assert_eq!(status, 200, "{body}");
    let served: Report = serde_json::from_str(&body)?;
    assert_eq!(kinds(&[served]), both);
    // The same as the table `tracegap report` prints.
    let (status, table) = tracegap_tests::http::get(addr, "/report?format=table")?;
    assert_eq!(status, 200, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("client -> service-b") && l.contains(" 10 ")),
        "{table}"
    );
    assert_eq!(tracegap_tests::http::get(addr, "/readyz")?.0, 200);

    // Node 2's agent restarts (on its address: the same series, reset);
    // two more hops there. Nothing shown before is lost.
    bed.restart_agent(1)?;
    curl(&bed.cluster, 1, false, 2)?;
    settle(&[&bed.agents[1]], 2)?;
    // The restarted agent's two, scraped.
    bed.prometheus.wait_for(total, 5.0 + 2.0)?;
    let after = block_on(cluster_report(&client, hour, SystemTime::now()))?;
    let [edge] = after.edges.as_slice() else {
        panic!("one edge: {after:#?}")
    };
    assert_eq!(edge.requests, 12, "{edge:?}");
    assert_eq!(edge.kinds.get("missing_context"), Some(&8), "{edge:?}");

    // Prometheus away: the page says so, and so does /readyz.
    bed.prometheus.stop();
    let (status, body) = tracegap_tests::http::get(addr, "/api/quality-metrics?service=service-b")?;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("Prometheus at"), "{body}");
    assert_eq!(tracegap_tests::http::get(addr, "/readyz")?.0, 503);
    drop(quality);
    drop(bed.servers);
    for a in bed.agents {
        a.stop()?;
    }
    Ok(())
}

/// The rules as Prometheus reads them (`promtool check rules`), and the
/// alerts firing for what they are about and quiet otherwise
/// (`promtool test rules deploy/prometheus/rules-test.yaml`).
#[test]
fn the_rules_check_and_their_alerts_fire_as_their_tests_say() -> anyhow::Result<()> {
    let test = "the_rules_check_and_their_alerts_fire_as_their_tests_say";
    let Some(promtool) = prometheus::binary().map(|b| b.with_file_name("promtool")) else {
        eprintln!("SKIPPED {test}: TRACEGAP_PROMETHEUS_BIN unset (cargo xtask test sets it)");
        return Ok(());
    };
    let dir = tracegap_tests::TempDir::new("rules")?;
    std::fs::write(
        dir.path().join("rules.yml"),
        serde_yaml::to_string(&prometheus::rules_file(&deploy_dir())?)?,
    )?;
    std::fs::copy(
        deploy("rules-test.yaml"),
        dir.path().join("rules-test.yaml"),
    )?;
    let check = tracegap_tests::run(
        std::process::Command::new(&promtool)
            .args(["check", "rules", "rules.yml"])
            .current_dir(dir.path()),
    )?;
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(said.contains("SUCCESS: 12 rules found"), "{said}");
    tracegap_tests::run(
        std::process::Command::new(&promtool)
            .args(["test", "rules", "rules-test.yaml"])
            .current_dir(dir.path()),
    )?;
    Ok(())
}

/// Prometheus behind TLS and basic authentication (its
/// `--web.config.file`), as behind a gateway: `tracegap quality` reaches it
/// trusting the CA (`--prometheus-ca-file`) with the user and the password
/// file (`--prometheus-user`, `--prometheus-password-file`); a wrong
/// password is said, on the page (502) and by `/readyz` (503), with
/// Prometheus's 401 and never the password; a CA that did not sign its
/// certificate, with the TLS error.
#[test]
fn tracegap_quality_reaches_a_prometheus_that_asks_for_credentials() -> anyhow::Result<()> {
    let test = "tracegap_quality_reaches_a_prometheus_that_asks_for_credentials";
    let Some(bin) = prometheus::binary() else {
        eprintln!("SKIPPED {test}: TRACEGAP_PROMETHEUS_BIN unset (cargo xtask test sets it)");
        return Ok(());
    };
    let pki = tracegap_lab::pki::Pki::new("prometheus", &[std::net::Ipv4Addr::LOCALHOST.into()])?;
    let other = tracegap_lab::pki::Pki::new("other", &[])?;
    let hash = bcrypt::hash("pr0m-passw0rd", 4)?;
    let web = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  reader: '{hash}'\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let prom = prometheus::Prometheus::start_with(&bin, &[], Some(&web))?;
    assert!(prom.url().starts_with("https://"), "{}", prom.url());
    let dir = tracegap_tests::TempDir::new("prometheus-auth")?;
    let quality_trusting = |password: &str, ca: &std::path::Path| {
        let file = dir.path().join(format!("password-{}", password.len()));
        std::fs::write(&file, format!("{password}\n"))?;
        prometheus::Quality::start_with(
            &prom.url(),
            tracegap_agent::remote::Access {
                tls: tracegap_agent::remote::TlsFiles {
                    ca: Some(("--prometheus-ca-file".into(), ca.to_owned())),
                    ..Default::default()
                },
                basic: Some(("reader".into(), ("--prometheus-password-file".into(), file))),
                ..Default::default()
            },
        )
    };
    let quality = |password: &str| quality_trusting(password, &pki.ca);
    let get = |q: &prometheus::Quality, path: &str| tracegap_tests::http::get(q.addr, path);
    let good = quality("pr0m-passw0rd")?;
    let (status, body) = get(&good, "/readyz")?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&good, "/report")?;
    assert_eq!(status, 200, "{body}");
    let bad = quality("not-the-passw0rd")?;
    for (path, want) in [("/readyz", 503), ("/report", 502)] {
        let (status, body) = get(&bad, path)?;
        assert_eq!(status, want, "{path}: {body}");
        assert!(body.contains("401"), "{path}: {body}");
        assert!(!body.contains("passw0rd"), "{path}: {body}");
    }
    let untrusting = quality_trusting("pr0m-passw0rd", &other.ca)?;
    let (status, body) = get(&untrusting, "/readyz")?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("UnknownIssuer"), "{body}");
    Ok(())
}
