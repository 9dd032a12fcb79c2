//! `ebpf-proxy conntrack`: the tracked external flows, read from the
//! pinned maps.

use std::{collections::HashMap, fmt::Write as _, net::SocketAddrV4, path::Path};

use anyhow::{Context, Result};
use proxy_common::{Backend, CtEntry, Flow4, RevNat, ct_flags};
use serde::Serialize;

use super::{
    ConntrackTables, PinnedConntrack, backend_is_current, endpoint, expires_in_seconds, idle_ns,
    monotonic_coarse_ns, protocol_name, state_name,
};

/// One tracked flow.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    pub client: SocketAddrV4,
    /// The frontend the client addressed, from `lb4_rev_nat`; `None` when
    /// its rev-NAT entry is gone (replies are no longer translated).
    pub frontend: Option<SocketAddrV4>,
    pub rev_nat_id: u32,
    pub backend: SocketAddrV4,
    pub backend_id: u32,
    /// Whether `lb4_backends` still names this backend under its id.
    pub backend_current: bool,
    /// The node address and port the flow's source was NATed to.
    pub nat: Option<SocketAddrV4>,
    pub protocol: String,
    pub state: &'static str,
    /// No packet for this long (there is no creation time to show an age).
    pub idle_seconds: u64,
    /// Until the flow expires, unless a packet comes first.
    pub expires_in_seconds: u64,
}

pub fn flow_row(
    flow: &Flow4,
    entry: &CtEntry,
    frontend: Option<&RevNat>,
    backend: Option<&Backend>,
    now_ns: u64,
) -> FlowRow {
    FlowRow {
        client: endpoint(flow.saddr, flow.sport),
        frontend: frontend.map(|frontend| endpoint(frontend.addr, frontend.port)),
        rev_nat_id: entry.rev_nat_id,
        backend: endpoint(entry.backend_addr, entry.backend_port),
        backend_id: entry.backend_id,
        backend_current: backend_is_current(entry, backend),
        nat: (entry.flags & ct_flags::SNAT != 0).then(|| endpoint(entry.nat_addr, entry.nat_port)),
        protocol: protocol_name(flow.proto),
        state: state_name(entry.state),
        idle_seconds: idle_ns(entry, now_ns) / super::NANOS_PER_SECOND,
        expires_in_seconds: expires_in_seconds(entry, now_ns),
    }
}

/// The rows of `flows`, by frontend, then client.
pub fn flow_rows(
    flows: &[(Flow4, CtEntry)],
    rev_nat: &HashMap<u32, RevNat>,
    backends: &HashMap<u32, Backend>,
    now_ns: u64,
) -> Vec<FlowRow> {
    let mut rows: Vec<FlowRow> = flows
        .iter()
        .map(|(flow, entry)| {
            flow_row(
                flow,
                entry,
                rev_nat.get(&entry.rev_nat_id),
                backends.get(&entry.backend_id),
                now_ns,
            )
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.frontend, &a.protocol, a.client).cmp(&(b.frontend, &b.protocol, b.client))
    });
    rows
}

/// The tracked flows the pinned maps hold now.
pub fn read(bpffs: &Path) -> Result<Vec<FlowRow>> {
    let tables = PinnedConntrack::open(bpffs)
        .with_context(|| format!("is an agent running with --bpffs {}?", bpffs.display()))?;
    let now_ns = monotonic_coarse_ns().context("reading CLOCK_MONOTONIC_COARSE")?;
    Ok(flow_rows(
        &tables.flows()?,
        &tables.rev_nats()?,
        &tables.backends()?,
        now_ns,
    ))
}

fn or_unknown(endpoint: Option<SocketAddrV4>) -> String {
    endpoint.map_or_else(|| "?".to_string(), |endpoint| endpoint.to_string())
}

