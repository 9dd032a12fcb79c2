//! The acceptance scenarios of docs/semantics.md that the socket-level
//! datapath decides: every frontend kind as seen from a pod on the node,
//! traffic policies, endpoint conditions, topology, ignored Services and
//! healthCheckNodePort. The node is "node-1" with the primary address
//! 192.168.0.2 (on `lo` of the test namespace, like a node's own address).

use proxy_tests::host;
use serde_json::Value;

mod common;

use common::*;

const NODE_IP: &str = "192.168.0.2";
const EXTERNAL_IP: &str = "203.0.113.10";
const LB_IP: &str = "198.51.100.10";
const PROXY_LB_IP: &str = "198.51.100.11";
const NODE_PORT: u16 = 30080;
const EHOSTUNREACH: i64 = 113;

fn node_object(zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n  labels: {{topology.kubernetes.io/zone: {zone}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE_IP}}}]\n"
    )
}

/// A LoadBalancer Service with every kind of frontend: ClusterIP, NodePort,
/// an externalIP, a VIP-mode and a Proxy-mode ingress IP.
fn load_balancer(extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: {VIP}
  externalIPs: [{EXTERNAL_IP}]
{extra_spec}  ports: [{{name: http, port: 80, nodePort: {NODE_PORT}}}]
status:
  loadBalancer:
    ingress:
    - {{ip: {LB_IP}, ipMode: VIP}}
    - {{ip: {PROXY_LB_IP}, ipMode: Proxy}}
"
    )
}

/// An EndpointSlice for `web` port http=8080 from (address, node, conditions).
fn endpoints(list: &[(&str, &str, &str)]) -> String {
    let endpoints: Vec<String> = list
        .iter()
        .map(|(addr, node, conditions)| {
            format!("  - {{addresses: [{addr}], nodeName: {node}, conditions: {{{conditions}}}}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-x1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{}\n",
        endpoints.join("\n")
    )
}

fn started(prefix: &str, service: &str, slice: &str) -> TestNode {
    let mut node = TestNode::new(prefix);
    node.netns
        .ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])
        .unwrap();
    node.write("node.yaml", &node_object("zone-a"));
    node.write("svc.yaml", service);
    node.write("slice.yaml", slice);
    node.start_agent();
    node
}

fn backend_of(node: &TestNode, to: &str) -> String {
    reply_name(&node.tcp(to, 1)[0])
}

fn errno_of(node: &TestNode, to: &str) -> Value {
    let result = &node.tcp(to, 1)[0];
    assert_eq!(result["ok"], false, "{to}: {result}");
    result["errno"].clone()
}

#[test]
fn scenarios_04_10_12_every_frontend_kind_serves_and_refuses_without_endpoints() {
    let node = started(
        "epta",
        &load_balancer(""),
        &endpoints(&[(BACKENDS[0], "node-1", "ready: true")]),
    );
    for to in [
        format!("{VIP}:80"),
        format!("{NODE_IP}:{NODE_PORT}"),
        format!("{EXTERNAL_IP}:80"),
        format!("{LB_IP}:80"),
    ] {
        assert_eq!(backend_of(&node, &to), "backend-1", "{to} is served");
    }
    // Scenario 10: an ingress IP with ipMode Proxy is not intercepted.
    assert_eq!(errno_of(&node, &format!("{PROXY_LB_IP}:80")), ENETUNREACH);

    // Scenario 4: no endpoint at all: every frontend refuses at once.
    node.write(
        "slice.yaml",
        &endpoints(&[(BACKENDS[0], "node-1", "ready: false, serving: false")]),
    );
    node.wait_for("no backends", |rows| {
        rows.iter()
            .all(|row| row["backends"].as_array().unwrap().is_empty())
    });
    for to in [
        format!("{VIP}:80"),
        format!("{NODE_IP}:{NODE_PORT}"),
        format!("{EXTERNAL_IP}:80"),
        format!("{LB_IP}:80"),
    ] {
        assert_eq!(errno_of(&node, &to), ECONNREFUSED, "{to}");
    }
}

