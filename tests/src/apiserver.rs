//! An API server double for the Kubernetes source (DESIGN.md, testing
//! layer 5): HTTP/1.1 (hyper) on 127.0.0.1 inside a test's network
//! namespace, speaking the real list/watch protocol for Services,
//! EndpointSlices and Nodes.
//!
//! - One global resourceVersion counter; every [`ApiServer::apply`] and
//!   [`ApiServer::delete`] takes the next value and records a watch event.
//! - LIST: `{"kind":"ServiceList","apiVersion":"v1","metadata":
//!   {"resourceVersion":"N","continue":"..."},"items":[...]}`, filtered by
//!   `labelSelector` (`key`, `!key`, `key=value`, `key==value`,
//!   `key!=value`, comma-separated) and `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`), paginated with `limit` and `continue`.
//! - WATCH (`watch=true|1`): a chunked stream of one JSON event per chunk
//!   and line. Starts after `resourceVersion` (replays newer events; none
//!   or "0" starts with a synthetic ADDED per object), answers one ERROR
//!   410 `Expired` when that version was compacted away, applies selectors
//!   per watch as the real API server does (starts matching: ADDED, stops
//!   matching: DELETED), sends a BOOKMARK every second when
//!   `allowWatchBookmarks=true` and ends after `timeoutSeconds`.
//! - Faults: [`ApiServer::compact`], [`ApiServer::drop_connections`],
//!   [`ApiServer::fail_requests`], [`ApiServer::fail_matching`],
//!   [`ApiServer::set_down`].
//! - [`ApiServer::requests`]: every request line received.
//!
//! Safety rule: the server binds 127.0.0.1 inside the test's namespace
//! (its thread enters it with `setns`, then runs a current-thread tokio
//! runtime); nothing listens in the root namespace.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    io::{self, Write},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, mpsc},
    task::{Context as TaskContext, Poll},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{Either, Full};
use hyper::{
    StatusCode,
    body::{Body, Bytes, Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc as chan, oneshot, watch};

use crate::{Agent, Netns, enter_netns, manifests::yaml_options};

/// How long the accept loop rests after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Bookmarks go out this often on watches that allow them.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// The kinds the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// `kind` as written in objects.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The plural resource name in URLs.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The URL prefix of the resource's API group version.
    fn group_prefix(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "/api/v1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// One request as received: method, path and query (decoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// `METHOD target` exactly as received (query not decoded).
    pub line: String,
}

impl Request {
    /// `target` is the request target as received: path and query.
    fn new(method: &str, target: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.to_string(),
            path: percent_encoding::percent_decode_str(path)
                .decode_utf8_lossy()
                .into_owned(),
            query: form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
            line: format!("{method} {target}"),
        }
    }

    /// The (first) decoded value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `watch=true` or `watch=1`.
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }

    /// The resource a collection request addresses: its kind and the
    /// namespace (`None`: cluster-wide).
    pub fn collection(&self) -> Option<(Kind, Option<String>)> {
        let segments: Vec<&str> = self.path.trim_end_matches('/').split('/').collect();
        let (prefix, rest) = match segments.as_slice() {
            ["", "api", "v1", rest @ ..] => ("/api/v1", rest),
            ["", "apis", "discovery.k8s.io", "v1", rest @ ..] => {
                ("/apis/discovery.k8s.io/v1", rest)
            }
            _ => return None,
        };
        let (namespace, resource) = match rest {
            [resource] => (None, *resource),
            ["namespaces", namespace, resource] => (Some(namespace.to_string()), *resource),
            _ => return None,
        };
        let kind = Kind::ALL
            .into_iter()
            .find(|kind| kind.resource() == resource && kind.group_prefix() == prefix)?;
        if namespace.is_some() && !kind.namespaced() {
            return None;
        }
        Some((kind, namespace))
    }

    /// The kind this request addresses, if any.
    pub fn kind(&self) -> Option<Kind> {
        self.collection().map(|(kind, _)| kind)
    }
}

/// The decoded value of query parameter `key` in a request line as
/// returned by [`ApiServer::requests`].
pub fn query_param(request_line: &str, key: &str) -> Option<String> {
    let (method, target) = request_line.split_once(' ')?;
    Request::new(method, target).param(key).map(str::to_string)
}

/// One requirement of a label or field selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Requirement {
    fn parse(term: &str) -> Result<Requirement, String> {
        let term = term.trim();
        let valid_key = |key: &str| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        let requirement = if let Some(key) = term.strip_prefix('!') {
            Requirement::NotExists(key.trim().to_string())
        } else if let Some((key, value)) = term.split_once("!=") {
            Requirement::NotEquals(key.trim().to_string(), value.trim().to_string())
        } else if let Some((key, value)) = term.split_once("==") {
            Requirement::Equals(key.trim().to_string(), value.trim().to_string())
        } else if let Some((key, value)) = term.split_once('=') {
            Requirement::Equals(key.trim().to_string(), value.trim().to_string())
        } else {
            Requirement::Exists(term.to_string())
        };
        let key = match &requirement {
            Requirement::Exists(k)
            | Requirement::NotExists(k)
            | Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _) => k,
        };
        if valid_key(key) {
            Ok(requirement)
        } else {
            Err(format!("unable to parse requirement {term:?}"))
        }
    }

    fn matches(&self, value_of: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Exists(k) => value_of(k).is_some(),
            Requirement::NotExists(k) => value_of(k).is_none(),
            Requirement::Equals(k, v) => value_of(k).as_deref() == Some(v),
            Requirement::NotEquals(k, v) => value_of(k).as_deref() != Some(v),
        }
    }
}

