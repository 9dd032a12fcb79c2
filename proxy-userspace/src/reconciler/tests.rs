use std::net::Ipv4Addr;

use super::*;
use crate::maps::Capacity;
use crate::{
    maps::memory::{MemoryDatapath, Write},
    model::{Frontend, FrontendKind, ObjectKey},
};

fn port_name(service: &str) -> ServicePortName {
    ServicePortName::new(ObjectKey::new("default", service), "http", Protocol::Tcp)
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
        local_backends: Vec::new(),
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
    backends_in(datapath, frontend, scope::INTERNAL)
}

/// The backends a frontend's master in `scope` selects, in slot order.
fn backends_in(
    datapath: &MemoryDatapath,
    frontend: &Frontend,
    scope: u8,
) -> Option<Vec<BackendAddr>> {
    let master_key = codec::service_key(frontend, scope, 0);
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

/// Replays `writes` (a complete sync) on a copy of `start` and checks the
/// datapath is consistent after every single write, what a concurrent
/// reader could see, and settled after the last.
fn assert_consistent_at_every_write(start: &MemoryDatapath, writes: &[Write]) {
    let mut replay = start.contents();
    for (index, write) in writes.iter().enumerate() {
        replay.apply(write).unwrap();
        if let Err(problem) = replay.check_consistent() {
            panic!("after write {index} ({write:?}): {problem}");
        }
    }
    if let Err(problem) = replay.check_settled() {
        panic!("after the last write: {problem}");
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

/// Rule 30: the terminator learns which addresses lost their backend
/// entry; a backend another service still uses is not among them.
#[test]
fn removed_backends_name_the_deleted_addresses_only() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[
        ("web", plan(10, &[11, 12, 13], None)),
        ("api", plan(20, &[12], None)),
    ]));
    let report = reconciler.sync(&desired(&[
        ("web", plan(10, &[11], None)),
        ("api", plan(20, &[12], None)),
    ]));
    assert_eq!(report.removed_backends, vec![backend(13)]);
    let report = reconciler.sync(&desired(&[("web", plan(10, &[11], None))]));
    assert_eq!(report.removed_backends, vec![backend(12)]);
    let unchanged = reconciler.sync(&desired(&[("web", plan(10, &[11], None))]));
    assert!(unchanged.removed_backends.is_empty());
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
        local_backends: Vec::new(),
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
            local_backends: Vec::new(),
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
            maglev_tables: 100,
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
            local_backends: Vec::new(),
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
            maglev_tables: 10,
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

fn lb_ip() -> Frontend {
    Frontend {
        addr: Ipv4Addr::new(198, 51, 100, 10),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// A frontend reachable from outside: `internal` for clients on this node,
/// `external` for packets from outside, `ranges` its source ranges.
fn external_plan(
    frontend: Frontend,
    kind: FrontendKind,
    internal: Selection,
    external: Selection,
    ranges: &[&str],
) -> FrontendPlan {
    FrontendPlan {
        frontend,
        kind,
        internal,
        external: Some(external),
        source_ranges: ranges.iter().map(|range| range.parse().unwrap()).collect(),
    }
}

fn port_plan(frontends: Vec<FrontendPlan>, affinity: Option<u32>) -> ServicePortPlan {
    ServicePortPlan {
        frontends,
        affinity_timeout: affinity,
        local_backends: Vec::new(),
    }
}

fn master(datapath: &MemoryDatapath, frontend: &Frontend, scope: u8) -> Option<ServiceValue> {
    datapath
        .services
        .get(&codec::service_key(frontend, scope, 0))
        .copied()
}

fn ranges_of(datapath: &MemoryDatapath, rev_nat_id: u32) -> Vec<String> {
    datapath
        .source_ranges
        .iter()
        .filter(|range| range.rev_nat_id == rev_nat_id)
        .map(|range| range.cidr.to_string())
        .collect()
}

fn backend_id(datapath: &MemoryDatapath, last: u8) -> u32 {
    *datapath
        .backends
        .iter()
        .find(|(_, b)| codec::backend_addr(b) == Some(backend(last)))
        .unwrap()
        .0
}

/// ClusterIP 10.96.0.10 and NodePort 192.168.0.2:30080 with eTP=Local:
/// clients on the node reach 11 and 12, packets from outside only the
/// local 11.
fn node_port_local() -> ServicePortPlan {
    port_plan(
        vec![
            frontend_plan(
                frontend(10),
                FrontendKind::ClusterIp,
                selection(&[11, 12], WhenEmpty::Reject),
            ),
            external_plan(
                node_port_frontend(30080),
                FrontendKind::NodePort,
                selection(&[11, 12], WhenEmpty::Reject),
                selection(&[11], WhenEmpty::Reject),
                &[],
            ),
        ],
        None,
    )
}

#[test]
fn rule_16_18_external_frontends_get_an_external_master_from_their_external_selection() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    let report = reconciler.sync(&desired(&[("web", node_port_local())]));
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.frontends_written, 2, "two frontends, three masters");
    let datapath = reconciler.datapath();
    let node_port = node_port_frontend(30080);
    assert_eq!(
        backends_in(datapath, &node_port, scope::INTERNAL),
        Some(vec![backend(11), backend(12)])
    );
    assert_eq!(
        backends_in(datapath, &node_port, scope::EXTERNAL),
        Some(vec![backend(11)])
    );
    assert_eq!(
        backends_in(datapath, &frontend(10), scope::EXTERNAL),
        None,
        "rule 16: a ClusterIP is not reachable from outside"
    );
    assert_eq!(datapath.backends.len(), 2, "one id per backend");
    assert_eq!(datapath.services.len(), 3 + 2 + 2 + 1);
    assert_consistent_at_every_write(&MemoryDatapath::default(), &datapath.writes);
}

#[test]
fn rule_18_external_master_drops_when_no_endpoint_is_local() {
    let plan = port_plan(
        vec![external_plan(
            node_port_frontend(30080),
            FrontendKind::NodePort,
            selection(&[12], WhenEmpty::Reject),
            selection(&[], WhenEmpty::Drop),
            &[],
        )],
        None,
    );
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan)]));
    let datapath = reconciler.datapath();
    let internal = master(datapath, &node_port_frontend(30080), scope::INTERNAL).unwrap();
    let external = master(datapath, &node_port_frontend(30080), scope::EXTERNAL).unwrap();
    assert_eq!(
        (internal.count, internal.flags),
        (1, 0),
        "pods still served"
    );
    assert_eq!(
        (external.count, external.flags),
        (0, service_flags::DROP_WHEN_EMPTY)
    );
    datapath.check_settled().unwrap();
}

