//! `cargo xtask vm-test`: the kernel-side end-to-end tests inside VMs that
//! boot other kernels. Debian's kernel packages are fetched with
//! `apt-get download` into a cache outside the repository; the xtask builds
//! an initramfs (busybox, the test binaries, the tools they call with their
//! libraries, the kernel modules the tests need) and boots it under qemu.
//! A tiny init runs every test binary and prints its exit status; the xtask
//! reads the serial console and reports each test per kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{setup, toolchain};

/// Kernels tested by default: 6.1 attaches with netlink clsact (no TCX),
/// 6.12 with TCX links.
pub const DEFAULT_KERNELS: [&str; 2] = ["6.1", "6.12"];
/// The kernel-side test binaries (tests/tests/<name>.rs).
const TESTS: [&str; 5] = [
    "ring_buffer",
    "observer",
    "discovery",
    "loader",
    "causality",
];
/// Modules the tests need that Debian builds as modules.
const MODULES: [&str; 5] = ["veth", "bridge", "sch_ingress", "cls_bpf", "sch_tbf"];
/// Host tools the tests run, copied into the guest with their libraries.
const TOOLS: [&str; 5] = ["ip", "tc", "nsenter", "curl", "openssl"];
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);
const MARK: &str = "TRACEGAP-VM";

#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Kernel series to boot (repeat), e.g. 6.1 or 6.12.
    #[arg(long = "kernel", default_values_t = DEFAULT_KERNELS.map(String::from))]
    pub kernels: Vec<String>,
}

impl Default for VmArgs {
    fn default() -> Self {
        Self {
            kernels: DEFAULT_KERNELS.map(String::from).to_vec(),
        }
    }
}

/// The line the loader test prints per program and kernel: instructions
/// verified and the memory charged while loading
/// (`VERIFIER <release> <program> insns=N peak_mib=M baseline_mib=B load_ms=T`).
pub const VERIFIER_LINE: &str = "VERIFIER ";

/// The [`VERIFIER_LINE`] in a line of output: with `--nocapture` the
/// first one follows libtest's "test NAME ... " on the same line.
pub fn verifier_line(line: &str) -> Option<&str> {
    line.find(VERIFIER_LINE).map(|at| &line[at..])
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("tracegap/vm")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest generic amd64 image package of a series (6.1 → 6.1.0-N-amd64,
/// 6.12 → 6.12.N+deb12-amd64).
fn package_for(series: &str) -> anyhow::Result<String> {
    let pattern = format!("^linux-image-{}[.-]", series.replace('.', "\\."));
    let list = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let mut names: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.ends_with("-amd64") && !n.contains("cloud") && !n.contains("-rt-"))
        .filter(|n| !n.contains("dbg") && !n.contains("unsigned"))
        .map(str::to_owned)
        .collect();
    // Numeric-aware: 6.1.0-50 after 6.1.0-9.
    let key = |n: &String| -> Vec<u64> {
        n.split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    names.sort_by_key(key);
    names
        .pop()
        .with_context(|| format!("no linux-image package for kernel {series} (apt-get update?)"))
}

struct Kernel {
    series: String,
    release: String,
    root: PathBuf,
}

fn fetch(series: &str) -> anyhow::Result<Kernel> {
    let pkg = package_for(series)?;
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)?;
    let root = dir.join("x").join(&pkg);
    if !root.join("boot").exists() {
        let have = |d: &Path| -> Option<PathBuf> {
            std::fs::read_dir(d)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                })
        };
        let deb = match have(&dir) {
            Some(d) => d,
            None => {
                println!("vm-test: apt-get download {pkg}");
                // As root into a cache _apt cannot enter: no sandbox user.
                toolchain::run(
                    Command::new("apt-get")
                        .args(["-o", "APT::Sandbox::User=root", "download", &pkg])
                        .current_dir(&dir),
                )?;
                have(&dir).context("the package did not download")?
            }
        };
        std::fs::create_dir_all(&root)?;
        toolchain::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    let release = std::fs::read_dir(root.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("no lib/modules in the kernel package")?;
    Ok(Kernel {
        series: series.to_owned(),
        release,
        root,
    })
}

/// A module's bytes, decompressed, and the modules it depends on.
fn module(kernel: &Kernel, name: &str) -> anyhow::Result<(Vec<u8>, Vec<String>)> {
    let base = kernel
        .root
        .join("lib/modules")
        .join(&kernel.release)
        .join("kernel");
    let file = find_file(
        &base,
        &[
            format!("{name}.ko"),
            format!("{name}.ko.xz"),
            format!("{name}.ko.zst"),
        ],
    )
    .with_context(|| format!("module {name} not in {}", base.display()))?;
    let bytes = match file.extension().and_then(|e| e.to_str()) {
        Some("xz") => Command::new("xz").arg("-dc").arg(&file).output()?.stdout,
        Some("zst") => Command::new("zstd").arg("-dc").arg(&file).output()?.stdout,
        _ => std::fs::read(&file)?,
    };
    // modinfo's `depends=` string, read straight from .modinfo.
    let deps = bytes
        .windows(8)
        .position(|w| w == b"depends=")
        .map(|at| {
            let rest = &bytes[at + 8..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok((bytes, deps))
}

fn find_file(dir: &Path, names: &[String]) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, names) {
                return Some(f);
            }
        } else if p
            .file_name()
            .is_some_and(|n| names.iter().any(|w| n.to_string_lossy() == *w))
        {
            return Some(p);
        }
    }
    None
}

