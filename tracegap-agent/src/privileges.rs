//! What the agent needs from the kernel's permission checks, and a plain
//! explanation when a load or attach is refused for want of it.
//!
//! The agent does not refuse to start on a missing capability: it tries,
//! and when the kernel says no, the error names what is missing. So a
//! capability the kernel turns out not to need is never demanded, and the
//! container test that removes each one in turn proves the set minimal.

use std::io;

/// A capability the agent needs, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// As in `capabilities(7)`.
    pub name: &'static str,
    /// Its bit in `CapEff`.
    pub bit: u32,
    /// What the kernel checks it for.
    pub needed_for: &'static str,
    /// Whether CAP_SYS_ADMIN stands in for it (the kernel's `bpf_capable()`
    /// and `perfmon_capable()` accept either).
    pub sys_admin_covers: bool,
}

const CAP_SYS_ADMIN: u32 = 21;

/// Exactly what the agent needs: the DaemonSet adds these and no others.
pub const REQUIRED: [Capability; 3] = [
    Capability {
        name: "CAP_BPF",
        bit: 39,
        needed_for: "creating maps and loading programs",
        sys_admin_covers: true,
    },
    Capability {
        name: "CAP_NET_ADMIN",
        bit: 12,
        needed_for: "loading TC programs, attaching them to interfaces, reading conntrack",
        sys_admin_covers: false,
    },
    Capability {
        name: "CAP_PERFMON",
        bit: 38,
        needed_for: "the verifier to accept the programs' pointer arithmetic on packet data; reading socket fields and attaching the socket tracepoints (thread turns)",
        sys_admin_covers: true,
    },
];

/// What the agent uses when it has it, and does without otherwise, saying
/// so: HTTPS through OpenSSL is then counted as unread, not read
/// (`deploy/https` adds both).
pub const OPTIONAL: [Capability; 2] = [
    Capability {
        name: "CAP_SYS_ADMIN",
        bit: CAP_SYS_ADMIN,
        needed_for: "creating uprobes on the node's OpenSSL libraries (perf_event_open asks for it since the 2025 fix to Linux's uprobe PMU; CAP_PERFMON was enough before)",
        sys_admin_covers: false,
    },
    Capability {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        needed_for: "reading the node's processes' /proc/PID/maps and /proc/PID/root, to find their OpenSSL libraries",
        sys_admin_covers: false,
    },
];

/// The calling process's effective capabilities and seccomp mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privileges {
    effective: u64,
    /// Under a seccomp filter (`Seccomp: 2`), as in a container with the
    /// runtime's default profile.
    seccomp_filtered: bool,
}

impl Privileges {
    /// This process's, from `/proc/self/status`.
    pub fn current() -> io::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        Self::parse(&status).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no CapEff in /proc/self/status")
        })
    }

    /// From the text of a `/proc/<pid>/status`.
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let effective = u64::from_str_radix(field("CapEff")?, 16).ok()?;
        let seccomp_filtered = field("Seccomp").is_some_and(|m| m == "2");
        Some(Self {
            effective,
            seccomp_filtered,
        })
    }

    fn has(&self, bit: u32) -> bool {
        self.effective & (1 << bit) != 0
    }

    /// The required capabilities this process lacks.
    pub fn missing(&self) -> Vec<Capability> {
        REQUIRED
            .into_iter()
            .filter(|c| !(self.has(c.bit) || (c.sys_admin_covers && self.has(CAP_SYS_ADMIN))))
            .collect()
    }

    /// The [`OPTIONAL`] capabilities this process lacks.
    pub fn missing_optional(&self) -> Vec<Capability> {
        OPTIONAL.into_iter().filter(|c| !self.has(c.bit)).collect()
    }

    /// Why the kernel may have refused, in the operator's terms; None when
    /// nothing here explains it.
    pub fn explanation(&self) -> Option<String> {
        let missing = self.missing();
        if !missing.is_empty() {
            let list: Vec<String> = missing
                .iter()
                .map(|c| format!("{} ({})", c.name, c.needed_for))
                .collect();
            return Some(format!(
                "missing capabilities: {}. tracegap needs CAP_BPF, CAP_NET_ADMIN and \
                 CAP_PERFMON: run it as root or grant them (Kubernetes: \
                 securityContext.capabilities.add: [BPF, NET_ADMIN, PERFMON], as \
                 deploy/base does)",
                list.join(", ")
            ));
        }
        self.seccomp_filtered.then(|| {
            "the capabilities are there (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) but a seccomp \
             filter is on (Seccomp: 2 in /proc/self/status): container runtimes' default \
             profiles (seccompProfile RuntimeDefault) often allow bpf(2) only with \
             CAP_SYS_ADMIN; run tracegap with seccompProfile Unconfined, as deploy/base does, \
             or a profile that allows bpf(2)"
                .to_owned()
        })
    }
}

