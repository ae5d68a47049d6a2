//! OpenSSL's uprobes (`tracegap-ebpf/src/ssl.rs`): loaded once, attached
//! per library file, each of [`tracegap_common::ssl::FUNCTIONS`] the file
//! exports getting the entry and the return program with the function's
//! cookie; and the pair on socket sends and receives that names their
//! connections (raw tracepoints, else `fexit`), attached with them. A uprobe is set on the file (its inode), so every process that
//! maps it, now or later, is read; which files the node's processes map is
//! [`crate::libssl`]'s to find.

use std::{collections::HashMap, path::Path};

use aya::{
    Btf, Ebpf,
    programs::{
        FExit, RawTracePoint, UProbe,
        fexit::FExitLinkId,
        raw_trace_point::RawTracePointLinkId,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use thiserror::Error;
use tracegap_common::ssl::FUNCTIONS;

pub const ENTER_PROGRAM: &str = "tracegap_ssl_enter";
pub const RETURN_PROGRAM: &str = "tracegap_ssl_return";
/// The naming pair, on this kernel's socket tracepoints (6.3 on) ...
const TRACEPOINTS: [(&str, &str); 2] = [
    ("tracegap_ssl_sock_send", "sock_send_length"),
    ("tracegap_ssl_sock_recv", "sock_recv_length"),
];
/// ... or on TCP's own send and receive.
const FEXITS: [(&str, &str); 2] = [
    ("tracegap_ssl_tcp_sendmsg", "tcp_sendmsg"),
    ("tracegap_ssl_tcp_recvmsg", "tcp_recvmsg"),
];

/// A library file: its device and inode, as `/proc/PID/maps` names them.
pub type FileId = (u64, u64);

#[derive(Debug, Error)]
pub enum Error {
    #[error("loading {program}: {source}")]
    Load {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("{path}: none of {FUNCTIONS:?} could be probed ({why})")]
    NoFunction { path: String, why: String },
    #[error("no program can name OpenSSL's connections: {0}")]
    Naming(String),
}

/// The programs' links on each file.
#[derive(Default)]
pub struct Probes {
    loaded: bool,
    /// The naming pair's programs, as loaded (the route this kernel takes).
    naming: Vec<&'static str>,
    /// Their links: attached while a file is probed, so a node whose agent
    /// may not set uprobes (no CAP_SYS_ADMIN) pays nothing on its sockets.
    naming_links: Vec<NamingLink>,
    files: HashMap<FileId, Vec<(&'static str, UProbeLinkId)>>,
}

enum NamingLink {
    Tracepoint(&'static str, RawTracePointLinkId),
    Fexit(&'static str, FExitLinkId),
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::Missing(name))?
        .try_into()
        .map_err(|source| Error::Load {
            program: name,
            source: Box::new(source),
        })
}

impl Probes {
    /// Loads the probes (the verifier walks them here) and the naming
    /// pair, which reads `struct sock` at the offsets found in the
    /// kernel's BTF (`offsets_found`); the pair is attached once to find
    /// the route this kernel offers, and again while a file is probed.
    pub fn load(
        &mut self,
        ebpf: &mut Ebpf,
        offsets_found: Result<(), String>,
    ) -> Result<(), Error> {
        offsets_found.map_err(Error::Naming)?;
        let links = attach_naming(ebpf).map_err(Error::Naming)?;
        self.naming = links.iter().map(NamingLink::name).collect();
        detach_naming(ebpf, links);
        for name in [ENTER_PROGRAM, RETURN_PROGRAM] {
            program(ebpf, name)?.load().map_err(|source| Error::Load {
                program: name,
                source: Box::new(source),
            })?;
        }
        self.loaded = true;
        Ok(())
    }

    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// The programs loaded: the probes and the naming pair.
    pub fn programs(&self) -> Vec<&'static str> {
        if !self.loaded {
            return Vec::new();
        }
        let mut p = vec![ENTER_PROGRAM, RETURN_PROGRAM];
        p.extend(&self.naming);
        p
    }

    /// The files probed.
    pub fn files(&self) -> impl Iterator<Item = &FileId> {
        self.files.keys()
    }

    /// Probes every function of [`FUNCTIONS`] that the library at `path`
    /// exports (OpenSSL 1.1.0 has no `_ex` calls); returns how many. A
    /// file already probed is left as it is.
    pub fn attach(&mut self, ebpf: &mut Ebpf, file: FileId, path: &Path) -> Result<usize, Error> {
        if let Some(links) = self.files.get(&file) {
            return Ok(links.len() / 2);
        }
        let mut links = Vec::new();
        let mut why = String::new();
        for (cookie, function) in FUNCTIONS.iter().enumerate() {
            let mut pair = Vec::with_capacity(2);
            for name in [ENTER_PROGRAM, RETURN_PROGRAM] {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::Symbol(function),
                    cookie: Some(cookie as u64),
                };
                match program(ebpf, name)?.attach(point, path, UProbeScope::AllProcesses) {
                    Ok(id) => pair.push((name, id)),
                    Err(e) => {
                        why = format!("{function}: {}", chain(&e));
                        break;
                    }
                }
            }
            if pair.len() == 2 {
                links.extend(pair);
            } else {
                // One of the pair without the other would keep calls that
                // never return, or returns without a call: neither.
                detach_links(ebpf, pair);
            }
        }
        if links.is_empty() {
            return Err(Error::NoFunction {
                path: path.display().to_string(),
                why,
            });
        }
        let n = links.len() / 2;
        self.files.insert(file, links);
        if self.naming_links.is_empty() {
            match reattach_naming(ebpf, &self.naming) {
                Ok(l) => self.naming_links = l,
                Err(e) => tracing::warn!(error = %e, "OpenSSL's connections cannot be named"),
            }
        }
        Ok(n)
    }

    /// Removes the probes from a file (no process maps it any more).
    pub fn detach(&mut self, ebpf: &mut Ebpf, file: FileId) {
        if let Some(links) = self.files.remove(&file) {
            detach_links(ebpf, links);
        }
        if self.files.is_empty() {
            detach_naming(ebpf, std::mem::take(&mut self.naming_links));
        }
    }

    /// Removes every probe.
    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        let files: Vec<_> = self.files.keys().copied().collect();
        for f in files {
            self.detach(ebpf, f);
        }
    }
}

impl NamingLink {
    fn name(&self) -> &'static str {
        match self {
            Self::Tracepoint(n, _) | Self::Fexit(n, _) => n,
        }
    }
}

