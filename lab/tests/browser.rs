//! The lab's traces in the real Jaeger UI, in a real browser: the lab's
//! trace store answers Jaeger's query API and serves a Jaeger UI build;
//! headless Chromium, driven by puppeteer-core (lab/tests/browser/
//! jaeger.cjs), searches by tag, opens the broken trace and the Trace
//! Quality page. Screenshots go to target/browser/.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use tracegap_lab::{
    query::QueryServer,
    run::{Options, run_keeping},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Tools {
    chromium: PathBuf,
    puppeteer: PathBuf,
    ui: PathBuf,
}

/// What the test needs, or None with a message. `cargo xtask test`
/// installs Chromium, Node and puppeteer-core and sets
/// TRACEGAP_REQUIRE_BROWSER: then a missing browser is a failure. The UI
/// build comes from outside the project (../shared/jaeger-ui/build, or
/// TRACEGAP_JAEGER_UI); without it the test says so and skips.
fn tools(test: &str) -> Option<Tools> {
    let required = std::env::var_os("TRACEGAP_REQUIRE_BROWSER").is_some();
    let skip = |why: String, fatal: bool| {
        assert!(!(required && fatal), "{test}: {why}");
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (the lab's namespaces)".into(), false);
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return skip(format!("no Chromium at {}", chromium.display()), true);
    }
    if !Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return skip("no node".into(), true);
    }
    let puppeteer = std::env::var_os("TRACEGAP_PUPPETEER_CORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/browser/node_modules/puppeteer-core"));
    if !puppeteer.join("package.json").exists() {
        return skip(
            format!(
                "no puppeteer-core at {} (cargo xtask test installs it)",
                puppeteer.display()
            ),
            true,
        );
    }
    let ui = std::env::var_os("TRACEGAP_JAEGER_UI")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/jaeger-ui/build"));
    if !ui.join("index.html").exists() {
        return skip(
            format!(
                "no Jaeger UI build at {} (TRACEGAP_JAEGER_UI)",
                ui.display()
            ),
            false,
        );
    }
    Some(Tools {
        chromium,
        puppeteer,
        ui,
    })
}

