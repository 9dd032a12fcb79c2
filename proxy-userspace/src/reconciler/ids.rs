//! Stable small ids for backends and service ports.

use std::collections::{BTreeMap, BTreeSet};

/// Hands out ids >= 1 (0 means "none" in the maps), keeps an item's id for
/// as long as the item is wanted, and never hands out an id the maps still
/// use for something else.
#[derive(Debug)]
pub struct IdAllocator<T: Ord + Clone> {
    by_item: BTreeMap<T, u32>,
    used: BTreeSet<u32>,
    next: u32,
}

impl<T: Ord + Clone> Default for IdAllocator<T> {
    fn default() -> Self {
        Self {
            by_item: BTreeMap::new(),
            used: BTreeSet::new(),
            next: 1,
        }
    }
}

impl<T: Ord + Clone> IdAllocator<T> {
    /// An id the maps hold for `item` (read back at start). The first id
    /// seen for an item wins; a duplicate stays reserved until released.
    pub fn restore(&mut self, item: T, id: u32) {
        self.used.insert(id);
        self.by_item.entry(item).or_insert(id);
    }

    /// An id the maps hold whose item is not known yet.
    pub fn reserve(&mut self, id: u32) {
        self.used.insert(id);
    }

    /// The id of `item`: its current one, else `preferred` when no other
    /// item has it, else a fresh one.
    pub fn id_for(&mut self, item: &T, preferred: Option<u32>) -> u32 {
        if let Some(id) = self.by_item.get(item) {
            return *id;
        }
        let taken = |id: u32| self.by_item.values().any(|other| *other == id);
        let id = match preferred {
            Some(id) if id != 0 && !taken(id) => id,
            _ => self.fresh(),
        };
        self.used.insert(id);
        self.by_item.insert(item.clone(), id);
        id
    }

    /// Releases every id for which `keep` is false.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.by_item.retain(|_, id| keep(*id));
        self.used.retain(|id| keep(*id));
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn released_ids_are_forgotten() {
        let mut ids = IdAllocator::default();
        let a = ids.id_for(&"a", None);
        ids.retain(|id| id != a);
        let again = ids.id_for(&"a", Some(a));
        assert_eq!(again, a, "a released id may be handed out again");
    }
}
