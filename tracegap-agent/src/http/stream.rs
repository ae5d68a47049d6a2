//! Message boundaries per flow direction: where the next HTTP message on a
//! TCP stream may start, so that bytes inside a body are never taken for a
//! message.
//!
//! The kernel reports every segment that begins like a start line ("GET ",
//! "HTTP/1."): it cannot know whether the segment is a message or a piece of
//! an uploaded file that happens to begin with "GET /evil HTTP/1.1". This
//! module decides, from two kinds of fact and no guess:
//!
//! - **Lengths.** A message head says where its message ends: its
//!   Content-Length, the end of a chunked body whose chunks were all
//!   copied, or no body at all (requests without one, responses to HEAD,
//!   1xx, 204 and 304). The next message on the stream starts exactly
//!   there: a start before it is inside the body and is dropped.
//! - **Acknowledgements.** When a stream has lost its boundary (a chunked
//!   body whose end was not seen, a head cut short, a message whose first
//!   segment the kernel did not copy), it is *unsynchronised*. It
//!   resynchronises at a start whose sequence number equals the
//!   acknowledgement number of the latest start seen the other way: a
//!   keep-alive client sends its next request exactly where the server had
//!   read up to when it answered the last one, and a server starts its next
//!   response where the client had read up to when it asked. Bytes inside a
//!   body cannot sit at that number. Until then starts are dropped and
//!   counted, not guessed at.
//!
//! After a `101 Switching Protocols` or a `2xx` answer to `CONNECT`, both
//! directions carry another protocol: nothing on them is HTTP/1 any more.
//!
//! A start far from anything the stream has seen, or one that acknowledges
//! bytes the other direction never sent (a client port reused by a new
//! connection), begins the stream afresh.

use std::hash::BuildHasher as _;

use crate::FastMap;

use super::message::{Head, StartLine, is_interim};
use crate::events::Flow;

/// Streams remembered at most; past it, the older half is forgotten. A
/// forgotten stream accepts its next start as a first sighting.
pub const MAX_STREAMS: usize = 256 * 1024;
/// A start this far behind the last one is a retransmission (or the same
/// segment seen on a second interface).
const DUP_WINDOW: u32 = 64 << 20;
/// A start this far ahead of the expected boundary is taken as a lost
/// boundary; further than that, as a new connection on the same ports.
const AHEAD_WINDOW: u32 = 1 << 30;
/// The most a peer may leave unread, as acknowledgements trail the other
/// side's sends (Linux's largest receive buffers are a few tens of MiB).
const RECEIVE_WINDOW: u32 = 64 << 20;
/// How far past the old stream's end a new connection's first start is at
/// least (64 ms of clock-driven sequence numbers).
const NEW_CONNECTION_GAP: u32 = 1 << 20;
/// Requests per stream whose response is awaited and whose method matters
/// to the response's length (HEAD, CONNECT), remembered at most.
const MAX_AWAITED: u8 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    /// The next message starts at `next`.
    At,
    /// The boundary was lost: waiting for an acknowledged start.
    Lost,
    /// Upgraded or tunnelled: no more HTTP/1 on this connection.
    Tunnel,
    /// The connection ends after the last message (the exchange said
    /// `Connection: close`): the next start is a new connection's on the
    /// same ports, whatever its sequence number. The server closes first,
    /// so the client may take the port again at once: Linux's clock-driven
    /// initial sequence number then lands less than [`NEW_CONNECTION_GAP`]
    /// past the old stream, where only this fact tells the two apart.
    Ended,
}

/// What a request's method means for the length of its response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Method {
    Other = 0,
    /// The response has no body, whatever its Content-Length says.
    Head = 1,
    /// A 2xx response turns the connection into a tunnel.
    Connect = 2,
}

#[derive(Clone, Copy, Debug)]
struct Stream {
    /// Monotonic time of the last start, in ms, wrapping (49 days): the
    /// older half goes first. 32 bits keep an entry at 32 bytes, not 40:
    /// a megabyte per 100k open flows.
    ts_ms: u32,
    /// Sequence number of the last message start emitted.
    last_start: u32,
    /// Where the next message must start (when `sync` is `At`).
    next: u32,
    /// The acknowledgement number of the latest start-like segment sent
    /// this way (accepted or not: it is a TCP fact either way).
    last_ack: u32,
    /// Methods of the requests sent this way still awaiting their
    /// responses, two bits each, oldest in the low bits.
    awaited: u32,
    awaited_n: u8,
    sync: Sync,
}

impl Stream {
    /// A start already taken: a retransmission, or its copy from a second
    /// interface.
    fn is_duplicate(&self, seq: u32) -> bool {
        self.last_start.wrapping_sub(seq) < DUP_WINDOW
    }

