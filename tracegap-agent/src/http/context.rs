//! Trace context in request headers: W3C Trace Context, Jaeger and Zipkin B3
//! (multi and single header), the formats other tracers speak (Datadog,
//! AWS X-Ray, Google Cloud Trace, OpenTracing, OpenCensus binary,
//! SkyWalking), and W3C baggage.
//!
//! Invalid values are reported as malformed with the reason, never dropped:
//! a header that is present but wrong is one of the gaps tracegap explains.

use serde::Serialize;

use super::message::Head;

/// A context propagation format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// W3C `traceparent` (+ `tracestate`).
    W3c,
    /// Jaeger `uber-trace-id`.
    Jaeger,
    /// Zipkin `X-B3-TraceId` / `X-B3-SpanId` / `X-B3-Sampled`.
    B3Multi,
    /// Zipkin single header `b3`.
    B3Single,
    /// Datadog `x-datadog-trace-id` / `x-datadog-parent-id` (decimal
    /// 64-bit ids; the upper half of a 128-bit id in `x-datadog-tags`'s
    /// `_dd.p.tid`).
    Datadog,
    /// AWS X-Ray `X-Amzn-Trace-Id: Root=1-<8 hex>-<24 hex>;Parent=...`.
    Xray,
    /// Google Cloud Trace `X-Cloud-Trace-Context: <32 hex>/<decimal>;o=1`.
    CloudTrace,
    /// OpenTracing's `ot-tracer-traceid` / `ot-tracer-spanid` /
    /// `ot-tracer-sampled` (OpenTelemetry's ot-trace propagator).
    OtTracer,
    /// OpenCensus binary `grpc-trace-bin` (gRPC metadata, base64 on the
    /// wire).
    GrpcTraceBin,
    /// SkyWalking `sw8`: its trace ids are strings of the agent's own
    /// making, which convert to no W3C id ([`Found::Foreign`]).
    Sw8,
}

impl Format {
    pub const ALL: [Self; 10] = [
        Self::W3c,
        Self::Jaeger,
        Self::B3Multi,
        Self::B3Single,
        Self::Datadog,
        Self::Xray,
        Self::CloudTrace,
        Self::OtTracer,
        Self::GrpcTraceBin,
        Self::Sw8,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::W3c => "w3c",
            Self::Jaeger => "jaeger",
            Self::B3Multi => "b3multi",
            Self::B3Single => "b3",
            Self::Datadog => "datadog",
            Self::Xray => "xray",
            Self::CloudTrace => "cloudtrace",
            Self::OtTracer => "ottracer",
            Self::GrpcTraceBin => "grpc-trace-bin",
            Self::Sw8 => "sw8",
        }
    }
}

/// A trace or span id as lowercase hex digits, held inline: reading a
/// context allocates nothing (issue 33). Built from a validated id; a
/// string of another length is cut or left-padded with zeros.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HexId<const N: usize>([u8; N]);

impl<const N: usize> HexId<N> {
    pub fn as_str(&self) -> &str {
        // Built from a str cut at ASCII hex digits: never fails.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl<const N: usize> From<&str> for HexId<N> {
    fn from(s: &str) -> Self {
        let mut b = [b'0'; N];
        let s = &s.as_bytes()[..s.len().min(N)];
        b[N - s.len()..].copy_from_slice(s);
        Self(b)
    }
}

impl<const N: usize> From<String> for HexId<N> {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl<const N: usize> From<&HexId<N>> for String {
    fn from(id: &HexId<N>) -> Self {
        id.as_str().to_owned()
    }
}

impl<const N: usize> std::ops::Deref for HexId<N> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> std::fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> PartialEq<str> for HexId<N> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl<const N: usize> PartialEq<&str> for HexId<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<const N: usize> PartialEq<String> for HexId<N> {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl<const N: usize> PartialEq<HexId<N>> for String {
    fn eq(&self, other: &HexId<N>) -> bool {
        self == other.as_str()
    }
}

impl<const N: usize> PartialEq<HexId<N>> for &str {
    fn eq(&self, other: &HexId<N>) -> bool {
        *self == other.as_str()
    }
}

impl<const N: usize> Serialize for HexId<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A valid context: the trace it belongs to and the span that sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpanContext {
    pub format: Format,
    /// 32 lowercase hex digits (64-bit ids are left-padded with zeros, as
    /// OpenTelemetry does when it reads B3 or Jaeger).
    pub trace_id: HexId<32>,
    /// 16 lowercase hex digits: the caller's span, the parent of the callee's.
    pub parent_span_id: HexId<16>,
    /// None: the sender left the decision to the receiver (B3 without a flag).
    pub sampled: Option<bool>,
}

/// One context header set found in a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Found {
    Valid(SpanContext),
    /// Present but invalid: the header's value and why it is wrong.
    Malformed {
        format: Format,
        value: String,
        reason: String,
    },
    /// B3 with only a sampling decision (`b3: 0`, `X-B3-Sampled` alone):
    /// no ids to join a trace with.
    SamplingOnly {
        format: Format,
        sampled: bool,
    },
    /// A valid context in a format whose ids convert to no W3C id
    /// (SkyWalking's): the caller propagates, but no OpenTelemetry
    /// propagator reads it, so the hop joins no trace of the OpenTelemetry
    /// side. `trace` is the id as the format names it.
    Foreign {
        format: Format,
        trace: String,
        sampled: bool,
    },
}

impl Found {
    pub fn format(&self) -> Format {
        match self {
            Self::Valid(c) => c.format,
            Self::Malformed { format, .. }
            | Self::SamplingOnly { format, .. }
            | Self::Foreign { format, .. } => *format,
        }
    }
}

/// W3C baggage: reported apart, it is not trace context.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Baggage {
    /// Number of list members.
    pub entries: usize,
    /// Total bytes of the header values.
    pub bytes: usize,
    /// Member keys (values can be sensitive and are not kept).
    pub keys: Vec<String>,
}

/// Where request headers are read from: an HTTP/1 head, or an HTTP/2
/// header block. Names match in any case.
pub trait Headers {
    /// Every value of header `name`, in order.
    fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str>;