/// What one list or watch selects: namespace, labels and fields.
#[derive(Clone, Debug, Default)]
struct Selector {
    namespace: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selector {
    fn from_request(request: &Request, namespace: Option<String>) -> Result<Selector, String> {
        let terms = |param: &str| -> Result<Vec<Requirement>, String> {
            request
                .param(param)
                .unwrap_or("")
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(Requirement::parse)
                .collect()
        };
        let fields = terms("fieldSelector")?;
        for field in &fields {
            match field {
                Requirement::Equals(k, _) | Requirement::NotEquals(k, _)
                    if k == "metadata.name" || k == "metadata.namespace" => {}
                other => {
                    return Err(format!(
                        "field label not supported: {other:?} (only metadata.name and \
                         metadata.namespace with = or !=)"
                    ));
                }
            }
        }
        Ok(Selector {
            namespace,
            labels: terms("labelSelector")?,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        let labels = &meta["labels"];
        let label = |key: &str| labels.get(key).and_then(label_text);
        let field = |key: &str| match key {
            "metadata.name" => Some(meta["name"].as_str().unwrap_or("").to_string()),
            "metadata.namespace" => Some(meta["namespace"].as_str().unwrap_or("").to_string()),
            _ => None,
        };
        self.labels.iter().all(|r| r.matches(label)) && self.fields.iter().all(|r| r.matches(field))
    }
}

fn label_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Where an object lives: kind, namespace ("" for Nodes) and name.
type Key = (Kind, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

/// A recorded change, as the API server's watch cache holds it.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    event_type: EventType,
    /// The new object (for DELETED: the last state with the delete's rv).
    object: Arc<Value>,
    /// The object before the change (MODIFIED and DELETED).
    prev: Option<Arc<Value>>,
}

/// An injected failure: the next `remaining` requests that `matches`
/// accepts answer `status`.
struct Failure {
    remaining: usize,
    status: u16,
    matches: Box<dyn Fn(&Request) -> bool + Send>,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion handed out.
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    events: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    too_old_below: u64,
    /// Events up to this resourceVersion were dropped by compaction.
    dropped_upto: u64,
    failures: Vec<Failure>,
    down: bool,
    requests: Vec<Request>,
    open_watches: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Marked on every change of `state` that a watch may care about.
    changed: watch::Sender<()>,
    /// Bumped to close every open connection.
    kills: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify_watches(&self) {
        self.changed.send_modify(|()| {});
    }

    fn kill_connections(&self) {
        self.kills.send_modify(|generation| *generation += 1);
    }
}

/// Objects for [`ApiServer::apply`]: YAML or JSON text (one or more
/// documents), or `serde_json::Value`s.
pub trait IntoObjects {
    fn into_objects(self) -> Result<Vec<Value>>;
}

impl IntoObjects for &str {
    fn into_objects(self) -> Result<Vec<Value>> {
        let mut objects = Vec::new();
        let mut reader = self.as_bytes();
        // Empty documents yield nothing.
        for document in serde_saphyr::read_with_options(&mut reader, yaml_options()) {
            match document.context("not valid YAML")? {
                Value::Array(items) => objects.extend(items),
                value => objects.push(value),
            }
        }
        Ok(objects)
    }
}

impl IntoObjects for &String {
    fn into_objects(self) -> Result<Vec<Value>> {
        self.as_str().into_objects()
    }
}

impl IntoObjects for String {
    fn into_objects(self) -> Result<Vec<Value>> {
        self.as_str().into_objects()
    }
}

impl IntoObjects for Value {
    fn into_objects(self) -> Result<Vec<Value>> {
        Ok(vec![self])
    }
}

impl IntoObjects for &Value {
    fn into_objects(self) -> Result<Vec<Value>> {
        Ok(vec![self.clone()])
    }
}

impl IntoObjects for Vec<Value> {
    fn into_objects(self) -> Result<Vec<Value>> {
        Ok(self)
    }
}

/// The API server double. Drop stops it: its runtime ends, closing the
/// listener and every connection, and its thread is joined.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds 127.0.0.1:0 inside `netns` (from a thread that enters it) and
    /// serves from there.
    pub fn start(netns: &Netns) -> Result<ApiServer> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(()),
            kills: watch::Sender::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = oneshot::channel();
        let name = netns.name().to_string();
        let thread_shared = shared.clone();
        let server = thread::Builder::new()
            .name(format!("apiserver-{name}"))
            .spawn(move || {
                let bound = enter_netns(&name).and_then(|()| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("tokio runtime")?;
                    let listener = runtime
                        .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
                        .context("bind 127.0.0.1:0")?;
                    Ok((runtime, listener))
                });
                match bound {
                    Ok((runtime, listener)) => {
                        let _ = tx.send(listener.local_addr().map_err(anyhow::Error::from));
                        runtime.block_on(async {
                            tokio::select! {
                                () = accept_loop(listener, thread_shared) => {}
                                _ = stopped => {}
                            }
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let addr = rx
            .recv()
            .map_err(|_| anyhow!("API server thread died"))?
            .with_context(|| format!("start the API server double in netns {}", netns.name()))?;
        Ok(ApiServer {
            shared,
            addr,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// `127.0.0.1:PORT`, inside the namespace.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `<dir>/kubeconfig.yaml` pointing at this server (plain HTTP,
    /// no credentials) and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n\
             current-context: double\nusers:\n- name: double\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces each object (YAML/JSON text with one or more
    /// documents, or `Value`s): sets `metadata.resourceVersion` (and `uid`,
    /// `creationTimestamp`, the namespace "default" if missing), records
    /// ADDED or MODIFIED. Returns the last resourceVersion.
    ///
    /// # Panics
    /// On unparsable text or objects of a kind the double does not serve
    /// (test input errors).
    pub fn apply(&self, objects: impl IntoObjects) -> u64 {
        let objects = objects.into_objects().expect("objects to apply");
        let mut state = self.shared.state();
        for object in objects {
            apply_one(&mut state, object);
        }
        let rv = state.rv;
        drop(state);
        self.shared.notify_watches();
        rv
    }

    /// Deletes an object: records DELETED (the last state with a fresh
    /// resourceVersion). `kind` as in objects ("Service", "EndpointSlice",
    /// "Node"); `namespace` is ignored for Nodes. Returns the delete's
    /// resourceVersion, or `None` when there was no such object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let kind = Kind::from_name(kind).unwrap_or_else(|| panic!("unknown kind {kind:?}"));
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = (kind, namespace.to_string(), name.to_string());
        let mut state = self.shared.state();
        let prev = state.objects.remove(&key)?;
        state.rv += 1;
        let rv = state.rv;
        let mut object = (*prev).clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.events.push(Event {
            rv,
            kind,
            event_type: EventType::Deleted,
            object: Arc::new(object),
            prev: Some(prev),
        });
        drop(state);
        self.shared.notify_watches();
        Some(rv)
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = Kind::from_name(kind)?;
        let namespace = if kind.namespaced() { namespace } else { "" };
        let state = self.shared.state();
        state
            .objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .map(|object| (**object).clone())
    }

    /// The current (last handed out) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }

    /// Compaction: every resourceVersion before now becomes too old. The
    /// counter moves on by one, so a watch resumed from any version a
    /// client has seen gets 410 Gone (the client must relist); watches
    /// still open keep streaming.
    pub fn compact(&self) {
        let mut state = self.shared.state();
        state.rv += 1;
        state.too_old_below = state.rv;
        if let Some(last) = state.events.last() {
            state.dropped_upto = last.rv;
        }
        state.events.clear();
        drop(state);
        self.shared.notify_watches();
    }

    /// Closes every open connection (lists and watches) abruptly.
    pub fn drop_connections(&self) {
        self.shared.kill_connections();
    }

    /// The next `n` requests (any) answer `status` with a `Status` body.
    pub fn fail_requests(&self, n: usize, status: u16) {
        self.fail_matching(n, status, |_| true);
    }

    /// The next `n` requests that `matches` accepts answer `status` with a
    /// `Status` body; others are served. Failures queue in order.
    pub fn fail_matching(
        &self,
        n: usize,
        status: u16,
        matches: impl Fn(&Request) -> bool + Send + 'static,
    ) {
        self.shared.state().failures.push(Failure {
            remaining: n,
            status,
            matches: Box::new(matches),
        });
    }

    /// Forgets every injected failure not yet used up.
    pub fn clear_failures(&self) {
        self.shared.state().failures.clear();
    }

    /// While down, every new connection is closed at once; going down
    /// closes the open ones.
    pub fn set_down(&self, down: bool) {
        self.shared.state().down = down;
        if down {
            self.shared.kill_connections();
        }
    }

    /// Request lines received so far (`METHOD path?query`, not decoded).
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .state()
            .requests
            .iter()
            .map(|r| r.line.clone())
            .collect()
    }

    /// Requests received so far, parsed.
    pub fn request_log(&self) -> Vec<Request> {
        self.shared.state().requests.clone()
    }

    /// Watches streaming right now.
    pub fn open_watches(&self) -> usize {
        self.shared.state().open_watches
    }

    /// Waits until `ready` accepts the request log; errors after `timeout`.
    pub fn wait_for_requests(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&[Request]) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if ready(&self.shared.state().requests) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "API server double: timed out waiting for {what}; requests:\n{}",
                    self.requests().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `n` or more watches are open.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while self.open_watches() < n {
            if start.elapsed() > timeout {
                bail!(
                    "API server double: {} watches open after {timeout:?}, wanted {n}; requests:\n{}",
                    self.open_watches(),
                    self.requests().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Spawns `ebpf-proxy agent --kubeconfig KUBECONFIG` in `netns` (see
/// [`Agent::start_with_args`]), plus `extra_args` (e.g.
/// `["--health-timeout", "2s"]`).
pub fn start_agent_with_kubeconfig(
    netns: &Netns,
    kubeconfig: &Path,
    cgroup: &Path,
    bpffs: &Path,
    node_name: &str,
    extra_args: &[&str],
) -> Result<Agent> {
    let kubeconfig = kubeconfig.to_string_lossy();
    let mut args = vec!["--kubeconfig", kubeconfig.as_ref()];
    args.extend_from_slice(extra_args);
    Agent::start_with_args(netns, &args, cgroup, bpffs, node_name)
}

fn apply_one(state: &mut State, mut object: Value) {
    let kind_name = object["kind"].as_str().unwrap_or("").to_string();
    let kind = Kind::from_name(&kind_name).unwrap_or_else(|| {
        panic!("the API server double does not serve kind {kind_name:?}: {object}")
    });
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| panic!("object without metadata.name: {object}"))
        .to_string();
    let namespace = if kind.namespaced() {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default")
            .to_string();
        object["metadata"]["namespace"] = json!(ns);
        ns
    } else {
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("namespace");
        }
        String::new()
    };
    if object.get("apiVersion").is_none() {
        object["apiVersion"] = json!(kind.api_version());
    }
    let key = (kind, namespace, name);
    let prev = state.objects.get(&key).cloned();
    state.rv += 1;
    let rv = state.rv;
    let meta = &mut object["metadata"];
    meta["resourceVersion"] = json!(rv.to_string());
    let kept = |field: &str| {
        prev.as_ref()
            .and_then(|p| p["metadata"].get(field).cloned())
    };
    if meta.get("uid").is_none() {
        meta["uid"] =
            kept("uid").unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{rv:012x}")));
    }
    if meta.get("creationTimestamp").is_none() {
        meta["creationTimestamp"] =
            kept("creationTimestamp").unwrap_or_else(|| json!("2025-01-01T00:00:00Z"));
    }
    let object = Arc::new(object);
    state.objects.insert(key, object.clone());
    state.events.push(Event {
        rv,
        kind,
        event_type: if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        },
        object,
        prev,
    });
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("proxy-tests: API server double: accept: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Subscribed before looking at `down`: any later kill closes it.
        let mut kills = shared.kills.subscribe();
        if shared.state().down {
            continue;
        }
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| std::future::ready(respond(&shared, &request)));
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // A kill drops the connection: its socket closes mid-stream.
            // Checked first, so no poll after a kill writes one more event.
            tokio::select! {
                biased;
                _ = kills.changed() => {}
                _ = connection => {}
            }
        });
    }
}

/// A list or failure answer, or a watch stream.
type ApiBody = Either<Full<Bytes>, WatchBody>;

/// One request; an error (the double is down) closes the connection
/// without an answer.
fn respond(
    shared: &Arc<Shared>,
    request: &hyper::Request<Incoming>,
) -> io::Result<hyper::Response<ApiBody>> {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |target| target.as_str());
    let request = Request::new(request.method().as_str(), target);
    let failure = {
        let mut state = shared.state();
        if state.down {
            return Err(io::Error::other("the API server double is down"));
        }
        state.requests.push(request.clone());
        state
            .failures
            .iter_mut()
            .find(|f| f.remaining > 0 && (f.matches)(&request))
            .map(|f| {
                f.remaining -= 1;
                f.status
            })
    };
    if let Some(code) = failure {
        return Ok(status_response(code, &format!("injected failure {code}")));
    }
    if request.method != "GET" {
        let message = format!("method {} not allowed by the double", request.method);
        return Ok(status_response(405, &message));
    }
    let Some((kind, namespace)) = request.collection() else {
        let message = format!(
            "the server could not find the requested resource ({})",
            request.path
        );
        return Ok(status_response(404, &message));
    };
    let selector = match Selector::from_request(&request, namespace) {
        Ok(selector) => selector,
        Err(message) => return Ok(status_response(400, &message)),
    };
    if request.is_watch() {
        return Ok(watch(shared, kind, selector, &request));
    }
    Ok(match list(shared, kind, &selector, &request) {
        Ok(body) => json_response(200, Either::Left(Full::new(body.into()))),
        Err((code, message)) => status_response(code, &message),
    })
}

fn json_response(code: u16, body: ApiBody) -> hyper::Response<ApiBody> {
    let mut response = hyper::Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A `metav1.Status` failure answer.
fn status_response(code: u16, message: &str) -> hyper::Response<ApiBody> {
    json_response(
        code,
        Either::Left(Full::new(status_body(code, message).into())),
    )
}

fn list(
    shared: &Shared,
    kind: Kind,
    selector: &Selector,
    request: &Request,
) -> Result<Vec<u8>, (u16, String)> {
    let limit = match request.param("limit") {
        None | Some("") => usize::MAX,
        Some(limit) => match limit.parse::<usize>() {
            Ok(0) => usize::MAX,
            Ok(n) => n,
            Err(_) => return Err((400, format!("invalid limit {limit:?}"))),
        },
    };
    let continue_from = match request.param("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => Some(
            decode_continue(token)
                .ok_or_else(|| (400, format!("invalid continue token {token:?}")))?,
        ),
    };
    let (list_rv, items, more) = {
        let state = shared.state();
        let list_rv = match &continue_from {
            Some((rv, _, _)) if *rv < state.too_old_below => {
                return Err((
                    410,
                    format!("the provided continue parameter is too old (resourceVersion {rv})"),
                ));
            }
            Some((rv, _, _)) => *rv,
            None => state.rv,
        };
        let start = match &continue_from {
            Some((_, ns, name)) => std::ops::Bound::Excluded((kind, ns.clone(), name.clone())),
            None => std::ops::Bound::Included((kind, String::new(), String::new())),
        };
        let mut selected = state
            .objects
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|((k, _, _), _)| *k == kind)
            .filter(|(_, object)| selector.matches(object));
        let items: Vec<(Key, Arc<Value>)> = selected
            .by_ref()
            .take(limit)
            .map(|(key, object)| (key.clone(), object.clone()))
            .collect();
        let more = selected.next().is_some();
        (list_rv, items, more)
    };
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if more && let Some(((_, ns, name), _)) = items.last() {
        metadata["continue"] = json!(encode_continue(list_rv, ns, name));
    }
    let mut body = Vec::new();
    write!(
        body,
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{metadata},\"items\":[",
        kind.name(),
        kind.api_version()
    )
    .expect("write to a Vec");
    for (i, (_, object)) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &**object).expect("serialize an object");
    }
    body.extend_from_slice(b"]}");
    Ok(body)
}

/// A watch stream: one chunk per event line, ended when its sender is.
struct WatchBody(chan::Receiver<Bytes>);

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|line| line.map(|line| Ok(Frame::data(line))))
    }
}

