//! The maps every case meets: a fixed mix of frontends like the fixtures'
//! (local and remote backends, UDP and TCP, no-endpoint reject, eTP=Local
//! drop, source ranges, affinity, a ClusterIP), plus a few flows primed in
//! conntrack at the start of every batch so replies and ICMP errors built
//! from the fixtures meet a tracked flow. The checks read the maps back
//! ([`Topology::read`]): what explains a packet is what the programs saw.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, Result};
use aya::{Ebpf, maps::MapData};
use proxy_common::{
    Backend, CtEntry, CtReply, Flow4, RevNat, ServiceKey, ServiceValue, backend_flags, ct_flags,
    ct_state, map_names, nat_ports, proto, scope,
};

use crate::tc::{self, FrontendSpec, Maps};

/// The addresses of the node the programs run on (eth0 of
/// [`tc::node_netns`]): the only SNAT sources its routes give.
pub const NODE_ADDRESSES: [Ipv4Addr; 1] = [Ipv4Addr::new(192, 168, 0, 2)];

const CLIENT: &str = "203.0.113.2:40000";

fn frontend(spec: &str, backends: &[&str]) -> FrontendSpec {
    FrontendSpec {
        frontend: spec.to_string(),
        scope: "external".to_string(),
        backends: backends.iter().map(|b| b.to_string()).collect(),
        when_empty: None,
        source_ranges: Vec::new(),
        affinity: 0,
    }
}

/// The frontends and backends every case runs against.
pub fn maps() -> Maps {
    let tcp_local = "10.244.1.11:8080/tcp";
    let tcp_remote = "10.244.2.11:8080/tcp";
    Maps {
        frontends: vec![
            frontend("192.168.0.2:30080/tcp", &[tcp_remote]),
            frontend("192.168.0.2:30081/tcp", &[tcp_local]),
            FrontendSpec {
                affinity: 300,
                ..frontend(
                    "192.168.0.2:30082/tcp",
                    &[tcp_local, "10.244.1.12:8080/tcp", "10.244.1.13:8080/tcp"],
                )
            },
            frontend("192.168.0.2:30053/udp", &["10.244.2.11:5353/udp"]),
            frontend("192.168.0.2:30054/udp", &["10.244.1.11:5353/udp"]),
            frontend("192.168.0.2:30090/tcp", &[]),
            frontend("192.168.0.2:30091/udp", &[]),
            FrontendSpec {
                when_empty: Some("drop".to_string()),
                ..frontend("192.168.0.2:30092/tcp", &[])
            },
            FrontendSpec {
                affinity: 60,
                ..frontend("192.0.2.10:80/tcp", &[tcp_remote, "10.244.1.12:8080/tcp"])
            },
            FrontendSpec {
                source_ranges: vec![
                    "203.0.113.0/24".parse().unwrap(),
                    "10.0.0.0/8".parse().unwrap(),
                ],
                ..frontend("192.0.2.20:80/tcp", &[tcp_local])
            },
            FrontendSpec {
                scope: "internal".to_string(),
                ..frontend("10.96.0.10:80/tcp", &[tcp_local])
            },
        ],
        local: vec![
            tcp_local.to_string(),
            "10.244.1.12:8080/tcp".to_string(),
            "10.244.1.13:8080/tcp".to_string(),
            "10.244.1.11:5353/udp".to_string(),
        ],
    }
}

/// A flow written into conntrack before every batch, as tc_ingress would
/// have tracked it.
struct PrimedFlow {
    client: &'static str,
    frontend: &'static str,
    backend: &'static str,
    /// The SNAT port of a flow to a remote backend.
    snat_port: Option<u16>,
}

const PRIMED_TCP_SNAT_PORT: u16 = 61000;
const PRIMED_UDP_SNAT_PORT: u16 = 61001;

const PRIMED: [PrimedFlow; 5] = [
    PrimedFlow {
        client: CLIENT,
        frontend: "192.168.0.2:30080/tcp",
        backend: "10.244.2.11:8080/tcp",
        snat_port: Some(PRIMED_TCP_SNAT_PORT),
    },
    PrimedFlow {
        client: CLIENT,
        frontend: "192.168.0.2:30053/udp",
        backend: "10.244.2.11:5353/udp",
        snat_port: Some(PRIMED_UDP_SNAT_PORT),
    },
    PrimedFlow {
        client: CLIENT,
        frontend: "192.168.0.2:30081/tcp",
        backend: "10.244.1.11:8080/tcp",
        snat_port: None,
    },
    PrimedFlow {
        client: CLIENT,
        frontend: "192.168.0.2:30054/udp",
        backend: "10.244.1.11:5353/udp",
        snat_port: None,
    },
    PrimedFlow {
        client: CLIENT,
        frontend: "192.0.2.10:80/tcp",
        backend: "10.244.2.11:8080/tcp",
        snat_port: Some(61002),
    },
];

