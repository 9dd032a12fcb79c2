//! The deployment files in `deploy/`, checked without a cluster and without
//! root: every YAML document parses into its typed Kubernetes object (and
//! holds no field that type does not know, so a typo cannot hide), the
//! kustomization lists files that exist, the ClusterRole grants exactly what
//! the agent uses (`API_ACCESS`), the binding, service account and
//! DaemonSet agree with one another, and the DaemonSet's flags, mounts and
//! probes agree with the agent binary.
//!
//! Each check is a function that returns the problems it finds; the tests
//! assert there are none, and `checks_catch_broken_manifests` breaks a copy
//! of the manifests in one way per check and asserts the check notices.
//!
//! The flags check runs `ebpf-proxy agent --help`: build the binary first
//! (`cargo build -p proxy-userspace`; `cargo xtask test` does).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Endpoints, Node, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use proxy_userspace::source::{kube::API_ACCESS, manifests::yaml_options};
use serde_json::Value;

/// The capabilities the DaemonSet documents, and no others.
const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"];
/// Where the agent's pins are on the host, as deploy/README.md tells the
/// operator (`ebpf-proxy uninstall --bpffs ...`, `rm -r ...`).
const HOST_PIN_DIR: &str = "/sys/fs/bpf/ebpf-proxy";
const NAMESPACE: &str = "kube-system";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy")
}

// ---------------------------------------------------------------------------
// Loading

/// One parsed document, by kind.
#[derive(Clone, Debug)]
#[expect(clippy::large_enum_variant, reason = "a handful of test objects")]
enum Object {
    DaemonSet(DaemonSet),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Endpoints(Endpoints),
    Node(Node),
}

/// A document as written and as parsed.
#[derive(Clone, Debug)]
struct Document {
    file: PathBuf,
    index: usize,
    raw: Value,
    object: Object,
}

impl Document {
    fn name(&self) -> String {
        format!("{} (document {})", self.file.display(), self.index + 1)
    }
}

/// Everything under deploy/: the deployment's objects (outside examples/),
/// the examples' objects, and the kustomization.
#[derive(Clone, Debug)]
struct Deploy {
    documents: Vec<Document>,
    daemonset: DaemonSet,
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    kustomization: Value,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

fn typed<T: Resource + serde::de::DeserializeOwned>(raw: &Value, at: &str) -> T {
    let api_version = raw.get("apiVersion").and_then(Value::as_str);
    assert_eq!(
        api_version,
        Some(T::API_VERSION),
        "{at}: a {} must have apiVersion {}",
        T::KIND,
        T::API_VERSION
    );
    serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("{at}: not a valid {}: {e}", T::KIND))
}

fn parse_document(raw: &Value, at: &str) -> Object {
    let kind = raw
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{at}: no kind"));
    match kind {
        "DaemonSet" => Object::DaemonSet(typed(raw, at)),
        "ServiceAccount" => Object::ServiceAccount(typed(raw, at)),
        "ClusterRole" => Object::ClusterRole(typed(raw, at)),
        "ClusterRoleBinding" => Object::ClusterRoleBinding(typed(raw, at)),
        "Service" => Object::Service(typed(raw, at)),
        "EndpointSlice" => Object::EndpointSlice(typed(raw, at)),
        "Endpoints" => Object::Endpoints(typed(raw, at)),
        "Node" => Object::Node(typed(raw, at)),
        other => panic!("{at}: unknown kind {other:?} (teach tests/tests/deploy.rs about it)"),
    }
}

fn exactly_one<T: Clone>(what: &str, found: &[T]) -> T {
    assert_eq!(
        found.len(),
        1,
        "deploy/ (outside examples/) must hold exactly one {what}, found {}",
        found.len()
    );
    found[0].clone()
}

