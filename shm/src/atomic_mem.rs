//! Typed views of raw words in the mapping.
//!
//! Every word that more than one process touches is read and written as an
//! atomic, so a racing read is never undefined behaviour, only stale.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// The atomic `u64` at `base + off`.
///
/// # Safety
/// `base + off` must lie inside a live mapping, 8-byte aligned, and the
/// returned reference must not outlive that mapping.
#[inline]
pub(crate) unsafe fn u64_at<'a>(base: *mut u8, off: usize) -> &'a AtomicU64 {
    debug_assert_eq!(off % 8, 0);
    // SAFETY: caller guarantees bounds, alignment and lifetime; AtomicU64 has
    // the layout of u64 and any bit pattern is valid.
    unsafe { &*(base.add(off) as *const AtomicU64) }
}

/// The atomic `u32` at `base + off`.
///
/// # Safety
/// As [`u64_at`], 4-byte aligned.
#[inline]
pub(crate) unsafe fn u32_at<'a>(base: *mut u8, off: usize) -> &'a AtomicU32 {
    debug_assert_eq!(off % 4, 0);
    // SAFETY: as in u64_at.
    unsafe { &*(base.add(off) as *const AtomicU32) }
}

/// Copies `len` bytes out of shared memory that another process may be
/// rewriting. The caller validates the copy afterwards (seqlock style); the
/// volatile reads keep the compiler from assuming the bytes are stable.
///
/// # Safety
/// `src..src+len` must lie inside a live mapping.
pub(crate) unsafe fn copy_out(src: *const u8, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(len);
    for i in 0..len {
        // SAFETY: in bounds per the caller's contract.
        out.push(unsafe { std::ptr::read_volatile(src.add(i)) });
    }
    fence(Ordering::Acquire);
}

/// Copies `bytes` into shared memory that no reader trusts until a later
/// release store publishes it.
///
/// # Safety
/// `dst..dst+bytes.len()` must lie inside a live mapping owned by this writer.
pub(crate) unsafe fn copy_in(dst: *mut u8, bytes: &[u8]) {
    fence(Ordering::Release);
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: in bounds per the caller's contract.
        unsafe { std::ptr::write_volatile(dst.add(i), *b) };
    }
}
