//! Section 5: NodePort from outside, through the two-node box
//! (`proxy_tests::cluster`). The external client 203.0.113.2 connects to
//! node1's 192.168.0.2 on a nodePort; the backend is a pod on node2
//! (`remote`, 10.244.2.11) or on node1 (`local`, 10.244.1.11). Each path
//! gets a box of its own, with N ClusterIP Services (endpoint: the remote
//! pod) plus three NodePort Services (remote :30080, local :30081, the
//! remote pod's iperf3 :30201):
//! - `direct`: the router routes the pod CIDRs to the nodes, the client
//!   connects to the pods themselves (the limit);
//! - `ebpf-tc`: node1's agent with `--xdp-mode off`;
//! - `ebpf-xdp-generic`: node1's agent with `--xdp-mode generic` (XDP in
//!   front of tc; native XDP does not deliver on this box's veths);
//! - `iptables`, `nftables`: kube-proxy's layouts (`nodeport_rules`)
//!   loaded in node1's namespace.
//!
//! Rounds are interleaved (the order rotates each round); each cell is the
//! median of its rounds.

use anyhow::{Context, Result};
use proxy_tests::{ChildGuard, TempDir, cluster::Cluster, cluster::Pod};
use serde_json::{Value, json};
use std::{fmt::Write as _, fs, process::Command, time::Instant};

use super::{
    Layout, PREFIX, fmt_f, median, netns_exec,
    nodeport_rules::{self, RuleService},
    rate_run, vip,
};

const REMOTE_POD: &str = "10.244.2.11";
const LOCAL_POD: &str = "10.244.1.11";
const NODE1: &str = "192.168.0.2";
const GREETING_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const REMOTE_NODE_PORT: u16 = 30080;
const LOCAL_NODE_PORT: u16 = 30081;
const IPERF_NODE_PORT: u16 = 30201;

/// How packets get from the external client to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    EbpfTc,
    EbpfXdpGeneric,
    Iptables,
    Nftables,
}

pub const PATHS: [PathKind; 5] = [
    PathKind::Direct,
    PathKind::EbpfTc,
    PathKind::EbpfXdpGeneric,
    PathKind::Iptables,
    PathKind::Nftables,
];

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::EbpfTc => "ebpf-tc",
            PathKind::EbpfXdpGeneric => "ebpf-xdp-generic",
            PathKind::Iptables => "iptables",
            PathKind::Nftables => "nftables",
        }
    }

    /// Where the client connects to reach `pod` on `node_port`.
    pub fn target(self, pod: &str, pod_port: u16, node_port: u16) -> String {
        match self {
            PathKind::Direct => format!("{pod}:{pod_port}"),
            _ => format!("{NODE1}:{node_port}"),
        }
    }
}

/// One path's box. Fields drop in order: iperf3 server, pods, cluster.
pub struct PathBox {
    pub kind: PathKind,
    _iperf: ChildGuard,
    _pods: Vec<Pod>,
    pub cluster: Cluster,
    /// What it took to program the N services, when something had to.
    setup: Option<(&'static str, f64)>,
}

/// The N ClusterIP Services, then the three NodePort ones.
fn services(n: usize) -> Vec<RuleService> {
    let one = |name: String, ip: String, node_port, endpoint: &str, target_port| RuleService {
        name,
        cluster_ip: ip,
        port: 80,
        node_port,
        endpoint: endpoint.to_string(),
        target_port,
    };
    let mut all: Vec<RuleService> = (0..n)
        .map(|i| {
            one(
                format!("svc-{i:06}"),
                vip(i),
                None,
                REMOTE_POD,
                GREETING_PORT,
            )
        })
        .collect();
    // 10.96.255.x: above what `vip` hands out for up to 60k services.
    all.push(one(
        "remote".into(),
        "10.96.255.1".into(),
        Some(REMOTE_NODE_PORT),
        REMOTE_POD,
        GREETING_PORT,
    ));
    all.push(one(
        "local".into(),
        "10.96.255.2".into(),
        Some(LOCAL_NODE_PORT),
        LOCAL_POD,
        GREETING_PORT,
    ));
    all.push(one(
        "stream".into(),
        "10.96.255.3".into(),
        Some(IPERF_NODE_PORT),
        REMOTE_POD,
        IPERF_PORT,
    ));
    all
}

/// The same Services and their EndpointSlices as manifests for the agent.
fn manifests(services: &[RuleService]) -> String {
    let mut out = String::with_capacity(services.len() * 700);
    for s in services {
        let node = if s.endpoint == LOCAL_POD {
            "node1"
        } else {
            "node2"
        };
        let (kind, node_port) = match s.node_port {
            Some(p) => ("  type: NodePort\n", format!(", nodePort: {p}")),
            None => ("", String::new()),
        };
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n{kind}  clusterIP: {ip}\n  ports:\n\
             \x20 - {{name: tcp, port: {port}, targetPort: {tp}, protocol: TCP{node_port}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x1\n  namespace: bench\n\
             \x20 labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {tp}, protocol: TCP}}\n\
             endpoints:\n- {{addresses: [{ep}], conditions: {{ready: true}}, nodeName: {node}}}\n---\n",
            name = s.name,
            ip = s.cluster_ip,
            port = s.port,
            tp = s.target_port,
            ep = s.endpoint,
        );
    }
    out
}

