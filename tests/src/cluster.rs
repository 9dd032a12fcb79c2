//! A two-node cluster in a box, for the packet-level scenarios, the demo
//! and the benchmarks:
//!
//! ```text
//!  external client 203.0.113.2 ──┐          ┌─ node1 eth0 192.168.0.2, cni0 10.244.1.1/24 ─ pods 10.244.1.x
//!                                ├─ router ─┤  (router: lan0 192.168.0.1/24)
//!  second external 198.51.100.2 ─┘          └─ node2 eth0 192.168.0.3, cni0 10.244.2.1/24 ─ pods 10.244.2.x
//! ```
//! - Router: a bridge `lan0` (192.168.0.1/24) joining the nodes' `eth0`,
//!   one link per external client (203.0.113.1/24, 198.51.100.1/24),
//!   forwarding on, and [`FRONTEND_NET`] (addresses no node owns, for
//!   externalIPs and LoadBalancer IPs) routed via node1; no default route.
//! - Nodes: forwarding on, the other node's pod CIDR via its LAN address,
//!   default route via the router, and [`FRONTEND_NET`] and
//!   [`SERVICE_CIDR`] unreachable, so a frontend address the node does not
//!   translate fails at once (EHOSTUNREACH) instead of looping between
//!   node and router or vanishing behind it.
//! - Pods ([`Cluster::add_pod`]): a namespace on a veth into the node's
//!   `cni0`, default route via the node; their processes run in the node's
//!   cgroup, where the node's agent translates sockets.
//! - External clients: a default route via the router.
//!
//! Safety: every namespace is the box's own and the box has no link to the
//! root namespace, so no packet leaves it; nothing is added to the root
//! namespace. Reverse path filtering is off and ICMP errors are not rate
//! limited in the router and nodes, so the outcomes of a test do not depend
//! on the host's settings.
//!
//! Everything is named `<prefix>-<pid>-<n>` and owned by a guard: dropping
//! the [`Cluster`] (also while a test panics) kills the agents, removes pin
//! directories, cgroups, manifests directories and namespaces. A [`Pod`]
//! is owned by the caller; drop it before the cluster (declare it after).

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{
    Agent, Cgroup, ChildGuard, Netns, PinDir, TempDir, datapath_counters, datapath_explain,
    datapath_services, host_in, json_lines, manifests, run_checked, start_server_in, veth_pair,
};

/// The router's address on the LAN.
pub const ROUTER_LAN_IP: &str = "192.168.0.1";
/// The LAN of the nodes; the agents' default `--nodeport-addresses`.
pub const NODE_CIDR: &str = "192.168.0.0/24";
/// The external client's address.
pub const EXTERNAL_CLIENT_IP: &str = "203.0.113.2";
/// A second external client, in another network (for source ranges).
pub const SECOND_EXTERNAL_CLIENT_IP: &str = "198.51.100.2";
/// Addresses for externalIPs and LoadBalancer IPs that no node owns (a
/// benchmarking range, RFC 2544, so they are never confused with a real
/// network). The router sends them to node1 unless
/// [`Cluster::route_frontend`] says otherwise.
pub const FRONTEND_NET: &str = "198.18.0.0/24";
/// The service CIDR: unreachable on the nodes, so a ClusterIP that is
/// not translated fails at once.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The node devices the agents translate packets on (`--devices`).
pub const AGENT_DEVICES: &str = "eth0";
/// How long [`Node::start_agent`] waits for `/healthz` 200.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Node::wait_for`] waits for the datapath.
const DATAPATH_TIMEOUT: Duration = Duration::from_secs(10);

/// The fixed addressing of node `n` (1 or 2).
struct NodePlan {
    name: &'static str,
    ip: &'static str,
    pod_gateway: &'static str,
    pod_cidr: &'static str,
}

const NODES: [NodePlan; 2] = [
    NodePlan {
        name: "node1",
        ip: "192.168.0.2",
        pod_gateway: "10.244.1.1",
        pod_cidr: "10.244.1.0/24",
    },
    NodePlan {
        name: "node2",
        ip: "192.168.0.3",
        pod_gateway: "10.244.2.1",
        pod_cidr: "10.244.2.0/24",
    },
];

/// An external client's addressing; both ends are in a /24.
struct ExternalPlan {
    ip: &'static str,
    router_ip: &'static str,
    router_if: &'static str,
}

