//! Socket-level load balancing, black box: the real agent binary, the real
//! programs attached to a child cgroup, real TCP and UDP sockets.
//!
//! Layout of every test: one network namespace of its own with the client
//! address 10.244.0.2 and backends 10.244.0.11-13 on `lo`; the client runs in
//! that namespace AND in the test's cgroup. The namespace has no route to
//! the service CIDR, so an untranslated connect fails with ENETUNREACH and
//! nothing ever leaves it. Rule numbers refer to SERVICE-SEMANTICS.md.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use proxy_tests::{Agent, Cgroup, ChildGuard, Netns, PinDir, TempDir, agent_bin, host, json_lines, start_server};
use serde_json::Value;

const CLIENT: &str = "10.244.0.2";
const BACKENDS: [&str; 3] = ["10.244.0.11", "10.244.0.12", "10.244.0.13"];
const VIP: &str = "10.96.0.10";
const ECONNREFUSED: i64 = 111;
const ENETUNREACH: i64 = 101;

/// One test's world. Fields drop in order: agent, servers, manifests, pins
/// (detaches the programs), cgroup (kills clients), namespace.
struct Box {
    agent: Option<Agent>,
    _servers: Vec<ChildGuard>,
    manifests: TempDir,
    pins: PinDir,
    cgroup: Cgroup,
    netns: Netns,
}

impl Box {
    fn new(prefix: &str) -> Box {
        assert!(unsafe { libc::geteuid() } == 0, "socket-level tests need root");
        let netns = Netns::new(prefix).unwrap();
        for addr in std::iter::once(CLIENT).chain(BACKENDS) {
            netns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]).unwrap();
        }
        let servers = BACKENDS
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let name = format!("backend-{}", i + 1);
                let listeners: Vec<String> = [("--tcp", 8080), ("--tcp", 8443), ("--udp", 5353), ("--udp", 8080)]
                    .iter()
                    .flat_map(|(kind, port)| [kind.to_string(), format!("{addr}:{port}")])
                    .collect();
                let mut args = vec!["--name", &name];
                args.extend(listeners.iter().map(String::as_str));
                start_server(&netns, &args).unwrap()
            })
            .collect();
        Box {
            agent: None,
            _servers: servers,
            manifests: TempDir::new(prefix).unwrap(),
            pins: PinDir::new(prefix).unwrap(),
            cgroup: Cgroup::new(prefix).unwrap(),
            netns,
        }
    }

    fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors and ConfigMap volumes do: the agent
        // never reads half a file.
        let staging = self.manifests.path().join(format!(".{file}.tmp"));
        fs::write(&staging, text).unwrap();
        fs::rename(&staging, self.manifests.path().join(file)).unwrap();
    }

    fn start_agent(&mut self) {
        let agent = Agent::start(&self.netns, self.manifests.path(), self.cgroup.path(), self.pins.path(), "node-1").unwrap();
        agent.wait_healthy(&self.netns, Duration::from_secs(20)).unwrap();
        self.agent = Some(agent);
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    /// A client inside the namespace and the cgroup.
    fn client(&self, args: &[&str]) -> Vec<Value> {
        json_lines(host(&self.netns, Some(&self.cgroup)).args(args)).unwrap()
    }

    fn tcp(&self, to: &str, count: u32) -> Vec<Value> {
        self.client(&["tcp", "--to", to, "--count", &count.to_string(), "--bind", CLIENT])
    }

    fn udp(&self, to: &str, count: u32, extra: &[&str]) -> Vec<Value> {
        let count = count.to_string();
        let mut args = vec!["udp", "--to", to, "--count", &count, "--bind", CLIENT];
        args.extend(extra);
        self.client(&args)
    }

    /// `ebpf-proxy services --output json`, read from the pins.
    fn services(&self) -> Vec<Value> {
        let out = Command::new(agent_bin())
            .args(["services", "--output", "json", "--bpffs"])
            .arg(self.pins.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
    }

    /// Waits until the datapath holds what `ready` accepts: the agent
    /// applies manifest changes asynchronously.
    fn wait_for(&self, what: &str, ready: impl Fn(&Vec<Value>) -> bool) {
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

fn service(name: &str, ports: &[(&str, u16, &str)], extra_spec: &str) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(port_name, port, proto)| format!("  - {{name: {port_name}, port: {port}, protocol: {proto}}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {VIP}\n{extra_spec}  ports:\n{}\n",
        ports.join("\n")
    )
}

fn slice(service: &str, ports: &[(&str, u16, &str)], endpoints: &[(&str, bool)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(name, port, proto)| format!("  - {{name: {name}, port: {port}, protocol: {proto}}}"))
        .collect();
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(addr, ready)| format!("  - {{addresses: [{addr}], conditions: {{ready: {ready}}}, nodeName: node-1}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n{}\nendpoints:\n{}\n",
        ports.join("\n"),
        endpoints.join("\n")
    )
}

fn all_ready() -> Vec<(&'static str, bool)> {
    BACKENDS.iter().map(|addr| (*addr, true)).collect()
}

/// "backend-2 10.244.0.2:40000" -> ("backend-2", "10.244.0.2")
fn reply_parts(result: &Value) -> (String, String) {
    assert_eq!(result["ok"], true, "{result}");
    let reply = result["reply"].as_str().unwrap();
    let (name, peer) = reply.trim().split_once(' ').unwrap();
    let peer_ip = peer.rsplit_once(':').unwrap().0;
    (name.to_string(), peer_ip.to_string())
}

fn spread(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        *counts.entry(reply_parts(result).0).or_insert(0) += 1;
    }
    counts
}

#[test]
fn rules_08_10_cluster_ip_spreads_tcp_and_keeps_the_client_source() {
    let mut node = Box::new("epsa");
    node.write("web.yaml", &service("web", &[("http", 80, "TCP")], ""));
    node.write("web-slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()));
    node.start_agent();

    let results = node.tcp(&format!("{VIP}:80"), 100);
    for result in &results {
        let (_, source) = reply_parts(result);
        assert_eq!(source, CLIENT, "rule 10: the backend sees the pod's own address");
        assert_eq!(result["peer"], format!("{VIP}:80"), "getpeername() shows the frontend");
    }
    // Scenario 3: 100 connections reach all 3 backends, none above 50%.
    let counts = spread(&results);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|n| *n <= 50), "{counts:?}");
}

