//! The conntrack of translated external flows (`lb4_ct`, and its reply
//! half `lb4_ct_reply`) as the agent sees it: when a flow is over, where
//! its reply entry is, the collector that removes what is over ([`gc`]) and
//! the operator's listing ([`flows`]). The tc programs fill both tables;
//! only the collector deletes from them.

pub mod flows;
pub mod gc;
pub mod tables;

use std::{io, net::SocketAddrV4};

use proxy_common::{Backend, CtEntry, Flow4, ct_flags, ct_state, ct_timeouts, proto};

use crate::maps::codec;

pub use gc::{ConntrackGc, GcInterval, GcReport};
pub use tables::{ConntrackTables, PinnedConntrack};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Now on the clock of `bpf_ktime_get_coarse_ns()`, which stamps
/// [`CtEntry::last_seen`]: CLOCK_MONOTONIC_COARSE, in nanoseconds.
pub fn monotonic_coarse_ns() -> io::Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(now.tv_sec as u64 * NANOS_PER_SECOND + now.tv_nsec as u64)
}

/// How long a flow has been idle. A `last_seen` ahead of `now_ns` (stamped
/// by another CPU after `now_ns` was read) counts as idle for no time.
pub fn idle_ns(entry: &CtEntry, now_ns: u64) -> u64 {
    now_ns.saturating_sub(entry.last_seen)
}

/// Seconds until the flow expires, unless a packet comes first.
pub fn expires_in_seconds(entry: &CtEntry, now_ns: u64) -> u64 {
    (ct_timeouts::of(entry.state) * NANOS_PER_SECOND).saturating_sub(idle_ns(entry, now_ns))
        / NANOS_PER_SECOND
}

/// What the collector does with a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Remove(Removal),
}

/// Why a flow is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Removal {
    /// Idle for at least the timeout of its state.
    IdleTimeout,
    /// A datagram flow whose backend left the set (rule 30): removed so its
    /// next packet is balanced to a live backend. TCP flows keep theirs
    /// until they close (rule 29).
    BackendGone,
}

impl Removal {
    pub const ALL: [Removal; 2] = [Removal::IdleTimeout, Removal::BackendGone];

    pub const fn name(self) -> &'static str {
        match self {
            Removal::IdleTimeout => "idle_timeout",
            Removal::BackendGone => "backend_gone",
        }
    }
}

/// Whether `backend` (what `lb4_backends` holds under the flow's backend
/// id now) still names the backend the flow was sent to. An id can be
/// reused for another address:port once its backend is gone.
pub fn backend_is_current(entry: &CtEntry, backend: Option<&Backend>) -> bool {
    backend.is_some_and(|backend| {
        backend.addr == entry.backend_addr && backend.port == entry.backend_port
    })
}

/// Whether a flow stays, given the time and its backend id's current entry
/// in `lb4_backends`.
pub fn verdict(entry: &CtEntry, now_ns: u64, backend: Option<&Backend>) -> Verdict {
    if idle_ns(entry, now_ns) >= ct_timeouts::of(entry.state) * NANOS_PER_SECOND {
        return Verdict::Remove(Removal::IdleTimeout);
    }
    if entry.state == ct_state::DATAGRAM && !backend_is_current(entry, backend) {
        return Verdict::Remove(Removal::BackendGone);
    }
    Verdict::Keep
}

/// The `lb4_ct_reply` key of a flow: the backend's reply as it arrives,
/// addressed to the node's SNAT address and port, or to the client.
pub fn reply_key(flow: &Flow4, entry: &CtEntry) -> Flow4 {
    let (daddr, dport) = if entry.flags & ct_flags::SNAT != 0 {
        (entry.nat_addr, entry.nat_port)
    } else {
        (flow.saddr, flow.sport)
    };
    Flow4::new(
        entry.backend_addr,
        daddr,
        entry.backend_port,
        dport,
        flow.proto,
    )
}

/// An address and port as maps hold them (network byte order).
pub fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(codec::addr_from_map(addr), codec::port_from_map(port))
}

pub fn state_name(state: u8) -> &'static str {
    match state {
        ct_state::TCP_SYN => "syn",
        ct_state::TCP_ESTABLISHED => "established",
        ct_state::TCP_CLOSING => "closing",
        ct_state::DATAGRAM => "datagram",
        _ => "unknown",
    }
}

