//! The reconciler: the only writer of the maps. It diffs the desired state
//! against what the maps hold and writes in an order that never exposes a
//! half-written service:
//!
//! 1. backends that are new,
//! 2. affinity-match pairs that are new,
//! 3. per frontend: changed slots, then the master entry (its count), then
//!    slots beyond the new count,
//! 4. the ClusterIP wildcard entries of rule 9 (port 0, no slots),
//! 5. frontends and wildcards that are gone (master first, then slots),
//! 6. affinity-match pairs and backends nothing refers to any more.
//!
//! Each frontend is programmed with its `internal` selection: the socket
//! level serves the clients on this node.
//!
//! It starts from what the pinned maps already hold, so a restarted agent
//! keeps every id (backend ids, service-port ids) and rewrites nothing that
//! is already right: running traffic does not notice the restart.

mod ids;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use proxy_common::{
    AffinityMatchKey, Backend, ServiceKey, ServiceValue, map_names, scope, service_flags,
};

use crate::{
    maps::{Datapath, DatapathError, codec},
    model::{
        BackendAddr, DesiredState, FrontendPlan, Protocol, Selection, ServicePortName,
        ServicePortPlan, WhenEmpty,
    },
};
use ids::IdAllocator;

/// What a sync changed, for logs and metrics.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub backends_added: usize,
    pub backends_deleted: usize,
    /// Rule 9 wildcard entries (one per ClusterIP and protocol).
    pub wildcards_written: usize,
    pub wildcards_deleted: usize,
    /// Service ports whose update failed; they keep what they had and are
    /// retried on the next sync.
    pub failed: Vec<(ServicePortName, DatapathError)>,
    /// ClusterIPs whose wildcard entry could not be written; retried on the
    /// next sync.
    pub failed_wildcards: Vec<(Ipv4Addr, DatapathError)>,
    /// Deletes that failed; retried on the next sync.
    pub failed_deletes: Vec<DatapathError>,
    /// Service ports too large for the room left in the maps: nothing of
    /// them was written (what they had stays). Not retried until the next
    /// change: retrying cannot make room.
    pub over_capacity: Vec<(ServicePortName, OverCapacity)>,
    /// Rule 9 entries skipped because the services map is full.
    pub wildcards_over_capacity: usize,
}

/// A service port needs more entries of `map` than are free.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("needs {needed} more entries in map {map}, {free} free")]
pub struct OverCapacity {
    pub map: &'static str,
    pub needed: usize,
    pub free: usize,
}

impl SyncReport {
    /// Everything that can be programmed is; transient failures are
    /// retried until this holds.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.failed_wildcards.is_empty() && self.failed_deletes.is_empty()
    }

    /// Nothing was written and nothing failed.
    pub fn is_noop(&self) -> bool {
        self.is_complete()
            && self.over_capacity.is_empty()
            && self.wildcards_over_capacity == 0
            && self.frontends_written == 0
            && self.frontends_deleted == 0
            && self.backends_added == 0
            && self.backends_deleted == 0
            && self.wildcards_written == 0
            && self.wildcards_deleted == 0
    }
}

/// Entries one service port wants, with ids resolved.
struct PortEntries<'a> {
    name: &'a ServicePortName,
    plan: &'a ServicePortPlan,
    svc_id: u32,
    /// The frontends the socket level programs ([`socket_frontends`]).
    frontends: Vec<&'a FrontendPlan>,
    /// Every backend one of `frontends` selects, with its id.
    backend_ids: BTreeMap<BackendAddr, u32>,
}

/// The frontends of a plan the socket level programs. A LoadBalancer IP
/// with source ranges is left alone: at `connect()` the socket has no
/// source address yet, so the ranges cannot be checked, and translating
/// would let every pod through (rule 15). Its traffic goes to the balancer,
/// which enforces them.
fn socket_frontends(plan: &ServicePortPlan) -> Vec<&FrontendPlan> {
    plan.frontends
        .iter()
        .filter(|frontend_plan| frontend_plan.source_ranges.is_empty())
        .collect()
}

