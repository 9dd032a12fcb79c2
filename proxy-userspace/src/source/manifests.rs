//! The manifests source: a directory of Service, EndpointSlice, Endpoints
//! and Node manifests (YAML, multi-document, or JSON; `kind: List` too), as a
//! standalone L4 balancer or a test fixture.
//!
//! The directory is polled: cheap for the sizes involved, and it sees every
//! way files change (editors that rename over a file, ConfigMap volumes that
//! swap a symlink) without an inotify dependency. A file whose content
//! cannot be parsed keeps what it last contributed; an invalid object keeps
//! its last good version; both are reported with the file and the reason.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::Value;

use super::{SourceStatus, SourceUpdate, UpdateSender};
use crate::model::{
    ClusterSnapshot, NodeInfo, ObjectKey, ServiceInfo, SliceInfo,
    objects::{self, Admission, IgnoreReason},
};

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Which object a document is, as far as it can be told before validation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectId {
    pub kind: String,
    pub key: ObjectKey,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

/// Something about a file the operator should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    pub file: PathBuf,
    /// The object, when the document said which one it is.
    pub object: Option<ObjectId>,
    pub reason: String,
    pub severity: Severity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Valid but programs nothing by rule (e.g. a headless Service).
    Ignored,
    /// Rejected; the last good version (if any) stays in force.
    Invalid,
}

impl ManifestProblem {
    /// The object kind for the invalid-objects counter ("File" when the
    /// file itself could not be read or parsed).
    pub fn kind(&self) -> &'static str {
        match self.object.as_ref().map(|object| object.kind.as_str()) {
            Some("Service") => "Service",
            Some("EndpointSlice") => "EndpointSlice",
            Some("Endpoints") => "Endpoints",
            Some("Node") => "Node",
            Some(_) => "Other",
            None => "File",
        }
    }
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct Poll {
    /// The new snapshot, when anything the model sees changed.
    pub snapshot: Option<ClusterSnapshot>,
    pub problems: Vec<ManifestProblem>,
}

/// A validated object, as one document contributed it.
#[derive(Clone, Debug, PartialEq)]
/// Objects are shared with the snapshots built from them: a file left as it
/// was gives the same allocations, which the planner need not compare.
enum Parsed {
    Service(Arc<ServiceInfo>),
    Slices(Vec<Arc<SliceInfo>>),
    Node(NodeInfo),
    Ignored(IgnoreReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
}

impl Fingerprint {
    /// Modification times are coarse (a kernel tick): a file written twice
    /// within one tick keeps its mtime. Like git's "racy" check, a file
    /// modified recently is compared by content, not by metadata alone.
    fn is_settled(&self) -> bool {
        self.modified
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > RACY_WINDOW)
    }
}

const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug)]
struct FileState {
    fingerprint: Fingerprint,
    content_hash: u64,
    objects: BTreeMap<ObjectId, Parsed>,
}

pub struct ManifestsSource {
    dir: PathBuf,
    node_name: String,
    files: BTreeMap<PathBuf, FileState>,
    last: Option<ClusterSnapshot>,
}

