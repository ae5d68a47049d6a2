//! tracegap's TC programs: find the start of HTTP/1.x messages in TCP
//! segments and copy their header block to user space; follow cleartext
//! HTTP/2 connections frame by frame and copy their header frames ([`h2`]).
//!
//! Why the kernel copies bytes instead of parsing headers: matching header
//! names case-insensitively at arbitrary offsets, across segments, is what
//! the verifier makes expensive and fragile, and what user space does
//! cheaply, safely and testably (unit tests and a fuzz target). The kernel
//! therefore only answers "is this the start of an HTTP message, or the
//! continuation of a header block we are following?" and copies a bounded
//! number of bytes. See `tracegap-agent/src/http` for the parsing.
//!
//! The programs never modify a packet and always return `TC_ACT_UNSPEC`
//! ("no opinion": the next program or the default action decides), so the
//! data path fails open whatever happens here.
// Builds for the host too, so `cargo clippy --workspace` lints this crate.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Map keys go by reference on purpose: by value, each call copies the key
// into a stack slot of its own, and the slots add up against the 512-byte
// stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod diag;
mod h2;
mod net;
mod ssl;
mod threads;

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use tracegap_common::{
    Direction, EVENT_HEADER_LEN, EventHeader, EventKind, FlowKey, H2_BUDGET, HEADER_BUDGET,
    LOCAL_SOURCE_WINDOW_NS, MAX_LOCAL_SOURCES, MAX_OPEN_HEADERS, MAX_PAYLOAD, OpenHeader, OpenKey,
    RING_BUFFER_BYTES, SHORT_START_BUDGET, SourceKey, TLS_HELLO_BUDGET, WAKEUP_AGE_NS,
    WAKEUP_BYTES, ablate, counter, event_flags,
};

use crate::net::Segment;

/// Events to user space: an [`EventHeader`] and its payload bytes, in
/// records of a few fixed sizes ([`send`]).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// When the kernel last woke the ring's reader (coarse ktime ns): see
/// [`wakeup_flags`]. One slot for all CPUs: a race between two costs at
/// most one extra wakeup.
#[map]
static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

/// The submit flags of a record with `n` payload bytes. The reader is woken
/// as the unread bytes cross WAKEUP_BYTES (once: a wakeup per event costs
/// the node a context switch per HTTP message, and a wakeup per event
/// while the reader lags behind cost 5 µs per event in `cargo xtask bench
/// --kernel`), and when it was last woken more than WAKEUP_AGE_NS ago: the
/// first event after a quiet spell wakes it at once, later ones wait for
/// the mark or the age, and the reader (which drains once more WAKEUP_AGE
/// after a drain that found records) never polls an empty ring. `now`:
/// ktime in ns, coarse where the program type allows it (TC; tracing
/// programs may not call the coarse clock).
#[inline(always)]
pub(crate) fn wakeup_flags(n: u32, now: u64) -> u64 {
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let crossing = pending < WAKEUP_BYTES as u64
        && pending + (EVENT_HEADER_LEN as u64) + n as u64 >= WAKEUP_BYTES as u64;
    let wake = match LAST_WAKEUP.get_ptr_mut(0) {
        Some(last) => {
            // SAFETY: the map's one slot, a u64.
            let aged = now.wrapping_sub(unsafe { *last }) > WAKEUP_AGE_NS;
            if crossing || aged {
                // SAFETY: as above.
                unsafe { *last = now };
            }
            crossing || aged
        }
        None => crossing,
    };
    (if wake {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }) as u64
}

/// Per-CPU counters, indexed by [`counter`], all in one entry: one lookup
/// per run instead of one per counter touched.
#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

type Counters = [u64; counter::COUNT as usize];

/// Sources seen sending an HTTP message out of a pod through a watched
/// interface (ktime ns of the last one). A packet from a local pod to a
/// local pod crosses two watched veths: it is copied on the way out of the
/// first and only counted on the way into the second, so each message
/// reaches user space once. Traffic from elsewhere (other nodes, the host,
/// an unwatched pod) is still copied on its way in.
#[map]
static LOCAL_SOURCES: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(MAX_LOCAL_SOURCES, 0);

/// Request header blocks that did not end in the segment that started them.
/// LRU, so flows that end without closing their block age out by themselves.
#[map]
static OPEN_HEADERS: LruHashMap<OpenKey, OpenHeader> =
    LruHashMap::with_max_entries(MAX_OPEN_HEADERS, 0);

