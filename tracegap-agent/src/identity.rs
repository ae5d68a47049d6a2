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

/// Addresses to identities, shared by the data path (reads) and whatever
/// keeps it current (writes).
#[derive(Default)]
pub struct Directory {
    entries: RwLock<HashMap<IpAddr, Identity>>,
}

impl Directory {
    pub fn with_names(names: impl IntoIterator<Item = (IpAddr, String)>) -> Self {
        let d = Self::default();
        for (ip, service) in names {
            d.set(
                ip,
                Identity {
                    service,
                    ..Identity::default()
                },
            );
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

    pub fn len(&self) -> usize {
        self.entries.read().map_or(0, |e| e.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let d = Directory::with_names([(ip, name)]);
        assert_eq!(d.lookup(ip).service, "service-b");
        let other: IpAddr = "fd00::9".parse().unwrap();
        assert_eq!(d.lookup(other).service, "fd00::9");
    }
}
