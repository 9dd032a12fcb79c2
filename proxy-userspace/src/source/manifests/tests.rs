//! Point 7 of the foundation issue: bad input is reported with its file and
//! reason and skipped, and what the file gave before stays in force.

use std::{fs, net::Ipv4Addr, path::Path};

use super::*;

const WEB: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const API: &str = "\
apiVersion: v1
kind: Service
metadata: {name: api, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: grpc, port: 9090}]
";

const WEB_SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.11]}]
";

fn write(dir: &Path, file: &str, text: &str) {
    fs::write(dir.join(file), text).unwrap();
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("demo", name)
}

fn cluster_ip(snapshot: &ClusterSnapshot, name: &str) -> Option<Ipv4Addr> {
    snapshot.services.get(&key(name)).map(|s| s.cluster_ip)
}

fn invalid(poll: &Poll) -> Vec<&ManifestProblem> {
    poll.problems
        .iter()
        .filter(|p| p.severity == Severity::Invalid)
        .collect()
}

/// Polls until the source reports a change (or gives up): the racy-mtime
/// handling may take a second poll to see a same-size rewrite.
fn poll_change(source: &mut ManifestsSource) -> Poll {
    let poll = source.poll().unwrap();
    if poll.snapshot.is_some() || !poll.problems.is_empty() {
        return poll;
    }
    source.poll().unwrap()
}

#[test]
fn multi_document_yaml_and_json_are_read() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &format!("{WEB}---\n{WEB_SLICE}"));
    let api: serde_json::Value = serde_saphyr::from_str(API).unwrap();
    write(dir.path(), "api.json", &api.to_string());
    write(dir.path(), "notes.txt", "not a manifest");

    let mut source = ManifestsSource::new(dir.path(), "node-1");
    let poll = source.poll().unwrap();
    assert!(invalid(&poll).is_empty(), "{:?}", poll.problems);
    let snapshot = poll
        .snapshot
        .expect("the first poll yields the initial list");
    assert_eq!(snapshot.node_name, "node-1");
    assert_eq!(
        cluster_ip(&snapshot, "web"),
        Some(Ipv4Addr::new(10, 96, 0, 10))
    );
    assert_eq!(
        cluster_ip(&snapshot, "api"),
        Some(Ipv4Addr::new(10, 96, 0, 20))
    );
    assert_eq!(snapshot.slices.len(), 1);
}

#[test]
fn rule_03_first_poll_yields_a_snapshot_even_when_empty_then_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = ManifestsSource::new(dir.path(), "node-1");
    assert_eq!(
        source.poll().unwrap().snapshot,
        Some(ClusterSnapshot {
            node_name: "node-1".into(),
            ..ClusterSnapshot::default()
        })
    );
    assert_eq!(source.poll().unwrap().snapshot, None);
    write(dir.path(), "web.yaml", WEB);
    assert!(poll_change(&mut source).snapshot.is_some());
}

#[test]
fn list_kind_is_flattened() {
    let dir = tempfile::tempdir().unwrap();
    let web: serde_json::Value = serde_saphyr::from_str(WEB).unwrap();
    let api: serde_json::Value = serde_saphyr::from_str(API).unwrap();
    let list = serde_saphyr::to_string(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [web, api],
    }))
    .unwrap();
    write(dir.path(), "all.yaml", &list);
    let snapshot = ManifestsSource::new(dir.path(), "n")
        .poll()
        .unwrap()
        .snapshot
        .unwrap();
    assert_eq!(snapshot.services.len(), 2);
}

#[test]
fn unparsable_file_is_reported_and_keeps_what_it_gave() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", WEB);
    let mut source = ManifestsSource::new(dir.path(), "n");
    source.poll().unwrap();

    write(
        dir.path(),
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
    );
    let poll = poll_change(&mut source);
    let problems = invalid(&poll);
    assert_eq!(problems.len(), 1, "{:?}", poll.problems);
    assert!(problems[0].file.ends_with("web.yaml"));
    assert!(
        problems[0].reason.contains("not valid YAML"),
        "{}",
        problems[0]
    );
    assert_eq!(
        poll.snapshot, None,
        "the datapath keeps the last good state"
    );

    write(dir.path(), "web.yaml", API);
    let snapshot = poll_change(&mut source)
        .snapshot
        .expect("fixed file applies");
    assert_eq!(cluster_ip(&snapshot, "web"), None);
    assert!(cluster_ip(&snapshot, "api").is_some());
}

