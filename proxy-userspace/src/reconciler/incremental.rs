//! A sync of what one change touched: the service ports and ClusterIPs the
//! planner names are written, and only what they held is considered for
//! deletion, found through the [`Index`](super::index::Index) instead of a
//! walk of the maps. Writes keep the order of a full sync; the outcome is
//! the same as a full sync of the same desired state (the tests compare
//! both after random change sequences).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use proxy_common::{AffinityMatchKey, MaglevKey, ServiceKey, ServiceValue, scope};

use super::{PortEntries, Reconciler, SyncReport, Wanted, cluster_ip_wildcards};
use crate::{
    maps::{Datapath, codec},
    model::{DesiredState, Frontend, PlanChange, ServicePortName},
};

/// What the touched service ports hold in the maps before the sync.
#[derive(Default)]
struct Held {
    masters: Vec<(ServiceKey, ServiceValue)>,
    backend_ids: BTreeSet<u32>,
    maglev_tables: BTreeSet<MaglevKey>,
    affinity_match: Vec<AffinityMatchKey>,
    /// Rev-NAT ids their masters name, with the frontend each names.
    rev_nat: BTreeMap<u32, Frontend>,
}

impl<D: Datapath> Reconciler<D> {
    /// Makes the maps equal to `desired`, which differs from the state the
    /// last sync was given only where `change` says: a change costs what it
    /// changes. Service ports refused for room earlier are tried again;
    /// after a change of everything or a sync that left something undone,
    /// this is a full [`sync`](Self::sync).
    pub fn sync_change(&mut self, desired: &DesiredState, change: &PlanChange) -> SyncReport {
        if change.everything || self.needs_full_sync {
            return self.sync(desired);
        }
        let mut touched = change.ports.clone();
        touched.extend(self.refused.iter().cloned());
        let report = self.sync_touched(desired, &touched, &change.cluster_ips);
        let report =
            if report.over_capacity.is_empty() || !self.any_refused_port_fits(desired, &report) {
                report
            } else {
                let next = self.sync_touched(desired, &touched, &change.cluster_ips);
                report.then(next)
            };
        self.remember_unsettled(&report);
        report
    }

    pub(super) fn remember_unsettled(&mut self, report: &SyncReport) {
        self.refused = report
            .over_capacity
            .iter()
            .map(|(name, _)| name.clone())
            .collect();
        self.needs_full_sync = !report.is_complete() || report.wildcards_over_capacity > 0;
    }

    fn sync_touched(
        &mut self,
        desired: &DesiredState,
        touched: &BTreeSet<ServicePortName>,
        cluster_ips: &BTreeSet<Ipv4Addr>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let svc_ids: BTreeSet<u32> = touched
            .iter()
            .filter_map(|name| self.svc_ids.get(name))
            .collect();
        let held = self.held_by(&svc_ids);
        let entries: Vec<PortEntries<'_>> = touched
            .iter()
            .filter_map(|name| desired.ports.get_key_value(name))
            .map(|(name, plan)| self.resolve_port(name, plan))
            .collect();
        let wanted_cluster_ips = cluster_ips
            .iter()
            .filter(|addr| desired.cluster_ips.contains(addr));
        let mut keep = Wanted::of(
            &entries,
            cluster_ip_wildcards(wanted_cluster_ips),
            self.maglev_table_size,
        );
        self.write_ports(&entries, desired, &mut keep, &mut report);
        let svc_ids: BTreeSet<u32> = svc_ids
            .into_iter()
            .chain(keep.svc_ids.iter().copied())
            .collect();
        self.delete_touched(&held, &keep, &svc_ids, &mut report);
        let gone_wildcards = cluster_ip_wildcards(
            cluster_ips
                .iter()
                .filter(|addr| !desired.cluster_ips.contains(addr)),
        );
        for key in gone_wildcards {
            if self.services.contains_key(&key) {
                match self.delete_service(key) {
                    Ok(()) => report.wildcards_deleted += 1,
                    Err(err) => report.failed_deletes.push(err),
                }
            }
        }
        for name in touched
            .iter()
            .filter(|name| !desired.ports.contains_key(*name))
        {
            let masterless = self
                .svc_ids
                .get(name)
                .is_none_or(|svc_id| self.index.masters_of(svc_id).next().is_none());
            if masterless {
                self.svc_ids.release(name);
            }
        }
        report
    }

    fn held_by(&self, svc_ids: &BTreeSet<u32>) -> Held {
        let mut held = Held::default();
        for svc_id in svc_ids {
            for key in self.index.masters_of(*svc_id) {
                let master = self.services[key];
                held.masters.push((*key, master));
                held.backend_ids.extend(
                    (1..=master.count)
                        .filter_map(|slot| self.services.get(&key.with_slot(slot)))
                        .map(|slot| slot.backend_id),
                );
                if let Some(frontend) = codec::frontend(key) {
                    held.rev_nat.insert(master.rev_nat_id, frontend);
                }
            }
            let tables = self.maglev.range(
                MaglevKey {
                    svc_id: *svc_id,
                    selection: 0,
                }..=MaglevKey {
                    svc_id: *svc_id,
                    selection: u32::MAX,
                },
            );
            for (key, build) in tables {
                held.maglev_tables.insert(*key);
                held.backend_ids
                    .extend(build.iter().flat_map(|build| build.backend_ids.values()));
            }
            held.affinity_match
                .extend(self.index.affinity_by_svc.get(svc_id).into_iter().flatten());
        }
        held
    }

