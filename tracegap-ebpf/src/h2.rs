//! Cleartext HTTP/2 (h2c, and gRPC without TLS): a connection is followed
//! from its client preface on, frame by frame, each direction on each
//! interface on its own ([`H2Follow`]).
//!
//! Why frames and not bytes: a gRPC connection carries every call's
//! messages, and the DATA frames are nearly all its bytes. The kernel reads
//! each frame's 5 first header bytes (length, type, flags) and copies only
//! what user space decodes: header-carrying frames whole, the header of a
//! DATA frame that ends its stream, nothing of other DATA. Per segment the
//! copy is one range, from the first wanted byte to the last, so a segment
//! costs one copy however many frames it holds (DATA between two wanted
//! frames comes along, within the budget).
//!
//! What user space relies on: events of one direction in sequence order;
//! bytes missing before an event's `seq` were skipped on purpose and the
//! event starts at a frame boundary, or its bytes continue the previous
//! event's. When a boundary cannot be known any more (a segment missed,
//! more frames in one segment than [`MAX_FRAMES`]), the kernel says so once
//! ([`event_flags::H2_LOST`]) and stops following the connection: nothing
//! is guessed.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    macros::map,
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use tracegap_common::{
    Direction, EventHeader, EventKind, H2_BUDGET, H2Follow, MAX_H2_FLOWS, OpenKey, counter,
    event_flags, h2_follow,
};

use crate::{
    Chunks, Counters, EVENTS, Next, count,
    diag::{self, Why},
    net::Segment,
};

/// Followed connections, per direction and interface.
#[map]
static H2_FLOWS: LruHashMap<OpenKey, H2Follow> = LruHashMap::with_max_entries(MAX_H2_FLOWS, 0);

/// Whether a connection followed as HTTP/2 ever hashed to each flow slot:
/// a segment of any other flow then costs an array read, not a hash
/// lookup. Never cleared (a stale slot costs a lookup, nothing more).
#[map]
static H2_SLOTS: Array<u32> = Array::with_max_entries(crate::net::OPEN_SLOTS, 0);

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: u32 = 24;
/// Frame headers read per segment at most: more than a 64 KiB GSO segment
/// can hold (a frame is 9 bytes at least: 7282), so only a BIG TCP segment
/// of tiny frames loses the connection (counted, never guessed past). A
/// segment costs a helper call per frame: a 64 KiB one of 16 KiB DATA
/// frames five, of the smallest calls a client writes at once (a HEADERS
/// frame of a few indexed fields and a short DATA frame) about 3200.
const MAX_FRAMES: u32 = 8192;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;

/// Bytes of a frame user space needs from its start: a header-carrying
/// frame whole (they change the HPACK table, or end a stream), the header
/// of a DATA frame that ends its stream, nothing of the rest.
#[inline(always)]
fn wanted(kind: u8, flags: u8, len: u32) -> u32 {
    match kind {
        HEADERS | CONTINUATION | PUSH_PROMISE | SETTINGS | RST_STREAM => 9 + len,
        DATA if flags & END_STREAM != 0 => 9,
        _ => 0,
    }
}

#[inline(always)]
fn set_slot(slot: u32) {
    if let Some(p) = H2_SLOTS.get_ptr_mut(slot) {
        unsafe { core::ptr::write_volatile(p, 1) };
    }
}

/// Whether a connection followed as HTTP/2 may own this segment's flow.
#[inline(always)]
pub fn maybe_followed(seg: &Segment) -> bool {
    H2_SLOTS
        .get_ptr(seg.slot)
        .is_none_or(|p| unsafe { core::ptr::read_volatile(p) } != 0)
}

/// Whether a segment's first bytes are a HEADERS frame's header as an
/// HTTP/2 sender writes one: a length within the default maximum frame
/// (16 KiB), only HEADERS' flags, a stream id with the reserved bit clear.
/// Text never starts so (its first byte would be NUL), nor TLS (0x14..0x17).
/// By chance, about one segment of random bytes in ten million; such a
/// false start is lost at its first impossible frame, and user space reads
/// nothing out of it.
#[inline(always)]
pub fn headers_frame(head: &[u8; 8]) -> bool {
    let len = u32::from(head[0]) << 16 | u32::from(head[1]) << 8 | u32::from(head[2]);
    head[3] == HEADERS && head[4] & !0x2d == 0 && head[5] & 0x80 == 0 && (1..=16384).contains(&len)
}

