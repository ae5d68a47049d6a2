//! Which OpenSSL libraries the node's processes map, so each file gets
//! OpenSSL's uprobes once ([`crate::ebpf::ssl`]): read from
//! `/proc/PID/maps`, opened through `/proc/PID/root` (a container's own
//! libssl is a file of its image), deduplicated by device and inode.
//!
//! A uprobe is set on a file, not a process: processes that map the file
//! later are read from their first call. The node's own libraries (under
//! PID 1's root, and the agent's own) are probed from the start, so a short-lived `curl` is
//! read even when no other process maps them; an image's library is
//! probed from the first scan that finds it mapped (every
//! [`SCAN_INTERVAL`]) and left after [`MISSES_BEFORE_DETACH`] scans find
//! no process mapping it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::ebpf::ssl::FileId;

/// How often the processes' maps are read: those of new processes at
/// every scan, all of them (a process that loads libssl late, a PID
/// reused) and the node's library directories every [`FULL_SCAN_EVERY`]
/// scans. Reading every process's maps every time cost an idle node's
/// agent most of its CPU (issue 40).
pub const SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// Scans between two that read everything (a minute).
pub const FULL_SCAN_EVERY: u32 = 12;
/// Scans in a row that find a library unmapped before its probes go.
pub const MISSES_BEFORE_DETACH: u8 = 3;
/// Where distributions keep libssl, under a root (with /lib apart from
/// /usr/lib where /usr is not merged: Alpine, older images).
const LIBRARY_DIRS: [&str; 8] = [
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "lib64",
    "lib",
];

/// A library file found: its identity and a path the agent can open it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    pub file: FileId,
    pub path: PathBuf,
}

/// Whether a mapped file's name is OpenSSL's libssl (`libssl.so.3`,
/// `libssl.so.1.1`, `libssl.so`).
fn is_libssl(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("libssl.so"))
}

/// The libssl files one `/proc/PID/maps` text maps, each once.
pub fn mapped(maps: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut f = line.split_ascii_whitespace();
        let Some(path) = f.nth(5) else {
            continue;
        };
        // A path with spaces, or " (deleted)": not a library to open.
        if f.next().is_some() || !path.starts_with('/') || !is_libssl(path) {
            continue;
        }
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// The file at `path`, by the device and inode `stat` gives (the one
/// numbering both sources of libraries share; a symlink resolved).
fn identify(path: PathBuf) -> Option<Library> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(&path).ok()?;
    meta.is_file().then(|| Library {
        file: (meta.dev(), meta.ino()),
        path,
    })
}

/// Reads the maps of the processes under `proc` into `by_pid` (each PID's
/// libssl files): every process's when `all`, else only those not in it;
/// processes gone are removed.
fn read_processes(proc: &Path, by_pid: &mut HashMap<u32, Vec<Library>>, all: bool) {
    let Ok(dir) = std::fs::read_dir(proc) else {
        return;
    };
    let mut live = std::collections::HashSet::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        live.insert(pid);
        if !all && by_pid.contains_key(&pid) {
            continue;
        }
        // Gone, or not ours to read (without CAP_SYS_PTRACE): nothing.
        let maps = std::fs::read_to_string(entry.path().join("maps")).unwrap_or_default();
        let libs = mapped(&maps)
            .into_iter()
            .filter_map(|path| {
                identify(entry.path().join("root").join(path.trim_start_matches('/')))
            })
            .collect();
        by_pid.insert(pid, libs);
    }
    by_pid.retain(|pid, _| live.contains(pid));
}

/// Each library of `by_pid` once.
fn union(by_pid: &HashMap<u32, Vec<Library>>) -> Vec<Library> {
    let mut found: Vec<Library> = Vec::new();
    for l in by_pid.values().flatten() {
        if !found.iter().any(|f| f.file == l.file) {
            found.push(l.clone());
        }
    }
    found
}

/// Scans that remember what they read (see [`SCAN_INTERVAL`]); the first
/// reads everything.
#[derive(Debug, Default)]
pub struct Scanner {
    by_pid: HashMap<u32, Vec<Library>>,
    node: Vec<Library>,
    scans: u32,
}

