//! The reconciler: the only writer of the maps. It diffs the desired state
//! against what the maps hold and writes in an order that never exposes a
//! half-written service:
//!
//! 1. backends that are new,
//! 2. affinity-match pairs that are new,
//! 3. per frontend: changed slots, then the master entry (its count), then
//!    slots beyond the new count,
//! 4. frontends that are gone (master first, then their slots),
//! 5. affinity-match pairs and backends nothing refers to any more.
//!
//! It starts from what the pinned maps already hold, so a restarted agent
//! keeps every id (backend ids, service-port ids) and rewrites nothing that
//! is already right: running traffic does not notice the restart.

mod ids;

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{AffinityMatchKey, Backend, ServiceKey, ServiceValue};

use crate::{
    maps::{Datapath, DatapathError, codec},
    model::{DesiredState, Frontend, ServicePortName, ServicePortPlan},
};
use ids::IdAllocator;

/// What a sync changed, for logs and metrics.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub backends_added: usize,
    pub backends_deleted: usize,
    /// Service ports whose update failed; they keep what they had and are
    /// retried on the next sync.
    pub failed: Vec<(ServicePortName, DatapathError)>,
    /// Deletes that failed; retried on the next sync.
    pub failed_deletes: Vec<DatapathError>,
}

impl SyncReport {
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.failed_deletes.is_empty()
    }

    /// Nothing was written and nothing failed.
    pub fn is_noop(&self) -> bool {
        self.is_complete()
            && self.frontends_written == 0
            && self.frontends_deleted == 0
            && self.backends_added == 0
            && self.backends_deleted == 0
    }
}

/// Entries one service port wants, with ids resolved.
struct PortEntries<'a> {
    name: &'a ServicePortName,
    svc_id: u32,
    backend_ids: Vec<u32>,
    plan: &'a ServicePortPlan,
}

pub struct Reconciler<D: Datapath> {
    datapath: D,
    /// Mirror of the maps: what was read at start plus every write since.
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    affinity_match: BTreeSet<AffinityMatchKey>,
    backend_ids: IdAllocator<Backend>,
    svc_ids: IdAllocator<ServicePortName>,
}

impl<D: Datapath> Reconciler<D> {
    /// Reads back what the maps hold, so ids survive agent restarts.
    pub fn new(datapath: D) -> Result<Self, DatapathError> {
        let services: BTreeMap<_, _> = datapath.services()?.into_iter().collect();
        let backends: BTreeMap<_, _> = datapath.backends()?.into_iter().collect();
        let affinity_match = datapath.affinity_matches()?.into_iter().collect();
        let mut backend_ids = IdAllocator::default();
        for (id, backend) in &backends {
            backend_ids.restore(*backend, *id);
        }
        let mut svc_ids = IdAllocator::default();
        for value in services
            .iter()
            .filter(|(key, _)| key.slot == 0)
            .map(|(_, v)| v)
        {
            svc_ids.reserve(value.svc_id);
        }
        Ok(Self {
            datapath,
            services,
            backends,
            affinity_match,
            backend_ids,
            svc_ids,
        })
    }

    pub fn datapath(&self) -> &D {
        &self.datapath
    }

    /// Number of frontends (master entries) the maps hold.
    pub fn frontend_count(&self) -> usize {
        self.services.keys().filter(|key| key.slot == 0).count()
    }

    /// Makes the maps equal to `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        let entries = self.resolve_ids(desired);

