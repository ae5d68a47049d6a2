//! The scheduler's account of a thread, as `/proc` gives it: time on a
//! CPU and waiting for one (`schedstat`: ns, finer than `stat`'s 10 ms
//! ticks), and how often it went to sleep or was preempted (`status`).

use std::path::Path;

#[derive(Clone, Copy, Default, Debug)]
pub(super) struct Account {
    /// ns on a CPU.
    pub run_ns: u64,
    /// ns runnable, waiting for a CPU.
    pub wait_ns: u64,
    /// Voluntary switches: how often it slept (so was woken).
    pub voluntary: u64,
    /// Involuntary switches: how often it was preempted.
    pub preempted: u64,
}

impl Account {
    /// The account of the task at `task` (`/proc/PID/task/TID`).
    pub fn of(task: &Path) -> Option<Self> {
        let sched = std::fs::read_to_string(task.join("schedstat")).ok()?;
        let mut f = sched.split_whitespace().map(|v| v.parse::<u64>().ok());
        let (run_ns, wait_ns) = (f.next()??, f.next()??);
        let status = std::fs::read_to_string(task.join("status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        Some(Self {
            run_ns,
            wait_ns,
            voluntary: field("voluntary_ctxt_switches:")?,
            preempted: field("nonvoluntary_ctxt_switches:")?,
        })
    }

    /// The sum over this process's threads named `name`, so far.
    pub fn named(name: &str) -> Self {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Self::default();
        };
        tasks
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
            .filter_map(|t| Self::of(&t.path()))
            .fold(Self::default(), |mut s, a| {
                s += a;
                s
            })
    }

    /// What accrued between `earlier` and this account of the same thread.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            preempted: self.preempted.saturating_sub(earlier.preempted),
        }
    }
}

impl std::ops::AddAssign for Account {
    fn add_assign(&mut self, a: Self) {
        self.run_ns += a.run_ns;
        self.wait_ns += a.wait_ns;
        self.voluntary += a.voluntary;
        self.preempted += a.preempted;
    }
}
