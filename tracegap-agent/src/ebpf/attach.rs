//! Attaching the classifiers to interfaces: TCX links where the kernel has
//! them (>= 6.6), a netlink clsact filter before that.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use thiserror::Error;

use super::{EGRESS_PROGRAM, INGRESS_PROGRAM};

/// Errors from attaching and detaching.
#[derive(Debug, Error)]
pub enum AttachError {
    /// The interface does not exist (any more).
    #[error("interface {0} not found")]
    NoInterface(String),
    /// The kernel refused to attach a program to an interface.
    #[error("attaching {program} to {iface} ({mode}): {source}")]
    Attach {
        program: &'static str,
        iface: String,
        mode: AttachMode,
        #[source]
        source: Box<ProgramError>,
    },
    /// Detaching a program from an interface that still exists failed.
    #[error("detaching {program} from {iface}: {source}")]
    Detach {
        program: &'static str,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    /// A program is not in the object (cannot happen with the embedded object).
    #[error("program {0} is not loaded")]
    NotLoaded(&'static str),
}

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// A TCX link (Linux >= 6.6): owned by this process, gone when it exits.
    Tcx,
    /// A cls_bpf filter on the clsact qdisc, through netlink (older kernels).
    Netlink,
}

impl AttachMode {
    /// TCX where the kernel has it, netlink otherwise.
    pub fn detect() -> Self {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => Self::Tcx,
            _ => Self::Netlink,
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink clsact",
        })
    }
}

/// What one attach call did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// False when the interface was already attached.
    pub new: bool,
}

struct Links {
    ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

pub(super) struct Attachments {
    mode: AttachMode,
    by_iface: BTreeMap<String, Links>,
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, AttachError> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(AttachError::NotLoaded(name))
}

pub(crate) fn ifindex(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Whether an interface with this index exists (under any name: a renamed
/// interface keeps its filters and links).
fn index_exists(index: u32) -> bool {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    !unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) }.is_null()
}

/// Removes filters an earlier agent left on `iface`. A netlink filter
/// outlives the process that attached it: after a SIGKILL or an OOM kill
/// the old programs stay in the data path, copying into a ring buffer no
/// one reads, and a restarted agent would stack a second pair. They are
/// found by the name tracegap gives them (the program's); TCX links need
/// none of this, they go with their process.
fn remove_leftovers(iface: &str) {
    for (program, hook) in [
        (INGRESS_PROGRAM, TcAttachType::Ingress),
        (EGRESS_PROGRAM, TcAttachType::Egress),
    ] {
        match tc::qdisc_detach_program(iface, hook, program) {
            Ok(()) => tracing::warn!(
                iface,
                program,
                "removed a filter left by an earlier run (killed before it could detach)"
            ),
            Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Attaching goes on: a failure to clean up must not leave the
            // interface unwatched.
            Err(e) => tracing::warn!(iface, program, error = %e, "looking for leftover filters"),
        }
    }
}

impl Attachments {
    pub(super) fn new(mode: AttachMode) -> Self {
        Self {
            mode,
            by_iface: BTreeMap::new(),
        }
    }

    pub(super) fn mode(&self) -> AttachMode {
        self.mode
    }

    pub(super) fn interfaces(&self) -> Vec<String> {
        self.by_iface.keys().cloned().collect()
    }

    pub(super) fn attach(&mut self, ebpf: &mut Ebpf, iface: &str) -> Result<Attached, AttachError> {
        let ifindex = ifindex(iface).ok_or_else(|| AttachError::NoInterface(iface.to_owned()))?;
        if let Some(links) = self.by_iface.get(iface) {
            if links.ifindex == ifindex {
                return Ok(Attached {
                    iface: iface.to_owned(),
                    ifindex,
                    mode: self.mode,
                    new: false,
                });
            }
            // Same name, new interface: the old one is gone with its links,
            // and detach() does not count that as a failure.
            let _ = self.detach(ebpf, iface);
        }
        // A renamed interface keeps its links: file them under the new name.
        if let Some(old) = self
            .by_iface
            .iter()
            .find(|(_, l)| l.ifindex == ifindex)
            .map(|(n, _)| n.clone())
            && let Some(links) = self.by_iface.remove(&old)
        {
            self.by_iface.insert(iface.to_owned(), links);
            return Ok(Attached {
                iface: iface.to_owned(),
                ifindex,
                mode: self.mode,
                new: false,
            });
        }
        if self.mode == AttachMode::Netlink {
            // Fails when the qdisc exists already, which is what we want.
            let _ = tc::qdisc_add_clsact(iface);
            remove_leftovers(iface);
        }
        let ingress = self.attach_one(ebpf, INGRESS_PROGRAM, iface, TcAttachType::Ingress)?;
        let egress = match self.attach_one(ebpf, EGRESS_PROGRAM, iface, TcAttachType::Egress) {
            Ok(id) => id,
            Err(e) => {
                if let Ok(p) = classifier(ebpf, INGRESS_PROGRAM) {
                    let _ = p.detach(ingress);
                }
                return Err(e);
            }
        };
        self.by_iface.insert(
            iface.to_owned(),
            Links {
                ifindex,
                ingress,
                egress,
            },
        );
        tracing::info!(iface, ifindex, mode = %self.mode, "attached");
        Ok(Attached {
            iface: iface.to_owned(),
            ifindex,
            mode: self.mode,
            new: true,
        })
    }

    fn attach_one(
        &self,
        ebpf: &mut Ebpf,
        program: &'static str,
        iface: &str,
        hook: TcAttachType,
    ) -> Result<SchedClassifierLinkId, AttachError> {
        let options = match self.mode {
            // Last in the chain: every other program has had its say.
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            AttachMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
        };
        classifier(ebpf, program)?
            .attach_with_options(iface, hook, options)
            .map_err(|source| AttachError::Attach {
                program,
                iface: iface.to_owned(),
                mode: self.mode,
                source: Box::new(source),
            })
    }

    pub(super) fn detach(&mut self, ebpf: &mut Ebpf, iface: &str) -> Result<(), AttachError> {
        let Some(links) = self.by_iface.remove(iface) else {
            return Ok(());
        };
        let still_there = index_exists(links.ifindex);
        let mut result = Ok(());
        for (program, id) in [
            (INGRESS_PROGRAM, links.ingress),
            (EGRESS_PROGRAM, links.egress),
        ] {
            let detached = classifier(ebpf, program).and_then(|p| {
                p.detach(id).map_err(|source| AttachError::Detach {
                    program,
                    iface: iface.to_owned(),
                    source: Box::new(source),
                })
            });
            // A vanished interface took its filters and links with it.
            if still_there && result.is_ok() {
                result = detached;
            }
        }
        tracing::info!(iface, "detached");
        result
    }

    /// Detaches whatever is attached to the interface with this index,
    /// whatever its name is now. Returns the name it was attached under.
    pub(super) fn detach_index(
        &mut self,
        ebpf: &mut Ebpf,
        index: u32,
    ) -> Result<Option<String>, AttachError> {
        let Some(name) = self
            .by_iface
            .iter()
            .find(|(_, l)| l.ifindex == index)
            .map(|(n, _)| n.clone())
        else {
            return Ok(None);
        };
        self.detach(ebpf, &name).map(|()| Some(name))
    }

    pub(super) fn detach_all(&mut self, ebpf: &mut Ebpf) -> Result<(), AttachError> {
        let mut first_error = Ok(());
        for iface in self.interfaces() {
            let r = self.detach(ebpf, &iface);
            if first_error.is_ok() {
                first_error = r;
            }
        }
        first_error
    }
}
