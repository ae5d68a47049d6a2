//! The loader's errors: a program the kernel refuses is a start-up error
//! that names the program and carries the verifier's log.

use std::path::{Path, PathBuf};

use tracegap_agent::ebpf::{Error, KernelLog, LoadOptions, Observer};
use tracegap_tests::{TempDir, privileged, run};

/// The assembly of the programs the verifier must refuse.
pub fn rejected_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/rejected.s")
}

fn llvm_mc() -> Option<PathBuf> {
    ["/usr/lib/llvm-22/bin/llvm-mc", "/usr/bin/llvm-mc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// What every kernel must verify each program in, at most: a fifth of
/// the verifier's 1M-instruction bound. Kernel builds differ in how far
/// their verifier walks the same program (one 6.18 build took 17 times
/// another's), so the margin is large on purpose.
const VERIFIER_BUDGET: u32 = 200_000;
/// Set for [`verifier_probe`] when it runs as a child: `load` or `baseline`.
const PROBE: &str = "TRACEGAP_TEST_VERIFIER_PROBE";

/// Loads the programs (or, as the baseline, starts and does nothing) and
/// prints what each took the verifier: run by
/// [`the_programs_verify_well_within_the_verifiers_bound`] as a child, in
/// a memory cgroup of its own.
#[test]
#[ignore = "a child of the_programs_verify_well_within_the_verifiers_bound"]
fn verifier_probe() -> anyhow::Result<()> {
    if std::env::var(PROBE).as_deref() != Ok("load") {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let observer = Observer::load()?;
    let took = started.elapsed();
    for (program, n) in observer.verified_instructions() {
        let n = n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        println!("PROBE {program} {n} {}", took.as_millis());
    }
    let threads = observer.thread_evidence();
    println!("THREADS {} {threads:?}", threads.as_str());
    println!(
        "OPENSSL {}",
        observer.openssl_unavailable().unwrap_or("loaded")
    );
    drop(observer);
    // The TC programs again with their diagnostics on (`--kernel-log
    // debug`): off, the verifier drops the log calls; on, it walks them.
    let started = std::time::Instant::now();
    let observer = Observer::load_with(LoadOptions {
        thread_evidence: false,
        kernel_log: KernelLog::Debug,
        ..LoadOptions::default()
    })?;
    let took = started.elapsed();
    for (program, n) in observer.verified_instructions() {
        let n = n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        println!("PROBE {program}+kernel-log {n} {}", took.as_millis());
    }
    Ok(())
}

/// Instructions verified per program and the memory charged while loading
/// them, printed per kernel (`cargo xtask verifier` collects these lines
/// from the host and the VMs): the figures the DaemonSet's memory limit
/// and the headroom rest on.
#[test]
fn the_programs_verify_well_within_the_verifiers_bound() -> anyhow::Result<()> {
    if !privileged("the_programs_verify_well_within_the_verifiers_bound") {
        return Ok(());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let probe = |mode: &str| -> anyhow::Result<(String, u64)> {
        let group = tracegap_tests::memcg::MemoryGroup::new(&format!("verifier-{mode}"))?;
        let (out, peak) = group.run(
            std::process::Command::new(std::env::current_exe()?)
                .args(["--exact", "verifier_probe", "--ignored", "--nocapture"])
                .args(["--test-threads=1", "-q"])
                .env(PROBE, mode),
        )?;
        anyhow::ensure!(
            out.status.success(),
            "the probe ({mode}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), peak))
    };
    let (_, baseline) = probe("baseline")?;
    let (stdout, peak) = probe("load")?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut seen = 0;
    // Every kernel the project runs on offers a source of thread turns:
    // the socket tracepoints from 6.3, fexit on TCP's send and receive
    // before (6.1). Loaded, they are two programs more.
    let threads = stdout
        .lines()
        .find_map(|l| l.strip_prefix("THREADS "))
        .unwrap_or("none");
    println!("THREADS {release} {threads}");
    assert!(
        !threads.starts_with("none"),
        "no thread programs on {release}: {threads}"
    );
    // And OpenSSL's probes with the pair that names their connections.
    let openssl = stdout
        .lines()
        .find_map(|l| l.strip_prefix("OPENSSL "))
        .unwrap_or("no line");
    assert_eq!(openssl, "loaded", "OpenSSL's probes on {release}");
    for line in stdout.lines() {
        let mut w = line.split_whitespace();
        let (Some("PROBE"), Some(program), Some(n), Some(ms)) =
            (w.next(), w.next(), w.next(), w.next())
        else {
            continue;
        };
        seen += 1;
        // One line per program for `cargo xtask verifier`; the peak is the
        // whole load's (all programs), the baseline the same child's
        // without loading anything.
        println!(
            "VERIFIER {release} {program} insns={n} peak_mib={:.1} baseline_mib={:.1} load_ms={ms}",
            mib(peak),
            mib(baseline)
        );
        let Ok(n) = n.parse::<u32>() else {
            eprintln!("SKIPPED {program}: this kernel does not report verified instructions");
            continue;
        };
        assert!(
            n <= VERIFIER_BUDGET,
            "{program}: {n} instructions verified on {release}, past the budget of \
             {VERIFIER_BUDGET} (a fifth of the verifier's 1M bound)"
        );
    }
    // Nine programs (the TC pair, the thread pair and its memo's, the
    // OpenSSL probes' entry and return and their naming pair), and the
    // TC and OpenSSL ones again with the log on, with the program that
    // logs.
    assert_eq!(seen, 16, "a line per program from the probe: {stdout}");
    Ok(())
}

#[test]
fn a_program_the_verifier_rejects_is_named_with_the_verifier_log() -> anyhow::Result<()> {
    if !privileged("a_program_the_verifier_rejects_is_named_with_the_verifier_log") {
        return Ok(());
    }
    // In the VM tests the object comes assembled (no LLVM in the guest).
    let bytes = match std::env::var_os("TRACEGAP_REJECTED_OBJECT") {
        Some(path) => std::fs::read(path)?,
        None => {
            let Some(mc) = llvm_mc() else {
                // llvm-22 comes with `cargo xtask setup`'s llvm-22-dev.
                eprintln!(
                    "SKIPPED a_program_the_verifier_rejects_is_named_with_the_verifier_log: no llvm-mc"
                );
                return Ok(());
            };
            let dir = TempDir::new("rejected")?;
            let object = dir.path().join("rejected.o");
            run(std::process::Command::new(mc)
                .args(["-triple", "bpfel", "-filetype=obj", "-o"])
                .arg(&object)
                .arg(rejected_source()))?;
            std::fs::read(&object)?
        }
    };
    let err = match Observer::load_object(&bytes) {
        Ok(_) => panic!("the kernel accepted a program that reads an unset register"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            Error::Load {
                program: "tracegap_ingress",
                ..
            }
        ),
        "{err:?}"
    );
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(text.contains("tracegap_ingress"), "{text}");
    assert!(
        text.contains("R5 !read_ok"),
        "the verifier's own words: {text}"
    );
    Ok(())
}

/// The programs attached to `iface` on `hook`: netlink filters named like
/// tracegap's (as `tc filter show` lists them) and TCX programs (queried).
fn attached(iface: &str, hook: &str) -> anyhow::Result<usize> {
    let out = run(std::process::Command::new("tc").args(["filter", "show", "dev", iface, hook]))?;
    let filters = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("tracegap_"))
        .count();
    let attach_type = match hook {
        "ingress" => aya::programs::TcAttachType::Ingress,
        _ => aya::programs::TcAttachType::Egress,
    };
    let tcx = match aya::programs::SchedClassifier::query_tcx(iface, attach_type) {
        // Program names are cut to 15 bytes: tracegap_ingres, tracegap_egress.
        Ok((_, programs)) => programs
            .iter()
            .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("tracegap_")))
            .count(),
        // No TCX on this kernel (6.1): netlink filters only.
        Err(_) => 0,
    };
    Ok(filters + tcx)
}

const CHILD_IFACE: &str = "TRACEGAP_TEST_ATTACH_IFACE";

/// The first agent of [`a_restart_after_sigkill_leaves_one_filter_per_direction`]:
/// run by it as a child process, attached until killed.
#[test]
#[ignore = "a child of a_restart_after_sigkill_leaves_one_filter_per_direction"]
fn attached_until_killed() -> anyhow::Result<()> {
    let Some(iface) = std::env::var_os(CHILD_IFACE) else {
        return Ok(());
    };
    let mut observer = Observer::load()?;
    observer.attach(&iface.to_string_lossy())?;
    println!("ATTACHED");
    // Bounded: the parent kills it within seconds.
    std::thread::sleep(std::time::Duration::from_secs(60));
    Ok(())
}

#[test]
fn a_restart_after_sigkill_leaves_one_filter_per_direction() -> anyhow::Result<()> {
    use std::io::BufRead as _;

    use tracegap_common::EventKind;
    use tracegap_tests::{Node, collect_events, http::HttpServer};

    if !privileged("a_restart_after_sigkill_leaves_one_filter_per_direction") {
        return Ok(());
    }
    let node = Node::new(&["client", "server"])?;
    let server = node.pod("server");
    let _http = HttpServer::start(server, 8080)?;
    let iface = server.host_if.clone();

    // An agent attaches, then dies as an OOM kill or a SIGKILL ends it:
    // with no chance to detach.
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "attached_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads=1", "-q"])
        .env(CHILD_IFACE, &iface)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let attached_line = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "ATTACHED");
    child.kill()?;
    child.wait()?;
    anyhow::ensure!(attached_line, "the first agent never attached");

    let mode = tracegap_agent::ebpf::AttachMode::detect();
    let left = (attached(&iface, "ingress")?, attached(&iface, "egress")?);
    match mode {
        // The kernel keeps netlink filters after their process: the case
        // the restart must handle (so this test is not vacuous on 6.1).
        tracegap_agent::ebpf::AttachMode::Netlink => assert_eq!(left, (1, 1), "left behind"),
        // TCX links go with the process.
        tracegap_agent::ebpf::AttachMode::Tcx => assert_eq!(left, (0, 0), "left behind"),
    }

    // The restarted agent.
    let mut observer = Observer::load()?;
    observer.attach(&iface)?;
    assert_eq!(
        (attached(&iface, "ingress")?, attached(&iface, "egress")?),
        (1, 1),
        "one filter per direction after the restart ({mode})"
    );
    let mut ring = observer.take_events()?;
    node.pod("client")
        .curl(&format!("http://{}:8080/after-restart", server.ipv4), &[])?;
    let events = collect_events(&mut ring, std::time::Duration::from_secs(3), |ev| {
        ev.iter().any(|e| e.kind == EventKind::Response)
    });
    let count = |kind: EventKind| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(
        (count(EventKind::Request), count(EventKind::Response)),
        (1, 1),
        "each message seen once: {events:?}"
    );
    observer.detach_all()?;
    assert_eq!(
        (attached(&iface, "ingress")?, attached(&iface, "egress")?),
        (0, 0),
        "nothing left after a clean stop"
    );
    Ok(())
}