impl PathBox {
    fn new(kind: PathKind, services: &[RuleService], rules_dir: &TempDir) -> Result<PathBox> {
        let mut cluster = Cluster::new(PREFIX)?;
        let listen = format!("0.0.0.0:{GREETING_PORT}");
        let remote = cluster.add_backend(2, "remote", REMOTE_POD, &["--tcp", &listen])?;
        let local = cluster.add_backend(1, "local", LOCAL_POD, &["--tcp", &listen])?;
        let iperf = remote.netns().spawn(
            Command::new("iperf3")
                .args(["--server", "--port", &IPERF_PORT.to_string()])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null()),
        )?;
        let node1 = cluster.node(1).netns();
        let setup = match kind {
            PathKind::Direct => {
                for n in [1, 2] {
                    let node = cluster.node(n);
                    cluster
                        .router()
                        .ip(&["route", "add", node.pod_cidr(), "via", node.ip()])?;
                }
                None
            }
            PathKind::EbpfTc | PathKind::EbpfXdpGeneric => {
                cluster.write_manifest("services.yaml", &manifests(services))?;
                let mode = if kind == PathKind::EbpfTc {
                    "off"
                } else {
                    "generic"
                };
                let start = Instant::now();
                cluster.node_mut(1).start_agent(&["--xdp-mode", mode])?;
                Some(("agent start to /healthz 200", start.elapsed().as_secs_f64()))
            }
            PathKind::Iptables => {
                let file = rules_dir.path().join("nodeport.iptables");
                fs::write(&file, nodeport_rules::iptables(services))?;
                let took = netns_exec(node1, &["iptables-restore"], Some(&file))?;
                Some(("iptables-restore", took.as_secs_f64()))
            }
            PathKind::Nftables => {
                let file = rules_dir.path().join("nodeport.nft");
                fs::write(&file, nodeport_rules::nftables(services))?;
                let path = file.to_string_lossy().into_owned();
                let took = netns_exec(node1, &["nft", "-f", &path], None)?;
                Some(("nft -f", took.as_secs_f64()))
            }
        };
        Ok(PathBox {
            kind,
            _iperf: iperf,
            _pods: vec![remote, local],
            cluster,
            setup,
        })
    }

    /// One iperf3 run of `streams` parallel streams from the external
    /// client to the remote pod; the receiver's bits per second.
    pub fn iperf3(&self, streams: u32, seconds: u32) -> Result<f64> {
        let target = self.kind.target(REMOTE_POD, IPERF_PORT, IPERF_NODE_PORT);
        let (addr, port) = target.rsplit_once(':').context("target")?;
        let ns = self.cluster.external().netns().name();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "iperf3", "--json", "--client", addr])
            .args(["--port", port, "--time", &seconds.to_string()])
            .args(["--parallel", &streams.to_string()]);
        let text = proxy_tests::run_checked(&mut cmd)
            .with_context(|| format!("iperf3 through {}", self.kind.name()))?;
        let v: Value = serde_json::from_str(&text).context("iperf3 --json")?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3 printed no sum_received: {}", v["error"]))
    }

    fn layout(&self, target: String) -> Layout<'_> {
        Layout {
            name: self.kind.name(),
            ns: self.cluster.external().netns(),
            cgroup: None,
            targets: vec![target],
            agent_pid: self.cluster.node(1).agent().map(|a| a.id()),
        }
    }
}

