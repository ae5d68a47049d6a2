//! OpenSSL's plaintext, through uprobes on `SSL_write`, `SSL_write_ex`,
//! `SSL_read` and `SSL_read_ex` (see [`tracegap_common::ssl`]): what an
//! HTTPS connection carries, which the TC programs see only as ciphertext.
//!
//! One entry program and one return program serve the four functions; the
//! attach cookie says which one fired. The entry keeps the call per thread
//! and marks its thread as in one, so a pair of programs on every socket
//! send and receive (the raw tracepoints `sock_send_length` /
//! `sock_recv_length`; `fexit` on `tcp_sendmsg` / `tcp_recvmsg` before
//! 6.3), which run in the calling thread with the socket, can cheaply tell
//! one made inside a call ([`in_call`]) and name the call's connection
//! ([`name`]): a write always sends on its socket, and a connection's
//! first read receives. They are programs of their own, not part of the
//! thread programs: those already use most of their stack, and either
//! works without the other. The return probe copies the message starts (and the pieces of
//! a head that did not end in its first chunk) as events with the
//! connection's plaintext byte counts as `seq` and `ack`. Bodies are only
//! counted. A connection named is announced with the process and the
//! cgroup at its end ([`announce`]). The programs observe only and return 0.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_attach_cookie, bpf_get_current_cgroup_id},
    },
    macros::{fexit, map, raw_tracepoint, uprobe, uretprobe},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{FExitContext, ProbeContext, RawTracePointContext, RetProbeContext},
};
use tracegap_common::{
    Direction, EventHeader, EventKind, FlowKey, H2_BUDGET, H2Follow, MAX_PAYLOAD, ThreadTurn,
    counter, event_flags, h2_follow,
    ssl::{
        CONTINUATIONS, H2_FOLLOWED, H2_LOST, H2_NO, MAX_CALLS, MAX_CONNS, READ, READ_EX, SslCall,
        SslConn, SslKey, WRITE_EX,
    },
    thread_word,
};

use crate::{COUNTERS, EVENTS, classify_start, clock, count};

/// Each thread's call in flight, by pid_tgid.
#[map]
static SSL_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(MAX_CALLS, 0);

/// Followed connections, by process and `SSL*`.
#[map]
static SSL_CONNS: LruHashMap<SslKey, SslConn> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Threads inside an OpenSSL call, direct-mapped by a hash of their
/// pid_tgid ([`thread_slot`]; 0: none): the naming pair's filter, an array
/// read on every socket operation of the node, whatever CPU the thread
/// runs on now (a per-CPU mark missed threads moved inside their call, and
/// with a connection per request, their requests). Two threads in calls
/// at once in one slot: the later one's mark stands, the other's socket
/// operation goes unnamed this time.
#[map]
static SSL_THREADS: Array<u64> = Array::with_max_entries(SSL_THREAD_SLOTS, 0);

const SSL_THREAD_SLOTS: u32 = 4096;

#[inline(always)]
fn thread_slot(id: u64) -> u32 {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SSL_THREAD_SLOTS.trailing_zeros())) as u32
}

#[inline(always)]
fn cookie(ctx: *mut core::ffi::c_void) -> u64 {
    // SAFETY: the helper reads the perf event's cookie (0 without one).
    unsafe { bpf_get_attach_cookie(ctx) }
}

#[uprobe]
pub fn tracegap_ssl_enter(ctx: ProbeContext) -> u32 {
    // (SSL *ssl, void *buf, int num[, size_t *moved])
    let op = cookie(ctx.as_ptr());
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let moved = if op == WRITE_EX || op == READ_EX {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    let id = bpf_get_current_pid_tgid();
    let call = SslCall {
        ssl,
        buf,
        moved,
        op,
    };
    if SSL_CALLS.insert(&id, &call, 0).is_ok()
        && let Some(slot) = SSL_THREADS.get_ptr_mut(thread_slot(id))
    {
        // SAFETY: an array slot, one word.
        unsafe { slot.write_volatile(id) };
    }
    0
}

/// Whether this thread is inside an OpenSSL call: its pid_tgid, if so.
#[inline(always)]
pub(crate) fn in_call() -> Option<u64> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: an array slot, one word.
    let on = SSL_THREADS
        .get_ptr(thread_slot(id))
        .map(|s| unsafe { s.read_volatile() })?;
    (on == id && id != 0).then_some(id)
}

/// A new connection's entry, built here rather than on the stack: the
/// thread programs call [`name`] from a frame of their own, and 6.1 counts
/// every frame of a chain against 512 bytes.
#[map]
static SSL_SCRATCH: PerCpuArray<SslConn> = PerCpuArray::with_max_entries(1, 0);

