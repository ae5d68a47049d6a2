//! From kernel events to whole message heads: joins a header block's
//! continuation events, drops what was already seen (TCP retransmissions,
//! and the same packet copied from the client's and the server's veth when
//! the kernel could not tell it was copied already), and
//! pairs responses with requests in order (keep-alive and pipelining).

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    hash::BuildHasher as _,
};

use tracegap_common::{Direction, EventKind};

use super::message::{Head, HeadError, StartLine, parse_head};
use crate::events::{Endpoint, Flow, RawEvent};

/// Header blocks being assembled at most; the oldest is flushed past it.
pub const MAX_PARTIALS: usize = 16 * 1024;
/// Requests waiting for a response per flow at most (pipelining depth).
pub const MAX_PENDING_PER_FLOW: usize = 64;
/// How long an unfinished header block waits for its next segment before
/// it is flushed as truncated ([`Assembler::flush_before`]).
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Messages read out of one event at most (pipelining in one segment).
pub const MAX_PIPELINED_PER_EVENT: usize = 64;
/// Flows remembered for duplicate detection at most.
pub const MAX_SEEN_FLOWS: usize = 256 * 1024;

/// One HTTP message head, as seen on the wire.
#[derive(Clone, Debug)]
pub struct Message {
    pub ts_ns: u64,
    pub flow: Flow,
    pub ifindex: u32,
    pub direction: Direction,
    pub seq: u32,
    pub head: Result<Head, HeadError>,
    /// The Service address the client addressed (see [`crate::nat`]).
    pub via: Option<Endpoint>,
    /// The head did not end within what the kernel copied (budget reached,
    /// or segments missing): the headers read are the complete lines so far.
    pub truncated: bool,
}

impl Message {
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
    next_seq: u32,
    buf: Vec<u8>,
}

/// Counts of what the assembler dropped, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AssembleStats {
    pub duplicates: u64,
    pub orphan_continuations: u64,
    pub truncated: u64,
}

#[derive(Default)]
pub struct Assembler {
    partials: HashMap<(Flow, u32), Partial>,
    /// Last message start seen per flow: (sequence number, time), keyed by
    /// the flow's 64-bit hash. One entry per open flow: a 40-byte key would
    /// be most of it. Two live flows colliding would only cost one of them
    /// its duplicate check.
    seen: HashMap<u64, (u32, u64)>,
    flow_hash: std::hash::RandomState,
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

/// Where the message after `head` starts, if its body length is known
/// from the head alone: Content-Length, or no body at all. A chunked body or
/// a response delimited by the connection's end cannot be skipped.
fn next_message_at(head: &Head) -> Option<usize> {
    if head
        .header_all("transfer-encoding")
        .any(|v| !v.trim().is_empty())
    {
        return None;
    }
    let body = match head.header("content-length") {
        Some(v) => v.trim().parse::<usize>().ok()?,
        None => match head.start {
            StartLine::Request { .. } => 0,
            StartLine::Response { status, .. }
                if status < 200 || status == 204 || status == 304 =>
            {
                0
            }
            StartLine::Response { .. } => return None,
        },
    };
    head.len.checked_add(body)
}

/// Whether bytes begin like an HTTP/1.x start line, as the kernel checks.
fn starts_like_a_message(b: &[u8]) -> bool {
    const STARTS: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"PATCH ",
        b"HEAD ",
        b"OPTIONS ",
        b"CONNECT ",
        b"TRACE ",
        b"HTTP/1.",
    ];
    STARTS.iter().any(|s| b.starts_with(s))
}