/// When a header block was last left open on a flow that hashes to each
/// slot (ktime ns; 0: never). A segment that starts no message looks up
/// OPEN_HEADERS only if its flow's slot was written within OPEN_WINDOW_NS
/// (user space gives up on an unfinished head after 2 s anyway): bulk
/// traffic, the bulk of all packets, then costs an array read instead of a
/// hash lookup (60 ns in `cargo xtask bench --kernel`), and so does the
/// end of a request that ended in its first segment. A collision only
/// costs a lookup. Plain stores from any CPU are fine: any writer writes a
/// recent time.
#[map]
static OPEN_SLOTS: Array<u64> = Array::with_max_entries(net::OPEN_SLOTS, 0);
const OPEN_WINDOW_NS: u64 = 3_000_000_000;

#[inline(always)]
fn clock() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn note_open(seg: &Segment, ts_ns: u64) {
    if let Some(p) = OPEN_SLOTS.get_ptr_mut(seg.slot) {
        unsafe { core::ptr::write_volatile(p, ts_ns) };
    }
}

/// The time now (from `now`, called only when needed) if a block was
/// opened on this flow's slot within OPEN_WINDOW_NS, else None: a slot
/// never written costs no clock read, and a caller that already has the
/// time passes it instead of reading the clock again.
#[inline(always)]
fn recently_opened(seg: &Segment, now: impl FnOnce() -> u64) -> Option<u64> {
    let Some(p) = OPEN_SLOTS.get_ptr(seg.slot) else {
        return Some(now());
    };
    let last = unsafe { core::ptr::read_volatile(p) };
    if last == 0 {
        return None;
    }
    let now = now();
    (now.saturating_sub(last) < OPEN_WINDOW_NS).then_some(now)
}

/// [`ablate`] bits: steps the bench switches off. Read-only data the agent
/// leaves at 0; the verifier then drops every branch that tests it.
#[unsafe(no_mangle)]
static ABLATE: Global<u32> = Global::new(0);

#[inline(always)]
fn ablated(step: u32) -> bool {
    ABLATE.load() & step != 0
}

#[classifier]
pub fn tracegap_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Direction::Ingress);
    diag::hand_over(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tracegap_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Direction::Egress);
    diag::hand_over(&ctx);
    TC_ACT_UNSPEC
}

/// Logs what a packet's steps noted (`--kernel-log debug`): tail-called by
/// the two above once their packet is done ([`diag`] says why a program of
/// its own). Loaded only with the log on.
#[classifier]
pub fn tracegap_diagnose(_ctx: TcContext) -> i32 {
    if diag::flush() != 0
        && let Some(c) = COUNTERS.get_ptr_mut(0)
    {
        // SAFETY: the per-CPU entry is this CPU's alone while the program runs.
        count(unsafe { &mut *c }, counter::DIAGNOSTICS);
    }
    TC_ACT_UNSPEC
}

/// Per-CPU: no other writer, a plain add is enough.
#[inline(always)]
fn count(counters: &mut Counters, index: u32) {
    if let Some(c) = counters.get_mut(index as usize) {
        *c += 1;
    }
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: Direction) {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU entry is this CPU's alone while the program runs.
    let counters = unsafe { &mut *counters };
    count(counters, counter::PACKETS);
    match net::tcp_segment(ctx) {
        Ok(Some(_)) if ablated(ablate::AFTER_PARSE) => {}
        Ok(Some(seg)) => {
            count(counters, counter::TCP_PAYLOAD);
            // A followed HTTP/2 connection's segment is its frames,
            // whatever its first bytes look like (a DATA payload may well
            // start with "GET ").
            let mut next = if ablated(ablate::FLOW_MAPS) || !h2::maybe_followed(&seg) {
                Ok(Next::Pass)
            } else {
                h2::segment(ctx, &seg, direction, counters)
            };
            if let Ok(Next::Pass) = next {
                next = try_http(ctx, &seg, direction, counters);
            }
            // A client preface: the connection is followed from here, and
            // this segment is its first.
            if let Ok(step @ (Next::H2Start | Next::H2Join)) = next {
                let preface = matches!(step, Next::H2Start);
                next = if h2::start(ctx, &seg, preface) {
                    h2::segment(ctx, &seg, direction, counters)
                } else {
                    diag::note(&seg.flow, diag::Why::H2NotFollowed, 0);
                    Ok(Next::Nothing)
                };
            }
            // The copy, called from here: each step above and the copy
            // each add their stack frame to this one's alone, never to each
            // other's (6.1 counts every frame of a call chain, rounded up
            // to 32 bytes, against the 512-byte limit).
            match next {
                Ok(Next::Copy) => {
                    let Some(c) = PLAN.get_ptr(0) else { return };
                    // SAFETY: this CPU's entry, written by the step above.
                    let c = unsafe { &*c };
                    match copy(ctx, c, counters) {
                        Ok(copied) if c.first == EventKind::Http2 && copied < c.seg.payload_len => {
                            diag::note(&c.seg.flow, diag::Why::H2PastBudget, 0);
                            count(counters, counter::BUDGET_EXHAUSTED)
                        }
                        Ok(_) => {}
                        Err(()) => count(counters, counter::PARSE_ERRORS),
                    }
                }
                Ok(_) => {}
                Err(()) => count(counters, counter::PARSE_ERRORS),
            }
        }
        Ok(None) => {}
        Err(()) => count(counters, counter::PARSE_ERRORS),
    }
}