/// A socket operation inside thread `id`'s call: `flow` (local first) is
/// the call's connection. An `SSL*` found on another connection than it
/// was is one reused: its counts start again.
#[inline(always)]
pub(crate) fn name(id: u64, flow: &FlowKey) {
    // SAFETY: a copy of the value.
    let Some(ssl) = (unsafe { SSL_CALLS.get(&id) }).map(|c| c.ssl) else {
        return;
    };
    let key = SslKey {
        tgid: id >> 32,
        ssl,
    };
    let c = match SSL_CONNS.get_ptr_mut(&key) {
        Some(c) => c,
        None => {
            let Some(c) = SSL_SCRATCH.get_ptr_mut(0) else {
                return;
            };
            // SAFETY: this CPU's scratch entry; zeroed, then inserted.
            unsafe { clear(&mut *c) };
            let _ = SSL_CONNS.insert(&key, unsafe { &*c }, 0);
            match SSL_CONNS.get_ptr_mut(&key) {
                Some(c) => c,
                None => return,
            }
        }
    };
    // SAFETY: a map value; only the threads of this call's process write
    // it, one call at a time per `SSL*` (OpenSSL's rule).
    let c = unsafe { &mut *c };
    if !crate::threads::same(&c.flow, flow) {
        clear(c);
        c.flow = *flow;
        announce(id, flow);
    }
}

/// The process behind this end of a connection newly named: its cgroup
/// names its container and pod where its address cannot (a host-network
/// pod shares the node's). Once per connection, in the calling thread.
#[inline(never)]
fn announce(id: u64, flow: &FlowKey) {
    let record = Record::<8> {
        header: EventHeader {
            ts_ns: clock(),
            flow: *flow,
            ifindex: 0,
            seq: (id >> 32) as u32,
            segment_len: 0,
            payload_len: 8,
            direction: Direction::Ingress as u8,
            kind: EventKind::Owner as u8,
            flags: event_flags::PLAINTEXT,
            _pad: [0, 0, 0],
            ack: 0,
        },
        // SAFETY: the helper has no arguments (the current task's cgroup).
        payload: unsafe { bpf_get_current_cgroup_id() }.to_ne_bytes(),
    };
    // Woken at once (once per connection): the agent names the process by
    // its /proc entry, which a short-lived client (curl) leaves within
    // milliseconds, sooner than a wakeup by age would come.
    if EVENTS
        .output::<Record<8>>(&record, BPF_RB_FORCE_WAKEUP as u64)
        .is_err()
    {
        counted(counter::RINGBUF_FULL);
    }
}

/// Zeroes a connection's entry field by field (no `memset` call).
#[inline(always)]
fn clear(c: &mut SslConn) {
    c.flow.family = 0;
    c.written = 0;
    c.read = 0;
    c.open_write = 0;
    c.open_read = 0;
    c.h2 = H2_NO;
}

