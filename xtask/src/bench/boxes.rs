//! The boxes every layout runs in: a network namespace with its hosts,
//! the agent as a process of its own, and what is read from it (metrics,
//! its log).

use super::*;

/// A namespace with the client and backend addresses on `lo` and a
/// greeting server per backend. Fields drop in order: servers, namespace.
pub(super) struct Testbox {
    pub(super) _servers: Vec<ChildGuard>,
    pub(super) ns: Netns,
}

impl Testbox {
    pub(super) fn new(with_servers: bool) -> Result<Testbox> {
        let ns = Netns::new(PREFIX)?;
        for addr in std::iter::once(CLIENT).chain(BACKENDS) {
            ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        }
        let mut servers = Vec::new();
        if with_servers {
            for (i, addr) in BACKENDS.iter().enumerate() {
                let name = format!("backend-{}", i + 1);
                let listen = format!("{addr}:{BACKEND_PORT}");
                servers.push(start_server(&ns, &["--name", &name, "--tcp", &listen])?);
            }
        }
        Ok(Testbox {
            _servers: servers,
            ns,
        })
    }

    /// Routes the service CIDR onto a veth pair whose both ends are in
    /// this namespace (the far end has no address, so an untranslated
    /// packet never gets past ARP), as a node's default route would:
    /// netfilter's nat OUTPUT hook only sees packets that found a route.
    pub(super) fn route_services_to_dead_end(&self) -> Result<()> {
        proxy_tests::veth_pair(&self.ns, "svc0", &self.ns, "svc1")?;
        self.ns.ip(&["link", "set", "svc0", "up"])?;
        self.ns.ip(&["link", "set", "svc1", "up"])?;
        self.ns
            .ip(&["route", "add", SERVICE_CIDR, "dev", "svc0", "src", CLIENT])
    }
}

/// The agent as the bench runs it: the tests' runner
/// ([`proxy_tests::Agent`]), plus what the bench records while waiting for
/// it to become healthy.
pub(super) struct AgentProc {
    pub(super) agent: Agent,
    /// When it started, unix seconds (to compare with log timestamps).
    pub(super) started_unix: f64,
    /// How long each /healthz answer took while waiting for it to be 200
    /// (the client's start included): the agent must answer during its
    /// first sync.
    pub(super) healthz_answers_ms: Vec<f64>,
}

