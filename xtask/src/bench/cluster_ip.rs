//! Section 1: connection rate and connect latency to a ClusterIP, this
//! proxy next to direct and kube-proxy's iptables and nftables layouts.

use super::*;

/// How one layout is measured.
pub(super) struct Layout<'a> {
    pub(super) name: &'static str,
    pub(super) ns: &'a Netns,
    pub(super) cgroup: Option<&'a Cgroup>,
    pub(super) targets: Vec<String>,
    /// The agent, whose CPU time during the runs is reported.
    pub(super) agent_pid: Option<u32>,
}

/// One `connect-rate` run; the JSON summary plus agent CPU seconds.
pub(super) fn rate_run(l: &Layout, seconds: f64, parallel: u32) -> Result<(Value, Option<f64>)> {
    let mut cmd = host(l.ns, l.cgroup);
    cmd.arg("connect-rate");
    for t in &l.targets {
        cmd.args(["--to", t]);
    }
    cmd.args([
        "--duration-ms",
        &format!("{}", (seconds * 1000.0).round() as u64),
        "--parallel",
        &parallel.to_string(),
        "--timeout-ms",
        "1000",
    ]);
    let cpu_before = l.agent_pid.and_then(cpu_seconds);
    let out = json_lines(&mut cmd).with_context(|| format!("connect-rate for {}", l.name))?;
    let cpu_after = l.agent_pid.and_then(cpu_seconds);
    let v = out
        .into_iter()
        .next()
        .context("connect-rate printed nothing")?;
    let agent_cpu = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
    Ok((v, agent_cpu))
}

/// Sets up every layout with `n` services, checks that each reaches all
/// three backends, then measures them in interleaved rounds.
/// kube-proxy's layouts holding `n` Services, each in a box of its own.
pub(super) struct NetfilterBoxes {
    pub(super) iptables: Testbox,
    pub(super) iptables_legacy: Option<Testbox>,
    pub(super) nftables: Testbox,
    pub(super) _rules: TempDir,
}

impl NetfilterBoxes {
    pub(super) fn named(&self) -> impl Iterator<Item = (&'static str, &Testbox)> {
        [
            Some(("iptables", &self.iptables)),
            self.iptables_legacy
                .as_ref()
                .map(|b| ("iptables-legacy", b)),
            Some(("nftables", &self.nftables)),
        ]
        .into_iter()
        .flatten()
    }
}

/// Loads kube-proxy's iptables (and iptables-legacy) and nftables layouts
/// for `n` Services, recording each load's time in `loads`.
pub(super) fn netfilter_layouts(
    n: usize,
    opts: &Options,
    loads: &mut Vec<Value>,
) -> Result<NetfilterBoxes> {
    // iptables (and iptables-legacy): kube-proxy's iptables mode, nat table.
    let rules_dir = TempDir::new(PREFIX)?;
    let ipt_file = rules_dir.path().join("iptables.rules");
    fs::write(&ipt_file, iptables_rules(n))?;
    let ipt = Testbox::new(true)?;
    ipt.route_services_to_dead_end()?;
    let took = netns_exec(&ipt.ns, &["iptables-restore"], Some(&ipt_file))?;
    loads.push(json!({"layout": "iptables", "n": n, "what": "iptables-restore", "seconds": took.as_secs_f64()}));
    let legacy = if opts.iptables_legacy {
        let b = Testbox::new(true)?;
        b.route_services_to_dead_end()?;
        let took = netns_exec(&b.ns, &["iptables-legacy-restore"], Some(&ipt_file))?;
        loads.push(json!({"layout": "iptables-legacy", "n": n, "what": "iptables-legacy-restore", "seconds": took.as_secs_f64()}));
        Some(b)
    } else {
        None
    };

    // nftables: kube-proxy's nftables mode.
    let nft_file = rules_dir.path().join("nftables.nft");
    fs::write(&nft_file, nftables_rules(n))?;
    let nft = Testbox::new(true)?;
    nft.route_services_to_dead_end()?;
    let nft_path = nft_file.to_string_lossy().into_owned();
    let took = netns_exec(&nft.ns, &["nft", "-f", &nft_path], None)?;
    loads.push(
        json!({"layout": "nftables", "n": n, "what": "nft -f", "seconds": took.as_secs_f64()}),
    );

    Ok(NetfilterBoxes {
        iptables: ipt,
        iptables_legacy: legacy,
        nftables: nft,
        _rules: rules_dir,
    })
}

/// Which layouts a connection-rate run compares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Layouts {
    /// Direct, this proxy, kube-proxy's iptables and nftables layouts.
    All,
    /// Direct and this proxy: at 100k Services the netfilter layouts take
    /// minutes to load and are not what the goal is about.
    ProxyOnly,
}