#[test]
fn rev_nat_ids_one_per_frontend_shared_by_its_scopes() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", node_port_local())]));
    let datapath = reconciler.datapath();
    let node_port = node_port_frontend(30080);
    let cluster_ip = master(datapath, &frontend(10), scope::INTERNAL).unwrap();
    let internal = master(datapath, &node_port, scope::INTERNAL).unwrap();
    let external = master(datapath, &node_port, scope::EXTERNAL).unwrap();
    assert_ne!(cluster_ip.rev_nat_id, 0);
    assert_ne!(internal.rev_nat_id, 0);
    assert_eq!(
        internal.rev_nat_id, external.rev_nat_id,
        "one id per frontend"
    );
    assert_ne!(cluster_ip.rev_nat_id, internal.rev_nat_id);
    assert_eq!(
        datapath.rev_nat,
        BTreeMap::from([
            (cluster_ip.rev_nat_id, codec::rev_nat(&frontend(10))),
            (internal.rev_nat_id, codec::rev_nat(&node_port)),
        ])
    );
    let rev_nat = datapath.rev_nat[&internal.rev_nat_id];
    assert_eq!(rev_nat.addr.to_ne_bytes(), [192, 168, 0, 2]);
    assert_eq!(rev_nat.port, 30080u16.to_be(), "network byte order");

    // The frontend goes: its masters first, then its rev-NAT entry.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    let report = reconciler.sync(&desired(&[("web", plan(10, &[11, 12], None))]));
    assert_eq!(report.frontends_deleted, 2, "both scopes");
    assert_eq!(report.rev_nats_deleted, 1);
    let datapath = reconciler.datapath();
    assert_eq!(datapath.rev_nat.len(), 1);
    assert!(datapath.rev_nat.contains_key(&cluster_ip.rev_nat_id));
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn rule_09_wildcards_carry_no_rev_nat_id() {
    let state = with_cluster_ips(desired(&[("web", plan(10, &[11], None))]), &[10]);
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&state);
    let datapath = reconciler.datapath();
    let wildcard = codec::cluster_ip_wildcard(Ipv4Addr::new(10, 96, 0, 10), Protocol::Tcp);
    assert_eq!(datapath.services[&wildcard].rev_nat_id, 0);
    assert_eq!(datapath.rev_nat.len(), 1, "the frontend's only");
    datapath.check_settled().unwrap();
}

#[test]
fn rev_nat_ids_survive_restart_and_are_not_reused_at_once() {
    let state = desired(&[("web", node_port_local()), ("api", plan(20, &[13], None))]);
    let mut first = Reconciler::new(MemoryDatapath::default()).unwrap();
    first.sync(&state);
    let before = snapshot(first.datapath());

    let mut restarted = Reconciler::new(snapshot(&before)).unwrap();
    restarted.sync(&state);
    assert!(
        restarted
            .datapath()
            .writes
            .iter()
            .all(|write| matches!(write, Write::PutMaglevTable(..))),
        "only the Maglev table is rebuilt: {:?}",
        restarted.datapath().writes
    );
    assert_eq!(restarted.datapath().rev_nat, before.rev_nat);

    // api goes and a new frontend comes in the same sync: it does not get
    // api's id, which conntrack entries of api's flows may still carry.
    let api_id = master(&before, &frontend(20), scope::INTERNAL)
        .unwrap()
        .rev_nat_id;
    restarted.sync(&desired(&[
        ("web", node_port_local()),
        ("new", plan(30, &[13], None)),
    ]));
    let new_id = master(restarted.datapath(), &frontend(30), scope::INTERNAL)
        .unwrap()
        .rev_nat_id;
    assert_ne!(new_id, api_id);
    assert!(!before.rev_nat.contains_key(&new_id));
    restarted.datapath().check_settled().unwrap();
}

