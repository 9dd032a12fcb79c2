//! The acceptance scenarios of docs/semantics.md that the packet-level
//! datapath decides: traffic from outside the nodes to NodePorts,
//! externalIPs and LoadBalancer IPs, in the two-node box
//! (proxy_tests::cluster), one agent per node translating on `eth0`.
//!
//! Every test has one Service `demo/web`: port 80 (TCP -> 8080, UDP ->
//! 5353) on nodePort 30080 for both protocols, over backend pods that
//! answer with their name and the source address they saw. Outcomes are
//! told apart the way the rules tell them apart: answered, refused at
//! once (rule 21), dropped (a connect that times out after
//! [`DROP_TIMEOUT_MS`]: rules 15, 18, 28) and not intercepted (the node
//! has no route for a frontend address it does not translate).

use std::{
    collections::BTreeSet,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use proxy_tests::{
    clients::{ClientProcess, HeldConnection, Outcome, outcome},
    cluster::{Cluster, EXTERNAL_CLIENT_IP, Node, Pod, SECOND_EXTERNAL_CLIENT_IP, backend_addrs},
    json_lines,
    manifests::endpoint_slice,
};

const CLUSTER_IP: &str = "10.96.0.10";
const NODE_PORT: u16 = 30080;
/// In the box's frontend network, which the router sends to node1.
const EXTERNAL_IP: &str = "198.18.0.10";
const LB_IP: &str = "198.18.0.20";
const PROXY_LB_IP: &str = "198.18.0.21";
const NO_MODE_LB_IP: &str = "198.18.0.22";
const LISTENERS: [&str; 4] = ["--tcp", "0.0.0.0:8080", "--udp", "0.0.0.0:5353"];
/// A new flow that is dropped gets no answer within this long; answered
/// ones take milliseconds.
const DROP_TIMEOUT_MS: u32 = 1000;
/// How long a client tries before calling an attempt failed.
const ANSWER_TIMEOUT_MS: u32 = 3000;
/// Rule 30 asks for one sync; the manifests source polls every 250 ms.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(5);

/// Service `web`: `kind` (NodePort, LoadBalancer, ClusterIP), `spec`
/// lines, and LoadBalancer ingress entries `(ip, ipMode)`.
fn service(kind: &str, spec: &str, ingress: &[(&str, Option<&str>)]) -> String {
    let ingress: Vec<String> = ingress
        .iter()
        .map(|(ip, mode)| match mode {
            Some(mode) => format!("    - {{ip: {ip}, ipMode: {mode}}}\n"),
            None => format!("    - {{ip: {ip}}}\n"),
        })
        .collect();
    let status = if ingress.is_empty() {
        "status: {}\n".to_string()
    } else {
        format!(
            "status:\n  loadBalancer:\n    ingress:\n{}",
            ingress.concat()
        )
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: {kind}
  clusterIP: {CLUSTER_IP}
{spec}  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP, nodePort: {NODE_PORT}}}
  - {{name: udp, port: 80, targetPort: 5353, protocol: UDP, nodePort: {NODE_PORT}}}
{status}"
    )
}

/// Which programs translate: every scenario runs once with tc alone and
/// once with XDP (generic, which runs on the box's veths) in front of tc:
/// the outcomes must not differ.
#[derive(Clone, Copy)]
enum Datapath {
    Tc,
    XdpGeneric,
}

impl Datapath {
    fn agent_args(self) -> [&'static str; 2] {
        match self {
            Datapath::Tc => ["--xdp-mode", "off"],
            Datapath::XdpGeneric => ["--xdp-mode", "generic"],
        }
    }
}

/// `#[test]`s `tc` and `xdp_generic` in a module named after each scenario.
macro_rules! in_both_datapaths {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn tc() {
                    super::$scenario(super::Datapath::Tc);
                }

                #[test]
                fn xdp_generic() {
                    super::$scenario(super::Datapath::XdpGeneric);
                }
            }
        )*
    };
}

