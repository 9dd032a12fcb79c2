//! What the datapath holds, read from the pinned maps (not from an agent's
//! memory), for `ebpf-proxy services | backends | counters`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray};
use ipnet::Ipv4Net;
use proxy_common::{
    Backend, Counter, ServiceKey, ServiceValue, SourceRange, map_names, scope, service_flags,
};
use serde::Serialize;

use crate::{
    maps::{codec, codec::SourceRangeEntry, open_pinned},
    model::{BackendAddr, Frontend},
};

/// One master entry: a frontend in one scope, and the backends its slots
/// select, in slot order.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FrontendRow {
    pub frontend: Frontend,
    /// "internal" (clients on this node, translated at socket level) or
    /// "external" (packets from outside the node, translated by tc).
    pub scope: &'static str,
    pub svc_id: u32,
    /// The frontend's id in the rev-NAT map (both scopes share it).
    pub rev_nat_id: u32,
    /// Seconds; 0 when ClientIP affinity is off.
    pub affinity_timeout: u32,
    /// What new flows get while `backends` is empty: "refuse" (no endpoint
    /// anywhere, rule 21) or "drop" (endpoints elsewhere only, rule 28).
    pub when_empty: &'static str,
    /// The master's flags by name: "drop-when-empty", "source-ranges".
    pub flags: Vec<&'static str>,
    /// Rule 15: the sources new flows must come from, when the master
    /// checks them ("source-ranges"); empty otherwise.
    pub source_ranges: Vec<Ipv4Net>,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub backend: Option<BackendAddr>,
    /// The endpoint runs on this node: external flows to it are not
    /// source-NATed (rule 17).
    pub local: bool,
}