/// What one watch asked for.
struct WatchRequest {
    kind: Kind,
    selector: Selector,
    bookmarks: bool,
    initial_events: bool,
    /// Where to start: `None` for the current state as ADDED events.
    from: Option<u64>,
    deadline: Option<tokio::time::Instant>,
}

/// Starts a watch stream; its events are produced by a task of their own,
/// which ends with the stream or when the client is gone.
fn watch(
    shared: &Arc<Shared>,
    kind: Kind,
    selector: Selector,
    request: &Request,
) -> hyper::Response<ApiBody> {
    let from = match request.param("resourceVersion") {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return status_response(400, &format!("invalid resourceVersion {rv:?}")),
        },
    };
    let watch = WatchRequest {
        kind,
        selector,
        bookmarks: matches!(request.param("allowWatchBookmarks"), Some("true" | "1")),
        initial_events: matches!(request.param("sendInitialEvents"), Some("true" | "1")),
        from,
        deadline: request
            .param("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| *t > 0)
            .map(|t| tokio::time::Instant::now() + Duration::from_secs(t)),
    };
    // Counted open before the answer's head goes out.
    let open = OpenWatch::new(shared.clone());
    let (lines, body) = chan::channel(64);
    tokio::spawn(stream_events(shared.clone(), watch, lines, open));
    json_response(200, Either::Right(WatchBody(body)))
}