in_both_datapaths!(
    scenario_04_no_endpoints_refuses_at_once_from_outside_and_from_pods,
    scenario_06_nodeport_cluster_policy_reaches_both_nodes_with_snat,
    scenario_07_node_addresses_outside_nodeport_addresses_do_not_serve,
    scenario_08_local_policy_keeps_the_client_source_and_drops_without_local_endpoint,
    scenario_10_load_balancer_ip_mode_proxy_is_not_intercepted,
    scenario_11_source_ranges_admit_inside_drop_outside_but_not_on_the_node_port,
    scenario_12_external_ip_owned_by_no_node_is_served_where_it_is_routed,
    scenario_18_udp_client_on_a_fixed_port_follows_a_replaced_backend,
    scenario_19_tcp_connection_survives_endpoint_removal,
    scenario_20_agent_killed_under_load_keeps_serving_and_catches_up_on_restart,
);

/// A test's box and its backend pods (declared first: dropped first).
struct World {
    pods: Vec<Pod>,
    cluster: Cluster,
    datapath: Datapath,
}

impl World {
    /// The box, backend pods `(node, name, ip)` serving [`LISTENERS`],
    /// `service` and a slice of every backend written; no agent yet.
    fn new(
        prefix: &str,
        datapath: Datapath,
        service: &str,
        backends: &[(usize, &str, &str)],
    ) -> World {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "these tests need root (network namespaces, cgroups, BPF)"
        );
        let cluster = Cluster::new(prefix).unwrap();
        let pods = backends
            .iter()
            .map(|(n, name, ip)| cluster.add_backend(*n, name, ip, &LISTENERS).unwrap())
            .collect();
        let world = World {
            pods,
            cluster,
            datapath,
        };
        world.cluster.write_manifest("svc.yaml", service).unwrap();
        let names: Vec<&str> = backends.iter().map(|(_, name, _)| *name).collect();
        world.write_endpoints(&names);
        world
    }

    /// Starts both agents (default flags, the datapath's, `agent_args`).
    fn start(mut self, agent_args: &[&str]) -> World {
        let mut args = self.datapath.agent_args().to_vec();
        args.extend(agent_args);
        self.cluster.start_agents(&args).unwrap();
        if let Datapath::XdpGeneric = self.datapath {
            for node in self.cluster.nodes() {
                let link = node.pins().join("links/xdp_generic_eth0");
                assert!(link.exists(), "XDP is not attached on {}", node.name());
            }
        }
        self
    }

    fn serving(
        prefix: &str,
        datapath: Datapath,
        service: &str,
        backends: &[(usize, &str, &str)],
    ) -> World {
        World::new(prefix, datapath, service, backends).start(&[])
    }

    fn node(&self, n: usize) -> &Node {
        self.cluster.node(n)
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.name() == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Writes the slice of `web`: the pods `names`, ready, on their nodes.
    fn write_endpoints(&self, names: &[&str]) {
        let endpoints: Vec<(&str, &str)> = names
            .iter()
            .map(|name| (self.pod(name).ip(), self.pod(name).node()))
            .collect();
        let slice = endpoint_slice(
            "web-x1",
            "web",
            &[("tcp", 8080, "TCP"), ("udp", 5353, "UDP")],
            &endpoints,
            "",
        );
        self.cluster.write_manifest("slice.yaml", &slice).unwrap();
    }

    /// [`World::write_endpoints`], then waits until both datapaths hold
    /// exactly those backends.
    fn set_endpoints(&self, names: &[&str]) {
        self.write_endpoints(names);
        let want = self.addrs(names);
        self.cluster
            .wait_for(&format!("backends {names:?}"), |rows| {
                backend_addrs(rows) == want
            })
            .unwrap();
    }

    fn addrs(&self, names: &[&str]) -> BTreeSet<String> {
        names
            .iter()
            .map(|name| self.pod(name).ip().to_string())
            .collect()
    }

    /// Rule 17 for what came through node `via` under eTP=Cluster: a
    /// backend on another node sees `via`'s address (SNAT); one on `via`
    /// itself sees the client or `via`.
    fn assert_cluster_policy_sources(&self, outcomes: &[Outcome], via: usize, client_ip: &str) {
        let via = self.node(via);
        for outcome in outcomes {
            let Outcome::Answered { backend, source } = outcome else {
                panic!("not answered through {}: {outcome:?}", via.name());
            };
            if self.pod(backend).node() == via.name() {
                assert!(
                    source == client_ip || source == via.ip(),
                    "{backend} on {} saw {source}",
                    via.name()
                );
            } else {
                assert_eq!(source, via.ip(), "{backend} is remote to {}", via.name());
            }
        }
    }
}

