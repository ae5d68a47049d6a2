//! Calls through Services: the hop belongs to the pod that served it.
//!
//! kube-proxy rewrites a call to a ClusterIP (DNAT) between the client's
//! veth and the backend's. On the client's veth the request is addressed to
//! the Service; the response comes back un-NATed, *from* the Service. The
//! backend's veth sees the same bytes addressed pod to pod. A hop is the
//! client endpoint and the TCP sequence number (neither changes under DNAT)
//! bound to the backend pod; so before anything else reads an event, a
//! flow to (or a response from) a Service address is rewritten to the
//! backend's, and the Service is kept beside it (`RawEvent::via`). After
//! that, pairing, duplicate detection (the same response seen on the
//! backend's veth and, un-NATed, on the client's), classification and span
//! placement all see one pod-to-pod hop.
//!
//! The backend comes from conntrack ([`conntrack`]): the client's node made
//! the translation and holds the entry for as long as the connection lives.
//! One query per connection, cached, and asked again for a request that may
//! start a new connection on the same client port (possibly to another
//! backend): after the last exchange said the connection ends
//! (`Connection: close`, [`ServiceNat::closed`]: the server closes first,
//! so the client may take the port again at once, as the lab's clients do
//! within a second), after [`IDLE_REASK_NS`] of quiet on the flow (a
//! server closing an idle keep-alive connection), after [`REVALIDATE_NS`],
//! or when its sequence number is far from the last one. Linux derives a
//! new connection's initial sequence number from the same four-tuple and a
//! clock, so on a reused port it lands just ahead of the old connection's:
//! the sequence number alone cannot tell the two apart.

pub mod conntrack;

use std::net::IpAddr;

use crate::FastMap;

use tracegap_common::EventKind;

use crate::events::{Endpoint, Flow, RawEvent};
pub use conntrack::{Conntrack, ConntrackError};

/// How long a resolved backend is trusted before it is asked again.
pub const REVALIDATE_NS: u64 = 10_000_000_000;
/// A request on a flow quiet this long may open a new connection on a
/// reused port: its backend is asked again.
pub const IDLE_REASK_NS: u64 = 1_000_000_000;
/// Connections whose backend is remembered at most.
pub const MAX_CACHED: usize = 64 * 1024;
/// A request further than this past the last one on its flow (or before
/// it) starts a new connection, as far as the cache is concerned.
const SAME_CONNECTION_WINDOW: u32 = 1 << 30;

/// Who knows where a Service connection went: conntrack, or a test's table.
pub trait BackendLookup {
    /// The backend of the connection whose original tuple is `orig`.
    fn backend(&mut self, orig: &Flow) -> Result<Option<Endpoint>, ConntrackError>;
}

impl BackendLookup for Conntrack {
    fn backend(&mut self, orig: &Flow) -> Result<Option<Endpoint>, ConntrackError> {
        Conntrack::backend(self, orig)
    }
}

/// Outcomes of backend lookups, for `tracegap_service_lookups_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// A backend was found.
    pub resolved: u64,
    /// conntrack had no entry: the hop stays addressed to the Service.
    pub not_found: u64,
    /// The query failed (or no conntrack socket could be opened).
    pub failed: u64,
}

struct Cached {
    backend: Option<Endpoint>,
    resolved_ns: u64,
    /// Sequence number of the last request seen on the connection.
    last_seq: u32,
    /// When an event of the flow was last translated.
    last_ns: u64,
    /// An exchange said the connection ends: the next request start is a
    /// new connection's.
    closed: bool,
}

/// Rewrites Service-addressed events to their backends.
pub struct ServiceNat<L = Conntrack> {
    lookup: Option<L>,
    cache: FastMap<Flow, Cached>,
    pub stats: LookupStats,
}