#[test]
fn scenario_01_named_port_maps_to_the_slice_port_number() {
    let mut node = Box::new("epsb");
    node.write(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("web", &[("http", 80, "TCP"), ("https", 443, "TCP")], ""),
            slice("web", &[("https", 8443, "TCP"), ("http", 8080, "TCP")], &all_ready()[..1])
        ),
    );
    node.start_agent();
    let result = &node.tcp(&format!("{VIP}:443"), 1)[0];
    assert_eq!(reply_parts(result).0, "backend-1");
    let rows = node.services();
    let https = rows.iter().find(|row| row["frontend"]["port"] == 443).unwrap();
    assert_eq!(https["backends"][0]["backend"]["port"], 8443);
}

#[test]
fn scenario_02_tcp_and_udp_on_one_port_are_independent() {
    let mut node = Box::new("epsc");
    let ports = [("web", 8080, "TCP"), ("dns", 8080, "UDP")];
    node.write("svc.yaml", &service("web", &[("web", 80, "TCP"), ("dns", 80, "UDP")], ""));
    node.write("slice.yaml", &slice("web", &ports, &all_ready()));
    node.start_agent();

    let to = format!("{VIP}:80");
    assert_eq!(node.tcp(&to, 1)[0]["ok"], true);
    let udp = node.udp(&to, 3, &[]);
    assert!(udp.iter().all(|r| r["ok"] == true), "{udp:?}");

    // Remove the UDP port from the Service: UDP stops, TCP keeps working.
    node.write("svc.yaml", &service("web", &[("web", 80, "TCP")], ""));
    node.wait_for("the UDP frontend to go", |rows| rows.len() == 1);
    assert_eq!(node.tcp(&to, 1)[0]["ok"], true);
    let udp = node.udp(&to, 1, &["--timeout-ms", "300"]);
    assert_eq!(udp[0]["ok"], false, "{udp:?}");
    assert_eq!(udp[0]["errno"], ENETUNREACH, "untranslated: no route: {udp:?}");
}

