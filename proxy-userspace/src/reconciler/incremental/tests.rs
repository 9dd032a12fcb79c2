//! An incremental sync must leave the maps as a full sync of the same
//! desired state does, whatever the sequence of changes before it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use proxy_common::{Backend, RevNat, ServiceKey, scope};

use crate::{
    maps::{
        Capacity,
        codec::{self, SourceRangeEntry},
        memory::{MemoryDatapath, UNLIMITED},
    },
    model::{
        Planner, desired_state,
        fixtures::{self, Rng, random_change},
    },
    reconciler::Reconciler,
};

/// A master as a reader of the maps sees it, with every id resolved to
/// what it names.
#[derive(Debug, PartialEq, Eq)]
struct MasterView {
    count: u16,
    flags: u8,
    selection: u8,
    affinity_timeout: u32,
    rev_nat: Option<RevNat>,
    slots: Vec<Option<Backend>>,
    maglev: Option<Vec<Option<Backend>>>,
    source_ranges: BTreeSet<ipnet::Ipv4Net>,
    affinity: BTreeSet<Option<Backend>>,
}

/// The maps without their ids, and how many entries each holds (no
/// leaks: ids hidden, counts still compared).
#[derive(Debug, PartialEq, Eq)]
struct View {
    masters: BTreeMap<ServiceKey, MasterView>,
    counts: [usize; 6],
}

fn view(maps: &MemoryDatapath) -> View {
    let backend = |id: &u32| maps.backends.get(id).copied();
    let masters = maps
        .services
        .iter()
        .filter(|(key, _)| key.slot == 0)
        .map(|(key, master)| {
            let slots = (1..=master.count)
                .map(|slot| {
                    maps.services
                        .get(&key.with_slot(slot))
                        .and_then(|value| backend(&value.backend_id))
                })
                .collect();
            let maglev = (key.scope == scope::EXTERNAL && master.count > 0)
                .then(|| maps.maglev.get(&codec::maglev_key(master)))
                .flatten()
                .map(|table| table[1..].iter().map(backend).collect());
            let source_ranges = maps
                .source_ranges
                .iter()
                .filter(|range: &&SourceRangeEntry| {
                    master.rev_nat_id != 0 && range.rev_nat_id == master.rev_nat_id
                })
                .map(|range| range.cidr)
                .collect();
            let affinity = maps
                .affinity_match
                .iter()
                .filter(|pair| {
                    master.svc_id != 0
                        && pair.svc_id == master.svc_id
                        && pair.selection == u32::from(master.selection)
                })
                .map(|pair| backend(&pair.backend_id))
                .collect();
            let view = MasterView {
                count: master.count,
                flags: master.flags,
                selection: master.selection,
                affinity_timeout: master.affinity_timeout,
                rev_nat: maps.rev_nat.get(&master.rev_nat_id).copied(),
                slots,
                maglev,
                source_ranges,
                affinity,
            };
            (*key, view)
        })
        .collect();
    View {
        masters,
        counts: [
            maps.services.len(),
            maps.backends.len(),
            maps.rev_nat.len(),
            maps.source_ranges.len(),
            maps.affinity_match.len(),
            maps.maglev.len(),
        ],
    }
}

#[test]
fn incremental_syncs_leave_the_maps_a_full_sync_leaves() {
    for seed in 0..40 {
        let mut rng = Rng::new(seed);
        let mut snapshot = fixtures::snapshot();
        let mut planner = Planner::default();
        let mut incremental = Reconciler::new(MemoryDatapath::default()).unwrap();
        let mut full = Reconciler::new(MemoryDatapath::default()).unwrap();
        for step in 0..100 {
            random_change(&mut rng, &mut snapshot);
            let change = planner.apply(snapshot.clone());
            let report = incremental.sync_change(planner.desired(), &change);
            assert!(report.is_complete(), "seed {seed}, step {step}: {report:?}");
            full.sync(&desired_state(&snapshot));
            let maps = incremental.datapath();
            if let Err(err) = maps.check_settled() {
                panic!("seed {seed}, step {step}: {err}");
            }
            assert_eq!(
                view(maps),
                view(full.datapath()),
                "seed {seed}, step {step}, {change:?}"
            );
        }
    }
}

#[test]
fn a_change_writes_only_what_it_changes() {
    let mut snapshot = fixtures::snapshot();
    for last in 1..=50 {
        let name = format!("svc-{last}");
        let service = fixtures::cluster_ip_service(&name, Ipv4Addr::new(10, 96, 0, last));
        snapshot
            .services
            .insert(service.key.clone(), Arc::new(service));
        let slice = fixtures::ready_slice(&name, &name, &[Ipv4Addr::new(10, 244, 0, last)]);
        snapshot.slices.insert(slice.key.clone(), Arc::new(slice));
    }
    let mut planner = Planner::default();
    let mut reconciler = Reconciler::new(MemoryDatapath::default()).unwrap();
    let change = planner.apply(snapshot.clone());
    reconciler.sync_change(planner.desired(), &change);
    let written = reconciler.datapath().writes.len();

    let moved = fixtures::ready_slice("svc-7", "svc-7", &[Ipv4Addr::new(10, 244, 1, 7)]);
    snapshot.slices.insert(moved.key.clone(), Arc::new(moved));
    let change = planner.apply(snapshot.clone());
    let report = reconciler.sync_change(planner.desired(), &change);
    // The new backend, its slot, and the old backend deleted.
    assert_eq!(
        (
            report.backends_added,
            report.backends_deleted,
            report.frontends_written
        ),
        (1, 1, 1)
    );
    assert_eq!(reconciler.datapath().writes.len() - written, 3);
    reconciler.datapath().check_settled().unwrap();
}

/// Rule 9 and self-repair: a port refused for room is programmed by a
/// later change that frees room, though that change does not touch it.
#[test]
fn a_port_refused_for_room_is_programmed_once_a_delete_frees_it() {
    let mut snapshot = fixtures::snapshot();
    for (last, name) in [(1, "a"), (2, "b")] {
        let service = fixtures::cluster_ip_service(name, Ipv4Addr::new(10, 96, 0, last));
        snapshot
            .services
            .insert(service.key.clone(), Arc::new(service));
        let slice = fixtures::ready_slice(name, name, &[Ipv4Addr::new(10, 244, 0, last)]);
        snapshot.slices.insert(slice.key.clone(), Arc::new(slice));
    }
    let datapath = MemoryDatapath {
        capacity: Some(Capacity {
            backends: 1,
            ..UNLIMITED
        }),
        ..MemoryDatapath::default()
    };
    let mut planner = Planner::default();
    let mut reconciler = Reconciler::new(datapath).unwrap();
    let change = planner.apply(snapshot.clone());
    let report = reconciler.sync_change(planner.desired(), &change);
    assert_eq!(report.over_capacity.len(), 1);
    let refused = report.over_capacity[0].0.clone();
    assert_eq!(refused.service.name(), "b");

    // An unrelated change that deletes "a" makes room for "b".
    snapshot.services.remove(&fixtures::key("default", "a"));
    let change = planner.apply(snapshot.clone());
    assert!(!change.ports.contains(&refused));
    let report = reconciler.sync_change(planner.desired(), &change);
    assert!(report.over_capacity.is_empty(), "{report:?}");
    let maps = reconciler.datapath();
    maps.check_settled().unwrap();
    let frontend = codec::service_key(
        &desired_state(&snapshot).ports[&refused].frontends[0].frontend,
        scope::INTERNAL,
        0,
    );
    assert_eq!(maps.services[&frontend].count, 1);
}
