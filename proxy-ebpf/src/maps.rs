//! Every map of the datapath, documented where it is defined. Layouts live in
//! `proxy-common`; the agent pins each map under `<bpffs>/maps/<name>` and
//! is its only writer, except for the LRU tables the programs fill.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, ServiceKey, ServiceValue, SockRevNatKey,
    SockRevNatValue, map_sizes,
};

/// Maps only the agent writes are allocated as they fill: their capacity
/// is sized for large clusters without reserving that memory up front.
const ON_DEMAND: usize = BPF_F_NO_PREALLOC as usize;

/// Frontends. `{addr, port, proto, slot 0}` is the master entry of a
/// frontend (backend count, service-port id, affinity timeout); slots
/// `1..=count` hold the ids of the selected backends. Written slots first,
/// master last, so a reader never sees a count beyond the written slots.
#[btf_map(name = "lb4_services")]
pub static SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { map_sizes::SERVICES as usize },
    { ON_DEMAND },
> = HashMap::new();

/// Backends by id. Ids are allocated by the agent, never 0, and stay the
/// same for an address:port:proto across agent restarts.
#[btf_map(name = "lb4_backends")]
pub static BACKENDS: HashMap<u32, Backend, { map_sizes::BACKENDS as usize }, { ON_DEMAND }> =
    HashMap::new();

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
/// sent to a backend. Filled by connect4/sendmsg4; read by recvmsg4 and
/// getpeername4. LRU bounds it; a socket's entries die with it in practice.
#[btf_map(name = "lb4_sock_rnat")]
pub static SOCK_REV_NAT: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { map_sizes::SOCK_REV_NAT as usize },
> = LruHashMap::new();

/// Per-CPU event counters, indexed by `proxy_common::Counter`.
#[btf_map(name = "lb_counters")]
pub static COUNTERS: PerCpuArray<u64, { map_sizes::COUNTERS as usize }> = PerCpuArray::new();
