//! `cargo xtask bench`: the performance yardsticks of DESIGN.md, measured
//! side by side in one run on this machine and reported as ratios.
//!
//! 1. Connection rate (1, 1k, 10k Services; this proxy and direct also at
//!    100k). Every layout gets a network namespace of its own
//!    with the client address 10.244.0.2 and three backends
//!    10.244.0.11-13 on `lo`, each a `netns-host serve` greeting on :8080.
//!    The client (`netns-host connect-rate`) connects, reads the greeting
//!    and closes (RST), over and over:
//!    - `direct`: to the backends themselves, in turn (the limit);
//!    - `ebpf-proxy`: the release agent with N services (ClusterIP
//!      10.96.x.y:80, the same 3 endpoints each), client in its cgroup,
//!      connecting to the last service's ClusterIP;
//!    - `iptables`: kube-proxy's iptables-mode nat layout for the same N
//!      services (`iptables-restore`), client outside any proxy cgroup;
//!    - `nftables`: kube-proxy's nftables-mode layout (`nft -f`);
//!    - `iptables-legacy` (with `--iptables-legacy`): the same rules
//!      through the legacy x_tables backend.
//!
//!    Every layout is built fresh for each N. Rounds are interleaved (the
//!    order rotates each round); each cell reports the median of its rounds.
//! 2. Control plane: agent start to `/healthz` 200 with 10k services x 10
//!    endpoints in one multi-document file, one endpoint change (a small
//!    file rewritten) until `ebpf-proxy services` shows it (and when the
//!    agent logged the sync that wrote it), agent memory, and the agent's
//!    sync-duration metric. When 10k x 10 never becomes healthy, 5k x 10 is
//!    measured too.
//! 3. Control plane from the API server: the same objects as Values in the
//!    API server double (`proxy_tests::apiserver`) inside the agent's
//!    namespace, the agent on `--kubeconfig`: start to `/healthz` 200 (and
//!    whether every frontend and backend was programmed then), one
//!    EndpointSlice change applied to the double until `services` shows it,
//!    memory, the sync metrics; at 10k x 10 and 5k x 10. At 10k, also
//!    the tail: many changes one after the other (`control_tail`).
//! 4. ns per packet of the tc programs (`packets`).
//! 5. NodePort from outside through the two-node box (`nodeport`).
//! 6. iperf3 streams through a NodePort (`throughput`).
//!
//! Every run writes its report, the goals and a chart to `bench/results/`
//! (`results`).
//!
//! Each section has its file: `cluster_ip` (1), `control_plane` (2, 3,
//! with `control_tail`), `packets` (4), `nodeport` and `nodeport_rules`
//! (5), `throughput` (6); `boxes` holds the namespaces every layout runs in
//! and the agent as a process, `render` the text report. `--only-control-plane` skips sections 1, 4, 5 and 6;
//! `--control-plane-source manifests|kube` runs only section 2 or 3.
//!
//! Our processes run at nice -10 (inherited from here) so that other work
//! on a shared machine disturbs them less; the report shows the load.
//!
//! Safety: every namespace is new and holds only `lo` (plus, for the
//! netfilter layouts, a veth pair with both ends inside it that the service
//! CIDR is routed to: kube-proxy's rules sit behind a route lookup; the
//! pair leads nowhere). Nothing is added to the root namespace. Everything
//! is named `epb-<pid>-<n>` and removed by guards, on Ctrl-C/SIGTERM, and
//! at the next start. Every loop is bounded by a count or a deadline.
//! Nothing asserts on timings; a layout that does not work is reported.

mod boxes;
mod cluster_ip;
mod control_plane;
mod control_tail;
mod nodeport;
mod nodeport_rules;
mod packets;
mod render;
mod results;
mod throughput;

use boxes::*;
use cluster_ip::*;
use control_plane::*;
use render::*;

use crate::{cargo, run, setup, target_dir};
use anyhow::{Context, Result, bail};
use proxy_tests::{
    Agent, Cgroup, ChildGuard, Netns, PinDir, TempDir, apiserver::ApiServer, host, json_lines,
    remove_leftovers, run_checked, start_server,
};
use serde_json::{Value, json};
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

const PREFIX: &str = "epb";
const NODE_NAME: &str = "bench-node";
const CLIENT: &str = "10.244.0.2";
const BACKENDS: [&str; 3] = ["10.244.0.11", "10.244.0.12", "10.244.0.13"];
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const SERVICE_CIDR: &str = "10.96.0.0/12";
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";
/// The control plane's probe service (outside the range `vip` hands out).
const PROBE_VIP: &str = "10.100.0.1";

