//! Stale socket termination (rule 30). The socket-level programs translate
//! a frontend at `connect()`, so a connected socket's peer is the backend
//! itself; once that backend is removed nothing translates the socket
//! again and it keeps talking to a dead address. After a sync deleted
//! backends, the sockets still connected to them are destroyed: the
//! application gets ECONNABORTED and connects again to a live backend.
//! UDP always; TCP only when asked (established TCP otherwise keeps its
//! backend until it closes, rule 29). Only sockets the programs translated
//! go: those with an entry in the socket rev-NAT map (cookie + backend);
//! a pod talking to a backend's address directly is left alone.
//!
//! Mechanism: sock_diag SOCK_DESTROY from userspace, in every network
//! namespace the programs translate for. (A BPF socket iterator calling
//! the bpf_sock_destroy kfunc would avoid the netlink dump, but aya 0.14
//! cannot relocate kfunc calls.)

mod diag;
mod netns;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use proxy_common::{SockRevNatKey, SockRevNatValue, map_names};

use crate::{
    maps::{codec, open_pinned},
    metrics::Metrics,
    model::{BackendAddr, Protocol},
};

/// Destroys connected sockets whose backend a sync removed. Cheap to clone.
#[derive(Clone)]
pub struct StaleSocketTerminator {
    inner: Arc<Inner>,
}

struct Inner {
    /// The agent's `--cgroup`: its subtree's processes are the pods whose
    /// sockets are translated.
    cgroup: PathBuf,
    /// The agent's `--bpffs`: the socket rev-NAT map is read from there.
    bpffs: PathBuf,
    /// Whether TCP sockets are destroyed too.
    tcp: bool,
    metrics: Metrics,
}

/// The peers whose sockets go, per protocol.
type Targets = BTreeMap<Protocol, BTreeSet<SocketAddrV4>>;

/// What one termination run did.
#[derive(Debug, Default)]
struct Terminated {
    udp: u64,
    tcp: u64,
    /// Namespaces visited.
    namespaces: usize,
    /// Namespaces where sock_diag failed, with the first failure.
    failed: usize,
    first_error: Option<String>,
}

impl StaleSocketTerminator {
    pub fn new(cgroup: PathBuf, bpffs: PathBuf, tcp: bool, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                cgroup,
                bpffs,
                tcp,
                metrics,
            }),
        }
    }

    /// After a sync: destroys the sockets connected to `removed`, on a
    /// blocking thread (it enters other namespaces and talks netlink), and
    /// logs one line if any went.
    pub fn after_sync(&self, removed: &[BackendAddr]) {
        let targets = targets(removed, self.inner.tcp);
        if targets.is_empty() {
            return;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.terminate(&targets));
    }
}

impl Inner {
    fn terminate(&self, targets: &Targets) {
        let started = Instant::now();
        let outcome = match self.run(targets) {
            Ok(outcome) => outcome,
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "cannot destroy stale sockets");
                return;
            }
        };
        self.metrics.count_stale_sockets("udp", outcome.udp);
        self.metrics.count_stale_sockets("tcp", outcome.tcp);
        if let Some(error) = &outcome.first_error {
            tracing::warn!(
                namespaces = outcome.namespaces,
                failed = outcome.failed,
                error = %error,
                "destroying stale sockets failed in some namespaces"
            );
        }
        if outcome.udp + outcome.tcp > 0 {
            tracing::info!(
                udp = outcome.udp,
                tcp = outcome.tcp,
                namespaces = outcome.namespaces,
                took = ?started.elapsed(),
                backends = %describe(targets),
                "destroyed sockets connected to removed backends"
            );
        }
    }

    fn run(&self, targets: &Targets) -> Result<Terminated> {
        let rev_nat: HashMap<MapData, SockRevNatKey, SockRevNatValue> =
            open_pinned(&self.bpffs, map_names::SOCK_REV_NAT)
                .map_err(anyhow::Error::from)
                .and_then(|data| Ok(HashMap::try_from(Map::LruHashMap(data))?))
                .context("opening the socket rev-NAT map")?;
        let translated = |socket: &diag::Connected| rev_nat.get(&rev_nat_key(socket), 0).is_ok();
        let mut outcome = Terminated::default();
        for namespace in netns::translated_namespaces(&self.cgroup)? {
            outcome.namespaces += 1;
            let destroyed = netns::run_in(&namespace, || {
                targets
                    .iter()
                    .map(|(protocol, peers)| {
                        diag::destroy_connected_to(*protocol, peers, &translated)
                            .map(|n| (*protocol, n))
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .and_then(|result| Ok(result?));
            match destroyed {
                Ok(counts) => {
                    for (protocol, n) in counts {
                        match protocol {
                            Protocol::Udp => outcome.udp += n,
                            Protocol::Tcp => outcome.tcp += n,
                        }
                    }
                }
                Err(err) => {
                    outcome.failed += 1;
                    outcome
                        .first_error
                        .get_or_insert_with(|| format!("namespace {:?}: {err:#}", namespace.id));
                }
            }
        }
        Ok(outcome)
    }
}

/// The socket rev-NAT key `connect()` stored for a translated socket.
fn rev_nat_key(socket: &diag::Connected) -> SockRevNatKey {
    SockRevNatKey {
        cookie: socket.cookie,
        addr: codec::addr_to_map(*socket.peer.ip()),
        port: codec::port_to_map(socket.peer.port()),
        _pad0: 0,
    }
}

/// The peers to look for: removed UDP backends, and TCP ones when `tcp`.
fn targets(removed: &[BackendAddr], tcp: bool) -> Targets {
    let mut targets = Targets::new();
    for backend in removed {
        if backend.protocol == Protocol::Tcp && !tcp {
            continue;
        }
        targets
            .entry(backend.protocol)
            .or_default()
            .insert(SocketAddrV4::new(backend.addr, backend.port));
    }
    targets
}

fn describe(targets: &Targets) -> String {
    let peers: Vec<String> = targets
        .iter()
        .flat_map(|(protocol, peers)| peers.iter().map(move |peer| format!("{peer}/{protocol:?}")))
        .collect();
    peers.join(",")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backend(last: u8, port: u16, protocol: Protocol) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(10, 244, 1, last),
            port,
            protocol,
        }
    }

    #[test]
    fn tcp_backends_are_targets_only_when_asked() {
        let removed = [
            backend(11, 5353, Protocol::Udp),
            backend(11, 8080, Protocol::Tcp),
        ];
        let udp_only = targets(&removed, false);
        assert_eq!(udp_only.len(), 1);
        assert!(udp_only[&Protocol::Udp].contains(&"10.244.1.11:5353".parse().unwrap()));
        let both = targets(&removed, true);
        assert!(both[&Protocol::Tcp].contains(&"10.244.1.11:8080".parse().unwrap()));
        assert_eq!(describe(&both), "10.244.1.11:8080/Tcp,10.244.1.11:5353/Udp");
    }

    /// connect4 stores the backend as the backends map holds it.
    #[test]
    fn rev_nat_key_is_what_connect_stored() {
        let stored = codec::backend(&backend(11, 5353, Protocol::Udp), false);
        let key = rev_nat_key(&diag::Connected {
            peer: "10.244.1.11:5353".parse().unwrap(),
            cookie: 7,
        });
        assert_eq!(
            (key.cookie, key.addr, key.port),
            (7, stored.addr, stored.port)
        );
    }

    #[test]
    fn nothing_removed_nothing_to_do() {
        assert!(targets(&[], true).is_empty());
        assert!(targets(&[backend(12, 8080, Protocol::Tcp)], false).is_empty());
    }
}
