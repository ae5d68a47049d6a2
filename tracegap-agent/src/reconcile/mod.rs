//! Reconciling the wire with the trace store. A gap hop's synthetic span
//! is held for a settle delay, then the trace is read back, and the span
//! is corrected by what the services themselves recorded:
//!
//! - **placed**: a stitched span goes under the breaking service's own
//!   server span for the request it was serving (its span id never crossed
//!   the wire; the store has it);
//! - **linked**: it links to the callee's own new trace for the same
//!   request (its root span, from the same peer, inside the hop);
//! - **suppressed**: the callee's own span for that very request is
//!   already there, so tracegap's would be a duplicate.
//!
//! Hops whose callee should have recorded a span (it is instrumented and
//! was sent a sampled context) are checked the same way, on the callee's
//! node, which also sees the callee's own OTLP exports and the collector's
//! answers: the span `arrived`, is in a `new_trace`, was `lost_in_pipeline`
//! (the callee exported; the span never arrived), or was `not_exported`.
//! What the store shows of each service (spans of its own, exports) is
//! learned and fed back into classification.
//!
//! The data path only offers: a full hand-over queue sends the span on
//! unreconciled. Queries are batched per round (one per trace, one search
//! per callee service), rate-limited, cached briefly and bounded in time;
//! a store that is slow or away makes spans go out as they are, counted,
//! with a note on /readyz.

pub mod decide;
pub mod learned;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use opentelemetry::{
    KeyValue,
    trace::{SpanId, TraceId},
};
use tokio::{sync::mpsc, time::Instant};

use self::{
    decide::{Claimed, Root, Window},
    learned::{Export, LEDGER_KEEP, Learned, Ledger, ServiceStatus},
};
use crate::{
    backend::BackendStatus,
    events::Endpoint,
    export::SpanQueue,
    gap::span::SyntheticSpan,
    metrics::{CalleeSpanLabels, Metrics},
    tracestore::{self, Search, StoreKind, StoredSpan, Trace, TraceStore},
};

/// The default settle delay: an SDK's batch processor exports every 5 s
/// (`OTEL_BSP_SCHEDULE_DELAY`), a collector batches for a fraction of a
/// second more, and a store takes about a second to make a span readable.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(10);
/// Queries per second to the store at most, per agent.
pub const DEFAULT_QPS: u32 = 20;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Observations waiting to be taken by the task at most.
const HAND_OVER: usize = 8192;
/// Held spans and checks at most; past it spans go out unreconciled.
const MAX_PENDING: usize = 32768;
/// Items settled per round at most (the rest wait for the next round).
const PER_ROUND: usize = 4096;
const ROUND: Duration = Duration::from_millis(250);
/// Traces a search returns at most.
const SEARCH_LIMIT: usize = 500;
/// After the store failed, it is left alone this long.
const AWAY_BACKOFF: Duration = Duration::from_secs(5);
/// Queries in flight at once.
const CONCURRENCY: usize = 4;
/// An item the store could not answer for is asked again for a settle
/// delay, and at least this long (the query rate refills within it).
const MIN_RETRY: Duration = Duration::from_secs(2);
/// A trace read is reused for this long by later rounds.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// How reconciliation is configured (`--trace-store`, `--settle-delay`, ...).
#[derive(Clone, Debug)]
pub struct ReconcileConfig {
    /// The store's base URL (Jaeger query: `http://jaeger-query:16686`;
    /// Tempo: `http://tempo:3200`).
    pub store: String,
    pub kind: StoreKind,
    /// How long a hop waits before its trace is read.
    pub settle: Duration,
    /// Queries per second at most.
    pub qps: u32,
    /// One query's time at most.
    pub timeout: Duration,
    /// TLS and credentials for the store.
    pub access: crate::remote::Access,
}

impl ReconcileConfig {
    pub fn new(store: impl Into<String>) -> Self {
        Self {
            store: store.into(),
            kind: StoreKind::Auto,
            settle: DEFAULT_SETTLE,
            qps: DEFAULT_QPS,
            timeout: DEFAULT_TIMEOUT,
            access: crate::remote::Access::default(),
        }
    }
}

