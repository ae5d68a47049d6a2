//! The dashboard's and the rules' expressions against what a lab scenario
//! leaves in a real Prometheus (Debian's, `TRACEGAP_PROMETHEUS_BIN`, which
//! `cargo xtask test` unpacks): each runs, and each that is not an alert's
//! filter returns series. The one exception is said: no lab scenario
//! leaves TLS unread (its `tls` scenario reads it all), so the encrypted
//! edges' panel has nothing to show here.

use std::{path::PathBuf, time::SystemTime};

use tracegap_agent::prometheus::Prometheus as Client;
use tracegap_lab::{
    prometheus::{Shipped, binary, shipped_expressions},
    run::{Options, run_keeping},
};

const NOT_IN_THE_LAB: &str = "tracegap_tls_unread_connections_total";

#[test]
fn every_dashboard_and_rule_expression_returns_series_after_a_lab_scenario() -> anyhow::Result<()> {
    let test = "every_dashboard_and_rule_expression_returns_series_after_a_lab_scenario";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: needs root");
        return Ok(());
    }
    let Some(bin) = binary() else {
        eprintln!("SKIPPED {test}: TRACEGAP_PROMETHEUS_BIN unset (cargo xtask test sets it)");
        return Ok(());
    };
    let out = std::env::temp_dir().join(format!("tracegap-prometheus-test-{}", std::process::id()));
    let opts = Options {
        prometheus: Some(bin),
        ..Options::short(
            &["broken-propagation"],
            out.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_tracegap-lab")),
        )
    };
    let mut text = Vec::new();
    let done = run_keeping(&opts, &mut text);
    let _ = std::fs::remove_dir_all(&out);
    let done = done.map_err(|e| e.context(String::from_utf8_lossy(&text).into_owned()))?;
    let text = text.clone();
    let prom = done
        .prometheus
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the run started no Prometheus"))?;
    let client = Client::new(
        &prom.url(),
        std::time::Duration::from_secs(10),
        &Default::default(),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let exprs = shipped_expressions(&deploy)?;
    let mut empty = Vec::new();
    for Shipped { what, expr, filter } in &exprs {
        let found = rt
            .block_on(client.query(expr, SystemTime::now()))
            .map_err(|e| anyhow::anyhow!("{what}: {expr}: {e}"))?;
        if found.is_empty() && !filter && !expr.contains(NOT_IN_THE_LAB) {
            empty.push(format!("{what}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "no series:\n{}\nthe run:\n{}",
        empty.join("\n"),
        String::from_utf8_lossy(&text)
    );
    // The callee-span outcomes are there: the scenario reads traces back.
    // (Over a range: the agents are gone, their series marked stale.)
    let callee = rt.block_on(client.query(
        "sum by (outcome) (max_over_time(tracegap_callee_spans_total[1h]))",
        SystemTime::now(),
    ))?;
    assert!(!callee.is_empty(), "no callee-span outcomes");
    Ok(())
}