/// Attaches the loaded naming pair `names` again.
fn reattach_naming(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<Vec<NamingLink>, String> {
    let mut links = Vec::new();
    for &name in names {
        let link = if let Some((_, tp)) = TRACEPOINTS.iter().find(|(n, _)| *n == name) {
            let p: &mut RawTracePoint = super::threads::program(ebpf, name)?;
            NamingLink::Tracepoint(name, p.attach(tp).map_err(|e| format!("{tp}: {e}"))?)
        } else {
            let p: &mut FExit = super::threads::program(ebpf, name)?;
            NamingLink::Fexit(name, p.attach().map_err(|e| format!("{name}: {e}"))?)
        };
        links.push(link);
    }
    Ok(links)
}

fn detach_naming(ebpf: &mut Ebpf, links: Vec<NamingLink>) {
    for link in links {
        let done = match link {
            NamingLink::Tracepoint(name, id) => {
                super::threads::program::<RawTracePoint>(ebpf, name)
                    .and_then(|p| p.detach(id).map_err(|e| format!("{name}: {e}")))
            }
            NamingLink::Fexit(name, id) => super::threads::program::<FExit>(ebpf, name)
                .and_then(|p| p.detach(id).map_err(|e| format!("{name}: {e}"))),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "detaching the OpenSSL naming pair");
        }
    }
}

/// Loads and attaches the naming pair on the tracepoints, else on
/// `fexit`; returns its links. A pair half attached is unloaded
/// (unloading detaches).
fn attach_naming(ebpf: &mut Ebpf) -> Result<Vec<NamingLink>, String> {
    let mut links = Vec::new();
    let tracepoints = (|| -> Result<(), String> {
        for (name, tp) in TRACEPOINTS {
            let p: &mut RawTracePoint = super::threads::program(ebpf, name)?;
            p.load().map_err(|e| format!("{name}: {e}"))?;
            let id = p.attach(tp).map_err(|e| format!("{tp}: {e}"))?;
            links.push(NamingLink::Tracepoint(name, id));
        }
        Ok(())
    })();
    let why_not = match tracepoints {
        Ok(()) => return Ok(links),
        Err(e) => e,
    };
    links.clear();
    for (name, _) in TRACEPOINTS {
        if let Ok(p) = super::threads::program::<RawTracePoint>(ebpf, name) {
            let _ = p.unload();
        }
    }
    let fexits = (|| -> Result<(), String> {
        let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        for (name, function) in FEXITS {
            let p: &mut FExit = super::threads::program(ebpf, name)?;
            p.load(function, &btf).map_err(|e| format!("{name}: {e}"))?;
            let id = p.attach().map_err(|e| format!("fexit {function}: {e}"))?;
            links.push(NamingLink::Fexit(name, id));
        }
        Ok(())
    })();
    match fexits {
        Ok(()) => Ok(links),
        Err(e) => {
            for (name, _) in FEXITS {
                if let Ok(p) = super::threads::program::<FExit>(ebpf, name) {
                    let _ = p.unload();
                }
            }
            Err(format!("socket tracepoints: {why_not}; fexit: {e}"))
        }
    }
}

/// An error with its causes: aya's attach errors keep the kernel's errno
/// in their source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn detach_links(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (name, id) in links {
        let done = program(ebpf, name).and_then(|p| {
            p.detach(id).map_err(|source| Error::Load {
                program: name,
                source: Box::new(source),
            })
        });
        if let Err(e) = done {
            tracing::warn!(error = %e, "detaching an OpenSSL probe");
        }
    }
}
