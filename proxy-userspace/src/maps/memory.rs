//! An in-memory [`Datapath`] for reconciler tests: it records every write in
//! order and can be made to fail, like a full map.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use proxy_common::{AffinityMatchKey, Backend, RevNat, ServiceKey, ServiceValue, map_names};

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
}

/// Maps with room for everything a test writes.
const UNLIMITED: Capacity = Capacity {
    services: usize::MAX,
    backends: usize::MAX,
    rev_nat: usize::MAX,
    source_ranges: usize::MAX,
    affinity_match: usize::MAX,
};

#[derive(Debug, Default)]
pub struct MemoryDatapath {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    pub source_ranges: BTreeSet<SourceRangeEntry>,
    pub affinity_match: BTreeSet<AffinityMatchKey>,
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
        }
    }

    /// Every master entry's slots exist and point at existing backends, and
    /// rule 9 wildcards (port 0) have neither count nor slots: the
    /// invariants the reconciler keeps after each single write.
    pub fn check_consistent(&self) -> Result<(), String> {
        if let Some((key, _)) = self.services.iter().find(|(key, value)| {
            codec::is_cluster_ip_wildcard(key) && (key.slot != 0 || value.count != 0)
        }) {
            return Err(format!("{key:?}: a wildcard with backend slots"));
        }
        for (key, value) in self.services.iter().filter(|(key, _)| key.slot == 0) {
            for slot in 1..=value.count {
                let slot_key = ServiceKey { slot, ..*key };
                let Some(slot_value) = self.services.get(&slot_key) else {
                    return Err(format!("{key:?}: slot {slot} missing"));
                };
                if !self.backends.contains_key(&slot_value.backend_id) {
                    return Err(format!(
                        "{key:?}: backend {} missing",
                        slot_value.backend_id
                    ));
                }
            }
        }
        Ok(())
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
}
