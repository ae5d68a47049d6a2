//! Types shared by tracegap's kernel programs and its agent.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of padding the compiler
//! could fill with garbage: the kernel writes these bytes and user space
//! reads them back, so both sides must agree on every offset.
#![no_std]

/// Bytes of TCP payload one event carries at most.
///
/// A typical request header block (request line, Host, a few trace-context
/// headers) is a few hundred bytes and fits the first event; a larger block
/// continues in further events up to [`HEADER_BUDGET`]. Only the bytes used
/// are copied, into a ring-buffer record of the next size up (256, 512,
/// 1024, 2048 or 4096 payload bytes), so the bound costs nothing for small
/// ones.
pub const MAX_PAYLOAD: usize = 4096;

/// Bytes of one HTTP message's header block the kernel copies at most, summed
/// over its first segment and the segments that continue it: nginx's
/// default limit (large cookies, JWTs and forwarded headers make heads of
/// tens of KB). Header blocks longer than this are reported as truncated,
/// never guessed at. A runtime bound (the copy loop is bounded by
/// [`H2_BUDGET`]): raising it from 16 KiB cost the verifier under 1.5%.
pub const HEADER_BUDGET: u32 = 32 * 1024;
/// Bytes of one segment of a followed HTTP/2 connection the kernel copies
/// at most: a 64 KiB GSO segment may hold several calls' header blocks, and
/// a gRPC metadata block alone may be tens of KiB. A range cut
/// here loses its blocks, and the HPACK table with them (user space says
/// so), so it is as large as a segment gets.
pub const H2_BUDGET: u32 = 64 * 1024;
/// Bytes of a TLS ClientHello the kernel copies at most: enough for its
/// server name (SNI) and ALPN from the common stacks (OpenSSL, Go, rustls
/// and Java put them well before a post-quantum key share, which may make
/// a hello of 1.7 KB). What is past it, user space says it did not read.
pub const TLS_HELLO_BUDGET: u32 = 1024;

/// Entries of the per-flow continuation map: flows whose header block did
/// not end in the segment that started it.
pub const MAX_OPEN_HEADERS: u32 = 16 * 1024;

/// Size of the ring buffer that carries events to user space, in bytes.
pub const RING_BUFFER_BYTES: u32 = 4 * 1024 * 1024;

/// Unread bytes in the ring buffer at which the kernel wakes the reader:
/// once, as the unread bytes cross the mark. Below it, the events wait for
/// a wakeup by age, at most [`WAKEUP_AGE_NS`]. 64 KiB is
/// under two hundred typical events: few wakeups, yet each drain is short
/// (a fraction of a millisecond), so it does not hold a CPU the node's
/// services are waiting for. In `cargo xtask bench --quick` on 2 CPUs, a
/// wakeup per event lost 37% of the requests/s against 23% with 256 KiB
/// batches, and 256 KiB drains showed a p99 latency two to four times the
/// baseline's. It is 1/64 of the ring: a burst wakes the reader long before
/// the ring fills. Waking on every event past the mark, until the reader
/// has drained, cost 5 µs per event (`cargo xtask bench --kernel`).
pub const WAKEUP_BYTES: u32 = 64 * 1024;

/// The kernel also wakes the reader when it last did more than this long
/// ago (see the TC programs' `wakeup_flags`), and the reader drains once
/// more this long after a drain that found records: an event waits at most
/// this long to be read, and a quiet ring is never polled (issue 40: the
/// agent's cost at rest). 250 ms: at most four wakeups a second at low
/// rates, an eighth of the detection latency's 2 s bound.
pub const WAKEUP_AGE_NS: u64 = 250_000_000;

/// Entries of the map of local sources: addresses that sent an HTTP message
/// into the host through a watched interface (the pods on this node).
pub const MAX_LOCAL_SOURCES: u32 = 4096;

/// How long an address counts as local after its last message seen leaving
/// a watched interface. Pod CIDRs are per node in the common CNIs, so a
/// local address is reused by another local pod, not by a remote one; the
/// window only bounds how long a stale entry can hide a sighting.
pub const LOCAL_SOURCE_WINDOW_NS: u64 = 30_000_000_000;