/// Which side sent the HEADERS frame that starts a segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Its block starts with a request's pseudo-header (static entries
    /// 1-7: `:authority`, `:method`, `:path`, `:scheme`).
    Client,
    /// Its block starts with `:status` (static entries 8-14).
    Server,
    /// Cannot be told: a dynamic entry, a table size update first, a
    /// block of trailers (`grpc-status` first: a server's, but no start
    /// to go by), a block shorter than 8 bytes, an even stream.
    Unknown,
}

/// [`Side`] of the HEADERS frame that starts `seg` (`head`: its first 8
/// bytes), by its header block's first field, indexed or as a literal's
/// name: every HTTP/2 sender writes pseudo-header fields first. The same
/// reading as user space's `first_block_side`.
#[inline(always)]
pub fn side_of(ctx: &TcContext, seg: &Segment, head: &[u8; 8]) -> Side {
    match side_index(ctx, seg, head) {
        Some(1..=7) => Side::Client,
        Some(8..=14) => Side::Server,
        _ => Side::Unknown,
    }
}

/// The static-table index the block's first field names, if any.
#[inline(always)]
fn side_index(ctx: &TcContext, seg: &Segment, head: &[u8; 8]) -> Option<u8> {
    let flags = head[4];
    // The stream id's last byte is head[8]: odd for client-initiated
    // streams, read with the block below.
    if seg.payload_len < 16 {
        return None;
    }
    let mut b = [0u8; 8];
    if load(ctx, seg.payload_off + 8, &mut b, 8).is_err() {
        return None;
    }
    if b[0] & 1 == 0 {
        return None;
    }
    // The block starts after the pad length (PADDED) and the priority
    // fields (PRIORITY): at b[1 + skip].
    let skip = u32::from(flags & 0x8 != 0) + 5 * u32::from(flags & 0x20 != 0);
    let first = (u64::from_be_bytes(b) >> (48 - 8 * (skip & 7))) as u8;
    let index = match first {
        f if f & 0x80 != 0 => f & 0x7f,
        f if f & 0xc0 == 0x40 => f & 0x3f,
        f if f & 0xe0 == 0x20 => return None,
        f => f & 0x0f,
    };
    Some(index)
}

/// Follow both directions of `seg`'s connection on this interface from
/// here: a client preface starts `seg` (`preface`), or a HEADERS frame of
/// a connection already open (either way: user space tells a request
/// from a response). True: followed, and `seg` is for [`segment`] to read
/// (the preface, then usually the client's SETTINGS and first requests).
/// Not inlined: its two entries and keys take their own stack frame, not
/// the HTTP/1.x path's.
#[inline(never)]
pub fn start(ctx: &TcContext, seg: &Segment, preface: bool) -> bool {
    let at = if preface { PREFACE_LEN } else { 0 };
    let key = &OpenKey {
        flow: seg.flow,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        _pad: 0,
    };
    let client = H2Follow {
        next: seg.seq.wrapping_add(at),
        end: seg.seq,
        // The preface is copied: user space checks it.
        copy_until: seg.seq.wrapping_add(at),
        flags: if preface { 0 } else { h2_follow::JOINED },
        ..H2Follow::default()
    };
    // The other side's bytes start where this segment's acknowledgement
    // says it has got to: nothing but the handshake (prior knowledge), the
    // 101 answer to an `Upgrade: h2c` request, or (joined) the end of its
    // last write, a frame boundary unless it was mid-write.
    let server = H2Follow {
        next: seg.ack,
        end: seg.ack,
        copy_until: seg.ack,
        flags: if preface {
            h2_follow::UNREAD
        } else {
            h2_follow::JOINED
        },
        ..H2Follow::default()
    };
    let back = OpenKey {
        flow: seg.flow.reversed(),
        ifindex: key.ifindex,
        _pad: 0,
    };
    if H2_FLOWS.insert(key, &client, 0).is_err() || H2_FLOWS.insert(&back, &server, 0).is_err() {
        return false;
    }
    set_slot(seg.slot);
    set_slot(crate::net::slot_of(&back.flow));
    true
}

