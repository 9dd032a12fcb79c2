//! Packet fixtures for the tc programs, in Katran's and Cilium's manner:
//! each file in `tests/fixtures/tc/` is one case: the map contents, then
//! steps of (packet in, program) -> (verdict, packet out, counters, flows
//! tracked), run on the real programs through `BPF_PROG_TEST_RUN`.
//!
//! The programs run from a thread inside a network namespace of the test's
//! own that looks like node1 of the acceptance layout (eth0 192.168.0.2/24,
//! 10.244.2.0/24 via node2 192.168.0.3, default via 192.168.0.1), so their
//! FIB lookups are answered there. `BPF_PROG_TEST_RUN` sends nothing: a
//! redirect is only a verdict.
//!
//! Every output packet must carry valid IPv4 and L4 checksums, and every
//! counter a step does not name must stay 0 (an unexpected drop fails).

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use etherparse::{IpNumber, Ipv4Header, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use ipnet::Ipv4Net;
use proxy_common::{
    AffinityMatchKey, Backend, Counter, CtEntry, Flow4, RevNat, ServiceKey, ServiceValue,
    SourceRange, backend_flags, map_names, nat_ports, proto, scope, service_flags,
};
use proxy_tests::{Netns, run_checked};
use proxy_userspace::programs::{Capacities, load_detached};
use serde::Deserialize;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// `sizeof(struct __sk_buff)`; `ifindex` is at offset 40.
const SKB_CTX_LEN: usize = 192;
const SKB_IFINDEX_OFF: usize = 40;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    /// What the case proves, and the rule it cites.
    about: String,
    #[serde(default)]
    maps: Maps,
    steps: Vec<Step>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Maps {
    #[serde(default)]
    frontends: Vec<FrontendSpec>,
    /// Backends on this node (DNAT only); every other one is remote.
    #[serde(default)]
    local: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontendSpec {
    /// `addr:port/proto`.
    frontend: String,
    #[serde(default = "external")]
    scope: String,
    #[serde(default)]
    backends: Vec<String>,
    /// `reject` (default) or `drop` when `backends` is empty.
    #[serde(default)]
    when_empty: Option<String>,
    #[serde(default)]
    source_ranges: Vec<Ipv4Net>,
    /// ClientIP affinity timeout in seconds.
    #[serde(default)]
    affinity: u32,
}

fn external() -> String {
    "external".to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    /// `ingress` or `egress`.
    program: String,
    packet: PacketSpec,
    expect: Expect,
}

/// A packet to build. Addresses `addr:port`; the port `snat` stands for the
/// SNAT port an earlier step's output showed.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PacketSpec {
    src: String,
    dst: String,
    /// `tcp` (default), `udp` or `icmp`.
    #[serde(default)]
    proto: Option<String>,
    /// TCP flags: syn, ack, fin, rst, psh.
    #[serde(default)]
    tcp: Vec<String>,
    #[serde(default)]
    ttl: Option<u8>,
    #[serde(default)]
    payload: Option<String>,
    /// UDP sent without a checksum (0).
    #[serde(default)]
    udp_checksum_zero: bool,
    /// Bytes of IPv4 options (NOPs + end), a multiple of 4.
    #[serde(default)]
    ip_options: usize,
    /// An 802.1Q tag in the frame.
    #[serde(default)]
    vlan: Option<u16>,
    /// `first` (more fragments) or `later` (an offset).
    #[serde(default)]
    fragment: Option<String>,
    /// Cut the frame to this many bytes.
    #[serde(default)]
    truncate: Option<usize>,
    /// Overwrite the IHL nibble (checksum fixed).
    #[serde(default)]
    ihl: Option<u8>,
    /// Overwrite the total length (checksum fixed).
    #[serde(default)]
    total_len: Option<u16>,
    /// Overwrite the IPv4 protocol number (checksum fixed).
    #[serde(default)]
    ip_proto: Option<u8>,
    /// An ICMP error (`src`/`dst` are its outer addresses, ports ignored)
    /// quoting this packet.
    #[serde(default)]
    icmp_error: Option<IcmpErrorSpec>,
    /// Ethertype other than IPv4 (e.g. 0x86dd, 0x0806).
    #[serde(default)]
    ethertype: Option<u16>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct IcmpErrorSpec {
    #[serde(rename = "type")]
    kind: u8,
    code: u8,
    /// Next-hop MTU of a fragmentation-needed error.
    #[serde(default)]
    mtu: u16,
    quote: Box<PacketSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// `pass`, `drop` or `redirect`.
    verdict: String,
    /// The packet must come out byte for byte as it went in.
    #[serde(default)]
    unchanged: bool,
    #[serde(default)]
    packet: Option<PacketExpect>,
    /// Counters this step raised (every other one must not move).
    #[serde(default)]
    counters: BTreeMap<String, u64>,
    /// Entries in lb4_ct after the step.
    #[serde(default)]
    flows: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PacketExpect {
    #[serde(default)]
    src: Option<String>,
    #[serde(default)]
    dst: Option<String>,
    #[serde(default)]
    ttl: Option<u8>,
    /// TCP flags that must be set, exactly.
    #[serde(default)]
    tcp: Option<Vec<String>>,
    /// TCP acknowledgment number.
    #[serde(default)]
    ack: Option<u32>,
    /// ICMP `[type, code]`.
    #[serde(default)]
    icmp: Option<[u8; 2]>,
    /// For ICMP errors: the quoted packet's addresses.
    #[serde(default)]
    quote_src: Option<String>,
    #[serde(default)]
    quote_dst: Option<String>,
    /// MAC addresses swapped (an answer sent back out).
    #[serde(default)]
    macs_swapped: bool,
    /// A UDP packet sent without checksum must leave without one.
    #[serde(default)]
    udp_checksum_zero: bool,
}

/// The node1 look-alike the programs' FIB lookups run in.
struct NodeNetns {
    node: Netns,
    _peer: Netns,
    ifindex: u32,
}

fn node_netns() -> NodeNetns {
    let node = Netns::new("eptc").unwrap();
    let peer = Netns::new("eptc").unwrap();
    proxy_tests::veth_pair(&node, "eth0", &peer, "eth0").unwrap();
    for args in [
        &["addr", "add", "192.168.0.2/24", "dev", "eth0"][..],
        &["link", "set", "eth0", "up"],
        &["route", "add", "10.244.2.0/24", "via", "192.168.0.3"],
        &["route", "add", "default", "via", "192.168.0.1"],
    ] {
        node.ip(args).unwrap();
    }
    peer.ip(&["link", "set", "eth0", "up"]).unwrap();
    run_checked(Command::new("ip").args([
        "netns",
        "exec",
        node.name(),
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]))
    .unwrap();
    let index =
        run_checked(Command::new("ip").args(["-n", node.name(), "-o", "link", "show", "eth0"]))
            .unwrap();
    let ifindex = index.split(':').next().unwrap().trim().parse().unwrap();
    NodeNetns {
        node,
        _peer: peer,
        ifindex,
    }
}

fn fixture_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tc");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// One test runs every fixture, in one thread inside the node namespace,
/// and reports every failing case at once.
#[test]
fn tc_packet_fixtures() {
    assert!(unsafe { libc::geteuid() } == 0, "needs root (BPF, netns)");
    let netns = node_netns();
    let files = fixture_files();
    assert!(files.len() >= 30, "only {} fixtures", files.len());
    let failures = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                proxy_tests::enter_netns(netns.node.name()).unwrap();
                let mut failures = Vec::new();
                for file in &files {
                    let name = file.file_stem().unwrap().to_string_lossy().into_owned();
                    if let Err(err) = run_fixture(file, netns.ifindex) {
                        failures.push(format!("{name}: {err:#}"));
                    } else {
                        eprintln!("fixture {name}: ok");
                    }
                }
                failures
            })
            .join()
            .unwrap()
    });
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("{} fixtures passed", files.len());
}