impl Assembler {
    /// Feeds one event; finished messages are appended to `out`.
    pub fn push(&mut self, e: RawEvent, out: &mut Vec<Message>) {
        let key = (e.flow, e.ifindex);
        match e.kind {
            EventKind::Request | EventKind::Response => {
                // The same segment seen on a second veth, or retransmitted:
                // dropped before it costs a parse.
                if self.duplicate(&e.flow, e.seq) {
                    return;
                }
                if let Some(p) = self.partials.remove(&key) {
                    // A new message began before the last one's head ended.
                    self.finish(key, p, out);
                }
                if self.partials.len() >= MAX_PARTIALS
                    && let Some(oldest) = self
                        .partials
                        .iter()
                        .min_by_key(|(_, p)| p.ts_ns)
                        .map(|(k, _)| *k)
                    && let Some(p) = self.partials.remove(&oldest)
                {
                    self.finish(oldest, p, out);
                }
                let p = Partial {
                    ts_ns: e.ts_ns,
                    direction: e.direction,
                    via: e.via,
                    seq: e.seq,
                    next_seq: e.seq.wrapping_add(e.payload.len() as u32),
                    buf: e.payload,
                };
                // Responses are never followed past their first event.
                let last = e.kind == EventKind::Response || e.budget_exhausted;
                self.advance(key, p, last, out);
            }
            EventKind::Continuation => {
                let Some(mut p) = self.partials.remove(&key) else {
                    self.stats.orphan_continuations += 1;
                    return;
                };
                if e.seq != p.next_seq {
                    // A gap: what is missing cannot be guessed.
                    self.finish(key, p, out);
                    return;
                }
                p.next_seq = p.next_seq.wrapping_add(e.payload.len() as u32);
                p.buf.extend_from_slice(&e.payload);
                self.advance(key, p, e.budget_exhausted, out);
            }
        }
    }

    fn advance(&mut self, key: (Flow, u32), mut p: Partial, last: bool, out: &mut Vec<Message>) {
        // Loops over messages pipelined in what was copied: a client may
        // write several requests (a server several responses) in one
        // segment, and the kernel reports only the first start.
        for _ in 0..MAX_PIPELINED_PER_EVENT {
            match parse_head(&p.buf) {
                Err(HeadError::Incomplete(_)) if !last => {
                    self.partials.insert(key, p);
                    return;
                }
                Err(HeadError::Incomplete(_)) => return self.finish(key, p, out),
                Err(e) => return self.emit(key, p, Err(e), false, out),
                Ok(head) => {
                    let next = next_message_at(&head)
                        .filter(|&at| p.buf.get(at..).is_some_and(starts_like_a_message));
                    let rest = next.map(|at| (at, p.buf.split_off(at)));
                    let (seq, ts_ns, direction, via) = (p.seq, p.ts_ns, p.direction, p.via);
                    self.emit(key, p, Ok(head), false, out);
                    let Some((at, buf)) = rest else { return };
                    let seq = seq.wrapping_add(at as u32);
                    p = Partial {
                        ts_ns,
                        direction,
                        via,
                        seq,
                        next_seq: seq.wrapping_add(buf.len() as u32),
                        buf,
                    };
                }
            }
        }
    }

    /// Whether a message starting at `seq` on `flow` was already emitted (a
    /// retransmission, or the same segment from a second veth); counts it.
    fn duplicate(&mut self, flow: &Flow, seq: u32) -> bool {
        let seen = self
            .seen
            .get(&self.flow_hash.hash_one(flow))
            .is_some_and(|&(last, _)| (seq.wrapping_sub(last) as i32) <= 0);
        if seen {
            self.stats.duplicates += 1;
        }
        seen
    }

    /// Emits a head that will not get its end: what it has, marked truncated.
    fn finish(&mut self, key: (Flow, u32), p: Partial, out: &mut Vec<Message>) {
        let head = parse_partial(&p.buf);
        self.emit(key, p, head, true, out);
    }

    fn emit(
        &mut self,
        (flow, ifindex): (Flow, u32),
        p: Partial,
        head: Result<Head, HeadError>,
        truncated: bool,
        out: &mut Vec<Message>,
    ) {
        // Checked again here: a head that waited for its continuation may
        // have been overtaken by the same head from the other veth.
        if self.duplicate(&flow, p.seq) {
            return;
        }
        let key = self.flow_hash.hash_one(flow);
        if self.seen.len() >= MAX_SEEN_FLOWS && !self.seen.contains_key(&key) {
            self.forget_oldest_half();
        }
        self.seen.insert(key, (p.seq, p.ts_ns));
        if truncated {
            self.stats.truncated += 1;
        }
        out.push(Message {
            ts_ns: p.ts_ns,
            flow,
            ifindex,
            direction: p.direction,
            seq: p.seq,
            head,
            via: p.via,
            truncated,
        });
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
            if let Some(p) = self.partials.remove(&k) {
                self.finish(k, p, out);
            }
        }
    }

    /// Keeps [`MAX_SEEN_FLOWS`] a hard bound: drops the older half of the
    /// flows remembered (amortised O(1) per insert). A dropped flow that is
    /// still alive loses only its duplicate check for its next message.
    fn forget_oldest_half(&mut self) {
        let mut times: Vec<u64> = self.seen.values().map(|&(_, t)| t).collect();
        let mid = times.len() / 2;
        let (_, &mut cutoff, _) = times.select_nth_unstable(mid);
        self.seen.retain(|_, &mut (_, t)| t > cutoff);
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
    /// Called once when it starts waiting: drop what pairing doesn't need.
    fn shrink(&mut self) {}
}

