//! Bounds-checked header access. Everything the tc programs decide on is
//! read here once, into plain values; writes go through the skb helpers
//! (which keep checksums and the skb consistent), never through pointers
//! kept across them.

use core::mem;

use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use proxy_common::{Counter, Flow4, proto};

/// Where the IPv4 header starts (after an untagged Ethernet header).
pub const IP_OFF: usize = EthHdr::LEN;
/// IPv4 header fields, relative to [`IP_OFF`].
pub const IP_TTL: usize = 8;
pub const IP_CSUM: usize = 10;
pub const IP_SRC: usize = 12;
pub const IP_DST: usize = 16;
/// Enough for Ethernet, an IPv4 header with options and a TCP header, or
/// an ICMP error quoting an IPv4 header and 8 bytes of its payload.
const HEADROOM: u32 = 128;

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The packet of either hook, as the parser reads it.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length (an skb's paged data included).
    fn len(&self) -> usize;
    /// Makes the first `len` bytes directly readable, where it can.
    fn pull(&self, len: u32);
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn pull(&self, len: u32) {
        let _ = self.pull_data(len);
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        // Opaque to the optimizer: derived from data_end, it would let LLVM
        // prove the bounds checks against data_end redundant and drop them,
        // and the verifier needs every one.
        core::hint::black_box(XdpContext::data_end(self) - XdpContext::data(self))
    }
    #[inline(always)]
    fn pull(&self, _len: u32) {}
}

/// A `T` at `offset` of the packet's linear data, if it fits.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// A writable `T` at `offset` (XDP writes in place).
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &impl Packet, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|ptr| ptr as *mut T)
}

/// An IPv4 packet whose header was checked: version, IHL, total length.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub ttl: u8,
    /// Header length in bytes (IHL * 4, options included).
    pub header_len: usize,
    /// The total length the header claims (host order).
    pub total_len: usize,
}

impl Ipv4 {
    /// Offset of the transport header.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        IP_OFF + self.header_len
    }
}

/// What the first look at a frame found.
pub enum Frame {
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...): left alone.
    Other,
    /// Broken or truncated: left alone and counted.
    Malformed(Counter),
    /// A fragment: only the first carries ports, so none is balanced here.
    Fragment,
    Ipv4(Ipv4),
}

/// Reads and checks the Ethernet and IPv4 headers.
#[inline(always)]
pub fn frame(ctx: &impl Packet) -> Frame {
    // Headers may sit in paged data (GRO); bring what is read into the
    // linear part once.
    let wanted = if ctx.len() < HEADROOM as usize {
        ctx.len() as u32
    } else {
        HEADROOM
    };
    if ctx.data() + wanted as usize > ctx.data_end() {
        ctx.pull(wanted);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Frame::Malformed(Counter::MalformedTruncated);
    };
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Frame::Other;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, IP_OFF) else {
        return Frame::Malformed(Counter::MalformedTruncated);
    };
    let ip = unsafe { *ip };
    let header_len = ((ip.vihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4
        || header_len < Ipv4Hdr::LEN
        || total_len < header_len
        || IP_OFF + total_len > ctx.len()
    {
        return Frame::Malformed(Counter::MalformedIpHeader);
    }
    // More-fragments flag or a fragment offset.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Frame::Fragment;
    }
    Frame::Ipv4(Ipv4 {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        proto: ip.proto,
        ttl: ip.ttl,
        header_len,
        total_len,
    })
}

/// The transport header of a TCP or UDP packet.
#[derive(Clone, Copy)]
pub struct Ports {
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the L4 checksum.
    pub csum_off: usize,
    /// `l4_csum_replace` flags for this protocol (UDP's checksum 0 means
    /// "none" and must stay 0).
    pub csum_flags: u64,
}

impl Ports {
    #[inline(always)]
    pub fn flow(&self, ip: &Ipv4) -> Flow4 {
        Flow4::new(ip.saddr, ip.daddr, self.sport, self.dport, ip.proto)
    }
}

/// `l4_csum_replace`: a UDP checksum of 0 (none) stays 0.
pub const BPF_F_MARK_MANGLED_0: u64 = 32;

/// Ports of a TCP or UDP packet whose header lies within the packet and the
/// length the IPv4 header claims; `None` when truncated.
#[inline(always)]
pub fn ports(ctx: &impl Packet, ip: &Ipv4) -> Option<Ports> {
    let off = ip.l4_off();
    let end = IP_OFF + ip.total_len;
    if ip.proto == proto::TCP {
        if off + TcpHdr::LEN > end {
            return None;
        }
        let tcp = unsafe { *ptr_at::<TcpHdr>(ctx, off)? };
        let raw: [u8; 20] = unsafe { mem::transmute(tcp) };
        Some(Ports {
            sport: u16::from_ne_bytes(tcp.source),
            dport: u16::from_ne_bytes(tcp.dest),
            tcp_flags: raw[13],
            csum_off: off + 16,
            csum_flags: 0,
        })
    } else {
        if off + UdpHdr::LEN > end {
            return None;
        }
        let udp = unsafe { *ptr_at::<UdpHdr>(ctx, off)? };
        Some(Ports {
            sport: u16::from_ne_bytes(udp.src),
            dport: u16::from_ne_bytes(udp.dst),
            tcp_flags: 0,
            csum_off: off + 6,
            csum_flags: BPF_F_MARK_MANGLED_0,
        })
    }
}
