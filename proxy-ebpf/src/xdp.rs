//! XDP on the node's external devices: the fast path for external traffic,
//! before the kernel allocates an skb. It makes the same decision as tc
//! (`flow::classify`, the same maps) and finishes what it can:
//!
//! - drops (source ranges, no local endpoint) are dropped here;
//! - packets to backends on other nodes, and their replies, are rewritten
//!   and sent out here when the next hop's MAC is known;
//! - packets to local backends are destination-NATed here and passed up;
//! - packets that are nobody's are passed up.
//!
//! The last two carry a mark in their XDP metadata so tc does not look
//! them up again. Everything else (refusals, which need a new packet, ICMP
//! errors, malformed packets, next hops without a neighbour entry) passes
//! to tc unmarked and tc does the whole job, so XDP is an accelerator: a
//! device without it loses speed, not behaviour.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_meta,
    macros::xdp,
    programs::{TcContext, XdpContext},
};
use proxy_common::{Counter, CtEntry, CtReply, RevNat, ct_flags, proto};

use crate::{
    flow::{self, Action},
    maps::count,
    nat::{self, End, Hook},
    parse::{self, Frame, Ipv4, Ports},
};

/// The metadata mark of a packet XDP handled ("xdp!").
const HANDLED: u32 = u32::from_ne_bytes(*b"xdp!");
const MARK_LEN: usize = size_of::<u32>();

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    let Frame::Ipv4(ip) = parse::frame(&ctx) else {
        return XDP_PASS;
    };
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return XDP_PASS;
    }
    let Some(ports) = parse::ports(&ctx, &ip) else {
        return XDP_PASS;
    };
    let hook = Hook::xdp(&ctx);
    match flow::classify(&hook, &ip, &ports) {
        Action::Pass => mark_handled(&ctx),
        Action::Drop => XDP_DROP,
        Action::Refuse => XDP_PASS,
        Action::ToClient(reply, frontend) => to_client(&ctx, &hook, &ip, &ports, &reply, &frontend),
        Action::ToBackend(entry) => to_backend(&ctx, &hook, &ip, &ports, &entry),
    }
}

/// Whether XDP marked this packet as handled (tc ingress skips it).
#[inline(always)]
pub fn handled(ctx: &TcContext) -> bool {
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + MARK_LEN > ctx.data() {
        return false;
    }
    unsafe { *(meta as *const u32) == HANDLED }
}

#[inline(always)]
fn mark_handled(ctx: &XdpContext) -> u32 {
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(MARK_LEN as i32)) } == 0 {
        let meta = ctx.metadata();
        if meta + MARK_LEN <= ctx.data() {
            unsafe { *(meta as *mut u32) = HANDLED };
        }
    }
    XDP_PASS
}

#[inline(always)]
fn to_backend(ctx: &XdpContext, hook: &Hook, ip: &Ipv4, ports: &Ports, entry: &CtEntry) -> u32 {
    let l4_off = ip.l4_off();
    let frontend = (ip.daddr, ports.dport);
    let backend = (entry.backend_addr, entry.backend_port);
    if entry.flags & ct_flags::SNAT == 0 {
        if nat::rewrite_in_place(ctx, ports, l4_off, End::Destination, frontend, backend).is_err() {
            return XDP_DROP;
        }
        return mark_handled(ctx);
    }
    let Some(route) = nat::route(hook, ip, ports, entry.backend_addr) else {
        count(Counter::DroppedNoRoute);
        return XDP_DROP;
    };
    if !route.resolved {
        // tc resolves the neighbour (bpf_redirect_neigh).
        return XDP_PASS;
    }
    let client = (ip.saddr, ports.sport);
    let nat = (entry.nat_addr, entry.nat_port);
    if nat::decrement_ttl_in_place(ctx, ip).is_err()
        || nat::rewrite_in_place(ctx, ports, l4_off, End::Destination, frontend, backend).is_err()
        || nat::rewrite_in_place(ctx, ports, l4_off, End::Source, client, nat).is_err()
    {
        return XDP_DROP;
    }
    nat::transmit(ctx, hook, &route)
}

#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    hook: &Hook,
    ip: &Ipv4,
    ports: &Ports,
    reply: &CtReply,
    frontend: &RevNat,
) -> u32 {
    let Some(route) = nat::route(hook, ip, ports, reply.client_addr) else {
        count(Counter::DroppedNoRoute);
        return XDP_DROP;
    };
    if !route.resolved {
        return XDP_PASS;
    }
    let l4_off = ip.l4_off();
    let backend = (ip.saddr, ports.sport);
    let nat = (ip.daddr, ports.dport);
    let client = (reply.client_addr, reply.client_port);
    if nat::decrement_ttl_in_place(ctx, ip).is_err()
        || nat::rewrite_in_place(
            ctx,
            ports,
            l4_off,
            End::Source,
            backend,
            (frontend.addr, frontend.port),
        )
        .is_err()
        || nat::rewrite_in_place(ctx, ports, l4_off, End::Destination, nat, client).is_err()
    {
        return XDP_DROP;
    }
    count(Counter::PacketReply);
    nat::transmit(ctx, hook, &route)
}
