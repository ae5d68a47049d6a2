//! What the cluster-wide view costs a page: `tracegap quality`'s report
//! over an hour (three counters summed across nodes, exactly, and the
//! gaps' exemplars) against a real Prometheus that scraped two nodes'
//! agents through the lab's load, beside one plain instant query on the
//! same Prometheus in the same run.

use std::time::{Duration, Instant, SystemTime};

use tracegap_agent::{
    export::{ExportConfig, OtlpProtocol},
    prometheus::{Prometheus as Client, report::cluster_report},
};

use super::{Durations, Row, Spread, row, wrk};
use crate::prometheus::TwoNodes;

/// Pages (and plain queries) timed.
const ASKED: usize = 30;

pub(super) fn rows(d: Durations, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let Some(bin) = crate::prometheus::binary() else {
        eprintln!("bench: no Prometheus (TRACEGAP_PROMETHEUS_BIN): no cluster-view row");
        return Ok(());
    };
    let bed = TwoNodes::start(
        &bin,
        ExportConfig {
            protocol: OtlpProtocol::Grpc,
            ..ExportConfig::default()
        },
    )?;
    let (cluster, agents, prom) = (&bed.cluster, &bed.agents, &bed.prometheus);
    // The lab's load on each node (traced), and calls without a context
    // (gaps, with their exemplars).
    for node in &cluster.nodes {
        let server = node.pod("service-b").ipv4;
        wrk(node, &format!("http://{server}:8080/items"), d.load)?;
        for _ in 0..20 {
            node.pod("client")
                .curl(&format!("http://{server}:8080/items"), &[])?;
        }
    }
    // Until Prometheus holds what the agents count (the last hops settle
    // meanwhile: counted again each try).
    let mut tries = 0;
    loop {
        let mut counted = 0.0;
        for a in agents {
            counted += a.metric("tracegap_http_requests_total")?;
        }
        let within = Duration::from_secs(3);
        match prom.wait_for_within("sum(tracegap_http_requests_total)", counted, within) {
            Ok(()) => break,
            Err(e) if tries >= 5 => return Err(e),
            Err(_) => tries += 1,
        }
    }
    let series = prom.value("count({__name__=~\"tracegap_.*\"})")?;
    let client = Client::new(&prom.url(), Duration::from_secs(10), &Default::default())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut plain, mut page) = (Vec::new(), Vec::new());
    for _ in 0..ASKED {
        let t = Instant::now();
        rt.block_on(client.query("sum(tracegap_http_requests_total)", SystemTime::now()))?;
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let r = rt.block_on(cluster_report(
            &client,
            Duration::from_secs(3600),
            SystemTime::now(),
        ))?;
        page.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(!r.edges.is_empty(), "an empty cluster report");
    }
    let (plain, page) = (Spread::of(plain), Spread::of(page));
    let ms = |v: f64| format!("{v:.1} ms");
    rows.push(row(
        &format!(
            "tracegap quality: one Trace Quality page over 1 h from Prometheus 2.42 (two nodes' agents after the lab's load, {series:.0} tracegap series; {ASKED} pages), against one instant query on it"
        ),
        plain.show(ms),
        page.show(ms),
        format!("{:+.1} ms per page", page.med - plain.med),
        "-",
        None,
    ));
    Ok(())
}