/// The SNAT port of the primed flow to the remote backend of `protocol`
/// (`tcp`, `udp`), which fixture packets addressed to `node:snat` get.
pub fn primed_snat_port(protocol: &str) -> u16 {
    if protocol == "udp" {
        PRIMED_UDP_SNAT_PORT
    } else {
        PRIMED_TCP_SNAT_PORT
    }
}

/// A master entry as read back, with the backends of its slots.
pub struct Master {
    pub frontend: SocketAddrV4,
    pub proto: u8,
    pub scope: u8,
    pub value: ServiceValue,
    /// Backend ids of slots `1..=count`.
    pub backend_ids: Vec<u32>,
}

/// A backend as read back.
pub struct BackendInfo {
    pub at: SocketAddrV4,
    pub proto: u8,
    pub local: bool,
}

/// The service maps as the programs see them (they never change while the
/// fuzzer runs).
pub struct Topology {
    pub masters: Vec<Master>,
    pub backends: BTreeMap<u32, BackendInfo>,
    pub rev_nat: BTreeMap<u32, SocketAddrV4>,
}

/// An address and port as the maps and `Flow4` hold them (network order).
pub fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port))
}

/// The `Flow4` of a packet from `src` to `dst`.
pub fn flow(src: SocketAddrV4, dst: SocketAddrV4, protocol: u8) -> Flow4 {
    Flow4::new(
        tc::ne_addr(src.ip()),
        tc::ne_addr(dst.ip()),
        src.port().to_be(),
        dst.port().to_be(),
        protocol,
    )
}

pub fn is_node_address(addr: &Ipv4Addr) -> bool {
    NODE_ADDRESSES.contains(addr)
}

pub fn is_snat_port(port: u16) -> bool {
    (nat_ports::FIRST..=nat_ports::LAST).contains(&port)
}

impl Topology {
    /// One external TCP frontend (rev-NAT and service id 1) with one
    /// backend (id 1): what the checks' unit tests explain packets by.
    #[cfg(test)]
    pub fn one_frontend(frontend: &str, backend: &str, local: bool) -> Topology {
        let frontend: SocketAddrV4 = frontend.parse().unwrap();
        Topology {
            masters: vec![Master {
                frontend,
                proto: proto::TCP,
                scope: scope::EXTERNAL,
                value: ServiceValue {
                    count: 1,
                    rev_nat_id: 1,
                    svc_id: 1,
                    ..ServiceValue::slot(0)
                },
                backend_ids: vec![1],
            }],
            backends: BTreeMap::from([(
                1,
                BackendInfo {
                    at: backend.parse().unwrap(),
                    proto: proto::TCP,
                    local,
                },
            )]),
            rev_nat: BTreeMap::from([(1, frontend)]),
        }
    }

    pub fn read(ebpf: &mut Ebpf) -> Result<Topology> {
        let services: aya::maps::HashMap<MapData, ServiceKey, ServiceValue> =
            tc::map(ebpf, map_names::SERVICES)?;
        let backends: aya::maps::HashMap<MapData, u32, Backend> =
            tc::map(ebpf, map_names::BACKENDS)?;
        let rev_nat: aya::maps::HashMap<MapData, u32, RevNat> = tc::map(ebpf, map_names::REV_NAT)?;
        let entries: BTreeMap<ServiceKey, ServiceValue> =
            services.iter().collect::<Result<_, _>>()?;
        let mut masters = Vec::new();
        for (key, value) in &entries {
            if key.slot != 0 {
                continue;
            }
            let backend_ids = (1..=value.count)
                .map(|slot| {
                    entries
                        .get(&key.with_slot(slot))
                        .map(|slot| slot.backend_id)
                        .with_context(|| format!("slot {slot} of {key:?} missing"))
                })
                .collect::<Result<_>>()?;
            masters.push(Master {
                frontend: endpoint(key.addr, key.port),
                proto: key.proto,
                scope: key.scope,
                value: *value,
                backend_ids,
            });
        }
        let backends = backends
            .iter()
            .map(|entry| {
                entry.map(|(id, backend)| {
                    let info = BackendInfo {
                        at: endpoint(backend.addr, backend.port),
                        proto: backend.proto,
                        local: backend.flags & backend_flags::LOCAL != 0,
                    };
                    (id, info)
                })
            })
            .collect::<Result<_, _>>()?;
        let rev_nat = rev_nat
            .iter()
            .map(|entry| entry.map(|(id, frontend)| (id, endpoint(frontend.addr, frontend.port))))
            .collect::<Result<_, _>>()?;
        Ok(Topology {
            masters,
            backends,
            rev_nat,
        })
    }

