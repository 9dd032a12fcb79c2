//! The two-node box itself (proxy_tests::cluster), without any agent: the
//! network it builds routes what it should, keeps pods' source addresses,
//! touches nothing in the root namespace and leaves nothing behind.

use std::{path::PathBuf, process::Command, sync::Mutex};

use proxy_tests::{
    NETNS_DIR,
    clients::{Outcome, outcome},
    cluster::{Cluster, EXTERNAL_CLIENT_IP, SECOND_EXTERNAL_CLIENT_IP},
    run_checked, start_server,
};
use serde_json::Value;

const LISTENERS: [&str; 4] = ["--tcp", "0.0.0.0:9000", "--udp", "0.0.0.0:5353"];

/// The client's timeout where the answer is ICMP unreachable. The first
/// ICMP can reach the socket while `connect()` still holds it, and then
/// only the SYN retransmitted after 1 s fails the connect; 2 s would leave
/// a loaded host too little room.
const UNREACHABLE_MS: &str = "5000";

fn box_of(prefix: &str) -> Cluster {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "these tests need root (network namespaces, cgroups)"
    );
    Cluster::new(prefix).unwrap()
}

fn answered(backend: &str, source: &str) -> Outcome {
    Outcome::Answered {
        backend: backend.to_string(),
        source: source.to_string(),
    }
}

fn first(results: Vec<Value>) -> Outcome {
    outcome(&results[0])
}

#[test]
fn pods_reach_each_other_across_nodes_with_their_own_source() {
    let cluster = box_of("epba");
    let web1 = cluster
        .add_backend(1, "web-1", "10.244.1.11", &LISTENERS)
        .unwrap();
    let web2 = cluster
        .add_backend(2, "web-2", "10.244.2.11", &LISTENERS)
        .unwrap();
    let client = cluster.add_pod(1, "client", "10.244.1.2").unwrap();

    for (from, to, server) in [
        (&client, &web2, "web-2"),
        (&web2, &web1, "web-1"),
        (&client, &web1, "web-1"),
    ] {
        let tcp = from
            .run(&["tcp", "--to", &format!("{}:9000", to.ip())])
            .unwrap();
        assert_eq!(first(tcp), answered(server, from.ip()), "tcp {}", to.ip());
        let udp = from
            .run(&["udp", "--to", &format!("{}:5353", to.ip())])
            .unwrap();
        assert_eq!(first(udp), answered(server, from.ip()), "udp {}", to.ip());
    }
    assert_eq!(web1.node(), "node1");
    assert_eq!(web2.node(), "node2");
}

#[test]
fn pod_processes_run_in_their_nodes_cgroup() {
    let cluster = box_of("epbb");
    let web = cluster
        .add_backend(2, "web-2", "10.244.2.11", &LISTENERS)
        .unwrap();
    assert_eq!(cluster.node(2).cgroup().pids().len(), 1);
    assert!(cluster.node(1).cgroup().pids().is_empty());
    drop(web);
    assert!(cluster.node(2).cgroup().pids().is_empty());
}

#[test]
fn external_clients_reach_node_addresses_but_not_pods() {
    let cluster = box_of("epbc");
    let _node_servers: Vec<_> = cluster
        .nodes()
        .iter()
        .map(|node| {
            let name = format!("{}-host", node.name());
            start_server(node.netns(), &["--name", &name, "--tcp", "0.0.0.0:9000"]).unwrap()
        })
        .collect();
    let _web = cluster
        .add_backend(1, "web-1", "10.244.1.11", &LISTENERS)
        .unwrap();

    for (client, source) in [
        (cluster.external(), EXTERNAL_CLIENT_IP),
        (cluster.second_external(), SECOND_EXTERNAL_CLIENT_IP),
    ] {
        for node in cluster.nodes() {
            let to = format!("{}:9000", node.ip());
            let result = first(client.run(&["tcp", "--to", &to]).unwrap());
            assert_eq!(result, answered(&format!("{}-host", node.name()), source));
        }
        // Nothing listens there: the node's kernel refuses.
        let to = format!("{}:9001", cluster.node(1).ip());
        assert_eq!(
            first(client.run(&["tcp", "--to", &to]).unwrap()),
            Outcome::Refused
        );
        // Pod addresses are not routed from outside (the router says so).
        let result = first(
            client
                .run(&[
                    "tcp",
                    "--to",
                    "10.244.1.11:9000",
                    "--timeout-ms",
                    UNREACHABLE_MS,
                ])
                .unwrap(),
        );
        assert_eq!(result, Outcome::Unreachable);
    }
}

