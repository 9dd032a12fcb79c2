//! healthCheckNodePort servers (rule 32): for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its healthCheckNodePort
//! tells the cloud balancer whether this node has a ready local endpoint.
//! A node whose local endpoints are only serving+terminating answers 503 so
//! the balancer drains it, while the datapath keeps sending them traffic.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;

use crate::{
    agent_health::{Health, Probe},
    http::{self, Response},
    model::desired::HealthCheck,
};

/// The servers, one per node port, following the desired state.
pub struct HealthCheckServers {
    bind_addr: Ipv4Addr,
    health: Health,
    /// What each port answers, shared with its server task.
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthCheckServers {
    pub fn new(bind_addr: Ipv4Addr, health: Health) -> Self {
        Self {
            bind_addr,
            health,
            checks: Arc::default(),
            servers: BTreeMap::new(),
        }
    }

    /// Starts servers for new ports, stops those no longer wanted, and
    /// updates what every port answers. A port that cannot be bound is
    /// logged and tried again on the next change.
    pub async fn update(&mut self, wanted: &[HealthCheck]) {
        let wanted: BTreeMap<u16, HealthCheck> = wanted
            .iter()
            .map(|check| (check.node_port, check.clone()))
            .collect();
        *self.checks.lock().unwrap_or_else(|p| p.into_inner()) = wanted.clone();
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port) && !server.is_finished();
            if !keep {
                server.abort();
            }
            keep
        });
        for (&port, check) in &wanted {
            if self.servers.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::from((self.bind_addr, port));
            match http::bind(addr, "healthCheckNodePort").await {
                Ok(listener) => {
                    let checks = self.checks.clone();
                    let health = self.health.clone();
                    let handler = Arc::new(move |_path: &str| {
                        let checks = checks.lock().unwrap_or_else(|p| p.into_inner());
                        match checks.get(&port) {
                            Some(check) => respond(check, health.status(Probe::Healthz).healthy),
                            None => Response::not_found(),
                        }
                    });
                    let server = tokio::spawn(async move {
                        let Err(err) = http::serve(listener, handler).await;
                        tracing::error!(%addr, error = %err, "healthCheckNodePort server stopped");
                    });
                    self.servers.insert(port, server);
                }
                Err(err) => tracing::error!(
                    service = %check.service,
                    port,
                    error = format!("{err:#}"),
                    "cannot serve healthCheckNodePort; retrying on the next change"
                ),
            }
        }
    }
}

/// Any path answers (rule 32): 200 with at least one ready local endpoint.
fn respond(check: &HealthCheck, proxy_healthy: bool) -> Response {
    let body = serde_json::json!({
        "service": {
            "namespace": check.service.namespace(),
            "name": check.service.name(),
        },
        "localEndpoints": check.local_ready,
        "serviceProxyHealthy": proxy_healthy,
    });
    let mut response = Response::json(
        if check.local_ready > 0 { 200 } else { 503 },
        body.to_string(),
    );
    response.headers.push((
        "X-Load-Balancing-Endpoint-Weight",
        check.local_ready.to_string(),
    ));
    response
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;

    fn check(local_ready: usize, local_serving_terminating: usize) -> HealthCheck {
        HealthCheck {
            service: ObjectKey::new("demo", "web"),
            node_port: 32000,
            local_ready,
            local_serving_terminating,
        }
    }

    #[test]
    fn rule_32_ready_local_endpoint_answers_200_with_weight() {
        let response = respond(&check(2, 0), true);
        assert_eq!(response.status, 200);
        assert_eq!(
            response.headers,
            vec![("X-Load-Balancing-Endpoint-Weight", "2".to_string())]
        );
        let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "service": {"namespace": "demo", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
    }

    #[test]
    fn rule_32_only_serving_terminating_local_endpoints_answer_503() {
        let response = respond(&check(0, 1), true);
        assert_eq!(response.status, 503);
        let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(body["localEndpoints"], 0);
    }
}
