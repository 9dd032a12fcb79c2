//! `/metrics` (rule 34): kube-proxy's sync metrics under their kube-proxy
//! names, so existing dashboards and alerts keep working, plus the
//! datapath's own counters (read at scrape time: one small per-CPU array)
//! and map fill levels. A scrape walks no map: the fill of the maps the
//! agent writes comes from the reconciler's mirror after every sync, that
//! of the maps the datapath writes from the conntrack GC's runs.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, Map, MapData};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::{AffinityKey, AffinityValue, SockRevNatKey, SockRevNatValue, map_names};

use crate::{
    conntrack::{GcReport, Removal},
    http::Response,
    inspect::{self, CounterRow},
    maps::open_pinned,
    model::{
        DesiredState,
        desired::{FrontendKind, FrontendPlan, Selection, WhenEmpty},
    },
    source::SourceStatus,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub traffic_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemovalLabel {
    reason: &'static str,
}

/// The agent's metrics. Cheap to clone; every clone updates the same values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    sync_duration: Histogram,
    network_programming_duration: Histogram,
    last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    endpoint_changes: Counter,
    service_changes: Counter,
    no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    over_capacity: Gauge,
    conntrack_entries: Gauge,
    conntrack_capacity: Gauge,
    conntrack_gc_runs: Counter,
    conntrack_gc_expired: Family<RemovalLabel, Counter>,
    conntrack_gc_orphans: Counter,
    conntrack_gc_duration: Histogram,
    wildcards_over_capacity: Gauge,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    stale_sockets_destroyed: Family<ProtocolLabel, Counter>,
}

