//! Validated views of the API objects the proxy reads. Conversion is where
//! hostile or broken input stops: an object either becomes one of these
//! types, is ignored for a documented reason ([`Admission::Ignored`]), or is
//! rejected with a typed reason ([`InvalidObject`]) that the source logs
//! with the object's origin.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointSubset, Endpoints, Node, NodeStatus, Service, ServiceSpec,
            ServiceStatus,
        },
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Transport protocols the datapath translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// `spec.type` of a proxied Service (ExternalName is never proxied).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ServiceType {
    #[default]
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// A proxied Service (IPv4 family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub key: ObjectKey,
    pub service_type: ServiceType,
    /// The IPv4 entry of `spec.clusterIPs` (or `spec.clusterIP`).
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePortInfo>,
    /// `Some(seconds)` when `sessionAffinity: ClientIP` (default 10800).
    pub affinity_timeout: Option<u32>,
    /// Rule 14: the IPv4 entries of `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// Rule 13: IPv4 `status.loadBalancer.ingress[].ip` with `ipMode` VIP
    /// (or unset).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// Rule 15: the IPv4 entries of `spec.loadBalancerSourceRanges`,
    /// host bits cleared.
    pub source_ranges: Vec<Ipv4Net>,
    /// `externalTrafficPolicy: Local` (rules 16-18).
    pub external_traffic_local: bool,
    /// `internalTrafficPolicy: Local` (rule 19).
    pub internal_traffic_local: bool,
    /// Rule 32: `spec.healthCheckNodePort`, read only for type LoadBalancer
    /// with `externalTrafficPolicy: Local`, the only Services that have one.
    pub health_check_node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// `spec.ports[].name`, "" when unnamed.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Rule 12: `spec.ports[].nodePort` as given; served only by types
    /// NodePort and LoadBalancer.
    pub node_port: Option<u16>,
}

/// A proxied EndpointSlice (addressType IPv4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub key: ObjectKey,
    /// The Service named by the `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<SlicePortInfo>,
    pub endpoints: Vec<EndpointInfo>,
}

impl SliceInfo {
    /// Rule 5: a slice belongs to the Service it names, in its own
    /// namespace.
    pub fn service_key(&self) -> ObjectKey {
        ObjectKey {
            namespace: self.key.namespace.clone(),
            name: self.service.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortInfo {
    /// `ports[].name`, "" when unnamed.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint, conditions already defaulted (rule 6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `addresses[0]`.
    pub addr: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `hints.forZones[].name`; empty when the endpoint has no zone hints.
    pub zone_hints: Vec<String>,
}

/// What the proxy needs of its own Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// IPv4 `status.addresses` of type InternalIP, then ExternalIP, without
    /// duplicates; the first is the node's primary address (rule 11).
    pub addresses: Vec<Ipv4Addr>,
    /// `metadata.deletionTimestamp` is set: /healthz fails so load
    /// balancers stop sending to this node (rule 33); /livez does not.
    pub deleting: bool,
}

/// A valid object is either proxied or ignored by rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission<T> {
    Proxied(T),
    Ignored(IgnoreReason),
}

/// Why a valid object programs nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreReason {
    #[error("label service.kubernetes.io/service-proxy-name is set (rule 1)")]
    ServiceProxyName,
    #[error("label service.kubernetes.io/headless is set (rule 1)")]
    HeadlessLabel,
    #[error("clusterIP is empty or None (rule 2)")]
    Headless,
    #[error("type ExternalName is DNS only (rule 2)")]
    ExternalName,
    #[error("no IPv4 address family (rule 35)")]
    OtherAddressFamily,
}

