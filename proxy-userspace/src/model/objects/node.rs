//! This node's own Node object: its zone and addresses (rule 11).

use std::{collections::HashSet, net::Ipv4Addr};

use k8s_openapi::api::core::v1::{Node, NodeStatus};

use super::{InvalidObject, NodeInfo, ipv4_entries, label};

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

const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

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
