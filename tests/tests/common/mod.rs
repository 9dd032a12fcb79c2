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
    Agent, Cgroup, ChildGuard, Netns, PinDir, TempDir, agent_bin, host, json_lines, start_server,
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
        let agent = Agent::start(
            &self.netns,
            self.manifests.path(),
            self.cgroup.path(),
            self.pins.path(),
            NODE,
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

/// `ebpf-proxy services --output json --bpffs PINS`; `Err(stderr)` while
/// the maps are not (all) pinned yet.
pub fn try_services(pins: &Path) -> Result<Vec<Value>, String> {
    let out = Command::new(agent_bin())
        .args(["services", "--output", "json", "--bpffs"])
        .arg(pins)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone())
}

/// [`try_services`], which must succeed.
pub fn services(pins: &Path) -> Vec<Value> {
    try_services(pins).unwrap_or_else(|stderr| panic!("{stderr}"))
}

/// `  - {name: http, port: 80, protocol: TCP}` lines. Ports are `u32` so
/// that tests can write invalid ones.
fn port_lines(ports: &[(&str, u32, &str)]) -> String {
    let lines: Vec<String> = ports
        .iter()
        .map(|(name, port, proto)| format!("  - {{name: {name}, port: {port}, protocol: {proto}}}"))
        .collect();
    lines.join("\n")
}

/// A Service in namespace `demo` on [`VIP`]; `extra_spec` is spec lines.
pub fn service(name: &str, ports: &[(&str, u32, &str)], extra_spec: &str) -> String {
    service_with(name, VIP, ports, "", extra_spec)
}

/// A Service in namespace `demo` on `vip` with `labels` (`key: value, ...`,
/// none if empty); `extra_spec` is spec lines.
pub fn service_with(
    name: &str,
    vip: &str,
    ports: &[(&str, u32, &str)],
    labels: &str,
    extra_spec: &str,
) -> String {
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(", labels: {{{labels}}}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo{labels}}}\nspec:\n  clusterIP: {vip}\n{extra_spec}  ports:\n{}\n",
        port_lines(ports)
    )
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
    let endpoints: Vec<String> = addrs
        .iter()
        .map(|addr| {
            format!("  - {{addresses: ['{addr}'], conditions: {{ready: true}}, nodeName: {NODE}}}")
        })
        .collect();
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(", {labels}")
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {service}{labels}}}\naddressType: IPv4\nports:\n{}\nendpoints:{}\n{}\n",
        port_lines(ports),
        if endpoints.is_empty() { " []" } else { "" },
        endpoints.join("\n")
    )
}

/// "backend-2 10.244.0.2:40000" -> ("backend-2", "10.244.0.2")
pub fn reply_parts(result: &Value) -> (String, String) {
    assert_eq!(result["ok"], true, "{result}");
    let reply = result["reply"].as_str().unwrap();
    let (name, peer) = reply.trim().split_once(' ').unwrap();
    let peer_ip = peer.rsplit_once(':').unwrap().0;
    (name.to_string(), peer_ip.to_string())
}

/// "backend-2 10.244.0.2:40000" -> "backend-2"
pub fn reply_name(result: &Value) -> String {
    reply_parts(result).0
}

/// How many replies each backend sent.
pub fn spread(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        *counts.entry(reply_name(result)).or_insert(0) += 1;
    }
    counts
}

/// One TCP connection from the client through a frontend, held open.
/// `open` returns once the connection is established (the backend's
/// greeting has arrived), so nothing a test changes afterwards can race
/// the connect; `echo` sends a line and waits for the backend's echo.
pub struct HeldConnection {
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    _client: ChildGuard,
    /// `{"ok":true,"reply":"backend-N CLIENT:PORT",...}`.
    pub greeting: Value,
}

impl HeldConnection {
    pub fn open(node: &TestNode, to: &str) -> HeldConnection {
        let mut client = ChildGuard::spawn(
            host(&node.netns, Some(&node.cgroup))
                .args([
                    "tcp",
                    "--to",
                    to,
                    "--bind",
                    CLIENT,
                    "--stdin",
                    "--timeout-ms",
                    "10000",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped()),
        )
        .unwrap();
        let stdin = client.child_mut().stdin.take().unwrap();
        let stdout = std::io::BufReader::new(client.child_mut().stdout.take().unwrap());
        let mut held = HeldConnection {
            stdin,
            stdout,
            _client: client,
            greeting: Value::Null,
        };
        held.greeting = held.next_line();
        assert_eq!(
            held.greeting["ok"], true,
            "connecting to {to}: {}",
            held.greeting
        );
        held
    }

    /// Sends `line`; the backend's answer (`{"ok":true,"echo":line}`).
    pub fn echo(&mut self, line: &str) -> Value {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
        self.next_line()
    }

    fn next_line(&mut self) -> Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON line: {line:?}"))
    }
}
