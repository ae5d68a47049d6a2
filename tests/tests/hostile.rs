//! Hostile and odd input on the wire, between two pods, through the real
//! kernel programs: what the kernel copies, assembled and paired as
//! `tracegap observe` and the agent do. No body becomes a request, no
//! response is paired with another request (the test server names the
//! request it answers in `X-Request-Path`), and the agent keeps running.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use clap::Parser as _;

use tracegap_agent::{
    agent::AgentConfig,
    cli::{Cli, Command},
    clock::WallClock,
    ebpf::KernelLog,
    events::RawEvent,
    gap::span::ExportMode,
    http::{
        assemble::{Answer, Assembler, Message, Pairer},
        context::{Found, Propagation},
        message::StartLine,
    },
    observe::format_line,
    report::Report,
};
use tracegap_tests::{
    Node, Pod,
    agent::Agent,
    agent_config, collect_events,
    http::{HttpServer, read_response},
    otlp::Receiver,
    privileged,
};

/// The trace id a forged request in a body carries.
const EVIL_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const EVIL: &[u8] = b"GET /evil HTTP/1.1\r\nHost: victim\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const PORT: u16 = 8080;
/// Where the server pod answers before it is asked.
const UNSOLICITED_PORT: u16 = 8081;

struct Pods {
    node: Node,
    _server: HttpServer,
}

fn pods() -> anyhow::Result<Pods> {
    let node = Node::new(&["client", "server"])?;
    let server = HttpServer::start(node.pod("server"), PORT)?;
    Ok(Pods {
        node,
        _server: server,
    })
}

fn to(pods: &Pods, port: u16, v6: bool) -> SocketAddr {
    SocketAddr::new(pods.node.pod("server").addr(v6), port)
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// Writes each piece as its own segment: NODELAY, and a pause so that
/// nothing coalesces them.
fn write_apart(c: &mut TcpStream, pieces: &[&[u8]]) -> anyhow::Result<()> {
    for p in pieces {
        c.write_all(p)?;
        std::thread::sleep(Duration::from_millis(30));
    }
    Ok(())
}

/// Runs `f` in the client pod.
fn client<T: Send + 'static>(
    pod: &Pod,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    pod.spawn(f)?
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

// ---- The cases: each sends its traffic from the client pod. ----

/// An upload whose body, sent as its own segment, is a request with trace
/// context; then a real request on the same connection.
fn forged_body_content_length(addr: SocketAddr) -> anyhow::Result<()> {
    let mut c = connect(addr)?;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: {}\r\n\r\n",
        EVIL.len()
    );
    write_apart(&mut c, &[head.as_bytes(), EVIL])?;
    let mut buf = Vec::new();
    read_response(&mut c, &mut buf)?;
    c.write_all(b"GET /after HTTP/1.1\r\nHost: s\r\n\r\n")?;
    read_response(&mut c, &mut buf)?;
    Ok(())
}

/// The same in a chunked body, the forged request its own chunk's segment.
fn forged_body_chunked(addr: SocketAddr) -> anyhow::Result<()> {
    let mut c = connect(addr)?;
    let size = format!("{:x}\r\n", EVIL.len());
    write_apart(
        &mut c,
        &[
            b"POST /upload-chunked HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n",
            size.as_bytes(),
            EVIL,
            b"\r\n0\r\n\r\n",
        ],
    )?;
    let mut buf = Vec::new();
    read_response(&mut c, &mut buf)?;
    c.write_all(b"GET /after-chunked HTTP/1.1\r\nHost: s\r\n\r\n")?;
    read_response(&mut c, &mut buf)?;
    Ok(())
}

/// A request written one byte per segment.
fn bytewise(addr: SocketAddr, path: &'static str) -> anyhow::Result<()> {
    let mut c = connect(addr)?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: s\r\ntraceparent: {TP}\r\nContent-Length: 2\r\n\r\nhi"
    );
    for b in req.as_bytes() {
        c.write_all(&[*b])?;
        std::thread::sleep(Duration::from_millis(2));
    }
    read_response(&mut c, &mut Vec::new())?;
    Ok(())
}

