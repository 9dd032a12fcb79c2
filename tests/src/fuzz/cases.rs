//! The inputs: purely random frames, and the fixtures' packets mutated
//! field by field (bit flips, header fields set to values the maps or the
//! parser care about, truncation, extension, splicing two packets). Case
//! `index` of `seed` is always the same bytes: its own PRNG is seeded from
//! both, and nothing a program did feeds back into generation.

use std::{fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::topology;
use crate::tc::{self, PacketSpec};

/// Frames never grow beyond this (`BPF_PROG_TEST_RUN` takes up to a page).
pub const MAX_FRAME: usize = 1600;
const ETH_LEN: usize = 14;
const IP_OFF: usize = ETH_LEN;
const ETHERTYPE_IPV4: u16 = 0x0800;

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and plenty to pick
/// mutations with.
pub struct Rng {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator of case `index` of `seed`: independent of every other
    /// case, so any case is rebuilt alone.
    pub fn for_case(seed: u64, index: u64) -> Rng {
        Rng {
            state: mix(seed.wrapping_add(GOLDEN_GAMMA)) ^ mix(index ^ 0x5eed_ca5e),
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: usize, high: usize) -> usize {
        low + self.below(high - low + 1)
    }

    /// True `n` times in `d`.
    pub fn chance(&mut self, n: usize, d: usize) -> bool {
        self.below(d) < n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }
}

/// One generated input.
pub struct Case {
    pub frame: Vec<u8>,
    /// How it was made, for the finding it may become.
    pub origin: String,
    pub kind: CaseKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CaseKind {
    /// Random length, random bytes.
    Random,
    /// An IPv4 ethertype (and mostly version 4, IHL 5) before random bytes.
    RandomIpv4,
    /// A fixture packet, mutated (or not, with no mutation drawn).
    Mutated,
    /// Two fixture packets joined, then mutated.
    Spliced,
}

impl CaseKind {
    pub const ALL: [CaseKind; 4] = [
        CaseKind::Random,
        CaseKind::RandomIpv4,
        CaseKind::Mutated,
        CaseKind::Spliced,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CaseKind::Random => "random frame",
            CaseKind::RandomIpv4 => "random IPv4 frame",
            CaseKind::Mutated => "mutated fixture packet",
            CaseKind::Spliced => "spliced fixture packets",
        }
    }
}

/// A fixture step's input packet.
pub struct Seed {
    /// `<fixture> step <n>`.
    pub name: String,
    pub frame: Vec<u8>,
}

/// Every step's packet of every fixture, with its substituted variants:
/// what mutations start from.
pub struct Corpus {
    /// Per fixture step: its packet, then its variants.
    pub steps: Vec<Vec<Seed>>,
}

/// The part of a fixture file the fuzzer reads: its packets.
#[derive(Deserialize)]
struct FixturePackets {
    steps: Vec<FixtureStep>,
}

#[derive(Deserialize)]
struct FixtureStep {
    packet: PacketSpec,
}

/// The fixtures give one frontend (and one backend) different roles; the
/// fixed maps give every role its own frontend. Each fixture packet is
/// also taken with one of these sets of replacements, so it reaches every
/// role: the remote backend made the local one (and a reply to the SNAT
/// source one to the client), a NodePort made the one without endpoints,
/// the eTP=Local one, the local-backend one, the affinity one, the
/// LoadBalancer IP with source ranges.
const SUBSTITUTIONS: [&[(&str, &str)]; 8] = [
    &[("10.244.2.11:", "10.244.1.11:")],
    &[
        ("10.244.2.11:", "10.244.1.11:"),
        ("192.168.0.2:snat", "203.0.113.2:40000"),
    ],
    &[("192.168.0.2:30080", "192.168.0.2:30090")],
    &[("192.168.0.2:30053", "192.168.0.2:30091")],
    &[("192.168.0.2:30080", "192.168.0.2:30092")],
    &[("192.168.0.2:30080", "192.168.0.2:30081")],
    &[("192.168.0.2:30080", "192.168.0.2:30082")],
    &[("192.168.0.2:30080", "192.0.2.20:80")],
];

/// `packet` with the replacements made in every address (the quoted
/// packet's too), if it holds any of them.
fn substituted(packet: &PacketSpec, replacements: &[(&str, &str)]) -> Option<PacketSpec> {
    let replace = |spec: &mut PacketSpec| {
        let before = (spec.src.clone(), spec.dst.clone());
        for (from, to) in replacements {
            spec.src = spec.src.replace(from, to);
            spec.dst = spec.dst.replace(from, to);
        }
        before != (spec.src.clone(), spec.dst.clone())
    };
    let mut packet = packet.clone();
    let mut changed = replace(&mut packet);
    if let Some(error) = &mut packet.icmp_error {
        changed |= replace(&mut error.quote);
    }
    changed.then_some(packet)
}

impl Corpus {
    /// The packets of every `*.yaml` fixture in `dir`, each also with the
    /// [`SUBSTITUTIONS`] it has room for. A `:snat` port becomes the SNAT
    /// port of the primed flow of the packet's protocol, so replies and
    /// ICMP errors meet a tracked flow.
    pub fn load(dir: &Path) -> Result<Corpus> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()?;
        files.retain(|path| path.extension().is_some_and(|ext| ext == "yaml"));
        files.sort();
        let mut steps = Vec::new();
        for file in &files {
            let name = file.file_stem().unwrap_or_default().to_string_lossy();
            let text = fs::read_to_string(file)?;
            let fixture: FixturePackets =
                serde_saphyr::from_str(&text).with_context(|| format!("parsing {name}"))?;
            for (step, FixtureStep { packet }) in fixture.steps.iter().enumerate() {
                let step_name = format!("{name} step {}", step + 1);
                let variants = SUBSTITUTIONS.iter().filter_map(|replacements| {
                    let packet = substituted(packet, replacements)?;
                    let how: Vec<String> = replacements
                        .iter()
                        .map(|(from, to)| format!("{from} -> {to}"))
                        .collect();
                    Some((format!("{step_name} ({})", how.join(", ")), packet))
                });
                let mut seeds = Vec::new();
                for (name, packet) in [(step_name.clone(), packet.clone())]
                    .into_iter()
                    .chain(variants)
                {
                    let snat_port = topology::primed_snat_port(snat_protocol(&packet));
                    let frame =
                        tc::build_packet(&packet, Some(snat_port)).with_context(|| name.clone())?;
                    seeds.push(Seed { name, frame });
                }
                steps.push(seeds);
            }
        }
        anyhow::ensure!(!steps.is_empty(), "no fixture packets in {}", dir.display());
        Ok(Corpus { steps })
    }

    /// A fixture step's packet, as is half the time, else a variant.
    fn pick(&self, rng: &mut Rng) -> &Seed {
        let step = rng.pick(&self.steps);
        if step.len() > 1 && rng.chance(1, 2) {
            rng.pick(&step[1..])
        } else {
            &step[0]
        }
    }

    /// Case `index` of `seed`.
    pub fn case(&self, seed: u64, index: u64) -> Case {
        let mut rng = Rng::for_case(seed, index);
        let (kind, mut frame, mut origin) = match rng.below(16) {
            0 => {
                let len = rng.between(ETH_LEN, MAX_FRAME);
                (
                    CaseKind::Random,
                    rng.bytes(len),
                    vec![format!("{len} random bytes")],
                )
            }
            1 => {
                let len = rng.between(ETH_LEN, MAX_FRAME);
                let mut frame = rng.bytes(len);
                frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                if len > IP_OFF && rng.chance(3, 4) {
                    frame[IP_OFF] = 0x45;
                }
                let origin = format!("{len} random bytes after an IPv4 ethertype");
                (CaseKind::RandomIpv4, frame, vec![origin])
            }
            2..=4 => {
                let first = self.pick(&mut rng);
                let second = self.pick(&mut rng);
                let (frame, how) = splice(&mut rng, &first.frame, &second.frame);
                let origin = format!("{} spliced with {} {how}", first.name, second.name);
                (CaseKind::Spliced, frame, vec![origin])
            }
            _ => {
                let seed = self.pick(&mut rng);
                (
                    CaseKind::Mutated,
                    seed.frame.clone(),
                    vec![seed.name.clone()],
                )
            }
        };
        if matches!(kind, CaseKind::Mutated | CaseKind::Spliced) {
            mutate(&mut rng, &mut frame, &mut origin);
        }
        Case {
            frame,
            origin: origin.join("; "),
            kind,
        }
    }
}

/// The protocol whose primed flow a packet's `:snat` port names: the
/// quoted packet's for an ICMP error.
fn snat_protocol(packet: &PacketSpec) -> &str {
    let spec = packet
        .icmp_error
        .as_ref()
        .map_or(packet, |error| &error.quote);
    spec.proto.as_deref().unwrap_or("tcp")
}

/// The prefix of `first` up to a cut and the rest of `second` from one.
/// Half the time both cut at the transport header: one packet's IPv4
/// header before the other's transport.
fn splice(rng: &mut Rng, first: &[u8], second: &[u8]) -> (Vec<u8>, String) {
    let (cut_first, cut_second) = match (Layout::of(first), Layout::of(second)) {
        (Some(a), Some(b)) if rng.chance(1, 2) && a.l4 <= first.len() && b.l4 <= second.len() => {
            (a.l4, b.l4)
        }
        _ => (
            rng.between(ETH_LEN, first.len()),
            rng.below(second.len() + 1),
        ),
    };
    let mut frame = first[..cut_first].to_vec();
    frame.extend_from_slice(&second[cut_second..]);
    frame.truncate(MAX_FRAME);
    (
        frame,
        format!("(bytes ..{cut_first} of the first, {cut_second}.. of the second)"),
    )
}

/// Where the headers of an IPv4 frame are, as its bytes say now.
#[derive(Clone, Copy)]
struct Layout {
    /// Transport header offset (IHL read as is, at least 5).
    l4: usize,
    proto: u8,
}

impl Layout {
    fn of(frame: &[u8]) -> Option<Layout> {
        if frame.len() < IP_OFF + 20 || frame[12..14] != ETHERTYPE_IPV4.to_be_bytes() {
            return None;
        }
        let ihl = ((frame[IP_OFF] & 0x0f) as usize).max(5);
        Some(Layout {
            l4: IP_OFF + ihl * 4,
            proto: frame[IP_OFF + 9],
        })
    }

    /// The quoted IPv4 header of an ICMP message.
    fn quote(&self) -> Option<usize> {
        (self.proto == 1).then_some(self.l4 + 8)
    }
}

/// A header field the mutator knows: where, how wide, and values worth
/// trying there.
struct Field {
    name: &'static str,
    offset: usize,
    width: usize,
    values: Values,
}

enum Values {
    Fixed(&'static [u64]),
    Addresses,
    Ports,
    /// The frame's real length minus an offset, give or take one, and
    /// the extremes.
    LengthFrom(usize),
}

const ADDRESSES: [Ipv4Addr; 18] = [
    topology::NODE_ADDRESSES[0],
    Ipv4Addr::new(192, 168, 0, 1),
    Ipv4Addr::new(192, 168, 0, 3),
    Ipv4Addr::new(192, 0, 2, 10),
    Ipv4Addr::new(192, 0, 2, 20),
    Ipv4Addr::new(10, 96, 0, 10),
    Ipv4Addr::new(10, 244, 1, 11),
    Ipv4Addr::new(10, 244, 1, 12),
    Ipv4Addr::new(10, 244, 1, 13),
    Ipv4Addr::new(10, 244, 2, 11),
    Ipv4Addr::new(203, 0, 113, 2),
    Ipv4Addr::new(203, 0, 113, 7),
    Ipv4Addr::new(198, 51, 100, 2),
    Ipv4Addr::new(10, 1, 2, 3),
    Ipv4Addr::UNSPECIFIED,
    Ipv4Addr::BROADCAST,
    Ipv4Addr::LOCALHOST,
    Ipv4Addr::new(224, 0, 0, 1),
];

const PORTS: [u16; 22] = [
    30080, 30081, 30082, 30053, 30054, 30090, 30091, 30092, 80, 8080, 5353, 22, 40000, 40001,
    61000, 61001, 61002, 60999, 0, 1, 65535, 32768,
];

const TCP_SYN: u64 = 0x02;
const TCP_ACK: u64 = 0x10;
const TCP_FIN: u64 = 0x01;
const TCP_RST: u64 = 0x04;
const TCP_PSH: u64 = 0x08;

fn fields(frame: &[u8]) -> Vec<Field> {
    let field = |name, offset, width, values| Field {
        name,
        offset,
        width,
        values,
    };
    let mut fields = vec![field(
        "ethertype",
        12,
        2,
        Values::Fixed(&[0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8, 0x0000]),
    )];
    let Some(layout) = Layout::of(frame) else {
        return fields;
    };
    let ip = IP_OFF;
    fields.extend([
        field(
            "ip.version_ihl",
            ip,
            1,
            Values::Fixed(&[0x45, 0x46, 0x47, 0x4f, 0x44, 0x40, 0x41, 0x55, 0x65, 0x35]),
        ),
        field("ip.total_length", ip + 2, 2, Values::LengthFrom(ip)),
        field(
            "ip.flags_fragment",
            ip + 6,
            2,
            Values::Fixed(&[
                0x0000, 0x4000, 0x2000, 0x0001, 0x2001, 0x1fff, 0x8000, 0x3fff,
            ]),
        ),
        field("ip.ttl", ip + 8, 1, Values::Fixed(&[0, 1, 2, 63, 64, 255])),
        field(
            "ip.protocol",
            ip + 9,
            1,
            Values::Fixed(&[1, 6, 17, 0, 2, 47, 50, 132, 255]),
        ),
        field("ip.src", ip + 12, 4, Values::Addresses),
        field("ip.dst", ip + 16, 4, Values::Addresses),
    ]);
    let l4 = layout.l4;
    match layout.proto {
        6 => fields.extend([
            field("tcp.sport", l4, 2, Values::Ports),
            field("tcp.dport", l4 + 2, 2, Values::Ports),
            field(
                "tcp.data_offset",
                l4 + 12,
                1,
                Values::Fixed(&[0x00, 0x40, 0x50, 0x60, 0xf0]),
            ),
            field(
                "tcp.flags",
                l4 + 13,
                1,
                Values::Fixed(&[
                    TCP_SYN,
                    TCP_SYN | TCP_ACK,
                    TCP_ACK,
                    TCP_FIN | TCP_ACK,
                    TCP_RST,
                    TCP_RST | TCP_ACK,
                    TCP_FIN,
                    TCP_PSH | TCP_ACK,
                    TCP_SYN | TCP_FIN,
                    0x00,
                    0xff,
                ]),
            ),
        ]),
        17 => fields.extend([
            field("udp.sport", l4, 2, Values::Ports),
            field("udp.dport", l4 + 2, 2, Values::Ports),
            field("udp.length", l4 + 4, 2, Values::LengthFrom(l4)),
            field(
                "udp.checksum",
                l4 + 6,
                2,
                Values::Fixed(&[0, 0xffff, 0x1234]),
            ),
        ]),
        1 => fields.push(field(
            "icmp.type_code",
            l4,
            2,
            Values::Fixed(&[
                0x0303, 0x0304, 0x0301, 0x0b00, 0x0b01, 0x0000, 0x0800, 0x0500,
            ]),
        )),
        _ => {}
    }
    if let Some(quote) = layout.quote() {
        fields.extend([
            field(
                "quote.version_ihl",
                quote,
                1,
                Values::Fixed(&[0x45, 0x46, 0x44, 0x55]),
            ),
            field(
                "quote.total_length",
                quote + 2,
                2,
                Values::LengthFrom(quote),
            ),
            field(
                "quote.protocol",
                quote + 9,
                1,
                Values::Fixed(&[6, 17, 1, 47]),
            ),
            field("quote.src", quote + 12, 4, Values::Addresses),
            field("quote.dst", quote + 16, 4, Values::Addresses),
            field("quote.sport", quote + 20, 2, Values::Ports),
            field("quote.dport", quote + 22, 2, Values::Ports),
        ]);
    }
    fields.retain(|field| field.offset + field.width <= frame.len());
    fields
}

/// A value for `field`: mostly one it lists, sometimes any.
fn field_value(rng: &mut Rng, field: &Field, frame: &[u8]) -> u64 {
    if rng.chance(1, 8) {
        return rng.next_u64() & ((1u64 << (field.width * 8)) - 1);
    }
    match &field.values {
        Values::Fixed(values) => *rng.pick(values),
        Values::Addresses => u32::from(*rng.pick(&ADDRESSES)) as u64,
        Values::Ports => *rng.pick(&PORTS) as u64,
        Values::LengthFrom(start) => {
            let real = frame.len().saturating_sub(*start) as u64;
            *rng.pick(&[0, 8, 19, 20, real.saturating_sub(1), real, real + 1, 0xffff])
        }
    }
}

/// Offsets a truncation is worth trying at: the ends of headers.
fn interesting_lengths(frame: &[u8]) -> Vec<usize> {
    let mut lengths = vec![IP_OFF, IP_OFF + 1, IP_OFF + 19, IP_OFF + 20];
    if let Some(layout) = Layout::of(frame) {
        for extra in [0, 1, 4, 7, 8, 13, 19, 20, 27, 28, 31, 32, 48] {
            lengths.push(layout.l4 + extra);
        }
    }
    lengths.retain(|len| *len <= frame.len());
    lengths
}

/// Zero to four mutations, each noted in `origin`, then (mostly) the
/// checksums and lengths they broke fixed again so the packet gets past
/// the parser into the paths behind it.
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, origin: &mut Vec<String>) {
    let mut resized = false;
    for _ in 0..rng.below(5) {
        match rng.below(11) {
            0 | 1 => {
                // Mostly in the headers, where decisions are made.
                let span = if rng.chance(3, 4) {
                    frame.len().min(80)
                } else {
                    frame.len()
                };
                let at = rng.below(span);
                let bit = rng.below(8);
                frame[at] ^= 1 << bit;
                origin.push(format!("flip bit {bit} of byte {at}"));
            }
            2..=6 => {
                let fields = fields(frame);
                let field = rng.pick(&fields);
                let value = field_value(rng, field, frame);
                let bytes = value.to_be_bytes();
                frame[field.offset..field.offset + field.width]
                    .copy_from_slice(&bytes[8 - field.width..]);
                origin.push(format!("set {} to {value:#x}", field.name));
            }
            7 => {
                let lengths = interesting_lengths(frame);
                let len = if rng.chance(1, 2) && !lengths.is_empty() {
                    *rng.pick(&lengths)
                } else {
                    rng.between(ETH_LEN, frame.len())
                };
                frame.truncate(len);
                resized = true;
                origin.push(format!("truncate to {len} bytes"));
            }
            8 => {
                let room = MAX_FRAME - frame.len();
                if room > 0 {
                    let extra = rng.between(1, room.min(64));
                    let zeros = rng.chance(1, 2);
                    if zeros {
                        frame.resize(frame.len() + extra, 0);
                    } else {
                        let tail = rng.bytes(extra);
                        frame.extend_from_slice(&tail);
                    }
                    resized = true;
                    let what = if zeros { "zero" } else { "random" };
                    origin.push(format!("append {extra} {what} bytes"));
                }
            }
            9 => {
                let at = rng.below(frame.len());
                let value = rng.byte();
                frame[at] = value;
                origin.push(format!("set byte {at} to {value:#04x}"));
            }
            _ => insert_options(rng, frame, origin),
        }
    }
    if resized && rng.chance(1, 2) && fix_total_length(frame) {
        origin.push("fix the IPv4 total length".to_string());
    }
    if rng.chance(3, 4) && fix_checksums(frame) {
        origin.push("fix checksums".to_string());
    }
}

/// Inserts IPv4 options after the header (NOPs and an end of list, or
/// random bytes), up to the longest header IHL allows, and grows IHL and
/// the total length to match: every transport offset moves.
fn insert_options(rng: &mut Rng, frame: &mut Vec<u8>, origin: &mut Vec<String>) {
    let ihl = (frame.get(IP_OFF).copied().unwrap_or(0) & 0x0f) as usize;
    let Some(layout) = Layout::of(frame) else {
        return;
    };
    if !(5..15).contains(&ihl) || layout.l4 > frame.len() {
        return;
    }
    let words = rng.between(1, 15 - ihl);
    let options = if rng.chance(3, 4) {
        let mut options = vec![1u8; words * 4];
        options[words * 4 - 1] = 0;
        options
    } else {
        rng.bytes(words * 4)
    };
    frame.splice(layout.l4..layout.l4, options);
    frame.truncate(MAX_FRAME);
    frame[IP_OFF] = (frame[IP_OFF] & 0xf0) | (ihl + words) as u8;
    let total = u16::from_be_bytes([frame[IP_OFF + 2], frame[IP_OFF + 3]]);
    let total = total.wrapping_add(words as u16 * 4);
    frame[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&total.to_be_bytes());
    origin.push(format!("insert {} bytes of IPv4 options", words * 4));
}

/// Makes the IPv4 total length the frame's; false when not IPv4.
fn fix_total_length(frame: &mut [u8]) -> bool {
    if Layout::of(frame).is_none() {
        return false;
    }
    let total = (frame.len() - IP_OFF).min(u16::MAX as usize) as u16;
    frame[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&total.to_be_bytes());
    true
}

/// Recomputes the IPv4 header checksum, the transport checksum (over the
/// bytes the total length covers; a UDP checksum of 0 stays "none") and an
/// ICMP error's quoted header checksum. False when not IPv4.
fn fix_checksums(frame: &mut [u8]) -> bool {
    let Some(layout) = Layout::of(frame) else {
        return false;
    };
    if let Some(quote) = layout.quote()
        && frame.len() >= quote + 20
    {
        set_checksum(frame, quote, quote + 20, quote + 10, 0);
    }
    let total = u16::from_be_bytes([frame[IP_OFF + 2], frame[IP_OFF + 3]]) as usize;
    let end = (IP_OFF + total).min(frame.len());
    if end > layout.l4 {
        let pseudo = pseudo_header_sum(frame, layout.proto, end - layout.l4);
        match layout.proto {
            6 if end >= layout.l4 + 18 => {
                set_checksum(frame, layout.l4, end, layout.l4 + 16, pseudo)
            }
            17 if end >= layout.l4 + 8 && frame[layout.l4 + 6..layout.l4 + 8] != [0, 0] => {
                set_checksum(frame, layout.l4, end, layout.l4 + 6, pseudo);
                if frame[layout.l4 + 6..layout.l4 + 8] == [0, 0] {
                    frame[layout.l4 + 6..layout.l4 + 8].copy_from_slice(&[0xff, 0xff]);
                }
            }
            1 if end >= layout.l4 + 4 => set_checksum(frame, layout.l4, end, layout.l4 + 2, 0),
            _ => {}
        }
    }
    if frame.len() >= layout.l4 {
        set_checksum(frame, IP_OFF, layout.l4, IP_OFF + 10, 0);
    }
    true
}

/// Writes at `at` the checksum of `frame[start..end]` plus `sum`.
fn set_checksum(frame: &mut [u8], start: usize, end: usize, at: usize, sum: u32) {
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    let check = !fold(sum16(&frame[start..end], sum));
    frame[at..at + 2].copy_from_slice(&check.to_be_bytes());
}

/// The TCP/UDP pseudo-header of an IPv4 frame, for `len` transport bytes.
pub fn pseudo_header_sum(frame: &[u8], proto: u8, len: usize) -> u32 {
    sum16(&frame[IP_OFF + 12..IP_OFF + 20], 0) + proto as u32 + len as u32
}

/// One's-complement sum of big-endian 16-bit words (an odd last byte is
/// padded with zero).
pub fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum = fold_once(sum + u16::from_be_bytes([word[0], word[1]]) as u32);
    }
    if let [last] = words.remainder() {
        sum = fold_once(sum + ((*last as u32) << 8));
    }
    sum
}

