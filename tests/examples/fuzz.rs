//! The packet programs under a long fuzzing run, or findings replayed (see
//! `proxy_tests::fuzz`). `cargo xtask fuzz` runs this; by hand (root):
//!
//! `cargo run --release -p proxy-tests --example fuzz -- --findings DIR
//! [--count N] [--seed S] [--start I]`, or `-- --replay FILE...`.
//!
//! Prints the report on stdout; exits with [`VIOLATED`] when an invariant
//! was violated (1 is an error of the run itself).

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Parser;
use proxy_tests::{fuzz, tc};
use proxy_userspace::programs::{Capacities, load_detached};

/// The exit status of a run that found violations.
pub const VIOLATED: i32 = 3;

/// The name prefix of this program's network namespaces (`cargo xtask
/// fuzz` removes what an interrupted run left).
const NETNS_PREFIX: &str = "epfx";

#[derive(Parser)]
struct Args {
    /// Cases, each run through every program.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Index of the first case.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Where failing cases are written.
    #[arg(long, required_unless_present = "replay")]
    findings: Option<PathBuf>,
    /// Run these findings again instead (each alone, on fresh maps).
    #[arg(long, num_args = 1..)]
    replay: Vec<PathBuf>,
}

/// Room for a batch's flows many times over: nothing is evicted.
fn capacities() -> Capacities {
    Capacities {
        services: 4096,
        backends: 1024,
        conntrack: 65_536,
        nat: 65_536,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(unsafe { libc::geteuid() } == 0, "needs root (BPF, netns)");
    let netns = tc::node_netns(NETNS_PREFIX)?;
    let violations = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<u64> {
                proxy_tests::enter_netns(netns.node.name())?;
                if args.replay.is_empty() {
                    let options = fuzz::Options {
                        seed: args.seed,
                        start: args.start,
                        count: args.count,
                        findings: args.findings.clone().unwrap_or_default(),
                        progress_every: 100_000,
                    };
                    let report =
                        fuzz::run(&mut load_detached(&capacities())?, netns.ifindex, &options)?;
                    println!("{report}");
                    Ok(report.violations())
                } else {
                    let mut violations = 0;
                    for file in &args.replay {
                        let found =
                            fuzz::replay(&mut load_detached(&capacities())?, netns.ifindex, file)?;
                        println!("{}: {} violations", file.display(), found.len());
                        for violation in &found {
                            println!("  {violation}");
                        }
                        violations += found.len() as u64;
                    }
                    Ok(violations)
                }
            })
            .join()
            .map_err(|_| anyhow::anyhow!("fuzzing thread panicked"))?
    })?;
    drop(netns);
    if violations > 0 {
        std::process::exit(VIOLATED);
    }
    Ok(())
}