impl<L: BackendLookup> ServiceNat<L> {
    /// `lookup`: None when conntrack cannot be asked; every Service event is
    /// then counted as failed and left as it is.
    pub fn new(lookup: Option<L>) -> Self {
        Self {
            lookup,
            cache: FastMap::default(),
            stats: LookupStats::default(),
        }
    }

    /// Rewrites `e` in place if it is addressed to (or, a response, comes
    /// from) an address `is_service` says is a Service.
    pub fn translate(&mut self, e: &mut RawEvent, is_service: impl Fn(IpAddr) -> bool) {
        match e.kind {
            EventKind::Request | EventKind::Continuation if is_service(e.flow.dst.ip) => {
                let start = (e.kind == EventKind::Request).then_some(e.seq);
                if let Some(b) = self.resolve(e.flow, e.ts_ns, start) {
                    e.via = Some(e.flow.dst);
                    e.flow.dst = b;
                }
            }
            // HTTP/2: either direction of a connection to a Service.
            EventKind::Http2 if is_service(e.flow.dst.ip) => {
                if let Some(b) = self.resolve(e.flow, e.ts_ns, None) {
                    e.via = Some(e.flow.dst);
                    e.flow.dst = b;
                }
            }
            EventKind::Response | EventKind::Http2 if is_service(e.flow.src.ip) => {
                if let Some(b) = self.resolve(e.flow.reversed(), e.ts_ns, None) {
                    e.via = Some(e.flow.src);
                    e.flow.src = b;
                }
            }
            _ => {}
        }
    }

    /// The backend of the connection `orig` (client → Service). `request_seq`:
    /// the sequence number of a request starting on it, checked against the
    /// last one so a new connection on a reused port is asked again.
    fn resolve(&mut self, orig: Flow, now_ns: u64, request_seq: Option<u32>) -> Option<Endpoint> {
        if let Some(c) = self.cache.get_mut(&orig) {
            let fresh = now_ns.saturating_sub(c.resolved_ns) < REVALIDATE_NS;
            let same_connection = request_seq.is_none_or(|s| {
                !c.closed
                    && now_ns.saturating_sub(c.last_ns) < IDLE_REASK_NS
                    && s.wrapping_sub(c.last_seq) < SAME_CONNECTION_WINDOW
            });
            if fresh && same_connection {
                if let Some(s) = request_seq {
                    c.last_seq = s;
                }
                c.last_ns = c.last_ns.max(now_ns);
                return c.backend;
            }
        }
        let backend = match self.lookup.as_mut().map(|l| l.backend(&orig)) {
            Some(Ok(Some(b))) => {
                tracing::trace!(flow = %orig, backend = %b, "Service backend");
                self.stats.resolved += 1;
                Some(b)
            }
            Some(Ok(None)) => {
                self.stats.not_found += 1;
                None
            }
            Some(Err(e)) => {
                self.stats.failed += 1;
                tracing::debug!(error = %e, flow = %orig, "conntrack lookup failed");
                None
            }
            None => {
                self.stats.failed += 1;
                None
            }
        };
        if self.cache.len() >= MAX_CACHED {
            self.cache
                .retain(|_, c| now_ns.saturating_sub(c.resolved_ns) < REVALIDATE_NS);
            if self.cache.len() >= MAX_CACHED {
                self.cache.clear();
            }
        }
        self.cache.insert(
            orig,
            Cached {
                backend,
                resolved_ns: now_ns,
                last_seq: request_seq.unwrap_or_default(),
                last_ns: now_ns,
                closed: false,
            },
        );
        backend
    }

    /// The connection `orig` (client → Service) ends after the exchange
    /// just paired (it said `Connection: close`): its answer's other
    /// sightings still resolve from the cache, the next request start on
    /// the flow asks again.
    pub fn closed(&mut self, orig: &Flow) {
        if let Some(c) = self.cache.get_mut(orig) {
            c.closed = true;
        }
    }