#[test]
fn unconnected_udp_replies_appear_to_come_from_the_frontend() {
    let mut node = Box::new("epsd");
    node.write("svc.yaml", &service("dns", &[("dns", 53, "UDP")], ""));
    node.write("slice.yaml", &slice("dns", &[("dns", 5353, "UDP")], &all_ready()));
    node.start_agent();

    let to = format!("{VIP}:53");
    for result in node.udp(&to, 10, &[]) {
        assert_eq!(result["from"], to, "recvfrom() shows the frontend: {result}");
        assert_eq!(reply_parts(&result).1, CLIENT);
    }
    for result in node.udp(&to, 3, &["--connect"]) {
        assert_eq!(result["from"], to, "connected UDP: getpeername() shows the frontend: {result}");
    }
}

#[test]
fn rule_21_no_usable_endpoint_refuses_at_once() {
    let mut node = Box::new("epse");
    node.write("tcp.yaml", &service("web", &[("http", 80, "TCP"), ("dns", 53, "UDP")], ""));
    // Rule 27: not ready and not serving is never used, so nothing is usable.
    let slice_text = slice("web", &[("http", 8080, "TCP"), ("dns", 5353, "UDP")], &[(BACKENDS[0], false)])
        .replace("{ready: false}", "{ready: false, serving: false}");
    node.write("slice.yaml", &slice_text);
    node.start_agent();

    let start = Instant::now();
    let result = &node.tcp(&format!("{VIP}:80"), 1)[0];
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["errno"], ECONNREFUSED, "{result}");
    let udp = &node.udp(&format!("{VIP}:53"), 1, &[])[0];
    assert_eq!(udp["errno"], ECONNREFUSED, "{udp}");
    // Not a timeout: well below the client's 2 s timeout even on a loaded machine.
    assert!(start.elapsed() < Duration::from_millis(1900));

    // An endpoint becomes ready: connections succeed again.
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()[..1]));
    node.wait_for("a backend", |rows| rows.iter().any(|row| row["backends"].as_array().is_some_and(|b| !b.is_empty())));
    assert_eq!(node.tcp(&format!("{VIP}:80"), 1)[0]["ok"], true);
}

#[test]
fn rule_23_client_ip_affinity_sticks_then_spreads_without_it() {
    let mut node = Box::new("epsf");
    let affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n";
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], affinity));
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()));
    node.start_agent();

    let to = format!("{VIP}:80");
    let counts = spread(&node.tcp(&to, 20));
    assert_eq!(counts.len(), 1, "scenario 13: one client, one backend: {counts:?}");
    assert_eq!(node.services()[0]["affinity_timeout"], 300);

    // The chosen backend leaves the set: affinity never points outside it.
    let chosen = counts.keys().next().unwrap().clone();
    let index: usize = chosen.trim_start_matches("backend-").parse().unwrap();
    let remaining: Vec<(&str, bool)> = all_ready().into_iter().filter(|(addr, _)| *addr != BACKENDS[index - 1]).collect();
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &remaining));
    node.wait_for("two backends", |rows| rows[0]["backends"].as_array().unwrap().len() == 2);
    let counts = spread(&node.tcp(&to, 20));
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert!(!counts.contains_key(&chosen), "{counts:?}");

    // Switching affinity off spreads again.
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], ""));
    node.wait_for("affinity off", |rows| rows[0]["affinity_timeout"] == 0);
    assert_eq!(spread(&node.tcp(&to, 30)).len(), 2);
}

#[test]
fn rule_23_affinity_expires_after_its_timeout() {
    let mut node = Box::new("epsg");
    let affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n";
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], affinity));
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()));
    node.start_agent();

    // Each round waits out the timeout (whole seconds, so more than 2 s),
    // then connects once. With affinity expiring, 7 rounds on 3 backends
    // all landing on one has probability 3^-6.
    let to = format!("{VIP}:80");
    let mut seen = BTreeMap::new();
    for _ in 0..7 {
        thread::sleep(Duration::from_millis(2100));
        *seen.entry(reply_parts(&node.tcp(&to, 1)[0]).0).or_insert(0) += 1;
    }
    assert!(seen.len() > 1, "affinity never expired: {seen:?}");
}