impl AgentProc {
    /// `source`: `("--manifests", dir)` or `("--kubeconfig", file)`.
    pub(super) fn start(
        ns: &Netns,
        source: (&str, PathBuf),
        cgroup: &Cgroup,
        pins: &PinDir,
    ) -> Result<AgentProc> {
        let source_path = source.1.to_string_lossy();
        let agent = Agent::start_with_args(
            ns,
            &[source.0, &source_path, "--metrics-bind-address", METRICS],
            cgroup.path(),
            pins.path(),
            NODE_NAME,
        )?;
        let started_unix = agent
            .started_at()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Ok(AgentProc {
            agent,
            started_unix,
            healthz_answers_ms: Vec::new(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.agent.id()
    }

    pub(super) fn log_tail(&self, n: usize) -> String {
        self.agent.log_tail(n)
    }

    /// Polls /healthz every 50 ms; Ok(time since start) at the first 200.
    /// Err(what happened) when the agent exits, `timeout` passes, or the
    /// agent has finished `give_up_after` syncs without becoming healthy
    /// (each of them incomplete: it is stuck retrying).
    pub(super) fn wait_healthy(
        &mut self,
        ns: &Netns,
        timeout: Duration,
        give_up_after: u32,
    ) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let mut next_metrics = Instant::now() + Duration::from_millis(500);
        loop {
            if let Ok(Some(status)) = self.agent.try_wait() {
                return Err(format!(
                    "agent exited ({status}) before /healthz answered 200"
                ));
            }
            let asked = Instant::now();
            let out = host(ns, None)
                .args([
                    "http-get",
                    &format!("{HEALTHZ}/healthz"),
                    "--timeout-ms",
                    "1000",
                ])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = out {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let answer = serde_json::from_str::<Value>(stdout.trim());
                if answer.as_ref().is_ok_and(|v| v["status"].is_u64()) {
                    self.healthz_answers_ms
                        .push(asked.elapsed().as_secs_f64() * 1000.0);
                }
                match answer {
                    Ok(v) if v["status"] == 200 => return Ok(self.agent.started().elapsed()),
                    Ok(v) => last = v["body"].as_str().unwrap_or("").to_string(),
                    Err(_) => last = stdout.trim().to_string(),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "/healthz not 200 after {timeout:?} (last answer: {last})"
                ));
            }
            if Instant::now() > next_metrics {
                next_metrics = Instant::now() + Duration::from_millis(500);
                let syncs = metric(&fetch_metrics(ns), SYNC_COUNT).unwrap_or(0.0);
                if syncs >= f64::from(give_up_after) {
                    return Err(format!(
                        "/healthz still not 200 after {syncs:.0} finished syncs ({:.1} s after start): \
                         every sync was incomplete; stopped waiting (last answer: {last})",
                        self.agent.started().elapsed().as_secs_f64()
                    ));
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

pub(super) const SYNC_SUM: &str = "kubeproxy_sync_proxy_rules_duration_seconds_sum";
pub(super) const SYNC_COUNT: &str = "kubeproxy_sync_proxy_rules_duration_seconds_count";
pub(super) const PROG_SUM: &str = "kubeproxy_network_programming_duration_seconds_sum";
pub(super) const PROG_COUNT: &str = "kubeproxy_network_programming_duration_seconds_count";
pub(super) const OVER_CAPACITY: &str = "ebpf_proxy_service_ports_over_capacity";

/// The agent's /metrics text (empty when it does not answer).
pub(super) fn fetch_metrics(ns: &Netns) -> String {
    host(ns, None)
        .args([
            "http-get",
            &format!("{METRICS}/metrics"),
            "--timeout-ms",
            "3000",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v["body"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The value of an unlabelled sample in Prometheus text.
pub(super) fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// What the agent's log says, read as a stream (it can be large when the
/// agent logs every failing service on every retry).
#[derive(Default)]
pub(super) struct LogScan {
    pub(super) lines: u64,
    pub(super) bytes: u64,
    pub(super) errors: u64,
    pub(super) first_errors: Vec<String>,
    /// Distinct error messages ("error=..." parts) and how often.
    pub(super) kinds: std::collections::BTreeMap<String, u64>,
    /// The first error about the probe service.
    pub(super) probe_error: Option<String>,
    pub(super) last_synced: Option<String>,
    /// Every "synced" line: (its time, unix seconds; whether it wrote).
    pub(super) syncs: Vec<(f64, bool)>,
}

/// "2026-11-22T04:56:39.494992Z" (tracing's UTC timestamps) -> unix seconds.
pub(super) fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// A "synced" line of the agent's log: Some(its time in unix seconds,
/// whether it wrote anything to the maps) when the time parses.
pub(super) fn synced_line(line: &str) -> Option<Option<(f64, bool)>> {
    if !line.contains(" synced ") {
        return None;
    }
    let wrote = [
        "frontends_written",
        "frontends_deleted",
        "backends_added",
        "backends_deleted",
    ]
    .iter()
    .any(|k| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .is_some_and(|v| v != "0")
    });
    Some(
        line.split_whitespace()
            .next()
            .and_then(parse_utc)
            .map(|t| (t, wrote)),
    )
}

pub(super) fn scan_log(path: &Path) -> LogScan {
    use std::io::BufRead as _;
    let mut scan = LogScan::default();
    let Ok(file) = fs::File::open(path) else {
        return scan;
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    // Bounded: the file is finite and read once.
    while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
        scan.lines += 1;
        scan.bytes += buf.len() as u64;
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.contains(" ERROR ") {
            scan.errors += 1;
            if scan.first_errors.len() < 3 {
                scan.first_errors.push(line.to_string());
            }
            let msg = line
                .split_once(": ")
                .map(|(_, m)| m)
                .unwrap_or(line)
                .split(" service_port=")
                .next()
                .unwrap_or("")
                .split(" cluster_ip=")
                .next()
                .unwrap_or("");
            let err = line.rsplit_once(" error=").map(|(_, e)| e).unwrap_or("");
            *scan.kinds.entry(format!("{msg}: {err}")).or_default() += 1;
            if scan.probe_error.is_none() && line.contains("bench/probe") {
                scan.probe_error = Some(line.to_string());
            }
        } else if let Some(sync) = synced_line(line) {
            scan.last_synced = Some(line.to_string());
            if let Some(sync) = sync
                && scan.syncs.len() < 100_000
            {
                scan.syncs.push(sync);
            }
        }
        buf.clear();
    }
    scan
}

/// The ebpf-proxy layout. Drop order: agent, pins (detaches the
/// programs), cgroup (kills clients), manifests, box.
pub(super) struct EbpfBox {
    pub(super) agent: AgentProc,
    pub(super) _pins: PinDir,
    pub(super) cgroup: Cgroup,
    pub(super) _manifests: TempDir,
    pub(super) tb: Testbox,
}
