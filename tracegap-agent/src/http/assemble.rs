//! From kernel events to whole message heads: joins a header block's
//! continuation events, reads only starts at a message boundary (see
//! [`super::stream`]: never a start inside a body, never one already seen,
//! such as a TCP retransmission or the same packet copied from the
//! client's and the server's veth), and pairs responses with requests
//! (keep-alive and pipelining).

use std::collections::{VecDeque, hash_map::Entry};

use crate::FastMap;

use tracegap_common::{Direction, EventKind};

use super::{
    message::{Head, HeadError, StartLine, parse, parse_head},
    stream::{Admit, BoundaryStats, Streams},
};
use crate::events::{Endpoint, Flow, RawEvent};

/// Header blocks being assembled at most; the oldest is flushed past it.
pub const MAX_PARTIALS: usize = 16 * 1024;
/// Bytes of unfinished header blocks held at most (each up to the kernel's
/// 32 KiB budget): past it the oldest are flushed, as truncated, so a pod
/// sending many large unfinished heads cannot grow the agent.
pub const MAX_PARTIAL_BYTES: usize = 32 * 1024 * 1024;
/// Requests waiting for a response per flow at most (pipelining depth).
pub const MAX_PENDING_PER_FLOW: usize = 64;
/// How long an unfinished header block waits for its next segment before
/// it is flushed as truncated ([`Assembler::flush_before`]).
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Messages read out of one event at most (pipelining in one segment).
pub const MAX_PIPELINED_PER_EVENT: usize = 64;

/// One HTTP message head, as seen on the wire.
#[derive(Clone, Debug)]
pub struct Message {
    pub ts_ns: u64,
    pub flow: Flow,
    pub ifindex: u32,
    pub direction: Direction,
    pub seq: u32,
    /// Acknowledgement number of the segment it started in.
    pub ack: u32,
    /// Read where its stream found its boundary again after losing it:
    /// messages before it on the stream may be missing, so nothing is
    /// paired across it in order (see [`Pairer::response`]).
    pub resynced: bool,
    pub head: Result<Head, HeadError>,
    /// The Service address the client addressed (see [`crate::nat`]).
    pub via: Option<Endpoint>,
    /// The head did not end within what the kernel copied (budget reached,
    /// or segments missing): the headers read are the complete lines so far.
    pub truncated: bool,
    /// Its connection ends after it (it said `Connection: close`, or it is
    /// the final answer to a request that did): the client may take its
    /// port again at once, for a new connection.
    pub ends_connection: bool,
}

impl Message {
    /// A 1xx response other than 101: the final response is still to come.
    pub fn is_interim(&self) -> bool {
        matches!(
            self.head,
            Ok(Head {
                start: StartLine::Response { status, .. },
                ..
            }) if super::message::is_interim(status)
        )
    }

    pub fn is_request(&self) -> bool {
        matches!(
            self.head,
            Ok(Head {
                start: super::message::StartLine::Request { .. },
                ..
            })
        )
    }
}

struct Partial {
    ts_ns: u64,
    direction: Direction,
    via: Option<Endpoint>,
    seq: u32,
    ack: u32,
    resynced: bool,
    next_seq: u32,
    buf: bytes::Bytes,
}

/// Counts of what the assembler dropped, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AssembleStats {
    pub orphan_continuations: u64,
    pub truncated: u64,
}

#[derive(Default)]
pub struct Assembler {
    partials: FastMap<(Flow, u32), Partial>,
    /// Bytes held in `partials`.
    partial_bytes: usize,
    /// Where each stream's next message starts.
    streams: Streams,
    pub stats: AssembleStats,
}

/// Parses what there is of an unfinished head: its complete lines.
fn parse_partial(buf: &[u8]) -> Result<Head, HeadError> {
    let Some(end) = buf.windows(2).rposition(|w| w == b"\r\n") else {
        return parse_head(buf);
    };
    let mut b = buf[..end + 2].to_vec();
    b.extend_from_slice(b"\r\n");
    let mut head = parse_head(&b)?;
    head.len = buf.len();
    Ok(head)
}

impl Assembler {
    /// Starts not read and boundaries lost and found (see [`super::stream`]).
    pub fn boundaries(&self) -> BoundaryStats {
        self.streams.stats
    }

