//! Service ports -> frontends of every kind, and for each the backends new
//! flows may be sent to: from clients on this node (socket level) and from
//! outside it (packet level).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use serde::Serialize;

use super::{
    ClusterSnapshot, NodePortAddresses, ObjectKey, Protocol,
    objects::{EndpointInfo, ServiceInfo, ServicePortInfo, ServiceType, SliceInfo},
};

/// The unit of proxying (rule 4).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub service: ObjectKey,
    pub port_name: String,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{:?}", self.service, self.port_name, self.protocol)
    }
}

/// An address:port:protocol clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// An endpoint address:port:protocol new flows are sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// Why a frontend exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    /// Rule 8.
    ClusterIp,
    /// Rules 11, 12: a node address and the port's nodePort.
    NodePort,
    /// Rule 14.
    ExternalIp,
    /// Rule 13.
    LoadBalancer,
}

/// What a new flow meets when its selection has no backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WhenEmpty {
    /// Rule 21: the service port has no usable endpoint anywhere.
    Reject,
    /// Rules 18, 19, 28: it has endpoints, none this frontend may use.
    Drop,
}

/// The backends new flows may be sent to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// Sorted, without duplicates.
    pub backends: Vec<BackendAddr>,
    /// Meaningful only when `backends` is empty.
    pub when_empty: WhenEmpty,
}

/// One frontend of a service port and where its new flows go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendPlan {
    pub frontend: Frontend,
    pub kind: FrontendKind,
    /// New flows from clients on this node (pods, host processes): the
    /// socket-level datapath programs this.
    pub internal: Selection,
    /// New flows from outside the node (packet level); `None` for ClusterIP.
    pub external: Option<Selection>,
    /// Rule 15: LoadBalancer frontends only; empty = everyone.
    pub source_ranges: Vec<Ipv4Net>,
}

/// What one service port programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePortPlan {
    pub frontends: Vec<FrontendPlan>,
    /// ClientIP affinity timeout in seconds (rule 23).
    pub affinity_timeout: Option<u32>,
    /// The port's endpoints on this node (rule 6), whatever their
    /// conditions: external flows to them need no source NAT (rule 17).
    pub local_backends: BTreeSet<BackendAddr>,
}

/// Rule 32: a `healthCheckNodePort` this node answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub service: ObjectKey,
    pub node_port: u16,
    /// Distinct IPs of this node's ready endpoints, over all ports.
    pub local_ready: usize,
    /// Distinct IPs of this node's serving and terminating endpoints: they
    /// still carry traffic while the balancer drains the node.
    pub local_serving_terminating: usize,
}

/// Two service ports claimed one frontend; the first by name keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendConflict {
    pub frontend: Frontend,
    pub kept: ServicePortName,
    pub dropped: ServicePortName,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub ports: BTreeMap<ServicePortName, ServicePortPlan>,
    pub conflicts: Vec<FrontendConflict>,
    /// Rule 9: ClusterIPs of proxied services (their undefined ports are
    /// refused).
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub health_checks: Vec<HealthCheck>,
}

/// Every endpoint of one service port, once per backend (rule 5).
type PortEndpoints<'a> = BTreeMap<BackendAddr, &'a EndpointInfo>;

/// This node, as every service port is planned against it: when any of it
/// changes, every service port is planned again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct NodeView {
    name: String,
    zone: Option<String>,
    /// Rule 11: the addresses that serve NodePorts.
    node_port_addresses: Vec<Ipv4Addr>,
}

impl NodeView {
    pub(super) fn of(snapshot: &ClusterSnapshot) -> Self {
        Self {
            name: snapshot.node_name.clone(),
            zone: snapshot.node.as_ref().and_then(|node| node.zone.clone()),
            node_port_addresses: node_port_addresses(snapshot),
        }
    }
}

/// What one Service programs: the plans of its ports, before frontends
/// claimed by two service ports are settled, and its health check.
pub(super) struct ServicePlan {
    pub ports: Vec<(ServicePortName, ServicePortPlan)>,
    pub health_check: Option<HealthCheck>,
}

/// Rules 4, 5, 8, 11, 13-19, 21, 23-28, 32 for one Service and its slices
/// (in key order).
pub(super) fn service_plan(
    node: &NodeView,
    service: &ServiceInfo,
    slices: &[&SliceInfo],
) -> ServicePlan {
    let endpoints: Vec<PortEndpoints> = service
        .ports
        .iter()
        .map(|port| endpoints_of_port(port, slices))
        .collect();
    let ports = service
        .ports
        .iter()
        .zip(&endpoints)
        .map(|(port, port_endpoints)| {
            let name = ServicePortName {
                service: service.key.clone(),
                port_name: port.name.clone(),
                protocol: port.protocol,
            };
            (name, port_plan(node, service, port, port_endpoints))
        })
        .collect();
    ServicePlan {
        ports,
        health_check: health_check(node, service, &endpoints),
    }
}

/// Rules 4, 5, 8, 9, 11, 13-19, 21, 23-28, 32: the whole desired datapath,
/// planned from scratch ([`super::Planner`] keeps it up to date one change
/// at a time, and must agree with this).
pub fn desired_state(snapshot: &ClusterSnapshot) -> DesiredState {
    let slices = slices_by_service(snapshot);
    let node = NodeView::of(snapshot);
    let mut ports = BTreeMap::new();
    let mut health_checks = Vec::new();
    for (key, service) in &snapshot.services {
        let service_slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
        let plan = service_plan(&node, service, service_slices);
        ports.extend(plan.ports);
        health_checks.extend(plan.health_check);
    }
    let conflicts = resolve_frontend_conflicts(&mut ports);
    DesiredState {
        ports,
        conflicts,
        cluster_ips: snapshot.services.values().map(|s| s.cluster_ip).collect(),
        health_checks,
    }
}

/// Rule 5: a slice belongs to the Service it names, in its own namespace.
fn slices_by_service(snapshot: &ClusterSnapshot) -> BTreeMap<ObjectKey, Vec<&SliceInfo>> {
    let mut by_service: BTreeMap<ObjectKey, Vec<&SliceInfo>> = BTreeMap::new();
    for slice in snapshot.slices.values() {
        by_service
            .entry(slice.service_key())
            .or_default()
            .push(slice.as_ref());
    }
    by_service
}

/// Rule 11: the node's primary address by default; with CIDRs, every local
/// or node address one contains.
fn node_port_addresses(snapshot: &ClusterSnapshot) -> Vec<Ipv4Addr> {
    let node_addresses = snapshot
        .node
        .as_ref()
        .map(|node| node.addresses.as_slice())
        .unwrap_or_default();
    match &snapshot.nodeport_addresses {
        NodePortAddresses::Primary => node_addresses.first().copied().into_iter().collect(),
        NodePortAddresses::Cidrs(cidrs) => {
            let candidates: BTreeSet<Ipv4Addr> = snapshot
                .local_addresses
                .iter()
                .chain(node_addresses)
                .copied()
                .collect();
            candidates
                .into_iter()
                .filter(|addr| cidrs.iter().any(|cidr| serves_node_ports(cidr, *addr)))
                .collect()
        }
    }
}