/// Why an object is rejected. The source logs it with the object's origin
/// and keeps the last good version of the object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidObject {
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("{field}: invalid IP address {value:?}")]
    InvalidIp { field: &'static str, value: String },
    #[error("{field}: port {value} out of range 1-65535")]
    PortOutOfRange { field: &'static str, value: i32 },
    #[error("{field}: unsupported protocol {value:?}")]
    UnsupportedProtocol { field: &'static str, value: String },
    #[error("{field}: invalid value {value:?}")]
    InvalidValue { field: &'static str, value: String },
}

/// Rules 1, 2, 35: which Services are proxied, and their validated view.
pub fn service(svc: &Service) -> Result<Admission<ServiceInfo>, InvalidObject> {
    let key = object_key(&svc.metadata)?;
    if let Some(reason) = ignored_by_label(&svc.metadata) {
        return Ok(Admission::Ignored(reason));
    }
    let spec = svc
        .spec
        .as_ref()
        .ok_or(InvalidObject::MissingField("spec"))?;
    let Some(service_type) = service_type(spec)? else {
        return Ok(Admission::Ignored(IgnoreReason::ExternalName));
    };
    let cluster_ip = match cluster_ipv4(spec)? {
        Ok(ip) => ip,
        Err(reason) => return Ok(Admission::Ignored(reason)),
    };
    let external_traffic_local = traffic_policy_local(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    Ok(Admission::Proxied(ServiceInfo {
        key,
        service_type,
        cluster_ip,
        ports: service_ports(spec)?,
        affinity_timeout: affinity_timeout(spec)?,
        external_ips: external_ips(spec)?,
        load_balancer_ips: load_balancer_ips(svc.status.as_ref())?,
        source_ranges: source_ranges(spec)?,
        external_traffic_local,
        internal_traffic_local: traffic_policy_local(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )?,
        health_check_node_port: health_check_node_port(spec, service_type, external_traffic_local)?,
    }))
}

/// Rules 1, 5, 6, 35: which EndpointSlices are used, and their validated view.
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Admission<SliceInfo>, InvalidObject> {
    let key = object_key(&slice.metadata)?;
    if let Some(reason) = ignored_by_label(&slice.metadata) {
        return Ok(Admission::Ignored(reason));
    }
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return Ok(Admission::Ignored(IgnoreReason::OtherAddressFamily)),
        "" => return Err(InvalidObject::MissingField("addressType")),
        other => return Err(invalid_value("addressType", other)),
    }
    let service = label(&slice.metadata, LABEL_SERVICE_NAME)
        .filter(|name| !name.is_empty())
        .ok_or(InvalidObject::MissingField(
            "metadata.labels[kubernetes.io/service-name]",
        ))?;
    // The API server never stores more; a slice beyond its limits is hostile.
    check_limit("endpoints", slice.endpoints.len(), MAX_SLICE_ENDPOINTS)?;
    check_limit(
        "ports",
        slice.ports.as_ref().map_or(0, Vec::len),
        MAX_SLICE_PORTS,
    )?;
    let ports = slice_ports(
        slice
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port, p.protocol.as_deref())),
        SLICE_PORT_FIELDS,
    )?;
    let endpoints = slice
        .endpoints
        .iter()
        .map(slice_endpoint)
        .collect::<Result<_, _>>()?;
    Ok(Admission::Proxied(SliceInfo {
        key,
        service: service.to_owned(),
        ports,
        endpoints,
    }))
}

/// Rule 7: `v1/Endpoints` become the slices the cluster would mirror.
pub fn endpoints(endpoints: &Endpoints) -> Result<Admission<Vec<SliceInfo>>, InvalidObject> {
    let key = object_key(&endpoints.metadata)?;
    if let Some(reason) = ignored_by_label(&endpoints.metadata) {
        return Ok(Admission::Ignored(reason));
    }
    let slices = endpoints
        .subsets
        .iter()
        .flatten()
        .enumerate()
        .map(|(index, subset)| mirrored_slice(&key, index, subset))
        .collect::<Result<_, _>>()?;
    Ok(Admission::Proxied(slices))
}

pub fn node(node: &Node) -> Result<NodeInfo, InvalidObject> {
    let name = node
        .metadata
        .name
        .clone()
        .filter(|name| !name.is_empty())
        .ok_or(InvalidObject::MissingField("metadata.name"))?;
    // kube-proxy treats an empty zone label as no zone (no topology).
    let zone = label(&node.metadata, LABEL_ZONE)
        .filter(|zone| !zone.is_empty())
        .map(str::to_owned);
    Ok(NodeInfo {
        name,
        zone,
        addresses: node_addresses(node.status.as_ref())?,
        deleting: node.metadata.deletion_timestamp.is_some(),
    })
}

/// The API server's validation limits of an EndpointSlice.
const MAX_SLICE_ENDPOINTS: usize = 1000;
const MAX_SLICE_PORTS: usize = 100;

fn check_limit(field: &'static str, len: usize, max: usize) -> Result<(), InvalidObject> {
    if len > max {
        return Err(InvalidObject::InvalidValue {
            field,
            value: format!("{len} entries, more than the API server allows ({max})"),
        });
    }
    Ok(())
}

const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Rule 23: the API server's default and maximum.
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10800;
const MAX_AFFINITY_TIMEOUT: i32 = 86400;

/// Where each part of a port list lives in its object, for error messages.
#[derive(Clone, Copy)]
struct PortFields {
    name: &'static str,
    port: &'static str,
    protocol: &'static str,
}

const SERVICE_PORT_FIELDS: PortFields = PortFields {
    name: "spec.ports[].name",
    port: "spec.ports[].port",
    protocol: "spec.ports[].protocol",
};

const SLICE_PORT_FIELDS: PortFields = PortFields {
    name: "ports[].name",
    port: "ports[].port",
    protocol: "ports[].protocol",
};

const SUBSET_PORT_FIELDS: PortFields = PortFields {
    name: "subsets[].ports[].name",
    port: "subsets[].ports[].port",
    protocol: "subsets[].ports[].protocol",
};

/// Manifests often omit the namespace; the API server would default it.
fn object_key(meta: &ObjectMeta) -> Result<ObjectKey, InvalidObject> {
    let name = meta
        .name
        .as_deref()
        .filter(|name| !name.is_empty())
        .ok_or(InvalidObject::MissingField("metadata.name"))?;
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or("default");
    Ok(ObjectKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// Rule 1: the label selector kube-proxy watches with, on both kinds.
fn ignored_by_label(meta: &ObjectMeta) -> Option<IgnoreReason> {
    if label(meta, LABEL_SERVICE_PROXY_NAME).is_some() {
        Some(IgnoreReason::ServiceProxyName)
    } else if label(meta, LABEL_HEADLESS).is_some() {
        Some(IgnoreReason::HeadlessLabel)
    } else {
        None
    }
}

/// Rule 2: `None` for ExternalName, which is DNS only. Unknown types are
/// rejected rather than served as ClusterIP, so a typo does not silently
/// lose its NodePort.
fn service_type(spec: &ServiceSpec) -> Result<Option<ServiceType>, InvalidObject> {
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => Ok(Some(ServiceType::ClusterIp)),
        Some("NodePort") => Ok(Some(ServiceType::NodePort)),
        Some("LoadBalancer") => Ok(Some(ServiceType::LoadBalancer)),
        Some("ExternalName") => Ok(None),
        Some(other) => Err(invalid_value("spec.type", other)),
    }
}

/// Rules 16-19: `Local` or `Cluster` (the default).
fn traffic_policy_local(field: &'static str, value: Option<&str>) -> Result<bool, InvalidObject> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(invalid_value(field, other)),
    }
}

/// Rules 14 and 35: IPv6 entries belong to the other family's datapath.
fn external_ips(spec: &ServiceSpec) -> Result<Vec<Ipv4Addr>, InvalidObject> {
    ipv4_entries("spec.externalIPs", spec.external_ips.iter().flatten())
}

/// Rule 13: ingress points in `Proxy` mode receive traffic with the
/// balancer's own destination, and hostname-only ones have no address to
/// capture: both are left alone.
fn load_balancer_ips(status: Option<&ServiceStatus>) -> Result<Vec<Ipv4Addr>, InvalidObject> {
    const FIELD: &str = "status.loadBalancer.ingress[].ip";
    let ingress = status
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref())
        .into_iter()
        .flatten();
    let mut vips = Vec::new();
    for point in ingress {
        match point.ip_mode.as_deref() {
            None | Some("VIP") => vips.extend(point.ip.as_ref()),
            Some("Proxy") => {}
            Some(other) => {
                return Err(invalid_value("status.loadBalancer.ingress[].ipMode", other));
            }
        }
    }
    ipv4_entries(FIELD, vips)
}

