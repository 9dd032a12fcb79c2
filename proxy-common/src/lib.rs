//! Types shared by the eBPF programs and the userspace agent.
//!
//! Every map key and value is defined once, here: `#[repr(C)]`, padding made
//! explicit (so `bytemuck::Pod` proves there are no hidden bytes), and
//! `aya::Pod` behind the `user` feature. Addresses and ports are stored in
//! network byte order, exactly as packets and the kernel's socket hooks
//! carry them, so the datapath never swaps bytes; userspace converts when it
//! writes them.
//!
//! IPv4 maps are named `lb4_*`; IPv6 will add `lb6_*` maps of the same
//! shape with 16-byte addresses, next to these, not instead of them.
#![no_std]

pub mod lb;

use bytemuck::{Pod, Zeroable};

/// Version of the map layout below. An agent that finds pins of another
/// layout (or other capacities) builds new maps beside them, fills them,
/// swaps its programs over and only then removes the old pins.
pub const LAYOUT_VERSION: u32 = 2;

/// Map names, as the kernel and `bpftool map dump name ...` show them
/// (at most 15 characters).
pub mod map_names {
    /// [`super::ServiceKey`] -> [`super::ServiceValue`].
    pub const SERVICES: &str = "lb4_services";
    /// backend id (`u32`) -> [`super::Backend`].
    pub const BACKENDS: &str = "lb4_backends";
    /// rev-NAT id (`u32`) -> [`super::RevNat`]: the frontend a reply must
    /// appear to come from.
    pub const REV_NAT: &str = "lb4_rev_nat";
    /// [`super::SourceRange`] (with a prefix length) -> `u8` (LPM trie, rule 15).
    pub const SOURCE_RANGES: &str = "lb4_src_ranges";
    /// [`super::AffinityKey`] -> [`super::AffinityValue`] (LRU).
    pub const AFFINITY: &str = "lb4_affinity";
    /// [`super::AffinityMatchKey`] -> `u8`.
    pub const AFFINITY_MATCH: &str = "lb_aff_match";
    /// [`super::SockRevNatKey`] -> [`super::SockRevNatValue`] (LRU).
    pub const SOCK_REV_NAT: &str = "lb4_sock_rnat";
    /// [`super::Flow4`] (client -> frontend) -> [`super::CtEntry`] (LRU).
    pub const CONNTRACK: &str = "lb4_ct";
    /// [`super::Flow4`] (a reply as it arrives) -> [`super::CtReply`] (LRU):
    /// the NAT table of the reply path.
    pub const CT_REPLY: &str = "lb4_ct_reply";
    /// [`super::Counter`] index -> `u64`, per CPU.
    pub const COUNTERS: &str = "lb_counters";
    /// [`super::MaglevKey`] -> a Maglev lookup table (an inner array, see
    /// [`super::maglev`]).
    pub const MAGLEV: &str = "lb4_maglev";

    /// Every map the agent pins, in that order. The object's other maps,
    /// aya-log's ring `AYA_LOGS` and its rate limiter `lb_log_last`,
    /// belong to one load of the programs and are not pinned.
    pub const ALL: [&str; 11] = [
        SERVICES,
        BACKENDS,
        REV_NAT,
        SOURCE_RANGES,
        AFFINITY,
        AFFINITY_MATCH,
        SOCK_REV_NAT,
        CONNTRACK,
        CT_REPLY,
        COUNTERS,
        MAGLEV,
    ];
}

/// Default capacities: what the object declares. The agent overrides the
/// large ones at load time (`--max-services`, `--max-backends`,
/// `--conntrack-entries`, `--nat-entries`). Maps only the agent writes are
/// allocated as they fill; LRU maps are preallocated by the kernel.
pub mod map_sizes {
    /// Master entries (one per frontend and scope), backend slots and the
    /// rule 9 entries (two per ClusterIP). 100k ClusterIP Services with one
    /// endpoint need 400k; 10k NodePort Services on 3 node addresses with
    /// 10 endpoints need 790k.
    pub const SERVICES: u32 = 1_048_576;
    pub const BACKENDS: u32 = 262_144;
    /// One per frontend.
    pub const REV_NAT: u32 = 262_144;
    pub const SOURCE_RANGES: u32 = 16_384;
    pub const AFFINITY: u32 = 65_536;
    pub const AFFINITY_MATCH: u32 = 262_144;
    /// One entry per translated socket and backend; LRU evicts the oldest.
    pub const SOCK_REV_NAT: u32 = 262_144;
    /// Tracked external flows.
    pub const CONNTRACK: u32 = 262_144;
    /// Their reply tuples (one per tracked flow).
    pub const CT_REPLY: u32 = 262_144;
    pub const COUNTERS: u32 = super::Counter::COUNT;
    /// Maglev tables: one per service port and backend set.
    pub const MAGLEV: u32 = 65_536;
}

