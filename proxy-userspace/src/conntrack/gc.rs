//! Conntrack garbage collection: removes flows that are over (idle past
//! their timeout, or datagram flows whose backend left, rule 30) with their
//! reply entries, and reply entries no flow refers to.
//!
//! The programs keep writing while we walk, so every delete is decided on
//! a fresh read: a flow is deleted only if the entry is still the one
//! judged (Calico's rule), and a flow goes before its reply entry (the
//! programs insert the reply first), so a live flow never loses its reply
//! path.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use proxy_common::{CtEntry, CtReply, Flow4};

use super::{ConntrackTables, PinnedConntrack, Removal, Verdict, reply_key, verdict};
use crate::maps::DatapathError;

/// What one run found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Flows in `lb4_ct` when the run read it.
    pub scanned: u64,
    /// Flows left after the run.
    pub entries: u64,
    /// Reply entries left after the run: those a kept flow refers to and
    /// those awaiting a second look.
    pub replies: u64,
    /// How many flows `lb4_ct` can hold.
    pub capacity: u64,
    /// Flows removed as idle past their timeout.
    pub idle_timeout: u64,
    /// Datagram flows removed because their backend left.
    pub backend_gone: u64,
    /// Flows judged over but left alone: a packet or a new flow changed
    /// the entry before the delete.
    pub busy: u64,
    /// Reply entries removed because no flow referred to them.
    pub orphans_removed: u64,
    pub duration: Duration,
}

impl GcReport {
    pub fn removed(&self, why: Removal) -> u64 {
        match why {
            Removal::IdleTimeout => self.idle_timeout,
            Removal::BackendGone => self.backend_gone,
        }
    }

    fn count(&mut self, why: Removal) {
        match why {
            Removal::IdleTimeout => self.idle_timeout += 1,
            Removal::BackendGone => self.backend_gone += 1,
        }
    }

    /// Flows removed, for either reason.
    pub fn expired(&self) -> u64 {
        self.idle_timeout + self.backend_gone
    }
}

/// How long to wait before the next run: shorter while runs find much to
/// remove or the table fills up, longer while they find little.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcInterval {
    current: Duration,
}

impl Default for GcInterval {
    fn default() -> Self {
        Self {
            current: Self::FIRST,
        }
    }
}

impl GcInterval {
    pub const FIRST: Duration = Duration::from_secs(10);
    pub const MIN: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(60);

    pub fn current(&self) -> Duration {
        self.current
    }

    /// Halves the interval when a run removed more than a quarter of the
    /// flows or found the table over three quarters full; doubles it when
    /// a run removed at most one flow in twenty.
    pub fn update(&mut self, report: &GcReport) {
        let expired = report.expired();
        if expired * 4 > report.scanned || report.scanned * 4 > report.capacity * 3 {
            self.current = (self.current / 2).max(Self::MIN);
        } else if expired * 20 <= report.scanned {
            self.current = (self.current * 2).min(Self::MAX);
        }
    }
}

/// The collector the agent runs every [`ConntrackGc::next_interval`].
/// It opens the pinned maps on each run, so it follows maps an agent
/// replaced (a new layout) without a restart.
pub struct ConntrackGc {
    bpffs: PathBuf,
    orphans: OrphanReplies,
    interval: GcInterval,
}

impl ConntrackGc {
    pub fn new(bpffs: &Path) -> Self {
        Self {
            bpffs: bpffs.to_path_buf(),
            orphans: OrphanReplies::default(),
            interval: GcInterval::default(),
        }
    }

    /// One pass over the pinned tables; `now_ns` on the clock of
    /// [`super::monotonic_coarse_ns`].
    pub fn run_once(&mut self, now_ns: u64) -> Result<GcReport> {
        let mut tables = PinnedConntrack::open(&self.bpffs).with_context(|| {
            format!(
                "opening the conntrack maps under {}",
                crate::maps::maps_dir(&self.bpffs).display()
            )
        })?;
        let report = sweep(&mut tables, &mut self.orphans, now_ns)
            .context("collecting expired conntrack entries")?;
        self.interval.update(&report);
        Ok(report)
    }