fn load() -> Deploy {
    let dir = deploy_dir();
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    let mut documents = Vec::new();
    let mut kustomization = None;
    for file in files {
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        if matches!(
            file.file_name().and_then(|n| n.to_str()),
            Some("kustomization.yaml" | "kustomization.yml")
        ) {
            assert_eq!(
                file.parent(),
                Some(dir.as_path()),
                "{}: only deploy/ has a kustomization",
                file.display()
            );
            let value: Value = serde_saphyr::from_str_with_options(&text, yaml_options())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            kustomization = Some(value);
            continue;
        }
        let relative = file
            .strip_prefix(&dir)
            .expect("under deploy/")
            .to_path_buf();
        // Empty documents (a trailing `---`) yield nothing.
        let mut reader = text.as_bytes();
        for (index, doc) in
            serde_saphyr::read_with_options::<_, Value>(&mut reader, yaml_options()).enumerate()
        {
            let raw =
                doc.unwrap_or_else(|e| panic!("{} (document {}): {e}", file.display(), index + 1));
            let at = format!("deploy/{} (document {})", relative.display(), index + 1);
            let object = parse_document(&raw, &at);
            documents.push(Document {
                file: relative.clone(),
                index,
                raw,
                object,
            });
        }
    }
    let deployment = documents
        .iter()
        .filter(|d| !d.file.starts_with("examples"))
        .map(|d| d.object.clone());
    let (mut daemonsets, mut accounts, mut roles, mut bindings) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for object in deployment {
        match object {
            Object::DaemonSet(ds) => daemonsets.push(ds),
            Object::ServiceAccount(sa) => accounts.push(sa),
            Object::ClusterRole(role) => roles.push(role),
            Object::ClusterRoleBinding(binding) => bindings.push(binding),
            other => panic!("deploy/ (outside examples/) holds an unexpected {other:?}"),
        }
    }
    Deploy {
        daemonset: exactly_one("DaemonSet", &daemonsets),
        service_account: exactly_one("ServiceAccount", &accounts),
        cluster_role: exactly_one("ClusterRole", &roles),
        binding: exactly_one("ClusterRoleBinding", &bindings),
        kustomization: kustomization.expect("deploy/kustomization.yaml exists"),
        documents,
    }
}

// ---------------------------------------------------------------------------
// Helpers over the DaemonSet

fn container(ds: &DaemonSet) -> Option<&Container> {
    ds.spec.as_ref()?.template.spec.as_ref()?.containers.first()
}

