//! Types shared by the eBPF programs and the userspace agent.
//!
//! Every map key and value is defined once, here: `#[repr(C)]`, padding made
//! explicit (so `bytemuck::Pod` proves there are no hidden bytes), and
//! `aya::Pod` behind the `user` feature. Addresses and ports are stored in
//! network byte order, exactly as the kernel hands them to socket hooks, so
//! the datapath never swaps bytes; userspace converts when it writes them.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names, as the kernel and `bpftool map dump name ...` show them
/// (at most 15 characters).
pub mod map_names {
    /// [`super::ServiceKey`] -> [`super::ServiceValue`].
    pub const SERVICES: &str = "lb4_services";
    /// backend id (`u32`) -> [`super::Backend`].
    pub const BACKENDS: &str = "lb4_backends";
    /// [`super::AffinityKey`] -> [`super::AffinityValue`] (LRU).
    pub const AFFINITY: &str = "lb4_affinity";
    /// [`super::AffinityMatchKey`] -> `u8`.
    pub const AFFINITY_MATCH: &str = "lb_aff_match";
    /// [`super::SockRevNatKey`] -> [`super::SockRevNatValue`] (LRU).
    pub const SOCK_REV_NAT: &str = "lb4_sock_rnat";
    /// [`super::Counter`] index -> `u64`, per CPU.
    pub const COUNTERS: &str = "lb_counters";

    /// Every map the object defines, in the order the agent pins them.
    pub const ALL: [&str; 6] = [
        SERVICES,
        BACKENDS,
        AFFINITY,
        AFFINITY_MATCH,
        SOCK_REV_NAT,
        COUNTERS,
    ];
}

/// Capacities. Changing one changes the pinned map's definition: an agent
/// with a different size refuses to reuse the old pin. The maps the agent
/// writes are allocated on demand (not preallocated), so a large capacity
/// costs kernel memory only as it fills.
pub mod map_sizes {
    /// One master entry per frontend, one per backend slot, and the rule 9
    /// entries (two per ClusterIP): 10k services x 10 endpoints need ~140k.
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    pub const AFFINITY_MATCH: u32 = 262_144;
    /// One entry per translated socket and backend; LRU evicts the oldest.
    pub const SOCK_REV_NAT: u32 = 262_144;
    pub const COUNTERS: u32 = super::Counter::COUNT;
}

/// Transport protocol numbers as in `bpf_sock_addr.protocol`.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Key of `lb4_services`. Slot 0 is the frontend's master entry; slots
/// `1..=count` hold its backend ids. Port 0 (with count 0) marks an
/// allocated ClusterIP: its undefined ports are refused (rule 9).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    pub _pad0: u8,
    /// 0 for the master entry, 1..=count for backend slots.
    pub slot: u16,
    pub _pad1: u16,
}

impl ServiceKey {
    #[inline(always)]
    pub const fn new(addr: u32, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad0: 0,
            slot,
            _pad1: 0,
        }
    }
}

/// Value of `lb4_services`. In the master entry (slot 0) `count`, `svc_id`
/// and `affinity_timeout` are set and `backend_id` is 0; in a backend slot
/// only `backend_id` is set.
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
}

impl ServiceValue {
    #[inline(always)]
    pub const fn master(
        count: u16,
        flags: u8,
        selection: u8,
        svc_id: u32,
        affinity_timeout: u32,
    ) -> Self {
        Self {
            backend_id: 0,
            count,
            flags,
            selection,
            svc_id,
            affinity_timeout,
        }
    }

    #[inline(always)]
    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            flags: 0,
            selection: 0,
            svc_id: 0,
            affinity_timeout: 0,
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
    pub _pad0: u8,
}

impl Backend {
    #[inline(always)]
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad0: 0,
        }
    }
}

/// Key of `lb4_affinity`. At socket level the client is identified by its
/// network namespace cookie: a pod has its own namespace (and so one IP),
/// and the source address is not chosen yet when `connect()` runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub client: u64,
    pub svc_id: u32,
    /// [`ServiceValue::selection`] of the frontend used.
    pub selection: u32,
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
/// to. `recvmsg4`/`getpeername4` find the frontend the application asked for.
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

/// Datapath counters, indices of `lb_counters`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A socket's destination was translated to a backend.
    Translated = 0,
    /// A frontend with no usable endpoint refused a connection (rule 21).
    RejectedNoBackend = 1,
    /// A master entry pointed at a slot or backend that is missing: the
    /// maps are inconsistent; the socket is refused rather than leaked.
    MissingBackend = 2,
    /// The socket reverse-NAT entry could not be stored (map full).
    RevNatStoreFailed = 3,
    /// `recvmsg4`/`getpeername4` showed the frontend instead of the backend.
    RevNatApplied = 4,
    /// A new flow reused its client's affinity entry.
    AffinityHit = 5,
    /// A frontend with endpoints elsewhere but none usable here dropped a
    /// new flow (rules 18, 19, 28).
    DroppedNoLocalBackend = 6,
}

impl Counter {
    pub const COUNT: u32 = 7;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Translated,
        Counter::RejectedNoBackend,
        Counter::MissingBackend,
        Counter::RevNatStoreFailed,
        Counter::RevNatApplied,
        Counter::AffinityHit,
        Counter::DroppedNoLocalBackend,
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
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
}