#[test]
fn rev_nat_entry_left_by_a_crash_before_its_master_is_not_reused_and_goes() {
    let mut interrupted = MemoryDatapath::default();
    interrupted
        .rev_nat
        .insert(1, codec::rev_nat(&node_port_frontend(30999)));
    let mut restarted = Reconciler::new(interrupted).unwrap();
    restarted.sync(&desired(&[("web", plan(10, &[11], None))]));
    let datapath = restarted.datapath();
    let id = master(datapath, &frontend(10), scope::INTERNAL)
        .unwrap()
        .rev_nat_id;
    assert_ne!(id, 1, "the stray entry's id is not handed out");
    assert_eq!(datapath.rev_nat.keys().copied().collect::<Vec<_>>(), [id]);
    datapath.check_settled().unwrap();
}

#[test]
fn rule_06_17_local_backends_carry_the_local_flag() {
    let mut plan = node_port_local();
    plan.local_backends = vec![backend(11)];
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan.clone())]));
    let datapath = reconciler.datapath();
    let local = datapath.backends[&backend_id(datapath, 11)];
    let remote = datapath.backends[&backend_id(datapath, 12)];
    assert!(codec::is_local(&local));
    assert!(!codec::is_local(&remote), "rule 17: source-NATed");

    // The endpoint moves off the node: a new backend entry, the old one goes.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    plan.local_backends.clear();
    reconciler.sync(&desired(&[("web", plan)]));
    let datapath = reconciler.datapath();
    assert_eq!(datapath.backends.len(), 2);
    assert!(datapath.backends.values().all(|b| !codec::is_local(b)));
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn rule_23_external_selections_have_their_own_affinity_pairs() {
    let mut plan = node_port_local();
    plan.affinity_timeout = Some(60);
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan)]));
    let datapath = reconciler.datapath();
    let node_port = node_port_frontend(30080);
    let selections = [
        master(datapath, &frontend(10), scope::INTERNAL).unwrap(),
        master(datapath, &node_port, scope::INTERNAL).unwrap(),
        master(datapath, &node_port, scope::EXTERNAL).unwrap(),
    ]
    .map(|m| m.selection);
    assert_eq!(
        selections,
        [0, 0, 1],
        "the local set is a selection of its own"
    );
    let svc_id = master(datapath, &node_port, scope::EXTERNAL)
        .unwrap()
        .svc_id;
    let expected: BTreeSet<AffinityMatchKey> = [(11, 0), (12, 0), (11, 1)]
        .into_iter()
        .map(|(last, selection)| AffinityMatchKey {
            backend_id: backend_id(datapath, last),
            svc_id,
            selection,
        })
        .collect();
    assert_eq!(datapath.affinity_match, expected);
    assert_consistent_at_every_write(&MemoryDatapath::default(), &datapath.writes);
}

