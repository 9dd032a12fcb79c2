//! The testbed: network namespaces, cgroups, bpffs pin directories and
//! processes, each owned by a guard that removes it on drop (also when a
//! test panics), plus helpers to run the agent and the `netns-host` test
//! host inside them.
//!
//! Safety rule: every packet a test sends travels between namespaces the
//! test created. Nothing here adds addresses or routes to the root network
//! namespace; [`veth_pair`] creates both ends inside test namespaces.
//!
//! Binaries: [`netns_host_bin`] and [`agent_bin`] are looked up next to the
//! running executable (`target/<profile>/`). `cargo test -p proxy-tests`
//! builds `netns-host` itself; `ebpf-proxy` must be built first with
//! `cargo build -p proxy-userspace` (`cargo xtask test` does both).
//! `NETNS_HOST_BIN` and `EBPF_PROXY_BIN` override the paths.
//!
//! Processes: everything spawned through [`Netns::spawn`] or
//! [`ChildGuard::spawn`] gets `PR_SET_PDEATHSIG=SIGKILL`, so it dies with
//! the *thread* that spawned it even if the test process is killed. Spawn
//! long-lived children from the thread that owns their guard.
//!
//! Naming: [`unique_name`] gives `<prefix>-<pid>-<n>`; [`remove_leftovers`]
//! removes whatever a dead process of that prefix left behind.

pub mod apiserver;
pub mod clients;
pub mod cluster;
pub mod fuzz;
pub mod manifests;
pub mod tc;

use anyhow::{Context, Result, anyhow, bail};
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

/// Where bpffs must be mounted; pin directories live below it.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where `ip netns add` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The agent's `/healthz` address inside its network namespace.
pub const AGENT_HEALTHZ: &str = "127.0.0.1:10256";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<prefix>-<pid>-<n>`, unique within this machine while the process
/// lives. Interface names are limited to 15 characters: names of network
/// namespaces are not, but keep prefixes short (3-4 characters) anyway.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Mount points of every mount of file system type `fstype`
/// (`cgroup2`, `bpf`, ...), read from `/proc/self/mountinfo`.
pub fn find_mounts(fstype: &str) -> Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            (right.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The (first) cgroup v2 mount point.
pub fn cgroup2_root() -> Result<PathBuf> {
    find_mounts("cgroup2")?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no cgroup2 file system is mounted; run `cargo xtask setup`"))
}

/// Errors unless bpffs is mounted at [`BPFFS`].
pub fn ensure_bpffs() -> Result<()> {
    if find_mounts("bpf")?.iter().any(|m| m == Path::new(BPFFS)) {
        Ok(())
    } else {
        bail!("bpffs is not mounted at {BPFFS}; run `cargo xtask setup`")
    }
}

/// Runs `cmd` to completion; returns its stdout, or an error with the
/// command line and its stderr.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` (typically [`host`] with a client subcommand) and parses
/// every non-empty stdout line as JSON. Errors if it exits non-zero.
pub fn json_lines(cmd: &mut Command) -> Result<Vec<serde_json::Value>> {
    let stdout = run_checked(cmd)?;
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}")))
        .collect()
}

/// Moves the calling thread into the network namespace `/run/netns/<name>`.
/// (A process doing this before it starts threads moves entirely.)
pub fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns {}", path.display()));
    }
    Ok(())
}

