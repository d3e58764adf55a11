//! Cycle counter for PMD accounting (the TSC on x86_64, a monotonic clock in ns elsewhere).

#[inline]
pub fn now() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64 and reads no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Cycles per second, measured once against the wall clock (about 20 ms).
pub fn hz() -> u64 {
    use std::time::{Duration, Instant};
    let (t0, c0) = (Instant::now(), now());
    std::thread::sleep(Duration::from_millis(20));
    let (dt, dc) = (t0.elapsed(), now().wrapping_sub(c0));
    (dc as f64 / dt.as_secs_f64()) as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_up() {
        let a = super::now();
        let b = super::now();
        assert!(b >= a);
        assert!(super::hz() > 1_000_000);
    }
}
