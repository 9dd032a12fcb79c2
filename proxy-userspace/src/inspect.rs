//! What the datapath holds, read from the pinned maps (not from an agent's
//! memory), for `ebpf-proxy services | backends | counters`.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use proxy_common::{Backend, Counter, ServiceKey, ServiceValue, map_names, service_flags};
use serde::Serialize;

use crate::{
    maps::{codec, open_pinned},
    model::{BackendAddr, Frontend},
};

/// One frontend and the backends its slots select, in slot order.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FrontendRow {
    pub frontend: Frontend,
    pub svc_id: u32,
    /// Seconds; 0 when ClientIP affinity is off.
    pub affinity_timeout: u32,
    /// What new flows get while `backends` is empty: "refuse" (no endpoint
    /// anywhere, rule 21) or "drop" (endpoints elsewhere only, rule 28).
    pub when_empty: &'static str,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub backend: Option<BackendAddr>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CounterRow {
    pub name: &'static str,
    pub value: u64,
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>> {
    let data = open_pinned(bpffs, name)
        .with_context(|| format!("is an agent running with --bpffs {}?", bpffs.display()))?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

pub fn backends(bpffs: &Path) -> Result<BTreeMap<u32, Backend>> {
    let map: HashMap<_, u32, Backend> = hash_map(bpffs, map_names::BACKENDS)?;
    Ok(map.iter().collect::<Result<_, _>>()?)
}

pub fn frontends(bpffs: &Path) -> Result<Vec<FrontendRow>> {
    let map: HashMap<_, ServiceKey, ServiceValue> = hash_map(bpffs, map_names::SERVICES)?;
    let services: BTreeMap<ServiceKey, ServiceValue> = map.iter().collect::<Result<_, _>>()?;
    let backends = backends(bpffs)?;
    let mut rows: Vec<FrontendRow> = services
        .iter()
        // Rule 9 wildcards (port 0) are not frontends.
        .filter(|(key, _)| key.slot == 0 && !codec::is_cluster_ip_wildcard(key))
        .filter_map(|(key, master)| {
            let frontend = codec::frontend(key)?;
            let backends = (1..=master.count)
                .filter_map(|slot| services.get(&ServiceKey { slot, ..*key }))
                .map(|slot| BackendRow {
                    id: slot.backend_id,
                    backend: backends.get(&slot.backend_id).and_then(codec::backend_addr),
                })
                .collect();
            Some(FrontendRow {
                frontend,
                svc_id: master.svc_id,
                affinity_timeout: master.affinity_timeout,
                when_empty: if master.flags & service_flags::DROP_WHEN_EMPTY != 0 {
                    "drop"
                } else {
                    "refuse"
                },
                backends,
            })
        })
        .collect();
    rows.sort_by_key(|row| row.frontend);
    Ok(rows)
}

pub fn counters(bpffs: &Path) -> Result<Vec<CounterRow>> {
    let data = open_pinned(bpffs, map_names::COUNTERS)?;
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
        "{:<24} {:<5} {:>6} {:>8}  {}\n",
        "FRONTEND", "PROTO", "SVC_ID", "AFFINITY", "BACKENDS"
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
                .map(|b| match &b.backend {
                    Some(addr) => format!("{}#{}", endpoint(addr.addr, addr.port), b.id),
                    None => format!("?#{}", b.id),
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let affinity = match row.affinity_timeout {
            0 => "-".to_string(),
            seconds => format!("{seconds}s"),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<5} {:>6} {:>8}  {}",
            endpoint(row.frontend.addr, row.frontend.port),
            format!("{:?}", row.frontend.protocol).to_uppercase(),
            row.svc_id,
            affinity,
            backends
        );
    }
    out
}

pub fn backends_table(backends: &BTreeMap<u32, Backend>) -> String {
    let mut out = format!("{:>6}  {:<24} {}\n", "ID", "BACKEND", "PROTO");
    for (id, backend) in backends {
        let _ = match codec::backend_addr(backend) {
            Some(addr) => writeln!(
                out,
                "{id:>6}  {:<24} {}",
                endpoint(addr.addr, addr.port),
                format!("{:?}", addr.protocol).to_uppercase()
            ),
            None => writeln!(out, "{id:>6}  (unknown protocol {})", backend.proto),
        };
    }
    out
}

pub fn counters_table(rows: &[CounterRow]) -> String {
    let mut out = String::new();
    for row in rows {
        let _ = writeln!(out, "{:<22} {}", row.name, row.value);
    }
    out
}

/// `--output json` of `ebpf-proxy backends`.
pub fn backends_json(backends: &BTreeMap<u32, Backend>) -> serde_json::Value {
    let rows: Vec<BackendRow> = backends
        .iter()
        .map(|(id, backend)| BackendRow {
            id: *id,
            backend: codec::backend_addr(backend),
        })
        .collect();
    serde_json::json!(rows)
}
