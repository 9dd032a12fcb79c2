//! EndpointSlices (rules 1, 5, 6) and the slices v1/Endpoints mirror to
//! (rule 7).

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{EndpointAddress, EndpointSubset, Endpoints},
    discovery::v1::{Endpoint, EndpointSlice},
};

use super::{
    Admission, EndpointInfo, IgnoreReason, InvalidObject, ObjectKey, PortFields, SliceInfo,
    SlicePortInfo, check_unique_names, ignored_by_label, invalid_value, label, object_key,
    parse_ip, parse_ipv4, port_number, protocol, unicast,
};

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
    let mut nodes = NodeNames::default();
    let endpoints = slice
        .endpoints
        .iter()
        .map(|endpoint| slice_endpoint(endpoint, &mut nodes))
        .collect::<Result<_, _>>()?;
    Ok(Admission::Proxied(
        SliceInfo {
            service: ObjectKey::new(key.namespace(), service),
            key,
            ports,
            endpoints,
        }
        .shrunk(),
    ))
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

const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

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

/// Rules 5 and 6.
fn slice_endpoint(
    endpoint: &Endpoint,
    nodes: &mut NodeNames,
) -> Result<EndpointInfo, InvalidObject> {
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
        node_name: endpoint.node_name.as_deref().map(|name| nodes.shared(name)),
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
        key: ObjectKey::new(key.namespace(), format!("{}-mirrored-{index}", key.name())),
        service: key.clone(),
        ports: slice_ports(ports, SUBSET_PORT_FIELDS)?,
        endpoints,
    }
    .shrunk())
}

/// Mirrored endpoints are serving exactly when ready and never terminating.
fn mirrored_endpoints(
    addresses: Option<&[EndpointAddress]>,
    ready: bool,
    field: &'static str,
) -> Result<Vec<EndpointInfo>, InvalidObject> {
    let mut endpoints = Vec::new();
    let mut nodes = NodeNames::default();
    for address in addresses.unwrap_or_default() {
        // IPv6 addresses belong to the other family's datapath (rule 35).
        if let IpAddr::V4(ip) = parse_ip(field, &address.ip)? {
            endpoints.push(EndpointInfo {
                addr: unicast(field, ip)?,
                ready,
                serving: ready,
                terminating: false,
                node_name: address.node_name.as_deref().map(|name| nodes.shared(name)),
                zone_hints: Vec::new(),
            });
        }
    }
    Ok(endpoints)
}

/// The node names of one slice's endpoints, each stored once: a slice's
/// endpoints sit on a few nodes.
#[derive(Default)]
struct NodeNames(Vec<Arc<str>>);

impl NodeNames {
    fn shared(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.iter().find(|known| ***known == *name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.0.push(name.clone());
        name
    }
}