/// One invalid object among valid ones: it is reported, its last good
/// version stays, the others apply.
fn assert_invalid_object_keeps_last_good(broken_web: &str, reason_part: &str) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", &format!("{WEB}---\n{API}"));
    let mut source = ManifestsSource::new(dir.path(), "n");
    source.poll().unwrap();

    let api_moved = API.replace("10.96.0.20", "10.96.0.21");
    write(
        dir.path(),
        "svc.yaml",
        &format!("{broken_web}---\n{api_moved}"),
    );
    let poll = poll_change(&mut source);
    let problems = invalid(&poll);
    assert_eq!(problems.len(), 1, "{:?}", poll.problems);
    let text = problems[0].to_string();
    assert!(text.contains("svc.yaml"), "{text}");
    assert!(text.contains(reason_part), "{text}");
    assert!(text.contains("keeping its last good version"), "{text}");
    let snapshot = poll.snapshot.expect("the valid object changed");
    assert_eq!(
        cluster_ip(&snapshot, "web"),
        Some(Ipv4Addr::new(10, 96, 0, 10))
    );
    assert_eq!(
        cluster_ip(&snapshot, "api"),
        Some(Ipv4Addr::new(10, 96, 0, 21))
    );
}

#[test]
fn bad_ip_is_reported_and_keeps_last_good() {
    assert_invalid_object_keeps_last_good(&WEB.replace("10.96.0.10", "10.96.0.300"), "10.96.0.300");
}

#[test]
fn port_out_of_range_is_reported_and_keeps_last_good() {
    assert_invalid_object_keeps_last_good(&WEB.replace("port: 80,", "port: 70000,"), "70000");
}

#[test]
fn schema_mismatch_is_reported_and_keeps_last_good() {
    assert_invalid_object_keeps_last_good(&WEB.replace("port: 80,", "port: eighty,"), "schema");
}

#[test]
fn missing_name_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "svc.yaml",
        &format!("{}---\n{API}", WEB.replace("name: web, ", "")),
    );
    let poll = ManifestsSource::new(dir.path(), "n").poll().unwrap();
    let problems = invalid(&poll);
    assert_eq!(problems.len(), 1, "{:?}", poll.problems);
    assert!(
        problems[0].to_string().contains("metadata.name"),
        "{}",
        problems[0]
    );
    assert!(
        problems[0].to_string().contains("skipped"),
        "{}",
        problems[0]
    );
    assert_eq!(poll.snapshot.unwrap().services.len(), 1);
}

#[test]
fn unknown_kind_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
    write(dir.path(), "mixed.yaml", &format!("{deployment}---\n{WEB}"));
    let poll = ManifestsSource::new(dir.path(), "n").poll().unwrap();
    let problems = invalid(&poll);
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0]
            .to_string()
            .contains("unsupported kind Deployment"),
        "{}",
        problems[0]
    );
    assert_eq!(poll.snapshot.unwrap().services.len(), 1);
}

#[test]
fn ignored_objects_are_noted_not_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "web.yaml",
        &WEB.replace("clusterIP: 10.96.0.10", "clusterIP: None"),
    );
    let poll = ManifestsSource::new(dir.path(), "n").poll().unwrap();
    assert!(invalid(&poll).is_empty());
    assert_eq!(poll.problems.len(), 1);
    assert_eq!(poll.problems[0].severity, Severity::Ignored);
    assert!(poll.snapshot.unwrap().services.is_empty());
}

#[test]
fn removed_file_removes_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", WEB);
    write(dir.path(), "api.yaml", API);
    let mut source = ManifestsSource::new(dir.path(), "n");
    source.poll().unwrap();
    fs::remove_file(dir.path().join("api.yaml")).unwrap();
    let snapshot = source.poll().unwrap().snapshot.unwrap();
    assert_eq!(
        snapshot.services.keys().collect::<Vec<_>>(),
        vec![&key("web")]
    );
}

#[test]
fn duplicate_object_in_two_files_keeps_the_first() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", WEB);
    write(
        dir.path(),
        "b.yaml",
        &WEB.replace("10.96.0.10", "10.96.0.99"),
    );
    let poll = ManifestsSource::new(dir.path(), "n").poll().unwrap();
    let problems = invalid(&poll);
    assert_eq!(problems.len(), 1);
    assert!(problems[0].file.ends_with("b.yaml"));
    assert_eq!(
        cluster_ip(&poll.snapshot.unwrap(), "web"),
        Some(Ipv4Addr::new(10, 96, 0, 10))
    );
}