/// The value of `--name=value` or `--name value` in `args`.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let long = format!("--{name}");
    let with_eq = format!("--{name}=");
    args.iter().enumerate().find_map(|(i, arg)| {
        if let Some(value) = arg.strip_prefix(&with_eq) {
            Some(value)
        } else if *arg == long {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

/// The container's whole command line (command then args).
fn command_line(c: &Container) -> Vec<String> {
    let mut line = c.command.clone().unwrap_or_default();
    line.extend(c.args.clone().unwrap_or_default());
    line
}

/// The flag names (`--x`) of a command line.
fn flag_names(line: &[String]) -> Vec<String> {
    line.iter()
        .filter(|arg| arg.starts_with("--"))
        .map(|arg| arg.split('=').next().unwrap_or(arg).to_string())
        .collect()
}

/// The host path behind `path` in the container: the hostPath volume of
/// the mount that holds it, joined with the rest of the path. None when no
/// hostPath mount holds it.
fn host_path_of(ds: &DaemonSet, path: &str) -> Option<(String, PathBuf)> {
    let pod = ds.spec.as_ref()?.template.spec.as_ref()?;
    let c = pod.containers.first()?;
    let path = Path::new(path);
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?;
    let host = volume.host_path.as_ref()?;
    let rest = path.strip_prefix(&mount.mount_path).ok()?;
    let joined = if rest.as_os_str().is_empty() {
        PathBuf::from(&host.path)
    } else {
        Path::new(&host.path).join(rest)
    };
    Some((mount.mount_path.clone(), joined))
}

// ---------------------------------------------------------------------------
// Checks: each returns the problems it finds.

/// Every document holds only fields its type knows: parsing and
/// serializing it again gives back what was written.
fn check_no_unknown_fields(d: &Deploy) -> Vec<String> {
    fn diff(path: &str, written: &Value, parsed: &Value, out: &mut Vec<String>) {
        match (written, parsed) {
            (Value::Object(a), Value::Object(b)) => {
                for (key, value) in a {
                    let at = format!("{path}.{key}");
                    match b.get(key) {
                        Some(other) => diff(&at, value, other, out),
                        None if value.is_null() => {}
                        None => out.push(format!("{at}: not a field of this kind (typo?)")),
                    }
                }
                for key in b.keys().filter(|k| !a.contains_key(*k)) {
                    out.push(format!("{path}.{key:?}: appears only after parsing"));
                }
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    diff(&format!("{path}[{i}]"), x, y, out);
                }
            }
            (a, b) if a == b => {}
            (a, b) => out.push(format!("{path}: written {a:?}, parsed as {b:?}")),
        }
    }
    let mut problems = Vec::new();
    for doc in &d.documents {
        let parsed = match &doc.object {
            Object::DaemonSet(o) => serde_json::to_value(o),
            Object::ServiceAccount(o) => serde_json::to_value(o),
            Object::ClusterRole(o) => serde_json::to_value(o),
            Object::ClusterRoleBinding(o) => serde_json::to_value(o),
            Object::Service(o) => serde_json::to_value(o),
            Object::EndpointSlice(o) => serde_json::to_value(o),
            Object::Endpoints(o) => serde_json::to_value(o),
            Object::Node(o) => serde_json::to_value(o),
        }
        .expect("k8s-openapi objects serialize");
        let mut found = Vec::new();
        diff("", &doc.raw, &parsed, &mut found);
        problems.extend(found.into_iter().map(|p| format!("{}: {p}", doc.name())));
    }
    problems
}

/// The kustomization's namespace, resources (each exists; every manifest
/// outside examples/ is listed) and its image entry for the DaemonSet's
/// image.
fn check_kustomization(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let k = &d.kustomization;
    if k.get("namespace").and_then(Value::as_str) != Some(NAMESPACE) {
        problems.push(format!("kustomization: namespace must be {NAMESPACE}"));
    }
    let resources: Vec<String> = k
        .get("resources")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if resources.is_empty() {
        problems.push("kustomization: no resources".into());
    }
    for resource in &resources {
        if !deploy_dir().join(resource).is_file() {
            problems.push(format!("kustomization: resource {resource} does not exist"));
        }
    }
    let manifests: BTreeSet<String> = d
        .documents
        .iter()
        .filter(|doc| !doc.file.starts_with("examples"))
        .map(|doc| doc.file.display().to_string())
        .collect();
    for manifest in manifests {
        if !resources.contains(&manifest) {
            problems.push(format!("kustomization: {manifest} is not in resources"));
        }
    }
    let image = container(&d.daemonset)
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    // The image's name without tag or digest: what kustomize matches.
    let image_name = image
        .split('@')
        .next()
        .map(|s| match s.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => name,
            _ => s,
        })
        .unwrap_or_default();
    let entries = k.get("images").and_then(Value::as_array);
    let covered = entries
        .into_iter()
        .flatten()
        .any(|entry| entry.get("name").and_then(Value::as_str) == Some(image_name));
    if !covered {
        problems.push(format!(
            "kustomization: no images entry named {image_name:?} (the DaemonSet's image is {image:?})"
        ));
    }
    problems
}

/// The ClusterRole grants exactly `API_ACCESS`: the same (group, resource,
/// verb) triples, no wildcards, no resourceNames, no non-resource URLs, no
/// aggregation.
fn check_cluster_role(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let role = &d.cluster_role;
    if role.aggregation_rule.is_some() {
        problems.push("ClusterRole: has an aggregationRule".into());
    }
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        if groups.is_empty() || resources.is_empty() || rule.verbs.is_empty() {
            problems.push(format!(
                "ClusterRole rule {i}: needs apiGroups, resources and verbs"
            ));
        }
        if rule.resource_names.as_ref().is_some_and(|n| !n.is_empty()) {
            problems.push(format!("ClusterRole rule {i}: resourceNames"));
        }
        if rule
            .non_resource_urls
            .as_ref()
            .is_some_and(|n| !n.is_empty())
        {
            problems.push(format!("ClusterRole rule {i}: nonResourceURLs"));
        }
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    if [g, r, v].iter().any(|s| s.contains('*')) {
                        problems.push(format!("ClusterRole rule {i}: wildcard in {g:?}/{r}/{v}"));
                    }
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = API_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect();
    for extra in granted.difference(&used) {
        problems.push(format!(
            "ClusterRole grants {extra:?}, which the agent does not use"
        ));
    }
    for missing in used.difference(&granted) {
        problems.push(format!(
            "ClusterRole lacks {missing:?}, which the agent uses"
        ));
    }
    problems
}

/// The binding binds that role to that ServiceAccount, which lives in the
/// DaemonSet's namespace and is the one the DaemonSet uses.
fn check_binding(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let sa = &d.service_account;
    let sa_name = sa.metadata.name.clone().unwrap_or_default();
    let ds_namespace = d.daemonset.metadata.namespace.clone().unwrap_or_default();
    if ds_namespace != NAMESPACE {
        problems.push(format!(
            "DaemonSet: namespace {ds_namespace:?}, not {NAMESPACE}"
        ));
    }
    if sa.metadata.namespace.as_deref() != Some(ds_namespace.as_str()) {
        problems.push(format!(
            "ServiceAccount: namespace {:?}, not the DaemonSet's {ds_namespace:?}",
            sa.metadata.namespace
        ));
    }
    let role_ref = &d.binding.role_ref;
    if role_ref.api_group != "rbac.authorization.k8s.io"
        || role_ref.kind != "ClusterRole"
        || Some(&role_ref.name) != d.cluster_role.metadata.name.as_ref()
    {
        problems.push(format!(
            "ClusterRoleBinding: roleRef {role_ref:?} is not the ClusterRole"
        ));
    }
    let subjects = d.binding.subjects.clone().unwrap_or_default();
    let binds_sa = subjects.iter().any(|s| {
        s.kind == "ServiceAccount"
            && s.name == sa_name
            && s.namespace.as_deref() == Some(ds_namespace.as_str())
    });
    if subjects.len() != 1 || !binds_sa {
        problems.push(format!(
            "ClusterRoleBinding: subjects {subjects:?} are not exactly ServiceAccount {ds_namespace}/{sa_name}"
        ));
    }
    let used = d
        .daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.service_account_name.clone());
    if used.as_deref() != Some(sa_name.as_str()) {
        problems.push(format!(
            "DaemonSet: serviceAccountName {used:?}, not {sa_name:?}"
        ));
    }
    problems
}