async fn stream_events(
    shared: Arc<Shared>,
    watch: WatchRequest,
    lines: chan::Sender<Bytes>,
    _open: OpenWatch,
) {
    let kind = watch.kind;
    // Subscribed before the state is read: no change is missed.
    let mut changes = shared.changed.subscribe();
    // Where the stream starts, decided under the lock.
    let start = {
        let state = shared.state();
        match watch.from {
            Some(rv) if rv < state.too_old_below || rv < state.dropped_upto => Err(format!(
                "too old resource version: {rv} ({})",
                state.too_old_below
            )),
            Some(rv) if !watch.initial_events => Ok((rv, Vec::new())),
            _ => {
                // No version (or "0"): the current state as ADDED events.
                let added: Vec<Vec<u8>> = state
                    .objects
                    .iter()
                    .filter(|((k, _, _), object)| *k == kind && watch.selector.matches(object))
                    .map(|(_, object)| event_line("ADDED", object))
                    .collect();
                Ok((state.rv, added))
            }
        }
    };
    let (mut cursor, mut pending) = match start {
        Ok(start) => start,
        Err(message) => {
            let _ = lines.send(gone_line(&message).into()).await;
            return;
        }
    };
    if watch.initial_events {
        pending.push(bookmark_line(kind, cursor, true));
    }
    let mut next_bookmark = tokio::time::Instant::now() + BOOKMARK_INTERVAL;
    loop {
        // Events newer than the cursor, then (when due) a bookmark at it.
        let compacted = {
            let state = shared.state();
            if cursor < state.dropped_upto {
                // Compaction removed events this watch had not sent.
                pending.push(gone_line(&format!(
                    "too old resource version: {cursor} ({})",
                    state.too_old_below
                )));
                true
            } else {
                pending.extend(
                    state
                        .events
                        .iter()
                        .filter(|e| e.rv > cursor && e.kind == kind)
                        .filter_map(|event| watch_event(event, &watch.selector)),
                );
                cursor = state.rv;
                false
            }
        };
        let now = tokio::time::Instant::now();
        if watch.bookmarks && now >= next_bookmark && !compacted {
            pending.push(bookmark_line(kind, cursor, false));
            next_bookmark = now + BOOKMARK_INTERVAL;
        }
        for line in pending.drain(..) {
            if lines.send(line.into()).await.is_err() {
                return;
            }
        }
        if compacted || watch.deadline.is_some_and(|deadline| now >= deadline) {
            return;
        }
        let wake_at = [watch.deadline, watch.bookmarks.then_some(next_bookmark)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = sleep_until(wake_at) => {}
            () = lines.closed() => return,
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One ERROR event with a 410 Expired Status (the stream ends after it).
fn gone_line(message: &str) -> Vec<u8> {
    let status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Expired",
        "code": 410,
    });
    event_line("ERROR", &status)
}

/// Counts a watch as open while it lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.state().open_watches += 1;
        OpenWatch(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.state().open_watches -= 1;
    }
}
/// What a watch with `selector` sees of `event`, as the API server's
/// cacher decides it: starts matching -> ADDED, stops -> DELETED.
fn watch_event(event: &Event, selector: &Selector) -> Option<Vec<u8>> {
    let now = selector.matches(&event.object);
    let before = event
        .prev
        .as_ref()
        .is_some_and(|prev| selector.matches(prev));
    match event.event_type {
        EventType::Added => now.then(|| event_line("ADDED", &event.object)),
        EventType::Deleted => before.then(|| event_line("DELETED", &event.object)),
        EventType::Modified => match (before, now) {
            (true, true) => Some(event_line("MODIFIED", &event.object)),
            (false, true) => Some(event_line("ADDED", &event.object)),
            (true, false) => {
                // The last state the watch matched, at the new version.
                let mut prev = (**event.prev.as_ref()?).clone();
                prev["metadata"]["resourceVersion"] = json!(event.rv.to_string());
                Some(event_line("DELETED", &prev))
            }
            (false, false) => None,
        },
    }
}

