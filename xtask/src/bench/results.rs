//! The goals next to the figures, and what every run leaves behind:
//! `bench/results/<date>.md` (`<date>-quick.md` for `--quick`) with the
//! report, and next to it the chart of conn/s against the number of
//! Services, one line per path, as an SVG written by hand.

use anyhow::{Context, Result};
use serde_json::Value;
use std::{fmt::Write as _, fs, path::PathBuf, process::Command};

use crate::workspace_root;

/// A goal's verdict line: what was asked, what was measured, met or not.
fn goal(s: &mut String, what: &str, measured: Option<(f64, String)>, met: impl Fn(f64) -> bool) {
    let verdict = match &measured {
        Some((x, _)) if x.is_finite() && met(*x) => "met",
        Some((x, _)) if x.is_finite() => "MISSED",
        _ => "NOT MEASURED",
    };
    let figure = measured.map(|(_, text)| text).unwrap_or_default();
    let _ = writeln!(s, "  {verdict:<12} {what}: {figure}");
}

/// The largest N of `cells` and the conn/s of the cell matching `pick`
/// and of `direct` there.
fn ratio_at_largest_n(
    cells: &[Value],
    pick: impl Fn(&Value) -> bool,
    direct: impl Fn(&Value) -> bool,
) -> Option<(u64, f64)> {
    let n = cells
        .iter()
        .filter(|c| pick(c))
        .filter_map(|c| c["n"].as_u64())
        .max()?;
    let rate = |f: &dyn Fn(&Value) -> bool| {
        cells
            .iter()
            .find(|c| c["n"] == n && f(c))
            .and_then(|c| c["rate"].as_f64())
    };
    Some((n, rate(&pick)? / rate(&direct)?))
}

