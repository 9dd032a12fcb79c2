//! The kernel the datapath needs, checked before anything is pinned: on an
//! older kernel the programs would load and then fail at run time (an
//! unknown FIB lookup flag fails every SNAT lookup), so the agent refuses
//! to start instead, naming what is missing.

use std::{ffi::CStr, fmt, mem};

use anyhow::{Context, Result};

/// Replaces the release `uname` reports; for tests of the refusal.
pub const RELEASE_OVERRIDE_ENV: &str = "EBPF_PROXY_KERNEL_RELEASE";

/// What each kernel release adds that the datapath relies on, oldest first.
const FEATURES: [(KernelVersion, &str); 3] = [
    (
        KernelVersion { major: 6, minor: 1 },
        "bpf_set_retval in cgroup socket hooks (refusing a connect with ECONNREFUSED or EHOSTUNREACH)",
    ),
    (
        KernelVersion { major: 6, minor: 6 },
        "TCX links (tc programs attached next to others)",
    ),
    (
        KernelVersion { major: 6, minor: 7 },
        "BPF_FIB_LOOKUP_SRC (the source address of SNAT route lookups)",
    ),
];

/// The oldest kernel the datapath runs on.
pub const MINIMUM: KernelVersion = FEATURES[FEATURES.len() - 1].0;

/// A kernel release's major and minor number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl KernelVersion {
    /// From a release as `uname -r` prints it: "6.8.0-45-generic".
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut numbers = release.split(['.', '-', '+']).map(|part| {
            let digits = part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len());
            part[..digits].parse().ok()
        });
        Some(KernelVersion {
            major: numbers.next()??,
            minor: numbers.next()??,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "kernel {release} is too old: the datapath needs Linux >= {MINIMUM}; missing: {missing}"
    )]
    TooOld { release: String, missing: String },
    #[error("cannot tell the kernel version from release {0:?}")]
    Unparsable(String),
}

/// Fails when the running kernel (or [`RELEASE_OVERRIDE_ENV`]) is older than
/// [`MINIMUM`]; returns its version otherwise.
pub fn check() -> Result<KernelVersion> {
    let release = match std::env::var(RELEASE_OVERRIDE_ENV) {
        Ok(release) => release,
        Err(_) => running_release()?,
    };
    Ok(check_release(&release)?)
}

fn check_release(release: &str) -> Result<KernelVersion, KernelError> {
    let version =
        KernelVersion::parse(release).ok_or_else(|| KernelError::Unparsable(release.into()))?;
    let missing: Vec<String> = FEATURES
        .iter()
        .filter(|(since, _)| version < *since)
        .map(|(since, feature)| format!("{feature}, Linux {since}"))
        .collect();
    if !missing.is_empty() {
        return Err(KernelError::TooOld {
            release: release.into(),
            missing: missing.join("; "),
        });
    }
    Ok(version)
}

fn running_release() -> Result<String> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut names: libc::utsname = unsafe { mem::zeroed() };
    if unsafe { libc::uname(&mut names) } != 0 {
        return Err(std::io::Error::last_os_error()).context("uname");
    }
    // SAFETY: uname NUL-terminates release within the array.
    let release = unsafe { CStr::from_ptr(names.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_as_distributions_spell_them() {
        for (release, major, minor) in [
            ("6.18.44-fc-v669", 6, 18),
            ("6.8.0-45-generic", 6, 8),
            ("5.14.0-427.13.1.el9_4.x86_64", 5, 14),
            ("6.7", 6, 7),
            ("6.10-rc1", 6, 10),
            ("6.1.0+", 6, 1),
        ] {
            assert_eq!(
                KernelVersion::parse(release),
                Some(KernelVersion { major, minor }),
                "{release}"
            );
        }
        for release in ["", "6", "linux", "x.7"] {
            assert_eq!(KernelVersion::parse(release), None, "{release}");
        }
    }

    #[test]
    fn the_minimum_and_newer_pass_older_names_every_missing_feature() {
        assert_eq!(MINIMUM, KernelVersion { major: 6, minor: 7 });
        for release in ["6.7.0", "6.18.44-fc-v669", "7.0.1"] {
            assert!(check_release(release).is_ok(), "{release}");
        }
        let err = check_release("6.6.30").unwrap_err().to_string();
        assert!(err.contains("needs Linux >= 6.7"), "{err}");
        assert!(err.contains("BPF_FIB_LOOKUP_SRC"), "{err}");
        assert!(!err.contains("TCX"), "{err}");
        let err = check_release("5.10.0-21-amd64").unwrap_err().to_string();
        for feature in ["bpf_set_retval", "TCX", "BPF_FIB_LOOKUP_SRC"] {
            assert!(err.contains(feature), "{err}");
        }
        assert!(matches!(
            check_release("linux"),
            Err(KernelError::Unparsable(_))
        ));
    }

    #[test]
    fn the_running_kernel_reports_a_release() {
        assert!(KernelVersion::parse(&running_release().unwrap()).is_some());
    }
}
