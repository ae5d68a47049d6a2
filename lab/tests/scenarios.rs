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

fn outcome<'a>(all: &'a [Outcome], name: &str) -> Option<&'a Outcome> {
    all.iter().find(|o| o.name == name)
}

#[test]
fn every_scenario_finds_what_the_seed_lab_teaches() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let out = std::env::temp_dir().join(format!("tracegap-lab-test-{}", std::process::id()));
    let opts = Options::short(
        &scenario::ALL,
        out.clone(),
        PathBuf::from(env!("CARGO_BIN_EXE_tracegap-lab")),
    );
    let mut text = Vec::new();
    let outcomes = run(&opts, &mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let outcomes = match outcomes {
        Ok(o) => o,
        Err(e) => {
            println!("the lab failed: {e:#}\n\n{text}");
            return Err(e);
        }
    };
    // Every check is soft and the failures print first: CI shows the head
    // of a failing test's output, and the lab's text is long.
    let failures = checks(&outcomes, &text, &out);
    if !failures.is_empty() {
        println!("{} check(s) failed:", failures.len());
        for f in &failures {
            println!("  - {f}");
        }
        println!();
    }
    println!("{text}");
    let _ = std::fs::remove_dir_all(&out);
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// What the lab must have shown, as one line per check that failed.
fn checks(outcomes: &[Outcome], text: &str, out: &std::path::Path) -> Vec<String> {
    let mut failed = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failed.push(what);
        }
    };
    check(
        outcomes.len() == scenario::ALL.len(),
        format!(
            "{} of {} scenarios ran",
            outcomes.len(),
            scenario::ALL.len()
        ),
    );
    for o in outcomes {
        check(
            o.passed,
            format!(
                "{}: {}",
                o.name,
                o.verdict
                    .iter()
                    .filter(|v| v.starts_with("FAIL"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        );
    }

    // Broken propagation: the synthetic span for service-c sits in
    // service-a's trace, under service-b's own server span (read back from
    // the store: its id never crossed the wire), itself under service-a's.
    if let Some(broken) = outcome(outcomes, "broken-propagation") {
        let synthetic: Vec<_> = broken.spans.iter().filter(|s| s.synthetic()).collect();
        check(
            !synthetic.is_empty(),
            "broken-propagation: no synthetic span".into(),
        );
        for s in &synthetic {
            let parent = broken
                .spans
                .iter()
                .find(|p| p.span_id() == s.parent_span_id());
            let grandparent = parent.and_then(|p| {
                broken
                    .spans
                    .iter()
                    .find(|g| g.span_id() == p.parent_span_id())
            });
            check(
                s.service == "service-c"
                    && parent.is_some_and(|p| {
                        p.service == "service-b" && !p.synthetic() && p.trace_id() == s.trace_id()
                    })
                    && grandparent.is_some_and(|g| g.service == "service-a"),
                format!(
                    "broken-propagation: synthetic span for {} should sit under service-b's own span, under service-a's, in its trace; parent {:?}",
                    s.service,
                    parent.map(|p| &p.service)
                ),
            );
        }
        check(
            broken.trees.iter().any(|t| t.contains("* service-c")),
            "broken-propagation: no tree shows the synthetic service-c span".into(),
        );
    }

    // gRPC: the stitched call follows the RPC conventions, and service-d's
    // HTTP/1.1 -> gRPC chain is one trace: inventory's own span sits under
    // service-d's span, in service-e's trace.
    if let Some(grpc) = outcome(outcomes, "grpc") {
        let synthetic: Vec<_> = grpc.spans.iter().filter(|s| s.synthetic()).collect();
        check(
            !synthetic.is_empty()
                && synthetic.iter().all(|s| {
                    s.span.name == "lab.Inventory/Reserve"
                        && s.attr("rpc.system").as_deref() == Some("grpc")
                        && s.attr("rpc.method").as_deref() == Some("Reserve")
                        && s.attr("rpc.grpc.status_code").as_deref() == Some("0")
                }),
            format!(
                "grpc: the synthetic spans should be lab.Inventory/Reserve with the RPC attributes: {:?}",
                synthetic.iter().map(|s| &s.span.name).collect::<Vec<_>>()
            ),
        );
        let chained = grpc.spans.iter().filter(|s| {
            s.service == "inventory" && !s.synthetic() && s.span.name == "lab.Inventory/Check"
        });
        let in_chain = |s: &&tracegap_lab::store::Received| {
            let parent = grpc
                .spans
                .iter()
                .find(|p| p.span_id() == s.parent_span_id());
            parent.is_some_and(|p| p.service == "service-d" && p.trace_id() == s.trace_id())
        };
        let (n, joined) = chained.fold((0, 0), |(n, j), s| (n + 1, j + usize::from(in_chain(&s))));
        check(
            n > 0 && joined == n,
            format!(
                "grpc: {joined} of {n} of inventory's Check spans under service-d's, in its trace"
            ),
        );
    }

    // Fixed: nothing synthetic at all, and whole four-span traces.
    if let Some(fixed) = outcome(outcomes, "fixed") {
        check(
            fixed.spans.iter().all(|s| !s.synthetic()),
            "fixed: a synthetic span was exported".into(),
        );
        check(
            fixed
                .trees
                .iter()
                .any(|t| t.contains("4 spans, 0 synthetic")),
            "fixed: no whole four-span trace".into(),
        );
    }

    // Uninstrumented proxy: its span is between service-a and service-c.
    if let Some(proxy) = outcome(outcomes, "uninstrumented") {
        match proxy
            .spans
            .iter()
            .find(|s| s.synthetic() && s.service == "proxy")
        {
            None => check(false, "uninstrumented: no span for the proxy".into()),
            Some(p) => {
                let c = proxy.spans.iter().find(|s| {
                    !s.synthetic() && s.service == "service-c" && s.trace_id() == p.trace_id()
                });
                check(
                    c.is_some_and(|c| c.parent_span_id() == p.parent_span_id()),
                    "uninstrumented: service-c's span is not in the proxy's trace under the span the proxy forwarded".into(),
                );
                if let Some(c) = c {
                    check(
                        p.span.start_time_unix_nano <= c.span.start_time_unix_nano + 2_000_000,
                        format!(
                            "uninstrumented: the proxy's span starts {} ns after service-c's",
                            p.span
                                .start_time_unix_nano
                                .saturating_sub(c.span.start_time_unix_nano)
                        ),
                    );
                }
            }
        }
    }

    // Sampling: nothing exported for unsampled traces.
    if let Some(sampling) = outcome(outcomes, "sampling") {
        let other: Vec<_> = sampling
            .spans
            .iter()
            .filter(|s| s.synthetic())
            .filter_map(|s| s.gap().filter(|g| g != "sampling_inconsistent"))
            .collect();
        check(
            other.is_empty(),
            format!("sampling: synthetic spans for {other:?}"),
        );
    }

    // The report, the trees and the files a person gets.
    check(
        text.contains("verdict: as expected"),
        "no verdict says as expected".into(),
    );
    check(
        !text.contains("UNEXPECTED"),
        "a verdict says UNEXPECTED".into(),
    );
    for f in [
        "spans.otlp.json",
        "traces.jaeger.json",
        "broken-propagation.names",
    ] {
        let len = std::fs::read_to_string(out.join(f))
            .map(|b| b.len())
            .unwrap_or(0);
        check(len > 10, format!("{f} is missing or empty"));
    }
    let jaeger: serde_json::Value = std::fs::read_to_string(out.join("traces.jaeger.json"))
        .ok()
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or_default();
    let passthrough = jaeger["data"].as_array().is_some_and(|traces| {
        traces.iter().any(|t| {
            t["spans"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["tags"].as_array().is_some_and(|tags| {
                        tags.iter()
                            .any(|t| t["key"] == "tracegap.gap" && t["value"] == "passthrough")
                    })
                })
            })
        })
    });
    check(
        passthrough,
        "traces.jaeger.json has no passthrough span".into(),
    );
    // No span refers to one the file does not hold (the UI would call the
    // trace incomplete, "still being collected"); a span whose parent was
    // never recorded says why instead. Pods are processes with k8s tags.
    let traces = jaeger["data"].as_array().cloned().unwrap_or_default();
    let mut orphans = 0;
    for t in &traces {
        let spans = t["spans"].as_array().cloned().unwrap_or_default();
        let ids: Vec<&serde_json::Value> = spans.iter().map(|s| &s["spanID"]).collect();
        for s in &spans {
            let parent = &s["references"][0]["spanID"];
            check(
                parent.is_null() || ids.contains(&parent),
                format!("a reference to a span the trace does not hold: {s}"),
            );
            if s["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("is not recorded"))
            {
                orphans += 1;
            }
        }
    }
    eprintln!("{orphans} spans in the Jaeger file have an unrecorded parent");
    let pod_process = traces.iter().any(|t| {
        t["processes"].as_object().is_some_and(|p| {
            p.values().any(|p| {
                p["tags"]
                    .as_array()
                    .is_some_and(|tags| tags.iter().any(|t| t["key"] == "k8s.pod.name"))
            })
        })
    });
    check(pod_process, "no process carries k8s.pod.name".into());

    // Nothing left behind: links, namespaces, attached programs.
    let links = ours("tg");
    check(links.is_empty(), format!("links left behind: {links:?}"));
    let netns = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("tg"))
                .count()
        })
        .unwrap_or(0);
    check(netns == 0, format!("{netns} namespaces left behind"));
    failed
}
