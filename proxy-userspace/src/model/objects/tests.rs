use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};

use super::*;
use crate::model::fixtures::{endpoint, ip, key};

fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_saphyr::from_str(yaml).expect("test object parses")
}

/// A valid ClusterIP Service with `extra` appended to its spec.
fn service_with_spec(extra: &str) -> Service {
    parse(&format!(
        "metadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: http, port: 80}}]\n{extra}"
    ))
}

/// `service_with_spec` plus a `status`.
fn service_with_status(extra: &str, status: &str) -> Service {
    parse(&format!(
        "metadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: http, port: 80}}]\n{extra}\nstatus: {status}"
    ))
}

fn proxied_service(svc: &Service) -> ServiceInfo {
    match service(svc) {
        Ok(Admission::Proxied(info)) => info,
        other => panic!("expected a proxied service, got {other:?}"),
    }
}

fn proxied_slice(slice: &EndpointSlice) -> SliceInfo {
    match endpoint_slice(slice) {
        Ok(Admission::Proxied(info)) => info,
        other => panic!("expected a proxied slice, got {other:?}"),
    }
}

#[test]
fn valid_service_is_converted() {
    let svc: Service = parse(
        "
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
",
    );
    assert_eq!(
        proxied_service(&svc),
        ServiceInfo {
            key: key("shop", "web"),
            service_type: ServiceType::NodePort,
            cluster_ip: ip("10.96.0.10"),
            ports: vec![
                ServicePortInfo {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                },
                ServicePortInfo {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    node_port: Some(30053),
                },
            ],
            affinity_timeout: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            external_traffic_local: false,
            internal_traffic_local: false,
            health_check_node_port: None,
        }
    );
}

#[test]
fn missing_namespace_defaults_and_unnamed_port_protocol_defaults() {
    let svc: Service =
        parse("metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}");
    let info = proxied_service(&svc);
    assert_eq!(info.key, key("default", "web"));
    assert_eq!(
        info.ports,
        vec![ServicePortInfo {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }]
    );
}

#[test]
fn rule_01_service_labels_are_ignored() {
    let cases = [
        (
            "service.kubernetes.io/service-proxy-name: other",
            IgnoreReason::ServiceProxyName,
        ),
        (
            "service.kubernetes.io/service-proxy-name: ''",
            IgnoreReason::ServiceProxyName,
        ),
        (
            "service.kubernetes.io/headless: ''",
            IgnoreReason::HeadlessLabel,
        ),
    ];
    for (labels, reason) in cases {
        let svc: Service = parse(&format!(
            "metadata: {{name: web, labels: {{{labels}}}}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}"
        ));
        assert_eq!(service(&svc), Ok(Admission::Ignored(reason)), "{labels}");
    }
}

#[test]
fn rule_01_proxy_name_label_is_ignored() {
    let slice: EndpointSlice = parse(
        "
metadata:
  name: web-abc
  labels: {kubernetes.io/service-name: web, service.kubernetes.io/service-proxy-name: other}
addressType: IPv4
endpoints: []
",
    );
    assert_eq!(
        endpoint_slice(&slice),
        Ok(Admission::Ignored(IgnoreReason::ServiceProxyName))
    );
    let endpoints_object: Endpoints =
        parse("metadata: {name: web, labels: {service.kubernetes.io/headless: ''}}\nsubsets: []");
    assert_eq!(
        endpoints(&endpoints_object),
        Ok(Admission::Ignored(IgnoreReason::HeadlessLabel))
    );
}

#[test]
fn rule_02_external_name_is_ignored() {
    let svc: Service =
        parse("metadata: {name: web}\nspec: {type: ExternalName, externalName: example.com}");
    assert_eq!(
        service(&svc),
        Ok(Admission::Ignored(IgnoreReason::ExternalName))
    );
}

#[test]
fn rule_02_headless_is_ignored() {
    let specs = [
        "{ports: [{port: 80}]}",
        "{clusterIP: '', ports: [{port: 80}]}",
        "{clusterIP: None, ports: [{port: 80}]}",
        "{clusterIP: None, clusterIPs: [None], ports: [{port: 80}]}",
    ];
    for spec in specs {
        let svc: Service = parse(&format!("metadata: {{name: web}}\nspec: {spec}"));
        assert_eq!(
            service(&svc),
            Ok(Admission::Ignored(IgnoreReason::Headless)),
            "{spec}"
        );
    }
}

