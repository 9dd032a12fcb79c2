//! Service ports -> frontends of every kind, and for each the backends new
//! flows may be sent to: from clients on this node (socket level) and from
//! outside it (packet level).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use serde::Serialize;

use super::{
    ClusterSnapshot, NodePortAddresses, ObjectKey, Protocol,
    objects::{EndpointInfo, ServiceInfo, ServicePortInfo, ServiceType, SliceInfo},
};

/// The unit of proxying (rule 4). Shared like [`ObjectKey`]: the desired
/// state, the frontend claims and the reconciler's ids all hold it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName(Arc<ServicePortNameFields>);

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortNameFields {
    pub service: ObjectKey,
    pub port_name: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn new(service: ObjectKey, port_name: impl Into<String>, protocol: Protocol) -> Self {
        Self(Arc::new(ServicePortNameFields {
            service,
            port_name: port_name.into(),
            protocol,
        }))
    }
}

impl std::ops::Deref for ServicePortName {
    type Target = ServicePortNameFields;

    fn deref(&self) -> &ServicePortNameFields {
        &self.0
    }
}

impl std::fmt::Debug for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for ServicePortName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
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
    /// Sorted, without duplicates.
    pub local_backends: Vec<BackendAddr>,
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
            let name = ServicePortName::new(service.key.clone(), port.name.clone(), port.protocol);
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
            .entry(slice.service.clone())
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
    let mut frontends: Vec<FrontendPlan> =
        std::iter::once(cluster_ip_plan(service, cluster_ip, &sets))
            .chain(externally_reachable)
            .filter(|plan| seen.insert(plan.frontend))
            .collect();
    // Plans live as long as their Service: no room for frontends that
    // will not come (a filtered collect reserves four).
    frontends.shrink_to_fit();
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
mod tests;
