use std::sync::Arc;

use super::*;
use crate::model::{
    fixtures::{endpoint, ip, key, node, service},
    objects::SlicePortInfo,
};
use FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};

use Protocol::{Tcp, Udp};

fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, Protocol, u16)],
    endpoints: Vec<EndpointInfo>,
) -> SliceInfo {
    SliceInfo {
        key: key(namespace, name),
        service: key(namespace, service),
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
        node: Some(node(zone)),
        services: services
            .into_iter()
            .map(|s| (s.key.clone(), Arc::new(s)))
            .collect(),
        slices: slices
            .into_iter()
            .map(|s| (s.key.clone(), Arc::new(s)))
            .collect(),
        ..ClusterSnapshot::default()
    }
}

fn port_name(namespace: &str, name: &str, port_name: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName::new(key(namespace, name), port_name, protocol)
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
    cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)])
}

/// The ClusterIP frontend's internal selection (rules 8, 24).
fn cluster_ip_backends(plan: &ServicePortPlan) -> Vec<BackendAddr> {
    plan.frontends
        .iter()
        .find(|frontend_plan| frontend_plan.kind == ClusterIp)
        .expect("a ClusterIP frontend")
        .internal
        .backends
        .clone()
}

fn frontends_of(plan: &ServicePortPlan) -> Vec<Frontend> {
    plan.frontends.iter().map(|f| f.frontend).collect()
}

fn reject(backends: Vec<BackendAddr>) -> Selection {
    Selection {
        backends,
        when_empty: WhenEmpty::Reject,
    }
}

fn cluster_ip_plan(frontend: Frontend, internal: Selection) -> FrontendPlan {
    FrontendPlan {
        frontend,
        kind: ClusterIp,
        internal,
        external: None,
        source_ranges: Vec::new(),
    }
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
                frontends: vec![cluster_ip_plan(
                    frontend("10.96.0.10", 80, Tcp),
                    reject(backends(&[("10.244.1.5", 8080), ("10.244.1.6", 8080)], Tcp)),
                )],
                affinity_timeout: Some(600),
                local_backends: Vec::new(),
            },
        )]),
        conflicts: vec![],
        cluster_ips: BTreeSet::from([ip("10.96.0.10")]),
        health_checks: vec![],
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
    assert_eq!(frontends_of(tcp), vec![frontend("10.96.0.53", 53, Tcp)]);
    assert_eq!(
        cluster_ip_backends(tcp),
        backends(&[("10.244.1.1", 5353)], Tcp)
    );
    assert_eq!(frontends_of(udp), vec![frontend("10.96.0.53", 53, Udp)]);
    assert_eq!(
        cluster_ip_backends(udp),
        backends(&[("10.244.2.2", 53)], Udp)
    );
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
        cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)]),
        backends(&[("10.244.1.5", 8080)], Tcp)
    );
    assert_eq!(
        cluster_ip_backends(&state.ports[&port_name("default", "web", "", Tcp)]),
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
        addrs(&cluster_ip_backends(
            &state.ports[&port_name("shop", "web", "http", Tcp)]
        )),
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
        cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)]),
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
            addrs(&cluster_ip_backends(
                &state.ports[&port_name("default", "web", "http", Tcp)]
            )),
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
        cluster_ip_backends(&state.ports[&port_name("default", "web", "http", Tcp)]),
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
        addrs(&cluster_ip_backends(
            &state.ports[&port_name("default", "web", "http", Tcp)]
        )),
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
                frontends: vec![cluster_ip_plan(
                    frontend("10.96.0.21", 80, Tcp),
                    reject(vec![]),
                )],
                affinity_timeout: None,
                local_backends: Vec::new(),
            },
        ),
        (
            port_name("default", "lonely", "http", Tcp),
            ServicePortPlan {
                frontends: vec![cluster_ip_plan(
                    frontend("10.96.0.20", 80, Tcp),
                    reject(vec![]),
                )],
                affinity_timeout: None,
                local_backends: Vec::new(),
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
        .map(|(name, plan)| (name.clone(), frontends_of(plan)))
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
        frontends_of(&state.ports[&port_name("default", "web", "y", Tcp)]),
        vec![]
    );
}

