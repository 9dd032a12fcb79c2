//! Sections 2 and 3: the control plane, fed by a manifests directory or
//! the API server double: start to programmed, endpoint changes, memory.

use super::*;

/// What feeds the agent in the control-plane runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// A manifests directory (`--manifests`).
    Manifests,
    /// The API server double in the box's namespace (`--kubeconfig`).
    Kube,
}

/// The objects behind the agent: files, or the double (and the directory
/// of its kubeconfig).
pub(super) enum Feed {
    Manifests(TempDir),
    Kube { api: ApiServer, dir: TempDir },
}

impl Feed {
    /// The agent's source flag and its argument.
    pub(super) fn agent_source(&self) -> Result<(&'static str, PathBuf)> {
        Ok(match self {
            Feed::Manifests(dir) => ("--manifests", dir.path().to_path_buf()),
            Feed::Kube { api, dir } => ("--kubeconfig", api.kubeconfig(dir.path())?),
        })
    }

    /// Moves the probe's single endpoint to `backend`: rewrites its file,
    /// or applies a modified EndpointSlice to the double.
    pub(super) fn move_probe(&self, backend: &str) -> Result<()> {
        match self {
            Feed::Manifests(dir) => write_atomic(dir.path(), "probe.yaml", &probe_docs(backend)),
            Feed::Kube { api, .. } => {
                api.apply(kube_slice("probe", &[backend.to_string()]));
                Ok(())
            }
        }
    }
}

/// The probe service (1 endpoint at `backend`) as manifests.
pub(super) fn probe_docs(backend: &str) -> String {
    let mut t = String::new();
    service_docs(&mut t, "probe", PROBE_VIP, &[backend.to_string()]);
    t
}

/// What an API server would return for `service_docs`' Service (with the
/// fields it defaults), built as a `Value` (no YAML to parse).
pub(super) fn kube_service(name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip,
            "clusterIPs": [vip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP", "targetPort": BACKEND_PORT}],
        },
    })
}

