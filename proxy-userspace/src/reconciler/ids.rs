//! Stable small ids for backends, service ports and frontends (rev-NAT).

use std::collections::{BTreeMap, BTreeSet};

use crate::collections::Compact;

/// Hands out ids >= 1 (0 means "none" in the maps), keeps an item's id for
/// as long as the item is wanted, and never hands out an id the maps still
/// use for something else. Fresh ids continue after the highest id the maps
/// held at start: a rev-NAT id outlives its frontend in conntrack entries,
/// so an id released just before a restart is not handed out again soon.
#[derive(Debug)]
pub struct IdAllocator<T: Ord + Clone> {
    by_item: BTreeMap<T, u32>,
    /// The ids in `by_item`.
    owned: BTreeSet<u32>,
    /// `owned` plus ids the maps hold for items not known (yet).
    used: BTreeSet<u32>,
    next: u32,
}

impl<T: Ord + Clone> Default for IdAllocator<T> {
    fn default() -> Self {
        Self {
            by_item: BTreeMap::new(),
            owned: BTreeSet::new(),
            used: BTreeSet::new(),
            next: 1,
        }
    }
}

impl<T: Ord + Clone> IdAllocator<T> {
    /// An id the maps hold for `item` (read back at start). The first id
    /// seen for an item wins, and an id stays with the first item seen
    /// with it; a duplicate stays reserved until released.
    pub fn restore(&mut self, item: T, id: u32) {
        self.reserve(id);
        if !self.by_item.contains_key(&item) && !self.owned.contains(&id) {
            self.by_item.insert(item, id);
            self.owned.insert(id);
        }
    }

    /// An id the maps hold whose item is not known yet.
    pub fn reserve(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id.saturating_add(1));
    }

    /// The id of `item`: its current one, else `preferred` when no other
    /// item has it, else a fresh one.
    pub fn id_for(&mut self, item: &T, preferred: Option<u32>) -> u32 {
        if let Some(id) = self.by_item.get(item) {
            return *id;
        }
        let id = match preferred {
            Some(id) if id != 0 && !self.owned.contains(&id) => id,
            _ => self.fresh(),
        };
        self.used.insert(id);
        self.owned.insert(id);
        self.by_item.insert(item.clone(), id);
        id
    }

    /// The id `item` has, if any.
    pub fn get(&self, item: &T) -> Option<u32> {
        self.by_item.get(item).copied()
    }

    /// Releases `item`'s id.
    pub fn release(&mut self, item: &T) {
        if let Some(id) = self.by_item.remove(item) {
            self.owned.remove(&id);
            self.used.remove(&id);
        }
    }

    /// Releases every id for which `keep` is false.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.by_item.retain(|_, id| keep(*id));
        self.owned.retain(|id| keep(*id));
        self.used.retain(|id| keep(*id));
    }

    /// See [`Compact`].
    pub fn compact(&mut self) {
        self.by_item.compact();
        self.owned.compact();
        self.used.compact();
    }

    fn fresh(&mut self) -> u32 {
        while self.next == 0 || self.used.contains(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        id
    }
}

/// The ids of a service port's few items (frontends, backends), sorted by
/// item. A vector: most ports have one frontend and a handful of backends,
/// and a B-tree's first node alone has room for eleven; a full sync holds
/// one of these per port at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdTable<K>(Vec<(K, u32)>);

impl<K: Ord> IdTable<K> {
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(key, _)| key)
    }

    pub fn values(&self) -> impl Iterator<Item = &u32> {
        self.0.iter().map(|(_, id)| id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(K, u32)> {
        self.0.iter()
    }
}

impl<K: Ord> FromIterator<(K, u32)> for IdTable<K> {
    /// An item listed twice keeps one entry (its id is the same).
    fn from_iter<I: IntoIterator<Item = (K, u32)>>(items: I) -> Self {
        let mut table: Vec<(K, u32)> = items.into_iter().collect();
        table.sort_by(|a, b| a.0.cmp(&b.0));
        table.dedup_by(|a, b| a.0 == b.0);
        table.shrink_to_fit();
        Self(table)
    }
}

impl<K: Ord> std::ops::Index<&K> for IdTable<K> {
    type Output = u32;

    /// Panics when `item` has no id, as a map's index does.
    fn index(&self, item: &K) -> &u32 {
        let at = self
            .0
            .binary_search_by(|(key, _)| key.cmp(item))
            .expect("an item of this table");
        &self.0[at].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_table_finds_each_item_once() {
        let table: IdTable<&str> = [("b", 2), ("a", 1), ("b", 2)].into_iter().collect();
        assert_eq!(table.keys().copied().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(table[&"b"], 2);
        assert_eq!(table[&"a"], 1);
    }

    #[test]
    fn ids_are_stable_and_never_zero() {
        let mut ids = IdAllocator::default();
        let a = ids.id_for(&"a", None);
        let b = ids.id_for(&"b", None);
        assert_ne!(a, 0);
        assert_ne!(a, b);
        assert_eq!(ids.id_for(&"a", None), a);
    }

    #[test]
    fn restored_and_reserved_ids_are_not_reused() {
        let mut ids = IdAllocator::default();
        ids.restore("old", 1);
        ids.reserve(2);
        assert_eq!(ids.id_for(&"old", None), 1);
        assert_eq!(ids.id_for(&"new", None), 3);
    }

    #[test]
    fn preferred_id_is_taken_unless_another_item_has_it() {
        let mut ids = IdAllocator::default();
        ids.reserve(7);
        assert_eq!(ids.id_for(&"a", Some(7)), 7);
        assert_ne!(ids.id_for(&"b", Some(7)), 7);
    }

    #[test]
    fn an_id_restored_for_two_items_stays_with_the_first() {
        let mut ids = IdAllocator::default();
        ids.restore("a", 4);
        ids.restore("b", 4);
        assert_eq!(ids.id_for(&"a", None), 4);
        let b = ids.id_for(&"b", None);
        assert_ne!(b, 4, "one id, one item");
        assert_ne!(b, 0);
    }

    #[test]
    fn fresh_ids_continue_after_the_highest_restored_one() {
        let mut ids = IdAllocator::default();
        ids.restore("kept", 3);
        ids.reserve(9);
        assert_eq!(
            ids.id_for(&"new", None),
            10,
            "1, 2 and 4-8 may have been released just before"
        );
        ids.reserve(u32::MAX);
        assert_ne!(ids.id_for(&"wraps", None), 0);
    }

    #[test]
    fn released_ids_are_forgotten() {
        let mut ids = IdAllocator::default();
        let a = ids.id_for(&"a", None);
        ids.retain(|id| id != a);
        let again = ids.id_for(&"a", Some(a));
        assert_eq!(again, a, "a released id may be handed out again");
    }
}
