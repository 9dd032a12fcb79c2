//! The invariants one run must keep, whatever the input: the verdict, the
//! counters it raised, and a rewritten packet that is valid and explained
//! by the maps. Checksums are only held to what came in: a translation
//! updates them incrementally, so a wrong one stays wrong (and the
//! receiver drops it), which is right.

use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use etherparse::Ipv4HeaderSlice;
use proxy_common::{Counter, Flow4, proto, service_flags};

use super::{
    Verdict,
    cases::{fold, pseudo_header_sum, sum16},
    topology::{self, Topology},
};

const IP_OFF: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const TCP_RST: u8 = 0x04;

/// What the fuzzer holds the programs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    Run,
    Verdict,
    DropCounted,
    UntouchedUncounted,
    RewriteCounted,
    TcCountersOnly,
    Ipv4Valid,
    L4Checksum,
    Explained,
    OnlyNatFields,
    ConntrackPairs,
    ConntrackEntries,
    AffinityEntries,
}

impl Invariant {
    pub const ALL: [Invariant; 13] = [
        Invariant::Run,
        Invariant::Verdict,
        Invariant::DropCounted,
        Invariant::UntouchedUncounted,
        Invariant::RewriteCounted,
        Invariant::TcCountersOnly,
        Invariant::Ipv4Valid,
        Invariant::L4Checksum,
        Invariant::Explained,
        Invariant::OnlyNatFields,
        Invariant::ConntrackPairs,
        Invariant::ConntrackEntries,
        Invariant::AffinityEntries,
    ];

    /// Short name, used in file names and reports.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::Run => "run",
            Invariant::Verdict => "verdict",
            Invariant::DropCounted => "drop_counted",
            Invariant::UntouchedUncounted => "untouched_uncounted",
            Invariant::RewriteCounted => "rewrite_counted",
            Invariant::TcCountersOnly => "tc_counters_only",
            Invariant::Ipv4Valid => "ipv4_valid",
            Invariant::L4Checksum => "l4_checksum",
            Invariant::Explained => "explained",
            Invariant::OnlyNatFields => "only_nat_fields",
            Invariant::ConntrackPairs => "conntrack_pairs",
            Invariant::ConntrackEntries => "conntrack_entries",
            Invariant::AffinityEntries => "affinity_entries",
        }
    }

    pub fn about(self) -> &'static str {
        match self {
            Invariant::Run => "the run never fails (short frames the kernel refuses aside)",
            Invariant::Verdict => "the verdict is one the program may return",
            Invariant::DropCounted => {
                "a dropped packet raises exactly one drop/reject/malformed counter"
            }
            Invariant::UntouchedUncounted => {
                "an untouched packet passes and raises no translation or drop counter"
            }
            Invariant::RewriteCounted => {
                "a rewritten packet raises exactly one translation (or reject) counter, no drop counter"
            }
            Invariant::TcCountersOnly => "tc never raises a socket-level counter",
            Invariant::Ipv4Valid => "a rewritten packet is IPv4 with a right header checksum",
            Invariant::L4Checksum => {
                "its TCP/UDP/ICMP checksum is right if it came in right (UDP 0 stays 0)"
            }
            Invariant::Explained => "its addresses and ports are explained by the maps",
            Invariant::OnlyNatFields => {
                "a translation changes only addresses, ports, TTL and checksums (and MACs when sent out)"
            }
            Invariant::ConntrackPairs => {
                "every lb4_ct entry has its reply entry, naming a flow with that reply key"
            }
            Invariant::ConntrackEntries => {
                "tracked flows name their frontend, a backend of it, and a node SNAT source"
            }
            Invariant::AffinityEntries => "affinity entries name a backend of their service",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant.name(), self.detail)
    }
}

/// The invariants one case (or one map walk) was held to, and what broke.
#[derive(Default)]
pub struct Checker {
    pub applied: BTreeSet<Invariant>,
    pub violations: Vec<Violation>,
}