/// Reads `seg` if its flow is a followed HTTP/2 connection on this
/// interface ([`Next::Pass`] if not): the state is advanced here, the copy
/// is the caller's.
///
/// Not inlined: its frame walk takes its own stack frame instead of adding
/// to the HTTP/1.x path's past the 512-byte limit.
#[inline(never)]
pub fn segment(
    ctx: &TcContext,
    seg: &Segment,
    direction: Direction,
    counters: &mut Counters,
) -> Result<Next, ()> {
    let key = &OpenKey {
        flow: seg.flow,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        _pad: 0,
    };
    let Some(st) = H2_FLOWS.get_ptr_mut(key) else {
        return Ok(Next::Pass);
    };
    // SAFETY: the entry stays valid while the program runs (LRU deletion
    // by another CPU leaves the memory readable until the RCU grace period).
    let st = unsafe { &mut *st };
    let now = crate::clock();
    let src = Skb {
        skb: ctx.skb.skb,
        payload_off: seg.payload_off,
    };
    let next = match walk(src, seg.seq, seg.payload_len, st, counters) {
        Walk::Copy { lo, hi } => {
            count(counters, counter::H2_SEGMENTS);
            let part = Segment {
                flow: seg.flow,
                seq: seg.seq.wrapping_add(lo),
                ack: seg.ack,
                payload_off: seg.payload_off + lo,
                payload_len: hi - lo,
                slot: seg.slot,
            };
            crate::plan(Chunks {
                seg: part,
                ifindex: key.ifindex,
                ts_ns: now,
                direction,
                short: false,
                budget: H2_BUDGET,
                first: EventKind::Http2,
                then: Some(EventKind::Http2),
            })
        }
        Walk::Nothing => Next::Nothing,
        Walk::Lost(why, detail) => {
            diag::note(&seg.flow, why, detail);
            lose(seg, key, direction, now, counters);
            Next::Nothing
        }
    };
    // A client whose only traffic is a long-lived connection stays known
    // as a pod of this node, so the server's veth keeps leaving it alone.
    // After the walk: a branch before it would double the states the
    // verifier walks the frame loop in.
    if matches!(direction, Direction::Ingress) {
        refresh_local(&seg.flow, now);
    }
    Ok(next)
}

/// [`crate::note_local_source`] in a frame of its own: its branches end
/// here, not in the caller's paths.
#[inline(never)]
fn refresh_local(flow: &tracegap_common::FlowKey, now: u64) {
    crate::note_local_source(flow, now);
}

pub(crate) enum Walk {
    /// Copy the segment's bytes `lo..hi` (offsets in its payload).
    Copy { lo: u32, hi: u32 },
    /// Nothing in it is wanted (DATA, or a retransmission).
    Nothing,
    /// Frame boundaries are lost; the detail for the diagnostic (a gap's
    /// bytes).
    Lost(Why, u32),
}

/// Where a walk reads a direction's bytes: a segment's payload, or the
/// buffer of an OpenSSL call (`crate::ssl`).
pub(crate) trait Source: Copy {
    /// Loads `n` (masked to 1..=8) bytes at `off` into `buf`.
    fn load(&self, off: u32, buf: &mut [u8; 8], n: u32) -> Result<(), ()>;
}

/// A segment's payload, `payload_off` into its packet.
#[derive(Clone, Copy)]
#[repr(C)]
struct Skb {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    payload_off: u32,
}

impl Source for Skb {
    #[inline(always)]
    fn load(&self, off: u32, buf: &mut [u8; 8], n: u32) -> Result<(), ()> {
        load_skb(self.skb, self.payload_off + off, buf, n)
    }
}