    /// The deletes of a full sync, limited to what the touched ports held.
    fn delete_touched(
        &mut self,
        held: &Held,
        keep: &Wanted,
        svc_ids: &BTreeSet<u32>,
        report: &mut SyncReport,
    ) {
        for (key, master) in &held.masters {
            // Another port may have taken the frontend over in this sync.
            let still_held = self
                .services
                .get(key)
                .is_some_and(|now| now.svc_id == master.svc_id);
            if keep.masters.contains(key) || !still_held {
                continue;
            }
            let count = self.services[key].count;
            match (0..=count).try_for_each(|slot| self.delete_service(key.with_slot(slot))) {
                Ok(()) => report.frontends_deleted += 1,
                Err(err) => report.failed_deletes.push(err),
            }
        }
        let used: BTreeSet<MaglevKey> = svc_ids
            .iter()
            .flat_map(|svc_id| self.index.masters_of(*svc_id))
            .filter(|key| key.scope == scope::EXTERNAL)
            .map(|key| &self.services[key])
            .filter(|master| master.count > 0)
            .map(codec::maglev_key)
            .collect();
        for key in &held.maglev_tables {
            if used.contains(key) || keep.maglev_tables.contains(key) {
                continue;
            }
            match self.datapath.delete_maglev_table(key) {
                Ok(()) => {
                    self.set_maglev(*key, None);
                    report.maglev_tables_deleted += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
        let rev_nat_ids: BTreeSet<u32> = held
            .rev_nat
            .keys()
            .chain(&keep.rev_nat_ids)
            .copied()
            .collect();
        for rev_nat_id in &rev_nat_ids {
            self.delete_unused_source_ranges_of(*rev_nat_id, keep, report);
            let unused =
                !self.index.is_named(*rev_nat_id) && !keep.rev_nat_ids.contains(rev_nat_id);
            if unused && self.rev_nat.contains_key(rev_nat_id) {
                match self.datapath.delete_rev_nat(*rev_nat_id) {
                    Ok(()) => {
                        self.rev_nat.remove(rev_nat_id);
                        report.rev_nats_deleted += 1;
                    }
                    Err(err) => report.failed_deletes.push(err),
                }
            }
        }
        for (rev_nat_id, frontend) in &held.rev_nat {
            let still_used = keep.rev_nat_ids.contains(rev_nat_id)
                || self.index.is_named(*rev_nat_id)
                || self.rev_nat.contains_key(rev_nat_id)
                || self.source_ranges_of(*rev_nat_id).next().is_some();
            if !still_used && self.rev_nat_ids.get(frontend) == Some(*rev_nat_id) {
                self.rev_nat_ids.release(frontend);
            }
        }
        for pair in &held.affinity_match {
            if keep.affinity_match.contains(pair) {
                continue;
            }
            match self.datapath.delete_affinity_match(pair) {
                Ok(()) => {
                    self.affinity_match.remove(pair);
                    self.index.remove_affinity(pair);
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
        for backend_id in &held.backend_ids {
            if self.index.is_referenced(*backend_id) || keep.backend_ids.contains(backend_id) {
                continue;
            }
            let Some(backend) = self.backends.get(backend_id).copied() else {
                continue;
            };
            match self.datapath.delete_backend(*backend_id) {
                Ok(()) => {
                    self.backends.remove(backend_id);
                    self.backend_ids.release(&backend);
                    report.backends_deleted += 1;
                    report
                        .removed_backends
                        .extend(codec::backend_addr(&backend));
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    /// Rule 15, as in a full sync: a range not wanted goes once no master
    /// checks it or its frontend was written with its new ranges.
    fn delete_unused_source_ranges_of(
        &mut self,
        rev_nat_id: u32,
        keep: &Wanted,
        report: &mut SyncReport,
    ) {
        let removable =
            keep.settled_rev_nat_ids.contains(&rev_nat_id) || !self.index.is_named(rev_nat_id);
        if !removable {
            return;
        }
        let gone: Vec<_> = self
            .source_ranges_of(rev_nat_id)
            .filter(|range| !keep.source_ranges.contains(range))
            .copied()
            .collect();
        self.delete_source_ranges(gone, report);
    }

    fn source_ranges_of(
        &self,
        rev_nat_id: u32,
    ) -> impl Iterator<Item = &codec::SourceRangeEntry> + '_ {
        self.source_ranges
            .range(codec::SourceRangeEntry::new(rev_nat_id, Default::default())..)
            .take_while(move |range| range.rev_nat_id == rev_nat_id)
    }
}

#[cfg(test)]
mod tests;