/// The EndpointSlice `<service>-x1` with ready endpoints on this node at
/// `endpoints`, as the EndpointSlice controller writes it.
pub(super) fn kube_slice(service: &str, endpoints: &[String]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(j, addr)| {
            json!({
                "addresses": [addr],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": NODE_NAME,
                "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("{service}-{j}")},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x1"),
            "namespace": "bench",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// How long the double alone takes to serve what the agent lists at start:
/// every Service and EndpointSlice with kube-proxy's selector, in pages of
/// 500 (kube-runtime's default), each page a GET from a thread of ours in
/// the namespace (the double is in this process, a debug build). Measured
/// before the agent starts; None on any failure.
pub(super) fn time_double_lists(ns: &Netns, api: &ApiServer) -> Option<f64> {
    use std::io::{Read as _, Write as _};
    const SELECTOR: &str =
        "%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
    let netns = ns.path();
    let addr = api.addr();
    let measure = move || -> Option<f64> {
        let f = fs::File::open(&netns).ok()?;
        // SAFETY: plain syscall; moves only this (short-lived) thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let mut took = Duration::ZERO;
        for path in [
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ] {
            let mut token = String::new();
            // Bounded: at most 1000 pages.
            for _ in 0..1000 {
                let mut target = format!("{path}?labelSelector={SELECTOR}&limit=500");
                if !token.is_empty() {
                    // Continue tokens are hex: nothing to escape.
                    let _ = write!(target, "&continue={token}");
                }
                let start = Instant::now();
                let mut stream = std::net::TcpStream::connect(addr).ok()?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .ok()?;
                write!(
                    stream,
                    "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
                )
                .ok()?;
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).ok()?;
                took += start.elapsed();
                // The head, then `{"kind":..,"metadata":{..,"continue":".."},"items":[`.
                let head = String::from_utf8_lossy(&answer[..answer.len().min(1024)]);
                if !head.starts_with("HTTP/1.1 200") {
                    return None;
                }
                match head.split_once("\"continue\":\"") {
                    Some((_, rest)) => token = rest.split('"').next()?.to_string(),
                    None => break,
                }
            }
        }
        Some(took.as_secs_f64())
    };
    thread::spawn(measure).join().ok().flatten()
}

/// `tail_changes`: how many endpoint changes, one after the other, to
/// time for the tail (0: none).
pub(super) fn control_plane(
    services: usize,
    endpoints: usize,
    source: Source,
    tail_changes: usize,
) -> Result<Value> {
    let size = format!("{services}x{endpoints}");
    let label = match source {
        Source::Manifests => format!("control plane {size}"),
        Source::Kube => format!("control plane (API server) {size}"),
    };
    let eps =
        |i: usize| -> Vec<String> { (0..endpoints).map(|j| pod_ip(i * endpoints + j)).collect() };
    let tb = Testbox::new(false)?;
    let mut out = json!({
        "source": match source { Source::Manifests => "manifests", Source::Kube => "kube" },
        "services": services,
        "endpoints_per_service": endpoints,
    });
    let feed = match source {
        Source::Manifests => {
            eprintln!("bench: {label}: writing the manifests");
            let manifests = TempDir::new(PREFIX)?;
            let mut text = String::with_capacity(services * (400 + endpoints * 80));
            for i in 0..services {
                service_docs(&mut text, &format!("svc-{i:05}"), &vip(i), &eps(i));
            }
            out["manifest_bytes"] = json!(text.len());
            write_atomic(manifests.path(), "services.yaml", &text)?;
            drop(text);
            write_atomic(manifests.path(), "probe.yaml", &probe_docs(BACKENDS[0]))?;
            Feed::Manifests(manifests)
        }
        Source::Kube => {
            eprintln!("bench: {label}: loading the API server double");
            let api = ApiServer::start(&tb.ns)?;
            let build = Instant::now();
            let mut objects = Vec::with_capacity(2 * services + 3);
            objects.push(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
                "status": {"addresses": [{"type": "InternalIP", "address": CLIENT}]},
            }));
            for i in 0..services {
                let name = format!("svc-{i:05}");
                objects.push(kube_service(&name, &vip(i)));
                objects.push(kube_slice(&name, &eps(i)));
            }
            objects.push(kube_service("probe", PROBE_VIP));
            objects.push(kube_slice("probe", &[BACKENDS[0].to_string()]));
            out["objects"] = json!(objects.len());
            out["build_objects_s"] = json!(build.elapsed().as_secs_f64());
            let apply = Instant::now();
            api.apply(objects);
            out["apply_s"] = json!(apply.elapsed().as_secs_f64());
            out["double_lists_s"] = json!(time_double_lists(&tb.ns, &api));
            eprintln!(
                "bench: {label}: {} objects built in {:.2} s, applied in {:.2} s; the double serves the initial lists in {} s",
                out["objects"],
                out["build_objects_s"].as_f64().unwrap_or(f64::NAN),
                out["apply_s"].as_f64().unwrap_or(f64::NAN),
                fmt_f(&out["double_lists_s"], 2)
            );
            Feed::Kube {
                api,
                dir: TempDir::new(PREFIX)?,
            }
        }
    };

    let cgroup = Cgroup::new(PREFIX)?;
    let pins = PinDir::new(PREFIX)?;
    eprintln!("bench: {label}: starting the agent");
    let mut agent = AgentProc::start(&tb.ns, feed.agent_source()?, &cgroup, &pins)?;
    let healthy = agent.wait_healthy(&tb.ns, Duration::from_secs(120), 3);
    match &healthy {
        Ok(t) => {
            eprintln!(
                "bench: {label}: healthy {:.2} s after start",
                t.as_secs_f64()
            );
            out["start_to_healthy_s"] = json!(t.as_secs_f64());
        }
        Err(e) => {
            eprintln!("bench: {label}: {e}");
            out["start_to_healthy_s"] = Value::Null;
            out["start_problem"] = json!(e);
        }
    }
    out["rss_kib_after_start"] = json!(status_kib(agent.pid(), "VmRSS:"));
    let mut answers = agent.healthz_answers_ms.clone();
    answers.sort_by(|a, b| a.total_cmp(b));
    out["healthz_while_starting"] = json!({
        "answers": answers.len(),
        "median_ms": answers.get(answers.len() / 2),
        "max_ms": answers.last(),
    });

    // What the datapath holds now, and what one `services` call costs.
    let services_call = |pins: &PinDir| -> Result<(Vec<Value>, Duration)> {
        let start = Instant::now();
        let text = run_checked(
            Command::new(proxy_tests::agent_bin())
                .args(["services", "--output", "json", "--bpffs"])
                .arg(pins.path()),
        )?;
        let took = start.elapsed();
        let rows: Vec<Value> = serde_json::from_str(&text).context("services --output json")?;
        Ok((rows, took))
    };
    // The probe's backend address, when it has exactly one.
    let probe_backend = |rows: &[Value]| -> Option<String> {
        let row = rows.iter().find(|r| r["frontend"]["addr"] == PROBE_VIP)?;
        match row["backends"].as_array()?.as_slice() {
            [one] => one["backend"]["addr"].as_str().map(str::to_string),
            _ => None,
        }
    };
    // Converged means every frontend and backend programmed: checked when
    // /healthz says so, and (should it not hold) polled for up to 60 s.
    let (want_frontends, want_backends) = (services + 1, services * endpoints + 1);
    out["frontends_expected"] = json!(want_frontends);
    out["backends_expected"] = json!(want_backends);
    let counts = |rows: &[Value]| -> (usize, usize) {
        let backends = rows
            .iter()
            .map(|r| r["backends"].as_array().map_or(0, Vec::len))
            .sum();
        (rows.len(), backends)
    };
    match services_call(&pins) {
        Ok((rows, took)) => {
            let (frontends, backends) = counts(&rows);
            out["frontends_programmed"] = json!(frontends);
            out["backends_programmed"] = json!(backends);
            out["services_call_s"] = json!(took.as_secs_f64());
            out["probe_before"] = json!(probe_backend(&rows));
            let converged = (frontends, backends) == (want_frontends, want_backends);
            out["converged_at_healthy"] = json!(healthy.is_ok() && converged);
            if healthy.is_ok() && !converged {
                eprintln!(
                    "bench: {label}: healthy with {frontends} frontends / {backends} backends \
                     of {want_frontends} / {want_backends}; waiting for the rest"
                );
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(100));
                    let Ok((rows, _)) = services_call(&pins) else {
                        break;
                    };
                    if counts(&rows) == (want_frontends, want_backends) {
                        out["converged_s"] = json!(agent.agent.started().elapsed().as_secs_f64());
                        break;
                    }
                }
            }
        }
        Err(e) => out["services_problem"] = json!(format!("{e:#}")),
    }

    // One endpoint change, three times: the probe's single endpoint moves
    // to the next backend address; poll `ebpf-proxy services` until shown.
    // A healthy agent gets 30 s per change, a stuck one 10 s, once.
    let change_timeout = Duration::from_secs(if healthy.is_ok() { 30 } else { 10 });
    let mut changes = Vec::new();
    let mut windows = Vec::new();
    let mut poll_costs = Vec::new();
    let mut change_problem = None;
    let metrics_before = fetch_metrics(&tb.ns);
    let mut written_at = Vec::new();
    for (k, next) in [BACKENDS[1], BACKENDS[2], BACKENDS[0]].iter().enumerate() {
        thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        written_at.push(unix_now());
        feed.move_probe(next)?;
        let deadline = start + change_timeout;
        let mut seen = None;
        let mut polls = 0;
        // Start of the last poll that did not see it: a lower bound.
        let mut missed_at = Duration::ZERO;
        while Instant::now() < deadline {
            polls += 1;
            let poll_start = start.elapsed();
            match services_call(&pins) {
                Ok((rows, took)) => {
                    poll_costs.push(took.as_secs_f64());
                    if probe_backend(&rows).as_deref() == Some(*next) {
                        seen = Some(start.elapsed());
                        break;
                    }
                    missed_at = poll_start;
                }
                Err(e) => {
                    change_problem = Some(format!("{e:#}"));
                    break;
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
        match seen {
            Some(t) => {
                eprintln!(
                    "bench: {label}: change {} visible after {:.0} ms ({polls} polls; not yet at {:.0} ms)",
                    k + 1,
                    t.as_secs_f64() * 1000.0,
                    missed_at.as_secs_f64() * 1000.0
                );
                changes.push(t.as_secs_f64());
                windows.push(json!([missed_at.as_secs_f64(), t.as_secs_f64()]));
            }
            None => {
                let p = change_problem.get_or_insert_with(|| {
                    format!(
                        "change {} (probe endpoint -> {next}) not visible within {change_timeout:?}",
                        k + 1
                    )
                });
                eprintln!("bench: {label}: {p}");
                break;
            }
        }
    }
    out["endpoint_change_s"] = json!(changes);
    out["endpoint_change_windows_s"] = json!(windows);
    // The agent's own view of those changes: from the change reaching it
    // (after its manifest poll) to the datapath having it.
    let metrics_after = fetch_metrics(&tb.ns);
    let delta = |name: &str| Some(metric(&metrics_after, name)? - metric(&metrics_before, name)?);
    out["changes_programming_sum_s"] = json!(delta(PROG_SUM));
    out["changes_programming_count"] = json!(delta(PROG_COUNT));
    out["endpoint_change_median_s"] = if changes.is_empty() {
        Value::Null
    } else {
        json!(median(&changes))
    };
    out["services_poll_median_s"] = if poll_costs.is_empty() {
        Value::Null
    } else {
        json!(median(&poll_costs))
    };
    if tail_changes > 0 && change_problem.is_none() {
        eprintln!("bench: {label}: {tail_changes} endpoint changes, one after the other");
        out["endpoint_change_tail"] =
            control_tail::endpoint_changes(&feed, agent.agent.log_path(), tail_changes)?;
    }
    out["change_problem"] = json!(change_problem);
    out["rss_kib"] = json!(status_kib(agent.pid(), "VmRSS:"));
    out["maps_memlock_bytes"] = json!(control_tail::maps_memlock_bytes(agent.pid()));
    out["hwm_kib"] = json!(status_kib(agent.pid(), "VmHWM:"));
    out["agent_cpu_s"] = json!(cpu_seconds(agent.pid()));
    out["agent_age_s"] = json!(agent.agent.started().elapsed().as_secs_f64());

    // The agent's own sync-duration metric.
    let body = fetch_metrics(&tb.ns);
    out["sync_duration_sum_s"] = json!(metric(&body, SYNC_SUM));
    out["sync_duration_count"] = json!(metric(&body, SYNC_COUNT));
    out["service_ports_over_capacity"] = json!(metric(&body, OVER_CAPACITY));
    if body.is_empty() {
        out["metrics_problem"] = json!(format!("no answer from {METRICS}/metrics"));
    }
    let alive = agent.agent.try_wait().ok().flatten().is_none();
    out["agent_alive_at_end"] = json!(alive);
    agent.agent.kill();
    let scan = scan_log(agent.agent.log_path());
    let started_unix = agent.started_unix;
    drop(agent);
    out["agent_log"] = json!({
        "lines": scan.lines,
        "bytes": scan.bytes,
        "errors": scan.errors,
        "first_errors": scan.first_errors,
        "error_kinds": scan.kinds,
        "probe_error": scan.probe_error,
        "last_synced": scan.last_synced,
    });
    // When the agent logged the first sync that wrote something after
    // each rewrite: the datapath had the change then.
    let logged: Vec<Option<f64>> = written_at
        .iter()
        .map(|&w| {
            scan.syncs
                .iter()
                .find(|(t, wrote)| *t >= w && *wrote)
                .map(|(t, _)| t - w)
        })
        .collect();
    out["endpoint_change_logged_s"] = json!(logged);
    // The first sync that wrote anything: the initial programming.
    out["first_sync_logged_s"] = json!(
        scan.syncs
            .iter()
            .find(|(_, wrote)| *wrote)
            .map(|(t, _)| t - started_unix)
    );
    drop(pins);
    drop(cgroup);
    drop(feed);
    drop(tb);
    Ok(out)
}
