//! The report as text.

use super::*;

pub(super) fn fmt_f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".to_string(),
    }
}

pub(super) fn render(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        s,
        "ebpf-proxy benchmarks{}: {} CPUs ({}), kernel {}\n  {}; {}\n",
        if r["quick"] == true { " (--quick)" } else { "" },
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["iptables"].as_str().unwrap_or("?"),
        m["nft"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "Machine load: {} of all CPUs busy with other work in the second before the\n  bench; load average {} at the start, {} at the end. Our processes ran at nice {}.\n",
        r["background_cpu_busy"]
            .as_f64()
            .map(|x| format!("{:.0}%", x * 100.0))
            .unwrap_or_else(|| "?".into()),
        r["loadavg_at_start"].as_str().unwrap_or("?"),
        r["loadavg_at_end"].as_str().unwrap_or("?"),
        r["nice"]
    );
    if r["connection_rate"].is_object() {
        render_connection_rate(&mut s, &r["connection_rate"]);
    }
    let cps = r["control_plane"].as_array().cloned().unwrap_or_default();
    if !cps.is_empty() {
        let _ = writeln!(
            s,
            "\n2. Control plane: N services x E endpoints (distinct pod addresses) in one\n   multi-document file written before the agent starts, plus a probe service\n   (1 endpoint) in a small file of its own."
        );
    }
    for cp in &cps {
        render_control_plane(&mut s, cp);
    }
    let kube = r["control_plane_kube"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !kube.is_empty() {
        let _ = writeln!(
            s,
            "\n3. Control plane from the API server: the same services, endpoints and probe\n   as Services and EndpointSlices (plus this node's Node) in the API server\n   double, in the agent's namespace; the agent runs with --kubeconfig (list,\n   then watch). An endpoint change is a modified EndpointSlice applied to the\n   double (one watch event)."
        );
    }
    for cp in &kube {
        render_control_plane(&mut s, cp);
    }
    if r["packet_datapath"].is_object() {
        packets::render(&mut s, &r["packet_datapath"]);
    }
    if r["nodeport"].is_object() {
        nodeport::render(&mut s, &r["nodeport"]);
    }
    if r["throughput"].is_object() {
        throughput::render(&mut s, &r["throughput"]);
    }
    results::render_goals(&mut s, r);
    let _ = writeln!(
        s,
        "\ntotal {:.0} s",
        r["total_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    s
}

/// The notes column of a connection-rate cell: why it was not measured,
/// its errors, the agent's CPU.
pub(super) fn cell_notes(c: &Value) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(p) = c["problem"].as_str() {
        notes.push(format!("NOT MEASURED: {p}"));
    }
    if c["errors"].as_u64().unwrap_or(0) > 0 {
        notes.push(format!(
            "{} errors (first: {})",
            c["errors"],
            c["first_error"].as_str().unwrap_or("?")
        ));
    }
    if let Some(cpu) = c["agent_cpu_fraction"].as_f64() {
        notes.push(format!("agent CPU {:.1}%", cpu * 100.0));
    }
    notes
}

pub(super) fn render_connection_rate(s: &mut String, rate: &Value) {
    let _ = writeln!(
        s,
        "1. Connection rate: connect, read the greeting line, close (RST); {} client\n   thread(s); each cell is the median of {} interleaved rounds of {} s.\n   conn/s: higher is better; vs direct / vs ebpf: conn/s ratios against those\n   rows of the same N. p50/p99: connect() alone, in microseconds; +p50: p50\n   minus direct's p50 (what the translation adds to each connect).",
        rate["parallel"], rate["rounds"], rate["seconds_per_run"]
    );
    let _ = writeln!(
        s,
        "\n  {:<16} {:>6} {:>8} {:>7} {:>8} {:>7} {:>6} {:>10} {:>8}  notes",
        "layout", "N", "conn/s", "p50 us", "+p50 us", "p99 us", "spread", "vs direct", "vs ebpf",
    );
    let cells = rate["cells"].as_array().cloned().unwrap_or_default();
    let mut ns: Vec<u64> = cells.iter().filter_map(|c| c["n"].as_u64()).collect();
    ns.dedup();
    for n in ns {
        let group: Vec<&Value> = cells.iter().filter(|c| c["n"] == n).collect();
        let rate_of = |name: &str| {
            group
                .iter()
                .find(|c| c["layout"] == name)
                .and_then(|c| c["rate"].as_f64())
                .filter(|x| x.is_finite() && *x > 0.0)
        };
        let direct = rate_of("direct");
        let direct_p50 = group
            .iter()
            .find(|c| c["layout"] == "direct")
            .and_then(|c| c["connect_p50_us"].as_f64());
        let ebpf = rate_of("ebpf-proxy");
        for c in &group {
            let rate = c["rate"].as_f64().filter(|x| x.is_finite());
            let ratio = |base: Option<f64>| match (rate, base) {
                (Some(a), Some(b)) => format!("{:.2}", a / b),
                _ => "-".to_string(),
            };
            let rates: Vec<f64> = c["rates"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let spread = match (
                rates.iter().copied().reduce(f64::min),
                rates.iter().copied().reduce(f64::max),
                rate,
            ) {
                (Some(lo), Some(hi), Some(med)) if med > 0.0 => {
                    format!("{:.0}%", 100.0 * (hi - lo) / med)
                }
                _ => "-".to_string(),
            };
            let notes = cell_notes(c);
            let _ = writeln!(
                s,
                "  {:<16} {:>6} {:>8} {:>7} {:>8} {:>7} {:>6} {:>10} {:>8}  {}",
                c["layout"].as_str().unwrap_or("?"),
                n,
                rate.map(|x| format!("{x:.0}"))
                    .unwrap_or_else(|| "-".into()),
                fmt_f(&c["connect_p50_us"], 1),
                match (c["connect_p50_us"].as_f64(), direct_p50) {
                    (Some(a), Some(b)) => format!("{:+.1}", a - b),
                    _ => "-".into(),
                },
                fmt_f(&c["connect_p99_us"], 1),
                spread,
                ratio(direct),
                ratio(ebpf),
                notes.join("; ")
            );
        }
    }
    let _ = writeln!(
        s,
        "\n  spread = (max - min) / median of the rounds' rates. Setup times (not part of the rates):"
    );
    for l in rate["loads"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            s,
            "    {:<16} N={:<6} {:<28} {:>7.2} s",
            l["layout"].as_str().unwrap_or("?"),
            l["n"],
            l["what"].as_str().unwrap_or("?"),
            l["seconds"].as_f64().unwrap_or(f64::NAN)
        );
    }
}

pub(super) fn render_control_plane(s: &mut String, cp: &Value) {
    let secs = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.2} s"))
            .unwrap_or_else(|| "-".into())
    };
    let ms = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{:.0} ms", x * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let mib = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{:.1} MiB", x / 1024.0))
            .unwrap_or_else(|| "-".into())
    };
    let kube = cp["source"] == "kube";
    if kube {
        let _ = writeln!(
            s,
            "\n  {} services x {} endpoints ({} objects in the double: built in {}, applied in {})",
            cp["services"],
            cp["endpoints_per_service"],
            cp["objects"],
            secs(&cp["build_objects_s"]),
            secs(&cp["apply_s"]),
        );
    } else {
        let _ = writeln!(
            s,
            "\n  {} services x {} endpoints ({:.1} MB of YAML)",
            cp["services"],
            cp["endpoints_per_service"],
            cp["manifest_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    let _ = writeln!(
        s,
        "    agent start -> /healthz 200:        {}",
        cp["start_problem"]
            .as_str()
            .map(|p| format!("NEVER: {p}"))
            .unwrap_or_else(|| secs(&cp["start_to_healthy_s"]))
    );
    if kube {
        let _ = writeln!(
            s,
            "      the double alone serves the agent's initial lists (pages of 500) in {}\n      (xtask's debug build; measured before the agent started)",
            secs(&cp["double_lists_s"])
        );
    }
    let healthz = &cp["healthz_while_starting"];
    if healthz["answers"].as_u64().is_some_and(|n| n > 0) {
        let _ = writeln!(
            s,
            "      /healthz meanwhile: {} answers, median {:.1} ms, max {:.1} ms (client start included)",
            healthz["answers"],
            healthz["median_ms"].as_f64().unwrap_or(f64::NAN),
            healthz["max_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(t) = cp["first_sync_logged_s"].as_f64() {
        let _ = writeln!(
            s,
            "      first sync that wrote, per the agent log: {:.2} s after start",
            t
        );
    }
    let _ = writeln!(
        s,
        "    in the datapath then:               {} frontends of {} (service ports + the probe), {} backends of {}{}",
        cp["frontends_programmed"],
        cp["frontends_expected"],
        cp["backends_programmed"],
        cp["backends_expected"],
        match (
            cp["converged_at_healthy"].as_bool(),
            cp["converged_s"].as_f64()
        ) {
            (Some(true), _) => ": converged".to_string(),
            (_, Some(t)) => format!(": NOT converged then; all programmed {t:.2} s after start"),
            (Some(false), None) if cp["start_problem"].is_null() => {
                ": NOT converged (not within 60 s more either)".to_string()
            }
            _ => String::new(),
        }
    );
    let changes: Vec<String> = cp["endpoint_change_s"]
        .as_array()
        .map(|a| a.iter().map(ms).collect())
        .unwrap_or_default();
    let windows: Vec<String> = cp["endpoint_change_windows_s"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| format!("{}..{}", ms(&w[0]), ms(&w[1])))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "    endpoint change -> in `services`:   {}",
        match cp["change_problem"].as_str() {
            Some(p) => format!("NEVER: {p}"),
            None => format!(
                "median {} (each: {}; between the last poll that missed it and the one that saw it: {})",
                ms(&cp["endpoint_change_median_s"]),
                changes.join(", "),
                windows.join(", ")
            ),
        }
    );
    let logged: Vec<String> = cp["endpoint_change_logged_s"]
        .as_array()
        .map(|a| a.iter().map(ms).collect())
        .unwrap_or_default();
    if !logged.is_empty() {
        let _ = writeln!(
            s,
            "      the agent logged the sync that wrote it after: {} ({} -> programmed)",
            logged.join(", "),
            if kube { "apply" } else { "write" }
        );
    }
    let (psum, pcount) = (
        cp["changes_programming_sum_s"].as_f64(),
        cp["changes_programming_count"].as_f64(),
    );
    if let (Some(sum), Some(count)) = (psum, pcount)
        && count > 0.0
    {
        let _ = writeln!(
            s,
            "      agent's own network_programming_duration for them: mean {:.0} ms over {count:.0}",
            1000.0 * sum / count
        );
    }
    let tail = &cp["endpoint_change_tail"];
    if tail.is_object() {
        let _ = writeln!(
            s,
            "    {} endpoint changes one after the other, apply -> sync logged: p50 {}, p99 {}, max {}{}",
            tail["changes"],
            ms(&tail["p50_s"]),
            ms(&tail["p99_s"]),
            ms(&tail["max_s"]),
            tail["problem"]
                .as_str()
                .map(|p| format!(" (stopped: {p})"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        s,
        "    one `ebpf-proxy services` call:     {} (the poll's resolution)",
        ms(&cp["services_poll_median_s"])
    );
    let _ = writeln!(
        s,
        "    agent memory:                       VmRSS {} (right after start {}), peak VmHWM {}",
        mib(&cp["rss_kib"]),
        mib(&cp["rss_kib_after_start"]),
        mib(&cp["hwm_kib"]),
    );
    let _ = writeln!(
        s,
        "    kernel memory of its maps:          {} (memlock of the map fds it holds)",
        cp["maps_memlock_bytes"]
            .as_f64()
            .map(|b| format!("{:.1} MiB", b / 1048576.0))
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "    agent CPU time:                     {} in its {} of life",
        secs(&cp["agent_cpu_s"]),
        secs(&cp["agent_age_s"])
    );
    let sum = cp["sync_duration_sum_s"].as_f64();
    let count = cp["sync_duration_count"].as_f64();
    let _ = writeln!(
        s,
        "    kubeproxy_sync_proxy_rules_duration_seconds: sum {} / count {}{}",
        sum.map(|x| format!("{x:.3} s"))
            .unwrap_or_else(|| "-".into()),
        count
            .map(|x| format!("{x:.0}"))
            .unwrap_or_else(|| "-".into()),
        match (sum, count) {
            (Some(s), Some(c)) if c > 0.0 => format!(" (mean {:.0} ms per sync)", 1000.0 * s / c),
            _ => String::new(),
        }
    );
    if let Some(n) = cp["service_ports_over_capacity"].as_f64() {
        let _ = writeln!(s, "    ebpf_proxy_service_ports_over_capacity: {n:.0}");
    }
    let log = &cp["agent_log"];
    let _ = writeln!(
        s,
        "    agent log: {} lines ({:.1} MB), {} ERROR lines; alive at the end: {}",
        log["lines"],
        log["bytes"].as_f64().unwrap_or(0.0) / 1e6,
        log["errors"],
        cp["agent_alive_at_end"]
    );
    if let Some(kinds) = log["error_kinds"].as_object() {
        for (kind, n) in kinds {
            let _ = writeln!(s, "      {n} x {kind}");
        }
    }
    if let Some(p) = log["probe_error"].as_str() {
        let _ = writeln!(s, "      probe: {p}");
    }
    if let (Some(_), Some(l)) = (cp["start_problem"].as_str(), log["last_synced"].as_str()) {
        let _ = writeln!(s, "      last sync: {l}");
    }
}