/// `count` TCP connections from `client` (a `netns-host` command) to
/// `to`, each given `timeout_ms`.
fn connect(mut client: Command, to: &str, count: u32, timeout_ms: u32) -> Vec<Outcome> {
    let count = count.to_string();
    let timeout = timeout_ms.to_string();
    let args = [
        "tcp",
        "--to",
        to,
        "--count",
        &count,
        "--timeout-ms",
        &timeout,
    ];
    json_lines(client.args(args))
        .unwrap()
        .iter()
        .map(outcome)
        .collect()
}

/// One TCP connection that should be answered.
fn once(client: Command, to: &str) -> Outcome {
    connect(client, to, 1, ANSWER_TIMEOUT_MS).remove(0)
}

/// One TCP connection given only [`DROP_TIMEOUT_MS`].
fn once_or_dropped(client: Command, to: &str) -> Outcome {
    connect(client, to, 1, DROP_TIMEOUT_MS).remove(0)
}

/// One UDP query from a new socket (so a new flow each time).
fn udp_once(mut client: Command, to: &str, extra: &[&str]) -> Outcome {
    let timeout = ANSWER_TIMEOUT_MS.to_string();
    client.args(["udp", "--to", to, "--timeout-ms", &timeout]);
    outcome(&json_lines(client.args(extra)).unwrap()[0])
}

fn answered(backend: &str, source: &str) -> Outcome {
    Outcome::Answered {
        backend: backend.to_string(),
        source: source.to_string(),
    }
}

/// The backends that answered; panics on an attempt that was not answered.
fn backends(outcomes: &[Outcome]) -> BTreeSet<String> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Answered { backend, .. } => backend.clone(),
            other => panic!("not answered: {other:?} (all: {outcomes:?})"),
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn node_port(node: &Node) -> String {
    format!("{}:{NODE_PORT}", node.ip())
}

fn scenario_04_no_endpoints_refuses_at_once_from_outside_and_from_pods(datapath: Datapath) {
    let world = World::serving(
        "epp4",
        datapath,
        &service(
            "LoadBalancer",
            &format!("  externalIPs: [{EXTERNAL_IP}]\n"),
            &[(LB_IP, Some("VIP"))],
        ),
        &[],
    );
    let client = world.cluster.add_pod(2, "client", "10.244.2.2").unwrap();
    let external = world.cluster.external();
    let (node1, node2) = (world.node(1), world.node(2));
    let rejected = |node: &Node| node.counter("rejected_no_backend").unwrap();
    let before = (rejected(node1), rejected(node2));

    // The router sends the externalIP and the LB IP to node1.
    let on_node1 = [
        node_port(node1),
        format!("{EXTERNAL_IP}:80"),
        format!("{LB_IP}:80"),
    ];
    for to in &on_node1 {
        assert_eq!(once(external.host(), to), Outcome::Refused, "tcp {to}");
    }
    assert_eq!(
        once(external.host(), &node_port(node2)),
        Outcome::Refused,
        "tcp {}",
        node_port(node2)
    );
    // UDP: an ICMP port unreachable, which a connected socket reports.
    assert_eq!(
        udp_once(
            external.host(),
            &format!("{EXTERNAL_IP}:80"),
            &["--connect"]
        ),
        Outcome::Refused
    );
    // The datapaths refused: a node's own stack would refuse the NodePort
    // too, so count.
    let refused_by_node1 = on_node1.len() as u64 + 1; // TCP, and UDP
    assert!(
        rejected(node1) >= before.0 + refused_by_node1,
        "node1 rejected {} -> {}",
        before.0,
        rejected(node1)
    );
    assert!(rejected(node2) > before.1, "node2 rejected nothing");

    // From a pod: the ClusterIP and node2's frontends at its socket,
    // node1's NodePort by node1's datapath.
    for to in [
        format!("{CLUSTER_IP}:80"),
        node_port(node2),
        node_port(node1),
        format!("{EXTERNAL_IP}:80"),
        format!("{LB_IP}:80"),
    ] {
        assert_eq!(once(client.host(), &to), Outcome::Refused, "pod to {to}");
    }
}