fn on_node(endpoint: EndpointInfo, node: &str) -> EndpointInfo {
    EndpointInfo {
        node_name: Some(node.into()),
        ..endpoint
    }
}

/// `default/web` of `service_type`: TCP "http" port 80, nodePort 30080.
fn web(service_type: ServiceType) -> ServiceInfo {
    let mut web = service("default", "web", "10.96.0.10", &[("http", Tcp, 80)]);
    web.service_type = service_type;
    web.ports[0].node_port = Some(30080);
    web
}

/// The plan of web's only port, its endpoints in one slice ("http" to
/// 8080), on node1 in `zone`.
fn web_plan_in_zone(
    web: ServiceInfo,
    endpoints: Vec<EndpointInfo>,
    zone: Option<&str>,
) -> ServicePortPlan {
    let state = desired_state(&snapshot(
        vec![web],
        vec![slice(
            "default",
            "web-1",
            "web",
            &[("http", Tcp, 8080)],
            endpoints,
        )],
        zone,
    ));
    state.ports[&port_name("default", "web", "http", Tcp)].clone()
}

fn web_plan(web: ServiceInfo, endpoints: Vec<EndpointInfo>) -> ServicePortPlan {
    web_plan_in_zone(web, endpoints, None)
}

fn plan_of(plan: &ServicePortPlan, kind: FrontendKind) -> &FrontendPlan {
    plan.frontends
        .iter()
        .find(|frontend_plan| frontend_plan.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} frontend in {plan:?}"))
}

fn kinds_and_frontends(plan: &ServicePortPlan) -> Vec<(FrontendKind, Frontend)> {
    plan.frontends
        .iter()
        .map(|frontend_plan| (frontend_plan.kind, frontend_plan.frontend))
        .collect()
}

/// A selection of web's backends (port 8080).
fn chosen(addrs: &[&str], when_empty: WhenEmpty) -> Selection {
    Selection {
        backends: addrs
            .iter()
            .map(|addr| BackendAddr {
                addr: ip(addr),
                port: 8080,
                protocol: Tcp,
            })
            .collect(),
        when_empty,
    }
}

fn net(cidr: &str) -> Ipv4Net {
    cidr.parse().unwrap()
}

#[test]
fn rule_25_26_local_set_ready_else_serving_terminating_without_topology() {
    // (description, endpoints, node zone, expected local set)
    let cases = [
        (
            "local ready only",
            vec![
                on_node(ready("10.0.0.1"), "node1"),
                on_node(ready("10.0.0.2"), "node2"),
                ready("10.0.0.3"),
            ],
            None,
            chosen(&["10.0.0.1"], WhenEmpty::Reject),
        ),
        (
            "no local ready: local serving and terminating",
            vec![
                on_node(serving_terminating("10.0.0.1"), "node1"),
                on_node(endpoint("10.0.0.4", false, false, true), "node1"),
                on_node(ready("10.0.0.2"), "node2"),
            ],
            None,
            chosen(&["10.0.0.1"], WhenEmpty::Reject),
        ),
        (
            "local ready wins over local terminating",
            vec![
                on_node(ready("10.0.0.1"), "node1"),
                on_node(serving_terminating("10.0.0.2"), "node1"),
            ],
            None,
            chosen(&["10.0.0.1"], WhenEmpty::Reject),
        ),
        (
            "hints for another zone do not filter the local set",
            vec![
                on_node(hinted(ready("10.0.0.1"), &["zone-b"]), "node1"),
                on_node(hinted(ready("10.0.0.3"), &["zone-a"]), "node1"),
                on_node(hinted(ready("10.0.0.2"), &["zone-a"]), "node2"),
            ],
            Some("zone-a"),
            chosen(&["10.0.0.1", "10.0.0.3"], WhenEmpty::Reject),
        ),
        (
            "local neither ready nor serving: none, dropped",
            vec![
                on_node(endpoint("10.0.0.1", false, false, false), "node1"),
                on_node(ready("10.0.0.2"), "node2"),
            ],
            None,
            chosen(&[], WhenEmpty::Drop),
        ),
    ];
    for (description, endpoints, zone, expected) in cases {
        let mut local = web(ServiceType::ClusterIp);
        local.internal_traffic_local = true;
        let plan = web_plan_in_zone(local, endpoints, zone);
        assert_eq!(
            plan_of(&plan, ClusterIp).internal,
            expected,
            "{description}"
        );
    }
}