impl Scanner {
    /// What the processes under `proc` map now, and the node's libraries.
    pub fn scan(&mut self, proc: &Path) -> Found {
        let full = self.scans.is_multiple_of(FULL_SCAN_EVERY);
        self.scans = self.scans.wrapping_add(1);
        if full {
            self.node = node_libraries(proc);
        }
        read_processes(proc, &mut self.by_pid, full);
        Found {
            node: self.node.clone(),
            mapped: union(&self.by_pid),
        }
    }
}

/// The libssl files of the root at `root` (the node's, `/proc/1/root`).
pub fn on_root(root: &Path) -> Vec<Library> {
    let mut found: Vec<Library> = Vec::new();
    for dir in LIBRARY_DIRS {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !is_libssl(&path.to_string_lossy()) {
                continue;
            }
            // Symlinks (libssl.so -> libssl.so.3) resolve to the file.
            if let Some(l) = identify(path)
                && !found.iter().any(|f| f.file == l.file)
            {
                found.push(l);
            }
        }
    }
    found
}

/// What changes after a scan: libraries to probe, files to leave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub probe: Vec<Library>,
    pub leave: Vec<FileId>,
}

/// The libraries probed, and how many scans in a row missed each.
#[derive(Debug, Default)]
pub struct Tracker {
    probed: HashMap<FileId, Probed>,
}

#[derive(Debug)]
struct Probed {
    misses: u8,
    /// The node's own: never left.
    node: bool,
}

impl Tracker {
    /// Takes the node's libraries and the mapped ones of a scan; says
    /// which to probe and which to leave. A library `failed` to probe is
    /// remembered as probed, so it is not tried on every scan.
    pub fn update(&mut self, node: &[Library], mapped: &[Library]) -> Changes {
        let mut changes = Changes::default();
        for (libs, is_node) in [(node, true), (mapped, false)] {
            for l in libs {
                match self.probed.get_mut(&l.file) {
                    Some(p) => {
                        p.misses = 0;
                        p.node |= is_node;
                    }
                    None => {
                        self.probed.insert(
                            l.file,
                            Probed {
                                misses: 0,
                                node: is_node,
                            },
                        );
                        changes.probe.push(l.clone());
                    }
                }
            }
        }
        for (file, p) in &mut self.probed {
            let seen = node.iter().chain(mapped).any(|l| l.file == *file);
            if !seen && !p.node {
                p.misses += 1;
                if p.misses >= MISSES_BEFORE_DETACH {
                    changes.leave.push(*file);
                }
            }
        }
        for f in &changes.leave {
            self.probed.remove(f);
        }
        changes
    }
}

/// What one scan found: the node's own libraries and the mapped ones.
#[derive(Debug, Default)]
pub struct Found {
    pub node: Vec<Library>,
    pub mapped: Vec<Library>,
}

/// Scans `proc` (`/proc`): the libraries of PID 1's root (the node's, with
/// hostPID) and of the agent's own (the node's when it runs on the host;
/// PID 1's may be closed to it there, under a sandbox's init), and the ones
/// the processes map.
pub fn find(proc: &Path) -> Found {
    Scanner::default().scan(proc)
}

/// The libssl files of PID 1's root and of the agent's own.
fn node_libraries(proc: &Path) -> Vec<Library> {
    let mut node = on_root(&proc.join("1").join("root"));
    for l in on_root(Path::new("/")) {
        if !node.iter().any(|n| n.file == l.file) {
            node.push(l);
        }
    }
    node
}

