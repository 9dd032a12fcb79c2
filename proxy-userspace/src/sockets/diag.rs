//! sock_diag (NETLINK_SOCK_DIAG) in the calling thread's network
//! namespace: dump the sockets of one protocol, IPv4 ones and IPv6 ones
//! (an IPv6 socket reaches an IPv4 Service through an IPv4-mapped
//! address), then SOCK_DESTROY those whose peer is a removed backend. The kernel aborts such a socket
//! with ECONNABORTED (a TCP one also sends a reset), so the application
//! sees an error and connects again, through the translation, to a live
//! backend.

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use bytemuck::{Pod, Zeroable};

use crate::model::Protocol;

/// `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `TCP_ESTABLISHED`, also the state of a connected UDP socket.
const ESTABLISHED: u32 = 1;
const SYN_SENT: u32 = 2;
const CLOSE_WAIT: u32 = 8;
/// `::ffff:0:0/96`: the first three words of an IPv4-mapped address.
const MAPPED_PREFIX: [u32; 3] = [0, 0, 0xffff_u32.to_be()];
/// The families dumped: IPv6 for sockets with IPv4-mapped peers.
const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];
/// Room for one batch of a dump (the kernel fills up to a page at a time).
const RECV_BUFFER: usize = 64 * 1024;

#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Request {
    header: NlMsgHdr,
    body: ReqV2,
}

/// A connected socket as the dump shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connected {
    pub peer: SocketAddrV4,
    /// The socket cookie (`bpf_get_socket_cookie` gives the same).
    pub cookie: u64,
}

