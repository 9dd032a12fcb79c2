//! `ebpf-proxy`: the node agent and the operator's view of the datapath.

use std::{
    io::IsTerminal,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::{IpNet, Ipv4Net};
use proxy_userspace::{
    agent, conntrack, explain, host, inspect,
    model::{NodePortAddresses, Protocol, maglev::TableSize},
    programs::{self, Capacities},
};

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/ebpf-proxy";

#[derive(Parser)]
#[command(
    name = "ebpf-proxy",
    version,
    about = "eBPF service proxy for Kubernetes (kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: attach the datapath and keep it in sync.
    Agent(Box<AgentArgs>),
    /// List the frontends the datapath holds and the backends they select.
    Services(ListArgs),
    /// List the backends the datapath holds.
    Backends(ListArgs),
    /// Show the datapath's event counters.
    Counters(ListArgs),
    /// List the tracked external flows: client, frontend, backend, NAT,
    /// state and time left.
    Conntrack(ListArgs),
    /// Explain what the datapath does with a flow from outside, from the
    /// pinned maps (no packet is sent).
    Explain(ExplainArgs),
    /// Detach the programs and drop every pinned map (stops translation).
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Directory of Service, EndpointSlice, Endpoints and Node manifests
    /// (*.yaml, *.yml, *.json; multi-document) to serve instead of a
    /// cluster; changes apply within 1 s.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Watch the cluster through this kubeconfig. Without it (and without
    /// --manifests) the in-cluster configuration is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name; decides which endpoints are local. Default: the host name.
    #[arg(long)]
    hostname_override: Option<String>,
    /// cgroup v2 directory whose processes get socket-level translation.
    /// Default: the cgroup2 root.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where maps and links are pinned; two agents need two directories.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Address of /healthz and /livez.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// Which node addresses serve NodePorts: "primary" (the node's primary
    /// address) or comma-separated CIDRs ("0.0.0.0/0": every address;
    /// loopback only through a range inside 127.0.0.0/8). IPv6 CIDRs are
    /// accepted and skipped (IPv4 only); without IPv4 ones, "primary".
    #[arg(long, default_value = "primary", value_parser = parse_nodeport_addresses)]
    nodeport_addresses: NodePortAddresses,
    /// Devices external traffic arrives on (comma-separated): NodePorts,
    /// externalIPs and LoadBalancer IPs are translated there by tc.
    /// Default: the device of the default route (none without one: then
    /// only the socket level translates).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// XDP in front of tc on the --devices: auto (native on devices backed
    /// by hardware, off on virtual ones such as veth, bridge, bond, VLAN),
    /// native (in the driver; a device whose driver cannot gets one log
    /// line and tc alone), generic (any device, slower than native) or off.
    #[arg(long, value_enum, default_value = "auto")]
    xdp_mode: XdpModeArg,
    /// Entries of the frontend map (masters, backend slots, rule 9
    /// entries): 100k ClusterIP Services with one endpoint need 400k.
    #[arg(long, default_value_t = Capacities::default().services)]
    max_services: u32,
    /// Entries of the backend map.
    #[arg(long, default_value_t = Capacities::default().backends)]
    max_backends: u32,
    /// Tracked external flows (the conntrack table; LRU, preallocated).
    #[arg(long, default_value_t = Capacities::default().conntrack)]
    conntrack_entries: u32,
    /// Reply/NAT entries of tracked flows (LRU, preallocated).
    #[arg(long, default_value_t = Capacities::default().nat)]
    nat_entries: u32,
    /// Entries M of each Maglev table, which picks the backend of new flows
    /// from outside the node: a prime, at most 131071. Each table takes
    /// M x 4 bytes; the more entries per backend (aim for 100 or more), the
    /// fewer flows move when backends change.
    #[arg(long, default_value_t = TableSize::default(), value_parser = parse_maglev_table_size)]
    maglev_table_size: TableSize,
    /// Address of /metrics (Prometheus text).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// How often the maps are read back and made equal to the desired
    /// state again: entries deleted or changed by anyone else are put back
    /// within one interval.
    #[arg(long, default_value = "30s", value_parser = parse_resync_interval)]
    resync_interval: Duration,
    /// A change that waits longer than this to be programmed, or a source
    /// failing longer than this, fails /healthz.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// What the eBPF programs log into the agent's log (target
    /// proxy_ebpf): rare events such as malformed packets, full tables and
    /// SNAT port exhaustion, at most one line per kind per second per CPU.
    /// The counters (`ebpf-proxy counters`) count every event regardless.
    #[arg(long, value_enum, default_value = "warn")]
    datapath_log_level: DatapathLogLevelArg,
    /// Also destroy connected TCP sockets whose backend was removed, so
    /// the application reconnects to a live one. Off: an established TCP
    /// connection keeps its backend until it closes (rule 29). Connected
    /// UDP sockets to a removed backend are always destroyed (rule 30).
    #[arg(long)]
    destroy_tcp_sockets_to_removed_backends: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum DatapathLogLevelArg {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl DatapathLogLevelArg {
    /// Lets the datapath's lines through the agent's log filter when they
    /// are more verbose than its default (info).
    fn log_directive(self) -> Option<&'static str> {
        match self {
            DatapathLogLevelArg::Debug => Some("proxy_ebpf=debug"),
            DatapathLogLevelArg::Trace => Some("proxy_ebpf=trace"),
            _ => None,
        }
    }
}

impl From<DatapathLogLevelArg> for programs::DatapathLogLevel {
    fn from(level: DatapathLogLevelArg) -> Self {
        match level {
            DatapathLogLevelArg::Off => programs::DatapathLogLevel::Off,
            DatapathLogLevelArg::Error => programs::DatapathLogLevel::Error,
            DatapathLogLevelArg::Warn => programs::DatapathLogLevel::Warn,
            DatapathLogLevelArg::Info => programs::DatapathLogLevel::Info,
            DatapathLogLevelArg::Debug => programs::DatapathLogLevel::Debug,
            DatapathLogLevelArg::Trace => programs::DatapathLogLevel::Trace,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Generic,
    Off,
}

impl From<XdpModeArg> for programs::XdpMode {
    fn from(mode: XdpModeArg) -> Self {
        match mode {
            XdpModeArg::Auto => programs::XdpMode::Auto,
            XdpModeArg::Native => programs::XdpMode::Native,
            XdpModeArg::Generic => programs::XdpMode::Generic,
            XdpModeArg::Off => programs::XdpMode::Off,
        }
    }
}

#[derive(clap::Args)]
struct ListArgs {
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
struct ExplainArgs {
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// The client: ADDR:PORT.
    #[arg(long)]
    src: SocketAddrV4,
    /// The address the client sends to: ADDR:PORT.
    #[arg(long)]
    dst: SocketAddrV4,
    #[arg(long, value_enum)]
    proto: ProtocolArg,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
}

impl From<ProtocolArg> for Protocol {
    fn from(protocol: ProtocolArg) -> Protocol {
        match protocol {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if let Command::Agent(args) = &cli.command
        && let Some(directive) = args.datapath_log_level.log_directive()
        && let Ok(directive) = directive.parse()
    {
        filter = filter.add_directive(directive);
    }
    // Also installs the `log` bridge that carries the programs' aya-log
    // lines into this log.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Agent(args) => run_agent(*args),
        Command::Services(args) => {
            let rows = inspect::frontends(&args.bpffs)?;
            print(
                args.output,
                || serde_json::json!(rows),
                || inspect::frontends_table(&rows),
            )
        }
        Command::Backends(args) => {
            let backends = inspect::backends(&args.bpffs)?;
            print(
                args.output,
                || inspect::backends_json(&backends),
                || inspect::backends_table(&backends),
            )
        }
        Command::Counters(args) => {
            let rows = inspect::counters(&args.bpffs)?;
            print(
                args.output,
                || serde_json::json!(rows),
                || inspect::counters_table(&rows),
            )
        }
        Command::Conntrack(args) => {
            let rows = conntrack::flows::read(&args.bpffs)?;
            print(
                args.output,
                || serde_json::json!(rows),
                || conntrack::flows::flows_table(&rows),
            )
        }
        Command::Explain(args) => {
            let explanation = explain::explain(&args.bpffs, args.src, args.dst, args.proto.into())?;
            print(
                args.output,
                || serde_json::json!(explanation),
                || explain::explanation_table(&explanation),
            )
        }
        Command::Uninstall { bpffs } => programs::uninstall(&bpffs),
    }
}

fn print(
    output: Output,
    json: impl FnOnce() -> serde_json::Value,
    table: impl FnOnce() -> String,
) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json())?),
        Output::Table => print!("{}", table()),
    }
    Ok(())
}

/// As kube-proxy: an empty value is the default, and each IP family takes
/// the CIDRs of its own family; this datapath is IPv4 only, so IPv6 CIDRs
/// (from a dual-stack configuration) are skipped, and a list of IPv6 CIDRs
/// alone leaves IPv4 on the primary address.
fn parse_nodeport_addresses(value: &str) -> Result<NodePortAddresses, String> {
    if value == "primary" || value.trim().is_empty() {
        return Ok(NodePortAddresses::Primary);
    }
    let cidrs = value
        .split(',')
        .map(|cidr| {
            cidr.trim()
                .parse::<IpNet>()
                .map_err(|err| format!("{cidr:?}: {err} (expected \"primary\" or CIDRs)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ipv4: Vec<Ipv4Net> = cidrs
        .into_iter()
        .filter_map(|cidr| match cidr {
            IpNet::V4(cidr) => Some(cidr),
            IpNet::V6(_) => None,
        })
        .collect();
    if ipv4.is_empty() {
        return Ok(NodePortAddresses::Primary);
    }
    Ok(NodePortAddresses::Cidrs(ipv4))
}

fn parse_resync_interval(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(interval) if interval.is_zero() => Err("must be longer than 0s".to_string()),
        Ok(interval) => Ok(interval),
        Err(err) => Err(format!("{value:?}: {err}")),
    }
}

fn parse_maglev_table_size(value: &str) -> Result<TableSize, String> {
    let entries = value.parse().map_err(|err| format!("{value:?}: {err}"))?;
    TableSize::new(entries).map_err(|err| err.to_string())
}

fn run_agent(args: AgentArgs) -> Result<()> {
    let node_name = match args.hostname_override {
        Some(name) => name,
        None => host::hostname()?,
    };
    let cgroup = match args.cgroup {
        Some(cgroup) => cgroup,
        None => programs::default_cgroup2()?,
    };
    let devices = if args.devices.is_empty() {
        programs::default_route_device()?.into_iter().collect()
    } else {
        args.devices
    };
    let source = match args.manifests {
        Some(dir) => agent::SourceConfig::Manifests {
            dir,
            poll_interval: Duration::from_millis(250),
        },
        None => agent::SourceConfig::Kubernetes {
            kubeconfig: args.kubeconfig,
        },
    };
    let config = agent::AgentConfig {
        source,
        node_name,
        cgroup,
        bpffs: args.bpffs,
        healthz_bind_address: args.healthz_bind_address,
        metrics_bind_address: args.metrics_bind_address,
        nodeport_addresses: args.nodeport_addresses,
        devices,
        xdp_mode: args.xdp_mode.into(),
        capacities: Capacities {
            services: args.max_services,
            backends: args.max_backends,
            conntrack: args.conntrack_entries,
            nat: args.nat_entries,
        },
        health_timeout: args.health_timeout,
        maglev_table_size: args.maglev_table_size,
        resync_interval: args.resync_interval,
        datapath_log_level: args.datapath_log_level.into(),
        destroy_tcp_sockets: args.destroy_tcp_sockets_to_removed_backends,
    };
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent::run(config))
}

/// glibc gives each thread that allocates concurrently an arena of its own
/// (up to 8 per core), and memory freed in one is not reused by another:
/// the source, the planner's blocking thread and the servers would each
/// keep a peak's worth. Two arenas measured 4 MiB less resident at 10k
/// Services, with no change in sync times.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn agent_args(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
        let cli = Cli::try_parse_from(["ebpf-proxy", "agent"].iter().chain(extra))?;
        match cli.command {
            Command::Agent(args) => Ok(*args),
            _ => unreachable!("parsed an agent command"),
        }
    }

    #[test]
    fn rule_11_nodeport_addresses_are_primary_or_a_cidr_list() {
        assert_eq!(
            agent_args(&[]).unwrap().nodeport_addresses,
            NodePortAddresses::Primary
        );
        let cidrs = |value: &str| agent_args(&["--nodeport-addresses", value]);
        assert_eq!(
            cidrs("0.0.0.0/0").unwrap().nodeport_addresses,
            NodePortAddresses::Cidrs(vec!["0.0.0.0/0".parse().unwrap()])
        );
        assert_eq!(
            cidrs("192.168.0.0/24, 127.0.0.0/8")
                .unwrap()
                .nodeport_addresses,
            NodePortAddresses::Cidrs(vec![
                "192.168.0.0/24".parse().unwrap(),
                "127.0.0.0/8".parse().unwrap()
            ])
        );
        // Unset in a kube-proxy configuration: the default.
        assert_eq!(
            cidrs("").unwrap().nodeport_addresses,
            NodePortAddresses::Primary
        );
        // A dual-stack list: IPv4 takes its own family's CIDRs, as each of
        // kube-proxy's per-family proxiers does.
        assert_eq!(
            cidrs("fd00::/64,10.0.0.0/8").unwrap().nodeport_addresses,
            NodePortAddresses::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])
        );
        assert_eq!(
            cidrs("::/0").unwrap().nodeport_addresses,
            NodePortAddresses::Primary,
            "no IPv4 CIDR: IPv4 stays on the primary address"
        );
        for (value, why) in [
            ("192.168.0.0/33", "\"192.168.0.0/33\""),
            ("fd00::/129", "\"fd00::/129\""),
            (
                "10.0.0.0/8,fd00::/64,bogus",
                "\"bogus\": invalid IP address syntax (expected \"primary\" or CIDRs)",
            ),
            ("192.168.0.1", "\"192.168.0.1\""),
            ("10.0.0.0/8,", "\"\""),
            ("Primary", "\"Primary\""),
        ] {
            let Err(err) = cidrs(value) else {
                panic!("--nodeport-addresses {value} accepted");
            };
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{value}");
            assert!(err.to_string().contains(why), "{value}: {err}");
        }
    }

    #[test]
    fn resync_interval_defaults_to_30s_and_must_not_be_zero() {
        assert_eq!(
            agent_args(&[]).unwrap().resync_interval,
            Duration::from_secs(30)
        );
        assert_eq!(
            agent_args(&["--resync-interval", "500ms"])
                .unwrap()
                .resync_interval,
            Duration::from_millis(500)
        );
        for value in ["0s", "soon"] {
            let Err(err) = agent_args(&["--resync-interval", value]) else {
                panic!("--resync-interval {value} accepted");
            };
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{value}");
        }
    }

    #[test]
    fn tcp_socket_termination_is_off_unless_asked() {
        assert!(
            !agent_args(&[])
                .unwrap()
                .destroy_tcp_sockets_to_removed_backends
        );
        assert!(
            agent_args(&["--destroy-tcp-sockets-to-removed-backends"])
                .unwrap()
                .destroy_tcp_sockets_to_removed_backends
        );
    }

    #[test]
    fn datapath_log_level_defaults_to_warn_and_opens_the_filter_for_debug() {
        let level = agent_args(&[]).unwrap().datapath_log_level;
        assert_eq!(
            programs::DatapathLogLevel::from(level),
            programs::DatapathLogLevel::Warn
        );
        assert_eq!(level.log_directive(), None);
        let level = agent_args(&["--datapath-log-level", "debug"])
            .unwrap()
            .datapath_log_level;
        assert_eq!(level.log_directive(), Some("proxy_ebpf=debug"));
        assert!(agent_args(&["--datapath-log-level", "loud"]).is_err());
    }

    #[test]
    fn maglev_table_size_defaults_and_must_be_a_prime_within_the_limit() {
        assert_eq!(
            agent_args(&[]).unwrap().maglev_table_size,
            TableSize::default()
        );
        assert_eq!(
            agent_args(&["--maglev-table-size", "251"])
                .unwrap()
                .maglev_table_size
                .get(),
            251
        );
        for (value, why) in [
            ("16380", "16380 is not a prime"),
            ("0", "0 is outside 1..=131071"),
            ("131101", "131101 is outside 1..=131071"),
            ("many", "\"many\": invalid digit"),
        ] {
            let Err(err) = agent_args(&["--maglev-table-size", value]) else {
                panic!("--maglev-table-size {value} accepted");
            };
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{value}");
            assert!(err.to_string().contains(why), "{value}: {err}");
        }
    }
}
