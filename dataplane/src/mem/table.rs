//! Guest memory tables: the frontend's shared-memory regions mapped into this process, and
//! bounds-checked translation of guest-physical and frontend-virtual addresses to host pointers.
//! Also the dirty-page log of live migration (`DirtyLog`): the frontend's bitmap of the pages the
//! switch wrote. Built and dropped by the control thread; PMDs only use them through the rings
//! that hold them.

use std::fs::File;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::FileOffset;

/// One region as the frontend described it (vhost-user `SET_MEM_TABLE`).
#[derive(Debug, Clone, Copy)]
pub struct RegionDesc {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// The address of the region in the frontend's own address space (what SET_VRING_ADDR uses).
    pub user_addr: u64,
    /// Where the region starts inside the passed file.
    pub mmap_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("region {index}: empty or overflowing range (gpa {gpa:#x}, size {size:#x}, offset {offset:#x})")]
    BadRange {
        index: usize,
        gpa: u64,
        size: u64,
        offset: u64,
    },
    #[error("region {index} overlaps region {other}")]
    Overlap { index: usize, other: usize },
    #[error("region {index}: fstat of the passed fd failed")]
    Stat {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("region {index}: mmap of {len:#x} bytes failed")]
    Mmap {
        index: usize,
        len: usize,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("region {index}: needs {need:#x} bytes of its file, which has {have:#x}")]
    FileTooSmall { index: usize, need: u64, have: u64 },
    #[error("{regions} regions given with {files} files")]
    FileCount { regions: usize, files: usize },
    #[error("dirty log of {size:#x} bytes at offset {offset:#x}: cannot map it")]
    Log {
        size: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// A mapped region: `host` points at guest-physical `gpa`.
struct Region {
    gpa: u64,
    uva: u64,
    size: u64,
    host: *mut u8,
}

/// An immutable snapshot of one frontend's memory. Replaced whole on every SET_MEM_TABLE; the old
/// one is dropped (unmapped) by control only after every ring that used it came back from the PMD.
pub struct MemTable {
    regions: Vec<Region>,
    /// SIGBUS watches on the mappings (a frontend may shrink its files): dropped before them.
    guards: Vec<crate::mem::sigbus::Guard>,
    /// Owns the mappings: dropping it unmaps. Never read after construction.
    _maps: Vec<MmapRegion>,
}

// SAFETY: the raw pointers point into mappings owned by `_maps`, which live as long as the table;
// the table itself is never mutated after construction, so sharing it between threads is sound.
unsafe impl Send for MemTable {}
// SAFETY: as above: immutable after construction.
unsafe impl Sync for MemTable {}

impl MemTable {
    /// Map every region (`files[i]` backs `regions[i]`). Offsets need not be page aligned: like
    /// DPDK, the file is mapped from 0 to `mmap_offset + size`, rounded to the file's block size.
    pub fn map(regions: &[RegionDesc], files: Vec<File>) -> Result<Arc<MemTable>, MemError> {
        MemTable::map_for(regions, files, u32::MAX)
    }

    /// `map`, for the frontend `owner` (a port id): who `sigbus::faulted_owners` names if it
    /// shrinks a file.
    pub fn map_for(
        regions: &[RegionDesc],
        files: Vec<File>,
        owner: u32,
    ) -> Result<Arc<MemTable>, MemError> {
        if regions.len() != files.len() {
            return Err(MemError::FileCount {
                regions: regions.len(),
                files: files.len(),
            });
        }
        check_layout(regions)?;
        let mut out = Vec::with_capacity(regions.len());
        let mut maps = Vec::with_capacity(regions.len());
        let mut guards = Vec::with_capacity(regions.len());
        for (index, (r, file)) in regions.iter().zip(files).enumerate() {
            let bad = || MemError::BadRange {
                index,
                gpa: r.guest_phys_addr,
                size: r.size,
                offset: r.mmap_offset,
            };
            let (blk, file_len) =
                file_geometry(&file).map_err(|source| MemError::Stat { index, source })?;
            let end = r.mmap_offset.checked_add(r.size).ok_or_else(bad)?;
            // Touching a mapping past the end of its file raises SIGBUS in the PMD.
            if let Some(have) = file_len.filter(|&have| have < end) {
                return Err(MemError::FileTooSmall {
                    index,
                    need: end,
                    have,
                });
            }
            let len = end
                .checked_next_multiple_of(blk.max(1))
                .and_then(|l| usize::try_from(l).ok())
                .ok_or_else(bad)?;
            let map = MmapRegionBuilder::new(len)
                .with_file_offset(FileOffset::new(file, 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
                .map_err(|source| MemError::Mmap { index, len, source })?;
            guards.push(crate::mem::sigbus::Guard::register(
                map.as_ptr(),
                map.size(),
                owner,
            ));
            // `mmap_offset < len` was checked above, so this stays inside the mapping.
            let host = map.as_ptr().wrapping_add(r.mmap_offset as usize);
            out.push(Region {
                gpa: r.guest_phys_addr,
                uva: r.user_addr,
                size: r.size,
                host,
            });
            maps.push(map);
        }
        Ok(Arc::new(MemTable {
            regions: out,
            guards,
            _maps: maps,
        }))
    }

    /// The frontend shrank a file under one of the mappings (now anonymous zero memory).
    pub fn faulted(&self) -> bool {
        self.guards.iter().any(|g| g.faulted())
    }

    /// Host pointer for guest-physical `[gpa, gpa+len)` if it lies inside one region.
    #[inline]
    pub fn gpa_to_host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.gpa_to_host_partial(gpa, len)
            .filter(|&(_, n)| n == len)
            .map(|(p, _)| p)
    }

    /// Like `gpa_to_host` but returns how many bytes from `gpa` are contiguous in that region
    /// (at most `len`), so a buffer that crosses a region boundary can be split.
    #[inline]
    pub fn gpa_to_host_partial(&self, gpa: u64, len: u64) -> Option<(*mut u8, u64)> {
        for r in &self.regions {
            let off = gpa.wrapping_sub(r.gpa);
            if gpa >= r.gpa && off < r.size {
                return Some((r.host.wrapping_add(off as usize), len.min(r.size - off)));
            }
        }
        None
    }

    /// Host pointer for a frontend-virtual range (the addresses of SET_VRING_ADDR).
    pub fn uva_to_host(&self, uva: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            let off = uva.wrapping_sub(r.uva);
            if uva >= r.uva && off < r.size && len <= r.size - off {
                return Some(r.host.wrapping_add(off as usize));
            }
        }
        None
    }

    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// The guest-physical address of a host pointer into one of the regions.
    #[inline]
    pub fn host_to_gpa(&self, p: *const u8) -> Option<u64> {
        let p = p as usize;
        self.regions.iter().find_map(|r| {
            let off = p.wrapping_sub(r.host as usize) as u64;
            (p >= r.host as usize && off < r.size).then_some(r.gpa + off)
        })
    }
}

/// Size of the pages one bit of the dirty log stands for (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

/// The frontend's dirty-page bitmap for live migration (vhost-user SET_LOG_BASE with the
/// LOG_SHMFD protocol feature): bit n of byte n / 8 set means guest-physical page n was written
/// by the backend. The frontend reads and clears it concurrently, so bits are set atomically.
pub struct DirtyLog {
    bytes: *const AtomicU8,
    len: u64,
    /// Dropped before the mapping (see MemTable::guards).
    guard: crate::mem::sigbus::Guard,
    _map: MmapRegion,
}

// SAFETY: `bytes` points into the mapping `_map` owns, alive as long as the log; all access
// through it is atomic.
unsafe impl Send for DirtyLog {}
// SAFETY: as above.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Map `size` bytes of the frontend's log from `offset` in `file`.
    pub fn map(file: File, size: u64, offset: u64) -> Result<Arc<DirtyLog>, MemError> {
        DirtyLog::map_for(file, size, offset, u32::MAX)
    }

    /// `map`, for the frontend `owner` (see MemTable::map_for).
    pub fn map_for(
        file: File,
        size: u64,
        offset: u64,
        owner: u32,
    ) -> Result<Arc<DirtyLog>, MemError> {
        let err = |source| MemError::Log {
            size,
            offset,
            source,
        };
        let (_, file_len) = file_geometry(&file).map_err(err)?;
        let end = offset.checked_add(size).filter(|_| size > 0);
        let Some(end) = end.filter(|&e| file_len.is_none_or(|have| e <= have)) else {
            return Err(err(std::io::Error::other("outside the passed file")));
        };
        let len = usize::try_from(end).map_err(|_| err(std::io::Error::other("too large")))?;
        let map = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| err(std::io::Error::other(e)))?;
        Ok(Arc::new(DirtyLog {
            bytes: map.as_ptr().wrapping_add(offset as usize) as *const AtomicU8,
            len: size,
            guard: crate::mem::sigbus::Guard::register(map.as_ptr(), map.size(), owner),
            _map: map,
        }))
    }

    /// The frontend shrank the log's file (the mapping is anonymous zero memory now).
    pub fn faulted(&self) -> bool {
        self.guard.faulted()
    }

    /// Mark the pages of guest-physical `[gpa, gpa + len)`. Pages beyond the log (which the
    /// frontend sized for its memory) are not logged.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in gpa / LOG_PAGE..=last {
            if page / 8 >= self.len {
                return;
            }
            // SAFETY: page / 8 < len, the mapped size of the log.
            let byte = unsafe { &*self.bytes.add((page / 8) as usize) };
            let bit = 1u8 << (page % 8);
            if byte.load(Ordering::Relaxed) & bit == 0 {
                byte.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    /// Mark the pages under host memory `[p, p + len)` of `mem`'s regions.
    #[inline]
    pub fn mark_host(&self, mem: &MemTable, p: *const u8, len: u64) {
        if let Some(gpa) = mem.host_to_gpa(p) {
            self.mark(gpa, len);
        }
    }
}

