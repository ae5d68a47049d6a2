//! A small real HTTP/1.1 server for the tests: keep-alive and pipelining
//! (answers in order), run inside a pod's namespace on a real socket.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Pod;

/// GET `path` from `addr` (HTTP/1.0, so the server closes when done):
/// (status, body). For the lab's own questions: the agent's endpoints, a
/// service's stats.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    get_over(addr, path, false)
}

/// [`get`], over TLS when `tls` (a lab service serving HTTPS).
pub fn get_over(addr: SocketAddr, path: &str, tls: bool) -> anyhow::Result<(u16, String)> {
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut c = if tls {
        crate::tls::connect(c, &addr.ip().to_string())?
    } else {
        crate::tls::Conn::Plain(c)
    };
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // To the end; a TLS peer that closes without its close_notify ends
    // the answer too.
    loop {
        match c.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(_) if tls && !raw.is_empty() => break,
            Err(e) => return Err(e.into()),
        }
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Reads one response (head and Content-Length body) from `c`; returns
/// its head. `buf` keeps what was read past it (pipelined responses).
pub fn read_response(c: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<String> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = content_length(&head);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return Ok(head);
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = c.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A running server; stops (and joins its thread) when dropped.
pub struct HttpServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Request heads received, in order, as text.
    pub received: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

/// How an [`HttpServer`] serves.
#[derive(Clone, Copy, Debug)]
pub struct Serving {
    /// Keep every request head in [`HttpServer::received`] (the tests);
    /// the bench's millions of requests are not kept.
    pub record: bool,
    /// CPU time spent per request before answering: a service that does
    /// some work (the bench's realistic-service row), not an echo.
    pub cpu_per_request: Duration,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            record: true,
            cpu_per_request: Duration::ZERO,
        }
    }
}

impl HttpServer {
    /// Listens on `[::]:port` (IPv4 and IPv6) in `pod` and answers every
    /// request with `200 OK` and a short body.
    pub fn start(pod: &Pod, port: u16) -> anyhow::Result<Self> {
        Self::start_with(pod, port, Serving::default())
    }

    /// [`HttpServer::start`], serving as `how` says.
    pub fn start_with(pod: &Pod, port: u16, how: Serving) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (s, r) = (stop.clone(), received.clone());
        let thread = pod.spawn(move || {
            let listener = match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
            {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = listener.set_nonblocking(true);
            let _ = tx.send(Ok(()));
            let mut workers = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, r) = (s.clone(), r.clone());
                        workers.push(std::thread::spawn(move || serve(conn, &s, &r, how)));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
            for w in workers {
                let _ = w.join();
            }
        })?;
        rx.recv()??;
        Ok(Self {
            port,
            stop,
            received,
            thread: Some(thread),
        })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, stop: &AtomicBool, received: &Mutex<Vec<String>>, how: Serving) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        // Answer every complete request head in the buffer, in order.
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let body_len = if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                match chunked_body(&buf[end + 4..]) {
                    Some(n) => n,
                    None => break,
                }
            } else {
                content_length(&head)
            };
            if buf.len() < end + 4 + body_len {
                break;
            }
            buf.drain(..end + 4 + body_len);
            // Which request this answers, so a test can check the pairing.
            let path = head
                .split(' ')
                .nth(1)
                .and_then(|t| t.split('?').next())
                .unwrap_or("")
                .to_owned();
            let close = head.to_ascii_lowercase().contains("connection: close");
            if how.record
                && let Ok(mut r) = received.lock()
            {
                r.push(head);
            }
            burn(how.cpu_per_request);
            let body = b"hello from tracegap-tests\n";
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Request-Path: {path}\r\n{}\r\n",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            );
            // One write: a head and body written apart would meet Nagle
            // and delayed ACKs (40 ms per response).
            let mut whole = resp.into_bytes();
            whole.extend_from_slice(body);
            if conn.write_all(&whole).is_err() {
                return;
            }
            if close {
                return;
            }
        }
    }
}

/// Spends `cpu` of this thread's CPU time (not wall time: a preempted
/// thread keeps burning until it has had its share).
fn burn(cpu: Duration) {
    if cpu.is_zero() {
        return;
    }
    let now = || {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    };
    let end = now() + cpu;
    let mut x = 0u64;
    while now() < end {
        for i in 0..64u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of a whole chunked body at the start of `b` (None: not all here).
fn chunked_body(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        let eol = i + find(&b[i..], b"\r\n")?;
        let size = std::str::from_utf8(&b[i..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        i = eol + 2;
        if size == 0 {
            // No trailers from the tests' clients: the blank line.
            return (b.get(i..i + 2)? == b"\r\n").then_some(i + 2);
        }
        i += size + 2;
        if i > b.len() {
            return None;
        }
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Scrapers asking the agent's `/metrics` as fast as they can, each a
/// thread, until stopped (or a minute at most).
pub struct MetricsFlood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, u64)>>,
}

impl MetricsFlood {
    pub fn start(agent: std::net::SocketAddr, scrapers: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..scrapers)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut shed) = (0, 0);
                    let started = std::time::Instant::now();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(60)
                    {
                        match get(agent, "/metrics") {
                            Ok((200, _)) => ok += 1,
                            Ok((503, _)) => shed += 1,
                            _ => {}
                        }
                    }
                    (ok, shed)
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Scrapes answered and shed (503).
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads
            .into_iter()
            .filter_map(|t| t.join().ok())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }
}

/// Opens `n` connections to `to` and sends each an unfinished request
/// head, never its end (the slow-headers attack), from the calling
/// thread's network namespace; raises the process's descriptor limit to
/// hold them. Connections refused at once are left out.
pub fn half_requests(to: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    // SAFETY: reads and writes a plain struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        let want = r.rlim_cur.max(n as u64 * 2 + 1024);
        r.rlim_cur = want;
        r.rlim_max = r.rlim_max.max(want);
        anyhow::ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0,
            "raising the descriptor limit: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            && c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").is_ok()
        {
            held.push(c);
        }
    }
    Ok(held)
}

/// From inside `pod`, on one connection: sends each request, reads its
/// whole response, waits `gap`, and so on (a long-lived keep-alive
/// connection). Returns the responses' status lines.
pub fn exchange(
    pod: &Pod,
    to: std::net::SocketAddr,
    requests: Vec<Vec<u8>>,
    gap: std::time::Duration,
) -> anyhow::Result<Vec<String>> {
    pod.spawn(move || -> anyhow::Result<Vec<String>> {
        use std::io::Write as _;
        let mut c = std::net::TcpStream::connect(to)?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let mut statuses = Vec::new();
        let mut buf = Vec::new();
        for (i, r) in requests.into_iter().enumerate() {
            if i > 0 {
                std::thread::sleep(gap);
            }
            c.write_all(&r)?;
            let head = read_response(&mut c, &mut buf)?;
            statuses.push(head.lines().next().unwrap_or_default().to_owned());
        }
        Ok(statuses)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}
