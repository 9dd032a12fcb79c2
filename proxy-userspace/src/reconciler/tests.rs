use std::net::Ipv4Addr;

use super::*;
use crate::maps::Capacity;
use crate::{
    maps::memory::{MemoryDatapath, Write},
    model::{Frontend, FrontendKind, ObjectKey},
};

fn port_name(service: &str) -> ServicePortName {
    ServicePortName {
        service: ObjectKey {
            namespace: "default".into(),
            name: service.into(),
        },
        port_name: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn frontend(last: u8) -> Frontend {
    Frontend {
        addr: Ipv4Addr::new(10, 96, 0, last),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn backend(last: u8) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::new(10, 244, 1, last),
        port: 8080,
        protocol: Protocol::Tcp,
    }
}

fn node_port_frontend(port: u16) -> Frontend {
    Frontend {
        addr: Ipv4Addr::new(192, 168, 0, 2),
        port,
        protocol: Protocol::Tcp,
    }
}

fn selection(backends: &[u8], when_empty: WhenEmpty) -> Selection {
    Selection {
        backends: backends.iter().map(|last| backend(*last)).collect(),
        when_empty,
    }
}

fn frontend_plan(frontend: Frontend, kind: FrontendKind, internal: Selection) -> FrontendPlan {
    FrontendPlan {
        frontend,
        kind,
        internal,
        external: None,
        source_ranges: vec![],
    }
}

/// One ClusterIP frontend selecting `backends`.
fn plan(frontend_last: u8, backends: &[u8], affinity: Option<u32>) -> ServicePortPlan {
    ServicePortPlan {
        frontends: vec![frontend_plan(
            frontend(frontend_last),
            FrontendKind::ClusterIp,
            selection(backends, WhenEmpty::Reject),
        )],
        affinity_timeout: affinity,
        local_backends: BTreeSet::new(),
    }
}

fn desired(ports: &[(&str, ServicePortPlan)]) -> DesiredState {
    DesiredState {
        ports: ports
            .iter()
            .map(|(name, plan)| (port_name(name), plan.clone()))
            .collect(),
        ..DesiredState::default()
    }
}

fn with_cluster_ips(mut state: DesiredState, lasts: &[u8]) -> DesiredState {
    state.cluster_ips = lasts
        .iter()
        .map(|last| Ipv4Addr::new(10, 96, 0, *last))
        .collect();
    state
}

/// The backends a frontend's slots point at, in slot order.
fn backends_of(datapath: &MemoryDatapath, frontend_last: u8) -> Option<Vec<BackendAddr>> {
    backends_at(datapath, &frontend(frontend_last))
}

fn backends_at(datapath: &MemoryDatapath, frontend: &Frontend) -> Option<Vec<BackendAddr>> {
    let master_key = codec::service_key(frontend, scope::INTERNAL, 0);
    let master = datapath.services.get(&master_key)?;
    Some(
        (1..=master.count)
            .map(|slot| {
                let id = datapath.services[&ServiceKey { slot, ..master_key }].backend_id;
                codec::backend_addr(&datapath.backends[&id]).unwrap()
            })
            .collect(),
    )
}

/// Replays `writes` on a copy of `start` and checks the datapath is
/// consistent after every single write: what a concurrent reader could see.
fn assert_consistent_at_every_write(start: &MemoryDatapath, writes: &[Write]) {
    let mut replay = start.contents();
    for (index, write) in writes.iter().enumerate() {
        replay.apply(write).unwrap();
        if let Err(problem) = replay.check_consistent() {
            panic!("after write {index} ({write:?}): {problem}");
        }
    }
}

fn snapshot(datapath: &MemoryDatapath) -> MemoryDatapath {
    datapath.contents()
}

#[test]
fn first_sync_writes_backends_then_slots_then_master() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    let report = reconciler.sync(&desired(&[("web", plan(10, &[11, 12, 13], None))]));
    assert!(report.is_complete());
    assert_eq!(report.frontends_written, 1);
    assert_eq!(report.backends_added, 3);

    let datapath = reconciler.datapath();
    assert_eq!(
        backends_of(datapath, 10),
        Some(vec![backend(11), backend(12), backend(13)])
    );
    let writes = &datapath.writes;
    assert!(matches!(
        writes[..3],
        [
            Write::PutBackend(..),
            Write::PutBackend(..),
            Write::PutBackend(..)
        ]
    ));
    let Write::PutService(last_key, last_value) = writes.last().unwrap() else {
        panic!("last write is not a services put: {writes:?}");
    };
    assert_eq!(last_key.slot, 0, "the master entry is written last");
    assert_eq!(last_value.count, 3);
    assert_consistent_at_every_write(&MemoryDatapath::default(), writes);
}

#[test]
fn unchanged_state_writes_nothing() {
    let state = desired(&[("web", plan(10, &[11, 12], Some(60)))]);
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&state);
    let writes_before = reconciler.datapath().writes.len();
    let report = reconciler.sync(&state);
    assert!(report.is_noop(), "{report:?}");
    assert_eq!(reconciler.datapath().writes.len(), writes_before);
}