impl ManifestsSource {
    pub fn new(dir: impl Into<PathBuf>, node_name: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            node_name: node_name.into(),
            files: BTreeMap::new(),
            last: None,
        }
    }

    /// Polls forever: logs what each poll found and publishes changed
    /// snapshots. An unreadable directory keeps the last state published.
    pub async fn run(mut self, updates: UpdateSender, status: SourceStatus, interval: Duration) {
        loop {
            match self.poll() {
                Ok(poll) => {
                    status.ok("manifests");
                    for problem in &poll.problems {
                        let file = problem.file.display();
                        match problem.severity {
                            Severity::Invalid => {
                                status.count_invalid(problem.kind());
                                tracing::warn!(%file, "{problem}")
                            }
                            Severity::Ignored => tracing::info!(%file, "{problem}"),
                        }
                    }
                    if let Some(snapshot) = poll.snapshot
                        && updates.send(SourceUpdate::Snapshot(snapshot)).is_err()
                    {
                        return;
                    }
                }
                Err(err) => status.failing("manifests", format!("{err:#}")),
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Rescans the directory. The first call always yields a snapshot (the
    /// initial list, rule 3); later calls only when something changed. An
    /// unreadable directory is an error and changes nothing.
    pub fn poll(&mut self) -> Result<Poll> {
        let mut poll = Poll::default();
        let present = self.list_files()?;
        let known_before = self.files.len();
        self.files.retain(|path, _| present.contains_key(path));
        let mut changed = self.files.len() != known_before;
        for (path, fingerprint) in present {
            let known = self.files.get(&path);
            if known
                .is_some_and(|state| state.fingerprint == fingerprint && fingerprint.is_settled())
            {
                continue;
            }
            let text = fs::read(&path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
            let content_hash = text.as_ref().map_or(0, |text| hash(text));
            if let Some(state) = self.files.get_mut(&path)
                && state.content_hash == content_hash
            {
                state.fingerprint = fingerprint;
                continue;
            }
            changed = true;
            let previous = self.files.remove(&path).map(|state| state.objects);
            let text = text.with_context(|| format!("reading {}", path.display()));
            let objects = load_file(
                &path,
                text,
                previous.unwrap_or_default(),
                &mut poll.problems,
            );
            self.files.insert(
                path,
                FileState {
                    fingerprint,
                    content_hash,
                    objects,
                },
            );
        }
        // Rebuilding is O(objects): only when a file changed (or at first).
        if !changed && self.last.is_some() {
            return Ok(poll);
        }
        let snapshot = self.snapshot(&mut poll.problems);
        if self.last.as_ref() != Some(&snapshot) {
            self.last = Some(snapshot.clone());
            poll.snapshot = Some(snapshot);
        }
        Ok(poll)
    }

    fn list_files(&self) -> Result<BTreeMap<PathBuf, Fingerprint>> {
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("reading manifests directory {}", self.dir.display()))?;
        let mut files = BTreeMap::new();
        for entry in entries {
            let path = entry
                .with_context(|| format!("reading {}", self.dir.display()))?
                .path();
            let is_manifest = path
                .extension()
                .and_then(|ext| ext.to_str())
                .is_some_and(|ext| EXTENSIONS.contains(&ext));
            // Follows symlinks (ConfigMap volumes); skips what vanished meanwhile.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if is_manifest && meta.is_file() {
                let fingerprint = Fingerprint {
                    modified: meta.modified().ok(),
                    len: meta.len(),
                };
                files.insert(path, fingerprint);
            }
        }
        Ok(files)
    }

    /// The union of every file's objects; on a duplicate, the file that
    /// sorts first keeps the object.
    fn snapshot(&self, problems: &mut Vec<ManifestProblem>) -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot {
            node_name: self.node_name.clone(),
            ..ClusterSnapshot::default()
        };
        let mut owners: BTreeMap<&ObjectId, &Path> = BTreeMap::new();
        for (path, state) in &self.files {
            for (id, parsed) in &state.objects {
                if let Some(owner) = owners.get(id) {
                    problems.push(ManifestProblem {
                        file: path.clone(),
                        object: Some(id.clone()),
                        reason: format!("duplicate of the object in {}; ignored", owner.display()),
                        severity: Severity::Invalid,
                    });
                    continue;
                }
                owners.insert(id, path);
                match parsed {
                    Parsed::Service(service) => {
                        snapshot
                            .services
                            .insert(service.key.clone(), service.clone());
                    }
                    Parsed::Slices(slices) => {
                        for slice in slices {
                            snapshot.slices.insert(slice.key.clone(), slice.clone());
                        }
                    }
                    Parsed::Node(node) if node.name == self.node_name => {
                        snapshot.node = Some(node.clone());
                    }
                    Parsed::Node(_) | Parsed::Ignored(_) => {}
                }
            }
        }
        snapshot
    }
}

/// Parses one file. `previous` is what the file contributed before: kept
/// whole when the file cannot be parsed, and per object when one is invalid.
fn load_file(
    path: &Path,
    text: Result<String>,
    previous: BTreeMap<ObjectId, Parsed>,
    problems: &mut Vec<ManifestProblem>,
) -> BTreeMap<ObjectId, Parsed> {
    let mut report = |object: Option<ObjectId>, reason: String, severity: Severity| {
        problems.push(ManifestProblem {
            file: path.to_path_buf(),
            object,
            reason,
            severity,
        })
    };
    let text = match text {
        Ok(text) => text,
        Err(err) => {
            report(
                None,
                format!("{err:#}; keeping what the file last gave"),
                Severity::Invalid,
            );
            return previous;
        }
    };
    // Documents are parsed and validated one at a time, so a large file is
    // never held as a whole tree; a syntax error anywhere discards what was
    // read of this version and keeps the previous one.
    let mut objects = BTreeMap::new();
    let mut findings = Vec::new();
    // JSON is YAML, so one parser reads both; empty documents yield nothing.
    let mut reader = text.as_bytes();
    for (index, document) in
        serde_saphyr::read_with_options(&mut reader, yaml_options()).enumerate()
    {
        let document: Value = match document {
            Ok(document) => document,
            Err(err) => {
                report(
                    None,
                    format!("not valid YAML or JSON: {err}; keeping what the file last gave"),
                    Severity::Invalid,
                );
                return previous;
            }
        };
        for item in flatten_lists(document) {
            let id = object_id(&item);
            match parse_object(item) {
                Ok((id, Parsed::Ignored(reason))) => {
                    findings.push((
                        Some(id.clone()),
                        format!("ignored: {reason}"),
                        Severity::Ignored,
                    ));
                    objects.insert(id, Parsed::Ignored(reason));
                }
                Ok((id, parsed)) => {
                    objects.insert(id, parsed);
                }
                Err(err) => {
                    let kept = id.as_ref().and_then(|id| previous.get(id).map(|p| (id, p)));
                    let suffix = if kept.is_some() {
                        "; keeping its last good version"
                    } else {
                        "; skipped"
                    };
                    findings.push((
                        id.clone(),
                        format!("document {}: {err:#}{suffix}", index + 1),
                        Severity::Invalid,
                    ));
                    if let Some((id, parsed)) = kept {
                        objects.insert(id.clone(), parsed.clone());
                    }
                }
            }
        }
    }
    for (object, reason, severity) in findings {
        report(object, reason, severity);
    }
    objects
}

/// How manifests are read: YAML 1.2, typed the way serde_yaml typed it
/// (only `true`/`false` are booleans, so a label `on: y` stays a string;
/// numbers spelt with leading zeros or underscores stay strings). No
/// parser budget: the directory is the operator's own input, and a
/// cluster's worth of objects in one file exceeds the default limits.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: None,
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// `kind: List` (what `kubectl get -o yaml` writes) holds its objects in
/// `items`.
fn flatten_lists(document: Value) -> Vec<Value> {
    if document.get("kind").and_then(|k| k.as_str()) == Some("List")
        && let Value::Object(mut list) = document
    {
        return match list.remove("items") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
    }
    vec![document]
}

fn object_id(item: &Value) -> Option<ObjectId> {
    let kind = item.get("kind")?.as_str()?.to_string();
    let metadata = item.get("metadata")?;
    let name = metadata.get("name")?.as_str()?.to_string();
    let namespace = metadata
        .get("namespace")
        .and_then(|ns| ns.as_str())
        .unwrap_or("default")
        .to_string();
    Some(ObjectId {
        kind,
        key: ObjectKey::new(namespace, name),
    })
}

fn typed<T: serde::de::DeserializeOwned>(item: Value) -> Result<T> {
    serde_json::from_value(item).context("does not match the API schema")
}

/// One object: its identity and validated content, or why it is rejected.
fn parse_object(item: Value) -> Result<(ObjectId, Parsed)> {
    let text = |field: &str| {
        item.get(field)
            .and_then(|value| value.as_str())
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let id = object_id(&item);
    let parsed = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => match objects::service(&typed::<Service>(item)?)? {
            Admission::Proxied(service) => Parsed::Service(Arc::new(service)),
            Admission::Ignored(reason) => Parsed::Ignored(reason),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match objects::endpoint_slice(&typed::<EndpointSlice>(item)?)? {
                Admission::Proxied(slice) => Parsed::Slices(vec![Arc::new(slice)]),
                Admission::Ignored(reason) => Parsed::Ignored(reason),
            }
        }
        ("v1", "Endpoints") => match objects::endpoints(&typed::<Endpoints>(item)?)? {
            Admission::Proxied(slices) => {
                Parsed::Slices(slices.into_iter().map(Arc::new).collect())
            }
            Admission::Ignored(reason) => Parsed::Ignored(reason),
        },
        ("v1", "Node") => Parsed::Node(objects::node(&typed::<Node>(item)?)?),
        ("", _) | (_, "") => {
            anyhow::bail!("not a Kubernetes object (apiVersion and kind required)")
        }
        _ => anyhow::bail!(
            "unsupported kind {kind} (apiVersion {api_version}): expected v1 Service, \
             Endpoints or Node, or discovery.k8s.io/v1 EndpointSlice"
        ),
    };
    Ok((id.context("missing metadata.name")?, parsed))
}

#[cfg(test)]
mod tests;
