//! A hop: one HTTP request from a caller to a callee, with its response (or
//! the lack of one) and the trace context it carried.

use std::time::{Duration, SystemTime};

use crate::{
    clock::WallClock,
    events::{Endpoint, Flow},
    http::{
        assemble::Message,
        context::{Found, Propagation, SpanContext},
        message::StartLine,
    },
};

/// Everything the engine knows about one request/response exchange.
#[derive(Clone, Debug)]
pub struct Hop {
    /// The request's flow: caller → callee.
    pub flow: Flow,
    /// Sequence number of the request's first byte: its identity on the flow.
    pub seq: u32,
    pub method: String,
    /// Path without query string.
    pub path: String,
    /// `Host` header, if sent.
    pub host: Option<String>,
    /// None: no response came (see `unanswered`).
    pub status: Option<u16>,
    /// Monotonic time of the request's first segment.
    pub start_ns: u64,
    /// Monotonic time of the response's first segment, or when it was given up.
    pub end_ns: u64,
    /// Wall-clock time of `start_ns`.
    pub start: SystemTime,
    /// No response within the timeout: `end_ns` is when the engine gave up.
    pub unanswered: bool,
    pub propagation: Propagation,
    /// The request head did not fit what the kernel copies.
    pub truncated: bool,
}

impl Hop {
    /// Builds a hop from a request and its response (None: unanswered,
    /// given up at `gave_up_ns`). None if `request` is not a request.
    pub fn new(
        clock: &WallClock,
        request: &Message,
        response: Option<&Message>,
        gave_up_ns: u64,
    ) -> Option<Self> {
        let head = request.head.as_ref().ok()?;
        let StartLine::Request { method, path, .. } = &head.start else {
            return None;
        };
        let status = response.and_then(|r| match r.head.as_ref().map(|h| &h.start) {
            Ok(StartLine::Response { status, .. }) => Some(*status),
            _ => None,
        });
        let end_ns = response.map_or(gave_up_ns, |r| r.ts_ns).max(request.ts_ns);
        Some(Self {
            flow: request.flow,
            seq: request.seq,
            method: method.clone(),
            path: path.clone(),
            host: head.header("host").map(str::to_owned),
            status,
            start_ns: request.ts_ns,
            end_ns,
            start: clock.system_time(request.ts_ns),
            unanswered: response.is_none(),
            propagation: Propagation::from_head(head),
            truncated: request.truncated,
        })
    }

    pub fn caller(&self) -> Endpoint {
        self.flow.src
    }

    pub fn callee(&self) -> Endpoint {
        self.flow.dst
    }

    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }

    pub fn end(&self) -> SystemTime {
        self.start + self.duration()
    }

    /// The context a tracer would continue: the first valid one.
    pub fn context(&self) -> Option<&SpanContext> {
        self.propagation.primary()
    }

    /// The format of the first context header set, valid or not.
    pub fn format(&self) -> Option<&'static str> {
        self.propagation
            .contexts
            .first()
            .map(|c| c.format().as_str())
    }

    pub fn malformed(&self) -> Option<&Found> {
        self.propagation
            .contexts
            .iter()
            .find(|c| matches!(c, Found::Malformed { .. }))
    }
}