#[test]
fn rule_15_load_balancer_ip_with_source_ranges_gets_an_external_master_checking_them() {
    let with_ranges = |ranges: &[&str]| {
        desired(&[(
            "web",
            port_plan(
                vec![
                    frontend_plan(
                        frontend(10),
                        FrontendKind::ClusterIp,
                        selection(&[11, 12], WhenEmpty::Reject),
                    ),
                    external_plan(
                        lb_ip(),
                        FrontendKind::LoadBalancer,
                        selection(&[11, 12], WhenEmpty::Reject),
                        selection(&[11, 12], WhenEmpty::Reject),
                        ranges,
                    ),
                ],
                None,
            ),
        )])
    };
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    let report = reconciler.sync(&with_ranges(&["203.0.113.0/24", "192.0.2.128/25"]));
    assert_eq!(report.source_ranges_written, 2);
    let datapath = reconciler.datapath();
    assert_eq!(
        master(datapath, &lb_ip(), scope::INTERNAL),
        None,
        "left to the balancer at socket level"
    );
    let external = master(datapath, &lb_ip(), scope::EXTERNAL).unwrap();
    assert_eq!(external.flags, service_flags::SOURCE_RANGES);
    assert_eq!(external.count, 2);
    assert_eq!(
        ranges_of(datapath, external.rev_nat_id),
        ["192.0.2.128/25", "203.0.113.0/24"]
    );
    assert_eq!(datapath.source_ranges.len(), 2);
    assert_consistent_at_every_write(&MemoryDatapath::default(), &datapath.writes);

    // Other ranges: the new ones are in before the old ones go.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    let report = reconciler.sync(&with_ranges(&["198.51.100.0/24"]));
    assert!(!report.is_noop(), "a change of ranges alone is a change");
    assert_eq!(
        (report.source_ranges_written, report.source_ranges_deleted),
        (1, 2)
    );
    let datapath = reconciler.datapath();
    assert_eq!(
        ranges_of(datapath, external.rev_nat_id),
        ["198.51.100.0/24"]
    );
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);

    // No ranges: the socket level programs the LB IP again; the flag and
    // the ranges go.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    reconciler.sync(&with_ranges(&[]));
    let datapath = reconciler.datapath();
    assert_eq!(
        backends_at(datapath, &lb_ip()),
        Some(vec![backend(11), backend(12)])
    );
    let external = master(datapath, &lb_ip(), scope::EXTERNAL).unwrap();
    assert_eq!(external.flags, 0);
    assert!(datapath.source_ranges.is_empty());
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);

    // Ranges again: the internal master goes after the external one checks them.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    reconciler.sync(&with_ranges(&["203.0.113.0/24"]));
    let datapath = reconciler.datapath();
    assert_eq!(master(datapath, &lb_ip(), scope::INTERNAL), None);
    assert_eq!(datapath.source_ranges.len(), 1);
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);

    // The LB IP goes: its master, ranges and rev-NAT entry with it.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    reconciler.sync(&desired(&[("web", plan(10, &[11, 12], None))]));
    let datapath = reconciler.datapath();
    assert_eq!(master(datapath, &lb_ip(), scope::EXTERNAL), None);
    assert!(datapath.source_ranges.is_empty());
    assert_eq!(datapath.rev_nat.len(), 1);
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn rule_15_source_ranges_stay_while_their_port_is_refused() {
    let lb = |ranges: &[&str], backends: &[u8]| {
        desired(&[(
            "web",
            port_plan(
                vec![external_plan(
                    lb_ip(),
                    FrontendKind::LoadBalancer,
                    selection(backends, WhenEmpty::Reject),
                    selection(backends, WhenEmpty::Reject),
                    ranges,
                )],
                None,
            ),
        )])
    };
    let datapath = MemoryDatapath {
        capacity: Some(Capacity {
            services: 4,
            backends: 10,
            rev_nat: 10,
            source_ranges: 10,
            affinity_match: 10,
            maglev_tables: 10,
        }),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    reconciler.sync(&lb(&["203.0.113.0/24"], &[11]));
    // New ranges and more backends than the services map has room for: the
    // old master stays, and so do the ranges it checks.
    let report = reconciler.sync(&lb(&["198.51.100.0/24"], &[11, 12, 13, 14]));
    assert_eq!(report.over_capacity.len(), 1);
    let datapath = reconciler.datapath();
    let external = master(datapath, &lb_ip(), scope::EXTERNAL).unwrap();
    assert_eq!(external.count, 1);
    assert_eq!(ranges_of(datapath, external.rev_nat_id), ["203.0.113.0/24"]);
    datapath.check_consistent().unwrap();
}

#[test]
fn rule_09_wildcards_give_way_to_service_ports_and_every_refusal_is_counted() {
    // ClusterIP services with one endpoint arriving a few at a time, into a
    // services map of 10 entries: each port needs 2 (master and slot),
    // each ClusterIP 2 more for rule 9. Ports come first, so 5 are served;
    // every other port and every wildcard left out is counted.
    let datapath = MemoryDatapath {
        capacity: Some(Capacity {
            services: 10,
            backends: 100,
            rev_nat: 100,
            source_ranges: 100,
            affinity_match: 100,
            maglev_tables: 100,
        }),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    let names: Vec<String> = (1..=8).map(|n| format!("svc-{n}")).collect();
    for arrived in [2, 4, 6, 8] {
        let ports: Vec<(&str, ServicePortPlan)> = (1..=arrived)
            .map(|n| (names[n - 1].as_str(), plan(n as u8, &[n as u8 + 100], None)))
            .collect();
        let lasts: Vec<u8> = (1..=arrived as u8).collect();
        let report = reconciler.sync(&with_cluster_ips(desired(&ports), &lasts));
        assert!(report.is_complete(), "{report:?}");
        let served = (1..=arrived as u8)
            .filter(|last| backends_of(reconciler.datapath(), *last).is_some())
            .count();
        assert_eq!(
            served + report.over_capacity.len(),
            arrived,
            "every port served or counted: {report:?}"
        );
        assert_eq!(served, arrived.min(5));
        let wildcards = reconciler
            .datapath()
            .services
            .keys()
            .filter(|key| codec::is_cluster_ip_wildcard(key))
            .count();
        assert_eq!(wildcards + report.wildcards_over_capacity, 2 * arrived);
        assert!(reconciler.datapath().services.len() <= 10);
        reconciler.datapath().check_settled().unwrap();
    }
}

#[test]
fn port_refused_for_room_is_programmed_once_the_same_sync_frees_it() {
    let datapath = MemoryDatapath {
        capacity: Some(Capacity {
            services: 4,
            backends: 100,
            rev_nat: 100,
            source_ranges: 100,
            affinity_match: 100,
            maglev_tables: 100,
        }),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    reconciler.sync(&desired(&[
        ("a", plan(10, &[11], None)),
        ("b", plan(20, &[21], None)),
    ]));
    // a goes, c comes: c only fits once a is deleted, which is done last.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    let report = reconciler.sync(&desired(&[
        ("b", plan(20, &[21], None)),
        ("c", plan(30, &[31], None)),
    ]));
    assert!(report.over_capacity.is_empty(), "{report:?}");
    assert_eq!((report.frontends_written, report.frontends_deleted), (1, 1));
    assert_eq!(
        backends_of(reconciler.datapath(), 30),
        Some(vec![backend(31)])
    );
    assert_consistent_at_every_write(&before, &reconciler.datapath().writes[writes_before..]);
}