fn run_fixture(file: &Path, ifindex: u32) -> anyhow::Result<()> {
    let text = fs::read_to_string(file)?;
    let fixture: Fixture = serde_yaml::from_str(&text)?;
    anyhow::ensure!(!fixture.about.is_empty(), "say what the fixture proves");
    let mut ebpf = load_detached(&Capacities {
        services: 4096,
        backends: 1024,
        conntrack: 1024,
        nat: 1024,
    })?;
    fill_maps(&mut ebpf, &fixture.maps)?;
    let mut snat_port: Option<u16> = None;
    for (index, step) in fixture.steps.iter().enumerate() {
        run_step(&mut ebpf, step, ifindex, &mut snat_port)
            .map_err(|err| err.context(format!("step {}", index + 1)))?;
    }
    Ok(())
}

fn endpoint(spec: &str, snat_port: Option<u16>) -> anyhow::Result<SocketAddrV4> {
    if let Some(addr) = spec.strip_suffix(":snat") {
        let port = snat_port.ok_or_else(|| anyhow::anyhow!("no SNAT port seen yet"))?;
        return Ok(SocketAddrV4::new(addr.parse()?, port));
    }
    Ok(spec.parse()?)
}

/// `addr:port/proto` -> (addr, port, proto number).
fn service_addr(spec: &str) -> anyhow::Result<(SocketAddrV4, u8)> {
    let (addr, protocol) = spec
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("{spec}: want addr:port/proto"))?;
    Ok((addr.parse()?, protocol_number(protocol)?))
}

