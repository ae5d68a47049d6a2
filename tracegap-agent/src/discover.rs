//! Which interfaces to watch: an explicit list, or the host side of pod
//! veths found by name and followed through netlink as pods come and go.
//!
//! CNIs name the host end of a pod's veth predictably (`veth*` for bridge
//! and flannel, `cali*` for Calico, `lxc*` for Cilium, `cni*` for some
//! others), so a name pattern is how a DaemonSet finds them without knowing
//! the CNI. Watching RTNLGRP_LINK rather than polling means a pod's first
//! request is seen: the programs are attached as soon as the link exists.

use std::collections::VecDeque;

use futures::StreamExt as _;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
    },
    proto::sys::{AsyncSocket as _, SocketAddr},
};
use thiserror::Error;

/// Name patterns of pod veths' host ends under the common CNIs.
pub const DEFAULT_PATTERNS: [&str; 4] = ["veth*", "cali*", "lxc*", "cni*"];

/// Errors from watching links.
#[derive(Debug, Error)]
pub enum Error {
    /// The netlink socket could not be opened or subscribed.
    #[error("opening a netlink socket to watch interfaces: {0}")]
    Socket(#[source] std::io::Error),
    /// The initial dump of the interfaces failed.
    #[error("listing interfaces over netlink: {0}")]
    Dump(#[source] rtnetlink::Error),
}

/// Shell-style name patterns: `*` matches any run of characters, `?` one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patterns(Vec<String>);

impl Patterns {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        Self(patterns.iter().map(|p| p.as_ref().to_owned()).collect())
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

impl std::fmt::Display for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Iterative glob with single-star backtracking: linear in practice and
/// never recursive, whatever the pattern.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A change to the set of interfaces that match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// A matching interface exists (new, or seen again after a change).
    Present { index: u32, name: String },
    /// An interface went away; `name` is its last known name.
    Gone { index: u32, name: String },
}

/// Follows the node's interfaces over netlink and reports those whose name
/// matches. Subscribes before it lists, so no link slips between the two.
pub struct LinkWatcher {
    patterns: Patterns,
    messages: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
        SocketAddr,
    )>,
    queued: VecDeque<LinkChange>,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for LinkWatcher {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

impl LinkWatcher {
    /// Subscribes to link changes and queues every matching interface that
    /// exists now.
    pub async fn start(patterns: Patterns) -> Result<Self, Error> {
        let (mut connection, handle, messages) =
            rtnetlink::new_connection().map_err(Error::Socket)?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))
            .map_err(Error::Socket)?;
        let connection = tokio::spawn(connection);
        let mut queued = VecDeque::new();
        let mut links = handle.link().get().execute();
        while let Some(link) = links.next().await {
            let link = link.map_err(Error::Dump)?;
            if let Some(name) = name_of(&link).filter(|n| patterns.matches(n)) {
                queued.push_back(LinkChange::Present {
                    index: link.header.index,
                    name: name.to_owned(),
                });
            }
        }
        Ok(Self {
            patterns,
            messages,
            queued,
            connection,
        })
    }

    /// A change found by the initial listing and not yet taken.
    pub fn next_queued(&mut self) -> Option<LinkChange> {
        self.queued.pop_front()
    }

    /// The next change; `None` when the netlink connection has ended.
    pub async fn next(&mut self) -> Option<LinkChange> {
        loop {
            if let Some(change) = self.queued.pop_front() {
                return Some(change);
            }
            let (message, _) = self.messages.next().await?;
            let NetlinkPayload::InnerMessage(inner) = message.payload else {
                continue;
            };
            let (link, gone) = match inner {
                RouteNetlinkMessage::NewLink(l) => (l, false),
                RouteNetlinkMessage::DelLink(l) => (l, true),
                _ => continue,
            };
            let Some(name) = name_of(&link) else { continue };
            // A link renamed away from a pattern is reported gone; the
            // caller forgets it by index either way.
            let index = link.header.index;
            let name = name.to_owned();
            if gone {
                return Some(LinkChange::Gone { index, name });
            }
            if self.patterns.matches(&name) {
                return Some(LinkChange::Present { index, name });
            }
            return Some(LinkChange::Gone { index, name });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_a_shell() {
        let p = Patterns::new(&DEFAULT_PATTERNS);
        for yes in [
            "veth1a2b3c",
            "cali0123456789a",
            "lxc_health",
            "cni0",
            "veth",
        ] {
            assert!(p.matches(yes), "{yes}");
        }
        for no in ["eth0", "lo", "docker0", "myveth", "flannel.1", ""] {
            assert!(!p.matches(no), "{no}");
        }
        let p = Patterns::new(&["tg?v*p*", "exact"]);
        assert!(p.matches("tgAvxyzp1"));
        assert!(p.matches("tgAvp"));
        assert!(!p.matches("tgvp1"));
        assert!(p.matches("exact"));
        assert!(!p.matches("exactly"));
        assert!(Patterns::new(&["*"]).matches(""));
        assert!(Patterns::new(&["a*b*c"]).matches("axxbyybzc"));
        assert!(!Patterns::new(&["a*b*c"]).matches("axxbyyb"));
    }
}
