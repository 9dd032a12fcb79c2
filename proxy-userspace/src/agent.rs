//! The agent: installs the datapath, then keeps the maps equal to what the
//! source says, one way: source -> model -> reconciler -> maps.
//!
//! On exit (SIGTERM, SIGINT) the programs stay attached and the maps stay
//! pinned: traffic keeps flowing on the last programmed state until the
//! next agent takes over, or `ebpf-proxy uninstall` removes it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    agent_health::Health,
    conntrack::{self, ConntrackGc},
    host, http,
    maps::PinnedMaps,
    metrics::{self, Metrics},
    model::{Changes, HealthCheck, NodePortAddresses, PlanChange, Planner, maglev::TableSize},
    programs,
    reconciler::Reconciler,
    service_health::HealthCheckServers,
    sockets::StaleSocketTerminator,
    source::{SourceStatus, SourceUpdate, kube::KubeSource, manifests::ManifestsSource},
};

/// Where the cluster state comes from.
pub enum SourceConfig {
    /// A directory of manifests, rescanned every `poll_interval`.
    Manifests {
        dir: PathBuf,
        poll_interval: Duration,
    },
    /// The API server: from a kubeconfig file, or in-cluster configuration.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

pub struct AgentConfig {
    pub source: SourceConfig,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub nodeport_addresses: NodePortAddresses,
    /// Devices external traffic arrives on (tc programs attach there).
    pub devices: Vec<String>,
    /// Whether and how XDP runs on `devices` in front of tc.
    pub xdp_mode: programs::XdpMode,
    pub capacities: programs::Capacities,
    /// A change waiting longer than this, or a source failing longer than
    /// this, makes /healthz fail.
    pub health_timeout: Duration,
    /// Entries of each Maglev table (external flows' backend choice).
    pub maglev_table_size: TableSize,
    /// How often the maps are read back and the last desired state synced
    /// again, putting back what anyone else deleted or changed.
    pub resync_interval: Duration,
    /// What the programs log into the agent's log.
    pub datapath_log_level: programs::DatapathLogLevel,
    /// Whether TCP sockets connected to a removed backend are destroyed
    /// (UDP ones always are).
    pub destroy_tcp_sockets: bool,
}

/// How soon a sync that failed part-way is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(config: AgentConfig) -> Result<()> {
    // An older kernel would load the programs and fail them at run time.
    let kernel = host::kernel::check()?;
    let (published, mut updates) = mpsc::unbounded_channel();
    let status = SourceStatus::default();
    // Everything that can fail on bad flags fails before the datapath changes.
    let mut source = match &config.source {
        SourceConfig::Manifests { dir, poll_interval } => {
            if !dir.is_dir() {
                bail!("--manifests {} is not a directory", dir.display());
            }
            let source = ManifestsSource::new(dir, &config.node_name);
            tokio::spawn(source.run(published, status.clone(), *poll_interval))
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = crate::source::kube::client(kubeconfig.as_deref()).await?;
            let source = KubeSource::new(client, &config.node_name);
            tokio::spawn(source.run(published, status.clone()))
        }
    };
    let metrics = Metrics::new(config.bpffs.clone(), status.clone());
    let health = Health::new(config.health_timeout, status);
    let health_listener = http::bind(config.healthz_bind_address, "health").await?;
    let metrics_listener = http::bind(config.metrics_bind_address, "metrics").await?;
    // Rule 11: NodePorts follow the node's addresses as they change.
    let mut node_addresses = host::addresses::watch()?;

