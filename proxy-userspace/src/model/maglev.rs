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
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;

    const M: u32 = DEFAULT_TABLE_SIZE;

    /// `n` backends on 10.244.x.y:8080/TCP.
    fn backends(n: usize) -> Vec<BackendAddr> {
        (0..n)
            .map(|i| BackendAddr {
                addr: Ipv4Addr::new(10, 244, (i / 200) as u8 + 1, (i % 200) as u8 + 10),
                port: 8080,
                protocol: Protocol::Tcp,
            })
            .collect()
    }

    fn size(m: u32) -> TableSize {
        TableSize::new(m).unwrap()
    }

    /// The share of entries whose backend differs between two tables.
    fn changed(before: &[BackendAddr], after: &[BackendAddr]) -> f64 {
        let changed = before.iter().zip(after).filter(|(a, b)| a != b).count();
        changed as f64 / before.len() as f64
    }

    #[test]
    fn the_same_backends_in_any_order_build_the_same_table() {
        let set = backends(10);
        let first = table(&set, size(M));
        assert_eq!(first.len(), M as usize);
        assert_eq!(table(&set, size(M)), first);
        let mut shuffled = set.clone();
        shuffled.reverse();
        shuffled.swap(2, 7);
        shuffled.push(set[3]);
        assert_eq!(table(&shuffled, size(M)), first, "order and duplicates");
    }

    #[test]
    fn the_table_is_fixed_by_the_backends_alone() {
        // Pinned: a change of the hash or the fill order would make nodes
        // running different agent versions disagree. (Checked against an
        // independent implementation of the paper's algorithm.)
        let picks: Vec<u8> = table(&backends(3), size(13))
            .iter()
            .map(|backend| backend.addr.octets()[3])
            .collect();
        assert_eq!(picks, [12, 11, 12, 11, 12, 10, 10, 11, 10, 10, 10, 11, 12]);
    }

    #[test]
    fn rule_08_every_backend_gets_its_share_of_the_table() {
        for n in [1, 2, 3, 10, 100, 1000] {
            let set = backends(n);
            let mut counts: BTreeMap<BackendAddr, usize> = BTreeMap::new();
            for backend in table(&set, size(M)) {
                *counts.entry(backend).or_default() += 1;
            }
            assert_eq!(counts.len(), n, "every backend has entries");
            let (low, high) = (M as usize / n, (M as usize).div_ceil(n));
            for (backend, count) in counts {
                assert!(
                    (low..=high).contains(&count),
                    "N = {n}: {backend:?} has {count} entries, not {low}..={high}"
                );
            }
        }
    }

    /// The worst share of entries that change when one of `n` backends
    /// goes (trying each of the first 10), and when a new one comes.
    fn disruption(n: usize) -> (f64, f64) {
        let set = backends(n + 1);
        let (set, newcomer) = (&set[..n], &set[n..]);
        let full = table(set, size(M));
        let removed = (0..n.min(10))
            .map(|gone| {
                let rest: Vec<BackendAddr> = set
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != gone)
                    .map(|(_, backend)| *backend)
                    .collect();
                changed(&full, &table(&rest, size(M)))
            })
            .fold(0.0, f64::max);
        let grown = table(&[set, newcomer].concat(), size(M));
        (removed, changed(&full, &grown))
    }

    #[test]
    fn removing_or_adding_one_backend_moves_few_entries() {
        // At least 1/N must move (the entries of the backend that left);
        // Maglev moves more as M/N shrinks: with M = 16381 and 100
        // backends (164 entries each) a removal moves about 2.5/N.
        // Measured, removal: N = 3: 0.334 (1.00/N), 10: 0.108 (1.08/N),
        // 100: 0.0245 (2.45/N).
        for (n, bound) in [(3, 1.2), (10, 1.2), (100, 3.0)] {
            let (removed, added) = disruption(n);
            println!(
                "N = {n}, M = {M}: removing one backend changes {removed:.4} of the table \
                 ({:.2}/N), adding one {added:.4} ({:.2}/(N+1))",
                removed * n as f64,
                added * (n + 1) as f64
            );
            assert!(
                removed <= bound / n as f64,
                "N = {n}: {removed:.4} > {bound}/N"
            );
            assert!(
                added <= bound / (n + 1) as f64,
                "N = {n}: adding one changes {added:.4} > {bound}/(N+1)"
            );
        }
    }

    #[test]
    fn a_backend_that_comes_back_gets_its_entries_back() {
        let set = backends(10);
        let full = table(&set, size(M));
        let without = table(&set[1..], size(M));
        assert!(changed(&full, &without) > 0.0);
        assert_eq!(table(&set, size(M)), full, "the same set, the same table");
    }

    #[test]
    fn no_backends_no_table() {
        assert!(table(&[], size(M)).is_empty());
    }

    #[test]
    fn more_backends_than_entries_fill_every_entry_once() {
        let table = table(&backends(20), size(7));
        assert_eq!(table.len(), 7);
        let mut distinct = table.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 7, "one entry each for the first 7 turns");
    }

    #[test]
    fn table_sizes_must_be_primes_within_the_limit() {
        assert_eq!(TableSize::default().get(), DEFAULT_TABLE_SIZE);
        for prime in [2, 3, 13, 251, 65_537, DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE] {
            assert_eq!(TableSize::new(prime).map(TableSize::get), Ok(prime));
        }
        for not_prime in [1, 4, 16_380, 65_536, MAX_TABLE_SIZE - 1] {
            assert_eq!(
                TableSize::new(not_prime),
                Err(TableSizeError::NotPrime(not_prime))
            );
        }
        for outside in [0, MAX_TABLE_SIZE + 2, u32::MAX] {
            assert_eq!(
                TableSize::new(outside),
                Err(TableSizeError::OutOfRange(outside))
            );
        }
        assert_eq!(
            TableSize::new(16_380).unwrap_err().to_string(),
            "16380 is not a prime: a Maglev table's size must be one (e.g. 16381, the default)"
        );
        assert_eq!(
            TableSize::new(0).unwrap_err().to_string(),
            "0 is outside 1..=131071"
        );
    }
}