impl Waiting for Message {
    fn ts_ns(&self) -> u64 {
        self.ts_ns
    }

    /// A waiting message keeps only the headers a hop is built from.
    fn shrink(&mut self) {
        if let Ok(h) = self.head.as_mut() {
            h.headers
                .retain(|(n, _)| KEPT_WHILE_PENDING.contains(&n.as_str()));
            h.headers.shrink_to_fit();
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

/// Pairs each response with the oldest unanswered request on its flow.
pub struct Pairer<T = Message> {
    pending: HashMap<Flow, Queue<T>>,
}

impl<T> Default for Pairer<T> {
    fn default() -> Self {
        Self {
            pending: HashMap::new(),
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

    /// The request a response answers: the oldest pending one on its flow.
    pub fn response(&mut self, m: &Message) -> Option<T> {
        self.answer(m.flow.reversed())
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
    use crate::events::Endpoint;

    fn flow() -> Flow {
        Flow {
            src: Endpoint {
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                port: 40000,
            },
            dst: Endpoint {
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                port: 80,
            },
        }
    }

    fn ev(kind: EventKind, flow: Flow, ifindex: u32, seq: u32, payload: &[u8]) -> RawEvent {
        RawEvent {
            ts_ns: seq as u64,
            flow,
            ifindex,
            direction: Direction::Egress,
            kind,
            seq,
            segment_len: payload.len() as u32,
            budget_exhausted: false,
            payload: payload.to_vec(),
            via: None,
        }
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
        assert_eq!(a.stats.duplicates, 1);
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

    fn path(m: &Message) -> String {
        match &m.head.as_ref().unwrap().start {
            StartLine::Request { path, .. } => path.clone(),
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

        let mut e = ev(
            EventKind::Request,
            flow(),
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
        let mut p = Pairer::default();
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
                30,
                b"GET /2 HTTP/1.1\r\n\r\n",
            ),
            &mut out,
        );
        let back = flow().reversed();
        a.push(
            ev(EventKind::Response, back, 1, 7, b"HTTP/1.1 200 OK\r\n\r\n"),
            &mut out,
        );
        a.push(
            ev(
                EventKind::Response,
                back,
                1,
                27,
                b"HTTP/1.1 404 Not Found\r\n\r\n",
            ),
            &mut out,
        );
        let mut pairs = Vec::new();
        for m in out {
            if m.is_request() {
                assert!(p.request(m.flow, m).is_none());
            } else {
                let req = p.response(&m).expect("a pending request");
                pairs.push((req.seq, m.seq));
            }
        }
        assert_eq!(pairs, [(10, 7), (30, 27)]);
        assert_eq!(p.pending(), 0);
    }

    /// A request as a number: its time.
    #[derive(Debug, PartialEq)]
    struct Waits(u64);

    impl Waiting for Waits {
        fn ts_ns(&self) -> u64 {
            self.0
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
        assert_eq!(p.response(&out[0]), Some(Waits(1)));
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
        for i in 0..(MAX_SEEN_FLOWS as u32 + 10) {
            let mut f = flow();
            f.src.port = (i % 60000) as u16;
            f.src.ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i / 60000));
            a.push(
                ev(EventKind::Request, f, 1, i, b"GET / HTTP/1.1\r\n\r\n"),
                &mut out,
            );
            assert!(a.seen.len() <= MAX_SEEN_FLOWS);
        }
        assert_eq!(out.len(), MAX_SEEN_FLOWS + 10);
    }
}
