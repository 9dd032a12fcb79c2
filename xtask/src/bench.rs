//! `cargo xtask bench`: the performance yardsticks of DESIGN.md, measured
//! side by side in one run on this machine and reported as ratios.
//!
//! 1. Connection rate. Every layout gets a network namespace of its own
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
//! (`results`). `--only-control-plane` skips sections 1, 4, 5 and 6;
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

mod control_tail;
mod nodeport;
mod nodeport_rules;
mod packets;
mod results;
mod throughput;

use crate::{cargo, run, setup, target_dir};
use anyhow::{Context, Result, bail};
use proxy_tests::{
    Cgroup, ChildGuard, Netns, PinDir, TempDir, apiserver::ApiServer, host, json_lines,
    remove_leftovers, run_checked, start_server, unique_name,
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

// ------------------------------------------------------------ the boxes

/// A namespace with the client and backend addresses on `lo` and a
/// greeting server per backend. Fields drop in order: servers, namespace.
struct Testbox {
    _servers: Vec<ChildGuard>,
    ns: Netns,
}

impl Testbox {
    fn new(with_servers: bool) -> Result<Testbox> {
        let ns = Netns::new(PREFIX)?;
        for addr in std::iter::once(CLIENT).chain(BACKENDS) {
            ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        }
        let mut servers = Vec::new();
        if with_servers {
            for (i, addr) in BACKENDS.iter().enumerate() {
                let name = format!("backend-{}", i + 1);
                let listen = format!("{addr}:{BACKEND_PORT}");
                servers.push(start_server(&ns, &["--name", &name, "--tcp", &listen])?);
            }
        }
        Ok(Testbox {
            _servers: servers,
            ns,
        })
    }

    /// Routes the service CIDR onto a veth pair whose both ends are in
    /// this namespace (the far end has no address, so an untranslated
    /// packet never gets past ARP), as a node's default route would:
    /// netfilter's nat OUTPUT hook only sees packets that found a route.
    fn route_services_to_dead_end(&self) -> Result<()> {
        proxy_tests::veth_pair(&self.ns, "svc0", &self.ns, "svc1")?;
        self.ns.ip(&["link", "set", "svc0", "up"])?;
        self.ns.ip(&["link", "set", "svc1", "up"])?;
        self.ns
            .ip(&["route", "add", SERVICE_CIDR, "dev", "svc0", "src", CLIENT])
    }
}

/// The release agent, spawned in a namespace; killed on drop, its log
/// removed (kept with `PROXY_TESTS_KEEP_LOGS`).
struct AgentProc {
    child: ChildGuard,
    log: PathBuf,
    started: Instant,
    /// The same moment, unix seconds (to compare with log timestamps).
    started_unix: f64,
    /// How long each /healthz answer took while waiting for it to be 200
    /// (the client's start included): the agent must answer during its
    /// first sync.
    healthz_answers_ms: Vec<f64>,
}

impl AgentProc {
    /// `source`: `("--manifests", dir)` or `("--kubeconfig", file)`.
    fn start(
        ns: &Netns,
        source: (&str, PathBuf),
        cgroup: &Cgroup,
        pins: &PinDir,
    ) -> Result<AgentProc> {
        let log = std::env::temp_dir().join(format!("{}-agent.log", unique_name(PREFIX)));
        let file = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(proxy_tests::agent_bin());
        cmd.arg("agent")
            .arg(source.0)
            .arg(source.1)
            .args(["--hostname-override", NODE_NAME])
            .arg("--cgroup")
            .arg(cgroup.path())
            .arg("--bpffs")
            .arg(pins.path())
            .args(["--healthz-bind-address", HEALTHZ])
            .args(["--metrics-bind-address", METRICS])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let started = Instant::now();
        let started_unix = unix_now();
        let child = ns.spawn(&mut cmd)?;
        Ok(AgentProc {
            healthz_answers_ms: Vec::new(),
            child,
            log,
            started,
            started_unix,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of the log (read from its last 64 KiB).
    fn log_tail(&self, n: usize) -> String {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let mut text = Vec::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
            let _ = f.read_to_end(&mut text);
        }
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Polls /healthz every 50 ms; Ok(time since start) at the first 200.
    /// Err(what happened) when the agent exits, `timeout` passes, or the
    /// agent has finished `give_up_after` syncs without becoming healthy
    /// (each of them incomplete: it is stuck retrying).
    fn wait_healthy(
        &mut self,
        ns: &Netns,
        timeout: Duration,
        give_up_after: u32,
    ) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let mut next_metrics = Instant::now() + Duration::from_millis(500);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "agent exited ({status}) before /healthz answered 200"
                ));
            }
            let asked = Instant::now();
            let out = host(ns, None)
                .args([
                    "http-get",
                    &format!("{HEALTHZ}/healthz"),
                    "--timeout-ms",
                    "1000",
                ])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = out {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let answer = serde_json::from_str::<Value>(stdout.trim());
                if answer.as_ref().is_ok_and(|v| v["status"].is_u64()) {
                    self.healthz_answers_ms
                        .push(asked.elapsed().as_secs_f64() * 1000.0);
                }
                match answer {
                    Ok(v) if v["status"] == 200 => return Ok(self.started.elapsed()),
                    Ok(v) => last = v["body"].as_str().unwrap_or("").to_string(),
                    Err(_) => last = stdout.trim().to_string(),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "/healthz not 200 after {timeout:?} (last answer: {last})"
                ));
            }
            if Instant::now() > next_metrics {
                next_metrics = Instant::now() + Duration::from_millis(500);
                let syncs = metric(&fetch_metrics(ns), SYNC_COUNT).unwrap_or(0.0);
                if syncs >= f64::from(give_up_after) {
                    return Err(format!(
                        "/healthz still not 200 after {syncs:.0} finished syncs ({:.1} s after start): \
                         every sync was incomplete; stopped waiting (last answer: {last})",
                        self.started.elapsed().as_secs_f64()
                    ));
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

const SYNC_SUM: &str = "kubeproxy_sync_proxy_rules_duration_seconds_sum";
const SYNC_COUNT: &str = "kubeproxy_sync_proxy_rules_duration_seconds_count";
const PROG_SUM: &str = "kubeproxy_network_programming_duration_seconds_sum";
const PROG_COUNT: &str = "kubeproxy_network_programming_duration_seconds_count";
const OVER_CAPACITY: &str = "ebpf_proxy_service_ports_over_capacity";

/// The agent's /metrics text (empty when it does not answer).
fn fetch_metrics(ns: &Netns) -> String {
    host(ns, None)
        .args([
            "http-get",
            &format!("{METRICS}/metrics"),
            "--timeout-ms",
            "3000",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v["body"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The value of an unlabelled sample in Prometheus text.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// What the agent's log says, read as a stream (it can be large when the
/// agent logs every failing service on every retry).
#[derive(Default)]
struct LogScan {
    lines: u64,
    bytes: u64,
    errors: u64,
    first_errors: Vec<String>,
    /// Distinct error messages ("error=..." parts) and how often.
    kinds: std::collections::BTreeMap<String, u64>,
    /// The first error about the probe service.
    probe_error: Option<String>,
    last_synced: Option<String>,
    /// Every "synced" line: (its time, unix seconds; whether it wrote).
    syncs: Vec<(f64, bool)>,
}

/// "2026-11-22T04:56:39.494992Z" (tracing's UTC timestamps) -> unix seconds.
fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// A "synced" line of the agent's log: Some(its time in unix seconds,
/// whether it wrote anything to the maps) when the time parses.
fn synced_line(line: &str) -> Option<Option<(f64, bool)>> {
    if !line.contains(" synced ") {
        return None;
    }
    let wrote = [
        "frontends_written",
        "frontends_deleted",
        "backends_added",
        "backends_deleted",
    ]
    .iter()
    .any(|k| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .is_some_and(|v| v != "0")
    });
    Some(
        line.split_whitespace()
            .next()
            .and_then(parse_utc)
            .map(|t| (t, wrote)),
    )
}

fn scan_log(path: &Path) -> LogScan {
    use std::io::BufRead as _;
    let mut scan = LogScan::default();
    let Ok(file) = fs::File::open(path) else {
        return scan;
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    // Bounded: the file is finite and read once.
    while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
        scan.lines += 1;
        scan.bytes += buf.len() as u64;
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.contains(" ERROR ") {
            scan.errors += 1;
            if scan.first_errors.len() < 3 {
                scan.first_errors.push(line.to_string());
            }
            let msg = line
                .split_once(": ")
                .map(|(_, m)| m)
                .unwrap_or(line)
                .split(" service_port=")
                .next()
                .unwrap_or("")
                .split(" cluster_ip=")
                .next()
                .unwrap_or("");
            let err = line.rsplit_once(" error=").map(|(_, e)| e).unwrap_or("");
            *scan.kinds.entry(format!("{msg}: {err}")).or_default() += 1;
            if scan.probe_error.is_none() && line.contains("bench/probe") {
                scan.probe_error = Some(line.to_string());
            }
        } else if let Some(sync) = synced_line(line) {
            scan.last_synced = Some(line.to_string());
            if let Some(sync) = sync
                && scan.syncs.len() < 100_000
            {
                scan.syncs.push(sync);
            }
        }
        buf.clear();
    }
    scan
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.child.kill();
        if std::env::var_os("PROXY_TESTS_KEEP_LOGS").is_none() {
            let _ = fs::remove_file(&self.log);
        } else {
            eprintln!("bench: agent log kept: {}", self.log.display());
        }
    }
}

/// The ebpf-proxy layout. Drop order: agent, pins (detaches the
/// programs), cgroup (kills clients), manifests, box.
struct EbpfBox {
    agent: AgentProc,
    _pins: PinDir,
    cgroup: Cgroup,
    _manifests: TempDir,
    tb: Testbox,
}

// ------------------------------------------------------- connection rate

/// How one layout is measured.
struct Layout<'a> {
    name: &'static str,
    ns: &'a Netns,
    cgroup: Option<&'a Cgroup>,
    targets: Vec<String>,
    /// The agent, whose CPU time during the runs is reported.
    agent_pid: Option<u32>,
}

/// One `connect-rate` run; the JSON summary plus agent CPU seconds.
fn rate_run(l: &Layout, seconds: f64, parallel: u32) -> Result<(Value, Option<f64>)> {
    let mut cmd = host(l.ns, l.cgroup);
    cmd.arg("connect-rate");
    for t in &l.targets {
        cmd.args(["--to", t]);
    }
    cmd.args([
        "--duration-ms",
        &format!("{}", (seconds * 1000.0).round() as u64),
        "--parallel",
        &parallel.to_string(),
        "--timeout-ms",
        "1000",
    ]);
    let cpu_before = l.agent_pid.and_then(cpu_seconds);
    let out = json_lines(&mut cmd).with_context(|| format!("connect-rate for {}", l.name))?;
    let cpu_after = l.agent_pid.and_then(cpu_seconds);
    let v = out
        .into_iter()
        .next()
        .context("connect-rate printed nothing")?;
    let agent_cpu = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
    Ok((v, agent_cpu))
}

/// Sets up every layout with `n` services, checks that each reaches all
/// three backends, then measures them in interleaved rounds.
/// kube-proxy's layouts holding `n` Services, each in a box of its own.
struct NetfilterBoxes {
    iptables: Testbox,
    iptables_legacy: Option<Testbox>,
    nftables: Testbox,
    _rules: TempDir,
}

impl NetfilterBoxes {
    fn named(&self) -> impl Iterator<Item = (&'static str, &Testbox)> {
        [
            Some(("iptables", &self.iptables)),
            self.iptables_legacy
                .as_ref()
                .map(|b| ("iptables-legacy", b)),
            Some(("nftables", &self.nftables)),
        ]
        .into_iter()
        .flatten()
    }
}

/// Loads kube-proxy's iptables (and iptables-legacy) and nftables layouts
/// for `n` Services, recording each load's time in `loads`.
fn netfilter_layouts(n: usize, opts: &Options, loads: &mut Vec<Value>) -> Result<NetfilterBoxes> {
    // iptables (and iptables-legacy): kube-proxy's iptables mode, nat table.
    let rules_dir = TempDir::new(PREFIX)?;
    let ipt_file = rules_dir.path().join("iptables.rules");
    fs::write(&ipt_file, iptables_rules(n))?;
    let ipt = Testbox::new(true)?;
    ipt.route_services_to_dead_end()?;
    let took = netns_exec(&ipt.ns, &["iptables-restore"], Some(&ipt_file))?;
    loads.push(json!({"layout": "iptables", "n": n, "what": "iptables-restore", "seconds": took.as_secs_f64()}));
    let legacy = if opts.iptables_legacy {
        let b = Testbox::new(true)?;
        b.route_services_to_dead_end()?;
        let took = netns_exec(&b.ns, &["iptables-legacy-restore"], Some(&ipt_file))?;
        loads.push(json!({"layout": "iptables-legacy", "n": n, "what": "iptables-legacy-restore", "seconds": took.as_secs_f64()}));
        Some(b)
    } else {
        None
    };

    // nftables: kube-proxy's nftables mode.
    let nft_file = rules_dir.path().join("nftables.nft");
    fs::write(&nft_file, nftables_rules(n))?;
    let nft = Testbox::new(true)?;
    nft.route_services_to_dead_end()?;
    let nft_path = nft_file.to_string_lossy().into_owned();
    let took = netns_exec(&nft.ns, &["nft", "-f", &nft_path], None)?;
    loads.push(
        json!({"layout": "nftables", "n": n, "what": "nft -f", "seconds": took.as_secs_f64()}),
    );

    Ok(NetfilterBoxes {
        iptables: ipt,
        iptables_legacy: legacy,
        nftables: nft,
        _rules: rules_dir,
    })
}

/// Which layouts a connection-rate run compares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layouts {
    /// Direct, this proxy, kube-proxy's iptables and nftables layouts.
    All,
    /// Direct and this proxy: at 100k Services the netfilter layouts take
    /// minutes to load and are not what the goal is about.
    ProxyOnly,
}

fn connection_rate(
    n: usize,
    seconds: f64,
    rounds: u32,
    opts: &Options,
    compared: Layouts,
) -> Result<(Vec<Value>, Vec<Value>)> {
    let last_vip = format!("{}:{SERVICE_PORT}", vip(n - 1));
    let mut loads = Vec::new();
    eprintln!(
        "bench: N={n}: setting up direct, ebpf-proxy{}",
        if compared == Layouts::All {
            ", iptables, nftables"
        } else {
            ""
        }
    );
    let direct = Testbox::new(true)?;

    // ebpf-proxy: manifests first, then a cold agent start.
    let manifests = TempDir::new(PREFIX)?;
    let mut text = String::with_capacity(n * 600);
    let endpoints: Vec<String> = BACKENDS.iter().map(|s| s.to_string()).collect();
    for i in 0..n {
        service_docs(&mut text, &format!("svc-{i:05}"), &vip(i), &endpoints);
    }
    write_atomic(manifests.path(), "services.yaml", &text)?;
    let tb = Testbox::new(true)?;
    let cgroup = Cgroup::new(PREFIX)?;
    let pins = PinDir::new(PREFIX)?;
    let mut agent = AgentProc::start(
        &tb.ns,
        ("--manifests", manifests.path().to_path_buf()),
        &cgroup,
        &pins,
    )?;
    let healthy = agent.wait_healthy(&tb.ns, Duration::from_secs(120), 5);
    let ebpf = EbpfBox {
        agent,
        _pins: pins,
        cgroup,
        _manifests: manifests,
        tb,
    };
    // An agent that does not become healthy is reported, not measured.
    let ebpf_problem = match healthy {
        Ok(t) => {
            eprintln!(
                "bench: N={n}: ebpf-proxy healthy {:.2} s after start",
                t.as_secs_f64()
            );
            loads.push(json!({"layout": "ebpf-proxy", "n": n, "what": "agent start to /healthz 200", "seconds": t.as_secs_f64()}));
            None
        }
        Err(e) => {
            let tail = ebpf.agent.log_tail(3);
            eprintln!("bench: N={n}: ebpf-proxy: {e}\nagent log (last lines):\n{tail}");
            Some(format!(
                "agent not healthy: {e}; last log line: {}",
                tail.lines().last().unwrap_or("")
            ))
        }
    };

    let netfilter = match compared {
        Layouts::All => Some(netfilter_layouts(n, opts, &mut loads)?),
        Layouts::ProxyOnly => None,
    };
    for l in &loads {
        if l["layout"] != "ebpf-proxy" {
            eprintln!(
                "bench: N={n}: {} loaded by {} in {:.2} s",
                l["layout"].as_str().unwrap_or(""),
                l["what"].as_str().unwrap_or(""),
                l["seconds"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }

    let mut layouts = vec![
        Layout {
            name: "direct",
            ns: &direct.ns,
            cgroup: None,
            targets: BACKENDS
                .iter()
                .map(|b| format!("{b}:{BACKEND_PORT}"))
                .collect(),
            agent_pid: None,
        },
        Layout {
            name: "ebpf-proxy",
            ns: &ebpf.tb.ns,
            cgroup: Some(&ebpf.cgroup),
            targets: vec![last_vip.clone()],
            agent_pid: Some(ebpf.agent.pid()),
        },
    ];
    for (name, tb) in netfilter.iter().flat_map(NetfilterBoxes::named) {
        layouts.push(Layout {
            name,
            ns: &tb.ns,
            cgroup: None,
            targets: vec![last_vip.clone()],
            agent_pid: None,
        });
    }

    // Warm-up and check: every layout answers from all three backends
    // without errors; one that does not is reported, not measured.
    let mut broken: Vec<Option<String>> = Vec::new();
    for l in &layouts {
        if l.name == "ebpf-proxy"
            && let Some(p) = &ebpf_problem
        {
            broken.push(Some(p.clone()));
            continue;
        }
        let (v, _) = rate_run(l, 0.3, 1)?;
        let backends = v["backends"].as_object().map(|m| m.len()).unwrap_or(0);
        let problem = if v["ok"] != true || v["errors"].as_u64() != Some(0) || backends != 3 {
            Some(format!(
                "warm-up: {} connections, {} errors (first: {}), {backends} of 3 backends answered",
                v["connections"], v["errors"], v["first_error"]
            ))
        } else {
            None
        };
        if let Some(p) = &problem {
            eprintln!("bench: N={n}: {}: {p}", l.name);
        }
        broken.push(problem);
    }

    let mut samples: Vec<Vec<(Value, Option<f64>)>> = vec![Vec::new(); layouts.len()];
    for round in 0..rounds as usize {
        eprintln!(
            "bench: N={n}: round {}/{} ({} layouts x {seconds} s)",
            round + 1,
            rounds,
            layouts.len()
        );
        for k in 0..layouts.len() {
            let i = (k + round) % layouts.len();
            if broken[i].is_some() {
                continue;
            }
            samples[i].push(rate_run(&layouts[i], seconds, opts.parallel)?);
        }
    }

    let cells = layouts
        .iter()
        .zip(&samples)
        .zip(&broken)
        .map(|((l, runs), problem)| {
            let pick = |key: &str| -> Vec<f64> {
                runs.iter()
                    .map(|(v, _)| v[key].as_f64().unwrap_or(f64::NAN))
                    .collect()
            };
            let rates = pick("rate");
            let errors: u64 = runs.iter().map(|(v, _)| v["errors"].as_u64().unwrap_or(0)).sum();
            let connections: u64 = runs
                .iter()
                .map(|(v, _)| v["connections"].as_u64().unwrap_or(0))
                .sum();
            let agent_cpu: Vec<f64> = runs
                .iter()
                .filter_map(|(v, cpu)| Some(cpu.as_ref()? / v["elapsed_s"].as_f64()?))
                .collect();
            json!({
                "layout": l.name,
                "n": n,
                "target": l.targets.join(" "),
                "problem": problem,
                "rate": median(&rates),
                "rates": rates,
                "connect_p50_us": median(&pick("connect_p50_us")),
                "connect_p99_us": median(&pick("connect_p99_us")),
                "cycle_p50_us": median(&pick("cycle_p50_us")),
                "cycle_p99_us": median(&pick("cycle_p99_us")),
                "connections": connections,
                "errors": errors,
                "first_error": runs.iter().find_map(|(v, _)| v["first_error"].as_str().map(str::to_string)),
                "agent_cpu_fraction": if agent_cpu.is_empty() { Value::Null } else { json!(median(&agent_cpu)) },
                "backends": runs.last().map(|(v, _)| v["backends"].clone()).unwrap_or(Value::Null),
            })
        })
        .collect();
    drop(layouts);
    eprintln!("bench: N={n}: tearing down");
    drop(netfilter);
    drop(ebpf);
    drop(direct);
    Ok((cells, loads))
}

/// kube-proxy's iptables mode for `n` services (nat table only; what a
/// ClusterIP connection from the node traverses): OUTPUT -> KUBE-SERVICES,
/// one rule per service port, a KUBE-SVC chain choosing by `statistic`,
/// a KUBE-SEP chain per endpoint doing the DNAT. The client is in the
/// node's namespace, so KUBE-MARK-MASQ/POSTROUTING do not matter here.
fn iptables_rules(n: usize) -> String {
    let mut chains = String::with_capacity(n * 120);
    let mut rules = String::with_capacity(n * 600);
    chains.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for i in 0..n {
        let svc = format!("KUBE-SVC-{i:05}");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i:05}:http cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            vip(i)
        );
        let count = BACKENDS.len();
        for (j, ip) in BACKENDS.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:05}-{j}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            // kube-proxy: the probability of picking this one among those left.
            let left = count - j;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{i:05}:http -> {ip}:{BACKEND_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{i:05}:http -> {ip}:{BACKEND_PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {ip}/32 -m comment --comment \"bench/svc-{i:05}:http\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"bench/svc-{i:05}:http\" -m tcp -j DNAT --to-destination {ip}:{BACKEND_PORT}"
            );
        }
    }
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

/// kube-proxy's nftables mode for `n` services: a `service-ips` verdict
/// map keyed by address . protocol . port, a chain per service choosing
/// with `numgen random`, a chain per endpoint doing the DNAT, hooked at
/// nat output.
fn nftables_rules(n: usize) -> String {
    let mut s = String::with_capacity(n * 700);
    s.push_str("table ip kube-proxy {\n");
    s.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if n > 0 {
        s.push_str("    elements = {\n");
        for i in 0..n {
            let sep = if i + 1 < n { "," } else { "" };
            let _ = writeln!(
                s,
                "      {} . tcp . {SERVICE_PORT} : goto service-{i:05}{sep}",
                vip(i)
            );
        }
        s.push_str("    }\n");
    }
    s.push_str("  }\n");
    s.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    s.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    s.push_str(
        "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n",
    );
    for i in 0..n {
        let arms: Vec<String> = (0..BACKENDS.len())
            .map(|j| format!("{j} : goto endpoint-{i:05}-{j}"))
            .collect();
        let _ = writeln!(
            s,
            "  chain service-{i:05} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            BACKENDS.len(),
            arms.join(", ")
        );
        for (j, ip) in BACKENDS.iter().enumerate() {
            let _ = writeln!(
                s,
                "  chain endpoint-{i:05}-{j} {{\n    ip saddr {ip} jump mark-for-masquerade\n    meta l4proto tcp dnat to {ip}:{BACKEND_PORT}\n  }}"
            );
        }
    }
    s.push_str("}\n");
    s
}

// --------------------------------------------------------- control plane

/// What feeds the agent in the control-plane runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A manifests directory (`--manifests`).
    Manifests,
    /// The API server double in the box's namespace (`--kubeconfig`).
    Kube,
}

/// The objects behind the agent: files, or the double (and the directory
/// of its kubeconfig).
enum Feed {
    Manifests(TempDir),
    Kube { api: ApiServer, dir: TempDir },
}

impl Feed {
    /// The agent's source flag and its argument.
    fn agent_source(&self) -> Result<(&'static str, PathBuf)> {
        Ok(match self {
            Feed::Manifests(dir) => ("--manifests", dir.path().to_path_buf()),
            Feed::Kube { api, dir } => ("--kubeconfig", api.kubeconfig(dir.path())?),
        })
    }

    /// Moves the probe's single endpoint to `backend`: rewrites its file,
    /// or applies a modified EndpointSlice to the double.
    fn move_probe(&self, backend: &str) -> Result<()> {
        match self {
            Feed::Manifests(dir) => write_atomic(dir.path(), "probe.yaml", &probe_docs(backend)),
            Feed::Kube { api, .. } => {
                api.apply(kube_slice("probe", &[backend.to_string()]));
                Ok(())
            }
        }
    }
}

/// The probe service (1 endpoint at `backend`) as manifests.
fn probe_docs(backend: &str) -> String {
    let mut t = String::new();
    service_docs(&mut t, "probe", PROBE_VIP, &[backend.to_string()]);
    t
}

/// What an API server would return for `service_docs`' Service (with the
/// fields it defaults), built as a `Value` (no YAML to parse).
fn kube_service(name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip,
            "clusterIPs": [vip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP", "targetPort": BACKEND_PORT}],
        },
    })
}

/// The EndpointSlice `<service>-x1` with ready endpoints on this node at
/// `endpoints`, as the EndpointSlice controller writes it.
fn kube_slice(service: &str, endpoints: &[String]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(j, addr)| {
            json!({
                "addresses": [addr],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": NODE_NAME,
                "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("{service}-{j}")},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x1"),
            "namespace": "bench",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// How long the double alone takes to serve what the agent lists at start:
/// every Service and EndpointSlice with kube-proxy's selector, in pages of
/// 500 (kube-runtime's default), each page a GET from a thread of ours in
/// the namespace (the double is in this process, a debug build). Measured
/// before the agent starts; None on any failure.
fn time_double_lists(ns: &Netns, api: &ApiServer) -> Option<f64> {
    use std::io::{Read as _, Write as _};
    const SELECTOR: &str =
        "%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
    let netns = ns.path();
    let addr = api.addr();
    let measure = move || -> Option<f64> {
        let f = fs::File::open(&netns).ok()?;
        // SAFETY: plain syscall; moves only this (short-lived) thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let mut took = Duration::ZERO;
        for path in [
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ] {
            let mut token = String::new();
            // Bounded: at most 1000 pages.
            for _ in 0..1000 {
                let mut target = format!("{path}?labelSelector={SELECTOR}&limit=500");
                if !token.is_empty() {
                    // Continue tokens are hex: nothing to escape.
                    let _ = write!(target, "&continue={token}");
                }
                let start = Instant::now();
                let mut stream = std::net::TcpStream::connect(addr).ok()?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .ok()?;
                write!(
                    stream,
                    "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
                )
                .ok()?;
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).ok()?;
                took += start.elapsed();
                // The head, then `{"kind":..,"metadata":{..,"continue":".."},"items":[`.
                let head = String::from_utf8_lossy(&answer[..answer.len().min(1024)]);
                if !head.starts_with("HTTP/1.1 200") {
                    return None;
                }
                match head.split_once("\"continue\":\"") {
                    Some((_, rest)) => token = rest.split('"').next()?.to_string(),
                    None => break,
                }
            }
        }
        Some(took.as_secs_f64())
    };
    thread::spawn(measure).join().ok().flatten()
}

/// `tail_changes`: how many endpoint changes, one after the other, to
/// time for the tail (0: none).
fn control_plane(
    services: usize,
    endpoints: usize,
    source: Source,
    tail_changes: usize,
) -> Result<Value> {
    let size = format!("{services}x{endpoints}");
    let label = match source {
        Source::Manifests => format!("control plane {size}"),
        Source::Kube => format!("control plane (API server) {size}"),
    };
    let eps =
        |i: usize| -> Vec<String> { (0..endpoints).map(|j| pod_ip(i * endpoints + j)).collect() };
    let tb = Testbox::new(false)?;
    let mut out = json!({
        "source": match source { Source::Manifests => "manifests", Source::Kube => "kube" },
        "services": services,
        "endpoints_per_service": endpoints,
    });
    let feed = match source {
        Source::Manifests => {
            eprintln!("bench: {label}: writing the manifests");
            let manifests = TempDir::new(PREFIX)?;
            let mut text = String::with_capacity(services * (400 + endpoints * 80));
            for i in 0..services {
                service_docs(&mut text, &format!("svc-{i:05}"), &vip(i), &eps(i));
            }
            out["manifest_bytes"] = json!(text.len());
            write_atomic(manifests.path(), "services.yaml", &text)?;
            drop(text);
            write_atomic(manifests.path(), "probe.yaml", &probe_docs(BACKENDS[0]))?;
            Feed::Manifests(manifests)
        }
        Source::Kube => {
            eprintln!("bench: {label}: loading the API server double");
            let api = ApiServer::start(&tb.ns)?;
            let build = Instant::now();
            let mut objects = Vec::with_capacity(2 * services + 3);
            objects.push(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
                "status": {"addresses": [{"type": "InternalIP", "address": CLIENT}]},
            }));
            for i in 0..services {
                let name = format!("svc-{i:05}");
                objects.push(kube_service(&name, &vip(i)));
                objects.push(kube_slice(&name, &eps(i)));
            }
            objects.push(kube_service("probe", PROBE_VIP));
            objects.push(kube_slice("probe", &[BACKENDS[0].to_string()]));
            out["objects"] = json!(objects.len());
            out["build_objects_s"] = json!(build.elapsed().as_secs_f64());
            let apply = Instant::now();
            api.apply(objects);
            out["apply_s"] = json!(apply.elapsed().as_secs_f64());
            out["double_lists_s"] = json!(time_double_lists(&tb.ns, &api));
            eprintln!(
                "bench: {label}: {} objects built in {:.2} s, applied in {:.2} s; the double serves the initial lists in {} s",
                out["objects"],
                out["build_objects_s"].as_f64().unwrap_or(f64::NAN),
                out["apply_s"].as_f64().unwrap_or(f64::NAN),
                fmt_f(&out["double_lists_s"], 2)
            );
            Feed::Kube {
                api,
                dir: TempDir::new(PREFIX)?,
            }
        }
    };

    let cgroup = Cgroup::new(PREFIX)?;
    let pins = PinDir::new(PREFIX)?;
    eprintln!("bench: {label}: starting the agent");
    let mut agent = AgentProc::start(&tb.ns, feed.agent_source()?, &cgroup, &pins)?;
    let healthy = agent.wait_healthy(&tb.ns, Duration::from_secs(120), 3);
    match &healthy {
        Ok(t) => {
            eprintln!(
                "bench: {label}: healthy {:.2} s after start",
                t.as_secs_f64()
            );
            out["start_to_healthy_s"] = json!(t.as_secs_f64());
        }
        Err(e) => {
            eprintln!("bench: {label}: {e}");
            out["start_to_healthy_s"] = Value::Null;
            out["start_problem"] = json!(e);
        }
    }
    out["rss_kib_after_start"] = json!(status_kib(agent.pid(), "VmRSS:"));
    let mut answers = agent.healthz_answers_ms.clone();
    answers.sort_by(|a, b| a.total_cmp(b));
    out["healthz_while_starting"] = json!({
        "answers": answers.len(),
        "median_ms": answers.get(answers.len() / 2),
        "max_ms": answers.last(),
    });

    // What the datapath holds now, and what one `services` call costs.
    let services_call = |pins: &PinDir| -> Result<(Vec<Value>, Duration)> {
        let start = Instant::now();
        let text = run_checked(
            Command::new(proxy_tests::agent_bin())
                .args(["services", "--output", "json", "--bpffs"])
                .arg(pins.path()),
        )?;
        let took = start.elapsed();
        let rows: Vec<Value> = serde_json::from_str(&text).context("services --output json")?;
        Ok((rows, took))
    };
    // The probe's backend address, when it has exactly one.
    let probe_backend = |rows: &[Value]| -> Option<String> {
        let row = rows.iter().find(|r| r["frontend"]["addr"] == PROBE_VIP)?;
        match row["backends"].as_array()?.as_slice() {
            [one] => one["backend"]["addr"].as_str().map(str::to_string),
            _ => None,
        }
    };
    // Converged means every frontend and backend programmed: checked when
    // /healthz says so, and (should it not hold) polled for up to 60 s.
    let (want_frontends, want_backends) = (services + 1, services * endpoints + 1);
    out["frontends_expected"] = json!(want_frontends);
    out["backends_expected"] = json!(want_backends);
    let counts = |rows: &[Value]| -> (usize, usize) {
        let backends = rows
            .iter()
            .map(|r| r["backends"].as_array().map_or(0, Vec::len))
            .sum();
        (rows.len(), backends)
    };
    match services_call(&pins) {
        Ok((rows, took)) => {
            let (frontends, backends) = counts(&rows);
            out["frontends_programmed"] = json!(frontends);
            out["backends_programmed"] = json!(backends);
            out["services_call_s"] = json!(took.as_secs_f64());
            out["probe_before"] = json!(probe_backend(&rows));
            let converged = (frontends, backends) == (want_frontends, want_backends);
            out["converged_at_healthy"] = json!(healthy.is_ok() && converged);
            if healthy.is_ok() && !converged {
                eprintln!(
                    "bench: {label}: healthy with {frontends} frontends / {backends} backends \
                     of {want_frontends} / {want_backends}; waiting for the rest"
                );
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(100));
                    let Ok((rows, _)) = services_call(&pins) else {
                        break;
                    };
                    if counts(&rows) == (want_frontends, want_backends) {
                        out["converged_s"] = json!(agent.started.elapsed().as_secs_f64());
                        break;
                    }
                }
            }
        }
        Err(e) => out["services_problem"] = json!(format!("{e:#}")),
    }

    // One endpoint change, three times: the probe's single endpoint moves
    // to the next backend address; poll `ebpf-proxy services` until shown.
    // A healthy agent gets 30 s per change, a stuck one 10 s, once.
    let change_timeout = Duration::from_secs(if healthy.is_ok() { 30 } else { 10 });
    let mut changes = Vec::new();
    let mut windows = Vec::new();
    let mut poll_costs = Vec::new();
    let mut change_problem = None;
    let metrics_before = fetch_metrics(&tb.ns);
    let mut written_at = Vec::new();
    for (k, next) in [BACKENDS[1], BACKENDS[2], BACKENDS[0]].iter().enumerate() {
        thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        written_at.push(unix_now());
        feed.move_probe(next)?;
        let deadline = start + change_timeout;
        let mut seen = None;
        let mut polls = 0;
        // Start of the last poll that did not see it: a lower bound.
        let mut missed_at = Duration::ZERO;
        while Instant::now() < deadline {
            polls += 1;
            let poll_start = start.elapsed();
            match services_call(&pins) {
                Ok((rows, took)) => {
                    poll_costs.push(took.as_secs_f64());
                    if probe_backend(&rows).as_deref() == Some(*next) {
                        seen = Some(start.elapsed());
                        break;
                    }
                    missed_at = poll_start;
                }
                Err(e) => {
                    change_problem = Some(format!("{e:#}"));
                    break;
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
        match seen {
            Some(t) => {
                eprintln!(
                    "bench: {label}: change {} visible after {:.0} ms ({polls} polls; not yet at {:.0} ms)",
                    k + 1,
                    t.as_secs_f64() * 1000.0,
                    missed_at.as_secs_f64() * 1000.0
                );
                changes.push(t.as_secs_f64());
                windows.push(json!([missed_at.as_secs_f64(), t.as_secs_f64()]));
            }
            None => {
                let p = change_problem.get_or_insert_with(|| {
                    format!(
                        "change {} (probe endpoint -> {next}) not visible within {change_timeout:?}",
                        k + 1
                    )
                });
                eprintln!("bench: {label}: {p}");
                break;
            }
        }
    }
    out["endpoint_change_s"] = json!(changes);
    out["endpoint_change_windows_s"] = json!(windows);
    // The agent's own view of those changes: from the change reaching it
    // (after its manifest poll) to the datapath having it.
    let metrics_after = fetch_metrics(&tb.ns);
    let delta = |name: &str| Some(metric(&metrics_after, name)? - metric(&metrics_before, name)?);
    out["changes_programming_sum_s"] = json!(delta(PROG_SUM));
    out["changes_programming_count"] = json!(delta(PROG_COUNT));
    out["endpoint_change_median_s"] = if changes.is_empty() {
        Value::Null
    } else {
        json!(median(&changes))
    };
    out["services_poll_median_s"] = if poll_costs.is_empty() {
        Value::Null
    } else {
        json!(median(&poll_costs))
    };
    if tail_changes > 0 && change_problem.is_none() {
        eprintln!("bench: {label}: {tail_changes} endpoint changes, one after the other");
        out["endpoint_change_tail"] =
            control_tail::endpoint_changes(&feed, &agent.log, tail_changes)?;
    }
    out["change_problem"] = json!(change_problem);
    out["rss_kib"] = json!(status_kib(agent.pid(), "VmRSS:"));
    out["maps_memlock_bytes"] = json!(control_tail::maps_memlock_bytes(agent.pid()));
    out["hwm_kib"] = json!(status_kib(agent.pid(), "VmHWM:"));
    out["agent_cpu_s"] = json!(cpu_seconds(agent.pid()));
    out["agent_age_s"] = json!(agent.started.elapsed().as_secs_f64());

    // The agent's own sync-duration metric.
    let body = fetch_metrics(&tb.ns);
    out["sync_duration_sum_s"] = json!(metric(&body, SYNC_SUM));
    out["sync_duration_count"] = json!(metric(&body, SYNC_COUNT));
    out["service_ports_over_capacity"] = json!(metric(&body, OVER_CAPACITY));
    if body.is_empty() {
        out["metrics_problem"] = json!(format!("no answer from {METRICS}/metrics"));
    }
    let alive = agent.child.try_wait().ok().flatten().is_none();
    out["agent_alive_at_end"] = json!(alive);
    agent.child.kill();
    let scan = scan_log(&agent.log);
    let started_unix = agent.started_unix;
    drop(agent);
    out["agent_log"] = json!({
        "lines": scan.lines,
        "bytes": scan.bytes,
        "errors": scan.errors,
        "first_errors": scan.first_errors,
        "error_kinds": scan.kinds,
        "probe_error": scan.probe_error,
        "last_synced": scan.last_synced,
    });
    // When the agent logged the first sync that wrote something after
    // each rewrite: the datapath had the change then.
    let logged: Vec<Option<f64>> = written_at
        .iter()
        .map(|&w| {
            scan.syncs
                .iter()
                .find(|(t, wrote)| *t >= w && *wrote)
                .map(|(t, _)| t - w)
        })
        .collect();
    out["endpoint_change_logged_s"] = json!(logged);
    // The first sync that wrote anything: the initial programming.
    out["first_sync_logged_s"] = json!(
        scan.syncs
            .iter()
            .find(|(_, wrote)| *wrote)
            .map(|(t, _)| t - started_unix)
    );
    drop(pins);
    drop(cgroup);
    drop(feed);
    drop(tb);
    Ok(out)
}

// ---------------------------------------------------------------- report

fn fmt_f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".to_string(),
    }
}