#[test]
fn restart_reads_maps_back_and_rewrites_nothing() {
    let state = desired(&[
        ("web", plan(10, &[11, 12], Some(60))),
        ("api", plan(20, &[12, 13], None)),
    ]);
    let mut first = Reconciler::new(MemoryDatapath::default()).unwrap();
    first.sync(&state);
    let before = snapshot(first.datapath());

    let mut restarted = Reconciler::new(snapshot(&before)).unwrap();
    let report = restarted.sync(&state);
    assert!(report.is_noop(), "{report:?}");
    assert!(
        restarted.datapath().writes.is_empty(),
        "{:?}",
        restarted.datapath().writes
    );
    assert_eq!(restarted.datapath().services, before.services, "ids kept");
}

#[test]
fn restart_removes_what_was_deleted_while_down() {
    let mut first = Reconciler::new(MemoryDatapath::default()).unwrap();
    first.sync(&desired(&[
        ("web", plan(10, &[11], None)),
        ("gone", plan(20, &[12], None)),
    ]));
    let before = snapshot(first.datapath());

    let mut restarted = Reconciler::new(snapshot(&before)).unwrap();
    let report = restarted.sync(&desired(&[("web", plan(10, &[11], None))]));
    assert_eq!(report.frontends_deleted, 1);
    assert_eq!(report.backends_deleted, 1);
    assert_eq!(backends_of(restarted.datapath(), 20), None);
    assert_eq!(
        backends_of(restarted.datapath(), 10),
        Some(vec![backend(11)])
    );
    assert_eq!(restarted.datapath().backends.len(), 1);
    assert_consistent_at_every_write(&before, &restarted.datapath().writes);
}

#[test]
fn shrinking_lowers_the_count_before_deleting_slots() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan(10, &[11, 12, 13], None))]));
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();

    reconciler.sync(&desired(&[("web", plan(10, &[11], None))]));
    let datapath = reconciler.datapath();
    assert_eq!(backends_of(datapath, 10), Some(vec![backend(11)]));
    assert_eq!(
        datapath.backends.len(),
        1,
        "unreferenced backends are deleted"
    );
    assert_eq!(datapath.services.len(), 2, "master and one slot");
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn growing_writes_new_slots_before_the_count() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan(10, &[11], None))]));
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();

    reconciler.sync(&desired(&[("web", plan(10, &[11, 12, 13, 14], None))]));
    let datapath = reconciler.datapath();
    assert_eq!(backends_of(datapath, 10).map(|b| b.len()), Some(4));
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn deleted_service_loses_master_first_then_slots_and_backends() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan(10, &[11, 12], None))]));
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();

    let report = reconciler.sync(&DesiredState::default());
    assert_eq!(report.frontends_deleted, 1);
    let datapath = reconciler.datapath();
    assert!(datapath.services.is_empty());
    assert!(datapath.backends.is_empty());
    let writes = &datapath.writes[writes_before..];
    assert!(
        matches!(writes[0], Write::DeleteService(key) if key.slot == 0),
        "master deleted first: {writes:?}"
    );
    assert_consistent_at_every_write(&before, writes);
}

