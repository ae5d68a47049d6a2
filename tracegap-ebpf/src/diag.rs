//! The programs' rare diagnostics, through aya-log into the agent's own
//! log (`--kernel-log debug`): what a counter says happened, with the
//! flow it happened to.
//!
//! Off by default, and then free: the agent sets aya-log's level global
//! (`AYA_LOG_LEVEL`, in `.rodata`) before loading, the kernel freezes it,
//! and the verifier drops every diagnostic as dead code, so no packet pays
//! for a check. On, a diagnostic costs only on the rare path it sits on (a
//! connection given up, a record dropped), never on a packet read as
//! usual.
//!
//! A step only notes what happened ([`note`], a few stores into a per-CPU
//! record); once the packet is done, the classifier hands a noted one to a
//! program of its own that logs it ([`hand_over`], a tail call, then
//! [`flush`]). A log record's fields take a frame of nearly 300 bytes:
//! called from inside the HTTP/2 walk, whose frame is near 300 bytes
//! itself, the chain passed the 512-byte stack limit, and a log call at
//! each of six sites cost the verifier 409k instructions on one kernel.
//! Called at the classifier's end, it was walked again for every state the
//! classifier's paths arrive in: 510k instructions on Linux 6.1. A program
//! of its own is verified once, on a stack of its own. A packet that notes
//! two things logs the last.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    programs::TcContext,
};
use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};
use tracegap_common::{FlowKey, H2_BUDGET, HEADER_BUDGET, MAX_H2_FLOWS, family};

/// What a step noted, with its flow.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Why {
    /// HTTP/2, given up: a segment this hook never saw; `detail` is its
    /// bytes.
    H2Gap = 1,
    /// HTTP/2, given up: a frame header cut by the last segment could not
    /// be completed.
    H2CutHeader,
    /// HTTP/2, given up: the next frame header sits before this segment.
    H2Behind,
    /// HTTP/2, given up: the frame walk stopped short.
    H2Walk,
    /// HTTP/2: the followed-connections map refused a connection.
    H2NotFollowed,
    /// HTTP/2: a join refused, the HEADERS frame's side unknown.
    H2JoinRefused,
    /// HTTP/2: a segment's header frames past the copy budget.
    H2PastBudget,
    /// HTTP/1: a message's head past the copy budget.
    Http1PastBudget,
    /// The ring buffer was full; `detail` is the event's payload bytes.
    RecordDropped,
}

#[repr(C)]
pub struct Pending {
    why: u32,
    detail: u32,
    flow: FlowKey,
}

/// This CPU's diagnostic for the packet in hand; `why` 0 is none.
#[map]
static DIAG: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// The program that logs ([`flush`]), at index 0: set by the agent only
/// with the log on. An empty slot makes the tail call return, and the
/// packet goes on as ever.
#[map]
static DIAG_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Whether diagnostics are on: a constant to the verifier.
#[inline(always)]
pub fn on() -> bool {
    level_enabled(Level::Debug)
}

/// Notes `why` for the packet in hand, to be logged by [`flush`].
#[inline(always)]
pub fn note(flow: &FlowKey, why: Why, detail: u32) {
    if !on() {
        return;
    }
    if let Some(p) = DIAG.get_ptr_mut(0) {
        // SAFETY: this CPU's entry, used by this program run alone.
        let p = unsafe { &mut *p };
        p.why = why as u32;
        p.detail = detail;
        p.flow = *flow;
    }
}

/// Hands the packet over to the program that logs its diagnostic, if one
/// was noted; off, the verifier drops this as dead code.
#[inline(always)]
pub fn hand_over(ctx: &TcContext) {
    if !on() {
        return;
    }
    let Some(p) = DIAG.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's entry, used by this program run alone.
    if unsafe { (*p).why } == 0 {
        return;
    }
    // SAFETY: the context is this program's own; the tail call either runs
    // the logging program in this one's place or returns here.
    unsafe { DIAG_PROGRAMS.tail_call(ctx, 0) };
}

/// `a` as aya-log prints addresses of both families with one argument
/// type: IPv4 as `::ffff:a.b.c.d`.
#[inline(always)]
fn addr(a: &[u8; 16], fam: u8) -> [u8; 16] {
    if fam == family::IPV4 {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
        ]
    } else {
        *a
    }
}

/// Logs the packet's diagnostic, if one was noted, and clears it. Returns
/// how many it logged (0 or 1), for [`tracegap_common::counter::DIAGNOSTICS`].
#[inline(always)]
pub fn flush() -> u64 {
    if !on() {
        return 0;
    }
    let Some(p) = DIAG.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's entry, used by this program run alone.
    let p = unsafe { &mut *p };
    let why = p.why;
    if why == 0 {
        return 0;
    }
    p.why = 0;
    let f = &p.flow;
    let (s, sp, d, dp) = (
        addr(&f.saddr, f.family),
        f.sport,
        addr(&f.daddr, f.family),
        f.dport,
    );
    let lost = match why {
        x if x == Why::H2Gap as u32 => {
            debug!(
                &(),
                "HTTP/2 {:i}:{} -> {:i}:{} no longer followed: {} bytes never seen by this hook before its segment; read again from its next segment that starts with a HEADERS frame",
                s,
                sp,
                d,
                dp,
                p.detail
            );
            return 1;
        }
        x if x == Why::H2CutHeader as u32 => "a cut frame header could not be completed",
        x if x == Why::H2Behind as u32 => "the next frame starts before the segment",
        x if x == Why::H2Walk as u32 => {
            "a frame no sender writes, or more frames than the walk reads"
        }
        x if x == Why::H2NotFollowed as u32 => {
            debug!(
                &(),
                "HTTP/2 {:i}:{} -> {:i}:{} not followed: the followed-connections map ({} entries) refused it",
                s,
                sp,
                d,
                dp,
                MAX_H2_FLOWS
            );
            return 1;
        }
        x if x == Why::H2JoinRefused as u32 => {
            debug!(
                &(),
                "HTTP/2 {:i}:{} -> {:i}:{} not joined: its HEADERS frame's side cannot be told (its first field from the dynamic table, or trailers) and both ends are pods of this node; joined at a segment whose side can be told",
                s,
                sp,
                d,
                dp
            );
            return 1;
        }
        x if x == Why::H2PastBudget as u32 || x == Why::Http1PastBudget as u32 => {
            let (what, budget) = if x == Why::H2PastBudget as u32 {
                ("HTTP/2 segment's header frames", H2_BUDGET)
            } else {
                (
                    "HTTP/1 message's head (or the body after it)",
                    HEADER_BUDGET,
                )
            };
            debug!(
                &(),
                "{} {:i}:{} -> {:i}:{} past the {}-byte copy budget: the rest not copied",
                what,
                s,
                sp,
                d,
                dp,
                budget
            );
            return 1;
        }
        _ => {
            debug!(
                &(),
                "ring buffer full: an event of {} bytes of {:i}:{} -> {:i}:{} dropped (the agent reads behind)",
                p.detail,
                s,
                sp,
                d,
                dp
            );
            return 1;
        }
    };
    debug!(
        &(),
        "HTTP/2 {:i}:{} -> {:i}:{} no longer followed: {}; read again from its next segment that starts with a HEADERS frame",
        s,
        sp,
        d,
        dp,
        lost
    );
    1
}
