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
    process::Command,
    thread,
    time::{Duration, Instant},
};

use proxy_tests::{
    Agent, Cgroup, ChildGuard, Netns, PinDir, TempDir, agent_bin, host, json_lines, start_server,
};
use serde_json::Value;

pub const CLIENT: &str = "10.244.0.2";
pub const BACKENDS: [&str; 3] = ["10.244.0.11", "10.244.0.12", "10.244.0.13"];
pub const VIP: &str = "10.96.0.10";
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
            "socket-level tests need root"
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

    pub fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors and ConfigMap volumes do: the agent
        // never reads half a file.
        let staging = self.manifests.path().join(format!(".{file}.tmp"));
        fs::write(&staging, text).unwrap();
        fs::rename(&staging, self.manifests.path().join(file)).unwrap();
    }

    pub fn start_agent(&mut self) {
        let agent = Agent::start(
            &self.netns,
            self.manifests.path(),
            self.cgroup.path(),
            self.pins.path(),
            "node-1",
        )
        .unwrap();
        agent
            .wait_healthy(&self.netns, Duration::from_secs(20))
            .unwrap();
        self.agent = Some(agent);
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
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

    pub fn udp(&self, to: &str, count: u32, extra: &[&str]) -> Vec<Value> {
        let count = count.to_string();
        let mut args = vec!["udp", "--to", to, "--count", &count, "--bind", CLIENT];
        args.extend(extra);
        self.client(&args)
    }

    /// `ebpf-proxy services --output json`, read from the pins.
    pub fn services(&self) -> Vec<Value> {
        let out = Command::new(agent_bin())
            .args(["services", "--output", "json", "--bpffs"])
            .arg(self.pins.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits until the datapath holds what `ready` accepts: the agent
    /// applies manifest changes asynchronously.
    pub fn wait_for(&self, what: &str, ready: impl Fn(&Vec<Value>) -> bool) {
        let start = Instant::now();
        loop {
            let services = self.services();
            if ready(&services) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}; datapath: {services:#?}\nagent log:\n{}",
                self.agent().log_tail(30)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn service(name: &str, ports: &[(&str, u16, &str)], extra_spec: &str) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(port_name, port, proto)| {
            format!("  - {{name: {port_name}, port: {port}, protocol: {proto}}}")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {VIP}\n{extra_spec}  ports:\n{}\n",
        ports.join("\n")
    )
}

pub fn slice(service: &str, ports: &[(&str, u16, &str)], endpoints: &[(&str, bool)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(name, port, proto)| format!("  - {{name: {name}, port: {port}, protocol: {proto}}}"))
        .collect();
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(addr, ready)| {
            format!("  - {{addresses: [{addr}], conditions: {{ready: {ready}}}, nodeName: node-1}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n{}\nendpoints:\n{}\n",
        ports.join("\n"),
        endpoints.join("\n")
    )
}

pub fn all_ready() -> Vec<(&'static str, bool)> {
    BACKENDS.iter().map(|addr| (*addr, true)).collect()
}

/// "backend-2 10.244.0.2:40000" -> ("backend-2", "10.244.0.2")
pub fn reply_parts(result: &Value) -> (String, String) {
    assert_eq!(result["ok"], true, "{result}");
    let reply = result["reply"].as_str().unwrap();
    let (name, peer) = reply.trim().split_once(' ').unwrap();
    let peer_ip = peer.rsplit_once(':').unwrap().0;
    (name.to_string(), peer_ip.to_string())
}

pub fn spread(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        *counts.entry(reply_parts(result).0).or_insert(0) += 1;
    }
    counts
}