/// Bytes that start like a request and then are random, on a connection
/// of their own (the server answers nothing: no blank line).
fn binary_starting_with_get(addr: SocketAddr) -> anyhow::Result<()> {
    let mut c = connect(addr)?;
    let mut junk = b"GET ".to_vec();
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        junk.push(x as u8);
    }
    c.write_all(&junk)?;
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// A 64 KiB header block with its trace context at the end, then a normal
/// request on the same connection.
fn huge_head(addr: SocketAddr) -> anyhow::Result<()> {
    let mut c = connect(addr)?;
    let pad = "a".repeat(64 * 1024);
    let req =
        format!("GET /bighead HTTP/1.1\r\nHost: s\r\nx-pad: {pad}\r\ntraceparent: {TP}\r\n\r\n");
    c.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    read_response(&mut c, &mut buf)?;
    c.write_all(b"GET /after-big HTTP/1.1\r\nHost: s\r\n\r\n")?;
    read_response(&mut c, &mut buf)?;
    Ok(())
}

fn odd_heads(addr: SocketAddr) -> anyhow::Result<()> {
    let mut c = connect(addr)?;
    let mut buf = Vec::new();
    let many: String = (0..500).map(|i| format!("x-h-{i}: {i}\r\n")).collect();
    let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let requests = [
        format!("GET /many-headers HTTP/1.1\r\nHost: s\r\n{many}traceparent: {TP}\r\n\r\n").into_bytes(),
        format!("GET /two-traceparents HTTP/1.1\r\nHost: s\r\ntraceparent: {TP}\r\ntraceparent: {other}\r\n\r\n").into_bytes(),
        [
            b"GET /odd-bytes HTTP/1.1\r\nHost: s\r\nx-bin: a\0b\xff\xfe\xc3\x28\r\ntraceparent: ".as_slice(),
            TP.as_bytes(),
            b"\r\n\r\n",
        ]
        .concat(),
    ];
    for r in requests {
        c.write_all(&r)?;
        read_response(&mut c, &mut buf)?;
    }
    Ok(())
}

/// A connection closed in the middle of a request's head.
fn closed_mid_head(addr: SocketAddr) -> anyhow::Result<()> {
    let mut c = connect(addr)?;
    c.write_all(b"GET /cut HTTP/1.1\r\nHost: s\r\nx-partial: abc")?;
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// A response that answers no request: the server pod speaks first.
fn unsolicited(pods: &Pods, v6: bool) -> anyhow::Result<()> {
    let listener = pods
        .node
        .pod("server")
        .spawn(move || -> anyhow::Result<()> {
            let l = TcpListener::bind(SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                UNSOLICITED_PORT,
            )))?;
            let (mut c, _) = l.accept()?;
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Path: none\r\n\r\nhi")?;
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        })?;
    std::thread::sleep(Duration::from_millis(100));
    let addr = to(pods, UNSOLICITED_PORT, v6);
    client(pods.node.pod("client"), move || {
        let mut c = connect(addr)?;
        read_response(&mut c, &mut Vec::new())?;
        Ok(())
    })?;
    listener
        .join()
        .map_err(|_| anyhow::anyhow!("listener panicked"))??;
    Ok(())
}

// ---- What user space makes of the events. ----

struct Seen {
    /// Every message, as `tracegap observe` prints it.
    lines: Vec<String>,
    requests: Vec<Message>,
    /// (request path, the path the server says it answered).
    pairs: Vec<(String, String)>,
    /// Responses paired with no request.
    orphans: usize,
}

fn path(m: &Message) -> String {
    match m.head.as_ref().map(|h| &h.start) {
        Ok(StartLine::Request { path, .. }) => path.to_string(),
        _ => String::new(),
    }
}

fn read(events: Vec<RawEvent>) -> Seen {
    let clock = WallClock::new();
    let (mut a, mut p) = (Assembler::default(), Pairer::<Message>::default());
    let mut messages = Vec::new();
    for e in events {
        a.push(e, &mut messages);
    }
    a.flush_before(u64::MAX, &mut messages);
    let mut seen = Seen {
        lines: Vec::new(),
        requests: Vec::new(),
        pairs: Vec::new(),
        orphans: 0,
    };
    for m in messages {
        if m.is_request() {
            seen.lines.push(format_line(&clock, &m, None));
            seen.requests.push(m.clone());
            p.request(m.flow, m);
            continue;
        }
        match p.response(&m) {
            Answer::Answered { request, .. } => {
                seen.lines.push(format_line(&clock, &m, Some(&request)));
                let echoed = m
                    .head
                    .as_ref()
                    .ok()
                    .and_then(|h| h.header("x-request-path"))
                    .unwrap_or_default()
                    .to_owned();
                // A response head cut short by the copy may lack the
                // header: its pairing cannot be checked, only counted.
                if !m.truncated {
                    seen.pairs.push((path(&request), echoed));
                }
            }
            Answer::Interim | Answer::Orphan => {
                seen.lines.push(format_line(&clock, &m, None));
                if !m.is_interim() {
                    seen.orphans += 1;
                }
            }
        }
    }
    seen
}