/// The backends measured, by pod name: (name, pod address, nodePort).
const BACKENDS: [(&str, &str, u16); 2] = [
    ("remote", REMOTE_POD, REMOTE_NODE_PORT),
    ("local", LOCAL_POD, LOCAL_NODE_PORT),
];

/// Connection rate and connect latency through every path at `n`
/// services; `after` runs on the boxes before they are torn down.
pub fn connection_rate(
    n: usize,
    seconds: f64,
    rounds: u32,
    parallel: u32,
    after: impl FnOnce(&[PathBox]) -> Result<Value>,
) -> Result<(Vec<Value>, Vec<Value>, Value)> {
    eprintln!(
        "bench: NodePort N={n}: setting up direct, ebpf-tc, ebpf-xdp-generic, iptables, nftables"
    );
    let services = services(n);
    let rules_dir = TempDir::new(PREFIX)?;
    let mut boxes = Vec::new();
    let mut loads = Vec::new();
    let mut broken: Vec<Option<String>> = Vec::new();
    for kind in PATHS {
        match PathBox::new(kind, &services, &rules_dir) {
            Ok(b) => {
                if let Some((what, seconds)) = b.setup {
                    eprintln!(
                        "bench: NodePort N={n}: {} {what} in {seconds:.2} s",
                        kind.name()
                    );
                    loads.push(
                        json!({"layout": kind.name(), "n": n, "what": what, "seconds": seconds}),
                    );
                }
                boxes.push(b);
            }
            Err(e) => {
                eprintln!("bench: NodePort N={n}: {}: {e:#}", kind.name());
                broken.push(Some(format!("set-up failed: {e:#}")));
                continue;
            }
        }
        broken.push(None);
    }
    // Cells: (box index, backend index), for the paths whose box exists.
    let mut cells: Vec<(usize, usize, Option<String>)> = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        for (j, (name, pod, node_port)) in BACKENDS.iter().enumerate() {
            let layout = b.layout(b.kind.target(pod, GREETING_PORT, *node_port));
            let (v, _) = rate_run(&layout, 0.3, 1)?;
            let answered = v["backends"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>());
            let problem = if v["ok"] != true
                || v["errors"].as_u64() != Some(0)
                || answered.as_deref() != Some(&[name.to_string()])
            {
                Some(format!(
                    "warm-up: {} connections, {} errors (first: {}), answered by {answered:?}",
                    v["connections"], v["errors"], v["first_error"]
                ))
            } else {
                None
            };
            if let Some(p) = &problem {
                eprintln!("bench: NodePort N={n}: {} {name}: {p}", b.kind.name());
            }
            cells.push((i, j, problem));
        }
    }
    let mut samples: Vec<Vec<(Value, Option<f64>)>> = vec![Vec::new(); cells.len()];
    for round in 0..rounds as usize {
        eprintln!(
            "bench: NodePort N={n}: round {}/{rounds} ({} cells x {seconds} s)",
            round + 1,
            cells.len()
        );
        for k in 0..cells.len() {
            let c = (k + round) % cells.len();
            let (i, j, problem) = &cells[c];
            if problem.is_some() {
                continue;
            }
            let (_, pod, node_port) = BACKENDS[*j];
            let b = &boxes[*i];
            let layout = b.layout(b.kind.target(pod, GREETING_PORT, node_port));
            samples[c].push(rate_run(&layout, seconds, parallel)?);
        }
    }
    let mut out: Vec<Value> = cells
        .iter()
        .zip(&samples)
        .map(|((i, j, problem), runs)| {
            let pick = |key: &str| -> Vec<f64> {
                runs.iter()
                    .map(|(v, _)| v[key].as_f64().unwrap_or(f64::NAN))
                    .collect()
            };
            let rates = pick("rate");
            let agent_cpu: Vec<f64> = runs
                .iter()
                .filter_map(|(v, cpu)| Some(cpu.as_ref()? / v["elapsed_s"].as_f64()?))
                .collect();
            json!({
                "path": boxes[*i].kind.name(),
                "backend": BACKENDS[*j].0,
                "n": n,
                "problem": problem,
                "rate": median(&rates),
                "rates": rates,
                "connect_p50_us": median(&pick("connect_p50_us")),
                "connect_p99_us": median(&pick("connect_p99_us")),
                "errors": runs.iter().map(|(v, _)| v["errors"].as_u64().unwrap_or(0)).sum::<u64>(),
                "first_error": runs.iter().find_map(|(v, _)| v["first_error"].as_str().map(str::to_string)),
                "agent_cpu_fraction": if agent_cpu.is_empty() { Value::Null } else { json!(median(&agent_cpu)) },
            })
        })
        .collect();
    for (kind, problem) in PATHS.iter().zip(&broken) {
        if let Some(p) = problem {
            for (name, _, _) in BACKENDS {
                out.push(json!({"path": kind.name(), "backend": name, "n": n, "problem": p}));
            }
        }
    }
    let extra = after(&boxes)?;
    eprintln!("bench: NodePort N={n}: tearing down");
    drop(boxes);
    Ok((out, loads, extra))
}

