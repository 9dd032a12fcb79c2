//! The Kubernetes source, black box: the real agent binary with
//! `--kubeconfig`, against the API server double (`proxy_tests::apiserver`)
//! running inside the test's own network namespace, and the real programs
//! attached to a child cgroup (DESIGN.md, testing layer 5).
//!
//! Layout of every test (the fixture in `common`, as in sock_lb.rs): one
//! network namespace with the client address 10.244.0.2 and backends
//! 10.244.0.11-13 on `lo`, the API server double on 127.0.0.1 in the same
//! namespace, clients in that namespace AND the test's cgroup. The
//! namespace has no route to the service CIDR, so an untranslated connect
//! fails with ENETUNREACH and nothing ever leaves it. Rule numbers refer to
//! docs/semantics.md.

use std::{
    net::Ipv4Addr,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use proxy_tests::{
    AGENT_HEALTHZ, Agent,
    apiserver::{ApiServer, Kind, Request, start_agent_with_kubeconfig},
    host,
};
use serde_json::{Value, json};

mod common;

use common::*;

/// Rule 1: kube-proxy's selector on Services and EndpointSlices.
const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Generous: the watchers retry with exponential backoff (0.8 s, 1.6 s,
/// 3.2 s ... plus jitter).
const CONVERGE: Duration = Duration::from_secs(30);

/// One test's world: a [`TestNode`] with the API server double in its
/// namespace. Drops the agent first, then the double, then the node
/// (servers, files, pins, cgroup, namespace).
struct World {
    api: ApiServer,
    node: TestNode,
}

impl Drop for World {
    fn drop(&mut self) {
        self.node.agent = None;
    }
}

impl World {
    fn new(prefix: &str) -> World {
        let node = TestNode::new(prefix);
        World {
            api: ApiServer::start(&node.netns).unwrap(),
            node,
        }
    }

    /// Starts the agent on the double; does not wait for it. Its
    /// kubeconfig goes to the node's (otherwise unused) manifests directory.
    fn spawn_agent(&mut self, extra_args: &[&str]) {
        let node = &mut self.node;
        let kubeconfig = self.api.kubeconfig(node.manifests.path()).unwrap();
        let agent = start_agent_with_kubeconfig(
            &node.netns,
            &kubeconfig,
            node.cgroup.path(),
            node.pins.path(),
            NODE,
            extra_args,
        )
        .unwrap();
        node.agent = Some(agent);
    }

    /// Starts the agent on the double and waits for /healthz 200.
    fn start_agent(&mut self, extra_args: &[&str]) {
        self.spawn_agent(extra_args);
        self.agent()
            .wait_healthy(&self.node.netns, CONVERGE)
            .unwrap();
    }

    fn agent(&self) -> &Agent {
        self.node.agent()
    }

    fn agent_mut(&mut self) -> &mut Agent {
        self.node.agent_mut()
    }

    fn tcp(&self, to: &str, count: u32) -> Vec<Value> {
        self.node.tcp(to, count)
    }

    fn udp(&self, to: &str, count: u32, extra: &[&str]) -> Vec<Value> {
        self.node.udp(to, count, extra)
    }

    fn services(&self) -> Vec<Value> {
        self.node.services()
    }

    fn wait_for(&self, what: &str, ready: impl Fn(&[Value]) -> bool) {
        self.node.wait_for_within(what, CONVERGE, ready);
    }

    /// `/healthz`: (HTTP status, body), status 0 when nothing answered.
    fn healthz(&self) -> (i64, Value) {
        let out = host(&self.node.netns, None)
            .args([
                "http-get",
                &format!("{AGENT_HEALTHZ}/healthz"),
                "--timeout-ms",
                "5000",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let line: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let body = line["body"]
            .as_str()
            .and_then(|body| serde_json::from_str(body).ok())
            .unwrap_or(Value::Null);
        (line["status"].as_i64().unwrap_or(0), body)
    }

    fn wait_healthz(&self, what: &str, ready: impl Fn(i64, &Value) -> bool) -> (i64, Value) {
        let start = Instant::now();
        loop {
            let (status, body) = self.healthz();
            if ready(status, &body) {
                return (status, body);
            }
            assert!(
                start.elapsed() < CONVERGE,
                "timed out waiting for /healthz {what}; last: {status} {body}\nagent log:\n{}",
                self.agent().log_tail(40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_agent_runs(&mut self) {
        let status = self.agent_mut().try_wait().unwrap();
        assert!(
            status.is_none(),
            "agent exited ({status:?}):\n{}",
            self.agent().log_tail(40)
        );
    }
}

/// The datapath without ids (they depend on history): per frontend its
/// affinity and the sorted backend addresses.
fn without_ids(rows: &[Value]) -> Vec<Value> {
    let mut normalized: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut backends: Vec<String> = row["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["backend"].to_string())
                .collect();
            backends.sort();
            json!({"frontend": row["frontend"], "affinity_timeout": row["affinity_timeout"], "backends": backends})
        })
        .collect();
    normalized.sort_by_key(|row| row["frontend"].to_string());
    normalized
}

fn frontend<'a>(rows: &'a [Value], addr: &str, port: u16, protocol: &str) -> Option<&'a Value> {
    rows.iter().find(|row| {
        row["frontend"]["addr"] == addr
            && row["frontend"]["port"] == port
            && row["frontend"]["protocol"] == protocol
    })
}

/// The backend addresses (`addr:port`) a frontend selects, sorted.
fn backends_of(rows: &[Value], addr: &str, port: u16, protocol: &str) -> Option<Vec<String>> {
    let row = frontend(rows, addr, port, protocol)?;
    let mut backends: Vec<String> = row["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{}:{}",
                b["backend"]["addr"].as_str().unwrap_or("?"),
                b["backend"]["port"]
            )
        })
        .collect();
    backends.sort();
    Some(backends)
}

fn node(name: &str, address: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{kubernetes.io/hostname: {name}}}}}\nstatus:\n  addresses: [{{type: InternalIP, address: '{address}'}}]\n"
    )
}

