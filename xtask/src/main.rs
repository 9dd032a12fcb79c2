//! `cargo xtask <command>`: everything a fresh machine needs, in one place.
//!
//! - `setup`: installs and mounts what building and testing need
//!   (idempotent; quiet and fast when everything is in place).
//! - `build-ebpf`: builds the eBPF object the way aya-build does.
//! - `test`: setup, build, `cargo test`, then the demo.
//! - `demo`: a two-node cluster in network namespaces, one agent per node,
//!   reached from a pod and from an external client.
//! - `bench`: the performance yardsticks, side by side with kube-proxy's
//!   iptables and nftables layouts (release build).
//! - `fuzz`: seeded fuzzing of the packet programs (release build).

mod bench;
mod demo;
mod fuzz;
mod setup;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

#[derive(Parser)]
#[command(about = "Project tasks: setup, build-ebpf, test, demo, bench, fuzz")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install packages, the pinned nightly with rust-src, bpf-linker; mount
    /// bpffs and cgroup2.
    Setup,
    /// Build the eBPF object (pinned nightly, build-std=core, bpfel-unknown-none).
    BuildEbpf,
    /// setup, build everything, cargo test, then the demo.
    Test {
        /// Skip the demo after the tests.
        #[arg(long)]
        skip_demo: bool,
        /// Passed to `cargo test` (after `--`). With `-p`/`--package` the
        /// default `--workspace --exclude proxy-ebpf` is left out, e.g.
        /// `cargo xtask test -- -p proxy-tests -- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the two-node demo (sets up and builds first).
    Demo {
        /// Number of requests to the ClusterIP and to each external frontend.
        /// Every pod must answer: at 60, three pods picked at random all
        /// answer but for about 1 run in 10^10.
        #[arg(long, default_value_t = demo::REQUESTS)]
        requests: u32,
    },
    /// Benchmarks: connection rate vs. direct, iptables and nftables
    /// layouts (N = 1, 1k, 10k services) to a ClusterIP and from outside to
    /// a NodePort; iperf3 streams; control plane at 10k services, from
    /// manifests and from the API server double. Writes bench/results/.
    Bench {
        /// Shorter: N = 1 and 1000, 1 s per run.
        #[arg(long)]
        quick: bool,
        /// Print the results as one JSON document instead of the report.
        #[arg(long)]
        json: bool,
        /// Client threads per connection-rate run.
        #[arg(long, default_value_t = 1)]
        parallel: u32,
        /// Interleaved rounds per layout, the median is reported
        /// (default 5, --quick 3).
        #[arg(long)]
        rounds: Option<u32>,
        /// Seconds per connection-rate run (default 1.5, --quick 1).
        #[arg(long)]
        seconds: Option<f64>,
        /// Also measure the iptables layout through iptables-legacy.
        #[arg(long)]
        iptables_legacy: bool,
        /// Only the connection rate.
        #[arg(long)]
        skip_control_plane: bool,
        /// Only the control plane (skips the connection rate).
        #[arg(long, conflicts_with = "skip_control_plane")]
        only_control_plane: bool,
        /// What feeds the agent in the control-plane runs.
        #[arg(long, value_enum, default_value = "both")]
        control_plane_source: bench::ControlPlaneSource,
    },
    /// Fuzz the packet programs: random and mutated fixture packets through
    /// each, every run checked against the invariants; failing inputs are
    /// written out as YAML findings.
    Fuzz {
        /// Cases, each run through every program.
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Cases are rebuilt from (seed, index): another seed, other cases.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Index of the first case (a finding's batch_start replays its batch).
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Where findings go (default target/fuzz/seed-<seed>).
        #[arg(long)]
        findings: Option<PathBuf>,
        /// Run these findings again, each alone on fresh maps, instead.
        #[arg(long, num_args = 1..)]
        replay: Vec<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf => build_ebpf().map(|obj| println!("{}", obj.display())),
        Cmd::Test { skip_demo, args } => test(skip_demo, &args),
        Cmd::Demo { requests } => demo::demo(requests),
        Cmd::Bench {
            quick,
            json,
            parallel,
            rounds,
            seconds,
            iptables_legacy,
            skip_control_plane,
            only_control_plane,
            control_plane_source,
        } => bench::bench(bench::Options {
            quick,
            json,
            parallel,
            rounds: rounds.map(|r| r.max(1)),
            seconds,
            iptables_legacy,
            skip_control_plane,
            only_control_plane,
            control_plane_source,
        }),
        Cmd::Fuzz {
            count,
            seed,
            start,
            findings,
            replay,
        } => fuzz::fuzz(fuzz::Options {
            count,
            seed,
            start,
            findings,
            replay,
        }),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The cargo that runs us (so the same toolchain builds everything).
pub fn cargo() -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio; errors on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Exactly what aya-build does for proxy-userspace's build script, but
/// into the workspace's target directory.
fn build_ebpf() -> Result<PathBuf> {
    let arch = match std::env::consts::ARCH {
        a if a.starts_with("riscv64") => "riscv64",
        a => a,
    };
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ]
    .join("\x1f");
    run(Command::new("rustup")
        .args([
            "run",
            setup::ebpf_toolchain(),
            "cargo",
            "build",
            "--package",
            "proxy-ebpf",
            "--bins",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .current_dir(workspace_root().join("proxy-ebpf"))
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;
    let obj = target_dir().join("bpfel-unknown-none/release/proxy-ebpf");
    if !obj.exists() {
        bail!("build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

fn test(skip_demo: bool, args: &[String]) -> Result<()> {
    setup::setup()?;
    println!("xtask: building the workspace");
    run(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
    ]))?;
    println!("xtask: running the tests");
    let mut cmd = cargo();
    cmd.arg("test");
    let picks_packages = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a.starts_with("-p") || a.starts_with("--package"));
    if !picks_packages {
        cmd.args(["--workspace", "--exclude", "proxy-ebpf"]);
    }
    run(cmd.args(args))?;
    if !skip_demo {
        demo::demo(demo::REQUESTS)?;
    }
    println!("xtask: test passed");
    Ok(())
}
