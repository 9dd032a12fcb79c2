//! ICMP errors about translated flows (destination unreachable, including
//! fragmentation needed, and time exceeded): the quoted packet is the one
//! the backend saw, so its addresses and ports are turned back into what
//! the client sent, and the error is sent on to the client. Without this a
//! client behind a NodePort never learns the path MTU.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{Counter, CtReply, Flow4, RevNat, ct_flags, proto};

use crate::{
    csum,
    maps::{CT_REPLY, REV_NAT, count},
    nat,
    parse::{IP_CSUM, IP_DST, IP_OFF, IP_SRC, Ipv4, Ports, ptr_at},
};

const DESTINATION_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const ICMP_HEADER_LEN: usize = 8;
const QUOTED_IP_LEN: usize = 20;

/// Where the error travels.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// In from outside, addressed to a SNAT source of this node.
    Ingress,
    /// Out towards a client, from a local backend (or a hop before it).
    Egress,
}

/// The verdict for an ICMP packet: translated errors are sent on to the
/// client; anything else passes untouched.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, ip: &Ipv4, direction: Direction) -> i32 {
    translate(ctx, ip, direction).unwrap_or(TC_ACT_OK as i32)
}

#[inline(always)]
fn translate(ctx: &TcContext, ip: &Ipv4, direction: Direction) -> Option<i32> {
    let icmp_off = ip.l4_off();
    let quoted_off = icmp_off + ICMP_HEADER_LEN;
    let icmp = unsafe { *ptr_at::<[u8; ICMP_HEADER_LEN + QUOTED_IP_LEN + 4]>(ctx, icmp_off)? };
    if icmp[0] != DESTINATION_UNREACHABLE && icmp[0] != TIME_EXCEEDED {
        return None;
    }
    let quoted = &icmp[ICMP_HEADER_LEN..];
    let protocol = quoted[9];
    if quoted[0] != 0x45 || (protocol != proto::TCP && protocol != proto::UDP) {
        return None;
    }
    let word = |at: usize| {
        u32::from_ne_bytes([quoted[at], quoted[at + 1], quoted[at + 2], quoted[at + 3]])
    };
    let half = |at: usize| u16::from_ne_bytes([quoted[at], quoted[at + 1]]);
    // The quoted packet went from this node (or the client) to the backend.
    let sent = Flow4::new(word(12), word(16), half(20), half(22), protocol);
    if ip.daddr != sent.saddr {
        return None;
    }
    let reply_ptr = CT_REPLY.get_ptr(sent.reversed())?;
    let reply: CtReply = unsafe { *reply_ptr };
    let snat = reply.flags & ct_flags::SNAT != 0;
    if snat != (direction == Direction::Ingress) {
        return None;
    }
    let frontend: RevNat = unsafe { *REV_NAT.get_ptr(reply.rev_nat_id)? };

    let icmp_csum = Ports {
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        csum_off: icmp_off + 2,
        csum_flags: 0,
    };
    let mut quoted_csum = half(10);
    let client = (reply.client_addr, reply.client_port);
    // Quoted destination: the backend becomes the frontend again.
    quoted_rewrite(
        ctx,
        &icmp_csum,
        quoted_off,
        &mut quoted_csum,
        IP_DST,
        22,
        (sent.daddr, sent.dport),
        (frontend.addr, frontend.port),
    )?;
    if snat {
        // Quoted source: the SNAT address and port become the client.
        quoted_rewrite(
            ctx,
            &icmp_csum,
            quoted_off,
            &mut quoted_csum,
            IP_SRC,
            20,
            (sent.saddr, sent.sport),
            client,
        )?;
    }
    let old_csum = half(10);
    ctx.store(quoted_off + IP_CSUM, &quoted_csum, 0).ok()?;
    ctx.l4_csum_replace(icmp_csum.csum_off, old_csum as u64, quoted_csum as u64, 2)
        .ok()?;
    // The error's own header: from the frontend when the backend sent it,
    // to the client when it was addressed to our SNAT source.
    if ip.saddr == sent.daddr {
        outer_rewrite(ctx, IP_SRC, ip.saddr, frontend.addr)?;
    }
    count(Counter::IcmpErrorTranslated);
    if !snat {
        return Some(TC_ACT_OK as i32);
    }
    outer_rewrite(ctx, IP_DST, ip.daddr, reply.client_addr)?;
    nat::decrement_ttl(ctx, ip).ok()?;
    let to_client = Ports {
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        csum_off: 0,
        csum_flags: 0,
    };
    let route = nat::route(&nat::Hook::tc(ctx), ip, &to_client, reply.client_addr)?;
    Some(nat::redirect(&route))
}

/// Rewrites an address and port of the quoted packet, keeping the quoted
/// IPv4 checksum (`quoted_csum`, written by the caller once) and the ICMP
/// checksum (which covers the quote) right.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quoted_rewrite(
    ctx: &TcContext,
    icmp: &Ports,
    quoted_off: usize,
    quoted_csum: &mut u16,
    addr_at: usize,
    port_at: usize,
    (old_addr, old_port): (u32, u16),
    (new_addr, new_port): (u32, u16),
) -> Option<()> {
    ctx.store(quoted_off + addr_at, &new_addr, 0).ok()?;
    ctx.l4_csum_replace(icmp.csum_off, old_addr as u64, new_addr as u64, 4)
        .ok()?;
    *quoted_csum = csum::replace4(*quoted_csum, old_addr, new_addr);
    ctx.store(quoted_off + port_at, &new_port, 0).ok()?;
    ctx.l4_csum_replace(icmp.csum_off, old_port as u64, new_port as u64, 2)
        .ok()
}

#[inline(always)]
fn outer_rewrite(ctx: &TcContext, addr_at: usize, old: u32, new: u32) -> Option<()> {
    ctx.store(IP_OFF + addr_at, &new, 0).ok()?;
    ctx.l3_csum_replace(IP_OFF + IP_CSUM, old as u64, new as u64, 4)
        .ok()
}