const HTTP: [(&str, u32, &str); 1] = [("http", 80, "TCP")];
const HTTP_TARGET: [(&str, u32, &str); 1] = [("http", 8080, "TCP")];

/// The Service `name` on `vip` with port [`HTTP`], no labels.
fn http_service(name: &str, vip: &str) -> String {
    service_with(name, vip, &HTTP, "", "")
}

/// The EndpointSlice `name` of `service` with port [`HTTP_TARGET`], ready
/// endpoints at `addrs`, no other labels.
fn http_slice(name: &str, service: &str, addrs: &[&str]) -> String {
    slice_with(name, service, &HTTP_TARGET, addrs, "")
}

fn count(log: &[Request], ready: impl Fn(&Request) -> bool) -> usize {
    log.iter().filter(|r| ready(r)).count()
}

fn is_list(request: &Request, kind: Kind) -> bool {
    request.kind() == Some(kind) && !request.is_watch()
}

fn is_watch(request: &Request, kind: Kind) -> bool {
    request.kind() == Some(kind) && request.is_watch()
}

#[test]
fn requests_use_kube_proxy_selectors() {
    let mut world = World::new("epka");
    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS));
    world.api.apply(format!(
        "{}---\n{}",
        node(NODE, CLIENT),
        node("node-2", "10.244.9.9")
    ));
    world.start_agent(&[]);
    world.wait_for("web with 3 backends", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 3)
    });
    world.api.wait_for_watches(3, CONVERGE).unwrap();

    let log = world.api.request_log();
    let lines = world.api.requests().join("\n");
    for request in &log {
        assert_eq!(
            request.method, "GET",
            "the agent only reads: {}",
            request.line
        );
        match request.kind() {
            // Rule 1, cluster-wide, on both kinds.
            Some(kind @ (Kind::Service | Kind::EndpointSlice)) => {
                let path = if kind == Kind::Service {
                    "/api/v1/services"
                } else {
                    "/apis/discovery.k8s.io/v1/endpointslices"
                };
                assert_eq!(request.path, path, "{}", request.line);
                assert_eq!(
                    request.param("labelSelector"),
                    Some(PROXY_SELECTOR),
                    "{}",
                    request.line
                );
                assert_eq!(request.param("fieldSelector"), None, "{}", request.line);
            }
            // Only this node's Node object.
            Some(Kind::Node) => {
                assert_eq!(request.path, "/api/v1/nodes", "{}", request.line);
                assert_eq!(
                    request.param("fieldSelector"),
                    Some("metadata.name=node-1"),
                    "{}",
                    request.line
                );
                assert_eq!(request.param("labelSelector"), None, "{}", request.line);
            }
            None => panic!("unexpected request {}", request.line),
        }
        if request.is_watch() {
            // List, then watch from the list's version.
            let rv: u64 = request
                .param("resourceVersion")
                .unwrap_or("")
                .parse()
                .unwrap_or_else(|_| panic!("watch without a resourceVersion: {}", request.line));
            assert!(
                rv > 0 && rv <= world.api.resource_version(),
                "{}",
                request.line
            );
        }
    }
    for kind in Kind::ALL {
        assert!(
            count(&log, |r| is_list(r, kind)) >= 1,
            "no {kind:?} list:\n{lines}"
        );
        assert!(
            count(&log, |r| is_watch(r, kind)) >= 1,
            "no {kind:?} watch:\n{lines}"
        );
    }
}

