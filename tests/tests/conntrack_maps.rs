//! The conntrack collector, `ebpf-proxy conntrack` and `ebpf-proxy explain`
//! against real BPF maps pinned the way the agent pins them (created here,
//! with the object's key and value layouts), so byte order, the LPM trie
//! key and the deletes are checked on the kernel's side. Needs root.

use std::{fs, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use proxy_common::{
    Backend, CtEntry, CtReply, Flow4, RevNat, ServiceKey, ServiceValue, SourceRange, backend_flags,
    ct_flags, ct_state, map_names, proto, scope, service_flags,
};
use proxy_tests::PinDir;
use proxy_userspace::{
    conntrack::{ConntrackGc, flows, monotonic_coarse_ns},
    explain::{self, Verdict},
    maps::{codec, pin_path},
    model::Protocol,
};

const SECOND: u64 = 1_000_000_000;

fn addr(text: &str) -> u32 {
    codec::addr_to_map(text.parse::<Ipv4Addr>().unwrap())
}

fn port(port: u16) -> u16 {
    codec::port_to_map(port)
}

/// Creates map `name` under `bpffs` holding `entries`.
fn pin_hash<K: aya::Pod, V: aya::Pod>(bpffs: &Path, name: &str, entries: &[(K, V)]) {
    let mut map = HashMap::<MapData, K, V>::create(1024, 0).unwrap();
    for (key, value) in entries {
        map.insert(key, value, 0).unwrap();
    }
    map.pin(pin_path(bpffs, name)).unwrap();
}

fn open_hash<K: aya::Pod, V: aya::Pod>(bpffs: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pin_path(bpffs, name)).unwrap();
    HashMap::try_from(Map::HashMap(data)).unwrap()
}

fn keys<K: aya::Pod + Ord, V: aya::Pod>(bpffs: &Path, name: &str) -> Vec<K> {
    let mut keys: Vec<K> = open_hash::<K, V>(bpffs, name)
        .keys()
        .map(Result::unwrap)
        .collect();
    keys.sort();
    keys
}

struct Node {
    pins: PinDir,
    now: u64,
    /// 203.0.113.7:40000 -> the NodePort, tracked to the remote backend.
    live: Flow4,
    live_reply: Flow4,
    /// 203.0.113.8:40000 -> the NodePort, closed 20 s ago.
    closed: Flow4,
    /// A reply entry without a flow.
    orphan: Flow4,
}

/// NodePort 192.168.1.10:30080/TCP (rev-NAT id 5) open to 203.0.113.0/24,
/// with backend 11 on this node and 12 elsewhere, and its conntrack.
fn node() -> Node {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "these tests need root (BPF maps)"
    );
    let pins = PinDir::new("ctmaps").unwrap();
    let bpffs = pins.path();
    fs::create_dir_all(bpffs.join("maps")).unwrap();
    let now = monotonic_coarse_ns().unwrap();
    assert!(now > 60 * SECOND, "the clock starts at boot");
    let node_port = (addr("192.168.1.10"), port(30080));
    let local = Backend::new(
        addr("10.244.1.11"),
        port(8080),
        proto::TCP,
        backend_flags::LOCAL,
    );
    let remote = Backend::new(addr("10.244.2.12"), port(8080), proto::TCP, 0);
    let master = ServiceKey::new(node_port.0, node_port.1, proto::TCP, scope::EXTERNAL, 0);
    pin_hash(
        bpffs,
        map_names::SERVICES,
        &[
            (
                master,
                ServiceValue {
                    count: 2,
                    flags: service_flags::SOURCE_RANGES,
                    svc_id: 3,
                    rev_nat_id: 5,
                    ..ServiceValue::slot(0)
                },
            ),
            (master.with_slot(1), ServiceValue::slot(11)),
            (master.with_slot(2), ServiceValue::slot(12)),
        ],
    );
    pin_hash(bpffs, map_names::BACKENDS, &[(11u32, local), (12, remote)]);
    pin_hash(
        bpffs,
        map_names::REV_NAT,
        &[(
            5u32,
            RevNat {
                addr: node_port.0,
                port: node_port.1,
                _pad0: 0,
            },
        )],
    );
    let mut ranges = LpmTrie::<MapData, SourceRange, u8>::create(16, 1).unwrap();
    ranges
        .insert(
            &Key::new(
                SourceRange::prefix_len(24),
                SourceRange::new(5, addr("203.0.113.0")),
            ),
            1,
            0,
        )
        .unwrap();
    ranges
        .pin(pin_path(bpffs, map_names::SOURCE_RANGES))
        .unwrap();

    let client = |last: &str| {
        Flow4::new(
            addr(last),
            node_port.0,
            port(40000),
            node_port.1,
            proto::TCP,
        )
    };
    let live = client("203.0.113.7");
    let closed = client("203.0.113.8");
    let to_remote = |last_seen, state, nat_port| CtEntry {
        last_seen,
        backend_id: 12,
        rev_nat_id: 5,
        backend_addr: remote.addr,
        nat_addr: node_port.0,
        backend_port: remote.port,
        nat_port: port(nat_port),
        state,
        flags: ct_flags::SNAT,
        _pad0: 0,
    };
    let reply_to = |nat_port| {
        Flow4::new(
            remote.addr,
            node_port.0,
            remote.port,
            port(nat_port),
            proto::TCP,
        )
    };
    let reply_value = |flow: &Flow4| CtReply {
        client_addr: flow.saddr,
        rev_nat_id: 5,
        client_port: flow.sport,
        flags: ct_flags::SNAT,
        _pad0: 0,
    };
    let live_reply = reply_to(61001);
    let orphan = reply_to(61003);
    pin_hash(
        bpffs,
        map_names::CONNTRACK,
        &[
            (live, to_remote(now, ct_state::TCP_ESTABLISHED, 61001)),
            (
                closed,
                to_remote(now - 20 * SECOND, ct_state::TCP_CLOSING, 61002),
            ),
        ],
    );
    pin_hash(
        bpffs,
        map_names::CT_REPLY,
        &[
            (live_reply, reply_value(&live)),
            (reply_to(61002), reply_value(&closed)),
            (orphan, reply_value(&client("203.0.113.9"))),
        ],
    );
    Node {
        pins,
        now,
        live,
        live_reply,
        closed,
        orphan,
    }
}