impl Checker {
    pub fn ensure(&mut self, invariant: Invariant, holds: bool, detail: impl FnOnce() -> String) {
        self.applied.insert(invariant);
        if !holds {
            self.violations.push(Violation {
                invariant,
                detail: detail(),
            });
        }
    }

    pub fn fail(&mut self, invariant: Invariant, detail: String) {
        self.ensure(invariant, false, || detail);
    }
}

/// What a counter says about the packet that raised it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    /// Only the socket hooks raise these.
    Socket,
    /// The packet was dropped (or, for a reject, answered).
    Drop,
    /// Left alone as malformed or a fragment.
    Malformed,
    /// Translated.
    Rewrite,
}

fn group(counter: Counter) -> Group {
    match counter {
        Counter::Translated
        | Counter::RevNatStoreFailed
        | Counter::RevNatApplied
        | Counter::MasterReread => Group::Socket,
        Counter::RejectedNoBackend
        | Counter::MissingBackend
        | Counter::DroppedNoLocalBackend
        | Counter::DroppedSourceRange
        | Counter::DroppedNatExhausted
        | Counter::DroppedConntrackFull
        | Counter::DroppedTtlExceeded
        | Counter::DroppedNoRoute => Group::Drop,
        Counter::MalformedTruncated | Counter::MalformedIpHeader | Counter::FragmentPassed => {
            Group::Malformed
        }
        Counter::AffinityHit
        | Counter::PacketNewFlow
        | Counter::PacketSnat
        | Counter::PacketEstablished
        | Counter::PacketReply
        | Counter::IcmpErrorTranslated => Group::Rewrite,
    }
}

/// How much each counter rose in one run, by [`Counter`] index.
pub struct Raised<'a>(pub &'a [u64]);

impl Raised<'_> {
    fn of(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    fn sum(&self, wanted: Group) -> u64 {
        Counter::ALL
            .iter()
            .filter(|counter| group(**counter) == wanted)
            .map(|counter| self.of(*counter))
            .sum()
    }
}

impl fmt::Display for Raised<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raised: Vec<String> = Counter::ALL
            .iter()
            .filter(|counter| self.of(**counter) > 0)
            .map(|counter| format!("{}+{}", counter.name(), self.of(*counter)))
            .collect();
        if raised.is_empty() {
            write!(f, "no counter")
        } else {
            write!(f, "{}", raised.join(", "))
        }
    }
}

/// An IPv4 frame whose header etherparse accepts and whose total length
/// fits the frame.
struct Ipv4Packet<'a> {
    frame: &'a [u8],
    header_len: usize,
    total_len: usize,
    proto: u8,
    ttl: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

/// A transport checksum as found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sum {
    Valid,
    Invalid,
    /// UDP without a checksum (0).
    Absent,
    /// Too short to hold one.
    Short,
}

impl<'a> Ipv4Packet<'a> {
    fn parse(frame: &'a [u8]) -> Result<Ipv4Packet<'a>, String> {
        if frame.len() < IP_OFF || frame[12..14] != ETHERTYPE_IPV4 {
            return Err("not an IPv4 frame".to_string());
        }
        let header = Ipv4HeaderSlice::from_slice(&frame[IP_OFF..]).map_err(|e| e.to_string())?;
        let header_len = header.ihl() as usize * 4;
        let total_len = header.total_len() as usize;
        if total_len < header_len || IP_OFF + total_len > frame.len() {
            return Err(format!(
                "total length {total_len} outside {header_len}..={}",
                frame.len() - IP_OFF
            ));
        }
        Ok(Ipv4Packet {
            frame,
            header_len,
            total_len,
            proto: header.protocol().0,
            ttl: header.ttl(),
            src: header.source_addr(),
            dst: header.destination_addr(),
        })
    }

    fn l4_off(&self) -> usize {
        IP_OFF + self.header_len
    }

    /// The transport bytes the total length covers.
    fn l4(&self) -> &'a [u8] {
        &self.frame[self.l4_off()..IP_OFF + self.total_len]
    }

    fn header_checksum_ok(&self) -> bool {
        fold(sum16(&self.frame[IP_OFF..self.l4_off()], 0)) == 0xffff
    }

