//! What reconciliation learns as it goes: which services record spans
//! (from the store, and from their exports on the wire) and which pods
//! exported when, with the collector's answer.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Sampled requests into a service with no span of it in the store and no
/// export from it before it is taken for uninstrumented.
pub const UNINSTRUMENTED_AFTER: u64 = 20;
/// Services tracked at most.
const MAX_SERVICES: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
struct Evidence {
    spans_seen: u64,
    exports_seen: u64,
    exports_failed: u64,
    /// Calls it made in the trace it was serving under span ids of its own.
    ids_seen: u64,
    /// Sampled requests checked with no span of the service found.
    checked_without: u64,
}

/// Why a service is taken for instrumented, as the report says it.
const EXPORTS: &str = "it exports spans (seen on the wire)";
const OWN_IDS: &str = "its calls carry span ids of its own (seen on the wire)";

/// A service's instrumentation as learned from the trace store and the
/// wire, beside what was declared.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    /// Learned: Some(true) once its own spans are in the store, its
    /// exports are seen or its calls carry span ids of its own; Some(false) after many sampled requests with no
    /// span in the store and no export; None: not yet known.
    pub instrumented: Option<bool>,
    /// Why, in a few words.
    pub evidence: String,
    pub spans_seen: u64,
    pub exports_seen: u64,
    pub exports_failed: u64,
}

/// What the wire alone shows (no trace store): see
/// [`crate::gap::silence`].
impl From<(String, crate::gap::silence::Status)> for ServiceStatus {
    fn from((service, status): (String, crate::gap::silence::Status)) -> Self {
        use crate::gap::silence::Status;
        let (instrumented, evidence, exports_seen) = match status {
            Status::Exporting { exports } => (Some(true), EXPORTS.to_owned(), exports),
            Status::MakesSpans { .. } => (Some(true), OWN_IDS.to_owned(), 0),
            Status::LikelySilent { sampled, over } => (
                Some(false),
                format!(
                    "likely: {sampled} sampled requests over {}s, and no export from it seen (no trace store to ask)",
                    over.as_secs()
                ),
                0,
            ),
            Status::Unknown { sampled } => (
                None,
                format!("not known yet: {sampled} sampled requests, no export seen"),
                0,
            ),
        };
        Self {
            service,
            instrumented,
            evidence,
            spans_seen: 0,
            exports_seen,
            exports_failed: 0,
        }
    }
}

/// Each service's instrumentation, learned; shared with the data path,
/// which asks it for services nobody declared.
#[derive(Debug, Default)]
pub struct Learned(Mutex<HashMap<String, Evidence>>);

impl Learned {
    fn with(&self, service: &str, f: impl FnOnce(&mut Evidence)) {
        let Ok(mut m) = self.0.lock() else { return };
        if !m.contains_key(service) && m.len() >= MAX_SERVICES {
            return;
        }
        f(m.entry(service.to_owned()).or_default());
    }

    /// The store holds a span the service recorded itself.
    pub fn span_seen(&self, service: &str) {
        self.with(service, |e| e.spans_seen += 1);
    }

    /// One of the service's pods exported spans (`ok`: and the collector
    /// took them).
    pub fn export_seen(&self, service: &str, ok: bool) {
        self.with(service, |e| {
            e.exports_seen += 1;
            if !ok {
                e.exports_failed += 1;
            }
        });
    }

    /// The service, serving a request, called on in the same trace under a
    /// span id of its own: it makes spans, whatever its sampler keeps.
    pub fn ids_seen(&self, service: &str) {
        self.with(service, |e| e.ids_seen += 1);
    }

    /// A sampled request into the service has no span of it in the store.
    pub fn checked_without(&self, service: &str) {
        self.with(service, |e| e.checked_without += 1);
    }

    /// Sampled requests into the service checked with no span of it found.
    pub fn checked_without_count(&self, service: &str) -> u64 {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(service).map(|e| e.checked_without))
            .unwrap_or(0)
    }

    /// Some(true): it records spans (seen in the store, or exporting);
    /// Some(false): [`UNINSTRUMENTED_AFTER`] sampled requests with nothing
    /// in the store and no export ever; None: not known yet.
    pub fn instrumented(&self, service: &str) -> Option<bool> {
        let m = self.0.lock().ok()?;
        m.get(service).and_then(status)
    }

    /// Every service's status, for the report.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        let Ok(m) = self.0.lock() else {
            return Vec::new();
        };
        let mut out: Vec<ServiceStatus> = m
            .iter()
            .map(|(service, e)| ServiceStatus {
                service: service.clone(),
                instrumented: status(e),
                evidence: match status(e) {
                    Some(true) if e.spans_seen > 0 => "its own spans are in the trace store".into(),
                    Some(true) if e.exports_seen > 0 => EXPORTS.into(),
                    Some(true) => OWN_IDS.into(),
                    Some(false) => format!(
                        "{} sampled requests, none with a span of it in the store, and no export from it",
                        e.checked_without
                    ),
                    None => "not known yet".into(),
                },
                spans_seen: e.spans_seen,
                exports_seen: e.exports_seen,
                exports_failed: e.exports_failed,
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }
}

