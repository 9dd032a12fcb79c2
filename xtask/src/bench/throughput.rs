//! Section 6: throughput of long TCP streams (iperf3) from the external
//! client to the remote pod through each path of section 5 (the boxes of
//! its smallest N): one stream and 8 parallel ones. Rounds interleaved,
//! medians.

use anyhow::Result;
use serde_json::{Value, json};
use std::{fmt::Write as _, thread, time::Duration};

use super::median;
use super::nodeport::PathBox;

const STREAMS: [u32; 2] = [1, 8];

pub fn measure(boxes: &[PathBox], seconds: u32, rounds: u32) -> Result<Value> {
    // A short first run per path: iperf3's server may still be starting,
    // and a path that cannot carry a stream is reported, not measured.
    let mut problems: Vec<Option<String>> = Vec::new();
    for b in boxes {
        let mut last = None;
        for _ in 0..5 {
            match b.iperf3(1, 1) {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(format!("{e:#}")),
            }
            thread::sleep(Duration::from_millis(300));
        }
        if let Some(p) = &last {
            eprintln!("bench: throughput: {}: {p}", b.kind.name());
        }
        problems.push(last);
    }
    let cells: Vec<(usize, u32)> = (0..boxes.len())
        .flat_map(|i| STREAMS.map(|s| (i, s)))
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cells.len()];
    let mut errors: Vec<Option<String>> = vec![None; cells.len()];
    for round in 0..rounds as usize {
        eprintln!(
            "bench: throughput: round {}/{rounds} ({} cells x {seconds} s)",
            round + 1,
            cells.len()
        );
        for k in 0..cells.len() {
            let c = (k + round) % cells.len();
            let (i, streams) = cells[c];
            if problems[i].is_some() {
                continue;
            }
            match boxes[i].iperf3(streams, seconds) {
                Ok(bps) => samples[c].push(bps),
                Err(e) => errors[c] = Some(format!("{e:#}")),
            }
        }
    }
    let out: Vec<Value> = cells
        .iter()
        .zip(&samples)
        .zip(&errors)
        .map(|(((i, streams), bps), error)| {
            json!({
                "path": boxes[*i].kind.name(),
                "streams": streams,
                "gbit_s": median(bps) / 1e9,
                "samples_gbit_s": bps.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
                "problem": problems[*i].clone().or(error.clone()),
            })
        })
        .collect();
    Ok(json!({"seconds_per_run": seconds, "rounds": rounds, "cells": out}))
}

pub fn render(s: &mut String, t: &Value) {
    let _ = writeln!(
        s,
        "\n6. Throughput: iperf3 from the external client to the remote pod (node2)\n   \
         through node1's nodePort (direct: to the pod, routed); median of {} rounds\n   \
         of {} s, Gbit/s received.",
        t["rounds"], t["seconds_per_run"]
    );
    let _ = writeln!(
        s,
        "\n  {:<17} {:>7} {:>8} {:>10}  notes",
        "path", "streams", "Gbit/s", "vs direct"
    );
    let cells = t["cells"].as_array().cloned().unwrap_or_default();
    for streams in STREAMS {
        let direct = cells
            .iter()
            .find(|c| c["path"] == "direct" && c["streams"] == streams)
            .and_then(|c| c["gbit_s"].as_f64())
            .filter(|x| x.is_finite() && *x > 0.0);
        for c in cells.iter().filter(|c| c["streams"] == streams) {
            let g = c["gbit_s"].as_f64().filter(|x| x.is_finite());
            let _ = writeln!(
                s,
                "  {:<17} {:>7} {:>8} {:>10}  {}",
                c["path"].as_str().unwrap_or("?"),
                streams,
                g.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
                match (g, direct) {
                    (Some(a), Some(b)) => format!("{:.2}", a / b),
                    _ => "-".into(),
                },
                c["problem"]
                    .as_str()
                    .map(|p| format!("NOT MEASURED: {p}"))
                    .unwrap_or_default()
            );
        }
    }
}