fn protocol_number(name: &str) -> anyhow::Result<u8> {
    Ok(match name {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "icmp" => proto::ICMP,
        other => anyhow::bail!("unknown protocol {other}"),
    })
}

fn ne_addr(addr: &Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn fill_maps(ebpf: &mut Ebpf, maps: &Maps) -> anyhow::Result<()> {
    let mut backend_ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut backends: HashMap<MapData, u32, Backend> = map(ebpf, map_names::BACKENDS)?;
    for frontend in &maps.frontends {
        for backend in &frontend.backends {
            if backend_ids.contains_key(backend) {
                continue;
            }
            let id = backend_ids.len() as u32 + 1;
            let (addr, protocol) = service_addr(backend)?;
            let flags = if maps.local.contains(backend) {
                backend_flags::LOCAL
            } else {
                0
            };
            backends.insert(
                id,
                Backend::new(ne_addr(addr.ip()), addr.port().to_be(), protocol, flags),
                0,
            )?;
            backend_ids.insert(backend.clone(), id);
        }
    }
    let mut services: HashMap<MapData, ServiceKey, ServiceValue> = map(ebpf, map_names::SERVICES)?;
    let mut rev_nat: HashMap<MapData, u32, RevNat> = map(ebpf, map_names::REV_NAT)?;
    let ranges_map = ebpf
        .take_map(map_names::SOURCE_RANGES)
        .ok_or_else(|| anyhow::anyhow!("no source-range map"))?;
    let mut ranges: LpmTrie<MapData, SourceRange, u8> = LpmTrie::try_from(ranges_map)?;
    for (index, frontend) in maps.frontends.iter().enumerate() {
        let rev_nat_id = index as u32 + 1;
        let (addr, protocol) = service_addr(&frontend.frontend)?;
        let key_scope = match frontend.scope.as_str() {
            "external" => scope::EXTERNAL,
            "internal" => scope::INTERNAL,
            other => anyhow::bail!("unknown scope {other}"),
        };
        let master_key = ServiceKey::new(
            ne_addr(addr.ip()),
            addr.port().to_be(),
            protocol,
            key_scope,
            0,
        );
        for (slot, backend) in frontend.backends.iter().enumerate() {
            services.insert(
                master_key.with_slot(slot as u16 + 1),
                ServiceValue::slot(backend_ids[backend]),
                0,
            )?;
        }
        let mut flags = 0;
        if frontend.when_empty.as_deref() == Some("drop") {
            flags |= service_flags::DROP_WHEN_EMPTY;
        }
        if !frontend.source_ranges.is_empty() {
            flags |= service_flags::SOURCE_RANGES;
        }
        for range in &frontend.source_ranges {
            let key = Key::new(
                SourceRange::prefix_len(range.prefix_len()),
                SourceRange::new(rev_nat_id, ne_addr(&range.network())),
            );
            ranges.insert(&key, 1, 0)?;
        }
        if frontend.affinity > 0 {
            let mut pairs: HashMap<MapData, AffinityMatchKey, u8> =
                map(ebpf, map_names::AFFINITY_MATCH)?;
            for backend in &frontend.backends {
                let pair = AffinityMatchKey {
                    backend_id: backend_ids[backend],
                    svc_id: rev_nat_id,
                    selection: 0,
                };
                pairs.insert(pair, 1, 0)?;
            }
        }
        rev_nat.insert(
            rev_nat_id,
            RevNat {
                addr: ne_addr(addr.ip()),
                port: addr.port().to_be(),
                _pad0: 0,
            },
            0,
        )?;
        services.insert(
            master_key,
            ServiceValue {
                count: frontend.backends.len() as u16,
                flags,
                svc_id: rev_nat_id,
                affinity_timeout: frontend.affinity,
                rev_nat_id,
                ..ServiceValue::slot(0)
            },
            0,
        )?;
    }
    Ok(())
}

/// A map of the loaded object by name, opened as a hash map.
fn map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| anyhow::anyhow!("no map {name}"))?;
    let data = match map {
        Map::HashMap(data) | Map::LruHashMap(data) => data,
        _ => anyhow::bail!("{name} is not a hash map"),
    };
    // Borrow the map's fd through a fresh handle so several maps can be
    // open at once.
    let info = data.info()?;
    let data = MapData::from_id(info.id())?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

