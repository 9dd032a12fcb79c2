use super::*;
use crate::model::{
    ServiceInfo, SliceInfo, desired_state,
    fixtures::{self, Rng, random_change},
};

/// The ports, ClusterIPs and health checks that differ between two
/// desired states.
fn differences(
    before: &DesiredState,
    after: &DesiredState,
) -> (BTreeSet<ServicePortName>, BTreeSet<Ipv4Addr>, bool) {
    let ports = before
        .ports
        .keys()
        .chain(after.ports.keys())
        .filter(|name| before.ports.get(*name) != after.ports.get(*name))
        .cloned()
        .collect();
    let cluster_ips = before
        .cluster_ips
        .symmetric_difference(&after.cluster_ips)
        .copied()
        .collect();
    (
        ports,
        cluster_ips,
        before.health_checks != after.health_checks,
    )
}

#[test]
fn incremental_plans_equal_full_plans_after_random_changes() {
    for seed in 0..60 {
        let mut rng = Rng::new(seed);
        let mut snapshot = fixtures::snapshot();
        let mut planner = Planner::default();
        let mut before = DesiredState::default();
        for step in 0..120 {
            random_change(&mut rng, &mut snapshot);
            let change = planner.apply(snapshot.clone());
            let full = desired_state(&snapshot);
            assert_eq!(planner.desired(), &full, "seed {seed}, step {step}");
            if !change.everything {
                let (ports, cluster_ips, health_checks) = differences(&before, &full);
                assert!(
                    ports.is_subset(&change.ports),
                    "seed {seed}, step {step}: {:?} changed, {:?} named",
                    ports,
                    change.ports
                );
                assert!(
                    cluster_ips.is_subset(&change.cluster_ips),
                    "seed {seed}, step {step}"
                );
                assert!(
                    !health_checks || change.health_checks,
                    "seed {seed}, step {step}"
                );
            }
            before = full;
        }
    }
}

#[test]
fn a_slice_change_touches_only_the_ports_of_its_service() {
    let mut rng = Rng::new(7);
    let mut snapshot = fixtures::snapshot();
    for _ in 0..100 {
        random_change(&mut rng, &mut snapshot);
    }
    let web = fixtures::cluster_ip_service("web", Ipv4Addr::new(10, 96, 1, 1));
    snapshot
        .services
        .insert(web.key.clone(), Arc::new(web.clone()));
    let endpoints = [Ipv4Addr::new(10, 244, 9, 1), Ipv4Addr::new(10, 244, 9, 2)];
    let slice = fixtures::ready_slice("web-own", "web", &endpoints);
    snapshot
        .slices
        .insert(slice.key.clone(), Arc::new(slice.clone()));
    let mut planner = Planner::default();
    assert!(planner.apply(snapshot.clone()).everything);

    let shrunk = fixtures::ready_slice("web-own", "web", &endpoints[..1]);
    snapshot.slices.insert(shrunk.key.clone(), Arc::new(shrunk));
    let change = planner.apply(snapshot.clone());
    assert!(!change.everything);
    assert_eq!((change.services_changed, change.slices_changed), (0, 1));
    assert_eq!(change.ports.len(), 1, "{:?}", change.ports);
    assert!(change.ports.iter().all(|name| name.service == web.key));
    assert!(change.cluster_ips.is_empty());
    assert_eq!(planner.desired(), &desired_state(&snapshot));
}

#[test]
fn an_unchanged_snapshot_touches_nothing() {
    let mut rng = Rng::new(3);
    let mut snapshot = fixtures::snapshot();
    for _ in 0..50 {
        random_change(&mut rng, &mut snapshot);
    }
    let mut planner = Planner::default();
    planner.apply(snapshot.clone());
    // Equal objects in new allocations, as a rescanned manifest
    // directory gives them.
    let copy = ClusterSnapshot {
        services: snapshot
            .services
            .iter()
            .map(|(key, service)| (key.clone(), Arc::new(ServiceInfo::clone(service))))
            .collect(),
        ..snapshot.clone()
    };
    let change = planner.apply(copy);
    assert!(change.is_empty(), "{change:?}");
    assert_eq!(change.services_changed, 0);
}

#[test]
fn rule_26_a_zone_change_plans_every_service_again() {
    let mut rng = Rng::new(11);
    let mut snapshot = fixtures::snapshot();
    for _ in 0..50 {
        random_change(&mut rng, &mut snapshot);
    }
    let mut planner = Planner::default();
    planner.apply(snapshot.clone());
    snapshot.node = Some(fixtures::node(Some("zone-b")));
    let change = planner.apply(snapshot.clone());
    assert!(change.everything);
    assert_eq!(planner.desired(), &desired_state(&snapshot));
}

#[test]
fn rule_05_a_slice_moving_to_another_service_replans_both() {
    let mut snapshot = fixtures::snapshot();
    for (name, last) in [("web", 1), ("api", 2)] {
        let service = fixtures::cluster_ip_service(name, Ipv4Addr::new(10, 96, 0, last));
        snapshot
            .services
            .insert(service.key.clone(), Arc::new(service));
    }
    let slice = fixtures::ready_slice("web-1", "web", &[Ipv4Addr::new(10, 244, 0, 1)]);
    snapshot
        .slices
        .insert(slice.key.clone(), Arc::new(slice.clone()));
    let mut planner = Planner::default();
    planner.apply(snapshot.clone());

    let moved = SliceInfo {
        service: ObjectKey::new(slice.key.namespace(), "api"),
        ..slice
    };
    snapshot.slices.insert(moved.key.clone(), Arc::new(moved));
    let change = planner.apply(snapshot.clone());
    let services: BTreeSet<&str> = change
        .ports
        .iter()
        .map(|name| name.service.name())
        .collect();
    assert_eq!(services, BTreeSet::from(["api", "web"]));
    assert_eq!(planner.desired(), &desired_state(&snapshot));
}
