//! Services that are likely not instrumented, learned from the wire alone
//! (no trace store to ask): the pods of a service on this node served
//! sampled, traced requests for a while and never exported a span. An
//! instrumented service exports: its OTLP requests leave its pod's veth,
//! where the agent sees them (`POST /v1/traces`, OTLP/gRPC `Export`).
//! Exports the wire cannot show (a Unix socket to a node-local collector, a
//! sidecar in the same pod over loopback) make an instrumented service look
//! silent: hence "likely", on every span this adds, and a declaration
//! (annotation, names file) always wins. With a trace store the store
//! knows better, and this is not used.

use std::{collections::HashMap, time::Duration};

/// How long the pods must have served traced requests, by default.
pub const DEFAULT_AFTER: Duration = Duration::from_secs(120);
/// How many sampled requests they must have served, by default.
pub const DEFAULT_REQUESTS: u64 = 20;
/// Services tracked at most.
const MAX_SERVICES: usize = 4096;

/// When a service that never exported is taken for likely uninstrumented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SilenceConfig {
    /// Since the first sampled request its pods here served.
    pub after: Duration,
    /// Sampled requests its pods here served.
    pub requests: u64,
}

impl Default for SilenceConfig {
    fn default() -> Self {
        Self {
            after: DEFAULT_AFTER,
            requests: DEFAULT_REQUESTS,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Watch {
    first_ns: u64,
    sampled: u64,
    exports: u64,
    continued: u64,
}

/// What the wire shows of one service's instrumentation on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Its pods export spans.
    Exporting { exports: u64 },
    /// Its pods export nothing the wire shows, but their calls carry span
    /// ids of their own: it makes spans (its sampler may keep none).
    MakesSpans { continued: u64 },
    /// Served `sampled` traced requests over `over` and never exported.
    LikelySilent { sampled: u64, over: Duration },
    /// Not long enough, or not enough requests, to tell.
    Unknown { sampled: u64 },
}

/// Per service, what its pods on this node served and exported.
#[derive(Debug, Default)]
pub struct Silence {
    config: SilenceConfig,
    services: HashMap<String, Watch>,
}

impl Silence {
    pub fn new(config: SilenceConfig) -> Self {
        Self {
            config,
            services: HashMap::new(),
        }
    }

    fn watch(&mut self, service: &str, now_ns: u64) -> Option<&mut Watch> {
        // A known service's hop names no new key (no allocation per hop).
        if !self.services.contains_key(service) {
            if self.services.len() >= MAX_SERVICES {
                return None;
            }
            self.services.insert(
                service.to_owned(),
                Watch {
                    first_ns: now_ns,
                    sampled: 0,
                    exports: 0,
                    continued: 0,
                },
            );
        }
        self.services.get_mut(service)
    }

    /// A pod of `service` on this node served a request with a sampled
    /// context (its SDK, if it had one, would have recorded it).
    pub fn served(&mut self, service: &str, now_ns: u64) {
        if let Some(w) = self.watch(service, now_ns) {
            if w.sampled == 0 {
                w.first_ns = now_ns;
            }
            w.sampled += 1;
        }
    }

    /// A pod of `service` on this node exported spans: it records them.
    pub fn exported(&mut self, service: &str, now_ns: u64) {
        if let Some(w) = self.watch(service, now_ns) {
            w.exports += 1;
        }
    }

    /// A pod of `service` here, serving a request, called on in the same
    /// trace under a span id of its own: it makes spans.
    pub fn continued(&mut self, service: &str, now_ns: u64) {
        if let Some(w) = self.watch(service, now_ns) {
            w.continued += 1;
        }
    }

    /// What the wire shows of `service` here at `now_ns`.
    pub fn status(&self, service: &str, now_ns: u64) -> Status {
        let Some(w) = self.services.get(service) else {
            return Status::Unknown { sampled: 0 };
        };
        if w.exports > 0 {
            return Status::Exporting { exports: w.exports };
        }
        if w.continued > 0 {
            return Status::MakesSpans {
                continued: w.continued,
            };
        }
        let over = Duration::from_nanos(now_ns.saturating_sub(w.first_ns));
        if w.sampled >= self.config.requests && over >= self.config.after {
            Status::LikelySilent {
                sampled: w.sampled,
                over,
            }
        } else {
            Status::Unknown { sampled: w.sampled }
        }
    }

    /// Every service watched, by name, with its status.
    pub fn statuses(&self, now_ns: u64) -> Vec<(String, Status)> {
        let mut out: Vec<(String, Status)> = self
            .services
            .keys()
            .map(|s| (s.clone(), self.status(s, now_ns)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_service_is_likely_silent_after_enough_requests_over_enough_time_until_it_exports() {
        let mut s = Silence::new(SilenceConfig {
            after: Duration::from_secs(60),
            requests: 3,
        });
        assert_eq!(s.status("nginx", 0), Status::Unknown { sampled: 0 });
        for t in [10, 20, 30] {
            s.served("nginx", t * S);
        }
        // Enough requests, not yet long enough.
        assert_eq!(s.status("nginx", 50 * S), Status::Unknown { sampled: 3 });
        // Long enough since the first.
        assert_eq!(
            s.status("nginx", 70 * S),
            Status::LikelySilent {
                sampled: 3,
                over: Duration::from_secs(60)
            }
        );
        // Redeployed with an SDK: its first export flips it.
        s.exported("nginx", 80 * S);
        assert_eq!(s.status("nginx", 90 * S), Status::Exporting { exports: 1 });
        // Calls under span ids of its own: it makes spans.
        s.served("sampler-off", 0);
        s.served("sampler-off", 0);
        s.continued("sampler-off", 0);
        s.served("sampler-off", 0);
        assert_eq!(
            s.status("sampler-off", 600 * S),
            Status::MakesSpans { continued: 1 }
        );
        // Long enough, too few requests.
        s.served("quiet", 0);
        assert_eq!(s.status("quiet", 600 * S), Status::Unknown { sampled: 1 });
        let names: Vec<String> = s.statuses(0).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["nginx", "quiet", "sampler-off"]);
    }

    #[test]
    fn an_export_before_any_request_counts_and_the_table_is_bounded() {
        let mut s = Silence::new(SilenceConfig::default());
        s.exported("api", 0);
        for i in 0..10 {
            s.served("api", i * 60 * S);
        }
        assert_eq!(s.status("api", 3600 * S), Status::Exporting { exports: 1 });
        for i in 0..(MAX_SERVICES + 10) {
            s.served(&format!("svc-{i}"), 0);
        }
        assert_eq!(s.services.len(), MAX_SERVICES);
    }
}
