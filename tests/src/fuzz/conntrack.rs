//! The tables the programs fill (conntrack, its reply half, affinity),
//! walked after every batch and then emptied, so each batch starts from
//! the same state.
//!
//! What the programs guarantee, and so what is checked: a flow's reply
//! entry is written before the flow and stays (only the agent deletes), so
//! every `lb4_ct` entry has one; a reply entry may be left behind when its
//! flow is tracked anew (a SYN after a close), and then names a flow whose
//! reply key is elsewhere: the agent's collector removes those orphans, so
//! they are counted, not failed. A reply entry whose flow is missing
//! altogether is a fault (nothing here evicts: the tables are far from
//! full).

use std::collections::BTreeMap;

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use proxy_common::{
    AffinityKey, AffinityValue, CtEntry, CtReply, Flow4, ct_flags, ct_state, map_names, proto,
    scope,
};

use super::{
    check::{Checker, Invariant},
    topology::{self, Topology, endpoint, reply_key},
};
use crate::tc;

pub struct Tables {
    conntrack: HashMap<MapData, Flow4, CtEntry>,
    replies: HashMap<MapData, Flow4, CtReply>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
}

/// What one walk saw.
#[derive(Clone, Copy, Default)]
pub struct Walk {
    pub flows: u64,
    pub replies: u64,
    /// Reply entries of flows tracked anew.
    pub orphans: u64,
    pub affinity: u64,
}

impl Tables {
    pub fn open(ebpf: &mut Ebpf) -> Result<Tables> {
        Ok(Tables {
            conntrack: tc::map(ebpf, map_names::CONNTRACK)?,
            replies: tc::map(ebpf, map_names::CT_REPLY)?,
            affinity: tc::map(ebpf, map_names::AFFINITY)?,
        })
    }

    /// Whether `lb4_ct` holds `flow`.
    pub fn tracked(&self, flow: &Flow4) -> bool {
        self.conntrack.get(flow, 0).is_ok()
    }

    pub fn clear(&mut self) -> Result<()> {
        for key in self.conntrack.keys().collect::<Result<Vec<_>, _>>()? {
            self.conntrack.remove(&key)?;
        }
        for key in self.replies.keys().collect::<Result<Vec<_>, _>>()? {
            self.replies.remove(&key)?;
        }
        for key in self.affinity.keys().collect::<Result<Vec<_>, _>>()? {
            self.affinity.remove(&key)?;
        }
        Ok(())
    }

    pub fn check(&self, topology: &Topology, checker: &mut Checker) -> Result<Walk> {
        let flows = self.conntrack.iter().collect::<Result<_, _>>()?;
        let replies = self.replies.iter().collect::<Result<_, _>>()?;
        let affinity: Vec<_> = self.affinity.iter().collect::<Result<_, _>>()?;
        Ok(check_tables(&flows, &replies, &affinity, topology, checker))
    }
}

/// The checks of one walk, over what the tables held.
fn check_tables(
    flows: &BTreeMap<Flow4, CtEntry>,
    replies: &BTreeMap<Flow4, CtReply>,
    affinity: &[(AffinityKey, AffinityValue)],
    topology: &Topology,
    checker: &mut Checker,
) -> Walk {
    let mut walk = Walk {
        flows: flows.len() as u64,
        replies: replies.len() as u64,
        affinity: affinity.len() as u64,
        ..Walk::default()
    };
    for (key, entry) in flows {
        check_flow(key, entry, topology, checker);
        let at = reply_key(key, entry);
        let Some(reply) = replies.get(&at) else {
            checker.fail(
                Invariant::ConntrackPairs,
                format!("{} has no reply entry at {}", show(key), show(&at)),
            );
            continue;
        };
        let named = named_flow(&at, reply, topology);
        let points_back = named
            .and_then(|named| flows.get(&named).map(|entry| reply_key(&named, entry)))
            == Some(at);
        checker.ensure(
            Invariant::ConntrackPairs,
            reply.client_addr == key.saddr
                && reply.client_port == key.sport
                && reply.flags == entry.flags
                && points_back,
            || {
                format!(
                    "{} -> reply {} = {reply:?}, which names {}",
                    show(key),
                    show(&at),
                    named.map_or("no flow".to_string(), |named| show(&named))
                )
            },
        );
    }
    for (at, reply) in replies {
        let named = named_flow(at, reply, topology);
        checker.ensure(Invariant::ConntrackEntries, named.is_some(), || {
            format!(
                "reply {} names rev-NAT id {}, unknown",
                show(at),
                reply.rev_nat_id
            )
        });
        let Some(named) = named else {
            continue;
        };
        match flows.get(&named) {
            Some(entry) if reply_key(&named, entry) == *at => {}
            Some(_) => walk.orphans += 1,
            None => checker.fail(
                Invariant::ConntrackPairs,
                format!(
                    "reply {} names {}, which is not tracked",
                    show(at),
                    show(&named)
                ),
            ),
        }
    }
    for (key, value) in affinity {
        let master = topology.affinity_master(key.svc_id);
        checker.ensure(
            Invariant::AffinityEntries,
            key.client & AffinityKey::PACKET_CLIENT != 0
                && master.is_some_and(|master| master.backend_ids.contains(&value.backend_id)),
            || format!("{key:?} -> {value:?}"),
        );
    }
    walk
}