#[test]
fn rule_03_nothing_programmed_before_both_lists() {
    let mut world = World::new("epkb");
    // A datapath programmed earlier (by a manifests agent, now gone): "old"
    // is stale, "web" has one backend.
    let old_vip = "10.96.0.20";
    world.node.write(
        "old.yaml",
        &format!(
            "{}---\n{}---\n{}---\n{}",
            http_service("web", VIP),
            http_slice("web-1", "web", &BACKENDS[..1]),
            http_service("old", old_vip),
            http_slice("old-1", "old", &BACKENDS[..1]),
        ),
    );
    world.node.start_agent();
    world.node.agent = None;
    let before = world.services();
    assert_eq!(before.len(), 2, "{before:#?}");

    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS));
    world.api.apply(http_service("new", "10.96.0.30"));
    world.api.apply(http_slice("new-1", "new", &BACKENDS[1..2]));
    // EndpointSlice requests fail until the checks below are done (a fixed
    // number of failures would race the agent's retry backoff); Services
    // list fine.
    world
        .api
        .fail_matching(usize::MAX, 500, |r| r.kind() == Some(Kind::EndpointSlice));
    world.spawn_agent(&[]);
    world
        .api
        .wait_for_requests(
            "two failed slice lists and a service watch",
            CONVERGE,
            |log| {
                count(log, |r| is_list(r, Kind::EndpointSlice)) >= 2
                    && count(log, |r| is_watch(r, Kind::Service)) >= 1
            },
        )
        .unwrap();
    assert_eq!(
        world.services(),
        before,
        "nothing programmed and nothing deleted before both lists"
    );
    let (status, body) = world.healthz();
    assert_ne!(status, 200, "not healthy before the first sync: {body}");

    // The next attempt succeeds: everything at once, and a resync.
    world.api.clear_failures();
    world
        .agent()
        .wait_healthy(&world.node.netns, CONVERGE)
        .unwrap();
    let rows = world.services();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(
        backends_of(&rows, VIP, 80, "TCP").unwrap().len(),
        3,
        "{rows:#?}"
    );
    assert!(
        frontend(&rows, "10.96.0.30", 80, "TCP").is_some(),
        "{rows:#?}"
    );
    assert!(
        frontend(&rows, old_vip, 80, "TCP").is_none(),
        "stale service removed: {rows:#?}"
    );
    assert_eq!(spread(&world.tcp(&format!("{VIP}:80"), 60)).len(), 3);
    assert_eq!(reply_name(&world.tcp("10.96.0.30:80", 1)[0]), "backend-2");
    assert_eq!(
        world.tcp(&format!("{old_vip}:80"), 1)[0]["errno"],
        ENETUNREACH
    );
}

