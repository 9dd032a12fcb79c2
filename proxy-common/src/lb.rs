//! What a new external flow meets, written once: the tc programs call it
//! over their maps, and `ebpf-proxy explain` over the pinned maps, so the
//! two cannot drift. Small and flat so it inlines into the programs.

use crate::{Backend, Counter, Flow4, ServiceKey, ServiceValue, scope, service_flags};

/// The map reads the decision needs.
pub trait LbMaps {
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue>;
    fn backend(&self, id: u32) -> Option<Backend>;
    /// Whether `addr` lies in a source range of frontend `rev_nat_id`.
    fn source_allowed(&self, rev_nat_id: u32, addr: u32) -> bool;
}

/// The verdict for the first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewFlow {
    /// Its destination is no external frontend: the packet is left alone.
    NotAFrontend,
    /// Dropped, and counted under this reason (rules 15, 18, 28).
    Drop(Counter),
    /// Refused at once: TCP RST or ICMP port unreachable (rule 21).
    Reject(ServiceKey, ServiceValue),
    /// Sent to one of the master's `count` backend slots.
    Balance(ServiceKey, ServiceValue),
}

/// The external master entry of `flow`'s destination and what it says
/// about a new flow from `flow`'s source.
#[inline(always)]
pub fn new_flow<M: LbMaps>(maps: &M, flow: &Flow4) -> NewFlow {
    let key = ServiceKey::new(flow.daddr, flow.dport, flow.proto, scope::EXTERNAL, 0);
    let Some(master) = maps.service(&key) else {
        return NewFlow::NotAFrontend;
    };
    if master.flags & service_flags::SOURCE_RANGES != 0
        && !maps.source_allowed(master.rev_nat_id, flow.saddr)
    {
        return NewFlow::Drop(Counter::DroppedSourceRange);
    }
    if master.count == 0 {
        if master.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            return NewFlow::Drop(Counter::DroppedNoLocalBackend);
        }
        return NewFlow::Reject(key, master);
    }
    NewFlow::Balance(key, master)
}

/// The slot in `1..=count` a 32-bit random number picks, by multiply-shift
/// (no division; no bias worth the name for counts far below 2^32).
#[inline(always)]
pub const fn slot_for(random: u32, count: u16) -> u16 {
    ((random as u64 * count as u64) >> 32) as u16 + 1
}

/// The backend in slot `slot` of a master, with its id.
#[inline(always)]
pub fn slot_backend<M: LbMaps>(
    maps: &M,
    master_key: &ServiceKey,
    slot: u16,
) -> Option<(u32, Backend)> {
    let id = maps.service(&master_key.with_slot(slot))?.backend_id;
    Some((id, maps.backend(id)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn slots_cover_one_to_count() {
        assert_eq!(slot_for(0, 3), 1);
        assert_eq!(slot_for(u32::MAX, 3), 3);
        assert_eq!(slot_for(u32::MAX / 2, 2), 1);
        assert_eq!(slot_for(u32::MAX / 2 + 1, 2), 2);
        assert_eq!(slot_for(u32::MAX, 1), 1);
    }

    struct OneFrontend {
        master: ServiceValue,
        allowed: bool,
    }

    impl LbMaps for OneFrontend {
        fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
            (key.scope == scope::EXTERNAL && key.port == 80).then_some(self.master)
        }
        fn backend(&self, _id: u32) -> Option<Backend> {
            None
        }
        fn source_allowed(&self, _rev_nat_id: u32, _addr: u32) -> bool {
            self.allowed
        }
    }

    fn master(count: u16, flags: u8) -> ServiceValue {
        ServiceValue {
            count,
            flags,
            rev_nat_id: 7,
            ..ServiceValue::slot(0)
        }
    }

    #[test]
    fn decisions_follow_the_master_entry() {
        let flow = Flow4::new(1, 2, 1000, 80, proto::TCP);
        let other_port = Flow4::new(1, 2, 1000, 81, proto::TCP);
        let maps = |count, flags, allowed| OneFrontend {
            master: master(count, flags),
            allowed,
        };
        assert_eq!(
            new_flow(&maps(1, 0, true), &other_port),
            NewFlow::NotAFrontend
        );
        assert!(matches!(
            new_flow(&maps(1, 0, true), &flow),
            NewFlow::Balance(..)
        ));
        assert!(matches!(
            new_flow(&maps(0, 0, true), &flow),
            NewFlow::Reject(..)
        ));
        assert_eq!(
            new_flow(&maps(0, service_flags::DROP_WHEN_EMPTY, true), &flow),
            NewFlow::Drop(Counter::DroppedNoLocalBackend)
        );
        assert_eq!(
            new_flow(&maps(1, service_flags::SOURCE_RANGES, false), &flow),
            NewFlow::Drop(Counter::DroppedSourceRange)
        );
        assert!(matches!(
            new_flow(&maps(1, service_flags::SOURCE_RANGES, true), &flow),
            NewFlow::Balance(..)
        ));
    }
}