#[test]
fn rule_35_ipv4_cluster_ip_is_picked() {
    let cases = [
        ("{clusterIP: 10.96.0.10}", "10.96.0.10"),
        ("{clusterIPs: [10.96.0.11]}", "10.96.0.11"),
        (
            "{clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.12]}",
            "10.96.0.12",
        ),
        (
            "{clusterIP: 10.96.0.13, clusterIPs: [10.96.0.13, 'fd00::13']}",
            "10.96.0.13",
        ),
    ];
    for (spec, expected) in cases {
        let svc: Service = parse(&format!("metadata: {{name: web}}\nspec: {spec}"));
        assert_eq!(proxied_service(&svc).cluster_ip, ip(expected), "{spec}");
    }
}

#[test]
fn rule_35_ipv6_only_service_is_ignored() {
    let svc: Service =
        parse("metadata: {name: web}\nspec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10']}");
    assert_eq!(
        service(&svc),
        Ok(Admission::Ignored(IgnoreReason::OtherAddressFamily))
    );
}

#[test]
fn invalid_cluster_ip_is_rejected() {
    let cases = [
        ("{clusterIP: 10.96.0.300}", "spec.clusterIP", "10.96.0.300"),
        ("{clusterIP: 010.96.0.1}", "spec.clusterIP", "010.96.0.1"),
        (
            "{clusterIPs: [10.96.0.1, bogus]}",
            "spec.clusterIPs",
            "bogus",
        ),
        ("{clusterIP: 0.0.0.0}", "spec.clusterIP", "0.0.0.0"),
        (
            "{clusterIP: 255.255.255.255}",
            "spec.clusterIP",
            "255.255.255.255",
        ),
        ("{clusterIP: 224.0.0.1}", "spec.clusterIP", "224.0.0.1"),
    ];
    for (spec, field, value) in cases {
        let svc: Service = parse(&format!("metadata: {{name: web}}\nspec: {spec}"));
        assert_eq!(
            service(&svc),
            Err(InvalidObject::InvalidIp {
                field,
                value: value.into()
            }),
            "{spec}"
        );
    }
}

#[test]
fn missing_name_or_spec_is_rejected() {
    let no_name: Service = parse("metadata: {namespace: shop}\nspec: {clusterIP: 10.96.0.10}");
    assert_eq!(
        service(&no_name),
        Err(InvalidObject::MissingField("metadata.name"))
    );
    let empty_name: Service = parse("metadata: {name: ''}\nspec: {clusterIP: 10.96.0.10}");
    assert_eq!(
        service(&empty_name),
        Err(InvalidObject::MissingField("metadata.name"))
    );
    let no_spec: Service = parse("metadata: {name: web}");
    assert_eq!(service(&no_spec), Err(InvalidObject::MissingField("spec")));
}

#[test]
fn unknown_service_type_is_rejected() {
    let svc = service_with_spec("  type: Nodeport");
    assert_eq!(
        service(&svc),
        Err(InvalidObject::InvalidValue {
            field: "spec.type",
            value: "Nodeport".into()
        })
    );
}

#[test]
fn service_port_out_of_range_is_rejected() {
    for port in [0, -1, 65536, 70000] {
        let svc: Service = parse(&format!(
            "metadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: {port}}}]}}"
        ));
        assert_eq!(
            service(&svc),
            Err(InvalidObject::PortOutOfRange {
                field: "spec.ports[].port",
                value: port
            }),
            "{port}"
        );
    }
}

#[test]
fn service_port_bounds_are_accepted() {
    let svc: Service = parse(
        "metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{name: a, port: 1}, {name: b, port: 65535}]}",
    );
    let ports: Vec<u16> = proxied_service(&svc).ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![1, 65535]);
}

#[test]
fn unsupported_protocol_is_rejected() {
    for protocol in ["SCTP", "tcp", "ICMP"] {
        let svc: Service = parse(&format!(
            "metadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{name: a, port: 80}}, {{name: b, port: 81, protocol: {protocol}}}]}}"
        ));
        assert_eq!(
            service(&svc),
            Err(InvalidObject::UnsupportedProtocol {
                field: "spec.ports[].protocol",
                value: protocol.into()
            }),
            "{protocol}"
        );
    }
}

