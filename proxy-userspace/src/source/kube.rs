//! The Kubernetes source: watches Services and EndpointSlices with
//! kube-proxy's label selector (rule 1) and this node's Node object, through
//! kube-runtime watchers (list, then watch; relist on 410 Gone or a broken
//! connection; retries with backoff).
//!
//! Objects are validated as they arrive and kept only in validated form.
//! A (re)list is collected aside and swapped in whole at its end, so a
//! relist is a full resync that also removes what vanished, and nothing is
//! published before both initial lists are complete (rule 3). The first
//! complete view and every relist are published whole; after that only
//! the objects a batch of events touched, so a change costs what it
//! changes also on its way to the planner. An object
//! that fails validation keeps its last good version and is reported once
//! per resourceVersion.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use anyhow::Context;
use futures::{FutureExt, Stream, StreamExt, stream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};

use super::{SourceStatus, SourceUpdate, UpdateSender};
use crate::collections::Compact;
use crate::model::{
    Changes, ClusterSnapshot, NodeInfo, ObjectKey, ServiceInfo, SliceInfo,
    objects::{self, Admission, InvalidObject},
};

/// How often a failing watch's resource is probed for recovery.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// kube-proxy's selector, for Services and EndpointSlices alike (rule 1).
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// What the agent asks of the API server: the ClusterRole in `deploy/`
/// grants exactly this (a test checks it).
pub const API_ACCESS: [ApiAccess; 3] = [
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// One watch event or failure, of any of the three watches (boxed:
/// objects are large and differ in size).
enum Update {
    Service(Result<Box<watcher::Event<Service>>, watcher::Error>),
    Slice(Result<Box<watcher::Event<EndpointSlice>>, watcher::Error>),
    Node(Result<Box<watcher::Event<Node>>, watcher::Error>),
}

pub struct KubeSource {
    client: Client,
    node_name: String,
    services: Store<ServiceInfo>,
    slices: Store<SliceInfo>,
    nodes: Store<NodeInfo>,
    /// Whether the first complete view went out.
    published: bool,
}

impl KubeSource {
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        Self {
            client,
            node_name: node_name.into(),
            services: Store::new("Service", "services"),
            slices: Store::new("EndpointSlice", "endpointslices"),
            nodes: Store::new("Node", "nodes"),
            published: false,
        }
    }

    fn updates(&self) -> impl Stream<Item = Update> + use<> {
        let selected = || watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
        let services = watcher(Api::<Service>::all(self.client.clone()), selected())
            .default_backoff()
            .map(|event| Update::Service(event.map(Box::new)));
        let slices = watcher(Api::<EndpointSlice>::all(self.client.clone()), selected())
            .default_backoff()
            .map(|event| Update::Slice(event.map(Box::new)));
        let node_config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.node_name));
        let nodes = watcher(Api::<Node>::all(self.client.clone()), node_config)
            .default_backoff()
            .map(|event| Update::Node(event.map(Box::new)));
        stream::select(services, stream::select(slices, nodes))
    }

    /// Watches forever. Publishes a snapshot once every initial list is in,
    /// then what each batch of events changed (a relist: a snapshot again);
    /// reports watch failures (which the watchers retry) through `status`.
    /// Ends when the receiver is gone.
    pub async fn run(mut self, updates_out: UpdateSender, status: SourceStatus) {
        let mut updates = std::pin::pin!(self.updates());
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        loop {
            let first = tokio::select! {
                update = updates.next() => match update {
                    Some(update) => update,
                    None => return,
                },
                _ = probe.tick() => {
                    self.probe_failing(&status).await;
                    continue;
                }
            };
            let mut changed = self.handle(first, &status);
            // Apply everything already waiting before publishing: one
            // snapshot per burst, not per object.
            while let Some(Some(next)) = updates.next().now_or_never() {
                changed |= self.handle(next, &status);
            }
            if changed && self.is_listed() && updates_out.send(self.update()).is_err() {
                return;
            }
        }
    }

    /// A watch that reconnects after a failure emits nothing until an
    /// object changes (bookmarks are not events), so recovery is confirmed
    /// by a one-item list of the failing resource, with its selector.
    async fn probe_failing(&self, status: &SourceStatus) {
        for part in status.failing_parts() {
            let selected = ListParams::default().labels(PROXY_LABEL_SELECTOR).limit(1);
            let probe = match part {
                "services" => Api::<Service>::all(self.client.clone())
                    .list_metadata(&selected)
                    .await
                    .map(drop),
                "endpointslices" => Api::<EndpointSlice>::all(self.client.clone())
                    .list_metadata(&selected)
                    .await
                    .map(drop),
                "nodes" => {
                    let own = ListParams::default()
                        .fields(&format!("metadata.name={}", self.node_name))
                        .limit(1);
                    Api::<Node>::all(self.client.clone())
                        .list_metadata(&own)
                        .await
                        .map(drop)
                }
                _ => continue,
            };
            if probe.is_ok() {
                status.ok(part);
            }
        }
    }

    fn is_listed(&self) -> bool {
        self.services.listed && self.slices.listed && self.nodes.listed
    }

    /// Applies one event; true when the published state may have changed.
    fn handle(&mut self, update: Update, status: &SourceStatus) -> bool {
        match update {
            Update::Service(event) => self
                .services
                .handle(event, status, |svc| objects::service(svc).map(admitted)),
            Update::Slice(event) => self.slices.handle(event, status, |slice| {
                objects::endpoint_slice(slice).map(admitted)
            }),
            Update::Node(event) => self
                .nodes
                .handle(event, status, |node| objects::node(node).map(Some)),
        }
    }

    /// What to publish now: everything after a (re)list or the first
    /// time, else the objects touched since the last update.
    fn update(&mut self) -> SourceUpdate {
        let whole = [
            self.services.take_relisted(),
            self.slices.take_relisted(),
            self.nodes.take_relisted(),
        ]
        .contains(&true)
            || !self.published;
        self.published = true;
        let services = self.services.take_touched();
        let slices = self.slices.take_touched();
        let node_touched = !self.nodes.take_touched().is_empty();
        if whole {
            return SourceUpdate::Snapshot(ClusterSnapshot {
                node_name: self.node_name.clone(),
                node: self.own_node(),
                services: self.services.live.clone(),
                slices: self.slices.live.clone(),
                ..ClusterSnapshot::default()
            });
        }
        SourceUpdate::Changes(Changes {
            services,
            slices,
            node: node_touched.then(|| self.own_node()),
            ..Changes::default()
        })
    }

    fn own_node(&self) -> Option<NodeInfo> {
        self.nodes
            .live
            .values()
            .find(|node| node.name == self.node_name)
            .map(|node| NodeInfo::clone(node))
    }
}