/// A socket operation: inside an OpenSSL call, its socket names the
/// call's connection. Everything else costs a per-CPU array read.
#[inline(always)]
fn on_socket(sk: *const u8, bytes: i64) {
    if sk.is_null() || bytes < 0 {
        return;
    }
    let Some(id) = in_call() else {
        return;
    };
    if let Ok(Some(flow)) = crate::threads::connection(sk, true) {
        name(id, &flow);
    }
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn tracegap_ssl_sock_send(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    on_socket(ctx.arg::<*const u8>(0), ctx.arg::<i64>(1) as i32 as i64);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn tracegap_ssl_sock_recv(ctx: RawTracePointContext) -> i32 {
    on_socket(ctx.arg::<*const u8>(0), ctx.arg::<i64>(1) as i32 as i64);
    0
}

#[fexit(function = "tcp_sendmsg")]
pub fn tracegap_ssl_tcp_sendmsg(ctx: FExitContext) -> i32 {
    let ret: i32 = ctx.ret().unwrap_or(-1);
    on_socket(ctx.arg::<*const u8>(0), ret as i64);
    0
}

#[fexit(function = "tcp_recvmsg")]
pub fn tracegap_ssl_tcp_recvmsg(ctx: FExitContext) -> i32 {
    let ret: i32 = ctx.ret().unwrap_or(-1);
    on_socket(ctx.arg::<*const u8>(0), ret as i64);
    0
}

#[uretprobe]
pub fn tracegap_ssl_return(ctx: RetProbeContext) -> u32 {
    let _ = try_return(&ctx);
    0
}

fn try_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    if let Some(slot) = SSL_THREADS.get_ptr_mut(thread_slot(id)) {
        // SAFETY: an array slot, one word; a racing writer stores a whole
        // word too.
        unsafe {
            if slot.read_volatile() == id {
                slot.write_volatile(0);
            }
        }
    }
    // SAFETY: a copy of the value, taken before it is removed.
    let Some(call) = (unsafe { SSL_CALLS.get(&id) }).copied() else {
        return Ok(());
    };
    let _ = SSL_CALLS.remove(&id);
    let ret: i64 = ctx.ret::<i64>();
    let n = if call.moved != 0 {
        if ret as i32 != 1 {
            return Ok(());
        }
        // SAFETY: the helper checks the user address.
        unsafe { aya_ebpf::helpers::bpf_probe_read_user(call.moved as *const u64) }?
    } else {
        let r = ret as i32;
        if r <= 0 {
            return Ok(());
        }
        r as u64
    };
    if n == 0 || n > u32::MAX as u64 {
        return Ok(());
    }
    let n = n as u32;
    let key = SslKey {
        tgid: id >> 32,
        ssl: call.ssl,
    };
    let Some(conn) = SSL_CONNS.get_ptr_mut(&key) else {
        counted(counter::TLS_UNNAMED);
        return Ok(());
    };
    // SAFETY: a map value (see `name`).
    let conn = unsafe { &mut *conn };
    let write = call.op != READ && call.op != READ_EX;
    let (seq, ack) = if write {
        (conn.written, conn.read)
    } else {
        (conn.read, conn.written)
    };
    if write {
        conn.written = conn.written.wrapping_add(n);
    } else {
        conn.read = conn.read.wrapping_add(n);
    }
    if conn.flow.family == 0 {
        counted(counter::TLS_UNNAMED);
        return Ok(());
    }
    let head = if n >= 8 {
        // SAFETY: the helper checks the user address.
        Some(unsafe { aya_ebpf::helpers::bpf_probe_read_user(call.buf as *const [u8; 8]) }?)
    } else {
        None
    };
    let chunk = Chunk {
        flow: if write {
            conn.flow
        } else {
            conn.flow.reversed()
        },
        buf: call.buf,
        seq,
        ack,
        n,
        write,
    };
    // HTTP/2 from its client preface on (either end: the client writes
    // it, the server reads it), frame by frame like the wire's h2c.
    if conn.h2 == H2_NO && head == Some(*b"PRI * HT") && n >= 24 {
        conn.h2 = H2_FOLLOWED;
        let (this, other) = if write {
            (&mut conn.h2_write, &mut conn.h2_read)
        } else {
            (&mut conn.h2_read, &mut conn.h2_write)
        };
        let at = seq.wrapping_add(24);
        *this = H2Follow {
            next: at,
            end: seq,
            // The preface is copied: user space checks it.
            copy_until: at,
            ..H2Follow::default()
        };
        // The other side's writes so far (a server's SETTINGS, written as
        // it accepted) were not followed: it is read from its next write.
        *other = H2Follow {
            next: ack,
            end: ack,
            copy_until: ack,
            flags: h2_follow::UNREAD,
            ..H2Follow::default()
        };
    }
    if conn.h2 == H2_FOLLOWED {
        let st = if write {
            &mut conn.h2_write
        } else {
            &mut conn.h2_read
        };
        if !h2(&chunk, st) {
            conn.h2 = H2_LOST;
        }
        return Ok(());
    }
    if conn.h2 == H2_LOST {
        return Ok(());
    }
    let open = if write {
        &mut conn.open_write
    } else {
        &mut conn.open_read
    };
    if let Some(kind) = http1(&chunk, head, open)? {
        turn(&chunk, kind);
    }
    Ok(())
}

/// What one OpenSSL call moved: `n` bytes at `buf`, the `seq`-th onwards
/// of its direction, as the connection's event `flow` names it.
struct Chunk {
    flow: FlowKey,
    buf: u64,
    seq: u32,
    ack: u32,
    n: u32,
    write: bool,
}

impl Chunk {
    /// The header of an event of `len` of its bytes from `at`.
    #[inline(always)]
    fn header(&self, kind: EventKind, at: u32, len: u32, flags: u8) -> EventHeader {
        EventHeader {
            ts_ns: clock(),
            flow: self.flow,
            ifindex: 0,
            seq: self.seq.wrapping_add(at),
            segment_len: self.n,
            payload_len: len as u16,
            // What the process wrote left it, as what a pod sends crosses
            // its veth's ingress.
            direction: if self.write {
                Direction::Ingress
            } else {
                Direction::Egress
            } as u8,
            kind: kind as u8,
            flags: event_flags::PLAINTEXT | flags,
            _pad: [0, 0, 0],
            ack: self.ack,
        }
    }
}

/// HTTP/1.x: a chunk that starts a message is copied (its first
/// [`MAX_PAYLOAD`] bytes), and the next few while its head may not have
/// ended (`open`); bodies are not. Returns the kind of a message start
/// sent. Not inlined, nor are [`turn`] and [`h2`]: each path's frame is its
/// own, not the program's (6.1 counts a call chain's frames against 512
/// bytes, and the HTTP/2 path's chain is four deep).
#[inline(never)]
fn http1(c: &Chunk, head: Option<[u8; 8]>, open: &mut u8) -> Result<Option<EventKind>, i64> {
    let kind = match head.and_then(|h| classify_start(&h)) {
        Some(k) => {
            *open = CONTINUATIONS;
            k
        }
        None if *open > 0 => {
            *open -= 1;
            EventKind::Continuation
        }
        None => return Ok(None),
    };
    let n = c.n;
    let copied = n.min(MAX_PAYLOAD as u32);
    // A head that ended in what was copied needs no continuation: the
    // usual chunk, written or read whole, ends with its blank line.
    if copied == n && n >= 4 {
        // SAFETY: the helper checks the user address.
        let tail: [u8; 4] = unsafe {
            aya_ebpf::helpers::bpf_probe_read_user((c.buf + n as u64 - 4) as *const [u8; 4])
        }?;
        if tail == *b"\r\n\r\n" {
            *open = 0;
        }
    } else if copied < n {
        *open = 0;
    }
    let flags = if copied < n {
        event_flags::BUDGET_EXHAUSTED
    } else {
        0
    };
    let header = || c.header(kind, 0, copied, flags);
    let sent = match copied {
        0..=256 => send::<256>(header, c.buf, copied),
        257..=1024 => send::<1024>(header, c.buf, copied),
        _ => send::<MAX_PAYLOAD>(header, c.buf, copied),
    }?;
    counted(if sent {
        counter::TLS_PLAINTEXT
    } else {
        counter::RINGBUF_FULL
    });
    Ok(Some(kind))
}

/// The thread's turn a message start through OpenSSL is, as the thread
/// programs record them on cleartext connections (see `crate::threads`):
/// a client's write of a request, a server's read of one and its write of
/// the answer, each keyed by the connection's client end. They tie a
/// service's HTTPS calls to the request its thread was serving.
#[inline(never)]
fn turn(c: &Chunk, kind: EventKind) {
    let (side, flow) = match (kind, c.write) {
        (EventKind::Request, true) => (ThreadTurn::ClientWrote, c.flow),
        (EventKind::Request, false) => (ThreadTurn::ServerRead, c.flow),
        (EventKind::Response, true) => (ThreadTurn::ServerWrote, c.flow.reversed()),
        _ => return,
    };
    crate::threads::emit(
        &flow,
        thread_word::encode(side, None),
        c.n as i32,
        bpf_get_current_pid_tgid(),
        clock(),
    );
}

/// An OpenSSL call's buffer, read for the frame walk.
#[derive(Clone, Copy)]
#[repr(C)]
struct User {
    buf: u64,
}

impl crate::h2::Source for User {
    #[inline(always)]
    fn load(&self, off: u32, buf: &mut [u8; 8], n: u32) -> Result<(), ()> {
        let w = unsafe { core::ptr::read_volatile(&n) };
        let len = (w.wrapping_sub(1) & 7) + 1;
        // SAFETY: the helper checks the user address.
        let ret = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                buf.as_mut_ptr().cast(),
                len,
                (self.buf + off as u64) as *const core::ffi::c_void,
            )
        };
        if ret == 0 { Ok(()) } else { Err(()) }
    }
}