/// Maglev consistent hashing for external flows (every node builds the
/// same table from the same backends, so a flow that moves to another
/// node, by ECMP or a balancer's re-hash, lands on the same backend).
///
/// A table is an array map (`u32` index -> `u32`): index 0 holds the
/// table's size M (prime), indices `1..=M` the backend ids. It is built
/// whole and swapped into `lb4_maglev` in one update, so a change is atomic
/// per table; holding M itself, a table stays right while tables of
/// another size replace it.
pub mod maglev {
    /// The default M (prime), as in Cilium.
    pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
    /// The largest M the agent accepts (prime).
    pub const MAX_TABLE_SIZE: u32 = 131_071;
    /// Entries of the inner-map template; real tables have M + 1
    /// (`BPF_F_INNER_MAP` lets them differ).
    pub const TEMPLATE_ENTRIES: u32 = DEFAULT_TABLE_SIZE + 1;
    /// `BPF_F_INNER_MAP`: set on the template and on every table.
    pub const INNER_MAP_FLAGS: u32 = 1 << 12;

    /// The table slot (`1..=m`) of a flow hash.
    #[inline(always)]
    pub const fn slot(hash: u32, m: u32) -> u32 {
        hash % m + 1
    }
}

/// Key of `lb4_maglev`: the frontends of a service port that select the
/// same backends share one table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct MaglevKey {
    pub svc_id: u32,
    /// [`ServiceValue::selection`] of the external master.
    pub selection: u32,
}

/// The hash of a flow that picks its Maglev slot: the same on every node
/// and in userspace (`ebpf-proxy explain`). murmur3's mixing over the
/// 5-tuple as the packet carries it.
#[inline(always)]
pub const fn flow_hash(flow: &Flow4) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let words = [
        flow.saddr,
        flow.daddr,
        ((flow.sport as u32) << 16) | flow.dport as u32,
        flow.proto as u32,
    ];
    let mut hash: u32 = 0x5eed_1b5a;
    let mut i = 0;
    while i < words.len() {
        let mut k = words[i].wrapping_mul(C1);
        k = k.rotate_left(15).wrapping_mul(C2);
        hash ^= k;
        hash = hash
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
        i += 1;
    }
    hash ^= 16;
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// Transport protocol numbers as in the IPv4 header and
/// `bpf_sock_addr.protocol`.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Which clients a master entry serves ([`ServiceKey::scope`]).
pub mod scope {
    /// Clients on this node: pods and host processes, translated by the
    /// socket hooks. Every frontend has this scope.
    pub const INTERNAL: u8 = 0;
    /// Packets from outside the node, translated by tc: NodePorts,
    /// externalIPs and LoadBalancer IPs only (rules 16-18).
    pub const EXTERNAL: u8 = 1;
}

/// Key of `lb4_services`. Slot 0 is a frontend's master entry for one
/// scope; slots `1..=count` hold its backend ids. Port 0 (with count 0,
/// internal scope) marks an allocated ClusterIP: its undefined ports are
/// refused (rule 9).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`scope::INTERNAL`] or [`scope::EXTERNAL`].
    pub scope: u8,
    /// 0 for the master entry, 1..=count for backend slots.
    pub slot: u16,
    pub _pad0: u16,
}

impl ServiceKey {
    #[inline(always)]
    pub const fn new(addr: u32, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            scope,
            slot,
            _pad0: 0,
        }
    }

    /// The key of slot `slot` of the same frontend and scope.
    #[inline(always)]
    pub const fn with_slot(&self, slot: u16) -> Self {
        Self::new(self.addr, self.port, self.proto, self.scope, slot)
    }
}