/// Rules 15 and 35. Host bits are cleared so equal ranges compare equal.
fn source_ranges(spec: &ServiceSpec) -> Result<Vec<Ipv4Net>, InvalidObject> {
    const FIELD: &str = "spec.loadBalancerSourceRanges";
    let mut ranges = Vec::new();
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        match range.trim().parse::<IpNet>() {
            Ok(IpNet::V4(range)) => ranges.push(range.trunc()),
            Ok(IpNet::V6(_)) => {}
            Err(_) => return Err(invalid_value(FIELD, range)),
        }
    }
    Ok(ranges)
}

/// Rule 32: only a LoadBalancer with `externalTrafficPolicy: Local` is
/// health-checked; any other Service's value is not ours to serve.
fn health_check_node_port(
    spec: &ServiceSpec,
    service_type: ServiceType,
    external_traffic_local: bool,
) -> Result<Option<u16>, InvalidObject> {
    if service_type != ServiceType::LoadBalancer || !external_traffic_local {
        return Ok(None);
    }
    spec.health_check_node_port
        .map(|port| port_number(port, "spec.healthCheckNodePort"))
        .transpose()
}

/// Rule 11: InternalIP before ExternalIP, so the primary address is the
/// node's first internal one; IPv6 belongs to the other family.
fn node_addresses(status: Option<&NodeStatus>) -> Result<Vec<Ipv4Addr>, InvalidObject> {
    let addresses = status
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    let of_type = |wanted: &'static str| {
        addresses
            .iter()
            .filter(move |address| address.type_ == wanted)
            .map(|address| &address.address)
    };
    let mut ipv4 = ipv4_entries(
        "status.addresses[].address",
        of_type("InternalIP").chain(of_type("ExternalIP")),
    )?;
    let mut seen = HashSet::new();
    ipv4.retain(|ip| seen.insert(*ip));
    Ok(ipv4)
}