fn counters(ebpf: &Ebpf) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let map = ebpf
        .map(map_names::COUNTERS)
        .ok_or_else(|| anyhow::anyhow!("no counters map"))?;
    let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
    let mut values = BTreeMap::new();
    for counter in Counter::ALL {
        let per_cpu = counters.get(&(counter as u32), 0)?;
        values.insert(counter.name(), per_cpu.iter().sum());
    }
    Ok(values)
}

fn flow_count(ebpf: &mut Ebpf) -> anyhow::Result<usize> {
    let conntrack: HashMap<MapData, Flow4, CtEntry> = map(ebpf, map_names::CONNTRACK)?;
    Ok(conntrack.keys().count())
}

fn run_step(
    ebpf: &mut Ebpf,
    step: &Step,
    ifindex: u32,
    snat_port: &mut Option<u16>,
) -> anyhow::Result<()> {
    let input = build_packet(&step.packet, *snat_port)?;
    let before = counters(ebpf)?;
    let program: &mut SchedClassifier = match step.program.as_str() {
        "ingress" => ebpf.program_mut("tc_ingress"),
        "egress" => ebpf.program_mut("tc_egress"),
        other => anyhow::bail!("unknown program {other}"),
    }
    .ok_or_else(|| anyhow::anyhow!("program missing"))?
    .try_into()?;
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
    let mut output = vec![0u8; 2048];
    let mut options = TestRunOptions::new();
    options.data_in = Some(&input);
    options.data_out = Some(&mut output);
    options.ctx_in = Some(&ctx);
    options.repeat = 1;
    let result = program.test_run(options)?;
    output.truncate(result.data_size_out as usize);

    let verdict = match result.return_value {
        TC_ACT_OK => "pass",
        TC_ACT_SHOT => "drop",
        TC_ACT_REDIRECT => "redirect",
        other => anyhow::bail!("unexpected verdict {other}"),
    };
    anyhow::ensure!(
        verdict == step.expect.verdict,
        "verdict {verdict}, expected {}",
        step.expect.verdict
    );
    if step.expect.unchanged {
        anyhow::ensure!(output == input, "packet changed: {output:02x?}");
    }
    if let Some(want) = &step.expect.packet {
        check_packet(&input, &output, want, snat_port)?;
    }
    let after = counters(ebpf)?;
    for (name, value) in &after {
        let raised = value - before[name];
        let want = step.expect.counters.get(*name).copied().unwrap_or(0);
        anyhow::ensure!(
            raised == want,
            "counter {name} rose by {raised}, expected {want}"
        );
    }
    for name in step.expect.counters.keys() {
        anyhow::ensure!(after.contains_key(name.as_str()), "no counter {name}");
    }
    if let Some(want) = step.expect.flows {
        let flows = flow_count(ebpf)?;
        anyhow::ensure!(flows == want, "{flows} flows tracked, expected {want}");
    }
    Ok(())
}