/// Modules in load order (dependencies first).
fn modules_in_order(kernel: &Kernel) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    fn visit(
        k: &Kernel,
        name: &str,
        done: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        if !done.insert(name.to_owned()) {
            return Ok(());
        }
        let (bytes, deps) = module(k, name)?;
        for d in deps {
            visit(k, &d, done, out)?;
        }
        out.push((name.to_owned(), bytes));
        Ok(())
    }
    let (mut done, mut out) = (BTreeSet::new(), Vec::new());
    for m in MODULES {
        visit(kernel, m, &mut done, &mut out)?;
    }
    Ok(out)
}

/// A newc cpio archive, which the kernel unpacks as the initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name = path.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, path: &str) {
        let p = path.trim_end_matches('/');
        if p.is_empty() || self.dirs.contains(p) {
            return;
        }
        if let Some((parent, _)) = p.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(p.to_owned());
        self.entry(p, 0o040755, &[]);
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100000 | mode, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o120777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// A host executable and the shared libraries it loads (from `ldd`).
fn with_libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = vec![bin.to_path_buf()];
    let ldd = output(Command::new("ldd").arg(bin)).unwrap_or_default();
    for line in ldd.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    Ok(files)
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .with_context(|| format!("{tool} is not installed"))
}

/// Copies a file (through symlinks) stripped of debug information when it
/// is an ELF file: the guest needs the code, not the DWARF.
fn stripped(path: &Path, scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !bytes.starts_with(b"\x7fELF") || bytes.len() < 4 << 20 {
        return Ok(bytes);
    }
    let out = scratch.join("stripped");
    toolchain::run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(path),
    )?;
    Ok(std::fs::read(&out)?)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# The real iproute2 and util-linux first: busybox ip knows no netns.
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /run/netns /var
ln -sf /run /var/run
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
# cgroup v2 with the memory controller: the loader test measures what
# loading the programs charges to a memory cgroup (the verifier's memory).
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null && echo +memory > /sys/fs/cgroup/cgroup.subtree_control
# Kernel messages off the console: they land inside the markers' lines
# (a "sysrq: Power Off" once cut an "end ... rc=0" in two).
dmesg -n 1 2>/dev/null
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "TRACEGAP-VM module $m failed"; done
ip link set lo up
echo "TRACEGAP-VM kernel $(uname -r)"
for t in /tests/*; do
  echo "TRACEGAP-VM begin $(basename $t)"
  TMPDIR=/tmp RUST_BACKTRACE=0 TRACEGAP_REJECTED_OBJECT=/data/rejected.o TRACEGAP_VM_GUEST=1 $t --test-threads=1 --nocapture
  echo "TRACEGAP-VM end $(basename $t) rc=$?"
done
echo "TRACEGAP-VM done"
sleep 1
echo o > /proc/sysrq-trigger
sleep 10
"#;

fn initramfs(
    kernel: &Kernel,
    tests: &BTreeMap<String, PathBuf>,
    scratch: &Path,
) -> anyhow::Result<Vec<u8>> {
    let mut c = Cpio::default();
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/etc",
        "/usr/lib/ssl",
    ] {
        c.dir(d);
    }
    c.file("/bin/busybox", 0o755, &std::fs::read(which("busybox")?)?);
    c.symlink("/bin/sh", "busybox");
    c.file("/init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for (name, bytes) in modules_in_order(kernel)? {
        c.file(&format!("/modules/{name}.ko"), 0o644, &bytes);
        order.push_str(&name);
        order.push('\n');
    }
    c.file("/modules/order", 0o644, order.as_bytes());
    let mut copied = BTreeSet::new();
    let mut copy = |c: &mut Cpio, p: &Path, at: &str| -> anyhow::Result<()> {
        if copied.insert(at.to_owned()) {
            c.file(at, 0o755, &stripped(p, scratch)?);
        }
        Ok(())
    };
    for tool in TOOLS {
        let bin = which(tool)?;
        for f in with_libraries(&bin)? {
            let at = f.to_string_lossy().into_owned();
            copy(&mut c, &f, &at)?;
        }
        // Reachable under /usr/bin whatever the host's layout.
        copy(&mut c, &bin, &format!("/usr/bin/{tool}"))?;
    }
    for f in ["/usr/lib/ssl/openssl.cnf", "/etc/ssl/openssl.cnf"] {
        if Path::new(f).exists() {
            c.file(f, 0o644, &std::fs::read(f)?);
        }
    }
    c.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    // The loader test's object, assembled here: the guest has no LLVM.
    let rejected = scratch.join("rejected.o");
    toolchain::assemble_bpf(
        &toolchain::workspace_root().join("tests/bpf/rejected.s"),
        &rejected,
    )?;
    c.file("/data/rejected.o", 0o644, &std::fs::read(&rejected)?);
    for (name, path) in tests {
        for f in with_libraries(path)?.into_iter().skip(1) {
            let at = f.to_string_lossy().into_owned();
            copy(&mut c, &f, &at)?;
        }
        copy(&mut c, path, &format!("/tests/{name}"))?;
    }
    Ok(c.finish())
}

/// Builds the kernel-side test binaries and returns them by name.
fn build_tests(
    route: &toolchain::Route,
    names: &[&str],
) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut cmd = toolchain::cargo(route);
    // The same packages as `cargo xtask test` builds (no `-p`): one
    // package alone resolves features differently and would build the agent
    // and every test binary a second time, in time and disk.
    cmd.args(["test", "--no-run", "--message-format=json"]);
    for t in names {
        cmd.args(["--test", t]);
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or_default();
        if let (Some(exe), true) = (v["executable"].as_str(), names.contains(&name)) {
            bins.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    anyhow::ensure!(
        bins.len() == names.len(),
        "test binaries not found: {bins:?}"
    );
    Ok(bins)
}

/// What one guest reported.
#[derive(Debug, Default)]
struct GuestResult {
    release: Option<String>,
    /// test binary → exit status.
    binaries: BTreeMap<String, i32>,
    /// "binary::test" → ok | FAILED | ignored.
    tests: BTreeMap<String, String>,
    /// Tests that said they skipped themselves (they pass, doing nothing).
    skipped: BTreeSet<String>,
    /// The loader test's [`VERIFIER_LINE`]s.
    verifier: Vec<String>,
    done: bool,
    /// The guest kernel panicked before the init started: a boot that
    /// software emulation can break (an int3 oops in early text patching
    /// was seen under TCG), not a test's result.
    panicked_booting: bool,
}

/// Boots per kernel at most, when the guest panics before its init runs.
const BOOT_ATTEMPTS: u32 = 3;

fn boot(kernel: &Kernel, initrd: &Path, log: &Path) -> anyhow::Result<GuestResult> {
    let vmlinuz = kernel.root.join(format!("boot/vmlinuz-{}", kernel.release));
    let accel = std::env::var("TRACEGAP_VM_ACCEL").unwrap_or_else(|_| "tcg".to_owned());
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", &accel, "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu's console")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut file = std::fs::File::create(log)?;
    let mut r = GuestResult::default();
    let mut current = String::new();
    let mut pending: Option<String> = None;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left.min(Duration::from_secs(5))) {
            Ok(l) => l,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => continue,
            Err(_) => break,
        };
        writeln!(file, "{line}")?;
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(&format!("{MARK} ")) {
            let mut w = rest.split_whitespace();
            match w.next() {
                Some("kernel") => r.release = w.next().map(str::to_owned),
                Some("begin") => current = w.next().unwrap_or_default().to_owned(),
                Some("end") => {
                    let name = w.next().unwrap_or_default().to_owned();
                    let rc = w
                        .next()
                        .and_then(|x| x.strip_prefix("rc="))
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(-1);
                    r.binaries.insert(name, rc);
                }
                Some("done") => r.done = true,
                _ => println!("  [{}] {line}", kernel.series),
            }
        } else if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, tail)) = rest.split_once(" ... ")
        {
            // With --nocapture the verdict follows the test's own output.
            match tail.trim() {
                v @ ("ok" | "FAILED" | "ignored") => {
                    r.tests.insert(format!("{current}::{name}"), v.to_owned());
                }
                _ => pending = Some(name.to_owned()),
            }
        } else if let Some(name) = pending.as_ref()
            && matches!(line.trim(), "ok" | "FAILED" | "ignored")
        {
            r.tests
                .insert(format!("{current}::{name}"), line.trim().to_owned());
            pending = None;
        } else if let Some(rest) = line.strip_prefix("SKIPPED ") {
            let name = rest.split(':').next().unwrap_or_default();
            r.skipped.insert(format!("{current}::{name}"));
        }
        if line.contains("Kernel panic") && r.release.is_none() {
            r.panicked_booting = true;
            break;
        }
        if let Some(v) = verifier_line(line) {
            r.verifier.push(v.to_owned());
        }
        if line.contains("attached with") {
            println!("  [{}] {}", kernel.series, line.trim_start_matches("test "));
        }
        if r.done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(r)
}

/// `cargo xtask vm-test`'s arguments.
#[derive(Debug, Default, clap::Args)]
pub struct VmTestArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Only this test binary (repeat): ring_buffer, observer, discovery,
    /// loader, causality.
    #[arg(long = "test", value_parser = clap::builder::PossibleValuesParser::new(TESTS))]
    pub tests: Vec<String>,
}

pub fn run(args: &VmTestArgs) -> anyhow::Result<()> {
    let names: Vec<&str> = if args.tests.is_empty() {
        TESTS.to_vec()
    } else {
        args.tests.iter().map(String::as_str).collect()
    };
    run_tests(&args.vm, &names).map(|_| ())
}

/// Boots each kernel with the test binaries `names` (tests/tests/<name>.rs)
/// and fails on any failure; returns the [`VERIFIER_LINE`]s the guests
/// printed.
pub fn run_tests(args: &VmArgs, names: &[&str]) -> anyhow::Result<Vec<String>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("vm-test installs qemu and kernel packages: run it as root");
    }
    let route = setup::ensure(true)?;
    setup::ensure_vm_packages()?;
    let tests = build_tests(&route, names)?;
    let mut verifier = Vec::new();
    let scratch = toolchain::workspace_root().join("target/vm");
    std::fs::create_dir_all(&scratch)?;
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for series in &args.kernels {
        let kernel = fetch(series)?;
        println!(
            "vm-test: kernel {} ({}): building the initramfs",
            kernel.series, kernel.release
        );
        let initrd = scratch.join(format!("initramfs-{}.cpio", kernel.release));
        std::fs::write(&initrd, initramfs(&kernel, &tests, &scratch)?)?;
        let log = scratch.join(format!("console-{}.log", kernel.release));
        println!(
            "vm-test: booting {} under qemu (console: {})",
            kernel.release,
            log.display()
        );
        let started = Instant::now();
        let mut r = boot(&kernel, &initrd, &log)?;
        // A guest that panics before its init ran no test: boot it again
        // (twice at most), keeping the console of the failed boot.
        for attempt in 2..=BOOT_ATTEMPTS {
            if !r.panicked_booting {
                break;
            }
            let kept = scratch.join(format!(
                "console-{}-boot{}.log",
                kernel.release,
                attempt - 1
            ));
            std::fs::rename(&log, &kept)?;
            println!(
                "vm-test: {} panicked while booting, before any test (see {}): booting again ({attempt}/{BOOT_ATTEMPTS})",
                kernel.release,
                kept.display()
            );
            r = boot(&kernel, &initrd, &log)?;
        }
        let secs = started.elapsed().as_secs();
        if !r.done {
            failures.push(format!(
                "{}: the guest did not finish (see {})",
                kernel.release,
                log.display()
            ));
        }
        verifier.append(&mut r.verifier);
        for name in names {
            match r.binaries.get(*name) {
                Some(0) => {}
                Some(rc) => failures.push(format!("{}: {name} exited {rc}", kernel.release)),
                None => failures.push(format!("{}: {name} did not run", kernel.release)),
            }
        }
        for (test, verdict) in &r.tests {
            let shown = if r.skipped.contains(test) {
                "SKIPPED"
            } else {
                verdict
            };
            table.push(format!("{:<22} {test:<90} {shown}", kernel.release));
            if verdict != "ok" {
                failures.push(format!("{}: {test} {verdict}", kernel.release));
            }
        }
        println!(
            "vm-test: {} ran {} tests in {secs}s",
            r.release.as_deref().unwrap_or(&kernel.release),
            r.tests.len()
        );
    }
    println!("\n{}", table.join("\n"));
    println!("\n{}", verifier.join("\n"));
    if !failures.is_empty() {
        bail!("vm-test failed:\n  {}", failures.join("\n  "));
    }
    println!("vm-test: every test passed on {}", args.kernels.join(", "));
    Ok(verifier)
}
