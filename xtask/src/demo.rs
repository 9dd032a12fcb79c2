//! `cargo xtask demo`: a two-node cluster in a box (proxy_tests::cluster),
//! one agent per node, serving the manifests in `deploy/examples/demo/`.
//!
//! ```text
//!  external client 203.0.113.2 ── router ──┬─ node1 192.168.0.2: client 10.244.1.2, web-1 10.244.1.11, web-2 10.244.1.12
//!       (198.18.0.0/24 routed to node1)    └─ node2 192.168.0.3: web-3 10.244.2.11
//! ```
//! It shows, and fails unless it sees:
//! - from the client pod, the ClusterIP 10.96.0.10 spreading HTTP over the
//!   three pods (socket-level translation), UDP replies that come from the
//!   ClusterIP and a getpeername() that shows it;
//! - from the external client, NodePort 30080 and LoadBalancer IP
//!   198.18.0.10 of `web-cluster` (eTP=Cluster) answered by pods on both
//!   nodes, web-3 seeing node1's address (SNAT); LoadBalancer IP
//!   198.18.0.11 of `web-local` (eTP=Local) answered by node1's pods only,
//!   and NodePort 30081 on node2 by web-3 only, all seeing 203.0.113.2.
//!
//! Every namespace is new and none is linked to the root namespace, so
//! traffic that is not translated goes nowhere. Everything is named
//! `epd-<pid>-<n>`; cleanup runs on success, on failure and on
//! Ctrl-C/SIGTERM, and leftovers of a crashed demo (whose pid is gone) are
//! removed at the start.

use crate::{cargo, run, setup, workspace_root};
use anyhow::{Context, Result, bail};
use proxy_tests::{
    agent_bin,
    clients::{Outcome, outcome},
    cluster::{Cluster, EXTERNAL_CLIENT_IP, Pod},
    json_lines, remove_leftovers, run_checked,
};
use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    process::Command,
};

const PREFIX: &str = "epd";
/// Requests to the ClusterIP and to each external frontend, by default.
pub const REQUESTS: u32 = 60;
const CLIENT_IP: &str = "10.244.1.2";
/// The pods: (node, name, address).
const BACKENDS: [(usize, &str, &str); 3] = [
    (1, "web-1", "10.244.1.11"),
    (1, "web-2", "10.244.1.12"),
    (2, "web-3", "10.244.2.11"),
];
const LISTENERS: [&str; 6] = [
    "--http",
    "0.0.0.0:8080",
    "--tcp",
    "0.0.0.0:9000",
    "--udp",
    "0.0.0.0:5353",
];
const CLUSTER_IP: &str = "10.96.0.10";
/// Service web-cluster (eTP=Cluster): its NodePort and LoadBalancer IP.
const CLUSTER_NODE_PORT: u16 = 30080;
const CLUSTER_LB_IP: &str = "198.18.0.10";
/// Service web-local (eTP=Local): its NodePort and LoadBalancer IP.
const LOCAL_NODE_PORT: u16 = 30081;
const LOCAL_LB_IP: &str = "198.18.0.11";

pub fn demo(requests: u32) -> Result<()> {
    for what in remove_leftovers(PREFIX, false) {
        println!("demo: removed leftover {what}");
    }
    ctrlc::set_handler(|| {
        eprintln!("\ndemo: interrupted, cleaning up");
        for what in remove_leftovers(PREFIX, true) {
            eprintln!("demo: removed {what}");
        }
        std::process::exit(130);
    })
    .context("install the Ctrl-C handler")?;
    setup::setup()?;
    println!("demo: building ebpf-proxy and netns-host");
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "proxy-userspace",
        "-p",
        "proxy-tests",
    ]))?;
    let result = run_demo(requests);
    // The guards in run_demo have cleaned up; this is the safety net.
    for what in remove_leftovers(PREFIX, true) {
        println!("demo: removed leftover {what}");
    }
    match &result {
        Ok(()) => println!("demo: passed"),
        Err(_) => println!("demo: FAILED"),
    }
    result
}

