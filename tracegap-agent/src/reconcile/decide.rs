//! Finding, in what the trace store holds, the spans a hop is about: the
//! breaking service's own span serving the request, the callee's own span
//! under the context it was sent, or the callee's own new trace. Pure
//! functions over stored spans, so every rule is tested without a store.

use std::{
    collections::{HashSet, VecDeque},
    time::{Duration, SystemTime},
};

use crate::{
    events::Endpoint,
    tracestore::{Kind, StoredSpan},
};

/// How far a service's clock and span boundaries may stand from the wire's
/// timestamps: the span starts after the request arrived and ends before
/// the response left, give or take clock skew between nodes (NTP keeps it
/// to milliseconds).
pub const CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

/// The hop as the matching rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub caller: Endpoint,
    pub start: SystemTime,
    pub end: SystemTime,
}

fn recorded_by(s: &StoredSpan, service: &str) -> bool {
    s.service == service && !s.synthetic
}

/// The span `service` (the caller of the hop) was serving when it made the
/// call: its own, not a client span, covering the hop, preferably the child
/// of `parent` (the span id its caller sent it); the innermost if several.
pub fn serving_span<'t>(
    trace: &'t [StoredSpan],
    service: &str,
    parent: &str,
    hop: Window,
) -> Option<&'t StoredSpan> {
    let covering = |s: &&StoredSpan| {
        recorded_by(s, service)
            && s.kind != Kind::Client
            && s.start <= hop.start + CLOCK_TOLERANCE
            && s.end + CLOCK_TOLERANCE >= hop.end
    };
    let innermost = |a: &&&StoredSpan, b: &&&StoredSpan| a.start.cmp(&b.start);
    let all: Vec<&StoredSpan> = trace.iter().filter(covering).collect();
    all.iter()
        .filter(|s| s.parent_span_id.as_deref() == Some(parent))
        .max_by(innermost)
        .or_else(|| all.iter().max_by(innermost))
        .copied()
}

/// The callee's own span under the span id its caller sent. A store may
/// drop the reference to a parent that was never recorded (the caller did
/// not export its span; the lab's store does so for the Jaeger UI): such a
/// span is parentless in the caller's trace, and is matched like a root,
/// by the hop's window and peer.
pub fn own_child<'t>(
    trace: &'t [StoredSpan],
    callee: &str,
    parent: &str,
    hop: Window,
    claimed: &Claimed,
) -> Option<&'t StoredSpan> {
    let exact = trace.iter().find(|s| {
        recorded_by(s, callee)
            && s.parent_span_id.as_deref() == Some(parent)
            && !claimed.contains(&s.span_id)
    });
    exact.or_else(|| match own_root(trace.iter(), callee, hop, claimed) {
        Root::One(s) => Some(s),
        _ => None,
    })
}

/// What a search for the callee's own root span found.
#[derive(Debug, PartialEq)]
pub enum Root<'t> {
    One(&'t StoredSpan),
    None,
    /// Several fit and nothing tells them apart (no peer on the spans).
    Ambiguous(usize),
}

/// The callee's own root span for the hop's request: a root span of the
/// callee's, not a client span, inside the hop's window, from the hop's
/// caller when the span names its peer. A span naming the caller's very
/// port is that connection's; otherwise exactly one must fit.
pub fn own_root<'t>(
    spans: impl Iterator<Item = &'t StoredSpan>,
    callee: &str,
    hop: Window,
    claimed: &Claimed,
) -> Root<'t> {
    let fits: Vec<&StoredSpan> = spans
        .filter(|s| {
            recorded_by(s, callee)
                && s.parent_span_id.is_none()
                && s.kind != Kind::Client
                && s.start + CLOCK_TOLERANCE >= hop.start
                && s.start <= hop.end + CLOCK_TOLERANCE
                && s.end <= hop.end + CLOCK_TOLERANCE
                && s.peer.is_none_or(|p| p == hop.caller.ip)
                && s.peer_port.is_none_or(|p| p == hop.caller.port)
                && !claimed.contains(&s.span_id)
        })
        .collect();
    let by_port: Vec<&&StoredSpan> = fits
        .iter()
        .filter(|s| s.peer_port == Some(hop.caller.port))
        .collect();
    match (by_port.as_slice(), fits.as_slice()) {
        ([one], _) => Root::One(one),
        (_, [one]) => Root::One(one),
        (_, []) => Root::None,
        (_, many) => Root::Ambiguous(many.len()),
    }
}

/// Span ids already matched to a hop: one span is one request's record.
/// Bounded: the oldest are forgotten.
#[derive(Debug, Default)]
pub struct Claimed {
    set: HashSet<String>,
    order: VecDeque<String>,
}

const CLAIMED: usize = 65536;

