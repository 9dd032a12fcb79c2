//! The fixture shared by the socket-level tests: one network namespace of
//! the test's own with the client address 10.244.0.2 and backends
//! 10.244.0.11-13 on `lo`, backends serving TCP 8080/8443 and UDP
//! 5353/8080; the client runs in that namespace AND in the test's cgroup.
//! The namespace has no route to the service CIDR, so an untranslated
//! connect fails with ENETUNREACH and nothing ever leaves it.
#![allow(dead_code, reason = "each test binary uses part of the fixture")]

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use proxy_tests::{
    Agent, Cgroup, ChildGuard, Netns, PinDir, TempDir, agent_bin, datapath_services, host,
    json_lines, manifests::endpoint_slice, run_checked, start_server,
};
#[allow(unused_imports, reason = "each test binary uses part of the fixture")]
pub use proxy_tests::{
    clients::{HeldConnection, reply_name, reply_parts, spread},
    manifests::service_with,
};
use serde_json::Value;

pub const CLIENT: &str = "10.244.0.2";
pub const BACKENDS: [&str; 3] = ["10.244.0.11", "10.244.0.12", "10.244.0.13"];
pub const VIP: &str = "10.96.0.10";
/// The node the agent runs as (`--hostname-override`) and the endpoints' node.
pub const NODE: &str = "node-1";
pub const ECONNREFUSED: i64 = 111;
pub const ENETUNREACH: i64 = 101;

/// One test's world. Fields drop in order: agent, servers, manifests, pins
/// (detaches the programs), cgroup (kills clients), namespace.
pub struct TestNode {
    pub agent: Option<Agent>,
    _servers: Vec<ChildGuard>,
    pub manifests: TempDir,
    pub pins: PinDir,
    pub cgroup: Cgroup,
    pub netns: Netns,
}

