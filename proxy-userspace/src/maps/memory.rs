//! An in-memory [`Datapath`] for reconciler tests: it records every write in
//! order and can be made to fail, like a full map.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use proxy_common::{
    AffinityMatchKey, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, map_names, scope,
    service_flags,
};

use super::{Capacity, Datapath, DatapathError, codec, codec::SourceRangeEntry};

/// One write, as the datapath saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutBackend(u32, Backend),
    DeleteBackend(u32),
    PutRevNat(u32, RevNat),
    DeleteRevNat(u32),
    PutSourceRange(SourceRangeEntry),
    DeleteSourceRange(SourceRangeEntry),
    PutAffinityMatch(AffinityMatchKey),
    DeleteAffinityMatch(AffinityMatchKey),
    PutMaglevTable(MaglevKey, Vec<u32>),
    DeleteMaglevTable(MaglevKey),
}

/// Maps with room for everything a test writes.
pub const UNLIMITED: Capacity = Capacity {
    services: usize::MAX,
    backends: usize::MAX,
    rev_nat: usize::MAX,
    source_ranges: usize::MAX,
    affinity_match: usize::MAX,
    maglev_tables: usize::MAX,
};

#[derive(Debug, Default)]
pub struct MemoryDatapath {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    pub source_ranges: BTreeSet<SourceRangeEntry>,
    pub affinity_match: BTreeSet<AffinityMatchKey>,
    /// Maglev tables as written: `[M, backend ids...]`.
    pub maglev: BTreeMap<MaglevKey, Vec<u32>>,
    pub writes: Vec<Write>,
    /// When set, inserting a new services key beyond this many fails (a
    /// map the reconciler believed had room refuses the write).
    pub services_capacity: Option<usize>,
    /// What the reconciler is told the maps hold at most; unlimited when
    /// unset.
    pub capacity: Option<Capacity>,
}

impl MemoryDatapath {
    /// The same map contents, without the write log and failure knobs: what
    /// a restarted agent reads back.
    pub fn contents(&self) -> MemoryDatapath {
        MemoryDatapath {
            services: self.services.clone(),
            backends: self.backends.clone(),
            rev_nat: self.rev_nat.clone(),
            source_ranges: self.source_ranges.clone(),
            affinity_match: self.affinity_match.clone(),
            maglev: self.maglev.clone(),
            ..MemoryDatapath::default()
        }
    }

    /// Applies one recorded write.
    pub fn apply(&mut self, write: &Write) -> Result<(), DatapathError> {
        match write {
            Write::PutService(key, value) => self.put_service(*key, *value),
            Write::DeleteService(key) => self.delete_service(key),
            Write::PutBackend(id, value) => self.put_backend(*id, *value),
            Write::DeleteBackend(id) => self.delete_backend(*id),
            Write::PutRevNat(id, value) => self.put_rev_nat(*id, *value),
            Write::DeleteRevNat(id) => self.delete_rev_nat(*id),
            Write::PutSourceRange(range) => self.put_source_range(*range),
            Write::DeleteSourceRange(range) => self.delete_source_range(range),
            Write::PutAffinityMatch(key) => self.put_affinity_match(*key),
            Write::DeleteAffinityMatch(key) => self.delete_affinity_match(key),
            Write::PutMaglevTable(key, table) => self.put_maglev_table(*key, table),
            Write::DeleteMaglevTable(key) => self.delete_maglev_table(key),
        }
    }