/// The IPv4 entries of an address list, in order; IPv6 entries are skipped
/// (rule 35), anything unparsable rejects the object.
fn ipv4_entries<'a>(
    field: &'static str,
    values: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<Ipv4Addr>, InvalidObject> {
    let mut ipv4 = Vec::new();
    for value in values {
        if let IpAddr::V4(ip) = parse_ip(field, value)? {
            ipv4.push(unicast(field, ip)?);
        }
    }
    Ok(ipv4)
}

/// Rules 2 and 35: the IPv4 cluster IP, or why there is none to serve.
fn cluster_ipv4(spec: &ServiceSpec) -> Result<Result<Ipv4Addr, IgnoreReason>, InvalidObject> {
    let (field, candidates): (_, &[String]) = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ("spec.clusterIPs", ips),
        _ => ("spec.clusterIP", spec.cluster_ip.as_slice()),
    };
    match candidates.first().map(String::as_str) {
        None | Some("" | "None") => return Ok(Err(IgnoreReason::Headless)),
        Some(_) => {}
    }
    let mut ipv4 = None;
    for candidate in candidates {
        match parse_ip(field, candidate)? {
            IpAddr::V4(ip) => ipv4 = ipv4.or(Some(unicast(field, ip)?)),
            IpAddr::V6(_) => {}
        }
    }
    Ok(ipv4.ok_or(IgnoreReason::OtherAddressFamily))
}

fn parse_ip(field: &'static str, value: &str) -> Result<IpAddr, InvalidObject> {
    value.parse().map_err(|_| InvalidObject::InvalidIp {
        field,
        value: value.to_owned(),
    })
}

fn parse_ipv4(field: &'static str, value: &str) -> Result<Ipv4Addr, InvalidObject> {
    match parse_ip(field, value)? {
        IpAddr::V4(ip) => unicast(field, ip),
        IpAddr::V6(_) => Err(InvalidObject::InvalidIp {
            field,
            value: value.to_owned(),
        }),
    }
}

/// Addresses no flow can be translated to or from are hostile input.
fn unicast(field: &'static str, ip: Ipv4Addr) -> Result<Ipv4Addr, InvalidObject> {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        Err(InvalidObject::InvalidIp {
            field,
            value: ip.to_string(),
        })
    } else {
        Ok(ip)
    }
}

fn service_ports(spec: &ServiceSpec) -> Result<Vec<ServicePortInfo>, InvalidObject> {
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            Ok(ServicePortInfo {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(p.protocol.as_deref(), SERVICE_PORT_FIELDS.protocol)?,
                port: port_number(p.port, SERVICE_PORT_FIELDS.port)?,
                node_port: p
                    .node_port
                    .map(|node_port| port_number(node_port, "spec.ports[].nodePort"))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_unique_names(
        ports.iter().map(|p| (p.name.as_str(), p.protocol)),
        SERVICE_PORT_FIELDS.name,
    )?;
    Ok(ports)
}

/// Rule 23.
fn affinity_timeout(spec: &ServiceSpec) -> Result<Option<u32>, InvalidObject> {
    const FIELD: &str = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            if (1..=MAX_AFFINITY_TIMEOUT).contains(&timeout) {
                Ok(Some(timeout.unsigned_abs()))
            } else {
                Err(invalid_value(FIELD, &timeout.to_string()))
            }
        }
        Some(other) => Err(invalid_value("spec.sessionAffinity", other)),
    }
}