    fn ports(&self) -> (u16, u16) {
        let l4 = self.l4();
        if (self.proto == proto::TCP || self.proto == proto::UDP) && l4.len() >= 4 {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        } else {
            (0, 0)
        }
    }

    fn source(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.src, self.ports().0)
    }

    fn destination(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst, self.ports().1)
    }

    fn transport_sum(&self) -> Sum {
        let l4 = self.l4();
        let (checksum_end, pseudo) = match self.proto {
            proto::TCP => (18, pseudo_header_sum(self.frame, self.proto, l4.len())),
            proto::UDP => (8, pseudo_header_sum(self.frame, self.proto, l4.len())),
            proto::ICMP => (4, 0),
            _ => return Sum::Short,
        };
        if l4.len() < checksum_end {
            return Sum::Short;
        }
        if self.proto == proto::UDP && l4[6..8] == [0, 0] {
            return Sum::Absent;
        }
        if fold(sum16(l4, pseudo)) == 0xffff {
            Sum::Valid
        } else {
            Sum::Invalid
        }
    }
}

/// The maps a run is explained by.
pub struct Explainer<'a> {
    pub topology: &'a Topology,
    /// Whether `lb4_ct` holds a flow.
    pub tracked: &'a dyn Fn(&Flow4) -> bool,
}

impl Explainer<'_> {
    fn tracked(&self, src: SocketAddrV4, dst: SocketAddrV4, protocol: u8) -> bool {
        (self.tracked)(&topology::flow(src, dst, protocol))
    }
}

/// One run as it came out.
pub struct Run<'a> {
    pub input: &'a [u8],
    pub output: &'a [u8],
    pub verdict: Verdict,
    pub raised: Raised<'a>,
}

/// What a rewritten packet was rewritten as, by the counter it raised.
#[derive(Clone, Copy, Debug)]
enum Rewrite {
    /// A reject's answer (TCP RST, ICMP port unreachable).
    Answer,
    /// A client's packet sent to its backend (new or tracked flow).
    ToBackend,
    /// A backend's reply turned back to the client.
    Reply,
    /// An ICMP error about a tracked flow, turned back.
    IcmpError,
}

pub fn check_run(run: &Run, maps: &Explainer, checker: &mut Checker) {
    let raised = &run.raised;
    checker.ensure(
        Invariant::TcCountersOnly,
        raised.sum(Group::Socket) == 0,
        || format!("raised {raised}"),
    );
    if run.verdict == Verdict::Drop {
        let reasons = raised.sum(Group::Drop) + raised.sum(Group::Malformed);
        checker.ensure(Invariant::DropCounted, reasons == 1, || {
            format!("dropped with {raised}")
        });
        return;
    }
    if run.output == run.input {
        checker.ensure(
            Invariant::UntouchedUncounted,
            run.verdict == Verdict::Pass
                && raised.sum(Group::Rewrite) == 0
                && raised.sum(Group::Drop) == 0
                && raised.sum(Group::Malformed) <= 1,
            || format!("{:?} untouched with {raised}", run.verdict),
        );
        return;
    }
    let answered = run.verdict == Verdict::Redirect && raised.of(Counter::RejectedNoBackend) == 1;
    let drops = raised.sum(Group::Drop) - u64::from(answered);
    let kinds = [
        (Rewrite::Answer, u64::from(answered)),
        (
            Rewrite::ToBackend,
            raised.of(Counter::PacketNewFlow) + raised.of(Counter::PacketEstablished),
        ),
        (Rewrite::Reply, raised.of(Counter::PacketReply)),
        (Rewrite::IcmpError, raised.of(Counter::IcmpErrorTranslated)),
    ];
    let raised_kinds: Vec<_> = kinds.iter().filter(|(_, n)| *n > 0).collect();
    let kind = match raised_kinds.as_slice() {
        [(kind, 1)] => Some(*kind),
        _ => None,
    };
    checker.ensure(
        Invariant::RewriteCounted,
        drops == 0 && raised.sum(Group::Malformed) == 0 && kind.is_some(),
        || format!("{:?} rewritten with {raised}", run.verdict),
    );
    let Some(kind) = kind else {
        return;
    };
    let input = match Ipv4Packet::parse(run.input) {
        Ok(input) => input,
        Err(err) => {
            checker.fail(
                Invariant::Explained,
                format!("rewrote ({kind:?}) an input that is no valid IPv4 packet: {err}"),
            );
            return;
        }
    };
    let output = match Ipv4Packet::parse(run.output) {
        Ok(output) => output,
        Err(err) => {
            checker.fail(Invariant::Ipv4Valid, format!("output: {err}"));
            return;
        }
    };
    match kind {
        Rewrite::Answer => check_answer(run, &input, &output, maps, checker),
        Rewrite::ToBackend => check_to_backend(run, &input, &output, maps, checker),
        Rewrite::Reply => check_reply(run, &input, &output, maps, checker),
        Rewrite::IcmpError => check_icmp_error(run, &input, &output, maps, checker),
    }
}

