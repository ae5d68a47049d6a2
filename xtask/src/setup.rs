//! `cargo xtask setup`: make this machine able to build and test tracegap.
//!
//! Idempotent. As root on Debian or Ubuntu it installs what is missing;
//! elsewhere it prints exactly what to install. A machine that already has
//! the upstream route (rustup nightly with rust-src, and bpf-linker) is used
//! as it is.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::toolchain::{self, DEBIAN_TOOLCHAIN, Found, Route};

/// Debian packages for the Debian route of the eBPF build.
const BPF_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
];
/// Debian packages the tests and the lab run.
const RUNTIME_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "util-linux",
    "openssl",
    "iptables",
    // h2load: many HTTP/2 streams on one connection (tests, bench).
    "nghttp2-client",
    // gRPC C-core (grpcio) as a real client that indexes its fields once
    // (the agent-restart test).
    "python3-grpcio",
    // TLS stacks tracegap does not read (counted as blind), and an HTTP/2
    // server on OpenSSL (the TLS tests), Python's requests as a client.
    "gnutls-bin",
    "nghttp2-server",
    "python3-requests",
    // A virtualenv for the OpenTelemetry SDK and its contrib propagators
    // from PyPI (tests/clients/requirements.txt).
    "python3-venv",
    // The lab's services serve and call HTTPS through the system's
    // OpenSSL (the `openssl` crate builds against it).
    "libssl-dev",
    "pkg-config",
];

const BPF_LINKER_VERSION: &str = "^0.13";

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: &SetupArgs) -> anyhow::Result<Route> {
    ensure(!args.check).inspect(|route| {
        println!(
            "setup: eBPF programs build with the {} route (toolchain `{}`)",
            match route {
                Route::Nightly => "upstream",
                Route::Debian => "Debian",
            },
            route.toolchain()
        );
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn is_debian_like() -> bool {
    let Ok(os) = std::fs::read_to_string("/etc/os-release") else {
        return false;
    };
    os.lines().any(|l| {
        (l.starts_with("ID=") || l.starts_with("ID_LIKE="))
            && (l.contains("debian") || l.contains("ubuntu"))
    }) && std::path::Path::new("/usr/bin/apt-get").exists()
}

fn missing_packages(wanted: &[&str]) -> Vec<String> {
    wanted
        .iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|p| p.to_string())
        .collect()
}

fn instructions() -> String {
    format!(
        "To build tracegap's eBPF programs, install either\n\
         - the upstream route: `rustup toolchain install nightly --component rust-src` and \
         `cargo install bpf-linker`, or\n\
         - the Debian route (Debian 12 / Ubuntu, as root): `apt-get install {}`, then \
         `rustup toolchain link {DEBIAN_TOOLCHAIN} /usr` and \
         `LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version '{BPF_LINKER_VERSION}' \
         --no-default-features --features llvm-22`.\n\
         The tests also need: {}.\n\
         `cargo xtask setup` does the Debian route for you when run as root.",
        BPF_PACKAGES.join(" "),
        RUNTIME_PACKAGES.join(" ")
    )
}

/// Makes sure some route can build the eBPF programs, installing what is
/// missing when `install` is true and the machine allows it.
/// Debian packages `cargo xtask vm-test` needs: qemu, busybox for the
/// guest's userland, and what unpacks and strips what goes into it.
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "zstd",
    "binutils",
    "iproute2",
    "util-linux",
    "curl",
    "openssl",
];

/// Installs what the VM tests need (as root on Debian/Ubuntu).
pub fn ensure_vm_packages() -> anyhow::Result<()> {
    ensure_packages(VM_PACKAGES)
}

/// Installs these Debian packages if missing (as root on Debian/Ubuntu).
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing = missing_packages(packages);
    if missing.is_empty() {
        return Ok(());
    }
    if !(is_root() && is_debian_like()) {
        bail!("this needs the packages {}", missing.join(" "));
    }
    apt_install(&missing)
}

pub fn ensure(install: bool) -> anyhow::Result<Route> {
    let can_install = install && is_root() && is_debian_like();
    if can_install {
        let mut missing = missing_packages(RUNTIME_PACKAGES);
        // The manifest tests render deploy/ with `kubectl kustomize`; any
        // kubectl will do, Debian's otherwise.
        if crate::toolchain::installed_binary("kubectl").is_none() {
            missing.push("kubernetes-client".to_owned());
        }
        apt_install(&missing)?;
    }
    let found = Found::probe();
    if let Some(route) = found.route() {
        return Ok(route);
    }
    if !can_install {
        bail!(
            "nothing on this machine can build the eBPF programs yet ({found:?}).\n{}",
            instructions()
        );
    }

    let missing = if found.nightly_with_src {
        Vec::new()
    } else {
        missing_packages(BPF_PACKAGES)
    };
    apt_install(&missing)?;
    if !found.nightly_with_src && !toolchain::has_library_source(DEBIAN_TOOLCHAIN) {
        println!("setup: rustup toolchain link {DEBIAN_TOOLCHAIN} /usr");
        toolchain::run(Command::new("rustup").args([
            "toolchain",
            "link",
            DEBIAN_TOOLCHAIN,
            "/usr",
        ]))
        .context("linking Debian's Rust toolchain into rustup")?;
    }
    if toolchain::bpf_linker().is_none() {
        println!("setup: cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22), a few minutes");
        toolchain::run(
            toolchain::plain_cargo()
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
        )
        .context("installing bpf-linker")?;
    }
    Found::probe().route().with_context(|| {
        format!(
            "setup finished but no route builds the eBPF programs ({:?})\n{}",
            Found::probe(),
            instructions()
        )
    })
}