    /// The first value of header `name`.
    fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.header_all(name).next()
    }

    /// Whether a header of [`super::message::OTHER_FORMATS`] may be present (false: they
    /// are not looked for, which spares a request with W3C context or
    /// none some twenty lookups).
    fn other_formats(&self) -> bool {
        true
    }
}

impl Headers for Head {
    fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        Head::header_all(self, name)
    }

    fn other_formats(&self) -> bool {
        Head::other_formats(self)
    }
}

/// The context header sets of one request.
pub type Contexts = smallvec::SmallVec<[Found; 1]>;

/// Everything about propagation in one request head.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Propagation {
    /// Every format present, in the order W3C, Jaeger, B3 multi, B3 single
    /// (the usual one inline: no allocation per request).
    pub contexts: Contexts,
    /// `tracestate` was sent along with `traceparent`.
    pub tracestate: bool,
    pub baggage: Option<Baggage>,
}

impl Propagation {
    /// Reads propagation headers from a request head.
    pub fn from_head(head: &Head) -> Self {
        Self::from_headers(head)
    }

    /// Reads propagation headers from any request's headers.
    pub fn from_headers(head: &impl Headers) -> Self {
        let mut contexts = Contexts::new();
        if let Some(v) = head.header("traceparent") {
            contexts.push(
                conflicting(head, "traceparent", Format::W3c).unwrap_or_else(|| traceparent(v)),
            );
        }
        if head.other_formats() {
            Self::other_formats(head, &mut contexts);
        }
        // A Datadog tracer speaking W3C keeps its own state in
        // `tracestate`: the same trace, its last Datadog span.
        if let Some(Found::Valid(w3c)) = contexts.first()
            && w3c.format == Format::W3c
            && let Some(dd) = head
                .header_all("tracestate")
                .flat_map(|v| v.split(','))
                .find_map(|m| m.trim().strip_prefix("dd="))
        {
            contexts.push(Found::Valid(datadog_member(w3c, dd)));
        }
        let values: Vec<&str> = head.header_all("baggage").collect();
        let baggage = (!values.is_empty()).then(|| {
            let keys: Vec<String> = values
                .iter()
                .flat_map(|v| v.split(','))
                .filter_map(|m| m.split(['=', ';']).next())
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect();
            Baggage {
                entries: keys.len(),
                bytes: values.iter().map(|v| v.len()).sum(),
                keys,
            }
        });
        Self {
            contexts,
            tracestate: head.header("tracestate").is_some(),
            baggage,
        }
    }

    /// The contexts in the other formats' headers, after W3C's.
    fn other_formats(head: &impl Headers, contexts: &mut Contexts) {
        if let Some(v) = head.header("uber-trace-id") {
            contexts.push(
                conflicting(head, "uber-trace-id", Format::Jaeger)
                    .unwrap_or_else(|| uber_trace_id(v)),
            );
        }
        let b3_multi = [
            head.header("x-b3-traceid"),
            head.header("x-b3-spanid"),
            head.header("x-b3-sampled"),
            head.header("x-b3-flags"),
        ];
        if b3_multi.iter().any(Option::is_some) {
            contexts.push(b3_multi_headers(
                b3_multi[0],
                b3_multi[1],
                b3_multi[2],
                b3_multi[3],
            ));
        }
        if let Some(v) = head.header("b3") {
            contexts.push(b3_single(v));
        }
        // Formats other tracers speak; their ids convert to W3C's (as
        // OpenTelemetry's propagators for them convert them).
        let dd = [
            head.header("x-datadog-trace-id"),
            head.header("x-datadog-parent-id"),
        ];
        if dd.iter().any(Option::is_some) {
            contexts.push(datadog(
                dd[0],
                dd[1],
                head.header("x-datadog-sampling-priority"),
                head.header("x-datadog-tags"),
            ));
        }
        if let Some(v) = head.header("x-amzn-trace-id") {
            contexts.push(xray(v));
        }
        if let Some(v) = head.header("x-cloud-trace-context") {
            contexts.push(cloud_trace(v));
        }
        let ot = [
            head.header("ot-tracer-traceid"),
            head.header("ot-tracer-spanid"),
        ];
        if ot.iter().any(Option::is_some) {
            contexts.push(ot_tracer(ot[0], ot[1], head.header("ot-tracer-sampled")));
        }
        if let Some(v) = head.header("grpc-trace-bin") {
            contexts.push(grpc_trace_bin(v));
        }
        if let Some(v) = head.header("sw8") {
            contexts.push(sw8(v));
        }
    }

    /// A context in a format that converts to no W3C id, if that is all
    /// the request carries.
    pub fn foreign_only(&self) -> Option<(Format, &str)> {
        let mut foreign = None;
        for c in &self.contexts {
            match c {
                Found::Foreign { format, trace, .. } => {
                    foreign = foreign.or(Some((*format, trace.as_str())))
                }
                Found::Valid(_) => return None,
                _ => {}
            }
        }
        foreign
    }

