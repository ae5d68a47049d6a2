//! `cargo xtask image`: the agent's OCI image, built offline.
//!
//! The image is deploy/Containerfile's `agent` stage: FROM scratch and one
//! statically linked binary. That stage copies the binary from the `build`
//! stage, which compiles it in debian:12 for users with a registry; here
//! buildah is handed the binary built on this machine as that stage
//! (`--build-context build=DIR`), so no base image is pulled and the
//! Containerfile stays the one description of the image.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{setup, toolchain};

/// What building and running the image needs. crun, Debian's default
/// runtime, refuses hybrid cgroup layouts; runc does not.
pub const PACKAGES: &[&str] = &["buildah", "podman", "runc"];

/// The image's name, as deploy/base's DaemonSet names it.
pub const IMAGE: &str = concat!("tracegap:", env!("CARGO_PKG_VERSION"));

/// Where the binary goes, inside the build context (and the build stage).
const BINARY_IN_CONTEXT: &str = "out/tracegap";

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Only build the static binary into DIR/out/tracegap (what the
    /// Containerfile's build stage runs).
    #[arg(long, value_name = "DIR")]
    binary_only: Option<PathBuf>,
    /// Also save the image as an OCI archive here (for `kind load
    /// image-archive` or `ctr images import`).
    #[arg(long, default_value = "target/image/tracegap.oci.tar")]
    archive: PathBuf,
}

impl Default for ImageArgs {
    fn default() -> Self {
        Self {
            binary_only: None,
            archive: PathBuf::from("target/image/tracegap.oci.tar"),
        }
    }
}

fn host_triple() -> anyhow::Result<String> {
    let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host")
}

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP header).
fn has_interpreter(elf: &[u8]) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    anyhow::ensure!(
        elf.len() > 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2,
        "not a 64-bit ELF"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into()?) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    for i in 0..count {
        let at = phoff + i * size;
        let kind = elf.get(at..at + 4).context("truncated program header")?;
        if u32::from_le_bytes(kind.try_into()?) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Builds the agent statically linked (glibc's static-pie: no loader, no
/// libraries; name lookups through /etc/hosts and DNS are in libc since
/// glibc 2.34) into `dir`/out/tracegap.
pub fn build_binary(route: &toolchain::Route, dir: &Path) -> anyhow::Result<PathBuf> {
    let triple = host_triple()?;
    if !triple.ends_with("-linux-gnu") {
        bail!("a static agent is built for *-linux-gnu hosts; this one is {triple}");
    }
    let flags_var = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        triple.to_uppercase().replace('-', "_")
    );
    // Target-scoped flags: the build scripts and proc macros stay dynamic,
    // and the eBPF crate's own build is untouched.
    toolchain::run(
        toolchain::cargo(route)
            .env(&flags_var, "-C target-feature=+crt-static -C strip=symbols")
            .args([
                "build",
                "--release",
                "--package",
                "tracegap-agent",
                "--target",
                &triple,
            ]),
    )?;
    let built = toolchain::workspace_root().join(format!("target/{triple}/release/tracegap"));
    let bytes = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if has_interpreter(&bytes)? {
        bail!(
            "{} is dynamically linked: the image has no loader",
            built.display()
        );
    }
    let dest = dir.join(BINARY_IN_CONTEXT);
    std::fs::create_dir_all(dest.parent().unwrap_or(dir))?;
    std::fs::copy(&built, &dest).with_context(|| format!("copying to {}", dest.display()))?;
    Ok(dest)
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(toolchain::workspace_root())
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds the image into podman's local storage as [`IMAGE`].
pub fn build(route: &toolchain::Route, archive: Option<&Path>) -> anyhow::Result<()> {
    setup::ensure_packages(PACKAGES)?;
    let root = toolchain::workspace_root();
    let stage = root.join("target/image/build-stage");
    let _ = std::fs::remove_dir_all(&stage);
    let binary = build_binary(route, &stage)?;
    let image_id = || {
        Command::new("podman")
            .args(["image", "inspect", "--format", "{{.Id}}", IMAGE])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let previous = image_id();
    // The agent stage copies nothing from the context: an empty one.
    let context = root.join("target/image/context");
    std::fs::create_dir_all(&context)?;
    let mut cmd = Command::new("buildah");
    cmd.args(["build", "--quiet", "--layers=false"])
        .arg(format!("--build-context=build={}", stage.display()))
        .arg("--file")
        .arg(root.join("deploy/Containerfile"))
        .args(["--target", "agent", "--tag", IMAGE])
        .arg(format!("--build-arg=VERSION={}", env!("CARGO_PKG_VERSION")));
    if let Some(rev) = git(&["rev-parse", "HEAD"]) {
        cmd.arg(format!("--build-arg=REVISION={rev}"));
    }
    // Reproducible: the image's dates are the commit's.
    if let Some(time) = git(&["log", "-1", "--format=%ct"]) {
        cmd.arg(format!("--timestamp={time}"));
    }
    toolchain::run(cmd.arg(&context))?;
    // The previous build, untagged now: removed, so rebuilding leaves no
    // dangling images (kept if a container still uses it).
    if let Some(old) = previous.filter(|old| Some(old) != image_id().as_ref()) {
        let _ = Command::new("podman").args(["rmi", &old]).output();
    }
    let size = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", IMAGE])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .ok()
        });
    let binary_size = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0);
    println!(
        "image: {IMAGE} in podman's storage, {:.1} MiB (the static agent: {:.1} MiB)",
        size.unwrap_or(0) as f64 / 1048576.0,
        binary_size as f64 / 1048576.0
    );
    if let Some(path) = archive {
        let path = root.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&path);
        toolchain::run(
            Command::new("podman")
                .args(["save", "--quiet", "--format", "oci-archive", "--output"])
                .arg(&path)
                .arg(IMAGE),
        )?;
        println!("image: saved as {}", path.display());
    }
    Ok(())
}

pub fn run(args: &ImageArgs) -> anyhow::Result<()> {
    let route = setup::ensure(true)?;
    match &args.binary_only {
        Some(dir) => build_binary(&route, dir).map(|p| println!("image: {}", p.display())),
        None => build(&route, Some(&args.archive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_told_from_a_static_one() -> anyhow::Result<()> {
        // This very test binary is dynamically linked.
        let me = std::fs::read(std::env::current_exe()?)?;
        assert!(has_interpreter(&me)?);
        assert!(has_interpreter(b"not an elf").is_err());
        Ok(())
    }
}