/// The objects of the convergence test: multi-port, TCP+UDP on one port,
/// no endpoints, affinity, NodePort, plus a Service ignored by label and a
/// headless one.
fn mixed_objects() -> String {
    let docs = [
        node(NODE, CLIENT),
        node("node-2", "10.244.9.9"),
        service_with(
            "web",
            VIP,
            &[("http", 80, "TCP"), ("https", 443, "TCP")],
            "app: web",
            "",
        ),
        slice_with(
            "web-1",
            "web",
            &[("https", 8443, "TCP"), ("http", 8080, "TCP")],
            &BACKENDS,
            "",
        ),
        service_with(
            "dns",
            "10.96.0.11",
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
            "",
            "",
        ),
        slice_with(
            "dns-1",
            "dns",
            &[("dns", 5353, "UDP"), ("dns-tcp", 8080, "TCP")],
            &BACKENDS[..2],
            "",
        ),
        http_service("empty", "10.96.0.12"),
        service_with(
            "sticky",
            "10.96.0.13",
            &HTTP,
            "",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
        ),
        http_slice("sticky-1", "sticky", &BACKENDS),
        service_with(
            "ignored",
            "10.96.0.14",
            &HTTP,
            "service.kubernetes.io/service-proxy-name: other",
            "",
        ),
        http_slice("ignored-1", "ignored", &BACKENDS),
        http_service("headless", "None"),
        slice_with(
            "headless-1",
            "headless",
            &HTTP_TARGET,
            &BACKENDS,
            "service.kubernetes.io/headless: ''",
        ),
        service_with(
            "nodeport",
            "10.96.0.15",
            &[("http", 80, "TCP")],
            "",
            "  type: NodePort\n",
        )
        .replace("protocol: TCP}", "protocol: TCP, nodePort: 30080}"),
        http_slice("nodeport-1", "nodeport", &BACKENDS[2..]),
    ];
    docs.join("---\n")
}

#[test]
fn converges_to_the_same_datapath_as_manifests() {
    let mut world = World::new("epkc");
    let objects = mixed_objects();
    world.api.apply(&objects);
    world.start_agent(&[]);

    // The same objects as a manifests directory, to a second agent in a
    // second namespace (its backends go unused: only its datapath is
    // compared).
    let mut other = TestNode::new("epkc");
    other.write("objects.yaml", &objects);
    other.start_agent();

    let expected = without_ids(&other.services());
    let start = Instant::now();
    while without_ids(&world.services()) != expected && start.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(100));
    }
    let rows = world.services();
    assert_eq!(
        without_ids(&rows),
        expected,
        "kube-fed datapath differs from the manifests-fed one\nkube agent log:\n{}\nmanifests agent log:\n{}",
        world.agent().log_tail(30),
        other.agent().log_tail(30)
    );

    // And it is the right one.
    assert_eq!(backends_of(&rows, VIP, 443, "TCP").unwrap().len(), 3);
    assert_eq!(
        backends_of(&rows, "10.96.0.11", 53, "UDP").unwrap(),
        ["10.244.0.11:5353", "10.244.0.12:5353"]
    );
    assert_eq!(
        backends_of(&rows, "10.96.0.12", 80, "TCP").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        frontend(&rows, "10.96.0.13", 80, "TCP").unwrap()["affinity_timeout"],
        600
    );
    assert!(
        frontend(&rows, "10.96.0.14", 80, "TCP").is_none(),
        "rule 1: ignored by label"
    );
    assert!(
        frontend(&rows, CLIENT, 30080, "TCP").is_some(),
        "NodePort on the Node's address: {rows:#?}"
    );
    let vips: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["frontend"]["addr"].as_str())
        .collect();
    assert!(vips.iter().all(|v| *v != "10.96.0.14"), "{vips:?}");

    // Traffic through the kube-fed one.
    let https = world.tcp(&format!("{VIP}:443"), 60);
    assert_eq!(
        spread(&https).len(),
        3,
        "scenario 1: named port 443 -> 8443"
    );
    let udp = world.udp("10.96.0.11:53", 10, &[]);
    assert!(udp.iter().all(|r| r["ok"] == true), "{udp:?}");
    assert_eq!(
        reply_name(&world.tcp("10.96.0.11:53", 1)[0]).len(),
        "backend-1".len()
    );
    assert_eq!(
        world.tcp("10.96.0.12:80", 1)[0]["errno"],
        ECONNREFUSED,
        "rule 21"
    );
    assert_eq!(spread(&world.tcp("10.96.0.13:80", 10)).len(), 1, "rule 23");
    assert_eq!(
        world.tcp("10.96.0.14:80", 1)[0]["errno"],
        ENETUNREACH,
        "rule 1"
    );
}

