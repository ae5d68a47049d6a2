//! Which context formats each service reads, learned from what it sends.
//!
//! A service that received a context in one format and called on in the
//! same trace reads that format. One that received it and called on in a
//! new trace in another format does not (the engine calls that hop a
//! `format_mismatch`). Once a service is known not to read a format, and
//! never seen to read it, a request into it that carries only formats it
//! does not read is a `format_mismatch` too, though its caller propagated:
//! the callee's trace starts over there.

use std::collections::HashMap;

use super::{GapKind, Hop, Verdict};
use crate::http::context::{Format, Found};

/// Services remembered at most (forgotten all at once past it, then
/// learnt again).
const MAX_SERVICES: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// Formats continued (bit per [`Format`]).
    read: u32,
    /// Formats received and followed by a new trace in another format.
    ignored: u32,
}

fn bit(f: Format) -> u32 {
    1 << (f as u32)
}

/// What the services have shown of the formats they read.
#[derive(Debug, Default)]
pub struct FormatsRead {
    services: HashMap<String, Seen>,
}

impl FormatsRead {
    /// Learns from `verdict`, the classification of a call `service` made.
    pub fn learn(&mut self, service: &str, hop: &Hop, verdict: &Verdict) {
        let Some(link) = verdict.link.as_ref().filter(|l| l.confidence.places()) else {
            return;
        };
        let received = link.context.format;
        let continued = hop
            .context()
            .is_some_and(|c| c.trace_id == link.context.trace_id);
        let ignored = verdict.kind == GapKind::FormatMismatch
            && hop.context().is_some_and(|c| c.format != received);
        if !continued && !ignored {
            return;
        }
        if self.services.len() >= MAX_SERVICES && !self.services.contains_key(service) {
            self.services.clear();
        }
        let seen = self.services.entry(service.to_owned()).or_default();
        if continued {
            seen.read |= bit(received);
        } else {
            seen.ignored |= bit(received);
        }
    }

    /// The formats `service` was seen not to read and never to read.
    fn ignores(&self, service: &str, f: Format) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.ignored & bit(f) != 0 && s.read & bit(f) == 0)
    }

    /// A hop whose callee was seen not to read any format it carries:
    /// `format_mismatch`, where the engine (which knows formats, not
    /// services) found a valid context.
    pub fn judge(&self, callee: &str, hop: &Hop, verdict: &mut Verdict) {
        if verdict.kind != GapKind::ContextOk {
            return;
        }
        let mut sent = hop.propagation().contexts.iter().filter_map(|c| match c {
            Found::Valid(c) => Some(c.format),
            _ => None,
        });
        let Some(first) = sent.next() else { return };
        if !self.ignores(callee, first) || !sent.all(|f| self.ignores(callee, f)) {
            return;
        }
        let read: Vec<&str> = self.services.get(callee).map_or(Vec::new(), |s| {
            Format::ALL
                .into_iter()
                .filter(|f| s.read & bit(*f) != 0)
                .map(|f| f.as_str())
                .collect()
        });
        verdict.kind = GapKind::FormatMismatch;
        verdict.detail = format!(
            "callee does not read {} (it received {} before and called on in a new trace){}",
            first.as_str(),
            first.as_str(),
            if read.is_empty() {
                String::new()
            } else {
                format!("; it reads {}", read.join(", "))
            }
        )
        .into();
    }
}