pub fn render(s: &mut String, np: &Value) {
    let _ = writeln!(
        s,
        "\n5. NodePort from outside: the external client connects to node1's nodePort;\n   \
         backend `remote` is a pod on node2, `local` one on node1. N ClusterIP\n   \
         Services plus 3 NodePort ones; each cell the median of {} interleaved\n   \
         rounds of {} s, {} client thread(s). direct: to the pod itself, routed\n   \
         (the limit). ebpf-xdp-generic: XDP generic in front of tc (native XDP does\n   \
         not deliver on this box's veths, so it is not measured).",
        np["rounds"], np["seconds_per_run"], np["parallel"]
    );
    let _ = writeln!(
        s,
        "\n  {:<17} {:<7} {:>6} {:>8} {:>7} {:>7} {:>10}  notes",
        "path", "backend", "N", "conn/s", "p50 us", "p99 us", "vs direct"
    );
    let cells = np["cells"].as_array().cloned().unwrap_or_default();
    let mut ns: Vec<u64> = cells.iter().filter_map(|c| c["n"].as_u64()).collect();
    ns.dedup();
    for n in ns {
        for (backend, _, _) in BACKENDS {
            let group: Vec<&Value> = cells
                .iter()
                .filter(|c| c["n"] == n && c["backend"] == backend)
                .collect();
            let direct = group
                .iter()
                .find(|c| c["path"] == "direct")
                .and_then(|c| c["rate"].as_f64())
                .filter(|x| x.is_finite() && *x > 0.0);
            for c in group {
                let rate = c["rate"].as_f64().filter(|x| x.is_finite());
                let notes = super::cell_notes(c);
                let _ = writeln!(
                    s,
                    "  {:<17} {:<7} {:>6} {:>8} {:>7} {:>7} {:>10}  {}",
                    c["path"].as_str().unwrap_or("?"),
                    backend,
                    n,
                    rate.map(|x| format!("{x:.0}"))
                        .unwrap_or_else(|| "-".into()),
                    fmt_f(&c["connect_p50_us"], 1),
                    fmt_f(&c["connect_p99_us"], 1),
                    match (rate, direct) {
                        (Some(a), Some(b)) => format!("{:.2}", a / b),
                        _ => "-".into(),
                    },
                    notes.join("; ")
                );
            }
        }
    }
    let _ = writeln!(s, "\n  Setup times (not part of the rates):");
    for l in np["loads"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            s,
            "    {:<17} N={:<6} {:<28} {:>7.2} s",
            l["layout"].as_str().unwrap_or("?"),
            l["n"],
            l["what"].as_str().unwrap_or("?"),
            l["seconds"].as_f64().unwrap_or(f64::NAN)
        );
    }
}

/// Sections 5 and 6: the NodePort connection rate at every N, and the
/// throughput on the boxes of the smallest N.
pub fn section(
    counts: &[usize],
    seconds: f64,
    rounds: u32,
    opts: &super::Options,
) -> Result<(Value, Value)> {
    let (stream_seconds, stream_rounds) = if opts.quick { (2, 1) } else { (5, 3) };
    let mut cells = Vec::new();
    let mut loads = Vec::new();
    let mut streams = Value::Null;
    for (k, &n) in counts.iter().enumerate() {
        let (c, l, t) = connection_rate(n, seconds, rounds, opts.parallel, |boxes| {
            if k == 0 {
                super::throughput::measure(boxes, stream_seconds, stream_rounds)
            } else {
                Ok(Value::Null)
            }
        })?;
        cells.extend(c);
        loads.extend(l);
        if k == 0 {
            streams = t;
        }
    }
    let np = json!({
        "seconds_per_run": seconds,
        "rounds": rounds,
        "parallel": opts.parallel,
        "cells": cells,
        "loads": loads,
    });
    Ok((np, streams))
}