#[test]
fn rule_06_local_backends_are_the_endpoints_on_this_node() {
    let plan = web_plan(
        web(ServiceType::NodePort),
        vec![
            on_node(ready("10.0.0.1"), "node1"),
            on_node(serving_terminating("10.0.0.2"), "node1"),
            on_node(endpoint("10.0.0.3", false, false, false), "node1"),
            on_node(ready("10.0.0.4"), "node2"),
            ready("10.0.0.5"),
        ],
    );
    assert_eq!(
        plan.local_backends,
        backends(
            &[("10.0.0.1", 8080), ("10.0.0.2", 8080), ("10.0.0.3", 8080)],
            Tcp
        ),
        "whatever their conditions; never another node's or an unplaced one"
    );
}

#[test]
fn rule_06_node_without_a_name_has_no_local_backends() {
    let mut snapshot = snapshot(
        vec![web(ServiceType::NodePort)],
        vec![slice(
            "default",
            "web-1",
            "web",
            &[("http", Tcp, 8080)],
            vec![
                on_node(ready("10.0.0.1"), ""),
                on_node(ready("10.0.0.2"), "node1"),
            ],
        )],
        None,
    );
    snapshot.node_name = String::new();
    let state = desired_state(&snapshot);
    assert!(
        state.ports[&port_name("default", "web", "http", Tcp)]
            .local_backends
            .is_empty()
    );
}

#[test]
fn rule_06_local_backends_carry_each_port_s_backend_port() {
    let state = desired_state(&snapshot(
        vec![service(
            "default",
            "web",
            "10.96.0.10",
            &[("http", Tcp, 80), ("metrics", Tcp, 9090)],
        )],
        vec![slice(
            "default",
            "web-1",
            "web",
            &[("http", Tcp, 8080), ("metrics", Tcp, 9091)],
            vec![on_node(ready("10.0.0.1"), "node1")],
        )],
        None,
    ));
    for (port, backend_port) in [("http", 8080), ("metrics", 9091)] {
        assert_eq!(
            state.ports[&port_name("default", "web", port, Tcp)].local_backends,
            backends(&[("10.0.0.1", backend_port)], Tcp),
            "{port}"
        );
    }
}

#[test]
fn rule_19_internal_traffic_local_steers_the_cluster_ip_only() {
    let mut service = web(ServiceType::NodePort);
    service.internal_traffic_local = true;
    let plan = web_plan(
        service,
        vec![
            on_node(ready("10.0.0.1"), "node1"),
            on_node(ready("10.0.0.2"), "node2"),
        ],
    );
    let cluster_ip = plan_of(&plan, ClusterIp);
    assert_eq!(
        cluster_ip.internal,
        chosen(&["10.0.0.1"], WhenEmpty::Reject)
    );
    assert_eq!(cluster_ip.external, None);
    let node_port = plan_of(&plan, NodePort);
    let everyone = chosen(&["10.0.0.1", "10.0.0.2"], WhenEmpty::Reject);
    assert_eq!(node_port.internal, everyone);
    assert_eq!(node_port.external, Some(everyone));
}