#[test]
fn rule_21_no_endpoints_programs_a_master_with_count_zero() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan(10, &[], None))]));
    let master =
        reconciler.datapath().services[&codec::service_key(&frontend(10), scope::INTERNAL, 0)];
    assert_eq!(master.count, 0);
    assert_eq!(reconciler.datapath().services.len(), 1);
}

#[test]
fn shared_backend_stays_while_another_service_uses_it() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[
        ("web", plan(10, &[11], None)),
        ("api", plan(20, &[11], None)),
    ]));
    assert_eq!(
        reconciler.datapath().backends.len(),
        1,
        "one id per backend"
    );
    reconciler.sync(&desired(&[("api", plan(20, &[11], None))]));
    assert_eq!(
        backends_of(reconciler.datapath(), 20),
        Some(vec![backend(11)])
    );
}

#[test]
fn rule_23_affinity_match_follows_the_selected_set() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan(10, &[11, 12], Some(30)))]));
    let master =
        reconciler.datapath().services[&codec::service_key(&frontend(10), scope::INTERNAL, 0)];
    assert_eq!(master.affinity_timeout, 30);
    assert_eq!(reconciler.datapath().affinity_match.len(), 2);

    reconciler.sync(&desired(&[("web", plan(10, &[12], Some(30)))]));
    let pairs: Vec<_> = reconciler
        .datapath()
        .affinity_match
        .iter()
        .copied()
        .collect();
    let remaining_id = reconciler.datapath().services
        [&codec::service_key(&frontend(10), scope::INTERNAL, 1)]
        .backend_id;
    assert_eq!(
        pairs,
        vec![AffinityMatchKey {
            backend_id: remaining_id,
            svc_id: master.svc_id,
            selection: 0,
        }]
    );

    reconciler.sync(&desired(&[("web", plan(10, &[12], None))]));
    assert!(reconciler.datapath().affinity_match.is_empty());
    let master =
        reconciler.datapath().services[&codec::service_key(&frontend(10), scope::INTERNAL, 0)];
    assert_eq!(master.affinity_timeout, 0);
}

#[test]
fn full_map_fails_one_port_and_keeps_the_others() {
    let datapath = MemoryDatapath {
        services_capacity: Some(3),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    reconciler.sync(&desired(&[("api", plan(20, &[11, 12], None))]));
    assert_eq!(reconciler.datapath().services.len(), 3);

    let state = desired(&[
        ("api", plan(20, &[11, 13], None)),
        ("web", plan(10, &[14], None)),
    ]);
    let report = reconciler.sync(&state);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, port_name("web"));
    assert_eq!(
        backends_of(reconciler.datapath(), 20),
        Some(vec![backend(11), backend(13)])
    );
    assert_eq!(
        backends_of(reconciler.datapath(), 10),
        None,
        "no half-written frontend"
    );
    reconciler.datapath().check_consistent().unwrap();

    // Room again: the next sync completes the failed port.
    let mut datapath = snapshot(reconciler.datapath());
    datapath.services_capacity = None;
    let mut reconciler = Reconciler::new(datapath).unwrap();
    assert!(reconciler.sync(&state).is_complete());
    assert_eq!(
        backends_of(reconciler.datapath(), 10),
        Some(vec![backend(14)])
    );
}

#[test]
fn orphaned_slots_from_an_interrupted_delete_are_removed() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan(10, &[11, 12], None))]));
    let mut interrupted = snapshot(reconciler.datapath());
    interrupted
        .services
        .remove(&codec::service_key(&frontend(10), scope::INTERNAL, 0));

    let mut restarted = Reconciler::new(interrupted).unwrap();
    restarted.sync(&DesiredState::default());
    assert!(restarted.datapath().services.is_empty());
    assert!(restarted.datapath().backends.is_empty());
}