/// Pod-level settings of a kube-proxy replacement.
fn check_pod(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let ds = &d.daemonset;
    let Some(spec) = ds.spec.as_ref() else {
        return vec!["DaemonSet: no spec".into()];
    };
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    if selector.is_empty() || selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        problems.push("DaemonSet: the selector does not match the pod template's labels".into());
    }
    let strategy = spec.update_strategy.as_ref();
    let max_unavailable = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone());
    if strategy.and_then(|s| s.type_.as_deref()) != Some("RollingUpdate")
        || max_unavailable != Some(IntOrString::Int(1))
    {
        problems.push("DaemonSet: updateStrategy must be RollingUpdate, maxUnavailable 1".into());
    }
    let Some(pod) = spec.template.spec.as_ref() else {
        return vec!["DaemonSet: no pod spec".into()];
    };
    if pod.host_network != Some(true) {
        problems.push("pod: hostNetwork must be true".into());
    }
    if pod.dns_policy.as_deref() != Some("ClusterFirstWithHostNet") {
        problems.push("pod: dnsPolicy must be ClusterFirstWithHostNet".into());
    }
    if pod.priority_class_name.as_deref() != Some("system-node-critical") {
        problems.push("pod: priorityClassName must be system-node-critical".into());
    }
    let tolerates_all =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    if !tolerates_all {
        problems.push("pod: needs the toleration `- operator: Exists`".into());
    }
    if pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        problems.push("pod: hostPID/hostIPC are not needed".into());
    }
    if pod.containers.len() != 1 {
        problems.push("pod: exactly one container".into());
    }
    if pod.termination_grace_period_seconds != Some(30) {
        problems.push("pod: terminationGracePeriodSeconds must be 30".into());
    }
    problems
}

