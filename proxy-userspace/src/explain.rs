//! `ebpf-proxy explain`: what the datapath does with a flow from outside
//! the node, read from the pinned maps, without sending a packet. It checks
//! in the order the tc programs do: a conntrack entry for exactly that
//! flow, then the new-flow decision, which is
//! [`proxy_common::lb::new_flow`] itself, so the two cannot drift, and
//! the backend the frontend's Maglev table gives the flow (the same
//! [`proxy_common::flow_hash`] and slot as the programs). A destination
//! that is no external frontend is also looked up at socket level, where
//! clients on this node are translated.

use std::{fmt::Write as _, net::SocketAddrV4, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, HashOfMaps, LpmTrie, Map, MapData, lpm_trie::Key as LpmKey};
use proxy_common::{
    Backend, Counter, CtEntry, Flow4, MaglevKey, RevNat, ServiceKey, ServiceValue, SourceRange,
    backend_flags, ct_state, flow_hash,
    lb::{LbMaps, NewFlow, new_flow, slot_backend},
    maglev, map_names, proto, scope, service_flags,
};
use serde::Serialize;

use crate::{
    conntrack::{endpoint, flows::FlowRow, flows::flow_row, monotonic_coarse_ns, protocol_name},
    maps::{codec, open_pinned, pin_path},
    model::Protocol,
};

/// The reads `explain` needs beyond the new-flow decision's.
pub trait ExplainMaps: LbMaps {
    /// The conntrack entry of exactly this flow (client -> frontend).
    fn tracked(&self, flow: &Flow4) -> Option<CtEntry>;
    fn rev_nat(&self, id: u32) -> Option<RevNat>;
    /// Entry `index` of the Maglev table under `key` (entry 0 holds its
    /// size M); `None` without that table or entry.
    fn maglev_entry(&self, key: &MaglevKey, index: u32) -> Option<u32>;
}

/// What happens to the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// A tracked flow: its packets go on to the backend it has.
    Established,
    /// A new flow, sent to one of the listed backends.
    Translate,
    /// A new flow refused at once: TCP RST or ICMP port unreachable.
    Reject,
    /// A new flow dropped.
    Drop,
    /// No external frontend: tc passes it, but clients on this node are
    /// translated (or refused) at socket level.
    SocketLevel,
    /// A port an allocated ClusterIP does not define: refused at socket
    /// level (rule 9); tc passes it.
    Refuse,
    /// No frontend at all: passed untouched.
    Pass,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Established => "established",
            Verdict::Translate => "translate",
            Verdict::Reject => "reject",
            Verdict::Drop => "drop",
            Verdict::SocketLevel => "socket-level",
            Verdict::Refuse => "refuse",
            Verdict::Pass => "pass",
        }
    }
}

/// The master entry that decided.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FrontendMatch {
    /// "external" (tc) or "internal" (socket level).
    pub scope: &'static str,
    pub rev_nat_id: u32,
    /// The service port's id.
    pub svc_id: u32,
    /// ClientIP affinity timeout in seconds; 0 when off.
    pub affinity_timeout: u32,
    /// Whether new flows must come from its loadBalancerSourceRanges.
    pub source_ranges: bool,
}

/// A backend slot of the frontend that decided.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendChoice {
    pub slot: u16,
    /// `None` when the slot is missing; the programs refuse a flow that
    /// picks it (counted as `missing_backend`).
    pub id: Option<u32>,
    /// `None` when the slot's backend entry is missing.
    pub backend: Option<SocketAddrV4>,
    /// How a packet from outside reaches it: "DNAT" (a backend on this
    /// node) or "DNAT+SNAT" (elsewhere: the source becomes this node, so
    /// the reply comes back here). `None` at socket level.
    pub nat: Option<&'static str>,
}

/// The backend the frontend's Maglev table gives a new flow.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MaglevPick {
    /// The flow's slot, `1..=size`.
    pub slot: u32,
    /// The table's size M.
    pub size: u32,
    /// `None` when the table has no such slot; the programs then pick a
    /// backend at random.
    pub id: Option<u32>,
    /// `None` when the backend entry is missing.
    pub backend: Option<SocketAddrV4>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub protocol: String,
    pub verdict: Verdict,
    pub reason: String,
    pub frontend: Option<FrontendMatch>,
    pub backends: Vec<BackendChoice>,
    /// What the Maglev table picks, for a new flow to a frontend with one.
    pub maglev: Option<MaglevPick>,
    /// The conntrack entry, for a tracked flow.
    pub tracked: Option<FlowRow>,
}