fn admitted<T>(admission: Admission<T>) -> Option<T> {
    match admission {
        Admission::Proxied(object) => Some(object),
        Admission::Ignored(reason) => {
            tracing::debug!(%reason, "object not proxied");
            None
        }
    }
}

/// Validated objects of one kind, as the API server last listed and
/// watched them.
struct Store<T> {
    kind: &'static str,
    /// The API resource, naming this watch in health reports.
    resource: &'static str,
    /// Shared with the snapshots published: an object is copied once, when
    /// it changes.
    live: BTreeMap<ObjectKey, Arc<T>>,
    /// A list in progress; swapped in whole when it completes.
    listing: Option<BTreeMap<ObjectKey, Arc<T>>>,
    listed: bool,
    /// A list was swapped in since the last update: publish everything.
    relisted: bool,
    /// Keys whose live object changed since the last update.
    touched: BTreeSet<ObjectKey>,
    /// Invalid versions already reported, so each is logged once.
    reported: BTreeSet<(ObjectKey, String)>,
}

impl<T: Clone + Keyed> Store<T> {
    fn new(kind: &'static str, resource: &'static str) -> Self {
        Self {
            kind,
            resource,
            live: BTreeMap::new(),
            listing: None,
            listed: false,
            relisted: false,
            touched: BTreeSet::new(),
            reported: BTreeSet::new(),
        }
    }

    fn take_relisted(&mut self) -> bool {
        std::mem::take(&mut self.relisted)
    }

    /// The objects touched since the last update, as they are now.
    fn take_touched(&mut self) -> Vec<(ObjectKey, Option<Arc<T>>)> {
        std::mem::take(&mut self.touched)
            .into_iter()
            .map(|key| {
                let now = self.live.get(&key).cloned();
                (key, now)
            })
            .collect()
    }

    /// Applies one event of this kind's watch, or records its failure
    /// (the watcher retries with backoff).
    fn handle<K: Resource>(
        &mut self,
        event: Result<Box<watcher::Event<K>>, watcher::Error>,
        status: &SourceStatus,
        validate: impl Fn(&K) -> Result<Option<T>, InvalidObject>,
    ) -> bool {
        let event = match event {
            Ok(event) => {
                status.ok(self.resource);
                *event
            }
            Err(err) => {
                status.failing(
                    self.resource,
                    format!("watch failed, retrying with backoff: {err}"),
                );
                return false;
            }
        };
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) | watcher::Event::Apply(object) => {
                self.apply(&object, validate(&object), status);
                self.listing.is_none()
            }
            watcher::Event::Delete(object) => {
                let key = object_key(&object);
                self.reported.retain(|(reported, _)| *reported != key);
                let removed = self.live.remove(&key).is_some();
                if removed {
                    self.touched.insert(key);
                }
                removed
            }
            watcher::Event::InitDone => {
                if let Some(mut listed) = self.listing.take() {
                    listed.compact();
                    self.live = listed;
                    self.relisted = true;
                }
                self.reported.retain(|(key, _)| self.live.contains_key(key));
                self.listed = true;
                true
            }
        }
    }

    fn apply<K: Resource>(
        &mut self,
        object: &K,
        outcome: Result<Option<T>, InvalidObject>,
        status: &SourceStatus,
    ) {
        let key = object_key(object);
        let entry = match outcome {
            Ok(valid) => {
                self.reported.retain(|(reported, _)| *reported != key);
                valid.map(Arc::new)
            }
            Err(reason) => {
                let version = object.meta().resource_version.clone().unwrap_or_default();
                let last_good = self.live.get(&key).cloned();
                if self.reported.insert((key.clone(), version.clone())) {
                    status.count_invalid(self.kind);
                    tracing::warn!(
                        kind = self.kind,
                        object = %key,
                        resource_version = %version,
                        %reason,
                        kept_last_good = last_good.is_some(),
                        "invalid object skipped"
                    );
                }
                last_good
            }
        };
        // The validated object's own key, so the key is stored once.
        let key = match entry.as_deref().and_then(Keyed::own_key) {
            Some(own) if *own == key => own.clone(),
            _ => key,
        };
        if self.listing.is_none() {
            self.touched.insert(key.clone());
        }
        let target = self.listing.as_mut().unwrap_or(&mut self.live);
        match entry {
            Some(entry) => target.insert(key, entry),
            None => target.remove(&key),
        };
    }
}

