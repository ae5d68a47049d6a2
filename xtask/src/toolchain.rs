//! Which toolchain builds the eBPF programs on this machine, and running
//! cargo with it selected.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Name under which `cargo xtask setup` links Debian's rustc-web.
pub const DEBIAN_TOOLCHAIN: &str = "tracegap-bpf";

/// A way to build the eBPF programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// rustup nightly with rust-src, and bpf-linker: the upstream route.
    Nightly,
    /// Debian's rustc-web + rust-web-src linked as `tracegap-bpf`, with
    /// RUSTC_BOOTSTRAP=1, and bpf-linker built against LLVM 22.
    Debian,
}

impl Route {
    pub fn toolchain(&self) -> &'static str {
        match self {
            Self::Nightly => "nightly",
            Self::Debian => DEBIAN_TOOLCHAIN,
        }
    }
}

/// What the machine has for the eBPF build.
#[derive(Debug, Default)]
pub struct Found {
    pub nightly_with_src: bool,
    pub debian_linked: bool,
    pub bpf_linker: Option<PathBuf>,
}

impl Found {
    pub fn probe() -> Self {
        Self {
            nightly_with_src: has_library_source("nightly"),
            debian_linked: toolchain_sysroot(DEBIAN_TOOLCHAIN).is_some(),
            bpf_linker: bpf_linker(),
        }
    }

    /// The route that can build now, upstream first.
    pub fn route(&self) -> Option<Route> {
        self.bpf_linker.as_ref()?;
        if self.nightly_with_src {
            Some(Route::Nightly)
        } else if self.debian_linked && has_library_source(DEBIAN_TOOLCHAIN) {
            Some(Route::Debian)
        } else {
            None
        }
    }
}

fn toolchain_sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Same test as the agent's build.rs: the sources `-Z build-std` needs.
pub fn has_library_source(toolchain: &str) -> bool {
    toolchain_sysroot(toolchain).is_some_and(|s| {
        s.join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .exists()
    })
}

/// bpf-linker on PATH or in cargo's bin directory.
pub fn bpf_linker() -> Option<PathBuf> {
    installed_binary("bpf-linker")
}

/// A program on PATH or in cargo's bin directory.
pub fn installed_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(cargo_bin())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn cargo_bin() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin"))
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo` (the one running xtask), in the workspace root.
pub fn plain_cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// [`plain_cargo`] with the eBPF toolchain selected for the agent's build.rs.
pub fn cargo(route: &Route) -> Command {
    let mut cmd = plain_cargo();
    cmd.env("TRACEGAP_BPF_TOOLCHAIN", route.toolchain());
    if let Some(bin) = cargo_bin() {
        // bpf-linker may have just been installed there.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(bin).chain(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
    cmd
}

/// Runs a command, inheriting stdio; fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Assembles a BPF assembly file (the workspace's hand-written test and
/// bench programs) into an object with llvm-mc from llvm-22, which setup
/// installs with llvm-22-dev.
pub fn assemble_bpf(source: &Path, object: &Path) -> anyhow::Result<()> {
    let mc = ["/usr/lib/llvm-22/bin/llvm-mc", "/usr/bin/llvm-mc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .with_context(|| {
            format!(
                "llvm-mc (from llvm-22) is needed to assemble {}",
                source.display()
            )
        })?;
    run(Command::new(mc)
        .args(["-triple", "bpfel", "-filetype=obj", "-o"])
        .arg(object)
        .arg(source))
}
