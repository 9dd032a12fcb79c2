//! Who refers to what in the reconciler's mirror of the maps, kept next to
//! every write: an incremental sync finds what a service port held, and
//! whether anything else still needs it, without walking the maps.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{AffinityMatchKey, ServiceKey, ServiceValue};
use smallvec::SmallVec;

use crate::collections::{Compact, insert_sorted, remove_sorted};

use crate::maps::codec;

#[derive(Debug, Default, PartialEq)]
pub(super) struct Index {
    /// Masters (slot 0) by the service-port id they carry, sorted; most
    /// service ports have one or two, kept inline.
    pub masters_by_svc: BTreeMap<u32, SmallVec<[ServiceKey; 2]>>,
    /// Rule 9 entries held.
    pub wildcards: BTreeSet<ServiceKey>,
    /// How many masters name each rev-NAT id.
    pub rev_nat_names: BTreeMap<u32, usize>,
    /// How many slots and Maglev tables refer to each backend id.
    pub backend_refs: BTreeMap<u32, usize>,
    /// Affinity-match pairs by service-port id.
    pub affinity_by_svc: BTreeMap<u32, BTreeSet<AffinityMatchKey>>,
}

impl Index {
    pub fn of<'a>(
        services: impl IntoIterator<Item = (&'a ServiceKey, &'a ServiceValue)>,
        maglev_backends: impl IntoIterator<Item = u32>,
        affinity_match: impl IntoIterator<Item = &'a AffinityMatchKey>,
    ) -> Self {
        let mut index = Self::default();
        for (key, value) in services {
            index.add_service(key, value);
        }
        for backend_id in maglev_backends {
            index.add_backend_ref(backend_id);
        }
        for pair in affinity_match {
            index.add_affinity(*pair);
        }
        index
    }

    pub fn add_service(&mut self, key: &ServiceKey, value: &ServiceValue) {
        if key.slot != 0 {
            self.add_backend_ref(value.backend_id);
            return;
        }
        if codec::is_cluster_ip_wildcard(key) {
            self.wildcards.insert(*key);
        }
        if value.svc_id != 0 {
            insert_sorted(self.masters_by_svc.entry(value.svc_id).or_default(), *key);
        }
        if value.rev_nat_id != 0 {
            *self.rev_nat_names.entry(value.rev_nat_id).or_default() += 1;
        }
    }

    pub fn remove_service(&mut self, key: &ServiceKey, value: &ServiceValue) {
        if key.slot != 0 {
            self.remove_backend_ref(value.backend_id);
            return;
        }
        self.wildcards.remove(key);
        if let Some(masters) = self.masters_by_svc.get_mut(&value.svc_id) {
            remove_sorted(masters, key);
            if masters.is_empty() {
                self.masters_by_svc.remove(&value.svc_id);
            }
        }
        decrement(&mut self.rev_nat_names, value.rev_nat_id);
    }

    pub fn add_backend_ref(&mut self, backend_id: u32) {
        *self.backend_refs.entry(backend_id).or_default() += 1;
    }

    pub fn remove_backend_ref(&mut self, backend_id: u32) {
        decrement(&mut self.backend_refs, backend_id);
    }

    pub fn add_affinity(&mut self, pair: AffinityMatchKey) {
        self.affinity_by_svc
            .entry(pair.svc_id)
            .or_default()
            .insert(pair);
    }

    pub fn remove_affinity(&mut self, pair: &AffinityMatchKey) {
        if let Some(pairs) = self.affinity_by_svc.get_mut(&pair.svc_id) {
            pairs.remove(pair);
            if pairs.is_empty() {
                self.affinity_by_svc.remove(&pair.svc_id);
            }
        }
    }

    /// See [`Compact`].
    pub fn compact(&mut self) {
        self.masters_by_svc.compact();
        self.wildcards.compact();
        self.rev_nat_names.compact();
        self.backend_refs.compact();
        self.affinity_by_svc.compact();
    }

    pub fn masters_of(&self, svc_id: u32) -> impl Iterator<Item = &ServiceKey> {
        self.masters_by_svc.get(&svc_id).into_iter().flatten()
    }

    pub fn is_named(&self, rev_nat_id: u32) -> bool {
        self.rev_nat_names.contains_key(&rev_nat_id)
    }

    pub fn is_referenced(&self, backend_id: u32) -> bool {
        self.backend_refs.contains_key(&backend_id)
    }
}

fn decrement(counts: &mut BTreeMap<u32, usize>, id: u32) {
    if let Some(count) = counts.get_mut(&id) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&id);
        }
    }
}
