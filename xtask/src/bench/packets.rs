//! 4. Nanoseconds per packet of each tc path next to an empty tc program,
//!    from the `tc_per_packet` bench target of the tests crate (which loads
//!    the eBPF object; xtask itself must build before the eBPF toolchain is
//!    installed, so it runs that target rather than linking it).

use std::{fmt::Write as _, process::Stdio};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::cargo;

/// Runs the per-packet bench: `runs` test runs per path and size.
pub fn per_packet(quick: bool) -> Result<Value> {
    let runs: u32 = if quick { 20_000 } else { 1_000_000 };
    let services = if quick { "1,10000" } else { "1,10000,100000" };
    eprintln!(
        "bench: ns per packet of the tc programs ({runs} runs per path, {services} services)"
    );
    let output = cargo()
        .args([
            "bench",
            "--quiet",
            "-p",
            "proxy-tests",
            "--bench",
            "tc_per_packet",
            "--",
            "--json",
            "--runs",
            &runs.to_string(),
            "--services",
            services,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the tc_per_packet bench")?;
    anyhow::ensure!(output.status.success(), "the tc_per_packet bench failed");
    let rows: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reading the tc_per_packet rows")?;
    Ok(json!({ "runs": runs, "rows": rows }))
}

pub fn render(s: &mut String, packets: &Value) {
    let _ = writeln!(
        s,
        "\n4. Packet datapath: ns per packet of each tc path (BPF_PROG_TEST_RUN, repeat 1,\n   {} runs each, the kernel's own timing), next to an empty tc program run the\n   same way with the same packet. Lower is better.",
        packets["runs"]
    );
    let _ = writeln!(
        s,
        "   {:>8}  {:<34} {:>8} {:>8} {:>8}",
        "services", "path", "ns/pkt", "empty", "x empty"
    );
    for row in packets["rows"].as_array().into_iter().flatten() {
        let ns = row["ns_per_packet"].as_f64().unwrap_or(f64::NAN);
        let empty = row["empty_ns_per_packet"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "   {:>8}  {:<34} {:>8.1} {:>8.1} {:>7.2}x",
            row["services"],
            row["path"].as_str().unwrap_or("?"),
            ns,
            empty,
            ns / empty
        );
    }
}
