//! The reconciler: the only writer of the maps. It diffs the desired state
//! against what the maps hold and writes in an order that never exposes a
//! half-written service:
//!
//! 1. backends that are new,
//! 2. rev-NAT entries and source ranges that are new,
//! 3. affinity-match pairs that are new,
//! 4. Maglev tables that are new or whose backends changed, each swapped
//!    in whole,
//! 5. per frontend and scope: changed slots, then the master entry (its
//!    count), then slots beyond the new count,
//! 6. the ClusterIP wildcard entries of rule 9 (port 0, no slots),
//! 7. masters that are gone (master first, then slots), and slots beyond
//!    their master's count (left by a crash between the two),
//! 8. Maglev tables no master uses any more,
//! 9. source ranges and rev-NAT entries no master uses any more,
//! 10. affinity-match pairs and backends nothing refers to any more.
//!
//! A frontend has up to two masters, both carrying its rev-NAT id: the
//! internal scope, from its `internal` selection, for clients on this node
//! (socket level), and the external scope, from its `external` selection,
//! for packets from outside the node (tc). An external master with
//! backends has a Maglev table under its service-port id and selection,
//! shared by the port's frontends that select the same backends.
//!
//! It starts from what the pinned maps already hold, so a restarted agent
//! keeps every id (backend, service-port and rev-NAT ids) and rewrites
//! nothing that is already right, except the Maglev tables, which it
//! rebuilds once (from the same backends: the same tables): running
//! traffic does not notice the restart.

mod ids;
mod incremental;
mod index;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use proxy_common::{
    AffinityMatchKey, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, map_names, scope,
    service_flags,
};

use crate::{
    maps::{Capacity, Datapath, DatapathError, codec, codec::SourceRangeEntry},
    model::{
        BackendAddr, DesiredState, Frontend, FrontendPlan, Protocol, Selection, ServicePortName,
        ServicePortPlan, WhenEmpty,
        maglev::{self, TableSize},
    },
};
use ids::{IdAllocator, IdTable};

use crate::collections::Compact;
use index::Index;

/// The maps the reconciler writes (the datapath writes the others).
pub const MAPS_WRITTEN: [&str; 6] = [
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::REV_NAT,
    map_names::SOURCE_RANGES,
    map_names::AFFINITY_MATCH,
    map_names::MAGLEV,
];

/// What a sync changed, for logs and metrics.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Frontends one of whose masters was written.
    pub frontends_written: usize,
    /// Masters deleted (a frontend has one per scope).
    pub frontends_deleted: usize,
    pub backends_added: usize,
    pub backends_deleted: usize,
    /// The addresses of the deleted backends: sockets still connected to
    /// them are stale (rule 30).
    pub removed_backends: Vec<BackendAddr>,
    pub rev_nats_written: usize,
    pub rev_nats_deleted: usize,
    pub source_ranges_written: usize,
    pub source_ranges_deleted: usize,
    pub maglev_tables_written: usize,
    pub maglev_tables_deleted: usize,
    /// Rule 9 wildcard entries (one per ClusterIP and protocol).
    pub wildcards_written: usize,
    /// Wildcards gone, or given up to make room for a service port.
    pub wildcards_deleted: usize,
    /// Service ports whose update failed; they keep what they had and are
    /// retried on the next sync.
    pub failed: Vec<(ServicePortName, DatapathError)>,
    /// ClusterIPs whose wildcard entry could not be written; retried on the
    /// next sync.
    pub failed_wildcards: Vec<(Ipv4Addr, DatapathError)>,
    /// Deletes that failed; retried on the next sync.
    pub failed_deletes: Vec<DatapathError>,
    /// Service ports too large for the room left in the maps, also after
    /// this sync's deletes: nothing of them was written (what they had
    /// stays). Not retried at once (that cannot make room), but at the next
    /// sync: the next change or resync.
    pub over_capacity: Vec<(ServicePortName, OverCapacity)>,
    /// Rule 9 entries not programmed because the services map is full:
    /// service ports come first.
    pub wildcards_over_capacity: usize,
}