fn scenario_06_nodeport_cluster_policy_reaches_both_nodes_with_snat(datapath: Datapath) {
    let world = World::serving(
        "epp6",
        datapath,
        &service("NodePort", "", &[]),
        &[(1, "web-1", "10.244.1.11"), (2, "web-2", "10.244.2.11")],
    );
    let external = world.cluster.external();
    for via in [1, 2] {
        let to = node_port(world.node(via));
        let outcomes = connect(external.host(), &to, 30, ANSWER_TIMEOUT_MS);
        assert_eq!(backends(&outcomes), set(&["web-1", "web-2"]), "tcp {to}");
        world.assert_cluster_policy_sources(&outcomes, via, EXTERNAL_CLIENT_IP);

        // UDP: every query from a new socket is a new flow; replies come
        // back from the NodePort.
        let mut outcomes = Vec::new();
        while backends(&outcomes).len() < 2 && outcomes.len() < 30 {
            let result = json_lines(external.host().args([
                "udp",
                "--to",
                &to,
                "--timeout-ms",
                &ANSWER_TIMEOUT_MS.to_string(),
            ]))
            .unwrap()
            .remove(0);
            assert_eq!(result["from"], to.as_str(), "{result}");
            outcomes.push(outcome(&result));
        }
        assert_eq!(backends(&outcomes), set(&["web-1", "web-2"]), "udp {to}");
        world.assert_cluster_policy_sources(&outcomes, via, EXTERNAL_CLIENT_IP);
    }
}

