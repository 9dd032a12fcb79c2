//! Maglev (DESIGN.md, "Maglev"): a new flow from outside picks its backend
//! by its hash in its frontend's table, which every node builds the same
//! from the same backends. Against the kernel: tables in the pinned outer
//! map of the real object; and traffic in the two-node box
//! (proxy_tests::cluster), one agent per node translating on `eth0`.
//!
//! The box's Service `demo/web` is a LoadBalancer (externalTrafficPolicy
//! Cluster) on port 80 -> 8080, nodePort 30080, with two backend pods on
//! each node that answer with their name.

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use proxy_common::MaglevKey;
use proxy_tests::{
    PinDir,
    clients::{HeldConnection, Outcome, outcome},
    cluster::{Cluster, EXTERNAL_CLIENT_IP, Node, Pod},
    json_lines,
    manifests::endpoint_slice,
};
use proxy_userspace::{
    explain::{ExplainMaps, PinnedLbMaps},
    maps::{Datapath as _, PinnedMaps, codec},
    programs::{self, Capacities},
};
use serde_json::Value;

const CLUSTER_IP: &str = "10.96.0.10";
const NODE_PORT: u16 = 30080;
/// In the box's frontend network, which the router sends to node1 unless
/// a test routes it elsewhere.
const LB_IP: &str = "198.18.0.30";
const BACKENDS: [(usize, &str, &str); 4] = [
    (1, "web-1", "10.244.1.11"),
    (1, "web-2", "10.244.1.12"),
    (2, "web-3", "10.244.2.11"),
    (2, "web-4", "10.244.2.12"),
];
/// Source ports of the flows compared across nodes: above the ephemeral
/// range, so no other socket of the client holds them.
const SOURCE_PORTS: [u16; 8] = [
    61_101, 61_102, 61_103, 61_104, 61_105, 61_106, 61_107, 61_108,
];
/// How long a client tries before calling an attempt failed.
const ANSWER_TIMEOUT_MS: &str = "3000";
/// How long the agents get to program a change (the manifests source
/// polls every 250 ms).
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(10);

fn service() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: {CLUSTER_IP}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP, nodePort: {NODE_PORT}}}
status:
  loadBalancer:
    ingress:
    - {{ip: {LB_IP}, ipMode: VIP}}
"
    )
}

/// A test's box and its backend pods (declared first: dropped first).
struct World {
    pods: Vec<Pod>,
    cluster: Cluster,
}

