//! The datapath. Programs stay small and flat: look up, pick, rewrite.
//! All the semantics (which backends, in what order, which frontends) are
//! decided by the agent's model and arrive here as map contents.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod events;
mod flow;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