    programs::check_devices(&config.devices)?;
    programs::check_cgroup2(&config.cgroup)?;
    let mut datapath =
        programs::Datapath::load(&config.bpffs, &config.capacities, config.datapath_log_level)?;
    datapath.forward_logs()?;
    let maps = PinnedMaps::open_in(datapath.maps_dir()).context("opening the pinned maps")?;
    let reconciler = Reconciler::new(maps)
        .context("reading back the pinned maps")?
        .with_maglev_table_size(config.maglev_table_size);
    // New maps (a migration) are filled before any program uses them.
    if !datapath.migrating() {
        datapath.attach(&config.cgroup, &config.devices, config.xdp_mode)?;
    }
    tracing::info!(
        bpffs = %config.bpffs.display(),
        cgroup = %config.cgroup.display(),
        devices = %config.devices.join(","),
        kernel = %kernel,
        frontends = reconciler.frontend_count(),
        migrating = datapath.migrating(),
        maglev_table_size = %config.maglev_table_size,
        "datapath loaded"
    );
    let mut servers = tokio::spawn(serve_endpoints(
        health_listener,
        health.clone(),
        metrics_listener,
        metrics.clone(),
    ));
    let mut conntrack_gc = tokio::spawn(collect_conntrack(config.bpffs.clone(), metrics.clone()));
    let mut health_checks = HealthCheckServers::new(Ipv4Addr::UNSPECIFIED, health.clone());
    if !datapath.migrating() {
        metrics.set_datapath_fill(&metrics::map_capacities(&config.bpffs));
    }
    let mut programmer = Programmer {
        planner: Planner::default(),
        reconciler,
        health,
        stale_sockets: StaleSocketTerminator::new(
            config.cgroup.clone(),
            config.bpffs.clone(),
            config.destroy_tcp_sockets,
            metrics.clone(),
        ),
        metrics,
        nodeport_addresses: config.nodeport_addresses.clone(),
        pending: None,
        waiting_since: None,
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut unsettled = false;
    let mut resync = tokio::time::interval_at(
        tokio::time::Instant::now() + config.resync_interval,
        config.resync_interval,
    );

    loop {
        let work = tokio::select! {
            update = updates.recv() => {
                let Some(first) = update else {
                    bail!("the source stopped");
                };
                // A burst is planned in one step.
                let mut batch = vec![first];
                while let Ok(next) = updates.try_recv() {
                    batch.push(next);
                }
                Work::Plan {
                    updates: batch,
                    local_addresses: node_addresses.borrow().clone(),
                }
            }
            _ = tokio::time::sleep(RETRY_INTERVAL), if unsettled => Work::Retry,
            changed = node_addresses.changed() => {
                if changed.is_err() {
                    bail!("the node address watch stopped");
                }
                let now = node_addresses.borrow_and_update().clone();
                // Before the first update there is nothing to replan: the
                // first snapshot is completed with the addresses then.
                if programmer.planner.snapshot().is_none() {
                    continue;
                }
                tracing::info!(now = ?now, "node addresses changed; replanning NodePorts");
                Work::Plan {
                    updates: vec![SourceUpdate::Changes(Changes {
                        local_addresses: Some(now.clone()),
                        ..Changes::default()
                    })],
                    local_addresses: now,
                }
            }
            _ = resync.tick() => Work::Resync,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            served = &mut servers => {
                let Err(err) = served.context("http server task")?;
                return Err(err.context("http server stopped"));
            }
            collected = &mut conntrack_gc => {
                let Err(err) = collected.context("conntrack GC task")?;
                return Err(err.context("conntrack GC stopped"));
            }
            ended = &mut source => {
                ended.context("source task")?;
                bail!("the source stopped");
            }
        };
        // Planning and map writes run on a blocking thread: at 100k
        // Services they take seconds, and /healthz must answer meanwhile.
        let (returned, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = programmer.run(work);
            (programmer, outcome)
        })
        .await
        .context("programming task")?;
        programmer = returned;
        if let Some(new_health_checks) = &outcome.health_checks {
            health_checks.update(new_health_checks).await;
        }
        unsettled = !outcome.settled;
        // New maps take over once they hold the source's state, never
        // before its first update (a resync may come first).
        if outcome.settled && programmer.planner.snapshot().is_some() && datapath.migrating() {
            datapath.attach(&config.cgroup, &config.devices, config.xdp_mode)?;
            datapath.finish_migration()?;
            programmer
                .metrics
                .set_datapath_fill(&metrics::map_capacities(&config.bpffs));
        }
    }
    tracing::info!(bpffs = %config.bpffs.display(), "exiting; the datapath stays pinned and keeps serving");
    Ok(())
}

/// One step of the programmer.
enum Work {
    /// The source's updates: plan what they changed, then program it. A
    /// snapshot is completed with this host's addresses.
    Plan {
        updates: Vec<SourceUpdate>,
        local_addresses: Vec<Ipv4Addr>,
    },
    /// Program again what a sync left undone.
    Retry,
    /// Read the maps back and program everything again, putting back what
    /// anyone else deleted or changed.
    Resync,
}

/// What a step tells the async loop.
struct Outcome {
    /// Everything planned is programmed (or refused for room: retried on
    /// every later sync).
    settled: bool,
    /// The health checks, when they changed (rule 32).
    health_checks: Option<Vec<HealthCheck>>,
}

/// Plans and programs; moved onto a blocking thread for every step.
struct Programmer {
    planner: Planner,
    reconciler: Reconciler<PinnedMaps>,
    health: Health,
    metrics: Metrics,
    /// Destroys sockets connected to backends a sync removed (rule 30).
    stale_sockets: StaleSocketTerminator,
    /// `--nodeport-addresses`, completing every snapshot.
    nodeport_addresses: NodePortAddresses,
    /// Planned but not programmed yet.
    pending: Option<PlanChange>,
    /// Since when a change waits to be programmed.
    waiting_since: Option<Instant>,
}

impl Programmer {
    fn run(&mut self, work: Work) -> Outcome {
        let mut health_checks = None;
        match work {
            Work::Plan {
                updates,
                local_addresses,
            } => {
                let change = self.plan(updates, local_addresses);
                if change.health_checks {
                    health_checks = Some(self.planner.desired().health_checks.clone());
                }
                self.pend(change);
            }
            Work::Retry => {}
            // Nothing planned yet: the maps keep what they hold (a restart
            // before the source answers must not empty them).
            Work::Resync if self.planner.snapshot().is_none() => {}
            Work::Resync => match self.reconciler.reread() {
                Ok(()) => self.pend(PlanChange {
                    everything: true,
                    ..PlanChange::default()
                }),
                Err(err) => tracing::warn!(
                    error = %err,
                    "cannot read back the maps; resyncing at the next interval"
                ),
            },
        }
        Outcome {
            settled: self.program(),
            health_checks,
        }
    }