/// What the store holds of a callee's span for a hop that should have one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Arrived,
    NewTrace,
    LostInPipeline,
    NotExported,
    /// The facts disagree: the callee exported and the collector took
    /// every export around the hop (2xx), yet the store holds no span of
    /// it for the context sent. Not called lost: the hop itself may be
    /// wrong (read twice, or not the call it seemed), or the store late.
    Unknown,
    /// The store could not be asked in time (away, or the query rate
    /// spent for longer than a settle delay): nothing is known.
    NotChecked,
    /// Nobody declared the callee, and it shows no sign of recording
    /// spans: none for the context sent nor a trace of its own, nothing of
    /// it in the store around the request, no export from it. The hop got
    /// tracegap's span in its place.
    Uninstrumented,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Arrived => "arrived",
            Self::NewTrace => "new_trace",
            Self::LostInPipeline => "lost_in_pipeline",
            Self::NotExported => "not_exported",
            Self::Unknown => "unknown",
            Self::NotChecked => "not_checked",
            Self::Uninstrumented => "uninstrumented",
        }
    }
}

/// A trace context, as hex ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ctx {
    pub trace_id: String,
    pub parent_span_id: String,
}

/// A hop, as reconciliation needs it.
#[derive(Clone, Debug)]
pub struct HopFacts {
    pub caller: String,
    pub callee: String,
    pub caller_addr: Endpoint,
    /// The pod that served it (the export ledger is by pod address).
    pub callee_ip: IpAddr,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The sampled context the callee was sent in a format it reads: its
    /// own span should be this context's child.
    pub received: Option<Ctx>,
    /// For a stitched span: the context of the request the caller was
    /// serving when it made the call.
    pub serving: Option<Ctx>,
    /// The callee's instrumentation as declared (names file, annotation).
    pub callee_declared: Option<bool>,
    /// The span stands for a stitched hop whose cause the evidence did not
    /// single out (a root linked to its candidates): the callee's own root
    /// does not make it a duplicate.
    pub unplaced: bool,
    /// The callee was sent a context only in formats it was seen not to
    /// read: its own root for the request is the new trace it started,
    /// which the span links to (not a second record of the request).
    pub unread_format: bool,
}

impl HopFacts {
    fn window(&self) -> Window {
        Window {
            caller: self.caller_addr,
            start: self.start,
            end: self.end,
        }
    }
}

enum Item {
    Span(Box<SyntheticSpan>, HopFacts),
    /// A check of the callee's span; with the span the hop gets if the
    /// check finds no sign that the callee records spans at all (a callee
    /// nobody declared).
    Expect(HopFacts, Option<Box<SyntheticSpan>>),
}

impl Item {
    fn facts(&self) -> &HopFacts {
        match self {
            Self::Span(_, f) | Self::Expect(f, _) => f,
        }
    }
}

/// An item waiting: due after the settle delay; asked again each round
/// the store could not answer for it, until `give_up`.
struct Held {
    due: Instant,
    give_up: Instant,
    item: Item,
}

enum Observed {
    Item(Item),
    Export(Export),
    /// A pod exporting over TLS.
    Encrypted(IpAddr),
}

/// Where reconciliation's findings go (the report, above it): what the
/// store held of each checked callee's span, and each service's
/// instrumentation as learned.
pub trait Findings: Send + Sync {
    /// One hop's check: `answer`, the collector's answer to the callee's
    /// export for a lost span; `trace`, the hop's trace.
    fn callee_span(
        &self,
        source: &str,
        destination: &str,
        outcome: Outcome,
        answer: Option<&str>,
        trace: &str,
    );
    /// Every service's status as learned so far.
    fn services(&self, statuses: Vec<ServiceStatus>);
}

/// What reconciliation writes to: the metrics and its findings.
#[derive(Clone)]
struct Sinks {
    metrics: Arc<Metrics>,
    findings: Arc<dyn Findings>,
}

impl Sinks {
    fn callee_span(&self, f: &HopFacts, outcome: Outcome, answer: Option<&str>, trace: &str) {
        self.metrics.callee_span(CalleeSpanLabels {
            source_service: f.caller.clone(),
            destination_service: f.callee.clone(),
            outcome: outcome.as_str().to_owned(),
        });
        self.findings
            .callee_span(&f.caller, &f.callee, outcome, answer, trace);
    }
}

/// The data path's side: offering never waits.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Observed>,
    learned: Arc<Learned>,
    out: Sinks,
}

