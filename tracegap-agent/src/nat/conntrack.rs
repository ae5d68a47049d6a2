//! Asking the kernel's connection tracker which backend a Service address
//! was translated to: one `IPCTNL_MSG_CT_GET` over `NETLINK_NETFILTER`.
//!
//! kube-proxy (iptables, nftables and IPVS modes alike) rewrites a call to a
//! ClusterIP with DNAT, and conntrack remembers the rewrite for the life of
//! the connection: the entry's *reply* tuple starts at the backend pod. The
//! query needs `CAP_NET_ADMIN` in the node's network namespace, which the
//! agent has anyway for TC. Only the client's node has the entry (the DNAT
//! happened there), which is also the node that reports the hop.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use thiserror::Error;

use crate::events::{Endpoint, Flow};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_TCP: u8 = 6;

/// How long one query may wait for the kernel's answer. The kernel answers
/// in microseconds; the bound only keeps a wedged socket from holding the
/// data path.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(100);

/// Why a conntrack query failed.
#[derive(Debug, Error)]
pub enum ConntrackError {
    /// The netlink socket could not be opened (no CAP_NET_ADMIN, or a kernel
    /// without nf_conntrack_netlink).
    #[error("opening a NETLINK_NETFILTER socket: {0}")]
    Open(#[source] io::Error),
    /// Sending or receiving failed (including the answer timing out).
    #[error("conntrack query: {0}")]
    Io(#[source] io::Error),
    /// The kernel refused the query with this errno (ENOENT is not an
    /// error: it is `Ok(None)`).
    #[error("conntrack answered errno {0}")]
    Kernel(i32),
    /// The answer could not be read.
    #[error("conntrack answer is malformed: {0}")]
    Malformed(&'static str),
}

/// A netlink socket for conntrack queries in the agent's network namespace.
pub struct Conntrack {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    pub fn open() -> Result<Self, ConntrackError> {
        // SAFETY: plain socket creation; the fd is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(ConntrackError::Open(io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: ANSWER_TIMEOUT.as_micros() as libc::suseconds_t,
        };
        // SAFETY: tv outlives the call; the size is tv's.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(ConntrackError::Open(io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; 8192],
        })
    }

    /// The backend a connection addressed to `orig.dst` was translated to:
    /// the source of the entry's reply tuple. `Ok(None)`: no entry (not a
    /// tracked connection, or already gone).
    pub fn backend(&mut self, orig: &Flow) -> Result<Option<Endpoint>, ConntrackError> {
        self.seq = self.seq.wrapping_add(1);
        let req = encode_get(orig, self.seq);
        // SAFETY: a zeroed sockaddr_nl is "the kernel" (pid 0, no groups).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: req and to outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(ConntrackError::Io(io::Error::last_os_error()));
        }
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(ConntrackError::Io(io::Error::last_os_error()));
            }
            match parse_answer(&self.buf[..n as usize], self.seq)? {
                Answer::Stale => continue,
                Answer::Found(ep) => return Ok(Some(ep)),
                Answer::NotFound => return Ok(None),
            }
        }
    }
}

fn push_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn nested(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

fn family(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// The GET request for the entry whose original tuple is `orig`.
fn encode_get(orig: &Flow, seq: u32) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    // nfgenmsg: family, version 0, res_id 0 (big endian).
    m.extend_from_slice(&[family(&orig.src.ip), 0, 0, 0]);
    nested(&mut m, CTA_TUPLE_ORIG, |m| {
        nested(m, CTA_TUPLE_IP, |m| match (orig.src.ip, orig.dst.ip) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                push_attr(m, CTA_IP_V4_SRC, &s.octets());
                push_attr(m, CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                let v6 = |ip: IpAddr| match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
                push_attr(m, CTA_IP_V6_SRC, &v6(s));
                push_attr(m, CTA_IP_V6_DST, &v6(d));
            }
        });
        nested(m, CTA_TUPLE_PROTO, |m| {
            push_attr(m, CTA_PROTO_NUM, &[IPPROTO_TCP]);
            push_attr(m, CTA_PROTO_SRC_PORT, &orig.src.port.to_be_bytes());
            push_attr(m, CTA_PROTO_DST_PORT, &orig.dst.port.to_be_bytes());
        });
    });
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

enum Answer {
    /// An answer to an earlier query (one that timed out): skip it.
    Stale,
    Found(Endpoint),
    NotFound,
}

/// Netlink attributes in `b`: (type without flags, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), ConntrackError>> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            b = &[];
            return Some(Err(ConntrackError::Malformed("attribute length")));
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some(Ok((kind, payload)))
    })
}

fn find(b: &[u8], kind: u16) -> Result<Option<&[u8]>, ConntrackError> {
    for a in attrs(b) {
        let (k, payload) = a?;
        if k == kind {
            return Ok(Some(payload));
        }
    }
    Ok(None)
}

