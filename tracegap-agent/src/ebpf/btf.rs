//! Where the fields of `struct sock` the thread programs read are in the
//! running kernel, from its BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya-ebpf emits no CO-RE relocations, so a program built against one
//! kernel's layout would read garbage on another's. The agent reads the
//! layout here, at load time, and hands the offsets to the programs as
//! globals. Only what that needs is parsed: the type section's records,
//! to find two structs and their members (descending into anonymous
//! unions and structs, as `sock_common` nests its address and port pairs).

use thiserror::Error;

/// The kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {VMLINUX}: {0}")]
    Read(#[from] std::io::Error),
    #[error("not BTF (magic {0:#x})")]
    Magic(u16),
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("BTF type kind {0} unknown")]
    Kind(u32),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(&'static str),
    #[error("no member {member} in struct {within}")]
    NoMember {
        within: &'static str,
        member: &'static str,
    },
}

/// Byte offsets into `struct sock` (see `tracegap_common::sock_field`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    pub daddr: u32,
    pub rcv_saddr: u32,
    pub dport: u32,
    pub num: u32,
    pub family: u32,
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
}

impl SockOffsets {
    /// From the running kernel.
    pub fn from_kernel() -> Result<Self, BtfError> {
        Self::parse(&std::fs::read(VMLINUX)?)
    }

    /// From BTF bytes (little-endian, as on every target tracegap runs on).
    pub fn parse(btf: &[u8]) -> Result<Self, BtfError> {
        let types = Types::parse(btf)?;
        let sock = types.struct_named("sock")?;
        let common = types.member(sock, "sock", "__sk_common")?;
        let common_id = types.struct_named("sock_common")?;
        let at = |m: &'static str| -> Result<u32, BtfError> {
            Ok(common + types.member(common_id, "sock_common", m)?)
        };
        Ok(Self {
            daddr: at("skc_daddr")?,
            rcv_saddr: at("skc_rcv_saddr")?,
            dport: at("skc_dport")?,
            num: at("skc_num")?,
            family: at("skc_family")?,
            v6_daddr: at("skc_v6_daddr")?,
            v6_rcv_saddr: at("skc_v6_rcv_saddr")?,
        })
    }

    /// (global name, offset) pairs, as the programs name them.
    pub fn globals(&self) -> [(&'static str, u32); 7] {
        use tracegap_common::sock_field::*;
        [
            (DADDR, self.daddr),
            (RCV_SADDR, self.rcv_saddr),
            (DPORT, self.dport),
            (NUM, self.num),
            (FAMILY, self.family),
            (V6_DADDR, self.v6_daddr),
            (V6_RCV_SADDR, self.v6_rcv_saddr),
        ]
    }
}

struct Types<'a> {
    strings: &'a [u8],
    /// The type section.
    t: &'a [u8],
    /// Where each type's record starts in `t`, by type id (id 0 is void):
    /// members are read when asked for, not kept (the kernel's BTF has
    /// some hundred thousand types).
    at: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated(at))
}

impl<'a> Types<'a> {
    fn parse(b: &'a [u8]) -> Result<Self, BtfError> {
        let magic = b
            .get(0..2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
            .ok_or(BtfError::Truncated(0))?;
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let section = |off: usize, len: usize| {
            b.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Truncated(hdr_len + off + len))
        };
        let (t, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        let mut at = vec![0];
        let mut pos = 0;
        while pos < t.len() {
            let info = u32_at(t, pos + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            at.push(pos as u32);
            pos += 12
                + match kind {
                    1 | 14 | 17 => 4,
                    3 => 12,
                    KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen,
                    6 | 13 => 8 * vlen,
                    2 | 7..=12 | 16 | 18 => 0,
                    k => return Err(BtfError::Kind(k)),
                };
        }
        Ok(Self { strings, t, at })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
    }

    /// A struct's or union's name and members (name, type id, bit offset).
    fn composite(&self, id: u32) -> Option<(u32, impl Iterator<Item = (u32, u32, u32)> + '_)> {
        let pos = *self.at.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let (name, info) = (u32_at(self.t, pos).ok()?, u32_at(self.t, pos + 4).ok()?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if !matches!(kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        let bitfield_offsets = info >> 31 == 1;
        let members = (0..vlen).filter_map(move |i| {
            let m = pos + 12 + 12 * i;
            let offset = u32_at(self.t, m + 8).ok()?;
            let bits = if bitfield_offsets {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            Some((u32_at(self.t, m).ok()?, u32_at(self.t, m + 4).ok()?, bits))
        });
        Some((name, members))
    }

    fn struct_named(&self, name: &'static str) -> Result<u32, BtfError> {
        (1..self.at.len() as u32)
            .find(|&id| {
                self.composite(id).is_some_and(|(n, mut members)| {
                    self.name(n) == name.as_bytes() && members.next().is_some()
                })
            })
            .ok_or(BtfError::NoStruct(name))
    }

    /// A member's byte offset, looked for in anonymous members too.
    fn member(&self, id: u32, within: &'static str, member: &'static str) -> Result<u32, BtfError> {
        self.find(id, member.as_bytes(), 0)
            .map(|bits| bits / 8)
            .ok_or(BtfError::NoMember { within, member })
    }

    fn find(&self, id: u32, member: &[u8], depth: u32) -> Option<u32> {
        let (_, members) = self.composite(id)?;
        for (name, ty, bits) in members {
            if name != 0 && self.name(name) == member {
                return Some(bits);
            }
            if name == 0
                && depth < 4
                && let Some(inner) = self.find(ty, member, depth + 1)
            {
                return Some(bits + inner);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_s_sock_layout_is_found() {
        let Ok(btf) = std::fs::read(VMLINUX) else {
            eprintln!("SKIPPED: no {VMLINUX}");
            return;
        };
        let o = SockOffsets::parse(&btf).expect("sock offsets");
        // The start of sock_common has not moved since 2.6: the address
        // pair, the hash, the port pair, the family.
        assert_eq!(
            (o.daddr, o.rcv_saddr, o.dport, o.num, o.family),
            (0, 4, 12, 14, 16)
        );
        assert!(
            o.v6_daddr > o.family && o.v6_rcv_saddr == o.v6_daddr + 16,
            "{o:?}"
        );
    }

    #[test]
    fn anything_else_is_an_error_not_a_guess() {
        assert!(matches!(
            SockOffsets::parse(b"not btf at all, not at all"),
            Err(BtfError::Magic(_))
        ));
        assert!(matches!(
            SockOffsets::parse(&[0x9f, 0xeb]),
            Err(BtfError::Truncated(_))
        ));
    }
}
