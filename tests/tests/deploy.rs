//! Every manifest in deploy/, rendered by `kubectl kustomize` and read into
//! its k8s-openapi type. Reading back what the type kept and comparing it
//! with what was written catches misspelt and misplaced fields, which a
//! plain deserialisation would ignore.

use std::{path::Path, process::Command};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{Serialize, de::DeserializeOwned},
};
use serde_json::Value;

fn render(dir: &str) -> anyhow::Result<Vec<Value>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(dir);
    let out = tracegap_tests::run(Command::new("kubectl").arg("kustomize").arg(&path))?;
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde_yaml::with::singleton_map_recursive::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The DaemonSet `deploy/<dir>` renders.
fn daemonset(dir: &str) -> anyhow::Result<Value> {
    render(dir)?
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .ok_or_else(|| anyhow::anyhow!("{dir}: no DaemonSet"))
}

/// Removes what serialisation adds or drops without meaning: nulls, and
/// empty maps and lists.
fn normalise(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.values_mut().for_each(normalise);
            m.retain(|_, v| {
                !(v.is_null()
                    || v.as_object().is_some_and(|o| o.is_empty())
                    || v.as_array().is_some_and(|a| a.is_empty()))
            });
        }
        Value::Array(a) => a.iter_mut().for_each(normalise),
        _ => {}
    }
}

fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> anyhow::Result<T> {
    let t: T = serde_json::from_value(doc.clone())?;
    let mut back = serde_json::to_value(&t)?;
    let mut orig = doc.clone();
    normalise(&mut back);
    normalise(&mut orig);
    anyhow::ensure!(
        back == orig,
        "fields the type does not know (typo or wrong place):\nwritten: {orig:#}\nkept:    {back:#}"
    );
    Ok(t)
}

fn check_all(docs: &[Value]) -> anyhow::Result<Vec<String>> {
    let mut kinds = Vec::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default().to_owned();
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let r = match kind.as_str() {
            "Namespace" => typed::<Namespace>(d).map(drop),
            "ServiceAccount" => typed::<ServiceAccount>(d).map(drop),
            "ClusterRole" => typed::<ClusterRole>(d).map(drop),
            "ClusterRoleBinding" => typed::<ClusterRoleBinding>(d).map(drop),
            "ConfigMap" => typed::<ConfigMap>(d).map(drop),
            "DaemonSet" => typed::<DaemonSet>(d).map(drop),
            "Deployment" => typed::<Deployment>(d).map(drop),
            "Service" => typed::<Service>(d).map(drop),
            "NetworkPolicy" => typed::<NetworkPolicy>(d).map(drop),
            // prometheus-operator's kinds (no k8s-openapi type): their
            // fields are checked by the tests below.
            "PodMonitor" | "PrometheusRule"
                if d["apiVersion"] == "monitoring.coreos.com/v1" && d["spec"].is_object() =>
            {
                Ok(())
            }
            other => Err(anyhow::anyhow!("no check for kind {other}")),
        };
        r.map_err(|e| e.context(format!("{kind} {name}")))?;
        // Every object carries the recommended labels.
        let labels = &d["metadata"]["labels"];
        anyhow::ensure!(
            labels["app.kubernetes.io/part-of"].is_string(),
            "{kind} {name} has no app.kubernetes.io/part-of label"
        );
        kinds.push(kind);
    }
    Ok(kinds)
}

fn kubectl() -> bool {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        // `cargo xtask setup` installs Debian's kubernetes-client.
        eprintln!("SKIPPED manifest tests: no kubectl (run cargo xtask setup)");
        return false;
    }
    true
}