fn fold_once(sum: u32) -> u32 {
    (sum & 0xffff) + (sum >> 16)
}

pub fn fold(sum: u32) -> u16 {
    fold_once(fold_once(sum)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Corpus {
        Corpus::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tc")).unwrap()
    }

    #[test]
    fn a_case_is_the_same_bytes_from_its_seed_and_index() {
        let corpus = corpus();
        for index in [0, 1, 7, 1_000_003] {
            let first = corpus.case(42, index);
            let again = corpus.case(42, index);
            assert_eq!(first.frame, again.frame);
            assert_eq!(first.origin, again.origin);
        }
        let differ = (0..100)
            .filter(|index| corpus.case(1, *index).frame != corpus.case(2, *index).frame)
            .count();
        assert!(differ > 90, "seeds 1 and 2 agree on {} cases", 100 - differ);
    }

    #[test]
    fn cases_stay_between_ethernet_and_the_size_limit_and_mix_kinds() {
        let corpus = corpus();
        let mut kinds = std::collections::BTreeMap::new();
        for index in 0..5_000 {
            let case = corpus.case(7, index);
            assert!(
                (ETH_LEN..=MAX_FRAME).contains(&case.frame.len()),
                "case {index}: {} bytes ({})",
                case.frame.len(),
                case.origin
            );
            *kinds.entry(case.kind).or_insert(0) += 1;
        }
        assert_eq!(kinds.len(), CaseKind::ALL.len(), "{kinds:?}");
    }

    #[test]
    fn fixed_checksums_verify() {
        let corpus = corpus();
        let mut frame = corpus
            .steps
            .iter()
            .map(|step| step[0].frame.clone())
            .find(|frame| Layout::of(frame).is_some_and(|layout| layout.proto == 6))
            .unwrap();
        let layout = Layout::of(&frame).unwrap();
        frame[IP_OFF + 16] ^= 0x55;
        frame[layout.l4] ^= 0x55;
        assert!(fix_checksums(&mut frame));
        assert_eq!(fold(sum16(&frame[IP_OFF..layout.l4], 0)), 0xffff);
        let pseudo = pseudo_header_sum(&frame, 6, frame.len() - layout.l4);
        assert_eq!(fold(sum16(&frame[layout.l4..], pseudo)), 0xffff);
    }
}