/// A network namespace made with `ip netns add` (so `ip -n NAME` and
/// `/run/netns/NAME` work). Drop deletes it; it kills nothing (processes
/// still inside keep the namespace alive until they exit).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Adds `<prefix>-<pid>-<n>` and brings its `lo` up.
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = unique_name(prefix);
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> <args>`; the error carries ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Spawns `cmd` inside this namespace: setns(2) in the child before
    /// exec, no new mount namespace (unlike `ip netns exec`, which hides
    /// bpffs and cgroup2). Do not reuse `cmd` afterwards.
    pub fn spawn(&self, cmd: &mut Command) -> Result<ChildGuard> {
        let ns =
            File::open(self.path()).with_context(|| format!("open {}", self.path().display()))?;
        let fd = ns.as_raw_fd();
        // SAFETY: only async-signal-safe syscalls between fork and exec;
        // `ns` outlives the spawn below (it is CLOEXEC, the child drops it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = ChildGuard::spawn(cmd).with_context(|| format!("in netns {}", self.name))?;
        drop(ns);
        Ok(child)
    }

    /// Sets sysctls (`key=value`) of this namespace with `sysctl -w`
    /// run inside it (`/proc/sys/net` shows the caller's namespace).
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        let mut cmd = Command::new("sysctl");
        cmd.arg("-qw")
            .args(settings)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = self.spawn(&mut cmd)?;
        let mut stderr = String::new();
        if let Some(mut pipe) = child.child_mut().stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
        }
        let status = child.child_mut().wait()?;
        if !status.success() {
            bail!(
                "sysctl {settings:?} in {} failed ({status}): {}",
                self.name,
                stderr.trim()
            );
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, created inside
/// `a` so no end is ever in the root namespace. Both ends stay down.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
}

/// A child of the cgroup2 root. Drop kills every process in it (SIGKILL),
/// waits until it is empty and removes it.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(prefix: &str) -> Result<Cgroup> {
        let path = cgroup2_root()?.join(unique_name(prefix));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        fs::write(self.path.join("cgroup.procs"), format!("{pid}\n"))
            .with_context(|| format!("move {pid} into {}", self.path.display()))
    }

    /// The pids in `cgroup.procs`.
    pub fn pids(&self) -> Vec<u32> {
        cgroup_pids(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.path) {
            eprintln!("proxy-tests: {e:#}");
        }
    }
}

fn cgroup_pids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process in the cgroup at `path` (and its children), waits
/// until they are gone and removes the directories. Missing is fine.
pub fn remove_cgroup(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path())?;
            }
        }
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = cgroup_pids(path);
        if pids.is_empty() {
            match fs::remove_dir(path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("rmdir {}", path.display()));
                }
                Err(_) => {}
            }
        } else {
            for pid in &pids {
                // SAFETY: plain syscall.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
            if Instant::now() > deadline {
                bail!("cgroup {} still holds {pids:?}", path.display());
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A directory under [`BPFFS`] for the agent's pins. `new` only picks the
/// name (the agent creates it); drop removes it recursively if present,
/// which unpins the maps and detaches the pinned links.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Errors if bpffs is not mounted at [`BPFFS`].
    pub fn new(prefix: &str) -> Result<PinDir> {
        ensure_bpffs()?;
        Ok(PinDir {
            path: Path::new(BPFFS).join(unique_name(prefix)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.path.exists()
            && let Err(e) = fs::remove_dir_all(&self.path)
        {
            eprintln!("proxy-tests: remove {}: {e}", self.path.display());
        }
    }
}

/// A temporary directory `<tmp>/<prefix>-<pid>-<n>`, created by `new`,
/// removed recursively on drop (e.g. a manifests directory).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(unique_name(prefix));
        fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A child process that is killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `cmd` with `PR_SET_PDEATHSIG=SIGKILL` and guards it.
    pub fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        Ok(ChildGuard { child })
    }

    /// Guards an already spawned child.
    pub fn from_child(child: Child) -> ChildGuard {
        ChildGuard { child }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap (no-op if it already exited).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until the child prints a line equal to `line` on its (piped)
    /// stdout. Its stdout is then drained in the background.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("stdout of child {} is not piped", self.id()))?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.trim() == line => return Ok(()),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "child {} did not print {line:?} within {timeout:?}",
                        self.id()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "child {} exited ({status:?}) before printing {line:?}",
                        self.id()
                    )
                }
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Directory of the build's binaries: the current executable's directory,
/// or its parent when that is `deps/` (test executables).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

fn find_bin(env: &str, name: &str, build: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} does not exist: build it first with `{build}` (`cargo xtask test` does), or set {env}",
        path.display()
    );
    path
}

/// `target/<profile>/netns-host`. Panics with instructions if not built.
pub fn netns_host_bin() -> PathBuf {
    find_bin("NETNS_HOST_BIN", "netns-host", "cargo build -p proxy-tests")
}

/// `target/<profile>/ebpf-proxy`. Panics with instructions if not built.
pub fn agent_bin() -> PathBuf {
    find_bin(
        "EBPF_PROXY_BIN",
        "ebpf-proxy",
        "cargo build -p proxy-userspace",
    )
}

/// A `netns-host` command that enters `netns` (and `cgroup`) before it
/// creates any socket. Add the subcommand and its options.
pub fn host(netns: &Netns, cgroup: Option<&Cgroup>) -> Command {
    host_in(netns, cgroup.map(Cgroup::path))
}

/// [`host`] with the cgroup given by its path (a cgroup another guard owns).
pub fn host_in(netns: &Netns, cgroup: Option<&Path>) -> Command {
    let mut cmd = Command::new(netns_host_bin());
    cmd.arg("--netns").arg(netns.name());
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    cmd
}

/// Starts `netns-host serve <args>` in `netns` and waits for "ready".
/// Example args: `["--name", "backend-1", "--tcp", "0.0.0.0:9000"]`.
pub fn start_server(netns: &Netns, args: &[&str]) -> Result<ChildGuard> {
    start_server_in(netns, None, args)
}

/// [`start_server`] with the server also in the cgroup at `cgroup`.
pub fn start_server_in(netns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> Result<ChildGuard> {
    let mut cmd = host_in(netns, cgroup);
    cmd.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd)?;
    child.wait_for_line("ready", Duration::from_secs(10))?;
    Ok(child)
}

/// `ebpf-proxy services --output json --bpffs PINS`: one row per frontend
/// (`frontend`, `backends`, `when_empty`, ...). Errors while the agent has
/// not pinned its maps yet.
pub fn datapath_services(pins: &Path) -> Result<Vec<serde_json::Value>> {
    let out = run_checked(
        Command::new(agent_bin())
            .args(["services", "--output", "json", "--bpffs"])
            .arg(pins),
    )?;
    serde_json::from_str(&out).with_context(|| format!("services of {}", pins.display()))
}

/// `ebpf-proxy explain --output json --bpffs PINS --src SRC --dst DST
/// --proto PROTO` (addresses `ADDR:PORT`, `tcp` or `udp`): what the
/// datapath does with that flow from outside (verdict, reason, backends,
/// Maglev pick).
pub fn datapath_explain(
    pins: &Path,
    src: &str,
    dst: &str,
    proto: &str,
) -> Result<serde_json::Value> {
    let out = run_checked(
        Command::new(agent_bin())
            .args(["explain", "--output", "json", "--src", src, "--dst", dst])
            .args(["--proto", proto, "--bpffs"])
            .arg(pins),
    )?;
    serde_json::from_str(&out).with_context(|| format!("explain {src} -> {dst} {proto}"))
}

