//! What a backend the agent depends on (the OTLP collector, the trace
//! store) last made of it, for `/readyz`; and how to tell a backend that
//! refuses the agent (a certificate that does not verify, a client
//! certificate or credentials it will not take: settings an operator must
//! fix) from one that is away (down, restarting, unreachable: the network
//! or the backend will recover by itself).
//!
//! A refusal since start makes the agent not ready, so a rollout with a
//! wrong CA or token stops at the first node instead of reaching every
//! one; the agent keeps running (no crash loop) and starts being ready by
//! itself when the backend takes it. A refusal after the backend has taken
//! the agent, and every absence, is a note on a ready agent: gaps are
//! still found and counted, the metrics still scraped.

use std::{sync::Mutex, time::Duration};

/// One backend's status.
#[derive(Debug, Default)]
pub struct BackendStatus(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    /// Why the last attempt failed; None once one succeeds.
    failing: Option<String>,
    /// Whether that failure was a refusal.
    refused: bool,
    /// Whether the backend has taken the agent since start.
    reached: bool,
}

impl BackendStatus {
    /// An attempt (an export, a query) succeeded.
    pub fn reached(&self) {
        if let Ok(mut s) = self.0.lock() {
            *s = State {
                failing: None,
                refused: false,
                reached: true,
            };
        }
    }

    /// An attempt failed, `why` in one line; `refused`: see [`refusal`].
    pub fn failed(&self, why: String, refused: bool) {
        if let Ok(mut s) = self.0.lock() {
            s.failing = Some(why);
            s.refused = refused;
        }
    }

    /// A refusal found before any attempt (a check at start); ignored once
    /// the backend has taken the agent.
    pub fn refused_at_start(&self, why: String) {
        if let Ok(mut s) = self.0.lock()
            && !s.reached
        {
            s.failing = Some(why);
            s.refused = true;
        }
    }

    /// Why the last attempt failed, until one succeeds.
    pub fn failing(&self) -> Option<String> {
        self.0.lock().ok().and_then(|s| s.failing.clone())
    }

    /// Why the agent is not ready: the backend refused it and has not
    /// taken it since start.
    pub fn refused_since_start(&self) -> Option<String> {
        let s = self.0.lock().ok()?;
        (s.refused && !s.reached)
            .then(|| s.failing.clone())
            .flatten()
    }
}

/// The TLS refusal somewhere in `e`'s chain, if it is one: the peer's
/// certificate not verified, an alert from the peer (our certificate
/// refused or missing), a peer that does not speak TLS.
pub fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        // io::Error's source() skips the error it wraps: look inside.
        if let Some(r) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r.to_string());
        }
        next = err.source();
    }
    None
}

/// Whether an OTLP export's error says the collector refused the
/// credentials: gRPC's `Unauthenticated` or `PermissionDenied`, HTTP's 401
/// or 403 (as opentelemetry-otlp words them).
pub fn credentials_refused(export_error: &str) -> bool {
    [
        "gRPC code: Unauthenticated",
        "gRPC code: PermissionDenied",
        "status code: 401",
        "status code: 403",
    ]
    .iter()
    .any(|m| export_error.contains(m))
}

/// Why a TLS handshake with a backend did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Handshake {
    /// The backend refused (see [`refusal`]).
    #[error("{0}")]
    Refused(String),
    /// The backend could not be reached.
    #[error("{0}")]
    Away(String),
}

/// Connects to `host:port` (`host` a name or an address, an IPv6 one
/// without brackets) and completes a TLS handshake with `config`,
/// then waits up to a second for an alert (TLS 1.3 servers refuse a client
/// certificate after the handshake): whether the backend takes the agent's
/// TLS, asked before anything is sent. Blocking: run it off the runtime.
pub fn tls_handshake(
    host: &str,
    port: u16,
    config: rustls::ClientConfig,
    timeout: Duration,
) -> Result<(), Handshake> {
    use std::io::{ErrorKind, Read as _};
    use std::net::ToSocketAddrs as _;
    let away = |e: std::io::Error| Handshake::Away(e.to_string());
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Handshake::Refused(format!("{host}: {e}")))?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(away)?
        .next()
        .ok_or_else(|| Handshake::Away(format!("{host}: no address")))?;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(away)?;
    tcp.set_read_timeout(Some(timeout)).map_err(away)?;
    tcp.set_write_timeout(Some(timeout)).map_err(away)?;
    let mut tls = rustls::ClientConnection::new(config.into(), name)
        .map_err(|e| Handshake::Refused(e.to_string()))?;
    let classify = |e: std::io::Error| match refusal(&e) {
        Some(r) => Handshake::Refused(r),
        None => Handshake::Away(e.to_string()),
    };
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).map_err(classify)?;
    }
    tcp.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(away)?;
    let mut buf = [0u8; 512];
    match rustls::Stream::new(&mut tls, &mut tcp).read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(()),
        Err(e) => match refusal(&e) {
            Some(r) => Err(Handshake::Refused(r)),
            // Closed without an alert, right after the handshake: TLS 1.3
            // servers do this too when they refuse the certificate.
            None if e.kind() == ErrorKind::UnexpectedEof => Err(Handshake::Refused(
                "the connection was closed after the TLS handshake (a refused client certificate?)"
                    .into(),
            )),
            None => Ok(()),
        },
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_since_start_is_not_ready_until_the_backend_takes_the_agent() {
        let s = BackendStatus::default();
        assert_eq!(s.refused_since_start(), None);
        s.failed("collector x: connection refused".into(), false);
        assert_eq!(s.refused_since_start(), None, "away is not refused");
        assert!(s.failing().is_some());
        s.failed("collector x: UnknownIssuer".into(), true);
        assert_eq!(
            s.refused_since_start().as_deref(),
            Some("collector x: UnknownIssuer")
        );
        s.reached();
        assert_eq!(s.failing(), None);
        // Taken once: a later refusal is a note only.
        s.failed("collector x: CertificateExpired".into(), true);
        assert_eq!(s.refused_since_start(), None);
        assert!(s.failing().is_some());
    }

    #[test]
    fn refusals_are_found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert_eq!(
            refusal(&io).as_deref(),
            Some("invalid peer certificate: UnknownIssuer")
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(refusal(&refused), None);
    }

    #[test]
    fn credentials_refused_as_the_exporter_words_it() {
        assert!(credentials_refused(
            "TonicTracesClient export failed with gRPC code: Unauthenticated"
        ));
        assert!(credentials_refused(
            "HTTP export failed with status code: 403"
        ));
        assert!(!credentials_refused(
            "TonicTracesClient export failed with gRPC code: Unavailable"
        ));
        assert!(!credentials_refused(
            "HTTP export failed with status code: 503"
        ));
    }
}