impl Claimed {
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    pub fn claim(&mut self, id: &str) {
        if self.set.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            if self.order.len() > CLAIMED
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn span(
        id: &str,
        service: &str,
        parent: Option<&str>,
        kind: Kind,
        from: u64,
        to: u64,
    ) -> StoredSpan {
        StoredSpan {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            service: service.into(),
            kind,
            name: "GET /".into(),
            start: t(from),
            end: t(to),
            synthetic: false,
            peer: None,
            peer_port: None,
        }
    }

    fn window(from: u64, to: u64, port: u16) -> Window {
        Window {
            caller: Endpoint {
                ip: "10.0.0.2".parse::<IpAddr>().unwrap(),
                port,
            },
            start: t(from),
            end: t(to),
        }
    }

    #[test]
    fn the_breaking_service_s_own_serving_span_is_found_not_its_client_span_or_tracegap_s() {
        let mut synthetic = span(
            "5555555555555555",
            "service-b",
            Some("aaaaaaaaaaaaaaaa"),
            Kind::Server,
            0,
            1000,
        );
        synthetic.synthetic = true;
        let trace = vec![
            span("aaaaaaaaaaaaaaaa", "service-a", None, Kind::Client, 0, 1000),
            synthetic,
            span(
                "cccccccccccccccc",
                "service-b",
                Some("bbbbbbbbbbbbbbbb"),
                Kind::Client,
                200,
                600,
            ),
            span(
                "bbbbbbbbbbbbbbbb",
                "service-b",
                Some("aaaaaaaaaaaaaaaa"),
                Kind::Server,
                50,
                900,
            ),
            // Another request's span of service-b, not covering the hop.
            span(
                "dddddddddddddddd",
                "service-b",
                Some("aaaaaaaaaaaaaaaa"),
                Kind::Server,
                700,
                950,
            ),
        ];
        let found =
            serving_span(&trace, "service-b", "aaaaaaaaaaaaaaaa", window(300, 500, 1)).unwrap();
        assert_eq!(found.span_id, "bbbbbbbbbbbbbbbb");
        // Not covering (beyond the clock tolerance): nothing.
        assert!(serving_span(&trace, "service-b", "aaaaaaaaaaaaaaaa", window(0, 990, 1)).is_none());
        assert!(
            serving_span(&trace, "service-x", "aaaaaaaaaaaaaaaa", window(300, 500, 1)).is_none()
        );
    }

    #[test]
    fn the_callee_s_own_root_span_is_matched_by_time_and_peer_once() {
        let mut other_peer = span("1111111111111111", "service-c", None, Kind::Server, 12, 18);
        other_peer.peer = Some("10.0.0.9".parse().unwrap());
        let mut this_port = span("2222222222222222", "service-c", None, Kind::Server, 12, 19);
        this_port.peer = Some("10.0.0.2".parse().unwrap());
        this_port.peer_port = Some(40000);
        let no_peer = span("3333333333333333", "service-c", None, Kind::Server, 11, 19);
        let child = span(
            "4444444444444444",
            "service-c",
            Some("aaaaaaaaaaaaaaaa"),
            Kind::Server,
            11,
            19,
        );
        let spans = [other_peer, this_port, no_peer.clone(), child];
        let mut claimed = Claimed::default();
        match own_root(spans.iter(), "service-c", window(10, 20, 40000), &claimed) {
            Root::One(s) => assert_eq!(s.span_id, "2222222222222222"),
            other => panic!("{other:?}"),
        }
        // Another connection from the same pod: only the span without a
        // peer fits.
        match own_root(spans.iter(), "service-c", window(10, 20, 40001), &claimed) {
            Root::One(s) => assert_eq!(s.span_id, "3333333333333333"),
            other => panic!("{other:?}"),
        }
        claimed.claim("3333333333333333");
        assert_eq!(
            own_root(spans.iter(), "service-c", window(10, 20, 40001), &claimed),
            Root::None
        );
        // Outside the window.
        assert_eq!(
            own_root(spans.iter(), "service-c", window(100, 120, 40000), &claimed),
            Root::None
        );
        let twins = [
            no_peer.clone(),
            span("5555555555555555", "service-c", None, Kind::Server, 12, 18),
        ];
        assert_eq!(
            own_root(
                twins.iter(),
                "service-c",
                window(10, 20, 40001),
                &Claimed::default()
            ),
            Root::Ambiguous(2)
        );
        let far = window(500, 600, 40001);
        assert!(own_child(&spans, "service-c", "aaaaaaaaaaaaaaaa", far, &claimed).is_some());
        assert!(own_child(&spans, "service-c", "bbbbbbbbbbbbbbbb", far, &claimed).is_none());
        // Its parent reference dropped by the store: the parentless span of
        // this connection, in the window.
        let orphan = own_child(
            &spans,
            "service-c",
            "bbbbbbbbbbbbbbbb",
            window(10, 20, 40000),
            &claimed,
        );
        assert_eq!(orphan.map(|s| s.span_id.as_str()), Some("2222222222222222"));
    }
}
