//! Events from the kernel: decoding ring-buffer records and reading them
//! without blocking the runtime.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use bytes::Bytes;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tracegap_common::{
    Direction, EVENT_HEADER_LEN, EventHeader, EventKind, FlowKey, MAX_PAYLOAD, WAKEUP_AGE_NS,
    event_flags, family,
};

/// Why a ring-buffer record could not be decoded.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the fixed header.
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    /// The header announces more payload than the record holds.
    #[error("record announces {announced} payload bytes but carries {carried}")]
    Payload { announced: usize, carried: usize },
    /// A field holds a value the kernel never writes.
    #[error("invalid {field}: {value}")]
    Field { field: &'static str, value: u8 },
}

/// One endpoint of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// A flow as written in one packet: source, then destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Flow {
    pub src: Endpoint,
    pub dst: Endpoint,
}

impl Flow {
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)
    }
}

fn ip(family_: u8, bytes: [u8; 16]) -> Option<IpAddr> {
    match family_ {
        family::IPV4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        family::IPV6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
        _ => None,
    }
}

impl TryFrom<&FlowKey> for Flow {
    type Error = DecodeError;
    fn try_from(k: &FlowKey) -> Result<Self, DecodeError> {
        let bad = DecodeError::Field {
            field: "family",
            value: k.family,
        };
        Ok(Self {
            src: Endpoint {
                ip: ip(k.family, k.saddr).ok_or(bad.clone())?,
                port: k.sport,
            },
            dst: Endpoint {
                ip: ip(k.family, k.daddr).ok_or(bad)?,
                port: k.dport,
            },
        })
    }
}

impl From<&Flow> for FlowKey {
    /// The key the kernel writes for this flow. A flow mixing IPv4 and
    /// IPv6 ends (which no packet carries) takes its source's family.
    fn from(f: &Flow) -> Self {
        let bytes = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v4.octets());
                b
            }
            IpAddr::V6(v6) => v6.octets(),
        };
        Self {
            saddr: bytes(f.src.ip),
            daddr: bytes(f.dst.ip),
            sport: f.src.port,
            dport: f.dst.port,
            family: if f.src.ip.is_ipv4() {
                family::IPV4
            } else {
                family::IPV6
            },
            _pad: [0; 3],
        }
    }
}

/// An event as user space sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub flow: Flow,
    pub ifindex: u32,
    pub direction: Direction,
    pub kind: EventKind,
    /// Sequence number of `payload[0]`.
    pub seq: u32,
    /// Acknowledgement number of the segment (see [`crate::http::stream`]).
    pub ack: u32,
    /// A start shorter than 8 bytes, followed by the kernel whatever its
    /// kind: its continuations complete it.
    pub short_start: bool,
    /// TCP payload bytes in the segment the event came from.
    pub segment_len: u32,
    /// The kernel stopped copying this header block at its budget.
    pub budget_exhausted: bool,
    /// The copied bytes: the one copy user space makes of them, shared by
    /// the message heads parsed from it.
    pub payload: Bytes,
    /// The Service address the client addressed, when the flow was
    /// rewritten to the backend behind it (user space, [`crate::nat`]).
    pub via: Option<Endpoint>,
}

impl RawEvent {
    /// Decodes one ring-buffer record, its payload copied out on its own
    /// (a batch's share one buffer: [`BatchDecoder`]).
    pub fn decode(record: &[u8]) -> Result<Self, DecodeError> {
        let (mut e, payload) = Self::decode_parts(record)?;
        e.payload = Bytes::copy_from_slice(payload);
        Ok(e)
    }

    /// A record's event without its payload, and the payload.
    fn decode_parts(record: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        if record.len() < EVENT_HEADER_LEN {
            return Err(DecodeError::Short(record.len()));
        }
        // SAFETY: EventHeader is repr(C) plain data, any bytes are valid;
        // read_unaligned because the record has no alignment guarantee here.
        let h: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let announced = usize::from(h.payload_len);
        let carried = record.len() - EVENT_HEADER_LEN;
        if announced > carried || announced > MAX_PAYLOAD {
            return Err(DecodeError::Payload { announced, carried });
        }
        let e = Self {
            ts_ns: h.ts_ns,
            flow: Flow::try_from(&h.flow)?,
            ifindex: h.ifindex,
            direction: Direction::from_u8(h.direction).ok_or(DecodeError::Field {
                field: "direction",
                value: h.direction,
            })?,
            kind: EventKind::from_u8(h.kind).ok_or(DecodeError::Field {
                field: "kind",
                value: h.kind,
            })?,
            seq: h.seq,
            ack: h.ack,
            short_start: h.flags & event_flags::SHORT_START != 0,
            segment_len: h.segment_len,
            budget_exhausted: h.flags & event_flags::BUDGET_EXHAUSTED != 0,
            payload: Bytes::new(),
            via: None,
        };
        Ok((e, &record[EVENT_HEADER_LEN..EVENT_HEADER_LEN + announced]))
    }
}