fn tcp_flag_names(tcp: &etherparse::TcpHeader) -> Vec<&'static str> {
    [
        (tcp.syn, "syn"),
        (tcp.ack, "ack"),
        (tcp.fin, "fin"),
        (tcp.rst, "rst"),
        (tcp.psh, "psh"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name)
    .collect()
}

fn build_packet(spec: &PacketSpec, snat_port: Option<u16>) -> anyhow::Result<Vec<u8>> {
    if let Some(ethertype) = spec.ethertype {
        let mut frame = Vec::new();
        frame.extend_from_slice(&NODE_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(&[0u8; 46]);
        return Ok(frame);
    }
    let mut frame = match &spec.icmp_error {
        Some(error) => icmp_error(spec, error, snat_port)?,
        None => l4_packet(spec, snat_port)?,
    };
    patch_ipv4(&mut frame, spec);
    if let Some(vlan) = spec.vlan {
        let tag = [0x81, 0x00, (vlan >> 8) as u8, vlan as u8];
        frame.splice(12..12, tag);
    }
    if let Some(len) = spec.truncate {
        frame.truncate(len);
    }
    Ok(frame)
}

fn l4_packet(spec: &PacketSpec, snat_port: Option<u16>) -> anyhow::Result<Vec<u8>> {
    let src = endpoint(&spec.src, snat_port)?;
    let dst = endpoint(&spec.dst, snat_port)?;
    let payload = spec.payload.clone().unwrap_or_default().into_bytes();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(
        src.ip().octets(),
        dst.ip().octets(),
        spec.ttl.unwrap_or(64),
    );
    let mut frame = Vec::new();
    match spec.proto.as_deref().unwrap_or("tcp") {
        "tcp" => {
            let mut tcp = builder.tcp(src.port(), dst.port(), 1000, 64240);
            for flag in &spec.tcp {
                tcp = match flag.as_str() {
                    "syn" => tcp.syn(),
                    "ack" => tcp.ack(5000),
                    "fin" => tcp.fin(),
                    "rst" => tcp.rst(),
                    "psh" => tcp.psh(),
                    other => anyhow::bail!("unknown TCP flag {other}"),
                };
            }
            tcp.write(&mut frame, &payload)?;
        }
        "udp" => {
            builder
                .udp(src.port(), dst.port())
                .write(&mut frame, &payload)?;
            if spec.udp_checksum_zero {
                frame[40] = 0;
                frame[41] = 0;
            }
        }
        "icmp" => builder
            .icmpv4_echo_request(src.port(), 1)
            .write(&mut frame, &payload)?,
        other => anyhow::bail!("unknown protocol {other}"),
    }
    Ok(frame)
}

/// An ICMP error whose outer addresses are `spec`'s and which quotes the
/// IPv4 header and first 8 bytes of `error.quote`.
fn icmp_error(
    spec: &PacketSpec,
    error: &IcmpErrorSpec,
    snat_port: Option<u16>,
) -> anyhow::Result<Vec<u8>> {
    let quoted = l4_packet(&error.quote, snat_port)?;
    let quote = &quoted[14..14 + 28];
    let src: Ipv4Addr = spec.src.split(':').next().unwrap_or_default().parse()?;
    let dst: Ipv4Addr = spec.dst.split(':').next().unwrap_or_default().parse()?;
    let mut bytes5to8 = [0u8; 4];
    bytes5to8[2..].copy_from_slice(&error.mtu.to_be_bytes());
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), spec.ttl.unwrap_or(64))
        .icmpv4_raw(error.kind, error.code, bytes5to8)
        .write(&mut frame, quote)?;
    Ok(frame)
}

