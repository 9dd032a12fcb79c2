//! The manifests source as an operator feeds it: hand-written `v1/Endpoints`
//! for a Service without a selector, and a directory mounted from a
//! ConfigMap (every file a symlink through `..data`), black box (fixture in
//! `common`). Rule numbers refer to SERVICE-SEMANTICS.md.

use std::{fs, os::unix::fs::symlink, path::Path};

mod common;

use common::*;

/// `v1/Endpoints` of `service`: `addrs` on this node, port `http` 8080/TCP.
fn endpoints(service: &str, addrs: &[&str]) -> String {
    let addresses: Vec<String> = addrs
        .iter()
        .map(|addr| format!("      - {{ip: {addr}, nodeName: {NODE}}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {service}, namespace: demo}}\nsubsets:\n  - addresses:\n{}\n    ports:\n      - {{name: http, port: 8080, protocol: TCP}}\n",
        addresses.join("\n")
    )
}

/// The backend addresses of the frontend on `port`, sorted; a slot whose
/// backend the listing could not read (the agent retired it mid-read) is
/// `?`, which no test expects.
fn backends_on(rows: &[serde_json::Value], port: u16) -> Vec<String> {
    let mut addrs: Vec<String> = rows
        .iter()
        .filter(|row| row["frontend"]["port"] == port)
        .flat_map(|row| row["backends"].as_array().unwrap())
        .map(|backend| {
            format!(
                "{}:{}",
                backend["backend"]["addr"].as_str().unwrap_or("?"),
                backend["backend"]["port"]
            )
        })
        .collect();
    addrs.sort();
    addrs
}

#[test]
fn rule_07_example_selectorless_service_is_served_from_its_endpoints() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/selectorless");
    let mut node = TestNode::new("epma");
    for entry in fs::read_dir(&example).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        node.write(path.file_name().unwrap().to_str().unwrap(), &text);
    }
    node.start_agent();

    let rows = node.services();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["frontend"]["addr"], "10.96.0.40");
    assert_eq!(
        backends_on(&rows, 5432),
        ["192.168.10.21:5432", "192.168.10.22:5432"]
    );
}

#[test]
fn rule_07_hand_written_endpoints_carry_traffic_and_follow_edits() {
    let node = TestNode::serving(
        "epmb",
        &[
            ("svc.yaml", &service("db", &[("http", 80, "TCP")], "")),
            ("endpoints.yaml", &endpoints("db", &BACKENDS[..2])),
        ],
    );
    let to = format!("{VIP}:80");
    let answering = spread(&node.tcp(&to, 30));
    assert_eq!(
        answering.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"]
    );

    node.write("endpoints.yaml", &endpoints("db", &BACKENDS[2..]));
    node.wait_for("the edited Endpoints", |rows| {
        backends_on(rows, 80) == [format!("{}:8080", BACKENDS[2])]
    });
    assert_eq!(node.answering(&to, 5), ["backend-3"]);
}

/// Writes `files` into a new timestamped directory of a ConfigMap volume
/// at `dir` and swaps `..data` to it at once, as the kubelet does; the
/// visible names are symlinks through `..data`.
fn configmap_update(dir: &Path, version: u32, files: &[(&str, &str)]) {
    let data = format!("..2026_11_29_00_00_00.{version:09}");
    fs::create_dir(dir.join(&data)).unwrap();
    for (name, text) in files {
        fs::write(dir.join(&data).join(name), text).unwrap();
        let visible = dir.join(name);
        if fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new("..data").join(name), visible).unwrap();
        }
    }
    let old = fs::read_link(dir.join("..data")).ok();
    symlink(&data, dir.join("..data_tmp")).unwrap();
    fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if let Some(old) = old {
        fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[test]
fn manifests_mounted_from_a_configmap_are_read_through_their_symlinks() {
    let mut node = TestNode::new("epmc");
    let svc = service("web", &[("http", 80, "TCP")], "");
    let ports = [("http", 8080, "TCP")];
    configmap_update(
        node.manifests.path(),
        1,
        &[
            ("svc.yaml", &svc),
            ("slice.yaml", &slice("web", &ports, &BACKENDS[..1])),
        ],
    );
    node.start_agent();
    let to = format!("{VIP}:80");
    assert_eq!(node.answering(&to, 5), ["backend-1"]);

    // The ConfigMap changes: the kubelet swaps `..data`; the visible files
    // stay the same symlinks.
    configmap_update(
        node.manifests.path(),
        2,
        &[
            ("svc.yaml", &svc),
            ("slice.yaml", &slice("web", &ports, &BACKENDS)),
        ],
    );
    node.wait_for("the swapped ConfigMap", |rows| {
        backends_on(rows, 80).len() == 3
    });
    assert_eq!(spread(&node.tcp(&to, 60)).len(), 3);
}