    /// Streams whose boundaries are remembered.
    /// Heads begun and not finished: each is due to be flushed.
    pub fn partials(&self) -> usize {
        self.partials.len()
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// Feeds one event; finished messages are appended to `out`.
    pub fn push(&mut self, e: RawEvent, out: &mut Vec<Message>) {
        let key = (e.flow, e.ifindex);
        match e.kind {
            EventKind::Request | EventKind::Response => {
                if self.partials.get(&key).is_some_and(|p| p.seq == e.seq) {
                    // Its own retransmission while its head is incomplete.
                    return;
                }
                if let Some(p) = self.take_partial(&key) {
                    // A new message began before the last one's head ended.
                    self.finish(key, p, out);
                }
                // Inside a body, already seen, or not at a boundary the
                // stream can vouch for: dropped before it costs a parse.
                let admit = self.streams.admit(&e.flow, e.seq, e.ack);
                if !admit.accepted() {
                    return;
                }
                if self.partials.len() >= MAX_PARTIALS
                    && let Some(oldest) = self
                        .partials
                        .iter()
                        .min_by_key(|(_, p)| p.ts_ns)
                        .map(|(k, _)| *k)
                    && let Some(p) = self.take_partial(&oldest)
                {
                    self.finish(oldest, p, out);
                }
                let p = Partial {
                    ts_ns: e.ts_ns,
                    direction: e.direction,
                    via: e.via,
                    seq: e.seq,
                    ack: e.ack,
                    resynced: admit == Admit::Resync,
                    next_seq: e.seq.wrapping_add(e.payload.len() as u32),
                    buf: e.payload,
                };
                // Responses are not followed past their first event, unless
                // it was a short start the kernel follows to its line's end.
                let last = (e.kind == EventKind::Response && !e.short_start) || e.budget_exhausted;
                self.advance(key, p, last, out);
            }
            EventKind::Continuation => {
                let Some(mut p) = self.take_partial(&key) else {
                    self.stats.orphan_continuations += 1;
                    return;
                };
                if e.seq != p.next_seq {
                    // A gap: what is missing cannot be guessed.
                    self.finish(key, p, out);
                    return;
                }
                p.next_seq = p.next_seq.wrapping_add(e.payload.len() as u32);
                // Rare (a head longer than a segment): one new buffer.
                let mut buf = Vec::with_capacity(p.buf.len() + e.payload.len());
                buf.extend_from_slice(&p.buf);
                buf.extend_from_slice(&e.payload);
                p.buf = buf.into();
                self.advance(key, p, e.budget_exhausted, out);
            }
            // HTTP/2 connections are read by `super::h2::follow`; thread
            // turns go to the gap engine.
            EventKind::Http2 | EventKind::Thread | EventKind::TlsHello | EventKind::Owner => {}
        }
    }

    fn advance(&mut self, key: (Flow, u32), mut p: Partial, last: bool, out: &mut Vec<Message>) {
        // Loops over messages pipelined in what was copied: a client may
        // write several requests (a server several responses) in one
        // segment, and the kernel reports only the first start. The next
        // one is read only where the last one's length says it starts.
        for _ in 0..MAX_PIPELINED_PER_EVENT {
            match parse(&p.buf) {
                Err(HeadError::Incomplete(_)) if !last => {
                    self.hold_partial(key, p, out);
                    return;
                }
                Err(HeadError::Incomplete(_)) => return self.finish(key, p, out),
                Err(e) => {
                    self.emit(key, &p, Err(e), false, out);
                    return;
                }
                Ok(head) => {
                    let Some(next) = self.emit(key, &p, Ok(head), false, out) else {
                        return;
                    };
                    let at = next.wrapping_sub(p.seq) as usize;
                    if at >= p.buf.len() {
                        // The body runs past what was copied: the next
                        // message starts in a later segment.
                        return;
                    }
                    let buf = p.buf.split_off(at);
                    p = Partial {
                        seq: next,
                        resynced: false,
                        next_seq: next.wrapping_add(buf.len() as u32),
                        buf,
                        ..p
                    };
                }
            }
        }
    }

    /// Emits a head that will not get its end: what it has, marked truncated.
    fn finish(&mut self, key: (Flow, u32), p: Partial, out: &mut Vec<Message>) {
        let head = parse_partial(&p.buf);
        self.emit(key, &p, head, true, out);
    }

    /// Emits the message `p` starts with; returns where the next message
    /// on its stream starts, if that is known.
    fn emit(
        &mut self,
        (flow, ifindex): (Flow, u32),
        p: &Partial,
        head: Result<Head, HeadError>,
        truncated: bool,
        out: &mut Vec<Message>,
    ) -> Option<u32> {
        let parsed = head.as_ref().ok();
        let after = parsed.map_or(&[][..], |h| p.buf.get(h.len..).unwrap_or_default());
        // Err: overtaken by the same head from the other veth.
        let emitted = self
            .streams
            .emit(&flow, p.seq, p.ack, p.ts_ns, parsed, !truncated, after)
            .ok()?;
        if truncated {
            self.stats.truncated += 1;
        }
        out.push(Message {
            ts_ns: p.ts_ns,
            flow,
            ifindex,
            direction: p.direction,
            seq: p.seq,
            ack: p.ack,
            resynced: p.resynced,
            head,
            via: p.via,
            truncated,
            ends_connection: emitted.ends_connection,
        });
        emitted.next
    }

    fn take_partial(&mut self, key: &(Flow, u32)) -> Option<Partial> {
        let p = self.partials.remove(key)?;
        self.partial_bytes -= p.buf.len();
        Some(p)
    }

    /// Holds an unfinished head for its next segment, within
    /// [`MAX_PARTIAL_BYTES`]: the oldest go first.
    fn hold_partial(&mut self, key: (Flow, u32), mut p: Partial, out: &mut Vec<Message>) {
        // Its bytes out of the batch's shared buffer
        // ([`crate::events::BatchDecoder`]), which they would keep alive
        // for as long as the head waits.
        p.buf = bytes::Bytes::copy_from_slice(&p.buf);
        while self.partial_bytes + p.buf.len() > MAX_PARTIAL_BYTES {
            let Some(oldest) = self
                .partials
                .iter()
                .min_by_key(|(_, p)| p.ts_ns)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(old) = self.take_partial(&oldest) {
                self.finish(oldest, old, out);
            }
        }
        self.partial_bytes += p.buf.len();
        if let Some(old) = self.partials.insert(key, p) {
            self.partial_bytes -= old.buf.len();
        }
    }

    /// Finishes heads that have waited since before `ts_ns` (their next
    /// segment is not coming) and forgets old flows.
    pub fn flush_before(&mut self, ts_ns: u64, out: &mut Vec<Message>) {
        let stale: Vec<_> = self
            .partials
            .iter()
            .filter(|(_, p)| p.ts_ns < ts_ns)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(p) = self.take_partial(&k) {
                self.finish(k, p, out);
            }
        }
    }
}