/// Loads and attaches the programs on both pods' veths, runs `traffic`,
/// and reads what the kernel sent until `enough` responses came.
fn observe(
    pods: &Pods,
    enough: usize,
    traffic: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Seen> {
    let mut observer = tracegap_agent::ebpf::Observer::load()?;
    observer.attach(&pods.node.pod("client").host_if)?;
    observer.attach(&pods.node.pod("server").host_if)?;
    let mut ring = observer.take_events()?;
    traffic()?;
    let events = collect_events(&mut ring, Duration::from_secs(10), |ev| {
        ev.iter()
            .filter(|e| e.kind == tracegap_common::EventKind::Response)
            .count()
            >= enough
    });
    observer.detach_all()?;
    Ok(read(events))
}

fn assert_never_mispaired(seen: &Seen) {
    for (req, echoed) in &seen.pairs {
        assert_eq!(
            req, echoed,
            "a response was paired with another request: {:#?}",
            seen.lines
        );
    }
    assert!(
        seen.lines
            .iter()
            .all(|l| !l.contains("/evil") && !l.contains(EVIL_TRACE)),
        "a body was read as a request: {:#?}",
        seen.lines
    );
}

fn paths(seen: &Seen) -> Vec<String> {
    seen.requests.iter().map(path).collect()
}

#[test]
fn a_body_is_never_a_request_content_length_chunked_or_binary() -> anyhow::Result<()> {
    if !privileged("a_body_is_never_a_request_content_length_chunked_or_binary") {
        return Ok(());
    }
    let pods = pods()?;
    let (v4, v6) = (to(&pods, PORT, false), to(&pods, PORT, true));
    let pod = pods.node.pod("client");
    let seen = observe(&pods, 4, || {
        client(pod, move || {
            forged_body_content_length(v4)?;
            forged_body_chunked(v6)?;
            binary_starting_with_get(v4)
        })
    })?;
    assert_never_mispaired(&seen);
    assert_eq!(
        paths(&seen),
        ["/upload", "/after", "/upload-chunked", "/after-chunked"],
        "{:#?}",
        seen.lines
    );
    assert_eq!(seen.pairs.len(), 4, "{:#?}", seen.lines);
    Ok(())
}

#[test]
fn a_request_written_a_byte_at_a_time_is_one_request_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    if !privileged("a_request_written_a_byte_at_a_time_is_one_request_over_ipv4_and_ipv6") {
        return Ok(());
    }
    let pods = pods()?;
    let (v4, v6) = (to(&pods, PORT, false), to(&pods, PORT, true));
    let pod = pods.node.pod("client");
    let seen = observe(&pods, 2, || {
        client(pod, move || {
            bytewise(v4, "/bytewise-v4")?;
            bytewise(v6, "/bytewise-v6")
        })
    })?;
    assert_never_mispaired(&seen);
    assert_eq!(
        paths(&seen),
        ["/bytewise-v4", "/bytewise-v6"],
        "{:#?}",
        seen.lines
    );
    assert_eq!(seen.pairs.len(), 2, "{:#?}", seen.lines);
    for r in &seen.requests {
        assert!(!r.truncated);
        let p = Propagation::from_head(r.head.as_ref().expect("a head"));
        assert!(
            matches!(&p.contexts[..], [Found::Valid(c)] if c.trace_id == "0af7651916cd43dd8448eb211c80319c")
        );
    }
    Ok(())
}

#[test]
fn a_thousand_pipelined_requests_are_never_paired_wrongly() -> anyhow::Result<()> {
    if !privileged("a_thousand_pipelined_requests_are_never_paired_wrongly") {
        return Ok(());
    }
    let pods = pods()?;
    let addr = to(&pods, PORT, false);
    let pod = pods.node.pod("client");
    let seen = observe(&pods, 1000, || {
        client(pod, move || {
            let mut c = connect(addr)?;
            let all: String = (0..1000)
                .map(|i| format!("GET /p/{i} HTTP/1.1\r\nHost: s\r\n\r\n"))
                .collect();
            c.write_all(all.as_bytes())?;
            let mut buf = Vec::new();
            for _ in 0..1000 {
                read_response(&mut c, &mut buf)?;
            }
            Ok(())
        })
    })?;
    assert_never_mispaired(&seen);
    // What the kernel copies of a 30 KB burst is bounded (the first
    // segments' header budget); what is read is in order and paired right.
    let ps = paths(&seen);
    assert!(!ps.is_empty());
    let numbers: Vec<usize> = ps
        .iter()
        .filter_map(|p| p.strip_prefix("/p/")?.parse().ok())
        .collect();
    assert_eq!(numbers.len(), ps.len());
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    eprintln!(
        "1000 pipelined: {} requests read, {} paired",
        ps.len(),
        seen.pairs.len()
    );
    Ok(())
}