/// The flow `src -> dst` as its first packet carries it.
pub fn flow(src: SocketAddrV4, dst: SocketAddrV4, protocol: Protocol) -> Flow4 {
    Flow4::new(
        codec::addr_to_map(*src.ip()),
        codec::addr_to_map(*dst.ip()),
        codec::port_to_map(src.port()),
        codec::port_to_map(dst.port()),
        codec::proto_number(protocol),
    )
}

/// Explains `flow` from what `maps` hold at `now_ns` (monotonic coarse).
pub fn explain_flow<M: ExplainMaps>(maps: &M, flow: &Flow4, now_ns: u64) -> Explanation {
    let mut explanation = Explanation {
        src: endpoint(flow.saddr, flow.sport),
        dst: endpoint(flow.daddr, flow.dport),
        protocol: protocol_name(flow.proto),
        verdict: Verdict::Pass,
        reason: String::new(),
        frontend: None,
        backends: Vec::new(),
        maglev: None,
        tracked: None,
    };
    if let Some(entry) = maps.tracked(flow) {
        let row = flow_row(
            flow,
            &entry,
            maps.rev_nat(entry.rev_nat_id).as_ref(),
            maps.backend(entry.backend_id).as_ref(),
            now_ns,
        );
        explanation.verdict = Verdict::Established;
        explanation.reason = tracked_reason(&row, entry.state);
        explanation.tracked = Some(row);
        return explanation;
    }
    let external = ServiceKey::new(flow.daddr, flow.dport, flow.proto, scope::EXTERNAL, 0);
    let (verdict, reason) = match new_flow(maps, flow) {
        NewFlow::NotAFrontend => return socket_level(maps, flow, explanation),
        NewFlow::Drop(counter) => (Verdict::Drop, drop_reason(counter, &explanation.src)),
        NewFlow::Reject(..) => (
            Verdict::Reject,
            format!(
                "reject ({}): the service has no endpoint (rule 21)",
                if flow.proto == proto::TCP {
                    "TCP RST"
                } else {
                    "ICMP port unreachable"
                }
            ),
        ),
        NewFlow::Balance(key, master) => {
            explanation.backends = backends(maps, &key, &master, true);
            explanation.maglev = maglev_pick(maps, &master, flow);
            (
                Verdict::Translate,
                format!(
                    "new flow: translated to one of {} backends{}; {}",
                    master.count,
                    affinity(&master),
                    maglev_reason(explanation.maglev.as_ref(), &master),
                ),
            )
        }
    };
    explanation.verdict = verdict;
    explanation.reason = reason;
    explanation.frontend = maps
        .service(&external)
        .map(|master| frontend_match(&master, scope::EXTERNAL));
    explanation
}

/// The slot of `flow`'s hash in the master's Maglev table, and its backend.
fn maglev_pick<M: ExplainMaps>(
    maps: &M,
    master: &ServiceValue,
    flow: &Flow4,
) -> Option<MaglevPick> {
    let key = codec::maglev_key(master);
    let size = maps.maglev_entry(&key, 0).filter(|size| *size > 0)?;
    let slot = maglev::slot(flow_hash(flow), size);
    let id = maps.maglev_entry(&key, slot);
    let backend = id
        .and_then(|id| maps.backend(id))
        .map(|backend| endpoint(backend.addr, backend.port));
    Some(MaglevPick {
        slot,
        size,
        id,
        backend,
    })
}

fn maglev_reason(pick: Option<&MaglevPick>, master: &ServiceValue) -> String {
    let Some(pick) = pick else {
        return "no Maglev table: a backend at random".to_string();
    };
    let unless = match master.affinity_timeout {
        0 => "",
        _ => "for a client without a fresh affinity entry, ",
    };
    match (pick.id, pick.backend) {
        (Some(id), Some(backend)) => format!(
            "{unless}Maglev picks backend {backend}#{id} (slot {} of {})",
            pick.slot, pick.size
        ),
        (Some(id), None) => format!(
            "{unless}Maglev picks backend #{id} (slot {} of {}), whose entry is missing: the \
             flow is refused (missing_backend)",
            pick.slot, pick.size
        ),
        (None, _) => format!(
            "{unless}Maglev slot {} of {} is missing: a backend at random",
            pick.slot, pick.size
        ),
    }
}