#[test]
fn scenario_14_internal_traffic_policy_local() {
    let node = started(
        "eptb",
        &load_balancer("  internalTrafficPolicy: Local\n"),
        &endpoints(&[
            (BACKENDS[0], "node-1", "ready: true"),
            (BACKENDS[1], "node-2", "ready: true"),
        ]),
    );
    // A pod on a node with a local endpoint gets only it.
    let counts = node.answering(&format!("{VIP}:80"), 20);
    assert_eq!(counts, ["backend-1"], "{counts:?}");
    // NodePort is unaffected by iTP (rule 19): both endpoints.
    assert_eq!(
        spread(&node.tcp(&format!("{NODE_IP}:{NODE_PORT}"), 30)).len(),
        2
    );

    // No local endpoint, endpoints elsewhere: dropped, not refused (rule 28).
    node.write(
        "slice.yaml",
        &endpoints(&[(BACKENDS[1], "node-2", "ready: true")]),
    );
    node.wait_for("only the remote endpoint", |rows| {
        rows.iter().any(|row| {
            row["backends"].as_array().unwrap().len() == 1
                && row["backends"][0]["backend"]["addr"] == BACKENDS[1]
        })
    });
    assert_eq!(errno_of(&node, &format!("{VIP}:80")), EHOSTUNREACH);
    assert_eq!(
        backend_of(&node, &format!("{NODE_IP}:{NODE_PORT}")),
        "backend-2"
    );
}

#[test]
fn scenario_15_terminating_fallback() {
    let only_terminating = endpoints(&[(
        BACKENDS[0],
        "node-1",
        "ready: false, serving: true, terminating: true",
    )]);
    let node = started("eptc", &load_balancer(""), &only_terminating);
    assert_eq!(
        backend_of(&node, &format!("{VIP}:80")),
        "backend-1",
        "serving+terminating is still used"
    );

    node.write(
        "slice.yaml",
        &endpoints(&[
            (
                BACKENDS[0],
                "node-1",
                "ready: false, serving: true, terminating: true",
            ),
            (BACKENDS[1], "node-1", "ready: true"),
            (BACKENDS[2], "node-1", "ready: false, serving: false"),
        ]),
    );
    node.wait_for("the ready endpoint", |rows| {
        rows.iter()
            .any(|row| row["backends"][0]["backend"]["addr"] == BACKENDS[1])
    });
    let counts = node.answering(&format!("{VIP}:80"), 20);
    assert_eq!(counts, ["backend-2"], "only the ready one:{counts:?}");
}

#[test]
fn scenario_16_topology_hints() {
    let hinted = |zone_b: &str| {
        endpoints(&[(BACKENDS[0], "node-1", "ready: true"), (BACKENDS[1], "node-2", "ready: true")])
            .replace(
                &format!("[{}], nodeName: node-1, conditions: {{ready: true}}", BACKENDS[0]),
                &format!("[{}], nodeName: node-1, conditions: {{ready: true}}, hints: {{forZones: [{{name: zone-a}}]}}", BACKENDS[0]),
            )
            .replace(
                &format!("[{}], nodeName: node-2, conditions: {{ready: true}}", BACKENDS[1]),
                &format!("[{}], nodeName: node-2, conditions: {{ready: true}}{zone_b}", BACKENDS[1]),
            )
    };
    let node = started(
        "eptd",
        &load_balancer(""),
        &hinted(", hints: {forZones: [{name: zone-b}]}"),
    );
    let counts = node.answering(&format!("{VIP}:80"), 20);
    assert_eq!(counts, ["backend-1"], "same-zone only:{counts:?}");

    node.write("slice.yaml", &hinted(""));
    node.wait_for("both endpoints", |rows| {
        rows.iter()
            .any(|row| row["backends"].as_array().unwrap().len() == 2)
    });
    assert_eq!(
        spread(&node.tcp(&format!("{VIP}:80"), 30)).len(),
        2,
        "one endpoint lacks hints: all are used"
    );
}