#[test]
fn port_refused_for_room_is_programmed_by_the_later_sync_whose_deletes_free_it() {
    let datapath = MemoryDatapath {
        capacity: Some(Capacity {
            services: 4,
            backends: 100,
            rev_nat: 100,
            source_ranges: 100,
            affinity_match: 100,
            maglev_tables: 100,
        }),
        ..MemoryDatapath::default()
    };
    let mut reconciler = Reconciler::new(datapath).unwrap();
    // a and b fill the services map (master and slot each): c is refused,
    // which is no failure to retry.
    let report = reconciler.sync(&desired(&[
        ("a", plan(10, &[11], None)),
        ("b", plan(20, &[21], None)),
        ("c", plan(30, &[31], None)),
    ]));
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.over_capacity.len(), 1);
    assert_eq!(report.over_capacity[0].0, port_name("c"));
    assert_eq!(backends_of(reconciler.datapath(), 30), None);

    // The next change deletes a: its room goes to c in that same sync.
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    let report = reconciler.sync(&desired(&[
        ("b", plan(20, &[21], None)),
        ("c", plan(30, &[31], None)),
    ]));
    assert!(report.over_capacity.is_empty(), "{report:?}");
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(backends_of(reconciler.datapath(), 10), None);
    assert_eq!(
        backends_of(reconciler.datapath(), 30),
        Some(vec![backend(31)])
    );
    assert_consistent_at_every_write(&before, &reconciler.datapath().writes[writes_before..]);
    reconciler.datapath().check_settled().unwrap();
}

#[test]
fn capacity_counts_every_map_a_port_adds_to() {
    let node_port = || desired(&[("web", node_port_local())]);
    // (map, capacity with that map one entry short, needed, free)
    let full = Capacity {
        services: 8,
        backends: 2,
        rev_nat: 2,
        source_ranges: 0,
        affinity_match: 0,
        maglev_tables: 1,
    };
    let cases = [
        (
            map_names::SERVICES,
            Capacity {
                services: 7,
                ..full
            },
            8,
            7,
        ),
        (
            map_names::BACKENDS,
            Capacity {
                backends: 1,
                ..full
            },
            2,
            1,
        ),
        (map_names::REV_NAT, Capacity { rev_nat: 1, ..full }, 2, 1),
        (
            map_names::MAGLEV,
            Capacity {
                maglev_tables: 0,
                ..full
            },
            1,
            0,
        ),
    ];
    let mut reconciler = Reconciler::new(MemoryDatapath {
        capacity: Some(full),
        ..MemoryDatapath::default()
    })
    .unwrap();
    assert!(reconciler.sync(&node_port()).over_capacity.is_empty());
    for (map, capacity, needed, free) in cases {
        let mut reconciler = Reconciler::new(MemoryDatapath {
            capacity: Some(capacity),
            ..MemoryDatapath::default()
        })
        .unwrap();
        let report = reconciler.sync(&node_port());
        assert_eq!(
            report.over_capacity,
            vec![(port_name("web"), OverCapacity { map, needed, free })],
            "{map}"
        );
        assert!(reconciler.datapath().writes.is_empty(), "{map}");
    }

    // Source ranges and affinity pairs count too.
    let mut lb = port_plan(
        vec![external_plan(
            lb_ip(),
            FrontendKind::LoadBalancer,
            selection(&[11], WhenEmpty::Reject),
            selection(&[11], WhenEmpty::Reject),
            &["203.0.113.0/24", "192.0.2.0/24"],
        )],
        None,
    );
    let room = Capacity {
        services: 100,
        backends: 100,
        rev_nat: 100,
        source_ranges: 1,
        affinity_match: 0,
        maglev_tables: 100,
    };
    let mut reconciler = Reconciler::new(MemoryDatapath {
        capacity: Some(room),
        ..MemoryDatapath::default()
    })
    .unwrap();
    let report = reconciler.sync(&desired(&[("web", lb.clone())]));
    assert_eq!(
        report.over_capacity[0].1,
        OverCapacity {
            map: map_names::SOURCE_RANGES,
            needed: 2,
            free: 1
        }
    );
    lb.frontends[0].source_ranges.clear();
    lb.affinity_timeout = Some(60);
    let report = reconciler.sync(&desired(&[("web", lb)]));
    assert_eq!(
        report.over_capacity[0].1,
        OverCapacity {
            map: map_names::AFFINITY_MATCH,
            needed: 1,
            free: 0
        },
        "one set, shared by both scopes"
    );
}