/// Checksums of a translated packet: right where they came in right.
fn check_translated_sums(input: &Ipv4Packet, output: &Ipv4Packet, checker: &mut Checker) {
    checker.ensure(
        Invariant::Ipv4Valid,
        output.header_checksum_ok() || !input.header_checksum_ok(),
        || "IPv4 header checksum broken by the rewrite".to_string(),
    );
    let (before, after) = (input.transport_sum(), output.transport_sum());
    let kept = match before {
        Sum::Valid | Sum::Absent => after == before,
        Sum::Invalid | Sum::Short => true,
    };
    checker.ensure(Invariant::L4Checksum, kept, || {
        format!(
            "protocol {} checksum went in {before:?}, came out {after:?}",
            input.proto
        )
    });
}

/// The Ethernet addresses: a packet the program sends out itself gets the
/// next hop's (XDP writes them; tc leaves them to `bpf_redirect_neigh`).
const MAC_ADDRESSES: std::ops::Range<usize> = 0..12;

/// Every byte that differs lies in `allowed` (or in the MAC addresses of a
/// packet sent out), and the length is the same.
fn check_changed_bytes(
    run: &Run,
    allowed: &[std::ops::Range<usize>],
    what: &str,
    checker: &mut Checker,
) {
    let sent_out = matches!(run.verdict, Verdict::Redirect);
    let stray: Vec<usize> = (0..run.input.len().min(run.output.len()))
        .filter(|at| run.input[*at] != run.output[*at])
        .filter(|at| !allowed.iter().any(|range| range.contains(at)))
        .filter(|at| !(sent_out && MAC_ADDRESSES.contains(at)))
        .collect();
    checker.ensure(
        Invariant::OnlyNatFields,
        stray.is_empty() && run.input.len() == run.output.len(),
        || {
            format!(
                "{what}: {} bytes in, {} out; bytes changed outside the NAT fields at {:?}",
                run.input.len(),
                run.output.len(),
                &stray[..stray.len().min(8)]
            )
        },
    );
}

/// The bytes a TCP/UDP translation may change: TTL, IPv4 checksum and
/// addresses, ports, transport checksum.
fn nat_fields(packet: &Ipv4Packet) -> Vec<std::ops::Range<usize>> {
    let l4 = packet.l4_off();
    let checksum = if packet.proto == proto::TCP { 16 } else { 6 };
    vec![
        IP_OFF + 8..IP_OFF + 9,
        IP_OFF + 10..IP_OFF + 20,
        l4..l4 + 4,
        l4 + checksum..l4 + checksum + 2,
    ]
}