/// IPv4 header edits the builder cannot make; the header checksum is fixed
/// after them unless the header was cut short.
fn patch_ipv4(frame: &mut Vec<u8>, spec: &PacketSpec) {
    if spec.ip_options > 0 {
        let mut options = vec![1u8; spec.ip_options];
        *options.last_mut().unwrap_or(&mut 0) = 0;
        frame.splice(34..34, options);
        let ihl = (20 + spec.ip_options) / 4;
        frame[14] = 0x40 | ihl as u8;
        let total = u16::from_be_bytes([frame[16], frame[17]]) + spec.ip_options as u16;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
    }
    match spec.fragment.as_deref() {
        Some("first") => frame[20] |= 0x20,
        Some("later") => frame[21] = 0x10,
        _ => {}
    }
    if let Some(ihl) = spec.ihl {
        frame[14] = 0x40 | ihl;
    }
    if let Some(total) = spec.total_len {
        frame[16..18].copy_from_slice(&total.to_be_bytes());
    }
    if let Some(protocol) = spec.ip_proto {
        frame[23] = protocol;
    }
    frame[24] = 0;
    frame[25] = 0;
    let header_len = (((frame[14] & 0x0f) as usize) * 4)
        .max(20)
        .min(frame.len() - 14);
    let sum = checksum(&frame[14..14 + header_len]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn check_packet(
    input: &[u8],
    output: &[u8],
    want: &PacketExpect,
    snat_port: &mut Option<u16>,
) -> anyhow::Result<()> {
    let headers = PacketHeaders::from_ethernet_slice(output)?;
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        anyhow::bail!("output is not IPv4");
    };
    anyhow::ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "bad IPv4 header checksum {:#06x}, want {:#06x}",
        ip.header_checksum,
        ip.calc_header_checksum()
    );
    let payload = headers.payload.slice();
    let (sport, dport) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let want_sum = tcp.calc_checksum_ipv4(ip, payload)?;
            anyhow::ensure!(
                tcp.checksum == want_sum,
                "bad TCP checksum {:#06x}, want {want_sum:#06x}",
                tcp.checksum
            );
            if let Some(flags) = &want.tcp {
                let mut got = tcp_flag_names(tcp);
                got.sort();
                let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                flags.sort();
                anyhow::ensure!(got == flags, "TCP flags {got:?}, expected {flags:?}");
            }
            if let Some(ack) = want.ack {
                anyhow::ensure!(
                    tcp.acknowledgment_number == ack,
                    "ack {}, expected {ack}",
                    tcp.acknowledgment_number
                );
            }
            (tcp.source_port, tcp.destination_port)
        }
        Some(TransportHeader::Udp(udp)) => {
            if want.udp_checksum_zero {
                anyhow::ensure!(
                    udp.checksum == 0,
                    "UDP checksum {:#06x}, expected none",
                    udp.checksum
                );
            } else {
                let want_sum = udp.calc_checksum_ipv4(ip, payload)?;
                anyhow::ensure!(
                    udp.checksum == want_sum,
                    "bad UDP checksum {:#06x}, want {want_sum:#06x}",
                    udp.checksum
                );
            }
            (udp.source_port, udp.destination_port)
        }
        Some(TransportHeader::Icmpv4(icmp)) => {
            let want_sum = icmp.icmp_type.calc_checksum(payload);
            anyhow::ensure!(
                icmp.checksum == want_sum,
                "bad ICMP checksum {:#06x}, want {want_sum:#06x}",
                icmp.checksum
            );
            let bytes = icmp.to_bytes();
            if let Some([kind, code]) = want.icmp {
                anyhow::ensure!(
                    bytes[0] == kind && bytes[1] == code,
                    "ICMP {}/{}, expected {kind}/{code}",
                    bytes[0],
                    bytes[1]
                );
            }
            check_quote(payload, want, *snat_port)?;
            (0, 0)
        }
        _ => anyhow::bail!("output has no transport header"),
    };
    let src = SocketAddrV4::new(Ipv4Addr::from(ip.source), sport);
    let dst = SocketAddrV4::new(Ipv4Addr::from(ip.destination), dport);
    check_endpoint("source", src, want.src.as_deref(), snat_port)?;
    check_endpoint("destination", dst, want.dst.as_deref(), snat_port)?;
    if let Some(ttl) = want.ttl {
        anyhow::ensure!(
            ip.time_to_live == ttl,
            "TTL {}, expected {ttl}",
            ip.time_to_live
        );
    }
    if want.macs_swapped {
        anyhow::ensure!(
            output[0..6] == input[6..12] && output[6..12] == input[0..6],
            "MAC addresses not swapped"
        );
    }
    Ok(())
}