fn tracked_reason(row: &FlowRow, state: u8) -> String {
    let nat = row
        .nat
        .map(|nat| format!(", source NATed to {nat}"))
        .unwrap_or_default();
    if row.backend_current {
        format!(
            "tracked flow: keeps backend {}#{}{nat}",
            row.backend, row.backend_id
        )
    } else if state == ct_state::DATAGRAM {
        format!(
            "tracked flow to backend {}#{}, which left the backend set: the conntrack GC \
             removes the flow, and its next packet is balanced to a live backend (rule 30)",
            row.backend, row.backend_id
        )
    } else {
        format!(
            "tracked flow: keeps backend {}#{}{nat} until the connection closes, although \
             it left the backend set (rule 29)",
            row.backend, row.backend_id
        )
    }
}

fn drop_reason(counter: Counter, src: &SocketAddrV4) -> String {
    match counter {
        Counter::DroppedSourceRange => format!(
            "drop: source {} is outside the frontend's loadBalancerSourceRanges (rule 15)",
            src.ip()
        ),
        Counter::DroppedNoLocalBackend => "drop: no local endpoint; the frontend may only use \
             endpoints on this node (traffic policy Local) and the service's are elsewhere \
             (rules 18, 28)"
            .to_string(),
        other => format!("drop ({})", other.name()),
    }
}

fn affinity(master: &ServiceValue) -> String {
    match master.affinity_timeout {
        0 => String::new(),
        seconds => format!("; ClientIP affinity: a client keeps its backend for {seconds}s"),
    }
}

fn frontend_match(master: &ServiceValue, scope: u8) -> FrontendMatch {
    FrontendMatch {
        scope: if scope == scope::EXTERNAL {
            "external"
        } else {
            "internal"
        },
        rev_nat_id: master.rev_nat_id,
        svc_id: master.svc_id,
        affinity_timeout: master.affinity_timeout,
        source_ranges: master.flags & service_flags::SOURCE_RANGES != 0,
    }
}

/// The master's slots in order; `packets` says whether to show how a
/// packet from outside is NATed to each.
fn backends<M: LbMaps>(
    maps: &M,
    key: &ServiceKey,
    master: &ServiceValue,
    packets: bool,
) -> Vec<BackendChoice> {
    (1..=master.count)
        .map(|slot| {
            let id = maps.service(&key.with_slot(slot)).map(|s| s.backend_id);
            let backend: Option<Backend> = slot_backend(maps, key, slot).map(|(_, b)| b);
            BackendChoice {
                slot,
                id,
                backend: backend.map(|b| endpoint(b.addr, b.port)),
                nat: backend.filter(|_| packets).map(|b| {
                    if b.flags & backend_flags::LOCAL != 0 {
                        "DNAT"
                    } else {
                        "DNAT+SNAT"
                    }
                }),
            }
        })
        .collect()
}

/// No external frontend: what clients on this node get.
fn socket_level<M: LbMaps>(maps: &M, flow: &Flow4, mut explanation: Explanation) -> Explanation {
    let internal = ServiceKey::new(flow.daddr, flow.dport, flow.proto, scope::INTERNAL, 0);
    if let Some(master) = maps.service(&internal) {
        let outcome = if master.count > 0 {
            format!(
                "are translated at connect() to one of {} backends{}",
                master.count,
                affinity(&master)
            )
        } else if master.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            "fail with EHOSTUNREACH: no local endpoint (rules 19, 28)".to_string()
        } else {
            "are refused (ECONNREFUSED): the service has no endpoint (rule 21)".to_string()
        };
        explanation.verdict = Verdict::SocketLevel;
        explanation.reason = format!(
            "not an external frontend: tc passes packets from outside; clients on this node \
             {outcome}"
        );
        explanation.backends = backends(maps, &internal, &master, false);
        explanation.frontend = Some(frontend_match(&master, scope::INTERNAL));
        return explanation;
    }
    // Rule 9: the port-0 master of an allocated ClusterIP.
    let wildcard = ServiceKey::new(flow.daddr, 0, flow.proto, scope::INTERNAL, 0);
    if maps
        .service(&wildcard)
        .is_some_and(|master| master.count == 0)
    {
        explanation.verdict = Verdict::Refuse;
        explanation.reason = format!(
            "refused: port {} is not defined on ClusterIP {}; clients on this node get \
             ECONNREFUSED (rule 9), tc passes packets from outside",
            explanation.dst.port(),
            explanation.dst.ip()
        );
        return explanation;
    }
    explanation.verdict = Verdict::Pass;
    explanation.reason = "pass: not a frontend".to_string();
    explanation
}

