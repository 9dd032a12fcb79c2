//! Test fixtures for the model and what consumes it: a builder for
//! snapshots and random change sequences over a small universe of names and
//! addresses, small enough that Services collide on frontends, share
//! ClusterIPs and backends, and slices move between Services.

use std::{net::Ipv4Addr, sync::Arc};

use ipnet::Ipv4Net;

use super::{
    ClusterSnapshot, NodeInfo, NodePortAddresses, ObjectKey, Protocol, ServiceInfo, ServiceType,
    SliceInfo,
    objects::{EndpointInfo, ServicePortInfo, SlicePortInfo},
};

/// xorshift64*: deterministic, so a failing sequence is reproduced by its
/// seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Clone>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())].clone()
    }
}

/// An address written out, e.g. `ip("10.96.0.10")`.
pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// An endpoint with these conditions, on no node and without hints.
pub fn endpoint(addr: &str, ready: bool, serving: bool, terminating: bool) -> EndpointInfo {
    EndpointInfo {
        addr: ip(addr),
        ready,
        serving,
        terminating,
        node_name: None,
        zone_hints: Vec::new(),
    }
}

pub fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name)
}

const NAMESPACES: [&str; 2] = ["default", "team"];
const SERVICES: [&str; 6] = ["web", "api", "db", "dns", "cache", "queue"];
const PORT_NAMES: [&str; 2] = ["", "metrics"];

/// This node, with a zone and two addresses.
pub fn node(zone: Option<&str>) -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        zone: zone.map(str::to_owned),
        addresses: vec![
            Ipv4Addr::new(192, 168, 0, 2),
            Ipv4Addr::new(203, 0, 113, 10),
        ],
        deleting: false,
    }
}

/// An empty snapshot of node1.
pub fn snapshot() -> ClusterSnapshot {
    ClusterSnapshot {
        node_name: "node1".into(),
        node: Some(node(Some("zone-a"))),
        ..ClusterSnapshot::default()
    }
}

/// A ClusterIP Service with these ports (name, protocol, port).
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, Protocol, u16)],
) -> ServiceInfo {
    ServiceInfo {
        key: key(namespace, name),
        service_type: ServiceType::ClusterIp,
        cluster_ip: ip(cluster_ip),
        ports: ports
            .iter()
            .map(|&(name, protocol, port)| ServicePortInfo {
                name: name.to_owned(),
                protocol,
                port,
                node_port: None,
            })
            .collect(),
        affinity_timeout: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        source_ranges: Vec::new(),
        external_traffic_local: false,
        internal_traffic_local: false,
        health_check_node_port: None,
    }
}

/// A ClusterIP Service in "default" with one unnamed TCP port 80.
pub fn cluster_ip_service(name: &str, cluster_ip: Ipv4Addr) -> ServiceInfo {
    service(
        "default",
        name,
        &cluster_ip.to_string(),
        &[("", Protocol::Tcp, 80)],
    )
}