/// The quoted packet of an ICMP error: a valid IPv4 header whose
/// addresses are the expected ones.
fn check_quote(payload: &[u8], want: &PacketExpect, snat_port: Option<u16>) -> anyhow::Result<()> {
    if want.quote_src.is_none() && want.quote_dst.is_none() {
        return Ok(());
    }
    let (quoted, rest) = Ipv4Header::from_slice(payload)?;
    anyhow::ensure!(
        quoted.header_checksum == quoted.calc_header_checksum(),
        "bad quoted IPv4 checksum"
    );
    anyhow::ensure!(
        quoted.protocol == IpNumber::UDP || quoted.protocol == IpNumber::TCP,
        "quoted protocol {:?}",
        quoted.protocol
    );
    let sport = u16::from_be_bytes([rest[0], rest[1]]);
    let dport = u16::from_be_bytes([rest[2], rest[3]]);
    let mut snat = snat_port;
    check_endpoint(
        "quoted source",
        SocketAddrV4::new(Ipv4Addr::from(quoted.source), sport),
        want.quote_src.as_deref(),
        &mut snat,
    )?;
    check_endpoint(
        "quoted destination",
        SocketAddrV4::new(Ipv4Addr::from(quoted.destination), dport),
        want.quote_dst.as_deref(),
        &mut snat,
    )
}

/// `want` is `addr:port`, or `addr:snat`: any port of the SNAT range,
/// remembered for later steps (and checked against it once known).
fn check_endpoint(
    what: &str,
    got: SocketAddrV4,
    want: Option<&str>,
    snat_port: &mut Option<u16>,
) -> anyhow::Result<()> {
    let Some(want) = want else {
        return Ok(());
    };
    if let Some(addr) = want.strip_suffix(":snat") {
        anyhow::ensure!(
            got.ip().to_string() == addr,
            "{what} {got}, expected {want}"
        );
        anyhow::ensure!(
            (nat_ports::FIRST..=nat_ports::LAST).contains(&got.port()),
            "{what} port {} outside the SNAT range",
            got.port()
        );
        if let Some(port) = snat_port {
            anyhow::ensure!(got.port() == *port, "{what} {got}, expected port {port}");
        }
        *snat_port = Some(got.port());
        return Ok(());
    }
    anyhow::ensure!(got.to_string() == want, "{what} {got}, expected {want}");
    Ok(())
}