#[test]
fn watch_changes_apply() {
    let mut world = World::new("epkd");
    let to = format!("{VIP}:80");
    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS[..1]));
    world.start_agent(&[]);
    assert_eq!(
        spread(&world.tcp(&to, 5)).keys().collect::<Vec<_>>(),
        ["backend-1"]
    );

    // Scale up, then down.
    world.api.apply(http_slice("web-1", "web", &BACKENDS));
    world.wait_for("3 backends", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 3)
    });
    assert_eq!(spread(&world.tcp(&to, 60)).len(), 3);
    world.api.apply(http_slice("web-1", "web", &BACKENDS[2..]));
    world.wait_for("1 backend", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b == ["10.244.0.13:8080"])
    });
    assert_eq!(
        spread(&world.tcp(&to, 10)).keys().collect::<Vec<_>>(),
        ["backend-3"]
    );

    // A second slice of the same Service adds its endpoints.
    world.api.apply(http_slice("web-2", "web", &BACKENDS[..1]));
    world.wait_for("2 backends from 2 slices", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 2)
    });
    world.api.delete("EndpointSlice", "demo", "web-2").unwrap();
    world.wait_for("the second slice gone", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 1)
    });

    // Rules 1 and scenario 17: the proxy-name label makes the watch delete
    // the Service; forwarding stops. Removing it restores forwarding.
    world.api.apply(service_with(
        "web",
        VIP,
        &HTTP,
        "service.kubernetes.io/service-proxy-name: other",
        "",
    ));
    world.wait_for("the labelled service to go", |rows| {
        frontend(rows, VIP, 80, "TCP").is_none()
    });
    assert_eq!(world.tcp(&to, 1)[0]["errno"], ENETUNREACH);
    world.api.apply(http_service("web", VIP));
    world.wait_for("the service back", |rows| {
        frontend(rows, VIP, 80, "TCP").is_some()
    });
    assert_eq!(reply_name(&world.tcp(&to, 1)[0]), "backend-3");

    // The headless label on the slice hides its endpoints (rule 1).
    world.api.apply(slice_with(
        "web-1",
        "web",
        &HTTP_TARGET,
        &BACKENDS[2..],
        "service.kubernetes.io/headless: ''",
    ));
    world.wait_for("no endpoints", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.is_empty())
    });
    assert_eq!(world.tcp(&to, 1)[0]["errno"], ECONNREFUSED, "rule 21");
    world.api.apply(http_slice("web-1", "web", &BACKENDS[2..]));
    world.wait_for("the endpoint back", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 1)
    });

    // Delete the Service.
    world.api.delete("Service", "demo", "web").unwrap();
    world.wait_for("the deleted service to go", |rows| rows.is_empty());
    assert_eq!(world.tcp(&to, 1)[0]["errno"], ENETUNREACH);
}