const EXTERNALS: [ExternalPlan; 2] = [
    ExternalPlan {
        ip: EXTERNAL_CLIENT_IP,
        router_ip: "203.0.113.1",
        router_if: "ext1",
    },
    ExternalPlan {
        ip: SECOND_EXTERNAL_CLIENT_IP,
        router_ip: "198.51.100.1",
        router_if: "ext2",
    },
];

/// Forwarding, no reverse path filter, ICMP errors not rate limited.
/// `default` before any interface exists, so every interface inherits it.
const ROUTING_SYSCTLS: [&str; 4] = [
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.icmp_ratelimit=0",
];

/// A node: its namespace (LAN `eth0`, pod bridge `cni0`), the cgroup its
/// pods run in, and its agent's pin directory and manifests directory.
/// Fields drop in order: agent, pins (detaches the programs), cgroup
/// (kills the pods' processes), manifests, namespace.
pub struct Node {
    agent: Option<Agent>,
    agent_args: Vec<String>,
    pins: PinDir,
    cgroup: Cgroup,
    manifests: TempDir,
    netns: Netns,
    plan: &'static NodePlan,
}

impl Node {
    fn new(prefix: &str, router: &Netns, plan: &'static NodePlan) -> Result<Node> {
        let netns = Netns::new(prefix)?;
        netns.sysctl(&ROUTING_SYSCTLS)?;
        let router_port = format!("lan-{}", plan.name);
        veth_pair(router, &router_port, &netns, "eth0")?;
        router.ip(&["link", "set", &router_port, "master", "lan0", "up"])?;
        netns.ip(&["addr", "add", &format!("{}/24", plan.ip), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["link", "add", "cni0", "type", "bridge"])?;
        let gateway = format!("{}/24", plan.pod_gateway);
        netns.ip(&["addr", "add", &gateway, "dev", "cni0"])?;
        netns.ip(&["link", "set", "cni0", "up"])?;
        netns.ip(&["route", "add", "default", "via", ROUTER_LAN_IP])?;
        for unserved in [FRONTEND_NET, SERVICE_CIDR] {
            netns.ip(&["route", "add", "unreachable", unserved])?;
        }
        Ok(Node {
            agent: None,
            agent_args: Vec::new(),
            pins: PinDir::new(prefix)?,
            cgroup: Cgroup::new(prefix)?,
            manifests: TempDir::new(prefix)?,
            netns,
            plan,
        })
    }

    /// `node1` or `node2`: the agent's `--hostname-override` and the
    /// endpoints' `nodeName`.
    pub fn name(&self) -> &'static str {
        self.plan.name
    }

