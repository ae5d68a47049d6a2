//! A memory cgroup of a test's own, to measure the peak memory charged to
//! a child process: the verifier's memory is charged to the cgroup of the
//! process that loads a program (GFP_KERNEL_ACCOUNT), so a container's
//! memory limit must cover it.
//!
//! cgroup v2 where the memory controller is there (`memory.peak`, Linux
//! 5.19), else cgroup v1's memory hierarchy (`memory.max_usage_in_bytes`):
//! hosts with the hybrid layout keep memory on v1.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// A memory cgroup created for one measurement, removed on drop.
pub struct MemoryGroup {
    dir: PathBuf,
    peak_file: &'static str,
}

impl MemoryGroup {
    /// Creates `tracegap-test-<name>-<pid>` in the memory hierarchy.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let leaf = format!("tracegap-test-{name}-{}", std::process::id());
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let root = Path::new(root);
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers"));
            if controllers.is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) {
                // The children of a v2 group get memory files only when
                // the parent hands the controller down.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
                let dir = root.join(&leaf);
                std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
                if dir.join("memory.peak").exists() {
                    return Ok(Self {
                        dir,
                        peak_file: "memory.peak",
                    });
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        anyhow::ensure!(
            v1.join("memory.max_usage_in_bytes").exists(),
            "no memory cgroup: neither cgroup v2 with the memory controller and memory.peak \
             nor cgroup v1's memory hierarchy is mounted"
        );
        let dir = v1.join(&leaf);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            peak_file: "memory.max_usage_in_bytes",
        })
    }

    /// Runs `cmd` in the group (it moves itself in before it execs) and
    /// returns its output with the group's peak memory in bytes.
    pub fn run(
        &self,
        cmd: &mut std::process::Command,
    ) -> anyhow::Result<(std::process::Output, u64)> {
        use std::os::unix::process::CommandExt as _;
        let procs = std::ffi::CString::new(
            self.dir
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )?;
        // SAFETY: between fork and exec only async-signal-safe calls:
        // open, write, close on a path prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().context("running the measured child")?;
        let peak = std::fs::read_to_string(self.dir.join(self.peak_file))?
            .trim()
            .parse()
            .with_context(|| format!("reading {}", self.peak_file))?;
        Ok((out, peak))
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        // Empty once the child has exited; a v1 group may need a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
