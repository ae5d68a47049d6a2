//! Loading tracegap's kernel programs and attaching them to interfaces.
//!
//! The object is built by `build.rs` and embedded in the binary. Everything
//! attached is owned by [`Observer`]: dropping it detaches every program
//! (aya detaches a program's links when the program is dropped), which is
//! how SIGTERM and SIGINT leave the node clean.

mod attach;
pub mod btf;
mod counters;
pub mod kernel_log;
pub mod ssl;
pub mod threads;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray, RingBuf},
    programs::{ProgramError, ProgramFd, SchedClassifier},
};
use thiserror::Error;

pub use attach::{AttachMode, Attached};
pub use counters::Counters;
pub use kernel_log::KernelLog;

/// Names of the programs in the object, with the hook each runs on.
pub const INGRESS_PROGRAM: &str = "tracegap_ingress";
pub const EGRESS_PROGRAM: &str = "tracegap_egress";
/// The program that logs the diagnostics the TC pair noted, tail-called
/// by them through [`DIAG_PROGRAMS`]; loaded only with the log on.
pub const DIAGNOSE_PROGRAM: &str = "tracegap_diagnose";
const DIAG_PROGRAMS: &str = "DIAG_PROGRAMS";

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracegap"));

/// Errors from loading and attaching the kernel programs.
#[derive(Debug, Error)]
pub enum Error {
    /// The binary was built with `AYA_BUILD_SKIP` and carries no programs.
    #[error(
        "this tracegap binary was built without its eBPF programs (AYA_BUILD_SKIP); \
         rebuild with `cargo xtask build`"
    )]
    NoObject,
    /// The embedded object could not be parsed or its maps created.
    #[error("loading the eBPF object: {0}")]
    Object(#[from] Box<aya::EbpfError>),
    /// A program the agent needs is not in the object.
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    /// A map the agent needs is not in the object or has another type.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A map the agent needs is not in the object.
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    /// The kernel refused a program: the verifier's log says why.
    #[error("the kernel rejected program {program}: {source}")]
    Load {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching to or detaching from an interface failed.
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    /// Attaching or detaching the thread programs' pair failed.
    #[error("the thread programs: {0}")]
    ThreadPrograms(String),
    /// The programs' log ring could not be read.
    #[error(transparent)]
    KernelLog(#[from] kernel_log::Error),
}

/// What [`Observer::load_with`] loads, and how; the default is what
/// [`Observer::load`] loads.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Attach the thread programs too.
    pub thread_evidence: bool,
    /// What the kernel programs log ([`kernel_log`]).
    pub kernel_log: KernelLog,
    /// Load OpenSSL's uprobes and the pair that names their connections
    /// ([`ssl`]). Attached per file with [`Observer::probe_openssl`].
    pub tls_plaintext: bool,
    /// Steps switched off ([`tracegap_common::ablate`] bits): how the bench
    /// measures what each step costs. Never set by the agent.
    pub ablate: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            thread_evidence: true,
            kernel_log: KernelLog::Off,
            tls_plaintext: true,
            ablate: 0,
        }
    }
}

/// The loaded programs, their maps and the interfaces they are attached to.
pub struct Observer {
    ebpf: Ebpf,
    attached: attach::Attachments,
    threads: threads::Evidence,
    /// Whether the thread programs memoize sockets that are no relay's.
    memo: bool,
    /// The thread programs' send and receive links.
    thread_links: threads::Links,
    /// The programs' log, until taken (None: off).
    kernel_log: Option<kernel_log::Reader>,
    /// Whether [`DIAGNOSE_PROGRAM`] is loaded (the log is on).
    diagnose: bool,
    /// OpenSSL's uprobes and the files they are on.
    openssl: ssl::Probes,
    /// Why they are not loaded.
    openssl_unavailable: Option<String>,
}