impl World {
    /// The box with [`BACKENDS`] serving `web`, and both agents started
    /// with `agent_args`.
    fn serving(prefix: &str, agent_args: &[&str]) -> World {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "these tests need root (network namespaces, cgroups, BPF)"
        );
        let mut cluster = Cluster::new(prefix).unwrap();
        let pods: Vec<Pod> = BACKENDS
            .iter()
            .map(|(n, name, ip)| {
                cluster
                    .add_backend(*n, name, ip, &["--tcp", "0.0.0.0:8080"])
                    .unwrap()
            })
            .collect();
        let endpoints: Vec<(&str, &str)> = pods.iter().map(|pod| (pod.ip(), pod.node())).collect();
        cluster.write_manifest("svc.yaml", &service()).unwrap();
        let slice = endpoint_slice("web-x1", "web", &[("tcp", 8080, "TCP")], &endpoints, "");
        cluster.write_manifest("slice.yaml", &slice).unwrap();
        cluster.start_agents(agent_args).unwrap();
        World { pods, cluster }
    }

    fn node(&self, n: usize) -> &Node {
        self.cluster.node(n)
    }

    /// The pod answering as `name`.
    fn pod_named(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.name() == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

/// The client's address with source port `port`.
fn client(port: u16) -> String {
    format!("{EXTERNAL_CLIENT_IP}:{port}")
}

/// `node`'s `explain` of a new TCP flow `src -> dst`, once its datapath
/// has a Maglev table for `dst` (waiting for the agent to program it).
fn maglev_pick(node: &Node, src: &str, dst: &str) -> Value {
    let start = Instant::now();
    loop {
        let explanation = node.explain(src, dst, "tcp").unwrap();
        if explanation["maglev"]["backend"].is_string() {
            assert_eq!(explanation["verdict"], "translate", "{explanation:#}");
            return explanation["maglev"].clone();
        }
        assert!(
            start.elapsed() < PROGRAM_TIMEOUT,
            "no Maglev pick for {src} -> {dst} on {}: {explanation:#}\nagent log:\n{}",
            node.name(),
            node.agent_log_tail(40)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// One TCP connection from the external client's port `port` to `to`,
/// closed with RST so the port is free again at once.
fn connect_from(world: &World, port: u16, to: &str) -> Outcome {
    let bind = client(port);
    let lines = json_lines(world.cluster.external().host().args([
        "tcp",
        "--to",
        to,
        "--bind",
        &bind,
        "--rst",
        "--timeout-ms",
        ANSWER_TIMEOUT_MS,
    ]))
    .unwrap();
    outcome(&lines[0])
}

/// The address (without port) of the backend that answered.
fn answering_ip(world: &World, outcome: &Outcome, what: &str) -> String {
    match outcome {
        Outcome::Answered { backend, .. } => world.pod_named(backend).ip().to_string(),
        other => panic!("{what}: not answered: {other:?}"),
    }
}

/// "10.244.1.11:8080" -> "10.244.1.11"
fn ip_of(endpoint: &Value) -> String {
    let endpoint = endpoint.as_str().unwrap();
    endpoint.split(':').next().unwrap().to_string()
}

/// The reconciler's writes against the kernel: a table is a new inner
/// map, filled in one batch and swapped in with one update.
#[test]
fn maglev_tables_are_swapped_into_the_pinned_map_whole() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (BPF maps)"
    );
    let pins = PinDir::new("mgpin").unwrap();
    let capacities = Capacities {
        services: 4096,
        backends: 1024,
        conntrack: 1024,
        nat: 1024,
    };
    // The real object: the kernel checks each table against its template.
    let _loaded = programs::Datapath::load(pins.path(), &capacities, Default::default()).unwrap();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    let key = MaglevKey {
        svc_id: 7,
        selection: 1,
    };
    let small = codec::maglev_table(&[11, 12, 11, 13, 12]);
    maps.put_maglev_table(key, &small).unwrap();
    assert_eq!(maps.maglev_tables().unwrap(), [key]);
    let read = PinnedLbMaps::open(pins.path()).unwrap();
    let entries: Vec<Option<u32>> = (0..=6).map(|i| read.maglev_entry(&key, i)).collect();
    assert_eq!(
        entries,
        [5, 11, 12, 11, 13, 12]
            .map(Some)
            .into_iter()
            .chain([None])
            .collect::<Vec<_>>(),
        "[0] = M, then M ids, nothing beyond"
    );

    // A table of another size replaces it in one update.
    let large: Vec<u32> = (100..100 + 16_381).collect();
    maps.put_maglev_table(key, &codec::maglev_table(&large))
        .unwrap();
    assert_eq!(read.maglev_entry(&key, 0), Some(16_381));
    assert_eq!(read.maglev_entry(&key, 1), Some(100));
    assert_eq!(read.maglev_entry(&key, 16_381), Some(100 + 16_380));
    assert_eq!(maps.maglev_tables().unwrap(), [key]);

    maps.delete_maglev_table(&key).unwrap();
    assert!(maps.maglev_tables().unwrap().is_empty());
    assert_eq!(read.maglev_entry(&key, 0), None);
    maps.delete_maglev_table(&key)
        .expect("deleting what is gone is success");
}

/// The same 5-tuple through node1 and, rerouted by the router, through
/// node2 reaches the same backend, as `explain` on both nodes predicts
/// (rule 17: eTP=Cluster, backends on both nodes).
#[test]
fn maglev_a_flow_lands_on_the_same_backend_through_either_node() {
    let world = World::serving("mgx", &[]);
    let lb = format!("{LB_IP}:80");
    // What both datapaths say each flow gets, before any of them is
    // tracked (a tracked flow keeps its backend whatever the table says).
    let mut expected = Vec::new();
    for port in SOURCE_PORTS {
        let picks = [1, 2].map(|n| maglev_pick(world.node(n), &client(port), &lb));
        assert_eq!(
            picks[0]["backend"],
            picks[1]["backend"],
            "explain of {} on node1 and node2: {picks:#?}",
            client(port)
        );
        assert_eq!(picks[0]["slot"], picks[1]["slot"]);
        expected.push((port, ip_of(&picks[0]["backend"])));
    }
    let distinct: BTreeSet<&String> = expected.iter().map(|(_, ip)| ip).collect();
    assert!(
        distinct.len() >= 2,
        "{} flows, all on one backend: {expected:?}",
        SOURCE_PORTS.len()
    );

    for via in [1, 2] {
        world
            .cluster
            .route_frontend(&format!("{LB_IP}/32"), via)
            .unwrap();
        for (port, want) in &expected {
            let what = format!("{} via node{via}", client(*port));
            let got = answering_ip(&world, &connect_from(&world, *port, &lb), &what);
            assert_eq!(&got, want, "{what}");
        }
    }
}

/// Scenario 20 with a new `--maglev-table-size`: every table is rebuilt
/// with the new size, established flows keep their backend (rule 29) and
/// new flows use the new tables.
#[test]
fn scenario_20_restart_with_a_new_table_size_keeps_established_flows() {
    let mut world = World::serving("mgm", &[]);
    let to = format!("{}:{NODE_PORT}", world.node(1).ip());
    let probe = client(SOURCE_PORTS[0]);
    assert_eq!(maglev_pick(world.node(1), &probe, &to)["size"], 16_381);
    let mut held = HeldConnection::tcp(world.cluster.external().host(), &to).unwrap();
    assert_eq!(held.echo("before")["echo"], "before");
    let missing_before = world.node(1).counter("missing_backend").unwrap();

    let node1 = world.cluster.node_mut(1);
    node1.kill_agent();
    node1.start_agent(&["--maglev-table-size", "251"]).unwrap();
    let start = Instant::now();
    let pick = loop {
        let pick = maglev_pick(world.node(1), &probe, &to);
        if pick["size"] == 251 {
            break pick;
        }
        assert!(
            start.elapsed() < PROGRAM_TIMEOUT,
            "node1 still has tables of {}",
            pick["size"]
        );
        thread::sleep(Duration::from_millis(100));
    };

    let after = held.echo("after");
    assert_eq!(after["echo"], "after", "{after}");
    // New flows use the new table.
    let got = answering_ip(
        &world,
        &connect_from(&world, SOURCE_PORTS[0], &to),
        "after the resize",
    );
    assert_eq!(got, ip_of(&pick["backend"]), "{pick}");
    for port in &SOURCE_PORTS[1..] {
        let outcome = connect_from(&world, *port, &to);
        assert!(
            matches!(outcome, Outcome::Answered { .. }),
            "{}: {outcome:?}",
            client(*port)
        );
    }
    assert_eq!(
        world.node(1).counter("missing_backend").unwrap(),
        missing_before
    );
}