fn apt_install(packages: &[String]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    println!("setup: apt-get install {}", packages.join(" "));
    toolchain::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]),
    )?;
    toolchain::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q"])
            .args(packages),
    )
}

/// puppeteer-core's newest release that runs on Debian 12's Node 18 (25.x
/// wants Node 22).
pub const PUPPETEER_CORE: &str = "24.43.1";

/// Where the browser test finds puppeteer-core.
pub fn puppeteer_dir() -> std::path::PathBuf {
    toolchain::workspace_root().join("target/browser")
}

/// What the browser test needs: Debian's Chromium, Node and npm (each only
/// when missing: another Node's npm must not be replaced), and
/// puppeteer-core from npm (no browser download) in target/browser.
pub fn ensure_browser() -> anyhow::Result<()> {
    let have = |tool: &str| toolchain::installed_binary(tool).is_some();
    let mut missing = Vec::new();
    if !std::path::Path::new("/usr/bin/chromium").exists() {
        missing.push("chromium".to_owned());
    }
    if !have("node") {
        missing.push("nodejs".to_owned());
    }
    if !have("npm") {
        missing.push("npm".to_owned());
    }
    if !missing.is_empty() {
        if !(is_root() && is_debian_like()) {
            bail!("the browser test needs {}", missing.join(" "));
        }
        apt_install(&missing)?;
    }
    let dir = puppeteer_dir();
    let installed = std::fs::read_to_string(dir.join("node_modules/puppeteer-core/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned));
    if installed.as_deref() != Some(PUPPETEER_CORE) {
        std::fs::create_dir_all(&dir)?;
        // Its own package, so npm installs here and not in a parent's.
        std::fs::write(
            dir.join("package.json"),
            "{\"name\": \"tracegap-browser-test\", \"private\": true}\n",
        )?;
        println!(
            "setup: npm install puppeteer-core@{PUPPETEER_CORE} (into {})",
            dir.display()
        );
        toolchain::run(
            Command::new("npm")
                .current_dir(&dir)
                .env("PUPPETEER_SKIP_DOWNLOAD", "1")
                .args(["install", "--no-audit", "--no-fund"])
                .arg(format!("puppeteer-core@{PUPPETEER_CORE}")),
        )
        .context("installing puppeteer-core")?;
    }
    Ok(())
}

/// Debian's nginx for the TLS test, unpacked from its package into a cache
/// outside the repository (not installed: its package would start a
/// service on port 80). Returns the binary's path.
pub fn nginx() -> anyhow::Result<std::path::PathBuf> {
    unpacked("nginx", "usr/sbin/nginx")
}

/// Debian's Prometheus (2.42, with `promtool`) for the cluster-wide view's
/// tests, unpacked as [`nginx`] is (its package would start a service on
/// port 9090). Returns the `prometheus` binary's path; `promtool` is beside
/// it.
pub fn prometheus() -> anyhow::Result<std::path::PathBuf> {
    unpacked("prometheus", "usr/bin/prometheus")
}

/// A Python with the OpenTelemetry SDK and the contrib propagators of
/// `tests/clients/requirements.txt` (X-Ray, Cloud Trace, OpenTracing), in
/// a virtualenv under tracegap's cache, made again when the requirements
/// change. Returns its interpreter.
pub fn otel_python() -> anyhow::Result<std::path::PathBuf> {
    let requirements =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let dir = cache_dir().join("otel-python");
    let python = dir.join("bin/python");
    let stamp = dir.join("requirements.txt");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    println!("setup: a virtualenv with {}", requirements.display());
    let _ = std::fs::remove_dir_all(&dir);
    toolchain::run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    toolchain::run(
        Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// tracegap's cache of tools the tests run (outside the repository).
fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from("/var/cache"))
        .join("tracegap/tools")
}

/// `package`'s file `binary`, from the package unpacked (`apt-get download`,
/// `dpkg -x`) into tracegap's cache, once.
fn unpacked(package: &str, binary: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = cache_dir().join(package);
    let path = dir.join("root").join(binary);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)?;
    println!("setup: apt-get download {package}");
    // As root into a cache _apt cannot enter: no sandbox user.
    toolchain::run(
        Command::new("apt-get")
            .args(["-o", "APT::Sandbox::User=root", "download", package])
            .current_dir(&dir),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("the {package} package did not download"))?;
    toolchain::run(
        Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("root")),
    )?;
    anyhow::ensure!(path.exists(), "no {binary} in {}", deb.display());
    Ok(path)
}