#[test]
fn relist_after_410_resyncs_and_removes_stale() {
    let mut world = World::new("epke");
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let vip = format!("10.96.0.{}", 20 + i);
        world.api.apply(http_service(name, &vip));
        world
            .api
            .apply(http_slice(&format!("{name}-1"), name, &BACKENDS));
    }
    world.start_agent(&[]);
    world.wait_for("3 services", |rows| rows.len() == 3);
    world.api.wait_for_watches(3, CONVERGE).unwrap();
    let lists = |kind| count(&world.api.request_log(), |r| is_list(r, kind));
    let service_lists = lists(Kind::Service);

    // Changes no open watch sees, then compaction: resuming watches get 410
    // Gone, the agent relists, and the relist is a full resync.
    world.api.set_down(true);
    world.api.delete("Service", "demo", "b").unwrap();
    world.api.delete("EndpointSlice", "demo", "b-1").unwrap();
    world.api.apply(http_slice("a-1", "a", &BACKENDS[..1]));
    world.api.delete("EndpointSlice", "demo", "c-1").unwrap();
    world.api.apply(http_service("d", "10.96.0.23"));
    world.api.apply(http_slice("d-1", "d", &BACKENDS[1..2]));
    world.api.compact();
    world.api.set_down(false);

    world.wait_for("the resync", |rows| {
        rows.len() == 3
            && frontend(rows, "10.96.0.21", 80, "TCP").is_none()
            && backends_of(rows, "10.96.0.20", 80, "TCP").is_some_and(|b| b == ["10.244.0.11:8080"])
            && backends_of(rows, "10.96.0.22", 80, "TCP").is_some_and(|b| b.is_empty())
            && backends_of(rows, "10.96.0.23", 80, "TCP").is_some_and(|b| b == ["10.244.0.12:8080"])
    });
    assert!(
        lists(Kind::Service) > service_lists,
        "relisted after 410:\n{}",
        world.api.requests().join("\n")
    );
    assert_eq!(reply_name(&world.tcp("10.96.0.20:80", 1)[0]), "backend-1");
    assert_eq!(
        world.tcp("10.96.0.21:80", 1)[0]["errno"],
        ENETUNREACH,
        "deleted while unseen: gone"
    );
    assert_eq!(world.tcp("10.96.0.22:80", 1)[0]["errno"], ECONNREFUSED);
    assert_eq!(reply_name(&world.tcp("10.96.0.23:80", 1)[0]), "backend-2");

    // Compaction and broken connections with nothing changed: a relist
    // that changes nothing, not even ids.
    world.api.wait_for_watches(3, CONVERGE).unwrap();
    let before = world.services();
    let (service_lists, slice_lists) = (lists(Kind::Service), lists(Kind::EndpointSlice));
    world.api.compact();
    world.api.drop_connections();
    world
        .api
        .wait_for_requests("relists", CONVERGE, |log| {
            count(log, |r| is_list(r, Kind::Service)) > service_lists
                && count(log, |r| is_list(r, Kind::EndpointSlice)) > slice_lists
        })
        .unwrap();
    world.api.wait_for_watches(3, CONVERGE).unwrap();
    // A change after the relist arrives through the new watch.
    world.api.apply(http_slice("c-1", "c", &BACKENDS[2..]));
    world.wait_for("c's new endpoint", |rows| {
        backends_of(rows, "10.96.0.22", 80, "TCP").is_some_and(|b| b == ["10.244.0.13:8080"])
    });
    let after = world.services();
    for row in &before {
        let same = after
            .iter()
            .find(|r| r["frontend"] == row["frontend"])
            .unwrap();
        assert_eq!(
            same["svc_id"], row["svc_id"],
            "a relist keeps ids: {row} vs {same}"
        );
        if row["frontend"]["addr"] != "10.96.0.22" {
            assert_eq!(same, row, "unchanged by the relist");
        }
    }
}

#[test]
fn api_server_down_keeps_serving_and_healthz_reports() {
    let mut world = World::new("epkf");
    let to = format!("{VIP}:80");
    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS));
    world.api.apply(http_service("api", "10.96.0.20"));
    world.api.apply(http_slice("api-1", "api", &BACKENDS[..1]));
    world.start_agent(&["--health-timeout", "2s"]);
    world.wait_for("2 services", |rows| rows.len() == 2);
    let before = world.services();

    world.api.set_down(true);
    // Changes the agent cannot see yet.
    world.api.apply(http_slice("web-1", "web", &BACKENDS[..2]));
    world.api.delete("Service", "demo", "api").unwrap();
    // The datapath keeps serving its last state.
    assert_eq!(spread(&world.tcp(&to, 60)).len(), 3);
    let (_, body) = world.wait_healthz("503 with sourceError", |status, body| {
        status == 503 && body.get("sourceError").is_some()
    });
    assert_eq!(body["healthy"], false);
    assert!(
        body["sourceError"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    assert_eq!(
        world.services(),
        before,
        "nothing changes while the source is down"
    );
    assert!(world.tcp(&to, 10).iter().all(|r| r["ok"] == true));
    world.assert_agent_runs();

    world.api.set_down(false);
    // The watchers' backoff grew through the outage (doubling from 0.8 s):
    // the next try may be 25 s away if the steps above were slow.
    let after_outage = Duration::from_secs(60);
    world
        .node
        .wait_for_within("the changes made meanwhile", after_outage, |rows| {
            rows.len() == 1 && backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 2)
        });
    let (_, body) = world.wait_healthz("200 again", |status, _| status == 200);
    assert!(body.get("sourceError").is_none(), "{body}");
    assert_eq!(spread(&world.tcp(&to, 30)).len(), 2);
    assert_eq!(world.tcp("10.96.0.20:80", 1)[0]["errno"], ENETUNREACH);
}