impl SyncReport {
    /// Logs what failed, what found no room, and one summary line.
    pub fn log(&self, service_ports: usize) {
        for (port, err) in &self.failed {
            tracing::error!(service_port = %port, error = %err, "programming failed; keeps its previous state, retrying");
        }
        if !self.over_capacity.is_empty() || self.wildcards_over_capacity > 0 {
            let examples: Vec<String> = self
                .over_capacity
                .iter()
                .take(3)
                .map(|(port, over)| format!("{port} ({over})"))
                .collect();
            tracing::error!(
                service_ports = self.over_capacity.len(),
                cluster_ip_wildcards = self.wildcards_over_capacity,
                examples = %examples.join("; "),
                "not programmed: the maps have no room left"
            );
        }
        for (cluster_ip, err) in &self.failed_wildcards {
            tracing::error!(%cluster_ip, error = %err, "refusing undefined ports failed; retrying");
        }
        for err in &self.failed_deletes {
            tracing::error!(error = %err, "delete failed; retrying");
        }
        tracing::info!(
            service_ports,
            frontends_written = self.frontends_written,
            frontends_deleted = self.frontends_deleted,
            backends_added = self.backends_added,
            backends_deleted = self.backends_deleted,
            source_ranges_written = self.source_ranges_written,
            source_ranges_deleted = self.source_ranges_deleted,
            maglev_tables_written = self.maglev_tables_written,
            maglev_tables_deleted = self.maglev_tables_deleted,
            complete = self.is_complete(),
            "synced"
        );
    }
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
            && self.writes() == 0
    }

    fn writes(&self) -> usize {
        self.frontends_written
            + self.frontends_deleted
            + self.backends_added
            + self.backends_deleted
            + self.rev_nats_written
            + self.rev_nats_deleted
            + self.source_ranges_written
            + self.source_ranges_deleted
            + self.maglev_tables_written
            + self.maglev_tables_deleted
            + self.wildcards_written
            + self.wildcards_deleted
    }

    /// This report followed by `next`, a later pass of the same sync:
    /// counts add up, what is still refused or failing is `next`'s.
    fn then(self, next: SyncReport) -> SyncReport {
        SyncReport {
            frontends_written: self.frontends_written + next.frontends_written,
            frontends_deleted: self.frontends_deleted + next.frontends_deleted,
            backends_added: self.backends_added + next.backends_added,
            backends_deleted: self.backends_deleted + next.backends_deleted,
            removed_backends: [self.removed_backends, next.removed_backends].concat(),
            rev_nats_written: self.rev_nats_written + next.rev_nats_written,
            rev_nats_deleted: self.rev_nats_deleted + next.rev_nats_deleted,
            source_ranges_written: self.source_ranges_written + next.source_ranges_written,
            source_ranges_deleted: self.source_ranges_deleted + next.source_ranges_deleted,
            maglev_tables_written: self.maglev_tables_written + next.maglev_tables_written,
            maglev_tables_deleted: self.maglev_tables_deleted + next.maglev_tables_deleted,
            wildcards_written: self.wildcards_written + next.wildcards_written,
            wildcards_deleted: self.wildcards_deleted + next.wildcards_deleted,
            ..next
        }
    }
}

/// Whether the socket level programs a frontend (its internal scope). A
/// LoadBalancer IP with source ranges is left alone: at `connect()` the
/// socket has no source address yet, so the ranges cannot be checked, and
/// translating would let every pod through (rule 15). Its traffic goes to
/// the balancer, which enforces them.
fn is_socket_frontend(frontend_plan: &FrontendPlan) -> bool {
    frontend_plan.source_ranges.is_empty()
}

/// One master entry a service port programs: a frontend in one scope.
struct MasterPlan<'a> {
    frontend_plan: &'a FrontendPlan,
    scope: u8,
    selection: &'a Selection,
}

impl MasterPlan<'_> {
    fn frontend(&self) -> &Frontend {
        &self.frontend_plan.frontend
    }

    fn key(&self) -> ServiceKey {
        codec::service_key(self.frontend(), self.scope, 0)
    }

    /// Rule 15: only packets from outside are checked against the ranges
    /// (a frontend with ranges has no internal master).
    fn source_ranges(&self) -> &[ipnet::Ipv4Net] {
        match self.scope {
            scope::EXTERNAL => &self.frontend_plan.source_ranges,
            _ => &[],
        }
    }
}

/// The masters of a plan, per frontend in order: the internal scope of
/// every socket-level frontend, the external scope of every frontend
/// reachable from outside (NodePorts, externalIPs and LoadBalancer IPs,
/// with source ranges or not).
fn masters(plan: &ServicePortPlan) -> Vec<MasterPlan<'_>> {
    plan.frontends
        .iter()
        .flat_map(|frontend_plan| {
            let internal = is_socket_frontend(frontend_plan).then_some(MasterPlan {
                frontend_plan,
                scope: scope::INTERNAL,
                selection: &frontend_plan.internal,
            });
            let external = frontend_plan.external.as_ref().map(|selection| MasterPlan {
                frontend_plan,
                scope: scope::EXTERNAL,
                selection,
            });
            internal.into_iter().chain(external)
        })
        .collect()
}

/// A backend as the port's slots refer to it: local or not (rule 6).
fn port_backend(plan: &ServicePortPlan, backend: &BackendAddr) -> Backend {
    codec::backend(backend, plan.local_backends.binary_search(backend).is_ok())
}

/// Entries one service port wants, with ids resolved.
struct PortEntries<'a> {
    name: &'a ServicePortName,
    plan: &'a ServicePortPlan,
    svc_id: u32,
    masters: Vec<MasterPlan<'a>>,
    /// Every backend one of `masters` selects, with its id.
    backend_ids: IdTable<BackendAddr>,
    /// The rev-NAT id of every frontend of `masters`.
    rev_nat_ids: IdTable<Frontend>,
}