/// Decodes a batch of records with their payloads copied into one shared
/// buffer: an allocation per [`ARENA_BYTES`] of payload, not one per
/// record (a fifth of the pipeline's time went to malloc and free, issue
/// 33). A payload kept past its batch keeps its buffer alive, so what
/// holds one long (a head waiting for its end) copies it out
/// ([`crate::http::assemble`]).
#[derive(Debug, Default)]
pub struct BatchDecoder {
    arena: bytes::BytesMut,
    /// Where each decoded event's payload is in `arena`, in order.
    ranges: Vec<(usize, usize)>,
}

/// A batch buffer's size: about a thousand HTTP heads.
pub const ARENA_BYTES: usize = 256 * 1024;

impl BatchDecoder {
    /// Decodes `record` onto `out`; its payload is set by [`Self::finish`].
    pub fn push(&mut self, record: &[u8], out: &mut Vec<RawEvent>) -> Result<(), DecodeError> {
        let (e, payload) = RawEvent::decode_parts(record)?;
        if self.arena.capacity() - self.arena.len() < payload.len() {
            self.arena.reserve(payload.len().max(ARENA_BYTES));
        }
        let at = self.arena.len();
        self.arena.extend_from_slice(payload);
        self.ranges.push((at, self.arena.len()));
        out.push(e);
        Ok(())
    }

    /// Gives the events pushed since the last call (the last ones in
    /// `out`) their payloads.
    pub fn finish(&mut self, out: &mut [RawEvent]) {
        let shared = self.arena.split().freeze();
        let from = out.len().saturating_sub(self.ranges.len());
        for (e, (a, b)) in out[from..].iter_mut().zip(self.ranges.drain(..)) {
            e.payload = shared.slice(a..b);
        }
    }

    /// Decodes records read as one batch onto `out`; records that do not
    /// decode are left out.
    pub fn decode_all<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a [u8]>,
        out: &mut Vec<RawEvent>,
    ) {
        for r in records {
            let _ = self.push(r, out);
        }
        self.finish(out);
    }
}

impl RawEvent {
    /// Appends the ring-buffer record the kernel would have written for
    /// this event: how the bench replays events through [`RawEvent::decode`]
    /// as the agent reads them. The payload is cut at [`MAX_PAYLOAD`].
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let payload = &self.payload[..self.payload.len().min(MAX_PAYLOAD)];
        let mut flags = 0;
        if self.short_start {
            flags |= event_flags::SHORT_START;
        }
        if self.budget_exhausted {
            flags |= event_flags::BUDGET_EXHAUSTED;
        }
        let h = EventHeader {
            ts_ns: self.ts_ns,
            flow: FlowKey::from(&self.flow),
            ifindex: self.ifindex,
            seq: self.seq,
            segment_len: self.segment_len,
            payload_len: payload.len() as u16,
            direction: self.direction as u8,
            kind: self.kind as u8,
            flags,
            _pad: [0; 3],
            ack: self.ack,
        };
        let at = out.len();
        out.resize(at + EVENT_HEADER_LEN, 0);
        // SAFETY: `out` has EVENT_HEADER_LEN bytes at `at`; the header is
        // plain data, written unaligned.
        unsafe { std::ptr::write_unaligned(out[at..].as_mut_ptr().cast(), h) };
        out.extend_from_slice(payload);
    }
}

/// Reads events as they arrive, waking on the ring buffer's epoll readiness.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records that failed to decode (never expected; counted, not fatal).
    pub decode_errors: u64,
    /// The last batch stopped at [`MAX_BATCH`] with records left.
    more: bool,
    /// When the ring must be drained again for records the kernel did not
    /// wake us for (see [`Redrain`]).
    redrain: Redrain,
    decoder: BatchDecoder,
}

/// How far the kernel's coarse clock may lag (a tick at HZ=100, twice).
const COARSE_SLACK: Duration = Duration::from_millis(20);

/// How late a record the kernel committed may be read at most: it wakes
/// the reader by amount or by age ([`WAKEUP_AGE_NS`], measured on its
/// coarse clock), and the reader drains once more that long after a
/// drain that found records ([`Redrain`]). What waits for evidence the
/// kernel wrote by now waits this much longer.
pub const READ_LATENESS: Duration =
    Duration::from_nanos(WAKEUP_AGE_NS).saturating_add(COARSE_SLACK);

