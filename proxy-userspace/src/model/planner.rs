//! The desired state kept up to date one snapshot at a time: a change
//! costs what it changes. Only the Services that differ (or whose slices
//! do) are planned again, and only the service ports they touch are handed
//! on; when this node's own facts change (name, zone, NodePort addresses),
//! every Service is. The result must equal [`desired_state`] of the same
//! snapshot: the tests below check that after random change sequences.
//!
//! [`desired_state`]: super::desired_state

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use smallvec::SmallVec;

use crate::collections::{Compact, insert_sorted, remove_sorted};

use super::{
    ClusterSnapshot, DesiredState, Frontend, FrontendPlan, HealthCheck, NodeInfo,
    NodePortAddresses, ObjectKey, ServiceInfo, ServicePortName, ServicePortPlan, SliceInfo,
    desired::{FrontendConflict, NodeView, service_plan},
};

/// What one [`Planner::apply`] changed in the desired state.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PlanChange {
    /// Every service port was planned again: the node's facts changed, or
    /// this is the first snapshot.
    pub everything: bool,
    /// Service ports whose plan was added, changed or removed.
    pub ports: BTreeSet<ServicePortName>,
    /// ClusterIPs that became or stopped being a proxied Service's (rule 9).
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    /// Whether any health check changed (rule 32).
    pub health_checks: bool,
    /// Services and EndpointSlices added, changed or removed.
    pub services_changed: u64,
    pub slices_changed: u64,
}

impl PlanChange {
    /// Nothing the datapath holds changed.
    pub fn is_empty(&self) -> bool {
        !self.everything && self.ports.is_empty() && self.cluster_ips.is_empty()
    }

    /// This change followed by `later`, as one.
    pub fn merge(&mut self, later: PlanChange) {
        self.everything |= later.everything;
        self.ports.extend(later.ports);
        self.cluster_ips.extend(later.cluster_ips);
        self.health_checks |= later.health_checks;
        self.services_changed += later.services_changed;
        self.slices_changed += later.slices_changed;
    }
}

/// Most Services have one slice and one port, and most frontends one
/// claimant: see [`crate::collections`].
type OneOrMore<T> = SmallVec<[T; 1]>;

#[derive(Default)]
pub struct Planner {
    /// The last snapshot applied; `None` before the first.
    last: Option<ClusterSnapshot>,
    node: NodeView,
    /// Slices by the Service they name (rule 5), sorted.
    slices_of: BTreeMap<ObjectKey, OneOrMore<ObjectKey>>,
    /// The service ports each Service planned.
    ports_of: BTreeMap<ObjectKey, OneOrMore<ServicePortName>>,
    /// The plan before frontend conflicts were settled, of each service
    /// port that lost a frontend to another (for the others, it is the
    /// desired one).
    unsettled: BTreeMap<ServicePortName, ServicePortPlan>,
    /// The service ports that claim each frontend, sorted; the first keeps
    /// it.
    claims: BTreeMap<Frontend, OneOrMore<ServicePortName>>,
    /// Frontends claimed more than once.
    contested: BTreeSet<Frontend>,
    /// How many Services use each ClusterIP.
    cluster_ip_users: BTreeMap<Ipv4Addr, usize>,
    health_checks: BTreeMap<ObjectKey, HealthCheck>,
    desired: DesiredState,
}

impl Planner {
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The snapshot the desired state was planned from.
    pub fn snapshot(&self) -> Option<&ClusterSnapshot> {
        self.last.as_ref()
    }

    /// Brings the desired state to `snapshot`'s: finds what differs from
    /// the last one (a walk of both), then plans that.
    pub fn apply(&mut self, snapshot: ClusterSnapshot) -> PlanChange {
        let changes = match &self.last {
            Some(last) => Changes::between(last, snapshot),
            None => Changes::everything_in(snapshot),
        };
        self.apply_changes(changes)
    }

