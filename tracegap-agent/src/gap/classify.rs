//! Classifying hops: why a hop is, or is not, in the trace.
//!
//! A hop alone tells whether its request carried context. Whether a service
//! *dropped* context, *passed it through* without making a span, or *flipped
//! the sampling decision* shows only when its inbound and outbound requests
//! are read together. The engine remembers, per pod address, the inbound
//! requests it is serving and the outbound requests it sends, and relates
//! them by time: an outbound request belongs to an inbound one when it
//! starts while the inbound one is open (the inbound request's lifetime on
//! the same pod is the correlation window).
//!
//! Ambiguity: a pod serving several requests at once makes the relation
//! uncertain. The engine resolves it so:
//! 1. an inbound request of the *same trace* as the outbound one wins
//!    (`Confidence::Exact`: the ids prove the relation);
//! 2. otherwise, if exactly one inbound request is open, it is the parent
//!    (`Confidence::Sole`: nothing else could have caused the call, short of
//!    background work);
//! 3. otherwise, if the thread that wrote the call read exactly one of
//!    them, and no request since (a thread per request), that one
//!    (`Confidence::Thread`: the kernel's turns, see [`super::threads`]);
//! 4. otherwise, if exactly one of them had its answer written by a thread
//!    whose previous operation was reading the call's answer (a task that
//!    resumed on its call's answer and answered without yielding: an
//!    async runtime's, where a thread serves many requests), and the pod's
//!    calls have been named so cleanly (see [`HandoffRecord`]), that one
//!    (`Confidence::Handoff`, see [`super::threads::Handoff`]);
//! 5. otherwise, with `--place-by-timing`, if the one request whose answer
//!    followed the call's answer closely, and clearly sooner than any
//!    other's, is open (`Confidence::Timing`: one to one, scored on both
//!    ends, see [`super::timing`]), that one;
//! 6. otherwise the call is `Confidence::Ambiguous`: the candidates are
//!    named (span links), none is made its parent. Under load the newest
//!    open request is almost never the cause (measured: 4 of 320 right at
//!    16 in flight), and a wrong parent in Jaeger reads as a fact; no
//!    parent, with the candidates linked, reads as what it is.
//!
//! Synthetic spans carry the confidence, so nobody mistakes a guess for a
//! fact.

use std::borrow::Cow;
use std::{collections::VecDeque, net::IpAddr, sync::Arc};

use serde::Serialize;

use super::{
    hop::{Hop, Protocol, Request},
    threads::{Evidence, Handoff, Threads, Turn},
    timing::{self, Candidate, OtherCall, Timing},
};
use crate::http::context::{Format, Found, SpanContext};

/// Why a hop is, or is not, visible in the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapKind {
    /// Valid context arrived and nothing suggests the callee mishandled it.
    ContextOk,
    /// No trace context at all, and no traced request it could belong to.
    MissingContext,
    /// The caller was serving a traced request and sent this one without
    /// context (or with a new trace): it did not propagate.
    BrokenPropagation,
    /// The caller forwarded the context it received unchanged (same trace,
    /// same parent span id): it passed headers through without a span of
    /// its own. Reported on the edge *leaving* the pass-through service,
    /// like every other fault of a caller; its missing span is added when
    /// the request it was serving completes (see [`Verdict::forwarded`]).
    Passthrough,
    /// Context says "not sampled": the trace will not be recorded.
    Unsampled,
    /// The caller received the trace with one sampling decision and sent it
    /// on with the other: the trace will be torn.
    SamplingInconsistent,
    /// A context header is present but invalid.
    MalformedContext,
    /// Context formats disagree: two formats in one request with different
    /// traces, or a different format out than in, with a new trace.
    FormatMismatch,
    /// Valid context reached a callee known not to be instrumented (from
    /// Kubernetes annotations or the names file): the trace shows the call
    /// to it and nothing inside.
    Uninstrumented,
    /// The head was not read whole (cut at the kernel's copy budget, or a
    /// segment of it not copied) and what was read has no context: unknown
    /// whether one was sent. Never a gap: a gap detector that made gaps up
    /// out of what it could not read would be worse than none.
    Unreadable,
}