#[inline(always)]
fn source_key(flow: &FlowKey) -> SourceKey {
    SourceKey {
        addr: flow.saddr,
        family: flow.family,
        _pad: [0, 0, 0],
    }
}

/// Leaving a pod: its address is local. Written at most once a second per
/// source, so the common case is a lookup, not an LRU update.
#[inline(always)]
pub(crate) fn note_local_source(flow: &FlowKey, now: u64) {
    let key = source_key(flow);
    if let Some(seen) = LOCAL_SOURCES.get_ptr(&key)
        && now.saturating_sub(unsafe { *seen }) < 1_000_000_000
    {
        return;
    }
    let _ = LOCAL_SOURCES.insert(&key, now, 0);
}

/// Entering a pod: was this packet already copied leaving a local one?
#[inline(always)]
fn from_local_source(flow: &FlowKey, now: u64) -> bool {
    recent_local(&source_key(flow), now)
}

/// Leaving a pod: is it going to a pod of this node (one seen sending
/// lately)?
#[inline(always)]
fn to_local_source(flow: &FlowKey, now: u64) -> bool {
    let key = SourceKey {
        addr: flow.daddr,
        family: flow.family,
        _pad: [0, 0, 0],
    };
    recent_local(&key, now)
}

#[inline(always)]
fn recent_local(key: &SourceKey, now: u64) -> bool {
    match LOCAL_SOURCES.get_ptr(key) {
        Some(seen) => now.saturating_sub(unsafe { *seen }) < LOCAL_SOURCE_WINDOW_NS,
        None => false,
    }
}

/// Start lines as the kernel recognises them, padded to 8 bytes, with
/// their lengths: each method with its space, so "GETTING" is not a GET,
/// and the status line's version prefix. Arrays, not slices: no bounds
/// check the verifier would have to follow.
const STARTS: [([u8; 8], usize); 10] = [
    (*b"GET \0\0\0\0", 4),
    (*b"POST \0\0\0", 5),
    (*b"PUT \0\0\0\0", 4),
    (*b"PATCH \0\0", 6),
    (*b"DELETE \0", 7),
    (*b"HEAD \0\0\0", 5),
    (*b"OPTIONS ", 8),
    (*b"CONNECT ", 8),
    (*b"TRACE \0\0", 6),
    (*b"HTTP/1.\0", 7),
];

/// The first bytes of a segment: the start of a request or a response?
#[inline(always)]
fn classify_start(head: &[u8; 8]) -> Option<EventKind> {
    let request = match head[0] {
        b'G' => head[..4] == *b"GET ",
        b'P' => head[..5] == *b"POST " || head[..4] == *b"PUT " || head[..6] == *b"PATCH ",
        b'D' => head[..7] == *b"DELETE ",
        b'H' => {
            if head[..5] == *b"HEAD " {
                true
            } else if head[..7] == *b"HTTP/1." && (head[7] == b'0' || head[7] == b'1') {
                return Some(EventKind::Response);
            } else {
                false
            }
        }
        b'O' => head[..8] == *b"OPTIONS ",
        b'C' => head[..8] == *b"CONNECT ",
        b'T' => head[..6] == *b"TRACE ",
        _ => false,
    };
    request.then_some(EventKind::Request)
}

