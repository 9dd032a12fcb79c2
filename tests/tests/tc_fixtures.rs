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
//!
//! Each fixture runs twice: with tc alone, and with XDP in front of tc on
//! ingress (XDP first; what it passes, tc then gets): tc and XDP must give
//! the same verdicts, packets, counters and tracked flows.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
};
use etherparse::{IpNumber, Ipv4Header, NetHeaders, PacketHeaders, TransportHeader};
use proxy_common::{Counter, CtEntry, Flow4, map_names, nat_ports};
use proxy_tests::tc;
use proxy_userspace::programs::{Capacities, load_detached};
use serde::Deserialize;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
/// The metadata mark of a packet XDP handled (proxy-ebpf's xdp.rs).
const XDP_HANDLED: &[u8] = b"xdp!";

/// Which programs see an ingress packet.
#[derive(Clone, Copy, Debug)]
enum Ingress {
    Tc,
    XdpThenTc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    /// What the case proves, and the rule it cites.
    about: String,
    #[serde(default)]
    maps: tc::Maps,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    /// `ingress` or `egress`.
    program: String,
    packet: tc::PacketSpec,
    expect: Expect,
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
    let netns = tc::node_netns("eptc").unwrap();
    let files = fixture_files();
    assert!(files.len() >= 30, "only {} fixtures", files.len());
    let failures = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                proxy_tests::enter_netns(netns.node.name()).unwrap();
                let mut failures = Vec::new();
                for file in &files {
                    let name = file.file_stem().unwrap().to_string_lossy().into_owned();
                    for ingress in [Ingress::Tc, Ingress::XdpThenTc] {
                        if let Err(err) = run_fixture(file, netns.ifindex, ingress) {
                            failures.push(format!("{name} ({ingress:?}): {err:#}"));
                        } else {
                            eprintln!("fixture {name} ({ingress:?}): ok");
                        }
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

fn run_fixture(file: &Path, ifindex: u32, ingress: Ingress) -> anyhow::Result<()> {
    let text = fs::read_to_string(file)?;
    let fixture: Fixture = serde_saphyr::from_str(&text)?;
    anyhow::ensure!(!fixture.about.is_empty(), "say what the fixture proves");
    let mut ebpf = load_detached(&Capacities {
        services: 4096,
        backends: 1024,
        conntrack: 1024,
        nat: 1024,
    })?;
    tc::fill_maps(&mut ebpf, &fixture.maps)?;
    let mut snat_port: Option<u16> = None;
    for (index, step) in fixture.steps.iter().enumerate() {
        run_step(&mut ebpf, step, ifindex, ingress, &mut snat_port)
            .map_err(|err| err.context(format!("step {}", index + 1)))?;
    }
    Ok(())
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
    let conntrack: HashMap<MapData, Flow4, CtEntry> = tc::map(ebpf, map_names::CONNTRACK)?;
    Ok(conntrack.keys().count())
}

fn run_step(
    ebpf: &mut Ebpf,
    step: &Step,
    ifindex: u32,
    ingress: Ingress,
    snat_port: &mut Option<u16>,
) -> anyhow::Result<()> {
    let input = tc::build_packet(&step.packet, *snat_port)?;
    let before = counters(ebpf)?;
    let program = match step.program.as_str() {
        "ingress" => "tc_ingress",
        "egress" => "tc_egress",
        other => anyhow::bail!("unknown program {other}"),
    };
    let (verdict, output) = match (program, ingress) {
        ("tc_ingress", Ingress::XdpThenTc) => {
            let xdp = tc::run_xdp(ebpf, &input, ifindex)?;
            match xdp.verdict {
                // A packet XDP marked as handled, tc passes unlooked-at.
                XDP_PASS if xdp.metadata == XDP_HANDLED => ("pass", xdp.output),
                XDP_PASS => {
                    let metadata = &xdp.metadata;
                    anyhow::ensure!(metadata.is_empty(), "unknown XDP metadata {metadata:02x?}");
                    tc_verdict(tc::run(ebpf, program, &xdp.output, ifindex)?)?
                }
                XDP_DROP => ("drop", xdp.output),
                XDP_TX | XDP_REDIRECT => ("redirect", xdp.output),
                other => anyhow::bail!("unexpected XDP verdict {other}"),
            }
        }
        _ => tc_verdict(tc::run(ebpf, program, &input, ifindex)?)?,
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

fn tc_verdict(result: tc::RunResult) -> anyhow::Result<(&'static str, Vec<u8>)> {
    let verdict = match result.verdict {
        TC_ACT_OK => "pass",
        TC_ACT_SHOT => "drop",
        TC_ACT_REDIRECT => "redirect",
        other => anyhow::bail!("unexpected verdict {other}"),
    };
    Ok((verdict, result.output))
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
