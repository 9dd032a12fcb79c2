//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4): the table an
//! external frontend's new flows are spread over, a flow's hash picking
//! the slot. Every node builds the same table from the same backend set,
//! whatever order it learnt them in and whatever ids it gave them, so a
//! flow that moves to another node lands on the same backend; and a
//! change of the set moves few flows.

use std::fmt;

use proxy_common::maglev::{DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE};

use super::{BackendAddr, Protocol};

/// The number of entries M of a table: a prime (so every backend's skip
/// is coprime with M and its permutation visits every slot), at most
/// [`MAX_TABLE_SIZE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableSize(u32);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableSizeError {
    #[error("{0} is outside 1..={MAX_TABLE_SIZE}")]
    OutOfRange(u32),
    #[error(
        "{0} is not a prime: a Maglev table's size must be one (e.g. {DEFAULT_TABLE_SIZE}, the default)"
    )]
    NotPrime(u32),
}

impl TableSize {
    pub fn new(entries: u32) -> Result<Self, TableSizeError> {
        if !(1..=MAX_TABLE_SIZE).contains(&entries) {
            return Err(TableSizeError::OutOfRange(entries));
        }
        if !is_prime(entries) {
            return Err(TableSizeError::NotPrime(entries));
        }
        Ok(Self(entries))
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self(DEFAULT_TABLE_SIZE)
    }
}

impl fmt::Display for TableSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// The table of `size` entries over `backends` (duplicates count once):
/// entry `i` is the backend of slot `i + 1` in the map. Empty without
/// backends. Each backend claims slots in turn along its own permutation
/// of the table, so every backend gets `M / N` entries, rounded down or up.
pub fn table(backends: &[BackendAddr], size: TableSize) -> Vec<BackendAddr> {
    let mut backends: Vec<&BackendAddr> = backends.iter().collect();
    backends.sort_unstable_by_key(|backend| stable_key(backend));
    backends.dedup();
    if backends.is_empty() {
        return Vec::new();
    }
    let m = u64::from(size.get());
    let permutations: Vec<Permutation> = backends
        .iter()
        .map(|backend| Permutation::of(stable_key(backend), m))
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut entries: Vec<Option<&BackendAddr>> = vec![None; size.get() as usize];
    let mut filled = 0;
    loop {
        for ((backend, permutation), next) in backends.iter().zip(&permutations).zip(&mut next) {
            let mut slot = permutation.slot(*next, m);
            while entries[slot].is_some() {
                *next += 1;
                slot = permutation.slot(*next, m);
            }
            entries[slot] = Some(*backend);
            *next += 1;
            filled += 1;
            if filled == entries.len() {
                return entries.into_iter().flatten().copied().collect();
            }
        }
    }
}

/// A backend's preference order over the slots: `offset + j * skip (mod M)`.
struct Permutation {
    offset: u64,
    skip: u64,
}

impl Permutation {
    fn of(key: u64, m: u64) -> Self {
        let skip = match m {
            1 => 1,
            _ => stable_hash(key, SKIP_SEED) % (m - 1) + 1,
        };
        Self {
            offset: stable_hash(key, OFFSET_SEED) % m,
            skip,
        }
    }

    /// The backend's `j`-th preferred slot.
    fn slot(&self, j: u64, m: u64) -> usize {
        // j <= M (a backend never passes a slot twice) and skip < M <=
        // 2^17: no overflow.
        ((self.offset + j * self.skip) % m) as usize
    }
}

/// A backend as every node names it: address, port and protocol (never a
/// node-local id), packed big-endian: the order backends take turns in and
/// the input of their hashes.
fn stable_key(backend: &BackendAddr) -> u64 {
    let [a, b, c, d] = backend.addr.octets();
    let [port_high, port_low] = backend.port.to_be_bytes();
    let protocol = match backend.protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    };
    u64::from_be_bytes([0, a, b, c, d, port_high, port_low, protocol])
}

/// Seeds of the two hashes the paper asks for (offset and skip); fixed,
/// so every node and every agent version computes the same permutations.
const OFFSET_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const SKIP_SEED: u64 = 0x6a09_e667_f3bc_c909;

/// SplitMix64's finalizer over `key + seed`: a fixed function (std's
/// hashers are seeded per process or may change between releases).
fn stable_hash(key: u64, seed: u64) -> u64 {
    let mut z = key.wrapping_add(seed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