    /// The context a tracer would use: the first valid one.
    pub fn primary(&self) -> Option<&SpanContext> {
        self.contexts.iter().find_map(|c| match c {
            Found::Valid(c) => Some(c),
            _ => None,
        })
    }
}

fn malformed(format: Format, value: &str, reason: impl Into<String>) -> Found {
    Found::Malformed {
        format,
        value: value.chars().take(128).collect(),
        reason: reason.into(),
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn all_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

/// Lowercase hex of `len` digits, left-padded with zeros, from 1..=len hex
/// digits in either case.
fn pad_hex(s: &str, len: usize) -> Option<String> {
    if s.is_empty() || s.len() > len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("{:0>len$}", s.to_ascii_lowercase()))
}

/// W3C Trace Context `traceparent`, validated as the spec says.
/// A header sent more than once with different values: which one the
/// callee's SDK reads is up to it (the first, the last, or the comma-joined
/// list RFC 9110 makes of them, which is no valid context), so no one
/// context is taken for the request's. The same value twice is harmless.
fn conflicting(head: &impl Headers, name: &str, format: Format) -> Option<Found> {
    let first = head.header(name)?;
    // The usual request sends one: no more to compare.
    head.header_all(name).nth(1)?;
    let n = head.header_all(name).count();
    head.header_all(name)
        .any(|v| v.trim() != first.trim())
        .then(|| {
            malformed(
                format,
                first,
                format!("{n} {name} headers with different values"),
            )
        })
}

pub fn traceparent(value: &str) -> Found {
    let f = Format::W3c;
    let v = value.trim();
    // Split without a list (a context is read per request).
    let mut split = v.split('-');
    let mut parts = [""; 4];
    let mut count = 0;
    for p in split.by_ref().take(4) {
        parts[count] = p;
        count += 1;
    }
    let more = split.next().is_some();
    if count < 4 {
        return malformed(f, value, "expected version-traceid-parentid-flags");
    }
    let [version, trace_id, span_id, flags] = parts;
    if version.len() != 2 || !is_lower_hex(version) {
        return malformed(f, value, "version is not 2 lowercase hex digits");
    }
    if version == "ff" {
        return malformed(f, value, "version ff is forbidden");
    }
    // Version 00 has exactly four fields; later versions may append fields.
    if version == "00" && more {
        return malformed(f, value, "version 00 has exactly four fields");
    }
    if trace_id.len() != 32 || !is_lower_hex(trace_id) {
        return malformed(f, value, "trace-id is not 32 lowercase hex digits");
    }
    if span_id.len() != 16 || !is_lower_hex(span_id) {
        return malformed(f, value, "parent-id is not 16 lowercase hex digits");
    }
    if flags.len() != 2 || !is_lower_hex(flags) {
        return malformed(f, value, "trace-flags is not 2 lowercase hex digits");
    }
    if all_zero(trace_id) {
        return malformed(f, value, "trace-id is all zeros");
    }
    if all_zero(span_id) {
        return malformed(f, value, "parent-id is all zeros");
    }
    let flags = u8::from_str_radix(flags, 16).unwrap_or(0);
    Found::Valid(SpanContext {
        format: f,
        trace_id: trace_id.into(),
        parent_span_id: span_id.into(),
        sampled: Some(flags & 1 == 1),
    })
}

/// Jaeger `uber-trace-id: {trace-id}:{span-id}:{parent-span-id}:{flags}`.
pub fn uber_trace_id(value: &str) -> Found {
    let f = Format::Jaeger;
    // Jaeger clients may URL-encode the colons.
    let v = value.trim().replace("%3A", ":").replace("%3a", ":");
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 4 {
        return malformed(f, value, "expected trace-id:span-id:parent-span-id:flags");
    }
    let Some(trace_id) = pad_hex(parts[0], 32) else {
        return malformed(f, value, "trace-id is not 1 to 32 hex digits");
    };
    let Some(span_id) = pad_hex(parts[1], 16) else {
        return malformed(f, value, "span-id is not 1 to 16 hex digits");
    };
    if pad_hex(parts[2], 16).is_none() {
        return malformed(f, value, "parent-span-id is not 1 to 16 hex digits");
    }
    let Ok(flags) = u8::from_str_radix(parts[3], 16) else {
        return malformed(f, value, "flags is not a hex byte");
    };
    if all_zero(&trace_id) {
        return malformed(f, value, "trace-id is zero");
    }
    if all_zero(&span_id) {
        return malformed(f, value, "span-id is zero");
    }
    Found::Valid(SpanContext {
        format: f,
        trace_id: trace_id.into(),
        parent_span_id: span_id.into(),
        // bit 0 sampled, bit 1 debug (implies sampled)
        sampled: Some(flags & 0b11 != 0),
    })
}

fn b3_sampled(s: &str) -> Option<Option<bool>> {
    match s {
        "1" | "true" | "d" => Some(Some(true)),
        "0" | "false" => Some(Some(false)),
        _ => None,
    }
}

fn b3_ids(format: Format, value: &str, trace: &str, span: &str) -> Result<(String, String), Found> {
    if !(trace.len() == 16 || trace.len() == 32) || !is_lower_hex(trace) {
        return Err(malformed(
            format,
            value,
            "TraceId is not 16 or 32 lowercase hex digits",
        ));
    }
    if span.len() != 16 || !is_lower_hex(span) {
        return Err(malformed(
            format,
            value,
            "SpanId is not 16 lowercase hex digits",
        ));
    }
    if all_zero(trace) || all_zero(span) {
        return Err(malformed(format, value, "an id is all zeros"));
    }
    Ok((format!("{trace:0>32}"), span.to_owned()))
}

/// Zipkin B3 multi-header propagation.
pub fn b3_multi_headers(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Found {
    let f = Format::B3Multi;
    let shown = format!(
        "X-B3-TraceId={} X-B3-SpanId={} X-B3-Sampled={}",
        trace.unwrap_or("-"),
        span.unwrap_or("-"),
        sampled.unwrap_or("-")
    );
    let decision = match (sampled, flags) {
        (_, Some("1")) => Some(true),
        (Some(s), _) => match b3_sampled(s.trim()) {
            Some(d) => d,
            None => return malformed(f, &shown, "X-B3-Sampled is not 0 or 1"),
        },
        _ => None,
    };
    match (trace, span) {
        (None, None) => match decision {
            Some(sampled) => Found::SamplingOnly { format: f, sampled },
            None => malformed(f, &shown, "X-B3-Flags without ids"),
        },
        (Some(t), Some(s)) => match b3_ids(f, &shown, t.trim(), s.trim()) {
            Ok((trace_id, parent_span_id)) => Found::Valid(SpanContext {
                format: f,
                trace_id: trace_id.into(),
                parent_span_id: parent_span_id.into(),
                sampled: decision,
            }),
            Err(e) => e,
        },
        _ => malformed(f, &shown, "X-B3-TraceId and X-B3-SpanId must come together"),
    }
}

/// Zipkin B3 single header: `{TraceId}-{SpanId}[-{Sampling}[-{ParentSpanId}]]`
/// or a bare sampling state (`0`, `1`, `d`).
pub fn b3_single(value: &str) -> Found {
    let f = Format::B3Single;
    let v = value.trim();
    if let Some(Some(sampled)) = b3_sampled(v).filter(|_| v.len() == 1) {
        return Found::SamplingOnly { format: f, sampled };
    }
    let parts: Vec<&str> = v.split('-').collect();
    if !(2..=4).contains(&parts.len()) {
        return malformed(
            f,
            value,
            "expected TraceId-SpanId[-Sampling[-ParentSpanId]]",
        );
    }
    let (trace_id, parent_span_id) = match b3_ids(f, value, parts[0], parts[1]) {
        Ok(ids) => ids,
        Err(e) => return e,
    };
    let sampled = match parts.get(2) {
        None => None,
        Some(s) if s.len() == 1 => match b3_sampled(s) {
            Some(d) => d,
            None => return malformed(f, value, "sampling state is not 0, 1 or d"),
        },
        Some(_) => return malformed(f, value, "sampling state is not 0, 1 or d"),
    };
    if let Some(p) = parts.get(3)
        && (p.len() != 16 || !is_lower_hex(p))
    {
        return malformed(f, value, "ParentSpanId is not 16 lowercase hex digits");
    }
    Found::Valid(SpanContext {
        format: f,
        trace_id: trace_id.into(),
        parent_span_id: parent_span_id.into(),
        sampled,
    })
}

/// A context carried by two headers (`names`): both values, and how the
/// pair is shown when it is invalid; malformed when one comes alone.
fn together<'a>(
    f: Format,
    names: [&str; 2],
    values: [Option<&'a str>; 2],
) -> Result<(&'a str, &'a str, String), Found> {
    let shown = format!(
        "{}={} {}={}",
        names[0],
        values[0].unwrap_or("-"),
        names[1],
        values[1].unwrap_or("-")
    );
    match values {
        [Some(a), Some(b)] => Ok((a, b, shown)),
        _ => Err(malformed(
            f,
            &shown,
            format!("{} and {} must come together", names[0], names[1]),
        )),
    }
}

/// A decimal 64-bit id as 16 lowercase hex digits; zero is no id.
fn decimal_id(s: &str) -> Option<String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| *v != 0)
        .map(|v| format!("{v:016x}"))
}

