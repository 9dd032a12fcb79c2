//! Detaching a pinned BPF link at once. Unpinning alone leaves the kernel
//! to release the link from a work queue a moment later, so a program
//! could still run after `ebpf-proxy uninstall` returned; BPF_LINK_DETACH
//! (Linux 5.9+; aya has no call for it) takes it off its hook before the
//! command returns.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The `obj_pin` member of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `link_detach` member of `union bpf_attr`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, initialized prefix of `union bpf_attr` for
    // this command; the kernel zero-fills the rest and reads nothing past
    // the size given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// Takes the link pinned at `pin` off its hook; the pin itself stays.
pub fn detach_pinned_link(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let fd = bpf(
        BPF_OBJ_GET,
        &ObjGetAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        },
    )?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    bpf(
        BPF_LINK_DETACH,
        &LinkDetachAttr {
            link_fd: link.as_raw_fd() as u32,
        },
    )?;
    Ok(())
}