    /// The node's LAN address (on `eth0`).
    pub fn ip(&self) -> &'static str {
        self.plan.ip
    }

    /// The node's address on `cni0`, its pods' default gateway.
    pub fn pod_gateway(&self) -> &'static str {
        self.plan.pod_gateway
    }

    pub fn pod_cidr(&self) -> &'static str {
        self.plan.pod_cidr
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The cgroup of the node's pods (the agent's `--cgroup`).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The agent's `--bpffs`.
    pub fn pins(&self) -> &Path {
        self.pins.path()
    }

    /// The agent's `--manifests`.
    pub fn manifests(&self) -> &Path {
        self.manifests.path()
    }

    /// The running agent, if any.
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// Starts this node's agent and waits until `/healthz` answers 200:
    /// `ebpf-proxy agent --manifests DIR --hostname-override NODE --cgroup
    /// CGROUP --bpffs PINS --healthz-bind-address 127.0.0.1:10256
    /// --devices eth0 --nodeport-addresses 192.168.0.0/24 EXTRA...`, inside
    /// the node's namespace. A flag in `extra_args` replaces the default of
    /// `--devices` or `--nodeport-addresses`. Errors if an agent runs.
    pub fn start_agent(&mut self, extra_args: &[&str]) -> Result<()> {
        if self.agent.is_some() {
            bail!("the agent of {} is already running", self.name());
        }
        self.agent_args = agent_args(self.manifests.path(), extra_args);
        self.launch_agent()
    }

    /// Starts the agent again with the arguments of the last
    /// [`Node::start_agent`] (after [`Node::kill_agent`]).
    pub fn restart_agent(&mut self) -> Result<()> {
        if self.agent_args.is_empty() {
            bail!("the agent of {} was never started", self.name());
        }
        if self.agent.is_some() {
            bail!("the agent of {} is still running", self.name());
        }
        self.launch_agent()
    }

    fn launch_agent(&mut self) -> Result<()> {
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        let agent = Agent::start_with_args(
            &self.netns,
            &args,
            self.cgroup.path(),
            self.pins.path(),
            self.plan.name,
        )?;
        agent
            .wait_healthy(&self.netns, AGENT_START_TIMEOUT)
            .with_context(|| format!("agent of {}", self.name()))?;
        self.agent = Some(agent);
        Ok(())
    }

    /// SIGKILL the agent (its pinned programs and maps stay).
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// What the datapath holds (`ebpf-proxy services --output json`).
    pub fn services(&self) -> Result<Vec<Value>> {
        datapath_services(self.pins.path())
    }

    /// What this node's datapath does with the flow `src -> dst` from
    /// outside ([`datapath_explain`]).
    pub fn explain(&self, src: &str, dst: &str, proto: &str) -> Result<Value> {
        datapath_explain(self.pins.path(), src, dst, proto)
    }

    /// The datapath's counters (`ebpf-proxy counters --output json`).
    pub fn counters(&self) -> Result<BTreeMap<String, u64>> {
        datapath_counters(self.pins.path())
    }

    /// One counter, e.g. `rejected_no_backend`; errors if it does not exist.
    pub fn counter(&self, name: &str) -> Result<u64> {
        self.counters()?
            .get(name)
            .copied()
            .with_context(|| format!("no counter {name:?} in {}", self.pins.path().display()))
    }

    /// The last lines of the agent's log (empty without an agent).
    pub fn agent_log_tail(&self, lines: usize) -> String {
        self.agent
            .as_ref()
            .map(|agent| agent.log_tail(lines))
            .unwrap_or_default()
    }

    /// Waits until `ready(rows)` holds, `rows` being what the datapath
    /// holds ([`Node::services`]): the agent applies manifest changes
    /// asynchronously. Errors after 10 s with the datapath and the log.
    pub fn wait_for(&self, what: &str, ready: impl Fn(&[Value]) -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            let rows = self.services();
            if rows.as_deref().is_ok_and(&ready) {
                return Ok(());
            }
            if start.elapsed() > DATAPATH_TIMEOUT {
                bail!(
                    "timed out waiting for {what} on {}; datapath: {rows:#?}\nagent log:\n{}",
                    self.name(),
                    self.agent_log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        // Write then rename, as editors and ConfigMap volumes do: the agent
        // never reads half a file.
        let staging = self.manifests.path().join(format!(".{file}.tmp"));
        fs::write(&staging, text).with_context(|| format!("write {}", staging.display()))?;
        let path = self.manifests.path().join(file);
        fs::rename(&staging, &path).with_context(|| format!("rename to {}", path.display()))
    }
}

/// `--manifests DIR`, the defaults of `--devices` and
/// `--nodeport-addresses` unless `extra_args` has them, then `extra_args`.
fn agent_args(manifests: &Path, extra_args: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--manifests".to_string(),
        manifests.to_string_lossy().into_owned(),
    ];
    for (flag, value) in [
        ("--devices", AGENT_DEVICES),
        ("--nodeport-addresses", NODE_CIDR),
    ] {
        let given = extra_args
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        if !given {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra_args.iter().map(|a| a.to_string()));
    args
}

/// Endpoints compute their checksums in full, as packets from a real NIC
/// arrive: a local stack's veth otherwise leaves them partial (offload
/// state in the skb), which XDP's in-place rewrite cannot finish.
fn full_checksums(netns: &Netns) -> Result<()> {
    run_checked(Command::new("ip").args([
        "netns",
        "exec",
        netns.name(),
        "ethtool",
        "-K",
        "eth0",
        "tx",
        "off",
    ]))
    .map(drop)
}

/// A client outside the cluster, behind the router.
pub struct External {
    netns: Netns,
    ip: &'static str,
}

impl External {
    fn new(prefix: &str, router: &Netns, plan: &'static ExternalPlan) -> Result<External> {
        let netns = Netns::new(prefix)?;
        veth_pair(router, plan.router_if, &netns, "eth0")?;
        let router_addr = format!("{}/24", plan.router_ip);
        router.ip(&["addr", "add", &router_addr, "dev", plan.router_if])?;
        router.ip(&["link", "set", plan.router_if, "up"])?;
        netns.ip(&["addr", "add", &format!("{}/24", plan.ip), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        full_checksums(&netns)?;
        netns.ip(&["route", "add", "default", "via", plan.router_ip])?;
        Ok(External { netns, ip: plan.ip })
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn ip(&self) -> &'static str {
        self.ip
    }

    /// A `netns-host` command in this client's namespace; add the
    /// subcommand.
    pub fn host(&self) -> Command {
        host_in(&self.netns, None)
    }

    /// Runs `netns-host ARGS` here; its JSON lines.
    pub fn run(&self, args: &[&str]) -> Result<Vec<Value>> {
        json_lines(self.host().args(args))
    }
}

/// A pod: a namespace on a veth into its node's `cni0`, its processes in
/// the node's cgroup. Drop kills its servers and removes the namespace.
pub struct Pod {
    servers: Vec<ChildGuard>,
    netns: Netns,
    name: String,
    ip: String,
    node: &'static str,
    cgroup: PathBuf,
}

impl Pod {
    /// The name its servers answer with.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> &str {
        &self.ip
    }

    /// The name of its node (`nodeName` of its endpoints).
    pub fn node(&self) -> &'static str {
        self.node
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Starts `netns-host serve --name NAME LISTENERS` in the pod (e.g.
    /// `["--tcp", "0.0.0.0:8080", "--udp", "0.0.0.0:5353"]`) and waits
    /// until it listens.
    pub fn serve(&mut self, listeners: &[&str]) -> Result<()> {
        let mut args = vec!["--name", self.name.as_str()];
        args.extend(listeners);
        let server = start_server_in(&self.netns, Some(&self.cgroup), &args)
            .with_context(|| format!("server of pod {}", self.name))?;
        self.servers.push(server);
        Ok(())
    }

    /// Kills the pod's servers.
    pub fn stop_servers(&mut self) {
        self.servers.clear();
    }

    /// A `netns-host` command in the pod (its namespace and its node's
    /// cgroup, so the node's agent translates its sockets).
    pub fn host(&self) -> Command {
        host_in(&self.netns, Some(&self.cgroup))
    }

    /// Runs `netns-host ARGS` in the pod; its JSON lines.
    pub fn run(&self, args: &[&str]) -> Result<Vec<Value>> {
        json_lines(self.host().args(args))
    }
}

/// The two-node cluster: router, nodes, external clients. Fields drop in
/// order: nodes (agents first), external clients, router.
pub struct Cluster {
    nodes: [Node; 2],
    externals: [External; 2],
    router: Netns,
    /// For the pods' namespaces: leftovers of a crashed test go together.
    prefix: String,
}

impl Cluster {
    /// Builds the box; every name starts with `prefix` (3-4 characters,
    /// see [`crate::unique_name`]). Both manifests directories get
    /// `nodes.yaml` with both Node objects (write another `nodes.yaml` to
    /// replace them). Needs root, cgroup2 and bpffs.
    pub fn new(prefix: &str) -> Result<Cluster> {
        let router = Netns::new(prefix)?;
        router.sysctl(&ROUTING_SYSCTLS)?;
        router.ip(&["link", "add", "lan0", "type", "bridge"])?;
        router.ip(&["addr", "add", &format!("{ROUTER_LAN_IP}/24"), "dev", "lan0"])?;
        router.ip(&["link", "set", "lan0", "up"])?;
        let nodes = [
            Node::new(prefix, &router, &NODES[0])?,
            Node::new(prefix, &router, &NODES[1])?,
        ];
        for (node, other) in [(&nodes[0], &nodes[1]), (&nodes[1], &nodes[0])] {
            node.netns
                .ip(&["route", "add", other.pod_cidr(), "via", other.ip()])?;
        }
        let externals = [
            External::new(prefix, &router, &EXTERNALS[0])?,
            External::new(prefix, &router, &EXTERNALS[1])?,
        ];
        router.ip(&["route", "add", FRONTEND_NET, "via", nodes[0].ip()])?;
        let cluster = Cluster {
            nodes,
            externals,
            router,
            prefix: prefix.to_string(),
        };
        let node_objects: Vec<String> = NODES
            .iter()
            .map(|plan| manifests::node(plan.name, plan.ip, plan.pod_cidr, "zone-a"))
            .collect();
        cluster.write_manifest("nodes.yaml", &node_objects.join("---\n"))?;
        Ok(cluster)
    }

    /// Node `n`: 1 or 2. Panics otherwise.
    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    /// Node `n` (1 or 2), to start, kill and restart its agent.
    pub fn node_mut(&mut self, n: usize) -> &mut Node {
        &mut self.nodes[n - 1]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The router's namespace (e.g. `router().ip(&["route", ...])`).
    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// The client at [`EXTERNAL_CLIENT_IP`].
    pub fn external(&self) -> &External {
        &self.externals[0]
    }

    /// The client at [`SECOND_EXTERNAL_CLIENT_IP`].
    pub fn second_external(&self) -> &External {
        &self.externals[1]
    }

    /// Makes the router send `destination` (an address or prefix, e.g.
    /// `192.0.2.10/32`) to node `n`.
    pub fn route_frontend(&self, destination: &str, n: usize) -> Result<()> {
        self.router
            .ip(&["route", "replace", destination, "via", self.node(n).ip()])
    }

    /// Adds pod `name` with address `ip` (inside the node's pod CIDR) on
    /// node `n`; no process runs in it yet.
    pub fn add_pod(&self, n: usize, name: &str, ip: &str) -> Result<Pod> {
        let node = self.node(n);
        let octets: Vec<&str> = ip.split('.').collect();
        let [_, _, third, fourth] = octets[..] else {
            bail!("pod address {ip:?} is not IPv4");
        };
        // Unique per pod address and short (interface names end at 15).
        let node_port = format!("vp{third}-{fourth}");
        let netns = Netns::new(&self.prefix)?;
        veth_pair(&netns, "eth0", &node.netns, &node_port)?;
        node.netns
            .ip(&["link", "set", &node_port, "master", "cni0", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        full_checksums(&netns)?;
        netns.ip(&["route", "add", "default", "via", node.pod_gateway()])?;
        Ok(Pod {
            servers: Vec::new(),
            netns,
            name: name.to_string(),
            ip: ip.to_string(),
            node: node.name(),
            cgroup: node.cgroup.path().to_path_buf(),
        })
    }

    /// [`Cluster::add_pod`], then [`Pod::serve`] with `listeners`.
    pub fn add_backend(&self, n: usize, name: &str, ip: &str, listeners: &[&str]) -> Result<Pod> {
        let mut pod = self.add_pod(n, name, ip)?;
        pod.serve(listeners)?;
        Ok(pod)
    }

    /// Writes manifest `file` into both nodes' manifests directories.
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        self.nodes
            .iter()
            .try_for_each(|node| node.write_manifest(file, text))
    }

    /// Removes manifest `file` from both nodes' directories.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        for node in &self.nodes {
            let path = node.manifests.path().join(file);
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Starts both agents ([`Node::start_agent`] with `extra_args`).
    pub fn start_agents(&mut self, extra_args: &[&str]) -> Result<()> {
        self.nodes
            .iter_mut()
            .try_for_each(|node| node.start_agent(extra_args))
    }

    /// Waits until `ready(rows)` holds on both nodes ([`Node::wait_for`]).
    pub fn wait_for(&self, what: &str, ready: impl Fn(&[Value]) -> bool) -> Result<()> {
        self.nodes
            .iter()
            .try_for_each(|node| node.wait_for(what, &ready))
    }
}

/// Every backend address the frontend rows of [`Node::services`] list.
pub fn backend_addrs(rows: &[Value]) -> BTreeSet<String> {
    rows.iter()
        .filter_map(|row| row["backends"].as_array())
        .flatten()
        .filter_map(|b| b["backend"]["addr"].as_str())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_flags_default_unless_given() {
        let dir = Path::new("/m");
        assert_eq!(
            agent_args(dir, &[]),
            [
                "--manifests",
                "/m",
                "--devices",
                "eth0",
                "--nodeport-addresses",
                "192.168.0.0/24"
            ]
        );
        assert_eq!(
            agent_args(dir, &["--nodeport-addresses", "192.168.0.2/32", "-v"]),
            [
                "--manifests",
                "/m",
                "--devices",
                "eth0",
                "--nodeport-addresses",
                "192.168.0.2/32",
                "-v"
            ]
        );
        assert_eq!(
            agent_args(dir, &["--devices=eth1"]),
            [
                "--manifests",
                "/m",
                "--nodeport-addresses",
                "192.168.0.0/24",
                "--devices=eth1"
            ]
        );
    }
}
