//! Loading, attaching and pinning the eBPF programs.
//!
//! Everything the datapath needs outlives the agent: maps are pinned under
//! `<bpffs>/maps/`, and each attachment is a BPF link pinned under
//! `<bpffs>/links/` (socket hooks on the cgroup, tc on every `--devices`
//! device). A restarted agent reuses the map pins (so no entry is lost)
//! and attaches its own programs before the old links are unpinned, so at
//! no moment is traffic left without translation. Removing the `<bpffs>`
//! directory detaches everything.
//!
//! Maps pinned by another layout (an older agent) or with other capacities
//! are not reused: new maps are built in `<bpffs>/maps_next/`, the agent
//! fills them, attaches its programs to them and only then makes them
//! `<bpffs>/maps/` and removes the old ones ([`Datapath::finish_migration`]).
//! Flow state (conntrack, affinity, socket rev-NAT) is copied over where
//! its layout did not change.
//!
//! The programs log rare events (malformed packets, full tables, SNAT port
//! exhaustion, inconsistent maps) through aya-log: [`Datapath::forward_logs`]
//! turns them into lines of the agent's own log.

mod detach;
mod migrate;
mod mounts;

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
        xdp::{XdpLink, XdpMode as AyaXdpMode},
    },
};
use aya_log::{EbpfLogger, Level};
use proxy_common::{map_names, map_sizes};
use tokio::io::{Interest, unix::AsyncFd};

use crate::maps::MAPS_DIR;

pub use mounts::{check_bpffs, check_cgroup2, default_cgroup2};

/// The eBPF object, built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The socket-level programs, each attached to the cgroup: the IPv4
/// hooks, and the IPv6 ones that serve IPv4-mapped addresses.
pub const SOCK_PROGRAMS: [&str; 7] = [
    "lb4_connect",
    "lb4_sendmsg",
    "lb4_recvmsg",
    "lb4_getpeername",
    "lb4_connect6",
    "lb4_recvmsg6",
    "lb4_getpeername6",
];

/// The packet-level programs and where each is attached on a device.
pub const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("tc_ingress", TcAttachType::Ingress),
    ("tc_egress", TcAttachType::Egress),
];

/// The XDP program, attached to every device in the `--xdp-mode` asked.
pub const XDP_PROGRAM: &str = "xdp_ingress";

/// How XDP runs on the devices (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native on devices backed by hardware; off on virtual ones (veth,
    /// bridge, bond, VLAN), where native XDP sending a packet back out
    /// depends on the other end (a veth peer must run NAPI) and a generic
    /// hook is slower than tc.
    Auto,
    /// In the driver, before an skb exists; a device whose driver cannot
    /// is served by tc alone (one log line).
    Native,
    /// In the kernel's generic hook (any device; slower than native).
    Generic,
    /// No XDP: tc does everything.
    Off,
}

impl XdpMode {
    /// The mode `device` gets: `Auto` resolved by whether the device has
    /// hardware behind it.
    fn for_device(self, device: &str) -> XdpMode {
        match self {
            XdpMode::Auto if crate::host::has_hardware(device) => XdpMode::Native,
            XdpMode::Auto => {
                tracing::info!(
                    %device,
                    "virtual device: XDP off (tc serves it; --xdp-mode native or generic to force)"
                );
                XdpMode::Off
            }
            mode => mode,
        }
    }

    fn pin_prefix(self) -> Option<&'static str> {
        match self {
            XdpMode::Native => Some("xdp_native"),
            XdpMode::Generic => Some("xdp_generic"),
            XdpMode::Auto | XdpMode::Off => None,
        }
    }

    fn aya_mode(self) -> AyaXdpMode {
        match self {
            XdpMode::Generic => AyaXdpMode::Skb,
            XdpMode::Auto | XdpMode::Native | XdpMode::Off => AyaXdpMode::Driver,
        }
    }
}

/// The most verbose level the programs log at (`--datapath-log-level`).
/// Fixed at load time: the verifier drops the lines above it, so they cost
/// nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DatapathLogLevel {
    Off,
    Error,
    #[default]
    Warn,
    Info,
    Debug,
    Trace,
}

impl DatapathLogLevel {
    /// The value of aya-log-ebpf's `AYA_LOG_LEVEL` global: levels up to it
    /// are logged, 0 logs nothing.
    fn aya_log_level(self) -> u8 {
        match self {
            DatapathLogLevel::Off => 0,
            DatapathLogLevel::Error => Level::Error as u8,
            DatapathLogLevel::Warn => Level::Warn as u8,
            DatapathLogLevel::Info => Level::Info as u8,
            DatapathLogLevel::Debug => Level::Debug as u8,
            DatapathLogLevel::Trace => Level::Trace as u8,
        }
    }
}

const STAGING_DIR: &str = "maps_next";
const RETIRED_DIR: &str = "maps_old";
const LINKS_DIR: &str = "links";