pub fn explanation_table(explanation: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "FLOW      {} -> {} {}",
        explanation.src, explanation.dst, explanation.protocol
    );
    let _ = writeln!(out, "VERDICT   {}", explanation.verdict.name());
    let _ = writeln!(out, "WHY       {}", explanation.reason);
    if let Some(frontend) = &explanation.frontend {
        let _ = writeln!(
            out,
            "FRONTEND  {} scope, rev-NAT id {}, service port id {}{}{}",
            frontend.scope,
            frontend.rev_nat_id,
            frontend.svc_id,
            match frontend.affinity_timeout {
                0 => String::new(),
                seconds => format!(", affinity {seconds}s"),
            },
            if frontend.source_ranges {
                ", source ranges"
            } else {
                ""
            },
        );
    }
    for (i, choice) in explanation.backends.iter().enumerate() {
        let backend = match (choice.id, choice.backend) {
            (Some(id), Some(backend)) => format!("{backend}#{id}"),
            (Some(id), None) => format!("?#{id} (backend entry missing)"),
            (None, _) => format!("slot {} missing", choice.slot),
        };
        let nat = choice.nat.map(|nat| format!(" {nat}")).unwrap_or_default();
        let label = if i == 0 { "BACKENDS" } else { "" };
        let _ = writeln!(out, "{label:<9} {backend}{nat}");
    }
    if let Some(row) = &explanation.tracked {
        let _ = writeln!(
            out,
            "TRACKED   frontend {}, backend {}#{}{}, NAT {}, {}, idle {}s, expires in {}s",
            row.frontend
                .map_or_else(|| "?".to_string(), |frontend| frontend.to_string()),
            row.backend,
            row.backend_id,
            if row.backend_current { "" } else { " (gone)" },
            row.nat
                .map_or_else(|| "-".to_string(), |nat| nat.to_string()),
            row.state,
            row.idle_seconds,
            row.expires_in_seconds,
        );
    }
    out
}

/// The maps `explain` reads, opened from their pins.
pub struct PinnedLbMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    conntrack: HashMap<MapData, Flow4, CtEntry>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    /// `None` under the pins of an agent that predates Maglev tables.
    maglev: Option<HashOfMaps<MapData, MaglevKey, Array<MapData, u32>>>,
}

impl PinnedLbMaps {
    pub fn open(bpffs: &Path) -> Result<Self> {
        let open = |name: &'static str| {
            open_pinned(bpffs, name)
                .with_context(|| format!("is an agent running with --bpffs {}?", bpffs.display()))
        };
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open(map_names::SERVICES)?))?,
            backends: HashMap::try_from(Map::HashMap(open(map_names::BACKENDS)?))?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(open(map_names::SOURCE_RANGES)?))?,
            conntrack: HashMap::try_from(Map::LruHashMap(open(map_names::CONNTRACK)?))?,
            rev_nat: HashMap::try_from(Map::HashMap(open(map_names::REV_NAT)?))?,
            maglev: match pin_path(bpffs, map_names::MAGLEV).exists() {
                true => Some(HashOfMaps::try_from(Map::HashOfMaps(open(
                    map_names::MAGLEV,
                )?))?),
                false => None,
            },
        })
    }
}

// A failed lookup reads as a missing entry: the maps are open and sized
// right, so that is what it means.
impl LbMaps for PinnedLbMaps {
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id, 0).ok()
    }

    fn source_allowed(&self, rev_nat_id: u32, addr: u32) -> bool {
        let key = LpmKey::new(
            SourceRange::LOOKUP_PREFIX_LEN,
            SourceRange::new(rev_nat_id, addr),
        );
        self.source_ranges.get(&key, 0).is_ok()
    }
}

impl ExplainMaps for PinnedLbMaps {
    fn tracked(&self, flow: &Flow4) -> Option<CtEntry> {
        self.conntrack.get(flow, 0).ok()
    }

