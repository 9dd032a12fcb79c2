//! A B-tree filled one key at a time in key order keeps its nodes about
//! half full: a full node splits in two and only the right half fills
//! again. At 100k Services that is tens of megabytes of empty room over
//! the planner's, the reconciler's and the source's maps. Rebuilt from its
//! own (sorted) entries, every node is full. Holders of large maps compact
//! them after a bulk fill: a first plan, a full sync, a list.

use std::collections::{BTreeMap, BTreeSet};

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
