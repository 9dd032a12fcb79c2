//! Address and port rewrites with their checksums, SNAT port allocation and
//! the hand-off of a rewritten packet: to the kernel's routing (local
//! backends) or straight out of the right device (`bpf_redirect_neigh` in
//! tc; in XDP, MACs from the FIB and XDP_TX or a redirect).

use core::{ffi::c_void, mem};

use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_fib_lookup, xdp_action,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_redirect, bpf_redirect_neigh,
    },
    programs::{TcContext, XdpContext},
};
use proxy_common::{Counter, CtReply, Flow4, nat_ports};

use crate::{
    conntrack, csum,
    maps::{CT_REPLY, count},
    parse::{
        BPF_F_MARK_MANGLED_0, IP_CSUM, IP_DST, IP_OFF, IP_SRC, IP_TTL, Ipv4, Ports, ptr_at_mut,
    },
};

const AF_INET: u8 = 2;
const BPF_FIB_LOOKUP_SRC: u32 = 16;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Which end of a packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites one end's address and port, fixing the IPv4 checksum and the
/// L4 checksum (its pseudo-header covers the address).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    ports: &Ports,
    l4_off: usize,
    end: End,
    (old_addr, old_port): (u32, u16),
    (new_addr, new_port): (u32, u16),
) -> Result<(), ()> {
    let (addr_off, port_off) = match end {
        End::Source => (IP_OFF + IP_SRC, l4_off),
        End::Destination => (IP_OFF + IP_DST, l4_off + 2),
    };
    if old_addr != new_addr {
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
        ctx.l3_csum_replace(IP_OFF + IP_CSUM, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| ())?;
        ctx.l4_csum_replace(
            ports.csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | ports.csum_flags | 4,
        )
        .map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
        ctx.l4_csum_replace(
            ports.csum_off,
            old_port as u64,
            new_port as u64,
            ports.csum_flags | 2,
        )
        .map_err(|_| ())?;
    }
    Ok(())
}

/// A packet this program forwards must have a hop left; one without is
/// dropped and counted.
#[inline(always)]
pub fn hop_left(ip: &Ipv4) -> Result<(), ()> {
    if ip.ttl <= 1 {
        count(Counter::DroppedTtlExceeded);
        return Err(());
    }
    Ok(())
}

/// Takes one hop off the TTL of a packet this program forwards itself
/// (the kernel's forwarding, which would, is bypassed). A packet with no
/// hop left is dropped and counted.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ip: &Ipv4) -> Result<(), ()> {
    hop_left(ip)?;
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new = u16::from_ne_bytes([ip.ttl - 1, ip.proto]);
    ctx.store(IP_OFF + IP_TTL, &(ip.ttl - 1), 0)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_OFF + IP_CSUM, old as u64, new as u64, 2)
        .map_err(|_| ())
}

/// Where a FIB lookup runs: the hook's context and the device the packet
/// came in on.
#[derive(Clone, Copy)]
pub struct Hook {
    ctx: *mut c_void,
    pub ifindex: u32,
}

impl Hook {
    #[inline(always)]
    pub fn tc(ctx: &TcContext) -> Self {
        Self {
            ctx: ctx.skb.skb as *mut c_void,
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
        }
    }

    #[inline(always)]
    pub fn xdp(ctx: &XdpContext) -> Self {
        Self {
            ctx: ctx.ctx as *mut c_void,
            ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
        }
    }
}

/// A route towards a destination as the kernel would forward a packet
/// that came in on the hook's device: the device it leaves by, the source
/// address the route prefers there (`BPF_FIB_LOOKUP_SRC`: multi-homed
/// nodes SNAT to the right address), and the next hop's MAC addresses when
/// the neighbour is resolved.
#[derive(Clone, Copy)]
pub struct Route {
    pub ifindex: u32,
    pub source: u32,
    /// Source and destination MAC of the next hop; valid when `resolved`.
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub resolved: bool,
}

#[inline(always)]
pub fn route(hook: &Hook, ip: &Ipv4, ports: &Ports, daddr: u32) -> Option<Route> {
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.sport = ports.sport;
    params.dport = ports.dport;
    params.__bindgen_anon_1.tot_len = ip.total_len as u16;
    params.ifindex = hook.ifindex;
    params.__bindgen_anon_3.ipv4_src = ip.saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    let ret = unsafe {
        fib_lookup(
            hook.ctx,
            &mut params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    Some(Route {
        ifindex: params.ifindex,
        source: unsafe { params.__bindgen_anon_3.ipv4_src },
        smac: params.smac,
        dmac: params.dmac,
        resolved: ret == BPF_FIB_LKUP_RET_SUCCESS,
    })
}

/// Sends the packet out of `route`'s device; the kernel fills in both MAC
/// addresses from its neighbour table (resolving it if needed).
#[inline(always)]
pub fn redirect(route: &Route) -> i32 {
    let ret = unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) };
    if ret == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT as i32
    } else {
        count(Counter::DroppedNoRoute);
        TC_ACT_SHOT as i32
    }
}

