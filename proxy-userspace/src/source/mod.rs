//! Sources of cluster state: a manifests directory or the Kubernetes API.
//! Each publishes [`SourceUpdate`]s, in order, and reports whether it can
//! reach its origin; the model does not know which one is on.

pub mod kube;
pub mod manifests;

use tokio::sync::mpsc;

use crate::model::{Changes, ClusterSnapshot};

/// What a source publishes.
#[derive(Debug)]
pub enum SourceUpdate {
    /// Everything it knows: its first complete view, a relist, a rescan.
    Snapshot(ClusterSnapshot),
    /// What changed since its last update.
    Changes(Changes),
}

/// Where a source publishes. Unbounded: updates are small, and a burst the
/// agent has not taken yet is applied in one go.
pub type UpdateSender = mpsc::UnboundedSender<SourceUpdate>;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

/// Whether each part of a source (the manifests directory; each watch)
/// currently reaches its origin, and how many invalid objects it rejected:
/// shared between the source (writer) and the health and metrics endpoints
/// (readers). One failing part is enough for the source to be failing.
#[derive(Clone, Debug, Default)]
pub struct SourceStatus {
    failing: Arc<Mutex<BTreeMap<&'static str, Failure>>>,
    invalid: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

/// Since when, and why, a source cannot read its origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub since: Instant,
    pub reason: String,
}

impl SourceStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Failure>> {
        self.failing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `part` just read its origin successfully.
    pub fn ok(&self, part: &'static str) {
        if let Some(failure) = self.lock().remove(part) {
            tracing::info!(part, down_for = ?failure.since.elapsed(), "source reachable again");
        }
    }

    /// `part` failed. Logs the first failure of a streak; later ones only
    /// update the reason.
    pub fn failing(&self, part: &'static str, reason: String) {
        let mut failing = self.lock();
        match failing.get_mut(part) {
            Some(failure) => failure.reason = reason,
            None => {
                tracing::warn!(part, %reason, "source failing; the datapath keeps its last state");
                let since = Instant::now();
                failing.insert(part, Failure { since, reason });
            }
        }
    }

    /// The parts failing now.
    pub fn failing_parts(&self) -> Vec<&'static str> {
        self.lock().keys().copied().collect()
    }

    /// The longest-running failure of any part, naming the part.
    pub fn failure(&self) -> Option<Failure> {
        self.lock()
            .iter()
            .min_by_key(|(_, failure)| failure.since)
            .map(|(part, failure)| Failure {
                since: failure.since,
                reason: format!("{part}: {}", failure.reason),
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failing_part_is_not_cleared_by_another_parts_success() {
        let status = SourceStatus::default();
        status.failing("endpointslices", "500 Internal Server Error".into());
        status.ok("services");
        let failure = status.failure().expect("still failing");
        assert_eq!(failure.reason, "endpointslices: 500 Internal Server Error");
        status.ok("endpointslices");
        assert_eq!(status.failure(), None);
    }
}