const LOOPBACK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8);

/// Rule 11: loopback addresses are served only when asked for explicitly,
/// by a range inside 127.0.0.0/8, never through one like 0.0.0.0/0.
fn serves_node_ports(cidr: &Ipv4Net, addr: Ipv4Addr) -> bool {
    cidr.contains(&addr) && (!addr.is_loopback() || LOOPBACK.contains(cidr))
}

fn port_plan(
    node: &NodeView,
    service: &ServiceInfo,
    port: &ServicePortInfo,
    endpoints: &PortEndpoints,
) -> ServicePortPlan {
    let sets = EndpointSets::of(endpoints, node);
    let cluster_ip = Frontend {
        addr: service.cluster_ip,
        port: port.port,
        protocol: port.protocol,
    };
    let externally_reachable = external_frontends(node, service, port)
        .into_iter()
        .map(|(kind, frontend)| external_plan(service, kind, frontend, &sets));
    // An address listed twice in one port is served once, by its first kind.
    let mut seen = HashSet::new();
    let frontends = std::iter::once(cluster_ip_plan(service, cluster_ip, &sets))
        .chain(externally_reachable)
        .filter(|plan| seen.insert(plan.frontend))
        .collect();
    ServicePortPlan {
        frontends,
        affinity_timeout: service.affinity_timeout,
        local_backends: endpoints
            .iter()
            .filter(|(_, e)| is_local(e, &node.name))
            .map(|(backend, _)| *backend)
            .collect(),
    }
}

/// Rules 8, 16, 19: iTP steers the ClusterIP; eTP never does.
fn cluster_ip_plan(service: &ServiceInfo, frontend: Frontend, sets: &EndpointSets) -> FrontendPlan {
    FrontendPlan {
        frontend,
        kind: FrontendKind::ClusterIp,
        internal: sets.select(service.internal_traffic_local),
        external: None,
        source_ranges: Vec::new(),
    }
}

/// Rules 15-19: eTP steers flows from outside the node; clients on the node
/// reach any endpoint, whatever iTP says.
fn external_plan(
    service: &ServiceInfo,
    kind: FrontendKind,
    frontend: Frontend,
    sets: &EndpointSets,
) -> FrontendPlan {
    FrontendPlan {
        frontend,
        kind,
        internal: sets.select(false),
        external: Some(sets.select(service.external_traffic_local)),
        source_ranges: match kind {
            FrontendKind::LoadBalancer => service.source_ranges.clone(),
            FrontendKind::ClusterIp | FrontendKind::NodePort | FrontendKind::ExternalIp => {
                Vec::new()
            }
        },
    }
}

/// Rules 11-14: the frontends reachable from outside the node. Their order
/// decides which kind keeps an address listed twice: a LoadBalancer IP that
/// is also an externalIP keeps its source ranges.
fn external_frontends(
    node: &NodeView,
    service: &ServiceInfo,
    port: &ServicePortInfo,
) -> Vec<(FrontendKind, Frontend)> {
    let at = |addr: Ipv4Addr, port_number: u16| Frontend {
        addr,
        port: port_number,
        protocol: port.protocol,
    };
    let (node_port, load_balancer_ips) = match service.service_type {
        ServiceType::ClusterIp => (None, &[][..]),
        ServiceType::NodePort => (port.node_port, &[][..]),
        // A status left over from an earlier type is not served.
        ServiceType::LoadBalancer => (port.node_port, service.load_balancer_ips.as_slice()),
    };
    let node_ports = node_port.into_iter().flat_map(|node_port| {
        node.node_port_addresses
            .iter()
            .map(move |addr| (FrontendKind::NodePort, at(*addr, node_port)))
    });
    let load_balancers = load_balancer_ips
        .iter()
        .map(|addr| (FrontendKind::LoadBalancer, at(*addr, port.port)));
    let external_ips = service
        .external_ips
        .iter()
        .map(|addr| (FrontendKind::ExternalIp, at(*addr, port.port)));
    node_ports
        .chain(load_balancers)
        .chain(external_ips)
        .collect()
}

/// The two endpoint sets of a service port (rules 24, 25).
struct EndpointSets {
    cluster: Vec<BackendAddr>,
    local: Vec<BackendAddr>,
}

impl EndpointSets {
    fn of(endpoints: &PortEndpoints, node: &NodeView) -> Self {
        Self {
            cluster: cluster_set(endpoints, node.zone.as_deref()),
            local: local_set(endpoints, &node.name),
        }
    }

    /// Rule 28: the service port has endpoints when either set does.
    fn has_endpoints(&self) -> bool {
        !self.cluster.is_empty() || !self.local.is_empty()
    }

    /// The local or the cluster set; empty, it drops while the service port
    /// has endpoints elsewhere and refuses when it has none (rules 21, 28).
    fn select(&self, local: bool) -> Selection {
        let backends = if local { &self.local } else { &self.cluster };
        let when_empty = if backends.is_empty() && self.has_endpoints() {
            WhenEmpty::Drop
        } else {
            WhenEmpty::Reject
        };
        Selection {
            backends: backends.clone(),
            when_empty,
        }
    }
}

/// Rule 5: every endpoint of the service port, once per IP:port; of two
/// copies a non-terminating one wins, otherwise the first seen.
fn endpoints_of_port<'a>(port: &ServicePortInfo, slices: &[&'a SliceInfo]) -> PortEndpoints<'a> {
    let mut endpoints: PortEndpoints = BTreeMap::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let backend = BackendAddr {
                addr: endpoint.addr,
                port: slice_port.port,
                protocol: port.protocol,
            };
            endpoints
                .entry(backend)
                .and_modify(|kept| {
                    if kept.terminating && !endpoint.terminating {
                        *kept = endpoint;
                    }
                })
                .or_insert(endpoint);
        }
    }
    endpoints
}

/// Rules 24, 26, 27: ready endpoints (topology-filtered), else the serving
/// and terminating ones; never one that is neither ready nor serving.
fn cluster_set(endpoints: &PortEndpoints, zone: Option<&str>) -> Vec<BackendAddr> {
    let ready: Vec<_> = endpoints
        .iter()
        .filter(|(_, e)| e.ready)
        .map(|(backend, e)| (*backend, *e))
        .collect();
    if ready.is_empty() {
        return serving_terminating(endpoints.iter());
    }
    let zone = zone.filter(|zone| topology_applies(&ready, zone));
    ready
        .into_iter()
        .filter(|(_, e)| zone.is_none_or(|zone| has_hint(e, zone)))
        .map(|(backend, _)| backend)
        .collect()
}

/// Rules 25-27: this node's ready endpoints, else its serving and
/// terminating ones; topology never narrows them.
fn local_set(endpoints: &PortEndpoints, node_name: &str) -> Vec<BackendAddr> {
    let local: Vec<_> = endpoints
        .iter()
        .filter(|(_, e)| is_local(e, node_name))
        .collect();
    let ready: Vec<BackendAddr> = local
        .iter()
        .filter(|(_, e)| e.ready)
        .map(|(backend, _)| **backend)
        .collect();
    if ready.is_empty() {
        serving_terminating(local.into_iter())
    } else {
        ready
    }
}