fn check_layout(regions: &[RegionDesc]) -> Result<(), MemError> {
    for (index, r) in regions.iter().enumerate() {
        let bad = MemError::BadRange {
            index,
            gpa: r.guest_phys_addr,
            size: r.size,
            offset: r.mmap_offset,
        };
        if r.size == 0
            || r.guest_phys_addr.checked_add(r.size).is_none()
            || r.user_addr.checked_add(r.size).is_none()
            || r.mmap_offset.checked_add(r.size).is_none()
        {
            return Err(bad);
        }
        for (other, o) in regions.iter().enumerate().take(index) {
            let gpa_overlap = r.guest_phys_addr < o.guest_phys_addr + o.size
                && o.guest_phys_addr < r.guest_phys_addr + r.size;
            if gpa_overlap {
                return Err(MemError::Overlap { index, other });
            }
        }
    }
    Ok(())
}

/// The file's block size (the unit mappings are rounded to) and, for regular files (memfd,
/// tmpfs, hugetlbfs), its length.
fn file_geometry(file: &File) -> std::io::Result<(u64, Option<u64>)> {
    use std::os::unix::fs::MetadataExt;
    let md = file.metadata()?;
    // hugetlbfs reports the huge page size as its block size; mappings must be multiples of it.
    let blk = md.blksize();
    let blk = if blk.is_power_of_two() { blk } else { 4096 };
    Ok((blk, md.file_type().is_file().then_some(md.len())))
}

