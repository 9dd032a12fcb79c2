//! Builds the eBPF object (the pinned nightly + bpf-linker, installed by
//! `cargo xtask setup`) and leaves it in OUT_DIR for `include_bytes!`.
use std::path::Path;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("proxy-userspace has no parent directory"))?;
    let ebpf_dir = workspace.join("proxy-ebpf");
    // The map layouts compiled into the object come from proxy-common.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("proxy-common").display()
    );
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = pinned_channel(&toolchain)
        .ok_or_else(|| anyhow::anyhow!("no channel in {}", toolchain_file.display()))?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(channel),
    )
    .with_context(|| {
        format!("building the eBPF programs on {channel} (`cargo xtask setup` installs it)")
    })
}

/// The `channel = "..."` of a rust-toolchain.toml.
fn pinned_channel(toolchain_toml: &str) -> Option<&str> {
    toolchain_toml.lines().find_map(|line| {
        let value = line.trim().strip_prefix("channel")?.trim_start();
        Some(value.strip_prefix('=')?.trim().trim_matches('"'))
    })
}
