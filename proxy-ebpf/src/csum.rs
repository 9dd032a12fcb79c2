//! Incremental internet-checksum updates (RFC 1624) for fields rewritten in
//! place, where no skb helper does it (XDP, quoted headers in ICMP errors).
//! Values are taken as they sit in memory; one's-complement sums do not
//! depend on byte order.

/// `check` after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!old & 0xffff) + (!old >> 16);
    sum += (new & 0xffff) + (new >> 16);
    fold(sum)
}

/// `check` after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    fold(sum)
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
