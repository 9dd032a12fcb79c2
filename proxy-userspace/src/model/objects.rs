//! Validated views of the API objects the proxy reads. Conversion is where
//! hostile or broken input stops: an object either becomes one of these
//! types, is ignored for a documented reason ([`Admission::Ignored`]), or is
//! rejected with a typed reason ([`InvalidObject`]) that the source logs
//! with the object's origin. One file per kind ([`service`],
//! [`endpoint_slice`] with the v1/Endpoints mirror, [`node`]); the checks
//! they share are here.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

mod endpoint_slice;
mod node;
mod service;

pub use endpoint_slice::{endpoint_slice, endpoints};
pub use node::node;
pub use service::service;

/// Namespace and name of an object, shared: one key sits in the source's
/// store, the snapshot and every index the planner and reconciler keep, so
/// a clone is a reference count, and a map entry holds one pointer.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey(Arc<KeyText>);

#[derive(PartialEq, Eq, Hash)]
struct KeyText {
    /// The namespace, then the name.
    text: Box<str>,
    /// Where the name starts in `text`.
    name_at: u32,
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        let (namespace, name) = (namespace.as_ref(), name.as_ref());
        let mut text = String::with_capacity(namespace.len() + name.len());
        text.push_str(namespace);
        text.push_str(name);
        Self(Arc::new(KeyText {
            text: text.into_boxed_str(),
            // Both come from an object that fit in memory; a namespace of
            // 4 GiB would already have been refused by the API server.
            name_at: u32::try_from(namespace.len()).unwrap_or(u32::MAX),
        }))
    }

    pub fn namespace(&self) -> &str {
        &self.0.text[..self.0.name_at as usize]
    }

    pub fn name(&self) -> &str {
        &self.0.text[self.0.name_at as usize..]
    }
}

impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.namespace(), self.name()).cmp(&(other.namespace(), other.name()))
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectKey")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .finish()
    }
}

impl Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut key = serializer.serialize_struct("ObjectKey", 2)?;
        key.serialize_field("namespace", self.namespace())?;
        key.serialize_field("name", self.name())?;
        key.end()
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())
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

impl ServiceInfo {
    /// Without the spare room collecting left in its vectors: a validated
    /// object is kept as long as it exists.
    fn shrunk(mut self) -> Self {
        self.ports.shrink_to_fit();
        self.external_ips.shrink_to_fit();
        self.load_balancer_ips.shrink_to_fit();
        self.source_ranges.shrink_to_fit();
        self
    }
}

/// A proxied EndpointSlice (addressType IPv4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub key: ObjectKey,
    /// The Service named by the `kubernetes.io/service-name` label, in the
    /// slice's own namespace (rule 5).
    pub service: ObjectKey,
    pub ports: Vec<SlicePortInfo>,
    pub endpoints: Vec<EndpointInfo>,
}

impl SliceInfo {
    /// As [`ServiceInfo::shrunk`].
    fn shrunk(mut self) -> Self {
        self.ports.shrink_to_fit();
        self.endpoints.shrink_to_fit();
        for endpoint in &mut self.endpoints {
            endpoint.zone_hints.shrink_to_fit();
        }
        self
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
    /// Shared by the slice's endpoints on one node.
    pub node_name: Option<Arc<str>>,
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

const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Where each part of a port list lives in its object, for error messages.
#[derive(Clone, Copy)]
struct PortFields {
    name: &'static str,
    port: &'static str,
    protocol: &'static str,
}

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
    Ok(ObjectKey::new(namespace, name))
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
