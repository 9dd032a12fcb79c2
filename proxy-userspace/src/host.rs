//! Facts about the host the agent runs on (in its network namespace).

use std::net::Ipv4Addr;

use anyhow::Result;

pub mod addresses;
pub mod kernel;

/// The kernel's host name, lowercased as Kubernetes node names are.
pub fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_lowercase())
}

/// Every IPv4 address on an interface of this network namespace: the
/// candidates for NodePort frontends (rule 11).
pub fn interface_addresses() -> Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut addresses = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        if !entry.ifa_addr.is_null()
            && i32::from(unsafe { (*entry.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
            addresses.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// The index of network device `name` in this network namespace (sysfs
/// would show the namespace that mounted it, not ours).
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DriverInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Whether network device `name` (in this namespace) is backed by hardware:
/// its driver reports a bus (PCI, virtio, ...). Virtual devices (veth,
/// bridge, bond, VLAN) report none.
pub fn has_hardware(name: &str) -> bool {
    let mut info = DriverInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut DriverInfo).cast();
    // SAFETY: a datagram socket for the ioctl, closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if socket < 0 {
        return false;
    }
    // SAFETY: SIOCETHTOOL with a valid ifreq pointing at a drvinfo buffer.
    let ok = unsafe { libc::ioctl(socket, SIOCETHTOOL, &mut request) } == 0;
    // SAFETY: our own descriptor.
    unsafe { libc::close(socket) };
    ok && info.bus_info[0] != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_exists_and_is_virtual() {
        assert_eq!(interface_index("lo"), Some(1));
        assert!(!has_hardware("lo"));
        assert_eq!(interface_index("no-such-device"), None);
    }

    #[test]
    fn loopback_is_among_the_interface_addresses() {
        assert!(
            interface_addresses()
                .unwrap()
                .contains(&Ipv4Addr::LOCALHOST)
        );
    }
}