#[test]
fn rule_19_28_internal_traffic_local_without_local_endpoint() {
    // (description, endpoints, ClusterIP selection)
    let cases = [
        (
            "endpoints elsewhere: dropped",
            vec![on_node(ready("10.0.0.2"), "node2"), ready("10.0.0.3")],
            chosen(&[], WhenEmpty::Drop),
        ),
        (
            "only terminating elsewhere still counts as endpoints",
            vec![on_node(serving_terminating("10.0.0.2"), "node2")],
            chosen(&[], WhenEmpty::Drop),
        ),
        (
            "no usable endpoint anywhere: rejected (rule 21)",
            vec![on_node(endpoint("10.0.0.2", false, false, false), "node2")],
            chosen(&[], WhenEmpty::Reject),
        ),
    ];
    for (description, endpoints, expected) in cases {
        let mut service = web(ServiceType::ClusterIp);
        service.internal_traffic_local = true;
        let plan = web_plan(service, endpoints);
        assert_eq!(
            plan_of(&plan, ClusterIp).internal,
            expected,
            "{description}"
        );
    }
}

#[test]
fn rule_16_18_external_traffic_local_steers_external_flows_only() {
    let mut service = web(ServiceType::LoadBalancer);
    service.external_traffic_local = true;
    service.load_balancer_ips = vec![ip("198.51.100.7")];
    service.external_ips = vec![ip("198.51.100.8")];
    // (description, endpoints, internal everywhere, external)
    let cases = [
        (
            "a local endpoint",
            vec![
                on_node(ready("10.0.0.1"), "node1"),
                on_node(ready("10.0.0.2"), "node2"),
            ],
            chosen(&["10.0.0.1", "10.0.0.2"], WhenEmpty::Reject),
            chosen(&["10.0.0.1"], WhenEmpty::Reject),
        ),
        (
            "none local: external flows dropped, pods still served",
            vec![on_node(ready("10.0.0.2"), "node2")],
            chosen(&["10.0.0.2"], WhenEmpty::Reject),
            chosen(&[], WhenEmpty::Drop),
        ),
    ];
    for (description, endpoints, internal, external) in cases {
        let plan = web_plan(service.clone(), endpoints);
        assert_eq!(
            plan_of(&plan, ClusterIp).internal,
            internal,
            "{description}: eTP does not touch the ClusterIP"
        );
        for kind in [NodePort, LoadBalancer, ExternalIp] {
            let frontend_plan = plan_of(&plan, kind);
            assert_eq!(frontend_plan.internal, internal, "{description}: {kind:?}");
            assert_eq!(
                frontend_plan.external.as_ref(),
                Some(&external),
                "{description}: {kind:?}"
            );
        }
    }
}

#[test]
fn rule_17_external_traffic_cluster_sends_external_flows_anywhere() {
    let mut service = web(ServiceType::NodePort);
    service.external_ips = vec![ip("198.51.100.8")];
    let plan = web_plan(service, vec![on_node(ready("10.0.0.2"), "node2")]);
    let everyone = chosen(&["10.0.0.2"], WhenEmpty::Reject);
    for kind in [NodePort, ExternalIp] {
        assert_eq!(
            plan_of(&plan, kind).external.as_ref(),
            Some(&everyone),
            "{kind:?}"
        );
    }
}

#[test]
fn rule_21_no_endpoints_every_frontend_rejects() {
    let mut service = web(ServiceType::LoadBalancer);
    service.external_traffic_local = true;
    service.internal_traffic_local = true;
    service.load_balancer_ips = vec![ip("198.51.100.7")];
    service.external_ips = vec![ip("198.51.100.8")];
    let unusable = vec![
        on_node(endpoint("10.0.0.1", false, false, false), "node1"),
        on_node(endpoint("10.0.0.2", false, false, true), "node2"),
    ];
    let plan = web_plan(service, unusable);
    assert_eq!(plan.frontends.len(), 4);
    let refused = chosen(&[], WhenEmpty::Reject);
    for frontend_plan in &plan.frontends {
        assert_eq!(frontend_plan.internal, refused, "{:?}", frontend_plan.kind);
        if frontend_plan.kind != ClusterIp {
            assert_eq!(frontend_plan.external.as_ref(), Some(&refused));
        }
    }
}

