//! Helpers for tracegap's end-to-end tests. The pods, services, OTLP
//! receiver and in-process agent are the lab's (`tracegap-lab`), so the
//! tests and `cargo xtask lab` exercise the same parts.

pub mod memcg;

pub use tracegap_lab::{
    agent, cluster, http,
    netns::{Child, Node, Pod, TempDir, run},
    prometheus, service as demo, store as otlp,
};

/// The lab's agent configuration for a node of pods (see
/// [`tracegap_lab::agent::config_for`]).
pub fn agent_config(node: &Node, receiver: &otlp::Receiver) -> tracegap_agent::agent::AgentConfig {
    tracegap_lab::agent::config_for(node, receiver)
}

/// Whether the tests that need the kernel can run; prints why not.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED {test}: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN for netns)"
        );
        return false;
    }
    true
}

/// Reads events from the ring buffer until `done` says the test has what it
/// needs or `timeout` passes; returns everything read.
pub fn collect_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    timeout: std::time::Duration,
    done: impl Fn(&[tracegap_agent::events::RawEvent]) -> bool,
) -> Vec<tracegap_agent::events::RawEvent> {
    let deadline = std::time::Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        while let Some(record) = ring.next() {
            match tracegap_agent::events::RawEvent::decode(&record) {
                Ok(e) => events.push(e),
                Err(e) => panic!("undecodable event: {e}"),
            }
        }
        if done(&events) || std::time::Instant::now() >= deadline {
            return events;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A self-signed certificate for `name` and its key, made by openssl in
/// `dir`: (key, cert).
pub fn self_signed(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    run(std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-subj")
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert))?;
    Ok((key, cert))
}

/// Where cgroup v2 is mounted here (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` in the hybrid layout).
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (fields, after) = l.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| fields.split_whitespace().nth(4).map(Into::into))?
        })
}

/// This process's cgroup v2 id (its directory's inode), where cgroup v2 is
/// mounted.
pub fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = tracegap_agent::process::cgroup::parse(&text).1?;
    let dir = cgroup2_mount()?.join(path.trim_start_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// A Python `http.server` (HTTP/1.1, keep-alive, a thread per connection)
/// answering every GET `stock: 7`: `before` runs first in the handler (a
/// call out), `serve` is the script's end (its socket, its loop); `sys`
/// and `http.server` are imported.
pub fn python_server(imports: &str, before: &str, serve: &str) -> String {
    format!(
        "import http.server, sys{imports}\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
        \x20   protocol_version = \"HTTP/1.1\"\n\
        \x20   def do_GET(self):\n\
        \x20       {before}\n\
        \x20       body = b\"stock: 7\\n\"\n\
        \x20       self.send_response(200)\n\
        \x20       self.send_header(\"Content-Length\", str(len(body)))\n\
        \x20       self.end_headers()\n\
        \x20       self.wfile.write(body)\n\
        \x20   def log_message(self, *a):\n\
        \x20       pass\n\
         {serve}\n"
    )
}