/// Steps of the kernel programs the bench switches off, one variant at a
/// time, to measure what each costs (`cargo xtask bench --kernel`). The
/// programs read them from the read-only global `ABLATE`, which the agent
/// never sets: the verifier knows its value (0) and removes the branches,
/// so the programs that run on nodes carry none of this.
pub mod ablate {
    /// Return once the Ethernet, IP and TCP headers are read.
    pub const AFTER_PARSE: u32 = 1 << 0;
    /// Return once the first payload bytes are classified.
    pub const AFTER_CLASSIFY: u32 = 1 << 1;
    /// Skip the flow maps (local sources, open header blocks).
    pub const FLOW_MAPS: u32 = 1 << 2;
    /// Send nothing through the ring buffer: no reserve, no copy.
    pub const RING: u32 = 1 << 3;
}

/// Address family of a flow, as stored in [`FlowKey::family`].
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// Which way a packet crossed the interface the program is attached to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Into the host from the interface (for a pod's host-side veth: sent by the pod).
    Ingress = 0,
    /// Out of the host through the interface (for a pod's host-side veth: to the pod).
    Egress = 1,
}

impl Direction {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// What the payload of an event starts with.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A request line (`GET / HTTP/1.1`).
    Request = 1,
    /// A status line (`HTTP/1.1 200 OK`).
    Response = 2,
    /// More of a header block that began in an earlier segment of the flow.
    Continuation = 3,
    /// Bytes of a followed cleartext HTTP/2 connection (see [`H2Follow`]):
    /// the frames user space reads, in order; a gap before an event's
    /// `seq` is bytes the kernel skipped, and the event starts at a frame
    /// boundary. Flag [`event_flags::H2_LOST`] with no payload: the kernel
    /// stopped following the connection.
    Http2 = 4,
    /// A thread's turn on a connection with an HTTP exchange (see
    /// [`ThreadTurn`]): no payload; the header's fields say who and when.
    /// `flow` is the connection as its requests are keyed (client to
    /// server, as the client's socket names them on its end and the
    /// server's on its own); `direction` is the end (0: the client's, 1:
    /// the server's); `ifindex` (no interface here) is a [`thread_word`]:
    /// the [`ThreadTurn`], and for an answer's write what the thread did
    /// just before; `seq` is the process (tgid), `ack` the thread (pid);
    /// `segment_len` the bytes sent or received.
    Thread = 5,
    /// The first segment of a TLS connection, a ClientHello leaving the
    /// client (up to [`TLS_HELLO_BUDGET`] bytes): user space reads its
    /// server name and ALPN and counts the connection as one it cannot
    /// see inside. Nothing after it on the connection is copied.
    TlsHello = 6,
    /// The process at one end of a connection its OpenSSL calls use, sent
    /// as the connection is first named (see `tracegap-ebpf/src/ssl.rs`):
    /// `flow` is the connection with that end first, `seq` the process
    /// (tgid), and the 8 payload bytes its cgroup v2 id (native endian),
    /// which names the container and the pod, host-network ones too.
    Owner = 7,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            3 => Some(Self::Continuation),
            4 => Some(Self::Http2),
            5 => Some(Self::Thread),
            6 => Some(Self::TlsHello),
            7 => Some(Self::Owner),
            _ => None,
        }
    }
}

/// Which turn a [`EventKind::Thread`] event records: the first send of a
/// request on the client's socket (after it last received), the first
/// receive of one on the server's (after it last sent), or the first send
/// of its answer on the server's (after it last received).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadTurn {
    ClientWrote = 0,
    ServerRead = 1,
    ServerWrote = 2,
}

impl ThreadTurn {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::ClientWrote),
            1 => Some(Self::ServerRead),
            2 => Some(Self::ServerWrote),
            _ => None,
        }
    }
}

/// What a thread did on a relay's socket last (the value of the thread
/// programs' per-thread map), so an answer's write turn can say what came
/// just before it: an async runtime's task that reads its call's answer and
/// writes its own without yielding leaves exactly that trace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastOp {
    /// The socket's local port.
    pub port: u16,
    /// [`turn::SENT`] or [`turn::RECEIVED`] (an empty read counts: it is
    /// the task reading that socket to its end).
    pub op: u8,
    /// Whether the socket is a watched connection's client end.
    pub client: u8,
}

