//! Which thread wrote each HTTP request and which thread read it: the
//! evidence that ties a service's outbound call to the inbound request it
//! was serving when the service runs a thread per request (timing alone
//! cannot, once requests overlap).
//!
//! Only relays matter: pods the agent has seen both serve requests and
//! make calls (it writes their addresses to `RELAYS`); a call is tied to
//! a request of the same pod, so an echo server's or a load generator's
//! threads are never asked about. The TC programs mark a connection with a
//! relay at either end as watched when they see a request on it
//! ([`watch`]). Programs on each socket send and receive (the raw
//! tracepoints `sock_send_length` / `sock_recv_length` since 6.3; `fexit`
//! on `tcp_sendmsg` / `tcp_recvmsg` where those are missing) run in the
//! calling thread; for a watched connection they send one event per turn:
//! the client's first send of a request, the server's first receive of
//! one and its first send of the answer. That last one says what the
//! thread did just before on a relay's socket ([`LastOp`], kept per
//! thread): an async runtime's task that reads its call's answer and
//! writes its own answer without yielding in between leaves a receive on
//! the call's socket right before the write. Every other socket costs two
//! reads and an array read (the relays' filter) the first time, then one
//! array read (a memo of sockets judged, [`SOCK_VERDICTS`]), and is left
//! alone. The
//! programs read `struct sock` at offsets the agent found in the running
//! kernel's BTF (globals, set before loading): aya-ebpf emits no CO-RE
//! relocations. They observe only and return 0.

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_func_arg, bpf_probe_read_kernel},
    macros::{fexit, map, raw_tracepoint},
    maps::{Array, LruHashMap},
    programs::{FExitContext, RawTracePointContext},
};
use tracegap_common::{
    EventHeader, EventKind, FlowKey, LastOp, MAX_RELAYS, MAX_THREADS, MAX_WATCHED,
    RELAY_FILTER_SLOTS, SEND_NOTE_SLOTS, SEND_NOTE_WINDOW_NS, SOCK_VERDICT_SLOTS, SendNote,
    SourceKey, ThreadTurn, Turns, counter, family, relay_slot, thread_word, turn, verdict_slot,
    verdict_tag,
};

use crate::{COUNTERS, EVENTS, clock, count, net};

/// Connections a request was seen on, keyed as the request's flow.
#[map]
static WATCHED: LruHashMap<FlowKey, Turns> = LruHashMap::with_max_entries(MAX_WATCHED, 0);

/// Relays' addresses (value unused), written by the agent.
#[map]
static RELAYS: LruHashMap<SourceKey, u8> = LruHashMap::with_max_entries(MAX_RELAYS, 0);

/// Which [`relay_slot`]s hold a relay (written by the agent): most
/// sockets stop at this array read.
#[map]
static RELAY_FILTER: Array<u8> = Array::with_max_entries(RELAY_FILTER_SLOTS, 0);

#[inline(always)]
fn relay(addr: &[u8; 16], family: u8) -> bool {
    if RELAY_FILTER
        .get(relay_slot(addr, family))
        .is_none_or(|v| *v == 0)
    {
        return false;
    }
    let key = SourceKey {
        addr: *addr,
        family,
        _pad: [0, 0, 0],
    };
    RELAYS.get_ptr(&key).is_some()
}

/// The relay set's epoch (one entry): the agent bumps it after each
/// change, so a socket judged under an older set is judged again. 0 while
/// the memo is off (its invalidating program not attached).
#[map]
static RELAY_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Sockets found not to be a relay's, by [`verdict_slot`], as
/// [`verdict_tag`]s: a freed socket's memory comes back as a new socket,
/// so every TCP state change clears its slot ([`tracegap_sock_state`]).
#[map]
static SOCK_VERDICTS: Array<u64> = Array::with_max_entries(SOCK_VERDICT_SLOTS, 0);

/// Each thread's last operation on a relay's socket, by thread id.
#[map]
static LAST_OPS: LruHashMap<u32, LastOp> = LruHashMap::with_max_entries(MAX_THREADS, 0);

/// The last send on unwatched sockets, by their flow's slot (see
/// [`SendNote`]): an array write per such send, no hash update.
#[map]
static SEND_NOTES: Array<SendNote> = Array::with_max_entries(SEND_NOTE_SLOTS, 0);

