//! An in-memory [`Datapath`] for reconciler tests: it records every write in
//! order and can be made to fail, like a full map.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use proxy_common::{AffinityMatchKey, Backend, ServiceKey, ServiceValue, map_names};

use super::{Capacity, Datapath, DatapathError, codec};

/// One write, as the datapath saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutBackend(u32, Backend),
    DeleteBackend(u32),
    PutAffinityMatch(AffinityMatchKey),
    DeleteAffinityMatch(AffinityMatchKey),
}

#[derive(Debug, Default)]
pub struct MemoryDatapath {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub affinity_match: BTreeSet<AffinityMatchKey>,
    pub writes: Vec<Write>,
    /// When set, inserting a new services key beyond this many fails (a
    /// map the reconciler believed had room refuses the write).
    pub services_capacity: Option<usize>,
    /// What the reconciler is told the maps hold at most.
    pub capacity: Option<Capacity>,
}

impl MemoryDatapath {
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
        self.capacity.unwrap_or(Capacity::PINNED)
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DatapathError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, DatapathError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
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
