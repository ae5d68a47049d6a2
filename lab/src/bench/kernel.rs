//! `cargo xtask bench --kernel`: the kernel programs alone, run by the
//! kernel on crafted packets (`BPF_PROG_TEST_RUN`), with no network,
//! scheduler or other program in the figure. Every variant runs on the same
//! packets in the same run, round after round: the empty program (the
//! floor: what running any program costs), tracegap's programs whole, and
//! tracegap's programs with one step switched off
//! ([`tracegap_common::ablate`]), so the difference between two columns is
//! what that step costs.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, bail};
use aya::{
    maps::{MapData, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use tracegap_agent::ebpf::{
    Counters, EGRESS_PROGRAM, INGRESS_PROGRAM, KernelLog, LoadOptions, Observer, kernel_log,
};
use tracegap_common::ablate;

use super::{Floor, Spread};

/// Runs per `BPF_PROG_TEST_RUN` call: few enough that the events they
/// send (up to 2 KiB each) fit the ring buffer (4 MiB) until it is drained.
const BATCH: u32 = 1_000;

/// A packet and the program that sees it.
struct Case {
    what: &'static str,
    program: &'static str,
    packet: Vec<u8>,
    /// Runs per `BPF_PROG_TEST_RUN` call.
    repeat: u32,
}

/// Runs per call of a case that logs (when logging): the records of one
/// call must fit aya-log's ring (128 KiB, about 300 of these), drained
/// between calls, or the rest would be measured failing to reserve.
pub const LOGGING_BATCH: u32 = 200;

/// What runs: the empty program, or tracegap's with these steps off and
/// its kernel log at this level.
#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    ablate: Option<u32>,
    kernel_log: KernelLog,
}

impl Variant {
    const fn new(name: &'static str, ablate: Option<u32>) -> Self {
        Self {
            name,
            ablate,
            kernel_log: KernelLog::Off,
        }
    }
}

const VARIANTS: [Variant; 7] = [
    Variant::new("empty program", None),
    Variant::new("tracegap", Some(0)),
    // What the diagnostics cost when on (`--kernel-log debug`): nothing
    // on a packet read as usual, a record where one is logged.
    Variant {
        kernel_log: KernelLog::Debug,
        ..Variant::new("tracegap, kernel log on", Some(0))
    },
    Variant::new("stop after parse", Some(ablate::AFTER_PARSE)),
    Variant::new("stop after classify", Some(ablate::AFTER_CLASSIFY)),
    Variant::new("no flow maps", Some(ablate::FLOW_MAPS)),
    Variant::new("no ring buffer", Some(ablate::RING)),
];

const CLIENT: [u8; 4] = [10, 240, 0, 2];
const SERVER: [u8; 4] = [10, 240, 0, 3];

/// Ethernet + IPv4 (20 bytes) + TCP (20 bytes, PSH|ACK) + payload.
fn packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(54 + payload.len());
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let tot_len = (40 + payload.len()) as u16;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&tot_len.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&0x1000_0000u32.to_be_bytes());
    p.extend_from_slice(&0x2000_0000u32.to_be_bytes());
    p.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    p
}