/// Sizes of the maps that grow with the cluster, set at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// `lb4_services` entries: masters, backend slots and rule 9 entries.
    pub services: u32,
    /// `lb4_backends` entries (also bounds affinity-match pairs).
    pub backends: u32,
    /// Tracked external flows (`lb4_ct`).
    pub conntrack: u32,
    /// Their reply/NAT entries (`lb4_ct_reply`).
    pub nat: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            services: map_sizes::SERVICES,
            backends: map_sizes::BACKENDS,
            conntrack: map_sizes::CONNTRACK,
            nat: map_sizes::CT_REPLY,
        }
    }
}

impl Capacities {
    /// `max_entries` per map name; maps not named keep the object's size.
    fn max_entries(&self) -> [(&'static str, u32); 6] {
        // A frontend has at least a master and a slot, so a quarter of the
        // services entries bounds the frontends, each with one rev-NAT id.
        let frontends = (self.services / 4).max(1024);
        [
            (map_names::SERVICES, self.services),
            (map_names::BACKENDS, self.backends),
            (map_names::AFFINITY_MATCH, self.backends),
            (map_names::REV_NAT, frontends),
            (map_names::CONNTRACK, self.conntrack),
            (map_names::CT_REPLY, self.nat),
        ]
    }
}

/// The loaded object with its maps pinned, ready to be attached.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    maps_dir: PathBuf,
    migrating: bool,
}

impl Datapath {
    /// Loads the object against the pinned maps: those of `<bpffs>/maps/`
    /// when they have this build's layout and `capacities`, otherwise new
    /// ones in the staging directory (a migration).
    pub fn load(
        bpffs: &Path,
        capacities: &Capacities,
        log_level: DatapathLogLevel,
    ) -> Result<Self> {
        check_bpffs(bpffs)?;
        for dir in [LINKS_DIR, MAPS_DIR] {
            fs::create_dir_all(bpffs.join(dir))
                .with_context(|| format!("creating {}", bpffs.join(dir).display()))?;
        }
        let current = bpffs.join(MAPS_DIR);
        let staging = bpffs.join(STAGING_DIR);
        // A staging directory is left only by an interrupted migration;
        // the current maps still serve, so it is built anew.
        remove_dir_if_present(&staging)?;
        if migrate::is_empty(&current)? {
            let ebpf = load_pinned(&current, capacities, log_level)?;
            return Ok(Self::new(ebpf, bpffs, current, false));
        }
        let staged = load_pinned(&staging, capacities, log_level)?;
        let differences = migrate::differences(&current, &staging)?;
        if differences.is_empty() {
            drop(staged);
            fs::remove_dir_all(&staging)
                .with_context(|| format!("removing {}", staging.display()))?;
            let ebpf = load_pinned(&current, capacities, log_level)?;
            return Ok(Self::new(ebpf, bpffs, current, false));
        }
        tracing::info!(
            from = %current.display(),
            to = %staging.display(),
            differences = %differences.join("; "),
            "pinned maps have another layout or size: migrating"
        );
        let copied = migrate::copy_flow_state(&current, &staging)?;
        tracing::info!(
            conntrack = copied.conntrack,
            ct_reply = copied.ct_reply,
            affinity = copied.affinity,
            sock_rev_nat = copied.sock_rev_nat,
            "flow state copied to the new maps"
        );
        Ok(Self::new(staged, bpffs, staging, true))
    }

    fn new(ebpf: Ebpf, bpffs: &Path, maps_dir: PathBuf, migrating: bool) -> Self {
        Self {
            ebpf,
            bpffs: bpffs.to_path_buf(),
            maps_dir,
            migrating,
        }
    }

    /// Where the maps this datapath uses are pinned (the reconciler opens
    /// them here).
    pub fn maps_dir(&self) -> &Path {
        &self.maps_dir
    }

