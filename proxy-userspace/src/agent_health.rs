//! `/healthz` and `/livez` (rule 33): healthy once the first sync is
//! programmed and while no change has waited longer than the health timeout
//! to be applied.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use crate::{http::Response, source::SourceStatus};

/// What the sync loop and the source tell the health endpoints.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Mutex<State>>,
    source: SourceStatus,
    timeout: Duration,
}

#[derive(Default)]
struct State {
    /// When the datapath last became equal to the desired state.
    last_updated: Option<SystemTime>,
    /// Since when a change waits to be applied.
    pending_since: Option<Instant>,
    /// This node's object is being deleted.
    node_deleting: bool,
}

/// Which endpoint asks: they differ only on node deletion (rule 33).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Healthz,
    Livez,
}

/// A health answer, as served.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    pub healthy: bool,
    pub body: String,
}

impl Health {
    pub fn new(timeout: Duration, source: SourceStatus) -> Self {
        Self {
            inner: Arc::default(),
            source,
            timeout,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A change arrived that the datapath does not have yet.
    pub fn change_pending(&self) {
        self.state().pending_since.get_or_insert_with(Instant::now);
    }

    pub fn node_deleting(&self, deleting: bool) {
        self.state().node_deleting = deleting;
    }

    /// The datapath now equals the desired state.
    pub fn synced(&self) {
        let mut state = self.state();
        state.last_updated = Some(SystemTime::now());
        state.pending_since = None;
    }

    /// Healthy once programmed, while no change waits longer than the
    /// timeout and the source has not failed for longer than the timeout
    /// (the datapath still serves its last state then, but may be stale);
    /// `/healthz` (not `/livez`) also fails while the node is being deleted.
    pub fn status(&self, probe: Probe) -> Status {
        let state = self.state();
        let stale = state
            .pending_since
            .is_some_and(|since| since.elapsed() > self.timeout);
        let failure = self.source.failure();
        let source_down = failure
            .as_ref()
            .is_some_and(|failure| failure.since.elapsed() > self.timeout);
        let deleting = probe == Probe::Healthz && state.node_deleting;
        let healthy = state.last_updated.is_some() && !stale && !source_down && !deleting;
        let mut body = serde_json::json!({
            "lastUpdated": state.last_updated.map(rfc3339),
            "currentTime": rfc3339(SystemTime::now()),
            "healthy": healthy,
        });
        if deleting {
            body["nodeEligible"] = serde_json::json!(false);
        }
        if let Some(failure) = failure {
            body["sourceError"] = serde_json::json!({
                "reason": failure.reason,
                "failingForSeconds": failure.since.elapsed().as_secs(),
            });
        }
        Status {
            healthy,
            body: body.to_string(),
        }
    }

    /// `/healthz` and `/livez`.
    pub fn respond(&self, path: &str) -> Response {
        let probe = match path {
            "/healthz" => Probe::Healthz,
            "/livez" => Probe::Livez,
            _ => return Response::not_found(),
        };
        let status = self.status(probe);
        Response::json(if status.healthy { 200 } else { 503 }, status.body)
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn rule_33_unhealthy_until_first_sync() {
        let health = Health::new(Duration::from_secs(60), SourceStatus::default());
        assert!(!health.status(Probe::Healthz).healthy);
        health.change_pending();
        assert!(!health.status(Probe::Healthz).healthy);
        health.synced();
        let status = health.status(Probe::Healthz);
        assert!(status.healthy);
        let body: serde_json::Value = serde_json::from_str(&status.body).unwrap();
        assert_eq!(body["healthy"], true);
        assert!(body["lastUpdated"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn rule_33_change_waiting_longer_than_timeout_is_unhealthy() {
        let health = Health::new(Duration::ZERO, SourceStatus::default());
        health.synced();
        health.change_pending();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!health.status(Probe::Healthz).healthy);
        health.synced();
        assert!(health.status(Probe::Healthz).healthy);
    }

    #[test]
    fn rule_33_source_failing_longer_than_timeout_is_unhealthy_and_says_why() {
        let source = SourceStatus::default();
        let health = Health::new(Duration::ZERO, source.clone());
        health.synced();
        source.failing("services", "watch failed: connection refused".into());
        std::thread::sleep(Duration::from_millis(5));
        let status = health.status(Probe::Healthz);
        assert!(!status.healthy);
        let body: serde_json::Value = serde_json::from_str(&status.body).unwrap();
        assert_eq!(
            body["sourceError"]["reason"],
            "services: watch failed: connection refused"
        );
        source.ok("services");
        assert!(health.status(Probe::Healthz).healthy);
    }

    #[test]
    fn rule_33_node_deletion_fails_healthz_not_livez() {
        let health = Health::new(Duration::from_secs(60), SourceStatus::default());
        health.synced();
        health.node_deleting(true);
        assert!(!health.status(Probe::Healthz).healthy);
        assert!(health.status(Probe::Livez).healthy);
        assert_eq!(health.respond("/healthz").status, 503);
        assert_eq!(health.respond("/livez").status, 200);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let time = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339(time), "2023-11-14T22:13:20.000000005Z");
    }
}
