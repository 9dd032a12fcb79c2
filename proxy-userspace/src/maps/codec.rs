//! Model types <-> map types. Maps hold addresses and ports in network byte
//! order (as the socket hooks read them), so every conversion goes through
//! here and nowhere else.

use std::net::Ipv4Addr;

use proxy_common::{Backend, ServiceKey, proto, scope};

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

pub fn service_key(frontend: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(
        addr_to_map(frontend.addr),
        port_to_map(frontend.port),
        proto_number(frontend.protocol),
        scope::INTERNAL,
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
    service_key(&frontend, 0)
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

pub fn backend(backend: &BackendAddr) -> Backend {
    Backend::new(
        addr_to_map(backend.addr),
        port_to_map(backend.port),
        proto_number(backend.protocol),
        0,
    )
}

pub fn backend_addr(backend: &Backend) -> Option<BackendAddr> {
    Some(BackendAddr {
        addr: addr_from_map(backend.addr),
        port: port_from_map(backend.port),
        protocol: protocol(backend.proto)?,
    })
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
        let key = service_key(&frontend, 0);
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.proto, 6);
        assert_eq!(super::frontend(&key), Some(frontend));
    }

    #[test]
    fn backends_round_trip() {
        let addr = BackendAddr {
            addr: Ipv4Addr::new(10, 244, 1, 11),
            port: 8443,
            protocol: Protocol::Udp,
        };
        let value = backend(&addr);
        assert_eq!(value.proto, 17);
        assert_eq!(backend_addr(&value), Some(addr));
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
        assert!(!is_cluster_ip_wildcard(&service_key(&real, 0)));
    }

    #[test]
    fn unknown_protocol_is_not_decoded() {
        let key = ServiceKey::new(0, 0, 132, 0, 0);
        assert_eq!(frontend(&key), None);
    }
}