#[test]
fn every_manifest_renders_and_reads_into_its_kubernetes_type() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    let base = check_all(&render("base")?)?;
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(base.iter().any(|b| b == k), "base has no {k}: {base:?}");
    }
    let jaeger = check_all(&render("jaeger")?)?;
    assert!(jaeger.iter().any(|k| k == "Deployment"));
    let lab = check_all(&render("lab")?)?;
    assert_eq!(lab.iter().filter(|k| *k == "Deployment").count(), 3);
    let busy = check_all(&render("busy-nodes")?)?;
    assert_eq!(busy, base, "the same objects as the base");
    let https = check_all(&render("https")?)?;
    assert_eq!(https, base, "the same objects as the base");
    let otlp_tls = check_all(&render("otlp-tls")?)?;
    assert_eq!(otlp_tls, base, "the same objects as the base");
    let mut quality = check_all(&render("quality")?)?;
    quality.sort();
    assert_eq!(quality, ["Deployment", "Service"]);
    let mut prometheus = check_all(&render("prometheus")?)?;
    prometheus.sort();
    assert_eq!(prometheus, ["PodMonitor", "PrometheusRule"]);
    Ok(())
}

/// `tracegap quality` asks Prometheus and nothing else: no root, no
/// capabilities, no API token, a read-only root; its probes and Service on
/// the port it listens on.
#[test]
fn the_quality_deployment_runs_unprivileged_on_the_port_it_serves() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    let docs = render("quality")?;
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .ok_or_else(|| anyhow::anyhow!("no Deployment"))?;
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let [c] = pod["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        panic!("one container: {pod:#}")
    };
    assert_eq!(c["args"], serde_json::json!(["quality"]));
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null(), "{sc:#}");
    let env = |name: &str| {
        c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    let listen = env("TRACEGAP_LISTEN").expect("TRACEGAP_LISTEN");
    let port = c["ports"][0]["containerPort"].as_u64().expect("a port");
    assert!(listen.ends_with(&format!(":{port}")), "{listen} vs {port}");
    assert!(env("TRACEGAP_PROMETHEUS").is_some_and(|u| u.starts_with("http")));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    // Every variable is one `tracegap quality` reads, and its value parses.
    use clap::CommandFactory as _;
    let cli = tracegap_agent::cli::Cli::command();
    let quality = cli
        .get_subcommands()
        .find(|c| c.get_name() == "quality")
        .expect("a quality subcommand");
    let mut args = vec!["tracegap".to_owned(), "quality".to_owned()];
    for e in c["env"].as_array().into_iter().flatten() {
        let key = e["name"].as_str().unwrap_or_default();
        let arg = quality
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|v| v == key))
            .unwrap_or_else(|| {
                panic!("the Deployment sets {key}, which tracegap quality does not read")
            });
        args.push(format!(
            "--{}={}",
            arg.get_long().expect("a long flag"),
            e["value"].as_str().unwrap_or_default()
        ));
    }
    <tracegap_agent::cli::Cli as clap::Parser>::try_parse_from(&args)?;
    let service = docs
        .iter()
        .find(|d| d["kind"] == "Service")
        .ok_or_else(|| anyhow::anyhow!("no Service"))?;
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        c["ports"][0]["name"]
    );
    // deploy/jaeger's UI asks it for the Trace Quality page, from the
    // origin it allows.
    let jaeger = render("jaeger")?;
    let ui: Value = jaeger
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "jaeger-ui-config")
        .and_then(|d| d["data"]["ui-config.json"].as_str())
        .map(serde_json::from_str)
        .transpose()?
        .expect("the Jaeger UI's config");
    let endpoint = ui["qualityMetrics"]["apiEndpoint"]
        .as_str()
        .unwrap_or_default();
    assert!(
        endpoint.ends_with(&format!(
            ":{}/api/quality-metrics",
            service["spec"]["ports"][0]["port"]
        )),
        "{endpoint}"
    );
    let origin = env("TRACEGAP_CORS_ORIGIN").expect("TRACEGAP_CORS_ORIGIN");
    let ui_port = jaeger
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "jaeger-collector")
        .and_then(|d| d["spec"]["ports"].as_array().cloned())
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "ui")
        .map(|p| p["port"].clone())
        .expect("the UI's port");
    assert_eq!(origin, format!("http://localhost:{ui_port}"));
    let jaeger_args = jaeger
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .map(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap_or_default();
    assert_eq!(
        jaeger_args,
        serde_json::json!(["--query.ui-config=/etc/jaeger/ui-config.json"])
    );
    Ok(())
}

