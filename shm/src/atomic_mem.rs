//! Typed views of raw words in the mapping.
//!
//! Every word that more than one process touches is read and written as an
//! atomic, and so are record bytes copied in and out (relaxed, a word at a
//! time), so a racing read is never undefined behaviour, only stale.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

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
/// rewriting: relaxed atomic loads (a word at a time where aligned), so a
/// racing write makes the copy stale, never undefined. The caller orders
/// and validates the copy (the seqlock in `crate::seqlock`).
///
/// # Safety
/// `src..src+len` must lie inside a live mapping.
pub(crate) unsafe fn copy_out(src: *const u8, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(len);
    let dst = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
    let head = src.align_offset(8).min(len);
    let words = (len - head) / 8;
    for i in 0..head {
        // SAFETY: src+i is in bounds (caller) and dst+i within the reserved
        // capacity; AtomicU8 has the layout of u8.
        unsafe { *dst.add(i) = (*src.add(i).cast::<AtomicU8>()).load(Ordering::Relaxed) };
    }
    for w in 0..words {
        let at = head + w * 8;
        // SAFETY: src+at is 8-aligned (head reaches the alignment) and its 8
        // bytes are in bounds; dst+at..+8 is within the reserved capacity,
        // written unaligned.
        unsafe {
            let v = (*src.add(at).cast::<AtomicU64>()).load(Ordering::Relaxed);
            dst.add(at).cast::<u64>().write_unaligned(v);
        }
    }
    for i in head + words * 8..len {
        // SAFETY: as for the head bytes.
        unsafe { *dst.add(i) = (*src.add(i).cast::<AtomicU8>()).load(Ordering::Relaxed) };
    }
    // SAFETY: the loops above initialised all `len` bytes.
    unsafe { out.set_len(len) };
}

/// Copies `bytes` into shared memory that a stale reader may still be
/// copying (a freed record reused): relaxed atomic stores, a word at a time
/// where aligned. The caller orders them (the seqlock in `crate::seqlock`).
///
/// # Safety
/// `dst..dst+bytes.len()` must lie inside a live mapping owned by this writer.
pub(crate) unsafe fn copy_in(dst: *mut u8, bytes: &[u8]) {
    let len = bytes.len();
    let head = dst.align_offset(8).min(len);
    let words = (len - head) / 8;
    for (i, b) in bytes[..head].iter().enumerate() {
        // SAFETY: dst+i is in bounds (caller); AtomicU8 has the layout of u8.
        unsafe { (*dst.add(i).cast::<AtomicU8>()).store(*b, Ordering::Relaxed) };
    }
    for (w, chunk) in bytes[head..head + words * 8].chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        // SAFETY: dst+head+8w is 8-aligned and its 8 bytes are in bounds.
        unsafe {
            (*dst.add(head + w * 8).cast::<AtomicU64>())
                .store(u64::from_ne_bytes(word), Ordering::Relaxed)
        };
    }
    for (i, b) in bytes.iter().enumerate().skip(head + words * 8) {
        // SAFETY: as for the head bytes.
        unsafe { (*dst.add(i).cast::<AtomicU8>()).store(*b, Ordering::Relaxed) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_at_every_alignment_and_length() {
        let mut mem = vec![0u64; 8];
        let base = mem.as_mut_ptr().cast::<u8>();
        let mut out = vec![9u8; 3];
        for start in 0..9 {
            for len in 0..=40 {
                let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + start + 1) as u8).collect();
                // SAFETY: start + len <= 49 < 64 bytes of `mem`.
                unsafe {
                    copy_in(base.add(start), &bytes);
                    copy_out(base.add(start), len, &mut out);
                }
                assert_eq!(out, bytes, "start {start} len {len}");
            }
        }
    }
}