/// HTTP/2: the frames user space decodes, found by the wire's walk
/// ([`crate::h2::walk`]) and copied as one range in pieces; false when
/// the frame boundaries are lost (user space is told, and the connection
/// is followed no more).
#[inline(never)]
fn h2(c: &Chunk, st: &mut H2Follow) -> bool {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's counters.
    let counters = unsafe { &mut *counters };
    // A bounded length keeps the frame loop's states converging (an
    // unbounded one took 6.12's verifier past its 1M-instruction bound).
    if c.n > H2_CHUNK_MAX {
        return lost(c, counters);
    }
    // Restated as a mask (a no-op after the check) in a form the verifier
    // keeps the bound of, through the compiler's rewrites.
    let n = unsafe { core::ptr::read_volatile(&c.n) } & H2_CHUNK_MAX;
    match crate::h2::walk(User { buf: c.buf }, c.seq, n, st, counters) {
        crate::h2::Walk::Copy { lo, hi } => {
            copy_range(c, lo, hi.min(lo.saturating_add(H2_BUDGET)));
            true
        }
        crate::h2::Walk::Nothing => true,
        crate::h2::Walk::Lost(..) => lost(c, counters),
    }
}

/// The connection's frame boundaries are lost: user space is told once
/// (it drops the connection), and it is followed no more.
#[inline(always)]
fn lost(c: &Chunk, counters: &mut crate::Counters) -> bool {
    count(counters, counter::H2_LOST);
    let header = c.header(EventKind::Http2, 0, 0, event_flags::H2_LOST);
    if EVENTS
        .output::<EventHeader>(&header, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(counters, counter::RINGBUF_FULL);
    }
    false
}

