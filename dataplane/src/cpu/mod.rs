//! CPU hints the hot path gives (prefetch, prefetch for write, cache-line demotion) and the
//! cycle counter its accounting reads (tsc.rs). Any thread; nothing here touches memory.

pub mod tsc;

/// A cache prefetch hint (read); never faults, whatever the address.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 (x86_64 baseline) is a hint that performs no access visible to the
    // program and cannot fault on any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Done with the line at `p` for now (CLDEMOTE): move it from this core's caches to the shared
/// last level, where the core that touches it next finds it without snooping this one.
#[inline(always)]
pub fn demote(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a hint that changes no architectural state; its encoding is a NOP on CPUs
    // without CLDEMOTE. Callers pass lines of mapped buffers they have just read.
    unsafe {
        std::arch::asm!("cldemote [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A prefetch with intent to write (PREFETCHW): takes the line exclusive before the store needs
/// it, instead of loading it shared and upgrading it at the store: two transfers of a line the
/// guest holds become one (docs/performance.md, "Hot-path choices").
#[inline(always)]
pub fn prefetch_w(p: *const u8) {
    // `_mm_prefetch::<_MM_HINT_ET0>` compiles to a plain PREFETCHT0 unless the build enables
    // the `prfchw` target feature, so the instruction is written out.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a hint that performs no access visible to the program and cannot fault on any
    // address; CPUs without PREFETCHW execute it as a NOP.
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `hint` every cache line of `len` bytes at `p` (a hint: nothing is dereferenced).
#[inline]
pub(crate) fn prefetch_lines(p: *mut u8, len: u32, mut hint: impl FnMut(*const u8)) {
    if len == 0 {
        return;
    }
    let (mut a, end) = (p as usize & !63, p as usize + len as usize);
    while a < end {
        hint(a as *const u8);
        a += 64;
    }
}