#[test]
fn huge_and_odd_heads_a_head_cut_by_close_and_a_response_nobody_asked_for() -> anyhow::Result<()> {
    if !privileged("huge_and_odd_heads_a_head_cut_by_close_and_a_response_nobody_asked_for") {
        return Ok(());
    }
    let pods = pods()?;
    let (v4, v6) = (to(&pods, PORT, false), to(&pods, PORT, true));
    let pod = pods.node.pod("client");
    let seen = observe(&pods, 6, || {
        client(pod, move || {
            huge_head(v4)?;
            odd_heads(v6)?;
            closed_mid_head(v4)
        })?;
        unsolicited(&pods, false)
    })?;
    assert_never_mispaired(&seen);
    assert_eq!(
        paths(&seen),
        [
            "/bighead",
            "/after-big",
            "/many-headers",
            "/two-traceparents",
            "/odd-bytes",
            "/cut"
        ],
        "{:#?}",
        seen.lines
    );
    assert_eq!(seen.pairs.len(), 5, "{:#?}", seen.lines);
    assert_eq!(
        seen.orphans, 1,
        "the unsolicited response: {:#?}",
        seen.lines
    );
    let by_path = |p: &str| seen.requests.iter().find(|m| path(m) == p).expect(p);
    // Past the kernel's budget: what was copied, marked truncated.
    assert!(by_path("/bighead").truncated);
    assert!(by_path("/cut").truncated);
    let many = by_path("/many-headers").head.as_ref().expect("head");
    assert_eq!(many.header_count() + many.dropped_headers, 502);
    let two = Propagation::from_head(by_path("/two-traceparents").head.as_ref().expect("head"));
    assert!(
        matches!(&two.contexts[..], [Found::Malformed { .. }]),
        "{two:?}"
    );
    let odd = Propagation::from_head(by_path("/odd-bytes").head.as_ref().expect("head"));
    assert!(matches!(&odd.contexts[..], [Found::Valid(_)]), "{odd:?}");
    Ok(())
}

