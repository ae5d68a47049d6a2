//! Stopping on SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C), whichever
//! comes first, so the caller can detach everything before exiting.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves when SIGTERM or SIGINT arrives; returns the signal's name.
pub async fn signal_received() -> std::io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
