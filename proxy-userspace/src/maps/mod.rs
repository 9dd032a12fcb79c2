//! The datapath's maps as the reconciler writes them and operators read
//! them. [`Datapath`] is what the reconciler needs; [`PinnedMaps`] is the
//! real thing (BPF maps pinned under `<bpffs>/maps/`), and tests use an
//! in-memory double. [`codec`] converts between model and map types.

pub mod codec;
#[cfg(test)]
pub mod memory;

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use proxy_common::{AffinityMatchKey, Backend, ServiceKey, ServiceValue, map_names, map_sizes};

/// A failed map operation, with the map and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map}")]
pub struct DatapathError {
    pub map: &'static str,
    pub op: &'static str,
    #[source]
    pub source: MapError,
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError { map, op, source }
}

/// How many entries each map the reconciler writes can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
    pub affinity_match: usize,
}

impl Capacity {
    /// The sizes the eBPF object declares.
    pub const PINNED: Capacity = Capacity {
        services: map_sizes::SERVICES as usize,
        backends: map_sizes::BACKENDS as usize,
        affinity_match: map_sizes::AFFINITY_MATCH as usize,
    };
}

/// The writable state of the datapath: frontends with their slots,
/// backends, and the affinity match set. The reconciler is its only writer.
pub trait Datapath {
    fn capacity(&self) -> Capacity;
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DatapathError>;
    fn backends(&self) -> Result<Vec<(u32, Backend)>, DatapathError>;
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, DatapathError>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), DatapathError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError>;
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError>;
    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError>;
    fn delete_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DatapathError>;
}

/// The directory under the agent's bpffs directory that holds the maps.
const MAPS_DIR: &str = "maps";

/// Where a map is pinned under the agent's bpffs directory.
pub fn pin_path(bpffs: &Path, map: &str) -> PathBuf {
    bpffs.join(MAPS_DIR).join(map)
}

/// Opens a pinned map, saying which one and where when it is missing.
pub fn open_pinned(bpffs: &Path, map: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(pin_path(bpffs, map)).map_err(map_err(map, "open pin"))
}

/// The maps the reconciler writes, opened from their pins.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    affinity_match: HashMap<MapData, AffinityMatchKey, u8>,
}

impl PinnedMaps {
    /// The maps an agent serves with, under `<bpffs>/maps/`.
    pub fn open(bpffs: &Path) -> Result<Self, DatapathError> {
        Self::open_in(&bpffs.join(MAPS_DIR))
    }

    /// The maps pinned in `dir` (during a migration: the new maps).
    pub fn open_in(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            services: open_hash(dir, map_names::SERVICES)?,
            backends: open_hash(dir, map_names::BACKENDS)?,
            affinity_match: open_hash(dir, map_names::AFFINITY_MATCH)?,
        })
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    map: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let data = MapData::from_pin(dir.join(map)).map_err(map_err(map, "open pin"))?;
    HashMap::try_from(Map::HashMap(data)).map_err(map_err(map, "open as hash"))
}

fn entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, DatapathError> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(name, "iterate"))
}

/// Deleting what is already gone is success: deletes are idempotent.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

impl Datapath for PinnedMaps {
    fn capacity(&self) -> Capacity {
        Capacity::PINNED
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DatapathError> {
        entries(&self.services, map_names::SERVICES)
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, DatapathError> {
        entries(&self.backends, map_names::BACKENDS)
    }

    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, DatapathError> {
        self.affinity_match
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::AFFINITY_MATCH, "iterate"))
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), DatapathError> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(map_names::SERVICES, "insert"))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        ignore_missing(self.services.remove(key)).map_err(map_err(map_names::SERVICES, "delete"))
    }

    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(map_err(map_names::BACKENDS, "insert"))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        ignore_missing(self.backends.remove(&id)).map_err(map_err(map_names::BACKENDS, "delete"))
    }

    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError> {
        self.affinity_match
            .insert(key, 1, 0)
            .map_err(map_err(map_names::AFFINITY_MATCH, "insert"))
    }

    fn delete_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DatapathError> {
        ignore_missing(self.affinity_match.remove(key))
            .map_err(map_err(map_names::AFFINITY_MATCH, "delete"))
    }
}