/// Not privileged; exactly the documented capabilities; read-only root;
/// uid 0; and, as the API server requires, no Bidirectional mount
/// propagation in a container that is not privileged.
fn check_security(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(c) = container(&d.daemonset) else {
        return vec!["DaemonSet: no container".into()];
    };
    let Some(sc) = c.security_context.as_ref() else {
        return vec!["container: no securityContext".into()];
    };
    let privileged = sc.privileged == Some(true);
    if privileged {
        problems.push("container: privileged".into());
    }
    if sc.allow_privilege_escalation != Some(false) {
        problems.push("container: allowPrivilegeEscalation must be false".into());
    }
    if sc.read_only_root_filesystem != Some(true) {
        problems.push("container: readOnlyRootFilesystem must be true".into());
    }
    if sc.run_as_user != Some(0) {
        problems.push("container: runAsUser must be 0 (see the comment in daemonset.yaml)".into());
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|c| c.to_string()).collect();
    if added != expected {
        problems.push(format!(
            "container: adds capabilities {added:?}, documented {expected:?}"
        ));
    }
    if caps.drop != Some(vec!["ALL".to_string()]) {
        problems.push("container: must drop ALL capabilities".into());
    }
    for m in c.volume_mounts.iter().flatten() {
        if m.mount_propagation.as_deref() == Some("Bidirectional") && !privileged {
            problems.push(format!(
                "mount {}: Bidirectional propagation is only allowed for privileged containers",
                m.mount_path
            ));
        }
    }
    problems
}

/// The command's flags: the node name from the downward API, and the pin
/// directory and cgroup root mounted from the host where the flags say.
fn check_command_and_mounts(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let ds = &d.daemonset;
    let Some(c) = container(ds) else {
        return vec!["DaemonSet: no container".into()];
    };
    let line = command_line(c);
    if line.first().map(String::as_str) != Some("ebpf-proxy")
        || line.get(1).map(String::as_str) != Some("agent")
    {
        problems.push(format!(
            "container: command {line:?} is not `ebpf-proxy agent ...`"
        ));
    }
    // --hostname-override from spec.nodeName.
    let node_name_env = c.env.iter().flatten().find(|e| e.name == "NODE_NAME");
    let from_node_name = node_name_env
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .is_some_and(|f| f.field_path == "spec.nodeName");
    if !from_node_name {
        problems.push("container: env NODE_NAME must come from fieldRef spec.nodeName".into());
    }
    if flag_value(&line, "hostname-override") != Some("$(NODE_NAME)") {
        problems.push("container: --hostname-override must be $(NODE_NAME)".into());
    }
    // Every $(VAR) in the command is defined (kubelet leaves others as is).
    let defined: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for arg in &line {
        for var in arg.split("$(").skip(1).filter_map(|s| s.split(')').next()) {
            if !defined.contains(var) {
                problems.push(format!("container: {arg} refers to undefined $({var})"));
            }
        }
    }
    // --bpffs: inside a hostPath mount of the host's bpffs, at the host
    // path the README names, writable.
    match flag_value(&line, "bpffs") {
        None => problems.push("container: no --bpffs".into()),
        Some(bpffs) => match host_path_of(ds, bpffs) {
            None => problems.push(format!("--bpffs {bpffs}: no hostPath mount holds it")),
            Some((mount_path, host)) => {
                if host != Path::new(HOST_PIN_DIR) || bpffs != HOST_PIN_DIR {
                    problems.push(format!(
                        "--bpffs {bpffs}: is {} on the host; the README says {HOST_PIN_DIR} for both",
                        host.display()
                    ));
                }
                if mount_path != "/sys/fs/bpf" {
                    problems.push(format!(
                        "--bpffs {bpffs}: mounted at {mount_path}, not /sys/fs/bpf"
                    ));
                }
                let mount = c
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.mount_path == mount_path);
                if mount.is_some_and(|m| m.read_only == Some(true)) {
                    problems.push("the bpffs mount must be writable".into());
                }
            }
        },
    }
    // --cgroup: the whole mount is the host's cgroup root.
    match flag_value(&line, "cgroup") {
        None => problems.push("container: no --cgroup".into()),
        Some(cgroup) => match host_path_of(ds, cgroup) {
            None => problems.push(format!("--cgroup {cgroup}: no hostPath mount holds it")),
            Some((mount_path, host)) => {
                if mount_path != cgroup {
                    problems.push(format!(
                        "--cgroup {cgroup}: must be a mount point itself (the cgroup root), is under {mount_path}"
                    ));
                }
                if !matches!(
                    host.to_str(),
                    Some("/sys/fs/cgroup" | "/sys/fs/cgroup/unified")
                ) {
                    problems.push(format!(
                        "--cgroup {cgroup}: is {} on the host, not the cgroup2 root",
                        host.display()
                    ));
                }
            }
        },
    }
    problems
}

