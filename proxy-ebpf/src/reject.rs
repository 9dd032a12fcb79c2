//! Refusing a new external flow from the datapath (rule 21): the packet is
//! turned into the answer a closed port gives (TCP RST for a SYN, ICMP port
//! unreachable for UDP) and sent back out of the device it came in on, so
//! the client's connect fails at once instead of timing out.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{Counter, proto};

use crate::{
    maps::count,
    parse::{IP_OFF, Ipv4, Ports, ptr_at, tcp_flags},
};

const ETH_LEN: usize = IP_OFF;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;
const ICMP_LEN: usize = 8;
/// Ethernet + IPv4 + TCP, no options, no payload.
const RESET_LEN: usize = ETH_LEN + IP_LEN + TCP_LEN;
/// Ethernet + IPv4 + ICMP + the quoted IPv4 header and 8 bytes of UDP.
const UNREACHABLE_LEN: usize = ETH_LEN + IP_LEN + ICMP_LEN + IP_LEN + 8;
const TTL: u8 = 64;

/// Answers the packet with a refusal; packets that must not be answered
/// (a TCP segment other than a SYN, a UDP packet with IP options) are
/// dropped. Either way the refusal is counted.
#[inline(always)]
pub fn refuse(ctx: &TcContext, ip: &Ipv4, ports: &Ports) -> i32 {
    count(Counter::RejectedNoBackend);
    let answered = if ip.proto == proto::TCP {
        tcp_reset(ctx, ip, ports)
    } else {
        port_unreachable(ctx, ip)
    };
    if answered.is_err() {
        return TC_ACT_SHOT as i32;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// RST+ACK for a SYN (RFC 9293: a segment without ACK gets `seq 0` and
/// `ack = its seq + its length`, the SYN counting one).
#[inline(always)]
fn tcp_reset(ctx: &TcContext, ip: &Ipv4, ports: &Ports) -> Result<(), ()> {
    if ports.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) != tcp_flags::SYN {
        return Err(());
    }
    let macs = unsafe { *ptr_at::<[u8; 12]>(ctx, 0).ok_or(())? };
    let tcp = unsafe { *ptr_at::<[u8; 13]>(ctx, ip.l4_off()).ok_or(())? };
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let tcp_header_len = ((tcp[12] >> 4) as usize) * 4;
    let payload = ip.total_len.saturating_sub(ip.header_len + tcp_header_len) as u32;
    let ack = seq.wrapping_add(payload).wrapping_add(1);

    let mut out = [0u8; RESET_LEN];
    ethernet_back(&mut out, &macs);
    ipv4_back(&mut out, ip, proto::TCP, (IP_LEN + TCP_LEN) as u16);
    let t = ETH_LEN + IP_LEN;
    out[t..t + 2].copy_from_slice(&ports.dport.to_ne_bytes());
    out[t + 2..t + 4].copy_from_slice(&ports.sport.to_ne_bytes());
    out[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    out[t + 12] = 5 << 4;
    out[t + 13] = tcp_flags::RST | tcp_flags::ACK;
    let pseudo = pseudo_header_sum(ip, proto::TCP, TCP_LEN as u16);
    let check = fold(sum16(&out[t..t + TCP_LEN], pseudo));
    out[t + 16..t + 18].copy_from_slice(&check.to_be_bytes());
    replace_packet(ctx, &out)
}

/// ICMP destination unreachable, code 3 (port), quoting the UDP packet's
/// header and first 8 bytes.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, ip: &Ipv4) -> Result<(), ()> {
    if ip.header_len != IP_LEN {
        return Err(());
    }
    let quoted = unsafe { *ptr_at::<[u8; ETH_LEN + IP_LEN + 8]>(ctx, 0).ok_or(())? };
    let mut out = [0u8; UNREACHABLE_LEN];
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&quoted[..12]);
    ethernet_back(&mut out, &macs);
    ipv4_back(
        &mut out,
        ip,
        proto::ICMP,
        (IP_LEN + ICMP_LEN + IP_LEN + 8) as u16,
    );
    let i = ETH_LEN + IP_LEN;
    out[i] = 3;
    out[i + 1] = 3;
    out[i + ICMP_LEN..].copy_from_slice(&quoted[ETH_LEN..]);
    let check = fold(sum16(&out[i..], 0));
    out[i + 2..i + 4].copy_from_slice(&check.to_be_bytes());
    replace_packet(ctx, &out)
}

/// Ethernet header back to the sender.
#[inline(always)]
fn ethernet_back(out: &mut [u8], macs: &[u8; 12]) {
    out[0..6].copy_from_slice(&macs[6..12]);
    out[6..12].copy_from_slice(&macs[0..6]);
    out[12] = 0x08;
    out[13] = 0x00;
}

/// IPv4 header back to the sender, from the address it wrote to.
#[inline(always)]
fn ipv4_back(out: &mut [u8], ip: &Ipv4, protocol: u8, total_len: u16) {
    let h = ETH_LEN;
    out[h] = 0x45;
    out[h + 2..h + 4].copy_from_slice(&total_len.to_be_bytes());
    out[h + 8] = TTL;
    out[h + 9] = protocol;
    out[h + 12..h + 16].copy_from_slice(&ip.daddr.to_ne_bytes());
    out[h + 16..h + 20].copy_from_slice(&ip.saddr.to_ne_bytes());
    let check = fold(sum16(&out[h..h + IP_LEN], 0));
    out[h + 10..h + 12].copy_from_slice(&check.to_be_bytes());
}

/// The answer's pseudo-header sum: its source is the packet's destination.
#[inline(always)]
fn pseudo_header_sum(ip: &Ipv4, protocol: u8, len: u16) -> u32 {
    let mut sum = sum16(&ip.daddr.to_ne_bytes(), 0);
    sum = sum16(&ip.saddr.to_ne_bytes(), sum);
    sum + protocol as u32 + len as u32
}

/// One's-complement sum of big-endian 16-bit words (even length).
#[inline(always)]
fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Makes the packet exactly `out`.
#[inline(always)]
fn replace_packet<const N: usize>(ctx: &TcContext, out: &[u8; N]) -> Result<(), ()> {
    if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, N as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(0, out, 0).map_err(|_| ())
}