/// Threads whose last operation is remembered at most (an LRU).
pub const MAX_THREADS: u32 = 16 * 1024;

/// The `ifindex` word of a [`EventKind::Thread`] event: the turn in its
/// low byte; for a [`ThreadTurn::ServerWrote`], whether the thread's
/// previous operation on a relay's socket was a receive on a watched
/// connection's client end, and that socket's local port (high half).
pub mod thread_word {
    use super::{LastOp, ThreadTurn, turn};

    /// Set when the previous operation was a receive on a call's socket.
    pub const AFTER_CALL_READ: u32 = 1 << 8;

    /// The word for `side`, the thread's previous operation being `last`.
    #[inline(always)]
    pub fn encode(side: ThreadTurn, last: Option<LastOp>) -> u32 {
        match last {
            Some(l) if l.client != 0 && l.op == turn::RECEIVED => {
                side as u32 | AFTER_CALL_READ | (l.port as u32) << 16
            }
            _ => side as u32,
        }
    }

    /// The turn.
    pub fn side(w: u32) -> Option<ThreadTurn> {
        ThreadTurn::from_u8(w as u8)
    }

    /// The call socket's local port, if the previous operation was a
    /// receive on one.
    pub fn after_call(w: u32) -> Option<u16> {
        (w & AFTER_CALL_READ != 0).then_some((w >> 16) as u16)
    }
}

/// Entries of the map of connections whose sockets' turns are recorded:
/// those an HTTP/1.x request was seen on (keyed as the request's flow).
pub const MAX_WATCHED: u32 = 16 * 1024;

/// Entries of the map of relays: pod addresses the agent has seen both
/// serve requests and make calls, the only ones whose threads matter (a
/// call is tied to a request of the same pod).
pub const MAX_RELAYS: u32 = 4096;

/// Slots of the relays' filter: an array the thread programs read before
/// they look a socket's address up among the relays, so the node's other
/// sockets cost an array read, not a hash lookup. A slot is set by any
/// relay address that falls in it and never cleared: a false positive
/// costs only the lookup it would have saved.
pub const RELAY_FILTER_SLOTS: u32 = 16 * 1024;

/// Slots of the thread programs' memo of sockets found not to be a relay's
/// (one word each, 128 KiB): a send or receive on a socket already judged
/// costs an array read instead of two reads of `struct sock`. Direct
/// mapped by the socket's address ([`verdict_slot`]); a collision only
/// costs the full check again.
pub const SOCK_VERDICT_SLOTS: u32 = 16 * 1024;

/// A socket's slot in the memo ([`SOCK_VERDICT_SLOTS`]), from its kernel
/// address: sockets are slab objects, so the low bits say little and the
/// address is hashed whole.
#[inline(always)]
pub fn verdict_slot(sk: u64) -> u32 {
    (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SOCK_VERDICT_SLOTS.trailing_zeros())) as u32
}

/// What the memo holds for a socket judged under relay set `epoch`: the
/// address with the epoch in its top bits (a kernel address has them all
/// set), one word, so a racing writer never leaves half an entry. 0, never
/// a tag, is an empty slot; epoch 0 means the memo is off.
#[inline(always)]
pub fn verdict_tag(sk: u64, epoch: u32) -> u64 {
    sk ^ ((epoch as u64 & 0xffff) << 48)
}

/// A relay address's slot in the filter ([`RELAY_FILTER_SLOTS`]): the
/// address's last word (IPv4's only one), hashed. The kernel and the agent
/// must agree.
#[inline(always)]
pub fn relay_slot(addr: &[u8; 16], family: u8) -> u32 {
    let i = if family == family::IPV6 { 12 } else { 0 };
    let word = u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    word.wrapping_mul(0x9E37_79B1) >> (32 - RELAY_FILTER_SLOTS.trailing_zeros())
}

/// Value of the watched-connections map: each end's last operation
/// ([`turn`]), so only the first send or receive of a turn is an event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Turns {
    pub client: u8,
    pub server: u8,
    pub _pad: [u8; 2],
}

