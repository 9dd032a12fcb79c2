//! The tc programs on crafted packets (`BPF_PROG_TEST_RUN`), shared by
//! the packet fixtures (`tests/tc_fixtures.rs`) and the per-packet
//! benchmark (`benches/tc_per_packet.rs`): map contents written the way the
//! reconciler writes them, packets built from a short description, and a
//! network namespace shaped like node1 of the acceptance layout for the
//! programs' FIB lookups.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use ipnet::Ipv4Net;
use proxy_common::{
    AffinityMatchKey, Backend, RevNat, ServiceKey, ServiceValue, SourceRange, backend_flags,
    map_names, proto, scope, service_flags,
};
use serde::Deserialize;

use crate::{Netns, run_checked, veth_pair};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// `sizeof(struct __sk_buff)`; `ifindex` is at offset 40.
const SKB_CTX_LEN: usize = 192;
const SKB_IFINDEX_OFF: usize = 40;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maps {
    #[serde(default)]
    pub frontends: Vec<FrontendSpec>,
    /// Backends on this node (DNAT only); every other one is remote.
    #[serde(default)]
    pub local: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendSpec {
    /// `addr:port/proto`.
    pub frontend: String,
    #[serde(default = "external")]
    pub scope: String,
    #[serde(default)]
    pub backends: Vec<String>,
    /// `reject` (default) or `drop` when `backends` is empty.
    #[serde(default)]
    pub when_empty: Option<String>,
    #[serde(default)]
    pub source_ranges: Vec<Ipv4Net>,
    /// ClientIP affinity timeout in seconds.
    #[serde(default)]
    pub affinity: u32,
}

fn external() -> String {
    "external".to_string()
}

/// A packet to build. Addresses `addr:port`; the port `snat` stands for the
/// SNAT port an earlier step's output showed.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacketSpec {
    pub src: String,
    pub dst: String,
    /// `tcp` (default), `udp` or `icmp`.
    #[serde(default)]
    pub proto: Option<String>,
    /// TCP flags: syn, ack, fin, rst, psh.
    #[serde(default)]
    pub tcp: Vec<String>,
    #[serde(default)]
    pub ttl: Option<u8>,
    #[serde(default)]
    pub payload: Option<String>,
    /// UDP sent without a checksum (0).
    #[serde(default)]
    pub udp_checksum_zero: bool,
    /// Bytes of IPv4 options (NOPs + end), a multiple of 4.
    #[serde(default)]
    pub ip_options: usize,
    /// An 802.1Q tag in the frame.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// `first` (more fragments) or `later` (an offset).
    #[serde(default)]
    pub fragment: Option<String>,
    /// Cut the frame to this many bytes.
    #[serde(default)]
    pub truncate: Option<usize>,
    /// Overwrite the IHL nibble (checksum fixed).
    #[serde(default)]
    pub ihl: Option<u8>,
    /// Overwrite the total length (checksum fixed).
    #[serde(default)]
    pub total_len: Option<u16>,
    /// Overwrite the IPv4 protocol number (checksum fixed).
    #[serde(default)]
    pub ip_proto: Option<u8>,
    /// An ICMP error (`src`/`dst` are its outer addresses, ports ignored)
    /// quoting this packet.
    #[serde(default)]
    pub icmp_error: Option<IcmpErrorSpec>,
    /// Ethertype other than IPv4 (e.g. 0x86dd, 0x0806).
    #[serde(default)]
    pub ethertype: Option<u16>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpErrorSpec {
    #[serde(rename = "type")]
    pub kind: u8,
    pub code: u8,
    /// Next-hop MTU of a fragmentation-needed error.
    #[serde(default)]
    pub mtu: u16,
    pub quote: Box<PacketSpec>,
}

/// The node1 look-alike the programs' FIB lookups run in.
pub struct NodeNetns {
    pub node: Netns,
    _peer: Netns,
    /// Index of its eth0: the device packets "arrive" on.
    pub ifindex: u32,
}

/// node1's look-alike: eth0 192.168.0.2/24 (its peer in a second
/// namespace), 10.244.2.0/24 via 192.168.0.3, default via 192.168.0.1,
/// forwarding on.
pub fn node_netns(prefix: &str) -> Result<NodeNetns> {
    let node = Netns::new(prefix)?;
    let peer = Netns::new(prefix)?;
    veth_pair(&node, "eth0", &peer, "eth0")?;
    for args in [
        &["addr", "add", "192.168.0.2/24", "dev", "eth0"][..],
        &["link", "set", "eth0", "up"],
        &["route", "add", "10.244.2.0/24", "via", "192.168.0.3"],
        &["route", "add", "default", "via", "192.168.0.1"],
        // Resolved next hops: XDP sends a packet itself only when the
        // FIB knows the next hop's MAC.
        &[
            "neigh",
            "add",
            "192.168.0.1",
            "lladdr",
            "02:00:00:00:01:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
        &[
            "neigh",
            "add",
            "192.168.0.3",
            "lladdr",
            "02:00:00:00:01:03",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    ] {
        node.ip(args)?;
    }
    peer.ip(&["link", "set", "eth0", "up"])?;
    // `ip netns exec` only for sysctl: it needs the namespace's /proc/sys.
    run_checked(Command::new("ip").args([
        "netns",
        "exec",
        node.name(),
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]))?;
    let link =
        run_checked(Command::new("ip").args(["-n", node.name(), "-o", "link", "show", "eth0"]))?;
    let ifindex = link
        .split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .with_context(|| format!("no ifindex in {link:?}"))?;
    Ok(NodeNetns {
        node,
        _peer: peer,
        ifindex,
    })
}

/// One run of a tc or XDP program.
pub struct RunResult {
    /// `TC_ACT_*` or `XDP_*`.
    pub verdict: u32,
    pub output: Vec<u8>,
    /// XDP metadata in front of a passed packet (empty for tc).
    pub metadata: Vec<u8>,
    /// What the kernel measured for the run.
    pub duration: Duration,
}

/// `xdp_md` of an XDP test run: the packet (offsets) and its device.
const XDP_CTX_LEN: usize = 24;

/// Runs `xdp_ingress` once on `input`, as if it arrived on device
/// `ifindex` of the calling thread's namespace. The test run returns the
/// metadata XDP left in front of the packet; it is split off.
pub fn run_xdp(ebpf: &mut Ebpf, input: &[u8], ifindex: u32) -> Result<RunResult> {
    let program: &mut Xdp = ebpf
        .program_mut("xdp_ingress")
        .context("no program xdp_ingress")?
        .try_into()?;
    let mut ctx = [0u8; XDP_CTX_LEN];
    // data 0, data_end = the length, data_meta 0, then the device.
    ctx[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut output = vec![0u8; 2048];
    let mut options = TestRunOptions::new();
    options.data_in = Some(input);
    options.data_out = Some(&mut output);
    options.ctx_in = Some(&ctx);
    options.repeat = 1;
    let result = program.test_run(options)?;
    output.truncate(result.data_size_out as usize);
    // Only a passed packet keeps metadata, and XDP here never resizes one.
    let metadata_len = if result.return_value == XDP_PASS {
        output.len().saturating_sub(input.len())
    } else {
        0
    };
    let packet = output.split_off(metadata_len);
    Ok(RunResult {
        verdict: result.return_value,
        output: packet,
        metadata: output,
        duration: result.duration,
    })
}

const XDP_PASS: u32 = 2;

/// Runs `tc_ingress` or `tc_egress` once on `input`, as if it arrived on
/// (or left by) device `ifindex` of the calling thread's namespace.
pub fn run(ebpf: &mut Ebpf, program: &str, input: &[u8], ifindex: u32) -> Result<RunResult> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(program)
        .with_context(|| format!("no program {program}"))?
        .try_into()?;
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
    let mut output = vec![0u8; 2048];
    let mut options = TestRunOptions::new();
    options.data_in = Some(input);
    options.data_out = Some(&mut output);
    options.ctx_in = Some(&ctx);
    options.repeat = 1;
    let result = program.test_run(options)?;
    output.truncate(result.data_size_out as usize);
    Ok(RunResult {
        verdict: result.return_value,
        output,
        metadata: Vec::new(),
        duration: result.duration,
    })
}

pub fn endpoint(spec: &str, snat_port: Option<u16>) -> Result<SocketAddrV4> {
    if let Some(addr) = spec.strip_suffix(":snat") {
        let port = snat_port.ok_or_else(|| anyhow!("no SNAT port seen yet"))?;
        return Ok(SocketAddrV4::new(addr.parse()?, port));
    }
    Ok(spec.parse()?)
}

/// `addr:port/proto` -> (addr, port, proto number).
pub fn service_addr(spec: &str) -> Result<(SocketAddrV4, u8)> {
    let (addr, protocol) = spec
        .split_once('/')
        .ok_or_else(|| anyhow!("{spec}: want addr:port/proto"))?;
    Ok((addr.parse()?, protocol_number(protocol)?))
}

fn protocol_number(name: &str) -> Result<u8> {
    Ok(match name {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "icmp" => proto::ICMP,
        other => bail!("unknown protocol {other}"),
    })
}

pub fn ne_addr(addr: &Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn fill_maps(ebpf: &mut Ebpf, maps: &Maps) -> Result<()> {
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
        .ok_or_else(|| anyhow!("no source-range map"))?;
    let mut ranges: LpmTrie<MapData, SourceRange, u8> = LpmTrie::try_from(ranges_map)?;
    for (index, frontend) in maps.frontends.iter().enumerate() {
        let rev_nat_id = index as u32 + 1;
        let (addr, protocol) = service_addr(&frontend.frontend)?;
        let key_scope = match frontend.scope.as_str() {
            "external" => scope::EXTERNAL,
            "internal" => scope::INTERNAL,
            other => bail!("unknown scope {other}"),
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
pub fn map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("no map {name}"))?;
    let data = match map {
        Map::HashMap(data) | Map::LruHashMap(data) => data,
        _ => bail!("{name} is not a hash map"),
    };
    // Borrow the map's fd through a fresh handle so several maps can be
    // open at once.
    let info = data.info()?;
    let data = MapData::from_id(info.id())?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

pub fn build_packet(spec: &PacketSpec, snat_port: Option<u16>) -> Result<Vec<u8>> {
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

fn l4_packet(spec: &PacketSpec, snat_port: Option<u16>) -> Result<Vec<u8>> {
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
                    other => bail!("unknown TCP flag {other}"),
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
        other => bail!("unknown protocol {other}"),
    }
    Ok(frame)
}

/// An ICMP error whose outer addresses are `spec`'s and which quotes the
/// IPv4 header and first 8 bytes of `error.quote`.
fn icmp_error(spec: &PacketSpec, error: &IcmpErrorSpec, snat_port: Option<u16>) -> Result<Vec<u8>> {
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