/// The drain the reader owes the kernel. A record is submitted without a
/// wakeup only within [`WAKEUP_AGE_NS`] of a wakeup, and the drain that
/// reads the waking record promises another one that long later. A drain
/// that finds nothing before then (a readiness left over from a wakeup
/// whose record an earlier drain already took) keeps the promise: it
/// once cleared it, and the records after it waited for the next wakeup
/// (a hop of a burst's tail went unreported in the lab's collector-down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Redrain {
    due: Option<Instant>,
}

impl Redrain {
    /// A drain that ran from `start` to `end` found records (`found`) or
    /// none. The waking record it read was submitted by `end` at the
    /// latest, so the drain owed is due `end` plus the age; an empty
    /// drain settles it only if it started at that time or later.
    pub(crate) fn drained(&mut self, (start, end): (Instant, Instant), found: bool) {
        if found {
            self.due = Some(end + READ_LATENESS);
        } else if self.due.is_some_and(|due| start >= due) {
            self.due = None;
        }
    }

    /// The next drain owed, if any.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.due
    }
}

impl EventStream {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: RingBuf owns its map fd for as long as it lives, and the
        // AsyncFd owns the RingBuf, so the fd stays open and the same.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self {
            ring,
            decode_errors: 0,
            more: false,
            redrain: Redrain::default(),
            decoder: BatchDecoder::default(),
        })
    }

    /// Waits for at least one record, then appends the records available,
    /// at most [`MAX_BATCH`], to `out` (decoded) and returns how many it
    /// appended.
    ///
    /// The kernel wakes the reader as [`tracegap_common::WAKEUP_BYTES`]
    /// come to be pending, or when it last did more than [`WAKEUP_AGE_NS`]
    /// ago: after a drain that found records, the ring is drained once
    /// more that long later, for the records in between ([`Redrain`]);
    /// once that drain finds none, only a wakeup brings the next. So a
    /// quiet ring costs no wakeup at all.
    pub async fn next_batch(&mut self, out: &mut Vec<RawEvent>) -> std::io::Result<usize> {
        loop {
            let before = out.len();
            let ring = if self.more {
                // The last batch stopped at its bound: read on at once. The
                // kernel wakes the reader only as the backlog crosses its
                // mark, so a backlog left behind would bring no wakeup.
                self.ring.get_mut()
            } else {
                let due = self.redrain.due();
                let fd = &mut self.ring;
                let woken = async move {
                    let mut guard = fd.readable_mut().await?;
                    // Cleared before reading: a wakeup that comes while
                    // reading stays noted, and is not lost.
                    guard.clear_ready();
                    std::io::Result::Ok(())
                };
                match due {
                    Some(due) => {
                        if let Ok(r) = tokio::time::timeout_at(due.into(), woken).await {
                            r?;
                        }
                    }
                    None => woken.await?,
                }
                self.ring.get_mut()
            };
            // Before reading: a record committed before it is read.
            let start = Instant::now();
            self.more = !Self::drain_into(&mut self.decode_errors, &mut self.decoder, ring, out);
            let found = out.len() > before;
            self.redrain.drained((start, Instant::now()), found);
            if found {
                return Ok(out.len() - before);
            }
        }
    }

    /// Decodes records into `out` until the ring is empty (true) or
    /// [`MAX_BATCH`] were read (false).
    fn drain_into(
        errors: &mut u64,
        decoder: &mut BatchDecoder,
        ring: &mut RingBuf<MapData>,
        out: &mut Vec<RawEvent>,
    ) -> bool {
        let mut empty = false;
        for _ in 0..MAX_BATCH {
            let Some(record) = ring.next() else {
                empty = true;
                break;
            };
            if let Err(e) = decoder.push(&record, out) {
                *errors += 1;
                tracing::debug!(error = %e, "undecodable event");
            }
        }
        decoder.finish(out);
        empty
    }
}

/// Records read into one batch at most: a batch is handed on while the next
/// is read, so a long burst does not wait to be read whole.
pub const MAX_BATCH: usize = 1024;

/// Batches waiting between the drain and the pipeline at most. When the
/// pipeline falls behind, the drain waits and records wait in the ring
/// buffer, where the kernel counts what does not fit
/// (`tracegap_kernel_events_total{counter="ringbuf_full"}`): nothing is
/// dropped unseen.
pub const BATCHES_QUEUED: usize = 8;

