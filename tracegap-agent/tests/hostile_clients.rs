//! The agent's HTTP port under a hostile client, against the real binary
//! (`tracegap run`, programs loaded, no interface attached): 15,000 idle
//! half-sent requests (the slow-headers attack) from one address, while
//! another address (as the kubelet and Prometheus are) asks `/readyz` and
//! `/metrics`. Needs root (the agent loads its programs); skipped, saying
//! so, without it.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Half-requests the attacker opens.
const ATTACKS: usize = 15_000;
/// The agent's header timeout in this test (its default is 5 s).
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: our own child, by PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// GET `path` from `from`, the whole answer; its status and how long it
/// took.
fn get(agent: SocketAddr, from: IpAddr, path: &str) -> std::io::Result<(u16, Duration)> {
    let started = Instant::now();
    let s = bound_socket(from)?;
    let mut c = connect_from(s, agent)?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    c.read_to_end(&mut answer)?;
    let status = String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, started.elapsed()))
}

/// A TCP socket bound to `ip` (port chosen by the kernel).
fn bound_socket(ip: IpAddr) -> std::io::Result<i32> {
    // SAFETY: plain socket calls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let IpAddr::V4(v4) = ip else {
            libc::close(fd);
            return Err(std::io::Error::other("IPv4 only"));
        };
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
        if libc::bind(
            fd,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) < 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

fn connect_from(fd: i32, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(v4) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    // SAFETY: `fd` is ours; the stream owns it from here.
    unsafe {
        let stream = TcpStream::from_raw_fd(fd);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_port = v4.port().to_be();
        sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        if libc::connect(
            fd,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Raises this process's descriptor limit to `n` at least.
fn raise_nofile(n: u64) -> std::io::Result<()> {
    // SAFETY: reads and writes a plain struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_cur.max(n);
        r.rlim_max = r.rlim_max.max(n);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn idle_half_requests_neither_grow_the_agent_nor_starve_its_probes() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED idle_half_requests_neither_grow_the_agent: needs root");
        return Ok(());
    }
    raise_nofile(ATTACKS as u64 + 1024)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let child = Command::new(env!("CARGO_BIN_EXE_tracegap"))
        .args([
            "run",
            "--listen",
            &agent_addr.to_string(),
            "--report-listen",
            "off",
        ])
        // No interface is attached: the port is what is tested.
        .args(["--iface-pattern", "tgnone-*"])
        .args(["--http-header-timeout", "3s"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let _agent = Agent(child);
    // The probing client's own address, as the kubelet's is not the
    // attacking pod's.
    let prober = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let attacker = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(get(agent_addr, prober, "/readyz"), Ok((200, _))) {
        anyhow::ensure!(Instant::now() < deadline, "the agent did not get ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let fresh = rss_kib(pid);

    let mut held = Vec::with_capacity(ATTACKS);
    let mut worst = Duration::ZERO;
    let mut peak = fresh;
    let started = Instant::now();
    for i in 0..ATTACKS {
        let fd = bound_socket(attacker)?;
        // A connection refused at once may fail here or on the write.
        if let Ok(mut c) = connect_from(fd, agent_addr) {
            let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            held.push(c);
        }
        if i % 1000 == 999 {
            for path in ["/readyz", "/metrics"] {
                let (status, took) = get(agent_addr, prober, path)?;
                anyhow::ensure!(status == 200, "{path} answered {status} under the flood");
                worst = worst.max(took);
            }
            peak = peak.max(rss_kib(pid));
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "opening the connections took too long"
        );
    }
    peak = peak.max(rss_kib(pid));
    assert!(
        worst < Duration::from_secs(1),
        "a probe took {worst:?} under the flood"
    );
    assert!(
        peak < 96 * 1024,
        "the agent grew to {peak} KiB under {ATTACKS} half-requests (fresh: {fresh} KiB)"
    );

    // Every half-request the agent held is closed within its header
    // timeout (and those past its caps at once).
    std::thread::sleep(HEADER_TIMEOUT + Duration::from_secs(2));
    let mut open = 0;
    for c in &mut held {
        c.set_read_timeout(Some(Duration::from_millis(1)))?;
        let mut b = [0u8; 512];
        match c.read(&mut b) {
            Ok(0) => {}
            Ok(_) => {} // a 408 or 431 then the end
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                open += 1
            }
            Err(_) => {} // reset: closed
        }
    }
    assert_eq!(open, 0, "half-requests still open past the header timeout");
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    let (status, _) = get(agent_addr, prober, "/metrics")?;
    assert_eq!(status, 200);
    let after = rss_kib(pid);
    println!(
        "agent RSS: fresh {fresh} KiB, peak {peak} KiB under {ATTACKS} half-requests, {after} KiB after; slowest probe {worst:?}"
    );
    assert!(
        after < 2 * fresh,
        "RSS after the burst {after} KiB, fresh {fresh} KiB"
    );
    Ok(())
}