/// A validated object that carries its key.
trait Keyed {
    fn own_key(&self) -> Option<&ObjectKey>;
}

impl Keyed for ServiceInfo {
    fn own_key(&self) -> Option<&ObjectKey> {
        Some(&self.key)
    }
}

impl Keyed for SliceInfo {
    fn own_key(&self) -> Option<&ObjectKey> {
        Some(&self.key)
    }
}

/// Nodes are keyed by name only.
impl Keyed for NodeInfo {
    fn own_key(&self) -> Option<&ObjectKey> {
        None
    }
}

fn object_key<K: Resource>(object: &K) -> ObjectKey {
    // As the model keys objects; Nodes are cluster-scoped and keyed by name.
    ObjectKey::new(
        object.namespace().unwrap_or_else(|| "default".into()),
        object.name_any(),
    )
}

/// A client from a kubeconfig file, or from the in-cluster configuration.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
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
    Client::try_from(config).context("building the Kubernetes client")
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock;

    use super::*;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;
    type Responder = mock::SendResponse<Response<Body>>;

    fn list(kind: &str, api_version: &str, items: serde_json::Value) -> Response<Body> {
        let body = json!({
            "kind": kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": "1"},
            "items": items,
        });
        Response::new(Body::from(body.to_string().into_bytes()))
    }

    fn query(request: &Request<Body>) -> BTreeMap<String, String> {
        let query = request.uri().query().unwrap_or("");
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    /// The three initial LISTs, by path, in whatever order the watchers
    /// sent them.
    async fn initial_lists(
        handle: &mut Handle,
    ) -> BTreeMap<String, (BTreeMap<String, String>, Responder)> {
        let mut lists = BTreeMap::new();
        while lists.len() < 3 {
            let (request, respond) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), http::Method::GET);
            let query = query(&request);
            assert!(
                !query.contains_key("watch"),
                "a list comes first: {query:?}"
            );
            lists.insert(request.uri().path().to_string(), (query, respond));
        }
        lists
    }

    fn service() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "demo", "resourceVersion": "1"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
        })
    }

    #[tokio::test]
    async fn rules_01_03_selectors_and_nothing_published_before_every_list() {
        let (service_mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service_mock, "default");
        let (updates, mut published) = tokio::sync::mpsc::unbounded_channel();
        let source =
            tokio::spawn(KubeSource::new(client, "node-1").run(updates, SourceStatus::default()));

        let mut lists = initial_lists(&mut handle).await;
        let (services_query, services) = lists.remove("/api/v1/services").expect("services listed");
        let (slices_query, slices) = lists
            .remove("/apis/discovery.k8s.io/v1/endpointslices")
            .expect("endpointslices listed");
        let (nodes_query, nodes) = lists.remove("/api/v1/nodes").expect("nodes listed");
        assert_eq!(services_query["labelSelector"], PROXY_LABEL_SELECTOR);
        assert_eq!(slices_query["labelSelector"], PROXY_LABEL_SELECTOR);
        assert_eq!(nodes_query["fieldSelector"], "metadata.name=node-1");
        assert!(!nodes_query.contains_key("labelSelector"));

        services.send_response(list("ServiceList", "v1", json!([service()])));
        nodes.send_response(list("NodeList", "v1", json!([])));
        // Their watches start and stay open (unanswered); the slices list is still out.
        let mut open_watches = Vec::new();
        for _ in 0..2 {
            let (request, respond) = handle.next_request().await.expect("a watch");
            assert_eq!(
                query(&request).get("watch").map(String::as_str),
                Some("true")
            );
            open_watches.push(respond);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            published.try_recv().is_err(),
            "rule 3: nothing before the EndpointSlice list"
        );

        slices.send_response(list("EndpointSliceList", "discovery.k8s.io/v1", json!([])));
        let update = tokio::time::timeout(Duration::from_secs(5), published.recv())
            .await
            .expect("published after the last list")
            .expect("the source runs");
        let SourceUpdate::Snapshot(snapshot) = update else {
            panic!("the first update is a whole snapshot: {update:?}");
        };
        assert_eq!(snapshot.services.len(), 1);
        assert_eq!(snapshot.node_name, "node-1");
        source.abort();
        drop(open_watches);
    }
}