    /// The invariants the reconciler keeps after each single write, what a
    /// concurrent reader may rely on: every master's slots exist and point
    /// at existing backends; a frontend's master names its rev-NAT entry;
    /// a master checking source ranges has some; affinity pairs exist for
    /// the backends an affinity master selects; an external master with
    /// backends has its Maglev table, and every table holds its size M
    /// and M ids of existing backends; rule 9 wildcards (port 0) have
    /// neither count, slots nor ids.
    pub fn check_consistent(&self) -> Result<(), String> {
        for (key, value) in self.services.iter().filter(|(key, _)| key.slot == 0) {
            if codec::is_cluster_ip_wildcard(key) {
                if *value != ServiceValue::slot(0) || key.scope != scope::INTERNAL {
                    return Err(format!("{key:?}: a wildcard with {value:?}"));
                }
                continue;
            }
            let slots = self.slots(key, value)?;
            for backend_id in &slots {
                if !self.backends.contains_key(backend_id) {
                    return Err(format!("{key:?}: backend {backend_id} missing"));
                }
            }
            let frontend = codec::frontend(key).ok_or(format!("{key:?}: unknown protocol"))?;
            if value.rev_nat_id == 0 {
                return Err(format!("{key:?}: no rev-NAT id"));
            }
            if self.rev_nat.get(&value.rev_nat_id) != Some(&codec::rev_nat(&frontend)) {
                return Err(format!(
                    "{key:?}: rev-NAT entry {} missing or another frontend's",
                    value.rev_nat_id
                ));
            }
            if value.flags & service_flags::SOURCE_RANGES != 0
                && !self
                    .source_ranges
                    .iter()
                    .any(|range| range.rev_nat_id == value.rev_nat_id)
            {
                return Err(format!("{key:?}: checks source ranges it does not have"));
            }
            if value.affinity_timeout != 0 {
                for backend_id in slots {
                    let pair = AffinityMatchKey {
                        backend_id,
                        svc_id: value.svc_id,
                        selection: u32::from(value.selection),
                    };
                    if !self.affinity_match.contains(&pair) {
                        return Err(format!("{key:?}: affinity pair {pair:?} missing"));
                    }
                }
            }
            let table = codec::maglev_key(value);
            if key.scope == scope::EXTERNAL && value.count > 0 && !self.maglev.contains_key(&table)
            {
                return Err(format!("{key:?}: Maglev table {table:?} missing"));
            }
        }
        for (key, table) in &self.maglev {
            let Some((size, backend_ids)) = table.split_first() else {
                return Err(format!("Maglev table {key:?}: empty"));
            };
            if *size == 0 || *size as usize != backend_ids.len() {
                return Err(format!(
                    "Maglev table {key:?}: M = {size} with {} entries",
                    backend_ids.len()
                ));
            }
            if let Some(id) = backend_ids
                .iter()
                .find(|id| !self.backends.contains_key(id))
            {
                return Err(format!("Maglev table {key:?}: backend {id} missing"));
            }
        }
        Ok(())
    }

    /// What a complete sync leaves besides [`Self::check_consistent`]:
    /// nothing stray. Every slot within its master's count, every rev-NAT
    /// entry, source range, affinity pair, Maglev table and backend used by
    /// a master, a table holding only backends its masters select, and a
    /// frontend's two scopes agree on its ids.
    pub fn check_settled(&self) -> Result<(), String> {
        self.check_consistent()?;
        for key in self.services.keys().filter(|key| key.slot != 0) {
            let master = self.services.get(&key.with_slot(0));
            if master.is_none_or(|master| key.slot > master.count) {
                return Err(format!("{key:?}: a slot no master counts"));
            }
        }
        let masters: Vec<(&ServiceKey, &ServiceValue)> = self
            .services
            .iter()
            .filter(|(key, _)| key.slot == 0 && !codec::is_cluster_ip_wildcard(key))
            .collect();
        for (key, value) in &masters {
            let other_scope = ServiceKey {
                scope: match key.scope {
                    scope::INTERNAL => scope::EXTERNAL,
                    _ => scope::INTERNAL,
                },
                ..**key
            };
            if let Some(other) = self.services.get(&other_scope)
                && (other.rev_nat_id, other.svc_id) != (value.rev_nat_id, value.svc_id)
            {
                return Err(format!("{key:?}: its scopes disagree on ids"));
            }
        }
        if let Some(id) = self
            .rev_nat
            .keys()
            .find(|id| !masters.iter().any(|(_, m)| m.rev_nat_id == **id))
        {
            return Err(format!("rev-NAT entry {id}: no master names it"));
        }
        if let Some(range) = self.source_ranges.iter().find(|range| {
            !masters.iter().any(|(_, m)| {
                m.rev_nat_id == range.rev_nat_id && m.flags & service_flags::SOURCE_RANGES != 0
            })
        }) {
            return Err(format!("{range:?}: no master checks it"));
        }
        let mut selected = BTreeSet::new();
        for (key, value) in &masters {
            selected.extend(self.slots(key, value)?);
        }
        if let Some(pair) = self.affinity_match.iter().find(|pair| {
            !masters.iter().any(|(key, m)| {
                m.affinity_timeout != 0
                    && m.svc_id == pair.svc_id
                    && u32::from(m.selection) == pair.selection
                    && self
                        .slots(key, m)
                        .is_ok_and(|slots| slots.contains(&pair.backend_id))
            })
        }) {
            return Err(format!("{pair:?}: no affinity master selects it"));
        }
        if let Some(id) = self.backends.keys().find(|id| !selected.contains(id)) {
            return Err(format!("backend {id}: no slot refers to it"));
        }
        for (table_key, table) in &self.maglev {
            let mut selected = BTreeSet::new();
            for (key, master) in masters.iter().filter(|(key, master)| {
                key.scope == scope::EXTERNAL
                    && master.count > 0
                    && codec::maglev_key(master) == *table_key
            }) {
                selected.extend(self.slots(key, master)?);
            }
            if selected.is_empty() {
                return Err(format!("Maglev table {table_key:?}: no master uses it"));
            }
            if let Some(id) = table[1..].iter().find(|id| !selected.contains(id)) {
                return Err(format!(
                    "Maglev table {table_key:?}: backend {id}, which its masters do not select"
                ));
            }
        }
        Ok(())
    }

