//! Cache prefetch hints, for the queues that callers fill and the driver
//! drains: a slot a caller writes was last read on the driver's core, and
//! the unlock after the write waits until the slot's lines have come over.
//! Asking for them one call ahead overlaps that wait with the caller's own
//! work.
//!
//! A plain read prefetch: the write-intent one (`prefetchw`) needs a CPU
//! feature outside the x86_64 baseline and measured no better here.

/// Asks for the two cache lines at `addr` (a queue slot of up to 128
/// bytes). Any address will do: nothing is read.
#[inline]
pub(crate) fn two_lines(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = addr as *const i8;
        // SAFETY: sse is part of the x86_64 baseline, and a prefetch is a
        // hint: it reads nothing and cannot fault, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}
