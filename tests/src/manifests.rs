//! Service and EndpointSlice manifests (namespace `demo`) for the agent's
//! `--manifests` directory, written the way the API server would return
//! them. Ports are `(name, port, protocol)`; `u32` so that tests can
//! write invalid ones.

/// How these manifests are read: the options of the agent's
/// `proxy_userspace::source::manifests::yaml_options` (this library cannot
/// depend on the agent, whose build needs the eBPF toolchain), so a label
/// `x: y` stays a string.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

/// `  - {name: http, port: 80, protocol: TCP}` lines.
pub fn port_lines(ports: &[(&str, u32, &str)]) -> String {
    let lines: Vec<String> = ports
        .iter()
        .map(|(name, port, proto)| format!("  - {{name: {name}, port: {port}, protocol: {proto}}}"))
        .collect();
    lines.join("\n")
}

/// A Service in namespace `demo` on `vip` with `labels` (`key: value, ...`,
/// none if empty); `extra_spec` is spec lines.
pub fn service_with(
    name: &str,
    vip: &str,
    ports: &[(&str, u32, &str)],
    labels: &str,
    extra_spec: &str,
) -> String {
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(", labels: {{{labels}}}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo{labels}}}\nspec:\n  clusterIP: {vip}\n{extra_spec}  ports:\n{}\n",
        port_lines(ports)
    )
}

/// The EndpointSlice `name` of `service` with ready endpoints
/// `(address, nodeName)` and `labels` (`key: value, ...`) besides the
/// service name.
pub fn endpoint_slice(
    name: &str,
    service: &str,
    ports: &[(&str, u32, &str)],
    endpoints: &[(&str, &str)],
    labels: &str,
) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(addr, node)| {
            format!("  - {{addresses: ['{addr}'], conditions: {{ready: true}}, nodeName: {node}}}")
        })
        .collect();
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(", {labels}")
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {service}{labels}}}\naddressType: IPv4\nports:\n{}\nendpoints:{}\n{}\n",
        port_lines(ports),
        if endpoints.is_empty() { " []" } else { "" },
        endpoints.join("\n")
    )
}

/// A Node object with `internal_ip` and a zone label, as the agent reads
/// its own (`--hostname-override`) from the manifests.
pub fn node(name: &str, internal_ip: &str, pod_cidr: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}, topology.kubernetes.io/zone: {zone}}}\nspec:\n  podCIDR: {pod_cidr}\n  podCIDRs: [{pod_cidr}]\nstatus:\n  addresses: [{{type: InternalIP, address: {internal_ip}}}, {{type: Hostname, address: {name}}}]\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text as the agent reads it.
    fn parse(yaml: &str) -> serde_json::Value {
        serde_saphyr::from_str_with_options(yaml, yaml_options()).unwrap()
    }

    #[test]
    fn slice_lists_endpoints_with_their_nodes() {
        let yaml = endpoint_slice(
            "web-x1",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.244.1.11", "node1"), ("10.244.2.11", "node2")],
            "",
        );
        let v = parse(&yaml);
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(v["endpoints"][1]["nodeName"], "node2");
        assert_eq!(v["endpoints"][1]["addresses"][0], "10.244.2.11");
        assert_eq!(v["ports"][0]["port"], 8080);

        let empty = endpoint_slice("web-x1", "web", &[("http", 8080, "TCP")], &[], "a: b");
        let v = parse(&empty);
        assert_eq!(v["endpoints"].as_array().unwrap().len(), 0);
        assert_eq!(v["metadata"]["labels"]["a"], "b");
    }

    #[test]
    fn service_and_node_parse() {
        let svc = service_with(
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP")],
            "x: y",
            "  type: NodePort\n",
        );
        let v = parse(&svc);
        assert_eq!(v["spec"]["type"], "NodePort");
        assert_eq!(v["metadata"]["labels"]["x"], "y");
        let n = parse(&node("node1", "192.168.0.2", "10.244.1.0/24", "a"));
        assert_eq!(n["status"]["addresses"][0]["address"], "192.168.0.2");
        assert_eq!(n["spec"]["podCIDRs"][0], "10.244.1.0/24");
    }
}