/// Headers a pending request keeps (see [`Pairer::request`]).
const KEPT_WHILE_PENDING: [&str; 11] = [
    "host",
    "traceparent",
    "tracestate",
    "uber-trace-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "baggage",
    "content-length",
];

/// What waits in the [`Pairer`] for its response: a whole [`Message`]
/// (`tracegap observe` prints them) or the agent's compact record.
pub trait Waiting {
    /// Monotonic time the request was seen: when it times out from.
    fn ts_ns(&self) -> u64;
    /// The acknowledgement number its first segment carried: where the
    /// response to it starts, if the client waited for the last response
    /// before sending it (see [`Pairer::response`]).
    fn ack(&self) -> u32;
    /// Read after its stream lost and found its boundary: no response is
    /// paired with it in order, only by acknowledgement.
    fn resynced(&self) -> bool;
    /// Called once when it starts waiting: drop what pairing doesn't need.
    fn shrink(&mut self) {}
}

impl Waiting for Message {
    fn ts_ns(&self) -> u64 {
        self.ts_ns
    }

    fn ack(&self) -> u32 {
        self.ack
    }

    fn resynced(&self) -> bool {
        self.resynced
    }

    /// A waiting message keeps only the headers a hop is built from.
    fn shrink(&mut self) {
        if let Ok(h) = self.head.as_mut() {
            h.retain(&KEPT_WHILE_PENDING);
        }
    }
}

/// The requests waiting on one flow. Most flows have one in flight: that
/// one is held in place, without a queue's allocation, and the rare queue
/// is boxed so that the common entry stays small.
enum Queue<T> {
    One(T),
    #[allow(clippy::box_collection)] // on purpose: see above
    Many(Box<VecDeque<T>>),
}

