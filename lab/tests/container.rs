//! The agent's image (`cargo xtask image`), run as deploy/base's DaemonSet
//! says: the pod template rendered by `kubectl kustomize` and translated
//! field by field into `podman run` (lab/src/container.rs), on a lab node's
//! network as its host network. It finds the lab's broken propagation;
//! without any one of the capabilities the DaemonSet adds it stops with an
//! error naming it. deploy/https adds what reading HTTPS through OpenSSL
//! asks (hostPID, SYS_ADMIN, SYS_PTRACE): with it the agent probes the
//! node's libssl; without either capability it runs on, probes none, and
//! its log names the one missing. deploy/otlp-tls mounts Secret
//! `tracegap-otlp-tls`: given the files a Secret of that name would hold
//! (a CA made for the run, a client certificate, mode 0440), the agent
//! exports to the lab's store over mutual TLS and reads it back over TLS
//! with a token.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;
use tracegap_lab::{
    cluster::Cluster,
    container::{AgentContainer, Placement, PodTemplate, deploy_base, image_present, render},
    run::{Options, run},
};

fn have(tool: &str) -> bool {
    let args: &[&str] = match tool {
        "kubectl" => &["version", "--client"],
        _ => &["--version"],
    };
    std::process::Command::new(tool)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// deploy/base's rendered documents, or None (with a message) when this
/// machine cannot run the test. `cargo xtask test` builds the image and
/// sets TRACEGAP_REQUIRE_IMAGE, so there a missing part is a failure.
fn manifests(test: &str) -> Option<Vec<Value>> {
    let required = std::env::var_os("TRACEGAP_REQUIRE_IMAGE").is_some();
    let skip = |why: &str| {
        assert!(!required, "{test}: {why}");
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root");
    }
    if !have("podman") || !have("kubectl") {
        return skip("needs podman and kubectl (cargo xtask image installs podman)");
    }
    let docs = match render(&deploy_base()) {
        Ok(d) => d,
        Err(e) => panic!("rendering deploy/base: {e:#}"),
    };
    let t = PodTemplate::from_manifests(&docs, "tracegap").expect("the DaemonSet translates");
    if !image_present(&t.image) {
        return skip(&format!("no image {} (cargo xtask image)", t.image));
    }
    Some(docs)
}

#[test]
fn every_field_of_the_pod_template_is_translated_or_named() -> anyhow::Result<()> {
    if !have("kubectl") {
        eprintln!("SKIPPED every_field_of_the_pod_template_is_translated_or_named: no kubectl");
        return Ok(());
    }
    let mut docs = render(&deploy_base())?;
    let t = PodTemplate::from_manifests(&docs, "tracegap")?;
    let at = Placement {
        node: "node-a".into(),
        netns: Some("tgn-example".into()),
        ..Placement::default()
    };
    let args = AgentContainer::podman_args(&t, &at, "tg")?;
    for flag in [
        "--network=ns:/var/run/netns/tgn-example",
        "--cap-drop=ALL",
        "--cap-add=BPF",
        "--cap-add=NET_ADMIN",
        "--cap-add=PERFMON",
        "--read-only",
        "--security-opt=no-new-privileges",
        "--volume=/sys/fs/bpf:/sys/fs/bpf",
        "--env=NODE_NAME=node-a",
        "--env=TRACEGAP_REPORT_LISTEN=127.0.0.1:9465",
        "--memory=268435456",
        "--stop-timeout=10",
    ] {
        assert!(args.iter().any(|a| a == flag), "no {flag} in {args:?}");
    }
    assert!(!args.iter().any(|a| a.contains("SYS_RESOURCE")), "{args:?}");
    assert!(!args.iter().any(|a| a == "--privileged"), "{args:?}");
    assert_eq!(args.last().map(String::as_str), Some("run"));
    assert!(
        t.ignored
            .iter()
            .any(|i| i.starts_with("serviceAccountName"))
    );
    let probe = t.readiness.clone().expect("a readiness probe");
    assert_eq!((probe.path.as_str(), probe.port), ("/readyz", 9464));

    // A field the translation does not know is an error, not a silent skip.
    let ds = docs
        .iter_mut()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["workingDir"] = Value::from("/tmp");
    let err = PodTemplate::from_manifests(&docs, "tracegap").expect_err("workingDir is unknown");
    assert!(err.to_string().contains("workingDir"), "{err:#}");
    Ok(())
}

#[test]
fn the_image_run_as_the_daemonset_says_finds_the_labs_broken_propagation() -> anyhow::Result<()> {
    let Some(docs) =
        manifests("the_image_run_as_the_daemonset_says_finds_the_labs_broken_propagation")
    else {
        return Ok(());
    };
    let out = std::env::temp_dir().join(format!("tracegap-container-test-{}", std::process::id()));
    let opts = Options {
        container: Some(PodTemplate::from_manifests(&docs, "tracegap")?),
        ..Options::short(
            &["broken-propagation"],
            out.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_tracegap-lab")),
        )
    };
    let mut text = Vec::new();
    let outcomes = run(&opts, &mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let _ = std::fs::remove_dir_all(&out);
    let outcomes = outcomes.map_err(|e| e.context(text.clone()))?;
    let [o] = outcomes.as_slice() else {
        panic!("one outcome: {text}");
    };
    assert!(o.passed, "{text}");
    assert!(
        o.report
            .edges
            .iter()
            .any(|e| e.kinds.contains_key("broken_propagation")),
        "the hop that dropped the context found: {text}"
    );
    assert!(!o.spans.is_empty(), "synthetic spans exported: {text}");
    Ok(())
}

#[test]
fn the_otlp_tls_recipe_runs_with_its_secret_mounted_exporting_and_reading_over_tls()
-> anyhow::Result<()> {
    let test = "the_otlp_tls_recipe_runs_with_its_secret_mounted_exporting_and_reading_over_tls";
    let Some(base) = manifests(test) else {
        return Ok(());
    };
    let docs = render(&deploy_base().with_file_name("otlp-tls"))?;
    let t = PodTemplate::from_manifests(&docs, "tracegap")?;
    assert_eq!(
        t.secrets,
        [(
            "tracegap-otlp-tls".to_owned(),
            "/etc/tracegap/otlp-tls".to_owned()
        )],
        "the Secret volume is mounted where the variables point"
    );
    let out = std::env::temp_dir().join(format!("tracegap-container-tls-{}", std::process::id()));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tracegap-lab"));
    let opts = Options {
        container: Some(t),
        secure: true,
        ..Options::short(&["broken-propagation"], out.clone(), bin.clone())
    };
    let mut text = Vec::new();
    let outcomes = run(&opts, &mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let outcomes = outcomes.map_err(|e| e.context(text.clone()))?;
    let [o] = outcomes.as_slice() else {
        panic!("one outcome: {text}");
    };
    assert!(o.passed, "{text}");
    // Exported over mutual TLS: the receiver takes nothing else.
    assert!(
        o.spans.iter().any(|s| s.synthetic()),
        "synthetic spans exported over mutual TLS: {text}"
    );
    // Read back over TLS with the token: placing a span under the store's
    // own spans needs the store's answer.
    assert!(
        o.verdict
            .iter()
            .any(|v| v.starts_with("ok") && v.contains("placed under service-b's own spans")),
        "the store read back: {text}"
    );

    // The base mounts no such Secret: said, before any agent runs.
    let opts = Options {
        container: Some(PodTemplate::from_manifests(&base, "tracegap")?),
        secure: true,
        ..Options::short(&["broken-propagation"], out.clone(), bin)
    };
    let err = run(&opts, &mut Vec::new()).expect_err("the base has no Secret to mount");
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        format!("{err:#}").contains("mounts no Secret tracegap-otlp-tls"),
        "{err:#}"
    );
    Ok(())
}

#[test]
fn each_capability_the_daemonset_adds_is_needed_and_named_when_missing() -> anyhow::Result<()> {
    let test = "each_capability_the_daemonset_adds_is_needed_and_named_when_missing";
    let Some(mut docs) = manifests(test) else {
        return Ok(());
    };
    let t = PodTemplate::from_manifests(&docs, "tracegap")?;
    let cluster = Cluster::new([&["client", "server"], &[]])?;
    let node = &cluster.nodes[0];
    let at = Placement {
        node: node.name.clone(),
        netns: node.netns.clone(),
        reach: Some(Cluster::node_address(node).into()),
        overlay: vec![("TRACEGAP_IFACE_PATTERNS".into(), node.veth_pattern())],
        ..Placement::default()
    };
    let name = |what: &str| format!("tracegap-test-{what}-{}", std::process::id());

    // A process of the node that maps OpenSSL (Python's ssl module), as a
    // service in a pod would: the agent finds its library through it.
    let _openssl_user = tracegap_lab::netns::Child::spawn(
        node.pods[1]
            .command("python3")
            .args(["-c", "import ssl, time; time.sleep(600)"]),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let probed = |agent: &AgentContainer| -> anyhow::Result<f64> {
        let (_, body) = tracegap_lab::http::get(agent.metrics, "/metrics")?;
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix("tracegap_openssl_libraries_probed "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    };

    // All of them: ready, attached to the node's pod veths; /metrics on
    // the node's address, /report only on its loopback.
    let mut agent = AgentContainer::start(&t, &at, &name("all"))?;
    agent.wait_ready(Duration::from_secs(30))?;
    // The base reads no HTTPS (no hostPID, no SYS_ADMIN nor SYS_PTRACE)
    // and says why; deploy/https does (below).
    assert_eq!(probed(&agent)?, 0.0, "{}", agent.logs());
    let logs = agent.logs();
    for cap in ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"] {
        assert!(
            logs.contains("missing capabilities") && logs.contains(cap),
            "the log names {cap}: {logs}"
        );
    }
    // Ready means loaded: the verifier's memory, charged to the
    // container, is in the peak. One kernel build's verifier once took
    // more than the limit and the kubelet would have OOM-killed the agent
    // at every start; a quarter of the limit is kept free.
    let peak = agent.memory_peak()?;
    let limit = t.memory_limit().expect("deploy/base sets a memory limit");
    println!(
        "the agent's container: memory peak {:.1} MiB while loading and starting, of its {:.0} MiB limit",
        peak as f64 / 1048576.0,
        limit as f64 / 1048576.0
    );
    assert!(
        peak <= limit / 4 * 3,
        "memory peak {peak} B after loading, past three quarters of the limit {limit} B"
    );
    let (status, _) = tracegap_lab::http::get(agent.metrics, "/metrics")?;
    assert_eq!(status, 200);
    // A hostile pod: 15,000 idle half-sent requests at the metrics port,
    // while the test (another address, as the kubelet is) asks for
    // /metrics. The agent answers within a second throughout and stays
    // within its memory limit, not OOM-killed.
    let mib = |b: u64| b as f64 / 1048576.0;
    let fresh = agent.rss()?;
    let mut rss = fresh;
    let mut held = Vec::new();
    for _ in 0..3 {
        let to = agent.metrics;
        held.extend(
            node.pods[0]
                .spawn(move || tracegap_lab::http::half_requests(to, 5000))?
                .join()
                .map_err(|_| anyhow::anyhow!("the attacking thread panicked"))??,
        );
        let started = std::time::Instant::now();
        let (status, _) = tracegap_lab::http::get(agent.metrics, "/metrics")?;
        assert_eq!(status, 200, "/metrics under {} half-requests", held.len());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "/metrics took {:?} under the flood",
            started.elapsed()
        );
        rss = rss.max(agent.rss()?);
    }
    let peak = agent.memory_peak()?;
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    let (status, _) = tracegap_lab::http::get(agent.metrics, "/metrics")?;
    assert_eq!(status, 200, "the agent after the flood");
    let after = agent.rss()?;
    println!(
        "the agent's container under 15,000 half-requests: RSS {:.1} MiB fresh, {:.1} MiB at most, {:.1} MiB after; cgroup peak {:.1} MiB of its {:.0} MiB limit",
        mib(fresh),
        mib(rss),
        mib(after),
        mib(peak),
        mib(limit)
    );
    assert!(rss < 96 << 20, "RSS {rss} B under the flood");
    assert!(
        after < 2 * fresh,
        "RSS {after} B after the flood, {fresh} B fresh"
    );
    assert!(
        peak < limit,
        "memory peak {peak} B reached the limit {limit} B"
    );
    let report_port = 9465;
    assert!(
        tracegap_lab::http::get((Cluster::node_address(node), report_port).into(), "/report")
            .is_err(),
        "/report reachable from off the node"
    );
    let (status, body) = agent.get_report()?;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body)?;
    let logs = agent.logs();
    for pod in &node.pods {
        assert!(
            logs.contains(&pod.host_if),
            "not attached to {}: {logs}",
            pod.host_if
        );
    }
    agent.remove()?;

    // deploy/https: the library the node's process maps, found through
    // /proc/PID/maps (hostPID, SYS_PTRACE) and probed through
    // /proc/PID/root (SYS_ADMIN: uprobes). Without either added
    // capability the agent runs on, probes nothing, and names it.
    let https = PodTemplate::from_manifests(&render(&deploy_base().join("../https"))?, "tracegap")?;
    let agent = AgentContainer::start(&https, &at, &name("https"))?;
    agent.wait_ready(Duration::from_secs(30))?;
    assert!(
        probed(&agent)? >= 1.0,
        "no OpenSSL library probed: {}",
        agent.logs()
    );
    drop(agent);
    for cap in ["SYS_ADMIN", "SYS_PTRACE"] {
        let without = Placement {
            without: vec![cap.into()],
            ..at.clone()
        };
        let agent = AgentContainer::start(
            &https,
            &without,
            &name(&format!("https-{}", cap.to_lowercase())),
        )?;
        agent.wait_ready(Duration::from_secs(30))?;
        assert_eq!(probed(&agent)?, 0.0, "{}", agent.logs());
        let logs = agent.logs();
        assert!(
            logs.contains("missing capabilities") && logs.contains(&format!("CAP_{cap}")),
            "the log names CAP_{cap}: {logs}"
        );
    }

    for cap in &t.capabilities {
        let without = Placement {
            without: vec![cap.clone()],
            ..at.clone()
        };
        let agent = AgentContainer::start(&t, &without, &name(&cap.to_lowercase()))?;
        let (code, logs) = agent.wait_exit(Duration::from_secs(30))?;
        assert_ne!(code, 0, "ran without {cap}: {logs}");
        assert!(
            logs.contains("missing capabilities") && logs.contains(&format!("CAP_{cap}")),
            "the error names CAP_{cap}: {logs}"
        );
    }

    // seccompProfile RuntimeDefault: podman's default profile (that of
    // containers-common, which CRI-O uses too) allows bpf(2) only with
    // CAP_SYS_ADMIN. The agent says so instead of a bare EPERM.
    let ds = docs
        .iter_mut()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"]["type"] =
        Value::from("RuntimeDefault");
    let runtime_default = PodTemplate::from_manifests(&docs, "tracegap")?;
    let agent = AgentContainer::start(&runtime_default, &at, &name("seccomp"))?;
    match agent.wait_exit(Duration::from_secs(30)) {
        Ok((code, logs)) => {
            assert_ne!(code, 0, "{logs}");
            assert!(logs.contains("seccomp"), "the error names seccomp: {logs}");
        }
        // A runtime whose default allows bpf(2) to CAP_BPF: it runs.
        Err(e) => eprintln!("RuntimeDefault seccomp lets the agent run here: {e:#}"),
    }
    Ok(())
}