/// Puts [`DIAGNOSE_PROGRAM`], loaded as `fd`, where the TC pair's tail
/// call finds it.
fn hand_diagnostics_over(ebpf: &mut Ebpf, fd: &ProgramFd) -> Result<(), Error> {
    let map_err = |source| Error::Map {
        name: DIAG_PROGRAMS,
        source: Box::new(source),
    };
    let map = ebpf
        .map_mut(DIAG_PROGRAMS)
        .ok_or(Error::MissingMap(DIAG_PROGRAMS))?;
    ProgramArray::try_from(map)
        .map_err(map_err)?
        .set(0, fd, 0)
        .map_err(map_err)
}

impl Observer {
    /// Loads the embedded programs into the kernel, without attaching them.
    pub fn load() -> Result<Self, Error> {
        Self::load_with(LoadOptions::default())
    }

    /// Loads the embedded programs as `options` say.
    pub fn load_with(options: LoadOptions) -> Result<Self, Error> {
        Self::load_object_with(OBJECT, options)
    }

    /// Loads programs from another object with the same program names:
    /// how the tests make the kernel refuse a program on purpose.
    pub fn load_object(object: &[u8]) -> Result<Self, Error> {
        Self::load_object_with(object, LoadOptions::default())
    }

    /// Loads the embedded programs with some of their steps switched off
    /// ([`tracegap_common::ablate`] bits), and no thread programs.
    pub fn load_ablated(ablate: u32) -> Result<Self, Error> {
        Self::load_with(LoadOptions {
            thread_evidence: false,
            tls_plaintext: false,
            ablate,
            ..LoadOptions::default()
        })
    }