    pub fn next_interval(&self) -> Duration {
        self.interval.current()
    }
}

/// Reply entries no flow referred to in the previous run, with their value
/// then. A flow's reply entry is inserted just before its flow entry, so
/// one run can meet a reply whose flow is not there yet; only one seen
/// orphaned, unchanged, by two consecutive runs is removed.
#[derive(Debug, Default)]
pub struct OrphanReplies {
    suspects: HashMap<Flow4, CtReply>,
}

/// One pass: removes what is over, then the orphaned replies.
pub fn sweep<T: ConntrackTables>(
    tables: &mut T,
    orphans: &mut OrphanReplies,
    now_ns: u64,
) -> Result<GcReport, DatapathError> {
    let started = Instant::now();
    let backends = tables.backends()?;
    // Replies first: a flow found below had its reply inserted before it.
    let replies = tables.replies()?;
    let flows = tables.flows()?;
    let mut report = GcReport {
        scanned: flows.len() as u64,
        capacity: tables.capacity(),
        ..GcReport::default()
    };
    let mut referenced = HashSet::with_capacity(flows.len());
    let mut vanished = 0;
    for (key, entry) in &flows {
        let current = match verdict(entry, now_ns, backends.get(&entry.backend_id)) {
            Verdict::Keep => Some(*entry),
            Verdict::Remove(why) => match remove_flow(tables, key, entry, why)? {
                Removed::Done => {
                    report.count(why);
                    None
                }
                Removed::Busy(current) => {
                    report.busy += 1;
                    Some(current)
                }
                Removed::AlreadyGone => {
                    vanished += 1;
                    None
                }
            },
        };
        if let Some(current) = current {
            referenced.insert(reply_key(key, &current));
        }
    }
    report.entries = report.scanned - report.expired() - vanished;
    report.orphans_removed = remove_orphans(tables, orphans, &replies, &referenced)?;
    // Those a kept flow refers to, and those awaiting a second look.
    let kept_for_flows = replies
        .iter()
        .filter(|(key, _)| referenced.contains(key))
        .count();
    report.replies = (kept_for_flows + orphans.suspects.len()) as u64;
    report.duration = started.elapsed();
    Ok(report)
}

enum Removed {
    Done,
    /// Still there, changed since it was judged: kept.
    Busy(CtEntry),
    /// Deleted or evicted by someone else.
    AlreadyGone,
}

/// Deletes a flow judged over, if it still is, then its reply entry.
fn remove_flow<T: ConntrackTables>(
    tables: &mut T,
    key: &Flow4,
    judged: &CtEntry,
    why: Removal,
) -> Result<Removed, DatapathError> {
    let Some(current) = tables.flow(key)? else {
        return Ok(Removed::AlreadyGone);
    };
    if !unchanged(why, judged, &current) {
        return Ok(Removed::Busy(current));
    }
    tables.delete_flow(key)?;
    let reply = reply_key(key, judged);
    let ours = tables
        .reply(&reply)?
        .is_some_and(|value| belongs_to(&value, key, judged));
    // The client's next packet may have started the flow anew, to the same
    // backend: the reply entry is then the new flow's.
    if ours
        && tables
            .flow(key)?
            .is_none_or(|renewed| reply_key(key, &renewed) != reply)
    {
        tables.delete_reply(&reply)?;
    }
    Ok(Removed::Done)
}

/// Whether the entry re-read before a delete is the one judged. An idle
/// flow must not have seen a packet since; a datagram flow whose backend
/// left is over whatever its traffic, unless the programs already sent it
/// elsewhere.
fn unchanged(why: Removal, judged: &CtEntry, current: &CtEntry) -> bool {
    match why {
        Removal::IdleTimeout => current.last_seen == judged.last_seen,
        Removal::BackendGone => {
            (
                current.backend_id,
                current.backend_addr,
                current.backend_port,
            ) == (judged.backend_id, judged.backend_addr, judged.backend_port)
        }
    }
}

