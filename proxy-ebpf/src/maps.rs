//! Every map of the datapath, documented where it is defined. Layouts live in
//! `proxy-common`; the agent pins each map under its pin directory and is
//! its only writer, except for the LRU tables the programs fill. The sizes
//! here are defaults: the agent sets the large ones at load time.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, CtEntry, CtReply, Flow4, MaglevKey,
    RevNat, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SourceRange, maglev,
    map_sizes,
};

/// Maps only the agent writes are allocated as they fill: their capacity
/// is sized for large clusters without reserving that memory up front.
const ON_DEMAND: usize = BPF_F_NO_PREALLOC as usize;

/// Frontends. `{addr, port, proto, scope, slot 0}` is the master entry of
/// a frontend for one scope (backend count, service-port id, rev-NAT id,
/// affinity timeout, flags); slots `1..=count` hold the ids of the
/// backends that scope selects. Written slots first, master last, so a
/// reader never sees a count beyond the written slots.
#[btf_map(name = "lb4_services")]
pub static SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { map_sizes::SERVICES as usize },
    { ON_DEMAND },
> = HashMap::new();

/// Backends by id. Ids are allocated by the agent, never 0, and stay the
/// same for an address:port:proto across agent restarts. The `LOCAL` flag
/// says whether external flows to it need SNAT.
#[btf_map(name = "lb4_backends")]
pub static BACKENDS: HashMap<u32, Backend, { map_sizes::BACKENDS as usize }, { ON_DEMAND }> =
    HashMap::new();

/// rev-NAT id -> frontend: what a reply of a translated external flow must
/// appear to come from. Written before the masters that carry the id.
#[btf_map(name = "lb4_rev_nat")]
pub static REV_NAT: HashMap<u32, RevNat, { map_sizes::REV_NAT as usize }, { ON_DEMAND }> =
    HashMap::new();

/// loadBalancerSourceRanges per frontend (rule 15): `{rev-NAT id, CIDR}`.
/// Consulted for new external flows of masters with the SOURCE_RANGES flag.
#[btf_map(name = "lb4_src_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8, { map_sizes::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// ClientIP session affinity: the backend a client last got for a service
/// port, and when. Filled by the programs; LRU bounds it.
#[btf_map(name = "lb4_affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { map_sizes::AFFINITY as usize }> =
    LruHashMap::new();

/// `{backend id, service-port id}` pairs of the currently selected sets.
/// An affinity entry whose pair is missing is ignored.
#[btf_map(name = "lb_aff_match")]
pub static AFFINITY_MATCH: HashMap<
    AffinityMatchKey,
    u8,
    { map_sizes::AFFINITY_MATCH as usize },
    { ON_DEMAND },
> = HashMap::new();

/// Socket-level reverse NAT: which frontend a socket addressed before it was
/// sent to a backend. Filled by connect4/6 and sendmsg4; read by recvmsg4/6
/// and getpeername4/6 (IPv6 sockets by the IPv4 address of their mapped
/// one). LRU bounds it; a socket's entries die with it in practice.
#[btf_map(name = "lb4_sock_rnat")]
pub static SOCK_REV_NAT: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { map_sizes::SOCK_REV_NAT as usize },
> = LruHashMap::new();

/// Conntrack of translated external flows, keyed by the client's packet as
/// it arrives (client -> frontend): the backend it keeps (rule 29), its
/// SNAT source, TCP state and last use. Filled by tc ingress; expired
/// entries are removed by the agent; LRU bounds it.
#[btf_map(name = "lb4_ct")]
pub static CONNTRACK: LruHashMap<Flow4, CtEntry, { map_sizes::CONNTRACK as usize }> =
    LruHashMap::new();

/// The reply half of every `lb4_ct` entry, keyed by the reply as it
/// arrives (backend -> node address and SNAT port, or backend -> client):
/// the NAT table of the reply path. Inserted before its `lb4_ct` entry,
/// removed after it.
#[btf_map(name = "lb4_ct_reply")]
pub static CT_REPLY: LruHashMap<Flow4, CtReply, { map_sizes::CT_REPLY as usize }> =
    LruHashMap::new();

/// A Maglev table as the programs see it: index 0 its size M, `1..=M`
/// backend ids. Real tables have M + 1 entries (`BPF_F_INNER_MAP`).
pub type MaglevTable =
    Array<u32, { maglev::TEMPLATE_ENTRIES as usize }, { maglev::INNER_MAP_FLAGS as usize }>;

/// Maglev tables of external frontends, by service port and backend set.
/// The agent builds a table whole and swaps it in with one update, so a
/// new flow sees the old table or the new one, never a mix.
#[btf_map(name = "lb4_maglev")]
pub static MAGLEV: HashOfMaps<MaglevKey, MaglevTable, { map_sizes::MAGLEV as usize }> =
    HashOfMaps::new();

/// Per-CPU event counters, indexed by `proxy_common::Counter`.
#[btf_map(name = "lb_counters")]
pub static COUNTERS: PerCpuArray<u64, { map_sizes::COUNTERS as usize }> = PerCpuArray::new();

/// Adds one to a counter.
#[inline(always)]
pub fn count(counter: proxy_common::Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer runs concurrently on this CPU.
        unsafe { *value += 1 };
    }
}