    /// Forgets connections not asked about for a while.
    pub fn forget_before(&mut self, ts_ns: u64) {
        self.cache.retain(|_, c| c.resolved_ns >= ts_ns);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tracegap_common::Direction;

    use super::*;

    fn ep(last: u8, port: u16) -> Endpoint {
        Endpoint {
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
            port,
        }
    }

    const CLIENT: u8 = 1;
    const SERVICE: u8 = 100;

    /// A table standing in for conntrack, counting questions. The real
    /// kernel is asked in the end-to-end tests (tests/tests/services.rs).
    #[derive(Default)]
    struct Table {
        backends: FastMap<Flow, Endpoint>,
        asked: usize,
    }

    impl BackendLookup for Table {
        fn backend(&mut self, orig: &Flow) -> Result<Option<Endpoint>, ConntrackError> {
            self.asked += 1;
            Ok(self.backends.get(orig).copied())
        }
    }

    fn event(kind: EventKind, flow: Flow, seq: u32, ts_ns: u64) -> RawEvent {
        RawEvent {
            ts_ns,
            flow,
            ifindex: 1,
            direction: Direction::Ingress,
            kind,
            seq,
            ack: 0,
            short_start: false,
            segment_len: 0,
            budget_exhausted: false,
            payload: Default::default(),
            via: None,
        }
    }

    #[test]
    fn requests_and_responses_through_a_service_become_pod_to_pod() {
        let orig = Flow {
            src: ep(CLIENT, 40000),
            dst: ep(SERVICE, 80),
        };
        let backend = ep(7, 8080);
        let mut t = Table::default();
        t.backends.insert(orig, backend);
        let mut nat = ServiceNat::new(Some(t));
        let is_service = |ip: IpAddr| ip == ep(SERVICE, 0).ip;

        let mut req = event(EventKind::Request, orig, 1000, 1);
        nat.translate(&mut req, is_service);
        assert_eq!(req.flow.dst, backend);
        assert_eq!(req.via, Some(ep(SERVICE, 80)));
        // The response un-NATed on the client's veth: from the Service.
        let mut rsp = event(EventKind::Response, orig.reversed(), 5000, 2);
        nat.translate(&mut rsp, is_service);
        assert_eq!(
            rsp.flow,
            Flow {
                src: backend,
                dst: orig.src
            }
        );
        // The same response seen on the backend's veth is already pod to pod.
        let mut seen = event(EventKind::Response, rsp.flow, 5000, 2);
        nat.translate(&mut seen, is_service);
        assert_eq!((seen.flow, seen.via), (rsp.flow, None));
        // A keep-alive request on the same connection: no new question.
        let mut next = event(EventKind::Request, orig, 1300, 3);
        nat.translate(&mut next, is_service);
        assert_eq!(next.flow.dst, backend);
        assert_eq!(nat.lookup.as_ref().unwrap().asked, 1);
        assert_eq!(nat.stats.resolved, 1);
    }

    /// A client's connection to the Service, and conntrack sending it to
    /// `backend`.
    fn through_service(backend: Endpoint) -> (Flow, ServiceNat<Table>) {
        let orig = Flow {
            src: ep(CLIENT, 40000),
            dst: ep(SERVICE, 80),
        };
        let mut t = Table::default();
        t.backends.insert(orig, backend);
        (orig, ServiceNat::new(Some(t)))
    }

    #[test]
    fn a_new_connection_or_an_old_answer_asks_again() {
        let (orig, mut nat) = through_service(ep(7, 8080));
        let is_service = |ip: IpAddr| ip == ep(SERVICE, 0).ip;
        nat.translate(&mut event(EventKind::Request, orig, 1000, 1), is_service);
        // The client port reused for a new connection (a random initial
        // sequence number, here behind the last one), now to another backend.
        nat.lookup
            .as_mut()
            .unwrap()
            .backends
            .insert(orig, ep(8, 8080));
        let mut again = event(EventKind::Request, orig, 900, 2);
        nat.translate(&mut again, is_service);
        assert_eq!(again.flow.dst, ep(8, 8080));
        // Past the revalidation time, even in sequence.
        let mut late = event(EventKind::Request, orig, 950, 2 + REVALIDATE_NS);
        nat.translate(&mut late, is_service);
        assert_eq!(nat.lookup.as_ref().unwrap().asked, 3);
    }

    #[test]
    fn a_port_reused_after_a_closing_exchange_or_a_quiet_while_asks_again() {
        let (orig, mut nat) = through_service(ep(7, 8080));
        let is_service = |ip: IpAddr| ip == ep(SERVICE, 0).ip;
        let ms = 1_000_000;
        nat.translate(&mut event(EventKind::Request, orig, 1000, ms), is_service);
        // The exchange said `Connection: close`; its answer, seen again on
        // the client's veth, still resolves from what was asked.
        nat.closed(&orig);
        let mut answer = event(EventKind::Response, orig.reversed(), 5000, 2 * ms);
        nat.translate(&mut answer, is_service);
        assert_eq!(answer.flow.src, ep(7, 8080));
        assert_eq!(nat.lookup.as_ref().unwrap().asked, 1);
        // The client takes the port again at once for a new connection,
        // its sequence number just ahead of the old one's (as Linux's
        // clock-driven initial sequence numbers on the same four-tuple
        // are), and conntrack sent it to another backend.
        nat.lookup
            .as_mut()
            .unwrap()
            .backends
            .insert(orig, ep(8, 8080));
        let mut reused = event(EventKind::Request, orig, 1000 + 7_800_000, 3 * ms);
        nat.translate(&mut reused, is_service);
        assert_eq!(reused.flow.dst, ep(8, 8080));
        assert_eq!(nat.lookup.as_ref().unwrap().asked, 2);
        // A keep-alive request soon after: the same connection.
        let mut next = event(EventKind::Request, orig, 1000 + 7_800_300, 4 * ms);
        nat.translate(&mut next, is_service);
        assert_eq!(nat.lookup.as_ref().unwrap().asked, 2);
        // A request after a quiet second (a server may have closed the
        // idle connection, and the port been taken again): asked again.
        nat.lookup
            .as_mut()
            .unwrap()
            .backends
            .insert(orig, ep(7, 8080));
        let mut after_quiet = event(
            EventKind::Request,
            orig,
            1000 + 7_800_600,
            4 * ms + IDLE_REASK_NS,
        );
        nat.translate(&mut after_quiet, is_service);
        assert_eq!(after_quiet.flow.dst, ep(7, 8080));
        assert_eq!(nat.lookup.as_ref().unwrap().asked, 3);
    }

    #[test]
    fn what_conntrack_does_not_know_stays_addressed_to_the_service() {
        let orig = Flow {
            src: ep(CLIENT, 40000),
            dst: ep(SERVICE, 80),
        };
        let mut nat = ServiceNat::new(Some(Table::default()));
        let mut req = event(EventKind::Request, orig, 1, 1);
        nat.translate(&mut req, |ip| ip == ep(SERVICE, 0).ip);
        assert_eq!((req.flow, req.via), (orig, None));
        assert_eq!(nat.stats.not_found, 1);
        // No conntrack at all: counted as failed, nothing rewritten.
        let mut none: ServiceNat<Table> = ServiceNat::new(None);
        let mut req = event(EventKind::Request, orig, 1, 1);
        none.translate(&mut req, |ip| ip == ep(SERVICE, 0).ip);
        assert_eq!((req.flow, none.stats.failed), (orig, 1));
        // Not a Service: never asked.
        let mut t = ServiceNat::new(Some(Table::default()));
        t.translate(&mut event(EventKind::Request, orig, 1, 1), |_| false);
        assert_eq!(t.lookup.as_ref().unwrap().asked, 0);
    }
}
