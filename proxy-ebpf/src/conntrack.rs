//! Conntrack of translated external flows: what a flow's packets are
//! rewritten to after its first one, so established flows keep their
//! backend (rule 29) and skip reject, drop and source-range checks
//! (rule 22). The agent expires idle entries (timeouts by state).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use proxy_common::{CtEntry, Flow4, ct_state, ct_timeouts, proto};

use crate::{
    maps::{BACKENDS, CONNTRACK, CT_REPLY, REV_NAT},
    parse::tcp_flags,
};

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// How long a closed TCP flow keeps its SNAT tuple for stragglers (the
/// last ACK, a retransmitted FIN: within a round trip) before a new flow
/// may take it. At 2,000 new flows a second to one backend a grace of one
/// second kept over half of the 4,536 ports out of reach.
const CLOSED_GRACE_NS: u64 = NANOS_PER_SEC / 10;

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The state a flow starts in, from its first packet.
#[inline(always)]
pub fn initial_state(protocol: u8, flags: u8) -> u8 {
    if protocol != proto::TCP {
        ct_state::DATAGRAM
    } else if flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
        ct_state::TCP_CLOSING
    } else if flags & tcp_flags::SYN != 0 {
        ct_state::TCP_SYN
    } else {
        // Picked up mid-flow (e.g. its entry was evicted): it was established.
        ct_state::TCP_ESTABLISHED
    }
}

/// The state after a packet with TCP `flags`, either direction.
#[inline(always)]
fn next_state(state: u8, flags: u8, from_client: bool) -> u8 {
    if state == ct_state::DATAGRAM {
        return state;
    }
    if flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
        ct_state::TCP_CLOSING
    } else if state == ct_state::TCP_SYN
        && from_client
        && flags & tcp_flags::ACK != 0
        && flags & tcp_flags::SYN == 0
    {
        ct_state::TCP_ESTABLISHED
    } else {
        state
    }
}

/// The tracked flow of a client's packet. A TCP flow keeps its backend
/// until it closes, also after the backend left the Service (rule 29); a
/// SYN on a closing flow starts a new flow (port reuse). A datagram flow
/// whose backend is gone starts over on a live one (rule 30).
#[inline(always)]
pub fn established(flow: &Flow4, flags: u8) -> Option<CtEntry> {
    let entry_ptr = CONNTRACK.get_ptr_mut(flow)?;
    let entry = unsafe { *entry_ptr };
    if entry.state == ct_state::TCP_CLOSING && flags & tcp_flags::SYN != 0 {
        return None;
    }
    if entry.state == ct_state::DATAGRAM && !backend_current(&entry) {
        return None;
    }
    // Racing writers on other CPUs only blur the timestamp.
    unsafe {
        (*entry_ptr).last_seen = now();
        (*entry_ptr).state = next_state(entry.state, flags, true);
    }
    Some(entry)
}

/// Whether the flow's backend is still in the backend table as chosen.
#[inline(always)]
fn backend_current(entry: &CtEntry) -> bool {
    match BACKENDS.get_ptr(entry.backend_id) {
        Some(backend) => {
            let backend = unsafe { *backend };
            backend.addr == entry.backend_addr && backend.port == entry.backend_port
        }
        None => false,
    }
}

/// Whether the flow that holds reply tuple `reply_key` (an SNAT source
/// port towards a backend) is over, so a new flow may take the tuple
/// before the agent's collector gets to it: its conntrack entry is gone or
/// has moved to another tuple, it closed more than a moment ago, or it
/// idled past its timeout. Such a flow's conntrack entry is removed here,
/// so a late packet of it cannot enter the new flow.
#[inline(always)]
pub fn holder_over(reply_key: &Flow4) -> bool {
    let Some(held) = CT_REPLY.get_ptr(reply_key) else {
        return true;
    };
    let held = unsafe { *held };
    let Some(frontend) = REV_NAT.get_ptr(held.rev_nat_id) else {
        return true;
    };
    let frontend = unsafe { *frontend };
    let original = Flow4::new(
        held.client_addr,
        frontend.addr,
        held.client_port,
        frontend.port,
        reply_key.proto,
    );
    let Some(entry) = CONNTRACK.get_ptr(original) else {
        return true;
    };
    let entry = unsafe { *entry };
    if entry.nat_addr != reply_key.daddr || entry.nat_port != reply_key.dport {
        return true;
    }
    let idle = now().saturating_sub(entry.last_seen);
    let over = (entry.state == ct_state::TCP_CLOSING && idle > CLOSED_GRACE_NS)
        || idle > ct_timeouts::of(entry.state) * NANOS_PER_SEC;
    if over {
        let _ = CONNTRACK.remove(original);
    }
    over
}

/// Marks a reply of the flow `original` (client -> frontend) as seen.
#[inline(always)]
pub fn touch_from_backend(original: &Flow4, flags: u8) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(original) {
        unsafe {
            (*entry).last_seen = now();
            (*entry).state = next_state((*entry).state, flags, false);
        }
    }
}
