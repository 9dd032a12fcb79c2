//! The datapath's maps as the reconciler writes them and operators read
//! them. [`Datapath`] is what the reconciler needs; [`PinnedMaps`] is the
//! real thing (BPF maps pinned under the agent's bpffs directory), and
//! tests use an in-memory double. [`codec`] converts between model and map
//! types.

mod batch;
pub mod codec;
#[cfg(test)]
pub mod memory;

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, HashOfMaps, LpmTrie, Map, MapData, MapError};
use proxy_common::{
    AffinityMatchKey, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, SourceRange, maglev,
    map_names,
};

use codec::SourceRangeEntry;

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

/// How many entries each map the reconciler writes can hold: the maps'
/// own `max_entries`, which the agent chooses when it creates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
    pub rev_nat: usize,
    pub source_ranges: usize,
    pub affinity_match: usize,
    pub maglev_tables: usize,
}

/// The writable state of the datapath: frontends (per scope) with their
/// slots, backends, rev-NAT entries, source ranges, the affinity match
/// set and Maglev tables. The reconciler is its only writer.
pub trait Datapath {
    fn capacity(&self) -> Capacity;
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DatapathError>;
    fn backends(&self) -> Result<Vec<(u32, Backend)>, DatapathError>;
    fn rev_nats(&self) -> Result<Vec<(u32, RevNat)>, DatapathError>;
    fn source_ranges(&self) -> Result<Vec<SourceRangeEntry>, DatapathError>;
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, DatapathError>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), DatapathError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError>;
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError>;
    fn put_rev_nat(&mut self, id: u32, rev_nat: RevNat) -> Result<(), DatapathError>;
    fn delete_rev_nat(&mut self, id: u32) -> Result<(), DatapathError>;
    fn put_source_range(&mut self, range: SourceRangeEntry) -> Result<(), DatapathError>;
    fn delete_source_range(&mut self, range: &SourceRangeEntry) -> Result<(), DatapathError>;
    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError>;
    fn delete_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DatapathError>;
    /// The keys of the Maglev tables; their contents are not read back
    /// (rebuilding a table costs less than reading it).
    fn maglev_tables(&self) -> Result<Vec<MaglevKey>, DatapathError>;
    /// Swaps in a new table under `key` whole: `table[0]` is its size M,
    /// `table[1..=M]` the backend ids ([`codec::maglev_table`]).
    fn put_maglev_table(&mut self, key: MaglevKey, table: &[u32]) -> Result<(), DatapathError>;
    fn delete_maglev_table(&mut self, key: &MaglevKey) -> Result<(), DatapathError>;
}

/// The directory under the agent's bpffs directory that holds the maps.
pub(crate) const MAPS_DIR: &str = "maps";

/// Where the maps are pinned under the agent's bpffs directory.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(MAPS_DIR)
}

/// Where a map is pinned under the agent's bpffs directory.
pub fn pin_path(bpffs: &Path, map: &str) -> PathBuf {
    maps_dir(bpffs).join(map)
}

/// Opens a pinned map, saying which one and where when it is missing.
pub fn open_pinned(bpffs: &Path, map: &'static str) -> Result<MapData, DatapathError> {
    open_pinned_in(&maps_dir(bpffs), map)
}

/// Opens a map pinned in `dir`: the agent's maps directory, or during a
/// migration the old or the new one.
pub fn open_pinned_in(dir: &Path, map: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(dir.join(map)).map_err(map_err(map, "open pin"))
}

/// The maps the reconciler writes, opened from their pins.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    affinity_match: HashMap<MapData, AffinityMatchKey, u8>,
    maglev: HashOfMaps<MapData, MaglevKey, Array<MapData, u32>>,
    capacity: Capacity,
}

impl PinnedMaps {
    /// The maps an agent serves with, under `<bpffs>/maps/`.
    pub fn open(bpffs: &Path) -> Result<Self, DatapathError> {
        Self::open_in(&maps_dir(bpffs))
    }

