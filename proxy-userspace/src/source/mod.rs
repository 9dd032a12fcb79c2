//! Sources of cluster state. Each produces [`crate::model::ClusterSnapshot`]s;
//! the model does not know which one is on.

pub mod manifests;
