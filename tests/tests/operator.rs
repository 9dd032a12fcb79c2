//! The operator's commands (`ebpf-proxy uninstall`, `counters`, `backends`)
//! and flags (`--nodeport-addresses`) against a running datapath, black box
//! (fixture in `common`). Rule numbers refer to SERVICE-SEMANTICS.md.

use std::{fs, process::Command};

use proxy_tests::{agent_bin, manifests::endpoint_slice, run_checked};
use serde_json::Value;

mod common;

use common::*;

const EHOSTUNREACH: i64 = 113;

/// `ebpf-proxy SUBCOMMAND --bpffs PINS EXTRA...`, which must succeed.
fn cli(node: &TestNode, subcommand: &str, extra: &[&str]) -> String {
    run_checked(
        Command::new(agent_bin())
            .arg(subcommand)
            .arg("--bpffs")
            .arg(node.pins.path())
            .args(extra),
    )
    .unwrap()
}

/// The socket programs attached to the node's cgroup, by attach type.
fn attached_hooks(node: &TestNode) -> Vec<String> {
    let out = run_checked(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(node.cgroup.path()),
    )
    .unwrap();
    if out.trim().is_empty() {
        return Vec::new();
    }
    let attached: Value = serde_json::from_str(&out).unwrap();
    attached
        .as_array()
        .unwrap()
        .iter()
        .map(|program| program["attach_type"].as_str().unwrap().to_string())
        .collect()
}

/// Deletes the pinned backend entry of `addr:port`/TCP behind the agent's
/// back, by the id `ebpf-proxy backends` shows.
fn delete_backend(node: &TestNode, addr: &str, port: u64) {
    let rows: Vec<Value> =
        serde_json::from_str(&cli(node, "backends", &["--output", "json"])).unwrap();
    let id = rows
        .iter()
        .find(|row| row["backend"]["addr"] == addr && row["backend"]["port"] == port)
        .unwrap_or_else(|| panic!("no backend {addr}:{port}: {rows:?}"))["id"]
        .as_u64()
        .unwrap();
    let key: Vec<String> = u32::try_from(id)
        .unwrap()
        .to_ne_bytes()
        .iter()
        .map(u8::to_string)
        .collect();
    run_checked(
        Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(node.pins.path().join("maps/lb4_backends"))
            .arg("key")
            .args(&key),
    )
    .unwrap();
}