impl Metrics {
    pub fn new(bpffs: PathBuf, source: SourceStatus) -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let metrics = Self {
            registry: Arc::default(),
            sync_duration: seconds(),
            network_programming_duration: seconds(),
            last_sync: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            over_capacity: Gauge::default(),
            conntrack_entries: Gauge::default(),
            conntrack_capacity: Gauge::default(),
            conntrack_gc_runs: Counter::default(),
            conntrack_gc_expired: Family::default(),
            conntrack_gc_orphans: Counter::default(),
            conntrack_gc_duration: seconds(),
            wildcards_over_capacity: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            stale_sockets_destroyed: Family::default(),
        };
        {
            let mut registry = metrics.registry.lock().unwrap_or_else(|p| p.into_inner());
            registry.register(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "How long one sync of the datapath maps took",
                metrics.sync_duration.clone(),
            );
            registry.register(
                "kubeproxy_network_programming_duration_seconds",
                "From a change reaching the agent to the datapath having it",
                metrics.network_programming_duration.clone(),
            );
            registry.register(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "When the datapath last became equal to the desired state (unix seconds)",
                metrics.last_sync.clone(),
            );
            // The registry appends _total to counters.
            registry.register(
                "kubeproxy_sync_proxy_rules_endpoint_changes",
                "EndpointSlices added, changed or removed",
                metrics.endpoint_changes.clone(),
            );
            registry.register(
                "kubeproxy_sync_proxy_rules_service_changes",
                "Services added, changed or removed",
                metrics.service_changes.clone(),
            );
            // A gauge, yet named with _total: kube-proxy's name (rule 34).
            registry.register(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Frontends with a Local traffic policy and no local endpoint",
                metrics.no_local_endpoints.clone(),
            );
            registry.register(
                "ebpf_proxy_service_ports_over_capacity",
                "Service ports not programmed because the maps have no room for them",
                metrics.over_capacity.clone(),
            );
            registry.register(
                "ebpf_proxy_conntrack_entries",
                "Tracked external flows, as the last conntrack GC run left them",
                metrics.conntrack_entries.clone(),
            );
            registry.register(
                "ebpf_proxy_conntrack_capacity",
                "How many flows the conntrack table holds at most",
                metrics.conntrack_capacity.clone(),
            );
            registry.register(
                "ebpf_proxy_conntrack_gc_runs",
                "Conntrack GC runs that completed",
                metrics.conntrack_gc_runs.clone(),
            );
            registry.register(
                "ebpf_proxy_conntrack_gc_expired",
                "Flows the conntrack GC removed, by reason (idle_timeout, backend_gone)",
                metrics.conntrack_gc_expired.clone(),
            );
            registry.register(
                "ebpf_proxy_conntrack_gc_orphan_replies_removed",
                "Reply entries the conntrack GC removed because no flow referred to them",
                metrics.conntrack_gc_orphans.clone(),
            );
            registry.register(
                "ebpf_proxy_conntrack_gc_duration_seconds",
                "How long one conntrack GC run took",
                metrics.conntrack_gc_duration.clone(),
            );
            registry.register(
                "ebpf_proxy_cluster_ip_wildcards_over_capacity",
                "ClusterIP entries refusing undefined ports (rule 9, one per ClusterIP and \
                 protocol) not programmed because the services map has no room: service ports \
                 come first",
                metrics.wildcards_over_capacity.clone(),
            );
            registry.register(
                "ebpf_proxy_map_entries",
                "Entries in each datapath map",
                metrics.map_entries.clone(),
            );
            registry.register(
                "ebpf_proxy_map_capacity",
                "Maximum entries of each datapath map",
                metrics.map_capacity.clone(),
            );
            registry.register(
                "ebpf_proxy_stale_sockets_destroyed",
                "Connected sockets destroyed because their backend was removed (rule 30), by \
                 protocol",
                metrics.stale_sockets_destroyed.clone(),
            );
            registry.register_collector(Box::new(DatapathCollector { bpffs }));
            registry.register_collector(Box::new(SourceCollector { source }));
        }
        metrics
    }

    pub fn observe_sync(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
    }

    /// The datapath now equals the desired state; `waited` is how long the
    /// change it carries had waited since it reached the agent.
    pub fn observe_programmed(&self, waited: Duration) {
        self.network_programming_duration
            .observe(waited.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
    }

    pub fn count_changes(&self, services: u64, endpoint_slices: u64) {
        self.service_changes.inc_by(services);
        self.endpoint_changes.inc_by(endpoint_slices);
    }

    pub fn set_no_local_endpoints(&self, internal: i64, external: i64) {
        for (policy, value) in [("internal", internal), ("external", external)] {
            self.no_local_endpoints
                .get_or_create(&TrafficPolicyLabel {
                    traffic_policy: policy,
                })
                .set(value);
        }
    }

    /// Service ports whose Local traffic policy leaves them without an
    /// endpoint, as kube-proxy counts them.
    pub fn count_no_local_endpoints(&self, desired: &DesiredState) {
        let (internal, external) = without_local_endpoints(desired);
        self.set_no_local_endpoints(internal, external);
    }

    /// Service ports and rule 9 entries the last sync left out for lack
    /// of room.
    pub fn set_over_capacity(&self, ports: i64, wildcards: i64) {
        self.over_capacity.set(ports);
        self.wildcards_over_capacity.set(wildcards);
    }

    /// Entries of the maps named, as the agent last saw them.
    pub fn set_map_entries(&self, entries: &[(&'static str, u64)]) {
        for (map, count) in entries {
            self.map_entries
                .get_or_create(&MapLabel { map })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// What [`datapath_fill`] read.
    pub fn set_datapath_fill(&self, fill: &DatapathFill) {
        self.set_map_entries(&fill.entries);
        for (map, max) in &fill.capacities {
            self.map_capacity
                .get_or_create(&MapLabel { map })
                .set(i64::from(*max));
        }
    }

    pub fn observe_conntrack_gc(&self, report: &GcReport) {
        self.conntrack_entries.set(report.entries as i64);
        self.conntrack_capacity.set(report.capacity as i64);
        self.set_map_entries(&[
            (map_names::CONNTRACK, report.entries),
            (map_names::CT_REPLY, report.replies),
        ]);
        self.conntrack_gc_runs.inc();
        for why in Removal::ALL {
            self.conntrack_gc_expired
                .get_or_create(&RemovalLabel { reason: why.name() })
                .inc_by(report.removed(why));
        }
        self.conntrack_gc_orphans.inc_by(report.orphans_removed);
        self.conntrack_gc_duration
            .observe(report.duration.as_secs_f64());
    }

    /// `destroyed` connected sockets of `protocol` ("tcp", "udp") pointed
    /// at removed backends.
    pub fn count_stale_sockets(&self, protocol: &'static str, destroyed: u64) {
        self.stale_sockets_destroyed
            .get_or_create(&ProtocolLabel { protocol })
            .inc_by(destroyed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(
            &mut out,
            &self.registry.lock().unwrap_or_else(|p| p.into_inner()),
        )?;
        Ok(out)
    }

    pub fn respond(&self, path: &str) -> Response {
        if path != "/metrics" {
            return Response::not_found();
        }
        match self.render() {
            Ok(body) => Response {
                status: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                headers: Vec::new(),
                body,
            },
            Err(_) => Response::json(503, "{\"error\":\"encoding metrics failed\"}".into()),
        }
    }
}

/// Reads the datapath's counters on each scrape: one per-CPU array, the
/// kernel's numbers also while another agent writes the maps.
#[derive(Debug)]
struct DatapathCollector {
    bpffs: PathBuf,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// Maps only the datapath writes, besides the conntrack maps (which the
/// GC walks anyway): their entries are counted on the GC's thread.
const DATAPATH_WRITTEN: [&str; 2] = [map_names::AFFINITY, map_names::SOCK_REV_NAT];

/// Service ports whose Local traffic policy leaves them without an
/// endpoint: (internal, external).
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

/// Capacities of every map with a fill level, and the entries of
/// [`DATAPATH_WRITTEN`].
#[derive(Debug, Default)]
pub struct DatapathFill {
    pub capacities: Vec<(&'static str, u32)>,
    pub entries: Vec<(&'static str, u64)>,
}

/// Every map with a fill level, with its capacity, from the pinned maps
/// (their info only: cheap).
fn filled_maps(bpffs: &Path) -> impl Iterator<Item = (&'static str, MapData, u32)> + '_ {
    map_names::ALL
        .into_iter()
        .filter(|name| *name != map_names::COUNTERS)
        .filter_map(|name| {
            let data = open_pinned(bpffs, name).ok()?;
            let max_entries = data.info().ok()?.max_entries();
            Some((name, data, max_entries))
        })
}

/// The capacities alone, as the agent reads them once the datapath is
/// loaded or migrated.
pub fn map_capacities(bpffs: &Path) -> DatapathFill {
    DatapathFill {
        capacities: filled_maps(bpffs)
            .map(|(name, _, max_entries)| (name, max_entries))
            .collect(),
        entries: Vec::new(),
    }
}

/// Capacities and the entries of [`DATAPATH_WRITTEN`]: walks the keys of
/// the LRU maps the datapath writes, so it runs off the async runtime, next
/// to the conntrack GC. A map that cannot be read is left out.
pub fn datapath_fill(bpffs: &Path) -> DatapathFill {
    let mut fill = DatapathFill::default();
    for (name, data, max_entries) in filled_maps(bpffs) {
        fill.capacities.push((name, max_entries));
        if !DATAPATH_WRITTEN.contains(&name) {
            continue;
        }
        let entries = match Map::from_map_data(data) {
            Ok(map) if name == map_names::AFFINITY => count_hash::<AffinityKey, AffinityValue>(map),
            Ok(map) => count_hash::<SockRevNatKey, SockRevNatValue>(map),
            Err(_) => None,
        };
        fill.entries.extend(entries.map(|count| (name, count)));
    }
    fill
}

/// Entries of a hash or LRU hash map; `None` when it is not one.
fn count_hash<K: aya::Pod, V: aya::Pod>(map: Map) -> Option<u64> {
    let map: HashMap<MapData, K, V> = HashMap::try_from(map).ok()?;
    Some(map.keys().filter(Result::is_ok).count() as u64)
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The same reading `ebpf-proxy counters` shows.
        if let Ok(counters) = inspect::counters(&self.bpffs) {
            encode_events(&mut encoder, &counters)?;
        }
        Ok(())
    }
}

fn encode_events(
    encoder: &mut DescriptorEncoder,
    counters: &[CounterRow],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "ebpf_proxy_datapath_events",
        "Datapath events (translated, rejected, dropped, ...), summed over CPUs",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for row in counters {
        ConstCounter::new(row.value)
            .encode(family.encode_family(&EventLabel { event: row.name })?)?;
    }
    Ok(())
}

/// What the source rejected, counted per kind.
#[derive(Debug)]
struct SourceCollector {
    source: SourceStatus,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

impl Collector for SourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "ebpf_proxy_invalid_objects",
            "Invalid objects (versions) rejected by the source; each kept its last good version",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (kind, count) in self.source.invalid_counts() {
            ConstCounter::new(count).encode(family.encode_family(&KindLabel { kind })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_34_every_map_but_the_counters_has_a_fill_level() {
        let mut filled: Vec<&str> = crate::reconciler::MAPS_WRITTEN
            .into_iter()
            .chain(DATAPATH_WRITTEN)
            .chain([map_names::CONNTRACK, map_names::CT_REPLY])
            .collect();
        filled.sort_unstable();
        let mut expected: Vec<&str> = map_names::ALL
            .into_iter()
            .filter(|name| *name != map_names::COUNTERS)
            .collect();
        expected.sort_unstable();
        assert_eq!(filled, expected);
    }

    #[test]
    fn rule_34_kube_proxy_metric_names_are_exposed() {
        let source = SourceStatus::default();
        source.count_invalid("Service");
        let metrics = Metrics::new(PathBuf::from("/nonexistent"), source);
        metrics.observe_sync(Duration::from_millis(3));
        metrics.observe_programmed(Duration::from_millis(5));
        metrics.count_changes(2, 3);
        metrics.set_no_local_endpoints(1, 0);
        metrics.set_over_capacity(2, 6);
        let text = metrics.render().unwrap();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_network_programming_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 3",
            "kubeproxy_sync_proxy_rules_service_changes_total 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 0",
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
            "ebpf_proxy_invalid_objects_total{kind=\"Service\"} 1",
            "ebpf_proxy_service_ports_over_capacity 2",
            "ebpf_proxy_cluster_ip_wildcards_over_capacity 6",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn rule_34_no_local_endpoints_counts_local_policy_ports_left_without_one() {
        use std::{net::Ipv4Addr, sync::Arc};

        use crate::model::{desired::desired_state, fixtures};

        let remote = |mut slice: crate::model::SliceInfo| {
            for endpoint in &mut slice.endpoints {
                endpoint.node_name = Some("node2".into());
            }
            slice
        };
        // Internal Local, endpoints elsewhere: counted as internal.
        let mut internal = fixtures::cluster_ip_service("internal", Ipv4Addr::new(10, 96, 0, 1));
        internal.internal_traffic_local = true;
        // External Local on an external IP, endpoints elsewhere: counted as
        // external only (its ClusterIP keeps the Cluster policy).
        let mut external = fixtures::cluster_ip_service("external", Ipv4Addr::new(10, 96, 0, 2));
        external.external_ips = vec![Ipv4Addr::new(203, 0, 113, 50)];
        external.external_traffic_local = true;
        // Internal Local with an endpoint on this node: not counted.
        let mut local = fixtures::cluster_ip_service("local", Ipv4Addr::new(10, 96, 0, 3));
        local.internal_traffic_local = true;
        let slices = [
            remote(fixtures::ready_slice(
                "internal-1",
                "internal",
                &[Ipv4Addr::new(10, 0, 0, 1)],
            )),
            remote(fixtures::ready_slice(
                "external-1",
                "external",
                &[Ipv4Addr::new(10, 0, 0, 2)],
            )),
            fixtures::ready_slice("local-1", "local", &[Ipv4Addr::new(10, 0, 0, 3)]),
        ];
        let mut snapshot = fixtures::snapshot();
        for service in [internal, external, local] {
            snapshot
                .services
                .insert(service.key.clone(), Arc::new(service));
        }
        for slice in slices {
            snapshot.slices.insert(slice.key.clone(), Arc::new(slice));
        }
        assert_eq!(without_local_endpoints(&desired_state(&snapshot)), (1, 1));
    }

    #[test]
    fn conntrack_gc_metrics_are_exposed() {
        let metrics = Metrics::new(PathBuf::from("/nonexistent"), SourceStatus::default());
        metrics.observe_conntrack_gc(&GcReport {
            scanned: 10,
            entries: 7,
            replies: 6,
            capacity: 262_144,
            idle_timeout: 2,
            backend_gone: 1,
            busy: 0,
            orphans_removed: 4,
            duration: Duration::from_millis(2),
        });
        let text = metrics.render().unwrap();
        for name in [
            "ebpf_proxy_conntrack_entries 7",
            "ebpf_proxy_conntrack_capacity 262144",
            "ebpf_proxy_conntrack_gc_runs_total 1",
            "ebpf_proxy_conntrack_gc_expired_total{reason=\"idle_timeout\"} 2",
            "ebpf_proxy_conntrack_gc_expired_total{reason=\"backend_gone\"} 1",
            "ebpf_proxy_conntrack_gc_orphan_replies_removed_total 4",
            "ebpf_proxy_conntrack_gc_duration_seconds_count 1",
            "ebpf_proxy_map_entries{map=\"lb4_ct\"} 7",
            "ebpf_proxy_map_entries{map=\"lb4_ct_reply\"} 6",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn stale_socket_counter_has_a_protocol_label() {
        let metrics = Metrics::new(PathBuf::from("/nonexistent"), SourceStatus::default());
        metrics.count_stale_sockets("udp", 2);
        metrics.count_stale_sockets("udp", 1);
        let text = metrics.render().unwrap();
        let line = "ebpf_proxy_stale_sockets_destroyed_total{protocol=\"udp\"} 3";
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }

    /// Every datapath counter, the packet datapath's included, under its
    /// name: what the collector encodes from `inspect::counters`.
    #[test]
    fn every_datapath_counter_is_exposed_by_name() {
        #[derive(Debug)]
        struct Fixed(Vec<CounterRow>);
        impl Collector for Fixed {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                encode_events(&mut encoder, &self.0)
            }
        }
        let rows = proxy_common::Counter::ALL
            .iter()
            .map(|counter| CounterRow {
                name: counter.name(),
                value: u64::from(*counter as u32) + 1,
            })
            .collect();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(rows)));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for counter in proxy_common::Counter::ALL {
            let line = format!(
                "ebpf_proxy_datapath_events_total{{event=\"{}\"}} {}",
                counter.name(),
                counter as u32 + 1
            );
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("event=\"dropped_conntrack_full\"} 14"));
    }
}