/// A send on a socket no request was seen on yet, noted by the thread
/// programs in a slot by its flow's hash: the first request of a new
/// connection can be sent before the interface sees it (the receive path
/// deferred to a softirq thread), and the TC programs, seeing it then, take
/// its writer from here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SendNote {
    /// The socket's connection, local to remote.
    pub flow: FlowKey,
    /// When the send returned (ktime ns); 0: taken.
    pub ts_ns: u64,
    /// `bpf_get_current_pid_tgid()` of the sender.
    pub pid_tgid: u64,
    pub bytes: u32,
    pub _pad: u32,
}

/// Slots of the send notes: a power of two.
pub const SEND_NOTE_SLOTS: u32 = 4096;
/// How recent a send note must be for a request's first packet to take it.
pub const SEND_NOTE_WINDOW_NS: u64 = 100_000_000;

/// Values of [`Turns`]' fields.
pub mod turn {
    pub const NONE: u8 = 0;
    pub const SENT: u8 = 1;
    pub const RECEIVED: u8 = 2;
}

/// Where the fields of `struct sock` the thread programs read are, in the
/// running kernel (found in its BTF by the agent, set as globals before
/// loading): aya-ebpf emits no CO-RE relocations.
pub mod sock_field {
    /// Global names, each a `u32` byte offset into `struct sock`.
    pub const DADDR: &str = "SK_DADDR";
    pub const RCV_SADDR: &str = "SK_RCV_SADDR";
    pub const DPORT: &str = "SK_DPORT";
    pub const NUM: &str = "SK_NUM";
    pub const FAMILY: &str = "SK_FAMILY";
    pub const V6_DADDR: &str = "SK_V6_DADDR";
    pub const V6_RCV_SADDR: &str = "SK_V6_RCV_SADDR";
}

/// Bits of [`EventHeader::flags`].
pub mod event_flags {
    /// The segment had more payload than the event carries.
    pub const PAYLOAD_CUT: u8 = 1 << 0;
    /// The header block went past [`crate::HEADER_BUDGET`]: what follows was not copied.
    pub const BUDGET_EXHAUSTED: u8 = 1 << 1;
    /// A message start shorter than 8 bytes that is a prefix of a start
    /// line (`G`, `POS`, `HTTP/`): followed into its next segments up to
    /// [`crate::SHORT_START_BUDGET`], whatever its kind, because the line
    /// that tells request from response is not complete yet.
    pub const SHORT_START: u8 = 1 << 2;
    /// [`crate::EventKind::Http2`]: the kernel lost this connection's frame
    /// boundaries (a segment missed, too many frames in one) and stopped
    /// following it, both directions.
    pub const H2_LOST: u8 = 1 << 3;
    /// Plaintext an OpenSSL call returned (see [`crate::ssl`]), not a
    /// segment: `ifindex` is 0, `seq` and `ack` count the connection's
    /// plaintext bytes in each direction since the probes first saw it.
    pub const PLAINTEXT: u8 = 1 << 4;
}

/// Bytes a short start ([`event_flags::SHORT_START`]) is followed for at
/// most. Smaller than [`HEADER_BUDGET`]: a 1-byte segment that merely looks
/// like the start of "GET " in a binary protocol costs at most this much.
pub const SHORT_START_BUDGET: u32 = MAX_PAYLOAD as u32;

/// A TCP flow as seen in one packet: source and destination as written in
/// that packet (not normalised), so a response's key is its request's key
/// with the ends swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address; IPv4 uses the first four bytes, the rest are zero.
    pub saddr: [u8; 16],
    /// Destination address; IPv4 uses the first four bytes.
    pub daddr: [u8; 16],
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// [`family::IPV4`] or [`family::IPV6`].
    pub family: u8,
    /// Written `[0, 0, 0]` by the programs (as every 3-byte padding), not
    /// `[0; 3]`: for the repeat LLVM calls `memset`, a frame of its own at
    /// the end of a call chain, which Linux 6.1 counts as 32 bytes against
    /// its 512-byte stack limit.
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            family: self.family,
            _pad: [0, 0, 0],
        }
    }
}

