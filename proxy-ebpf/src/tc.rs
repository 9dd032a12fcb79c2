//! Packet-level load balancing for traffic from outside the node (tc on the
//! node's external devices): NodePorts, externalIPs and LoadBalancer IPs.
//!
//! Ingress: a reply to a source-NATed flow is turned back and sent to the
//! client; a client's packet to an external frontend follows its tracked
//! flow, or is a new flow decided by `proxy_common::lb::new_flow` (drop,
//! refuse, or balance). A local backend is only destination-NATed and
//! handed to the kernel's routing; a remote one is also source-NATed to
//! this node's address and sent straight out (rule 17).
//!
//! Egress: replies of destination-NATed flows, leaving for the client from
//! a local backend, get the frontend back as their source.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    AffinityKey, CtEntry, CtReply, Flow4, RevNat, backend_flags, ct_flags,
    lb::{self, NewFlow},
    proto,
};

use crate::{
    conntrack, icmp,
    maps::{BACKENDS, CONNTRACK, CT_REPLY, REV_NAT, count},
    nat::{self, End},
    parse::{self, Frame, Ipv4, Ports},
    reject, select,
};
use proxy_common::Counter;

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let (ip, ports) = match transport(&ctx, icmp::Direction::Ingress) {
        Ok(packet) => packet,
        Err(verdict) => return verdict,
    };
    let flow = ports.flow(&ip);
    if let Some(reply) = CT_REPLY.get_ptr(flow) {
        let reply = unsafe { *reply };
        if reply.flags & ct_flags::SNAT != 0 {
            return reply_to_client(&ctx, &ip, &ports, &flow, &reply);
        }
    }
    if let Some(entry) = conntrack::established(&flow, ports.tcp_flags) {
        count(Counter::PacketEstablished);
        return to_backend(&ctx, &ip, &ports, &entry);
    }
    match lb::new_flow(&select::Maps, &flow) {
        NewFlow::NotAFrontend => PASS,
        NewFlow::Drop(reason) => {
            count(reason);
            DROP
        }
        NewFlow::Reject(..) => reject::refuse(&ctx, &ip, &ports),
        NewFlow::Balance(master_key, master) => {
            let client = AffinityKey::PACKET_CLIENT | flow.saddr as u64;
            let Some(entry) =
                select::backend_for(client, &master_key, &master, select::Pick::Maglev(&flow))
                    .and_then(|backend_id| {
                        track(&ctx, &ip, &ports, &flow, backend_id, master.rev_nat_id)
                    })
            else {
                return DROP;
            };
            to_backend(&ctx, &ip, &ports, &entry)
        }
    }
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    let (ip, ports) = match transport(&ctx, icmp::Direction::Egress) {
        Ok(packet) => packet,
        Err(verdict) => return verdict,
    };
    let flow = ports.flow(&ip);
    let Some(reply) = CT_REPLY.get_ptr(flow) else {
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
    let original = Flow4::new(
        reply.client_addr,
        frontend.addr,
        reply.client_port,
        frontend.port,
        ip.proto,
    );
    conntrack::touch_from_backend(&original, ports.tcp_flags);
    let from = (flow.saddr, flow.sport);
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
            count(reason);
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
        count(Counter::MalformedTruncated);
        return Err(PASS);
    };
    Ok((ip, ports))
}

/// Tracks a new flow to `backend_id`: claims its SNAT port when the backend
/// is on another node, stores the reply entry, then the conntrack entry.
#[inline(always)]
fn track(
    ctx: &TcContext,
    ip: &Ipv4,
    ports: &Ports,
    flow: &Flow4,
    backend_id: u32,
    rev_nat_id: u32,
) -> Option<CtEntry> {
    let Some(backend) = BACKENDS.get_ptr(backend_id) else {
        count(Counter::MissingBackend);
        return None;
    };
    let backend = unsafe { *backend };
    let mut entry = CtEntry {
        last_seen: conntrack::now(),
        backend_id,
        rev_nat_id,
        backend_addr: backend.addr,
        nat_addr: 0,
        backend_port: backend.port,
        nat_port: 0,
        state: conntrack::initial_state(ip.proto, ports.tcp_flags),
        flags: 0,
        _pad0: 0,
    };
    let mut reply = CtReply {
        client_addr: flow.saddr,
        rev_nat_id,
        client_port: flow.sport,
        flags: 0,
        _pad0: 0,
    };
    let reply_key = if backend.flags & backend_flags::LOCAL != 0 {
        let key = Flow4::new(backend.addr, flow.saddr, backend.port, flow.sport, ip.proto);
        if CT_REPLY.insert(key, reply, 0).is_err() {
            count(Counter::DroppedConntrackFull);
            return None;
        }
        key
    } else {
        let Some(route) = nat::route(ctx, ip, ports, backend.addr) else {
            count(Counter::DroppedNoRoute);
            return None;
        };
        reply.flags = ct_flags::SNAT;
        let Some(nat_port) =
            nat::claim_snat_port(backend.addr, backend.port, route.source, ip.proto, &reply)
        else {
            count(Counter::DroppedNatExhausted);
            return None;
        };
        entry.flags = ct_flags::SNAT;
        entry.nat_addr = route.source;
        entry.nat_port = nat_port;
        count(Counter::PacketSnat);
        Flow4::new(backend.addr, route.source, backend.port, nat_port, ip.proto)
    };
    if CONNTRACK.insert(flow, entry, 0).is_err() {
        let _ = CT_REPLY.remove(reply_key);
        count(Counter::DroppedConntrackFull);
        return None;
    }
    count(Counter::PacketNewFlow);
    Some(entry)
}

/// A client's packet of a tracked flow, rewritten to its backend (and to
/// its SNAT source), then routed.
#[inline(always)]
fn to_backend(ctx: &TcContext, ip: &Ipv4, ports: &Ports, entry: &CtEntry) -> i32 {
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
    match nat::route(ctx, ip, ports, entry.backend_addr) {
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
    ip: &Ipv4,
    ports: &Ports,
    flow: &Flow4,
    reply: &CtReply,
) -> i32 {
    let Some(frontend) = REV_NAT.get_ptr(reply.rev_nat_id) else {
        return PASS;
    };
    let frontend: RevNat = unsafe { *frontend };
    let original = Flow4::new(
        reply.client_addr,
        frontend.addr,
        reply.client_port,
        frontend.port,
        ip.proto,
    );
    conntrack::touch_from_backend(&original, ports.tcp_flags);
    let l4_off = ip.l4_off();
    if nat::rewrite(
        ctx,
        ports,
        l4_off,
        End::Source,
        (flow.saddr, flow.sport),
        (frontend.addr, frontend.port),
    )
    .is_err()
        || nat::rewrite(
            ctx,
            ports,
            l4_off,
            End::Destination,
            (flow.daddr, flow.dport),
            (reply.client_addr, reply.client_port),
        )
        .is_err()
        || nat::decrement_ttl(ctx, ip).is_err()
    {
        return DROP;
    }
    count(Counter::PacketReply);
    match nat::route(ctx, ip, ports, reply.client_addr) {
        Some(route) => nat::redirect(&route),
        None => {
            count(Counter::DroppedNoRoute);
            DROP
        }
    }
}