impl GapKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ContextOk => "context_ok",
            Self::MissingContext => "missing_context",
            Self::BrokenPropagation => "broken_propagation",
            Self::Passthrough => "passthrough",
            Self::Unsampled => "unsampled",
            Self::SamplingInconsistent => "sampling_inconsistent",
            Self::MalformedContext => "malformed_context",
            Self::FormatMismatch => "format_mismatch",
            Self::Uninstrumented => "uninstrumented",
            Self::Unreadable => "unreadable",
        }
    }

    /// Whether the hop is a gap (something to explain), as opposed to a
    /// healthy or deliberately unrecorded hop.
    pub fn is_gap(&self) -> bool {
        !matches!(self, Self::ContextOk | Self::Unsampled | Self::Unreadable)
    }
}

impl std::fmt::Display for GapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How sure the engine is that an outbound request belongs to an inbound one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// Same trace id: the ids say so.
    Exact,
    /// The only request the caller was serving at the time.
    Sole,
    /// The thread that wrote the call read this request, and no other
    /// since.
    Thread,
    /// Of `candidates` open requests, the one whose answer its thread
    /// wrote right after reading the call's answer.
    Handoff { candidates: usize },
    /// Of `candidates` open requests, the one whose answer followed the
    /// call's answer, clearly sooner than any other's.
    Timing { candidates: usize },
    /// One of several requests the caller was serving: the evidence does
    /// not single one out. `threads`: why the threads' turns could not
    /// tell ([`Evidence::why_not`]); `answers`: why the answers' could not
    /// ([`HandoffSeen::as_str`]).
    Ambiguous {
        candidates: usize,
        threads: &'static str,
        answers: HandoffSeen,
    },
}

impl Confidence {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Sole => "sole",
            Self::Thread => "thread",
            Self::Handoff { .. } => "handoff",
            Self::Timing { .. } => "timing",
            Self::Ambiguous { .. } => "ambiguous",
        }
    }

    /// Whether the evidence singles the inbound request out, so a hop may
    /// be placed under it.
    pub fn places(&self) -> bool {
        matches!(
            self,
            Self::Exact | Self::Sole | Self::Thread | Self::Handoff { .. } | Self::Timing { .. }
        )
    }
}

/// What the answers said of a call the threads' turns could not place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoffSeen {
    /// No answer turn to ask (thread evidence off, or the call not yet
    /// answered).
    NotAsked,
    /// One answer named the call, but the pod's record is not (yet) clean
    /// enough to trust it.
    Unproven,
    /// One answer named the call, but another call answered while that
    /// request was open, before its answer, was not named exactly once:
    /// the name may belong to it.
    Unsettled,
    /// Several answers named the call.
    Contested,
    /// None did.
    Unnamed,
}

impl HandoffSeen {
    /// Whether the answers named the call exactly once, for the pod's
    /// record (None: not asked).
    fn named_once(&self) -> Option<bool> {
        match self {
            Self::Unproven | Self::Unsettled => Some(true),
            Self::Contested | Self::Unnamed => Some(false),
            Self::NotAsked => None,
        }
    }

    /// For spans (`tracegap.link.answers`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotAsked => "not_asked",
            Self::Unproven => "unproven",
            Self::Unsettled => "unsettled",
            Self::Contested => "contested",
            Self::Unnamed => "unnamed",
        }
    }
}

/// Outcomes remembered per pod: its last calls the answers were asked
/// about.
const HANDOFF_WINDOW: u32 = 128;
/// Of them, at least this many before the answers place anything.
const HANDOFF_MIN: u32 = 32;
/// And at most this many not named exactly once.
const HANDOFF_MAX_UNCLEAN: u32 = 2;

/// Calls answered while a named request was open checked at most (past
/// it, the answers do not place).
const MAX_SETTLED: usize = 64;
/// How long after a call's answer the answer naming it may be written.
const HANDOFF_NAMING_NS: u64 = 250_000_000;

/// How cleanly a pod's calls were named by its answers. A runtime whose
/// tasks read their call's answer and write their own in one go names
/// each call exactly once. One that hands the answer from a connection's
/// task to the request's task (hyper's client, asyncio's protocols, Go's
/// goroutines across threads) lets other tasks run in between: an answer
/// then names whatever was read last, and the call really read leaves
/// unnamed, or named twice. Each wrong name leaves a call unnamed or
/// contested, so a record with almost none of those has almost no wrong
/// names; a pod earns the rule back as its record clears.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandoffRecord {
    /// The last outcomes, newest in bit 0: 1 when not named exactly once.
    unclean: u128,
    seen: u32,
}