fn serving_terminating<'a, 'e: 'a>(
    endpoints: impl Iterator<Item = (&'a BackendAddr, &'a &'e EndpointInfo)>,
) -> Vec<BackendAddr> {
    endpoints
        .filter(|(_, e)| e.serving && e.terminating)
        .map(|(backend, _)| *backend)
        .collect()
}

/// Rule 6; a node without a name has no local endpoints.
fn is_local(endpoint: &EndpointInfo, node_name: &str) -> bool {
    !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name)
}

/// Rule 26: hints are trusted only when every ready endpoint carries some
/// and at least one is meant for this node's zone; otherwise filtering could
/// strand traffic on a partial or foreign hint set.
fn topology_applies(ready: &[(BackendAddr, &EndpointInfo)], zone: &str) -> bool {
    ready.iter().all(|(_, e)| !e.zone_hints.is_empty())
        && ready.iter().any(|(_, e)| has_hint(e, zone))
}

fn has_hint(endpoint: &EndpointInfo, zone: &str) -> bool {
    endpoint.zone_hints.iter().any(|hint| hint == zone)
}

/// Rule 32: only a LoadBalancer with eTP=Local and a healthCheckNodePort
/// is health-checked; endpoints count once per IP over all its ports.
fn health_check(
    node: &NodeView,
    service: &ServiceInfo,
    endpoints: &[PortEndpoints],
) -> Option<HealthCheck> {
    if service.service_type != ServiceType::LoadBalancer || !service.external_traffic_local {
        return None;
    }
    let node_port = service.health_check_node_port?;
    let local: Vec<&EndpointInfo> = endpoints
        .iter()
        .flat_map(BTreeMap::values)
        .copied()
        .filter(|e| is_local(e, &node.name))
        .collect();
    let distinct = |wanted: fn(&EndpointInfo) -> bool| {
        local
            .iter()
            .filter(|e| wanted(e))
            .map(|e| e.addr)
            .collect::<BTreeSet<_>>()
            .len()
    };
    Some(HealthCheck {
        service: service.key.clone(),
        node_port,
        local_ready: distinct(|e| e.ready),
        local_serving_terminating: distinct(|e| e.serving && e.terminating),
    })
}