/// A TLS handshake record (type 22, version 3.x) holding a ClientHello
/// (handshake type 1): a connection's first bytes from its client.
#[inline(always)]
fn client_hello(head: &[u8; 8]) -> bool {
    head[0] == 0x16 && head[1] == 0x03 && head[2] <= 0x04 && head[5] == 0x01
}

/// Whether the `len` (1..=7) bytes of a short segment are the beginning of
/// a start line: a request written a few bytes at a time ("P", "OST /x").
/// Which kind it is user space tells once the line is complete.
#[inline(always)]
fn is_short_start(head: &[u8; 8], len: u32) -> bool {
    // Whole words, masked, not a byte loop: a loop with a branch per byte
    // and per start line multiplies the paths 6.1's verifier walks (it
    // reached its 1M-instruction bound here).
    let len = (len & 7) as u64;
    let valid = (1u64 << (8 * len)).wrapping_sub(1);
    let h = u64::from_le_bytes(*head) & valid;
    let mut any = false;
    for (start, start_len) in STARTS {
        let mask = valid & (u64::MAX >> (8 * (8 - start_len as u64)));
        any |= h & mask == u64::from_le_bytes(start) & mask;
    }
    any
}

/// What the caller does next with a segment.
enum Next {
    /// Not a followed HTTP/2 connection's: read it as HTTP/1.x.
    Pass,
    /// Nothing to copy.
    Nothing,
    /// It starts an HTTP/2 connection to follow ([`h2::start`]).
    H2Start,
    /// It starts with a HEADERS frame of an HTTP/2 connection not
    /// followed: follow it from here ([`h2::start`]).
    H2Join,
    /// Copy what [`PLAN`] says ([`copy`]).
    Copy,
}

/// The copy a step decided on, for [`observe`] to make: per CPU, so the
/// plan takes no stack in the step that writes it nor in the caller.
#[map]
static PLAN: PerCpuArray<Chunks> = PerCpuArray::with_max_entries(1, 0);

/// Writes the copy to make into [`PLAN`]: `Next::Copy`, or `Next::Nothing`
/// if the entry is missing (it never is: one entry, always there).
#[inline(always)]
fn plan(c: Chunks) -> Next {
    match PLAN.get_ptr_mut(0) {
        Some(p) => {
            // SAFETY: this CPU's entry, only used while this program runs.
            unsafe { p.write(c) };
            Next::Copy
        }
        None => Next::Nothing,
    }
}

