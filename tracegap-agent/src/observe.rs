//! `tracegap observe`: watch HTTP messages on the wire, one line each.

use std::io::Write as _;

use anyhow::Context as _;
use tracegap_common::EventKind;

use crate::{
    cli::ObserveArgs,
    ebpf::Observer,
    events::{EventStream, RawEvent},
    shutdown,
};

/// One printed line: the first line of an HTTP message and where it was seen.
pub fn format_line(e: &RawEvent) -> String {
    let first = e
        .payload
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    let kind = match e.kind {
        EventKind::Request => "REQ",
        EventKind::Response => "RSP",
        EventKind::Continuation => "...",
    };
    format!(
        "{} if={} {:?} {} {} {:?}",
        e.ts_ns, e.ifindex, e.direction, e.flow, kind, first
    )
}

pub async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let mut observer = Observer::load().context("loading the eBPF programs")?;
    for iface in &args.ifaces {
        observer
            .attach(iface)
            .with_context(|| format!("attaching to {iface}"))?;
    }
    let mut stream = EventStream::new(observer.take_events()?)?;
    let stop = shutdown::signal_received();
    tokio::pin!(stop);
    let mut batch = Vec::new();
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            sig = &mut stop => {
                tracing::info!(signal = sig?, "stopping");
                break;
            }
            n = stream.next_batch(&mut batch) => {
                n?;
                let mut out = stdout.lock();
                for e in batch.drain(..) {
                    if e.kind == EventKind::Continuation {
                        continue;
                    }
                    writeln!(out, "{}", format_line(&e))?;
                    printed += 1;
                    if args.count != 0 && printed >= args.count {
                        break;
                    }
                }
                out.flush()?;
                if args.count != 0 && printed >= args.count {
                    break;
                }
            }
        }
    }
    observer.detach_all()?;
    Ok(())
}
