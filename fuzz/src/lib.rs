//! Shared pieces of the fuzz targets: guest memory in memfds (the frontend tool's).

use std::fs::File;

/// An anonymous memory file of `size` bytes, as a frontend would pass for its guest memory.
pub fn memfd(size: u64) -> File {
    perf::frontend::memfd(size).expect("memfd")
}
