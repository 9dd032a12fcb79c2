//! Socket-level load balancing (cgroup v2 sock_addr hooks): the destination
//! of `connect()` and unconnected `sendmsg()` is rewritten from a frontend to
//! a backend once, so there is no per-packet NAT and no conntrack; the
//! reverse is shown to the application by `recvmsg()` and `getpeername()`.
//!
//! IPv6 sockets reach IPv4 Services through IPv4-mapped addresses
//! (`::ffff:a.b.c.d`): the `*6` hooks translate those alone, with the same
//! maps and selection, and leave every real IPv6 address untouched. An
//! unconnected send to a mapped address needs no hook of its own: the
//! kernel hands it to the IPv4 path, which runs `sendmsg4`.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    Backend, Counter, ServiceKey, SockRevNatKey, SockRevNatValue, proto, scope, service_flags,
};

use crate::{
    events,
    maps::{BACKENDS, SERVICES, SOCK_REV_NAT, count},
    select,
};

/// sock_addr verdicts.
const REJECT: i32 = 0;
const PROCEED: i32 = 1;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[cgroup_sock_addr(connect4)]
pub fn lb4_connect(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx, Family::Ipv4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb4_sendmsg(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx, Family::Ipv4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb4_recvmsg(ctx: SockAddrContext) -> i32 {
    translate_to_frontend(&ctx, Family::Ipv4);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb4_getpeername(ctx: SockAddrContext) -> i32 {
    translate_to_frontend(&ctx, Family::Ipv4);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn lb4_connect6(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx, Family::Ipv4Mapped)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb4_recvmsg6(ctx: SockAddrContext) -> i32 {
    translate_to_frontend(&ctx, Family::Ipv4Mapped);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb4_getpeername6(ctx: SockAddrContext) -> i32 {
    translate_to_frontend(&ctx, Family::Ipv4Mapped);
    PROCEED
}

/// Where a hook finds the IPv4 address it translates.
#[derive(Clone, Copy)]
enum Family {
    /// `user_ip4` of an IPv4 socket.
    Ipv4,
    /// The last word of an IPv4-mapped `user_ip6` of an IPv6 socket.
    Ipv4Mapped,
}

/// `::ffff:0:0/96`: the first three words of `user_ip6`, network order.
const MAPPED_PREFIX: [u32; 3] = [0, 0, 0xffff_u32.to_be()];

impl Family {
    /// The IPv4 address the socket addresses, or `None` when it is a real
    /// IPv6 address. Each word is read on its own: the kernel allows only
    /// 4-byte accesses to `user_ip6`.
    #[inline(always)]
    fn ipv4(self, sa: *mut bpf_sock_addr) -> Option<u32> {
        match self {
            Family::Ipv4 => Some(unsafe { (*sa).user_ip4 }),
            Family::Ipv4Mapped => {
                let words = unsafe {
                    [
                        read_volatile(&(*sa).user_ip6[0]),
                        read_volatile(&(*sa).user_ip6[1]),
                        read_volatile(&(*sa).user_ip6[2]),
                    ]
                };
                (words == MAPPED_PREFIX).then(|| unsafe { read_volatile(&(*sa).user_ip6[3]) })
            }
        }
    }

    /// Rewrites the IPv4 address; a mapped address keeps its prefix.
    #[inline(always)]
    fn set_ipv4(self, sa: *mut bpf_sock_addr, addr: u32) {
        match self {
            Family::Ipv4 => unsafe { (*sa).user_ip4 = addr },
            Family::Ipv4Mapped => unsafe { write_volatile(&mut (*sa).user_ip6[3], addr) },
        }
    }
}

/// Frontend -> backend. Sockets to anything that is not a frontend pass
/// untouched.
#[inline(always)]
fn translate_to_backend(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = ctx.sock_addr;
    let protocol = unsafe { (*sa).protocol };
    if protocol != proto::TCP as u32 && protocol != proto::UDP as u32 {
        return PROCEED;
    }
    let Some(frontend_addr) = family.ipv4(sa) else {
        return PROCEED;
    };
    let frontend_port = unsafe { (*sa).user_port } as u16;
    let master_key = ServiceKey::new(
        frontend_addr,
        frontend_port,
        protocol as u8,
        scope::INTERNAL,
        0,
    );
    let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut choice = choose(client, &master_key);
    // The reconciler shrinks a frontend by writing its master before it
    // deletes the slots (and backends) beyond the new count, so a connect
    // that read the old master may find its slot gone: the master read
    // again has the new count.
    if let Choice::Missing = choice {
        count(Counter::MasterReread);
        choice = choose(client, &master_key);
    }
    let backend = match choice {
        Choice::Backend(backend) => backend,
        Choice::NotFrontend => return reject_undefined_port(frontend_addr, protocol as u8),
        Choice::Empty { drop } => {
            let retval = if drop {
                count(Counter::DroppedNoLocalBackend);
                -EHOSTUNREACH
            } else {
                // Rule 21: no usable endpoint refuses at once, not a timeout.
                count(Counter::RejectedNoBackend);
                -ECONNREFUSED
            };
            unsafe { bpf_set_retval(retval) };
            return REJECT;
        }
        Choice::Missing => return refuse_inconsistent(frontend_addr, frontend_port),
    };

    let rev_key = SockRevNatKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: backend.addr,
        port: backend.port,
        _pad0: 0,
    };
    let rev_value = SockRevNatValue {
        addr: frontend_addr,
        port: frontend_port,
        _pad0: 0,
    };
    if SOCK_REV_NAT.insert(rev_key, rev_value, 0).is_err() {
        count(Counter::RevNatStoreFailed);
    }
    family.set_ipv4(sa, backend.addr);
    unsafe { (*sa).user_port = backend.port as u32 };
    count(Counter::Translated);
    PROCEED
}

/// What a frontend's master gives a new flow.
enum Choice {
    /// No master: not a frontend (or an undefined port of a ClusterIP).
    NotFrontend,
    /// No backend for new flows; `drop` when the service has endpoints
    /// this frontend may not use ([`service_flags::DROP_WHEN_EMPTY`]).
    Empty {
        drop: bool,
    },
    Backend(Backend),
    /// The chosen slot or its backend is missing.
    Missing,
}

#[inline(always)]
fn choose(client: u64, master_key: &ServiceKey) -> Choice {
    let Some(master) = SERVICES.get_ptr(master_key) else {
        return Choice::NotFrontend;
    };
    let master = unsafe { *master };
    if master.count == 0 {
        return Choice::Empty {
            drop: master.flags & service_flags::DROP_WHEN_EMPTY != 0,
        };
    }
    let Some(backend_id) = select::backend_for(client, master_key, &master, select::Pick::Random)
    else {
        return Choice::Missing;
    };
    match BACKENDS.get_ptr(backend_id) {
        Some(backend) => Choice::Backend(unsafe { *backend }),
        None => Choice::Missing,
    }
}

/// Rule 9: a ClusterIP's port 0 entry (count 0) stands for every port the
/// Service does not define; those connections are refused. Any other
/// address passes untouched.
#[inline(always)]
fn reject_undefined_port(addr: u32, protocol: u8) -> i32 {
    if SERVICES
        .get_ptr(ServiceKey::new(addr, 0, protocol, scope::INTERNAL, 0))
        .is_none()
    {
        return PROCEED;
    }
    count(Counter::RejectedNoBackend);
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// The maps disagree with themselves (a slot or backend is missing): refuse
/// and count it rather than let the socket reach the frontend address.
#[inline(always)]
fn refuse_inconsistent(frontend_addr: u32, frontend_port: u16) -> i32 {
    events::missing_backend(frontend_addr, frontend_port);
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// Backend -> frontend, for sockets this program translated.
#[inline(always)]
fn translate_to_frontend(ctx: &SockAddrContext, family: Family) {
    let sa = ctx.sock_addr;
    let Some(backend_addr) = family.ipv4(sa) else {
        return;
    };
    let key = SockRevNatKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: backend_addr,
        port: unsafe { (*sa).user_port } as u16,
        _pad0: 0,
    };
    if let Some(frontend) = SOCK_REV_NAT.get_ptr(key) {
        let frontend = unsafe { *frontend };
        family.set_ipv4(sa, frontend.addr);
        unsafe { (*sa).user_port = frontend.port as u32 };
        count(Counter::RevNatApplied);
    }
}