fn check_to_backend(
    run: &Run,
    input: &Ipv4Packet,
    output: &Ipv4Packet,
    maps: &Explainer,
    checker: &mut Checker,
) {
    check_translated_sums(input, output, checker);
    check_changed_bytes(run, &nat_fields(input), "to a backend", checker);
    let frontend = input.destination();
    let Some(master) = maps.topology.external(frontend, input.proto) else {
        checker.fail(
            Invariant::Explained,
            format!(
                "sent {frontend}/{} to a backend: no such frontend",
                input.proto
            ),
        );
        return;
    };
    let backend = master
        .backend_ids
        .iter()
        .filter_map(|id| maps.topology.backends.get(id))
        .find(|backend| backend.at == output.destination());
    let Some(backend) = backend else {
        checker.fail(
            Invariant::Explained,
            format!(
                "{frontend} sent to {}, none of its backends",
                output.destination()
            ),
        );
        return;
    };
    if backend.local {
        checker.ensure(
            Invariant::Explained,
            output.source() == input.source()
                && run.verdict == Verdict::Pass
                && output.ttl == input.ttl,
            || {
                format!(
                    "to local backend {}: from {} (client {}), {:?}, TTL {} -> {}",
                    backend.at,
                    output.source(),
                    input.source(),
                    run.verdict,
                    input.ttl,
                    output.ttl
                )
            },
        );
    } else {
        checker.ensure(
            Invariant::Explained,
            topology::is_node_address(&output.src)
                && topology::is_snat_port(output.ports().0)
                && run.verdict == Verdict::Redirect
                && output.ttl == input.ttl.wrapping_sub(1),
            || {
                format!(
                    "to remote backend {}: from {}, {:?}, TTL {} -> {}",
                    backend.at,
                    output.source(),
                    run.verdict,
                    input.ttl,
                    output.ttl
                )
            },
        );
    }
    let new_remote = run.raised.of(Counter::PacketNewFlow) == 1 && !backend.local;
    checker.ensure(
        Invariant::RewriteCounted,
        run.raised.of(Counter::PacketSnat) == u64::from(new_remote),
        || format!("to {} with {}", backend.at, run.raised),
    );
}

fn check_reply(
    run: &Run,
    input: &Ipv4Packet,
    output: &Ipv4Packet,
    maps: &Explainer,
    checker: &mut Checker,
) {
    check_translated_sums(input, output, checker);
    check_changed_bytes(run, &nat_fields(input), "a reply", checker);
    let backend = input.source();
    let frontends = maps.topology.frontends_of(backend, input.proto);
    checker.ensure(
        Invariant::Explained,
        frontends.contains(&output.source()),
        || {
            format!(
                "reply of {backend} sent from {}, not a frontend of it ({frontends:?})",
                output.source()
            )
        },
    );
    checker.ensure(
        Invariant::Explained,
        maps.tracked(output.destination(), output.source(), input.proto),
        || {
            format!(
                "reply sent to {} from {}: no such flow tracked",
                output.destination(),
                output.source()
            )
        },
    );
    let local = maps
        .topology
        .backend_id(backend, input.proto)
        .and_then(|id| maps.topology.backends.get(&id))
        .is_some_and(|backend| backend.local);
    let (to_snat_source, path_kept) = if local {
        (
            true,
            output.destination() == input.destination()
                && run.verdict == Verdict::Pass
                && output.ttl == input.ttl,
        )
    } else {
        (
            topology::is_node_address(&input.dst) && topology::is_snat_port(input.ports().1),
            run.verdict == Verdict::Redirect && output.ttl == input.ttl.wrapping_sub(1),
        )
    };
    checker.ensure(Invariant::Explained, to_snat_source && path_kept, || {
        format!(
            "reply {} -> {} (local backend: {local}) came out {} -> {}, {:?}, TTL {} -> {}",
            input.source(),
            input.destination(),
            output.source(),
            output.destination(),
            run.verdict,
            input.ttl,
            output.ttl
        )
    });
}