/// Value of `lb4_services`. In a master entry (slot 0) everything but
/// `backend_id` is set; in a backend slot only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceValue {
    /// Backend slot: id into `lb4_backends`.
    pub backend_id: u32,
    /// Master: number of backend slots. 0 means the frontend has no
    /// backend for new flows: refused (rule 21), or dropped when
    /// [`service_flags::DROP_WHEN_EMPTY`] is set (rules 18, 19, 28).
    pub count: u16,
    /// Master: [`service_flags`] bits.
    pub flags: u8,
    /// Master: which of its service port's backend sets this frontend
    /// selects (frontends of one port differ under a Local traffic policy).
    /// Affinity is shared by the frontends with the same selection.
    pub selection: u8,
    /// Master: id of the service port, shared by all of its frontends;
    /// the affinity tables are keyed by it (rule 23).
    pub svc_id: u32,
    /// Master: ClientIP affinity timeout in seconds, 0 when affinity is off.
    pub affinity_timeout: u32,
    /// Master: the frontend's id in `lb4_rev_nat` (and of its source
    /// ranges in `lb4_src_ranges`); 0 for rule 9 entries.
    pub rev_nat_id: u32,
}

impl ServiceValue {
    #[inline(always)]
    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            flags: 0,
            selection: 0,
            svc_id: 0,
            affinity_timeout: 0,
            rev_nat_id: 0,
        }
    }
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// With no backend, new flows are dropped rather than refused: the
    /// service has endpoints, just none this frontend may use (a Local
    /// traffic policy with no local endpoint). At socket level a drop
    /// cannot make `connect()` wait, so it fails with EHOSTUNREACH (what a
    /// dropped path reports), never the ECONNREFUSED of rule 21.
    pub const DROP_WHEN_EMPTY: u8 = 1 << 0;
    /// New flows must come from a source in `lb4_src_ranges` under the
    /// frontend's rev-NAT id (rule 15).
    pub const SOURCE_RANGES: u8 = 1 << 1;
}

/// Value of `lb4_backends`, keyed by backend id (`u32`, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// [`backend_flags`] bits.
    pub flags: u8,
}

impl Backend {
    #[inline(always)]
    pub const fn new(addr: u32, port: u16, proto: u8, flags: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            flags,
        }
    }
}

/// Bits of [`Backend::flags`].
pub mod backend_flags {
    /// The endpoint runs on this node: external flows are only
    /// destination-NATed (its reply passes back through this node anyway).
    /// Without it, external flows are also source-NATed to this node so
    /// the reply returns here (rule 17).
    pub const LOCAL: u8 = 1 << 0;
}

/// Value of `lb4_rev_nat`: the frontend replies must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct RevNat {
    /// Frontend address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad0: u16,
}

/// Data of a `lb4_src_ranges` LPM trie key (the trie's key is this behind
/// a `u32` prefix length): a frontend (by rev-NAT id) and a source CIDR.
/// The prefix length counts the 32 bits of `rev_nat_id` plus the CIDR's own
/// length ([`SourceRange::prefix_len`]), so a lookup with prefix length 64
/// matches a source against one frontend's ranges only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRange {
    /// Big-endian, so the trie's leading bits are the id.
    pub rev_nat_id: u32,
    /// Source address, network byte order.
    pub addr: u32,
}

impl SourceRange {
    /// The prefix length of an exact lookup.
    pub const LOOKUP_PREFIX_LEN: u32 = 64;

    #[inline(always)]
    pub const fn new(rev_nat_id: u32, addr: u32) -> Self {
        Self {
            rev_nat_id: rev_nat_id.to_be(),
            addr,
        }
    }

    /// The trie prefix length of a CIDR of `cidr_len` bits.
    #[inline(always)]
    pub const fn prefix_len(cidr_len: u8) -> u32 {
        32 + cidr_len as u32
    }
}

/// Key of `lb4_affinity`. At socket level the client is the network
/// namespace cookie (the source address is not chosen yet at `connect()`,
/// and a pod has one namespace); at packet level it is the client's IPv4
/// address with [`AffinityKey::PACKET_CLIENT`] set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub client: u64,
    pub svc_id: u32,
    /// [`ServiceValue::selection`] of the frontend used.
    pub selection: u32,
}

impl AffinityKey {
    /// Marks a packet-level client so it never meets a netns cookie.
    pub const PACKET_CLIENT: u64 = 1 << 63;
}

/// Value of `lb4_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// Seconds of monotonic time (`bpf_ktime_get_ns() / 1e9`) of the last new
    /// flow that used this entry.
    pub last_used: u32,
}