/// Reads the ring buffer on its own task, so that parsing, classification
/// and span building never delay the drain: sends each batch to `tx` and
/// counts undecodable records in `undecodable`. Ends as soon as the receiver
/// is dropped (Ok), or when the ring cannot be read (Err).
pub async fn drain(
    mut stream: EventStream,
    tx: tokio::sync::mpsc::Sender<Vec<RawEvent>>,
    undecodable: prometheus_client::metrics::counter::Counter,
) -> std::io::Result<()> {
    let mut counted = 0;
    loop {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // next_batch is cancelled only while it waits, before it reads.
        tokio::select! {
            () = tx.closed() => return Ok(()),
            read = stream.next_batch(&mut batch) => read?,
        };
        if stream.decode_errors > counted {
            undecodable.inc_by(stream.decode_errors - counted);
            counted = stream.decode_errors;
        }
        if tx.send(batch).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8], announced: u16) -> Vec<u8> {
        let mut flow = FlowKey {
            family: family::IPV4,
            sport: 40000,
            dport: 80,
            ..Default::default()
        };
        flow.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        flow.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let h = EventHeader {
            ts_ns: 5,
            flow,
            ifindex: 7,
            seq: 1000,
            segment_len: payload.len() as u32,
            payload_len: announced,
            direction: Direction::Egress as u8,
            kind: EventKind::Request as u8,
            ..Default::default()
        };
        let mut v = vec![0u8; EVENT_HEADER_LEN];
        // SAFETY: v has room for the header.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast(), h) };
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_drain_finding_nothing_keeps_the_redrain_owed_for_records_found_before() {
        let age = READ_LATENESS;
        let t0 = Instant::now();
        let at = |t: Instant| (t, t);
        let mut r = Redrain::default();
        assert_eq!(r.due(), None, "a quiet ring owes nothing");
        // A drain from t0 to t0 + 1 ms read the waking record: the kernel
        // may have submitted it as late as its end.
        let ms = Duration::from_millis(1);
        r.drained((t0, t0 + ms), true);
        assert_eq!(r.due(), Some(t0 + ms + age));
        // A leftover readiness drains early and finds nothing: the records
        // the kernel submits unwoken until then still need that drain.
        r.drained(at(t0 + age / 10), false);
        assert_eq!(r.due(), Some(t0 + ms + age));
        // An empty drain that started before the time owed settles nothing.
        r.drained(at(t0 + age), false);
        assert_eq!(r.due(), Some(t0 + ms + age));
        // The owed drain finds nothing: nothing is owed any more.
        r.drained(at(t0 + ms + age), false);
        assert_eq!(r.due(), None);
        // Records found push the promise on.
        r.drained(at(t0 + 2 * age), true);
        r.drained(at(t0 + 2 * age + age / 2), true);
        assert_eq!(r.due(), Some(t0 + 3 * age + age / 2));
    }

    #[test]
    fn an_encoded_event_decodes_to_itself() {
        for (src, dst) in [("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")] {
            let e = RawEvent {
                ts_ns: 9,
                flow: Flow {
                    src: Endpoint {
                        ip: src.parse().unwrap(),
                        port: 40000,
                    },
                    dst: Endpoint {
                        ip: dst.parse().unwrap(),
                        port: 80,
                    },
                },
                ifindex: 3,
                direction: Direction::Ingress,
                kind: EventKind::Response,
                seq: 7,
                ack: 11,
                short_start: true,
                segment_len: 20,
                budget_exhausted: true,
                payload: b"HTTP/1.1 200 OK\r\n\r\n".to_vec().into(),
                via: None,
            };
            let mut record = Vec::new();
            e.encode_into(&mut record);
            assert_eq!(RawEvent::decode(&record).unwrap(), e);
        }
    }

    #[test]
    fn decodes_a_request_event() {
        let e = RawEvent::decode(&record(b"GET / HTTP/1.1\r\n\r\n", 18)).unwrap();
        assert_eq!(e.flow.to_string(), "10.0.0.1:40000 -> 10.0.0.2:80");
        assert_eq!(e.kind, EventKind::Request);
        assert_eq!(e.direction, Direction::Egress);
        assert_eq!(&e.payload[..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn rejects_short_and_lying_records() {
        assert_eq!(RawEvent::decode(&[0; 10]), Err(DecodeError::Short(10)));
        assert_eq!(
            RawEvent::decode(&record(b"GET", 100)),
            Err(DecodeError::Payload {
                announced: 100,
                carried: 3
            })
        );
        let mut bad = record(b"", 0);
        bad[8 + 36] = 9; // family
        assert!(matches!(
            RawEvent::decode(&bad),
            Err(DecodeError::Field {
                field: "family",
                ..
            })
        ));
    }
}