impl HandoffRecord {
    fn record(&mut self, clean: bool) {
        self.unclean = (self.unclean << 1) | u128::from(!clean);
        self.seen = (self.seen + 1).min(HANDOFF_WINDOW);
    }

    fn trusted(&self) -> bool {
        self.seen >= HANDOFF_MIN && self.unclean.count_ones() <= HANDOFF_MAX_UNCLEAN
    }
}

/// Requests open at once past which timing does not try: the more there
/// are, the likelier one answers within the margin by chance (measured:
/// none wrong of ~700 calls at 16 in flight, about 1 in 190 at 64).
pub const MAX_TIMED: usize = 32;

/// Candidates named (as span links) at most for an ambiguous hop.
pub const MAX_CANDIDATES: usize = 8;

/// The inbound request an outbound hop was made for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Link {
    /// The inbound request's context. When not [`Confidence::places`], one
    /// of the candidates (the newest), which only judges the hop's kind
    /// (all candidates are traced): never a parent.
    pub context: SpanContext,
    pub confidence: Confidence,
    /// Whether the inbound request carried baggage (ambiguous: every
    /// candidate did).
    pub baggage: bool,
    /// Ambiguous: the candidates' contexts, newest first, at most
    /// [`MAX_CANDIDATES`].
    pub candidates: Vec<SpanContext>,
}

/// The engine's diagnosis of one hop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub kind: GapKind,
    /// Human-readable why, for spans and the report (a fixed text for
    /// most: a healthy hop allocates none).
    pub detail: Cow<'static, str>,
    /// The inbound request this hop was made for, when the caller was
    /// serving a traced one.
    pub link: Option<Link>,
    /// How many requests the callee sent on while serving this one with
    /// its context unchanged (same trace, same parent span id): when not 0,
    /// the callee passed the context through and has no span for this hop.
    pub forwarded: usize,
    /// How many requests the callee sent on while serving this one in the
    /// same trace under a span id of its own: it makes spans (it is
    /// instrumented), whatever its sampler then keeps.
    pub continued: usize,
    /// Baggage arrived at the caller and this hop did not carry it on.
    pub baggage_dropped: bool,
}

/// Retention of remembered requests past their end: long enough for the
/// outer request of a chain to complete after its inner calls.
pub const RETENTION_NS: u64 = 120 * 1_000_000_000;
/// Requests remembered per pod and direction at most.
pub const MAX_PER_POD: usize = 4096;
/// Pods remembered at most.
pub const MAX_PODS: usize = 16 * 1024;

#[derive(Clone, Debug)]
struct Open {
    /// Shared by the pairer, the callee's inbound and the caller's outbound
    /// copy.
    req: Arc<Request>,
    /// 0 while unanswered (no request ends at boot): an Option would
    /// double this field, and there are two of these per open flow.
    end_ns: u64,
    /// An inbound request a call was placed under (one to one, for
    /// [`timing`]).
    taken: bool,
}

impl Open {
    fn start_ns(&self) -> u64 {
        self.req.ts_ns
    }

    fn is(&self, flow: &crate::events::Flow, seq: u32) -> bool {
        self.req.seq == seq && self.req.flow == *flow
    }

    fn baggage(&self) -> bool {
        self.req.propagation.baggage.is_some()
    }

    fn primary(&self) -> Option<&SpanContext> {
        self.req.propagation.primary()
    }

    fn end_ns(&self) -> Option<u64> {
        (self.end_ns != 0).then_some(self.end_ns)
    }

    fn covers(&self, t: u64) -> bool {
        self.start_ns() <= t && self.end_ns().is_none_or(|e| t <= e)
    }
}

#[derive(Default)]
struct Pod {
    /// Requests this pod received.
    inbound: VecDeque<Open>,
    /// Requests this pod sent.
    outbound: VecDeque<Open>,
    last_ns: u64,
    handoffs: HandoffRecord,
}

/// Pushes `o`; the request pushed out, if any, goes to `spare`.
fn push_bounded(q: &mut VecDeque<Open>, o: Open, spare: &mut Spare) {
    if q.len() >= MAX_PER_POD
        && let Some(old) = q.pop_front()
    {
        spare.keep(old.req);
    }
    q.push_back(o);
}

