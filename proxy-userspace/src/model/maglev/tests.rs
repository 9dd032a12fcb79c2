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