#[test]
fn tcp_connection_survives_endpoint_removal() {
    let mut node = Box::new("epsh");
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], ""));
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()[..1]));
    node.start_agent();

    let mut client = host(&node.netns, Some(&node.cgroup));
    let mut client = ChildGuard::spawn(
        client
            .args(["tcp", "--to", &format!("{VIP}:80"), "--bind", CLIENT, "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    )
    .unwrap();
    let mut stdin = client.child_mut().stdin.take().unwrap();
    writeln!(stdin, "before").unwrap();

    // Rule 29: the backend leaves the set; the open connection keeps it.
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()[1..2]));
    node.wait_for("the new backend", |rows| rows[0]["backends"][0]["backend"]["addr"] == BACKENDS[1]);
    writeln!(stdin, "after").unwrap();
    drop(stdin);
    let mut out = String::new();
    client.child_mut().stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let echoes: Vec<&Value> = lines.iter().filter(|l| l.get("echo").is_some()).collect();
    assert_eq!(echoes.len(), 2, "{lines:?}");
    assert_eq!(echoes[1]["echo"], "after");
    assert_eq!(reply_parts(&node.tcp(&format!("{VIP}:80"), 1)[0]).0, "backend-2", "new flows use the new set");
}

#[test]
fn restart_keeps_serving_and_applies_changes_made_while_down() {
    let mut node = Box::new("epsi");
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], ""));
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()));
    node.start_agent();
    let to = format!("{VIP}:80");
    let before = node.services();

    node.agent.as_mut().unwrap().kill();
    // Pinned programs and maps keep translating while no agent runs.
    assert!(node.tcp(&to, 10).iter().all(|r| r["ok"] == true));
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()[..2]));
    node.write("gone.yaml", &service("api", &[("grpc", 9090, "TCP")], "").replace(VIP, "10.96.0.20"));

    node.start_agent();
    node.wait_for("the change made while down", |rows| rows.len() == 2 && rows[0]["backends"].as_array().unwrap().len() == 2);
    let after = node.services();
    assert_eq!(after[0]["svc_id"], before[0]["svc_id"], "ids survive the restart");
    assert_eq!(after[0]["backends"][0], before[0]["backends"][0], "backend ids survive the restart");
    assert_eq!(spread(&node.tcp(&to, 30)).len(), 2);

    // Deleted while down: removed on the next start.
    node.agent.as_mut().unwrap().kill();
    fs::remove_file(node.manifests.path().join("gone.yaml")).unwrap();
    node.start_agent();
    node.wait_for("the deleted service to go", |rows| rows.len() == 1);
}

#[test]
fn bad_manifest_is_logged_with_file_and_reason_and_the_rest_keeps_working() {
    let mut node = Box::new("epsj");
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], ""));
    node.write("slice.yaml", &slice("web", &[("http", 8080, "TCP")], &all_ready()));
    node.start_agent();

    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], "").replace(VIP, "10.96.0.999"));
    node.write("broken.yaml", "kind: [unclosed");
    let start = Instant::now();
    loop {
        let log = node.agent().log();
        if log.contains("broken.yaml") && log.contains("10.96.0.999") {
            assert!(log.contains("not valid YAML"), "{log}");
            assert!(log.contains("svc.yaml"), "{log}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "problems not logged:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(node.tcp(&format!("{VIP}:80"), 5).iter().all(|r| r["ok"] == true), "last good state stays");
}

#[test]
fn maps_dump_with_field_names() {
    let mut node = Box::new("epsk");
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], ""));
    node.start_agent();
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(node.pins.path().join("maps/lb4_services"))
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    let formatted = &dump[0]["formatted"];
    for field in ["addr", "port", "proto", "slot"] {
        assert!(formatted["key"].get(field).is_some(), "BTF field {field} missing: {dump}");
    }
    assert_eq!(formatted["value"]["count"], 0);
}

#[test]
fn agent_without_cgroup2_or_bpffs_exits_with_advice() {
    let manifests = TempDir::new("epsl").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(agent_bin())
            .args(["agent", "--manifests"])
            .arg(manifests.path())
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let no_cgroup2 = run(&["--cgroup", "/tmp", "--bpffs", "/sys/fs/bpf/epsl-unused"]);
    assert!(no_cgroup2.contains("not a cgroup v2 directory"), "{no_cgroup2}");
    let no_bpffs = run(&["--bpffs", "/tmp/epsl-not-bpffs"]);
    assert!(no_bpffs.contains("not on a BPF file system"), "{no_bpffs}");
}
