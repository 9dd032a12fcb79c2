//! `cargo xtask setup`: checks first, acts only on what is missing, prints
//! one line per action and a summary line.

use crate::run;
use anyhow::{Context, Result};
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

/// LLVM 22 matches the pinned nightly's LLVM (bpf-linker links against it).
/// iptables and nftables: `cargo xtask bench` compares against kube-proxy's
/// rule layouts (loaded inside the bench's own namespaces only). ethtool:
/// the cluster box turns on GRO where XDP sends frames into a veth.
/// iperf3: the bench's stream throughput through a NodePort.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "ethtool",
    "iperf3",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The bpf-linker release that builds with this toolchain and LLVM 22 (a
/// newer one may need a newer rustc).
const BPF_LINKER_VERSION: &str = "0.13.0";
const CGROUP2_MOUNT: &str = "/sys/fs/cgroup/unified";
/// The eBPF build's toolchain file (see its comment), read at compile time.
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../../proxy-ebpf/rust-toolchain.toml");

/// The dated nightly the eBPF programs build on, e.g. `nightly-2026-05-20`.
pub fn ebpf_toolchain() -> &'static str {
    EBPF_TOOLCHAIN_FILE
        .lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim_start();
            Some(value.strip_prefix('=')?.trim().trim_matches('"'))
        })
        .expect("proxy-ebpf/rust-toolchain.toml names a channel")
}

pub fn setup() -> Result<()> {
    let mut actions = 0;
    let mut act = |what: &str| {
        actions += 1;
        println!("setup: {what}");
    };
    apt(&mut act)?;
    rust(&mut act)?;
    bpf_linker(&mut act)?;
    mounts(&mut act)?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        println!("setup: warning: /sys/kernel/btf/vmlinux is missing; the kernel needs BTF");
    }
    match actions {
        0 => println!("setup: everything in place"),
        n => println!("setup: done ({n} action{})", if n == 1 { "" } else { "s" }),
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn stdout_of(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn apt(act: &mut impl FnMut(&str)) -> Result<()> {
    if !succeeds(Command::new("dpkg-query").arg("--version")) {
        println!("setup: warning: no dpkg; install {APT_PACKAGES:?} by hand");
        return Ok(());
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    act(&format!("apt-get install {}", missing.join(" ")));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null()))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null()))
}

fn rust(act: &mut impl FnMut(&str)) -> Result<()> {
    let toolchain = ebpf_toolchain();
    let toolchains = stdout_of(Command::new("rustup").args(["toolchain", "list"]));
    // Listed with the host triple: nightly-2026-05-20-x86_64-unknown-linux-gnu.
    let installed_prefix = format!("{toolchain}-");
    if !toolchains.lines().any(|l| l.starts_with(&installed_prefix)) {
        act(&format!(
            "rustup toolchain install {toolchain} (with rust-src)"
        ));
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]));
    if !components.lines().any(|l| l.trim() == "rust-src") {
        act(&format!(
            "rustup component add rust-src --toolchain {toolchain}"
        ));
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain,
        ]))?;
    }
    Ok(())
}

fn bpf_linker(act: &mut impl FnMut(&str)) -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    act(&format!(
        "cargo install bpf-linker@{BPF_LINKER_VERSION} --no-default-features --features llvm-22 (about a minute)"
    ));
    // Plain `cargo` (not $CARGO): the install is not tied to this workspace.
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .current_dir("/"))
}

fn mounts(act: &mut impl FnMut(&str)) -> Result<()> {
    let bpffs = Path::new(proxy_tests::BPFFS);
    if !proxy_tests::find_mounts("bpf")?.iter().any(|m| m == bpffs) {
        act(&format!("mount -t bpf bpf {}", bpffs.display()));
        fs::create_dir_all(bpffs).with_context(|| format!("mkdir {}", bpffs.display()))?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(bpffs))?;
    }
    if proxy_tests::find_mounts("cgroup2")?.is_empty() {
        act(&format!("mount -t cgroup2 none {CGROUP2_MOUNT}"));
        fs::create_dir_all(CGROUP2_MOUNT).with_context(|| format!("mkdir {CGROUP2_MOUNT}"))?;
        run(Command::new("mount").args(["-t", "cgroup2", "none", CGROUP2_MOUNT]))?;
    }
    Ok(())
}