#[test]
fn frontend_addresses_go_where_the_router_sends_them() {
    let cluster = box_of("epbd");
    let client = cluster.external();
    let frontend = "198.18.0.10";
    let to = format!("{frontend}:80");
    // Owned by no node and not translated: node1 says unreachable at once.
    assert_eq!(
        first(
            client
                .run(&["tcp", "--to", &to, "--timeout-ms", UNREACHABLE_MS])
                .unwrap()
        ),
        Outcome::Unreachable
    );

    let mut servers = Vec::new();
    for node in cluster.nodes() {
        node.netns()
            .ip(&["addr", "add", &format!("{frontend}/32"), "dev", "lo"])
            .unwrap();
        let name = format!("{}-host", node.name());
        servers.push(
            start_server(
                node.netns(),
                &["--name", &name, "--tcp", &format!("{frontend}:80")],
            )
            .unwrap(),
        );
    }
    // The same for a ClusterIP from a pod, when its socket is not translated.
    let pod = cluster.add_pod(2, "client", "10.244.2.2").unwrap();
    let result = first(
        pod.run(&[
            "tcp",
            "--to",
            "10.96.0.10:80",
            "--timeout-ms",
            UNREACHABLE_MS,
        ])
        .unwrap(),
    );
    assert_eq!(result, Outcome::Unreachable);

    let seen = |n: usize| answered(&format!("node{n}-host"), EXTERNAL_CLIENT_IP);
    assert_eq!(first(client.run(&["tcp", "--to", &to]).unwrap()), seen(1));
    cluster
        .route_frontend(&format!("{frontend}/32"), 2)
        .unwrap();
    assert_eq!(first(client.run(&["tcp", "--to", &to]).unwrap()), seen(2));
}

/// `ip -o link` and `ip -o addr` of the root namespace and its routes.
fn root_namespace() -> String {
    let mut out = String::new();
    // Link flags, address lifetimes and counters may change on their own;
    // keep what names a link, an address or a route: the leading fields.
    for (args, kept) in [
        (&["-o", "link"][..], 2),
        (&["-o", "addr"], 4),
        (&["route"], 4),
    ] {
        let text = run_checked(Command::new("ip").args(args)).unwrap();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().take(kept).collect();
            out.push_str(&fields.join(" "));
            out.push('\n');
        }
    }
    out
}

#[test]
fn the_box_adds_nothing_to_the_root_namespace() {
    let before = root_namespace();
    let cluster = box_of("epbe");
    let _pod = cluster.add_pod(2, "web-2", "10.244.2.11").unwrap();
    assert_eq!(root_namespace(), before);
    let links = run_checked(Command::new("ip").args(["-o", "-d", "link"])).unwrap();
    let names: Vec<&str> = cluster
        .nodes()
        .iter()
        .map(|node| node.netns().name())
        .chain([cluster.router().name(), cluster.external().netns().name()])
        .collect();
    for name in names {
        assert!(
            !links.contains(name),
            "a root link is tied to namespace {name}:\n{links}"
        );
    }
}

#[test]
fn dropping_the_box_removes_everything_also_on_panic() {
    let made: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = box_of("epbf");
        let pod = cluster
            .add_backend(1, "web-1", "10.244.1.11", &LISTENERS)
            .unwrap();
        let mut paths = made.lock().unwrap();
        for node in cluster.nodes() {
            paths.push(node.netns().path());
            paths.push(node.cgroup().path().to_path_buf());
            paths.push(node.manifests().to_path_buf());
        }
        for netns in [
            cluster.router(),
            cluster.external().netns(),
            cluster.second_external().netns(),
            pod.netns(),
        ] {
            paths.push(netns.path());
        }
        assert!(paths.iter().all(|p| p.exists()), "{paths:?}");
        drop(paths);
        panic!("a failing test");
    }));
    assert!(result.is_err());
    let made = made.into_inner().unwrap();
    assert_eq!(made.len(), 10);
    let left: Vec<&PathBuf> = made.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let netns_left: Vec<_> = std::fs::read_dir(NETNS_DIR)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("epbf-{}-", std::process::id())))
        .collect();
    assert!(netns_left.is_empty(), "{netns_left:?}");
}