/// The PodMonitor selects the DaemonSet's pods and scrapes the port their
/// metrics are on; the job it makes is the one the rules and the dashboard
/// match; every rule has an expression, every alert a summary.
#[test]
fn the_podmonitor_and_rules_match_the_agents() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    let docs = render("prometheus")?;
    let monitor = docs
        .iter()
        .find(|d| d["kind"] == "PodMonitor")
        .ok_or_else(|| anyhow::anyhow!("no PodMonitor"))?;
    let ds = daemonset("base")?;
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(&pod_labels[k], v, "the DaemonSet's pods carry {k}={v}");
    }
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"].clone();
    let ports = &ds["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(
        ports
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == port),
        "{port} among {ports}"
    );
    // prometheus-operator names the job namespace/name.
    assert_eq!(monitor["metadata"]["name"], "tracegap-agents");
    // The plain scrape job keeps the same pods and port. (Debian's
    // promtool, built without Kubernetes discovery, cannot check it.)
    let plain: Value = serde_yaml::from_str(&std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/scrape-config.yaml"),
    )?)?;
    let job = &plain["scrape_configs"][0];
    assert_eq!(job["job_name"], "tracegap-agents");
    let keeps: Vec<&Value> = job["relabel_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "keep")
        .collect();
    let [by_labels, by_port] = keeps.as_slice() else {
        panic!("two keep rules: {job:#}")
    };
    let wanted = format!(
        "{};{}",
        pod_labels["app.kubernetes.io/name"]
            .as_str()
            .unwrap_or_default(),
        pod_labels["app.kubernetes.io/component"]
            .as_str()
            .unwrap_or_default()
    );
    assert_eq!(by_labels["regex"], wanted.as_str());
    assert_eq!(by_port["regex"], port);
    let rules = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .ok_or_else(|| anyhow::anyhow!("no PrometheusRule"))?;
    let mut alerts = 0;
    for g in rules["spec"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            assert!(r["expr"].as_str().is_some_and(|e| !e.is_empty()), "{r:#}");
            if r["alert"].is_string() {
                alerts += 1;
                assert!(r["annotations"]["summary"].is_string(), "{r:#}");
                let job = r["expr"].as_str().unwrap_or_default();
                if job.contains("up{") {
                    assert!(job.contains("tracegap-agents"), "{job}");
                }
            }
        }
    }
    assert!(alerts >= 6, "{alerts} alerts");
    Ok(())
}

/// The https recipe adds what reading HTTPS through OpenSSL asks of the
/// kernel, and nothing else: hostPID, SYS_ADMIN (uprobes), SYS_PTRACE
/// (other processes' maps and roots).
#[test]
fn the_https_recipe_only_adds_what_the_openssl_probes_need() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    let (mut base, mut https) = (daemonset("base")?, daemonset("https")?);
    let spec = "/spec/template/spec";
    let caps = "/spec/template/spec/containers/0/securityContext/capabilities/add";
    assert_eq!(
        https.pointer(&format!("{spec}/hostPID")),
        Some(&Value::from(true))
    );
    assert_eq!(
        https.pointer(caps).cloned(),
        Some(serde_json::json!([
            "BPF",
            "NET_ADMIN",
            "PERFMON",
            "SYS_ADMIN",
            "SYS_PTRACE"
        ]))
    );
    for d in [&mut base, &mut https] {
        *d.pointer_mut(caps).expect("capabilities") = Value::Null;
        if let Some(o) = d.pointer_mut(spec).and_then(Value::as_object_mut) {
            o.remove("hostPID");
        }
    }
    assert_eq!(https, base, "everything else is the base's");
    Ok(())
}

