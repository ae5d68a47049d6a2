//! Every lab scenario, short: the verdicts, the trace trees and the span
//! linkage, and that nothing the lab made is left behind. (What `tracegap
//! observe` prints for real traffic is tests/tests/observer.rs's: the lab's
//! pod veths now live in its nodes' namespaces, out of a root-namespace
//! observer's sight.)

use std::path::PathBuf;

use tracegap_lab::{
    run::{Options, Outcome, run},
    scenario,
};

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED every_scenario_finds_what_the_seed_lab_teaches: needs root");
        return false;
    }
    true
}

fn ours(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-br", "link"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

fn outcome<'a>(all: &'a [Outcome], name: &str) -> &'a Outcome {
    all.iter().find(|o| o.name == name).expect(name)
}

#[test]
fn every_scenario_finds_what_the_seed_lab_teaches() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let out = std::env::temp_dir().join(format!("tracegap-lab-test-{}", std::process::id()));
    let opts = Options {
        scenarios: scenario::ALL.iter().map(|s| s.to_string()).collect(),
        short: true,
        out: out.clone(),
        lab_bin: PathBuf::from(env!("CARGO_BIN_EXE_tracegap-lab")),
    };
    let mut text = Vec::new();
    let outcomes = run(&opts, &mut text);
    let outcomes = outcomes?;
    let text = String::from_utf8_lossy(&text);
    println!("{text}");
    assert_eq!(outcomes.len(), scenario::ALL.len());
    for o in &outcomes {
        assert!(o.passed, "{}: {:#?}", o.name, o.verdict);
    }

    // Broken propagation: the synthetic span for service-c sits in
    // service-a's trace, under service-a's own client span.
    let broken = outcome(&outcomes, "broken-propagation");
    let synthetic: Vec<_> = broken.spans.iter().filter(|s| s.synthetic()).collect();
    assert!(!synthetic.is_empty());
    for s in &synthetic {
        assert_eq!(s.service, "service-c");
        let parent = broken
            .spans
            .iter()
            .find(|p| p.span_id() == s.parent_span_id())
            .expect("the parent is service-a's span, in the store");
        assert_eq!(parent.service, "service-a");
        assert_eq!(parent.trace_id(), s.trace_id());
    }
    assert!(broken.trees.iter().any(|t| t.contains("* service-c")));

    // Fixed: nothing synthetic at all, and whole four-span traces.
    let fixed = outcome(&outcomes, "fixed");
    assert!(fixed.spans.iter().all(|s| !s.synthetic()));
    assert!(
        fixed
            .trees
            .iter()
            .any(|t| t.contains("4 spans, 0 synthetic"))
    );

    // Uninstrumented proxy: its span is between service-a and service-c.
    let proxy = outcome(&outcomes, "uninstrumented");
    let p = proxy
        .spans
        .iter()
        .find(|s| s.synthetic() && s.service == "proxy")
        .expect("a span for the proxy");
    let c = proxy
        .spans
        .iter()
        .find(|s| !s.synthetic() && s.service == "service-c" && s.trace_id() == p.trace_id())
        .expect("service-c's span in the same trace");
    assert_eq!(
        c.parent_span_id(),
        p.parent_span_id(),
        "the proxy forwarded"
    );
    assert!(p.span.start_time_unix_nano <= c.span.start_time_unix_nano + 2_000_000);

    // Sampling: nothing exported for unsampled traces.
    let sampling = outcome(&outcomes, "sampling");
    assert!(
        sampling
            .spans
            .iter()
            .filter(|s| s.synthetic())
            .all(|s| s.gap().as_deref() == Some("sampling_inconsistent"))
    );

    // The report, the trees and the files a person gets.
    assert!(text.contains("verdict: as expected"));
    assert!(!text.contains("UNEXPECTED"));
    for f in [
        "spans.otlp.json",
        "traces.jaeger.json",
        "broken-propagation.names",
    ] {
        let body = std::fs::read_to_string(out.join(f))?;
        assert!(body.len() > 10, "{f}");
    }
    let jaeger: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("traces.jaeger.json"))?)?;
    let traces = jaeger["data"].as_array().expect("data");
    assert!(traces.iter().any(|t| {
        t["spans"].as_array().is_some_and(|s| {
            s.iter().any(|s| {
                s["tags"].as_array().is_some_and(|tags| {
                    tags.iter()
                        .any(|t| t["key"] == "tracegap.gap" && t["value"] == "passthrough")
                })
            })
        })
    }));
    let _ = std::fs::remove_dir_all(&out);

    // Nothing left behind: links, namespaces, attached programs.
    assert!(ours("tg").is_empty(), "{:?}", ours("tg"));
    let netns = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("tg"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(netns, 0);
    Ok(())
}
