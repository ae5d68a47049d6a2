//! HTTPS for the demo services, through the system's OpenSSL (the `openssl`
//! crate links libssl dynamically): what tracegap reads with its OpenSSL
//! probes. A service serving TLS presents a self-signed certificate made
//! at its start; callers do not verify it (the lab has no CA).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::OnceLock,
    time::Duration,
};

use openssl::{
    asn1::Asn1Time,
    hash::MessageDigest,
    pkey::PKey,
    rsa::Rsa,
    ssl::{SslAcceptor, SslConnector, SslMethod, SslStream, SslVerifyMode},
    x509::{X509, X509NameBuilder},
};

/// A connection a service serves or calls on: cleartext or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref(),
        }
    }

    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_read_timeout(t)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The server side's acceptor, with a certificate made once per process.
fn acceptor() -> std::io::Result<&'static SslAcceptor> {
    static ACCEPTOR: OnceLock<Result<SslAcceptor, String>> = OnceLock::new();
    ACCEPTOR
        .get_or_init(|| make_acceptor().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(other)
}

fn make_acceptor() -> Result<SslAcceptor, openssl::error::ErrorStack> {
    let key = PKey::from_rsa(Rsa::generate(2048)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", "tracegap-lab")?;
    let name = name.build();
    let mut cert = X509::builder()?;
    cert.set_version(2)?;
    cert.set_subject_name(&name)?;
    cert.set_issuer_name(&name)?;
    cert.set_pubkey(&key)?;
    cert.set_not_before(Asn1Time::days_from_now(0)?.as_ref())?;
    cert.set_not_after(Asn1Time::days_from_now(2)?.as_ref())?;
    cert.sign(&key, MessageDigest::sha256())?;
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    b.set_private_key(&key)?;
    b.set_certificate(&cert.build())?;
    Ok(b.build())
}

/// Completes the server side's handshake on an accepted connection.
pub fn accept(stream: TcpStream) -> std::io::Result<Conn> {
    acceptor()?
        .accept(stream)
        .map(|s| Conn::Tls(Box::new(s)))
        .map_err(other)
}

/// Completes the client side's handshake, asking for `name` (SNI).
pub fn connect(stream: TcpStream, name: &str) -> std::io::Result<Conn> {
    let mut b = SslConnector::builder(SslMethod::tls()).map_err(other)?;
    b.set_verify(SslVerifyMode::NONE);
    let c = b.build();
    let mut cfg = c.configure().map_err(other)?;
    cfg.set_verify_hostname(false);
    cfg.connect(name, stream)
        .map(|s| Conn::Tls(Box::new(s)))
        .map_err(other)
}