pub fn flows_table(rows: &[FlowRow]) -> String {
    let mut out = format!(
        "{:<21} {:<21} {:<28} {:<21} {:<5} {:<11} {:>6} {:>7}\n",
        "CLIENT", "FRONTEND", "BACKEND", "NAT", "PROTO", "STATE", "IDLE", "EXPIRES"
    );
    for row in rows {
        let backend = format!(
            "{}#{}{}",
            row.backend,
            row.backend_id,
            if row.backend_current { "" } else { " (gone)" }
        );
        let _ = writeln!(
            out,
            "{:<21} {:<21} {:<28} {:<21} {:<5} {:<11} {:>5}s {:>6}s",
            row.client,
            or_unknown(row.frontend),
            backend,
            row.nat
                .map_or_else(|| "-".to_string(), |nat| nat.to_string()),
            row.protocol,
            row.state,
            row.idle_seconds,
            row.expires_in_seconds,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use proxy_common::{ct_state, proto};

    use super::*;
    use crate::conntrack::tests::{SECOND, addr, backend_of, client_flow, entry, port, snat};

    fn frontend() -> RevNat {
        RevNat {
            addr: addr(192, 168, 1, 10),
            port: port(30080),
            _pad0: 0,
        }
    }

    #[test]
    fn rows_show_both_ends_the_nat_and_the_clock() {
        let now = 1000 * SECOND;
        let flow = client_flow(40000, proto::TCP);
        let tracked = snat(entry(ct_state::TCP_ESTABLISHED, now - 90 * SECOND), 61_001);
        let row = flow_row(
            &flow,
            &tracked,
            Some(&frontend()),
            Some(&backend_of(&tracked)),
            now,
        );
        assert_eq!(
            row,
            FlowRow {
                client: "203.0.113.7:40000".parse().unwrap(),
                frontend: Some("192.168.1.10:30080".parse().unwrap()),
                rev_nat_id: 5,
                backend: "10.244.1.11:8080".parse().unwrap(),
                backend_id: 11,
                backend_current: true,
                nat: Some("192.168.1.10:61001".parse().unwrap()),
                protocol: "TCP".into(),
                state: "established",
                idle_seconds: 90,
                expires_in_seconds: 6 * 3600 - 90,
            }
        );
    }

    #[test]
    fn a_gone_frontend_and_backend_show_as_such() {
        let now = 1000 * SECOND;
        let tracked = entry(ct_state::DATAGRAM, now);
        let row = flow_row(&client_flow(5353, proto::UDP), &tracked, None, None, now);
        assert_eq!(
            (row.frontend, row.backend_current, row.nat),
            (None, false, None)
        );
        let table = flows_table(&[row]);
        let line = table.lines().nth(1).unwrap();
        assert!(line.starts_with("203.0.113.7:5353      ?  "), "{line}");
        assert!(line.contains("10.244.1.11:8080#11 (gone)"), "{line}");
        assert!(line.contains(" - "), "{line}");
        assert!(line.contains("UDP   datagram"), "{line}");
        assert!(line.ends_with("0s     60s"), "{line}");
    }

    #[test]
    fn rows_are_sorted_by_frontend_then_client() {
        let now = 1000 * SECOND;
        let tracked = entry(ct_state::DATAGRAM, now);
        let flows = [
            (client_flow(2, proto::UDP), tracked),
            (
                client_flow(1, proto::UDP),
                CtEntry {
                    rev_nat_id: 9,
                    ..tracked
                },
            ),
            (client_flow(1, proto::UDP), tracked),
        ];
        let rev_nat = HashMap::from([(5, frontend())]);
        let rows = flow_rows(&flows, &rev_nat, &HashMap::new(), now);
        let order: Vec<(Option<SocketAddrV4>, u16)> = rows
            .iter()
            .map(|row| (row.frontend, row.client.port()))
            .collect();
        let known = Some("192.168.1.10:30080".parse().unwrap());
        assert_eq!(order, [(None, 1), (known, 1), (known, 2)]);
    }

    #[test]
    fn json_names_endpoints_as_address_and_port() {
        let now = 1000 * SECOND;
        let tracked = entry(ct_state::TCP_SYN, now);
        let row = flow_row(
            &client_flow(40000, proto::TCP),
            &tracked,
            Some(&frontend()),
            None,
            now,
        );
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["client"], "203.0.113.7:40000");
        assert_eq!(json["frontend"], "192.168.1.10:30080");
        assert_eq!(json["nat"], serde_json::Value::Null);
        assert_eq!(json["state"], "syn");
        assert_eq!(json["expires_in_seconds"], 60);
    }
}