    /// Applies `changes` to the last snapshot and plans what they touch:
    /// no walk of what did not change.
    pub fn apply_changes(&mut self, changes: Changes) -> PlanChange {
        let mut change = PlanChange::default();
        let first = self.last.is_none();
        let mut snapshot = self.last.take().unwrap_or_default();
        // The value each changed Service had before (first change wins).
        // The first snapshot plans everything and had nothing before: it
        // keeps no such record, which at 100k Services would be megabytes
        // freed right after, between the plans that stay.
        let mut before: BTreeMap<ObjectKey, Option<Arc<ServiceInfo>>> = BTreeMap::new();
        for (key, new) in changes.services {
            let old = put(&mut snapshot.services, key.clone(), new.clone());
            if !first && !same(&old, &new) {
                before.entry(key).or_insert(old);
            }
        }
        change.services_changed = if first {
            snapshot.services.len()
        } else {
            before.len()
        } as u64;
        let mut services: BTreeSet<ObjectKey> = before.keys().cloned().collect();
        for (key, new) in changes.slices {
            let old = put(&mut snapshot.slices, key.clone(), new.clone());
            if same(&old, &new) {
                continue;
            }
            change.slices_changed += 1;
            if let Some(old) = old {
                let service = old.service.clone();
                if let Some(slices) = self.slices_of.get_mut(&service) {
                    remove_sorted(slices, &key);
                    if slices.is_empty() {
                        self.slices_of.remove(&service);
                    }
                }
                services.insert(service);
            }
            if let Some(new) = new {
                let service = new.service.clone();
                insert_sorted(self.slices_of.entry(service.clone()).or_default(), key);
                if !first {
                    services.insert(service);
                }
            }
        }
        if let Some(node_name) = changes.node_name {
            snapshot.node_name = node_name;
        }
        if let Some(node) = changes.node {
            snapshot.node = node;
        }
        if let Some(addresses) = changes.local_addresses {
            snapshot.local_addresses = addresses;
        }
        if let Some(nodeport_addresses) = changes.nodeport_addresses {
            snapshot.nodeport_addresses = nodeport_addresses;
        }
        let node = NodeView::of(&snapshot);
        let replanned: Vec<ObjectKey> = if first || node != self.node {
            change.everything = true;
            self.node = node;
            // Every Service, and those just removed.
            let removed = services
                .iter()
                .filter(|key| !snapshot.services.contains_key(*key))
                .cloned();
            snapshot.services.keys().cloned().chain(removed).collect()
        } else {
            services.into_iter().collect()
        };
        for key in &replanned {
            let old = match before.get(key) {
                _ if first => None,
                Some(old) => old.as_deref(),
                None => snapshot.services.get(key).map(Arc::as_ref),
            };
            self.replan(key, old, &snapshot, &mut change);
        }
        self.settle(&mut change);
        if change.everything {
            snapshot.services.compact();
            snapshot.slices.compact();
            self.compact();
        }
        self.last = Some(snapshot);
        change
    }

    /// After planning everything: see [`Compact`].
    fn compact(&mut self) {
        self.slices_of.compact();
        self.ports_of.compact();
        self.claims.compact();
        self.cluster_ip_users.compact();
        self.health_checks.compact();
        self.desired.ports.compact();
        self.desired.cluster_ips.compact();
    }