/// Whether a reply entry turns replies back towards this flow's client.
fn belongs_to(reply: &CtReply, key: &Flow4, entry: &CtEntry) -> bool {
    reply.client_addr == key.saddr
        && reply.client_port == key.sport
        && reply.rev_nat_id == entry.rev_nat_id
}

/// Removes the replies no flow refers to that the previous run saw
/// orphaned too; remembers this run's for the next.
fn remove_orphans<T: ConntrackTables>(
    tables: &mut T,
    orphans: &mut OrphanReplies,
    replies: &[(Flow4, CtReply)],
    referenced: &HashSet<Flow4>,
) -> Result<u64, DatapathError> {
    let mut suspects = HashMap::new();
    let mut removed = 0;
    for (key, value) in replies {
        if referenced.contains(key) || tables.reply(key)? != Some(*value) {
            continue;
        }
        if orphans.suspects.get(key) != Some(value) {
            suspects.insert(*key, *value);
            continue;
        }
        if !has_flow(tables, key, value)? {
            tables.delete_reply(key)?;
            removed += 1;
        }
    }
    orphans.suspects = suspects;
    Ok(removed)
}

/// Whether the flow a reply entry belongs to (client -> its frontend)
/// exists now and refers to it. Without a frontend there is no such flow.
fn has_flow<T: ConntrackTables>(
    tables: &T,
    key: &Flow4,
    reply: &CtReply,
) -> Result<bool, DatapathError> {
    let Some(frontend) = tables.rev_nat(reply.rev_nat_id)? else {
        return Ok(false);
    };
    let flow = Flow4::new(
        reply.client_addr,
        frontend.addr,
        reply.client_port,
        frontend.port,
        key.proto,
    );
    Ok(tables
        .flow(&flow)?
        .is_some_and(|entry| reply_key(&flow, &entry) == *key))
}

#[cfg(test)]
mod tests {
    use std::{
        cell::RefCell,
        collections::{BTreeMap, HashMap},
    };

    use proxy_common::{Backend, RevNat, ct_state, proto};

