//! Builds tracegap-ebpf for bpfel-unknown-none with aya-build and leaves the
//! object in OUT_DIR, where `src/ebpf/mod.rs` embeds it, so one binary ships.
//!
//! Toolchain: `TRACEGAP_BPF_TOOLCHAIN` if set, else the first rustup
//! toolchain that has the library sources `-Z build-std` needs: `nightly`
//! (the upstream route), then `tracegap-bpf` (Debian's rustc-web linked by
//! `cargo xtask setup`, used with RUSTC_BOOTSTRAP=1).
//! `AYA_BUILD_SKIP=1` builds the agent without its programs, for a quick
//! `cargo check` or `clippy`; such a binary says so when asked to load them.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

const OBJECT: &str = "tracegap";
const CANDIDATES: [&str; 2] = ["nightly", "tracegap-bpf"];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=TRACEGAP_BPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let common = manifest_dir.join("../tracegap-common/src");
    println!("cargo:rerun-if-changed={}", common.display());

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join(OBJECT);
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // An empty object keeps include_bytes! happy; the loader reports it.
        fs::write(&object, []).context("writing placeholder eBPF object")?;
        println!("cargo:warning=AYA_BUILD_SKIP set: tracegap is built without its eBPF programs");
        return Ok(());
    }

    let toolchain = match env::var("TRACEGAP_BPF_TOOLCHAIN") {
        Ok(t) if !t.is_empty() => t,
        _ => CANDIDATES
            .into_iter()
            .find(|t| has_library_source(t))
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow!(
                    "no toolchain can build the eBPF programs (need nightly with rust-src, or \
                     `tracegap-bpf`): run `cargo xtask setup`, or set AYA_BUILD_SKIP=1 to build \
                     without them"
                )
            })?,
    };
    if toolchain != "nightly" && env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // A stable-channel compiler needs this for -Z build-std.
        // SAFETY: build scripts are single-threaded here.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }

    let ebpf_dir = manifest_dir.join("../tracegap-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracegap-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| format!("building tracegap-ebpf with toolchain {toolchain}"))?;
    if !object.exists() {
        return Err(anyhow!("aya-build produced no {}", object.display()));
    }
    Ok(())
}

/// Whether rustup's `toolchain` has the library sources `-Z build-std` needs.
fn has_library_source(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    PathBuf::from(sysroot)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}
