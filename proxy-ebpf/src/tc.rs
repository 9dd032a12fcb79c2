//! Packet-level load balancing for traffic from outside the node (tc on the
//! node's external devices): NodePorts, externalIPs and LoadBalancer IPs.
//!
//! Ingress: `flow::classify` decides; a local backend is only
//! destination-NATed and handed to the kernel's routing; a remote one is
//! also source-NATed to this node's address and sent straight out
//! (rule 17); replies to source-NATed flows are turned back and sent to the
//! client; new flows to frontends without endpoints are refused. A packet
//! XDP already handled (marked in its metadata) passes at once.
//!
//! Egress: replies of destination-NATed flows, leaving for the client from
//! a local backend, get the frontend back as their source.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{Counter, CtEntry, CtReply, RevNat, ct_flags, proto};

use crate::{
    conntrack, events,
    flow::{self, Action},
    icmp,
    maps::{CT_REPLY, REV_NAT, count},
    nat::{self, End, Hook},
    parse::{self, Frame, Ipv4, Ports},
    reject, xdp,
};

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    if xdp::handled(&ctx) {
        return PASS;
    }
    let (ip, ports) = match transport(&ctx, icmp::Direction::Ingress) {
        Ok(packet) => packet,
        Err(verdict) => return verdict,
    };
    let hook = Hook::tc(&ctx);
    match flow::classify(&hook, &ip, &ports) {
        Action::Pass => PASS,
        Action::Drop => DROP,
        Action::Refuse => reject::refuse(&ctx, &ip, &ports),
        Action::ToClient(reply, frontend) => {
            reply_to_client(&ctx, &hook, &ip, &ports, &reply, &frontend)
        }
        Action::ToBackend(entry) => to_backend(&ctx, &hook, &ip, &ports, &entry),
    }
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    let (ip, ports) = match transport(&ctx, icmp::Direction::Egress) {
        Ok(packet) => packet,
        Err(verdict) => return verdict,
    };
    let reply_flow = ports.flow(&ip);
    let Some(reply) = CT_REPLY.get_ptr(reply_flow) else {
        return PASS;
    };
    let reply = unsafe { *reply };
    if reply.flags & ct_flags::SNAT != 0 {
        return PASS;
    }
    let Some(frontend) = REV_NAT.get_ptr(reply.rev_nat_id) else {
        return PASS;
    };
    let frontend = unsafe { *frontend };
    conntrack::touch_from_backend(
        &flow::original(&reply, &frontend, ip.proto),
        ports.tcp_flags,
    );
    let from = (reply_flow.saddr, reply_flow.sport);
    if nat::rewrite(
        &ctx,
        &ports,
        ip.l4_off(),
        End::Source,
        from,
        (frontend.addr, frontend.port),
    )
    .is_err()
    {
        return DROP;
    }
    count(Counter::PacketReply);
    PASS
}

/// The IPv4 header and ports of a TCP or UDP packet, or the verdict for
/// any other packet: ICMP errors about tracked flows are translated,
/// malformed packets counted, everything else left alone.
#[inline(always)]
fn transport(ctx: &TcContext, direction: icmp::Direction) -> Result<(Ipv4, Ports), i32> {
    let ip = match parse::frame(ctx) {
        Frame::Ipv4(ip) => ip,
        Frame::Other => return Err(PASS),
        Frame::Malformed(reason) => {
            events::malformed(reason);
            return Err(PASS);
        }
        Frame::Fragment => {
            count(Counter::FragmentPassed);
            return Err(PASS);
        }
    };
    if ip.proto == proto::ICMP {
        return Err(icmp::translate_error(ctx, &ip, direction));
    }
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Err(PASS);
    }
    let Some(ports) = parse::ports(ctx, &ip) else {
        events::malformed(Counter::MalformedTruncated);
        return Err(PASS);
    };
    Ok((ip, ports))
}

/// A client's packet of a tracked flow, rewritten to its backend (and to
/// its SNAT source), then routed.
#[inline(always)]
fn to_backend(ctx: &TcContext, hook: &Hook, ip: &Ipv4, ports: &Ports, entry: &CtEntry) -> i32 {
    let l4_off = ip.l4_off();
    let frontend = (ip.daddr, ports.dport);
    if nat::rewrite(
        ctx,
        ports,
        l4_off,
        End::Destination,
        frontend,
        (entry.backend_addr, entry.backend_port),
    )
    .is_err()
    {
        return DROP;
    }
    if entry.flags & ct_flags::SNAT == 0 {
        // A local backend: the kernel routes the packet to the pod, and
        // the reply passes this node's egress on its way back.
        return PASS;
    }
    let client = (ip.saddr, ports.sport);
    if nat::rewrite(
        ctx,
        ports,
        l4_off,
        End::Source,
        client,
        (entry.nat_addr, entry.nat_port),
    )
    .is_err()
        || nat::decrement_ttl(ctx, ip).is_err()
    {
        return DROP;
    }
    match nat::route(hook, ip, ports, entry.backend_addr) {
        Some(route) => nat::redirect(&route),
        None => {
            count(Counter::DroppedNoRoute);
            DROP
        }
    }
}

/// A backend's reply to a source-NATed flow: from the frontend, to the
/// client, sent straight back towards it.
#[inline(always)]
fn reply_to_client(
    ctx: &TcContext,
    hook: &Hook,
    ip: &Ipv4,
    ports: &Ports,
    reply: &CtReply,
    frontend: &RevNat,
) -> i32 {
    let l4_off = ip.l4_off();
    let backend = (ip.saddr, ports.sport);
    let nat = (ip.daddr, ports.dport);
    if nat::rewrite(
        ctx,
        ports,
        l4_off,
        End::Source,
        backend,
        (frontend.addr, frontend.port),
    )
    .is_err()
        || nat::rewrite(
            ctx,
            ports,
            l4_off,
            End::Destination,
            nat,
            (reply.client_addr, reply.client_port),
        )
        .is_err()
        || nat::decrement_ttl(ctx, ip).is_err()
    {
        return DROP;
    }
    count(Counter::PacketReply);
    match nat::route(hook, ip, ports, reply.client_addr) {
        Some(route) => nat::redirect(&route),
        None => {
            count(Counter::DroppedNoRoute);
            DROP
        }
    }
}
