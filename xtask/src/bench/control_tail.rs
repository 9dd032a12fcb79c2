//! The control plane's tail: many single endpoint changes, one after the
//! other, each timed from its write (or apply to the API server double)
//! to the agent's log line of the sync that wrote it to the maps; and the
//! kernel memory of the agent's maps.

use anyhow::Result;
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Seek as _, SeekFrom},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use super::{BACKENDS, Feed, synced_line, unix_now};

/// How long one change may take before the run stops waiting.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// `count` changes of the probe's single endpoint, cycling through the
/// backend addresses (the probe is at `BACKENDS[0]` before the first).
pub fn endpoint_changes(feed: &Feed, log: &Path, count: usize) -> Result<Value> {
    let mut file = fs::File::open(log)?;
    file.seek(SeekFrom::End(0))?;
    let mut reader = BufReader::new(file);
    let mut partial = String::new();
    let mut latencies = Vec::with_capacity(count);
    let mut problem = None;
    let started = Instant::now();
    for k in 0..count {
        let written = unix_now();
        feed.move_probe(BACKENDS[(k + 1) % BACKENDS.len()])?;
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let mut seen = None;
        while seen.is_none() {
            if reader.read_line(&mut partial)? == 0 || !partial.ends_with('\n') {
                if Instant::now() > deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            if let Some(Some((t, true))) = synced_line(partial.trim_end())
                && t >= written
            {
                seen = Some(t - written);
            }
            partial.clear();
        }
        match seen {
            Some(latency) => latencies.push(latency),
            None => {
                problem = Some(format!(
                    "change {} not logged as synced within {CHANGE_TIMEOUT:?}",
                    k + 1
                ));
                break;
            }
        }
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let quantile = |q: f64| -> Value {
        if sorted.is_empty() {
            return Value::Null;
        }
        json!(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
    };
    Ok(json!({
        "changes": latencies.len(),
        "asked": count,
        "p50_s": quantile(0.5),
        "p99_s": quantile(0.99),
        "max_s": sorted.last(),
        "run_s": started.elapsed().as_secs_f64(),
        "problem": problem,
    }))
}

/// The kernel memory charged to the maps `pid` holds open: `memlock` of
/// each distinct `map_id` in /proc/<pid>/fdinfo.
pub fn maps_memlock_bytes(pid: u32) -> Option<u64> {
    let mut maps = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, bytes);
        }
    }
    Some(maps.values().sum())
}