/// Reads the frame headers in the `l` bytes of `src` (the first at
/// sequence number `s`), advancing `st`, and says which of them user space
/// wants.
#[inline(always)]
pub(crate) fn walk<S: Source>(
    src: S,
    s: u32,
    l: u32,
    st: &mut H2Follow,
    counters: &mut Counters,
) -> Walk {
    let mut behind = st.end.wrapping_sub(s) as i32;
    if behind < 0 && st.flags & h2_follow::UNREAD != 0 {
        // The server's preface (written as it accepted) went by before
        // the client's was seen: only it can be missing, whole writes of
        // frames the server sent unprompted, so this segment starts at a
        // frame boundary. Read on from here, strictly as when joining.
        count(counters, counter::H2_SERVER_PREFACE_MISSED);
        *st = H2Follow {
            next: s,
            end: s,
            copy_until: s,
            flags: h2_follow::JOINED,
            ..H2Follow::default()
        };
        behind = 0;
    }
    st.flags &= !h2_follow::UNREAD;
    if behind < 0 {
        // A gap: a segment this hook never saw.
        return Walk::Lost(Why::H2Gap, behind.unsigned_abs());
    }
    if behind > 0 {
        // A retransmission of bytes already read changes nothing. One
        // that also carries new bytes (TCP sent it again, cut otherwise)
        // is read on from the next frame header, which it holds whole if
        // the last segment cut it: user space keeps only the new bytes.
        if s.wrapping_add(l).wrapping_sub(st.end) as i32 <= 0 {
            return Walk::Nothing;
        }
        st.have = 0;
    }
    // A frame header the last segment cut: its first 5 bytes complete.
    if st.have > 0 {
        let have = (st.have & 7) as usize;
        let need = 5u32.saturating_sub(have as u32);
        if need == 0 || l < need {
            return Walk::Lost(Why::H2CutHeader, 0);
        }
        let mut b = [0u8; 8];
        if src.load(0, &mut b, need).is_err() {
            return Walk::Lost(Why::H2CutHeader, 0);
        }
        // The header's first bytes: `have` from before, then this
        // segment's, joined as big-endian integers (shifts, not indexes
        // into the stack the verifier would refuse).
        let shift = 8 * have as u32;
        let before = u64::from_be_bytes(st.partial) & !(u64::MAX >> shift);
        let joined = (before | u64::from_be_bytes(b) >> shift).to_be_bytes();
        let h = [joined[0], joined[1], joined[2], joined[3], joined[4]];
        let len = frame_len(&h);
        let w = wanted(h[3], h[4], len);
        if w > 0 {
            st.copy_until = st.next.wrapping_add(w);
        }
        st.next = st.next.wrapping_add(9 + len);
        st.have = 0;
    }
    let (mut lo, mut hi) = (l, 0u32);
    let rest = st.copy_until.wrapping_sub(s) as i32;
    if rest > 0 {
        lo = 0;
        hi = (rest as u32).min(l);
    }
    let off = st.next.wrapping_sub(s);
    if (off as i32) < 0 {
        return Walk::Lost(Why::H2Behind, 0);
    }
    let mut f = Frames {
        src,
        len: l,
        seq: s,
        off,
        lo,
        hi,
        copy_until: st.copy_until,
        cut: 0,
        end: 0,
        strict: u32::from(st.flags & h2_follow::JOINED),
        partial: [0; 8],
    };
    // A bounded loop the verifier checks once (bpf_loop, Linux 5.17),
    // not unrolled: a segment of many small frames (a client with many
    // calls in flight writes hundreds at once) costs a helper call per
    // frame, and the verifier's work does not grow with the bound.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            MAX_FRAMES,
            frame_step::<S> as *mut core::ffi::c_void,
            core::ptr::addr_of_mut!(f).cast(),
            0,
        )
    };
    if ret < 0 || f.end == 0 {
        return Walk::Lost(Why::H2Walk, 0);
    }
    st.copy_until = f.copy_until;
    if f.cut > 0 {
        st.partial = f.partial;
        st.have = f.cut as u8;
    }
    st.next = s.wrapping_add(f.off);
    st.end = s.wrapping_add(l);
    if f.lo < f.hi {
        Walk::Copy { lo: f.lo, hi: f.hi }
    } else {
        Walk::Nothing
    }
}

/// The frame walk's state, on the caller's stack, for [`frame_step`].
#[repr(C)]
struct Frames<S> {
    src: S,
    /// The segment's payload length and first sequence number.
    len: u32,
    seq: u32,
    /// Offset of the next frame header in the payload.
    off: u32,
    /// The payload's bytes to copy: `lo..hi`.
    lo: u32,
    hi: u32,
    copy_until: u32,
    /// Bytes of a frame header cut by the segment's end (0: none), kept in
    /// `partial`.
    cut: u32,
    /// 1: the walk reached the segment's end.
    end: u32,
    /// 1: a frame no sender would write ends the walk, lost (see
    /// [`h2_follow::JOINED`]).
    strict: u32,
    partial: [u8; 8],
}

