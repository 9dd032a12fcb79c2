//! Comparing two pin directories map by map, and carrying flow state from
//! old maps to new ones when only their size changed.

use std::{fs, io, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapInfo};
use proxy_common::{
    AffinityKey, AffinityValue, CtEntry, CtReply, Flow4, SockRevNatKey, SockRevNatValue, map_names,
};

use crate::maps::open_pinned_in;

/// Whether `dir` holds no pinned map (a first start).
pub fn is_empty(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(err) => Err(err).with_context(|| format!("listing {}", dir.display())),
    }
}

/// How the maps pinned in `current` differ from those in `wanted` (type,
/// key and value size, capacity, flags, or missing); empty when `current`
/// can be used as it is.
pub fn differences(current: &Path, wanted: &Path) -> Result<Vec<String>> {
    let mut differences = Vec::new();
    for name in map_names::ALL {
        let want = MapInfo::from_pin(wanted.join(name))
            .with_context(|| format!("reading map {name} in {}", wanted.display()))?;
        let Ok(have) = MapInfo::from_pin(current.join(name)) else {
            differences.push(format!("{name} missing"));
            continue;
        };
        let shape = |info: &MapInfo| {
            (
                info.map_type().ok(),
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                info.map_flags(),
            )
        };
        if shape(&have) != shape(&want) {
            differences.push(format!(
                "{name}: key {}B value {}B max {} flags {:#x} -> key {}B value {}B max {} flags {:#x}",
                have.key_size(),
                have.value_size(),
                have.max_entries(),
                have.map_flags(),
                want.key_size(),
                want.value_size(),
                want.max_entries(),
                want.map_flags(),
            ));
        }
    }
    Ok(differences)
}

/// Entries copied per map.
#[derive(Debug, Default)]
pub struct Copied {
    pub conntrack: usize,
    pub ct_reply: usize,
    pub affinity: usize,
    pub sock_rev_nat: usize,
}

/// Copies the tables the programs fill (conntrack and its reply half,
/// affinity, socket rev-NAT) from `from` to `to` where both have the same
/// key and value layout, so established flows survive a resize. What the
/// agent writes (frontends, backends) is programmed afresh instead.
pub fn copy_flow_state(from: &Path, to: &Path) -> Result<Copied> {
    Ok(Copied {
        conntrack: copy::<Flow4, CtEntry>(from, to, map_names::CONNTRACK)?,
        ct_reply: copy::<Flow4, CtReply>(from, to, map_names::CT_REPLY)?,
        affinity: copy::<AffinityKey, AffinityValue>(from, to, map_names::AFFINITY)?,
        sock_rev_nat: copy::<SockRevNatKey, SockRevNatValue>(from, to, map_names::SOCK_REV_NAT)?,
    })
}

fn copy<K: aya::Pod, V: aya::Pod>(from: &Path, to: &Path, name: &'static str) -> Result<usize> {
    let Ok(source) = open_pinned_in(from, name) else {
        return Ok(0);
    };
    let same_layout = source.info().is_ok_and(|info| {
        info.key_size() as usize == size_of::<K>() && info.value_size() as usize == size_of::<V>()
    });
    if !same_layout {
        return Ok(0);
    }
    let source: HashMap<MapData, K, V> = HashMap::try_from(Map::LruHashMap(source))
        .with_context(|| format!("opening old {name}"))?;
    let target = open_pinned_in(to, name).with_context(|| format!("opening new {name}"))?;
    let mut target: HashMap<MapData, K, V> = HashMap::try_from(Map::LruHashMap(target))
        .with_context(|| format!("opening new {name}"))?;
    let mut copied = 0;
    for entry in source.iter() {
        let Ok((key, value)) = entry else { continue };
        if target.insert(key, value, 0).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}