pub(super) fn connection_rate(
    n: usize,
    seconds: f64,
    rounds: u32,
    opts: &Options,
    compared: Layouts,
) -> Result<(Vec<Value>, Vec<Value>)> {
    let last_vip = format!("{}:{SERVICE_PORT}", vip(n - 1));
    let mut loads = Vec::new();
    eprintln!(
        "bench: N={n}: setting up direct, ebpf-proxy{}",
        if compared == Layouts::All {
            ", iptables, nftables"
        } else {
            ""
        }
    );
    let direct = Testbox::new(true)?;

    // ebpf-proxy: manifests first, then a cold agent start.
    let manifests = TempDir::new(PREFIX)?;
    let mut text = String::with_capacity(n * 600);
    let endpoints: Vec<String> = BACKENDS.iter().map(|s| s.to_string()).collect();
    for i in 0..n {
        service_docs(&mut text, &format!("svc-{i:05}"), &vip(i), &endpoints);
    }
    write_atomic(manifests.path(), "services.yaml", &text)?;
    let tb = Testbox::new(true)?;
    let cgroup = Cgroup::new(PREFIX)?;
    let pins = PinDir::new(PREFIX)?;
    let mut agent = AgentProc::start(
        &tb.ns,
        ("--manifests", manifests.path().to_path_buf()),
        &cgroup,
        &pins,
    )?;
    let healthy = agent.wait_healthy(&tb.ns, Duration::from_secs(120), 5);
    let ebpf = EbpfBox {
        agent,
        _pins: pins,
        cgroup,
        _manifests: manifests,
        tb,
    };
    // An agent that does not become healthy is reported, not measured.
    let ebpf_problem = match healthy {
        Ok(t) => {
            eprintln!(
                "bench: N={n}: ebpf-proxy healthy {:.2} s after start",
                t.as_secs_f64()
            );
            loads.push(json!({"layout": "ebpf-proxy", "n": n, "what": "agent start to /healthz 200", "seconds": t.as_secs_f64()}));
            None
        }
        Err(e) => {
            let tail = ebpf.agent.log_tail(3);
            eprintln!("bench: N={n}: ebpf-proxy: {e}\nagent log (last lines):\n{tail}");
            Some(format!(
                "agent not healthy: {e}; last log line: {}",
                tail.lines().last().unwrap_or("")
            ))
        }
    };

    let netfilter = match compared {
        Layouts::All => Some(netfilter_layouts(n, opts, &mut loads)?),
        Layouts::ProxyOnly => None,
    };
    for l in &loads {
        if l["layout"] != "ebpf-proxy" {
            eprintln!(
                "bench: N={n}: {} loaded by {} in {:.2} s",
                l["layout"].as_str().unwrap_or(""),
                l["what"].as_str().unwrap_or(""),
                l["seconds"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }

    let mut layouts = vec![
        Layout {
            name: "direct",
            ns: &direct.ns,
            cgroup: None,
            targets: BACKENDS
                .iter()
                .map(|b| format!("{b}:{BACKEND_PORT}"))
                .collect(),
            agent_pid: None,
        },
        Layout {
            name: "ebpf-proxy",
            ns: &ebpf.tb.ns,
            cgroup: Some(&ebpf.cgroup),
            targets: vec![last_vip.clone()],
            agent_pid: Some(ebpf.agent.pid()),
        },
    ];
    for (name, tb) in netfilter.iter().flat_map(NetfilterBoxes::named) {
        layouts.push(Layout {
            name,
            ns: &tb.ns,
            cgroup: None,
            targets: vec![last_vip.clone()],
            agent_pid: None,
        });
    }

    // Warm-up and check: every layout answers from all three backends
    // without errors; one that does not is reported, not measured.
    let mut broken: Vec<Option<String>> = Vec::new();
    for l in &layouts {
        if l.name == "ebpf-proxy"
            && let Some(p) = &ebpf_problem
        {
            broken.push(Some(p.clone()));
            continue;
        }
        let (v, _) = rate_run(l, 0.3, 1)?;
        let backends = v["backends"].as_object().map(|m| m.len()).unwrap_or(0);
        let problem = if v["ok"] != true || v["errors"].as_u64() != Some(0) || backends != 3 {
            Some(format!(
                "warm-up: {} connections, {} errors (first: {}), {backends} of 3 backends answered",
                v["connections"], v["errors"], v["first_error"]
            ))
        } else {
            None
        };
        if let Some(p) = &problem {
            eprintln!("bench: N={n}: {}: {p}", l.name);
        }
        broken.push(problem);
    }

    let mut samples: Vec<Vec<(Value, Option<f64>)>> = vec![Vec::new(); layouts.len()];
    for round in 0..rounds as usize {
        eprintln!(
            "bench: N={n}: round {}/{} ({} layouts x {seconds} s)",
            round + 1,
            rounds,
            layouts.len()
        );
        for k in 0..layouts.len() {
            let i = (k + round) % layouts.len();
            if broken[i].is_some() {
                continue;
            }
            samples[i].push(rate_run(&layouts[i], seconds, opts.parallel)?);
        }
    }

    let cells = layouts
        .iter()
        .zip(&samples)
        .zip(&broken)
        .map(|((l, runs), problem)| {
            let pick = |key: &str| -> Vec<f64> {
                runs.iter()
                    .map(|(v, _)| v[key].as_f64().unwrap_or(f64::NAN))
                    .collect()
            };
            let rates = pick("rate");
            let errors: u64 = runs.iter().map(|(v, _)| v["errors"].as_u64().unwrap_or(0)).sum();
            let connections: u64 = runs
                .iter()
                .map(|(v, _)| v["connections"].as_u64().unwrap_or(0))
                .sum();
            let agent_cpu: Vec<f64> = runs
                .iter()
                .filter_map(|(v, cpu)| Some(cpu.as_ref()? / v["elapsed_s"].as_f64()?))
                .collect();
            json!({
                "layout": l.name,
                "n": n,
                "target": l.targets.join(" "),
                "problem": problem,
                "rate": median(&rates),
                "rates": rates,
                "connect_p50_us": median(&pick("connect_p50_us")),
                "connect_p99_us": median(&pick("connect_p99_us")),
                "cycle_p50_us": median(&pick("cycle_p50_us")),
                "cycle_p99_us": median(&pick("cycle_p99_us")),
                "connections": connections,
                "errors": errors,
                "first_error": runs.iter().find_map(|(v, _)| v["first_error"].as_str().map(str::to_string)),
                "agent_cpu_fraction": if agent_cpu.is_empty() { Value::Null } else { json!(median(&agent_cpu)) },
                "backends": runs.last().map(|(v, _)| v["backends"].clone()).unwrap_or(Value::Null),
            })
        })
        .collect();
    drop(layouts);
    eprintln!("bench: N={n}: tearing down");
    drop(netfilter);
    drop(ebpf);
    drop(direct);
    Ok((cells, loads))
}

/// kube-proxy's iptables mode for `n` services (nat table only; what a
/// ClusterIP connection from the node traverses): OUTPUT -> KUBE-SERVICES,
/// one rule per service port, a KUBE-SVC chain choosing by `statistic`,
/// a KUBE-SEP chain per endpoint doing the DNAT. The client is in the
/// node's namespace, so KUBE-MARK-MASQ/POSTROUTING do not matter here.
pub(super) fn iptables_rules(n: usize) -> String {
    let mut chains = String::with_capacity(n * 120);
    let mut rules = String::with_capacity(n * 600);
    chains.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for i in 0..n {
        let svc = format!("KUBE-SVC-{i:05}");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i:05}:http cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            vip(i)
        );
        let count = BACKENDS.len();
        for (j, ip) in BACKENDS.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:05}-{j}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            // kube-proxy: the probability of picking this one among those left.
            let left = count - j;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{i:05}:http -> {ip}:{BACKEND_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{i:05}:http -> {ip}:{BACKEND_PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {ip}/32 -m comment --comment \"bench/svc-{i:05}:http\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"bench/svc-{i:05}:http\" -m tcp -j DNAT --to-destination {ip}:{BACKEND_PORT}"
            );
        }
    }
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

/// kube-proxy's nftables mode for `n` services: a `service-ips` verdict
/// map keyed by address . protocol . port, a chain per service choosing
/// with `numgen random`, a chain per endpoint doing the DNAT, hooked at
/// nat output.
pub(super) fn nftables_rules(n: usize) -> String {
    let mut s = String::with_capacity(n * 700);
    s.push_str("table ip kube-proxy {\n");
    s.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if n > 0 {
        s.push_str("    elements = {\n");
        for i in 0..n {
            let sep = if i + 1 < n { "," } else { "" };
            let _ = writeln!(
                s,
                "      {} . tcp . {SERVICE_PORT} : goto service-{i:05}{sep}",
                vip(i)
            );
        }
        s.push_str("    }\n");
    }
    s.push_str("  }\n");
    s.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    s.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    s.push_str(
        "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n",
    );
    for i in 0..n {
        let arms: Vec<String> = (0..BACKENDS.len())
            .map(|j| format!("{j} : goto endpoint-{i:05}-{j}"))
            .collect();
        let _ = writeln!(
            s,
            "  chain service-{i:05} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            BACKENDS.len(),
            arms.join(", ")
        );
        for (j, ip) in BACKENDS.iter().enumerate() {
            let _ = writeln!(
                s,
                "  chain endpoint-{i:05}-{j} {{\n    ip saddr {ip} jump mark-for-masquerade\n    meta l4proto tcp dnat to {ip}:{BACKEND_PORT}\n  }}"
            );
        }
    }
    s.push_str("}\n");
    s
}