/// `ebpf-proxy counters --output json --bpffs PINS` as name -> value.
pub fn datapath_counters(pins: &Path) -> Result<BTreeMap<String, u64>> {
    #[derive(serde::Deserialize)]
    struct Row {
        name: String,
        value: u64,
    }
    let out = run_checked(
        Command::new(agent_bin())
            .args(["counters", "--output", "json", "--bpffs"])
            .arg(pins),
    )?;
    let rows: Vec<Row> =
        serde_json::from_str(&out).with_context(|| format!("counters of {}", pins.display()))?;
    Ok(rows.into_iter().map(|row| (row.name, row.value)).collect())
}

static AGENT_LOGS: AtomicU32 = AtomicU32::new(0);
/// How much of the end of an agent's log [`Agent::log_tail`] reads.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// A running `ebpf-proxy agent` inside a network namespace, for the tests,
/// the demo and the bench alike. Drop kills it (SIGKILL) and removes its
/// log unless `PROXY_TESTS_KEEP_LOGS` is set; it leaves the pins alone
/// (that is [`PinDir`]'s job).
#[derive(Debug)]
pub struct Agent {
    child: Mutex<ChildGuard>,
    log_path: PathBuf,
    started: Instant,
    started_at: SystemTime,
}

impl Agent {
    /// Spawns the agent in `netns` with `/healthz` on [`AGENT_HEALTHZ`];
    /// stdout and stderr go to `<tmp>/<netns>-agent<n>.log`. `RUST_LOG`
    /// defaults to `info`.
    pub fn start(
        netns: &Netns,
        manifests: &Path,
        cgroup: &Path,
        bpffs: &Path,
        node_name: &str,
    ) -> Result<Agent> {
        let manifests = manifests.to_string_lossy();
        Agent::start_with_args(
            netns,
            &["--manifests", manifests.as_ref()],
            cgroup,
            bpffs,
            node_name,
        )
    }

