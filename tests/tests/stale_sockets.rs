//! Stale socket termination (rule 30, scenario 18 for pods): a connected
//! socket's peer is the backend its `connect()` was translated to; when
//! that backend is removed, the agent destroys the socket so the
//! application gets ECONNABORTED and connects again to a live backend.
//! UDP always; TCP only with `--destroy-tcp-sockets-to-removed-backends`
//! (rule 29 otherwise: an established connection keeps its backend).
//!
//! The box of proxy_tests::cluster, only node1's agent running: the client
//! and the backends are pods on node1, each in its own network namespace
//! (not the agent's), so the agent must find them through its cgroup.
//! Removed backends keep running: only the agent can move a socket.

use std::{
    thread,
    time::{Duration, Instant},
};

use proxy_tests::{
    clients::{ClientProcess, HeldConnection, Outcome, outcome},
    cluster::{Cluster, Pod, backend_addrs},
    host_in, json_lines,
    manifests::{endpoint_slice, service_with},
};
use serde_json::Value;

const CLUSTER_IP: &str = "10.96.0.10";
const FRONTEND: &str = "10.96.0.10:80";
const CLIENT_IP: &str = "10.244.1.2";
const LISTENERS: [&str; 4] = ["--tcp", "0.0.0.0:8080", "--udp", "0.0.0.0:5353"];
const ECONNABORTED: i64 = libc::ECONNABORTED as i64;
/// Generous: the manifests source polls every 250 ms and one sync takes
/// milliseconds; this only bounds a failing test.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
const TCP_FLAG: &str = "--destroy-tcp-sockets-to-removed-backends";

/// The box, backend pods `web-1` and `web-2` on node1, a client pod, and
/// Service `web` (TCP 80 -> 8080, UDP 80 -> 5353) over `web-1`, with
/// node1's agent started with `agent_args`. Backends declared first: they
/// drop before the cluster.
struct World {
    client: Pod,
    backends: Vec<Pod>,
    cluster: Cluster,
}