/// Request records the engine let go of, for [`Engine::record`] to reuse
/// once nothing else holds them: in the steady state each new request
/// takes the place of one forgotten, and allocates nothing (issue 33).
#[derive(Default)]
struct Spare(Vec<Arc<Request>>);

impl Spare {
    /// Records kept for reuse at most.
    const MAX: usize = 1024;

    fn keep(&mut self, req: Arc<Request>) {
        if self.0.len() < Self::MAX {
            self.0.push(req);
        }
    }

    /// `req` in a spare record no one else holds, else in a new one.
    fn record(&mut self, req: Request) -> Arc<Request> {
        while let Some(mut spare) = self.0.pop() {
            if let Some(slot) = Arc::get_mut(&mut spare) {
                *slot = req;
                return spare;
            }
        }
        Arc::new(req)
    }
}

fn close(q: &mut VecDeque<Open>, flow: &crate::events::Flow, seq: u32, end_ns: u64) {
    if let Some(o) = q.iter_mut().rev().find(|o| o.is(flow, seq)) {
        o.end_ns = end_ns.max(1);
    }
}

/// Classifies hops. Feed every request when it starts
/// ([`Engine::request_started`]) and every hop when it completes
/// ([`Engine::classify`]), in time order.
#[derive(Default)]
pub struct Engine {
    pods: crate::FastMap<IpAddr, Pod>,
    threads: Threads,
    /// The latest event seen (request, answer, turn): how far timing
    /// knows which requests were answered.
    seen_ns: u64,
    /// Whether timing places calls (see [`timing`]); off, it is not asked.
    by_timing: bool,
    spare: Spare,
}

impl Engine {
    /// An engine; `by_timing`: whether timing places calls.
    pub fn new(by_timing: bool) -> Self {
        Self {
            by_timing,
            ..Self::default()
        }
    }

    /// A request's shared record: one the engine forgot, reused, when
    /// nothing holds it any more; else a new one.
    pub fn record(&mut self, req: Request) -> Arc<Request> {
        self.spare.record(req)
    }

    /// A thread's turn on a connection, from the kernel.
    pub fn thread_turn(&mut self, t: Turn) {
        self.seen_ns = self.seen_ns.max(t.ts_ns);
        self.threads.turn(t);
    }

    /// Whether `hop` is a call the threads' turns may decide (several
    /// traced requests open on its caller, none of its trace) whose write
    /// turn has not arrived yet. The turn is sent as the writer's send
    /// returns, which a busy CPU can delay past the call's answer: such a
    /// hop is worth holding a moment (see the agent's pipeline).
    fn awaits_turns(&self, hop: &Hop) -> bool {
        if self.threads.turns == 0 || self.threads.writer(hop.caller(), hop.start_ns).is_some() {
            return false;
        }
        let Some(pod) = self.pods.get(&hop.caller().ip) else {
            return false;
        };
        let trace = hop.context().map(|c| c.trace_id.as_str());
        let mut open = pod
            .inbound
            .iter()
            .filter(|o| o.covers(hop.start_ns))
            .filter_map(Open::primary);
        let mut n = 0;
        for c in open.by_ref() {
            if Some(c.trace_id.as_str()) == trace {
                return false;
            }
            n += 1;
        }
        n >= 2
    }

    /// Whether `hop`'s cause is worth waiting for: its write turn
    /// ([`Self::awaits_turns`]), or, timing deciding it, answers of its
    /// candidates not in yet (see [`timing`]).
    pub fn awaits(&self, hop: &Hop) -> bool {
        // Neither timing nor answers' turns asked, nothing waits on
        // answers: the hop's cause is not worked out twice on every hop.
        self.awaits_turns(hop)
            || ((self.by_timing || self.threads.answer_turns > 0) && self.cause_of(hop).1)
    }

    /// Whether the pod at `ip` both serves requests and makes calls: the
    /// only pods whose threads' turns can tie a call to a request.
    pub fn is_relay(&self, ip: IpAddr) -> bool {
        self.pods
            .get(&ip)
            .is_some_and(|p| !p.inbound.is_empty() && !p.outbound.is_empty())
    }

