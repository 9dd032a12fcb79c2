//! `cargo xtask demo`: a one-node cluster in a box.
//!
//! ```text
//!  client pod 10.244.1.2 ─┐
//!  backend-1 10.244.1.11 ─┤ veth ─ cni0 10.244.1.1/24 (node netns: the agent)
//!  backend-2 10.244.1.12 ─┤
//!  backend-3 10.244.1.13 ─┘
//! ```
//! Every namespace is new; the node has no default route and no link to
//! the root namespace, so service traffic that is not translated goes
//! nowhere. The client runs in the agent's cgroup, whose connect4/sendmsg4
//! hooks turn 10.96.0.10 into a backend address.
//!
//! Everything is named `epd-<pid>-<n>`; cleanup runs on success, on
//! failure and on Ctrl-C/SIGTERM, and leftovers of a crashed demo (whose
//! pid is gone) are removed at the start.

use crate::{cargo, run, setup, workspace_root};
use anyhow::{Context, Result, bail};
use proxy_tests::{
    Agent, Cgroup, ChildGuard, Netns, PinDir, TempDir, agent_bin, host, json_lines,
    remove_leftovers, run_checked, start_server, veth_pair,
};
use serde_json::Value;
use std::{collections::BTreeMap, fs, process::Command, time::Duration};

const PREFIX: &str = "epd";
const NODE_NAME: &str = "demo-node";
const GATEWAY: &str = "10.244.1.1";
const CLIENT_IP: &str = "10.244.1.2";
const BACKEND_IPS: [&str; 3] = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];
const CLUSTER_IP: &str = "10.96.0.10";

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

/// A pod: its namespace joined to the node's bridge, and its server.
struct Pod {
    _server: ChildGuard,
    ns: Netns,
}

fn pod(node: &Netns, node_if: &str, ip: &str) -> Result<Netns> {
    let ns = Netns::new(PREFIX)?;
    veth_pair(&ns, "eth0", node, node_if)?;
    node.ip(&["link", "set", node_if, "master", "cni0", "up"])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", GATEWAY])?;
    Ok(ns)
}

fn run_demo(requests: u32) -> Result<()> {
    // Drop order is the reverse of declaration: agent, pins, cgroup,
    // manifests, pods (servers, then namespaces), node.
    let node = Netns::new(PREFIX)?;
    node.ip(&["link", "add", "cni0", "type", "bridge"])?;
    node.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", "cni0"])?;
    node.ip(&["link", "set", "cni0", "up"])?;
    let client = pod(&node, "vclient", CLIENT_IP)?;
    let mut backends = Vec::new();
    for (i, ip) in BACKEND_IPS.iter().enumerate() {
        let ns = pod(&node, &format!("vweb{}", i + 1), ip)?;
        let name = format!("backend-{}", i + 1);
        let server = start_server(
            &ns,
            &[
                "--name",
                &name,
                "--http",
                "0.0.0.0:8080",
                "--tcp",
                "0.0.0.0:9000",
                "--udp",
                "0.0.0.0:5353",
            ],
        )?;
        backends.push(Pod {
            _server: server,
            ns,
        });
    }
    println!(
        "demo: node {} (cni0 {GATEWAY}/24, no default route), client {} ({CLIENT_IP}), backends {}",
        node.name(),
        client.name(),
        backends
            .iter()
            .zip(BACKEND_IPS)
            .map(|(b, ip)| format!("{} ({ip})", b.ns.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The network works without the proxy: the client reaches each backend.
    for (i, ip) in BACKEND_IPS.iter().enumerate() {
        let r = json_lines(host(&client, None).args(["http", "--to", &format!("{ip}:8080")]))?;
        let body = r.first().and_then(|v| v["body"].as_str()).unwrap_or("");
        if body.trim() != format!("backend-{}", i + 1) {
            bail!("direct request to {ip}:8080 failed: {r:?}");
        }
        println!("demo: direct   {ip}:8080 -> {}", body.trim());
    }
    // And without the proxy the ClusterIP leads nowhere.
    let r = json_lines(host(&client, None).args([
        "tcp",
        "--to",
        &format!("{CLUSTER_IP}:80"),
        "--timeout-ms",
        "300",
    ]))?;
    let before = &r[0];
    if before["ok"] == true {
        bail!("{CLUSTER_IP}:80 answered before the agent ran: {before}");
    }
    println!(
        "demo: without the agent {CLUSTER_IP}:80 -> {} (nothing serves it)",
        before["error"].as_str().unwrap_or("error")
    );

    let manifests = TempDir::new(PREFIX)?;
    let examples = workspace_root().join("deploy/examples/demo");
    for entry in fs::read_dir(&examples).with_context(|| format!("read {}", examples.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            fs::copy(
                &path,
                manifests.path().join(path.file_name().unwrap_or_default()),
            )?;
        }
    }
    let cgroup = Cgroup::new(PREFIX)?;
    let pins = PinDir::new(PREFIX)?;
    println!(
        "demo: starting the agent in {} (cgroup {}, pins {}, manifests from {})",
        node.name(),
        cgroup.path().display(),
        pins.path().display(),
        examples.display()
    );
    let agent = Agent::start(
        &node,
        manifests.path(),
        cgroup.path(),
        pins.path(),
        NODE_NAME,
    )?;
    agent.wait_healthy(&node, Duration::from_secs(30))?;
    println!("demo: agent healthy (/healthz 200)");

    let mut problems = Vec::new();
    let in_pod = || host(&client, Some(&cgroup));

    // HTTP through the ClusterIP.
    let results = json_lines(in_pod().args([
        "http",
        "--to",
        &format!("{CLUSTER_IP}:80"),
        "--count",
        &requests.to_string(),
    ]))?;
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
    if spread.len() < 3 {
        problems.push(format!("only {} of 3 backends answered", spread.len()));
    }

    // UDP: the reply must appear to come from the ClusterIP (recvmsg4).
    let want_from = format!("{CLUSTER_IP}:53");
    let udp = json_lines(in_pod().args([
        "udp",
        "--to",
        &want_from,
        "--count",
        "3",
        "--interval-ms",
        "50",
    ]))?;
    check_replies(&udp, "udp query", "from", &want_from, &mut problems);

    // TCP echo port: getpeername() must show the ClusterIP (getpeername4).
    let want_peer = format!("{CLUSTER_IP}:7");
    let tcp = json_lines(in_pod().args(["tcp", "--to", &want_peer, "--count", "3"]))?;
    check_replies(&tcp, "tcp echo ", "peer", &want_peer, &mut problems);

    let bpffs = pins.path().to_string_lossy().into_owned();
    println!("$ ebpf-proxy services --bpffs {bpffs}");
    match run_checked(Command::new(agent_bin()).args(["services", "--bpffs", &bpffs])) {
        Ok(out) => print!("{out}"),
        Err(e) => problems.push(format!("ebpf-proxy services: {e:#}")),
    }

    if !problems.is_empty() {
        bail!(
            "{}\nagent log (last lines):\n{}",
            problems.join("\n"),
            agent.log_tail(30)
        );
    }
    Ok(())
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
