//! Who is behind an address: names for services, for span resources and
//! metric labels. Filled from `--service IP=NAME` and, in a cluster, from
//! the Kubernetes API; an unknown address is named by itself.

use std::{collections::HashMap, net::IpAddr, sync::RwLock};

use thiserror::Error;

use crate::gap::span::Identity;

/// A `--service` value that is not `IP=NAME`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("expected IP=NAME, got {0:?}")]
pub struct ParseError(String);

/// Parses `10.0.0.2=service-b`.
pub fn parse_mapping(s: &str) -> Result<(IpAddr, String), ParseError> {
    let (ip, name) = s.split_once('=').ok_or_else(|| ParseError(s.to_owned()))?;
    let ip = ip.trim().parse().map_err(|_| ParseError(s.to_owned()))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(ParseError(s.to_owned()));
    }
    Ok((ip, name.to_owned()))
}

/// A names file line that cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "line {line}: expected `IP SERVICE [NAMESPACE/POD] [instrumented=true|false]`, got {text:?}"
)]
pub struct NamesFileError {
    pub line: usize,
    pub text: String,
}

/// Reads a names file: one `IP SERVICE [NAMESPACE/POD] [instrumented=BOOL]`
/// per line, `#`
/// comments and blank lines ignored. The standalone agent's stand-in for
/// the Kubernetes API: the same identities, written down.
pub fn parse_names_file(text: &str) -> Result<Vec<(IpAddr, Identity)>, NamesFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.split('#').next().unwrap_or_default().trim();
        if l.is_empty() {
            continue;
        }
        let bad = || NamesFileError {
            line: i + 1,
            text: raw.to_owned(),
        };
        let mut f = l.split_whitespace();
        let ip: IpAddr = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let service = f.next().ok_or_else(bad)?.to_owned();
        let mut id = Identity {
            service,
            ..Identity::default()
        };
        for token in f {
            match token.split_once('=') {
                Some(("instrumented", v)) => {
                    id.instrumented = Some(v.parse().map_err(|_| bad())?);
                }
                Some(_) => return Err(bad()),
                None if id.pod.is_none() => {
                    let (n, p) = token.split_once('/').ok_or_else(bad)?;
                    id.namespace = Some(n.to_owned());
                    id.pod = Some(p.to_owned());
                }
                None => return Err(bad()),
            }
        }
        out.push((ip, id));
    }
    Ok(out)
}

/// Addresses to identities, shared by the data path (reads) and whatever
/// keeps it current (writes).
#[derive(Default)]
pub struct Directory {
    entries: RwLock<HashMap<IpAddr, Identity>>,
}

impl Directory {
    pub fn with_identities(ids: impl IntoIterator<Item = (IpAddr, Identity)>) -> Self {
        let d = Self::default();
        for (ip, id) in ids {
            d.set(ip, id);
        }
        d
    }

    pub fn set(&self, ip: IpAddr, identity: Identity) {
        if let Ok(mut e) = self.entries.write() {
            e.insert(ip, identity);
        }
    }

    pub fn remove(&self, ip: &IpAddr) {
        if let Ok(mut e) = self.entries.write() {
            e.remove(ip);
        }
    }

    /// The identity of `ip`, or the address itself as the service name.
    pub fn lookup(&self, ip: IpAddr) -> Identity {
        self.entries
            .read()
            .ok()
            .and_then(|e| e.get(&ip).cloned())
            .unwrap_or_else(|| Identity::unknown(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_parse_and_unknown_addresses_name_themselves() {
        let (ip, name) = parse_mapping("10.0.0.2=service-b").unwrap();
        assert_eq!(name, "service-b");
        assert!(parse_mapping("10.0.0.2").is_err());
        assert!(parse_mapping("nope=x").is_err());
        assert!(parse_mapping("10.0.0.2=").is_err());
        let d = Directory::with_identities([(
            ip,
            Identity {
                service: name,
                ..Identity::default()
            },
        )]);
        assert_eq!(d.lookup(ip).service, "service-b");
        let other: IpAddr = "fd00::9".parse().unwrap();
        assert_eq!(d.lookup(other).service, "fd00::9");
    }

    #[test]
    fn names_files_are_read_line_by_line() {
        let ids = parse_names_file(
            "# lab\n10.209.1.2 service-a lab/service-a-0\n\n10.209.1.3  service-b # no pod\n",
        )
        .unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].1.pod.as_deref(), Some("service-a-0"));
        assert_eq!(ids[0].1.namespace.as_deref(), Some("lab"));
        assert_eq!(ids[1].1.service, "service-b");
        assert_eq!(ids[1].1.pod, None);
        let e = parse_names_file("10.0.0.1 a\nnot-an-ip b\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse_names_file("10.0.0.1 a b c").is_err());
        let ids = parse_names_file("10.0.0.1 nginx lab/nginx-0 instrumented=false").unwrap();
        assert_eq!(ids[0].1.instrumented, Some(false));
        assert!(parse_names_file("10.0.0.1 a instrumented=maybe").is_err());
        assert!(parse_names_file("10.0.0.1 a nopod").is_err());
    }
}