fn event_line(event_type: &str, object: &Value) -> Vec<u8> {
    let mut line = format!("{{\"type\":\"{event_type}\",\"object\":").into_bytes();
    serde_json::to_writer(&mut line, object).expect("serialize an object");
    line.extend_from_slice(b"}\n");
    line
}

fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> Vec<u8> {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object =
        json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata});
    event_line("BOOKMARK", &object)
}

fn status_reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

/// A `metav1.Status` failure body.
fn status_body(code: u16, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": status_reason(code),
        "code": code,
    }))
    .expect("serialize a Status")
}

/// Continue tokens: hex of `rv/namespace/name` (opaque to clients).
fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    let raw = format!("{rv}/{namespace}/{name}");
    raw.bytes().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let raw = String::from_utf8(bytes?).ok()?;
    let mut parts = raw.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_string(), parts.next()?.to_string()))
}

#[cfg(test)]
mod tests {
    //! The double's own tests: raw HTTP for exact protocol checks, and the
    //! real kube-runtime watcher for compatibility. They need root (a
    //! network namespace) but not the agent.
    use std::{
        collections::HashMap,
        io::{BufRead, BufReader, Read},
        net::TcpStream,
    };

    use super::*;

    const SELECTOR: &str =
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

    /// Runs `f` on a thread inside `ns`.
    fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = ns.name().to_string();
        thread::spawn(move || {
            enter_netns(&name).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn connect(ns: &Netns, addr: SocketAddr) -> TcpStream {
        let stream = in_netns(ns, move || TcpStream::connect(addr)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    fn encode(s: &str) -> String {
        form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    /// A raw HTTP/1.1 client on one connection.
    struct Client {
        reader: BufReader<TcpStream>,
    }

    impl Client {
        fn new(ns: &Netns, api: &ApiServer) -> Client {
            Client {
                reader: BufReader::new(connect(ns, api.addr())),
            }
        }

        fn send(&mut self, target: &str) -> (u16, HashMap<String, String>) {
            let request =
                format!("GET {target} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n");
            self.reader.get_mut().write_all(request.as_bytes()).unwrap();
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let code = line
                .split_whitespace()
                .nth(1)
                .expect("status line")
                .parse()
                .unwrap();
            let mut headers = HashMap::new();
            loop {
                line.clear();
                self.reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap();
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
            (code, headers)
        }

        /// GET with a Content-Length body, parsed as JSON.
        fn get(&mut self, target: &str) -> (u16, Value) {
            let (code, headers) = self.send(target);
            let len: usize = headers["content-length"].parse().unwrap();
            let mut body = vec![0; len];
            self.reader.read_exact(&mut body).unwrap();
            (code, serde_json::from_slice(&body).unwrap())
        }

        /// Starts a watch; read events with `next_event`.
        fn watch(&mut self, target: &str) {
            let (code, headers) = self.send(target);
            assert_eq!(code, 200);
            assert_eq!(headers["transfer-encoding"], "chunked");
            assert_eq!(headers["content-type"], "application/json");
        }

        /// The next chunk as a JSON event; `None` at the end of the stream.
        fn next_event(&mut self) -> Option<Value> {
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut data = vec![0; size + 2];
            self.reader.read_exact(&mut data).unwrap();
            if size == 0 {
                return None;
            }
            assert!(
                data.ends_with(b"\n\r\n"),
                "one event per chunk, newline-terminated"
            );
            Some(serde_json::from_slice(&data[..size]).unwrap())
        }

        /// The next event that is not a BOOKMARK.
        fn next_change(&mut self) -> Option<Value> {
            loop {
                let event = self.next_event()?;
                if event["type"] != "BOOKMARK" {
                    return Some(event);
                }
            }
        }
    }

    fn svc(namespace: &str, name: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
        )
    }

    fn names(list: &Value) -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                format!(
                    "{}/{}",
                    item["metadata"]["namespace"].as_str().unwrap_or(""),
                    item["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    fn summary(event: &Value) -> (String, String, String) {
        (
            event["type"].as_str().unwrap().to_string(),
            event["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            event["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    }

    #[test]
    fn request_targets_are_percent_decoded() {
        let request = Request::new(
            "GET",
            "/api/v1/namespaces/a%2Db/services?labelSelector=%21x%2Cy+%3D%3D+z&watch&limit=5&limit=6",
        );
        assert_eq!(request.path, "/api/v1/namespaces/a-b/services");
        assert_eq!(request.param("labelSelector"), Some("!x,y == z"));
        assert_eq!(request.param("watch"), Some(""));
        assert_eq!(request.param("limit"), Some("5"), "the first value");
        assert_eq!(
            request.collection(),
            Some((Kind::Service, Some("a-b".to_string())))
        );
        assert_eq!(
            query_param(&request.line, "labelSelector").as_deref(),
            Some("!x,y == z")
        );
    }

    #[test]
    fn lists_filter_by_selectors_and_paginate() {
        let ns = Netns::new("epau").unwrap();
        let api = ApiServer::start(&ns).unwrap();
        api.apply(svc("a", "one", ""));
        api.apply(format!(
            "{}---\n{}",
            svc(
                "a",
                "two",
                "service.kubernetes.io/service-proxy-name: other"
            ),
            svc("b", "three", "service.kubernetes.io/headless: ''")
        ));
        api.apply(svc("b", "four", "app: web"));
        let rv = api.apply(svc("c", "five", "app: db"));
        api.apply(
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-1, namespace: ignored}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-2}\n",
        );
        let rv_now = api.resource_version();
        assert_eq!(rv, 5);
        assert_eq!(rv_now, 7);

        let mut client = Client::new(&ns, &api);
        let (code, all) = client.get("/api/v1/services");
        assert_eq!(code, 200);
        assert_eq!(all["kind"], "ServiceList");
        assert_eq!(all["apiVersion"], "v1");
        assert_eq!(all["metadata"]["resourceVersion"], "7");
        assert!(all["metadata"].get("continue").is_none());
        assert_eq!(
            names(&all),
            ["a/one", "a/two", "b/four", "b/three", "c/five"]
        );
        let first = &all["items"][0];
        assert_eq!(first["kind"], "Service");
        assert_eq!(first["metadata"]["resourceVersion"], "1");
        assert!(first["metadata"]["uid"].is_string());
        assert!(first["metadata"]["creationTimestamp"].is_string());

        let (_, selected) = client.get(&format!(
            "/api/v1/services?labelSelector={}",
            encode(SELECTOR)
        ));
        assert_eq!(names(&selected), ["a/one", "b/four", "c/five"]);
        let (_, web) = client.get("/api/v1/services?labelSelector=app%3Dweb");
        assert_eq!(names(&web), ["b/four"]);
        let (_, not_web) = client.get("/api/v1/services?labelSelector=app!%3Dweb,app");
        assert_eq!(names(&not_web), ["c/five"]);
        let (_, in_b) = client.get("/api/v1/namespaces/b/services");
        assert_eq!(names(&in_b), ["b/four", "b/three"]);
        let (_, by_field) = client
            .get("/api/v1/services?fieldSelector=metadata.namespace%3Da,metadata.name!%3Done");
        assert_eq!(names(&by_field), ["a/two"]);
        let (_, node) = client.get("/api/v1/nodes?fieldSelector=metadata.name%3Dnode-1");
        assert_eq!(names(&node), ["/node-1"], "Nodes are cluster-scoped");
        let (code, bad) = client.get("/api/v1/services?fieldSelector=spec.clusterIP%3D1.2.3.4");
        assert_eq!((code, bad["reason"].as_str()), (400, Some("BadRequest")));
        let (code, missing) = client.get("/api/v1/pods");
        assert_eq!((code, missing["kind"].as_str()), (404, Some("Status")));

        // Pages of 2: every item once, each page at the first page's version.
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (code, page) = client.get(&format!("/api/v1/services?limit=2&continue={token}"));
            assert_eq!(code, 200);
            assert_eq!(page["metadata"]["resourceVersion"], "7");
            assert!(page["items"].as_array().unwrap().len() <= 2);
            seen.extend(names(&page));
            match page["metadata"]["continue"].as_str() {
                Some(next) => token = encode(next),
                None => break,
            }
        }
        assert_eq!(seen, names(&all));
        let (_, limited) = client.get(&format!(
            "/api/v1/services?labelSelector={}&limit=3",
            encode(SELECTOR)
        ));
        assert_eq!(names(&limited), ["a/one", "b/four", "c/five"]);
        assert!(
            limited["metadata"].get("continue").is_none(),
            "no empty last page"
        );

        let requests = api.requests();
        assert_eq!(requests[0], "GET /api/v1/services");
        assert_eq!(
            query_param(&requests[1], "labelSelector").as_deref(),
            Some(SELECTOR)
        );
    }

    #[test]
    fn watches_replay_stream_and_follow_selectors() {
        let ns = Netns::new("epau").unwrap();
        let api = ApiServer::start(&ns).unwrap();
        let slice = |labels: &str, ip: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web{labels}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\n"
            )
        };
        let rv1 = api.apply(slice("", "10.0.0.1"));
        let rv2 = api.apply(slice("", "10.0.0.2"));

        let mut client = Client::new(&ns, &api);
        // Before the request: the server's deadline starts after it.
        let start = Instant::now();
        client.watch(&format!(
            "/apis/discovery.k8s.io/v1/endpointslices?watch=true&labelSelector={}&resourceVersion={rv1}&allowWatchBookmarks=true&timeoutSeconds=5",
            encode(SELECTOR)
        ));
        let replayed = client.next_change().unwrap();
        assert_eq!(
            summary(&replayed),
            ("MODIFIED".into(), "web-1".into(), rv2.to_string())
        );
        assert_eq!(
            replayed["object"]["endpoints"][0]["addresses"][0],
            "10.0.0.2"
        );
        assert_eq!(replayed["object"]["kind"], "EndpointSlice");

        // Selected by the watch's selector, per event.
        let rv3 = api.apply(slice(", service.kubernetes.io/headless: ''", "10.0.0.3"));
        let gone = client.next_change().unwrap();
        assert_eq!(
            summary(&gone),
            ("DELETED".into(), "web-1".into(), rv3.to_string())
        );
        assert_eq!(
            gone["object"]["endpoints"][0]["addresses"][0], "10.0.0.2",
            "the last state it matched"
        );
        api.apply(slice(", service.kubernetes.io/headless: ''", "10.0.0.4"));
        let rv5 = api.apply(slice("", "10.0.0.5"));
        assert_eq!(
            summary(&client.next_change().unwrap()),
            ("ADDED".into(), "web-1".into(), rv5.to_string())
        );
        let rv6 = api.delete("EndpointSlice", "demo", "web-1").unwrap();
        assert_eq!(
            summary(&client.next_change().unwrap()),
            ("DELETED".into(), "web-1".into(), rv6.to_string())
        );
        assert!(api.delete("EndpointSlice", "demo", "web-1").is_none());
        // Other kinds are not this watch's business.
        let rv7 = api.apply(svc("demo", "web", ""));

        // Bookmarks about every second, then the end after timeoutSeconds
        // (the steps above may have taken most of it on a loaded host, so
        // only the last bookmark is sure to come here).
        let mut bookmarks = Vec::new();
        while let Some(event) = client.next_event() {
            assert_eq!(event["type"], "BOOKMARK", "{event}");
            assert_eq!(event["object"]["kind"], "EndpointSlice");
            assert_eq!(event["object"]["apiVersion"], "discovery.k8s.io/v1");
            bookmarks.push(
                event["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(15),
            "{elapsed:?}"
        );
        // At most one a second of the 5.
        assert!((1..=5).contains(&bookmarks.len()), "{bookmarks:?}");
        assert_eq!(bookmarks.last(), Some(&rv7.to_string()), "{bookmarks:?}");
        // The server thread counts the watch closed right after the last chunk.
        let closed = Instant::now();
        while api.open_watches() > 0 {
            assert!(
                closed.elapsed() < Duration::from_secs(2),
                "watch still counted open"
            );
            thread::sleep(Duration::from_millis(10));
        }

        // The connection is reusable; no version: current objects as ADDED.
        client.watch("/api/v1/services?watch=1&timeoutSeconds=1");
        assert_eq!(
            summary(&client.next_event().unwrap()),
            ("ADDED".into(), "web".into(), rv7.to_string())
        );
        assert!(client.next_event().is_none(), "no bookmarks unless asked");
    }

    #[test]
    fn compaction_failures_and_outages() {
        let ns = Netns::new("epau").unwrap();
        let api = ApiServer::start(&ns).unwrap();
        let rv1 = api.apply(svc("demo", "web", ""));
        api.compact();
        let mut client = Client::new(&ns, &api);
        client.watch(&format!(
            "/api/v1/services?watch=true&resourceVersion={rv1}"
        ));
        let error = client.next_event().unwrap();
        assert_eq!(error["type"], "ERROR");
        assert_eq!(error["object"]["kind"], "Status");
        assert_eq!(error["object"]["code"], 410);
        assert_eq!(error["object"]["reason"], "Expired");
        assert!(
            error["object"]["message"]
                .as_str()
                .unwrap()
                .starts_with("too old resource version: 1 (")
        );
        assert!(
            client.next_event().is_none(),
            "the stream ends after the error"
        );

        // A relist gives a version that can be watched from.
        let (_, list) = client.get("/api/v1/services");
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(rv, "2");
        client.watch(&format!("/api/v1/services?watch=true&resourceVersion={rv}"));
        let rv3 = api.apply(svc("demo", "web", "x: y"));
        assert_eq!(
            summary(&client.next_event().unwrap()),
            ("MODIFIED".into(), "web".into(), rv3.to_string())
        );

        // drop_connections ends an open watch abruptly.
        api.drop_connections();
        assert!(
            client.next_event().is_none(),
            "killed connection ends the stream"
        );

        // Injected failures, in order, only for what they match.
        api.fail_matching(1, 503, |r| r.kind() == Some(Kind::Node));
        api.fail_requests(2, 500);
        let mut client = Client::new(&ns, &api);
        let (code, status) = client.get("/api/v1/services");
        assert_eq!(
            (code, status["code"].as_i64(), status["reason"].as_str()),
            (500, Some(500), Some("InternalError"))
        );
        assert_eq!(client.get("/api/v1/nodes").0, 503);
        assert_eq!(client.get("/api/v1/services").0, 500);
        assert_eq!(client.get("/api/v1/services").0, 200);
        assert_eq!(client.get("/api/v1/nodes").0, 200);
        api.fail_requests(usize::MAX, 500);
        api.clear_failures();
        assert_eq!(client.get("/api/v1/nodes").0, 200);

        // Down: open connections close, new ones are closed at once.
        client.watch(&format!(
            "/api/v1/services?watch=true&resourceVersion={}",
            api.resource_version()
        ));
        assert_eq!(api.open_watches(), 1);
        api.set_down(true);
        assert!(client.next_change().is_none());
        let mut refused = connect(&ns, api.addr());
        let _ = refused.write_all(b"GET /api/v1/services HTTP/1.1\r\n\r\n");
        let mut buf = Vec::new();
        assert!(
            matches!(refused.read_to_end(&mut buf), Ok(0) | Err(_)),
            "{buf:?}"
        );
        api.set_down(false);
        assert_eq!(Client::new(&ns, &api).get("/api/v1/services").0, 200);

        // Drop stops everything, also an open watch, promptly.
        let mut watching = Client::new(&ns, &api);
        watching.watch("/api/v1/services?watch=true&allowWatchBookmarks=true");
        assert_eq!(
            watching.next_change().unwrap()["type"],
            "ADDED",
            "no version: current objects"
        );
        let start = Instant::now();
        drop(api);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(watching.next_change().is_none());
    }

    #[test]
    fn the_kube_runtime_watcher_lists_watches_and_relists() {
        use futures::StreamExt;
        use k8s_openapi::api::core::v1::Service;
        use kube::runtime::watcher;

        let ns = Netns::new("epau").unwrap();
        let api = Arc::new(ApiServer::start(&ns).unwrap());
        for i in 0..7 {
            api.apply(svc("demo", &format!("svc-{i}"), ""));
        }
        api.apply(svc(
            "demo",
            "ignored",
            "service.kubernetes.io/service-proxy-name: other",
        ));
        let dir = crate::TempDir::new("epau").unwrap();
        let kubeconfig = api.kubeconfig(dir.path()).unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let name = ns.name().to_string();
        // The runtime's threads are created inside the namespace.
        thread::spawn(move || {
            enter_netns(&name).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let config = kube::Config::from_custom_kubeconfig(
                    kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
                    &Default::default(),
                )
                .await
                .unwrap();
                let client = kube::Client::try_from(config).unwrap();
                let config = watcher::Config::default()
                    .labels(SELECTOR)
                    .page_size(3)
                    .timeout(2);
                let mut events = std::pin::pin!(watcher(kube::Api::<Service>::all(client), config));
                while let Some(event) = events.next().await {
                    let line = match event {
                        Ok(watcher::Event::Init) => "init".to_string(),
                        Ok(watcher::Event::InitApply(s)) => {
                            format!("init-apply {}", s.metadata.name.unwrap())
                        }
                        Ok(watcher::Event::InitDone) => "init-done".to_string(),
                        Ok(watcher::Event::Apply(s)) => {
                            format!("apply {}", s.metadata.name.unwrap())
                        }
                        Ok(watcher::Event::Delete(s)) => {
                            format!("delete {}", s.metadata.name.unwrap())
                        }
                        Err(e) => format!("error {e}"),
                    };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("a watcher event")
        };
        let until = |what: &str| -> Vec<String> {
            let mut seen = Vec::new();
            loop {
                let line = next();
                seen.push(line.clone());
                if line == what {
                    return seen;
                }
            }
        };
        let initial = until("init-done");
        assert_eq!(initial.len(), 9, "{initial:?}");
        assert!(initial.iter().all(|l| !l.contains("ignored")));
        api.wait_for_watches(1, Duration::from_secs(5)).unwrap();

        api.apply(svc("demo", "svc-1", "app: x"));
        assert_eq!(next(), "apply svc-1");
        api.apply(svc("demo", "svc-2", "service.kubernetes.io/headless: ''"));
        assert_eq!(
            next(),
            "delete svc-2",
            "stops matching: deleted for this watch"
        );
        api.delete("Service", "demo", "svc-3");
        assert_eq!(next(), "delete svc-3");

        // Changes while no watch is open, then compaction: 410, relist.
        api.set_down(true);
        api.delete("Service", "demo", "svc-4");
        api.compact();
        api.set_down(false);
        let relisted = until("init-done");
        assert!(
            relisted
                .iter()
                .any(|l| l.contains("410") || l.contains("Expired")),
            "{relisted:?}"
        );
        let applied: Vec<&String> = relisted
            .iter()
            .filter(|l| l.starts_with("init-apply"))
            .collect();
        assert_eq!(applied.len(), 4, "svc-0, 1, 5, 6: {relisted:?}");
        let lists = api
            .request_log()
            .iter()
            .filter(|r| !r.is_watch() && r.param("limit") == Some("3"))
            .count();
        assert_eq!(lists, 3 + 2, "two lists of pages of 3 (7, then 4 objects)");
        for request in api.request_log() {
            assert_eq!(
                request.param("labelSelector"),
                Some(SELECTOR),
                "{}",
                request.line
            );
            if request.is_watch() {
                assert_eq!(request.param("allowWatchBookmarks"), Some("true"));
            }
        }

        // timeoutSeconds=2: the watch ends and is resumed, without a relist.
        let watches = |log: &[Request]| log.iter().filter(|r| r.is_watch()).count();
        let lists = |log: &[Request]| log.iter().filter(|r| !r.is_watch()).count();
        let (watched, listed) = (watches(&api.request_log()), lists(&api.request_log()));
        api.wait_for_requests("the watch resumed", Duration::from_secs(10), |log| {
            watches(log) > watched
        })
        .unwrap();
        api.apply(svc("demo", "svc-9", ""));
        assert_eq!(next(), "apply svc-9");
        assert_eq!(lists(&api.request_log()), listed, "{:?}", api.requests());
    }
}