#[test]
fn the_broken_trace_is_found_by_tag_and_explained_in_the_real_jaeger_ui() -> anyhow::Result<()> {
    let test = "the_broken_trace_is_found_by_tag_and_explained_in_the_real_jaeger_ui";
    let Some(tools) = tools(test) else {
        return Ok(());
    };
    let out = std::env::temp_dir().join(format!("tracegap-browser-test-{}", std::process::id()));
    // Sampling: a caller that does not record leaves spans whose parent
    // never comes.
    // With Prometheus scraping the agents (cargo xtask test unpacks it),
    // the page is tracegap quality's: both nodes summed from Prometheus.
    let opts = Options {
        prometheus: tracegap_lab::prometheus::binary(),
        ..Options::short(
            &["broken-propagation", "sampling"],
            out.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_tracegap-lab")),
        )
    };
    let mut text = Vec::new();
    let done = run_keeping(&opts, &mut text);
    let _ = std::fs::remove_dir_all(&out);
    let done = done.map_err(|e| e.context(String::from_utf8_lossy(&text).into_owned()))?;
    let gap = "broken_propagation";
    let synthetic = done.outcomes[0]
        .spans
        .iter()
        .find(|s| s.synthetic() && s.gap().as_deref() == Some(gap))
        .expect("a synthetic span for the broken hop");
    let (trace_id, callee) = (synthetic.trace_id(), synthetic.service.clone());
    let caller = synthetic
        .attr("tracegap.caller.service")
        .expect("the caller's service");

    // A trace holding a span whose parent is not in it.
    let stored = done.store.spans();
    let orphan_trace = stored
        .iter()
        .find(|s| {
            !s.span.parent_span_id.is_empty()
                && !stored
                    .iter()
                    .any(|p| p.trace_id() == s.trace_id() && p.span_id() == s.parent_span_id())
        })
        .map(|s| s.trace_id())
        .expect("the sampling scenario leaves a span without its parent");

    let quality = match &done.prometheus {
        Some(p) => Some(tracegap_lab::prometheus::Quality::start(&p.url())?),
        None => None,
    };
    let server = QueryServer::start_with_quality(
        "127.0.0.1:0".parse()?,
        done.store.shared(),
        done.reports.clone(),
        Some(tools.ui),
        quality.as_ref().map(|q| q.addr),
    )?;
    let shots = workspace().join("target/browser");
    std::fs::create_dir_all(&shots)?;
    let output = Command::new("node")
        .arg(workspace().join("lab/tests/browser/jaeger.cjs"))
        .env("PUPPETEER_CORE", &tools.puppeteer)
        .env("CHROMIUM", &tools.chromium)
        .env("BASE", format!("http://{}", server.addr))
        .env("SERVICE", &callee)
        .env("GAP", gap)
        .env("TRACE_ID", &trace_id)
        .env("QUALITY_SERVICE", &caller)
        .env("ORPHAN_TRACE_ID", &orphan_trace)
        .env("SHOTS", &shots)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let facts: Value = serde_json::from_str(&stdout).map_err(|e| {
        anyhow::anyhow!(
            "the browser script printed no facts ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let seen = format!("{facts:#}\n(screenshots in {})", shots.display());
    assert!(facts["error"].is_null(), "{seen}");
    assert_eq!(facts["pageErrors"], serde_json::json!([]), "{seen}");
    assert_eq!(facts["failedRequests"], serde_json::json!([]), "{seen}");

    // The search by tag finds the broken trace.
    let search = &facts["search"];
    assert_eq!(search["servicesFound"], true, "{seen}");
    assert!(search["results"].as_u64().is_some_and(|n| n >= 1), "{seen}");
    assert!(
        search["ids"].as_array().is_some_and(|ids| ids
            .iter()
            .any(|i| i.as_str().is_some_and(|i| trace_id.starts_with(i)))),
        "{trace_id} among the results: {seen}"
    );

    // The synthetic span nests under the breaking service's own span (read
    // back from the store), with its tags and its pod; the trace is not
    // called incomplete.
    let trace = &facts["trace"];
    let rows = trace["rows"].as_array().cloned().unwrap_or_default();
    let at = rows
        .iter()
        .position(|r| r["service"] == callee.as_str())
        .expect("the callee's row");
    let depth = |i: usize| rows[i]["depth"].as_u64().unwrap_or(0);
    assert!(
        at > 0 && (0..at).any(|i| depth(i) < depth(at)),
        "nested under an earlier span: {seen}"
    );
    let parent = (0..at).rev().find(|i| depth(*i) < depth(at));
    assert_eq!(
        parent.map(|i| rows[i]["service"].clone()),
        Some(serde_json::json!("service-b")),
        "under service-b's own span: {seen}"
    );
    assert_eq!(trace["incomplete"], false, "{seen}");
    let detail = trace["detail"].as_str().unwrap_or_default();
    for shown in [
        "tracegap.synthetic=true",
        "tracegap.gap=broken_propagation",
        "Process:",
        "k8s.pod.name=",
        // The link to service-c's own trace of the same request.
        "References",
    ] {
        assert!(
            detail.contains(shown),
            "{shown} in the span's details: {seen}"
        );
    }

    // The span without its parent: no false "Incomplete", and a warning
    // that says why.
    let orphan = &facts["orphan"];
    assert_eq!(orphan["incomplete"], false, "{seen}");
    assert!(
        orphan["details"].as_array().is_some_and(|d| d
            .iter()
            .any(|d| d.as_str().is_some_and(|d| d.contains("is not recorded")))),
        "the warning is shown: {seen}"
    );

    // The caller's Trace Quality page: propagation fails, with examples
    // that open the broken traces.
    let metrics = facts["quality"]["metrics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let out_metric = metrics
        .iter()
        .find(|m| m["name"] == "Context propagated out")
        .expect("the propagation metric");
    assert!(
        out_metric["counts"]["Failing"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{seen}"
    );
    let examples = out_metric["examples"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let broken: Vec<String> = done.outcomes[0]
        .spans
        .iter()
        .filter(|s| s.gap().as_deref() == Some(gap))
        .map(|s| s.trace_id())
        .collect();
    assert!(
        examples.iter().any(|l| broken
            .iter()
            .any(|t| l.as_str().is_some_and(|l| l.contains(t.as_str())))),
        "an example link opens a broken trace: {seen}"
    );
    assert!(
        facts["quality"]["exampleResults"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{seen}"
    );
    // The page's counts are both nodes' agents' reports summed: from
    // Prometheus through tracegap quality when it ran.
    let merged = done
        .reports
        .lock()
        .map_err(|_| anyhow::anyhow!("reports lock"))?
        .clone();
    let expected = tracegap_agent::quality::quality_metrics(&merged, &caller, "");
    let want = expected["metrics"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "Context propagated out"))
        .map(|m| m["failureCount"].clone())
        .unwrap_or_default();
    assert_eq!(out_metric["counts"]["Failing"], want, "{seen}");
    if quality.is_some() {
        let (status, body) = tracegap_lab::http::get(
            server.addr,
            &format!("/api/quality-metrics?service={caller}"),
        )?;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("every node"), "from Prometheus: {body}");
    } else if std::env::var_os("TRACEGAP_REQUIRE_BROWSER").is_some() {
        panic!("cargo xtask test gives the browser test a Prometheus (TRACEGAP_PROMETHEUS_BIN)");
    }
    Ok(())
}