    /// Records a request as it starts, so requests that start while it is
    /// open can be related to it.
    pub fn request_started(&mut self, req: &Arc<Request>) {
        let (flow, start_ns) = (req.flow, req.ts_ns);
        self.seen_ns = self.seen_ns.max(start_ns);
        let open = Open {
            req: req.clone(),
            end_ns: 0,
            taken: false,
        };
        if self.pods.len() >= MAX_PODS {
            self.forget_before(start_ns.saturating_sub(RETENTION_NS / 4));
        }
        let callee = self.pods.entry(flow.dst.ip).or_default();
        callee.last_ns = start_ns;
        push_bounded(&mut callee.inbound, open.clone(), &mut self.spare);
        let caller = self.pods.entry(flow.src.ip).or_default();
        caller.last_ns = start_ns;
        push_bounded(&mut caller.outbound, open, &mut self.spare);
    }

    /// Records that `hop` was answered (or given up), as soon as it is:
    /// the answers' timing relates calls to requests (see [`timing`]).
    pub fn ended(&mut self, hop: &Hop) {
        if !hop.unanswered {
            self.seen_ns = self.seen_ns.max(hop.end_ns);
        }
        if let Some(p) = self.pods.get_mut(&hop.callee().ip) {
            close(&mut p.inbound, &hop.flow, hop.seq, hop.end_ns);
        }
        if let Some(p) = self.pods.get_mut(&hop.caller().ip) {
            close(&mut p.outbound, &hop.flow, hop.seq, hop.end_ns);
        }
    }

    /// Classifies a completed hop (answered or timed out), with what was
    /// seen so far: answers after its own count for timing.
    /// `callee_instrumented`: what identity says of the callee (None: unknown).
    pub fn classify(&mut self, hop: &Hop, callee_instrumented: Option<bool>) -> Verdict {
        self.ended(hop);
        let parent = self.parent_of(hop);
        if let Some(l) = parent.as_ref().filter(|l| l.confidence.places()) {
            self.take(hop, &l.context);
        }
        let answered = match parent.as_ref().map(|l| l.confidence) {
            Some(Confidence::Handoff { .. }) => Some(true),
            Some(Confidence::Ambiguous { answers, .. }) => answers.named_once(),
            _ => None,
        };
        if let Some(clean) = answered
            && let Some(p) = self.pods.get_mut(&hop.caller().ip)
        {
            p.handoffs.record(clean);
        }
        let mut v = self.judge(hop, parent.clone(), callee_instrumented);
        if let Some(ctx) = hop.context() {
            (v.forwarded, v.continued) = self.sent_on(hop, ctx);
        }
        // Whatever the verdict, say which request the hop was made for.
        if v.link.is_none() {
            v.link = parent;
        }
        v.baggage_dropped =
            v.link.as_ref().is_some_and(|l| l.baggage) && hop.propagation().baggage.is_none();
        v
    }

    /// Marks the request of `context` open on `hop`'s caller as given to a
    /// call (one to one, for [`timing`]).
    fn take(&mut self, hop: &Hop, context: &SpanContext) {
        let Some(p) = self.pods.get_mut(&hop.caller().ip) else {
            return;
        };
        if let Some(o) = p.inbound.iter_mut().rev().find(|o| {
            o.covers(hop.start_ns)
                && o.primary().is_some_and(|c| {
                    c.trace_id == context.trace_id && c.parent_span_id == context.parent_span_id
                })
        }) {
            o.taken = true;
        }
    }

    fn verdict(kind: GapKind, detail: impl Into<Cow<'static, str>>) -> Verdict {
        Verdict {
            kind,
            detail: detail.into(),
            link: None,
            forwarded: 0,
            continued: 0,
            baggage_dropped: false,
        }
    }