/// The flow a reply entry turns replies back to: client -> its frontend.
fn named_flow(at: &Flow4, reply: &CtReply, topology: &Topology) -> Option<Flow4> {
    let frontend = topology.rev_nat.get(&reply.rev_nat_id)?;
    Some(topology::flow(
        endpoint(reply.client_addr, reply.client_port),
        *frontend,
        at.proto,
    ))
}

/// A tracked flow's entry: its frontend, a backend of it as the backend
/// table has it, SNAT exactly when the backend is remote, a state its
/// protocol can be in.
fn check_flow(key: &Flow4, entry: &CtEntry, topology: &Topology, checker: &mut Checker) {
    let frontend = endpoint(key.daddr, key.dport);
    let master = topology.external(frontend, key.proto);
    let backend = topology.backends.get(&entry.backend_id);
    let backend_ok = match (master, backend) {
        (Some(master), Some(backend)) => {
            master.scope == scope::EXTERNAL
                && master.value.rev_nat_id == entry.rev_nat_id
                && master.backend_ids.contains(&entry.backend_id)
                && backend.at == endpoint(entry.backend_addr, entry.backend_port)
                && backend.proto == key.proto
        }
        _ => false,
    };
    let snat = entry.flags & ct_flags::SNAT != 0;
    let nat = endpoint(entry.nat_addr, entry.nat_port);
    let nat_ok = match backend {
        Some(backend) if !backend.local => {
            snat && topology::is_node_address(nat.ip()) && topology::is_snat_port(nat.port())
        }
        _ => !snat && entry.nat_addr == 0 && entry.nat_port == 0,
    };
    let state_ok = match key.proto {
        proto::TCP => matches!(
            entry.state,
            ct_state::TCP_SYN | ct_state::TCP_ESTABLISHED | ct_state::TCP_CLOSING
        ),
        proto::UDP => entry.state == ct_state::DATAGRAM,
        _ => false,
    };
    checker.ensure(
        Invariant::ConntrackEntries,
        backend_ok && nat_ok && state_ok,
        || format!("{} -> {entry:?}", show(key)),
    );
}

fn show(flow: &Flow4) -> String {
    format!(
        "{} -> {}/{}",
        endpoint(flow.saddr, flow.sport),
        endpoint(flow.daddr, flow.dport),
        flow.proto
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 192.168.0.2:30080/tcp -> remote 10.244.2.11:8080 (backend 1).
    fn topology() -> Topology {
        Topology::one_frontend("192.168.0.2:30080", "10.244.2.11:8080", false)
    }

    /// A SNATed flow from 203.0.113.2:40000 on `nat_port`, and its reply.
    fn tracked(nat_port: u16) -> (Flow4, CtEntry, Flow4, CtReply) {
        let key = topology::flow(
            "203.0.113.2:40000".parse().unwrap(),
            "192.168.0.2:30080".parse().unwrap(),
            proto::TCP,
        );
        let entry = CtEntry {
            last_seen: 0,
            backend_id: 1,
            rev_nat_id: 1,
            backend_addr: tc::ne_addr(&"10.244.2.11".parse().unwrap()),
            nat_addr: tc::ne_addr(&topology::NODE_ADDRESSES[0]),
            backend_port: 8080u16.to_be(),
            nat_port: nat_port.to_be(),
            state: ct_state::TCP_ESTABLISHED,
            flags: ct_flags::SNAT,
            _pad0: 0,
        };
        let reply = CtReply {
            client_addr: key.saddr,
            rev_nat_id: 1,
            client_port: key.sport,
            flags: ct_flags::SNAT,
            _pad0: 0,
        };
        (key, entry, reply_key(&key, &entry), reply)
    }

    fn walk(flows: &[(Flow4, CtEntry)], replies: &[(Flow4, CtReply)]) -> (Walk, Vec<Invariant>) {
        let mut checker = Checker::default();
        let walk = check_tables(
            &flows.iter().copied().collect(),
            &replies.iter().copied().collect(),
            &[],
            &topology(),
            &mut checker,
        );
        let violated = checker.violations.iter().map(|v| v.invariant).collect();
        (walk, violated)
    }

    #[test]
    fn a_flow_and_its_reply_hold() {
        let (key, entry, at, reply) = tracked(61000);
        assert_eq!(walk(&[(key, entry)], &[(at, reply)]).1, []);
    }

    #[test]
    fn a_flow_without_its_reply_fails() {
        let (key, entry, _, _) = tracked(61000);
        assert_eq!(walk(&[(key, entry)], &[]).1, [Invariant::ConntrackPairs]);
    }

    #[test]
    fn a_flow_naming_an_unknown_backend_fails() {
        let (key, mut entry, at, reply) = tracked(61000);
        entry.backend_id = 9;
        assert_eq!(
            walk(&[(key, entry)], &[(at, reply)]).1,
            [Invariant::ConntrackEntries]
        );
    }

    #[test]
    fn the_reply_of_a_flow_tracked_anew_is_an_orphan_not_a_fault() {
        let (key, entry, at, reply) = tracked(61001);
        let (_, _, old_at, old_reply) = tracked(61000);
        let (walk, violated) = walk(&[(key, entry)], &[(at, reply), (old_at, old_reply)]);
        assert_eq!(violated, []);
        assert_eq!(walk.orphans, 1);
    }

    #[test]
    fn a_reply_whose_flow_is_gone_fails() {
        let (_, _, at, reply) = tracked(61000);
        assert_eq!(walk(&[], &[(at, reply)]).1, [Invariant::ConntrackPairs]);
    }
}
