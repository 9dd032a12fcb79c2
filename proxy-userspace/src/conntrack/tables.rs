//! The conntrack tables and the maps the collector consults, behind a
//! small trait: [`PinnedConntrack`] is the real thing, tests use an
//! in-memory double. Reads tolerate entries vanishing under them: the
//! programs insert and the kernel's LRU evicts while we walk.

use std::{collections::HashMap as StdHashMap, path::Path};

use aya::maps::{HashMap, Map, MapData, MapError};
use proxy_common::{Backend, CtEntry, CtReply, Flow4, RevNat, map_names};

use crate::maps::{DatapathError, open_pinned};

/// What the collector reads and deletes.
pub trait ConntrackTables {
    /// How many flows `lb4_ct` can hold.
    fn capacity(&self) -> u64;
    fn flows(&self) -> Result<Vec<(Flow4, CtEntry)>, DatapathError>;
    fn flow(&self, key: &Flow4) -> Result<Option<CtEntry>, DatapathError>;
    fn delete_flow(&mut self, key: &Flow4) -> Result<(), DatapathError>;
    fn replies(&self) -> Result<Vec<(Flow4, CtReply)>, DatapathError>;
    fn reply(&self, key: &Flow4) -> Result<Option<CtReply>, DatapathError>;
    fn delete_reply(&mut self, key: &Flow4) -> Result<(), DatapathError>;
    fn backends(&self) -> Result<StdHashMap<u32, Backend>, DatapathError>;
    fn rev_nat(&self, id: u32) -> Result<Option<RevNat>, DatapathError>;
}

/// The pinned `lb4_ct`, `lb4_ct_reply`, `lb4_backends` and `lb4_rev_nat`.
pub struct PinnedConntrack {
    flows: Table<Flow4, CtEntry>,
    replies: Table<Flow4, CtReply>,
    backends: Table<u32, Backend>,
    rev_nat: Table<u32, RevNat>,
}

impl PinnedConntrack {
    pub fn open(bpffs: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            flows: Table::open(bpffs, map_names::CONNTRACK, Map::LruHashMap)?,
            replies: Table::open(bpffs, map_names::CT_REPLY, Map::LruHashMap)?,
            backends: Table::open(bpffs, map_names::BACKENDS, Map::HashMap)?,
            rev_nat: Table::open(bpffs, map_names::REV_NAT, Map::HashMap)?,
        })
    }

    /// Every rev-NAT entry: the frontends flows can name.
    pub fn rev_nats(&self) -> Result<StdHashMap<u32, RevNat>, DatapathError> {
        Ok(self.rev_nat.entries()?.into_iter().collect())
    }
}

/// One pinned hash map, with its name for errors and its capacity.
struct Table<K, V> {
    map: HashMap<MapData, K, V>,
    name: &'static str,
    max_entries: u32,
}

fn error(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError { map, op, source }
}

fn gone(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound => true,
        MapError::SyscallError(err) => err.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl<K: aya::Pod, V: aya::Pod> Table<K, V> {
    fn open(
        bpffs: &Path,
        name: &'static str,
        kind: fn(MapData) -> Map,
    ) -> Result<Self, DatapathError> {
        let data = open_pinned(bpffs, name)?;
        let max_entries = data.info().map_err(error(name, "read info"))?.max_entries();
        let map = HashMap::try_from(kind(data)).map_err(error(name, "open as hash"))?;
        Ok(Self {
            map,
            name,
            max_entries,
        })
    }

    fn get(&self, key: &K) -> Result<Option<V>, DatapathError> {
        match self.map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(err) if gone(&err) => Ok(None),
            Err(err) => Err(error(self.name, "lookup")(err)),
        }
    }

    fn remove(&mut self, key: &K) -> Result<(), DatapathError> {
        match self.map.remove(key) {
            Err(err) if !gone(&err) => Err(error(self.name, "delete")(err)),
            _ => Ok(()),
        }
    }

    /// The entries, visiting at most `max_entries` keys: a key deleted
    /// under the walk restarts the kernel's iteration from the first
    /// bucket, so under heavy churn an unbounded walk might not end. What a
    /// bounded walk misses, the next one sees.
    fn entries(&self) -> Result<Vec<(K, V)>, DatapathError> {
        let mut found = Vec::new();
        for key in self.map.keys().take(self.max_entries as usize) {
            let key = key.map_err(error(self.name, "iterate"))?;
            if let Some(value) = self.get(&key)? {
                found.push((key, value));
            }
        }
        Ok(found)
    }
}

impl ConntrackTables for PinnedConntrack {
    fn capacity(&self) -> u64 {
        u64::from(self.flows.max_entries)
    }

    fn flows(&self) -> Result<Vec<(Flow4, CtEntry)>, DatapathError> {
        self.flows.entries()
    }

    fn flow(&self, key: &Flow4) -> Result<Option<CtEntry>, DatapathError> {
        self.flows.get(key)
    }

    fn delete_flow(&mut self, key: &Flow4) -> Result<(), DatapathError> {
        self.flows.remove(key)
    }

    fn replies(&self) -> Result<Vec<(Flow4, CtReply)>, DatapathError> {
        self.replies.entries()
    }

    fn reply(&self, key: &Flow4) -> Result<Option<CtReply>, DatapathError> {
        self.replies.get(key)
    }

    fn delete_reply(&mut self, key: &Flow4) -> Result<(), DatapathError> {
        self.replies.remove(key)
    }

    fn backends(&self) -> Result<StdHashMap<u32, Backend>, DatapathError> {
        Ok(self.backends.entries()?.into_iter().collect())
    }

    fn rev_nat(&self, id: u32) -> Result<Option<RevNat>, DatapathError> {
        self.rev_nat.get(&id)
    }
}
