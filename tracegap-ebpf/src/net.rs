//! Ethernet, IPv4/IPv6 and TCP: just enough to find a segment's payload.
//!
//! Reads go straight to the packet when the bytes are in the skb's linear
//! area (headers almost always are: this is what most packets cost) and
//! through `bpf_skb_load_bytes` otherwise, which also reads the page
//! fragments of non-linear skbs (GSO/GRO super-packets on veth keep most
//! payload there). Nothing here assumes which of the two a packet needs.

use aya_ebpf::programs::TcContext;
use tracegap_common::{FlowKey, family};

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: u32 = 40;

const DIRECT_MAX: usize = 0x8000;

/// `N` bytes at `off` from the start of the packet.
///
/// Direct access costs a bounds check; the helper call it replaces costs a
/// function call and a copy. Used for the headers every packet has, so the
/// common path makes no helper call at all.
#[inline(always)]
pub fn read<const N: usize>(ctx: &TcContext, off: usize) -> Result<[u8; N], ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // The verifier only trusts a bounds check on a pointer whose offset it
    // knows to stay under 64 KiB (MAX_PACKET_OFF). Header offsets are a few
    // hundred bytes; a rare read further in takes the helper.
    if off < DIRECT_MAX && start + off + N <= end {
        // SAFETY: the verifier-checked bound above keeps the read inside
        // the packet's linear data; the bytes are copied out at once.
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) });
    }
    ctx.load(off).map_err(|_| ())
}

/// A TCP segment that carries payload.
#[derive(Clone, Copy)]
pub struct Segment {
    pub flow: FlowKey,
    /// Sequence number of the first payload byte.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Offset of the payload from the start of the packet.
    pub payload_off: u32,
    /// Payload bytes in this skb.
    pub payload_len: u32,
    /// The flow's slot in the table of recently opened header blocks
    /// (`OPEN_SLOTS`, 0..[`OPEN_SLOTS`]).
    pub slot: u32,
}

/// Slots of `OPEN_SLOTS`: a power of two.
pub const OPEN_SLOTS: u32 = 4096;

/// A multiplicative hash of a flow's address words and ports, to a slot:
/// the top bits of the product.
#[inline(always)]
fn slot(addrs: u32, ports: u32) -> u32 {
    (addrs ^ ports).wrapping_mul(0x9E37_79B1) >> (32 - OPEN_SLOTS.trailing_zeros())
}

/// [`slot`] of a flow from its key: the same words as [`tcp_segment`]
/// reads from the packet (IPv4's addresses, IPv6's last words), for the
/// other direction of a connection (each direction has its own slot).
#[inline(always)]
pub fn slot_of(flow: &FlowKey) -> u32 {
    let word = |b: &[u8; 16], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let i = if flow.family == family::IPV6 { 12 } else { 0 };
    let addrs = word(&flow.saddr, i) ^ word(&flow.daddr, i).rotate_left(11);
    slot(addrs, u32::from(flow.sport) << 16 | u32::from(flow.dport))
}

/// The TCP segment in this packet, if it is one with payload.
///
/// `Ok(None)`: not TCP over IPv4/IPv6 on Ethernet, or no payload (the cheap,
/// common exit). `Err(())`: claims to be TCP/IP but its headers cannot be read.
// Not inlined: its header buffers and try_http's then take turns on the
// stack instead of adding up past the 512-byte limit.
#[inline(never)]
pub fn tcp_segment(ctx: &TcContext) -> Result<Option<Segment>, ()> {
    let proto: [u8; 2] = read(ctx, 12)?;
    let proto = u16::from_be_bytes(proto);
    let mut flow = FlowKey::default();
    // Address words for the slot hash, read while the header is at hand.
    let word = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let addrs;
    let (l4_off, l3_payload_end) = match proto {
        ETH_P_IP => {
            // version/ihl, tos, tot_len(2), id(2), frag(2), ttl, proto, csum(2), saddr(4), daddr(4)
            let ip: [u8; 20] = read(ctx, ETH_HLEN as usize)?;
            if ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP {
                return Ok(None);
            }
            // Later fragments carry no TCP header.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return Ok(None);
            }
            let ihl = ((ip[0] & 0x0f) as u32) * 4;
            if ihl < 20 {
                return Err(());
            }
            flow.family = family::IPV4;
            addrs = word(&ip, 12) ^ word(&ip, 16).rotate_left(11);
            flow.saddr[..4].copy_from_slice(&ip[12..16]);
            flow.daddr[..4].copy_from_slice(&ip[16..20]);
            let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as u32;
            // tot_len is 0 for BIG TCP GSO packets: fall back to skb->len.
            let end = if tot_len == 0 {
                u32::MAX
            } else {
                ETH_HLEN + tot_len
            };
            (ETH_HLEN + ihl, end)
        }
        ETH_P_IPV6 => {
            // ver/tc/flow(4), payload_len(2), next_hdr, hop, saddr(16), daddr(16)
            let ip: [u8; 40] = read(ctx, ETH_HLEN as usize)?;
            if ip[0] >> 4 != 6 {
                return Err(());
            }
            // Extension headers are not followed: pod-to-pod HTTP does not use them.
            if ip[6] != IPPROTO_TCP {
                return Ok(None);
            }
            flow.family = family::IPV6;
            // The last words: where addresses in one prefix differ.
            addrs = word(&ip, 20) ^ word(&ip, 36).rotate_left(11);
            flow.saddr.copy_from_slice(&ip[8..24]);
            flow.daddr.copy_from_slice(&ip[24..40]);
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as u32;
            let end = if plen == 0 {
                u32::MAX
            } else {
                ETH_HLEN + IPV6_HLEN + plen
            };
            (ETH_HLEN + IPV6_HLEN, end)
        }
        _ => return Ok(None),
    };

    // sport(2), dport(2), seq(4), ack(4), data offset
    let tcp: [u8; 13] = read(ctx, l4_off as usize)?;
    let doff = ((tcp[12] >> 4) as u32) * 4;
    if doff < 20 {
        return Err(());
    }
    flow.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    flow.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);

    let payload_off = l4_off + doff;
    // Ethernet padding can make skb->len longer than the IP packet.
    let end = ctx.len().min(l3_payload_end);
    if end <= payload_off {
        return Ok(None);
    }
    Ok(Some(Segment {
        flow,
        seq,
        ack,
        payload_off,
        payload_len: end - payload_off,
        slot: slot(addrs, u32::from(flow.sport) << 16 | u32::from(flow.dport)),
    }))
}
