//! Service ports -> frontends and the backends new flows may be sent to.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;

use super::{
    ClusterSnapshot, ObjectKey, Protocol,
    objects::{EndpointInfo, ServiceInfo, ServicePortInfo, SliceInfo},
};

/// The unit of proxying (rule 4).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub service: ObjectKey,
    pub port_name: String,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{:?}", self.service, self.port_name, self.protocol)
    }
}

/// An address:port:protocol clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// An endpoint address:port:protocol new flows are sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// What one service port programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePortPlan {
    pub frontends: Vec<Frontend>,
    /// The selected set, sorted; empty means "refuse" (rules 21, 28).
    pub backends: Vec<BackendAddr>,
    /// ClientIP affinity timeout in seconds (rule 23).
    pub affinity_timeout: Option<u32>,
}

/// Two service ports claimed one frontend; the first by name keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendConflict {
    pub frontend: Frontend,
    pub kept: ServicePortName,
    pub dropped: ServicePortName,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub ports: BTreeMap<ServicePortName, ServicePortPlan>,
    pub conflicts: Vec<FrontendConflict>,
}

/// Rules 4, 5, 8, 23, 24, 26-28: the whole desired datapath.
pub fn desired_state(snapshot: &ClusterSnapshot) -> DesiredState {
    let slices = slices_by_service(snapshot);
    let zone = snapshot.node.as_ref().and_then(|node| node.zone.as_deref());
    let mut ports = BTreeMap::new();
    for (key, service) in &snapshot.services {
        let service_slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
        for port in &service.ports {
            let name = ServicePortName {
                service: key.clone(),
                port_name: port.name.clone(),
                protocol: port.protocol,
            };
            ports.insert(name, port_plan(service, port, service_slices, zone));
        }
    }
    let conflicts = resolve_frontend_conflicts(&mut ports);
    DesiredState { ports, conflicts }
}

/// Rule 5: a slice belongs to the Service it names, in its own namespace.
fn slices_by_service(snapshot: &ClusterSnapshot) -> BTreeMap<ObjectKey, Vec<&SliceInfo>> {
    let mut by_service: BTreeMap<ObjectKey, Vec<&SliceInfo>> = BTreeMap::new();
    for slice in snapshot.slices.values() {
        let service = ObjectKey {
            namespace: slice.key.namespace.clone(),
            name: slice.service.clone(),
        };
        by_service.entry(service).or_default().push(slice);
    }
    by_service
}

fn port_plan(
    service: &ServiceInfo,
    port: &ServicePortInfo,
    slices: &[&SliceInfo],
    zone: Option<&str>,
) -> ServicePortPlan {
    let endpoints = endpoints_of_port(port, slices);
    ServicePortPlan {
        frontends: vec![Frontend {
            addr: service.cluster_ip,
            port: port.port,
            protocol: port.protocol,
        }],
        backends: cluster_set(&endpoints, zone),
        affinity_timeout: service.affinity_timeout,
    }
}

/// Rule 5: every endpoint of the service port, once per IP:port; of two
/// copies a non-terminating one wins, otherwise the first seen.
fn endpoints_of_port<'a>(
    port: &ServicePortInfo,
    slices: &[&'a SliceInfo],
) -> BTreeMap<BackendAddr, &'a EndpointInfo> {
    let mut endpoints: BTreeMap<BackendAddr, &EndpointInfo> = BTreeMap::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let backend = BackendAddr {
                addr: endpoint.addr,
                port: slice_port.port,
                protocol: port.protocol,
            };
            endpoints
                .entry(backend)
                .and_modify(|kept| {
                    if kept.terminating && !endpoint.terminating {
                        *kept = endpoint;
                    }
                })
                .or_insert(endpoint);
        }
    }
    endpoints
}

/// Rules 24, 26, 27: ready endpoints (topology-filtered), else the serving
/// and terminating ones; never one that is neither ready nor serving.
fn cluster_set(
    endpoints: &BTreeMap<BackendAddr, &EndpointInfo>,
    zone: Option<&str>,
) -> Vec<BackendAddr> {
    let ready: Vec<_> = endpoints
        .iter()
        .filter(|(_, e)| e.ready)
        .map(|(backend, e)| (*backend, *e))
        .collect();
    if ready.is_empty() {
        return endpoints
            .iter()
            .filter(|(_, e)| e.serving && e.terminating)
            .map(|(backend, _)| *backend)
            .collect();
    }
    let zone = zone.filter(|zone| topology_applies(&ready, zone));
    ready
        .into_iter()
        .filter(|(_, e)| zone.is_none_or(|zone| has_hint(e, zone)))
        .map(|(backend, _)| backend)
        .collect()
}