impl PortEntries<'_> {
    fn programmed(&self) -> impl Iterator<Item = &FrontendPlan> {
        self.frontends.iter().copied()
    }

    /// The backend ids of a selection, in slot order.
    fn slots(&self, selection: &Selection) -> Vec<u32> {
        selection
            .backends
            .iter()
            .map(|backend| self.backend_ids[backend])
            .collect()
    }

    /// The distinct backend sets the port's frontends select, in frontend
    /// order; a frontend's selection is its set's index. Frontends share
    /// affinity exactly when they share a set (rules 19, 23).
    fn selections(&self) -> Vec<&[BackendAddr]> {
        let mut selections: Vec<&[BackendAddr]> = Vec::new();
        for frontend in self.programmed() {
            let backends = frontend.internal.backends.as_slice();
            if !selections.contains(&backends) {
                selections.push(backends);
            }
        }
        selections
    }

    fn selection_of(&self, selection: &Selection) -> u8 {
        let index = self
            .selections()
            .iter()
            .position(|backends| *backends == selection.backends.as_slice())
            .unwrap_or(0);
        u8::try_from(index).unwrap_or(u8::MAX)
    }

    /// Rule 23: every (backend, selection) the port's frontends select.
    fn affinity_pairs(&self) -> Vec<AffinityMatchKey> {
        if self.plan.affinity_timeout.is_none() {
            return Vec::new();
        }
        let mut pairs = Vec::new();
        for (index, backends) in self.selections().into_iter().enumerate() {
            let selection = u32::try_from(index).unwrap_or(u32::MAX);
            pairs.extend(backends.iter().map(|backend| AffinityMatchKey {
                backend_id: self.backend_ids[backend],
                svc_id: self.svc_id,
                selection,
            }));
        }
        pairs
    }
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
        // svc_id 0 is "none": the rule 9 wildcards carry it.
        for value in services
            .iter()
            .filter(|(key, value)| key.slot == 0 && value.svc_id != 0)
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

    /// Number of frontends (master entries, not wildcards) the maps hold.
    pub fn frontend_count(&self) -> usize {
        self.services
            .keys()
            .filter(|key| key.slot == 0 && !codec::is_cluster_ip_wildcard(key))
            .count()
    }

    /// Makes the maps equal to `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        let entries = self.resolve_ids(desired);

        for port in &entries {
            if let Err(over) = self.fits(port) {
                report.over_capacity.push((port.name.clone(), over));
            } else if let Err(err) = self.write_port(port, &mut report) {
                report.failed.push((port.name.clone(), err));
            }
        }
        let wildcards = cluster_ip_wildcards(desired);
        for key in &wildcards {
            self.write_wildcard(*key, &mut report);
        }
        let keep = Wanted::of(&entries, wildcards);
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
                let frontends = socket_frontends(plan);
                let existing = frontends.iter().find_map(|frontend_plan| {
                    let master_key =
                        codec::service_key(&frontend_plan.frontend, scope::INTERNAL, 0);
                    Some(self.services.get(&master_key)?.svc_id)
                });
                let svc_id = self.svc_ids.id_for(name, existing);
                let backend_ids = frontends
                    .iter()
                    .flat_map(|frontend_plan| &frontend_plan.internal.backends)
                    .map(|backend| {
                        let id = self.backend_ids.id_for(&port_backend(plan, backend), None);
                        (*backend, id)
                    })
                    .collect();
                PortEntries {
                    name,
                    plan,
                    svc_id,
                    frontends,
                    backend_ids,
                }
            })
            .collect()
    }

    /// Whether everything `port` adds fits next to what the maps hold,
    /// checked before its first write: a port too large for the maps is
    /// refused whole and cannot crowd out the others.
    fn fits(&self, port: &PortEntries<'_>) -> Result<(), OverCapacity> {
        let capacity = self.datapath.capacity();
        let new_backends = port
            .backend_ids
            .values()
            .filter(|id| !self.backends.contains_key(id))
            .count();
        let mut new_services = 0;
        for frontend_plan in port.programmed() {
            let backends = frontend_plan.internal.backends.len();
            if backends > usize::from(u16::MAX) {
                return Err(OverCapacity {
                    map: map_names::SERVICES,
                    needed: backends,
                    free: usize::from(u16::MAX),
                });
            }
            let master = codec::service_key(&frontend_plan.frontend, scope::INTERNAL, 0);
            new_services += (0..=backends as u16)
                .filter(|slot| {
                    !self.services.contains_key(&ServiceKey {
                        slot: *slot,
                        ..master
                    })
                })
                .count();
        }
        let new_pairs = port
            .affinity_pairs()
            .iter()
            .filter(|pair| !self.affinity_match.contains(pair))
            .count();
        for (map, needed, held, max) in [
            (
                map_names::BACKENDS,
                new_backends,
                self.backends.len(),
                capacity.backends,
            ),
            (
                map_names::SERVICES,
                new_services,
                self.services.len(),
                capacity.services,
            ),
            (
                map_names::AFFINITY_MATCH,
                new_pairs,
                self.affinity_match.len(),
                capacity.affinity_match,
            ),
        ] {
            let free = max.saturating_sub(held);
            if needed > free {
                return Err(OverCapacity { map, needed, free });
            }
        }
        Ok(())
    }

    fn write_port(
        &mut self,
        port: &PortEntries<'_>,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        for (addr, id) in &port.backend_ids {
            let backend = port_backend(port.plan, addr);
            if self.backends.get(id) != Some(&backend) {
                self.datapath.put_backend(*id, backend)?;
                self.backends.insert(*id, backend);
                report.backends_added += 1;
            }
        }
        for pair in port.affinity_pairs() {
            if !self.affinity_match.contains(&pair) {
                self.datapath.put_affinity_match(pair)?;
                self.affinity_match.insert(pair);
            }
        }
        for frontend_plan in port.programmed() {
            self.write_frontend(frontend_plan, port, report)?;
        }
        Ok(())
    }

    fn write_frontend(
        &mut self,
        frontend_plan: &FrontendPlan,
        port: &PortEntries<'_>,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let slots = port.slots(&frontend_plan.internal);
        let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
        let flags = match frontend_plan.internal.when_empty {
            WhenEmpty::Drop => service_flags::DROP_WHEN_EMPTY,
            WhenEmpty::Reject => 0,
        };
        let affinity = port.plan.affinity_timeout.unwrap_or(0);
        let selection = port.selection_of(&frontend_plan.internal);
        let master = ServiceValue {
            count,
            flags,
            selection,
            svc_id: port.svc_id,
            affinity_timeout: affinity,
            ..ServiceValue::slot(0)
        };
        let master_key = codec::service_key(&frontend_plan.frontend, scope::INTERNAL, 0);
        if self.write_master(master_key, master, &slots)? {
            report.frontends_written += 1;
        }
        Ok(())
    }

    /// Rule 9: no slots, no service-port id, count 0 (refuse). Skipped,
    /// like a port, when the services map has no room left.
    fn write_wildcard(&mut self, key: ServiceKey, report: &mut SyncReport) {
        let full = self.services.len() >= self.datapath.capacity().services;
        if full && !self.services.contains_key(&key) {
            report.wildcards_over_capacity += 1;
            return;
        }
        match self.write_master(key, ServiceValue::slot(0), &[]) {
            Ok(true) => report.wildcards_written += 1,
            Ok(false) => {}
            Err(err) => report
                .failed_wildcards
                .push((codec::addr_from_map(key.addr), err)),
        }
    }

    /// Slots first, then the master (its count), then the slots beyond the
    /// new count: a reader never meets a count that points at a missing
    /// slot. Returns whether anything was written.
    fn write_master(
        &mut self,
        master_key: ServiceKey,
        master: ServiceValue,
        slots: &[u32],
    ) -> Result<bool, DatapathError> {
        let mut changed = false;
        for (slot, backend_id) in (1..=master.count).zip(slots) {
            changed |= self.put_service(
                ServiceKey { slot, ..master_key },
                ServiceValue::slot(*backend_id),
            )?;
        }
        let old_count = self.services.get(&master_key).map_or(0, |old| old.count);
        changed |= self.put_service(master_key, master)?;
        for slot in master.count.saturating_add(1)..=old_count {
            self.delete_service(ServiceKey { slot, ..master_key })?;
            changed = true;
        }
        Ok(changed)
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
                Ok(()) if codec::is_cluster_ip_wildcard(&master) => report.wildcards_deleted += 1,
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

/// A backend as the port's slots refer to it: local or not (rule 6).
fn port_backend(plan: &ServicePortPlan, backend: &BackendAddr) -> Backend {
    codec::backend(backend, plan.local_backends.contains(backend))
}

/// Rule 9: one wildcard per ClusterIP and protocol.
fn cluster_ip_wildcards(desired: &DesiredState) -> BTreeSet<ServiceKey> {
    desired
        .cluster_ips
        .iter()
        .flat_map(|addr| {
            [Protocol::Tcp, Protocol::Udp]
                .map(|protocol| codec::cluster_ip_wildcard(*addr, protocol))
        })
        .collect()
}

/// What the desired state wants to survive the delete phase. A port whose
/// update failed keeps its old slots, and through them its backends: the
/// backend delete only removes ids no slot refers to.
struct Wanted {
    /// Frontend masters and wildcards.
    masters: BTreeSet<ServiceKey>,
    affinity_match: BTreeSet<AffinityMatchKey>,
    backend_ids: BTreeSet<u32>,
    svc_ids: BTreeSet<u32>,
}

impl Wanted {
    fn of(entries: &[PortEntries<'_>], wildcards: BTreeSet<ServiceKey>) -> Self {
        let mut wanted = Wanted {
            masters: wildcards,
            affinity_match: BTreeSet::new(),
            backend_ids: BTreeSet::new(),
            svc_ids: BTreeSet::new(),
        };
        for port in entries {
            wanted.svc_ids.insert(port.svc_id);
            wanted
                .masters
                .extend(port.programmed().map(|frontend_plan| {
                    codec::service_key(&frontend_plan.frontend, scope::INTERNAL, 0)
                }));
            wanted.backend_ids.extend(port.backend_ids.values());
            wanted.affinity_match.extend(port.affinity_pairs());
        }
        wanted
    }
}

#[cfg(test)]
mod tests;