    fn load_object_with(object: &[u8], options: LoadOptions) -> Result<Self, Error> {
        let LoadOptions {
            thread_evidence: with_threads,
            kernel_log,
            tls_plaintext,
            ablate,
        } = options;
        if object.is_empty() {
            return Err(Error::NoObject);
        }
        // The thread programs read `struct sock` where this kernel has its
        // fields; without them they are not attached.
        let offsets = btf::SockOffsets::from_kernel();
        let globals = offsets.as_ref().map(btf::SockOffsets::globals).ok();
        let offsets_found = offsets
            .map(|_| ())
            .map_err(|e| format!("struct sock's layout: {e}"));
        let mut loader = EbpfLoader::new();
        if ablate != 0 {
            loader.override_global("ABLATE", &ablate, true);
        }
        // Always set: aya-log's own default is every level. An object
        // without it logs nothing (the verifier-rejection test's); that
        // "off" really is off is what the hostile test's quiet round checks.
        let level = kernel_log.level();
        loader.override_global(aya_log::LEVEL, &level, false);
        for (name, offset) in globals.iter().flatten() {
            loader.override_global(name, offset, false);
        }
        let mut ebpf = loader.load(object).map_err(Box::new)?;
        let diagnose = kernel_log != KernelLog::Off;
        let programs: &[&'static str] = if diagnose {
            &[INGRESS_PROGRAM, EGRESS_PROGRAM, DIAGNOSE_PROGRAM]
        } else {
            &[INGRESS_PROGRAM, EGRESS_PROGRAM]
        };
        let mut diagnose_fd = None;
        for &name in programs {
            let load_err = |source| Error::Load {
                program: name,
                source: Box::new(source),
            };
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram(name))?
                .try_into()
                .map_err(load_err)?;
            program.load().map_err(load_err)?;
            if name == DIAGNOSE_PROGRAM {
                let fd = program.fd().map_err(load_err)?;
                let fd = fd
                    .try_clone()
                    .map_err(|e| load_err(ProgramError::IOError(e)))?;
                diagnose_fd = Some(fd);
            }
            // How close the programs come to the verifier's 1M-instruction
            // bound on this kernel: the first thing to look at when a
            // change or an older kernel is near it.
            if let Ok(info) = program.info() {
                tracing::debug!(
                    program = name,
                    verified_instructions = info.verified_instruction_count(),
                    "loaded"
                );
            }
        }
        if let Some(fd) = &diagnose_fd {
            hand_diagnostics_over(&mut ebpf, fd)?;
        }
        let kernel_log = match kernel_log {
            KernelLog::Off => None,
            _ => Some(kernel_log::Reader::take(&mut ebpf)?),
        };
        let (threads, memo, thread_links) = if with_threads {
            threads::attach(&mut ebpf, offsets_found.clone())
        } else {
            (
                threads::Evidence::Unavailable("switched off (--thread-evidence=false)".into()),
                false,
                threads::Links::default(),
            )
        };
        match &threads {
            threads::Evidence::Unavailable(why) => tracing::warn!(
                %why,
                "no thread evidence: a service's calls are related to the requests it serves by the wire alone"
            ),
            e => tracing::info!(source = e.as_str(), memo, "thread evidence attached"),
        }
        let mut openssl = ssl::Probes::default();
        let mut openssl_unavailable = (!tls_plaintext).then(|| "switched off".to_owned());
        if tls_plaintext && let Err(e) = openssl.load(&mut ebpf, offsets_found.clone()) {
            tracing::warn!(error = %e, "no OpenSSL plaintext: HTTPS is counted, not read");
            openssl_unavailable = Some(e.to_string());
        }
        Ok(Self {
            ebpf,
            attached: attach::Attachments::new(AttachMode::detect()),
            threads,
            memo,
            thread_links,
            kernel_log,
            diagnose,
            openssl,
            openssl_unavailable,
        })
    }

    /// Why OpenSSL's probes are not loaded (None: they are).
    pub fn openssl_unavailable(&self) -> Option<&str> {
        self.openssl_unavailable.as_deref()
    }

    /// Whether OpenSSL's probes are loaded, ready to attach to libraries.
    pub fn reads_openssl(&self) -> bool {
        self.openssl.loaded()
    }

    /// Probes the OpenSSL library `file`, opened at `path` (through the
    /// mapping process's root): every process that maps it is read.
    /// Returns how many of its functions were probed.
    pub fn probe_openssl(
        &mut self,
        file: ssl::FileId,
        path: &std::path::Path,
    ) -> Result<usize, ssl::Error> {
        self.openssl.attach(&mut self.ebpf, file, path)
    }

    /// Removes the probes from `file`.
    pub fn unprobe_openssl(&mut self, file: ssl::FileId) {
        self.openssl.detach(&mut self.ebpf, file);
    }

    /// The OpenSSL library files probed.
    pub fn openssl_files(&self) -> Vec<ssl::FileId> {
        self.openssl.files().copied().collect()
    }

    /// Detaches the thread programs' send and receive pair (`false`) or
    /// attaches it again, loaded and verified once: what they cost every
    /// socket operation on the node is measured against none, in the same
    /// run. Their maps and memo stay (see [`threads::Links`]).
    pub fn set_thread_programs(&mut self, on: bool) -> Result<(), Error> {
        let done = if on {
            self.thread_links.attach(&mut self.ebpf, &self.threads)
        } else {
            self.thread_links.detach(&mut self.ebpf)
        };
        done.map_err(Error::ThreadPrograms)
    }

    /// Where the threads' turns come from on this kernel.
    pub fn thread_evidence(&self) -> &threads::Evidence {
        &self.threads
    }

    /// The programs loaded: the TC pair, and the thread pair in use.
    fn programs(&self) -> impl Iterator<Item = &'static str> + use<> {
        let threads: &'static [&'static str] = match self.threads {
            threads::Evidence::Tracepoints => &[threads::SOCK_SEND, threads::SOCK_RECV],
            threads::Evidence::Fexit => &[threads::TCP_SENDMSG, threads::TCP_RECVMSG],
            threads::Evidence::Unavailable(_) => &[],
        };
        let memo: &'static [&'static str] = if self.memo {
            &[threads::SOCK_STATE]
        } else {
            &[]
        };
        let diagnose = self.diagnose.then_some(DIAGNOSE_PROGRAM);
        [INGRESS_PROGRAM, EGRESS_PROGRAM]
            .into_iter()
            .chain(diagnose)
            .chain(self.openssl.programs())
            .chain(threads.iter().copied())
            .chain(memo.iter().copied())
    }

    /// Instructions the verifier walked to accept each program (None: the
    /// kernel does not say, before 5.16): how far it is from the
    /// 1M-instruction bound.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        self.programs()
            .map(|name| {
                let n = self
                    .ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .and_then(|i| i.verified_instruction_count());
                (name, n)
            })
            .collect()
    }

    /// How programs are attached on this kernel.
    pub fn attach_mode(&self) -> AttachMode {
        self.attached.mode()
    }

    /// Attaches both programs (ingress and egress) to `iface`. Attaching an
    /// interface twice is a no-op.
    pub fn attach(&mut self, iface: &str) -> Result<Attached, Error> {
        Ok(self.attached.attach(&mut self.ebpf, iface)?)
    }

    /// Detaches both programs from `iface`, if attached. An interface that
    /// has gone away has taken its links with it: that is not an error.
    pub fn detach(&mut self, iface: &str) -> Result<(), Error> {
        Ok(self.attached.detach(&mut self.ebpf, iface)?)
    }

    /// Detaches from the interface with this index, whatever its name is
    /// now; returns the name it was attached under, if it was attached.
    pub fn detach_index(&mut self, index: u32) -> Result<Option<String>, Error> {
        Ok(self.attached.detach_index(&mut self.ebpf, index)?)
    }

    /// Interfaces the programs are attached to, by name.
    pub fn interfaces(&self) -> Vec<String> {
        self.attached.interfaces()
    }

    /// Takes the ring buffer the programs send events through. Only the
    /// first call succeeds: there is one reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, Error> {
        self.take_map("EVENTS")
    }

    /// Takes the map `name` out of the loaded object, as the kind `T`.
    fn take_map<T>(&mut self, name: &'static str) -> Result<T, Error>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
        T::try_from(map).map_err(|source| Error::Map {
            name,
            source: Box::new(source),
        })
    }

    /// Takes the reader of the programs' log, if they log: whoever takes
    /// it reads it ([`kernel_log::Reader::drain`]) while they run.
    pub fn take_kernel_log(&mut self) -> Option<kernel_log::Reader> {
        self.kernel_log.take()
    }

    /// Takes the map of relays the thread programs ask (see
    /// [`threads::Relays`]); None when they are not attached.
    pub fn take_relays(&mut self) -> Result<Option<threads::Relays>, Error> {
        if matches!(self.threads, threads::Evidence::Unavailable(_)) {
            return Ok(None);
        }
        let epoch = if self.memo {
            Some(self.take_map(threads::RELAY_EPOCH)?)
        } else {
            None
        };
        Ok(Some(threads::Relays::new(
            self.take_map(threads::RELAYS)?,
            self.take_map(threads::RELAY_FILTER)?,
            epoch,
        )))
    }

    /// One of the loaded programs ([`INGRESS_PROGRAM`], [`EGRESS_PROGRAM`]),
    /// e.g. to run it on a packet with `BPF_PROG_TEST_RUN`.
    pub fn classifier(&self, name: &'static str) -> Result<&SchedClassifier, Error> {
        self.ebpf
            .program(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Load {
                program: name,
                source: Box::new(source),
            })
    }

    /// Each program's total run time and run count since statistics were
    /// enabled ([`aya::sys::enable_stats`]; zero while they are off).
    pub fn program_stats(&self) -> Result<Vec<(&'static str, std::time::Duration, u64)>, Error> {
        let mut out = Vec::new();
        for name in self.programs() {
            let program = self.ebpf.program(name).ok_or(Error::MissingProgram(name))?;
            let info = program.info().map_err(|source| Error::Load {
                program: name,
                source: Box::new(source),
            })?;
            out.push((name, info.run_time(), info.run_count()));
        }
        Ok(out)
    }

    /// The kernel-side counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        counters::read(&self.ebpf)
    }

    /// Detaches everything. Dropping the observer does the same; this
    /// reports failures instead of only logging them.
    pub fn detach_all(&mut self) -> Result<(), Error> {
        self.openssl.detach_all(&mut self.ebpf);
        Ok(self.attached.detach_all(&mut self.ebpf)?)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.openssl.detach_all(&mut self.ebpf);
        if let Err(e) = self.attached.detach_all(&mut self.ebpf) {
            tracing::warn!(error = %e, "detaching programs");
        }
    }
}
