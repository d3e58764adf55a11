//! Shared pieces of the fuzz targets: guest memory in memfds.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

/// An anonymous memory file of `size` bytes, as a frontend would pass for its guest memory.
pub fn memfd(size: u64) -> File {
    let name = CString::new("ringswitch-fuzz").unwrap_or_default();
    // SAFETY: memfd_create with a valid C string; the result is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("memfd size");
    f
}