    /// The backend ids in a master's slots, in slot order.
    fn slots(&self, key: &ServiceKey, master: &ServiceValue) -> Result<Vec<u32>, String> {
        (1..=master.count)
            .map(|slot| {
                self.services
                    .get(&key.with_slot(slot))
                    .map(|value| value.backend_id)
                    .ok_or(format!("{key:?}: slot {slot} missing"))
            })
            .collect()
    }
}

fn full() -> DatapathError {
    DatapathError {
        map: map_names::SERVICES,
        op: "insert",
        source: MapError::OutOfBounds {
            index: 0,
            max_entries: 0,
        },
    }
}

impl Datapath for MemoryDatapath {
    fn capacity(&self) -> Capacity {
        self.capacity.unwrap_or(UNLIMITED)
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DatapathError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, DatapathError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn rev_nats(&self) -> Result<Vec<(u32, RevNat)>, DatapathError> {
        Ok(self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn source_ranges(&self) -> Result<Vec<SourceRangeEntry>, DatapathError> {
        Ok(self.source_ranges.iter().copied().collect())
    }

    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, DatapathError> {
        Ok(self.affinity_match.iter().copied().collect())
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), DatapathError> {
        let at_capacity = self
            .services_capacity
            .is_some_and(|capacity| self.services.len() >= capacity);
        if at_capacity && !self.services.contains_key(&key) {
            return Err(full());
        }
        self.services.insert(key, value);
        self.writes.push(Write::PutService(key, value));
        Ok(())
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        self.services.remove(key);
        self.writes.push(Write::DeleteService(*key));
        Ok(())
    }

    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError> {
        self.backends.insert(id, backend);
        self.writes.push(Write::PutBackend(id, backend));
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.backends.remove(&id);
        self.writes.push(Write::DeleteBackend(id));
        Ok(())
    }

    fn put_rev_nat(&mut self, id: u32, rev_nat: RevNat) -> Result<(), DatapathError> {
        self.rev_nat.insert(id, rev_nat);
        self.writes.push(Write::PutRevNat(id, rev_nat));
        Ok(())
    }

    fn delete_rev_nat(&mut self, id: u32) -> Result<(), DatapathError> {
        self.rev_nat.remove(&id);
        self.writes.push(Write::DeleteRevNat(id));
        Ok(())
    }

    fn put_source_range(&mut self, range: SourceRangeEntry) -> Result<(), DatapathError> {
        self.source_ranges.insert(range);
        self.writes.push(Write::PutSourceRange(range));
        Ok(())
    }

    fn delete_source_range(&mut self, range: &SourceRangeEntry) -> Result<(), DatapathError> {
        self.source_ranges.remove(range);
        self.writes.push(Write::DeleteSourceRange(*range));
        Ok(())
    }

    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError> {
        self.affinity_match.insert(key);
        self.writes.push(Write::PutAffinityMatch(key));
        Ok(())
    }

    fn delete_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DatapathError> {
        self.affinity_match.remove(key);
        self.writes.push(Write::DeleteAffinityMatch(*key));
        Ok(())
    }

    fn maglev_tables(&self) -> Result<Vec<MaglevKey>, DatapathError> {
        Ok(self.maglev.keys().copied().collect())
    }

    fn put_maglev_table(&mut self, key: MaglevKey, table: &[u32]) -> Result<(), DatapathError> {
        self.maglev.insert(key, table.to_vec());
        self.writes.push(Write::PutMaglevTable(key, table.to_vec()));
        Ok(())
    }

    fn delete_maglev_table(&mut self, key: &MaglevKey) -> Result<(), DatapathError> {
        self.maglev.remove(key);
        self.writes.push(Write::DeleteMaglevTable(*key));
        Ok(())
    }
}
