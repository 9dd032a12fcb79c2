//! The shapes the agent's large state is kept in, chosen for memory: at
//! 100k Services every map holds 100k entries.
//!
//! - [`Compact`]: a B-tree filled one key at a time in key order keeps its
//!   nodes about half full (a full node splits in two and only the right
//!   half fills again). Rebuilt from its own sorted entries, every node is
//!   full. Holders of large maps compact them after a bulk fill: a first
//!   plan, a full sync, a list.
//! - [`insert_sorted`], [`remove_sorted`]: short sorted lists without
//!   duplicates, their first entries inline ([`SmallVec`]): most Services
//!   have one slice, most frontends one claimant, most service ports one
//!   or two masters, where a vector would allocate room for four and a
//!   B-tree set a node for eleven.

use std::collections::{BTreeMap, BTreeSet};

use smallvec::{Array, SmallVec};

pub trait Compact {
    fn compact(&mut self);
}

impl<K: Ord, V> Compact for BTreeMap<K, V> {
    fn compact(&mut self) {
        *self = std::mem::take(self).into_iter().collect();
    }
}

impl<T: Ord> Compact for BTreeSet<T> {
    fn compact(&mut self) {
        *self = std::mem::take(self).into_iter().collect();
    }
}

/// Adds `item` to the sorted `list` unless it is there.
pub fn insert_sorted<A: Array>(list: &mut SmallVec<A>, item: A::Item)
where
    A::Item: Ord,
{
    if let Err(at) = list.binary_search(&item) {
        list.insert(at, item);
    }
}

/// Takes `item` out of the sorted `list` if it is there.
pub fn remove_sorted<A: Array>(list: &mut SmallVec<A>, item: &A::Item)
where
    A::Item: Ord,
{
    if let Ok(at) = list.binary_search(item) {
        list.remove(at);
    }
}