    /// Plans one Service again (or forgets it), recording what it claims.
    fn replan(
        &mut self,
        key: &ObjectKey,
        old: Option<&ServiceInfo>,
        snapshot: &ClusterSnapshot,
        change: &mut PlanChange,
    ) {
        for name in self.ports_of.remove(key).unwrap_or_default() {
            let claimed: Vec<Frontend> = self
                .unsettled
                .remove(&name)
                .as_ref()
                .or_else(|| self.desired.ports.get(&name))
                .map(|plan| plan.frontends.iter().map(|f| f.frontend).collect())
                .unwrap_or_default();
            for frontend in claimed {
                self.unclaim(frontend, &name, change);
            }
            change.ports.insert(name);
        }
        let old_cluster_ip = old.map(|old| old.cluster_ip);
        let new_cluster_ip = snapshot.services.get(key).map(|new| new.cluster_ip);
        if old_cluster_ip != new_cluster_ip {
            if let Some(old) = old_cluster_ip {
                self.release_cluster_ip(old, change);
            }
            if let Some(new) = new_cluster_ip {
                self.use_cluster_ip(new, change);
            }
        }
        let had_health_check = self.health_checks.remove(key).is_some();
        change.health_checks |= had_health_check;
        let Some(service) = snapshot.services.get(key) else {
            return;
        };
        let slices: Vec<_> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice| snapshot.slices.get(slice).map(Arc::as_ref))
            .collect();
        let plan = service_plan(&self.node, service, &slices);
        let mut names = OneOrMore::with_capacity(plan.ports.len());
        for (name, port_plan) in plan.ports {
            for frontend_plan in &port_plan.frontends {
                self.claim(frontend_plan.frontend, &name, change);
            }
            change.ports.insert(name.clone());
            names.push(name.clone());
            self.unsettled.insert(name, port_plan);
        }
        self.ports_of.insert(key.clone(), names);
        if let Some(health_check) = plan.health_check {
            self.health_checks.insert(key.clone(), health_check);
            change.health_checks = true;
        }
    }

    fn use_cluster_ip(&mut self, cluster_ip: Ipv4Addr, change: &mut PlanChange) {
        let users = self.cluster_ip_users.entry(cluster_ip).or_default();
        *users += 1;
        if *users == 1 {
            change.cluster_ips.insert(cluster_ip);
        }
    }

    fn release_cluster_ip(&mut self, cluster_ip: Ipv4Addr, change: &mut PlanChange) {
        if let Some(users) = self.cluster_ip_users.get_mut(&cluster_ip) {
            *users -= 1;
            if *users == 0 {
                self.cluster_ip_users.remove(&cluster_ip);
                change.cluster_ips.insert(cluster_ip);
            }
        }
    }

    /// A frontend's claimants settle it again: every one of them is
    /// touched (the first may change).
    fn claim(&mut self, frontend: Frontend, name: &ServicePortName, change: &mut PlanChange) {
        let claimants = self.claims.entry(frontend).or_default();
        insert_sorted(claimants, name.clone());
        if claimants.len() > 1 {
            self.contested.insert(frontend);
            change.ports.extend(claimants.iter().cloned());
        }
    }

    fn unclaim(&mut self, frontend: Frontend, name: &ServicePortName, change: &mut PlanChange) {
        let Some(claimants) = self.claims.get_mut(&frontend) else {
            return;
        };
        remove_sorted(claimants, name);
        change.ports.extend(claimants.iter().cloned());
        match claimants.len() {
            0 => {
                self.claims.remove(&frontend);
            }
            1 => {
                self.contested.remove(&frontend);
            }
            _ => {}
        }
    }

    /// Writes the touched service ports into the desired state, each with
    /// the frontends it is the first claimant of; those whose plan came out
    /// as it was are no longer counted as touched.
    fn settle(&mut self, change: &mut PlanChange) {
        let touched = std::mem::take(&mut change.ports);
        for name in touched {
            // A replanned port's plan waits in `unsettled`; another touched
            // one (a frontend's claimants changed) has its desired plan.
            let planned = self.unsettled.remove(&name);
            let exists = self
                .ports_of
                .get(&name.service)
                .is_some_and(|names| names.contains(&name));
            let plan = match planned {
                Some(plan) if exists => Some(plan),
                _ if exists => self.desired.ports.get(&name).cloned(),
                _ => None,
            };
            let settled = plan.map(|plan| {
                let keeps =
                    |frontend_plan: &FrontendPlan| self.keeps(&frontend_plan.frontend, &name);
                if plan.frontends.iter().all(keeps) {
                    return plan;
                }
                let mut settled = plan.clone();
                settled.frontends.retain(keeps);
                self.unsettled.insert(name.clone(), plan);
                settled
            });
            if self.desired.ports.get(&name) == settled.as_ref() {
                continue;
            }
            match settled {
                Some(plan) => self.desired.ports.insert(name.clone(), plan),
                None => self.desired.ports.remove(&name),
            };
            change.ports.insert(name);
        }
        let mut conflicts = Vec::new();
        for frontend in &self.contested {
            let mut claimants = self.claims[frontend].iter();
            let Some(kept) = claimants.next() else {
                continue;
            };
            conflicts.extend(claimants.map(|dropped| FrontendConflict {
                frontend: *frontend,
                kept: kept.clone(),
                dropped: dropped.clone(),
            }));
        }
        conflicts.sort_by(|a, b| (&a.dropped, a.frontend).cmp(&(&b.dropped, b.frontend)));
        self.desired.conflicts = conflicts;
        for cluster_ip in &change.cluster_ips {
            if self.cluster_ip_users.contains_key(cluster_ip) {
                self.desired.cluster_ips.insert(*cluster_ip);
            } else {
                self.desired.cluster_ips.remove(cluster_ip);
            }
        }
        if change.health_checks {
            self.desired.health_checks = self.health_checks.values().cloned().collect();
        }
    }

    fn keeps(&self, frontend: &Frontend, name: &ServicePortName) -> bool {
        self.claims
            .get(frontend)
            .and_then(|claimants| claimants.first())
            == Some(name)
    }
}

