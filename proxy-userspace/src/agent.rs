//! The agent: installs the datapath, then keeps the maps equal to what the
//! source says, one way: source -> model -> reconciler -> maps.
//!
//! On exit (SIGTERM, SIGINT) the programs stay attached and the maps stay
//! pinned: traffic keeps flowing on the last programmed state until the
//! next agent takes over, or `ebpf-proxy uninstall` removes it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    health::Health,
    maps::PinnedMaps,
    model::{ClusterSnapshot, DesiredState, desired_state},
    programs,
    reconciler::{Reconciler, SyncReport},
    source::manifests::{ManifestsSource, Severity},
};

pub struct AgentConfig {
    pub manifests: PathBuf,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub healthz_bind_address: SocketAddr,
    /// How often the manifests directory is rescanned.
    pub poll_interval: Duration,
    /// A change waiting longer than this makes /healthz fail.
    pub health_timeout: Duration,
}

pub async fn run(config: AgentConfig) -> Result<()> {
    if !config.manifests.is_dir() {
        bail!(
            "--manifests {} is not a directory",
            config.manifests.display()
        );
    }
    programs::install(&config.bpffs, &config.cgroup)?;
    let maps = PinnedMaps::open(&config.bpffs).context("opening the pinned maps")?;
    let mut reconciler = Reconciler::new(maps).context("reading back the pinned maps")?;
    tracing::info!(
        bpffs = %config.bpffs.display(),
        cgroup = %config.cgroup.display(),
        frontends = reconciler.frontend_count(),
        "datapath attached"
    );

    let health = Health::new(config.health_timeout);
    let listener = Health::bind(config.healthz_bind_address).await?;
    let mut health_server = tokio::spawn(health.clone().serve(listener));
    let mut source = ManifestsSource::new(&config.manifests, &config.node_name);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut retry: Option<DesiredState> = None;

    loop {
        match source.poll() {
            Ok(poll) => {
                for problem in &poll.problems {
                    match problem.severity {
                        Severity::Invalid => {
                            tracing::warn!(file = %problem.file.display(), "{problem}")
                        }
                        Severity::Ignored => {
                            tracing::info!(file = %problem.file.display(), "{problem}")
                        }
                    }
                }
                if let Some(snapshot) = poll.snapshot {
                    health.change_pending();
                    retry = Some(plan(&snapshot));
                }
            }
            // Keep the last good state: a vanished directory is not "no services".
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "manifests source unreadable; datapath unchanged"
            ),
        }
        if let Some(desired) = retry.take() {
            let report = reconciler.sync(&desired);
            log_report(&report, desired.ports.len());
            if report.is_complete() {
                health.synced();
            } else {
                retry = Some(desired);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            served = &mut health_server => {
                let Err(err) = served.context("health server task")?;
                return Err(err.context("health server stopped"));
            }
        }
    }
    tracing::info!(bpffs = %config.bpffs.display(), "exiting; the datapath stays pinned and keeps serving");
    Ok(())
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
    for err in &report.failed_deletes {
        tracing::error!(error = %err, "delete failed; retrying");
    }
    tracing::info!(
        service_ports,
        frontends_written = report.frontends_written,
        frontends_deleted = report.frontends_deleted,
        backends_added = report.backends_added,
        backends_deleted = report.backends_deleted,
        complete = report.is_complete(),
        "synced"
    );
}