#[test]
fn rule_11_node_port_addresses() {
    let loopback_and_more = vec![ip("127.0.0.1"), ip("127.0.0.53"), ip("10.0.0.5")];
    // (description, --nodeport-addresses, local addresses, node known, served)
    let cases = [
        (
            "default: the node's primary address",
            NodePortAddresses::Primary,
            loopback_and_more.clone(),
            true,
            vec!["192.168.0.2"],
        ),
        (
            "default without the node object: none",
            NodePortAddresses::Primary,
            loopback_and_more.clone(),
            false,
            vec![],
        ),
        (
            "0.0.0.0/0: every address but loopback",
            NodePortAddresses::Cidrs(vec![net("0.0.0.0/0")]),
            loopback_and_more.clone(),
            true,
            vec!["10.0.0.5", "192.168.0.2", "203.0.113.10"],
        ),
        (
            "a range keeps the addresses it contains",
            NodePortAddresses::Cidrs(vec![net("192.168.0.0/24")]),
            loopback_and_more.clone(),
            true,
            vec!["192.168.0.2"],
        ),
        (
            "loopback when a range inside 127.0.0.0/8 asks for it",
            NodePortAddresses::Cidrs(vec![net("127.0.0.1/32"), net("10.0.0.0/8")]),
            loopback_and_more.clone(),
            true,
            vec!["10.0.0.5", "127.0.0.1"],
        ),
        (
            "127.0.0.0/8 itself",
            NodePortAddresses::Cidrs(vec![net("127.0.0.0/8")]),
            loopback_and_more.clone(),
            true,
            vec!["127.0.0.1", "127.0.0.53"],
        ),
        (
            "a range wider than 127.0.0.0/8 does not enable loopback",
            NodePortAddresses::Cidrs(vec![net("126.0.0.0/7")]),
            loopback_and_more.clone(),
            true,
            vec![],
        ),
        (
            "local addresses alone, node unknown",
            NodePortAddresses::Cidrs(vec![net("10.0.0.0/8")]),
            loopback_and_more.clone(),
            false,
            vec!["10.0.0.5"],
        ),
        (
            "a node address listed locally too counts once",
            NodePortAddresses::Cidrs(vec![net("192.168.0.0/16")]),
            vec![ip("192.168.0.2")],
            true,
            vec!["192.168.0.2"],
        ),
    ];
    for (description, nodeport_addresses, local_addresses, node_known, expected) in cases {
        let mut snapshot = snapshot(vec![web(ServiceType::NodePort)], vec![], None);
        snapshot.nodeport_addresses = nodeport_addresses;
        snapshot.local_addresses = local_addresses;
        if !node_known {
            snapshot.node = None;
        }
        let state = desired_state(&snapshot);
        let served: Vec<String> = state.ports[&port_name("default", "web", "http", Tcp)]
            .frontends
            .iter()
            .filter(|frontend_plan| frontend_plan.kind == NodePort)
            .map(|frontend_plan| {
                assert_eq!(frontend_plan.frontend.port, 30080, "{description}");
                frontend_plan.frontend.addr.to_string()
            })
            .collect();
        assert_eq!(served, expected, "{description}");
    }
}

