//! The file systems the datapath needs: bpffs for pins, cgroup v2 for the
//! socket hooks. Missing ones are reported with the command that fixes them.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn fs_magic(path: &Path) -> Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid C string and stat a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type as i64)
}

/// `bpffs` (or, before the agent creates it, its nearest existing parent)
/// must be on a BPF file system.
pub fn check_bpffs(bpffs: &Path) -> Result<()> {
    let existing = bpffs
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    if fs_magic(existing)? != BPF_FS_MAGIC {
        bail!(
            "{} is not on a BPF file system: mount one with `mount -t bpf bpf /sys/fs/bpf` \
             (or run `cargo xtask setup`), or pass --bpffs under a bpffs mount",
            bpffs.display()
        );
    }
    Ok(())
}

pub fn check_cgroup2(cgroup: &Path) -> Result<()> {
    if !cgroup.is_dir() {
        bail!("cgroup {} does not exist", cgroup.display());
    }
    if fs_magic(cgroup)? != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory: pass --cgroup with a cgroup2 path, or mount \
             cgroup2 (`mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none \
             /sys/fs/cgroup/unified`, or run `cargo xtask setup`)",
            cgroup.display()
        );
    }
    Ok(())
}

/// The first cgroup2 mount point in this mount namespace.
pub fn default_cgroup2() -> Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount(&mountinfo).context(
        "no cgroup2 file system is mounted: mount one (`mkdir -p /sys/fs/cgroup/unified && \
         mount -t cgroup2 none /sys/fs/cgroup/unified`, or run `cargo xtask setup`) or pass --cgroup",
    )
}

/// Mount point of the first cgroup2 line of a mountinfo text: the fifth
/// field, where the file system type follows the " - " separator.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fs_type = fs.split_whitespace().next()?;
        let mount_point = mount.split_whitespace().nth(4)?;
        (fs_type == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_point() {
        let mountinfo = "\
25 1 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
30 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
41 25 0:38 / /sys/fs/cgroup/unified rw,relatime shared:20 - cgroup2 none rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("25 1 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