    /// Like [`Agent::start`], with `extra_args` instead of `--manifests`
    /// (e.g. `--kubeconfig PATH`, `--health-timeout 2s`). Proxy variables
    /// are removed from its environment: it talks to test namespaces only.
    pub fn start_with_args(
        netns: &Netns,
        extra_args: &[&str],
        cgroup: &Path,
        bpffs: &Path,
        node_name: &str,
    ) -> Result<Agent> {
        let n = AGENT_LOGS.fetch_add(1, Ordering::Relaxed);
        let log_path = std::env::temp_dir().join(format!("{}-agent{n}.log", netns.name()));
        let log =
            File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new(agent_bin());
        cmd.arg("agent")
            .args(extra_args)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .arg("--hostname-override")
            .arg(node_name)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(bpffs)
            .arg("--healthz-bind-address")
            .arg(AGENT_HEALTHZ)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let started = Instant::now();
        let started_at = SystemTime::now();
        let child = netns.spawn(&mut cmd)?;
        Ok(Agent {
            child: Mutex::new(child),
            log_path,
            started,
            started_at,
        })
    }

    /// When the agent was spawned: to time its start (to /healthz 200).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The same moment by the wall clock, to compare with log timestamps.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub fn id(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Polls `/healthz` (through `netns-host http-get` in `netns`) until
    /// it answers 200. Errors with the log tail if the agent exits or the
    /// timeout passes.
    pub fn wait_healthy(&self, netns: &Netns, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_wait()?
            {
                bail!(
                    "agent exited ({status}) before /healthz answered 200; log {}:\n{}",
                    self.log_path.display(),
                    self.log_tail(40)
                );
            }
            let out = host(netns, None)
                .args([
                    "http-get",
                    &format!("{AGENT_HEALTHZ}/healthz"),
                    "--timeout-ms",
                    "500",
                ])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = match serde_json::from_str::<serde_json::Value>(stdout.trim()) {
                Ok(v) if out.status.success() && v["status"] == 200 => return Ok(()),
                Ok(v) => v.to_string(),
                Err(_) => stdout.trim().to_string(),
            };
            if start.elapsed() > timeout {
                bail!(
                    "agent /healthz not 200 after {timeout:?} (last: {last}); log {}:\n{}",
                    self.log_path.display(),
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the agent wrote so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the log contains `needle`; the log as it then is, or
    /// as it is at `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` lines of the log, read from its last 64 KiB (an agent
    /// with many Services writes a long log).
    pub fn log_tail(&self, n: usize) -> String {
        let mut tail = Vec::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let read = file
                .seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))
                .and_then(|_| file.read_to_end(&mut tail));
            if read.is_err() {
                tail.clear();
            }
        }
        let tail = String::from_utf8_lossy(&tail);
        let lines: Vec<&str> = tail.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGKILL and reap (for restart tests).
    pub fn kill(&mut self) {
        self.child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .kill();
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("PROXY_TESTS_KEEP_LOGS").is_none() {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}

/// Removes what processes of `prefix` left behind: network namespaces
/// (after killing the processes inside), cgroups, pin directories and temp
/// files named `<prefix>-<pid>-...`, for every `pid` that no longer runs,
/// and also for our own pid if `include_own`. Returns what it removed.
pub fn remove_leftovers(prefix: &str, include_own: bool) -> Vec<String> {
    let own = std::process::id();
    let matches = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            return false;
        };
        let Some(pid) = rest
            .split(['-', '.'])
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            return false;
        };
        if pid == own {
            include_own
        } else {
            !process_alive(pid)
        }
    };
    let names_in = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| matches(&e.file_name().to_string_lossy()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut removed = Vec::new();
    for ns in names_in(Path::new(NETNS_DIR)) {
        let name = ns
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>()
                    && pid as u32 != own
                {
                    // SAFETY: plain syscall.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        drop(Netns { name: name.clone() });
        removed.push(format!("netns {name}"));
    }
    if let Ok(root) = cgroup2_root() {
        for cg in names_in(&root) {
            match remove_cgroup(&cg) {
                Ok(()) => removed.push(format!("cgroup {}", cg.display())),
                Err(e) => eprintln!("proxy-tests: {e:#}"),
            }
        }
    }
    for dir in [Path::new(BPFFS).to_path_buf(), std::env::temp_dir()] {
        for p in names_in(&dir) {
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            match r {
                Ok(()) => removed.push(format!("{}", p.display())),
                Err(e) => eprintln!("proxy-tests: remove {}: {e}", p.display()),
            }
        }
    }
    removed
}

/// True if `pid` runs (a zombie counts as gone).
fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    //! The testbed's own tests. Those that touch namespaces need root and
    //! the `netns-host` binary (`cargo xtask test` builds it first).
    use super::*;

    #[test]
    fn unique_names_differ() {
        let a = unique_name("ept");
        let b = unique_name("ept");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("ept-{}-", std::process::id())));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/x\\"), r"/x\\");
        assert_eq!(unescape(r"/x\04"), r"/x\04");
    }

    #[test]
    fn finds_cgroup2_and_bpffs() {
        assert!(cgroup2_root().unwrap().join("cgroup.procs").exists());
        ensure_bpffs().unwrap();
    }

    #[test]
    fn spawn_enters_netns_but_keeps_mounts() {
        let ns = Netns::new("eptl").unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ip -o link; stat -f -c %T /sys/fs/bpf"])
            .stdout(Stdio::piped());
        let mut child = ns.spawn(&mut cmd).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(child.child_mut().stdout.as_mut().unwrap(), &mut out)
            .unwrap();
        let links: Vec<&str> = out.lines().filter(|l| l.contains(": <")).collect();
        assert_eq!(links.len(), 1, "only lo in a new netns: {out}");
        assert!(links[0].contains("lo:") && links[0].contains("UP"), "{out}");
        assert!(out.contains("bpf_fs"), "bpffs still visible: {out}");
        let path = ns.path();
        drop(child);
        drop(ns);
        assert!(!path.exists());
    }

    #[test]
    fn hosts_talk_over_veth() {
        let a = Netns::new("eptl").unwrap();
        let b = Netns::new("eptl").unwrap();
        veth_pair(&a, "eth0", &b, "eth0").unwrap();
        for (ns, ip) in [(&a, "10.99.0.1/24"), (&b, "10.99.0.2/24")] {
            ns.ip(&["addr", "add", ip, "dev", "eth0"]).unwrap();
            ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        }
        let _server = start_server(
            &b,
            &[
                "--name",
                "b",
                "--tcp",
                "0.0.0.0:9000",
                "--udp",
                "0.0.0.0:5353",
            ],
        )
        .unwrap();
        let _http = start_server(&b, &["--name", "web", "--http", "0.0.0.0:8080"]).unwrap();

        let r = json_lines(host(&a, None).args(["tcp", "--to", "10.99.0.2:9000", "--count", "2"]))
            .unwrap();
        assert_eq!(r.len(), 2);
        for v in &r {
            assert_eq!(v["ok"], true, "{v}");
            assert_eq!(v["peer"], "10.99.0.2:9000");
            let local = v["local"].as_str().unwrap();
            assert_eq!(v["reply"], format!("b {local}"));
        }
        let r = json_lines(host(&a, None).args(["tcp", "--to", "10.99.0.2:9001"])).unwrap();
        assert_eq!(r[0]["ok"], false);
        assert_eq!(r[0]["errno"], libc::ECONNREFUSED);

        let r = json_lines(host(&a, None).args([
            "udp",
            "--to",
            "10.99.0.2:5353",
            "--bind",
            "10.99.0.1:4000",
            "--count",
            "2",
        ]))
        .unwrap();
        for v in &r {
            assert_eq!(v["ok"], true, "{v}");
            assert_eq!(v["reply"], "b 10.99.0.1:4000");
            assert_eq!(v["from"], "10.99.0.2:5353");
        }
        let r = json_lines(host(&a, None).args(["udp", "--to", "10.99.0.2:5353", "--connect"]))
            .unwrap();
        assert_eq!(r[0]["from"], "10.99.0.2:5353", "{}", r[0]);

        let r = json_lines(host(&a, None).args(["http", "--to", "10.99.0.2:8080"])).unwrap();
        assert_eq!(r[0]["body"], "web\n", "{}", r[0]);
        let r = json_lines(host(&a, None).args(["http-get", "10.99.0.2:8080/x"])).unwrap();
        assert_eq!(r[0]["status"], 200);

        // A connection kept open exchanges lines.
        let mut cmd = host(&a, None);
        cmd.args(["tcp", "--to", "10.99.0.2:9000", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd).unwrap();
        {
            use std::io::Write;
            let mut stdin = child.child_mut().stdin.take().unwrap();
            writeln!(stdin, "one\ntwo").unwrap();
        }
        let mut out = String::new();
        std::io::Read::read_to_string(child.child_mut().stdout.as_mut().unwrap(), &mut out)
            .unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[1]["echo"], "one");
        assert_eq!(lines[2]["echo"], "two");
    }

    #[test]
    fn cgroup_drop_kills_members() {
        let cg = Cgroup::new("eptl").unwrap();
        let path = cg.path().to_path_buf();
        let mut child = ChildGuard::spawn(Command::new("sleep").arg("100")).unwrap();
        cg.add_pid(child.id()).unwrap();
        assert_eq!(cg.pids(), vec![child.id()]);
        drop(cg);
        assert!(!path.exists());
        let status = child.child_mut().wait().unwrap();
        assert!(!status.success());
    }

    #[test]
    fn host_joins_cgroup() {
        let ns = Netns::new("eptl").unwrap();
        let cg = Cgroup::new("eptl").unwrap();
        let mut cmd = host(&ns, Some(&cg));
        cmd.args(["serve", "--name", "x", "--udp", "127.0.0.1:5000"])
            .stdout(Stdio::piped());
        let mut server = ChildGuard::spawn(&mut cmd).unwrap();
        server
            .wait_for_line("ready", Duration::from_secs(10))
            .unwrap();
        assert_eq!(cg.pids(), vec![server.id()]);
    }

    #[test]
    fn pin_dir_is_removed() {
        let pins = PinDir::new("eptl").unwrap();
        let path = pins.path().to_path_buf();
        assert!(!path.exists());
        fs::create_dir_all(path.join("sub")).unwrap();
        drop(pins);
        assert!(!path.exists());
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed() {
        // No pid is above the kernel's maximum (4194304). The prefix is
        // this run's own: another run at the same time has other names.
        let dead = 4_194_305;
        let prefix = format!("eplo{}", std::process::id());
        let tmp = std::env::temp_dir().join(format!("{prefix}-{dead}-0"));
        fs::create_dir_all(&tmp).unwrap();
        let ns = format!("{prefix}-{dead}-1");
        run_checked(Command::new("ip").args(["netns", "add", &ns])).unwrap();
        let mine = TempDir::new(&prefix).unwrap();
        let removed = remove_leftovers(&prefix, false);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!tmp.exists());
        assert!(!Path::new(NETNS_DIR).join(&ns).exists());
        assert!(mine.path().exists(), "a live process's files stay");
    }
}