fn check_icmp_error(
    run: &Run,
    input: &Ipv4Packet,
    output: &Ipv4Packet,
    maps: &Explainer,
    checker: &mut Checker,
) {
    check_translated_sums(input, output, checker);
    let l4 = output.l4_off();
    let quote = l4 + 8;
    let frame = run.output;
    if output.proto != proto::ICMP || frame.len() < quote + 24 {
        checker.fail(
            Invariant::Explained,
            format!(
                "translated as an ICMP error: protocol {}, {} bytes",
                output.proto,
                frame.len()
            ),
        );
        return;
    }
    let quoted_sum_ok = |frame: &[u8]| fold(sum16(&frame[quote..quote + 20], 0)) == 0xffff;
    checker.ensure(
        Invariant::Ipv4Valid,
        quoted_sum_ok(frame) || !quoted_sum_ok(run.input),
        || "quoted IPv4 header checksum broken by the rewrite".to_string(),
    );
    let at = |offset: usize| {
        SocketAddrV4::new(
            Ipv4Addr::new(
                frame[offset],
                frame[offset + 1],
                frame[offset + 2],
                frame[offset + 3],
            ),
            0,
        )
    };
    let port = |offset: usize| u16::from_be_bytes([frame[offset], frame[offset + 1]]);
    let quoted_proto = frame[quote + 9];
    let mut quoted_src = at(quote + 12);
    quoted_src.set_port(port(quote + 20));
    let mut quoted_dst = at(quote + 16);
    quoted_dst.set_port(port(quote + 22));
    checker.ensure(
        Invariant::Explained,
        maps.topology.external(quoted_dst, quoted_proto).is_some()
            && maps.tracked(quoted_src, quoted_dst, quoted_proto),
        || format!("quotes {quoted_src} -> {quoted_dst}/{quoted_proto}, not a tracked flow"),
    );
    checker.ensure(
        Invariant::Explained,
        (output.src == input.src || output.src == *quoted_dst.ip())
            && (output.dst == input.dst || output.dst == *quoted_src.ip()),
        || {
            format!(
                "error {} -> {} came out {} -> {} quoting {quoted_src} -> {quoted_dst}",
                input.src, input.dst, output.src, output.dst
            )
        },
    );
    check_changed_bytes(
        run,
        &[
            IP_OFF + 8..IP_OFF + 9,
            IP_OFF + 10..IP_OFF + 20,
            l4 + 2..l4 + 4,
            quote + 10..quote + 24,
        ],
        "an ICMP error",
        checker,
    );
}

