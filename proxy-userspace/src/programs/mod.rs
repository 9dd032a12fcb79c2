//! Loading, attaching and pinning the eBPF programs.
//!
//! Everything the datapath needs outlives the agent: maps are pinned under
//! `<bpffs>/maps/`, and each attachment is a BPF link pinned under
//! `<bpffs>/links/`. A restarted agent reuses the map pins (so no entry is
//! lost) and attaches its own programs before the old links are unpinned,
//! so at no moment is a socket left without translation. Removing the
//! `<bpffs>` directory detaches everything.

mod mounts;

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use proxy_common::map_names;

pub use mounts::{check_bpffs, check_cgroup2, default_cgroup2};

use crate::maps;

/// The eBPF object, built by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The socket-level programs, each attached to the cgroup.
pub const SOCK_PROGRAMS: [&str; 4] = [
    "lb4_connect",
    "lb4_sendmsg",
    "lb4_recvmsg",
    "lb4_getpeername",
];

fn link_pin_path(bpffs: &Path, program: &str) -> PathBuf {
    bpffs.join("links").join(program)
}

/// Loads the programs against the pinned maps (creating the pins on first
/// start) and attaches them to `cgroup`, replacing the links a previous
/// agent left.
pub fn install(bpffs: &Path, cgroup: &Path) -> Result<()> {
    check_bpffs(bpffs)?;
    check_cgroup2(cgroup)?;
    for dir in ["maps", "links"] {
        fs::create_dir_all(bpffs.join(dir))
            .with_context(|| format!("creating {}", bpffs.join(dir).display()))?;
    }

    let map_pins: Vec<(&str, PathBuf)> = map_names::ALL
        .iter()
        .map(|name| (*name, maps::pin_path(bpffs, name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT).map_err(|err| {
        anyhow::Error::new(err).context(format!(
            "loading the eBPF object with maps pinned under {}: if a pinned map has an \
             incompatible layout (left by another version), remove {} (this drops the \
             live datapath state); if permission is denied, run as root or with CAP_BPF, \
             CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON",
            bpffs.join("maps").display(),
            bpffs.display()
        ))
    })?;

    let cgroup_dir =
        File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    for name in SOCK_PROGRAMS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
        program
            .load()
            .with_context(|| format!("loading program {name} (verifier log above, if any)"))?;
        let link_id = program
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        let link: FdLink = program
            .take_link(link_id)?
            .try_into()
            .with_context(|| format!("{name}: the kernel did not give a BPF link (needs 5.7+)"))?;
        pin_replacing(link, &link_pin_path(bpffs, name))?;
    }
    Ok(())
}

/// Pins `link` at `path`, atomically replacing a link pinned there: the new
/// program is attached before the old link's last reference goes.
fn pin_replacing(link: FdLink, path: &Path) -> Result<()> {
    // bpffs refuses names with a dot.
    let staging = path.with_file_name(format!(
        "{}_new",
        path.file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("link")
    ));
    remove_if_present(&staging)?;
    link.pin(&staging)
        .with_context(|| format!("pinning link at {}", staging.display()))?;
    fs::rename(&staging, path).with_context(|| {
        format!(
            "replacing pinned link {} with {}",
            path.display(),
            staging.display()
        )
    })?;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("inspecting {}", path.display())),
    }
}

/// Detaches the programs and drops every pinned map and link: what
/// `ebpf-proxy uninstall` does. Live translations stop.
pub fn uninstall(bpffs: &Path) -> Result<()> {
    if !bpffs.exists() {
        return Ok(());
    }
    if !bpffs.join("maps").exists() && !bpffs.join("links").exists() {
        bail!(
            "{} does not look like an ebpf-proxy pin directory",
            bpffs.display()
        );
    }
    fs::remove_dir_all(bpffs).with_context(|| format!("removing {}", bpffs.display()))
}