/// Bytes of one OpenSSL call an HTTP/2 connection is walked in at most: a
/// call past it loses the connection (counted). A read returns a 16 KiB
/// record at most, and HTTP/2 libraries write their frames in buffers of
/// 16 to 64 KiB. A mask as well as a bound: with the call's length
/// unbounded, the frame loop's states never converged (6.12's verifier
/// gave up at its 1M-instruction bound; 6.18's took 119k, 44k bounded).
const H2_CHUNK_MAX: u32 = (1 << 20) - 1;

/// [`copy_range`]'s state, on its stack, for [`copy_step`].
#[repr(C)]
struct Pieces {
    chunk: *const Chunk,
    lo: u32,
    hi: u32,
}

/// Sends the chunk's bytes `lo..hi` as HTTP/2 events of up to
/// [`MAX_PAYLOAD`] bytes each.
#[inline(never)]
fn copy_range(c: &Chunk, lo: u32, hi: u32) {
    let mut p = Pieces { chunk: c, lo, hi };
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            H2_BUDGET / MAX_PAYLOAD as u32,
            copy_step as *mut core::ffi::c_void,
            core::ptr::addr_of_mut!(p).cast(),
            0,
        )
    };
}

/// One piece of [`copy_range`]: 0 to go on, 1 when the range has ended.
extern "C" fn copy_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back `copy_range`'s pointer to its `Pieces`,
    // whose chunk outlives the loop.
    let p = unsafe { &*ctx.cast::<Pieces>() };
    let c = unsafe { &*p.chunk };
    let at =
        p.lo.wrapping_add((index as u32).wrapping_mul(MAX_PAYLOAD as u32));
    if at >= p.hi {
        return 1;
    }
    let len = (p.hi - at).min(MAX_PAYLOAD as u32);
    let header = || c.header(EventKind::Http2, at, len, 0);
    let buf = c.buf + at as u64;
    let sent = match len {
        0..=256 => send::<256>(header, buf, len),
        257..=1024 => send::<1024>(header, buf, len),
        _ => send::<MAX_PAYLOAD>(header, buf, len),
    };
    match sent {
        Ok(true) => {
            counted(counter::TLS_PLAINTEXT);
            0
        }
        Ok(false) => {
            counted(counter::RINGBUF_FULL);
            1
        }
        Err(_) => 1,
    }
}

#[inline(always)]
fn counted(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's counters.
        count(unsafe { &mut *c }, index);
    }
}

#[repr(C)]
struct Record<const N: usize> {
    header: EventHeader,
    payload: [u8; N],
}

/// Reserves a record of size class `N`, reads the `n` (1..=N) plaintext
/// bytes at `buf` into it and writes `header()` beside it; false when the
/// ring is full, an error when the buffer was unreadable.
#[inline(always)]
fn send<const N: usize>(header: impl Fn() -> EventHeader, buf: u64, n: u32) -> Result<bool, i64> {
    // SAFETY: a helper without arguments.
    let flags = crate::wakeup_flags(n, unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() });
    let Some(mut entry) = EVENTS.reserve::<Record<N>>(0) else {
        return Ok(false);
    };
    let record = entry.as_mut_ptr();
    // 1..=N in a form the verifier follows (see the TC programs' `send`).
    let w = unsafe { core::ptr::read_volatile(&n) };
    let len = (w.wrapping_sub(1) & (N as u32 - 1)) + 1;
    // SAFETY: `record` points at the reserved record, N payload bytes long;
    // the helper checks the user address.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            core::ptr::addr_of_mut!((*record).payload).cast(),
            len,
            buf as *const core::ffi::c_void,
        )
    };
    if ret != 0 {
        entry.discard(BPF_RB_NO_WAKEUP as u64);
        return Err(ret);
    }
    unsafe { core::ptr::addr_of_mut!((*record).header).write(header()) };
    entry.submit(flags);
    Ok(true)
}