    fn judge(&self, hop: &Hop, parent: Option<Link>, callee_instrumented: Option<bool>) -> Verdict {
        let contexts = &hop.propagation().contexts;
        if let Some(Found::Malformed { format, reason, .. }) = hop.malformed() {
            return Self::verdict(
                GapKind::MalformedContext,
                format!("{} header is invalid: {reason}", format.as_str()),
            );
        }
        let mut valid = contexts.iter().filter_map(|c| match c {
            Found::Valid(c) => Some(c),
            _ => None,
        });
        let first = valid.next();
        if let Some(first) = first
            && let Some(other) = valid.find(|c| c.trace_id != first.trace_id)
        {
            return Self::verdict(
                GapKind::FormatMismatch,
                format!(
                    "{} and {} headers name different traces ({} vs {})",
                    first.format.as_str(),
                    other.format.as_str(),
                    first.trace_id,
                    other.trace_id
                ),
            );
        }
        let Some(ctx) = first else {
            // A context none of the OpenTelemetry side reads: propagated,
            // but into no trace it can join.
            if let Some((format, _)) = hop.propagation().foreign_only() {
                let why = match &parent {
                    Some(l) => format!(
                        "caller received {} and sent only {}, whose ids convert to no W3C trace",
                        l.context.format.as_str(),
                        format.as_str()
                    ),
                    None => format!(
                        "caller sent only {}, whose ids convert to no W3C trace: no OpenTelemetry propagator reads it",
                        format.as_str()
                    ),
                };
                return Verdict {
                    link: parent,
                    ..Self::verdict(GapKind::FormatMismatch, why)
                };
            }
            // Part of the head unread: a context may have been in it.
            if hop.truncated {
                return Self::verdict(
                    GapKind::Unreadable,
                    if hop.protocol == Protocol::Http1 {
                        "the head was not read whole (past the kernel's copy budget, or a \
                         segment not copied) and no context was found in what was: unknown \
                         whether one was sent"
                    } else {
                        "fields named by HPACK table entries never seen (the connection was \
                         joined mid-way, or a block was not copied) and no context among the \
                         fields read: unknown whether one was sent"
                    },
                );
            }
            // No ids. A sampling-only header ("b3: 0") is a decision not to
            // record, not a gap.
            if contexts
                .iter()
                .any(|c| matches!(c, Found::SamplingOnly { sampled: false, .. }))
            {
                return Self::verdict(GapKind::Unsampled, "sampling-only header: not sampled");
            }
            return match parent {
                Some(link) => Verdict {
                    link: Some(link),
                    ..Self::verdict(
                        GapKind::BrokenPropagation,
                        "caller was serving a traced request and sent this one without context",
                    )
                },
                None => Self::verdict(GapKind::MissingContext, "no trace context"),
            };
        };
        if let Some(link) = parent {
            let inbound = &link.context;
            if inbound.trace_id != ctx.trace_id {
                let (kind, why) = if inbound.format != ctx.format {
                    (
                        GapKind::FormatMismatch,
                        format!(
                            "caller received {} and sent {} with a new trace",
                            inbound.format.as_str(),
                            ctx.format.as_str()
                        ),
                    )
                } else {
                    (
                        GapKind::BrokenPropagation,
                        "caller was serving a traced request and started a new trace".to_owned(),
                    )
                };
                return Verdict {
                    link: Some(link),
                    ..Self::verdict(kind, why)
                };
            }
            if inbound.trace_id == ctx.trace_id && inbound.parent_span_id == ctx.parent_span_id {
                return Verdict {
                    link: Some(link),
                    ..Self::verdict(
                        GapKind::Passthrough,
                        "caller passed the context it received on unchanged: it made no span of its own",
                    )
                };
            }
            if let (Some(a), Some(b)) = (inbound.sampled, ctx.sampled)
                && a != b
            {
                return Verdict {
                    link: Some(link),
                    ..Self::verdict(
                        GapKind::SamplingInconsistent,
                        format!(
                            "caller received sampled={} and sent sampled={}",
                            a as u8, b as u8
                        ),
                    )
                };
            }
        }
        if ctx.sampled == Some(false) {
            return Self::verdict(GapKind::Unsampled, "sampled flag is off");
        }
        if callee_instrumented == Some(false) {
            return Self::verdict(
                GapKind::Uninstrumented,
                "callee is not instrumented: the call to it is traced, nothing inside",
            );
        }
        Self::verdict(GapKind::ContextOk, "valid context")
    }

    /// The traced inbound request the caller was serving when it sent `hop`.
    fn parent_of(&self, hop: &Hop) -> Option<Link> {
        self.cause_of(hop).0
    }