impl PortEntries<'_> {
    /// The backend ids of a selection, in slot order.
    fn slots(&self, selection: &Selection) -> Vec<u32> {
        selection
            .backends
            .iter()
            .map(|backend| self.backend_ids[backend])
            .collect()
    }

    /// The distinct backend sets the port's masters select, internal
    /// scopes first (in frontend order), then external ones; a master's
    /// selection is its set's index. Masters share affinity exactly when
    /// they share a set (rules 19, 23), whatever their scope.
    fn selections(&self) -> Vec<&[BackendAddr]> {
        let mut selections: Vec<&[BackendAddr]> = Vec::new();
        for wanted_scope in [scope::INTERNAL, scope::EXTERNAL] {
            for master in self.masters.iter().filter(|m| m.scope == wanted_scope) {
                let backends = master.selection.backends.as_slice();
                if !selections.contains(&backends) {
                    selections.push(backends);
                }
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

    /// Rule 23: every (backend, selection) the port's masters select.
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

    fn rev_nat_id(&self, frontend: &Frontend) -> u32 {
        self.rev_nat_ids[frontend]
    }

    /// The rev-NAT entry of every frontend the port programs.
    fn rev_nats(&self) -> impl Iterator<Item = (u32, RevNat)> + '_ {
        self.rev_nat_ids
            .iter()
            .map(|(frontend, id)| (*id, codec::rev_nat(frontend)))
    }

    /// Rule 15: the source ranges of the port's external masters.
    fn source_ranges(&self) -> impl Iterator<Item = SourceRangeEntry> + '_ {
        self.masters.iter().flat_map(|master| {
            let rev_nat_id = self.rev_nat_id(master.frontend());
            master
                .source_ranges()
                .iter()
                .map(move |cidr| SourceRangeEntry::new(rev_nat_id, *cidr))
        })
    }

    /// The Maglev table of every external master with backends, under
    /// the key the master carries; frontends that select the same backends
    /// share one.
    fn maglev_tables(&self, size: TableSize) -> BTreeMap<MaglevKey, MaglevBuild> {
        self.masters
            .iter()
            .filter(|master| master.scope == scope::EXTERNAL)
            .filter(|master| !master.selection.backends.is_empty())
            .map(|master| {
                let key = MaglevKey {
                    svc_id: self.svc_id,
                    selection: u32::from(self.selection_of(master.selection)),
                };
                let backend_ids = master
                    .selection
                    .backends
                    .iter()
                    .map(|backend| (*backend, self.backend_ids[backend]))
                    .collect();
                (key, MaglevBuild { size, backend_ids })
            })
            .collect()
    }

    fn master_value(&self, master: &MasterPlan<'_>, count: u16) -> ServiceValue {
        let mut flags = match master.selection.when_empty {
            WhenEmpty::Drop => service_flags::DROP_WHEN_EMPTY,
            WhenEmpty::Reject => 0,
        };
        if !master.source_ranges().is_empty() {
            flags |= service_flags::SOURCE_RANGES;
        }
        ServiceValue {
            count,
            flags,
            selection: self.selection_of(master.selection),
            svc_id: self.svc_id,
            affinity_timeout: self.plan.affinity_timeout.unwrap_or(0),
            rev_nat_id: self.rev_nat_id(master.frontend()),
            ..ServiceValue::slot(0)
        }
    }
}

/// What a Maglev table was built from; it is rebuilt when any of it
/// changes (a backend's id changes with its local flag).
#[derive(Clone, Debug, PartialEq, Eq)]
struct MaglevBuild {
    size: TableSize,
    backend_ids: IdTable<BackendAddr>,
}

impl MaglevBuild {
    /// The table as the map holds it ([`codec::maglev_table`]).
    fn table(&self) -> Vec<u32> {
        let backends: Vec<BackendAddr> = self.backend_ids.keys().copied().collect();
        let ids: Vec<u32> = maglev::table(&backends, self.size)
            .iter()
            .map(|backend| self.backend_ids[backend])
            .collect();
        codec::maglev_table(&ids)
    }
}

/// New entries a service port adds to each map.
struct Needs {
    backends: usize,
    services: usize,
    rev_nat: usize,
    source_ranges: usize,
    affinity_match: usize,
    maglev_tables: usize,
}

pub struct Reconciler<D: Datapath> {
    datapath: D,
    /// Mirror of the maps: what was read at start plus every write since.
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    rev_nat: BTreeMap<u32, RevNat>,
    source_ranges: BTreeSet<SourceRangeEntry>,
    affinity_match: BTreeSet<AffinityMatchKey>,
    /// The Maglev tables held and what each was built from; `None` for a
    /// table held since before this agent started (rebuilt once).
    maglev: BTreeMap<MaglevKey, Option<MaglevBuild>>,
    maglev_table_size: TableSize,
    backend_ids: IdAllocator<Backend>,
    svc_ids: IdAllocator<ServicePortName>,
    rev_nat_ids: IdAllocator<Frontend>,
    index: Index,
    /// Service ports the last sync refused for room: every later sync
    /// tries them again, as deletes may have made room.
    refused: BTreeSet<ServicePortName>,
    /// The last sync left something undone (a failed write or delete, a
    /// wildcard without room): the next one is a full sync.
    needs_full_sync: bool,
}

