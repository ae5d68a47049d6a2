//! `tracegap observe`: watch HTTP messages on the wire, one line each:
//! time, flow, method, path, status, context format, trace id, sampled.

use std::{io::Write, time::Duration};

use anyhow::Context as _;

use crate::{
    cli::ObserveArgs,
    clock::{WallClock, monotonic_ns},
    ebpf::Observer,
    events::EventStream,
    http::{
        assemble::{Answer, Assembler, HEAD_TIMEOUT, Message, Pairer},
        context::{Found, Propagation},
        message::StartLine,
    },
    interfaces::{self, Interfaces},
    shutdown,
};

/// How long a request waits for its response before it is reported unanswered.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

fn context_field(p: &Propagation) -> String {
    if p.contexts.is_empty() {
        return "ctx=none".to_owned();
    }
    p.contexts
        .iter()
        .map(|c| match c {
            Found::Valid(c) => format!(
                "ctx={} trace={} parent={} sampled={}",
                c.format.as_str(),
                c.trace_id,
                c.parent_span_id,
                c.sampled.map_or("defer", |s| if s { "1" } else { "0" })
            ),
            Found::Malformed { format, reason, .. } => {
                format!("ctx={} MALFORMED({reason})", format.as_str())
            }
            Found::SamplingOnly { format, sampled } => {
                format!(
                    "ctx={} sampling-only sampled={}",
                    format.as_str(),
                    *sampled as u8
                )
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The line printed for a message; `request` is the request a response answers.
pub fn format_line(clock: &WallClock, m: &Message, request: Option<&Message>) -> String {
    let time = humantime::format_rfc3339_millis(clock.system_time(m.ts_ns));
    let trunc = if m.truncated { " TRUNCATED" } else { "" };
    match &m.head {
        Ok(head) => match &head.start {
            StartLine::Request { method, path, .. } => {
                let p = Propagation::from_head(head);
                let baggage = p
                    .baggage
                    .as_ref()
                    .map(|b| format!(" baggage={}", b.entries))
                    .unwrap_or_default();
                format!(
                    "{time} {} REQ {method} {path} {}{baggage}{trunc}",
                    m.flow,
                    context_field(&p)
                )
            }
            StartLine::Response { status, .. } => {
                let answered = request
                    .and_then(|r| match r.head.as_ref().map(|h| &h.start) {
                        Ok(StartLine::Request { method, path, .. }) => {
                            let ms = m.ts_ns.saturating_sub(r.ts_ns) as f64 / 1e6;
                            Some(format!(" for {method} {path} in {ms:.1}ms"))
                        }
                        _ => None,
                    })
                    .unwrap_or_default();
                format!("{time} {} RSP {status}{answered}{trunc}", m.flow)
            }
        },
        Err(e) => format!("{time} {} UNPARSED {e}", m.flow),
    }
}

pub async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let stop = async {
        match shutdown::signal_received().await {
            Ok(sig) => tracing::info!(signal = sig, "stopping"),
            Err(e) => tracing::error!(error = %e, "cannot wait for signals; stopping"),
        }
    };
    run_with(&args, &mut std::io::stdout(), stop).await
}

/// [`run`] writing to `out` and stopping when `stop` completes (or after
/// `--count` lines).
pub async fn run_with(
    args: &ObserveArgs,
    out: &mut (dyn Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut observer = Observer::load()
        .context("loading the eBPF programs")
        .map_err(crate::privileges::explain)?;
    let result = match Interfaces::start(&mut observer, args.interfaces.selection()).await {
        Ok(interfaces) => watch(&mut observer, interfaces, args, out, stop).await,
        Err(e) => Err(crate::privileges::explain(e.into())),
    };
    // Detach before reporting any error, so nothing stays attached.
    observer.detach_all()?;
    result
}

async fn watch(
    observer: &mut Observer,
    mut interfaces: Interfaces,
    args: &ObserveArgs,
    out: &mut (dyn Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut stream = EventStream::new(observer.take_events()?)?;
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let clock = WallClock::new();
    let (mut assembler, mut pairer) = (Assembler::default(), Pairer::<Message>::default());
    let (mut events, mut messages) = (Vec::new(), Vec::new());
    let mut printed = 0u64;
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            n = stream.next_batch(&mut events) => {
                n?;
                for e in events.drain(..) {
                    assembler.push(e, &mut messages);
                }
            }
            change = interfaces.changed() => {
                interfaces::apply(observer, change);
            }
            _ = tick.tick() => {
                let now = monotonic_ns();
                assembler.flush_before(now.saturating_sub(HEAD_TIMEOUT.as_nanos() as u64), &mut messages);
                for r in pairer.expire_before(now.saturating_sub(RESPONSE_TIMEOUT.as_nanos() as u64)) {
                    tracing::debug!(flow = %r.flow, "request unanswered");
                }
            }
        }
        for m in messages.drain(..) {
            let line = if m.is_request() {
                let line = format_line(&clock, &m, None);
                pairer.request(m.flow, m);
                line
            } else {
                match pairer.response(&m) {
                    Answer::Answered { request, skipped } => {
                        for r in skipped {
                            tracing::debug!(flow = %r.flow, seq = r.seq, "its response was not seen");
                        }
                        format_line(&clock, &m, Some(&request))
                    }
                    Answer::Interim | Answer::Orphan => format_line(&clock, &m, None),
                }
            };
            writeln!(out, "{line}")?;
            printed += 1;
            if args.count != 0 && printed >= args.count {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
    }
}