/// Hostile input may give two service ports one frontend; the first service
/// port by name keeps it, so the outcome does not depend on arrival order.
fn resolve_frontend_conflicts(
    ports: &mut BTreeMap<ServicePortName, ServicePortPlan>,
) -> Vec<FrontendConflict> {
    let mut owners: BTreeMap<Frontend, ServicePortName> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (name, plan) in ports.iter_mut() {
        plan.frontends
            .retain(|frontend_plan| match owners.get(&frontend_plan.frontend) {
                Some(kept) => {
                    conflicts.push(FrontendConflict {
                        frontend: frontend_plan.frontend,
                        kept: kept.clone(),
                        dropped: name.clone(),
                    });
                    false
                }
                None => {
                    owners.insert(frontend_plan.frontend, name.clone());
                    true
                }
            });
    }
    conflicts.sort_by(|a, b| (&a.dropped, a.frontend).cmp(&(&b.dropped, b.frontend)));
    conflicts
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::objects::{NodeInfo, SlicePortInfo};
    use FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};

    use Protocol::{Tcp, Udp};

    fn key(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn service(
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

    fn slice(
        namespace: &str,
        name: &str,
        service: &str,
        ports: &[(&str, Protocol, u16)],
        endpoints: Vec<EndpointInfo>,
    ) -> SliceInfo {
        SliceInfo {
            key: key(namespace, name),
            service: service.to_owned(),
            ports: ports
                .iter()
                .map(|&(name, protocol, port)| SlicePortInfo {
                    name: name.to_owned(),
                    protocol,
                    port,
                })
                .collect(),
            endpoints,
        }
    }

    fn endpoint(addr: &str, ready: bool, serving: bool, terminating: bool) -> EndpointInfo {
        EndpointInfo {
            addr: ip(addr),
            ready,
            serving,
            terminating,
            node_name: None,
            zone_hints: Vec::new(),
        }
    }

    fn ready(addr: &str) -> EndpointInfo {
        endpoint(addr, true, true, false)
    }

    fn serving_terminating(addr: &str) -> EndpointInfo {
        endpoint(addr, false, true, true)
    }

    fn hinted(endpoint: EndpointInfo, zones: &[&str]) -> EndpointInfo {
        EndpointInfo {
            zone_hints: zones.iter().map(|zone| (*zone).to_owned()).collect(),
            ..endpoint
        }
    }

    fn snapshot(
        services: Vec<ServiceInfo>,
        slices: Vec<SliceInfo>,
        zone: Option<&str>,
    ) -> ClusterSnapshot {
        ClusterSnapshot {
            node_name: "node1".into(),
            node: Some(NodeInfo {
                name: "node1".into(),
                zone: zone.map(str::to_owned),
                addresses: vec![ip("192.168.0.2"), ip("203.0.113.10")],
                deleting: false,
            }),
            services: services
                .into_iter()
                .map(|s| (s.key.clone(), Arc::new(s)))
                .collect(),
            slices: slices
                .into_iter()
                .map(|s| (s.key.clone(), Arc::new(s)))
                .collect(),
            ..ClusterSnapshot::default()
        }
    }

    fn port_name(
        namespace: &str,
        name: &str,
        port_name: &str,
        protocol: Protocol,
    ) -> ServicePortName {
        ServicePortName {
            service: key(namespace, name),
            port_name: port_name.to_owned(),
            protocol,
        }
    }

    fn frontend(addr: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            addr: ip(addr),
            port,
            protocol,
        }
    }

    fn backends(addrs: &[(&str, u16)], protocol: Protocol) -> Vec<BackendAddr> {
        addrs
            .iter()
            .map(|&(addr, port)| BackendAddr {
                addr: ip(addr),
                port,
                protocol,
            })
            .collect()
    }

    /// The selected backends of the only port of `web` (TCP, "http") for
    /// these endpoints, all in one slice mapping "http" to 8080.
    fn selected(endpoints: Vec<EndpointInfo>, zone: Option<&str>) -> Vec<BackendAddr> {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                endpoints,
            )],
            zone,
        ));
        cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)])
    }

    /// The ClusterIP frontend's internal selection (rules 8, 24).
    fn cluster_ip_backends(plan: &ServicePortPlan) -> Vec<BackendAddr> {
        plan.frontends
            .iter()
            .find(|frontend_plan| frontend_plan.kind == ClusterIp)
            .expect("a ClusterIP frontend")
            .internal
            .backends
            .clone()
    }

    fn frontends_of(plan: &ServicePortPlan) -> Vec<Frontend> {
        plan.frontends.iter().map(|f| f.frontend).collect()
    }

    fn reject(backends: Vec<BackendAddr>) -> Selection {
        Selection {
            backends,
            when_empty: WhenEmpty::Reject,
        }
    }

    fn cluster_ip_plan(frontend: Frontend, internal: Selection) -> FrontendPlan {
        FrontendPlan {
            frontend,
            kind: ClusterIp,
            internal,
            external: None,
            source_ranges: Vec::new(),
        }
    }

    fn addrs(backends: &[BackendAddr]) -> Vec<String> {
        backends.iter().map(|b| b.addr.to_string()).collect()
    }

    #[test]
    fn rule_08_cluster_ip_frontend_and_backends() {
        let mut web = service("shop", "web", "10.96.0.10", &[("http", Tcp, 80)]);
        web.affinity_timeout = Some(600);
        let state = desired_state(&snapshot(
            vec![web],
            vec![slice(
                "shop",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                vec![ready("10.244.1.6"), ready("10.244.1.5")],
            )],
            None,
        ));
        let expected = DesiredState {
            ports: BTreeMap::from([(
                port_name("shop", "web", "http", Tcp),
                ServicePortPlan {
                    frontends: vec![cluster_ip_plan(
                        frontend("10.96.0.10", 80, Tcp),
                        reject(backends(&[("10.244.1.5", 8080), ("10.244.1.6", 8080)], Tcp)),
                    )],
                    affinity_timeout: Some(600),
                    local_backends: BTreeSet::new(),
                },
            )]),
            conflicts: vec![],
            cluster_ips: BTreeSet::from([ip("10.96.0.10")]),
            health_checks: vec![],
        };
        assert_eq!(state, expected);
    }

    #[test]
    fn rule_04_tcp_and_udp_same_port_are_independent() {
        let state = desired_state(&snapshot(
            vec![service(
                "kube-system",
                "dns",
                "10.96.0.53",
                &[("dns", Tcp, 53), ("dns", Udp, 53)],
            )],
            vec![
                slice(
                    "kube-system",
                    "dns-tcp",
                    "dns",
                    &[("dns", Tcp, 5353)],
                    vec![ready("10.244.1.1")],
                ),
                slice(
                    "kube-system",
                    "dns-udp",
                    "dns",
                    &[("dns", Udp, 53)],
                    vec![ready("10.244.2.2")],
                ),
            ],
            None,
        ));
        let tcp = &state.ports[&port_name("kube-system", "dns", "dns", Tcp)];
        let udp = &state.ports[&port_name("kube-system", "dns", "dns", Udp)];
        assert_eq!(frontends_of(tcp), vec![frontend("10.96.0.53", 53, Tcp)]);
        assert_eq!(
            cluster_ip_backends(tcp),
            backends(&[("10.244.1.1", 5353)], Tcp)
        );
        assert_eq!(frontends_of(udp), vec![frontend("10.96.0.53", 53, Udp)]);
        assert_eq!(
            cluster_ip_backends(udp),
            backends(&[("10.244.2.2", 53)], Udp)
        );
        assert_eq!(state.ports.len(), 2);
        assert!(state.conflicts.is_empty());
    }

    #[test]
    fn rule_05_port_matched_by_name_and_protocol() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80), ("", Tcp, 81)],
            )],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[
                    ("http", Udp, 9999),
                    ("metrics", Tcp, 9090),
                    ("http", Tcp, 8080),
                    ("", Tcp, 8181),
                ],
                vec![ready("10.244.1.5")],
            )],
            None,
        ));
        assert_eq!(
            cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)]),
            backends(&[("10.244.1.5", 8080)], Tcp)
        );
        assert_eq!(
            cluster_ip_backends(&state.ports[&port_name("default", "web", "", Tcp)]),
            backends(&[("10.244.1.5", 8181)], Tcp)
        );
    }

    #[test]
    fn rule_05_slices_belong_to_named_service_in_same_namespace() {
        let state = desired_state(&snapshot(
            vec![service("shop", "web", "10.96.0.10", &[("http", Tcp, 80)])],
            vec![
                slice(
                    "shop",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1")],
                ),
                slice(
                    "shop",
                    "web-2",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.2")],
                ),
                slice(
                    "other",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.3")],
                ),
                slice(
                    "shop",
                    "api-1",
                    "api",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.4")],
                ),
            ],
            None,
        ));
        assert_eq!(
            addrs(&cluster_ip_backends(
                &state.ports[&port_name("shop", "web", "http", Tcp)]
            )),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_05_same_endpoint_in_two_slices_counts_once() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![
                slice(
                    "default",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1")],
                ),
                slice(
                    "default",
                    "web-2",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1"), ready("10.0.0.1")],
                ),
            ],
            None,
        ));
        assert_eq!(
            cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)]),
            backends(&[("10.0.0.1", 8080)], Tcp)
        );
    }

    #[test]
    fn rule_05_duplicate_endpoint_non_terminating_copy_wins() {
        // (copy in slice web-1, copy in slice web-2, selected addresses)
        let cases = [
            (
                serving_terminating("10.0.0.1"),
                ready("10.0.0.1"),
                vec!["10.0.0.1"],
            ),
            (
                ready("10.0.0.1"),
                serving_terminating("10.0.0.1"),
                vec!["10.0.0.1"],
            ),
            // The non-terminating copy wins even though it is not serving.
            (
                endpoint("10.0.0.1", false, false, false),
                serving_terminating("10.0.0.1"),
                vec![],
            ),
            (
                serving_terminating("10.0.0.1"),
                endpoint("10.0.0.1", false, false, false),
                vec![],
            ),
            // Neither or both terminating: the first copy is kept.
            (
                ready("10.0.0.1"),
                endpoint("10.0.0.1", false, false, false),
                vec!["10.0.0.1"],
            ),
            (
                serving_terminating("10.0.0.1"),
                endpoint("10.0.0.1", false, false, true),
                vec!["10.0.0.1"],
            ),
        ];
        for (first, second, expected) in cases {
            let description = format!("{first:?} then {second:?}");
            let state = desired_state(&snapshot(
                vec![service(
                    "default",
                    "web",
                    "10.96.0.10",
                    &[("http", Tcp, 80)],
                )],
                vec![
                    slice(
                        "default",
                        "web-1",
                        "web",
                        &[("http", Tcp, 8080)],
                        vec![first],
                    ),
                    slice(
                        "default",
                        "web-2",
                        "web",
                        &[("http", Tcp, 8080)],
                        vec![second],
                    ),
                ],
                None,
            ));
            assert_eq!(
                addrs(&cluster_ip_backends(
                    &state.ports[&port_name("default", "web", "http", Tcp)]
                )),
                expected,
                "{description}"
            );
        }
    }

    #[test]
    fn rule_05_same_ip_on_different_ports_are_different_backends() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![
                slice(
                    "default",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1")],
                ),
                slice(
                    "default",
                    "web-2",
                    "web",
                    &[("http", Tcp, 8081)],
                    vec![ready("10.0.0.1")],
                ),
            ],
            None,
        ));
        assert_eq!(
            cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)]),
            backends(&[("10.0.0.1", 8080), ("10.0.0.1", 8081)], Tcp)
        );
    }

    #[test]
    fn rule_23_affinity_timeout_is_copied_to_every_port() {
        let mut web = service(
            "default",
            "web",
            "10.96.0.10",
            &[("http", Tcp, 80), ("https", Tcp, 443)],
        );
        web.affinity_timeout = Some(10800);
        let state = desired_state(&snapshot(vec![web], vec![], None));
        let timeouts: Vec<_> = state
            .ports
            .values()
            .map(|plan| plan.affinity_timeout)
            .collect();
        assert_eq!(timeouts, vec![Some(10800), Some(10800)]);
    }

    #[test]
    fn rule_24_terminating_fallback() {
        let cases = [
            (
                "ready present: only ready",
                vec![ready("10.0.0.1"), serving_terminating("10.0.0.2")],
                vec!["10.0.0.1"],
            ),
            (
                "no ready: serving and terminating",
                vec![
                    serving_terminating("10.0.0.2"),
                    serving_terminating("10.0.0.3"),
                ],
                vec!["10.0.0.2", "10.0.0.3"],
            ),
            (
                "terminating but not serving",
                vec![
                    endpoint("10.0.0.2", false, false, true),
                    serving_terminating("10.0.0.3"),
                ],
                vec!["10.0.0.3"],
            ),
            (
                "serving but neither ready nor terminating",
                vec![endpoint("10.0.0.2", false, true, false)],
                vec![],
            ),
        ];
        for (description, endpoints, expected) in cases {
            assert_eq!(addrs(&selected(endpoints, None)), expected, "{description}");
        }
    }

    #[test]
    fn rule_24_terminating_fallback_ignores_topology() {
        let endpoints = vec![
            hinted(serving_terminating("10.0.0.1"), &["zone-a"]),
            hinted(serving_terminating("10.0.0.2"), &["zone-b"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_all_hinted_and_match_filters() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-a"]),
            hinted(ready("10.0.0.2"), &["zone-b"]),
            hinted(ready("10.0.0.3"), &["zone-b", "zone-a"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.3"]
        );
    }

    #[test]
    fn rule_26_topology_hints_one_endpoint_without_hints_uses_all() {
        let endpoints = vec![hinted(ready("10.0.0.1"), &["zone-a"]), ready("10.0.0.2")];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_no_hint_matches_node_zone_uses_all() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-b"]),
            hinted(ready("10.0.0.2"), &["zone-c"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_node_without_zone_uses_all() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-a"]),
            hinted(ready("10.0.0.2"), &["zone-b"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints.clone(), None)),
            ["10.0.0.1", "10.0.0.2"]
        );

        let mut unknown_node = snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                endpoints,
            )],
            None,
        );
        unknown_node.node = None;
        let state = desired_state(&unknown_node);
        assert_eq!(
            addrs(&cluster_ip_backends(
                &state.ports[&port_name("default", "web", "http", Tcp)]
            )),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_only_ready_endpoints_must_be_hinted() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-a"]),
            hinted(ready("10.0.0.2"), &["zone-b"]),
            serving_terminating("10.0.0.3"),
            endpoint("10.0.0.4", false, false, false),
        ];
        assert_eq!(addrs(&selected(endpoints, Some("zone-a"))), ["10.0.0.1"]);
    }

    #[test]
    fn rule_27_neither_ready_nor_serving_never_used() {
        let endpoints = vec![
            endpoint("10.0.0.1", false, false, false),
            endpoint("10.0.0.2", false, false, true),
        ];
        assert_eq!(selected(endpoints, None), vec![]);
    }

    #[test]
    fn rule_28_no_endpoints_gives_empty_set() {
        let state = desired_state(&snapshot(
            vec![
                service("default", "lonely", "10.96.0.20", &[("http", Tcp, 80)]),
                service("default", "empty", "10.96.0.21", &[("http", Tcp, 80)]),
            ],
            vec![slice(
                "default",
                "empty-1",
                "empty",
                &[("http", Tcp, 8080)],
                vec![],
            )],
            None,
        ));
        let expected = BTreeMap::from([
            (
                port_name("default", "empty", "http", Tcp),
                ServicePortPlan {
                    frontends: vec![cluster_ip_plan(
                        frontend("10.96.0.21", 80, Tcp),
                        reject(vec![]),
                    )],
                    affinity_timeout: None,
                    local_backends: BTreeSet::new(),
                },
            ),
            (
                port_name("default", "lonely", "http", Tcp),
                ServicePortPlan {
                    frontends: vec![cluster_ip_plan(
                        frontend("10.96.0.20", 80, Tcp),
                        reject(vec![]),
                    )],
                    affinity_timeout: None,
                    local_backends: BTreeSet::new(),
                },
            ),
        ]);
        assert_eq!(state.ports, expected);
    }

    #[test]
    fn frontend_conflict_first_service_port_keeps_it() {
        let state = desired_state(&snapshot(
            vec![
                service(
                    "default",
                    "b",
                    "10.96.0.10",
                    &[("http", Tcp, 80), ("dns", Udp, 53)],
                ),
                service("default", "a", "10.96.0.10", &[("web", Tcp, 80)]),
            ],
            vec![],
            None,
        ));
        assert_eq!(
            state.conflicts,
            vec![FrontendConflict {
                frontend: frontend("10.96.0.10", 80, Tcp),
                kept: port_name("default", "a", "web", Tcp),
                dropped: port_name("default", "b", "http", Tcp),
            }]
        );
        let frontends: Vec<_> = state
            .ports
            .iter()
            .map(|(name, plan)| (name.clone(), frontends_of(plan)))
            .collect();
        assert_eq!(
            frontends,
            vec![
                (
                    port_name("default", "a", "web", Tcp),
                    vec![frontend("10.96.0.10", 80, Tcp)]
                ),
                (
                    port_name("default", "b", "dns", Udp),
                    vec![frontend("10.96.0.10", 53, Udp)]
                ),
                (port_name("default", "b", "http", Tcp), vec![]),
            ]
        );
    }

    #[test]
    fn frontend_conflict_within_one_service() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("x", Tcp, 80), ("y", Tcp, 80)],
            )],
            vec![],
            None,
        ));
        assert_eq!(
            state.conflicts,
            vec![FrontendConflict {
                frontend: frontend("10.96.0.10", 80, Tcp),
                kept: port_name("default", "web", "x", Tcp),
                dropped: port_name("default", "web", "y", Tcp),
            }]
        );
        assert_eq!(
            frontends_of(&state.ports[&port_name("default", "web", "y", Tcp)]),
            vec![]
        );
    }

    fn on_node(endpoint: EndpointInfo, node: &str) -> EndpointInfo {
        EndpointInfo {
            node_name: Some(node.to_owned()),
            ..endpoint
        }
    }

    /// `default/web` of `service_type`: TCP "http" port 80, nodePort 30080.
    fn web(service_type: ServiceType) -> ServiceInfo {
        let mut web = service("default", "web", "10.96.0.10", &[("http", Tcp, 80)]);
        web.service_type = service_type;
        web.ports[0].node_port = Some(30080);
        web
    }

    /// The plan of web's only port, its endpoints in one slice ("http" to
    /// 8080), on node1 in `zone`.
    fn web_plan_in_zone(
        web: ServiceInfo,
        endpoints: Vec<EndpointInfo>,
        zone: Option<&str>,
    ) -> ServicePortPlan {
        let state = desired_state(&snapshot(
            vec![web],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                endpoints,
            )],
            zone,
        ));
        state.ports[&port_name("default", "web", "http", Tcp)].clone()
    }

    fn web_plan(web: ServiceInfo, endpoints: Vec<EndpointInfo>) -> ServicePortPlan {
        web_plan_in_zone(web, endpoints, None)
    }

    fn plan_of(plan: &ServicePortPlan, kind: FrontendKind) -> &FrontendPlan {
        plan.frontends
            .iter()
            .find(|frontend_plan| frontend_plan.kind == kind)
            .unwrap_or_else(|| panic!("no {kind:?} frontend in {plan:?}"))
    }

    fn kinds_and_frontends(plan: &ServicePortPlan) -> Vec<(FrontendKind, Frontend)> {
        plan.frontends
            .iter()
            .map(|frontend_plan| (frontend_plan.kind, frontend_plan.frontend))
            .collect()
    }

    /// A selection of web's backends (port 8080).
    fn chosen(addrs: &[&str], when_empty: WhenEmpty) -> Selection {
        Selection {
            backends: addrs
                .iter()
                .map(|addr| BackendAddr {
                    addr: ip(addr),
                    port: 8080,
                    protocol: Tcp,
                })
                .collect(),
            when_empty,
        }
    }

    fn net(cidr: &str) -> Ipv4Net {
        cidr.parse().unwrap()
    }

    #[test]
    fn rule_25_26_local_set_ready_else_serving_terminating_without_topology() {
        // (description, endpoints, node zone, expected local set)
        let cases = [
            (
                "local ready only",
                vec![
                    on_node(ready("10.0.0.1"), "node1"),
                    on_node(ready("10.0.0.2"), "node2"),
                    ready("10.0.0.3"),
                ],
                None,
                chosen(&["10.0.0.1"], WhenEmpty::Reject),
            ),
            (
                "no local ready: local serving and terminating",
                vec![
                    on_node(serving_terminating("10.0.0.1"), "node1"),
                    on_node(endpoint("10.0.0.4", false, false, true), "node1"),
                    on_node(ready("10.0.0.2"), "node2"),
                ],
                None,
                chosen(&["10.0.0.1"], WhenEmpty::Reject),
            ),
            (
                "local ready wins over local terminating",
                vec![
                    on_node(ready("10.0.0.1"), "node1"),
                    on_node(serving_terminating("10.0.0.2"), "node1"),
                ],
                None,
                chosen(&["10.0.0.1"], WhenEmpty::Reject),
            ),
            (
                "hints for another zone do not filter the local set",
                vec![
                    on_node(hinted(ready("10.0.0.1"), &["zone-b"]), "node1"),
                    on_node(hinted(ready("10.0.0.3"), &["zone-a"]), "node1"),
                    on_node(hinted(ready("10.0.0.2"), &["zone-a"]), "node2"),
                ],
                Some("zone-a"),
                chosen(&["10.0.0.1", "10.0.0.3"], WhenEmpty::Reject),
            ),
            (
                "local neither ready nor serving: none, dropped",
                vec![
                    on_node(endpoint("10.0.0.1", false, false, false), "node1"),
                    on_node(ready("10.0.0.2"), "node2"),
                ],
                None,
                chosen(&[], WhenEmpty::Drop),
            ),
        ];
        for (description, endpoints, zone, expected) in cases {
            let mut local = web(ServiceType::ClusterIp);
            local.internal_traffic_local = true;
            let plan = web_plan_in_zone(local, endpoints, zone);
            assert_eq!(
                plan_of(&plan, ClusterIp).internal,
                expected,
                "{description}"
            );
        }
    }

    #[test]
    fn rule_06_local_backends_are_the_endpoints_on_this_node() {
        let plan = web_plan(
            web(ServiceType::NodePort),
            vec![
                on_node(ready("10.0.0.1"), "node1"),
                on_node(serving_terminating("10.0.0.2"), "node1"),
                on_node(endpoint("10.0.0.3", false, false, false), "node1"),
                on_node(ready("10.0.0.4"), "node2"),
                ready("10.0.0.5"),
            ],
        );
        let local: Vec<BackendAddr> = plan.local_backends.into_iter().collect();
        assert_eq!(
            local,
            backends(
                &[("10.0.0.1", 8080), ("10.0.0.2", 8080), ("10.0.0.3", 8080)],
                Tcp
            ),
            "whatever their conditions; never another node's or an unplaced one"
        );
    }

    #[test]
    fn rule_06_node_without_a_name_has_no_local_backends() {
        let mut snapshot = snapshot(
            vec![web(ServiceType::NodePort)],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                vec![
                    on_node(ready("10.0.0.1"), ""),
                    on_node(ready("10.0.0.2"), "node1"),
                ],
            )],
            None,
        );
        snapshot.node_name = String::new();
        let state = desired_state(&snapshot);
        assert!(
            state.ports[&port_name("default", "web", "http", Tcp)]
                .local_backends
                .is_empty()
        );
    }

    #[test]
    fn rule_06_local_backends_carry_each_port_s_backend_port() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80), ("metrics", Tcp, 9090)],
            )],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080), ("metrics", Tcp, 9091)],
                vec![on_node(ready("10.0.0.1"), "node1")],
            )],
            None,
        ));
        for (port, backend_port) in [("http", 8080), ("metrics", 9091)] {
            assert_eq!(
                state.ports[&port_name("default", "web", port, Tcp)].local_backends,
                backends(&[("10.0.0.1", backend_port)], Tcp)
                    .into_iter()
                    .collect::<BTreeSet<_>>(),
                "{port}"
            );
        }
    }

    #[test]
    fn rule_19_internal_traffic_local_steers_the_cluster_ip_only() {
        let mut service = web(ServiceType::NodePort);
        service.internal_traffic_local = true;
        let plan = web_plan(
            service,
            vec![
                on_node(ready("10.0.0.1"), "node1"),
                on_node(ready("10.0.0.2"), "node2"),
            ],
        );
        let cluster_ip = plan_of(&plan, ClusterIp);
        assert_eq!(
            cluster_ip.internal,
            chosen(&["10.0.0.1"], WhenEmpty::Reject)
        );
        assert_eq!(cluster_ip.external, None);
        let node_port = plan_of(&plan, NodePort);
        let everyone = chosen(&["10.0.0.1", "10.0.0.2"], WhenEmpty::Reject);
        assert_eq!(node_port.internal, everyone);
        assert_eq!(node_port.external, Some(everyone));
    }

    #[test]
    fn rule_19_28_internal_traffic_local_without_local_endpoint() {
        // (description, endpoints, ClusterIP selection)
        let cases = [
            (
                "endpoints elsewhere: dropped",
                vec![on_node(ready("10.0.0.2"), "node2"), ready("10.0.0.3")],
                chosen(&[], WhenEmpty::Drop),
            ),
            (
                "only terminating elsewhere still counts as endpoints",
                vec![on_node(serving_terminating("10.0.0.2"), "node2")],
                chosen(&[], WhenEmpty::Drop),
            ),
            (
                "no usable endpoint anywhere: rejected (rule 21)",
                vec![on_node(endpoint("10.0.0.2", false, false, false), "node2")],
                chosen(&[], WhenEmpty::Reject),
            ),
        ];
        for (description, endpoints, expected) in cases {
            let mut service = web(ServiceType::ClusterIp);
            service.internal_traffic_local = true;
            let plan = web_plan(service, endpoints);
            assert_eq!(
                plan_of(&plan, ClusterIp).internal,
                expected,
                "{description}"
            );
        }
    }

    #[test]
    fn rule_16_18_external_traffic_local_steers_external_flows_only() {
        let mut service = web(ServiceType::LoadBalancer);
        service.external_traffic_local = true;
        service.load_balancer_ips = vec![ip("198.51.100.7")];
        service.external_ips = vec![ip("198.51.100.8")];
        // (description, endpoints, internal everywhere, external)
        let cases = [
            (
                "a local endpoint",
                vec![
                    on_node(ready("10.0.0.1"), "node1"),
                    on_node(ready("10.0.0.2"), "node2"),
                ],
                chosen(&["10.0.0.1", "10.0.0.2"], WhenEmpty::Reject),
                chosen(&["10.0.0.1"], WhenEmpty::Reject),
            ),
            (
                "none local: external flows dropped, pods still served",
                vec![on_node(ready("10.0.0.2"), "node2")],
                chosen(&["10.0.0.2"], WhenEmpty::Reject),
                chosen(&[], WhenEmpty::Drop),
            ),
        ];
        for (description, endpoints, internal, external) in cases {
            let plan = web_plan(service.clone(), endpoints);
            assert_eq!(
                plan_of(&plan, ClusterIp).internal,
                internal,
                "{description}: eTP does not touch the ClusterIP"
            );
            for kind in [NodePort, LoadBalancer, ExternalIp] {
                let frontend_plan = plan_of(&plan, kind);
                assert_eq!(frontend_plan.internal, internal, "{description}: {kind:?}");
                assert_eq!(
                    frontend_plan.external.as_ref(),
                    Some(&external),
                    "{description}: {kind:?}"
                );
            }
        }
    }

    #[test]
    fn rule_17_external_traffic_cluster_sends_external_flows_anywhere() {
        let mut service = web(ServiceType::NodePort);
        service.external_ips = vec![ip("198.51.100.8")];
        let plan = web_plan(service, vec![on_node(ready("10.0.0.2"), "node2")]);
        let everyone = chosen(&["10.0.0.2"], WhenEmpty::Reject);
        for kind in [NodePort, ExternalIp] {
            assert_eq!(
                plan_of(&plan, kind).external.as_ref(),
                Some(&everyone),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn rule_21_no_endpoints_every_frontend_rejects() {
        let mut service = web(ServiceType::LoadBalancer);
        service.external_traffic_local = true;
        service.internal_traffic_local = true;
        service.load_balancer_ips = vec![ip("198.51.100.7")];
        service.external_ips = vec![ip("198.51.100.8")];
        let unusable = vec![
            on_node(endpoint("10.0.0.1", false, false, false), "node1"),
            on_node(endpoint("10.0.0.2", false, false, true), "node2"),
        ];
        let plan = web_plan(service, unusable);
        assert_eq!(plan.frontends.len(), 4);
        let refused = chosen(&[], WhenEmpty::Reject);
        for frontend_plan in &plan.frontends {
            assert_eq!(frontend_plan.internal, refused, "{:?}", frontend_plan.kind);
            if frontend_plan.kind != ClusterIp {
                assert_eq!(frontend_plan.external.as_ref(), Some(&refused));
            }
        }
    }

    #[test]
    fn rule_11_node_port_addresses() {
        let loopback_and_more = vec![ip("127.0.0.1"), ip("127.0.0.53"), ip("10.0.0.5")];
        // (description, --nodeport-addresses, local addresses, node known, served)
        let cases = [
            (
                "default: the node's primary address",
                NodePortAddresses::Primary,
                loopback_and_more.clone(),
                true,
                vec!["192.168.0.2"],
            ),
            (
                "default without the node object: none",
                NodePortAddresses::Primary,
                loopback_and_more.clone(),
                false,
                vec![],
            ),
            (
                "0.0.0.0/0: every address but loopback",
                NodePortAddresses::Cidrs(vec![net("0.0.0.0/0")]),
                loopback_and_more.clone(),
                true,
                vec!["10.0.0.5", "192.168.0.2", "203.0.113.10"],
            ),
            (
                "a range keeps the addresses it contains",
                NodePortAddresses::Cidrs(vec![net("192.168.0.0/24")]),
                loopback_and_more.clone(),
                true,
                vec!["192.168.0.2"],
            ),
            (
                "loopback when a range inside 127.0.0.0/8 asks for it",
                NodePortAddresses::Cidrs(vec![net("127.0.0.1/32"), net("10.0.0.0/8")]),
                loopback_and_more.clone(),
                true,
                vec!["10.0.0.5", "127.0.0.1"],
            ),
            (
                "127.0.0.0/8 itself",
                NodePortAddresses::Cidrs(vec![net("127.0.0.0/8")]),
                loopback_and_more.clone(),
                true,
                vec!["127.0.0.1", "127.0.0.53"],
            ),
            (
                "a range wider than 127.0.0.0/8 does not enable loopback",
                NodePortAddresses::Cidrs(vec![net("126.0.0.0/7")]),
                loopback_and_more.clone(),
                true,
                vec![],
            ),
            (
                "local addresses alone, node unknown",
                NodePortAddresses::Cidrs(vec![net("10.0.0.0/8")]),
                loopback_and_more.clone(),
                false,
                vec!["10.0.0.5"],
            ),
            (
                "a node address listed locally too counts once",
                NodePortAddresses::Cidrs(vec![net("192.168.0.0/16")]),
                vec![ip("192.168.0.2")],
                true,
                vec!["192.168.0.2"],
            ),
        ];
        for (description, nodeport_addresses, local_addresses, node_known, expected) in cases {
            let mut snapshot = snapshot(vec![web(ServiceType::NodePort)], vec![], None);
            snapshot.nodeport_addresses = nodeport_addresses;
            snapshot.local_addresses = local_addresses;
            if !node_known {
                snapshot.node = None;
            }
            let state = desired_state(&snapshot);
            let served: Vec<String> = state.ports[&port_name("default", "web", "http", Tcp)]
                .frontends
                .iter()
                .filter(|frontend_plan| frontend_plan.kind == NodePort)
                .map(|frontend_plan| {
                    assert_eq!(frontend_plan.frontend.port, 30080, "{description}");
                    frontend_plan.frontend.addr.to_string()
                })
                .collect();
            assert_eq!(served, expected, "{description}");
        }
    }

    #[test]
    fn rule_12_node_port_served_by_node_port_and_load_balancer_types() {
        // (type, nodePort, NodePort frontends expected)
        let cases = [
            (ServiceType::ClusterIp, Some(30080), false),
            (ServiceType::NodePort, Some(30080), true),
            (ServiceType::LoadBalancer, Some(30080), true),
            (ServiceType::LoadBalancer, None, false),
        ];
        for (service_type, node_port, served) in cases {
            let mut service = web(service_type);
            service.ports[0].node_port = node_port;
            let plan = web_plan(service, vec![]);
            let expected: Vec<_> = std::iter::once((ClusterIp, frontend("10.96.0.10", 80, Tcp)))
                .chain(served.then(|| (NodePort, frontend("192.168.0.2", 30080, Tcp))))
                .collect();
            assert_eq!(
                kinds_and_frontends(&plan),
                expected,
                "{service_type:?} {node_port:?}"
            );
        }
    }

    #[test]
    fn rule_13_load_balancer_ips_served_for_type_load_balancer() {
        // (type, LoadBalancer frontends expected)
        let cases = [
            (ServiceType::LoadBalancer, true),
            // A status left over from an earlier type.
            (ServiceType::NodePort, false),
            (ServiceType::ClusterIp, false),
        ];
        for (service_type, served) in cases {
            let mut service = web(service_type);
            service.ports[0].node_port = None;
            service.load_balancer_ips = vec![ip("198.51.100.7"), ip("198.51.100.9")];
            let plan = web_plan(service, vec![]);
            let load_balancers: Vec<Frontend> = plan
                .frontends
                .iter()
                .filter(|frontend_plan| frontend_plan.kind == LoadBalancer)
                .map(|frontend_plan| frontend_plan.frontend)
                .collect();
            let expected = if served {
                vec![
                    frontend("198.51.100.7", 80, Tcp),
                    frontend("198.51.100.9", 80, Tcp),
                ]
            } else {
                vec![]
            };
            assert_eq!(load_balancers, expected, "{service_type:?}");
        }
    }

    #[test]
    fn rule_14_external_ips_served_on_every_type() {
        for service_type in [
            ServiceType::ClusterIp,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
        ] {
            let mut service = web(service_type);
            service.external_ips = vec![ip("198.51.100.8")];
            let plan = web_plan(service, vec![ready("10.0.0.1")]);
            let external_ip = plan_of(&plan, ExternalIp);
            assert_eq!(
                external_ip.frontend,
                frontend("198.51.100.8", 80, Tcp),
                "{service_type:?}"
            );
            let everyone = chosen(&["10.0.0.1"], WhenEmpty::Reject);
            assert_eq!(external_ip.internal, everyone);
            assert_eq!(external_ip.external, Some(everyone));
        }
    }

    #[test]
    fn rule_15_source_ranges_apply_to_load_balancer_frontends_only() {
        let mut service = web(ServiceType::LoadBalancer);
        service.load_balancer_ips = vec![ip("198.51.100.7")];
        service.external_ips = vec![ip("198.51.100.8")];
        service.source_ranges = vec![net("203.0.113.0/24")];
        let plan = web_plan(service, vec![]);
        for frontend_plan in &plan.frontends {
            let expected = match frontend_plan.kind {
                LoadBalancer => vec![net("203.0.113.0/24")],
                _ => vec![],
            };
            assert_eq!(
                frontend_plan.source_ranges, expected,
                "{:?}",
                frontend_plan.kind
            );
        }
        assert_eq!(plan.frontends.len(), 4);
    }

    #[test]
    fn rule_13_14_address_listed_twice_in_one_port_keeps_the_load_balancer() {
        let mut service = web(ServiceType::LoadBalancer);
        service.load_balancer_ips = vec![ip("198.51.100.7")];
        service.external_ips = vec![ip("198.51.100.7"), ip("198.51.100.7")];
        service.source_ranges = vec![net("203.0.113.0/24")];
        let state = desired_state(&snapshot(vec![service], vec![], None));
        let plan = &state.ports[&port_name("default", "web", "http", Tcp)];
        assert_eq!(
            kinds_and_frontends(plan),
            vec![
                (ClusterIp, frontend("10.96.0.10", 80, Tcp)),
                (NodePort, frontend("192.168.0.2", 30080, Tcp)),
                (LoadBalancer, frontend("198.51.100.7", 80, Tcp)),
            ]
        );
        assert_eq!(
            plan_of(plan, LoadBalancer).source_ranges,
            vec![net("203.0.113.0/24")]
        );
        assert!(state.conflicts.is_empty(), "not a conflict between ports");
    }

    #[test]
    fn rule_09_cluster_ips_of_every_proxied_service() {
        let state = desired_state(&snapshot(
            vec![
                service("default", "web", "10.96.0.10", &[("http", Tcp, 80)]),
                service("default", "portless", "10.96.0.11", &[]),
            ],
            vec![],
            None,
        ));
        assert_eq!(
            state.cluster_ips,
            BTreeSet::from([ip("10.96.0.10"), ip("10.96.0.11")])
        );
    }

    #[test]
    fn rule_32_health_check_counts_distinct_local_ips() {
        let mut service = web(ServiceType::LoadBalancer);
        service.ports.push(ServicePortInfo {
            name: "metrics".into(),
            protocol: Tcp,
            port: 9090,
            node_port: None,
        });
        service.external_traffic_local = true;
        service.health_check_node_port = Some(30500);
        let state = desired_state(&snapshot(
            vec![service],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080), ("metrics", Tcp, 9090)],
                vec![
                    on_node(ready("10.0.0.1"), "node1"),
                    on_node(ready("10.0.0.2"), "node1"),
                    on_node(serving_terminating("10.0.0.3"), "node1"),
                    on_node(endpoint("10.0.0.4", false, false, true), "node1"),
                    on_node(ready("10.0.0.9"), "node2"),
                ],
            )],
            None,
        ));
        assert_eq!(
            state.health_checks,
            vec![HealthCheck {
                service: key("default", "web"),
                node_port: 30500,
                local_ready: 2,
                local_serving_terminating: 1,
            }]
        );
    }

    #[test]
    fn rule_32_health_check_only_for_load_balancer_with_local_policy() {
        // (type, eTP=Local, healthCheckNodePort)
        let cases = [
            (ServiceType::NodePort, true, Some(30500)),
            (ServiceType::LoadBalancer, false, Some(30500)),
            (ServiceType::LoadBalancer, true, None),
        ];
        for (service_type, local, health_check_node_port) in cases {
            let mut service = web(service_type);
            service.external_traffic_local = local;
            service.health_check_node_port = health_check_node_port;
            let state = desired_state(&snapshot(vec![service], vec![], None));
            assert_eq!(
                state.health_checks,
                vec![],
                "{service_type:?} {local} {health_check_node_port:?}"
            );
        }
    }

    #[test]
    fn frontend_conflict_across_kinds() {
        // a's externalIP is node1's address at b's nodePort.
        let mut a = service("default", "a", "10.96.0.20", &[("http", Tcp, 30080)]);
        a.external_ips = vec![ip("192.168.0.2")];
        let mut b = web(ServiceType::NodePort);
        b.key = key("default", "b");
        let state = desired_state(&snapshot(vec![b, a], vec![], None));
        assert_eq!(
            state.conflicts,
            vec![FrontendConflict {
                frontend: frontend("192.168.0.2", 30080, Tcp),
                kept: port_name("default", "a", "http", Tcp),
                dropped: port_name("default", "b", "http", Tcp),
            }]
        );
        assert_eq!(
            kinds_and_frontends(&state.ports[&port_name("default", "b", "http", Tcp)]),
            vec![(ClusterIp, frontend("10.96.0.10", 80, Tcp))]
        );
    }

    #[test]
    fn empty_snapshot_gives_empty_state() {
        assert_eq!(
            desired_state(&ClusterSnapshot::default()),
            DesiredState::default()
        );
    }
}
