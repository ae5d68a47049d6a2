//! The lab's trace store as a secured production one is reached
//! (`tracegap-lab run --secure`): its OTLP receiver over mutual TLS, its
//! Jaeger query API over TLS asking for a bearer token and a tenant, a CA
//! made for the run. Everything that talks to the store is given what a
//! deployment gives it: the agents the OpenTelemetry TLS variables' files
//! and the `--trace-store-*` settings, the services and load clients the
//! same variables in their environment, and a container agent the files as
//! a mounted Secret (cert-manager's key names, as `deploy/otlp-tls` mounts
//! them).

use std::{
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use tracegap_agent::remote::{Access, TlsFiles};

use crate::{
    pki::{Pki, ServerTls},
    query::Required,
};

/// The tenant the query API asks for (`X-Scope-OrgID`).
pub const TENANT: &str = "lab";

/// The Secret `deploy/otlp-tls` mounts.
pub const SECRET: &str = "tracegap-otlp-tls";

/// The run's CA, certificates and token; removed when dropped.
pub struct Secured {
    pki: Pki,
    token: String,
    /// The Secret's files: `ca.crt`, `tls.crt`, `tls.key`, `token`.
    pub secret_dir: PathBuf,
}

impl Secured {
    /// A CA and a store certificate for every address the lab's nodes can
    /// reach the store at (10.208.S.1: each node's subnet S comes from the
    /// process and the node count, so every S is named), a client
    /// certificate, and a random token.
    pub fn new() -> anyhow::Result<Self> {
        let mut ips: Vec<IpAddr> = (1..=250u8)
            .map(|s| IpAddr::V4(Ipv4Addr::new(10, 208, s, 1)))
            .collect();
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let pki = Pki::new("lab", &ips)?;
        let mut raw = [0u8; 24];
        openssl::rand::rand_bytes(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let secret_dir = pki.dir.join("secret");
        std::fs::create_dir_all(&secret_dir)?;
        for (from, to) in [
            (&pki.ca, "ca.crt"),
            (&pki.client_cert, "tls.crt"),
            (&pki.client_key, "tls.key"),
        ] {
            std::fs::copy(from, secret_dir.join(to))
                .with_context(|| format!("copying {}", from.display()))?;
        }
        std::fs::write(secret_dir.join("token"), &token)?;
        // A Secret volume's files, as deploy/otlp-tls mounts them: the
        // owner and group read, no one else.
        for f in std::fs::read_dir(&secret_dir)? {
            std::fs::set_permissions(f?.path(), std::fs::Permissions::from_mode(0o440))?;
        }
        Ok(Self {
            pki,
            token,
            secret_dir,
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.secret_dir.join(name)
    }

    /// The receiver's TLS: client certificates of the run's CA required.
    pub fn receiver_tls(&self) -> anyhow::Result<ServerTls> {
        Ok(ServerTls {
            client_ca: Some(Pki::read(&self.pki.ca)?),
            ..self.query_tls()?
        })
    }

    /// The query API's TLS: server authentication only (the token and the
    /// tenant are its credentials).
    pub fn query_tls(&self) -> anyhow::Result<ServerTls> {
        Ok(ServerTls {
            cert: Pki::read(&self.pki.server_cert)?,
            key: Pki::read(&self.pki.server_key)?,
            client_ca: None,
        })
    }

    pub fn required(&self) -> Required {
        Required {
            token: Some(self.token.clone()),
            basic: None,
            tenant: Some(TENANT.to_owned()),
        }
    }

    /// The exporter's files, named by the variables that would name them.
    pub fn export_tls(&self) -> TlsFiles {
        let named = |var: &str, file: &str| Some((var.to_owned(), self.file(file)));
        TlsFiles {
            ca: named("OTEL_EXPORTER_OTLP_CERTIFICATE", "ca.crt"),
            cert: named("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "tls.crt"),
            key: named("OTEL_EXPORTER_OTLP_CLIENT_KEY", "tls.key"),
        }
    }

    /// How the agent reads the store back.
    pub fn store_access(&self) -> Access {
        Access {
            tls: TlsFiles {
                ca: Some(("--trace-store-ca-file".into(), self.file("ca.crt"))),
                ..TlsFiles::default()
            },
            token_file: Some(("--trace-store-token-file".into(), self.file("token"))),
            basic: None,
            tenant: Some(TENANT.to_owned()),
        }
    }

    /// The environment of a program exporting to the store (a service, a
    /// load client): the OpenTelemetry TLS variables.
    pub fn exporter_env(&self) -> Vec<(String, String)> {
        let files = self.export_tls();
        [files.ca, files.cert, files.key]
            .into_iter()
            .flatten()
            .map(|(var, p)| (var, p.display().to_string()))
            .collect()
    }

    /// A container agent's trace-store settings (its ConfigMap's), the
    /// Secret [`SECRET`] mounted at `dir` (the lab keeps the store's token
    /// in the same Secret). The exporter's variables are the manifest's own
    /// (`deploy/otlp-tls`).
    pub fn container_store_settings(&self, dir: &Path) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("TRACEGAP_TRACE_STORE_CA_FILE", "ca.crt"),
            ("TRACEGAP_TRACE_STORE_TOKEN_FILE", "token"),
        ]
        .into_iter()
        .map(|(var, file)| (var.into(), dir.join(file).display().to_string()))
        .collect();
        env.push(("TRACEGAP_TRACE_STORE_TENANT".into(), TENANT.into()));
        env
    }
}