fn scenario_07_node_addresses_outside_nodeport_addresses_do_not_serve(datapath: Datapath) {
    let world = World::new(
        "epp7",
        datapath,
        &service("NodePort", "", &[]),
        &[(1, "web-1", "10.244.1.11")],
    );
    let secondary = "192.168.0.12";
    world
        .node(1)
        .netns()
        .ip(&["addr", "add", &format!("{secondary}/24"), "dev", "eth0"])
        .unwrap();
    let mut world = world.start(&["--nodeport-addresses", "192.168.0.2/32,192.168.0.3/32"]);
    let external = world.cluster.external();
    let on_secondary = format!("{secondary}:{NODE_PORT}");
    assert_eq!(
        once(external.host(), &node_port(world.node(1))),
        answered("web-1", EXTERNAL_CLIENT_IP)
    );
    // Not a frontend: the node's own stack refuses (nothing listens).
    assert_eq!(once(external.host(), &on_secondary), Outcome::Refused);

    // The same address inside the CIDRs serves: the check above can tell.
    let node1 = world.cluster.node_mut(1);
    node1.kill_agent();
    node1.start_agent(&datapath.agent_args()).unwrap();
    let external = world.cluster.external();
    let start = Instant::now();
    loop {
        let result = once(external.host(), &on_secondary);
        if result == answered("web-1", EXTERNAL_CLIENT_IP) {
            break;
        }
        assert!(
            start.elapsed() < FOLLOW_TIMEOUT,
            "{on_secondary} with 192.168.0.0/24: {result:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn scenario_08_local_policy_keeps_the_client_source_and_drops_without_local_endpoint(
    datapath: Datapath,
) {
    let world = World::serving(
        "epp8",
        datapath,
        &service(
            "LoadBalancer",
            "  externalTrafficPolicy: Local\n",
            &[(LB_IP, Some("VIP"))],
        ),
        &[(1, "web-1", "10.244.1.11"), (2, "web-2", "10.244.2.11")],
    );
    let client = world.cluster.add_pod(2, "client", "10.244.2.2").unwrap();
    let external = world.cluster.external();
    let (node1, node2) = (world.node(1), world.node(2));
    let only = |outcomes: Vec<Outcome>, backend: &str| {
        for outcome in outcomes {
            assert_eq!(outcome, answered(backend, EXTERNAL_CLIENT_IP));
        }
    };
    only(
        connect(external.host(), &node_port(node1), 10, ANSWER_TIMEOUT_MS),
        "web-1",
    );
    only(
        connect(external.host(), &node_port(node2), 10, ANSWER_TIMEOUT_MS),
        "web-2",
    );
    // The LB IP is routed to node1.
    only(
        connect(
            external.host(),
            &format!("{LB_IP}:80"),
            10,
            ANSWER_TIMEOUT_MS,
        ),
        "web-1",
    );

    // Endpoints elsewhere only: node2 drops (rule 18), it does not refuse.
    world.set_endpoints(&["web-1"]);
    let dropped = || node2.counter("dropped_no_local_backend").unwrap();
    let before = dropped();
    assert_eq!(
        once_or_dropped(external.host(), &node_port(node2)),
        Outcome::TimedOut
    );
    assert!(dropped() > before, "node2 counted no drop");
    // A pod on node2 goes to any endpoint, keeping its address.
    for to in [node_port(node2), format!("{LB_IP}:80")] {
        assert_eq!(
            once(client.host(), &to),
            answered("web-1", client.ip()),
            "pod to {to}"
        );
    }
    only(
        connect(external.host(), &node_port(node1), 5, ANSWER_TIMEOUT_MS),
        "web-1",
    );
}

fn scenario_10_load_balancer_ip_mode_proxy_is_not_intercepted(datapath: Datapath) {
    let world = World::serving(
        "epp10",
        datapath,
        &service(
            "LoadBalancer",
            "",
            &[
                (LB_IP, Some("VIP")),
                (PROXY_LB_IP, Some("Proxy")),
                (NO_MODE_LB_IP, None),
            ],
        ),
        &[(1, "web-1", "10.244.1.11"), (2, "web-2", "10.244.2.11")],
    );
    let external = world.cluster.external();
    for ip in [LB_IP, NO_MODE_LB_IP] {
        let outcomes = connect(external.host(), &format!("{ip}:80"), 10, ANSWER_TIMEOUT_MS);
        world.assert_cluster_policy_sources(&outcomes, 1, EXTERNAL_CLIENT_IP);
    }
    // Left to the balancer: node1 routes it, and has no route for it.
    assert_eq!(
        once(external.host(), &format!("{PROXY_LB_IP}:80")),
        Outcome::Unreachable
    );
}

fn scenario_11_source_ranges_admit_inside_drop_outside_but_not_on_the_node_port(
    datapath: Datapath,
) {
    let world = World::serving(
        "epp11",
        datapath,
        &service(
            "LoadBalancer",
            "  loadBalancerSourceRanges: [203.0.113.0/24]\n",
            &[(LB_IP, Some("VIP"))],
        ),
        &[(1, "web-1", "10.244.1.11"), (2, "web-2", "10.244.2.11")],
    );
    let (inside, outside) = (world.cluster.external(), world.cluster.second_external());
    let lb = format!("{LB_IP}:80");
    let outcomes = connect(inside.host(), &lb, 5, ANSWER_TIMEOUT_MS);
    world.assert_cluster_policy_sources(&outcomes, 1, EXTERNAL_CLIENT_IP);

    let node1 = world.node(1);
    let before = node1.counter("dropped_source_range").unwrap();
    assert_eq!(once_or_dropped(outside.host(), &lb), Outcome::TimedOut);
    assert!(
        node1.counter("dropped_source_range").unwrap() > before,
        "node1 counted no source-range drop"
    );
    // Rule 15: the ranges do not apply to the NodePort.
    for via in [1, 2] {
        let outcomes = connect(
            outside.host(),
            &node_port(world.node(via)),
            5,
            ANSWER_TIMEOUT_MS,
        );
        world.assert_cluster_policy_sources(&outcomes, via, SECOND_EXTERNAL_CLIENT_IP);
    }
}

fn scenario_12_external_ip_owned_by_no_node_is_served_where_it_is_routed(datapath: Datapath) {
    let world = World::serving(
        "epp12",
        datapath,
        &service(
            "ClusterIP",
            &format!("  externalIPs: [{EXTERNAL_IP}]\n"),
            &[],
        ),
        &[(1, "web-1", "10.244.1.11"), (2, "web-2", "10.244.2.11")],
    );
    let external = world.cluster.external();
    let to = format!("{EXTERNAL_IP}:80");
    for via in [1, 2] {
        world
            .cluster
            .route_frontend(&format!("{EXTERNAL_IP}/32"), via)
            .unwrap();
        let outcomes = connect(external.host(), &to, 40, ANSWER_TIMEOUT_MS);
        assert_eq!(
            backends(&outcomes),
            set(&["web-1", "web-2"]),
            "via node{via}"
        );
        world.assert_cluster_policy_sources(&outcomes, via, EXTERNAL_CLIENT_IP);
    }
}

/// Reads `client`'s lines until one satisfies `wanted`; panics after
/// `timeout` with what it read.
fn wait_for_line(client: &ClientProcess, timeout: Duration, wanted: impl Fn(&Outcome) -> bool) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_line(left) {
            Ok(line) if wanted(&outcome(&line)) => return,
            Ok(line) => seen.push(outcome(&line)),
            Err(e) => panic!("{e:#}; before that: {seen:?}"),
        }
    }
}