/// A reject's answer: from the frontend back to the client, RST for TCP,
/// port unreachable quoting the datagram for UDP.
fn check_answer(
    run: &Run,
    input: &Ipv4Packet,
    output: &Ipv4Packet,
    maps: &Explainer,
    checker: &mut Checker,
) {
    checker.ensure(Invariant::Ipv4Valid, output.header_checksum_ok(), || {
        "answer's IPv4 header checksum is wrong".to_string()
    });
    checker.ensure(
        Invariant::L4Checksum,
        output.transport_sum() == Sum::Valid,
        || format!("answer's checksum is {:?}", output.transport_sum()),
    );
    let frontend = input.destination();
    let refuses = maps
        .topology
        .external(frontend, input.proto)
        .is_some_and(|master| {
            master.value.count == 0 && master.value.flags & service_flags::DROP_WHEN_EMPTY == 0
        });
    checker.ensure(Invariant::Explained, refuses, || {
        format!(
            "answered for {frontend}/{}, which does not refuse",
            input.proto
        )
    });
    let macs_swapped = run.output[0..6] == run.input[6..12] && run.output[6..12] == run.input[0..6];
    let back = output.src == input.dst && output.dst == input.src && macs_swapped;
    let l4 = output.l4();
    let shaped = match input.proto {
        proto::TCP => {
            output.proto == proto::TCP
                && output.ports() == (input.ports().1, input.ports().0)
                && l4.len() >= 14
                && l4[13] & TCP_RST != 0
        }
        _ => {
            output.proto == proto::ICMP
                && l4.len() >= 36
                && l4[0..2] == [3, 3]
                && run.input.get(IP_OFF..IP_OFF + 28) == Some(&l4[8..36])
        }
    };
    checker.ensure(Invariant::Explained, back && shaped, || {
        format!(
            "answer to {} -> {} came out {} -> {} protocol {} (MACs swapped: {macs_swapped})",
            input.source(),
            input.destination(),
            output.source(),
            output.destination(),
            output.proto
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tc::{self, PacketSpec};

    /// 192.168.0.2:30081/tcp -> local 10.244.1.11:8080 (backend 1).
    fn topology() -> Topology {
        Topology::one_frontend("192.168.0.2:30081", "10.244.1.11:8080", true)
    }

    fn packet(src: &str, dst: &str, payload: &str) -> Vec<u8> {
        let spec = PacketSpec {
            src: src.to_string(),
            dst: dst.to_string(),
            tcp: vec!["syn".to_string()],
            payload: Some(payload.to_string()),
            ..PacketSpec::default()
        };
        tc::build_packet(&spec, None).unwrap()
    }

    const CLIENT: &str = "203.0.113.2:40000";

    /// The violated invariants of one run raising `raised`.
    fn violated(output: &[u8], verdict: Verdict, raised: &[(Counter, u64)]) -> Vec<Invariant> {
        let input = packet(CLIENT, "192.168.0.2:30081", "hello");
        let mut counts = vec![0; Counter::COUNT as usize];
        for (counter, n) in raised {
            counts[*counter as usize] = *n;
        }
        let topology = topology();
        let tracked = |_: &Flow4| true;
        let maps = Explainer {
            topology: &topology,
            tracked: &tracked,
        };
        let mut checker = Checker::default();
        let run = Run {
            input: &input,
            output,
            verdict,
            raised: Raised(&counts),
        };
        check_run(&run, &maps, &mut checker);
        checker.violations.iter().map(|v| v.invariant).collect()
    }

    const NEW_FLOW: &[(Counter, u64)] = &[(Counter::PacketNewFlow, 1)];

    #[test]
    fn a_right_translation_to_a_local_backend_holds() {
        let output = packet(CLIENT, "10.244.1.11:8080", "hello");
        assert_eq!(violated(&output, Verdict::Pass, NEW_FLOW), []);
    }

    #[test]
    fn a_translation_to_no_backend_of_the_frontend_is_unexplained() {
        let output = packet(CLIENT, "10.244.1.99:8080", "hello");
        assert_eq!(
            violated(&output, Verdict::Pass, NEW_FLOW),
            [Invariant::Explained]
        );
    }

    #[test]
    fn a_broken_transport_checksum_is_caught() {
        let mut output = packet(CLIENT, "10.244.1.11:8080", "hello");
        output[14 + 20 + 16] ^= 1;
        assert_eq!(
            violated(&output, Verdict::Pass, NEW_FLOW),
            [Invariant::L4Checksum]
        );
    }

    #[test]
    fn a_payload_change_is_not_a_nat_field() {
        let output = packet(CLIENT, "10.244.1.11:8080", "hellO");
        assert_eq!(
            violated(&output, Verdict::Pass, NEW_FLOW),
            [Invariant::OnlyNatFields]
        );
    }

    #[test]
    fn a_local_backend_is_not_redirected() {
        let output = packet(CLIENT, "10.244.1.11:8080", "hello");
        assert_eq!(
            violated(&output, Verdict::Redirect, NEW_FLOW),
            [Invariant::Explained]
        );
    }

    #[test]
    fn counters_must_match_the_verdict() {
        let input = packet(CLIENT, "192.168.0.2:30081", "hello");
        let two_reasons = [
            (Counter::DroppedSourceRange, 1),
            (Counter::DroppedNoRoute, 1),
        ];
        assert_eq!(
            violated(&input, Verdict::Drop, &two_reasons),
            [Invariant::DropCounted]
        );
        assert_eq!(
            violated(&input, Verdict::Pass, &[(Counter::PacketReply, 1)]),
            [Invariant::UntouchedUncounted]
        );
        let output = packet(CLIENT, "10.244.1.11:8080", "hello");
        let with_drop = [
            (Counter::PacketNewFlow, 1),
            (Counter::DroppedTtlExceeded, 1),
        ];
        assert_eq!(
            violated(&output, Verdict::Pass, &with_drop),
            [Invariant::RewriteCounted]
        );
        assert_eq!(
            violated(&input, Verdict::Pass, &[(Counter::Translated, 1)]),
            [Invariant::TcCountersOnly]
        );
    }
}