/// Fixed part of every event sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds when the packet was seen.
    pub ts_ns: u64,
    pub flow: FlowKey,
    /// Interface index the program ran on.
    pub ifindex: u32,
    /// TCP sequence number of the first payload byte of the segment.
    pub seq: u32,
    /// Length of the TCP payload in the segment (or GSO super-packet).
    pub segment_len: u32,
    /// Bytes of payload that follow this header in the event.
    pub payload_len: u16,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// [`EventKind`] as u8.
    pub kind: u8,
    /// [`event_flags`] bits.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// TCP acknowledgement number of the segment: how much of the other
    /// direction its sender had received. User space resynchronises a flow
    /// and pairs responses on it (see `tracegap-agent/src/http/stream.rs`).
    pub ack: u32,
}

/// Bytes of [`EventHeader`]: a ring-buffer record is the header, then
/// `payload_len` payload bytes (and unused room up to the record's size).
pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// Key of the continuation map: a flow on one interface. The interface is
/// part of the key because one packet crosses two host-side veths (the
/// client's and the server's), each followed on its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct OpenKey {
    pub flow: FlowKey,
    pub ifindex: u32,
    pub _pad: u32,
}

/// Key of the local-sources map: a source address and its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceKey {
    /// IPv4 in the first 4 bytes, the rest zero; or IPv6.
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Continuation state of a flow whose header block has not ended yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenHeader {
    /// Sequence number the next segment must start at to continue the block.
    pub next_seq: u32,
    /// Header bytes that may still be copied for this message.
    pub budget_left: u32,
}

/// Entries of the map of followed HTTP/2 connections (one per direction
/// per interface).
pub const MAX_H2_FLOWS: u32 = 16 * 1024;

/// Where the kernel is in one direction of a cleartext HTTP/2 connection
/// it follows from the client preface on: frame by frame, copying the
/// frames that carry header blocks (HEADERS, CONTINUATION, PUSH_PROMISE,
/// SETTINGS, RST_STREAM), the 9-byte header of a DATA frame that ends its
/// stream, and skipping every other byte by the frames' lengths.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct H2Follow {
    /// Sequence number of the next frame header (or of the header whose
    /// first `have` bytes ended an earlier segment).
    pub next: u32,
    /// Sequence number after the last byte read: the next segment's.
    pub end: u32,
    /// Bytes before this sequence number are copied: the rest of a frame
    /// that began in an earlier segment.
    pub copy_until: u32,
    /// The first bytes of a frame header cut by a segment's end.
    pub partial: [u8; 8],
    /// How many of `partial` are valid (0..=4).
    pub have: u8,
    /// [`h2_follow`] bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Bits of [`H2Follow::flags`].
pub mod h2_follow {
    /// Followed from a HEADERS frame, its preface unseen: a frame no
    /// HTTP/2 sender would write (an unknown type, a length past the
    /// default 16 KiB) ends the following instead of being walked past, as
    /// the start may have been bytes that only looked like a frame.
    pub const JOINED: u8 = 1 << 0;
    /// The server's side of a connection followed from its client
    /// preface, nothing of it read yet. A server writes its own preface
    /// (SETTINGS) as it accepts, not after the client's: the two cross,
    /// and the server's can pass this interface before the client's
    /// preface does while the client's acknowledgement does not cover it
    /// yet. Such a side starts at its first segment seen past the
    /// acknowledgement instead of being lost, read as a joined side
    /// ([`JOINED`]); see [`crate::counter::H2_SERVER_PREFACE_MISSED`].
    pub const UNREAD: u8 = 1 << 1;
}