#[test]
fn scenario_17_ignored_services_program_nothing_until_the_label_goes() {
    let cluster_ip = service("web", &[("http", 80, "TCP")], "");
    let labelled = cluster_ip.replace(
        "metadata: {name: web, namespace: demo}",
        "metadata: {name: web, namespace: demo, labels: {service.kubernetes.io/service-proxy-name: other}}",
    );
    let node = started(
        "epte",
        &labelled,
        &endpoints(&[(BACKENDS[0], "node-1", "ready: true")]),
    );
    assert!(node.services().is_empty());
    assert_eq!(errno_of(&node, &format!("{VIP}:80")), ENETUNREACH);

    // Each ignored variant shares its file with a marker Service on a port
    // of its own: once the marker is programmed, the agent has read the
    // variant too (one file, one read).
    const MARKER_VIP: &str = "10.96.0.99";
    for (port, ignored) in (81..).zip([
        cluster_ip.replace("metadata: {name: web, namespace: demo}", "metadata: {name: web, namespace: demo, labels: {service.kubernetes.io/headless: ''}}"),
        cluster_ip.replace(&format!("clusterIP: {VIP}"), "clusterIP: None"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {type: ExternalName, externalName: example.org}\n".to_string(),
    ]) {
        let marker = service_with("marker", MARKER_VIP, &[("http", port, "TCP")], "", "");
        node.write("svc.yaml", &format!("{ignored}---\n{marker}"));
        node.wait_for("the marker next to the ignored Service", |rows| {
            rows.iter().any(|row| {
                row["frontend"]["addr"] == MARKER_VIP && row["frontend"]["port"] == port
            })
        });
        let rows = node.services();
        assert!(
            rows.iter().all(|row| row["frontend"]["addr"] == MARKER_VIP),
            "programmed: {ignored}\n{rows:#?}"
        );
    }

    node.write("svc.yaml", &cluster_ip);
    node.wait_for("the service", |rows| {
        rows.iter().any(|row| row["frontend"]["addr"] == VIP)
    });
    assert_eq!(backend_of(&node, &format!("{VIP}:80")), "backend-1");
}

/// `GET NODE_IP:port/` from the node itself (not through the cgroup). The
/// agent opens the health server after the sync that programs the Service,
/// so a refused connect is tried again for a while.
fn health_check(node: &TestNode, port: u16) -> Value {
    let out = eventually(&format!("a health server on {port}"), || {
        proxy_tests::run_checked(
            host(&node.netns, None).args(["http-get", &format!("{NODE_IP}:{port}/any/path")]),
        )
        .map_err(|e| format!("{e:#}"))
    });
    let answer: Value = serde_json::from_str(out.trim()).unwrap();
    let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    serde_json::json!({"status": answer["status"], "body": body})
}

#[test]
fn scenario_09_health_check_node_port() {
    let service = load_balancer("  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n");
    let node = started(
        "eptf",
        &service,
        &endpoints(&[(BACKENDS[0], "node-1", "ready: true")]),
    );
    let answer = health_check(&node, 32001);
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["body"]["localEndpoints"], 1);
    assert_eq!(
        answer["body"]["service"],
        serde_json::json!({"namespace": "demo", "name": "web"})
    );
    assert_eq!(answer["body"]["serviceProxyHealthy"], true);

    // The only local endpoint is serving+terminating: 503, while traffic
    // still flows to it.
    node.write(
        "slice.yaml",
        &endpoints(&[(
            BACKENDS[0],
            "node-1",
            "ready: false, serving: true, terminating: true",
        )]),
    );
    let answer = eventually("503", || {
        let answer = health_check(&node, 32001);
        (answer["status"] == 503)
            .then(|| answer.clone())
            .ok_or(format!("still {answer}"))
    });
    assert_eq!(answer["body"]["localEndpoints"], 0, "{answer}");
    assert_eq!(backend_of(&node, &format!("{LB_IP}:80")), "backend-1");
}