/// The source endpoint of a tuple attribute's payload.
fn tuple_source(tuple: &[u8]) -> Result<Endpoint, ConntrackError> {
    let ip_attrs = find(tuple, CTA_TUPLE_IP)?.ok_or(ConntrackError::Malformed("no tuple ip"))?;
    let ip = if let Some(v4) = find(ip_attrs, CTA_IP_V4_SRC)? {
        let o: [u8; 4] = v4
            .try_into()
            .map_err(|_| ConntrackError::Malformed("ipv4 length"))?;
        IpAddr::from(o)
    } else if let Some(v6) = find(ip_attrs, CTA_IP_V6_SRC)? {
        let o: [u8; 16] = v6
            .try_into()
            .map_err(|_| ConntrackError::Malformed("ipv6 length"))?;
        IpAddr::from(o)
    } else {
        return Err(ConntrackError::Malformed("no source address"));
    };
    let proto = find(tuple, CTA_TUPLE_PROTO)?.ok_or(ConntrackError::Malformed("no tuple proto"))?;
    let port = find(proto, CTA_PROTO_SRC_PORT)?
        .and_then(|p| <[u8; 2]>::try_from(p).ok())
        .ok_or(ConntrackError::Malformed("no source port"))?;
    Ok(Endpoint {
        ip,
        port: u16::from_be_bytes(port),
    })
}

/// Reads one datagram of answers to the query numbered `seq`.
fn parse_answer(mut b: &[u8], seq: u32) -> Result<Answer, ConntrackError> {
    let mut stale = false;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let got_seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        if len < 16 || len > b.len() {
            return Err(ConntrackError::Malformed("message length"));
        }
        let body = &b[16..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        if got_seq != seq {
            stale = true;
            continue;
        }
        if kind == NLMSG_ERROR {
            let errno = body
                .get(..4)
                .map(|e| -i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
                .ok_or(ConntrackError::Malformed("short error"))?;
            return match errno {
                0 => Ok(Answer::NotFound),
                libc::ENOENT => Ok(Answer::NotFound),
                e => Err(ConntrackError::Kernel(e)),
            };
        }
        // nfgenmsg, then the entry's attributes.
        let entry = body
            .get(4..)
            .ok_or(ConntrackError::Malformed("short entry"))?;
        let reply =
            find(entry, CTA_TUPLE_REPLY)?.ok_or(ConntrackError::Malformed("no reply tuple"))?;
        return tuple_source(reply).map(Answer::Found);
    }
    if stale {
        Ok(Answer::Stale)
    } else {
        Err(ConntrackError::Malformed("empty answer"))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ep(a: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            ip: IpAddr::V4(Ipv4Addr::from(a)),
            port,
        }
    }

    /// An answer as the kernel writes it: the entry with both tuples.
    fn answer(seq: u32, orig: &Flow, reply_src: Endpoint) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
        let tuple = |m: &mut Vec<u8>, kind, src: Endpoint, dst: Endpoint| {
            nested(m, kind, |m| {
                nested(m, CTA_TUPLE_IP, |m| {
                    let o = |ip: IpAddr| match ip {
                        IpAddr::V4(v) => v.octets(),
                        IpAddr::V6(_) => unreachable!(),
                    };
                    push_attr(m, CTA_IP_V4_SRC, &o(src.ip));
                    push_attr(m, CTA_IP_V4_DST, &o(dst.ip));
                });
                nested(m, CTA_TUPLE_PROTO, |m| {
                    push_attr(m, CTA_PROTO_NUM, &[IPPROTO_TCP]);
                    push_attr(m, CTA_PROTO_SRC_PORT, &src.port.to_be_bytes());
                    push_attr(m, CTA_PROTO_DST_PORT, &dst.port.to_be_bytes());
                });
            })
        };
        tuple(&mut m, CTA_TUPLE_ORIG, orig.src, orig.dst);
        tuple(&mut m, CTA_TUPLE_REPLY, reply_src, orig.src);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8).to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m
    }

    fn error(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m
    }

    fn flow() -> Flow {
        Flow {
            src: ep([10, 209, 1, 2], 41000),
            dst: ep([10, 96, 0, 10], 80),
        }
    }

    #[test]
    fn a_get_names_the_original_tuple() {
        let m = encode_get(&flow(), 7);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0101);
        assert_eq!(m[16], libc::AF_INET as u8);
        let orig = find(&m[20..], CTA_TUPLE_ORIG).unwrap().unwrap();
        assert_eq!(tuple_source(orig).unwrap(), flow().src);
        let ip = find(orig, CTA_TUPLE_IP).unwrap().unwrap();
        assert_eq!(find(ip, CTA_IP_V4_DST).unwrap().unwrap(), [10, 96, 0, 10]);
        let proto = find(orig, CTA_TUPLE_PROTO).unwrap().unwrap();
        assert_eq!(
            find(proto, CTA_PROTO_DST_PORT).unwrap().unwrap(),
            80u16.to_be_bytes()
        );
    }

    #[test]
    fn the_backend_is_the_reply_tuples_source() {
        let backend = ep([10, 209, 2, 7], 8080);
        match parse_answer(&answer(3, &flow(), backend), 3).unwrap() {
            Answer::Found(b) => assert_eq!(b, backend),
            _ => panic!("expected a backend"),
        }
        // No entry: not an error. Another errno is.
        assert!(matches!(
            parse_answer(&error(3, libc::ENOENT), 3),
            Ok(Answer::NotFound)
        ));
        assert!(matches!(
            parse_answer(&error(3, libc::EPERM), 3),
            Err(ConntrackError::Kernel(e)) if e == libc::EPERM
        ));
        // An answer to an earlier, timed-out query is skipped.
        assert!(matches!(
            parse_answer(&answer(2, &flow(), backend), 3),
            Ok(Answer::Stale)
        ));
        // Truncated input is an error, never a panic.
        let a = answer(3, &flow(), backend);
        for cut in 0..a.len() {
            let _ = parse_answer(&a[..cut], 3);
        }
    }
}