#[test]
fn errors_500_are_retried() {
    let mut world = World::new("epkg");
    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS[..1]));
    world.api.apply(node(NODE, CLIENT));
    // The first list of every kind fails.
    world.api.fail_requests(3, 500);
    world.start_agent(&[]);
    assert_eq!(
        reply_name(&world.tcp(&format!("{VIP}:80"), 1)[0]),
        "backend-1"
    );
    let log = world.api.request_log();
    for kind in Kind::ALL {
        assert!(count(&log, |r| is_list(r, kind)) >= 1, "{kind:?}");
    }
    assert!(
        log.len() >= 6,
        "3 failed + 3 good lists:\n{}",
        world.api.requests().join("\n")
    );

    // Watches break and their next requests fail with 500 and 503; a change
    // made meanwhile still arrives.
    world.api.wait_for_watches(3, CONVERGE).unwrap();
    world.api.fail_requests(3, 500);
    world.api.fail_requests(2, 503);
    world.api.drop_connections();
    world.api.apply(http_slice("web-1", "web", &BACKENDS[1..2]));
    world.wait_for("the change after the errors", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b == ["10.244.0.12:8080"])
    });
    world.api.wait_for_watches(3, CONVERGE).unwrap();
    assert_eq!(
        reply_name(&world.tcp(&format!("{VIP}:80"), 1)[0]),
        "backend-2"
    );
    world.wait_healthz("200", |status, _| status == 200);
    world.assert_agent_runs();
}

#[test]
fn invalid_objects_are_skipped_and_others_work() {
    let mut world = World::new("epkh");
    let to = format!("{VIP}:80");
    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS[..2]));
    world.api.apply(http_service("bad-ip", "10.96.0.999"));
    world.api.apply(service_with(
        "bad-port",
        "10.96.0.21",
        &[("http", 70000, "TCP")],
        "",
        "",
    ));
    world.api.apply(http_service("slice-target", "10.96.0.22"));
    world
        .api
        .apply(http_slice("bad-address", "slice-target", &["10.244.0.300"]));
    world.api.apply(slice_with(
        "bad-slice-port",
        "slice-target",
        &[("http", 65536, "TCP")],
        &BACKENDS[..1],
        "",
    ));
    world.start_agent(&[]);
    world.wait_for("the valid services", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 2)
            && frontend(rows, "10.96.0.22", 80, "TCP").is_some()
    });
    let rows = world.services();
    assert_eq!(rows.len(), 2, "only web and slice-target: {rows:#?}");
    assert_eq!(
        backends_of(&rows, "10.96.0.22", 80, "TCP").unwrap(),
        Vec::<String>::new()
    );
    let log = world.agent().log();
    for name in ["bad-ip", "bad-port", "bad-address", "bad-slice-port"] {
        assert!(log.contains(name), "{name} is logged:\n{log}");
    }
    assert_eq!(spread(&world.tcp(&to, 40)).len(), 2);

    // An invalid update of a valid Service keeps its last good version.
    let rows = world.services();
    world.api.apply(http_service("web", "10.96.0.300"));
    let start = Instant::now();
    while !world.agent().log().contains("10.96.0.300") {
        assert!(
            start.elapsed() < CONVERGE,
            "invalid update not logged:\n{}",
            world.agent().log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(world.services(), rows, "last good version kept");
    assert_eq!(spread(&world.tcp(&to, 40)).len(), 2);
    // Other changes still apply, and a valid update replaces it.
    world.api.apply(http_slice("web-1", "web", &BACKENDS));
    world.wait_for("3 backends", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 3)
    });
    world.api.apply(http_service("web", "10.96.0.30"));
    world.wait_for("the valid update", |rows| {
        frontend(rows, VIP, 80, "TCP").is_none()
            && frontend(rows, "10.96.0.30", 80, "TCP").is_some()
    });
    assert_eq!(spread(&world.tcp("10.96.0.30:80", 60)).len(), 3);
    world.wait_healthz("200", |status, _| status == 200);
}