#[test]
fn rules_19_23_affinity_never_crosses_into_a_frontends_other_set() {
    let affinity = "  internalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n";
    // Only the remote endpoint is ready: the NodePort (cluster set) sends
    // this client to it, and remembers that.
    let node = started(
        "eptg",
        &load_balancer(affinity),
        &endpoints(&[
            (BACKENDS[0], "node-1", "ready: false"),
            (BACKENDS[1], "node-2", "ready: true"),
        ]),
    );
    assert_eq!(
        backend_of(&node, &format!("{NODE_IP}:{NODE_PORT}")),
        "backend-2"
    );

    // A local endpoint becomes ready: the ClusterIP (iTP=Local) must use it,
    // whatever the client's affinity says for the NodePort.
    node.write(
        "slice.yaml",
        &endpoints(&[
            (BACKENDS[0], "node-1", "ready: true"),
            (BACKENDS[1], "node-2", "ready: true"),
        ]),
    );
    node.wait_for("the local endpoint", |rows| {
        rows.iter().any(|row| {
            row["frontend"]["addr"] == VIP && row["backends"].as_array().unwrap().len() == 1
        })
    });
    let counts = node.answering(&format!("{VIP}:80"), 10);
    assert_eq!(counts, ["backend-1"], "{counts:?}");
    // The NodePort keeps its own affinity.
    assert_eq!(
        spread(&node.tcp(&format!("{NODE_IP}:{NODE_PORT}"), 10))
            .keys()
            .collect::<Vec<_>>(),
        vec!["backend-2"]
    );
}

#[test]
fn rule_20_hairpin_backend_reaches_itself_through_its_service() {
    let node = started(
        "epth",
        &load_balancer(""),
        &endpoints(&[(BACKENDS[0], "node-1", "ready: true")]),
    );
    // The backend's own process (bound to its address) connects to its
    // Service. Translated at connect(), the connection never leaves the pod:
    // no hairpin NAT is involved, so the backend sees its own address.
    let result = &node.client(&["tcp", "--to", &format!("{VIP}:80"), "--bind", BACKENDS[0]])[0];
    let (name, source) = reply_parts(result);
    assert_eq!(name, "backend-1");
    assert_eq!(source, BACKENDS[0]);
    assert_eq!(result["peer"], format!("{VIP}:80"));
}

#[test]
fn rule_22_refusal_applies_to_new_flows_only() {
    let node = started(
        "epti",
        &load_balancer(""),
        &endpoints(&[(BACKENDS[0], "node-1", "ready: true")]),
    );
    let mut held = node.hold(&format!("{VIP}:80"));
    assert_eq!(held.echo("before")["echo"], "before");

    // No usable endpoint any more: new connections are refused...
    node.write(
        "slice.yaml",
        &endpoints(&[(BACKENDS[0], "node-1", "ready: false, serving: false")]),
    );
    node.wait_for("no backends", |rows| {
        rows.iter()
            .all(|row| row["backends"].as_array().unwrap().is_empty())
    });
    assert_eq!(errno_of(&node, &format!("{VIP}:80")), ECONNREFUSED);
    // ...and the established one is left alone.
    let after = held.echo("after");
    assert_eq!(after["ok"], true, "{after}");
    assert_eq!(after["echo"], "after");
}

#[test]
fn rule_15_load_balancer_ip_with_source_ranges_is_left_to_the_balancer() {
    // The socket has no source address at connect(), so ranges cannot be
    // checked there: the LB IP is not intercepted (its traffic goes to the
    // balancer, which enforces them); the other frontends are unaffected.
    let ranges = "  loadBalancerSourceRanges: [203.0.113.0/24]\n";
    let node = started(
        "eptj",
        &load_balancer(ranges),
        &endpoints(&[(BACKENDS[0], "node-1", "ready: true")]),
    );
    assert_eq!(errno_of(&node, &format!("{LB_IP}:80")), ENETUNREACH);
    assert_eq!(backend_of(&node, &format!("{VIP}:80")), "backend-1");
    assert_eq!(
        backend_of(&node, &format!("{NODE_IP}:{NODE_PORT}")),
        "backend-1"
    );
    assert_eq!(backend_of(&node, &format!("{EXTERNAL_IP}:80")), "backend-1");
}