#[test]
fn rule_04_duplicate_service_port_name_and_protocol_is_rejected() {
    let svc: Service = parse(
        "metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53}, {name: dns, port: 54, protocol: TCP}]}",
    );
    assert_eq!(
        service(&svc),
        Err(InvalidObject::InvalidValue {
            field: "spec.ports[].name",
            value: "dns/TCP".into()
        })
    );
}

#[test]
fn rule_04_same_name_different_protocol_is_accepted() {
    let svc: Service = parse(
        "metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53}, {name: dns, port: 53, protocol: UDP}]}",
    );
    let protocols: Vec<Protocol> = proxied_service(&svc)
        .ports
        .iter()
        .map(|p| p.protocol)
        .collect();
    assert_eq!(protocols, vec![Protocol::Tcp, Protocol::Udp]);
}

#[test]
fn rule_23_affinity_timeout_default_and_bounds() {
    let cases: [(&str, Result<Option<u32>, &str>); 9] = [
        ("", Ok(None)),
        ("  sessionAffinity: None", Ok(None)),
        ("  sessionAffinity: ClientIP", Ok(Some(10800))),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {}}",
            Ok(Some(10800)),
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}",
            Ok(Some(1)),
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}",
            Ok(Some(86400)),
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
            Err("0"),
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
            Err("86401"),
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: -5}}",
            Err("-5"),
        ),
    ];
    for (extra, expected) in cases {
        let result = service(&service_with_spec(extra)).map(|admission| match admission {
            Admission::Proxied(info) => info.affinity_timeout,
            Admission::Ignored(reason) => panic!("ignored: {reason}"),
        });
        let expected = expected.map_err(|value| InvalidObject::InvalidValue {
            field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            value: value.into(),
        });
        assert_eq!(result, expected, "{extra}");
    }
}

#[test]
fn rule_23_unknown_affinity_is_rejected() {
    assert_eq!(
        service(&service_with_spec("  sessionAffinity: Cookie")),
        Err(InvalidObject::InvalidValue {
            field: "spec.sessionAffinity",
            value: "Cookie".into()
        })
    );
}

#[test]
fn rule_05_valid_slice_is_converted() {
    let slice: EndpointSlice = parse(
        "
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {port: 53, protocol: UDP}
- {name: no-number, protocol: TCP}
endpoints:
- addresses: [10.244.1.5, 10.244.1.6]
  nodeName: node1
  hints: {forZones: [{name: zone-a}, {name: zone-b}]}
",
    );
    assert_eq!(
        proxied_slice(&slice),
        SliceInfo {
            key: key("shop", "web-abc"),
            service: key("shop", "web"),
            ports: vec![
                SlicePortInfo {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080
                },
                SlicePortInfo {
                    name: String::new(),
                    protocol: Protocol::Udp,
                    port: 53
                },
            ],
            endpoints: vec![EndpointInfo {
                node_name: Some("node1".into()),
                zone_hints: vec!["zone-a".into(), "zone-b".into()],
                ..endpoint("10.244.1.5", true, true, false)
            }],
        }
    );
}

#[test]
fn rule_05_other_address_family_slice_is_ignored() {
    for address_type in ["IPv6", "FQDN"] {
        let slice: EndpointSlice = parse(&format!(
            "metadata: {{name: web-abc, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {address_type}\nendpoints: [{{addresses: ['fd00::1']}}]"
        ));
        assert_eq!(
            endpoint_slice(&slice),
            Ok(Admission::Ignored(IgnoreReason::OtherAddressFamily)),
            "{address_type}"
        );
    }
}

