//! Model types <-> map types. Maps hold addresses and ports in network byte
//! order (as the socket hooks read them), so every conversion goes through
//! here and nowhere else.

use std::net::Ipv4Addr;

use aya::maps::lpm_trie::Key;
use ipnet::Ipv4Net;
use proxy_common::{
    Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, SourceRange, backend_flags, proto, scope,
};

use crate::model::{BackendAddr, Frontend, Protocol};

pub fn proto_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
    }
}

pub fn protocol(number: u8) -> Option<Protocol> {
    match number {
        proto::TCP => Some(Protocol::Tcp),
        proto::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

/// An address as the kernel stores `user_ip4`: the octets in memory order.
pub fn addr_to_map(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_map(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

pub fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

pub fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

/// Slot `slot` of `frontend`'s master in `scope` ([`scope::INTERNAL`] or
/// [`scope::EXTERNAL`]).
pub fn service_key(frontend: &Frontend, scope: u8, slot: u16) -> ServiceKey {
    ServiceKey::new(
        addr_to_map(frontend.addr),
        port_to_map(frontend.port),
        proto_number(frontend.protocol),
        scope,
        slot,
    )
}

/// Rule 9: the master entry that makes the datapath refuse the ports an
/// allocated ClusterIP does not define. Port 0 is never a real frontend.
pub fn cluster_ip_wildcard(addr: Ipv4Addr, protocol: Protocol) -> ServiceKey {
    let frontend = Frontend {
        addr,
        port: 0,
        protocol,
    };
    service_key(&frontend, scope::INTERNAL, 0)
}

pub fn is_cluster_ip_wildcard(key: &ServiceKey) -> bool {
    key.port == 0
}

/// The frontend of a services key; `None` for a protocol this build does
/// not know (a map written by a newer agent).
pub fn frontend(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: addr_from_map(key.addr),
        port: port_from_map(key.port),
        protocol: protocol(key.proto)?,
    })
}

/// `local`: the endpoint runs on this node (rule 6), so external flows to
/// it are not source-NATed (rule 17).
pub fn backend(backend: &BackendAddr, local: bool) -> Backend {
    let flags = if local { backend_flags::LOCAL } else { 0 };
    Backend::new(
        addr_to_map(backend.addr),
        port_to_map(backend.port),
        proto_number(backend.protocol),
        flags,
    )
}

pub fn is_local(backend: &Backend) -> bool {
    backend.flags & backend_flags::LOCAL != 0
}

pub fn backend_addr(backend: &Backend) -> Option<BackendAddr> {
    Some(BackendAddr {
        addr: addr_from_map(backend.addr),
        port: port_from_map(backend.port),
        protocol: protocol(backend.proto)?,
    })
}

/// The address replies of `frontend`'s flows must come from.
pub fn rev_nat(frontend: &Frontend) -> RevNat {
    RevNat {
        addr: addr_to_map(frontend.addr),
        port: port_to_map(frontend.port),
        _pad0: 0,
    }
}

/// The key of the Maglev table an external master's new flows use.
pub fn maglev_key(master: &ServiceValue) -> MaglevKey {
    MaglevKey {
        svc_id: master.svc_id,
        selection: u32::from(master.selection),
    }
}

/// A Maglev table as the datapath reads it: its size M, then the ids of
/// the backends in slots `1..=M`.
pub fn maglev_table(backend_ids: &[u32]) -> Vec<u32> {
    let size = u32::try_from(backend_ids.len()).unwrap_or(u32::MAX);
    std::iter::once(size)
        .chain(backend_ids.iter().copied())
        .collect()
}

/// An entry of `lb4_src_ranges`: new external flows to the frontend with
/// rev-NAT id `rev_nat_id` may come from `cidr` (rule 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRangeEntry {
    pub rev_nat_id: u32,
    pub cidr: Ipv4Net,
}

impl SourceRangeEntry {
    /// Host bits are cleared: the trie holds one key per range.
    pub fn new(rev_nat_id: u32, cidr: Ipv4Net) -> Self {
        Self {
            rev_nat_id,
            cidr: cidr.trunc(),
        }
    }
}

pub fn source_range_key(entry: &SourceRangeEntry) -> Key<SourceRange> {
    Key::new(
        SourceRange::prefix_len(entry.cidr.prefix_len()),
        SourceRange::new(entry.rev_nat_id, addr_to_map(entry.cidr.network())),
    )
}

/// `None` for a key no agent writes (a prefix shorter than the rev-NAT id
/// or longer than an address).
pub fn source_range_entry(key: &Key<SourceRange>) -> Option<SourceRangeEntry> {
    let cidr_len = key.prefix_len().checked_sub(SourceRange::prefix_len(0))?;
    let range = key.data();
    let cidr = Ipv4Net::new(addr_from_map(range.addr), u8::try_from(cidr_len).ok()?).ok()?;
    Some(SourceRangeEntry::new(u32::from_be(range.rev_nat_id), cidr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_network_byte_order_like_the_kernel() {
        let frontend = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let key = service_key(&frontend, scope::EXTERNAL, 0);
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.proto, 6);
        assert_eq!(key.scope, scope::EXTERNAL);
        assert_eq!(super::frontend(&key), Some(frontend));
        let rev_nat = rev_nat(&frontend);
        assert_eq!(rev_nat.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(rev_nat.port.to_ne_bytes(), [0, 80]);
    }

    #[test]
    fn backends_round_trip() {
        let addr = BackendAddr {
            addr: Ipv4Addr::new(10, 244, 1, 11),
            port: 8443,
            protocol: Protocol::Udp,
        };
        let value = backend(&addr, false);
        assert_eq!(value.proto, 17);
        assert!(!is_local(&value));
        assert_eq!(backend_addr(&value), Some(addr));
    }

    #[test]
    fn rule_06_17_local_backends_carry_the_local_flag() {
        let addr = BackendAddr {
            addr: Ipv4Addr::new(10, 244, 1, 11),
            port: 8080,
            protocol: Protocol::Tcp,
        };
        let local = backend(&addr, true);
        assert_eq!(local.flags, backend_flags::LOCAL);
        assert!(is_local(&local));
        assert_eq!(backend_addr(&local), Some(addr));
        assert_ne!(local, backend(&addr, false), "a different map value");
    }

    #[test]
    fn rule_15_source_range_keys_lead_with_the_rev_nat_id() {
        let entry = SourceRangeEntry::new(0x0102_0304, "203.0.113.7/24".parse().unwrap());
        assert_eq!(
            entry.cidr,
            "203.0.113.0/24".parse().unwrap(),
            "host bits cleared"
        );
        let key = source_range_key(&entry);
        assert_eq!(key.prefix_len(), 32 + 24);
        let bytes: [u8; 12] = bytemuck::cast(key_words(&key));
        assert_eq!(
            bytes,
            [56, 0, 0, 0, 1, 2, 3, 4, 203, 0, 113, 0],
            "prefix length (host order), then id and address as the trie compares them"
        );
        assert_eq!(source_range_entry(&key), Some(entry));

        let everyone = SourceRangeEntry::new(9, "0.0.0.0/0".parse().unwrap());
        assert_eq!(source_range_key(&everyone).prefix_len(), 32);
        assert_eq!(
            source_range_entry(&source_range_key(&everyone)),
            Some(everyone)
        );
    }

    #[test]
    fn rule_15_foreign_source_range_keys_are_not_decoded() {
        let short = Key::new(16, SourceRange::new(1, 0));
        let long = Key::new(65, SourceRange::new(1, 0));
        assert_eq!(source_range_entry(&short), None);
        assert_eq!(source_range_entry(&long), None);
    }

    fn key_words(key: &Key<SourceRange>) -> [u32; 3] {
        let data = key.data();
        [key.prefix_len(), data.rev_nat_id, data.addr]
    }

    #[test]
    fn rule_09_cluster_ip_wildcard_is_port_zero_master() {
        let key = cluster_ip_wildcard(Ipv4Addr::new(10, 96, 0, 10), Protocol::Udp);
        assert_eq!(
            key,
            ServiceKey::new(addr_to_map(Ipv4Addr::new(10, 96, 0, 10)), 0, 17, 0, 0)
        );
        assert!(is_cluster_ip_wildcard(&key));
        let real = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: Protocol::Udp,
        };
        assert!(!is_cluster_ip_wildcard(&service_key(
            &real,
            scope::INTERNAL,
            0
        )));
    }

    #[test]
    fn unknown_protocol_is_not_decoded() {
        let key = ServiceKey::new(0, 0, 132, 0, 0);
        assert_eq!(frontend(&key), None);
    }
}