fn run_demo(requests: u32) -> Result<()> {
    // Drop order is the reverse of declaration: pods, then the cluster
    // (agents, pins, cgroups, manifests, namespaces).
    let mut cluster = Cluster::new(PREFIX)?;
    let client = cluster.add_pod(1, "client", CLIENT_IP)?;
    let mut backends: Vec<Pod> = Vec::new();
    for (node, name, ip) in BACKENDS {
        backends.push(cluster.add_backend(node, name, ip, &LISTENERS)?);
    }
    for node in cluster.nodes() {
        let pods: Vec<String> = backends
            .iter()
            .chain([&client])
            .filter(|pod| pod.node() == node.name())
            .map(|pod| format!("{} {}", pod.name(), pod.ip()))
            .collect();
        println!(
            "demo: {} {} (netns {}): {}",
            node.name(),
            node.ip(),
            node.netns().name(),
            pods.join(", ")
        );
    }
    println!(
        "demo: external client {EXTERNAL_CLIENT_IP} (netns {}) behind the router (netns {})",
        cluster.external().netns().name(),
        cluster.router().name()
    );

    // The network works without the proxy: the client reaches each pod.
    for pod in &backends {
        let r = client.run(&["http", "--to", &format!("{}:8080", pod.ip())])?;
        let body = r.first().and_then(|v| v["body"].as_str()).unwrap_or("");
        if body.trim() != pod.name() {
            bail!("direct request to {}:8080 failed: {r:?}", pod.ip());
        }
        println!("demo: direct   {}:8080 -> {}", pod.ip(), body.trim());
    }
    // And without the proxy the frontends lead nowhere.
    let node1_ip = cluster.node(1).ip();
    let unserved = [
        (client.host(), format!("{CLUSTER_IP}:80")),
        (
            cluster.external().host(),
            format!("{node1_ip}:{CLUSTER_NODE_PORT}"),
        ),
        (cluster.external().host(), format!("{CLUSTER_LB_IP}:80")),
    ];
    for (mut from, to) in unserved {
        let r = json_lines(from.args(tcp_args(&to, 1)))?;
        if r[0]["ok"] == true {
            bail!("{to} answered before the agents ran: {}", r[0]);
        }
        println!(
            "demo: without the agents {to} -> {} (nothing serves it)",
            r[0]["error"].as_str().unwrap_or("error")
        );
    }

    let examples = workspace_root().join("deploy/examples/demo");
    for entry in fs::read_dir(&examples).with_context(|| format!("read {}", examples.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = fs::read_to_string(&path)?;
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            // nodes.yaml replaces the box's own Node objects.
            cluster.write_manifest(&file, &text)?;
        }
    }
    println!(
        "demo: starting one agent per node (--devices eth0, manifests from {})",
        examples.display()
    );
    cluster.start_agents(&[])?;
    println!("demo: agents healthy (/healthz 200)");

    let mut problems = Vec::new();
    cluster_ip_part(&client, requests, &mut problems)?;
    external_part(&cluster, requests, &mut problems)?;

    let node1 = cluster.node(1);
    let bpffs = node1.pins().to_string_lossy().into_owned();
    for what in ["services", "counters"] {
        println!("$ ebpf-proxy {what} --bpffs {bpffs}   # node1");
        match run_checked(Command::new(agent_bin()).args([what, "--bpffs", &bpffs])) {
            Ok(out) => print!("{out}"),
            Err(e) => problems.push(format!("ebpf-proxy {what}: {e:#}")),
        }
    }

    if !problems.is_empty() {
        let logs: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|node| format!("{} agent log:\n{}", node.name(), node.agent_log_tail(20)))
            .collect();
        bail!("{}\n{}", problems.join("\n"), logs.join("\n"));
    }
    Ok(())
}

fn tcp_args(to: &str, count: u32) -> Vec<String> {
    ["tcp", "--to", to, "--count", &count.to_string()]
        .map(String::from)
        .to_vec()
}

/// HTTP, UDP and TCP from the client pod to the ClusterIP.
fn cluster_ip_part(client: &Pod, requests: u32, problems: &mut Vec<String>) -> Result<()> {
    let results = client.run(&[
        "http",
        "--to",
        &format!("{CLUSTER_IP}:80"),
        "--count",
        &requests.to_string(),
    ])?;
    let mut spread: BTreeMap<String, u32> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        if r["ok"] == true && r["status"] == 200 {
            let backend = r["body"].as_str().unwrap_or("").trim().to_string();
            println!("request {:>2} -> {backend}", i + 1);
            *spread.entry(backend).or_default() += 1;
        } else {
            println!("request {:>2} -> FAILED {r}", i + 1);
            problems.push(format!("request {} failed: {r}", i + 1));
        }
    }
    println!("spread over {} requests to {CLUSTER_IP}:80:", results.len());
    for (backend, n) in &spread {
        println!(
            "  {backend}: {n} ({:.1}%)",
            100.0 * f64::from(*n) / results.len().max(1) as f64
        );
    }
    if spread.len() < BACKENDS.len() {
        problems.push(format!(
            "only {} of {} pods answered",
            spread.len(),
            BACKENDS.len()
        ));
    }

    // UDP: the reply must appear to come from the ClusterIP (recvmsg4).
    let want_from = format!("{CLUSTER_IP}:53");
    let udp = client.run(&[
        "udp",
        "--to",
        &want_from,
        "--count",
        "3",
        "--interval-ms",
        "50",
    ])?;
    check_replies(&udp, "udp query", "from", &want_from, problems);

    // TCP echo port: getpeername() must show the ClusterIP (getpeername4).
    let want_peer = format!("{CLUSTER_IP}:7");
    let tcp = client.run(&["tcp", "--to", &want_peer, "--count", "3"])?;
    check_replies(&tcp, "tcp echo ", "peer", &want_peer, problems);
    Ok(())
}

