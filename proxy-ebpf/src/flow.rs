//! What an incoming TCP or UDP packet is to the external datapath, decided
//! the same way for tc and XDP: a reply to turn back to its client, a
//! client packet of a tracked flow, the first packet of a new flow (which
//! is tracked here), or something to drop, refuse or leave alone.

use proxy_common::{
    AffinityKey, Counter, CtEntry, CtReply, Flow4, RevNat, backend_flags, ct_flags,
    lb::{self, NewFlow},
};

use crate::{
    conntrack, events,
    maps::{BACKENDS, CONNTRACK, CT_REPLY, REV_NAT, count},
    nat::{self, Hook},
    parse::{Ipv4, Ports},
    select,
};

/// The decision for one packet.
pub enum Action {
    /// No frontend and no tracked flow: not ours.
    Pass,
    /// Dropped; the reason is counted already.
    Drop,
    /// A new flow to a frontend without endpoints: refuse it (rule 21).
    Refuse,
    /// A backend's reply to a source-NATed flow: from the frontend, to the
    /// client.
    ToClient(CtReply, RevNat),
    /// A client's packet, to the backend (and SNAT source) of its flow.
    ToBackend(CtEntry),
}

/// Classifies a packet arriving from outside the node.
#[inline(always)]
pub fn classify(hook: &Hook, ip: &Ipv4, ports: &Ports) -> Action {
    let flow = ports.flow(ip);
    if let Some(reply) = CT_REPLY.get_ptr(flow) {
        let reply = unsafe { *reply };
        if reply.flags & ct_flags::SNAT != 0 {
            let Some(frontend) = REV_NAT.get_ptr(reply.rev_nat_id) else {
                return Action::Pass;
            };
            let frontend = unsafe { *frontend };
            conntrack::touch_from_backend(&original(&reply, &frontend, ip.proto), ports.tcp_flags);
            return Action::ToClient(reply, frontend);
        }
    }
    if let Some(entry) = conntrack::established(&flow, ports.tcp_flags) {
        count(Counter::PacketEstablished);
        return Action::ToBackend(entry);
    }
    match lb::new_flow(&select::Maps, &flow) {
        NewFlow::NotAFrontend => Action::Pass,
        NewFlow::Drop(reason) => {
            count(reason);
            Action::Drop
        }
        NewFlow::Reject(..) => Action::Refuse,
        NewFlow::Balance(master_key, master) => {
            let client = AffinityKey::PACKET_CLIENT | flow.saddr as u64;
            let pick = select::Pick::Maglev(&flow);
            match select::backend_for(client, &master_key, &master, pick)
                // Inlined: an outlined closure's frame would add to
                // tc_ingress's, past the verifier's 512-byte combined stack.
                .and_then(
                    #[inline(always)]
                    |backend_id| track(hook, ip, ports, &flow, backend_id, master.rev_nat_id),
                ) {
                Some(entry) => Action::ToBackend(entry),
                None => Action::Drop,
            }
        }
    }
}

/// The client's flow (client -> frontend) a reply belongs to.
#[inline(always)]
pub fn original(reply: &CtReply, frontend: &RevNat, protocol: u8) -> Flow4 {
    Flow4::new(
        reply.client_addr,
        frontend.addr,
        reply.client_port,
        frontend.port,
        protocol,
    )
}

/// Tracks a new flow to `backend_id`: claims its SNAT port when the backend
/// is on another node, stores the reply entry, then the conntrack entry.
/// `None` (counted) when it cannot be tracked.
#[inline(always)]
fn track(
    hook: &Hook,
    ip: &Ipv4,
    ports: &Ports,
    flow: &Flow4,
    backend_id: u32,
    rev_nat_id: u32,
) -> Option<CtEntry> {
    let Some(backend) = BACKENDS.get_ptr(backend_id) else {
        events::missing_backend(flow.daddr, flow.dport);
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
            events::conntrack_full(flow.daddr, flow.dport);
            return None;
        }
        key
    } else {
        let Some(route) = nat::route(hook, ip, ports, backend.addr) else {
            count(Counter::DroppedNoRoute);
            return None;
        };
        reply.flags = ct_flags::SNAT;
        let Some(nat_port) =
            nat::claim_snat_port(backend.addr, backend.port, route.source, ip.proto, &reply)
        else {
            events::nat_exhausted(backend.addr, backend.port);
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
        events::conntrack_full(flow.daddr, flow.dport);
        return None;
    }
    count(Counter::PacketNewFlow);
    Some(entry)
}