/// Reads an HTTP/1.x segment: its state is updated here, the copy is the
/// caller's (see [`Next`]).
fn try_http(
    ctx: &TcContext,
    seg: &Segment,
    direction: Direction,
    counters: &mut Counters,
) -> Result<Next, ()> {
    let mut head = [0u8; 8];
    let short = seg.payload_len < 8;
    if !short {
        head = net::read(ctx, seg.payload_off as usize)?;
    } else {
        // A whole request line is at least 14 bytes; a segment this short
        // starts one only when a client writes a few bytes at a time. It
        // may also continue a header block.
        let n = ((seg.payload_len.wrapping_sub(1)) & 7) + 1;
        let ret = unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                seg.payload_off,
                head.as_mut_ptr().cast(),
                n,
            )
        };
        if ret != 0 {
            return Err(());
        }
    }
    let key = OpenKey {
        flow: seg.flow,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        _pad: 0,
    };

    if ablated(ablate::AFTER_CLASSIFY) {
        // What classifying costs, without the map lookups a short or
        // non-start segment adds; counted so the work is not optimised out.
        if !short && classify_start(&head).is_some() {
            count(counters, counter::HTTP_REQUESTS);
        }
        return Ok(Next::Nothing);
    }
    let start = if short {
        // A few bytes that continue the block being followed are just
        // that: "O" after "P" is not the start of an OPTIONS request.
        let continues = !ablated(ablate::FLOW_MAPS)
            && recently_opened(seg, clock).is_some()
            && OPEN_HEADERS
                .get_ptr(&key)
                .is_some_and(|o| unsafe { (*o).next_seq == seg.seq && (*o).budget_left > 0 });
        (!continues && is_short_start(&head, seg.payload_len)).then_some(EventKind::Request)
    } else {
        classify_start(&head)
    };
    // An HTTP/2 connection: followed from here (leaving the pod that opened
    // it, or entering one from elsewhere), once. From its preface; or,
    // one already open when the programs were loaded (an agent restart:
    // gRPC connections live for hours), from a segment that starts with a
    // HEADERS frame (user space decodes what it can without the table).
    let h2 = match start {
        None if !short && head == *b"PRI * HT" => Some(counter::H2_PREFACES),
        None if !short && h2::headers_frame(&head) => Some(counter::H2_JOINS),
        _ => None,
    };
    if let Some(counted) = h2 {
        let now = clock();
        // Between two pods of this node a connection crosses both their
        // veths: it is followed on the client's only. A preface leaves
        // the client's pod first. A connection joined is told by its
        // segment's side: a request leaving its pod, or an answer
        // entering it, is on the client's veth; anything else (a request
        // entering the server's pod, an answer or a block of trailers
        // leaving it, a side that cannot be told) is left alone when the
        // other end is a pod here, whose veth follows the same connection
        // (or will, at its next request). Followed on both, every call
        // would be read twice.
        let side = match counted {
            counter::H2_JOINS => h2::side_of(ctx, seg, &head),
            _ => h2::Side::Client,
        };
        match direction {
            _ if ablated(ablate::FLOW_MAPS) => {}
            Direction::Ingress => {
                note_local_source(&seg.flow, now);
                if side != h2::Side::Client && to_local_source(&seg.flow, now) {
                    count(counters, counter::SECOND_SIGHTINGS);
                    return Ok(Next::Nothing);
                }
            }
            // An answer entering the client's pod: its veth is the one.
            Direction::Egress if side == h2::Side::Server => {}
            Direction::Egress if from_local_source(&seg.flow, now) => {
                // Left alone on both veths: the one place a join is lost.
                if side == h2::Side::Unknown {
                    diag::note(&seg.flow, diag::Why::H2JoinRefused, 0);
                }
                count(counters, counter::SECOND_SIGHTINGS);
                return Ok(Next::Nothing);
            }
            Direction::Egress => {}
        }
        count(counters, counted);
        return Ok(match () {
            _ if ablated(ablate::FLOW_MAPS) => Next::Nothing,
            _ if counted == counter::H2_PREFACES => Next::H2Start,
            _ => Next::H2Join,
        });
    }
    // A TLS connection's ClientHello: copied like a request's head (once,
    // on the client's veth), so that the encrypted edge is known and
    // counted with its server name; nothing after it is read.
    let start = match start {
        None if !short && client_hello(&head) => Some(EventKind::TlsHello),
        other => other,
    };
    let (kind, budget, ts_ns) = match start {
        Some(kind) => {
            let (counted, budget) = match kind {
                _ if short => (counter::SHORT_STARTS, SHORT_START_BUDGET),
                EventKind::TlsHello => (counter::TLS_HELLOS, TLS_HELLO_BUDGET),
                EventKind::Request => (counter::HTTP_REQUESTS, HEADER_BUDGET),
                _ => (counter::HTTP_RESPONSES, HEADER_BUDGET),
            };
            count(counters, counted);
            let now = clock();
            // Its sockets' turns say which threads wrote and read it; on
            // every veth it crosses, as each end's socket may name it
            // differently (a Service address before DNAT, the pod's after).
            if kind == EventKind::Request && !ablated(ablate::FLOW_MAPS) {
                threads::watch(&seg.flow);
            }
            match direction {
                _ if ablated(ablate::FLOW_MAPS) => {}
                Direction::Ingress => note_local_source(&seg.flow, now),
                Direction::Egress if from_local_source(&seg.flow, now) => {
                    // Its continuations are skipped too: no block is opened
                    // for this interface.
                    count(counters, counter::SECOND_SIGHTINGS);
                    return Ok(Next::Nothing);
                }
                Direction::Egress => {}
            }
            (kind, budget, now)
        }
        None => {
            // Not a start: only interesting if it continues a block we follow.
            if ablated(ablate::FLOW_MAPS) {
                return Ok(Next::Nothing);
            }
            let Some(now) = recently_opened(seg, clock) else {
                return Ok(Next::Nothing);
            };
            let Some(open) = OPEN_HEADERS.get_ptr_mut(&key) else {
                return Ok(Next::Nothing);
            };
            let open = unsafe { &mut *open };
            if open.next_seq != seg.seq || open.budget_left == 0 {
                // Out of order, retransmitted or done: user space marks the
                // block truncated rather than guess what is missing.
                return Ok(Next::Nothing);
            }
            count(counters, counter::CONTINUATIONS);
            (EventKind::Continuation, open.budget_left, now)
        }
    };

    // Copy the segment in chunks of MAX_PAYLOAD, each its own event, until
    // the segment or the budget ends. A GSO super-packet can carry a whole
    // 12 KiB header block in one skb. The first chunk goes into a record of
    // the size it needs; the later ones (GSO only) are full-sized: one
    // choice of sizes, not one per chunk, keeps the paths the verifier
    // walks few enough for 6.1's.
    let followed = !matches!(kind, EventKind::Response | EventKind::TlsHello) || short;
    let ended = !followed || ends_with_blank_line(ctx, seg);
    let Some(c) = PLAN.get_ptr_mut(0) else {
        return Ok(Next::Nothing);
    };
    // SAFETY: this CPU's entry, only used while this program runs. Field
    // by field: no copy of the plan on this function's stack.
    unsafe {
        (*c).seg = *seg;
        (*c).ifindex = key.ifindex;
        (*c).ts_ns = ts_ns;
        (*c).direction = direction;
        (*c).short = short;
        (*c).budget = budget;
        (*c).first = kind;
        (*c).then = followed.then_some(EventKind::Continuation);
    }
    // Responses: the status line and the headers in the first chunk are all
    // the agent reads; bodies are never followed. What the copy will take
    // (the ring being full changes nothing here: the bytes are gone).
    if !followed || ablated(ablate::FLOW_MAPS) {
        return Ok(Next::Copy);
    }
    let copied = seg.payload_len.min(budget);
    let budget_left = budget - copied;
    if ended || budget_left == 0 {
        if !ended {
            diag::note(&seg.flow, diag::Why::Http1PastBudget, 0);
            count(counters, counter::BUDGET_EXHAUSTED);
        }
        // Only a block opened lately can be open still: most requests end
        // in their first segment, and skip the hash update.
        if recently_opened(seg, || ts_ns).is_some() {
            let _ = OPEN_HEADERS.remove(&key);
        }
    } else {
        let open = OpenHeader {
            next_seq: seg.seq.wrapping_add(seg.payload_len),
            budget_left,
        };
        if OPEN_HEADERS.insert(&key, open, 0).is_ok() {
            note_open(seg, ts_ns);
        }
    }
    Ok(Next::Copy)
}