    fn far_from(&self, seq: u32) -> bool {
        seq.wrapping_sub(self.last_start) >= AHEAD_WINDOW
            && self.last_start.wrapping_sub(seq) >= DUP_WINDOW
    }

    fn note_ack(&mut self, ack: u32) {
        if (ack.wrapping_sub(self.last_ack) as i32) > 0 {
            self.last_ack = ack;
        }
    }

    fn await_response(&mut self, m: Method) {
        if self.awaited_n == MAX_AWAITED {
            // Pipelined deeper than remembered: the oldest is forgotten,
            // and with it only a HEAD's or CONNECT's special case.
            self.awaited >>= 2;
            self.awaited_n -= 1;
        }
        self.awaited |= (m as u32) << (2 * u32::from(self.awaited_n));
        self.awaited_n += 1;
    }

    fn awaited_front(&self) -> Method {
        match (self.awaited_n > 0).then_some(self.awaited & 3) {
            Some(1) => Method::Head,
            Some(2) => Method::Connect,
            _ => Method::Other,
        }
    }

    fn answered(&mut self) {
        if self.awaited_n > 0 {
            self.awaited >>= 2;
            self.awaited_n -= 1;
        }
    }
}

/// Whether a start may be read as a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// At the expected boundary, or the stream's first sighting.
    Accept,
    /// An unsynchronised stream found its boundary again.
    Resync,
    /// A start already taken (retransmission, second interface).
    Duplicate,
    /// Inside the body of the previous message.
    InsideBody,
    /// The stream lost its boundary and this start is not at an
    /// acknowledged one.
    Unsynchronised,
    /// On an upgraded or tunnelled connection.
    Tunnel,
}

impl Admit {
    pub fn accepted(self) -> bool {
        matches!(self, Self::Accept | Self::Resync)
    }
}

/// Starts not read as messages, and resynchronisations, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BoundaryStats {
    pub duplicates: u64,
    pub inside_body: u64,
    pub unsynchronised: u64,
    pub tunnel: u64,
    /// Streams that lost their boundary (counted once per loss).
    pub lost: u64,
    /// Streams that found it again.
    pub resyncs: u64,
}

/// A message start was emitted already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duplicate;

/// What a message emitted tells of its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emitted {
    /// Where the next message on the stream starts, if that is known.
    pub next: Option<u32>,
    /// The connection ends after it ([`Sync::Ended`]): it says so, or it
    /// is the final answer to a request that did.
    pub ends_connection: bool,
}

/// How the body after a head ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Len(u64),
    Chunked,
    /// Delimited by the connection's end, or not knowable.
    Unknown,
    Tunnel,
}

/// The boundaries of every stream seen.
#[derive(Default)]
pub struct Streams {
    /// Keyed by the flow's 64-bit hash: a 40-byte key would double the
    /// entry. Two live flows colliding would cost one of them its checks.
    map: FastMap<u64, Stream>,
    hash: foldhash::fast::RandomState,
    pub stats: BoundaryStats,
}

