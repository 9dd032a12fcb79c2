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

use super::{
    ClusterSnapshot, DesiredState, Frontend, HealthCheck, ObjectKey, ServicePortName,
    ServicePortPlan,
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

#[derive(Default)]
pub struct Planner {
    /// The last snapshot applied; `None` before the first.
    last: Option<ClusterSnapshot>,
    node: NodeView,
    /// Slices by the Service they name (rule 5).
    slices_of: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// The service ports each Service planned.
    ports_of: BTreeMap<ObjectKey, Vec<ServicePortName>>,
    /// Each service port's plan before frontend conflicts are settled.
    unsettled: BTreeMap<ServicePortName, ServicePortPlan>,
    /// The service ports that claim each frontend; the first keeps it.
    claims: BTreeMap<Frontend, BTreeSet<ServicePortName>>,
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

    /// Brings the desired state to `snapshot`'s.
    pub fn apply(&mut self, snapshot: ClusterSnapshot) -> PlanChange {
        let node = NodeView::of(&snapshot);
        let mut change = PlanChange::default();
        let first = self.last.is_none();
        let previous = self.last.take().unwrap_or_default();
        let mut services = changed_keys(&previous.services, &snapshot.services);
        change.services_changed = services.len() as u64;
        let slices = changed_keys(&previous.slices, &snapshot.slices);
        change.slices_changed = slices.len() as u64;
        for key in &slices {
            for slice in [previous.slices.get(key), snapshot.slices.get(key)]
                .into_iter()
                .flatten()
            {
                let service = slice.service_key();
                services.insert(service.clone());
                self.slices_of
                    .entry(service)
                    .or_default()
                    .remove(&slice.key);
            }
            if let Some(slice) = snapshot.slices.get(key) {
                self.slices_of
                    .entry(slice.service_key())
                    .or_default()
                    .insert(key.clone());
            }
        }
        self.slices_of.retain(|_, slices| !slices.is_empty());
        if first || node != self.node {
            change.everything = true;
            services = previous
                .services
                .keys()
                .chain(snapshot.services.keys())
                .cloned()
                .collect();
            self.node = node;
        }
        for key in &services {
            self.replan(key, &previous, &snapshot, &mut change);
        }
        self.settle(&mut change);
        self.last = Some(snapshot);
        change
    }

    /// Plans one Service again (or forgets it), recording what it claims.
    fn replan(
        &mut self,
        key: &ObjectKey,
        previous: &ClusterSnapshot,
        snapshot: &ClusterSnapshot,
        change: &mut PlanChange,
    ) {
        for name in self.ports_of.remove(key).unwrap_or_default() {
            if let Some(plan) = self.unsettled.remove(&name) {
                for frontend_plan in &plan.frontends {
                    self.unclaim(frontend_plan.frontend, &name, change);
                }
            }
            change.ports.insert(name);
        }
        let old_cluster_ip = previous.services.get(key).map(|old| old.cluster_ip);
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
        let mut names = Vec::with_capacity(plan.ports.len());
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
        claimants.insert(name.clone());
        if claimants.len() > 1 {
            self.contested.insert(frontend);
            change.ports.extend(claimants.iter().cloned());
        }
    }

    fn unclaim(&mut self, frontend: Frontend, name: &ServicePortName, change: &mut PlanChange) {
        let Some(claimants) = self.claims.get_mut(&frontend) else {
            return;
        };
        claimants.remove(name);
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
            let settled = self.unsettled.get(&name).map(|plan| {
                let mut settled = plan.clone();
                settled
                    .frontends
                    .retain(|frontend_plan| self.keeps(&frontend_plan.frontend, &name));
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

/// Keys added, removed or whose object differs; an object shared with the
/// previous snapshot is not compared.
fn changed_keys<T: PartialEq>(
    before: &BTreeMap<ObjectKey, Arc<T>>,
    after: &BTreeMap<ObjectKey, Arc<T>>,
) -> BTreeSet<ObjectKey> {
    let differs = |a: &Arc<T>, b: &Arc<T>| !Arc::ptr_eq(a, b) && a != b;
    let changed_or_removed = before
        .iter()
        .filter(|(key, old)| after.get(*key).is_none_or(|new| differs(old, new)));
    let added = after.iter().filter(|(key, _)| !before.contains_key(*key));
    changed_or_removed
        .chain(added)
        .map(|(key, _)| key.clone())
        .collect()
}

#[cfg(test)]
mod tests;