/// What the external client expects from one frontend: which pods may
/// answer (all of them must, over the connections made) and which source
/// address each of them must see.
struct ExternalCheck {
    to: String,
    what: &'static str,
    sees: Vec<(&'static str, Vec<String>)>,
}

fn external_part(cluster: &Cluster, requests: u32, problems: &mut Vec<String>) -> Result<()> {
    let node1_ip = cluster.node(1).ip();
    let node2_ip = cluster.node(2).ip();
    let client = EXTERNAL_CLIENT_IP.to_string();
    // Under eTP=Cluster a pod on the node the client went through may see
    // the client (no SNAT needed) or that node; one on another node sees
    // that node.
    let cluster_policy = |via: &str| -> Vec<(&'static str, Vec<String>)> {
        BACKENDS
            .iter()
            .map(|(node, name, _)| {
                let local = cluster.node(*node).ip() == via;
                let sources = if local {
                    vec![client.clone(), via.to_string()]
                } else {
                    vec![via.to_string()]
                };
                (*name, sources)
            })
            .collect()
    };
    let checks = [
        ExternalCheck {
            to: format!("{node1_ip}:{CLUSTER_NODE_PORT}"),
            what: "web-cluster NodePort on node1 (eTP=Cluster)",
            sees: cluster_policy(node1_ip),
        },
        ExternalCheck {
            to: format!("{CLUSTER_LB_IP}:80"),
            what: "web-cluster LoadBalancer IP, routed to node1 (eTP=Cluster)",
            sees: cluster_policy(node1_ip),
        },
        ExternalCheck {
            to: format!("{LOCAL_LB_IP}:80"),
            what: "web-local LoadBalancer IP, routed to node1 (eTP=Local)",
            sees: vec![
                ("web-1", vec![client.clone()]),
                ("web-2", vec![client.clone()]),
            ],
        },
        ExternalCheck {
            to: format!("{node2_ip}:{LOCAL_NODE_PORT}"),
            what: "web-local NodePort on node2 (eTP=Local)",
            sees: vec![("web-3", vec![client.clone()])],
        },
    ];
    for check in checks {
        let results = json_lines(
            cluster
                .external()
                .host()
                .args(tcp_args(&check.to, requests)),
        )?;
        println!(
            "external {EXTERNAL_CLIENT_IP} -> {} ({}), {} connections:",
            check.to,
            check.what,
            results.len()
        );
        report_external(&check, &results, problems);
    }
    Ok(())
}

/// Prints who answered and what source they saw; records what is wrong.
fn report_external(check: &ExternalCheck, results: &[Value], problems: &mut Vec<String>) {
    let mut seen: BTreeMap<String, (u32, BTreeSet<String>)> = BTreeMap::new();
    let mut failed: BTreeMap<String, u32> = BTreeMap::new();
    for result in results {
        match outcome(result) {
            Outcome::Answered { backend, source } => {
                let entry = seen.entry(backend).or_default();
                entry.0 += 1;
                entry.1.insert(source);
            }
            other => *failed.entry(format!("{other:?}")).or_default() += 1,
        }
    }
    for (how, count) in &failed {
        println!("  FAILED {count}: {how}");
        problems.push(format!("{}: {count} connections failed: {how}", check.to));
    }
    for (backend, (count, sources)) in &seen {
        let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
        println!(
            "  {backend}: {count} answers, saw source {}",
            sources.join(", ")
        );
        match check.sees.iter().find(|(name, _)| name == backend) {
            None => problems.push(format!("{}: {backend} must not answer", check.to)),
            Some((_, allowed)) => {
                for source in &sources {
                    if !allowed.iter().any(|a| a == source) {
                        problems.push(format!(
                            "{}: {backend} saw {source}, expected one of {allowed:?}",
                            check.to
                        ));
                    }
                }
            }
        }
    }
    for (name, _) in &check.sees {
        if !seen.contains_key(*name) {
            problems.push(format!("{}: {name} never answered", check.to));
        }
    }
}

fn check_replies(
    results: &[Value],
    what: &str,
    field: &str,
    want: &str,
    problems: &mut Vec<String>,
) {
    for (i, r) in results.iter().enumerate() {
        let got = r[field].as_str().unwrap_or("");
        if r["ok"] == true && got == want {
            println!(
                "{what} {} -> {:?} ({field} {got})",
                i + 1,
                r["reply"].as_str().unwrap_or("")
            );
        } else {
            println!("{what} {} -> FAILED {r}", i + 1);
            problems.push(format!(
                "{what} {}: expected {field} {want}, got {r}",
                i + 1
            ));
        }
    }
}