/// Whether the segment's payload ends with CRLFCRLF: the common request
/// (no body) ends its header block right at the end of its segment.
///
/// Only the last four bytes are read: a byte-wise search for the blank line
/// is what the verifier rejects as too complex, and it would cost every
/// request. A block that does not end its segment is followed into the next
/// segments up to the budget, and user space finds where it really ends.
#[inline(always)]
fn ends_with_blank_line(ctx: &TcContext, seg: &Segment) -> bool {
    if seg.payload_len < 4 {
        return false;
    }
    matches!(
        net::read::<4>(ctx, (seg.payload_off + seg.payload_len - 4) as usize),
        Ok(tail) if tail == *b"\r\n\r\n"
    )
}

/// Copies the segment `c` describes in chunks of MAX_PAYLOAD bytes, each
/// its own event: the first of kind `c.first`, the rest (if `c.then`,
/// until the segment or the budget ends) of kind `c.then`. Returns the
/// bytes copied.
///
/// The first chunk, in a record of the size it needs, is sent from here:
/// most messages end in it. The later ones (a GSO segment of a followed
/// block, an HTTP/2 segment: up to H2_BUDGET, 16 chunks) are full-sized
/// records sent by a bpf_loop (Linux 5.17), whose body is verified for one
/// record size only, and not once per chunk: a loop unrolled that far took
/// 6.1's verifier past its 1M-instruction bound, and a body that chose
/// among the record sizes made newer verifiers walk every size in every
/// iteration they try. Not inlined: the first chunk's record and header
/// take a stack frame of their own, not the classifier's (6.1 counts every
/// frame of a call chain, rounded up to 32 bytes, against the 512-byte
/// limit).
#[inline(never)]
fn copy(ctx: &TcContext, c: &Chunks, counters: &mut Counters) -> Result<u32, ()> {
    let first = c.send(ctx, c.first, 0, true, counters)?;
    if c.then.is_none() || first < MAX_PAYLOAD as u32 {
        return Ok(first);
    }
    let mut l = CopyLoop {
        skb: ctx.skb.skb,
        chunks: c,
        counters,
        copied: first,
        failed: 0,
    };
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            H2_BUDGET / MAX_PAYLOAD as u32 - 1,
            copy_step as *mut core::ffi::c_void,
            core::ptr::addr_of_mut!(l).cast(),
            0,
        )
    };
    if ret < 0 || l.failed != 0 {
        return Err(());
    }
    Ok(l.copied)
}