#[test]
fn rule_12_node_port_served_by_node_port_and_load_balancer_types() {
    // (type, nodePort, NodePort frontends expected)
    let cases = [
        (ServiceType::ClusterIp, Some(30080), false),
        (ServiceType::NodePort, Some(30080), true),
        (ServiceType::LoadBalancer, Some(30080), true),
        (ServiceType::LoadBalancer, None, false),
    ];
    for (service_type, node_port, served) in cases {
        let mut service = web(service_type);
        service.ports[0].node_port = node_port;
        let plan = web_plan(service, vec![]);
        let expected: Vec<_> = std::iter::once((ClusterIp, frontend("10.96.0.10", 80, Tcp)))
            .chain(served.then(|| (NodePort, frontend("192.168.0.2", 30080, Tcp))))
            .collect();
        assert_eq!(
            kinds_and_frontends(&plan),
            expected,
            "{service_type:?} {node_port:?}"
        );
    }
}

#[test]
fn rule_13_load_balancer_ips_served_for_type_load_balancer() {
    // (type, LoadBalancer frontends expected)
    let cases = [
        (ServiceType::LoadBalancer, true),
        // A status left over from an earlier type.
        (ServiceType::NodePort, false),
        (ServiceType::ClusterIp, false),
    ];
    for (service_type, served) in cases {
        let mut service = web(service_type);
        service.ports[0].node_port = None;
        service.load_balancer_ips = vec![ip("198.51.100.7"), ip("198.51.100.9")];
        let plan = web_plan(service, vec![]);
        let load_balancers: Vec<Frontend> = plan
            .frontends
            .iter()
            .filter(|frontend_plan| frontend_plan.kind == LoadBalancer)
            .map(|frontend_plan| frontend_plan.frontend)
            .collect();
        let expected = if served {
            vec![
                frontend("198.51.100.7", 80, Tcp),
                frontend("198.51.100.9", 80, Tcp),
            ]
        } else {
            vec![]
        };
        assert_eq!(load_balancers, expected, "{service_type:?}");
    }
}

#[test]
fn rule_14_external_ips_served_on_every_type() {
    for service_type in [
        ServiceType::ClusterIp,
        ServiceType::NodePort,
        ServiceType::LoadBalancer,
    ] {
        let mut service = web(service_type);
        service.external_ips = vec![ip("198.51.100.8")];
        let plan = web_plan(service, vec![ready("10.0.0.1")]);
        let external_ip = plan_of(&plan, ExternalIp);
        assert_eq!(
            external_ip.frontend,
            frontend("198.51.100.8", 80, Tcp),
            "{service_type:?}"
        );
        let everyone = chosen(&["10.0.0.1"], WhenEmpty::Reject);
        assert_eq!(external_ip.internal, everyone);
        assert_eq!(external_ip.external, Some(everyone));
    }
}

#[test]
fn rule_15_source_ranges_apply_to_load_balancer_frontends_only() {
    let mut service = web(ServiceType::LoadBalancer);
    service.load_balancer_ips = vec![ip("198.51.100.7")];
    service.external_ips = vec![ip("198.51.100.8")];
    service.source_ranges = vec![net("203.0.113.0/24")];
    let plan = web_plan(service, vec![]);
    for frontend_plan in &plan.frontends {
        let expected = match frontend_plan.kind {
            LoadBalancer => vec![net("203.0.113.0/24")],
            _ => vec![],
        };
        assert_eq!(
            frontend_plan.source_ranges, expected,
            "{:?}",
            frontend_plan.kind
        );
    }
    assert_eq!(plan.frontends.len(), 4);
}

#[test]
fn rule_13_14_address_listed_twice_in_one_port_keeps_the_load_balancer() {
    let mut service = web(ServiceType::LoadBalancer);
    service.load_balancer_ips = vec![ip("198.51.100.7")];
    service.external_ips = vec![ip("198.51.100.7"), ip("198.51.100.7")];
    service.source_ranges = vec![net("203.0.113.0/24")];
    let state = desired_state(&snapshot(vec![service], vec![], None));
    let plan = &state.ports[&port_name("default", "web", "http", Tcp)];
    assert_eq!(
        kinds_and_frontends(plan),
        vec![
            (ClusterIp, frontend("10.96.0.10", 80, Tcp)),
            (NodePort, frontend("192.168.0.2", 30080, Tcp)),
            (LoadBalancer, frontend("198.51.100.7", 80, Tcp)),
        ]
    );
    assert_eq!(
        plan_of(plan, LoadBalancer).source_ranges,
        vec![net("203.0.113.0/24")]
    );
    assert!(state.conflicts.is_empty(), "not a conflict between ports");
}

