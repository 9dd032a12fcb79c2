//! The agent and operator CLI of the eBPF service proxy, as a library so
//! the integration tests drive the same code.
//!
//! Data flows one way, and the modules read in that order:
//! [`source`] (manifests) -> [`model`] (pure semantics) -> [`reconciler`]
//! (diff and ordered writes) -> [`maps`] (pinned BPF maps) -> [`programs`]
//! (load, attach, pin). [`agent`] wires them; [`inspect`] reads the pinned
//! maps back for operators; [`agent_health`] and [`metrics`] serve the
//! agent's `/healthz` and `/metrics`, [`service_health`] the per-Service
//! healthCheckNodePort servers, all over the small [`http`] responder.

pub mod agent;
pub mod agent_health;
pub mod collections;
pub mod conntrack;
pub mod explain;
pub mod host;
pub mod http;
pub mod inspect;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod programs;
pub mod reconciler;
pub mod service_health;
pub mod sockets;
pub mod source;