/// Scans every [`SCAN_INTERVAL`] with `scanner` (the one of the start's
/// scan, so a process read then is not read again before the next full
/// scan), off the runtime's threads, until the receiver is gone.
pub async fn watch(scanner: Scanner, tx: tokio::sync::mpsc::Sender<Found>) {
    let mut scanner = Some(scanner);
    loop {
        tokio::time::sleep(SCAN_INTERVAL).await;
        let Some(mut s) = scanner.take() else {
            return;
        };
        let Ok((s, found)) = tokio::task::spawn_blocking(move || {
            let found = s.scan(Path::new("/proc"));
            (s, found)
        })
        .await
        else {
            return;
        };
        scanner = Some(s);
        if tx.send(found).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f0000000000-7f0000010000 r--p 00000000 fd:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000010000-7f0000090000 r-xp 00010000 fd:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f00000a0000-7f00000b0000 r--p 00000000 fd:01 999 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f00000c0000-7f00000d0000 r-xp 00000000 00:2a 77 /opt/app/lib/libssl.so.1.1
7f00000e0000-7f00000f0000 r-xp 00000000 00:2a 78 /tmp/libssl.so.3 (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";

    #[test]
    fn a_processs_libssl_mappings_are_read_once_each() {
        assert_eq!(
            mapped(MAPS),
            vec![
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/opt/app/lib/libssl.so.1.1"
            ]
        );
    }

    fn lib(ino: u64) -> Library {
        Library {
            file: (1, ino),
            path: PathBuf::from(format!("/x/{ino}")),
        }
    }

    #[test]
    fn an_images_library_is_left_after_scans_find_it_unmapped_the_nodes_never() {
        let mut t = Tracker::default();
        let c = t.update(&[lib(1)], &[lib(1), lib(2)]);
        assert_eq!(c.probe, vec![lib(1), lib(2)]);
        assert!(c.leave.is_empty());
        // Found again: nothing to do.
        assert_eq!(t.update(&[lib(1)], &[lib(2)]), Changes::default());
        for _ in 1..MISSES_BEFORE_DETACH {
            assert_eq!(t.update(&[lib(1)], &[]), Changes::default());
        }
        let c = t.update(&[lib(1)], &[]);
        assert_eq!(c.leave, vec![(1, 2)]);
        // Mapped again later: probed again.
        assert_eq!(t.update(&[lib(1)], &[lib(2)]).probe, vec![lib(2)]);
    }

    #[test]
    fn scans_read_new_processes_each_time_and_every_process_now_and_then() {
        let proc = std::env::temp_dir().join(format!("tracegap-proc-{}", std::process::id()));
        let process = |pid: u32, maps_libssl: bool| {
            let dir = proc.join(pid.to_string());
            std::fs::create_dir_all(dir.join("root/lib")).expect("a process dir");
            std::fs::write(dir.join("root/lib/libssl.so.3"), b"lib").expect("its libssl");
            let line = if maps_libssl {
                "7f00-7f01 r-xp 00000000 08:01 42 /lib/libssl.so.3\n"
            } else {
                "7f00-7f01 r-xp 00000000 08:01 43 /lib/libc.so.6\n"
            };
            std::fs::write(dir.join("maps"), line).expect("its maps");
        };
        let mut s = Scanner::default();
        process(100, true);
        assert_eq!(s.scan(&proc).mapped.len(), 1, "a process mapping libssl");
        std::fs::remove_dir_all(proc.join("100")).expect("gone");
        process(200, false);
        assert!(s.scan(&proc).mapped.is_empty(), "its process gone");
        // A process that loads libssl after it was read: found by the next
        // scan that reads everything, not before.
        process(200, true);
        for _ in 2..FULL_SCAN_EVERY {
            assert!(s.scan(&proc).mapped.is_empty(), "read already");
        }
        assert_eq!(s.scan(&proc).mapped.len(), 1, "read again");
        let _ = std::fs::remove_dir_all(&proc);
    }

    #[test]
    fn a_process_that_maps_libssl_is_found_and_its_library_is_the_roots() {
        // A real process that loads OpenSSL (Python's ssl module).
        let Ok(mut child) = std::process::Command::new("python3")
            .args([
                "-c",
                "import ssl, sys; print(1, flush=True); sys.stdin.read()",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("skipped: no python3");
            return;
        };
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let maps =
            std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap_or_default();
        let found = find(Path::new("/proc")).mapped;
        let root = on_root(Path::new("/"));
        drop(child.stdin.take());
        let _ = child.wait();
        let Some(path) = mapped(&maps).first().map(|p| p.to_string()) else {
            panic!("python3's ssl maps no libssl: {maps}");
        };
        let theirs = identify(PathBuf::from(&path)).expect("its libssl exists");
        assert!(found.iter().any(|l| l.file == theirs.file), "{found:?}");
        assert_eq!(found.iter().filter(|l| l.file == theirs.file).count(), 1);
        if path.starts_with("/usr/lib") {
            assert!(root.iter().any(|l| l.file == theirs.file), "{root:?}");
        }
    }
}