#[test]
fn service_port_ids_survive_restart_for_affinity() {
    let state = desired(&[
        ("web", plan(10, &[11], Some(60))),
        ("api", plan(20, &[11], Some(60))),
    ]);
    let mut first = Reconciler::new(MemoryDatapath::default()).unwrap();
    first.sync(&state);
    let svc_id_of = |datapath: &MemoryDatapath, last: u8| {
        datapath.services[&codec::service_key(&frontend(last), scope::INTERNAL, 0)].svc_id
    };
    let ids_before = [
        svc_id_of(first.datapath(), 10),
        svc_id_of(first.datapath(), 20),
    ];

    // A new port sorts first after the restart; the old ports keep their ids.
    let mut with_new = state.clone();
    with_new
        .ports
        .insert(port_name("aaa"), plan(30, &[12], Some(60)));
    let mut restarted = Reconciler::new(snapshot(first.datapath())).unwrap();
    restarted.sync(&with_new);
    let datapath = restarted.datapath();
    assert_eq!(
        [svc_id_of(datapath, 10), svc_id_of(datapath, 20)],
        ids_before
    );
    assert!(!ids_before.contains(&svc_id_of(datapath, 30)));
}

#[test]
fn rule_18_19_drop_flag_when_only_other_frontends_have_endpoints() {
    let dropping = ServicePortPlan {
        frontends: vec![frontend_plan(
            frontend(10),
            FrontendKind::ClusterIp,
            selection(&[], WhenEmpty::Drop),
        )],
        affinity_timeout: None,
        local_backends: BTreeSet::new(),
    };
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", dropping)]));
    let master_key = codec::service_key(&frontend(10), scope::INTERNAL, 0);
    let master = reconciler.datapath().services[&master_key];
    assert_eq!(
        (master.count, master.flags),
        (0, service_flags::DROP_WHEN_EMPTY)
    );

    // Rule 21: with no endpoints anywhere the same frontend refuses.
    let report = reconciler.sync(&desired(&[("web", plan(10, &[], None))]));
    assert_eq!(report.frontends_written, 1, "the flag change is a write");
    let master = reconciler.datapath().services[&master_key];
    assert_eq!((master.count, master.flags), (0, 0));
}

#[test]
fn rule_09_cluster_ip_wildcards_are_written_and_removed() {
    let state = with_cluster_ips(desired(&[("web", plan(10, &[11], None))]), &[10, 20]);
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    let report = reconciler.sync(&state);
    assert_eq!(report.wildcards_written, 4, "TCP and UDP per ClusterIP");
    assert_eq!(report.frontends_written, 1);
    let datapath = reconciler.datapath();
    for last in [10, 20] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let key = codec::cluster_ip_wildcard(Ipv4Addr::new(10, 96, 0, last), protocol);
            assert_eq!(
                datapath.services.get(&key),
                Some(&ServiceValue::slot(0)),
                "{last} {protocol:?}"
            );
        }
    }
    assert_eq!(datapath.services.len(), 2 + 4, "master, slot, wildcards");
    assert_eq!(
        reconciler.frontend_count(),
        1,
        "wildcards are not frontends"
    );
    assert_consistent_at_every_write(&MemoryDatapath::default(), &datapath.writes);

    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    let report = reconciler.sync(&with_cluster_ips(
        desired(&[("web", plan(10, &[11], None))]),
        &[10],
    ));
    assert_eq!(report.wildcards_deleted, 2);
    assert_eq!(report.frontends_deleted, 0);
    let datapath = reconciler.datapath();
    let gone = codec::cluster_ip_wildcard(Ipv4Addr::new(10, 96, 0, 20), Protocol::Tcp);
    assert!(!datapath.services.contains_key(&gone));
    assert_eq!(datapath.services.len(), 2 + 2);
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn rule_09_wildcards_survive_restart_and_hold_no_service_port_id() {
    let state = with_cluster_ips(desired(&[("web", plan(10, &[11], Some(60)))]), &[10]);
    let mut first = Reconciler::new(MemoryDatapath::default()).unwrap();
    first.sync(&state);
    let before = snapshot(first.datapath());

    let mut restarted = Reconciler::new(snapshot(&before)).unwrap();
    assert_eq!(restarted.frontend_count(), 1);
    let report = restarted.sync(&state);
    assert!(report.is_noop(), "{report:?}");
    assert!(restarted.datapath().writes.is_empty());

    // A new port after the restart gets a fresh id, never the wildcards' 0.
    let mut with_new = state.clone();
    with_new
        .ports
        .insert(port_name("aaa"), plan(30, &[12], Some(60)));
    restarted.sync(&with_new);
    let svc_id = restarted.datapath().services
        [&codec::service_key(&frontend(30), scope::INTERNAL, 0)]
        .svc_id;
    assert_ne!(svc_id, 0);
    assert_ne!(
        svc_id,
        restarted.datapath().services[&codec::service_key(&frontend(10), scope::INTERNAL, 0)]
            .svc_id
    );
}