/// [`copy`]'s state, on the caller's stack, for [`copy_step`].
#[repr(C)]
struct CopyLoop {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    chunks: *const Chunks,
    counters: *mut Counters,
    copied: u32,
    failed: u32,
}

/// One chunk after the first of [`copy`]: 0 to go on, 1 when the segment
/// or the budget has ended (or a load failed: `failed`).
extern "C" fn copy_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `copy` gave it, to its
    // `CopyLoop`, whose pointers (the plan, this CPU's counters) are
    // valid for as long as the program runs.
    let l = unsafe { &mut *ctx.cast::<CopyLoop>() };
    let (c, counters) = unsafe { (&*l.chunks, &mut *l.counters) };
    let tc = TcContext {
        skb: aya_ebpf::programs::sk_buff::SkBuff::new(l.skb),
    };
    let Some(kind) = c.then else { return 1 };
    // Every chunk before this one was full, so this one starts at
    // (index + 1) * MAX_PAYLOAD: worked out from the index, never read
    // back from the loop's state. A running total that the copy's offset
    // and length depend on is a value the verifier must track exactly,
    // and it differs in every iteration, so the callback's states never
    // look alike: one 6.18 build walked the programs in 912k instructions
    // that way (6.1 and 6.12: 46k and 52k). `copied` is only written here.
    let at = (index as u32)
        .wrapping_add(1)
        .wrapping_mul(MAX_PAYLOAD as u32);
    match c.send(&tc, kind, at, false, counters) {
        Ok(0) => 1,
        Ok(n) => {
            l.copied = at.wrapping_add(n);
            // A chunk short of full was the last: the next would start
            // past the segment's end.
            i64::from(n < MAX_PAYLOAD as u32)
        }
        Err(()) => {
            l.failed = 1;
            1
        }
    }
}

/// What every chunk of one segment's copy shares.
struct Chunks {
    seg: Segment,
    ifindex: u32,
    ts_ns: u64,
    direction: Direction,
    short: bool,
    budget: u32,
    /// The first chunk's kind, and the later chunks' (None: only the first).
    first: EventKind,
    then: Option<EventKind>,
}

impl Chunks {
    /// Sends the chunk that starts `copied` bytes into the segment, in a
    /// record of the size it needs (`sized`) or a full one; returns its
    /// length (0: the segment or the budget has ended).
    #[inline(always)]
    fn send(
        &self,
        ctx: &TcContext,
        kind: EventKind,
        copied: u32,
        sized: bool,
        counters: &mut Counters,
    ) -> Result<u32, ()> {
        let seg = &self.seg;
        if copied >= seg.payload_len || copied >= self.budget {
            return Ok(0);
        }
        let (remaining, left) = (seg.payload_len - copied, self.budget - copied);
        let n = remaining.min(left).min(MAX_PAYLOAD as u32);
        let mut flags = 0;
        if self.short && kind != EventKind::Continuation {
            flags |= event_flags::SHORT_START;
        }
        if remaining > n && left == n {
            flags |= event_flags::BUDGET_EXHAUSTED;
        }
        // Built only once the record is reserved, straight into it: a
        // header made before is held in registers across the reserve call,
        // and spilled, nearly doubling the frame of `copy` and of
        // `copy_step` (the chain the classifier, `copy` and `copy_step`
        // make is one 6.1 counts against its 512-byte stack limit).
        let header = || EventHeader {
            ts_ns: self.ts_ns,
            flow: seg.flow,
            ifindex: self.ifindex,
            seq: seg.seq.wrapping_add(copied),
            segment_len: seg.payload_len,
            payload_len: n as u16,
            direction: self.direction as u8,
            kind: kind as u8,
            flags,
            _pad: [0, 0, 0],
            ack: seg.ack,
        };
        emit(
            ctx,
            header,
            &seg.flow,
            seg.payload_off + copied,
            n,
            sized,
            counters,
        )?;
        Ok(n)
    }
}