fn scenario_18_udp_client_on_a_fixed_port_follows_a_replaced_backend(datapath: Datapath) {
    let world = World::new(
        "epp18",
        datapath,
        &service("NodePort", "", &[]),
        &[(2, "web-2", "10.244.2.11"), (1, "web-3", "10.244.1.12")],
    );
    world.write_endpoints(&["web-2"]);
    let world = world.start(&[]);
    let to = node_port(world.node(1));
    let bind = format!("{EXTERNAL_CLIENT_IP}:40053");
    let stream = ClientProcess::spawn(world.cluster.external().host().args([
        "udp",
        "--to",
        &to,
        "--bind",
        &bind,
        "--count",
        "600",
        "--interval-ms",
        "100",
        // Every answer after the switch must come: room for a loaded host.
        "--timeout-ms",
        "2000",
    ]))
    .unwrap();
    let old = answered("web-2", world.node(1).ip());
    wait_for_line(&stream, FOLLOW_TIMEOUT, |o| *o == old);

    // web-2 keeps running: only the datapath can move the flow.
    world.write_endpoints(&["web-3"]);
    let new = |o: &Outcome| matches!(o, Outcome::Answered { backend, .. } if backend == "web-3");
    wait_for_line(&stream, FOLLOW_TIMEOUT, new);
    for _ in 0..5 {
        let line = stream.next_line(FOLLOW_TIMEOUT).unwrap();
        assert!(new(&outcome(&line)), "after the switch: {line}");
    }
}

/// Held TCP connections through node1's NodePort, one to a local backend
/// (`web-1`) and one to a remote one (`web-2`, SNAT).
fn hold_local_and_remote(world: &World) -> Vec<HeldConnection> {
    let to = node_port(world.node(1));
    let mut held: Vec<HeldConnection> = Vec::new();
    for _ in 0..40 {
        let connection = HeldConnection::tcp(world.cluster.external().host(), &to).unwrap();
        let backend = connection.backend();
        if ["web-1", "web-2"].contains(&backend.as_str())
            && !held.iter().any(|h| h.backend() == backend)
        {
            held.push(connection);
        }
        if held.len() == 2 {
            return held;
        }
    }
    panic!("40 connections did not reach web-1 and web-2");
}