fn cases() -> Vec<Case> {
    let get = "GET /api/items/42 HTTP/1.1\r\nHost: shop:8080\r\nUser-Agent: bench/1.0\r\n\
               traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
               Accept: */*\r\n\r\n";
    let body = format!("{{\"items\":[{}]}}", vec!["42"; 60].join(","));
    let post = format!(
        "POST /api/orders HTTP/1.1\r\nHost: shop:8080\r\nContent-Type: application/json\r\n\
         traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut response =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1300\r\n\r\n"
            .to_vec();
    response.resize(1448, b'x');
    let request = packet(CLIENT, SERVER, 40000, 8080, get.as_bytes());
    vec![
        Case {
            what: "GET request (205 B) leaving a pod: copied",
            program: INGRESS_PROGRAM,
            packet: request.clone(),
            repeat: BATCH,
        },
        Case {
            what: "POST with its body (393 B) leaving a pod: copied, followed",
            program: INGRESS_PROGRAM,
            packet: packet(CLIENT, SERVER, 40001, 8080, post.as_bytes()),
            repeat: BATCH,
        },
        Case {
            what: "response, head and body (1448 B), leaving a pod: copied",
            program: INGRESS_PROGRAM,
            packet: packet(SERVER, CLIENT, 8080, 40000, &response),
            repeat: BATCH,
        },
        Case {
            what: "the GET entering the server pod: already copied, skipped",
            program: EGRESS_PROGRAM,
            packet: request,
            repeat: BATCH,
        },
        Case {
            what: "HTTP/2 HEADERS of a connection open before, its side unknown, entering a pod \
                   from a local one: left alone (a diagnostic, when logging)",
            program: EGRESS_PROGRAM,
            packet: packet(CLIENT, SERVER, 40003, 50051, &unknown_side_headers()),
            repeat: LOGGING_BATCH,
        },
        Case {
            what: "bulk segment, not HTTP (1448 B)",
            program: INGRESS_PROGRAM,
            packet: packet(CLIENT, SERVER, 40002, 5201, &[0x5a; 1448]),
            repeat: BATCH,
        },
        Case {
            what: "ACK without payload",
            program: INGRESS_PROGRAM,
            packet: packet(SERVER, CLIENT, 8080, 40000, &[]),
            repeat: BATCH,
        },
    ]
}

/// A HEADERS frame whose block starts with an entry of the sender's
/// dynamic table (index 62 on): which side sent it cannot be told.
fn unknown_side_headers() -> Vec<u8> {
    let block = [
        0xbe, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9,
    ];
    let mut f = vec![0, 0, block.len() as u8, 0x1, 0x4, 0, 0, 0, 1];
    f.extend_from_slice(&block);
    f
}

/// A loaded variant: tracegap's programs (with their ring buffer, drained
/// between batches) or the empty one.
enum Loaded {
    Tracegap {
        observer: Box<Observer>,
        ring: RingBuf<MapData>,
        /// The programs' log, drained as the ring is (None: off).
        log: Option<Box<kernel_log::Reader>>,
    },
    Floor(Floor),
}

impl Loaded {
    fn load(v: Variant, floor: &[u8]) -> anyhow::Result<Self> {
        Ok(match v.ablate {
            None => Self::Floor(Floor::load(floor)?),
            Some(bits) => {
                let mut observer = Box::new(
                    Observer::load_with(LoadOptions {
                        thread_evidence: false,
                        kernel_log: v.kernel_log,
                        tls_plaintext: false,
                        ablate: bits,
                    })
                    .with_context(|| format!("loading the variant {:?}", v.name))?,
                );
                let ring = observer.take_events()?;
                let log = observer.take_kernel_log().map(Box::new);
                Self::Tracegap {
                    observer,
                    ring,
                    log,
                }
            }
        })
    }

    fn program(&self, name: &'static str) -> anyhow::Result<&SchedClassifier> {
        Ok(match self {
            Self::Tracegap { observer, .. } => observer.classifier(name)?,
            Self::Floor(f) => f.program()?,
        })
    }

    /// Mean ns per run of `case`, over `batches` batches.
    fn run(&mut self, case: &Case, batches: u32) -> anyhow::Result<f64> {
        let mut total = Duration::ZERO;
        for _ in 0..batches {
            let r = self.program(case.program)?.test_run(TestRunOptions {
                data_in: Some(&case.packet),
                repeat: case.repeat,
                ..TestRunOptions::default()
            })?;
            // TC_ACT_UNSPEC: the programs never decide a packet's fate.
            if r.return_value != u32::MAX {
                bail!(
                    "{}: returned {}, not TC_ACT_UNSPEC",
                    case.what,
                    r.return_value
                );
            }
            total += r.duration;
            if let Self::Tracegap { ring, log, .. } = self {
                while ring.next().is_some() {}
                if let Some(log) = log {
                    log.flush();
                }
            }
        }
        Ok(total.as_nanos() as f64 / f64::from(batches))
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        Ok(match self {
            Self::Tracegap { observer, .. } => observer.counters()?,
            Self::Floor(_) => Counters::default(),
        })
    }
}

/// What the whole programs did is what the cases say they do: requests
/// and responses copied, a second sighting skipped, nothing dropped.
fn verify(whole: &Counters) -> anyhow::Result<()> {
    for (n, what) in [
        (whole.http_requests, "requests"),
        (whole.http_responses, "responses"),
        (whole.second_sightings_skipped, "second sightings"),
    ] {
        if n == 0 {
            bail!("the whole programs counted no {what}: the cases do not test what they say");
        }
    }
    if whole.ringbuf_full > 0 || whole.parse_errors > 0 {
        bail!("ring buffer full or parse errors in the kernel bench: {whole:?}");
    }
    Ok(())
}

/// Runs every case once through tracegap's whole programs and checks the
/// counters say what the cases claim (for a test: no timing, no floor).
pub fn check_cases() -> anyhow::Result<Counters> {
    let mut whole = Loaded::load(VARIANTS[1], &[])?;
    for case in &cases() {
        whole.run(case, 1)?;
    }
    let counters = whole.counters()?;
    verify(&counters)?;
    Ok(counters)
}

/// Measures every case under every variant, `rounds` times (interleaved,
/// so drift hits every variant alike), and renders the table.
pub fn run(floor: &[u8], rounds: usize, batches: u32) -> anyhow::Result<String> {
    let cases = cases();
    let mut loaded = VARIANTS
        .iter()
        .map(|v| Loaded::load(*v, floor))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The source of the requests is a local pod: a GET leaves it first.
    for l in &mut loaded {
        l.run(&cases[0], 1)?;
    }
    let mut ns = vec![vec![Vec::new(); VARIANTS.len()]; cases.len()];
    for _ in 0..rounds {
        for (c, case) in cases.iter().enumerate() {
            for (v, l) in loaded.iter_mut().enumerate() {
                ns[c][v].push(l.run(case, batches)?);
            }
        }
    }
    verify(&loaded[1].counters()?)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "Kernel programs on crafted packets (BPF_PROG_TEST_RUN), ns per run: median of {rounds} \
         rounds of {} runs ({} for the row that logs, whose records must fit aya-log's ring \
         between calls), each also as a multiple of the empty program; min–max of the rounds \
         for tracegap.\n",
        u64::from(batches) * u64::from(BATCH),
        u64::from(batches) * u64::from(LOGGING_BATCH)
    );
    out.push_str("| packet |");
    for v in VARIANTS {
        let _ = write!(out, " {} |", v.name);
    }
    out.push_str(" tracegap min–max |\n|---|");
    for _ in 0..=VARIANTS.len() {
        out.push_str("---|");
    }
    out.push('\n');
    for (c, case) in cases.iter().enumerate() {
        let empty = Spread::of(ns[c][0].clone()).med;
        let _ = write!(out, "| {} | {empty:.1} |", case.what);
        for runs in &ns[c][1..] {
            let med = Spread::of(runs.clone()).med;
            let _ = write!(out, " {med:.1} ({:.1}×) |", med / empty.max(0.1));
        }
        let whole = Spread::of(ns[c][1].clone());
        let _ = writeln!(out, " {:.1}–{:.1} |", whole.min, whole.max);
    }
    Ok(out)
}