    /// Forwards what the programs log into the agent's log (`tracing`,
    /// through the `log` bridge, targets `proxy_ebpf::*`) for as long as
    /// the runtime runs. Programs of an earlier agent that are still
    /// attached log into their own ring, which nobody reads.
    pub fn forward_logs(&mut self) -> Result<()> {
        let logger =
            EbpfLogger::init(&mut self.ebpf).context("opening the programs' log ring (aya-log)")?;
        // SAFETY: the logger owns the ring's map fd and keeps it open, the
        // same fd, until it is dropped together with the AsyncFd.
        let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(std::io::Error::from)
            .context("watching the programs' log ring")?;
        tokio::spawn(async move {
            while let Ok(mut ready) = logger.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
        Ok(())
    }

    /// Whether the maps are new ones that must be filled before
    /// [`Datapath::attach`] (so traffic never meets empty maps).
    pub fn migrating(&self) -> bool {
        self.migrating
    }

    /// Attaches the socket programs to `cgroup`, and the tc programs and
    /// (in `xdp` mode) the XDP program to each of `devices`, replacing the
    /// links a previous agent left; links of devices no longer listed, or
    /// of another XDP mode, are removed.
    pub fn attach(&mut self, cgroup: &Path, devices: &[String], xdp: XdpMode) -> Result<()> {
        check_cgroup2(cgroup)?;
        let links = self.bpffs.join(LINKS_DIR);
        let cgroup_dir =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in SOCK_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let link_id = program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            let link: FdLink = program.take_link(link_id)?.try_into().with_context(|| {
                format!("{name}: the kernel did not give a BPF link (needs 5.7+)")
            })?;
            pin_replacing(link, &links.join(name))?;
        }
        let mut wanted: Vec<String> = SOCK_PROGRAMS.iter().map(|n| n.to_string()).collect();
        for (name, attach_type) in TC_PROGRAMS {
            let program: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            for device in devices {
                let link_id = program
                    .attach_with_options(
                        device,
                        attach_type,
                        TcAttachOptions::TcxOrder(Default::default()),
                    )
                    .with_context(|| {
                        format!("attaching {name} to device {device} (TCX, Linux 6.6+)")
                    })?;
                let link: FdLink = program
                    .take_link(link_id)?
                    .try_into()
                    .with_context(|| format!("{name} on {device}: not a TCX link"))?;
                let pin = format!("{name}_{device}");
                pin_replacing(link, &links.join(&pin))?;
                wanted.push(pin);
            }
        }
        for device in devices {
            let mode = xdp.for_device(device);
            if let Some(prefix) = mode.pin_prefix() {
                let pin = format!("{prefix}_{device}");
                if self.attach_xdp(device, mode, &links.join(&pin))? {
                    wanted.push(pin);
                }
            }
        }
        remove_links_except(&links, &wanted)
    }

    /// Runs the XDP program on `device`: on the link a previous agent
    /// pinned there in this mode (replaced atomically), or on a new one.
    /// False, with one log line, when the device cannot run it (tc serves
    /// the device alone; the agent never fails over XDP).
    fn attach_xdp(&mut self, device: &str, mode: XdpMode, pin: &Path) -> Result<bool> {
        let program: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
        if let Ok(pinned) = PinnedLink::from_pin(pin) {
            let link = XdpLink::try_from(FdLink::from(pinned));
            match link.map(|link| program.attach_to_link(link)) {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(err)) => {
                    tracing::warn!(%device, error = %err, "cannot update the pinned XDP link; attaching anew")
                }
                Err(err) => {
                    tracing::warn!(%device, error = %err, "pinned XDP link unusable; attaching anew")
                }
            }
            remove_if_present(pin)?;
        }
        let attached = program
            .attach(device, mode.aya_mode())
            .map_err(anyhow::Error::from)
            .and_then(|link_id| Ok(FdLink::try_from(program.take_link(link_id)?)?));
        match attached {
            Ok(link) => {
                pin_replacing(link, pin)?;
                Ok(true)
            }
            Err(err) => {
                tracing::warn!(
                    %device,
                    ?mode,
                    error = %format!("{err:#}"),
                    "XDP cannot run on this device; tc serves it alone"
                );
                Ok(false)
            }
        }
    }

    /// The new maps become `<bpffs>/maps/`; the old ones, which no attached
    /// program uses any more, are removed.
    pub fn finish_migration(&mut self) -> Result<()> {
        if !self.migrating {
            return Ok(());
        }
        let current = self.bpffs.join(MAPS_DIR);
        let retired = self.bpffs.join(RETIRED_DIR);
        remove_dir_if_present(&retired)?;
        fs::rename(&current, &retired)
            .with_context(|| format!("renaming {} to {}", current.display(), retired.display()))?;
        fs::rename(&self.maps_dir, &current).with_context(|| {
            format!(
                "renaming {} to {}",
                self.maps_dir.display(),
                current.display()
            )
        })?;
        fs::remove_dir_all(&retired).with_context(|| format!("removing {}", retired.display()))?;
        self.maps_dir = current;
        self.migrating = false;
        tracing::info!(maps = %self.maps_dir.display(), "migration finished; old maps removed");
        Ok(())
    }
}

/// Loads the object with every map pinned in `dir` (created there when
/// missing) at the given capacities. The log ring and the log rate limiter
/// are not pinned: they belong to one load of the programs.
fn load_pinned(dir: &Path, capacities: &Capacities, log_level: DatapathLogLevel) -> Result<Ebpf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let map_pins: Vec<(&str, PathBuf)> = map_names::ALL
        .iter()
        .map(|name| (*name, dir.join(name)))
        .collect();
    let aya_log_level = log_level.aya_log_level();
    let mut loader = EbpfLoader::new();
    loader.override_global(aya_log::LEVEL, &aya_log_level, true);
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    load_with(&mut loader, capacities)
        .with_context(|| format!("with the maps pinned under {}", dir.display()))
}

