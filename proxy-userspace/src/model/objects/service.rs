//! Services: which are proxied (rules 1, 2) and their validated view.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Service, ServiceSpec, ServiceStatus};

use super::{
    Admission, IgnoreReason, InvalidObject, PortFields, ServiceInfo, ServicePortInfo, ServiceType,
    check_unique_names, ignored_by_label, invalid_value, ipv4_entries, object_key, parse_ip,
    port_number, protocol, unicast,
};

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
    Ok(Admission::Proxied(
        ServiceInfo {
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
            health_check_node_port: health_check_node_port(
                spec,
                service_type,
                external_traffic_local,
            )?,
        }
        .shrunk(),
    ))
}

/// Rule 23: the API server's default and maximum.
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10800;

const MAX_AFFINITY_TIMEOUT: i32 = 86400;

const SERVICE_PORT_FIELDS: PortFields = PortFields {
    name: "spec.ports[].name",
    port: "spec.ports[].port",
    protocol: "spec.ports[].protocol",
};

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