impl Handle {
    /// Holds a gap hop's span for the settle delay; gives it back when it
    /// cannot be held (to be exported as it is).
    #[must_use]
    pub fn hold(&self, span: SyntheticSpan, facts: HopFacts) -> Option<SyntheticSpan> {
        match self
            .tx
            .try_send(Observed::Item(Item::Span(Box::new(span), facts)))
        {
            Ok(()) => None,
            Err(
                mpsc::error::TrySendError::Full(Observed::Item(Item::Span(s, _)))
                | mpsc::error::TrySendError::Closed(Observed::Item(Item::Span(s, _))),
            ) => {
                self.out.metrics.reconciled("unreconciled");
                Some(*s)
            }
            Err(_) => None,
        }
    }

    /// Checks, after the settle delay, that the callee's span arrived;
    /// `absent`: the span the hop gets if the callee shows no sign of
    /// recording spans (no span of it in the store, no export from it).
    /// Gives that span back when the check cannot be held and the callee
    /// is already known not to record (to be exported as it is).
    #[must_use]
    pub fn expect(&self, facts: HopFacts, absent: Option<SyntheticSpan>) -> Option<SyntheticSpan> {
        match self
            .tx
            .try_send(Observed::Item(Item::Expect(facts, absent.map(Box::new))))
        {
            Ok(()) => None,
            Err(
                mpsc::error::TrySendError::Full(Observed::Item(Item::Expect(f, absent)))
                | mpsc::error::TrySendError::Closed(Observed::Item(Item::Expect(f, absent))),
            ) => {
                not_checked(&self.out, &self.learned, &f);
                let s = absent.filter(|_| self.learned.instrumented(&f.callee) == Some(false))?;
                self.out.metrics.reconciled("unreconciled");
                Some(*s)
            }
            Err(_) => None,
        }
    }

    /// A pod's OTLP export, seen on the wire, and the collector's answer.
    pub fn export_seen(&self, service: &str, export: Export) {
        let ok = export.status.is_some_and(|s| (200..300).contains(&s));
        self.learned.export_seen(service, ok);
        let _ = self.tx.try_send(Observed::Export(export));
    }

    /// A pod of `service` exports over TLS (a connection to the collector
    /// seen): it records spans, and its exports' answers cannot be read.
    pub fn encrypted_export(&self, service: &str, ip: IpAddr) {
        self.learned.export_seen(service, true);
        let _ = self.tx.try_send(Observed::Encrypted(ip));
    }

    /// The service called on in the trace it was serving under a span id of
    /// its own (it makes spans; see [`Learned::ids_seen`]).
    pub fn ids_seen(&self, service: &str) {
        self.learned.ids_seen(service);
    }

    /// The service's instrumentation as learned (None: not known).
    pub fn instrumented(&self, service: &str) -> Option<bool> {
        self.learned.instrumented(service)
    }
}

/// Starts reconciliation; it ends when every [`Handle`] is dropped,
/// sending what it still holds on unreconciled.
pub fn start(
    config: ReconcileConfig,
    queue: SpanQueue,
    metrics: Arc<Metrics>,
    findings: Arc<dyn Findings>,
) -> (Handle, Arc<BackendStatus>, tokio::task::JoinHandle<()>) {
    let out = Sinks { metrics, findings };
    let (tx, rx) = mpsc::channel(HAND_OVER);
    let learned = Arc::new(Learned::default());
    let status = Arc::new(BackendStatus::default());
    let task = Task {
        config,
        queue,
        out: out.clone(),
        learned: learned.clone(),
        status: status.clone(),
        store: None,
        away_until: None,
        pending: VecDeque::new(),
        ledger: Ledger::default(),
        claimed: Claimed::default(),
        cache: HashMap::new(),
        bucket: Bucket::default(),
    };
    let handle = tokio::spawn(task.run(rx));
    (Handle { tx, learned, out }, status, handle)
}

/// A token bucket: `qps` per second, a second's worth of burst.
#[derive(Default)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    /// Takes up to `want` tokens; returns how many it got.
    fn take(&mut self, want: usize, qps: u32) -> usize {
        let now = Instant::now();
        let rate = f64::from(qps.max(1));
        let elapsed = self.last.map_or(1.0, |l| (now - l).as_secs_f64());
        self.last = Some(now);
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        let got = (want as f64).min(self.tokens.floor()).max(0.0);
        self.tokens -= got;
        got as usize
    }
}

