//! The model: pure functions from cluster objects to the datapath the node
//! should have. No I/O, no clock, no maps: every rule of
//! SERVICE-SEMANTICS.md that decides *what* is programmed lives here and is
//! unit-tested without root.
//!
//! - [`objects`]: validated, proxy-relevant views of API objects, and the
//!   rules that decide which objects are proxied at all (rules 1, 2, 5-7).
//! - [`desired`]: service ports -> frontends and selected backends
//!   (rules 4, 8, 23-28).

pub mod desired;
pub mod objects;

use std::collections::BTreeMap;

pub use desired::{
    BackendAddr, DesiredState, Frontend, ServicePortName, ServicePortPlan, desired_state,
};
pub use objects::{NodeInfo, ObjectKey, Protocol, ServiceInfo, SliceInfo};

/// Everything a source knows, already validated: the input of
/// [`desired_state`]. Sources (manifests, Kubernetes watches) build it; the
/// model does not know which one did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSnapshot {
    /// This node's name (`--hostname-override`): decides which endpoints are
    /// local.
    pub node_name: String,
    /// This node's object, when the source has seen it (zone label).
    pub node: Option<NodeInfo>,
    pub services: BTreeMap<ObjectKey, ServiceInfo>,
    pub slices: BTreeMap<ObjectKey, SliceInfo>,
}