/// What changed in a source's view of the cluster: each object added,
/// changed (`Some`) or removed (`None`), and this node's facts when they
/// changed. A source watching the API server sends these; a full snapshot
/// becomes one by [`Changes::between`].
#[derive(Debug, Default)]
pub struct Changes {
    pub services: Vec<(ObjectKey, Option<Arc<ServiceInfo>>)>,
    pub slices: Vec<(ObjectKey, Option<Arc<SliceInfo>>)>,
    pub node_name: Option<String>,
    /// This node's object (`Some(None)`: gone).
    pub node: Option<Option<NodeInfo>>,
    pub local_addresses: Option<Vec<Ipv4Addr>>,
    pub nodeport_addresses: Option<NodePortAddresses>,
}

impl Changes {
    /// Everything in `snapshot`, as changes to an empty one.
    pub fn everything_in(snapshot: ClusterSnapshot) -> Self {
        Self::between(&ClusterSnapshot::default(), snapshot)
    }

    /// What turns `before` into `after`; objects `after` shares with
    /// `before` are not compared.
    pub fn between(before: &ClusterSnapshot, after: ClusterSnapshot) -> Self {
        Self {
            services: differing(&before.services, &after.services),
            slices: differing(&before.slices, &after.slices),
            node_name: (before.node_name != after.node_name).then_some(after.node_name),
            node: (before.node != after.node).then_some(after.node),
            local_addresses: (before.local_addresses != after.local_addresses)
                .then_some(after.local_addresses),
            nodeport_addresses: (before.nodeport_addresses != after.nodeport_addresses)
                .then_some(after.nodeport_addresses),
        }
    }
}

/// Objects added, removed or whose value differs, with their new value.
fn differing<T: PartialEq>(
    before: &BTreeMap<ObjectKey, Arc<T>>,
    after: &BTreeMap<ObjectKey, Arc<T>>,
) -> Vec<(ObjectKey, Option<Arc<T>>)> {
    let changed_or_removed = before.iter().filter_map(|(key, old)| match after.get(key) {
        Some(new) if equal(old, new) => None,
        new => Some((key.clone(), new.cloned())),
    });
    let added = after
        .iter()
        .filter(|(key, _)| !before.contains_key(*key))
        .map(|(key, new)| (key.clone(), Some(new.clone())));
    changed_or_removed.chain(added).collect()
}

/// Whether two versions of an object are equal; one allocation shared by
/// both is not compared.
fn equal<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// [`equal`], where `None` is an absent object.
fn same<T: PartialEq>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => equal(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Puts `value` under `key` (`None`: removes it); the value it replaced.
fn put<T>(
    map: &mut BTreeMap<ObjectKey, Arc<T>>,
    key: ObjectKey,
    value: Option<Arc<T>>,
) -> Option<Arc<T>> {
    match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    }
}

#[cfg(test)]
mod tests;