impl<T> Queue<T> {
    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(q) => q.len(),
        }
    }

    fn front(&self) -> Option<&T> {
        match self {
            Self::One(t) => Some(t),
            Self::Many(q) => q.front(),
        }
    }

    fn position(&self, mut f: impl FnMut(&T) -> bool) -> Option<usize> {
        match self {
            Self::One(t) => f(t).then_some(0),
            Self::Many(q) => q.iter().position(f),
        }
    }

    /// Appends behind what waits already; returns the oldest when the flow
    /// holds more than [`MAX_PENDING_PER_FLOW`]. Only for flows with a
    /// request waiting (pipelining), so the swap's allocation is rare.
    fn push(&mut self, req: T) -> Option<T> {
        let mut q = match std::mem::replace(self, Self::Many(Box::default())) {
            Self::One(first) => {
                let mut q = Box::new(VecDeque::with_capacity(2));
                q.push_back(first);
                q
            }
            Self::Many(q) => q,
        };
        q.push_back(req);
        let pushed_out = (q.len() > MAX_PENDING_PER_FLOW)
            .then(|| q.pop_front())
            .flatten();
        *self = Self::Many(q);
        pushed_out
    }
}

/// What a response answers (see [`Pairer::response`]).
#[derive(Debug)]
pub enum Answer<T> {
    /// The request, and the older ones on its flow whose responses were
    /// not seen (each an unanswered hop, as far as anyone will know).
    Answered { request: T, skipped: Vec<T> },
    /// A 1xx other than 101: the final response is still to come.
    Interim,
    /// No request waits on its flow.
    Orphan,
}

impl<T> Answer<T> {
    /// The request answered, if any.
    pub fn request(self) -> Option<T> {
        match self {
            Self::Answered { request, .. } => Some(request),
            Self::Interim | Self::Orphan => None,
        }
    }
}

/// Pairs each response with the request it answers on its flow.
pub struct Pairer<T = Message> {
    pending: FastMap<Flow, Queue<T>>,
}

impl<T> Default for Pairer<T> {
    fn default() -> Self {
        Self {
            pending: FastMap::default(),
        }
    }
}

impl<T: Waiting> Pairer<T> {
    /// Records a request on `flow`; returns the request it pushed out when
    /// the flow's queue was full (answered never, as far as we will know).
    /// Memory per waiting request is what bounds the agent under many open
    /// flows, so it is shrunk first.
    pub fn request(&mut self, flow: Flow, mut req: T) -> Option<T> {
        req.shrink();
        match self.pending.entry(flow) {
            Entry::Vacant(v) => {
                v.insert(Queue::One(req));
                None
            }
            Entry::Occupied(mut o) => o.get_mut().push(req),
        }
    }

    /// What a response answers.
    ///
    /// In order, as HTTP/1.1 answers, with one refinement from TCP: a
    /// client that waits for each response before its next request sends
    /// that request acknowledging exactly where the response to it will
    /// start. So a response starting at the acknowledgement number of a
    /// waiting request answers that one, and the requests before it were
    /// answered by responses that were not seen (a response's first segment
    /// lost, or too short to be recognised): they are returned as
    /// `skipped`, not paired with the wrong response. Pipelined requests
    /// (sent before the previous response arrived) share an older
    /// acknowledgement and are answered in order, but never across a
    /// message read after a lost boundary (`resynced`): messages may be
    /// missing there, so only an acknowledgement pairs it.
    pub fn response(&mut self, m: &Message) -> Answer<T> {
        if m.is_interim() {
            return Answer::Interim;
        }
        let flow = m.flow.reversed();
        let Some(q) = self.pending.get(&flow) else {
            return Answer::Orphan;
        };
        let at = q
            .position(|r| r.ack() == m.seq)
            .or_else(|| (!m.resynced && q.front().is_some_and(|r| !r.resynced())).then_some(0));
        let Some(at) = at else {
            return Answer::Orphan;
        };
        let skipped = (0..at).filter_map(|_| self.answer(flow)).collect();
        match self.answer(flow) {
            Some(request) => Answer::Answered { request, skipped },
            None => Answer::Orphan,
        }
    }