#[test]
fn slots_beyond_a_shrunk_master_s_count_are_swept_on_restart() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    reconciler.sync(&desired(&[("web", plan(10, &[11, 12, 13], None))]));
    // A crash after the master shrank to one slot, before its tail went.
    let mut interrupted = snapshot(reconciler.datapath());
    let master_key = codec::service_key(&frontend(10), scope::INTERNAL, 0);
    interrupted.services.get_mut(&master_key).unwrap().count = 1;
    assert!(interrupted.check_settled().is_err());

    let mut restarted = Reconciler::new(snapshot(&interrupted)).unwrap();
    let report = restarted.sync(&desired(&[("web", plan(10, &[11], None))]));
    assert!(report.is_complete());
    assert_eq!(report.backends_deleted, 2);
    let datapath = restarted.datapath();
    assert_eq!(backends_of(datapath, 10), Some(vec![backend(11)]));
    assert_eq!(datapath.services.len(), 2, "master and its one slot");
    assert_consistent_at_every_write(&interrupted, &datapath.writes);

    // The same when the master grows again in that sync: slot 2 is
    // rewritten before the count, slot 3 goes.
    let mut restarted = Reconciler::new(snapshot(&interrupted)).unwrap();
    restarted.sync(&desired(&[("web", plan(10, &[11, 14], None))]));
    let datapath = restarted.datapath();
    assert_eq!(
        backends_of(datapath, 10),
        Some(vec![backend(11), backend(14)])
    );
    assert_eq!(datapath.services.len(), 3);
    assert_consistent_at_every_write(&interrupted, &datapath.writes);
}

/// A small table size, so tests stay quick; prime like every M.
fn small_table() -> TableSize {
    TableSize::new(251).unwrap()
}

/// NodePort 192.168.0.2:30080 and LB IP 198.51.100.10:80 under an
/// eTP=Cluster policy: both scopes select `backends` (the LB IP only
/// `lb_backends` from outside, when given).
fn load_balancer(backends: &[u8], lb_backends: Option<&[u8]>) -> ServicePortPlan {
    let all = selection(backends, WhenEmpty::Reject);
    let lb = selection(lb_backends.unwrap_or(backends), WhenEmpty::Drop);
    port_plan(
        vec![
            external_plan(
                node_port_frontend(30080),
                FrontendKind::NodePort,
                all.clone(),
                all.clone(),
                &[],
            ),
            external_plan(lb_ip(), FrontendKind::LoadBalancer, all, lb, &[]),
        ],
        None,
    )
}

/// The backends in the slots of the Maglev table `frontend`'s external
/// master uses, in slot order.
fn maglev_backends(datapath: &MemoryDatapath, frontend: &Frontend) -> Option<Vec<BackendAddr>> {
    let master = master(datapath, frontend, scope::EXTERNAL)?;
    let table = datapath.maglev.get(&codec::maglev_key(&master))?;
    Some(
        table[1..]
            .iter()
            .map(|id| codec::backend_addr(&datapath.backends[id]).unwrap())
            .collect(),
    )
}

fn maglev_writes(writes: &[Write]) -> Vec<&Write> {
    writes
        .iter()
        .filter(|write| {
            matches!(
                write,
                Write::PutMaglevTable(..) | Write::DeleteMaglevTable(..)
            )
        })
        .collect()
}

#[test]
fn maglev_external_masters_share_the_table_of_their_selection_written_before_them() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    let report = reconciler.sync(&desired(&[("web", load_balancer(&[11, 12], None))]));
    assert_eq!(report.maglev_tables_written, 1, "{report:?}");
    let datapath = reconciler.datapath();
    let node_port = master(datapath, &node_port_frontend(30080), scope::EXTERNAL).unwrap();
    let lb = master(datapath, &lb_ip(), scope::EXTERNAL).unwrap();
    assert_eq!(codec::maglev_key(&node_port), codec::maglev_key(&lb));
    let table = &datapath.maglev[&codec::maglev_key(&node_port)];
    assert_eq!(table.len(), 252);
    assert_eq!(table[0], 251, "[0] holds M");
    assert_eq!(
        table[1..].iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([&backend_id(datapath, 11), &backend_id(datapath, 12)])
    );
    let backends = maglev_backends(datapath, &node_port_frontend(30080)).unwrap();
    assert_eq!(
        backends,
        maglev::table(&[backend(11), backend(12)], small_table()),
        "the model's table, by this node's ids"
    );
    let table_write = datapath
        .writes
        .iter()
        .position(|write| matches!(write, Write::PutMaglevTable(..)))
        .unwrap();
    let first_external_master = datapath
        .writes
        .iter()
        .position(|write| {
            matches!(write, Write::PutService(key, _) if key.slot == 0 && key.scope == scope::EXTERNAL)
        })
        .unwrap();
    assert!(table_write < first_external_master);
    assert_consistent_at_every_write(&MemoryDatapath::default(), &datapath.writes);
}