/// A flow that started under tc keeps working after the agent restarts
/// with XDP in front, and the other way round: both use the same
/// conntrack (issue: XDP fast path).
#[test]
fn established_flows_survive_switching_between_tc_and_xdp() {
    let mut world = World::serving(
        "eppx",
        Datapath::Tc,
        &service("NodePort", "", &[]),
        &[(1, "web-1", "10.244.1.11"), (2, "web-2", "10.244.2.11")],
    );
    let mut held = hold_local_and_remote(&world);
    for (mode, xdp_link) in [("generic", true), ("off", false)] {
        let node1 = world.cluster.node_mut(1);
        node1.kill_agent();
        node1.start_agent(&["--xdp-mode", mode]).unwrap();
        let link = node1.pins().join("links/xdp_generic_eth0");
        assert_eq!(link.exists(), xdp_link, "XDP link with --xdp-mode {mode}");
        for connection in &mut held {
            let line = format!("after --xdp-mode {mode}");
            let echo = connection.echo(&line);
            assert_eq!(echo["echo"], line, "{}: {echo}", connection.backend());
        }
    }
    let outcomes = connect(
        world.cluster.external().host(),
        &node_port(world.node(1)),
        30,
        ANSWER_TIMEOUT_MS,
    );
    assert_eq!(backends(&outcomes), set(&["web-1", "web-2"]));
}

fn scenario_19_tcp_connection_survives_endpoint_removal(datapath: Datapath) {
    let world = World::serving(
        "epp19",
        datapath,
        &service("NodePort", "", &[]),
        &[
            (1, "web-1", "10.244.1.11"),
            (2, "web-2", "10.244.2.11"),
            (2, "web-3", "10.244.2.12"),
        ],
    );
    let to = node_port(world.node(1));
    let mut held = hold_local_and_remote(&world);
    for connection in &mut held {
        assert_eq!(connection.echo("before")["echo"], "before");
    }

    world.set_endpoints(&["web-3"]);
    for connection in &mut held {
        let after = connection.echo("after");
        assert_eq!(after["echo"], "after", "{}: {after}", connection.backend());
    }
    let outcomes = connect(world.cluster.external().host(), &to, 10, ANSWER_TIMEOUT_MS);
    assert_eq!(backends(&outcomes), set(&["web-3"]));
}

/// Checks that every attempt `load` printed so far was answered, then
/// reads `more` attempts and checks them too.
fn still_answering(load: &ClientProcess, more: usize, when: &str) {
    let mut lines = load.pending_lines().unwrap();
    for _ in 0..more {
        lines.push(load.next_line(FOLLOW_TIMEOUT).unwrap());
    }
    for line in lines {
        assert!(
            matches!(outcome(&line), Outcome::Answered { .. }),
            "{when}: {line}"
        );
    }
}

fn scenario_20_agent_killed_under_load_keeps_serving_and_catches_up_on_restart(datapath: Datapath) {
    let mut world = World::new(
        "epp20",
        datapath,
        &service("NodePort", "", &[]),
        &[
            (1, "web-1", "10.244.1.11"),
            (2, "web-2", "10.244.2.11"),
            (1, "web-3", "10.244.1.12"),
        ],
    );
    world.write_endpoints(&["web-1", "web-2"]);
    world = world.start(&[]);
    let to = node_port(world.node(1));
    let external = world.cluster.external();
    let mut held = HeldConnection::tcp(external.host(), &to).unwrap();
    let load = ClientProcess::spawn(external.host().args([
        "tcp",
        "--to",
        &to,
        "--count",
        "100000",
        "--interval-ms",
        "50",
        "--timeout-ms",
        "2000",
    ]))
    .unwrap();
    still_answering(&load, 5, "before the kill");

    world.cluster.node_mut(1).kill_agent();
    still_answering(&load, 10, "agent down");
    assert_eq!(held.echo("down")["echo"], "down");

    // A change while node1's agent is down: node2 applies it, node1 not.
    world.write_endpoints(&["web-1", "web-3"]);
    let want = world.addrs(&["web-1", "web-3"]);
    world
        .node(2)
        .wait_for("web-3 instead of web-2", |rows| backend_addrs(rows) == want)
        .unwrap();
    still_answering(&load, 5, "agent down, change pending");

    world.cluster.node_mut(1).restart_agent().unwrap();
    world
        .node(1)
        .wait_for("the change made while down", |rows| {
            backend_addrs(rows) == want
        })
        .unwrap();
    still_answering(&load, 10, "after the restart");
    let outcomes = connect(world.cluster.external().host(), &to, 40, ANSWER_TIMEOUT_MS);
    assert_eq!(backends(&outcomes), set(&["web-1", "web-3"]));
    let after = held.echo("after");
    assert_eq!(after["echo"], "after", "{after}");
}