impl<D: Datapath> Reconciler<D> {
    /// Reads back what the maps hold, so ids survive agent restarts.
    pub fn new(datapath: D) -> Result<Self, DatapathError> {
        let services: BTreeMap<_, _> = datapath.services()?.into_iter().collect();
        let backends: BTreeMap<_, _> = datapath.backends()?.into_iter().collect();
        let rev_nat: BTreeMap<_, _> = datapath.rev_nats()?.into_iter().collect();
        let source_ranges: BTreeSet<_> = datapath.source_ranges()?.into_iter().collect();
        let affinity_match = datapath.affinity_matches()?.into_iter().collect();
        let maglev = datapath
            .maglev_tables()?
            .into_iter()
            .map(|key| (key, None))
            .collect();
        let mut backend_ids = IdAllocator::default();
        for (id, backend) in &backends {
            backend_ids.restore(*backend, *id);
        }
        let mut svc_ids = IdAllocator::default();
        let mut rev_nat_ids = IdAllocator::default();
        // Id 0 is "none": the rule 9 wildcards carry it.
        for (key, master) in services.iter().filter(|(key, _)| key.slot == 0) {
            if master.svc_id != 0 {
                svc_ids.reserve(master.svc_id);
            }
            if master.rev_nat_id != 0 {
                match codec::frontend(key) {
                    Some(frontend) => rev_nat_ids.restore(frontend, master.rev_nat_id),
                    None => rev_nat_ids.reserve(master.rev_nat_id),
                }
            }
        }
        // Ids of entries no master names are not handed out before the
        // delete phase removes the entries.
        for id in rev_nat
            .keys()
            .copied()
            .chain(source_ranges.iter().map(|range| range.rev_nat_id))
        {
            rev_nat_ids.reserve(id);
        }
        let index = Index::of(&services, [], &affinity_match);
        Ok(Self {
            datapath,
            index,
            refused: BTreeSet::new(),
            needs_full_sync: false,
            services,
            backends,
            rev_nat,
            source_ranges,
            affinity_match,
            maglev,
            maglev_table_size: TableSize::default(),
            backend_ids,
            svc_ids,
            rev_nat_ids,
        })
    }

    /// Replaces the mirror with what the maps hold now, so the next sync
    /// puts back entries deleted or changed by anyone else (self-repair).
    /// Ids stay those handed out; ids the maps hold for entries not known
    /// are reserved until the sync deletes those entries. A Maglev table
    /// is known by its key only: one rewritten in place is not noticed.
    pub fn reread(&mut self) -> Result<(), DatapathError> {
        let services = self.datapath.services()?;
        let backends = self.datapath.backends()?;
        let rev_nat = self.datapath.rev_nats()?;
        let source_ranges = self.datapath.source_ranges()?;
        let affinity_match = self.datapath.affinity_matches()?;
        let maglev_keys = self.datapath.maglev_tables()?;
        for (id, _) in &backends {
            self.backend_ids.reserve(*id);
        }
        for (_, master) in services.iter().filter(|(key, _)| key.slot == 0) {
            if master.svc_id != 0 {
                self.svc_ids.reserve(master.svc_id);
            }
            if master.rev_nat_id != 0 {
                self.rev_nat_ids.reserve(master.rev_nat_id);
            }
        }
        for id in rev_nat
            .iter()
            .map(|(id, _)| *id)
            .chain(source_ranges.iter().map(|range| range.rev_nat_id))
        {
            self.rev_nat_ids.reserve(id);
        }
        // In place, and the index with it: a resync that finds the maps as
        // they were allocates nothing beyond the entries just read, one
        // block per map (a rebuilt mirror would leave the old one's memory
        // as holes between what stays).
        let maglev_held = self.maglev.len() == maglev_keys.len()
            && maglev_keys.iter().all(|key| self.maglev.contains_key(key));
        if !maglev_held {
            self.maglev = maglev_keys
                .into_iter()
                .map(|key| (key, self.maglev.remove(&key).flatten()))
                .collect();
        }
        let index = &mut self.index;
        refresh(&mut self.services, services, |key, old, new| {
            if let Some(old) = old {
                index.remove_service(key, old);
            }
            if let Some(new) = new {
                index.add_service(key, new);
            }
        });
        refresh(&mut self.backends, backends, |_, _, _| {});
        refresh(&mut self.rev_nat, rev_nat, |_, _, _| {});
        refresh_set(&mut self.source_ranges, source_ranges, |_, _| {});
        refresh_set(&mut self.affinity_match, affinity_match, |pair, held| {
            if held {
                index.add_affinity(*pair);
            } else {
                index.remove_affinity(pair);
            }
        });
        if !maglev_held {
            self.index = Index::of(
                &self.services,
                self.maglev
                    .values()
                    .flatten()
                    .flat_map(|build| build.backend_ids.values().copied()),
                &self.affinity_match,
            );
        }
        Ok(())
    }

    /// Builds Maglev tables of `size` entries from now on (the default:
    /// [`TableSize::default`]); tables of another size are rebuilt.
    pub fn with_maglev_table_size(mut self, size: TableSize) -> Self {
        self.maglev_table_size = size;
        self
    }

    pub fn datapath(&self) -> &D {
        &self.datapath
    }