    /// The maps pinned in `dir` (during a migration: the new maps), each
    /// with its size as the kernel has it.
    pub fn open_in(dir: &Path) -> Result<Self, DatapathError> {
        let (services, services_max) = open_sized(dir, map_names::SERVICES)?;
        let (backends, backends_max) = open_sized(dir, map_names::BACKENDS)?;
        let (rev_nat, rev_nat_max) = open_sized(dir, map_names::REV_NAT)?;
        let (source_ranges, source_ranges_max) = open_sized(dir, map_names::SOURCE_RANGES)?;
        let (affinity_match, affinity_match_max) = open_sized(dir, map_names::AFFINITY_MATCH)?;
        let (maglev, maglev_max) = open_sized(dir, map_names::MAGLEV)?;
        Ok(Self {
            services: as_hash(services, map_names::SERVICES)?,
            backends: as_hash(backends, map_names::BACKENDS)?,
            rev_nat: as_hash(rev_nat, map_names::REV_NAT)?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(source_ranges))
                .map_err(map_err(map_names::SOURCE_RANGES, "open as LPM trie"))?,
            affinity_match: as_hash(affinity_match, map_names::AFFINITY_MATCH)?,
            maglev: HashOfMaps::try_from(Map::HashOfMaps(maglev))
                .map_err(map_err(map_names::MAGLEV, "open as hash of maps"))?,
            capacity: Capacity {
                services: services_max,
                backends: backends_max,
                rev_nat: rev_nat_max,
                source_ranges: source_ranges_max,
                affinity_match: affinity_match_max,
                maglev_tables: maglev_max,
            },
        })
    }
}

/// A map pinned in `dir` and its `max_entries`.
fn open_sized(dir: &Path, map: &'static str) -> Result<(MapData, usize), DatapathError> {
    let data = open_pinned_in(dir, map)?;
    let max_entries = data
        .info()
        .map_err(map_err(map, "read info"))?
        .max_entries();
    Ok((data, max_entries as usize))
}

fn as_hash<K: aya::Pod, V: aya::Pod>(
    data: MapData,
    map: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
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
        self.capacity
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DatapathError> {
        entries(&self.services, map_names::SERVICES)
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, DatapathError> {
        entries(&self.backends, map_names::BACKENDS)
    }

    fn rev_nats(&self) -> Result<Vec<(u32, RevNat)>, DatapathError> {
        entries(&self.rev_nat, map_names::REV_NAT)
    }

    fn source_ranges(&self) -> Result<Vec<SourceRangeEntry>, DatapathError> {
        let keys = self
            .source_ranges
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::SOURCE_RANGES, "iterate"))?;
        Ok(keys.iter().filter_map(codec::source_range_entry).collect())
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

    fn put_rev_nat(&mut self, id: u32, rev_nat: RevNat) -> Result<(), DatapathError> {
        self.rev_nat
            .insert(id, rev_nat, 0)
            .map_err(map_err(map_names::REV_NAT, "insert"))
    }

    fn delete_rev_nat(&mut self, id: u32) -> Result<(), DatapathError> {
        ignore_missing(self.rev_nat.remove(&id)).map_err(map_err(map_names::REV_NAT, "delete"))
    }

    fn put_source_range(&mut self, range: SourceRangeEntry) -> Result<(), DatapathError> {
        self.source_ranges
            .insert(&codec::source_range_key(&range), 1, 0)
            .map_err(map_err(map_names::SOURCE_RANGES, "insert"))
    }

    fn delete_source_range(&mut self, range: &SourceRangeEntry) -> Result<(), DatapathError> {
        ignore_missing(self.source_ranges.remove(&codec::source_range_key(range)))
            .map_err(map_err(map_names::SOURCE_RANGES, "delete"))
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

    fn maglev_tables(&self) -> Result<Vec<MaglevKey>, DatapathError> {
        self.maglev
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::MAGLEV, "iterate"))
    }

    fn put_maglev_table(&mut self, key: MaglevKey, table: &[u32]) -> Result<(), DatapathError> {
        let entries = u32::try_from(table.len()).unwrap_or(u32::MAX);
        // Not pinned: the outer map holds the only reference once the
        // table is in, so replacing or deleting its entry frees it.
        let mut inner = Array::<MapData, u32>::create(entries, maglev::INNER_MAP_FLAGS)
            .map_err(map_err(map_names::MAGLEV, "create table"))?;
        batch::fill_array(&mut inner, table).map_err(map_err(map_names::MAGLEV, "fill table"))?;
        self.maglev
            .insert(key, &inner, 0)
            .map_err(map_err(map_names::MAGLEV, "insert"))
    }

    fn delete_maglev_table(&mut self, key: &MaglevKey) -> Result<(), DatapathError> {
        ignore_missing(self.maglev.remove(key)).map_err(map_err(map_names::MAGLEV, "delete"))
    }
}
