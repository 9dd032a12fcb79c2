//! Rare datapath events: counted like every event, and also logged
//! through aya-log into the agent's output, so an operator sees why
//! traffic was dropped without polling the counters. A line per event
//! kind per second per CPU at most: a flood of bad packets must not flood
//! the log ring or cost more than a map lookup. The counters stay the
//! source of truth; a line that finds the ring full is lost.
//!
//! The level is the agent's `--datapath-log-level`, fixed at load time
//! (`AYA_LOG_LEVEL`), so lines below it cost nothing after verification.
//! Only error branches call these, never the path of a translated packet.
//! They stay out of line (BPF subprograms): inlined, a log line's stack
//! would add to the frame of every program that raises it.

use core::net::Ipv4Addr;

use aya_ebpf::{btf_maps::PerCpuArray, helpers::generated::bpf_ktime_get_ns, macros::btf_map};
use aya_log_ebpf::warn;
use proxy_common::Counter;

use crate::maps::count;

const LOG_INTERVAL_NS: u64 = 1_000_000_000;

/// When each event kind (by `Counter` index) was last logged on this CPU,
/// in `bpf_ktime_get_ns()` time. Not pinned: a new agent starts with an
/// empty one, which at worst logs one line early.
#[btf_map(name = "lb_log_last")]
static LAST_LOGGED: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// aya-log-ebpf 0.2 takes a context argument and ignores it; these events
/// are raised deep in helpers that have none at hand.
const NO_CONTEXT: () = ();

/// Whether `counter`'s event may be logged now on this CPU (and, if so,
/// marks it logged).
#[inline(always)]
fn due(counter: Counter) -> bool {
    let Some(last) = LAST_LOGGED.get_ptr_mut(counter as u32) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Per-CPU slot: no other writer runs concurrently on this CPU.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

fn addr(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// A packet left alone because its headers do not hold together.
#[inline(never)]
pub fn malformed(counter: Counter) {
    count(counter);
    if !due(counter) {
        return;
    }
    if counter == Counter::MalformedIpHeader {
        warn!(
            &NO_CONTEXT,
            "malformed packet passed untranslated: IPv4 header length or total length invalid"
        );
    } else {
        warn!(
            &NO_CONTEXT,
            "malformed packet passed untranslated: shorter than the headers it claims"
        );
    }
}

/// No free SNAT port towards the backend: the new flow is dropped.
#[inline(never)]
pub fn nat_exhausted(backend_addr: u32, backend_port: u16) {
    count(Counter::DroppedNatExhausted);
    if !due(Counter::DroppedNatExhausted) {
        return;
    }
    warn!(
        &NO_CONTEXT,
        "new flow dropped: no free SNAT port towards backend {:i}:{} (too many flows from this node to it)",
        addr(backend_addr),
        u16::from_be(backend_port)
    );
}

/// The conntrack or reply table refused a new flow's entry.
#[inline(never)]
pub fn conntrack_full(frontend_addr: u32, frontend_port: u16) {
    count(Counter::DroppedConntrackFull);
    if !due(Counter::DroppedConntrackFull) {
        return;
    }
    warn!(
        &NO_CONTEXT,
        "new flow to {:i}:{} dropped: conntrack table full (--conntrack-entries, --nat-entries)",
        addr(frontend_addr),
        u16::from_be(frontend_port)
    );
}

/// A master entry's slot or backend is missing: the maps disagree with
/// themselves, and the flow is refused.
#[inline(never)]
pub fn missing_backend(frontend_addr: u32, frontend_port: u16) {
    count(Counter::MissingBackend);
    if !due(Counter::MissingBackend) {
        return;
    }
    warn!(
        &NO_CONTEXT,
        "frontend {:i}:{} points at a missing backend slot or backend; new flow refused",
        addr(frontend_addr),
        u16::from_be(frontend_port)
    );
}
