//! `tracegap observe`: watch HTTP messages on the wire, one line each:
//! time, flow, method, path, status, context format, trace id, sampled;
//! HTTP/2 and gRPC streams too, a line as each starts and as each ends.

use std::{io::Write, time::Duration};

use anyhow::Context as _;

use crate::{
    cli::ObserveArgs,
    clock::{WallClock, monotonic_ns},
    ebpf::Observer,
    events::EventStream,
    http::{
        assemble::{Answer, Assembler, HEAD_TIMEOUT, Message, Pairer},
        context::{Found, Headers as _, Propagation},
        h2::follow::{Connections, Out},
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
            Found::Foreign {
                format,
                trace,
                sampled,
            } => format!(
                "ctx={} foreign-trace={trace} sampled={}",
                format.as_str(),
                *sampled as u8
            ),
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

/// The line printed for an HTTP/2 stream's start or end.
pub fn format_h2(clock: &WallClock, o: &Out) -> String {
    let proto = |grpc: bool| if grpc { "h2 grpc" } else { "h2" };
    match o {
        Out::Started {
            flow,
            stream,
            ts_ns,
            request,
            ..
        } => {
            let time = humantime::format_rfc3339_millis(clock.system_time(*ts_ns));
            let grpc = request
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/grpc"));
            let path = request.header(":path").unwrap_or("");
            format!(
                "{time} {flow} REQ {} {} {} stream={stream} {}",
                request.header(":method").unwrap_or("?"),
                path.split('?').next().unwrap_or(path),
                proto(grpc),
                context_field(&Propagation::from_headers(request))
            )
        }
        Out::Done { flow, exchange, .. } => {
            let time = humantime::format_rfc3339_millis(clock.system_time(exchange.end_ns));
            let ms = exchange.end_ns.saturating_sub(exchange.start_ns) as f64 / 1e6;
            let status = exchange
                .status()
                .map_or_else(|| "none".to_owned(), |s| s.to_string());
            let grpc = exchange
                .grpc_status()
                .map(|g| format!(" grpc-status={g}"))
                .unwrap_or_default();
            format!(
                "{time} {} RSP {status}{grpc} for {} {} in {ms:.1}ms {} stream={}",
                flow.reversed(),
                exchange.method().unwrap_or("?"),
                exchange.path().unwrap_or(""),
                proto(exchange.is_grpc()),
                exchange.stream
            )
        }
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
    let mut observer = Observer::load_with(crate::ebpf::LoadOptions {
        kernel_log: args.kernel_log,
        ..Default::default()
    })
    .context("loading the eBPF programs")
    .map_err(crate::privileges::explain)?;
    let kernel_log = observer.take_kernel_log().map(|r| tokio::spawn(r.drain()));
    let result = match Interfaces::start(&mut observer, args.interfaces.selection()).await {
        Ok(interfaces) => watch(&mut observer, interfaces, args, out, stop).await,
        Err(e) => Err(crate::privileges::explain(e.into())),
    };
    // Detach before reporting any error, so nothing stays attached.
    observer.detach_all()?;
    if let Some(t) = kernel_log {
        t.abort();
    }
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
    let mut h2 = Connections::default();
    let (mut events, mut messages, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    let mut printed = 0u64;
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            n = stream.next_batch(&mut events) => {
                n?;
                let mut streams = Vec::new();
                for e in events.drain(..) {
                    if e.kind == tracegap_common::EventKind::Http2 {
                        h2.push(&e, e.payload.is_empty(), &mut streams);
                    } else {
                        assembler.push(e, &mut messages);
                    }
                }
                lines.extend(streams.iter().map(|o| format_h2(&clock, o)));
            }
            change = interfaces.changed() => {
                interfaces::apply(observer, change);
            }
            _ = tick.tick() => {
                let now = monotonic_ns();
                let mut streams = Vec::new();
                h2.expire_before(now.saturating_sub(RESPONSE_TIMEOUT.as_nanos() as u64), &mut streams);
                lines.extend(streams.iter().map(|o| format_h2(&clock, o)));
                assembler.flush_before(now.saturating_sub(HEAD_TIMEOUT.as_nanos() as u64), &mut messages);
                for r in pairer.expire_before(now.saturating_sub(RESPONSE_TIMEOUT.as_nanos() as u64)) {
                    tracing::debug!(flow = %r.flow, "request unanswered");
                }
            }
        }
        for m in messages.drain(..) {
            lines.push(if m.is_request() {
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
            });
        }
        for line in lines.drain(..) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{
        h2::{
            exchange::{Exchange, Fields},
            hpack::{Block, Field},
        },
        testing::flow,
    };

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        Fields::from_block(Block {
            fields: pairs
                .iter()
                .map(|(n, v)| Field {
                    name: Some(n.as_bytes().to_vec()),
                    value: Some(v.as_bytes().to_vec()),
                })
                .collect(),
            complete: true,
        })
    }

    #[test]
    fn a_grpc_stream_is_a_line_as_it_starts_and_as_it_ends() {
        let clock = WallClock::new();
        let request = fields(&[
            (":method", "POST"),
            (":path", "/shop.Cart/AddItem?x=1"),
            ("content-type", "application/grpc"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ]);
        let started = format_h2(
            &clock,
            &Out::Started {
                flow: flow(),
                via: None,
                stream: 3,
                ts_ns: 1,
                request: request.clone(),
            },
        );
        assert!(
            started.ends_with(&format!(
                "{} REQ POST /shop.Cart/AddItem h2 grpc stream=3 ctx=w3c trace=0af7651916cd43dd8448eb211c80319c parent=b7ad6b7169203331 sampled=1",
                flow()
            )),
            "{started}"
        );
        let done = format_h2(
            &clock,
            &Out::Done {
                flow: flow(),
                via: None,
                exchange: Exchange {
                    stream: 3,
                    request,
                    response: Some(fields(&[(":status", "200")])),
                    trailers: Some(fields(&[("grpc-status", "14")])),
                    start_ns: 1_000_000,
                    end_ns: 3_500_000,
                },
            },
        );
        assert!(
            done.ends_with(&format!(
                "{} RSP 200 grpc-status=14 for POST /shop.Cart/AddItem in 2.5ms h2 grpc stream=3",
                flow().reversed()
            )),
            "{done}"
        );
    }
}