#[test]
fn rule_09_cluster_ips_of_every_proxied_service() {
    let state = desired_state(&snapshot(
        vec![
            service("default", "web", "10.96.0.10", &[("http", Tcp, 80)]),
            service("default", "portless", "10.96.0.11", &[]),
        ],
        vec![],
        None,
    ));
    assert_eq!(
        state.cluster_ips,
        BTreeSet::from([ip("10.96.0.10"), ip("10.96.0.11")])
    );
}

#[test]
fn rule_32_health_check_counts_distinct_local_ips() {
    let mut service = web(ServiceType::LoadBalancer);
    service.ports.push(ServicePortInfo {
        name: "metrics".into(),
        protocol: Tcp,
        port: 9090,
        node_port: None,
    });
    service.external_traffic_local = true;
    service.health_check_node_port = Some(30500);
    let state = desired_state(&snapshot(
        vec![service],
        vec![slice(
            "default",
            "web-1",
            "web",
            &[("http", Tcp, 8080), ("metrics", Tcp, 9090)],
            vec![
                on_node(ready("10.0.0.1"), "node1"),
                on_node(ready("10.0.0.2"), "node1"),
                on_node(serving_terminating("10.0.0.3"), "node1"),
                on_node(endpoint("10.0.0.4", false, false, true), "node1"),
                on_node(ready("10.0.0.9"), "node2"),
            ],
        )],
        None,
    ));
    assert_eq!(
        state.health_checks,
        vec![HealthCheck {
            service: key("default", "web"),
            node_port: 30500,
            local_ready: 2,
            local_serving_terminating: 1,
        }]
    );
}

#[test]
fn rule_32_health_check_only_for_load_balancer_with_local_policy() {
    // (type, eTP=Local, healthCheckNodePort)
    let cases = [
        (ServiceType::NodePort, true, Some(30500)),
        (ServiceType::LoadBalancer, false, Some(30500)),
        (ServiceType::LoadBalancer, true, None),
    ];
    for (service_type, local, health_check_node_port) in cases {
        let mut service = web(service_type);
        service.external_traffic_local = local;
        service.health_check_node_port = health_check_node_port;
        let state = desired_state(&snapshot(vec![service], vec![], None));
        assert_eq!(
            state.health_checks,
            vec![],
            "{service_type:?} {local} {health_check_node_port:?}"
        );
    }
}

#[test]
fn frontend_conflict_across_kinds() {
    // a's externalIP is node1's address at b's nodePort.
    let mut a = service("default", "a", "10.96.0.20", &[("http", Tcp, 30080)]);
    a.external_ips = vec![ip("192.168.0.2")];
    let mut b = web(ServiceType::NodePort);
    b.key = key("default", "b");
    let state = desired_state(&snapshot(vec![b, a], vec![], None));
    assert_eq!(
        state.conflicts,
        vec![FrontendConflict {
            frontend: frontend("192.168.0.2", 30080, Tcp),
            kept: port_name("default", "a", "http", Tcp),
            dropped: port_name("default", "b", "http", Tcp),
        }]
    );
    assert_eq!(
        kinds_and_frontends(&state.ports[&port_name("default", "b", "http", Tcp)]),
        vec![(ClusterIp, frontend("10.96.0.10", 80, Tcp))]
    );
}

#[test]
fn empty_snapshot_gives_empty_state() {
    assert_eq!(
        desired_state(&ClusterSnapshot::default()),
        DesiredState::default()
    );
}
