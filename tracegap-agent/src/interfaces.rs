//! Keeps the programs attached to the interfaces the user selected: a fixed
//! list, or every interface matching the pod-veth patterns, present now or
//! appearing later.

use crate::{
    discover::{self, LinkChange, LinkWatcher, Patterns},
    ebpf::{self, Observer},
};

/// Errors from selecting interfaces.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An interface named on the command line could not be attached.
    #[error("attaching to {iface}: {source}")]
    Explicit {
        iface: String,
        #[source]
        source: ebpf::Error,
    },
    /// Interfaces could not be discovered.
    #[error(transparent)]
    Discover(#[from] discover::Error),
}

/// Which interfaces to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Exactly these; failing to attach one is a start-up error.
    Explicit(Vec<String>),
    /// Every interface whose name matches, as long as it exists.
    Discover(Patterns),
}

/// The interface half of the agent's loop.
pub struct Interfaces {
    watcher: Option<LinkWatcher>,
}

impl Interfaces {
    /// Attaches to the selection as it is now.
    pub async fn start(observer: &mut Observer, selection: Selection) -> Result<Self, Error> {
        match selection {
            Selection::Explicit(names) => {
                for iface in names {
                    observer
                        .attach(&iface)
                        .map_err(|source| Error::Explicit { iface, source })?;
                }
                Ok(Self { watcher: None })
            }
            Selection::Discover(patterns) => {
                tracing::info!(%patterns, "discovering interfaces");
                let mut watcher = LinkWatcher::start(patterns).await?;
                // Apply what exists now before the first packet is read.
                while let Some(change) = watcher.next_queued() {
                    apply(observer, change);
                }
                Ok(Self {
                    watcher: Some(watcher),
                })
            }
        }
    }

    /// Waits for the next change to apply; never returns for a fixed list,
    /// nor after the netlink connection has ended (which is logged).
    pub async fn changed(&mut self) -> LinkChange {
        if let Some(w) = self.watcher.as_mut() {
            if let Some(change) = w.next().await {
                return change;
            }
            tracing::error!("netlink connection ended: new interfaces will not be attached");
            self.watcher = None;
        }
        std::future::pending().await
    }
}

/// Attaches to a matching interface or forgets one that went away. Failures
/// are logged, not fatal: an interface can vanish between the two.
pub fn apply(observer: &mut Observer, change: LinkChange) {
    match change {
        LinkChange::Present { name, .. } => {
            if let Err(e) = observer.attach(&name) {
                tracing::warn!(iface = %name, error = %e, "cannot attach");
            }
        }
        LinkChange::Gone { index, name } => match observer.detach_index(index) {
            Ok(Some(_)) => tracing::info!(iface = %name, index, "interface gone or renamed"),
            Ok(None) => {}
            Err(e) => tracing::warn!(iface = %name, error = %e, "detaching"),
        },
    }
}
