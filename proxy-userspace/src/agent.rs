//! The agent: installs the datapath, then keeps the maps equal to what the
//! source says, one way: source -> model -> reconciler -> maps.
//!
//! On exit (SIGTERM, SIGINT) the programs stay attached and the maps stay
//! pinned: traffic keeps flowing on the last programmed state until the
//! next agent takes over, or `ebpf-proxy uninstall` removes it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    conntrack::{self, ConntrackGc},
    health::Health,
    healthcheck::HealthCheckServers,
    host, http,
    maps::PinnedMaps,
    metrics::Metrics,
    model::{
        ClusterSnapshot, DesiredState, NodePortAddresses,
        desired::{FrontendKind, FrontendPlan, Selection, WhenEmpty},
        desired_state,
        maglev::TableSize,
    },
    programs,
    reconciler::{Reconciler, SyncReport},
    sockets::StaleSocketTerminator,
    source::{SourceStatus, kube::KubeSource, manifests::ManifestsSource},
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
/// How often the node's interface addresses are compared with those the
/// NodePort frontends were planned on (rule 11: an address added or
/// removed is followed without a restart).
const ADDRESS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(config: AgentConfig) -> Result<()> {
    let (snapshots, mut updates) = watch::channel(None);
    let status = SourceStatus::default();
    // Everything that can fail on bad flags fails before the datapath changes.
    let mut source = match &config.source {
        SourceConfig::Manifests { dir, poll_interval } => {
            if !dir.is_dir() {
                bail!("--manifests {} is not a directory", dir.display());
            }
            let source = ManifestsSource::new(dir, &config.node_name);
            tokio::spawn(source.run(snapshots, status.clone(), *poll_interval))
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let source = KubeSource::new(client, &config.node_name);
            tokio::spawn(source.run(snapshots, status.clone()))
        }
    };
    let metrics = Metrics::new(config.bpffs.clone(), status.clone());
    let health = Health::new(config.health_timeout, status);
    let health_listener = http::bind(config.healthz_bind_address, "health").await?;
    let metrics_listener = http::bind(config.metrics_bind_address, "metrics").await?;

    programs::check_devices(&config.devices)?;
    programs::check_cgroup2(&config.cgroup)?;
    let mut datapath =
        programs::Datapath::load(&config.bpffs, &config.capacities, config.datapath_log_level)?;
    datapath.forward_logs()?;
    let maps = PinnedMaps::open_in(datapath.maps_dir()).context("opening the pinned maps")?;
    let mut reconciler = Reconciler::new(maps)
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
    let mut sync = SyncLoop {
        health_checks: HealthCheckServers::new(Ipv4Addr::UNSPECIFIED, health.clone()),
        health,
        stale_sockets: StaleSocketTerminator::new(
            config.cgroup.clone(),
            config.bpffs.clone(),
            config.destroy_tcp_sockets,
            metrics.clone(),
        ),
        metrics,
        nodeport_addresses: config.nodeport_addresses.clone(),
        last_snapshot: ClusterSnapshot::default(),
        planned: false,
        waiting_since: None,
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut pending: Option<DesiredState> = None;
    let mut address_check = tokio::time::interval(ADDRESS_CHECK_INTERVAL);
    let mut resync = tokio::time::interval_at(
        tokio::time::Instant::now() + config.resync_interval,
        config.resync_interval,
    );
    // The last desired state the maps were made equal to: what a resync
    // programs again.
    let mut programmed: Option<DesiredState> = None;

    loop {
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    bail!("the source stopped");
                }
                if let Some(snapshot) = updates.borrow_and_update().clone() {
                    pending = Some(sync.plan(snapshot).await);
                }
            }
            _ = tokio::time::sleep(RETRY_INTERVAL), if pending.is_some() => {}
            _ = address_check.tick() => {
                if let Some(snapshot) = sync.addresses_changed() {
                    pending = Some(sync.plan(snapshot).await);
                }
            }
            _ = resync.tick() => match reconciler.reread() {
                Ok(()) => {
                    if pending.is_none() {
                        pending = programmed.take();
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot read back the maps; resyncing at the next interval"),
            },
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
        }
        if let Some(desired) = pending.take() {
            if !sync.program(&mut reconciler, &desired) {
                pending = Some(desired);
                continue;
            }
            if datapath.migrating() {
                datapath.attach(&config.cgroup, &config.devices, config.xdp_mode)?;
                datapath.finish_migration()?;
            }
            programmed = Some(desired);
        }
    }
    tracing::info!(bpffs = %config.bpffs.display(), "exiting; the datapath stays pinned and keeps serving");
    Ok(())
}

/// What the loop keeps between snapshots and syncs.
struct SyncLoop {
    health: Health,
    metrics: Metrics,
    health_checks: HealthCheckServers,
    stale_sockets: StaleSocketTerminator,
    nodeport_addresses: NodePortAddresses,
    last_snapshot: ClusterSnapshot,
    /// Whether a snapshot was planned (before, there is nothing to replan).
    planned: bool,
    /// Since when a change waits to be programmed.
    waiting_since: Option<Instant>,
}

impl SyncLoop {
    /// A new snapshot: completes it with this host's facts, counts what
    /// changed, and plans the datapath (health-check servers follow at once).
    async fn plan(&mut self, mut snapshot: ClusterSnapshot) -> DesiredState {
        self.health.change_pending();
        self.health
            .node_deleting(snapshot.node.as_ref().is_some_and(|node| node.deleting));
        self.waiting_since.get_or_insert_with(Instant::now);
        let (services, slices) = changes(&self.last_snapshot, &snapshot);
        self.metrics.count_changes(services, slices);
        snapshot.nodeport_addresses = self.nodeport_addresses.clone();
        snapshot.local_addresses = local_addresses();
        let desired = plan(&snapshot);
        let (internal, external) = without_local_endpoints(&desired);
        self.metrics.set_no_local_endpoints(internal, external);
        self.health_checks.update(&desired.health_checks).await;
        self.last_snapshot = snapshot;
        self.planned = true;
        desired
    }