/// Datadog: decimal 64-bit ids, the trace's upper 64 bits (128-bit ids)
/// in `x-datadog-tags` as `_dd.p.tid=<16 hex>`; sampling priority 1 or 2
/// keeps, 0 or -1 drops.
pub fn datadog(
    trace: Option<&str>,
    parent: Option<&str>,
    priority: Option<&str>,
    tags: Option<&str>,
) -> Found {
    let f = Format::Datadog;
    let (t, p, shown) = match together(
        f,
        ["x-datadog-trace-id", "x-datadog-parent-id"],
        [trace, parent],
    ) {
        Ok(both) => both,
        Err(e) => return e,
    };
    let Some(low) = decimal_id(t) else {
        return malformed(
            f,
            &shown,
            "trace id is not a non-zero decimal 64-bit number",
        );
    };
    let Some(parent_span_id) = decimal_id(p) else {
        return malformed(
            f,
            &shown,
            "parent id is not a non-zero decimal 64-bit number",
        );
    };
    let high = tags
        .into_iter()
        .flat_map(|t| t.split(','))
        .find_map(|kv| kv.trim().strip_prefix("_dd.p.tid="))
        .and_then(|h| pad_hex(h, 16))
        .unwrap_or_else(|| "0".repeat(16));
    let sampled = match priority.map(|p| p.trim().parse::<i32>()) {
        None => None,
        Some(Ok(p)) => Some(p > 0),
        Some(Err(_)) => return malformed(f, &shown, "x-datadog-sampling-priority is not a number"),
    };
    Found::Valid(SpanContext {
        format: f,
        trace_id: format!("{high}{low}").into(),
        parent_span_id: parent_span_id.into(),
        sampled,
    })
}