/// Whether the kernel refused for want of permission somewhere in `err`'s
/// chain (EPERM or EACCES; the verifier's "prohibited for !root" is EACCES).
pub fn is_permission_error(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|code| code == libc::EPERM || code == libc::EACCES)
    })
}

/// `err`, with what is missing in front when it is a permission error that
/// this process's capabilities or seccomp filter explain.
pub fn explain(err: anyhow::Error) -> anyhow::Error {
    if !is_permission_error(&err) {
        return err;
    }
    match Privileges::current().ok().and_then(|p| p.explanation()) {
        Some(why) => err.context(why),
        None => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cap_eff: &str, seccomp: u8) -> String {
        format!(
            "Name:\ttracegap\nCapInh:\t0000000000000000\nCapPrm:\t{cap_eff}\n\
             CapEff:\t{cap_eff}\nNoNewPrivs:\t1\nSeccomp:\t{seccomp}\n"
        )
    }

    fn names(p: &Privileges) -> Vec<&'static str> {
        p.missing().iter().map(|c| c.name).collect()
    }

    #[test]
    fn the_three_capabilities_are_enough_and_each_is_named_when_missing() {
        let bit = |b: u32| 1u64 << b;
        let all = bit(39) | bit(12) | bit(38);
        let p = Privileges::parse(&status(&format!("{all:016x}"), 0)).expect("parsed");
        assert!(p.missing().is_empty());
        assert_eq!(p.explanation(), None);
        for c in REQUIRED {
            let without = all & !bit(c.bit);
            let p = Privileges::parse(&status(&format!("{without:016x}"), 2)).expect("parsed");
            assert_eq!(names(&p), [c.name]);
            let why = p.explanation().expect("explained");
            assert!(why.contains(c.name) && why.contains(c.needed_for), "{why}");
        }
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        let p = Privileges::parse(&status(&format!("{:016x}", 1u64 << 21), 0)).expect("parsed");
        assert_eq!(names(&p), ["CAP_NET_ADMIN"]);
        // Root's full set (CapEff 000001ffffffffff).
        let p = Privileges::parse(&status("000001ffffffffff", 0)).expect("parsed");
        assert!(p.missing().is_empty());
    }

    #[test]
    fn a_seccomp_filter_is_the_explanation_only_when_no_capability_is_missing() {
        let p = Privileges::parse(&status("000000c000001000", 2)).expect("parsed");
        let why = p.explanation().expect("explained");
        assert!(why.contains("seccomp"), "{why}");
        assert!(Privileges::parse("Name:\tx\n").is_none());
    }

    #[test]
    fn only_permission_errors_are_explained() {
        let eperm = anyhow::Error::new(io::Error::from_raw_os_error(libc::EPERM)).context("load");
        assert!(is_permission_error(&eperm));
        let eacces = anyhow::Error::new(io::Error::from_raw_os_error(libc::EACCES));
        assert!(is_permission_error(&eacces));
        let enoent = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOENT));
        assert!(!is_permission_error(&enoent));
        assert!(!is_permission_error(&anyhow::anyhow!("no such interface")));
    }
}