/// Rule 5: a port without a number is skipped, not an error.
fn slice_ports<'a>(
    ports: impl IntoIterator<Item = (Option<&'a str>, Option<i32>, Option<&'a str>)>,
    fields: PortFields,
) -> Result<Vec<SlicePortInfo>, InvalidObject> {
    let mut valid = Vec::new();
    for (name, port, protocol_name) in ports {
        let Some(port) = port else { continue };
        valid.push(SlicePortInfo {
            name: name.unwrap_or_default().to_owned(),
            protocol: protocol(protocol_name, fields.protocol)?,
            port: port_number(port, fields.port)?,
        });
    }
    check_unique_names(
        valid.iter().map(|p| (p.name.as_str(), p.protocol)),
        fields.name,
    )?;
    Ok(valid)
}

/// Two ports with one (name, protocol) would make the service port (rule 4)
/// ambiguous.
fn check_unique_names<'a>(
    ports: impl IntoIterator<Item = (&'a str, Protocol)>,
    field: &'static str,
) -> Result<(), InvalidObject> {
    let mut seen = HashSet::new();
    for (name, protocol) in ports {
        if !seen.insert((name, protocol)) {
            return Err(invalid_value(
                field,
                &format!("{name}/{}", protocol.as_str()),
            ));
        }
    }
    Ok(())
}

/// SCTP and unknown protocols reject the whole object: a clear error beats a
/// silently half-programmed service.
fn protocol(value: Option<&str>, field: &'static str) -> Result<Protocol, InvalidObject> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some(other) => Err(InvalidObject::UnsupportedProtocol {
            field,
            value: other.to_owned(),
        }),
    }
}

fn port_number(value: i32, field: &'static str) -> Result<u16, InvalidObject> {
    u16::try_from(value)
        .ok()
        .filter(|&port| port != 0)
        .ok_or(InvalidObject::PortOutOfRange { field, value })
}

fn invalid_value(field: &'static str, value: &str) -> InvalidObject {
    InvalidObject::InvalidValue {
        field,
        value: value.to_owned(),
    }
}

/// Rules 5 and 6.
fn slice_endpoint(endpoint: &Endpoint) -> Result<EndpointInfo, InvalidObject> {
    const FIELD: &str = "endpoints[].addresses";
    let address = endpoint
        .addresses
        .first()
        .ok_or(InvalidObject::MissingField(FIELD))?;
    let conditions = endpoint.conditions.as_ref();
    let zone_hints = endpoint
        .hints
        .as_ref()
        .and_then(|hints| hints.for_zones.as_ref())
        .map(|zones| zones.iter().map(|zone| zone.name.clone()).collect())
        .unwrap_or_default();
    Ok(EndpointInfo {
        addr: parse_ipv4(FIELD, address)?,
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        node_name: endpoint.node_name.clone(),
        zone_hints,
    })
}

/// Rule 7: one subset, as the EndpointSlice mirroring controller writes it.
fn mirrored_slice(
    key: &ObjectKey,
    index: usize,
    subset: &EndpointSubset,
) -> Result<SliceInfo, InvalidObject> {
    // `port` is required in v1/Endpoints, so an absent one reads as 0.
    let ports = subset.ports.iter().flatten().map(|p| {
        (
            p.name.as_deref(),
            Some(p.port).filter(|&port| port != 0),
            p.protocol.as_deref(),
        )
    });
    let mut endpoints = mirrored_endpoints(
        subset.addresses.as_deref(),
        true,
        "subsets[].addresses[].ip",
    )?;
    endpoints.extend(mirrored_endpoints(
        subset.not_ready_addresses.as_deref(),
        false,
        "subsets[].notReadyAddresses[].ip",
    )?);
    Ok(SliceInfo {
        key: ObjectKey {
            namespace: key.namespace.clone(),
            name: format!("{}-mirrored-{index}", key.name),
        },
        service: key.name.clone(),
        ports: slice_ports(ports, SUBSET_PORT_FIELDS)?,
        endpoints,
    })
}

/// Mirrored endpoints are serving exactly when ready and never terminating.
fn mirrored_endpoints(
    addresses: Option<&[EndpointAddress]>,
    ready: bool,
    field: &'static str,
) -> Result<Vec<EndpointInfo>, InvalidObject> {
    let mut endpoints = Vec::new();
    for address in addresses.unwrap_or_default() {
        // IPv6 addresses belong to the other family's datapath (rule 35).
        if let IpAddr::V4(ip) = parse_ip(field, &address.ip)? {
            endpoints.push(EndpointInfo {
                addr: unicast(field, ip)?,
                ready,
                serving: ready,
                terminating: false,
                node_name: address.node_name.clone(),
                zone_hints: Vec::new(),
            });
        }
    }
    Ok(endpoints)
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[cfg(test)]
mod tests;