#[test]
fn only_this_nodes_object_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str, zone: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\n"
        )
    };
    write(
        dir.path(),
        "nodes.yaml",
        &format!("{}---\n{}", node("node-1", "a"), node("node-2", "b")),
    );
    let snapshot = ManifestsSource::new(dir.path(), "node-2")
        .poll()
        .unwrap()
        .snapshot
        .unwrap();
    assert_eq!(snapshot.node.unwrap().zone.as_deref(), Some("b"));
}

#[test]
fn same_size_rewrite_within_one_tick_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", WEB);
    let mut source = ManifestsSource::new(dir.path(), "n");
    source.poll().unwrap();
    // Same length, written immediately: mtime and size may both be equal.
    write(
        dir.path(),
        "web.yaml",
        &WEB.replace("10.96.0.10", "10.96.0.11"),
    );
    let snapshot = source
        .poll()
        .unwrap()
        .snapshot
        .expect("content change seen");
    assert_eq!(
        cluster_ip(&snapshot, "web"),
        Some(Ipv4Addr::new(10, 96, 0, 11))
    );
}

#[test]
fn unreadable_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = ManifestsSource::new(dir.path().join("missing"), "n");
    let err = source.poll().unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}

#[test]
fn yaml_is_typed_as_serde_yaml_typed_it() {
    let value: serde_json::Value = serde_saphyr::from_str_with_options(
        "a: y\nb: on\nc: true\nd: 0755\ne: 1_000\nf: 80\n",
        yaml_options(),
    )
    .unwrap();
    assert_eq!(
        value,
        serde_json::json!({"a": "y", "b": "on", "c": true, "d": "0755", "e": "1_000", "f": 80})
    );
}

/// A ConfigMap volume as the kubelet writes it: the files live in a
/// timestamped `..` directory, `..data` points at it, and every visible
/// name is a symlink through `..data`. An update writes a new directory and
/// swaps `..data` in one rename.
fn configmap_update(dir: &Path, version: u32, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;

    let data = format!("..2026_11_29_00_00_00.{version:09}");
    fs::create_dir(dir.join(&data)).unwrap();
    for (name, text) in files {
        write(&dir.join(&data), name, text);
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
fn configmap_volume_is_read_once_through_its_symlinks_and_follows_swaps() {
    let dir = tempfile::tempdir().unwrap();
    configmap_update(
        dir.path(),
        1,
        &[("web.yaml", WEB), ("slice.yaml", WEB_SLICE)],
    );
    let mut source = ManifestsSource::new(dir.path(), "n");
    let poll = source.poll().unwrap();
    // The `..` directory and `..data` hold the same files again: read
    // twice, every object would be reported as a duplicate.
    assert!(poll.problems.is_empty(), "{:?}", poll.problems);
    let snapshot = poll.snapshot.unwrap();
    assert_eq!(
        cluster_ip(&snapshot, "web"),
        Some(Ipv4Addr::new(10, 96, 0, 10))
    );
    assert_eq!(snapshot.slices.len(), 1);

    // Same size, at once: only the symlink's target changed.
    configmap_update(
        dir.path(),
        2,
        &[
            ("web.yaml", &WEB.replace("10.96.0.10", "10.96.0.11")),
            ("slice.yaml", WEB_SLICE),
        ],
    );
    let poll = poll_change(&mut source);
    assert!(poll.problems.is_empty(), "{:?}", poll.problems);
    let snapshot = poll.snapshot.expect("the swap is seen");
    assert_eq!(
        cluster_ip(&snapshot, "web"),
        Some(Ipv4Addr::new(10, 96, 0, 11))
    );
    assert_eq!(snapshot.slices.len(), 1);

    // A file dropped from the ConfigMap leaves a dangling symlink behind.
    configmap_update(dir.path(), 3, &[("web.yaml", WEB)]);
    let poll = poll_change(&mut source);
    assert!(poll.problems.is_empty(), "{:?}", poll.problems);
    let snapshot = poll.snapshot.expect("the removal is seen");
    assert!(snapshot.slices.is_empty(), "{:?}", snapshot.slices);
}