impl TestNode {
    pub fn new(prefix: &str) -> TestNode {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "these tests need root (network namespaces, cgroups, BPF)"
        );
        let netns = Netns::new(prefix).unwrap();
        for addr in std::iter::once(CLIENT).chain(BACKENDS) {
            netns
                .ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
                .unwrap();
        }
        let servers = BACKENDS
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let name = format!("backend-{}", i + 1);
                let listeners: Vec<String> = [
                    ("--tcp", 8080),
                    ("--tcp", 8443),
                    ("--udp", 5353),
                    ("--udp", 8080),
                ]
                .iter()
                .flat_map(|(kind, port)| [kind.to_string(), format!("{addr}:{port}")])
                .collect();
                let mut args = vec!["--name", &name];
                args.extend(listeners.iter().map(String::as_str));
                start_server(&netns, &args).unwrap()
            })
            .collect();
        TestNode {
            agent: None,
            _servers: servers,
            manifests: TempDir::new(prefix).unwrap(),
            pins: PinDir::new(prefix).unwrap(),
            cgroup: Cgroup::new(prefix).unwrap(),
            netns,
        }
    }

    /// A node whose manifests directory holds `files` (name, text), with
    /// its agent started and healthy.
    pub fn serving(prefix: &str, files: &[(&str, &str)]) -> TestNode {
        let mut node = TestNode::new(prefix);
        for (file, text) in files {
            node.write(file, text);
        }
        node.start_agent();
        node
    }

    /// The usual world: Service `web` (http 80 -> 8080) over every backend.
    pub fn web(prefix: &str) -> TestNode {
        TestNode::serving(
            prefix,
            &[
                ("svc.yaml", &service("web", &[("http", 80, "TCP")], "")),
                (
                    "slice.yaml",
                    &slice("web", &[("http", 8080, "TCP")], &BACKENDS),
                ),
            ],
        )
    }

    /// The backends that answered `count` TCP connections to `to`, sorted.
    pub fn answering(&self, to: &str, count: u32) -> Vec<String> {
        spread(&self.tcp(to, count)).into_keys().collect()
    }

    pub fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors and ConfigMap volumes do: the agent
        // never reads half a file.
        let staging = self.manifests.path().join(format!(".{file}.tmp"));
        fs::write(&staging, text).unwrap();
        fs::rename(&staging, self.manifests.path().join(file)).unwrap();
    }

    /// Starts the agent on the manifests directory and waits for /healthz 200.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// [`TestNode::start_agent`] with more agent flags.
    pub fn start_agent_with(&mut self, flags: &[&str]) {
        let manifests = self.manifests.path().to_string_lossy().into_owned();
        let mut args = vec!["--manifests", &manifests];
        args.extend(flags);
        let agent = Agent::start_with_args(
            &self.netns,
            &args,
            self.cgroup.path(),
            self.pins.path(),
            NODE,
        )
        .unwrap();
        agent
            .wait_healthy(&self.netns, Duration::from_secs(30))
            .unwrap();
        self.agent = Some(agent);
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    pub fn agent_mut(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent started")
    }

    /// A client inside the namespace and the cgroup.
    pub fn client(&self, args: &[&str]) -> Vec<Value> {
        json_lines(host(&self.netns, Some(&self.cgroup)).args(args)).unwrap()
    }

    pub fn tcp(&self, to: &str, count: u32) -> Vec<Value> {
        self.client(&[
            "tcp",
            "--to",
            to,
            "--count",
            &count.to_string(),
            "--bind",
            CLIENT,
        ])
    }

    /// One TCP connection from the client through a frontend, held open.
    pub fn hold(&self, to: &str) -> HeldConnection {
        HeldConnection::open(host(&self.netns, Some(&self.cgroup)).args([
            "tcp",
            "--to",
            to,
            "--bind",
            CLIENT,
            "--stdin",
            "--timeout-ms",
            "10000",
        ]))
        .unwrap()
    }

    pub fn udp(&self, to: &str, count: u32, extra: &[&str]) -> Vec<Value> {
        let count = count.to_string();
        let mut args = vec!["udp", "--to", to, "--count", &count, "--bind", CLIENT];
        args.extend(extra);
        self.client(&args)
    }

    /// `ebpf-proxy services --output json`, read from the pins.
    pub fn services(&self) -> Vec<Value> {
        services(self.pins.path())
    }

    /// Waits up to 10 s until the datapath holds what `ready` accepts: the
    /// agent applies changes asynchronously.
    pub fn wait_for(&self, what: &str, ready: impl Fn(&[Value]) -> bool) {
        self.wait_for_within(what, Duration::from_secs(10), ready);
    }

    /// [`TestNode::wait_for`] with another timeout. Before the agent has
    /// pinned its maps there is nothing to read, which is not ready yet.
    pub fn wait_for_within(&self, what: &str, timeout: Duration, ready: impl Fn(&[Value]) -> bool) {
        let start = Instant::now();
        loop {
            let services = try_services(self.pins.path());
            if services.as_deref().is_ok_and(&ready) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; datapath: {services:#?}\nagent log:\n{}",
                self.agent().log_tail(40)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Tries `attempt` every 100 ms for up to 10 s until it gives `Ok`, and
/// panics with its last `Err`. For what the agent does a moment after the
/// listing shows a change: the same sync writes rule 9 wildcards and drops
/// stale affinity pairs last, and opens health servers after it.
pub fn eventually<T>(what: &str, attempt: impl Fn() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match attempt() {
            Ok(done) => return done,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(last) => panic!("timed out waiting for {what}: {last}"),
        }
    }
}

/// `ebpf-proxy counters --output json --bpffs PINS`, by counter name.
pub fn counters(pins: &Path) -> BTreeMap<String, u64> {
    let out = run_checked(
        Command::new(agent_bin())
            .args(["counters", "--output", "json", "--bpffs"])
            .arg(pins),
    )
    .unwrap();
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    rows.iter()
        .map(|row| {
            (
                row["name"].as_str().unwrap().to_string(),
                row["value"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `ebpf-proxy services --output json --bpffs PINS`; `Err(why)` while
/// the maps are not (all) pinned yet.
pub fn try_services(pins: &Path) -> Result<Vec<Value>, String> {
    datapath_services(pins).map_err(|e| format!("{e:#}"))
}

/// [`try_services`], which must succeed.
pub fn services(pins: &Path) -> Vec<Value> {
    try_services(pins).unwrap_or_else(|stderr| panic!("{stderr}"))
}

/// A Service in namespace `demo` on [`VIP`]; `extra_spec` is spec lines.
pub fn service(name: &str, ports: &[(&str, u32, &str)], extra_spec: &str) -> String {
    service_with(name, VIP, ports, "", extra_spec)
}

/// The EndpointSlice `<service>-x1` of `service` with ready endpoints on
/// [`NODE`] at `addrs`.
pub fn slice(service: &str, ports: &[(&str, u32, &str)], addrs: &[&str]) -> String {
    slice_with(&format!("{service}-x1"), service, ports, addrs, "")
}

/// The EndpointSlice `name` of `service` with ready endpoints on [`NODE`]
/// at `addrs` and `labels` (`key: value, ...`) besides the service name.
pub fn slice_with(
    name: &str,
    service: &str,
    ports: &[(&str, u32, &str)],
    addrs: &[&str],
    labels: &str,
) -> String {
    let endpoints: Vec<(&str, &str)> = addrs.iter().map(|addr| (*addr, NODE)).collect();
    endpoint_slice(name, service, ports, &endpoints, labels)
}
