//! Backend selection for a new flow, shared by the socket hooks and tc:
//! ClientIP affinity while it is fresh and still inside the frontend's
//! selected set (rule 23), otherwise a uniform pick; and the map reads
//! `proxy_common::lb` decides over.

use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, Counter, Flow4, MaglevKey, ServiceKey,
    ServiceValue, SourceRange, flow_hash, lb, maglev,
};

use crate::maps::{AFFINITY, AFFINITY_MATCH, BACKENDS, MAGLEV, SERVICES, SOURCE_RANGES, count};

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The datapath's maps as `proxy_common::lb` reads them.
pub struct Maps;

impl lb::LbMaps for Maps {
    #[inline(always)]
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        SERVICES.get_ptr(key).map(|value| unsafe { *value })
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<Backend> {
        BACKENDS.get_ptr(id).map(|value| unsafe { *value })
    }

    #[inline(always)]
    fn source_allowed(&self, rev_nat_id: u32, addr: u32) -> bool {
        let key = Key::new(
            SourceRange::LOOKUP_PREFIX_LEN,
            SourceRange::new(rev_nat_id, addr),
        );
        SOURCE_RANGES.get(&key).is_some()
    }
}

/// How a new flow without affinity picks its backend.
#[derive(Clone, Copy)]
pub enum Pick<'a> {
    /// Uniformly at random (socket level).
    Random,
    /// By the flow's Maglev slot when the frontend has a table (packet
    /// level), else at random.
    Maglev(&'a Flow4),
}

/// The backend id for a new flow of `client` (a netns cookie at socket
/// level, a marked IPv4 address at packet level).
#[inline(always)]
pub fn backend_for(
    client: u64,
    master_key: &ServiceKey,
    master: &ServiceValue,
    pick: Pick,
) -> Option<u32> {
    if master.affinity_timeout == 0 {
        return pick_backend(master_key, master, pick);
    }
    let now = (unsafe { bpf_ktime_get_ns() } / NANOS_PER_SEC) as u32;
    let affinity_key = AffinityKey {
        client,
        svc_id: master.svc_id,
        selection: master.selection as u32,
    };
    let mut backend_id = 0;
    if let Some(entry) = AFFINITY.get_ptr(affinity_key) {
        let entry = unsafe { *entry };
        let fresh = now.wrapping_sub(entry.last_used) <= master.affinity_timeout;
        let selected = AFFINITY_MATCH
            .get_ptr(AffinityMatchKey {
                backend_id: entry.backend_id,
                svc_id: master.svc_id,
                selection: master.selection as u32,
            })
            .is_some();
        if fresh && selected {
            count(Counter::AffinityHit);
            backend_id = entry.backend_id;
        }
    }
    if backend_id == 0 {
        backend_id = pick_backend(master_key, master, pick)?;
    }
    let refreshed = AffinityValue {
        backend_id,
        last_used: now,
    };
    // A failed refresh only costs stickiness for the next flow.
    let _ = AFFINITY.insert(affinity_key, refreshed, 0);
    Some(backend_id)
}

#[inline(always)]
fn pick_backend(master_key: &ServiceKey, master: &ServiceValue, pick: Pick) -> Option<u32> {
    if let Pick::Maglev(flow) = pick
        && let Some(backend_id) = maglev_backend(master, flow)
    {
        return Some(backend_id);
    }
    pick_slot(master_key, master.count)
}

/// The backend in the flow's slot of its frontend's Maglev table.
#[inline(always)]
fn maglev_backend(master: &ServiceValue, flow: &Flow4) -> Option<u32> {
    let key = MaglevKey {
        svc_id: master.svc_id,
        selection: master.selection as u32,
    };
    // SAFETY: tables are replaced whole, never written in place.
    let table = unsafe { MAGLEV.get(&key) }?;
    let size = *table.get(0)?;
    if size == 0 {
        return None;
    }
    table.get(maglev::slot(flow_hash(flow), size)).copied()
}

/// A uniformly chosen slot's backend id.
#[inline(always)]
fn pick_slot(master_key: &ServiceKey, count: u16) -> Option<u32> {
    let random = unsafe { bpf_get_prandom_u32() };
    SERVICES
        .get_ptr(master_key.with_slot(lb::slot_for(random, count)))
        .map(|value| unsafe { (*value).backend_id })
}