    /// Entries of each map the reconciler writes, from its mirror of them:
    /// what `/metrics` shows without walking the maps.
    pub fn entries(&self) -> [(&'static str, u64); MAPS_WRITTEN.len()] {
        let counts = [
            self.services.len(),
            self.backends.len(),
            self.rev_nat.len(),
            self.source_ranges.len(),
            self.affinity_match.len(),
            self.maglev.len(),
        ];
        std::array::from_fn(|i| (MAPS_WRITTEN[i], counts[i] as u64))
    }

    /// Number of frontends (with a master in either scope; wildcards are
    /// not frontends) the maps hold.
    pub fn frontend_count(&self) -> usize {
        self.services
            .keys()
            .filter(|key| key.slot == 0 && !codec::is_cluster_ip_wildcard(key))
            .map(|key| (key.addr, key.port, key.proto))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Makes the maps equal to `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let report = self.sync_pass(desired);
        // Deletes run last, so a port refused for room may fit once this
        // sync's deletes are done; it must not wait for the next change.
        let report =
            if report.over_capacity.is_empty() || !self.any_refused_port_fits(desired, &report) {
                report
            } else {
                let next = self.sync_pass(desired);
                report.then(next)
            };
        self.remember_unsettled(&report);
        if report.frontends_written + report.backends_added > 0 {
            self.compact();
        }
        report
    }

    /// After a full sync that wrote: see [`Compact`].
    fn compact(&mut self) {
        self.services.compact();
        self.backends.compact();
        self.rev_nat.compact();
        self.source_ranges.compact();
        self.affinity_match.compact();
        self.maglev.compact();
        self.backend_ids.compact();
        self.svc_ids.compact();
        self.rev_nat_ids.compact();
        self.index.compact();
    }

    fn any_refused_port_fits(&mut self, desired: &DesiredState, report: &SyncReport) -> bool {
        let evictable = self.index.wildcards.len();
        report.over_capacity.iter().any(|(name, _)| {
            let Some((name, plan)) = desired.ports.get_key_value(name) else {
                return false;
            };
            let port = self.resolve_port(name, plan);
            self.fits(&port, evictable).is_ok()
        })
    }

    fn sync_pass(&mut self, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        let entries = self.resolve_ids(desired);
        let mut keep = Wanted::of(
            &entries,
            cluster_ip_wildcards(desired.cluster_ips.iter()),
            self.maglev_table_size,
        );
        self.write_ports(&entries, desired, &mut keep, &mut report);
        self.delete_unwanted(&keep, &mut report);
        self.backend_ids
            .retain(|id| self.backends.contains_key(&id));
        self.svc_ids.retain(|id| keep.svc_ids.contains(&id));
        let held_rev_nat_ids = self.held_rev_nat_ids();
        self.rev_nat_ids
            .retain(|id| keep.rev_nat_ids.contains(&id) || held_rev_nat_ids.contains(&id));
        report
    }

    /// Ids a port's frontends use: service-port ids stay what their masters
    /// carry (restart), the others are fresh.
    fn resolve_ids<'a>(&mut self, desired: &'a DesiredState) -> Vec<PortEntries<'a>> {
        // New ports' ids first, then the entries: ids are kept and entries
        // freed after the sync, and allocating them in turn would leave the
        // entries' memory as holes between kept ids, which the allocator
        // cannot give back. A port with an id already (every one, at a
        // resync) allocates no ids.
        for (name, plan) in &desired.ports {
            if self.svc_ids.get(name).is_none() {
                self.resolve_port(name, plan);
            }
        }
        desired
            .ports
            .iter()
            .map(|(name, plan)| self.resolve_port(name, plan))
            .collect()
    }

    fn resolve_port<'a>(
        &mut self,
        name: &'a ServicePortName,
        plan: &'a ServicePortPlan,
    ) -> PortEntries<'a> {
        let masters = masters(plan);
        let existing = masters
            .iter()
            .find_map(|master| Some(self.services.get(&master.key())?.svc_id));
        let svc_id = self.svc_ids.id_for(name, existing);
        let backend_ids = masters
            .iter()
            .flat_map(|master| &master.selection.backends)
            .map(|backend| {
                let id = self.backend_ids.id_for(&port_backend(plan, backend), None);
                (*backend, id)
            })
            .collect();
        let rev_nat_ids = masters
            .iter()
            .map(|master| {
                let frontend = *master.frontend();
                (frontend, self.rev_nat_ids.id_for(&frontend, None))
            })
            .collect();
        PortEntries {
            name,
            plan,
            svc_id,
            masters,
            backend_ids,
            rev_nat_ids,
        }
    }

    /// Rule 9 entries the maps hold.
    fn held_wildcards(&self) -> Vec<ServiceKey> {
        self.index.wildcards.iter().copied().collect()
    }

    /// What `port` adds to each map, if that fits next to what the maps
    /// hold (with `evictable` rule 9 entries given up), checked before its
    /// first write: a port too large for the maps is refused whole and
    /// cannot crowd out the others.
    fn fits(&self, port: &PortEntries<'_>, evictable: usize) -> Result<Needs, OverCapacity> {
        let mut services = 0;
        for master in &port.masters {
            let backends = master.selection.backends.len();
            let Ok(count) = u16::try_from(backends) else {
                return Err(OverCapacity {
                    map: map_names::SERVICES,
                    needed: backends,
                    free: usize::from(u16::MAX),
                });
            };
            let key = master.key();
            services += (0..=count)
                .filter(|slot| !self.services.contains_key(&key.with_slot(*slot)))
                .count();
        }
        let needs = Needs {
            backends: port
                .backend_ids
                .values()
                .filter(|id| !self.backends.contains_key(id))
                .count(),
            services,
            rev_nat: port
                .rev_nat_ids
                .values()
                .filter(|id| !self.rev_nat.contains_key(id))
                .count(),
            source_ranges: port
                .source_ranges()
                .filter(|range| !self.source_ranges.contains(range))
                .count(),
            affinity_match: port
                .affinity_pairs()
                .iter()
                .filter(|pair| !self.affinity_match.contains(pair))
                .count(),
            maglev_tables: port
                .maglev_tables(self.maglev_table_size)
                .keys()
                .filter(|key| !self.maglev.contains_key(key))
                .count(),
        };
        let Capacity {
            services: services_max,
            backends: backends_max,
            rev_nat: rev_nat_max,
            source_ranges: source_ranges_max,
            affinity_match: affinity_match_max,
            maglev_tables: maglev_tables_max,
        } = self.datapath.capacity();
        for (map, needed, held, max) in [
            (
                map_names::BACKENDS,
                needs.backends,
                self.backends.len(),
                backends_max,
            ),
            (
                map_names::SERVICES,
                needs.services,
                self.services.len().saturating_sub(evictable),
                services_max,
            ),
            (
                map_names::REV_NAT,
                needs.rev_nat,
                self.rev_nat.len(),
                rev_nat_max,
            ),
            (
                map_names::SOURCE_RANGES,
                needs.source_ranges,
                self.source_ranges.len(),
                source_ranges_max,
            ),
            (
                map_names::AFFINITY_MATCH,
                needs.affinity_match,
                self.affinity_match.len(),
                affinity_match_max,
            ),
            (
                map_names::MAGLEV,
                needs.maglev_tables,
                self.maglev.len(),
                maglev_tables_max,
            ),
        ] {
            let free = max.saturating_sub(held);
            if needed > free {
                return Err(OverCapacity { map, needed, free });
            }
        }
        Ok(needs)
    }

    /// Writes every port that fits, then the wanted wildcards.
    fn write_ports(
        &mut self,
        entries: &[PortEntries<'_>],
        desired: &DesiredState,
        keep: &mut Wanted,
        report: &mut SyncReport,
    ) {
        let mut evictable = None;
        for port in entries {
            match self.fits(port, self.index.wildcards.len()) {
                Err(over) => report.over_capacity.push((port.name.clone(), over)),
                Ok(needs) => match self.write_port(port, &needs, &mut evictable, desired, report) {
                    Ok(()) => keep.settled(port),
                    Err(err) => report.failed.push((port.name.clone(), err)),
                },
            }
        }
        for key in &keep.wildcards {
            self.write_wildcard(*key, report);
        }
    }

    fn write_port(
        &mut self,
        port: &PortEntries<'_>,
        needs: &Needs,
        evictable: &mut Option<Vec<ServiceKey>>,
        desired: &DesiredState,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let capacity = self.datapath.capacity().services;
        while self.services.len() + needs.services > capacity {
            // Rule 9 is the first to give way when service ports need room,
            // wildcards no longer wanted before the others; listed only
            // when a port needs it.
            let order = evictable.get_or_insert_with(|| {
                let mut order = self.held_wildcards();
                order.sort_by_key(|key| {
                    let wanted = desired
                        .cluster_ips
                        .contains(&codec::addr_from_map(key.addr));
                    (!wanted, *key)
                });
                order
            });
            let Some(wildcard) = order.pop() else {
                break;
            };
            self.delete_service(wildcard)?;
            report.wildcards_deleted += 1;
        }
        for (addr, id) in port.backend_ids.iter() {
            let backend = port_backend(port.plan, addr);
            if self.backends.get(id) != Some(&backend) {
                self.datapath.put_backend(*id, backend)?;
                self.backends.insert(*id, backend);
                report.backends_added += 1;
            }
        }
        for (id, rev_nat) in port.rev_nats() {
            if self.rev_nat.get(&id) != Some(&rev_nat) {
                self.datapath.put_rev_nat(id, rev_nat)?;
                self.rev_nat.insert(id, rev_nat);
                report.rev_nats_written += 1;
            }
        }
        for range in port.source_ranges() {
            if !self.source_ranges.contains(&range) {
                self.datapath.put_source_range(range)?;
                self.source_ranges.insert(range);
                report.source_ranges_written += 1;
            }
        }
        for pair in port.affinity_pairs() {
            if !self.affinity_match.contains(&pair) {
                self.datapath.put_affinity_match(pair)?;
                self.affinity_match.insert(pair);
                self.index.add_affinity(pair);
            }
        }
        for (key, build) in port.maglev_tables(self.maglev_table_size) {
            if self.maglev.get(&key).and_then(Option::as_ref) != Some(&build) {
                self.datapath.put_maglev_table(key, &build.table())?;
                self.set_maglev(key, Some(build));
                report.maglev_tables_written += 1;
            }
        }
        let mut written: BTreeSet<Frontend> = BTreeSet::new();
        for master in &port.masters {
            let slots = port.slots(master.selection);
            let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
            if self.write_master(master.key(), port.master_value(master, count), &slots)? {
                written.insert(*master.frontend());
            }
        }
        report.frontends_written += written.len();
        Ok(())
    }

    /// Rule 9: no slots, no service-port or rev-NAT id, count 0 (refuse).
    /// Skipped, like a port, when the services map has no room left.
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
            changed |=
                self.put_service(master_key.with_slot(slot), ServiceValue::slot(*backend_id))?;
        }
        let old_count = self.services.get(&master_key).map_or(0, |old| old.count);
        changed |= self.put_service(master_key, master)?;
        for slot in master.count.saturating_add(1)..=old_count {
            self.delete_service(master_key.with_slot(slot))?;
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
        if let Some(old) = self.services.insert(key, value) {
            self.index.remove_service(&key, &old);
        }
        self.index.add_service(&key, &value);
        Ok(true)
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), DatapathError> {
        self.datapath.delete_service(&key)?;
        if let Some(old) = self.services.remove(&key) {
            self.index.remove_service(&key, &old);
        }
        Ok(())
    }

    /// Records the Maglev table held under `key` (`None`: forgets it).
    fn set_maglev(&mut self, key: MaglevKey, build: Option<MaglevBuild>) {
        let backend_ids =
            |build: &MaglevBuild| build.backend_ids.values().copied().collect::<Vec<_>>();
        let old = match &build {
            Some(build) => {
                for id in backend_ids(build) {
                    self.index.add_backend_ref(id);
                }
                self.maglev.insert(key, Some(build.clone()))
            }
            None => self.maglev.remove(&key),
        };
        for id in old.flatten().as_ref().map(backend_ids).unwrap_or_default() {
            self.index.remove_backend_ref(id);
        }
    }

    /// Rev-NAT ids the maps still use: named by a master, or holding an
    /// entry or a source range.
    fn held_rev_nat_ids(&self) -> BTreeSet<u32> {
        self.master_rev_nat_ids()
            .into_iter()
            .chain(self.rev_nat.keys().copied())
            .chain(self.source_ranges.iter().map(|range| range.rev_nat_id))
            .collect()
    }

    fn master_rev_nat_ids(&self) -> BTreeSet<u32> {
        self.index.rev_nat_names.keys().copied().collect()
    }

    fn delete_unwanted(&mut self, keep: &Wanted, report: &mut SyncReport) {
        let gone_masters: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|key| {
                key.slot == 0 && !keep.masters.contains(*key) && !keep.wildcards.contains(*key)
            })
            .copied()
            .collect();
        for master in gone_masters {
            let count = self.services[&master].count;
            let deleted =
                (0..=count).try_for_each(|slot| self.delete_service(master.with_slot(slot)));
            match deleted {
                Ok(()) if codec::is_cluster_ip_wildcard(&master) => report.wildcards_deleted += 1,
                Ok(()) => report.frontends_deleted += 1,
                Err(err) => report.failed_deletes.push(err),
            }
        }
        // Slots no master counts: its master is gone (an interrupted
        // delete) or was shrunk before its tail was deleted (a crash in
        // between), both before a restart.
        let stray_slots: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|key| {
                key.slot != 0
                    && self
                        .services
                        .get(&key.with_slot(0))
                        .is_none_or(|master| key.slot > master.count)
            })
            .copied()
            .collect();
        for key in stray_slots {
            if let Err(err) = self.delete_service(key) {
                report.failed_deletes.push(err);
            }
        }
        self.delete_unused_maglev_tables(keep, report);
        self.delete_unused_source_ranges(keep, report);
        self.delete_unused_rev_nats(keep, report);
        let gone_pairs: Vec<AffinityMatchKey> = self
            .affinity_match
            .difference(&keep.affinity_match)
            .copied()
            .collect();
        for pair in gone_pairs {
            match self.datapath.delete_affinity_match(&pair) {
                Ok(()) => {
                    self.affinity_match.remove(&pair);
                    self.index.remove_affinity(&pair);
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
            .chain(
                self.maglev
                    .values()
                    .flatten()
                    .flat_map(|build| build.backend_ids.values().copied()),
            )
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
                    let removed = self.backends.remove(&id);
                    report.backends_deleted += 1;
                    report
                        .removed_backends
                        .extend(removed.as_ref().and_then(codec::backend_addr));
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    /// A table goes once no master with backends carries its key, unless
    /// this sync wants it (a port whose masters are not written yet).
    fn delete_unused_maglev_tables(&mut self, keep: &Wanted, report: &mut SyncReport) {
        let used: BTreeSet<MaglevKey> = self
            .services
            .iter()
            .filter(|(key, master)| {
                key.slot == 0 && key.scope == scope::EXTERNAL && master.count > 0
            })
            .map(|(_, master)| codec::maglev_key(master))
            .collect();
        let gone: Vec<MaglevKey> = self
            .maglev
            .keys()
            .filter(|key| !used.contains(key) && !keep.maglev_tables.contains(key))
            .copied()
            .collect();
        for key in gone {
            match self.datapath.delete_maglev_table(&key) {
                Ok(()) => {
                    self.set_maglev(key, None);
                    report.maglev_tables_deleted += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    /// Rule 15: a range not wanted any more goes once no master checks it:
    /// its frontend is gone, or was written with its new ranges. A master
    /// left as it was (its port refused or failed, or its delete failed)
    /// keeps the ranges it checks, so it never drops everyone.
    fn delete_unused_source_ranges(&mut self, keep: &Wanted, report: &mut SyncReport) {
        let checked = self.master_rev_nat_ids();
        let gone: Vec<SourceRangeEntry> = self
            .source_ranges
            .iter()
            .filter(|range| {
                !keep.source_ranges.contains(range)
                    && (keep.settled_rev_nat_ids.contains(&range.rev_nat_id)
                        || !checked.contains(&range.rev_nat_id))
            })
            .copied()
            .collect();
        self.delete_source_ranges(gone, report);
    }

    fn delete_source_ranges(&mut self, gone: Vec<SourceRangeEntry>, report: &mut SyncReport) {
        for range in gone {
            match self.datapath.delete_source_range(&range) {
                Ok(()) => {
                    self.source_ranges.remove(&range);
                    report.source_ranges_deleted += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    /// A rev-NAT entry goes with the last master that names it; replies of
    /// that frontend's tracked flows are no longer translated.
    fn delete_unused_rev_nats(&mut self, keep: &Wanted, report: &mut SyncReport) {
        let named = self.master_rev_nat_ids();
        let gone: Vec<u32> = self
            .rev_nat
            .keys()
            .filter(|id| !named.contains(id) && !keep.rev_nat_ids.contains(id))
            .copied()
            .collect();
        for id in gone {
            match self.datapath.delete_rev_nat(id) {
                Ok(()) => {
                    self.rev_nat.remove(&id);
                    report.rev_nats_deleted += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }
}

/// Rule 9: one wildcard per ClusterIP and protocol.
fn cluster_ip_wildcards<'a>(
    cluster_ips: impl Iterator<Item = &'a Ipv4Addr>,
) -> BTreeSet<ServiceKey> {
    cluster_ips
        .flat_map(|addr| {
            [Protocol::Tcp, Protocol::Udp]
                .map(|protocol| codec::cluster_ip_wildcard(*addr, protocol))
        })
        .collect()
}

/// Makes `mirror` hold exactly `now` (as read from a map, in any order),
/// telling `changed` each key whose value went (`old`) or came (`new`).
fn refresh<K: Ord + Copy, V: PartialEq + Copy>(
    mirror: &mut BTreeMap<K, V>,
    mut now: Vec<(K, V)>,
    mut changed: impl FnMut(&K, Option<&V>, Option<&V>),
) {
    now.sort_unstable_by_key(|(key, _)| *key);
    let gone: Vec<K> = mirror
        .keys()
        .filter(|key| now.binary_search_by(|(held, _)| held.cmp(key)).is_err())
        .copied()
        .collect();
    for key in gone {
        if let Some(old) = mirror.remove(&key) {
            changed(&key, Some(&old), None);
        }
    }
    for (key, value) in now {
        let old = mirror.insert(key, value);
        if old != Some(value) {
            changed(&key, old.as_ref(), Some(&value));
        }
    }
}

/// [`refresh`] for a set: `changed` gets each entry that came (`true`) or
/// went (`false`).
fn refresh_set<T: Ord + Copy>(
    mirror: &mut BTreeSet<T>,
    mut now: Vec<T>,
    mut changed: impl FnMut(&T, bool),
) {
    now.sort_unstable();
    let gone: Vec<T> = mirror
        .iter()
        .filter(|entry| now.binary_search(entry).is_err())
        .copied()
        .collect();
    for entry in gone {
        mirror.remove(&entry);
        changed(&entry, false);
    }
    for entry in now {
        if mirror.insert(entry) {
            changed(&entry, true);
        }
    }
}

/// What the desired state wants to survive the delete phase. A port whose
/// update failed keeps its old slots, and through them its backends: the
/// backend delete only removes ids no slot refers to.
struct Wanted {
    /// Frontend masters, both scopes.
    masters: BTreeSet<ServiceKey>,
    wildcards: BTreeSet<ServiceKey>,
    rev_nat_ids: BTreeSet<u32>,
    source_ranges: BTreeSet<SourceRangeEntry>,
    affinity_match: BTreeSet<AffinityMatchKey>,
    maglev_tables: BTreeSet<MaglevKey>,
    backend_ids: BTreeSet<u32>,
    svc_ids: BTreeSet<u32>,
    /// Rev-NAT ids of frontends this sync wrote as desired.
    settled_rev_nat_ids: BTreeSet<u32>,
}

impl Wanted {
    fn of(
        entries: &[PortEntries<'_>],
        wildcards: BTreeSet<ServiceKey>,
        maglev_table_size: TableSize,
    ) -> Self {
        let mut wanted = Wanted {
            masters: BTreeSet::new(),
            wildcards,
            rev_nat_ids: BTreeSet::new(),
            source_ranges: BTreeSet::new(),
            affinity_match: BTreeSet::new(),
            maglev_tables: BTreeSet::new(),
            backend_ids: BTreeSet::new(),
            svc_ids: BTreeSet::new(),
            settled_rev_nat_ids: BTreeSet::new(),
        };
        for port in entries {
            wanted.svc_ids.insert(port.svc_id);
            wanted
                .masters
                .extend(port.masters.iter().map(MasterPlan::key));
            wanted.rev_nat_ids.extend(port.rev_nat_ids.values());
            wanted.source_ranges.extend(port.source_ranges());
            wanted.backend_ids.extend(port.backend_ids.values());
            wanted.affinity_match.extend(port.affinity_pairs());
            wanted
                .maglev_tables
                .extend(port.maglev_tables(maglev_table_size).into_keys());
        }
        wanted
    }

    /// `port` was written whole.
    fn settled(&mut self, port: &PortEntries<'_>) {
        self.settled_rev_nat_ids
            .extend(port.rev_nat_ids.values().copied());
    }
}

#[cfg(test)]
mod tests;