#[test]
fn rule_05_invalid_slices_are_rejected() {
    let meta = "metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}";
    let cases = [
        (
            format!("{meta}\naddressType: IPv4\nendpoints: [{{addresses: []}}]"),
            InvalidObject::MissingField("endpoints[].addresses"),
        ),
        (
            format!("{meta}\naddressType: IPv4\nendpoints: [{{addresses: [10.244.1.256]}}]"),
            InvalidObject::InvalidIp {
                field: "endpoints[].addresses",
                value: "10.244.1.256".into(),
            },
        ),
        (
            format!("{meta}\naddressType: IPv4\nendpoints: [{{addresses: ['fd00::1']}}]"),
            InvalidObject::InvalidIp {
                field: "endpoints[].addresses",
                value: "fd00::1".into(),
            },
        ),
        (
            format!("{meta}\naddressType: IPv4\nports: [{{port: 0}}]\nendpoints: []"),
            InvalidObject::PortOutOfRange {
                field: "ports[].port",
                value: 0,
            },
        ),
        (
            format!("{meta}\naddressType: IPv4\nports: [{{port: 70000}}]\nendpoints: []"),
            InvalidObject::PortOutOfRange {
                field: "ports[].port",
                value: 70000,
            },
        ),
        (
            format!("{meta}\naddressType: IPv4\nports: [{{port: 80, protocol: SCTP}}]\nendpoints: []"),
            InvalidObject::UnsupportedProtocol {
                field: "ports[].protocol",
                value: "SCTP".into(),
            },
        ),
        (
            format!("{meta}\naddressType: IPv4\nports: [{{name: a, port: 80}}, {{name: a, port: 81}}]\nendpoints: []"),
            InvalidObject::InvalidValue {
                field: "ports[].name",
                value: "a/TCP".into(),
            },
        ),
        (
            format!("{meta}\naddressType: IPX\nendpoints: []"),
            InvalidObject::InvalidValue {
                field: "addressType",
                value: "IPX".into(),
            },
        ),
        (format!("{meta}\nendpoints: []"), InvalidObject::MissingField("addressType")),
        (
            "metadata: {name: web-abc}\naddressType: IPv4\nendpoints: []".to_owned(),
            InvalidObject::MissingField("metadata.labels[kubernetes.io/service-name]"),
        ),
        (
            "metadata: {labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []".to_owned(),
            InvalidObject::MissingField("metadata.name"),
        ),
    ];
    for (yaml, expected) in cases {
        let slice: EndpointSlice = parse(&yaml);
        assert_eq!(endpoint_slice(&slice), Err(expected), "{yaml}");
    }
}

#[test]
fn rule_06_condition_defaults() {
    let slice: EndpointSlice = parse(
        "
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.1]}
- {addresses: [10.0.0.2], conditions: {}}
- {addresses: [10.0.0.3], conditions: {ready: false}}
- {addresses: [10.0.0.4], conditions: {serving: false}}
- {addresses: [10.0.0.5], conditions: {terminating: true}}
- {addresses: [10.0.0.6], conditions: {ready: false, serving: true, terminating: true}}
",
    );
    assert_eq!(
        proxied_slice(&slice).endpoints,
        vec![
            endpoint("10.0.0.1", true, true, false),
            endpoint("10.0.0.2", true, true, false),
            endpoint("10.0.0.3", false, true, false),
            endpoint("10.0.0.4", true, false, false),
            endpoint("10.0.0.5", true, true, true),
            endpoint("10.0.0.6", false, true, true),
        ]
    );
}

#[test]
fn rule_07_endpoints_are_mirrored() {
    let endpoints_object: Endpoints = parse(
        "
metadata: {name: legacy, namespace: shop}
subsets:
- addresses: [{ip: 10.0.0.1, nodeName: node1}, {ip: 'fd00::1'}]
  notReadyAddresses: [{ip: 10.0.0.2}]
  ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}, {name: no-number}]
- addresses: [{ip: 10.0.0.3}]
",
    );
    let expected = vec![
        SliceInfo {
            key: key("shop", "legacy-mirrored-0"),
            service: key("shop", "legacy"),
            ports: vec![
                SlicePortInfo {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                },
                SlicePortInfo {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                },
            ],
            endpoints: vec![
                EndpointInfo {
                    node_name: Some("node1".into()),
                    ..endpoint("10.0.0.1", true, true, false)
                },
                endpoint("10.0.0.2", false, false, false),
            ],
        },
        SliceInfo {
            key: key("shop", "legacy-mirrored-1"),
            service: key("shop", "legacy"),
            ports: vec![],
            endpoints: vec![endpoint("10.0.0.3", true, true, false)],
        },
    ];
    assert_eq!(
        endpoints(&endpoints_object),
        Ok(Admission::Proxied(expected))
    );
}

#[test]
fn rule_07_endpoints_without_subsets_give_no_slices() {
    let endpoints_object: Endpoints = parse("metadata: {name: legacy}");
    assert_eq!(endpoints(&endpoints_object), Ok(Admission::Proxied(vec![])));
}