        for port in &entries {
            if let Err(err) = self.write_port(port, &mut report) {
                report.failed.push((port.name.clone(), err));
            }
        }
        let keep = Wanted::of(&entries);
        self.delete_unwanted(&keep, &mut report);
        self.backend_ids
            .retain(|id| self.backends.contains_key(&id));
        self.svc_ids.retain(|id| keep.svc_ids.contains(&id));
        report
    }

    /// Service-port ids: a port keeps the id its frontends already carry in
    /// the maps (restart), otherwise gets a fresh one.
    fn resolve_ids<'a>(&mut self, desired: &'a DesiredState) -> Vec<PortEntries<'a>> {
        desired
            .ports
            .iter()
            .map(|(name, plan)| {
                let existing = plan.frontends.iter().find_map(|frontend| {
                    let master = self.services.get(&codec::service_key(frontend, 0))?;
                    Some(master.svc_id)
                });
                let svc_id = self.svc_ids.id_for(name, existing);
                let backend_ids = plan
                    .backends
                    .iter()
                    .map(|backend| self.backend_ids.id_for(&codec::backend(backend), None))
                    .collect();
                PortEntries {
                    name,
                    svc_id,
                    backend_ids,
                    plan,
                }
            })
            .collect()
    }

    fn write_port(
        &mut self,
        port: &PortEntries<'_>,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        for (id, addr) in port.backend_ids.iter().zip(&port.plan.backends) {
            let backend = codec::backend(addr);
            if self.backends.get(id) != Some(&backend) {
                self.datapath.put_backend(*id, backend)?;
                self.backends.insert(*id, backend);
                report.backends_added += 1;
            }
        }
        if port.plan.affinity_timeout.is_some() {
            for backend_id in &port.backend_ids {
                let pair = AffinityMatchKey {
                    backend_id: *backend_id,
                    svc_id: port.svc_id,
                };
                if !self.affinity_match.contains(&pair) {
                    self.datapath.put_affinity_match(pair)?;
                    self.affinity_match.insert(pair);
                }
            }
        }
        for frontend in &port.plan.frontends {
            self.write_frontend(frontend, port, report)?;
        }
        Ok(())
    }

    fn write_frontend(
        &mut self,
        frontend: &Frontend,
        port: &PortEntries<'_>,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let count = u16::try_from(port.backend_ids.len()).unwrap_or(u16::MAX);
        let mut changed = false;
        for (slot, backend_id) in (1..=count).zip(&port.backend_ids) {
            changed |= self.put_service(
                codec::service_key(frontend, slot),
                ServiceValue::slot(*backend_id),
            )?;
        }
        let affinity = port.plan.affinity_timeout.unwrap_or(0);
        let master = ServiceValue::master(count, 0, port.svc_id, affinity);
        let master_key = codec::service_key(frontend, 0);
        let old_count = self.services.get(&master_key).map_or(0, |old| old.count);
        changed |= self.put_service(master_key, master)?;
        for slot in count.saturating_add(1)..=old_count {
            self.delete_service(codec::service_key(frontend, slot))?;
            changed = true;
        }
        if changed {
            report.frontends_written += 1;
        }
        Ok(())
    }

    /// Writes one services entry unless the maps already hold it.
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<bool, DatapathError> {
        if self.services.get(&key) == Some(&value) {
            return Ok(false);
        }
        self.datapath.put_service(key, value)?;
        self.services.insert(key, value);
        Ok(true)
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), DatapathError> {
        self.datapath.delete_service(&key)?;
        self.services.remove(&key);
        Ok(())
    }

    fn delete_unwanted(&mut self, keep: &Wanted, report: &mut SyncReport) {
        let gone_masters: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|key| key.slot == 0 && !keep.masters.contains(*key))
            .copied()
            .collect();
        for master in gone_masters {
            let count = self.services[&master].count;
            let deleted =
                (0..=count).try_for_each(|slot| self.delete_service(ServiceKey { slot, ..master }));
            match deleted {
                Ok(()) => report.frontends_deleted += 1,
                Err(err) => report.failed_deletes.push(err),
            }
        }
        // Slots whose master is gone (an interrupted delete before a restart).
        let orphans: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|key| {
                key.slot != 0 && !self.services.contains_key(&ServiceKey { slot: 0, ..**key })
            })
            .copied()
            .collect();
        for key in orphans {
            if let Err(err) = self.delete_service(key) {
                report.failed_deletes.push(err);
            }
        }
        let gone_pairs: Vec<AffinityMatchKey> = self
            .affinity_match
            .difference(&keep.affinity_match)
            .copied()
            .collect();
        for pair in gone_pairs {
            match self.datapath.delete_affinity_match(&pair) {
                Ok(()) => {
                    self.affinity_match.remove(&pair);
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
        let referenced: BTreeSet<u32> = self
            .services
            .iter()
            .filter(|(key, _)| key.slot != 0)
            .map(|(_, value)| value.backend_id)
            .chain(keep.backend_ids.iter().copied())
            .collect();
        let gone_backends: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in gone_backends {
            match self.datapath.delete_backend(id) {
                Ok(()) => {
                    self.backends.remove(&id);
                    report.backends_deleted += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }
}

/// What the desired state wants to survive the delete phase. A port whose
/// update failed keeps its old slots, and through them its backends: the
/// backend delete only removes ids no slot refers to.
struct Wanted {
    masters: BTreeSet<ServiceKey>,
    affinity_match: BTreeSet<AffinityMatchKey>,
    backend_ids: BTreeSet<u32>,
    svc_ids: BTreeSet<u32>,
}

impl Wanted {
    fn of(entries: &[PortEntries<'_>]) -> Self {
        let mut wanted = Wanted {
            masters: BTreeSet::new(),
            affinity_match: BTreeSet::new(),
            backend_ids: BTreeSet::new(),
            svc_ids: BTreeSet::new(),
        };
        for port in entries {
            wanted.svc_ids.insert(port.svc_id);
            wanted.masters.extend(
                port.plan
                    .frontends
                    .iter()
                    .map(|frontend| codec::service_key(frontend, 0)),
            );
            wanted.backend_ids.extend(&port.backend_ids);
            if port.plan.affinity_timeout.is_some() {
                wanted
                    .affinity_match
                    .extend(port.backend_ids.iter().map(|backend_id| AffinityMatchKey {
                        backend_id: *backend_id,
                        svc_id: port.svc_id,
                    }));
            }
        }
        wanted
    }
}

#[cfg(test)]
mod tests;