pub fn render_goals(s: &mut String, r: &Value) {
    let _ = writeln!(s, "\nGoals:");
    let cluster_ip = r["connection_rate"]["cells"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Below 100k the figure is shown but judges nothing.
    let at = |(n, x): (u64, f64)| {
        if n < 100_000 {
            (
                f64::NAN,
                format!("{x:.2}x at N={n}, the largest N measured"),
            )
        } else {
            (x, format!("{x:.2}x at N={n}"))
        }
    };
    goal(
        s,
        "ClusterIP through the socket hooks >= 0.98x direct at 100k Services",
        ratio_at_largest_n(
            &cluster_ip,
            |c| c["layout"] == "ebpf-proxy",
            |c| c["layout"] == "direct",
        )
        .map(at),
        |x| x >= 0.98,
    );
    let nodeport = r["nodeport"]["cells"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for backend in ["remote", "local"] {
        goal(
            s,
            &format!("NodePort through XDP (generic) >= 0.95x direct, {backend} backend"),
            ratio_at_largest_n(
                &nodeport,
                |c| c["path"] == "ebpf-xdp-generic" && c["backend"] == backend,
                |c| c["path"] == "direct" && c["backend"] == backend,
            )
            .map(|(n, x)| (x, format!("{x:.2}x at N={n}"))),
            |x| x >= 0.95,
        );
    }
    let kube_10k = r["control_plane_kube"]
        .as_array()
        .and_then(|runs| runs.iter().find(|c| c["services"] == 10_000))
        .cloned()
        .unwrap_or(Value::Null);
    let tail = &kube_10k["endpoint_change_tail"];
    goal(
        s,
        "one endpoint change to the datapath p99 <= 10 ms at 10k Services",
        tail["p99_s"].as_f64().map(|p99| {
            (
                p99 * 1000.0,
                format!(
                    "p99 {:.1} ms over {} changes",
                    p99 * 1000.0,
                    tail["changes"]
                ),
            )
        }),
        |ms| ms <= 10.0,
    );
    let kube_100k = r["control_plane_kube"]
        .as_array()
        .and_then(|runs| runs.iter().find(|c| c["services"] == 100_000))
        .cloned()
        .unwrap_or(Value::Null);
    goal(
        s,
        "agent RSS <= 256 MiB at 100k x 1 (from the API server)",
        kube_100k["rss_kib"]
            .as_f64()
            .map(|kib| (kib / 1024.0, format!("{:.1} MiB", kib / 1024.0))),
        |mib| mib <= 256.0,
    );
    goal(
        s,
        "agent RSS <= 64 MiB at 10k Services (from the API server)",
        kube_10k["rss_kib"]
            .as_f64()
            .map(|kib| (kib / 1024.0, format!("{:.1} MiB", kib / 1024.0))),
        |mib| mib <= 64.0,
    );
}

/// Writes the report and the chart; returns the report's path.
pub fn write(r: &Value, report: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("bench").join("results");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .context("date")?;
    let stem = if r["quick"] == true {
        format!("{date}-quick")
    } else {
        date
    };
    let svg = format!("{stem}.svg");
    fs::write(dir.join(&svg), chart(r))?;
    let m = &r["machine"];
    let md = format!(
        "# Benchmarks, {stem}\n\n\
         `cargo xtask bench{}` as root on {} CPUs ({}), kernel {}.\n\
         Every layout runs in network namespaces of its own on this one machine;\n\
         rounds are interleaved and each figure is the median of its rounds.\n\n\
         ![conn/s against the number of Services]({svg})\n\n```text\n{report}```\n",
        if r["quick"] == true { " --quick" } else { "" },
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
    );
    let path = dir.join(format!("{stem}.md"));
    fs::write(&path, md).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// One line: its label and (N, conn/s) points.
type Series = (String, Vec<(f64, f64)>);

fn series(r: &Value) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    let mut add = |label: String, n: f64, rate: f64| {
        if !rate.is_finite() || n < 1.0 {
            return;
        }
        match out.iter_mut().find(|(l, _)| *l == label) {
            Some((_, points)) => points.push((n, rate)),
            None => out.push((label, vec![(n, rate)])),
        }
    };
    for c in r["connection_rate"]["cells"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let (Some(layout), Some(n), Some(rate)) =
            (c["layout"].as_str(), c["n"].as_f64(), c["rate"].as_f64())
        {
            add(format!("ClusterIP {layout}"), n, rate);
        }
    }
    for c in r["nodeport"]["cells"].as_array().into_iter().flatten() {
        if let (Some(path), Some("remote"), Some(n), Some(rate)) = (
            c["path"].as_str(),
            c["backend"].as_str(),
            c["n"].as_f64(),
            c["rate"].as_f64(),
        ) {
            add(format!("NodePort {path}"), n, rate);
        }
    }
    out
}

/// conn/s (linear, from 0) against N (log10), one polyline per series.
fn chart(r: &Value) -> String {
    const COLORS: [&str; 10] = [
        "#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    let (w, h, left, right, top, bottom) = (760.0, 440.0, 70.0, 230.0, 30.0, 50.0);
    let all = series(r);
    let points = all.iter().flat_map(|(_, p)| p.iter());
    let max_n = points.clone().map(|p| p.0).fold(10.0, f64::max);
    let max_rate = points.map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let decades = max_n.log10().ceil().max(1.0);
    let x = |n: f64| left + (w - left - right) * n.log10() / decades;
    let y = |rate: f64| h - bottom - (h - top - bottom) * rate / max_rate;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">Connection rate (conn/s) against the number of Services</text>\n"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{0}\" stroke=\"black\"/>",
        h - bottom,
        w - right
    );
    for d in 0..=decades as u32 {
        let n = 10f64.powi(d as i32);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x(n),
            h - bottom + 18.0,
            n as u64
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">Services (log scale)</text>",
        left + (w - left - right) / 2.0,
        h - 10.0
    );
    for k in 0..=4 {
        let rate = max_rate * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>\n\
             <line x1=\"{left}\" y1=\"{1:.1}\" x2=\"{3}\" y2=\"{1:.1}\" stroke=\"#dddddd\"/>",
            left - 6.0,
            y(rate),
            rate,
            w - right
        );
    }
    for (i, (label, points)) in all.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if label.starts_with("NodePort") {
            " stroke-dasharray=\"6 3\""
        } else {
            ""
        };
        let coords: Vec<String> = points
            .iter()
            .map(|&(n, rate)| format!("{:.1},{:.1}", x(n), y(rate)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            coords.join(" ")
        );
        for &(n, rate) in points {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                x(n),
                y(rate)
            );
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{0}\" y1=\"{ly:.1}\" x2=\"{1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n\
             <text x=\"{2}\" y=\"{3:.1}\">{label}</text>",
            w - right + 15.0,
            w - right + 40.0,
            w - right + 46.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}