#[test]
fn rule_07_invalid_endpoints_are_rejected() {
    let cases = [
        (
            "metadata: {name: legacy}\nsubsets: [{addresses: [{ip: nope}]}]",
            InvalidObject::InvalidIp {
                field: "subsets[].addresses[].ip",
                value: "nope".into(),
            },
        ),
        (
            "metadata: {name: legacy}\nsubsets: [{notReadyAddresses: [{ip: 0.0.0.0}]}]",
            InvalidObject::InvalidIp {
                field: "subsets[].notReadyAddresses[].ip",
                value: "0.0.0.0".into(),
            },
        ),
        (
            "metadata: {name: legacy}\nsubsets: [{ports: [{port: 70000}]}]",
            InvalidObject::PortOutOfRange {
                field: "subsets[].ports[].port",
                value: 70000,
            },
        ),
        (
            "metadata: {name: legacy}\nsubsets: [{ports: [{port: 80, protocol: SCTP}]}]",
            InvalidObject::UnsupportedProtocol {
                field: "subsets[].ports[].protocol",
                value: "SCTP".into(),
            },
        ),
        (
            "metadata: {name: legacy}\nsubsets: [{ports: [{port: 80}, {port: 81}]}]",
            InvalidObject::InvalidValue {
                field: "subsets[].ports[].name",
                value: "/TCP".into(),
            },
        ),
        (
            "metadata: {}\nsubsets: []",
            InvalidObject::MissingField("metadata.name"),
        ),
    ];
    for (yaml, expected) in cases {
        let endpoints_object: Endpoints = parse(yaml);
        assert_eq!(endpoints(&endpoints_object), Err(expected), "{yaml}");
    }
}

#[test]
fn node_zone_comes_from_label() {
    let cases = [
        (
            "metadata: {name: node1, labels: {topology.kubernetes.io/zone: zone-a}}",
            Some("zone-a"),
        ),
        (
            "metadata: {name: node1, labels: {topology.kubernetes.io/zone: ''}}",
            None,
        ),
        ("metadata: {name: node1}", None),
    ];
    for (yaml, zone) in cases {
        assert_eq!(
            node(&parse(yaml)),
            Ok(NodeInfo {
                name: "node1".into(),
                zone: zone.map(str::to_owned),
                addresses: vec![],
                deleting: false,
            }),
            "{yaml}"
        );
    }
}

#[test]
fn slice_beyond_the_api_servers_limits_is_rejected() {
    let endpoints: Vec<String> = (0..1001)
        .map(|i| format!("{{addresses: [10.0.{}.{}]}}", i / 250, i % 250 + 1))
        .collect();
    let big = parse::<EndpointSlice>(&format!(
        "metadata: {{name: s, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{}]",
        endpoints.join(", ")
    ));
    assert!(matches!(
        endpoint_slice(&big),
        Err(InvalidObject::InvalidValue {
            field: "endpoints",
            ..
        })
    ));
    let ports: Vec<String> = (1..=101)
        .map(|p| format!("{{name: p{p}, port: {p}}}"))
        .collect();
    let many_ports = parse::<EndpointSlice>(&format!(
        "metadata: {{name: s, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{}]",
        ports.join(", ")
    ));
    assert!(matches!(
        endpoint_slice(&many_ports),
        Err(InvalidObject::InvalidValue { field: "ports", .. })
    ));
}

#[test]
fn rule_33_node_being_deleted_is_flagged() {
    let deleting =
        parse::<Node>("metadata: {name: node1, deletionTimestamp: '2026-11-22T04:00:00Z'}");
    assert!(node(&deleting).unwrap().deleting);
    assert!(
        !node(&parse::<Node>("metadata: {name: node1}"))
            .unwrap()
            .deleting
    );
}

#[test]
fn node_without_name_is_rejected() {
    assert_eq!(
        node(&parse("metadata: {}")),
        Err(InvalidObject::MissingField("metadata.name"))
    );
}
#[test]
fn rule_02_service_type_is_read() {
    let cases = [
        ("", ServiceType::ClusterIp),
        ("  type: ClusterIP", ServiceType::ClusterIp),
        ("  type: NodePort", ServiceType::NodePort),
        ("  type: LoadBalancer", ServiceType::LoadBalancer),
    ];
    for (extra, expected) in cases {
        assert_eq!(
            proxied_service(&service_with_spec(extra)).service_type,
            expected,
            "{extra}"
        );
    }
}