    /// [`Self::parent_of`], and whether timing would decide it once more
    /// answers are in.
    fn cause_of(&self, hop: &Hop) -> (Option<Link>, bool) {
        let Some(pod) = self.pods.get(&hop.caller().ip) else {
            return (None, false);
        };
        let open: Vec<&Open> = pod
            .inbound
            .iter()
            .filter(|o| o.covers(hop.start_ns) && o.primary().is_some())
            .collect();
        let link = |o: &Open, confidence| {
            Some(Link {
                context: o.primary()?.clone(),
                confidence,
                baggage: o.baggage(),
                candidates: Vec::new(),
            })
        };
        let trace = hop.context().map(|c| c.trace_id.as_str());
        if let Some(o) = open
            .iter()
            .find(|o| o.primary().map(|c| c.trace_id.as_str()) == trace)
        {
            return (link(o, Confidence::Exact), false);
        }
        if let [o] = open[..] {
            return (link(o, Confidence::Sole), false);
        }
        // The open requests as the turns know them: client end, start, end.
        let asked = || {
            open.iter()
                .map(|o| (*o, o.req.flow.src, o.start_ns(), o.end_ns()))
        };
        let by_thread = self.threads.cause(hop.caller(), hop.start_ns, asked());
        if let Evidence::Thread(o) = by_thread {
            return (link(o, Confidence::Thread), false);
        }
        let candidates = open.len();
        let (handoff, answers_pending) = if self.threads.answer_turns == 0 || hop.unanswered {
            (HandoffSeen::NotAsked, false)
        } else {
            match self.threads.handoff(hop.caller(), asked()) {
                (Handoff::Named(o), more) if pod.handoffs.trusted() => {
                    if self.settled(pod, hop, o) {
                        return (link(o, Confidence::Handoff { candidates }), false);
                    }
                    (HandoffSeen::Unsettled, more)
                }
                (Handoff::Named(_), more) => (HandoffSeen::Unproven, more),
                (Handoff::Unnamed, more) => (HandoffSeen::Unnamed, more),
                (Handoff::Contested(_), _) => (HandoffSeen::Contested, false),
            }
        };
        let by_timing = self.timing(pod, hop, &open);
        if let Timing::Placed(o) = by_timing {
            return (link(o, Confidence::Timing { candidates }), false);
        }
        let mut by_recency = open.clone();
        by_recency.sort_by_key(|o| std::cmp::Reverse(o.start_ns()));
        let Some(newest) = by_recency.first() else {
            return (None, false);
        };
        let ambiguous = newest.primary().map(|c| Link {
            context: c.clone(),
            confidence: Confidence::Ambiguous {
                candidates,
                threads: by_thread.why_not(),
                answers: handoff,
            },
            baggage: open.iter().all(|o| o.baggage()),
            candidates: by_recency
                .iter()
                .take(MAX_CANDIDATES)
                .filter_map(|o| o.primary().cloned())
                .collect(),
        });
        (
            ambiguous,
            matches!(by_timing, Timing::Pending) || answers_pending,
        )
    }

    /// Whether every other call of `pod` made while `o` was open and
    /// answered before `o`'s answer was written was named by exactly one
    /// answer. A task that waited for its call's answer and wrote its own
    /// answer after another task read another call's names that other
    /// call; the call it really waited for, made while its request was
    /// open and answered before, is then left named by none (or by two):
    /// a wrong name shows beside it, not only in the pod's record.
    fn settled(&self, pod: &Pod, hop: &Hop, o: &Open) -> bool {
        let Some(answered) = self
            .threads
            .answer(o.req.flow.src, o.start_ns(), o.end_ns())
            .map(|(ts, _)| ts)
        else {
            return false;
        };
        let mut seen = 0;
        for c in pod
            .outbound
            .iter()
            .rev()
            .skip_while(|c| c.start_ns() > answered)
            .take_while(|c| c.start_ns() >= o.start_ns())
        {
            if c.is(&hop.flow, hop.seq) {
                continue;
            }
            let Some(end) = c.end_ns().filter(|e| *e <= answered) else {
                continue;
            };
            seen += 1;
            if seen > MAX_SETTLED
                || self
                    .threads
                    .names(c.req.flow.src.port, end, HANDOFF_NAMING_NS)
                    != 1
            {
                return false;
            }
        }
        true
    }