pub fn protocol_name(number: u8) -> String {
    match number {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::ICMP => "ICMP".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    pub const SECOND: u64 = NANOS_PER_SECOND;

    pub fn addr(a: u8, b: u8, c: u8, d: u8) -> u32 {
        codec::addr_to_map(Ipv4Addr::new(a, b, c, d))
    }

    pub fn port(port: u16) -> u16 {
        codec::port_to_map(port)
    }

    /// A client's flow to the NodePort 192.168.1.10:30080.
    pub fn client_flow(client_port: u16, protocol: u8) -> Flow4 {
        Flow4::new(
            addr(203, 0, 113, 7),
            addr(192, 168, 1, 10),
            port(client_port),
            port(30080),
            protocol,
        )
    }

    /// A flow to backend 10.244.1.11:8080 (id 11, rev-NAT id 5), last seen
    /// at `last_seen`.
    pub fn entry(state: u8, last_seen: u64) -> CtEntry {
        CtEntry {
            last_seen,
            backend_id: 11,
            rev_nat_id: 5,
            backend_addr: addr(10, 244, 1, 11),
            nat_addr: 0,
            backend_port: port(8080),
            nat_port: 0,
            state,
            flags: 0,
            _pad0: 0,
        }
    }

    pub fn snat(entry: CtEntry, nat_port: u16) -> CtEntry {
        CtEntry {
            nat_addr: addr(192, 168, 1, 10),
            nat_port: port(nat_port),
            flags: ct_flags::SNAT,
            ..entry
        }
    }

    pub fn backend_of(entry: &CtEntry) -> Backend {
        Backend::new(entry.backend_addr, entry.backend_port, proto::UDP, 0)
    }

    #[test]
    fn flows_expire_after_the_timeout_of_their_state() {
        let now = 100_000 * SECOND;
        for (state, timeout) in [
            (ct_state::TCP_SYN, 60),
            (ct_state::TCP_ESTABLISHED, 6 * 3600),
            (ct_state::TCP_CLOSING, 10),
            (ct_state::DATAGRAM, 60),
        ] {
            let fresh = entry(state, now - (timeout * SECOND - 1));
            let backend = backend_of(&fresh);
            assert_eq!(verdict(&fresh, now, Some(&backend)), Verdict::Keep);
            let stale = entry(state, now - timeout * SECOND);
            assert_eq!(
                verdict(&stale, now, Some(&backend)),
                Verdict::Remove(Removal::IdleTimeout),
                "{}",
                state_name(state)
            );
        }
    }

    #[test]
    fn a_last_seen_ahead_of_now_is_not_idle() {
        let flow = entry(ct_state::TCP_CLOSING, 50 * SECOND);
        assert_eq!(idle_ns(&flow, 40 * SECOND), 0);
        assert_eq!(
            verdict(&flow, 40 * SECOND, Some(&backend_of(&flow))),
            Verdict::Keep
        );
        assert_eq!(expires_in_seconds(&flow, 40 * SECOND), 10);
    }

    #[test]
    fn rule_30_datagram_flows_leave_with_their_backend() {
        let now = 1000 * SECOND;
        let flow = entry(ct_state::DATAGRAM, now);
        let same = backend_of(&flow);
        let reused_id = Backend::new(addr(10, 244, 2, 99), flow.backend_port, proto::UDP, 0);
        let other_port = Backend::new(flow.backend_addr, port(9090), proto::UDP, 0);
        assert_eq!(verdict(&flow, now, Some(&same)), Verdict::Keep);
        for current in [None, Some(&reused_id), Some(&other_port)] {
            assert_eq!(
                verdict(&flow, now, current),
                Verdict::Remove(Removal::BackendGone)
            );
        }
    }

    #[test]
    fn rule_29_tcp_flows_keep_a_removed_backend() {
        let now = 1000 * SECOND;
        for state in [
            ct_state::TCP_SYN,
            ct_state::TCP_ESTABLISHED,
            ct_state::TCP_CLOSING,
        ] {
            assert_eq!(verdict(&entry(state, now), now, None), Verdict::Keep);
        }
    }

    #[test]
    fn the_reply_key_is_the_backends_reply_as_it_arrives() {
        let flow = client_flow(40000, proto::TCP);
        let direct = entry(ct_state::TCP_ESTABLISHED, 0);
        assert_eq!(
            reply_key(&flow, &direct),
            Flow4::new(
                addr(10, 244, 1, 11),
                addr(203, 0, 113, 7),
                port(8080),
                port(40000),
                proto::TCP
            )
        );
        assert_eq!(
            reply_key(&flow, &snat(direct, 61_234)),
            Flow4::new(
                addr(10, 244, 1, 11),
                addr(192, 168, 1, 10),
                port(8080),
                port(61_234),
                proto::TCP
            )
        );
    }

    #[test]
    fn expiry_counts_down_in_whole_seconds() {
        let flow = entry(ct_state::DATAGRAM, 100 * SECOND);
        assert_eq!(expires_in_seconds(&flow, 100 * SECOND), 60);
        assert_eq!(expires_in_seconds(&flow, 130 * SECOND + 1), 29);
        assert_eq!(expires_in_seconds(&flow, 500 * SECOND), 0);
    }

    #[test]
    fn monotonic_coarse_clock_moves_forward() {
        let first = monotonic_coarse_ns().unwrap();
        let second = monotonic_coarse_ns().unwrap();
        assert!(first > 0 && second >= first);
    }
}