#[test]
fn rule_12_node_port_is_taken_as_given() {
    let cases: [(&str, Result<Option<u16>, i32>); 7] = [
        ("{port: 80}", Ok(None)),
        ("{port: 80, nodePort: 30080}", Ok(Some(30080))),
        ("{port: 80, nodePort: 1}", Ok(Some(1))),
        ("{port: 80, nodePort: 65535}", Ok(Some(65535))),
        ("{port: 80, nodePort: 0}", Err(0)),
        ("{port: 80, nodePort: -1}", Err(-1)),
        ("{port: 80, nodePort: 65536}", Err(65536)),
    ];
    for (port, expected) in cases {
        let svc: Service = parse(&format!(
            "metadata: {{name: web}}\nspec: {{type: NodePort, clusterIP: 10.96.0.10, ports: [{port}]}}"
        ));
        let result = service(&svc).map(|admission| match admission {
            Admission::Proxied(info) => info.ports[0].node_port,
            Admission::Ignored(reason) => panic!("ignored: {reason}"),
        });
        let expected = expected.map_err(|value| InvalidObject::PortOutOfRange {
            field: "spec.ports[].nodePort",
            value,
        });
        assert_eq!(result, expected, "{port}");
    }
}

#[test]
fn rule_14_35_external_ips_ipv4_entries() {
    let cases: [(&str, Result<Vec<&str>, &str>); 5] = [
        ("", Ok(vec![])),
        (
            "  externalIPs: [198.51.100.8, 'fd00::8', 198.51.100.9]",
            Ok(vec!["198.51.100.8", "198.51.100.9"]),
        ),
        ("  externalIPs: [198.51.100.8, bogus]", Err("bogus")),
        ("  externalIPs: [0.0.0.0]", Err("0.0.0.0")),
        ("  externalIPs: [224.0.0.1]", Err("224.0.0.1")),
    ];
    for (extra, expected) in cases {
        let result = service(&service_with_spec(extra)).map(|admission| match admission {
            Admission::Proxied(info) => info.external_ips,
            Admission::Ignored(reason) => panic!("ignored: {reason}"),
        });
        let expected = expected
            .map(|ips| ips.into_iter().map(ip).collect())
            .map_err(|value| InvalidObject::InvalidIp {
                field: "spec.externalIPs",
                value: value.into(),
            });
        assert_eq!(result, expected, "{extra}");
    }
}

#[test]
fn rule_13_load_balancer_ingress_vip_mode_only() {
    let svc = service_with_status(
        "  type: LoadBalancer",
        "
  loadBalancer:
    ingress:
    - {ip: 198.51.100.1}
    - {ip: 198.51.100.2, ipMode: VIP}
    - {ip: 198.51.100.3, ipMode: Proxy}
    - {hostname: lb.example.com}
    - {hostname: lb.example.com, ipMode: VIP}
    - {ip: 'fd00::4'}
",
    );
    assert_eq!(
        proxied_service(&svc).load_balancer_ips,
        vec![ip("198.51.100.1"), ip("198.51.100.2")]
    );
}

#[test]
fn rule_13_invalid_load_balancer_ingress_is_rejected() {
    let cases = [
        (
            "{loadBalancer: {ingress: [{ip: 198.51.100.1, ipMode: Magic}]}}",
            InvalidObject::InvalidValue {
                field: "status.loadBalancer.ingress[].ipMode",
                value: "Magic".into(),
            },
        ),
        (
            "{loadBalancer: {ingress: [{ip: 198.51.100.300}]}}",
            InvalidObject::InvalidIp {
                field: "status.loadBalancer.ingress[].ip",
                value: "198.51.100.300".into(),
            },
        ),
    ];
    for (status, expected) in cases {
        let svc = service_with_status("  type: LoadBalancer", status);
        assert_eq!(service(&svc), Err(expected), "{status}");
    }
}