/// AWS X-Ray `Root=1-<8 hex epoch>-<24 hex>;Parent=<16 hex>;Sampled=1`,
/// fields in any order: the trace id is the epoch and the rest joined, as
/// OpenTelemetry's X-Ray propagator reads it.
pub fn xray(value: &str) -> Found {
    let f = Format::Xray;
    let (mut root, mut parent, mut sampled) = (None, None, None);
    for field in value.split(';') {
        match field.trim().split_once('=') {
            Some(("Root", v)) => root = Some(v.trim()),
            Some(("Parent", v)) => parent = Some(v.trim()),
            Some(("Sampled", v)) => sampled = Some(v.trim()),
            _ => {}
        }
    }
    let Some(root) = root else {
        return malformed(f, value, "no Root field");
    };
    let trace_id = match root.split('-').collect::<Vec<_>>().as_slice() {
        ["1", epoch, unique]
            if epoch.len() == 8
                && unique.len() == 24
                && (*epoch)
                    .bytes()
                    .chain((*unique).bytes())
                    .all(|b| b.is_ascii_hexdigit()) =>
        {
            format!("{epoch}{unique}").to_ascii_lowercase()
        }
        _ => return malformed(f, value, "Root is not 1-<8 hex>-<24 hex>"),
    };
    // A load balancer adds a Root of its own to a request with none: no
    // caller span to be the parent of.
    let Some(parent) = parent else {
        return malformed(
            f,
            value,
            "Root without Parent (a load balancer's, not a caller's span)",
        );
    };
    let Some(parent_span_id) = pad_hex(parent, 16).filter(|p| parent.len() == 16 && !all_zero(p))
    else {
        return malformed(f, value, "Parent is not 16 hex digits");
    };
    if all_zero(&trace_id) {
        return malformed(f, value, "Root is all zeros");
    }
    Found::Valid(SpanContext {
        format: f,
        trace_id: trace_id.into(),
        parent_span_id: parent_span_id.into(),
        sampled: match sampled {
            Some("1") => Some(true),
            Some("0") => Some(false),
            _ => None,
        },
    })
}

/// Google Cloud Trace `<32 hex>/<decimal span id>[;o=<0|1>]`.
pub fn cloud_trace(value: &str) -> Found {
    let f = Format::CloudTrace;
    let v = value.trim();
    let (ids, options) = v.split_once(';').unwrap_or((v, ""));
    let Some((trace, span)) = ids.split_once('/') else {
        return malformed(f, value, "expected TRACE_ID/SPAN_ID[;o=OPTIONS]");
    };
    let Some(trace_id) = pad_hex(trace, 32).filter(|t| trace.len() == 32 && !all_zero(t)) else {
        return malformed(f, value, "TRACE_ID is not 32 hex digits");
    };
    let Some(parent_span_id) = decimal_id(span) else {
        return malformed(f, value, "SPAN_ID is not a non-zero decimal 64-bit number");
    };
    let sampled = match options.trim().strip_prefix("o=") {
        Some(o) => o.trim().parse::<u8>().ok().map(|o| o & 1 == 1),
        None => None,
    };
    Found::Valid(SpanContext {
        format: f,
        trace_id: trace_id.into(),
        parent_span_id: parent_span_id.into(),
        sampled,
    })
}

/// OpenTracing's basic tracer headers (16 or 32 hex trace id, 16 hex span
/// id, `true`/`false`).
pub fn ot_tracer(trace: Option<&str>, span: Option<&str>, sampled: Option<&str>) -> Found {
    let f = Format::OtTracer;
    let (t, s, shown) = match together(f, ["ot-tracer-traceid", "ot-tracer-spanid"], [trace, span])
    {
        Ok(both) => both,
        Err(e) => return e,
    };
    // OpenTracing's tracers (and OpenTelemetry's ot-trace propagator) write
    // ids unpadded: a span id below 2^60 has fewer than 16 digits. Read
    // as that propagator reads them: 1 to 32 and 1 to 16 hex digits.
    let Some(trace_id) = pad_hex(t.trim(), 32).filter(|t| !all_zero(t)) else {
        return malformed(f, &shown, "trace id is not 1 to 32 hex digits, or is zero");
    };
    let Some(parent_span_id) = pad_hex(s.trim(), 16).filter(|s| !all_zero(s)) else {
        return malformed(f, &shown, "span id is not 1 to 16 hex digits, or is zero");
    };
    Found::Valid(SpanContext {
        format: f,
        trace_id: trace_id.into(),
        parent_span_id: parent_span_id.into(),
        sampled: match sampled.map(str::trim) {
            Some("true" | "1") => Some(true),
            Some("false" | "0") => Some(false),
            _ => None,
        },
    })
}