// Byte offsets into `struct sock`, set by the agent from the kernel's BTF.
#[unsafe(no_mangle)]
static SK_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SK_RCV_SADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SK_DPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SK_NUM: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SK_FAMILY: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SK_V6_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SK_V6_RCV_SADDR: Global<u32> = Global::new(0);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A request was seen on `flow`: its sockets' turns are recorded from now
/// on. Only inserts when absent (a keep-alive connection's later requests
/// cost one lookup). On a new connection the client's send may already
/// have returned, unwatched: its note names the writer.
#[inline(always)]
pub(crate) fn watch(flow: &FlowKey) {
    if !relay(&flow.saddr, flow.family) && !relay(&flow.daddr, flow.family) {
        return;
    }
    if WATCHED
        .insert(flow, Turns::default(), BPF_NOEXIST as u64)
        .is_err()
    {
        return;
    }
    let Some(n) = SEND_NOTES.get_ptr_mut(net::slot_of(flow) & (SEND_NOTE_SLOTS - 1)) else {
        return;
    };
    // SAFETY: an array slot; a racing writer only writes another note.
    let n = unsafe { &mut *n };
    let now = clock();
    if n.ts_ns == 0 || now.saturating_sub(n.ts_ns) > SEND_NOTE_WINDOW_NS || !same(&n.flow, flow) {
        return;
    }
    let (ts, id, bytes) = (n.ts_ns, n.pid_tgid, n.bytes);
    n.ts_ns = 0;
    if let Some(t) = WATCHED.get_ptr_mut(flow) {
        // SAFETY: a map value.
        unsafe { (*t).client = turn::SENT };
    }
    emit(flow, CLIENT_WROTE, bytes as i32, id, ts);
}