    fn answer(&mut self, flow: Flow) -> Option<T> {
        match self.pending.remove(&flow)? {
            Queue::One(req) => Some(req),
            Queue::Many(mut q) => {
                let req = q.pop_front();
                if !q.is_empty() {
                    self.pending.insert(flow, Queue::Many(q));
                }
                req
            }
        }
    }

    /// Removes and returns requests older than `ts_ns`: they timed out.
    pub fn expire_before(&mut self, ts_ns: u64) -> Vec<T> {
        let stale: Vec<Flow> = self
            .pending
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|r| r.ts_ns() < ts_ns))
            .map(|(f, _)| *f)
            .collect();
        let mut expired = Vec::new();
        for flow in stale {
            while let Some(q) = self.pending.get(&flow)
                && q.front().is_some_and(|r| r.ts_ns() < ts_ns)
            {
                expired.extend(self.answer(flow));
            }
        }
        expired
    }

    pub fn pending(&self) -> usize {
        self.pending.values().map(Queue::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        events::Endpoint,
        http::{stream::MAX_STREAMS, testing::flow},
    };

    fn ev(kind: EventKind, flow: Flow, ifindex: u32, seq: u32, payload: &[u8]) -> RawEvent {
        crate::http::testing::event(kind, flow, ifindex, seq, payload)
    }

    #[test]
    fn joins_continuations_and_drops_duplicates_from_a_second_interface() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        let first = b"GET /big HTTP/1.1\r\nx-pad: aaaa";
        let rest =
            b"aaaa\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
        a.push(ev(EventKind::Request, flow(), 1, 100, first), &mut out);
        assert!(out.is_empty());
        // The same segment on the server's veth.
        a.push(ev(EventKind::Request, flow(), 2, 100, first), &mut out);
        a.push(
            ev(
                EventKind::Continuation,
                flow(),
                1,
                100 + first.len() as u32,
                rest,
            ),
            &mut out,
        );
        a.push(
            ev(
                EventKind::Continuation,
                flow(),
                2,
                100 + first.len() as u32,
                rest,
            ),
            &mut out,
        );
        assert_eq!(out.len(), 1, "{out:?}");
        let head = out[0].head.as_ref().unwrap();
        assert_eq!(head.header("x-pad"), Some("aaaaaaaa"));
        assert!(head.header("traceparent").is_some());
        assert!(!out[0].truncated);
        assert_eq!(a.boundaries().duplicates, 1);
        // A retransmission of the same request is not a new request.
        a.push(
            ev(
                EventKind::Request,
                flow(),
                1,
                100,
                b"GET /big HTTP/1.1\r\n\r\n",
            ),
            &mut out,
        );
        assert_eq!(out.len(), 1);
    }

    /// Feeds assembled messages to a pairer in order, as the agent does:
    /// each response with what it answers, and the pairer with what still
    /// waits. No request is pushed out of its flow's bound here.
    fn pair_all(out: Vec<Message>) -> (Pairer, Vec<(Message, Answer<Message>)>) {
        let mut p = Pairer::default();
        let mut answers = Vec::new();
        for m in out {
            if m.is_request() {
                assert!(p.request(m.flow, m).is_none());
            } else {
                let a = p.response(&m);
                answers.push((m, a));
            }
        }
        (p, answers)
    }

    fn path(m: &Message) -> String {
        match &m.head.as_ref().unwrap().start {
            StartLine::Request { path, .. } => path.to_string(),
            StartLine::Response { status, .. } => status.to_string(),
        }
    }

    #[test]
    fn reads_every_message_pipelined_in_one_segment() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        let reqs = b"GET /p1 HTTP/1.1\r\nhost: a\r\n\r\n\
POST /p2 HTTP/1.1\r\ncontent-length: 5\r\n\r\nGET /\
GET /p3 HTTP/1.1\r\nhost: a\r\n\r\n";
        a.push(ev(EventKind::Request, flow(), 1, 1000, reqs), &mut out);
        // The same segment on the other veth adds nothing.
        a.push(ev(EventKind::Request, flow(), 2, 1000, reqs), &mut out);
        let paths: Vec<_> = out.iter().map(path).collect();
        assert_eq!(paths, ["/p1", "/p2", "/p3"]);
        assert_eq!(out[1].seq, 1000 + 29);
        assert!(out.iter().all(|m| !m.truncated));

        // Responses: a sized body is skipped; one delimited by the
        // connection's end stops the reading (its bytes are body).
        out.clear();
        let rsps = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\n\
HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 500 Not a message\r\n\r\n";
        a.push(
            ev(EventKind::Response, flow().reversed(), 1, 5, rsps),
            &mut out,
        );
        let statuses: Vec<_> = out.iter().map(path).collect();
        assert_eq!(statuses, ["200", "204", "200"]);

        // A second head cut at the segment's end waits for its rest.
        out.clear();
        let f = Flow {
            src: Endpoint {
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)),
                port: 1,
            },
            ..flow()
        };
        let first = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nx-y:";
        a.push(ev(EventKind::Request, f, 1, 0, first), &mut out);
        assert_eq!(out.len(), 1);
        a.push(
            ev(
                EventKind::Continuation,
                f,
                1,
                first.len() as u32,
                b" z\r\n\r\n",
            ),
            &mut out,
        );
        assert_eq!(out.iter().map(path).collect::<Vec<_>>(), ["/a", "/b"]);
        assert_eq!(out[1].head.as_ref().unwrap().header("x-y"), Some("z"));
    }

    #[test]
    fn unfinished_heads_are_held_within_their_byte_bound_the_oldest_flushed() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        // 32 KiB unfinished heads on distinct flows, twice what fits.
        let head = {
            let mut h = b"GET / HTTP/1.1\r\nx-pad: ".to_vec();
            h.resize(32 * 1024, b'p');
            h
        };
        let n = 2 * MAX_PARTIAL_BYTES / head.len();
        for i in 0..n {
            let mut f = flow();
            f.src.port = 10_000 + i as u16;
            a.push(ev(EventKind::Request, f, 1, i as u32, &head), &mut out);
        }
        assert!(a.partial_bytes <= MAX_PARTIAL_BYTES, "{}", a.partial_bytes);
        assert_eq!(a.partial_bytes, a.partials.len() * head.len());
        // The oldest went out first, as truncated.
        assert_eq!(out.len(), n - a.partials.len());
        assert!(out.iter().all(|m| m.truncated));
        assert_eq!(out[0].flow.src.port, 10_000);
    }

    #[test]
    fn a_gap_or_exhausted_budget_marks_the_head_truncated() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        a.push(
            ev(
                EventKind::Request,
                flow(),
                1,
                0,
                b"GET / HTTP/1.1\r\nhost: a\r\nx-b: ",
            ),
            &mut out,
        );
        a.push(
            ev(EventKind::Continuation, flow(), 1, 999, b"zzz\r\n\r\n"),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert!(out[0].truncated);
        assert_eq!(out[0].head.as_ref().unwrap().header("host"), Some("a"));

        // (Another flow: the first one lost its boundary with the gap.)
        let mut e = ev(
            EventKind::Request,
            flow().reversed(),
            1,
            5000,
            b"GET /x HTTP/1.1\r\nhost: b\r\nx: y",
        );
        e.budget_exhausted = true;
        a.push(e, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[1].truncated);
        assert_eq!(a.stats.truncated, 2);
    }

    #[test]
    fn pipelined_responses_pair_in_order() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        a.push(
            ev(
                EventKind::Request,
                flow(),
                1,
                10,
                b"GET /1 HTTP/1.1\r\n\r\n",
            ),
            &mut out,
        );
        a.push(
            ev(
                EventKind::Request,
                flow(),
                1,
                29,
                b"GET /2 HTTP/1.1\r\n\r\n",
            ),
            &mut out,
        );
        let back = flow().reversed();
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        a.push(ev(EventKind::Response, back, 1, 7, ok), &mut out);
        a.push(
            ev(
                EventKind::Response,
                back,
                1,
                7 + ok.len() as u32,
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            ),
            &mut out,
        );
        let (p, answers) = pair_all(out);
        let pairs: Vec<_> = answers
            .into_iter()
            .map(|(m, a)| {
                let Answer::Answered { request, skipped } = a else {
                    panic!("a pending request for {m:?}");
                };
                assert!(skipped.is_empty());
                (request.seq, m.seq)
            })
            .collect();
        assert_eq!(pairs, [(10, 7), (29, 45)]);
        assert_eq!(p.pending(), 0);
    }

    const EVIL: &[u8] = b"GET /evil HTTP/1.1\r\nhost: x\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";

    #[test]
    fn a_body_that_looks_like_a_request_is_not_one() {
        for upload in [
            format!(
                "POST /upload HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
                EVIL.len()
            ),
            "POST /upload HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(),
        ] {
            let mut a = Assembler::default();
            let mut out = Vec::new();
            let chunked = upload.contains("chunked");
            let head = upload.as_bytes();
            a.push(ev(EventKind::Request, flow(), 1, 100, head), &mut out);
            // The body, as its own segment, starting like a request.
            let mut body = EVIL.to_vec();
            if chunked {
                body = [
                    format!("{:x}\r\n", EVIL.len()).as_bytes(),
                    EVIL,
                    b"\r\n0\r\n\r\n",
                ]
                .concat();
            }
            let at = 100 + head.len() as u32;
            let mut e = ev(EventKind::Request, flow(), 1, at, &body);
            if chunked {
                // The chunk size line comes first: a chunk that starts
                // like a request is its own segment after it.
                e = ev(EventKind::Request, flow(), 1, at + 4, EVIL);
            }
            a.push(e, &mut out);
            let paths: Vec<_> = out.iter().map(path).collect();
            assert_eq!(paths, ["/upload"], "{upload}");
            let b = a.boundaries();
            assert_eq!(b.inside_body + b.unsynchronised, 1, "{b:?}");
        }
    }

    #[test]
    fn a_request_written_a_byte_at_a_time_is_one_request() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        let raw = b"POST /bytewise HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi";
        let mut first = ev(EventKind::Request, flow(), 1, 500, &raw[..1]);
        first.short_start = true;
        a.push(first, &mut out);
        for (i, b) in raw.iter().enumerate().skip(1) {
            a.push(
                ev(EventKind::Continuation, flow(), 1, 500 + i as u32, &[*b]),
                &mut out,
            );
        }
        assert_eq!(out.iter().map(path).collect::<Vec<_>>(), ["/bytewise"]);
        assert!(!out[0].truncated);
        // A short start that is not HTTP after all is not a message.
        let mut out = Vec::new();
        let mut g = ev(EventKind::Request, flow().reversed(), 1, 9, b"G");
        g.short_start = true;
        a.push(g, &mut out);
        a.push(
            ev(
                EventKind::Continuation,
                flow().reversed(),
                1,
                10,
                b"\x00\x01binary\r\n",
            ),
            &mut out,
        );
        assert!(out.iter().all(|m| m.head.is_err()), "{out:?}");
    }

    #[test]
    fn a_response_answers_the_request_that_acknowledged_its_start() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        let get = b"GET /1 HTTP/1.1\r\n\r\n";
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        // Three keep-alive exchanges; the second response's first segment
        // was not seen.
        for (i, rsp) in [(0u32, true), (1, false), (2, true)] {
            let mut req = ev(
                EventKind::Request,
                flow(),
                1,
                100 + i * get.len() as u32,
                get,
            );
            req.ack = 7000 + i * ok.len() as u32;
            a.push(req, &mut out);
            if rsp {
                let mut r = ev(
                    EventKind::Response,
                    flow().reversed(),
                    1,
                    7000 + i * ok.len() as u32,
                    ok,
                );
                r.ack = 100 + (i + 1) * get.len() as u32;
                a.push(r, &mut out);
            }
        }
        let pairs: Vec<_> = pair_all(out)
            .1
            .into_iter()
            .filter_map(|(m, a)| match a {
                Answer::Answered { request, skipped } => Some((
                    request.seq,
                    m.seq,
                    skipped.iter().map(|s| s.seq).collect::<Vec<_>>(),
                )),
                Answer::Interim | Answer::Orphan => None,
            })
            .collect();
        assert_eq!(
            pairs,
            [
                (100, 7000, vec![]),
                (100 + 2 * 19, 7000 + 2 * 38, vec![100 + 19])
            ]
        );
    }

    #[test]
    fn nothing_is_paired_in_order_across_a_lost_boundary() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let mut first = ev(EventKind::Request, flow(), 1, 0, b"GET /a HTTP/1.1\r\n\r\n");
        first.ack = 500;
        a.push(first, &mut out);
        // The server had read up to 100 when it answered /a: requests
        // between 19 and 100 were not seen.
        let mut r = ev(EventKind::Response, flow().reversed(), 1, 500, ok);
        r.ack = 100;
        a.push(r, &mut out);
        let mut b = ev(
            EventKind::Request,
            flow(),
            1,
            100,
            b"GET /b HTTP/1.1\r\n\r\n",
        );
        b.ack = 777;
        a.push(b, &mut out);
        assert!(out[2].resynced);
        // A response to one of the unseen requests: not /b's.
        a.push(
            ev(EventKind::Response, flow().reversed(), 1, 538, ok),
            &mut out,
        );
        let (p, answers) = pair_all(out);
        let answers: Vec<_> = answers
            .into_iter()
            .map(|(_, a)| a.request().map(|r| path(&r)))
            .collect();
        assert_eq!(answers, [Some("/a".to_owned()), None]);
        assert_eq!(p.pending(), 1);
    }

    #[test]
    fn an_interim_response_answers_nothing() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        a.push(
            ev(
                EventKind::Request,
                flow(),
                1,
                1,
                b"PUT /f HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n",
            ),
            &mut out,
        );
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        a.push(
            ev(EventKind::Response, flow().reversed(), 1, 50, cont),
            &mut out,
        );
        a.push(
            ev(
                EventKind::Response,
                flow().reversed(),
                1,
                50 + cont.len() as u32,
                b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            ),
            &mut out,
        );
        let answers: Vec<_> = pair_all(out)
            .1
            .into_iter()
            .map(|(_, a)| match a {
                Answer::Interim => "interim",
                Answer::Answered { .. } => "answered",
                Answer::Orphan => "orphan",
            })
            .collect();
        assert_eq!(answers, ["interim", "answered"]);
    }

    /// A request as a number: its time.
    #[derive(Debug, PartialEq)]
    struct Waits(u64);

    impl Waiting for Waits {
        fn ts_ns(&self) -> u64 {
            self.0
        }

        fn ack(&self) -> u32 {
            0
        }

        fn resynced(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_flow_holds_at_most_its_bound_and_pushes_out_the_oldest() {
        let mut p = Pairer::default();
        for t in 0..MAX_PENDING_PER_FLOW as u64 {
            assert_eq!(p.request(flow(), Waits(t)), None);
        }
        assert_eq!(
            p.request(flow(), Waits(MAX_PENDING_PER_FLOW as u64)),
            Some(Waits(0))
        );
        assert_eq!(p.pending(), MAX_PENDING_PER_FLOW);
        let rsp = ev(
            EventKind::Response,
            flow().reversed(),
            1,
            7,
            b"HTTP/1.1 200 OK\r\n\r\n",
        );
        let mut out = Vec::new();
        Assembler::default().push(rsp, &mut out);
        assert!(matches!(
            p.response(&out[0]),
            Answer::Answered {
                request: Waits(1),
                ..
            }
        ));
        // Expiry takes the older ones in order and leaves the rest.
        let expired = p.expire_before(10);
        assert_eq!(expired.first(), Some(&Waits(2)));
        assert_eq!(expired.len(), 8);
        assert_eq!(p.pending(), MAX_PENDING_PER_FLOW - 9);
    }

    #[test]
    fn unanswered_requests_expire() {
        let mut a = Assembler::default();
        let mut p = Pairer::default();
        let mut out = Vec::new();
        a.push(
            ev(EventKind::Request, flow(), 1, 10, b"GET / HTTP/1.1\r\n\r\n"),
            &mut out,
        );
        let m = out.remove(0);
        p.request(m.flow, m);
        assert!(p.expire_before(5).is_empty());
        assert_eq!(p.expire_before(11).len(), 1);
    }

    #[test]
    fn remembered_flows_stay_bounded() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        for i in 0..(MAX_STREAMS as u32 + 10) {
            let mut f = flow();
            f.src.port = (i % 60000) as u16;
            f.src.ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i / 60000));
            a.push(
                ev(EventKind::Request, f, 1, i, b"GET / HTTP/1.1\r\n\r\n"),
                &mut out,
            );
            assert!(a.streams() <= MAX_STREAMS);
        }
        assert_eq!(out.len(), MAX_STREAMS + 10);
    }
}
