//! Layout migration: an agent that finds pins of the previous layout (v1:
//! no scope in the frontend key, no rev-NAT id, no conntrack) builds new
//! maps beside them, fills them, moves its programs over and removes the
//! old pins. The v1 maps are made here with `BPF_MAP_CREATE` in their v1
//! shapes (key and value sizes, types, capacities) and pinned where a v1
//! agent pinned them, holding an entry of the v1 kind.

mod common;

use std::{fs, io::Error, mem, os::fd::RawFd, path::Path, time::Duration};

use common::{BACKENDS, TestNode, VIP, service, slice};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_OBJ_PIN: i64 = 6;
const HASH: u32 = 1;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const NO_PREALLOC: u32 = 1;

/// A v1 map: name, type, key size, value size, max entries, flags.
type Shape = (&'static str, u32, u32, u32, u32, u32);

const V1_MAPS: [Shape; 6] = [
    ("lb4_services", HASH, 12, 16, 262_144, NO_PREALLOC),
    ("lb4_backends", HASH, 4, 8, 262_144, NO_PREALLOC),
    ("lb4_affinity", LRU_HASH, 16, 8, 65_536, 0),
    ("lb_aff_match", HASH, 12, 1, 262_144, NO_PREALLOC),
    ("lb4_sock_rnat", LRU_HASH, 16, 8, 262_144, 0),
    ("lb_counters", PERCPU_ARRAY, 4, 8, 7, 0),
];

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: i64, attr: &mut T) -> i64 {
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, mem::size_of::<T>()) };
    assert!(ret >= 0, "bpf({cmd}): {}", Error::last_os_error());
    ret
}

/// Creates and pins the v1 maps under `<pins>/maps/`, with one v1
/// backend entry (id 1) so the old maps are not empty.
fn pin_v1_maps(pins: &Path) {
    let dir = pins.join("maps");
    fs::create_dir_all(&dir).unwrap();
    for (name, map_type, key_size, value_size, max_entries, map_flags) in V1_MAPS {
        let mut create = MapCreate {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags,
        };
        let fd = bpf(BPF_MAP_CREATE, &mut create) as RawFd;
        if name == "lb4_backends" {
            let key = 1u32;
            let value = [10u8, 244, 0, 11, 0x1f, 0x90, 6, 0];
            let mut update = ElemUpdate {
                map_fd: fd as u32,
                key: &key as *const u32 as u64,
                value: value.as_ptr() as u64,
                ..ElemUpdate::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut update);
        }
        let path = std::ffi::CString::new(dir.join(name).to_str().unwrap()).unwrap();
        let mut pin = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd as u32,
            ..ObjPin::default()
        };
        bpf(BPF_OBJ_PIN, &mut pin);
        unsafe { libc::close(fd) };
    }
}

#[test]
fn agent_migrates_pins_of_the_previous_layout() {
    let mut node = TestNode::new("epmg");
    node.write("svc.yaml", &service("web", &[("http", 80, "TCP")], ""));
    node.write(
        "slice.yaml",
        &slice("web", &[("http", 8080, "TCP")], &BACKENDS),
    );
    pin_v1_maps(node.pins.path());
    node.start_agent();

    // The programs move to the new maps after their first sync.
    let log = node
        .agent()
        .wait_for_log("migration finished", Duration::from_secs(30));
    assert!(
        log.contains("have another layout or size: migrating")
            && log.contains("migration finished"),
        "the agent did not migrate:\n{log}"
    );
    let answering = node.answering(&format!("{VIP}:80"), 60);
    assert_eq!(answering, ["backend-1", "backend-2", "backend-3"]);

    let mut left: Vec<String> = fs::read_dir(node.pins.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["links", "maps"], "old or staging pins left behind");
    for map in ["lb4_ct", "lb4_ct_reply", "lb4_rev_nat", "lb4_src_ranges"] {
        assert!(
            node.pins.path().join("maps").join(map).exists(),
            "{map} is not pinned after the migration"
        );
    }

    // The migrated maps are the current layout: a restart reuses them.
    node.agent_mut().kill();
    node.agent = None;
    node.start_agent();
    assert!(
        !node.agent().log().contains("have another layout"),
        "a second start migrated again:\n{}",
        node.agent().log()
    );
    let answering = node.answering(&format!("{VIP}:80"), 60);
    assert_eq!(answering, ["backend-1", "backend-2", "backend-3"]);
}