    /// The external master of a frontend.
    pub fn external(&self, frontend: SocketAddrV4, protocol: u8) -> Option<&Master> {
        self.masters.iter().find(|master| {
            master.scope == scope::EXTERNAL
                && master.frontend == frontend
                && master.proto == protocol
        })
    }

    pub fn backend_id(&self, at: SocketAddrV4, protocol: u8) -> Option<u32> {
        self.backends
            .iter()
            .find(|(_, backend)| backend.at == at && backend.proto == protocol)
            .map(|(id, _)| *id)
    }

    /// The external frontends (as rev-NAT shows them) whose slots hold the
    /// backend at `at`.
    pub fn frontends_of(&self, at: SocketAddrV4, protocol: u8) -> Vec<SocketAddrV4> {
        let Some(id) = self.backend_id(at, protocol) else {
            return Vec::new();
        };
        self.masters
            .iter()
            .filter(|master| master.scope == scope::EXTERNAL && master.backend_ids.contains(&id))
            .filter_map(|master| self.rev_nat.get(&master.value.rev_nat_id).copied())
            .collect()
    }

    /// The external master with affinity of service port `svc_id`.
    pub fn affinity_master(&self, svc_id: u32) -> Option<&Master> {
        self.masters.iter().find(|master| {
            master.scope == scope::EXTERNAL
                && master.value.svc_id == svc_id
                && master.value.affinity_timeout > 0
        })
    }

    /// Writes the primed flows (reply entry first, as tc_ingress does).
    pub fn prime(&self, ebpf: &mut Ebpf) -> Result<()> {
        let mut conntrack: aya::maps::HashMap<MapData, Flow4, CtEntry> =
            tc::map(ebpf, map_names::CONNTRACK)?;
        let mut replies: aya::maps::HashMap<MapData, Flow4, CtReply> =
            tc::map(ebpf, map_names::CT_REPLY)?;
        for primed in &PRIMED {
            let client: SocketAddrV4 = primed.client.parse()?;
            let (frontend, protocol) = tc::service_addr(primed.frontend)?;
            let (backend, _) = tc::service_addr(primed.backend)?;
            let master = self
                .external(frontend, protocol)
                .with_context(|| format!("no frontend {}", primed.frontend))?;
            let backend_id = self
                .backend_id(backend, protocol)
                .with_context(|| format!("no backend {}", primed.backend))?;
            let rev_nat_id = master.value.rev_nat_id;
            let (nat_addr, nat_port, flags) = match primed.snat_port {
                Some(port) => (
                    tc::ne_addr(&NODE_ADDRESSES[0]),
                    port.to_be(),
                    ct_flags::SNAT,
                ),
                None => (0, 0, 0),
            };
            let entry = CtEntry {
                last_seen: 0,
                backend_id,
                rev_nat_id,
                backend_addr: tc::ne_addr(backend.ip()),
                nat_addr,
                backend_port: backend.port().to_be(),
                nat_port,
                state: if protocol == proto::TCP {
                    ct_state::TCP_ESTABLISHED
                } else {
                    ct_state::DATAGRAM
                },
                flags,
                _pad0: 0,
            };
            let key = flow(client, frontend, protocol);
            let reply = CtReply {
                client_addr: key.saddr,
                rev_nat_id,
                client_port: key.sport,
                flags,
                _pad0: 0,
            };
            replies.insert(reply_key(&key, &entry), reply, 0)?;
            conntrack.insert(key, entry, 0)?;
        }
        Ok(())
    }
}

/// Where a tracked flow's reply entry is: keyed by the reply as it
/// arrives, from the backend to the SNAT source or to the client.
pub fn reply_key(key: &Flow4, entry: &CtEntry) -> Flow4 {
    if entry.flags & ct_flags::SNAT != 0 {
        Flow4::new(
            entry.backend_addr,
            entry.nat_addr,
            entry.backend_port,
            entry.nat_port,
            key.proto,
        )
    } else {
        Flow4::new(
            entry.backend_addr,
            key.saddr,
            entry.backend_port,
            key.sport,
            key.proto,
        )
    }
}