#[test]
fn rule_15_35_source_ranges_ipv4_normalized() {
    let svc = service_with_spec(
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/8, ' 203.0.113.7/24 ', 'fd00::/64', 192.0.2.1/32]",
    );
    let expected: Vec<Ipv4Net> = ["10.0.0.0/8", "203.0.113.0/24", "192.0.2.1/32"]
        .iter()
        .map(|range| range.parse().unwrap())
        .collect();
    assert_eq!(proxied_service(&svc).source_ranges, expected);
}

#[test]
fn rule_15_invalid_source_range_is_rejected() {
    for range in ["10.0.0.1", "10.0.0.0/33", "bogus/8", ""] {
        let svc = service_with_spec(&format!(
            "  type: LoadBalancer\n  loadBalancerSourceRanges: ['{range}']"
        ));
        assert_eq!(
            service(&svc),
            Err(InvalidObject::InvalidValue {
                field: "spec.loadBalancerSourceRanges",
                value: range.into(),
            }),
            "{range}"
        );
    }
}

#[test]
fn rule_16_19_traffic_policies() {
    // (spec lines, eTP=Local, iTP=Local)
    let cases = [
        ("", false, false),
        (
            "  externalTrafficPolicy: Cluster\n  internalTrafficPolicy: Cluster",
            false,
            false,
        ),
        ("  externalTrafficPolicy: Local", true, false),
        ("  internalTrafficPolicy: Local", false, true),
        (
            "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local",
            true,
            true,
        ),
    ];
    for (extra, external, internal) in cases {
        let info = proxied_service(&service_with_spec(&format!("  type: NodePort\n{extra}")));
        assert_eq!(
            (info.external_traffic_local, info.internal_traffic_local),
            (external, internal),
            "{extra}"
        );
    }
}

#[test]
fn rule_16_19_unknown_traffic_policy_is_rejected() {
    let cases = [
        (
            "  externalTrafficPolicy: local",
            "spec.externalTrafficPolicy",
            "local",
        ),
        (
            "  internalTrafficPolicy: Node",
            "spec.internalTrafficPolicy",
            "Node",
        ),
    ];
    for (extra, field, value) in cases {
        assert_eq!(
            service(&service_with_spec(extra)),
            Err(InvalidObject::InvalidValue {
                field,
                value: value.into(),
            }),
            "{extra}"
        );
    }
}

#[test]
fn rule_32_health_check_node_port_only_for_load_balancer_with_local_policy() {
    let cases: [(&str, Result<Option<u16>, i32>); 5] = [
        (
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30500",
            Ok(Some(30500)),
        ),
        (
            "  type: LoadBalancer\n  externalTrafficPolicy: Local",
            Ok(None),
        ),
        (
            "  type: LoadBalancer\n  externalTrafficPolicy: Cluster\n  healthCheckNodePort: 30500",
            Ok(None),
        ),
        (
            "  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30500",
            Ok(None),
        ),
        (
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 70000",
            Err(70000),
        ),
    ];
    for (extra, expected) in cases {
        let result = service(&service_with_spec(extra)).map(|admission| match admission {
            Admission::Proxied(info) => info.health_check_node_port,
            Admission::Ignored(reason) => panic!("ignored: {reason}"),
        });
        let expected = expected.map_err(|value| InvalidObject::PortOutOfRange {
            field: "spec.healthCheckNodePort",
            value,
        });
        assert_eq!(result, expected, "{extra}");
    }
}

#[test]
fn rule_11_node_addresses_internal_then_external_ipv4() {
    let info = node(&parse(
        "
metadata: {name: node1}
status:
  addresses:
  - {type: Hostname, address: node1}
  - {type: ExternalIP, address: 203.0.113.10}
  - {type: InternalIP, address: 'fd00::2'}
  - {type: InternalIP, address: 192.168.0.2}
  - {type: ExternalIP, address: 192.168.0.2}
  - {type: InternalIP, address: 10.0.0.2}
",
    ))
    .unwrap();
    assert_eq!(
        info.addresses,
        vec![ip("192.168.0.2"), ip("10.0.0.2"), ip("203.0.113.10")]
    );
}

#[test]
fn rule_11_invalid_node_address_is_rejected() {
    assert_eq!(
        node(&parse(
            "metadata: {name: node1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.300}]}"
        )),
        Err(InvalidObject::InvalidIp {
            field: "status.addresses[].address",
            value: "192.168.0.300".into(),
        })
    );
}
