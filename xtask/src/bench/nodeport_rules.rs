//! kube-proxy's rule layouts for the NodePort section, as kube-proxy
//! writes them on a node: every Service's ClusterIP rules, then the
//! NodePort dispatch, masquerade for what comes from outside. nat table
//! only: the filter table's rules only act on Services without endpoints.

use std::fmt::Write as _;

/// One Service port as the layouts need it: one TCP port, one endpoint.
pub struct RuleService {
    pub name: String,
    pub cluster_ip: String,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoint: String,
    pub target_port: u16,
}

/// The pod network: traffic from outside it to a ClusterIP is masqueraded
/// (kube-proxy's `--cluster-cidr`).
const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// iptables mode: PREROUTING and OUTPUT jump to KUBE-SERVICES, one rule
/// per ClusterIP there, and as its last rule the jump to KUBE-NODEPORTS
/// for local destinations; KUBE-EXT marks for masquerade, KUBE-SVC picks,
/// KUBE-SEP DNATs; KUBE-POSTROUTING masquerades what was marked.
pub fn iptables(services: &[RuleService]) -> String {
    let mut chains = String::with_capacity(services.len() * 150);
    let mut rules = String::with_capacity(services.len() * 700);
    chains.push_str(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for (i, s) in services.iter().enumerate() {
        let (svc, sep, ext) = (
            format!("KUBE-SVC-{i:06}"),
            format!("KUBE-SEP-{i:06}"),
            format!("KUBE-EXT-{i:06}"),
        );
        let comment = format!("bench/{}:tcp", s.name);
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp --dport {port} -j {svc}\n\
             -A {svc} ! -s {CLUSTER_CIDR} -d {ip}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ\n\
             -A {svc} -m comment --comment \"{comment} -> {ep}:{tp}\" -j {sep}\n\
             -A {sep} -s {ep}/32 -m comment --comment \"{comment}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"{comment}\" -m tcp -j DNAT --to-destination {ep}:{tp}",
            ip = s.cluster_ip,
            port = s.port,
            ep = s.endpoint,
            tp = s.target_port,
        );
        if let Some(node_port) = s.node_port {
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{comment}\" -m tcp --dport {node_port} -j {ext}\n\
                 -A {ext} -m comment --comment \"masquerade traffic for {comment} external destinations\" -j KUBE-MARK-MASQ\n\
                 -A {ext} -j {svc}"
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

/// nftables mode: verdict maps keyed by ClusterIP . protocol . port and
/// by protocol . nodePort (for local destinations), a chain per service
/// choosing with `numgen random`, an external chain marking for
/// masquerade, a chain per endpoint doing the DNAT, and the masquerading
/// chain at postrouting.
pub fn nftables(services: &[RuleService]) -> String {
    let mut s = String::with_capacity(services.len() * 800);
    s.push_str("table ip kube-proxy {\n  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    let elements = |s: &mut String, items: Vec<String>| {
        if !items.is_empty() {
            let _ = writeln!(
                s,
                "    elements = {{\n      {}\n    }}",
                items.join(",\n      ")
            );
        }
    };
    elements(
        &mut s,
        services
            .iter()
            .enumerate()
            .map(|(i, svc)| {
                format!(
                    "{} . tcp . {} : goto service-{i:06}",
                    svc.cluster_ip, svc.port
                )
            })
            .collect(),
    );
    s.push_str("  }\n  map service-nodeports {\n    type inet_proto . inet_service : verdict\n");
    elements(
        &mut s,
        services
            .iter()
            .enumerate()
            .filter_map(|(i, svc)| Some(format!("tcp . {} : goto external-{i:06}", svc.node_port?)))
            .collect(),
    );
    s.push_str(
        "  }\n\
         \x20 chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n\
         \x20 chain masquerading {\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n\
         \x20 chain nat-prerouting {\n    type nat hook prerouting priority -100; policy accept;\n    jump services\n  }\n\
         \x20 chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n\
         \x20 chain nat-postrouting {\n    type nat hook postrouting priority 100; policy accept;\n    jump masquerading\n  }\n\
         \x20 chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n    \
         fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n  }\n",
    );
    for (i, svc) in services.iter().enumerate() {
        let _ = writeln!(
            s,
            "  chain service-{i:06} {{\n    ip daddr {ip} tcp dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n    \
             numgen random mod 1 vmap {{ 0 : goto endpoint-{i:06} }}\n  }}\n  \
             chain endpoint-{i:06} {{\n    ip saddr {ep} jump mark-for-masquerade\n    meta l4proto tcp dnat to {ep}:{tp}\n  }}",
            ip = svc.cluster_ip,
            port = svc.port,
            ep = svc.endpoint,
            tp = svc.target_port,
        );
        if svc.node_port.is_some() {
            let _ = writeln!(
                s,
                "  chain external-{i:06} {{\n    jump mark-for-masquerade\n    goto service-{i:06}\n  }}"
            );
        }
    }
    s.push_str("}\n");
    s
}