#[test]
fn rule_09_wildcard_that_does_not_fit_is_reported_and_retried() {
    let datapath = MemoryDatapath {
        services_capacity: Some(3),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    let state = with_cluster_ips(desired(&[("web", plan(10, &[11], None))]), &[10]);
    let report = reconciler.sync(&state);
    assert!(report.failed.is_empty());
    assert_eq!(report.wildcards_written, 1);
    assert_eq!(report.failed_wildcards.len(), 1);
    assert_eq!(report.failed_wildcards[0].0, Ipv4Addr::new(10, 96, 0, 10));
    assert!(!report.is_complete());

    let mut datapath = snapshot(reconciler.datapath());
    datapath.services_capacity = None;
    let mut reconciler = Reconciler::new(datapath).unwrap();
    let report = reconciler.sync(&state);
    assert!(report.is_complete());
    assert_eq!(report.wildcards_written, 1);
}

#[test]
fn rule_19_frontends_of_one_port_program_their_own_sets() {
    // iTP=Local: the ClusterIP selects the local endpoint only, while the
    // NodePort's internal selection is the cluster set (rules 18, 19).
    let state = desired(&[(
        "web",
        ServicePortPlan {
            frontends: vec![
                frontend_plan(
                    frontend(10),
                    FrontendKind::ClusterIp,
                    selection(&[11], WhenEmpty::Reject),
                ),
                frontend_plan(
                    node_port_frontend(30080),
                    FrontendKind::NodePort,
                    selection(&[11, 12], WhenEmpty::Reject),
                ),
            ],
            affinity_timeout: Some(60),
            local_backends: BTreeSet::new(),
        },
    )]);
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    assert!(reconciler.sync(&state).is_complete());
    let datapath = reconciler.datapath();
    assert_eq!(backends_of(datapath, 10), Some(vec![backend(11)]));
    assert_eq!(
        backends_at(datapath, &node_port_frontend(30080)),
        Some(vec![backend(11), backend(12)])
    );
    assert_eq!(datapath.backends.len(), 2, "one id per backend");
    let svc_ids: BTreeSet<u32> = [frontend(10), node_port_frontend(30080)]
        .iter()
        .map(|f| datapath.services[&codec::service_key(f, scope::INTERNAL, 0)].svc_id)
        .collect();
    assert_eq!(svc_ids.len(), 1, "one service-port id for all frontends");
    // Rules 19, 23: the frontends select different sets, so their affinity
    // is kept apart: a NodePort choice never leaks into the ClusterIP.
    let selection_of =
        |f: &Frontend| datapath.services[&codec::service_key(f, scope::INTERNAL, 0)].selection;
    assert_eq!(selection_of(&frontend(10)), 0);
    assert_eq!(selection_of(&node_port_frontend(30080)), 1);
    let id = |last: u8| {
        *datapath
            .backends
            .iter()
            .find(|(_, b)| codec::backend_addr(b) == Some(backend(last)))
            .unwrap()
            .0
    };
    let svc_id = *svc_ids.iter().next().unwrap();
    let pairs: BTreeSet<AffinityMatchKey> = datapath.affinity_match.iter().copied().collect();
    let expected: BTreeSet<AffinityMatchKey> = [(11, 0), (11, 1), (12, 1)]
        .into_iter()
        .map(|(last, selection)| AffinityMatchKey {
            backend_id: id(last),
            svc_id,
            selection,
        })
        .collect();
    assert_eq!(pairs, expected);
    assert_consistent_at_every_write(&MemoryDatapath::default(), &datapath.writes);
}

#[test]
fn port_too_large_for_the_maps_is_refused_whole_and_others_are_programmed() {
    let datapath = MemoryDatapath {
        capacity: Some(Capacity {
            services: 100,
            backends: 4,
            rev_nat: 100,
            source_ranges: 100,
            affinity_match: 100,
        }),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    // "big" sorts first and alone needs more backends than the map holds.
    let state = desired(&[
        ("big", plan(20, &[21, 22, 23, 24, 25], None)),
        ("web", plan(10, &[11, 12], None)),
    ]);
    let report = reconciler.sync(&state);
    assert!(
        report.is_complete(),
        "over capacity is not a transient failure: {report:?}"
    );
    assert_eq!(report.over_capacity.len(), 1);
    assert_eq!(report.over_capacity[0].0, port_name("big"));
    assert_eq!(
        report.over_capacity[0].1,
        OverCapacity {
            map: proxy_common::map_names::BACKENDS,
            needed: 5,
            free: 4
        }
    );
    let datapath = reconciler.datapath();
    assert_eq!(
        backends_of(datapath, 20),
        None,
        "nothing of the big port was written"
    );
    assert_eq!(
        backends_of(datapath, 10),
        Some(vec![backend(11), backend(12)])
    );
    assert_eq!(datapath.backends.len(), 2, "no orphaned backends");

    // Room again (web shrinks): the big port still does not fit (5 > 4 - 1)...
    let report = reconciler.sync(&desired(&[
        ("big", plan(20, &[21, 22, 23, 24, 25], None)),
        ("web", plan(10, &[11], None)),
    ]));
    assert_eq!(report.over_capacity.len(), 1);
    // ...but once it shrinks it is programmed.
    let report = reconciler.sync(&desired(&[
        ("big", plan(20, &[21, 22, 23], None)),
        ("web", plan(10, &[11], None)),
    ]));
    assert!(report.over_capacity.is_empty(), "{report:?}");
    assert_eq!(
        backends_of(reconciler.datapath(), 20).map(|b| b.len()),
        Some(3)
    );
}

#[test]
fn rule_15_load_balancer_ip_with_source_ranges_is_not_intercepted() {
    let lb_ip = Frontend {
        addr: Ipv4Addr::new(198, 51, 100, 10),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut with_ranges = frontend_plan(
        lb_ip,
        FrontendKind::LoadBalancer,
        selection(&[11, 12], WhenEmpty::Reject),
    );
    with_ranges.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let state = desired(&[(
        "web",
        ServicePortPlan {
            frontends: vec![
                frontend_plan(
                    frontend(10),
                    FrontendKind::ClusterIp,
                    selection(&[11], WhenEmpty::Reject),
                ),
                with_ranges.clone(),
            ],
            affinity_timeout: None,
            local_backends: BTreeSet::new(),
        },
    )]);
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    assert!(reconciler.sync(&state).is_complete());
    assert_eq!(
        backends_of(reconciler.datapath(), 10),
        Some(vec![backend(11)])
    );
    assert_eq!(backends_at(reconciler.datapath(), &lb_ip), None);
    assert_eq!(
        reconciler.datapath().backends.len(),
        1,
        "no backend written for the frontend left alone"
    );

    // Without ranges the same frontend is programmed.
    with_ranges.source_ranges.clear();
    let mut state = state;
    state.ports.get_mut(&port_name("web")).unwrap().frontends[1] = with_ranges;
    reconciler.sync(&state);
    assert_eq!(
        backends_at(reconciler.datapath(), &lb_ip),
        Some(vec![backend(11), backend(12)])
    );
}

#[test]
fn rule_09_wildcards_that_do_not_fit_are_skipped_not_retried() {
    // Room for the service port (master + slot) but not its two wildcards.
    let datapath = MemoryDatapath {
        capacity: Some(Capacity {
            services: 2,
            backends: 10,
            rev_nat: 10,
            source_ranges: 10,
            affinity_match: 10,
        }),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    let report = reconciler.sync(&with_cluster_ips(
        desired(&[("web", plan(10, &[11], None))]),
        &[10],
    ));
    assert!(report.is_complete(), "no retry loop: {report:?}");
    assert!(report.failed_wildcards.is_empty());
    assert_eq!(report.wildcards_over_capacity, 2);
    assert_eq!(
        backends_of(reconciler.datapath(), 10),
        Some(vec![backend(11)])
    );
}