/// Key of `lb_aff_match`: present when `backend_id` is in selection
/// `selection` of `svc_id`. An affinity entry is honoured only while its
/// pair is here, so affinity never points outside the set the frontend
/// currently selects (rule 23).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityMatchKey {
    pub backend_id: u32,
    pub svc_id: u32,
    pub selection: u32,
}

/// Key of `lb4_sock_rnat`: a translated socket and the backend it was sent
/// to. `recvmsg`/`getpeername` (4 and 6) find the frontend the application
/// asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatKey {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad0: u16,
}

/// Value of `lb4_sock_rnat`: the frontend the socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatValue {
    pub addr: u32,
    pub port: u16,
    pub _pad0: u16,
}

/// An IPv4 flow as a packet carries it: addresses and ports in network
/// byte order. Key of `lb4_ct` (the client's packet as it arrives) and of
/// `lb4_ct_reply` (the backend's reply as it arrives). For ICMP echo the
/// ports are the identifier (both).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Flow4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad0: [u8; 3],
}

impl Flow4 {
    #[inline(always)]
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad0: [0; 3],
        }
    }

    /// The same flow seen from the other end.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }
}

/// Value of `lb4_ct`: a translated external flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` of the last packet, either direction.
    pub last_seen: u64,
    pub backend_id: u32,
    /// The frontend, in `lb4_rev_nat`.
    pub rev_nat_id: u32,
    /// The backend chosen when the flow started, network byte order: the
    /// flow keeps it while `backend_id` still names it (rule 29).
    pub backend_addr: u32,
    /// Source the flow was NATed to (a node address), 0 without SNAT.
    pub nat_addr: u32,
    pub backend_port: u16,
    pub nat_port: u16,
    /// [`ct_state`].
    pub state: u8,
    /// [`ct_flags`].
    pub flags: u8,
    pub _pad0: u16,
}

/// Value of `lb4_ct_reply`: how to turn a reply back into what the client
/// expects. The frontend comes from `lb4_rev_nat`, so replies of a
/// frontend that is gone are no longer translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtReply {
    /// The client, network byte order (the reply's destination after SNAT
    /// is undone).
    pub client_addr: u32,
    pub rev_nat_id: u32,
    pub client_port: u16,
    /// [`ct_flags`].
    pub flags: u8,
    pub _pad0: u8,
}

/// [`CtEntry::state`]: what the flow's timeout is.
pub mod ct_state {
    /// TCP: only the client's SYN seen.
    pub const TCP_SYN: u8 = 1;
    pub const TCP_ESTABLISHED: u8 = 2;
    /// TCP: a FIN or RST seen.
    pub const TCP_CLOSING: u8 = 3;
    /// UDP (and ICMP echo).
    pub const DATAGRAM: u8 = 4;
}

/// Bits of [`CtEntry::flags`] and [`CtReply::flags`].
pub mod ct_flags {
    /// The flow's source was NATed to a node address (backend elsewhere).
    pub const SNAT: u8 = 1 << 0;
}

/// Idle timeouts of tracked flows, in seconds, by [`ct_state`]; the
/// agent's garbage collector and `ebpf-proxy conntrack` use them.
pub mod ct_timeouts {
    pub const TCP_SYN: u64 = 60;
    pub const TCP_ESTABLISHED: u64 = 6 * 60 * 60;
    pub const TCP_CLOSING: u64 = 10;
    pub const DATAGRAM: u64 = 60;

    pub const fn of(state: u8) -> u64 {
        match state {
            super::ct_state::TCP_ESTABLISHED => TCP_ESTABLISHED,
            super::ct_state::TCP_CLOSING => TCP_CLOSING,
            super::ct_state::DATAGRAM => DATAGRAM,
            _ => TCP_SYN,
        }
    }
}

/// Source ports of SNATed flows: above Linux's default ephemeral range
/// (32768-60999) and the NodePort range (30000-32767), so they collide
/// with neither local sockets nor NodePorts.
pub mod nat_ports {
    pub const FIRST: u16 = 61_000;
    pub const LAST: u16 = 65_535;
    /// Random ports tried before a new flow counts as NAT exhaustion: with
    /// the range 90% taken, 32 tries still find a free port 24 times in 25.
    pub const TRIES: u32 = 32;
}

