//! The network namespaces whose sockets the socket-level programs
//! translate: those of the processes in the agent's cgroup subtree (the
//! pods), and the agent's own (host-network processes). Sockets belong to
//! a namespace, so each one is visited on a thread of its own that enters
//! it.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
    thread,
};

use anyhow::{Context, Result};

/// An open namespace: holding the file keeps it alive while it is visited.
pub struct Namespace {
    /// (device, inode) of the nsfs file: a namespace's identity.
    pub id: (u64, u64),
    file: File,
}

/// The agent's namespace and those of every process under `cgroup`,
/// each once. Processes that exit meanwhile are skipped.
pub fn translated_namespaces(cgroup: &Path) -> Result<Vec<Namespace>> {
    let mut namespaces = BTreeMap::new();
    let own = open("/proc/thread-self/ns/net").context("opening the agent's network namespace")?;
    namespaces.insert(own.id, own);
    let mut pids = Vec::new();
    cgroup_pids(cgroup, &mut pids)
        .with_context(|| format!("listing the processes under {}", cgroup.display()))?;
    for pid in pids {
        if let Ok(namespace) = open(&format!("/proc/{pid}/ns/net")) {
            namespaces.entry(namespace.id).or_insert(namespace);
        }
    }
    Ok(namespaces.into_values().collect())
}

fn open(path: &str) -> io::Result<Namespace> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    Ok(Namespace {
        id: (meta.dev(), meta.ino()),
        file,
    })
}

/// The pids in `cgroup.procs` of `dir` and of every cgroup below it. A
/// cgroup removed meanwhile is skipped.
fn cgroup_pids(dir: &Path, pids: &mut Vec<u32>) -> io::Result<()> {
    match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            cgroup_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

/// Runs `work` inside `namespace`, on a new thread that ends with it: the
/// caller's thread never changes namespace.
pub fn run_in<T: Send>(namespace: &Namespace, work: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only; the fd is open.
                let entered =
                    unsafe { libc::setns(namespace.file.as_raw_fd(), libc::CLONE_NEWNET) };
                if entered != 0 {
                    return Err(io::Error::last_os_error()).context("entering a network namespace");
                }
                Ok(work())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a socket walk thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cgroup_has_no_processes() {
        let mut pids = Vec::new();
        cgroup_pids(Path::new("/nonexistent-cgroup"), &mut pids).unwrap();
        assert!(pids.is_empty());
    }
}