/// One frame header of [`Frames`]: 0 to go on, 1 to stop (the segment's
/// end, or an error: `end` stays 0).
extern "C" fn frame_step<S: Source>(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `walk` gave it, to its
    // `Frames` on the stack, for as long as the loop runs.
    let f = unsafe { &mut *ctx.cast::<Frames<S>>() };
    let (l, off) = (f.len, f.off);
    if off >= l {
        f.end = 1;
        return 1;
    }
    if l - off < 5 {
        // A frame header cut by the segment's end: its bytes kept for the
        // next segment, and copied in case the frame is wanted (user space
        // drops them at the gap if it is not).
        //
        // Loaded as the payload's last (up to) 8 bytes, then shifted: a
        // load whose length depended on `off` would make the verifier
        // track `off` exactly, and as it differs in every iteration the
        // loop's states would never converge (the walk's verified
        // instructions grow with each kernel's appetite for iterations).
        let k = l.min(8);
        let mut tail = [0u8; 8];
        if f.src.load(l - k, &mut tail, k).is_err() {
            return 1;
        }
        let cut = l - off;
        // The cut bytes are the last `cut` of the `k` loaded: moved to the
        // front, where `walk` reads them back (big-endian, first `have`).
        let shift = (8 * (k - cut)) & 63;
        f.partial = (u64::from_be_bytes(tail) << shift).to_be_bytes();
        f.cut = cut;
        f.lo = f.lo.min(off);
        f.hi = l;
        f.end = 1;
        return 1;
    }
    let mut b = [0u8; 8];
    if f.src.load(off, &mut b, 5).is_err() {
        return 1;
    }
    let h = [b[0], b[1], b[2], b[3], b[4]];
    let len = frame_len(&h);
    if f.strict != 0 && (h[3] > CONTINUATION || len > 16384) {
        return 1;
    }
    let w = wanted(h[3], h[4], len);
    if w > 0 {
        f.lo = f.lo.min(off);
        f.hi = f.hi.max(off.saturating_add(w).min(l));
        f.copy_until = f.seq.wrapping_add(off).wrapping_add(w);
    }
    f.off = off.saturating_add(9 + len);
    0
}

#[inline(always)]
fn frame_len(h: &[u8; 5]) -> u32 {
    u32::from(h[0]) << 16 | u32::from(h[1]) << 8 | u32::from(h[2])
}

/// Loads `n` (1..=5 as the callers use it; masked to 1..=8) bytes at `off`.
#[inline(always)]
fn load(ctx: &TcContext, off: u32, buf: &mut [u8; 8], n: u32) -> Result<(), ()> {
    load_skb(ctx.skb.skb, off, buf, n)
}

#[inline(always)]
fn load_skb(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    off: u32,
    buf: &mut [u8; 8],
    n: u32,
) -> Result<(), ()> {
    // The volatile read keeps LLVM from folding the mask away: the
    // verifier must see a length of 1..=8 (see `send` in main.rs).
    let w = unsafe { core::ptr::read_volatile(&n) };
    let len = (w.wrapping_sub(1) & 7) + 1;
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(skb.cast(), off, buf.as_mut_ptr().cast(), len)
    };
    if ret == 0 { Ok(()) } else { Err(()) }
}

/// Stops following both directions, and tells user space once.
#[inline(always)]
fn lose(seg: &Segment, key: &OpenKey, direction: Direction, ts_ns: u64, counters: &mut Counters) {
    count(counters, counter::H2_LOST);
    let _ = H2_FLOWS.remove(key);
    let back = OpenKey {
        flow: seg.flow.reversed(),
        ifindex: key.ifindex,
        _pad: 0,
    };
    let _ = H2_FLOWS.remove(&back);
    let header = EventHeader {
        ts_ns,
        flow: seg.flow,
        ifindex: key.ifindex,
        seq: seg.seq,
        segment_len: seg.payload_len,
        payload_len: 0,
        direction: direction as u8,
        kind: EventKind::Http2 as u8,
        flags: event_flags::H2_LOST,
        _pad: [0, 0, 0],
        ack: seg.ack,
    };
    if EVENTS
        .output::<EventHeader>(&header, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(counters, counter::RINGBUF_FULL);
    }
}