fn render(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        s,
        "ebpf-proxy benchmarks{}: {} CPUs ({}), kernel {}\n  {}; {}\n",
        if r["quick"] == true { " (--quick)" } else { "" },
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["iptables"].as_str().unwrap_or("?"),
        m["nft"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "Machine load: {} of all CPUs busy with other work in the second before the\n  bench; load average {} at the start, {} at the end. Our processes ran at nice {}.\n",
        r["background_cpu_busy"]
            .as_f64()
            .map(|x| format!("{:.0}%", x * 100.0))
            .unwrap_or_else(|| "?".into()),
        r["loadavg_at_start"].as_str().unwrap_or("?"),
        r["loadavg_at_end"].as_str().unwrap_or("?"),
        r["nice"]
    );
    if r["connection_rate"].is_object() {
        render_connection_rate(&mut s, &r["connection_rate"]);
    }
    let cps = r["control_plane"].as_array().cloned().unwrap_or_default();
    if !cps.is_empty() {
        let _ = writeln!(
            s,
            "\n2. Control plane: N services x E endpoints (distinct pod addresses) in one\n   multi-document file written before the agent starts, plus a probe service\n   (1 endpoint) in a small file of its own."
        );
    }
    for cp in &cps {
        render_control_plane(&mut s, cp);
    }
    let kube = r["control_plane_kube"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !kube.is_empty() {
        let _ = writeln!(
            s,
            "\n3. Control plane from the API server: the same services, endpoints and probe\n   as Services and EndpointSlices (plus this node's Node) in the API server\n   double, in the agent's namespace; the agent runs with --kubeconfig (list,\n   then watch). An endpoint change is a modified EndpointSlice applied to the\n   double (one watch event)."
        );
    }
    for cp in &kube {
        render_control_plane(&mut s, cp);
    }
    if r["packet_datapath"].is_object() {
        packets::render(&mut s, &r["packet_datapath"]);
    }
    if r["nodeport"].is_object() {
        nodeport::render(&mut s, &r["nodeport"]);
    }
    if r["throughput"].is_object() {
        throughput::render(&mut s, &r["throughput"]);
    }
    results::render_goals(&mut s, r);
    let _ = writeln!(
        s,
        "\ntotal {:.0} s",
        r["total_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    s
}

/// The notes column of a connection-rate cell: why it was not measured,
/// its errors, the agent's CPU.
fn cell_notes(c: &Value) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(p) = c["problem"].as_str() {
        notes.push(format!("NOT MEASURED: {p}"));
    }
    if c["errors"].as_u64().unwrap_or(0) > 0 {
        notes.push(format!(
            "{} errors (first: {})",
            c["errors"],
            c["first_error"].as_str().unwrap_or("?")
        ));
    }
    if let Some(cpu) = c["agent_cpu_fraction"].as_f64() {
        notes.push(format!("agent CPU {:.1}%", cpu * 100.0));
    }
    notes
}

fn render_connection_rate(s: &mut String, rate: &Value) {
    let _ = writeln!(
        s,
        "1. Connection rate: connect, read the greeting line, close (RST); {} client\n   thread(s); each cell is the median of {} interleaved rounds of {} s.\n   conn/s: higher is better; vs direct / vs ebpf: conn/s ratios against those\n   rows of the same N. p50/p99: connect() alone, in microseconds; +p50: p50\n   minus direct's p50 (what the translation adds to each connect).",
        rate["parallel"], rate["rounds"], rate["seconds_per_run"]
    );
    let _ = writeln!(
        s,
        "\n  {:<16} {:>6} {:>8} {:>7} {:>8} {:>7} {:>6} {:>10} {:>8}  notes",
        "layout", "N", "conn/s", "p50 us", "+p50 us", "p99 us", "spread", "vs direct", "vs ebpf",
    );
    let cells = rate["cells"].as_array().cloned().unwrap_or_default();
    let mut ns: Vec<u64> = cells.iter().filter_map(|c| c["n"].as_u64()).collect();
    ns.dedup();
    for n in ns {
        let group: Vec<&Value> = cells.iter().filter(|c| c["n"] == n).collect();
        let rate_of = |name: &str| {
            group
                .iter()
                .find(|c| c["layout"] == name)
                .and_then(|c| c["rate"].as_f64())
                .filter(|x| x.is_finite() && *x > 0.0)
        };
        let direct = rate_of("direct");
        let direct_p50 = group
            .iter()
            .find(|c| c["layout"] == "direct")
            .and_then(|c| c["connect_p50_us"].as_f64());
        let ebpf = rate_of("ebpf-proxy");
        for c in &group {
            let rate = c["rate"].as_f64().filter(|x| x.is_finite());
            let ratio = |base: Option<f64>| match (rate, base) {
                (Some(a), Some(b)) => format!("{:.2}", a / b),
                _ => "-".to_string(),
            };
            let rates: Vec<f64> = c["rates"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let spread = match (
                rates.iter().copied().reduce(f64::min),
                rates.iter().copied().reduce(f64::max),
                rate,
            ) {
                (Some(lo), Some(hi), Some(med)) if med > 0.0 => {
                    format!("{:.0}%", 100.0 * (hi - lo) / med)
                }
                _ => "-".to_string(),
            };
            let notes = cell_notes(c);
            let _ = writeln!(
                s,
                "  {:<16} {:>6} {:>8} {:>7} {:>8} {:>7} {:>6} {:>10} {:>8}  {}",
                c["layout"].as_str().unwrap_or("?"),
                n,
                rate.map(|x| format!("{x:.0}"))
                    .unwrap_or_else(|| "-".into()),
                fmt_f(&c["connect_p50_us"], 1),
                match (c["connect_p50_us"].as_f64(), direct_p50) {
                    (Some(a), Some(b)) => format!("{:+.1}", a - b),
                    _ => "-".into(),
                },
                fmt_f(&c["connect_p99_us"], 1),
                spread,
                ratio(direct),
                ratio(ebpf),
                notes.join("; ")
            );
        }
    }
    let _ = writeln!(
        s,
        "\n  spread = (max - min) / median of the rounds' rates. Setup times (not part of the rates):"
    );
    for l in rate["loads"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            s,
            "    {:<16} N={:<6} {:<28} {:>7.2} s",
            l["layout"].as_str().unwrap_or("?"),
            l["n"],
            l["what"].as_str().unwrap_or("?"),
            l["seconds"].as_f64().unwrap_or(f64::NAN)
        );
    }
}

fn render_control_plane(s: &mut String, cp: &Value) {
    let secs = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.2} s"))
            .unwrap_or_else(|| "-".into())
    };
    let ms = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{:.0} ms", x * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let mib = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{:.1} MiB", x / 1024.0))
            .unwrap_or_else(|| "-".into())
    };
    let kube = cp["source"] == "kube";
    if kube {
        let _ = writeln!(
            s,
            "\n  {} services x {} endpoints ({} objects in the double: built in {}, applied in {})",
            cp["services"],
            cp["endpoints_per_service"],
            cp["objects"],
            secs(&cp["build_objects_s"]),
            secs(&cp["apply_s"]),
        );
    } else {
        let _ = writeln!(
            s,
            "\n  {} services x {} endpoints ({:.1} MB of YAML)",
            cp["services"],
            cp["endpoints_per_service"],
            cp["manifest_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    let _ = writeln!(
        s,
        "    agent start -> /healthz 200:        {}",
        cp["start_problem"]
            .as_str()
            .map(|p| format!("NEVER: {p}"))
            .unwrap_or_else(|| secs(&cp["start_to_healthy_s"]))
    );
    if kube {
        let _ = writeln!(
            s,
            "      the double alone serves the agent's initial lists (pages of 500) in {}\n      (xtask's debug build; measured before the agent started)",
            secs(&cp["double_lists_s"])
        );
    }
    let healthz = &cp["healthz_while_starting"];
    if healthz["answers"].as_u64().is_some_and(|n| n > 0) {
        let _ = writeln!(
            s,
            "      /healthz meanwhile: {} answers, median {:.1} ms, max {:.1} ms (client start included)",
            healthz["answers"],
            healthz["median_ms"].as_f64().unwrap_or(f64::NAN),
            healthz["max_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(t) = cp["first_sync_logged_s"].as_f64() {
        let _ = writeln!(
            s,
            "      first sync that wrote, per the agent log: {:.2} s after start",
            t
        );
    }
    let _ = writeln!(
        s,
        "    in the datapath then:               {} frontends of {} (service ports + the probe), {} backends of {}{}",
        cp["frontends_programmed"],
        cp["frontends_expected"],
        cp["backends_programmed"],
        cp["backends_expected"],
        match (
            cp["converged_at_healthy"].as_bool(),
            cp["converged_s"].as_f64()
        ) {
            (Some(true), _) => ": converged".to_string(),
            (_, Some(t)) => format!(": NOT converged then; all programmed {t:.2} s after start"),
            (Some(false), None) if cp["start_problem"].is_null() => {
                ": NOT converged (not within 60 s more either)".to_string()
            }
            _ => String::new(),
        }
    );
    let changes: Vec<String> = cp["endpoint_change_s"]
        .as_array()
        .map(|a| a.iter().map(ms).collect())
        .unwrap_or_default();
    let windows: Vec<String> = cp["endpoint_change_windows_s"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| format!("{}..{}", ms(&w[0]), ms(&w[1])))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "    endpoint change -> in `services`:   {}",
        match cp["change_problem"].as_str() {
            Some(p) => format!("NEVER: {p}"),
            None => format!(
                "median {} (each: {}; between the last poll that missed it and the one that saw it: {})",
                ms(&cp["endpoint_change_median_s"]),
                changes.join(", "),
                windows.join(", ")
            ),
        }
    );
    let logged: Vec<String> = cp["endpoint_change_logged_s"]
        .as_array()
        .map(|a| a.iter().map(ms).collect())
        .unwrap_or_default();
    if !logged.is_empty() {
        let _ = writeln!(
            s,
            "      the agent logged the sync that wrote it after: {} ({} -> programmed)",
            logged.join(", "),
            if kube { "apply" } else { "write" }
        );
    }
    let (psum, pcount) = (
        cp["changes_programming_sum_s"].as_f64(),
        cp["changes_programming_count"].as_f64(),
    );
    if let (Some(sum), Some(count)) = (psum, pcount)
        && count > 0.0
    {
        let _ = writeln!(
            s,
            "      agent's own network_programming_duration for them: mean {:.0} ms over {count:.0}",
            1000.0 * sum / count
        );
    }
    let tail = &cp["endpoint_change_tail"];
    if tail.is_object() {
        let _ = writeln!(
            s,
            "    {} endpoint changes one after the other, apply -> sync logged: p50 {}, p99 {}, max {}{}",
            tail["changes"],
            ms(&tail["p50_s"]),
            ms(&tail["p99_s"]),
            ms(&tail["max_s"]),
            tail["problem"]
                .as_str()
                .map(|p| format!(" (stopped: {p})"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        s,
        "    one `ebpf-proxy services` call:     {} (the poll's resolution)",
        ms(&cp["services_poll_median_s"])
    );
    let _ = writeln!(
        s,
        "    agent memory:                       VmRSS {} (right after start {}), peak VmHWM {}",
        mib(&cp["rss_kib"]),
        mib(&cp["rss_kib_after_start"]),
        mib(&cp["hwm_kib"]),
    );
    let _ = writeln!(
        s,
        "    kernel memory of its maps:          {} (memlock of the map fds it holds)",
        cp["maps_memlock_bytes"]
            .as_f64()
            .map(|b| format!("{:.1} MiB", b / 1048576.0))
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "    agent CPU time:                     {} in its {} of life",
        secs(&cp["agent_cpu_s"]),
        secs(&cp["agent_age_s"])
    );
    let sum = cp["sync_duration_sum_s"].as_f64();
    let count = cp["sync_duration_count"].as_f64();
    let _ = writeln!(
        s,
        "    kubeproxy_sync_proxy_rules_duration_seconds: sum {} / count {}{}",
        sum.map(|x| format!("{x:.3} s"))
            .unwrap_or_else(|| "-".into()),
        count
            .map(|x| format!("{x:.0}"))
            .unwrap_or_else(|| "-".into()),
        match (sum, count) {
            (Some(s), Some(c)) if c > 0.0 => format!(" (mean {:.0} ms per sync)", 1000.0 * s / c),
            _ => String::new(),
        }
    );
    if let Some(n) = cp["service_ports_over_capacity"].as_f64() {
        let _ = writeln!(s, "    ebpf_proxy_service_ports_over_capacity: {n:.0}");
    }
    let log = &cp["agent_log"];
    let _ = writeln!(
        s,
        "    agent log: {} lines ({:.1} MB), {} ERROR lines; alive at the end: {}",
        log["lines"],
        log["bytes"].as_f64().unwrap_or(0.0) / 1e6,
        log["errors"],
        cp["agent_alive_at_end"]
    );
    if let Some(kinds) = log["error_kinds"].as_object() {
        for (kind, n) in kinds {
            let _ = writeln!(s, "      {n} x {kind}");
        }
    }
    if let Some(p) = log["probe_error"].as_str() {
        let _ = writeln!(s, "      probe: {p}");
    }
    if let (Some(_), Some(l)) = (cp["start_problem"].as_str(), log["last_synced"].as_str()) {
        let _ = writeln!(s, "      last sync: {l}");
    }
}
