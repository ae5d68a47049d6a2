//! A certificate authority made for one test: a CA, a server certificate
//! for the addresses the test's backends listen on, and a client
//! certificate, as PEM files in a directory the test owns (removed with
//! it). What a cluster's cert-manager or a hosted backend's CA would hand
//! the agent, without any of them. And the lab's backends' side of TLS
//! ([`ServerTls`]): the receiver and the query API served over it.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use openssl::{
    asn1::Asn1Time,
    bn::{BigNum, MsbOption},
    hash::MessageDigest,
    pkey::{PKey, Private},
    rsa::Rsa,
    x509::{
        X509, X509NameBuilder,
        extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName},
    },
};

/// The files of a [`Pki`], each PEM.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate of the same CA that expired yesterday.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
}

impl Pki {
    /// A CA named `name`, a server certificate for `ips` (and localhost),
    /// a client certificate; written to a new directory under the system's
    /// temporary one.
    pub fn new(name: &str, ips: &[IpAddr]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tracegap-pki-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let (ca_key, ca) = ca(name)?;
        let (server_key, server) = leaf(&ca_key, &ca, "server", ips, Leaf::Server)?;
        let (client_key, client) = leaf(&ca_key, &ca, "client", &[], Leaf::Client)?;
        let (expired_key, expired) = leaf(&ca_key, &ca, "expired", &[], Leaf::ExpiredClient)?;
        let write = |file: &str, pem: Vec<u8>| -> anyhow::Result<PathBuf> {
            let p = dir.join(file);
            std::fs::write(&p, pem)?;
            Ok(p)
        };
        Ok(Self {
            ca: write("ca.pem", ca.to_pem()?)?,
            server_cert: write("server.pem", server.to_pem()?)?,
            server_key: write("server.key", server_key.private_key_to_pem_pkcs8()?)?,
            client_cert: write("client.pem", client.to_pem()?)?,
            client_key: write("client.key", client_key.private_key_to_pem_pkcs8()?)?,
            expired_cert: write("expired.pem", expired.to_pem()?)?,
            expired_key: write("expired.key", expired_key.private_key_to_pem_pkcs8()?)?,
            dir,
        })
    }

    pub fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
        Ok(std::fs::read(path)?)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn key() -> anyhow::Result<PKey<Private>> {
    Ok(PKey::from_rsa(Rsa::generate(2048)?)?)
}

fn serial() -> anyhow::Result<openssl::asn1::Asn1Integer> {
    let mut n = BigNum::new()?;
    n.rand(64, MsbOption::MAYBE_ZERO, false)?;
    Ok(n.to_asn1_integer()?)
}

fn ca(name: &str) -> anyhow::Result<(PKey<Private>, X509)> {
    let key = key()?;
    let mut subject = X509NameBuilder::new()?;
    subject.append_entry_by_text("CN", &format!("tracegap test CA {name}"))?;
    let subject = subject.build();
    let mut c = X509::builder()?;
    c.set_version(2)?;
    c.set_serial_number(serial()?.as_ref())?;
    c.set_subject_name(&subject)?;
    c.set_issuer_name(&subject)?;
    c.set_pubkey(&key)?;
    c.set_not_before(Asn1Time::days_from_now(0)?.as_ref())?;
    c.set_not_after(Asn1Time::days_from_now(2)?.as_ref())?;
    c.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    c.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    c.sign(&key, MessageDigest::sha256())?;
    Ok((key, c.build()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Server,
    Client,
    /// A client certificate valid from two days ago until yesterday.
    ExpiredClient,
}

fn leaf(
    ca_key: &PKey<Private>,
    ca: &X509,
    cn: &str,
    ips: &[IpAddr],
    kind: Leaf,
) -> anyhow::Result<(PKey<Private>, X509)> {
    let server = kind == Leaf::Server;
    let key = key()?;
    let mut subject = X509NameBuilder::new()?;
    subject.append_entry_by_text("CN", cn)?;
    let mut c = X509::builder()?;
    c.set_version(2)?;
    c.set_serial_number(serial()?.as_ref())?;
    c.set_subject_name(&subject.build())?;
    c.set_issuer_name(ca.subject_name())?;
    c.set_pubkey(&key)?;
    if kind == Leaf::ExpiredClient {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        c.set_not_before(Asn1Time::from_unix(now - 2 * 86_400)?.as_ref())?;
        c.set_not_after(Asn1Time::from_unix(now - 86_400)?.as_ref())?;
    } else {
        c.set_not_before(Asn1Time::days_from_now(0)?.as_ref())?;
        c.set_not_after(Asn1Time::days_from_now(2)?.as_ref())?;
    }
    c.append_extension(BasicConstraints::new().build()?)?;
    c.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    if server {
        c.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let mut san = SubjectAlternativeName::new();
        san.dns("localhost");
        for ip in ips {
            san.ip(&ip.to_string());
        }
        let san = san.build(&c.x509v3_context(Some(ca), None))?;
        c.append_extension(san)?;
    } else {
        c.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
    }
    c.sign(ca_key, MessageDigest::sha256())?;
    Ok((key, c.build()))
}

/// The receiver's TLS: its certificate and key (PEM), and the CA whose
/// client certificates it requires (mutual TLS) if any.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

impl ServerTls {
    pub(crate) fn rustls(&self) -> anyhow::Result<tokio_rustls::rustls::ServerConfig> {
        use tokio_rustls::rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_slice_iter(&self.cert).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    roots.add(c?)?;
                }
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        roots.into(),
                        provider,
                    )
                    .build()?,
                )
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A listener whose connections have completed a TLS handshake; failed
/// handshakes (a client that does not trust the certificate, or has none
/// when one is required) are left behind.
pub(crate) struct TlsListener {
    pub(crate) tcp: tokio::net::TcpListener,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