#[test]
fn maglev_frontends_selecting_other_backends_get_their_own_table() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    reconciler.sync(&desired(&[("web", load_balancer(&[11, 12], Some(&[11])))]));
    let datapath = reconciler.datapath();
    assert_eq!(datapath.maglev.len(), 2);
    assert_eq!(
        maglev_backends(datapath, &lb_ip()).unwrap(),
        vec![backend(11); 251]
    );
    assert_eq!(
        maglev_backends(datapath, &node_port_frontend(30080))
            .unwrap()
            .into_iter()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([backend(11), backend(12)])
    );
    datapath.check_settled().unwrap();
}

#[test]
fn maglev_tables_are_rebuilt_only_when_their_backends_change() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    reconciler.sync(&desired(&[("web", load_balancer(&[11, 12], None))]));
    assert!(
        reconciler
            .sync(&desired(&[("web", load_balancer(&[11, 12], None))]))
            .is_noop()
    );

    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();
    let report = reconciler.sync(&desired(&[("web", load_balancer(&[11, 12, 13], None))]));
    assert_eq!(report.maglev_tables_written, 1);
    let datapath = reconciler.datapath();
    let writes = &datapath.writes[writes_before..];
    assert_eq!(
        maglev_writes(writes).len(),
        1,
        "one table swapped: {writes:?}"
    );
    assert_eq!(
        maglev_backends(datapath, &lb_ip()).unwrap(),
        maglev::table(&[backend(11), backend(12), backend(13)], small_table())
    );
    assert_consistent_at_every_write(&before, writes);
}

#[test]
fn maglev_table_goes_after_the_masters_that_use_it_and_before_its_backends() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    reconciler.sync(&desired(&[("web", load_balancer(&[11, 12], None))]));
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();

    let report = reconciler.sync(&DesiredState::default());
    assert_eq!(report.maglev_tables_deleted, 1);
    let datapath = reconciler.datapath();
    assert!(datapath.maglev.is_empty());
    let writes = &datapath.writes[writes_before..];
    let table_delete = writes
        .iter()
        .position(|write| matches!(write, Write::DeleteMaglevTable(..)))
        .unwrap();
    assert!(
        writes[..table_delete]
            .iter()
            .filter(|write| matches!(write, Write::DeleteService(key) if key.slot == 0))
            .count()
            == 4,
        "all four masters first: {writes:?}"
    );
    assert!(
        writes[table_delete..]
            .iter()
            .any(|write| matches!(write, Write::DeleteBackend(..))),
        "backends after: {writes:?}"
    );
    assert_consistent_at_every_write(&before, writes);
}

#[test]
fn rule_18_maglev_table_goes_when_the_external_selection_empties() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    reconciler.sync(&desired(&[("web", load_balancer(&[11, 12], Some(&[11])))]));
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();

    // No local endpoint for the LB IP any more: it drops, with no table.
    reconciler.sync(&desired(&[("web", load_balancer(&[11, 12], Some(&[])))]));
    let datapath = reconciler.datapath();
    let lb = master(datapath, &lb_ip(), scope::EXTERNAL).unwrap();
    assert_eq!((lb.count, lb.flags), (0, service_flags::DROP_WHEN_EMPTY));
    assert_eq!(datapath.maglev.len(), 1, "the NodePort's stays");
    assert!(maglev_backends(datapath, &node_port_frontend(30080)).is_some());
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn rule_06_maglev_table_follows_a_backend_whose_id_changes() {
    let mut plan = load_balancer(&[11, 12], None);
    plan.local_backends = vec![backend(11)];
    let mut reconciler = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    reconciler.sync(&desired(&[("web", plan.clone())]));
    let before = snapshot(reconciler.datapath());
    let writes_before = reconciler.datapath().writes.len();

    // The endpoint moves off the node: a new backend entry and id; the
    // table must stop naming the old one before it goes.
    plan.local_backends.clear();
    let report = reconciler.sync(&desired(&[("web", plan)]));
    assert_eq!(report.maglev_tables_written, 1);
    let datapath = reconciler.datapath();
    assert_eq!(
        maglev_backends(datapath, &lb_ip()).unwrap(),
        maglev::table(&[backend(11), backend(12)], small_table())
    );
    assert_consistent_at_every_write(&before, &datapath.writes[writes_before..]);
}

#[test]
fn maglev_restart_rebuilds_every_table_once_and_removes_stray_ones() {
    let state = desired(&[("web", load_balancer(&[11, 12], Some(&[11])))]);
    let mut first = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    first.sync(&state);
    let before = snapshot(first.datapath());
    // A table a crash left behind, after its masters went.
    let mut interrupted = snapshot(&before);
    let stray = MaglevKey {
        svc_id: 99,
        selection: 0,
    };
    interrupted.maglev.insert(stray, codec::maglev_table(&[]));

    let mut restarted = Reconciler::new(snapshot(&interrupted))
        .unwrap()
        .with_maglev_table_size(small_table());
    let report = restarted.sync(&state);
    assert_eq!(
        (report.maglev_tables_written, report.maglev_tables_deleted),
        (2, 1)
    );
    let datapath = restarted.datapath();
    assert_eq!(datapath.maglev, before.maglev, "the same tables again");
    assert_eq!(
        datapath.writes.len(),
        3,
        "nothing else is rewritten: {:?}",
        datapath.writes
    );
    datapath.check_settled().unwrap();
    assert!(restarted.sync(&state).is_noop(), "once");
}