impl World {
    fn new(prefix: &str, agent_args: &[&str]) -> World {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "these tests need root (network namespaces, cgroups, BPF)"
        );
        let cluster = Cluster::new(prefix).unwrap();
        let backends = [("web-1", "10.244.1.11"), ("web-2", "10.244.1.12")]
            .iter()
            .map(|(name, ip)| cluster.add_backend(1, name, ip, &LISTENERS).unwrap())
            .collect();
        let client = cluster.add_pod(1, "client", CLIENT_IP).unwrap();
        let service = service_with(
            "web",
            CLUSTER_IP,
            &[("tcp", 80, "TCP"), ("udp", 80, "UDP")],
            "",
            "",
        );
        cluster.write_manifest("svc.yaml", &service).unwrap();
        let mut world = World {
            client,
            backends,
            cluster,
        };
        world.write_endpoints("web-1");
        // Only node1's agent: node2 plays no part here.
        world.cluster.node_mut(1).start_agent(agent_args).unwrap();
        world
    }

    fn backend(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .find(|pod| pod.name() == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The slice of `web`: only `name`.
    fn write_endpoints(&self, name: &str) {
        let pod = self.backend(name);
        let slice = endpoint_slice(
            "web-x1",
            "web",
            &[("tcp", 8080, "TCP"), ("udp", 5353, "UDP")],
            &[(pod.ip(), pod.node())],
            "",
        );
        self.cluster.write_manifest("slice.yaml", &slice).unwrap();
    }

    /// Replaces the endpoint with `name` and waits until node1's datapath
    /// serves only it.
    fn replace_endpoint(&self, name: &str) {
        self.write_endpoints(name);
        let want = [self.backend(name).ip().to_string()].into();
        self.cluster
            .node(1)
            .wait_for(&format!("only {name}"), |rows| backend_addrs(rows) == want)
            .unwrap();
    }

    /// node1's `ebpf_proxy_stale_sockets_destroyed_total{protocol}`, 0
    /// before any was counted.
    fn destroyed(&self, protocol: &str) -> u64 {
        let node = self.cluster.node(1);
        let get =
            json_lines(host_in(node.netns(), None).args(["http-get", "127.0.0.1:10249/metrics"]))
                .unwrap();
        let body = get[0]["body"].as_str().unwrap_or_default().to_string();
        let prefix =
            format!("ebpf_proxy_stale_sockets_destroyed_total{{protocol=\"{protocol}\"}} ");
        body.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |value| value.trim().parse().unwrap())
    }

    /// Waits until node1's agent counted `protocol` sockets destroyed.
    fn wait_destroyed(&self, protocol: &str) -> u64 {
        let start = Instant::now();
        loop {
            let destroyed = self.destroyed(protocol);
            if destroyed > 0 {
                return destroyed;
            }
            assert!(
                start.elapsed() < EVENT_TIMEOUT,
                "no {protocol} socket destroyed; agent log:\n{}",
                self.cluster.node(1).agent_log_tail(40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client on one connected UDP socket from `bind` (a fixed port) to
    /// `to`, one query every 100 ms, connecting again after an error.
    fn udp_stream(&self, to: &str, bind: &str) -> ClientProcess {
        ClientProcess::spawn(self.client.host().args([
            "udp",
            "--to",
            to,
            "--bind",
            bind,
            "--connect",
            "--reconnect",
            "--count",
            "1200",
            "--interval-ms",
            "100",
            "--timeout-ms",
            "2000",
        ]))
        .unwrap()
    }
}

/// Reads lines until one satisfies `wanted`; returns it and the lines
/// before it.
fn read_until(
    stream: &ClientProcess,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> (Value, Vec<Value>) {
    let start = Instant::now();
    let mut before = Vec::new();
    loop {
        let line = stream.next_line(EVENT_TIMEOUT).unwrap();
        if wanted(&line) {
            return (line, before);
        }
        assert!(
            start.elapsed() < EVENT_TIMEOUT,
            "no {what} within {EVENT_TIMEOUT:?}; last lines: {:?}",
            &before[before.len().saturating_sub(5)..]
        );
        before.push(line);
    }
}

fn answered_by(line: &Value, backend: &str) -> bool {
    matches!(outcome(line), Outcome::Answered { backend: b, .. } if b == backend)
}

/// `addr` as an IPv4-mapped IPv6 address, for an AF_INET6 socket.
fn mapped(addr: &str) -> String {
    format!("[::ffff:{addr}]")
}

#[test]
fn scenario_18_connected_udp_socket_is_aborted_and_reconnects_to_the_new_backend() {
    let world = World::new("sds18", &[]);
    // An IPv4 socket, and an IPv6 one reaching the Service through
    // IPv4-mapped addresses (rule 8's sockets of either family).
    let v4 = (FRONTEND.to_string(), format!("{CLIENT_IP}:40018"));
    let v6 = (
        format!("{}:80", mapped(CLUSTER_IP)),
        format!("{}:40021", mapped(CLIENT_IP)),
    );
    let streams: Vec<(ClientProcess, &(String, String))> = [&v4, &v6]
        .into_iter()
        .map(|client| (world.udp_stream(&client.0, &client.1), client))
        .collect();
    for (stream, _) in &streams {
        read_until(stream, "answer from web-1", |line| {
            answered_by(line, "web-1")
        });
    }
    // The same pod talking to web-1 by its address: not the proxy's
    // socket, not touched.
    let direct_to = format!("{}:5353", world.backend("web-1").ip());
    let direct = world.udp_stream(&direct_to, &format!("{CLIENT_IP}:40020"));
    read_until(&direct, "direct answer from web-1", |line| {
        answered_by(line, "web-1")
    });

    world.write_endpoints("web-2");
    for (stream, (frontend, bind)) in &streams {
        let (aborted, before) = read_until(stream, "ECONNABORTED", |line| {
            line["errno"].as_i64() == Some(ECONNABORTED)
        });
        for line in &before {
            assert!(answered_by(line, "web-1"), "before the abort: {line}");
        }
        assert!(aborted["reconnect_error"].is_null(), "{aborted}");
        // The next answers come from web-2, to the same source port.
        for _ in 0..5 {
            let line = stream.next_line(EVENT_TIMEOUT).unwrap();
            assert!(answered_by(&line, "web-2"), "after the abort: {line}");
            assert_eq!(line["local"], *bind, "{line}");
            assert_eq!(
                line["from"], *frontend,
                "the application sees the frontend: {line}"
            );
        }
    }
    assert_eq!(world.destroyed("udp"), 2);
    for line in direct.pending_lines().unwrap() {
        assert!(answered_by(&line, "web-1"), "direct: {line}");
    }
    let line = direct.next_line(EVENT_TIMEOUT).unwrap();
    assert!(answered_by(&line, "web-1"), "direct: {line}");
    assert!(
        world
            .cluster
            .node(1)
            .agent_log_tail(20)
            .contains("destroyed sockets connected to removed backends"),
        "{}",
        world.cluster.node(1).agent_log_tail(20)
    );
}

/// A backend removed while the agent was down: the first sync after the
/// restart deletes it, and its sockets go then.
#[test]
fn udp_socket_to_a_backend_removed_while_the_agent_was_down_is_aborted_on_restart() {
    let mut world = World::new("sdsr", &[]);
    let stream = world.udp_stream(FRONTEND, &format!("{CLIENT_IP}:40022"));
    read_until(&stream, "answer from web-1", |line| {
        answered_by(line, "web-1")
    });
    world.cluster.node_mut(1).kill_agent();
    world.write_endpoints("web-2");
    // Nothing moves the socket while the agent is down: the pinned
    // datapath keeps serving web-1.
    for _ in 0..5 {
        let line = stream.next_line(EVENT_TIMEOUT).unwrap();
        assert!(answered_by(&line, "web-1"), "agent down: {line}");
    }

    world.cluster.node_mut(1).restart_agent().unwrap();
    let (aborted, _) = read_until(&stream, "ECONNABORTED", |line| {
        line["errno"].as_i64() == Some(ECONNABORTED)
    });
    assert!(aborted["reconnect_error"].is_null(), "{aborted}");
    let line = stream.next_line(EVENT_TIMEOUT).unwrap();
    assert!(answered_by(&line, "web-2"), "after the abort: {line}");
}

/// With the flag, a TCP connection to a removed backend is aborted; new
/// connections go to the live one.
#[test]
fn tcp_socket_to_a_removed_backend_is_aborted_with_the_flag() {
    let world = World::new("sdst", &[TCP_FLAG]);
    let mut held = HeldConnection::tcp(world.client.host(), FRONTEND).unwrap();
    assert_eq!(held.backend(), "web-1");
    assert_eq!(held.echo("before")["echo"], "before");

    world.replace_endpoint("web-2");
    assert_eq!(world.wait_destroyed("tcp"), 1);
    let after = held.echo("after");
    assert_eq!(after["errno"].as_i64(), Some(ECONNABORTED), "{after}");
    let again = HeldConnection::tcp(world.client.host(), FRONTEND).unwrap();
    assert_eq!(again.backend(), "web-2");
}

/// Without the flag (the default), the sync that aborts a UDP socket to the
/// removed backend leaves a TCP connection to it alone (rule 29).
#[test]
fn tcp_socket_to_a_removed_backend_survives_without_the_flag() {
    let world = World::new("sdsu", &[]);
    let mut held = HeldConnection::tcp(world.client.host(), FRONTEND).unwrap();
    assert_eq!(held.backend(), "web-1");
    let stream = world.udp_stream(FRONTEND, &format!("{CLIENT_IP}:40019"));
    read_until(&stream, "answer from web-1", |line| {
        answered_by(line, "web-1")
    });

    world.replace_endpoint("web-2");
    assert_eq!(world.wait_destroyed("udp"), 1);
    let after = held.echo("after");
    assert_eq!(after["echo"], "after", "{after}");
    assert_eq!(world.destroyed("tcp"), 0);
}
