//! `cargo xtask fuzz`: a long fuzzing run of the packet programs (or
//! findings replayed), through the `fuzz` example of the tests crate, which
//! loads the eBPF object (xtask itself must build before the eBPF toolchain
//! is installed, so it runs that target rather than linking it). The
//! example prints packets per program, counters, per-invariant counts and
//! where the failing inputs went.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result, bail};
use proxy_tests::remove_leftovers;

use crate::{cargo, setup, target_dir};

/// The example's network namespaces.
const NETNS_PREFIX: &str = "epfx";

pub struct Options {
    pub count: u64,
    pub seed: u64,
    pub start: u64,
    pub findings: Option<PathBuf>,
    pub replay: Vec<PathBuf>,
}

pub fn fuzz(options: Options) -> Result<()> {
    for what in remove_leftovers(NETNS_PREFIX, false) {
        eprintln!("fuzz: removed leftover {what}");
    }
    setup::setup()?;
    // Ctrl-C stops the example; we stay to remove what it left.
    ctrlc::set_handler(|| eprintln!("\nfuzz: interrupted"))
        .context("install the Ctrl-C handler")?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "proxy-tests",
        "--example",
        "fuzz",
        "--",
    ]);
    if options.replay.is_empty() {
        let findings = match options.findings {
            Some(dir) => dir,
            None => {
                // Ours: findings of an earlier run of this seed would mislead.
                let dir = target_dir()
                    .join("fuzz")
                    .join(format!("seed-{}", options.seed));
                if dir.exists() {
                    fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
                dir
            }
        };
        eprintln!(
            "fuzz: {} cases from {} of seed {} through every program, findings to {}",
            options.count,
            options.start,
            options.seed,
            findings.display()
        );
        cmd.args([
            "--count",
            &options.count.to_string(),
            "--seed",
            &options.seed.to_string(),
            "--start",
            &options.start.to_string(),
        ])
        .arg("--findings")
        .arg(findings);
    } else {
        cmd.arg("--replay").args(&options.replay);
    }
    let status = cmd.status().context("running the fuzz example")?;
    for what in remove_leftovers(NETNS_PREFIX, false) {
        eprintln!("fuzz: removed leftover {what}");
    }
    match status.code() {
        Some(0) => Ok(()),
        // The example's VIOLATED: the report above says which.
        Some(3) => bail!("invariants violated, see the findings above"),
        _ => bail!("the fuzz example failed: {status}"),
    }
}