#[test]
fn maglev_table_size_change_rebuilds_every_table_at_restart() {
    let state = desired(&[("web", load_balancer(&[11, 12], Some(&[11])))]);
    let mut first = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    first.sync(&state);
    let before = snapshot(first.datapath());

    let bigger = TableSize::new(509).unwrap();
    let mut restarted = Reconciler::new(snapshot(&before))
        .unwrap()
        .with_maglev_table_size(bigger);
    restarted.sync(&state);
    let datapath = restarted.datapath();
    assert_eq!(datapath.maglev.len(), 2);
    for table in datapath.maglev.values() {
        assert_eq!((table[0], table.len()), (509, 510));
    }
    assert_eq!(
        maglev_backends(datapath, &node_port_frontend(30080)).unwrap(),
        maglev::table(&[backend(11), backend(12)], bigger)
    );
    assert_consistent_at_every_write(&before, &datapath.writes);
}

#[test]
fn maglev_nodes_with_other_backend_ids_build_the_same_table() {
    let web = || load_balancer(&[11, 12, 13], None);
    let mut node1 = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    node1.sync(&desired(&[("web", web())]));
    // Node 2 learnt other backends first: its ids differ.
    let mut node2 = Reconciler::new(MemoryDatapath::default())
        .unwrap()
        .with_maglev_table_size(small_table());
    node2.sync(&desired(&[("api", plan(20, &[13, 14, 12], None))]));
    node2.sync(&desired(&[
        ("api", plan(20, &[13, 14, 12], None)),
        ("web", web()),
    ]));
    assert_ne!(
        backend_id(node1.datapath(), 13),
        backend_id(node2.datapath(), 13)
    );
    assert_eq!(
        maglev_backends(node1.datapath(), &lb_ip()),
        maglev_backends(node2.datapath(), &lb_ip())
    );
}

#[test]
fn maglev_table_that_does_not_fit_refuses_its_port() {
    let mut reconciler = Reconciler::new(MemoryDatapath {
        capacity: Some(Capacity {
            maglev_tables: 1,
            ..crate::maps::memory::UNLIMITED
        }),
        ..MemoryDatapath::default()
    })
    .unwrap()
    .with_maglev_table_size(small_table());
    let report = reconciler.sync(&desired(&[("web", load_balancer(&[11, 12], Some(&[11])))]));
    assert_eq!(
        report.over_capacity,
        vec![(
            port_name("web"),
            OverCapacity {
                map: map_names::MAGLEV,
                needed: 2,
                free: 1
            }
        )]
    );
    assert!(reconciler.datapath().writes.is_empty());
}

#[test]
fn reread_lets_the_next_sync_repair_what_others_changed_in_the_maps() {
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    let state = desired(&[
        ("api", plan(20, &[21], None)),
        ("web", plan(10, &[11, 12], Some(300))),
    ]);
    assert!(reconciler.sync(&state).is_complete());
    let programmed = snapshot(reconciler.datapath());

    // Someone else deletes web's master, a backend and the affinity
    // pairs, points api's slot elsewhere and adds a frontend of their own.
    let web_master = codec::service_key(&frontend(10), scope::INTERNAL, 0);
    let api_slot = codec::service_key(&frontend(20), scope::INTERNAL, 1);
    let stranger = codec::service_key(&frontend(30), scope::INTERNAL, 0);
    let maps = &mut reconciler.datapath;
    maps.services.remove(&web_master);
    let backend_id = *maps.backends.keys().next().unwrap();
    maps.backends.remove(&backend_id);
    maps.services.insert(api_slot, ServiceValue::slot(999));
    maps.services.insert(stranger, ServiceValue::slot(0));
    assert!(!maps.affinity_match.is_empty());
    maps.affinity_match.clear();

    assert!(
        reconciler.sync(&state).is_noop(),
        "without a reread the mirror hides the damage"
    );
    reconciler.reread().unwrap();
    let rebuilt = Index::of(
        &reconciler.services,
        reconciler
            .maglev
            .values()
            .flatten()
            .flat_map(|build| build.backend_ids.values().copied()),
        &reconciler.affinity_match,
    );
    assert_eq!(reconciler.index, rebuilt, "the mirror's index follows it");
    let report = reconciler.sync(&state);
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.frontends_deleted, 1, "the stranger goes: {report:?}");
    let repaired = reconciler.datapath();
    assert_eq!(
        repaired.services, programmed.services,
        "same entries, same ids"
    );
    assert_eq!(repaired.backends, programmed.backends);
    assert_eq!(repaired.rev_nat, programmed.rev_nat);
    assert_eq!(repaired.affinity_match, programmed.affinity_match);
    repaired.check_settled().unwrap();
    assert!(reconciler.sync(&state).is_noop());
}