/// Datapath counters, indices of `lb_counters`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A socket's destination was translated to a backend.
    Translated = 0,
    /// A frontend with no usable endpoint refused a new flow (rule 21): a
    /// failed `connect()`, or a TCP RST / ICMP port unreachable sent back.
    RejectedNoBackend = 1,
    /// A master entry pointed at a slot or backend that is missing: the
    /// maps are inconsistent; the flow is refused rather than leaked.
    MissingBackend = 2,
    /// The socket reverse-NAT entry could not be stored (map full).
    RevNatStoreFailed = 3,
    /// `recvmsg`/`getpeername` showed the frontend instead of the backend.
    RevNatApplied = 4,
    /// A new flow reused its client's affinity entry.
    AffinityHit = 5,
    /// A frontend with endpoints elsewhere but none usable here dropped a
    /// new flow (rules 18, 19, 28).
    DroppedNoLocalBackend = 6,
    /// A new external flow was translated to a backend (tc).
    PacketNewFlow = 7,
    /// ... and source-NATed, its backend being on another node (rule 17).
    PacketSnat = 8,
    /// A packet of a tracked external flow, client to backend.
    PacketEstablished = 9,
    /// A reply of a tracked external flow turned back to the frontend.
    PacketReply = 10,
    /// A new flow from outside a LoadBalancer IP's source ranges (rule 15).
    DroppedSourceRange = 11,
    /// No free SNAT port for a new flow to a remote backend.
    DroppedNatExhausted = 12,
    /// The conntrack or reply table refused a new flow's entry.
    DroppedConntrackFull = 13,
    /// A flow to forward to another node had TTL 1.
    DroppedTtlExceeded = 14,
    /// No route (FIB lookup failed) towards a remote backend or a client.
    DroppedNoRoute = 15,
    /// A packet too short for the headers it claims.
    MalformedTruncated = 16,
    /// An IPv4 header with IHL < 5 or a total length beyond the packet.
    MalformedIpHeader = 17,
    /// An IPv4 fragment: passed untranslated (only the first one carries
    /// ports, so fragments cannot be balanced here).
    FragmentPassed = 18,
    /// An ICMP error about a tracked flow was translated back.
    IcmpErrorTranslated = 19,
    /// A socket's chosen slot was gone (its service shrank between the
    /// master read and the slot read): the master was read once more.
    MasterReread = 20,
}

impl Counter {
    pub const COUNT: u32 = 21;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Translated,
        Counter::RejectedNoBackend,
        Counter::MissingBackend,
        Counter::RevNatStoreFailed,
        Counter::RevNatApplied,
        Counter::AffinityHit,
        Counter::DroppedNoLocalBackend,
        Counter::PacketNewFlow,
        Counter::PacketSnat,
        Counter::PacketEstablished,
        Counter::PacketReply,
        Counter::DroppedSourceRange,
        Counter::DroppedNatExhausted,
        Counter::DroppedConntrackFull,
        Counter::DroppedTtlExceeded,
        Counter::DroppedNoRoute,
        Counter::MalformedTruncated,
        Counter::MalformedIpHeader,
        Counter::FragmentPassed,
        Counter::IcmpErrorTranslated,
        Counter::MasterReread,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Translated => "translated",
            Counter::RejectedNoBackend => "rejected_no_backend",
            Counter::MissingBackend => "missing_backend",
            Counter::RevNatStoreFailed => "rev_nat_store_failed",
            Counter::RevNatApplied => "rev_nat_applied",
            Counter::AffinityHit => "affinity_hit",
            Counter::DroppedNoLocalBackend => "dropped_no_local_backend",
            Counter::PacketNewFlow => "packet_new_flow",
            Counter::PacketSnat => "packet_snat",
            Counter::PacketEstablished => "packet_established",
            Counter::PacketReply => "packet_reply",
            Counter::DroppedSourceRange => "dropped_source_range",
            Counter::DroppedNatExhausted => "dropped_nat_exhausted",
            Counter::DroppedConntrackFull => "dropped_conntrack_full",
            Counter::DroppedTtlExceeded => "dropped_ttl_exceeded",
            Counter::DroppedNoRoute => "dropped_no_route",
            Counter::MalformedTruncated => "malformed_truncated",
            Counter::MalformedIpHeader => "malformed_ip_header",
            Counter::FragmentPassed => "fragment_passed",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::MasterReread => "master_reread",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)], contain only integers and have no
    // implicit padding (checked by the bytemuck::Pod derive).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for Flow4 {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for CtReply {}
    unsafe impl aya::Pod for MaglevKey {}
}
