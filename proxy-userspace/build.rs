//! Builds the eBPF object (nightly + bpf-linker, installed by
//! `cargo xtask setup`) and leaves it in OUT_DIR for `include_bytes!`.
use std::path::Path;

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
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