/// Loads the object with maps of its own, pinned nowhere and attached to
/// nothing: for running the programs on crafted packets
/// (`BPF_PROG_TEST_RUN`) in tests and benchmarks. Every log level stays
/// on, so the verifier checks every log line.
pub fn load_detached(capacities: &Capacities) -> Result<Ebpf> {
    load_with(&mut EbpfLoader::new(), capacities)
}

fn load_with(loader: &mut EbpfLoader, capacities: &Capacities) -> Result<Ebpf> {
    for (name, max_entries) in capacities.max_entries() {
        loader.map_max_entries(name, max_entries);
    }
    let mut ebpf = loader.load(OBJECT).map_err(|err| {
        anyhow::Error::new(err).context(
            "loading the eBPF object: if permission is denied, run as root or with CAP_BPF, \
             CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON",
        )
    })?;
    // Every program passes the verifier before anything is attached.
    for name in SOCK_PROGRAMS {
        let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        program
            .load()
            .with_context(|| format!("loading program {name} (verifier log above, if any)"))?;
    }
    for (name, _) in TC_PROGRAMS {
        let program: &mut SchedClassifier = program(&mut ebpf, name)?;
        program
            .load()
            .with_context(|| format!("loading program {name} (verifier log above, if any)"))?;
    }
    let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?;
    xdp.load()
        .with_context(|| format!("loading program {XDP_PROGRAM} (verifier log above, if any)"))?;
    Ok(ebpf)
}

/// A program of the object, as its type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
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

/// Unpins (detaches) every link in `dir` whose name is not in `wanted`.
fn remove_links_except(dir: &Path, wanted: &[String]) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&name) {
            tracing::info!(link = %name, "detaching a link this agent no longer uses");
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("inspecting {}", path.display())),
    }
}

fn remove_dir_if_present(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

/// The device of the default route in this network namespace: where
/// external traffic arrives when `--devices` is not given. Without a
/// default route nothing arrives from outside, so no device is used.
pub fn default_route_device() -> Result<Option<String>> {
    let routes = fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    let device = default_route_in(&routes);
    if device.is_none() {
        tracing::warn!(
            "no IPv4 default route and no --devices: traffic from outside the node is not \
             translated (only sockets on the node are)"
        );
    }
    Ok(device)
}

/// The interface of the first default route (destination and mask 0) of a
/// `/proc/net/route` text.
fn default_route_in(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
            .then(|| fields[0].to_string())
    })
}

/// Fails with a clear message when a device does not exist here.
pub fn check_devices(devices: &[String]) -> Result<()> {
    for device in devices {
        if crate::host::interface_index(device).is_none() {
            bail!(
                "--devices: no network device {device:?} in this network namespace (see `ip link`)"
            );
        }
    }
    Ok(())
}

/// Detaches the programs and drops every pinned map and link: what
/// `ebpf-proxy uninstall` does. Live translations stop.
pub fn uninstall(bpffs: &Path) -> Result<()> {
    if !bpffs.exists() {
        return Ok(());
    }
    if !bpffs.join(MAPS_DIR).exists() && !bpffs.join(LINKS_DIR).exists() {
        bail!(
            "{} does not look like an ebpf-proxy pin directory",
            bpffs.display()
        );
    }
    detach_links(&bpffs.join(LINKS_DIR));
    fs::remove_dir_all(bpffs).with_context(|| format!("removing {}", bpffs.display()))
}

/// Takes every pinned link off its hook before the pins go, so that no
/// program runs once `uninstall` returns. A link that cannot be detached
/// (an older kernel) is still released when its pin is removed.
fn detach_links(links: &Path) {
    let Ok(entries) = fs::read_dir(links) else {
        return;
    };
    for pin in entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
    {
        if let Err(err) = detach::detach_pinned_link(&pin) {
            tracing::warn!(pin = %pin.display(), error = %err, "cannot detach the link; it goes with its pin");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_device_is_read_from_proc_net_route() {
        let routes = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
";
        assert_eq!(default_route_in(routes), Some("eth0".to_string()));
        assert_eq!(
            default_route_in(
                routes
                    .lines()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join("\n")
                    .as_str()
            ),
            None
        );
    }

    #[test]
    fn capacities_size_the_growing_maps() {
        let capacities = Capacities {
            services: 4096,
            backends: 100,
            conntrack: 10,
            nat: 20,
        };
        let sizes = capacities.max_entries();
        assert!(sizes.contains(&(map_names::SERVICES, 4096)));
        assert!(sizes.contains(&(map_names::REV_NAT, 1024)));
        assert!(sizes.contains(&(map_names::CT_REPLY, 20)));
    }
}