struct Task {
    config: ReconcileConfig,
    queue: SpanQueue,
    out: Sinks,
    learned: Arc<Learned>,
    status: Arc<BackendStatus>,
    store: Option<Box<dyn TraceStore>>,
    away_until: Option<Instant>,
    pending: VecDeque<Held>,
    ledger: Ledger,
    claimed: Claimed,
    cache: HashMap<String, (Instant, Option<Arc<Trace>>)>,
    bucket: Bucket,
}

/// What one round asked and learnt.
#[derive(Default)]
struct Answers {
    traces: HashMap<String, Option<Arc<Trace>>>,
    searches: HashMap<String, Vec<StoredSpan>>,
}

/// A query to make.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Query {
    Trace(String),
    Search(Search),
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Observed>) {
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                o = rx.recv() => match o {
                    Some(Observed::Export(e)) => self.ledger.record(e),
                    Some(Observed::Encrypted(ip)) => self.ledger.encrypted(ip),
                    Some(Observed::Item(item)) => {
                        if self.pending.len() >= MAX_PENDING {
                            self.release(item, "unreconciled");
                        } else {
                            let due = Instant::now() + self.config.settle;
                            self.pending.push_back(Held {
                                due,
                                give_up: due + self.config.settle.max(MIN_RETRY),
                                item,
                            });
                        }
                    }
                    None => break,
                },
                // Rounds only while something is held: an idle agent
                // sleeps (issue 40).
                _ = tick.tick(), if !self.pending.is_empty() => self.round().await,
            }
            self.out
                .metrics
                .reconcile_pending
                .set(self.pending.len() as i64);
        }
        // Shutting down: what is held goes out as it is, now.
        while let Some(h) = self.pending.pop_front() {
            self.release(h.item, "unreconciled");
        }
        self.out.metrics.reconcile_pending.set(0);
    }

    /// Sends a held span on; a check's span only for a callee already
    /// known not to record spans.
    fn release(&self, item: Item, action: &'static str) {
        match item {
            Item::Span(s, _) => {
                self.out.metrics.reconciled(action);
                self.queue.offer(*s);
            }
            Item::Expect(f, Some(s)) if self.learned.instrumented(&f.callee) == Some(false) => {
                self.out.metrics.reconciled(action);
                self.queue.offer(*s);
            }
            Item::Expect(..) => {}
        }
    }

    /// A checked hop whose callee shows no sign of recording spans: its
    /// span goes out, the evidence on it.
    fn uninstrumented(&self, f: &HopFacts, mut s: SyntheticSpan) {
        let detail = format!(
            "callee is not instrumented (learned): no span of {} for the sampled context it was sent, nor a trace of its own; {} sampled requests into it checked, none with a span of it in the trace store, and no export from it seen",
            f.callee,
            self.learned.checked_without_count(&f.callee)
        );
        match s
            .attributes
            .iter_mut()
            .find(|kv| kv.key.as_str() == "tracegap.gap.detail")
        {
            Some(kv) => kv.value = detail.into(),
            None => s
                .attributes
                .push(KeyValue::new("tracegap.gap.detail", detail)),
        }
        self.out.metrics.reconciled("uninstrumented");
        self.queue.offer(s);
    }

    async fn round(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        // A cached trace serves an item only if it was read after the item
        // was due (its spans had settled by then).
        let mut fresh_after: HashMap<String, Instant> = HashMap::new();
        while due.len() < PER_ROUND && self.pending.front().is_some_and(|h| h.due <= now) {
            if let Some(h) = self.pending.pop_front() {
                let f = h.item.facts();
                for c in [&f.serving, &f.received].into_iter().flatten() {
                    let e = fresh_after.entry(c.trace_id.clone()).or_insert(h.due);
                    *e = (*e).max(h.due);
                }
                due.push(h);
            }
        }
        if due.is_empty() {
            return;
        }
        self.ledger.forget_before(SystemTime::now() - LEDGER_KEEP);
        self.cache
            .retain(|_, (at, _)| now.duration_since(*at) < CACHE_FOR);
        if !self.store_usable().await {
            // Spans go out as they are, not later than they would have;
            // checks wait for the store (counted once, if they give up).
            let mut wait = Vec::new();
            for h in due {
                match h.item {
                    Item::Span(..) => {
                        self.out.metrics.store_query("trace", "store_away", 1);
                        self.release(h.item, "unreconciled");
                    }
                    Item::Expect(..) => wait.push(h),
                }
            }
            self.again(wait, now);
            return;
        }
        // First the traces the items are in and the callees' own new
        // traces; then, for checks whose span is not in its trace, whether
        // the callee started a trace of its own.
        let mut answers = Answers::default();
        let mut wanted = Vec::new();
        for h in &due {
            let (facts, search_root) = match &h.item {
                Item::Span(_, f) => (f, f.received.is_none() || f.unread_format),
                Item::Expect(f, _) => (f, false),
            };
            for c in [&facts.serving, &facts.received].into_iter().flatten() {
                wanted.push(Query::Trace(c.trace_id.clone()));
            }
            if search_root && self.callee_may_record(facts) {
                wanted.push(Query::Search(search(facts)));
            }
        }
        self.ask(merge(wanted), &fresh_after, &mut answers).await;
        let second: Vec<Query> = due
            .iter()
            .filter_map(|h| match &h.item {
                Item::Expect(f, _) if !self.arrived(f, &answers) => Some(Query::Search(search(f))),
                _ => None,
            })
            .collect();
        self.ask(merge(second), &fresh_after, &mut answers).await;
        // An item the store did not answer for (the rate spent, a query
        // failed) is asked again next round rather than decided on half
        // the facts: under load, a check dropped here was a hop missing
        // from the callee-span counts.
        let mut wait = Vec::new();
        for h in due {
            if !self.answered(&h.item, &answers) {
                wait.push(h);
                continue;
            }
            match h.item {
                Item::Span(s, f) => self.settle_span(*s, &f, &answers),
                Item::Expect(f, absent) => self.settle_expectation(&f, absent, &answers),
            }
        }
        self.again(wait, now);
        self.out.findings.services(self.learned.statuses());
    }

    /// Puts unanswered items back in front, oldest first; past their time
    /// a span goes out as it is and a check counts as not checked.
    fn again(&mut self, held: Vec<Held>, now: Instant) {
        for h in held.into_iter().rev() {
            if now < h.give_up {
                self.pending.push_front(h);
                continue;
            }
            match h.item {
                Item::Span(..) => self.release(h.item, "unreconciled"),
                Item::Expect(ref f, _) => {
                    not_checked(&self.out, &self.learned, f);
                    self.release(h.item, "unreconciled");
                }
            }
        }
    }

    /// Whether the store answered every query the item needs.
    fn answered(&self, item: &Item, answers: &Answers) -> bool {
        let traced = |c: &Option<Ctx>| {
            c.as_ref()
                .is_none_or(|c| answers.traces.contains_key(&c.trace_id))
        };
        let searched = |f: &HopFacts| answers.searches.contains_key(&f.callee);
        match item {
            Item::Span(_, f) => {
                traced(&f.serving)
                    && traced(&f.received)
                    && ((f.received.is_some() && !f.unread_format)
                        || !self.callee_may_record(f)
                        || searched(f))
            }
            Item::Expect(f, _) => traced(&f.received) && (self.arrived(f, answers) || searched(f)),
        }
    }

    /// Whether the store can be asked now (connecting to it first).
    async fn store_usable(&mut self) -> bool {
        if self.away_until.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        if self.store.is_none() {
            match tracestore::connect(
                &self.config.store,
                self.config.kind,
                self.config.timeout,
                &self.config.access,
            )
            .await
            {
                Ok(s) => {
                    tracing::info!(store = %self.config.store, kind = ?s.kind(), "reading traces back from the trace store");
                    self.store = Some(s);
                }
                Err(e) => {
                    self.out.metrics.store_query("connect", outcome(&e), 1);
                    self.away(&e);
                    return false;
                }
            }
        }
        true
    }

    fn away(&mut self, e: &tracestore::Error) {
        if self.status.failing().is_none() {
            tracing::warn!(store = %self.config.store, error = %e, "the trace store cannot be read: spans go out unreconciled until it can");
        }
        self.status.failed(
            format!(
                "trace store {}: {e} (spans exported unreconciled)",
                self.config.store
            ),
            refused(e),
        );
        self.away_until = Some(Instant::now() + AWAY_BACKOFF);
    }

    fn callee_may_record(&self, f: &HopFacts) -> bool {
        f.callee_declared
            .or_else(|| self.learned.instrumented(&f.callee))
            != Some(false)
    }

    /// Makes the queries (those the rate allows, cached traces free),
    /// filling `answers`.
    async fn ask(
        &mut self,
        queries: Vec<Query>,
        fresh_after: &HashMap<String, Instant>,
        answers: &mut Answers,
    ) {
        let mut to_ask = Vec::new();
        for q in queries {
            match &q {
                Query::Trace(id) if answers.traces.contains_key(id) => {}
                Query::Trace(id) => match self.cache.get(id) {
                    Some((read, t)) if fresh_after.get(id).is_none_or(|due| read >= due) => {
                        answers.traces.insert(id.clone(), t.clone());
                    }
                    _ => to_ask.push(q),
                },
                Query::Search(_) => to_ask.push(q),
            }
        }
        let allowed = self.bucket.take(to_ask.len(), self.config.qps);
        for q in to_ask.drain(allowed..) {
            self.out.metrics.store_query(kind_of(&q), "rate_limited", 1);
        }
        let Some(store) = self.store.as_deref() else {
            return;
        };
        let timeout = self.config.timeout;
        let results: Vec<(Query, Result<Answer, tracestore::Error>)> =
            futures::stream::iter(to_ask)
                .map(|q| async move {
                    let r = tokio::time::timeout(timeout, ask_one(store, &q))
                        .await
                        .unwrap_or(Err(tracestore::Error::Timeout(timeout)));
                    (q, r)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut failed = None;
        let mut answered = false;
        for (q, r) in results {
            let m = &self.out.metrics;
            answered |= r.is_ok();
            match r {
                Ok(Answer::Trace(t)) => {
                    let Query::Trace(id) = q else { continue };
                    m.store_query("trace", if t.is_some() { "found" } else { "not_found" }, 1);
                    let t = t.map(Arc::new);
                    self.cache.insert(id.clone(), (Instant::now(), t.clone()));
                    answers.traces.insert(id, t);
                }
                Ok(Answer::Search(traces)) => {
                    let Query::Search(s) = q else { continue };
                    m.store_query(
                        "search",
                        if traces.is_empty() {
                            "not_found"
                        } else {
                            "found"
                        },
                        1,
                    );
                    // Searched again in the same round (the checks ask
                    // after the spans did): each span once, or one root
                    // would fit twice and be taken for ambiguous.
                    let spans = answers.searches.entry(s.service).or_default();
                    for span in traces.into_iter().flatten() {
                        if !spans.iter().any(|seen| seen.span_id == span.span_id) {
                            spans.push(span);
                        }
                    }
                }
                Err(e) => {
                    m.store_query(kind_of(&q), outcome(&e), 1);
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) => self.away(&e),
            None if answered => {
                if self.status.failing().is_some() {
                    tracing::info!(store = %self.config.store, "the trace store answers again");
                }
                self.status.reached();
            }
            None => {}
        }
        // Learn from every span the services recorded themselves.
        let spans = answers
            .traces
            .values()
            .flatten()
            .flat_map(|t| t.iter())
            .chain(answers.searches.values().flatten());
        let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
        for s in spans.filter(|s| !s.synthetic) {
            *seen.entry(&s.service).or_default() += 1;
        }
        for service in seen.keys() {
            self.learned.span_seen(service);
        }
    }

    fn arrived(&self, f: &HopFacts, answers: &Answers) -> bool {
        f.received.as_ref().is_some_and(|c| {
            answers
                .traces
                .get(&c.trace_id)
                .and_then(|t| t.as_deref())
                .is_some_and(|t| {
                    decide::own_child(t, &f.callee, &c.parent_span_id, f.window(), &self.claimed)
                        .is_some()
                })
        })
    }

    fn settle_span(&mut self, mut s: SyntheticSpan, f: &HopFacts, answers: &Answers) {
        let m = self.out.metrics.clone();
        let mut asked = false;
        let mut action = "unchanged";
        // A duplicate: the callee recorded this request under the context
        // it was sent.
        if let Some(c) = &f.received
            && let Some(t) = answers.traces.get(&c.trace_id)
        {
            asked = true;
            if let Some(own) = t.as_deref().and_then(|t| {
                decide::own_child(t, &f.callee, &c.parent_span_id, f.window(), &self.claimed)
            }) {
                self.claimed.claim(&own.span_id);
                m.reconciled("suppressed");
                return;
            }
        }
        // Stitched: under the breaking service's own span.
        if let Some(c) = &f.serving
            && let Some(t) = answers.traces.get(&c.trace_id)
        {
            asked = true;
            if let Some(own) = t
                .as_deref()
                .and_then(|t| decide::serving_span(t, &f.caller, &c.parent_span_id, f.window()))
                && let Ok(id) = SpanId::from_hex(&own.span_id)
            {
                s.parent_span_id = id;
                s.attributes.push(KeyValue::new("tracegap.parent", "store"));
                m.reconciled("placed");
                action = "placed";
            }
        }
        // The callee's own new trace for this request.
        if (f.received.is_none() || f.unread_format)
            && let Some(spans) = answers.searches.get(&f.callee)
        {
            asked = true;
            match decide::own_root(spans.iter(), &f.callee, f.window(), &self.claimed) {
                Root::One(root) => {
                    // Unread format: the hop's check claims it (and counts
                    // it a new trace) as well; one of the two must not.
                    if !f.unread_format {
                        self.claimed.claim(&root.span_id);
                    }
                    if f.serving.is_none() && !f.unplaced && !f.unread_format {
                        // A root span of ours for a request the callee
                        // recorded as its own root: the same record twice.
                        m.reconciled("suppressed");
                        return;
                    }
                    if let (Ok(t), Ok(sp)) = (
                        TraceId::from_hex(&root.trace_id),
                        SpanId::from_hex(&root.span_id),
                    ) {
                        s.links.push((t, sp, "callee_trace"));
                        s.attributes.push(KeyValue::new(
                            "tracegap.callee.trace_id",
                            root.trace_id.clone(),
                        ));
                        m.reconciled("linked");
                        action = "linked";
                    }
                }
                Root::Ambiguous(n) => {
                    s.attributes
                        .push(KeyValue::new("tracegap.callee.candidates", n as i64));
                }
                Root::None => {}
            }
        }
        if action == "unchanged" {
            m.reconciled(if asked { "unchanged" } else { "unreconciled" });
        }
        self.queue.offer(s);
    }

    fn settle_expectation(
        &mut self,
        f: &HopFacts,
        absent: Option<Box<SyntheticSpan>>,
        answers: &Answers,
    ) {
        let Some(c) = &f.received else { return };
        let Some(trace) = answers.traces.get(&c.trace_id) else {
            not_checked(&self.out, &self.learned, f);
            return;
        };
        let own = trace
            .as_deref()
            .and_then(|t| {
                decide::own_child(t, &f.callee, &c.parent_span_id, f.window(), &self.claimed)
            })
            .map(|s| s.span_id.clone());
        // A root of the callee's in another trace: it did not continue the
        // context it was sent.
        let new_root = || match answers.searches.get(&f.callee) {
            Some(spans) => {
                let elsewhere = spans.iter().filter(|s| s.trace_id != c.trace_id);
                match decide::own_root(elsewhere, &f.callee, f.window(), &self.claimed) {
                    Root::One(r) => Some(r.span_id.clone()),
                    _ => None,
                }
            }
            None => None,
        };
        let (outcome, answer) = if let Some(id) = own {
            self.claimed.claim(&id);
            (Outcome::Arrived, None)
        } else if let Some(id) = new_root() {
            self.claimed.claim(&id);
            (Outcome::NewTrace, None)
        } else if f
            .callee_declared
            .or_else(|| self.learned.instrumented(&f.callee))
            == Some(true)
        {
            // The export that would have carried it: the callee's next
            // export after the span ended (SDKs export at the end, or within
            // their batch delay), before the store was read.
            let from = f.start
                - Duration::from_secs(1).min(
                    f.start
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default(),
                );
            let until = f.end + self.config.settle;
            match self.ledger.export_between(f.callee_ip, from, until) {
                Some(e) if e.accepted() => (Outcome::Unknown, Some(e.answer())),
                Some(e) => (Outcome::LostInPipeline, Some(e.answer())),
                // Its exports go over TLS: lost or never sent cannot be
                // told apart.
                None if self.ledger.exports_encrypted(f.callee_ip) => {
                    (Outcome::Unknown, Some(learned::ENCRYPTED.to_owned()))
                }
                None => (Outcome::NotExported, None),
            }
        } else {
            // Not known to record at all, and nothing of it in the store
            // around this request (a span of it would have been learned
            // from the search): evidence for learning, and the hop's span,
            // as for any call into a service that records nothing.
            self.learned.checked_without(&f.callee);
            let Some(s) = absent else { return };
            self.uninstrumented(f, *s);
            (Outcome::Uninstrumented, None)
        };
        self.out
            .callee_span(f, outcome, answer.as_deref(), &c.trace_id);
    }
}

/// Counts a hop whose callee span could not be checked, for a callee
/// known to record (for any other, no check would have been a finding).
fn not_checked(out: &Sinks, learned: &Learned, f: &HopFacts) {
    let Some(c) = &f.received else { return };
    if f.callee_declared
        .or_else(|| learned.instrumented(&f.callee))
        != Some(true)
    {
        return;
    }
    out.callee_span(f, Outcome::NotChecked, None, &c.trace_id);
}

enum Answer {
    Trace(Option<Trace>),
    Search(Vec<Trace>),
}

async fn ask_one(store: &dyn TraceStore, q: &Query) -> Result<Answer, tracestore::Error> {
    Ok(match q {
        Query::Trace(id) => Answer::Trace(store.trace(id).await?),
        Query::Search(s) => Answer::Search(store.search(s).await?),
    })
}

/// A failed query's outcome in `tracegap_trace_store_queries_total`: a
/// refusal (401, 403) is for whoever holds the credentials to act on, and
/// has its own.
fn outcome(e: &tracestore::Error) -> &'static str {
    if refused(e) { "denied" } else { "error" }
}

/// The store refused the agent: settings to fix, not an absence.
fn refused(e: &tracestore::Error) -> bool {
    matches!(
        e,
        tracestore::Error::Denied(_) | tracestore::Error::TlsRefused(_)
    )
}

fn kind_of(q: &Query) -> &'static str {
    match q {
        Query::Trace(_) => "trace",
        Query::Search(_) => "search",
    }
}

