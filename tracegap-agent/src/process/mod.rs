//! Identity from the process as well as the address. OpenSSL's probes run
//! in the process at each end of a connection they read, and the kernel
//! announces that process and its cgroup as the connection is named
//! ([`tracegap_common::EventKind::Owner`]): its cgroup names its pod
//! ([`cgroup`]), which names a host-network pod where its address (the
//! node's) cannot, and stands over an address that changed hands.

pub mod cgroup;

use std::sync::Arc;

use crate::events::{Endpoint, RawEvent};

pub use cgroup::{Cgroups, Origin, Unread};

/// Connection ends announced, at most this many (the oldest half is
/// dropped past it).
const MAX_ENDS: usize = 64 * 1024;

/// An end's process, as far as it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    Read(Origin),
    Unread(Unread),
}

/// The processes at the ends of the connections OpenSSL's probes read,
/// keyed by the end and its peer (a port is reused by later connections,
/// a pair seldom soon).
#[derive(Default)]
pub struct Owners {
    ends: crate::FastMap<(Endpoint, Endpoint), (Owner, u64)>,
}

impl Owners {
    /// Reads an [`tracegap_common::EventKind::Owner`] event (its flow with
    /// the process's end first) through `cgroups`; returns what it said.
    pub fn announced(&mut self, e: &RawEvent, cgroups: &mut Cgroups) -> Option<&Owner> {
        let id = u64::from_ne_bytes(e.payload.get(..8)?.try_into().ok()?);
        let owner = match cgroups.origin(id, e.seq) {
            Ok(o) => Owner::Read(o),
            Err(u) => Owner::Unread(u),
        };
        if self.ends.len() >= MAX_ENDS {
            let mut by_age: Vec<u64> = self.ends.values().map(|(_, t)| *t).collect();
            by_age.sort_unstable();
            let median = by_age[by_age.len() / 2];
            self.ends.retain(|_, (_, t)| *t > median);
        }
        let key = (e.flow.src, e.flow.dst);
        self.ends.insert(key, (owner, e.ts_ns));
        self.ends.get(&key).map(|(o, _)| o)
    }

    /// Plaintext read at one end (a write leaves its process's end first,
    /// a read arrives at its last): that end's connection is in use.
    pub fn touch(&mut self, e: &RawEvent) {
        let key = if e.direction == tracegap_common::Direction::Ingress {
            (e.flow.src, e.flow.dst)
        } else {
            (e.flow.dst, e.flow.src)
        };
        if let Some((_, t)) = self.ends.get_mut(&key) {
            *t = e.ts_ns;
        }
    }

    /// The pod of the process at `end` of its connection to `peer`, if one
    /// was announced and its cgroup names a pod.
    pub fn pod(&self, end: Endpoint, peer: Endpoint) -> Option<Arc<str>> {
        match self.ends.get(&(end, peer)) {
            Some((Owner::Read(Origin::Pod { uid, .. }), _)) => Some(uid.clone()),
            _ => None,
        }
    }

    /// Whether a process of this kernel was announced at `end`.
    pub fn announced_at(&self, end: Endpoint, peer: Endpoint) -> bool {
        self.ends.contains_key(&(end, peer))
    }

    /// Forgets ends announced before `ns` (their connections long over, or
    /// idle: a pooled connection's identity is read again only if its
    /// `SSL*` is named anew, so the cut is generous).
    pub fn forget_before(&mut self, ns: u64) {
        self.ends.retain(|_, (_, t)| *t >= ns);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}