fn status(e: &Evidence) -> Option<bool> {
    if e.spans_seen > 0 || e.exports_seen > 0 || e.ids_seen > 0 {
        Some(true)
    } else if e.checked_without >= UNINSTRUMENTED_AFTER {
        Some(false)
    } else {
        None
    }
}

/// One OTLP export seen on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Export {
    /// The exporting pod.
    pub ip: IpAddr,
    pub at: SystemTime,
    /// The collector's HTTP status; None: no answer.
    pub status: Option<u16>,
    /// An OTLP/gRPC export's gRPC status (0: OK).
    pub grpc_status: Option<u32>,
}

impl Export {
    /// The answer as the report counts it: the HTTP status, or gRPC's
    /// (`grpc 14`) when the call failed past HTTP.
    pub fn answer(&self) -> String {
        match (self.status, self.grpc_status) {
            (_, Some(g)) if g != 0 => format!("grpc {g}"),
            (Some(s), _) => s.to_string(),
            (None, _) => "no answer".to_owned(),
        }
    }

    /// The collector took the spans.
    pub fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
            && self.grpc_status.is_none_or(|g| g == 0)
    }
}

/// Exports kept per pod at most, and for how long.
const EXPORTS_PER_POD: usize = 256;
const PODS: usize = 4096;

/// The collector's answer to a pod whose exports go over TLS, as the
/// report counts it.
pub const ENCRYPTED: &str = "unread (TLS)";

/// Recent exports by pod address.
#[derive(Debug, Default)]
pub struct Ledger {
    by_ip: HashMap<IpAddr, VecDeque<Export>>,
    /// Pods seen exporting over TLS (a connection to the collector).
    encrypted: std::collections::HashSet<IpAddr>,
}

impl Ledger {
    pub fn record(&mut self, e: Export) {
        if !self.by_ip.contains_key(&e.ip) && self.by_ip.len() >= PODS {
            return;
        }
        let q = self.by_ip.entry(e.ip).or_default();
        if q.len() >= EXPORTS_PER_POD {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// A pod seen exporting over TLS.
    pub fn encrypted(&mut self, ip: IpAddr) {
        if self.encrypted.len() < PODS {
            self.encrypted.insert(ip);
        }
    }

    /// Whether the pod was seen exporting over TLS.
    pub fn exports_encrypted(&self, ip: IpAddr) -> bool {
        self.encrypted.contains(&ip)
    }

    /// The pod's export nearest after `from` and before `until`: the one
    /// that would have carried a span that ended in between (the earliest
    /// failed one if any failed, since a failure is what loses it).
    pub fn export_between(
        &self,
        ip: IpAddr,
        from: SystemTime,
        until: SystemTime,
    ) -> Option<&Export> {
        let q = self.by_ip.get(&ip)?;
        let mut within = q.iter().filter(|e| e.at >= from && e.at <= until);
        let first = within.clone().next()?;
        Some(within.find(|e| !e.accepted()).unwrap_or(first))
    }

    /// Forgets exports older than `keep`.
    pub fn forget_before(&mut self, cutoff: SystemTime) {
        self.by_ip.retain(|_, q| {
            while q.front().is_some_and(|e| e.at < cutoff) {
                q.pop_front();
            }
            !q.is_empty()
        });
    }
}

/// How long exports are kept: past any settle delay worth having.
pub const LEDGER_KEEP: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instrumentation_is_learned_from_spans_exports_and_long_absence() {
        let l = Learned::default();
        assert_eq!(l.instrumented("a"), None);
        l.span_seen("a");
        assert_eq!(l.instrumented("a"), Some(true));
        l.export_seen("b", false);
        assert_eq!(l.instrumented("b"), Some(true));
        for _ in 0..UNINSTRUMENTED_AFTER - 1 {
            l.checked_without("c");
        }
        assert_eq!(l.instrumented("c"), None);
        l.checked_without("c");
        assert_eq!(l.instrumented("c"), Some(false));
        // Exports outweigh absence: its spans are being lost, not unmade.
        for _ in 0..UNINSTRUMENTED_AFTER {
            l.checked_without("b");
        }
        assert_eq!(l.instrumented("b"), Some(true));
        let s = l.statuses();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].exports_failed, 1);
        assert!(s[2].evidence.contains("no export"), "{}", s[2].evidence);
    }

    #[test]
    fn the_export_that_would_have_carried_a_span_is_found_failed_first() {
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        let t = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let mut l = Ledger::default();
        l.record(Export {
            ip,
            at: t(100),
            status: Some(200),
            grpc_status: None,
        });
        l.record(Export {
            ip,
            at: t(200),
            status: Some(503),
            grpc_status: None,
        });
        l.record(Export {
            ip,
            at: t(300),
            status: None,
            grpc_status: None,
        });
        assert_eq!(l.export_between(ip, t(50), t(150)).unwrap().answer(), "200");
        assert_eq!(l.export_between(ip, t(50), t(350)).unwrap().answer(), "503");
        assert_eq!(
            l.export_between(ip, t(250), t(350)).unwrap().answer(),
            "no answer"
        );
        assert!(l.export_between(ip, t(400), t(500)).is_none());
        assert!(
            l.export_between("10.0.0.4".parse().unwrap(), t(0), t(500))
                .is_none()
        );
        l.forget_before(t(250));
        assert!(l.export_between(ip, t(0), t(250)).is_none());
    }
}
