//! Socket-level load balancing (cgroup v2 sock_addr hooks): the destination
//! of `connect()` and unconnected `sendmsg()` is rewritten from a frontend to
//! a backend once, so there is no per-packet NAT and no conntrack; the
//! reverse is shown to the application by `recvmsg()` and `getpeername()`.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    Counter, ServiceKey, SockRevNatKey, SockRevNatValue, proto, scope, service_flags,
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
    translate_to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb4_sendmsg(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb4_recvmsg(ctx: SockAddrContext) -> i32 {
    translate_to_frontend(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb4_getpeername(ctx: SockAddrContext) -> i32 {
    translate_to_frontend(&ctx);
    PROCEED
}

/// Frontend -> backend. Sockets to anything that is not a frontend pass
/// untouched.
#[inline(always)]
fn translate_to_backend(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let protocol = unsafe { (*sa).protocol };
    if protocol != proto::TCP as u32 && protocol != proto::UDP as u32 {
        return PROCEED;
    }
    let frontend_addr = unsafe { (*sa).user_ip4 };
    let frontend_port = unsafe { (*sa).user_port } as u16;
    let master_key = ServiceKey::new(
        frontend_addr,
        frontend_port,
        protocol as u8,
        scope::INTERNAL,
        0,
    );
    let Some(master) = SERVICES.get_ptr(master_key) else {
        return reject_undefined_port(frontend_addr, protocol as u8);
    };
    let master = unsafe { *master };
    if master.count == 0 {
        let retval = if master.flags & service_flags::DROP_WHEN_EMPTY != 0 {
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
    let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(backend_id) = select::backend_for(client, &master_key, &master, select::Pick::Random)
    else {
        return refuse_inconsistent(frontend_addr, frontend_port);
    };
    let Some(backend) = BACKENDS.get_ptr(backend_id) else {
        return refuse_inconsistent(frontend_addr, frontend_port);
    };
    let backend = unsafe { *backend };

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
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = backend.port as u32;
    }
    count(Counter::Translated);
    PROCEED
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
fn translate_to_frontend(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let key = SockRevNatKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: unsafe { (*sa).user_ip4 },
        port: unsafe { (*sa).user_port } as u16,
        _pad0: 0,
    };
    if let Some(frontend) = SOCK_REV_NAT.get_ptr(key) {
        let frontend = unsafe { *frontend };
        unsafe {
            (*sa).user_ip4 = frontend.addr;
            (*sa).user_port = frontend.port as u32;
        }
        count(Counter::RevNatApplied);
    }
}
