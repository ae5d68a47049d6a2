//! The kernel programs' own diagnostics (tracegap-ebpf's `diag.rs`: an
//! HTTP/2 connection given up, a join refused, a record dropped or cut at
//! its budget) in the agent's log, under the target [`TARGET`].
//!
//! Chosen when the programs are loaded: aya-log's level global is set
//! then, the kernel freezes it, and with it off the verifier drops every
//! log call as dead code, so no packet pays for them (`cargo xtask bench
//! --kernel` measures both).

use std::io;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

/// The tracing target kernel records are logged under: the filter
/// directive `kernel=debug` shows them (`--kernel-log debug` adds it).
pub const TARGET: &str = "kernel";

/// How much the kernel programs log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelLog {
    /// Nothing: the log calls are not in the verified programs.
    #[default]
    Off,
    /// The rare diagnostics, each with its flow.
    Debug,
}

impl KernelLog {
    /// aya-log's `AYA_LOG_LEVEL` global: records at or below it are sent.
    pub(super) fn level(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Debug => aya_log::Level::Debug as u8,
        }
    }

    /// The tracing directive that lets its records through the agent's
    /// log filter, if any.
    pub fn directive(self) -> Option<&'static str> {
        match self {
            Self::Off => None,
            Self::Debug => Some("kernel=debug"),
        }
    }
}

/// Errors from taking the programs' log ring.
#[derive(Debug, thiserror::Error)]
#[error("the kernel programs' log: {0}")]
pub struct Error(#[from] aya_log::Error);

/// aya-log writes through the `log` crate; the agent logs through
/// `tracing`: each record becomes an event under [`TARGET`].
pub struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: TARGET, "{message}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{message}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The reader of the programs' log ring. Kept (and read) while the
/// programs run.
pub struct Reader(EbpfLogger<Forward>);

impl Reader {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self(EbpfLogger::init_with_logger(ebpf, Forward)?))
    }

    /// Logs the records waiting now.
    pub fn flush(&mut self) {
        self.0.flush();
    }

    /// Logs records as they come, until the ring's descriptor fails.
    pub async fn drain(self) -> io::Result<()> {
        // SAFETY: the logger owns its ring's map fd for as long as it
        // lives, and the AsyncFd owns the logger: the fd stays open and
        // the same.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        loop {
            let mut ready = fd.readable_mut().await?;
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_sends_nothing_and_debug_sends_debug_records() {
        assert_eq!(KernelLog::Off.level(), 0);
        // aya-log's levels: error 1 .. debug 4 .. trace 5.
        assert_eq!(KernelLog::Debug.level(), 4);
        assert!(KernelLog::Debug.level() < aya_log::Level::Trace as u8);
        assert_eq!(KernelLog::Off.directive(), None);
    }
}