    /// Plans what `updates` changed, counting it.
    fn plan(&mut self, updates: Vec<SourceUpdate>, local_addresses: Vec<Ipv4Addr>) -> PlanChange {
        let arrived = Instant::now();
        let mut change = PlanChange::default();
        for update in updates {
            change.merge(match update {
                SourceUpdate::Snapshot(mut snapshot) => {
                    snapshot.nodeport_addresses = self.nodeport_addresses.clone();
                    snapshot.local_addresses = local_addresses.clone();
                    self.planner.apply(snapshot)
                }
                SourceUpdate::Changes(changes) => self.planner.apply_changes(changes),
            });
        }
        let node = self.planner.snapshot().and_then(|s| s.node.as_ref());
        self.health
            .node_deleting(node.is_some_and(|node| node.deleting));
        self.metrics
            .count_changes(change.services_changed, change.slices_changed);
        if change.is_empty() {
            return change;
        }
        self.health.change_pending();
        self.waiting_since.get_or_insert(arrived);
        let desired = self.planner.desired();
        for conflict in &desired.conflicts {
            tracing::warn!(
                frontend = %format!("{}:{}/{:?}", conflict.frontend.addr, conflict.frontend.port, conflict.frontend.protocol),
                kept = %conflict.kept,
                dropped = %conflict.dropped,
                "two service ports claim one frontend; the first keeps it"
            );
        }
        self.metrics.count_no_local_endpoints(desired);
        change
    }

    fn pend(&mut self, change: PlanChange) {
        match &mut self.pending {
            Some(pending) => pending.merge(change),
            None if !change.is_empty() => self.pending = Some(change),
            None => {}
        }
    }

    /// Programs what is pending; false when part of it failed (retried).
    fn program(&mut self) -> bool {
        let Some(change) = &self.pending else {
            return true;
        };
        let started = Instant::now();
        let desired = self.planner.desired();
        let report = self.reconciler.sync_change(desired, change);
        self.metrics.observe_sync(started.elapsed());
        self.metrics.set_over_capacity(
            report.over_capacity.len() as i64,
            report.wildcards_over_capacity as i64,
        );
        self.metrics.set_map_entries(&self.reconciler.entries());
        report.log(desired.ports.len());
        self.stale_sockets.after_sync(&report.removed_backends);
        if !report.is_complete() {
            return false;
        }
        let everything = change.everything;
        self.pending = None;
        self.health.synced();
        if let Some(since) = self.waiting_since.take() {
            self.metrics.observe_programmed(since.elapsed());
        }
        if everything {
            release_freed_memory();
        }
        true
    }
}

/// A full plan and sync (the first, a relist, a resync) frees far more
/// than it keeps; glibc holds on to freed pages in its arenas unless asked
/// to give them back, and the agent's resident size would stay at its peak.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Health and metrics, each on its own address; ends when either fails.
async fn serve_endpoints(
    health_listener: tokio::net::TcpListener,
    health: Health,
    metrics_listener: tokio::net::TcpListener,
    metrics: Metrics,
) -> Result<std::convert::Infallible> {
    let health = http::serve(
        health_listener,
        Arc::new(move |path: &str| health.respond(path)),
    );
    let metrics = http::serve(
        metrics_listener,
        Arc::new(move |path: &str| metrics.respond(path)),
    );
    tokio::select! {
        failed = health => failed,
        failed = metrics => failed,
    }
}

/// Removes finished conntrack entries, at the interval the collector
/// adapts, walking the tables on a blocking thread. A failed run is retried
/// at the next interval.
async fn collect_conntrack(bpffs: PathBuf, metrics: Metrics) -> Result<std::convert::Infallible> {
    let mut gc = ConntrackGc::new(&bpffs);
    loop {
        tokio::time::sleep(gc.next_interval()).await;
        let fill_from = bpffs.clone();
        let (returned, result) = tokio::task::spawn_blocking(move || {
            let result = conntrack::monotonic_coarse_ns()
                .context("reading CLOCK_MONOTONIC_COARSE")
                .and_then(|now_ns| gc.run_once(now_ns));
            (
                gc,
                result.map(|report| (report, metrics::datapath_fill(&fill_from))),
            )
        })
        .await
        .context("conntrack GC run")?;
        gc = returned;
        match result {
            Ok((report, fill)) => {
                metrics.observe_conntrack_gc(&report);
                metrics.set_datapath_fill(&fill);
                tracing::debug!(
                    scanned = report.scanned,
                    entries = report.entries,
                    idle_timeout = report.idle_timeout,
                    backend_gone = report.backend_gone,
                    busy = report.busy,
                    orphans_removed = report.orphans_removed,
                    took = ?report.duration,
                    next_in = ?gc.next_interval(),
                    "conntrack GC"
                );
            }
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "conntrack GC failed; retrying at the next interval"
            ),
        }
    }
}
