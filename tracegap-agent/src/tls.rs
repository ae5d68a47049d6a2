//! TLS connections seen on the wire ([`tracegap_common::EventKind::TlsHello`]):
//! the ClientHello's server name (SNI) and ALPN, which say what an
//! encrypted edge is, though nothing inside it can be read.
//!
//! Only what the client sends in the clear before encryption starts is
//! read. A hello the kernel cut (it copies [`tracegap_common::TLS_HELLO_BUDGET`]
//! bytes) yields what came before the cut.

/// What a ClientHello says of its connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name asked for (SNI), lowercased; None when absent, not
    /// a host name, or past the bytes copied.
    pub server_name: Option<String>,
    /// The protocols offered (ALPN), e.g. `h2`, `http/1.1`.
    pub alpn: Vec<String>,
    /// Whether the extensions were read to their end.
    pub whole: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("not a TLS handshake record holding a ClientHello")]
    NotClientHello,
    #[error("ClientHello cut before its extensions ({0} bytes)")]
    Cut(usize),
}

/// Longest DNS name (RFC 1035).
const MAX_NAME: usize = 253;

/// A cursor over the hello's bytes; every read is bounded.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize) -> Option<&'a [u8]> {
        let n = if width == 1 { self.u8()? } else { self.u16()? };
        self.take(n)
    }
}

impl ClientHello {
    /// Reads the hello at the start of `bytes` (a TLS record).
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let mut b = Bytes(bytes);
        let record = b.take(5).ok_or(Error::NotClientHello)?;
        if record[0] != 0x16 || record[1] != 0x03 {
            return Err(Error::NotClientHello);
        }
        let handshake = b.take(4).ok_or(Error::NotClientHello)?;
        if handshake[0] != 0x01 {
            return Err(Error::NotClientHello);
        }
        let cut = || Error::Cut(bytes.len());
        // Version and random, the session id, the cipher suites and the
        // compression methods: skipped.
        b.take(2 + 32).ok_or_else(cut)?;
        b.vec(1).ok_or_else(cut)?;
        b.vec(2).ok_or_else(cut)?;
        b.vec(1).ok_or_else(cut)?;
        let Some(total) = b.u16() else {
            // No extensions at all (or cut right there): no name to read.
            return Ok(Self {
                whole: b.0.is_empty(),
                ..Self::default()
            });
        };
        let whole = b.0.len() >= total;
        let mut ext = Bytes(&b.0[..total.min(b.0.len())]);
        let mut hello = Self {
            whole,
            ..Self::default()
        };
        while let (Some(kind), Some(body)) = (ext.u16(), ext.vec(2)) {
            match kind {
                0 => hello.server_name = server_name(body),
                16 => hello.alpn = alpn(body),
                _ => {}
            }
        }
        Ok(hello)
    }
}

/// The first host name of a server_name extension's list, if it is one.
fn server_name(body: &[u8]) -> Option<String> {
    let mut list = Bytes(Bytes(body).vec(2)?);
    while let Some(kind) = list.u8() {
        let name = list.vec(2)?;
        if kind == 0 {
            return host_name(name);
        }
    }
    None
}

/// `name` as a label value: a DNS name's characters only, lowercased.
fn host_name(name: &[u8]) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
    ok.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// The protocols of an ALPN extension, printable ones only.
fn alpn(body: &[u8]) -> Vec<String> {
    let Some(list) = Bytes(body).vec(2) else {
        return Vec::new();
    };
    let mut list = Bytes(list);
    let mut out = Vec::new();
    while let Some(p) = list.vec(1) {
        if !p.is_empty() && p.iter().all(|c| c.is_ascii_graphic()) && out.len() < 8 {
            out.push(String::from_utf8_lossy(p).into_owned());
        }
    }
    out
}

/// How long a TLS connection's hello waits for its plaintext (from
/// OpenSSL's probes) before it is counted as unread: a client sends its
/// first request within moments of the handshake; a pooled connection
/// idle for longer is counted as unread, though a later read still makes
/// hops.
pub const PLAINTEXT_WAIT_NS: u64 = 5_000_000_000;
/// Hellos waiting at most; past it a new one is decided at once (unread).
pub const MAX_WAITING: usize = 16 * 1024;

/// TLS connections seen starting, waiting to learn whether their
/// plaintext is read, keyed by the hello's flow (client to server).
pub struct Waiting<T> {
    by_flow: crate::FastMap<crate::events::Flow, (u64, T)>,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Self {
            by_flow: Default::default(),
        }
    }
}