/// Claims a free SNAT port on `nat_addr` towards the flow's backend by
/// inserting the reply entry under it: the insert only succeeds for a
/// reply tuple nobody holds, so two flows never share one. A tuple still
/// held by a flow that is over is taken over: at high connection rates the
/// range would otherwise fill with closed flows between two runs of the
/// agent's collector.
#[inline(always)]
pub fn claim_snat_port(
    backend_addr: u32,
    backend_port: u16,
    nat_addr: u32,
    protocol: u8,
    reply: &CtReply,
) -> Option<u16> {
    const SPAN: u32 = (nat_ports::LAST - nat_ports::FIRST) as u32 + 1;
    for _ in 0..nat_ports::TRIES {
        let random = unsafe { bpf_get_prandom_u32() };
        let port = (nat_ports::FIRST as u32 + random % SPAN) as u16;
        let port = port.to_be();
        let key = Flow4::new(backend_addr, nat_addr, backend_port, port, protocol);
        if CT_REPLY.insert(key, *reply, BPF_NOEXIST as u64).is_ok()
            || (conntrack::holder_over(&key) && CT_REPLY.insert(key, *reply, 0).is_ok())
        {
            return Some(port);
        }
    }
    None
}

/// XDP's [`rewrite`]: the packet is written in place and both checksums
/// updated incrementally (no skb, no checksum offload state yet).
#[inline(always)]
pub fn rewrite_in_place(
    ctx: &XdpContext,
    ports: &Ports,
    l4_off: usize,
    end: End,
    (old_addr, old_port): (u32, u16),
    (new_addr, new_port): (u32, u16),
) -> Result<(), ()> {
    let (addr_off, port_off) = match end {
        End::Source => (IP_OFF + IP_SRC, l4_off),
        End::Destination => (IP_OFF + IP_DST, l4_off + 2),
    };
    let addr = ptr_at_mut::<[u8; 4]>(ctx, addr_off).ok_or(())?;
    let ip_csum = ptr_at_mut::<[u8; 2]>(ctx, IP_OFF + IP_CSUM).ok_or(())?;
    let port = ptr_at_mut::<[u8; 2]>(ctx, port_off).ok_or(())?;
    let l4_csum = ptr_at_mut::<[u8; 2]>(ctx, ports.csum_off).ok_or(())?;
    // UDP's checksum 0 means "none" and stays so; a computed 0 is sent as
    // 0xffff.
    let udp = ports.csum_flags & BPF_F_MARK_MANGLED_0 != 0;
    unsafe {
        *addr = new_addr.to_ne_bytes();
        *port = new_port.to_ne_bytes();
        let check = u16::from_ne_bytes(*ip_csum);
        *ip_csum = csum::replace4(check, old_addr, new_addr).to_ne_bytes();
        let check = u16::from_ne_bytes(*l4_csum);
        if !(udp && check == 0) {
            let check = csum::replace4(check, old_addr, new_addr);
            let mut check = csum::replace2(check, old_port, new_port);
            if udp && check == 0 {
                check = 0xffff;
            }
            *l4_csum = check.to_ne_bytes();
        }
    }
    Ok(())
}

/// XDP's [`decrement_ttl`].
#[inline(always)]
pub fn decrement_ttl_in_place(ctx: &XdpContext, ip: &Ipv4) -> Result<(), ()> {
    hop_left(ip)?;
    let ttl = ptr_at_mut::<[u8; 2]>(ctx, IP_OFF + IP_TTL).ok_or(())?;
    let ip_csum = ptr_at_mut::<[u8; 2]>(ctx, IP_OFF + IP_CSUM).ok_or(())?;
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new = u16::from_ne_bytes([ip.ttl - 1, ip.proto]);
    unsafe {
        *ttl = new.to_ne_bytes();
        let check = u16::from_ne_bytes(*ip_csum);
        *ip_csum = csum::replace2(check, old, new).to_ne_bytes();
    }
    Ok(())
}

/// XDP's hand-off of a packet whose route has a resolved neighbour: MAC
/// addresses from the FIB, then back out of the device it came in on
/// (XDP_TX) or out of another one (redirect).
#[inline(always)]
pub fn transmit(ctx: &XdpContext, hook: &Hook, route: &Route) -> u32 {
    let Some(macs) = ptr_at_mut::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let mut both = [0u8; 12];
    both[..6].copy_from_slice(&route.dmac);
    both[6..].copy_from_slice(&route.smac);
    unsafe { *macs = both };
    if route.ifindex == hook.ifindex {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(route.ifindex, 0) as u32 }
    }
}