#[test]
fn uninstall_detaches_the_programs_and_removes_the_pins() {
    let mut node = TestNode::web("epua");
    let to = format!("{VIP}:80");
    assert_eq!(node.tcp(&to, 1)[0]["ok"], true);
    assert_eq!(attached_hooks(&node).len(), 7);

    // The agent leaves the datapath serving when it exits; uninstall ends it.
    node.agent_mut().kill();
    assert_eq!(node.tcp(&to, 1)[0]["ok"], true);
    cli(&node, "uninstall", &[]);
    assert!(!node.pins.path().exists(), "the pin directory is gone");
    assert_eq!(attached_hooks(&node), Vec::<String>::new());
    let untranslated = &node.tcp(&to, 1)[0];
    assert_eq!(untranslated["errno"], ENETUNREACH, "{untranslated}");

    // Again: nothing left to do. A directory that holds no pins is refused.
    cli(&node, "uninstall", &[]);
    let out = Command::new(agent_bin())
        .args(["uninstall", "--bpffs"])
        .arg(node.manifests.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not look like an ebpf-proxy pin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(node.manifests.path().join("svc.yaml").exists());

    // Nothing of the old datapath is in the way of a new agent.
    node.start_agent();
    assert_eq!(attached_hooks(&node).len(), 7);
    let translated = node.tcp(&to, 5);
    assert!(
        translated.iter().all(|result| result["ok"] == true),
        "translated again: {translated:?}"
    );
}

#[test]
fn counters_count_translations_refusals_drops_and_affinity_hits() {
    const EMPTY_VIP: &str = "10.96.0.20";
    const LOCAL_VIP: &str = "10.96.0.30";
    const SOLO_VIP: &str = "10.96.0.40";
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n";
    let mut node = TestNode::serving(
        "epub",
        &[
            (
                "web.yaml",
                &service("web", &[("http", 80, "TCP")], affinity),
            ),
            (
                "web-slice.yaml",
                &slice("web", &[("http", 8080, "TCP")], &BACKENDS),
            ),
            (
                "empty.yaml",
                &service_with("empty", EMPTY_VIP, &[("http", 80, "TCP")], "", ""),
            ),
            (
                "local.yaml",
                &service_with(
                    "local",
                    LOCAL_VIP,
                    &[("http", 80, "TCP")],
                    "",
                    "  internalTrafficPolicy: Local\n",
                ),
            ),
            (
                "local-slice.yaml",
                &endpoint_slice(
                    "local-x1",
                    "local",
                    &[("http", 8080, "TCP")],
                    &[(BACKENDS[0], "node-2")],
                    "",
                ),
            ),
            // The only Service on backend 1's port 8443: its entry can be
            // removed without touching the others.
            (
                "solo.yaml",
                &service_with("solo", SOLO_VIP, &[("https", 443, "TCP")], "", ""),
            ),
            (
                "solo-slice.yaml",
                &slice_with(
                    "solo-x1",
                    "solo",
                    &[("https", 8443, "TCP")],
                    &BACKENDS[..1],
                    "",
                ),
            ),
        ],
    );
    let before = counters(node.pins.path());

    let sticky = node.tcp(&format!("{VIP}:80"), 5);
    assert_eq!(spread(&sticky).len(), 1, "rule 23: {sticky:?}");
    let refused = &node.tcp(&format!("{EMPTY_VIP}:80"), 1)[0];
    assert_eq!(refused["errno"], ECONNREFUSED, "rule 21: {refused}");
    let dropped = &node.tcp(&format!("{LOCAL_VIP}:80"), 1)[0];
    assert_eq!(dropped["errno"], EHOSTUNREACH, "rule 19: {dropped}");

    let consistent = counters(node.pins.path());
    let added = |name: &str| consistent[name] - before[name];
    assert_eq!(added("translated"), 5, "{consistent:?}");
    assert_eq!(added("affinity_hit"), 4, "the first pick is no hit");
    assert_eq!(added("rejected_no_backend"), 1, "{consistent:?}");
    assert_eq!(added("dropped_no_local_backend"), 1, "{consistent:?}");
    assert_eq!(added("missing_backend"), 0, "{consistent:?}");

    // Someone else deletes a backend entry a slot still names. With the
    // agent gone nothing puts it back: the connect is refused, not leaked
    // to the frontend address, and counted.
    node.agent_mut().kill();
    delete_backend(&node, BACKENDS[0], 8443);
    let missing = &node.tcp(&format!("{SOLO_VIP}:443"), 1)[0];
    assert_eq!(missing["errno"], ECONNREFUSED, "{missing}");
    let after = counters(node.pins.path());
    assert_eq!(after["missing_backend"] - consistent["missing_backend"], 1);
    assert_eq!(after["translated"], consistent["translated"]);

    // The table shows the same numbers, one counter a line.
    let table = cli(&node, "counters", &[]);
    for name in [
        "translated",
        "affinity_hit",
        "rejected_no_backend",
        "dropped_no_local_backend",
        "missing_backend",
    ] {
        let line = table
            .lines()
            .find(|line| line.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{table}"));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(after[name].to_string().as_str()),
            "{table}"
        );
    }
}

#[test]
fn backends_lists_every_backend_with_its_id_and_whether_it_is_local() {
    let endpoints = [
        (BACKENDS[0], NODE),
        (BACKENDS[1], NODE),
        (BACKENDS[2], "node-2"),
    ];
    let node = TestNode::serving(
        "epuc",
        &[
            ("svc.yaml", &service("web", &[("http", 80, "TCP")], "")),
            (
                "slice.yaml",
                &endpoint_slice("web-x1", "web", &[("http", 8080, "TCP")], &endpoints, ""),
            ),
        ],
    );

    let rows: Vec<Value> =
        serde_json::from_str(&cli(&node, "backends", &["--output", "json"])).unwrap();
    let listed: Vec<(String, u64, bool)> = rows
        .iter()
        .map(|row| {
            assert_eq!(row["backend"]["protocol"], "TCP", "{row}");
            (
                row["backend"]["addr"].as_str().unwrap().to_string(),
                row["backend"]["port"].as_u64().unwrap(),
                row["local"].as_bool().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64, bool)> = endpoints
        .iter()
        .map(|(addr, on)| (addr.to_string(), 8080, *on == NODE))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "rule 6: local is nodeName == this node");

    // The ids are those the frontend's slots name.
    let mut ids: Vec<u64> = rows.iter().map(|row| row["id"].as_u64().unwrap()).collect();
    let mut slot_ids: Vec<u64> = node.services()[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|backend| backend["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    slot_ids.sort();
    assert_eq!(ids, slot_ids);

    let table = cli(&node, "backends", &[]);
    for (row, (addr, port, local)) in rows.iter().zip(&listed) {
        let line = table
            .lines()
            .find(|line| line.contains(&format!("{addr}:{port}")))
            .unwrap_or_else(|| panic!("{addr} missing:\n{table}"));
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(columns[0], row["id"].to_string(), "{table}");
        assert_eq!(columns[3], if *local { "yes" } else { "-" }, "{table}");
    }
}

/// Service `web` of type NodePort (port 80, nodePort 30080) and its slice.
fn write_node_port_web(node: &TestNode) {
    node.write(
        "svc.yaml",
        &service("web", &[("http", 80, "TCP")], "  type: NodePort\n").replace(
            "{name: http, port: 80, protocol: TCP}",
            "{name: http, port: 80, protocol: TCP, nodePort: 30080}",
        ),
    );
    node.write(
        "slice.yaml",
        &slice("web", &[("http", 8080, "TCP")], &BACKENDS),
    );
}

#[test]
fn scenario_07_nodeport_addresses_outside_the_cidrs_do_not_serve() {
    let mut node = TestNode::new("epud");
    let (served, not_served) = ("192.168.0.2", "192.168.1.2");
    for addr in [served, not_served] {
        node.netns
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .unwrap();
    }
    write_node_port_web(&node);
    node.start_agent_with(&["--nodeport-addresses", "192.168.0.0/24"]);

    // Rule 11: only addresses inside the CIDRs are NodePort frontends.
    let frontends: Vec<String> = node
        .services()
        .iter()
        .map(|row| {
            format!(
                "{}:{}",
                row["frontend"]["addr"].as_str().unwrap(),
                row["frontend"]["port"]
            )
        })
        .collect();
    assert!(
        frontends.contains(&format!("{served}:30080")),
        "{frontends:?}"
    );
    assert!(
        !frontends.iter().any(|f| f.starts_with(not_served)),
        "{frontends:?}"
    );

    let result = &node.tcp(&format!("{served}:30080"), 1)[0];
    assert_eq!(reply_parts(result).1, CLIENT, "{result}");
    // Untranslated, the port is closed on that address.
    let result = &node.tcp(&format!("{not_served}:30080"), 1)[0];
    assert_eq!(result["errno"], ECONNREFUSED, "{result}");
}

#[test]
fn rule_11_nodeport_frontends_follow_addresses_added_to_and_removed_from_the_node() {
    let mut node = TestNode::new("epue");
    write_node_port_web(&node);
    node.start_agent_with(&["--nodeport-addresses", "192.168.5.0/24"]);
    let node_ports = |rows: &[Value]| -> Vec<String> {
        let mut frontends: Vec<String> = rows
            .iter()
            .filter(|row| row["frontend"]["port"] == 30080)
            .map(|row| row["frontend"]["addr"].as_str().unwrap().to_string())
            .collect();
        frontends.dedup();
        frontends
    };
    assert_eq!(node_ports(&node.services()), Vec::<String>::new());
    let added = "192.168.5.7";
    let on_added = format!("{added}:30080");

    // No Service changes: the address alone makes the frontend.
    node.netns
        .ip(&["addr", "add", &format!("{added}/32"), "dev", "lo"])
        .unwrap();
    node.wait_for("the added address to serve the NodePort", |rows| {
        node_ports(rows) == [added]
    });
    let result = &node.tcp(&on_added, 1)[0];
    assert_eq!(result["ok"], true, "{result}");

    node.netns
        .ip(&["addr", "del", &format!("{added}/32"), "dev", "lo"])
        .unwrap();
    node.wait_for("the removed address to stop serving", |rows| {
        node_ports(rows).is_empty()
    });
    assert!(
        node.services()
            .iter()
            .any(|row| row["frontend"]["addr"] == VIP),
        "the ClusterIP stays"
    );
    assert!(
        node.agent().log().contains("node addresses changed"),
        "{}",
        node.agent().log_tail(20)
    );
}

#[test]
fn port_refused_for_map_room_is_programmed_once_a_deleted_service_frees_it() {
    let mut node = TestNode::new("epuf");
    let vips = [
        ("a", "10.96.0.21"),
        ("b", "10.96.0.22"),
        ("c", "10.96.0.23"),
    ];
    for (name, vip) in vips {
        node.write(
            &format!("{name}.yaml"),
            &service_with(name, vip, &[("http", 80, "TCP")], "", ""),
        );
        node.write(
            &format!("{name}-slice.yaml"),
            &slice(name, &[("http", 8080, "TCP")], &BACKENDS[..1]),
        );
    }
    // A master and a slot per port: room for two of the three.
    node.start_agent_with(&["--max-services", "4"]);
    let served = |rows: &[Value]| -> Vec<String> {
        rows.iter()
            .map(|row| row["frontend"]["addr"].as_str().unwrap().to_string())
            .collect()
    };
    let first = served(&node.services());
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(
        node.agent().log().contains("the maps have no room left"),
        "{}",
        node.agent().log_tail(20)
    );
    let (refused, _) = vips
        .iter()
        .find(|(_, vip)| !first.iter().any(|served| served == vip))
        .unwrap();
    let (deleted, _) = vips.iter().find(|(name, _)| name != refused).unwrap();

    // Deleting a served Service frees its entries for the refused one.
    fs::remove_file(node.manifests.path().join(format!("{deleted}.yaml"))).unwrap();
    fs::remove_file(node.manifests.path().join(format!("{deleted}-slice.yaml"))).unwrap();
    let refused_vip = vips.iter().find(|(name, _)| name == refused).unwrap().1;
    node.wait_for("the refused port to be programmed", |rows| {
        let now = served(rows);
        now.len() == 2 && now.iter().any(|vip| vip == refused_vip)
    });
    let result = &node.tcp(&format!("{refused_vip}:80"), 1)[0];
    assert_eq!(result["ok"], true, "{result}");
}