#[cfg(test)]
pub(crate) mod test_mem {
    //! Memory tables over memfds, for ring tests.
    use super::*;
    use std::ffi::CString;
    use std::os::fd::FromRawFd;

    pub fn memfd(size: u64) -> File {
        let name = CString::new("ringswitch-test").unwrap_or_default();
        // SAFETY: memfd_create with a valid C string; the returned fd is checked and owned by File.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap_or_default();
        f
    }

    /// One region of `size` bytes at guest-physical `gpa`, frontend-virtual `gpa + 0x1000_0000`.
    pub fn table(gpa: u64, size: u64) -> Arc<MemTable> {
        let r = RegionDesc {
            guest_phys_addr: gpa,
            size,
            user_addr: gpa + 0x1000_0000,
            mmap_offset: 0,
        };
        MemTable::map(&[r], vec![memfd(size)]).unwrap_or_else(|e| panic!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::test_mem::*;
    use super::*;

    #[test]
    fn translate_bounds() {
        let t = table(0x10000, 0x10000);
        assert!(t.gpa_to_host(0x10000, 0x10000).is_some());
        assert!(t.gpa_to_host(0x10000, 0x10001).is_none());
        assert!(t.gpa_to_host(0xffff, 1).is_none());
        assert!(t.gpa_to_host(0x1ffff, 1).is_some());
        assert!(t.gpa_to_host(0x20000, 0).is_none());
        assert!(t.gpa_to_host(u64::MAX, 2).is_none());
        assert_eq!(
            t.gpa_to_host_partial(0x1fff0, 0x100).map(|p| p.1),
            Some(0x10)
        );
        assert!(t.uva_to_host(0x1001_0000, 16).is_some());
        assert!(t.uva_to_host(0x10000, 16).is_none());
    }

    #[test]
    fn refuses_overlap_and_overflow() {
        let a = RegionDesc {
            guest_phys_addr: 0,
            size: 0x2000,
            user_addr: 0,
            mmap_offset: 0,
        };
        let b = RegionDesc {
            guest_phys_addr: 0x1000,
            ..a
        };
        assert!(matches!(
            MemTable::map(&[a, b], vec![memfd(0x2000), memfd(0x2000)]),
            Err(MemError::Overlap { .. })
        ));
        let c = RegionDesc {
            guest_phys_addr: u64::MAX - 10,
            ..a
        };
        assert!(matches!(
            MemTable::map(&[c], vec![memfd(0x2000)]),
            Err(MemError::BadRange { .. })
        ));
        assert!(matches!(
            MemTable::map(&[a], vec![]),
            Err(MemError::FileCount { .. })
        ));
        // A region larger than its file would fault (SIGBUS) when touched.
        let d = RegionDesc {
            mmap_offset: 0x1000,
            ..a
        };
        assert!(matches!(
            MemTable::map(&[d], vec![memfd(0x2000)]),
            Err(MemError::FileTooSmall { need: 0x3000, .. })
        ));
    }

    #[test]
    fn dirty_log_marks_pages_by_guest_physical_address() {
        let t = table(0x10000, 0x10000);
        let file = memfd(0x1000);
        let log = DirtyLog::map(file.try_clone().unwrap(), 0x10, 0x100).unwrap();
        let bits = |f: &File| {
            let mut b = vec![0u8; 0x10];
            std::os::unix::fs::FileExt::read_exact_at(f, &mut b, 0x100).unwrap();
            b
        };
        // Pages 0x10 and 0x11 (gpa 0x10ffe..0x11002), then page 0x1f through a host pointer.
        log.mark(0x10ffe, 4);
        let p = t.gpa_to_host(0x1f000, 1).unwrap();
        log.mark_host(&t, p, 1);
        log.mark(0x1000_0000, 0x1000); // beyond the log
        log.mark(0x5000, 0);
        let mut want = vec![0u8; 0x10];
        want[2] = 0b11;
        want[3] = 0x80;
        assert_eq!(bits(&file), want);
        assert_eq!(t.host_to_gpa(p.wrapping_add(5)), Some(0x1f005));
        assert_eq!(t.host_to_gpa(p.wrapping_add(0x1000)), None);
        assert!(DirtyLog::map(file.try_clone().unwrap(), 0x1000, 0x100).is_err());
        assert!(DirtyLog::map(file, 0, 0).is_err());
    }

    #[test]
    fn honours_mmap_offset() {
        let f = memfd(0x3000);
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"hello", 0x1000).unwrap_or_default();
        let r = RegionDesc {
            guest_phys_addr: 0x4000,
            size: 0x2000,
            user_addr: 0,
            mmap_offset: 0x1000,
        };
        let t = MemTable::map(&[r], vec![f]).unwrap_or_else(|e| panic!("{e}"));
        let p = t.gpa_to_host(0x4000, 5).unwrap_or(std::ptr::null_mut());
        // SAFETY: p points at 5 mapped bytes of the table, which is alive.
        let got = unsafe { std::slice::from_raw_parts(p, 5) };
        assert_eq!(got, b"hello");
    }
}