/// Rule 26: hints are trusted only when every ready endpoint carries some
/// and at least one is meant for this node's zone; otherwise filtering could
/// strand traffic on a partial or foreign hint set.
fn topology_applies(ready: &[(BackendAddr, &EndpointInfo)], zone: &str) -> bool {
    ready.iter().all(|(_, e)| !e.zone_hints.is_empty())
        && ready.iter().any(|(_, e)| has_hint(e, zone))
}

fn has_hint(endpoint: &EndpointInfo, zone: &str) -> bool {
    endpoint.zone_hints.iter().any(|hint| hint == zone)
}

/// Hostile input may give two service ports one frontend; the first service
/// port by name keeps it, so the outcome does not depend on arrival order.
fn resolve_frontend_conflicts(
    ports: &mut BTreeMap<ServicePortName, ServicePortPlan>,
) -> Vec<FrontendConflict> {
    let mut owners: BTreeMap<Frontend, ServicePortName> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (name, plan) in ports.iter_mut() {
        plan.frontends
            .retain(|frontend| match owners.get(frontend) {
                Some(kept) => {
                    conflicts.push(FrontendConflict {
                        frontend: *frontend,
                        kept: kept.clone(),
                        dropped: name.clone(),
                    });
                    false
                }
                None => {
                    owners.insert(*frontend, name.clone());
                    true
                }
            });
    }
    conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::objects::{NodeInfo, SlicePortInfo};

    use Protocol::{Tcp, Udp};

    fn key(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn service(
        namespace: &str,
        name: &str,
        cluster_ip: &str,
        ports: &[(&str, Protocol, u16)],
    ) -> ServiceInfo {
        ServiceInfo {
            key: key(namespace, name),
            cluster_ip: ip(cluster_ip),
            ports: ports
                .iter()
                .map(|&(name, protocol, port)| ServicePortInfo {
                    name: name.to_owned(),
                    protocol,
                    port,
                })
                .collect(),
            affinity_timeout: None,
        }
    }

    fn slice(
        namespace: &str,
        name: &str,
        service: &str,
        ports: &[(&str, Protocol, u16)],
        endpoints: Vec<EndpointInfo>,
    ) -> SliceInfo {
        SliceInfo {
            key: key(namespace, name),
            service: service.to_owned(),
            ports: ports
                .iter()
                .map(|&(name, protocol, port)| SlicePortInfo {
                    name: name.to_owned(),
                    protocol,
                    port,
                })
                .collect(),
            endpoints,
        }
    }

    fn endpoint(addr: &str, ready: bool, serving: bool, terminating: bool) -> EndpointInfo {
        EndpointInfo {
            addr: ip(addr),
            ready,
            serving,
            terminating,
            node_name: None,
            zone_hints: Vec::new(),
        }
    }

    fn ready(addr: &str) -> EndpointInfo {
        endpoint(addr, true, true, false)
    }

    fn serving_terminating(addr: &str) -> EndpointInfo {
        endpoint(addr, false, true, true)
    }

    fn hinted(endpoint: EndpointInfo, zones: &[&str]) -> EndpointInfo {
        EndpointInfo {
            zone_hints: zones.iter().map(|zone| (*zone).to_owned()).collect(),
            ..endpoint
        }
    }

    fn snapshot(
        services: Vec<ServiceInfo>,
        slices: Vec<SliceInfo>,
        zone: Option<&str>,
    ) -> ClusterSnapshot {
        ClusterSnapshot {
            node_name: "node1".into(),
            node: Some(NodeInfo {
                name: "node1".into(),
                zone: zone.map(str::to_owned),
            }),
            services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
            slices: slices.into_iter().map(|s| (s.key.clone(), s)).collect(),
        }
    }

    fn port_name(
        namespace: &str,
        name: &str,
        port_name: &str,
        protocol: Protocol,
    ) -> ServicePortName {
        ServicePortName {
            service: key(namespace, name),
            port_name: port_name.to_owned(),
            protocol,
        }
    }

    fn frontend(addr: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            addr: ip(addr),
            port,
            protocol,
        }
    }

    fn backends(addrs: &[(&str, u16)], protocol: Protocol) -> Vec<BackendAddr> {
        addrs
            .iter()
            .map(|&(addr, port)| BackendAddr {
                addr: ip(addr),
                port,
                protocol,
            })
            .collect()
    }

    /// The selected backends of the only port of `web` (TCP, "http") for
    /// these endpoints, all in one slice mapping "http" to 8080.
    fn selected(endpoints: Vec<EndpointInfo>, zone: Option<&str>) -> Vec<BackendAddr> {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                endpoints,
            )],
            zone,
        ));
        state.ports[&port_name("default", "web", "http", Tcp)]
            .backends
            .clone()
    }

    fn addrs(backends: &[BackendAddr]) -> Vec<String> {
        backends.iter().map(|b| b.addr.to_string()).collect()
    }

    #[test]
    fn rule_08_cluster_ip_frontend_and_backends() {
        let mut web = service("shop", "web", "10.96.0.10", &[("http", Tcp, 80)]);
        web.affinity_timeout = Some(600);
        let state = desired_state(&snapshot(
            vec![web],
            vec![slice(
                "shop",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                vec![ready("10.244.1.6"), ready("10.244.1.5")],
            )],
            None,
        ));
        let expected = DesiredState {
            ports: BTreeMap::from([(
                port_name("shop", "web", "http", Tcp),
                ServicePortPlan {
                    frontends: vec![frontend("10.96.0.10", 80, Tcp)],
                    backends: backends(&[("10.244.1.5", 8080), ("10.244.1.6", 8080)], Tcp),
                    affinity_timeout: Some(600),
                },
            )]),
            conflicts: vec![],
        };
        assert_eq!(state, expected);
    }

    #[test]
    fn rule_04_tcp_and_udp_same_port_are_independent() {
        let state = desired_state(&snapshot(
            vec![service(
                "kube-system",
                "dns",
                "10.96.0.53",
                &[("dns", Tcp, 53), ("dns", Udp, 53)],
            )],
            vec![
                slice(
                    "kube-system",
                    "dns-tcp",
                    "dns",
                    &[("dns", Tcp, 5353)],
                    vec![ready("10.244.1.1")],
                ),
                slice(
                    "kube-system",
                    "dns-udp",
                    "dns",
                    &[("dns", Udp, 53)],
                    vec![ready("10.244.2.2")],
                ),
            ],
            None,
        ));
        let tcp = &state.ports[&port_name("kube-system", "dns", "dns", Tcp)];
        let udp = &state.ports[&port_name("kube-system", "dns", "dns", Udp)];
        assert_eq!(tcp.frontends, vec![frontend("10.96.0.53", 53, Tcp)]);
        assert_eq!(tcp.backends, backends(&[("10.244.1.1", 5353)], Tcp));
        assert_eq!(udp.frontends, vec![frontend("10.96.0.53", 53, Udp)]);
        assert_eq!(udp.backends, backends(&[("10.244.2.2", 53)], Udp));
        assert_eq!(state.ports.len(), 2);
        assert!(state.conflicts.is_empty());
    }

    #[test]
    fn rule_05_port_matched_by_name_and_protocol() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80), ("", Tcp, 81)],
            )],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[
                    ("http", Udp, 9999),
                    ("metrics", Tcp, 9090),
                    ("http", Tcp, 8080),
                    ("", Tcp, 8181),
                ],
                vec![ready("10.244.1.5")],
            )],
            None,
        ));
        assert_eq!(
            state.ports[&port_name("default", "web", "http", Tcp)].backends,
            backends(&[("10.244.1.5", 8080)], Tcp)
        );
        assert_eq!(
            state.ports[&port_name("default", "web", "", Tcp)].backends,
            backends(&[("10.244.1.5", 8181)], Tcp)
        );
    }

    #[test]
    fn rule_05_slices_belong_to_named_service_in_same_namespace() {
        let state = desired_state(&snapshot(
            vec![service("shop", "web", "10.96.0.10", &[("http", Tcp, 80)])],
            vec![
                slice(
                    "shop",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1")],
                ),
                slice(
                    "shop",
                    "web-2",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.2")],
                ),
                slice(
                    "other",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.3")],
                ),
                slice(
                    "shop",
                    "api-1",
                    "api",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.4")],
                ),
            ],
            None,
        ));
        assert_eq!(
            addrs(&state.ports[&port_name("shop", "web", "http", Tcp)].backends),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_05_same_endpoint_in_two_slices_counts_once() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![
                slice(
                    "default",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1")],
                ),
                slice(
                    "default",
                    "web-2",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1"), ready("10.0.0.1")],
                ),
            ],
            None,
        ));
        assert_eq!(
            state.ports[&port_name("default", "web", "http", Tcp)].backends,
            backends(&[("10.0.0.1", 8080)], Tcp)
        );
    }

    #[test]
    fn rule_05_duplicate_endpoint_non_terminating_copy_wins() {
        // (copy in slice web-1, copy in slice web-2, selected addresses)
        let cases = [
            (
                serving_terminating("10.0.0.1"),
                ready("10.0.0.1"),
                vec!["10.0.0.1"],
            ),
            (
                ready("10.0.0.1"),
                serving_terminating("10.0.0.1"),
                vec!["10.0.0.1"],
            ),
            // The non-terminating copy wins even though it is not serving.
            (
                endpoint("10.0.0.1", false, false, false),
                serving_terminating("10.0.0.1"),
                vec![],
            ),
            (
                serving_terminating("10.0.0.1"),
                endpoint("10.0.0.1", false, false, false),
                vec![],
            ),
            // Neither or both terminating: the first copy is kept.
            (
                ready("10.0.0.1"),
                endpoint("10.0.0.1", false, false, false),
                vec!["10.0.0.1"],
            ),
            (
                serving_terminating("10.0.0.1"),
                endpoint("10.0.0.1", false, false, true),
                vec!["10.0.0.1"],
            ),
        ];
        for (first, second, expected) in cases {
            let description = format!("{first:?} then {second:?}");
            let state = desired_state(&snapshot(
                vec![service(
                    "default",
                    "web",
                    "10.96.0.10",
                    &[("http", Tcp, 80)],
                )],
                vec![
                    slice(
                        "default",
                        "web-1",
                        "web",
                        &[("http", Tcp, 8080)],
                        vec![first],
                    ),
                    slice(
                        "default",
                        "web-2",
                        "web",
                        &[("http", Tcp, 8080)],
                        vec![second],
                    ),
                ],
                None,
            ));
            assert_eq!(
                addrs(&state.ports[&port_name("default", "web", "http", Tcp)].backends),
                expected,
                "{description}"
            );
        }
    }

    #[test]
    fn rule_05_same_ip_on_different_ports_are_different_backends() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![
                slice(
                    "default",
                    "web-1",
                    "web",
                    &[("http", Tcp, 8080)],
                    vec![ready("10.0.0.1")],
                ),
                slice(
                    "default",
                    "web-2",
                    "web",
                    &[("http", Tcp, 8081)],
                    vec![ready("10.0.0.1")],
                ),
            ],
            None,
        ));
        assert_eq!(
            state.ports[&port_name("default", "web", "http", Tcp)].backends,
            backends(&[("10.0.0.1", 8080), ("10.0.0.1", 8081)], Tcp)
        );
    }

    #[test]
    fn rule_23_affinity_timeout_is_copied_to_every_port() {
        let mut web = service(
            "default",
            "web",
            "10.96.0.10",
            &[("http", Tcp, 80), ("https", Tcp, 443)],
        );
        web.affinity_timeout = Some(10800);
        let state = desired_state(&snapshot(vec![web], vec![], None));
        let timeouts: Vec<_> = state
            .ports
            .values()
            .map(|plan| plan.affinity_timeout)
            .collect();
        assert_eq!(timeouts, vec![Some(10800), Some(10800)]);
    }

    #[test]
    fn rule_24_terminating_fallback() {
        let cases = [
            (
                "ready present: only ready",
                vec![ready("10.0.0.1"), serving_terminating("10.0.0.2")],
                vec!["10.0.0.1"],
            ),
            (
                "no ready: serving and terminating",
                vec![
                    serving_terminating("10.0.0.2"),
                    serving_terminating("10.0.0.3"),
                ],
                vec!["10.0.0.2", "10.0.0.3"],
            ),
            (
                "terminating but not serving",
                vec![
                    endpoint("10.0.0.2", false, false, true),
                    serving_terminating("10.0.0.3"),
                ],
                vec!["10.0.0.3"],
            ),
            (
                "serving but neither ready nor terminating",
                vec![endpoint("10.0.0.2", false, true, false)],
                vec![],
            ),
        ];
        for (description, endpoints, expected) in cases {
            assert_eq!(addrs(&selected(endpoints, None)), expected, "{description}");
        }
    }

    #[test]
    fn rule_24_terminating_fallback_ignores_topology() {
        let endpoints = vec![
            hinted(serving_terminating("10.0.0.1"), &["zone-a"]),
            hinted(serving_terminating("10.0.0.2"), &["zone-b"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_all_hinted_and_match_filters() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-a"]),
            hinted(ready("10.0.0.2"), &["zone-b"]),
            hinted(ready("10.0.0.3"), &["zone-b", "zone-a"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.3"]
        );
    }

    #[test]
    fn rule_26_topology_hints_one_endpoint_without_hints_uses_all() {
        let endpoints = vec![hinted(ready("10.0.0.1"), &["zone-a"]), ready("10.0.0.2")];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_no_hint_matches_node_zone_uses_all() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-b"]),
            hinted(ready("10.0.0.2"), &["zone-c"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints, Some("zone-a"))),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_node_without_zone_uses_all() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-a"]),
            hinted(ready("10.0.0.2"), &["zone-b"]),
        ];
        assert_eq!(
            addrs(&selected(endpoints.clone(), None)),
            ["10.0.0.1", "10.0.0.2"]
        );

        let mut unknown_node = snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("http", Tcp, 80)],
            )],
            vec![slice(
                "default",
                "web-1",
                "web",
                &[("http", Tcp, 8080)],
                endpoints,
            )],
            None,
        );
        unknown_node.node = None;
        let state = desired_state(&unknown_node);
        assert_eq!(
            addrs(&state.ports[&port_name("default", "web", "http", Tcp)].backends),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn rule_26_topology_hints_only_ready_endpoints_must_be_hinted() {
        let endpoints = vec![
            hinted(ready("10.0.0.1"), &["zone-a"]),
            hinted(ready("10.0.0.2"), &["zone-b"]),
            serving_terminating("10.0.0.3"),
            endpoint("10.0.0.4", false, false, false),
        ];
        assert_eq!(addrs(&selected(endpoints, Some("zone-a"))), ["10.0.0.1"]);
    }

    #[test]
    fn rule_27_neither_ready_nor_serving_never_used() {
        let endpoints = vec![
            endpoint("10.0.0.1", false, false, false),
            endpoint("10.0.0.2", false, false, true),
        ];
        assert_eq!(selected(endpoints, None), vec![]);
    }

    #[test]
    fn rule_28_no_endpoints_gives_empty_set() {
        let state = desired_state(&snapshot(
            vec![
                service("default", "lonely", "10.96.0.20", &[("http", Tcp, 80)]),
                service("default", "empty", "10.96.0.21", &[("http", Tcp, 80)]),
            ],
            vec![slice(
                "default",
                "empty-1",
                "empty",
                &[("http", Tcp, 8080)],
                vec![],
            )],
            None,
        ));
        let expected = BTreeMap::from([
            (
                port_name("default", "empty", "http", Tcp),
                ServicePortPlan {
                    frontends: vec![frontend("10.96.0.21", 80, Tcp)],
                    backends: vec![],
                    affinity_timeout: None,
                },
            ),
            (
                port_name("default", "lonely", "http", Tcp),
                ServicePortPlan {
                    frontends: vec![frontend("10.96.0.20", 80, Tcp)],
                    backends: vec![],
                    affinity_timeout: None,
                },
            ),
        ]);
        assert_eq!(state.ports, expected);
    }

    #[test]
    fn frontend_conflict_first_service_port_keeps_it() {
        let state = desired_state(&snapshot(
            vec![
                service(
                    "default",
                    "b",
                    "10.96.0.10",
                    &[("http", Tcp, 80), ("dns", Udp, 53)],
                ),
                service("default", "a", "10.96.0.10", &[("web", Tcp, 80)]),
            ],
            vec![],
            None,
        ));
        assert_eq!(
            state.conflicts,
            vec![FrontendConflict {
                frontend: frontend("10.96.0.10", 80, Tcp),
                kept: port_name("default", "a", "web", Tcp),
                dropped: port_name("default", "b", "http", Tcp),
            }]
        );
        let frontends: Vec<_> = state
            .ports
            .iter()
            .map(|(name, plan)| (name.clone(), plan.frontends.clone()))
            .collect();
        assert_eq!(
            frontends,
            vec![
                (
                    port_name("default", "a", "web", Tcp),
                    vec![frontend("10.96.0.10", 80, Tcp)]
                ),
                (
                    port_name("default", "b", "dns", Udp),
                    vec![frontend("10.96.0.10", 53, Udp)]
                ),
                (port_name("default", "b", "http", Tcp), vec![]),
            ]
        );
    }

    #[test]
    fn frontend_conflict_within_one_service() {
        let state = desired_state(&snapshot(
            vec![service(
                "default",
                "web",
                "10.96.0.10",
                &[("x", Tcp, 80), ("y", Tcp, 80)],
            )],
            vec![],
            None,
        ));
        assert_eq!(
            state.conflicts,
            vec![FrontendConflict {
                frontend: frontend("10.96.0.10", 80, Tcp),
                kept: port_name("default", "web", "x", Tcp),
                dropped: port_name("default", "web", "y", Tcp),
            }]
        );
        assert_eq!(
            state.ports[&port_name("default", "web", "y", Tcp)].frontends,
            vec![]
        );
    }

    #[test]
    fn empty_snapshot_gives_empty_state() {
        assert_eq!(
            desired_state(&ClusterSnapshot::default()),
            DesiredState::default()
        );
    }
}