/// The collector-over-TLS recipe points the OpenTelemetry variables the
/// agent reads at the files of a Secret mounted read-only, no one but the
/// owner and group able to read them, an https:// endpoint; nothing else
/// changes.
#[test]
fn the_otlp_tls_recipe_mounts_its_secret_where_the_variables_point() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    let (mut base, mut tls) = (daemonset("base")?, daemonset("otlp-tls")?);
    let pod = "/spec/template/spec";
    let c = "/spec/template/spec/containers/0";
    let volume = tls
        .pointer(&format!("{pod}/volumes"))
        .and_then(Value::as_array)
        .and_then(|v| v.iter().find(|v| v.get("secret").is_some()))
        .cloned()
        .expect("a Secret volume");
    assert_eq!(volume["secret"]["secretName"], "tracegap-otlp-tls");
    let mode = volume["secret"]["defaultMode"].as_u64().expect("a mode");
    assert_eq!(mode & 0o007, 0, "readable by others: {mode:o}");
    let mount = tls
        .pointer(&format!("{c}/volumeMounts"))
        .and_then(Value::as_array)
        .and_then(|m| m.iter().find(|m| m["name"] == volume["name"]))
        .cloned()
        .expect("the Secret mounted");
    assert_eq!(mount["readOnly"], true);
    let dir = mount["mountPath"].as_str().expect("a path").to_owned();
    let env: Vec<(String, String)> = tls
        .pointer(&format!("{c}/env"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    // Read as the agent reads them: each file named, each in the Secret.
    let files = tracegap_agent::remote::TlsFiles::from_vars(|name| {
        env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    });
    for (what, f) in [
        ("CA", &files.ca),
        ("certificate", &files.cert),
        ("key", &files.key),
    ] {
        let (_, path) = f
            .as_ref()
            .unwrap_or_else(|| panic!("no {what} file: {env:?}"));
        assert!(
            path.starts_with(&dir),
            "{what} {} not in {dir}",
            path.display()
        );
    }
    let cm: ConfigMap = render("otlp-tls")?
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .map(typed)
        .expect("a ConfigMap")?;
    let endpoint = cm.data.unwrap_or_default()["OTEL_EXPORTER_OTLP_ENDPOINT"].clone();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    // The rest is the base's.
    for d in [&mut base, &mut tls] {
        for (list, keep) in [
            (format!("{pod}/volumes"), "bpffs"),
            (format!("{c}/volumeMounts"), "bpffs"),
        ] {
            if let Some(a) = d.pointer_mut(&list).and_then(Value::as_array_mut) {
                a.retain(|v| v["name"] == keep);
            }
        }
        if let Some(a) = d
            .pointer_mut(&format!("{c}/env"))
            .and_then(Value::as_array_mut)
        {
            a.retain(|e| !e["name"].as_str().is_some_and(|n| n.starts_with("OTEL_")));
        }
    }
    assert_eq!(tls, base, "everything else is the base's");
    Ok(())
}

/// Every variable the ConfigMap sets is one `tracegap run` reads (a flag's
/// environment fallback, or the log filter), and each value parses: a
/// misspelt key would be ignored in silence on every node.
#[test]
fn every_configmap_variable_is_one_the_agent_reads() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    use clap::CommandFactory as _;
    let docs = render("base")?;
    let cm: ConfigMap = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .map(typed)
        .expect("a ConfigMap")?;
    let cli = tracegap_agent::cli::Cli::command();
    let run = cli
        .get_subcommands()
        .find(|c| c.get_name() == "run")
        .expect("a run subcommand");
    let mut args = vec!["tracegap".to_owned(), "run".to_owned()];
    for (key, value) in cm.data.unwrap_or_default() {
        if key == "TRACEGAP_LOG" {
            continue;
        }
        let arg = run
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == key.as_str()))
            .unwrap_or_else(|| {
                panic!("the ConfigMap sets {key}, which tracegap run does not read")
            });
        args.push(format!(
            "--{}={value}",
            arg.get_long().expect("a long flag")
        ));
    }
    <tracegap_agent::cli::Cli as clap::Parser>::try_parse_from(&args)?;
    Ok(())
}

