//! ICMP errors about translated flows (destination unreachable, including
//! fragmentation needed, and time exceeded): the quoted packet is the one
//! the backend saw, so its addresses and ports are turned back into what
//! the client sent, and the error is sent on to the client. Without this a
//! client behind a NodePort never learns the path MTU.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
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
/// The ICMP header, the quoted IPv4 header and the quoted ports.
const QUOTE_WINDOW: usize = ICMP_HEADER_LEN + QUOTED_IP_LEN + 4;

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

/// The error's quoted flow, if it is one this node translated and the
/// error came the way its replies come; `None` leaves the packet alone.
#[inline(always)]
fn translate(ctx: &TcContext, ip: &Ipv4, direction: Direction) -> Option<i32> {
    // The quote must lie within the datagram the IPv4 header claims, not
    // just within the frame.
    if ip.total_len < ip.header_len + QUOTE_WINDOW {
        return None;
    }
    let icmp_off = ip.l4_off();
    let icmp = unsafe { *ptr_at::<[u8; QUOTE_WINDOW]>(ctx, icmp_off)? };
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
    let error = Error {
        ip,
        sent: &sent,
        reply: &reply,
        frontend: &frontend,
        quoted_csum: half(10),
    };
    if !snat {
        return Some(match error.rewrite(ctx) {
            Ok(()) => {
                count(Counter::IcmpErrorTranslated);
                TC_ACT_OK as i32
            }
            Err(()) => TC_ACT_SHOT as i32,
        });
    }
    // Everything that can refuse the error is decided before its first
    // byte changes: a half-translated error is never sent on.
    if nat::hop_left(ip).is_err() {
        return Some(TC_ACT_SHOT as i32);
    }
    let to_client = Ports {
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        csum_off: 0,
        csum_flags: 0,
    };
    let Some(route) = nat::route(&nat::Hook::tc(ctx), ip, &to_client, reply.client_addr) else {
        count(Counter::DroppedNoRoute);
        return Some(TC_ACT_SHOT as i32);
    };
    let rewritten = error
        .rewrite(ctx)
        .and_then(|()| outer_rewrite(ctx, IP_DST, ip.daddr, reply.client_addr))
        .and_then(|()| nat::decrement_ttl(ctx, ip));
    Some(match rewritten {
        Ok(()) => {
            count(Counter::IcmpErrorTranslated);
            nat::redirect(&route)
        }
        Err(()) => TC_ACT_SHOT as i32,
    })
}

/// An ICMP error about a tracked flow, and what its quote becomes.
struct Error<'a> {
    ip: &'a Ipv4,
    /// The quoted packet: what went to the backend.
    sent: &'a Flow4,
    reply: &'a CtReply,
    frontend: &'a RevNat,
    /// The quoted IPv4 header's checksum as it arrived.
    quoted_csum: u16,
}

impl Error<'_> {
    /// The quote back to what the client sent (the frontend as its
    /// destination; the client as its source when it was source-NATed),
    /// and the error from the frontend when the backend sent it.
    #[inline(always)]
    fn rewrite(&self, ctx: &TcContext) -> Result<(), ()> {
        let icmp_off = self.ip.l4_off();
        let quoted_off = icmp_off + ICMP_HEADER_LEN;
        let icmp_csum = Ports {
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            csum_off: icmp_off + 2,
            csum_flags: 0,
        };
        let sent = self.sent;
        let mut quoted_csum = self.quoted_csum;
        quoted_rewrite(
            ctx,
            &icmp_csum,
            quoted_off,
            &mut quoted_csum,
            IP_DST,
            22,
            (sent.daddr, sent.dport),
            (self.frontend.addr, self.frontend.port),
        )?;
        if self.reply.flags & ct_flags::SNAT != 0 {
            quoted_rewrite(
                ctx,
                &icmp_csum,
                quoted_off,
                &mut quoted_csum,
                IP_SRC,
                20,
                (sent.saddr, sent.sport),
                (self.reply.client_addr, self.reply.client_port),
            )?;
        }
        ctx.store(quoted_off + IP_CSUM, &quoted_csum, 0)
            .map_err(|_| ())?;
        ctx.l4_csum_replace(
            icmp_csum.csum_off,
            self.quoted_csum as u64,
            quoted_csum as u64,
            2,
        )
        .map_err(|_| ())?;
        if self.ip.saddr == sent.daddr {
            outer_rewrite(ctx, IP_SRC, self.ip.saddr, self.frontend.addr)?;
        }
        Ok(())
    }
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
) -> Result<(), ()> {
    ctx.store(quoted_off + addr_at, &new_addr, 0)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(icmp.csum_off, old_addr as u64, new_addr as u64, 4)
        .map_err(|_| ())?;
    *quoted_csum = csum::replace4(*quoted_csum, old_addr, new_addr);
    ctx.store(quoted_off + port_at, &new_port, 0)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(icmp.csum_off, old_port as u64, new_port as u64, 2)
        .map_err(|_| ())
}

#[inline(always)]
fn outer_rewrite(ctx: &TcContext, addr_at: usize, old: u32, new: u32) -> Result<(), ()> {
    ctx.store(IP_OFF + addr_at, &new, 0).map_err(|_| ())?;
    ctx.l3_csum_replace(IP_OFF + IP_CSUM, old as u64, new as u64, 4)
        .map_err(|_| ())
}
