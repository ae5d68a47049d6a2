//! How the agent reaches secured backends (the OTLP collector, the trace
//! store, Prometheus): the certificates it trusts and the client
//! certificate it presents.
//!
//! One TLS stack for the binary, as the Kubernetes client's: rustls with
//! ring. Trusted: Mozilla's roots, built in (webpki-roots: the agent's
//! image is a static binary on `scratch`, with no CA bundle), plus the CA
//! file given (an in-cluster CA, a private one). Files are read and checked
//! at start, each error naming the setting and the file; nothing read from
//! them (a key, a certificate) is ever logged.

use std::path::{Path, PathBuf};

use opentelemetry_otlp::tonic_types::transport;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use thiserror::Error;

/// An error and its sources, joined: an HTTP client's top level says only
/// "error sending request"; the chain says why (refused, reset, a
/// certificate not trusted, DNS).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    why
}

/// Makes ring the process's rustls provider, once. reqwest, built with
/// TLS but no provider of its own (one TLS stack: ring), asks for it when
/// any client is built, a plain-HTTP one too; every place that builds one
/// calls this first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("{setting} ({}): {reason}", path.display())]
    File {
        setting: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{0} is set without {1}: a client certificate and its key come together")]
    Half(String, String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Where the TLS files are, and the settings that named them (for errors).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates to trust beside the built-in roots.
    pub ca: Option<(String, PathBuf)>,
    /// PEM client certificate (chain) for mutual TLS.
    pub cert: Option<(String, PathBuf)>,
    /// Its PEM private key.
    pub key: Option<(String, PathBuf)>,
}

/// The files' contents, checked.
#[derive(Clone)]
pub struct Pem {
    pub ca: Option<Vec<u8>>,
    /// Certificate chain and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Pem")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl TlsFiles {
    /// The files the OTLP exporter variables name:
    /// `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`, `..._CLIENT_CERTIFICATE`,
    /// `..._CLIENT_KEY`.
    pub fn from_otlp_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_otlp_env`] from `var`: the traces variable first, then
    /// the generic one; empty is unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let otlp = |name: &str| {
            [
                format!("OTEL_EXPORTER_OTLP_TRACES_{name}"),
                format!("OTEL_EXPORTER_OTLP_{name}"),
            ]
            .into_iter()
            .find_map(|v| {
                let value = var(&v).filter(|x| !x.is_empty())?;
                Some((v, PathBuf::from(value)))
            })
        };
        Self {
            ca: otlp("CERTIFICATE"),
            cert: otlp("CLIENT_CERTIFICATE"),
            key: otlp("CLIENT_KEY"),
        }
    }

    /// Reads and checks the files.
    pub fn read(&self) -> Result<Pem, Error> {
        let ca = match &self.ca {
            Some((setting, path)) => {
                let pem = read(setting, path)?;
                certificates(setting, path, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.cert, &self.key) {
            (Some((cs, cp)), Some((ks, kp))) => {
                let cert = read(cs, cp)?;
                certificates(cs, cp, &cert)?;
                let key = read(ks, kp)?;
                private_key(ks, kp, &key)?;
                warn_if_readable(ks, kp);
                Some((cert, key))
            }
            (Some((cs, _)), None) => return Err(Error::Half(cs.clone(), "a client key".into())),
            (None, Some((ks, _))) => {
                return Err(Error::Half(ks.clone(), "a client certificate".into()));
            }
            (None, None) => None,
        };
        Ok(Pem { ca, identity })
    }
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::File {
        setting: setting.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn certificates(
    setting: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bad = |reason: String| Error::File {
        setting: setting.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn private_key(setting: &str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::File {
        setting: setting.to_owned(),
        path: path.to_owned(),
        reason: format!("no PEM private key in it ({e})"),
    })
}

/// A key others on the node can read is one they can take. Said once per
/// file: files are read again for every new connection.
fn warn_if_readable(setting: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o004 != 0
        && let Ok(mut warned) = WARNED.lock()
        && !warned.iter().any(|p| p == path)
    {
        warned.push(path.to_owned());
        tracing::warn!(
            setting,
            path = %path.display(),
            "a key or secret file readable by every user of the node: mount it with mode 0400 or 0440"
        );
    }
}

impl Pem {
    /// A rustls client configuration: the built-in roots and the CA file,
    /// the client certificate if any; `alpn` the protocols to offer.
    pub fn rustls(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, Error> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = &self.ca {
            for c in CertificateDer::pem_slice_iter(ca).flatten() {
                roots
                    .add(c)
                    .map_err(|e| Error::Tls(format!("a CA certificate: {e}")))?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::Tls(format!("the client certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| Error::Tls(format!("the client key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Tls(format!("the client certificate and key: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// An HTTP/1.1 client trusting what [`Self::rustls`] trusts.
    pub fn http_client(&self) -> Result<reqwest::ClientBuilder, Error> {
        install_crypto_provider();
        Ok(reqwest::Client::builder().tls_backend_preconfigured(self.rustls(&[b"http/1.1"])?))
    }

    /// The same for gRPC (tonic).
    pub fn tonic(&self) -> transport::ClientTlsConfig {
        let mut c = transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = &self.ca {
            c = c.ca_certificate(transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            c = c.identity(transport::Identity::from_pem(cert, key));
        }
        c
    }
}

/// How to reach an HTTP backend the agent reads (the trace store,
/// Prometheus): TLS files and credentials, each file with the setting that
/// named it (for errors). Secrets are read from files, never taken on the
/// command line (where `ps` and `--help` would show them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub tls: TlsFiles,
    /// A bearer token's file, read again when it changes (Kubernetes
    /// rotates projected tokens in place).
    pub token_file: Option<(String, PathBuf)>,
    /// Basic authentication: the user, and the file holding the password.
    pub basic: Option<(String, (String, PathBuf))>,
    /// The tenant (`X-Scope-OrgID`: Tempo, Mimir, Loki behind a gateway).
    pub tenant: Option<String>,
}

impl Access {
    /// A client with these credentials, `timeout` per request; the files
    /// read and checked now, so a wrong one is an error at start.
    pub fn client(&self, timeout: std::time::Duration) -> Result<AuthClient, Error> {
        let pem = self.tls.read()?;
        let http = pem
            .http_client()?
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let c = AuthClient {
            http,
            token: self.token_file.clone().map(FileSecret::new),
            basic: self
                .basic
                .clone()
                .map(|(user, file)| (user, FileSecret::new(file))),
            tenant: self.tenant.clone(),
        };
        if let Some(t) = &c.token {
            t.value()?;
        }
        if let Some((_, p)) = &c.basic {
            p.value()?;
        }
        Ok(c)
    }
}

/// A secret in a file: read when its modification time changes.
#[derive(Debug)]
struct FileSecret {
    setting: String,
    path: PathBuf,
    cached: std::sync::Mutex<Option<(std::time::SystemTime, String)>>,
}

impl FileSecret {
    fn new((setting, path): (String, PathBuf)) -> Self {
        Self {
            setting,
            path,
            cached: std::sync::Mutex::default(),
        }
    }

    fn value(&self) -> Result<String, Error> {
        let bad = |reason: String| Error::File {
            setting: self.setting.clone(),
            path: self.path.clone(),
            reason,
        };
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| bad(e.to_string()))?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = cached.as_ref()
            && *at == mtime
        {
            return Ok(v.clone());
        }
        let v = std::fs::read_to_string(&self.path).map_err(|e| bad(e.to_string()))?;
        let v = v.trim().to_owned();
        if v.is_empty() {
            return Err(bad("empty".into()));
        }
        warn_if_readable(&self.setting, &self.path);
        *cached = Some((mtime, v.clone()));
        Ok(v)
    }
}

/// An HTTP client that sends [`Access`]'s credentials with each request.
#[derive(Debug)]
pub struct AuthClient {
    http: reqwest::Client,
    token: Option<FileSecret>,
    basic: Option<(String, FileSecret)>,
    tenant: Option<String>,
}

impl AuthClient {
    /// A GET of `url` with the credentials; a token file gone unreadable
    /// since the start is an error naming the file, not a request without
    /// it.
    pub fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, Error> {
        self.request(reqwest::Method::GET, url)
    }

    /// A request of `method` to `url`, with the credentials.
    pub fn request(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<reqwest::RequestBuilder, Error> {
        let mut r = self.http.request(method, url);
        if let Some(t) = &self.token {
            r = r.bearer_auth(t.value()?);
        }
        if let Some((user, p)) = &self.basic {
            r = r.basic_auth(user, Some(p.value()?));
        }
        if let Some(t) = &self.tenant {
            r = r.header("X-Scope-OrgID", t);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_variables_win_over_the_generic_ones() {
        let files = TlsFiles::from_vars(|name| match name {
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE" => Some("/t/ca.pem".into()),
            "OTEL_EXPORTER_OTLP_CERTIFICATE" => Some("/g/ca.pem".into()),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY" => Some("/g/client.key".into()),
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE" => Some("".into()),
            _ => None,
        });
        assert_eq!(
            files.ca,
            Some((
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE".into(),
                "/t/ca.pem".into()
            ))
        );
        // Empty is unset.
        assert_eq!(files.cert, None);
        // A key without its certificate is refused, naming the variable.
        let err = files
            .read()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("/t/ca.pem") || err.contains("OTEL_EXPORTER_OTLP_CLIENT_KEY"),
            "{err}"
        );
        let key_only = TlsFiles { ca: None, ..files };
        let err = key_only
            .read()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_CLIENT_KEY is set without a client certificate"),
            "{err}"
        );
        assert!(
            TlsFiles::default()
                .read()
                .is_ok_and(|p| p.ca.is_none() && p.identity.is_none())
        );
    }
}