    use super::*;
    use crate::conntrack::tests::{SECOND, addr, backend_of, client_flow, entry, port, snat};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        ReadFlow(Flow4),
        DeleteFlow(Flow4),
        DeleteReply(Flow4),
    }

    /// The tables in memory. `writes` plays the programs: a write queued
    /// for a flow lands just before the collector's next lookup of it.
    #[derive(Default)]
    struct MemoryTables {
        flows: RefCell<BTreeMap<Flow4, CtEntry>>,
        replies: BTreeMap<Flow4, CtReply>,
        backends: HashMap<u32, Backend>,
        rev_nat: HashMap<u32, RevNat>,
        capacity: u64,
        writes: RefCell<HashMap<Flow4, CtEntry>>,
        /// Flows the client starts again, to the same backend, the moment
        /// they are deleted.
        restart_on_delete: HashMap<Flow4, CtEntry>,
        ops: RefCell<Vec<Op>>,
    }

    impl ConntrackTables for MemoryTables {
        fn capacity(&self) -> u64 {
            self.capacity
        }
        fn flows(&self) -> Result<Vec<(Flow4, CtEntry)>, DatapathError> {
            Ok(self.flows.borrow().iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn flow(&self, key: &Flow4) -> Result<Option<CtEntry>, DatapathError> {
            self.ops.borrow_mut().push(Op::ReadFlow(*key));
            if let Some(written) = self.writes.borrow_mut().remove(key) {
                self.flows.borrow_mut().insert(*key, written);
            }
            Ok(self.flows.borrow().get(key).copied())
        }
        fn delete_flow(&mut self, key: &Flow4) -> Result<(), DatapathError> {
            self.ops.borrow_mut().push(Op::DeleteFlow(*key));
            self.flows.borrow_mut().remove(key);
            if let Some(restarted) = self.restart_on_delete.get(key) {
                self.write_after_scan(*key, *restarted);
            }
            Ok(())
        }
        fn replies(&self) -> Result<Vec<(Flow4, CtReply)>, DatapathError> {
            Ok(self.replies.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn reply(&self, key: &Flow4) -> Result<Option<CtReply>, DatapathError> {
            Ok(self.replies.get(key).copied())
        }
        fn delete_reply(&mut self, key: &Flow4) -> Result<(), DatapathError> {
            self.ops.borrow_mut().push(Op::DeleteReply(*key));
            self.replies.remove(key);
            Ok(())
        }
        fn backends(&self) -> Result<HashMap<u32, Backend>, DatapathError> {
            Ok(self.backends.clone())
        }
        fn rev_nat(&self, id: u32) -> Result<Option<RevNat>, DatapathError> {
            Ok(self.rev_nat.get(&id).copied())
        }
    }

    impl MemoryTables {
        /// Backend 11 and frontend (rev-NAT id 5) of the test entries.
        fn new() -> Self {
            let mut tables = Self {
                capacity: 1000,
                ..Self::default()
            };
            tables
                .backends
                .insert(11, backend_of(&entry(ct_state::DATAGRAM, 0)));
            tables.rev_nat.insert(
                5,
                RevNat {
                    addr: addr(192, 168, 1, 10),
                    port: port(30080),
                    _pad0: 0,
                },
            );
            tables
        }

        /// A flow and its reply entry, as the programs insert them.
        fn track(&mut self, flow: Flow4, entry: CtEntry) {
            self.replies
                .insert(reply_key(&flow, &entry), reply_of(&flow, &entry));
            self.flows.borrow_mut().insert(flow, entry);
        }

        /// The programs write `entry` for `flow` after the next scan.
        fn write_after_scan(&self, flow: Flow4, entry: CtEntry) {
            self.writes.borrow_mut().insert(flow, entry);
        }

        fn flow_keys(&self) -> Vec<Flow4> {
            self.flows.borrow().keys().copied().collect()
        }

        fn sweep(&mut self, orphans: &mut OrphanReplies) -> GcReport {
            sweep(self, orphans, NOW).unwrap()
        }
    }

    fn reply_of(flow: &Flow4, entry: &CtEntry) -> CtReply {
        CtReply {
            client_addr: flow.saddr,
            rev_nat_id: entry.rev_nat_id,
            client_port: flow.sport,
            flags: entry.flags,
            _pad0: 0,
        }
    }

    const NOW: u64 = 100_000 * SECOND;

    #[test]
    fn expired_flows_go_with_their_replies_live_ones_stay() {
        let mut tables = MemoryTables::new();
        let live = client_flow(40001, proto::TCP);
        let live_entry = entry(ct_state::TCP_ESTABLISHED, NOW - 3600 * SECOND);
        tables.track(live, live_entry);
        tables.track(
            client_flow(40002, proto::TCP),
            snat(entry(ct_state::TCP_SYN, NOW - 61 * SECOND), 61_001),
        );
        tables.track(
            client_flow(40003, proto::TCP),
            entry(ct_state::TCP_CLOSING, NOW - 11 * SECOND),
        );
        tables.track(
            client_flow(40004, proto::UDP),
            entry(ct_state::DATAGRAM, NOW - 60 * SECOND),
        );
        let report = tables.sweep(&mut OrphanReplies::default());
        assert_eq!(tables.flow_keys(), [live]);
        assert_eq!(
            tables.replies.keys().copied().collect::<Vec<_>>(),
            [reply_key(&live, &live_entry)]
        );
        assert_eq!(
            (report.scanned, report.entries, report.idle_timeout),
            (4, 1, 3)
        );
        assert_eq!(
            (report.backend_gone, report.busy, report.orphans_removed),
            (0, 0, 0)
        );
        assert_eq!(report.capacity, 1000);
    }

    #[test]
    fn the_flow_is_deleted_before_its_reply_each_after_a_fresh_read() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::TCP);
        let expired = snat(entry(ct_state::TCP_CLOSING, NOW - 20 * SECOND), 61_001);
        tables.track(flow, expired);
        tables.sweep(&mut OrphanReplies::default());
        assert_eq!(
            *tables.ops.borrow(),
            [
                Op::ReadFlow(flow),
                Op::DeleteFlow(flow),
                Op::ReadFlow(flow),
                Op::DeleteReply(reply_key(&flow, &expired)),
            ]
        );
    }

    #[test]
    fn rule_30_datagram_flows_of_a_removed_backend_go_tcp_flows_stay() {
        let mut tables = MemoryTables::new();
        let udp = client_flow(40001, proto::UDP);
        let tcp = client_flow(40002, proto::TCP);
        tables.track(udp, entry(ct_state::DATAGRAM, NOW));
        tables.track(tcp, entry(ct_state::TCP_ESTABLISHED, NOW));
        tables.backends.clear();
        let report = tables.sweep(&mut OrphanReplies::default());
        assert_eq!(tables.flow_keys(), [tcp]);
        assert_eq!(tables.replies.len(), 1);
        assert_eq!((report.backend_gone, report.idle_timeout), (1, 0));
    }

    #[test]
    fn a_flow_that_saw_a_packet_after_the_scan_is_kept_with_its_reply() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::TCP);
        let idle = entry(ct_state::TCP_ESTABLISHED, NOW - 7 * 3600 * SECOND);
        tables.track(flow, idle);
        tables.write_after_scan(
            flow,
            CtEntry {
                last_seen: NOW,
                ..idle
            },
        );
        let mut orphans = OrphanReplies::default();
        let report = tables.sweep(&mut orphans);
        assert_eq!(
            (report.busy, report.idle_timeout, report.entries),
            (1, 0, 1)
        );
        assert_eq!(tables.flow_keys(), [flow]);
        // Its reply is referenced, never suspected.
        tables.sweep(&mut orphans);
        assert_eq!(tables.replies.len(), 1);
    }

    #[test]
    fn a_udp_flow_sent_to_a_live_backend_meanwhile_is_kept() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::UDP);
        let stale = CtEntry {
            backend_id: 12,
            backend_addr: addr(10, 244, 1, 12),
            ..entry(ct_state::DATAGRAM, NOW - SECOND)
        };
        tables.track(flow, stale);
        let moved = entry(ct_state::DATAGRAM, NOW);
        tables
            .replies
            .insert(reply_key(&flow, &moved), reply_of(&flow, &moved));
        tables.write_after_scan(flow, moved);
        let report = tables.sweep(&mut OrphanReplies::default());
        assert_eq!((report.busy, report.backend_gone), (1, 0));
        assert!(tables.replies.contains_key(&reply_key(&flow, &moved)));
    }

    #[test]
    fn a_busy_datagram_flow_of_a_removed_backend_still_goes() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::UDP);
        let judged = entry(ct_state::DATAGRAM, NOW - SECOND);
        tables.track(flow, judged);
        tables.backends.clear();
        tables.write_after_scan(
            flow,
            CtEntry {
                last_seen: NOW,
                ..judged
            },
        );
        let report = tables.sweep(&mut OrphanReplies::default());
        assert_eq!(report.backend_gone, 1);
        assert!(tables.flow_keys().is_empty() && tables.replies.is_empty());
    }

    #[test]
    fn a_reply_entry_another_flow_took_over_is_left() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::TCP);
        let expired = entry(ct_state::TCP_CLOSING, NOW - 20 * SECOND);
        tables.track(flow, expired);
        let reply = reply_key(&flow, &expired);
        let other = CtReply {
            rev_nat_id: 6,
            ..tables.replies[&reply]
        };
        tables.replies.insert(reply, other);
        tables.sweep(&mut OrphanReplies::default());
        assert!(tables.flow_keys().is_empty());
        assert_eq!(tables.replies.get(&reply), Some(&other));
    }

    #[test]
    fn a_flow_started_anew_right_after_the_delete_keeps_the_reply() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::UDP);
        tables.track(flow, entry(ct_state::DATAGRAM, NOW - 60 * SECOND));
        tables
            .restart_on_delete
            .insert(flow, entry(ct_state::DATAGRAM, NOW));
        let report = tables.sweep(&mut OrphanReplies::default());
        assert_eq!(report.idle_timeout, 1);
        assert_eq!(tables.replies.len(), 1);
    }

    #[test]
    fn orphan_replies_go_on_the_second_run_that_sees_them() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::UDP);
        let gone = entry(ct_state::DATAGRAM, NOW);
        tables
            .replies
            .insert(reply_key(&flow, &gone), reply_of(&flow, &gone));
        let mut orphans = OrphanReplies::default();
        assert_eq!(tables.sweep(&mut orphans).orphans_removed, 0);
        assert_eq!(tables.replies.len(), 1);
        assert_eq!(tables.sweep(&mut orphans).orphans_removed, 1);
        assert!(tables.replies.is_empty());
    }

    #[test]
    fn a_reply_whose_flow_arrives_between_runs_is_kept() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::UDP);
        let new = entry(ct_state::DATAGRAM, NOW);
        // The programs inserted the reply; the flow entry follows.
        tables
            .replies
            .insert(reply_key(&flow, &new), reply_of(&flow, &new));
        let mut orphans = OrphanReplies::default();
        tables.sweep(&mut orphans);
        tables.flows.borrow_mut().insert(flow, new);
        assert_eq!(tables.sweep(&mut orphans).orphans_removed, 0);
        assert_eq!(tables.sweep(&mut orphans).orphans_removed, 0);
        assert_eq!(tables.replies.len(), 1);
    }

    #[test]
    fn a_suspect_whose_flow_appears_just_before_the_delete_is_kept() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::UDP);
        let new = entry(ct_state::DATAGRAM, NOW);
        tables
            .replies
            .insert(reply_key(&flow, &new), reply_of(&flow, &new));
        let mut orphans = OrphanReplies::default();
        tables.sweep(&mut orphans);
        // Missed by the second run's scan, there for the confirming lookup.
        tables.write_after_scan(flow, new);
        assert_eq!(tables.sweep(&mut orphans).orphans_removed, 0);
        assert_eq!(tables.replies.len(), 1);
    }

    #[test]
    fn a_suspect_rewritten_between_runs_starts_over() {
        let mut tables = MemoryTables::new();
        let flow = client_flow(40001, proto::UDP);
        let gone = entry(ct_state::DATAGRAM, NOW);
        let key = reply_key(&flow, &gone);
        tables.replies.insert(key, reply_of(&flow, &gone));
        let mut orphans = OrphanReplies::default();
        tables.sweep(&mut orphans);
        let rewritten = CtReply {
            rev_nat_id: 6,
            ..tables.replies[&key]
        };
        tables.replies.insert(key, rewritten);
        assert_eq!(tables.sweep(&mut orphans).orphans_removed, 0);
        assert_eq!(tables.sweep(&mut orphans).orphans_removed, 1);
    }

    fn report(scanned: u64, expired: u64, capacity: u64) -> GcReport {
        GcReport {
            scanned,
            idle_timeout: expired,
            capacity,
            ..GcReport::default()
        }
    }

    #[test]
    fn the_interval_shortens_under_pressure_and_grows_when_little_expires() {
        let mut interval = GcInterval::default();
        assert_eq!(interval.current(), Duration::from_secs(10));
        interval.update(&report(100, 26, 1000));
        assert_eq!(interval.current(), Duration::from_secs(5));
        interval.update(&report(751, 0, 1000));
        assert_eq!(interval.current(), Duration::from_millis(2500));
        for _ in 0..5 {
            interval.update(&report(800, 400, 1000));
        }
        assert_eq!(interval.current(), GcInterval::MIN);
        interval.update(&report(100, 5, 1000));
        assert_eq!(interval.current(), Duration::from_secs(2));
        // Between a twentieth and a quarter: unchanged.
        interval.update(&report(100, 10, 1000));
        assert_eq!(interval.current(), Duration::from_secs(2));
        for _ in 0..10 {
            interval.update(&report(0, 0, 1000));
        }
        assert_eq!(interval.current(), GcInterval::MAX);
    }
}