impl<T> Waiting<T> {
    /// A hello on `flow` at `ts_ns`; gives `what` back when it cannot wait.
    pub fn hello(&mut self, flow: crate::events::Flow, ts_ns: u64, what: T) -> Option<T> {
        if self.by_flow.len() >= MAX_WAITING && !self.by_flow.contains_key(&flow) {
            return Some(what);
        }
        self.by_flow.insert(flow, (ts_ns, what));
        None
    }

    /// Plaintext on `flow` (either way): the hello it answers, if waiting.
    pub fn plaintext(&mut self, flow: &crate::events::Flow) -> Option<T> {
        if self.by_flow.is_empty() {
            return None;
        }
        self.by_flow
            .remove(flow)
            .or_else(|| self.by_flow.remove(&flow.reversed()))
            .map(|(_, t)| t)
    }

    /// The hellos that waited [`PLAINTEXT_WAIT_NS`] by `now_ns` in vain.
    pub fn expired(&mut self, now_ns: u64) -> Vec<T> {
        let cutoff = now_ns.saturating_sub(PLAINTEXT_WAIT_NS);
        let gone: Vec<_> = self
            .by_flow
            .iter()
            .filter(|(_, (ts, _))| *ts < cutoff)
            .map(|(f, _)| *f)
            .collect();
        gone.into_iter()
            .filter_map(|f| self.by_flow.remove(&f).map(|(_, t)| t))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_flow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_flow.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_hello_is_answered_by_its_plaintext_either_way_or_expires() {
        use crate::events::{Endpoint, Flow};
        let ep = |last: u8, port| Endpoint {
            ip: std::net::Ipv4Addr::new(10, 0, 0, last).into(),
            port,
        };
        let (a, b) = (
            Flow {
                src: ep(1, 40000),
                dst: ep(2, 443),
            },
            Flow {
                src: ep(1, 40001),
                dst: ep(2, 443),
            },
        );
        let mut w = super::Waiting::default();
        assert_eq!(w.hello(a, 1_000, "a"), None);
        assert_eq!(w.hello(b, 2_000, "b"), None);
        // The server's read names the request's flow; the client's read
        // of the answer, the other way round.
        assert_eq!(w.plaintext(&a.reversed()), Some("a"));
        assert_eq!(w.plaintext(&a), None);
        assert!(w.expired(2_000 + super::PLAINTEXT_WAIT_NS - 1).is_empty());
        assert_eq!(w.expired(2_001 + super::PLAINTEXT_WAIT_NS), vec!["b"]);
        assert!(w.is_empty());
    }

    use super::*;

    /// A ClientHello with these extensions, as a TLS record.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(32);
        body.extend([9u8; 32]);
        body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend([1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![0x01, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
        rec.extend(hs);
        rec
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        (0, data)
    }

    fn alpn_ext(protocols: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for p in protocols {
            list.push(p.len() as u8);
            list.extend(p.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        (16, data)
    }

    #[test]
    fn reads_the_server_name_and_alpn() {
        let h = ClientHello::parse(&hello(&[
            (10, vec![0, 2, 0, 29]),
            sni(b"Inventory.Shop.svc"),
            alpn_ext(&["h2", "http/1.1"]),
        ]))
        .expect("a hello");
        assert_eq!(h.server_name.as_deref(), Some("inventory.shop.svc"));
        assert_eq!(h.alpn, ["h2", "http/1.1"]);
        assert!(h.whole);
    }

    #[test]
    fn a_cut_hello_gives_what_came_before_the_cut() {
        let mut bytes = hello(&[sni(b"a.example"), (51, vec![0; 1200]), alpn_ext(&["h2"])]);
        bytes.truncate(1024);
        let h = ClientHello::parse(&bytes).expect("a hello");
        assert_eq!(h.server_name.as_deref(), Some("a.example"));
        assert!(h.alpn.is_empty());
        assert!(!h.whole);
        // Cut inside the cipher suites: no extension was reached.
        assert_eq!(ClientHello::parse(&bytes[..80]), Err(Error::Cut(80)));
    }

    #[test]
    fn a_name_that_is_no_host_name_is_not_taken() {
        let h = ClientHello::parse(&hello(&[sni(b"x\"} 1\nfake_metric 2")])).expect("a hello");
        assert_eq!(h.server_name, None);
        let h = ClientHello::parse(&hello(&[])).expect("a hello");
        assert_eq!(
            h,
            ClientHello {
                whole: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(
            ClientHello::parse(b"GET / HTTP/1.1\r\n\r\n"),
            Err(Error::NotClientHello)
        );
        // A ServerHello (handshake type 2).
        let mut bytes = hello(&[]);
        bytes[5] = 2;
        assert_eq!(ClientHello::parse(&bytes), Err(Error::NotClientHello));
        assert_eq!(
            ClientHello::parse(&[0x16, 0x03]),
            Err(Error::NotClientHello)
        );
    }
}