#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    pub json: bool,
    pub parallel: u32,
    pub rounds: Option<u32>,
    pub seconds: Option<f64>,
    pub iptables_legacy: bool,
    pub skip_control_plane: bool,
    /// Skip the connection rate (section 1).
    pub only_control_plane: bool,
    pub control_plane_source: ControlPlaneSource,
}

/// Which control-plane sections run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlPlaneSource {
    /// Both: from a manifests directory (2) and from the API server (3).
    Both,
    /// Only the agent fed by a manifests directory (section 2).
    Manifests,
    /// Only the agent fed by the API server double (section 3).
    Kube,
}

pub fn bench(opts: Options) -> Result<()> {
    // Before any thread exists (set_var is not thread-safe): the testbed
    // finds the binaries through these, and we want the release ones.
    let release = target_dir().join("release");
    // SAFETY: single-threaded so far (the Ctrl-C handler comes below).
    unsafe {
        std::env::set_var("EBPF_PROXY_BIN", release.join("ebpf-proxy"));
        std::env::set_var("NETNS_HOST_BIN", release.join("netns-host"));
    }
    for what in remove_leftovers(PREFIX, false) {
        eprintln!("bench: removed leftover {what}");
    }
    ctrlc::set_handler(|| {
        eprintln!("\nbench: interrupted, cleaning up");
        for what in remove_leftovers(PREFIX, true) {
            eprintln!("bench: removed {what}");
        }
        std::process::exit(130);
    })
    .context("install the Ctrl-C handler")?;
    // Progress goes to stderr: stdout is the report (or the JSON).
    with_stdout_on_stderr(|| -> Result<()> {
        setup::setup()?;
        eprintln!("bench: building ebpf-proxy and netns-host (release)");
        run(cargo().args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "proxy-userspace",
            "-p",
            "proxy-tests",
        ]))
    })?;
    // Our processes (servers, clients, the agent, and what loads rules)
    // inherit this: other work on a shared machine disturbs them less.
    // SAFETY: plain syscall on our own process.
    let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } == 0;
    let result = run_bench(&opts, niced);
    for what in remove_leftovers(PREFIX, true) {
        eprintln!("bench: removed leftover {what}");
    }
    let report = result?;
    let text = render(&report);
    match results::write(&report, &text) {
        Ok(path) => eprintln!("bench: results written to {}", path.display()),
        Err(e) => eprintln!("bench: the results were not written: {e:#}"),
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Runs `f` with fd 1 pointing where fd 2 does (children inherit that).
fn with_stdout_on_stderr<T>(f: impl FnOnce() -> T) -> T {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // SAFETY: plain fd syscalls on fds 1 and 2 and a fresh duplicate.
    let saved = unsafe { libc::dup(1) };
    if saved >= 0 {
        unsafe { libc::dup2(2, 1) };
    }
    let result = f();
    let _ = std::io::stdout().flush();
    if saved >= 0 {
        // SAFETY: as above.
        unsafe {
            libc::dup2(saved, 1);
            libc::close(saved);
        }
    }
    result
}

fn run_bench(opts: &Options, niced: bool) -> Result<Value> {
    let started = Instant::now();
    let counts: &[usize] = if opts.quick {
        &[1, 1000]
    } else {
        &[1, 1000, 10_000]
    };
    let seconds = opts.seconds.unwrap_or(if opts.quick { 0.5 } else { 0.75 });
    let rounds = opts.rounds.unwrap_or(if opts.quick { 4 } else { 8 });
    eprintln!("bench: sampling the machine's CPU use by others for 1 s");
    let background = cpu_busy(Duration::from_secs(1));
    let mut report = json!({
        "machine": machine(),
        "nice": if niced { json!(-10) } else { json!(0) },
        "background_cpu_busy": background,
        "loadavg_at_start": first_line(&fs::read_to_string("/proc/loadavg").unwrap_or_default()),
        "quick": opts.quick,
    });
    let mut rate = json!({
        "seconds_per_run": seconds,
        "rounds": rounds,
        "parallel": opts.parallel,
        "close": "RST (SO_LINGER 0)",
        "target": "connect, read the greeting line, close; the last service's ClusterIP",
        "cells": [],
        "loads": [],
    });
    if !opts.only_control_plane {
        for &n in counts {
            let (cells, loads) = connection_rate(n, seconds, rounds, opts, Layouts::All)?;
            for c in cells {
                rate["cells"].as_array_mut().expect("array").push(c);
            }
            for l in loads {
                rate["loads"].as_array_mut().expect("array").push(l);
            }
        }
        if !opts.quick {
            // The socket hooks' goal is judged at 100k Services.
            let (cells, loads) =
                connection_rate(100_000, seconds, rounds, opts, Layouts::ProxyOnly)?;
            for c in cells {
                rate["cells"].as_array_mut().expect("array").push(c);
            }
            for l in loads {
                rate["loads"].as_array_mut().expect("array").push(l);
            }
        }
        report["connection_rate"] = rate;
    }
    if !opts.only_control_plane {
        report["packet_datapath"] = packets::per_packet(opts.quick)?;
        let (np, streams) = nodeport::section(counts, seconds, rounds, opts)?;
        report["nodeport"] = np;
        report["throughput"] = streams;
    }
    let tail_changes = if opts.quick { 100 } else { 1000 };
    let source = opts.control_plane_source;
    if !opts.skip_control_plane && source != ControlPlaneSource::Kube {
        let mut runs = vec![control_plane(10_000, 10, Source::Manifests, 0)?];
        if runs[0]["start_to_healthy_s"].is_null() {
            // The agent could not program 10k x 10: measure the largest
            // round size that fits its 65536-entry maps, for comparison.
            eprintln!("bench: control plane: 10000x10 did not program; measuring 5000x10 as well");
            runs.push(control_plane(5_000, 10, Source::Manifests, 0)?);
        }
        report["control_plane"] = json!(runs);
    }
    if !opts.skip_control_plane && source != ControlPlaneSource::Manifests {
        // Both sizes, always: 5k x 10 is the comparison point whether or
        // not 10k x 10 fits.
        let mut runs = vec![
            control_plane(10_000, 10, Source::Kube, tail_changes)?,
            control_plane(5_000, 10, Source::Kube, 0)?,
        ];
        if !opts.quick {
            // Memory and /healthz during the first sync, at scale.
            runs.push(control_plane(100_000, 1, Source::Kube, 0)?);
        }
        report["control_plane_kube"] = json!(runs);
    }
    report["total_seconds"] = json!(started.elapsed().as_secs_f64());
    report["loadavg_at_end"] = json!(first_line(
        &fs::read_to_string("/proc/loadavg").unwrap_or_default()
    ));
    Ok(report)
}

// ------------------------------------------------------------ helpers

/// ClusterIP of service `i` (0-based): in 10.96.0.0/12, 250 per /24
/// (y in 1..=250), room for a million.
fn vip(i: usize) -> String {
    let k = i + 1;
    let block = k / 250;
    format!("10.{}.{}.{}", 96 + block / 250, block % 250, k % 250 + 1)
}

/// Address of endpoint `k` of the control plane's services: 10.128+.x.y.
fn pod_ip(k: usize) -> String {
    let a = k / 250;
    format!("10.{}.{}.{}", 128 + a / 250, a % 250, k % 250 + 1)
}

/// A Service (one TCP port 80) and its EndpointSlice, as two documents.
fn service_docs(out: &mut String, name: &str, vip: &str, endpoints: &[String]) {
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n\
         spec:\n  clusterIP: {vip}\n  ports:\n  - {{name: http, port: {SERVICE_PORT}, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x1\n  namespace: bench\n\
         \x20 labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports:\n- {{name: http, port: {BACKEND_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    for addr in endpoints {
        let _ = writeln!(
            out,
            "- {{addresses: [{addr}], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}"
        );
    }
    out.push_str("---\n");
}

/// Write then rename, so the agent never reads half a file.
fn write_atomic(dir: &Path, file: &str, text: &str) -> Result<()> {
    let staging = dir.join(format!(".{file}.tmp"));
    fs::write(&staging, text).with_context(|| format!("write {}", staging.display()))?;
    fs::rename(&staging, dir.join(file)).with_context(|| format!("rename to {file}"))
}

/// Now, in unix seconds (the agent log's clock).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .stdin(Stdio::null())
            .output()
            .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_else(|_| "missing".to_string())
    };
    json!({
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": first_line(&fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()),
        "iptables": version("iptables", "--version"),
        "nft": version("nft", "--version"),
    })
}

/// Fraction of all CPUs busy over `window` (from /proc/stat).
fn cpu_busy(window: Duration) -> Option<f64> {
    let sample = || -> Option<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4)?;
        Some((total, idle))
    };
    let (t0, i0) = sample()?;
    thread::sleep(window);
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0)?.max(1);
    Some(1.0 - (i1 - i0) as f64 / total as f64)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15 (1-based).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz.max(1.0))
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `cmd` inside `ns` (`ip netns exec`, for iptables and nft) with
/// `file` as stdin when given; returns how long it took.
fn netns_exec(ns: &Netns, args: &[&str], stdin: Option<&Path>) -> Result<Duration> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]).args(args);
    let start = Instant::now();
    let out = match stdin {
        Some(p) => cmd.stdin(fs::File::open(p)?).output(),
        None => cmd.stdin(Stdio::null()).output(),
    }
    .with_context(|| format!("spawn {cmd:?}"))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{} in {} failed ({}): {}",
            args.join(" "),
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}