#[test]
fn the_agent_keeps_running_and_reports_no_forged_hop() -> anyhow::Result<()> {
    if !privileged("the_agent_keeps_running_and_reports_no_forged_hop") {
        return Ok(());
    }
    let pods = pods()?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let agent = Agent::start(AgentConfig {
        // A span for every hop: a forged one would show.
        export_mode: ExportMode::All,
        export_unsampled: true,
        response_timeout: Duration::from_secs(1),
        ..agent_config(&pods.node, &receiver)
    })?;
    let (v4, v6) = (to(&pods, PORT, false), to(&pods, PORT, true));
    client(pods.node.pod("client"), move || {
        forged_body_content_length(v4)?;
        forged_body_chunked(v6)?;
        bytewise(v4, "/bytewise")?;
        binary_starting_with_get(v6)?;
        huge_head(v4)?;
        odd_heads(v6)?;
        closed_mid_head(v4)
    })?;
    unsolicited(&pods, true)?;
    // 2 + 2 + 1 + 2 + 3 answered, and /cut given up after the timeout.
    let expected = 11;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let report = loop {
        let (_, body) = agent.get_report()?;
        let report: Report = serde_json::from_str(&body)?;
        let hops: u64 = report.edges.iter().map(|e| e.requests).sum();
        if hops >= expected || std::time::Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let hops: u64 = report.edges.iter().map(|e| e.requests).sum();
    assert_eq!(hops, expected, "{report:#?}");
    assert_eq!(agent.get("/healthz")?.0, 200);
    let body = agent.get("/metrics")?.1;
    assert!(
        agent.metric("tracegap_http_starts_ignored_total{reason=\"inside_body\"}")? >= 1.0,
        "{body}"
    );
    assert!(
        agent.metric("tracegap_http_unanswered_requests_total")? >= 1.0,
        "{body}"
    );
    // The response nobody asked for made no hop, and is counted.
    assert!(
        agent.metric("tracegap_http_messages_unpaired_total{reason=\"orphan_response\"}")? >= 1.0,
        "{body}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let spans = receiver.spans();
    assert!(spans.len() as u64 >= expected - 1, "{} spans", spans.len());
    assert!(
        spans.iter().all(|s| s.trace_id() != EVIL_TRACE),
        "a span joined the forged trace"
    );
    assert!(!serde_json::to_string(&report)?.contains(EVIL_TRACE));
    Ok(())
}

#[test]
fn a_flood_of_metrics_scrapes_costs_the_event_pipeline_nothing() -> anyhow::Result<()> {
    if !privileged("a_flood_of_metrics_scrapes_costs_the_event_pipeline_nothing") {
        return Ok(());
    }
    const FLOOD: Duration = Duration::from_secs(10);
    const REQUESTS: usize = 20_000;
    let pods = pods()?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let agent = Agent::start(agent_config(&pods.node, &receiver))?;
    let listen = agent.listen;
    // Eight scrapers as fast as they can (from the test's own namespace:
    // the agent's port, as a pod on the node reaches it).
    let flood = tracegap_lab::http::MetricsFlood::start(listen, 8);
    // Meanwhile HTTP traffic between the pods, bounded in count and time.
    let v4 = to(&pods, PORT, false);
    let made = client(pods.node.pod("client"), move || {
        let started = std::time::Instant::now();
        let mut made = 0;
        let mut c = connect(v4)?;
        let mut buf = Vec::new();
        while made < REQUESTS && started.elapsed() < FLOOD {
            write!(
                c,
                "GET /flooded/{made} HTTP/1.1\r\nHost: s\r\ntraceparent: {TP}\r\n\r\n"
            )?;
            read_response(&mut c, &mut buf)?;
            made += 1;
        }
        Ok(made)
    })?;
    let (ok, shed) = flood.stop();
    println!("{made} requests under {ok} scrapes answered and {shed} shed (503)");
    assert!(ok > 0 && made > 100, "{ok} scrapes, {made} requests");
    // Every request read: none lost to a full ring buffer, every hop
    // counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let counted = loop {
        let n = agent.metric("tracegap_http_requests_total")?;
        if n >= made as f64 || std::time::Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(counted, made as f64, "hops counted of {made} made");
    assert_eq!(agent.metric("tracegap_ringbuf_lost_events_total")?, 0.0);
    Ok(())
}

/// The agent's log as `tracegap run --kernel-log debug` sets it up (its
/// filter from the command line), written here instead of to stderr: the
/// process's one global subscriber, so the agent's runtime threads log to
/// it too.
fn agent_log() -> anyhow::Result<Arc<Mutex<Vec<u8>>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let cli = Cli::try_parse_from(["tracegap", "run", "--kernel-log", "debug"])?;
    Ok(LOG
        .get_or_init(|| {
            let log = Arc::new(Mutex::new(Vec::new()));
            let to = log.clone();
            let _ = tracing_subscriber::fmt()
                .with_env_filter(cli.log_filter())
                .with_ansi(false)
                .with_writer(move || Capture(to.clone()))
                .try_init();
            log
        })
        .clone())
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut log) = self.0.lock() {
            log.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lines logged under the kernel's target since the log was cleared.
fn kernel_lines(log: &Mutex<Vec<u8>>) -> Vec<String> {
    let text = log.lock().map(|l| l.clone()).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.contains(" kernel: "))
        .map(str::to_owned)
        .collect()
}

/// An HTTP/2 frame: 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Where an HTTP/2 connection open before the agent started goes on: a
/// sink that reads whatever its clients write, for as long as they write.
const H2_PORT: u16 = 8083;

/// The three rare things the kernel logs, each on its own connection from
/// the client pod; returns the client's port of each: a head past the
/// copy budget, an HTTP/2 connection (joined: no preface) given up at a
/// frame of a type no sender writes, and one whose HEADERS frame starts
/// with a dynamic-table entry, so its side cannot be told between two pods
/// of the node.
fn diagnosed(http: SocketAddr, h2: SocketAddr) -> anyhow::Result<[u16; 3]> {
    let mut c = connect(http)?;
    let budget_port = c.local_addr()?.port();
    let pad = "a".repeat(40 * 1024);
    write!(
        c,
        "GET /past-budget HTTP/1.1\r\nHost: s\r\nx-pad: {pad}\r\n\r\n"
    )?;
    read_response(&mut c, &mut Vec::new())?;
    // :method POST, :scheme http, :path /lost: a client's block.
    let mut block = vec![0x83, 0x86, 0x04, 0x05];
    block.extend_from_slice(b"/lost");
    let mut lost = connect(h2)?;
    let lost_port = lost.local_addr()?.port();
    write_apart(
        &mut lost,
        &[
            &h2_frame(0x1, 0x4, 1, &block),
            &h2_frame(0xfa, 0, 0, &[0; 4]),
        ],
    )?;
    let mut unknown = connect(h2)?;
    let unknown_port = unknown.local_addr()?.port();
    let dynamic = [0xbe, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7];
    write_apart(&mut unknown, &[&h2_frame(0x1, 0x4, 1, &dynamic)])?;
    Ok([budget_port, lost_port, unknown_port])
}

#[test]
fn with_kernel_log_debug_the_agent_log_says_what_the_kernel_gave_up_on_and_which_flow()
-> anyhow::Result<()> {
    if !privileged(
        "with_kernel_log_debug_the_agent_log_says_what_the_kernel_gave_up_on_and_which_flow",
    ) {
        return Ok(());
    }
    let log = agent_log()?;
    // The level the command line gives the agent.
    let Command::Run(args) =
        Cli::try_parse_from(["tracegap", "run", "--kernel-log", "debug"])?.command
    else {
        anyhow::bail!("not the run command");
    };
    let debug = args.config()?.kernel_log;
    let pods = pods()?;
    let server = pods.node.pod("server");
    let sink = server.spawn(move || -> std::io::Result<()> {
        use std::io::Read as _;
        let listener = TcpListener::bind(("0.0.0.0", H2_PORT))?;
        listener.set_nonblocking(false)?;
        // Two connections per round, two rounds.
        for _ in 0..4 {
            let (mut c, _) = listener.accept()?;
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = [0u8; 4096];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
        Ok(())
    })?;
    let receiver = Receiver::start(std::net::Ipv4Addr::LOCALHOST.into())?;
    let http = to(&pods, PORT, false);
    let h2 = SocketAddr::new(server.addr(false), H2_PORT);
    let metric = |agent: &Agent, counter: &str| {
        agent.metric(&format!(
            "tracegap_kernel_events_total{{counter=\"{counter}\"}}"
        ))
    };
    for kernel_log in [debug, KernelLog::Off] {
        if let Ok(mut l) = log.lock() {
            l.clear();
        }
        let agent = Agent::start(AgentConfig {
            kernel_log,
            ..agent_config(&pods.node, &receiver)
        })?;
        let [budget, lost, unknown] = client(pods.node.pod("client"), move || diagnosed(http, h2))?;
        // Counted whether logged or not.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metric(&agent, "h2_lost")? < 1.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(metric(&agent, "h2_lost")?, 1.0, "{kernel_log:?}");
        assert!(metric(&agent, "header_budget_exhausted")? >= 1.0);
        let flow = |port: u16, to: &SocketAddr| {
            format!(
                "::ffff:{}:{port} -> ::ffff:{}:{}",
                pods.node.pod("client").ipv4,
                to.ip(),
                to.port()
            )
        };
        let wanted = [
            (flow(budget, &http), "past the 32768-byte copy budget"),
            (
                flow(lost, &h2),
                "no longer followed: a frame no sender writes",
            ),
            (
                flow(unknown, &h2),
                "not joined: its HEADERS frame's side cannot be told",
            ),
        ];
        if kernel_log == KernelLog::Off {
            // Nothing of the kernel's: the calls are not even in the
            // programs the kernel verified.
            std::thread::sleep(Duration::from_millis(500));
            let lines = kernel_lines(&log);
            assert!(lines.is_empty(), "logged while off: {lines:#?}");
            assert_eq!(metric(&agent, "diagnostics_logged")?, 0.0);
            continue;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let missing = loop {
            let lines = kernel_lines(&log);
            let missing: Vec<_> = wanted
                .iter()
                .filter(|(flow, what)| !lines.iter().any(|l| l.contains(flow) && l.contains(what)))
                .collect();
            if missing.is_empty() || std::time::Instant::now() > deadline {
                break (missing, lines);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            missing.0.is_empty(),
            "not in the agent's log: {:#?}\nits kernel lines: {:#?}",
            missing.0,
            missing.1
        );
        // What the programs logged, counted as they logged it.
        assert!(metric(&agent, "diagnostics_logged")? >= wanted.len() as f64);
        agent.stop()?;
    }
    let _ = sink.join();
    Ok(())
}