#[test]
fn gc_removes_expired_pairs_then_orphans_from_pinned_maps() {
    let node = node();
    let bpffs = node.pins.path();
    let mut gc = ConntrackGc::new(bpffs);
    let first = gc.run_once(node.now).unwrap();
    assert_eq!(
        (
            first.scanned,
            first.entries,
            first.idle_timeout,
            first.capacity
        ),
        (2, 1, 1, 1024)
    );
    assert_eq!(first.orphans_removed, 0);
    assert_eq!(
        keys::<Flow4, CtEntry>(bpffs, map_names::CONNTRACK),
        [node.live]
    );
    let mut replies = vec![node.live_reply, node.orphan];
    replies.sort();
    assert_eq!(keys::<Flow4, CtReply>(bpffs, map_names::CT_REPLY), replies);
    let second = gc.run_once(node.now).unwrap();
    assert_eq!(second.orphans_removed, 1);
    assert_eq!(
        keys::<Flow4, CtReply>(bpffs, map_names::CT_REPLY),
        [node.live_reply]
    );
    assert!(!keys::<Flow4, CtEntry>(bpffs, map_names::CONNTRACK).contains(&node.closed));
}

#[test]
fn conntrack_listing_reads_the_pinned_flows() {
    let node = node();
    let rows = flows::read(node.pins.path()).unwrap();
    let summary: Vec<String> = rows
        .iter()
        .map(|row| {
            format!(
                "{} {:?} {} {:?} {} {}",
                row.client,
                row.frontend.map(|f| f.to_string()),
                row.backend,
                row.nat.map(|n| n.to_string()),
                row.state,
                row.backend_current
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "203.0.113.7:40000 Some(\"192.168.1.10:30080\") 10.244.2.12:8080 \
             Some(\"192.168.1.10:61001\") established true",
            "203.0.113.8:40000 Some(\"192.168.1.10:30080\") 10.244.2.12:8080 \
             Some(\"192.168.1.10:61002\") closing true",
        ]
    );
    assert!(rows[1].idle_seconds >= 20 && rows[1].expires_in_seconds == 0);
}

#[test]
fn explain_reads_the_pinned_maps_like_the_datapath() {
    let node = node();
    let bpffs = node.pins.path();
    let nodeport = "192.168.1.10:30080".parse().unwrap();
    let explain =
        |src: &str| explain::explain(bpffs, src.parse().unwrap(), nodeport, Protocol::Tcp).unwrap();
    let tracked = explain("203.0.113.7:40000");
    assert_eq!(tracked.verdict, Verdict::Established, "{}", tracked.reason);
    let new = explain("203.0.113.50:40000");
    assert_eq!(new.verdict, Verdict::Translate, "{}", new.reason);
    let nats: Vec<_> = new
        .backends
        .iter()
        .map(|choice| (choice.backend.unwrap().to_string(), choice.nat))
        .collect();
    assert_eq!(
        nats,
        [
            ("10.244.1.11:8080".to_string(), Some("DNAT")),
            ("10.244.2.12:8080".to_string(), Some("DNAT+SNAT")),
        ]
    );
    let outside = explain("198.51.100.1:40000");
    assert_eq!(outside.verdict, Verdict::Drop, "{}", outside.reason);
    let other_port = explain::explain(
        bpffs,
        "203.0.113.50:40000".parse().unwrap(),
        "192.168.1.10:30081".parse().unwrap(),
        Protocol::Tcp,
    )
    .unwrap();
    assert_eq!(other_port.verdict, Verdict::Pass);
}