impl Streams {
    fn key(&self, flow: &Flow) -> u64 {
        self.hash.hash_one(flow)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether a start at `seq` on `flow` (whose segment acknowledged
    /// `ack`) may be read as a message; counts it if not.
    pub fn admit(&mut self, flow: &Flow, seq: u32, ack: u32) -> Admit {
        let key = self.hash.hash_one(flow);
        let Some(s) = self.map.get_mut(&key) else {
            return Admit::Accept;
        };
        s.note_ack(ack);
        let s = *s;
        // Only a stream that lost its boundary asks the other direction.
        let at_reverse_ack = || {
            self.map
                .get(&self.hash.hash_one(flow.reversed()))
                .is_some_and(|r| r.last_ack == seq)
        };
        // A new connection on the same ports may start just *ahead* of the
        // old stream rather than far from it: Linux's initial sequence
        // numbers advance with the clock (~16 MB a second), and a
        // connection reusing a 4-tuple in TIME_WAIT starts just past the
        // old one's end (+ 65537). It shows in two facts at once: its start
        // is megabytes past the old stream's end, and its acknowledgement
        // lies outside the receive window of the other direction (within
        // one connection a peer acknowledges at most what was sent, and at
        // least that minus what it has yet to read). Messages that were
        // merely not seen, on the same connection, move neither that far.
        let new_connection = || {
            seq.wrapping_sub(s.next).wrapping_sub(NEW_CONNECTION_GAP) < AHEAD_WINDOW
                && self
                    .map
                    .get(&self.hash.hash_one(flow.reversed()))
                    .is_some_and(|r| {
                        r.sync == Sync::At && r.next.wrapping_sub(ack) >= RECEIVE_WINDOW
                    })
        };
        let mut lost = false;
        let verdict = if s.is_duplicate(seq) {
            Admit::Duplicate
        } else {
            match s.sync {
                Sync::Ended => Admit::Accept,
                Sync::Tunnel if s.far_from(seq) => Admit::Accept,
                Sync::Tunnel => Admit::Tunnel,
                Sync::At => {
                    let ahead = seq.wrapping_sub(s.next);
                    if ahead == 0 {
                        Admit::Accept
                    } else if seq.wrapping_sub(s.last_start) < s.next.wrapping_sub(s.last_start) {
                        Admit::InsideBody
                    } else if ahead < AHEAD_WINDOW && new_connection() {
                        Admit::Accept
                    } else if ahead < AHEAD_WINDOW {
                        // The message that started at `next` was not seen.
                        lost = true;
                        if at_reverse_ack() {
                            Admit::Resync
                        } else {
                            Admit::Unsynchronised
                        }
                    } else {
                        Admit::Accept
                    }
                }
                Sync::Lost if s.far_from(seq) || new_connection() => Admit::Accept,
                Sync::Lost if at_reverse_ack() => Admit::Resync,
                Sync::Lost => Admit::Unsynchronised,
            }
        };
        if lost && let Some(s) = self.map.get_mut(&key) {
            s.sync = Sync::Lost;
            self.stats.lost += 1;
        }
        let stat = match verdict {
            Admit::Accept => return verdict,
            Admit::Resync => &mut self.stats.resyncs,
            Admit::Duplicate => &mut self.stats.duplicates,
            Admit::InsideBody => &mut self.stats.inside_body,
            Admit::Unsynchronised => &mut self.stats.unsynchronised,
            Admit::Tunnel => &mut self.stats.tunnel,
        };
        *stat += 1;
        verdict
    }

    /// Records a message emitted at `seq` and returns where the next one on
    /// its stream starts, if that is known, and whether the connection ends
    /// after it; `Err(Duplicate)`, counted, if
    /// one was emitted there already (checked again when a head completes:
    /// a head that waited for its continuation may have been overtaken by
    /// its copy from another interface). `head` is `None` for bytes that
    /// did not parse as a head, and `complete` false for a head cut short
    /// (its length is not its message's); `after` holds the bytes copied
    /// after the head (where a chunked body's end may be found).
    #[allow(clippy::too_many_arguments)]
    pub fn emit(
        &mut self,
        flow: &Flow,
        seq: u32,
        ack: u32,
        ts_ns: u64,
        head: Option<&Head>,
        complete: bool,
        after: &[u8],
    ) -> Result<Emitted, Duplicate> {
        let key = self.key(flow);
        if self.map.get(&key).is_some_and(|s| s.is_duplicate(seq)) {
            self.stats.duplicates += 1;
            return Err(Duplicate);
        }
        // The other direction's key, hashed only when a response or a
        // tunnel needs it.
        let hash = self.hash.clone();
        let reverse = || hash.hash_one(flow.reversed());
        // Whether the connection ends after this message: it says so, or
        // it is the final answer to a request that said so.
        let mut ends = head.is_some_and(Head::closes_connection);
        let body = match head {
            None => Body::Unknown,
            Some(h) => match &h.start {
                StartLine::Request { .. } => request_body(h),
                StartLine::Response { status, .. } => {
                    let status = *status;
                    let (method, request_ended) = match self.map.get_mut(&reverse()) {
                        Some(r) => {
                            let method = r.awaited_front();
                            if !is_interim(status) {
                                r.answered();
                            }
                            (method, r.sync == Sync::Ended)
                        }
                        None => (Method::Other, false),
                    };
                    ends = !is_interim(status) && (ends || request_ended);
                    response_body(h, status, method)
                }
            },
        };
        let body = match body {
            Body::Len(_) | Body::Chunked if !complete => Body::Unknown,
            b => b,
        };
        let head_len = head.map_or(0, |h| h.len);
        let (sync, next) = match body {
            Body::Len(n) => (
                Sync::At,
                Some(seq.wrapping_add(head_len as u32).wrapping_add(n as u32)),
            ),
            Body::Chunked => match chunked_len(after) {
                Some(n) => (
                    Sync::At,
                    Some(seq.wrapping_add(head_len as u32).wrapping_add(n as u32)),
                ),
                None => (Sync::Lost, None),
            },
            Body::Unknown => (Sync::Lost, None),
            Body::Tunnel => (Sync::Tunnel, None),
        };
        if sync == Sync::Tunnel
            && let Some(r) = self.map.get_mut(&reverse())
        {
            r.sync = Sync::Tunnel;
        }
        let ends_connection = ends && sync != Sync::Tunnel;
        let sync = if ends_connection {
            // A final answer that ends the connection ends its requests'
            // direction too.
            if matches!(head.map(|h| &h.start), Some(StartLine::Response { .. }))
                && let Some(r) = self.map.get_mut(&reverse())
                && r.sync != Sync::Tunnel
            {
                r.sync = Sync::Ended;
            }
            Sync::Ended
        } else {
            sync
        };
        let ts_ms = (ts_ns / 1_000_000) as u32;
        if self.map.len() >= MAX_STREAMS && !self.map.contains_key(&key) {
            self.forget_oldest_half(ts_ms);
        }
        let s = self.map.entry(key).or_insert(Stream {
            ts_ms,
            last_start: seq,
            next: seq,
            last_ack: ack,
            awaited: 0,
            awaited_n: 0,
            sync,
        });
        if s.sync != Sync::Lost && sync == Sync::Lost {
            self.stats.lost += 1;
        }
        s.ts_ms = ts_ms;
        s.last_start = seq;
        s.next = next.unwrap_or(seq);
        s.sync = sync;
        s.note_ack(ack);
        if let Some(StartLine::Request { method, .. }) = head.map(|h| &h.start) {
            s.await_response(match *method {
                "HEAD" => Method::Head,
                "CONNECT" => Method::Connect,
                _ => Method::Other,
            });
        }
        Ok(Emitted {
            next,
            ends_connection,
        })
    }

    /// Keeps [`MAX_STREAMS`] a hard bound at amortised O(1) per insert. A
    /// stream dropped while alive takes its next start as a first sighting.
    /// Ages are taken from `now_ms`, so the clock's wrap does not matter.
    fn forget_oldest_half(&mut self, now_ms: u32) {
        let age = |s: &Stream| now_ms.wrapping_sub(s.ts_ms);
        let mut ages: Vec<u32> = self.map.values().map(age).collect();
        let mid = ages.len() / 2;
        let (_, &mut cutoff, _) = ages.select_nth_unstable(mid);
        self.map.retain(|_, s| age(s) < cutoff);
    }
}

/// The Content-Length a head declares: `None` if absent, `Err` if it is
/// not one number (several different values, or not a number: a request
/// smuggling attempt or a broken peer, either way no length to trust).
fn content_length(head: &Head) -> Result<Option<u64>, ()> {
    let mut found = None;
    for v in head.header_all("content-length") {
        for part in v.split(',') {
            let n: u64 = part.trim().parse().map_err(|_| ())?;
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Transfer-Encoding: `None` if absent, `Some(true)` if chunked is the
/// final coding (the body is self-delimiting), `Some(false)` otherwise.
fn chunked(head: &Head) -> Option<bool> {
    let mut last = None;
    for v in head.header_all("transfer-encoding") {
        for coding in v.split(',') {
            let c = coding.trim();
            if !c.is_empty() {
                last = Some(c.eq_ignore_ascii_case("chunked"));
            }
        }
    }
    last
}

/// The body a head frames itself: chunked (the final coding), another
/// coding (no length to trust), or Content-Length. `None` if it says
/// neither.
fn framed(head: &Head) -> Option<Body> {
    match chunked(head) {
        Some(true) => Some(Body::Chunked),
        Some(false) => Some(Body::Unknown),
        None => match content_length(head) {
            Ok(Some(n)) => Some(Body::Len(n)),
            Ok(None) => None,
            Err(()) => Some(Body::Unknown),
        },
    }
}

/// A request without Transfer-Encoding or Content-Length has no body
/// (CONNECT's tunnel begins with its 2xx response, see `response_body`).
fn request_body(head: &Head) -> Body {
    framed(head).unwrap_or(Body::Len(0))
}

fn response_body(head: &Head, status: u16, method: Method) -> Body {
    if status == 101 || (method == Method::Connect && (200..300).contains(&status)) {
        return Body::Tunnel;
    }
    if status < 200 || status == 204 || status == 304 || method == Method::Head {
        return Body::Len(0);
    }
    // Without either, delimited by the connection's close: nothing follows.
    framed(head).unwrap_or(Body::Unknown)
}

/// The length of a chunked body (chunks, last chunk, trailers, blank line)
/// at the start of `b`, if all of it is there and well formed.
pub fn chunked_len(b: &[u8]) -> Option<usize> {
    let line_end = |from: usize| -> Option<usize> {
        b.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    };
    let mut i = 0;
    loop {
        let eol = line_end(i)?;
        let size = b[i..eol].split(|&c| c == b';').next()?;
        let size = std::str::from_utf8(size).ok()?.trim_matches([' ', '\t']);
        if size.is_empty() || size.len() > 15 {
            return None;
        }
        let size = usize::from_str_radix(size, 16).ok()?;
        i = eol + 2;
        if size == 0 {
            // Trailer fields, then the blank line.
            loop {
                let eol = line_end(i)?;
                if eol == i {
                    return Some(i + 2);
                }
                i = eol + 2;
            }
        }
        i = i.checked_add(size)?;
        if b.get(i..i.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        i += 2;
    }
}

#[cfg(test)]
mod tests;