/// Sends one event: `header()` and the `n` (1..=MAX_PAYLOAD) payload bytes
/// of `flow` at `off`, loaded straight into the ring buffer (one copy), in
/// a record of the next size up (`sized`) or a full-sized one.
#[inline(always)]
fn emit(
    ctx: &TcContext,
    header: impl Fn() -> EventHeader + Copy,
    flow: &FlowKey,
    off: u32,
    n: u32,
    sized: bool,
    counters: &mut Counters,
) -> Result<(), ()> {
    if ablated(ablate::RING) {
        return Ok(());
    }
    // SAFETY: a helper without arguments.
    let flags = wakeup_flags(n, unsafe {
        aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns()
    });
    // The record size must be a constant: a few sizes, so a 200-byte
    // request takes 256 bytes of ring, not 4 KiB.
    let sent = match n {
        _ if !sized => send::<MAX_PAYLOAD>(ctx, header, off, n, flags),
        0..=256 => send::<256>(ctx, header, off, n, flags),
        257..=512 => send::<512>(ctx, header, off, n, flags),
        513..=1024 => send::<1024>(ctx, header, off, n, flags),
        1025..=2048 => send::<2048>(ctx, header, off, n, flags),
        _ => send::<MAX_PAYLOAD>(ctx, header, off, n, flags),
    }?;
    if !sent {
        diag::note(flow, diag::Why::RecordDropped, n);
        count(counters, counter::RINGBUF_FULL);
    }
    Ok(())
}

/// A ring-buffer record: the header and room for `N` payload bytes, of
/// which `header.payload_len` are used.
#[repr(C)]
struct Record<const N: usize> {
    header: EventHeader,
    payload: [u8; N],
}

/// Reserves a record of size class `N` (a power of two), loads the
/// payload into it and writes `header()` beside it. `Ok(false)`: the ring
/// buffer is full.
#[inline(always)]
fn send<const N: usize>(
    ctx: &TcContext,
    header: impl Fn() -> EventHeader,
    off: u32,
    n: u32,
    flags: u64,
) -> Result<bool, ()> {
    let Some(mut entry) = EVENTS.reserve::<Record<N>>(0) else {
        return Ok(false);
    };
    let record = entry.as_mut_ptr();
    // Restates 1..=N in a form the verifier can follow through the
    // compiler's rewrites: bpf_skb_load_bytes takes no zero length. The
    // volatile read stops LLVM from folding the expression back to `n`;
    // the caller picked N >= n, so the mask changes nothing.
    let w = unsafe { core::ptr::read_volatile(&n) };
    let len = (w.wrapping_sub(1) & (N as u32 - 1)) + 1;
    // SAFETY: `record` points at the reserved record, N payload bytes long.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off,
            core::ptr::addr_of_mut!((*record).payload).cast(),
            len,
        )
    };
    if ret != 0 {
        entry.discard(BPF_RB_NO_WAKEUP as u64);
        return Err(());
    }
    unsafe { core::ptr::addr_of_mut!((*record).header).write(header()) };
    entry.submit(flags);
    Ok(true)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(all(test, not(target_arch = "bpf")))]
mod tests {
    use super::*;

    /// The byte-by-byte definition the masked words must agree with.
    fn naive(head: &[u8; 8], len: u32) -> bool {
        STARTS.iter().any(|(start, start_len)| {
            (0..8).all(|i| i >= len as usize || i >= *start_len || head[i] == start[i])
        })
    }

    #[test]
    fn short_starts_are_prefixes_of_start_lines() {
        let samples: [&[u8]; 12] = [
            b"G",
            b"GE",
            b"GET",
            b"P",
            b"PO",
            b"PAT",
            b"HTTP/",
            b"HTTP/1.",
            b"OPTIONS",
            b"X",
            b"GEX",
            b"\x16\x03\x01",
        ];
        for s in samples {
            for len in 1..=7u32 {
                let mut head = [0u8; 8];
                let n = s.len().min(len as usize);
                head[..n].copy_from_slice(&s[..n]);
                assert_eq!(
                    is_short_start(&head, len),
                    naive(&head, len),
                    "{s:?} len {len}"
                );
            }
        }
        assert!(is_short_start(
            &{
                let mut h = [0; 8];
                h[..3].copy_from_slice(b"POS");
                h
            },
            3
        ));
        assert!(!is_short_start(
            &{
                let mut h = [0; 8];
                h[..3].copy_from_slice(b"GEX");
                h
            },
            3
        ));
    }
}
