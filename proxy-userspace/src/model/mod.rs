//! The model: pure functions from cluster objects to the datapath the node
//! should have. No I/O, no clock, no maps: every rule that decides *what*
//! is programmed lives here and is unit-tested without root. "Rule N"
//! throughout the code is rule N of `docs/semantics.md`.
//!
//! - [`objects`]: validated, proxy-relevant views of API objects, and the
//!   rules that decide which objects are proxied at all (rules 1, 2, 5-7,
//!   12-15, 35).
//! - [`desired`]: service ports -> frontends of every kind and the backends
//!   each may select (rules 4, 8, 9, 11, 13-19, 21, 23-28, 32).
//! - [`planner`]: the same desired state kept up to date one snapshot at a
//!   time, planning only what a change touches.
//! - [`maglev`]: the Maglev lookup table of a backend set, the same on
//!   every node.

pub mod desired;
#[cfg(test)]
pub mod fixtures;
pub mod maglev;
pub mod objects;
pub mod planner;

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use ipnet::Ipv4Net;

pub use desired::{
    BackendAddr, DesiredState, Frontend, FrontendKind, FrontendPlan, HealthCheck, Selection,
    ServicePortName, ServicePortPlan, WhenEmpty, desired_state,
};
pub use objects::{NodeInfo, ObjectKey, Protocol, ServiceInfo, ServiceType, SliceInfo};
pub use planner::{Changes, PlanChange, Planner};

/// Everything a source knows, already validated: the input of
/// [`desired_state`]. Sources (manifests, Kubernetes watches) build it; the
/// model does not know which one did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSnapshot {
    /// This node's name (`--hostname-override`): decides which endpoints are
    /// local.
    pub node_name: String,
    /// This node's object, when the source has seen it (zone label,
    /// addresses).
    pub node: Option<NodeInfo>,
    /// Shared with the source's store and earlier snapshots: a snapshot
    /// costs a map of pointers, and an unchanged object is the same
    /// allocation in consecutive snapshots.
    pub services: BTreeMap<ObjectKey, Arc<ServiceInfo>>,
    pub slices: BTreeMap<ObjectKey, Arc<SliceInfo>>,
    /// The host's IPv4 interface addresses: NodePort candidates (rule 11).
    pub local_addresses: Vec<Ipv4Addr>,
    /// `--nodeport-addresses` (rule 11).
    pub nodeport_addresses: NodePortAddresses,
}

/// Which node addresses serve NodePorts (rule 11).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's primary address (the nftables-mode default).
    #[default]
    Primary,
    /// Every node address one of these contains; loopback addresses only
    /// through a range that lies inside 127.0.0.0/8.
    Cidrs(Vec<Ipv4Net>),
}