/// OpenCensus's binary format, base64 in gRPC metadata: version 0, then
/// field 0 (16-byte trace id), field 1 (8-byte span id), field 2 (1 byte
/// of options, bit 0 sampled).
pub fn grpc_trace_bin(value: &str) -> Found {
    use base64::Engine as _;
    let f = Format::GrpcTraceBin;
    let v = value.trim().trim_end_matches('=');
    let Ok(b) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(v) else {
        return malformed(f, value, "not base64");
    };
    if b.len() < 27 || b[0] != 0 || b[1] != 0 || b[18] != 1 {
        return malformed(f, value, "not version 0 with a trace id and a span id");
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let (trace_id, parent_span_id) = (hex(&b[2..18]), hex(&b[19..27]));
    if all_zero(&trace_id) || all_zero(&parent_span_id) {
        return malformed(f, value, "an id is all zeros");
    }
    let sampled = (b.len() >= 29 && b[27] == 2).then(|| b[28] & 1 == 1);
    Found::Valid(SpanContext {
        format: f,
        trace_id: trace_id.into(),
        parent_span_id: parent_span_id.into(),
        sampled,
    })
}

/// Datadog's `tracestate` member (`dd=s:1;p:<16 hex>;t.dm:-4;o:rum`):
/// the W3C context's trace, the last Datadog span (`p`) as its parent,
/// the sampling priority (`s`) as its decision; a field it lacks or
/// garbles is the W3C context's.
fn datadog_member(w3c: &SpanContext, member: &str) -> SpanContext {
    let (mut parent, mut sampled) = (None, w3c.sampled);
    for field in member.split(';') {
        match field.split_once(':') {
            Some(("p", v)) if v.len() == 16 && is_lower_hex(v) && !all_zero(v) => {
                parent = Some(v.to_owned())
            }
            Some(("s", v)) => {
                if let Ok(p) = v.parse::<i32>() {
                    sampled = Some(p > 0);
                }
            }
            _ => {}
        }
    }
    SpanContext {
        format: Format::Datadog,
        trace_id: w3c.trace_id.clone(),
        parent_span_id: parent.map_or_else(|| w3c.parent_span_id.clone(), Into::into),
        sampled,
    }
}

/// SkyWalking `sw8: <sample>-<trace id>-<segment id>-<span id>-<service>-
/// <instance>-<endpoint>-<address>`, every string field base64: checked
/// field by field, the trace id kept as SkyWalking names it.
pub fn sw8(value: &str) -> Found {
    use base64::Engine as _;
    let f = Format::Sw8;
    let parts: Vec<&str> = value.trim().split('-').collect();
    let [
        sample,
        trace,
        segment,
        span,
        service,
        instance,
        endpoint,
        address,
    ] = parts[..]
    else {
        return malformed(f, value, format!("{} fields, not 8", parts.len()));
    };
    let sampled = match sample {
        "1" => true,
        "0" => false,
        _ => return malformed(f, value, "sample flag is neither 0 nor 1"),
    };
    let text = |b64: &str| -> Option<String> {
        let b = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        String::from_utf8(b).ok().filter(|s| !s.is_empty())
    };
    let Some(trace) = text(trace) else {
        return malformed(f, value, "trace id is not base64 text");
    };
    for (name, field) in [
        ("segment id", segment),
        ("parent service", service),
        ("parent instance", instance),
        ("parent endpoint", endpoint),
        ("target address", address),
    ] {
        if text(field).is_none() {
            return malformed(f, value, format!("{name} is not base64 text"));
        }
    }
    if span.parse::<u32>().is_err() {
        return malformed(f, value, "span id is not a number");
    }
    Found::Foreign {
        format: f,
        trace: trace.chars().take(128).collect(),
        sampled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::message::parse_head;

    /// The propagation of a GET carrying the header lines `h`.
    fn head(h: &str) -> Propagation {
        let raw = format!("GET / HTTP/1.1\r\n{h}\r\n\r\n");
        Propagation::from_head(&parse_head(raw.as_bytes()).unwrap())
    }

    #[test]
    fn skywalking_is_a_context_of_its_own_and_datadogs_tracestate_a_datadog_one() {
        // SkyWalking's own example: trace "a.b.c", service "service" ...
        let sw = "1-YS5iLmM=-ZC5lLmY=-3-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTAuMC4wLjE6ODA4MA==";
        let p = head(&format!("sw8: {sw}"));
        assert_eq!(
            p.contexts.as_slice(),
            [Found::Foreign {
                format: Format::Sw8,
                trace: "a.b.c".into(),
                sampled: true
            }]
        );
        assert_eq!(p.foreign_only(), Some((Format::Sw8, "a.b.c")));
        assert!(p.primary().is_none());
        // Beside W3C it is not all there is.
        let both = head(&format!(
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nsw8: {sw}"
        ));
        assert_eq!(both.foreign_only(), None);
        for (bad, why) in [
            ("1-YS5iLmM=-ZC5lLmY=-3", "4 fields"),
            (
                "2-YS5iLmM=-ZC5lLmY=-3-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTAuMC4wLjE6ODA4MA==",
                "sample",
            ),
            (
                "1-!!!-ZC5lLmY=-3-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTAuMC4wLjE6ODA4MA==",
                "trace id",
            ),
            (
                "1-YS5iLmM=-ZC5lLmY=-x-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTAuMC4wLjE6ODA4MA==",
                "span id",
            ),
        ] {
            assert!(
                matches!(&sw8(bad), Found::Malformed { format: Format::Sw8, reason, .. } if reason.contains(why)),
                "{bad}: {:?}",
                sw8(bad)
            );
        }
        // Datadog with W3C: its tracestate member names its last span.
        let p = head(
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: rojo=1,dd=s:-1;p:00f067aa0ba902b7;t.dm:-4",
        );
        let [Found::Valid(w3c), Found::Valid(dd)] = p.contexts.as_slice() else {
            panic!("{p:?}");
        };
        assert_eq!(w3c.format, Format::W3c);
        assert_eq!(
            (
                dd.format,
                dd.trace_id.as_str(),
                dd.parent_span_id.as_str(),
                dd.sampled
            ),
            (
                Format::Datadog,
                w3c.trace_id.as_str(),
                "00f067aa0ba902b7",
                Some(false)
            )
        );
        // Without a valid traceparent the member names nothing.
        let p = head("traceparent: 00-zz-b7ad6b7169203331-01\r\ntracestate: dd=s:1");
        assert_eq!(p.contexts.len(), 1);
    }

    #[test]
    fn other_tracers_formats_are_read_and_their_ids_converted() {
        let one = |h: &str| -> SpanContext {
            let p = head(h);
            match p.contexts.as_slice() {
                [Found::Valid(c)] => c.clone(),
                other => panic!("{h}: {other:?}"),
            }
        };
        // Datadog, 64-bit and 128-bit.
        let c = one(
            "x-datadog-trace-id: 1234567890\r\nx-datadog-parent-id: 9876543210\r\nx-datadog-sampling-priority: 1",
        );
        assert_eq!(
            (c.format, c.trace_id.as_str()),
            (Format::Datadog, "000000000000000000000000499602d2")
        );
        assert_eq!(
            (c.parent_span_id.as_str(), c.sampled),
            ("000000024cb016ea", Some(true))
        );
        let c = one(
            "x-datadog-trace-id: 1\r\nx-datadog-parent-id: 2\r\nx-datadog-tags: _dd.p.dm=-0,_dd.p.tid=640cfd8d00000000",
        );
        assert_eq!(c.trace_id, "640cfd8d000000000000000000000001");
        // X-Ray, as OpenTelemetry's propagator maps it.
        let c = one(
            "X-Amzn-Trace-Id: Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
        );
        assert_eq!(
            (c.format, c.trace_id.as_str()),
            (Format::Xray, "5759e988bd862e3fe1be46a994272793")
        );
        assert_eq!(
            (c.parent_span_id.as_str(), c.sampled),
            ("53995c3f42cd8ad8", Some(true))
        );
        assert!(matches!(
            head("X-Amzn-Trace-Id: Root=1-5759e988-bd862e3fe1be46a994272793").contexts[0],
            Found::Malformed {
                format: Format::Xray,
                ..
            }
        ));
        // Google Cloud Trace.
        let c = one("X-Cloud-Trace-Context: 105445aa7843bc8bf206b12000100000/1;o=1");
        assert_eq!(
            (c.format, c.trace_id.as_str()),
            (Format::CloudTrace, "105445aa7843bc8bf206b12000100000")
        );
        assert_eq!(
            (c.parent_span_id.as_str(), c.sampled),
            ("0000000000000001", Some(true))
        );
        // OpenTracing.
        let c = one(
            "ot-tracer-traceid: 0af7651916cd43dd\r\not-tracer-spanid: b7ad6b7169203331\r\not-tracer-sampled: true",
        );
        assert_eq!(
            (c.format, c.trace_id.as_str()),
            (Format::OtTracer, "00000000000000000af7651916cd43dd")
        );
        // Unpadded, as OpenTelemetry's ot-trace propagator writes a span
        // id whose first digit is 0.
        let c = one("ot-tracer-traceid: 1234\r\not-tracer-spanid: 5dc2fcf59d4ede0");
        assert_eq!(
            (c.trace_id.as_str(), c.parent_span_id.as_str()),
            ("00000000000000000000000000001234", "05dc2fcf59d4ede0")
        );
        // OpenCensus binary.
        let c = one("grpc-trace-bin: AABkZWFkYmVlZmRlYWRiZWVmAQAAAAAAAAABAgE");
        assert_eq!(
            (c.format, c.trace_id.as_str()),
            (Format::GrpcTraceBin, "64656164626565666465616462656566")
        );
        assert_eq!(
            (c.parent_span_id.as_str(), c.sampled),
            ("0000000000000001", Some(true))
        );
        // Each its own label.
        let labels: Vec<&str> = [
            Format::Datadog,
            Format::Xray,
            Format::CloudTrace,
            Format::OtTracer,
            Format::GrpcTraceBin,
        ]
        .iter()
        .map(Format::as_str)
        .collect();
        assert_eq!(
            labels,
            [
                "datadog",
                "xray",
                "cloudtrace",
                "ottracer",
                "grpc-trace-bin"
            ]
        );
        // Broken values are malformed, with a reason.
        for h in [
            "x-datadog-trace-id: abc\r\nx-datadog-parent-id: 2",
            "x-datadog-trace-id: 1",
            "X-Cloud-Trace-Context: 105445aa/1",
            "grpc-trace-bin: !!!",
        ] {
            assert!(
                matches!(head(h).contexts[0], Found::Malformed { .. }),
                "{h}"
            );
        }
    }

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_context_header_sent_twice_with_different_values_is_no_context() {
        let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let raw = format!("GET / HTTP/1.1\r\ntraceparent: {TP}\r\ntraceparent: {other}\r\n\r\n");
        let p = Propagation::from_head(&parse_head(raw.as_bytes()).unwrap());
        assert_eq!(p.contexts.len(), 1);
        assert_eq!(
            reason(p.contexts[0].clone()),
            "2 traceparent headers with different values"
        );
        let same = format!("GET / HTTP/1.1\r\ntraceparent: {TP}\r\ntraceparent: {TP}\r\n\r\n");
        let p = Propagation::from_head(&parse_head(same.as_bytes()).unwrap());
        assert!(matches!(p.contexts[0], Found::Valid(_)));
    }

    fn reason(f: Found) -> String {
        match f {
            Found::Malformed { reason, .. } => reason,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn w3c_valid_and_sampled_flag() {
        let Found::Valid(c) = traceparent(TP) else {
            panic!()
        };
        assert_eq!(c.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.parent_span_id, "b7ad6b7169203331");
        assert_eq!(c.sampled, Some(true));
        let Found::Valid(c) = traceparent(&TP.replace("-01", "-00")) else {
            panic!()
        };
        assert_eq!(c.sampled, Some(false));
        // A future version may add fields.
        assert!(matches!(
            traceparent(&format!("01{}-extra", &TP[2..])),
            Found::Valid(_)
        ));
    }

    #[test]
    fn w3c_invalid_values_are_malformed_with_a_reason() {
        // The seed lab's header.
        assert_eq!(
            reason(traceparent("00-trace123-span123-01")),
            "trace-id is not 32 lowercase hex digits"
        );
        assert_eq!(
            reason(traceparent(&TP.replacen("00", "ff", 1))),
            "version ff is forbidden"
        );
        assert_eq!(
            reason(traceparent(&TP.to_uppercase())),
            "trace-id is not 32 lowercase hex digits"
        );
        assert_eq!(
            reason(traceparent(&TP.replacen("00", "0x", 1))),
            "version is not 2 lowercase hex digits"
        );
        assert_eq!(
            reason(traceparent(
                &TP.replace("0af7651916cd43dd8448eb211c80319c", &"0".repeat(32))
            )),
            "trace-id is all zeros"
        );
        assert_eq!(
            reason(traceparent(
                &TP.replace("b7ad6b7169203331", &"0".repeat(16))
            )),
            "parent-id is all zeros"
        );
        assert_eq!(
            reason(traceparent(&format!("{TP}-x"))),
            "version 00 has exactly four fields"
        );
        assert_eq!(
            reason(traceparent(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"
            )),
            "trace-flags is not 2 lowercase hex digits"
        );
        assert_eq!(
            reason(traceparent("")),
            "expected version-traceid-parentid-flags"
        );
    }

    #[test]
    fn jaeger_ids_are_padded_and_flags_read() {
        let Found::Valid(c) = uber_trace_id("abc:def:0:1") else {
            panic!()
        };
        assert_eq!(c.trace_id, format!("{:0>32}", "abc"));
        assert_eq!(c.parent_span_id, "0000000000000def");
        assert_eq!(c.sampled, Some(true));
        let Found::Valid(c) = uber_trace_id("ABC%3Adef%3A0%3A0") else {
            panic!()
        };
        assert_eq!(c.sampled, Some(false));
        assert_eq!(reason(uber_trace_id("0:def:0:1")), "trace-id is zero");
        assert_eq!(
            reason(uber_trace_id("abc:def:1")),
            "expected trace-id:span-id:parent-span-id:flags"
        );
        assert_eq!(
            reason(uber_trace_id("xyz:def:0:1")),
            "trace-id is not 1 to 32 hex digits"
        );
    }

    #[test]
    fn b3_single_and_multi() {
        let Found::Valid(c) =
            b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
        else {
            panic!()
        };
        assert_eq!(c.trace_id, "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(c.sampled, Some(true));
        let Found::Valid(c) = b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1") else {
            panic!()
        };
        assert_eq!(c.trace_id, "000000000000000064fe8b2a57d3eff7");
        assert_eq!(c.sampled, None);
        assert_eq!(
            b3_single("0"),
            Found::SamplingOnly {
                format: Format::B3Single,
                sampled: false
            }
        );
        assert_eq!(
            reason(b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-x")),
            "sampling state is not 0, 1 or d"
        );
        let Found::Valid(c) = b3_multi_headers(
            Some("463ac35c9f6413ad48485a3953bb6124"),
            Some("a2fb4a1d1a96d312"),
            Some("0"),
            None,
        ) else {
            panic!()
        };
        assert_eq!(c.sampled, Some(false));
        assert_eq!(
            reason(b3_multi_headers(
                Some("463ac35c9f6413ad"),
                None,
                Some("1"),
                None
            )),
            "X-B3-TraceId and X-B3-SpanId must come together"
        );
    }

    #[test]
    fn propagation_from_a_head_is_case_insensitive_and_reports_baggage() {
        let head = parse_head(
            format!(
                "GET / HTTP/1.1\r\nTRACEPARENT: {TP}\r\nTraceState: k=v\r\nX-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\nx-b3-spanid: a2fb4a1d1a96d312\r\nx-b3-sampled: 1\r\nBaggage: user=alice,tenant=t1;prop=1\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let p = Propagation::from_head(&head);
        assert_eq!(
            p.contexts.iter().map(Found::format).collect::<Vec<_>>(),
            [Format::W3c, Format::B3Multi]
        );
        assert!(p.tracestate);
        assert_eq!(p.primary().unwrap().format, Format::W3c);
        let b = p.baggage.unwrap();
        assert_eq!(
            (b.entries, b.keys.clone()),
            (2, vec!["user".into(), "tenant".into()])
        );
        let none = Propagation::from_head(&parse_head(b"GET / HTTP/1.1\r\n\r\n").unwrap());
        assert!(none.contexts.is_empty() && none.baggage.is_none());
    }
}