    /// The last snapshot again when the node's addresses are no longer
    /// those it was planned on.
    fn addresses_changed(&self) -> Option<ClusterSnapshot> {
        if !self.planned {
            return None;
        }
        let now = local_addresses();
        if now == self.last_snapshot.local_addresses {
            return None;
        }
        tracing::info!(
            before = ?self.last_snapshot.local_addresses,
            now = ?now,
            "node addresses changed; replanning NodePorts"
        );
        Some(self.last_snapshot.clone())
    }

    /// Programs `desired`; false when part of it failed (retry later).
    fn program(&mut self, reconciler: &mut Reconciler<PinnedMaps>, desired: &DesiredState) -> bool {
        let started = Instant::now();
        let report = reconciler.sync(desired);
        self.metrics.observe_sync(started.elapsed());
        self.metrics.set_over_capacity(
            report.over_capacity.len() as i64,
            report.wildcards_over_capacity as i64,
        );
        log_report(&report, desired.ports.len());
        self.stale_sockets.after_sync(&report.removed_backends);
        if !report.is_complete() {
            return false;
        }
        self.health.synced();
        if let Some(since) = self.waiting_since.take() {
            self.metrics.observe_programmed(since.elapsed());
        }
        true
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
        let (returned, result) = tokio::task::spawn_blocking(move || {
            let result = conntrack::monotonic_coarse_ns()
                .context("reading CLOCK_MONOTONIC_COARSE")
                .and_then(|now_ns| gc.run_once(now_ns));
            (gc, result)
        })
        .await
        .context("conntrack GC run")?;
        gc = returned;
        match result {
            Ok(report) => {
                metrics.observe_conntrack_gc(&report);
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

/// Service ports whose Local traffic policy leaves them without an
/// endpoint: (internal, external), as kube-proxy counts them.
fn without_local_endpoints(desired: &DesiredState) -> (i64, i64) {
    let dropping = |selection: &Selection| {
        selection.when_empty == WhenEmpty::Drop && selection.backends.is_empty()
    };
    let count = |pick: &dyn Fn(&FrontendPlan) -> bool| {
        desired
            .ports
            .values()
            .filter(|port| port.frontends.iter().any(pick))
            .count() as i64
    };
    (
        count(&|frontend| frontend.kind == FrontendKind::ClusterIp && dropping(&frontend.internal)),
        count(&|frontend| frontend.external.as_ref().is_some_and(dropping)),
    )
}

/// How many Services and EndpointSlices differ between two snapshots
/// (added, changed or removed), for the change counters.
fn changes(before: &ClusterSnapshot, after: &ClusterSnapshot) -> (u64, u64) {
    fn differing<K: Ord, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> u64 {
        let changed_or_removed = a
            .iter()
            .filter(|(key, value)| b.get(*key) != Some(*value))
            .count();
        let added = b.keys().filter(|key| !a.contains_key(*key)).count();
        (changed_or_removed + added) as u64
    }
    (
        differing(&before.services, &after.services),
        differing(&before.slices, &after.slices),
    )
}

/// This namespace's interface addresses: NodePort candidates.
fn local_addresses() -> Vec<Ipv4Addr> {
    host::interface_addresses()
        .inspect_err(|err| tracing::warn!(error = %err, "cannot list interface addresses"))
        .unwrap_or_default()
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "no in-cluster configuration (KUBERNETES_SERVICE_HOST unset?): pass --kubeconfig \
             or --manifests",
        )?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

fn plan(snapshot: &ClusterSnapshot) -> DesiredState {
    let desired = desired_state(snapshot);
    for conflict in &desired.conflicts {
        tracing::warn!(
            frontend = %format!("{}:{}/{:?}", conflict.frontend.addr, conflict.frontend.port, conflict.frontend.protocol),
            kept = %conflict.kept,
            dropped = %conflict.dropped,
            "two service ports claim one frontend; the first keeps it"
        );
    }
    desired
}

fn log_report(report: &SyncReport, service_ports: usize) {
    for (port, err) in &report.failed {
        tracing::error!(service_port = %port, error = %err, "programming failed; keeps its previous state, retrying");
    }
    if !report.over_capacity.is_empty() || report.wildcards_over_capacity > 0 {
        let examples: Vec<String> = report
            .over_capacity
            .iter()
            .take(3)
            .map(|(port, over)| format!("{port} ({over})"))
            .collect();
        tracing::error!(
            service_ports = report.over_capacity.len(),
            cluster_ip_wildcards = report.wildcards_over_capacity,
            examples = %examples.join("; "),
            "not programmed: the maps have no room left"
        );
    }
    for (cluster_ip, err) in &report.failed_wildcards {
        tracing::error!(%cluster_ip, error = %err, "refusing undefined ports failed; retrying");
    }
    for err in &report.failed_deletes {
        tracing::error!(error = %err, "delete failed; retrying");
    }
    tracing::info!(
        service_ports,
        frontends_written = report.frontends_written,
        frontends_deleted = report.frontends_deleted,
        backends_added = report.backends_added,
        backends_deleted = report.backends_deleted,
        source_ranges_written = report.source_ranges_written,
        source_ranges_deleted = report.source_ranges_deleted,
        maglev_tables_written = report.maglev_tables_written,
        maglev_tables_deleted = report.maglev_tables_deleted,
        complete = report.is_complete(),
        "synced"
    );
}