#[test]
fn bad_input_at_scale() {
    let mut world = World::new("epki");
    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS));
    // One slice with 100k endpoints (built as JSON values directly).
    let endpoints: Vec<Value> = (0..100_000u32)
        .map(|i| {
            json!({
                "addresses": [Ipv4Addr::from(0x0a80_0000 + i).to_string()],
                "conditions": {"ready": true},
            })
        })
        .collect();
    world.api.apply(http_service("big", "10.96.0.50"));
    world.api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "big-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }));
    // A slice of a Service that does not exist.
    world.api.apply(http_slice("ghost-1", "ghost", &BACKENDS));
    // Two Services on one clusterIP:port.
    world.api.apply(http_service("dup-a", "10.96.0.60"));
    world
        .api
        .apply(http_slice("dup-a-1", "dup-a", &BACKENDS[..1]));
    world.api.apply(http_service("dup-b", "10.96.0.60"));
    world
        .api
        .apply(http_slice("dup-b-1", "dup-b", &BACKENDS[1..2]));

    // Valid services first (the failure says more than /healthz would).
    world.spawn_agent(&["--health-timeout", "3s"]);
    // The first sync plans 100k endpoints in a debug build, on a host other
    // tests load too: more room than CONVERGE.
    let at_scale = Duration::from_secs(90);
    world
        .node
        .wait_for_within("web and the duplicate frontend", at_scale, |rows| {
            backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 3)
                && backends_of(rows, "10.96.0.60", 80, "TCP").is_some_and(|b| b.len() == 1)
        });
    assert_eq!(spread(&world.tcp(&format!("{VIP}:80"), 60)).len(), 3);
    let dup = reply_name(&world.tcp("10.96.0.60:80", 1)[0]);
    assert!(dup == "backend-1" || dup == "backend-2", "{dup}");
    assert!(
        world.agent().log().contains("dup-"),
        "the conflict is logged:\n{}",
        world.agent().log_tail(30)
    );

    world.wait_healthz("200", |status, _| status == 200);
    // Still up and healthy a while later (longer than --health-timeout: a
    // sync that keeps failing would show by now).
    thread::sleep(Duration::from_secs(4));
    world.assert_agent_runs();
    let (status, body) = world.healthz();
    assert_eq!(
        status,
        200,
        "{body}\nagent log:\n{}",
        world.agent().log_tail(30)
    );
    // The rest keeps working and changes still apply.
    world.api.apply(http_slice("web-1", "web", &BACKENDS[..1]));
    world.wait_for("a change after the big slice", |rows| {
        backends_of(rows, VIP, 80, "TCP").is_some_and(|b| b.len() == 1)
    });
    assert_eq!(
        reply_name(&world.tcp(&format!("{VIP}:80"), 1)[0]),
        "backend-1"
    );
}

#[test]
fn healthz_reports_one_failing_watch_while_others_flow() {
    let mut world = World::new("epkj");
    world.api.apply(http_service("web", VIP));
    world.api.apply(http_slice("web-1", "web", &BACKENDS));
    world.start_agent(&["--health-timeout", "2s"]);
    world.api.wait_for_watches(3, CONVERGE).unwrap();

    // EndpointSlices can no longer be read; Services still flow.
    world
        .api
        .fail_matching(usize::MAX, 500, |r| r.kind() == Some(Kind::EndpointSlice));
    world.api.drop_connections();
    world.api.apply(http_slice("web-1", "web", &BACKENDS[..1]));
    // Service changes keep flowing all along; once the slices have been
    // failing for longer than the health timeout /healthz turns 503 and
    // stays so for five probes in a row.
    let start = Instant::now();
    let mut statuses = Vec::new();
    let mut i = 0;
    while !statuses.ends_with(&[503; 5]) {
        assert!(
            start.elapsed() < CONVERGE,
            "/healthz while EndpointSlices fail: {statuses:?}\nagent log:\n{}",
            world.agent().log_tail(20)
        );
        i += 1;
        world.api.apply(service_with(
            "other",
            "10.96.0.20",
            &HTTP,
            &format!("gen: '{i}'"),
            "",
        ));
        let (status, _) = world.healthz();
        statuses.push(status);
        thread::sleep(Duration::from_millis(200));
    }
    // The Services flowed; the slice change never arrived.
    let rows = world.services();
    assert!(
        frontend(&rows, "10.96.0.20", 80, "TCP").is_some(),
        "{rows:#?}"
    );
    assert_eq!(
        backends_of(&rows, VIP, 80, "TCP").map(|b| b.len()),
        Some(3),
        "{rows:#?}"
    );
}
