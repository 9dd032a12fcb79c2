//! Filling a new array map in one `BPF_MAP_UPDATE_BATCH` call (aya 0.14
//! has no batch API): a Maglev table of 16k entries costs one syscall
//! instead of 16k.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    maps::{Array, IterableMap as _, MapData, MapError},
    sys::SyscallError,
};

/// `enum bpf_cmd` (uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel-internal "not supported" some map types answer with.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Sets entries `0..values.len()` of `array` to `values`: in one batch,
/// or one by one where the kernel has no batch update for arrays (before
/// 5.6).
pub fn fill_array(array: &mut Array<MapData, u32>, values: &[u32]) -> Result<(), MapError> {
    let count = u32::try_from(values.len()).map_err(|_| MapError::OutOfBounds {
        index: u32::MAX,
        max_entries: array.len(),
    })?;
    let keys: Vec<u32> = (0..count).collect();
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: array.map().fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `union bpf_attr` prefix; `keys` and
    // `values` hold `count` u32s each and outlive the call; the kernel
    // writes back only `attr.count`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>() as u32,
        )
    };
    let io_error = match result {
        0 if attr.count == count => return Ok(()),
        0 => io::Error::other(format!("{} of {count} entries written", attr.count)),
        _ => io::Error::last_os_error(),
    };
    match io_error.raw_os_error() {
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) => {
            for (index, value) in (0..count).zip(values) {
                array.set(index, value, 0)?;
            }
            Ok(())
        }
        _ => Err(SyscallError {
            call: "bpf_map_update_batch",
            io_error,
        }
        .into()),
    }
}