/// The probes reach /healthz and /livez on the --healthz-bind-address
/// port, on an address kubelet can reach (the pod IP, which is the node's).
fn check_probes(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(c) = container(&d.daemonset) else {
        return vec!["DaemonSet: no container".into()];
    };
    let line = command_line(c);
    let bind: SocketAddr = match flag_value(&line, "healthz-bind-address").map(str::parse) {
        Some(Ok(addr)) => addr,
        // The agent's default.
        None => "0.0.0.0:10256".parse().expect("valid"),
        Some(Err(e)) => return vec![format!("--healthz-bind-address: {e}")],
    };
    if !bind.ip().is_unspecified() {
        problems.push(format!(
            "--healthz-bind-address {bind}: kubelet probes the node's address; bind all addresses"
        ));
    }
    let port = i32::from(bind.port());
    for (what, probe, path) in [
        ("readinessProbe", &c.readiness_probe, "/healthz"),
        ("livenessProbe", &c.liveness_probe, "/livez"),
    ] {
        let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
            problems.push(format!("container: no {what} httpGet"));
            continue;
        };
        let probe_port = match &get.port {
            IntOrString::Int(p) => Some(*p),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        };
        if probe_port != Some(port) {
            problems.push(format!(
                "{what}: port {:?}, the agent serves {port}",
                get.port
            ));
        }
        if get.path.as_deref() != Some(path) {
            problems.push(format!("{what}: path {:?}, not {path}", get.path));
        }
        if get.host.is_some() || get.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            problems.push(format!("{what}: plain HTTP to the pod address"));
        }
    }
    problems
}

/// Every flag of the command is one `ebpf-proxy agent` accepts.
fn check_flags(d: &Deploy, accepted: &BTreeSet<String>) -> Vec<String> {
    let Some(c) = container(&d.daemonset) else {
        return vec!["DaemonSet: no container".into()];
    };
    let line = command_line(c);
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for flag in flag_names(&line) {
        if !accepted.contains(&flag) {
            problems.push(format!("`ebpf-proxy agent` has no flag {flag}"));
        }
        if !seen.insert(flag.clone()) {
            problems.push(format!("flag {flag} given twice"));
        }
    }
    problems
}

/// The long flags `ebpf-proxy agent --help` lists.
fn agent_flags() -> BTreeSet<String> {
    let output = Command::new(proxy_tests::agent_bin())
        .args(["agent", "--help"])
        .output()
        .expect("running ebpf-proxy agent --help");
    assert!(
        output.status.success(),
        "ebpf-proxy agent --help failed: {output:?}"
    );
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    let flags: BTreeSet<String> = help
        .lines()
        .filter_map(|line| {
            // "  -h, --help" / "      --bpffs <BPFFS>"
            line.trim_start()
                .split([',', ' '])
                .find(|word| word.starts_with("--"))
                .map(str::to_string)
        })
        .collect();
    assert!(
        flags.contains("--bpffs") && flags.contains("--help"),
        "unexpected help text:\n{help}"
    );
    flags
}

fn assert_none(check: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{check}:\n  {}", problems.join("\n  "));
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn every_document_parses_into_a_known_kind() {
    let d = load();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for doc in &d.documents {
        let kind = doc
            .raw
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        *kinds.entry(kind.to_string()).or_default() += 1;
    }
    for kind in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    ] {
        assert!(kinds.contains_key(kind), "no {kind} in deploy/: {kinds:?}");
    }
}