    /// What the answers' timing says of `hop` among `open` (see
    /// [`timing`]).
    fn timing<'a>(&self, pod: &'a Pod, hop: &Hop, open: &[&'a Open]) -> Timing<&'a Open> {
        if !self.by_timing || hop.unanswered || open.len() > MAX_TIMED {
            return Timing::Unclear;
        }
        // Candidates by their place among the pod's requests: one to one
        // needs to tell them apart, and the same request is open for
        // several calls.
        let candidates_at = |start_ns: u64| -> Vec<Candidate<usize>> {
            pod.inbound
                .iter()
                .enumerate()
                .filter(|(_, o)| o.covers(start_ns) && o.primary().is_some())
                .map(|(i, o)| Candidate {
                    id: i,
                    start_ns: o.start_ns(),
                    answered_ns: o.end_ns(),
                    taken: o.taken,
                })
                .collect()
        };
        let candidates = candidates_at(hop.start_ns);
        // The calls that may claim one of them: ended after this one,
        // before the last of them answered.
        let until = candidates
            .iter()
            .map(|c| c.answered_ns.unwrap_or(u64::MAX))
            .max()
            .unwrap_or(0);
        let earliest = open.iter().map(|o| o.start_ns()).min().unwrap_or(0);
        let others: Vec<OtherCall<usize>> = pod
            .outbound
            .iter()
            .rev()
            .take_while(|o| o.start_ns() >= earliest)
            .filter(|o| !o.is(&hop.flow, hop.seq))
            .filter_map(|o| Some((o.start_ns(), o.end_ns()?)))
            .filter(|(_, end)| *end > hop.end_ns && *end <= until)
            .take(MAX_TIMED)
            .map(|(start_ns, end_ns)| OtherCall {
                end_ns,
                candidates: candidates_at(start_ns),
            })
            .collect();
        // Events from different CPUs reach the ring slightly out of
        // order: what was seen is complete only up to a moment before.
        let known_until = self.seen_ns.saturating_sub(timing::SKEW_NS);
        match timing::assign(hop.end_ns, known_until, &candidates, &others) {
            Timing::Placed(i) => pod.inbound.get(i).map_or(Timing::Unclear, Timing::Placed),
            Timing::Pending => Timing::Pending,
            Timing::Unclear => Timing::Unclear,
        }
    }

    /// Requests the callee sent while serving `hop` in the same trace: with
    /// the same parent span id (proof it forwarded headers without a span),
    /// and with one of its own (proof it makes spans).
    fn sent_on(&self, hop: &Hop, ctx: &SpanContext) -> (usize, usize) {
        let Some(pod) = self.pods.get(&hop.callee().ip) else {
            return (0, 0);
        };
        pod.outbound
            .iter()
            .filter(|o| hop.start_ns <= o.start_ns() && o.start_ns() <= hop.end_ns)
            .filter_map(|o| o.primary().filter(|c| c.trace_id == ctx.trace_id))
            .fold((0, 0), |(same, own), c| {
                if c.parent_span_id == ctx.parent_span_id {
                    (same + 1, own)
                } else {
                    (same, own + 1)
                }
            })
    }

    /// Forgets requests that ended (or, unanswered, started) before `ts_ns`,
    /// and pods with nothing left.
    pub fn forget_before(&mut self, ts_ns: u64) {
        self.threads.forget_before(ts_ns);
        let old = |o: &Open| o.end_ns().unwrap_or(o.start_ns()) < ts_ns;
        let spare = &mut self.spare;
        let mut forget = |o: &Open| {
            let forgotten = old(o);
            if forgotten {
                spare.keep(o.req.clone());
            }
            !forgotten
        };
        self.pods.retain(|_, p| {
            p.inbound.retain(&mut forget);
            p.outbound.retain(&mut forget);
            !(p.inbound.is_empty() && p.outbound.is_empty() && p.last_ns < ts_ns)
        });
    }

    /// Pods and requests remembered, for metrics and bounds tests.
    pub fn remembered(&self) -> (usize, usize) {
        let reqs = self
            .pods
            .values()
            .map(|p| p.inbound.len() + p.outbound.len())
            .sum();
        (self.pods.len(), reqs)
    }
}

/// Formats carried by a request, for metrics labels: `none`, one format, or
/// several joined with `+`.
pub fn formats_label(contexts: &[Found]) -> Cow<'static, str> {
    match contexts {
        [] => Cow::Borrowed("none"),
        // The usual request: one format, a fixed label.
        [one] => Cow::Borrowed(one.format().as_str()),
        _ => {
            let mut f: Vec<Format> = contexts.iter().map(Found::format).collect();
            f.sort();
            f.dedup();
            Cow::Owned(f.iter().map(Format::as_str).collect::<Vec<_>>().join("+"))
        }
    }
}

#[cfg(test)]
mod tests;