/// Indexes into the per-CPU counters: one map entry per CPU holding all of
/// them, so a program run looks the counters up once.
pub mod counter {
    /// Packets the programs ran on.
    pub const PACKETS: u32 = 0;
    /// TCP segments with payload.
    pub const TCP_PAYLOAD: u32 = 1;
    /// Request lines recognised.
    pub const HTTP_REQUESTS: u32 = 2;
    /// Status lines recognised.
    pub const HTTP_RESPONSES: u32 = 3;
    /// Continuation segments of a header block.
    pub const CONTINUATIONS: u32 = 4;
    /// Events not sent because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 5;
    /// Packets whose headers could not be read (truncated, unknown layout).
    pub const PARSE_ERRORS: u32 = 6;
    /// Messages followed until [`crate::HEADER_BUDGET`] ran out (a header
    /// block that long, or a body after a block that did not end its segment).
    pub const BUDGET_EXHAUSTED: u32 = 7;
    /// Message starts not copied on the way into a pod because the same
    /// packet was already copied on its way out of a local pod: each
    /// message is sent to user space once, not once per veth it crosses.
    pub const SECOND_SIGHTINGS: u32 = 8;
    /// Message starts shorter than 8 bytes (a request written a few bytes
    /// at a time), followed as [`crate::event_flags::SHORT_START`].
    pub const SHORT_STARTS: u32 = 9;
    /// HTTP/2 client connection prefaces (`PRI * HTTP/2.0`) seen, once per
    /// connection as messages are: each starts following the connection.
    pub const H2_PREFACES: u32 = 10;
    /// Segments of followed HTTP/2 connections that had frames to copy.
    pub const H2_SEGMENTS: u32 = 11;
    /// Followed HTTP/2 connections given up: a segment missed or
    /// overlapping, or more frames in one segment than the kernel walks.
    pub const H2_LOST: u32 = 12;
    /// HTTP/2 connections already open when first seen, followed from a
    /// segment that starts with a HEADERS frame.
    pub const H2_JOINS: u32 = 13;
    /// HTTP/2 server sides read from their second write: the server's
    /// preface went by before the client's was seen (they crossed; see
    /// [`crate::h2_follow::UNREAD`]).
    pub const H2_SERVER_PREFACE_MISSED: u32 = 14;
    /// Thread turns sent ([`crate::EventKind::Thread`]).
    pub const THREAD_TURNS: u32 = 15;
    /// Diagnostics the programs logged (`--kernel-log debug`; always 0
    /// when off): against the lines in the agent's log, what a full log
    /// ring lost.
    pub const DIAGNOSTICS: u32 = 16;
    /// TLS ClientHellos seen, on every veth they cross (copied on the
    /// first: [`crate::EventKind::TlsHello`]).
    pub const TLS_HELLOS: u32 = 17;
    /// Plaintext chunks OpenSSL's calls returned (uprobes, see
    /// [`crate::ssl`]) that were sent as events.
    pub const TLS_PLAINTEXT: u32 = 18;
    /// OpenSSL calls whose connection no socket operation has named yet
    /// (a read served from OpenSSL's buffer before any call on the
    /// connection touched its socket): their bytes are counted, not sent.
    pub const TLS_UNNAMED: u32 = 19;
    /// Number of counters.
    pub const COUNT: u32 = 20;

    /// Prometheus-style names, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "packets",
        "tcp_payload_segments",
        "http_requests",
        "http_responses",
        "header_continuations",
        "ringbuf_full",
        "parse_errors",
        "header_budget_exhausted",
        "second_sightings_skipped",
        "short_starts",
        "h2_prefaces",
        "h2_segments",
        "h2_lost",
        "h2_joins",
        "h2_server_preface_missed",
        "thread_turns",
        "diagnostics_logged",
        "tls_hellos",
        "tls_plaintext_chunks",
        "tls_unnamed_calls",
    ];
}

/// OpenSSL's plaintext, read by uprobes on `SSL_write`, `SSL_write_ex`,
/// `SSL_read` and `SSL_read_ex` in each libssl the node's processes map.
/// The entry probe keeps the call's arguments per thread ([`SslCall`]); a
/// socket operation inside the call names the connection (the thread
/// programs, which see the socket); the return probe sends what the call
/// moved as an event of the cleartext kinds, flagged
/// [`event_flags::PLAINTEXT`], with the connection's plaintext byte counts
/// as its `seq` and `ack` ([`SslConn`]), so user space assembles and pairs
/// it as it does the wire's.
pub mod ssl {
    use super::FlowKey;

    /// The attach cookie of each probed function: which call, and where
    /// its length is.
    pub const WRITE: u64 = 0;
    pub const WRITE_EX: u64 = 1;
    pub const READ: u64 = 2;
    pub const READ_EX: u64 = 3;