/// A slice in "default" of `service`'s unnamed TCP port (to 8080), its
/// endpoints ready on node1.
pub fn ready_slice(name: &str, service: &str, addrs: &[Ipv4Addr]) -> SliceInfo {
    SliceInfo {
        key: key("default", name),
        service: key("default", service),
        ports: vec![SlicePortInfo {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: addrs
            .iter()
            .map(|addr| EndpointInfo {
                addr: *addr,
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some("node1".into()),
                zone_hints: Vec::new(),
            })
            .collect(),
    }
}

fn random_service(rng: &mut Rng, key: ObjectKey) -> ServiceInfo {
    let service_type = rng.pick(&[
        ServiceType::ClusterIp,
        ServiceType::NodePort,
        ServiceType::LoadBalancer,
    ]);
    let ports = (0..1 + rng.below(2))
        .map(|i| ServicePortInfo {
            name: PORT_NAMES[i].to_owned(),
            protocol: rng.pick(&[Protocol::Tcp, Protocol::Udp]),
            port: rng.pick(&[80, 443]),
            node_port: rng.chance(80).then(|| rng.pick(&[30080, 30081, 30082])),
        })
        .collect();
    let external_traffic_local = rng.chance(30);
    ServiceInfo {
        key,
        service_type,
        cluster_ip: Ipv4Addr::new(10, 96, 0, 1 + rng.below(8) as u8),
        ports,
        affinity_timeout: rng.chance(20).then_some(300),
        external_ips: match rng.below(4) {
            0 => vec![Ipv4Addr::new(203, 0, 113, 1 + rng.below(2) as u8)],
            _ => Vec::new(),
        },
        load_balancer_ips: match rng.below(3) {
            0 => Vec::new(),
            _ => vec![Ipv4Addr::new(198, 18, 0, 1 + rng.below(3) as u8)],
        },
        source_ranges: match rng.below(4) {
            0 => vec![Ipv4Net::new(Ipv4Addr::new(10, rng.below(3) as u8, 0, 0), 16).unwrap()],
            _ => Vec::new(),
        },
        external_traffic_local,
        internal_traffic_local: rng.chance(20),
        health_check_node_port: (service_type == ServiceType::LoadBalancer
            && external_traffic_local)
            .then(|| rng.pick(&[32000, 32001])),
    }
}

fn random_slice(rng: &mut Rng, key: ObjectKey) -> SliceInfo {
    let mut ports = Vec::new();
    for name in PORT_NAMES {
        if rng.chance(70) {
            ports.push(SlicePortInfo {
                name: name.to_owned(),
                protocol: rng.pick(&[Protocol::Tcp, Protocol::Udp]),
                port: rng.pick(&[8080, 8443]),
            });
        }
    }
    let endpoints = (0..rng.below(5))
        .map(|_| {
            let ready = rng.chance(70);
            EndpointInfo {
                addr: Ipv4Addr::new(10, 244, rng.below(2) as u8, 1 + rng.below(6) as u8),
                ready,
                serving: ready || rng.chance(50),
                terminating: !ready && rng.chance(60),
                node_name: rng.pick(&[Some("node1".into()), Some("node2".into()), None]),
                zone_hints: match rng.below(3) {
                    0 => vec![rng.pick(&["zone-a", "zone-b"]).to_owned()],
                    _ => Vec::new(),
                },
            }
        })
        .collect();
    SliceInfo {
        service: ObjectKey::new(key.namespace(), rng.pick(&SERVICES)),
        key,
        ports,
        endpoints,
    }
}

/// One random change to `snapshot`: a Service or slice added, replaced or
/// removed, now and then one of the node's facts (zone, addresses, the
/// NodePort ranges), which changes every plan.
pub fn random_change(rng: &mut Rng, snapshot: &mut ClusterSnapshot) {
    let namespace = rng.pick(&NAMESPACES);
    match rng.below(20) {
        0..=7 => {
            let key = key(namespace, rng.pick(&SERVICES));
            if rng.chance(25) {
                snapshot.services.remove(&key);
            } else {
                let service = random_service(rng, key.clone());
                snapshot.services.insert(key, Arc::new(service));
            }
        }
        8..=16 => {
            let key = key(namespace, &format!("slice-{}", rng.below(8)));
            if rng.chance(25) {
                snapshot.slices.remove(&key);
            } else {
                let slice = random_slice(rng, key.clone());
                snapshot.slices.insert(key, Arc::new(slice));
            }
        }
        17 => snapshot.node = Some(node(rng.pick(&[None, Some("zone-a"), Some("zone-b")]))),
        18 => {
            snapshot.local_addresses = match rng.below(2) {
                0 => vec![Ipv4Addr::new(192, 168, 0, 2)],
                _ => vec![Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(192, 168, 1, 2)],
            };
        }
        _ => {
            snapshot.nodeport_addresses = match rng.below(2) {
                0 => NodePortAddresses::Primary,
                _ => NodePortAddresses::Cidrs(vec!["192.168.0.0/16".parse().unwrap()]),
            };
        }
    }
}