#[test]
fn unknown_kinds_are_refused() {
    let raw: Value =
        serde_saphyr::from_str("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap();
    let refused = std::panic::catch_unwind(|| parse_document(&raw, "test")).is_err();
    assert!(refused, "a ConfigMap must be refused");
    let wrong_version: Value =
        serde_saphyr::from_str("apiVersion: apps/v1beta2\nkind: DaemonSet\n").unwrap();
    let refused = std::panic::catch_unwind(|| parse_document(&wrong_version, "test")).is_err();
    assert!(refused, "a DaemonSet of apps/v1beta2 must be refused");
}

#[test]
fn documents_hold_no_unknown_fields() {
    assert_none("unknown fields", check_no_unknown_fields(&load()));
}

#[test]
fn kustomization_lists_existing_files_and_the_image() {
    assert_none("kustomization", check_kustomization(&load()));
}

#[test]
fn cluster_role_grants_exactly_api_access() {
    assert_none("ClusterRole", check_cluster_role(&load()));
}

#[test]
fn binding_ties_the_role_to_the_daemonsets_service_account() {
    assert_none("binding", check_binding(&load()));
}

#[test]
fn daemonset_pod_is_a_node_proxy() {
    assert_none("pod", check_pod(&load()));
}

#[test]
fn daemonset_is_unprivileged_with_the_documented_capabilities() {
    assert_none("security", check_security(&load()));
}

#[test]
fn daemonset_mounts_what_its_flags_name() {
    assert_none("command and mounts", check_command_and_mounts(&load()));
}

#[test]
fn daemonset_probes_use_the_healthz_port() {
    assert_none("probes", check_probes(&load()));
}

#[test]
fn daemonset_flags_are_flags_the_agent_accepts() {
    assert_none("flags", check_flags(&load(), &agent_flags()));
}

/// Each check notices the fault it is there for.
#[test]
fn checks_catch_broken_manifests() {
    let good = load();
    let flags = agent_flags();
    type Break = fn(&mut Deploy);
    type Check = fn(&Deploy, &BTreeSet<String>) -> Vec<String>;
    fn ds_container(d: &mut Deploy) -> &mut Container {
        &mut d
            .daemonset
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
    }
    fn pod(d: &mut Deploy) -> &mut k8s_openapi::api::core::v1::PodSpec {
        d.daemonset
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
    }
    fn set_flag(d: &mut Deploy, name: &str, value: &str) {
        let c = ds_container(d);
        let command = c.command.as_mut().unwrap();
        let prefix = format!("--{name}=");
        let arg = command.iter_mut().find(|a| a.starts_with(&prefix)).unwrap();
        *arg = format!("{prefix}{value}");
    }
    let cases: Vec<(&str, Break, Check)> = vec![
        (
            "a typo in a field name",
            |d| {
                let doc = d
                    .documents
                    .iter_mut()
                    .find(|x| matches!(x.object, Object::DaemonSet(_)))
                    .unwrap();
                let spec = doc.raw.get_mut("spec").unwrap().as_object_mut().unwrap();
                spec.insert("updateStrategi".into(), Value::Null);
                spec.insert("minReadySecond".into(), 5.into());
            },
            |d, _| check_no_unknown_fields(d),
        ),
        (
            "a resource file that does not exist",
            |d| {
                let resources = d
                    .kustomization
                    .get_mut("resources")
                    .unwrap()
                    .as_array_mut()
                    .unwrap();
                resources.push("missing.yaml".into());
            },
            |d, _| check_kustomization(d),
        ),
        (
            "a manifest the kustomization leaves out",
            |d| {
                let resources = d
                    .kustomization
                    .get_mut("resources")
                    .unwrap()
                    .as_array_mut()
                    .unwrap();
                resources.retain(|r| r.as_str() != Some("rbac.yaml"));
            },
            |d, _| check_kustomization(d),
        ),
        (
            "an image the kustomization does not set",
            |d| ds_container(d).image = Some("registry.example.com/other:v1".into()),
            |d, _| check_kustomization(d),
        ),
        (
            "a wildcard verb",
            |d| {
                d.cluster_role.rules.as_mut().unwrap()[0]
                    .verbs
                    .push("*".into())
            },
            |d, _| check_cluster_role(d),
        ),
        (
            "a verb the agent does not use",
            |d| {
                d.cluster_role.rules.as_mut().unwrap()[0]
                    .verbs
                    .push("get".into())
            },
            |d, _| check_cluster_role(d),
        ),
        (
            "a resource the agent uses, missing",
            |d| {
                d.cluster_role
                    .rules
                    .as_mut()
                    .unwrap()
                    .pop()
                    .map(drop)
                    .unwrap()
            },
            |d, _| check_cluster_role(d),
        ),
        (
            "the binding's subject in another namespace",
            |d| d.binding.subjects.as_mut().unwrap()[0].namespace = Some("default".into()),
            |d, _| check_binding(d),
        ),
        (
            "another service account in the DaemonSet",
            |d| pod(d).service_account_name = Some("default".into()),
            |d, _| check_binding(d),
        ),
        (
            "no host network",
            |d| pod(d).host_network = None,
            |d, _| check_pod(d),
        ),
        (
            "no catch-all toleration",
            |d| pod(d).tolerations = None,
            |d, _| check_pod(d),
        ),
        (
            "privileged",
            |d| {
                ds_container(d)
                    .security_context
                    .as_mut()
                    .unwrap()
                    .privileged = Some(true)
            },
            |d, _| check_security(d),
        ),
        (
            "one more capability",
            |d| {
                let sc = ds_container(d).security_context.as_mut().unwrap();
                sc.capabilities
                    .as_mut()
                    .unwrap()
                    .add
                    .as_mut()
                    .unwrap()
                    .push("SYS_PTRACE".into());
            },
            |d, _| check_security(d),
        ),
        (
            "Bidirectional propagation without privileges",
            |d| {
                let mounts = ds_container(d).volume_mounts.as_mut().unwrap();
                mounts[0].mount_propagation = Some("Bidirectional".into());
            },
            |d, _| check_security(d),
        ),
        (
            "pins outside the bpffs mount",
            |d| set_flag(d, "bpffs", "/var/run/ebpf-proxy"),
            |d, _| check_command_and_mounts(d),
        ),
        (
            "the bpffs volume from another host path",
            |d| {
                let volumes = pod(d).volumes.as_mut().unwrap();
                let bpffs = volumes.iter_mut().find(|v| v.name == "bpffs").unwrap();
                bpffs.host_path.as_mut().unwrap().path = "/run/bpf".into();
            },
            |d, _| check_command_and_mounts(d),
        ),
        (
            "a cgroup below the mounted root",
            |d| set_flag(d, "cgroup", "/sys/fs/cgroup/kubepods"),
            |d, _| check_command_and_mounts(d),
        ),
        (
            "the node name not from the downward API",
            |d| {
                let env = ds_container(d).env.as_mut().unwrap();
                env.retain(|e| e.name != "NODE_NAME");
            },
            |d, _| check_command_and_mounts(d),
        ),
        (
            "a probe on another port",
            |d| set_flag(d, "healthz-bind-address", "0.0.0.0:10999"),
            |d, _| check_probes(d),
        ),
        (
            "health on loopback only",
            |d| set_flag(d, "healthz-bind-address", "127.0.0.1:10256"),
            |d, _| check_probes(d),
        ),
        (
            "a flag the agent does not have",
            |d| {
                ds_container(d)
                    .command
                    .as_mut()
                    .unwrap()
                    .push("--proxy-mode=iptables".into())
            },
            |d, flags| check_flags(d, flags),
        ),
    ];
    for (fault, break_it, check) in cases {
        assert_none(&format!("before breaking ({fault})"), check(&good, &flags));
        let mut broken = good.clone();
        break_it(&mut broken);
        assert!(
            !check(&broken, &flags).is_empty(),
            "the check for {fault:?} did not notice it"
        );
    }
}