    fn rev_nat(&self, id: u32) -> Option<RevNat> {
        self.rev_nat.get(&id, 0).ok()
    }

    fn maglev_entry(&self, key: &MaglevKey, index: u32) -> Option<u32> {
        self.maglev.as_ref()?.get(key, 0).ok()?.get(&index, 0).ok()
    }
}

/// Explains `src -> dst` from the pinned maps.
pub fn explain(
    bpffs: &Path,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    protocol: Protocol,
) -> Result<Explanation> {
    let maps = PinnedLbMaps::open(bpffs)?;
    let now_ns = monotonic_coarse_ns().context("reading CLOCK_MONOTONIC_COARSE")?;
    Ok(explain_flow(&maps, &flow(src, dst, protocol), now_ns))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use ipnet::Ipv4Net;

    use super::*;
    use crate::conntrack::tests::{SECOND, addr, entry, port};

    const NOW: u64 = 1000 * SECOND;

    /// The maps in memory; source ranges as CIDRs per rev-NAT id.
    #[derive(Default)]
    struct MemoryMaps {
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<u32, Backend>,
        source_ranges: Vec<(u32, Ipv4Net)>,
        conntrack: BTreeMap<Flow4, CtEntry>,
        rev_nat: BTreeMap<u32, RevNat>,
        maglev: BTreeMap<MaglevKey, Vec<u32>>,
    }

    impl LbMaps for MemoryMaps {
        fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
            self.services.get(key).copied()
        }
        fn backend(&self, id: u32) -> Option<Backend> {
            self.backends.get(&id).copied()
        }
        fn source_allowed(&self, rev_nat_id: u32, addr: u32) -> bool {
            let addr = codec::addr_from_map(addr);
            self.source_ranges
                .iter()
                .any(|(id, range)| *id == rev_nat_id && range.contains(&addr))
        }
    }

    impl ExplainMaps for MemoryMaps {
        fn tracked(&self, flow: &Flow4) -> Option<CtEntry> {
            self.conntrack.get(flow).copied()
        }
        fn rev_nat(&self, id: u32) -> Option<RevNat> {
            self.rev_nat.get(&id).copied()
        }
        fn maglev_entry(&self, key: &MaglevKey, index: u32) -> Option<u32> {
            self.maglev.get(key)?.get(index as usize).copied()
        }
    }

    fn master(count: u16, flags: u8, rev_nat_id: u32) -> ServiceValue {
        ServiceValue {
            count,
            flags,
            svc_id: 3,
            rev_nat_id,
            ..ServiceValue::slot(0)
        }
    }

    fn node_port_key(protocol: u8, scope: u8) -> ServiceKey {
        ServiceKey::new(addr(192, 168, 1, 10), port(30080), protocol, scope, 0)
    }

    impl MemoryMaps {
        /// NodePort 192.168.1.10:30080/TCP (rev-NAT id 5) and ClusterIP
        /// 10.96.0.10:80/TCP (rev-NAT id 1), both selecting backend 11 on
        /// this node and backend 12 elsewhere.
        fn node() -> Self {
            let mut maps = Self::default();
            maps.backends.insert(
                11,
                Backend::new(
                    addr(10, 244, 1, 11),
                    port(8080),
                    proto::TCP,
                    backend_flags::LOCAL,
                ),
            );
            maps.backends.insert(
                12,
                Backend::new(addr(10, 244, 2, 12), port(8080), proto::TCP, 0),
            );
            maps.rev_nat.insert(
                5,
                RevNat {
                    addr: addr(192, 168, 1, 10),
                    port: port(30080),
                    _pad0: 0,
                },
            );
            let cluster_ip = ServiceKey::new(
                addr(10, 96, 0, 10),
                port(80),
                proto::TCP,
                scope::INTERNAL,
                0,
            );
            for (key, rev_nat_id) in [
                (node_port_key(proto::TCP, scope::EXTERNAL), 5),
                (node_port_key(proto::TCP, scope::INTERNAL), 5),
                (cluster_ip, 1),
            ] {
                maps.frontend(key, master(2, 0, rev_nat_id), &[11, 12]);
            }
            maps.services.insert(
                ServiceKey::new(addr(10, 96, 0, 10), 0, proto::TCP, scope::INTERNAL, 0),
                ServiceValue::slot(0),
            );
            maps
        }

        fn frontend(&mut self, key: ServiceKey, master: ServiceValue, backend_ids: &[u32]) {
            for (slot, id) in (1..).zip(backend_ids) {
                self.services
                    .insert(key.with_slot(slot), ServiceValue::slot(*id));
            }
            self.services.insert(key, master);
        }

        fn set_external_master(&mut self, count: u16, flags: u8) {
            self.services.insert(
                node_port_key(proto::TCP, scope::EXTERNAL),
                master(count, flags, 5),
            );
        }
    }

    fn from(client: [u8; 4], dst: (Ipv4Addr, u16), protocol: Protocol) -> Flow4 {
        flow(
            SocketAddrV4::new(client.into(), 40000),
            SocketAddrV4::new(dst.0, dst.1),
            protocol,
        )
    }

    fn to_node_port(client: [u8; 4]) -> Flow4 {
        from(
            client,
            (Ipv4Addr::new(192, 168, 1, 10), 30080),
            Protocol::Tcp,
        )
    }

    const CLIENT: [u8; 4] = [203, 0, 113, 7];

    #[test]
    fn a_new_flow_to_a_node_port_is_translated_with_snat_for_remote_backends() {
        let mut maps = MemoryMaps::node();
        maps.services
            .get_mut(&node_port_key(proto::TCP, scope::EXTERNAL))
            .unwrap()
            .affinity_timeout = 10800;
        let explanation = explain_flow(&maps, &to_node_port(CLIENT), NOW);
        assert_eq!(explanation.verdict, Verdict::Translate);
        assert_eq!(
            explanation.reason,
            "new flow: translated to one of 2 backends; ClientIP affinity: a client keeps its \
             backend for 10800s; no Maglev table: a backend at random"
        );
        assert_eq!(
            explanation.frontend,
            Some(FrontendMatch {
                scope: "external",
                rev_nat_id: 5,
                svc_id: 3,
                affinity_timeout: 10800,
                source_ranges: false,
            })
        );
        assert_eq!(
            explanation.backends,
            [
                BackendChoice {
                    slot: 1,
                    id: Some(11),
                    backend: Some("10.244.1.11:8080".parse().unwrap()),
                    nat: Some("DNAT"),
                },
                BackendChoice {
                    slot: 2,
                    id: Some(12),
                    backend: Some("10.244.2.12:8080".parse().unwrap()),
                    nat: Some("DNAT+SNAT"),
                },
            ]
        );
        assert_eq!(
            explanation_table(&explanation),
            "FLOW      203.0.113.7:40000 -> 192.168.1.10:30080 TCP\n\
             VERDICT   translate\n\
             WHY       new flow: translated to one of 2 backends; ClientIP affinity: a client \
             keeps its backend for 10800s; no Maglev table: a backend at random\n\
             FRONTEND  external scope, rev-NAT id 5, service port id 3, affinity 10800s\n\
             BACKENDS  10.244.1.11:8080#11 DNAT\n          10.244.2.12:8080#12 DNAT+SNAT\n"
        );
    }

    #[test]
    fn a_new_flow_to_a_frontend_with_a_maglev_table_gets_the_backend_of_its_slot() {
        let mut maps = MemoryMaps::node();
        let key = node_port_key(proto::TCP, scope::EXTERNAL);
        let table_key = codec::maglev_key(&maps.services[&key]);
        let flow = to_node_port(CLIENT);
        // M = 7: backend 12 in the flow's slot only.
        let slot = maglev::slot(flow_hash(&flow), 7);
        let mut table = vec![7, 11, 11, 11, 11, 11, 11, 11];
        table[slot as usize] = 12;
        maps.maglev.insert(table_key, table);

        let explanation = explain_flow(&maps, &flow, NOW);
        assert_eq!(explanation.verdict, Verdict::Translate);
        assert_eq!(
            explanation.maglev,
            Some(MaglevPick {
                slot,
                size: 7,
                id: Some(12),
                backend: Some("10.244.2.12:8080".parse().unwrap()),
            })
        );
        assert_eq!(
            explanation.reason,
            format!(
                "new flow: translated to one of 2 backends; Maglev picks backend \
                 10.244.2.12:8080#12 (slot {slot} of 7)"
            )
        );
        assert_eq!(
            serde_json::to_value(&explanation).unwrap()["maglev"]["backend"],
            "10.244.2.12:8080"
        );

        // Affinity is looked up first.
        maps.services.get_mut(&key).unwrap().affinity_timeout = 60;
        assert!(explain_flow(&maps, &flow, NOW).reason.ends_with(&format!(
            "for a client without a fresh affinity entry, Maglev picks backend \
                 10.244.2.12:8080#12 (slot {slot} of 7)"
        )));
        maps.backends.remove(&12);
        assert!(
            explain_flow(&maps, &flow, NOW)
                .reason
                .contains("whose entry is missing: the flow is refused (missing_backend)")
        );
    }

    #[test]
    fn a_tracked_flow_keeps_its_backend_before_any_new_flow_decision() {
        let mut maps = MemoryMaps::node();
        // New flows would be refused now; the tracked one goes on.
        maps.set_external_master(0, 0);
        let flow = to_node_port(CLIENT);
        let tracked = CtEntry {
            backend_id: 12,
            backend_addr: addr(10, 244, 2, 12),
            nat_addr: addr(192, 168, 1, 10),
            nat_port: port(61001),
            flags: proxy_common::ct_flags::SNAT,
            ..entry(ct_state::TCP_ESTABLISHED, NOW - 5 * SECOND)
        };
        maps.conntrack.insert(flow, tracked);
        let explanation = explain_flow(&maps, &flow, NOW);
        assert_eq!(explanation.verdict, Verdict::Established);
        assert_eq!(
            explanation.reason,
            "tracked flow: keeps backend 10.244.2.12:8080#12, source NATed to 192.168.1.10:61001"
        );
        let row = explanation.tracked.as_ref().unwrap();
        assert_eq!(row.frontend, Some("192.168.1.10:30080".parse().unwrap()));
        assert_eq!((row.idle_seconds, row.state), (5, "established"));
        assert!(explanation.backends.is_empty());
        assert!(explanation_table(&explanation).ends_with(
            "TRACKED   frontend 192.168.1.10:30080, backend 10.244.2.12:8080#12, NAT \
                 192.168.1.10:61001, established, idle 5s, expires in 21595s\n"
        ));
    }

    #[test]
    fn rule_29_30_tracked_flows_whose_backend_left() {
        let mut maps = MemoryMaps::node();
        maps.backends.remove(&11);
        let tcp = to_node_port(CLIENT);
        maps.conntrack
            .insert(tcp, entry(ct_state::TCP_ESTABLISHED, NOW));
        let explanation = explain_flow(&maps, &tcp, NOW);
        assert!(
            explanation.reason.contains("until the connection closes"),
            "{}",
            explanation.reason
        );
        assert!(explanation.reason.contains("(rule 29)"));
        let udp = from(
            CLIENT,
            (Ipv4Addr::new(192, 168, 1, 10), 30080),
            Protocol::Udp,
        );
        maps.conntrack.insert(udp, entry(ct_state::DATAGRAM, NOW));
        let explanation = explain_flow(&maps, &udp, NOW);
        assert_eq!(explanation.verdict, Verdict::Established);
        assert!(
            explanation
                .reason
                .contains("the conntrack GC removes the flow"),
            "{}",
            explanation.reason
        );
        assert!(!explanation.tracked.unwrap().backend_current);
    }

    #[test]
    fn rule_15_sources_outside_the_ranges_are_dropped() {
        let mut maps = MemoryMaps::node();
        maps.set_external_master(2, service_flags::SOURCE_RANGES);
        maps.source_ranges
            .push((5, "198.51.100.0/24".parse().unwrap()));
        let denied = explain_flow(&maps, &to_node_port(CLIENT), NOW);
        assert_eq!(denied.verdict, Verdict::Drop);
        assert_eq!(
            denied.reason,
            "drop: source 203.0.113.7 is outside the frontend's loadBalancerSourceRanges (rule 15)"
        );
        assert!(denied.frontend.unwrap().source_ranges);
        let allowed = explain_flow(&maps, &to_node_port([198, 51, 100, 9]), NOW);
        assert_eq!(allowed.verdict, Verdict::Translate);
    }

    #[test]
    fn rule_28_no_local_endpoint_drops() {
        let mut maps = MemoryMaps::node();
        maps.set_external_master(0, service_flags::DROP_WHEN_EMPTY);
        let explanation = explain_flow(&maps, &to_node_port(CLIENT), NOW);
        assert_eq!(explanation.verdict, Verdict::Drop);
        assert!(explanation.reason.starts_with("drop: no local endpoint"));
        assert!(explanation.backends.is_empty());
    }

    #[test]
    fn rule_21_no_endpoint_rejects_with_rst_or_port_unreachable() {
        let mut maps = MemoryMaps::node();
        maps.set_external_master(0, 0);
        let tcp = explain_flow(&maps, &to_node_port(CLIENT), NOW);
        assert_eq!(tcp.verdict, Verdict::Reject);
        assert_eq!(
            tcp.reason,
            "reject (TCP RST): the service has no endpoint (rule 21)"
        );
        maps.frontend(
            node_port_key(proto::UDP, scope::EXTERNAL),
            master(0, 0, 6),
            &[],
        );
        let udp = from(
            CLIENT,
            (Ipv4Addr::new(192, 168, 1, 10), 30080),
            Protocol::Udp,
        );
        assert_eq!(
            explain_flow(&maps, &udp, NOW).reason,
            "reject (ICMP port unreachable): the service has no endpoint (rule 21)"
        );
    }

    #[test]
    fn a_cluster_ip_is_translated_at_socket_level_only() {
        let maps = MemoryMaps::node();
        let flow = from(CLIENT, (Ipv4Addr::new(10, 96, 0, 10), 80), Protocol::Tcp);
        let explanation = explain_flow(&maps, &flow, NOW);
        assert_eq!(explanation.verdict, Verdict::SocketLevel);
        assert_eq!(
            explanation.reason,
            "not an external frontend: tc passes packets from outside; clients on this node are \
             translated at connect() to one of 2 backends"
        );
        assert_eq!(explanation.frontend.as_ref().unwrap().scope, "internal");
        assert_eq!(explanation.backends.len(), 2);
        assert!(
            explanation
                .backends
                .iter()
                .all(|choice| choice.nat.is_none())
        );
        assert_eq!(
            serde_json::to_value(&explanation).unwrap()["verdict"],
            "socket-level"
        );
    }

    #[test]
    fn rule_09_an_undefined_cluster_ip_port_is_refused() {
        let maps = MemoryMaps::node();
        let flow = from(CLIENT, (Ipv4Addr::new(10, 96, 0, 10), 81), Protocol::Tcp);
        let explanation = explain_flow(&maps, &flow, NOW);
        assert_eq!(explanation.verdict, Verdict::Refuse);
        assert!(
            explanation
                .reason
                .starts_with("refused: port 81 is not defined on ClusterIP 10.96.0.10")
        );
        // The wildcard is per protocol.
        let udp = from(CLIENT, (Ipv4Addr::new(10, 96, 0, 10), 81), Protocol::Udp);
        assert_eq!(explain_flow(&maps, &udp, NOW).verdict, Verdict::Pass);
    }

    #[test]
    fn anything_else_passes() {
        let maps = MemoryMaps::node();
        let flow = from(CLIENT, (Ipv4Addr::new(192, 168, 1, 10), 22), Protocol::Tcp);
        let explanation = explain_flow(&maps, &flow, NOW);
        assert_eq!(explanation.verdict, Verdict::Pass);
        assert_eq!(explanation.reason, "pass: not a frontend");
        assert_eq!(
            explanation_table(&explanation),
            "FLOW      203.0.113.7:40000 -> 192.168.1.10:22 TCP\nVERDICT   pass\nWHY       pass: not a frontend\n"
        );
    }

    #[test]
    fn missing_slots_and_backends_are_shown() {
        let mut maps = MemoryMaps::node();
        maps.services
            .remove(&node_port_key(proto::TCP, scope::EXTERNAL).with_slot(2));
        maps.backends.remove(&11);
        let explanation = explain_flow(&maps, &to_node_port(CLIENT), NOW);
        assert_eq!(
            explanation.backends,
            [
                BackendChoice {
                    slot: 1,
                    id: Some(11),
                    backend: None,
                    nat: None
                },
                BackendChoice {
                    slot: 2,
                    id: None,
                    backend: None,
                    nat: None
                },
            ]
        );
        let table = explanation_table(&explanation);
        assert!(
            table.contains("BACKENDS  ?#11 (backend entry missing)\n          slot 2 missing\n"),
            "{table}"
        );
    }
}
