//! Sources of cluster state: a manifests directory or the Kubernetes API.
//! Each publishes [`ClusterSnapshot`]s on a watch channel (the agent only
//! ever needs the latest) and reports whether it can reach its origin; the
//! model does not know which one is on.

pub mod kube;
pub mod manifests;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

/// Whether a source currently reaches its origin, and how many invalid
/// objects it rejected: shared between the source (writer) and the health
/// and metrics endpoints (readers).
#[derive(Clone, Debug, Default)]
pub struct SourceStatus {
    failing: Arc<Mutex<Option<Failure>>>,
    invalid: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

/// Since when, and why, a source cannot read its origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub since: Instant,
    pub reason: String,
}

impl SourceStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Failure>> {
        self.failing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn ok(&self) {
        if let Some(failure) = self.lock().take() {
            tracing::info!(
                down_for = ?failure.since.elapsed(),
                "source reachable again"
            );
        }
    }

    /// Logs the first failure of a streak; later ones only update the reason.
    pub fn failing(&self, reason: String) {
        let mut failing = self.lock();
        match failing.as_mut() {
            Some(failure) => failure.reason = reason,
            None => {
                tracing::warn!(%reason, "source failing; the datapath keeps its last state");
                *failing = Some(Failure {
                    since: Instant::now(),
                    reason,
                });
            }
        }
    }

    pub fn failure(&self) -> Option<Failure> {
        self.lock().clone()
    }

    /// One more invalid object (version) of `kind` was rejected.
    pub fn count_invalid(&self, kind: &'static str) {
        *self
            .invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    /// Rejected invalid objects so far, by kind.
    pub fn invalid_counts(&self) -> BTreeMap<&'static str, u64> {
        self.invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