impl BackendRow {
    fn new(id: u32, backend: Option<&Backend>) -> Self {
        Self {
            id,
            backend: backend.and_then(codec::backend_addr),
            local: backend.is_some_and(codec::is_local),
        }
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CounterRow {
    pub name: &'static str,
    pub value: u64,
}

/// Opens a pinned map, telling the operator what a missing pin means.
fn pinned(bpffs: &Path, name: &'static str) -> Result<MapData> {
    open_pinned(bpffs, name)
        .with_context(|| format!("is an agent running with --bpffs {}?", bpffs.display()))
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>> {
    Ok(HashMap::try_from(Map::HashMap(pinned(bpffs, name)?))?)
}

pub fn backends(bpffs: &Path) -> Result<BTreeMap<u32, Backend>> {
    let map: HashMap<_, u32, Backend> = hash_map(bpffs, map_names::BACKENDS)?;
    Ok(map.iter().collect::<Result<_, _>>()?)
}

fn source_ranges(bpffs: &Path) -> Result<BTreeSet<SourceRangeEntry>> {
    let data = pinned(bpffs, map_names::SOURCE_RANGES)?;
    let map: LpmTrie<_, SourceRange, u8> = LpmTrie::try_from(Map::LpmTrie(data))?;
    let keys = map.keys().collect::<Result<Vec<_>, _>>()?;
    Ok(keys.iter().filter_map(codec::source_range_entry).collect())
}

/// How many times [`frontends`] reads the maps before it shows a slot whose
/// backend it could not find.
const CONSISTENT_READ_ATTEMPTS: usize = 5;

/// The frontends as the datapath holds them. The maps are read one after
/// the other while a running agent may be writing them: a slot read before
/// the agent retired its backend names an id that is gone by the time the
/// backends are read. Such a read is taken again; a dangling slot that
/// stays is shown (as a backend of `null`).
pub fn frontends(bpffs: &Path) -> Result<Vec<FrontendRow>> {
    let map: HashMap<_, ServiceKey, ServiceValue> = hash_map(bpffs, map_names::SERVICES)?;
    let mut attempt = 1;
    loop {
        let services: BTreeMap<ServiceKey, ServiceValue> = map.iter().collect::<Result<_, _>>()?;
        let rows = frontend_rows(&services, &backends(bpffs)?, &source_ranges(bpffs)?);
        let dangling = rows
            .iter()
            .flat_map(|row| &row.backends)
            .any(|backend| backend.backend.is_none());
        if !dangling || attempt == CONSISTENT_READ_ATTEMPTS {
            return Ok(rows);
        }
        attempt += 1;
    }
}

/// One row per master entry, by frontend, the internal scope first.
fn frontend_rows(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    backends: &BTreeMap<u32, Backend>,
    source_ranges: &BTreeSet<SourceRangeEntry>,
) -> Vec<FrontendRow> {
    let mut rows: Vec<(u8, FrontendRow)> = services
        .iter()
        // Rule 9 wildcards (port 0) are not frontends.
        .filter(|(key, _)| key.slot == 0 && !codec::is_cluster_ip_wildcard(key))
        .filter_map(|(key, master)| {
            let frontend = codec::frontend(key)?;
            let backends = (1..=master.count)
                .filter_map(|slot| services.get(&key.with_slot(slot)))
                .map(|slot| BackendRow::new(slot.backend_id, backends.get(&slot.backend_id)))
                .collect();
            let checks_sources = master.flags & service_flags::SOURCE_RANGES != 0;
            let row = FrontendRow {
                frontend,
                scope: match key.scope {
                    scope::INTERNAL => "internal",
                    scope::EXTERNAL => "external",
                    _ => "unknown",
                },
                svc_id: master.svc_id,
                rev_nat_id: master.rev_nat_id,
                affinity_timeout: master.affinity_timeout,
                when_empty: if master.flags & service_flags::DROP_WHEN_EMPTY != 0 {
                    "drop"
                } else {
                    "refuse"
                },
                flags: flag_names(master.flags),
                source_ranges: source_ranges
                    .iter()
                    .filter(|range| checks_sources && range.rev_nat_id == master.rev_nat_id)
                    .map(|range| range.cidr)
                    .collect(),
                backends,
            };
            Some((key.scope, row))
        })
        .collect();
    rows.sort_by_key(|(scope, row)| (row.frontend, *scope));
    rows.into_iter().map(|(_, row)| row).collect()
}

fn flag_names(flags: u8) -> Vec<&'static str> {
    [
        (service_flags::DROP_WHEN_EMPTY, "drop-when-empty"),
        (service_flags::SOURCE_RANGES, "source-ranges"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

pub fn counters(bpffs: &Path) -> Result<Vec<CounterRow>> {
    let data = pinned(bpffs, map_names::COUNTERS)?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    Counter::ALL
        .iter()
        .map(|counter| {
            let per_cpu = map.get(&(*counter as u32), 0)?;
            Ok(CounterRow {
                name: counter.name(),
                value: per_cpu.iter().sum(),
            })
        })
        .collect()
}

fn endpoint(addr: Ipv4Addr, port: u16) -> String {
    format!("{addr}:{port}")
}

pub fn frontends_table(rows: &[FrontendRow]) -> String {
    let mut out = format!(
        "{:<24} {:<5} {:<8} {:>6} {:>7} {:>8}  {:<18} {}\n",
        "FRONTEND", "PROTO", "SCOPE", "SVC_ID", "REV_NAT", "AFFINITY", "SOURCES", "BACKENDS"
    );
    for row in rows {
        let backends = if row.backends.is_empty() {
            match row.when_empty {
                "drop" => "(none: new connections dropped)".to_string(),
                _ => "(none: new connections refused)".to_string(),
            }
        } else {
            row.backends
                .iter()
                .map(|b| {
                    let local = if b.local { "(local)" } else { "" };
                    match &b.backend {
                        Some(addr) => format!("{}#{}{local}", endpoint(addr.addr, addr.port), b.id),
                        None => format!("?#{}", b.id),
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let affinity = match row.affinity_timeout {
            0 => "-".to_string(),
            seconds => format!("{seconds}s"),
        };
        let sources = if !row.flags.contains(&"source-ranges") {
            "any".to_string()
        } else if row.source_ranges.is_empty() {
            "none".to_string()
        } else {
            row.source_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let _ = writeln!(
            out,
            "{:<24} {:<5} {:<8} {:>6} {:>7} {:>8}  {:<18} {}",
            endpoint(row.frontend.addr, row.frontend.port),
            format!("{:?}", row.frontend.protocol).to_uppercase(),
            row.scope,
            row.svc_id,
            row.rev_nat_id,
            affinity,
            sources,
            backends
        );
    }
    out
}

pub fn backends_table(backends: &BTreeMap<u32, Backend>) -> String {
    let mut out = format!(
        "{:>6}  {:<24} {:<5} {}\n",
        "ID", "BACKEND", "PROTO", "LOCAL"
    );
    for (id, backend) in backends {
        let local = if codec::is_local(backend) { "yes" } else { "-" };
        let _ = match codec::backend_addr(backend) {
            Some(addr) => writeln!(
                out,
                "{id:>6}  {:<24} {:<5} {local}",
                endpoint(addr.addr, addr.port),
                format!("{:?}", addr.protocol).to_uppercase()
            ),
            None => writeln!(out, "{id:>6}  (unknown protocol {})", backend.proto),
        };
    }
    out
}

pub fn counters_table(rows: &[CounterRow]) -> String {
    let width = rows.iter().map(|row| row.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for row in rows {
        let _ = writeln!(out, "{:<width$} {:>12}", row.name, row.value);
    }
    out
}

/// `--output json` of `ebpf-proxy backends`.
pub fn backends_json(backends: &BTreeMap<u32, Backend>) -> serde_json::Value {
    let rows: Vec<BackendRow> = backends
        .iter()
        .map(|(id, backend)| BackendRow::new(*id, Some(backend)))
        .collect();
    serde_json::json!(rows)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Protocol;

    fn at(addr: [u8; 4], port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::from(addr),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn backend_at(last: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(10, 244, 1, last),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    /// A ClusterIP, and a LoadBalancer IP whose external master checks
    /// source ranges and drops while no endpoint is local (eTP=Local).
    fn maps() -> (
        BTreeMap<ServiceKey, ServiceValue>,
        BTreeMap<u32, Backend>,
        BTreeSet<SourceRangeEntry>,
    ) {
        let master = |count, flags, rev_nat_id| ServiceValue {
            count,
            flags,
            selection: 0,
            svc_id: 7,
            affinity_timeout: 0,
            rev_nat_id,
            ..ServiceValue::slot(0)
        };
        let cluster_ip = at([10, 96, 0, 10], 80);
        let lb_ip = at([198, 51, 100, 10], 80);
        let services = BTreeMap::from([
            (
                codec::service_key(&cluster_ip, scope::INTERNAL, 0),
                master(2, 0, 1),
            ),
            (
                codec::service_key(&cluster_ip, scope::INTERNAL, 1),
                ServiceValue::slot(3),
            ),
            (
                codec::service_key(&cluster_ip, scope::INTERNAL, 2),
                ServiceValue::slot(4),
            ),
            (
                codec::service_key(&lb_ip, scope::EXTERNAL, 0),
                master(
                    0,
                    service_flags::DROP_WHEN_EMPTY | service_flags::SOURCE_RANGES,
                    2,
                ),
            ),
            (
                codec::cluster_ip_wildcard(cluster_ip.addr, Protocol::Tcp),
                ServiceValue::slot(0),
            ),
        ]);
        let backends = BTreeMap::from([
            (3, codec::backend(&backend_at(5), true)),
            (4, codec::backend(&backend_at(6), false)),
        ]);
        let ranges = BTreeSet::from([
            SourceRangeEntry::new(2, "203.0.113.0/24".parse().unwrap()),
            // Another frontend's.
            SourceRangeEntry::new(1, "192.0.2.0/24".parse().unwrap()),
        ]);
        (services, backends, ranges)
    }

    #[test]
    fn services_json_shows_scope_rev_nat_id_flags_ranges_and_local_backends() {
        let (services, backends, ranges) = maps();
        let rows = frontend_rows(&services, &backends, &ranges);
        assert_eq!(
            serde_json::json!(rows),
            json!([
                {
                    "frontend": {"addr": "10.96.0.10", "port": 80, "protocol": "TCP"},
                    "scope": "internal",
                    "svc_id": 7,
                    "rev_nat_id": 1,
                    "affinity_timeout": 0,
                    "when_empty": "refuse",
                    "flags": [],
                    "source_ranges": [],
                    "backends": [
                        {"id": 3, "backend": {"addr": "10.244.1.5", "port": 8080, "protocol": "TCP"}, "local": true},
                        {"id": 4, "backend": {"addr": "10.244.1.6", "port": 8080, "protocol": "TCP"}, "local": false},
                    ],
                },
                {
                    "frontend": {"addr": "198.51.100.10", "port": 80, "protocol": "TCP"},
                    "scope": "external",
                    "svc_id": 7,
                    "rev_nat_id": 2,
                    "affinity_timeout": 0,
                    "when_empty": "drop",
                    "flags": ["drop-when-empty", "source-ranges"],
                    "source_ranges": ["203.0.113.0/24"],
                    "backends": [],
                },
            ])
        );
    }

    #[test]
    fn a_frontend_s_internal_scope_is_listed_before_its_external_one() {
        let node_port = at([192, 168, 0, 2], 30080);
        let master = ServiceValue {
            rev_nat_id: 3,
            ..ServiceValue::slot(0)
        };
        let services = BTreeMap::from([
            (codec::service_key(&node_port, scope::EXTERNAL, 0), master),
            (codec::service_key(&node_port, scope::INTERNAL, 0), master),
        ]);
        let rows = frontend_rows(&services, &BTreeMap::new(), &BTreeSet::new());
        let scopes: Vec<&str> = rows.iter().map(|row| row.scope).collect();
        assert_eq!(scopes, ["internal", "external"]);
        assert!(rows.iter().all(|row| row.frontend == node_port));
    }

    #[test]
    fn table_shows_scope_sources_and_local_backends() {
        let (services, backends, ranges) = maps();
        let table = frontends_table(&frontend_rows(&services, &backends, &ranges));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("FRONTEND"), "{table}");
        for wanted in [
            "internal",
            "any",
            "10.244.1.5:8080#3(local)",
            "10.244.1.6:8080#4",
        ] {
            assert!(lines[1].contains(wanted), "{wanted} in {table}");
        }
        assert!(!lines[1].contains("#4(local)"), "{table}");
        for wanted in ["external", "203.0.113.0/24", "dropped"] {
            assert!(lines[2].contains(wanted), "{wanted} in {table}");
        }
    }

    #[test]
    fn backends_json_and_table_show_local() {
        let (_, backends, _) = maps();
        assert_eq!(
            backends_json(&backends),
            json!([
                {"id": 3, "backend": {"addr": "10.244.1.5", "port": 8080, "protocol": "TCP"}, "local": true},
                {"id": 4, "backend": {"addr": "10.244.1.6", "port": 8080, "protocol": "TCP"}, "local": false},
            ])
        );
        let table = backends_table(&backends);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("LOCAL"), "{table}");
        assert!(lines[1].ends_with("yes"), "{table}");
        assert!(lines[2].ends_with('-'), "{table}");
    }
}