/// Two flows, word by word (no memcmp in BPF).
#[inline(always)]
pub(crate) fn same(a: &FlowKey, b: &FlowKey) -> bool {
    let w = |k: &FlowKey, i: usize| -> u64 {
        // SAFETY: i + 8 <= 32 bytes of the two address arrays.
        unsafe {
            core::ptr::read_unaligned(
                (core::ptr::addr_of!(k.saddr) as *const u8).add(i) as *const u64
            )
        }
    };
    w(a, 0) == w(b, 0)
        && w(a, 8) == w(b, 8)
        && w(a, 16) == w(b, 16)
        && w(a, 24) == w(b, 24)
        && a.sport == b.sport
        && a.dport == b.dport
        && a.family == b.family
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Send,
    Receive,
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn tracegap_sock_send(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let _ = on_socket(
        ctx.arg::<*const u8>(0),
        ctx.arg::<u64>(0),
        ctx.arg::<i64>(1) as i32,
        Op::Send,
    );
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn tracegap_sock_recv(ctx: RawTracePointContext) -> i32 {
    let _ = on_socket(
        ctx.arg::<*const u8>(0),
        ctx.arg::<u64>(0),
        ctx.arg::<i64>(1) as i32,
        Op::Receive,
    );
    0
}

/// A TCP socket changed state: whatever the memo says of its address is
/// forgotten. A socket moves bytes only once connected, and connecting or
/// being accepted is a state change, so a reused address is never taken
/// for the socket that had it before.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tracegap_sock_state(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk = ctx.arg::<u64>(0);
    if let Some(v) = SOCK_VERDICTS.get_ptr_mut(verdict_slot(sk)) {
        // SAFETY: an array slot; one word, stored whole.
        unsafe { v.write_volatile(0) };
    }
    0
}

/// Where the tracepoints are missing (before 6.3): TCP's own send and
/// receive, on return, in the calling thread.
#[fexit(function = "tcp_sendmsg")]
pub fn tracegap_tcp_sendmsg(ctx: FExitContext) -> i32 {
    let ret: i32 = ctx.ret().unwrap_or(0);
    let _ = on_socket(ctx.arg::<*const u8>(0), sock_word(&ctx), ret, Op::Send);
    0
}

#[fexit(function = "tcp_recvmsg")]
pub fn tracegap_tcp_recvmsg(ctx: FExitContext) -> i32 {
    let ret: i32 = ctx.ret().unwrap_or(0);
    let _ = on_socket(ctx.arg::<*const u8>(0), sock_word(&ctx), ret, Op::Receive);
    0
}

/// The socket's address as a number, for the memo: `fexit` arguments are
/// typed pointers the verifier allows no arithmetic on; the helper hands
/// the same value over untyped.
#[inline(always)]
fn sock_word(ctx: &FExitContext) -> u64 {
    let mut word = 0u64;
    // SAFETY: the helper writes argument 0 to `word` (0 on failure, which
    // the memo never holds: a miss).
    unsafe { bpf_get_func_arg(ctx.as_ptr(), 0, &mut word) };
    word
}

#[inline(always)]
fn read<T: Copy>(sk: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an
    // error, not a fault.
    unsafe { bpf_probe_read_kernel(sk.wrapping_add(offset as usize).cast::<T>()) }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`): a dual-stack
/// socket's view of an IPv4 peer, which the wire (and the TC programs)
/// see as IPv4.
#[inline(always)]
fn mapped(a: &[u8; 16]) -> bool {
    u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]) == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// The socket's connection as its own end names it: local, then remote;
/// None when its local address is not a relay's (asked first, so most
/// sockets cost two reads and an array read), unless `any`.
#[inline(always)]
pub(crate) fn connection(sk: *const u8, any: bool) -> Result<Option<FlowKey>, i32> {
    let mut key = FlowKey::default();
    match read::<u16>(sk, SK_FAMILY.load())? {
        AF_INET => {
            let local: [u8; 4] = read(sk, SK_RCV_SADDR.load())?;
            key.saddr[..4].copy_from_slice(&local);
            key.family = family::IPV4;
            if !any && !relay(&key.saddr, key.family) {
                return Ok(None);
            }
            let remote: [u8; 4] = read(sk, SK_DADDR.load())?;
            key.daddr[..4].copy_from_slice(&remote);
        }
        AF_INET6 => {
            let local: [u8; 16] = read(sk, SK_V6_RCV_SADDR.load())?;
            if mapped(&local) {
                key.saddr[..4].copy_from_slice(&local[12..]);
                key.family = family::IPV4;
            } else {
                key.saddr = local;
                key.family = family::IPV6;
            }
            if !any && !relay(&key.saddr, key.family) {
                return Ok(None);
            }
            let remote: [u8; 16] = read(sk, SK_V6_DADDR.load())?;
            if key.family == family::IPV4 {
                key.daddr[..4].copy_from_slice(&remote[12..]);
            } else {
                key.daddr = remote;
            }
        }
        _ => return Ok(None),
    }
    key.sport = read::<u16>(sk, SK_NUM.load())?;
    key.dport = u16::from_be(read::<u16>(sk, SK_DPORT.load())?);
    Ok(Some(key))
}

/// Records `now` as one end's last operation; true when it starts a turn
/// of the kind `reported` says is sent (a send for the client, a receive
/// for the server).
#[inline(always)]
fn starts_turn(last: &mut u8, now: u8, reported: bool) -> bool {
    if *last == now {
        return false;
    }
    *last = now;
    reported
}

/// `sk_word`: `sk` as a number (see [`sock_word`]).
#[inline(always)]
fn on_socket(sk: *const u8, sk_word: u64, bytes: i32, op: Op) -> Result<(), i32> {
    // A failed call (EAGAIN, most of them) is left out: it is frequent on
    // every socket of the node and tells nothing a read's data does not.
    if sk.is_null() || bytes < 0 {
        return Ok(());
    }
    // Judged already under this relay set: nothing to read.
    let epoch = RELAY_EPOCH.get(0).copied().unwrap_or(0);
    let memo = SOCK_VERDICTS.get_ptr_mut(verdict_slot(sk_word));
    let tag = verdict_tag(sk_word, epoch);
    if let Some(m) = memo
        && epoch != 0
        && sk_word != 0
        // SAFETY: an array slot, one word.
        && unsafe { m.read_volatile() } == tag
    {
        return Ok(());
    }
    let Some(key) = connection(sk, false)? else {
        if let Some(m) = memo
            && epoch != 0
            && sk_word != 0
        {
            // SAFETY: as above; a racing writer stores a whole word too.
            unsafe { m.write_volatile(tag) };
        }
        return Ok(());
    };
    let id = bpf_get_current_pid_tgid();
    let now = match op {
        Op::Send => turn::SENT,
        Op::Receive => turn::RECEIVED,
    };
    let mut last = LastOp {
        port: key.sport,
        op: now,
        client: 0,
    };
    // Every operation of the thread on a relay's socket is its last one,
    // an empty read too (a task reading its call's answer to the end);
    // only one that moved bytes can start a turn.
    let moved = bytes > 0;
    // The client's socket names the request's flow as it is: local to
    // remote; the server's names it the other way round.
    if let Some(t) = WATCHED.get_ptr_mut(&key) {
        last.client = 1;
        // SAFETY: a map value; a racing writer only writes a turn too.
        if moved && starts_turn(unsafe { &mut (*t).client }, now, op == Op::Send) {
            emit(&key, CLIENT_WROTE, bytes, id, clock());
        }
    } else if let Some(t) = WATCHED.get_ptr_mut(&key.reversed()) {
        // SAFETY: as above.
        if moved && starts_turn(unsafe { &mut (*t).server }, now, true) {
            let word = match op {
                Op::Receive => thread_word::encode(ThreadTurn::ServerRead, None),
                Op::Send => thread_word::encode(ThreadTurn::ServerWrote, last_op(id as u32)),
            };
            emit(&key.reversed(), word, bytes, id, clock());
        }
    } else if moved && op == Op::Send {
        note_send(&key, bytes, id);
    }
    remember(id as u32, last);
    Ok(())
}

/// The thread's last operation on a relay's socket.
#[inline(always)]
fn last_op(tid: u32) -> Option<LastOp> {
    // SAFETY: a map value, copied out (one load: LLVM otherwise may keep
    // the key's stack address in its place, which the verifier refuses).
    LAST_OPS
        .get_ptr(&tid)
        .map(|l| unsafe { core::ptr::read_volatile(l) })
}

/// Records `last` as the thread's last operation: in place when the
/// thread is known (no hash update), inserted otherwise.
#[inline(always)]
fn remember(tid: u32, last: LastOp) {
    if let Some(l) = LAST_OPS.get_ptr_mut(&tid) {
        // SAFETY: a map value; only this thread writes its own entry.
        unsafe { *l = last };
    } else {
        let _ = LAST_OPS.insert(&tid, &last, 0);
    }
}

/// A send on an unwatched socket: a client's first request may be sent
/// before its packet is seen (see `watch`); note the sender where the
/// flow's request (the socket's own view, local to remote) will look.
#[inline(always)]
fn note_send(key: &FlowKey, bytes: i32, id: u64) {
    let Some(n) = SEND_NOTES.get_ptr_mut(net::slot_of(key) & (SEND_NOTE_SLOTS - 1)) else {
        return;
    };
    let ts = clock();
    // SAFETY: an array slot; plain stores, any writer writes a note.
    unsafe {
        n.write(SendNote {
            flow: *key,
            ts_ns: ts,
            pid_tgid: id,
            bytes: bytes as u32,
            _pad: 0,
        })
    };
    // The packet may have been seen between the lookup and the note (a
    // softirq taken on this CPU meanwhile): its `watch` found no note, so
    // the turn is this program's to send.
    if let Some(t) = WATCHED.get_ptr_mut(key) {
        // SAFETY: the slot and a map value, as above.
        unsafe {
            if (*n).ts_ns == ts {
                (*n).ts_ns = 0;
                (*t).client = turn::SENT;
                emit(key, CLIENT_WROTE, bytes, id, ts);
            }
        }
    }
}

/// The client's turn's [`thread_word`] (it carries nothing else).
const CLIENT_WROTE: u32 = ThreadTurn::ClientWrote as u32;

/// Sends a turn; `word` is its [`thread_word`].
#[inline(always)]
pub(crate) fn emit(flow: &FlowKey, word: u32, bytes: i32, id: u64, ts_ns: u64) {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU entry is this CPU's alone while the program runs.
    let counters = unsafe { &mut *counters };
    let header = EventHeader {
        ts_ns,
        flow: *flow,
        ifindex: word,
        seq: (id >> 32) as u32,
        segment_len: bytes as u32,
        payload_len: 0,
        direction: (word != CLIENT_WROTE) as u8,
        kind: EventKind::Thread as u8,
        flags: 0,
        _pad: [0, 0, 0],
        ack: id as u32,
    };
    // No wakeup: the reader drains on its timer, and the request this
    // turn belongs to wakes it when it matters.
    match EVENTS.output::<EventHeader>(&header, aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64) {
        Ok(()) => count(counters, counter::THREAD_TURNS),
        Err(_) => count(counters, counter::RINGBUF_FULL),
    }
}
