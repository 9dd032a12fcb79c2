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
        let flows: std::collections::HashMap<Flow4, CtEntry> =
            self.conntrack.iter().collect::<Result<_, _>>()?;
        let replies: std::collections::HashMap<Flow4, CtReply> =
            self.replies.iter().collect::<Result<_, _>>()?;
        let affinity: Vec<(AffinityKey, AffinityValue)> =
            self.affinity.iter().collect::<Result<_, _>>()?;
        let mut walk = Walk {
            flows: flows.len() as u64,
            replies: replies.len() as u64,
            affinity: affinity.len() as u64,
            ..Walk::default()
        };
        for (key, entry) in &flows {
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
        for (at, reply) in &replies {
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
        for (key, value) in &affinity {
            let master = topology.affinity_master(key.svc_id);
            checker.ensure(
                Invariant::AffinityEntries,
                key.client & AffinityKey::PACKET_CLIENT != 0
                    && master.is_some_and(|master| master.backend_ids.contains(&value.backend_id)),
                || format!("{key:?} -> {value:?}"),
            );
        }
        Ok(walk)
    }
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