    /// The functions probed, indexed by their cookie.
    pub const FUNCTIONS: [&str; 4] = ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"];

    /// Threads with an OpenSSL call in flight at most.
    pub const MAX_CALLS: u32 = 16 * 1024;
    /// OpenSSL connections (`SSL*` of a process) followed at most (an LRU:
    /// no probe sees `SSL_free`, so the least recently used go); 16 Ki of
    /// about 100 bytes each, preallocated.
    pub const MAX_CONNS: u32 = 16 * 1024;
    /// Chunks after a message's start copied while its head may not have
    /// ended (a head written or read in pieces, or a start chunk that also
    /// holds body bytes, which the kernel cannot tell apart): 4 chunks, up
    /// to 16 KiB more, so a streamed body costs at most 4 copies.
    pub const CONTINUATIONS: u8 = 4;

    /// One thread's call in flight.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SslCall {
        /// The call's `SSL*`.
        pub ssl: u64,
        /// The plaintext buffer.
        pub buf: u64,
        /// `_ex` calls: where the call writes the bytes it moved.
        pub moved: u64,
        /// The cookie ([`WRITE`] ...).
        pub op: u64,
    }

    /// Key of a followed connection: the process and its `SSL*`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SslKey {
        pub tgid: u64,
        pub ssl: u64,
    }

    /// [`SslConn::h2`]: not HTTP/2 (as far as seen), followed frame by
    /// frame from its preface, or lost (its frame boundaries).
    pub const H2_NO: u8 = 0;
    pub const H2_FOLLOWED: u8 = 1;
    pub const H2_LOST: u8 = 2;

    /// A followed connection.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SslConn {
        /// Its socket, local end first; `family` 0 until a socket
        /// operation inside one of its calls names it.
        pub flow: FlowKey,
        /// Plaintext bytes written and read since it was first seen (or
        /// last named anew: an `SSL*` reused for another connection).
        pub written: u32,
        pub read: u32,
        /// Continuation chunks still copied, each way (see [`CONTINUATIONS`]).
        pub open_write: u8,
        pub open_read: u8,
        /// [`H2_NO`], [`H2_FOLLOWED`] or [`H2_LOST`].
        pub h2: u8,
        pub _pad: u8,
        /// HTTP/2: each direction's frame walk, as the wire's
        /// ([`crate::H2Follow`]), over the plaintext's byte counts.
        pub h2_write: crate::H2Follow,
        pub h2_read: crate::H2Follow,
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::OpenHeader {}
    unsafe impl aya::Pod for super::OpenKey {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::H2Follow {}
    unsafe impl aya::Pod for super::Turns {}
    unsafe impl aya::Pod for super::SendNote {}
    unsafe impl aya::Pod for super::ssl::SslCall {}
    unsafe impl aya::Pod for super::ssl::SslKey {}
    unsafe impl aya::Pod for super::ssl::SslConn {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn layout_has_no_implicit_padding() {
        // 16 + 16 + 2 + 2 + 1 + 3
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        // 16 + 1 + 3
        assert_eq!(core::mem::size_of::<SourceKey>(), 20);
        // 8 + 40 + 4 + 4 + 4 + 2 + 1 + 1 + 1 + 3 + 4
        assert_eq!(EVENT_HEADER_LEN, 72);
        // 4 + 4 + 4 + 8 + 1 + 1 + 2
        assert_eq!(core::mem::size_of::<H2Follow>(), 24);
        // 40 + 8 + 8 + 4 + 4
        assert_eq!(core::mem::size_of::<SendNote>(), 64);
    }

    #[test]
    fn reversed_swaps_ends() {
        let k = FlowKey {
            saddr: [1; 16],
            daddr: [2; 16],
            sport: 3,
            dport: 4,
            family: family::IPV6,
            _pad: [0, 0, 0],
        };
        let r = k.reversed();
        assert_eq!(
            (r.saddr, r.daddr, r.sport, r.dport),
            ([2; 16], [1; 16], 4, 3)
        );
        assert_eq!(r.reversed(), k);
    }
}