/// Destroys this namespace's `protocol` sockets connected to one of
/// `peers` that `stale` accepts; how many it destroyed. A socket that
/// closed meanwhile is not counted.
pub fn destroy_connected_to(
    protocol: Protocol,
    peers: &BTreeSet<SocketAddrV4>,
    stale: &dyn Fn(&Connected) -> bool,
) -> io::Result<u64> {
    let socket = DiagSocket::open()?;
    let states = match protocol {
        Protocol::Udp => 1 << ESTABLISHED,
        // Listening and closing sockets have no flow left to move.
        Protocol::Tcp => (1 << ESTABLISHED) | (1 << SYN_SENT) | (1 << CLOSE_WAIT),
    };
    let mut found = Vec::new();
    for family in FAMILIES {
        let sockets = socket.dump(family, protocol_number(protocol), states)?;
        found.extend(
            sockets
                .into_iter()
                .filter(|id| {
                    connected(family, id)
                        .is_some_and(|socket| peers.contains(&socket.peer) && stale(&socket))
                })
                .map(|id| (family, id)),
        );
    }
    let mut destroyed = 0;
    for (family, id) in found {
        match socket.destroy(family, protocol_number(protocol), id) {
            Ok(()) => destroyed += 1,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Err(io::Error::other(
                    "the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off)",
                ));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(destroyed)
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

/// The socket's IPv4 peer; `None` for an IPv6 peer that is not IPv4-mapped.
fn connected(family: u8, id: &SockId) -> Option<Connected> {
    let addr = if family == libc::AF_INET6 as u8 {
        (id.dst[..3] == MAPPED_PREFIX).then_some(id.dst[3])?
    } else {
        id.dst[0]
    };
    Some(Connected {
        peer: SocketAddrV4::new(Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(id.dport)),
        cookie: u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32),
    })
}

struct DiagSocket {
    fd: OwnedFd,
}

impl DiagSocket {
    fn open() -> io::Result<DiagSocket> {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DiagSocket { fd })
    }

    fn send(&self, kind: u16, flags: i32, body: ReqV2) -> io::Result<()> {
        let request = Request {
            header: NlMsgHdr {
                len: size_of::<Request>() as u32,
                kind,
                flags: (libc::NLM_F_REQUEST | flags) as u16,
                ..NlMsgHdr::default()
            },
            body,
        };
        let bytes = bytemuck::bytes_of(&request);
        // SAFETY: `bytes` is valid for its length; the kernel is the peer
        // of an unbound netlink socket.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buffer` is valid for writes of its length.
        let received = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(received as usize)
    }

    /// Every `family` socket of `protocol` in one of `states` (a bit mask).
    fn dump(&self, family: u8, protocol: u8, states: u32) -> io::Result<Vec<SockId>> {
        self.send(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_DUMP,
            ReqV2 {
                family,
                protocol,
                states,
                ..ReqV2::default()
            },
        )?;
        let mut sockets = Vec::new();
        let mut buffer = vec![0u8; RECV_BUFFER];
        loop {
            let len = self.recv(&mut buffer)?;
            for message in messages(&buffer[..len]) {
                match message? {
                    Message::Done => return Ok(sockets),
                    Message::Error(0) => {}
                    Message::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    Message::Socket(msg) => sockets.push(msg.id),
                }
            }
        }
    }

    /// SOCK_DESTROY of the one socket `id` names (addresses, ports,
    /// interface and cookie, as the dump gave them).
    fn destroy(&self, family: u8, protocol: u8, id: SockId) -> io::Result<()> {
        self.send(
            SOCK_DESTROY,
            libc::NLM_F_ACK,
            ReqV2 {
                family,
                protocol,
                states: u32::MAX,
                id,
                ..ReqV2::default()
            },
        )?;
        let mut buffer = vec![0u8; 4096];
        loop {
            let len = self.recv(&mut buffer)?;
            for message in messages(&buffer[..len]) {
                match message? {
                    Message::Error(0) => return Ok(()),
                    Message::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    Message::Done | Message::Socket(_) => {}
                }
            }
        }
    }
}

enum Message {
    Done,
    /// NLMSG_ERROR: 0 is an acknowledgement.
    Error(i32),
    Socket(DiagMsg),
}

/// The netlink messages in one datagram.
fn messages(mut data: &[u8]) -> impl Iterator<Item = io::Result<Message>> + '_ {
    std::iter::from_fn(move || {
        let header_len = size_of::<NlMsgHdr>();
        if data.len() < header_len {
            return None;
        }
        let header: NlMsgHdr = bytemuck::pod_read_unaligned(&data[..header_len]);
        let len = header.len as usize;
        if len < header_len || len > data.len() {
            data = &[];
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            )));
        }
        let payload = &data[header_len..len];
        // Messages are 4-byte aligned.
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some(Ok(match i32::from(header.kind) {
            libc::NLMSG_DONE => Message::Done,
            libc::NLMSG_ERROR => {
                let errno = payload
                    .get(..4)
                    .map(|bytes| -i32::from_ne_bytes(bytes.try_into().unwrap_or_default()));
                Message::Error(errno.unwrap_or(libc::EINVAL))
            }
            _ => match payload.get(..size_of::<DiagMsg>()) {
                Some(bytes) => Message::Socket(bytemuck::pod_read_unaligned(bytes)),
                None => {
                    return Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short inet_diag_msg",
                    )));
                }
            },
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<NlMsgHdr>(), 16);
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<ReqV2>(), 56);
        assert_eq!(size_of::<DiagMsg>(), 72);
    }

    fn word(addr: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(addr.octets())
    }

    #[test]
    fn connected_reads_network_byte_order_and_the_split_cookie() {
        let backend = Ipv4Addr::new(10, 244, 1, 11);
        let id = SockId {
            dport: 5353u16.to_be(),
            dst: [word(backend), 0, 0, 0],
            cookie: [0x8765_4321, 0x1],
            ..SockId::default()
        };
        assert_eq!(
            connected(libc::AF_INET as u8, &id),
            Some(Connected {
                peer: "10.244.1.11:5353".parse().unwrap(),
                cookie: 0x1_8765_4321,
            })
        );
    }

    #[test]
    fn ipv6_sockets_count_only_with_an_ipv4_mapped_peer() {
        let backend = Ipv4Addr::new(10, 244, 1, 11);
        let mapped = SockId {
            dport: 5353u16.to_be(),
            dst: [0, 0, 0xffff_u32.to_be(), word(backend)],
            ..SockId::default()
        };
        let peer = connected(libc::AF_INET6 as u8, &mapped).map(|socket| socket.peer);
        assert_eq!(peer, Some("10.244.1.11:5353".parse().unwrap()));
        let v6 = SockId {
            dst: [0x20010db8_u32.to_be(), 0, 0, word(backend)],
            ..mapped
        };
        assert_eq!(connected(libc::AF_INET6 as u8, &v6), None);
    }

    #[test]
    fn messages_split_a_datagram_and_read_errors() {
        let mut data = Vec::new();
        let socket = DiagMsg {
            id: SockId {
                dport: 80u16.to_be(),
                ..SockId::default()
            },
            ..DiagMsg::default()
        };
        let header = |kind: i32, payload: usize| NlMsgHdr {
            len: (size_of::<NlMsgHdr>() + payload) as u32,
            kind: kind as u16,
            ..NlMsgHdr::default()
        };
        data.extend_from_slice(bytemuck::bytes_of(&header(
            SOCK_DIAG_BY_FAMILY.into(),
            size_of::<DiagMsg>(),
        )));
        data.extend_from_slice(bytemuck::bytes_of(&socket));
        data.extend_from_slice(bytemuck::bytes_of(&header(libc::NLMSG_ERROR, 4)));
        data.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        data.extend_from_slice(bytemuck::bytes_of(&header(libc::NLMSG_DONE, 0)));
        let parsed: Vec<Message> = messages(&data).collect::<io::Result<_>>().unwrap();
        assert!(matches!(&parsed[0], Message::Socket(msg) if u16::from_be(msg.id.dport) == 80));
        assert!(matches!(parsed[1], Message::Error(libc::EPERM)));
        assert!(matches!(parsed[2], Message::Done));
        assert_eq!(parsed.len(), 3);
    }
}