/// A search for the callee's spans around one hop.
fn search(f: &HopFacts) -> Search {
    Search {
        service: f.callee.clone(),
        start: f.start - decide::CLOCK_TOLERANCE,
        end: f.end + decide::CLOCK_TOLERANCE,
        limit: SEARCH_LIMIT,
    }
}

/// One query per trace, one search per service covering all its hops.
fn merge(queries: Vec<Query>) -> Vec<Query> {
    let mut traces = Vec::new();
    let mut searches: BTreeMap<String, Search> = BTreeMap::new();
    for q in queries {
        match q {
            Query::Trace(id) => {
                if !traces.contains(&Query::Trace(id.clone())) {
                    traces.push(Query::Trace(id));
                }
            }
            Query::Search(s) => {
                searches
                    .entry(s.service.clone())
                    .and_modify(|w| {
                        w.start = w.start.min(s.start);
                        w.end = w.end.max(s.end);
                    })
                    .or_insert(s);
            }
        }
    }
    traces
        .into_iter()
        .chain(searches.into_values().map(Query::Search))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_one_per_trace_and_one_search_per_service() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let s = |svc: &str, a, b| {
            Query::Search(Search {
                service: svc.into(),
                start: t(a),
                end: t(b),
                limit: SEARCH_LIMIT,
            })
        };
        let merged = merge(vec![
            Query::Trace("a".into()),
            s("c", 10, 11),
            Query::Trace("a".into()),
            s("c", 5, 6),
            s("d", 1, 2),
            Query::Trace("b".into()),
        ]);
        assert_eq!(
            merged,
            vec![
                Query::Trace("a".into()),
                Query::Trace("b".into()),
                s("c", 5, 11),
                s("d", 1, 2)
            ]
        );
    }

    #[test]
    fn the_bucket_allows_qps_with_a_second_of_burst() {
        let mut b = Bucket::default();
        assert_eq!(b.take(50, 20), 20);
        assert_eq!(b.take(50, 20), 0);
    }
}