/// The busy-nodes recipe changes the agent's CPU request and limit, and
/// nothing else: same objects, same privileges, same memory bounds.
#[test]
fn the_busy_nodes_recipe_only_guarantees_cpu_and_lifts_its_limit() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    let (mut base, mut busy) = (daemonset("base")?, daemonset("busy-nodes")?);
    let resources = "/spec/template/spec/containers/0/resources";
    let (b, r) = (
        base.pointer(resources).cloned().expect("base resources"),
        busy.pointer(resources).cloned().expect("busy resources"),
    );
    assert_eq!(b["requests"]["cpu"], "50m");
    assert_eq!(b["limits"]["cpu"], "500m");
    assert_eq!(r["requests"]["cpu"], "250m");
    assert!(r["limits"].get("cpu").is_none(), "no CPU limit: {r}");
    assert_eq!(r["requests"]["memory"], b["requests"]["memory"]);
    assert_eq!(r["limits"]["memory"], b["limits"]["memory"]);
    for d in [&mut base, &mut busy] {
        *d.pointer_mut(resources).expect("resources") = Value::Null;
    }
    assert_eq!(busy, base, "everything but the resources is the base's");
    Ok(())
}

#[test]
fn the_daemonset_runs_with_least_privilege() -> anyhow::Result<()> {
    if !kubectl() {
        return Ok(());
    }
    let docs = render("base")?;
    let ds: DaemonSet = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .map(typed)
        .expect("a DaemonSet")?;
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("tracegap"));
    assert!(
        pod.tolerations
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint, so it runs on every node"
    );
    let [c] = pod.containers.as_slice() else {
        panic!("one container");
    };
    let sc = c.security_context.clone().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop.unwrap_or_default(), ["ALL"]);
    let mut add = caps.add.unwrap_or_default();
    add.sort();
    // Each one shown necessary by lab/tests/container.rs; no SYS_RESOURCE.
    assert_eq!(add, ["BPF", "NET_ADMIN", "PERFMON"]);
    // The node's processes are deploy/https's to see, not the base's.
    assert_ne!(pod.host_pid, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let node_name = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from?.field_ref)
        .map(|f| f.field_path);
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    let probe_path = |p: Option<k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.http_get).and_then(|h| h.path)
    };
    assert_eq!(
        probe_path(c.liveness_probe.clone()).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        probe_path(c.readiness_probe.clone()).as_deref(),
        Some("/readyz")
    );
    let res = c.resources.clone().expect("resources");
    assert!(res.requests.is_some_and(|r| r.contains_key("memory")));
    assert!(res.limits.is_some_and(|r| r.contains_key("memory")));
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    assert!(mounts.iter().any(|m| m.mount_path == "/sys/fs/bpf"));
    // /report (services, URL paths) on the node's loopback; the metrics
    // port open only to the monitoring namespace.
    let cm: ConfigMap = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .map(typed)
        .expect("a ConfigMap")?;
    let data = cm.data.unwrap_or_default();
    let report: std::net::SocketAddr = data["TRACEGAP_REPORT_LISTEN"].parse()?;
    assert!(report.ip().is_loopback(), "{report}");
    let np: NetworkPolicy = docs
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .map(typed)
        .expect("a NetworkPolicy")?;
    let np = np.spec.expect("spec");
    assert_eq!(
        np.pod_selector.and_then(|s| s.match_labels),
        ds.spec.selector.match_labels,
        "it selects the agent's pods"
    );
    let rules = np.ingress.unwrap_or_default();
    let [rule] = rules.as_slice() else {
        panic!("one ingress rule: {rules:?}");
    };
    let ports: Vec<String> = rule
        .ports
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| match p.port? {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => Some(s),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
                Some(n.to_string())
            }
        })
        .collect();
    assert_eq!(ports, ["metrics"]);
    assert!(
        rule.from
            .iter()
            .flatten()
            .all(|f| f.namespace_selector.is_some()),
        "only from selected namespaces"
    );
    // RBAC: read-only, pods/services/replicasets only.
    let role: ClusterRole = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .map(typed)
        .expect("a ClusterRole")?;
    for rule in role.rules.unwrap_or_default() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        for r in rule.resources.unwrap_or_default() {
            assert!(
                ["pods", "services", "replicasets"].contains(&r.as_str()),
                "{r}"
            );
        }
    }
    Ok(())
}
